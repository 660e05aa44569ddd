//! The Google Ads connector against a fake Google Ads API on loopback.
//!
//! The fake serves the REST shape of the offline user data job flow: `offlineUserDataJobs:create`,
//! `offlineUserDataJobs/{id}:addOperations`, `offlineUserDataJobs/{id}:run`,
//! `googleAds:search` on `offline_user_data_job`, and an OAuth token endpoint. It checks the
//! bearer token, `developer-token` and `login-customer-id` headers, the job type and user list,
//! the shape and hashing of every user identifier, the identifier count of each request, and
//! refuses jobs that mix creates and removes. Jobs go `PENDING -> RUNNING -> SUCCESS` (after a
//! configurable number of polls); only a job that succeeds changes the user list, which the
//! fake keeps as a set of user identifiers. Faults queued per endpoint answer the next
//! requests the way Google fails: quota errors, 429s, 5xx, an HTML page, a slow answer, an
//! expired token, concurrent modification, a foreign list, a failed job.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::google_ads::GoogleAdsConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    Fake, accepted, deliver_retrying, form_decode, header, member, three_members, with_retry_after,
};

// Digests computed outside this code with `printf '%s' <text> | sha256sum`.
/// `ann@example.com`
const ANN: &str = "71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476";
/// `bob@example.com`
const BOB: &str = "5ff860bf1190596c7188ab851db691f0f3169c453936e9e1eba2f9a47f7a0018";
/// `cat@example.com`
const CAT: &str = "d2d66462631a2d1b0ca18e8b66dc594a58a1cdd569028e1d97f6be4ff0d5fb68";
/// `jsmith@gmail.com`
const JSMITH_GMAIL: &str = "2d974c2de0956a540ed36cfa50622b60ab5de35cec066ad1b6d02832f96bbf81";
/// `+447700900123`
const PHONE_447700900123: &str = "a8acc3a90a7b4e4dc65e93db9240ed26523050ef754d63b75b5161de76781436";
/// `+16505551212`
const PHONE_16505551212: &str = "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8";
/// `ann`
const FIRST_ANN: &str = "49915e0d7d4b402e3017d010bc1c0e83cac6c797d6c16e66340fe3268693a6a1";
/// `smith`
const LAST_SMITH: &str = "6627835f988e2c5e50533d491163072d3f4f41f5c8b04630150debb3722ca2dd";

const ACCESS_TOKEN: &str = "ya29.fixed-access-token";
const DEVELOPER_TOKEN: &str = "dev-token-ABC123";
const CLIENT_ID: &str = "1234.apps.googleusercontent.com";
const CLIENT_SECRET: &str = "client-secret";
const REFRESH_TOKEN: &str = "1//refresh-token";
const CUSTOMER: &str = "1234567890";
const LOGIN_CUSTOMER: &str = "9876543210";
const USER_LIST: &str = "customers/1234567890/userLists/555";
/// The real per-request ceiling of user identifiers.
const MAX_IDENTIFIERS: usize = 100_000;

/// The endpoints a fault can be queued on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Create,
    Add,
    Run,
    Search,
    Token,
}

/// One failure the fake answers a request with instead of its normal answer.
#[derive(Debug, Clone)]
enum Fault {
    /// HTTP 429 with Google's `RESOURCE_EXHAUSTED` quota error in the body, with this
    /// `retryDelay` in the quota error details if any.
    ResourceExhausted { retry_delay: Option<&'static str> },
    /// HTTP 429 without a body, with this `Retry-After` if any (a front end's answer).
    TooManyRequests(Option<&'static str>),
    /// HTTP 503 `UNAVAILABLE`.
    Unavailable,
    /// An HTML error page with this status.
    HtmlPage(u16),
    /// The normal answer, sent after this delay (the request takes effect at once).
    Slow(Duration),
    /// HTTP 401: the access token has expired (the fake forgets it).
    ExpiredToken,
    /// HTTP 409 `CONCURRENT_MODIFICATION`.
    ConcurrentModification,
    /// HTTP 403 `USER_PERMISSION_DENIED`: the list belongs to another account.
    PermissionDenied,
    /// At the token endpoint: `invalid_grant`, the refresh token is revoked.
    InvalidGrant,
}

/// A job's state on the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Pending,
    Running { polls_left: u32 },
    Success,
    Failed,
}

/// An offline user data job on the fake.
#[derive(Debug, Clone)]
struct Job {
    user_list: String,
    consent: Value,
    /// `create` or `remove`, once the first operation is added.
    verb: Option<String>,
    /// The user identifiers of the operations added, each as canonical JSON.
    identifiers: Vec<(String, String)>,
    status: Status,
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
struct Received {
    step: Step,
    path: String,
    body: Value,
    status: u16,
}

/// The fake Google Ads API: its account, the faults queued, each on its endpoint, and the
/// requests received.
type Ads = Fake<Account, Received, (Step, Fault)>;

/// The one user list the fake's account holds, its jobs and its tokens.
#[derive(Default)]
struct Account {
    /// The user list: canonical JSON of each user identifier it holds.
    list: Mutex<BTreeSet<String>>,
    jobs: Mutex<BTreeMap<u64, Job>>,
    /// Values the fake refuses as malformed, through partial failure.
    refused: Mutex<BTreeSet<String>>,
    /// Polls a run job answers `RUNNING` before it succeeds.
    running_polls: Mutex<u32>,
    /// When set, jobs end `FAILED` instead of `SUCCESS`.
    jobs_fail: Mutex<bool>,
    /// The most identifiers one `addOperations` request may hold.
    max_identifiers: Mutex<usize>,
    /// Access tokens the fake accepts.
    tokens: Mutex<BTreeSet<String>>,
    issued: Mutex<u32>,
    /// The `expires_in` the token endpoint answers, 3599 unless set.
    token_lifetime: Mutex<Option<u64>>,
}

impl Ads {
    /// The list as sorted `kind=value` strings, such as `hashedEmail=<digest>`.
    fn list(&self) -> Vec<String> {
        self.list
            .lock()
            .unwrap()
            .iter()
            .map(|identifier| {
                let value: Value = serde_json::from_str(identifier).unwrap();
                let (kind, value) = value.as_object().unwrap().iter().next().unwrap();
                match value {
                    Value::String(text) => format!("{kind}={text}"),
                    other => format!("{kind}={other}"),
                }
            })
            .collect()
    }

    fn steps(&self) -> Vec<(Step, u16)> {
        self.received()
            .iter()
            .map(|request| (request.step, request.status))
            .collect()
    }

