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

const PEOPLE: &str = "id,country,age,vip\n1,FR,34,true\n2,DE,19,false\n3,,52,false\n4,FR,,\n5,\"it's; --\",40,false\n";
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
    segmentd::refresh::refresh(&connection, pipeline).unwrap();
    let as_of = pipeline.as_of.unwrap();
    segmentd::evaluate::evaluate(&connection, pipeline, 1, as_of).unwrap();
    let mut statement = connection
        .prepare("SELECT segment, key FROM segmentd.memberships ORDER BY segment, CAST(key AS INT)")
        .unwrap();
    let mut found: BTreeMap<String, Vec<String>> =
        segments.iter().map(|(name, _)| (name.to_string(), Vec::new())).collect();
    let rows = statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?))).unwrap();
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
        ("equal", rule(r#"attribute = "country"
op = "="
value = "FR""#)),
        ("not_equal", rule(r#"attribute = "country"
op = "!="
value = "FR""#)),
        ("negated_equal", rule(r#"not = { attribute = "country", op = "=", value = "FR" }"#)),
        ("not_in", rule(r#"attribute = "country"
op = "not in"
value = ["FR", "DE"]"#)),
        ("between", rule(r#"attribute = "age"
op = "between"
value = [19, 40]"#)),
        ("is_null", rule(r#"attribute = "age"
op = "is null""#)),
        ("vip", rule(r#"attribute = "vip"
op = "="
value = true"#)),
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
        ("two_june_orders", rule(r#"behaviour = "orders"
within = "30 days"
op = ">="
value = 2"#)),
        // The window includes its first instant: 2024-05-31 12:00:00 for 30 days.
        ("ordered_in_30_days", rule(r#"behaviour = "orders"
within = "30 days"
op = ">="
value = 1
where = { column = "cancelled", op = "=", value = false }"#)),
        ("no_orders_ever", rule(r#"behaviour = "orders"
op = "="
value = 0"#)),
        ("spent_over_100", rule(r#"behaviour = "orders"
aggregate = "sum"
column = "amount"
op = ">"
value = 100
where = { not = { column = "cancelled", op = "=", value = true } }"#)),
        ("spent_in_29_days", rule(r#"behaviour = "orders"
aggregate = "sum"
column = "amount"
within = "29 days"
op = ">"
value = 0"#)),
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
        ("french", rule(r#"attribute = "country"
op = "="
value = "FR""#)),
        ("buyers", rule(r#"behaviour = "orders"
op = ">"
value = 0"#)),
        ("french_buyers", rule(r#"all = [{ segment = "french" }, { segment = "buyers" }]"#)),
        ("not_french", rule(r#"not = { segment = "french" }"#)),
        ("french_or_young", rule(r#"any = [
  { segment = "french" },
  { all = [{ attribute = "age", op = "<", value = 20 }, { not = { segment = "french_buyers" } }] },
]"#)),
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
        ("quote", rule(r#"attribute = "country"
op = "="
value = "it's; --""#)),
        ("injection", rule(r#"attribute = "country"
op = "="
value = "FR' OR '1'='1""#)),
        ("keyword", rule(r#"attribute = "country"
op = "in"
value = ["DROP TABLE segmentd.runs; --", "/* FR */", "DE"]"#)),
    ];
    let refs: Vec<(&str, &str)> = segments.iter().map(|(n, r)| (*n, r.as_str())).collect();
    let found = members(&refs);
    assert_eq!(found["quote"], keys(&["5"]));
    assert_eq!(found["injection"], Vec::<String>::new());
    assert_eq!(found["keyword"], keys(&["2"]));
}
