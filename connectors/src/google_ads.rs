//! The `google_ads` connector: members of a Google Ads Customer Match user list.
//!
//! This module owns the offline user data job flow of the Google Ads API (REST): create a job
//! for the user list (`offlineUserDataJobs:create`), add the members as `create` or `remove`
//! operations (`:addOperations`, with partial failure enabled, split so that no request holds
//! more than `identifiers_per_request` user identifiers), run the job (`:run`) and poll it
//! through `googleAds:search` until it reports `SUCCESS` or `FAILED`. It also owns the OAuth
//! access token (a fixed one, or one obtained and renewed from a refresh token), the
//! preparation of `UserData` from members' identifiers, and the classification of answers.
//! It does not create user lists, accept the customer data terms, use the Data Manager API,
//! or retry; [`crate::deliver_with_retries`] does that.
//!
//! One batch is one job, adds and removes never share one (Google refuses mixed jobs). Every
//! request carries `Authorization: Bearer`, `developer-token` and, when set,
//! `login-customer-id`.
//!
//! Sending a batch again. Creating an identifier the list already holds, and removing one it
//! does not hold, change nothing, so a new job with the same operations leaves the list as
//! the first one did: the connector relies on that set semantics rather than on a job
//! `external_id`, which Google refuses to see twice. Within one process it does better: once
//! every operation of a batch is in a job, the job is remembered under the batch identity,
//! and an attempt of the same batch after a timeout or a wait that ran out resumes that job
//! (runs it if it is still `PENDING`, otherwise polls it) instead of creating another. A job
//! created by an attempt that failed before all its operations were added is never run and
//! expires on Google's side after five days.
//!
//! Normalisation, as Google specifies it: e-mail addresses trimmed and lower-cased, with dots
//! and any `+suffix` removed before the `@` of `gmail.com` and `googlemail.com` addresses;
//! phone numbers in E.164 (`+` and country code); first and last names trimmed and
//! lower-cased; all three SHA-256 hashed (a value that already is a digest is sent as is).
//! Country codes (ISO alpha-2, upper case) and postal codes are sent in clear, and only
//! together with both names, as Google matches an address on all four. Each identifier is
//! its own `UserIdentifier` inside the member's one `UserData`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::http::{self, Secret, quote};
use crate::identifiers::{self, Invalid};
use crate::job::{self, Jobs, Polled, Polling};
use crate::members;
use crate::settings::{self, HeaderSecret, Limit, Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};

/// Connection keys the Google Ads connector knows.
const CONNECTION_KEYS: &[&str] = &[
    "developer_token_env",
    "access_token_env",
    "client_id_env",
    "client_secret_env",
    "refresh_token_env",
    "token_url",
    "customer_id",
    "login_customer_id",
    "base_url",
    "api_version",
    "batch_size",
    "identifiers_per_request",
    "timeout_seconds",
    "poll_interval_seconds",
    "job_wait_seconds",
];
/// Activation keys the Google Ads connector knows.
const ACTIVATION_KEYS: &[&str] = &[
    "user_list_id",
    "ad_user_data",
    "ad_personalization",
    "identifiers",
];
/// The three settings of the refresh-token flow.
const REFRESH_KEYS: [&str; 3] = ["client_id_env", "client_secret_env", "refresh_token_env"];
/// The Google Ads API host.
const DEFAULT_BASE_URL: &str = "https://googleads.googleapis.com";
/// Google's OAuth 2 token endpoint.
const DEFAULT_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// The API version used unless `api_version` says otherwise.
const DEFAULT_API_VERSION: &str = "v24";
/// `batch_size`, members per batch: one job holds at most 100,000.
const BATCH_SIZE: Limit = Limit {
    default: 10_000,
    max: 100_000,
};
/// `identifiers_per_request`, user identifiers per `addOperations` request: at most 100,000,
/// by default the figure Google recommends.
const IDENTIFIERS_PER_REQUEST: Limit = Limit {
    default: 10_000,
    max: 100_000,
};
/// `timeout_seconds`, seconds a request may take.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 60,
    max: 600,
};
/// Polling a running job every 30 s, for at most an hour an attempt, unless
/// `poll_interval_seconds` and `job_wait_seconds` say otherwise. Google takes about ten
/// minutes to 24 hours to process a job, which is why these defaults are longer than the
/// `sendgrid` and `klaviyo` ones.
const POLLING: Polling = Polling::seconds(30, 3600);
/// How much of an answer is read at most; a partial failure of 100,000 operations fits.
const MAX_ANSWER_BYTES: usize = 32 << 20;
/// A token is renewed this long before Google said it expires.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// The longest a token is kept, whatever `expires_in` says: Google's last an hour.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);

/// A member identifier Google matches on, as named in the `identifiers` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    /// `hashedEmail`.
    Email,
    /// `hashedPhoneNumber`.
    Phone,
    /// `addressInfo.hashedFirstName`.
    FirstName,
    /// `addressInfo.hashedLastName`.
    LastName,
    /// `addressInfo.countryCode`, in clear.
    CountryCode,
    /// `addressInfo.postalCode`, in clear.
    PostalCode,
}

impl Field {
    const ALL: [Field; 6] = [
        Field::Email,
        Field::Phone,
        Field::FirstName,
        Field::LastName,
        Field::CountryCode,
        Field::PostalCode,
    ];
    /// The fields that make up an address, all needed together.
    const ADDRESS: [Field; 4] = [
        Field::FirstName,
        Field::LastName,
        Field::CountryCode,
        Field::PostalCode,
    ];

    /// The field's name in the `identifiers` setting and in rejection reasons.
    fn name(self) -> &'static str {
        match self {
            Field::Email => "email",
            Field::Phone => "phone",
            Field::FirstName => "first_name",
            Field::LastName => "last_name",
            Field::CountryCode => "country_code",
            Field::PostalCode => "postal_code",
        }
    }

    fn parse(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|field| field.name() == name)
    }

    /// The value sent for `raw`, normalised as Google specifies.
    fn prepare(self, raw: &str) -> Result<String, Invalid> {
        use identifiers::hash_normalised as hash;
        match self {
            Field::Email => hash(raw, email),
            Field::Phone => hash(raw, identifiers::phone_e164),
            Field::FirstName | Field::LastName => hash(raw, name),
            Field::CountryCode => country_code(raw),
            Field::PostalCode => postal_code(raw),
        }
    }
}

