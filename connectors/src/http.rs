//! HTTP plumbing shared by the connectors that talk to a platform over HTTP.
//!
//! This module owns the client set-up (timeouts, no redirects), the reading of a `Retry-After`
//! header, and the quoting of answers and transport errors into messages. It does not decide
//! what an answer means; each connector classifies its platform's answers itself.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderValue;

use crate::DeliveryError;

/// How much of an answer's body goes into an error message or a rejection reason.
pub(crate) const MAX_QUOTED_CHARS: usize = 200;
/// How much of a failed answer's body is read at most.
pub(crate) const MAX_ERROR_BODY_BYTES: usize = 4096;
/// The longest wait for a connection, whatever the request timeout.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client with a request `timeout`, a connect timeout no longer than ten seconds, and
/// redirects not followed: platforms are configured at their final address.
pub(crate) fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// A credential: its `Debug` output never shows the value.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl Secret {
    /// The value, for the one place that sends it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The wait a `Retry-After` value asks for: delta-seconds, or an HTTP-date (one in the past
/// asks for no wait). `None` when it is neither.
pub(crate) fn requested_wait(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        // Digits too many for a u64 are a wait far beyond any cap.
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// At most the first `limit` bytes of an answer's body (a little more when a chunk crosses
/// the limit); what cannot be read is left out.
pub(crate) async fn body_start(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes
}

/// The start of a failed answer's body, quoted for an error message.
pub(crate) async fn quoted_body(response: reqwest::Response) -> String {
    let bytes = body_start(response, MAX_ERROR_BODY_BYTES).await;
    quote(&String::from_utf8_lossy(&bytes))
}

/// `text` cut to its first [`MAX_QUOTED_CHARS`] characters, with `...` when cut.
pub(crate) fn quote(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// An error and its sources, `: `-separated: reqwest's own message alone says little.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The retryable failure a transport error stands for: `<method> to <shown_url> timed out`
/// or `... failed`, with the error's causes and without the URL reqwest would add.
pub(crate) fn transport_failure(
    method: &str,
    shown_url: &str,
    error: reqwest::Error,
) -> DeliveryError {
    let what = if error.is_timeout() {
        "timed out"
    } else {
        "failed"
    };
    DeliveryError::Retryable {
        message: format!(
            "{method} to {shown_url} {what}: {}",
            error_chain(&error.without_url())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).unwrap()
    }

    #[test]
    fn retry_after_in_seconds_is_the_wait() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);

        assert_eq!(
            requested_wait(&header("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(requested_wait(&header(" 0 "), now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_as_a_date_waits_until_then_and_not_at_all_when_past() {
        // Sun, 06 Nov 1994 08:49:37 GMT is 784111777 seconds after the epoch.
        let date = header("Sun, 06 Nov 1994 08:49:37 GMT");
        let before = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777 - 90);
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777 + 90);

        assert_eq!(requested_wait(&date, before), Some(Duration::from_secs(90)));
        assert_eq!(requested_wait(&date, after), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_that_is_neither_form_asks_for_no_particular_wait() {
        let now = SystemTime::now();

        assert_eq!(requested_wait(&header("soon"), now), None);
        assert_eq!(requested_wait(&header("-5"), now), None);
        assert_eq!(requested_wait(&header(""), now), None);
    }

    #[test]
    fn quoted_text_stops_after_two_hundred_characters() {
        let long = "é".repeat(250);

        let quoted = quote(&long);

        assert_eq!(quoted, format!("{}...", "é".repeat(200)));
        assert_eq!(quote("short"), "short");
    }
}
