//! The Klaviyo connector against a fake Klaviyo JSON:API on loopback.
//!
//! The fake serves the bulk profile import (`POST /api/profile-bulk-import-jobs`), the import
//! job (`GET /api/profile-bulk-import-jobs/{id}`) and its import errors (`.../{id}/import-errors`,
//! paged by cursor), the lookup of a list's profiles
//! (`GET /api/lists/{list_id}/profiles?filter=any(email,[...])`) and the removal of profiles
//! from a list (`DELETE /api/lists/{list_id}/relationships/profiles`) the way Klaviyo does: a
//! `Klaviyo-API-Key` private key, a mandatory `revision` header, the JSON:API media type on
//! bodies; at most 10,000 profiles (5 MB) per import, 100 profiles per page and 1,000 per
//! relationship request; profile ids, never addresses, on the relationship; imports answered
//! 202 with a job resource and removals 204. It keeps profiles (address, id) and each list's
//! members.
//!
//! An import job is `queued`, then `processing` for a configurable number of polls, and is
//! applied when a poll finds it done: `complete`, with the profiles it refuses (invalid
//! addresses) left out, counted in `failed_count` and listed as import errors (each with the
//! profile sent as `original_payload` and a pointer to it; Klaviyo does not document those
//! two shapes, so these are assumptions), or, when set to, `cancelled` with nothing applied.
//! Faults queued on it answer the next requests the way Klaviyo fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::klaviyo::KlaviyoConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    Fake, accepted, deliver_retrying, email_member as member, form_decode, header, html_page,
    with_retry_after,
};

const KEY: &str = "pk_0123456789abcdef0123456789abcdef01";
const REVISION: &str = "2026-01-15";
const LIST_ID: &str = "Y6nRLr";
/// Another list of the account, which removals from [`LIST_ID`] must leave alone.
const OTHER_LIST_ID: &str = "XyZ123";
const JSON_API: &str = "application/vnd.api+json";
const MAX_IMPORT: usize = 10_000;
const MAX_IMPORT_BYTES: usize = 5_000_000;
const MAX_PAGE: usize = 100;
const MAX_RELATIONSHIPS: usize = 1_000;

/// One failure the fake answers a request with instead of its normal answer.
#[derive(Debug, Clone)]
enum Fault {
    /// HTTP 429 with code `throttled` and this detail, and this `Retry-After` if any.
    Throttled {
        retry_after: Option<&'static str>,
        detail: &'static str,
    },
    /// HTTP 503 with Klaviyo's error body.
    Unavailable,
    /// An HTML error page with this status, as Klaviyo's edge sends.
    HtmlPage(u16),
    /// The normal answer (the change applied at once), sent after this delay.
    Slow(Duration),
    /// HTTP 401: the private key was revoked.
    RevokedKey,
    /// HTTP 403: the private key lacks a scope.
    MissingScope,
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
struct Received {
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: String,
    status: u16,
    /// The body of the answer.
    answer: String,
}

/// One import job.
#[derive(Debug, Clone)]
struct Job {
    id: String,
    /// Polls still to be answered before the job is done.
    polls_left: u32,
    /// `queued`, `processing`, then `complete` or `cancelled`.
    status: &'static str,
    /// The addresses of its profiles, as sent.
    emails: Vec<String>,
    /// The lists it relates them to.
    lists: Vec<String>,
    /// The profiles it refused once done: index among those sent, address, detail.
    errors: Vec<(usize, String, String)>,
}

/// The fake API: its one account, the faults queued and the requests received.
type Klaviyo = Fake<Account, Received, Fault>;

/// The profiles, lists and import jobs of the fake's one account.
#[derive(Default)]
struct Account {
    /// Profile ids by lower-cased address.
    profiles: Mutex<BTreeMap<String, String>>,
    /// Profile ids in each list.
    lists: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Import jobs, in order.
    jobs: Mutex<Vec<Job>>,
    /// How many polls a new import job is answered unfinished before it is done.
    pending_polls: Mutex<u32>,
    /// Whether import jobs end `cancelled`.
    jobs_cancelled: Mutex<bool>,
    /// Import errors per page, unless zero (Klaviyo's default of 20).
    errors_page_size: Mutex<usize>,
}

impl Klaviyo {
    /// The addresses of the profiles in `list`.
    fn members_of(&self, list: &str) -> BTreeSet<String> {
        let lists = self.lists.lock().unwrap();
        let Some(ids) = lists.get(list) else {
            return BTreeSet::new();
        };
        self.profiles
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, id)| ids.contains(*id))
            .map(|(email, _)| email.clone())
            .collect()
    }

    /// The addresses of the profiles in [`LIST_ID`].
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

    /// The id of the profile with `email`, created if new.
    fn profile(&self, email: &str) -> String {
        let mut profiles = self.profiles.lock().unwrap();
        let next = profile_id(profiles.len());
        profiles.entry(email.to_lowercase()).or_insert(next).clone()
    }

    /// The ids of the import jobs, in order.
    fn job_ids(&self) -> Vec<String> {
        self.jobs
            .lock()
            .unwrap()
            .iter()
            .map(|job| job.id.clone())
            .collect()
    }

    /// `GET <job path> -> 200` for the `n`th import job, as [`Klaviyo::calls`] shows a poll.
    fn poll(&self, n: usize) -> String {
        let id = &self.job_ids()[n];
        format!("GET /api/profile-bulk-import-jobs/{id} -> 200")
    }

    /// Finishes an unfinished job: applies it, less the profiles it refuses, or cancels it.
    fn finish_job(&self, job: &mut Job) {
        if *self.jobs_cancelled.lock().unwrap() {
            job.status = "cancelled";
            return;
        }
        for (index, email) in job.emails.iter().enumerate() {
            if !valid_email(email) {
                let detail = format!("Invalid email address {email}.");
                job.errors.push((index, email.clone(), detail));
                continue;
            }
            let id = self.profile(email);
            let mut all = self.lists.lock().unwrap();
            for list in &job.lists {
                all.entry(list.clone()).or_default().insert(id.clone());
            }
        }
        job.status = "complete";
    }

    /// Adds a profile to lists directly, as if an earlier import had run.
    fn seed(&self, email: &str, lists: &[&str]) {
        let id = self.profile(email);
        let mut all = self.lists.lock().unwrap();
        for list in lists {
            all.entry(list.to_string()).or_default().insert(id.clone());
        }
    }
}

