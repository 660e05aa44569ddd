//! The Meta connector against a fake Graph API on loopback.
//!
//! The fake serves `POST` and `DELETE /{version}/{audience_id}/users` the way the Marketing API
//! does: it checks the access token, the multi-key schema, the row arity, the session and the
//! shape of every hashed value, keeps the audience as a set of rows (schema key to value), and
//! answers with `num_received` / `num_invalid_entries`. Faults queued on it answer the next
//! requests the way Meta fails: throttling codes in the error body, an expired token, an HTML
//! page, a slow answer, a refused removal.
//!
//! It serves `POST /{version}/{audience_id}/usersreplace` with the same checks and answer, and
//! keeps each replace session open (the rows received, the `batch_seq`s seen) until its batch
//! with `last_batch_flag` has arrived and every `batch_seq` from 1 to that one has been seen;
//! then the audience becomes exactly the session's valid rows, none at all if every row it
//! received was invalid. A session that never closes changes nothing; another `session_id` is
//! another session. Meta does not document what it does with
//! a gap in `batch_seq` or with a batch of a session that has already closed: the fake waits on
//! the gap, and takes a closed session's batch without changing anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::meta::MetaConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, Replace, SettingsError,
    deliver_with_retries,
};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    Fake, accepted, deliver_retrying, html, member, quick_policy, rejected, three_members,
    with_retry_after,
};

// Digests computed outside this code with `printf '%s' <text> | sha256sum`.
const ANN: &str = "71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476";
const BOB: &str = "5ff860bf1190596c7188ab851db691f0f3169c453936e9e1eba2f9a47f7a0018";
const CAT: &str = "d2d66462631a2d1b0ca18e8b66dc594a58a1cdd569028e1d97f6be4ff0d5fb68";
const DAN: &str = "c8cf6521c193fc743c7fadcd8be04e983724764efa65b3c3913b6d22f086a11f";
const EVE: &str = "d0574c4966d2c326193622feebc64991c5b59807ae68fa8255b26c79f4bf917a";
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
    /// No failure: the normal answer, so that the faults queued after it answer later
    /// requests.
    Normal,
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

/// The edge a request is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// `/users`: `POST` adds rows, `DELETE` removes them.
    Users,
    /// `/usersreplace`: rows of a session that replaces the audience when it closes.
    UsersReplace,
}

/// A row of the audience: each schema key with its value.
type Row = Vec<(String, String)>;

/// A replace session that has not closed yet.
#[derive(Debug, Default)]
struct Session {
    /// The valid rows received in the session.
    rows: BTreeSet<Row>,
    /// Every `batch_seq` received.
    batch_seqs: BTreeSet<i64>,
    /// The `batch_seq` that carried `last_batch_flag`, once received.
    last: Option<i64>,
}

/// The fake Graph API: its audience, the faults queued and the requests received.
type Graph = Fake<Account, Received, Fault>;

/// The one audience the fake holds, its replace sessions and the values it cannot match.
#[derive(Default)]
struct Account {
    audience: Mutex<BTreeSet<Row>>,
    /// Replace sessions still open, by `session_id`.
    sessions: Mutex<BTreeMap<i64, Session>>,
    /// Replace sessions that have closed.
    closed: Mutex<BTreeSet<i64>>,
    /// Values the fake cannot match; a row holding one counts as an invalid entry.
    unmatchable: Mutex<BTreeSet<String>>,
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

    /// Puts these hashed e-mail addresses in the audience, as earlier uploads would have.
    fn seed(&self, hashes: &[&str]) {
        let mut audience = self.audience.lock().unwrap();
        for hash in hashes {
            audience.insert(vec![("EMAIL".to_owned(), hash.to_string())]);
        }
    }

