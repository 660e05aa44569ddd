//! The Meta connector against a fake Graph API on loopback.
//!
//! The fake serves `POST` and `DELETE /{version}/{audience_id}/users` the way the Marketing API
//! does: it checks the access token, the multi-key schema, the row arity, the session and the
//! shape of every hashed value, keeps the audience as a set of rows (schema key to value), and
//! answers with `num_received` / `num_invalid_entries`. Faults queued on it answer the next
//! requests the way Meta fails: throttling codes in the error body, an expired token, an HTML
//! page, a slow answer, a refused removal.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::meta::MetaConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, RetryPolicy,
    SettingsError, deliver_with_retries,
};
use serde_json::{Value, json};
use tokio::time::Instant;

// Digests computed outside this code with `printf '%s' <text> | sha256sum`.
const ANN: &str = "71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476";
const BOB: &str = "5ff860bf1190596c7188ab851db691f0f3169c453936e9e1eba2f9a47f7a0018";
const CAT: &str = "d2d66462631a2d1b0ca18e8b66dc594a58a1cdd569028e1d97f6be4ff0d5fb68";
/// `447700900123`
const PHONE_447700900123: &str = "033134b911b137918338415ee3d20a064b24773d36a3b02e8b99fdd3fcd6b4cd";
/// `gb`
const GB: &str = "0b407281768f0e833afef47ed464b6571d01ca4d53c12ce5c51d1462f4ad6677";

const TOKEN: &str = "EAAB-system-user-token";
const AUDIENCE_ID: &str = "23851234567890123";
const MAX_ROWS: usize = 10_000;
/// Schema keys whose values must be SHA-256 digests.
const HASHED_KEYS: &[&str] = &[
    "EMAIL", "PHONE", "GEN", "DOBY", "DOBM", "DOBD", "LN", "FN", "FI", "CT", "ST", "ZIP", "COUNTRY",
];
/// Schema keys sent in clear.
const CLEAR_KEYS: &[&str] = &["EXTERN_ID", "MADID"];