/// The fake's profile ids: 26 characters, numbered.
fn profile_id(number: usize) -> String {
    format!("01JPROFILE{number:016}")
}

/// Klaviyo's error body with one error.
fn error(status: u16, code: &str, title: &str, detail: &str, pointer: Option<&str>) -> Response {
    let mut item = json!({
        "id": "8d9f4f0e-7f1c-4b0e-9a57-3c1d2e5f6a7b",
        "status": status,
        "code": code,
        "title": title,
        "detail": detail,
    });
    if let Some(pointer) = pointer {
        item["source"] = json!({ "pointer": pointer });
    }
    let mut response = (
        StatusCode::from_u16(status).unwrap(),
        json!({ "errors": [item] }).to_string(),
    )
        .into_response();
    response
        .headers_mut()
        .insert("content-type", JSON_API.parse().unwrap());
    response
}

/// The fake's address check: one `@`, and a dot in the domain.
fn valid_email(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => !local.is_empty() && domain.contains('.') && !domain.contains('@'),
        None => false,
    }
}

/// Answers with `fault` if it stands for a failure, otherwise checks the headers every
/// request needs; `has_body` asks for the JSON:API media type too.
fn refusal(fault: Option<&Fault>, headers: &HeaderMap, has_body: bool) -> Option<Response> {
    match fault {
        Some(Fault::Throttled {
            retry_after,
            detail,
        }) => {
            let response = error(429, "throttled", "Request was throttled.", detail, None);
            return Some(with_retry_after(response, *retry_after));
        }
        Some(Fault::Unavailable) => {
            return Some(error(
                503,
                "service_unavailable",
                "Service unavailable.",
                "The service is temporarily unavailable, please try again later.",
                None,
            ));
        }
        Some(Fault::HtmlPage(status)) => return Some(html_page(*status)),
        Some(Fault::RevokedKey) => return Some(not_authenticated()),
        Some(Fault::MissingScope) => {
            return Some(error(
                403,
                "permission_denied",
                "You do not have permission to perform this action.",
                "The API key is missing a required scope.",
                None,
            ));
        }
        Some(Fault::Slow(_)) | None => {}
    }
    if header(headers, "authorization") != Some(&format!("Klaviyo-API-Key {KEY}")) {
        return Some(not_authenticated());
    }
    match header(headers, "revision") {
        Some(REVISION) => {}
        None => {
            return Some(error(
                400,
                "missing_revision",
                "Missing revision header.",
                "The revision header is required.",
                None,
            ));
        }
        Some(_) => {
            return Some(error(
                400,
                "invalid_revision",
                "Invalid revision.",
                "The revision header is not a known revision.",
                None,
            ));
        }
    }
    if has_body && header(headers, "content-type") != Some(JSON_API) {
        return Some(error(
            415,
            "unsupported_media_type",
            "Unsupported media type.",
            "Content-Type must be application/vnd.api+json.",
            None,
        ));
    }
    None
}

fn not_authenticated() -> Response {
    error(
        401,
        "not_authenticated",
        "Authentication credentials were not provided.",
        "Missing or invalid private key.",
        None,
    )
}

