//! The `sendgrid` connector: members of a Twilio SendGrid Marketing Campaigns list.
//!
//! This module owns the requests (upsert `PUT {base}/v3/marketing/contacts` with the list in
//! `list_ids` for adds; lookup `POST {base}/v3/marketing/contacts/search/emails` then
//! `DELETE {base}/v3/marketing/lists/{list_id}/contacts?contact_ids=...` for removes), the
//! reading of per-member refusals out of SendGrid's validation errors, and the classification
//! of failures, including the wait `Retry-After` or `X-RateLimit-Reset` asks for. It does not
//! create lists, delete contacts, poll import jobs or retry; [`crate::deliver_with_retries`]
//! retries.
//!
//! Adds upsert contacts by address and add them to the list, so adding a member twice leaves
//! one contact in the list. Removes take contacts out of the list only (the contact stays in
//! the account); SendGrid removes by contact id, so addresses are first looked up, at most 100
//! per search. A member SendGrid does not know, or whose contact is not in the list, counts as
//! removed, so removing twice changes nothing the second time.
//!
//! Known limits:
//! - SendGrid answers both writes with 202 and a `job_id` and applies them later. The job is
//!   not polled: a 202 counts every member sent as accepted, and a row the job later refuses
//!   (listed only in the job's `errors_url`) is not reported as a rejection.
//! - A contact is only found by the lookup once its upsert job has finished, so a member added
//!   and removed within moments may be looked up too early, count as removed, and still join
//!   the list when the upsert job completes.
//! - SendGrid updates an existing contact only when every identifier it holds is sent; adds
//!   send the address alone, so a contact that also carries another identifier (phone,
//!   external id) may be refused by the job.
//!
//! A validation refusal (400) of an upsert that names contacts by `contacts[<index>]` rejects
//! those members and sends the others again in the same call; one that names none fails the
//! batch. A lookup refused for an invalid address is repeated one address at a time to find
//! which member it was. Addresses travel in clear (SendGrid does not take hashes), trimmed and
//! lower-cased; rejection reasons and error messages never quote an address.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};

use crate::http::{self, Secret, quote, redact_addresses};
use crate::identifiers;
use crate::settings::{Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Outcome, Rejection, SettingsError,
};

