//! The `webhook` connector: each batch is POSTed as one JSON document.
//!
//! This module owns the request (body, bearer token, `Idempotency-Key`), the reading of the
//! answer (per-member rejections in a 2xx body, `Retry-After` on a 429) and the classification
//! of failures into [`DeliveryError`]s. It does not retry; [`crate::deliver_with_retries`]
//! does. Redirects are not followed: a webhook is configured at its final address.
//!
//! The body sent:
//!
//! ```json
//! {"run_id": 42, "activation": "vip/crm", "change": "add", "sequence": 0,
//!  "batch_id": "42-vip/crm-add-0",
//!  "members": [{"key": "1", "identifiers": {"email": "a@example.com"}}]}
//! ```
//!
//! A 2xx answer may carry `{"rejected": [{"key": "1", "reason": "..."}]}`; every other key of
//! the batch counts as accepted.
//!
//! The batches of a replace (a `mirror` activation) have `"change": "replace"` and a
//! `"replace": {"session": 7, "batches": 3, "members": 2500}` object, and their `batch_id`
//! holds the session (`42-vip/crm-replace-7-0`). The receiver keeps the members of a session's
//! batches aside and, when batch `batches - 1` arrives, makes them its whole list; a session
//! whose last batch never comes must change nothing, and a new session starts from batch 0.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use crate::http::{self, quote, requested_wait};
use crate::settings::{Limit, Place, Problems};
use crate::{
    Batch, BoxFuture, Change, Connector, DeliveryError, Member, Outcome, Rejection, SettingsError,
};

/// Connection keys the webhook connector knows.
const CONNECTION_KEYS: &[&str] = &["url", "token_env", "batch_size", "timeout_seconds"];
/// Activation keys the webhook connector knows.
const ACTIVATION_KEYS: &[&str] = &["url"];
/// `batch_size`, members per request.
const BATCH_SIZE: Limit = Limit {
    default: 1000,
    max: 10_000,
};
/// `timeout_seconds`, seconds a request may take.
const TIMEOUT_SECONDS: Limit = Limit {
    default: 30,
    max: 3600,
};
/// How much of a 2xx answer is read at most; 10,000 rejections with reasons fit well under it.
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// The header carrying the batch identity, so a platform can drop a repeated request.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// POSTs each batch as JSON to a URL.
///
/// Connection settings: `url` (required, `http` or `https`), `token_env` (the name of the
/// environment variable holding a bearer token; the engine resolves it and passes the value as
/// the `token` secret), `batch_size` (members per request, 1 to 10000, default 1000) and
/// `timeout_seconds` (per request, default 30). Activation settings: `url`, overriding the
/// connection's.
#[derive(Debug, Clone)]
pub struct WebhookConnector {
    client: reqwest::Client,
    url: Url,
    /// `Bearer <token>`, marked sensitive so it never shows in `Debug` output.
    authorization: Option<HeaderValue>,
    batch_size: usize,
}

impl WebhookConnector {
    /// Builds the connector from its connection and activation settings and the resolved
    /// secrets (`token` when `token_env` is set), returning every problem found.
    pub fn from_settings(
        connection: &toml::Table,
        activation: &toml::Table,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Self, Vec<SettingsError>> {
        let mut problems = Problems::default();
        problems.reject_unknown_keys(connection, Place::Connection, CONNECTION_KEYS);
        problems.reject_unknown_keys(activation, Place::Activation, ACTIVATION_KEYS);

        if !connection.contains_key("url") {
            problems.push(
                "url",
                "missing; set it to the address batches are POSTed to",
            );
        }
        let connection_url = parse_url(&mut problems, connection, Place::Connection);
        let activation_url = parse_url(&mut problems, activation, Place::Activation);
        let authorization = read_authorization(&mut problems, connection, secrets);
        let batch_size = problems.batch_size(connection, BATCH_SIZE);
        let client = problems.http_client(connection, "url", TIMEOUT_SECONDS);

        problems.finish(|| WebhookConnector {
            client: client.expect("a client when there are no problems"),
            url: activation_url
                .or(connection_url)
                .expect("a url when there are no problems"),
            authorization,
            batch_size,
        })
    }

    /// Sends one batch and classifies the answer.
    async fn post(&self, batch: &Batch) -> Result<Outcome, DeliveryError> {
        let batch_id = match batch.replace {
            Some(replace) => format!(
                "{}-{}-replace-{}-{}",
                batch.run_id, batch.activation, replace.session, batch.sequence
            ),
            None => format!(
                "{}-{}-{}-{}",
                batch.run_id,
                batch.activation,
                batch.change.as_str(),
                batch.sequence
            ),
        };
        let idempotency_key =
            HeaderValue::from_str(&batch_id).map_err(|_| DeliveryError::Permanent {
                message: format!(
                    "batch id `{}` cannot be sent as an Idempotency-Key header; use only visible \
                     ASCII in activation names",
                    batch_id.escape_debug()
                ),
            })?;
        let payload = Payload {
            run_id: batch.run_id,
            activation: &batch.activation,
            change: batch.change,
            sequence: batch.sequence,
            batch_id: &batch_id,
            members: &batch.members,
            replace: batch.replace.map(|replace| ReplaceFields {
                session: replace.session,
                batches: replace.batches,
                members: replace.members,
            }),
        };

        let mut request = self
            .client
            .post(self.url.clone())
            .header(IDEMPOTENCY_KEY, idempotency_key)
            .json(&payload);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|error| self.transport_failure(error))?;

        let status = response.status();
        if status.is_success() {
            // A body longer than the limit is cut, and its `rejected` list is then unreadable.
            let body = http::body_start(response, MAX_ANSWER_BYTES).await;
            return self.outcome(batch, &body);
        }

        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = http::quoted_body(response, &http::identifier_values(batch)).await;
        let message = format!("{} answered {status}: {body}", self.shown_url());
        Err(classify_failure(
            status,
            message,
            retry_after.as_ref(),
            SystemTime::now(),
        ))
    }

