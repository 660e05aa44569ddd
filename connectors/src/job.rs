//! Jobs a platform accepts with one answer and carries out later.
//!
//! SendGrid's and Klaviyo's import jobs and Google Ads' offline user data jobs are accepted by
//! one request and applied later, so their connectors poll each job until it has finished.
//! This module owns what those connectors share:
//! - the batch identity a job is remembered under ([`batch_identity`]), and the jobs a
//!   connector remembers between the attempts of a batch ([`Jobs`]), so that an attempt after
//!   a timeout polls the job of the earlier one instead of sending the batch again;
//! - the bounded wait for a job ([`wait`]) and its two settings, `poll_interval_seconds` and
//!   `job_wait_seconds` ([`Polling`]);
//! - what a finished import job that counts more refusals than it names comes to
//!   ([`settle`]).
//!
//! It sends no request and knows no platform's job states: each connector polls its own jobs,
//! reads their statuses and words its own failures.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::settings::{Limit, Problems};
use crate::{Batch, DeliveryError};

/// The largest `poll_interval_seconds` accepted.
const MAX_POLL_INTERVAL_SECONDS: u64 = 3600;
/// The largest `job_wait_seconds` accepted.
const MAX_JOB_WAIT_SECONDS: u64 = 86_400;

/// `run_id`, activation, change and sequence, the identity of a batch.
pub(crate) fn batch_identity(batch: &Batch) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        batch.run_id,
        batch.activation,
        batch.change.as_str(),
        batch.sequence
    )
}

/// The jobs holding a batch, by batch identity, kept until they are done so that a later
/// attempt of the batch takes them up again. Each is kept with what the batch sent (member
/// keys or addresses, in order), so a different batch under the same identity is never taken
/// for it.
pub(crate) struct Jobs<J> {
    /// Sent and job, by batch identity.
    remembered: Mutex<BTreeMap<String, (Vec<String>, J)>>,
}

impl<J> Default for Jobs<J> {
    fn default() -> Self {
        Jobs {
            remembered: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<J: Clone> Jobs<J> {
    /// The job an earlier attempt of the batch `identity` remembered, if it sent `sent`.
    pub(crate) fn known(&self, identity: &str, sent: &[String]) -> Option<J> {
        let remembered = self.lock();
        let (known_sent, job) = remembered.get(identity)?;
        (known_sent == sent).then(|| job.clone())
    }

    /// Remembers `job` as holding what the batch `identity` sent, `sent`.
    pub(crate) fn remember(&self, identity: &str, sent: Vec<String>, job: J) {
        self.lock().insert(identity.to_owned(), (sent, job));
    }

    /// Forgets the job of the batch `identity`: it is done, or cannot be taken up again.
    pub(crate) fn forget(&self, identity: &str) {
        self.lock().remove(identity);
    }

    /// Forgets the job of the batch `identity` after a failure that sending again will not
    /// cure, so that a later delivery of the batch starts afresh.
    pub(crate) fn forget_unless_retryable(&self, identity: &str, error: &DeliveryError) {
        if !error.is_retryable() {
            self.forget(identity);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Vec<String>, J)>> {
        self.remembered
            .lock()
            .expect("the job table is never poisoned")
    }
}

// What was sent stays out of `Debug`, so that printing a connector shows no personal data.
impl<J: std::fmt::Debug> std::fmt::Debug for Jobs<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let remembered = self.remembered.lock();
        let mut map = f.debug_map();
        if let Ok(remembered) = remembered.as_ref() {
            for (identity, (sent, job)) in remembered.iter() {
                map.entry(identity, &(sent.len(), job));
            }
        }
        map.finish()
    }
}

/// How a connector waits for its jobs: the `poll_interval_seconds` and `job_wait_seconds`
/// settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Polling {
    /// Between two polls of a job (`poll_interval_seconds`).
    pub(crate) interval: Duration,
    /// How long one attempt waits for a job (`job_wait_seconds`).
    pub(crate) wait: Duration,
}

impl Polling {
    /// Polling every `interval` seconds for at most `wait` seconds.
    pub(crate) const fn seconds(interval: u64, wait: u64) -> Polling {
        Polling {
            interval: Duration::from_secs(interval),
            wait: Duration::from_secs(wait),
        }
    }