/// Connection keys the SendGrid connector knows.
const CONNECTION_KEYS: &[&str] = &["api_key_env", "base_url", "batch_size", "timeout_seconds"];
/// Activation keys the SendGrid connector knows.
const ACTIVATION_KEYS: &[&str] = &["list_id", "email_identifier"];
/// The SendGrid API host (EU-pinned accounts use `https://api.eu.sendgrid.com`).
const DEFAULT_BASE_URL: &str = "https://api.sendgrid.com";
/// The most contacts one upsert takes.
const MAX_MEMBERS: i64 = 30_000;
/// The batch size unless `batch_size` says otherwise: a removal of this many members takes
/// 100 lookups, an add one upsert.
const DEFAULT_BATCH_SIZE: i64 = 10_000;
/// The most bytes of JSON one upsert may carry; SendGrid's limit is 6 MB.
const MAX_UPSERT_BYTES: usize = 6_000_000;
/// The most addresses one lookup takes; also the most contact ids sent in one removal.
const MAX_LOOKUP: usize = 100;
/// Seconds a request may take unless `timeout_seconds` says otherwise.
const DEFAULT_TIMEOUT_SECONDS: i64 = 60;
/// The largest `timeout_seconds` accepted.
const MAX_TIMEOUT_SECONDS: i64 = 300;
/// The member identifier holding the e-mail address unless `email_identifier` says otherwise.
const DEFAULT_EMAIL_IDENTIFIER: &str = "email";
/// How much of a successful answer is read at most; a 100-address lookup is well under this.
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Adds and removes members of one SendGrid Marketing Campaigns list.
///
/// Connection settings:
/// - `api_key_env` (required): the environment variable holding the API key (`SG.` ...), with
///   Marketing access; the engine passes its value as the `api_key` secret.
/// - `base_url`: the API host, default `https://api.sendgrid.com`.
/// - `batch_size`: members per batch, 1 to 30000, default 10000.
/// - `timeout_seconds`: per request, 1 to 300, default 60.
///
/// Activation settings:
/// - `list_id` (required): the list's id, a UUID.
/// - `email_identifier`: the member identifier holding the e-mail address, default `email`.
#[derive(Debug, Clone)]
pub struct SendgridConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base}/v3/marketing/contacts`, the upsert endpoint.
    contacts_url: Url,
    /// `{base}/v3/marketing/contacts/search/emails`, the lookup endpoint.
    search_url: Url,
    /// `{base}/v3/marketing/lists/{list_id}/contacts`, the removal endpoint.
    list_contacts_url: Url,
    /// The list's id, as sent in `list_ids`.
    list_id: String,
    /// The API key, sent as a bearer token.
    api_key: Secret,
    /// The member identifier holding the address (`email_identifier`).
    email_identifier: String,
    /// Members per batch (`batch_size`).
    batch_size: usize,
}

/// The connection's settings, checked.
struct ConnectionSettings {
    /// The HTTP client, with `timeout_seconds` applied.
    client: reqwest::Client,
    /// `base_url`, or the SendGrid API host.
    base_url: Url,
    /// The value of the variable `api_key_env` names.
    api_key: Secret,
    /// `batch_size`.
    batch_size: usize,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `list_id`, lower-cased.
    list_id: String,
    /// `email_identifier`.
    email_identifier: String,
}

/// One member ready to send.
struct Prepared<'a> {
    /// The member's profile key.
    key: &'a str,
    /// The trimmed, lower-cased address.
    email: String,
}

/// What the lookup found for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// A contact with this id that is in the list (or whose lists SendGrid did not say).
    InList(String),
    /// No contact, or one that is not in the list: nothing to remove.
    Absent,
    /// SendGrid refused the address, for this reason.
    Refused(String),
}

impl SendgridConnector {
    /// Builds the connector from its connection and activation settings and the resolved
    /// secrets (`api_key`), returning every problem found.
    pub fn from_settings(
        connection: &toml::Table,
        activation: &toml::Table,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Self, Vec<SettingsError>> {
        let mut problems = Problems::default();
        let connection = read_connection(&mut problems, connection, secrets);
        let activation = read_activation(&mut problems, activation);
        problems.finish(|| {
            let connection = connection.expect("connection settings when there are no problems");
            let activation = activation.expect("activation settings when there are no problems");
            SendgridConnector::new(connection, activation)
        })
    }

    /// Checks the connection settings alone, as when a connection is loaded before any
    /// activation uses it; returns every problem found.
    pub fn check_connection(
        connection: &toml::Table,
        secrets: &BTreeMap<String, String>,
    ) -> Result<(), Vec<SettingsError>> {
        let mut problems = Problems::default();
        read_connection(&mut problems, connection, secrets);
        problems.finish(|| ())
    }

    fn new(connection: ConnectionSettings, activation: ActivationSettings) -> Self {
        let endpoint = |segments: &[&str]| {
            let mut url = connection.base_url.clone();
            url.path_segments_mut()
                .expect("an http URL has path segments")
                .pop_if_empty()
                .extend(segments);
            url.set_query(None);
            url.set_fragment(None);
            url
        };
        let list_id = activation.list_id.as_str();
        SendgridConnector {
            contacts_url: endpoint(&["v3", "marketing", "contacts"]),
            search_url: endpoint(&["v3", "marketing", "contacts", "search", "emails"]),
            list_contacts_url: endpoint(&["v3", "marketing", "lists", list_id, "contacts"]),
            client: connection.client,
            list_id: activation.list_id,
            api_key: connection.api_key,
            email_identifier: activation.email_identifier,
            batch_size: connection.batch_size,
        }
    }

    /// Sends one batch once and classifies the answers.
    async fn send(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let (members, mut outcome) = self.prepare(batch);
        if members.is_empty() {
            return Ok(outcome);
        }
        let sent = match batch.change {
            Change::Add => self.add(&members).await?,
            Change::Remove => self.remove(&members).await?,
            Change::Replace => return Err(crate::cannot_replace(self.kind())),
        };
        outcome.accepted.extend(sent.accepted);
        outcome.rejected.extend(sent.rejected);
        Ok(outcome)
    }

    /// The members with a usable address, and an outcome rejecting those without one.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<Prepared<'a>>, Outcome) {
        let mut members = Vec::with_capacity(batch.members.len());
        let mut outcome = Outcome::default();
        for member in &batch.members {
            let email = match member.identifiers.get(&self.email_identifier) {
                Some(raw) => identifiers::email(raw),
                None => Err(identifiers::Invalid::Missing),
            };
            match email {
                Ok(email) => members.push(Prepared {
                    key: &member.key,
                    email,
                }),
                Err(invalid) => outcome.rejected.push(Rejection {
                    key: member.key.clone(),
                    reason: format!(
                        "no usable e-mail address: `{}` {invalid}",
                        self.email_identifier
                    ),
                }),
            }
        }
        if !outcome.rejected.is_empty() {
            tracing::debug!(
                activation = %batch.activation,
                change = batch.change.as_str(),
                sequence = batch.sequence,
                rejected = outcome.rejected.len(),
                "members without a usable e-mail address are not sent to sendgrid"
            );
        }
        (members, outcome)
    }

    /// Upserts the members' contacts into the list, in as many requests as the byte limit
    /// needs, and drops the members a validation refusal names before sending the rest again.
    async fn add(&self, members: &[Prepared<'_>]) -> Result<Outcome, DeliveryError> {
        let addresses: Vec<&str> = distinct_addresses(members);
        let mut refused: BTreeMap<&str, String> = BTreeMap::new();
        for chunk in split_by_bytes(&addresses, MAX_UPSERT_BYTES) {
            let mut pending: Vec<&str> = chunk.to_vec();
            while !pending.is_empty() {
                match self.upsert(&pending).await? {
                    Upserted::Queued => break,
                    Upserted::Refused(rows) => {
                        for (index, reason) in rows {
                            refused.insert(pending[index], reason);
                        }
                        pending.retain(|email| !refused.contains_key(email));
                    }
                }
            }
        }
        let mut outcome = Outcome::default();
        for member in members {
            match refused.get(member.email.as_str()) {
                Some(reason) => outcome.rejected.push(Rejection {
                    key: member.key.to_owned(),
                    reason: reason.clone(),
                }),
                None => outcome.accepted.push(member.key.to_owned()),
            }
        }
        Ok(outcome)
    }

    /// One upsert of `addresses` into the list.
    async fn upsert(&self, addresses: &[&str]) -> Result<Upserted, DeliveryError> {
        let body = serde_json::json!({
            "list_ids": [self.list_id],
            "contacts": addresses
                .iter()
                .map(|email| serde_json::json!({"email": email}))
                .collect::<Vec<_>>(),
        });
        let response = self
            .client
            .put(self.contacts_url.clone())
            .bearer_auth(self.api_key.expose())
            .json(&body)
            .send()
            .await
            .map_err(|error| http::transport_failure("PUT", self.contacts_url.as_str(), error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        let shown = self.contacts_url.as_str();
        if status.is_success() {
            read_job(status, &body, shown)?;
            return Ok(Upserted::Queued);
        }
        if status == StatusCode::BAD_REQUEST {
            let rows = refused_rows(&body, "contacts", addresses);
            if !rows.is_empty() {
                return Ok(Upserted::Refused(rows));
            }
        }
        Err(classify_failure(
            status,
            &headers,
            &body,
            shown,
            SystemTime::now(),
        ))
    }

    /// Takes the members' contacts out of the list, looking their ids up 100 addresses at a
    /// time. A failure of a request fails the batch; sending it again looks the members up
    /// again, and those already taken out are no longer in the list.
    async fn remove(&self, members: &[Prepared<'_>]) -> Result<Outcome, DeliveryError> {
        let addresses = distinct_addresses(members);
        let mut found: BTreeMap<&str, Found> = BTreeMap::new();
        for chunk in addresses.chunks(MAX_LOOKUP) {
            let looked_up = self.look_up(chunk).await?;
            let ids: BTreeSet<&str> = looked_up
                .values()
                .filter_map(|found| match found {
                    Found::InList(id) => Some(id.as_str()),
                    Found::Absent | Found::Refused(_) => None,
                })
                .collect();
            if !ids.is_empty() {
                self.delete_from_list(&ids).await?;
            }
            found.extend(looked_up);
        }
        let mut outcome = Outcome::default();
        for member in members {
            match found.get(member.email.as_str()) {
                Some(Found::Refused(reason)) => outcome.rejected.push(Rejection {
                    key: member.key.to_owned(),
                    reason: reason.clone(),
                }),
                Some(Found::InList(_) | Found::Absent) | None => {
                    outcome.accepted.push(member.key.to_owned())
                }
            }
        }
        Ok(outcome)
    }

    /// Looks up the contacts of at most 100 addresses. When SendGrid refuses the lookup for an
    /// invalid address, each address is looked up alone to find which.
    async fn look_up<'e>(
        &self,
        addresses: &[&'e str],
    ) -> Result<BTreeMap<&'e str, Found>, DeliveryError> {
        match self.search(addresses).await? {
            Searched::Found(found) => Ok(addresses
                .iter()
                .map(|email| (*email, found.get(*email).cloned().unwrap_or(Found::Absent)))
                .collect()),
            Searched::Refused(reason) if addresses.len() == 1 => {
                Ok(BTreeMap::from([(addresses[0], Found::Refused(reason))]))
            }
            Searched::Refused(_) => {
                let mut found = BTreeMap::new();
                for email in addresses {
                    let one = match self.search(&[email]).await? {
                        Searched::Found(mut one) => one.remove(*email).unwrap_or(Found::Absent),
                        Searched::Refused(reason) => Found::Refused(reason),
                    };
                    found.insert(*email, one);
                }
                Ok(found)
            }
        }
    }

    /// One lookup of `addresses`.
    async fn search(&self, addresses: &[&str]) -> Result<Searched, DeliveryError> {
        let body = serde_json::json!({ "emails": addresses });
        let response = self
            .client
            .post(self.search_url.clone())
            .bearer_auth(self.api_key.expose())
            .json(&body)
            .send()
            .await
            .map_err(|error| http::transport_failure("POST", self.search_url.as_str(), error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        let shown = self.search_url.as_str();
        if status.is_success() {
            let answer: SearchAnswer =
                serde_json::from_slice(&body).map_err(|error| DeliveryError::Retryable {
                    message: format!("{shown} answered {status} with an unreadable body: {error}"),
                })?;
            return Ok(Searched::Found(self.read_search(answer)));
        }
        let errors = serde_json::from_slice::<ErrorBody>(&body).ok();
        match (status.as_u16(), errors) {
            // SendGrid answers 404 when none of the addresses has a contact.
            (404, Some(_)) => Ok(Searched::Found(BTreeMap::new())),
            (400, Some(errors)) => Ok(Searched::Refused(format!(
                "SendGrid refused to look the address up: {}",
                errors.describe()
            ))),
            _ => Err(classify_failure(
                status,
                &headers,
                &body,
                shown,
                SystemTime::now(),
            )),
        }
    }

    /// The lookup's result as what it means for the list, by lower-cased address.
    fn read_search(&self, answer: SearchAnswer) -> BTreeMap<String, Found> {
        answer
            .result
            .into_iter()
            .map(|(email, entry)| {
                let found = match entry.contact {
                    Some(contact) if contact.id.is_empty() => Found::Absent,
                    Some(contact) => match contact.list_ids {
                        Some(lists)
                            if !lists
                                .iter()
                                .any(|id| id.eq_ignore_ascii_case(&self.list_id)) =>
                        {
                            Found::Absent
                        }
                        _ => Found::InList(contact.id),
                    },
                    None => Found::Absent,
                };
                (email.trim().to_lowercase(), found)
            })
            .collect()
    }

    /// Takes the contacts `ids` (at most 100) out of the list.
    async fn delete_from_list(&self, ids: &BTreeSet<&str>) -> Result<(), DeliveryError> {
        let mut url = self.list_contacts_url.clone();
        let joined: Vec<&str> = ids.iter().copied().collect();
        url.query_pairs_mut()
            .append_pair("contact_ids", &joined.join(","));
        let response = self
            .client
            .delete(url)
            .bearer_auth(self.api_key.expose())
            .send()
            .await
            .map_err(|error| {
                http::transport_failure("DELETE", self.list_contacts_url.as_str(), error)
            })?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        let shown = self.list_contacts_url.as_str();
        if status.is_success() {
            return read_job(status, &body, shown);
        }
        Err(classify_failure(
            status,
            &headers,
            &body,
            shown,
            SystemTime::now(),
        ))
    }
}

impl Connector for SendgridConnector {
    fn kind(&self) -> &'static str {
        "sendgrid"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.send(batch))
    }
}

/// What an upsert request came to.
enum Upserted {
    /// SendGrid queued the job.
    Queued,
    /// SendGrid refused these rows (index among the addresses sent, reason) and queued nothing.
    Refused(Vec<(usize, String)>),
}

/// What a lookup request came to.
enum Searched {
    /// What was found, by lower-cased address; an address left out has no contact.
    Found(BTreeMap<String, Found>),
    /// SendGrid refused the lookup for an invalid address, for this reason.
    Refused(String),
}

/// The answer to a write: `{"job_id": "..."}`.
#[derive(serde::Deserialize)]
struct JobAnswer {
    #[serde(default)]
    job_id: String,
}

/// The answer to a lookup: `{"result": {"<address>": {"contact": {...}} | {"error": "..."}}}`.
#[derive(serde::Deserialize)]
struct SearchAnswer {
    #[serde(default)]
    result: BTreeMap<String, SearchEntry>,
}

/// One address of a lookup's result.
#[derive(serde::Deserialize)]
struct SearchEntry {
    #[serde(default)]
    contact: Option<Contact>,
}

/// The fields of a contact this connector reads.
#[derive(serde::Deserialize)]
struct Contact {
    #[serde(default)]
    id: String,
    #[serde(default)]
    list_ids: Option<Vec<String>>,
}

/// SendGrid's error body: `{"errors": [{"field": ..., "message": ...}]}`.
#[derive(Debug, serde::Deserialize)]
struct ErrorBody {
    errors: Vec<ErrorItem>,
}

/// One entry of an error body.
#[derive(Debug, serde::Deserialize)]
struct ErrorItem {
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    message: String,
}

impl ErrorBody {
    /// The messages, each with its field, addresses left out: `invalid email (contacts[1])`.
    fn describe(&self) -> String {
        let said: Vec<String> = self
            .errors
            .iter()
            .map(
                |item| match item.field.as_deref().filter(|f| !f.is_empty()) {
                    Some(field) => format!("{} ({field})", redact_addresses(&item.message)),
                    None => redact_addresses(&item.message),
                },
            )
            .collect();
        quote(&said.join("; "))
    }
}

/// Checks that a successful write answer carries a `job_id`.
fn read_job(status: StatusCode, body: &[u8], shown: &str) -> Result<(), DeliveryError> {
    match serde_json::from_slice::<JobAnswer>(body) {
        Ok(answer) if !answer.job_id.is_empty() => {
            tracing::debug!(job_id = %answer.job_id, "sendgrid queued the change");
            Ok(())
        }
        _ => Err(DeliveryError::Retryable {
            message: format!("{shown} answered {status} without a job id"),
        }),
    }
}

/// The rows a 400 refuses, by index among `sent`, when every error names one as
/// `<array>[<index>]...` in its `field`; empty when any error names none.
fn refused_rows(body: &[u8], array: &str, sent: &[&str]) -> Vec<(usize, String)> {
    let Ok(errors) = serde_json::from_slice::<ErrorBody>(body) else {
        return Vec::new();
    };
    let mut rows: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for item in &errors.errors {
        let index = item
            .field
            .as_deref()
            .and_then(|field| field.strip_prefix(array)?.strip_prefix('['))
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(index, _)| index.parse::<usize>().ok())
            .filter(|index| *index < sent.len());
        match index {
            Some(index) => rows
                .entry(index)
                .or_default()
                .push(redact_addresses(&item.message)),
            None => return Vec::new(),
        }
    }
    rows.into_iter()
        .map(|(index, messages)| {
            let reason = format!(
                "SendGrid refused the contact: {}",
                quote(&messages.join("; "))
            );
            (index, reason)
        })
        .collect()
}

/// The members' addresses, each once, in order.
fn distinct_addresses<'m>(members: &'m [Prepared<'_>]) -> Vec<&'m str> {
    let mut seen = BTreeSet::new();
    members
        .iter()
        .map(|member| member.email.as_str())
        .filter(|email| seen.insert(*email))
        .collect()
}

/// `addresses` cut into runs whose upsert body stays within `limit` bytes.
fn split_by_bytes<'a, 'e>(addresses: &'a [&'e str], limit: usize) -> Vec<&'a [&'e str]> {
    // `{"list_ids":["<36-character id>"],"contacts":[]}` plus room to spare.
    const ENVELOPE: usize = 128;
    let mut chunks = Vec::new();
    let (mut start, mut size) = (0, ENVELOPE);
    for (index, email) in addresses.iter().enumerate() {
        // `{"email":"..."},`, with the address as JSON escapes it.
        let row = serde_json::to_string(email).map_or(email.len() + 2, |text| text.len()) + 12;
        if index > start && size + row > limit {
            chunks.push(&addresses[start..index]);
            (start, size) = (index, ENVELOPE);
        }
        size += row;
    }
    if start < addresses.len() {
        chunks.push(&addresses[start..]);
    }
    chunks
}

/// The failure a non-2xx answer stands for.
fn classify_failure(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    shown_url: &str,
    now: SystemTime,
) -> DeliveryError {
    let text = String::from_utf8_lossy(body);
    let said = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(errors) => errors.describe(),
        Err(_) if text.trim_start().starts_with('<') => {
            "an HTML page instead of a SendGrid error".to_owned()
        }
        Err(_) => quote(&redact_addresses(&text)),
    };
    let message = format!("{shown_url} answered {status}: {said}");
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: http::retry_after(headers, now).or_else(|| reset_wait(headers, now)),
            message,
        },
        401 => DeliveryError::Auth {
            message: format!(
                "{message}; check the API key in `api_key_env`, it may have been revoked"
            ),
        },
        403 => DeliveryError::Auth {
            message: format!("{message}; give the API key access to Marketing contacts and lists"),
        },
        404 => DeliveryError::Permanent {
            message: format!("{message}; check `list_id`"),
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

/// The wait until `X-RateLimit-Reset` (Unix seconds), if the header is there and readable; a
/// reset in the past asks for no wait, and one too far ahead for the clock to hold is ignored
/// like an unreadable one.
fn reset_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = headers.get("x-ratelimit-reset")?.to_str().ok()?.trim();
    let reset = UNIX_EPOCH.checked_add(Duration::from_secs(text.parse().ok()?))?;
    Some(reset.duration_since(now).unwrap_or(Duration::ZERO))
}

/// True for `8-4-4-4-12` hexadecimal digits separated by dashes.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let api_key = problems
        .secret(table, secrets, "api_key", "a SendGrid API key")
        .filter(|key| {
            let shaped = key.starts_with("SG.");
            if !shaped {
                problems.push(
                    "api_key_env",
                    "the API key does not start with `SG.`; copy the whole key from SendGrid",
                );
            }
            shaped
        })
        .and_then(|key| problems.header_safe("api_key_env", "the API key", key));
    let base_url = match table.contains_key("base_url") {
        true => problems.http_url(table, Place::Connection, "base_url"),
        false => Some(Url::parse(DEFAULT_BASE_URL).expect("the default base URL parses")),
    };
    let batch_size = problems
        .integer(table, Place::Connection, "batch_size", 1..=MAX_MEMBERS)
        .unwrap_or(DEFAULT_BATCH_SIZE);
    let timeout_seconds = problems
        .integer(
            table,
            Place::Connection,
            "timeout_seconds",
            1..=MAX_TIMEOUT_SECONDS,
        )
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS);

    let timeout = Duration::from_secs(u64::try_from(timeout_seconds).expect("within 1..=300"));
    let client = match http::client(timeout) {
        Ok(client) => Some(client),
        Err(error) => {
            problems.push(
                "base_url",
                format!("the HTTP client cannot be set up: {error}"),
            );
            None
        }
    };
    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        api_key: Secret(api_key?),
        batch_size: usize::try_from(batch_size).expect("within 1..=30000"),
    })
}

/// The checked activation settings, `None` when any is wrong (the problems say which).
fn read_activation(problems: &mut Problems, table: &toml::Table) -> Option<ActivationSettings> {
    problems.reject_unknown_keys(table, Place::Activation, ACTIVATION_KEYS);
    let list_id = match problems.string(table, Place::Activation, "list_id") {
        Some(id) if is_uuid(&id) => Some(id.to_ascii_lowercase()),
        Some(id) => {
            problems.push(
                "list_id",
                format!("expected a SendGrid list id, a UUID, got `{id}`"),
            );
            None
        }
        None => {
            if !table.contains_key("list_id") {
                problems.push(
                    "list_id",
                    "missing; set it to the SendGrid list's id (a UUID)",
                );
            }
            None
        }
    };
    let email_identifier = problems
        .string(table, Place::Activation, "email_identifier")
        .unwrap_or_else(|| DEFAULT_EMAIL_IDENTIFIER.to_owned());
    Some(ActivationSettings {
        list_id: list_id?,
        email_identifier,
    })
}

#[cfg(test)]
mod tests {
    use reqwest::header::{HeaderValue, RETRY_AFTER};

    use super::*;

    fn kind(error: &DeliveryError) -> &'static str {
        match error {
            DeliveryError::Retryable { .. } => "retryable",
            DeliveryError::RateLimited { .. } => "rate limited",
            DeliveryError::Auth { .. } => "auth",
            DeliveryError::Permanent { .. } => "permanent",
        }
    }

    #[test]
    fn statuses_are_classified_by_what_sending_again_would_do() {
        let errors = br#"{"errors": [{"field": null, "message": "nope"}]}"#;
        let classify = |code: u16, body: &[u8]| {
            let status = StatusCode::from_u16(code).unwrap();
            kind(&classify_failure(
                status,
                &HeaderMap::new(),
                body,
                "u",
                SystemTime::now(),
            ))
        };

        assert_eq!(classify(429, errors), "rate limited");
        assert_eq!(classify(401, errors), "auth");
        assert_eq!(classify(403, errors), "auth");
        assert_eq!(classify(400, errors), "permanent");
        assert_eq!(classify(404, errors), "permanent");
        assert_eq!(classify(413, b""), "permanent");
        assert_eq!(classify(500, errors), "retryable");
        assert_eq!(classify(501, b""), "permanent");
        assert_eq!(classify(502, b"<html>bad gateway</html>"), "retryable");
    }

    #[test]
    fn a_429_waits_for_retry_after_first_then_for_the_rate_limit_reset() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-reset", HeaderValue::from_static("1700000045"));
        let status = StatusCode::TOO_MANY_REQUESTS;
        let wait = |headers: &HeaderMap| match classify_failure(status, headers, b"", "u", now) {
            DeliveryError::RateLimited { wait, .. } => wait,
            other => panic!("expected a rate limit, got {other:?}"),
        };

        let by_reset = wait(&headers);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let by_retry_after = wait(&headers);

        assert_eq!(by_reset, Some(Duration::from_secs(45)));
        assert_eq!(by_retry_after, Some(Duration::from_secs(7)));
        assert_eq!(wait(&HeaderMap::new()), None);
    }

    #[test]
    fn a_rate_limit_reset_in_the_past_asks_for_no_wait() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-reset", HeaderValue::from_static("1699999990"));

        assert_eq!(reset_wait(&headers, now), Some(Duration::ZERO));
    }

    #[test]
    fn upserts_are_split_to_stay_under_the_byte_limit() {
        let addresses = ["a@example.com", "b@example.com", "c@example.com"];

        // Each row is 15 + 12 bytes; the envelope takes 128.
        let two_a_request = split_by_bytes(&addresses, 128 + 2 * 27);
        let all_at_once = split_by_bytes(&addresses, MAX_UPSERT_BYTES);
        let too_small = split_by_bytes(&addresses, 10);

        assert_eq!(two_a_request, [&addresses[..2], &addresses[2..]].to_vec());
        assert_eq!(all_at_once, [&addresses[..]].to_vec());
        assert_eq!(too_small.len(), 3);
    }

    #[test]
    fn refused_rows_are_read_only_when_every_error_names_a_contact() {
        let sent = ["a@example.com", "b@localhost"];
        let named = br#"{"errors": [{"field": "contacts[1].email",
                                     "message": "b@localhost is not a valid email"}]}"#;
        let unnamed = br#"{"errors": [{"field": "contacts[1].email", "message": "bad"},
                                       {"field": "list_ids", "message": "bad list"}]}"#;

        assert_eq!(
            refused_rows(named, "contacts", &sent),
            [(
                1,
                "SendGrid refused the contact: <address> is not a valid email".to_owned()
            )]
        );
        assert_eq!(refused_rows(unnamed, "contacts", &sent), []);
    }

    #[test]
    fn list_ids_must_be_uuids() {
        assert!(is_uuid("ca7a3796-e8a8-4029-9ccb-df8937940562"));
        assert!(!is_uuid("ca7a3796e8a840299ccbdf8937940562"));
        assert!(!is_uuid("ca7a3796-e8a8-4029-9ccb-df893794056z"));
    }
}
