//! The `meta` connector: members of a Meta (Facebook/Instagram) customer-file Custom Audience.
//!
//! This module owns the requests (`POST {base_url}/{api_version}/{audience_id}/users` for adds,
//! `DELETE` on the same edge for removes, `POST .../{audience_id}/usersreplace` for the batches
//! of a replace; each a multi-key `payload` of SHA-256 rows and a `session`), the preparation
//! of rows from members' identifiers through [`crate::identifiers`], the sessions of replaces,
//! and the classification of Graph API answers. It does not create audiences, check an
//! audience's `operation_status` beforehand, or retry; [`crate::deliver_with_retries`] does
//! that.
//!
//! The body sent, as JSON (the access token travels in the body, never in the URL):
//!
//! ```json
//! {"access_token": "...",
//!  "payload": {"schema": ["EMAIL", "PHONE"], "data": [["<sha256>", ""]]},
//!  "session": {"session_id": 123, "batch_seq": 1, "last_batch_flag": true,
//!              "estimated_num_total": 1}}
//! ```
//!
//! Each add or remove batch is its own session: one request, `batch_seq` 1, `last_batch_flag`
//! true. Its session id is derived from the batch identity, so a batch sent again after a
//! timeout reuses its session.
//!
//! A replace is one Meta session across all its batches, sent to `usersreplace` with the same
//! payload, schema and rows as an add: `session_id` is the replace's session and
//! `estimated_num_total` the replace's member count. Meta swaps the audience's whole
//! membership for the rows of the session once a request with `last_batch_flag` true closes
//! it, whatever it counted of those rows: closing a session whose every row Meta counted as
//! invalid empties the audience. So every batch, the last one too, is sent with
//! `last_batch_flag` false, and the last batch then closes the session with one more request:
//! one row Meta accepted earlier in the session, sent again (harmless within it), with
//! `last_batch_flag` true. The row is one of a request Meta counted no row of as invalid when
//! there is one. When Meta accepted no row of the session (it counted every row as invalid, or
//! no member had a usable identifier), the last batch fails as a permanent failure instead and
//! the session is never closed: nothing is replaced. The last batch's outcome is its own
//! members', as Meta answered their rows; the closing request carries no member of its own.
//!
//! `batch_seq` counts the requests the session has actually sent, from 1: a batch none of whose
//! members has a usable identifier sends no rows of its own, so it takes no `batch_seq` and
//! leaves no gap for Meta to wait on; the closing request takes the next one. A request keeps
//! the `batch_seq` it was first given, so one sent again (after a timeout, a `5xx`) repeats it,
//! and a request Meta answered is not sent again: a last batch sent again after its closing
//! request failed sends only the closing request.
//!
//! What each session has sent (the `batch_seq` of each request, Meta's answer to it once one
//! came, one accepted row) is kept in memory only; a replace begun again after an interruption
//! comes with a new session and starts from its first batch, so nothing of an earlier attempt
//! is needed. Meta's "audience size too low" refusal rejects the members of a remove; on a
//! replace it is a permanent failure, as on an add.
//!
//! Meta reports invalid rows as a count (`num_invalid_entries`) and a few samples, never as a
//! list of rows. A request in which every row is invalid rejects every member sent; a request
//! with some invalid rows accepts every member and logs the count, because which members were
//! invalid is not known.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest, Sha256};

use crate::http::{self, Secret, quote};
use crate::identifiers::{self, Invalid};
use crate::members;
use crate::settings::{self, Limit, Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Member, Outcome, Rejection, Replace,
    SettingsError,
};

/// Connection keys the Meta connector knows.
const CONNECTION_KEYS: &[&str] = &[
    "access_token_env",
    "base_url",
    "api_version",
    "batch_size",
    "timeout_seconds",
];
/// Activation keys the Meta connector knows.
const ACTIVATION_KEYS: &[&str] = &["audience_id", "schema"];
/// The Graph API host.
const DEFAULT_BASE_URL: &str = "https://graph.facebook.com";
/// The Graph API version used unless `api_version` says otherwise.
const DEFAULT_API_VERSION: &str = "v25.0";
/// How much of an answer is read at most; Meta's answers to this edge are small.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// The audience below which Meta refuses removals, as observed; activations may override it.
const MIN_AUDIENCE_SIZE: u64 = 100;
/// `batch_size`: the most rows Meta takes in one request, and the default.
const BATCH_SIZE: Limit = Limit {
    default: 10_000,
    max: 10_000,
};
/// `timeout_seconds`, seconds a request may take.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 60,
    max: 3600,
};
/// The schema used when an activation sets none: hashed e-mail from the `email` identifier.
const DEFAULT_SCHEMA: &[(SchemaKey, &str)] = &[(SchemaKey::Email, "email")];

/// A key of Meta's customer-file schema. Columns are always sent in the order declared here,
/// whatever order the activation's `schema` table lists them in, so that a removal sends the
/// same rows as the add it undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SchemaKey {
    ExternId,
    Email,
    Phone,
    Gender,
    BirthYear,
    BirthMonth,
    BirthDay,
    LastName,
    FirstName,
    FirstInitial,
    City,
    State,
    Zip,
    Madid,
    Country,
}

