//! The shipped example pipeline on the real UCI Online Retail data, through the real binary.
//!
//! The expected members are computed here straight from the CSV, with no code of segmentd:
//! the definitions are those of the data set's README, whose answers are 215 and 8.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{Project, activation, copy_tree, segment_size};

const UK: &str = "engagement/uk_frequent_buyers";
const GERMANY: &str = "markets/germany_loyal";

/// Customers with at least `minimum` distinct purchase invoices from `country` with
/// `InvoiceDate` in `[from, 2011-12-09 12:50:00]`, read straight from the CSV.
fn frequent_buyers(country: &str, from: &str, minimum: usize) -> BTreeSet<String> {
    let file = std::fs::File::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/retail/data/online_retail.csv.gz"),
    )
    .unwrap();
    let mut reader = csv::Reader::from_reader(flate2::read::GzDecoder::new(file));
    let mut invoices: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for record in reader.records() {
        let record = record.unwrap();
        let (invoice, date, customer, row_country) =
            (&record[0], &record[4], &record[6], &record[7]);
        if customer.is_empty() || invoice.starts_with('C') || row_country != country {
            continue;
        }
        // Fixed-width `YYYY-MM-DD HH:MM:SS` text orders like the times it spells.
        if date < from || date > "2011-12-09 12:50:00" {
            continue;
        }
        let key = customer.trim_end_matches(".0").to_string();
        invoices.entry(key).or_default().insert(invoice.to_string());
    }
    invoices
        .into_iter()
        .filter(|(_, set)| set.len() >= minimum)
        .map(|(key, _)| key)
        .collect()
}

fn example_project() -> Project {
    let project = Project::new();
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/retail"),
        &project.path("pipelines/retail"),
    );
    project
}

fn sorted(set: &BTreeSet<String>) -> Vec<String> {
    set.iter().cloned().collect()
}

#[test]
fn example_pipeline_answers_the_readme_questions_and_sends_only_changes() {
    let project = example_project();

    // First run: the README's answers, and every member sent as an add.
    let (ok, first, stderr) = project.refresh("retail");
    assert!(ok, "first run failed: {stderr}\n{first}");
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["profiles"], 4372);
    assert_eq!(segment_size(&first, UK), 215);
    assert_eq!(segment_size(&first, GERMANY), 8);

    let uk = frequent_buyers("United Kingdom", "2011-11-09 12:50:00", 3);
    let germany = frequent_buyers("Germany", "2011-09-10 12:50:00", 5);
    assert_eq!((uk.len(), germany.len()), (215, 8));
    let first_run = first["run_id"].as_i64().unwrap();
    let uk_export = format!("{UK}/export");
    let germany_export = format!("{GERMANY}/export");
    assert_eq!(
        project.exported_keys(&uk_export, first_run, "add"),
        sorted(&uk)
    );
    assert_eq!(
        project.exported_keys(&germany_export, first_run, "add"),
        sorted(&germany)
    );
    assert_eq!(
        project.exported_keys(&uk_export, first_run, "remove"),
        Vec::<String>::new()
    );
    assert_eq!(activation(&first, &uk_export)["delivered_adds"], 215);

    // Second run, nothing changed: no delta, no new file.
    let files_before = project.export_files(&uk_export);
    let (ok, second, stderr) = project.refresh("retail");
    assert!(ok, "second run failed: {stderr}");
    for entry in second["activations"].as_array().unwrap() {
        assert_eq!(
            (entry["adds"].as_i64(), entry["removes"].as_i64()),
            (Some(0), Some(0)),
            "{entry}"
        );
    }
    assert_eq!(project.export_files(&uk_export), files_before);

    // Edit the rule: 4 or more invoices in the last 60 days. Exactly the leavers are removed
    // and exactly the joiners added.
    let rule_file = format!("pipelines/retail/segments/{UK}.toml");
    let text = std::fs::read_to_string(project.path(&rule_file)).unwrap();
    let edited = text.replace(
        "within = \"30 days\", op = \">=\", value = 3",
        "within = \"60 days\", op = \">=\", value = 4",
    );
    assert_ne!(edited, text, "the rule edit applies");
    project.write(&rule_file, &edited);

    let (ok, third, stderr) = project.refresh("retail");
    assert!(ok, "third run failed: {stderr}");
    let edited_members = frequent_buyers("United Kingdom", "2011-10-10 12:50:00", 4);
    let joined: BTreeSet<String> = edited_members.difference(&uk).cloned().collect();
    let left: BTreeSet<String> = uk.difference(&edited_members).cloned().collect();
    assert!(
        !joined.is_empty() && !left.is_empty(),
        "the edit both adds and removes members"
    );
    assert_eq!(segment_size(&third, UK), edited_members.len() as i64);
    let third_run = third["run_id"].as_i64().unwrap();
    // 44 of 215 members leave, over the default max_removal_share of 20 %: the delta waits for
    // an operator, and nothing is written until the run is approved.
    let entry = activation(&third, &uk_export);
    assert_eq!(entry["held"], true, "{entry}");
    assert_eq!(left.len(), 44);
    assert!(
        project
            .exported_keys(&uk_export, third_run, "add")
            .is_empty()
    );
    let approved = project.segmentd(&["approve", "retail", &third_run.to_string()]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    assert_eq!(
        project.exported_keys(&uk_export, third_run, "add"),
        sorted(&joined)
    );
    assert_eq!(
        project.exported_keys(&uk_export, third_run, "remove"),
        sorted(&left)
    );
    let entry = activation(&third, &uk_export);
    assert_eq!(entry["adds"].as_i64(), Some(joined.len() as i64));
    assert_eq!(entry["removes"].as_i64(), Some(left.len() as i64));
    // The other segments did not change.
    assert_eq!(activation(&third, &germany_export)["adds"], 0);
    assert_eq!(activation(&third, &germany_export)["removes"], 0);
}

#[test]
fn segments_command_lists_folders_and_last_sizes() {
    let project = example_project();
    let (ok, _, stderr) = project.refresh("retail");
    assert!(ok, "{stderr}");
    let output = project.segmentd(&["segments", "retail"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let uk_line = text
        .lines()
        .find(|l| l.starts_with(UK))
        .expect("the UK segment is listed");
    let fields: Vec<&str> = uk_line.split_whitespace().collect();
    assert_eq!(fields[..3], [UK, "engagement", "215"]);
}
