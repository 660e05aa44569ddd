//! The SQL dialect seam.
//!
//! The rule compiler writes SQL that analytical engines share (comparisons, `BETWEEN`, `IN`,
//! `LIKE ... ESCAPE`, `CASE`, correlated subqueries, `EXTRACT`). The few spellings that differ
//! between engines go through [`Dialect`], so a second engine can run the same segments by
//! implementing it. [`DuckDb`] is the one this build uses.

/// The engine-specific spellings the rule compiler needs.
pub trait Dialect: Send + Sync {
    /// A placeholder bound to a wall-clock timestamp written `YYYY-MM-DD HH:MM:SS[.f]`.
    fn timestamp_placeholder(&self) -> &'static str;

    /// A placeholder bound to a date written `YYYY-MM-DD`.
    fn date_placeholder(&self) -> &'static str;

    /// Whether `text` matches the regular expression bound to `placeholder` anywhere.
    fn regex_matches(&self, text: &str, placeholder: &str) -> String;

    /// Whether the list `list` holds the value bound to `placeholder`.
    fn list_contains(&self, list: &str, placeholder: &str) -> String;

    /// An aggregate giving `value` on the row with the smallest `by` (`last` false) or the
    /// largest (`last` true), over the rows where both are present. Rows tied on `by` give
    /// the smallest value for the first and the largest for the last, so the answer never
    /// depends on the order rows are read in.
    fn value_at_extreme(&self, value: &str, by: &str, last: bool) -> String;
}

/// DuckDB, the embedded engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct DuckDb;

impl Dialect for DuckDb {
    fn timestamp_placeholder(&self) -> &'static str {
        "CAST(? AS TIMESTAMP)"
    }

    fn date_placeholder(&self) -> &'static str {
        "CAST(? AS DATE)"
    }

    fn regex_matches(&self, text: &str, placeholder: &str) -> String {
        format!("regexp_matches({text}, {placeholder})")
    }

    fn list_contains(&self, list: &str, placeholder: &str) -> String {
        format!("list_contains({list}, {placeholder})")
    }

    fn value_at_extreme(&self, value: &str, by: &str, last: bool) -> String {
        let function = if last { "arg_max" } else { "arg_min" };
        format!(
            "{function}({value}, struct_pack(t := {by}, v := {value})) \
             FILTER (WHERE {by} IS NOT NULL AND {value} IS NOT NULL)"
        )
    }
}