    /// `(session_id, batch_seq, last_batch_flag)` of each request sent to `usersreplace`.
    fn replace_sessions(&self) -> Vec<(i64, i64, bool)> {
        self.received()
            .iter()
            .filter(|request| request.uri.ends_with("/usersreplace"))
            .map(|request| {
                let session = &serde_json::from_str::<Value>(&request.body).unwrap()["session"];
                (
                    session["session_id"].as_i64().unwrap(),
                    session["batch_seq"].as_i64().unwrap(),
                    session["last_batch_flag"].as_bool().unwrap(),
                )
            })
            .collect()
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
    serve(graph, Edge::Users, method, version, audience_id, uri, body).await
}

async fn users_replace(
    State(graph): State<Arc<Graph>>,
    method: Method,
    Path((version, audience_id)): Path<(String, String)>,
    uri: Uri,
    body: Bytes,
) -> Response {
    serve(
        graph,
        Edge::UsersReplace,
        method,
        version,
        audience_id,
        uri,
        body,
    )
    .await
}

async fn serve(
    graph: Arc<Graph>,
    edge: Edge,
    method: Method,
    version: String,
    audience_id: String,
    uri: Uri,
    body: Bytes,
) -> Response {
    let fault = graph.next_fault();
    let delay = match fault {
        Some(Fault::Slow(delay)) => delay,
        _ => Duration::ZERO,
    };
    let response = answer(&graph, edge, &method, &version, &audience_id, &body, fault);
    graph.record(Received {
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
    edge: Edge,
    method: &Method,
    version: &str,
    audience_id: &str,
    body: &[u8],
    fault: Option<Fault>,
) -> Response {
    match fault {
        Some(Fault::TooManyRequests(retry_after)) => {
            return with_retry_after(StatusCode::TOO_MANY_REQUESTS.into_response(), retry_after);
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
            return html(status, page, "text/html; charset=utf-8");
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
        Some(Fault::Normal | Fault::Slow(_) | Fault::AudienceTooSmall) | None => {}
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
    let mut valid = BTreeSet::new();
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
        let tuple: Row = schema.iter().cloned().zip(row.iter().cloned()).collect();
        match edge {
            Edge::Users if method == Method::POST => {
                audience.insert(tuple);
            }
            Edge::Users => {
                audience.remove(&tuple);
            }
            Edge::UsersReplace => {
                valid.insert(tuple);
            }
        }
    }
    if edge == Edge::UsersReplace {
        let id = session["session_id"].as_i64().unwrap();
        if !graph.closed.lock().unwrap().contains(&id) {
            let mut sessions = graph.sessions.lock().unwrap();
            let open = sessions.entry(id).or_default();
            let batch_seq = session["batch_seq"].as_i64().unwrap();
            open.rows.extend(valid);
            open.batch_seqs.insert(batch_seq);
            if session["last_batch_flag"] == true {
                open.last = Some(batch_seq);
            }
            let complete = open
                .last
                .is_some_and(|last| open.batch_seqs.iter().copied().eq(1..=last));
            if complete {
                let closed = sessions.remove(&id).unwrap();
                *audience = closed.rows;
                graph.closed.lock().unwrap().insert(id);
            }
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
    let routes = axum::Router::new()
        .route(
            "/{version}/{audience_id}/users",
            axum::routing::post(users).delete(users),
        )
        .route(
            "/{version}/{audience_id}/usersreplace",
            axum::routing::post(users_replace),
        );
    common::start(Graph::default(), routes).await
}

fn secrets() -> BTreeMap<String, String> {
    common::secrets(&[("access_token", TOKEN)])
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

fn batch(change: Change, members: Vec<Member>) -> Batch {
    common::batch("vip/meta", change, members)
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

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 5).await;

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

    let first = deliver_retrying(&meta, &batch(Change::Add, three_members()), 2).await;
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

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3).await;

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
    let retried = deliver_retrying(&meta, &batch(Change::Add, three_members()), 3).await;
    graph.fail_next([Fault::HtmlPage(413)]);
    let too_large = deliver_retrying(&meta, &batch(Change::Add, three_members()), 3).await;

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
    let retried = deliver_retrying(&meta, &batch(Change::Add, three_members()), 3).await;

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

    deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 3)
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

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 5).await;

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

    let outcome = deliver_retrying(
        &meta,
        &batch(
            Change::Remove,
            vec![member("3", &[("email", "cat@example.com")])],
        ),
        3,
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

    let error = common::problem;
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

        let outcome =
            deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 5).await;

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

    let outcome =
        deliver_retrying(&email_only(&url), &batch(Change::Add, three_members()), 5).await;

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

/// A member known by an e-mail address at `example.com`.
fn person(key: &str, name: &str) -> Member {
    member(key, &[("email", &format!("{name}@example.com"))])
}

/// A member whose only identifier is not an e-mail address.
fn unusable(key: &str) -> Member {
    member(key, &[("email", "not-an-email")])
}

/// The reason a member without a usable e-mail address is rejected with.
const NO_EMAIL: &str = "no usable identifier: EMAIL (`email`) is not an e-mail address";

/// Batch `sequence` of a replace in `session` of `batches` batches holding `total` members.
fn replace_batch(
    session: u64,
    sequence: u32,
    batches: u32,
    total: u64,
    members: Vec<Member>,
) -> Batch {
    Batch {
        sequence,
        replace: Some(Replace {
            session,
            batches,
            members: total,
        }),
        ..batch(Change::Replace, members)
    }
}

#[tokio::test]
async fn a_replace_in_three_batches_leaves_exactly_its_members() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN, BOB]);
    let meta = email_only(&url);
    let batches = [
        vec![person("2", "bob"), person("3", "cat")],
        vec![person("4", "dan")],
        vec![person("5", "eve")],
    ];

    let mut outcomes = Vec::new();
    for (sequence, members) in (0..).zip(batches) {
        outcomes.push(
            meta.deliver(&replace_batch(7001, sequence, 3, 4, members))
                .await,
        );
    }

    assert_eq!(
        outcomes,
        [
            Ok(accepted(&["2", "3"])),
            Ok(accepted(&["4"])),
            Ok(accepted(&["5"])),
        ]
    );
    // Ann was not in the replace: gone. Bob was: kept.
    assert_eq!(graph.audience(), emails(&[BOB, CAT, DAN, EVE]));
    assert_eq!(
        graph.replace_sessions(),
        [
            (7001, 1, false),
            (7001, 2, false),
            (7001, 3, false),
            (7001, 4, true)
        ]
    );
    // The closing request sends again a row of the first batch.
    let closing: Value = serde_json::from_str(&graph.received()[3].body).unwrap();
    assert_eq!(closing["payload"]["data"], json!([[BOB]]));
    for request in graph.received() {
        assert_eq!(request.method, Method::POST);
        assert_eq!(request.uri, format!("/v25.0/{AUDIENCE_ID}/usersreplace"));
        let body: Value = serde_json::from_str(&request.body).unwrap();
        assert_eq!(body["session"]["estimated_num_total"], 4);
    }
}

#[tokio::test]
async fn the_audience_keeps_its_old_members_until_the_last_batch_of_a_replace() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN, BOB]);
    let meta = email_only(&url);

    let mut audiences = Vec::new();
    for (sequence, name) in (0..).zip(["cat", "dan", "eve"]) {
        let members = vec![person(&sequence.to_string(), name)];
        meta.deliver(&replace_batch(7002, sequence, 3, 3, members))
            .await
            .unwrap();
        audiences.push(graph.audience());
    }

    assert_eq!(
        audiences,
        [
            emails(&[ANN, BOB]),
            emails(&[ANN, BOB]),
            emails(&[CAT, DAN, EVE]),
        ]
    );
}

