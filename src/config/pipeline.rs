//! `pipelines/<name>/pipeline.toml`: one master segment.
//!
//! A pipeline names its sources (files read by DuckDB with declared column types), the master
//! table (one row per profile, keyed), 1:1 attribute tables and 1:N behaviour tables (each with
//! a time column), its time zone, its schedule and an optional pinned `as_of`. This module
//! checks all of that and then loads the pipeline's segments; it reads no data. When the file
//! does not parse, or its tables have problems, the segments are still loaded and checked as
//! far as they can be without the tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::NaiveDateTime;
use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

use super::{DaemonConfig, Problem, Skipped, SourceText, is_identifier, read_text, segment};
use crate::rules::Catalog;
use crate::schema::ColumnType;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    description: Option<String>,
    time_zone: Option<Spanned<String>>,
    schedule: Option<Spanned<String>>,
    as_of: Option<Spanned<String>>,
    #[serde(default)]
    sources: IndexMap<String, Spanned<RawSource>>,
    master: Option<Spanned<RawTable>>,
    #[serde(default)]
    attributes: IndexMap<String, Spanned<RawTable>>,
    #[serde(default)]
    behaviours: IndexMap<String, Spanned<RawTable>>,
    #[serde(default)]
    guards: RawGuards,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuards {
    min_profiles: Option<Spanned<u64>>,
    max_shrink_share: Option<Spanned<f64>>,
}

/// Checks on a refreshed master segment before it replaces the live one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guards {
    /// Fewer profiles than this refuses the refresh (`min_profiles`, default 1: an empty
    /// master segment is refused).
    pub min_profiles: u64,
    /// A master segment smaller than the live one by more than this share refuses the
    /// refresh (`max_shrink_share`, default 0.5).
    pub max_shrink_share: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    format: Spanned<String>,
    path: Spanned<String>,
    delimiter: Option<Spanned<String>>,
    header: Option<bool>,
    columns: Spanned<IndexMap<String, Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    key: Spanned<String>,
    time: Option<Spanned<String>>,
    source: Option<Spanned<String>>,
    sql: Option<Spanned<String>>,
    columns: Spanned<IndexMap<String, Spanned<String>>>,
}

/// One validated pipeline: a master segment and its segments.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The folder's name; also the DuckDB schema holding its tables.
    pub name: String,
    /// The pipeline's folder.
    pub dir: PathBuf,
    /// Its `pipeline.toml`.
    pub file: PathBuf,
    /// What it is for.
    pub description: String,
    /// The IANA time zone that timestamps in the data and calendar windows are in.
    pub time_zone: chrono_tz::Tz,
    /// A six-field cron expression (seconds first), in UTC.
    pub schedule: Option<String>,
    /// A pinned evaluation instant, as wall-clock time in `time_zone`, for reproducible runs.
    pub as_of: Option<NaiveDateTime>,
    /// The sources, in file order.
    pub sources: Vec<SourceDef>,
    /// The master table.
    pub master: TableDef,
    /// 1:1 attribute tables.
    pub attributes: Vec<TableDef>,
    /// 1:N behaviour tables.
    pub behaviours: Vec<TableDef>,
    /// The segments, in dependency order (a segment after those it refers to).
    pub segments: Vec<segment::SegmentDef>,
    /// Refusals of a suspicious refresh.
    pub guards: Guards,
}

impl Pipeline {
    /// The DuckDB schema that holds this pipeline's live tables.
    pub fn schema(&self) -> String {
        format!("pipeline_{}", self.name)
    }

    /// The segment called `name`, or an error listing the segments there are.
    pub fn segment(&self, name: &str) -> anyhow::Result<&segment::SegmentDef> {
        self.segments
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.segments.iter().map(|s| s.name.as_str()).collect();
                anyhow::anyhow!(
                    "pipeline `{}` has no segment `{name}`; its segments: {}",
                    self.name,
                    known.join(", ")
                )
            })
    }

    /// Every table of the master segment: master, attributes, behaviours.
    pub fn tables(&self) -> impl Iterator<Item = &TableDef> {
        std::iter::once(&self.master)
            .chain(&self.attributes)
            .chain(&self.behaviours)
    }
}

/// How a source file is encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFormat {
    /// Delimited text, optionally gzip-compressed (by the `.gz` ending).
    Csv {
        /// The field delimiter.
        delimiter: String,
        /// Whether the first line names the columns.
        header: bool,
    },
    /// Apache Parquet.
    Parquet,
    /// One JSON object per line.
    JsonLines,
}

