//! `segmentd validate`: every problem at once, each with its file and line.

mod common;

use common::Project;

const PIPELINE: &str = r#"
time_zone = "Europe/Paris"

[sources.people]
format = "csv"
path = "people.csv"
columns = { id = "BIGINT", country = "VARCHAR", born = "DATE" }

[master]
key = "id"
source = "people"
columns = { id = "BIGINT", country = "VARCHAR", born = "DATE" }
"#;

fn validate(project: &Project) -> (bool, String) {
    let output = project.segmentd(&["validate"]);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_valid_configuration_passes() {
    let project = Project::new();
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write(
        "pipelines/shop/segments/french.toml",
        "[rule]\nattribute = \"country\"\nop = \"=\"\nvalue = \"FR\"\n",
    );
    let output = project.segmentd(&["validate"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("pipeline `shop`: 1 sources, 1 segments, 0 activations"),
        "{stdout}"
    );
}

#[test]
fn every_problem_is_reported_with_file_and_line() {
    let project = Project::new();
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write(
        "pipelines/shop/segments/a.toml",
        "description = \"refers to b\"\n\n[rule]\nsegment = \"b\"\n",
    );
    project.write(
        "pipelines/shop/segments/b.toml",
        "[rule]\nsegment = \"a\"\n",
    );
    project.write(
        "pipelines/shop/segments/typo.toml",
        "[rule]\nall = [\n  { attribute = \"country\", op = \"=\", value = \"FR\" },\n  { attribute = \"contry\", op = \"=\", value = \"FR\" },\n]\n",
    );
    project.write(
        "pipelines/shop/segments/wrong_type.toml",
        "[rule]\nattribute = \"born\"\nop = \">\"\nvalue = 12\n",
    );
    project.write(
        "pipelines/shop/segments/unknown_key.toml",
        "colour = \"blue\"\n",
    );
    project.write(
        "pipelines/shop/segments/ghost.toml",
        "[rule]\nsegment = \"nowhere\"\n\n[[activations]]\nname = \"x\"\nconnection = \"missing\"\n",
    );

    let (ok, stderr) = validate(&project);
    assert!(!ok);
    let has = |file: &str, line: usize, words: &str| {
        let wanted = format!("{file}:{line}: ");
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&wanted) && l.contains(words)),
            "expected `{wanted}... {words}` in:\n{stderr}"
        );
    };
    has("segments/typo.toml", 4, "unknown attribute `contry`");
    // The problem is on the line of the value itself.
    has(
        "segments/wrong_type.toml",
        4,
        "does not fit a column of type DATE",
    );
    has("segments/unknown_key.toml", 1, "unknown field `colour`");
    has("segments/ghost.toml", 6, "no connection `missing`");
    assert!(stderr.contains("cycle: a -> b -> a"), "{stderr}");
    assert!(
        stderr.contains("segment `nowhere`, which does not exist"),
        "{stderr}"
    );
}

#[test]
fn pipeline_file_problems_name_their_line() {
    let project = Project::new();
    project.write(
        "pipelines/shop/pipeline.toml",
        &PIPELINE
            .replace(
                "time_zone = \"Europe/Paris\"",
                "time_zone = \"Mars/Olympus\"\nschedule = \"0 5 * * *\"",
            )
            .replace(
                "born = \"DATE\" }\n\n[master]",
                "born = \"DATETIME\" }\n\n[master]",
            ),
    );
    let (ok, stderr) = validate(&project);
    assert!(!ok);
    assert!(
        stderr.contains("pipeline.toml:2: time_zone `Mars/Olympus`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pipeline.toml:3: schedule `0 5 * * *`"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "pipeline.toml:8: source `people`, column `born`: unknown column type `DATETIME`"
        ),
        "{stderr}"
    );
}

#[test]
fn a_connection_secret_must_be_in_the_environment() {
    let project = Project::new();
    project.write(
        "config.toml",
        "[connections.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\ntoken_env = \"SEGMENTD_TEST_UNSET_TOKEN\"\n",
    );
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    let (ok, stderr) = validate(&project);
    assert!(!ok);
    assert!(
        stderr.contains("config.toml:1: connection `hook`: `token_env` names the environment variable `SEGMENTD_TEST_UNSET_TOKEN`, which is not set"),
        "{stderr}"
    );
}
