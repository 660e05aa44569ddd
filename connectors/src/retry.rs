//! The retry policy shared by every connector.
//!
//! This module owns how often and how long a batch is sent again after a retryable failure:
//! exponential backoff with full jitter, a bound on attempts and on total time, and a
//! platform's requested wait (`Retry-After`) honoured up to a cap. It does not classify
//! failures; each connector does that when it builds a [`DeliveryError`].

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use serde::Deserialize;
use tokio::time::Instant;

use crate::{Batch, Connector, DeliveryError, Outcome, RateLimit};

/// How a connector call is retried; the `[retry]` settings.
///
/// Durations are written in seconds in configuration (fractions allowed).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// How many times a batch is sent at most, the first attempt included; at least 1.
    pub max_attempts: NonZeroU32,
    /// The backoff ceiling before the first retry (`initial_delay_seconds`); it doubles with
    /// each retry up to `max_delay`, and the actual wait is drawn between zero and the ceiling.
    #[serde(rename = "initial_delay_seconds", deserialize_with = "seconds")]
    pub initial_delay: Duration,
    /// The largest backoff ceiling (`max_delay_seconds`).
    #[serde(rename = "max_delay_seconds", deserialize_with = "seconds")]
    pub max_delay: Duration,
    /// The longest a batch may spend being delivered, from its first attempt
    /// (`max_total_seconds`): a retry whose wait would end later is not made and the last
    /// failure is returned.
    #[serde(rename = "max_total_seconds", deserialize_with = "seconds")]
    pub max_total_time: Duration,
    /// The longest wait honoured when a platform asks for one (`max_retry_after_seconds`); a
    /// longer `Retry-After` is shortened to this.
    #[serde(rename = "max_retry_after_seconds", deserialize_with = "seconds")]
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::new(5).expect("5 is not zero"),
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_total_time: Duration::from_secs(600),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

/// Reads a non-negative number of seconds, integer or fractional.
fn seconds<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let value = f64::deserialize(deserializer)?;
    Duration::try_from_secs_f64(value).map_err(|_| {
        serde::de::Error::custom(format!(
            "expected a non-negative number of seconds, got {value}"
        ))
    })
}

/// Sends `batch` through `connector`, retrying retryable failures as `policy` allows.
///
/// Returns the outcome of the first attempt the platform answered successfully, or the last
/// failure: at once when it is not retryable, otherwise once the attempts or the total time
/// are used up. Each retry is logged at WARN with the wait before it.
pub async fn deliver_with_retries(
    connector: &dyn Connector,
    batch: &Batch,
    policy: &RetryPolicy,
) -> Result<Outcome, DeliveryError> {
    deliver_within_limits(connector, batch, policy, None).await
}

/// Like [`deliver_with_retries`], with every attempt first waiting for the connection's rate
/// limit, when it has one.
pub async fn deliver_within_limits(
    connector: &dyn Connector,
    batch: &Batch,
    policy: &RetryPolicy,
    rate_limit: Option<&RateLimit>,
) -> Result<Outcome, DeliveryError> {
    let started = Instant::now();
    let mut failed_attempts = 0u32;

    (|| async {
        if let Some(limit) = rate_limit {
            limit.until_ready().await;
        }
        connector.deliver(batch).await
    })
    .retry(backoff(policy))
    .when(DeliveryError::is_retryable)
    .adjust(|error, proposed| next_wait(policy, started.elapsed(), error, proposed))
    .notify(|error, wait| {
        failed_attempts += 1;
        tracing::warn!(
            connector = connector.kind(),
            activation = %batch.activation,
            change = batch.change.as_str(),
            sequence = batch.sequence,
            attempt = failed_attempts,
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            error = %error,
            "batch delivery failed; retrying"
        );
    })
    .await
}

/// The backoff waits of `policy`: exponential ceilings, each drawn down by full jitter, one
/// per retry after the first attempt.
fn backoff(policy: &RetryPolicy) -> impl backon::Backoff {
    let retries = usize::try_from(policy.max_attempts.get() - 1).unwrap_or(usize::MAX);
    ExponentialBuilder::new()
        .with_min_delay(policy.initial_delay.min(policy.max_delay))
        .with_max_delay(policy.max_delay)
        .with_max_times(retries)
        .build()
        .map(full_jitter as fn(Duration) -> Duration)
}

