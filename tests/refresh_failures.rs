//! A refresh that fails changes nothing: the previous master segment, the memberships and the
//! acknowledged state stay as they were, and the error names the source.

mod common;

use common::Project;
use segmentd::store::Store;

const PIPELINE: &str = r#"
time_zone = "Europe/Paris"
as_of = "2024-06-30 12:00:00"

[sources.customers]
format = "csv"
path = "customers.csv"
columns = { id = "BIGINT", country = "VARCHAR" }

[sources.orders]
format = "csv"
path = "orders.csv"
columns = { id = "BIGINT", amount = "DOUBLE", at = "TIMESTAMP" }

[master]
key = "id"
source = "customers"
columns = { id = "BIGINT", country = "VARCHAR" }

[behaviours.orders]
key = "id"
time = "at"
source = "orders"
columns = { id = "BIGINT", amount = "DOUBLE", at = "TIMESTAMP" }
"#;

const SEGMENT: &str = r#"
[rule]
any = [
  { attribute = "country", op = "=", value = "FR" },
  { behaviour = "orders", aggregate = "sum", column = "amount", op = ">", value = 100 },
]

[[activations]]
name = "export"
connection = "exports"
"#;

const ORDERS: &str = "id,amount,at\n2,150.5,2024-06-01 10:00:00\n3,20,2024-06-02 11:00:00\n";

fn shop() -> Project {
    let project = Project::new();
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write("pipelines/shop/segments/valuable.toml", SEGMENT);
    project.write(
        "pipelines/shop/customers.csv",
        "id,country\n1,FR\n2,DE\n3,DE\n",
    );
    project.write("pipelines/shop/orders.csv", ORDERS);
    project
}

/// The live master table, memberships and acknowledged state, as text.
fn state(project: &Project) -> (String, String, String) {
    let store = Store::open(&project.path("var/segmentd.duckdb"), "1GB", 1).unwrap();
    let connection = store.connection().unwrap();
    let text = |sql: &str| -> String {
        connection
            .query_row(sql, [], |r| r.get::<_, Option<String>>(0))
            .unwrap()
            .unwrap_or_default()
    };
    (
        text("SELECT string_agg(id || ':' || country, ',' ORDER BY id) FROM pipeline_shop.master"),
        text(
            "SELECT string_agg(segment || ':' || key, ',' ORDER BY segment, key) FROM \
             segmentd_state.memberships",
        ),
        text(
            "SELECT string_agg(activation || ':' || key, ',' ORDER BY activation, key) FROM \
             segmentd_state.acknowledged",
        ),
    )
}

fn assert_fails_and_keeps_state(project: &Project, expected_error: &[&str]) {
    let before = state(project);
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(!ok, "the refresh must fail: {summary}");
    assert_eq!(summary["status"], "failed", "{stderr}");
    let error = summary["error"].as_str().unwrap();
    for part in expected_error {
        assert!(error.contains(part), "error `{error}` names `{part}`");
    }
    assert_eq!(state(project), before);
}

#[test]
fn first_run_builds_the_state_the_failures_must_keep() {
    let project = shop();
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(summary["profiles"], 3);
    assert_eq!(
        state(&project),
        (
            "1:FR,2:DE,3:DE".to_string(),
            "valuable:1,valuable:2".to_string(),
            "valuable/export:1,valuable/export:2".to_string()
        )
    );
}

#[test]
fn a_missing_source_file_fails_and_changes_nothing() {
    let project = shop();
    assert!(project.refresh("shop").0);
    project.write(
        "pipelines/shop/customers.csv",
        "id,country\n1,DE\n2,DE\n3,FR\n4,FR\n",
    );
    project.remove("pipelines/shop/orders.csv");
    assert_fails_and_keeps_state(
        &project,
        &["source `orders`", "orders.csv", "does not exist"],
    );
}

#[test]
fn a_file_missing_a_declared_column_fails_and_changes_nothing() {
    let project = shop();
    assert!(project.refresh("shop").0);
    project.write(
        "pipelines/shop/orders.csv",
        "id,at\n2,2024-06-01 10:00:00\n",
    );
    assert_fails_and_keeps_state(
        &project,
        &["source `orders`", "`amount`", "not in the file"],
    );
}

#[test]
fn a_value_that_does_not_fit_its_type_fails_with_its_line_and_changes_nothing() {
    let project = shop();
    assert!(project.refresh("shop").0);
    project.write(
        "pipelines/shop/orders.csv",
        "id,amount,at\n2,150.5,2024-06-01 10:00:00\n3,twenty,2024-06-02 11:00:00\n",
    );
    assert_fails_and_keeps_state(
        &project,
        &["source `orders`", "line 3", "`amount`", "DOUBLE"],
    );
}

#[test]
fn a_duplicate_master_key_fails_and_changes_nothing() {
    let project = shop();
    assert!(project.refresh("shop").0);
    project.write(
        "pipelines/shop/customers.csv",
        "id,country\n1,FR\n1,DE\n3,DE\n",
    );
    assert_fails_and_keeps_state(&project, &["master table", "more than one row"]);
}

