//! The `braze` connector: segment membership kept on Braze user profiles, REST API.
//!
//! This module owns the requests, the preparation of each member's Braze user identifier
//! through [`crate::identifiers`], the reading of per-object errors out of a 2xx answer, and
//! the classification of failures, including the `X-RateLimit-Reset` wait Braze gives with a
//! 429. It does not create users, aliases, custom attributes or subscription groups, look up
//! profiles beforehand, or retry; [`crate::deliver_with_retries`] retries.
//!
//! Membership is kept one of two ways, chosen per activation by `membership`:
//!
//! - `attribute` (the default): an array custom attribute on the profile holds one value per
//!   segment. `POST {base_url}/users/track` with one attributes object per member, at most 75:
//!
//!   ```json
//!   {"attributes": [{"external_id": "u1", "segments": {"add": ["vip"]},
//!                    "_update_existing_only": true}]}
//!   ```
//!
//!   Removes send `{"remove": ["vip"]}` instead. Both are set operations on the array, so a
//!   batch delivered twice leaves the profile as delivering it once. `_update_existing_only`
//!   is always set: a member Braze does not know is left alone rather than created as an
//!   empty profile.
//! - `subscription_group`: the member's state in one subscription group.
//!   `POST {base_url}/v2/subscription/status/set` with one group entry of at most 50 users:
//!
//!   ```json
//!   {"subscription_groups": [{"subscription_group_id": "...",
//!                             "subscription_state": "subscribed", "external_ids": ["u1"]}]}
//!   ```
//!
//!   Removes set `unsubscribed`. Braze reports no per-user result for this endpoint.
//!
//! Users are matched by `external_id` (sent as it is, trimmed), `email` (trimmed and
//! lower-cased) or `phone` (E.164: `+` and the digits, country code included). Braze takes
//! identifiers in clear and does not hash them; a value that already is a digest is not an
//! e-mail address or a phone number and is rejected locally. Rejection reasons and error
//! messages never quote an identifier or the REST API key.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{Value, json};

use crate::http::{self, Secret, quote};
use crate::identifiers::{self, Invalid};
use crate::members;
use crate::settings::{self, HeaderSecret, Limit, Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};

/// Connection keys the Braze connector knows.
const CONNECTION_KEYS: &[&str] = &["api_key_env", "base_url", "batch_size", "timeout_seconds"];
/// Activation keys the Braze connector knows.
const ACTIVATION_KEYS: &[&str] = &[
    "membership",
    "attribute",
    "value",
    "subscription_group_id",
    "match_by",
    "identifier",
];
/// The most attributes objects one `/users/track` request takes, and the default batch size.
const MAX_ATTRIBUTE_OBJECTS: usize = 75;
/// The most users one subscription group entry takes.
const MAX_SUBSCRIPTION_USERS: usize = 50;
/// `batch_size`: the most attributes objects one `/users/track` request takes, and the
/// default.
const BATCH_SIZE: Limit = Limit {
    default: MAX_ATTRIBUTE_OBJECTS as u64,
    max: MAX_ATTRIBUTE_OBJECTS as u64,
};
/// `timeout_seconds`, seconds a request may take.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 30,
    max: 300,
};
/// How much of an answer is read at most; Braze's answers are small.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// How an activation keeps segment membership on Braze.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Membership {
    /// `value` is added to and removed from the array custom attribute `attribute`.
    Attribute {
        /// The array custom attribute's name.
        attribute: String,
        /// The value that stands for the segment in the array.
        value: String,
    },
    /// The member is subscribed to and unsubscribed from one subscription group.
    SubscriptionGroup {
        /// The subscription group's id, as Braze shows it.
        id: String,
    },
}

impl Membership {
    /// The most members one request of this kind takes.
    fn max_members(&self) -> usize {
        match self {
            Membership::Attribute { .. } => MAX_ATTRIBUTE_OBJECTS,
            Membership::SubscriptionGroup { .. } => MAX_SUBSCRIPTION_USERS,
        }
    }
}

