//! Delivery an operator can trust: guards on the source, the removal brake with approval,
//! plans that change nothing, add-only activations, the dead letter and membership history.
//! The destination is a fake platform on loopback that keeps the audience it was sent.

mod common;

use common::platform::FakePlatform;
use common::{Project, activation};
use segmentd::store::Store;

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

/// A segment of profiles with `score >= minimum`, sent to the fake platform.
fn segment(minimum: i64, activation_extra: &str) -> String {
    format!(
        "[rule]\nattribute = \"score\"\nop = \">=\"\nvalue = {minimum}\n\n\
         [[activations]]\nname = \"audience\"\nconnection = \"platform\"\n{activation_extra}\n"
    )
}

/// People 1..=n, each with score = id.
fn people(n: i64) -> String {
    let mut csv = String::from("id,score\n");
    for id in 1..=n {
        csv.push_str(&format!("{id},{id}\n"));
    }
    csv
}

fn keys(range: std::ops::RangeInclusive<i64>) -> Vec<String> {
    let mut keys: Vec<String> = range.map(|k| k.to_string()).collect();
    keys.sort();
    keys
}

fn project(platform: &FakePlatform, minimum: i64, extra: &str) -> Project {
    let project = Project::new();
    project.write("config.toml", &platform.config(20));
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write("pipelines/shop/people.csv", &people(50));
    project.write(
        "pipelines/shop/segments/scored.toml",
        &segment(minimum, extra),
    );
    project
}

const ID: &str = "scored/audience";

/// Every state table of segmentd, as text.
fn state_tables(project: &Project) -> String {
    let store = Store::open(&project.path("var/segmentd.duckdb"), "1GB", 1).unwrap();
    let connection = store.connection().unwrap();
    let mut dump = String::new();
    for table in [
        "runs",
        "segment_sizes",
        "memberships",
        "acknowledged",
        "deltas",
        "activation_runs",
        "membership_history",
        "dead_letters",
    ] {
        let text: Option<String> = connection
            .query_row(
                &format!(
                    "SELECT string_agg(CAST(t AS VARCHAR), '\n' ORDER BY CAST(t AS VARCHAR)) \
                     FROM segmentd_state.{table} AS t"
                ),
                [],
                |r| r.get(0),
            )
            .unwrap();
        dump.push_str(&format!("{table}:\n{}\n", text.unwrap_or_default()));
    }
    dump
}

#[test]
fn an_empty_source_is_refused_and_removes_nothing() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "");
    assert!(project.refresh("shop").0);
    assert_eq!(platform.audience(), keys(1..=50));

    project.write("pipelines/shop/people.csv", "id,score\n");
    let (ok, summary, _) = project.refresh("shop");
    assert!(!ok);
    assert_eq!(summary["status"], "failed");
    let error = summary["error"].as_str().unwrap();
    assert!(
        error.contains("refresh refused") && error.contains("min_profiles"),
        "{error}"
    );
    assert_eq!(platform.audience(), keys(1..=50));

    // Forced past the guard, the removal brake still holds the mass removal.
    let output = project.segmentd(&["refresh", "shop", "--force", "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["status"], "held", "{summary}");
    assert_eq!(activation(&summary, ID)["held"], true);
    assert_eq!(platform.audience(), keys(1..=50));
}

#[test]
fn a_source_that_shrinks_past_the_limit_is_refused() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "");
    assert!(project.refresh("shop").0);
    project.write("pipelines/shop/people.csv", &people(20));

    // The plan says so before any run does.
    let plan = project.segmentd(&["plan", "shop"]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains(
            "a run now would refuse the refresh and send nothing: the master segment \
                       would shrink from 50 to 20 profiles"
        ),
        "{text}"
    );

    let (ok, summary, _) = project.refresh("shop");
    assert!(!ok);
    let error = summary["error"].as_str().unwrap();
    assert!(error.contains("shrink from 50 to 20 profiles"), "{error}");
    assert_eq!(platform.audience(), keys(1..=50));
}

