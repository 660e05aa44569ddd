//! The second example pipeline on the real UCI Bank Marketing data, through the real binary.
//!
//! The expected members are computed here straight from the CSV with the data set's README
//! definitions (answers 892 and 3384), with no code of segmentd.

mod common;

use std::path::Path;

use common::{Project, copy_tree, segment_size};

/// Row numbers (1-based) of the clients for which `keep` holds.
fn clients(keep: impl Fn(&csv::StringRecord) -> bool) -> Vec<String> {
    let file = std::fs::File::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/bank/data/bank-full.csv.gz"),
    )
    .unwrap();
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b';')
        .from_reader(flate2::read::GzDecoder::new(file));
    let mut keys: Vec<String> = reader
        .records()
        .enumerate()
        .filter(|(_, record)| keep(record.as_ref().unwrap()))
        .map(|(row, _)| (row + 1).to_string())
        .collect();
    keys.sort();
    keys
}

#[test]
fn bank_pipeline_answers_the_readme_questions() {
    let project = Project::new();
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/bank"),
        &project.path("pipelines/bank"),
    );
    let (ok, summary, stderr) = project.refresh("bank");
    assert!(ok, "{stderr}\n{summary}");
    assert_eq!(summary["profiles"], 45211);
    assert_eq!(
        segment_size(&summary, "conversions/thirties_homeowners"),
        892
    );
    assert_eq!(
        segment_size(&summary, "conversions/first_contact_converts"),
        3384
    );

    // Columns: 0 age, 6 housing, 14 previous, 16 y.
    let thirties = clients(|r| {
        let age: i32 = r[0].parse().unwrap();
        (30..=39).contains(&age) && &r[6] == "yes" && &r[16] == "yes"
    });
    let first_contact = clients(|r| &r[14] == "0" && &r[16] == "yes");
    assert_eq!((thirties.len(), first_contact.len()), (892, 3384));
    let run = summary["run_id"].as_i64().unwrap();
    assert_eq!(
        project.exported_keys("conversions/thirties_homeowners/export", run, "add"),
        thirties
    );
    assert_eq!(
        project.exported_keys("conversions/first_contact_converts/export", run, "add"),
        first_contact
    );

    // Not converted, cellular, not in default (column 4), and not a first-contact convert.
    let retry = clients(|r| &r[16] == "no" && &r[8] == "cellular" && &r[4] != "yes");
    assert_eq!(
        segment_size(&summary, "contacts/retry_by_mobile"),
        retry.len() as i64
    );
}