/// The Braze user identifier members are matched by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatchBy {
    /// The profile's `external_id`, sent as it is.
    ExternalId,
    /// The profile's e-mail address, trimmed and lower-cased.
    Email,
    /// The profile's phone number, in E.164.
    Phone,
}

impl MatchBy {
    /// The setting's value, which is also the default member identifier to read.
    fn name(self) -> &'static str {
        match self {
            MatchBy::ExternalId => "external_id",
            MatchBy::Email => "email",
            MatchBy::Phone => "phone",
        }
    }

    /// The field of an attributes object that identifies the user.
    fn attribute_field(self) -> &'static str {
        self.name()
    }

    /// The list of a subscription group entry that holds users of this kind.
    fn subscription_field(self) -> &'static str {
        match self {
            MatchBy::ExternalId => "external_ids",
            MatchBy::Email => "emails",
            MatchBy::Phone => "phones",
        }
    }

    /// The identifier Braze matches on for `raw`.
    fn prepare(self, raw: &str) -> Result<String, Invalid> {
        match self {
            MatchBy::ExternalId => identifiers::clear(raw),
            MatchBy::Email => identifiers::email(raw),
            MatchBy::Phone => identifiers::phone_e164(raw),
        }
    }

    /// What the identifier should be, for rejection reasons.
    fn describe(self) -> &'static str {
        match self {
            MatchBy::ExternalId => "external id",
            MatchBy::Email => "e-mail address",
            MatchBy::Phone => "phone number",
        }
    }
}