#[test]
fn a_mass_removal_is_held_until_an_operator_approves_it() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "");
    assert!(project.refresh("shop").0);

    // The edit would remove 40 of 50 members (80 %), over the default limit of 20 %.
    project.write("pipelines/shop/segments/scored.toml", &segment(41, ""));
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "a held run is not a failure: {stderr}");
    assert_eq!(summary["status"], "held");
    let entry = activation(&summary, ID);
    assert_eq!(
        (entry["removes"].as_i64(), entry["held"].as_bool()),
        (Some(40), Some(true))
    );
    assert_eq!(
        platform.audience(),
        keys(1..=50),
        "nothing removed while held"
    );
    let run = summary["run_id"].as_i64().unwrap().to_string();

    let refused = project.segmentd(&["approve", "shop", "999"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("run 999 of pipeline `shop` has no held delta")
    );

    let approved = project.segmentd(&["approve", "shop", &run]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    assert!(
        String::from_utf8_lossy(&approved.stdout)
            .contains("scored/audience: 0 adds and 40 removes delivered")
    );
    assert_eq!(platform.audience(), keys(41..=50));

    // Approved once is done: the next run sends nothing.
    let (ok, summary, _) = project.refresh("shop");
    assert!(ok);
    assert_eq!(
        (
            activation(&summary, ID)["adds"].as_i64(),
            activation(&summary, ID)["removes"].as_i64()
        ),
        (Some(0), Some(0))
    );
}

#[test]
fn removes_that_would_cross_the_minimum_audience_wait_while_adds_go_out() {
    let platform = FakePlatform::start();
    let extra = "min_audience_size = 45\nmax_removal_share = 1.0";
    let project = project(&platform, 1, extra);
    assert!(project.refresh("shop").0);
    assert_eq!(platform.audience(), keys(1..=50));

    // Ten members leave (score >= 11) and five join (51 to 55): 45 stay, the minimum. The
    // next edit removes ten more, which would leave 35.
    project.write("pipelines/shop/people.csv", &people(55));
    project.write("pipelines/shop/segments/scored.toml", &segment(11, extra));
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(summary["status"], "succeeded", "{summary}");
    assert_eq!(platform.audience(), keys(11..=55));

    project.write("pipelines/shop/segments/scored.toml", &segment(21, extra));
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "a held run is not a failure: {stderr}");
    assert_eq!(summary["status"], "held", "{summary}");
    let entry = activation(&summary, ID);
    assert_eq!(
        (entry["removes"].as_i64(), entry["held"].as_bool()),
        (Some(10), Some(true))
    );
    let reason = entry["hold_reason"].as_str().unwrap();
    assert!(
        reason.contains("leave 35 members, below the platform's minimum audience of 45"),
        "{reason}"
    );
    assert_eq!(
        platform.audience(),
        keys(11..=55),
        "nothing removed while held"
    );

    let run = summary["run_id"].as_i64().unwrap().to_string();
    let approved = project.segmentd(&["approve", "shop", &run]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    assert_eq!(platform.audience(), keys(21..=55));
}

#[test]
fn a_plan_changes_no_state_and_sends_nothing() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "");
    assert!(project.refresh("shop").0);
    project.write("pipelines/shop/segments/scored.toml", &segment(46, ""));
    project.write("pipelines/shop/people.csv", &people(55));

    let before = state_tables(&project);
    let requests = platform.state.lock().unwrap().requests;
    let output = project.segmentd(&["plan", "shop", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["profiles"], 55);
    assert_eq!(plan["segments"][0]["size"], 10);
    assert_eq!(plan["segments"][0]["current"], 50);
    let entry = &plan["activations"][0];
    assert_eq!(
        (entry["adds"].as_i64(), entry["removes"].as_i64()),
        (Some(5), Some(45))
    );
    assert_eq!(
        entry["sample_adds"],
        serde_json::json!(["51", "52", "53", "54", "55"])
    );
    let hold = entry["would_hold"].as_str().unwrap();
    assert!(
        hold.contains("45 removes of an audience of 50") && hold.contains("max_removal_share"),
        "{hold}"
    );

    assert_eq!(state_tables(&project), before);
    assert_eq!(platform.state.lock().unwrap().requests, requests);
    assert_eq!(platform.audience(), keys(1..=50));
}