/// One failure the fake answers a request with instead of its normal answer.
#[derive(Debug, Clone)]
enum Fault {
    /// HTTP 429, with this `Retry-After` if any (Meta itself does not send 429; proxies do).
    TooManyRequests(Option<&'static str>),
    /// A Graph error with a throttling code, and an `X-Business-Use-Case-Usage` header
    /// asking for this many minutes if any.
    Throttled { code: i64, minutes: Option<u64> },
    /// HTTP 503 with Graph error code 2, "service temporarily unavailable".
    Unavailable,
    /// An HTML error page with this status.
    HtmlPage(u16),
    /// The normal answer (the change applied at once), sent after this delay.
    Slow(Duration),
    /// Graph error 190: the access token has expired.
    ExpiredToken,
    /// The refusal to remove users from an audience that would become too small.
    AudienceTooSmall,
    /// HTTP 200 with an empty JSON object, as a proxy might answer; nothing is applied.
    EmptyObject,
    /// HTTP 200 carrying a Graph error envelope with this code; nothing is applied.
    ErrorIn200(i64),
    /// A Graph permission error: this HTTP status, code and subcode if any, and message.
    Denied {
        status: u16,
        code: i64,
        subcode: Option<i64>,
        message: &'static str,
    },
}

/// A request as the fake received it.
#[derive(Debug, Clone)]
struct Received {
    method: Method,
    uri: String,
    body: String,
    status: u16,
}

/// The fake Graph API and the one audience it holds.
struct Graph {
    audience: Mutex<BTreeSet<Vec<(String, String)>>>,
    faults: Mutex<VecDeque<Fault>>,
    /// Values the fake cannot match; a row holding one counts as an invalid entry.
    unmatchable: Mutex<BTreeSet<String>>,
    received: Mutex<Vec<Received>>,
}

impl Graph {
    /// The audience as rows of `KEY=value`, empty values left out, sorted.
    fn audience(&self) -> Vec<Vec<String>> {
        self.audience
            .lock()
            .unwrap()
            .iter()
            .map(|row| {
                row.iter()
                    .filter(|(_, value)| !value.is_empty())
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect()
            })
            .collect()
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn fail_next(&self, faults: impl IntoIterator<Item = Fault>) {
        self.faults.lock().unwrap().extend(faults);
    }
}

fn graph_error(status: u16, code: i64, message: &str) -> Response {
    let body = json!({"error": {
        "message": message,
        "type": if code == 190 { "OAuthException" } else { "GraphMethodException" },
        "code": code,
        "fbtrace_id": "AbCdEf123",
    }});
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

async fn users(
    State(graph): State<Arc<Graph>>,
    method: Method,
    Path((version, audience_id)): Path<(String, String)>,
    uri: Uri,
    body: Bytes,
) -> Response {
    let fault = graph.faults.lock().unwrap().pop_front();
    let delay = match fault {
        Some(Fault::Slow(delay)) => delay,
        _ => Duration::ZERO,
    };
    let response = answer(&graph, &method, &version, &audience_id, &body, fault);
    graph.received.lock().unwrap().push(Received {
        method,
        uri: uri.to_string(),
        body: String::from_utf8_lossy(&body).into_owned(),
        status: response.status().as_u16(),
    });
    // The change is applied before the delay, as on a platform that answers late.
    tokio::time::sleep(delay).await;
    response
}

fn answer(
    graph: &Graph,
    method: &Method,
    version: &str,
    audience_id: &str,
    body: &[u8],
    fault: Option<Fault>,
) -> Response {
    match fault {
        Some(Fault::TooManyRequests(retry_after)) => {
            let mut response = StatusCode::TOO_MANY_REQUESTS.into_response();
            if let Some(value) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", value.parse().unwrap());
            }
            return response;
        }
        Some(Fault::Throttled { code, minutes }) => {
            let mut response = graph_error(400, code, "(#17) User request limit reached");
            if let Some(minutes) = minutes {
                let usage = json!({ "act_1": [{
                    "type": "custom_audience",
                    "call_count": 100,
                    "estimated_time_to_regain_access": minutes,
                }]});
                response.headers_mut().insert(
                    "x-business-use-case-usage",
                    usage.to_string().parse().unwrap(),
                );
            }
            return response;
        }
        Some(Fault::Unavailable) => {
            return graph_error(503, 2, "Service temporarily unavailable");
        }
        Some(Fault::HtmlPage(status)) => {
            let page = "<!DOCTYPE html><html><head><title>Error</title></head>\
                        <body>Sorry, something went wrong.</body></html>";
            let mut response = page.into_response();
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
            return response;
        }
        Some(Fault::Denied {
            status,
            code,
            subcode,
            message,
        }) => {
            let mut response = graph_error(status, code, message);
            if let Some(subcode) = subcode {
                let body = json!({"error": {
                    "message": message,
                    "type": "OAuthException",
                    "code": code,
                    "error_subcode": subcode,
                    "fbtrace_id": "AbCdEf123",
                }});
                response =
                    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
            }
            return response;
        }
        Some(Fault::ExpiredToken) => {
            return graph_error(
                400,
                190,
                "Error validating access token: Session has expired on Thursday, 03-Dec-26.",
            );
        }
        Some(Fault::AudienceTooSmall) if method == Method::DELETE => {
            return graph_error(
                400,
                100,
                "Audience Size too low: cannot remove users because the audience would be too \
                 small",
            );
        }
        Some(Fault::EmptyObject) => return axum::Json(json!({})).into_response(),
        Some(Fault::ErrorIn200(code)) => {
            return graph_error(200, code, "Error validating access token: session invalid.");
        }
        Some(Fault::Slow(_) | Fault::AudienceTooSmall) | None => {}
    }

    if version != "v25.0" || audience_id != AUDIENCE_ID {
        return graph_error(400, 100, "(#100) Unsupported request: unknown object");
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return graph_error(400, 100, "(#100) The request body is not JSON");
    };
    if request["access_token"] != TOKEN {
        return graph_error(400, 190, "Invalid OAuth access token.");
    }
    let session = &request["session"];
    if !session["session_id"].is_i64()
        || session["batch_seq"].as_i64().is_none_or(|seq| seq < 1)
        || !session["last_batch_flag"].is_boolean()
    {
        return graph_error(400, 100, "(#100) session is missing or malformed");
    }
    let schema: Option<Vec<String>> = request["payload"]["schema"].as_array().and_then(|keys| {
        keys.iter()
            .map(|key| key.as_str().map(str::to_owned))
            .collect()
    });
    let Some(schema) = schema.filter(|schema| {
        !schema.is_empty()
            && schema.iter().all(|key| {
                HASHED_KEYS.contains(&key.as_str()) || CLEAR_KEYS.contains(&key.as_str())
            })
    }) else {
        return graph_error(400, 100, "(#100) Invalid schema");
    };
    let rows: Option<Vec<Vec<String>>> = request["payload"]["data"].as_array().and_then(|rows| {
        rows.iter()
            .map(|row| {
                let row = row.as_array()?;
                (row.len() == schema.len())
                    .then(|| row.iter().map(|v| v.as_str().map(str::to_owned)).collect())?
            })
            .collect()
    });
    let Some(rows) = rows else {
        return graph_error(400, 100, "(#100) Data is missing or does not match schema");
    };
    if rows.len() > MAX_ROWS {
        return graph_error(400, 100, "(#100) Too many rows in one request");
    }

    let unmatchable = graph.unmatchable.lock().unwrap().clone();
    let mut audience = graph.audience.lock().unwrap();
    let mut invalid = 0;
    let mut samples = serde_json::Map::new();
    for row in &rows {
        let bad = row.iter().zip(&schema).find(|(value, key)| {
            let hashed = HASHED_KEYS.contains(&key.as_str());
            let digest = value.len() == 64
                && value
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            (hashed && !value.is_empty() && !digest) || unmatchable.contains(*value)
        });
        if bad.is_some() || row.iter().all(String::is_empty) {
            invalid += 1;
            if let Some((value, _)) = bad {
                samples.insert(value.clone(), json!("Invalid format"));
            }
            continue;
        }
        let tuple: Vec<(String, String)> =
            schema.iter().cloned().zip(row.iter().cloned()).collect();
        if method == Method::POST {
            audience.insert(tuple);
        } else {
            audience.remove(&tuple);
        }
    }
    axum::Json(json!({
        "audience_id": AUDIENCE_ID,
        "session_id": session["session_id"],
        "num_received": rows.len(),
        "num_invalid_entries": invalid,
        "invalid_entry_samples": samples,
    }))
    .into_response()
}

/// Starts the fake on a loopback port; returns it with its base URL.
async fn start_graph() -> (Arc<Graph>, String) {
    let graph = Arc::new(Graph {
        audience: Mutex::new(BTreeSet::new()),
        faults: Mutex::new(VecDeque::new()),
        unmatchable: Mutex::new(BTreeSet::new()),
        received: Mutex::new(Vec::new()),
    });
    let router = axum::Router::new()
        .route(
            "/{version}/{audience_id}/users",
            axum::routing::post(users).delete(users),
        )
        .with_state(Arc::clone(&graph));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (graph, url)
}

fn secrets() -> BTreeMap<String, String> {
    BTreeMap::from([("access_token".to_owned(), TOKEN.to_owned())])
}

fn connection(base_url: &str) -> toml::Table {
    let mut table = toml::toml! {
        access_token_env = "META_TOKEN"
        timeout_seconds = 1
    };
    table.insert("base_url".into(), base_url.into());
    table
}

fn email_only(base_url: &str) -> MetaConnector {
    let activation = toml::toml! { audience_id = "23851234567890123" };
    MetaConnector::from_settings(&connection(base_url), &activation, &secrets()).unwrap()
}

fn email_phone_country(base_url: &str) -> MetaConnector {
    let activation: toml::Table = r#"
        audience_id = 23851234567890123
        schema = { COUNTRY = "country", EMAIL = "email", PHONE = "mobile" }
    "#
    .parse()
    .unwrap();
    MetaConnector::from_settings(&connection(base_url), &activation, &secrets()).unwrap()
}

fn member(key: &str, identifiers: &[(&str, &str)]) -> Member {
    Member {
        key: key.into(),
        identifiers: identifiers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
    }
}

fn batch(change: Change, members: Vec<Member>) -> Batch {
    Batch {
        run_id: 42,
        activation: "vip/meta".into(),
        change,
        sequence: 0,
        members,
        replace: None,
    }
}

fn three_members() -> Vec<Member> {
    vec![
        member("1", &[("email", "ann@example.com")]),
        member("2", &[("email", "bob@example.com")]),
        member("3", &[("email", "cat@example.com")]),
    ]
}

fn quick_policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: NonZeroU32::new(max_attempts).unwrap(),
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_total_time: Duration::from_secs(30),
        max_retry_after: Duration::from_secs(5),
    }
}