    fn jobs(&self) -> Vec<Job> {
        self.jobs.lock().unwrap().values().cloned().collect()
    }

    /// Queues `faults` to answer the next requests to `step`.
    fn fail_at(&self, step: Step, faults: impl IntoIterator<Item = Fault>) {
        self.fail_next(faults.into_iter().map(|fault| (step, fault)));
    }
}

/// A Google Ads API error envelope with one `GoogleAdsError`.
fn ads_error(status: u16, rpc: &str, category: &str, code: &str, message: &str) -> Response {
    let body = json!({"error": {
        "code": status,
        "message": "Request contains an invalid argument.",
        "status": rpc,
        "details": [{
            "@type": "type.googleapis.com/google.ads.googleads.v24.errors.GoogleAdsFailure",
            "errors": [{"errorCode": {category: code}, "message": message}],
            "requestId": "fake-request-1",
        }],
    }});
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

async fn handle(
    State(ads): State<Arc<Ads>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let step = if path == "/token" {
        Step::Token
    } else if path.ends_with("offlineUserDataJobs:create") {
        Step::Create
    } else if path.ends_with(":addOperations") {
        Step::Add
    } else if path.ends_with(":run") {
        Step::Run
    } else {
        Step::Search
    };
    let fault = ads
        .next_fault_where(|(at, _)| *at == step)
        .map(|(_, fault)| fault);
    let delay = match fault {
        Some(Fault::Slow(delay)) => delay,
        _ => Duration::ZERO,
    };
    let response = match step {
        Step::Token => token(&ads, &body, fault),
        _ => api(&ads, step, &path, &headers, &body, fault),
    };
    ads.record(Received {
        step,
        path,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        status: response.status().as_u16(),
    });
    // The request took effect before the delay, as on a platform that answers late.
    tokio::time::sleep(delay).await;
    response
}

/// The OAuth token endpoint: `grant_type=refresh_token` with the client credentials.
fn token(ads: &Ads, body: &[u8], fault: Option<Fault>) -> Response {
    if let Some(Fault::InvalidGrant) = fault {
        let body = json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."});
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    let form: BTreeMap<String, String> = String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (form_decode(key), form_decode(value)))
        .collect();
    let expected = [
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("grant_type", "refresh_token"),
        ("refresh_token", REFRESH_TOKEN),
    ];
    if expected
        .iter()
        .any(|(key, value)| form.get(*key).map(String::as_str) != Some(value))
    {
        let body = json!({"error": "invalid_client", "error_description": "Unauthorized"});
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    let mut issued = ads.issued.lock().unwrap();
    *issued += 1;
    let token = format!("ya29.issued-{issued}");
    ads.tokens.lock().unwrap().insert(token.clone());
    axum::Json(json!({
        "access_token": token,
        "expires_in": ads.token_lifetime.lock().unwrap().unwrap_or(3599),
        "scope": "https://www.googleapis.com/auth/adwords",
        "token_type": "Bearer",
    }))
    .into_response()
}

fn api(
    ads: &Ads,
    step: Step,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    fault: Option<Fault>,
) -> Response {
    match fault {
        Some(Fault::ResourceExhausted { retry_delay }) => {
            let mut error = json!({
                "errorCode": {"quotaError": "RESOURCE_EXHAUSTED"},
                "message": "Resource has been exhausted (e.g. check quota).",
            });
            if let Some(delay) = retry_delay {
                error["details"] = json!({"quotaErrorDetails": {
                    "rateScope": "DEVELOPER",
                    "rateName": "Number of operations for basic access",
                    "retryDelay": delay,
                }});
            }
            let body = json!({"error": {
                "code": 429,
                "message": "Resource has been exhausted (e.g. check quota).",
                "status": "RESOURCE_EXHAUSTED",
                "details": [{
                    "@type": "type.googleapis.com/google.ads.googleads.v24.errors.GoogleAdsFailure",
                    "errors": [error],
                    "requestId": "fake-request-1",
                }],
            }});
            return (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
        }
        Some(Fault::TooManyRequests(retry_after)) => {
            return with_retry_after(StatusCode::TOO_MANY_REQUESTS.into_response(), retry_after);
        }
        Some(Fault::Unavailable) => {
            let body = json!({"error": {
                "code": 503,
                "message": "The service is currently unavailable.",
                "status": "UNAVAILABLE",
            }});
            return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        }
        Some(Fault::HtmlPage(status)) => {
            let page = "<!DOCTYPE html><html lang=en><title>Error 502 (Server Error)!!1</title>\
                        <p>The server encountered a temporary error.</p></html>";
            let mut response = page.into_response();
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("content-type", "text/html; charset=UTF-8".parse().unwrap());
            return response;
        }
        Some(Fault::ExpiredToken) => {
            if let Some(token) = bearer(headers) {
                ads.tokens.lock().unwrap().remove(&token);
            }
            return ads_error(
                401,
                "UNAUTHENTICATED",
                "authenticationError",
                "OAUTH_TOKEN_EXPIRED",
                "Authentication of the request failed: the OAuth token has expired.",
            );
        }
        Some(Fault::ConcurrentModification) => {
            return ads_error(
                409,
                "ABORTED",
                "databaseError",
                "CONCURRENT_MODIFICATION",
                "Multiple requests were attempting to modify the same resource at once.",
            );
        }
        Some(Fault::PermissionDenied) => {
            return ads_error(
                403,
                "PERMISSION_DENIED",
                "authorizationError",
                "USER_PERMISSION_DENIED",
                "User doesn't have permission to access customer.",
            );
        }
        Some(Fault::Slow(_) | Fault::InvalidGrant) | None => {}
    }

    let token_ok = bearer(headers).is_some_and(|token| ads.tokens.lock().unwrap().contains(&token));
    if !token_ok {
        return ads_error(
            401,
            "UNAUTHENTICATED",
            "authenticationError",
            "OAUTH_TOKEN_INVALID",
            "Oauth token is invalid.",
        );
    }
    if header(headers, "developer-token") != Some(DEVELOPER_TOKEN) {
        return ads_error(
            403,
            "PERMISSION_DENIED",
            "authorizationError",
            "DEVELOPER_TOKEN_NOT_APPROVED",
            "The developer token is not approved.",
        );
    }
    if header(headers, "login-customer-id") != Some(LOGIN_CUSTOMER) {
        return ads_error(
            403,
            "PERMISSION_DENIED",
            "authorizationError",
            "USER_PERMISSION_DENIED",
            "User doesn't have permission to access customer. Note: If you're accessing a \
             client customer, the manager's customer id must be set in the 'login-customer-id' \
             header.",
        );
    }
    let prefix = format!("/v24/customers/{CUSTOMER}/");
    let Some(rest) = path.strip_prefix(&prefix) else {
        return ads_error(
            404,
            "NOT_FOUND",
            "requestError",
            "RESOURCE_NOT_FOUND",
            "Not found.",
        );
    };
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "requestError",
            "INVALID_INPUT",
            "Not JSON.",
        );
    };
    match step {
        Step::Create => create(ads, &request),
        Step::Add => add_operations(ads, job_id(rest), &request),
        Step::Run => run(ads, job_id(rest)),
        _ if rest == "googleAds:search" => search(ads, &request),
        _ => ads_error(
            404,
            "NOT_FOUND",
            "requestError",
            "RESOURCE_NOT_FOUND",
            "Not found.",
        ),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    header(headers, "authorization")?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

/// The job id of `offlineUserDataJobs/{id}:{method}`.
fn job_id(rest: &str) -> Option<u64> {
    let job = rest.strip_prefix("offlineUserDataJobs/")?;
    job.split(':').next()?.parse().ok()
}

fn create(ads: &Ads, request: &Value) -> Response {
    let job = &request["job"];
    let metadata = &job["customerMatchUserListMetadata"];
    if job["type"] != "CUSTOMER_MATCH_USER_LIST" || metadata["userList"] != USER_LIST {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "offlineUserDataJobError",
            "INVALID_USER_LIST_ID",
            "The user list ID provided for the job is invalid.",
        );
    }
    let mut jobs = ads.jobs.lock().unwrap();
    let id = 7000 + jobs.len() as u64 + 1;
    jobs.insert(
        id,
        Job {
            user_list: USER_LIST.into(),
            consent: metadata["consent"].clone(),
            verb: None,
            identifiers: Vec::new(),
            status: Status::Pending,
        },
    );
    axum::Json(json!({ "resourceName": format!("customers/{CUSTOMER}/offlineUserDataJobs/{id}") }))
        .into_response()
}

/// Checks one user identifier; `Some(field)` names the malformed field.
fn malformed_field(identifier: &Value, refused: &BTreeSet<String>) -> Option<&'static str> {
    let digest = |value: &Value| {
        value.as_str().is_some_and(|text| {
            text.len() == 64
                && text
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                && !refused.contains(text)
        })
    };
    let fields = identifier.as_object()?;
    if fields.len() != 1 {
        return Some("user_identifiers");
    }
    let (name, value) = fields.iter().next().unwrap();
    match name.as_str() {
        "hashedEmail" => (!digest(value)).then_some("hashed_email"),
        "hashedPhoneNumber" => (!digest(value)).then_some("hashed_phone_number"),
        "addressInfo" => {
            if !digest(&value["hashedFirstName"]) {
                return Some("address_info.hashed_first_name");
            }
            if !digest(&value["hashedLastName"]) {
                return Some("address_info.hashed_last_name");
            }
            let country = value["countryCode"].as_str().unwrap_or_default();
            if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
                return Some("address_info.country_code");
            }
            let postal = value["postalCode"].as_str().unwrap_or_default();
            if postal.is_empty() || postal.len() == 64 {
                return Some("address_info.postal_code");
            }
            None
        }
        _ => Some("user_identifiers"),
    }
}

fn add_operations(ads: &Ads, id: Option<u64>, request: &Value) -> Response {
    let mut jobs = ads.jobs.lock().unwrap();
    let Some(job) = id.and_then(|id| jobs.get_mut(&id)) else {
        return ads_error(
            404,
            "NOT_FOUND",
            "requestError",
            "RESOURCE_NOT_FOUND",
            "No such job.",
        );
    };
    if job.status != Status::Pending {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "offlineUserDataJobError",
            "INVALID_OPERATION_ORDER",
            "The job is not pending.",
        );
    }
    if request["enablePartialFailure"] != true {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "requestError",
            "INVALID_INPUT",
            "Want partial failure.",
        );
    }
    let Some(operations) = request["operations"]
        .as_array()
        .filter(|ops| !ops.is_empty())
    else {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "requestError",
            "INVALID_INPUT",
            "No operations.",
        );
    };
    let mut parsed = Vec::new();
    let mut count = 0;
    for operation in operations {
        let Some((verb, user_data)) = operation
            .as_object()
            .and_then(|o| (o.len() == 1).then(|| o.iter().next()).flatten())
        else {
            return ads_error(
                400,
                "INVALID_ARGUMENT",
                "requestError",
                "INVALID_INPUT",
                "Bad operation.",
            );
        };
        if verb != "create" && verb != "remove" {
            return ads_error(
                400,
                "INVALID_ARGUMENT",
                "requestError",
                "INVALID_INPUT",
                "Bad operation.",
            );
        }
        if job.verb.as_deref().is_some_and(|known| known != verb)
            || parsed
                .iter()
                .any(|(other, _): &(&String, &Vec<Value>)| *other != verb)
        {
            return ads_error(
                400,
                "INVALID_ARGUMENT",
                "offlineUserDataJobError",
                "CONFLICTING_OPERATION",
                "Mixing creation and removal of offline data in the same job is not allowed.",
            );
        }
        let Some(identifiers) = user_data["userIdentifiers"]
            .as_array()
            .filter(|ids| !ids.is_empty())
        else {
            return ads_error(
                400,
                "INVALID_ARGUMENT",
                "offlineUserDataJobError",
                "MISSING_USER_IDENTIFIER",
                "User identifier is missing.",
            );
        };
        count += identifiers.len();
        parsed.push((verb, identifiers));
    }
    if count > *ads.max_identifiers.lock().unwrap() {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "offlineUserDataJobError",
            "TOO_MANY_USER_IDENTIFIERS",
            "Too many user identifiers in one request.",
        );
    }
    if parsed[0].0 == "create" && job.consent["adUserData"] != "GRANTED" {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "offlineUserDataJobError",
            "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
            "The customer has not accepted the customer data terms.",
        );
    }

    let refused = ads.refused.lock().unwrap().clone();
    let mut errors = Vec::new();
    for (index, (verb, identifiers)) in parsed.iter().enumerate() {
        let bad = identifiers.iter().enumerate().find_map(|(position, id)| {
            malformed_field(id, &refused).map(|field| (position, field))
        });
        if let Some((position, field)) = bad {
            errors.push(json!({
                "errorCode": {"offlineUserDataJobError": "INVALID_SHA256_FORMAT"},
                "message": "The SHA256 encoded value is malformed.",
                "location": {"fieldPathElements": [
                    {"fieldName": "operations", "index": index},
                    {"fieldName": verb},
                    {"fieldName": "user_identifiers", "index": position},
                    {"fieldName": field},
                ]},
            }));
            continue;
        }
        job.verb = Some((*verb).clone());
        for identifier in identifiers.iter() {
            job.identifiers
                .push(((*verb).clone(), identifier.to_string()));
        }
    }
    if errors.is_empty() {
        return axum::Json(json!({})).into_response();
    }
    axum::Json(json!({"partialFailureError": {
        "code": 3,
        "message": "Multiple errors in 'details'. First error: The SHA256 encoded value is malformed.",
        "details": [{
            "@type": "type.googleapis.com/google.ads.googleads.v24.errors.GoogleAdsFailure",
            "errors": errors,
            "requestId": "fake-request-2",
        }],
    }}))
    .into_response()
}