#[test]
fn an_add_only_activation_never_removes() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "mode = \"add_only\"");
    assert!(project.refresh("shop").0);
    project.write(
        "pipelines/shop/segments/scored.toml",
        &segment(41, "mode = \"add_only\""),
    );
    let (ok, summary, _) = project.refresh("shop");
    assert!(ok);
    assert_eq!(activation(&summary, ID)["removes"], 0);
    assert_eq!(platform.audience(), keys(1..=50));
}

#[test]
fn members_rejected_run_after_run_go_to_the_dead_letter_until_retried() {
    let platform = FakePlatform::start();
    platform.state.lock().unwrap().rejects.insert("7".into());
    let project = project(&platform, 1, "dead_letter_after_runs = 2");

    for expected_adds in [50, 1] {
        let (ok, summary, _) = project.refresh("shop");
        assert!(ok);
        assert_eq!(activation(&summary, ID)["adds"], expected_adds);
        assert_eq!(activation(&summary, ID)["rejected"], 1);
    }
    let listed = project.segmentd(&["deadletter", "shop"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with(ID))
        .expect("member 7 is dead-lettered");
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[..5], [ID, "7", "add", "2", "2"]);
    assert!(row.ends_with("invalid address"));

    // Dead-lettered: no longer offered.
    let (_, summary, _) = project.refresh("shop");
    assert_eq!(activation(&summary, ID)["adds"], 0);

    let retried = project.segmentd(&["deadletter", "shop", "--retry"]);
    assert!(String::from_utf8_lossy(&retried.stdout).contains("1 members released"));
    platform.state.lock().unwrap().rejects.clear();
    let (_, summary, _) = project.refresh("shop");
    assert_eq!(activation(&summary, ID)["delivered_adds"], 1);
    assert_eq!(platform.audience(), keys(1..=50));
}

#[test]
fn history_says_when_and_why_a_member_entered_and_left() {
    let platform = FakePlatform::start();
    let project = project(&platform, 45, "max_removal_share = 1.0");
    assert!(project.refresh("shop").0); // run 1: 45..50 enter
    project.write(
        "pipelines/shop/segments/scored.toml",
        &segment(48, "max_removal_share = 1.0"),
    );
    assert!(project.refresh("shop").0); // run 2: 45..47 leave by rule change
    project.write(
        "pipelines/shop/people.csv",
        &people(50).replace("\n46,46\n", "\n46,460\n"),
    );
    assert!(project.refresh("shop").0); // run 3: 46 enters by data change

    let output = project.segmentd(&["history", "shop", "scored", "46"]);
    let text = String::from_utf8_lossy(&output.stdout);
    // Each line: run, id, event, reason words, then the date and time it was recorded.
    let events: Vec<String> = text
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words[..words.len() - 2].join(" ")
        })
        .collect();
    assert_eq!(
        events,
        [
            "run 1 entered first evaluation",
            "run 2 left rule change",
            "run 3 entered data change",
        ],
        "{text}"
    );
}

#[test]
fn a_member_whose_identifiers_change_is_removed_by_the_old_ones_before_the_add_of_the_new() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "identifiers = [\"score\"]");
    assert!(project.refresh("shop").0);
    assert_eq!(platform.audience(), keys(1..=50));

    // Person 7 stays in the segment with another score: the platform, which knows members by
    // key, must still have 7 after the remove of the old score and the add of the new one.
    let csv = people(50).replace("\n7,7\n", "\n7,70\n");
    project.write("pipelines/shop/people.csv", &csv);
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let entry = activation(&summary, ID);
    assert_eq!(
        (entry["adds"].as_i64(), entry["removes"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(platform.audience(), keys(1..=50));
    assert_eq!(platform.state.lock().unwrap().adds["7"], 2);
}

#[test]
fn a_mass_change_of_identifiers_is_not_held_as_a_mass_removal() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "identifiers = [\"score\"]");
    assert!(project.refresh("shop").0);

    // Everyone's score changes and nobody leaves: 50 removes of old identifiers, each followed
    // by an add of the new ones, is not 100 % of the audience leaving.
    let mut csv = String::from("id,score\n");
    for id in 1..=50 {
        csv.push_str(&format!("{id},{}\n", id + 100));
    }
    project.write("pipelines/shop/people.csv", &csv);
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let entry = activation(&summary, ID);
    assert_eq!(entry["held"], false, "{entry}");
    assert_eq!(
        (entry["adds"].as_i64(), entry["removes"].as_i64()),
        (Some(50), Some(50))
    );
    assert_eq!(platform.audience(), keys(1..=50));

    // Forty people really leaving (their score drops below the rule's 1) is still held.
    let mut csv = String::from("id,score\n");
    for id in 1..=50 {
        csv.push_str(&format!("{id},{}\n", if id <= 10 { id + 100 } else { 0 }));
    }
    project.write("pipelines/shop/people.csv", &csv);
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(activation(&summary, ID)["held"], true);
    assert_eq!(platform.audience(), keys(1..=50));
}

