//! Schedules: when each pipeline runs on its own.
//!
//! A pipeline's `schedule` is a six-field cron expression, seconds first, read in UTC
//! (`"0 0 5 * * *"` is 05:00 UTC every day). UTC because the scheduler keeps the UTC offset it
//! saw when a job was created, so a schedule in a zone with daylight saving would fire an hour
//! off for half of the year. Day-of-month and day-of-week are both required to match when both
//! are given. The job only hands a run request to the pipeline's runner, which owns execution:
//! a tick that comes while a run is queued is coalesced into it.

use chrono::Utc;
use croner::parser::{CronParser, Seconds};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::daemon::RunRequests;

fn parser() -> CronParser {
    // The same settings tokio-cron-scheduler parses with, so what validates here runs there.
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
}

/// Checks a schedule expression, with a message saying how to write one.
pub fn check_schedule(expression: &str) -> Result<(), String> {
    parser().parse(expression).map(|_| ()).map_err(|err| {
        format!(
            "schedule `{expression}` is not a cron expression with six fields, seconds first, \
             in UTC (for example \"0 0 5 * * *\" for 05:00 UTC daily): {err}"
        )
    })
}

/// The next `count` fire times of a schedule after now, in UTC.
pub fn next_fires(expression: &str, count: usize) -> Vec<chrono::DateTime<Utc>> {
    let Ok(cron) = parser().parse(expression) else {
        return Vec::new();
    };
    cron.iter_after(Utc::now()).take(count).collect()
}

/// Starts the scheduler with one job per scheduled pipeline.
pub async fn start(
    schedules: Vec<(String, String)>,
    requests: RunRequests,
) -> anyhow::Result<JobScheduler> {
    let scheduler = JobScheduler::new().await?;
    for (pipeline, expression) in schedules {
        let requests = requests.clone();
        let name = pipeline.clone();
        let job = Job::new_async(expression.as_str(), move |_id, _scheduler| {
            let requests = requests.clone();
            let name = name.clone();
            Box::pin(async move {
                requests.trigger(&name, "schedule");
            })
        })
        .map_err(|err| anyhow::anyhow!("pipeline `{pipeline}`: schedule `{expression}`: {err}"))?;
        scheduler.add(job).await?;
        tracing::info!(pipeline = %pipeline, schedule = %expression, "schedule registered");
    }
    scheduler.start().await?;
    Ok(scheduler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_six_field_schedules_and_rejects_five() {
        assert!(check_schedule("0 0 5 * * *").is_ok());
        assert!(check_schedule("0 */15 * * * *").is_ok());
        let five = check_schedule("0 5 * * *").unwrap_err();
        assert!(five.contains("six fields"), "{five}");
    }

    #[test]
    fn next_fires_are_in_order_at_the_given_time() {
        let fires = next_fires("0 30 4 * * *", 3);
        assert_eq!(fires.len(), 3);
        for fire in &fires {
            assert_eq!(fire.format("%H:%M:%S").to_string(), "04:30:00");
        }
        assert!(fires[0] < fires[1] && fires[1] < fires[2]);
    }
}