/// Adds and removes segment membership on Braze user profiles.
///
/// Connection settings:
/// - `api_key_env` (required): the environment variable holding a REST API key with the
///   `users.track` or `subscription.status.set` permission; the engine passes its value as the
///   `api_key` secret.
/// - `base_url` (required): the REST endpoint of the Braze instance, such as
///   `https://rest.iad-01.braze.com`.
/// - `batch_size`: members per request, 1 to 75, default 75; subscription groups take at
///   most 50 whatever this says.
/// - `timeout_seconds`: per request, 1 to 300, default 30.
///
/// Activation settings:
/// - `membership`: `attribute` (default) or `subscription_group`.
/// - `attribute` and `value` (required with `attribute`): the array custom attribute and the
///   value in it that stands for the segment.
/// - `subscription_group_id` (required with `subscription_group`).
/// - `match_by`: `external_id` (default), `email` or `phone`.
/// - `identifier`: the member identifier read, default the `match_by` value.
#[derive(Debug, Clone)]
pub struct BrazeConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base_url}/users/track` or `{base_url}/v2/subscription/status/set`.
    url: Url,
    /// The REST API key, sent as a bearer token.
    api_key: Secret,
    /// How membership is kept.
    membership: Membership,
    /// The Braze identifier members are matched by.
    match_by: MatchBy,
    /// The member identifier holding it.
    identifier: String,
    /// Members per request.
    batch_size: usize,
}

/// The connection's settings, checked.
struct ConnectionSettings {
    /// The HTTP client, with `timeout_seconds` applied.
    client: reqwest::Client,
    /// `base_url`.
    base_url: Url,
    /// The value of the variable `api_key_env` names.
    api_key: Secret,
    /// `batch_size`.
    batch_size: usize,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `membership` with its own settings.
    membership: Membership,
    /// `match_by`.
    match_by: MatchBy,
    /// `identifier`.
    identifier: String,
}

/// One member ready to send.
struct Prepared<'a> {
    /// The member's profile key.
    key: &'a str,
    /// The Braze identifier, normalised.
    id: String,
}

impl BrazeConnector {
    /// Builds the connector from its connection and activation settings and the resolved
    /// secrets (`api_key`), returning every problem found.
    pub fn from_settings(
        connection: &toml::Table,
        activation: &toml::Table,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Self, Vec<SettingsError>> {
        settings::build(
            connection,
            activation,
            secrets,
            read_connection,
            read_activation,
            Self::new,
        )
    }

    /// Checks the connection settings alone, as when a connection is loaded before any
    /// activation uses it; returns every problem found.
    pub fn check_connection(
        connection: &toml::Table,
        secrets: &BTreeMap<String, String>,
    ) -> Result<(), Vec<SettingsError>> {
        settings::check(connection, secrets, read_connection)
    }

    fn new(connection: ConnectionSettings, activation: ActivationSettings) -> Self {
        let path: &[&str] = match activation.membership {
            Membership::Attribute { .. } => &["users", "track"],
            Membership::SubscriptionGroup { .. } => &["v2", "subscription", "status", "set"],
        };
        BrazeConnector {
            client: connection.client,
            url: http::endpoint(&connection.base_url, path),
            api_key: connection.api_key,
            batch_size: connection
                .batch_size
                .min(activation.membership.max_members()),
            membership: activation.membership,
            match_by: activation.match_by,
            identifier: activation.identifier,
        }
    }

    /// Sends one batch once and classifies the answer.
    async fn send(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let (members, mut outcome) = self.prepare(batch);
        if members.is_empty() {
            return Ok(outcome);
        }
        let adding = match batch.change {
            Change::Add => true,
            Change::Remove => false,
            Change::Replace => return Err(crate::cannot_replace(self.kind())),
        };
        let body = match &self.membership {
            Membership::Attribute { attribute, value } => {
                track_body(self.match_by, attribute, value, adding, &members)
            }
            Membership::SubscriptionGroup { id } => {
                subscription_body(self.match_by, id, adding, &members)
            }
        };
        let response = self
            .client
            .post(self.url.clone())
            .bearer_auth(self.api_key.expose())
            .json(&body)
            .send()
            .await
            .map_err(|error| http::transport_failure("POST", self.url.as_str(), error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        if !status.is_success() {
            let ids: Vec<&str> = members.iter().map(|member| member.id.as_str()).collect();
            return Err(classify_failure(
                status,
                &headers,
                &body,
                self.url.as_str(),
                SystemTime::now(),
                &ids,
            ));
        }
        let sent = self.read_success(batch, status, &headers, &body, &members)?;
        outcome.accepted.extend(sent.accepted);
        outcome.rejected.extend(sent.rejected);
        Ok(outcome)
    }

    /// The members with a usable identifier, and an outcome rejecting those without one.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<Prepared<'a>>, Outcome) {
        members::prepare(batch, "braze", "identifier", |member| {
            let id = self.identify(member)?;
            Ok(Prepared {
                key: &member.key,
                id,
            })
        })
    }

    /// The member's Braze identifier, or why it has none.
    fn identify(&self, member: &Member) -> Result<String, String> {
        let prepared = match member.identifiers.get(&self.identifier) {
            Some(raw) => self.match_by.prepare(raw),
            None => Err(Invalid::Missing),
        };
        prepared.map_err(|invalid| {
            format!(
                "no usable {}: `{}` {invalid}",
                self.match_by.describe(),
                self.identifier
            )
        })
    }

    /// What a 2xx answer says about `members`: per-object errors reject those members, the
    /// others are accepted. A `queued` answer (Braze under maintenance) accepts them all. An
    /// error that names no member makes the whole batch retryable: none can be counted as
    /// accepted.
    fn read_success(
        &self,
        batch: &Batch,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        members: &[Prepared<'_>],
    ) -> Result<Outcome, DeliveryError> {
        let answer: SuccessAnswer =
            serde_json::from_slice(body).map_err(|error| DeliveryError::Retryable {
                message: format!(
                    "{} answered {status} with an unreadable body: {error}",
                    self.url
                ),
            })?;
        if answer.message != "success" && answer.message != "queued" {
            return Err(DeliveryError::Permanent {
                message: format!(
                    "{} answered {status} with the message {}",
                    self.url,
                    quote(&http::redact_addresses(&answer.message))
                ),
            });
        }
        if answer.message == "queued" {
            tracing::info!(
                activation = %batch.activation,
                change = batch.change.as_str(),
                sequence = batch.sequence,
                members = members.len(),
                "braze queued the batch for later processing"
            );
        }
        if remaining_quota(headers) == Some(0) {
            tracing::debug!(
                activation = %batch.activation,
                sequence = batch.sequence,
                "braze rate limit used up until its reset"
            );
        }

        let mut refused: BTreeMap<usize, String> = BTreeMap::new();
        let mut unplaced = Vec::new();
        for error in &answer.errors {
            match error.index(members.len()) {
                Some(index) => {
                    let reason = minor_error_reason(error, &members[index].id);
                    refused.insert(index, reason);
                }
                None => unplaced.push(error),
            }
        }
        if let Some(first) = unplaced.first() {
            // Which members such an error is about is unknown, so none of the batch can be
            // counted as accepted; sending the batch again is safe, the requests are idempotent.
            let ids: Vec<&str> = members.iter().map(|member| member.id.as_str()).collect();
            return Err(DeliveryError::Retryable {
                message: format!(
                    "{} answered {status} with {} error(s) that name no member of the batch, \
                     the first: {}",
                    self.url,
                    unplaced.len(),
                    quote(&http::redact(first.text(), &ids))
                ),
            });
        }
        let mut outcome = Outcome::default();
        for (index, member) in members.iter().enumerate() {
            match refused.remove(&index) {
                Some(reason) => outcome.rejected.push(Rejection {
                    key: member.key.to_owned(),
                    reason,
                }),
                None => outcome.accepted.push(member.key.to_owned()),
            }
        }
        Ok(outcome)
    }
}

impl Connector for BrazeConnector {
    fn destination(&self) -> Option<String> {
        Some(match &self.membership {
            Membership::Attribute { attribute, value } => {
                format!("the Braze attribute `{attribute}` value `{value}`")
            }
            Membership::SubscriptionGroup { id } => format!("Braze subscription group {id}"),
        })
    }

    fn kind(&self) -> &'static str {
        "braze"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.send(batch))
    }
}

/// The `/users/track` body: one attributes object per member, in member order.
fn track_body(
    match_by: MatchBy,
    attribute: &str,
    value: &str,
    adding: bool,
    members: &[Prepared<'_>],
) -> Value {
    let operator = if adding { "add" } else { "remove" };
    let objects: Vec<Value> = members
        .iter()
        .map(|member| {
            let mut object = serde_json::Map::new();
            object.insert(match_by.attribute_field().to_owned(), json!(member.id));
            object.insert(attribute.to_owned(), json!({ operator: [value] }));
            object.insert("_update_existing_only".to_owned(), json!(true));
            Value::Object(object)
        })
        .collect();
    json!({ "attributes": objects })
}

/// The `/v2/subscription/status/set` body: one group entry holding every member.
fn subscription_body(
    match_by: MatchBy,
    group_id: &str,
    adding: bool,
    members: &[Prepared<'_>],
) -> Value {
    let state = if adding { "subscribed" } else { "unsubscribed" };
    let mut ids: Vec<&str> = members.iter().map(|member| member.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut entry = serde_json::Map::new();
    entry.insert("subscription_group_id".to_owned(), json!(group_id));
    entry.insert("subscription_state".to_owned(), json!(state));
    entry.insert(match_by.subscription_field().to_owned(), json!(ids));
    json!({ "subscription_groups": [Value::Object(entry)] })
}

/// The part of a 2xx answer this connector reads.
#[derive(serde::Deserialize)]
struct SuccessAnswer {
    /// `success`, or `queued` when Braze accepted the request for later processing.
    #[serde(default)]
    message: String,
    /// Non-fatal errors; the objects they do not name were applied.
    #[serde(default)]
    errors: Vec<MinorError>,
}

/// One non-fatal error: a text, or an object naming the input array and index at fault.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum MinorError {
    /// `{"type": "...", "input_array": "attributes", "index": 2}`.
    Placed {
        /// What is wrong.
        #[serde(rename = "type", default)]
        kind: String,
        /// The request array holding the object at fault.
        #[serde(default)]
        input_array: Option<String>,
        /// The object's position in that array.
        #[serde(default)]
        index: Option<usize>,
    },
    /// A bare message.
    Text(String),
}

impl MinorError {
    /// The position of the member this error names, if it names one of the `sent`.
    fn index(&self, sent: usize) -> Option<usize> {
        match self {
            MinorError::Placed {
                input_array, index, ..
            } => {
                let in_attributes = input_array.as_deref().is_none_or(|a| a == "attributes");
                index.filter(|index| in_attributes && *index < sent)
            }
            MinorError::Text(_) => None,
        }
    }

    /// What the error says.
    fn text(&self) -> &str {
        match self {
            MinorError::Placed { kind, .. } => kind,
            MinorError::Text(text) => text,
        }
    }
}

/// The rejection reason for a non-fatal error, without the identifier.
fn minor_error_reason(error: &MinorError, id: &str) -> String {
    format!(
        "Braze refused the attributes object: {}",
        quote(&http::redact_addresses(&redact(error.text(), id)))
    )
}

/// `text` with every occurrence of `id` (ASCII case ignored) replaced by `<identifier>`.
fn redact(text: &str, id: &str) -> String {
    if id.is_empty() {
        return text.to_owned();
    }
    let lower = text.to_ascii_lowercase();
    let id = id.to_ascii_lowercase();
    let mut redacted = String::with_capacity(text.len());
    let mut rest = 0;
    while let Some(found) = lower[rest..].find(&id) {
        let start = rest + found;
        redacted.push_str(&text[rest..start]);
        redacted.push_str("<identifier>");
        rest = start + id.len();
    }
    redacted.push_str(&text[rest..]);
    redacted
}

/// The body of a failed answer: `{"message": "...", "errors": [...]}`.
#[derive(serde::Deserialize)]
struct FatalAnswer {
    /// The fatal error.
    #[serde(default)]
    message: String,
    /// Further errors, as Braze lists them.
    #[serde(default)]
    errors: Vec<MinorError>,
}

impl FatalAnswer {
    /// The message, then the first error if there is one.
    fn describe(&self) -> String {
        match self.errors.first() {
            Some(error) => format!("{} ({})", self.message, error.text()),
            None => self.message.clone(),
        }
    }
}

/// The failure a non-2xx answer stands for; the batch's `ids` and personal data are blanked
/// from the quoted text.
fn classify_failure(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    shown_url: &str,
    now: SystemTime,
    ids: &[&str],
) -> DeliveryError {
    let text = String::from_utf8_lossy(body);
    let said = match serde_json::from_slice::<FatalAnswer>(body) {
        Ok(answer) => format!(": {}", quote(&http::redact(&answer.describe(), ids))),
        Err(_) if text.trim_start().starts_with('<') => {
            " with an HTML page instead of a Braze error".to_owned()
        }
        Err(_) => format!(": {}", quote(&http::redact(&text, ids))),
    };
    let message = format!("{shown_url} answered {status}{said}");
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: rate_limit_wait(headers, now),
            message,
        },
        401 => DeliveryError::Auth {
            message: format!("{message}; check the REST API key in `api_key_env`"),
        },
        403 => DeliveryError::Auth {
            message: format!(
                "{message}; check that the REST API key has the permission for this endpoint and \
                 that the account is active"
            ),
        },
        404 => DeliveryError::Permanent {
            message: format!("{message}; check `base_url` and the REST API key"),
        },
        413 => DeliveryError::Permanent {
            message: format!("{message}; the request is too large, lower `batch_size`"),
        },
        408 => DeliveryError::Retryable { message },
        501 => DeliveryError::Permanent { message },
        500..=599 => DeliveryError::Retryable { message },
        _ => DeliveryError::Permanent { message },
    }
}

/// The wait a 429 asks for: `Retry-After` if present, otherwise until `X-RateLimit-Reset`
/// (UTC epoch seconds; a reset in the past asks for no wait).
fn rate_limit_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(wait) = headers
        .get(RETRY_AFTER)
        .and_then(|value| http::requested_wait(value, now))
    {
        return Some(wait);
    }
    let reset: u64 = headers
        .get("x-ratelimit-reset")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A reset too far ahead for the clock to hold is ignored like an unreadable one.
    let reset = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(reset))?;
    Some(reset.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `X-RateLimit-Remaining`, if the answer carries a readable one.
fn remaining_quota(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("x-ratelimit-remaining")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The REST API key, in `api_key_env`.
const API_KEY: HeaderSecret = HeaderSecret {
    name: "api_key",
    holds: "a Braze REST API key",
    called: "the API key",
    prefix: None,
};

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let api_key = problems.header_secret(table, secrets, API_KEY);
    let base_url = match table.contains_key("base_url") {
        true => problems.http_url(table, Place::Connection, "base_url"),
        false => {
            problems.push(
                "base_url",
                "missing; set it to the REST endpoint of the Braze instance, such as \
                 `https://rest.iad-01.braze.com`",
            );
            None
        }
    };
    let batch_size = problems.batch_size(table, BATCH_SIZE);
    let client = problems.http_client(table, "base_url", TIMEOUT_SECONDS);
    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        api_key: api_key?,
        batch_size,
    })
}

