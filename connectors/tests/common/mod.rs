//! Scaffolding shared by the connector tests.
//!
//! This module owns what every fake platform and every test repeats: serving a fake on a
//! loopback port ([`start`]), the faults queued on a fake and the requests it received
//! ([`Fake`]), small answers and header readings the fakes build on, the members, batches,
//! settings and outcomes the tests write inline, and the quick retry policy they deliver
//! with. What a platform's API looks like (its routes, bodies, status codes and rate-limit
//! signals) stays in each test file, beside the tests that rely on it.
//!
//! Each test binary uses only part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use segmentd_connectors::{
    Batch, Change, Connector, DeliveryError, Member, Outcome, Rejection, RetryPolicy,
    SettingsError, deliver_with_retries,
};

/// A fake platform: its own state `P`, which it derefs to, the faults `F` queued to answer
/// its next requests, and the requests `R` it received, in order.
pub struct Fake<P, R, F = Infallible> {
    /// What the platform holds (lists, jobs, settings of the fake).
    platform: P,
    /// Faults still to be answered, first first.
    faults: Mutex<VecDeque<F>>,
    /// Requests received, in order.
    received: Mutex<Vec<R>>,
}

impl<P, R, F> Fake<P, R, F> {
    /// A fake holding `platform`, with no fault queued and nothing received.
    pub fn new(platform: P) -> Self {
        Fake {
            platform,
            faults: Mutex::new(VecDeque::new()),
            received: Mutex::new(Vec::new()),
        }
    }

    /// Queues `faults` to answer the next requests, after those already queued.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = F>) {
        self.faults.lock().unwrap().extend(faults);
    }

    /// The next fault queued, taken off the queue.
    pub fn next_fault(&self) -> Option<F> {
        self.faults.lock().unwrap().pop_front()
    }

    /// The first fault queued that `wanted` picks, taken off the queue; the others keep
    /// their order.
    pub fn next_fault_where(&self, wanted: impl Fn(&F) -> bool) -> Option<F> {
        let mut faults = self.faults.lock().unwrap();
        let at = faults.iter().position(wanted)?;
        faults.remove(at)
    }

    /// Records a request; returns how many have been received, this one included.
    pub fn record(&self, request: R) -> usize {
        let mut received = self.received.lock().unwrap();
        received.push(request);
        received.len()
    }

    /// The requests received, in order.
    pub fn received(&self) -> Vec<R>
    where
        R: Clone,
    {
        self.received.lock().unwrap().clone()
    }
}

impl<P: Default, R, F> Default for Fake<P, R, F> {
    fn default() -> Self {
        Fake::new(P::default())
    }
}

impl<P, R, F> Deref for Fake<P, R, F> {
    type Target = P;

    fn deref(&self) -> &P {
        &self.platform
    }
}

/// Serves `routes` with `fake` as their state on a loopback port; returns the fake with the
/// server's root, `http://127.0.0.1:<port>`.
pub async fn start<T: Send + Sync + 'static>(
    fake: T,
    routes: axum::Router<Arc<T>>,
) -> (Arc<T>, String) {
    let fake = Arc::new(fake);
    let router = routes.with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (fake, url)
}

/// A plain HTML error page with `status`, as a proxy in front of an API sends.
pub fn html_page(status: u16) -> Response {
    let mut response = "<html><body><h1>Bad Gateway</h1></body></html>".into_response();
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

/// `page` with `status` and the `Content-Type` `content_type`, as the edge in front of a
/// platform's API sends.
pub fn html(status: u16, page: &'static str, content_type: &str) -> Response {
    let mut response = page.into_response();
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    response
}

/// `response` with a `Retry-After` header of `value`, when there is one.
pub fn with_retry_after(mut response: Response, value: Option<&str>) -> Response {
    if let Some(value) = value {
        response
            .headers_mut()
            .insert("retry-after", value.parse().unwrap());
    }
    response
}

/// The value of the header `name`, when it is there and text.
pub fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `text` with its `%XX` escapes decoded.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A form or query value decoded: `+` is a space, `%XX` an escape.
pub fn form_decode(text: &str) -> String {
    percent_decode(&text.replace('+', " "))
}

/// A member with these identifiers.
pub fn member(key: &str, identifiers: &[(&str, &str)]) -> Member {
    Member {
        key: key.into(),
        identifiers: identifiers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
    }
}

/// A member with an `email` identifier alone.
pub fn email_member(key: &str, email: &str) -> Member {
    member(key, &[("email", email)])
}

/// Members 1, 2 and 3 with the addresses of ann, bob and cat at `example.com`.
pub fn three_members() -> Vec<Member> {
    vec![
        email_member("1", "ann@example.com"),
        email_member("2", "bob@example.com"),
        email_member("3", "cat@example.com"),
    ]
}

/// Batch 0 of `change` for `activation` in run 42, not part of a replace.
pub fn batch(activation: &str, change: Change, members: Vec<Member>) -> Batch {
    Batch {
        run_id: 42,
        activation: activation.into(),
        change,
        sequence: 0,
        members,
        replace: None,
    }
}

/// Sends `batch` through `connector`, retrying as [`quick_policy`] allows with at most
/// `max_attempts` attempts.
pub async fn deliver_retrying(
    connector: &dyn Connector,
    batch: &Batch,
    max_attempts: u32,
) -> Result<Outcome, DeliveryError> {
    deliver_with_retries(connector, batch, &quick_policy(max_attempts)).await
}

/// Retries after 20 ms, doubling to at most 100 ms, for 30 s at most, honouring waits of up
/// to 5 s: the retry policy of the tests, quick enough to run many.
pub fn quick_policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: NonZeroU32::new(max_attempts).unwrap(),
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_total_time: Duration::from_secs(30),
        max_retry_after: Duration::from_secs(5),
    }
}

/// An outcome accepting `keys` and rejecting none.
pub fn accepted(keys: &[&str]) -> Outcome {
    Outcome {
        accepted: strings(keys),
        rejected: vec![],
    }
}

/// An outcome rejecting `keys`, each for `reason`, and accepting none.
pub fn rejected(keys: &[&str], reason: &str) -> Outcome {
    Outcome {
        accepted: vec![],
        rejected: keys
            .iter()
            .map(|key| Rejection {
                key: key.to_string(),
                reason: reason.into(),
            })
            .collect(),
    }
}

/// `texts` as owned strings, in order.
pub fn strings(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|text| text.to_string()).collect()
}

/// The resolved secrets an engine passes a connector, by name.
pub fn secrets(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// A settings table of these keys and values.
pub fn settings<const N: usize>(pairs: [(&str, toml::Value); N]) -> toml::Table {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

/// The settings problem of `field` that `message` describes.
pub fn problem(field: &str, message: &str) -> SettingsError {
    SettingsError {
        field: field.into(),
        message: message.into(),
    }
}
