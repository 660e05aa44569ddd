//! The segment rule language: its model and its checks.
//!
//! A rule is a tree: `all` / `any` / `not` groups over leaf conditions. A leaf is a value
//! condition on a master or attribute column, a behaviour condition (an aggregate over the
//! behaviour rows that match a filter, within a time window, compared with a value), or a
//! reference to another segment. This module turns the TOML an operator writes into that tree,
//! checking every column, operator and value against the master segment's declared columns
//! ([`Catalog`]); it reports problems with the line they are on. Without the columns (when the
//! pipeline's tables cannot be used), [`check_form`] checks what it can of a rule's shape and
//! still finds its references to other segments. Turning a rule into SQL is
//! [`crate::compile`]'s job.
//!
//! Null policy: a leaf condition on a missing value is false, whatever its operator, except
//! `is null`; `not` is plain logical negation of the group under it. So `country != "France"`
//! excludes profiles with no country, and `not { country = "France" }` includes them. The same
//! holds for `not in`, `not contains`, the other negated text operators, and list operators on
//! a missing list.

use std::collections::BTreeMap;

use chrono::{NaiveDate, NaiveDateTime};
use serde::Deserialize;
use toml::Spanned;

use crate::config::pipeline::{TableDef, TableRole};
use crate::schema::{ColumnType, ValueKind};

/// A condition as written in a segment file, before checking.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCondition {
    all: Option<Vec<Spanned<RawCondition>>>,
    any: Option<Vec<Spanned<RawCondition>>>,
    not: Option<Box<Spanned<RawCondition>>>,
    segment: Option<Spanned<String>>,
    attribute: Option<String>,
    behaviour: Option<String>,
    column: Option<String>,
    aggregate: Option<String>,
    within: Option<String>,
    #[serde(rename = "where")]
    filter: Option<Box<Spanned<RawCondition>>>,
    op: Option<String>,
    value: Option<Spanned<toml::Value>>,
    count: Option<u32>,
}

impl RawCondition {
    /// The condition's `value`, if it has one.
    fn value(&self) -> Option<&toml::Value> {
        self.value.as_ref().map(Spanned::get_ref)
    }
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Every member of the master segment (an empty rule).
    Everyone,
    /// All of the conditions hold.
    All(Vec<Rule>),
    /// At least one of the conditions holds.
    Any(Vec<Rule>),
    /// The condition does not hold.
    Not(Box<Rule>),
    /// The profile is a member of the named segment.
    Segment(String),
    /// A condition on a master or attribute column.
    Attribute {
        /// Where the column is.
        column: ColumnRef,
        /// What its value must satisfy.
        predicate: Predicate,
    },
    /// A condition on an aggregate of behaviour rows.
    Behaviour(BehaviourCondition),
}

/// A master or attribute column a condition reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRef {
    /// `None` for the master table, else the attribute table's name.
    pub attribute_table: Option<String>,
    /// The column.
    pub column: String,
    /// Its declared type.
    pub column_type: ColumnType,
}

/// What a value must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    /// Compared with one value.
    Compare(Comparison, Value),
    /// Equal to one of the values.
    In(Vec<Value>),
    /// Equal to none of the values (and present).
    NotIn(Vec<Value>),
    /// Between two values, both ends included.
    Between(Value, Value),
    /// Missing.
    IsNull,
    /// Present.
    IsNotNull,
    /// A text test; `negated` turns it into "does not ...", still false on a missing value.
    Text {
        /// Which test.
        test: TextTest,
        /// The text to look for, or the regular expression.
        pattern: String,
        /// "does not".
        negated: bool,
    },
    /// A time relative to the run's `as_of`.
    Relative(RelativeTime),
    /// A recurring date (birthday, anniversary) falling in a calendar span.
    Anniversary(CalendarSpan),
    /// How many of the values a list column holds, compared with a number.
    ListCount {
        /// The values looked for, without repeats.
        values: Vec<Value>,
        /// How the number of those present compares.
        comparison: Comparison,
        /// The number.
        count: usize,
    },
}

/// A test on text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextTest {
    /// Holds the text anywhere.
    Contains,
    /// Begins with the text.
    StartsWith,
    /// Ends with the text.
    EndsWith,
    /// Matches the regular expression somewhere.
    Matches,
}

