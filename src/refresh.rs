//! Master segment refresh: sources into staging tables, checks, then one swap.
//!
//! Each source file is read by DuckDB as text and cast to its declared types, so a value that
//! does not fit is an error naming the source, the column and the line rather than a silently
//! changed type. The master, attribute and behaviour tables are built from the sources into
//! staging tables next to the live ones, checked (keys present and unique where they must be),
//! and only then swapped in, all in one transaction. A refresh that fails at any step drops its
//! staging tables and leaves the live tables, memberships and acknowledged state as they were.
//!
//! A bad row fails the refresh; none is skipped. Before DuckDB reads a source, a gzip file is
//! read to its end here, because DuckDB loads the rows of a truncated gzip file (one still
//! being written, say) up to the break without an error. A CSV header is read here too, so a
//! file whose rows do not match its header is reported at the row, not at DuckDB's guess of
//! its dialect. DuckDB's errors about malformed CSV rows are said again in an operator's words,
//! with DuckDB's own detail after them but never the row itself, which may hold personal data.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use duckdb::Connection;

use crate::config::Pipeline;
use crate::config::pipeline::{SourceDef, SourceFormat, TableDef, TableFrom, TableRole};
use crate::schema::{ColumnType, json_key_path, quote_ident, quote_literal};
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
pub(crate) fn check_guards(
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
        } => return csv_header(source, delimiter),
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
                            "SELECT count(*) = 0 \
                                    OR coalesce(bool_or(json_exists(json, {})), false) \
                             FROM read_ndjson_objects({path})",
                            json_key_path(name)
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
    if !is_gzip(source) {
        return load_checked_source(connection, source, schema);
    }
    // The gzip file is read to its end while DuckDB loads it; a break in it fails the load
    // whatever DuckDB made of the data before the break.
    std::thread::scope(|scope| {
        let whole = scope.spawn(|| check_gzip(source));
        let loaded = load_checked_source(connection, source, schema);
        let whole = whole.join().unwrap_or_else(|_| {
            Err(source_error(
                source,
                "reading the gzip file to its end failed unexpectedly; refresh again",
            ))
        });
        whole.and(loaded)
    })
}

/// Checks a source file's columns against its declaration, then loads it.
fn load_checked_source(
    connection: &Connection,
    source: &SourceDef,
    schema: &str,
) -> Result<i64, RefreshError> {
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

/// Says why DuckDB could not load a source: a malformed CSV row, or else the first value that
/// does not fit its declared type. Values are not quoted back: a source may hold personal
/// data, and the line and column are enough.
fn explain_load_failure(
    connection: &Connection,
    source: &SourceDef,
    err: &duckdb::Error,
) -> String {
    if let SourceFormat::Csv { delimiter, header } = &source.format
        && let Some(explained) = explain_csv_error(&err.to_string(), delimiter, *header)
    {
        return explained;
    }
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

/// The number written after `label` in `text`.
fn number_after(text: &str, label: &str) -> Option<u64> {
    let start = text.find(label)? + label.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Explains DuckDB's error about a malformed CSV row, when it is one. DuckDB's error quotes
/// the row after `Original Line:`; only its line number and its reason are kept. DuckDB counts
/// rows with the header as line 1, which is the file's line unless a quoted value above holds
/// a line break.
fn explain_csv_error(text: &str, delimiter: &str, header: bool) -> Option<String> {
    let line = number_after(text, "CSV Error on Line: ")?;
    let duckdb = first_line(text);
    let expected = number_after(text, "Expected Number of Columns: ");
    let found = number_after(text, "Found: ");
    if let (Some(expected), Some(found)) = (expected, found) {
        let against = if header {
            format!("the header has {expected}")
        } else {
            format!("the pipeline declares {expected} columns")
        };
        let cut_short = if found < expected {
            "; a row cut short at the end of the file means the file is incomplete or still being \
             written"
        } else {
            ""
        };
        return Some(format!(
            "line {line}: the row has {found} field{}, {against}; fix the row (a value holding \
             `{delimiter}` must be in double quotes) and refresh again{cut_short} (DuckDB: \
             {duckdb}; Expected Number of Columns: {expected} Found: {found})",
            if found == 1 { "" } else { "s" }
        ));
    }
    if text.contains("Value with unterminated quote found") {
        return Some(format!(
            "line {line}: a quoted value is not closed: a `\"` opens it and no `\"` ends it; \
             close it (a `\"` inside a quoted value is written `\"\"`) and refresh again \
             (DuckDB: {duckdb}; Value with unterminated quote found.)"
        ));
    }
    if text.contains("Invalid unicode") {
        return Some(format!(
            "line {line}: the file is not UTF-8 text; convert it to UTF-8 and refresh again \
             (DuckDB: {duckdb}; Invalid unicode (byte sequence mismatch) detected.)"
        ));
    }
    Some(format!(
        "line {line}: DuckDB cannot read this row; fix it and refresh again (DuckDB: {duckdb})"
    ))
}

/// Whether DuckDB reads the source as gzip: it goes by the `.gz` ending.
fn is_gzip(source: &SourceDef) -> bool {
    source.path.to_string_lossy().ends_with(".gz")
}

/// The source file's text: decompressed when it is gzip.
fn open_text(source: &SourceDef) -> Result<Box<dyn BufRead>, RefreshError> {
    let file = std::fs::File::open(&source.path)
        .map_err(|e| source_error(source, format!("cannot read the file: {e}")))?;
    let empty = file.metadata().is_ok_and(|m| m.len() == 0);
    Ok(if is_gzip(source) && !empty {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            BufReader::new(file),
        )))
    } else {
        Box::new(BufReader::new(file))
    })
}