fn run(ads: &Ads, id: Option<u64>) -> Response {
    let mut jobs = ads.jobs.lock().unwrap();
    let Some(job) = id.and_then(|id| jobs.get_mut(&id)) else {
        return ads_error(
            404,
            "NOT_FOUND",
            "requestError",
            "RESOURCE_NOT_FOUND",
            "No such job.",
        );
    };
    if job.status != Status::Pending {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "offlineUserDataJobError",
            "INVALID_OPERATION_ORDER",
            "The job is not pending.",
        );
    }
    job.status = Status::Running {
        polls_left: *ads.running_polls.lock().unwrap(),
    };
    axum::Json(json!({
        "name": format!("customers/{CUSTOMER}/operations/run-{}", id.unwrap()),
        "metadata": {
            "@type": "type.googleapis.com/google.ads.googleads.v24.resources.OfflineUserDataJobMetadata",
        },
    }))
    .into_response()
}

fn search(ads: &Ads, request: &Value) -> Response {
    let query = request["query"].as_str().unwrap_or_default();
    let Some(id) = query
        .strip_prefix("SELECT ")
        .filter(|_| query.contains(" FROM offline_user_data_job WHERE "))
        .and_then(|_| query.rsplit_once("offline_user_data_job.id = "))
        .and_then(|(_, id)| id.trim().parse::<u64>().ok())
    else {
        return ads_error(
            400,
            "INVALID_ARGUMENT",
            "queryError",
            "UNEXPECTED_INPUT",
            "Bad query.",
        );
    };
    let mut jobs = ads.jobs.lock().unwrap();
    let Some(job) = jobs.get_mut(&id) else {
        return axum::Json(json!({"fieldMask": "offlineUserDataJob.status"})).into_response();
    };
    if let Status::Running { polls_left } = job.status {
        if polls_left > 0 {
            job.status = Status::Running {
                polls_left: polls_left - 1,
            };
        } else if *ads.jobs_fail.lock().unwrap() {
            job.status = Status::Failed;
        } else {
            let mut list = ads.list.lock().unwrap();
            for (verb, identifier) in &job.identifiers {
                if verb == "create" {
                    list.insert(identifier.clone());
                } else {
                    list.remove(identifier);
                }
            }
            job.status = Status::Success;
        }
    }
    let mut found = json!({
        "resourceName": format!("customers/{CUSTOMER}/offlineUserDataJobs/{id}"),
        "id": id.to_string(),
        "status": match job.status {
            Status::Pending => "PENDING",
            Status::Running { .. } => "RUNNING",
            Status::Success => "SUCCESS",
            Status::Failed => "FAILED",
        },
    });
    if job.status == Status::Failed {
        found["failureReason"] = json!("UNKNOWN");
    }
    axum::Json(json!({
        "results": [{"offlineUserDataJob": found}],
        "fieldMask": "offlineUserDataJob.resourceName,offlineUserDataJob.status,offlineUserDataJob.failureReason",
    }))
    .into_response()
}