/// Records the request and waits out a slow fault.
async fn finish(
    klaviyo: &Klaviyo,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    fault: Option<Fault>,
    response: Response,
) -> Response {
    let (parts, answer) = response.into_parts();
    let answer = axum::body::to_bytes(answer, usize::MAX).await.unwrap();
    klaviyo.record(Received {
        method,
        uri: uri.to_string(),
        headers: headers.clone(),
        body: String::from_utf8_lossy(body).into_owned(),
        status: parts.status.as_u16(),
        answer: String::from_utf8_lossy(&answer).into_owned(),
    });
    let mut response = Response::from_parts(parts, axum::body::Body::from(answer));
    // Klaviyo sends its rate-limit headers on answers other than 429.
    if response.status() != StatusCode::TOO_MANY_REQUESTS {
        let limits = response.headers_mut();
        limits.insert("ratelimit-limit", "150".parse().unwrap());
        limits.insert("ratelimit-remaining", "149".parse().unwrap());
        limits.insert("ratelimit-reset", "42".parse().unwrap());
    }
    if let Some(Fault::Slow(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    response
}

async fn import_profiles(
    State(klaviyo): State<Arc<Klaviyo>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = klaviyo.next_fault();
    let response =
        refusal(fault.as_ref(), &headers, true).unwrap_or_else(|| import(&klaviyo, &body));
    finish(
        &klaviyo,
        Method::POST,
        &uri,
        &headers,
        &body,
        fault,
        response,
    )
    .await
}

fn import(klaviyo: &Klaviyo, body: &[u8]) -> Response {
    let invalid = |detail: &str, pointer: &str| {
        error(400, "invalid", "Invalid input.", detail, Some(pointer))
    };
    if body.len() > MAX_IMPORT_BYTES {
        return error(
            413,
            "payload_too_large",
            "Payload too large.",
            "At most 5MB.",
            None,
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return invalid("The payload is not valid JSON.", "/data");
    };
    let job = &request["data"];
    if job["type"] != "profile-bulk-import-job" {
        return invalid("Expected type profile-bulk-import-job.", "/data/type");
    }
    let Some(profiles) = job["attributes"]["profiles"]["data"].as_array() else {
        return invalid("Profiles are required.", "/data/attributes/profiles/data");
    };
    if profiles.is_empty() || profiles.len() > MAX_IMPORT {
        return invalid(
            "Between 1 and 10000 profiles are allowed.",
            "/data/attributes/profiles/data",
        );
    }
    if profiles.iter().any(|p| p["type"] != "profile") {
        return invalid("Expected type profile.", "/data/attributes/profiles/data");
    }
    let lists: Vec<String> = match job["relationships"]["lists"]["data"].as_array() {
        None => Vec::new(),
        Some(lists) => {
            let ids: Vec<String> = lists
                .iter()
                .filter(|list| list["type"] == "list")
                .filter_map(|list| list["id"].as_str().map(str::to_owned))
                .collect();
            if ids.len() != lists.len() {
                return invalid("Expected lists of type list.", "/data/relationships/lists");
            }
            if let Some(unknown) = ids
                .iter()
                .find(|id| ![LIST_ID, OTHER_LIST_ID].contains(&id.as_str()))
            {
                return error(
                    404,
                    "not_found",
                    "Not found.",
                    &format!("A list with id {unknown} does not exist."),
                    None,
                );
            }
            ids
        }
    };

    let emails: Vec<String> = profiles
        .iter()
        .map(|profile| {
            let email = profile["attributes"]["email"].as_str().unwrap_or_default();
            email.to_owned()
        })
        .collect();
    let mut jobs = klaviyo.jobs.lock().unwrap();
    let job = Job {
        id: format!("01JIMPORT{:017}", jobs.len() + 1),
        polls_left: *klaviyo.pending_polls.lock().unwrap(),
        status: "queued",
        emails,
        lists,
        errors: Vec::new(),
    };
    let answer = json!({ "data": job_resource(&job) });
    jobs.push(job);
    json_api(StatusCode::ACCEPTED, answer)
}

/// A job as Klaviyo shows it.
fn job_resource(job: &Job) -> Value {
    let done = matches!(job.status, "complete" | "cancelled");
    let total = job.emails.len();
    json!({
        "type": "profile-bulk-import-job",
        "id": job.id,
        "attributes": {
            "status": job.status,
            "created_at": "2026-12-03T22:00:00+00:00",
            "total_count": total,
            "completed_count": if job.status == "complete" { total } else { 0 },
            "failed_count": job.errors.len(),
            "completed_at": if done { json!("2026-12-03T22:01:00+00:00") } else { Value::Null },
            "expires_at": "2026-12-10T22:00:00+00:00",
        },
        "links": {"self": format!("https://a.klaviyo.com/api/profile-bulk-import-jobs/{}/", job.id)},
    })
}

/// A JSON:API answer.
fn json_api(status: StatusCode, body: Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert("content-type", JSON_API.parse().unwrap());
    response
}

async fn import_job(
    State(klaviyo): State<Arc<Klaviyo>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let fault = klaviyo.next_fault();
    let response =
        refusal(fault.as_ref(), &headers, false).unwrap_or_else(|| poll_job(&klaviyo, &id));
    finish(
        &klaviyo,
        Method::GET,
        &uri,
        &headers,
        &Bytes::new(),
        fault,
        response,
    )
    .await
}

fn poll_job(klaviyo: &Klaviyo, id: &str) -> Response {
    let mut jobs = klaviyo.jobs.lock().unwrap();
    let Some(job) = jobs.iter_mut().find(|job| job.id == id) else {
        return error(
            404,
            "not_found",
            "Not found.",
            "The job does not exist.",
            None,
        );
    };
    if matches!(job.status, "queued" | "processing") {
        if job.polls_left > 0 {
            job.polls_left -= 1;
            job.status = "processing";
        } else {
            klaviyo.finish_job(job);
        }
    }
    json_api(StatusCode::OK, json!({ "data": job_resource(job) }))
}

async fn import_errors(
    State(klaviyo): State<Arc<Klaviyo>>,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let fault = klaviyo.next_fault();
    let response = refusal(fault.as_ref(), &headers, false).unwrap_or_else(|| {
        let host = header(&headers, "host").unwrap();
        errors_page(&klaviyo, &id, &query, host)
    });
    finish(
        &klaviyo,
        Method::GET,
        &uri,
        &headers,
        &Bytes::new(),
        fault,
        response,
    )
    .await
}

fn errors_page(
    klaviyo: &Klaviyo,
    id: &str,
    query: &BTreeMap<String, String>,
    host: &str,
) -> Response {
    let jobs = klaviyo.jobs.lock().unwrap();
    let Some(job) = jobs.iter().find(|job| job.id == id) else {
        return error(
            404,
            "not_found",
            "Not found.",
            "The job does not exist.",
            None,
        );
    };
    let size = match *klaviyo.errors_page_size.lock().unwrap() {
        0 => 20,
        size => size,
    };
    let start: usize = query
        .get("page[cursor]")
        .map_or(0, |cursor| cursor.parse().unwrap());
    let data: Vec<Value> = job
        .errors
        .iter()
        .skip(start)
        .take(size)
        .map(|(index, email, detail)| {
            json!({
                "type": "import-error",
                "id": format!("{}-{index}", job.id),
                "attributes": {
                    "code": "invalid",
                    "title": "Invalid input.",
                    "detail": detail,
                    "source": {
                        "pointer": format!("/data/attributes/profiles/data/{index}/attributes/email"),
                    },
                    "original_payload": {"type": "profile", "attributes": {"email": email}},
                },
            })
        })
        .collect();
    let next = (start + size < job.errors.len()).then(|| {
        format!(
            "http://{host}/api/profile-bulk-import-jobs/{id}/import-errors?page%5Bcursor%5D={}",
            start + size
        )
    });
    json_api(
        StatusCode::OK,
        json!({"data": data, "links": {"self": "", "next": next}}),
    )
}

async fn list_profiles(
    State(klaviyo): State<Arc<Klaviyo>>,
    Path(list_id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = klaviyo.next_fault();
    let response = refusal(fault.as_ref(), &headers, false)
        .unwrap_or_else(|| page(&klaviyo, &list_id, &query));
    finish(
        &klaviyo,
        Method::GET,
        &uri,
        &headers,
        &body,
        fault,
        response,
    )
    .await
}

fn page(klaviyo: &Klaviyo, list_id: &str, query: &BTreeMap<String, String>) -> Response {
    if ![LIST_ID, OTHER_LIST_ID].contains(&list_id) {
        return error(
            404,
            "not_found",
            "Not found.",
            "The list does not exist.",
            None,
        );
    }
    let size: usize = match query.get("page[size]").map(|size| size.parse()) {
        None => 20,
        Some(Ok(size)) if (1..=MAX_PAGE).contains(&size) => size,
        Some(_) => {
            return error(
                400,
                "invalid",
                "Invalid input.",
                "page[size] must be between 1 and 100.",
                None,
            );
        }
    };
    // `any(email,["a@example.com","b@example.com"])`
    let emails: Option<Vec<String>> = query
        .get("filter")
        .and_then(|filter| filter.strip_prefix("any(email,"))
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|array| serde_json::from_str(array).ok());
    let Some(emails) = emails else {
        return error(
            400,
            "invalid",
            "Invalid input.",
            "The filter is not a valid any(email,[...]) filter.",
            None,
        );
    };
    let members = klaviyo
        .lists
        .lock()
        .unwrap()
        .get(list_id)
        .cloned()
        .unwrap_or_default();
    let profiles = klaviyo.profiles.lock().unwrap();
    let data: Vec<Value> = emails
        .iter()
        .filter_map(|email| profiles.get(email).map(|id| (email, id)))
        .filter(|(_, id)| members.contains(*id))
        .take(size)
        .map(|(email, id)| json!({"type": "profile", "id": id, "attributes": {"email": email}}))
        .collect();
    let answer =
        json!({"data": data, "links": {"self": "https://a.klaviyo.com/api/lists/", "next": null}});
    let mut response = answer.to_string().into_response();
    response
        .headers_mut()
        .insert("content-type", JSON_API.parse().unwrap());
    response
}

async fn remove_relationships(
    State(klaviyo): State<Arc<Klaviyo>>,
    Path(list_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = klaviyo.next_fault();
    let response = refusal(fault.as_ref(), &headers, true)
        .unwrap_or_else(|| unrelate(&klaviyo, &list_id, &body));
    finish(
        &klaviyo,
        Method::DELETE,
        &uri,
        &headers,
        &body,
        fault,
        response,
    )
    .await
}

fn unrelate(klaviyo: &Klaviyo, list_id: &str, body: &[u8]) -> Response {
    if ![LIST_ID, OTHER_LIST_ID].contains(&list_id) {
        return error(
            404,
            "not_found",
            "Not found.",
            "The list does not exist.",
            None,
        );
    }
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let Some(data) = request["data"].as_array() else {
        return error(
            400,
            "invalid",
            "Invalid input.",
            "data is required.",
            Some("/data"),
        );
    };
    if data.is_empty() || data.len() > MAX_RELATIONSHIPS {
        return error(
            400,
            "invalid",
            "Invalid input.",
            "Between 1 and 1000 profiles are allowed.",
            Some("/data"),
        );
    }
    let known: BTreeSet<String> = klaviyo.profiles.lock().unwrap().values().cloned().collect();
    let mut ids = Vec::new();
    for (index, item) in data.iter().enumerate() {
        let id = item["id"].as_str().unwrap_or_default();
        if item["type"] != "profile" || !known.contains(id) {
            return error(
                400,
                "invalid",
                "Invalid input.",
                "Expected the id of an existing profile.",
                Some(&format!("/data/{index}/id")),
            );
        }
        ids.push(id.to_owned());
    }
    if let Some(members) = klaviyo.lists.lock().unwrap().get_mut(list_id) {
        for id in ids {
            members.remove(&id);
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Starts the fake on a loopback port; returns it with its API host.
async fn start_klaviyo() -> (Arc<Klaviyo>, String) {
    let routes = axum::Router::new()
        .route(
            "/api/profile-bulk-import-jobs",
            axum::routing::post(import_profiles),
        )
        .route(
            "/api/profile-bulk-import-jobs/{id}",
            axum::routing::get(import_job),
        )
        .route(
            "/api/profile-bulk-import-jobs/{id}/import-errors",
            axum::routing::get(import_errors),
        )
        .route(
            "/api/lists/{list_id}/profiles",
            axum::routing::get(list_profiles),
        )
        .route(
            "/api/lists/{list_id}/relationships/profiles",
            axum::routing::delete(remove_relationships),
        );
    common::start(Klaviyo::default(), routes).await
}

fn secrets(key: &str) -> BTreeMap<String, String> {
    common::secrets(&[("api_key", key)])
}

fn connection(base_url: &str) -> toml::Table {
    let mut table = toml::toml! {
        api_key_env = "KLAVIYO_KEY"
        timeout_seconds = 1
        poll_interval_seconds = 1
    };
    table.insert("base_url".into(), base_url.into());
    table
}

fn connector(base_url: &str) -> KlaviyoConnector {
    let activation = toml::toml! { list_id = "Y6nRLr" };
    KlaviyoConnector::from_settings(&connection(base_url), &activation, &secrets(KEY)).unwrap()
}

fn batch(change: Change, members: Vec<Member>) -> Batch {
    common::batch("vip/klaviyo", change, members)
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
async fn adding_three_and_removing_one_leaves_two_in_the_list_and_keeps_the_profile() {
    let (klaviyo, url) = start_klaviyo().await;
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
        klaviyo.audience(),
        addresses(&["ann@example.com", "cat@example.com"])
    );
    assert!(
        klaviyo
            .profiles
            .lock()
            .unwrap()
            .contains_key("bob@example.com")
    );
    assert_eq!(
        klaviyo.calls(),
        [
            "POST /api/profile-bulk-import-jobs -> 202".to_owned(),
            klaviyo.poll(0),
            format!("GET /api/lists/{LIST_ID}/profiles -> 200"),
            format!("DELETE /api/lists/{LIST_ID}/relationships/profiles -> 204"),
        ]
    );
}

#[tokio::test]
async fn requests_carry_the_key_the_revision_the_media_type_and_profile_ids() {
    let (klaviyo, url) = start_klaviyo().await;
    let connector = connector(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    connector
        .deliver(&batch(Change::Remove, three_members()))
        .await
        .unwrap();

    let received = klaviyo.received();
    for request in &received {
        let header = |name: &str| request.headers.get(name).unwrap().to_str().unwrap();
        assert_eq!(header("authorization"), format!("Klaviyo-API-Key {KEY}"));
        assert_eq!(header("revision"), REVISION);
        assert_eq!(header("accept"), JSON_API);
    }
    assert_eq!(
        serde_json::from_str::<Value>(&received[0].body).unwrap(),
        json!({"data": {
            "type": "profile-bulk-import-job",
            "attributes": {"profiles": {"data": [
                {"type": "profile", "attributes": {"email": "ann@example.com"}},
                {"type": "profile", "attributes": {"email": "bob@example.com"}},
                {"type": "profile", "attributes": {"email": "cat@example.com"}},
            ]}},
            "relationships": {"lists": {"data": [{"type": "list", "id": LIST_ID}]}},
        }})
    );
    assert_eq!(
        received[1].uri,
        format!("/api/profile-bulk-import-jobs/{}", klaviyo.job_ids()[0])
    );
    let lookup: BTreeMap<String, String> = received[2]
        .uri
        .split_once('?')
        .unwrap()
        .1
        .split('&')
        .map(|pair| pair.split_once('=').unwrap())
        .map(|(key, value)| (form_decode(key), form_decode(value)))
        .collect();
    assert_eq!(
        lookup,
        BTreeMap::from([
            (
                "filter".to_owned(),
                r#"any(email,["ann@example.com","bob@example.com","cat@example.com"])"#.to_owned()
            ),
            ("fields[profile]".to_owned(), "email".to_owned()),
            ("page[size]".to_owned(), "100".to_owned()),
        ])
    );
    // The fake numbers profile ids in order of creation.
    assert_eq!(
        serde_json::from_str::<Value>(&received[3].body).unwrap(),
        json!({"data": [
            {"type": "profile", "id": "01JPROFILE0000000000000000"},
            {"type": "profile", "id": "01JPROFILE0000000000000001"},
            {"type": "profile", "id": "01JPROFILE0000000000000002"},
        ]})
    );
    assert_eq!(received[3].headers.get("content-type").unwrap(), JSON_API);
    assert!(klaviyo.audience().is_empty());
    assert!(!format!("{connector:?}").contains("0123456789abcdef"));
}

#[tokio::test]
async fn adding_the_same_batch_twice_leaves_one_profile_each_in_the_list() {
    let (klaviyo, url) = start_klaviyo().await;
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
        klaviyo.audience(),
        addresses(&["ann@example.com", "bob@example.com", "cat@example.com"])
    );
    assert_eq!(klaviyo.profiles.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn removing_the_same_batch_twice_sends_no_second_removal() {
    let (klaviyo, url) = start_klaviyo().await;
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
    assert!(klaviyo.audience().is_empty());
    assert_eq!(
        klaviyo.calls()[4..],
        [format!("GET /api/lists/{LIST_ID}/profiles -> 200")]
    );
}

#[tokio::test]
async fn removing_members_not_in_the_list_counts_as_removed_and_leaves_other_lists_alone() {
    let (klaviyo, url) = start_klaviyo().await;
    klaviyo.seed("ann@example.com", &[LIST_ID, OTHER_LIST_ID]);
    klaviyo.seed("bob@example.com", &[OTHER_LIST_ID]);

    let removed = connector(&url)
        .deliver(&batch(
            Change::Remove,
            vec![
                member("1", "ann@example.com"),
                member("2", "bob@example.com"),
                member("9", "nobody@example.com"),
            ],
        ))
        .await;

    assert_eq!(removed, Ok(accepted(&["1", "2", "9"])));
    assert!(klaviyo.audience().is_empty());
    assert_eq!(
        klaviyo.members_of(OTHER_LIST_ID),
        addresses(&["ann@example.com", "bob@example.com"])
    );
    // Only ann was in the list, so only her id is sent.
    assert_eq!(
        serde_json::from_str::<Value>(&klaviyo.received()[1].body).unwrap(),
        json!({"data": [{"type": "profile", "id": "01JPROFILE0000000000000000"}]})
    );
}

#[tokio::test]
async fn a_removal_of_more_than_a_hundred_looks_up_by_hundreds_and_removes_once() {
    let (klaviyo, url) = start_klaviyo().await;
    let members: Vec<Member> = (0..250)
        .map(|n| member(&n.to_string(), &format!("member{n}@example.com")))
        .collect();
    let connector = connector(&url);
    connector
        .deliver(&batch(Change::Add, members.clone()))
        .await
        .unwrap();

    let outcome = connector
        .deliver(&batch(Change::Remove, members))
        .await
        .unwrap();

    assert_eq!(outcome.accepted.len(), 250);
    assert!(klaviyo.audience().is_empty());
    let lookup = format!("GET /api/lists/{LIST_ID}/profiles -> 200");
    assert_eq!(
        klaviyo.calls()[2..],
        [
            lookup.clone(),
            lookup.clone(),
            lookup,
            format!("DELETE /api/lists/{LIST_ID}/relationships/profiles -> 204"),
        ]
    );
}

#[tokio::test]
async fn members_without_a_usable_address_are_rejected_and_never_sent() {
    let (klaviyo, url) = start_klaviyo().await;
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
    let body: Value = serde_json::from_str(&klaviyo.received()[0].body).unwrap();
    assert_eq!(
        body["data"]["attributes"]["profiles"]["data"],
        json!([{"type": "profile", "attributes": {"email": "ann@example.com"}}])
    );
    assert_eq!(klaviyo.audience(), addresses(&["ann@example.com"]));
}

#[tokio::test]
async fn a_batch_of_members_all_without_an_address_sends_nothing() {
    let (klaviyo, url) = start_klaviyo().await;

    let outcome = connector(&url)
        .deliver(&batch(Change::Remove, vec![member("1", "@example.com")]))
        .await
        .unwrap();

    assert_eq!(outcome.accepted, Vec::<String>::new());
    assert_eq!(outcome.rejected.len(), 1);
    assert!(klaviyo.received().is_empty());
}

#[tokio::test]
async fn a_profile_the_import_job_refuses_is_rejected_with_its_import_error_and_the_others_added() {
    let (klaviyo, url) = start_klaviyo().await;
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
                reason: "Klaviyo's import job refused the profile: Invalid input.: Invalid email \
                         address <member>. (invalid)"
                    .into(),
            }],
        })
    );
    assert_eq!(
        klaviyo.audience(),
        addresses(&["ann@example.com", "cat@example.com"])
    );
    let job = &klaviyo.job_ids()[0];
    assert_eq!(
        klaviyo.calls(),
        [
            "POST /api/profile-bulk-import-jobs -> 202".to_owned(),
            klaviyo.poll(0),
            format!("GET /api/profile-bulk-import-jobs/{job}/import-errors -> 200"),
        ]
    );
}

#[tokio::test]
async fn an_add_counts_only_once_its_import_job_is_complete_and_polls_the_job_of_the_202() {
    let (klaviyo, url) = start_klaviyo().await;
    *klaviyo.pending_polls.lock().unwrap() = 1;
    let started = Instant::now();

    let outcome = connector(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    let received = klaviyo.received();
    let answer: Value = serde_json::from_str(&received[0].answer).unwrap();
    let job = answer["data"]["id"].as_str().unwrap();
    assert_eq!(
        received[1].uri,
        format!("/api/profile-bulk-import-jobs/{job}")
    );
    assert_eq!(received[2].uri, received[1].uri);
    assert_eq!(received.len(), 3);
    // One poll interval (1 s) passes between the processing answer and the complete one.
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(klaviyo.audience().len(), 3);
}

#[tokio::test]
async fn import_errors_are_read_over_every_page() {
    let (klaviyo, url) = start_klaviyo().await;
    *klaviyo.errors_page_size.lock().unwrap() = 1;
    let members = vec![
        member("1", "ann@localhost"),
        member("2", "bob@example.com"),
        member("3", "cat@localhost"),
    ];

    let outcome = connector(&url)
        .deliver(&batch(Change::Add, members))
        .await
        .unwrap();

    assert_eq!(outcome.accepted, ["2"]);
    let rejected: Vec<&str> = outcome.rejected.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(rejected, ["1", "3"]);
    let job = &klaviyo.job_ids()[0];
    let errors = format!("GET /api/profile-bulk-import-jobs/{job}/import-errors -> 200");
    assert_eq!(
        klaviyo.calls()[1..],
        [klaviyo.poll(0), errors.clone(), errors]
    );
    assert_eq!(klaviyo.audience(), addresses(&["bob@example.com"]));
}

#[tokio::test]
async fn an_import_job_still_processing_when_the_wait_ends_is_retryable_and_polled_again_next_time()
{
    let (klaviyo, url) = start_klaviyo().await;
    *klaviyo.pending_polls.lock().unwrap() = 1;
    let mut settings = connection(&url);
    settings.insert("job_wait_seconds".into(), 1.into());
    let activation = toml::toml! { list_id = "Y6nRLr" };
    let connector = KlaviyoConnector::from_settings(&settings, &activation, &secrets(KEY)).unwrap();

    let first = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let remembered = format!("{connector:?}");
    let audience_meanwhile = klaviyo.audience();
    let second = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;

    let job = &klaviyo.job_ids()[0];
    assert_eq!(
        first,
        Err(DeliveryError::Retryable {
            message: format!(
                "Klaviyo import job {job} is still processing after 1 s; sending the batch again \
                 is safe, as an import merges into existing profiles and a list holds a profile \
                 once, and the next attempt in this process polls the same job"
            ),
        })
    );
    assert!(audience_meanwhile.is_empty());
    // The job waiting for the next attempt is remembered without the addresses it holds.
    assert!(remembered.contains(job.as_str()), "{remembered}");
    assert!(!remembered.contains("@example.com"), "{remembered}");
    assert_eq!(second, Ok(accepted(&["1", "2", "3"])));
    // One import: the second attempt finds the first one's job complete.
    assert_eq!(
        klaviyo.calls(),
        [
            "POST /api/profile-bulk-import-jobs -> 202".to_owned(),
            klaviyo.poll(0),
            klaviyo.poll(0)
        ]
    );
    assert_eq!(klaviyo.profiles.lock().unwrap().len(), 3);
    assert_eq!(klaviyo.audience().len(), 3);
}

#[tokio::test]
async fn a_cancelled_import_job_fails_the_batch_as_retryable_and_the_retry_imports_again() {
    let (klaviyo, url) = start_klaviyo().await;
    *klaviyo.jobs_cancelled.lock().unwrap() = true;

    let outcome = deliver_retrying(&connector(&url), &batch(Change::Add, three_members()), 2).await;

    let job = &klaviyo.job_ids()[1];
    assert_eq!(
        outcome,
        Err(DeliveryError::Retryable {
            message: format!(
                "Klaviyo import job {job} was cancelled; sending the batch again is safe, as an \
                 import merges into existing profiles and a list holds a profile once"
            ),
        })
    );
    assert_eq!(
        klaviyo.calls(),
        [
            "POST /api/profile-bulk-import-jobs -> 202".to_owned(),
            klaviyo.poll(0),
            "POST /api/profile-bulk-import-jobs -> 202".to_owned(),
            klaviyo.poll(1),
        ]
    );
    assert!(klaviyo.audience().is_empty());
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_a_bare_one_leaves_the_wait_open() {
    let (klaviyo, url) = start_klaviyo().await;
    klaviyo.fail_next([
        Fault::Throttled {
            retry_after: Some("1"),
            detail: "Request was throttled.",
        },
        Fault::Throttled {
            retry_after: None,
            detail: "Request was throttled.",
        },
    ]);
    let started = Instant::now();

    let outcome = deliver_retrying(&connector(&url), &batch(Change::Add, three_members()), 2).await;

    let elapsed = started.elapsed();
    assert_eq!(
        outcome,
        Err(DeliveryError::RateLimited {
            message: format!(
                "{url}/api/profile-bulk-import-jobs answered 429 Too Many Requests: Request was \
                 throttled.: Request was throttled. (throttled)"
            ),
            wait: None,
        })
    );
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(klaviyo.received().len(), 2);
    assert!(klaviyo.audience().is_empty());
}

#[tokio::test]
async fn a_429_without_retry_after_waits_as_long_as_its_detail_says_then_removes() {
    let (klaviyo, url) = start_klaviyo().await;
    klaviyo.seed("ann@example.com", &[LIST_ID]);
    klaviyo.fail_next([Fault::Throttled {
        retry_after: None,
        detail: "Request was throttled. Expected available in 1 second.",
    }]);
    let started = Instant::now();

    let outcome = deliver_retrying(
        &connector(&url),
        &batch(Change::Remove, vec![member("1", "ann@example.com")]),
        2,
    )
    .await;

    let elapsed = started.elapsed();
    assert_eq!(outcome, Ok(accepted(&["1"])));
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(
        klaviyo.calls(),
        [
            format!("GET /api/lists/{LIST_ID}/profiles -> 429"),
            format!("GET /api/lists/{LIST_ID}/profiles -> 200"),
            format!("DELETE /api/lists/{LIST_ID}/relationships/profiles -> 204"),
        ]
    );
    assert!(klaviyo.audience().is_empty());
}

#[tokio::test]
async fn a_revoked_key_is_an_auth_failure_sent_once() {
    let (klaviyo, url) = start_klaviyo().await;
    klaviyo.fail_next([Fault::RevokedKey]);

    let outcome = deliver_retrying(&connector(&url), &batch(Change::Add, three_members()), 5).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/api/profile-bulk-import-jobs answered 401 Unauthorized: Authentication \
                 credentials were not provided.: Missing or invalid private key. \
                 (not_authenticated); check the private API key in `api_key_env`, it may have \
                 been revoked"
            ),
        })
    );
    assert_eq!(klaviyo.received().len(), 1);
    assert!(klaviyo.audience().is_empty());
}

#[tokio::test]
async fn a_wrong_key_or_one_missing_a_scope_is_an_auth_failure() {
    let (klaviyo, url) = start_klaviyo().await;
    let activation = toml::toml! { list_id = "Y6nRLr" };
    let wrong = KlaviyoConnector::from_settings(
        &connection(&url),
        &activation,
        &secrets("pk_someone_else"),
    )
    .unwrap();
    klaviyo.seed("ann@example.com", &[LIST_ID]);
    klaviyo.fail_next([Fault::MissingScope]);

    let scopeless = connector(&url)
        .deliver(&batch(Change::Remove, vec![member("1", "ann@example.com")]))
        .await;
    let unknown = wrong.deliver(&batch(Change::Add, three_members())).await;

    assert_eq!(
        scopeless,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/api/lists/{LIST_ID}/profiles answered 403 Forbidden: You do not have \
                 permission to perform this action.: The API key is missing a required scope. \
                 (permission_denied); give the API key the lists:read, lists:write, \
                 profiles:read and profiles:write scopes"
            ),
        })
    );
    assert!(
        matches!(unknown, Err(DeliveryError::Auth { .. })),
        "{unknown:?}"
    );
    assert_eq!(klaviyo.audience(), addresses(&["ann@example.com"]));
}

