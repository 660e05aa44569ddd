//! Master segment refresh: sources into staging tables, checks, then one swap.
//!
//! Each source file is read by DuckDB as text and cast to its declared types, so a value that
//! does not fit is an error naming the source, the column and the line rather than a silently
//! changed type. The master, attribute and behaviour tables are built from the sources into
//! staging tables next to the live ones, checked (keys present and unique where they must be),
//! and only then swapped in, all in one transaction. A refresh that fails at any step drops its
//! staging tables and leaves the live tables, memberships and acknowledged state as they were.

use std::path::Path;

use duckdb::Connection;

use crate::config::Pipeline;
use crate::config::pipeline::{SourceDef, SourceFormat, TableDef, TableFrom, TableRole};
use crate::schema::{ColumnType, quote_ident, quote_literal};
use crate::store::{Doing, StoreError, in_transaction};

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// A source could not be read or does not match its declaration.
    #[error("source `{source_name}` ({path}): {message}")]
    Source {
        /// The source's name.
        source_name: String,
        /// Its file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A master segment table could not be built or failed a check.
    #[error("{table}: {message}")]
    Table {
        /// Which table (`master`, `attribute table x`, `behaviour table y`).
        table: String,
        /// What is wrong.
        message: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The refreshed master segment broke a guard; nothing was changed.
    #[error(
        "refresh refused: {message}; the previous master segment stays. If this is expected, \
         run again with --force"
    )]
    Guard {
        /// Which guard and by how much.
        message: String,
    },
}

/// What a successful refresh loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshReport {
    /// Rows per source, in pipeline order.
    pub source_rows: Vec<(String, i64)>,
    /// Profiles in the master table.
    pub profiles: i64,
}

/// Refreshes the pipeline's master segment. On error, or when a guard refuses the result
/// (unless `force`), nothing live has changed.
pub fn refresh(
    connection: &Connection,
    pipeline: &Pipeline,
    force: bool,
) -> Result<RefreshReport, RefreshError> {
    let live = quote_ident(&pipeline.schema());
    connection
        .execute_batch(&format!("CREATE SCHEMA IF NOT EXISTS {live};"))
        .doing("preparing the pipeline's schema")?;
    let result = stage(connection, pipeline, &live, STAGING).and_then(|report| {
        if !force {
            check_guards(connection, pipeline, &live, report.profiles)?;
        }
        swap(connection, pipeline, &live)?;
        Ok(report)
    });
    drop_staging(connection, pipeline, &live, STAGING);
    result
}

/// Builds the master segment from the sources into `schema` under the tables' own names,
/// leaving the live tables alone: what a plan evaluates against. The caller drops `schema`.
pub fn build_into(
    connection: &Connection,
    pipeline: &Pipeline,
    schema: &str,
) -> Result<RefreshReport, RefreshError> {
    let schema = quote_ident(schema);
    connection
        .execute_batch(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};"
        ))
        .doing("preparing the plan's schema")?;
    stage(connection, pipeline, &schema, "")
}

/// The suffix of staging tables next to the live ones.
const STAGING: &str = "__staging";

fn drop_staging(connection: &Connection, pipeline: &Pipeline, schema: &str, suffix: &str) {
    for table in pipeline.tables() {
        let staging = quote_ident(&format!("{}{suffix}", table.table_name()));
        let _ = connection.execute_batch(&format!("DROP TABLE IF EXISTS {schema}.{staging};"));
    }
}

/// Loads the sources and builds every table as `<schema>.<table><suffix>`, with key checks.
fn stage(
    connection: &Connection,
    pipeline: &Pipeline,
    schema: &str,
    suffix: &str,
) -> Result<RefreshReport, RefreshError> {
    let sources = quote_ident(&format!("{}_sources", pipeline.schema()));
    connection
        .execute_batch(&format!(
            "DROP SCHEMA IF EXISTS {sources} CASCADE; CREATE SCHEMA {sources};"
        ))
        .doing("preparing the sources schema")?;
    let result = stage_from_sources(connection, pipeline, schema, suffix, &sources);
    let _ = connection.execute_batch(&format!("DROP SCHEMA IF EXISTS {sources} CASCADE;"));
    result
}