/// An e-mail address as Google matches it: trimmed, lower-cased, and for `gmail.com` and
/// `googlemail.com` without dots or a `+suffix` before the `@`.
fn email(raw: &str) -> Result<String, Invalid> {
    let address = identifiers::email(raw)?;
    let (local, domain) = address
        .split_once('@')
        .expect("a checked address holds one @");
    if domain != "gmail.com" && domain != "googlemail.com" {
        return Ok(address);
    }
    let local = local.split('+').next().unwrap_or_default().replace('.', "");
    if local.is_empty() {
        return Err(Invalid::Malformed {
            expected: "an e-mail address",
        });
    }
    Ok(format!("{local}@{domain}"))
}

/// A first or last name trimmed and lower-cased.
fn name(raw: &str) -> Result<String, Invalid> {
    let text = raw.trim().to_lowercase();
    if text.is_empty() {
        Err(Invalid::Empty)
    } else {
        Ok(text)
    }
}

/// A two-letter ISO 3166 country code in upper case, sent in clear.
fn country_code(raw: &str) -> Result<String, Invalid> {
    identifiers::country(raw).map(|code| code.to_ascii_uppercase())
}

/// A postal code trimmed, sent in clear; a digest is refused since Google takes none here.
fn postal_code(raw: &str) -> Result<String, Invalid> {
    let text = raw.trim();
    if text.is_empty() {
        Err(Invalid::Empty)
    } else if identifiers::is_sha256_hex(text) {
        Err(Invalid::Malformed {
            expected: "a postal code in clear text (Google does not take it hashed)",
        })
    } else {
        Ok(text.to_owned())
    }
}

/// A consent signal as Google spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consent {
    /// `GRANTED`.
    Granted,
    /// `DENIED`.
    Denied,
}

impl Consent {
    fn wire(self) -> &'static str {
        match self {
            Consent::Granted => "GRANTED",
            Consent::Denied => "DENIED",
        }
    }
}

/// How the connector obtains the OAuth access token it sends.
// One value per connector, built once: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Credentials {
    /// A token the operator supplies and renews (`access_token_env`).
    Fixed(Secret),
    /// A token obtained from a refresh token at `token_url`, cached until it expires.
    Refreshed {
        /// The token endpoint.
        token_url: Url,
        /// The OAuth client id.
        client_id: Secret,
        /// The OAuth client secret.
        client_secret: Secret,
        /// The refresh token.
        refresh_token: Secret,
        /// The current access token, if any.
        cache: tokio::sync::Mutex<Option<CachedToken>>,
    },
}

/// An access token obtained from the token endpoint.
#[derive(Debug, Clone)]
struct CachedToken {
    /// The token.
    token: Secret,
    /// When it is renewed.
    renew_at: Instant,
    /// True when it was obtained because Google refused the previous one; if Google refuses
    /// this one too, renewing again will not help.
    after_refusal: bool,
}

/// A job every operation of a batch was added to, kept so that an attempt of the same batch
/// resumes it rather than creating another.
#[derive(Debug, Clone)]
struct KnownJob {
    /// `customers/{customer_id}/offlineUserDataJobs/{job_id}`.
    resource_name: String,
    /// The members Google accepted into the job.
    accepted: Vec<String>,
    /// The members Google refused when they were added.
    rejected: Vec<Rejection>,
}