#[tokio::test]
async fn a_replace_batch_sent_again_after_a_late_answer_repeats_its_request_and_lands_once() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN]);
    let meta = email_only(&url);
    let policy = quick_policy(3);

    let first = deliver_with_retries(
        &meta,
        &replace_batch(7003, 0, 3, 3, vec![person("2", "bob")]),
        &policy,
    )
    .await;
    // The middle batch lands, but its answer comes after the timeout.
    graph.fail_next([Fault::Slow(Duration::from_millis(1500))]);
    let middle = deliver_with_retries(
        &meta,
        &replace_batch(7003, 1, 3, 3, vec![person("3", "cat")]),
        &policy,
    )
    .await;
    let last = deliver_with_retries(
        &meta,
        &replace_batch(7003, 2, 3, 3, vec![person("4", "dan")]),
        &policy,
    )
    .await;

    assert_eq!(first, Ok(accepted(&["2"])));
    assert_eq!(middle, Ok(accepted(&["3"])));
    assert_eq!(last, Ok(accepted(&["4"])));
    assert_eq!(
        graph.replace_sessions(),
        [
            (7003, 1, false),
            (7003, 2, false),
            (7003, 2, false),
            (7003, 3, false),
            (7003, 4, true)
        ]
    );
    let received = graph.received();
    assert_eq!(received[1].body, received[2].body);
    assert_eq!(graph.audience(), emails(&[BOB, CAT, DAN]));
}

