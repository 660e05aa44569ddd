//! The rule compiler: a checked [`Rule`] to one SQL query with bound values.
//!
//! The query selects the profile keys (as text) of the segment's members at the run's `as_of`.
//! Identifiers come only from the pipeline's declared names, quoted; rule values never become
//! SQL text: each is a `?` placeholder with its value in [`CompiledSql::params`], in order.
//! Time windows are computed here in Rust from `as_of` in the pipeline's time zone and bound as
//! wall-clock timestamps, since the bundled DuckDB has no time-zone functions.
//!
//! Segment references are compiled inline (`key IN (<the other segment's query>)`), so one query
//! answers for a segment on its own: the bulk evaluation and a single-profile look-up run the
//! same SQL.

use chrono::{Datelike, Days, Months, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};

use crate::config::Pipeline;
use crate::dialect::{Dialect, DuckDb};
use crate::rules::{
    Aggregate, BehaviourCondition, CalendarSpan, CalendarUnit, Filter, Predicate, RelativeTime,
    Rule, TextTest, TimeUnit, Value, Window,
};
use crate::schema::ColumnType;
use crate::schema::quote_ident;

/// A value bound to a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    /// A boolean.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// Text; also dates and timestamps, cast in the SQL.
    Text(String),
}

/// A query and the values for its placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledSql {
    /// The SQL text, with `?` placeholders.
    pub sql: String,
    /// One value per placeholder, in order.
    pub params: Vec<SqlValue>,
}

/// Compiles a segment's rule into the query selecting its members' keys, as `key`, from the
/// pipeline's live tables.
pub fn segment_query(
    pipeline: &Pipeline,
    segment: &str,
    as_of: NaiveDateTime,
) -> anyhow::Result<CompiledSql> {
    segment_query_in(pipeline, &pipeline.schema(), segment, as_of)
}

/// Like [`segment_query`], over the master segment tables in another schema (a plan's).
pub fn segment_query_in(
    pipeline: &Pipeline,
    schema: &str,
    segment: &str,
    as_of: NaiveDateTime,
) -> anyhow::Result<CompiledSql> {
    let mut compiler = Compiler {
        pipeline,
        schema: schema.to_string(),
        as_of,
        sql: String::new(),
        params: Vec::new(),
        depth: 0,
        dialect: &DuckDb,
    };
    compiler.segment(segment)?;
    Ok(CompiledSql {
        sql: compiler.sql,
        params: compiler.params,
    })
}

/// The first instant of a window ending at `as_of` (a wall-clock time in `zone`).
///
/// Minutes and hours are elapsed time: a window of 2 hours across a DST change covers two real
/// hours. Days, weeks, months and years are calendar units on the wall clock: "the last 30 days"
/// at 12:50 starts at 12:50 thirty days before, whatever DST did in between.
pub fn window_start(window: Window, as_of: NaiveDateTime, zone: chrono_tz::Tz) -> NaiveDateTime {
    let amount = window.amount;
    match window.unit {
        TimeUnit::Minutes | TimeUnit::Hours => {
            let minutes = if window.unit == TimeUnit::Hours {
                amount * 60
            } else {
                amount
            };
            let instant = zone
                .from_local_datetime(&as_of)
                .earliest()
                .unwrap_or_else(|| zone.from_utc_datetime(&as_of));
            (instant - chrono::Duration::minutes(i64::from(minutes))).naive_local()
        }
        TimeUnit::Days => as_of - Days::new(u64::from(amount)),
        TimeUnit::Weeks => as_of - Days::new(7 * u64::from(amount)),
        TimeUnit::Months => as_of
            .checked_sub_months(Months::new(amount))
            .unwrap_or(as_of),
        TimeUnit::Years => as_of
            .checked_sub_months(Months::new(12 * amount))
            .unwrap_or(as_of),
    }
}

