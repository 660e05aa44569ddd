//! The `klaviyo` connector: members of a Klaviyo list, through the revisioned JSON:API.
//!
//! This module owns the requests (a bulk profile import job
//! `POST {base}/api/profile-bulk-import-jobs` that also adds every profile to the list, for
//! adds; the lookup `GET {base}/api/lists/{list_id}/profiles?filter=any(email,[...])` then
//! `DELETE {base}/api/lists/{list_id}/relationships/profiles` for removes), the headers every
//! request carries (`Authorization: Klaviyo-API-Key ...`, `revision`, the JSON:API media
//! type), and the classification of failures, including the wait a 429 asks for in
//! `Retry-After` or in words. It does not create lists, touch consent or suppressions (the
//! bulk subscribe endpoint would, so it is not used), poll import jobs, or retry;
//! [`crate::deliver_with_retries`] retries.
//!
//! Adds import profiles by address and relate them to the list, so adding a member twice
//! leaves one profile in the list. Removes take profiles out of the list only (the profile
//! and its consent stay); the list relationship takes profile ids, so addresses are first
//! looked up among the list's own profiles, at most 100 per lookup, and the ids found are
//! removed at most 1,000 per request. A member not in the list counts as removed, so removing
//! twice changes nothing the second time.
//!
//! Known limits:
//! - An import job is answered 202 and processed later. The job is not polled: a 202 counts
//!   every member sent as accepted, and a profile the job refuses (listed only under the
//!   job's `import-errors`) is not reported as a rejection and does not join the list.
//! - A profile is only in the list once its import job has run, so a member added and removed
//!   within moments may be looked up too early, count as removed, and still join the list.
//! - On a double opt-in list Klaviyo may hold a profile back until it confirms; membership is
//!   then not proof of consent, nor consent of membership.
//!
//! Addresses travel in clear (Klaviyo does not take hashes), trimmed and lower-cased; error
//! messages never quote an address.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};

use crate::http::{self, Secret, quote, redact_addresses};
use crate::identifiers;
use crate::settings::{Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Outcome, Rejection, SettingsError,
};

