//! Diff and delivery: from memberships to what each destination has confirmed.
//!
//! Planning compares a segment's members with an activation's acknowledged state and writes
//! the delta (adds and removes, cut into numbered batches) to the `deltas` table before
//! anything is sent. Delivery sends the batches through the activation's connector, adds
//! first, and after each batch the platform confirmed, in one transaction, marks its rows
//! delivered or rejected and advances the acknowledged state by exactly the confirmed members.
//! A crash therefore loses nothing and re-sends at most the batch in flight: the next run's
//! delta is computed from the acknowledged state again.
//!
//! Removes carry the identifiers that were sent when the member was added, taken from the
//! acknowledged state, so a member whose email changed is removed by the email the platform
//! knows.

use std::collections::BTreeMap;
use std::sync::Arc;

use duckdb::{Connection, params};
use segmentd_connectors::{Batch, Change, Connector, Member, Outcome, RetryPolicy};

use crate::config::{ActivationDef, Pipeline};
use crate::schema::quote_ident;
use crate::store::{Doing, Store, StoreError, in_transaction};

/// The size of one activation's delta.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaSize {
    /// Members to add.
    pub adds: i64,
    /// Members to remove.
    pub removes: i64,
}

/// What delivering one activation's delta did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Adds the platform confirmed.
    pub delivered_adds: i64,
    /// Removes the platform confirmed.
    pub delivered_removes: i64,
    /// Members the platform refused.
    pub rejected: i64,
    /// Why delivery stopped early, if it did.
    pub error: Option<String>,
}

/// The identifiers of every profile as one JSON object per key, for the activation's columns.
fn identifiers_query(pipeline: &Pipeline, activation: &ActivationDef) -> String {
    let schema = quote_ident(&pipeline.schema());
    let key = quote_ident(&pipeline.master.key);
    let mut joins = String::new();
    let mut fields = Vec::new();
    for identifier in &activation.identifiers {
        let table = pipeline
            .attributes
            .iter()
            .find(|t| t.key != *identifier && t.column_type(identifier).is_some());
        let alias = match table {
            Some(table) => {
                let alias = format!("a_{}", table.name);
                if !joins.contains(&format!(" AS {alias} ")) {
                    joins.push_str(&format!(
                        " LEFT JOIN {schema}.{} AS {alias} ON {alias}.{} = m.{key}",
                        quote_ident(&table.table_name()),
                        quote_ident(&table.key)
                    ));
                }
                alias
            }
            None => "m".to_string(),
        };
        fields.push(format!(
            "{}, CAST({alias}.{} AS VARCHAR)",
            crate::schema::quote_literal(identifier),
            quote_ident(identifier)
        ));
    }
    let object = if fields.is_empty() {
        "'{}'".to_string()
    } else {
        format!("CAST(json_object({}) AS VARCHAR)", fields.join(", "))
    };
    format!(
        "SELECT CAST(m.{key} AS VARCHAR) AS key, {object} AS identifiers \
         FROM {schema}.master AS m{joins}"
    )
}

/// Writes the activation's delta for this run; earlier unsent deltas are superseded, since
/// the acknowledged state they were computed from is the one this delta starts from too.
pub fn plan(
    connection: &Connection,
    pipeline: &Pipeline,
    segment: &str,
    activation: &ActivationDef,
    run_id: i64,
    batch_size: usize,
) -> Result<DeltaSize, StoreError> {
    let identifiers = identifiers_query(pipeline, activation);
    let batch_size = batch_size.max(1) as i64;
    in_transaction(connection, |c| {
        c.execute(
            "UPDATE segmentd.deltas SET status = 'superseded' \
             WHERE pipeline = ? AND activation = ? AND status = 'pending'",
            params![pipeline.name, activation.id],
        )
        .doing("superseding unsent deltas")?;
        let adds = c
            .execute(
                &format!(
                    "INSERT INTO segmentd.deltas \
                     (run_id, pipeline, activation, change, sequence, key, identifiers, status) \
                     SELECT ?, ?, ?, 'add', \
                            CAST((row_number() OVER (ORDER BY m.key) - 1) // ? AS INTEGER), \
                            m.key, p.identifiers, 'pending' \
                     FROM segmentd.memberships AS m \
                     JOIN ({identifiers}) AS p ON p.key = m.key \
                     WHERE m.pipeline = ? AND m.segment = ? AND NOT EXISTS ( \
                         SELECT 1 FROM segmentd.acknowledged AS a \
                         WHERE a.pipeline = m.pipeline AND a.activation = ? AND a.key = m.key)"
                ),
                params![
                    run_id,
                    pipeline.name,
                    activation.id,
                    batch_size,
                    pipeline.name,
                    segment,
                    activation.id
                ],
            )
            .doing("planning adds")?;
        let removes = c
            .execute(
                "INSERT INTO segmentd.deltas \
                 (run_id, pipeline, activation, change, sequence, key, identifiers, status) \
                 SELECT ?, a.pipeline, a.activation, 'remove', \
                        CAST((row_number() OVER (ORDER BY a.key) - 1) // ? AS INTEGER), \
                        a.key, a.identifiers, 'pending' \
                 FROM segmentd.acknowledged AS a \
                 WHERE a.pipeline = ? AND a.activation = ? AND NOT EXISTS ( \
                     SELECT 1 FROM segmentd.memberships AS m \
                     WHERE m.pipeline = a.pipeline AND m.segment = ? AND m.key = a.key)",
                params![run_id, batch_size, pipeline.name, activation.id, segment],
            )
            .doing("planning removes")?;
        Ok(DeltaSize { adds: adds as i64, removes: removes as i64 })
    })
}

