//! The `sendgrid` connector: members of a Twilio SendGrid Marketing Campaigns list.
//!
//! This module owns the requests (upsert `PUT {base}/v3/marketing/contacts` with the list in
//! `list_ids`, then the polling of its import job `GET {base}/v3/marketing/contacts/imports/{id}`
//! and the reading of the job's errors file, for adds; lookup
//! `POST {base}/v3/marketing/contacts/search/emails` then
//! `DELETE {base}/v3/marketing/lists/{list_id}/contacts?contact_ids=...` for removes), the
//! reading of per-member refusals out of SendGrid's validation errors and import jobs, and the
//! classification of failures, including the wait `Retry-After` or `X-RateLimit-Reset` asks
//! for. It does not create lists, delete contacts or retry; [`crate::deliver_with_retries`]
//! retries.
//!
//! Adds upsert contacts by address and add them to the list, so adding a member twice leaves
//! one contact in the list. Removes take contacts out of the list only (the contact stays in
//! the account); SendGrid removes by contact id, so addresses are first looked up, at most 100
//! per search. A member SendGrid does not know, or whose contact is not in the list, counts as
//! removed, so removing twice changes nothing the second time.
//!
//! Import jobs. SendGrid answers an upsert with 202 and a `job_id` and applies it later, so an
//! add counts only once its job has finished: the job is polled every
//! `poll_interval_seconds`, for at most `job_wait_seconds` per attempt, until it is
//! `completed`, `errored` (finished, some contacts refused) or `failed` (all refused, or
//! nothing processable).
//! - A finished job's refused contacts are rejected and the others accepted. SendGrid counts
//!   them (`errored_count`) and lists them in a file at `errors_url`, whose layout it does not
//!   document; the connector reads the file as CSV and takes a row that holds exactly one of
//!   the job's addresses in a field as naming that contact, its other fields (blanked of
//!   personal data) as the reason. Contacts counted but not named are handled as the `meta`
//!   connector handles its counts: when every contact not named must be among them, they are
//!   all rejected; otherwise they are accepted and the count is logged, since which ones
//!   failed is not known. The file is fetched with the API key only from the configured host;
//!   from another host only over HTTPS and without the key.
//! - A `failed` job fails the batch as retryable, since SendGrid gives no reason that would
//!   make it permanent; the next attempt sends the batch again.
//! - A job still `pending` when the wait runs out fails the attempt as retryable. Sending the
//!   batch again is safe: upserts and list adds are idempotent. Within one process the next
//!   attempt of the same batch polls the same jobs instead of upserting again; after a
//!   restart it upserts again.
//!
//! Known limits:
//! - Removals are answered 202 with a `job_id` too, but whether the import status endpoint
//!   reports list-removal jobs is not confirmed (its documentation names upsert, import and
//!   contact deletion jobs). Removal jobs are therefore not polled: a 202 counts every member
//!   whose contact was taken out as removed.
//! - A job still pending when the batch's attempts run out may still be applied by SendGrid
//!   later: its members then join the list although none counts as added, and a member that
//!   leaves the segment before a later add is confirmed is not removed.
//! - A contact is only found by the lookup once its upsert job has finished. Adds wait for
//!   that, but a contact upserted moments ago by another client may be looked up too early,
//!   count as removed, and still join the list when its job completes.
//! - SendGrid updates an existing contact only when every identifier it holds is sent; adds
//!   send the address alone, so a contact that also carries another identifier (phone,
//!   external id) may be refused by the job, and is then rejected.
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

use crate::http::{self, Secret, quote, redact, redact_addresses};
use crate::job::{self, ImportJob, Jobs, Polled, Polling, Settled, Wording, shown_status};
use crate::members::{self, Addressed, distinct_addresses};
use crate::settings::{self, HeaderSecret, Limit, Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Outcome, Rejection, SettingsError,
};

