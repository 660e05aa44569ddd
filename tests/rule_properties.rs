//! The rule compiler against a reference: for random profiles, behaviour rows and segment
//! rules, the members segmentd's SQL selects are exactly the members a small in-memory
//! evaluator finds.
//!
//! The evaluator below is written from the README ("Configuration reference", segments and
//! "Missing values") and shares no code with the library: its own rule tree, its own tables as
//! vectors of rows, its own arithmetic on times. Its semantics:
//!
//! - A leaf condition on a missing value is false whatever its operator, except `is null`.
//!   `not` is logical negation, `all` and `any` are conjunction and disjunction.
//! - `between` includes both ends; `in` and `not in` test equality with the listed values.
//!   Numbers compare as numbers (an integer value with a fractional column too), text by its
//!   bytes, `false` before `true`, times chronologically.
//! - A behaviour condition aggregates the profile's behaviour rows that match its `where`
//!   filter and lie in its window `[as_of - N units, as_of]`, both ends included; with no
//!   `within`, every row of the profile counts. Minutes and hours are elapsed time, days and
//!   weeks calendar days, months and years calendar months, all on the naive wall clock (the
//!   wall clock and elapsed time differ across the change to summer time, see below).
//! - `count` counts rows and `count_distinct` the distinct present values; both are 0 over no
//!   rows. `sum`, `avg`, `min` and `max` ignore missing values and are missing over none, so
//!   any condition on them but `is null` is false.
//! - `segment = "name"` holds for the members of an earlier segment; an empty rule holds for
//!   every profile.
//! - Text tests (`contains`, `starts with`, `ends with`, `matches`) are case-sensitive and take
//!   their value literally (`%` and `_` are plain characters); `not ...` negates a present
//!   value only. `matches` finds the regular expression anywhere in the text.
//! - Relative times: `within last N units` is `[start, as_of]`, `within next N units` is
//!   `[as_of, end]`, `more than N units ago` is before `start`; `during` a calendar span is from
//!   its first midnight to the next span's. A DATE is in a window when its day is: from the
//!   start's day to the end's day, both included. Weeks run Monday to Sunday.
//! - `anniversary during` a span holds when the value's month and day fall in it in some year,
//!   29 February falling on the 28th in other years.
//! - List tests count how many of the listed values the list holds: `contains any` at least
//!   one, `contains all` every one, `contains none` none, `at least` / `at most` / `exactly`
//!   against `count`. A missing list (no attribute row, or null) fails them all.
//! - `first` and `last` take the value on the earliest or latest row with one; rows tied on
//!   time give the smallest value for `first` and the largest for `last`.
//!
//! The pipeline's time zone is Europe/London and `as_of` is the Sunday its clocks went forward
//! in 2024, at noon: minutes and hours are elapsed time across the lost hour, day units keep
//! the wall clock, and "1 month" before 31 March is 29 February.
//!
//! Amounts are multiples of 0.5 with small magnitudes, so sums are exact in any order and
//! averages are one correctly rounded division on both sides. Times cluster on the edges of
//! every window the rules use: `as_of`, the window's first instant, and a second either side.

mod common;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone};
use common::Project;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use segmentd::config::Config;
use segmentd::evaluate::Inputs;
use segmentd::store::Store;

/// The pinned evaluation instant, wall clock in London: a leap year, so "365 days" and "1 year"
/// differ by a day, and the day the clocks went forward from 01:00 to 02:00.
const AS_OF: &str = "2024-03-31 12:00:00";

/// The pipeline's time zone.
const ZONE: chrono_tz::Tz = chrono_tz::Europe::London;

/// Segment names, by position: segment `i` may refer to segments before it.
const SEGMENTS: [&str; 3] = ["first", "team/second", "team/nested/third"];

/// Values of the master table's text column, one with a quote, a comma and `--`.
const TIERS: [&str; 5] = ["gold", "Gold", "silver", "it's \"gold\", -- vip", "50%_off"];

/// Values of the attribute table's list column.
const TAGS: [&str; 4] = ["vip", "news", "it's", "a,b"];

/// Text a text test looks for: parts of the values above, LIKE's wildcards, a quote.
const PATTERNS: [&str; 10] = [
    "gold", "Gold", "old", "g", "it's", "\"", "--", "%", "_", "%_o",
];

/// Regular expressions a `matches` test uses.
const REGEXES: [&str; 6] = ["^g", "old$", "[Gg]old", "%_", "i.s", "^[a-z]+$"];

/// Values of the behaviour table's text column.
const KINDS: [&str; 3] = ["buy", "refund", "it's \"buy\", -- note"];

const PIPELINE: &str = r#"
time_zone = "Europe/London"
as_of = "2024-03-31 12:00:00"

[sources.people]
format = "csv"
path = "people.csv"
columns = { id = "BIGINT", tier = "VARCHAR", visits = "INTEGER", active = "BOOLEAN", joined = "TIMESTAMP", born = "DATE" }

[sources.labels]
format = "jsonl"
path = "labels.jsonl"
columns = { id = "BIGINT", tags = "VARCHAR[]" }

[sources.events]
format = "csv"
path = "events.csv"
columns = { id = "BIGINT", amount = "DOUBLE", kind = "VARCHAR", at = "TIMESTAMP" }

[master]
key = "id"
source = "people"
columns = { id = "BIGINT", tier = "VARCHAR", visits = "INTEGER", active = "BOOLEAN", joined = "TIMESTAMP", born = "DATE" }

[attributes.labels]
key = "id"
source = "labels"
columns = { id = "BIGINT", tags = "VARCHAR[]" }

[behaviours.events]
key = "id"
time = "at"
source = "events"
columns = { id = "BIGINT", amount = "DOUBLE", kind = "VARCHAR", at = "TIMESTAMP" }
"#;

// ---------------------------------------------------------------------------------------------
// The reference model: data, rules and their evaluation.
// ---------------------------------------------------------------------------------------------

/// A present value, in a table or in a rule.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    Time(NaiveDateTime),
    Date(NaiveDate),
}

impl Scalar {
    /// Orders two values of the same kind; numbers compare whatever their representation.
    fn compare(&self, other: &Scalar) -> Ordering {
        match (self, other) {
            (Scalar::Text(a), Scalar::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Scalar::Bool(a), Scalar::Bool(b)) => a.cmp(b),
            (Scalar::Time(a), Scalar::Time(b)) => a.cmp(b),
            (Scalar::Date(a), Scalar::Date(b)) => a.cmp(b),
            (a, b) => a.number().partial_cmp(&b.number()).expect("finite numbers"),
        }
    }

    fn number(&self) -> f64 {
        match self {
            Scalar::Int(i) => *i as f64,
            Scalar::Float(f) => *f,
            other => panic!("{other:?} is not a number"),
        }
    }

