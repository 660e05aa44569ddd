//! The webhook connector against a real HTTP server on loopback.
//!
//! Each test starts a small platform that answers POSTs from a script of answers and records
//! every request it saw, then drives the connector (alone or through the retry policy) at it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::webhook::WebhookConnector;
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, RetryPolicy,
    SettingsError, deliver_with_retries,
};
use serde_json::json;
use tokio::time::Instant;

mod common;
use common::{Fake, email_member as member, settings, strings as keys};

/// One scripted answer of the platform.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Answer {
    fn status(status: u16) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn with_body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A request the platform received, with the status it answered.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: serde_json::Value,
    status: u16,
}

/// A webhook endpoint answering from a script, and the requests it received.
type Platform = Fake<Script, Received>;

/// The answers the endpoint gives, in order; the last one repeats once the script runs out.
struct Script {
    answers: Mutex<VecDeque<Answer>>,
}

impl Platform {
    fn accepted_batches(&self) -> Vec<serde_json::Value> {
        let received = self.received();
        received
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .map(|r| r.body)
            .collect()
    }
}

async fn answer(
    State(platform): State<Arc<Platform>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = {
        let mut script = platform.answers.lock().unwrap();
        if script.len() > 1 {
            script.pop_front()
        } else {
            script.front().cloned()
        }
    }
    .expect("the script holds at least one answer");

    platform.record(Received {
        headers: headers.clone(),
        body: serde_json::from_slice(&body).expect("the connector sends JSON"),
        status: answer.status,
    });
    tokio::time::sleep(answer.delay).await;

    let mut response = answer.body.into_response();
    *response.status_mut() = StatusCode::from_u16(answer.status).unwrap();
    for (name, value) in answer.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

/// Starts a platform answering `script` on a loopback port; returns it with its URL.
async fn start_platform(script: impl IntoIterator<Item = Answer>) -> (Arc<Platform>, String) {
    let routes = axum::Router::new().route("/hooks/segments", axum::routing::post(answer));
    let (platform, url) = common::start(
        Platform::new(Script {
            answers: Mutex::new(script.into_iter().collect()),
        }),
        routes,
    )
    .await;
    (platform, format!("{url}/hooks/segments"))
}

fn connector(url: &str) -> WebhookConnector {
    let connection = settings([("url", url.into())]);
    WebhookConnector::from_settings(&connection, &toml::Table::new(), &BTreeMap::new()).unwrap()
}

fn batch(members: Vec<Member>) -> Batch {
    Batch {
        sequence: 3,
        ..common::batch("vip/crm", Change::Add, members)
    }
}

fn two_members() -> Batch {
    batch(vec![
        member("1", "a@example.com"),
        member("2", "b@example.com"),
    ])
}

/// The quick policy, with longer waits and a longer `Retry-After` honoured.
fn quick_policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        max_retry_after: Duration::from_secs(10),
        ..common::quick_policy(max_attempts)
    }
}

#[tokio::test]
async fn a_batch_answered_503_then_429_retry_after_2_then_200_is_delivered_once_after_2_seconds() {
    let (platform, url) = start_platform([
        Answer::status(503).with_body("upstream down"),
        Answer::status(429).with_header("retry-after", "2"),
        Answer::status(200),
    ])
    .await;
    let started = Instant::now();

    let outcome = deliver_with_retries(&connector(&url), &two_members(), &quick_policy(5)).await;

    let elapsed = started.elapsed();
    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: keys(&["1", "2"]),
            rejected: vec![]
        })
    );
    assert_eq!(
        platform.accepted_batches(),
        [json!({
            "run_id": 42,
            "activation": "vip/crm",
            "change": "add",
            "sequence": 3,
            "batch_id": "42-vip/crm-add-3",
            "members": [
                {"key": "1", "identifiers": {"email": "a@example.com"}},
                {"key": "2", "identifiers": {"email": "b@example.com"}},
            ],
        })]
    );
    let statuses: Vec<u16> = platform.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 429, 200]);
    assert!(elapsed >= Duration::from_secs(2), "waited only {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "waited {elapsed:?}");
}

