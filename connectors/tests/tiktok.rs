//! The TikTok connector against a fake Business API v1.3 on loopback.
//!
//! The fake serves `POST /open_api/v1.3/segment/mapping/` the way TikTok does: the access
//! token in the `Access-Token` header; business errors as HTTP 200 with a non-zero `code` in
//! the `{code, message, request_id, data}` envelope; `advertiser_ids`, `action`, `id_schema`
//! and positional `batch_data` checked, every id a lower-case SHA-256 digest mapped to a known
//! audience; at most 10000 members per request. It keeps the audience as a set of identifiers
//! (`TYPE=digest`). Faults queued on it answer the next requests the way TikTok fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::tiktok::TiktokConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    Fake, accepted, deliver_retrying, header, html, member, three_members, with_retry_after,
};

// Digests computed outside this code with `printf '%s' <text> | sha256sum`.
/// `ann@example.com`
const ANN: &str = "71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476";
/// `bob@example.com`
const BOB: &str = "5ff860bf1190596c7188ab851db691f0f3169c453936e9e1eba2f9a47f7a0018";
/// `cat@example.com`
const CAT: &str = "d2d66462631a2d1b0ca18e8b66dc594a58a1cdd569028e1d97f6be4ff0d5fb68";
/// `ann.lee@example.com`
const ANN_LEE: &str = "b7e0d8372a47f54bbefeb251ab9ac1e9e6b2d1983263de10196101be3961ed23";
/// `+447700900123`
const PLUS_447700900123: &str = "a8acc3a90a7b4e4dc65e93db9240ed26523050ef754d63b75b5161de76781436";
/// `447700900123`
const DIGITS_447700900123: &str =
    "033134b911b137918338415ee3d20a064b24773d36a3b02e8b99fdd3fcd6b4cd";
/// `6d92078a-8246-4ba4-ae5b-76104861e7dc`
const IDFA: &str = "31b806b4deec8c4cb1ffb18b9ab4ee1fa82a2b30e1f47902f04d03f5db023376";

