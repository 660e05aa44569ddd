//! The daemon: one runner task per pipeline, the scheduler, and the HTTP API.
//!
//! Each pipeline has one runner task that owns its runs, so two runs of a pipeline never
//! overlap. Triggers (schedule ticks and `POST /pipelines/{name}/runs`) go to the runner
//! through a channel that holds one waiting request: a trigger that arrives while one is
//! already waiting is coalesced into it. DuckDB work happens on blocking threads, so the API
//! answers during a long refresh.
//!
//! Approvals and plans go through the same runner, so they never overlap a run either. On
//! start-up each runner first finishes the runs a stop interrupted.
//!
//! Routes: `GET /health`; `POST /pipelines/{name}/runs` (202, queued or coalesced; `?force=true`
//! accepts a refresh its guards would refuse); `GET /pipelines/{name}/runs/latest` (whether a
//! run is in progress, and the summary of the pipeline's latest run read from the store, so it
//! answers for runs of an earlier daemon or of the CLI as for its own);
//! `POST /pipelines/{name}/runs/{run}/approve` (`?activation=` for one; 409 with what became of
//! the run's deltas when nothing of it is held);
//! `GET /pipelines/{name}/plan`; `GET /pipelines/{name}/deadletter`;
//! `POST /pipelines/{name}/deadletter/retry`; `GET /pipelines/{name}/profiles/{key}` (the
//! segments a profile belongs to now, by the same SQL as the bulk evaluation).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deliver::ApproveError;
use crate::runner;
use crate::store::Store;

/// Where requests for each pipeline's runner go.
#[derive(Clone)]
pub struct RunRequests {
    /// Run triggers: one may wait while a run is in progress; more are coalesced into it.
    runs: Arc<BTreeMap<String, mpsc::Sender<(String, bool)>>>,
    /// Approvals and plans, each answered on its own channel.
    others: Arc<BTreeMap<String, mpsc::Sender<Request>>>,
}

/// A request other than a run, with where to send the answer.
enum Request {
    Approve {
        run_id: i64,
        activation: Option<String>,
        reply: oneshot::Sender<anyhow::Result<Vec<runner::ActivationSummary>>>,
    },
    Plan {
        reply: oneshot::Sender<anyhow::Result<crate::plan::Plan>>,
    },
}

/// What became of a trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triggered {
    /// A run will start when the runner is free.
    Queued,
    /// A run was already waiting; this trigger joined it.
    Coalesced,
    /// No such pipeline.
    UnknownPipeline,
}

impl RunRequests {
    /// Asks for a run of `pipeline`.
    pub fn trigger(&self, pipeline: &str, trigger: &str) -> Triggered {
        self.trigger_with(pipeline, trigger, false)
    }

    /// Asks for a run, `force`d past the pipeline's guards or not.
    pub fn trigger_with(&self, pipeline: &str, trigger: &str, force: bool) -> Triggered {
        let Some(sender) = self.runs.get(pipeline) else {
            return Triggered::UnknownPipeline;
        };
        match sender.try_send((trigger.to_string(), force)) {
            Ok(()) => Triggered::Queued,
            Err(_) => {
                tracing::info!(
                    pipeline,
                    trigger,
                    "a run is already waiting; trigger coalesced"
                );
                Triggered::Coalesced
            }
        }
    }
}

/// What the API knows of a pipeline's runner beyond the store: whether it is busy.
#[derive(Default)]
struct PipelineStatus {
    running: bool,
}

#[derive(Clone)]
struct AppState {
    config: Arc<Config>,
    store: Arc<Store>,
    requests: RunRequests,
    status: Arc<Mutex<BTreeMap<String, PipelineStatus>>>,
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let status: Arc<Mutex<BTreeMap<String, PipelineStatus>>> = Arc::default();
    let mut runs = BTreeMap::new();
    let mut others = BTreeMap::new();
    let mut runners = Vec::new();

    for name in config.pipelines.keys() {
        let (run_sender, run_receiver) = mpsc::channel(1);
        let (other_sender, other_receiver) = mpsc::channel(16);
        runs.insert(name.clone(), run_sender);
        others.insert(name.clone(), other_sender);
        status
            .lock()
            .expect("status lock")
            .insert(name.clone(), PipelineStatus::default());
        runners.push(tokio::spawn(runner_task(
            name.clone(),
            Arc::clone(&config),
            Arc::clone(&store),
            (run_receiver, other_receiver),
            Arc::clone(&status),
            shutdown.clone(),
        )));
    }
    let requests = RunRequests {
        runs: Arc::new(runs),
        others: Arc::new(others),
    };