/// Adds and removes members of one Google Ads Customer Match user list.
///
/// Connection settings:
/// - `developer_token_env` (required): the environment variable holding the developer token;
///   the engine passes its value as the `developer_token` secret.
/// - either `access_token_env`, a variable holding an OAuth access token the operator keeps
///   fresh, or all of `client_id_env`, `client_secret_env` and `refresh_token_env`, from which
///   the connector obtains and renews access tokens at `token_url` (default Google's).
/// - `customer_id` (required): the Google Ads account holding the user list, ten digits,
///   dashes allowed.
/// - `login_customer_id`: the manager account acting for it, if any, same form.
/// - `base_url`: the API host, default `https://googleads.googleapis.com`.
/// - `api_version`: `v<major>`, default `v24`.
/// - `batch_size`: members per batch (one job), 1 to 100000, default 10000.
/// - `identifiers_per_request`: user identifiers per `addOperations` request, 1 to 100000,
///   default 10000.
/// - `timeout_seconds`: per request, 1 to 600, default 60.
/// - `poll_interval_seconds`: between two polls of a running job, 1 to 3600, default 30.
/// - `job_wait_seconds`: how long one attempt waits for its job, 1 to 86400, default 3600;
///   an attempt that runs out fails as retryable and the next one resumes the same job.
///
/// Activation settings:
/// - `user_list_id` (required): the Customer Match user list's numeric id.
/// - `ad_user_data`, `ad_personalization` (required): the consent the members gave, `granted`
///   or `denied`, sent with every job that adds members.
/// - `identifiers`: a table from `email`, `phone`, `first_name`, `last_name`, `country_code`,
///   `postal_code` to the member identifier each is read from, default `{ email = "email" }`;
///   the four address fields are mapped all together or not at all.
#[derive(Debug)]
pub struct GoogleAdsConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base_url}/{api_version}/customers/{customer_id}`.
    customer_url: Url,
    /// `{base_url}/{api_version}`, the root resource names are appended to.
    version_url: Url,
    /// The `login-customer-id` header, if set.
    login_customer_id: Option<String>,
    /// The developer token.
    developer_token: Secret,
    /// Where the access token comes from.
    credentials: Credentials,
    /// `customers/{customer_id}/userLists/{user_list_id}`.
    user_list: String,
    /// `ad_user_data`.
    ad_user_data: Consent,
    /// `ad_personalization`.
    ad_personalization: Consent,
    /// Fields in wire order, each with the member identifier it is read from.
    fields: Vec<(Field, String)>,
    /// Members per batch (`batch_size`).
    batch_size: usize,
    /// Identifiers per `addOperations` request (`identifiers_per_request`).
    identifiers_per_request: usize,
    /// `poll_interval_seconds` and `job_wait_seconds`.
    polling: Polling,
    /// Jobs holding every operation of a batch, by batch identity, until they are done; each
    /// with the keys of the members sent.
    jobs: Jobs<KnownJob>,
}

/// The connection's settings, checked.
struct ConnectionSettings {
    /// The HTTP client, with `timeout_seconds` applied.
    client: reqwest::Client,
    /// `base_url`, or the API host.
    base_url: Url,
    /// `api_version`.
    api_version: String,
    /// `customer_id`, digits only.
    customer_id: String,
    /// `login_customer_id`, digits only.
    login_customer_id: Option<String>,
    /// The value of the variable `developer_token_env` names.
    developer_token: Secret,
    /// The access token or the refresh-token flow.
    credentials: Credentials,
    /// `batch_size`.
    batch_size: usize,
    /// `identifiers_per_request`.
    identifiers_per_request: usize,
    /// `poll_interval_seconds` and `job_wait_seconds`.
    polling: Polling,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `user_list_id`, digits only.
    user_list_id: String,
    /// `ad_user_data`.
    ad_user_data: Consent,
    /// `ad_personalization`.
    ad_personalization: Consent,
    /// `identifiers`, in wire order.
    fields: Vec<(Field, String)>,
}

/// One member ready to send.
struct Prepared<'a> {
    /// The member's profile key.
    key: &'a str,
    /// The `UserData` of its operation.
    user_data: Value,
    /// How many user identifiers it holds.
    identifiers: usize,
}

/// What Google said about the operations of one `addOperations` request.
struct Added {
    /// Keys of the members whose operation Google took.
    accepted: Vec<String>,
    /// Members whose operation Google refused, with the reason.
    rejected: Vec<Rejection>,
}

/// A job's state as `googleAds:search` reports it.
#[derive(Debug, PartialEq, Eq)]
enum JobStatus {
    /// Created, not run yet.
    Pending,
    /// Run, being processed.
    Running,
    /// Processed.
    Success,
    /// Processing failed, with Google's reason.
    Failed(String),
}

impl GoogleAdsConnector {
    /// Builds the connector from its connection and activation settings and the resolved
    /// secrets (`developer_token`, and `access_token` or `client_id`, `client_secret` and
    /// `refresh_token`), returning every problem found.
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
        let version_url = http::endpoint(&connection.base_url, &[&connection.api_version]);
        let customer_url = http::endpoint(&version_url, &["customers", &connection.customer_id]);
        GoogleAdsConnector {
            client: connection.client,
            customer_url,
            version_url,
            login_customer_id: connection.login_customer_id,
            developer_token: connection.developer_token,
            credentials: connection.credentials,
            user_list: format!(
                "customers/{}/userLists/{}",
                connection.customer_id, activation.user_list_id
            ),
            ad_user_data: activation.ad_user_data,
            ad_personalization: activation.ad_personalization,
            fields: activation.fields,
            batch_size: connection.batch_size,
            identifiers_per_request: connection.identifiers_per_request,
            polling: connection.polling,
            jobs: Jobs::default(),
        }
    }

    /// Sends one batch once: one job, resumed if an earlier attempt filled it.
    async fn send(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let (members, mut outcome) = self.prepare(batch);
        if members.is_empty() {
            return Ok(outcome);
        }
        let identity = job::batch_identity(batch);
        let sent: Vec<String> = members.iter().map(|m| m.key.to_owned()).collect();

        let known = self.jobs.known(&identity, &sent);
        let job = match known {
            Some(job) => {
                tracing::debug!(
                    activation = %batch.activation,
                    change = batch.change.as_str(),
                    sequence = batch.sequence,
                    job = %job.resource_name,
                    "resuming the google ads job of an earlier attempt"
                );
                let status = self.job_status(&identity, &job.resource_name).await;
                if status? == JobStatus::Pending {
                    self.run_job(&job.resource_name)
                        .await
                        .inspect_err(|error| self.jobs.forget_unless_retryable(&identity, error))?;
                }
                job
            }
            None => {
                let job = self.fill_job(batch, &members).await?;
                if job.accepted.is_empty() {
                    // Google refused every operation; the empty job is never run.
                    outcome.rejected.extend(job.rejected);
                    return Ok(outcome);
                }
                self.jobs.remember(&identity, sent, job.clone());
                self.run_job(&job.resource_name)
                    .await
                    .inspect_err(|error| self.jobs.forget_unless_retryable(&identity, error))?;
                job
            }
        };

        self.wait_for_job(&identity, &job.resource_name)
            .await
            .inspect_err(|error| self.jobs.forget_unless_retryable(&identity, error))?;
        self.jobs.forget(&identity);
        tracing::debug!(
            activation = %batch.activation,
            change = batch.change.as_str(),
            sequence = batch.sequence,
            accepted = job.accepted.len(),
            rejected = job.rejected.len(),
            "google ads job done"
        );
        outcome.accepted.extend(job.accepted);
        outcome.rejected.extend(job.rejected);
        Ok(outcome)
    }

    /// The `UserData` of each member with at least one usable identifier, and an outcome
    /// holding a rejection for every member that has none.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<Prepared<'a>>, Outcome) {
        members::prepare(batch, "google ads", "identifier", |member| {
            let identifiers = self.user_identifiers(member)?;
            Ok(Prepared {
                key: &member.key,
                identifiers: identifiers.len(),
                user_data: json!({ "userIdentifiers": identifiers }),
            })
        })
    }

    /// One member's `UserIdentifier`s in wire order; the reasons when none is usable.
    fn user_identifiers(&self, member: &Member) -> Result<Vec<Value>, String> {
        let mut reasons = Vec::new();
        let mut prepared: BTreeMap<Field, String> = BTreeMap::new();
        for (field, identifier) in &self.fields {
            let value = match member.identifiers.get(identifier) {
                Some(raw) => field.prepare(raw),
                None => Err(Invalid::Missing),
            };
            match value {
                Ok(value) => {
                    prepared.insert(*field, value);
                }
                Err(invalid) => {
                    reasons.push(format!("{} (`{identifier}`) {invalid}", field.name()))
                }
            }
        }

        let mut identifiers = Vec::new();
        if let Some(hash) = prepared.get(&Field::Email) {
            identifiers.push(json!({ "hashedEmail": hash }));
        }
        if let Some(hash) = prepared.get(&Field::Phone) {
            identifiers.push(json!({ "hashedPhoneNumber": hash }));
        }
        let address: Option<Vec<&String>> = Field::ADDRESS
            .iter()
            .map(|field| prepared.get(field))
            .collect();
        if let Some([first, last, country, postal]) = address.as_deref() {
            identifiers.push(json!({ "addressInfo": {
                "hashedFirstName": first,
                "hashedLastName": last,
                "countryCode": country,
                "postalCode": postal,
            }}));
        }
        if identifiers.is_empty() {
            Err(format!("no usable identifier: {}", reasons.join("; ")))
        } else {
            Ok(identifiers)
        }
    }

    /// Creates a job and adds every member's operation to it, one request per
    /// `identifiers_per_request`.
    async fn fill_job(
        &self,
        batch: &Batch,
        members: &[Prepared<'_>],
    ) -> Result<KnownJob, DeliveryError> {
        let resource_name = self.create_job(batch.change).await?;
        let mut job = KnownJob {
            resource_name,
            accepted: Vec::new(),
            rejected: Vec::new(),
        };
        for chunk in chunks(members, self.identifiers_per_request) {
            let added = self
                .add_operations(&job.resource_name, batch.change, chunk)
                .await?;
            job.accepted.extend(added.accepted);
            job.rejected.extend(added.rejected);
        }
        if job.accepted.is_empty() {
            tracing::warn!(
                activation = %batch.activation,
                change = batch.change.as_str(),
                sequence = batch.sequence,
                rejected = job.rejected.len(),
                "google ads refused every operation of the batch"
            );
        }
        Ok(job)
    }

    /// `offlineUserDataJobs:create` for the user list; returns the job's resource name.
    async fn create_job(&self, change: Change) -> Result<String, DeliveryError> {
        let mut metadata = json!({ "userList": self.user_list });
        if change == Change::Add {
            metadata["consent"] = json!({
                "adUserData": self.ad_user_data.wire(),
                "adPersonalization": self.ad_personalization.wire(),
            });
        }
        let body = json!({ "job": {
            "type": "CUSTOMER_MATCH_USER_LIST",
            "customerMatchUserListMetadata": metadata,
        }});
        let url = self.customer_method("offlineUserDataJobs:create");
        let answer = self.call(&url, &body).await?;
        let resource_name = answer["resourceName"].as_str().unwrap_or_default();
        if !is_job_name(resource_name) {
            return Err(DeliveryError::Retryable {
                message: format!("{url} answered without a job resource name"),
            });
        }
        Ok(resource_name.to_owned())
    }

    /// `:addOperations` with partial failure enabled, for one chunk of members.
    async fn add_operations(
        &self,
        job: &str,
        change: Change,
        members: &[Prepared<'_>],
    ) -> Result<Added, DeliveryError> {
        let verb = match change {
            Change::Add => "create",
            Change::Remove => "remove",
            Change::Replace => return Err(crate::cannot_replace("google_ads")),
        };
        let body = json!({
            "enablePartialFailure": true,
            "operations": members
                .iter()
                .map(|member| json!({ verb: member.user_data }))
                .collect::<Vec<_>>(),
        });
        let url = self.resource_method(job, "addOperations");
        let answer = self.call(&url, &body).await?;
        let refused = refused_operations(&answer["partialFailureError"]);
        let mut added = Added {
            accepted: Vec::new(),
            rejected: Vec::new(),
        };
        for (index, member) in members.iter().enumerate() {
            match refused.get(&index) {
                Some(reason) => added.rejected.push(Rejection {
                    key: member.key.to_owned(),
                    reason: reason.clone(),
                }),
                None => added.accepted.push(member.key.to_owned()),
            }
        }
        Ok(added)
    }

    /// `:run` on the job.
    async fn run_job(&self, job: &str) -> Result<(), DeliveryError> {
        let url = self.resource_method(job, "run");
        self.call(&url, &json!({})).await.map(|_| ())
    }

    /// Polls the job until it is done or `job_wait_seconds` have passed.
    async fn wait_for_job(&self, identity: &str, job: &str) -> Result<(), DeliveryError> {
        let poll = move || async move {
            match self.job_status(identity, job).await? {
                JobStatus::Success => Ok(Polled::Finished(())),
                JobStatus::Failed(reason) => {
                    self.jobs.forget(identity);
                    Err(DeliveryError::Permanent {
                        message: format!("Google Ads job {job} failed: {reason}"),
                    })
                }
                status @ (JobStatus::Pending | JobStatus::Running) => {
                    Ok(Polled::Unfinished(status))
                }
            }
        };
        let unfinished = |status: JobStatus, waited: Duration| DeliveryError::Retryable {
            message: format!(
                "Google Ads job {job} is still {} after {} s; the next attempt of the batch \
                 waits for the same job",
                if status == JobStatus::Pending {
                    "PENDING"
                } else {
                    "RUNNING"
                },
                waited.as_secs()
            ),
        };
        job::wait(self.polling, poll, unfinished).await
    }

    /// The job's status, read through `googleAds:search`.
    async fn job_status(&self, identity: &str, job: &str) -> Result<JobStatus, DeliveryError> {
        let id = job.rsplit('/').next().unwrap_or_default();
        let query = format!(
            "SELECT offline_user_data_job.resource_name, offline_user_data_job.status, \
             offline_user_data_job.failure_reason FROM offline_user_data_job WHERE \
             offline_user_data_job.id = {id}"
        );
        let url = self.customer_method("googleAds:search");
        let answer = self.call(&url, &json!({ "query": query })).await?;
        let found = &answer["results"][0]["offlineUserDataJob"];
        match found["status"].as_str() {
            Some("PENDING") => Ok(JobStatus::Pending),
            Some("RUNNING") => Ok(JobStatus::Running),
            Some("SUCCESS") => Ok(JobStatus::Success),
            Some("FAILED") => Ok(JobStatus::Failed(
                found["failureReason"]
                    .as_str()
                    .unwrap_or("no failure reason given")
                    .to_owned(),
            )),
            other => {
                // A job that cannot be found is not resumed; the next attempt makes another.
                self.jobs.forget(identity);
                Err(DeliveryError::Retryable {
                    message: format!(
                        "{url} did not report the status of job {job} (found {})",
                        other.unwrap_or("nothing")
                    ),
                })
            }
        }
    }

    /// `{customer_url}/{method}`, such as `.../customers/123/googleAds:search`.
    fn customer_method(&self, method: &str) -> Url {
        let mut url = self.customer_url.clone();
        url.path_segments_mut()
            .expect("an http URL has path segments")
            .push(method);
        url
    }

    /// `{version_url}/{resource_name}:{method}`.
    fn resource_method(&self, resource_name: &str, method: &str) -> Url {
        let mut url = self.version_url.clone();
        {
            let mut segments = url
                .path_segments_mut()
                .expect("an http URL has path segments");
            let mut parts: Vec<&str> = resource_name.split('/').collect();
            let last = parts.pop().unwrap_or_default();
            segments.extend(parts);
            segments.push(&format!("{last}:{method}"));
        }
        url
    }

    /// POSTs `body` to `url` with the credentials and returns the JSON answer, or the
    /// classified failure.
    async fn call(&self, url: &Url, body: &Value) -> Result<Value, DeliveryError> {
        let token = self.access_token().await?;
        let mut request = self
            .client
            .post(url.clone())
            .bearer_auth(token.expose())
            .header("developer-token", self.developer_token.expose())
            .json(body);
        if let Some(login) = &self.login_customer_id {
            request = request.header("login-customer-id", login);
        }
        let response = request
            .send()
            .await
            .map_err(|error| http::transport_failure("POST", url.as_str(), error))?;

        let status = response.status();
        let headers = response.headers().clone();
        let answer = http::body_start(response, MAX_ANSWER_BYTES).await;
        if !status.is_success() {
            let failure =
                classify_failure(url.as_str(), status, &headers, &answer, SystemTime::now());
            return Err(self.after_refusal(status, failure).await);
        }
        self.token_worked().await;
        serde_json::from_slice(&answer).map_err(|error| DeliveryError::Retryable {
            message: format!("{url} answered {status} with an unreadable body: {error}"),
        })
    }

    /// The access token to send: the fixed one, or a cached or newly obtained one.
    async fn access_token(&self) -> Result<Secret, DeliveryError> {
        let (token_url, client_id, client_secret, refresh_token, cache) = match &self.credentials {
            Credentials::Fixed(token) => return Ok(token.clone()),
            Credentials::Refreshed {
                token_url,
                client_id,
                client_secret,
                refresh_token,
                cache,
            } => (token_url, client_id, client_secret, refresh_token, cache),
        };
        let mut cache = cache.lock().await;
        let after_refusal = match cache.as_ref() {
            Some(cached) if cached.renew_at > Instant::now() => return Ok(cached.token.clone()),
            Some(cached) => cached.after_refusal,
            None => false,
        };
        let (token, lifetime) = fetch_token(
            &self.client,
            token_url,
            client_id,
            client_secret,
            refresh_token,
        )
        .await?;
        let now = Instant::now();
        let kept = lifetime
            .min(MAX_TOKEN_LIFETIME)
            .saturating_sub(TOKEN_EXPIRY_MARGIN);
        *cache = Some(CachedToken {
            token: token.clone(),
            renew_at: now.checked_add(kept).unwrap_or(now),
            after_refusal,
        });
        Ok(token)
    }

    /// What a failure becomes once a refused access token is accounted for: a token
    /// obtained from the refresh token is dropped, and the attempt is retryable unless the
    /// token refused was itself obtained after a refusal.
    async fn after_refusal(&self, status: StatusCode, failure: DeliveryError) -> DeliveryError {
        let Credentials::Refreshed { cache, .. } = &self.credentials else {
            return failure;
        };
        if status != StatusCode::UNAUTHORIZED {
            return failure;
        }
        let mut cache = cache.lock().await;
        let second_refusal = cache.as_ref().is_some_and(|cached| cached.after_refusal);
        if second_refusal {
            return failure;
        }
        // Renew at once, and remember why.
        *cache = Some(CachedToken {
            token: Secret(String::new()),
            renew_at: Instant::now(),
            after_refusal: true,
        });
        let DeliveryError::Auth { message } = failure else {
            return failure;
        };
        DeliveryError::Retryable {
            message: format!("{message}; a new access token is obtained for the next attempt"),
        }
    }

    /// Clears the mark a refusal left once a token has worked.
    async fn token_worked(&self) {
        if let Credentials::Refreshed { cache, .. } = &self.credentials
            && let Some(cached) = cache.lock().await.as_mut()
        {
            cached.after_refusal = false;
        }
    }
}

impl Connector for GoogleAdsConnector {
    fn destination(&self) -> Option<String> {
        Some(format!("Google Ads user list {}", self.user_list))
    }

    fn kind(&self) -> &'static str {
        "google_ads"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.send(batch))
    }
}

/// `members` cut into runs holding at most `limit` user identifiers each (a member holding
/// more than `limit` on its own goes alone).
fn chunks<'m, 'a>(members: &'m [Prepared<'a>], limit: usize) -> Vec<&'m [Prepared<'a>]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut count = 0;
    for (index, member) in members.iter().enumerate() {
        if index > start && count + member.identifiers > limit {
            chunks.push(&members[start..index]);
            start = index;
            count = 0;
        }
        count += member.identifiers;
    }
    if start < members.len() {
        chunks.push(&members[start..]);
    }
    chunks
}

/// True for `customers/{digits}/offlineUserDataJobs/{digits}`.
fn is_job_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    matches!(parts.as_slice(), ["customers", customer, "offlineUserDataJobs", job]
        if digits(customer) && digits(job))
}

/// The reasons of the operations a `partialFailureError` refers to, by operation index.
///
/// Each error of the `GoogleAdsFailure` details points at `operations[i]` through its
/// location; errors of one operation are joined. The offending value (`trigger`) is left out.
fn refused_operations(partial_failure: &Value) -> BTreeMap<usize, String> {
    let mut refused: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let details = partial_failure["details"].as_array().into_iter().flatten();
    for error in details.flat_map(|detail| detail["errors"].as_array().into_iter().flatten()) {
        let index = error["location"]["fieldPathElements"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|element| element["fieldName"] == "operations")
            .and_then(|element| element["index"].as_u64())
            .and_then(|index| usize::try_from(index).ok());
        let Some(index) = index else {
            continue;
        };
        refused
            .entry(index)
            .or_default()
            .push(describe_error(error));
    }
    refused
        .into_iter()
        .map(|(index, reasons)| {
            (
                index,
                format!("Google Ads refused the operation: {}", reasons.join("; ")),
            )
        })
        .collect()
}

/// `<message> (<category> <code>)` for one `GoogleAdsError`.
fn describe_error(error: &Value) -> String {
    let message = quote(error["message"].as_str().unwrap_or("no message"));
    match error_code(error) {
        Some((category, code)) => format!("{message} ({category} {code})"),
        None => message,
    }
}

/// The one `errorCode` entry of a `GoogleAdsError`, such as `("quotaError",
/// "RESOURCE_EXHAUSTED")`.
fn error_code(error: &Value) -> Option<(&str, &str)> {
    let (category, code) = error["errorCode"].as_object()?.iter().next()?;
    Some((category.as_str(), code.as_str()?))
}

/// The failure a non-2xx answer of the Google Ads API stands for.
fn classify_failure(
    shown_url: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> DeliveryError {
    let envelope: Option<Value> = serde_json::from_slice::<Value>(body)
        .ok()
        .filter(|value| value["error"].is_object());
    let Some(envelope) = envelope else {
        return classify_bare_failure(shown_url, status, headers, body, now);
    };
    let error = &envelope["error"];
    let rpc_status = error["status"].as_str().unwrap_or_default();
    let ads_errors: Vec<&Value> = error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|detail| detail["errors"].as_array().into_iter().flatten())
        .collect();
    let codes: Vec<(&str, &str)> = ads_errors.iter().filter_map(|e| error_code(e)).collect();
    let request_id = error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|detail| detail["requestId"].as_str());

    let mut said = match ads_errors.as_slice() {
        [] => quote(error["message"].as_str().unwrap_or_default()),
        errors => errors
            .iter()
            .map(|e| describe_error(e))
            .collect::<Vec<_>>()
            .join("; "),
    };
    if let Some(id) = request_id {
        said.push_str(&format!(" (request id {id})"));
    }
    let message = format!("{shown_url} answered {status}: {said}");
    let has = |category: &str| codes.iter().any(|(c, _)| *c == category);
    let has_code = |code: &str| codes.iter().any(|(_, c)| *c == code);

    if status == StatusCode::TOO_MANY_REQUESTS
        || rpc_status == "RESOURCE_EXHAUSTED"
        || has("quotaError")
    {
        return DeliveryError::RateLimited {
            wait: retry_delay(error).or_else(|| http::retry_after(headers, now)),
            message,
        };
    }
    if has_code("CONCURRENT_MODIFICATION") {
        return DeliveryError::Retryable {
            message: format!("{message}; another writer is changing the same job or list"),
        };
    }
    if status == StatusCode::UNAUTHORIZED
        || rpc_status == "UNAUTHENTICATED"
        || has("authenticationError")
        || codes.iter().any(|(category, code)| {
            *category == "authorizationError" && code.starts_with("DEVELOPER_TOKEN")
        })
    {
        return DeliveryError::Auth {
            message: format!("{message}; check the OAuth credentials and `developer_token_env`"),
        };
    }
    if has_code("USER_PERMISSION_DENIED") {
        return DeliveryError::Permanent {
            message: format!(
                "{message}; only the account that owns the user list may change it, check \
                 `customer_id` and `login_customer_id`"
            ),
        };
    }
    if has("internalError")
        || matches!(rpc_status, "INTERNAL" | "UNAVAILABLE" | "DEADLINE_EXCEEDED")
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
    {
        return DeliveryError::Retryable { message };
    }
    DeliveryError::Permanent { message }
}

