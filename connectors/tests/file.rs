//! The file connector writing into a real temporary folder.

use std::collections::BTreeMap;
use std::path::Path;

use segmentd_connectors::file::FileConnector;
use segmentd_connectors::{Batch, Change, Connector, DeliveryError, Member, Outcome};

mod common;
use common::{member, problem as error, settings};

fn connector(directory: &Path, format: &str) -> FileConnector {
    let connection = settings([
        ("directory", directory.to_str().unwrap().into()),
        ("format", format.into()),
    ]);
    FileConnector::from_settings(&connection, &toml::Table::new()).unwrap()
}

/// Two members: the first with a name holding a comma and quotes, the second without a name.
fn batch() -> Batch {
    let members = vec![
        member(
            "1",
            &[("name", r#"Smith, "Jo""#), ("email", "a@example.com")],
        ),
        member("2", &[("email", "b@example.com")]),
    ];
    Batch {
        sequence: 3,
        ..common::batch("vip/newsletter", Change::Add, members)
    }
}

/// The names of the entries in `folder`, sorted.
fn entries(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_csv_batch_has_a_sorted_header_and_quotes_commas_and_quotes() {
    let directory = tempfile::tempdir().unwrap();

    let outcome = connector(directory.path(), "csv").deliver(&batch()).await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into(), "2".into()],
            rejected: vec![]
        })
    );
    let written = directory
        .path()
        .join("vip__newsletter/run-000042-add-00003.csv");
    assert_eq!(
        std::fs::read_to_string(written).unwrap(),
        "key,email,name\n\
         1,a@example.com,\"Smith, \"\"Jo\"\"\"\n\
         2,b@example.com,\n"
    );
}

#[tokio::test]
async fn a_jsonl_batch_has_one_object_per_member() {
    let directory = tempfile::tempdir().unwrap();

    connector(directory.path(), "jsonl")
        .deliver(&batch())
        .await
        .unwrap();

    let written = directory
        .path()
        .join("vip__newsletter/run-000042-add-00003.jsonl");
    assert_eq!(
        std::fs::read_to_string(written).unwrap(),
        "{\"key\":\"1\",\"email\":\"a@example.com\",\"name\":\"Smith, \\\"Jo\\\"\"}\n\
         {\"key\":\"2\",\"email\":\"b@example.com\"}\n"
    );
}

#[tokio::test]
async fn delivering_the_same_batch_twice_leaves_one_file_with_the_same_content() {
    let directory = tempfile::tempdir().unwrap();
    let connector = connector(directory.path(), "csv");
    let folder = directory.path().join("vip__newsletter");

    connector.deliver(&batch()).await.unwrap();
    let first = std::fs::read(folder.join("run-000042-add-00003.csv")).unwrap();
    connector.deliver(&batch()).await.unwrap();
    let second = std::fs::read(folder.join("run-000042-add-00003.csv")).unwrap();

    assert_eq!(entries(&folder), ["run-000042-add-00003.csv"]);
    assert_eq!(first, second);
}

#[tokio::test]
async fn no_temporary_files_are_left_beside_the_batches() {
    let directory = tempfile::tempdir().unwrap();
    let connector = connector(directory.path(), "jsonl");
    let removal = Batch {
        change: Change::Remove,
        sequence: 0,
        ..batch()
    };

    connector.deliver(&batch()).await.unwrap();
    connector.deliver(&removal).await.unwrap();

    assert_eq!(entries(directory.path()), ["vip__newsletter"]);
    assert_eq!(
        entries(&directory.path().join("vip__newsletter")),
        [
            "run-000042-add-00003.jsonl",
            "run-000042-remove-00000.jsonl"
        ]
    );
}

#[tokio::test]
async fn the_activation_format_overrides_the_connection_format() {
    let directory = tempfile::tempdir().unwrap();
    let connection = settings([("directory", directory.path().to_str().unwrap().into())]);
    let activation = settings([("format", "jsonl".into())]);
    let connector =
        segmentd_connectors::build("file", &connection, &activation, &BTreeMap::new()).unwrap();

    connector.deliver(&batch()).await.unwrap();

    assert_eq!(
        entries(&directory.path().join("vip__newsletter")),
        ["run-000042-add-00003.jsonl"]
    );
}