/// One source file with its declared columns.
#[derive(Debug, Clone)]
pub struct SourceDef {
    /// The source's name; SQL in table definitions refers to it by this name.
    pub name: String,
    /// How the file is encoded.
    pub format: SourceFormat,
    /// The file, resolved against the pipeline folder.
    pub path: PathBuf,
    /// Declared columns in order.
    pub columns: Vec<(String, ColumnType)>,
}

/// Which part of the master segment a table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableRole {
    /// The master table: one row per profile.
    Master,
    /// A 1:1 attribute table.
    Attribute,
    /// A 1:N behaviour table with a time column.
    Behaviour,
}

/// Where a table's rows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableFrom {
    /// The named source's rows, declared columns picked by name.
    Source(String),
    /// A query over the sources.
    Sql(String),
}

/// One table of the master segment.
#[derive(Debug, Clone)]
pub struct TableDef {
    /// The table's name (`master` for the master table).
    pub name: String,
    /// Its part in the master segment.
    pub role: TableRole,
    /// The profile key column.
    pub key: String,
    /// The time column, for behaviour tables.
    pub time: Option<String>,
    /// Where its rows come from.
    pub from: TableFrom,
    /// Declared columns in order.
    pub columns: Vec<(String, ColumnType)>,
}

impl TableDef {
    /// The table's name in the pipeline's DuckDB schema.
    pub fn table_name(&self) -> String {
        match self.role {
            TableRole::Master => "master".into(),
            TableRole::Attribute => format!("attribute_{}", self.name),
            TableRole::Behaviour => format!("behaviour_{}", self.name),
        }
    }

    /// The declared type of a column.
    pub fn column_type(&self, column: &str) -> Option<&ColumnType> {
        self.columns
            .iter()
            .find(|(name, _)| name == column)
            .map(|(_, t)| t)
    }
}

/// What the segments of a pipeline whose tables cannot be used were not checked for.
const SEGMENTS_FORM_ONLY: &str = "so its segments' rules were checked for their form only, not \
     against its columns and behaviours, nor their activations' identifiers";

