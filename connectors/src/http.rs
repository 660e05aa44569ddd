//! HTTP plumbing shared by the connectors that talk to a platform over HTTP.
//!
//! This module owns the client set-up (timeouts, no redirects), the endpoints below a
//! configured `base_url`, the reading of a `Retry-After`
//! header, the quoting of answers and transport errors into messages, and the blanking of
//! personal data (addresses, phone numbers, the batch's identifier values) in quoted platform
//! text. It does not decide what an answer means; each connector classifies its platform's
//! answers itself.

use std::time::{Duration, SystemTime};

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

use crate::{Batch, DeliveryError};

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

/// The URL of `segments` below `base`: `base`'s path (without a trailing `/`) followed by
/// each segment, escaped, with `base`'s query and fragment left out. An empty last segment
/// gives a trailing `/`.
pub(crate) fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    url.path_segments_mut()
        .expect("an http URL has path segments")
        .pop_if_empty()
        .extend(segments);
    url.set_query(None);
    url.set_fragment(None);
    url
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

/// The wait a response's `Retry-After` header asks for, if it has a readable one.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    requested_wait(headers.get(RETRY_AFTER)?, now)
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

/// The start of a failed answer's body, quoted for an error message with personal data and
/// the `known` identifier values blanked (see [`redact`]).
pub(crate) async fn quoted_body(response: reqwest::Response, known: &[&str]) -> String {
    let bytes = body_start(response, MAX_ERROR_BODY_BYTES).await;
    quote(&redact(&String::from_utf8_lossy(&bytes), known))
}

/// `text` cut to its first [`MAX_QUOTED_CHARS`] characters, with `...` when cut.
pub(crate) fn quote(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// Digits in a run at which the run counts as a phone number (or another personal number).
const MIN_REDACTED_DIGITS: usize = 7;

/// `text` with personal data blanked: e-mail-like tokens become `<address>` and runs of
/// [`MIN_REDACTED_DIGITS`] or more digits (spaces, `-`, `.`, `(`, `)` and `/` allowed between
/// them, a `+` or `(` before them) become `<number>`. Apply before [`quote`]; only platform
/// text needs it.
pub(crate) fn redact_addresses(text: &str) -> String {
    redact(text, &[])
}

/// [`redact_addresses`], after every occurrence (ASCII case ignored) of the batch's own
/// identifier values in `known` has become `<member>`; values shorter than three characters
/// are left, they would blank ordinary words.
pub(crate) fn redact(text: &str, known: &[&str]) -> String {
    let mut values: Vec<&str> = known
        .iter()
        .map(|value| value.trim())
        .filter(|value| value.chars().count() >= 3)
        .collect();
    values.sort_by_key(|value| std::cmp::Reverse(value.len()));
    let mut text = text.to_owned();
    for value in values {
        text = replace_ignoring_ascii_case(&text, value, "<member>");
    }
    blank_numbers(&blank_addresses(&text))
}

/// Every identifier value of the batch's members, for [`redact`].
pub(crate) fn identifier_values(batch: &Batch) -> Vec<&str> {
    batch
        .members
        .iter()
        .flat_map(|member| member.identifiers.values().map(String::as_str))
        .collect()
}

/// `text` with each occurrence of `value`, ASCII case ignored, replaced by `with`.
fn replace_ignoring_ascii_case(text: &str, value: &str, with: &str) -> String {
    // ASCII lowercasing keeps every byte offset, so offsets found in the lowered copies hold
    // for `text` itself.
    let lowered = text.to_ascii_lowercase();
    let needle = value.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut start = 0;
    while let Some(found) = lowered[start..].find(&needle) {
        let at = start + found;
        out.push_str(&text[start..at]);
        out.push_str(with);
        start = at + needle.len();
    }
    out.push_str(&text[start..]);
    out
}

/// Whether `c` can be part of an e-mail address as platforms echo them.
fn address_char(c: char) -> bool {
    c.is_alphanumeric() || "._%+-@'".contains(c)
}

/// `text` with every run of address characters that holds an `@` replaced by `<address>`.
fn blank_addresses(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.contains('@') {
            out.push_str("<address>");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if address_char(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// `text` with every run of at least [`MIN_REDACTED_DIGITS`] digits, separators allowed
/// between them, replaced by `<number>`.
fn blank_numbers(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut index = 0;
    while index < chars.len() {
        if !chars[index].is_ascii_digit() {
            out.push(chars[index]);
            index += 1;
            continue;
        }
        // The run: digits and separators, ending on its last digit.
        let mut end = index;
        let mut last_digit = index;
        let mut digits = 0;
        while end < chars.len() && (chars[end].is_ascii_digit() || " -.()/".contains(chars[end])) {
            if chars[end].is_ascii_digit() {
                digits += 1;
                last_digit = end;
            }
            end += 1;
        }
        if digits >= MIN_REDACTED_DIGITS {
            // A `+` or `(` just before the first digit belongs to the number.
            while out.ends_with(['+', '(']) {
                out.pop();
            }
            out.push_str("<number>");
        } else {
            out.extend(&chars[index..=last_digit]);
        }
        index = last_digit + 1;
    }
    out
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
    fn redaction_blanks_addresses_phone_numbers_and_known_values() {
        let text = concat!(
            r#"{"message":"Invalid email A.b+c@Example.com, phone +1 (555) 010-2030, "#,
            r#"name Ada Lovelace, 12 rows"}"#
        );

        let redacted = redact(text, &["ada lovelace", "x"]);

        assert_eq!(
            redacted,
            r#"{"message":"Invalid email <address>, phone <number>, name <member>, 12 rows"}"#
        );
        assert_eq!(redact_addresses("code 400 at 2030"), "code 400 at 2030");
    }

    #[test]
    fn endpoints_follow_the_base_path_without_its_query() {
        let base = Url::parse("https://api.example.com/v3/?key=x#top").unwrap();
        let bare = Url::parse("https://api.example.com").unwrap();

        assert_eq!(
            endpoint(&base, &["lists", "a b", "members"]).as_str(),
            "https://api.example.com/v3/lists/a%20b/members"
        );
        assert_eq!(
            endpoint(&bare, &["segment", "mapping", ""]).as_str(),
            "https://api.example.com/segment/mapping/"
        );
    }

    #[test]
    fn quoted_text_stops_after_two_hundred_characters() {
        let long = "é".repeat(250);

        let quoted = quote(&long);

        assert_eq!(quoted, format!("{}...", "é".repeat(200)));
        assert_eq!(quote("short"), "short");
    }
}