#[tokio::test]
async fn a_directory_that_cannot_be_created_is_a_retryable_failure_naming_the_path() {
    let directory = tempfile::tempdir().unwrap();
    let occupied = directory.path().join("occupied");
    std::fs::write(&occupied, "a file, not a folder").unwrap();

    let error = connector(&occupied, "csv")
        .deliver(&batch())
        .await
        .unwrap_err();

    let DeliveryError::Retryable { message } = error else {
        panic!("expected a retryable failure, got {error:?}");
    };
    let path = occupied.join("vip__newsletter/run-000042-add-00003.csv");
    assert!(
        message.starts_with(&format!("could not write {}: ", path.display())),
        "{message}"
    );
    assert!(!message.contains("a@example.com"), "{message}");
}

#[tokio::test]
async fn an_identifier_named_key_is_a_permanent_failure() {
    let directory = tempfile::tempdir().unwrap();
    let batch = Batch {
        members: vec![member("1", &[("key", "x")])],
        ..batch()
    };

    let error = connector(directory.path(), "csv")
        .deliver(&batch)
        .await
        .unwrap_err();

    assert!(
        matches!(error, DeliveryError::Permanent { .. }),
        "{error:?}"
    );
    assert_eq!(entries(directory.path()), Vec::<String>::new());
}

#[test]
fn file_batch_size_defaults_to_100000_and_can_be_set() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().to_str().unwrap();
    let sized = settings([("directory", path.into()), ("batch_size", 500_i64.into())]);

    let default = connector(directory.path(), "csv");
    let set = FileConnector::from_settings(&sized, &toml::Table::new()).unwrap();

    assert_eq!(default.max_batch_size(), 100_000);
    assert_eq!(set.max_batch_size(), 500);
}

#[test]
fn a_missing_directory_is_refused() {
    let errors =
        FileConnector::from_settings(&toml::Table::new(), &toml::Table::new()).unwrap_err();

    assert_eq!(
        errors,
        [error(
            "directory",
            "missing; set it to the folder the batch files are written into"
        )]
    );
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let connection = toml::toml! {
        directory = "/srv/exports"
        compress = true
    };
    let activation = toml::toml! {
        format = "csv"
        directory = "/elsewhere"
    };

    let errors = FileConnector::from_settings(&connection, &activation).unwrap_err();

    assert_eq!(
        errors,
        [
            error(
                "compress",
                "unknown key in the connection settings; known keys: directory, format, batch_size"
            ),
            error(
                "directory",
                "unknown key in the activation settings; known keys: format"
            ),
        ]
    );
}

#[test]
fn a_format_other_than_csv_or_jsonl_is_refused() {
    let connection = toml::toml! {
        directory = "/srv/exports"
        format = "xml"
    };
    let activation = toml::toml! { format = 1 };

    let errors = FileConnector::from_settings(&connection, &activation).unwrap_err();

    assert_eq!(
        errors,
        [
            error(
                "format",
                "expected `csv` or `jsonl` in the connection settings, got `xml`"
            ),
            error(
                "format",
                "expected a string in the activation settings, found integer"
            ),
        ]
    );
}

#[test]
fn a_batch_size_of_zero_is_refused() {
    let connection = toml::toml! {
        directory = "/srv/exports"
        batch_size = 0
    };

    let errors = FileConnector::from_settings(&connection, &toml::Table::new()).unwrap_err();

    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "batch_size");
    assert!(
        errors[0].message.starts_with("must be between 1 and "),
        "{}",
        errors[0].message
    );
}

#[tokio::test]
async fn a_replace_is_marked_complete_only_once_its_last_batch_is_written() {
    let directory = tempfile::tempdir().unwrap();
    let connector = connector(directory.path(), "csv");
    let folder = directory.path().join("vip__newsletter");
    let replace = segmentd_connectors::Replace {
        session: 9,
        batches: 2,
        members: 3,
    };
    let part = |sequence: u32, members: Vec<Member>| Batch {
        change: Change::Replace,
        sequence,
        members,
        replace: Some(replace),
        ..batch()
    };
    assert!(connector.replaces_lists());

    connector
        .deliver(&part(0, vec![member("1", &[]), member("2", &[])]))
        .await
        .unwrap();
    assert_eq!(entries(&folder), ["run-000042-replace-00000.csv"]);

    connector
        .deliver(&part(1, vec![member("3", &[])]))
        .await
        .unwrap();
    assert_eq!(
        entries(&folder),
        [
            "run-000042-replace-00000.csv",
            "run-000042-replace-00001.csv",
            "run-000042-replace.complete"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(folder.join("run-000042-replace.complete")).unwrap(),
        "batches = 2\nmembers = 3\n"
    );
    assert_eq!(
        std::fs::read_to_string(folder.join("run-000042-replace-00001.csv")).unwrap(),
        "key\n3\n"
    );
}