impl SchemaKey {
    const ALL: [SchemaKey; 15] = [
        SchemaKey::ExternId,
        SchemaKey::Email,
        SchemaKey::Phone,
        SchemaKey::Gender,
        SchemaKey::BirthYear,
        SchemaKey::BirthMonth,
        SchemaKey::BirthDay,
        SchemaKey::LastName,
        SchemaKey::FirstName,
        SchemaKey::FirstInitial,
        SchemaKey::City,
        SchemaKey::State,
        SchemaKey::Zip,
        SchemaKey::Madid,
        SchemaKey::Country,
    ];

    /// The key's name on the wire and in the `schema` setting.
    fn name(self) -> &'static str {
        match self {
            SchemaKey::ExternId => "EXTERN_ID",
            SchemaKey::Email => "EMAIL",
            SchemaKey::Phone => "PHONE",
            SchemaKey::Gender => "GEN",
            SchemaKey::BirthYear => "DOBY",
            SchemaKey::BirthMonth => "DOBM",
            SchemaKey::BirthDay => "DOBD",
            SchemaKey::LastName => "LN",
            SchemaKey::FirstName => "FN",
            SchemaKey::FirstInitial => "FI",
            SchemaKey::City => "CT",
            SchemaKey::State => "ST",
            SchemaKey::Zip => "ZIP",
            SchemaKey::Madid => "MADID",
            SchemaKey::Country => "COUNTRY",
        }
    }

    fn parse(name: &str) -> Option<SchemaKey> {
        SchemaKey::ALL.into_iter().find(|key| key.name() == name)
    }

    /// The value sent for `raw`: SHA-256 of the normalised text, except for `EXTERN_ID` and
    /// `MADID`, sent trimmed in clear. `country` is the member's raw country, which decides
    /// how a ZIP code is cut.
    fn prepare(self, raw: &str, country: Option<&str>) -> Result<String, Invalid> {
        use identifiers::hash_normalised as hash;
        match self {
            SchemaKey::ExternId | SchemaKey::Madid => identifiers::clear(raw),
            SchemaKey::Email => hash(raw, identifiers::email),
            SchemaKey::Phone => hash(raw, identifiers::phone_digits),
            SchemaKey::Gender => hash(raw, identifiers::gender),
            SchemaKey::BirthYear => hash(raw, identifiers::birth_year),
            SchemaKey::BirthMonth => hash(raw, identifiers::birth_month),
            SchemaKey::BirthDay => hash(raw, identifiers::birth_day),
            SchemaKey::LastName | SchemaKey::FirstName | SchemaKey::City | SchemaKey::State => {
                hash(raw, identifiers::letters)
            }
            SchemaKey::FirstInitial => hash(raw, identifiers::first_initial),
            SchemaKey::Zip => hash(raw, |raw| identifiers::zip(raw, country)),
            SchemaKey::Country => hash(raw, identifiers::country),
        }
    }
}

/// Adds, removes and replaces the members of one Meta Custom Audience.
///
/// Connection settings:
/// - `access_token_env` (required): the environment variable holding the access token (a
///   system-user token is recommended; user tokens expire); the engine passes its value as the
///   `access_token` secret.
/// - `base_url`: the Graph API host, default `https://graph.facebook.com`.
/// - `api_version`: the Graph API version, `v<major>.<minor>`, default `v25.0`.
/// - `batch_size`: rows per request, 1 to 10000, default 10000.
/// - `timeout_seconds`: per request, default 60.
///
/// Activation settings:
/// - `audience_id` (required): the Custom Audience's numeric id, as a string or an integer.
/// - `schema`: a table from Meta schema keys (`EXTERN_ID`, `EMAIL`, `PHONE`, `GEN`, `DOBY`,
///   `DOBM`, `DOBD`, `LN`, `FN`, `FI`, `CT`, `ST`, `ZIP`, `MADID`, `COUNTRY`) to the member
///   identifier each is read from, default `{ EMAIL = "email" }`.
#[derive(Debug, Clone)]
pub struct MetaConnector {
    /// The HTTP client, with the connection's timeout.
    client: reqwest::Client,
    /// `{base_url}/{api_version}/{audience_id}/users`; carries no credential.
    users_url: Url,
    /// `{base_url}/{api_version}/{audience_id}/usersreplace`; carries no credential.
    replace_url: Url,
    /// The access token, sent in the request body.
    access_token: Secret,
    /// Schema keys in wire order, each with the member identifier it is read from.
    schema: Vec<(SchemaKey, String)>,
    /// Rows per request (`batch_size`).
    batch_size: usize,
    /// What each replace session has sent so far, by the replace's `session`.
    replaces: Arc<Mutex<BTreeMap<u64, ReplaceSession>>>,
}

/// What one replace session has sent to Meta so far, and what Meta answered.
#[derive(Debug, Default)]
struct ReplaceSession {
    /// The request of each batch (by its sequence) that sent rows of its own.
    batches: BTreeMap<u32, SentRequest>,
    /// The request closing the session, once it has been made.
    closing: Option<SentRequest>,
    /// How many `batch_seq`s the session has given out; the next request takes one more.
    batch_seqs: u64,
    /// A row Meta accepted in the session, to close it with; `None` while Meta has accepted
    /// none.
    accepted_row: Option<AcceptedRow>,
}

