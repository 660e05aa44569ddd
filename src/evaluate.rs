//! Segment evaluation: every segment of a pipeline at the run's `as_of`.
//!
//! Segments are evaluated in dependency order with the compiled SQL of [`crate::compile`], and
//! the new memberships replace the old ones in one transaction, with each segment's size
//! recorded for the run. Who entered and who left each segment is kept as membership history,
//! with the reason: the segment's rule (or one it refers to) changed, the source data changed,
//! only time passed, or the refresh was forced. A profile look-up runs the same compiled SQL
//! for one key.

use chrono::NaiveDateTime;
use duckdb::{Connection, params, params_from_iter};
use sha2::{Digest, Sha256};

use crate::compile::{SqlValue, segment_query};
use crate::config::Pipeline;
use crate::store::{Doing, StoreError, in_transaction, sql_params};

/// One segment's size after evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSize {
    /// The segment's name.
    pub segment: String,
    /// Members now.
    pub size: i64,
}

/// Why a run is evaluating: recorded with every membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// A fingerprint of the source files (names, sizes, modification times).
    pub data_fingerprint: String,
    /// Whether the operator forced the refresh past its guards.
    pub forced: bool,
}

/// A fingerprint of a segment's rule and of the rules it refers to.
pub fn rule_fingerprint(pipeline: &Pipeline, segment: &str) -> String {
    let mut hasher = Sha256::new();
    let mut pending = vec![segment.to_string()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Ok(definition) = pipeline.segment(&name) {
            hasher.update(format!("{name}={:?};", definition.rule).as_bytes());
            pending.extend(definition.references.iter().cloned());
        }
    }
    hex::encode(hasher.finalize())
}