/// Loads and checks `<dir>/pipeline.toml` and the pipeline's segments. Without `daemon`
/// (`config.toml` has problems) activations are not checked against connections.
pub(super) fn load(
    dir: &Path,
    daemon: Option<&DaemonConfig>,
    problems: &mut Vec<Problem>,
    skipped: &mut Vec<Skipped>,
) -> Option<Pipeline> {
    let file = dir.join("pipeline.toml");
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = match read_text(&file) {
        Ok(text) => text,
        Err(problem) => {
            problems.push(problem);
            return None;
        }
    };
    let source = SourceText {
        path: &file,
        text: &text,
    };
    if !is_identifier(&name) {
        problems.push(source.problem(format!(
            "the pipeline folder `{name}` must be named in lower case letters, digits and `_`, \
             starting with a letter"
        )));
        return None;
    }
    let raw: RawPipeline = match source.parse() {
        Ok(raw) => raw,
        Err(problem) => {
            problems.push(problem);
            skipped.push(Skipped {
                file: file.clone(),
                message: format!("does not parse, {SEGMENTS_FORM_ONLY}"),
            });
            segment::load_all(dir, &name, None, daemon, problems);
            return None;
        }
    };
    let before = problems.len();

    let time_zone = match &raw.time_zone {
        Some(zone) => chrono_tz::Tz::from_str(zone.get_ref()).unwrap_or_else(|_| {
            problems.push(source.problem_at(
                zone,
                format!(
                    "time_zone `{}` is not an IANA time zone name such as \"Europe/London\"",
                    zone.get_ref()
                ),
            ));
            chrono_tz::UTC
        }),
        None => chrono_tz::UTC,
    };

    if let Some(schedule) = &raw.schedule
        && let Err(message) = crate::scheduler::check_schedule(schedule.get_ref())
    {
        problems.push(source.problem_at(schedule, message));
    }

    let as_of = raw
        .as_of
        .as_ref()
        .and_then(|as_of| match parse_wall_time(as_of.get_ref()) {
            Some(time) => Some(time),
            None => {
                problems.push(source.problem_at(
                    as_of,
                    format!(
                        "as_of `{}` is not a time such as \"2011-12-09 12:50:00\" (wall-clock time \
                     in the pipeline's time_zone)",
                        as_of.get_ref()
                    ),
                ));
                None
            }
        });

    let before_tables = problems.len();
    let sources: Vec<SourceDef> = raw
        .sources
        .iter()
        .filter_map(|(name, raw)| check_source(&source, dir, name, raw, problems))
        .collect();

    let master = match &raw.master {
        Some(master) => check_table(
            &source,
            "master",
            TableRole::Master,
            master,
            &sources,
            problems,
        ),
        None => {
            problems.push(source.problem("the [master] table is missing"));
            None
        }
    };
    let attributes: Vec<TableDef> = raw
        .attributes
        .iter()
        .filter_map(|(name, raw)| {
            check_table(&source, name, TableRole::Attribute, raw, &sources, problems)
        })
        .collect();
    let behaviours: Vec<TableDef> = raw
        .behaviours
        .iter()
        .filter_map(|(name, raw)| {
            check_table(&source, name, TableRole::Behaviour, raw, &sources, problems)
        })
        .collect();

    let tables_checked = problems.len() == before_tables;

    let guards = Guards {
        min_profiles: raw.guards.min_profiles.as_ref().map_or(1, |m| *m.get_ref()),
        max_shrink_share: match &raw.guards.max_shrink_share {
            Some(share) if !(0.0..=1.0).contains(share.get_ref()) => {
                problems.push(source.problem_at(
                    share,
                    "guards.max_shrink_share is a share from 0 to 1, such as 0.5",
                ));
                0.5
            }
            Some(share) => *share.get_ref(),
            None => 0.5,
        },
    };

    // The segments are checked against the tables when they are sound, even when other
    // settings of the pipeline have problems.
    let catalog = match &master {
        Some(master) if tables_checked => match Catalog::new(master, &attributes, &behaviours) {
            Ok(catalog) => Some(catalog),
            Err(message) => {
                problems.push(source.problem(message));
                None
            }
        },
        _ => None,
    };
    if catalog.is_none() {
        skipped.push(Skipped {
            file: file.clone(),
            message: format!("has problems in its sources or tables, {SEGMENTS_FORM_ONLY}"),
        });
    }
    let segments = segment::load_all(dir, &name, catalog.as_ref(), daemon, problems);

    let master = master?;
    if problems.len() > before {
        return None;
    }

    Some(Pipeline {
        name,
        dir: dir.to_path_buf(),
        file: file.clone(),
        description: raw.description.unwrap_or_default(),
        time_zone,
        schedule: raw.schedule.map(Spanned::into_inner),
        as_of,
        sources,
        master,
        attributes,
        behaviours,
        segments,
        guards,
    })
}

/// Parses a wall-clock time written `YYYY-MM-DD HH:MM:SS` (or with a `T`).
pub fn parse_wall_time(text: &str) -> Option<NaiveDateTime> {
    [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|format| NaiveDateTime::parse_from_str(text.trim(), format).ok())
}

fn check_columns(
    source: &SourceText<'_>,
    owner: &str,
    columns: &Spanned<IndexMap<String, Spanned<String>>>,
    problems: &mut Vec<Problem>,
) -> Vec<(String, ColumnType)> {
    if columns.get_ref().is_empty() {
        problems.push(source.problem_at(columns, format!("{owner}: `columns` declares none")));
    }
    columns
        .get_ref()
        .iter()
        .filter_map(
            |(name, declared)| match ColumnType::parse(declared.get_ref()) {
                Ok(column_type) => Some((name.clone(), column_type)),
                Err(message) => {
                    problems.push(
                        source.problem_at(declared, format!("{owner}, column `{name}`: {message}")),
                    );
                    None
                }
            },
        )
        .collect()
}

fn check_source(
    source: &SourceText<'_>,
    dir: &Path,
    name: &str,
    raw: &Spanned<RawSource>,
    problems: &mut Vec<Problem>,
) -> Option<SourceDef> {
    let owner = format!("source `{name}`");
    let before = problems.len();
    let spec = raw.get_ref();
    if !is_identifier(name) {
        problems.push(source.problem_at(
            raw,
            format!(
                "{owner}: names are lower case letters, digits and `_`, starting with a letter"
            ),
        ));
    }
    let format = match spec.format.get_ref().as_str() {
        "csv" => SourceFormat::Csv {
            delimiter: spec
                .delimiter
                .as_ref()
                .map(|d| d.get_ref().clone())
                .unwrap_or(",".into()),
            header: spec.header.unwrap_or(true),
        },
        "parquet" => SourceFormat::Parquet,
        "jsonl" => SourceFormat::JsonLines,
        other => {
            problems.push(source.problem_at(
                &spec.format,
                format!("{owner}: format `{other}` is not one of csv, parquet, jsonl"),
            ));
            SourceFormat::Parquet
        }
    };
    if let Some(delimiter) = &spec.delimiter {
        if !matches!(format, SourceFormat::Csv { .. }) {
            problems.push(source.problem_at(delimiter, format!("{owner}: `delimiter` is for csv")));
        } else if delimiter.get_ref().chars().count() != 1 {
            problems.push(source.problem_at(
                delimiter,
                format!("{owner}: `delimiter` must be one character, such as \",\" or \";\""),
            ));
        }
    }
    let columns = check_columns(source, &owner, &spec.columns, problems);
    if problems.len() > before {
        return None;
    }
    Some(SourceDef {
        name: name.to_string(),
        format,
        path: dir.join(spec.path.get_ref()),
        columns,
    })
}

