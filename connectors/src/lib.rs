//! Destination connectors of segmentd.
//!
//! This crate owns the contract between the delivery engine and the platforms that receive
//! segment members, and one module per platform behind that contract. It knows nothing of
//! DuckDB, rules or runs beyond the identifiers carried in a [`Batch`]: the engine decides what
//! to send, a connector sends one batch and says what the platform did with it.
//!
//! - [`Connector`] is the contract: validate settings at load, deliver one batch. A batch
//!   adds members, removes them, or is one of the batches of a [`Replace`] of the whole list,
//!   which only connectors that say [`Connector::replaces_lists`] accept.
//! - [`deliver_with_retries`] wraps one connector call in the retry policy shared by every
//!   connector (exponential backoff with full jitter, bounded attempts and total time,
//!   `Retry-After` honoured and capped).
//! - [`file`] writes batches as files into a folder; [`webhook`] POSTs them as JSON.
//! - [`meta`] keeps a Meta Custom Audience in step; [`mailchimp`] a Mailchimp audience.
//! - [`braze`] keeps segment membership on Braze user profiles.
//! - [`tiktok`] keeps a TikTok Ads custom audience in step.
//! - [`sendgrid`] keeps a SendGrid Marketing Campaigns list in step.
//! - [`klaviyo`] keeps a Klaviyo list in step.
//! - [`google_ads`] keeps a Google Ads Customer Match user list in step.
//! - [`linkedin`] keeps a LinkedIn Matched Audiences DMP segment in step.
//! - [`rate`] keeps a connection's requests under its configured rate.
//! - [`identifiers`] normalises and hashes identifiers the way the platforms match them.

pub mod braze;
pub mod file;
pub mod google_ads;
mod http;
pub mod identifiers;
mod job;
pub mod klaviyo;
pub mod linkedin;
pub mod mailchimp;
mod members;
pub mod meta;
pub mod rate;
pub mod retry;
pub mod sendgrid;
mod settings;
pub mod tiktok;
pub mod webhook;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use rate::{RateLimit, RateLimitSettings};
pub use retry::{RetryPolicy, deliver_with_retries, deliver_within_limits};

/// A future returned by a connector; boxed so connectors can live behind `dyn Connector`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whether a batch adds members to the destination, removes them from it, or is part of a
/// replace of its whole list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// The members joined the segment: add them to the destination.
    Add,
    /// The members left the segment: remove them from the destination.
    Remove,
    /// The members are part of the destination's new list: once the replace's last batch is
    /// confirmed the destination holds exactly the members of its batches (see [`Replace`]).
    Replace,
}

impl Change {
    /// The word used in file names, logs and state tables: `add`, `remove` or `replace`.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Add => "add",
            Change::Remove => "remove",
            Change::Replace => "replace",
        }
    }
}

/// Where a batch of a replace stands in it.
///
/// A replace is sent as batches `0..batches` in order, all with the same `session`. The
/// destination's list becomes the members of all of them when the last one is confirmed;
/// until then it keeps its old list. A replace begun again after an interruption gets a new
/// session and starts from batch 0, so a platform never joins the batches of two attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replace {
    /// Identifies this attempt at the replace; never 0.
    pub session: u64,
    /// How many batches the replace has.
    pub batches: u32,
    /// How many members its batches hold in all.
    pub members: u64,
}

/// One member of a segment as a destination sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// The profile key of the master segment, as text.
    pub key: String,
    /// Identifier and field values the activation maps for this member (for example `email`
    /// or `country`), raw as stored; connectors normalise and hash them as their platform
    /// requires. A missing value is absent from the map.
    pub identifiers: BTreeMap<String, String>,
}

/// One request's worth of members, all with the same change.
///
/// `(run_id, activation, change, sequence)` identifies a batch: delivering the same batch
/// twice must leave the destination as delivering it once (connectors use it as an
/// idempotency key where the platform has one, and rely on set semantics otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The run that produced the delta.
    pub run_id: i64,
    /// The activation's name, unique within its pipeline (`<segment>/<activation>`); safe to
    /// use in file names once `/` is replaced.
    pub activation: String,
    /// Add or remove.
    pub change: Change,
    /// Position of this batch among the activation's batches of the same change in the run,
    /// from 0.
    pub sequence: u32,
    /// The members, at most the connector's [`Connector::max_batch_size`].
    pub members: Vec<Member>,
    /// For a [`Change::Replace`] batch, its replace; `None` for adds and removes.
    pub replace: Option<Replace>,
}