/// A time relative to `as_of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelativeTime {
    /// From the window's length before `as_of` up to `as_of`.
    WithinLast(Window),
    /// From `as_of` up to the window's length after it.
    WithinNext(Window),
    /// Before the window's length before `as_of`.
    MoreThanAgo(Window),
    /// Inside a calendar span around `as_of`.
    During(CalendarSpan),
}

/// A calendar unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarUnit {
    /// A day, midnight to midnight.
    Day,
    /// A week, Monday to Sunday.
    Week,
    /// A month.
    Month,
    /// A quarter: January, April, July or October for three months.
    Quarter,
    /// A year.
    Year,
}

/// A calendar span: this, last or next unit (`offset` 0, -1, 1) in the pipeline's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalendarSpan {
    /// The unit.
    pub unit: CalendarUnit,
    /// 0 for this unit, -1 for the last one, 1 for the next one.
    pub offset: i32,
}

impl CalendarSpan {
    /// Parses `today`, `yesterday`, `tomorrow`, or `this|last|next day|week|month|quarter|year`.
    pub fn parse(text: &str) -> Result<CalendarSpan, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (offset, unit) = match words.as_slice() {
            ["today"] => (0, "day"),
            ["yesterday"] => (-1, "day"),
            ["tomorrow"] => (1, "day"),
            ["this", unit] => (0, *unit),
            ["last", unit] => (-1, *unit),
            ["next", unit] => (1, *unit),
            _ => {
                return Err(format!(
                    "`{text}` is not a calendar span; use today, yesterday, tomorrow, or this, \
                     last or next followed by day, week, month, quarter or year"
                ));
            }
        };
        let unit = match unit {
            "day" => CalendarUnit::Day,
            "week" => CalendarUnit::Week,
            "month" => CalendarUnit::Month,
            "quarter" => CalendarUnit::Quarter,
            "year" => CalendarUnit::Year,
            other => {
                return Err(format!(
                    "`{text}`: unknown calendar unit `{other}`; use day, week, month, quarter or \
                     year"
                ));
            }
        };
        Ok(CalendarSpan { unit, offset })
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `=`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `<=`
    LessOrEqual,
    /// `>`
    Greater,
    /// `>=`
    GreaterOrEqual,
}

impl Comparison {
    /// The SQL operator.
    pub fn sql(self) -> &'static str {
        match self {
            Comparison::Equal => "=",
            Comparison::NotEqual => "<>",
            Comparison::Less => "<",
            Comparison::LessOrEqual => "<=",
            Comparison::Greater => ">",
            Comparison::GreaterOrEqual => ">=",
        }
    }
}

/// A rule value, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A boolean.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// Text.
    Text(String),
    /// A wall-clock time.
    Timestamp(NaiveDateTime),
    /// A calendar date.
    Date(NaiveDate),
}

/// An aggregate over behaviour rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// How many rows.
    Count,
    /// How many distinct values of a column.
    CountDistinct,
    /// Sum of a column.
    Sum,
    /// Average of a column.
    Average,
    /// Smallest value of a column.
    Min,
    /// Largest value of a column.
    Max,
    /// The column's value on the earliest row (by the behaviour's time column).
    First,
    /// The column's value on the latest row.
    Last,
}

impl Aggregate {
    fn parse(text: &str) -> Option<Aggregate> {
        Some(match text {
            "count" => Aggregate::Count,
            "count_distinct" => Aggregate::CountDistinct,
            "sum" => Aggregate::Sum,
            "avg" | "average" => Aggregate::Average,
            "min" => Aggregate::Min,
            "max" => Aggregate::Max,
            "first" => Aggregate::First,
            "last" => Aggregate::Last,
            _ => return None,
        })
    }
}

/// A unit of a relative time window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnit {
    /// Minutes, as elapsed time.
    Minutes,
    /// Hours, as elapsed time.
    Hours,
    /// Calendar days on the wall clock of the pipeline's time zone.
    Days,
    /// Calendar weeks (7 days).
    Weeks,
    /// Calendar months.
    Months,
    /// Calendar years.
    Years,
}

/// "Within the last N units" before the run's `as_of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// How many units.
    pub amount: u32,
    /// Which unit.
    pub unit: TimeUnit,
}