impl ReplaceSession {
    /// Keeps a row of `rows`, which Meta answered with `answer`, to close the session with:
    /// the first row Meta accepted in a request it counted no row of as invalid, or else the
    /// first of a request in which it counted only some.
    fn remember_accepted(&mut self, rows: &[Vec<String>], answer: &Answer) {
        let Answer::Accepted { invalid } = *answer else {
            return;
        };
        let Some(row) = rows.first() else {
            return;
        };
        let certain = invalid == 0;
        if self
            .accepted_row
            .as_ref()
            .is_none_or(|kept| certain && !kept.certain)
        {
            self.accepted_row = Some(AcceptedRow {
                row: row.clone(),
                certain,
            });
        }
    }
}

/// One request a replace session has made.
#[derive(Debug)]
struct SentRequest {
    /// Its `batch_seq`; the request keeps it when it is sent again.
    batch_seq: u64,
    /// Meta's answer, once one came (never [`Answer::Failed`]); a request Meta answered is not
    /// sent again.
    answer: Option<Answer>,
}

impl SentRequest {
    /// A request taking the session's next `batch_seq`, of the `given` so far.
    fn next(given: &mut u64) -> SentRequest {
        *given += 1;
        SentRequest {
            batch_seq: *given,
            answer: None,
        }
    }
}

/// A row Meta accepted in a replace session.
#[derive(Debug)]
struct AcceptedRow {
    /// The row, in schema order.
    row: Vec<String>,
    /// Whether Meta counted no row of its request as invalid, so this one is known accepted;
    /// otherwise Meta accepted only some rows of its request, not saying which.
    certain: bool,
}

/// One request to Meta, ready to send.
struct Request<'a> {
    /// `POST` or `DELETE`.
    method: Method,
    /// The edge: `users` or `usersreplace`.
    url: &'a Url,
    /// The rows, in schema order.
    rows: Vec<Vec<String>>,
    /// The `session` object.
    session: serde_json::Value,
}

/// The connection's settings, checked.
struct ConnectionSettings {
    /// The HTTP client, with `timeout_seconds` applied.
    client: reqwest::Client,
    /// `base_url`, or the Graph API host.
    base_url: Url,
    /// `api_version`, such as `v25.0`.
    api_version: String,
    /// The value of the variable `access_token_env` names.
    access_token: Secret,
    /// `batch_size`.
    batch_size: usize,
}

/// The activation's settings, checked.
struct ActivationSettings {
    /// `audience_id`, digits only.
    audience_id: String,
    /// `schema`, in wire order.
    schema: Vec<(SchemaKey, String)>,
}

impl MetaConnector {
    /// Builds the connector from its connection and activation settings and the resolved
    /// secrets (`access_token`), returning every problem found.
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

    fn new(connection: ConnectionSettings, activation: ActivationSettings) -> MetaConnector {
        let edge = |name: &str| {
            let path = [&connection.api_version, &activation.audience_id, name];
            http::endpoint(&connection.base_url, &path)
        };
        MetaConnector {
            client: connection.client,
            users_url: edge("users"),
            replace_url: edge("usersreplace"),
            access_token: connection.access_token,
            schema: activation.schema,
            batch_size: connection.batch_size,
            replaces: Arc::default(),
        }
    }

    /// Sends one batch once and classifies the answer.
    async fn send(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let (rows, outcome) = self.prepare(batch);
        match batch.change {
            Change::Add => self.send_change(batch, Method::POST, rows, outcome).await,
            Change::Remove => self.send_change(batch, Method::DELETE, rows, outcome).await,
            Change::Replace => self.send_replace(batch, rows, outcome).await,
        }
    }

    /// Sends an add or a remove as its own one-request session; sends nothing when no member
    /// has a usable row.
    async fn send_change(
        &self,
        batch: &Batch,
        method: Method,
        rows: Vec<(&str, Vec<String>)>,
        outcome: Outcome,
    ) -> Result<Outcome, DeliveryError> {
        if rows.is_empty() {
            return Ok(outcome);
        }
        let session = serde_json::json!({
            "session_id": session_id(batch),
            "batch_seq": 1,
            "last_batch_flag": true,
            "estimated_num_total": rows.len(),
        });
        let (keys, rows): (Vec<&str>, _) = rows.into_iter().unzip();
        let request = Request {
            method,
            url: &self.users_url,
            rows,
            session,
        };

        let answer = self.call(batch, &request).await;
        settle(outcome, &keys, answer)
    }

    /// Sends one batch of a replace: its own rows, in the session without closing it, then,
    /// for the last batch, the request that closes the session.
    async fn send_replace(
        &self,
        batch: &Batch,
        rows: Vec<(&str, Vec<String>)>,
        mut outcome: Outcome,
    ) -> Result<Outcome, DeliveryError> {
        let (replace, session_id) = replace_session(batch)?;
        let (keys, rows): (Vec<&str>, Vec<Vec<String>>) = rows.into_iter().unzip();

        if !rows.is_empty() {
            let answer = self
                .send_replace_rows(batch, replace, session_id, rows)
                .await;
            outcome = settle(outcome, &keys, answer)?;
        }
        if batch.ends_replace() {
            self.close_replace(batch, replace, session_id).await?;
        }
        Ok(outcome)
    }