    /// The value as written in a TOML rule.
    fn toml(&self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => format!("{f:?}"),
            Scalar::Text(t) => toml_string(t),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Time(t) => toml_string(&wall_clock(*t)),
            Scalar::Date(d) => toml_string(&d.to_string()),
        }
    }

    /// The value as written in a CSV field.
    fn csv(&self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Text(t) => t.clone(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Time(t) => wall_clock(*t),
            Scalar::Date(d) => d.to_string(),
        }
    }
}

/// A row of the master table.
#[derive(Debug, Clone)]
struct Profile {
    id: i64,
    tier: Option<String>,
    visits: Option<i64>,
    active: Option<bool>,
    joined: Option<NaiveDateTime>,
    born: Option<NaiveDate>,
    /// The profile's row in the attribute table: `None` when it has none, then its list.
    labels: Option<Option<Vec<String>>>,
}

/// A row of the behaviour table `events`.
#[derive(Debug, Clone)]
struct Event {
    id: i64,
    amount: Option<f64>,
    kind: Option<String>,
    at: NaiveDateTime,
}

/// A column of the master table a rule may test.
#[derive(Debug, Clone, Copy)]
enum ProfileColumn {
    Tier,
    Visits,
    Active,
    Joined,
    Born,
}

/// A column of the behaviour table a filter or an aggregate may read.
#[derive(Debug, Clone, Copy)]
enum EventColumn {
    Amount,
    Kind,
    At,
}

impl ProfileColumn {
    fn name(self) -> &'static str {
        match self {
            ProfileColumn::Tier => "tier",
            ProfileColumn::Visits => "visits",
            ProfileColumn::Active => "active",
            ProfileColumn::Joined => "joined",
            ProfileColumn::Born => "born",
        }
    }

    fn read(self, profile: &Profile) -> Option<Scalar> {
        match self {
            ProfileColumn::Tier => profile.tier.clone().map(Scalar::Text),
            ProfileColumn::Visits => profile.visits.map(Scalar::Int),
            ProfileColumn::Active => profile.active.map(Scalar::Bool),
            ProfileColumn::Joined => profile.joined.map(Scalar::Time),
            ProfileColumn::Born => profile.born.map(Scalar::Date),
        }
    }
}

