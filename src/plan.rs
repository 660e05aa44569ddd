//! Plans: what a run would do, without doing it.
//!
//! A plan loads the sources into a schema of its own (never the live tables), evaluates every
//! segment there, and computes each activation's delta against the acknowledged state with the
//! same SQL a run uses, then drops what it built. It writes no state table and sends nothing.

use chrono::NaiveDateTime;
use duckdb::{Connection, params_from_iter};
use segmentd_connectors::Change;

use crate::compile::segment_query_in;
use crate::config::{Mode, Pipeline};
use crate::deliver::{
    STAGED_DELTA, audience_size, brake, continued_approval, delta_queries, stage_delta, staged,
};
use crate::schema::{quote_ident, quote_literal};
use crate::store::{Doing, sql_params};

/// How many member keys a plan shows per change.
const SAMPLE: usize = 5;

/// A segment in a plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SegmentPlan {
    /// The segment's name.
    pub segment: String,
    /// Members it would have.
    pub size: i64,
    /// Members it has now.
    pub current: i64,
}

/// An activation in a plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ActivationPlan {
    /// `<segment>/<activation>`.
    pub activation: String,
    /// Members it would add.
    pub adds: i64,
    /// Members it would remove.
    pub removes: i64,
    /// Some keys it would add.
    pub sample_adds: Vec<String>,
    /// Some keys it would remove.
    pub sample_removes: Vec<String>,
    /// For a `mirror` activation, the members of the list it would replace the
    /// destination's with.
    pub replaces: Option<i64>,
    /// Why a brake would hold the delta (or its removes), if one would.
    pub would_hold: Option<String>,
}

/// What a run would do now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// The pipeline.
    pub pipeline: String,
    /// The evaluation instant.
    pub as_of: String,
    /// Profiles the refreshed master segment would have.
    pub profiles: i64,
    /// Why a run now would refuse the refresh (a guard), if it would; the rest of the plan
    /// says what a forced run would do.
    pub refused: Option<String>,
    /// Segments in dependency order.
    pub segments: Vec<SegmentPlan>,
    /// Activations in segment order.
    pub activations: Vec<ActivationPlan>,
}

/// Computes the plan; everything it builds is dropped before it returns.
pub fn plan(
    connection: &Connection,
    pipeline: &Pipeline,
    as_of: NaiveDateTime,
) -> anyhow::Result<Plan> {
    let schema = format!("{}_plan", pipeline.schema());
    let result = plan_in(connection, pipeline, as_of, &schema);
    let _ = connection.execute_batch(&format!(
        "DROP TABLE IF EXISTS planned_members; DROP TABLE IF EXISTS {STAGED_DELTA}; \
         DROP SCHEMA IF EXISTS {} CASCADE;",
        quote_ident(&schema)
    ));
    result
}

