//! `mirror` activations: every run replaces the destination's whole list with the segment's
//! members, so changes made on the platform by other means are put right; a replace that does
//! not complete leaves the old list; the brakes hold a replace whole. The destination is the
//! fake platform on loopback, which keeps a replace's batches aside until its last batch.

mod common;

use std::collections::BTreeSet;

use common::platform::FakePlatform;
use common::{Project, activation};

const PIPELINE: &str = r#"
time_zone = "UTC"
as_of = "2024-06-30 12:00:00"

[sources.people]
format = "csv"
path = "people.csv"
columns = { id = "BIGINT", score = "INTEGER" }

[master]
key = "id"
source = "people"
columns = { id = "BIGINT", score = "INTEGER" }
"#;

const ID: &str = "scored/audience";

/// A mirror segment of profiles with `score >= minimum`; people 1..=50 have score = id.
fn project(platform: &FakePlatform, minimum: i64) -> Project {
    let project = Project::new();
    project.write("config.toml", &platform.config(20));
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    let mut people = String::from("id,score\n");
    for id in 1..=50 {
        people.push_str(&format!("{id},{id}\n"));
    }
    project.write("pipelines/shop/people.csv", &people);
    write_segment(&project, minimum);
    project
}

fn write_segment(project: &Project, minimum: i64) {
    project.write(
        "pipelines/shop/segments/scored.toml",
        &format!(
            "[rule]\nattribute = \"score\"\nop = \">=\"\nvalue = {minimum}\n\n\
             [[activations]]\nname = \"audience\"\nconnection = \"platform\"\nmode = \"mirror\"\n"
        ),
    );
}

fn keys(range: std::ops::RangeInclusive<i64>) -> BTreeSet<String> {
    range.map(|k| k.to_string()).collect()
}