impl EventColumn {
    fn name(self) -> &'static str {
        match self {
            EventColumn::Amount => "amount",
            EventColumn::Kind => "kind",
            EventColumn::At => "at",
        }
    }

    fn read(self, event: &Event) -> Option<Scalar> {
        match self {
            EventColumn::Amount => event.amount.map(Scalar::Float),
            EventColumn::Kind => event.kind.clone().map(Scalar::Text),
            EventColumn::At => Some(Scalar::Time(event.at)),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// What a value must satisfy.
#[derive(Debug, Clone)]
enum Test {
    Compare(Op, Scalar),
    In(Vec<Scalar>),
    NotIn(Vec<Scalar>),
    Between(Scalar, Scalar),
    IsNull,
    IsNotNull,
    Text {
        op: TextOp,
        pattern: String,
        negated: bool,
    },
    Relative(Relative),
}

/// A test on text.
#[derive(Debug, Clone, Copy)]
enum TextOp {
    Contains,
    StartsWith,
    EndsWith,
    Matches,
}

/// A time relative to `as_of`.
#[derive(Debug, Clone, Copy)]
enum Relative {
    WithinLast(Window),
    WithinNext(Window),
    MoreThanAgo(Window),
    During(Span),
    Anniversary(Span),
}

/// A calendar unit of a span.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SpanUnit {
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

/// This (0), last (-1) or next (1) calendar unit.
#[derive(Debug, Clone, Copy)]
struct Span {
    unit: SpanUnit,
    offset: i32,
}

impl Span {
    fn text(self) -> String {
        let unit = match self.unit {
            SpanUnit::Day => "day",
            SpanUnit::Week => "week",
            SpanUnit::Month => "month",
            SpanUnit::Quarter => "quarter",
            SpanUnit::Year => "year",
        };
        let which = match self.offset {
            -1 => "last",
            0 => "this",
            _ => "next",
        };
        format!("{which} {unit}")
    }

    /// The span's first day and the first day after it.
    fn days(self, as_of: NaiveDateTime) -> (NaiveDate, NaiveDate) {
        let today = as_of.date();
        let month_start = |months_from_epoch: i64| {
            NaiveDate::from_ymd_opt(
                i32::try_from(months_from_epoch.div_euclid(12)).expect("a year"),
                u32::try_from(months_from_epoch.rem_euclid(12) + 1).expect("a month"),
                1,
            )
            .expect("a first of the month")
        };
        let this_month = i64::from(today.year()) * 12 + i64::from(today.month0());
        let offset = i64::from(self.offset);
        match self.unit {
            SpanUnit::Day => {
                let day = today + Duration::days(offset);
                (day, day + Duration::days(1))
            }
            SpanUnit::Week => {
                let monday =
                    today - Duration::days(i64::from(today.weekday().num_days_from_monday()));
                let first = monday + Duration::days(7 * offset);
                (first, first + Duration::days(7))
            }
            SpanUnit::Month => (
                month_start(this_month + offset),
                month_start(this_month + offset + 1),
            ),
            SpanUnit::Quarter => {
                let first = this_month - this_month.rem_euclid(3) + 3 * offset;
                (month_start(first), month_start(first + 3))
            }
            SpanUnit::Year => {
                let first = this_month - this_month.rem_euclid(12) + 12 * offset;
                (month_start(first), month_start(first + 12))
            }
        }
    }
}

/// The spans rules use.
fn spans() -> Vec<Span> {
    let mut spans = Vec::new();
    for unit in [
        SpanUnit::Day,
        SpanUnit::Week,
        SpanUnit::Month,
        SpanUnit::Quarter,
        SpanUnit::Year,
    ] {
        for offset in [-1, 0, 1] {
            spans.push(Span { unit, offset });
        }
    }
    spans
}

/// Whether a month and day recur inside `[first, after)` in some year; 29 February recurs on
/// the 28th in years without it.
fn recurs_in(month: u32, day: u32, first: NaiveDate, after: NaiveDate) -> bool {
    (first.year()..=after.year()).any(|year| {
        let date = NaiveDate::from_ymd_opt(year, month, day)
            .or_else(|| NaiveDate::from_ymd_opt(year, 2, 28).filter(|_| (month, day) == (2, 29)))
            .expect("a date");
        first <= date && date < after
    })
}

impl Relative {
    fn holds(self, value: &Scalar, as_of: NaiveDateTime) -> bool {
        // Bounds as instants; a DATE counts when its day does.
        let (time, date) = match value {
            Scalar::Time(t) => (Some(*t), None),
            Scalar::Date(d) => (None, Some(*d)),
            other => panic!("{other:?} is not a time"),
        };
        let in_range = |start: Option<NaiveDateTime>,
                        end: Option<NaiveDateTime>,
                        end_included: bool| match (time, date) {
            (Some(t), _) => {
                start.is_none_or(|s| s <= t)
                    && end.is_none_or(|e| if end_included { t <= e } else { t < e })
            }
            (_, Some(d)) => {
                start.is_none_or(|s| s.date() <= d)
                    && end.is_none_or(|e| {
                        if end_included {
                            d <= e.date()
                        } else {
                            d < e.date()
                        }
                    })
            }
            _ => unreachable!(),
        };
        match self {
            Relative::WithinLast(window) => in_range(Some(window.start(as_of)), Some(as_of), true),
            Relative::WithinNext(window) => in_range(Some(as_of), Some(window.end(as_of)), true),
            Relative::MoreThanAgo(window) => in_range(None, Some(window.start(as_of)), false),
            Relative::During(span) => {
                let (first, after) = span.days(as_of);
                let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight");
                in_range(Some(midnight(first)), Some(midnight(after)), false)
            }
            Relative::Anniversary(span) => {
                let day = time.map_or_else(|| date.expect("a date"), |t| t.date());
                let (first, after) = span.days(as_of);
                recurs_in(day.month(), day.day(), first, after)
            }
        }
    }

    fn toml(self) -> String {
        let (op, value) = match self {
            Relative::WithinLast(w) => ("within last", w.text()),
            Relative::WithinNext(w) => ("within next", w.text()),
            Relative::MoreThanAgo(w) => ("more than ago", w.text()),
            Relative::During(span) => ("during", span.text()),
            Relative::Anniversary(span) => ("anniversary during", span.text()),
        };
        format!("op = \"{op}\", value = \"{value}\"")
    }
}

/// A test on the list column `tags`.
#[derive(Debug, Clone)]
enum ListTest {
    Any(Vec<String>),
    All(Vec<String>),
    None(Vec<String>),
    AtLeast(Vec<String>, usize),
    AtMost(Vec<String>, usize),
    Exactly(Vec<String>, usize),
    IsNull,
    IsNotNull,
}

impl ListTest {
    fn holds(&self, list: Option<&Vec<String>>) -> bool {
        let Some(list) = list else {
            return matches!(self, ListTest::IsNull);
        };
        let held = |values: &[String]| {
            let mut distinct: Vec<&String> = values.iter().collect();
            distinct.sort();
            distinct.dedup();
            distinct.iter().filter(|v| list.contains(v)).count()
        };
        match self {
            ListTest::Any(values) => held(values) >= 1,
            ListTest::All(values) => {
                let mut distinct = values.clone();
                distinct.sort();
                distinct.dedup();
                held(values) == distinct.len()
            }
            ListTest::None(values) => held(values) == 0,
            ListTest::AtLeast(values, n) => held(values) >= *n,
            ListTest::AtMost(values, n) => held(values) <= *n,
            ListTest::Exactly(values, n) => held(values) == *n,
            ListTest::IsNull => false,
            ListTest::IsNotNull => true,
        }
    }

    fn toml(&self) -> String {
        let list = |values: &[String]| {
            let items: Vec<String> = values.iter().map(|v| toml_string(v)).collect();
            format!("[{}]", items.join(", "))
        };
        match self {
            ListTest::Any(v) => format!("op = \"contains any\", value = {}", list(v)),
            ListTest::All(v) => format!("op = \"contains all\", value = {}", list(v)),
            ListTest::None(v) => format!("op = \"contains none\", value = {}", list(v)),
            ListTest::AtLeast(v, n) => {
                format!(
                    "op = \"contains at least\", value = {}, count = {n}",
                    list(v)
                )
            }
            ListTest::AtMost(v, n) => {
                format!(
                    "op = \"contains at most\", value = {}, count = {n}",
                    list(v)
                )
            }
            ListTest::Exactly(v, n) => {
                format!(
                    "op = \"contains exactly\", value = {}, count = {n}",
                    list(v)
                )
            }
            ListTest::IsNull => "op = \"is null\"".to_string(),
            ListTest::IsNotNull => "op = \"is not null\"".to_string(),
        }
    }
}

impl Test {
    /// Whether a value, `None` when missing, satisfies the test at `as_of()`.
    fn holds(&self, value: Option<&Scalar>) -> bool {
        let Some(value) = value else {
            return matches!(self, Test::IsNull);
        };
        match self {
            Test::Compare(op, other) => {
                let order = value.compare(other);
                match op {
                    Op::Eq => order == Ordering::Equal,
                    Op::Ne => order != Ordering::Equal,
                    Op::Lt => order == Ordering::Less,
                    Op::Le => order != Ordering::Greater,
                    Op::Gt => order == Ordering::Greater,
                    Op::Ge => order != Ordering::Less,
                }
            }
            Test::In(values) => values.iter().any(|v| value.compare(v) == Ordering::Equal),
            Test::NotIn(values) => values.iter().all(|v| value.compare(v) != Ordering::Equal),
            Test::Between(low, high) => {
                value.compare(low) != Ordering::Less && value.compare(high) != Ordering::Greater
            }
            Test::IsNull => false,
            Test::IsNotNull => true,
            Test::Text {
                op,
                pattern,
                negated,
            } => {
                let Scalar::Text(text) = value else {
                    panic!("{value:?} is not text");
                };
                let found = match op {
                    TextOp::Contains => text.contains(pattern.as_str()),
                    TextOp::StartsWith => text.starts_with(pattern.as_str()),
                    TextOp::EndsWith => text.ends_with(pattern.as_str()),
                    TextOp::Matches => regex::Regex::new(pattern).expect("a regex").is_match(text),
                };
                found != *negated
            }
            Test::Relative(relative) => relative.holds(value, as_of()),
        }
    }

    /// `op = ..., value = ...` as written in a segment file.
    fn toml(&self) -> String {
        let list = |values: &[Scalar]| {
            let items: Vec<String> = values.iter().map(Scalar::toml).collect();
            format!("[{}]", items.join(", "))
        };
        match self {
            Test::Compare(op, value) => {
                let op = match op {
                    Op::Eq => "=",
                    Op::Ne => "!=",
                    Op::Lt => "<",
                    Op::Le => "<=",
                    Op::Gt => ">",
                    Op::Ge => ">=",
                };
                format!("op = \"{op}\", value = {}", value.toml())
            }
            Test::In(values) => format!("op = \"in\", value = {}", list(values)),
            Test::NotIn(values) => format!("op = \"not in\", value = {}", list(values)),
            Test::Between(low, high) => {
                format!(
                    "op = \"between\", value = {}",
                    list(&[low.clone(), high.clone()])
                )
            }
            Test::IsNull => "op = \"is null\"".to_string(),
            Test::IsNotNull => "op = \"is not null\"".to_string(),
            Test::Text {
                op,
                pattern,
                negated,
            } => {
                let op = match op {
                    TextOp::Contains => "contains",
                    TextOp::StartsWith => "starts with",
                    TextOp::EndsWith => "ends with",
                    TextOp::Matches => "matches",
                };
                let not = if *negated { "not " } else { "" };
                format!("op = \"{not}{op}\", value = {}", toml_string(pattern))
            }
            Test::Relative(relative) => relative.toml(),
        }
    }
}

/// A unit of a `within` window.
#[derive(Debug, Clone, Copy)]
enum Unit {
    Minutes,
    Hours,
    Days,
    Weeks,
    Months,
    Years,
}

/// `within = "<amount> <unit>"`.
#[derive(Debug, Clone, Copy)]
struct Window {
    amount: u32,
    unit: Unit,
}

/// The windows rules use; their edges are where the generated times cluster.
const WINDOWS: [Window; 9] = [
    Window {
        amount: 90,
        unit: Unit::Minutes,
    },
    Window {
        amount: 36,
        unit: Unit::Hours,
    },
    Window {
        amount: 0,
        unit: Unit::Days,
    },
    Window {
        amount: 1,
        unit: Unit::Days,
    },
    Window {
        amount: 30,
        unit: Unit::Days,
    },
    Window {
        amount: 365,
        unit: Unit::Days,
    },
    Window {
        amount: 2,
        unit: Unit::Weeks,
    },
    Window {
        amount: 1,
        unit: Unit::Months,
    },
    Window {
        amount: 1,
        unit: Unit::Years,
    },
];

impl Window {
    fn text(self) -> String {
        let unit = match self.unit {
            Unit::Minutes => "minutes",
            Unit::Hours => "hours",
            Unit::Days => "days",
            Unit::Weeks => "weeks",
            Unit::Months => "months",
            Unit::Years => "years",
        };
        format!("{} {unit}", self.amount)
    }

    /// The window's first instant: `amount` units before `as_of`.
    fn start(self, as_of: NaiveDateTime) -> NaiveDateTime {
        self.shift(as_of, -1)
    }

    /// The window's last instant when it runs forward: `amount` units after `as_of`.
    fn end(self, as_of: NaiveDateTime) -> NaiveDateTime {
        self.shift(as_of, 1)
    }

    /// `as_of` moved by the window in `direction` (1 or -1): minutes and hours as elapsed
    /// time in London, the other units on the wall clock, months clamped to their last day.
    fn shift(self, as_of: NaiveDateTime, direction: i64) -> NaiveDateTime {
        let amount = direction * i64::from(self.amount);
        let months = |months: i64| {
            let index = i64::from(as_of.year()) * 12 + i64::from(as_of.month0()) + months;
            let year = i32::try_from(index.div_euclid(12)).expect("a year");
            let month = u32::try_from(index.rem_euclid(12) + 1).expect("a month");
            let day = (1..=as_of.day())
                .rev()
                .find_map(|day| NaiveDate::from_ymd_opt(year, month, day))
                .expect("a day of the month");
            day.and_time(as_of.time())
        };
        let elapsed = |minutes: i64| {
            let utc = ZONE
                .from_local_datetime(&as_of)
                .single()
                .expect("as_of is one instant in London")
                .naive_utc();
            let moved = utc + Duration::minutes(minutes);
            ZONE.from_utc_datetime(&moved).naive_local()
        };
        match self.unit {
            Unit::Minutes => elapsed(amount),
            Unit::Hours => elapsed(60 * amount),
            Unit::Days => as_of + Duration::days(amount),
            Unit::Weeks => as_of + Duration::days(7 * amount),
            Unit::Months => months(amount),
            Unit::Years => months(12 * amount),
        }
    }
}

/// An aggregate over a profile's behaviour rows.
#[derive(Debug, Clone, Copy)]
enum Aggregate {
    Count,
    CountDistinct(EventColumn),
    Sum,
    Average,
    Min(EventColumn),
    Max(EventColumn),
    First(EventColumn),
    Last(EventColumn),
}

impl Aggregate {
    /// `aggregate = ..., column = ...` as written in a segment file; `count` is the default.
    fn toml(self) -> Option<String> {
        let (name, column) = match self {
            Aggregate::Count => return None,
            Aggregate::CountDistinct(column) => ("count_distinct", column),
            Aggregate::Sum => ("sum", EventColumn::Amount),
            Aggregate::Average => ("avg", EventColumn::Amount),
            Aggregate::Min(column) => ("min", column),
            Aggregate::Max(column) => ("max", column),
            Aggregate::First(column) => ("first", column),
            Aggregate::Last(column) => ("last", column),
        };
        Some(format!(
            "aggregate = \"{name}\", column = \"{}\"",
            column.name()
        ))
    }

    /// The aggregate of the rows, `None` when missing.
    fn over(self, rows: &[&Event]) -> Option<Scalar> {
        let present = |column: EventColumn| -> Vec<Scalar> {
            rows.iter().filter_map(|row| column.read(row)).collect()
        };
        let extreme = |column: EventColumn, wanted: Ordering| {
            present(column)
                .into_iter()
                .reduce(|a, b| if b.compare(&a) == wanted { b } else { a })
        };
        let amounts: Vec<f64> = present(EventColumn::Amount)
            .iter()
            .map(Scalar::number)
            .collect();
        match self {
            Aggregate::Count => Some(Scalar::Int(rows.len() as i64)),
            Aggregate::CountDistinct(column) => {
                let mut distinct: Vec<Scalar> = Vec::new();
                for value in present(column) {
                    if !distinct
                        .iter()
                        .any(|d| d.compare(&value) == Ordering::Equal)
                    {
                        distinct.push(value);
                    }
                }
                Some(Scalar::Int(distinct.len() as i64))
            }
            Aggregate::Sum if amounts.is_empty() => None,
            Aggregate::Sum => Some(Scalar::Float(amounts.iter().sum())),
            Aggregate::Average if amounts.is_empty() => None,
            Aggregate::Average => Some(Scalar::Float(
                amounts.iter().sum::<f64>() / amounts.len() as f64,
            )),
            Aggregate::Min(column) => extreme(column, Ordering::Less),
            Aggregate::Max(column) => extreme(column, Ordering::Greater),
            Aggregate::First(column) | Aggregate::Last(column) => {
                let last = matches!(self, Aggregate::Last(_));
                let by_time_then_value =
                    |a: &(NaiveDateTime, Scalar), b: &(NaiveDateTime, Scalar)| {
                        a.0.cmp(&b.0).then_with(|| a.1.compare(&b.1))
                    };
                let rows = rows
                    .iter()
                    .filter_map(|row| column.read(row).map(|v| (row.at, v)));
                let chosen = if last {
                    rows.max_by(by_time_then_value)
                } else {
                    rows.min_by(by_time_then_value)
                };
                chosen.map(|(_, value)| value)
            }
        }
    }
}

/// A `where` filter on behaviour rows.
#[derive(Debug, Clone)]
enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Column(EventColumn, Test),
}

impl Filter {
    fn holds(&self, event: &Event) -> bool {
        match self {
            Filter::All(filters) => filters.iter().all(|f| f.holds(event)),
            Filter::Any(filters) => filters.iter().any(|f| f.holds(event)),
            Filter::Not(filter) => !filter.holds(event),
            Filter::Column(column, test) => test.holds(column.read(event).as_ref()),
        }
    }

    fn toml(&self) -> String {
        match self {
            Filter::All(filters) | Filter::Any(filters) => {
                let key = if matches!(self, Filter::All(_)) {
                    "all"
                } else {
                    "any"
                };
                let items: Vec<String> = filters.iter().map(Filter::toml).collect();
                format!("{{ {key} = [{}] }}", items.join(", "))
            }
            Filter::Not(filter) => format!("{{ not = {} }}", filter.toml()),
            Filter::Column(column, test) => {
                format!("{{ column = \"{}\", {} }}", column.name(), test.toml())
            }
        }
    }
}

/// A behaviour condition on the `events` table.
#[derive(Debug, Clone)]
struct Behaviour {
    aggregate: Aggregate,
    window: Option<Window>,
    filter: Option<Filter>,
    test: Test,
}

/// A segment rule.
#[derive(Debug, Clone)]
enum Rule {
    All(Vec<Rule>),
    Any(Vec<Rule>),
    Not(Box<Rule>),
    /// Membership of the segment at this position in [`SEGMENTS`], an earlier one.
    Segment(usize),
    Attribute(ProfileColumn, Test),
    /// A test on the attribute table's list column `tags`.
    Tags(ListTest),
    Behaviour(Behaviour),
}

impl Rule {
    /// The rule's keys and values, as the lines of a `[rule]` table or inside an inline one.
    fn fields(&self) -> Vec<String> {
        match self {
            Rule::All(rules) | Rule::Any(rules) => {
                let key = if matches!(self, Rule::All(_)) {
                    "all"
                } else {
                    "any"
                };
                let items: Vec<String> = rules.iter().map(Rule::inline).collect();
                vec![format!("{key} = [{}]", items.join(", "))]
            }
            Rule::Not(rule) => vec![format!("not = {}", rule.inline())],
            Rule::Segment(index) => vec![format!("segment = {}", toml_string(SEGMENTS[*index]))],
            Rule::Attribute(column, test) => {
                vec![format!("attribute = \"{}\"", column.name()), test.toml()]
            }
            Rule::Tags(test) => vec!["attribute = \"tags\"".to_string(), test.toml()],
            Rule::Behaviour(behaviour) => {
                let mut fields = vec!["behaviour = \"events\"".to_string()];
                fields.extend(behaviour.aggregate.toml());
                if let Some(window) = behaviour.window {
                    fields.push(format!("within = \"{}\"", window.text()));
                }
                if let Some(filter) = &behaviour.filter {
                    fields.push(format!("where = {}", filter.toml()));
                }
                fields.push(behaviour.test.toml());
                fields
            }
        }
    }

    fn inline(&self) -> String {
        format!("{{ {} }}", self.fields().join(", "))
    }
}

/// One generated case: the two tables and the segments, in order.
#[derive(Debug, Clone)]
struct Case {
    profiles: Vec<Profile>,
    events: Vec<Event>,
    /// Each segment's rule; `None` is an empty rule.
    segments: Vec<Option<Rule>>,
}

/// The reference evaluation of every segment of a case at `as_of`.
struct Reference<'a> {
    case: &'a Case,
    as_of: NaiveDateTime,
    /// Members of the segments evaluated so far, by position.
    members: Vec<BTreeSet<i64>>,
}