impl Window {
    /// Parses `"30 days"`, `"1 month"`, `"12 hours"`.
    pub fn parse(text: &str) -> Result<Window, String> {
        let mut words = text.split_whitespace();
        let (Some(amount), Some(unit), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "`within = \"{text}\"` must be a number and a unit, such as \"30 days\""
            ));
        };
        let amount: u32 = amount
            .parse()
            .map_err(|_| format!("`within = \"{text}\"`: `{amount}` is not a whole number"))?;
        let unit = match unit.trim_end_matches('s') {
            "minute" => TimeUnit::Minutes,
            "hour" => TimeUnit::Hours,
            "day" => TimeUnit::Days,
            "week" => TimeUnit::Weeks,
            "month" => TimeUnit::Months,
            "year" => TimeUnit::Years,
            _ => {
                return Err(format!(
                    "`within = \"{text}\"`: unknown unit `{unit}`; use minutes, hours, days, \
                     weeks, months or years"
                ));
            }
        };
        Ok(Window { amount, unit })
    }
}

/// A condition over behaviour rows.
#[derive(Debug, Clone, PartialEq)]
pub struct BehaviourCondition {
    /// The behaviour table's name.
    pub behaviour: String,
    /// The aggregate.
    pub aggregate: Aggregate,
    /// The aggregated column (none for `count`).
    pub column: Option<String>,
    /// The time window, if any.
    pub window: Option<Window>,
    /// Which rows count.
    pub filter: Option<Filter>,
    /// What the aggregate must satisfy.
    pub predicate: Predicate,
}

/// A filter on behaviour rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// All hold.
    All(Vec<Filter>),
    /// One holds.
    Any(Vec<Filter>),
    /// Does not hold.
    Not(Box<Filter>),
    /// A condition on one column of the behaviour row.
    Column {
        /// The column.
        column: String,
        /// Its declared type.
        column_type: ColumnType,
        /// What it must satisfy.
        predicate: Predicate,
    },
}

/// The columns rules may refer to, from the pipeline's declared tables.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Master and attribute columns by name: `(attribute table or None, type)`.
    attributes: BTreeMap<String, (Option<String>, ColumnType)>,
    /// Behaviour tables by name.
    behaviours: BTreeMap<String, TableDef>,
}

impl Catalog {
    /// Builds the catalog; a column name used by two attribute tables (other than the key) is
    /// an error, since rules name columns without their table.
    pub fn new(
        master: &TableDef,
        attributes: &[TableDef],
        behaviours: &[TableDef],
    ) -> Result<Catalog, String> {
        let mut columns = BTreeMap::new();
        for (name, column_type) in &master.columns {
            columns.insert(name.clone(), (None, column_type.clone()));
        }
        for table in attributes {
            for (name, column_type) in &table.columns {
                if name == &table.key {
                    continue;
                }
                let owner = Some(table.name.clone());
                if let Some((other, _)) = columns.insert(name.clone(), (owner, column_type.clone()))
                {
                    let other = other.map_or("the master table".to_string(), |t| {
                        format!("attribute table `{t}`")
                    });
                    return Err(format!(
                        "column `{name}` of attribute table `{}` has the same name as a column \
                         of {other}; rename one of them",
                        table.name
                    ));
                }
            }
        }
        let behaviours = behaviours
            .iter()
            .filter(|t| t.role == TableRole::Behaviour)
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        Ok(Catalog {
            attributes: columns,
            behaviours,
        })
    }

    /// A master or attribute column by name.
    pub fn attribute(&self, name: &str) -> Option<ColumnRef> {
        self.attributes
            .get(name)
            .map(|(table, column_type)| ColumnRef {
                attribute_table: table.clone(),
                column: name.to_string(),
                column_type: column_type.clone(),
            })
    }

    fn attribute_names(&self) -> String {
        self.attributes
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A problem in a rule, at a byte offset of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleProblem {
    /// Byte offset in the segment file.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

/// A rule's reference to another segment, where it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The segment referred to.
    pub segment: String,
    /// Byte offset of the `segment = "..."` value in the segment file.
    pub offset: usize,
}

/// What checking a rule found.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The rule, or every problem in it.
    pub rule: Result<Rule, Vec<RuleProblem>>,
    /// The segments it refers to, in rule order; found even when the rule has problems, so
    /// references can be checked for every segment file.
    pub references: Vec<Reference>,
}

/// Checks a raw rule against the master segment's columns.
pub fn check(raw: &Spanned<RawCondition>, catalog: &Catalog) -> Checked {
    let mut checker = Checker {
        catalog: Some(catalog),
        problems: Vec::new(),
        references: Vec::new(),
    };
    let rule = checker.rule(raw, true);
    Checked {
        rule: if checker.problems.is_empty() {
            Ok(rule)
        } else {
            Err(checker.problems)
        },
        references: checker.references,
    }
}

/// Checks what can be checked of a rule without the master segment's columns (when its
/// pipeline.toml cannot be used): the shape of every condition, the keys each kind takes,
/// aggregates and windows, and the segments it refers to. Columns, operators and values are
/// not checked. Returns the problems found and the references.
pub fn check_form(raw: &Spanned<RawCondition>) -> (Vec<RuleProblem>, Vec<Reference>) {
    let mut checker = Checker {
        catalog: None,
        problems: Vec::new(),
        references: Vec::new(),
    };
    checker.rule(raw, true);
    (checker.problems, checker.references)
}

struct Checker<'a> {
    /// `None` when only the form of the rule is checked.
    catalog: Option<&'a Catalog>,
    problems: Vec<RuleProblem>,
    references: Vec<Reference>,
}