fn check_table(
    source: &SourceText<'_>,
    name: &str,
    role: TableRole,
    raw: &Spanned<RawTable>,
    sources: &[SourceDef],
    problems: &mut Vec<Problem>,
) -> Option<TableDef> {
    let owner = match role {
        TableRole::Master => "[master]".to_string(),
        TableRole::Attribute => format!("attribute table `{name}`"),
        TableRole::Behaviour => format!("behaviour table `{name}`"),
    };
    let before = problems.len();
    let spec = raw.get_ref();
    if !is_identifier(name) {
        problems.push(source.problem_at(
            raw,
            format!(
                "{owner}: names are lower case letters, digits and `_`, starting with a letter"
            ),
        ));
    }
    let columns = check_columns(source, &owner, &spec.columns, problems);
    let declared: BTreeMap<&str, &ColumnType> =
        columns.iter().map(|(n, t)| (n.as_str(), t)).collect();

    let key = spec.key.get_ref().clone();
    match declared.get(key.as_str()) {
        Some(ColumnType::List(_)) | Some(ColumnType::Boolean) => problems.push(source.problem_at(
            &spec.key,
            format!("{owner}: the key `{key}` must be text, a number or a date"),
        )),
        Some(_) => {}
        None => problems.push(source.problem_at(
            &spec.key,
            format!("{owner}: the key `{key}` is not among its declared columns"),
        )),
    }

    let time = spec.time.as_ref().map(|t| t.get_ref().clone());
    match (role, &spec.time) {
        (TableRole::Behaviour, None) => problems.push(source.problem_at(
            raw,
            format!(
                "{owner}: behaviour tables need `time`, the column holding when each row happened"
            ),
        )),
        (TableRole::Behaviour, Some(time)) => match declared.get(time.get_ref().as_str()) {
            Some(ColumnType::Timestamp) | Some(ColumnType::Date) => {}
            Some(other) => problems.push(source.problem_at(
                time,
                format!(
                    "{owner}: the time column `{}` is {other}; it must be TIMESTAMP or DATE",
                    time.get_ref()
                ),
            )),
            None => problems.push(source.problem_at(
                time,
                format!(
                    "{owner}: the time column `{}` is not among its declared columns",
                    time.get_ref()
                ),
            )),
        },
        (_, Some(time)) => problems.push(source.problem_at(
            time,
            format!("{owner}: only behaviour tables have a `time` column"),
        )),
        (_, None) => {}
    }

    let from = match (&spec.source, &spec.sql) {
        (Some(name), None) => {
            match sources.iter().find(|s| &s.name == name.get_ref()) {
                Some(found) => {
                    for (column, _) in &columns {
                        if !found.columns.iter().any(|(c, _)| c == column) {
                            problems.push(source.problem_at(
                                name,
                                format!(
                                    "{owner}: column `{column}` is not declared by source `{}`; \
                                     declare it there or build the table with `sql`",
                                    found.name
                                ),
                            ));
                        }
                    }
                }
                None => problems.push(source.problem_at(
                    name,
                    format!("{owner}: there is no source `{}`", name.get_ref()),
                )),
            }
            TableFrom::Source(name.get_ref().clone())
        }
        (None, Some(sql)) => TableFrom::Sql(sql.get_ref().clone()),
        _ => {
            problems.push(source.problem_at(
                raw,
                format!("{owner}: give exactly one of `source` (a source's name) or `sql`"),
            ));
            TableFrom::Sql(String::new())
        }
    };

    if problems.len() > before {
        return None;
    }
    Some(TableDef {
        name: name.to_string(),
        role,
        key,
        time,
        from,
        columns,
    })
}