fn stage_from_sources(
    connection: &Connection,
    pipeline: &Pipeline,
    schema: &str,
    suffix: &str,
    sources: &str,
) -> Result<RefreshReport, RefreshError> {
    let mut source_rows = Vec::new();
    for source in &pipeline.sources {
        let rows = load_source(connection, source, sources)?;
        tracing::info!(pipeline = %pipeline.name, source = %source.name, rows, "source loaded");
        source_rows.push((source.name.clone(), rows));
    }

    // Table SQL names sources without a schema: look them up in the sources schema first.
    connection
        .execute_batch(&format!(
            "SET search_path = {};",
            quote_literal(&unquote(sources))
        ))
        .doing("setting the search path")?;
    let built = pipeline
        .tables()
        .try_for_each(|table| build_table(connection, table, schema, suffix, sources));
    connection
        .execute_batch("RESET search_path;")
        .doing("resetting the search path")?;
    built?;

    check_keys(connection, pipeline, schema, suffix)?;
    let master = format!("{schema}.{}", quote_ident(&format!("master{suffix}")));
    let profiles = connection
        .query_row(&format!("SELECT count(*) FROM {master}"), [], |r| r.get(0))
        .doing("counting profiles")?;
    Ok(RefreshReport {
        source_rows,
        profiles,
    })
}

/// Refuses a master segment that is too small, or that shrank too much since the live one.
fn check_guards(
    connection: &Connection,
    pipeline: &Pipeline,
    live: &str,
    profiles: i64,
) -> Result<(), RefreshError> {
    let guards = pipeline.guards;
    if (profiles as u64) < guards.min_profiles {
        return Err(RefreshError::Guard {
            message: format!(
                "the master segment has {profiles} profiles, fewer than guards.min_profiles = {}",
                guards.min_profiles
            ),
        });
    }
    if !master_loaded(connection, pipeline)? {
        return Ok(());
    }
    let previous: i64 = connection
        .query_row(&format!("SELECT count(*) FROM {live}.master"), [], |r| {
            r.get(0)
        })
        .doing("counting the live profiles")?;
    if previous > 0 {
        let shrink = 1.0 - profiles as f64 / previous as f64;
        if shrink > guards.max_shrink_share {
            return Err(RefreshError::Guard {
                message: format!(
                    "the master segment would shrink from {previous} to {profiles} profiles \
                     ({:.0} %), more than guards.max_shrink_share = {}",
                    shrink * 100.0,
                    guards.max_shrink_share
                ),
            });
        }
    }
    Ok(())
}

/// Replaces the live tables by the staging tables in one transaction.
fn swap(connection: &Connection, pipeline: &Pipeline, live: &str) -> Result<(), RefreshError> {
    in_transaction(connection, |c| {
        for table in pipeline.tables() {
            let name = table.table_name();
            c.execute_batch(&format!(
                "DROP TABLE IF EXISTS {live}.{live_name}; \
                 ALTER TABLE {live}.{staging} RENAME TO {live_name};",
                live_name = quote_ident(&name),
                staging = quote_ident(&format!("{name}{STAGING}")),
            ))
            .doing(format!("swapping in the refreshed table {name}"))?;
        }
        Ok(())
    })?;
    Ok(())
}

fn unquote(quoted: &str) -> String {
    quoted.trim_matches('"').replace("\"\"", "\"")
}

/// The table function reading a source with every column as text, in declared names.
fn reader(source: &SourceDef) -> String {
    let path = quote_literal(&source.path.to_string_lossy());
    match &source.format {
        SourceFormat::Csv { delimiter, header } => {
            let mut reader = format!(
                "read_csv({path}, delim = {}, quote = '\"', escape = '\"', header = {header}, \
                 all_varchar = true, auto_detect = false",
                quote_literal(delimiter)
            );
            reader.push_str(", columns = {");
            for (i, (name, _)) in source.columns.iter().enumerate() {
                if i > 0 {
                    reader.push_str(", ");
                }
                reader.push_str(&format!("{}: 'VARCHAR'", quote_literal(name)));
            }
            reader.push_str("})");
            reader
        }
        SourceFormat::Parquet => format!("read_parquet({path})"),
        SourceFormat::JsonLines => {
            let mut reader =
                format!("read_json({path}, format = 'newline_delimited', columns = {{");
            for (i, (name, column_type)) in source.columns.iter().enumerate() {
                if i > 0 {
                    reader.push_str(", ");
                }
                // Lists keep their JSON shape; scalars are read as text and cast below.
                let read_as = match column_type {
                    ColumnType::List(_) => column_type.to_string(),
                    _ => "VARCHAR".to_string(),
                };
                reader.push_str(&format!(
                    "{}: {}",
                    quote_literal(name),
                    quote_literal(&read_as)
                ));
            }
            reader.push_str("})");
            reader
        }
    }
}