    /// Sends the rows of one batch of a replace with `last_batch_flag` false, or gives the
    /// answer Meta already gave them: a batch sent again repeats its request, with its
    /// `batch_seq`, only while Meta has not answered it.
    async fn send_replace_rows(
        &self,
        batch: &Batch,
        replace: Replace,
        session_id: i64,
        rows: Vec<Vec<String>>,
    ) -> Answer {
        let batch_seq = {
            let mut sessions = self.sessions();
            let session = sessions.entry(replace.session).or_default();
            let sent = session
                .batches
                .entry(batch.sequence)
                .or_insert_with(|| SentRequest::next(&mut session.batch_seqs));
            if let Some(answer) = &sent.answer {
                return answer.clone();
            }
            sent.batch_seq
        };
        let request = self.replace_request(replace, session_id, batch_seq, false, rows);

        let answer = self.call(batch, &request).await;
        if !matches!(answer, Answer::Failed(_)) {
            let mut sessions = self.sessions();
            let session = sessions.entry(replace.session).or_default();
            session.remember_accepted(&request.rows, &answer);
            if let Some(sent) = session.batches.get_mut(&batch.sequence) {
                sent.answer = Some(answer.clone());
            }
        }
        answer
    }

    /// Closes a replace session once its last batch's rows are answered: sends again one row
    /// Meta accepted in the session (harmless within it) with `last_batch_flag` true and the
    /// next `batch_seq`. Fails without closing when Meta accepted no row of the session, as the
    /// audience would be emptied.
    async fn close_replace(
        &self,
        batch: &Batch,
        replace: Replace,
        session_id: i64,
    ) -> Result<(), DeliveryError> {
        let (batch_seq, row) = {
            let mut sessions = self.sessions();
            let session = sessions.entry(replace.session).or_default();
            if session
                .closing
                .as_ref()
                .is_some_and(|closing| closing.answer.is_some())
            {
                return Ok(());
            }
            let Some(accepted) = &session.accepted_row else {
                let sent = !session.batches.is_empty();
                return Err(would_empty(batch, replace, sent));
            };
            let row = accepted.row.clone();
            let closing = session
                .closing
                .get_or_insert_with(|| SentRequest::next(&mut session.batch_seqs));
            (closing.batch_seq, row)
        };
        tracing::debug!(
            activation = %batch.activation,
            session = replace.session,
            sequence = batch.sequence,
            batch_seq,
            "closing the meta session of the replace with a row it already holds"
        );
        let request = self.replace_request(replace, session_id, batch_seq, true, vec![row]);

        // A 2xx is taken as the session closed, whatever Meta counts of the row.
        let answer = self.call(batch, &request).await;
        match &answer {
            Answer::Failed(error) => return Err(error.clone()),
            Answer::Rejected(_) => tracing::warn!(
                activation = %batch.activation,
                session = replace.session,
                batch_seq,
                "meta counted the row closing the replace session as invalid; taking the session \
                 as closed"
            ),
            Answer::Accepted { .. } => {}
        }
        let mut sessions = self.sessions();
        if let Some(closing) = sessions
            .get_mut(&replace.session)
            .and_then(|session| session.closing.as_mut())
        {
            closing.answer = Some(answer);
        }
        Ok(())
    }