/// Reads a gzip source to its end, so a file cut short is refused rather than loaded up to
/// the break, and says after which line the data stops.
fn check_gzip(source: &SourceDef) -> Result<(), RefreshError> {
    let mut file = std::fs::File::open(&source.path)
        .map_err(|e| source_error(source, format!("cannot read the file: {e}")))?;
    let mut magic = [0u8; 2];
    match file.read(&mut magic) {
        // Nothing to decompress: the header check says the file is empty.
        Ok(0) => return Ok(()),
        Ok(2) if magic == [0x1f, 0x8b] => {}
        Ok(_) => {
            return Err(source_error(
                source,
                "the file's name ends in .gz but it does not hold gzip data; compress it with \
                 gzip, or drop .gz from its name and from `path`",
            ));
        }
        Err(err) => return Err(source_error(source, format!("cannot read the file: {err}"))),
    }
    let file = std::io::Cursor::new(magic).chain(file);
    let mut decoder = flate2::read::MultiGzDecoder::new(BufReader::new(file));
    let mut buffer = vec![0u8; 256 * 1024];
    let mut lines: u64 = 0;
    let mut in_line = false;
    loop {
        match decoder.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => {
                let chunk = &buffer[..read];
                lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
                in_line = chunk.last() != Some(&b'\n');
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => {
                let at = match (lines, in_line) {
                    (_, true) => format!("line {}: ", lines + 1),
                    (0, false) => String::new(),
                    (_, false) => format!("after line {lines}: "),
                };
                let message = if err.kind() == std::io::ErrorKind::UnexpectedEof {
                    let place = if in_line {
                        ", in the middle of this line"
                    } else {
                        ""
                    };
                    format!(
                        "{at}the gzip file ends early{place}: it is truncated or still being \
                         written; wait until it is complete, or replace it with the complete \
                         file, and refresh again (gzip: {err})"
                    )
                } else {
                    format!(
                        "{at}the gzip data is damaged; replace the file with a good copy and \
                         refresh again (gzip: {err})"
                    )
                };
                return Err(source_error(source, message));
            }
        }
    }
}

/// The most a CSV header line may take; a longer first line is not a header.
const MAX_HEADER_BYTES: usize = 1 << 20;

/// The column names in a CSV file's header, read as DuckDB reads them: a byte order mark
/// dropped, names trimmed, `"` quoting with `""` for a quote inside.
fn csv_header(source: &SourceDef, delimiter: &str) -> Result<Vec<String>, RefreshError> {
    let mut reader = open_text(source)?.take(MAX_HEADER_BYTES as u64 + 1);
    let mut line = Vec::new();
    let mut quoted = false;
    let mut byte = [0u8; 1];
    loop {
        match reader.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Err(source_error(
                    source,
                    format!("cannot read the header line: {err}"),
                ));
            }
        }
        match byte[0] {
            b'"' => quoted = !quoted,
            b'\n' if !quoted => break,
            _ => {}
        }
        line.push(byte[0]);
        if line.len() > MAX_HEADER_BYTES {
            return Err(source_error(
                source,
                "line 1: the header line is longer than 1 MiB; is this a CSV file? Check the \
                 source's `format` and `delimiter`",
            ));
        }
    }
    if line.is_empty() {
        return Err(source_error(
            source,
            "the file is empty; a CSV source with a header starts with a line naming its \
             columns (or set `header = false`)",
        ));
    }
    let Ok(text) = String::from_utf8(line) else {
        return Err(source_error(
            source,
            "line 1: the header line is not UTF-8 text; convert the file to UTF-8 and refresh \
             again",
        ));
    };
    let text = text
        .trim_start_matches('\u{feff}')
        .trim_end_matches(['\r', '\n']);
    Ok(split_csv_line(text, delimiter)
        .into_iter()
        .map(|name| name.trim().to_string())
        .collect())
}

/// Splits one CSV line into its fields, unquoting them.
fn split_csv_line(line: &str, delimiter: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if quoted {
            if let Some(after) = rest.strip_prefix("\"\"") {
                field.push('"');
                rest = after;
                continue;
            }
            if c == '"' {
                quoted = false;
            } else {
                field.push(c);
            }
        } else if let Some(after) = rest.strip_prefix(delimiter) {
            fields.push(std::mem::take(&mut field));
            rest = after;
            continue;
        } else if c == '"' {
            quoted = true;
        } else {
            field.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    fields.push(field);
    fields
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
            "SELECT count(*) > 0 FROM duckdb_tables() \
             WHERE schema_name = ? AND table_name = 'master'",
            [pipeline.schema()],
            |r| r.get(0),
        )
        .doing("looking for the live master table")
}