fn accepted(keys: &[&str]) -> Outcome {
    Outcome {
        accepted: keys.iter().map(|key| key.to_string()).collect(),
        rejected: vec![],
    }
}

fn emails(hashes: &[&str]) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = hashes.iter().map(|h| vec![format!("EMAIL={h}")]).collect();
    rows.sort();
    rows
}

#[tokio::test]
async fn adding_three_and_removing_one_leaves_the_two_expected_hashes() {
    let (graph, url) = start_graph().await;
    let meta = email_only(&url);

    let added = meta.deliver(&batch(Change::Add, three_members())).await;
    let removed = meta
        .deliver(&batch(
            Change::Remove,
            vec![member("2", &[("email", "bob@example.com")])],
        ))
        .await;

    assert_eq!(added, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(removed, Ok(accepted(&["2"])));
    assert_eq!(graph.audience(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn raw_emails_and_the_token_never_appear_outside_the_request_body() {
    let (graph, url) = start_graph().await;
    let meta = email_only(&url);

    meta.deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    meta.deliver(&batch(Change::Remove, three_members()))
        .await
        .unwrap();

    let received = graph.received();
    assert_eq!(received.len(), 2);
    for request in &received {
        assert!(!request.body.contains('@'), "{}", request.body);
        assert_eq!(
            request.uri,
            format!("/v25.0/{AUDIENCE_ID}/users"),
            "no token or identifier in the URL"
        );
    }
    assert_eq!(received[0].method, Method::POST);
    assert_eq!(received[1].method, Method::DELETE);
    assert!(graph.audience().is_empty());
}

#[tokio::test]
async fn a_removal_written_differently_from_its_add_removes_the_member() {
    let (graph, url) = start_graph().await;
    let meta = email_only(&url);

    meta.deliver(&batch(
        Change::Add,
        vec![member("1", &[("email", "  Ann@Example.COM ")])],
    ))
    .await
    .unwrap();
    assert_eq!(graph.audience(), emails(&[ANN]));
    meta.deliver(&batch(
        Change::Remove,
        vec![member("1", &[("email", "ann@example.com")])],
    ))
    .await
    .unwrap();

    assert!(graph.audience().is_empty());
}

#[tokio::test]
async fn an_already_hashed_email_is_sent_as_it_is() {
    let (graph, url) = start_graph().await;

    email_only(&url)
        .deliver(&batch(Change::Add, vec![member("1", &[("email", ANN)])]))
        .await
        .unwrap();

    assert_eq!(graph.audience(), emails(&[ANN]));
}

#[tokio::test]
async fn a_multi_key_row_is_sent_in_schema_order_with_blanks_for_missing_values() {
    let (graph, url) = start_graph().await;
    let members = vec![
        member(
            "1",
            &[
                ("email", "ann@example.com"),
                ("mobile", "+44 7700 900123"),
                ("country", "GB"),
            ],
        ),
        member("2", &[("email", "bob@example.com")]),
    ];

    let outcome = email_phone_country(&url)
        .deliver(&batch(Change::Add, members))
        .await;

    assert_eq!(outcome, Ok(accepted(&["1", "2"])));
    let body: Value = serde_json::from_str(&graph.received()[0].body).unwrap();
    assert_eq!(
        body["payload"]["schema"],
        json!(["EMAIL", "PHONE", "COUNTRY"])
    );
    assert_eq!(
        body["payload"]["data"],
        json!([[ANN, PHONE_447700900123, GB], [BOB, "", ""]])
    );
    assert_eq!(
        graph.audience(),
        [
            vec![format!("EMAIL={BOB}")],
            vec![
                format!("EMAIL={ANN}"),
                format!("PHONE={PHONE_447700900123}"),
                format!("COUNTRY={GB}")
            ],
        ]
    );
}

#[tokio::test]
async fn members_without_a_usable_identifier_are_rejected_and_never_sent() {
    let (graph, url) = start_graph().await;
    let members = vec![
        member("1", &[("email", "ann@example.com")]),
        member("2", &[("mobile", "12")]),
        member("3", &[("email", "not-an-email"), ("country", "Britain")]),
    ];

    let outcome = email_phone_country(&url)
        .deliver(&batch(Change::Add, members))
        .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec!["1".into()],
            rejected: vec![
                Rejection {
                    key: "2".into(),
                    reason: "no usable identifier: EMAIL (`email`) is missing; PHONE \
                             (`mobile`) is not a phone number of 7 to 15 digits with its \
                             country code; COUNTRY (`country`) is missing"
                        .into(),
                },
                Rejection {
                    key: "3".into(),
                    reason: "no usable identifier: EMAIL (`email`) is not an e-mail address; \
                             PHONE (`mobile`) is missing; COUNTRY (`country`) is not a \
                             two-letter ISO 3166 country code"
                        .into(),
                },
            ],
        })
    );
    let body: Value = serde_json::from_str(&graph.received()[0].body).unwrap();
    assert_eq!(body["payload"]["data"], json!([[ANN, "", ""]]));
}

#[tokio::test]
async fn a_batch_with_no_usable_member_makes_no_request() {
    let (graph, url) = start_graph().await;

    let outcome = email_only(&url)
        .deliver(&batch(Change::Add, vec![member("1", &[("email", " ")])]))
        .await
        .unwrap();

    assert_eq!(outcome.accepted, Vec::<String>::new());
    assert_eq!(outcome.rejected.len(), 1);
    assert!(graph.received().is_empty());
}

#[tokio::test]
async fn a_body_coded_throttle_is_retried_until_the_add_lands() {
    let (graph, url) = start_graph().await;
    graph.fail_next([
        Fault::Throttled {
            code: 17,
            minutes: None,
        },
        Fault::Throttled {
            code: 80003,
            minutes: None,
        },
    ]);

    let outcome = deliver_with_retries(
        &email_only(&url),
        &batch(Change::Add, three_members()),
        &quick_policy(5),
    )
    .await;

    assert_eq!(outcome, Ok(accepted(&["1", "2", "3"])));
    let statuses: Vec<u16> = graph.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [400, 400, 200]);
    assert_eq!(graph.audience(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_throttle_code_with_a_usage_estimate_asks_for_that_many_minutes() {
    let (graph, url) = start_graph().await;
    graph.fail_next([Fault::Throttled {
        code: 613,
        minutes: Some(3),
    }]);

    let error = email_only(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap_err();

    assert_eq!(
        error,
        DeliveryError::RateLimited {
            message: format!(
                "{url}/v25.0/{AUDIENCE_ID}/users answered 400 Bad Request: (#17) User request \
                 limit reached (code 613, fbtrace_id AbCdEf123)"
            ),
            wait: Some(Duration::from_secs(180)),
        }
    );
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_one_without_leaves_the_wait_open() {
    let (graph, url) = start_graph().await;
    graph.fail_next([
        Fault::TooManyRequests(Some("1")),
        Fault::TooManyRequests(None),
    ]);
    let meta = email_only(&url);
    let started = Instant::now();

    let first = deliver_with_retries(
        &meta,
        &batch(Change::Add, three_members()),
        &quick_policy(2),
    )
    .await;
    let elapsed = started.elapsed();
    let second = meta.deliver(&batch(Change::Add, three_members())).await;

    assert_eq!(
        first,
        Err(DeliveryError::RateLimited {
            message: format!("{url}/v25.0/{AUDIENCE_ID}/users answered 429 Too Many Requests: "),
            wait: None,
        })
    );
    assert!(elapsed >= Duration::from_secs(1), "waited only {elapsed:?}");
    assert_eq!(second, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(graph.received().len(), 3);
}

#[tokio::test]
async fn a_service_that_stays_unavailable_gets_exactly_max_attempts_requests() {
    let (graph, url) = start_graph().await;
    graph.fail_next([Fault::Unavailable, Fault::Unavailable, Fault::Unavailable]);

    let outcome = deliver_with_retries(
        &email_only(&url),
        &batch(Change::Add, three_members()),
        &quick_policy(3),
    )
    .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/v25.0/{AUDIENCE_ID}/users answered 503 Service Unavailable: Service \
                 temporarily unavailable (code 2, fbtrace_id AbCdEf123)"
            ),
        })
    );
    assert_eq!(graph.received().len(), 3);
    assert!(graph.audience().is_empty());
}

#[tokio::test]
async fn an_html_500_page_is_retried_and_an_html_413_page_is_not() {
    let (graph, url) = start_graph().await;
    let meta = email_only(&url);

    graph.fail_next([Fault::HtmlPage(500)]);
    let retried = deliver_with_retries(
        &meta,
        &batch(Change::Add, three_members()),
        &quick_policy(3),
    )
    .await;
    graph.fail_next([Fault::HtmlPage(413)]);
    let too_large = deliver_with_retries(
        &meta,
        &batch(Change::Add, three_members()),
        &quick_policy(3),
    )
    .await;

    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        too_large,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/v25.0/{AUDIENCE_ID}/users answered 413 Payload Too Large with an HTML page \
                 instead of a Graph API error; the request is too large, lower `batch_size`"
            ),
        })
    );
    let statuses: Vec<u16> = graph.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 200, 413]);
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retried_and_the_audience_holds_each_member_once() {
    let (graph, url) = start_graph().await;
    graph.fail_next([Fault::Slow(Duration::from_millis(1500))]);
    let meta = email_only(&url);

    let direct = meta.deliver(&batch(Change::Add, three_members())).await;
    let retried = deliver_with_retries(
        &meta,
        &batch(Change::Add, three_members()),
        &quick_policy(3),
    )
    .await;

    let DeliveryError::Retryable { message } = direct.unwrap_err() else {
        panic!("a timeout is retryable");
    };
    assert!(
        message.starts_with(&format!(
            "POST to {url}/v25.0/{AUDIENCE_ID}/users timed out"
        )),
        "{message}"
    );
    assert_eq!(retried, Ok(accepted(&["1", "2", "3"])));
    // The slow request landed before its answer was due; replaying it changed nothing.
    assert_eq!(graph.received().len(), 2);
    assert_eq!(graph.audience(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn every_attempt_of_a_batch_carries_the_same_one_request_session() {
    let (graph, url) = start_graph().await;
    graph.fail_next([Fault::Unavailable]);

    deliver_with_retries(
        &email_only(&url),
        &batch(Change::Add, three_members()),
        &quick_policy(3),
    )
    .await
    .unwrap();

    let sessions: Vec<Value> = graph
        .received()
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["session"].clone())
        .collect();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0], sessions[1]);
    assert_eq!(sessions[0]["batch_seq"], 1);
    assert_eq!(sessions[0]["last_batch_flag"], true);
    assert_eq!(sessions[0]["estimated_num_total"], 3);
}