/// The batch numbers still pending for an activation's change in a run, in order.
fn pending_sequences(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
    change: Change,
) -> Result<Vec<i32>, StoreError> {
    let mut statement = connection
        .prepare(
            "SELECT DISTINCT sequence FROM segmentd.deltas WHERE pipeline = ? AND activation = ? \
             AND run_id = ? AND change = ? AND status = 'pending' ORDER BY sequence",
        )
        .doing("listing pending batches")?;
    let rows = statement
        .query_map(params![pipeline, activation, run_id, change.as_str()], |r| r.get(0))
        .doing("listing pending batches")?;
    rows.collect::<Result<_, _>>().doing("listing pending batches")
}

fn load_batch(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
    change: Change,
    sequence: i32,
) -> Result<Batch, StoreError> {
    let mut statement = connection
        .prepare(
            "SELECT key, identifiers FROM segmentd.deltas WHERE pipeline = ? AND activation = ? \
             AND run_id = ? AND change = ? AND sequence = ? AND status = 'pending' ORDER BY key",
        )
        .doing("reading a batch")?;
    let rows = statement
        .query_map(params![pipeline, activation, run_id, change.as_str(), sequence], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .doing("reading a batch")?;
    let mut members = Vec::new();
    for row in rows {
        let (key, identifiers) = row.doing("reading a batch")?;
        members.push(Member { key, identifiers: parse_identifiers(&identifiers) });
    }
    Ok(Batch {
        run_id,
        activation: activation.to_string(),
        change,
        sequence: sequence as u32,
        members,
    })
}

/// Reads the identifiers JSON object; missing values are left out.
fn parse_identifiers(json: &str) -> BTreeMap<String, String> {
    let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut identifiers = BTreeMap::new();
    if let serde_json::Value::Object(map) = value {
        for (name, value) in map {
            match value {
                serde_json::Value::Null => {}
                serde_json::Value::String(text) => {
                    identifiers.insert(name, text);
                }
                other => {
                    identifiers.insert(name, other.to_string());
                }
            }
        }
    }
    identifiers
}

/// Records a confirmed batch: rows delivered or rejected, acknowledged state advanced by the
/// members the platform accepted. One transaction.
fn record_outcome(
    connection: &Connection,
    pipeline: &str,
    batch: &Batch,
    outcome: &Outcome,
) -> Result<(), StoreError> {
    in_transaction(connection, |c| {
        c.execute_batch(
            "CREATE OR REPLACE TEMP TABLE batch_outcome \
             (key VARCHAR, status VARCHAR, reason VARCHAR)",
        )
        .doing("recording a batch")?;
        {
            let mut appender = c.appender("batch_outcome").doing("recording a batch")?;
            for key in &outcome.accepted {
                appender
                    .append_row(params![key, "delivered", None::<String>])
                    .doing("recording a batch")?;
            }
            for rejection in &outcome.rejected {
                appender
                    .append_row(params![rejection.key, "rejected", rejection.reason])
                    .doing("recording a batch")?;
            }
            appender.flush().doing("recording a batch")?;
        }
        let scope = params![pipeline, batch.activation, batch.run_id, batch.change.as_str(), batch.sequence];
        c.execute(
            "UPDATE segmentd.deltas AS d SET status = o.status, reason = o.reason \
             FROM batch_outcome AS o \
             WHERE d.pipeline = ? AND d.activation = ? AND d.run_id = ? AND d.change = ? \
             AND d.sequence = ? AND d.status = 'pending' AND d.key = o.key",
            scope,
        )
        .doing("recording a batch")?;
        match batch.change {
            Change::Add => c.execute(
                "INSERT INTO segmentd.acknowledged (pipeline, activation, key, identifiers, run_id) \
                 SELECT d.pipeline, d.activation, d.key, d.identifiers, d.run_id \
                 FROM segmentd.deltas AS d JOIN batch_outcome AS o ON o.key = d.key \
                 WHERE d.pipeline = ? AND d.activation = ? AND d.run_id = ? AND d.change = ? \
                 AND d.sequence = ? AND o.status = 'delivered'",
                scope,
            ),
            Change::Remove => c.execute(
                "DELETE FROM segmentd.acknowledged AS a WHERE a.pipeline = ? AND a.activation = ? \
                 AND a.key IN (SELECT key FROM batch_outcome WHERE status = 'delivered')",
                params![pipeline, batch.activation],
            ),
        }
        .doing("advancing the acknowledged state")?;
        Ok(())
    })
}

/// Sends an activation's pending batches for a run: adds first, then removes. Stops at the
/// first batch that fails after retries; what was confirmed before stays confirmed.
pub async fn deliver(
    store: Arc<Store>,
    pipeline: &Pipeline,
    activation: &ActivationDef,
    connector: Arc<dyn Connector>,
    policy: &RetryPolicy,
    run_id: i64,
) -> Result<DeliveryReport, StoreError> {
    let mut report = DeliveryReport::default();
    for change in [Change::Add, Change::Remove] {
        let sequences = blocking(&store, {
            let (name, id) = (pipeline.name.clone(), activation.id.clone());
            move |c| pending_sequences(c, &name, &id, run_id, change)
        })
        .await?;
        for sequence in sequences {
            let batch = blocking(&store, {
                let (name, id) = (pipeline.name.clone(), activation.id.clone());
                move |c| load_batch(c, &name, &id, run_id, change, sequence)
            })
            .await?;
            let members = batch.members.len();
            match segmentd_connectors::deliver_with_retries(connector.as_ref(), &batch, policy).await
            {
                Ok(outcome) => {
                    let accepted = outcome.accepted.len() as i64;
                    match change {
                        Change::Add => report.delivered_adds += accepted,
                        Change::Remove => report.delivered_removes += accepted,
                    }
                    report.rejected += outcome.rejected.len() as i64;
                    tracing::info!(
                        pipeline = %pipeline.name, activation = %activation.id, run_id,
                        change = change.as_str(), sequence, members, accepted,
                        rejected = outcome.rejected.len(), "batch delivered"
                    );
                    let name = pipeline.name.clone();
                    blocking(&store, move |c| record_outcome(c, &name, &batch, &outcome)).await?;
                }
                Err(err) => {
                    tracing::error!(
                        pipeline = %pipeline.name, activation = %activation.id, run_id,
                        change = change.as_str(), sequence, error = %err,
                        "batch not delivered; the activation stops for this run"
                    );
                    report.error = Some(format!(
                        "{} batch {sequence} not delivered: {err}",
                        change.as_str()
                    ));
                    return Ok(report);
                }
            }
        }
    }
    Ok(report)
}

/// Runs DuckDB work on a blocking thread with its own connection.
pub async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    work: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || {
        let connection = store.connection()?;
        work(&connection)
    })
    .await
    .expect("a DuckDB job panicked")
}

/// Records the activation's part of a run.
pub fn record_activation_run(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
    delta: DeltaSize,
    report: &DeliveryReport,
) -> Result<(), StoreError> {
    let status = if report.error.is_some() { "failed" } else { "delivered" };
    connection
        .execute(
            "INSERT INTO segmentd.activation_runs (run_id, pipeline, activation, adds, removes, \
             delivered_adds, delivered_removes, rejected, status, error) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            params![
                run_id,
                pipeline,
                activation,
                delta.adds,
                delta.removes,
                report.delivered_adds,
                report.delivered_removes,
                report.rejected,
                status,
                report.error
            ],
        )
        .doing("recording the activation's run")?;
    Ok(())
}
