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
            "SELECT string_agg(segment || ':' || key, ',' ORDER BY segment, key) FROM segmentd_state.memberships",
        ),
        text(
            "SELECT string_agg(activation || ':' || key, ',' ORDER BY activation, key) FROM segmentd_state.acknowledged",
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