/// The meaning of a failed answer without a Google error envelope (an HTML page, a proxy's
/// answer, an empty body).
fn classify_bare_failure(
    shown_url: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> DeliveryError {
    let text = String::from_utf8_lossy(body);
    let message = if text.trim_start().starts_with('<') {
        format!("{shown_url} answered {status} with an HTML page instead of a Google API error")
    } else {
        format!("{shown_url} answered {status}: {}", quote(&text))
    };
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: http::retry_after(headers, now),
            message,
        },
        401 => DeliveryError::Auth { message },
        408 | 500 | 502..=599 => DeliveryError::Retryable { message },
        _ => DeliveryError::Permanent { message },
    }
}

/// The wait a quota error asks for: `quotaErrorDetails.retryDelay` of a `GoogleAdsError`, or
/// a `google.rpc.RetryInfo` detail's `retryDelay`, as a protobuf duration (`"30s"`).
fn retry_delay(error: &Value) -> Option<Duration> {
    let details = error["details"].as_array()?;
    let from_ads = details
        .iter()
        .flat_map(|detail| detail["errors"].as_array().into_iter().flatten())
        .find_map(|e| e["details"]["quotaErrorDetails"]["retryDelay"].as_str());
    let from_retry_info = details
        .iter()
        .find(|detail| {
            detail["@type"]
                .as_str()
                .is_some_and(|kind| kind.ends_with("google.rpc.RetryInfo"))
        })
        .and_then(|detail| detail["retryDelay"].as_str());
    protobuf_duration(from_ads.or(from_retry_info)?)
}