    /// The outcome of a 2xx answer: keys listed under `rejected` are rejected, the rest of the
    /// batch accepted. Reasons are quoted without personal data or the batch's identifiers. A
    /// `rejected` list that cannot be read fails the batch: which members the receiver
    /// refused is not known, so none is counted as accepted.
    fn outcome(&self, batch: &Batch, body: &[u8]) -> Result<Outcome, DeliveryError> {
        let known = http::identifier_values(batch);
        let rejections =
            read_rejections(body, &known).map_err(|error| DeliveryError::Permanent {
                message: format!(
                    "{} answered with a `rejected` list that cannot be read ({}); it must be \
                     [{{\"key\": \"...\", \"reason\": \"...\"}}]",
                    self.shown_url(),
                    http::redact(&error.to_string(), &known)
                ),
            })?;

        let mut outcome = Outcome::default();
        for member in &batch.members {
            match rejections.get(member.key.as_str()) {
                Some(reason) => outcome.rejected.push(Rejection {
                    key: member.key.clone(),
                    reason: reason.clone(),
                }),
                None => outcome.accepted.push(member.key.clone()),
            }
        }
        let strangers = rejections.len() - outcome.rejected.len();
        if strangers > 0 {
            tracing::warn!(
                activation = %batch.activation,
                change = batch.change.as_str(),
                sequence = batch.sequence,
                keys = strangers,
                "the webhook rejected keys that are not in the batch; they are ignored"
            );
        }
        Ok(outcome)
    }

    fn transport_failure(&self, error: reqwest::Error) -> DeliveryError {
        http::transport_failure("POST", &self.shown_url(), error)
    }

    /// The URL without credentials, query or fragment, fit for messages and logs.
    fn shown_url(&self) -> String {
        let mut shown = self.url.clone();
        // Setting these only fails for URLs that cannot carry them, which then have none.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        shown.set_query(None);
        shown.set_fragment(None);
        shown.to_string()
    }
}

impl Connector for WebhookConnector {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn max_batch_size(&self) -> usize {
        self.batch_size
    }

    fn replaces_lists(&self) -> bool {
        true
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
        Box::pin(self.post(batch))
    }
}

/// The JSON document POSTed for one batch.
#[derive(serde::Serialize)]
struct Payload<'a> {
    run_id: i64,
    activation: &'a str,
    change: Change,
    sequence: u32,
    batch_id: &'a str,
    members: &'a [Member],
    #[serde(skip_serializing_if = "Option::is_none")]
    replace: Option<ReplaceFields>,
}

/// Where a replace batch stands in its replace, as sent.
#[derive(serde::Serialize)]
struct ReplaceFields {
    session: u64,
    batches: u32,
    members: u64,
}

/// The part of a 2xx answer the connector reads.
#[derive(serde::Deserialize)]
struct Answer {
    rejected: Vec<RejectedMember>,
}

/// One entry of a 2xx answer's `rejected` list.
#[derive(serde::Deserialize)]
struct RejectedMember {
    #[serde(deserialize_with = "key_text")]
    key: String,
    #[serde(default)]
    reason: Option<String>,
}

/// A rejected member's key, given as a string or, as a receiver may, as a number.
fn key_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match serde::Deserialize::deserialize(deserializer)? {
        serde_json::Value::String(text) => Ok(text),
        serde_json::Value::Number(number) => Ok(number.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "a key must be a string or a number, found {other}"
        ))),
    }
}