/// Evaluates every segment, records who entered and left and why, and replaces the
/// pipeline's memberships, in one transaction.
pub fn evaluate(
    connection: &Connection,
    pipeline: &Pipeline,
    run_id: i64,
    as_of: NaiveDateTime,
    inputs: &Inputs,
) -> Result<Vec<SegmentSize>, anyhow::Error> {
    let queries = pipeline
        .segments
        .iter()
        .map(|segment| {
            Ok((
                segment.name.clone(),
                segment_query(pipeline, &segment.name, as_of)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let previous_data: Option<String> = connection
        .query_row(
            "SELECT arg_max(data_fingerprint, run_id) FROM segmentd_state.runs \
             WHERE pipeline = ? AND run_id < ? AND data_fingerprint IS NOT NULL",
            params![pipeline.name, run_id],
            |r| r.get(0),
        )
        .doing("reading the previous run")?;
    connection
        .execute(
            "UPDATE segmentd_state.runs SET data_fingerprint = ? WHERE run_id = ?",
            params![inputs.data_fingerprint, run_id],
        )
        .doing("recording the run's inputs")?;

    let sizes = in_transaction(connection, |c| {
        let mut sizes = Vec::new();
        for (segment, query) in &queries {
            let fingerprint = rule_fingerprint(pipeline, segment);
            let previous_rule: Option<String> = c
                .query_row(
                    "SELECT arg_max(rule_fingerprint, run_id) FROM segmentd_state.segment_sizes \
                     WHERE pipeline = ? AND segment = ?",
                    params![pipeline.name, segment],
                    |r| r.get(0),
                )
                .doing("reading the previous rule")?;
            let reason = match (&previous_rule, inputs.forced) {
                (None, _) => "first evaluation",
                (_, true) => "forced",
                (Some(rule), _) if *rule != fingerprint => "rule change",
                _ if previous_data.as_deref() != Some(inputs.data_fingerprint.as_str()) => {
                    "data change"
                }
                _ => "time passing",
            };

            let mut values = Vec::new();
            values.extend(sql_params(&query.params));
            c.execute_batch("DROP TABLE IF EXISTS evaluated")
                .doing("preparing an evaluation")?;
            c.execute(
                &format!(
                    "CREATE TEMP TABLE evaluated AS SELECT DISTINCT key FROM ({}) AS m",
                    query.sql
                ),
                params_from_iter(values),
            )
            .doing(format!("evaluating segment {segment}"))?;
            let scope = params![run_id, reason, pipeline.name, segment];
            c.execute(
                "INSERT INTO segmentd_state.membership_history \
                 (pipeline, segment, key, run_id, event, reason, recorded_at) \
                 SELECT m.pipeline, m.segment, m.key, ?, 'left', ?, current_timestamp::TIMESTAMP \
                 FROM segmentd_state.memberships AS m \
                 WHERE m.pipeline = ? AND m.segment = ? \
                 AND NOT EXISTS (SELECT 1 FROM evaluated AS e WHERE e.key = m.key)",
                scope,
            )
            .doing("recording who left")?;
            c.execute(
                "INSERT INTO segmentd_state.membership_history \
                 (pipeline, segment, key, run_id, event, reason, recorded_at) \
                 SELECT $3, $4, e.key, $1, 'entered', $2, current_timestamp::TIMESTAMP \
                 FROM evaluated AS e WHERE NOT EXISTS ( \
                     SELECT 1 FROM segmentd_state.memberships AS m \
                 WHERE m.pipeline = $3 AND m.segment = $4 AND m.key = e.key)",
                scope,
            )
            .doing("recording who entered")?;
            c.execute(
                "DELETE FROM segmentd_state.memberships WHERE pipeline = ? AND segment = ?",
                params![pipeline.name, segment],
            )
            .doing("replacing memberships")?;
            let size = c
                .execute(
                    "INSERT INTO segmentd_state.memberships (pipeline, segment, key) \
                     SELECT ?, ?, key FROM evaluated",
                    params![pipeline.name, segment],
                )
                .doing("replacing memberships")? as i64;
            c.execute(
                "INSERT INTO segmentd_state.segment_sizes \
                 (run_id, pipeline, segment, size, rule_fingerprint) VALUES (?, ?, ?, ?, ?)",
                params![run_id, pipeline.name, segment, size, fingerprint],
            )
            .doing("recording segment sizes")?;
            tracing::info!(
                pipeline = %pipeline.name, segment = %segment, size, "segment evaluated"
            );
            sizes.push(SegmentSize {
                segment: segment.clone(),
                size,
            });
        }
        c.execute_batch("DROP TABLE IF EXISTS evaluated")
            .doing("cleaning up")?;
        Ok::<_, StoreError>(sizes)
    })?;
    Ok(sizes)
}

/// One entry of a member's history in a segment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryEvent {
    /// The run that saw the change.
    pub run_id: i64,
    /// `entered` or `left`.
    pub event: String,
    /// `first evaluation`, `rule change`, `data change`, `time passing` or `forced`.
    pub reason: String,
    /// When it was recorded (UTC).
    pub at: String,
}

/// When a profile entered and left a segment, oldest first.
pub fn history(
    connection: &Connection,
    pipeline: &str,
    segment: &str,
    key: &str,
) -> Result<Vec<HistoryEvent>, StoreError> {
    let mut statement = connection
        .prepare(
            "SELECT run_id, event, reason, CAST(recorded_at AS VARCHAR) \
             FROM segmentd_state.membership_history \
             WHERE pipeline = ? AND segment = ? AND key = ? ORDER BY run_id",
        )
        .doing("reading membership history")?;
    let rows = statement
        .query_map(params![pipeline, segment, key], |r| {
            Ok(HistoryEvent {
                run_id: r.get(0)?,
                event: r.get(1)?,
                reason: r.get(2)?,
                at: r.get(3)?,
            })
        })
        .doing("reading membership history")?;
    rows.collect::<Result<_, _>>()
        .doing("reading membership history")
}

/// The segments a profile belongs to at `as_of`, by the same SQL as the bulk evaluation.
pub fn profile_segments(
    connection: &Connection,
    pipeline: &Pipeline,
    key: &str,
    as_of: NaiveDateTime,
) -> Result<Vec<String>, anyhow::Error> {
    let mut member_of = Vec::new();
    for segment in &pipeline.segments {
        let query = segment_query(pipeline, &segment.name, as_of)?;
        let mut values = sql_params(&query.params);
        values.push(duckdb::types::Value::Text(key.to_string()));
        let found: i64 = connection
            .query_row(
                &format!(
                    "SELECT count(*) FROM ({}) AS members WHERE key = ?",
                    query.sql
                ),
                params_from_iter(values),
                |r| r.get(0),
            )
            .doing(format!("looking up a profile in segment {}", segment.name))?;
        if found > 0 {
            member_of.push(segment.name.clone());
        }
    }
    Ok(member_of)
}

/// Whether the master table has a profile with this key.
pub fn profile_exists(
    connection: &Connection,
    pipeline: &Pipeline,
    key: &str,
) -> Result<bool, StoreError> {
    let found: i64 = connection
        .query_row(
            &format!(
                "SELECT count(*) FROM {}.master WHERE CAST({} AS VARCHAR) = ?",
                crate::schema::quote_ident(&pipeline.schema()),
                crate::schema::quote_ident(&pipeline.master.key)
            ),
            params![key],
            |r| r.get(0),
        )
        .doing("looking up a profile")?;
    Ok(found > 0)
}

/// What a segment selects now, read without changing anything.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Preview {
    /// The segment's name.
    pub segment: String,
    /// The evaluation instant, wall-clock in the pipeline's time zone.
    pub as_of: String,
    /// Members it selects from the current master segment.
    pub size: i64,
    /// The first members by key, at most the sample size asked for.
    pub sample: Vec<String>,
    /// The compiled SQL, with `?` placeholders.
    pub sql: String,
    /// The values bound to the placeholders, in order, as text.
    pub params: Vec<String>,
}

/// Evaluates one segment against the current master segment at `as_of` and returns its size, a
/// sample of members and its SQL; writes no table and touches no activation.
pub fn preview(
    connection: &Connection,
    pipeline: &Pipeline,
    segment: &str,
    as_of: NaiveDateTime,
    sample: usize,
) -> Result<Preview, anyhow::Error> {
    if !crate::refresh::master_loaded(connection, pipeline)? {
        anyhow::bail!(
            "pipeline `{}` has no master segment yet; run `segmentd refresh {}` first",
            pipeline.name,
            pipeline.name
        );
    }
    let query = segment_query(pipeline, segment, as_of)?;
    let params = sql_params(&query.params);
    let size: i64 = connection
        .query_row(
            &format!("SELECT count(DISTINCT key) FROM ({}) AS members", query.sql),
            params_from_iter(params.clone()),
            |r| r.get(0),
        )
        .doing(format!("previewing segment {segment}"))?;
    let mut statement = connection
        .prepare(&format!(
            "SELECT DISTINCT CAST(key AS VARCHAR) AS key, key AS sort_key \
             FROM ({}) AS members ORDER BY sort_key LIMIT {sample}",
            query.sql
        ))
        .doing(format!("previewing segment {segment}"))?;
    let keys = statement
        .query_map(params_from_iter(params), |r| r.get::<_, String>(0))
        .doing(format!("previewing segment {segment}"))?
        .collect::<Result<Vec<_>, _>>()
        .doing(format!("previewing segment {segment}"))?;
    let params = query
        .params
        .iter()
        .map(|value| match value {
            SqlValue::Bool(b) => b.to_string(),
            SqlValue::Int(i) => i.to_string(),
            SqlValue::Float(f) => f.to_string(),
            SqlValue::Text(t) => crate::schema::quote_literal(t),
        })
        .collect();
    Ok(Preview {
        segment: segment.to_string(),
        as_of: as_of.format("%Y-%m-%d %H:%M:%S").to_string(),
        size,
        sample: keys,
        sql: query.sql,
        params,
    })
}