    let schedules: Vec<(String, String)> = config
        .pipelines
        .values()
        .filter_map(|p| p.schedule.clone().map(|s| (p.name.clone(), s)))
        .collect();
    let mut scheduler = crate::scheduler::start(schedules, requests.clone()).await?;

    let state = AppState {
        config: Arc::clone(&config),
        store,
        requests,
        status,
    };
    let app = axum::Router::new()
        .route("/health", get(health))
        .route("/pipelines/{name}/runs", post(trigger_run))
        .route("/pipelines/{name}/runs/latest", get(latest_run))
        .route("/pipelines/{name}/runs/{run}/approve", post(approve))
        .route("/pipelines/{name}/plan", get(plan))
        .route("/pipelines/{name}/deadletter", get(dead_letters))
        .route(
            "/pipelines/{name}/deadletter/retry",
            post(retry_dead_letters),
        )
        .route("/pipelines/{name}/profiles/{key}", get(profile))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(config.daemon.listen)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {}: {err}", config.daemon.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "http api listening");

    let stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    scheduler.shutdown().await?;
    for runner in runners {
        let _ = runner.await;
    }
    tracing::info!("daemon stopped");
    Ok(())
}

async fn runner_task(
    name: String,
    config: Arc<Config>,
    store: Arc<Store>,
    (mut runs, mut others): (mpsc::Receiver<(String, bool)>, mpsc::Receiver<Request>),
    status: Arc<Mutex<BTreeMap<String, PipelineStatus>>>,
    shutdown: CancellationToken,
) {
    let pipeline = &config.pipelines[&name];
    set_running(&status, &name, true);
    if let Err(err) = runner::resume_interrupted(Arc::clone(&store), &config, pipeline).await {
        tracing::error!(
            pipeline = %name, error = %format!("{err:#}"), "resuming interrupted runs failed"
        );
    }
    set_running(&status, &name, false);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            request = others.recv() => match request {
                Some(Request::Approve { run_id, activation, reply }) => {
                    set_running(&status, &name, true);
                    let result =
                        runner::approve(Arc::clone(&store), &config, pipeline, run_id, activation)
                            .await;
                    set_running(&status, &name, false);
                    let _ = reply.send(result);
                }
                Some(Request::Plan { reply }) => {
                    let as_of = runner::as_of_for(pipeline, None);
                    let owned = pipeline.clone();
                    let store = Arc::clone(&store);
                    let result = tokio::task::spawn_blocking(move || {
                        let connection = store.connection()?;
                        crate::plan::plan(&connection, &owned, as_of)
                    })
                    .await
                    .expect("a DuckDB job panicked");
                    let _ = reply.send(result);
                }
                None => break,
            },
            trigger = runs.recv() => {
                let Some((trigger, force)) = trigger else { break };
                set_running(&status, &name, true);
                // A run in progress finishes; shutdown waits for it.
                let options = runner::RunOptions { as_of: None, force };
                let ran =
                    runner::run(Arc::clone(&store), &config, pipeline, &trigger, options).await;
                if let Err(err) = ran {
                    tracing::error!(
                        pipeline = %name, error = %format!("{err:#}"),
                        "run could not be carried out"
                    );
                }
                set_running(&status, &name, false);
            }
        }
    }
}