fn source_error(source: &SourceDef, message: impl Into<String>) -> RefreshError {
    RefreshError::Source {
        source_name: source.name.clone(),
        path: source.path.display().to_string(),
        message: message.into(),
    }
}

/// The column names the file itself has, to check them against the declaration.
fn file_columns(connection: &Connection, source: &SourceDef) -> Result<Vec<String>, RefreshError> {
    let path = quote_literal(&source.path.to_string_lossy());
    let query = match &source.format {
        SourceFormat::Csv {
            delimiter,
            header: true,
        } => format!(
            "DESCRIBE SELECT * FROM read_csv({path}, delim = {}, quote = '\"', escape = '\"', \
             header = true, all_varchar = true)",
            quote_literal(delimiter)
        ),
        // Without a header the declared columns are the file's columns, in order.
        SourceFormat::Csv { header: false, .. } => {
            return Ok(source.columns.iter().map(|(n, _)| n.clone()).collect());
        }
        SourceFormat::Parquet => format!("DESCRIBE SELECT * FROM read_parquet({path})"),
        SourceFormat::JsonLines => {
            let mut present = Vec::new();
            for (name, _) in &source.columns {
                let found: bool = connection
                    .query_row(
                        &format!(
                            // A file with no lines lacks no column: it is an empty source.
                            "SELECT count(*) = 0 OR coalesce(bool_or(json_exists(json, {})), false) \
                             FROM read_ndjson_objects({path})",
                            quote_literal(&format!("$.\"{}\"", name.replace('"', "\\\"")))
                        ),
                        [],
                        |r| r.get(0),
                    )
                    .map_err(|e| source_error(source, format!("cannot read the file: {e}")))?;
                if found {
                    present.push(name.clone());
                }
            }
            return Ok(present);
        }
    };
    let mut statement = connection
        .prepare(&query)
        .map_err(|e| source_error(source, format!("cannot read the file: {e}")))?;
    let names = statement
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| source_error(source, format!("cannot read the file: {e}")))?;
    Ok(names)
}

