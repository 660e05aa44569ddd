//! The Mailchimp connector against a fake Marketing API v3 on loopback.
//!
//! The fake serves batch subscribe (`POST /3.0/lists/{list_id}`) and member archiving
//! (`DELETE /3.0/lists/{list_id}/members/{subscriber_hash}`) the way Mailchimp does: HTTP
//! Basic auth with the API key, whose data centre must be the fake's (`us6`); at most 500
//! members per request; a 200 carrying per-member `errors`; members kept by subscriber hash
//! with their status; a set of forgotten addresses that cannot be re-added. Faults queued on
//! it answer the next requests the way Mailchimp fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use md5::Digest;
use segmentd_connectors::mailchimp::{MailchimpConnector, subscriber_hash};
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    Fake, accepted, deliver_retrying, email_member as member, header, html_page, with_retry_after,
};

// Subscriber hashes computed outside this code with `printf '%s' <address> | md5sum`.
const ANN: &str = "257c57037d384ae37ea27a07e8a01665";
const BOB: &str = "4b9bb80620f03eb3719e0a061c14283d";
const CAT: &str = "af724f5ab7812193cf54efd16268b7f6";

const KEY: &str = "0123456789abcdef0123456789abcdef-us6";
/// `Basic` credentials for user `segmentd` and password [`KEY`], from
/// `printf '%s' segmentd:<KEY> | base64`.
const BASIC_KEY: &str = "Basic c2VnbWVudGQ6MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYtdXM2";
const LIST_ID: &str = "a1b2c3d4e5";
const MAX_MEMBERS: usize = 500;