#[tokio::test]
async fn an_abandoned_replace_changes_nothing_and_a_new_session_from_batch_0_replaces_the_audience()
{
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN]);
    let meta = email_only(&url);

    // The first attempt stops after two of its three batches.
    for (sequence, name) in (0..).zip(["bob", "cat"]) {
        let members = vec![person(name, name)];
        meta.deliver(&replace_batch(8001, sequence, 3, 3, members))
            .await
            .unwrap();
    }
    let after_abandoned = graph.audience();
    // The engine begins the replace again, with another session, from its first batch.
    for (sequence, name) in (0..).zip(["dan", "eve"]) {
        let members = vec![person(name, name)];
        meta.deliver(&replace_batch(8002, sequence, 2, 2, members))
            .await
            .unwrap();
    }

    assert_eq!(after_abandoned, emails(&[ANN]));
    assert_eq!(graph.audience(), emails(&[DAN, EVE]));
    assert_eq!(
        graph.replace_sessions(),
        [
            (8001, 1, false),
            (8001, 2, false),
            (8002, 1, false),
            (8002, 2, false),
            (8002, 3, true)
        ]
    );
}

#[tokio::test]
async fn a_replace_batch_without_a_usable_member_sends_nothing_and_leaves_no_gap() {
    let (graph, url) = start_graph().await;
    graph.seed(&[DAN]);
    let meta = email_only(&url);
    let batches = [
        vec![person("1", "ann")],
        vec![unusable("2")],
        vec![person("3", "cat")],
    ];

    let mut outcomes = Vec::new();
    for (sequence, members) in (0..).zip(batches) {
        outcomes.push(
            meta.deliver(&replace_batch(7004, sequence, 3, 3, members))
                .await,
        );
    }

    assert_eq!(
        outcomes,
        [
            Ok(accepted(&["1"])),
            Ok(rejected(&["2"], NO_EMAIL)),
            Ok(accepted(&["3"])),
        ]
    );
    // The skipped batch took no batch_seq: the fake would otherwise wait for number 2.
    assert_eq!(
        graph.replace_sessions(),
        [(7004, 1, false), (7004, 2, false), (7004, 3, true)]
    );
    assert_eq!(graph.audience(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn a_last_batch_without_a_usable_member_still_closes_the_session() {
    let (graph, url) = start_graph().await;
    graph.seed(&[DAN]);
    let meta = email_only(&url);

    let first = meta
        .deliver(&replace_batch(
            7005,
            0,
            2,
            3,
            vec![person("1", "ann"), person("2", "bob")],
        ))
        .await;
    graph.fail_next([Fault::Unavailable]);
    let last = deliver_retrying(&meta, &replace_batch(7005, 1, 2, 3, vec![unusable("3")]), 3).await;

    assert_eq!(first, Ok(accepted(&["1", "2"])));
    // Only the batch's own member is reported; the row sent again belongs to batch 0.
    assert_eq!(last, Ok(rejected(&["3"], NO_EMAIL)));
    // The retry after the 503 kept the closing request's batch_seq.
    assert_eq!(
        graph.replace_sessions(),
        [(7005, 1, false), (7005, 2, true), (7005, 2, true)]
    );
    let statuses: Vec<u16> = graph.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 503, 200]);
    let closing: Value = serde_json::from_str(&graph.received()[2].body).unwrap();
    assert_eq!(closing["payload"]["data"], json!([[ANN]]));
    assert_eq!(graph.audience(), emails(&[ANN, BOB]));
}

#[tokio::test]
async fn a_replace_with_no_usable_member_fails_permanently_and_leaves_the_audience_as_it_was() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN, BOB]);
    let meta = email_only(&url);

    let first = meta
        .deliver(&replace_batch(7006, 0, 2, 2, vec![unusable("1")]))
        .await;
    let last = deliver_retrying(&meta, &replace_batch(7006, 1, 2, 2, vec![unusable("2")]), 3).await;

    assert_eq!(first, Ok(rejected(&["1"], NO_EMAIL)));
    assert_eq!(
        last,
        Err(DeliveryError::Permanent {
            message: "no member of the replace has a usable identifier (2 members in 2 batches \
                      for `vip/meta`), so the replace would empty the audience; nothing was \
                      sent, nothing was replaced and the audience keeps its members. Check the \
                      activation's `schema` and the identifiers it maps"
                .into(),
        })
    );
    assert!(graph.received().is_empty());
    assert_eq!(graph.audience(), emails(&[ANN, BOB]));
}