/// Starts the fake on a loopback port; returns it with its base URL.
async fn start_ads() -> (Arc<Ads>, String) {
    let ads = Ads::default();
    *ads.max_identifiers.lock().unwrap() = MAX_IDENTIFIERS;
    ads.tokens.lock().unwrap().insert(ACCESS_TOKEN.to_owned());
    let routes = axum::Router::new().fallback(axum::routing::post(handle));
    common::start(ads, routes).await
}

fn secrets() -> BTreeMap<String, String> {
    common::secrets(&[
        ("developer_token", DEVELOPER_TOKEN),
        ("access_token", ACCESS_TOKEN),
    ])
}

fn connection(base_url: &str) -> toml::Table {
    let mut table = toml::toml! {
        developer_token_env = "GOOGLE_ADS_DEVELOPER_TOKEN"
        access_token_env = "GOOGLE_ADS_ACCESS_TOKEN"
        customer_id = "123-456-7890"
        login_customer_id = "987-654-3210"
        timeout_seconds = 1
        poll_interval_seconds = 1
    };
    table.insert("base_url".into(), base_url.into());
    table
}

fn activation() -> toml::Table {
    toml::toml! {
        user_list_id = 555
        ad_user_data = "granted"
        ad_personalization = "granted"
    }
}

fn connector_with(connection: toml::Table, activation: toml::Table) -> GoogleAdsConnector {
    let mut secrets = secrets();
    if connection.contains_key("refresh_token_env") {
        secrets.remove("access_token");
        secrets.insert("client_id".into(), CLIENT_ID.into());
        secrets.insert("client_secret".into(), CLIENT_SECRET.into());
        secrets.insert("refresh_token".into(), REFRESH_TOKEN.into());
    }
    GoogleAdsConnector::from_settings(&connection, &activation, &secrets).unwrap()
}

fn email_only(base_url: &str) -> GoogleAdsConnector {
    connector_with(connection(base_url), activation())
}

fn all_identifiers(base_url: &str) -> GoogleAdsConnector {
    let mut activation = activation();
    let identifiers: toml::Table = r#"
        email = "email"
        phone = "mobile"
        first_name = "first"
        last_name = "last"
        country_code = "country"
        postal_code = "zip"
    "#
    .parse()
    .unwrap();
    activation.insert("identifiers".into(), identifiers.into());
    connector_with(connection(base_url), activation)
}

fn batch(change: Change, members: Vec<Member>) -> Batch {
    common::batch("vip/google", change, members)
}