/// The `url` at `key` in `table`, if present and an `http` or `https` URL.
fn parse_url(problems: &mut Problems, table: &toml::Table, place: Place) -> Option<Url> {
    let text = problems.string(table, place, "url")?;
    match Url::parse(&text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Some(url),
        Ok(url) => {
            let scheme = url.scheme();
            problems.push(
                "url",
                format!("must be an http or https URL with a host, got `{scheme}:`"),
            );
            None
        }
        Err(error) => {
            problems.push("url", format!("not a valid URL: {error}"));
            None
        }
    }
}

/// The `Authorization` header value, when `token_env` is set and the token can be sent.
fn read_authorization(
    problems: &mut Problems,
    connection: &toml::Table,
    secrets: &BTreeMap<String, String>,
) -> Option<HeaderValue> {
    let variable = problems.string(connection, Place::Connection, "token_env")?;
    let Some(token) = secrets.get("token") else {
        problems.push(
            "token_env",
            format!("the environment variable `{variable}` is not set; export it with the token"),
        );
        return None;
    };
    match HeaderValue::from_str(&format!("Bearer {token}")) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(value)
        }
        Err(_) => {
            problems.push(
                "token_env",
                format!(
                    "the token in `{variable}` holds characters an HTTP header cannot carry; \
                     check the variable's value"
                ),
            );
            None
        }
    }
}

/// Rejection reasons by key from a 2xx body. A body that is not a JSON object with a
/// `rejected` key rejects nothing; a `rejected` value of the wrong shape is an error.
fn read_rejections(
    body: &[u8],
    known: &[&str],
) -> Result<HashMap<String, String>, serde_json::Error> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
        return Ok(HashMap::new());
    };
    if !fields.contains_key("rejected") {
        return Ok(HashMap::new());
    }
    let answer: Answer = serde_json::from_value(serde_json::Value::Object(fields))?;
    Ok(answer
        .rejected
        .into_iter()
        .map(|rejected| {
            let reason = rejected
                .reason
                .map(|reason| quote(&http::redact(&reason, known)))
                .unwrap_or_else(|| "rejected by the webhook without a reason".to_owned());
            (rejected.key, reason)
        })
        .collect())
}

/// The failure a non-2xx answer stands for.
fn classify_failure(
    status: StatusCode,
    message: String,
    retry_after: Option<&HeaderValue>,
    now: SystemTime,
) -> DeliveryError {
    match status.as_u16() {
        429 => DeliveryError::RateLimited {
            wait: retry_after.and_then(|value| requested_wait(value, now)),
            message,
        },
        408 => DeliveryError::Retryable { message },
        501 => DeliveryError::Permanent { message },
        500..=599 => DeliveryError::Retryable { message },
        401 | 403 => DeliveryError::Auth { message },
        300..=399 => DeliveryError::Permanent {
            message: format!(
                "{message}; redirects are not followed, set `url` to the final address"
            ),
        },
        _ => DeliveryError::Permanent { message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_by_what_sending_again_would_do() {
        let kind = |code: u16| {
            let status = StatusCode::from_u16(code).unwrap();
            crate::error_kind(&classify_failure(
                status,
                String::new(),
                None,
                SystemTime::now(),
            ))
        };

        let kinds: Vec<(u16, &str)> = [
            301, 400, 401, 403, 404, 408, 409, 422, 429, 500, 501, 502, 503, 504,
        ]
        .into_iter()
        .map(|code| (code, kind(code)))
        .collect();

        assert_eq!(
            kinds,
            [
                (301, "permanent"),
                (400, "permanent"),
                (401, "auth"),
                (403, "auth"),
                (404, "permanent"),
                (408, "retryable"),
                (409, "permanent"),
                (422, "permanent"),
                (429, "rate limited"),
                (500, "retryable"),
                (501, "permanent"),
                (502, "retryable"),
                (503, "retryable"),
                (504, "retryable"),
            ]
        );
    }

    #[test]
    fn a_body_without_a_rejected_list_rejects_nothing() {
        assert_eq!(read_rejections(b"", &[]).unwrap(), HashMap::new());
        assert_eq!(read_rejections(b"OK", &[]).unwrap(), HashMap::new());
        assert_eq!(
            read_rejections(br#"{"status":"ok"}"#, &[]).unwrap(),
            HashMap::new()
        );
    }

    #[test]
    fn a_rejected_list_of_the_wrong_shape_is_an_error() {
        assert!(read_rejections(br#"{"rejected":"all"}"#, &[]).is_err());
        assert!(read_rejections(br#"{"rejected":[{"reason":"no key"}]}"#, &[]).is_err());
    }

    #[test]
    fn the_shown_url_leaves_out_credentials_and_query() {
        let settings: toml::Table =
            toml::from_str(r#"url = "https://user:secret@hooks.example.com/in?sig=abc#x""#)
                .unwrap();
        let connector =
            WebhookConnector::from_settings(&settings, &toml::Table::new(), &BTreeMap::new())
                .unwrap();

        assert_eq!(connector.shown_url(), "https://hooks.example.com/in");
    }
}