/// The checked activation settings, `None` when any is wrong (the problems say which).
fn read_activation(problems: &mut Problems, table: &toml::Table) -> Option<ActivationSettings> {
    problems.reject_unknown_keys(table, Place::Activation, ACTIVATION_KEYS);
    let membership = read_membership(problems, table);
    let match_by = match problems
        .string(table, Place::Activation, "match_by")
        .as_deref()
    {
        None | Some("external_id") => Some(MatchBy::ExternalId),
        Some("email") => Some(MatchBy::Email),
        Some("phone") => Some(MatchBy::Phone),
        Some(other) => {
            problems.push(
                "match_by",
                format!("expected `external_id`, `email` or `phone`, got `{other}`"),
            );
            None
        }
    };
    let identifier = match problems.string(table, Place::Activation, "identifier") {
        Some(name) if name.is_empty() => {
            problems.push(
                "identifier",
                "empty; set it to the name of a member identifier",
            );
            None
        }
        Some(name) => Some(name),
        None => match_by.map(|match_by| match_by.name().to_owned()),
    };
    Some(ActivationSettings {
        membership: membership?,
        match_by: match_by?,
        identifier: identifier?,
    })
}

/// `membership` and the settings that go with it.
fn read_membership(problems: &mut Problems, table: &toml::Table) -> Option<Membership> {
    let kind = problems.string(table, Place::Activation, "membership");
    let required = |problems: &mut Problems, key: &str, purpose: &str| match problems.string(
        table,
        Place::Activation,
        key,
    ) {
        Some(value) if !value.trim().is_empty() => Some(value),
        Some(_) => {
            problems.push(key, format!("empty; set it to {purpose}"));
            None
        }
        None => {
            if !table.contains_key(key) {
                problems.push(key, format!("missing; set it to {purpose}"));
            }
            None
        }
    };
    let unused = |problems: &mut Problems, keys: &[&str], membership: &str| {
        for key in keys.iter().filter(|key| table.contains_key(**key)) {
            problems.push(
                key,
                format!("only used with `membership = \"{}\"`", other(membership)),
            );
        }
    };
    match kind.as_deref() {
        None | Some("attribute") => {
            unused(problems, &["subscription_group_id"], "attribute");
            let attribute = required(
                problems,
                "attribute",
                "the name of the array custom attribute that holds segment values",
            );
            let value = required(
                problems,
                "value",
                "the value that stands for this segment in the array",
            );
            Some(Membership::Attribute {
                attribute: attribute?,
                value: value?,
            })
        }
        Some("subscription_group") => {
            unused(problems, &["attribute", "value"], "subscription_group");
            let id = required(
                problems,
                "subscription_group_id",
                "the id of the subscription group members are subscribed to",
            );
            Some(Membership::SubscriptionGroup { id: id? })
        }
        Some(other) => {
            problems.push(
                "membership",
                format!("expected `attribute` or `subscription_group`, got `{other}`"),
            );
            None
        }
    }
}