fn emails(hashes: &[&str]) -> Vec<String> {
    let mut list: Vec<String> = hashes.iter().map(|h| format!("hashedEmail={h}")).collect();
    list.sort();
    list
}

use Step::{Add, Create, Run, Search, Token};

#[tokio::test]
async fn adding_three_and_removing_one_leaves_the_two_expected_hashes() {
    let (ads, url) = start_ads().await;
    let google = email_only(&url);

    let added = google.deliver(&batch(Change::Add, three_members())).await;
    let removed = google
        .deliver(&batch(
            Change::Remove,
            vec![member("2", &[("email", "bob@example.com")])],
        ))
        .await;

    assert_eq!(added, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(removed, Ok(accepted(&["2"])));
    assert_eq!(ads.list(), emails(&[ANN, CAT]));
    assert_eq!(
        ads.steps(),
        [
            (Create, 200),
            (Add, 200),
            (Run, 200),
            (Search, 200),
            (Create, 200),
            (Add, 200),
            (Run, 200),
            (Search, 200)
        ]
    );
    let jobs = ads.jobs();
    assert_eq!(jobs[0].verb.as_deref(), Some("create"));
    assert_eq!(jobs[1].verb.as_deref(), Some("remove"));
    assert_eq!(jobs[0].user_list, USER_LIST);
}

#[tokio::test]
async fn adds_carry_consent_and_removes_do_not() {
    let (ads, url) = start_ads().await;
    let google = email_only(&url);

    google
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    google
        .deliver(&batch(Change::Remove, three_members()))
        .await
        .unwrap();

    let jobs = ads.jobs();
    assert_eq!(
        jobs[0].consent,
        json!({"adUserData": "GRANTED", "adPersonalization": "GRANTED"})
    );
    assert_eq!(jobs[1].consent, Value::Null);
    assert!(ads.list().is_empty());
}

#[tokio::test]
async fn identifiers_are_normalised_and_hashed_as_google_specifies() {
    let (ads, url) = start_ads().await;
    let members = vec![member(
        "1",
        &[
            ("email", " J.Smith+Newsletter@GMail.com "),
            ("mobile", "+44 7700 900123"),
            ("first", " Ann "),
            ("last", "SMITH"),
            ("country", "gb"),
            ("zip", " SW1A 1AA "),
        ],
    )];

    let outcome = all_identifiers(&url)
        .deliver(&batch(Change::Add, members))
        .await;

    assert_eq!(outcome, Ok(accepted(&["1"])));
    let add = &ads.received()[1];
    assert_eq!(
        add.body["operations"],
        json!([{"create": {"userIdentifiers": [
            {"hashedEmail": JSMITH_GMAIL},
            {"hashedPhoneNumber": PHONE_447700900123},
            {"addressInfo": {
                "hashedFirstName": FIRST_ANN,
                "hashedLastName": LAST_SMITH,
                "countryCode": "GB",
                "postalCode": "SW1A 1AA",
            }},
        ]}}])
    );
    assert_eq!(ads.list().len(), 3);
    assert!(ads.list().contains(&format!("hashedEmail={JSMITH_GMAIL}")));
    assert!(
        ads.list()
            .contains(&format!("hashedPhoneNumber={PHONE_447700900123}"))
    );
}

#[tokio::test]
async fn a_removal_written_differently_from_its_add_removes_the_member() {
    let (ads, url) = start_ads().await;
    let google = all_identifiers(&url);
    let added = member(
        "1",
        &[
            ("email", "ann@example.com"),
            ("mobile", "+1 (650) 555-1212"),
        ],
    );
    let removed = member(
        "1",
        &[
            ("email", " ANN@example.com"),
            ("mobile", "001 650 555 1212"),
        ],
    );

    google
        .deliver(&batch(Change::Add, vec![added]))
        .await
        .unwrap();
    assert_eq!(
        ads.list(),
        [
            format!("hashedEmail={ANN}"),
            format!("hashedPhoneNumber={PHONE_16505551212}")
        ]
    );
    google
        .deliver(&batch(Change::Remove, vec![removed]))
        .await
        .unwrap();

    assert!(ads.list().is_empty());
}

#[tokio::test]
async fn an_already_hashed_value_is_sent_as_it_is_in_lower_case() {
    let (ads, url) = start_ads().await;

    email_only(&url)
        .deliver(&batch(
            Change::Add,
            vec![member("1", &[("email", &ANN.to_ascii_uppercase())])],
        ))
        .await
        .unwrap();

    assert_eq!(ads.list(), emails(&[ANN]));
}

#[tokio::test]
async fn members_without_a_usable_identifier_are_rejected_and_never_sent() {
    let (ads, url) = start_ads().await;
    let members = vec![
        member("1", &[("email", "ann@example.com")]),
        member(
            "2",
            &[("mobile", "12"), ("first", "Ann"), ("last", "Smith")],
        ),
        member("3", &[("email", "not-an-email")]),
    ];

    let outcome = all_identifiers(&url)
        .deliver(&batch(Change::Add, members))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into()],
            rejected: vec![
                Rejection {
                    key: "2".into(),
                    reason: "no usable identifier: email (`email`) is missing; phone \
                             (`mobile`) is not a phone number of 7 to 15 digits with its \
                             country code; country_code (`country`) is missing; postal_code \
                             (`zip`) is missing"
                        .into(),
                },
                Rejection {
                    key: "3".into(),
                    reason: "no usable identifier: email (`email`) is not an e-mail address; \
                             phone (`mobile`) is missing; first_name (`first`) is missing; \
                             last_name (`last`) is missing; country_code (`country`) is \
                             missing; postal_code (`zip`) is missing"
                        .into(),
                },
            ],
        })
    );
    let add = &ads.received()[1];
    assert_eq!(
        add.body["operations"],
        json!([{"create": {"userIdentifiers": [{"hashedEmail": ANN}]}}])
    );
    assert_eq!(ads.list(), emails(&[ANN]));
}

#[tokio::test]
async fn a_batch_with_no_usable_member_makes_no_request() {
    let (ads, url) = start_ads().await;

    let outcome = email_only(&url)
        .deliver(&batch(Change::Add, vec![member("1", &[("email", " ")])]))
        .await
        .unwrap();

    assert_eq!(outcome.accepted, Vec::<String>::new());
    assert_eq!(outcome.rejected.len(), 1);
    assert!(ads.received().is_empty());
}

