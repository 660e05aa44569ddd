//! Kill -9 of the daemon at 20 points spread over a push to a slow platform, then restart:
//! nothing is lost, and no member is added more than twice.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Project;
use common::platform::FakePlatform;

const PIPELINE: &str = r#"
time_zone = "UTC"
as_of = "2024-06-30 12:00:00"

[sources.people]
format = "csv"
path = "people.csv"
columns = { id = "BIGINT" }

[master]
key = "id"
source = "people"
columns = { id = "BIGINT" }
"#;

const MEMBERS: usize = 600;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(project: &Project) -> Child {
    Command::new(env!("CARGO_BIN_EXE_segmentd"))
        .arg("run")
        .current_dir(project.dir.path())
        .env("SEGMENTD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Posts a run trigger, retrying until the daemon listens.
fn trigger(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut stream| {
            use std::io::{Read, Write};
            stream.write_all(
                b"POST /pipelines/shop/runs HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\n\
                  connection: close\r\n\r\n",
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        });
        if let Ok(response) = answer
            && response.starts_with("HTTP/1.1 202")
        {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon accepts a trigger");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kill_nine_during_a_push_loses_nothing_and_adds_each_member_at_most_twice() {
    let platform = FakePlatform::start();
    platform.state.lock().unwrap().delay = Duration::from_millis(40);
    let project = Project::new();
    let port = free_port();
    project.write(
        "config.toml",
        &format!(
            "{}\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
            platform.config(5)
        ),
    );
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    let ids: String = (1..=MEMBERS).map(|id| format!("{id}\n")).collect();
    project.write("pipelines/shop/people.csv", &format!("id\n{ids}"));
    project.write(
        "pipelines/shop/segments/everyone.toml",
        "[[activations]]\nname = \"audience\"\nconnection = \"platform\"\n",
    );
    let requests = || platform.state.lock().unwrap().requests;

    for point in 0..20u64 {
        let mut daemon = start(&project);
        trigger(port);
        // Two answered requests since the restart: the batch that was in flight at the last
        // kill has been re-sent and recorded; then kill somewhere in or after the next one.
        let seen = requests();
        wait_for("two requests", || requests() >= seen + 2);
        std::thread::sleep(Duration::from_millis(point * 7 % 50));
        daemon.kill().unwrap();
        daemon.wait().unwrap();
    }

    let mut daemon = start(&project);
    trigger(port);
    wait_for("the whole audience", || {
        platform.state.lock().unwrap().audience.len() == MEMBERS
    });
    // Let the final run record its last batch, then check that a further run sends nothing.
    std::thread::sleep(Duration::from_millis(500));
    let before = requests();
    trigger(port);
    std::thread::sleep(Duration::from_millis(1500));
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    let state = platform.state.lock().unwrap();
    let expected: std::collections::BTreeSet<String> =
        (1..=MEMBERS).map(|id| id.to_string()).collect();
    assert_eq!(state.audience, expected);
    let most = state.adds.values().max().copied().unwrap();
    assert!(most <= 2, "a member was added {most} times");
    assert_eq!(
        state.requests, before,
        "a converged audience gets no further requests"
    );
}

#[test]
fn kill_nine_during_a_replace_leaves_the_old_list_or_the_new_one_never_a_part() {
    let platform = FakePlatform::start();
    let project = Project::new();
    let port = free_port();
    project.write(
        "config.toml",
        &format!(
            "{}\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
            platform.config(5)
        ),
    );
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    let ids: String = (1..=MEMBERS).map(|id| format!("{id}\n")).collect();
    project.write("pipelines/shop/people.csv", &format!("id\n{ids}"));
    let segment = |rule: &str| {
        format!(
            "{rule}[[activations]]\nname = \"audience\"\nconnection = \"platform\"\n\
             mode = \"mirror\"\n"
        )
    };
    project.write("pipelines/shop/segments/everyone.toml", &segment(""));
    let (ok, _, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(platform.state.lock().unwrap().audience.len(), MEMBERS);
    let first_replace = platform.state.lock().unwrap().sizes.len();

    // The next list leaves out ids 1 to 100; every replace of it is killed part way.
    project.write(
        "pipelines/shop/segments/everyone.toml",
        &segment("[rule]\nattribute = \"id\"\nop = \">\"\nvalue = 100\n\n"),
    );
    platform.state.lock().unwrap().delay = Duration::from_millis(20);
    let requests = || platform.state.lock().unwrap().requests;
    for point in 0..8u64 {
        let mut daemon = start(&project);
        trigger(port);
        let seen = requests();
        wait_for("two requests", || requests() >= seen + 2);
        std::thread::sleep(Duration::from_millis(point * 11 % 60));
        daemon.kill().unwrap();
        daemon.wait().unwrap();
    }
    assert_eq!(
        platform.state.lock().unwrap().audience.len(),
        MEMBERS,
        "no replace finished, so the old list stands"
    );

    let mut daemon = start(&project);
    trigger(port);
    wait_for("the new list", || {
        platform.state.lock().unwrap().audience.len() == MEMBERS - 100
    });
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    let state = platform.state.lock().unwrap();
    let expected: std::collections::BTreeSet<String> =
        (101..=MEMBERS).map(|id| id.to_string()).collect();
    assert_eq!(state.audience, expected);
    assert!(
        state.sizes[first_replace..]
            .iter()
            .all(|size| [MEMBERS, MEMBERS - 100].contains(size)),
        "the audience held part of a list"
    );
    assert!(
        !state.sessions.is_empty(),
        "each interrupted replace was begun again under a new session"
    );
}