/// A protobuf JSON duration, seconds with an `s` suffix (`"1.5s"`).
fn protobuf_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// Exchanges the refresh token for an access token; returns it with its lifetime.
async fn fetch_token(
    client: &reqwest::Client,
    token_url: &Url,
    client_id: &Secret,
    client_secret: &Secret,
    refresh_token: &Secret,
) -> Result<(Secret, Duration), DeliveryError> {
    let mut form = Url::parse("form:").expect("a bare scheme parses");
    form.query_pairs_mut()
        .append_pair("grant_type", "refresh_token")
        .append_pair("client_id", client_id.expose())
        .append_pair("client_secret", client_secret.expose())
        .append_pair("refresh_token", refresh_token.expose());
    let body = form.query().unwrap_or_default().to_owned();
    let response = client
        .post(token_url.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|error| http::transport_failure("POST", token_url.as_str(), error))?;

    let status = response.status();
    let headers = response.headers().clone();
    let answer = http::body_start(response, http::MAX_ERROR_BODY_BYTES).await;
    let parsed: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    if status.is_success() {
        let token = parsed["access_token"].as_str().filter(|t| !t.is_empty());
        let lifetime = parsed["expires_in"].as_u64().unwrap_or(3600);
        return match token {
            Some(token) => Ok((Secret(token.to_owned()), Duration::from_secs(lifetime))),
            None => Err(DeliveryError::Retryable {
                message: format!("{token_url} answered {status} without an access token"),
            }),
        };
    }
    let code = parsed["error"].as_str().unwrap_or_default();
    let description = quote(parsed["error_description"].as_str().unwrap_or_default());
    let message = format!("{token_url} answered {status}: {code} {description}");
    match code {
        "invalid_grant" => Err(DeliveryError::Auth {
            message: format!(
                "{message}; the refresh token is expired or revoked, authorise the account again"
            ),
        }),
        "invalid_client" | "unauthorized_client" => Err(DeliveryError::Auth {
            message: format!("{message}; check `client_id_env` and `client_secret_env`"),
        }),
        _ => Err(classify_bare_failure(
            token_url.as_str(),
            status,
            &headers,
            &answer,
            SystemTime::now(),
        )),
    }
}