#[tokio::test]
async fn an_unknown_revision_is_a_permanent_failure() {
    let (klaviyo, url) = start_klaviyo().await;
    let mut settings = connection(&url);
    settings.insert("revision".into(), "2023-02-22".into());
    let activation = toml::toml! { list_id = "Y6nRLr" };
    let connector = KlaviyoConnector::from_settings(&settings, &activation, &secrets(KEY)).unwrap();

    let outcome = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/api/profile-bulk-import-jobs answered 400 Bad Request: Invalid revision.: \
                 The revision header is not a known revision. (invalid_revision)"
            ),
        })
    );
    assert_eq!(klaviyo.received().len(), 1);
}

#[tokio::test]
async fn server_errors_and_html_pages_are_retried_up_to_max_attempts() {
    let (klaviyo, url) = start_klaviyo().await;
    let connector = connector(&url);

    klaviyo.fail_next([Fault::HtmlPage(502)]);
    let recovered = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;
    klaviyo.fail_next([Fault::Unavailable, Fault::Unavailable, Fault::Unavailable]);
    let exhausted = deliver_retrying(&connector, &batch(Change::Remove, three_members()), 3).await;

    assert_eq!(recovered, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        exhausted,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/api/lists/{LIST_ID}/profiles answered 503 Service Unavailable: Service \
                 unavailable.: The service is temporarily unavailable, please try again later. \
                 (service_unavailable)"
            ),
        })
    );
    let statuses: Vec<u16> = klaviyo.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [502, 202, 200, 503, 503, 503]);
    assert_eq!(klaviyo.audience().len(), 3);
}

