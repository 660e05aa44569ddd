//! The `klaviyo` connector: members of a Klaviyo list, through the revisioned JSON:API.
//!
//! This module owns the requests (a bulk profile import job
//! `POST {base}/api/profile-bulk-import-jobs` that also adds every profile to the list, then
//! the polling of the job `GET {base}/api/profile-bulk-import-jobs/{id}` and the reading of its
//! `.../{id}/import-errors`, for adds; the lookup
//! `GET {base}/api/lists/{list_id}/profiles?filter=any(email,[...])` then
//! `DELETE {base}/api/lists/{list_id}/relationships/profiles` for removes), the headers every
//! request carries (`Authorization: Klaviyo-API-Key ...`, `revision`, the JSON:API media
//! type), and the classification of failures, including the wait a 429 asks for in
//! `Retry-After` or in words. It does not create lists, touch consent or suppressions (the
//! bulk subscribe endpoint would, so it is not used), or retry;
//! [`crate::deliver_with_retries`] retries.
//!
//! Adds import profiles by address and relate them to the list, so adding a member twice
//! leaves one profile in the list. Removes take profiles out of the list only (the profile
//! and its consent stay); the list relationship takes profile ids, so addresses are first
//! looked up among the list's own profiles, at most 100 per lookup, and the ids found are
//! removed at most 1,000 per request. A member not in the list counts as removed, so removing
//! twice changes nothing the second time. Removes are answered synchronously (204) and need
//! no job.
//!
//! Import jobs. Klaviyo answers an import with 202 and a job resource and processes it later,
//! so an add counts only once its job is done: the job is polled every
//! `poll_interval_seconds`, for at most `job_wait_seconds` per attempt, while it is `queued`
//! or `processing`, until it is `complete` or `cancelled`.
//! - A `complete` job with a `failed_count` has its import errors read (following their
//!   pages): the profiles they name are rejected with the error's title, detail and code
//!   (blanked of personal data), the others accepted. An import error names a profile by the
//!   address in its `original_payload` (at its top or under `attributes`), or else by a
//!   `source.pointer` of `/data/attributes/profiles/data/<index>...` into the job's profiles;
//!   Klaviyo does not document either shape, so both are read. Profiles counted but not named
//!   are handled as the `meta` connector handles its counts: when every profile not named must
//!   be among them, they are all rejected; otherwise they are accepted and the count is
//!   logged, since which ones failed is not known.
//! - A `cancelled` job fails the batch as retryable, since Klaviyo gives no reason that would
//!   make it permanent; the next attempt imports again.
//! - A job still `queued` or `processing` when the wait runs out fails the attempt as
//!   retryable. Sending the batch again is safe: an import merges into existing profiles and a
//!   list holds a profile once. Within one process the next attempt of the same batch polls
//!   the same jobs instead of importing again; after a restart it imports again.
//!
//! Known limits:
//! - A job still unfinished when the batch's attempts run out may still be processed later:
//!   its members then join the list although none counts as added, and a member that leaves
//!   the segment before a later add is confirmed is not removed.
//! - On a double opt-in list Klaviyo may hold a profile back until it confirms; membership is
//!   then not proof of consent, nor consent of membership.
//!
//! Addresses travel in clear (Klaviyo does not take hashes), trimmed and lower-cased; error
//! messages and rejection reasons never quote an address.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};