#[tokio::test]
async fn operations_are_split_by_identifiers_per_request_into_one_job() {
    let (ads, url) = start_ads().await;
    *ads.max_identifiers.lock().unwrap() = 2;
    let mut connection = connection(&url);
    connection.insert("identifiers_per_request".into(), 2.into());
    let mut activation = activation();
    activation.insert(
        "identifiers".into(),
        toml::toml! { email = "email" phone = "mobile" }.into(),
    );
    let google = connector_with(connection, activation);
    let members = vec![
        member(
            "1",
            &[("email", "ann@example.com"), ("mobile", "+16505551212")],
        ),
        member("2", &[("email", "bob@example.com")]),
        member("3", &[("email", "cat@example.com")]),
    ];

    let outcome = google.deliver(&batch(Change::Add, members)).await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        ads.steps(),
        [
            (Create, 200),
            (Add, 200),
            (Add, 200),
            (Run, 200),
            (Search, 200)
        ]
    );
    assert_eq!(ads.jobs().len(), 1);
    let mut expected = emails(&[ANN, BOB, CAT]);
    expected.push(format!("hashedPhoneNumber={PHONE_16505551212}"));
    assert_eq!(ads.list(), expected);
}

#[tokio::test]
async fn operations_google_refuses_are_rejected_with_the_reason_and_the_rest_added() {
    let (ads, url) = start_ads().await;
    ads.refused.lock().unwrap().insert(BOB.to_owned());

    let outcome = email_only(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into(), "3".into()],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "Google Ads refused the operation: The SHA256 encoded value is \
                         malformed. (offlineUserDataJobError INVALID_SHA256_FORMAT)"
                    .into(),
            }],
        })
    );
    assert_eq!(ads.list(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn a_job_whose_every_operation_is_refused_is_never_run() {
    let (ads, url) = start_ads().await;
    ads.refused.lock().unwrap().insert(BOB.to_owned());

    let outcome = email_only(&url)
        .deliver(&batch(
            Change::Add,
            vec![member("2", &[("email", "bob@example.com")])],
        ))
        .await
        .unwrap();

    assert_eq!(outcome.accepted, Vec::<String>::new());
    assert_eq!(outcome.rejected.len(), 1);
    assert_eq!(ads.steps(), [(Create, 200), (Add, 200)]);
    assert!(ads.list().is_empty());
}

#[tokio::test]
async fn resource_exhausted_with_a_retry_delay_asks_for_that_wait_and_is_then_retried() {
    let (ads, url) = start_ads().await;
    ads.fail_at(
        Create,
        [Fault::ResourceExhausted {
            retry_delay: Some("1s"),
        }],
    );
    let google = email_only(&url);
    let started = Instant::now();

    let outcome = deliver_retrying(&google, &batch(Change::Add, three_members()), 3).await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(ads.steps()[0], (Create, 429));
    assert_eq!(ads.list(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn resource_exhausted_without_a_delay_is_rate_limited_with_the_wait_left_open() {
    let (ads, url) = start_ads().await;
    ads.fail_at(Add, [Fault::ResourceExhausted { retry_delay: None }]);

    let error = email_only(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap_err();

    assert_eq!(
        error,
        DeliveryError::RateLimited {
            message: format!(
                "{url}/v24/customers/{CUSTOMER}/offlineUserDataJobs/7001:addOperations answered \
                 429 Too Many Requests: Resource has been exhausted (e.g. check quota). \
                 (quotaError RESOURCE_EXHAUSTED) (request id fake-request-1)"
            ),
            wait: None,
        }
    );
}

#[tokio::test]
async fn a_bare_429_with_retry_after_is_waited_out_and_one_without_leaves_the_wait_open() {
    let (ads, url) = start_ads().await;
    ads.fail_at(
        Create,
        [
            Fault::TooManyRequests(Some("1")),
            Fault::TooManyRequests(None),
        ],
    );
    let google = email_only(&url);
    let started = Instant::now();

    let first = deliver_retrying(&google, &batch(Change::Add, three_members()), 2).await;
    let elapsed = started.elapsed();

    assert_eq!(
        first,
        Err(DeliveryError::RateLimited {
            message: format!(
                "{url}/v24/customers/{CUSTOMER}/offlineUserDataJobs:create answered 429 Too Many \
                 Requests: "
            ),
            wait: None,
        })
    );
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert!(ads.list().is_empty());
}

#[tokio::test]
async fn a_service_that_stays_unavailable_gets_exactly_max_attempts_requests() {
    let (ads, url) = start_ads().await;
    ads.fail_at(
        Create,
        [Fault::Unavailable, Fault::Unavailable, Fault::Unavailable],
    );

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/v24/customers/{CUSTOMER}/offlineUserDataJobs:create answered 503 Service \
                 Unavailable: The service is currently unavailable."
            ),
        })
    );
    assert_eq!(ads.steps(), [(Create, 503), (Create, 503), (Create, 503)]);
    assert!(ads.list().is_empty());
}

#[tokio::test]
async fn an_html_502_page_is_retried_and_an_html_404_page_is_not() {
    let (ads, url) = start_ads().await;
    let google = email_only(&url);

    ads.fail_at(Run, [Fault::HtmlPage(502)]);
    let retried = deliver_retrying(&google, &batch(Change::Add, three_members()), 3).await;
    ads.fail_at(Create, [Fault::HtmlPage(404)]);
    let not_found = deliver_retrying(&google, &batch(Change::Remove, three_members()), 3).await;

    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        not_found,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/v24/customers/{CUSTOMER}/offlineUserDataJobs:create answered 404 Not \
                 Found with an HTML page instead of a Google API error"
            ),
        })
    );
    assert_eq!(ads.list(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_run_answered_after_the_timeout_is_resumed_and_not_sent_as_a_second_job() {
    let (ads, url) = start_ads().await;
    ads.fail_at(Run, [Fault::Slow(Duration::from_millis(1500))]);
    let google = email_only(&url);

    let direct = google.deliver(&batch(Change::Add, three_members())).await;
    let retried = deliver_retrying(&google, &batch(Change::Add, three_members()), 3).await;

    let DeliveryError::Retryable { message } = direct.unwrap_err() else {
        panic!("a timeout is retryable");
    };
    assert!(
        message.starts_with(&format!(
            "POST to {url}/v24/customers/{CUSTOMER}/offlineUserDataJobs/7001:run timed out"
        )),
        "{message}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    // The run landed before its answer was due; the retry only polled the same job.
    assert_eq!(
        ads.steps(),
        [
            (Create, 200),
            (Add, 200),
            (Run, 200),
            (Search, 200),
            (Search, 200)
        ]
    );
    assert_eq!(ads.jobs().len(), 1);
    assert_eq!(ads.list(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn operations_answered_after_the_timeout_go_again_into_a_new_job_without_doubling() {
    let (ads, url) = start_ads().await;
    ads.fail_at(Add, [Fault::Slow(Duration::from_millis(1500))]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    let jobs = ads.jobs();
    assert_eq!(jobs.len(), 2);
    // The first job holds the operations but was never run; it expires on its own.
    assert_eq!(jobs[0].status, Status::Pending);
    assert_eq!(jobs[1].status, Status::Success);
    assert_eq!(ads.list(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_batch_delivered_twice_leaves_the_list_as_delivering_it_once() {
    let (ads, url) = start_ads().await;
    let first = member("1", &[("email", "ann@example.com")]);

    // A new connector each time, as after a restart: nothing is remembered.
    for _ in 0..2 {
        email_only(&url)
            .deliver(&batch(Change::Add, three_members()))
            .await
            .unwrap();
    }
    assert_eq!(ads.list(), emails(&[ANN, BOB, CAT]));
    for _ in 0..2 {
        email_only(&url)
            .deliver(&batch(Change::Remove, vec![first.clone()]))
            .await
            .unwrap();
    }

    assert_eq!(ads.jobs().len(), 4);
    assert_eq!(ads.list(), emails(&[BOB, CAT]));
}

#[tokio::test]
async fn a_job_still_running_when_the_wait_ends_is_polled_again_by_the_next_attempt() {
    let (ads, url) = start_ads().await;
    *ads.running_polls.lock().unwrap() = 2;
    let mut connection = connection(&url);
    connection.insert("job_wait_seconds".into(), 1.into());
    let google = connector_with(connection, activation());

    let first = google.deliver(&batch(Change::Add, three_members())).await;
    let second = google.deliver(&batch(Change::Add, three_members())).await;

    assert_eq!(
        first,
        Err(DeliveryError::Retryable {
            message: "Google Ads job customers/1234567890/offlineUserDataJobs/7001 is still \
                      RUNNING after 1 s; the next attempt of the batch waits for the same job"
                .into(),
        })
    );
    assert_eq!(second, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        ads.steps(),
        [
            (Create, 200),
            (Add, 200),
            (Run, 200),
            (Search, 200),
            (Search, 200),
            (Search, 200)
        ]
    );
    assert_eq!(ads.list(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_failed_job_is_a_permanent_failure_and_changes_nothing() {
    let (ads, url) = start_ads().await;
    *ads.jobs_fail.lock().unwrap() = true;

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: "Google Ads job customers/1234567890/offlineUserDataJobs/7001 failed: UNKNOWN"
                .into(),
        })
    );
    assert!(ads.list().is_empty());
}

#[tokio::test]
async fn concurrent_modification_is_retried_until_the_operations_land() {
    let (ads, url) = start_ads().await;
    ads.fail_at(Add, [Fault::ConcurrentModification]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(ads.steps()[1], (Add, 409));
    assert_eq!(ads.list(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_list_of_another_account_is_a_permanent_failure_sent_once() {
    let (ads, url) = start_ads().await;
    ads.fail_at(Create, [Fault::PermissionDenied]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    let Err(DeliveryError::Permanent { message }) = outcome else {
        panic!("expected a permanent failure, got {outcome:?}");
    };
    assert!(
        message.ends_with("check `customer_id` and `login_customer_id`"),
        "{message}"
    );
    assert_eq!(ads.steps(), [(Create, 403)]);
}

#[tokio::test]
async fn an_expired_fixed_token_is_an_auth_failure_sent_once() {
    let (ads, url) = start_ads().await;
    ads.fail_at(Create, [Fault::ExpiredToken]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 5).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/v24/customers/{CUSTOMER}/offlineUserDataJobs:create answered 401 \
                 Unauthorized: Authentication of the request failed: the OAuth token has \
                 expired. (authenticationError OAUTH_TOKEN_EXPIRED) (request id \
                 fake-request-1); check the OAuth credentials and `developer_token_env`"
            ),
        })
    );
    assert_eq!(ads.steps(), [(Create, 401)]);
}

#[tokio::test]
async fn a_wrong_developer_token_is_an_auth_failure() {
    let (_ads, url) = start_ads().await;
    let mut secrets = secrets();
    secrets.insert("developer_token".into(), "wrong".into());
    let google =
        GoogleAdsConnector::from_settings(&connection(&url), &activation(), &secrets).unwrap();

    let error = google
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap_err();

    assert!(matches!(error, DeliveryError::Auth { .. }), "{error:?}");
}

fn refreshing_connection(base_url: &str) -> toml::Table {
    let mut table = connection(base_url);
    table.remove("access_token_env");
    table.insert("client_id_env".into(), "GOOGLE_ADS_CLIENT_ID".into());
    table.insert(
        "client_secret_env".into(),
        "GOOGLE_ADS_CLIENT_SECRET".into(),
    );
    table.insert(
        "refresh_token_env".into(),
        "GOOGLE_ADS_REFRESH_TOKEN".into(),
    );
    table.insert("token_url".into(), format!("{base_url}/token").into());
    table
}

#[tokio::test]
async fn a_token_from_the_refresh_token_is_obtained_once_and_reused() {
    let (ads, url) = start_ads().await;
    let google = connector_with(refreshing_connection(&url), activation());

    google
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    google
        .deliver(&batch(Change::Remove, three_members()))
        .await
        .unwrap();

    let steps = ads.steps();
    assert_eq!(steps.iter().filter(|(step, _)| *step == Token).count(), 1);
    assert_eq!(steps[0], (Token, 200));
    assert_eq!(steps.len(), 9);
    assert!(ads.list().is_empty());
}

#[tokio::test]
async fn a_token_said_to_last_longer_than_any_clock_is_used_and_the_batches_land() {
    let (ads, url) = start_ads().await;
    *ads.token_lifetime.lock().unwrap() = Some(u64::MAX);
    let google = connector_with(refreshing_connection(&url), activation());

    let added = google.deliver(&batch(Change::Add, three_members())).await;
    let removed = google
        .deliver(&batch(
            Change::Remove,
            vec![member("2", &[("email", "bob@example.com")])],
        ))
        .await;

    assert_eq!(added, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(removed, Ok(accepted(&["2"])));
    assert_eq!(ads.list(), emails(&[ANN, CAT]));
    let steps = ads.steps();
    assert_eq!(steps.iter().filter(|(step, _)| *step == Token).count(), 1);
}

#[tokio::test]
async fn an_expired_refreshed_token_is_renewed_and_the_batch_lands() {
    let (ads, url) = start_ads().await;
    ads.fail_at(Add, [Fault::ExpiredToken]);
    let google = connector_with(refreshing_connection(&url), activation());

    let outcome = deliver_retrying(&google, &batch(Change::Add, three_members()), 3).await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        ads.steps(),
        [
            (Token, 200),
            (Create, 200),
            (Add, 401),
            (Token, 200),
            (Create, 200),
            (Add, 200),
            (Run, 200),
            (Search, 200)
        ]
    );
    assert_eq!(ads.list(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_revoked_refresh_token_is_an_auth_failure_sent_once() {
    let (ads, url) = start_ads().await;
    ads.fail_at(Token, [Fault::InvalidGrant]);
    let google = connector_with(refreshing_connection(&url), activation());

    let outcome = deliver_retrying(&google, &batch(Change::Add, three_members()), 3).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/token answered 400 Bad Request: invalid_grant Token has been expired or \
                 revoked.; the refresh token is expired or revoked, authorise the account again"
            ),
        })
    );
    assert_eq!(ads.steps(), [(Token, 400)]);
}

#[tokio::test]
async fn credentials_never_appear_in_urls_or_bodies_and_raw_emails_never_leave() {
    let (ads, url) = start_ads().await;
    let google = connector_with(refreshing_connection(&url), activation());

    google
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();

    for request in ads.received().iter().filter(|r| r.step != Token) {
        let body = request.body.to_string();
        assert!(!body.contains('@'), "{body}");
        assert!(
            !body.contains("ya29") && !body.contains(DEVELOPER_TOKEN),
            "{body}"
        );
        assert!(!request.path.contains("ya29"), "{}", request.path);
    }
    let shown = format!("{google:?}");
    assert!(
        !shown.contains(CLIENT_SECRET) && !shown.contains(REFRESH_TOKEN),
        "{shown}"
    );
}

#[test]
fn google_ads_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        developer_token_env = "GOOGLE_ADS_DEVELOPER_TOKEN"
        access_token_env = "GOOGLE_ADS_ACCESS_TOKEN"
        refresh_token_env = "GOOGLE_ADS_REFRESH_TOKEN"
        customer_id = "123-456-789"
        api_version = "24"
        identifiers_per_request = 200000
    };
    let activation = toml::toml! {
        user_list_id = "list-5"
        ad_user_data = "yes"
        identifiers = { email = "email", first_name = "first", hashed_email = "h" }
    };

    let errors =
        GoogleAdsConnector::from_settings(&connection, &activation, &BTreeMap::new()).unwrap_err();

    let error = common::problem;
    assert_eq!(
        errors,
        [
            error(
                "developer_token_env",
                "the environment variable `GOOGLE_ADS_DEVELOPER_TOKEN` is not set; export it \
                 with a Google Ads developer token"
            ),
            error(
                "access_token_env",
                "set either `access_token_env` or `client_id_env`, `client_secret_env` and \
                 `refresh_token_env`, not both"
            ),
            error(
                "customer_id",
                "expected a Google Ads customer id of ten digits such as `123-456-7890`, got \
                 `123-456-789`"
            ),
            error(
                "api_version",
                "expected a Google Ads API version such as `v24`, got `24`"
            ),
            error(
                "identifiers_per_request",
                "must be between 1 and 100000 in the connection settings, got 200000"
            ),
            error(
                "user_list_id",
                "expected the Customer Match user list's numeric id, digits only"
            ),
            error("ad_user_data", "expected `granted` or `denied`, got `yes`"),
            error(
                "ad_personalization",
                "missing; Google requires the members' consent with every upload, set it to \
                 `granted` or `denied`"
            ),
            error(
                "identifiers.hashed_email",
                "unknown Google Ads identifier; known: email, phone, first_name, last_name, \
                 country_code, postal_code"
            ),
            error(
                "identifiers",
                "Google matches an address only on first_name, last_name, country_code and \
                 postal_code together; map all four or none"
            ),
        ]
    );
}

#[test]
fn a_google_ads_activation_without_a_user_list_is_refused_but_its_connection_checks_alone() {
    let connection = connection("https://googleads.googleapis.com");

    let errors = GoogleAdsConnector::from_settings(&connection, &toml::Table::new(), &secrets())
        .unwrap_err();
    let alone = segmentd_connectors::check_connection("google_ads", &connection, &secrets());

    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["user_list_id", "ad_user_data", "ad_personalization"]
    );
    assert_eq!(alone, Ok(()));
}

#[test]
fn google_ads_batch_size_defaults_to_ten_thousand() {
    let connection = toml::toml! {
        developer_token_env = "GOOGLE_ADS_DEVELOPER_TOKEN"
        access_token_env = "GOOGLE_ADS_ACCESS_TOKEN"
        customer_id = 1234567890
    };

    let connector =
        segmentd_connectors::build("google_ads", &connection, &activation(), &secrets()).unwrap();

    assert_eq!(
        (connector.kind(), connector.max_batch_size()),
        ("google_ads", 10_000)
    );
    assert!(segmentd_connectors::KINDS.contains(&"google_ads"));
}

#[tokio::test]
async fn tokens_with_a_trailing_newline_are_refused_at_load_naming_their_env_keys() {
    let (ads, url) = start_ads().await;
    let mut with_newlines = secrets();
    with_newlines.insert("developer_token".into(), format!("{DEVELOPER_TOKEN}\n"));
    with_newlines.insert("access_token".into(), format!("{ACCESS_TOKEN}\r\n"));

    let built = GoogleAdsConnector::from_settings(&connection(&url), &activation(), &with_newlines);
    let checked = GoogleAdsConnector::check_connection(&connection(&url), &with_newlines);

    let expected = vec![
        SettingsError {
            field: "developer_token_env".into(),
            message: "the developer token holds characters an HTTP header cannot carry, such as \
                      a trailing newline; check the environment variable's value"
                .into(),
        },
        SettingsError {
            field: "access_token_env".into(),
            message: "the access token holds characters an HTTP header cannot carry, such as a \
                      trailing newline; check the environment variable's value"
                .into(),
        },
    ];
    assert_eq!(built.unwrap_err(), expected);
    assert_eq!(checked, Err(expected));
    assert!(ads.received().is_empty());
    assert!(ads.list().is_empty());
}
