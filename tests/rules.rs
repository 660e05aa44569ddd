//! The rule language on small inline data: each segment's members are spelled out.
//!
//! Profiles (Europe/Paris, as_of 2024-06-30 12:00:00):
//!
//! | id | country | age  | vip   |
//! |----|---------|------|-------|
//! | 1  | FR      | 34   | true  |
//! | 2  | DE      | 19   | false |
//! | 3  | (none)  | 52   | false |
//! | 4  | FR      | (none) | (none) |
//! | 5  | it's; --| 40   | false |
//!
//! Orders: 1 has two in June (30 + 80) and one in January (500); 2 has one cancelled order in
//! June (200); 3 has one order on 2024-05-31 12:00:00, exactly 30 days before as_of (10);
//! 4 and 5 have none.

mod common;

use std::collections::BTreeMap;

use common::Project;
use segmentd::config::Config;
use segmentd::evaluate::Inputs;
use segmentd::store::Store;

const PIPELINE: &str = r#"
time_zone = "Europe/Paris"
as_of = "2024-06-30 12:00:00"

[sources.people]
format = "csv"
path = "people.csv"
columns = { id = "BIGINT", country = "VARCHAR", age = "INTEGER", vip = "BOOLEAN" }

[sources.orders]
format = "csv"
path = "orders.csv"
columns = { id = "BIGINT", amount = "DOUBLE", cancelled = "BOOLEAN", at = "TIMESTAMP" }

[master]
key = "id"
source = "people"
columns = { id = "BIGINT", country = "VARCHAR", age = "INTEGER", vip = "BOOLEAN" }

[behaviours.orders]
key = "id"
time = "at"
source = "orders"
columns = { id = "BIGINT", amount = "DOUBLE", cancelled = "BOOLEAN", at = "TIMESTAMP" }
"#;

const PEOPLE: &str = "id,country,age,vip\n1,FR,34,true\n2,DE,19,false\n3,,52,false\n4,FR,,\n\
                      5,\"it's; --\",40,false\n";
const ORDERS: &str = "id,amount,cancelled,at\n\
1,30,false,2024-06-10 09:00:00\n\
1,80,false,2024-06-20 18:30:00\n\
1,500,false,2024-01-15 10:00:00\n\
2,200,true,2024-06-15 12:00:00\n\
3,10,false,2024-05-31 12:00:00\n";

/// Loads the segments, refreshes and evaluates, and returns each segment's members.
fn members(segments: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
    let project = Project::new();
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write("pipelines/shop/people.csv", PEOPLE);
    project.write("pipelines/shop/orders.csv", ORDERS);
    for (name, rule) in segments {
        project.write(&format!("pipelines/shop/segments/{name}.toml"), rule);
    }
    let config = Config::load(&project.path("config.toml")).unwrap_or_else(|p| panic!("{p}"));
    let pipeline = config.pipeline("shop").unwrap();
    let store = Store::open(&config.daemon.database, "1GB", 1).unwrap();
    let connection = store.connection().unwrap();
    segmentd::refresh::refresh(&connection, pipeline, false).unwrap();
    let as_of = pipeline.as_of.unwrap();
    let inputs = Inputs {
        data_fingerprint: "inline".to_string(),
        forced: false,
    };
    segmentd::evaluate::evaluate(&connection, pipeline, 1, as_of, &inputs).unwrap();
    let mut statement = connection
        .prepare(
            "SELECT segment, key FROM segmentd_state.memberships \
             ORDER BY segment, CAST(key AS INT)",
        )
        .unwrap();
    let mut found: BTreeMap<String, Vec<String>> = segments
        .iter()
        .map(|(name, _)| (name.to_string(), Vec::new()))
        .collect();
    let rows = statement
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))
        .unwrap();
    for row in rows {
        let (segment, key) = row.unwrap();
        found.get_mut(&segment).unwrap().push(key);
    }
    found
}

fn rule(text: &str) -> String {
    format!("[rule]\n{text}\n")
}

fn keys(list: &[&str]) -> Vec<String> {
    list.iter().map(|k| k.to_string()).collect()
}