#[tokio::test]
async fn a_replace_whose_every_row_meta_counted_invalid_is_not_closed_with_one_of_them() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN]);
    graph.unmatchable.lock().unwrap().insert(BOB.to_owned());
    let meta = email_only(&url);

    let first = meta
        .deliver(&replace_batch(7009, 0, 2, 2, vec![person("2", "bob")]))
        .await;
    let last = meta
        .deliver(&replace_batch(7009, 1, 2, 2, vec![unusable("3")]))
        .await;

    assert_eq!(
        first,
        Ok(rejected(
            &["2"],
            "Meta counted every row of the request as invalid (1 of 1); check the identifier \
             mapping in `schema`"
        ))
    );
    assert_eq!(
        last,
        Err(DeliveryError::Permanent {
            message: "Meta counted every row the replace sent as invalid (2 members in 2 batches \
                      for `vip/meta`), so the replace would empty the audience; its session was \
                      left unclosed, nothing was replaced and the audience keeps its members. \
                      Check the activation's `schema` and the identifiers it maps"
                .into(),
        })
    );
    assert_eq!(graph.replace_sessions(), [(7009, 1, false)]);
    assert_eq!(graph.audience(), emails(&[ANN]));
}

/// The reason the members of a request are rejected with when Meta counted all its `sent`
/// rows as invalid.
fn all_invalid(sent: usize) -> String {
    format!(
        "Meta counted every row of the request as invalid ({sent} of {sent}); check the \
         identifier mapping in `schema`"
    )
}

