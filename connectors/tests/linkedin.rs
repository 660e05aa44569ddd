//! The LinkedIn connector against a fake LinkedIn Marketing API on loopback.
//!
//! The fake serves `POST /rest/dmpSegments/{id}/users` and `/companies` as Rest.li
//! `BATCH_CREATE` requests the way LinkedIn does: it requires the bearer token,
//! `LinkedIn-Version`, `X-Restli-Protocol-Version: 2.0.0` and `X-RestLi-Method: BATCH_CREATE`,
//! checks every element (`action`, `userIds` with their `idType` and the shape of hashed
//! values, company fields), keeps the segment as a set of ids, and answers with one status per
//! element, 201 also for an id already added or already removed. Faults queued on it answer
//! the next requests the way LinkedIn fails: 429 with and without `Retry-After`, 5xx, an HTML
//! page, a slow answer, an expired token, a missing permission, a throttled element.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::linkedin::LinkedInConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    Fake, accepted, deliver_retrying, header, html, member, three_members, with_retry_after,
};

// Digests computed outside this code with `printf '%s' <text> | sha256sum` (or `sha512sum`).
/// `ann@example.com`
const ANN: &str = "71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476";
/// `bob@example.com`
const BOB: &str = "5ff860bf1190596c7188ab851db691f0f3169c453936e9e1eba2f9a47f7a0018";
/// `cat@example.com`
const CAT: &str = "d2d66462631a2d1b0ca18e8b66dc594a58a1cdd569028e1d97f6be4ff0d5fb68";
/// `ann@example.com`, SHA-512.
const ANN_SHA512: &str = "0ed2ff10f73029df147c19f5fc5ec3e2fa05ab785ee386e7486833205daf472814cc27b240c0f2822d00e7ff2cbce6de8cefa087e641852670b247f088ffa877";

const TOKEN: &str = "AQX-linkedin-access-token";
const VERSION: &str = "202610";
const SEGMENT_ID: &str = "4711";

