//! The store: the only code that opens the DuckDB file.
//!
//! It owns the connection settings (memory limit, threads, no extension auto-loading: nothing
//! may reach for the network), the state tables in the `segmentd_state` schema, and the records of
//! runs. Master segment tables live in one schema per pipeline and are written by
//! [`crate::refresh`]; memberships by [`crate::evaluate`]; deltas and acknowledged state by
//! [`crate::deliver`]. Those modules take a [`duckdb::Connection`] from [`Store::connection`];
//! every call into DuckDB runs on a blocking thread, never on the async runtime.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::NaiveDateTime;
use duckdb::{Connection, params};

use crate::compile::SqlValue;

/// Errors opening or using the DuckDB file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened.
    #[error(
        "cannot open the database {path}: {source}; if a segmentd daemon is running on it, \
         trigger runs over its HTTP API instead"
    )]
    Open {
        /// The DuckDB file.
        path: PathBuf,
        /// DuckDB's error.
        source: duckdb::Error,
    },
    /// A statement failed.
    #[error("database error while {doing}: {source}")]
    Query {
        /// What segmentd was doing.
        doing: String,
        /// DuckDB's error.
        source: duckdb::Error,
    },
}

/// Adds what was being done to a DuckDB error.
pub trait Doing<T> {
    /// Wraps the error as [`StoreError::Query`].
    fn doing(self, doing: impl Into<String>) -> Result<T, StoreError>;
}

impl<T> Doing<T> for Result<T, duckdb::Error> {
    fn doing(self, doing: impl Into<String>) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query {
            doing: doing.into(),
            source,
        })
    }
}

/// The open DuckDB file.
pub struct Store {
    path: PathBuf,
    /// Kept only to hand out clones; queries run on clones, one per job.
    base: Mutex<Connection>,
}