impl Batch {
    /// Whether this batch is the last of its replace: once it is confirmed the destination
    /// holds the replace's members and no others.
    pub fn ends_replace(&self) -> bool {
        self.replace
            .is_some_and(|replace| self.sequence + 1 >= replace.batches)
    }
}

/// A member the platform (or the connector, before sending) refused, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The member's profile key.
    pub key: String,
    /// Why, in words an operator can act on; never contains the identifier values.
    pub reason: String,
}

/// What the platform did with a batch it answered successfully.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Keys the platform confirmed.
    pub accepted: Vec<String>,
    /// Keys refused, each with a reason; they are not retried as part of this batch.
    pub rejected: Vec<Rejection>,
}

/// Why a whole batch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// A transport error or a server-side failure; sending again may succeed.
    #[error("retryable failure: {message}")]
    Retryable {
        /// What happened (status, transport error), without member data.
        message: String,
    },
    /// The platform asked us to slow down, optionally saying for how long.
    #[error("rate limited: {message}")]
    RateLimited {
        /// What happened.
        message: String,
        /// The wait the platform asked for, if it gave one.
        wait: Option<Duration>,
    },
    /// Credentials are missing, expired or invalid: the activation stops until an operator
    /// fixes them.
    #[error("credentials rejected: {message}")]
    Auth {
        /// What the platform said.
        message: String,
    },
    /// The request is wrong and sending it again will not help.
    #[error("permanent failure: {message}")]
    Permanent {
        /// What the platform said.
        message: String,
    },
}

impl DeliveryError {
    /// True for the failures worth sending again: transport, 5xx, rate limits.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DeliveryError::Retryable { .. } | DeliveryError::RateLimited { .. }
        )
    }
}

/// A problem in a connection's or an activation's settings, found at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingsError {
    /// The settings key at fault (for example `url` or `format`).
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The contract every destination meets.
pub trait Connector: Send + Sync {
    /// The connection type, as written in `config.toml` (`file`, `webhook`, ...).
    fn kind(&self) -> &'static str;

    /// The most members one batch may hold.
    fn max_batch_size(&self) -> usize;

    /// The smallest audience the platform keeps; removals that would take the audience
    /// below it are refused by the platform. `None` when the platform has no such floor.
    fn min_audience_size(&self) -> Option<u64> {
        None
    }

    /// The platform list the connector keeps in step, in words (`Meta audience 123`), when
    /// it keeps one: two activations keeping the same list through one connection would
    /// undo each other's changes. `None` where each activation has a destination of its own.
    fn destination(&self) -> Option<String> {
        None
    }

    /// Whether the connector can replace the destination's whole list ([`Change::Replace`]),
    /// which `mirror` activations need. A connector that cannot answers a replace batch with
    /// a permanent failure before sending anything.
    fn replaces_lists(&self) -> bool {
        false
    }

    /// Sends one batch once, without retrying, and classifies the answer.
    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>>;
}