#[tokio::test]
async fn every_attempt_carries_the_same_idempotency_key() {
    let (platform, url) = start_platform([Answer::status(502), Answer::status(204)]).await;

    deliver_with_retries(&connector(&url), &two_members(), &quick_policy(3))
        .await
        .unwrap();

    let idempotency_keys: Vec<String> = platform
        .received()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(idempotency_keys, ["42-vip/crm-add-3", "42-vip/crm-add-3"]);
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_the_time_until_that_date() {
    let in_two_minutes = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    let (_platform, url) =
        start_platform([Answer::status(429).with_header("retry-after", in_two_minutes)]).await;

    let error = connector(&url).deliver(&two_members()).await.unwrap_err();

    let DeliveryError::RateLimited {
        wait: Some(wait), ..
    } = error
    else {
        panic!("expected a rate limit with a wait, got {error:?}");
    };
    // The date has whole seconds, so up to one second of the two minutes is cut off.
    assert!(
        wait > Duration::from_secs(118) && wait <= Duration::from_secs(120),
        "{wait:?}"
    );
}

#[tokio::test]
async fn retry_after_as_a_past_http_date_asks_for_no_wait() {
    let (_platform, url) = start_platform([
        Answer::status(429).with_header("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")
    ])
    .await;

    let error = connector(&url).deliver(&two_members()).await.unwrap_err();

    assert_eq!(
        error,
        DeliveryError::RateLimited {
            message: format!("{url} answered 429 Too Many Requests: "),
            wait: Some(Duration::ZERO),
        }
    );
}

#[tokio::test]
async fn retry_after_that_cannot_be_read_leaves_the_wait_to_the_policy() {
    let (_platform, url) =
        start_platform([Answer::status(429).with_header("retry-after", "later, maybe")]).await;

    let error = connector(&url).deliver(&two_members()).await.unwrap_err();

    assert!(
        matches!(error, DeliveryError::RateLimited { wait: None, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_401_is_an_auth_failure_and_is_not_sent_again() {
    let (platform, url) = start_platform([Answer::status(401).with_body("token expired")]).await;

    let outcome = deliver_with_retries(&connector(&url), &two_members(), &quick_policy(5)).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Auth {
            message: format!("{url} answered 401 Unauthorized: token expired")
        })
    );
    assert_eq!(platform.received().len(), 1);
}

#[tokio::test]
async fn a_400_is_a_permanent_failure_and_is_not_sent_again() {
    let (platform, url) =
        start_platform([Answer::status(400).with_body(r#"{"error":"members must be a list"}"#)])
            .await;

    let outcome = deliver_with_retries(&connector(&url), &two_members(), &quick_policy(5)).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                r#"{url} answered 400 Bad Request: {{"error":"members must be a list"}}"#
            ),
        })
    );
    assert_eq!(platform.received().len(), 1);
}

#[tokio::test]
async fn a_platform_that_keeps_failing_gets_exactly_max_attempts_requests() {
    let (platform, url) = start_platform([Answer::status(500)]).await;

    let outcome = deliver_with_retries(&connector(&url), &two_members(), &quick_policy(3)).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Retryable {
            message: format!("{url} answered 500 Internal Server Error: ")
        })
    );
    assert_eq!(platform.received().len(), 3);
}

#[tokio::test]
async fn a_501_is_permanent_and_a_408_retryable() {
    let (_platform, url) = start_platform([Answer::status(501), Answer::status(408)]).await;
    let connector = connector(&url);

    let first = connector.deliver(&two_members()).await.unwrap_err();
    let second = connector.deliver(&two_members()).await.unwrap_err();

    assert!(
        matches!(first, DeliveryError::Permanent { .. }),
        "{first:?}"
    );
    assert!(
        matches!(second, DeliveryError::Retryable { .. }),
        "{second:?}"
    );
}

#[tokio::test]
async fn members_listed_as_rejected_in_a_200_are_rejected_and_the_rest_accepted() {
    let body = r#"{"rejected": [{"key": "2", "reason": "invalid email"}, {"key": "9"}]}"#;
    let (_platform, url) = start_platform([Answer::status(200).with_body(body)]).await;
    let batch = batch(vec![
        member("1", "a@example.com"),
        member("2", "not-an-email"),
        member("3", "c@example.com"),
    ]);

    let outcome = connector(&url).deliver(&batch).await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: keys(&["1", "3"]),
            rejected: vec![Rejection {
                key: "2".into(),
                reason: "invalid email".into()
            }],
        })
    );
}

