//! The client-side rate limit of a connection.
//!
//! This module owns how fast requests leave for one platform account: a [`RateLimit`] is built
//! once per connection from its `[rate_limit]` settings and shared by every activation using
//! that connection, so several segments sent to one account together stay under the account's
//! limit. Every attempt waits for the limiter, retries included. It does not react to a
//! platform's throttling answers; [`crate::retry`] does that with the waits the platform gives.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};
use serde::Deserialize;

/// The `[connections.<name>.rate_limit]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Requests per second at most, on average; fractions allowed (`0.5` is one every two
    /// seconds).
    pub requests_per_second: f64,
    /// Requests that may leave at once after a quiet spell; default 1.
    #[serde(default = "one")]
    pub burst: NonZeroU32,
}

fn one() -> NonZeroU32 {
    NonZeroU32::MIN
}

/// A connection's request limiter; clones share it.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// The limiter every clone waits on.
    limiter: Arc<DefaultDirectRateLimiter>,
    /// The settings it was built from, for messages.
    settings: RateLimitSettings,
}

impl RateLimit {
    /// Builds the limiter, or says why the settings cannot make one.
    pub fn new(settings: RateLimitSettings) -> Result<RateLimit, String> {
        let rate = settings.requests_per_second;
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!(
                "requests_per_second must be a number above 0, such as 5 or 0.5; got {rate}"
            ));
        }
        let period = Duration::try_from_secs_f64(1.0 / rate)
            .ok()
            .filter(|period| !period.is_zero())
            .ok_or_else(|| format!("requests_per_second {rate} is too high to keep"))?;
        let quota = Quota::with_period(period)
            .expect("a period above zero")
            .allow_burst(settings.burst);
        Ok(RateLimit {
            limiter: Arc::new(DefaultDirectRateLimiter::direct(quota)),
            settings,
        })
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &RateLimitSettings {
        &self.settings
    }

    /// Waits until one more request may leave.
    pub async fn until_ready(&self) {
        self.limiter.until_ready().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(requests_per_second: f64, burst: u32) -> RateLimitSettings {
        RateLimitSettings {
            requests_per_second,
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn rates_that_cannot_be_kept_are_refused() {
        assert!(
            RateLimit::new(settings(0.0, 1))
                .unwrap_err()
                .contains("above 0")
        );
        assert!(
            RateLimit::new(settings(-2.0, 1))
                .unwrap_err()
                .contains("above 0")
        );
        assert!(RateLimit::new(settings(f64::NAN, 1)).is_err());
        assert!(
            RateLimit::new(settings(1e12, 1))
                .unwrap_err()
                .contains("too high")
        );
    }

    #[tokio::test]
    async fn requests_leave_no_faster_than_the_rate_after_the_burst() {
        let limit = RateLimit::new(settings(20.0, 2)).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..6 {
            limit.until_ready().await;
        }
        // Two leave at once, the next four one every 50 ms.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }
}
