//! One run of a pipeline: refresh, evaluate, plan, deliver, record.
//!
//! [`run`] carries out one run and returns its [`RunSummary`]. It does the DuckDB steps on
//! blocking threads and the deliveries on the async runtime, one activation after another. A
//! refresh that fails ends the run before anything is evaluated or sent. An activation whose
//! delivery fails does not stop the others. Keeping one run at a time per pipeline is the
//! caller's job ([`crate::daemon`] owns one runner task per pipeline; the CLI runs one run).
//!
//! Every step writes the run's record as it goes (the run, its segments' sizes, each
//! activation's delta and delivery), and the deliveries an approval or a restart carries out
//! later add to that record. [`recorded_summary`] reads a run's summary back from it, so any
//! process answers for runs made by any other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use segmentd_connectors::{Connector, RateLimit, RetryPolicy};

use crate::config::{ActivationDef, Config, Pipeline};
use crate::deliver::{self, DeliveryReport, DeltaSize, blocking};
use crate::store::{self, Store, StoreError};

/// How one segment changed in a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SegmentSummary {
    /// The segment's name.
    pub segment: String,
    /// Members now.
    pub size: i64,
    /// Members after the previous evaluation, if there was one.
    pub previous: Option<i64>,
}

/// What happened to one activation in a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ActivationSummary {
    /// `<segment>/<activation>`.
    pub activation: String,
    /// Members to add.
    pub adds: i64,
    /// Members to remove.
    pub removes: i64,
    /// Adds the platform confirmed.
    pub delivered_adds: i64,
    /// Removes the platform confirmed.
    pub delivered_removes: i64,
    /// Members refused.
    pub rejected: i64,
    /// For a `mirror` activation whose replace completed, the members the list now holds.
    pub replaced: Option<i64>,
    /// Whether a brake held the delta, or its removes, for an operator's approval.
    pub held: bool,
    /// Why it was held, if it was.
    pub hold_reason: Option<String>,
    /// Why delivery stopped, if it did.
    pub error: Option<String>,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunSummary {
    /// The run's id.
    pub run_id: i64,
    /// The pipeline.
    pub pipeline: String,
    /// What started it: `cli`, `schedule` or `http`.
    pub trigger: String,
    /// The evaluation instant, wall-clock time in the pipeline's time zone.
    pub as_of: String,
    /// `succeeded`, `held` (some activation waits for approval), `partial` (some activation
    /// failed) or `failed` (the refresh failed or was refused: nothing changed, nothing sent).
    pub status: String,
    /// Why the run failed, if it did.
    pub error: Option<String>,
    /// Profiles in the master segment after the refresh.
    pub profiles: i64,
    /// Segments in dependency order.
    pub segments: Vec<SegmentSummary>,
    /// Activations in segment order.
    pub activations: Vec<ActivationSummary>,
    /// Wall time of the run.
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

fn seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// The `as_of` of a run: an explicit one, else the pipeline's pinned one, else now.
/// It is kept to the microsecond, as the run's record keeps it.
pub fn as_of_for(pipeline: &Pipeline, explicit: Option<NaiveDateTime>) -> NaiveDateTime {
    use chrono::SubsecRound;
    explicit
        .or(pipeline.as_of)
        .unwrap_or_else(|| {
            chrono::Utc::now()
                .with_timezone(&pipeline.time_zone)
                .naive_local()
        })
        .trunc_subsecs(6)
}

/// An activation ready to deliver: its connector and retry policy.
struct Destination {
    segment: String,
    activation: ActivationDef,
    connector: Arc<dyn Connector>,
    policy: RetryPolicy,
    rate_limit: Option<RateLimit>,
}

fn destinations(config: &Config, pipeline: &Pipeline) -> anyhow::Result<Vec<Destination>> {
    let mut destinations = Vec::new();
    for segment in &pipeline.segments {
        for activation in &segment.activations {
            let connection = &config.daemon.connections[&activation.connection];
            let connector = segmentd_connectors::build(
                &connection.kind,
                &connection.settings,
                &activation.settings,
                &connection.secrets,
            )
            .map_err(|errors| {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                anyhow::anyhow!("activation `{}`: {}", activation.id, errors.join("; "))
            })?;
            destinations.push(Destination {
                segment: segment.name.clone(),
                activation: activation.clone(),
                connector: Arc::from(connector),
                policy: connection.retry.clone(),
                rate_limit: connection.rate_limit.clone(),
            });
        }
    }
    Ok(destinations)
}

/// How a run is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Evaluate at this wall-clock time instead of the pinned `as_of` or now.
    pub as_of: Option<NaiveDateTime>,
    /// Accept a refresh that breaks the pipeline's guards.
    pub force: bool,
}