impl Reference<'_> {
    fn evaluate(case: &Case) -> BTreeMap<String, BTreeSet<i64>> {
        let mut reference = Reference {
            case,
            as_of: as_of(),
            members: Vec::new(),
        };
        for rule in &case.segments {
            let members = case
                .profiles
                .iter()
                .filter(|profile| {
                    rule.as_ref()
                        .is_none_or(|rule| reference.holds(rule, profile))
                })
                .map(|profile| profile.id)
                .collect();
            reference.members.push(members);
        }
        SEGMENTS
            .iter()
            .map(|name| name.to_string())
            .zip(reference.members)
            .collect()
    }

    fn holds(&self, rule: &Rule, profile: &Profile) -> bool {
        match rule {
            Rule::All(rules) => rules.iter().all(|r| self.holds(r, profile)),
            Rule::Any(rules) => rules.iter().any(|r| self.holds(r, profile)),
            Rule::Not(rule) => !self.holds(rule, profile),
            Rule::Segment(index) => self.members[*index].contains(&profile.id),
            Rule::Attribute(column, test) => test.holds(column.read(profile).as_ref()),
            Rule::Tags(test) => test.holds(profile.labels.as_ref().and_then(Option::as_ref)),
            Rule::Behaviour(behaviour) => {
                let rows: Vec<&Event> = self
                    .case
                    .events
                    .iter()
                    .filter(|event| event.id == profile.id)
                    .filter(|event| {
                        behaviour.window.is_none_or(|window| {
                            window.start(self.as_of) <= event.at && event.at <= self.as_of
                        })
                    })
                    .filter(|event| behaviour.filter.as_ref().is_none_or(|f| f.holds(event)))
                    .collect();
                behaviour
                    .test
                    .holds(behaviour.aggregate.over(&rows).as_ref())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The system under test: a project folder, refreshed and evaluated through the library.
// ---------------------------------------------------------------------------------------------

fn as_of() -> NaiveDateTime {
    NaiveDateTime::parse_from_str(AS_OF, "%Y-%m-%d %H:%M:%S").expect("a time")
}

fn wall_clock(time: NaiveDateTime) -> String {
    time.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A CSV file; a missing value is an empty field.
fn csv(header: &[&str], rows: impl Iterator<Item = Vec<Option<Scalar>>>) -> String {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(header).expect("in memory");
    for row in rows {
        let fields: Vec<String> = row
            .iter()
            .map(|v| v.as_ref().map_or(String::new(), Scalar::csv))
            .collect();
        writer.write_record(&fields).expect("in memory");
    }
    String::from_utf8(writer.into_inner().expect("in memory")).expect("UTF-8")
}

/// The project's files for a case: path under the project folder and text.
fn project_files(case: &Case) -> Vec<(String, String)> {
    let people = case.profiles.iter().map(|p| {
        vec![
            Some(Scalar::Int(p.id)),
            p.tier.clone().map(Scalar::Text),
            p.visits.map(Scalar::Int),
            p.active.map(Scalar::Bool),
            p.joined.map(Scalar::Time),
            p.born.map(Scalar::Date),
        ]
    });
    let labels: String = case
        .profiles
        .iter()
        .filter_map(|p| {
            let tags = p.labels.as_ref()?;
            Some(format!(
                "{}\n",
                serde_json::json!({ "id": p.id, "tags": tags })
            ))
        })
        .collect();
    let events = case.events.iter().map(|e| {
        vec![
            Some(Scalar::Int(e.id)),
            e.amount.map(Scalar::Float),
            e.kind.clone().map(Scalar::Text),
            Some(Scalar::Time(e.at)),
        ]
    });
    let mut files = vec![
        (
            "pipelines/shop/pipeline.toml".to_string(),
            PIPELINE.to_string(),
        ),
        (
            "pipelines/shop/people.csv".to_string(),
            csv(
                &["id", "tier", "visits", "active", "joined", "born"],
                people,
            ),
        ),
        ("pipelines/shop/labels.jsonl".to_string(), labels),
        (
            "pipelines/shop/events.csv".to_string(),
            csv(&["id", "amount", "kind", "at"], events),
        ),
    ];
    for (name, rule) in SEGMENTS.iter().zip(&case.segments) {
        let mut text = String::new();
        if let Some(rule) = rule {
            writeln!(text, "rule = {}", rule.inline()).expect("a string");
        }
        files.push((format!("pipelines/shop/segments/{name}.toml"), text));
    }
    files
}

/// Refreshes and evaluates a case in a fresh project and returns each segment's members.
fn segmentd_members(case: &Case) -> Result<BTreeMap<String, BTreeSet<i64>>, String> {
    let project = Project::new();
    for (path, text) in project_files(case) {
        project.write(&path, &text);
    }
    let config = Config::load(&project.path("config.toml")).map_err(|p| p.to_string())?;
    let pipeline = config.pipeline("shop").map_err(|e| e.to_string())?;
    let store = Store::open(&config.daemon.database, "1GB", 1).map_err(|e| e.to_string())?;
    let connection = store.connection().map_err(|e| e.to_string())?;
    // An empty master segment is a case too: `force` passes the guard that refuses one.
    segmentd::refresh::refresh(&connection, pipeline, true).map_err(|e| e.to_string())?;
    let inputs = Inputs {
        data_fingerprint: "generated".to_string(),
        forced: false,
    };
    let as_of = pipeline.as_of.expect("pinned");
    segmentd::evaluate::evaluate(&connection, pipeline, 1, as_of, &inputs)
        .map_err(|e| format!("{e:#}"))?;

    let mut found: BTreeMap<String, BTreeSet<i64>> = SEGMENTS[..case.segments.len()]
        .iter()
        .map(|name| (name.to_string(), BTreeSet::new()))
        .collect();
    let mut statement = connection
        .prepare("SELECT segment, key FROM segmentd_state.memberships WHERE pipeline = 'shop'")
        .map_err(|e| e.to_string())?;
    let rows = statement
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(|e| e.to_string())?;
    for row in rows {
        let (segment, key) = row.map_err(|e| e.to_string())?;
        let key = key
            .parse()
            .map_err(|_| format!("key `{key}` is not a profile id"))?;
        found
            .get_mut(&segment)
            .ok_or(format!("unknown segment `{segment}`"))?
            .insert(key);
    }
    Ok(found)
}

/// Compares segmentd with the reference on one case.
fn agree(case: &Case) -> Result<(), TestCaseError> {
    let expected = Reference::evaluate(case);
    let found = segmentd_members(case).map_err(TestCaseError::fail)?;
    if found != expected {
        let files: String = project_files(case)
            .into_iter()
            .map(|(path, text)| format!("--- {path}\n{text}"))
            .collect();
        return Err(TestCaseError::fail(format!(
            "segmentd: {found:?}\nreference: {expected:?}\n{files}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Generators.
// ---------------------------------------------------------------------------------------------

/// A time near `as_of`: mostly on a window's edge or a second either side of it.
fn instant() -> BoxedStrategy<NaiveDateTime> {
    let as_of = as_of();
    let second = Duration::seconds(1);
    let mut edges = vec![as_of - second, as_of, as_of + second];
    for window in WINDOWS {
        for edge in [window.start(as_of), window.end(as_of)] {
            edges.extend([edge - second, edge, edge + second]);
        }
    }
    for span in spans() {
        for day in <[NaiveDate; 2]>::from(span.days(as_of)) {
            let midnight = day.and_hms_opt(0, 0, 0).expect("midnight");
            edges.extend([midnight - second, midnight, midnight + second]);
        }
    }
    prop_oneof![
        3 => select(edges),
        1 => (-40 * 24 * 60..=400 * 24 * 60i64).prop_map(move |m| as_of - Duration::minutes(m)),
    ]
    .boxed()
}

/// A date near `as_of`: mostly a day either side of a window's or a span's edge, or a
/// 29 February.
fn day() -> BoxedStrategy<NaiveDate> {
    let as_of = as_of();
    let one = Duration::days(1);
    let mut edges = Vec::new();
    for window in WINDOWS {
        for edge in [window.start(as_of).date(), window.end(as_of).date()] {
            edges.extend([edge - one, edge, edge + one]);
        }
    }
    for span in spans() {
        for edge in <[NaiveDate; 2]>::from(span.days(as_of)) {
            edges.extend([edge - one, edge]);
        }
    }
    for (year, month, day) in [(2020, 2, 29), (2023, 2, 28), (2023, 3, 1), (2024, 2, 29)] {
        edges.push(NaiveDate::from_ymd_opt(year, month, day).expect("a date"));
    }
    let today = as_of.date();
    prop_oneof![
        3 => select(edges),
        1 => (-800..=60i64).prop_map(move |d| today + Duration::days(d)),
    ]
    .boxed()
}

/// A multiple of 0.5 from `low` to `high`.
fn half(low: i64, high: i64) -> impl Strategy<Value = f64> {
    (2 * low..=2 * high).prop_map(|halves| halves as f64 / 2.0)
}

/// A rule value for a numeric column: an integer or a multiple of 0.5.
fn number(low: i64, high: i64) -> BoxedStrategy<Scalar> {
    prop_oneof![
        (low..=high).prop_map(Scalar::Int),
        half(low, high).prop_map(Scalar::Float)
    ]
    .boxed()
}

/// Text values a rule may look for: those in the data and one that is not.
fn text(values: &'static [&'static str]) -> BoxedStrategy<Scalar> {
    let mut choices: Vec<&str> = values.to_vec();
    choices.push("bronze");
    select(choices)
        .prop_map(|t| Scalar::Text(t.to_string()))
        .boxed()
}

fn time_value() -> BoxedStrategy<Scalar> {
    instant().prop_map(Scalar::Time).boxed()
}

fn date_value() -> BoxedStrategy<Scalar> {
    day().prop_map(Scalar::Date).boxed()
}

/// What kind of value a column holds, for the operators that only some kinds take.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Number,
    Text,
    Bool,
    Time,
}

/// A test with every operator the README lists for `kind`, on values from `values`.
fn test(kind: Kind, values: BoxedStrategy<Scalar>) -> BoxedStrategy<Test> {
    let op = select(vec![Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge]);
    let common = prop_oneof![
        4 => (op, values.clone()).prop_map(|(op, value)| Test::Compare(op, value)),
        1 => prop::collection::vec(values.clone(), 1..=3).prop_map(Test::In),
        1 => prop::collection::vec(values.clone(), 1..=3).prop_map(Test::NotIn),
        1 => (values.clone(), values).prop_map(|(low, high)| Test::Between(low, high)),
        1 => Just(Test::IsNull),
        1 => Just(Test::IsNotNull),
    ];
    match kind {
        Kind::Number | Kind::Bool => common.boxed(),
        Kind::Text => {
            let op = select(vec![TextOp::Contains, TextOp::StartsWith, TextOp::EndsWith]);
            let literal = (op, select(PATTERNS.to_vec()), any::<bool>()).prop_map(
                |(op, pattern, negated)| Test::Text {
                    op,
                    pattern: pattern.to_string(),
                    negated,
                },
            );
            let regex = (select(REGEXES.to_vec()), any::<bool>()).prop_map(|(pattern, negated)| {
                Test::Text {
                    op: TextOp::Matches,
                    pattern: pattern.to_string(),
                    negated,
                }
            });
            prop_oneof![3 => common, 2 => literal, 1 => regex].boxed()
        }
        Kind::Time => {
            let window = || select(WINDOWS.to_vec());
            let anniversary_spans: Vec<Span> = spans()
                .into_iter()
                .filter(|s| matches!(s.unit, SpanUnit::Day | SpanUnit::Week | SpanUnit::Month))
                .collect();
            let relative = prop_oneof![
                window().prop_map(Relative::WithinLast),
                window().prop_map(Relative::WithinNext),
                window().prop_map(Relative::MoreThanAgo),
                select(spans()).prop_map(Relative::During),
                select(anniversary_spans).prop_map(Relative::Anniversary),
            ];
            prop_oneof![1 => common, 1 => relative.prop_map(Test::Relative)].boxed()
        }
    }
}

/// A test on the list column.
fn list_test() -> BoxedStrategy<ListTest> {
    let mut choices: Vec<String> = TAGS.iter().map(|t| t.to_string()).collect();
    choices.push("none".to_string());
    let values = prop::collection::vec(select(choices), 1..=3);
    prop_oneof![
        values.clone().prop_map(ListTest::Any),
        values.clone().prop_map(ListTest::All),
        values.clone().prop_map(ListTest::None),
        (values.clone(), 0..=3usize).prop_map(|(v, n)| ListTest::AtLeast(v, n)),
        (values.clone(), 0..=3usize).prop_map(|(v, n)| ListTest::AtMost(v, n)),
        (values, 0..=3usize).prop_map(|(v, n)| ListTest::Exactly(v, n)),
        Just(ListTest::IsNull),
        Just(ListTest::IsNotNull),
    ]
    .boxed()
}

impl ProfileColumn {
    fn values(self) -> BoxedStrategy<Scalar> {
        match self {
            ProfileColumn::Tier => text(&TIERS),
            ProfileColumn::Visits => number(-3, 6),
            ProfileColumn::Active => any::<bool>().prop_map(Scalar::Bool).boxed(),
            ProfileColumn::Joined => time_value(),
            ProfileColumn::Born => date_value(),
        }
    }

    fn kind(self) -> Kind {
        match self {
            ProfileColumn::Tier => Kind::Text,
            ProfileColumn::Visits => Kind::Number,
            ProfileColumn::Active => Kind::Bool,
            ProfileColumn::Joined | ProfileColumn::Born => Kind::Time,
        }
    }
}

impl EventColumn {
    fn values(self) -> BoxedStrategy<Scalar> {
        match self {
            EventColumn::Amount => number(-5, 20),
            EventColumn::Kind => text(&KINDS),
            EventColumn::At => time_value(),
        }
    }

    fn kind(self) -> Kind {
        match self {
            EventColumn::Amount => Kind::Number,
            EventColumn::Kind => Kind::Text,
            EventColumn::At => Kind::Time,
        }
    }
}

impl Aggregate {
    /// Values its result is compared with.
    fn values(self) -> BoxedStrategy<Scalar> {
        match self {
            Aggregate::Count | Aggregate::CountDistinct(_) => number(0, 4),
            Aggregate::Sum => number(-5, 40),
            Aggregate::Average => number(-5, 20),
            Aggregate::Min(column)
            | Aggregate::Max(column)
            | Aggregate::First(column)
            | Aggregate::Last(column) => column.values(),
        }
    }

    fn kind(self) -> Kind {
        match self {
            Aggregate::Min(column)
            | Aggregate::Max(column)
            | Aggregate::First(column)
            | Aggregate::Last(column) => column.kind(),
            _ => Kind::Number,
        }
    }
}

fn event_column() -> impl Strategy<Value = EventColumn> {
    select(vec![
        EventColumn::Amount,
        EventColumn::Kind,
        EventColumn::At,
    ])
}

fn filter() -> BoxedStrategy<Filter> {
    let leaf = event_column().prop_flat_map(|column| {
        test(column.kind(), column.values()).prop_map(move |t| Filter::Column(column, t))
    });
    leaf.prop_recursive(2, 6, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..=3).prop_map(Filter::All),
            prop::collection::vec(inner.clone(), 1..=3).prop_map(Filter::Any),
            inner.prop_map(|f| Filter::Not(Box::new(f))),
        ]
    })
    .boxed()
}

fn behaviour() -> BoxedStrategy<Rule> {
    let aggregate = prop_oneof![
        Just(Aggregate::Count),
        event_column().prop_map(Aggregate::CountDistinct),
        Just(Aggregate::Sum),
        Just(Aggregate::Average),
        event_column().prop_map(Aggregate::Min),
        event_column().prop_map(Aggregate::Max),
        event_column().prop_map(Aggregate::First),
        event_column().prop_map(Aggregate::Last),
    ];
    aggregate
        .prop_flat_map(|aggregate| {
            let window = prop::option::weighted(0.7, select(WINDOWS.to_vec()));
            let filter = prop::option::weighted(0.4, filter());
            (window, filter, test(aggregate.kind(), aggregate.values())).prop_map(
                move |(window, filter, test)| {
                    Rule::Behaviour(Behaviour {
                        aggregate,
                        window,
                        filter,
                        test,
                    })
                },
            )
        })
        .boxed()
}

fn attribute() -> BoxedStrategy<Rule> {
    let column = select(vec![
        ProfileColumn::Tier,
        ProfileColumn::Visits,
        ProfileColumn::Active,
        ProfileColumn::Joined,
        ProfileColumn::Born,
    ]);
    let attribute = column.prop_flat_map(|column| {
        test(column.kind(), column.values()).prop_map(move |t| Rule::Attribute(column, t))
    });
    prop_oneof![5 => attribute, 1 => list_test().prop_map(Rule::Tags)].boxed()
}

/// A rule of segment `position`, nested up to three groups deep, referring only to earlier
/// segments.
fn rule(position: usize) -> BoxedStrategy<Rule> {
    let leaf = if position == 0 {
        prop_oneof![attribute(), behaviour()].boxed()
    } else {
        prop_oneof![2 => attribute(), 2 => behaviour(), 1 => (0..position).prop_map(Rule::Segment)]
            .boxed()
    };
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..=3).prop_map(Rule::All),
            prop::collection::vec(inner.clone(), 1..=3).prop_map(Rule::Any),
            inner.prop_map(|r| Rule::Not(Box::new(r))),
        ]
    })
    .boxed()
}

