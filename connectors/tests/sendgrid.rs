//! The SendGrid connector against a fake Marketing Campaigns API on loopback.
//!
//! The fake serves the contact upsert (`PUT /v3/marketing/contacts`), the import job status
//! (`GET /v3/marketing/contacts/imports/{id}`) and its errors file, the lookup by address
//! (`POST /v3/marketing/contacts/search/emails`) and the removal from a list
//! (`DELETE /v3/marketing/lists/{list_id}/contacts?contact_ids=...`) the way SendGrid does: a
//! bearer API key; at most 30,000 contacts per upsert and 100 addresses per lookup; a 400
//! naming each invalid address by its position; writes answered 202 with a `job_id`; lookups
//! answered with a map keyed by address, or 404 when none is known; removal by contact id
//! only; `X-RateLimit-*` headers on every answer. It keeps the contacts (address, id, lists).
//!
//! An upsert job stays `pending` for a configurable number of polls and is applied when a poll
//! finds it done, so a lookup only sees contacts whose job has completed. It ends `completed`,
//! `errored` (the contacts set to be refused are left out, counted in `errored_count` and
//! listed in a CSV file at `errors_url`, `email,error` per row; SendGrid does not document the
//! file's layout, so this one is an assumption) or, when set to, `failed` with nothing applied.
//! Removals are applied at once. Faults queued on it answer the next requests the way SendGrid
//! fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::sendgrid::SendgridConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    Fake, accepted, deliver_retrying, email_member as member, header, html_page, percent_decode,
    unix_now, with_retry_after,
};

const KEY: &str = "SG.segmentd-test.0123456789abcdef";
const LIST_ID: &str = "ca7a3796-e8a8-4029-9ccb-df8937940562";
/// Another list of the account, which removals from [`LIST_ID`] must leave alone.
const OTHER_LIST_ID: &str = "0f5e7a52-1b0c-4a8e-9d3f-6c2b1a0e9d87";
const MAX_CONTACTS: usize = 30_000;
const MAX_UPSERT_BYTES: usize = 6_000_000;
const MAX_LOOKUP: usize = 100;

/// One failure the fake answers a request with instead of its normal answer.
#[derive(Debug, Clone)]
enum Fault {
    /// HTTP 429, with this `Retry-After` if any and `X-RateLimit-Reset` this many seconds
    /// ahead if any.
    TooManyRequests {
        retry_after: Option<&'static str>,
        reset_in: Option<u64>,
    },
    /// HTTP 503 with SendGrid's error body.
    Unavailable,
    /// An HTML error page with this status, as a proxy in front of the API sends.
    HtmlPage(u16),
    /// The normal answer (the change applied at once), sent after this delay.
    Slow(Duration),
    /// HTTP 401: the API key was revoked.
    RevokedKey,
    /// HTTP 403: the API key has no Marketing access.
    NoMarketingAccess,
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
struct Received {
    method: Method,
    uri: String,
    authorization: Option<String>,
    body: String,
    status: u16,
}

/// One contact of the account.
#[derive(Debug, Clone)]
struct Contact {
    id: String,
    lists: BTreeSet<String>,
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobType {
    Upsert,
    Delete,
}

/// One job handed out.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    job_type: JobType,
    /// Polls still to be answered `pending`.
    polls_left: u32,
    /// `pending` until a poll finds it done, then `completed`, `errored` or `failed`.
    status: &'static str,
    /// The lower-cased addresses the job upserts.
    emails: Vec<String>,
    /// The lists it adds them to.
    lists: Vec<String>,
    /// The addresses it refuses, with SendGrid's message, once done.
    errored: Vec<(String, String)>,
}

/// The fake API: the contacts of its one account, the faults queued and the requests received.
type Sendgrid = Fake<Account, Received, Fault>;

/// The contacts and jobs of the fake's one account, and how its jobs behave.
#[derive(Default)]
struct Account {
    /// Contacts by lower-cased address.
    contacts: Mutex<BTreeMap<String, Contact>>,
    /// Jobs handed out, in order.
    jobs: Mutex<Vec<Job>>,
    /// How many polls a new upsert job is answered `pending` before it is done.
    pending_polls: Mutex<u32>,
    /// Addresses an upsert job refuses, with the message its errors file gives.
    refused_in_jobs: Mutex<BTreeMap<String, String>>,
    /// Whether upsert jobs end `failed`.
    jobs_fail: Mutex<bool>,
    /// Whether a job with refused contacts gives an `errors_url`.
    no_errors_files: Mutex<bool>,
}

impl Sendgrid {
    /// The addresses of the contacts in `list`.
    fn members_of(&self, list: &str) -> BTreeSet<String> {
        self.contacts
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, contact)| contact.lists.contains(list))
            .map(|(email, _)| email.clone())
            .collect()
    }

    /// The addresses of the contacts in [`LIST_ID`].
    fn audience(&self) -> BTreeSet<String> {
        self.members_of(LIST_ID)
    }

    /// `METHOD path -> status` of every request received.
    fn calls(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| {
                let path = r.uri.split('?').next().unwrap_or_default();
                format!("{} {path} -> {}", r.method, r.status)
            })
            .collect()
    }

    /// Adds a contact directly, as if an earlier upsert had completed.
    fn seed(&self, email: &str, lists: &[&str]) {
        let mut contacts = self.contacts.lock().unwrap();
        let id = contact_id(contacts.len());
        contacts.insert(
            email.to_owned(),
            Contact {
                id,
                lists: lists.iter().map(|list| list.to_string()).collect(),
            },
        );
    }

    /// The ids of the jobs handed out, in order.
    fn job_ids(&self) -> Vec<String> {
        self.jobs
            .lock()
            .unwrap()
            .iter()
            .map(|job| job.id.clone())
            .collect()
    }

    /// `GET <job status path> -> 200` for the `n`th job handed out, as [`Sendgrid::calls`]
    /// shows a poll.
    fn poll(&self, n: usize) -> String {
        let id = &self.job_ids()[n];
        format!("GET /v3/marketing/contacts/imports/{id} -> 200")
    }

    /// Makes upsert jobs refuse `email` with `message`.
    fn refuse_in_jobs(&self, email: &str, message: &str) {
        self.refused_in_jobs
            .lock()
            .unwrap()
            .insert(email.to_owned(), message.to_owned());
    }

    /// Hands out a job and answers 202 with its id.
    fn job(&self, job_type: JobType, emails: Vec<String>, lists: Vec<String>) -> Response {
        let mut jobs = self.jobs.lock().unwrap();
        let id = format!("5e1f7a3c-0b2d-4c8e-9f60-{:012}", jobs.len() + 1);
        let (polls_left, status) = match job_type {
            JobType::Upsert => (*self.pending_polls.lock().unwrap(), "pending"),
            JobType::Delete => (0, "completed"),
        };
        jobs.push(Job {
            id: id.clone(),
            job_type,
            polls_left,
            status,
            emails,
            lists,
            errored: Vec::new(),
        });
        (StatusCode::ACCEPTED, axum::Json(json!({ "job_id": id }))).into_response()
    }

    /// Finishes a pending upsert job: applies it, less the contacts it refuses, or fails it.
    fn finish_job(&self, job: &mut Job) {
        if *self.jobs_fail.lock().unwrap() {
            job.status = "failed";
            job.errored = job
                .emails
                .iter()
                .map(|email| (email.clone(), "unprocessable".to_owned()))
                .collect();
            return;
        }
        let refused = self.refused_in_jobs.lock().unwrap().clone();
        let mut contacts = self.contacts.lock().unwrap();
        for email in &job.emails {
            if let Some(message) = refused.get(email) {
                job.errored.push((email.clone(), message.clone()));
                continue;
            }
            let next = contact_id(contacts.len());
            let entry = contacts.entry(email.clone()).or_insert(Contact {
                id: next,
                lists: BTreeSet::new(),
            });
            entry.lists.extend(job.lists.iter().cloned());
        }
        job.status = if job.errored.is_empty() {
            "completed"
        } else {
            "errored"
        };
    }
}