/// Runs `segmentd approve shop <run>`: whether it succeeded, its stdout and its stderr.
fn approve(project: &Project, run: i64) -> (bool, String, String) {
    let output = project.segmentd(&["approve", "shop", &run.to_string()]);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn approving_a_held_delta_a_newer_run_superseded_names_the_newer_run() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "");
    assert!(project.refresh("shop").0); // run 1: 50 members sent

    // Runs 2 and 3 both plan the removal of 40 of 50 members; run 3's delta supersedes run 2's.
    project.write("pipelines/shop/segments/scored.toml", &segment(41, ""));
    let (_, second, _) = project.refresh("shop");
    let (_, third, _) = project.refresh("shop");
    assert_eq!(
        (second["status"].as_str(), second["run_id"].as_i64()),
        (Some("held"), Some(2))
    );
    assert_eq!(
        (third["status"].as_str(), third["run_id"].as_i64()),
        (Some("held"), Some(3))
    );

    let (ok, _, stderr) = approve(&project, 2);
    assert!(!ok);
    assert!(
        stderr.contains("run 2 of pipeline `shop` has no held delta")
            && stderr.contains("`scored/audience` was superseded by run 3")
            && stderr.contains("run 3 holds the current delta")
            && stderr.contains("`segmentd approve shop 3`"),
        "{stderr}"
    );
    assert_eq!(platform.audience(), keys(1..=50), "nothing sent");

    let (ok, stdout, stderr) = approve(&project, 3);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("0 adds and 40 removes delivered"),
        "{stdout}"
    );
    assert_eq!(platform.audience(), keys(41..=50));

    // Once the newer run's delta is sent, nothing waits: the message says so.
    let (ok, _, stderr) = approve(&project, 2);
    assert!(!ok);
    assert!(
        stderr.contains("`scored/audience` was superseded by run 3")
            && stderr.contains("nothing of it is held"),
        "{stderr}"
    );
    let (ok, _, stderr) = approve(&project, 3);
    assert!(!ok);
    assert!(
        stderr.contains("`scored/audience` was already approved and sent"),
        "{stderr}"
    );
}

/// Runs 1 (50 members sent) and 2 (the rule now keeps 41 to 50: 40 removes, held), then the
/// approval of run 2, whose second batch of 20 removes the platform answers with HTTP 500
/// at every attempt. The platform is working again when it returns.
fn approval_that_fails_half_way(platform: &FakePlatform) -> Project {
    let project = project(platform, 1, "");
    assert!(project.refresh("shop").0);
    project.write("pipelines/shop/segments/scored.toml", &segment(41, ""));
    let (_, held, _) = project.refresh("shop");
    assert_eq!(
        (held["status"].as_str(), held["run_id"].as_i64()),
        (Some("held"), Some(2))
    );

    platform.state.lock().unwrap().failing_sequences.insert(1);
    let (ok, stdout, _) = approve(&project, 2);
    assert!(!ok, "a delivery that stopped is a failure: {stdout}");
    assert!(
        stdout.contains("scored/audience: 0 adds and 20 removes delivered")
            && stdout.contains("remove batch 1 not delivered"),
        "{stdout}"
    );
    assert_eq!(platform.audience().len(), 30);
    platform.state.lock().unwrap().failing_sequences.clear();
    project
}