#[test]
fn each_run_replaces_the_list_and_puts_right_what_changed_on_the_platform() {
    let platform = FakePlatform::start();
    let project = project(&platform, 11);

    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let first = activation(&summary, ID);
    assert_eq!(first["adds"], 40);
    assert_eq!(first["removes"], 0);
    assert_eq!(first["replaced"], 40);
    assert_eq!(platform.state.lock().unwrap().audience, keys(11..=50));
    // 40 members in batches of 20: two requests, one replace.
    assert_eq!(platform.state.lock().unwrap().requests, 2);
    assert_eq!(platform.state.lock().unwrap().replaces, 1);

    // Someone edits the list on the platform: one member added, one taken away.
    {
        let mut state = platform.state.lock().unwrap();
        state.audience.insert("999".into());
        state.audience.remove("20");
    }
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let second = activation(&summary, ID);
    // Nothing changed on segmentd's side, yet the list is sent again and put right.
    assert_eq!(
        (second["adds"].as_i64(), second["removes"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(second["replaced"], 40);
    assert_eq!(platform.state.lock().unwrap().audience, keys(11..=50));
    assert_eq!(platform.state.lock().unwrap().replaces, 2);
}

#[test]
fn members_who_leave_are_gone_after_the_next_replace_and_counted_as_removed() {
    let platform = FakePlatform::start();
    let project = project(&platform, 11);
    assert!(project.refresh("shop").0);

    write_segment(&project, 13);
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let run = activation(&summary, ID);
    assert_eq!(
        (run["adds"].as_i64(), run["removes"].as_i64()),
        (Some(0), Some(2))
    );
    assert_eq!(run["delivered_removes"], 2);
    assert_eq!(run["replaced"], 38);
    assert_eq!(platform.state.lock().unwrap().audience, keys(13..=50));
}

#[test]
fn a_replace_that_fails_part_way_leaves_the_old_list_and_the_next_run_sends_it_whole() {
    let platform = FakePlatform::start();
    let project = project(&platform, 11);
    assert!(project.refresh("shop").0);

    // The platform fails every attempt at the second batch of the next replace.
    write_segment(&project, 15);
    platform.state.lock().unwrap().failing_sequences.insert(1);
    let (_, summary, _) = project.refresh("shop");
    let run = activation(&summary, ID);
    assert!(
        run["error"].as_str().unwrap().contains("replace batch 1"),
        "{run}"
    );
    assert!(run["replaced"].is_null(), "{run}");
    {
        let state = platform.state.lock().unwrap();
        assert_eq!(state.audience, keys(11..=50), "the old list stays whole");
        assert_eq!(
            state.sessions.len(),
            1,
            "one session left without its last batch"
        );
    }

    platform.state.lock().unwrap().failing_sequences.clear();
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(activation(&summary, ID)["replaced"], 36);
    let state = platform.state.lock().unwrap();
    assert_eq!(state.audience, keys(15..=50));
    // The audience only ever held the first list or the second, never a part of one.
    assert!(
        state.sizes.iter().all(|size| [0, 40, 36].contains(size)),
        "{:?}",
        state.sizes
    );
}

#[test]
fn a_replace_that_would_remove_most_of_the_list_waits_whole_for_approval() {
    let platform = FakePlatform::start();
    let project = project(&platform, 11);
    assert!(project.refresh("shop").0);
    let requests = platform.state.lock().unwrap().requests;

    // 32 of 40 members would go: 80 %, over the default max_removal_share of 0.2.
    write_segment(&project, 43);
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let run = activation(&summary, ID);
    assert_eq!(run["held"], true);
    assert!(
        run["hold_reason"]
            .as_str()
            .unwrap()
            .contains("max_removal_share"),
        "{run}"
    );
    assert_eq!(
        platform.state.lock().unwrap().requests,
        requests,
        "nothing sent"
    );
    assert_eq!(platform.state.lock().unwrap().audience, keys(11..=50));

    let run_id = summary["run_id"].as_i64().unwrap().to_string();
    let output = project.segmentd(&["approve", "shop", &run_id]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(platform.state.lock().unwrap().audience, keys(43..=50));
}

#[test]
fn plan_says_a_mirror_activation_would_replace_the_list() {
    let platform = FakePlatform::start();
    let project = project(&platform, 11);
    assert!(project.refresh("shop").0);
    write_segment(&project, 12);

    let output = project.segmentd(&["plan", "shop"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|line| line.starts_with(ID))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        [
            ID, "0", "1", "mirror:", "would", "replace", "the", "list", "with", "39", "members"
        ]
    );
}

#[test]
fn mirror_on_a_connection_that_cannot_replace_names_the_line_and_the_types_that_can() {
    let project = Project::new();
    project.write(
        "config.toml",
        "[connections.news]\ntype = \"sendgrid\"\napi_key_env = \"SENDGRID_KEY\"\n",
    );
    project.write(
        "pipelines/shop/pipeline.toml",
        &PIPELINE.replace("score = \"INTEGER\"", "email = \"VARCHAR\""),
    );
    project.write("pipelines/shop/people.csv", "id,email\n1,a@example.com\n");
    project.write(
        "pipelines/shop/segments/scored.toml",
        "[[activations]]\nname = \"news\"\nconnection = \"news\"\nidentifiers = [\"email\"]\n\
         settings = { list_id = \"a8f5e1d2-1c3b-4e5f-9a7b-0c1d2e3f4a5b\" }\nmode = \"mirror\"\n",
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_segmentd"))
        .arg("validate")
        .current_dir(project.dir.path())
        .env("SENDGRID_KEY", "SG.key")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("segments/scored.toml:6")
            && stderr.contains("connection type `sendgrid` cannot replace a whole list")
            && stderr.contains("file, webhook, meta"),
        "{stderr}"
    );
}

#[test]
fn a_held_replace_is_not_sent_once_the_activation_is_no_longer_mirror() {
    let platform = FakePlatform::start();
    let project = project(&platform, 11);
    assert!(project.refresh("shop").0);
    write_segment(&project, 43);
    let (_, summary, _) = project.refresh("shop");
    assert_eq!(activation(&summary, ID)["held"], true);
    let requests = platform.state.lock().unwrap().requests;

    // The operator turns the activation to add_only before approving the held replace.
    let text = std::fs::read_to_string(project.path("pipelines/shop/segments/scored.toml"))
        .unwrap()
        .replace("mode = \"mirror\"", "mode = \"add_only\"");
    project.write("pipelines/shop/segments/scored.toml", &text);
    let run_id = summary["run_id"].as_i64().unwrap().to_string();
    let output = project.segmentd(&["approve", "shop", &run_id]);

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no longer has mode mirror, but its held delta replaces the whole list"),
        "{stderr}"
    );
    assert_eq!(
        platform.state.lock().unwrap().requests,
        requests,
        "nothing sent"
    );
    assert_eq!(platform.state.lock().unwrap().audience, keys(11..=50));
}

#[test]
fn a_plan_for_a_mirror_segment_that_became_empty_shows_the_removes_it_would_send() {
    let platform = FakePlatform::start();
    let project = project(&platform, 11);
    assert!(project.refresh("shop").0);
    write_segment(&project, 1000);

    let output = project.segmentd(&["plan", "shop"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.starts_with(ID))
        .unwrap_or_else(|| panic!("{stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[..5], [ID, "0", "40", "would", "be"], "{line}");
    assert!(!line.contains("replace the list"), "{line}");
}

#[test]
fn two_activations_keeping_one_meta_audience_are_refused_unless_both_only_add() {
    let project = Project::new();
    project.write(
        "config.toml",
        "[connections.ads]\ntype = \"meta\"\naccess_token_env = \"META_TOKEN\"\n",
    );
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write("pipelines/shop/people.csv", "id,score\n1,1\n");
    let activation = |mode: &str| {
        format!(
            "[[activations]]\nname = \"ads\"\nconnection = \"ads\"\nmode = \"{mode}\"\n\
             settings = {{ audience_id = \"2385\", schema = {{ EXTERN_ID = \"id\" }} }}\n\
             identifiers = [\"id\"]\n"
        )
    };
    let validate = |project: &Project| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_segmentd"))
            .arg("validate")
            .current_dir(project.dir.path())
            .env("META_TOKEN", "token")
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    project.write("pipelines/shop/segments/a.toml", &activation("mirror"));
    project.write("pipelines/shop/segments/b.toml", &activation("add_remove"));
    let (ok, stderr) = validate(&project);
    assert!(!ok);
    assert!(
        stderr.contains("segments/b.toml:2: activation `b/ads` keeps the Meta audience at")
            && stderr.contains("as activation `a/ads` does")
            && stderr.contains("a.toml:2); the two would undo each other's changes"),
        "{stderr}"
    );

    project.write("pipelines/shop/segments/a.toml", &activation("add_only"));
    project.write("pipelines/shop/segments/b.toml", &activation("add_only"));
    let (ok, stderr) = validate(&project);
    assert!(ok, "{stderr}");
}
