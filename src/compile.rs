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

use chrono::{Days, Months, NaiveDateTime, TimeZone};

use crate::config::Pipeline;
use crate::rules::{Aggregate, BehaviourCondition, Filter, Predicate, Rule, TimeUnit, Value, Window};
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
    };
    compiler.segment(segment)?;
    Ok(CompiledSql { sql: compiler.sql, params: compiler.params })
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
            let minutes = if window.unit == TimeUnit::Hours { amount * 60 } else { amount };
            let instant = zone
                .from_local_datetime(&as_of)
                .earliest()
                .unwrap_or_else(|| zone.from_utc_datetime(&as_of));
            (instant - chrono::Duration::minutes(i64::from(minutes))).naive_local()
        }
        TimeUnit::Days => as_of - Days::new(u64::from(amount)),
        TimeUnit::Weeks => as_of - Days::new(7 * u64::from(amount)),
        TimeUnit::Months => as_of.checked_sub_months(Months::new(amount)).unwrap_or(as_of),
        TimeUnit::Years => as_of.checked_sub_months(Months::new(12 * amount)).unwrap_or(as_of),
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
        let (placeholder, bound) = match value {
            Value::Bool(b) => ("?", SqlValue::Bool(*b)),
            Value::Int(i) => ("?", SqlValue::Int(*i)),
            Value::Float(f) => ("?", SqlValue::Float(*f)),
            Value::Text(t) => ("?", SqlValue::Text(t.clone())),
            Value::Timestamp(t) => ("CAST(? AS TIMESTAMP)", SqlValue::Text(format_time(*t))),
            Value::Date(d) => ("CAST(? AS DATE)", SqlValue::Text(d.to_string())),
        };
        self.sql.push_str(placeholder);
        self.params.push(bound);
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
                let joiner = if matches!(rule, Rule::All(_)) { " AND " } else { " OR " };
                self.sql.push('(');
                for (i, inner) in rules.iter().enumerate() {
                    if i > 0 {
                        self.sql.push_str(joiner);
                    }
                    self.rule(inner)?;
                }
                if rules.is_empty() {
                    self.sql.push_str(if joiner == " AND " { "TRUE" } else { "FALSE" });
                }
                self.sql.push(')');
            }
            Rule::Not(inner) => {
                self.sql.push_str("(NOT ");
                self.rule(inner)?;
                self.sql.push(')');
            }
            Rule::Segment(name) => {
                let key = format!("{}.{}", self.master_alias(), quote_ident(&self.pipeline.master.key));
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
                self.predicate(&expression, predicate);
            }
            Rule::Behaviour(condition) => self.behaviour(condition),
        }
        Ok(())
    }

    /// Writes `COALESCE(<expression> <predicate>, FALSE)`: a missing value never matches.
    fn predicate(&mut self, expression: &str, predicate: &Predicate) {
        self.sql.push_str("COALESCE(");
        self.sql.push_str(expression);
        match predicate {
            Predicate::Compare(comparison, value) => {
                self.sql.push_str(&format!(" {} ", comparison.sql()));
                self.bind(value);
            }
            Predicate::In(values) | Predicate::NotIn(values) => {
                let negated = matches!(predicate, Predicate::NotIn(_));
                self.sql.push_str(if negated { " NOT IN (" } else { " IN (" });
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
        let column = condition.column.as_deref().map(|c| format!("{alias}.{}", quote_ident(c)));
        let aggregate = match (condition.aggregate, &column) {
            (Aggregate::Count, None) => "count(*)".to_string(),
            (Aggregate::Count, Some(c)) => format!("count({c})"),
            (Aggregate::CountDistinct, Some(c)) => format!("count(DISTINCT {c})"),
            (Aggregate::Sum, Some(c)) => format!("sum({c})"),
            (Aggregate::Average, Some(c)) => format!("avg({c})"),
            (Aggregate::Min, Some(c)) => format!("min({c})"),
            (Aggregate::Max, Some(c)) => format!("max({c})"),
            (_, None) => "count(*)".to_string(),
        };
        let counts = matches!(condition.aggregate, Aggregate::Count | Aggregate::CountDistinct);
        let subquery_start = format!(
            "(SELECT {aggregate} FROM {table_sql} AS {alias} WHERE {alias}.{bkey} = {master}.{mkey}",
            table_sql = self.table(&table.table_name()),
            bkey = quote_ident(&table.key),
            master = self.master_alias(),
            mkey = quote_ident(&self.pipeline.master.key),
        );
        let (subquery, subquery_params) = self.detached(|this| {
            this.sql.push_str(&subquery_start);
            if let Some(window) = condition.window {
                let time = table.time.as_deref().expect("behaviour tables have a time column");
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
        let wrapped = if counts { format!("COALESCE({subquery}, 0)") } else { subquery };
        // The subquery's placeholders stand before the predicate's in the text.
        self.params.extend(subquery_params);
        self.predicate(&wrapped, &condition.predicate);
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
            Filter::Column { column, predicate, .. } => {
                self.predicate(&format!("{alias}.{}", quote_ident(column)), predicate);
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
            rules.iter().for_each(|r| collect_attribute_tables(r, tables));
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