/// One failure the fake answers a request with instead of its normal answer.
#[derive(Debug, Clone)]
enum Fault {
    /// HTTP 429, with this `Retry-After` if any.
    TooManyRequests(Option<&'static str>),
    /// HTTP 403 without a body: Mailchimp's throttling under heavy load.
    BareForbidden,
    /// HTTP 503 with a problem-details body.
    Unavailable,
    /// An HTML error page with this status, as a proxy in front of the API sends.
    HtmlPage(u16),
    /// The normal answer (the change applied at once), sent after this delay.
    Slow(Duration),
    /// HTTP 403 with a problem-details body: the account's user is disabled.
    DisabledUser,
    /// HTTP 400 whose detail quotes an e-mail address and a phone number.
    InvalidResource,
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

/// The fake Marketing API: its audience, the faults queued and the requests received.
type Mailchimp = Fake<Account, Received, Fault>;

/// The members of the fake's one audience, and the addresses it has forgotten.
#[derive(Default)]
struct Account {
    /// Members by subscriber hash: address and status.
    members: Mutex<BTreeMap<String, (String, String)>>,
    /// Addresses permanently deleted, which cannot be added again.
    forgotten: Mutex<BTreeSet<String>>,
}

impl Mailchimp {
    /// Members as `subscriber hash -> status`.
    fn statuses(&self) -> BTreeMap<String, String> {
        self.members
            .lock()
            .unwrap()
            .iter()
            .map(|(hash, (_, status))| (hash.clone(), status.clone()))
            .collect()
    }
}

fn problem(status: u16, title: &str, detail: &str) -> Response {
    let body = json!({
        "type": "https://mailchimp.com/developer/marketing/docs/errors/",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": "995c5cb0-3280-4a6e-808b-3b096d0bb219",
    });
    let mut response = (StatusCode::from_u16(status).unwrap(), body.to_string()).into_response();
    response.headers_mut().insert(
        "content-type",
        "application/problem+json; charset=utf-8".parse().unwrap(),
    );
    response
}

/// The password of a `Basic` authorization header.
fn basic_password(headers: &HeaderMap) -> Option<String> {
    let encoded = header(headers, "authorization")?.strip_prefix("Basic ")?;
    let decoded = decode_base64(encoded)?;
    let credentials = String::from_utf8(decoded).ok()?;
    let (_, password) = credentials.split_once(':')?;
    Some(password.to_owned())
}

/// Standard base64 with padding.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut bytes = Vec::new();
    for byte in text.trim_end_matches('=').bytes() {
        let value = ALPHABET.iter().position(|&c| c == byte)? as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            bytes.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    Some(bytes)
}

/// Answers with `fault` if it stands for a failure, otherwise checks the credentials.
fn refusal(fault: Option<&Fault>, headers: &HeaderMap) -> Option<Response> {
    match fault {
        Some(Fault::TooManyRequests(retry_after)) => {
            let response = with_retry_after(
                problem(
                    429,
                    "Too Many Requests",
                    "You have exceeded the limit of 10 simultaneous connections.",
                ),
                *retry_after,
            );
            return Some(response);
        }
        Some(Fault::BareForbidden) => return Some(StatusCode::FORBIDDEN.into_response()),
        Some(Fault::Unavailable) => {
            return Some(problem(
                503,
                "Service Unavailable",
                "Please try again later.",
            ));
        }
        Some(Fault::HtmlPage(status)) => return Some(html_page(*status)),
        Some(Fault::DisabledUser) => {
            return Some(problem(
                403,
                "User Disabled",
                "This account has been disabled.",
            ));
        }
        Some(Fault::InvalidResource) => {
            return Some(problem(
                400,
                "Invalid Resource",
                "Bob@Example.com looks fake; the owner dan@example.net can be called on \
                 (212) 555-0147",
            ));
        }
        Some(Fault::Slow(_)) | None => {}
    }
    let password = basic_password(headers);
    match password.as_deref() {
        Some(KEY) => None,
        Some(key) if !key.ends_with("-us6") => Some(problem(
            403,
            "API Key Invalid",
            "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
        )),
        _ => Some(problem(
            401,
            "API Key Invalid",
            "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
        )),
    }
}

async fn record_and_delay(
    mailchimp: &Mailchimp,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    fault: Option<Fault>,
    response: Response,
) -> Response {
    mailchimp.record(Received {
        method,
        uri: uri.to_string(),
        authorization: header(headers, "authorization").map(str::to_owned),
        body: String::from_utf8_lossy(body).into_owned(),
        status: response.status().as_u16(),
    });
    if let Some(Fault::Slow(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    response
}

async fn batch_subscribe(
    State(mailchimp): State<Arc<Mailchimp>>,
    Path(list_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = mailchimp.next_fault();
    let response =
        refusal(fault.as_ref(), &headers).unwrap_or_else(|| subscribe(&mailchimp, &list_id, &body));
    record_and_delay(
        &mailchimp,
        Method::POST,
        &uri,
        &headers,
        &body,
        fault,
        response,
    )
    .await
}

fn subscribe(mailchimp: &Mailchimp, list_id: &str, body: &[u8]) -> Response {
    if list_id != LIST_ID {
        return problem(
            404,
            "Resource Not Found",
            "The requested resource could not be found.",
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return problem(
            400,
            "JSON Parse Exception",
            "We encountered an unspecified JSON parsing error.",
        );
    };
    let Some(members) = request["members"].as_array() else {
        return problem(
            400,
            "Invalid Resource",
            "The resource submitted could not be validated.",
        );
    };
    if members.len() > MAX_MEMBERS {
        return problem(
            400,
            "Invalid Resource",
            "Members: Maximum number of items is 500.",
        );
    }
    let update_existing = request["update_existing"] == true;

    let forgotten = mailchimp.forgotten.lock().unwrap().clone();
    let mut audience = mailchimp.members.lock().unwrap();
    let (mut created, mut updated, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for member in members {
        let email = member["email_address"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let status = member["status"].as_str().unwrap_or_default().to_owned();
        let hash = fake_subscriber_hash(&email);
        let refuse = |error: String, code: &str| {
            json!({
                "email_address": email,
                "error": error,
                "error_code": code,
            })
        };
        if !email.contains('@') {
            errors.push(refuse(
                "Please provide a valid email address.".into(),
                "ERROR_GENERIC",
            ));
        } else if forgotten.contains(&email.to_lowercase()) {
            let error = format!(
                "{email} was permanently deleted and cannot be re-imported. The contact must \
                 re-subscribe to get back on the list."
            );
            errors.push(refuse(error, "ERROR_CONTACT_EXISTS"));
        } else if !["subscribed", "unsubscribed"].contains(&status.as_str()) {
            errors.push(refuse("Invalid status.".into(), "ERROR_GENERIC"));
        } else if audience.contains_key(&hash) {
            if update_existing {
                audience.insert(hash.clone(), (email.clone(), status.clone()));
                updated.push(json!({"id": hash, "email_address": email, "status": status}));
            } else {
                let error = format!("{email} is already a list member.");
                errors.push(refuse(error, "ERROR_CONTACT_EXISTS"));
            }
        } else {
            audience.insert(hash.clone(), (email.clone(), status.clone()));
            created.push(json!({"id": hash, "email_address": email, "status": status}));
        }
    }
    axum::Json(json!({
        "new_members": created,
        "updated_members": updated,
        "errors": errors,
        "total_created": created.len(),
        "total_updated": updated.len(),
        "error_count": errors.len(),
        "_links": [],
    }))
    .into_response()
}

async fn archive(
    State(mailchimp): State<Arc<Mailchimp>>,
    Path((list_id, hash)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = mailchimp.next_fault();
    let response = refusal(fault.as_ref(), &headers).unwrap_or_else(|| {
        if list_id != LIST_ID {
            return problem(
                404,
                "Resource Not Found",
                "The requested resource could not be found.",
            );
        }
        match mailchimp.members.lock().unwrap().remove(&hash) {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => problem(
                404,
                "Resource Not Found",
                "The requested resource could not be found.",
            ),
        }
    });
    record_and_delay(
        &mailchimp,
        Method::DELETE,
        &uri,
        &headers,
        &body,
        fault,
        response,
    )
    .await
}

async fn list_info(
    State(mailchimp): State<Arc<Mailchimp>>,
    Path(list_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let fault = mailchimp.next_fault();
    let response = refusal(fault.as_ref(), &headers).unwrap_or_else(|| {
        if list_id != LIST_ID {
            return problem(
                404,
                "Resource Not Found",
                "The requested resource could not be found.",
            );
        }
        let count = mailchimp.members.lock().unwrap().len();
        axum::Json(json!({
            "id": LIST_ID,
            "name": "VIP",
            "stats": {"member_count": count},
        }))
        .into_response()
    });
    record_and_delay(
        &mailchimp,
        Method::GET,
        &uri,
        &headers,
        &Bytes::new(),
        fault,
        response,
    )
    .await
}

/// The subscriber hash the fake keys members by: MD5 of the lower-cased address, hex.
fn fake_subscriber_hash(email: &str) -> String {
    hex::encode(md5::Md5::digest(email.to_lowercase().as_bytes()))
}

/// Starts the fake on a loopback port; returns it with its API root (`.../3.0`).
async fn start_mailchimp() -> (Arc<Mailchimp>, String) {
    let routes = axum::Router::new()
        .route(
            "/3.0/lists/{list_id}",
            axum::routing::post(batch_subscribe).get(list_info),
        )
        .route(
            "/3.0/lists/{list_id}/members/{subscriber_hash}",
            axum::routing::delete(archive),
        );
    let (mailchimp, url) = common::start(Mailchimp::default(), routes).await;
    (mailchimp, format!("{url}/3.0"))
}

fn secrets(key: &str) -> BTreeMap<String, String> {
    common::secrets(&[("api_key", key)])
}

fn connection(base_url: &str) -> toml::Table {
    let mut table = toml::toml! {
        api_key_env = "MAILCHIMP_KEY"
        timeout_seconds = 1
    };
    table.insert("base_url".into(), base_url.into());
    table
}

fn connector_with(base_url: &str, remove_action: &str, key: &str) -> MailchimpConnector {
    let mut activation = toml::toml! { list_id = "a1b2c3d4e5" };
    activation.insert("remove_action".into(), remove_action.into());
    MailchimpConnector::from_settings(&connection(base_url), &activation, &secrets(key)).unwrap()
}

fn unsubscribing(base_url: &str) -> MailchimpConnector {
    connector_with(base_url, "unsubscribe", KEY)
}

fn archiving(base_url: &str) -> MailchimpConnector {
    connector_with(base_url, "archive", KEY)
}

fn batch(change: Change, members: Vec<Member>) -> Batch {
    common::batch("vip/mailchimp", change, members)
}

fn three_members() -> Vec<Member> {
    vec![
        member("1", "ann@example.com"),
        member("2", "Bob@Example.com"),
        member("3", "cat@example.com"),
    ]
}

fn statuses(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(hash, status)| (hash.to_string(), status.to_string()))
        .collect()
}

#[test]
fn the_fake_computes_subscriber_hashes_like_mailchimp() {
    assert_eq!(fake_subscriber_hash("Ann@Example.com"), ANN);
    assert_eq!(subscriber_hash("ann@example.com"), ANN);
}

#[tokio::test]
async fn adding_three_and_unsubscribing_one_leaves_two_subscribed() {
    let (mailchimp, url) = start_mailchimp().await;
    let connector = unsubscribing(&url);

    let added = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let removed = connector
        .deliver(&batch(Change::Remove, vec![member("2", "bob@example.com")]))
        .await;

    assert_eq!(added, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(removed, Ok(accepted(&["2"])));
    assert_eq!(
        mailchimp.statuses(),
        statuses(&[
            (ANN, "subscribed"),
            (BOB, "unsubscribed"),
            (CAT, "subscribed")
        ])
    );
}

#[tokio::test]
async fn adding_the_same_members_twice_keeps_one_subscribed_member_each() {
    let (mailchimp, url) = start_mailchimp().await;
    let connector = unsubscribing(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    let again = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(again, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        mailchimp.statuses(),
        statuses(&[
            (ANN, "subscribed"),
            (BOB, "subscribed"),
            (CAT, "subscribed")
        ])
    );
}

#[tokio::test]
async fn archiving_removes_the_member_and_an_absent_member_counts_as_removed() {
    let (mailchimp, url) = start_mailchimp().await;
    let connector = archiving(&url);
    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();

    let removed = connector
        .deliver(&batch(
            Change::Remove,
            vec![
                member("2", " BOB@example.com "),
                member("9", "nobody@example.com"),
            ],
        ))
        .await;

    assert_eq!(removed, Ok(accepted(&["2", "9"])));
    assert_eq!(
        mailchimp.statuses(),
        statuses(&[(ANN, "subscribed"), (CAT, "subscribed")])
    );
    let paths: Vec<String> = mailchimp.received()[1..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.uri))
        .collect();
    assert_eq!(
        paths,
        [
            format!("DELETE /3.0/lists/{LIST_ID}/members/{BOB}"),
            // printf '%s' nobody@example.com | md5sum
            format!("DELETE /3.0/lists/{LIST_ID}/members/8c5548eb0b2b80924f237953392df5e7"),
            format!("GET /3.0/lists/{LIST_ID}"),
        ]
    );
}

#[tokio::test]
async fn an_archive_throttled_midway_finishes_on_retry() {
    let (mailchimp, url) = start_mailchimp().await;
    let connector = archiving(&url);
    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    mailchimp.fail_next([Fault::Slow(Duration::ZERO), Fault::BareForbidden]);

    let removed = deliver_retrying(&connector, &batch(Change::Remove, three_members()), 3).await;

    assert_eq!(removed, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(mailchimp.statuses(), BTreeMap::new());
    let statuses: Vec<u16> = mailchimp.received()[1..].iter().map(|r| r.status).collect();
    assert_eq!(statuses, [204, 403, 404, 200, 204, 204]);
}

#[tokio::test]
async fn archiving_from_a_list_that_does_not_exist_is_a_permanent_failure_naming_list_id() {
    let (mailchimp, url) = start_mailchimp().await;
    archiving(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    let mut activation = toml::toml! { list_id = "f0f0f0f0f0" };
    activation.insert("remove_action".into(), "archive".into());
    let wrong_list =
        MailchimpConnector::from_settings(&connection(&url), &activation, &secrets(KEY)).unwrap();

    let removed = wrong_list
        .deliver(&batch(Change::Remove, three_members()))
        .await;

    match removed {
        Err(DeliveryError::Permanent { message }) => {
            assert!(message.contains("check `list_id`"), "{message}");
            assert!(message.contains("/lists/f0f0f0f0f0"), "{message}");
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert_eq!(
        mailchimp.statuses(),
        statuses(&[
            (ANN, "subscribed"),
            (BOB, "subscribed"),
            (CAT, "subscribed")
        ])
    );
    let requests: Vec<String> = mailchimp.received()[1..]
        .iter()
        .map(|r| format!("{} {} {}", r.method, r.uri, r.status))
        .collect();
    assert_eq!(
        requests,
        [
            format!("DELETE /3.0/lists/f0f0f0f0f0/members/{ANN} 404"),
            "GET /3.0/lists/f0f0f0f0f0 404".to_owned(),
        ]
    );
}

#[tokio::test]
async fn the_api_key_is_sent_as_basic_credentials_and_never_shown() {
    let (mailchimp, url) = start_mailchimp().await;
    let connector = unsubscribing(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();

    let received = mailchimp.received();
    assert_eq!(received[0].authorization.as_deref(), Some(BASIC_KEY));
    assert_eq!(received[0].uri, format!("/3.0/lists/{LIST_ID}"));
    assert_eq!(
        serde_json::from_str::<Value>(&received[0].body).unwrap(),
        json!({
            "members": [
                {"email_address": "ann@example.com", "status": "subscribed"},
                {"email_address": "bob@example.com", "status": "subscribed"},
                {"email_address": "cat@example.com", "status": "subscribed"},
            ],
            "update_existing": true,
        })
    );
    assert!(!format!("{connector:?}").contains("0123456789abcdef"));
}

#[tokio::test]
async fn a_forgotten_address_is_rejected_from_a_200_and_the_others_are_added() {
    let (mailchimp, url) = start_mailchimp().await;
    mailchimp
        .forgotten
        .lock()
        .unwrap()
        .insert("bob@example.com".into());

    let outcome = unsubscribing(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into(), "3".into()],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "Mailchimp refused the member (ERROR_CONTACT_EXISTS): <address> was \
                         permanently deleted and cannot be re-imported. The contact must \
                         re-subscribe to get back on the list.; the address was permanently \
                         deleted from Mailchimp and only comes back if the person signs up again"
                    .into(),
            }],
        })
    );
    assert_eq!(
        mailchimp.statuses(),
        statuses(&[(ANN, "subscribed"), (CAT, "subscribed")])
    );
}

#[tokio::test]
async fn members_without_a_usable_address_are_rejected_and_never_sent() {
    let (mailchimp, url) = start_mailchimp().await;
    let members = vec![
        member("1", "ann@example.com"),
        member("2", "ann at example"),
        Member {
            key: "3".into(),
            identifiers: BTreeMap::new(),
        },
    ];

    let outcome = unsubscribing(&url)
        .deliver(&batch(Change::Add, members))
        .await;

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
    let body: Value = serde_json::from_str(&mailchimp.received()[0].body).unwrap();
    assert_eq!(
        body["members"],
        json!([{"email_address": "ann@example.com", "status": "subscribed"}])
    );
}

#[tokio::test]
async fn a_bodyless_403_is_throttling_and_is_retried_until_the_add_lands() {
    let (mailchimp, url) = start_mailchimp().await;
    mailchimp.fail_next([Fault::BareForbidden, Fault::BareForbidden]);

    let outcome = deliver_retrying(
        &unsubscribing(&url),
        &batch(Change::Add, three_members()),
        5,
    )
    .await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    let statuses: Vec<u16> = mailchimp.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [403, 403, 200]);
    assert_eq!(mailchimp.statuses().len(), 3);
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_one_without_leaves_the_wait_open() {
    let (mailchimp, url) = start_mailchimp().await;
    mailchimp.fail_next([
        Fault::TooManyRequests(Some("1")),
        Fault::TooManyRequests(None),
    ]);
    let connector = unsubscribing(&url);
    let started = Instant::now();

    let outcome = deliver_retrying(&connector, &batch(Change::Add, three_members()), 2).await;

    let elapsed = started.elapsed();
    assert_eq!(
        outcome,
        Err(DeliveryError::RateLimited {
            message: format!(
                "{url}/lists/{LIST_ID} answered 429 Too Many Requests: Too Many Requests: You \
                 have exceeded the limit of 10 simultaneous connections."
            ),
            wait: None,
        })
    );
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(mailchimp.received().len(), 2);
    assert!(mailchimp.statuses().is_empty());
}

#[tokio::test]
async fn an_invalid_api_key_is_an_auth_failure_sent_once() {
    let (mailchimp, url) = start_mailchimp().await;
    let connector = connector_with(&url, "unsubscribe", "ffffffffffffffffffffffffffffffff-us6");

    let outcome = deliver_retrying(&connector, &batch(Change::Add, three_members()), 5).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/lists/{LIST_ID} answered 401 Unauthorized: API Key Invalid: Your API key \
                 may be invalid, or you've attempted to access the wrong datacenter.; check the \
                 API key in `api_key_env`"
            ),
        })
    );
    assert_eq!(mailchimp.received().len(), 1);
}

#[tokio::test]
async fn a_key_of_another_data_centre_is_an_auth_failure() {
    let (mailchimp, url) = start_mailchimp().await;
    let connector = connector_with(&url, "unsubscribe", "0123456789abcdef0123456789abcdef-us9");

    let outcome = deliver_retrying(&connector, &batch(Change::Add, three_members()), 5).await;

    let Err(DeliveryError::Auth { message }) = outcome else {
        panic!("expected an auth failure, got {outcome:?}");
    };
    assert!(
        message.starts_with(&format!(
            "{url}/lists/{LIST_ID} answered 403 Forbidden: API Key Invalid"
        )),
        "{message}"
    );
    assert_eq!(mailchimp.received().len(), 1);
}

#[tokio::test]
async fn server_errors_and_html_pages_are_retried_up_to_max_attempts() {
    let (mailchimp, url) = start_mailchimp().await;
    let connector = unsubscribing(&url);

    mailchimp.fail_next([Fault::HtmlPage(502)]);
    let recovered = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;
    mailchimp.fail_next([Fault::Unavailable, Fault::Unavailable, Fault::Unavailable]);
    let exhausted = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    assert_eq!(recovered, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        exhausted,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/lists/{LIST_ID} answered 503 Service Unavailable: Service Unavailable: \
                 Please try again later."
            ),
        })
    );
    let statuses: Vec<u16> = mailchimp.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [502, 200, 503, 503, 503]);
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retried_and_changes_nothing_twice() {
    let (mailchimp, url) = start_mailchimp().await;
    mailchimp.fail_next([Fault::Slow(Duration::from_millis(1500))]);
    let connector = unsubscribing(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    let DeliveryError::Retryable { message } = direct.unwrap_err() else {
        panic!("a timeout is retryable");
    };
    assert!(
        message.starts_with(&format!("POST to {url}/lists/{LIST_ID} timed out")),
        "{message}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        mailchimp.statuses(),
        statuses(&[
            (ANN, "subscribed"),
            (BOB, "subscribed"),
            (CAT, "subscribed")
        ])
    );
}

#[test]
fn mailchimp_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        api_key_env = "MAILCHIMP_KEY"
        batch_size = 1000
        region = "us6"
    };
    let activation = toml::toml! {
        list_id = "a1b2-c3"
        remove_action = "delete"
    };

    let errors = MailchimpConnector::from_settings(
        &connection,
        &activation,
        &secrets("0123456789abcdef0123456789abcdef"),
    )
    .unwrap_err();

    let error = common::problem;
    assert_eq!(
        errors,
        [
            error(
                "region",
                "unknown key in the connection settings; known keys: api_key_env, base_url, \
                 batch_size, timeout_seconds"
            ),
            error(
                "api_key_env",
                "the API key does not end with a data centre such as `-us6`; copy the whole key \
                 from Mailchimp"
            ),
            error(
                "batch_size",
                "must be between 1 and 500 in the connection settings, got 1000"
            ),
            error(
                "list_id",
                "expected a Mailchimp list id of letters and digits, got `a1b2-c3`"
            ),
            error(
                "remove_action",
                "expected `unsubscribe` or `archive`, got `delete`"
            ),
        ]
    );
}

#[test]
fn a_mailchimp_activation_without_a_list_id_is_refused_but_its_connection_checks_alone() {
    let connection = toml::toml! { api_key_env = "MAILCHIMP_KEY" };

    let errors = MailchimpConnector::from_settings(&connection, &toml::Table::new(), &secrets(KEY))
        .unwrap_err();
    let alone = segmentd_connectors::check_connection("mailchimp", &connection, &secrets(KEY));
    let unset = segmentd_connectors::check_connection("mailchimp", &connection, &BTreeMap::new());

    assert_eq!(
        errors,
        [SettingsError {
            field: "list_id".into(),
            message: "missing; set it to the audience's list id".into(),
        }]
    );
    assert_eq!(alone, Ok(()));
    assert_eq!(
        unset,
        Err(vec![SettingsError {
            field: "api_key_env".into(),
            message: "the environment variable `MAILCHIMP_KEY` is not set; export it with a \
                      Mailchimp API key"
                .into(),
        }])
    );
}

#[test]
fn mailchimp_batch_size_defaults_to_500() {
    let connection = toml::toml! { api_key_env = "MAILCHIMP_KEY" };
    let activation = toml::toml! { list_id = "a1b2c3d4e5" };

    let connector =
        segmentd_connectors::build("mailchimp", &connection, &activation, &secrets(KEY)).unwrap();

    assert_eq!(
        (connector.kind(), connector.max_batch_size()),
        ("mailchimp", 500)
    );
    assert!(segmentd_connectors::KINDS.contains(&"mailchimp"));
}

#[tokio::test]
async fn a_403_for_a_disabled_user_is_an_auth_failure_sent_once() {
    let (mailchimp, url) = start_mailchimp().await;
    mailchimp.fail_next([Fault::DisabledUser]);

    let outcome = deliver_retrying(
        &unsubscribing(&url),
        &batch(Change::Add, three_members()),
        5,
    )
    .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/lists/{LIST_ID} answered 403 Forbidden: User Disabled: This account has \
                 been disabled.; check that the API key is enabled and that its data centre \
                 suffix matches the account"
            ),
        })
    );
    assert_eq!(mailchimp.received().len(), 1);
    assert_eq!(mailchimp.statuses(), statuses(&[]));
}

#[tokio::test]
async fn a_failure_quoting_an_address_and_a_phone_number_is_reported_without_them() {
    let (mailchimp, url) = start_mailchimp().await;
    mailchimp.fail_next([Fault::InvalidResource]);

    let outcome = unsubscribing(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/lists/{LIST_ID} answered 400 Bad Request: Invalid Resource: <member> \
                 looks fake; the owner <address> can be called on <number>"
            ),
        })
    );
    assert_eq!(mailchimp.statuses(), statuses(&[]));
}