fn profile(id: i64) -> impl Strategy<Value = Profile> {
    (
        prop::option::weighted(0.8, select(TIERS.to_vec())),
        prop::option::weighted(0.8, -2..=5i64),
        prop::option::weighted(0.8, any::<bool>()),
        prop::option::weighted(0.8, instant()),
        prop::option::weighted(0.8, day()),
        prop::option::weighted(
            0.8,
            prop::option::weighted(0.85, prop::collection::vec(select(TAGS.to_vec()), 0..=3)),
        ),
    )
        .prop_map(
            move |(tier, visits, active, joined, born, labels)| Profile {
                id,
                tier: tier.map(str::to_string),
                visits,
                active,
                joined,
                born,
                labels: labels
                    .map(|l| l.map(|tags| tags.into_iter().map(str::to_string).collect())),
            },
        )
}

/// A behaviour row, mostly of one of the `profiles` profiles (ids 1 to `profiles`), else of
/// a key the master table does not have.
fn event(profiles: i64) -> impl Strategy<Value = Event> {
    let id = prop_oneof![4 => 1..=profiles.max(1), 1 => Just(99i64)];
    (
        id,
        prop::option::weighted(0.85, half(-5, 20)),
        prop::option::weighted(0.85, select(KINDS.to_vec())),
        instant(),
    )
        .prop_map(|(id, amount, kind, at)| Event {
            id,
            amount,
            kind: kind.map(str::to_string),
            at,
        })
}