/// A Google Ads customer id at `key`, ten digits with or without dashes, as digits only.
fn read_customer_id(problems: &mut Problems, table: &toml::Table, key: &str) -> Option<String> {
    let text = match table.get(key)? {
        toml::Value::Integer(id) => id.to_string(),
        toml::Value::String(text) => text.clone(),
        _ => {
            problems.push(
                key,
                "expected a Google Ads customer id such as `123-456-7890`",
            );
            return None;
        }
    };
    let digits: String = text.chars().filter(|c| *c != '-').collect();
    if digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()) {
        Some(digits)
    } else {
        problems.push(
            key,
            format!("expected a Google Ads customer id of ten digits such as `123-456-7890`, got `{text}`"),
        );
        None
    }
}

/// The developer token, in `developer_token_env`.
const DEVELOPER_TOKEN: HeaderSecret = HeaderSecret {
    name: "developer_token",
    holds: "a Google Ads developer token",
    called: "the developer token",
    prefix: None,
};

/// A fixed OAuth access token, in `access_token_env`.
const ACCESS_TOKEN: HeaderSecret = HeaderSecret {
    name: "access_token",
    holds: "an OAuth access token",
    called: "the access token",
    prefix: None,
};

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let developer_token = problems.header_secret(table, secrets, DEVELOPER_TOKEN);
    let credentials = read_credentials(problems, table, secrets);
    let customer_id = match table.contains_key("customer_id") {
        true => read_customer_id(problems, table, "customer_id"),
        false => {
            problems.push(
                "customer_id",
                "missing; set it to the Google Ads account that holds the user list",
            );
            None
        }
    };
    let login_customer_id = match table.contains_key("login_customer_id") {
        true => read_customer_id(problems, table, "login_customer_id").map(Some),
        false => Some(None),
    };
    let base_url = problems.base_url(table, DEFAULT_BASE_URL);
    let api_version = read_api_version(problems, table);
    let batch_size = problems.batch_size(table, BATCH_SIZE);
    let identifiers_per_request =
        problems.count(table, "identifiers_per_request", IDENTIFIERS_PER_REQUEST);
    let client = problems.http_client(table, "base_url", TIMEOUT_SECONDS);
    let polling = Polling::read(problems, table, POLLING);
    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        api_version: api_version?,
        customer_id: customer_id?,
        login_customer_id: login_customer_id?,
        developer_token: developer_token?,
        credentials: credentials?,
        batch_size,
        identifiers_per_request: usize::try_from(identifiers_per_request).unwrap_or(usize::MAX),
        polling,
    })
}