/// Decides the wait before the next attempt, or `None` to give up.
///
/// `proposed` is the backoff's next wait, `None` once the attempts are used up; that `None` is
/// kept whatever the error says, so a platform asking for a wait never buys extra attempts.
fn next_wait(
    policy: &RetryPolicy,
    elapsed: Duration,
    error: &DeliveryError,
    proposed: Option<Duration>,
) -> Option<Duration> {
    let proposed = proposed?;
    let wait = match error {
        DeliveryError::RateLimited {
            wait: Some(requested),
            ..
        } => (*requested).min(policy.max_retry_after),
        _ => proposed,
    };
    (elapsed.saturating_add(wait) <= policy.max_total_time).then_some(wait)
}

/// A wait drawn uniformly between zero and `ceiling` ("full jitter"), so that many batches
/// failing together do not retry together.
fn full_jitter(ceiling: Duration) -> Duration {
    ceiling.mul_f64(random_fraction())
}

/// A fraction in `[0, 1)` that differs from call to call; good for spreading retries, not for
/// anything secret.
fn random_fraction() -> f64 {
    // Every `RandomState` carries fresh SipHash keys, so hashing nothing with it yields an
    // unpredictable 64-bit value; the top 53 bits make an evenly spread `f64`.
    let bits = RandomState::new().hash_one(());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::{BoxFuture, Change};

    /// A platform that answers each attempt with the next scripted answer.
    struct ScriptedPlatform {
        answers: Mutex<VecDeque<Result<Outcome, DeliveryError>>>,
        attempts: Mutex<u32>,
    }

    impl ScriptedPlatform {
        fn new(answers: impl IntoIterator<Item = Result<Outcome, DeliveryError>>) -> Self {
            ScriptedPlatform {
                answers: Mutex::new(answers.into_iter().collect()),
                attempts: Mutex::new(0),
            }
        }

        fn attempts(&self) -> u32 {
            *self.attempts.lock().unwrap()
        }
    }

    impl Connector for ScriptedPlatform {
        fn kind(&self) -> &'static str {
            "scripted"
        }

        fn max_batch_size(&self) -> usize {
            10
        }

        fn deliver<'a>(&'a self, _: &'a Batch) -> BoxFuture<'a, Result<Outcome, DeliveryError>> {
            *self.attempts.lock().unwrap() += 1;
            let answer = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .expect("an answer is scripted");
            Box::pin(async move { answer })
        }
    }

    fn batch() -> Batch {
        Batch {
            run_id: 7,
            activation: "vip/newsletter".into(),
            change: Change::Add,
            sequence: 0,
            members: Vec::new(),
            replace: None,
        }
    }

    fn accepted(keys: &[&str]) -> Result<Outcome, DeliveryError> {
        Ok(Outcome {
            accepted: keys.iter().map(|k| k.to_string()).collect(),
            rejected: vec![],
        })
    }

    fn unavailable() -> Result<Outcome, DeliveryError> {
        Err(DeliveryError::Retryable {
            message: "HTTP 503".into(),
        })
    }

    fn rate_limited(wait: Option<Duration>) -> Result<Outcome, DeliveryError> {
        Err(DeliveryError::RateLimited {
            message: "HTTP 429".into(),
            wait,
        })
    }

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: NonZeroU32::new(max_attempts).unwrap(),
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            max_total_time: Duration::from_secs(120),
            max_retry_after: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retryable_failure_is_sent_again_until_it_succeeds() {
        let platform = ScriptedPlatform::new([unavailable(), unavailable(), accepted(&["1"])]);

        let outcome = deliver_with_retries(&platform, &batch(), &policy(5)).await;

        assert_eq!(outcome, accepted(&["1"]));
        assert_eq!(platform.attempts(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_auth_failure_is_returned_after_one_attempt() {
        let auth = DeliveryError::Auth {
            message: "HTTP 401".into(),
        };
        let platform = ScriptedPlatform::new([Err(auth.clone()), accepted(&["1"])]);

        let outcome = deliver_with_retries(&platform, &batch(), &policy(5)).await;

        assert_eq!(outcome, Err(auth));
        assert_eq!(platform.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_the_maximum_with_the_last_failure() {
        let platform = ScriptedPlatform::new([unavailable(), unavailable(), unavailable()]);

        let outcome = deliver_with_retries(&platform, &batch(), &policy(3)).await;

        assert_eq!(outcome, unavailable());
        assert_eq!(platform.attempts(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_wait_does_not_add_attempts_beyond_the_maximum() {
        let wait = Some(Duration::from_secs(1));
        let platform = ScriptedPlatform::new([
            rate_limited(wait),
            rate_limited(wait),
            rate_limited(wait),
            accepted(&["1"]),
        ]);

        let outcome = deliver_with_retries(&platform, &batch(), &policy(3)).await;

        assert_eq!(outcome, rate_limited(wait));
        assert_eq!(platform.attempts(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_wait_is_honoured_exactly() {
        let platform =
            ScriptedPlatform::new([rate_limited(Some(Duration::from_secs(7))), accepted(&["1"])]);
        let started = Instant::now();

        deliver_with_retries(&platform, &batch(), &policy(3))
            .await
            .unwrap();

        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_wait_longer_than_the_cap_is_shortened_to_the_cap() {
        let platform = ScriptedPlatform::new([
            rate_limited(Some(Duration::from_secs(3600))),
            accepted(&["1"]),
        ]);
        let started = Instant::now();

        deliver_with_retries(&platform, &batch(), &policy(3))
            .await
            .unwrap();

        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_total_time_gives_up_with_the_failure() {
        let platform = ScriptedPlatform::new([
            rate_limited(Some(Duration::from_secs(20))),
            accepted(&["1"]),
        ]);
        let policy = RetryPolicy {
            max_total_time: Duration::from_secs(10),
            ..policy(3)
        };
        let started = Instant::now();

        let outcome = deliver_with_retries(&platform, &batch(), &policy).await;

        assert_eq!(outcome, rate_limited(Some(Duration::from_secs(20))));
        assert_eq!(platform.attempts(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_waits_never_exceed_the_doubling_ceilings() {
        let platform = ScriptedPlatform::new([unavailable(), unavailable(), unavailable()]);
        let started = Instant::now();

        deliver_with_retries(&platform, &batch(), &policy(3))
            .await
            .unwrap_err();

        // Ceilings of 1 s then 2 s; full jitter draws each wait at or below its ceiling.
        assert!(
            started.elapsed() <= Duration::from_secs(3),
            "waited {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn full_jitter_spreads_waits_between_zero_and_the_ceiling() {
        let ceiling = Duration::from_secs(10);

        let waits: Vec<Duration> = (0..1000).map(|_| full_jitter(ceiling)).collect();

        assert!(waits.iter().all(|wait| *wait <= ceiling));
        assert!(waits.iter().any(|wait| *wait < Duration::from_secs(2)));
        assert!(waits.iter().any(|wait| *wait > Duration::from_secs(8)));
    }

    #[test]
    fn backoff_yields_one_wait_per_retry() {
        assert_eq!(backoff(&policy(1)).count(), 0);
        assert_eq!(backoff(&policy(4)).count(), 3);
    }

    #[test]
    fn an_empty_retry_table_takes_the_defaults() {
        let policy: RetryPolicy = toml::from_str("").unwrap();

        assert_eq!(policy, RetryPolicy::default());
        assert_eq!(policy.max_attempts.get(), 5);
        assert_eq!(policy.max_retry_after, Duration::from_secs(300));
    }

    #[test]
    fn retry_durations_are_read_in_seconds() {
        let text = "max_attempts = 3\ninitial_delay_seconds = 0.25\nmax_total_seconds = 90";

        let policy: RetryPolicy = toml::from_str(text).unwrap();

        assert_eq!(policy.max_attempts.get(), 3);
        assert_eq!(policy.initial_delay, Duration::from_millis(250));
        assert_eq!(policy.max_total_time, Duration::from_secs(90));
        assert_eq!(policy.max_delay, Duration::from_secs(60));
    }

    #[test]
    fn unknown_retry_keys_zero_attempts_and_negative_seconds_are_refused() {
        let unknown = toml::from_str::<RetryPolicy>("max_retries = 3").unwrap_err();
        let zero = toml::from_str::<RetryPolicy>("max_attempts = 0").unwrap_err();
        let negative = toml::from_str::<RetryPolicy>("max_delay_seconds = -1").unwrap_err();

        assert!(
            unknown.message().contains("unknown field `max_retries`"),
            "{unknown}"
        );
        assert!(zero.message().contains("nonzero"), "{zero}");
        assert!(
            negative
                .message()
                .contains("non-negative number of seconds"),
            "{negative}"
        );
    }
}