const TOKEN: &str = "act.6f3b2c1d9e8a7f60";
const ADVERTISER_ID: &str = "7012345678901234567";
const AUDIENCE_ID: &str = "1790123456789";
const MAX_MEMBERS: usize = 10_000;
const ID_TYPES: &[&str] = &["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "AAID_SHA256"];

/// One failure the fake answers a request with instead of its normal answer.
#[derive(Debug, Clone)]
enum Fault {
    /// HTTP 429 without an envelope, with this `Retry-After` if any, as a gateway sends.
    TooManyRequests(Option<&'static str>),
    /// HTTP 200 with code 40100: requests too frequent.
    Throttled,
    /// HTTP 200 with code 50000: a system error on TikTok's side.
    SystemError,
    /// An HTML error page with this status.
    HtmlPage(u16),
    /// The normal answer (the change applied at once), sent after this delay.
    Slow(Duration),
    /// HTTP 200 with code 40102: the access token has expired.
    ExpiredToken,
    /// HTTP 200 with this code and message.
    Coded(i64, &'static str),
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
struct Received {
    uri: String,
    access_token: Option<String>,
    body: String,
    /// The envelope's `code`, `None` when the answer had no envelope.
    code: Option<i64>,
}

/// The fake Business API: its audience, the faults queued and the requests received.
type Tiktok = Fake<Account, Received, Fault>;

/// The one custom audience the fake holds.
#[derive(Default)]
struct Account {
    /// Identifiers mapped to the audience, as `TYPE=digest`.
    audience: Mutex<BTreeSet<String>>,
}

impl Tiktok {
    fn audience(&self) -> Vec<String> {
        self.audience.lock().unwrap().iter().cloned().collect()
    }

    fn codes(&self) -> Vec<Option<i64>> {
        self.received().iter().map(|r| r.code).collect()
    }
}

/// TikTok's envelope, always with HTTP 200.
fn envelope(code: i64, message: &str) -> Response {
    axum::Json(json!({
        "code": code,
        "message": message,
        "request_id": "202612032254000000ABCDEF",
        "data": {},
    }))
    .into_response()
}

async fn mapping(
    State(tiktok): State<Arc<Tiktok>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = tiktok.next_fault();
    let delay = match fault {
        Some(Fault::Slow(delay)) => delay,
        _ => Duration::ZERO,
    };
    let access_token = header(&headers, "access-token").map(str::to_owned);
    let (response, code) = answer(&tiktok, access_token.as_deref(), &body, fault);
    tiktok.record(Received {
        uri: uri.to_string(),
        access_token,
        body: String::from_utf8_lossy(&body).into_owned(),
        code,
    });
    // The change is applied before the delay, as on a platform that answers late.
    tokio::time::sleep(delay).await;
    response
}

/// The answer and its envelope code.
fn answer(
    tiktok: &Tiktok,
    access_token: Option<&str>,
    body: &[u8],
    fault: Option<Fault>,
) -> (Response, Option<i64>) {
    let coded = |code: i64, message: &str| (envelope(code, message), Some(code));
    match fault {
        Some(Fault::TooManyRequests(retry_after)) => {
            let response = StatusCode::TOO_MANY_REQUESTS.into_response();
            return (with_retry_after(response, retry_after), None);
        }
        Some(Fault::Throttled) => {
            return coded(40100, "Too many requests. Please retry in some time.");
        }
        Some(Fault::SystemError) => return coded(50000, "System error. Please retry."),
        Some(Fault::HtmlPage(status)) => {
            let page = "<html><head><title>502 Bad Gateway</title></head>\
                        <body>Bad Gateway</body></html>";
            return (html(status, page, "text/html"), None);
        }
        Some(Fault::ExpiredToken) => {
            return coded(40102, "The access token has expired. Please renew it.");
        }
        Some(Fault::Coded(code, message)) => return coded(code, message),
        Some(Fault::Slow(_)) | None => {}
    }

    match access_token {
        None => return coded(40104, "Access token is null. Please add it to the header."),
        Some(TOKEN) => {}
        Some(_) => return coded(40105, "Access token is incorrect or has been revoked."),
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return coded(40002, "Request body is not valid JSON.");
    };
    if request["advertiser_ids"] != json!([ADVERTISER_ID]) {
        return coded(40002, "advertiser_ids: no permission for this advertiser.");
    }
    let action = request["action"].as_str().unwrap_or_default();
    if !["add", "delete"].contains(&action) {
        return coded(40002, "action: must be one of add, delete.");
    }
    let schema: Option<Vec<&str>> = request["id_schema"]
        .as_array()
        .and_then(|kinds| kinds.iter().map(Value::as_str).collect());
    let Some(schema) = schema
        .filter(|schema| !schema.is_empty() && schema.iter().all(|kind| ID_TYPES.contains(kind)))
    else {
        return coded(40002, "id_schema: invalid value.");
    };
    let Some(rows) = request["batch_data"].as_array() else {
        return coded(40002, "batch_data: required.");
    };
    if rows.len() > MAX_MEMBERS {
        return coded(40002, "batch_data: too many entries in one request.");
    }

    let mut identifiers = Vec::new();
    for row in rows {
        let Some(objects) = row
            .as_array()
            .filter(|objects| objects.len() == schema.len())
        else {
            return coded(40002, "batch_data: each entry must match id_schema.");
        };
        let mut usable = 0;
        for (object, kind) in objects.iter().zip(&schema) {
            if object == &json!({}) {
                continue;
            }
            let id = object["id"].as_str().unwrap_or_default();
            let digest = id.len() == 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !digest {
                return coded(40002, "batch_data: id must be a lower-case SHA256 digest.");
            }
            if object["audience_ids"] != json!([AUDIENCE_ID]) {
                return coded(40002, "audience_ids: audience does not exist.");
            }
            identifiers.push(format!("{kind}={id}"));
            usable += 1;
        }
        if usable == 0 {
            return coded(40002, "batch_data: an entry holds no id.");
        }
    }

    let mut audience = tiktok.audience.lock().unwrap();
    for identifier in identifiers {
        if action == "add" {
            audience.insert(identifier);
        } else {
            audience.remove(&identifier);
        }
    }
    coded(0, "OK")
}

/// Starts the fake on a loopback port; returns it with its API root (`.../open_api/v1.3`).
async fn start_tiktok() -> (Arc<Tiktok>, String) {
    let routes = axum::Router::new().route(
        "/open_api/v1.3/segment/mapping/",
        axum::routing::post(mapping),
    );
    let (tiktok, url) = common::start(Tiktok::default(), routes).await;
    (tiktok, format!("{url}/open_api/v1.3"))
}

fn secrets(token: &str) -> BTreeMap<String, String> {
    common::secrets(&[("access_token", token)])
}

fn connection(base_url: &str) -> toml::Table {
    let mut table = toml::toml! {
        access_token_env = "TIKTOK_TOKEN"
        advertiser_id = "7012345678901234567"
        timeout_seconds = 1
    };
    table.insert("base_url".into(), base_url.into());
    table
}

fn email_only(base_url: &str) -> TiktokConnector {
    let activation = toml::toml! { audience_id = "1790123456789" };
    TiktokConnector::from_settings(&connection(base_url), &activation, &secrets(TOKEN)).unwrap()
}

fn email_phone_idfa(base_url: &str, phone_format: &str) -> TiktokConnector {
    let mut activation: toml::Table = r#"
        audience_id = 1790123456789
        schema = { IDFA_SHA256 = "idfa", EMAIL_SHA256 = "email", PHONE_SHA256 = "mobile" }
    "#
    .parse()
    .unwrap();
    activation.insert("phone_format".into(), phone_format.into());
    TiktokConnector::from_settings(&connection(base_url), &activation, &secrets(TOKEN)).unwrap()
}

fn batch(change: Change, members: Vec<Member>) -> Batch {
    common::batch("vip/tiktok", change, members)
}

fn emails(digests: &[&str]) -> Vec<String> {
    let mut identifiers: Vec<String> = digests
        .iter()
        .map(|d| format!("EMAIL_SHA256={d}"))
        .collect();
    identifiers.sort();
    identifiers
}

#[tokio::test]
async fn adding_three_and_removing_one_leaves_the_two_expected_hashes() {
    let (tiktok, url) = start_tiktok().await;
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
    assert_eq!(tiktok.audience(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn the_token_travels_in_its_header_and_the_body_holds_only_digests() {
    let (tiktok, url) = start_tiktok().await;
    let connector = email_only(&url);

    connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    connector
        .deliver(&batch(Change::Remove, three_members()))
        .await
        .unwrap();

    let received = tiktok.received();
    assert_eq!(received.len(), 2);
    for request in &received {
        assert_eq!(request.uri, "/open_api/v1.3/segment/mapping/");
        assert_eq!(request.access_token.as_deref(), Some(TOKEN));
        assert!(!request.body.contains('@'), "{}", request.body);
        assert!(!request.body.contains(TOKEN), "{}", request.body);
    }
    let mapped = |digest: &str| json!([{"id": digest, "audience_ids": [AUDIENCE_ID]}]);
    assert_eq!(
        serde_json::from_str::<Value>(&received[0].body).unwrap(),
        json!({
            "advertiser_ids": [ADVERTISER_ID],
            "action": "add",
            "id_schema": ["EMAIL_SHA256"],
            "batch_data": [mapped(ANN), mapped(BOB), mapped(CAT)],
        })
    );
    assert_eq!(
        serde_json::from_str::<Value>(&received[1].body).unwrap()["action"],
        "delete"
    );
    assert!(!format!("{connector:?}").contains(TOKEN));
    assert!(tiktok.audience().is_empty());
}

#[tokio::test]
async fn emails_lose_case_and_plus_tags_so_a_removal_written_differently_matches() {
    let (tiktok, url) = start_tiktok().await;
    let connector = email_only(&url);

    connector
        .deliver(&batch(
            Change::Add,
            vec![
                member("1", &[("email", "  Ann+Promo@Example.COM ")]),
                member("2", &[("email", "Ann.Lee@example.com")]),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(tiktok.audience(), emails(&[ANN, ANN_LEE]));
    connector
        .deliver(&batch(
            Change::Remove,
            vec![member("1", &[("email", "ann@example.com")])],
        ))
        .await
        .unwrap();

    assert_eq!(tiktok.audience(), emails(&[ANN_LEE]));
}

#[tokio::test]
async fn an_already_hashed_email_is_sent_as_it_is() {
    let (tiktok, url) = start_tiktok().await;

    email_only(&url)
        .deliver(&batch(
            Change::Add,
            vec![member("1", &[("email", &ANN.to_ascii_uppercase())])],
        ))
        .await
        .unwrap();

    assert_eq!(tiktok.audience(), emails(&[ANN]));
}

#[tokio::test]
async fn a_multi_key_row_is_sent_in_schema_order_with_empty_objects_for_missing_values() {
    let (tiktok, url) = start_tiktok().await;
    let members = vec![
        member(
            "1",
            &[
                ("email", "ann@example.com"),
                ("mobile", "+44 7700 900123"),
                ("idfa", "6D92078A-8246-4BA4-AE5B-76104861E7DC"),
            ],
        ),
        member("2", &[("email", "bob@example.com")]),
    ];

    let outcome = email_phone_idfa(&url, "e164")
        .deliver(&batch(Change::Add, members))
        .await;

    assert_eq!(outcome, Ok(accepted(&["1", "2"])));
    let body: Value = serde_json::from_str(&tiktok.received()[0].body).unwrap();
    assert_eq!(
        body["id_schema"],
        json!(["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256"])
    );
    let mapped = |digest: &str| json!({"id": digest, "audience_ids": [AUDIENCE_ID]});
    assert_eq!(
        body["batch_data"],
        json!([
            [mapped(ANN), mapped(PLUS_447700900123), mapped(IDFA)],
            [mapped(BOB), {}, {}],
        ])
    );
    assert_eq!(
        tiktok.audience(),
        [
            // Sorted: BOB's digest starts with 5, ANN's with 7.
            format!("EMAIL_SHA256={BOB}"),
            format!("EMAIL_SHA256={ANN}"),
            format!("IDFA_SHA256={IDFA}"),
            format!("PHONE_SHA256={PLUS_447700900123}"),
        ]
    );
}

#[tokio::test]
async fn phones_are_hashed_as_digits_only_when_configured_so() {
    let (tiktok, url) = start_tiktok().await;

    email_phone_idfa(&url, "digits")
        .deliver(&batch(
            Change::Add,
            vec![member("1", &[("mobile", "+44 7700 900123")])],
        ))
        .await
        .unwrap();
    assert_eq!(
        tiktok.audience(),
        [format!("PHONE_SHA256={DIGITS_447700900123}")]
    );
}

#[tokio::test]
async fn members_without_a_usable_identifier_are_rejected_and_never_sent() {
    let (tiktok, url) = start_tiktok().await;
    let members = vec![
        member("1", &[("email", "ann@example.com")]),
        member("2", &[("mobile", "12")]),
        member("3", &[("email", "+promo@example.com"), ("idfa", " ")]),
    ];

    let outcome = email_phone_idfa(&url, "e164")
        .deliver(&batch(Change::Add, members))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into()],
            rejected: vec![
                Rejection {
                    key: "2".into(),
                    reason: "no usable identifier: EMAIL_SHA256 (`email`) is missing; \
                             PHONE_SHA256 (`mobile`) is not a phone number of 7 to 15 digits \
                             with its country code; IDFA_SHA256 (`idfa`) is missing"
                        .into(),
                },
                Rejection {
                    key: "3".into(),
                    reason: "no usable identifier: EMAIL_SHA256 (`email`) is not an e-mail \
                             address; PHONE_SHA256 (`mobile`) is missing; IDFA_SHA256 (`idfa`) \
                             is empty once normalised"
                        .into(),
                },
            ],
        })
    );
    let body: Value = serde_json::from_str(&tiktok.received()[0].body).unwrap();
    assert_eq!(body["batch_data"].as_array().unwrap().len(), 1);
    assert_eq!(tiktok.audience(), emails(&[ANN]));
}

#[tokio::test]
async fn a_batch_with_no_usable_member_makes_no_request() {
    let (tiktok, url) = start_tiktok().await;

    let outcome = email_only(&url)
        .deliver(&batch(Change::Add, vec![member("1", &[("email", " ")])]))
        .await
        .unwrap();

    assert_eq!(outcome.accepted, Vec::<String>::new());
    assert_eq!(outcome.rejected.len(), 1);
    assert!(tiktok.received().is_empty());
}

#[tokio::test]
async fn a_throttle_code_in_a_200_is_retried_until_the_add_lands() {
    let (tiktok, url) = start_tiktok().await;
    tiktok.fail_next([Fault::Throttled, Fault::Throttled]);
    let connector = email_only(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 5).await;

    assert_eq!(
        direct,
        Err(DeliveryError::RateLimited {
            message: format!(
                "{url}/segment/mapping/ answered 200 OK: Too many requests. Please retry in some \
                 time. (code 40100, request_id 202612032254000000ABCDEF)"
            ),
            wait: None,
        })
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(tiktok.codes(), [Some(40100), Some(40100), Some(0)]);
    assert_eq!(tiktok.audience(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_one_without_leaves_the_wait_open() {
    let (tiktok, url) = start_tiktok().await;
    tiktok.fail_next([
        Fault::TooManyRequests(Some("1")),
        Fault::TooManyRequests(None),
    ]);
    let started = Instant::now();

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 2).await;

    let elapsed = started.elapsed();
    assert_eq!(
        outcome,
        Err(DeliveryError::RateLimited {
            message: format!("{url}/segment/mapping/ answered 429 Too Many Requests: "),
            wait: None,
        })
    );
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(tiktok.received().len(), 2);
    assert!(tiktok.audience().is_empty());
}

#[tokio::test]
async fn system_errors_and_html_pages_are_retried_up_to_max_attempts() {
    let (tiktok, url) = start_tiktok().await;
    let connector = email_only(&url);

    tiktok.fail_next([Fault::HtmlPage(502)]);
    let recovered = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;
    tiktok.fail_next([Fault::SystemError, Fault::SystemError, Fault::SystemError]);
    let exhausted = deliver_retrying(&connector, &batch(Change::Remove, three_members()), 3).await;

    assert_eq!(recovered, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        exhausted,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/segment/mapping/ answered 200 OK: System error. Please retry. (code 50000, \
                 request_id 202612032254000000ABCDEF)"
            ),
        })
    );
    assert_eq!(
        tiktok.codes(),
        [None, Some(0), Some(50000), Some(50000), Some(50000)]
    );
    assert_eq!(tiktok.audience(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn an_html_page_with_a_client_error_is_permanent() {
    let (tiktok, url) = start_tiktok().await;
    tiktok.fail_next([Fault::HtmlPage(403)]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/segment/mapping/ answered 403 Forbidden with an HTML page instead of a \
                 TikTok answer"
            ),
        })
    );
    assert_eq!(tiktok.received().len(), 1);
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retried_and_the_audience_holds_each_member_once() {
    let (tiktok, url) = start_tiktok().await;
    tiktok.fail_next([Fault::Slow(Duration::from_millis(1500))]);
    let connector = email_only(&url);

    let direct = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let retried = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    let DeliveryError::Retryable { message } = direct.unwrap_err() else {
        panic!("a timeout is retryable");
    };
    assert!(
        message.starts_with(&format!("POST to {url}/segment/mapping/ timed out")),
        "{message}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    // The slow request landed before its answer was due; replaying it changed nothing.
    assert_eq!(tiktok.received().len(), 2);
    assert_eq!(tiktok.audience(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn an_expired_token_is_an_auth_failure_sent_once() {
    let (tiktok, url) = start_tiktok().await;
    tiktok.fail_next([Fault::ExpiredToken]);

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 5).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/segment/mapping/ answered 200 OK: The access token has expired. Please \
                 renew it. (code 40102, request_id 202612032254000000ABCDEF); renew the access \
                 token in `access_token_env`"
            ),
        })
    );
    assert_eq!(tiktok.received().len(), 1);
    assert!(tiktok.audience().is_empty());
}

#[tokio::test]
async fn a_wrong_token_is_an_auth_failure() {
    let (tiktok, url) = start_tiktok().await;
    let activation = toml::toml! { audience_id = "1790123456789" };
    let connector =
        TiktokConnector::from_settings(&connection(&url), &activation, &secrets("revoked"))
            .unwrap();

    let error = connector
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap_err();

    assert!(matches!(error, DeliveryError::Auth { .. }), "{error:?}");
    assert_eq!(tiktok.codes(), [Some(40105)]);
    assert!(tiktok.audience().is_empty());
}

#[tokio::test]
async fn configured_auth_codes_stop_the_activation_and_other_codes_are_permanent() {
    let (tiktok, url) = start_tiktok().await;
    let activation = toml::toml! { audience_id = "1790123456789" };
    let mut configured = connection(&url);
    configured.insert("auth_codes".into(), toml::Value::Array(vec![40002.into()]));
    let configured =
        TiktokConnector::from_settings(&configured, &activation, &secrets(TOKEN)).unwrap();
    tiktok.fail_next([
        Fault::Coded(40002, "Authorization failed: invalid access token."),
        Fault::Coded(40002, "Authorization failed: invalid access token."),
    ]);

    let stopped = deliver_retrying(&configured, &batch(Change::Add, three_members()), 3).await;
    let refused =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

    assert!(
        matches!(stopped, Err(DeliveryError::Auth { .. })),
        "{stopped:?}"
    );
    assert_eq!(
        refused,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/segment/mapping/ answered 200 OK: Authorization failed: invalid access \
                 token. (code 40002, request_id 202612032254000000ABCDEF)"
            ),
        })
    );
    assert_eq!(tiktok.received().len(), 2);
    assert!(tiktok.audience().is_empty());
}

#[tokio::test]
async fn an_audience_tiktok_does_not_know_is_a_permanent_failure() {
    let (tiktok, url) = start_tiktok().await;
    let activation = toml::toml! { audience_id = "999" };
    let connector =
        TiktokConnector::from_settings(&connection(&url), &activation, &secrets(TOKEN)).unwrap();

    let outcome = deliver_retrying(&connector, &batch(Change::Add, three_members()), 3).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/segment/mapping/ answered 200 OK: audience_ids: audience does not exist. \
                 (code 40002, request_id 202612032254000000ABCDEF)"
            ),
        })
    );
    assert_eq!(tiktok.received().len(), 1);
}