const STATE_SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS segmentd_state;
CREATE TABLE IF NOT EXISTS segmentd_state.runs (
    run_id BIGINT NOT NULL,
    pipeline VARCHAR NOT NULL,
    trigger VARCHAR NOT NULL,
    as_of TIMESTAMP NOT NULL,
    started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    status VARCHAR NOT NULL,
    error VARCHAR,
    data_fingerprint VARCHAR,
    profiles BIGINT
);
CREATE TABLE IF NOT EXISTS segmentd_state.segment_sizes (
    run_id BIGINT NOT NULL,
    pipeline VARCHAR NOT NULL,
    segment VARCHAR NOT NULL,
    size BIGINT NOT NULL,
    rule_fingerprint VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS segmentd_state.membership_history (
    pipeline VARCHAR NOT NULL,
    segment VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    run_id BIGINT NOT NULL,
    event VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    recorded_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS segmentd_state.dead_letters (
    pipeline VARCHAR NOT NULL,
    activation VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    change VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    rejections INTEGER NOT NULL,
    dead BOOLEAN NOT NULL,
    run_id BIGINT NOT NULL,
    recorded_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS segmentd_state.memberships (
    pipeline VARCHAR NOT NULL,
    segment VARCHAR NOT NULL,
    key VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS segmentd_state.acknowledged (
    pipeline VARCHAR NOT NULL,
    activation VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    identifiers VARCHAR NOT NULL,
    run_id BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS segmentd_state.deltas (
    run_id BIGINT NOT NULL,
    pipeline VARCHAR NOT NULL,
    activation VARCHAR NOT NULL,
    change VARCHAR NOT NULL,
    sequence INTEGER NOT NULL,
    key VARCHAR NOT NULL,
    identifiers VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    reason VARCHAR
);
CREATE TABLE IF NOT EXISTS segmentd_state.activation_runs (
    run_id BIGINT NOT NULL,
    pipeline VARCHAR NOT NULL,
    activation VARCHAR NOT NULL,
    adds BIGINT NOT NULL,
    removes BIGINT NOT NULL,
    delivered_adds BIGINT NOT NULL,
    delivered_removes BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    status VARCHAR NOT NULL,
    error VARCHAR,
    hold_reason VARCHAR,
    replaced BIGINT,
    approval_run BIGINT
);
-- Columns added after the first files were written: older files gain them here.
ALTER TABLE segmentd_state.runs ADD COLUMN IF NOT EXISTS profiles BIGINT;
ALTER TABLE segmentd_state.activation_runs ADD COLUMN IF NOT EXISTS replaced BIGINT;
ALTER TABLE segmentd_state.activation_runs ADD COLUMN IF NOT EXISTS approval_run BIGINT;
UPDATE segmentd_state.activation_runs SET approval_run = run_id
WHERE status = 'approved' AND approval_run IS NULL;
";

impl Store {
    /// Opens (creating if needed) the DuckDB file and its state tables.
    pub fn open(path: &Path, memory_limit: &str, threads: u32) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(parent);
        }
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let config = duckdb::Config::default()
            .enable_autoload_extension(false)
            .and_then(|c| c.max_memory(memory_limit))
            .and_then(|c| c.threads(i64::from(threads)))
            .map_err(open_error)?;
        let connection = Connection::open_with_flags(path, config).map_err(open_error)?;
        connection
            .execute_batch("SET autoinstall_known_extensions = false;")
            .doing("configuring the connection")?;
        connection
            .execute_batch(STATE_SCHEMA)
            .doing("creating the state tables")?;
        Ok(Store {
            path: path.to_path_buf(),
            base: Mutex::new(connection),
        })
    }

    /// The DuckDB file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A connection for one job; use it on a blocking thread.
    pub fn connection(&self) -> Result<Connection, StoreError> {
        let base = self
            .base
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        base.try_clone().doing("opening a connection")
    }
}

/// Runs `work` inside one transaction, rolling back if it fails.
pub fn in_transaction<T>(
    connection: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    connection
        .execute_batch("BEGIN TRANSACTION")
        .doing("starting a transaction")?;
    match work(connection) {
        Ok(value) => {
            connection.execute_batch("COMMIT").doing("committing")?;
            Ok(value)
        }
        Err(err) => {
            let _ = connection.execute_batch("ROLLBACK");
            Err(err)
        }
    }
}

/// Turns compiled values into DuckDB parameters.
pub fn sql_params(values: &[SqlValue]) -> Vec<duckdb::types::Value> {
    values
        .iter()
        .map(|value| match value {
            SqlValue::Bool(b) => duckdb::types::Value::Boolean(*b),
            SqlValue::Int(i) => duckdb::types::Value::BigInt(*i),
            SqlValue::Float(f) => duckdb::types::Value::Double(*f),
            SqlValue::Text(t) => duckdb::types::Value::Text(t.clone()),
        })
        .collect()
}

/// How a run started.
pub fn start_run(
    connection: &Connection,
    pipeline: &str,
    trigger: &str,
    as_of: NaiveDateTime,
) -> Result<i64, StoreError> {
    in_transaction(connection, |c| {
        let run_id: i64 = c
            .query_row(
                "SELECT coalesce(max(run_id), 0) + 1 FROM segmentd_state.runs",
                [],
                |r| r.get(0),
            )
            .doing("numbering the run")?;
        c.execute(
            "INSERT INTO segmentd_state.runs (run_id, pipeline, trigger, as_of, started_at, \
             status) \
             VALUES (?, ?, ?, CAST(? AS TIMESTAMP), current_timestamp::TIMESTAMP, 'running')",
            params![
                run_id,
                pipeline,
                trigger,
                crate::compile::format_time(as_of)
            ],
        )
        .doing("recording the run")?;
        Ok(run_id)
    })
}

/// Records how a run ended.
pub fn finish_run(
    connection: &Connection,
    run_id: i64,
    status: &str,
    error: Option<&str>,
) -> Result<(), StoreError> {
    connection
        .execute(
            "UPDATE segmentd_state.runs SET status = ?, error = ?, \
             finished_at = current_timestamp::TIMESTAMP WHERE run_id = ?",
            params![status, error, run_id],
        )
        .doing("recording the end of the run")?;
    Ok(())
}

/// Records a run's status after a later delivery of its batches (an approval); when it
/// finished stays as it was.
pub fn record_outcome(
    connection: &Connection,
    run_id: i64,
    status: &str,
    error: Option<&str>,
) -> Result<(), StoreError> {
    connection
        .execute(
            "UPDATE segmentd_state.runs SET status = ?, error = ? WHERE run_id = ?",
            params![status, error, run_id],
        )
        .doing("recording the run's status")?;
    Ok(())
}

/// Records how many profiles the run's refresh left in the master segment.
pub fn record_profiles(
    connection: &Connection,
    run_id: i64,
    profiles: i64,
) -> Result<(), StoreError> {
    connection
        .execute(
            "UPDATE segmentd_state.runs SET profiles = ? WHERE run_id = ?",
            params![profiles, run_id],
        )
        .doing("recording the run's profiles")?;
    Ok(())
}

/// The pipeline's latest run, whichever process made it; `None` before its first run.
pub fn latest_run(connection: &Connection, pipeline: &str) -> Result<Option<i64>, StoreError> {
    connection
        .query_row(
            "SELECT max(run_id) FROM segmentd_state.runs WHERE pipeline = ?",
            params![pipeline],
            |r| r.get(0),
        )
        .doing("finding the latest run")
}

/// Runs a stopped process left `running`, oldest first.
pub fn unfinished_runs(connection: &Connection, pipeline: &str) -> Result<Vec<i64>, StoreError> {
    let mut statement = connection
        .prepare(
            // A run still running when its process stopped, or a held one whose approved delta
            // was being sent when the process stopped (an approval that ran to its end, even
            // with failures, records the run's new status).
            "SELECT r.run_id FROM segmentd_state.runs AS r WHERE r.pipeline = ? \
             AND (r.status = 'running' OR r.status = 'held' AND EXISTS ( \
                 SELECT 1 FROM segmentd_state.deltas AS d \
                 WHERE d.pipeline = r.pipeline AND d.run_id = r.run_id \
                 AND d.status = 'pending')) \
             ORDER BY r.run_id",
        )
        .doing("finding unfinished runs")?;
    let rows = statement
        .query_map(params![pipeline], |r| r.get(0))
        .doing("finding unfinished runs")?;
    rows.collect::<Result<_, _>>()
        .doing("finding unfinished runs")
}

/// The last recorded size of each segment of a pipeline, from its latest run that evaluated it.
pub fn last_sizes(
    connection: &Connection,
    pipeline: &str,
) -> Result<std::collections::BTreeMap<String, (i64, i64)>, StoreError> {
    let mut statement = connection
        .prepare(
            "SELECT segment, arg_max(size, run_id), max(run_id) FROM segmentd_state.segment_sizes \
             WHERE pipeline = ? GROUP BY segment",
        )
        .doing("reading segment sizes")?;
    let rows = statement
        .query_map(params![pipeline], |r| {
            Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?)))
        })
        .doing("reading segment sizes")?;
    rows.collect::<Result<_, _>>()
        .doing("reading segment sizes")
}