/// Connection keys the SendGrid connector knows.
const CONNECTION_KEYS: &[&str] = &[
    "api_key_env",
    "base_url",
    "batch_size",
    "timeout_seconds",
    "poll_interval_seconds",
    "job_wait_seconds",
];
/// Activation keys the SendGrid connector knows.
const ACTIVATION_KEYS: &[&str] = &["list_id", "email_identifier"];
/// The SendGrid API host (EU-pinned accounts use `https://api.eu.sendgrid.com`).
const DEFAULT_BASE_URL: &str = "https://api.sendgrid.com";
/// `batch_size`: one upsert takes at most 30,000 contacts; by default a removal takes 100
/// lookups, an add one upsert.
const BATCH_SIZE: Limit = Limit {
    default: 10_000,
    max: 30_000,
};
/// The most bytes of JSON one upsert may carry; SendGrid's limit is 6 MB.
const MAX_UPSERT_BYTES: usize = 6_000_000;
/// The most addresses one lookup takes; also the most contact ids sent in one removal.
const MAX_LOOKUP: usize = 100;
/// `timeout_seconds`, seconds a request may take.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 60,
    max: 300,
};
/// The member identifier holding the e-mail address unless `email_identifier` says otherwise.
const DEFAULT_EMAIL_IDENTIFIER: &str = "email";
/// How much of a successful answer is read at most; a 100-address lookup is well under this.
const MAX_ANSWER_BYTES: usize = 4 << 20;
/// How much of an import job's errors file is read at most; rows past it count as not named.
const MAX_ERRORS_FILE_BYTES: usize = 32 << 20;
/// Polling an import job every 5 s, for at most 300 s an attempt, unless
/// `poll_interval_seconds` and `job_wait_seconds` say otherwise.
const POLLING: Polling = Polling::seconds(5, 300);
/// How SendGrid's import jobs are named in rejection reasons.
const IMPORT_JOB: Wording = Wording {
    platform: "SendGrid",
    items: "contacts",
    counted_as: "errored",
};