#[tokio::test]
async fn rows_meta_counts_as_invalid_are_only_counted_unless_all_are() {
    let (graph, url) = start_graph().await;
    graph.unmatchable.lock().unwrap().insert(BOB.to_owned());
    let meta = email_only(&url);

    let partly = meta.deliver(&batch(Change::Add, three_members())).await;
    let wholly = meta
        .deliver(&batch(
            Change::Add,
            vec![member("2", &[("email", "bob@example.com")])],
        ))
        .await;

    // Meta does not say which row was invalid, so the whole request counts as accepted.
    assert_eq!(partly, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(
        wholly,
        Ok(Outcome {
            accepted: vec![],
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "Meta counted every row of the request as invalid (1 of 1); check the \
                         identifier mapping in `schema`"
                    .into(),
            }],
        })
    );
    assert_eq!(graph.audience(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn a_200_without_counts_is_retryable_and_the_add_lands_when_sent_again() {
    let (graph, url) = start_graph().await;
    graph.fail_next([Fault::EmptyObject]);
    let connector = email_only(&url);

    let first = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;
    let audience_after_first = graph.audience();
    let second = connector
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        first,
        Err(DeliveryError::Retryable {
            message: format!(
                "{url}/v25.0/{AUDIENCE_ID}/users answered 200 OK without readable counts: `{{}}` \
                 (missing field `num_received` at line 1 column 2)"
            ),
        })
    );
    assert!(audience_after_first.is_empty());
    assert_eq!(second, Ok(accepted(&["1", "2", "3"])));
    assert_eq!(graph.audience(), emails(&[ANN, BOB, CAT]));
}

#[tokio::test]
async fn a_200_carrying_a_graph_error_is_classified_as_that_error() {
    let (graph, url) = start_graph().await;
    graph.fail_next([Fault::ErrorIn200(190)]);

    let outcome = email_only(&url)
        .deliver(&batch(Change::Add, three_members()))
        .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/v25.0/{AUDIENCE_ID}/users answered 200 OK: Error validating access \
                 token: session invalid. (code 190, fbtrace_id AbCdEf123); renew the access token"
            ),
        })
    );
    assert!(graph.audience().is_empty());
}