#[test]
fn the_rest_of_an_approved_removal_that_partly_failed_is_sent_without_a_new_hold() {
    let platform = FakePlatform::start();
    let project = approval_that_fails_half_way(&platform);

    // The plan and the run agree: the 20 removes left are not held.
    let output = project.segmentd(&["plan", "shop", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let planned = &plan["activations"][0];
    assert_eq!(
        (planned["removes"].as_i64(), planned["would_hold"].as_str()),
        (Some(20), None),
        "{plan}"
    );

    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(summary["status"], "succeeded", "{summary}");
    let entry = activation(&summary, ID);
    assert_eq!(
        (
            entry["removes"].as_i64(),
            entry["delivered_removes"].as_i64(),
            entry["held"].as_bool()
        ),
        (Some(20), Some(20), Some(false)),
        "{entry}"
    );
    let note = entry["hold_reason"].as_str().unwrap_or_default();
    assert!(
        note.contains("continues the approval of run 2")
            && note.contains("20 removes left of the 40 it approved"),
        "{note}"
    );
    assert_eq!(platform.audience(), keys(41..=50));

    // The run record says so too.
    let store = Store::open(&project.path("var/segmentd.duckdb"), "1GB", 1).unwrap();
    let (status, reason): (String, String) = store
        .connection()
        .unwrap()
        .query_row(
            "SELECT status, hold_reason FROM segmentd_state.activation_runs WHERE run_id = 3",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    drop(store);
    assert_eq!((status.as_str(), reason.as_str()), ("delivered", note));

    // The approval is spent: a new mass removal is held as before (5 of 10 members).
    project.write("pipelines/shop/segments/scored.toml", &segment(46, ""));
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(summary["status"], "held", "{summary}");
    assert_eq!(activation(&summary, ID)["removes"], 5);
    assert_eq!(platform.audience(), keys(41..=50));
}

#[test]
fn an_approval_does_not_cover_removes_it_did_not_approve() {
    let platform = FakePlatform::start();
    let project = approval_that_fails_half_way(&platform);

    // The 20 removes left of the approval, and 41 to 45 that the approval never covered.
    project.write("pipelines/shop/segments/scored.toml", &segment(46, ""));
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(summary["status"], "held", "{summary}");
    let entry = activation(&summary, ID);
    assert_eq!(
        (entry["removes"].as_i64(), entry["held"].as_bool()),
        (Some(25), Some(true))
    );
    assert!(
        entry["hold_reason"]
            .as_str()
            .unwrap()
            .contains("max_removal_share"),
        "{entry}"
    );
    assert_eq!(platform.audience().len(), 30, "nothing more removed");
}

#[test]
fn under_the_minimum_audience_brake_changed_members_are_sent_and_only_leavers_wait() {
    let platform = FakePlatform::start();
    let project = project(
        &platform,
        1,
        "identifiers = [\"score\"]\nmin_audience_size = 45",
    );
    assert!(project.refresh("shop").0);

    // 1 to 40 change their score (the identifier sent), 41 to 50 leave: 40 would be left.
    let mut csv = String::from("id,score\n");
    for id in 1..=50 {
        csv.push_str(&format!("{id},{}\n", if id <= 40 { id + 100 } else { 0 }));
    }
    project.write("pipelines/shop/people.csv", &csv);
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let entry = activation(&summary, ID);
    assert_eq!(entry["held"], true, "{entry}");
    assert!(
        entry["hold_reason"]
            .as_str()
            .unwrap()
            .contains("would leave 40 members"),
        "{entry}"
    );
    // The platform knows members by key: the changed members are still there, re-added
    // after the removes of their old scores; nobody has left yet.
    assert_eq!(platform.audience(), keys(1..=50));
    assert_eq!(platform.state.lock().unwrap().adds["1"], 2);

    let run = summary["run_id"].as_i64().unwrap().to_string();
    let output = project.segmentd(&["approve", "shop", &run]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(platform.audience(), keys(1..=40));
}

#[test]
fn a_changed_member_whose_old_remove_was_refused_is_added_again_when_it_goes() {
    let platform = FakePlatform::start();
    let project = project(&platform, 1, "identifiers = [\"score\"]");
    assert!(project.refresh("shop").0);

    // Person 5's score changes; the platform refuses the remove of the old one.
    platform
        .state
        .lock()
        .unwrap()
        .rejected_removes
        .insert("5".into());
    project.write(
        "pipelines/shop/people.csv",
        &people(50).replace("\n5,5\n", "\n5,105\n"),
    );
    assert!(project.refresh("shop").0);
    assert_eq!(platform.audience(), keys(1..=50));

    // At the next run the remove goes through, and the new score is added again after it.
    platform.state.lock().unwrap().rejected_removes.clear();
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let entry = activation(&summary, ID);
    assert_eq!(
        (entry["adds"].as_i64(), entry["removes"].as_i64()),
        (Some(1), Some(1)),
        "{entry}"
    );
    assert_eq!(platform.audience(), keys(1..=50));

    // Nothing is left to send.
    let requests = platform.state.lock().unwrap().requests;
    assert!(project.refresh("shop").0);
    assert_eq!(platform.state.lock().unwrap().requests, requests);
}

#[test]
fn members_whose_new_identifiers_are_blank_count_as_leaving() {
    // 40 of 50 addresses go blank: that is 40 people the platform cannot keep.
    let (platform, summary) = blank_addresses("", 40);
    let entry = activation(&summary, ID);
    assert_eq!(entry["held"], true, "{entry}");
    assert!(
        entry["hold_reason"]
            .as_str()
            .unwrap()
            .contains("40 removes of an audience of 50"),
        "{entry}"
    );
    assert_eq!(platform.audience(), keys(1..=50));
}

#[test]
fn blank_new_identifiers_count_against_the_minimum_audience_too() {
    // 10 of 50 go blank: 40 would be left, under the minimum of 45.
    let (platform, summary) =
        blank_addresses("min_audience_size = 45\nmax_removal_share = 0.9", 10);
    let entry = activation(&summary, ID);
    assert_eq!(entry["held"], true, "{entry}");
    assert!(
        entry["hold_reason"]
            .as_str()
            .unwrap()
            .contains("would leave 40 members"),
        "{entry}"
    );
    assert_eq!(platform.audience(), keys(1..=50));
}

/// Sends 50 people with addresses, then blanks the first `blank` addresses and refreshes
/// again; returns the platform and the second run's summary.
fn blank_addresses(extra: &str, blank: i64) -> (FakePlatform, serde_json::Value) {
    let platform = FakePlatform::start();
    let project = Project::new();
    project.write("config.toml", &platform.config(20));
    project.write(
        "pipelines/shop/pipeline.toml",
        &PIPELINE.replace(
            "score = \"INTEGER\"",
            "score = \"INTEGER\", email = \"VARCHAR\"",
        ),
    );
    // The addresses of ids from 1 to `blank` are empty.
    let with_email = |blank: i64| {
        let mut csv = String::from("id,score,email\n");
        for id in 1..=50 {
            let email = if id <= blank {
                String::new()
            } else {
                format!("p{id}@example.com")
            };
            csv.push_str(&format!("{id},{id},{email}\n"));
        }
        csv
    };
    project.write("pipelines/shop/people.csv", &with_email(0));
    project.write(
        "pipelines/shop/segments/scored.toml",
        &segment(1, &format!("identifiers = [\"email\"]\n{extra}")),
    );
    assert!(project.refresh("shop").0);
    project.write("pipelines/shop/people.csv", &with_email(blank));
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    (platform, summary)
}

#[test]
fn an_approval_killed_while_it_sends_is_finished_by_approving_again() {
    let platform = FakePlatform::start();
    // Batches of 20 (the fake's config): 40 removes are two requests, each answered slowly.
    let project = project(&platform, 1, "");
    assert!(project.refresh("shop").0);
    project.write("pipelines/shop/segments/scored.toml", &segment(41, ""));
    let (_, summary, _) = project.refresh("shop");
    assert_eq!(activation(&summary, ID)["held"], true);
    let run = summary["run_id"].as_i64().unwrap().to_string();

    platform.state.lock().unwrap().delay = std::time::Duration::from_millis(1500);
    let arrivals = platform.state.lock().unwrap().arrivals;
    let mut approving = std::process::Command::new(env!("CARGO_BIN_EXE_segmentd"))
        .args(["approve", "shop", &run])
        .current_dir(project.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the first batch has been answered and while the second is in flight.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while platform.state.lock().unwrap().arrivals < arrivals + 2 {
        assert!(std::time::Instant::now() < deadline, "the approval sends");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    approving.kill().unwrap();
    approving.wait().unwrap();
    platform.state.lock().unwrap().delay = std::time::Duration::ZERO;

    let again = project.segmentd(&["approve", "shop", &run]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(platform.audience(), keys(41..=50));
}