#[test]
fn a_file_whose_columns_are_in_another_order_fails_and_changes_nothing() {
    let project = shop();
    assert!(project.refresh("shop").0);
    // The same orders with `amount` and `id` swapped, header and rows: read by position,
    // amounts would become profile keys.
    project.write(
        "pipelines/shop/orders.csv",
        "amount,id,at\n150,2,2024-06-01 10:00:00\n20,3,2024-06-02 11:00:00\n",
    );
    assert_fails_and_keeps_state(&project, &["another order than declared", "amount, id, at"]);
}

#[test]
fn a_csv_row_with_more_fields_than_the_header_fails_with_its_line_and_changes_nothing() {
    let project = shop();
    assert!(project.refresh("shop").0);
    project.write(
        "pipelines/shop/orders.csv",
        "id,amount,at\n2,150.5,2024-06-01 10:00:00\n3,20,2024-06-02 11:00:00,gift\n",
    );
    assert_fails_and_keeps_state(
        &project,
        &[
            "source `orders` (./pipelines/shop/orders.csv): line 3: the row has 4 fields, the \
             header has 3; fix the row (a value holding `,` must be in double quotes) and \
             refresh again",
            "(DuckDB: Invalid Input Error: CSV Error on Line: 3; Expected Number of Columns: 3 \
             Found: 4)",
        ],
    );
    // The row itself is not repeated: sources may hold personal data.
    let (_, summary, _) = project.refresh("shop");
    assert!(!summary["error"].as_str().unwrap().contains("gift"));
}

#[test]
fn a_csv_row_with_fewer_fields_than_the_header_fails_with_its_line_and_changes_nothing() {
    let project = shop();
    assert!(project.refresh("shop").0);
    project.write(
        "pipelines/shop/orders.csv",
        "id,amount,at\n2,150.5,2024-06-01 10:00:00\n3,20,2024-06-02 11:00:00\n4,35\n",
    );
    assert_fails_and_keeps_state(
        &project,
        &[
            "source `orders` (./pipelines/shop/orders.csv): line 4: the row has 2 fields, the \
             header has 3",
            "a row cut short at the end of the file means the file is incomplete or still \
             being written",
            "(DuckDB: Invalid Input Error: CSV Error on Line: 4; Expected Number of Columns: 3 \
             Found: 2)",
        ],
    );
}

/// The shop with its orders in `orders.csv.gz`, stored without compression so a test can
/// cut the file at a chosen place in the text.
fn shop_with_gzip_orders() -> (Project, Vec<u8>) {
    use std::io::Write;

    let project = shop();
    project.write(
        "pipelines/shop/pipeline.toml",
        &PIPELINE.replace("orders.csv", "orders.csv.gz"),
    );
    project.remove("pipelines/shop/orders.csv");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    encoder.write_all(ORDERS.as_bytes()).unwrap();
    let gzip = encoder.finish().unwrap();
    std::fs::write(project.path("pipelines/shop/orders.csv.gz"), &gzip).unwrap();
    (project, gzip)
}

/// Where the third line of ORDERS (`3,20,...`) starts in the stored gzip file.
fn third_line_at(gzip: &[u8]) -> usize {
    gzip.windows(4).position(|w| w == b"3,20").unwrap()
}

#[test]
fn a_gzip_source_cut_in_a_line_fails_with_its_line_and_changes_nothing() {
    let (project, gzip) = shop_with_gzip_orders();
    assert!(project.refresh("shop").0);
    let cut = third_line_at(&gzip) + 2;
    std::fs::write(project.path("pipelines/shop/orders.csv.gz"), &gzip[..cut]).unwrap();
    assert_fails_and_keeps_state(
        &project,
        &[
            "source `orders` (./pipelines/shop/orders.csv.gz): line 3: the gzip file ends \
             early, in the middle of this line: it is truncated or still being written; wait \
             until it is complete, or replace it with the complete file, and refresh again",
            "(gzip: ",
        ],
    );
}

#[test]
fn a_gzip_source_cut_between_lines_fails_rather_than_loading_the_lines_before() {
    let (project, gzip) = shop_with_gzip_orders();
    assert!(project.refresh("shop").0);
    // The cut leaves whole rows: read as far as it goes, the file would look like a complete
    // file with one order fewer.
    let cut = third_line_at(&gzip);
    std::fs::write(project.path("pipelines/shop/orders.csv.gz"), &gzip[..cut]).unwrap();
    assert_fails_and_keeps_state(
        &project,
        &[
            "source `orders` (./pipelines/shop/orders.csv.gz): after line 2: the gzip file \
             ends early: it is truncated or still being written",
        ],
    );
}

#[test]
fn a_csv_header_with_a_byte_order_mark_quotes_spaces_and_crlf_still_matches_its_columns() {
    let project = shop();
    project.write(
        "pipelines/shop/customers.csv",
        "\u{feff}\"id\" , country\r\n1,FR\r\n2,DE\r\n3,DE\r\n",
    );
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{summary} {stderr}");
    assert_eq!(state(&project).0, "1:FR,2:DE,3:DE");
}