#[tokio::test]
async fn an_expired_token_is_an_auth_failure_sent_once() {
    let (graph, url) = start_graph().await;
    graph.fail_next([Fault::ExpiredToken]);

    let outcome = deliver_with_retries(
        &email_only(&url),
        &batch(Change::Add, three_members()),
        &quick_policy(5),
    )
    .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/v25.0/{AUDIENCE_ID}/users answered 400 Bad Request: Error validating access \
                 token: Session has expired on Thursday, 03-Dec-26. (code 190, fbtrace_id \
                 AbCdEf123); renew the access token"
            ),
        })
    );
    assert_eq!(graph.received().len(), 1);
}

#[tokio::test]
async fn a_wrong_token_is_an_auth_failure() {
    let (_graph, url) = start_graph().await;
    let activation = toml::toml! { audience_id = "23851234567890123" };
    let secrets = BTreeMap::from([("access_token".to_owned(), "revoked".to_owned())]);
    let meta = MetaConnector::from_settings(&connection(&url), &activation, &secrets).unwrap();

    let error = meta
        .deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap_err();

    assert!(matches!(error, DeliveryError::Auth { .. }), "{error:?}");
}

#[tokio::test]
async fn a_removal_refused_as_audience_too_small_rejects_its_members_and_keeps_them() {
    let (graph, url) = start_graph().await;
    let meta = email_only(&url);
    meta.deliver(&batch(Change::Add, three_members()))
        .await
        .unwrap();
    graph.fail_next([Fault::AudienceTooSmall]);

    let outcome = deliver_with_retries(
        &meta,
        &batch(
            Change::Remove,
            vec![member("3", &[("email", "cat@example.com")])],
        ),
        &quick_policy(3),
    )
    .await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: vec![],
            rejected: vec![Rejection {
                key: "3".into(),
                reason: "Meta refused the removal because the audience would become too small; \
                         remove again once the audience has grown"
                    .into(),
            }],
        })
    );
    assert_eq!(graph.received().len(), 2);
    assert_eq!(graph.audience(), emails(&[ANN, BOB, CAT]));
}