#[tokio::test]
async fn a_200_body_longer_than_sixteen_mebibytes_is_read_only_up_to_the_limit() {
    // The `rejected` list closes only after 17 MiB of padding, past the 16 MiB read limit, so
    // the connector never sees its end and counts every member as accepted.
    let body = format!(
        r#"{{"rejected": [{{"key": "2", "reason": "invalid email"}}]{}}}"#,
        " ".repeat(17 << 20)
    );
    let (platform, url) = start_platform([Answer::status(200).with_body(body)]).await;
    let batch = batch(vec![
        member("1", "a@example.com"),
        member("2", "not-an-email"),
        member("3", "c@example.com"),
    ]);

    let outcome = connector(&url).deliver(&batch).await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: keys(&["1", "2", "3"]),
            rejected: vec![],
        })
    );
    let delivered = platform.accepted_batches();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["members"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn the_bearer_token_from_the_secrets_is_sent() {
    let (platform, url) = start_platform([Answer::status(200)]).await;
    let connection = settings([
        ("url", url.as_str().into()),
        ("token_env", "CRM_HOOK_TOKEN".into()),
    ]);
    let secrets = BTreeMap::from([("token".to_owned(), "s3cret-token".to_owned())]);
    let connector =
        WebhookConnector::from_settings(&connection, &toml::Table::new(), &secrets).unwrap();

    connector.deliver(&two_members()).await.unwrap();

    let received = platform.received();
    assert_eq!(received[0].headers["authorization"], "Bearer s3cret-token");
    assert_eq!(received[0].headers["content-type"], "application/json");
    assert!(!format!("{connector:?}").contains("s3cret-token"));
}

#[tokio::test]
async fn no_authorization_header_is_sent_without_token_env() {
    let (platform, url) = start_platform([Answer::status(200)]).await;

    connector(&url).deliver(&two_members()).await.unwrap();

    assert!(!platform.received()[0].headers.contains_key("authorization"));
}

#[tokio::test]
async fn a_failure_message_quotes_at_most_200_characters_of_the_body() {
    let (_platform, url) = start_platform([Answer::status(422).with_body("x".repeat(300))]).await;

    let error = connector(&url).deliver(&two_members()).await.unwrap_err();

    let expected = format!(
        "{url} answered 422 Unprocessable Entity: {}...",
        "x".repeat(200)
    );
    assert_eq!(error, DeliveryError::Permanent { message: expected });
}

#[tokio::test]
async fn the_activation_url_overrides_the_connection_url() {
    let (platform, url) = start_platform([Answer::status(200)]).await;
    let connection = toml::toml! { url = "http://127.0.0.1:9/unused" };
    let activation = settings([("url", url.as_str().into())]);
    let connector =
        WebhookConnector::from_settings(&connection, &activation, &BTreeMap::new()).unwrap();

    connector.deliver(&two_members()).await.unwrap();

    assert_eq!(platform.received().len(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_retryable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/segments", listener.local_addr().unwrap());
    drop(listener);

    let error = connector(&url).deliver(&two_members()).await.unwrap_err();

    let DeliveryError::Retryable { message } = error else {
        panic!("expected a retryable failure, got {error:?}");
    };
    assert!(
        message.starts_with(&format!("POST to {url} failed: ")),
        "{message}"
    );
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_is_retryable() {
    let (_platform, url) =
        start_platform([Answer::status(200).after(Duration::from_secs(3))]).await;
    let connection = settings([
        ("url", url.as_str().into()),
        ("timeout_seconds", 1_i64.into()),
    ]);
    let connector =
        WebhookConnector::from_settings(&connection, &toml::Table::new(), &BTreeMap::new())
            .unwrap();
    let started = Instant::now();

    let error = connector.deliver(&two_members()).await.unwrap_err();

    let DeliveryError::Retryable { message } = error else {
        panic!("expected a retryable failure, got {error:?}");
    };
    assert!(
        message.starts_with(&format!("POST to {url} timed out: ")),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn webhook_settings_report_every_problem_by_key() {
    let connection = toml::toml! {
        url = "ftp://files.example.com/in"
        token_env = "CRM_HOOK_TOKEN"
        batch_size = 20000
        retries = 3
    };
    let activation = toml::toml! { list = "vip" };

    let errors =
        WebhookConnector::from_settings(&connection, &activation, &BTreeMap::new()).unwrap_err();

    let error = common::problem;
    assert_eq!(
        errors,
        [
            error(
                "retries",
                "unknown key in the connection settings; known keys: url, token_env, \
                 batch_size, timeout_seconds"
            ),
            error(
                "list",
                "unknown key in the activation settings; known keys: url"
            ),
            error(
                "url",
                "must be an http or https URL with a host, got `ftp:`"
            ),
            error(
                "token_env",
                "the environment variable `CRM_HOOK_TOKEN` is not set; export it with the token"
            ),
            error(
                "batch_size",
                "must be between 1 and 10000 in the connection settings, got 20000"
            ),
        ]
    );
}

#[test]
fn a_webhook_without_a_url_is_refused() {
    let errors =
        WebhookConnector::from_settings(&toml::Table::new(), &toml::Table::new(), &BTreeMap::new())
            .unwrap_err();

    assert_eq!(
        errors,
        [SettingsError {
            field: "url".into(),
            message: "missing; set it to the address batches are POSTed to".into(),
        }]
    );
}

#[test]
fn webhook_batch_size_defaults_to_1000() {
    let connection = toml::toml! { url = "https://hooks.example.com/in" };

    let connector = segmentd_connectors::build(
        "webhook",
        &connection,
        &toml::Table::new(),
        &BTreeMap::new(),
    )
    .unwrap();

    assert_eq!(
        (connector.kind(), connector.max_batch_size()),
        ("webhook", 1000)
    );
}

#[tokio::test]
async fn a_failure_body_quoting_an_address_and_a_phone_number_is_reported_without_them() {
    let body =
        r#"{"error":"duplicate contact zed@example.org, phone 555-010-4477, member Ann Lee"}"#;
    let (platform, url) = start_platform([Answer::status(409).with_body(body)]).await;
    let batch = batch(vec![Member {
        key: "1".into(),
        identifiers: BTreeMap::from([("name".into(), "Ann Lee".into())]),
    }]);

    let outcome = deliver_with_retries(&connector(&url), &batch, &quick_policy(3)).await;

    assert_eq!(
        outcome,
        Err(DeliveryError::Permanent {
            message: format!(
                "{url} answered 409 Conflict: {{\"error\":\"duplicate contact <address>, phone \
                 <number>, member <member>\"}}"
            ),
        })
    );
    assert_eq!(platform.received().len(), 1);
}

#[tokio::test]
async fn rejection_reasons_are_kept_without_addresses_phone_numbers_or_the_members_values() {
    let body = r#"{"rejected": [
        {"key": "1", "reason": "a@example.com bounced, call +1 415 555 0100"},
        {"key": "2", "reason": "unknown customer CUST-77"}
    ]}"#;
    let (platform, url) = start_platform([Answer::status(200).with_body(body)]).await;
    let batch = batch(vec![
        member("1", "a@example.com"),
        Member {
            key: "2".into(),
            identifiers: BTreeMap::from([("customer_id".into(), "cust-77".into())]),
        },
        member("3", "c@example.com"),
    ]);

    let outcome = connector(&url).deliver(&batch).await;

    assert_eq!(
        outcome,
        Ok(Outcome {
            accepted: keys(&["3"]),
            rejected: vec![
                Rejection {
                    key: "1".into(),
                    reason: "<member> bounced, call <number>".into()
                },
                Rejection {
                    key: "2".into(),
                    reason: "unknown customer <member>".into()
                },
            ],
        })
    );
    assert_eq!(platform.received().len(), 1);
}

#[tokio::test]
async fn a_replace_batch_says_its_session_and_place_and_add_batches_say_nothing_of_it() {
    let (platform, url) = start_platform([Answer::status(204)]).await;
    let connector = connector(&url);
    let part = Batch {
        change: Change::Replace,
        sequence: 1,
        replace: Some(segmentd_connectors::Replace {
            session: 77,
            batches: 2,
            members: 1002,
        }),
        ..two_members()
    };
    assert!(connector.replaces_lists());

    connector.deliver(&two_members()).await.unwrap();
    connector.deliver(&part).await.unwrap();

    let received = platform.received();
    assert!(received[0].body.get("replace").is_none());
    assert_eq!(received[1].body["change"], "replace");
    assert_eq!(
        received[1].body["replace"],
        json!({"session": 77, "batches": 2, "members": 1002})
    );
    assert_eq!(received[1].body["batch_id"], "42-vip/crm-replace-77-1");
    assert_eq!(
        received[1].headers["idempotency-key"],
        "42-vip/crm-replace-77-1"
    );
}

#[tokio::test]
async fn rejected_keys_given_as_numbers_reject_those_members() {
    let body = r#"{"rejected": [{"key": 2, "reason": "invalid email"}]}"#;
    let (_platform, url) = start_platform([Answer::status(200).with_body(body)]).await;

    let outcome = connector(&url).deliver(&two_members()).await.unwrap();

    assert_eq!(outcome.accepted, keys(&["1"]));
    assert_eq!(outcome.rejected.len(), 1);
    assert_eq!(outcome.rejected[0].key, "2");
}

#[tokio::test]
async fn a_rejected_list_of_the_wrong_shape_fails_the_batch_instead_of_accepting_everyone() {
    let body = r#"{"rejected": "2"}"#;
    let (_platform, url) = start_platform([Answer::status(200).with_body(body)]).await;

    let error = connector(&url).deliver(&two_members()).await.unwrap_err();

    let DeliveryError::Permanent { message } = error else {
        panic!("expected a permanent failure, got {error:?}");
    };
    assert!(
        message.contains("`rejected` list that cannot be read"),
        "{message}"
    );
}