use crate::http::{self, Secret, quote, redact, redact_addresses};
use crate::job::{self, ImportJob, Jobs, Polled, Polling, Settled, Wording, shown_status};
use crate::members::{self, Addressed, distinct_addresses};
use crate::settings::{self, HeaderSecret, Limit, Place, Problems};
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
    "poll_interval_seconds",
    "job_wait_seconds",
];
/// Activation keys the Klaviyo connector knows.
const ACTIVATION_KEYS: &[&str] = &["list_id", "email_identifier"];
/// The Klaviyo API host.
const DEFAULT_BASE_URL: &str = "https://a.klaviyo.com";
/// The API revision sent unless `revision` says otherwise.
const DEFAULT_REVISION: &str = "2026-01-15";
/// The JSON:API media type, for `Content-Type` and `Accept`.
const JSON_API: &str = "application/vnd.api+json";
/// `batch_size`: one import job takes at most 10,000 profiles; by default a removal takes ten
/// lookups and one removal request.
const BATCH_SIZE: Limit = Limit {
    default: 1_000,
    max: 10_000,
};
/// The most bytes one import job request may carry; Klaviyo's limit is 5 MB.
const MAX_IMPORT_BYTES: usize = 5_000_000;
/// The most addresses one lookup asks for: the largest page of list profiles.
const MAX_LOOKUP: usize = 100;
/// The most profiles one list relationship request takes.
const MAX_RELATIONSHIPS: usize = 1_000;
/// The most pages one lookup follows; with 100 addresses a page of 100 holds every match.
const MAX_LOOKUP_PAGES: usize = 10;
/// `timeout_seconds`, seconds a request may take.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 60,
    max: 300,
};
/// The member identifier holding the e-mail address unless `email_identifier` says otherwise.
const DEFAULT_EMAIL_IDENTIFIER: &str = "email";
/// How much of a successful answer is read at most; a page of 100 profiles is well under this.
const MAX_ANSWER_BYTES: usize = 4 << 20;
/// The most pages of a job's import errors read; errors past them count as not named.
const MAX_IMPORT_ERROR_PAGES: usize = 100;
/// Polling an import job every 5 s, for at most 300 s an attempt, unless
/// `poll_interval_seconds` and `job_wait_seconds` say otherwise.
const POLLING: Polling = Polling::seconds(5, 300);
/// How Klaviyo's import jobs are named in rejection reasons.
const IMPORT_JOB: Wording = Wording {
    platform: "Klaviyo",
    items: "profiles",
    counted_as: "failed",
};

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
/// - `poll_interval_seconds`: between two polls of an import job, 1 to 3600, default 5.
/// - `job_wait_seconds`: how long one attempt waits for its import jobs, 1 to 86400, default
///   300; an attempt that runs out fails as retryable and the next one polls the same jobs.
///
/// Activation settings:
/// - `list_id` (required): the list's id, letters and digits (such as `Y6nRLr`).
/// - `email_identifier`: the member identifier holding the e-mail address, default `email`.
#[derive(Debug)]
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
    /// `poll_interval_seconds` and `job_wait_seconds`.
    polling: Polling,
    /// The import jobs holding every profile of a batch, by batch identity, until they are
    /// done.
    jobs: Jobs<Vec<ImportJob>>,
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
    /// `poll_interval_seconds` and `job_wait_seconds`.
    polling: Polling,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `list_id`.
    list_id: String,
    /// `email_identifier`.
    email_identifier: String,
}