#[test]
fn meta_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        base_url = "ftp://graph.example.com"
        api_version = "25"
        batch_size = 20000
        access_token_env = "META_TOKEN"
    };
    let activation = toml::toml! {
        audience_id = "act_123"
        schema = { EMAIL = "email", PHONE_NUMBER = "phone" }
    };

    let errors =
        MetaConnector::from_settings(&connection, &activation, &BTreeMap::new()).unwrap_err();

    let error = |field: &str, message: &str| SettingsError {
        field: field.into(),
        message: message.into(),
    };
    assert_eq!(
        errors,
        [
            error(
                "access_token_env",
                "the environment variable `META_TOKEN` is not set; export it with a Meta access \
                 token with ads_management permission"
            ),
            error(
                "base_url",
                "must be an http or https URL with a host, got `ftp:`"
            ),
            error(
                "api_version",
                "expected a Graph API version such as `v25.0`, got `25`"
            ),
            error(
                "batch_size",
                "must be between 1 and 10000 in the connection settings, got 20000"
            ),
            error(
                "audience_id",
                "expected the Custom Audience's numeric id, digits only"
            ),
            error(
                "schema.PHONE_NUMBER",
                "unknown Meta schema key; known keys: EXTERN_ID, EMAIL, PHONE, GEN, DOBY, DOBM, \
                 DOBD, LN, FN, FI, CT, ST, ZIP, MADID, COUNTRY"
            ),
        ]
    );
}