#[test]
fn value_conditions_follow_the_null_policy() {
    let segments = [
        (
            "equal",
            rule(
                r#"attribute = "country"
op = "="
value = "FR""#,
            ),
        ),
        (
            "not_equal",
            rule(
                r#"attribute = "country"
op = "!="
value = "FR""#,
            ),
        ),
        (
            "negated_equal",
            rule(r#"not = { attribute = "country", op = "=", value = "FR" }"#),
        ),
        (
            "not_in",
            rule(
                r#"attribute = "country"
op = "not in"
value = ["FR", "DE"]"#,
            ),
        ),
        (
            "between",
            rule(
                r#"attribute = "age"
op = "between"
value = [19, 40]"#,
            ),
        ),
        (
            "is_null",
            rule(
                r#"attribute = "age"
op = "is null""#,
            ),
        ),
        (
            "vip",
            rule(
                r#"attribute = "vip"
op = "="
value = true"#,
            ),
        ),
        ("everyone", String::new()),
    ];
    let refs: Vec<(&str, &str)> = segments.iter().map(|(n, r)| (*n, r.as_str())).collect();
    let found = members(&refs);
    assert_eq!(found["equal"], keys(&["1", "4"]));
    // A missing country never matches `!=` or `not in`, but `not { = }` includes it.
    assert_eq!(found["not_equal"], keys(&["2", "5"]));
    assert_eq!(found["negated_equal"], keys(&["2", "3", "5"]));
    assert_eq!(found["not_in"], keys(&["5"]));
    assert_eq!(found["between"], keys(&["1", "2", "5"]));
    assert_eq!(found["is_null"], keys(&["4"]));
    assert_eq!(found["vip"], keys(&["1"]));
    assert_eq!(found["everyone"], keys(&["1", "2", "3", "4", "5"]));
}

#[test]
fn behaviour_conditions_count_within_windows_and_filters() {
    let segments = [
        (
            "two_june_orders",
            rule(
                r#"behaviour = "orders"
within = "30 days"
op = ">="
value = 2"#,
            ),
        ),
        // The window includes its first instant: 2024-05-31 12:00:00 for 30 days.
        (
            "ordered_in_30_days",
            rule(
                r#"behaviour = "orders"
within = "30 days"
op = ">="
value = 1
where = { column = "cancelled", op = "=", value = false }"#,
            ),
        ),
        (
            "no_orders_ever",
            rule(
                r#"behaviour = "orders"
op = "="
value = 0"#,
            ),
        ),
        (
            "spent_over_100",
            rule(
                r#"behaviour = "orders"
aggregate = "sum"
column = "amount"
op = ">"
value = 100
where = { not = { column = "cancelled", op = "=", value = true } }"#,
            ),
        ),
        (
            "spent_in_29_days",
            rule(
                r#"behaviour = "orders"
aggregate = "sum"
column = "amount"
within = "29 days"
op = ">"
value = 0"#,
            ),
        ),
    ];
    let refs: Vec<(&str, &str)> = segments.iter().map(|(n, r)| (*n, r.as_str())).collect();
    let found = members(&refs);
    assert_eq!(found["two_june_orders"], keys(&["1"]));
    assert_eq!(found["ordered_in_30_days"], keys(&["1", "3"]));
    assert_eq!(found["no_orders_ever"], keys(&["4", "5"]));
    assert_eq!(found["spent_over_100"], keys(&["1"]));
    assert_eq!(found["spent_in_29_days"], keys(&["1", "2"]));
}

#[test]
fn segments_build_on_other_segments() {
    let segments = [
        (
            "french",
            rule(
                r#"attribute = "country"
op = "="
value = "FR""#,
            ),
        ),
        (
            "buyers",
            rule(
                r#"behaviour = "orders"
op = ">"
value = 0"#,
            ),
        ),
        (
            "french_buyers",
            rule(r#"all = [{ segment = "french" }, { segment = "buyers" }]"#),
        ),
        ("not_french", rule(r#"not = { segment = "french" }"#)),
        (
            "french_or_young",
            rule(
                r#"any = [
  { segment = "french" },
  { all = [{ attribute = "age", op = "<", value = 20 }, { not = { segment = "french_buyers" } }] },
]"#,
            ),
        ),
    ];
    let refs: Vec<(&str, &str)> = segments.iter().map(|(n, r)| (*n, r.as_str())).collect();
    let found = members(&refs);
    assert_eq!(found["french_buyers"], keys(&["1"]));
    assert_eq!(found["not_french"], keys(&["2", "3", "5"]));
    assert_eq!(found["french_or_young"], keys(&["1", "2", "4"]));
}

#[test]
fn rule_values_are_data_never_sql() {
    let segments = [
        (
            "quote",
            rule(
                r#"attribute = "country"
op = "="
value = "it's; --""#,
            ),
        ),
        (
            "injection",
            rule(
                r#"attribute = "country"
op = "="
value = "FR' OR '1'='1""#,
            ),
        ),
        (
            "keyword",
            rule(
                r#"attribute = "country"
op = "in"
value = ["DROP TABLE segmentd_state.runs; --", "/* FR */", "DE"]"#,
            ),
        ),
    ];
    let refs: Vec<(&str, &str)> = segments.iter().map(|(n, r)| (*n, r.as_str())).collect();
    let found = members(&refs);
    assert_eq!(found["quote"], keys(&["5"]));
    assert_eq!(found["injection"], Vec::<String>::new());
    assert_eq!(found["keyword"], keys(&["2"]));
}

#[test]
fn text_conditions_take_their_value_literally_and_skip_missing_values() {
    let segments = [
        (
            "contains_r",
            rule(
                r#"attribute = "country"
op = "contains"
value = "R""#,
            ),
        ),
        (
            "not_contains_r",
            rule(
                r#"attribute = "country"
op = "not contains"
value = "R""#,
            ),
        ),
        (
            "starts_with",
            rule(
                r#"attribute = "country"
op = "starts with"
value = "it'""#,
            ),
        ),
        (
            "ends_with",
            rule(
                r#"attribute = "country"
op = "ends_with"
value = "E""#,
            ),
        ),
        (
            "two_capitals",
            rule(
                r#"attribute = "country"
op = "matches"
value = "^[A-Z]{2}$""#,
            ),
        ),
        // `%` and `_` are LIKE's wildcards; here they are plain characters no value holds.
        (
            "percent",
            rule(
                r#"attribute = "country"
op = "contains"
value = "%""#,
            ),
        ),
        (
            "underscore",
            rule(
                r#"attribute = "country"
op = "starts with"
value = "_""#,
            ),
        ),
    ];
    let refs: Vec<(&str, &str)> = segments.iter().map(|(n, r)| (*n, r.as_str())).collect();
    let found = members(&refs);
    assert_eq!(found["contains_r"], keys(&["1", "4"]));
    // Profile 3 has no country: `not contains` leaves it out, as `!=` does.
    assert_eq!(found["not_contains_r"], keys(&["2", "5"]));
    assert_eq!(found["starts_with"], keys(&["5"]));
    assert_eq!(found["ends_with"], keys(&["2"]));
    assert_eq!(found["two_capitals"], keys(&["1", "2", "4"]));
    assert_eq!(found["percent"], Vec::<String>::new());
    assert_eq!(found["underscore"], Vec::<String>::new());
}

#[test]
fn time_conditions_and_first_and_last_values_follow_the_calendar() {
    let segments = [
        // Latest order in June 2024 (as_of is Sunday 30 June).
        (
            "last_order_this_month",
            rule(
                r#"behaviour = "orders"
aggregate = "max"
column = "at"
op = "during"
value = "this month""#,
            ),
        ),
        (
            "last_order_last_month",
            rule(
                r#"behaviour = "orders"
aggregate = "max"
column = "at"
op = "during"
value = "last month""#,
            ),
        ),
        // 1's latest order is 80 (20 June), 2's is 200, 3's is 10.
        (
            "latest_amount_over_50",
            rule(
                r#"behaviour = "orders"
aggregate = "last"
column = "amount"
op = ">"
value = 50"#,
            ),
        ),
        (
            "first_amount_500",
            rule(
                r#"behaviour = "orders"
aggregate = "first"
column = "amount"
op = "="
value = 500"#,
            ),
        ),
        // Two weeks before as_of is 16 June 12:00: only 1's order of 20 June.
        (
            "ordered_in_two_weeks",
            rule(
                r#"behaviour = "orders"
where = { column = "at", op = "within last", value = "2 weeks" }
op = ">="
value = 1"#,
            ),
        ),
        // 90 days before as_of is 1 April 12:00: only 1's January order is older.
        (
            "ordered_over_90_days_ago",
            rule(
                r#"behaviour = "orders"
where = { column = "at", op = "more than ago", value = "90 days" }
op = ">="
value = 1"#,
            ),
        ),
        (
            "ordered_this_week",
            rule(
                r#"behaviour = "orders"
where = { column = "at", op = "during", value = "this week" }
op = ">="
value = 1"#,
            ),
        ),
        (
            "june_anniversary",
            rule(
                r#"behaviour = "orders"
where = { column = "at", op = "anniversary during", value = "this month" }
op = ">="
value = 1"#,
            ),
        ),
        (
            "july_anniversary",
            rule(
                r#"behaviour = "orders"
where = { column = "at", op = "anniversary during", value = "next month" }
op = ">="
value = 1"#,
            ),
        ),
    ];
    let refs: Vec<(&str, &str)> = segments.iter().map(|(n, r)| (*n, r.as_str())).collect();
    let found = members(&refs);
    assert_eq!(found["last_order_this_month"], keys(&["1", "2"]));
    assert_eq!(found["last_order_last_month"], keys(&["3"]));
    assert_eq!(found["latest_amount_over_50"], keys(&["1", "2"]));
    assert_eq!(found["first_amount_500"], keys(&["1"]));
    assert_eq!(found["ordered_in_two_weeks"], keys(&["1"]));
    assert_eq!(found["ordered_over_90_days_ago"], keys(&["1"]));
    // The week of 24 to 30 June holds no order.
    assert_eq!(found["ordered_this_week"], Vec::<String>::new());
    // Orders of any June recur this month; none was placed in a July.
    assert_eq!(found["june_anniversary"], keys(&["1", "2"]));
    assert_eq!(found["july_anniversary"], Vec::<String>::new());
}

#[test]
fn list_conditions_count_the_values_a_list_holds() {
    let project = Project::new();
    project.write(
        "pipelines/shop/pipeline.toml",
        r#"
[sources.people]
format = "jsonl"
path = "people.jsonl"
columns = { id = "BIGINT", tags = "VARCHAR[]" }

[master]
key = "id"
source = "people"
columns = { id = "BIGINT", tags = "VARCHAR[]" }
"#,
    );
    project.write(
        "pipelines/shop/people.jsonl",
        "{\"id\": 1, \"tags\": [\"vip\", \"news\"]}\n\
         {\"id\": 2, \"tags\": [\"news\"]}\n\
         {\"id\": 3, \"tags\": []}\n\
         {\"id\": 4, \"tags\": null}\n\
         {\"id\": 5, \"tags\": [\"vip\", \"sale\", \"news\"]}\n",
    );
    let segments = [
        (
            "any",
            r#"op = "contains any"
value = ["vip", "sale"]"#,
        ),
        (
            "all",
            r#"op = "contains all"
value = ["vip", "news"]"#,
        ),
        (
            "none",
            r#"op = "contains none"
value = ["vip"]"#,
        ),
        (
            "two_or_more",
            r#"op = "contains at least"
value = ["vip", "news", "sale"]
count = 2"#,
        ),
        (
            "at_most_one",
            r#"op = "contains at most"
value = ["vip", "news", "sale"]
count = 1"#,
        ),
        (
            "exactly_one",
            r#"op = "contains exactly"
value = ["vip", "news"]
count = 1"#,
        ),
        ("missing", r#"op = "is null""#),
    ];
    for (name, condition) in segments {
        project.write(
            &format!("pipelines/shop/segments/{name}.toml"),
            &rule(&format!("attribute = \"tags\"\n{condition}")),
        );
    }
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    let size = |name: &str| common::segment_size(&summary, name);
    let store = Store::open(&project.path("var/segmentd.duckdb"), "1GB", 1).unwrap();
    let connection = store.connection().unwrap();
    let members = |segment: &str| -> Vec<String> {
        let mut statement = connection
            .prepare(
                "SELECT key FROM segmentd_state.memberships WHERE segment = ? \
                 ORDER BY CAST(key AS INT)",
            )
            .unwrap();
        statement
            .query_map([segment], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(members("any"), keys(&["1", "5"]));
    assert_eq!(members("all"), keys(&["1", "5"]));
    // An empty list holds none of the values; a missing one (4) matches no list test.
    assert_eq!(members("none"), keys(&["2", "3"]));
    assert_eq!(members("two_or_more"), keys(&["1", "5"]));
    assert_eq!(members("at_most_one"), keys(&["2", "3"]));
    assert_eq!(members("exactly_one"), keys(&["2"]));
    assert_eq!(members("missing"), keys(&["4"]));
    assert_eq!(size("any"), 2);
}

#[test]
fn preview_shows_size_sample_and_sql_and_changes_nothing() {
    let project = Project::new();
    project.write("pipelines/shop/pipeline.toml", PIPELINE);
    project.write("pipelines/shop/people.csv", PEOPLE);
    project.write("pipelines/shop/orders.csv", ORDERS);
    project.write(
        "pipelines/shop/segments/team/french.toml",
        &rule("attribute = \"country\"\nop = \"=\"\nvalue = \"FR' OR '1'='1\""),
    );
    project.write(
        "pipelines/shop/segments/buyers.toml",
        &rule("behaviour = \"orders\"\nop = \">=\"\nvalue = 1"),
    );

    let before = project.segmentd(&["preview", "shop", "buyers"]);
    assert!(!before.status.success());
    let error = String::from_utf8_lossy(&before.stderr);
    assert!(
        error.contains("has no master segment yet; run `segmentd refresh shop` first"),
        "{error}"
    );

    assert!(project.refresh("shop").0);
    let state = || {
        let store = Store::open(&project.path("var/segmentd.duckdb"), "1GB", 1).unwrap();
        let connection = store.connection().unwrap();
        let count = |table: &str| -> i64 {
            connection
                .query_row(
                    &format!("SELECT count(*) FROM segmentd_state.{table}"),
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        ["runs", "segment_sizes", "memberships", "membership_history"].map(count)
    };
    let state_before = state();
    let output = project.segmentd(&["preview", "shop", "buyers", "--sample", "2", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let preview: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(preview["size"], 3);
    assert_eq!(preview["sample"], serde_json::json!(["1", "2"]));
    assert_eq!(preview["params"], serde_json::json!(["1"]));

    // The value is a bound parameter, shown apart from the SQL, never inside it.
    let output = project.segmentd(&["preview", "shop", "team/french", "--json"]);
    let preview: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(preview["size"], 0);
    assert!(!preview["sql"].as_str().unwrap().contains("1'='1"));
    assert_eq!(
        preview["params"],
        serde_json::json!(["'FR'' OR ''1''=''1'"])
    );

    let unknown = project.segmentd(&["preview", "shop", "nobody"]);
    assert!(!unknown.status.success());
    assert_eq!(state(), state_before, "a preview writes nothing");
}

/// Found by the property test: a time span read twice from a behaviour aggregate whose filter
/// binds a value once needed the filter's value bound twice.
#[test]
fn a_time_span_on_a_filtered_aggregate_binds_each_value_once() {
    let segments = [(
        "big_order_this_month",
        rule(
            r#"behaviour = "orders"
aggregate = "max"
column = "at"
where = { column = "amount", op = ">", value = 20 }
op = "during"
value = "this month""#,
        ),
    )];
    let refs: Vec<(&str, &str)> = segments.iter().map(|(n, r)| (*n, r.as_str())).collect();
    // 1's latest order over 20 is on 20 June, 2's on 15 June; 3 has none over 20.
    assert_eq!(members(&refs)["big_order_this_month"], keys(&["1", "2"]));
}

/// Found by the property test: an attribute source in JSON lines with no line at all is an
/// empty table, not a file missing its declared columns.
#[test]
fn an_empty_json_lines_attribute_source_gives_every_profile_missing_values() {
    let project = Project::new();
    let pipeline = format!(
        "{PIPELINE}\n[sources.labels]\nformat = \"jsonl\"\npath = \"labels.jsonl\"\n\
         columns = {{ id = \"BIGINT\", tags = \"VARCHAR[]\" }}\n\n\
         [attributes.labels]\nkey = \"id\"\nsource = \"labels\"\n\
         columns = {{ id = \"BIGINT\", tags = \"VARCHAR[]\" }}\n"
    );
    project.write("pipelines/shop/pipeline.toml", &pipeline);
    project.write("pipelines/shop/people.csv", PEOPLE);
    project.write("pipelines/shop/orders.csv", ORDERS);
    project.write("pipelines/shop/labels.jsonl", "");
    project.write(
        "pipelines/shop/segments/untagged.toml",
        &rule("attribute = \"tags\"\nop = \"is null\""),
    );
    let (ok, summary, stderr) = project.refresh("shop");
    assert!(ok, "{stderr}");
    assert_eq!(common::segment_size(&summary, "untagged"), 5);
}
