//! Segment evaluation: every segment of a pipeline at the run's `as_of`.
//!
//! Segments are evaluated in dependency order with the compiled SQL of [`crate::compile`], and
//! the new memberships replace the old ones in one transaction, with each segment's size
//! recorded for the run. A profile look-up runs the same compiled SQL for one key.

use chrono::NaiveDateTime;
use duckdb::{Connection, params, params_from_iter};

use crate::compile::segment_query;
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

/// Evaluates every segment and replaces the pipeline's memberships.
pub fn evaluate(
    connection: &Connection,
    pipeline: &Pipeline,
    run_id: i64,
    as_of: NaiveDateTime,
) -> Result<Vec<SegmentSize>, anyhow::Error> {
    let queries = pipeline
        .segments
        .iter()
        .map(|segment| Ok((segment.name.clone(), segment_query(pipeline, &segment.name, as_of)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let sizes = in_transaction(connection, |c| {
        c.execute("DELETE FROM segmentd.memberships WHERE pipeline = ?", params![pipeline.name])
            .doing("clearing memberships")?;
        let mut sizes = Vec::new();
        for (segment, query) in &queries {
            let mut values = vec![
                duckdb::types::Value::Text(pipeline.name.clone()),
                duckdb::types::Value::Text(segment.clone()),
            ];
            values.extend(sql_params(&query.params));
            let size = c
                .execute(
                    &format!(
                        "INSERT INTO segmentd.memberships (pipeline, segment, key) \
                         SELECT ?, ?, key FROM ({}) AS members",
                        query.sql
                    ),
                    params_from_iter(values),
                )
                .doing(format!("evaluating segment {segment}"))?;
            c.execute(
                "INSERT INTO segmentd.segment_sizes (run_id, pipeline, segment, size) \
                 VALUES (?, ?, ?, ?)",
                params![run_id, pipeline.name, segment, size as i64],
            )
            .doing("recording segment sizes")?;
            tracing::info!(pipeline = %pipeline.name, segment = %segment, size, "segment evaluated");
            sizes.push(SegmentSize { segment: segment.clone(), size: size as i64 });
        }
        Ok::<_, StoreError>(sizes)
    })?;
    Ok(sizes)
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
                &format!("SELECT count(*) FROM ({}) AS members WHERE key = ?", query.sql),
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