#[test]
fn a_meta_activation_without_an_audience_id_is_refused_but_its_connection_checks_alone() {
    let connection = toml::toml! { access_token_env = "META_TOKEN" };

    let errors =
        MetaConnector::from_settings(&connection, &toml::Table::new(), &secrets()).unwrap_err();
    let alone = segmentd_connectors::check_connection("meta", &connection, &secrets());

    assert_eq!(
        errors,
        [SettingsError {
            field: "audience_id".into(),
            message: "missing; set it to the Custom Audience's numeric id".into(),
        }]
    );
    assert_eq!(alone, Ok(()));
}

#[test]
fn meta_batch_size_defaults_to_ten_thousand() {
    let connection = toml::toml! { access_token_env = "META_TOKEN" };
    let activation = toml::toml! { audience_id = "23851234567890123" };

    let connector =
        segmentd_connectors::build("meta", &connection, &activation, &secrets()).unwrap();

    assert_eq!(
        (connector.kind(), connector.max_batch_size()),
        ("meta", 10_000)
    );
    assert!(segmentd_connectors::KINDS.contains(&"meta"));
}

#[tokio::test]
async fn permission_errors_are_auth_failures_sent_once_and_nothing_lands() {
    let (graph, url) = start_graph().await;
    let missing = "the access token lacks a permission this call needs, check its scopes and the \
                   system user's role on the ad account";
    let unassigned = "the access token's system user has no permission on the audience, assign \
                      the audience to it in Business Manager";
    let denials = [
        (
            403,
            200,
            None,
            "(#200) Permissions error",
            "403 Forbidden",
            "code 200",
            missing,
        ),
        (
            400,
            10,
            None,
            "(#10) No permission",
            "400 Bad Request",
            "code 10",
            missing,
        ),
        (
            400,
            294,
            None,
            "(#294) Needs ads_management",
            "400 Bad Request",
            "code 294",
            missing,
        ),
        (
            400,
            100,
            Some(33),
            "Unsupported post request",
            "400 Bad Request",
            "code 100, subcode 33",
            unassigned,
        ),
    ];

    for (status, code, subcode, message, answered, codes, hint) in denials {
        graph.fail_next([Fault::Denied {
            status,
            code,
            subcode,
            message,
        }]);
        let sent_before = graph.received().len();

        let outcome = deliver_with_retries(
            &email_only(&url),
            &batch(Change::Add, three_members()),
            &quick_policy(5),
        )
        .await;

        assert_eq!(
            outcome,
            Err(DeliveryError::Auth {
                message: format!(
                    "{url}/v25.0/{AUDIENCE_ID}/users answered {answered}: {message} ({codes}, \
                     fbtrace_id AbCdEf123); {hint}"
                ),
            })
        );
        assert_eq!(graph.received().len(), sent_before + 1);
    }
    assert_eq!(graph.audience.lock().unwrap().len(), 0);
}

#[tokio::test]
async fn code_100_without_subcode_33_stays_a_permanent_failure() {
    let (graph, url) = start_graph().await;
    graph.fail_next([Fault::Denied {
        status: 400,
        code: 100,
        subcode: Some(1713230),
        message: "Audience Upload Blocked",
    }]);

    let outcome = deliver_with_retries(
        &email_only(&url),
        &batch(Change::Add, three_members()),
        &quick_policy(5),
    )
    .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url}/v25.0/{AUDIENCE_ID}/users answered 400 Bad Request: Audience Upload \
                 Blocked (code 100, subcode 1713230, fbtrace_id AbCdEf123)"
            ),
        })
    );
    assert_eq!(graph.received().len(), 1);
}