impl KlaviyoConnector {
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
        let endpoint = |segments: &[&str]| http::endpoint(&connection.base_url, segments);
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
            polling: connection.polling,
            jobs: Jobs::default(),
        }
    }

    /// Sends one batch once and classifies the answers.
    async fn send(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let (members, mut outcome) = self.prepare(batch);
        if members.is_empty() {
            return Ok(outcome);
        }
        let addresses = distinct_addresses(&members);
        let refused = match batch.change {
            Change::Add => self.add(batch, &addresses).await?,
            Change::Remove => {
                self.remove(&addresses).await?;
                BTreeMap::new()
            }
            Change::Replace => return Err(crate::cannot_replace(self.kind())),
        };
        for member in &members {
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

    /// The members with a usable address, and an outcome rejecting those without one.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<Addressed<'a>>, Outcome) {
        members::prepare(batch, self.kind(), "e-mail address", |member| {
            members::addressed(member, &self.email_identifier)
        })
    }

    /// Imports the profiles of `addresses` into the list, waits for the import jobs, and
    /// returns the addresses Klaviyo refused, each with the reason. An attempt of a batch whose
    /// jobs an earlier attempt started polls those jobs instead of importing again.
    async fn add(
        &self,
        batch: &Batch,
        addresses: &[&str],
    ) -> Result<BTreeMap<String, String>, DeliveryError> {
        let identity = job::batch_identity(batch);
        let sent: Vec<String> = addresses.iter().map(|email| email.to_string()).collect();
        let queued = match self.jobs.known(&identity, &sent) {
            Some(queued) => {
                tracing::debug!(
                    activation = %batch.activation,
                    change = batch.change.as_str(),
                    sequence = batch.sequence,
                    jobs = queued.len(),
                    "polling the klaviyo import jobs of an earlier attempt"
                );
                queued
            }
            None => {
                let queued = self.import_all(addresses).await?;
                self.jobs.remember(&identity, sent, queued.clone());
                queued
            }
        };

        let mut refused = BTreeMap::new();
        for job in &queued {
            let in_job = self
                .wait_for_job(batch, &identity, job)
                .await
                .inspect_err(|error| self.jobs.forget_unless_retryable(&identity, error))?;
            refused.extend(in_job);
        }
        self.jobs.forget(&identity);
        Ok(refused)
    }

    /// Starts one import job per run of `addresses` the byte limit allows.
    async fn import_all(&self, addresses: &[&str]) -> Result<Vec<ImportJob>, DeliveryError> {
        let mut jobs = Vec::new();
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
            let job = serde_json::from_slice::<JobAnswer>(&answer)
                .ok()
                .map(|job| job.data.id)
                .filter(|id| !id.is_empty())
                .ok_or_else(|| DeliveryError::Retryable {
                    message: format!("{} answered without an import job id", self.import_url),
                })?;
            tracing::debug!(job_id = %job, profiles = chunk.len(), "klaviyo queued an import job");
            jobs.push(ImportJob {
                id: job,
                addresses: chunk.iter().map(|email| email.to_string()).collect(),
            });
        }
        Ok(jobs)
    }

    /// Polls `job` until it is done or `job_wait_seconds` have passed, and returns the
    /// addresses it refused, each with the reason.
    async fn wait_for_job(
        &self,
        batch: &Batch,
        identity: &str,
        job: &ImportJob,
    ) -> Result<BTreeMap<String, String>, DeliveryError> {
        let poll = move || async move {
            let state = self.job_state(identity, &job.id).await?;
            match state.status.as_str() {
                "complete" => Ok(Polled::Finished(state)),
                "cancelled" => {
                    // The next attempt imports again rather than polling a job that is over.
                    self.jobs.forget(identity);
                    Err(DeliveryError::Retryable {
                        message: format!(
                            "Klaviyo import job {} was cancelled; sending the batch again is \
                             safe, as an import merges into existing profiles and a list holds a \
                             profile once",
                            job.id
                        ),
                    })
                }
                _ => Ok(Polled::Unfinished(state.status)),
            }
        };
        let unfinished = |status: String, waited: Duration| DeliveryError::Retryable {
            message: format!(
                "Klaviyo import job {} is still {} after {} s; sending the batch again is safe, \
                 as an import merges into existing profiles and a list holds a profile once, and \
                 the next attempt in this process polls the same job",
                job.id,
                shown_status(&status),
                waited.as_secs()
            ),
        };
        let state = job::wait(self.polling, poll, unfinished).await?;
        self.job_refusals(batch, job, &state).await
    }

    /// The attributes of the import job `id`.
    async fn job_state(&self, identity: &str, id: &str) -> Result<JobAttributes, DeliveryError> {
        let url = self.job_url(id, None);
        let shown = shown(&url);
        let (status, headers, body) = self.exchange(Method::GET, url, None).await?;
        if status.is_success() {
            return serde_json::from_slice::<JobResource>(&body)
                .map(|job| job.data.attributes)
                .map_err(|error| DeliveryError::Retryable {
                    message: format!("{shown} answered {status} with an unreadable job: {error}"),
                });
        }
        if status == StatusCode::NOT_FOUND {
            // A job that cannot be found is not polled again; the next attempt imports anew.
            self.jobs.forget(identity);
            return Err(DeliveryError::Retryable {
                message: format!(
                    "{shown} answered {status}: Klaviyo does not know import job {id}; sending \
                     the batch again is safe, as an import merges into existing profiles and a \
                     list holds a profile once"
                ),
            });
        }
        Err(classify_failure(
            status,
            &headers,
            &body,
            &shown,
            SystemTime::now(),
        ))
    }

    /// The addresses a complete `job` refused, with the reason: those its import errors name,
    /// and those its `failed_count` must include (see the module documentation).
    async fn job_refusals(
        &self,
        batch: &Batch,
        job: &ImportJob,
        state: &JobAttributes,
    ) -> Result<BTreeMap<String, String>, DeliveryError> {
        let failed = state.failed_count.unwrap_or(0);
        if failed == 0 {
            return Ok(BTreeMap::new());
        }
        let named = self.import_errors(batch, job).await?;
        let settled = settle(job, failed, named);
        if settled.unnamed > 0 {
            tracing::warn!(
                activation = %batch.activation,
                change = batch.change.as_str(),
                sequence = batch.sequence,
                job_id = %job.id,
                profiles = job.addresses.len(),
                failed,
                unnamed = settled.unnamed,
                "a klaviyo import job refused profiles without naming them all; counting those \
                 not named as accepted"
            );
        }
        Ok(settled.refused)
    }

    /// The addresses of `job` its import errors name, each with the reason, read page after
    /// page up to [`MAX_IMPORT_ERROR_PAGES`].
    async fn import_errors(
        &self,
        batch: &Batch,
        job: &ImportJob,
    ) -> Result<BTreeMap<String, String>, DeliveryError> {
        let known = http::identifier_values(batch);
        let first = self.job_url(&job.id, Some("import-errors"));
        let shown = shown(&first);
        let mut named = BTreeMap::new();
        let mut next = Some(first);
        for _ in 0..MAX_IMPORT_ERROR_PAGES {
            let Some(url) = next.take() else { break };
            let answer = self.request(Method::GET, url, None).await?;
            let page: ImportErrorPage =
                serde_json::from_slice(&answer).map_err(|error| DeliveryError::Retryable {
                    message: format!("{shown} answered with an unreadable page of errors: {error}"),
                })?;
            for error in page.data {
                if let Some(address) = error.attributes.names(&job.addresses) {
                    let reason = format!(
                        "Klaviyo's import job refused the profile: {}",
                        error.attributes.describe(&known)
                    );
                    named.entry(address.to_owned()).or_insert(reason);
                }
            }
            // The key is only ever sent to the configured host, whatever a link names.
            next = page
                .links
                .next
                .and_then(|link| Url::parse(&link).ok())
                .filter(|link| link.origin() == self.import_url.origin());
        }
        Ok(named)
    }

    /// `{base}/api/profile-bulk-import-jobs/{id}`, or its `part` below it.
    fn job_url(&self, id: &str, part: Option<&str>) -> Url {
        let mut url = self.import_url.clone();
        {
            let mut segments = url
                .path_segments_mut()
                .expect("an http URL has path segments");
            segments.push(id);
            if let Some(part) = part {
                segments.push(part);
            }
        }
        url
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
        let (status, headers, body) = self.exchange(method, url, body).await?;
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

    /// Sends one request with Klaviyo's headers and returns the answer's status, headers and
    /// the start of its body; only a transport failure is an error.
    async fn exchange(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), DeliveryError> {
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
        Ok((status, headers, body))
    }
}