/// The fake's contact ids: UUID-shaped, numbered.
fn contact_id(number: usize) -> String {
    format!("7c1e0a00-0000-4000-8000-{number:012}")
}

/// SendGrid's error body with one error per `(field, message)`.
fn errors(status: u16, entries: &[(Option<&str>, &str)]) -> Response {
    let body = json!({
        "errors": entries
            .iter()
            .map(|(field, message)| json!({"field": field, "message": message}))
            .collect::<Vec<_>>(),
    });
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

/// The fake's address check, stricter than the connector's: the domain needs a dot.
fn valid_email(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => !local.is_empty() && domain.contains('.') && !email.contains(' '),
        None => false,
    }
}

/// Answers with `fault` if it stands for a failure, otherwise checks the credentials.
fn refusal(fault: Option<&Fault>, headers: &HeaderMap) -> Option<Response> {
    match fault {
        Some(Fault::TooManyRequests {
            retry_after,
            reset_in,
        }) => {
            let mut response =
                with_retry_after(errors(429, &[(None, "too many requests")]), *retry_after);
            if let Some(seconds) = reset_in {
                let reset = (unix_now() + seconds).to_string();
                response
                    .headers_mut()
                    .insert("x-ratelimit-reset", reset.parse().unwrap());
                response
                    .headers_mut()
                    .insert("x-ratelimit-remaining", "0".parse().unwrap());
            }
            return Some(response);
        }
        Some(Fault::Unavailable) => {
            return Some(errors(503, &[(None, "service temporarily unavailable")]));
        }
        Some(Fault::HtmlPage(status)) => return Some(html_page(*status)),
        Some(Fault::RevokedKey) => return Some(errors(401, &[(None, "authorization required")])),
        Some(Fault::NoMarketingAccess) => {
            return Some(errors(403, &[(None, "access forbidden")]));
        }
        Some(Fault::Slow(_)) | None => {}
    }
    if header(headers, "authorization") != Some(&format!("Bearer {KEY}")) {
        return Some(errors(401, &[(None, "authorization required")]));
    }
    None
}

