//! Diff and delivery: from memberships to what each destination has confirmed.
//!
//! Planning compares a segment's members with an activation's acknowledged state and writes
//! the delta (adds and removes, cut into numbered batches) to the `deltas` table before
//! anything is sent. Delivery sends the batches through the activation's connector: the
//! removes of members whose identifiers changed, then the adds, then the other removes; after
//! each batch the platform confirmed, in one transaction, marks its rows
//! delivered or rejected and advances the acknowledged state by exactly the confirmed members.
//! A crash therefore loses nothing and re-sends at most the batch in flight: the next run's
//! delta is computed from the acknowledged state again.
//!
//! Removes carry the identifiers that were sent when the member was added, taken from the
//! acknowledged state, so a member whose email changed is removed by the email the platform
//! knows; a member whose identifiers changed gets a remove of the old and an add of the new.
//!
//! Safety brakes live here too: a delta that would remove more than the activation's
//! `max_removal_share` of its audience is held until an operator approves it; `add_only`
//! activations never remove; members the platform keeps rejecting go to the dead letter after
//! `dead_letter_after_runs` runs and are left out of later deltas until retried. An approval
//! covers the removes it approved: the rest of them, planned again after a delivery that
//! stopped part-way, is not held again ([`continued_approval`]). Approvals, and deliveries a
//! restart finishes, add to the activation's record of the run (`activation_runs`), which says
//! why a delta was held or which approval it was sent under.

use std::collections::BTreeMap;
use std::sync::Arc;

use duckdb::{Connection, params};
use segmentd_connectors::{
    Batch, Change, Connector, Member, Outcome, RateLimit, Replace, RetryPolicy,
};

use crate::config::{ActivationDef, Mode, Pipeline};
use crate::schema::{json_key_path, quote_ident, quote_literal};
use crate::store::{Doing, Store, StoreError, in_transaction};

/// The size of one activation's delta.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaSize {
    /// Members to add.
    pub adds: i64,
    /// Members to remove.
    pub removes: i64,
    /// Members of the list a `mirror` activation sends to replace the destination's; 0 for
    /// other activations.
    pub replaces: i64,
    /// Removes of members who stay with new identifiers that have a value.
    pub changed: i64,
    /// Adds of members the audience already holds under other identifiers.
    pub readds: i64,
    /// Which brake held the delta, if one did.
    pub hold: Option<Hold>,
    /// The approval whose removes this delta carries on, when a brake would otherwise hold it.
    pub continues: Option<Continuation>,
}

impl DeltaSize {
    /// Members who join: the adds less those of members the audience already holds.
    pub fn joiners(&self) -> i64 {
        self.adds - self.readds
    }

    /// Members who leave: the removes less the identifier changes.
    pub fn leavers(&self) -> i64 {
        self.removes - self.changed
    }

    /// Whether a brake held some of the delta.
    pub fn held(&self) -> bool {
        self.hold.is_some()
    }

    /// What the run record says about the brakes: why the delta was held, or which approval
    /// it carries on.
    pub fn note(&self, activation: &ActivationDef) -> Option<String> {
        match (self.hold, self.continues) {
            (Some(hold), _) => Some(hold.reason(activation, self.leavers())),
            (None, Some(continuation)) => Some(continuation.note()),
            (None, None) => None,
        }
    }
}

/// Why a delta, or its removes, wait for an operator's approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The run would remove more than `max_removal_share` of the audience: the whole delta
    /// waits.
    RemovalShare {
        /// The acknowledged audience before the run.
        audience: i64,
    },
    /// The removes would take the audience below `min_audience_size`: the adds go out, the
    /// removes wait.
    MinimumAudience {
        /// The audience the delta would leave.
        after: i64,
        /// The activation's minimum.
        minimum: u64,
    },
}

impl Hold {
    /// Whether the adds wait too. A replace cannot be split, so a `mirror` activation's
    /// whole delta waits whichever brake holds it.
    pub fn holds_adds(self, mode: Mode) -> bool {
        matches!(self, Hold::RemovalShare { .. }) || mode == Mode::Mirror
    }

    /// Why, in words for the operator. What to do about it (the `approve` command with the
    /// run's id) is in the run's summary, which knows the run.
    pub fn reason(self, activation: &ActivationDef, leavers: i64) -> String {
        match self {
            Hold::RemovalShare { audience } => format!(
                "{leavers} removes of an audience of {audience} are more than max_removal_share \
                 ({})",
                activation.max_removal_share
            ),
            Hold::MinimumAudience { after, minimum } if activation.mode == Mode::Mirror => {
                format!(
                    "the replace would leave {after} members, below the platform's minimum \
                     audience of {minimum} (min_audience_size)"
                )
            }
            Hold::MinimumAudience { after, minimum } => format!(
                "the removes would leave {after} members, below the platform's minimum audience \
                 of {minimum} (min_audience_size); the adds were sent"
            ),
        }
    }
}

/// An operator's approval that a delta's removes carry on: the brake would hold them, but they
/// are what is left of removes an operator approved in an earlier run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Continuation {
    /// The run whose held delta the operator approved.
    pub approval_run: i64,
    /// Removes that approval covered.
    pub approved: i64,
    /// Removes of this delta, all among the approved ones not yet confirmed.
    pub left: i64,
}

impl Continuation {
    /// What the run record says instead of a hold reason.
    pub fn note(self) -> String {
        format!(
            "continues the approval of run {}: {} removes left of the {} it approved, not held \
             again",
            self.approval_run, self.left, self.approved
        )
    }
}

/// Which brake, if any, holds a delta in which `joiners` members join and `leavers` leave an
/// audience of `audience` (members whose identifiers change are neither: they stay).
pub fn brake(
    activation: &ActivationDef,
    joiners: i64,
    leavers: i64,
    audience: i64,
) -> Option<Hold> {
    let (adds, removes) = (joiners, leavers);
    if over_removal_limit(activation, removes, audience) {
        return Some(Hold::RemovalShare { audience });
    }
    let after = audience + adds - removes;
    match activation.min_audience_size {
        Some(minimum) if removes > 0 && after < minimum as i64 => {
            Some(Hold::MinimumAudience { after, minimum })
        }
        _ => None,
    }
}