    /// `poll_interval_seconds` (1 to 3600) and `job_wait_seconds` (1 to 86400) of the
    /// connection settings, each `defaults`' when absent.
    pub(crate) fn read(problems: &mut Problems, table: &toml::Table, defaults: Polling) -> Self {
        let interval = Limit {
            default: defaults.interval.as_secs(),
            max: MAX_POLL_INTERVAL_SECONDS,
        };
        let wait = Limit {
            default: defaults.wait.as_secs(),
            max: MAX_JOB_WAIT_SECONDS,
        };
        Polling {
            interval: problems.seconds(table, "poll_interval_seconds", interval),
            wait: problems.seconds(table, "job_wait_seconds", wait),
        }
    }
}

/// What one poll found a job to be.
pub(crate) enum Polled<T, S> {
    /// Finished, with what the connector makes of it.
    Finished(T),
    /// Not finished yet, in this state.
    Unfinished(S),
}

/// Polls a job with `poll` until it has finished, once at once and then every
/// `polling.interval`, for at most `polling.wait`.
///
/// A poll that would come after the wait has run out is not made: the failure `unfinished`
/// makes of the last state found and of the wait is returned instead. A poll that fails ends
/// the wait with its failure.
pub(crate) async fn wait<T, S, P>(
    polling: Polling,
    mut poll: impl FnMut() -> P,
    unfinished: impl FnOnce(S, Duration) -> DeliveryError,
) -> Result<T, DeliveryError>
where
    P: Future<Output = Result<Polled<T, S>, DeliveryError>>,
{
    let deadline = Instant::now() + polling.wait;
    loop {
        let state = match poll().await? {
            Polled::Finished(done) => return Ok(done),
            Polled::Unfinished(state) => state,
        };
        if Instant::now() + polling.interval > deadline {
            return Err(unfinished(state, polling.wait));
        }
        tokio::time::sleep(polling.interval).await;
    }
}

/// A job status fit for a message: the platform's word when it is one, `unfinished`
/// otherwise.
pub(crate) fn shown_status(status: &str) -> &str {
    let word = !status.is_empty()
        && status.len() <= 32
        && status
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if word { status } else { "unfinished" }
}

/// One import job a platform queued, with the addresses it holds.
#[derive(Clone)]
pub(crate) struct ImportJob {
    /// The job's id, from the platform's answer.
    pub(crate) id: String,
    /// The addresses it holds, in the order sent.
    pub(crate) addresses: Vec<String>,
}

// The addresses stay out of `Debug`, so that printing a connector shows no personal data.
impl std::fmt::Debug for ImportJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportJob")
            .field("id", &self.id)
            .field("addresses", &self.addresses.len())
            .finish()
    }
}

/// How a platform's import jobs are named in the reason given to members refused by count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wording {
    /// The platform, as in `SendGrid's import job`.
    pub(crate) platform: &'static str,
    /// What a job holds, plural: `contacts`, `profiles`.
    pub(crate) items: &'static str,
    /// What the job counts the refused ones as: `errored`, `failed`.
    pub(crate) counted_as: &'static str,
}

/// What a finished import job's refusals come to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Settled {
    /// The addresses refused, with the reason.
    pub(crate) refused: BTreeMap<String, String>,
    /// How many refused addresses are neither named nor rejected: their members count as
    /// accepted, as which they are is not known.
    pub(crate) unnamed: u64,
}