/// Records the request, adds the rate-limit headers, and waits out a slow fault.
async fn finish(
    sendgrid: &Sendgrid,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    fault: Option<Fault>,
    mut response: Response,
) -> Response {
    let count = sendgrid.record(Received {
        method,
        uri: uri.to_string(),
        authorization: header(headers, "authorization").map(str::to_owned),
        body: String::from_utf8_lossy(body).into_owned(),
        status: response.status().as_u16(),
    });
    // A 429 carries only the rate-limit headers its fault chose.
    let throttled = response.status() == StatusCode::TOO_MANY_REQUESTS;
    let limits = response.headers_mut();
    limits.insert("x-ratelimit-limit", "600".parse().unwrap());
    if !throttled {
        let remaining = 600usize.saturating_sub(count).to_string();
        limits.insert("x-ratelimit-remaining", remaining.parse().unwrap());
        let reset = (unix_now() + 60).to_string();
        limits.insert("x-ratelimit-reset", reset.parse().unwrap());
    }
    if let Some(Fault::Slow(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    response
}

/// True when the request says it carries JSON.
fn is_json(headers: &HeaderMap) -> bool {
    header(headers, "content-type").is_some_and(|v| v.starts_with("application/json"))
}

async fn upsert_contacts(
    State(sendgrid): State<Arc<Sendgrid>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = sendgrid.next_fault();
    let response = refusal(fault.as_ref(), &headers).unwrap_or_else(|| {
        if !is_json(&headers) {
            return errors(415, &[(None, "content type must be application/json")]);
        }
        upsert(&sendgrid, &body)
    });
    finish(
        &sendgrid,
        Method::PUT,
        &uri,
        &headers,
        &body,
        fault,
        response,
    )
    .await
}

fn upsert(sendgrid: &Sendgrid, body: &[u8]) -> Response {
    if body.len() > MAX_UPSERT_BYTES {
        return errors(413, &[(None, "request body is larger than 6 MB")]);
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return errors(400, &[(None, "invalid JSON")]);
    };
    let Some(contacts) = request["contacts"].as_array() else {
        return errors(400, &[(Some("contacts"), "contacts is required")]);
    };
    if contacts.is_empty() || contacts.len() > MAX_CONTACTS {
        return errors(
            400,
            &[(Some("contacts"), "contacts must hold 1 to 30000 items")],
        );
    }
    let lists: Vec<String> = match request.get("list_ids") {
        None => Vec::new(),
        Some(ids) => {
            let ids: Option<Vec<String>> = ids.as_array().map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect()
            });
            match ids {
                Some(ids)
                    if ids
                        .iter()
                        .all(|id| [LIST_ID, OTHER_LIST_ID].contains(&id.as_str())) =>
                {
                    ids
                }
                _ => {
                    return errors(
                        400,
                        &[(Some("list_ids"), "list_ids must be existing lists")],
                    );
                }
            }
        }
    };
    let mut refused = Vec::new();
    for (index, contact) in contacts.iter().enumerate() {
        let email = contact["email"].as_str().unwrap_or_default();
        if !valid_email(email) {
            refused.push((
                format!("contacts[{index}].email"),
                format!("{email} is not a valid email address"),
            ));
        }
    }
    if !refused.is_empty() {
        let entries: Vec<(Option<&str>, &str)> = refused
            .iter()
            .map(|(field, message)| (Some(field.as_str()), message.as_str()))
            .collect();
        return errors(400, &entries);
    }

    let emails = contacts
        .iter()
        .map(|contact| contact["email"].as_str().unwrap().to_lowercase())
        .collect();
    sendgrid.job(JobType::Upsert, emails, lists)
}

async fn import_status(
    State(sendgrid): State<Arc<Sendgrid>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let fault = sendgrid.next_fault();
    let response = refusal(fault.as_ref(), &headers).unwrap_or_else(|| {
        let host = header(&headers, "host").unwrap();
        status_of(&sendgrid, &id, host)
    });
    finish(
        &sendgrid,
        Method::GET,
        &uri,
        &headers,
        &Bytes::new(),
        fault,
        response,
    )
    .await
}

fn status_of(sendgrid: &Sendgrid, id: &str, host: &str) -> Response {
    let mut jobs = sendgrid.jobs.lock().unwrap();
    let Some(job) = jobs.iter_mut().find(|job| job.id == id) else {
        return errors(404, &[(None, "job not found")]);
    };
    if job.status == "pending" {
        if job.polls_left > 0 {
            job.polls_left -= 1;
        } else {
            sendgrid.finish_job(job);
        }
    }
    let job_type = match job.job_type {
        JobType::Upsert => "upsert",
        JobType::Delete => "delete",
    };
    let mut answer = json!({
        "id": job.id,
        "status": job.status,
        "job_type": job_type,
        "started_at": "2026-12-01T09:00:00Z",
    });
    if job.status != "pending" {
        let errored = job.errored.len();
        let mut results = json!({
            "requested_count": job.emails.len(),
            "created_count": job.emails.len() - errored,
            "updated_count": 0,
            "deleted_count": 0,
            "errored_count": errored,
        });
        if errored > 0 && !*sendgrid.no_errors_files.lock().unwrap() {
            results["errors_url"] = json!(format!(
                "http://{host}/v3/marketing/contacts/imports/errors/{id}"
            ));
        }
        answer["results"] = results;
        answer["finished_at"] = json!("2026-12-01T09:01:00Z");
    }
    axum::Json(answer).into_response()
}

async fn errors_file(
    State(sendgrid): State<Arc<Sendgrid>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let fault = sendgrid.next_fault();
    let response = refusal(fault.as_ref(), &headers).unwrap_or_else(|| {
        let jobs = sendgrid.jobs.lock().unwrap();
        match jobs
            .iter()
            .find(|job| job.id == id && !job.errored.is_empty())
        {
            Some(job) => {
                let mut csv = "email,error\r\n".to_owned();
                for (email, message) in &job.errored {
                    csv.push_str(&format!("{email},\"{message}\"\r\n"));
                }
                ([("content-type", "text/csv")], csv).into_response()
            }
            None => errors(404, &[(None, "not found")]),
        }
    });
    finish(
        &sendgrid,
        Method::GET,
        &uri,
        &headers,
        &Bytes::new(),
        fault,
        response,
    )
    .await
}

async fn search_emails(
    State(sendgrid): State<Arc<Sendgrid>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = sendgrid.next_fault();
    let response = refusal(fault.as_ref(), &headers).unwrap_or_else(|| search(&sendgrid, &body));
    finish(
        &sendgrid,
        Method::POST,
        &uri,
        &headers,
        &body,
        fault,
        response,
    )
    .await
}

fn search(sendgrid: &Sendgrid, body: &[u8]) -> Response {
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let Some(emails) = request["emails"].as_array() else {
        return errors(400, &[(Some("emails"), "emails is required")]);
    };
    if emails.is_empty() || emails.len() > MAX_LOOKUP {
        return errors(400, &[(Some("emails"), "emails must hold 1 to 100 items")]);
    }
    let emails: Vec<&str> = emails
        .iter()
        .map(|e| e.as_str().unwrap_or_default())
        .collect();
    let invalid: Vec<(String, String)> = emails
        .iter()
        .enumerate()
        .filter(|(_, email)| !valid_email(email))
        .map(|(index, email)| {
            (
                format!("emails[{index}]"),
                format!("{email} is an invalid email"),
            )
        })
        .collect();
    if !invalid.is_empty() {
        let entries: Vec<(Option<&str>, &str)> = invalid
            .iter()
            .map(|(field, message)| (Some(field.as_str()), message.as_str()))
            .collect();
        return errors(400, &entries);
    }
    let contacts = sendgrid.contacts.lock().unwrap();
    let mut result = serde_json::Map::new();
    let mut any = false;
    for email in emails {
        let entry = match contacts.get(&email.to_lowercase()) {
            Some(contact) => {
                any = true;
                json!({"contact": {
                    "id": contact.id,
                    "email": email.to_lowercase(),
                    "list_ids": contact.lists,
                    "created_at": "2026-12-01T09:00:00Z",
                }})
            }
            None => json!({"error": "contact not found"}),
        };
        result.insert(email.to_owned(), entry);
    }
    if !any {
        return errors(404, &[(None, "No contacts found")]);
    }
    axum::Json(json!({ "result": result })).into_response()
}