#[tokio::test]
async fn a_replace_whose_every_row_meta_counts_invalid_fails_permanently_and_leaves_the_audience() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN]);
    graph
        .unmatchable
        .lock()
        .unwrap()
        .extend([BOB, CAT, DAN].map(str::to_owned));
    let meta = email_only(&url);

    let first = meta
        .deliver(&replace_batch(
            7010,
            0,
            2,
            3,
            vec![person("2", "bob"), person("3", "cat")],
        ))
        .await;
    let last = deliver_retrying(
        &meta,
        &replace_batch(7010, 1, 2, 3, vec![person("4", "dan")]),
        3,
    )
    .await;

    assert_eq!(first, Ok(rejected(&["2", "3"], &all_invalid(2))));
    assert_eq!(
        last,
        Err(DeliveryError::Permanent {
            message: "Meta counted every row the replace sent as invalid (3 members in 2 batches \
                      for `vip/meta`), so the replace would empty the audience; its session was \
                      left unclosed, nothing was replaced and the audience keeps its members. \
                      Check the activation's `schema` and the identifiers it maps"
                .into(),
        })
    );
    // The last batch's rows went once, without last_batch_flag; nothing closed the session.
    assert_eq!(
        graph.replace_sessions(),
        [(7010, 1, false), (7010, 2, false)]
    );
    assert_eq!(graph.audience(), emails(&[ANN]));
}

#[tokio::test]
async fn a_last_batch_meta_counts_all_invalid_still_closes_and_the_audience_holds_the_earlier_rows()
{
    let (graph, url) = start_graph().await;
    graph.seed(&[DAN]);
    graph.unmatchable.lock().unwrap().insert(EVE.to_owned());
    let meta = email_only(&url);

    let first = meta
        .deliver(&replace_batch(
            7011,
            0,
            2,
            3,
            vec![person("1", "ann"), person("2", "bob")],
        ))
        .await;
    let last = meta
        .deliver(&replace_batch(7011, 1, 2, 3, vec![person("5", "eve")]))
        .await;

    assert_eq!(first, Ok(accepted(&["1", "2"])));
    assert_eq!(last, Ok(rejected(&["5"], &all_invalid(1))));
    assert_eq!(
        graph.replace_sessions(),
        [(7011, 1, false), (7011, 2, false), (7011, 3, true)]
    );
    let closing: Value = serde_json::from_str(&graph.received()[2].body).unwrap();
    assert_eq!(closing["payload"]["data"], json!([[ANN]]));
    assert_eq!(graph.audience(), emails(&[ANN, BOB]));
}

#[tokio::test]
async fn a_503_on_the_closing_request_is_retried_and_the_session_closes_once() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN]);
    let meta = email_only(&url);

    let first = meta
        .deliver(&replace_batch(7012, 0, 2, 2, vec![person("2", "bob")]))
        .await;
    // The last batch's rows are answered; the request closing the session meets a 503.
    graph.fail_next([Fault::Normal, Fault::Unavailable]);
    let last = deliver_retrying(
        &meta,
        &replace_batch(7012, 1, 2, 2, vec![person("3", "cat")]),
        3,
    )
    .await;

    assert_eq!(first, Ok(accepted(&["2"])));
    assert_eq!(last, Ok(accepted(&["3"])));
    let statuses: Vec<u16> = graph.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 503, 200]);
    // The last batch's rows were not sent again; the closing request kept its batch_seq.
    assert_eq!(
        graph.replace_sessions(),
        [
            (7012, 1, false),
            (7012, 2, false),
            (7012, 3, true),
            (7012, 3, true)
        ]
    );
    let received = graph.received();
    assert_eq!(received[2].body, received[3].body);
    assert_eq!(graph.audience(), emails(&[BOB, CAT]));
}