/// The approval a delta's removes carry on, if they do: `removes` selects the `(key,
/// identifiers)` of the delta's removes (`count` of them) that run `run_id` plans.
///
/// They carry on an approval only when all of this is true; otherwise the brakes apply as
/// usual. The activation adds and removes (a `mirror` replace is one list, not removes an
/// approval could cover). The activation's latest earlier delta is the approved one or one that
/// carried it on, so nothing else was planned in between. Every remove is one the operator
/// approved, for the same member with the same identifiers, and no run has had it confirmed
/// since: a member removed, added back and leaving again is a new removal.
pub fn continued_approval(
    connection: &Connection,
    pipeline: &str,
    activation: &ActivationDef,
    run_id: i64,
    removes: &str,
    count: i64,
) -> Result<Option<Continuation>, StoreError> {
    if activation.mode != Mode::AddRemove || count == 0 {
        return Ok(None);
    }
    let approval_run: Option<i64> = connection
        .query_row(
            "SELECT (SELECT approval_run FROM segmentd_state.activation_runs \
             WHERE pipeline = ? AND activation = ? AND run_id < ? ORDER BY run_id DESC LIMIT 1)",
            params![pipeline, activation.id, run_id],
            |r| r.get(0),
        )
        .doing("finding the activation's last approval")?;
    let Some(approval_run) = approval_run else {
        return Ok(None);
    };
    let approved: i64 = connection
        .query_row(
            "SELECT count(*) FROM segmentd_state.deltas WHERE pipeline = ? AND activation = ? \
             AND run_id = ? AND change = 'remove'",
            params![pipeline, activation.id, approval_run],
            |r| r.get(0),
        )
        .doing("counting the approved removes")?;
    let not_approved: i64 = connection
        .query_row(
            &format!(
                "SELECT count(*) FROM ({removes}) AS r \
                 WHERE NOT EXISTS (SELECT 1 FROM segmentd_state.deltas AS a \
                     WHERE a.pipeline = $1 AND a.activation = $2 AND a.run_id = $3 \
                     AND a.change = 'remove' AND a.key = r.key AND a.identifiers = r.identifiers) \
                 OR EXISTS (SELECT 1 FROM segmentd_state.deltas AS s \
                     WHERE s.pipeline = $1 AND s.activation = $2 AND s.run_id >= $3 \
                     AND s.run_id < $4 AND s.change = 'remove' AND s.status = 'delivered' \
                     AND s.key = r.key AND s.identifiers = r.identifiers)"
            ),
            params![pipeline, activation.id, approval_run, run_id],
            |r| r.get(0),
        )
        .doing("comparing the removes with the approved ones")?;
    if not_approved > 0 || count > approved {
        return Ok(None);
    }
    Ok(Some(Continuation {
        approval_run,
        approved,
        left: count,
    }))
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
    /// For a `mirror` activation whose replace completed, the members the list now holds.
    pub replaced: Option<i64>,
    /// Why delivery stopped early, if it did.
    pub error: Option<String>,
}

/// The identifiers of every profile as one JSON object per key, for the activation's columns.
fn identifiers_query(
    pipeline: &Pipeline,
    activation: &ActivationDef,
    master_schema: &str,
) -> String {
    let schema = quote_ident(master_schema);
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
            quote_literal(identifier),
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

/// The SQL of an activation's delta, each selecting `(key, identifiers)`.
#[derive(Debug, Clone)]
pub struct DeltaQueries {
    /// Members to add: in the segment, not acknowledged with these identifiers, or with
    /// removes of other identifiers staged in [`STAGED_DELTA`] (so it runs after them).
    adds: String,
    /// Members to remove: acknowledged, no longer in the segment with those identifiers.
    removes: String,
    /// The whole list a `mirror` activation replaces the destination's with: the segment's
    /// members, less those whose add is dead-lettered.
    pub list: String,
    /// Whether the identifiers of an add `n` have a value to send.
    usable: String,
}

/// The temporary table [`stage_delta`] fills: `(change, key, identifiers)`, `change` being
/// `add` or `remove`.
pub const STAGED_DELTA: &str = "staged_delta";

/// The sizes of a staged delta.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StagedSizes {
    /// Members to add.
    pub adds: i64,
    /// Members to remove.
    pub removes: i64,
    /// Removes of members who stay with new identifiers that have a value: they are added
    /// again with the new ones, so the brakes do not count them as leaving.
    pub changed: i64,
    /// Adds of members the audience already holds under other identifiers: the brakes do not
    /// count them as joining, whether or not their new identifiers have a value.
    pub readds: i64,
}

/// Evaluates the activation's removes, then its adds, once each into [`STAGED_DELTA`], and
/// sizes them; everything planned from the delta reads that table.
pub fn stage_delta(
    connection: &Connection,
    pipeline: &Pipeline,
    activation: &ActivationDef,
    queries: &DeltaQueries,
) -> Result<StagedSizes, StoreError> {
    let (removes, adds, usable) = (&queries.removes, &queries.adds, &queries.usable);
    connection
        .execute_batch(&format!(
            "CREATE OR REPLACE TEMP TABLE {STAGED_DELTA} AS \
                 SELECT 'remove' AS change, key, identifiers FROM ({removes}); \
             INSERT INTO {STAGED_DELTA} SELECT 'add', key, identifiers FROM ({adds});"
        ))
        .doing("staging the delta")?;
    connection
        .query_row(
            &format!(
                "SELECT count(*) FILTER (d.change = 'add'), count(*) FILTER (d.change = 'remove'), \
                        count(*) FILTER (d.change = 'remove' AND EXISTS ( \
                            SELECT 1 FROM {STAGED_DELTA} AS n \
                            WHERE n.change = 'add' AND n.key = d.key AND ({usable}))), \
                        count(*) FILTER (d.change = 'add' AND EXISTS ( \
                            SELECT 1 FROM segmentd_state.acknowledged AS a \
                            WHERE a.pipeline = $1 AND a.activation = $2 AND a.key = d.key)) \
                 FROM {STAGED_DELTA} AS d"
            ),
            params![pipeline.name, activation.id],
            |r| {
                Ok(StagedSizes {
                    adds: r.get(0)?,
                    removes: r.get(1)?,
                    changed: r.get(2)?,
                    readds: r.get(3)?,
                })
            },
        )
        .doing("sizing the delta")
}

/// The staged members of one change, as `(key, identifiers)`.
pub fn staged(change: Change) -> String {
    format!(
        "SELECT key, identifiers FROM {STAGED_DELTA} WHERE change = '{}'",
        change.as_str()
    )
}