async fn remove_from_list(
    State(sendgrid): State<Arc<Sendgrid>>,
    Path(list_id): Path<String>,
    RawQuery(query): RawQuery,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = sendgrid.next_fault();
    let response = refusal(fault.as_ref(), &headers)
        .unwrap_or_else(|| remove(&sendgrid, &list_id, query.as_deref().unwrap_or_default()));
    finish(
        &sendgrid,
        Method::DELETE,
        &uri,
        &headers,
        &body,
        fault,
        response,
    )
    .await
}

fn remove(sendgrid: &Sendgrid, list_id: &str, query: &str) -> Response {
    if ![LIST_ID, OTHER_LIST_ID].contains(&list_id) {
        return errors(404, &[(None, "list ID does not exist")]);
    }
    let ids: Vec<String> = query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("contact_ids="))
        .flat_map(|value| {
            percent_decode(value)
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|id| !id.is_empty())
        .collect();
    if ids.is_empty() {
        return errors(400, &[(Some("contact_ids"), "contact_ids is required")]);
    }
    if ids.iter().any(|id| id.contains('@')) {
        return errors(
            400,
            &[(Some("contact_ids"), "contact_ids must be contact IDs")],
        );
    }
    let mut contacts = sendgrid.contacts.lock().unwrap();
    for contact in contacts.values_mut() {
        if ids.contains(&contact.id) {
            contact.lists.remove(list_id);
        }
    }
    drop(contacts);
    sendgrid.job(JobType::Delete, Vec::new(), Vec::new())
}

/// Starts the fake on a loopback port; returns it with its API root.
async fn start_sendgrid() -> (Arc<Sendgrid>, String) {
    let routes = axum::Router::new()
        .route(
            "/v3/marketing/contacts",
            axum::routing::put(upsert_contacts),
        )
        .route(
            "/v3/marketing/contacts/imports/{id}",
            axum::routing::get(import_status),
        )
        .route(
            "/v3/marketing/contacts/imports/errors/{id}",
            axum::routing::get(errors_file),
        )
        .route(
            "/v3/marketing/contacts/search/emails",
            axum::routing::post(search_emails),
        )
        .route(
            "/v3/marketing/lists/{list_id}/contacts",
            axum::routing::delete(remove_from_list),
        );
    common::start(Sendgrid::default(), routes).await
}

fn secrets(key: &str) -> BTreeMap<String, String> {
    common::secrets(&[("api_key", key)])
}

fn connection(base_url: &str) -> toml::Table {
    let mut table = toml::toml! {
        api_key_env = "SENDGRID_KEY"
        timeout_seconds = 1
        poll_interval_seconds = 1
    };
    table.insert("base_url".into(), base_url.into());
    table
}

fn connector(base_url: &str) -> SendgridConnector {
    let activation = toml::toml! { list_id = "ca7a3796-e8a8-4029-9ccb-df8937940562" };
    SendgridConnector::from_settings(&connection(base_url), &activation, &secrets(KEY)).unwrap()
}

fn batch(change: Change, members: Vec<Member>) -> Batch {
    common::batch("vip/sendgrid", change, members)
}

fn three_members() -> Vec<Member> {
    vec![
        member("1", "ann@example.com"),
        member("2", " Bob@Example.com "),
        member("3", "cat@example.com"),
    ]
}

fn addresses(emails: &[&str]) -> BTreeSet<String> {
    emails.iter().map(|email| email.to_string()).collect()
}