#[tokio::test]
async fn an_html_error_page_says_so_without_quoting_it() {
    let (klaviyo, url) = start_klaviyo().await;
    klaviyo.fail_next([Fault::HtmlPage(524)]);

    let outcome = connector(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/api/profile-bulk-import-jobs answered 524 <unknown status code>: an HTML \
                 page instead of a Klaviyo error"
            ),
        })
    );
    assert!(klaviyo.audience().is_empty());
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retried_and_changes_nothing_twice() {
    let (klaviyo, url) = start_klaviyo().await;
    klaviyo.seed("ann@example.com", &[LIST_ID]);
    klaviyo.seed("bob@example.com", &[LIST_ID]);
    klaviyo.fail_next([
        Fault::Slow(Duration::ZERO),
        Fault::Slow(Duration::from_millis(1500)),
    ]);
    let connector = connector(&url);
    let leaving = vec![
        member("1", "ann@example.com"),
        member("2", "bob@example.com"),
    ];

    let direct = connector
        .deliver(&batch(Change::Remove, leaving.clone()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Remove, leaving), 3).await;

    let DeliveryError::Retryable { message } = direct.unwrap_err() else {
        panic!("a timeout is retryable");
    };
    assert!(
        message.starts_with(&format!(
            "DELETE to {url}/api/lists/{LIST_ID}/relationships/profiles timed out"
        )),
        "{message}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2"])));
    assert!(klaviyo.audience().is_empty());
    // The removal applied before its late answer, so the retry finds nobody to remove.
    assert_eq!(
        klaviyo.calls()[2..],
        [format!("GET /api/lists/{LIST_ID}/profiles -> 200")]
    );
    assert_eq!(klaviyo.profiles.lock().unwrap().len(), 2);
}