/// A fingerprint of the source files: their paths, sizes and modification times.
fn data_fingerprint(pipeline: &Pipeline) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for source in &pipeline.sources {
        let metadata = std::fs::metadata(&source.path).ok();
        let size = metadata.as_ref().map(|m| m.len()).unwrap_or(0);
        let modified = metadata
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        hasher.update(format!("{}|{size}|{modified};", source.path.display()).as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Finishes runs a stopped process left unfinished: records the activations it planned but
/// had not recorded, delivers their pending batches, then records how they ended. Returns
/// their summaries, as recorded.
pub async fn resume_interrupted(
    store: Arc<Store>,
    config: &Config,
    pipeline: &Pipeline,
) -> anyhow::Result<Vec<RunSummary>> {
    let runs = {
        let name = pipeline.name.clone();
        blocking(&store, move |c| store::unfinished_runs(c, &name)).await?
    };
    let mut summaries = Vec::new();
    for run_id in runs {
        tracing::warn!(pipeline = %pipeline.name, run_id, "resuming a run a stop interrupted");
        let planned = {
            let name = pipeline.name.clone();
            blocking(&store, move |c| {
                deliver::record_unrecorded(c, &name, run_id)?;
                deliver::planned_activations(c, &name, run_id)
            })
            .await?
        };
        if planned == 0 {
            // Stopped before any delta was written: nothing to resume, the next run starts over.
            let message = "the process stopped before any delta was planned; nothing was sent";
            blocking(&store, move |c| {
                store::finish_run(c, run_id, "interrupted", Some(message))
            })
            .await?;
            continue;
        }
        deliver_pending(&store, config, pipeline, run_id).await?;
        let (status, note) = settle(&store, &pipeline.name, run_id).await?;
        blocking(&store, move |c| {
            store::finish_run(c, run_id, &status, note.as_deref())
        })
        .await?;
        let owned = pipeline.clone();
        if let Some(summary) =
            blocking(&store, move |c| recorded_summary(c, &owned, run_id)).await?
        {
            tracing::info!(
                pipeline = %pipeline.name, run_id, status = %summary.status,
                "interrupted run finished"
            );
            summaries.push(summary);
        }
    }
    Ok(summaries)
}

/// Delivers a run's pending batches (after an interruption or an approval), activation by
/// activation, and adds what each delivery did to the activation's record of the run.
pub async fn deliver_pending(
    store: &Arc<Store>,
    config: &Config,
    pipeline: &Pipeline,
    run_id: i64,
) -> anyhow::Result<Vec<ActivationSummary>> {
    let pending = {
        let name = pipeline.name.clone();
        blocking(store, move |c| {
            deliver::activations_with_pending(c, &name, run_id)
        })
        .await?
    };
    let mut summaries = Vec::new();
    for destination in destinations(config, pipeline)? {
        if !pending.contains(&destination.activation.id) {
            continue;
        }
        let report = deliver::deliver(
            Arc::clone(store),
            pipeline,
            &destination.activation,
            Arc::clone(&destination.connector),
            &destination.policy,
            destination.rate_limit.as_ref(),
            run_id,
        )
        .await?;
        {
            let (name, id, report) = (
                pipeline.name.clone(),
                destination.activation.id.clone(),
                report.clone(),
            );
            blocking(store, move |c| {
                deliver::record_delivery(c, &name, &id, run_id, &report)
            })
            .await?;
        }
        summaries.push(ActivationSummary {
            activation: destination.activation.id.clone(),
            adds: report.delivered_adds,
            removes: report.delivered_removes,
            delivered_adds: report.delivered_adds,
            delivered_removes: report.delivered_removes,
            rejected: report.rejected,
            replaced: report.replaced,
            held: false,
            hold_reason: None,
            error: report.error,
        });
    }
    for id in pending {
        if !summaries.iter().any(|s| s.activation == id) {
            tracing::warn!(
                pipeline = %pipeline.name, run_id, activation = %id,
                "pending batches of an activation that is no longer configured are left unsent"
            );
        }
    }
    Ok(summaries)
}

/// Approves a run's held deltas (of one activation or all) and delivers them.
pub async fn approve(
    store: Arc<Store>,
    config: &Config,
    pipeline: &Pipeline,
    run_id: i64,
    activation: Option<String>,
) -> anyhow::Result<Vec<ActivationSummary>> {
    let definition = pipeline.clone();
    let released = tokio::task::spawn_blocking({
        let store = Arc::clone(&store);
        move || -> anyhow::Result<Vec<String>> {
            let connection = store.connection()?;
            match deliver::approve(&connection, &definition, run_id, activation.as_deref()) {
                // Approved before, and its sending stopped part way (the process was
                // stopped): approving again sends what is left.
                Err(deliver::ApproveError::NothingHeld { .. })
                    if !deliver::activations_with_pending(
                        &connection,
                        &definition.name,
                        run_id,
                    )?
                    .is_empty() =>
                {
                    Ok(Vec::new())
                }
                approved => Ok(approved?),
            }
        }
    })
    .await
    .expect("a DuckDB job panicked")?;
    tracing::info!(
        pipeline = %pipeline.name, run_id, activations = released.len(), "held deltas approved"
    );
    let delivered = deliver_pending(&store, config, pipeline, run_id).await?;
    let (status, note) = settle(&store, &pipeline.name, run_id).await?;
    tracing::info!(pipeline = %pipeline.name, run_id, status = %status, "approved run delivered");
    blocking(&store, move |c| {
        store::record_outcome(c, run_id, &status, note.as_deref())
    })
    .await?;
    Ok(delivered)
}

/// A run's status and its note for the operator, from how many activations failed and how
/// many a brake holds.
fn outcome(pipeline: &str, run_id: i64, failed: usize, held: usize) -> (String, Option<String>) {
    let status = match (failed, held) {
        (0, 0) => "succeeded",
        (0, _) => "held",
        _ => "partial",
    };
    let mut notes = Vec::new();
    if failed > 0 {
        notes.push(format!("{failed} activation(s) not fully delivered"));
    }
    if held > 0 {
        notes.push(format!(
            "{held} activation(s) held by a brake; approve with `segmentd approve {pipeline} \
             {run_id}`"
        ));
    }
    let note = if notes.is_empty() {
        None
    } else {
        Some(notes.join("; "))
    };
    (status.to_string(), note)
}

/// A run's status and note from its activations' records.
async fn settle(
    store: &Arc<Store>,
    pipeline: &str,
    run_id: i64,
) -> Result<(String, Option<String>), StoreError> {
    let (failed, held) = blocking(store, move |c| deliver::run_outcome(c, run_id)).await?;
    Ok(outcome(pipeline, run_id, failed, held))
}

/// Sets a summary's final status and records it.
async fn finish(
    store: &Arc<Store>,
    summary: &mut RunSummary,
    started: Instant,
) -> anyhow::Result<()> {
    let failed = summary
        .activations
        .iter()
        .filter(|a| a.error.is_some())
        .count();
    let held = summary.activations.iter().filter(|a| a.held).count();
    (summary.status, summary.error) = outcome(&summary.pipeline, summary.run_id, failed, held);
    summary.elapsed = started.elapsed();
    let (run_id, status, error) = (
        summary.run_id,
        summary.status.clone(),
        summary.error.clone(),
    );
    blocking(store, move |c| {
        store::finish_run(c, run_id, &status, error.as_deref())
    })
    .await?;
    tracing::info!(
        pipeline = %summary.pipeline, run_id, status = %summary.status,
        elapsed_ms = summary.elapsed.as_millis() as u64, "run finished"
    );
    Ok(())
}

/// Carries out one run of `pipeline`, after finishing any run a stop interrupted.
pub async fn run(
    store: Arc<Store>,
    config: &Config,
    pipeline: &Pipeline,
    trigger: &str,
    options: RunOptions,
) -> anyhow::Result<RunSummary> {
    resume_interrupted(Arc::clone(&store), config, pipeline).await?;
    let started = Instant::now();
    let as_of = as_of_for(pipeline, options.as_of);
    let destinations = destinations(config, pipeline)?;

    let run_id = {
        let (name, trigger) = (pipeline.name.clone(), trigger.to_string());
        blocking(&store, move |c| store::start_run(c, &name, &trigger, as_of)).await?
    };
    tracing::info!(pipeline = %pipeline.name, run_id, trigger, as_of = %as_of, "run started");
    let mut summary = RunSummary {
        run_id,
        pipeline: pipeline.name.clone(),
        trigger: trigger.to_string(),
        as_of: crate::compile::format_time(as_of),
        status: "running".into(),
        error: None,
        profiles: 0,
        segments: Vec::new(),
        activations: Vec::new(),
        elapsed: Duration::ZERO,
    };

    let inputs = crate::evaluate::Inputs {
        data_fingerprint: data_fingerprint(pipeline),
        forced: options.force,
    };
    match refresh_and_evaluate(&store, pipeline, run_id, as_of, &inputs, &mut summary).await {
        Ok(()) => {}
        Err(err) => {
            let message = format!("{err:#}");
            tracing::error!(
                pipeline = %pipeline.name, run_id, error = %message,
                "run failed; nothing was changed or sent"
            );
            summary.status = "failed".into();
            summary.error = Some(message.clone());
            summary.elapsed = started.elapsed();
            blocking(&store, move |c| {
                store::finish_run(c, run_id, "failed", Some(&message))
            })
            .await?;
            return Ok(summary);
        }
    }

    for destination in destinations {
        let activation = destination.activation.clone();
        let delta = {
            let (pipeline, segment, activation) = (
                pipeline.clone(),
                destination.segment.clone(),
                activation.clone(),
            );
            let batch_size = destination.connector.max_batch_size();
            blocking(&store, move |c| {
                deliver::plan(c, &pipeline, &segment, &activation, run_id, batch_size)
            })
            .await?
        };
        tracing::info!(
            pipeline = %pipeline.name, activation = %activation.id, run_id,
            adds = delta.adds, removes = delta.removes, held = delta.held(), "delta planned"
        );
        let hold_reason = delta.note(&activation);
        let report = if delta
            .hold
            .is_some_and(|hold| hold.holds_adds(activation.mode))
        {
            DeliveryReport::default()
        } else {
            deliver::deliver(
                Arc::clone(&store),
                pipeline,
                &activation,
                Arc::clone(&destination.connector),
                &destination.policy,
                destination.rate_limit.as_ref(),
                run_id,
            )
            .await?
        };
        record_activation(
            &store,
            pipeline,
            &activation,
            run_id,
            delta,
            &hold_reason,
            &report,
        )
        .await?;
        summary.activations.push(ActivationSummary {
            activation: activation.id.clone(),
            adds: delta.adds,
            removes: delta.removes,
            delivered_adds: report.delivered_adds,
            delivered_removes: report.delivered_removes,
            rejected: report.rejected,
            replaced: report.replaced,
            held: delta.held(),
            hold_reason,
            error: report.error.clone(),
        });
    }

    finish(&store, &mut summary, started).await?;
    Ok(summary)
}

async fn refresh_and_evaluate(
    store: &Arc<Store>,
    pipeline: &Pipeline,
    run_id: i64,
    as_of: NaiveDateTime,
    inputs: &crate::evaluate::Inputs,
    summary: &mut RunSummary,
) -> anyhow::Result<()> {
    let previous = {
        let name = pipeline.name.clone();
        blocking(store, move |c| store::last_sizes(c, &name)).await?
    };
    let owned = pipeline.clone();
    let store = Arc::clone(store);
    let inputs = inputs.clone();
    let (report, sizes) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let connection = store.connection()?;
        let report = crate::refresh::refresh(&connection, &owned, inputs.forced)?;
        let sizes = crate::evaluate::evaluate(&connection, &owned, run_id, as_of, &inputs)?;
        store::record_profiles(&connection, run_id, report.profiles)?;
        Ok((report, sizes))
    })
    .await
    .expect("a DuckDB job panicked")?;
    summary.profiles = report.profiles;
    summary.segments = sizes
        .into_iter()
        .map(|s| SegmentSummary {
            previous: previous.get(&s.segment).map(|(size, _)| *size),
            segment: s.segment,
            size: s.size,
        })
        .collect();
    Ok(())
}