#[tokio::test]
async fn adding_three_and_removing_one_leaves_two_in_the_list_and_keeps_the_contact() {
    let (sendgrid, url) = start_sendgrid().await;
    let connector = connector(&url);

    let added = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let removed = connector
        .deliver(&batch(Change::Remove, vec![member("2", "BOB@example.com")]))
        .await;

    assert_eq!(added, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(removed, Ok(accepted(&["2"])));
    assert_eq!(
        sendgrid.audience(),
        addresses(&["ann@example.com", "cat@example.com"])
    );
    assert!(
        sendgrid
            .contacts
            .lock()
            .unwrap()
            .contains_key("bob@example.com")
    );
    assert_eq!(
        sendgrid.calls(),
        [
            "PUT /v3/marketing/contacts -> 202",
            &sendgrid.poll(0),
            "POST /v3/marketing/contacts/search/emails -> 200",
            &format!("DELETE /v3/marketing/lists/{LIST_ID}/contacts -> 202"),
        ]
    );
}

#[tokio::test]
async fn requests_carry_the_bearer_key_lower_cased_addresses_and_contact_ids() {
    let (sendgrid, url) = start_sendgrid().await;
    let connector = connector(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    connector
        .deliver(&batch(Change::Remove, three_members()))
        .await
        .unwrap();

    let received = sendgrid.received();
    assert!(
        received
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {KEY}")))
    );
    assert_eq!(
        serde_json::from_str::<Value>(&received[0].body).unwrap(),
        json!({
            "list_ids": [LIST_ID],
            "contacts": [
                {"email": "ann@example.com"},
                {"email": "bob@example.com"},
                {"email": "cat@example.com"},
            ],
        })
    );
    // The job is polled under the id of the upsert's 202.
    assert_eq!(
        received[1].uri,
        format!("/v3/marketing/contacts/imports/{}", sendgrid.job_ids()[0])
    );
    assert_eq!(
        serde_json::from_str::<Value>(&received[2].body).unwrap(),
        json!({"emails": ["ann@example.com", "bob@example.com", "cat@example.com"]})
    );
    // The fake numbers contact ids in order of creation; commas are sent escaped.
    assert_eq!(
        received[3].uri,
        format!(
            "/v3/marketing/lists/{LIST_ID}/contacts?contact_ids=\
             7c1e0a00-0000-4000-8000-000000000000%2C7c1e0a00-0000-4000-8000-000000000001%2C\
             7c1e0a00-0000-4000-8000-000000000002"
        )
    );
    assert!(sendgrid.audience().is_empty());
    assert!(!format!("{connector:?}").contains("0123456789abcdef"));
}

#[tokio::test]
async fn adding_the_same_batch_twice_leaves_one_contact_each_in_the_list() {
    let (sendgrid, url) = start_sendgrid().await;
    let connector = connector(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    let again = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(again, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        sendgrid.audience(),
        addresses(&["ann@example.com", "bob@example.com", "cat@example.com"])
    );
    assert_eq!(sendgrid.contacts.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn removing_the_same_batch_twice_sends_no_second_removal() {
    let (sendgrid, url) = start_sendgrid().await;
    let connector = connector(&url);
    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();

    let first = connector
        .deliver(&batch(Change::Remove, three_members()))
        .await;
    let second = connector
        .deliver(&batch(Change::Remove, three_members()))
        .await;

    assert_eq!(first, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(second, Ok(accepted(&["1", "2", "3"])));
    assert!(sendgrid.audience().is_empty());
    assert_eq!(
        sendgrid.calls()[4..],
        ["POST /v3/marketing/contacts/search/emails -> 200"]
    );
}

#[tokio::test]
async fn removing_unknown_addresses_counts_as_removed_and_leaves_other_lists_alone() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.seed("ann@example.com", &[LIST_ID, OTHER_LIST_ID]);
    sendgrid.seed("bob@example.com", &[OTHER_LIST_ID]);
    let connector = connector(&url);

    let unknown = connector
        .deliver(&batch(
            Change::Remove,
            vec![member("9", "nobody@example.com")],
        ))
        .await;
    let removed = connector
        .deliver(&batch(
            Change::Remove,
            vec![
                member("1", "ann@example.com"),
                member("2", "bob@example.com"),
            ],
        ))
        .await;

    assert_eq!(unknown, Ok(accepted(&["9"])));
    assert_eq!(removed, Ok(accepted(&["1", "2"])));
    assert!(sendgrid.audience().is_empty());
    assert_eq!(
        sendgrid.members_of(OTHER_LIST_ID),
        addresses(&["ann@example.com", "bob@example.com"])
    );
    let calls = sendgrid.calls();
    assert_eq!(calls[0], "POST /v3/marketing/contacts/search/emails -> 404");
    // Only ann was in the list, so only her id is sent.
    assert!(
        sendgrid.received()[2]
            .uri
            .ends_with("contact_ids=7c1e0a00-0000-4000-8000-000000000000")
    );
}

#[tokio::test]
async fn members_without_a_usable_address_are_rejected_and_never_sent() {
    let (sendgrid, url) = start_sendgrid().await;
    let members = vec![
        member("1", "ann@example.com"),
        member("2", "ann at example"),
        Member {
            key: "3".into(),
            identifiers: BTreeMap::new(),
        },
    ];

    let outcome = connector(&url).deliver(&batch(Change::Add, members)).await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into()],
            rejected: vec![
                Rejection {
                    key: "2".into(),
                    reason: "no usable e-mail address: `email` is not an e-mail address".into(),
                },
                Rejection {
                    key: "3".into(),
                    reason: "no usable e-mail address: `email` is missing".into(),
                },
            ],
        })
    );
    let body: Value = serde_json::from_str(&sendgrid.received()[0].body).unwrap();
    assert_eq!(body["contacts"], json!([{"email": "ann@example.com"}]));
    assert_eq!(sendgrid.audience(), addresses(&["ann@example.com"]));
}

#[tokio::test]
async fn a_batch_of_members_all_without_an_address_sends_nothing() {
    let (sendgrid, url) = start_sendgrid().await;

    let outcome = connector(&url)
        .deliver(&batch(Change::Remove, vec![member("1", "  ")]))
        .await
        .unwrap();

    assert_eq!(outcome.accepted, Vec::<String>::new());
    assert_eq!(outcome.rejected.len(), 1);
    assert!(sendgrid.received().is_empty());
}

#[tokio::test]
async fn an_address_sendgrid_refuses_is_rejected_and_the_others_are_added() {
    let (sendgrid, url) = start_sendgrid().await;
    let members = vec![
        member("1", "ann@example.com"),
        member("2", "bob@localhost"),
        member("3", "cat@example.com"),
    ];

    let outcome = connector(&url).deliver(&batch(Change::Add, members)).await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into(), "3".into()],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "SendGrid refused the contact: <address> is not a valid email address"
                    .into(),
            }],
        })
    );
    assert_eq!(
        sendgrid.audience(),
        addresses(&["ann@example.com", "cat@example.com"])
    );
    assert_eq!(
        sendgrid.calls(),
        [
            "PUT /v3/marketing/contacts -> 400",
            "PUT /v3/marketing/contacts -> 202",
            &sendgrid.poll(0),
        ]
    );
}

#[tokio::test]
async fn an_add_counts_only_once_its_import_job_has_completed() {
    let (sendgrid, url) = start_sendgrid().await;
    *sendgrid.pending_polls.lock().unwrap() = 1;
    let started = Instant::now();

    let outcome = connector(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        sendgrid.calls(),
        [
            "PUT /v3/marketing/contacts -> 202",
            &sendgrid.poll(0),
            &sendgrid.poll(0)
        ]
    );
    // One poll interval (1 s) passes between the pending answer and the completed one.
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(sendgrid.audience().len(), 3);
}