/// The membership kind other than `membership`.
fn other(membership: &str) -> &'static str {
    if membership == "attribute" {
        "subscription_group"
    } else {
        "attribute"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::error_kind as kind;

    #[test]
    fn statuses_are_classified_by_what_sending_again_would_do() {
        let fatal = br#"{"message": "Invalid API Key"}"#;
        let classify = |code: u16, body: &[u8]| {
            let status = StatusCode::from_u16(code).unwrap();
            let error =
                classify_failure(status, &HeaderMap::new(), body, "u", SystemTime::now(), &[]);
            kind(&error)
        };

        assert_eq!(classify(400, fatal), "permanent");
        assert_eq!(classify(401, fatal), "auth");
        assert_eq!(classify(403, fatal), "auth");
        assert_eq!(classify(404, fatal), "permanent");
        assert_eq!(classify(413, b""), "permanent");
        assert_eq!(classify(429, b""), "rate limited");
        assert_eq!(classify(500, b""), "retryable");
        assert_eq!(classify(501, b""), "permanent");
        assert_eq!(classify(502, b"<html>bad gateway</html>"), "retryable");
    }

    #[test]
    fn the_reset_header_asks_to_wait_until_then_and_retry_after_comes_first() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut reset = HeaderMap::new();
        reset.insert("x-ratelimit-reset", "1700000042".parse().unwrap());
        let mut past = HeaderMap::new();
        past.insert("x-ratelimit-reset", "1699999000".parse().unwrap());
        let mut both = reset.clone();
        both.insert(RETRY_AFTER, "7".parse().unwrap());

        assert_eq!(rate_limit_wait(&reset, now), Some(Duration::from_secs(42)));
        assert_eq!(rate_limit_wait(&past, now), Some(Duration::ZERO));
        assert_eq!(rate_limit_wait(&both, now), Some(Duration::from_secs(7)));
        assert_eq!(rate_limit_wait(&HeaderMap::new(), now), None);
    }

    #[test]
    fn phones_are_e164_with_a_plus() {
        assert_eq!(
            identifiers::phone_e164("+1 (650) 555-1212"),
            Ok("+16505551212".into())
        );
        assert_eq!(
            identifiers::phone_e164("0044 7700 900123"),
            Ok("+447700900123".into())
        );
        assert_eq!(identifiers::phone_e164("call me"), Err(Invalid::Empty));
    }

    #[test]
    fn identifiers_are_redacted_from_braze_messages() {
        assert_eq!(
            redact("Ann@Example.com is not a valid email", "ann@example.com"),
            "<identifier> is not a valid email"
        );
    }

    #[test]
    fn a_minor_error_names_a_member_only_by_an_index_into_the_attributes_sent() {
        let placed = |text: &str| serde_json::from_str::<MinorError>(text).unwrap();

        assert_eq!(
            placed(r#"{"type": "x", "input_array": "attributes", "index": 1}"#).index(3),
            Some(1)
        );
        assert_eq!(
            placed(r#"{"type": "x", "input_array": "events", "index": 1}"#).index(3),
            None
        );
        assert_eq!(
            placed(r#"{"type": "x", "input_array": "attributes", "index": 3}"#).index(3),
            None
        );
        assert_eq!(placed(r#""something minor""#).index(3), None);
    }
}
