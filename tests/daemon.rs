//! The daemon through its HTTP API: health, a manual trigger, the run's result and a profile
//! look-up, against the real binary.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Project;

const PIPELINE: &str = r#"
time_zone = "UTC"
as_of = "2024-06-30 12:00:00"

[sources.people]
format = "jsonl"
path = "people.jsonl"
columns = { id = "VARCHAR", country = "VARCHAR", visits = "INTEGER" }

[master]
key = "id"
source = "people"
columns = { id = "VARCHAR", country = "VARCHAR", visits = "INTEGER" }
"#;

const PEOPLE: &str = r#"{"id": "a", "country": "FR", "visits": 3}
{"id": "b", "country": "DE", "visits": 12}
{"id": "c", "country": "FR", "visits": 40}
"#;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// A project with the `web` pipeline and the HTTP API on a free loopback port.
fn web_project() -> (Project, u16) {
    let project = Project::new();
    let port = free_port();
    let config = std::fs::read_to_string(project.path("config.toml")).unwrap();
    project.write(
        "config.toml",
        &format!("{config}\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    project.write("pipelines/web/pipeline.toml", PIPELINE);
    project.write("pipelines/web/people.jsonl", PEOPLE);
    (project, port)
}

#[tokio::test]
async fn a_manual_trigger_runs_the_pipeline_and_profiles_can_be_looked_up() {
    let (project, port) = web_project();
    project.write(
        "pipelines/web/segments/french.toml",
        "[rule]\nattribute = \"country\"\nop = \"=\"\nvalue = \"FR\"\n\n[[activations]]\nname = \"export\"\nconnection = \"exports\"\n",
    );
    project.write(
        "pipelines/web/segments/frequent/french_regulars.toml",
        "[rule]\nall = [{ segment = \"french\" }, { attribute = \"visits\", op = \">=\", value = 10 }]\n",
    );

    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_segmentd"))
            .arg("run")
            .current_dir(project.dir.path())
            .env("SEGMENTD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    let started = Instant::now();
    loop {
        if let Ok(response) = client.get(format!("{base}/health")).send().await {
            assert_eq!(response.status().as_u16(), 200);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon answers /health"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let unknown = client
        .post(format!("{base}/pipelines/nope/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);

    let triggered = client
        .post(format!("{base}/pipelines/web/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(triggered.status().as_u16(), 202);
    let body: serde_json::Value = triggered.json().await.unwrap();
    assert_eq!(body["status"], "queued");

    let summary = loop {
        let (status, body) = get_json(&client, &format!("{base}/pipelines/web/runs/latest")).await;
        assert_eq!(status, 200);
        if !body["last_run"].is_null() && body["running"] == false {
            break body["last_run"].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run finishes: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(summary["status"], "succeeded", "{summary}");
    assert_eq!(summary["trigger"], "http");
    assert_eq!(common::segment_size(&summary, "french"), 2);
    assert_eq!(
        common::segment_size(&summary, "frequent/french_regulars"),
        1
    );
    assert_eq!(
        common::activation(&summary, "french/export")["delivered_adds"],
        2
    );

    let (status, body) = get_json(&client, &format!("{base}/pipelines/web/profiles/c")).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["segments"],
        serde_json::json!(["french", "frequent/french_regulars"])
    );
    let (status, body) = get_json(&client, &format!("{base}/pipelines/web/profiles/b")).await;
    assert_eq!(
        (status, body["segments"].clone()),
        (200, serde_json::json!([]))
    );
    let (status, _) = get_json(&client, &format!("{base}/pipelines/web/profiles/zz")).await;
    assert_eq!(status, 404);
}

/// Starts `segmentd run` in the project and waits until it answers `/health`.
async fn start_daemon(project: &Project, client: &reqwest::Client, base: &str) -> Daemon {
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_segmentd"))
            .arg("run")
            .current_dir(project.dir.path())
            .env("SEGMENTD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while client.get(format!("{base}/health")).send().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon answers /health"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon
}

/// `GET /pipelines/web/runs/latest` once the daemon is idle and its latest run is `run_id`.
async fn latest_run(client: &reqwest::Client, base: &str, run_id: i64) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let (status, body) = get_json(client, &format!("{base}/pipelines/web/runs/latest")).await;
        assert_eq!(status, 200, "{body}");
        if body["running"] == false && body["last_run"]["run_id"] == run_id {
            return body["last_run"].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "run {run_id} finishes: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A run summary without its wall time, which the terminal and the API measure apart.
fn without_elapsed(summary: &serde_json::Value) -> serde_json::Value {
    let mut summary = summary.clone();
    let elapsed = summary
        .as_object_mut()
        .and_then(|fields| fields.remove("elapsed"));
    assert!(
        elapsed.and_then(|e| e.as_f64()).is_some_and(|s| s >= 0.0),
        "a summary has its wall time in seconds: {summary}"
    );
    summary
}

#[tokio::test]
async fn the_latest_run_is_answered_from_the_store_whichever_process_made_it() {
    let (project, port) = web_project();
    let rule = |country: &str| {
        format!(
            "[rule]\nattribute = \"country\"\nop = \"=\"\nvalue = \"{country}\"\n\n\
             [[activations]]\nname = \"export\"\nconnection = \"exports\"\n"
        )
    };
    project.write("pipelines/web/segments/chosen.toml", &rule("FR"));

    // Runs 1 and 2 by the CLI: a and c are sent; then the rule picks b alone, which would
    // remove both (over max_removal_share), so the delta is held.
    assert!(project.refresh("web").0);
    project.write("pipelines/web/segments/chosen.toml", &rule("DE"));
    let (ok, cli_run, stderr) = project.refresh("web");
    assert!(ok, "{stderr}");
    assert_eq!(cli_run["status"], "held", "{cli_run}");

    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let daemon = start_daemon(&project, &client, &base).await;
    let latest = latest_run(&client, &base, 2).await;
    assert_eq!(without_elapsed(&latest), without_elapsed(&cli_run));
    let entry = common::activation(&latest, "chosen/export");
    assert_eq!(
        (
            entry["adds"].as_i64(),
            entry["removes"].as_i64(),
            entry["held"].as_bool()
        ),
        (Some(1), Some(2), Some(true)),
        "{latest}"
    );
    assert!(
        entry["hold_reason"]
            .as_str()
            .unwrap()
            .contains("max_removal_share"),
        "{entry}"
    );
    assert_eq!(common::segment_size(&latest, "chosen"), 1);
    assert_eq!(latest["segments"][0]["previous"], 2);

    // Run 3 by this daemon plans the same delta again; it supersedes run 2's.
    let triggered = client
        .post(format!("{base}/pipelines/web/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(triggered.status().as_u16(), 202);
    let daemon_run = latest_run(&client, &base, 3).await;
    assert_eq!(
        (
            daemon_run["status"].as_str(),
            daemon_run["trigger"].as_str()
        ),
        (Some("held"), Some("http")),
        "{daemon_run}"
    );

    let refused = client
        .post(format!("{base}/pipelines/web/runs/2/approve"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 409);
    let body: serde_json::Value = refused.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("`chosen/export` was superseded by run 3")
            && error.contains("`segmentd approve web 3`"),
        "{body}"
    );
    assert_eq!(
        body["activations"],
        serde_json::json!([{
            "activation": "chosen/export",
            "state": "superseded",
            "superseded_by": 3,
            "current_run": 3,
            "current_held": true
        }])
    );

    // Restarted, the daemon still knows run 3 and can approve it.
    drop(daemon);
    let _daemon = start_daemon(&project, &client, &base).await;
    let latest = latest_run(&client, &base, 3).await;
    assert_eq!(without_elapsed(&latest), without_elapsed(&daemon_run));

    let approved = client
        .post(format!("{base}/pipelines/web/runs/3/approve"))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status().as_u16(), 200);
    let latest = latest_run(&client, &base, 3).await;
    assert_eq!(
        (latest["status"].as_str(), latest["error"].as_str()),
        (Some("succeeded"), None),
        "{latest}"
    );
    assert_eq!(
        latest["activations"].as_array().unwrap().len(),
        1,
        "{latest}"
    );
    let entry = common::activation(&latest, "chosen/export");
    assert_eq!(
        (
            entry["delivered_adds"].as_i64(),
            entry["delivered_removes"].as_i64(),
            entry["held"].as_bool(),
            entry["error"].as_str()
        ),
        (Some(1), Some(2), Some(false), None),
        "{latest}"
    );
    assert_eq!(
        project.exported_keys("chosen/export", 3, "remove"),
        ["a", "c"]
    );
}

#[test]
fn a_run_killed_during_a_push_is_finished_at_restart_and_reported_whole() {
    let platform = common::platform::FakePlatform::start();
    platform.state.lock().unwrap().delay = Duration::from_millis(100);
    let project = Project::new();
    let port = free_port();
    project.write(
        "config.toml",
        &format!(
            "{}\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
            platform.config(5)
        ),
    );
    project.write("pipelines/web/pipeline.toml", PIPELINE);
    let people: String = (1..=30)
        .map(|id| format!("{{\"id\": \"p{id:02}\", \"country\": \"FR\", \"visits\": {id}}}\n"))
        .collect();
    project.write("pipelines/web/people.jsonl", &people);
    project.write(
        "pipelines/web/segments/everyone.toml",
        "[[activations]]\nname = \"audience\"\nconnection = \"platform\"\n",
    );
    let requests = || platform.state.lock().unwrap().requests;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    runtime.block_on(async {
        // Six batches of five, a tenth of a second each: killed after the second.
        let daemon = start_daemon(&project, &client, &base).await;
        let triggered = client
            .post(format!("{base}/pipelines/web/runs"))
            .send()
            .await
            .unwrap();
        assert_eq!(triggered.status().as_u16(), 202);
        let started = Instant::now();
        while requests() < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "two batches sent"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(daemon);
        assert!(requests() < 6, "killed before the last batch");

        let _daemon = start_daemon(&project, &client, &base).await;
        let latest = latest_run(&client, &base, 1).await;
        assert_eq!(
            (latest["status"].as_str(), latest["profiles"].as_i64()),
            (Some("succeeded"), Some(30)),
            "{latest}"
        );
        assert_eq!(common::segment_size(&latest, "everyone"), 30);
        let entry = common::activation(&latest, "everyone/audience");
        assert_eq!(
            (entry["adds"].as_i64(), entry["delivered_adds"].as_i64()),
            (Some(30), Some(30)),
            "{latest}"
        );
    });
    assert_eq!(platform.audience().len(), 30);
}