/// `access_token_env`, or the three settings of the refresh-token flow and `token_url`.
fn read_credentials(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<Credentials> {
    let refresh_keys: Vec<&str> = REFRESH_KEYS
        .into_iter()
        .filter(|key| table.contains_key(*key))
        .collect();
    let fixed = table.contains_key("access_token_env");
    if fixed && refresh_keys.is_empty() {
        if table.contains_key("token_url") {
            problems.push(
                "token_url",
                "only used with `refresh_token_env`; remove it or switch to the refresh token",
            );
        }
        let token = problems.header_secret(table, secrets, ACCESS_TOKEN);
        return Some(Credentials::Fixed(token?));
    }
    if fixed {
        problems.push(
            "access_token_env",
            "set either `access_token_env` or `client_id_env`, `client_secret_env` and \
             `refresh_token_env`, not both",
        );
        return None;
    }
    if refresh_keys.is_empty() {
        problems.push(
            "refresh_token_env",
            "missing; set `client_id_env`, `client_secret_env` and `refresh_token_env` (or \
             `access_token_env`) to the environment variables holding the OAuth credentials",
        );
        return None;
    }
    let client_id = problems.secret(table, secrets, "client_id", "the OAuth client id");
    let client_secret = problems.secret(table, secrets, "client_secret", "the OAuth client secret");
    let refresh_token = problems.secret(
        table,
        secrets,
        "refresh_token",
        "an OAuth refresh token with the adwords scope",
    );
    let token_url = problems.http_url_or(table, "token_url", DEFAULT_TOKEN_URL);
    Some(Credentials::Refreshed {
        token_url: token_url?,
        client_id: Secret(client_id?),
        client_secret: Secret(client_secret?),
        refresh_token: Secret(refresh_token?),
        cache: tokio::sync::Mutex::new(None),
    })
}

/// `api_version`, `v<major>`, or the default.
fn read_api_version(problems: &mut Problems, table: &toml::Table) -> Option<String> {
    if !table.contains_key("api_version") {
        return Some(DEFAULT_API_VERSION.to_owned());
    }
    let version = problems.string(table, Place::Connection, "api_version")?;
    let shaped = version
        .strip_prefix('v')
        .is_some_and(|major| !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()));
    if shaped {
        Some(version)
    } else {
        problems.push(
            "api_version",
            format!(
                "expected a Google Ads API version such as `{DEFAULT_API_VERSION}`, got `{version}`"
            ),
        );
        None
    }
}

/// The checked activation settings, `None` when any is wrong (the problems say which).
fn read_activation(problems: &mut Problems, table: &toml::Table) -> Option<ActivationSettings> {
    problems.reject_unknown_keys(table, Place::Activation, ACTIVATION_KEYS);
    let user_list_id = problems.numeric_id(
        table,
        "user_list_id",
        "missing; set it to the Customer Match user list's numeric id",
        "expected the Customer Match user list's numeric id, digits only",
    );
    let ad_user_data = read_consent(problems, table, "ad_user_data");
    let ad_personalization = read_consent(problems, table, "ad_personalization");
    let fields = read_fields(problems, table);
    Some(ActivationSettings {
        user_list_id: user_list_id?,
        ad_user_data: ad_user_data?,
        ad_personalization: ad_personalization?,
        fields: fields?,
    })
}