#[tokio::test]
async fn a_contact_the_import_job_refuses_is_rejected_with_the_reason_its_errors_file_gives() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.refuse_in_jobs(
        "bob@example.com",
        "bob@example.com cannot be updated: send every identifier the contact holds",
    );

    let outcome = connector(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into(), "3".into()],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "SendGrid's import job refused the contact: error: <member> cannot be \
                         updated: send every identifier the contact holds"
                    .into(),
            }],
        })
    );
    assert_eq!(
        sendgrid.audience(),
        addresses(&["ann@example.com", "cat@example.com"])
    );
    let job = &sendgrid.job_ids()[0];
    assert_eq!(
        sendgrid.calls(),
        [
            "PUT /v3/marketing/contacts -> 202".to_owned(),
            sendgrid.poll(0),
            format!("GET /v3/marketing/contacts/imports/errors/{job} -> 200"),
        ]
    );
    assert!(
        sendgrid.received()[2].authorization.as_deref() == Some(&format!("Bearer {KEY}")),
        "the errors file is on the configured host, so it is fetched with the key"
    );
}

#[tokio::test]
async fn without_an_errors_file_a_partly_refused_job_accepts_all_and_a_wholly_refused_one_rejects_all()
 {
    let (sendgrid, url) = start_sendgrid().await;
    *sendgrid.no_errors_files.lock().unwrap() = true;
    sendgrid.refuse_in_jobs("bob@example.com", "cannot be updated");
    let connector = connector(&url);
    let mut only_bob = batch(Change::Add, vec![member("2", "bob@example.com")]);
    only_bob.sequence = 1;

    let partly = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let wholly = connector.deliver(&only_bob).await;

    // Which of the three was refused is not known, so all three count as accepted.
    assert_eq!(partly, Ok(accepted(&["1", "2", "3"])));
    let job = &sendgrid.job_ids()[1];
    assert_eq!(
        wholly,
        Ok(Outcome {
            accepted: vec![],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: format!(
                    "SendGrid's import job {job} counted 1 of its 1 contacts as errored without \
                     naming them all; this one is among them"
                ),
            }],
        })
    );
    assert_eq!(
        sendgrid.audience(),
        addresses(&["ann@example.com", "cat@example.com"])
    );
}

#[tokio::test]
async fn an_import_job_still_pending_when_the_wait_ends_is_retryable_and_polled_again_next_time() {
    let (sendgrid, url) = start_sendgrid().await;
    *sendgrid.pending_polls.lock().unwrap() = 1;
    let mut settings = connection(&url);
    settings.insert("job_wait_seconds".into(), 1.into());
    let activation = toml::toml! { list_id = "ca7a3796-e8a8-4029-9ccb-df8937940562" };
    let connector =
        SendgridConnector::from_settings(&settings, &activation, &secrets(KEY)).unwrap();

    let first = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let remembered = format!("{connector:?}");
    let audience_meanwhile = sendgrid.audience();
    let second = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;

    let job = &sendgrid.job_ids()[0];
    assert_eq!(
        first,
        Err(DeliveryError::Retryable {
            message: format!(
                "SendGrid import job {job} is still pending after 1 s; sending the batch again is \
                 safe, as upserts and list adds are idempotent, and the next attempt in this \
                 process polls the same job"
            ),
        })
    );
    assert!(audience_meanwhile.is_empty());
    // The job waiting for the next attempt is remembered without the addresses it holds.
    assert!(remembered.contains(job.as_str()), "{remembered}");
    assert!(!remembered.contains("@example.com"), "{remembered}");
    assert_eq!(second, Ok(accepted(&["1", "2", "3"])));
    // One upsert: the second attempt finds the first one's job completed.
    assert_eq!(
        sendgrid.calls(),
        [
            "PUT /v3/marketing/contacts -> 202",
            &sendgrid.poll(0),
            &sendgrid.poll(0)
        ]
    );
    assert_eq!(sendgrid.contacts.lock().unwrap().len(), 3);
    assert_eq!(sendgrid.audience().len(), 3);
}

#[tokio::test]
async fn a_poll_that_fails_is_retried_on_the_same_job_without_upserting_again() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.fail_next([Fault::Slow(Duration::ZERO), Fault::Unavailable]);

    let outcome = deliver_retrying(&connector(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    let job = &sendgrid.job_ids()[0];
    assert_eq!(
        sendgrid.calls(),
        [
            "PUT /v3/marketing/contacts -> 202".to_owned(),
            format!("GET /v3/marketing/contacts/imports/{job} -> 503"),
            sendgrid.poll(0),
        ]
    );
    assert_eq!(sendgrid.audience().len(), 3);
}

#[tokio::test]
async fn a_failed_import_job_fails_the_batch_as_retryable_and_the_retry_upserts_again() {
    let (sendgrid, url) = start_sendgrid().await;
    *sendgrid.jobs_fail.lock().unwrap() = true;

    let outcome = deliver_retrying(&connector(&url), &batch(Change::Add, three_members()), 2).await;

    let job = &sendgrid.job_ids()[1];
    assert_eq!(
        outcome,
        Err(DeliveryError::Retryable {
            message: format!(
                "SendGrid import job {job} failed (3 of 3 contacts errored); sending the batch \
                 again is safe, as upserts and list adds are idempotent"
            ),
        })
    );
    assert_eq!(
        sendgrid.calls(),
        [
            "PUT /v3/marketing/contacts -> 202".to_owned(),
            sendgrid.poll(0),
            "PUT /v3/marketing/contacts -> 202".to_owned(),
            sendgrid.poll(1),
        ]
    );
    assert!(sendgrid.audience().is_empty());
}

#[tokio::test]
async fn a_removal_with_an_address_sendgrid_refuses_rejects_it_and_removes_the_others() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.seed("ann@example.com", &[LIST_ID]);
    sendgrid.seed("cat@example.com", &[LIST_ID]);
    let members = vec![
        member("1", "ann@example.com"),
        member("2", "bob@localhost"),
        member("3", "cat@example.com"),
    ];

    let outcome = connector(&url)
        .deliver(&batch(Change::Remove, members))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into(), "3".into()],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "SendGrid refused to look the address up: <address> is an invalid email \
                         (emails[0])"
                    .into(),
            }],
        })
    );
    assert!(sendgrid.audience().is_empty());
    let search = "POST /v3/marketing/contacts/search/emails";
    assert_eq!(
        sendgrid.calls(),
        [
            format!("{search} -> 400"),
            format!("{search} -> 200"),
            format!("{search} -> 400"),
            format!("{search} -> 200"),
            format!("DELETE /v3/marketing/lists/{LIST_ID}/contacts -> 202"),
        ]
    );
}