#[test]
fn klaviyo_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        api_key_env = "KLAVIYO_KEY"
        revision = "latest"
        batch_size = 20000
        site_id = "AbC123"
    };
    let activation = toml::toml! {
        list_id = "Y6n-RLr"
    };

    let errors =
        KlaviyoConnector::from_settings(&connection, &activation, &secrets("AbC123")).unwrap_err();

    let error = common::problem;
    assert_eq!(
        errors,
        [
            error(
                "site_id",
                "unknown key in the connection settings; known keys: api_key_env, base_url, \
                 revision, batch_size, timeout_seconds, poll_interval_seconds, job_wait_seconds"
            ),
            error(
                "api_key_env",
                "the key does not start with `pk_`; use a private API key, not the public site id"
            ),
            error(
                "revision",
                "expected a Klaviyo API revision such as `2026-01-15`, got `latest`"
            ),
            error(
                "batch_size",
                "must be between 1 and 10000 in the connection settings, got 20000"
            ),
            error(
                "list_id",
                "expected a Klaviyo list id of letters and digits, got `Y6n-RLr`"
            ),
        ]
    );
}

#[test]
fn a_klaviyo_activation_without_a_list_id_is_refused_but_its_connection_checks_alone() {
    let connection = toml::toml! { api_key_env = "KLAVIYO_KEY" };

    let errors = KlaviyoConnector::from_settings(&connection, &toml::Table::new(), &secrets(KEY))
        .unwrap_err();
    let alone = segmentd_connectors::check_connection("klaviyo", &connection, &secrets(KEY));
    let unset = segmentd_connectors::check_connection("klaviyo", &connection, &BTreeMap::new());

    assert_eq!(
        errors,
        [SettingsError {
            field: "list_id".into(),
            message: "missing; set it to the Klaviyo list's id".into(),
        }]
    );
    assert_eq!(alone, Ok(()));
    assert_eq!(
        unset,
        Err(vec![SettingsError {
            field: "api_key_env".into(),
            message: "the environment variable `KLAVIYO_KEY` is not set; export it with a \
                      Klaviyo private API key"
                .into(),
        }])
    );
}