/// Connection keys the Klaviyo connector knows.
const CONNECTION_KEYS: &[&str] = &[
    "api_key_env",
    "base_url",
    "revision",
    "batch_size",
    "timeout_seconds",
];
/// Activation keys the Klaviyo connector knows.
const ACTIVATION_KEYS: &[&str] = &["list_id", "email_identifier"];
/// The Klaviyo API host.
const DEFAULT_BASE_URL: &str = "https://a.klaviyo.com";
/// The API revision sent unless `revision` says otherwise.
const DEFAULT_REVISION: &str = "2026-01-15";
/// The JSON:API media type, for `Content-Type` and `Accept`.
const JSON_API: &str = "application/vnd.api+json";
/// The most profiles one import job takes.
const MAX_MEMBERS: i64 = 10_000;
/// The batch size unless `batch_size` says otherwise: a removal of this many members takes
/// ten lookups and one removal request.
const DEFAULT_BATCH_SIZE: i64 = 1_000;
/// The most bytes one import job request may carry; Klaviyo's limit is 5 MB.
const MAX_IMPORT_BYTES: usize = 5_000_000;
/// The most addresses one lookup asks for: the largest page of list profiles.
const MAX_LOOKUP: usize = 100;
/// The most profiles one list relationship request takes.
const MAX_RELATIONSHIPS: usize = 1_000;
/// The most pages one lookup follows; with 100 addresses a page of 100 holds every match.
const MAX_LOOKUP_PAGES: usize = 10;
/// Seconds a request may take unless `timeout_seconds` says otherwise.
const DEFAULT_TIMEOUT_SECONDS: i64 = 60;
/// The largest `timeout_seconds` accepted.
const MAX_TIMEOUT_SECONDS: i64 = 300;
/// The member identifier holding the e-mail address unless `email_identifier` says otherwise.
const DEFAULT_EMAIL_IDENTIFIER: &str = "email";
/// How much of a successful answer is read at most; a page of 100 profiles is well under this.
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Adds and removes members of one Klaviyo list.
///
/// Connection settings:
/// - `api_key_env` (required): the environment variable holding the private API key
///   (`pk_...`) with the `lists:read`, `lists:write`, `profiles:read` and `profiles:write`
///   scopes; the engine passes its value as the `api_key` secret.
/// - `base_url`: the API host, default `https://a.klaviyo.com`.
/// - `revision`: the API revision sent in the `revision` header, `YYYY-MM-DD`, default
///   `2026-01-15`.
/// - `batch_size`: members per batch, 1 to 10000, default 1000.
/// - `timeout_seconds`: per request, 1 to 300, default 60.
///
/// Activation settings:
/// - `list_id` (required): the list's id, letters and digits (such as `Y6nRLr`).
/// - `email_identifier`: the member identifier holding the e-mail address, default `email`.
#[derive(Debug, Clone)]
pub struct KlaviyoConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base}/api/profile-bulk-import-jobs`, the import endpoint.
    import_url: Url,
    /// `{base}/api/lists/{list_id}/profiles`, the lookup endpoint.
    list_profiles_url: Url,
    /// `{base}/api/lists/{list_id}/relationships/profiles`, the removal endpoint.
    relationships_url: Url,
    /// The list's id, as sent in the import job's relationships.
    list_id: String,
    /// The private API key.
    api_key: Secret,
    /// The `revision` header's value.
    revision: String,
    /// The member identifier holding the address (`email_identifier`).
    email_identifier: String,
    /// Members per batch (`batch_size`).
    batch_size: usize,
}

/// The connection's settings, checked.
struct ConnectionSettings {
    /// The HTTP client, with `timeout_seconds` applied.
    client: reqwest::Client,
    /// `base_url`, or the Klaviyo API host.
    base_url: Url,
    /// The value of the variable `api_key_env` names.
    api_key: Secret,
    /// `revision`.
    revision: String,
    /// `batch_size`.
    batch_size: usize,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `list_id`.
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

impl KlaviyoConnector {
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
            KlaviyoConnector::new(connection, activation)
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
        KlaviyoConnector {
            import_url: endpoint(&["api", "profile-bulk-import-jobs"]),
            list_profiles_url: endpoint(&["api", "lists", list_id, "profiles"]),
            relationships_url: endpoint(&["api", "lists", list_id, "relationships", "profiles"]),
            client: connection.client,
            list_id: activation.list_id,
            api_key: connection.api_key,
            revision: connection.revision,
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
        let addresses = distinct_addresses(&members);
        match batch.change {
            Change::Add => self.add(&addresses).await?,
            Change::Remove => self.remove(&addresses).await?,
            Change::Replace => return Err(crate::cannot_replace(self.kind())),
        }
        outcome
            .accepted
            .extend(members.iter().map(|member| member.key.to_owned()));
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
                "members without a usable e-mail address are not sent to klaviyo"
            );
        }
        (members, outcome)
    }

    /// Imports the profiles of `addresses` into the list, in as many jobs as the byte limit
    /// needs.
    async fn add(&self, addresses: &[&str]) -> Result<(), DeliveryError> {
        for chunk in split_by_bytes(addresses, MAX_IMPORT_BYTES) {
            let body = serde_json::json!({
                "data": {
                    "type": "profile-bulk-import-job",
                    "attributes": {
                        "profiles": {
                            "data": chunk
                                .iter()
                                .map(|email| serde_json::json!({
                                    "type": "profile",
                                    "attributes": {"email": email},
                                }))
                                .collect::<Vec<_>>(),
                        },
                    },
                    "relationships": {
                        "lists": {"data": [{"type": "list", "id": self.list_id}]},
                    },
                },
            });
            let answer = self
                .request(Method::POST, self.import_url.clone(), Some(&body))
                .await?;
            let job: JobAnswer =
                serde_json::from_slice(&answer).map_err(|error| DeliveryError::Retryable {
                    message: format!(
                        "{} answered without a readable import job: {error}",
                        self.import_url
                    ),
                })?;
            tracing::debug!(job_id = %job.data.id, profiles = chunk.len(), "klaviyo queued an import job");
        }
        Ok(())
    }

    /// Takes the profiles of `addresses` out of the list: up to 1,000 addresses are looked up
    /// 100 at a time, then their ids removed in one request. A failure fails the batch;
    /// sending it again looks the members up again, and those already removed are no longer
    /// found in the list.
    async fn remove(&self, addresses: &[&str]) -> Result<(), DeliveryError> {
        for group in addresses.chunks(MAX_RELATIONSHIPS) {
            let mut ids = BTreeSet::new();
            for chunk in group.chunks(MAX_LOOKUP) {
                ids.extend(self.look_up(chunk).await?);
            }
            if ids.is_empty() {
                continue;
            }
            let body = serde_json::json!({
                "data": ids
                    .iter()
                    .map(|id| serde_json::json!({"type": "profile", "id": id}))
                    .collect::<Vec<_>>(),
            });
            self.request(Method::DELETE, self.relationships_url.clone(), Some(&body))
                .await?;
        }
        Ok(())
    }

    /// The ids of the list's profiles with one of `addresses` (at most 100).
    async fn look_up(&self, addresses: &[&str]) -> Result<BTreeSet<String>, DeliveryError> {
        let quoted: Vec<String> = addresses
            .iter()
            .map(|email| serde_json::to_string(email).expect("a string serialises"))
            .collect();
        let mut url = self.list_profiles_url.clone();
        url.query_pairs_mut()
            .append_pair("filter", &format!("any(email,[{}])", quoted.join(",")))
            .append_pair("fields[profile]", "email")
            .append_pair("page[size]", &MAX_LOOKUP.to_string());

        let mut ids = BTreeSet::new();
        let mut next = Some(url);
        for _ in 0..MAX_LOOKUP_PAGES {
            let Some(url) = next.take() else { break };
            let answer = self.request(Method::GET, url, None).await?;
            let page: ProfilePage =
                serde_json::from_slice(&answer).map_err(|error| DeliveryError::Retryable {
                    message: format!(
                        "{} answered with an unreadable page of profiles: {error}",
                        self.list_profiles_url
                    ),
                })?;
            ids.extend(
                page.data
                    .into_iter()
                    .map(|profile| profile.id)
                    .filter(|id| !id.is_empty()),
            );
            // The key is only ever sent to the configured host, whatever a link names.
            next = page
                .links
                .next
                .and_then(|link| Url::parse(&link).ok())
                .filter(|link| link.origin() == self.list_profiles_url.origin());
        }
        Ok(ids)
    }

    /// Sends one request with Klaviyo's headers and returns the body of a 2xx answer; any
    /// other answer is classified.
    async fn request(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, DeliveryError> {
        let shown = shown(&url);
        let mut request = self
            .client
            .request(method.clone(), url)
            .header(
                "authorization",
                format!("Klaviyo-API-Key {}", self.api_key.expose()),
            )
            .header("revision", &self.revision)
            .header(ACCEPT, JSON_API);
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, JSON_API)
                .body(serde_json::to_vec(body).expect("a JSON value serialises"));
        }
        let response = request
            .send()
            .await
            .map_err(|error| http::transport_failure(method.as_str(), &shown, error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        if status.is_success() {
            return Ok(body);
        }
        Err(classify_failure(
            status,
            &headers,
            &body,
            &shown,
            SystemTime::now(),
        ))
    }
}

impl Connector for KlaviyoConnector {
    fn kind(&self) -> &'static str {
        "klaviyo"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.send(batch))
    }
}

/// The answer to an import: `{"data": {"type": "profile-bulk-import-job", "id": "..."}}`.
#[derive(serde::Deserialize)]
struct JobAnswer {
    data: Resource,
}

/// A JSON:API resource's identity.
#[derive(serde::Deserialize)]
struct Resource {
    #[serde(default)]
    id: String,
}

/// A page of list profiles: `{"data": [{"type": "profile", "id": ...}], "links": {...}}`.
#[derive(serde::Deserialize)]
struct ProfilePage {
    #[serde(default)]
    data: Vec<Resource>,
    #[serde(default)]
    links: PageLinks,
}

/// The pagination links of a page.
#[derive(Default, serde::Deserialize)]
struct PageLinks {
    #[serde(default)]
    next: Option<String>,
}

/// Klaviyo's error body: `{"errors": [{"code", "title", "detail", "source"}]}`.
#[derive(Debug, serde::Deserialize)]
struct ErrorBody {
    errors: Vec<ErrorItem>,
}

/// One entry of an error body.
#[derive(Debug, serde::Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    detail: String,
}

impl ErrorBody {
    /// `Title: detail (code)` for each error, addresses left out.
    fn describe(&self) -> String {
        let said: Vec<String> = self
            .errors
            .iter()
            .map(|item| {
                let text = match (item.title.is_empty(), item.detail.is_empty()) {
                    (false, false) => format!("{}: {}", item.title, item.detail),
                    (false, true) => item.title.clone(),
                    (true, _) => item.detail.clone(),
                };
                let text = redact_addresses(&text);
                match item.code.is_empty() {
                    true => text,
                    false => format!("{text} ({})", item.code),
                }
            })
            .collect();
        quote(&said.join("; "))
    }

    /// The wait the first `Expected available in N second(s)` detail asks for.
    fn expected_wait(&self) -> Option<Duration> {
        self.errors
            .iter()
            .find_map(|item| wait_in_words(&item.detail))
    }
}

/// The `N` of `... Expected available in N second(s)...`, as a wait.
fn wait_in_words(text: &str) -> Option<Duration> {
    let (_, rest) = text.split_once("available in ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let unit = rest[digits.len()..].trim_start();
    if digits.is_empty() || !unit.starts_with("second") {
        return None;
    }
    Some(Duration::from_secs(digits.parse().unwrap_or(u64::MAX)))
}

/// `url` without its query, which may hold addresses, for messages.
fn shown(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.to_string()
}

/// The addresses, each once, in order.
fn distinct_addresses<'m>(members: &'m [Prepared<'_>]) -> Vec<&'m str> {
    let mut seen = BTreeSet::new();
    members
        .iter()
        .map(|member| member.email.as_str())
        .filter(|email| seen.insert(*email))
        .collect()
}

/// `addresses` cut into runs whose import body stays within `limit` bytes.
fn split_by_bytes<'a, 'e>(addresses: &'a [&'e str], limit: usize) -> Vec<&'a [&'e str]> {
    // The job's type and the list relationship, with room to spare.
    const ENVELOPE: usize = 256;
    // `{"type":"profile","attributes":{"email":}},` around the quoted address.
    const ROW: usize = 44;
    let mut chunks = Vec::new();
    let (mut start, mut size) = (0, ENVELOPE);
    for (index, email) in addresses.iter().enumerate() {
        let row = serde_json::to_string(email).map_or(email.len() + 2, |text| text.len()) + ROW;
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
    let errors = serde_json::from_slice::<ErrorBody>(body).ok();
    let said = match &errors {
        Some(errors) => errors.describe(),
        None if text.trim_start().starts_with('<') => {
            "an HTML page instead of a Klaviyo error".to_owned()
        }
        None => quote(&redact_addresses(&text)),
    };
    let message = format!("{shown_url} answered {status}: {said}");
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: headers
                .get(RETRY_AFTER)
                .and_then(|value| http::requested_wait(value, now))
                .or_else(|| errors.as_ref().and_then(ErrorBody::expected_wait)),
            message,
        },
        401 => DeliveryError::Auth {
            message: format!(
                "{message}; check the private API key in `api_key_env`, it may have been revoked"
            ),
        },
        403 => DeliveryError::Auth {
            message: format!(
                "{message}; give the API key the lists:read, lists:write, profiles:read and \
                 profiles:write scopes"
            ),
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

/// True for a revision such as `2026-01-15`, optionally with a `.suffix`.
fn is_revision(text: &str) -> bool {
    let date = text.split_once('.').map_or(text, |(date, _)| date);
    let parts: Vec<&str> = date.split('-').collect();
    parts.len() == 3
        && parts
            .iter()
            .zip([4, 2, 2])
            .all(|(part, len)| part.len() == len && part.bytes().all(|b| b.is_ascii_digit()))
}

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let api_key = problems
        .secret(table, secrets, "api_key", "a Klaviyo private API key")
        .filter(|key| {
            let shaped = key.starts_with("pk_");
            if !shaped {
                problems.push(
                    "api_key_env",
                    "the key does not start with `pk_`; use a private API key, not the public \
                     site id",
                );
            }
            shaped
        })
        .and_then(|key| problems.header_safe("api_key_env", "the API key", key));
    let base_url = match table.contains_key("base_url") {
        true => problems.http_url(table, Place::Connection, "base_url"),
        false => Some(Url::parse(DEFAULT_BASE_URL).expect("the default base URL parses")),
    };
    let revision = match problems.string(table, Place::Connection, "revision") {
        Some(revision) if is_revision(&revision) => Some(revision),
        Some(revision) => {
            problems.push(
                "revision",
                format!(
                    "expected a Klaviyo API revision such as `{DEFAULT_REVISION}`, got \
                     `{revision}`"
                ),
            );
            None
        }
        None if table.contains_key("revision") => None,
        None => Some(DEFAULT_REVISION.to_owned()),
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
        revision: revision?,
        batch_size: usize::try_from(batch_size).expect("within 1..=10000"),
    })
}

/// The checked activation settings, `None` when any is wrong (the problems say which).
fn read_activation(problems: &mut Problems, table: &toml::Table) -> Option<ActivationSettings> {
    problems.reject_unknown_keys(table, Place::Activation, ACTIVATION_KEYS);
    let list_id = match problems.string(table, Place::Activation, "list_id") {
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) => Some(id),
        Some(id) => {
            problems.push(
                "list_id",
                format!("expected a Klaviyo list id of letters and digits, got `{id}`"),
            );
            None
        }
        None => {
            if !table.contains_key("list_id") {
                problems.push("list_id", "missing; set it to the Klaviyo list's id");
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
    use reqwest::header::HeaderValue;

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
        let errors = br#"{"errors": [{"id": "e1", "code": "x", "title": "T", "detail": "D"}]}"#;
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
        assert_eq!(classify(409, errors), "permanent");
        assert_eq!(classify(500, errors), "retryable");
        assert_eq!(classify(501, b""), "permanent");
        assert_eq!(classify(502, b"<html>bad gateway</html>"), "retryable");
        assert_eq!(classify(524, b""), "retryable");
    }

    #[test]
    fn a_429_waits_for_retry_after_first_then_for_the_wait_in_the_detail() {
        let now = SystemTime::now();
        let body = br#"{"errors": [{"id": "e1", "status": 429, "code": "throttled",
            "title": "Request was throttled.",
            "detail": "Request was throttled. Expected available in 3 seconds."}]}"#;
        let status = StatusCode::TOO_MANY_REQUESTS;
        let wait = |headers: &HeaderMap, body: &[u8]| match classify_failure(
            status, headers, body, "u", now,
        ) {
            DeliveryError::RateLimited { wait, .. } => wait,
            other => panic!("expected a rate limit, got {other:?}"),
        };
        let mut headers = HeaderMap::new();

        let in_words = wait(&headers, body);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let by_header = wait(&headers, body);

        assert_eq!(in_words, Some(Duration::from_secs(3)));
        assert_eq!(by_header, Some(Duration::from_secs(7)));
        assert_eq!(wait(&HeaderMap::new(), b""), None);
    }

    #[test]
    fn waits_in_words_need_a_number_of_seconds() {
        assert_eq!(
            wait_in_words("Request was throttled. Expected available in 1 second."),
            Some(Duration::from_secs(1))
        );
        assert_eq!(wait_in_words("Expected available in a moment."), None);
        assert_eq!(wait_in_words("Expected available in 2 minutes."), None);
        assert_eq!(wait_in_words("Request was throttled."), None);
    }

    #[test]
    fn revisions_are_dates_with_an_optional_suffix() {
        assert!(is_revision("2026-01-15"));
        assert!(is_revision("2024-10-15.pre"));
        assert!(!is_revision("2026-1-15"));
        assert!(!is_revision("latest"));
    }

    #[test]
    fn imports_are_split_to_stay_under_the_byte_limit() {
        let addresses = ["a@example.com", "b@example.com", "c@example.com"];

        // Each row is 15 + 44 bytes; the envelope takes 256.
        let two_a_request = split_by_bytes(&addresses, 256 + 2 * 59);
        let all_at_once = split_by_bytes(&addresses, MAX_IMPORT_BYTES);

        assert_eq!(two_a_request, [&addresses[..2], &addresses[2..]].to_vec());
        assert_eq!(all_at_once, [&addresses[..]].to_vec());
    }

    #[test]
    fn messages_leave_out_the_lookup_query_and_addresses() {
        let url = Url::parse("https://a.klaviyo.com/api/lists/Y6nRLr/profiles?filter=x").unwrap();
        let errors = ErrorBody {
            errors: vec![ErrorItem {
                code: "invalid".into(),
                title: "Invalid input.".into(),
                detail: "ann@example.com is not valid".into(),
            }],
        };

        assert_eq!(
            shown(&url),
            "https://a.klaviyo.com/api/lists/Y6nRLr/profiles"
        );
        assert_eq!(
            errors.describe(),
            "Invalid input.: <address> is not valid (invalid)"
        );
    }
}