fn case() -> impl Strategy<Value = Case> {
    let tables = (0..12i64)
        .prop_flat_map(|count| (1..=count).map(profile).collect::<Vec<_>>())
        .prop_flat_map(|profiles| {
            let events = prop::collection::vec(event(profiles.len() as i64), 0..30);
            (Just(profiles), events)
        });
    let segments = (1..=SEGMENTS.len()).prop_flat_map(|count| {
        (0..count)
            .map(|i| prop::option::weighted(0.95, rule(i)))
            .collect::<Vec<_>>()
    });
    (tables, segments).prop_map(|((profiles, events), segments)| Case {
        profiles,
        events,
        segments,
    })
}

// ---------------------------------------------------------------------------------------------
// The property.
// ---------------------------------------------------------------------------------------------

proptest! {
    // 256 cases, each a fresh project refreshed and evaluated: about 20 seconds on 2 cores in a
    // debug build. `PROPTEST_CASES` runs more.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn compiled_segments_select_the_members_the_reference_finds(case in case()) {
        agree(&case)?;
    }
}

/// The reference itself, on the README's examples of missing values.
#[test]
fn reference_follows_the_readme_on_missing_values() {
    let profile = |id, tier: Option<&str>| Profile {
        id,
        tier: tier.map(str::to_string),
        visits: None,
        active: None,
        joined: None,
        born: None,
        labels: None,
    };
    let gold = Scalar::Text("gold".to_string());
    let is_gold = Rule::Attribute(ProfileColumn::Tier, Test::Compare(Op::Eq, gold.clone()));
    let bought = |test| {
        Rule::Behaviour(Behaviour {
            aggregate: Aggregate::Count,
            window: None,
            filter: None,
            test,
        })
    };
    let spent = |test| {
        Rule::Behaviour(Behaviour {
            aggregate: Aggregate::Sum,
            window: None,
            filter: None,
            test,
        })
    };
    let case = Case {
        profiles: vec![
            profile(1, Some("gold")),
            profile(2, Some("silver")),
            profile(3, None),
        ],
        events: vec![Event {
            id: 1,
            amount: Some(5.0),
            kind: None,
            at: as_of(),
        }],
        segments: vec![
            Some(Rule::Attribute(
                ProfileColumn::Tier,
                Test::Compare(Op::Ne, gold.clone()),
            )),
            Some(Rule::Attribute(
                ProfileColumn::Tier,
                Test::NotIn(vec![gold]),
            )),
            Some(Rule::Not(Box::new(is_gold))),
        ],
    };
    let members = Reference::evaluate(&case);
    assert_eq!(members["first"], BTreeSet::from([2]));
    assert_eq!(members["team/second"], BTreeSet::from([2]));
    assert_eq!(members["team/nested/third"], BTreeSet::from([2, 3]));

    let case = Case {
        segments: vec![
            Some(bought(Test::Compare(Op::Eq, Scalar::Int(0)))),
            Some(spent(Test::Compare(Op::Le, Scalar::Int(5)))),
            Some(spent(Test::IsNull)),
        ],
        ..case
    };
    let members = Reference::evaluate(&case);
    assert_eq!(members["first"], BTreeSet::from([2, 3]));
    assert_eq!(members["team/second"], BTreeSet::from([1]));
    assert_eq!(members["team/nested/third"], BTreeSet::from([2, 3]));
}