/// One failure the fake answers a request with instead of its normal answer.
#[derive(Debug, Clone)]
enum Fault {
    /// HTTP 429 with LinkedIn's throttle body, and this `Retry-After` if any.
    TooManyRequests(Option<&'static str>),
    /// HTTP 503 with a JSON error.
    Unavailable,
    /// An HTML error page with this status.
    HtmlPage(u16),
    /// The normal answer (the change applied at once), sent after this delay.
    Slow(Duration),
    /// HTTP 401 `INVALID_ACCESS_TOKEN`: the token has expired.
    ExpiredToken,
    /// HTTP 403 `ACCESS_DENIED`: the token lacks the scope or the member the role.
    AccessDenied,
    /// A 200 answer in which the element at this position is throttled (429) and not
    /// processed; the others are.
    ElementThrottled(usize),
    /// The normal answer (the change applied), its body cut off after this many bytes.
    Truncated(usize),
    /// A 200 answer refusing the element at this position with a message that echoes its
    /// names, title and company and quotes an address and a phone number; the others are
    /// processed.
    ElementEchoed(usize),
    /// HTTP 400 for the whole request, its message echoing the first element's title and
    /// company and quoting an address and a phone number.
    RequestEchoed,
}

/// A message that echoes `element`'s clear fields, as LinkedIn's validation messages can.
fn echo(element: &Value) -> String {
    let field = |name: &str| element[name].as_str().unwrap_or("").to_owned();
    format!(
        "Member {} {} ({} at {}) could not be matched; write to privacy@linkedin.example or \
         call +1 650 555 0199",
        field("firstName"),
        field("lastName"),
        field("title"),
        field("company"),
    )
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
struct Received {
    uri: String,
    headers: HeaderMap,
    body: String,
    status: u16,
}

/// The fake LinkedIn API: its segment, the faults queued and the requests received.
type LinkedIn = Fake<Account, Received, Fault>;

/// The one segment the fake holds, and the values it refuses.
#[derive(Default)]
struct Account {
    /// The segment: `idType=idValue` for users, `field=value` for companies.
    segment: Mutex<BTreeSet<String>>,
    /// Id values the fake refuses, with a 400 for their element.
    refused: Mutex<BTreeSet<String>>,
}

impl LinkedIn {
    fn segment(&self) -> Vec<String> {
        self.segment.lock().unwrap().iter().cloned().collect()
    }

    fn statuses(&self) -> Vec<u16> {
        self.received().iter().map(|r| r.status).collect()
    }
}

/// LinkedIn's error body.
fn error(status: u16, code: &str, service_code: u32, message: &str) -> Response {
    let body = json!({
        "status": status,
        "serviceErrorCode": service_code,
        "code": code,
        "message": message,
    });
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

async fn batch_create(
    State(linkedin): State<Arc<LinkedIn>>,
    Path((segment_id, kind)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = linkedin.next_fault();
    let delay = match fault {
        Some(Fault::Slow(delay)) => delay,
        _ => Duration::ZERO,
    };
    let response = answer(&linkedin, &segment_id, &kind, &headers, &body, fault);
    linkedin.record(Received {
        uri: uri.to_string(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        status: response.status().as_u16(),
    });
    // The change is applied before the delay, as on a platform that answers late.
    tokio::time::sleep(delay).await;
    response
}

fn answer(
    linkedin: &LinkedIn,
    segment_id: &str,
    kind: &str,
    headers: &HeaderMap,
    body: &[u8],
    fault: Option<Fault>,
) -> Response {
    let mut throttled_element = None;
    match fault {
        Some(Fault::TooManyRequests(retry_after)) => {
            let response = with_retry_after(
                error(
                    429,
                    "TOO_MANY_REQUESTS",
                    101,
                    "Resource level throttle MEMBER MINUTE limit for calls to this resource is reached.",
                ),
                retry_after,
            );
            return response;
        }
        Some(Fault::Unavailable) => {
            return error(503, "SERVICE_UNAVAILABLE", 0, "Service Unavailable");
        }
        Some(Fault::HtmlPage(status)) => {
            let page = "<!DOCTYPE html><html><head><title>LinkedIn</title></head>\
                        <body>Something went wrong.</body></html>";
            return html(status, page, "text/html; charset=utf-8");
        }
        Some(Fault::ExpiredToken) => {
            return error(
                401,
                "EXPIRED_ACCESS_TOKEN",
                65601,
                "The token used in the request has expired",
            );
        }
        Some(Fault::AccessDenied) => {
            return error(
                403,
                "ACCESS_DENIED",
                100,
                "Not enough permissions to access: dmpSegments.BATCH_CREATE.20261001",
            );
        }
        Some(Fault::ElementThrottled(index)) => throttled_element = Some(index),
        Some(Fault::RequestEchoed) => {
            let request = serde_json::from_slice::<Value>(body).unwrap_or_default();
            return error(400, "ILLEGAL_ARGUMENT", 100, &echo(&request["elements"][0]));
        }
        Some(Fault::ElementEchoed(_)) | Some(Fault::Truncated(_)) | Some(Fault::Slow(_)) | None => {
        }
    }
    let echoed_element = match fault {
        Some(Fault::ElementEchoed(index)) => Some(index),
        _ => None,
    };

    if header(headers, "authorization") != Some(&format!("Bearer {TOKEN}")) {
        return error(401, "INVALID_ACCESS_TOKEN", 65600, "Invalid access token");
    }
    if header(headers, "linkedin-version") != Some(VERSION) {
        return error(
            426,
            "NONEXISTENT_VERSION",
            0,
            "Requested version is not active",
        );
    }
    if header(headers, "x-restli-protocol-version") != Some("2.0.0")
        || header(headers, "x-restli-method") != Some("BATCH_CREATE")
    {
        return error(
            400,
            "ILLEGAL_ARGUMENT",
            100,
            "Expected a Rest.li 2.0.0 BATCH_CREATE",
        );
    }
    if segment_id != SEGMENT_ID || (kind != "users" && kind != "companies") {
        return error(404, "NOT_FOUND", 0, "Not Found");
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return error(400, "ILLEGAL_ARGUMENT", 100, "The body is not JSON");
    };
    let Some(elements) = request["elements"].as_array().filter(|e| !e.is_empty()) else {
        return error(400, "ILLEGAL_ARGUMENT", 100, "elements is missing");
    };

    let refused = linkedin.refused.lock().unwrap().clone();
    let mut segment = linkedin.segment.lock().unwrap();
    let mut statuses = Vec::new();
    for (index, element) in elements.iter().enumerate() {
        if throttled_element == Some(index) {
            statuses.push(json!({"status": 429}));
            continue;
        }
        if echoed_element == Some(index) {
            statuses.push(json!({"status": 400, "error": {
                "status": 400,
                "code": "ILLEGAL_ARGUMENT",
                "message": echo(element),
            }}));
            continue;
        }
        let ids = match kind {
            "users" => user_ids(element),
            _ => company_ids(element),
        };
        let action = element["action"].as_str();
        let problem = match &ids {
            _ if !matches!(action, Some("ADD" | "REMOVE")) => Some("action must be ADD or REMOVE"),
            Err(problem) => Some(*problem),
            Ok(ids)
                if ids
                    .iter()
                    .any(|id| refused.iter().any(|r| id.ends_with(r.as_str()))) =>
            {
                Some("The id could not be processed")
            }
            Ok(_) => None,
        };
        if let Some(message) = problem {
            statuses.push(json!({"status": 400, "error": {
                "status": 400,
                "code": "ILLEGAL_ARGUMENT",
                "message": message,
            }}));
            continue;
        }
        for id in ids.unwrap() {
            if action == Some("ADD") {
                segment.insert(id);
            } else {
                segment.remove(&id);
            }
        }
        statuses.push(json!({"status": 201}));
    }
    let mut answer = json!({ "elements": statuses }).to_string();
    if let Some(Fault::Truncated(length)) = fault {
        answer.truncate(length);
    }
    let mut response = answer.into_response();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

fn lower_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The ids of a user element, as `idType=idValue`.
fn user_ids(element: &Value) -> Result<Vec<String>, &'static str> {
    let Some(ids) = element["userIds"].as_array().filter(|ids| !ids.is_empty()) else {
        return Err("userIds is missing");
    };
    let mut found = Vec::new();
    for id in ids {
        let value = id["idValue"].as_str().unwrap_or_default();
        let ok = match id["idType"].as_str() {
            Some("SHA256_EMAIL") => lower_hex(value, 64),
            Some("SHA512_EMAIL") => lower_hex(value, 128),
            Some("GOOGLE_AID") => !value.is_empty() && !value.contains('@'),
            _ => false,
        };
        if !ok {
            return Err("idType or idValue is invalid");
        }
        found.push(format!("{}={value}", id["idType"].as_str().unwrap()));
    }
    for clear in ["firstName", "lastName", "title", "company"] {
        if element.get(clear).is_some_and(|v| !v.is_string()) {
            return Err("a name field is not a string");
        }
    }
    Ok(found)
}

/// The ids of a company element, as `field=value`.
fn company_ids(element: &Value) -> Result<Vec<String>, &'static str> {
    let mut found = Vec::new();
    if let Some(domain) = element["companyWebsiteDomain"].as_str() {
        if domain.contains("://") || domain.contains('/') || domain != domain.to_lowercase() {
            return Err("companyWebsiteDomain is invalid");
        }
        found.push(format!("companyWebsiteDomain={domain}"));
    }
    if let Some(urn) = element["organizationUrn"].as_str() {
        if !urn.starts_with("urn:li:organization:") {
            return Err("organizationUrn is invalid");
        }
        found.push(format!("organizationUrn={urn}"));
    }
    if found.is_empty() {
        return Err("companyWebsiteDomain or organizationUrn is required");
    }
    Ok(found)
}

/// Starts the fake on a loopback port; returns it with its base URL.
async fn start_linkedin() -> (Arc<LinkedIn>, String) {
    let routes = axum::Router::new().route(
        "/rest/dmpSegments/{segment_id}/{kind}",
        axum::routing::post(batch_create),
    );
    common::start(LinkedIn::default(), routes).await
}

fn secrets() -> BTreeMap<String, String> {
    common::secrets(&[("access_token", TOKEN)])
}

fn connection(base_url: &str) -> toml::Table {
    let mut table = toml::toml! {
        access_token_env = "LINKEDIN_TOKEN"
        linkedin_version = "202610"
        timeout_seconds = 1
    };
    table.insert("base_url".into(), base_url.into());
    table
}

fn connector(base_url: &str, activation: toml::Table) -> LinkedInConnector {
    LinkedInConnector::from_settings(&connection(base_url), &activation, &secrets()).unwrap()
}

fn email_only(base_url: &str) -> LinkedInConnector {
    connector(base_url, toml::toml! { segment_id = 4711 })
}

fn batch(change: Change, members: Vec<Member>) -> Batch {
    common::batch("vip/linkedin", change, members)
}

fn emails(hashes: &[&str]) -> Vec<String> {
    let mut segment: Vec<String> = hashes.iter().map(|h| format!("SHA256_EMAIL={h}")).collect();
    segment.sort();
    segment
}

#[tokio::test]
async fn adding_three_and_removing_one_leaves_the_two_expected_hashes() {
    let (linkedin, url) = start_linkedin().await;
    let connector = email_only(&url);

    let added = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let removed = connector
        .deliver(&batch(
            Change::Remove,
            vec![member("2", &[("email", "bob@example.com")])],
        ))
        .await;

    assert_eq!(added, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(removed, Ok(accepted(&["2"])));
    assert_eq!(linkedin.segment(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn every_request_carries_the_versions_and_no_raw_email_or_token_in_url_or_body() {
    let (linkedin, url) = start_linkedin().await;
    let connector = email_only(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();

    let request = &linkedin.received()[0];
    assert_eq!(request.uri, format!("/rest/dmpSegments/{SEGMENT_ID}/users"));
    assert_eq!(request.headers["linkedin-version"], VERSION);
    assert_eq!(request.headers["x-restli-protocol-version"], "2.0.0");
    assert_eq!(request.headers["x-restli-method"], "BATCH_CREATE");
    assert!(!request.body.contains('@') && !request.body.contains(TOKEN));
    let body: Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(
        body["elements"][0],
        json!({"action": "ADD", "userIds": [{"idType": "SHA256_EMAIL", "idValue": ANN}]})
    );
}

#[tokio::test]
async fn a_removal_written_differently_from_its_add_removes_the_member() {
    let (linkedin, url) = start_linkedin().await;
    let connector = email_only(&url);

    connector
        .deliver(&batch(
            Change::Add,
            vec![member("1", &[("email", "  Ann@Example.COM ")])],
        ))
        .await
        .unwrap();
    assert_eq!(linkedin.segment(), emails(&[ANN]));
    connector
        .deliver(&batch(
            Change::Remove,
            vec![member("1", &[("email", "ann@example.com")])],
        ))
        .await
        .unwrap();

    assert!(linkedin.segment().is_empty());
}

#[tokio::test]
async fn digests_are_sent_as_they_are_under_their_own_id_type() {
    let (linkedin, url) = start_linkedin().await;
    let members = vec![
        member("1", &[("email", &ANN.to_ascii_uppercase())]),
        member("4", &[("email", ANN_SHA512)]),
    ];

    let outcome = email_only(&url).deliver(&batch(Change::Add, members)).await;

    assert_eq!(outcome, Ok(accepted(&["1", "4"])));
    assert_eq!(
        linkedin.segment(),
        [
            format!("SHA256_EMAIL={ANN}"),
            format!("SHA512_EMAIL={ANN_SHA512}")
        ]
    );
}

#[tokio::test]
async fn advertising_ids_and_names_travel_in_clear_beside_the_hashed_email() {
    let (linkedin, url) = start_linkedin().await;
    let activation: toml::Table = r#"
        segment_id = "4711"
        identifiers = { email = "email", google_aid = "aid", first_name = "first", title = "job" }
    "#
    .parse()
    .unwrap();
    let members = vec![
        member(
            "1",
            &[
                ("email", "ann@example.com"),
                ("aid", " 38400000-8cf0-11bd-b23e-10b96e40000d "),
                ("first", " Ann "),
                ("job", ""),
            ],
        ),
        member("2", &[("aid", "6d92078a-8246-4ba4-ae5b-76104861e7dc")]),
    ];

    let outcome = connector(&url, activation)
        .deliver(&batch(Change::Add, members))
        .await;

    assert_eq!(outcome, Ok(accepted(&["1", "2"])));
    let body: Value = serde_json::from_str(&linkedin.received()[0].body).unwrap();
    assert_eq!(
        body["elements"],
        json!([
            {"action": "ADD", "firstName": "Ann", "userIds": [
                {"idType": "SHA256_EMAIL", "idValue": ANN},
                {"idType": "GOOGLE_AID", "idValue": "38400000-8cf0-11bd-b23e-10b96e40000d"},
            ]},
            {"action": "ADD", "userIds": [
                {"idType": "GOOGLE_AID", "idValue": "6d92078a-8246-4ba4-ae5b-76104861e7dc"},
            ]},
        ])
    );
    assert_eq!(linkedin.segment().len(), 3);
}

#[tokio::test]
async fn members_without_a_usable_identifier_are_rejected_and_never_sent() {
    let (linkedin, url) = start_linkedin().await;
    let activation = toml::toml! {
        segment_id = 4711
        identifiers = { email = "email", google_aid = "aid", first_name = "first" }
    };
    let members = vec![
        member("1", &[("email", "ann@example.com")]),
        member("2", &[("first", "Bob")]),
        member("3", &[("email", "not-an-email"), ("aid", "  ")]),
    ];

    let outcome = connector(&url, activation)
        .deliver(&batch(Change::Add, members))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into()],
            rejected: vec![
                Rejection {
                    key: "2".into(),
                    reason: "no usable identifier: email (`email`) is missing; google_aid \
                             (`aid`) is missing"
                        .into(),
                },
                Rejection {
                    key: "3".into(),
                    reason: "no usable identifier: email (`email`) is not an e-mail address; \
                             google_aid (`aid`) is empty once normalised"
                        .into(),
                },
            ],
        })
    );
    let body: Value = serde_json::from_str(&linkedin.received()[0].body).unwrap();
    assert_eq!(body["elements"].as_array().unwrap().len(), 1);
    assert_eq!(linkedin.segment(), emails(&[ANN]));
}

#[tokio::test]
async fn a_batch_with_no_usable_member_makes_no_request() {
    let (linkedin, url) = start_linkedin().await;

    let outcome = email_only(&url)
        .deliver(&batch(Change::Add, vec![member("1", &[("email", " ")])]))
        .await
        .unwrap();

    assert_eq!(outcome.accepted, Vec::<String>::new());
    assert_eq!(outcome.rejected.len(), 1);
    assert!(linkedin.received().is_empty());
}

#[tokio::test]
async fn elements_linkedin_refuses_are_rejected_with_their_reason_and_the_rest_applied() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.refused.lock().unwrap().insert(BOB.to_owned());

    let outcome = email_only(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into(), "3".into()],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "LinkedIn refused the element (status 400 ILLEGAL_ARGUMENT): The id \
                         could not be processed"
                    .into(),
            }],
        })
    );
    assert_eq!(linkedin.segment(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn a_throttled_element_sends_the_batch_again_and_it_lands_once() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([Fault::ElementThrottled(1)]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(linkedin.statuses(), [200, 200]);
    assert_eq!(linkedin.segment(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_200_html_page_is_retryable_and_the_batch_lands_when_sent_again() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([Fault::HtmlPage(200)]);
    let connector = email_only(&url);

    let first = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let segment_after_first = linkedin.segment();
    let second = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        first,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/rest/dmpSegments/{SEGMENT_ID}/users answered 200 OK with 0 element \
                 statuses for 3 elements sent"
            ),
        })
    );
    assert!(segment_after_first.is_empty());
    assert_eq!(second, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(linkedin.statuses(), [200, 200]);
    assert_eq!(linkedin.segment(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_truncated_200_is_retried_and_the_members_land_once() {
    let (linkedin, url) = start_linkedin().await;
    // `{"elements":[{"status":201},` is 28 bytes: one status survives of three.
    linkedin.fail_next([Fault::Truncated(28)]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(linkedin.statuses(), [200, 200]);
    assert_eq!(linkedin.segment(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_one_without_leaves_the_wait_open() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([
        Fault::TooManyRequests(Some("1")),
        Fault::TooManyRequests(None),
    ]);
    let connector = email_only(&url);
    let started = Instant::now();

    let first = deliver_retrying(&connector, &batch(Change::Add, three_members()), 2).await;
    let elapsed = started.elapsed();
    let second = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        first,
        Err(DeliveryError::RateLimited {
            message: format!(
                "{url}/rest/dmpSegments/{SEGMENT_ID}/users answered 429 Too Many Requests: \
                 Resource level throttle MEMBER MINUTE limit for calls to this resource is \
                 reached. (TOO_MANY_REQUESTS)"
            ),
            wait: None,
        })
    );
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(second, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(linkedin.statuses(), [429, 429, 200]);
    assert_eq!(linkedin.segment(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_service_that_stays_unavailable_gets_exactly_max_attempts_requests() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([Fault::Unavailable, Fault::Unavailable, Fault::Unavailable]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/rest/dmpSegments/{SEGMENT_ID}/users answered 503 Service Unavailable: \
                 Service Unavailable (SERVICE_UNAVAILABLE)"
            ),
        })
    );
    assert_eq!(linkedin.statuses(), [503, 503, 503]);
    assert!(linkedin.segment().is_empty());
}

#[tokio::test]
async fn an_html_502_page_is_retried_and_an_html_404_page_is_not() {
    let (linkedin, url) = start_linkedin().await;
    let connector = email_only(&url);

    linkedin.fail_next([Fault::HtmlPage(502)]);
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;
    linkedin.fail_next([Fault::HtmlPage(404)]);
    let not_found = deliver_retrying(&connector, &batch(Change::Remove, three_members()), 3).await;

    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        not_found,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/rest/dmpSegments/{SEGMENT_ID}/users answered 404 Not Found with an HTML \
                 page instead of a LinkedIn error; check `segment_id` and `segment_type`"
            ),
        })
    );
    assert_eq!(linkedin.statuses(), [502, 200, 404]);
    assert_eq!(linkedin.segment(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retried_and_the_segment_holds_each_member_once() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([Fault::Slow(Duration::from_millis(1500))]);
    let connector = email_only(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    let DeliveryError::Retryable { message } = direct.unwrap_err() else {
        panic!("a timeout is retryable");
    };
    assert!(
        message.starts_with(&format!(
            "POST to {url}/rest/dmpSegments/{SEGMENT_ID}/users timed out"
        )),
        "{message}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    // The slow request landed before its answer was due; sending it again changed nothing.
    assert_eq!(linkedin.received().len(), 2);
    assert_eq!(linkedin.segment(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_batch_delivered_twice_leaves_the_segment_as_delivering_it_once() {
    let (linkedin, url) = start_linkedin().await;
    let connector = email_only(&url);
    let bob = vec![member("2", &[("email", "bob@example.com")])];

    for _ in 0..2 {
        let outcome = connector
            .deliver(&batch(Change::Add, three_members()))
            .await;
        assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    }
    for _ in 0..2 {
        let outcome = connector.deliver(&batch(Change::Remove, bob.clone())).await;
        assert_eq!(outcome, Ok(accepted(&["2"])));
    }

    assert_eq!(linkedin.segment(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn an_expired_token_is_an_auth_failure_sent_once() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([Fault::ExpiredToken]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 5).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/rest/dmpSegments/{SEGMENT_ID}/users answered 401 Unauthorized: The token \
                 used in the request has expired (EXPIRED_ACCESS_TOKEN); renew the access token \
                 in `access_token_env`"
            ),
        })
    );
    assert_eq!(linkedin.received().len(), 1);
}

#[tokio::test]
async fn a_missing_permission_is_an_auth_failure_naming_the_scope() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([Fault::AccessDenied]);

    let error = email_only(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap_err();

    let DeliveryError::Auth { message } = error else {
        panic!("expected an auth failure, got {error:?}");
    };
    assert!(message.contains("rw_dmp_segments"), "{message}");
    assert!(linkedin.segment().is_empty());
}

#[tokio::test]
async fn a_wrong_token_is_an_auth_failure() {
    let (_linkedin, url) = start_linkedin().await;
    let secrets = BTreeMap::from([("access_token".to_owned(), "revoked".to_owned())]);
    let connector = LinkedInConnector::from_settings(
        &connection(&url),
        &toml::toml! { segment_id = 4711 },
        &secrets,
    )
    .unwrap();

    let error = connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap_err();

    assert!(matches!(error, DeliveryError::Auth { .. }), "{error:?}");
}

#[tokio::test]
async fn a_version_linkedin_no_longer_serves_is_a_permanent_failure() {
    let (_linkedin, url) = start_linkedin().await;
    let mut connection = connection(&url);
    connection.insert("linkedin_version".into(), "202401".into());
    let connector = LinkedInConnector::from_settings(
        &connection,
        &toml::toml! { segment_id = 4711 },
        &secrets(),
    )
    .unwrap();

    let error = connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap_err();

    assert_eq!(
        error,
        DeliveryError::Permanent {
            message: format!(
                "{url}/rest/dmpSegments/{SEGMENT_ID}/users answered 426 Upgrade Required: \
                 Requested version is not active (NONEXISTENT_VERSION)"
            ),
        }
    );
}

#[tokio::test]
async fn companies_are_added_and_removed_by_domain_and_organization() {
    let (linkedin, url) = start_linkedin().await;
    let activation = toml::toml! {
        segment_id = 4711
        segment_type = "company"
        identifiers = { website_domain = "website", organization = "org", company_name = "name" }
    };
    let connector = connector(&url, activation);
    let companies = vec![
        member(
            "acme",
            &[("website", "https://www.Acme.com/about"), ("name", "Acme")],
        ),
        member("globex", &[("org", "1337")]),
        member("nobody", &[("name", "Initech")]),
    ];

    let added = connector
        .deliver(&batch(Change::Add, companies.clone()))
        .await
        .unwrap();
    assert_eq!(
        linkedin.segment(),
        [
            "companyWebsiteDomain=acme.com",
            "organizationUrn=urn:li:organization:1337"
        ]
    );
    let removed = connector
        .deliver(&batch(Change::Remove, companies[..1].to_vec()))
        .await;

    assert_eq!(added.accepted, ["acme", "globex"]);
    assert_eq!(
        added.rejected,
        [Rejection {
            key: "nobody".into(),
            reason: "no usable identifier: website_domain (`website`) is missing; organization \
                     (`org`) is missing"
                .into(),
        }]
    );
    assert_eq!(removed, Ok(accepted(&["acme"])));
    assert_eq!(
        linkedin.received()[0].uri,
        "/rest/dmpSegments/4711/companies"
    );
    let body: Value = serde_json::from_str(&linkedin.received()[0].body).unwrap();
    assert_eq!(
        body["elements"][0],
        json!({"action": "ADD", "companyWebsiteDomain": "acme.com", "companyName": "Acme"})
    );
    assert_eq!(
        linkedin.segment(),
        ["organizationUrn=urn:li:organization:1337"]
    );
}

#[test]
fn linkedin_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        access_token_env = "LINKEDIN_TOKEN"
        linkedin_version = "2026-10"
        batch_size = 10000
        version = "v2"
    };
    let activation = toml::toml! {
        segment_id = "urn:li:dmpSegment:4711"
        identifiers = { email = "email", website_domain = "site" }
    };

    let errors =
        LinkedInConnector::from_settings(&connection, &activation, &BTreeMap::new()).unwrap_err();

    let error = common::problem;
    assert_eq!(
        errors,
        [
            error(
                "version",
                "unknown key in the connection settings; known keys: access_token_env, \
                 base_url, linkedin_version, batch_size, timeout_seconds"
            ),
            error(
                "access_token_env",
                "the environment variable `LINKEDIN_TOKEN` is not set; export it with a \
                 LinkedIn access token with the rw_dmp_segments scope"
            ),
            error(
                "linkedin_version",
                "expected a LinkedIn API version as YYYYMM such as `202610`, got `2026-10`"
            ),
            error(
                "batch_size",
                "must be between 1 and 5000 in the connection settings, got 10000"
            ),
            error(
                "segment_id",
                "expected the DMP segment's numeric id, digits only"
            ),
            error(
                "identifiers.website_domain",
                "not a field of a user segment; known: email, google_aid, first_name, \
                 last_name, title, company"
            ),
        ]
    );
}

#[test]
fn a_linkedin_activation_without_a_segment_is_refused_but_its_connection_checks_alone() {
    let connection = toml::toml! { access_token_env = "LINKEDIN_TOKEN" };

    let errors =
        LinkedInConnector::from_settings(&connection, &toml::Table::new(), &secrets()).unwrap_err();
    let alone = segmentd_connectors::check_connection("linkedin", &connection, &secrets());

    assert_eq!(
        errors,
        [SettingsError {
            field: "segment_id".into(),
            message: "missing; set it to the DMP segment's numeric id".into(),
        }]
    );
    assert_eq!(alone, Ok(()));
}

#[test]
fn linkedin_batch_size_defaults_to_one_thousand() {
    let connection = toml::toml! { access_token_env = "LINKEDIN_TOKEN" };
    let activation = toml::toml! { segment_id = 4711 };

    let connector =
        segmentd_connectors::build("linkedin", &connection, &activation, &secrets()).unwrap();

    assert_eq!(
        (connector.kind(), connector.max_batch_size()),
        ("linkedin", 1_000)
    );
    assert!(segmentd_connectors::KINDS.contains(&"linkedin"));
}

#[tokio::test]
async fn an_access_token_with_a_trailing_newline_is_refused_at_load_naming_access_token_env() {
    let (linkedin, url) = start_linkedin().await;
    let with_newline = BTreeMap::from([("access_token".to_owned(), format!("{TOKEN}\n"))]);

    let built = LinkedInConnector::from_settings(
        &connection(&url),
        &toml::toml! { segment_id = 4711 },
        &with_newline,
    );
    let checked = LinkedInConnector::check_connection(&connection(&url), &with_newline);

    let expected = vec![SettingsError {
        field: "access_token_env".into(),
        message: "the access token holds characters an HTTP header cannot carry, such as a \
                  trailing newline; check the environment variable's value"
            .into(),
    }];
    assert_eq!(built.unwrap_err(), expected);
    assert_eq!(checked, Err(expected));
    assert!(linkedin.received().is_empty());
    assert!(linkedin.segment().is_empty());
}

/// A user segment fed e-mail, names, title and company.
fn with_names(base_url: &str) -> LinkedInConnector {
    let activation: toml::Table = r#"
        segment_id = "4711"
        [identifiers]
        email = "email"
        first_name = "first"
        last_name = "last"
        title = "job"
        company = "employer"
    "#
    .parse()
    .unwrap();
    connector(base_url, activation)
}

fn named_members() -> Vec<Member> {
    vec![
        member(
            "1",
            &[
                ("email", "ann@example.com"),
                ("first", "Ann"),
                ("last", "Lovelace"),
                ("job", "Chief Analyst"),
                ("employer", "Analytical Engines Ltd"),
            ],
        ),
        member(
            "2",
            &[
                ("email", "bob@example.com"),
                ("first", " Bob "),
                ("last", "Babbage"),
                ("job", "Head of Difference"),
                ("employer", "Engines & Co"),
            ],
        ),
    ]
}

#[tokio::test]
async fn a_refused_element_s_reason_carries_no_name_title_company_address_or_phone() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([Fault::ElementEchoed(1)]);

    let outcome = with_names(&url)
        .deliver(&batch(Change::Add, named_members()))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into()],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "LinkedIn refused the element (status 400 ILLEGAL_ARGUMENT): Member \
                         <member> <member> (<member> at <member>) could not be matched; write \
                         to <address> or call <number>"
                    .into(),
            }],
        })
    );
    assert_eq!(linkedin.segment(), emails(&[ANN]));
}

#[tokio::test]
async fn a_refused_request_s_message_carries_no_name_title_company_address_or_phone() {
    let (linkedin, url) = start_linkedin().await;
    linkedin.fail_next([Fault::RequestEchoed]);

    let outcome =
        deliver_retrying(&with_names(&url), &batch(Change::Add, named_members()), 3).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/rest/dmpSegments/{SEGMENT_ID}/users answered 400 Bad Request: Member \
                 <member> <member> (<member> at <member>) could not be matched; write to \
                 <address> or call <number> (ILLEGAL_ARGUMENT)"
            ),
        })
    );
    assert_eq!(linkedin.statuses(), [400]);
    assert_eq!(linkedin.segment(), Vec::<String>::new());
}