#[tokio::test]
async fn a_removal_failing_after_its_first_hundred_finishes_on_retry() {
    let (sendgrid, url) = start_sendgrid().await;
    let members: Vec<Member> = (0..150)
        .map(|n| member(&n.to_string(), &format!("member{n}@example.com")))
        .collect();
    let connector = connector(&url);
    connector
        .deliver(&batch(Change::Add, members.clone()))
        .await
        .unwrap();
    sendgrid.fail_next([
        Fault::Slow(Duration::ZERO),
        Fault::Slow(Duration::ZERO),
        Fault::Unavailable,
    ]);

    let outcome = deliver_retrying(&connector, &batch(Change::Remove, members), 3)
        .await
        .unwrap();

    assert_eq!(outcome.accepted.len(), 150);
    assert!(sendgrid.audience().is_empty());
    let search = "POST /v3/marketing/contacts/search/emails";
    let delete = format!("DELETE /v3/marketing/lists/{LIST_ID}/contacts");
    assert_eq!(
        sendgrid.calls()[2..],
        [
            format!("{search} -> 200"),
            format!("{delete} -> 202"),
            format!("{search} -> 503"),
            // The retry finds the first hundred already out of the list.
            format!("{search} -> 200"),
            format!("{search} -> 200"),
            format!("{delete} -> 202"),
        ]
    );
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_one_without_leaves_the_wait_open() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.fail_next([
        Fault::TooManyRequests {
            retry_after: Some("1"),
            reset_in: None,
        },
        Fault::TooManyRequests {
            retry_after: None,
            reset_in: None,
        },
    ]);
    let started = Instant::now();

    let outcome = deliver_retrying(&connector(&url), &batch(Change::Add, three_members()), 2).await;

    let elapsed = started.elapsed();
    assert_eq!(
        outcome,
        Err(DeliveryError::RateLimited {
            message: format!(
                "{url}/v3/marketing/contacts answered 429 Too Many Requests: too many requests"
            ),
            wait: None,
        })
    );
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(sendgrid.received().len(), 2);
    assert!(sendgrid.audience().is_empty());
}

#[tokio::test]
async fn a_429_with_only_a_rate_limit_reset_waits_until_the_reset_then_adds() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.fail_next([Fault::TooManyRequests {
        retry_after: None,
        reset_in: Some(2),
    }]);
    let started = Instant::now();

    let outcome = deliver_retrying(&connector(&url), &batch(Change::Add, three_members()), 2).await;

    // The reset is in whole seconds, two ahead: the wait is more than one second.
    let elapsed = started.elapsed();
    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert!(elapsed > Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(
        sendgrid.calls(),
        [
            "PUT /v3/marketing/contacts -> 429",
            "PUT /v3/marketing/contacts -> 202",
            &sendgrid.poll(0),
        ]
    );
    assert_eq!(sendgrid.audience().len(), 3);
}

#[tokio::test]
async fn a_429_with_a_rate_limit_reset_beyond_any_clock_leaves_the_wait_open_then_adds() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.fail_next([Fault::TooManyRequests {
        retry_after: None,
        reset_in: Some(1 << 63),
    }]);
    let connector = connector(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 2).await;

    assert_eq!(
        direct,
        Err(DeliveryError::RateLimited {
            message: format!(
                "{url}/v3/marketing/contacts answered 429 Too Many Requests: too many requests"
            ),
            wait: None,
        })
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        sendgrid.audience(),
        addresses(&["ann@example.com", "bob@example.com", "cat@example.com"])
    );
}

#[tokio::test]
async fn a_revoked_key_is_an_auth_failure_sent_once() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.fail_next([Fault::RevokedKey]);

    let outcome = deliver_retrying(&connector(&url), &batch(Change::Add, three_members()), 5).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/v3/marketing/contacts answered 401 Unauthorized: authorization required; \
                 check the API key in `api_key_env`, it may have been revoked"
            ),
        })
    );
    assert_eq!(sendgrid.received().len(), 1);
    assert!(sendgrid.audience().is_empty());
}

#[tokio::test]
async fn a_wrong_key_or_one_without_marketing_access_is_an_auth_failure() {
    let (sendgrid, url) = start_sendgrid().await;
    let activation = toml::toml! { list_id = "ca7a3796-e8a8-4029-9ccb-df8937940562" };
    let wrong = SendgridConnector::from_settings(
        &connection(&url),
        &activation,
        &secrets("SG.someone-else.ffff"),
    )
    .unwrap();
    sendgrid.fail_next([Fault::NoMarketingAccess]);

    let scopeless = connector(&url)
        .deliver(&batch(Change::Remove, three_members()))
        .await;
    let unknown = wrong.deliver(&batch(Change::Add, three_members())).await;

    assert_eq!(
        scopeless,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/v3/marketing/contacts/search/emails answered 403 Forbidden: access \
                 forbidden; give the API key access to Marketing contacts and lists"
            ),
        })
    );
    assert!(
        matches!(unknown, Err(DeliveryError::Auth { .. })),
        "{unknown:?}"
    );
    assert!(sendgrid.audience().is_empty());
}