    /// A request of a replace session to `usersreplace`.
    fn replace_request(
        &self,
        replace: Replace,
        session_id: i64,
        batch_seq: u64,
        last: bool,
        rows: Vec<Vec<String>>,
    ) -> Request<'_> {
        Request {
            method: Method::POST,
            url: &self.replace_url,
            rows,
            session: serde_json::json!({
                "session_id": session_id,
                "batch_seq": batch_seq,
                "last_batch_flag": last,
                "estimated_num_total": replace.members,
            }),
        }
    }

    /// The replace sessions, locked.
    fn sessions(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ReplaceSession>> {
        self.replaces.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one request and reads Meta's answer.
    async fn call(&self, batch: &Batch, request: &Request<'_>) -> Answer {
        let body = serde_json::json!({
            "access_token": self.access_token.expose(),
            "payload": {
                "schema": self.schema.iter().map(|(key, _)| key.name()).collect::<Vec<_>>(),
                "data": request.rows,
            },
            "session": request.session,
        });
        let response = match self
            .client
            .request(request.method.clone(), request.url.clone())
            .json(&body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => {
                return Answer::Failed(http::transport_failure(
                    request.method.as_str(),
                    request.url.as_str(),
                    error,
                ));
            }
        };

        let status = response.status();
        let headers = response.headers().clone();
        let body = http::body_start(response, MAX_ANSWER_BYTES).await;
        self.read_answer(
            batch,
            request.url,
            status,
            &headers,
            &body,
            request.rows.len(),
        )
    }

    /// The row of each member that has at least one usable identifier, with its key, and an
    /// outcome holding a rejection for every member that has none.
    fn prepare<'a>(&self, batch: &'a Batch) -> (Vec<(&'a str, Vec<String>)>, Outcome) {
        members::prepare(batch, "meta", "identifier", |member| {
            Ok((member.key.as_str(), self.row(member)?))
        })
    }

    /// One member's row in schema order, `""` for each identifier that is missing or invalid;
    /// the reasons when none is usable.
    fn row(&self, member: &Member) -> Result<Vec<String>, String> {
        let country = self
            .schema
            .iter()
            .find(|(key, _)| *key == SchemaKey::Country)
            .and_then(|(_, identifier)| member.identifiers.get(identifier))
            .map(String::as_str);
        let mut row = Vec::with_capacity(self.schema.len());
        let mut reasons = Vec::new();
        for (key, identifier) in &self.schema {
            let prepared = match member.identifiers.get(identifier) {
                Some(raw) => key.prepare(raw, country),
                None => Err(Invalid::Missing),
            };
            match prepared {
                Ok(value) => row.push(value),
                Err(invalid) => {
                    reasons.push(format!("{} (`{identifier}`) {invalid}", key.name()));
                    row.push(String::new());
                }
            }
        }
        if row.iter().all(String::is_empty) {
            Err(format!("no usable identifier: {}", reasons.join("; ")))
        } else {
            Ok(row)
        }
    }

    /// What Meta's answer to a request of `sent` rows means for them.
    fn read_answer(
        &self,
        batch: &Batch,
        url: &Url,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        sent: usize,
    ) -> Answer {
        let message = format!("{url} answered {status}");
        let envelope = serde_json::from_slice::<ErrorEnvelope>(body);
        if status.is_success() && envelope.is_err() {
            return read_counts(batch, body, sent, message);
        }
        // A 2xx carrying a Graph error envelope is that error, whatever the status says.
        match envelope {
            Ok(envelope) => classify_graph_error(
                batch.change,
                status,
                headers,
                &envelope.error,
                message,
                SystemTime::now(),
            ),
            Err(_) => Answer::Failed(classify_bare_failure(
                status,
                headers,
                body,
                message,
                SystemTime::now(),
            )),
        }
    }
}

impl Connector for MetaConnector {
    fn destination(&self) -> Option<String> {
        Some(format!("the Meta audience at {}", self.users_url))
    }

    fn kind(&self) -> &'static str {
        "meta"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    /// Meta refuses removals that would leave an audience too small to target ("Audience Size
    /// too low"); the floor it applies is not documented, about 100 people is what it is seen
    /// to use, so the engine holds removals below that instead of failing them.
    fn min_audience_size(&self) -> Option<u64> {
        Some(MIN_AUDIENCE_SIZE)
    }

    /// A replace goes to `usersreplace`, one Meta session across its batches.
    fn replaces_lists(&self) -> bool {
        true
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.send(batch))
    }
}

/// What an answer means for the rows sent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Every row sent is accepted, though Meta counted this many of them as invalid (it does
    /// not say which).
    Accepted { invalid: u64 },
    /// Every row sent is rejected, for this reason.
    Rejected(String),
    /// The request failed as a whole.
    Failed(DeliveryError),
}

/// The counts of a successful answer; an answer without `num_received` is not one.
#[derive(serde::Deserialize)]
struct Counts {
    num_received: u64,
    #[serde(default)]
    num_invalid_entries: u64,
}

/// Graph API's error envelope.
#[derive(serde::Deserialize)]
struct ErrorEnvelope {
    error: GraphError,
}

/// The fields of a Graph API error this connector reads.
#[derive(Debug, Default, serde::Deserialize)]
struct GraphError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    error_subcode: Option<i64>,
    #[serde(default)]
    is_transient: Option<bool>,
    #[serde(default)]
    fbtrace_id: Option<String>,
}

impl GraphError {
    /// `(#17) User request limit reached (code 17, subcode 2446079, fbtrace_id AbC)`.
    fn describe(&self) -> String {
        let mut details = Vec::new();
        if let Some(code) = self.code {
            details.push(format!("code {code}"));
        }
        if let Some(subcode) = self.error_subcode {
            details.push(format!("subcode {subcode}"));
        }
        if let Some(trace) = &self.fbtrace_id {
            details.push(format!("fbtrace_id {trace}"));
        }
        format!(
            "{} ({})",
            quote(&http::redact_addresses(&self.message)),
            details.join(", ")
        )
    }
}

/// Reads `num_received` / `num_invalid_entries` of a 2xx answer; one without readable counts
/// says nothing of what Meta did and is retryable (the audience is a set: sending again is safe).
fn read_counts(batch: &Batch, body: &[u8], sent: usize, message: String) -> Answer {
    let counts = match serde_json::from_slice::<Counts>(body) {
        Ok(counts) => counts,
        Err(error) => {
            tracing::warn!(
                activation = %batch.activation,
                change = batch.change.as_str(),
                sequence = batch.sequence,
                sent,
                "meta answered 2xx without readable counts; sending the batch again"
            );
            let text = String::from_utf8_lossy(body);
            let said = if text.trim_start().starts_with('<') {
                "an HTML page".to_owned()
            } else {
                format!(
                    "`{}` ({})",
                    quote(&http::redact_addresses(&text)),
                    http::redact_addresses(&error.to_string())
                )
            };
            return Answer::Failed(DeliveryError::Retryable {
                message: format!("{message} without readable counts: {said}"),
            });
        }
    };
    let invalid = counts.num_invalid_entries;
    if invalid > 0 && invalid >= sent as u64 {
        return Answer::Rejected(format!(
            "Meta counted every row of the request as invalid ({invalid} of {sent}); check the \
             identifier mapping in `schema`"
        ));
    }
    if invalid > 0 || counts.num_received != sent as u64 {
        tracing::warn!(
            activation = %batch.activation,
            change = batch.change.as_str(),
            sequence = batch.sequence,
            sent,
            received = counts.num_received,
            invalid,
            "meta counted some rows as invalid without saying which; counting every row as \
             accepted"
        );
    }
    Answer::Accepted { invalid }
}