#[test]
fn klaviyo_batch_size_defaults_to_1000_and_may_rise_to_10000() {
    let activation = toml::toml! { list_id = "Y6nRLr" };
    let default = toml::toml! { api_key_env = "KLAVIYO_KEY" };
    let largest = toml::toml! {
        api_key_env = "KLAVIYO_KEY"
        batch_size = 10000
    };

    let by_default =
        segmentd_connectors::build("klaviyo", &default, &activation, &secrets(KEY)).unwrap();
    let at_most =
        segmentd_connectors::build("klaviyo", &largest, &activation, &secrets(KEY)).unwrap();

    assert_eq!(
        (by_default.kind(), by_default.max_batch_size()),
        ("klaviyo", 1_000)
    );
    assert_eq!(at_most.max_batch_size(), 10_000);
    assert!(segmentd_connectors::KINDS.contains(&"klaviyo"));
}

#[tokio::test]
async fn an_api_key_with_a_trailing_newline_is_refused_at_load_naming_api_key_env() {
    let (klaviyo, url) = start_klaviyo().await;
    let activation = toml::toml! { list_id = "Y6nRLr" };
    let with_newline = secrets(&format!("{KEY}\n"));

    let built = KlaviyoConnector::from_settings(&connection(&url), &activation, &with_newline);
    let checked = KlaviyoConnector::check_connection(&connection(&url), &with_newline);

    let expected = vec![SettingsError {
        field: "api_key_env".into(),
        message: "the API key holds characters an HTTP header cannot carry, such as a trailing \
                  newline; check the environment variable's value"
            .into(),
    }];
    assert_eq!(built.unwrap_err(), expected);
    assert_eq!(checked, Err(expected));
    assert!(klaviyo.received().is_empty());
    assert!(klaviyo.audience().is_empty());
}