/// Adds and removes members of one SendGrid Marketing Campaigns list.
///
/// Connection settings:
/// - `api_key_env` (required): the environment variable holding the API key (`SG.` ...), with
///   Marketing access; the engine passes its value as the `api_key` secret.
/// - `base_url`: the API host, default `https://api.sendgrid.com`.
/// - `batch_size`: members per batch, 1 to 30000, default 10000.
/// - `timeout_seconds`: per request, 1 to 300, default 60.
/// - `poll_interval_seconds`: between two polls of an import job, 1 to 3600, default 5.
/// - `job_wait_seconds`: how long one attempt waits for its import jobs, 1 to 86400, default
///   300; an attempt that runs out fails as retryable and the next one polls the same jobs.
///
/// Activation settings:
/// - `list_id` (required): the list's id, a UUID.
/// - `email_identifier`: the member identifier holding the e-mail address, default `email`.
#[derive(Debug)]
pub struct SendgridConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base}/v3/marketing/contacts`, the upsert endpoint.
    contacts_url: Url,
    /// `{base}/v3/marketing/contacts/search/emails`, the lookup endpoint.
    search_url: Url,
    /// `{base}/v3/marketing/lists/{list_id}/contacts`, the removal endpoint.
    list_contacts_url: Url,
    /// `{base}/v3/marketing/contacts/imports`, under which each import job's status is read.
    imports_url: Url,
    /// The list's id, as sent in `list_ids`.
    list_id: String,
    /// The API key, sent as a bearer token.
    api_key: Secret,
    /// The member identifier holding the address (`email_identifier`).
    email_identifier: String,
    /// Members per batch (`batch_size`).
    batch_size: usize,
    /// `poll_interval_seconds` and `job_wait_seconds`.
    polling: Polling,
    /// The import jobs holding every upsert of a batch, by batch identity, until they are
    /// done.
    jobs: Jobs<QueuedAdd>,
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
    /// `poll_interval_seconds` and `job_wait_seconds`.
    polling: Polling,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `list_id`, lower-cased.
    list_id: String,
    /// `email_identifier`.
    email_identifier: String,
}

/// The upserts of one add batch once SendGrid has queued all of them, kept so that an
/// attempt of the same batch polls the same jobs rather than upserting again.
#[derive(Clone)]
struct QueuedAdd {
    /// The addresses a validation refusal named, with the reason; they are in no job.
    refused: BTreeMap<String, String>,
    /// The import jobs, each with the addresses it holds.
    jobs: Vec<ImportJob>,
}

// The addresses stay out of `Debug`, so that printing the connector shows no personal data.
impl std::fmt::Debug for QueuedAdd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedAdd")
            .field("jobs", &self.jobs)
            .finish_non_exhaustive()
    }
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
        SendgridConnector {
            contacts_url: endpoint(&["v3", "marketing", "contacts"]),
            search_url: endpoint(&["v3", "marketing", "contacts", "search", "emails"]),
            list_contacts_url: endpoint(&["v3", "marketing", "lists", list_id, "contacts"]),
            imports_url: endpoint(&["v3", "marketing", "contacts", "imports"]),
            client: connection.client,
            list_id: activation.list_id,
            api_key: connection.api_key,
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
        let sent = match batch.change {
            Change::Add => self.add(batch, &members).await?,
            Change::Remove => self.remove(&members).await?,
            Change::Replace => return Err(crate::cannot_replace(self.kind())),
        };
        outcome.accepted.extend(sent.accepted);
        outcome.rejected.extend(sent.rejected);
        Ok(outcome)
    }

    /// The members with a usable address, and an outcome rejecting those without one.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<Addressed<'a>>, Outcome) {
        members::prepare(batch, self.kind(), "e-mail address", |member| {
            members::addressed(member, &self.email_identifier)
        })
    }

    /// Upserts the members' contacts into the list, waits for the import jobs, and rejects
    /// the members SendGrid refused, at the upsert or in a job. An attempt of a batch whose
    /// upserts an earlier attempt queued polls those jobs instead of upserting again.
    async fn add(
        &self,
        batch: &Batch,
        members: &[Addressed<'_>],
    ) -> Result<Outcome, DeliveryError> {
        let identity = job::batch_identity(batch);
        let sent: Vec<String> = distinct_addresses(members)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let queued = match self.jobs.known(&identity, &sent) {
            Some(queued) => {
                tracing::debug!(
                    activation = %batch.activation,
                    change = batch.change.as_str(),
                    sequence = batch.sequence,
                    jobs = queued.jobs.len(),
                    "polling the sendgrid import jobs of an earlier attempt"
                );
                queued
            }
            None => {
                let queued = self.upsert_all(&sent).await?;
                self.jobs.remember(&identity, sent, queued.clone());
                queued
            }
        };

        let mut refused = queued.refused;
        for job in &queued.jobs {
            let in_job = self
                .wait_for_job(batch, &identity, job)
                .await
                .inspect_err(|error| self.jobs.forget_unless_retryable(&identity, error))?;
            refused.extend(in_job);
        }
        self.jobs.forget(&identity);

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

    /// Upserts `sent` into the list, in as many requests as the byte limit needs, and drops
    /// the addresses a validation refusal names before sending the rest again.
    async fn upsert_all(&self, sent: &[String]) -> Result<QueuedAdd, DeliveryError> {
        let addresses: Vec<&str> = sent.iter().map(String::as_str).collect();
        let mut refused: BTreeMap<String, String> = BTreeMap::new();
        let mut jobs = Vec::new();
        for chunk in split_by_bytes(&addresses, MAX_UPSERT_BYTES) {
            let mut pending: Vec<&str> = chunk.to_vec();
            while !pending.is_empty() {
                match self.upsert(&pending).await? {
                    Upserted::Queued(id) => {
                        jobs.push(ImportJob {
                            id,
                            addresses: pending.iter().map(|email| email.to_string()).collect(),
                        });
                        break;
                    }
                    Upserted::Refused(rows) => {
                        for (index, reason) in rows {
                            refused.insert(pending[index].to_owned(), reason);
                        }
                        pending.retain(|email| !refused.contains_key(*email));
                    }
                }
            }
        }
        Ok(QueuedAdd { refused, jobs })
    }

    /// Polls `job` until it has finished or `job_wait_seconds` have passed, and returns the
    /// addresses it refused, each with the reason.
    async fn wait_for_job(
        &self,
        batch: &Batch,
        identity: &str,
        job: &ImportJob,
    ) -> Result<BTreeMap<String, String>, DeliveryError> {
        let poll = move || async move {
            let status = self.job_status(identity, &job.id).await?;
            match status.status.as_str() {
                "completed" | "errored" => Ok(Polled::Finished(status)),
                "failed" => {
                    // The next attempt upserts again rather than polling a job that is over.
                    self.jobs.forget(identity);
                    let results = status.results.unwrap_or_default();
                    let counts = match results.requested_count {
                        0 => String::new(),
                        requested => {
                            format!(
                                " ({} of {requested} contacts errored)",
                                results.errored_count
                            )
                        }
                    };
                    Err(DeliveryError::Retryable {
                        message: format!(
                            "SendGrid import job {} failed{counts}; sending the batch again is \
                             safe, as upserts and list adds are idempotent",
                            job.id
                        ),
                    })
                }
                _ => Ok(Polled::Unfinished(status.status)),
            }
        };
        let unfinished = |status: String, waited: Duration| DeliveryError::Retryable {
            message: format!(
                "SendGrid import job {} is still {} after {} s; sending the batch again is safe, \
                 as upserts and list adds are idempotent, and the next attempt in this process \
                 polls the same job",
                job.id,
                shown_status(&status),
                waited.as_secs()
            ),
        };
        let status = job::wait(self.polling, poll, unfinished).await?;
        self.job_refusals(batch, job, &status).await
    }

    /// The status of the import job `id`.
    async fn job_status(&self, identity: &str, id: &str) -> Result<JobStatus, DeliveryError> {
        let mut url = self.imports_url.clone();
        url.path_segments_mut()
            .expect("an http URL has path segments")
            .push(id);
        let shown = url.to_string();
        let response = self
            .client
            .get(url)
            .bearer_auth(self.api_key.expose())
            .send()
            .await
            .map_err(|error| http::transport_failure("GET", &shown, error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|error| DeliveryError::Retryable {
                message: format!("{shown} answered {status} with an unreadable job: {error}"),
            });
        }
        if status == StatusCode::NOT_FOUND {
            // A job that cannot be found is not polled again; the next attempt upserts anew.
            self.jobs.forget(identity);
            return Err(DeliveryError::Retryable {
                message: format!(
                    "{shown} answered {status}: SendGrid does not know import job {id}; sending \
                     the batch again is safe, as upserts and list adds are idempotent"
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

    /// The addresses a finished `job` refused, with the reason: those its errors file names,
    /// and those its `errored_count` must include (see the module documentation).
    async fn job_refusals(
        &self,
        batch: &Batch,
        job: &ImportJob,
        status: &JobStatus,
    ) -> Result<BTreeMap<String, String>, DeliveryError> {
        let results = status.results.clone().unwrap_or_default();
        let errored = match status.status.as_str() {
            // `errored` means some contact was refused, even when no count says so.
            "errored" => results.errored_count.max(1),
            _ => results.errored_count,
        };
        if errored == 0 {
            return Ok(BTreeMap::new());
        }
        let named = match results
            .errors_url
            .as_deref()
            .filter(|link| !link.is_empty())
        {
            Some(link) => self.errors_file(batch, job, link).await?,
            None => BTreeMap::new(),
        };
        let settled = settle(job, errored, named);
        if settled.unnamed > 0 {
            tracing::warn!(
                activation = %batch.activation,
                change = batch.change.as_str(),
                sequence = batch.sequence,
                job_id = %job.id,
                contacts = job.addresses.len(),
                errored,
                unnamed = settled.unnamed,
                "a sendgrid import job refused contacts without naming them all; counting \
                 those not named as accepted"
            );
        }
        Ok(settled.refused)
    }

    /// The addresses of `job` its errors file at `link` names, each with the reason. The key
    /// goes only to the configured host; a file elsewhere is fetched over HTTPS without it. A
    /// file that cannot be had for a reason sending again would not cure names nobody.
    async fn errors_file(
        &self,
        batch: &Batch,
        job: &ImportJob,
        link: &str,
    ) -> Result<BTreeMap<String, String>, DeliveryError> {
        let url = match Url::parse(link) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => url,
            _ => {
                tracing::warn!(
                    activation = %batch.activation,
                    job_id = %job.id,
                    "a sendgrid import job gave an errors_url that is not an http URL; going by \
                     its counts"
                );
                return Ok(BTreeMap::new());
            }
        };
        let configured_host = url.origin() == self.imports_url.origin();
        if !configured_host && url.scheme() != "https" {
            tracing::warn!(
                activation = %batch.activation,
                job_id = %job.id,
                "a sendgrid import job gave an errors_url on another host without https; going \
                 by its counts"
            );
            return Ok(BTreeMap::new());
        }
        // The query of a download link may hold a signature; messages leave it out.
        let mut shown = url.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        let mut request = self.client.get(url);
        if configured_host {
            request = request.bearer_auth(self.api_key.expose());
        }
        let response = request
            .send()
            .await
            .map_err(|error| http::transport_failure("GET", shown.as_str(), error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ERRORS_FILE_BYTES).await;
        if status.is_success() {
            let known = http::identifier_values(batch);
            return Ok(read_errors_file(&body, &job.addresses, &known));
        }
        let failure = classify_failure(status, &headers, &body, shown.as_str(), SystemTime::now());
        if failure.is_retryable() {
            return Err(failure);
        }
        tracing::warn!(
            activation = %batch.activation,
            job_id = %job.id,
            error = %failure,
            "the errors file of a sendgrid import job could not be read; going by its counts"
        );
        Ok(BTreeMap::new())
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
            return read_job(status, &body, shown).map(Upserted::Queued);
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
    async fn remove(&self, members: &[Addressed<'_>]) -> Result<Outcome, DeliveryError> {
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
            return read_job(status, &body, shown).map(|_| ());
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
    fn destination(&self) -> Option<String> {
        Some(format!("the SendGrid list at {}", self.list_contacts_url))
    }

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
    /// SendGrid queued the job with this id.
    Queued(String),
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

/// An import job's status: `{"id", "status", "job_type", "results": {...}}`.
#[derive(Debug, serde::Deserialize)]
struct JobStatus {
    /// `pending`, `completed`, `errored` or `failed`.
    #[serde(default)]
    status: String,
    /// The counts, once there are any.
    #[serde(default)]
    results: Option<JobResults>,
}

/// The fields of an import job's `results` this connector reads.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct JobResults {
    /// Contacts the job was given.
    #[serde(default, deserialize_with = "count")]
    requested_count: u64,
    /// Contacts the job refused.
    #[serde(default, deserialize_with = "count")]
    errored_count: u64,
    /// Where the file listing the refused contacts can be downloaded.
    #[serde(default)]
    errors_url: Option<String>,
}

/// A count SendGrid writes as a JSON number, integer or not, or leaves null (zero).
fn count<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let value = <Option<serde_json::Value> as serde::Deserialize>::deserialize(deserializer)?;
    Ok(value
        .and_then(|value| {
            value.as_u64().or_else(|| {
                value
                    .as_f64()
                    .filter(|number| number.is_finite() && *number >= 0.0)
                    .map(|number| number as u64)
            })
        })
        .unwrap_or(0))
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

/// The `job_id` a successful write answer carries.
fn read_job(status: StatusCode, body: &[u8], shown: &str) -> Result<String, DeliveryError> {
    match serde_json::from_slice::<JobAnswer>(body) {
        Ok(answer) if !answer.job_id.is_empty() => {
            tracing::debug!(job_id = %answer.job_id, "sendgrid queued the change");
            Ok(answer.job_id)
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

/// The addresses of a job its errors file names, each with the reason.
///
/// The file's layout is not documented. It is read as CSV: a row holding exactly one of the
/// job's addresses in a field names that contact, and its other non-empty fields, each after
/// its column's name when the first row is a header (one naming no address), are the reason,
/// blanked of personal data and of the batch's identifier values (`known`). Rows naming none
/// or several of the addresses name nobody.
fn read_errors_file(body: &[u8], addresses: &[String], known: &[&str]) -> BTreeMap<String, String> {
    let wanted: BTreeSet<&str> = addresses.iter().map(String::as_str).collect();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body);
    let mut header: Option<Vec<String>> = None;
    let mut named = BTreeMap::new();
    for (row, record) in reader.byte_records().enumerate() {
        let Ok(record) = record else { break };
        let fields: Vec<String> = record
            .iter()
            .map(|field| String::from_utf8_lossy(field).trim().to_owned())
            .collect();
        let found: BTreeSet<&str> = fields
            .iter()
            .filter_map(|field| wanted.get(field.to_lowercase().as_str()).copied())
            .collect();
        let mut found = found.into_iter();
        let (Some(address), None) = (found.next(), found.next()) else {
            if row == 0 {
                header = Some(fields);
            }
            continue;
        };
        let said: Vec<String> = fields
            .iter()
            .enumerate()
            .filter(|(_, field)| !field.is_empty() && !field.eq_ignore_ascii_case(address))
            .map(|(column, field)| {
                let name = header.as_ref().and_then(|names| names.get(column));
                match name.filter(|name| !name.is_empty()) {
                    Some(name) => format!("{name}: {field}"),
                    None => field.clone(),
                }
            })
            .collect();
        let reason = match said.is_empty() {
            true => "SendGrid's import job refused the contact without saying why".to_owned(),
            false => format!(
                "SendGrid's import job refused the contact: {}",
                quote(&redact(&said.join("; "), known))
            ),
        };
        named.entry(address.to_owned()).or_insert(reason);
    }
    named
}

/// The refusals of `job`, which counted `errored` contacts and named those in `named` (see
/// [`job::settle`]).
fn settle(job: &ImportJob, errored: u64, named: BTreeMap<String, String>) -> Settled {
    job::settle(job, errored, named, IMPORT_JOB)
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

/// The API key, in `api_key_env`.
const API_KEY: HeaderSecret = HeaderSecret {
    name: "api_key",
    holds: "a SendGrid API key",
    called: "the API key",
    prefix: Some((
        "SG.",
        "the API key does not start with `SG.`; copy the whole key from SendGrid",
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
    let batch_size = problems.batch_size(table, BATCH_SIZE);
    let client = problems.http_client(table, "base_url", TIMEOUT_SECONDS);
    let polling = Polling::read(problems, table, POLLING);
    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        api_key: api_key?,
        batch_size,
        polling,
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

    use crate::error_kind as kind;

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

    fn job(addresses: &[&str]) -> ImportJob {
        ImportJob {
            id: "j1".into(),
            addresses: addresses.iter().map(|email| email.to_string()).collect(),
        }
    }

    #[test]
    fn an_errors_file_names_a_contact_by_a_field_holding_exactly_its_address() {
        let sent = ["ann@example.com".to_owned(), "bob@example.com".to_owned()];
        let with_header = b"email,error\r\nBOB@example.com,\"invalid, bob@example.com\"\r\n";
        let without_header = b"bob@example.com,,too many lists\n";
        let two_in_a_row = b"email,other\nann@example.com,bob@example.com\n";
        let json = br#"[{"email":"bob@example.com","error":"invalid"}]"#;

        assert_eq!(
            read_errors_file(with_header, &sent, &["Bob@Example.com"]),
            BTreeMap::from([(
                "bob@example.com".to_owned(),
                "SendGrid's import job refused the contact: error: invalid, <member>".to_owned()
            )])
        );
        assert_eq!(
            read_errors_file(without_header, &sent, &[]),
            BTreeMap::from([(
                "bob@example.com".to_owned(),
                "SendGrid's import job refused the contact: too many lists".to_owned()
            )])
        );
        assert_eq!(read_errors_file(two_in_a_row, &sent, &[]), BTreeMap::new());
        assert_eq!(read_errors_file(json, &sent, &[]), BTreeMap::new());
    }

    #[test]
    fn contacts_counted_but_not_named_are_refused_only_when_they_must_all_be() {
        let named = BTreeMap::from([("a@x.io".to_owned(), "named".to_owned())]);
        let three = job(&["a@x.io", "b@x.io", "c@x.io"]);
        let all_counted = "SendGrid's import job j1 counted 3 of its 3 contacts as errored \
                           without naming them all; this one is among them";

        let exactly_named = settle(&three, 1, named.clone());
        let one_unnamed = settle(&three, 2, named.clone());
        let all_errored = settle(&three, 3, named.clone());
        let nobody_named = settle(&job(&["b@x.io"]), 1, BTreeMap::new());

        assert_eq!(
            exactly_named,
            Settled {
                refused: named.clone(),
                unnamed: 0
            }
        );
        assert_eq!(
            one_unnamed,
            Settled {
                refused: named,
                unnamed: 1
            }
        );
        assert_eq!(all_errored.unnamed, 0);
        assert_eq!(
            all_errored.refused.keys().collect::<Vec<_>>(),
            ["a@x.io", "b@x.io", "c@x.io"]
        );
        assert_eq!(all_errored.refused["a@x.io"], "named");
        assert_eq!(all_errored.refused["c@x.io"], all_counted);
        assert_eq!(nobody_named.refused.len(), 1);
    }

    #[test]
    fn job_counts_may_be_integers_floats_or_null() {
        let status: JobStatus = serde_json::from_str(
            r#"{"status": "errored", "results": {"requested_count": 3.0,
                "errored_count": 1, "created_count": null}}"#,
        )
        .unwrap();
        let pending: JobStatus = serde_json::from_str(r#"{"status": "pending"}"#).unwrap();

        let results = status.results.unwrap();
        assert_eq!((results.requested_count, results.errored_count), (3, 1));
        assert!(pending.results.is_none());
        assert_eq!(shown_status("pending"), "pending");
        assert_eq!(shown_status("<b>odd</b>"), "unfinished");
    }

    #[test]
    fn list_ids_must_be_uuids() {
        assert!(is_uuid("ca7a3796-e8a8-4029-9ccb-df8937940562"));
        assert!(!is_uuid("ca7a3796e8a840299ccbdf8937940562"));
        assert!(!is_uuid("ca7a3796-e8a8-4029-9ccb-df893794056z"));
    }
}