/// `outcome` with the members of `keys`, the rows of one request, accepted or rejected as
/// `answer` says; the request's failure when it failed.
fn settle(mut outcome: Outcome, keys: &[&str], answer: Answer) -> Result<Outcome, DeliveryError> {
    match answer {
        Answer::Accepted { .. } => outcome
            .accepted
            .extend(keys.iter().map(|key| key.to_string())),
        Answer::Rejected(reason) => outcome.rejected.extend(keys.iter().map(|key| Rejection {
            key: key.to_string(),
            reason: reason.clone(),
        })),
        Answer::Failed(error) => return Err(error),
    }
    Ok(outcome)
}

/// The replace of a replace batch, with its session as a Meta `session_id`; a permanent
/// failure, before anything is sent, when it has none or one Meta cannot take.
fn replace_session(batch: &Batch) -> Result<(Replace, i64), DeliveryError> {
    let Some(replace) = batch.replace else {
        return Err(DeliveryError::Permanent {
            message: format!(
                "replace batch {} of `{}` carries no replace session; nothing was sent",
                batch.sequence, batch.activation
            ),
        });
    };
    let session_id = i64::try_from(replace.session)
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| DeliveryError::Permanent {
            message: format!(
                "replace session {} of `{}` is not a Meta session id (1 to 2^63 - 1); nothing \
                 was sent",
                replace.session, batch.activation
            ),
        })?;
    Ok((replace, session_id))
}

/// The meaning of a Graph API error envelope.
fn classify_graph_error(
    change: Change,
    status: StatusCode,
    headers: &HeaderMap,
    error: &GraphError,
    message: String,
    now: SystemTime,
) -> Answer {
    let message = format!("{message}: {}", error.describe());
    let code = error.code.unwrap_or(0);
    let failure = match code {
        190 | 102 => DeliveryError::Auth {
            message: format!("{message}; renew the access token"),
        },
        // Permissions: sending again cannot succeed until an operator grants them.
        10 | 200..=299 => DeliveryError::Auth {
            message: format!(
                "{message}; the access token lacks a permission this call needs, check its \
                 scopes and the system user's role on the ad account"
            ),
        },
        100 if error.error_subcode == Some(33) => DeliveryError::Auth {
            message: format!(
                "{message}; the access token's system user has no permission on the audience, \
                 assign the audience to it in Business Manager"
            ),
        },
        4 | 17 | 32 | 613 | 80_000..=80_014 => DeliveryError::RateLimited {
            wait: usage_wait(headers).or_else(|| http::retry_after(headers, now)),
            message,
        },
        1 | 2 => DeliveryError::Retryable { message },
        _ if error.is_transient == Some(true) => DeliveryError::Retryable { message },
        _ if change == Change::Remove && is_audience_too_small(&error.message) => {
            return Answer::Rejected(
                "Meta refused the removal because the audience would become too small; remove \
                 again once the audience has grown"
                    .to_owned(),
            );
        }
        _ if status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED => {
            DeliveryError::Retryable { message }
        }
        _ => DeliveryError::Permanent { message },
    };
    Answer::Failed(failure)
}

/// The failure of a replace's last batch when Meta accepted no row of the session, which
/// closing would leave empty; `sent` says whether the session sent any rows (Meta counted every
/// one as invalid) or none (no member had a usable identifier).
fn would_empty(batch: &Batch, replace: Replace, sent: bool) -> DeliveryError {
    let (why, what) = if sent {
        (
            "Meta counted every row the replace sent as invalid",
            "its session was left unclosed",
        )
    } else {
        (
            "no member of the replace has a usable identifier",
            "nothing was sent",
        )
    };
    DeliveryError::Permanent {
        message: format!(
            "{why} ({} members in {} batches for `{}`), so the replace would empty the \
             audience; {what}, nothing was replaced and the audience keeps its members. Check \
             the activation's `schema` and the identifiers it maps",
            replace.members, replace.batches, batch.activation
        ),
    }
}

/// True for Meta's refusal to remove users from an audience that would become too small.
fn is_audience_too_small(message: &str) -> bool {
    let message = message.to_lowercase();
    message.contains("audience size too low") || message.contains("cannot remove users")
}