/// The refusals of `job`, which counted `counted` refused addresses and named those in
/// `named`. When the addresses it did not name must all be among those counted, they are
/// refused too, with a reason worded by `wording`; otherwise they are left accepted and the
/// shortfall is reported.
pub(crate) fn settle(
    job: &ImportJob,
    counted: u64,
    mut named: BTreeMap<String, String>,
    wording: Wording,
) -> Settled {
    let in_job: BTreeSet<&str> = job.addresses.iter().map(String::as_str).collect();
    named.retain(|address, _| in_job.contains(address.as_str()));
    let unnamed = counted.saturating_sub(named.len() as u64);
    let rest: Vec<&String> = job
        .addresses
        .iter()
        .filter(|address| !named.contains_key(address.as_str()))
        .collect();
    if unnamed == 0 || rest.is_empty() {
        return Settled {
            refused: named,
            unnamed: 0,
        };
    }
    if unnamed < rest.len() as u64 {
        return Settled {
            refused: named,
            unnamed,
        };
    }
    let Wording {
        platform,
        items,
        counted_as,
    } = wording;
    let reason = format!(
        "{platform}'s import job {} counted {counted} of its {} {items} as {counted_as} without \
         naming them all; this one is among them",
        job.id,
        job.addresses.len()
    );
    for address in rest {
        named.insert(address.clone(), reason.clone());
    }
    Settled {
        refused: named,
        unnamed: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::Change;

    fn batch(sequence: u32) -> Batch {
        Batch {
            run_id: 7,
            activation: "vip/list".into(),
            change: Change::Add,
            sequence,
            members: Vec::new(),
            replace: None,
        }
    }

    fn sent(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| key.to_string()).collect()
    }

    fn unfinished(state: &str, waited: Duration) -> DeliveryError {
        DeliveryError::Retryable {
            message: format!("still {state} after {} s", waited.as_secs()),
        }
    }

    #[test]
    fn batches_differing_only_in_sequence_have_different_identities() {
        assert_eq!(batch_identity(&batch(3)), "7\nvip/list\nadd\n3");
        assert_ne!(batch_identity(&batch(3)), batch_identity(&batch(4)));
    }

    #[test]
    fn a_remembered_job_is_known_only_to_a_batch_that_sent_the_same() {
        let jobs = Jobs::default();
        jobs.remember("b1", sent(&["1", "2"]), "job-1");

        assert_eq!(jobs.known("b1", &sent(&["1", "2"])), Some("job-1"));
        assert_eq!(jobs.known("b1", &sent(&["2", "1"])), None);
        assert_eq!(jobs.known("b2", &sent(&["1", "2"])), None);

        jobs.forget("b1");
        assert_eq!(jobs.known("b1", &sent(&["1", "2"])), None);
    }

    #[test]
    fn a_job_is_forgotten_after_a_failure_sending_again_will_not_cure() {
        let jobs = Jobs::default();
        jobs.remember("b1", sent(&["1"]), 1);
        jobs.remember("b2", sent(&["1"]), 2);

        let retryable = DeliveryError::Retryable {
            message: "timed out".into(),
        };
        let permanent = DeliveryError::Permanent {
            message: "refused".into(),
        };
        jobs.forget_unless_retryable("b1", &retryable);
        jobs.forget_unless_retryable("b2", &permanent);

        assert_eq!(jobs.known("b1", &sent(&["1"])), Some(1));
        assert_eq!(jobs.known("b2", &sent(&["1"])), None);
    }

    #[test]
    fn what_was_sent_stays_out_of_debug() {
        let jobs = Jobs::default();
        jobs.remember("b1", sent(&["ann@example.com"]), "job-1");

        let shown = format!("{jobs:?}");

        assert!(!shown.contains("ann@example.com"), "{shown}");
        assert!(shown.contains("job-1"), "{shown}");
    }

    #[test]
    fn polling_settings_take_the_defaults_and_refuse_values_past_their_bounds() {
        let defaults = Polling::seconds(5, 300);
        let mut problems = Problems::default();
        let absent = Polling::read(&mut problems, &toml::Table::new(), defaults);
        let table: toml::Table =
            toml::from_str("poll_interval_seconds = 2\njob_wait_seconds = 86401").unwrap();
        let past = Polling::read(&mut problems, &table, defaults);

        assert_eq!(absent, defaults);
        assert_eq!(past, Polling::seconds(2, 300));
        let errors = problems.finish(|| ()).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "job_wait_seconds: must be between 1 and 86400 in the connection settings, got 86401"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_is_polled_every_interval_until_it_has_finished() {
        let polls = Cell::new(0);
        let started = Instant::now();

        let done = wait(
            Polling::seconds(5, 300),
            || {
                polls.set(polls.get() + 1);
                let polled = match polls.get() {
                    3 => Polled::Finished("done"),
                    _ => Polled::Unfinished("pending"),
                };
                async move { Ok(polled) }
            },
            unfinished,
        )
        .await;

        assert_eq!(done, Ok("done"));
        assert_eq!(polls.get(), 3);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_unfinished_when_the_wait_runs_out_fails_with_its_last_state() {
        let polls = Cell::new(0);
        let started = Instant::now();

        let outcome: Result<(), DeliveryError> = wait(
            Polling::seconds(5, 12),
            || {
                polls.set(polls.get() + 1);
                async { Ok(Polled::Unfinished("processing")) }
            },
            unfinished,
        )
        .await;

        // Polls at 0, 5 and 10 s; one at 15 s would come after the wait.
        assert_eq!(
            outcome,
            Err(unfinished("processing", Duration::from_secs(12)))
        );
        assert_eq!(polls.get(), 3);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_poll_ends_the_wait_with_its_failure() {
        let failure = DeliveryError::Auth {
            message: "revoked".into(),
        };

        let outcome: Result<(), DeliveryError> = wait(
            Polling::seconds(5, 300),
            || {
                let failure = failure.clone();
                async move { Err::<Polled<(), &str>, _>(failure) }
            },
            unfinished,
        )
        .await;

        assert_eq!(outcome, Err(failure));
    }

    #[test]
    fn statuses_that_are_not_words_are_shown_as_unfinished() {
        assert_eq!(shown_status("processing"), "processing");
        assert_eq!(shown_status(""), "unfinished");
        assert_eq!(shown_status("<script>"), "unfinished");
    }

    #[test]
    fn addresses_counted_but_not_named_are_refused_only_when_they_must_all_be() {
        let job = ImportJob {
            id: "j1".into(),
            addresses: sent(&["a@x.io", "b@x.io"]),
        };
        let wording = Wording {
            platform: "Acme",
            items: "entries",
            counted_as: "refused",
        };
        let named = BTreeMap::from([("a@x.io".to_owned(), "named".to_owned())]);
        let elsewhere = BTreeMap::from([("z@x.io".to_owned(), "not in the job".to_owned())]);

        let all_counted = settle(&job, 2, named.clone(), wording);
        let one_unnamed = settle(&job, 1, elsewhere, wording);

        assert_eq!(
            all_counted.refused["b@x.io"],
            "Acme's import job j1 counted 2 of its 2 entries as refused without naming them all; \
             this one is among them"
        );
        assert_eq!(all_counted.refused["a@x.io"], "named");
        assert_eq!(
            one_unnamed,
            Settled {
                refused: BTreeMap::new(),
                unnamed: 1
            }
        );
    }
}