fn plan_in(
    connection: &Connection,
    pipeline: &Pipeline,
    as_of: NaiveDateTime,
    schema: &str,
) -> anyhow::Result<Plan> {
    let report = crate::refresh::build_into(connection, pipeline, schema)?;
    let live = quote_ident(&pipeline.schema());
    let refused = match crate::refresh::check_guards(connection, pipeline, &live, report.profiles) {
        Ok(()) => None,
        Err(crate::refresh::RefreshError::Guard { message }) => Some(message),
        Err(other) => return Err(other.into()),
    };
    connection
        .execute_batch(
            "CREATE OR REPLACE TEMP TABLE planned_members (segment VARCHAR, key VARCHAR)",
        )
        .doing("preparing the plan")?;

    let mut segments = Vec::new();
    for segment in &pipeline.segments {
        let query = segment_query_in(pipeline, schema, &segment.name, as_of)?;
        let mut values = vec![duckdb::types::Value::Text(segment.name.clone())];
        values.extend(sql_params(&query.params));
        let size = connection
            .execute(
                &format!(
                    "INSERT INTO planned_members SELECT DISTINCT ?, key FROM ({}) AS m",
                    query.sql
                ),
                params_from_iter(values),
            )
            .doing(format!("evaluating segment {}", segment.name))? as i64;
        let current: i64 = connection
            .query_row(
                "SELECT count(*) FROM segmentd_state.memberships \
                 WHERE pipeline = ? AND segment = ?",
                [&pipeline.name, &segment.name],
                |r| r.get(0),
            )
            .doing("counting current members")?;
        segments.push(SegmentPlan {
            segment: segment.name.clone(),
            size,
            current,
        });
    }

    let mut activations = Vec::new();
    for segment in &pipeline.segments {
        let members = format!(
            "SELECT key FROM planned_members WHERE segment = {}",
            quote_literal(&segment.name)
        );
        for activation in &segment.activations {
            let queries = delta_queries(pipeline, activation, &members, schema);
            let sizes = stage_delta(connection, pipeline, activation, &queries)?;
            let (adds, removes) = (sizes.adds, sizes.removes);
            let sample_adds = sample(connection, &staged(Change::Add))?;
            let sample_removes = sample(connection, &staged(Change::Remove))?;
            let replaces = match activation.mode {
                // An empty list is sent as the removes of everyone, not as a replace.
                Mode::Mirror => {
                    Some(count(connection, &queries.list)?).filter(|members| *members > 0)
                }
                Mode::AddRemove | Mode::AddOnly => None,
            };
            let (joiners, leavers) = (adds - sizes.readds, removes - sizes.changed);
            let audience = audience_size(connection, &pipeline.name, &activation.id)?;
            let mut would_hold = brake(activation, joiners, leavers, audience);
            if would_hold.is_some()
                && continued_approval(
                    connection,
                    &pipeline.name,
                    activation,
                    i64::MAX,
                    &staged(Change::Remove),
                    removes,
                )?
                .is_some()
            {
                // The run would carry on an earlier approval instead of holding the removes.
                would_hold = None;
            }
            activations.push(ActivationPlan {
                activation: activation.id.clone(),
                adds,
                removes,
                sample_adds,
                sample_removes,
                replaces,
                would_hold: would_hold.map(|hold| hold.reason(activation, leavers)),
            });
        }
    }

    Ok(Plan {
        pipeline: pipeline.name.clone(),
        as_of: crate::compile::format_time(as_of),
        profiles: report.profiles,
        refused,
        segments,
        activations,
    })
}

fn count(connection: &Connection, select: &str) -> anyhow::Result<i64> {
    Ok(connection
        .query_row(&format!("SELECT count(*) FROM ({select}) AS d"), [], |r| {
            r.get(0)
        })
        .doing("counting a delta")?)
}

/// The first keys `select` gives, in key order.
fn sample(connection: &Connection, select: &str) -> anyhow::Result<Vec<String>> {
    let mut statement = connection
        .prepare(&format!(
            "SELECT d.key FROM ({select}) AS d ORDER BY d.key LIMIT {SAMPLE}"
        ))
        .doing("sampling a delta")?;
    let keys = statement
        .query_map([], |r| r.get::<_, String>(0))
        .doing("sampling a delta")?
        .collect::<Result<Vec<_>, _>>()
        .doing("sampling a delta")?;
    Ok(keys)
}

impl Plan {
    /// The plan as a table for a terminal.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "plan for pipeline `{}` (as_of {}, {} profiles); nothing has been changed or sent\n",
            self.pipeline, self.as_of, self.profiles
        );
        if let Some(refused) = &self.refused {
            out.push_str(&format!(
                "a run now would refuse the refresh and send nothing: {refused}; below is what \
                 a run with --force would do\n"
            ));
        }
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
        for s in &self.segments {
            out.push_str(&format!(
                "{:<width$}  {:>9}  {:>+9}\n",
                s.segment,
                s.size,
                s.size - s.current
            ));
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
                "\n{:<width$}  {:>8}  {:>8}  note\n",
                "activation", "adds", "removes"
            ));
            for a in &self.activations {
                let note = match (&a.would_hold, a.replaces) {
                    (Some(reason), _) => format!("would be held: {reason}"),
                    (None, Some(members)) => {
                        format!("mirror: would replace the list with {members} members")
                    }
                    (None, None) => String::new(),
                };
                out.push_str(&format!(
                    "{:<width$}  {:>8}  {:>8}  {note}\n",
                    a.activation, a.adds, a.removes
                ));
                if !a.sample_adds.is_empty() {
                    out.push_str(&format!(
                        "{:<width$}    adds e.g. {}\n",
                        "",
                        a.sample_adds.join(", ")
                    ));
                }
                if !a.sample_removes.is_empty() {
                    out.push_str(&format!(
                        "{:<width$}    removes e.g. {}\n",
                        "",
                        a.sample_removes.join(", ")
                    ));
                }
            }
        }
        out
    }
}