struct Compiler<'a> {
    pipeline: &'a Pipeline,
    /// The schema holding the master segment tables.
    schema: String,
    as_of: NaiveDateTime,
    sql: String,
    params: Vec<SqlValue>,
    /// Nesting depth of segment queries, for unique table aliases.
    depth: usize,
    /// The engine's spellings.
    dialect: &'static dyn Dialect,
}

impl Compiler<'_> {
    fn table(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    fn master_alias(&self) -> String {
        format!("m{}", self.depth)
    }

    fn attribute_alias(&self, table: &str) -> String {
        format!("a{}_{table}", self.depth)
    }

    fn bind(&mut self, value: &Value) {
        let placeholder = self.placeholder(value);
        self.sql.push_str(&placeholder);
    }

    /// Records the value's parameter and returns its placeholder, to place in the SQL next.
    fn placeholder(&mut self, value: &Value) -> String {
        let (placeholder, bound) = match value {
            Value::Bool(b) => ("?", SqlValue::Bool(*b)),
            Value::Int(i) => ("?", SqlValue::Int(*i)),
            Value::Float(f) => ("?", SqlValue::Float(*f)),
            Value::Text(t) => ("?", SqlValue::Text(t.clone())),
            Value::Timestamp(t) => (
                self.dialect.timestamp_placeholder(),
                SqlValue::Text(format_time(*t)),
            ),
            Value::Date(d) => (
                self.dialect.date_placeholder(),
                SqlValue::Text(d.to_string()),
            ),
        };
        self.params.push(bound);
        placeholder.to_string()
    }

    fn bind_time(&mut self, time: NaiveDateTime) {
        self.bind(&Value::Timestamp(time));
    }

    /// `SELECT CAST(key AS VARCHAR) AS key FROM master LEFT JOIN attributes WHERE rule`.
    fn segment(&mut self, name: &str) -> anyhow::Result<()> {
        let segment = self.pipeline.segment(name)?.clone();
        let master = &self.pipeline.master;
        let alias = self.master_alias();
        self.sql.push_str(&format!(
            "SELECT CAST({alias}.{key} AS VARCHAR) AS key FROM {table} AS {alias}",
            key = quote_ident(&master.key),
            table = self.table("master"),
        ));
        let mut joined = Vec::new();
        collect_attribute_tables(&segment.rule, &mut joined);
        for table in joined {
            let definition = self
                .pipeline
                .attributes
                .iter()
                .find(|t| t.name == table)
                .expect("checked attribute table");
            self.sql.push_str(&format!(
                " LEFT JOIN {table_sql} AS {a} ON {a}.{akey} = {alias}.{key}",
                table_sql = self.table(&definition.table_name()),
                a = self.attribute_alias(&table),
                akey = quote_ident(&definition.key),
                key = quote_ident(&master.key),
            ));
        }
        self.sql.push_str(" WHERE ");
        self.rule(&segment.rule)
    }

    fn rule(&mut self, rule: &Rule) -> anyhow::Result<()> {
        match rule {
            Rule::Everyone => self.sql.push_str("TRUE"),
            Rule::All(rules) | Rule::Any(rules) => {
                let joiner = if matches!(rule, Rule::All(_)) {
                    " AND "
                } else {
                    " OR "
                };
                self.sql.push('(');
                for (i, inner) in rules.iter().enumerate() {
                    if i > 0 {
                        self.sql.push_str(joiner);
                    }
                    self.rule(inner)?;
                }
                if rules.is_empty() {
                    self.sql
                        .push_str(if joiner == " AND " { "TRUE" } else { "FALSE" });
                }
                self.sql.push(')');
            }
            Rule::Not(inner) => {
                self.sql.push_str("(NOT ");
                self.rule(inner)?;
                self.sql.push(')');
            }
            Rule::Segment(name) => {
                let key = format!(
                    "{}.{}",
                    self.master_alias(),
                    quote_ident(&self.pipeline.master.key)
                );
                self.sql.push_str(&format!("(CAST({key} AS VARCHAR) IN ("));
                self.depth += 1;
                self.segment(name)?;
                self.depth -= 1;
                self.sql.push_str("))");
            }
            Rule::Attribute { column, predicate } => {
                let table = match &column.attribute_table {
                    Some(table) => self.attribute_alias(table),
                    None => self.master_alias(),
                };
                let expression = format!("{table}.{}", quote_ident(&column.column));
                self.predicate(&expression, &column.column_type, predicate);
            }
            Rule::Behaviour(condition) => self.behaviour(condition),
        }
        Ok(())
    }

    /// Writes `COALESCE(<expression> <predicate>, FALSE)`: a missing value never matches.
    fn predicate(&mut self, expression: &str, column_type: &ColumnType, predicate: &Predicate) {
        self.sql.push_str("COALESCE(");
        match predicate {
            Predicate::Text {
                test,
                pattern,
                negated,
            } => {
                let test_sql = match test {
                    TextTest::Matches => {
                        let placeholder = self.placeholder(&Value::Text(pattern.clone()));
                        self.dialect.regex_matches(expression, &placeholder)
                    }
                    TextTest::Contains | TextTest::StartsWith | TextTest::EndsWith => {
                        let escaped = escape_like(pattern);
                        let like = match test {
                            TextTest::Contains => format!("%{escaped}%"),
                            TextTest::StartsWith => format!("{escaped}%"),
                            _ => format!("%{escaped}"),
                        };
                        let placeholder = self.placeholder(&Value::Text(like));
                        format!("{expression} LIKE {placeholder} ESCAPE '\\'")
                    }
                };
                if *negated {
                    self.sql.push_str(&format!("NOT ({test_sql})"));
                } else {
                    self.sql.push_str(&test_sql);
                }
                self.sql.push_str(", FALSE)");
                return;
            }
            Predicate::Relative(relative) => {
                let (start, end) = relative_bounds(*relative, self.as_of, self.pipeline.time_zone);
                let date = *column_type == ColumnType::Date;
                let mut parts = Vec::new();
                if let Some((start, inclusive)) = start {
                    // A DATE is in the window when its day is: the start's day counts.
                    let (value, op) = match (date, inclusive) {
                        (true, _) => (Value::Date(start.date()), ">="),
                        (false, true) => (Value::Timestamp(start), ">="),
                        (false, false) => (Value::Timestamp(start), ">"),
                    };
                    let placeholder = self.placeholder(&value);
                    parts.push(format!("{expression} {op} {placeholder}"));
                }
                if let Some((end, inclusive)) = end {
                    let value = if date {
                        Value::Date(end.date())
                    } else {
                        Value::Timestamp(end)
                    };
                    let op = if inclusive { "<=" } else { "<" };
                    let placeholder = self.placeholder(&value);
                    parts.push(format!("{expression} {op} {placeholder}"));
                }
                self.sql.push_str(&format!("({})", parts.join(" AND ")));
                self.sql.push_str(", FALSE)");
                return;
            }
            Predicate::Anniversary(span) => {
                let days = anniversary_days(*span, self.as_of.date());
                match days {
                    Anniversary::Month(month) => {
                        let placeholder = self.placeholder(&Value::Int(i64::from(month)));
                        self.sql
                            .push_str(&format!("EXTRACT(MONTH FROM {expression}) = {placeholder}"));
                    }
                    Anniversary::Days(days) => {
                        let placeholders: Vec<String> = days
                            .iter()
                            .map(|d| self.placeholder(&Value::Int(i64::from(*d))))
                            .collect();
                        self.sql.push_str(&format!(
                            "(EXTRACT(MONTH FROM {expression}) * 100 \
                             + EXTRACT(DAY FROM {expression})) IN ({})",
                            placeholders.join(", ")
                        ));
                    }
                }
                self.sql.push_str(", FALSE)");
                return;
            }
            Predicate::ListCount {
                values,
                comparison,
                count,
            } => {
                let present: Vec<String> = values
                    .iter()
                    .map(|value| {
                        let placeholder = self.placeholder(value);
                        format!(
                            "CASE WHEN {} THEN 1 ELSE 0 END",
                            self.dialect.list_contains(expression, &placeholder)
                        )
                    })
                    .collect();
                let sum = if present.is_empty() {
                    "0".to_string()
                } else {
                    present.join(" + ")
                };
                // A missing list holds nothing and matches nothing.
                self.sql.push_str(&format!(
                    "CASE WHEN {expression} IS NULL THEN NULL ELSE ({sum}) END {} {count}",
                    comparison.sql()
                ));
                self.sql.push_str(", FALSE)");
                return;
            }
            _ => {}
        }
        self.sql.push_str(expression);
        match predicate {
            Predicate::Compare(comparison, value) => {
                self.sql.push_str(&format!(" {} ", comparison.sql()));
                self.bind(value);
            }
            Predicate::In(values) | Predicate::NotIn(values) => {
                let negated = matches!(predicate, Predicate::NotIn(_));
                self.sql
                    .push_str(if negated { " NOT IN (" } else { " IN (" });
                for (i, value) in values.iter().enumerate() {
                    if i > 0 {
                        self.sql.push_str(", ");
                    }
                    self.bind(value);
                }
                self.sql.push(')');
            }
            Predicate::Between(low, high) => {
                self.sql.push_str(" BETWEEN ");
                self.bind(low);
                self.sql.push_str(" AND ");
                self.bind(high);
            }
            Predicate::IsNull => self.sql.push_str(" IS NULL"),
            Predicate::IsNotNull => self.sql.push_str(" IS NOT NULL"),
            Predicate::Text { .. }
            | Predicate::Relative(_)
            | Predicate::Anniversary(_)
            | Predicate::ListCount { .. } => unreachable!("written above"),
        }
        self.sql.push_str(", FALSE)");
    }

    /// A correlated subquery aggregating the profile's behaviour rows. `count` and
    /// `count_distinct` of no rows are 0, so "did not do" matches profiles with no rows; other
    /// aggregates of no rows are missing and match nothing.
    fn behaviour(&mut self, condition: &BehaviourCondition) {
        let table = self
            .pipeline
            .behaviours
            .iter()
            .find(|t| t.name == condition.behaviour)
            .expect("checked behaviour table")
            .clone();
        let alias = format!("b{}", self.depth);
        let column = condition
            .column
            .as_deref()
            .map(|c| format!("{alias}.{}", quote_ident(c)));
        let aggregate = match (condition.aggregate, &column) {
            (Aggregate::Count, None) => "count(*)".to_string(),
            (Aggregate::Count, Some(c)) => format!("count({c})"),
            (Aggregate::CountDistinct, Some(c)) => format!("count(DISTINCT {c})"),
            (Aggregate::Sum, Some(c)) => format!("sum({c})"),
            (Aggregate::Average, Some(c)) => format!("avg({c})"),
            (Aggregate::Min, Some(c)) => format!("min({c})"),
            (Aggregate::Max, Some(c)) => format!("max({c})"),
            (Aggregate::First | Aggregate::Last, Some(c)) => {
                let time = table
                    .time
                    .as_deref()
                    .expect("behaviour tables have a time column");
                let by = format!("{alias}.{}", quote_ident(time));
                self.dialect
                    .value_at_extreme(c, &by, condition.aggregate == Aggregate::Last)
            }
            (_, None) => "count(*)".to_string(),
        };
        let aggregate_type = match (condition.aggregate, &condition.column) {
            (Aggregate::First | Aggregate::Last | Aggregate::Min | Aggregate::Max, Some(c)) => {
                table
                    .column_type(c)
                    .cloned()
                    .unwrap_or(ColumnType::Float("DOUBLE"))
            }
            (Aggregate::Count | Aggregate::CountDistinct, _) => ColumnType::Integer("BIGINT"),
            _ => ColumnType::Float("DOUBLE"),
        };
        let counts = matches!(
            condition.aggregate,
            Aggregate::Count | Aggregate::CountDistinct
        );
        let subquery_start = format!(
            "(SELECT {aggregate} FROM {table_sql} AS {alias} \
             WHERE {alias}.{bkey} = {master}.{mkey}",
            table_sql = self.table(&table.table_name()),
            bkey = quote_ident(&table.key),
            master = self.master_alias(),
            mkey = quote_ident(&self.pipeline.master.key),
        );
        let (subquery, subquery_params) = self.detached(|this| {
            this.sql.push_str(&subquery_start);
            if let Some(window) = condition.window {
                let time = table
                    .time
                    .as_deref()
                    .expect("behaviour tables have a time column");
                let time = format!("{alias}.{}", quote_ident(time));
                let start = window_start(window, this.as_of, this.pipeline.time_zone);
                this.sql.push_str(&format!(" AND {time} >= "));
                this.bind_time(start);
                this.sql.push_str(&format!(" AND {time} <= "));
                this.bind_time(this.as_of);
            }
            if let Some(filter) = &condition.filter {
                this.sql.push_str(" AND ");
                this.filter(&alias, filter);
            }
            this.sql.push(')');
        });
        let wrapped = if counts {
            format!("COALESCE({subquery}, 0)")
        } else {
            subquery
        };
        if reads_expression_once(&condition.predicate) {
            // The subquery's placeholders stand before the predicate's in the text.
            self.params.extend(subquery_params);
            self.predicate(&wrapped, &aggregate_type, &condition.predicate);
            return;
        }
        // A predicate that reads its value more than once reads it from a derived column, so
        // the subquery is written, bound and computed once.
        let value = format!("{alias}_value");
        let (predicate, predicate_params) = self.detached(|this| {
            this.predicate(&quote_ident(&value), &aggregate_type, &condition.predicate);
        });
        self.sql.push_str(&format!(
            "(SELECT {predicate} FROM (SELECT {wrapped} AS {}) AS {alias}_aggregate)",
            quote_ident(&value)
        ));
        self.params.extend(predicate_params);
        self.params.extend(subquery_params);
    }

    /// Runs `write` against empty buffers and returns what it wrote, leaving ours as they were.
    fn detached(&mut self, write: impl FnOnce(&mut Self)) -> (String, Vec<SqlValue>) {
        let sql = std::mem::take(&mut self.sql);
        let params = std::mem::take(&mut self.params);
        write(self);
        let written = std::mem::replace(&mut self.sql, sql);
        let written_params = std::mem::replace(&mut self.params, params);
        (written, written_params)
    }

    fn filter(&mut self, alias: &str, filter: &Filter) {
        match filter {
            Filter::All(filters) | Filter::Any(filters) => {
                let all = matches!(filter, Filter::All(_));
                self.sql.push('(');
                for (i, inner) in filters.iter().enumerate() {
                    if i > 0 {
                        self.sql.push_str(if all { " AND " } else { " OR " });
                    }
                    self.filter(alias, inner);
                }
                if filters.is_empty() {
                    self.sql.push_str(if all { "TRUE" } else { "FALSE" });
                }
                self.sql.push(')');
            }
            Filter::Not(inner) => {
                self.sql.push_str("(NOT ");
                self.filter(alias, inner);
                self.sql.push(')');
            }
            Filter::Column {
                column,
                column_type,
                predicate,
            } => {
                self.predicate(
                    &format!("{alias}.{}", quote_ident(column)),
                    column_type,
                    predicate,
                );
            }
        }
    }
}