async fn record_activation(
    store: &Arc<Store>,
    pipeline: &Pipeline,
    activation: &ActivationDef,
    run_id: i64,
    delta: DeltaSize,
    hold_reason: &Option<String>,
    report: &DeliveryReport,
) -> Result<(), StoreError> {
    let (name, id, report) = (pipeline.name.clone(), activation.id.clone(), report.clone());
    let reason = hold_reason.clone();
    blocking(store, move |c| {
        deliver::record_activation_run(c, &name, &id, run_id, delta, reason.as_deref(), &report)
    })
    .await
}

/// A run's summary, read from its record; `None` if the pipeline has no such run. Segments
/// and activations come in the pipeline's order; any the configuration no longer has follow,
/// by name.
pub fn recorded_summary(
    connection: &duckdb::Connection,
    pipeline: &Pipeline,
    run_id: i64,
) -> Result<Option<RunSummary>, StoreError> {
    use duckdb::params;
    use store::Doing;

    let run = connection.query_row(
        "SELECT trigger, epoch_us(as_of), status, error, coalesce(profiles, 0), \
                    date_diff('microsecond', started_at, \
                              coalesce(finished_at, current_timestamp::TIMESTAMP)) \
             FROM segmentd_state.runs WHERE pipeline = ? AND run_id = ?",
        params![pipeline.name, run_id],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        },
    );
    let (trigger, as_of, status, error, profiles, elapsed) = match run {
        Ok(run) => run,
        Err(duckdb::Error::QueryReturnedNoRows) => return Ok(None),
        Err(err) => return Err(err).doing("reading the run"),
    };
    let as_of = chrono::DateTime::from_timestamp_micros(as_of)
        .map(|t| crate::compile::format_time(t.naive_utc()))
        .unwrap_or_default();

    let mut statement = connection
        .prepare(
            "SELECT s.segment, s.size, \
                    (SELECT arg_max(p.size, p.run_id) FROM segmentd_state.segment_sizes AS p \
                     WHERE p.pipeline = s.pipeline AND p.segment = s.segment \
                     AND p.run_id < s.run_id) \
             FROM segmentd_state.segment_sizes AS s WHERE s.pipeline = ? AND s.run_id = ?",
        )
        .doing("reading the run's segments")?;
    let mut segments: Vec<SegmentSummary> = statement
        .query_map(params![pipeline.name, run_id], |r| {
            Ok(SegmentSummary {
                segment: r.get(0)?,
                size: r.get(1)?,
                previous: r.get(2)?,
            })
        })
        .doing("reading the run's segments")?
        .collect::<Result<_, _>>()
        .doing("reading the run's segments")?;
    let segment_order: Vec<&str> = pipeline.segments.iter().map(|s| s.name.as_str()).collect();
    segments.sort_by(|a, b| {
        in_order(&segment_order, &a.segment).cmp(&in_order(&segment_order, &b.segment))
    });

    let mut statement = connection
        .prepare(&format!(
            "SELECT activation, adds, removes, delivered_adds, delivered_removes, rejected, \
                    replaced, {}, hold_reason, error \
             FROM segmentd_state.activation_runs WHERE pipeline = ? AND run_id = ?",
            deliver::HELD
        ))
        .doing("reading the run's activations")?;
    let mut activations: Vec<ActivationSummary> = statement
        .query_map(params![pipeline.name, run_id], |r| {
            Ok(ActivationSummary {
                activation: r.get(0)?,
                adds: r.get(1)?,
                removes: r.get(2)?,
                delivered_adds: r.get(3)?,
                delivered_removes: r.get(4)?,
                rejected: r.get(5)?,
                replaced: r.get(6)?,
                held: r.get(7)?,
                hold_reason: r.get(8)?,
                error: r.get(9)?,
            })
        })
        .doing("reading the run's activations")?
        .collect::<Result<_, _>>()
        .doing("reading the run's activations")?;
    let activation_order: Vec<&str> = pipeline
        .segments
        .iter()
        .flat_map(|s| s.activations.iter().map(|a| a.id.as_str()))
        .collect();
    activations.sort_by(|a, b| {
        in_order(&activation_order, &a.activation).cmp(&in_order(&activation_order, &b.activation))
    });

    Ok(Some(RunSummary {
        run_id,
        pipeline: pipeline.name.clone(),
        trigger,
        as_of,
        status,
        error,
        profiles,
        segments,
        activations,
        elapsed: Duration::from_micros(u64::try_from(elapsed).unwrap_or(0)),
    }))
}