/// The delta's SQL for an activation whose segment's members are selected by `members` (a
/// query returning `key`).
pub fn delta_queries(
    pipeline: &Pipeline,
    activation: &ActivationDef,
    members: &str,
    master_schema: &str,
) -> DeltaQueries {
    let identifiers = identifiers_query(pipeline, activation, master_schema);
    let name = quote_literal(&pipeline.name);
    let id = quote_literal(&activation.id);
    let current = format!(
        "SELECT p.key, p.identifiers FROM ({members}) AS s \
         JOIN ({identifiers}) AS p ON p.key = s.key"
    );
    let list = format!(
        "SELECT c.key, c.identifiers FROM ({current}) AS c \
         WHERE NOT EXISTS (SELECT 1 FROM segmentd_state.dead_letters AS d \
             WHERE d.pipeline = {name} AND d.activation = {id} AND d.change = 'add' AND d.dead \
             AND d.key = c.key)"
    );
    let removes = match activation.mode {
        Mode::AddOnly => {
            "SELECT key, identifiers FROM segmentd_state.acknowledged WHERE FALSE".to_string()
        }
        Mode::AddRemove | Mode::Mirror => format!(
            "SELECT a.key, a.identifiers FROM segmentd_state.acknowledged AS a \
             WHERE a.pipeline = {name} AND a.activation = {id} \
             AND NOT EXISTS (SELECT 1 FROM ({current}) AS c \
                 WHERE c.key = a.key AND c.identifiers = a.identifiers) \
             AND NOT EXISTS (SELECT 1 FROM segmentd_state.dead_letters AS d \
                 WHERE d.pipeline = {name} AND d.activation = {id} AND d.change = 'remove' \
                 AND d.dead AND d.key = a.key)"
        ),
    };
    // A member whose identifiers changed is removed by the old ones and added again by the
    // new ones while any remove of its old ones is still to be sent, even if the new ones
    // were confirmed before (a remove held or refused in an earlier run): a platform that
    // knows members by key would otherwise end without the member.
    let adds = format!(
        "SELECT l.key, l.identifiers FROM ({list}) AS l \
         WHERE NOT EXISTS (SELECT 1 FROM segmentd_state.acknowledged AS a \
             WHERE a.pipeline = {name} AND a.activation = {id} AND a.key = l.key \
             AND a.identifiers = l.identifiers) \
         OR EXISTS (SELECT 1 FROM {STAGED_DELTA} AS r WHERE r.change = 'remove' \
             AND r.key = l.key)"
    );
    // New identifiers none of which has a value cannot be sent: such a member counts as
    // leaving, not as changing.
    let usable = if activation.identifiers.is_empty() {
        "TRUE".to_string()
    } else {
        activation
            .identifiers
            .iter()
            .map(|identifier| {
                let path = json_key_path(identifier);
                format!("nullif(trim(json_extract_string(n.identifiers, {path})), '') IS NOT NULL")
            })
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    DeltaQueries {
        adds,
        removes,
        list,
        usable,
    }
}

/// Members in the activation's acknowledged audience.
pub fn audience_size(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
) -> Result<i64, StoreError> {
    connection
        .query_row(
            "SELECT count(DISTINCT key) FROM segmentd_state.acknowledged WHERE pipeline = ? AND \
             activation = ?",
            params![pipeline, activation],
            |r| r.get(0),
        )
        .doing("counting the acknowledged audience")
}

/// Whether removing `removes` of `audience` members breaks the activation's brake.
pub fn over_removal_limit(activation: &ActivationDef, removes: i64, audience: i64) -> bool {
    removes > 0 && audience > 0 && removes as f64 > activation.max_removal_share * audience as f64
}

/// Writes the activation's delta for this run; earlier unsent deltas are superseded, since
/// the acknowledged state they were computed from is the one this delta starts from too. A
/// delta a brake stops is written as held. A `mirror` activation's delta is its whole list,
/// as replace batches (or, when the list is empty, the removes of everyone acknowledged).
pub fn plan(
    connection: &Connection,
    pipeline: &Pipeline,
    segment: &str,
    activation: &ActivationDef,
    run_id: i64,
    batch_size: usize,
) -> Result<DeltaSize, StoreError> {
    let members = format!(
        "SELECT key FROM segmentd_state.memberships WHERE pipeline = {} AND segment = {}",
        quote_literal(&pipeline.name),
        quote_literal(segment)
    );
    let queries = delta_queries(pipeline, activation, &members, &pipeline.schema());
    let batch_size = batch_size.max(1) as i64;
    in_transaction(connection, |c| {
        c.execute(
            "UPDATE segmentd_state.deltas SET status = 'superseded' \
             WHERE pipeline = ? AND activation = ? AND status IN ('pending', 'held')",
            params![pipeline.name, activation.id],
        )
        .doing("superseding unsent deltas")?;
        let insert = |change: &str, select: &str, condition: &str, first_sequence: i64| {
            c.execute(
                &format!(
                    "INSERT INTO segmentd_state.deltas \
                     (run_id, pipeline, activation, change, sequence, key, identifiers, status) \
                     SELECT $1, $2, $3, $4, \
                            CAST($5 + (row_number() OVER (ORDER BY d.key, d.identifiers) - 1) \
                                 // $6 AS INTEGER), \
                            d.key, d.identifiers, 'pending' \
                     FROM ({select}) AS d WHERE {condition}"
                ),
                params![
                    run_id,
                    pipeline.name,
                    activation.id,
                    change,
                    first_sequence,
                    batch_size
                ],
            )
            .map(|rows| rows as i64)
            .doing(format!("planning {change}s"))
        };
        let sizes = stage_delta(c, pipeline, activation, &queries)?;
        let mut delta = DeltaSize {
            changed: sizes.changed,
            readds: sizes.readds,
            ..DeltaSize::default()
        };
        if activation.mode == Mode::Mirror {
            delta.adds = sizes.adds;
            delta.removes = sizes.removes;
            delta.replaces = insert("replace", &queries.list, "TRUE", 0)?;
        }
        if delta.replaces == 0 {
            // A member whose identifiers changed is in both: the remove of its old identifiers
            // is numbered first, in batches of its own, so it is sent before the add of the
            // new ones (a platform that knows members by key, or by a digest both normalise
            // to, would otherwise end without the member). Leavers' batches follow.
            let re_added = "EXISTS (SELECT 1 FROM segmentd_state.deltas AS a WHERE a.run_id = $1 \
                            AND a.pipeline = $2 AND a.activation = $3 AND a.change = 'add' \
                            AND a.key = d.key)";
            let removes = staged(Change::Remove);
            delta.adds = insert("add", &staged(Change::Add), "TRUE", 0)?;
            let changed = insert("remove", &removes, re_added, 0)?;
            let first_leaver_batch = (changed + batch_size - 1) / batch_size;
            let leavers = insert(
                "remove",
                &removes,
                &format!("NOT {re_added}"),
                first_leaver_batch,
            )?;
            delta.removes = changed + leavers;
        }
        let audience = audience_size(c, &pipeline.name, &activation.id)?;
        delta.hold = brake(activation, delta.joiners(), delta.leavers(), audience);
        if delta.hold.is_some() {
            let removes = format!(
                "SELECT key, identifiers FROM segmentd_state.deltas WHERE run_id = {run_id} \
                 AND pipeline = {} AND activation = {} AND change = 'remove'",
                quote_literal(&pipeline.name),
                quote_literal(&activation.id)
            );
            delta.continues = continued_approval(
                c,
                &pipeline.name,
                activation,
                run_id,
                &removes,
                delta.removes,
            )?;
        }
        if let Some(continuation) = delta.continues {
            delta.hold = None;
            tracing::info!(
                pipeline = %pipeline.name, activation = %activation.id, run_id,
                removes = delta.removes, audience, approval_run = continuation.approval_run,
                "delta carries on an operator's approval; not held again"
            );
        }
        if let Some(hold) = delta.hold {
            let reason = hold.reason(activation, delta.leavers());
            c.execute(
                // Unless the adds wait too, the removes of changed members go out with them
                // (each before its add): only leavers wait.
                "UPDATE segmentd_state.deltas AS h SET status = 'held', reason = ? \
                 WHERE h.pipeline = ? AND h.activation = ? AND h.run_id = ? \
                 AND h.status = 'pending' AND (? OR (h.change = 'remove' AND NOT EXISTS ( \
                     SELECT 1 FROM segmentd_state.deltas AS a WHERE a.run_id = h.run_id \
                     AND a.pipeline = h.pipeline AND a.activation = h.activation \
                     AND a.change = 'add' AND a.key = h.key)))",
                params![
                    reason,
                    pipeline.name,
                    activation.id,
                    run_id,
                    hold.holds_adds(activation.mode)
                ],
            )
            .doing("holding the delta")?;
            tracing::warn!(
                pipeline = %pipeline.name, activation = %activation.id, run_id,
                adds = delta.adds, removes = delta.removes, audience, reason = %reason,
                "delta held until an operator approves it"
            );
        }
        c.execute_batch(&format!("DROP TABLE {STAGED_DELTA}"))
            .doing("planning the delta")?;
        Ok(delta)
    })
}

/// The batches still pending for an activation in a run, in the order they are sent: the
/// removes of members whose identifiers changed (numbered first when planned), then the adds,
/// then the other removes.
fn pending_batches(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
) -> Result<Vec<(Change, i32)>, StoreError> {
    let changed_batches: i32 = connection
        .query_row(
            "SELECT coalesce(max(r.sequence) + 1, 0) FROM segmentd_state.deltas AS r \
             WHERE r.run_id = $1 AND r.pipeline = $2 AND r.activation = $3 AND r.change = 'remove' \
             AND EXISTS (SELECT 1 FROM segmentd_state.deltas AS a WHERE a.run_id = $1 \
                 AND a.pipeline = $2 AND a.activation = $3 AND a.change = 'add' AND a.key = r.key)",
            params![run_id, pipeline, activation],
            |r| r.get(0),
        )
        .doing("listing pending batches")?;
    let mut statement = connection
        .prepare(
            "SELECT DISTINCT change, sequence FROM segmentd_state.deltas WHERE pipeline = ? \
             AND activation = ? AND run_id = ? AND status = 'pending'",
        )
        .doing("listing pending batches")?;
    let mut batches: Vec<(Change, i32)> = statement
        .query_map(params![pipeline, activation, run_id], |r| {
            let change = match r.get::<_, String>(0)?.as_str() {
                "add" => Change::Add,
                "replace" => Change::Replace,
                _ => Change::Remove,
            };
            Ok((change, r.get(1)?))
        })
        .doing("listing pending batches")?
        .collect::<Result<_, _>>()
        .doing("listing pending batches")?;
    batches.sort_by_key(|&(change, sequence)| {
        let phase = match change {
            Change::Remove if sequence < changed_batches => 0,
            Change::Add | Change::Replace => 1,
            Change::Remove => 2,
        };
        (phase, sequence)
    });
    Ok(batches)
}

fn load_batch(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
    change: Change,
    sequence: i32,
    replace: Option<Replace>,
) -> Result<Batch, StoreError> {
    let mut statement = connection
        .prepare(
            "SELECT key, identifiers FROM segmentd_state.deltas WHERE pipeline = ? AND \
             activation = ? \
             AND run_id = ? AND change = ? AND sequence = ? AND status = 'pending' ORDER BY key",
        )
        .doing("reading a batch")?;
    let rows = statement
        .query_map(
            params![pipeline, activation, run_id, change.as_str(), sequence],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .doing("reading a batch")?;
    let mut members = Vec::new();
    for row in rows {
        let (key, identifiers) = row.doing("reading a batch")?;
        members.push(Member {
            key,
            identifiers: parse_identifiers(&identifiers),
        });
    }
    Ok(Batch {
        run_id,
        activation: activation.to_string(),
        change,
        sequence: sequence as u32,
        members,
        replace: replace.filter(|_| change == Change::Replace),
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

/// How a confirmed batch changed the acknowledged audience.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Applied {
    /// Members the audience gained.
    added: i64,
    /// Members the audience lost.
    removed: i64,
    /// The audience's size after the last batch of a replace; `None` for other batches.
    replaced: Option<i64>,
}

/// Records a confirmed batch: rows delivered or rejected, acknowledged state advanced by the
/// members the platform accepted. The batches of a replace only mark their rows; the last one
/// swaps the acknowledged audience for the members the whole replace delivered. One
/// transaction.
fn record_outcome(
    connection: &Connection,
    pipeline: &str,
    batch: &Batch,
    outcome: &Outcome,
    dead_letter_after_runs: u32,
) -> Result<Applied, StoreError> {
    in_transaction(connection, |c| {
        c.execute_batch(
            "CREATE OR REPLACE TEMP TABLE batch_outcome \
             (key VARCHAR, status VARCHAR, reason VARCHAR)",
        )
        .doing("recording a batch")?;
        {
            let mut appender = c.appender("batch_outcome").doing("recording a batch")?;
            let accepted: std::collections::BTreeSet<&String> = outcome.accepted.iter().collect();
            for key in accepted {
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
        let scope = params![
            pipeline,
            batch.activation,
            batch.run_id,
            batch.change.as_str(),
            batch.sequence
        ];
        c.execute(
            "UPDATE segmentd_state.deltas AS d SET status = o.status, reason = o.reason \
             FROM batch_outcome AS o \
             WHERE d.pipeline = ? AND d.activation = ? AND d.run_id = ? AND d.change = ? \
             AND d.sequence = ? AND d.status = 'pending' AND d.key = o.key",
            scope,
        )
        .doing("recording a batch")?;
        let applied = match batch.change {
            Change::Add => Applied {
                added: c
                    .execute(
                        // A member added again (after a change of identifiers) is not
                        // acknowledged twice.
                        "DELETE FROM segmentd_state.acknowledged AS a \
                         USING segmentd_state.deltas AS d, batch_outcome AS o \
                         WHERE d.pipeline = ? AND d.activation = ? AND d.run_id = ? \
                         AND d.change = ? AND d.sequence = ? AND o.status = 'delivered' \
                         AND o.key = d.key AND a.pipeline = d.pipeline \
                         AND a.activation = d.activation AND a.key = d.key \
                         AND a.identifiers = d.identifiers",
                        scope,
                    )
                    .and_then(|_| {
                        c.execute(
                            "INSERT INTO segmentd_state.acknowledged \
                         (pipeline, activation, key, identifiers, run_id) \
                         SELECT d.pipeline, d.activation, d.key, d.identifiers, d.run_id \
                         FROM segmentd_state.deltas AS d JOIN batch_outcome AS o ON o.key = d.key \
                         WHERE d.pipeline = ? AND d.activation = ? AND d.run_id = ? \
                         AND d.change = ? AND d.sequence = ? AND o.status = 'delivered'",
                            scope,
                        )
                    })
                    .doing("advancing the acknowledged state")? as i64,
                ..Applied::default()
            },
            Change::Remove => Applied {
                removed: c
                    .execute(
                        "DELETE FROM segmentd_state.acknowledged AS a \
                         USING segmentd_state.deltas AS d, batch_outcome AS o \
                         WHERE d.pipeline = ? AND d.activation = ? AND d.run_id = ? \
                         AND d.change = ? AND d.sequence = ? AND o.status = 'delivered' \
                         AND o.key = d.key AND a.pipeline = d.pipeline \
                         AND a.activation = d.activation AND a.key = d.key \
                         AND a.identifiers = d.identifiers",
                        scope,
                    )
                    .doing("advancing the acknowledged state")? as i64,
                ..Applied::default()
            },
            Change::Replace if batch.ends_replace() => {
                swap_acknowledged(c, pipeline, &batch.activation, batch.run_id)?
            }
            Change::Replace => Applied::default(),
        };
        record_rejections(c, pipeline, batch, dead_letter_after_runs)?;
        Ok(applied)
    })
}

/// Makes the members a completed replace delivered the activation's acknowledged audience.
fn swap_acknowledged(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
) -> Result<Applied, StoreError> {
    let scope = params![pipeline, activation, run_id];
    let replaced = "SELECT key, identifiers FROM segmentd_state.deltas WHERE pipeline = $1 \
                    AND activation = $2 AND run_id = $3 AND change = 'replace' \
                    AND status = 'delivered'";
    let acknowledged = "SELECT key, identifiers FROM segmentd_state.acknowledged \
                        WHERE pipeline = $1 AND activation = $2";
    let count = |sql: String| -> Result<i64, StoreError> {
        connection
            .query_row(&sql, scope, |r| r.get(0))
            .doing("swapping the acknowledged audience")
    };
    let added = count(format!(
        "SELECT count(*) FROM ({replaced} EXCEPT {acknowledged})"
    ))?;
    let removed = count(format!(
        "SELECT count(*) FROM ({acknowledged} EXCEPT {replaced})"
    ))?;
    connection
        .execute(
            "DELETE FROM segmentd_state.acknowledged WHERE pipeline = ? AND activation = ?",
            params![pipeline, activation],
        )
        .doing("swapping the acknowledged audience")?;
    let size = connection
        .execute(
            "INSERT INTO segmentd_state.acknowledged \
             (pipeline, activation, key, identifiers, run_id) \
             SELECT pipeline, activation, key, identifiers, run_id FROM segmentd_state.deltas \
             WHERE pipeline = ? AND activation = ? AND run_id = ? AND change = 'replace' \
             AND status = 'delivered'",
            scope,
        )
        .doing("swapping the acknowledged audience")? as i64;
    Ok(Applied {
        added,
        removed,
        replaced: Some(size),
    })
}

/// Counts each rejected member's rejections, once per run; at `dead_letter_after_runs` runs it
/// is dead-lettered. A member the platform accepted starts again from zero. A member refused
/// in a replace counts as a refused add: it is left out of the list while dead-lettered.
fn record_rejections(
    connection: &Connection,
    pipeline: &str,
    batch: &Batch,
    dead_letter_after_runs: u32,
) -> Result<(), StoreError> {
    let change = match batch.change {
        Change::Add | Change::Replace => Change::Add,
        Change::Remove => Change::Remove,
    }
    .as_str();
    let scope = params![pipeline, batch.activation, change];
    connection
        .execute(
            "DELETE FROM segmentd_state.dead_letters WHERE pipeline = ? AND activation = ? \
             AND change = ? AND key IN (SELECT key FROM batch_outcome WHERE status = 'delivered')",
            scope,
        )
        .doing("clearing rejections")?;
    connection
        .execute(
            "UPDATE segmentd_state.dead_letters AS d \
             SET rejections = d.rejections + CAST(d.run_id <> $4 AS INTEGER), \
             reason = o.reason, run_id = $4, recorded_at = current_timestamp::TIMESTAMP, \
             dead = d.rejections + CAST(d.run_id <> $4 AS INTEGER) >= $5 \
             FROM batch_outcome AS o WHERE o.status = 'rejected' AND o.key = d.key \
             AND d.pipeline = $1 AND d.activation = $2 AND d.change = $3",
            params![
                pipeline,
                batch.activation,
                change,
                batch.run_id,
                dead_letter_after_runs
            ],
        )
        .doing("counting rejections")?;
    connection
        .execute(
            "INSERT INTO segmentd_state.dead_letters \
             (pipeline, activation, key, change, reason, rejections, dead, run_id, recorded_at) \
             SELECT $1, $2, o.key, $3, coalesce(o.reason, 'rejected'), 1, 1 >= $5, $4, \
                    current_timestamp::TIMESTAMP \
             FROM batch_outcome AS o WHERE o.status = 'rejected' AND NOT EXISTS ( \
                 SELECT 1 FROM segmentd_state.dead_letters AS d WHERE d.pipeline = $1 \
                 AND d.activation = $2 AND d.change = $3 AND d.key = o.key)",
            params![
                pipeline,
                batch.activation,
                change,
                batch.run_id,
                dead_letter_after_runs
            ],
        )
        .doing("counting rejections")?;
    Ok(())
}

/// One dead-lettered member.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// The activation.
    pub activation: String,
    /// The profile key.
    pub key: String,
    /// `add` or `remove`.
    pub change: String,
    /// The platform's last reason.
    pub reason: String,
    /// In how many runs it was rejected.
    pub rejections: i32,
    /// The last run that rejected it.
    pub run_id: i64,
}

/// The pipeline's dead-lettered members.
pub fn dead_letters(
    connection: &Connection,
    pipeline: &str,
) -> Result<Vec<DeadLetter>, StoreError> {
    let mut statement = connection
        .prepare(
            "SELECT activation, key, change, reason, rejections, run_id FROM \
             segmentd_state.dead_letters \
             WHERE pipeline = ? AND dead ORDER BY activation, change, key",
        )
        .doing("reading the dead letter")?;
    let rows = statement
        .query_map(params![pipeline], |r| {
            Ok(DeadLetter {
                activation: r.get(0)?,
                key: r.get(1)?,
                change: r.get(2)?,
                reason: r.get(3)?,
                rejections: r.get(4)?,
                run_id: r.get(5)?,
            })
        })
        .doing("reading the dead letter")?;
    rows.collect::<Result<_, _>>()
        .doing("reading the dead letter")
}

/// Releases dead-lettered members (of one activation, or all) so the next run offers them
/// again; returns how many.
pub fn retry_dead_letters(
    connection: &Connection,
    pipeline: &str,
    activation: Option<&str>,
) -> Result<usize, StoreError> {
    connection
        .execute(
            "DELETE FROM segmentd_state.dead_letters WHERE pipeline = ? AND dead \
             AND (? IS NULL OR activation = ?)",
            params![pipeline, activation, activation],
        )
        .doing("releasing the dead letter")
}

/// Why an activation of a run has no held delta to approve.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NotHeld {
    /// A brake held the delta, but a newer run planned a delta of its own, which superseded it.
    Superseded {
        /// The activation.
        activation: String,
        /// The run whose delta superseded it.
        superseded_by: i64,
        /// The activation's latest run, whose delta is the current one.
        current_run: i64,
        /// Whether a brake holds the current delta.
        current_held: bool,
    },
    /// The held delta was approved already.
    Approved {
        /// The activation.
        activation: String,
        /// Why its delivery stopped, if it did.
        error: Option<String>,
    },
}

impl NotHeld {
    /// What happened to the delta and what to do, in words for the operator.
    fn explain(&self, pipeline: &str) -> String {
        match self {
            NotHeld::Superseded {
                activation,
                superseded_by,
                current_run,
                current_held,
            } => {
                let current = if *current_held {
                    format!(
                        "run {current_run} holds the current delta: approve that run instead, \
                         `segmentd approve {pipeline} {current_run}`"
                    )
                } else {
                    format!(
                        "run {current_run} planned the current delta and nothing of it is held: \
                         there is nothing to approve"
                    )
                };
                format!(
                    "`{activation}` was superseded by run {superseded_by}, which planned a delta \
                     of its own from what the platform had confirmed by then; {current}"
                )
            }
            NotHeld::Approved {
                activation,
                error: None,
            } => format!("`{activation}` was already approved and sent"),
            NotHeld::Approved {
                activation,
                error: Some(error),
            } => format!(
                "`{activation}` was already approved, but its delivery stopped ({error}); the \
                 next run plans what is left and sends it without a new hold when it is only \
                 removes this approval covered"
            ),
        }
    }
}

/// Why an approval was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    /// Nothing of that run is held.
    #[error("{message}")]
    NothingHeld {
        /// What happened, and what to do, in words.
        message: String,
        /// Each activation of the run that was held, and what became of its delta.
        activations: Vec<NotHeld>,
    },
    /// The activation changed since its delta was held, so the held delta no longer says
    /// what it would do; nothing was released.
    #[error("{message}")]
    Outdated {
        /// What changed, and what to do, in words.
        message: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a held delta of an activation whose configuration is now `mode` (`None`: no longer
/// configured) cannot be sent as it is, if it cannot: it holds `changes`.
fn outdated(activation: &str, mode: Option<Mode>, changes: &[String]) -> Option<String> {
    let has = |change: &str| changes.iter().any(|c| c == change);
    let what = match mode {
        None => "is no longer configured",
        Some(Mode::Mirror) if has("add") || has("remove") => {
            "is now a mirror activation, but its held delta is adds and removes"
        }
        Some(Mode::AddRemove | Mode::AddOnly) if has("replace") => {
            "no longer has mode mirror, but its held delta replaces the whole list"
        }
        Some(Mode::AddOnly) if has("remove") => {
            "now has mode add_only, but its held delta removes members"
        }
        Some(_) => return None,
    };
    Some(format!(
        "activation `{activation}` {what}; nothing was sent. The next run plans its delta \
         afresh from the configuration as it is"
    ))
}

/// SQL for whether an activation's record of a run says a brake holds its delta: it has a
/// hold reason and no approval it was sent under.
pub(crate) const HELD: &str = "(hold_reason IS NOT NULL AND approval_run IS NULL)";

/// Releases a run's held deltas (of one activation, or all) for delivery; returns the
/// activations released. The activation's record of the run says it was approved.
pub fn approve(
    connection: &Connection,
    pipeline: &Pipeline,
    run_id: i64,
    activation: Option<&str>,
) -> Result<Vec<String>, ApproveError> {
    let definition = pipeline;
    let pipeline = pipeline.name.as_str();
    let mut refusal = None;
    let released = in_transaction(connection, |c| {
        let mut statement = c
            .prepare(
                "SELECT DISTINCT activation FROM segmentd_state.deltas WHERE pipeline = ? AND \
                 run_id = ? \
                 AND status = 'held' AND (? IS NULL OR activation = ?) ORDER BY activation",
            )
            .doing("finding held deltas")?;
        let activations: Vec<String> = statement
            .query_map(params![pipeline, run_id, activation, activation], |r| {
                r.get(0)
            })
            .doing("finding held deltas")?
            .collect::<Result<_, _>>()
            .doing("finding held deltas")?;
        for id in &activations {
            let mut statement = c
                .prepare(
                    "SELECT DISTINCT change FROM segmentd_state.deltas WHERE pipeline = ? \
                     AND run_id = ? AND activation = ? AND status = 'held' ORDER BY change",
                )
                .doing("reading held deltas")?;
            let changes: Vec<String> = statement
                .query_map(params![pipeline, run_id, id], |r| r.get(0))
                .doing("reading held deltas")?
                .collect::<Result<_, _>>()
                .doing("reading held deltas")?;
            let mode = definition
                .segments
                .iter()
                .flat_map(|s| &s.activations)
                .find(|a| a.id == *id)
                .map(|a| a.mode);
            if let Some(message) = outdated(id, mode, &changes) {
                refusal = Some(message);
                return Ok(Vec::new());
            }
        }
        for id in &activations {
            record_from_delta(c, pipeline, id, run_id)?;
            c.execute(
                "UPDATE segmentd_state.deltas SET status = 'pending', reason = NULL \
                 WHERE pipeline = ? AND run_id = ? AND activation = ? AND status = 'held'",
                params![pipeline, run_id, id],
            )
            .doing("releasing held deltas")?;
            c.execute(
                "UPDATE segmentd_state.activation_runs SET status = 'approved', \
                 approval_run = run_id, \
                 hold_reason = 'approved by an operator; held because ' \
                     || coalesce(hold_reason, 'a brake held it') \
                 WHERE pipeline = ? AND run_id = ? AND activation = ?",
                params![pipeline, run_id, id],
            )
            .doing("recording the approval")?;
        }
        Ok(activations)
    })?;
    if let Some(message) = refusal {
        return Err(ApproveError::Outdated { message });
    }
    if released.is_empty() {
        return Err(nothing_held(connection, pipeline, run_id, activation)?);
    }
    Ok(released)
}

/// The refusal of an approval of a run with nothing held: what became of each delta of the run
/// a brake held, and what to do.
fn nothing_held(
    connection: &Connection,
    pipeline: &str,
    run_id: i64,
    activation: Option<&str>,
) -> Result<ApproveError, StoreError> {
    let recorded: i64 = connection
        .query_row(
            "SELECT count(*) FROM segmentd_state.runs WHERE pipeline = ? AND run_id = ?",
            params![pipeline, run_id],
            |r| r.get(0),
        )
        .doing("finding the run")?;
    let mut statement = connection
        .prepare(&format!(
            "SELECT r.activation, coalesce(r.approval_run = r.run_id, false), r.error, \
                    {HELD}, \
                    (SELECT min(n.run_id) FROM segmentd_state.activation_runs AS n \
                     WHERE n.pipeline = r.pipeline AND n.activation = r.activation \
                     AND n.run_id > r.run_id), \
                    (SELECT n.run_id FROM segmentd_state.activation_runs AS n \
                     WHERE n.pipeline = r.pipeline AND n.activation = r.activation \
                     ORDER BY n.run_id DESC LIMIT 1), \
                    (SELECT (n.hold_reason IS NOT NULL AND n.approval_run IS NULL) \
                     FROM segmentd_state.activation_runs AS n \
                     WHERE n.pipeline = r.pipeline AND n.activation = r.activation \
                     ORDER BY n.run_id DESC LIMIT 1) \
             FROM segmentd_state.activation_runs AS r \
             WHERE r.pipeline = ? AND r.run_id = ? AND (? IS NULL OR r.activation = ?) \
             ORDER BY r.activation"
        ))
        .doing("finding what became of the run's deltas")?;
    type Row = (
        String,
        bool,
        Option<String>,
        bool,
        Option<i64>,
        Option<i64>,
        Option<bool>,
    );
    let rows: Vec<Row> = statement
        .query_map(params![pipeline, run_id, activation, activation], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .doing("finding what became of the run's deltas")?
        .collect::<Result<_, _>>()
        .doing("finding what became of the run's deltas")?;
    let mut activations = Vec::new();
    for (id, approved, error, held, superseded_by, current_run, current_held) in rows {
        if approved {
            activations.push(NotHeld::Approved {
                activation: id,
                error,
            });
        } else if let (true, Some(superseded_by), Some(current_run)) =
            (held, superseded_by, current_run)
        {
            activations.push(NotHeld::Superseded {
                activation: id,
                superseded_by,
                current_run,
                current_held: current_held.unwrap_or(false),
            });
        }
    }

    let mut message = format!("run {run_id} of pipeline `{pipeline}` has no held delta");
    if let Some(activation) = activation {
        message.push_str(&format!(" for activation `{activation}`"));
    }
    let mut explained: Vec<String> = activations.iter().map(|a| a.explain(pipeline)).collect();
    if recorded == 0 {
        explained.push(format!("there is no run {run_id} of this pipeline"));
    }
    if !explained.is_empty() {
        message.push_str(": ");
        message.push_str(&explained.join("; "));
    }
    Ok(ApproveError::NothingHeld {
        message,
        activations,
    })
}

/// Writes the activation's record of a run from the run's delta, if the process stopped
/// before the run wrote it: the sizes of the delta, what of it was confirmed, and why it is
/// held if it is. A `mirror` activation's record counts no adds or removes this way (its
/// delta is the list), only what the rest of the delivery confirms.
pub fn record_from_delta(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
) -> Result<(), StoreError> {
    // An aggregate over no rows is still one row (of zeros): HAVING keeps it out when there
    // is a record already or no delta.
    connection
        .execute(
            "INSERT INTO segmentd_state.activation_runs (run_id, pipeline, activation, adds, \
             removes, delivered_adds, delivered_removes, rejected, status, hold_reason) \
             SELECT $1, $2, $3, count(*) FILTER (change = 'add'), \
                    count(*) FILTER (change = 'remove'), \
                    count(*) FILTER (change = 'add' AND status = 'delivered'), \
                    count(*) FILTER (change = 'remove' AND status = 'delivered'), \
                    count(*) FILTER (status = 'rejected'), \
                    CASE WHEN count(*) FILTER (status = 'held') > 0 THEN 'held' \
                         ELSE 'delivered' END, \
                    max(reason) FILTER (status = 'held') \
             FROM segmentd_state.deltas WHERE run_id = $1 AND pipeline = $2 AND activation = $3 \
             AND NOT EXISTS (SELECT 1 FROM segmentd_state.activation_runs AS r \
                 WHERE r.run_id = $1 AND r.pipeline = $2 AND r.activation = $3) \
             HAVING count(*) > 0",
            params![run_id, pipeline, activation],
        )
        .doing("recording the activation's run")?;
    Ok(())
}

/// Writes the records of a run's activations that have a delta but no record: the process
/// stopped between planning and recording them.
pub fn record_unrecorded(
    connection: &Connection,
    pipeline: &str,
    run_id: i64,
) -> Result<(), StoreError> {
    let mut statement = connection
        .prepare(
            "SELECT DISTINCT d.activation FROM segmentd_state.deltas AS d \
             WHERE d.pipeline = ? AND d.run_id = ? AND NOT EXISTS ( \
                 SELECT 1 FROM segmentd_state.activation_runs AS r WHERE r.run_id = d.run_id \
                 AND r.pipeline = d.pipeline AND r.activation = d.activation)",
        )
        .doing("finding unrecorded activations")?;
    let activations: Vec<String> = statement
        .query_map(params![pipeline, run_id], |r| r.get(0))
        .doing("finding unrecorded activations")?
        .collect::<Result<_, _>>()
        .doing("finding unrecorded activations")?;
    for activation in activations {
        record_from_delta(connection, pipeline, &activation, run_id)?;
    }
    Ok(())
}

/// Adds to the activation's record of a run what a later delivery of its batches (after an
/// approval or an interruption) did.
pub fn record_delivery(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
    report: &DeliveryReport,
) -> Result<(), StoreError> {
    connection
        .execute(
            &format!(
                "UPDATE segmentd_state.activation_runs SET \
                 delivered_adds = delivered_adds + ?, delivered_removes = delivered_removes + ?, \
                 rejected = rejected + ?, replaced = coalesce(?, replaced), error = ?, \
                 status = CASE WHEN ? THEN 'failed' WHEN approval_run = run_id THEN 'approved' \
                     WHEN {HELD} THEN 'held' ELSE 'delivered' END \
                 WHERE pipeline = ? AND activation = ? AND run_id = ?"
            ),
            params![
                report.delivered_adds,
                report.delivered_removes,
                report.rejected,
                report.replaced,
                report.error,
                report.error.is_some(),
                pipeline,
                activation,
                run_id
            ],
        )
        .doing("recording the activation's delivery")?;
    Ok(())
}

/// How many of a run's activations failed and how many a brake holds, from their records.
pub fn run_outcome(connection: &Connection, run_id: i64) -> Result<(usize, usize), StoreError> {
    let (failed, held): (i64, i64) = connection
        .query_row(
            &format!(
                "SELECT count(*) FILTER (status = 'failed'), count(*) FILTER ({HELD}) \
                 FROM segmentd_state.activation_runs WHERE run_id = ?"
            ),
            params![run_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .doing("reading the run's outcome")?;
    Ok((
        usize::try_from(failed).unwrap_or(0),
        usize::try_from(held).unwrap_or(0),
    ))
}

/// How many activations have a delta in the run.
pub fn planned_activations(
    connection: &Connection,
    pipeline: &str,
    run_id: i64,
) -> Result<i64, StoreError> {
    connection
        .query_row(
            "SELECT count(DISTINCT activation) FROM segmentd_state.deltas \
             WHERE pipeline = ? AND run_id = ?",
            params![pipeline, run_id],
            |r| r.get(0),
        )
        .doing("finding the run's deltas")
}

/// Activations of a run that still have batches to send (after an interruption or an
/// approval).
pub fn activations_with_pending(
    connection: &Connection,
    pipeline: &str,
    run_id: i64,
) -> Result<Vec<String>, StoreError> {
    let mut statement = connection
        .prepare(
            "SELECT DISTINCT activation FROM segmentd_state.deltas \
             WHERE pipeline = ? AND run_id = ? \
             AND status = 'pending' ORDER BY activation",
        )
        .doing("finding pending deltas")?;
    let rows = statement
        .query_map(params![pipeline, run_id], |r| r.get(0))
        .doing("finding pending deltas")?;
    rows.collect::<Result<_, _>>()
        .doing("finding pending deltas")
}

/// Prepares a run's replace for sending and returns it, `None` when the activation has no
/// replace pending in the run. A replace some of whose batches were confirmed before an
/// interruption starts again from its first batch, under a new session: a platform's replace
/// session cannot be trusted to survive a restart, and finishing only its remaining batches
/// would leave the destination with part of the list.
fn begin_replace(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
) -> Result<Option<Replace>, StoreError> {
    in_transaction(connection, |c| {
        let scope = params![pipeline, activation, run_id];
        let (batches, members, pending, sent): (i64, i64, i64, i64) = c
            .query_row(
                "SELECT count(DISTINCT sequence), count(*), count(*) FILTER (status = 'pending'), \
                        count(*) FILTER (status IN ('delivered', 'rejected')) \
                 FROM segmentd_state.deltas WHERE pipeline = ? AND activation = ? AND run_id = ? \
                 AND change = 'replace' AND status IN ('pending', 'delivered', 'rejected')",
                scope,
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .doing("reading the replace")?;
        if pending == 0 {
            return Ok(None);
        }
        if sent > 0 {
            c.execute(
                "UPDATE segmentd_state.deltas SET status = 'pending', reason = NULL \
                 WHERE pipeline = ? AND activation = ? AND run_id = ? AND change = 'replace' \
                 AND status IN ('delivered', 'rejected')",
                scope,
            )
            .doing("starting the replace again")?;
            tracing::warn!(
                pipeline,
                activation,
                run_id,
                batches,
                "an interrupted replace starts again from its first batch"
            );
        }
        Ok(Some(Replace {
            session: new_session(pipeline, activation, run_id),
            batches: u32::try_from(batches).unwrap_or(u32::MAX),
            members: u64::try_from(members).unwrap_or(0),
        }))
    })
}

/// A session id for one attempt at a replace: from 1 to 2^63 - 1 (platforms take it as a
/// signed 64-bit number), and different for every attempt.
fn new_session(pipeline: &str, activation: &str, run_id: i64) -> u64 {
    use sha2::{Digest, Sha256};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!(
        "{pipeline}\n{activation}\n{run_id}\n{now}\n{}",
        std::process::id()
    );
    let digest = Sha256::digest(seed.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 1).max(1)
}

/// Sends an activation's pending batches for a run, in the order [`pending_batches`] gives.
/// Stops at the first batch that fails after retries; what was confirmed before stays
/// confirmed.
pub async fn deliver(
    store: Arc<Store>,
    pipeline: &Pipeline,
    activation: &ActivationDef,
    connector: Arc<dyn Connector>,
    policy: &RetryPolicy,
    rate_limit: Option<&RateLimit>,
    run_id: i64,
) -> Result<DeliveryReport, StoreError> {
    let mut report = DeliveryReport::default();
    let (replace, batches) = blocking(&store, {
        let (name, id) = (pipeline.name.clone(), activation.id.clone());
        move |c| {
            let replace = begin_replace(c, &name, &id, run_id)?;
            Ok((replace, pending_batches(c, &name, &id, run_id)?))
        }
    })
    .await?;
    let load = |(change, sequence): (Change, i32)| {
        let store = Arc::clone(&store);
        let (name, id) = (pipeline.name.clone(), activation.id.clone());
        async move {
            blocking(&store, move |c| {
                load_batch(c, &name, &id, run_id, change, sequence, replace)
            })
            .await
        }
    };
    let mut next = match batches.first() {
        Some(&batch) => Some(load(batch).await?),
        None => None,
    };
    for (position, &(change, sequence)) in batches.iter().enumerate() {
        let batch = next.take().expect("each batch is read before its turn");
        let members = batch.members.len();
        let sent = segmentd_connectors::deliver_within_limits(
            connector.as_ref(),
            &batch,
            policy,
            rate_limit,
        );
        // The next batch is read from DuckDB while this one is with the platform; it is
        // only sent once this one's outcome is recorded.
        let following = batches.get(position + 1).copied();
        let read_ahead = async {
            match following {
                Some(batch) => load(batch).await.map(Some),
                None => Ok(None),
            }
        };
        let (sent, read) = tokio::join!(sent, read_ahead);
        next = read?;
        match sent {
            Ok(outcome) => {
                report.rejected += outcome.rejected.len() as i64;
                tracing::info!(
                    pipeline = %pipeline.name, activation = %activation.id, run_id,
                    change = change.as_str(), sequence, members,
                    accepted = outcome.accepted.len(), rejected = outcome.rejected.len(),
                    "batch delivered"
                );
                let name = pipeline.name.clone();
                let after = activation.dead_letter_after_runs;
                let applied = blocking(&store, move |c| {
                    record_outcome(c, &name, &batch, &outcome, after)
                })
                .await?;
                report.delivered_adds += applied.added;
                report.delivered_removes += applied.removed;
                if let Some(size) = applied.replaced {
                    tracing::info!(
                        pipeline = %pipeline.name, activation = %activation.id, run_id,
                        members = size, added = applied.added, removed = applied.removed,
                        "list replaced"
                    );
                    report.replaced = Some(size);
                }
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

/// Records the activation's part of a run. `note` is why a brake held the delta, or which
/// approval it carries on ([`DeltaSize::note`]).
pub fn record_activation_run(
    connection: &Connection,
    pipeline: &str,
    activation: &str,
    run_id: i64,
    delta: DeltaSize,
    note: Option<&str>,
    report: &DeliveryReport,
) -> Result<(), StoreError> {
    let status = match (&report.error, delta.held()) {
        (Some(_), _) => "failed",
        (None, true) => "held",
        (None, false) => "delivered",
    };
    connection
        .execute(
            "INSERT INTO segmentd_state.activation_runs (run_id, pipeline, activation, adds, \
             removes, \
             delivered_adds, delivered_removes, rejected, status, error, hold_reason, replaced, \
             approval_run) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                report.error,
                note,
                report.replaced,
                delta.continues.map(|c| c.approval_run)
            ],
        )
        .doing("recording the activation's run")?;
    Ok(())
}
