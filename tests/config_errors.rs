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
        r#"[rule]
all = [
  { attribute = "country", op = "=", value = "FR" },
  { attribute = "contry", op = "=", value = "FR" },
]
"#,
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
        "[rule]\nsegment = \"nowhere\"\n\n[[activations]]\nname = \"x\"\n\
         connection = \"missing\"\n",
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
        "[connections.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n\
         token_env = \"SEGMENTD_TEST_UNSET_TOKEN\"\n",
    );
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    let (ok, stderr) = validate(&project);
    assert!(!ok);
    assert!(
        stderr.contains(
            "config.toml:1: connection `hook`: `token_env` names the environment \
                         variable `SEGMENTD_TEST_UNSET_TOKEN`, which is not set"
        ),
        "{stderr}"
    );
}

/// Runs `segmentd validate`, which must fail, and returns its report.
fn problems(project: &Project) -> String {
    let (ok, stderr) = validate(project);
    assert!(!ok, "validate must fail:\n{stderr}");
    stderr
}

/// Asserts that a reported line starts with `file:line: ` and holds `words`.
fn assert_reported(stderr: &str, file: &str, line: usize, words: &str) {
    let wanted = format!("{file}:{line}: ");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&wanted) && l.contains(words)),
        "expected `{wanted}... {words}` in:\n{stderr}"
    );
}

#[test]
fn a_config_toml_that_does_not_parse_still_lets_the_segments_be_checked() {
    let project = Project::new();
    project.write(
        "config.toml",
        "data_dir = \"var\"\n\n[connections.exports\ntype = \"file\"\n",
    );
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write(
        "pipelines/shop/segments/typo.toml",
        r#"[rule]
all = [
  { attribute = "country", op = "=", value = "FR" },
  { attribute = "contry", op = "=", value = "FR" },
]

[[activations]]
name = "export"
connection = "exports"
"#,
    );
    project.write(
        "pipelines/shop/segments/ghost.toml",
        "[rule]\nsegment = \"nowhere\"\n",
    );

    let stderr = problems(&project);
    assert!(
        stderr.starts_with("3 problems in the configuration:"),
        "{stderr}"
    );
    assert_reported(&stderr, "config.toml", 3, "expected `]`");
    assert_reported(
        &stderr,
        "segments/typo.toml",
        4,
        "unknown attribute `contry`",
    );
    assert_reported(
        &stderr,
        "segments/ghost.toml",
        2,
        "segment `nowhere`, which does not exist",
    );
    assert!(
        stderr.ends_with(
            "not checked until those are fixed:\n  config.toml does not parse, so the \
             activations of the pipelines in ./pipelines were not checked against its \
             connections\n"
        ),
        "{stderr}"
    );
}

#[test]
fn a_pipeline_toml_that_does_not_parse_still_lets_its_segments_be_checked() {
    let project = Project::new();
    // Line 9 opens the [master] table without closing it.
    project.write(
        "pipelines/shop/pipeline.toml",
        &PIPELINE.replace("[master]", "[master"),
    );
    project.write("pipelines/shop/segments/syntax.toml", "[rule\n");
    project.write(
        "pipelines/shop/segments/unknown_key.toml",
        "colour = \"blue\"\n",
    );
    project.write(
        "pipelines/shop/segments/shapes.toml",
        r#"[rule]
all = [
  { attribute = "contry", op = "=", value = "FR" },
  { segment = "ghost", attribute = "country" },
  { behaviour = "orders", aggregate = "median", column = "amount", op = ">", value = 1 },
]

[[activations]]
name = "x"
connection = "missing"
"#,
    );
    project.write(
        "pipelines/shop/segments/ghost.toml",
        "[rule]\nsegment = \"nowhere\"\n",
    );

    let stderr = problems(&project);
    assert_reported(&stderr, "shop/pipeline.toml", 9, "expected `]`");
    assert_reported(&stderr, "segments/syntax.toml", 1, "expected `]`");
    assert_reported(
        &stderr,
        "segments/unknown_key.toml",
        1,
        "unknown field `colour`",
    );
    assert_reported(
        &stderr,
        "segments/shapes.toml",
        4,
        "a condition has exactly one of all, any, not, segment, attribute or behaviour",
    );
    assert_reported(
        &stderr,
        "segments/shapes.toml",
        5,
        "unknown aggregate `median`",
    );
    assert_reported(
        &stderr,
        "segments/shapes.toml",
        10,
        "no connection `missing`",
    );
    assert_reported(
        &stderr,
        "segments/ghost.toml",
        2,
        "segment `nowhere`, which does not exist",
    );
    // Columns are declared in the file that does not parse: they are not guessed at.
    assert!(!stderr.contains("contry"), "{stderr}");
    assert!(
        stderr.starts_with("7 problems in the configuration:"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "not checked until those are fixed:\n  ./pipelines/shop/pipeline.toml does not \
             parse, so its segments' rules were checked for their form only, not against its \
             columns and behaviours, nor their activations' identifiers\n"
        ),
        "{stderr}"
    );
}