/// The summary of the pipeline's latest run, whichever process made it; `None` before its
/// first run.
pub fn latest_summary(
    connection: &duckdb::Connection,
    pipeline: &Pipeline,
) -> Result<Option<RunSummary>, StoreError> {
    match store::latest_run(connection, &pipeline.name)? {
        Some(run_id) => recorded_summary(connection, pipeline, run_id),
        None => Ok(None),
    }
}

/// Where a name comes in the configuration's order; names it no longer has come last, by name.
fn in_order<'a>(order: &[&str], name: &'a str) -> (usize, &'a str) {
    let position = order.iter().position(|n| *n == name).unwrap_or(order.len());
    (position, name)
}

/// An activation's last column in the terminal table: its error, what a brake holds, or what
/// was delivered, with the note of an approval it was sent under.
fn activation_status(a: &ActivationSummary) -> String {
    if let Some(error) = &a.error {
        return error.clone();
    }
    if a.held {
        return match &a.hold_reason {
            Some(reason) => format!("held: {reason}"),
            None => "held".to_string(),
        };
    }
    let done = match a.replaced {
        Some(members) => format!("replaced ({members} members)"),
        None => "delivered".to_string(),
    };
    match &a.hold_reason {
        Some(note) => format!("{done}; {note}"),
        None => done,
    }
}