impl Connector for KlaviyoConnector {
    fn destination(&self) -> Option<String> {
        Some(format!("the Klaviyo list at {}", self.list_profiles_url))
    }

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

/// An import job, as polled: `{"data": {"type", "id", "attributes": {...}}}`.
#[derive(serde::Deserialize)]
struct JobResource {
    data: JobData,
}

/// The job resource itself.
#[derive(serde::Deserialize)]
struct JobData {
    #[serde(default)]
    attributes: JobAttributes,
}

/// The attributes of an import job this connector reads.
#[derive(Debug, Default, serde::Deserialize)]
struct JobAttributes {
    /// `queued`, `processing`, `complete` or `cancelled`.
    #[serde(default)]
    status: String,
    /// The profiles the job refused; Klaviyo may leave it null.
    #[serde(default)]
    failed_count: Option<u64>,
}

/// A page of a job's import errors: `{"data": [{"type": "import-error", ...}], "links"}`.
#[derive(serde::Deserialize)]
struct ImportErrorPage {
    #[serde(default)]
    data: Vec<ImportError>,
    #[serde(default)]
    links: PageLinks,
}

/// One import error resource.
#[derive(serde::Deserialize)]
struct ImportError {
    #[serde(default)]
    attributes: ImportErrorAttributes,
}

/// What an import error says.
#[derive(Debug, Default, serde::Deserialize)]
struct ImportErrorAttributes {
    #[serde(default)]
    code: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    detail: String,
    #[serde(default)]
    source: Option<ErrorSource>,
    /// The profile as it was sent, in a shape Klaviyo does not document.
    #[serde(default)]
    original_payload: Option<serde_json::Value>,
}

/// Where in the request an error lies.
#[derive(Debug, Default, serde::Deserialize)]
struct ErrorSource {
    #[serde(default)]
    pointer: Option<String>,
}

impl ImportErrorAttributes {
    /// The address among `addresses` (a job's, in the order sent) this error is about: the
    /// `email` of its original payload, at its top or under `attributes`, or else the profile
    /// its pointer `/data/attributes/profiles/data/<index>...` designates.
    fn names<'a>(&self, addresses: &'a [String]) -> Option<&'a str> {
        let payload = self.original_payload.as_ref();
        let email = payload
            .and_then(|payload| {
                payload
                    .get("email")
                    .or_else(|| payload.get("attributes")?.get("email"))
            })
            .and_then(serde_json::Value::as_str)
            .map(|email| email.trim().to_lowercase());
        if let Some(email) = email {
            return addresses
                .iter()
                .find(|address| **address == email)
                .map(String::as_str);
        }
        let index = self
            .source
            .as_ref()?
            .pointer
            .as_deref()?
            .strip_prefix("/data/attributes/profiles/data/")?
            .split('/')
            .next()?
            .parse::<usize>()
            .ok()?;
        addresses.get(index).map(String::as_str)
    }

    /// `Title: detail (code)`, blanked of personal data and of the batch's identifier values
    /// (`known`).
    fn describe(&self, known: &[&str]) -> String {
        let text = match (self.title.is_empty(), self.detail.is_empty()) {
            (false, false) => format!("{}: {}", self.title, self.detail),
            (false, true) => self.title.clone(),
            (true, false) => self.detail.clone(),
            (true, true) => "no reason given".to_owned(),
        };
        let text = redact(&text, known);
        match self.code.is_empty() {
            true => quote(&text),
            false => quote(&format!("{text} ({})", redact(&self.code, known))),
        }
    }
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