/// A consent setting, `granted` or `denied`, required.
fn read_consent(problems: &mut Problems, table: &toml::Table, key: &str) -> Option<Consent> {
    if !table.contains_key(key) {
        problems.push(
            key,
            "missing; Google requires the members' consent with every upload, set it to \
             `granted` or `denied`",
        );
        return None;
    }
    match problems.string(table, Place::Activation, key)?.as_str() {
        "granted" => Some(Consent::Granted),
        "denied" => Some(Consent::Denied),
        other => {
            problems.push(
                key,
                format!("expected `granted` or `denied`, got `{other}`"),
            );
            None
        }
    }
}

/// `identifiers`, a table from field names to member identifiers, in wire order.
fn read_fields(problems: &mut Problems, table: &toml::Table) -> Option<Vec<(Field, String)>> {
    let known: Vec<&str> = Field::ALL.iter().map(|field| field.name()).collect();
    let unknown = format!("unknown Google Ads identifier; known: {}", known.join(", "));
    let example = "{ email = \"email\" }";
    let Some(mut fields) =
        problems.identifier_table(table, "identifiers", example, Field::parse, &unknown)
    else {
        return Some(vec![(Field::Email, "email".to_owned())]);
    };
    let address = fields
        .pairs
        .iter()
        .filter(|(field, _)| Field::ADDRESS.contains(field))
        .count();
    if address != 0 && address != Field::ADDRESS.len() {
        fields.ok = false;
        problems.push(
            "identifiers",
            "Google matches an address only on first_name, last_name, country_code and \
             postal_code together; map all four or none",
        );
    }
    fields.finish(
        problems,
        "identifiers",
        "empty; map at least `email`, `phone` or the four address fields",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Digests computed outside this code with `printf '%s' <text> | sha256sum`.
    /// `johnsmith@gmail.com`
    const SHA256_JOHNSMITH_GMAIL: &str =
        "3586de92bb3636d0885a12eff961429a32e4ebd764b96f50d85d016f9338d586";
    /// `+16505551212`
    const SHA256_PLUS_16505551212: &str =
        "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8";

    #[test]
    fn gmail_addresses_lose_dots_and_plus_suffixes_and_others_keep_them() {
        assert_eq!(
            email(" John.Smith+ads@Gmail.com "),
            Ok("johnsmith@gmail.com".into())
        );
        assert_eq!(
            email("j.smith+x@googlemail.com"),
            Ok("jsmith@googlemail.com".into())
        );
        assert_eq!(
            email("John.Smith+ads@example.com"),
            Ok("john.smith+ads@example.com".into())
        );
        assert_eq!(
            Field::Email.prepare("john.smith@gmail.com"),
            Ok(SHA256_JOHNSMITH_GMAIL.into())
        );
    }

    #[test]
    fn phones_are_hashed_in_e164_with_the_plus() {
        assert_eq!(
            identifiers::phone_e164("+1 (650) 555-1212"),
            Ok("+16505551212".into())
        );
        assert_eq!(
            identifiers::phone_e164("0044 7700 900123"),
            Ok("+447700900123".into())
        );
        assert_eq!(
            Field::Phone.prepare("1-650-555-1212"),
            Ok(SHA256_PLUS_16505551212.into())
        );
    }

    #[test]
    fn country_and_postal_codes_stay_in_clear() {
        assert_eq!(Field::CountryCode.prepare(" gb "), Ok("GB".into()));
        assert_eq!(
            Field::PostalCode.prepare(" SW1A 1AA "),
            Ok("SW1A 1AA".into())
        );
        assert_eq!(
            Field::PostalCode.prepare(SHA256_PLUS_16505551212),
            Err(Invalid::Malformed {
                expected: "a postal code in clear text (Google does not take it hashed)"
            })
        );
    }

    #[test]
    fn operations_are_cut_by_identifier_count() {
        let member = |identifiers| Prepared {
            key: "k",
            user_data: Value::Null,
            identifiers,
        };
        let members = [member(1), member(2), member(1), member(3), member(1)];

        let sizes: Vec<usize> = chunks(&members, 3).iter().map(|c| c.len()).collect();

        assert_eq!(sizes, [2, 1, 1, 1]);
    }

    #[test]
    fn quota_errors_are_rate_limited_with_their_retry_delay() {
        let body = json!({"error": {
            "code": 429,
            "message": "Resource has been exhausted (e.g. check quota).",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{
                "@type": "type.googleapis.com/google.ads.googleads.v24.errors.GoogleAdsFailure",
                "errors": [{
                    "errorCode": {"quotaError": "RESOURCE_TEMPORARILY_EXHAUSTED"},
                    "message": "Too many requests.",
                    "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "retryDelay": "42s"}}
                }],
                "requestId": "r1"
            }]
        }});
        let error = classify_failure(
            "u",
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            body.to_string().as_bytes(),
            SystemTime::now(),
        );

        assert_eq!(
            error,
            DeliveryError::RateLimited {
                message: "u answered 429 Too Many Requests: Too many requests. (quotaError \
                          RESOURCE_TEMPORARILY_EXHAUSTED) (request id r1)"
                    .into(),
                wait: Some(Duration::from_secs(42)),
            }
        );
    }

    #[test]
    fn error_codes_are_classified_by_what_sending_again_would_do() {
        let kind = |status: u16, category: &str, code: &str| {
            let body = json!({"error": {"code": status, "message": "m", "status": "X",
                "details": [{"errors": [{"errorCode": {category: code}, "message": "m"}]}]}});
            let status = StatusCode::from_u16(status).unwrap();
            let error = classify_failure(
                "u",
                status,
                &HeaderMap::new(),
                body.to_string().as_bytes(),
                SystemTime::now(),
            );
            crate::error_kind(&error)
        };

        assert_eq!(
            kind(409, "databaseError", "CONCURRENT_MODIFICATION"),
            "retryable"
        );
        assert_eq!(
            kind(401, "authenticationError", "OAUTH_TOKEN_EXPIRED"),
            "auth"
        );
        assert_eq!(
            kind(403, "authorizationError", "DEVELOPER_TOKEN_NOT_APPROVED"),
            "auth"
        );
        assert_eq!(
            kind(403, "authorizationError", "USER_PERMISSION_DENIED"),
            "permanent"
        );
        assert_eq!(
            kind(400, "offlineUserDataJobError", "CONFLICTING_OPERATION"),
            "permanent"
        );
        assert_eq!(kind(500, "internalError", "INTERNAL_ERROR"), "retryable");
        assert_eq!(
            kind(400, "quotaError", "RESOURCE_EXHAUSTED"),
            "rate limited"
        );
    }
}