#[test]
fn a_cycle_is_reported_at_the_reference_that_closes_it() {
    let project = Project::new();
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write(
        "pipelines/shop/segments/a.toml",
        "description = \"refers to b\"\n\n[rule]\nsegment = \"b\"\n",
    );
    // b has a problem of its own; its reference still counts.
    project.write(
        "pipelines/shop/segments/b.toml",
        r#"[rule]
all = [
  { attribute = "contry", op = "=", value = "FR" },
  { segment = "c" },
]
"#,
    );
    project.write(
        "pipelines/shop/segments/c.toml",
        "[rule]\nnot = { segment = \"a\" }\n",
    );

    let stderr = problems(&project);
    assert_reported(&stderr, "segments/b.toml", 3, "unknown attribute `contry`");
    assert_reported(
        &stderr,
        "segments/c.toml",
        2,
        "segments refer to each other in a cycle: a -> b -> c -> a (`a` refers to `b` at \
         segments/a.toml:4, `b` refers to `c` at segments/b.toml:4, `c` to `a` here); a \
         segment cannot depend on itself, so remove one of these references",
    );
    assert_eq!(stderr.matches("cycle").count(), 1, "{stderr}");
}

#[test]
fn a_missing_secret_is_reported_once_at_its_connection() {
    let project = Project::new();
    project.write(
        "config.toml",
        "data_dir = \"var\"\n\n[connections.hook]\ntype = \"webhook\"\n\
         url = \"http://127.0.0.1:9/\"\ntoken_env = \"SEGMENTD_TEST_UNSET_HOOK_TOKEN\"\n",
    );
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    let activation = "[[activations]]\nname = \"hook\"\nconnection = \"hook\"\n";
    project.write("pipelines/shop/segments/first.toml", activation);
    project.write("pipelines/shop/segments/second.toml", activation);

    let stderr = problems(&project);
    assert_eq!(
        stderr,
        "1 problem in the configuration:\n  config.toml:3: connection `hook`: `token_env` names \
         the environment variable `SEGMENTD_TEST_UNSET_HOOK_TOKEN`, which is not set in \
         segmentd's environment; set it to the connection's token before starting segmentd \
         (for example `export SEGMENTD_TEST_UNSET_HOOK_TOKEN=...` in the shell that starts it, \
         or `Environment=SEGMENTD_TEST_UNSET_HOOK_TOKEN=...` in its systemd unit)\n"
    );
}

#[test]
fn every_problem_of_one_activation_is_reported_at_once() {
    let project = Project::new();
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write(
        "pipelines/shop/segments/french.toml",
        r#"[[activations]]
name = "export"
connection = "nowhere"
mode = "sometimes"
max_removal_share = 1.5
dead_letter_after_runs = 0

[[activations]]
name = "export"
connection = "exports"
"#,
    );
    let (ok, stderr) = validate(&project);
    assert!(!ok);
    for expected in [
        "french.toml:3: there is no connection `nowhere`",
        "french.toml:9: two activations are called `export`",
        "french.toml:4: activation `export`: mode `sometimes` is not one of add_remove, add_only, \
         mirror",
        "french.toml:5: activation `export`: max_removal_share is a share from 0 to 1",
        "french.toml:6: activation `export`: dead_letter_after_runs must be 1 or more",
    ] {
        assert!(stderr.contains(expected), "{expected}\n{stderr}");
    }
}