/// Builds the connector for one activation from its connection's settings (the
/// `[connections.<name>]` table of `config.toml` without `type`, secrets already resolved from
/// the environment) and the activation's own settings (the `[activations.settings]` table of
/// a segment file). Returns every problem found.
pub fn build(
    kind: &str,
    connection: &toml::Table,
    activation: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Result<Box<dyn Connector>, Vec<SettingsError>> {
    match kind {
        "file" => file::FileConnector::from_settings(connection, activation)
            .map(|c| Box::new(c) as Box<dyn Connector>),
        "webhook" => webhook::WebhookConnector::from_settings(connection, activation, secrets)
            .map(|c| Box::new(c) as Box<dyn Connector>),
        "meta" => meta::MetaConnector::from_settings(connection, activation, secrets)
            .map(|c| Box::new(c) as Box<dyn Connector>),
        "braze" => braze::BrazeConnector::from_settings(connection, activation, secrets)
            .map(|c| Box::new(c) as Box<dyn Connector>),
        "tiktok" => tiktok::TiktokConnector::from_settings(connection, activation, secrets)
            .map(|c| Box::new(c) as Box<dyn Connector>),
        "mailchimp" => {
            mailchimp::MailchimpConnector::from_settings(connection, activation, secrets)
                .map(|c| Box::new(c) as Box<dyn Connector>)
        }
        "sendgrid" => sendgrid::SendgridConnector::from_settings(connection, activation, secrets)
            .map(|c| Box::new(c) as Box<dyn Connector>),
        "klaviyo" => klaviyo::KlaviyoConnector::from_settings(connection, activation, secrets)
            .map(|c| Box::new(c) as Box<dyn Connector>),
        "google_ads" => {
            google_ads::GoogleAdsConnector::from_settings(connection, activation, secrets)
                .map(|c| Box::new(c) as Box<dyn Connector>)
        }
        "linkedin" => linkedin::LinkedInConnector::from_settings(connection, activation, secrets)
            .map(|c| Box::new(c) as Box<dyn Connector>),
        other => Err(vec![unknown_kind(other)]),
    }
}

/// Checks a connection's settings alone, before any activation uses it: the settings an
/// activation must supply (Meta's `audience_id`, Mailchimp's `list_id`) are not asked for.
/// Returns every problem found.
pub fn check_connection(
    kind: &str,
    connection: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Result<(), Vec<SettingsError>> {
    match kind {
        "meta" => meta::MetaConnector::check_connection(connection, secrets),
        "mailchimp" => mailchimp::MailchimpConnector::check_connection(connection, secrets),
        "sendgrid" => sendgrid::SendgridConnector::check_connection(connection, secrets),
        "klaviyo" => klaviyo::KlaviyoConnector::check_connection(connection, secrets),
        "braze" => braze::BrazeConnector::check_connection(connection, secrets),
        "tiktok" => tiktok::TiktokConnector::check_connection(connection, secrets),
        "google_ads" => google_ads::GoogleAdsConnector::check_connection(connection, secrets),
        "linkedin" => linkedin::LinkedInConnector::check_connection(connection, secrets),
        "file" | "webhook" => build(kind, connection, &toml::Table::new(), secrets).map(|_| ()),
        other => Err(vec![unknown_kind(other)]),
    }
}

/// The failure a connector that cannot replace a list gives a [`Change::Replace`] batch.
pub(crate) fn cannot_replace(kind: &str) -> DeliveryError {
    DeliveryError::Permanent {
        message: format!(
            "a `{kind}` connection cannot replace a whole list; use mode add_remove or add_only"
        ),
    }
}

fn unknown_kind(kind: &str) -> SettingsError {
    SettingsError {
        field: "type".into(),
        message: format!(
            "unknown connection type `{kind}`; known types: {}",
            KINDS.join(", ")
        ),
    }
}

/// The connection types whose connectors replace whole lists ([`Connector::replaces_lists`]),
/// so `mirror` activations can use them. Google Ads is not among them: its replace (a job
/// starting with `remove_all`) is not atomic, and a job that fails half way leaves the list
/// empty.
pub const REPLACING_KINDS: &[&str] = &["file", "webhook", "meta"];

/// The connection types this build knows.
pub const KINDS: &[&str] = &[
    "file",
    "webhook",
    "meta",
    "mailchimp",
    "braze",
    "tiktok",
    "sendgrid",
    "google_ads",
    "linkedin",
    "klaviyo",
];

/// The kind of a failure in one word, for unit tests of the connectors' classifications.
#[cfg(test)]
pub(crate) fn error_kind(error: &DeliveryError) -> &'static str {
    match error {
        DeliveryError::Retryable { .. } => "retryable",
        DeliveryError::RateLimited { .. } => "rate limited",
        DeliveryError::Auth { .. } => "auth",
        DeliveryError::Permanent { .. } => "permanent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection type `mirror` is offered for has a connector that replaces lists.
    #[test]
    fn replacing_kinds_are_the_connectors_that_replace_lists() {
        let secrets = BTreeMap::from([("access_token".to_string(), "token".to_string())]);
        let table = |text: &str| -> toml::Table { toml::from_str(text).unwrap() };
        let built = [
            ("file", table("directory = \"out\""), table("")),
            ("webhook", table("url = \"http://127.0.0.1:9/\""), table("")),
            (
                "meta",
                table("access_token_env = \"META_TOKEN\""),
                table("audience_id = \"123\""),
            ),
        ];
        for (kind, connection, activation) in built {
            let connector = build(kind, &connection, &activation, &secrets)
                .unwrap_or_else(|errors| panic!("{kind}: {errors:?}"));
            assert!(connector.replaces_lists(), "{kind}");
        }
        assert_eq!(REPLACING_KINDS, ["file", "webhook", "meta"]);
    }
}