#[tokio::test]
async fn server_errors_and_html_pages_are_retried_up_to_max_attempts() {
    let (sendgrid, url) = start_sendgrid().await;
    let connector = connector(&url);

    sendgrid.fail_next([Fault::HtmlPage(502)]);
    let recovered = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;
    sendgrid.fail_next([Fault::Unavailable, Fault::Unavailable, Fault::Unavailable]);
    let exhausted = deliver_retrying(&connector, &batch(Change::Remove, three_members()), 3).await;

    assert_eq!(recovered, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        exhausted,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/v3/marketing/contacts/search/emails answered 503 Service Unavailable: \
                 service temporarily unavailable"
            ),
        })
    );
    let statuses: Vec<u16> = sendgrid.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [502, 202, 200, 503, 503, 503]);
    assert_eq!(sendgrid.audience().len(), 3);
}

#[tokio::test]
async fn an_html_error_page_says_so_without_quoting_it() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.fail_next([Fault::HtmlPage(504)]);

    let outcome = connector(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/v3/marketing/contacts answered 504 Gateway Timeout: an HTML page instead \
                 of a SendGrid error"
            ),
        })
    );
    assert!(sendgrid.audience().is_empty());
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retried_and_changes_nothing_twice() {
    let (sendgrid, url) = start_sendgrid().await;
    sendgrid.fail_next([Fault::Slow(Duration::from_millis(1500))]);
    let connector = connector(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    let DeliveryError::Retryable { message } = direct.unwrap_err() else {
        panic!("a timeout is retryable");
    };
    assert!(
        message.starts_with(&format!("PUT to {url}/v3/marketing/contacts timed out")),
        "{message}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        sendgrid.audience(),
        addresses(&["ann@example.com", "bob@example.com", "cat@example.com"])
    );
    assert_eq!(sendgrid.contacts.lock().unwrap().len(), 3);
}

#[test]
fn sendgrid_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        api_key_env = "SENDGRID_KEY"
        batch_size = 50000
        region = "eu"
    };
    let activation = toml::toml! {
        list_id = "newsletter"
        segment_id = "abc"
    };

    let errors =
        SendgridConnector::from_settings(&connection, &activation, &secrets("0123456789abcdef"))
            .unwrap_err();

    let error = common::problem;
    assert_eq!(
        errors,
        [
            error(
                "region",
                "unknown key in the connection settings; known keys: api_key_env, base_url, \
                 batch_size, timeout_seconds, poll_interval_seconds, job_wait_seconds"
            ),
            error(
                "api_key_env",
                "the API key does not start with `SG.`; copy the whole key from SendGrid"
            ),
            error(
                "batch_size",
                "must be between 1 and 30000 in the connection settings, got 50000"
            ),
            error(
                "segment_id",
                "unknown key in the activation settings; known keys: list_id, email_identifier"
            ),
            error(
                "list_id",
                "expected a SendGrid list id, a UUID, got `newsletter`"
            ),
        ]
    );
}

#[test]
fn a_sendgrid_activation_without_a_list_id_is_refused_but_its_connection_checks_alone() {
    let connection = toml::toml! { api_key_env = "SENDGRID_KEY" };

    let errors = SendgridConnector::from_settings(&connection, &toml::Table::new(), &secrets(KEY))
        .unwrap_err();
    let alone = segmentd_connectors::check_connection("sendgrid", &connection, &secrets(KEY));
    let unset = segmentd_connectors::check_connection("sendgrid", &connection, &BTreeMap::new());

    assert_eq!(
        errors,
        [SettingsError {
            field: "list_id".into(),
            message: "missing; set it to the SendGrid list's id (a UUID)".into(),
        }]
    );
    assert_eq!(alone, Ok(()));
    assert_eq!(
        unset,
        Err(vec![SettingsError {
            field: "api_key_env".into(),
            message: "the environment variable `SENDGRID_KEY` is not set; export it with a \
                      SendGrid API key"
                .into(),
        }])
    );
}

#[test]
fn sendgrid_batch_size_defaults_to_10000_and_may_rise_to_30000() {
    let activation = toml::toml! { list_id = "ca7a3796-e8a8-4029-9ccb-df8937940562" };
    let default = toml::toml! { api_key_env = "SENDGRID_KEY" };
    let largest = toml::toml! {
        api_key_env = "SENDGRID_KEY"
        batch_size = 30000
    };

    let by_default =
        segmentd_connectors::build("sendgrid", &default, &activation, &secrets(KEY)).unwrap();
    let at_most =
        segmentd_connectors::build("sendgrid", &largest, &activation, &secrets(KEY)).unwrap();

    assert_eq!(
        (by_default.kind(), by_default.max_batch_size()),
        ("sendgrid", 10_000)
    );
    assert_eq!(at_most.max_batch_size(), 30_000);
    assert!(segmentd_connectors::KINDS.contains(&"sendgrid"));
}

#[tokio::test]
async fn an_api_key_with_a_trailing_newline_is_refused_at_load_naming_api_key_env() {
    let (sendgrid, url) = start_sendgrid().await;
    let activation = toml::toml! { list_id = "ca7a3796-e8a8-4029-9ccb-df8937940562" };
    let with_newline = secrets(&format!("{KEY}\n"));

    let built = SendgridConnector::from_settings(&connection(&url), &activation, &with_newline);
    let checked = SendgridConnector::check_connection(&connection(&url), &with_newline);

    let expected = vec![SettingsError {
        field: "api_key_env".into(),
        message: "the API key holds characters an HTTP header cannot carry, such as a trailing \
                  newline; check the environment variable's value"
            .into(),
    }];
    assert_eq!(built.unwrap_err(), expected);
    assert_eq!(checked, Err(expected));
    assert!(sendgrid.received().is_empty());
    assert!(sendgrid.audience().is_empty());
}