fn set_running(status: &Mutex<BTreeMap<String, PipelineStatus>>, name: &str, running: bool) {
    let mut status = status.lock().expect("status lock");
    status.entry(name.to_string()).or_default().running = running;
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

fn unknown_pipeline(name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": format!("no pipeline `{name}`") })),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct RunQuery {
    #[serde(default)]
    force: bool,
}

async fn trigger_run(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<RunQuery>,
) -> Response {
    match state.requests.trigger_with(&name, "http", query.force) {
        Triggered::UnknownPipeline => unknown_pipeline(&name),
        triggered => {
            let word = if triggered == Triggered::Queued {
                "queued"
            } else {
                "coalesced"
            };
            (
                StatusCode::ACCEPTED,
                Json(json!({ "pipeline": name, "status": word })),
            )
                .into_response()
        }
    }
}

async fn latest_run(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(pipeline) = state.config.pipelines.get(&name).cloned() else {
        return unknown_pipeline(&name);
    };
    let running = state
        .status
        .lock()
        .expect("status lock")
        .get(&name)
        .is_some_and(|entry| entry.running);
    let store = Arc::clone(&state.store);
    let latest =
        crate::deliver::blocking(&store, move |c| runner::latest_summary(c, &pipeline)).await;
    match latest {
        Ok(last) => Json(json!({
            "pipeline": name,
            "running": running,
            "last_run": last,
        }))
        .into_response(),
        Err(err) => internal_error(&err.into()),
    }
}

async fn profile(
    State(state): State<AppState>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    let Some(pipeline) = state.config.pipelines.get(&name).cloned() else {
        return unknown_pipeline(&name);
    };
    let store = Arc::clone(&state.store);
    let lookup = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Vec<String>>> {
        let connection = store.connection()?;
        if !crate::evaluate::profile_exists(&connection, &pipeline, &key)? {
            return Ok(None);
        }
        let as_of = runner::as_of_for(&pipeline, None);
        Ok(Some(crate::evaluate::profile_segments(
            &connection,
            &pipeline,
            &key,
            as_of,
        )?))
    })
    .await
    .expect("a DuckDB job panicked");
    match lookup {
        Ok(Some(segments)) => {
            Json(json!({ "pipeline": name, "segments": segments })).into_response()
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such profile" })),
        )
            .into_response(),
        Err(err) => internal_error(&err),
    }
}

/// The answer for a request that failed: 409 with what became of the run's deltas for an
/// approval of a run with nothing held, 500 for anything else.
fn error_response(err: &anyhow::Error) -> Response {
    match err.downcast_ref::<ApproveError>() {
        Some(ApproveError::NothingHeld {
            message,
            activations,
        }) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": message, "activations": activations })),
        )
            .into_response(),
        Some(ApproveError::Outdated { message }) => {
            (StatusCode::CONFLICT, Json(json!({ "error": message }))).into_response()
        }
        _ => internal_error(err),
    }
}

fn internal_error(err: &anyhow::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({ "error": format!("{err:#}") })),
    )
        .into_response()
}

/// Hands a request to the pipeline's runner and waits for its answer.
async fn ask<T>(
    state: &AppState,
    name: &str,
    request: impl FnOnce(oneshot::Sender<anyhow::Result<T>>) -> Request,
) -> Result<T, Response> {
    let Some(sender) = state.requests.others.get(name) else {
        return Err(unknown_pipeline(name));
    };
    let (reply, answer) = oneshot::channel();
    if sender.send(request(reply)).await.is_err() {
        return Err(internal_error(&anyhow::anyhow!(
            "the pipeline's runner has stopped"
        )));
    }
    match answer.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(error_response(&err)),
        Err(_) => Err(internal_error(&anyhow::anyhow!(
            "the pipeline's runner has stopped"
        ))),
    }
}

#[derive(serde::Deserialize)]
struct ApproveQuery {
    activation: Option<String>,
}

async fn approve(
    State(state): State<AppState>,
    Path((name, run_id)): Path<(String, i64)>,
    Query(query): Query<ApproveQuery>,
) -> Response {
    let activation = query.activation;
    match ask(&state, &name, |reply| Request::Approve {
        run_id,
        activation,
        reply,
    })
    .await
    {
        Ok(delivered) => {
            Json(json!({ "pipeline": name, "run_id": run_id, "activations": delivered }))
                .into_response()
        }
        Err(response) => response,
    }
}

async fn plan(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match ask(&state, &name, |reply| Request::Plan { reply }).await {
        Ok(plan) => Json(plan).into_response(),
        Err(response) => response,
    }
}

async fn dead_letters(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    if !state.config.pipelines.contains_key(&name) {
        return unknown_pipeline(&name);
    }
    let store = Arc::clone(&state.store);
    let pipeline = name.clone();
    let result =
        crate::deliver::blocking(&store, move |c| crate::deliver::dead_letters(c, &pipeline)).await;
    match result {
        Ok(rows) => Json(json!({ "pipeline": name, "dead_letters": rows })).into_response(),
        Err(err) => internal_error(&err.into()),
    }
}

async fn retry_dead_letters(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<ApproveQuery>,
) -> Response {
    if !state.config.pipelines.contains_key(&name) {
        return unknown_pipeline(&name);
    }
    let store = Arc::clone(&state.store);
    let pipeline = name.clone();
    let result = crate::deliver::blocking(&store, move |c| {
        crate::deliver::retry_dead_letters(c, &pipeline, query.activation.as_deref())
    })
    .await;
    match result {
        Ok(released) => Json(json!({ "pipeline": name, "released": released })).into_response(),
        Err(err) => internal_error(&err.into()),
    }
}