fn load_source(
    connection: &Connection,
    source: &SourceDef,
    schema: &str,
) -> Result<i64, RefreshError> {
    if !Path::new(&source.path).is_file() {
        return Err(source_error(source, "the file does not exist"));
    }
    let found = file_columns(connection, source)?;
    let missing: Vec<&str> = source
        .columns
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !found.iter().any(|f| f == n))
        .collect();
    if !missing.is_empty() {
        return Err(source_error(
            source,
            format!(
                "declared column{} {} not in the file (the file has: {})",
                if missing.len() == 1 { "" } else { "s" },
                missing
                    .iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                found.join(", ")
            ),
        ));
    }
    if matches!(source.format, SourceFormat::Csv { header: true, .. })
        && found.len() != source.columns.len()
    {
        let extra: Vec<&String> = found
            .iter()
            .filter(|f| !source.columns.iter().any(|(n, _)| n == *f))
            .collect();
        return Err(source_error(
            source,
            format!(
                "the file has columns that are not declared: {}; declare every column of a CSV \
                 file, in file order",
                extra
                    .iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    // A CSV file is read by position: columns in another order than declared would load
    // each value into the wrong column.
    if matches!(source.format, SourceFormat::Csv { header: true, .. }) {
        let declared: Vec<&str> = source.columns.iter().map(|(n, _)| n.as_str()).collect();
        if declared.iter().zip(&found).any(|(d, f)| *d != f.as_str()) {
            return Err(source_error(
                source,
                format!(
                    "the file's columns are in another order than declared: the file has {}, \
                     the pipeline declares {}; declare the columns of a CSV file in file order",
                    found.join(", "),
                    declared.join(", ")
                ),
            ));
        }
    }

    let casts = source
        .columns
        .iter()
        .map(|(name, column_type)| {
            format!("CAST({q} AS {column_type}) AS {q}", q = quote_ident(name))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let table = format!("{schema}.{}", quote_ident(&source.name));
    let create = format!(
        "CREATE TABLE {table} AS SELECT {casts} FROM {}",
        reader(source)
    );
    if let Err(err) = connection.execute_batch(&create) {
        return Err(source_error(
            source,
            explain_load_failure(connection, source, &err),
        ));
    }
    connection
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .doing(format!("counting the rows of source {}", source.name))
        .map_err(RefreshError::from)
}

/// Finds the first value that does not fit its declared type, to say where it is. Values are
/// not quoted back: a source may hold personal data, and the line and column are enough.
fn explain_load_failure(
    connection: &Connection,
    source: &SourceDef,
    err: &duckdb::Error,
) -> String {
    for (name, column_type) in &source.columns {
        if matches!(column_type, ColumnType::Text | ColumnType::List(_)) {
            continue;
        }
        let q = quote_ident(name);
        let query = format!(
            "SELECT row FROM (SELECT row_number() OVER () AS row, {q} AS value FROM {}) \
             WHERE value IS NOT NULL AND TRY_CAST(value AS {column_type}) IS NULL \
             ORDER BY row LIMIT 1",
            reader(source)
        );
        if let Ok(row) = connection.query_row(&query, [], |r| r.get::<_, i64>(0)) {
            let line = match source.format {
                SourceFormat::Csv { header: true, .. } => row + 1,
                _ => row,
            };
            return format!(
                "line {line}: the value in column `{name}` is not a valid {column_type}; fix the \
                 row or change the column's declared type"
            );
        }
    }
    format!("cannot load the file: {}", first_line(&err.to_string()))
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

fn table_label(table: &TableDef) -> String {
    match table.role {
        TableRole::Master => "master table".into(),
        TableRole::Attribute => format!("attribute table `{}`", table.name),
        TableRole::Behaviour => format!("behaviour table `{}`", table.name),
    }
}

fn build_table(
    connection: &Connection,
    table: &TableDef,
    schema: &str,
    suffix: &str,
    sources: &str,
) -> Result<(), RefreshError> {
    let select = match &table.from {
        TableFrom::Source(name) => format!("SELECT * FROM {sources}.{}", quote_ident(name)),
        TableFrom::Sql(sql) => sql.trim().trim_end_matches(';').to_string(),
    };
    let casts = table
        .columns
        .iter()
        .map(|(name, column_type)| {
            format!("CAST({q} AS {column_type}) AS {q}", q = quote_ident(name))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let staging = quote_ident(&format!("{}{suffix}", table.table_name()));
    let create = format!(
        "CREATE OR REPLACE TABLE {schema}.{staging} AS SELECT {casts} FROM ({select}\n) AS built"
    );
    connection
        .execute_batch(&create)
        .map_err(|err| RefreshError::Table {
            table: table_label(table),
            message: format!("cannot build it: {}", first_line(&err.to_string())),
        })
}

/// Master and attribute keys must be present and unique; behaviour keys present.
fn check_keys(
    connection: &Connection,
    pipeline: &Pipeline,
    schema: &str,
    suffix: &str,
) -> Result<(), RefreshError> {
    for table in pipeline.tables() {
        let staging = format!(
            "{schema}.{}",
            quote_ident(&format!("{}{suffix}", table.table_name()))
        );
        let key = quote_ident(&table.key);
        let missing: i64 = connection
            .query_row(
                &format!("SELECT count(*) FROM {staging} WHERE {key} IS NULL"),
                [],
                |r| r.get(0),
            )
            .doing("checking keys")?;
        if missing > 0 {
            return Err(RefreshError::Table {
                table: table_label(table),
                message: format!(
                    "{missing} row{} have no key `{}`; filter them out in the table's sql",
                    if missing == 1 { "" } else { "s" },
                    table.key
                ),
            });
        }
        if table.role == TableRole::Behaviour {
            continue;
        }
        let duplicated: i64 = connection
            .query_row(
                &format!(
                    "SELECT count(*) FROM (SELECT {key} FROM {staging} GROUP BY {key} \
                     HAVING count(*) > 1)"
                ),
                [],
                |r| r.get(0),
            )
            .doing("checking keys")?;
        if duplicated > 0 {
            return Err(RefreshError::Table {
                table: table_label(table),
                message: format!(
                    "{duplicated} key{} of `{}` appear on more than one row; this table must \
                     have one row per profile",
                    if duplicated == 1 { "" } else { "s" },
                    table.key
                ),
            });
        }
    }
    Ok(())
}

/// Whether the pipeline has a live master segment, that is, a refresh has succeeded.
pub fn master_loaded(connection: &Connection, pipeline: &Pipeline) -> Result<bool, StoreError> {
    connection
        .query_row(
            "SELECT count(*) > 0 FROM duckdb_tables() WHERE schema_name = ? AND table_name = 'master'",
            [pipeline.schema()],
            |r| r.get(0),
        )
        .doing("looking for the live master table")
}