impl RunSummary {
    /// The summary as a table for a terminal.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "run {} of pipeline `{}`: {} (as_of {}, {} profiles, {:.1} s)\n",
            self.run_id,
            self.pipeline,
            self.status,
            self.as_of,
            self.profiles,
            self.elapsed.as_secs_f64()
        ));
        if let Some(error) = &self.error {
            // A held run succeeded: what it says is what waits, not an error.
            let label = if self.status == "held" {
                "waiting"
            } else {
                "error"
            };
            out.push_str(&format!("{label}: {error}\n"));
        }
        if !self.segments.is_empty() {
            let width = self
                .segments
                .iter()
                .map(|s| s.segment.len())
                .max()
                .unwrap_or(7)
                .max(7);
            out.push_str(&format!(
                "\n{:<width$}  {:>9}  {:>9}\n",
                "segment", "size", "change"
            ));
            for segment in &self.segments {
                let change = match segment.previous {
                    Some(previous) => format!("{:+}", segment.size - previous),
                    None => "new".into(),
                };
                out.push_str(&format!(
                    "{:<width$}  {:>9}  {:>9}\n",
                    segment.segment, segment.size, change
                ));
            }
        }
        if !self.activations.is_empty() {
            let width = self
                .activations
                .iter()
                .map(|a| a.activation.len())
                .max()
                .unwrap_or(10)
                .max(10);
            out.push_str(&format!(
                "\n{:<width$}  {:>8}  {:>8}  {:>9}  {:>8}  status\n",
                "activation", "adds", "removes", "delivered", "rejected"
            ));
            for a in &self.activations {
                out.push_str(&format!(
                    "{:<width$}  {:>8}  {:>8}  {:>9}  {:>8}  {}\n",
                    a.activation,
                    a.adds,
                    a.removes,
                    a.delivered_adds + a.delivered_removes,
                    a.rejected,
                    activation_status(a)
                ));
            }
        }
        out
    }
}