/// The meaning of a failed answer without a Graph API error envelope (an HTML error page, a
/// proxy's answer, an empty body).
fn classify_bare_failure(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    message: String,
    now: SystemTime,
) -> DeliveryError {
    let text = String::from_utf8_lossy(body);
    let is_html = text.trim_start().starts_with('<');
    let message = if is_html {
        format!("{message} with an HTML page instead of a Graph API error")
    } else {
        format!("{message}: {}", quote(&http::redact_addresses(&text)))
    };
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: http::retry_after(headers, now),
            message,
        },
        401 => DeliveryError::Auth { message },
        413 | 414 => DeliveryError::Permanent {
            message: format!("{message}; the request is too large, lower `batch_size`"),
        },
        408 | 500 | 502..=599 if is_html => DeliveryError::Retryable {
            message: format!(
                "{message}; Meta also answers oversized requests this way, lower `batch_size` if \
                 it persists"
            ),
        },
        408 | 500 | 502..=599 => DeliveryError::Retryable { message },
        _ => DeliveryError::Permanent { message },
    }
}

/// The longest `estimated_time_to_regain_access` (minutes) in an `X-Business-Use-Case-Usage`
/// header, `{"<id>": [{"type": ..., "estimated_time_to_regain_access": 5}]}`; `None` when the
/// header is absent, unreadable or asks for no wait.
fn usage_wait(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("x-business-use-case-usage")?.to_str().ok()?;
    let usage: BTreeMap<String, Vec<serde_json::Value>> = serde_json::from_str(text).ok()?;
    let minutes = usage
        .values()
        .flatten()
        .filter_map(|entry| entry.get("estimated_time_to_regain_access")?.as_u64())
        .max()?;
    (minutes > 0).then(|| Duration::from_secs(minutes.saturating_mul(60)))
}