/// Formats a wall-clock time for binding as a TIMESTAMP.
pub fn format_time(time: NaiveDateTime) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.f").to_string()
}

fn collect_attribute_tables(rule: &Rule, tables: &mut Vec<String>) {
    match rule {
        Rule::All(rules) | Rule::Any(rules) => {
            rules
                .iter()
                .for_each(|r| collect_attribute_tables(r, tables));
        }
        Rule::Not(inner) => collect_attribute_tables(inner, tables),
        Rule::Attribute { column, .. } => {
            if let Some(table) = &column.attribute_table
                && !tables.contains(table)
            {
                tables.push(table.clone());
            }
        }
        Rule::Everyone | Rule::Segment(_) | Rule::Behaviour(_) => {}
    }
}

/// Whether the SQL of `predicate` names the tested expression once: comparisons, lists and
/// text tests do; time spans, anniversaries and list counts name it several times.
fn reads_expression_once(predicate: &Predicate) -> bool {
    !matches!(
        predicate,
        Predicate::Relative(_) | Predicate::Anniversary(_) | Predicate::ListCount { .. }
    )
}

/// Escapes `%`, `_` and `\` for a `LIKE` pattern with `ESCAPE '\'`.
fn escape_like(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A bound of a relative time: the instant and whether it is included.
type Bound = Option<(NaiveDateTime, bool)>;

/// The bounds of a relative time around `as_of`.
pub fn relative_bounds(
    relative: RelativeTime,
    as_of: NaiveDateTime,
    zone: chrono_tz::Tz,
) -> (Bound, Bound) {
    match relative {
        RelativeTime::WithinLast(window) => (
            Some((window_start(window, as_of, zone), true)),
            Some((as_of, true)),
        ),
        RelativeTime::WithinNext(window) => (
            Some((as_of, true)),
            Some((window_end(window, as_of, zone), true)),
        ),
        RelativeTime::MoreThanAgo(window) => {
            (None, Some((window_start(window, as_of, zone), false)))
        }
        RelativeTime::During(span) => {
            let (start, end) = calendar_bounds(span, as_of.date());
            (
                Some((start.and_time(NaiveTime::MIN), true)),
                Some((end.and_time(NaiveTime::MIN), false)),
            )
        }
    }
}

/// The end of a window starting at `as_of` and running forward.
pub fn window_end(window: Window, as_of: NaiveDateTime, zone: chrono_tz::Tz) -> NaiveDateTime {
    let amount = window.amount;
    match window.unit {
        TimeUnit::Minutes | TimeUnit::Hours => {
            let minutes = if window.unit == TimeUnit::Hours {
                amount * 60
            } else {
                amount
            };
            let instant = zone
                .from_local_datetime(&as_of)
                .earliest()
                .unwrap_or_else(|| zone.from_utc_datetime(&as_of));
            (instant + chrono::Duration::minutes(i64::from(minutes))).naive_local()
        }
        TimeUnit::Days => as_of + Days::new(u64::from(amount)),
        TimeUnit::Weeks => as_of + Days::new(7 * u64::from(amount)),
        TimeUnit::Months => as_of
            .checked_add_months(Months::new(amount))
            .unwrap_or(as_of),
        TimeUnit::Years => as_of
            .checked_add_months(Months::new(12 * amount))
            .unwrap_or(as_of),
    }
}

/// The first day of a calendar span and the first day after it.
pub fn calendar_bounds(span: CalendarSpan, today: NaiveDate) -> (NaiveDate, NaiveDate) {
    let shift_months = |date: NaiveDate, months: i32| -> NaiveDate {
        if months >= 0 {
            date.checked_add_months(Months::new(months as u32))
                .unwrap_or(date)
        } else {
            date.checked_sub_months(Months::new((-months) as u32))
                .unwrap_or(date)
        }
    };
    let shift_days = |date: NaiveDate, days: i64| -> NaiveDate {
        date.checked_add_signed(chrono::Duration::days(days))
            .unwrap_or(date)
    };
    match span.unit {
        CalendarUnit::Day => {
            let start = shift_days(today, i64::from(span.offset));
            (start, shift_days(start, 1))
        }
        CalendarUnit::Week => {
            let monday = shift_days(today, -i64::from(today.weekday().num_days_from_monday()));
            let start = shift_days(monday, 7 * i64::from(span.offset));
            (start, shift_days(start, 7))
        }
        CalendarUnit::Month | CalendarUnit::Quarter | CalendarUnit::Year => {
            let (length, first_month) = match span.unit {
                CalendarUnit::Month => (1, today.month()),
                CalendarUnit::Quarter => (3, (today.month() - 1) / 3 * 3 + 1),
                _ => (12, 1),
            };
            let first =
                NaiveDate::from_ymd_opt(today.year(), first_month, 1).expect("a valid date");
            let start = shift_months(first, span.offset * length);
            (start, shift_months(start, length))
        }
    }
}

/// The recurring days an anniversary condition accepts.
enum Anniversary {
    /// Any day of this month (1-12).
    Month(u32),
    /// Any of these days, written month * 100 + day.
    Days(Vec<u32>),
}

fn anniversary_days(span: CalendarSpan, today: NaiveDate) -> Anniversary {
    let (start, end) = calendar_bounds(span, today);
    if span.unit == CalendarUnit::Month {
        return Anniversary::Month(start.month());
    }
    let mut days = Vec::new();
    let mut day = start;
    while day < end {
        days.push(day.month() * 100 + day.day());
        // In a year without 29 February, its anniversaries fall on the 28th.
        if day.month() == 2
            && day.day() == 28
            && NaiveDate::from_ymd_opt(day.year(), 2, 29).is_none()
        {
            days.push(229);
        }
        day = day.succ_opt().expect("a next day");
    }
    Anniversary::Days(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    fn time(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    fn span(text: &str) -> CalendarSpan {
        CalendarSpan::parse(text).unwrap()
    }

    #[test]
    fn calendar_spans_align_to_their_units() {
        let today = date("2024-05-15"); // a Wednesday
        assert_eq!(
            calendar_bounds(span("this week"), today),
            (date("2024-05-13"), date("2024-05-20"))
        );
        assert_eq!(
            calendar_bounds(span("last month"), today),
            (date("2024-04-01"), date("2024-05-01"))
        );
        assert_eq!(
            calendar_bounds(span("next quarter"), today),
            (date("2024-07-01"), date("2024-10-01"))
        );
        assert_eq!(
            calendar_bounds(span("last year"), today),
            (date("2023-01-01"), date("2024-01-01"))
        );
        assert_eq!(
            calendar_bounds(span("yesterday"), date("2024-03-01")),
            (date("2024-02-29"), date("2024-03-01"))
        );
    }

    #[test]
    fn day_windows_keep_the_wall_clock_across_daylight_saving() {
        let zone: chrono_tz::Tz = "Europe/London".parse().unwrap();
        // Clocks went forward at 01:00 on 2024-03-31: one day back from noon that day is
        // still noon on the wall clock.
        let as_of = time("2024-03-31 12:00:00");
        let day = Window {
            amount: 1,
            unit: TimeUnit::Days,
        };
        assert_eq!(window_start(day, as_of, zone), time("2024-03-30 12:00:00"));
        // Twenty-four real hours back lose the skipped hour: 11:00 on the wall clock.
        let hours = Window {
            amount: 24,
            unit: TimeUnit::Hours,
        };
        assert_eq!(
            window_start(hours, as_of, zone),
            time("2024-03-30 11:00:00")
        );
        // Forward from the day before, 24 hours land at 13:00 on the wall clock.
        let before = time("2024-03-30 12:00:00");
        assert_eq!(window_end(hours, before, zone), time("2024-03-31 13:00:00"));
    }

    #[test]
    fn february_29_anniversaries_fall_on_the_28th_in_other_years() {
        let Anniversary::Days(days) = anniversary_days(span("today"), date("2023-02-28")) else {
            panic!("days expected");
        };
        assert_eq!(days, [228, 229]);
        let Anniversary::Days(days) = anniversary_days(span("today"), date("2024-02-28")) else {
            panic!("days expected");
        };
        assert_eq!(days, [228]);
    }

    #[test]
    fn like_patterns_escape_their_wildcards() {
        assert_eq!(escape_like("50%_off\\"), "50\\%\\_off\\\\");
    }
}