#[tokio::test]
async fn a_full_batch_of_the_largest_size_fits_one_request() {
    let (tiktok, url) = start_tiktok().await;
    let mut table = connection(&url);
    table.insert("batch_size".into(), 10_000.into());
    let activation = toml::toml! { audience_id = "1790123456789" };
    let connector = TiktokConnector::from_settings(&table, &activation, &secrets(TOKEN)).unwrap();
    let members: Vec<Member> = (0..connector.max_batch_size())
        .map(|n| member(&n.to_string(), &[("email", &format!("m{n}@example.com"))]))
        .collect();

    let outcome = connector.deliver(&batch(Change::Add, members)).await;

    assert_eq!(outcome.map(|o| o.accepted.len()), Ok(10_000));
    assert_eq!(tiktok.codes(), [Some(0)]);
    assert_eq!(tiktok.audience().len(), 10_000);
}

#[test]
fn tiktok_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        access_token_env = "TIKTOK_TOKEN"
        advertiser_id = "adv-1"
        batch_size = 20000
        throttle_codes = "40100"
        region = "eu"
    };
    let activation = toml::toml! {
        audience_id = 0
        schema = { EMAIL_SHA256 = "email", EMAIL_MD5 = "email" }
        phone_format = "national"
    };

    let errors =
        TiktokConnector::from_settings(&connection, &activation, &BTreeMap::new()).unwrap_err();

    let error = common::problem;
    assert_eq!(
        errors,
        [
            error(
                "region",
                "unknown key in the connection settings; known keys: access_token_env, \
                 advertiser_id, base_url, batch_size, timeout_seconds, throttle_codes, auth_codes"
            ),
            error(
                "access_token_env",
                "the environment variable `TIKTOK_TOKEN` is not set; export it with a TikTok \
                 Business API access token"
            ),
            error(
                "advertiser_id",
                "expected the advertiser account's id, digits only, in the connection settings"
            ),
            error(
                "batch_size",
                "must be between 1 and 10000 in the connection settings, got 20000"
            ),
            error(
                "throttle_codes",
                "expected a list of integer codes such as [40100, 42900], found string"
            ),
            error(
                "audience_id",
                "expected the custom audience's id, digits only, in the activation settings"
            ),
            error(
                "schema.EMAIL_MD5",
                "unknown TikTok identifier type; known types: EMAIL_SHA256, PHONE_SHA256, \
                 IDFA_SHA256, AAID_SHA256"
            ),
            error(
                "phone_format",
                "expected `e164` or `digits`, got `national`"
            ),
        ]
    );
}