/// Names the keys of a raw condition that are set, to tell what kind of node it is.
fn node_keys(raw: &RawCondition) -> Vec<&'static str> {
    let mut keys = Vec::new();
    for (set, key) in [
        (raw.all.is_some(), "all"),
        (raw.any.is_some(), "any"),
        (raw.not.is_some(), "not"),
        (raw.segment.is_some(), "segment"),
        (raw.attribute.is_some(), "attribute"),
        (raw.behaviour.is_some(), "behaviour"),
    ] {
        if set {
            keys.push(key);
        }
    }
    keys
}

impl Checker<'_> {
    fn problem(&mut self, at: &Spanned<RawCondition>, message: impl Into<String>) {
        self.problems.push(RuleProblem {
            offset: at.span().start,
            message: message.into(),
        });
    }

    /// A problem with a condition's `value`, reported on the line of the value.
    fn value_problem(&mut self, at: &Spanned<RawCondition>, message: impl Into<String>) {
        let offset = at
            .get_ref()
            .value
            .as_ref()
            .map_or(at.span().start, |v| v.span().start);
        self.problems.push(RuleProblem {
            offset,
            message: message.into(),
        });
    }

    fn rule(&mut self, spanned: &Spanned<RawCondition>, root: bool) -> Rule {
        let raw = spanned.get_ref();
        let keys = node_keys(raw);
        if keys.len() > 1 {
            self.problem(
                spanned,
                format!(
                    "a condition has exactly one of all, any, not, segment, attribute or \
                     behaviour; this one has {}",
                    keys.join(" and ")
                ),
            );
            return Rule::Everyone;
        }
        let Some(kind) = keys.first() else {
            if root && raw.column.is_none() && raw.op.is_none() && raw.value.is_none() {
                return Rule::Everyone;
            }
            self.problem(
                spanned,
                "a condition needs one of all, any, not, segment, attribute or behaviour",
            );
            return Rule::Everyone;
        };
        match *kind {
            "all" | "any" => {
                self.only(spanned, &[]);
                let items = raw.all.as_ref().or(raw.any.as_ref()).expect("set");
                if items.is_empty() {
                    self.problem(spanned, format!("`{kind}` needs at least one condition"));
                }
                let rules = items.iter().map(|item| self.rule(item, false)).collect();
                if *kind == "all" {
                    Rule::All(rules)
                } else {
                    Rule::Any(rules)
                }
            }
            "not" => {
                self.only(spanned, &[]);
                Rule::Not(Box::new(self.rule(raw.not.as_ref().expect("set"), false)))
            }
            "segment" => {
                self.only(spanned, &[]);
                let name = raw.segment.as_ref().expect("set");
                self.references.push(Reference {
                    segment: name.get_ref().clone(),
                    offset: name.span().start,
                });
                Rule::Segment(name.get_ref().clone())
            }
            "attribute" => {
                self.only(spanned, &["op", "value", "count"]);
                let name = raw.attribute.as_deref().expect("set");
                let Some(catalog) = self.catalog else {
                    return Rule::Everyone;
                };
                match catalog.attribute(name) {
                    Some(column) => {
                        let predicate = self.predicate(spanned, &column.column_type);
                        Rule::Attribute { column, predicate }
                    }
                    None => {
                        let known = catalog.attribute_names();
                        self.problem(
                            spanned,
                            format!(
                                "unknown attribute `{name}`; master and attribute columns: {known}"
                            ),
                        );
                        Rule::Everyone
                    }
                }
            }
            _ => self.behaviour(spanned),
        }
    }

    /// Reports keys set on a node that its kind does not take.
    fn only(&mut self, spanned: &Spanned<RawCondition>, allowed: &[&str]) {
        let raw = spanned.get_ref();
        let extra = [
            (raw.column.is_some(), "column"),
            (raw.aggregate.is_some(), "aggregate"),
            (raw.within.is_some(), "within"),
            (raw.filter.is_some(), "where"),
            (raw.op.is_some(), "op"),
            (raw.value.is_some(), "value"),
            (raw.count.is_some(), "count"),
        ];
        for (set, key) in extra {
            if set && !allowed.contains(&key) {
                self.problem(
                    spanned,
                    format!("`{key}` does not belong in this condition"),
                );
            }
        }
    }

    fn behaviour(&mut self, spanned: &Spanned<RawCondition>) -> Rule {
        let raw = spanned.get_ref();
        self.only(
            spanned,
            &["column", "aggregate", "within", "where", "op", "value"],
        );
        let name = raw.behaviour.clone().expect("set");
        let Some(catalog) = self.catalog else {
            self.behaviour_form(spanned);
            return Rule::Everyone;
        };
        let Some(table) = catalog.behaviours.get(&name).cloned() else {
            let known: Vec<&str> = catalog.behaviours.keys().map(String::as_str).collect();
            self.problem(
                spanned,
                format!(
                    "unknown behaviour `{name}`; behaviour tables: {}",
                    known.join(", ")
                ),
            );
            return Rule::Everyone;
        };

        let aggregate_name = raw.aggregate.as_deref().unwrap_or("count");
        let aggregate = self.aggregate(spanned, aggregate_name);

        let column_type = match (&raw.column, aggregate) {
            (None, Aggregate::Count) => ColumnType::Integer("BIGINT"),
            (None, _) => {
                self.problem(
                    spanned,
                    format!("aggregate `{aggregate_name}` needs `column`"),
                );
                ColumnType::Integer("BIGINT")
            }
            (Some(column), _) => match table.column_type(column) {
                None => {
                    self.problem(
                        spanned,
                        format!("behaviour `{name}` has no column `{column}`"),
                    );
                    ColumnType::Integer("BIGINT")
                }
                Some(found) => match aggregate {
                    Aggregate::Count | Aggregate::CountDistinct => ColumnType::Integer("BIGINT"),
                    Aggregate::Sum | Aggregate::Average if found.kind() != ValueKind::Number => {
                        self.problem(
                            spanned,
                            format!(
                                "`{aggregate_name}` needs a numeric column; `{column}` is {found}"
                            ),
                        );
                        ColumnType::Float("DOUBLE")
                    }
                    Aggregate::Average => ColumnType::Float("DOUBLE"),
                    _ => found.clone(),
                },
            },
        };

        let window = self.window(spanned);
        let filter = raw
            .filter
            .as_ref()
            .map(|filter| self.filter(filter, &table));
        let predicate = self.predicate(spanned, &column_type);
        Rule::Behaviour(BehaviourCondition {
            behaviour: name,
            aggregate,
            column: raw.column.clone(),
            window,
            filter,
            predicate,
        })
    }

    /// The checks of a behaviour condition that need no columns: its aggregate, whether the
    /// aggregate has the `column` it needs, and its window.
    fn behaviour_form(&mut self, spanned: &Spanned<RawCondition>) {
        let raw = spanned.get_ref();
        let aggregate_name = raw.aggregate.as_deref().unwrap_or("count");
        let aggregate = self.aggregate(spanned, aggregate_name);
        if raw.column.is_none() && aggregate != Aggregate::Count {
            self.problem(
                spanned,
                format!("aggregate `{aggregate_name}` needs `column`"),
            );
        }
        self.window(spanned);
    }

    fn aggregate(&mut self, spanned: &Spanned<RawCondition>, name: &str) -> Aggregate {
        Aggregate::parse(name).unwrap_or_else(|| {
            self.problem(
                spanned,
                format!(
                    "unknown aggregate `{name}`; use count, count_distinct, sum, avg, min, max, \
                     first or last"
                ),
            );
            Aggregate::Count
        })
    }

    fn window(&mut self, spanned: &Spanned<RawCondition>) -> Option<Window> {
        let within = spanned.get_ref().within.as_deref()?;
        match Window::parse(within) {
            Ok(window) => Some(window),
            Err(message) => {
                self.problem(spanned, message);
                None
            }
        }
    }

    fn filter(&mut self, spanned: &Spanned<RawCondition>, table: &TableDef) -> Filter {
        let raw = spanned.get_ref();
        if let Some(items) = raw.all.as_ref().or(raw.any.as_ref()) {
            self.only(spanned, &[]);
            let filters = items.iter().map(|item| self.filter(item, table)).collect();
            return if raw.all.is_some() {
                Filter::All(filters)
            } else {
                Filter::Any(filters)
            };
        }
        if let Some(inner) = &raw.not {
            self.only(spanned, &[]);
            return Filter::Not(Box::new(self.filter(inner, table)));
        }
        let Some(column) = &raw.column else {
            self.problem(
                spanned,
                "a `where` condition needs all, any, not, or `column` with `op` and `value`",
            );
            return Filter::All(Vec::new());
        };
        if !node_keys(raw).is_empty() {
            self.problem(
                spanned,
                "a `where` condition names a behaviour `column`, nothing else",
            );
        }
        self.only(spanned, &["column", "op", "value", "count"]);
        match table.column_type(column) {
            Some(column_type) => {
                let predicate = self.predicate(spanned, column_type);
                Filter::Column {
                    column: column.clone(),
                    column_type: column_type.clone(),
                    predicate,
                }
            }
            None => {
                let known: Vec<&str> = table.columns.iter().map(|(n, _)| n.as_str()).collect();
                self.problem(
                    spanned,
                    format!(
                        "behaviour `{}` has no column `{column}`; its columns: {}",
                        table.name,
                        known.join(", ")
                    ),
                );
                Filter::All(Vec::new())
            }
        }
    }

    fn predicate(
        &mut self,
        spanned: &Spanned<RawCondition>,
        column_type: &ColumnType,
    ) -> Predicate {
        let raw = spanned.get_ref();
        let Some(op) = raw.op.as_deref() else {
            self.problem(spanned, "the condition needs `op`, such as \"=\" or \">=\"");
            return Predicate::IsNotNull;
        };
        let op = op.trim().to_ascii_lowercase().replace('_', " ");
        if let ColumnType::List(inner) = column_type {
            return self.list_predicate(spanned, &op, inner);
        }
        if raw.count.is_some() {
            self.problem(
                spanned,
                "`count` goes with the contains at least / at most / exactly operators of \
                 list columns",
            );
        }
        if let Some(predicate) = self.text_or_time_predicate(spanned, &op, column_type) {
            return predicate;
        }
        let comparison = match op.as_str() {
            "=" | "==" => Some(Comparison::Equal),
            "!=" | "<>" => Some(Comparison::NotEqual),
            "<" => Some(Comparison::Less),
            "<=" => Some(Comparison::LessOrEqual),
            ">" => Some(Comparison::Greater),
            ">=" => Some(Comparison::GreaterOrEqual),
            _ => None,
        };
        if let Some(comparison) = comparison {
            let value = self.single_value(spanned, column_type);
            return Predicate::Compare(comparison, value);
        }
        match op.as_str() {
            "is null" | "is not null" => {
                if raw.value.is_some() {
                    self.problem(spanned, format!("`{op}` takes no `value`"));
                }
                if op == "is null" {
                    Predicate::IsNull
                } else {
                    Predicate::IsNotNull
                }
            }
            "in" | "not in" => {
                let values = self.list_value(spanned, column_type, None);
                if op == "in" {
                    Predicate::In(values)
                } else {
                    Predicate::NotIn(values)
                }
            }
            "between" => {
                // An open end: `{ from = low }` or `{ to = high }`, or both.
                if let Some(toml::Value::Table(ends)) = raw.value() {
                    return self.open_between(spanned, ends, column_type);
                }
                let mut values = self.list_value(spanned, column_type, Some(2));
                if values.len() == 2 {
                    let high = values.pop().expect("two");
                    Predicate::Between(values.pop().expect("two"), high)
                } else {
                    Predicate::IsNotNull
                }
            }
            _ => {
                self.problem(
                    spanned,
                    format!(
                        "unknown operator `{op}`; use =, !=, <, <=, >, >=, in, not in, between, \
                         is null, is not null; on text also contains, starts with, ends with, \
                         matches (each also with not); on times also within last, within next, \
                         more than ago, during, anniversary during"
                    ),
                );
                Predicate::IsNotNull
            }
        }
    }

    /// `between` written as `{ from = low, to = high }`, either end left open.
    fn open_between(
        &mut self,
        spanned: &Spanned<RawCondition>,
        ends: &toml::Table,
        column_type: &ColumnType,
    ) -> Predicate {
        if let Some(key) = ends
            .keys()
            .find(|key| !matches!(key.as_str(), "from" | "to"))
        {
            self.problem(
                spanned,
                format!("`between` takes `from` and `to`, not `{key}`"),
            );
            return Predicate::IsNotNull;
        }
        let from = ends
            .get("from")
            .map(|value| self.value(spanned, value, column_type));
        let to = ends
            .get("to")
            .map(|value| self.value(spanned, value, column_type));
        match (from, to) {
            (Some(low), Some(high)) => Predicate::Between(low, high),
            (Some(low), None) => Predicate::Compare(Comparison::GreaterOrEqual, low),
            (None, Some(high)) => Predicate::Compare(Comparison::LessOrEqual, high),
            (None, None) => {
                self.problem(spanned, "`between` needs `from`, `to` or both");
                Predicate::IsNotNull
            }
        }
    }

    /// Text and relative-time operators, or `None` when `op` is neither.
    fn text_or_time_predicate(
        &mut self,
        spanned: &Spanned<RawCondition>,
        op: &str,
        column_type: &ColumnType,
    ) -> Option<Predicate> {
        let (negated, base) = match op.strip_prefix("not ") {
            Some(rest) => (true, rest),
            None => (false, op),
        };
        let test = match base {
            "contains" => Some(TextTest::Contains),
            "starts with" => Some(TextTest::StartsWith),
            "ends with" => Some(TextTest::EndsWith),
            "matches" => Some(TextTest::Matches),
            _ => None,
        };
        if let Some(test) = test {
            if column_type.kind() != ValueKind::Text {
                self.problem(
                    spanned,
                    format!("`{op}` is for text columns; this one is {column_type}"),
                );
                return Some(Predicate::IsNotNull);
            }
            let pattern = match spanned.get_ref().value() {
                Some(toml::Value::String(text)) => text.clone(),
                _ => {
                    self.value_problem(spanned, format!("`{op}` takes a text `value`"));
                    return Some(Predicate::IsNotNull);
                }
            };
            if test == TextTest::Matches
                && let Err(err) = regex::Regex::new(&pattern)
            {
                self.value_problem(
                    spanned,
                    format!("`value` is not a valid regular expression: {err}"),
                );
            }
            return Some(Predicate::Text {
                test,
                pattern,
                negated,
            });
        }

        let relative = matches!(
            op,
            "within last" | "within next" | "more than ago" | "during" | "anniversary during"
        );
        if !relative {
            return None;
        }
        if column_type.kind() != ValueKind::Time {
            self.problem(
                spanned,
                format!("`{op}` is for DATE and TIMESTAMP columns; this one is {column_type}"),
            );
            return Some(Predicate::IsNotNull);
        }
        let Some(toml::Value::String(text)) = spanned.get_ref().value() else {
            self.value_problem(
                spanned,
                format!("`{op}` takes a text `value`, such as \"30 days\" or \"this month\""),
            );
            return Some(Predicate::IsNotNull);
        };
        let parsed = match op {
            "within last" => {
                Window::parse(text).map(|w| Predicate::Relative(RelativeTime::WithinLast(w)))
            }
            "within next" => {
                Window::parse(text).map(|w| Predicate::Relative(RelativeTime::WithinNext(w)))
            }
            "more than ago" => {
                Window::parse(text).map(|w| Predicate::Relative(RelativeTime::MoreThanAgo(w)))
            }
            "during" => {
                CalendarSpan::parse(text).map(|c| Predicate::Relative(RelativeTime::During(c)))
            }
            _ => CalendarSpan::parse(text).and_then(|span| match span.unit {
                CalendarUnit::Day | CalendarUnit::Week | CalendarUnit::Month => {
                    Ok(Predicate::Anniversary(span))
                }
                _ => Err("an anniversary falls during a day, a week or a month".to_string()),
            }),
        };
        Some(parsed.unwrap_or_else(|message| {
            self.problem(spanned, message);
            Predicate::IsNotNull
        }))
    }

    /// Operators on list columns.
    fn list_predicate(
        &mut self,
        spanned: &Spanned<RawCondition>,
        op: &str,
        inner: &ColumnType,
    ) -> Predicate {
        let raw = spanned.get_ref();
        if op == "is null" || op == "is not null" {
            return if op == "is null" {
                Predicate::IsNull
            } else {
                Predicate::IsNotNull
            };
        }
        let mut values = self.list_value(spanned, inner, None);
        values.dedup();
        let mut unique = Vec::new();
        for value in values {
            if !unique.contains(&value) {
                unique.push(value);
            }
        }
        let all = unique.len();
        let (comparison, count) = match op {
            "contains any" => (Comparison::GreaterOrEqual, 1),
            "contains all" => (Comparison::Equal, all),
            "contains none" => (Comparison::Equal, 0),
            "contains at least" | "contains at most" | "contains exactly" => {
                let Some(count) = raw.count else {
                    self.problem(
                        spanned,
                        format!("`{op}` needs `count`, the number of the values"),
                    );
                    return Predicate::IsNotNull;
                };
                let comparison = match op {
                    "contains at least" => Comparison::GreaterOrEqual,
                    "contains at most" => Comparison::LessOrEqual,
                    _ => Comparison::Equal,
                };
                (comparison, count as usize)
            }
            _ => {
                self.problem(
                    spanned,
                    format!(
                        "unknown operator `{op}` for a list column; use contains any, contains \
                         all, contains none, contains at least, contains at most, contains \
                         exactly, is null or is not null"
                    ),
                );
                return Predicate::IsNotNull;
            }
        };
        if raw.count.is_some() && !op.starts_with("contains at") && op != "contains exactly" {
            self.problem(spanned, format!("`count` does not belong with `{op}`"));
        }
        Predicate::ListCount {
            values: unique,
            comparison,
            count,
        }
    }

    fn single_value(&mut self, spanned: &Spanned<RawCondition>, column_type: &ColumnType) -> Value {
        match spanned.get_ref().value() {
            Some(toml::Value::Array(_)) => {
                self.value_problem(spanned, "this operator takes one value, not a list");
                Value::Bool(false)
            }
            Some(value) => self.value(spanned, value, column_type),
            None => {
                self.problem(spanned, "the condition needs `value`");
                Value::Bool(false)
            }
        }
    }

    fn list_value(
        &mut self,
        spanned: &Spanned<RawCondition>,
        column_type: &ColumnType,
        exactly: Option<usize>,
    ) -> Vec<Value> {
        match spanned.get_ref().value() {
            Some(toml::Value::Array(items)) if !items.is_empty() => {
                if let Some(n) = exactly
                    && items.len() != n
                {
                    self.problem(
                        spanned,
                        format!("`between` takes a list of {n} values: [low, high]"),
                    );
                    return Vec::new();
                }
                items
                    .iter()
                    .map(|item| self.value(spanned, item, column_type))
                    .collect()
            }
            _ => {
                self.value_problem(
                    spanned,
                    "this operator takes a non-empty list as `value`, such as [1, 2]",
                );
                Vec::new()
            }
        }
    }

    fn value(
        &mut self,
        spanned: &Spanned<RawCondition>,
        value: &toml::Value,
        column_type: &ColumnType,
    ) -> Value {
        let typed = match (column_type.kind(), value) {
            (ValueKind::Boolean, toml::Value::Boolean(b)) => Some(Value::Bool(*b)),
            (ValueKind::Number, toml::Value::Integer(i)) => Some(Value::Int(*i)),
            (ValueKind::Number, toml::Value::Float(f)) if f.is_finite() => Some(Value::Float(*f)),
            (ValueKind::Text, toml::Value::String(s)) => Some(Value::Text(s.clone())),
            (ValueKind::Time, toml::Value::String(s)) => time_value(s, column_type),
            (ValueKind::Time, toml::Value::Datetime(d)) => time_value(&d.to_string(), column_type),
            _ => None,
        };
        typed.unwrap_or_else(|| {
            self.value_problem(
                spanned,
                format!("the value {value} does not fit a column of type {column_type}"),
            );
            Value::Bool(false)
        })
    }
}

fn time_value(text: &str, column_type: &ColumnType) -> Option<Value> {
    if let Some(time) = crate::config::pipeline::parse_wall_time(text) {
        return Some(if *column_type == ColumnType::Date {
            Value::Date(time.date())
        } else {
            Value::Timestamp(time)
        });
    }
    let date = NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").ok()?;
    Some(if *column_type == ColumnType::Date {
        Value::Date(date)
    } else {
        Value::Timestamp(date.and_hms_opt(0, 0, 0)?)
    })
}