/// The refusals of `job`, which counted `failed` profiles and named those in `named` (see
/// [`job::settle`]).
fn settle(job: &ImportJob, failed: u64, named: BTreeMap<String, String>) -> Settled {
    job::settle(job, failed, named, IMPORT_JOB)
}

/// `url` without its query, which may hold addresses, for messages.
fn shown(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.to_string()
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

/// The private API key, in `api_key_env`.
const API_KEY: HeaderSecret = HeaderSecret {
    name: "api_key",
    holds: "a Klaviyo private API key",
    called: "the API key",
    prefix: Some((
        "pk_",
        "the key does not start with `pk_`; use a private API key, not the public site id",
    )),
};

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let api_key = problems.header_secret(table, secrets, API_KEY);
    let base_url = problems.base_url(table, DEFAULT_BASE_URL);
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
    let batch_size = problems.batch_size(table, BATCH_SIZE);
    let client = problems.http_client(table, "base_url", TIMEOUT_SECONDS);
    let polling = Polling::read(problems, table, POLLING);
    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        api_key: api_key?,
        revision: revision?,
        batch_size,
        polling,
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

    use crate::error_kind as kind;

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
    fn an_import_error_names_a_profile_by_its_original_payload_or_else_its_pointer() {
        let sent = ["ann@example.com".to_owned(), "bob@example.com".to_owned()];
        let error = |json: serde_json::Value| -> ImportErrorAttributes {
            serde_json::from_value(json).unwrap()
        };
        let flat = error(serde_json::json!({"original_payload": {"email": " Bob@Example.com"}}));
        let resource = error(serde_json::json!({
            "original_payload": {"type": "profile", "attributes": {"email": "ann@example.com"}}
        }));
        let pointer = error(serde_json::json!({
            "source": {"pointer": "/data/attributes/profiles/data/1/attributes/email"},
            "original_payload": null,
        }));
        let elsewhere = error(serde_json::json!({
            "source": {"pointer": "/data/attributes/profiles/data/7"},
            "original_payload": {"email": "zed@example.com"},
        }));

        assert_eq!(flat.names(&sent), Some("bob@example.com"));
        assert_eq!(resource.names(&sent), Some("ann@example.com"));
        assert_eq!(pointer.names(&sent), Some("bob@example.com"));
        assert_eq!(elsewhere.names(&sent), None);
        assert_eq!(
            error(serde_json::json!({"code": "invalid", "detail": "Bob@Example.com is bad"}))
                .describe(&[" Bob@Example.com "]),
            "<member> is bad (invalid)"
        );
    }

    #[test]
    fn profiles_counted_but_not_named_are_refused_only_when_they_must_all_be() {
        let job = ImportJob {
            id: "j1".into(),
            addresses: vec!["a@x.io".into(), "b@x.io".into(), "c@x.io".into()],
        };
        let named = BTreeMap::from([("a@x.io".to_owned(), "named".to_owned())]);

        let one_unnamed = settle(&job, 2, named.clone());
        let all_failed = settle(&job, 3, named.clone());

        assert_eq!(
            one_unnamed,
            Settled {
                refused: named,
                unnamed: 1
            }
        );
        assert_eq!(all_failed.unnamed, 0);
        assert_eq!(all_failed.refused["a@x.io"], "named");
        assert_eq!(
            all_failed.refused["b@x.io"],
            "Klaviyo's import job j1 counted 3 of its 3 profiles as failed without naming them \
             all; this one is among them"
        );
        assert_eq!(all_failed.refused.len(), 3);
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