/// A positive 63-bit session id derived from the batch identity, stable across restarts.
fn session_id(batch: &Batch) -> i64 {
    let identity = format!(
        "{}\n{}\n{}\n{}",
        batch.run_id,
        batch.activation,
        batch.change.as_str(),
        batch.sequence
    );
    let digest = Sha256::digest(identity.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let id = i64::try_from(u64::from_be_bytes(first) >> 1).expect("63 bits fit an i64");
    id.max(1)
}

/// The checked connection settings, `None` when any is wrong (the problems say which).
fn read_connection(
    problems: &mut Problems,
    table: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<ConnectionSettings> {
    problems.reject_unknown_keys(table, Place::Connection, CONNECTION_KEYS);
    let access_token = problems.secret(
        table,
        secrets,
        "access_token",
        "a Meta access token with ads_management permission",
    );
    let base_url = problems.base_url(table, DEFAULT_BASE_URL);
    let api_version = read_api_version(problems, table);
    let batch_size = problems.batch_size(table, BATCH_SIZE);
    let client = problems.http_client(table, "base_url", TIMEOUT_SECONDS);
    Some(ConnectionSettings {
        client: client?,
        base_url: base_url?,
        api_version: api_version?,
        access_token: Secret(access_token?),
        batch_size,
    })
}

/// `api_version`, `v<major>.<minor>`, or the default.
fn read_api_version(problems: &mut Problems, table: &toml::Table) -> Option<String> {
    if !table.contains_key("api_version") {
        return Some(DEFAULT_API_VERSION.to_owned());
    }
    let version = problems.string(table, Place::Connection, "api_version")?;
    let shaped = version
        .strip_prefix('v')
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(major, minor)| {
            [major, minor]
                .iter()
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
        });
    if shaped {
        Some(version)
    } else {
        problems.push(
            "api_version",
            format!(
                "expected a Graph API version such as `{DEFAULT_API_VERSION}`, got `{version}`"
            ),
        );
        None
    }
}

/// The checked activation settings, `None` when any is wrong (the problems say which).
fn read_activation(problems: &mut Problems, table: &toml::Table) -> Option<ActivationSettings> {
    problems.reject_unknown_keys(table, Place::Activation, ACTIVATION_KEYS);
    let audience_id = problems.numeric_id(
        table,
        "audience_id",
        "missing; set it to the Custom Audience's numeric id",
        "expected the Custom Audience's numeric id, digits only",
    );
    let schema = read_schema(problems, table);
    Some(ActivationSettings {
        audience_id: audience_id?,
        schema: schema?,
    })
}

/// `schema`, a table from Meta schema keys to member identifiers, in wire order.
fn read_schema(problems: &mut Problems, table: &toml::Table) -> Option<Vec<(SchemaKey, String)>> {
    let known: Vec<&str> = SchemaKey::ALL.iter().map(|key| key.name()).collect();
    let unknown = format!("unknown Meta schema key; known keys: {}", known.join(", "));
    let example = "{ EMAIL = \"email\" }";
    let Some(schema) =
        problems.identifier_table(table, "schema", example, SchemaKey::parse, &unknown)
    else {
        return Some(
            DEFAULT_SCHEMA
                .iter()
                .map(|(key, identifier)| (*key, identifier.to_string()))
                .collect(),
        );
    };
    schema.finish(
        problems,
        "schema",
        "empty; map at least one Meta schema key to an identifier",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(change: Change, sequence: u32) -> Batch {
        Batch {
            run_id: 42,
            activation: "vip/meta".into(),
            change,
            sequence,
            members: Vec::new(),
            replace: None,
        }
    }

    fn graph_error(code: i64, message: &str) -> GraphError {
        GraphError {
            message: message.into(),
            code: Some(code),
            ..GraphError::default()
        }
    }

    fn kind(answer: &Answer) -> &'static str {
        match answer {
            Answer::Accepted { .. } => "accepted",
            Answer::Rejected(_) => "rejected",
            Answer::Failed(DeliveryError::Retryable { .. }) => "retryable",
            Answer::Failed(DeliveryError::RateLimited { .. }) => "rate limited",
            Answer::Failed(DeliveryError::Auth { .. }) => "auth",
            Answer::Failed(DeliveryError::Permanent { .. }) => "permanent",
        }
    }

    #[test]
    fn graph_error_codes_are_classified_by_what_sending_again_would_do() {
        let classify = |code: i64| {
            let error = graph_error(code, "something");
            let answer = classify_graph_error(
                Change::Add,
                StatusCode::BAD_REQUEST,
                &HeaderMap::new(),
                &error,
                String::new(),
                SystemTime::now(),
            );
            (code, kind(&answer))
        };

        let kinds: Vec<(i64, &str)> = [1, 2, 4, 10, 17, 32, 100, 102, 190, 200, 613, 80003, 80015]
            .into_iter()
            .map(classify)
            .collect();

        assert_eq!(
            kinds,
            [
                (1, "retryable"),
                (2, "retryable"),
                (4, "rate limited"),
                (10, "auth"),
                (17, "rate limited"),
                (32, "rate limited"),
                (100, "permanent"),
                (102, "auth"),
                (190, "auth"),
                (200, "auth"),
                (613, "rate limited"),
                (80003, "rate limited"),
                (80015, "permanent"),
            ]
        );
    }

    #[test]
    fn a_transient_flag_makes_an_unknown_code_retryable() {
        let error = GraphError {
            is_transient: Some(true),
            ..graph_error(9999, "try later")
        };

        let answer = classify_graph_error(
            Change::Add,
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            &error,
            String::new(),
            SystemTime::now(),
        );

        assert_eq!(kind(&answer), "retryable");
    }

    #[test]
    fn audience_too_small_rejects_a_removal_and_fails_an_add_or_a_replace() {
        let error = graph_error(
            2650,
            "Audience Size too low: cannot remove users from this audience",
        );
        let classify = |change| {
            classify_graph_error(
                change,
                StatusCode::BAD_REQUEST,
                &HeaderMap::new(),
                &error,
                String::new(),
                SystemTime::now(),
            )
        };

        assert_eq!(kind(&classify(Change::Remove)), "rejected");
        assert_eq!(kind(&classify(Change::Add)), "permanent");
        assert_eq!(kind(&classify(Change::Replace)), "permanent");
    }

    #[test]
    fn the_usage_header_wait_is_its_largest_estimate_in_minutes() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-business-use-case-usage",
            concat!(
                r#"{"123": [{"type": "custom_audience", "estimated_time_to_regain_access": 2}, "#,
                r#"{"type": "ads_management", "estimated_time_to_regain_access": 5}]}"#
            )
            .parse()
            .unwrap(),
        );

        assert_eq!(usage_wait(&headers), Some(Duration::from_secs(300)));
    }

    #[test]
    fn a_zero_or_unreadable_usage_estimate_asks_for_no_particular_wait() {
        let mut zero = HeaderMap::new();
        zero.insert(
            "x-business-use-case-usage",
            r#"{"123": [{"estimated_time_to_regain_access": 0}]}"#
                .parse()
                .unwrap(),
        );
        let mut unreadable = HeaderMap::new();
        unreadable.insert("x-business-use-case-usage", "n/a".parse().unwrap());

        assert_eq!(usage_wait(&zero), None);
        assert_eq!(usage_wait(&unreadable), None);
        assert_eq!(usage_wait(&HeaderMap::new()), None);
    }

    #[test]
    fn an_html_page_is_retryable_on_5xx_and_permanent_when_too_large() {
        let html = b"<!DOCTYPE html><html><body>Sorry, something went wrong.</body></html>";
        let classify = |code: u16| {
            let status = StatusCode::from_u16(code).unwrap();
            let error = classify_bare_failure(
                status,
                &HeaderMap::new(),
                html,
                "x".into(),
                SystemTime::now(),
            );
            kind(&Answer::Failed(error))
        };

        assert_eq!(classify(500), "retryable");
        assert_eq!(classify(502), "retryable");
        assert_eq!(classify(413), "permanent");
        assert_eq!(classify(404), "permanent");
    }

    #[test]
    fn the_session_id_is_stable_per_batch_and_differs_between_batches() {
        let first = session_id(&batch(Change::Add, 0));

        assert_eq!(first, session_id(&batch(Change::Add, 0)));
        assert_ne!(first, session_id(&batch(Change::Add, 1)));
        assert_ne!(first, session_id(&batch(Change::Remove, 0)));
        assert!(first > 0);
    }

    #[test]
    fn schema_columns_follow_the_wire_order_whatever_the_table_order() {
        let mut problems = Problems::default();
        let table = toml::toml! {
            schema = { COUNTRY = "country", PHONE = "phone", EMAIL = "email" }
        };

        let schema = read_schema(&mut problems, &table).unwrap();

        let names: Vec<&str> = schema.iter().map(|(key, _)| key.name()).collect();
        assert_eq!(names, ["EMAIL", "PHONE", "COUNTRY"]);
    }
}