#[tokio::test]
async fn the_closing_request_sends_again_a_row_of_a_request_meta_counted_no_row_of_as_invalid() {
    let (graph, url) = start_graph().await;
    graph.seed(&[DAN]);
    graph.unmatchable.lock().unwrap().insert(BOB.to_owned());
    let meta = email_only(&url);

    // Meta counts one of the first batch's two rows as invalid, not saying which.
    let first = meta
        .deliver(&replace_batch(
            7013,
            0,
            2,
            3,
            vec![person("2", "bob"), person("1", "ann")],
        ))
        .await;
    let last = meta
        .deliver(&replace_batch(7013, 1, 2, 3, vec![person("3", "cat")]))
        .await;

    assert_eq!(first, Ok(accepted(&["2", "1"])));
    assert_eq!(last, Ok(accepted(&["3"])));
    let closing: Value = serde_json::from_str(&graph.received()[2].body).unwrap();
    assert_eq!(closing["session"]["last_batch_flag"], true);
    assert_eq!(closing["payload"]["data"], json!([[CAT]]));
    assert_eq!(graph.audience(), emails(&[ANN, CAT]));
}

#[tokio::test]
async fn throttling_and_unavailability_on_a_replace_batch_are_retried_like_adds() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN]);
    let meta = email_only(&url);
    let policy = quick_policy(5);

    graph.fail_next([
        Fault::Throttled {
            code: 17,
            minutes: None,
        },
        Fault::Unavailable,
    ]);
    let first = deliver_with_retries(
        &meta,
        &replace_batch(7007, 0, 2, 2, vec![person("2", "bob")]),
        &policy,
    )
    .await;
    graph.fail_next([Fault::Throttled {
        code: 80003,
        minutes: None,
    }]);
    let last = deliver_with_retries(
        &meta,
        &replace_batch(7007, 1, 2, 2, vec![person("3", "cat")]),
        &policy,
    )
    .await;

    assert_eq!(first, Ok(accepted(&["2"])));
    assert_eq!(last, Ok(accepted(&["3"])));
    let statuses: Vec<u16> = graph.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [400, 503, 200, 400, 200, 200]);
    assert_eq!(
        graph.replace_sessions(),
        [
            (7007, 1, false),
            (7007, 1, false),
            (7007, 1, false),
            (7007, 2, false),
            (7007, 2, false),
            (7007, 3, true)
        ]
    );
    assert_eq!(graph.audience(), emails(&[BOB, CAT]));
}

#[tokio::test]
async fn a_failed_last_batch_is_an_error_and_the_audience_keeps_its_old_members() {
    let (graph, url) = start_graph().await;
    graph.seed(&[ANN]);
    let meta = email_only(&url);

    meta.deliver(&replace_batch(7008, 0, 2, 2, vec![person("2", "bob")]))
        .await
        .unwrap();
    graph.fail_next([Fault::ExpiredToken]);
    let last = deliver_retrying(
        &meta,
        &replace_batch(7008, 1, 2, 2, vec![person("3", "cat")]),
        3,
    )
    .await;

    assert_eq!(
        last,
        Err(DeliveryError::Auth {
            message: format!(
                "{url}/v25.0/{AUDIENCE_ID}/usersreplace answered 400 Bad Request: Error \
                 validating access token: Session has expired on Thursday, 03-Dec-26. (code \
                 190, fbtrace_id AbCdEf123); renew the access token"
            ),
        })
    );
    assert_eq!(graph.audience(), emails(&[ANN]));
}

#[tokio::test]
async fn a_replace_session_meta_cannot_take_is_refused_before_anything_is_sent() {
    let (graph, url) = start_graph().await;

    let outcome = email_only(&url)
        .deliver(&replace_batch(u64::MAX, 0, 1, 1, vec![person("1", "ann")]))
        .await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: "replace session 18446744073709551615 of `vip/meta` is not a Meta session \
                      id (1 to 2^63 - 1); nothing was sent"
                .into(),
        })
    );
    assert!(graph.received().is_empty());
}

#[test]
fn a_meta_connection_can_replace_a_whole_audience() {
    let connection = toml::toml! { access_token_env = "META_TOKEN" };
    let activation = toml::toml! { audience_id = "23851234567890123" };

    let connector =
        segmentd_connectors::build("meta", &connection, &activation, &secrets()).unwrap();

    assert!(connector.replaces_lists());
}