#[test]
fn a_tiktok_activation_without_an_audience_id_is_refused_but_its_connection_checks_alone() {
    let connection = toml::toml! {
        access_token_env = "TIKTOK_TOKEN"
        advertiser_id = 7001
    };

    let errors = TiktokConnector::from_settings(&connection, &toml::Table::new(), &secrets(TOKEN))
        .unwrap_err();
    let alone = segmentd_connectors::check_connection("tiktok", &connection, &secrets(TOKEN));

    assert_eq!(
        errors,
        [SettingsError {
            field: "audience_id".into(),
            message: "missing; set it to the custom audience's id".into(),
        }]
    );
    assert_eq!(alone, Ok(()));
}

#[test]
fn tiktok_batch_size_defaults_to_one_thousand() {
    let connection = toml::toml! {
        access_token_env = "TIKTOK_TOKEN"
        advertiser_id = "7012345678901234567"
    };
    let activation = toml::toml! { audience_id = "1790123456789" };

    let connector =
        segmentd_connectors::build("tiktok", &connection, &activation, &secrets(TOKEN)).unwrap();

    assert_eq!(
        (connector.kind(), connector.max_batch_size()),
        ("tiktok", 1000)
    );
    assert!(segmentd_connectors::KINDS.contains(&"tiktok"));
}
