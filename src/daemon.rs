//! The daemon: one runner task per pipeline, the scheduler, and the HTTP API.
//!
//! Each pipeline has one runner task that owns its runs, so two runs of a pipeline never
//! overlap. Triggers (schedule ticks and `POST /pipelines/{name}/runs`) go to the runner
//! through a channel that holds one waiting request: a trigger that arrives while one is
//! already waiting is coalesced into it. DuckDB work happens on blocking threads, so the API
//! answers during a long refresh.
//!
//! Routes: `GET /health`; `POST /pipelines/{name}/runs` (202, queued or coalesced);
//! `GET /pipelines/{name}/runs/latest`; `GET /pipelines/{name}/profiles/{key}` (the segments a
//! profile belongs to now, by the same SQL as the bulk evaluation).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runner::{self, RunSummary};
use crate::store::Store;

/// Where triggers for each pipeline's runner go.
#[derive(Clone)]
pub struct RunRequests {
    senders: Arc<BTreeMap<String, mpsc::Sender<String>>>,
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
        let Some(sender) = self.senders.get(pipeline) else { return Triggered::UnknownPipeline };
        match sender.try_send(trigger.to_string()) {
            Ok(()) => Triggered::Queued,
            Err(_) => {
                tracing::info!(pipeline, trigger, "a run is already waiting; trigger coalesced");
                Triggered::Coalesced
            }
        }
    }
}

#[derive(Default)]
struct PipelineStatus {
    running: bool,
    last: Option<RunSummary>,
}

#[derive(Clone)]
struct AppState {
    config: Arc<Config>,
    store: Arc<Store>,
    requests: RunRequests,
    status: Arc<Mutex<BTreeMap<String, PipelineStatus>>>,
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn serve(config: Config, store: Arc<Store>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let status: Arc<Mutex<BTreeMap<String, PipelineStatus>>> = Arc::default();
    let mut senders = BTreeMap::new();
    let mut runners = Vec::new();

    for name in config.pipelines.keys() {
        let interrupted = {
            let name = name.clone();
            crate::deliver::blocking(&store, move |c| crate::store::close_interrupted_runs(c, &name))
                .await?
        };
        if interrupted > 0 {
            tracing::warn!(pipeline = %name, runs = interrupted, "runs interrupted by a stop are marked interrupted; the next run re-plans from the acknowledged state");
        }
        let (sender, receiver) = mpsc::channel::<String>(1);
        senders.insert(name.clone(), sender);
        status.lock().expect("status lock").insert(name.clone(), PipelineStatus::default());
        runners.push(tokio::spawn(runner_task(
            name.clone(),
            Arc::clone(&config),
            Arc::clone(&store),
            receiver,
            Arc::clone(&status),
            shutdown.clone(),
        )));
    }
    let requests = RunRequests { senders: Arc::new(senders) };

    let schedules: Vec<(String, String)> = config
        .pipelines
        .values()
        .filter_map(|p| p.schedule.clone().map(|s| (p.name.clone(), s)))
        .collect();
    let mut scheduler = crate::scheduler::start(schedules, requests.clone()).await?;

    let state = AppState { config: Arc::clone(&config), store, requests, status };
    let app = axum::Router::new()
        .route("/health", get(health))
        .route("/pipelines/{name}/runs", post(trigger_run))
        .route("/pipelines/{name}/runs/latest", get(latest_run))
        .route("/pipelines/{name}/profiles/{key}", get(profile))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(config.daemon.listen).await.map_err(|err| {
        anyhow::anyhow!("cannot listen on {}: {err}", config.daemon.listen)
    })?;
    tracing::info!(listen = %listener.local_addr()?, "http api listening");

    let stop = shutdown.clone();
    axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await?;
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
    mut receiver: mpsc::Receiver<String>,
    status: Arc<Mutex<BTreeMap<String, PipelineStatus>>>,
    shutdown: CancellationToken,
) {
    loop {
        let trigger = tokio::select! {
            _ = shutdown.cancelled() => break,
            trigger = receiver.recv() => match trigger {
                Some(trigger) => trigger,
                None => break,
            },
        };
        let pipeline = &config.pipelines[&name];
        set_running(&status, &name, true, None);
        // A run in progress finishes its current step; shutdown waits for it.
        let result = runner::run(Arc::clone(&store), &config, pipeline, &trigger, None).await;
        match result {
            Ok(summary) => set_running(&status, &name, false, Some(summary)),
            Err(err) => {
                tracing::error!(pipeline = %name, error = %format!("{err:#}"), "run could not be carried out");
                set_running(&status, &name, false, None);
            }
        }
    }
}

fn set_running(
    status: &Mutex<BTreeMap<String, PipelineStatus>>,
    name: &str,
    running: bool,
    last: Option<RunSummary>,
) {
    let mut status = status.lock().expect("status lock");
    let entry = status.entry(name.to_string()).or_default();
    entry.running = running;
    if last.is_some() {
        entry.last = last;
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

fn unknown_pipeline(name: &str) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": format!("no pipeline `{name}`") }))).into_response()
}

async fn trigger_run(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.requests.trigger(&name, "http") {
        Triggered::UnknownPipeline => unknown_pipeline(&name),
        triggered => {
            let word = if triggered == Triggered::Queued { "queued" } else { "coalesced" };
            (StatusCode::ACCEPTED, Json(json!({ "pipeline": name, "status": word }))).into_response()
        }
    }
}

async fn latest_run(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let status = state.status.lock().expect("status lock");
    match status.get(&name) {
        None => unknown_pipeline(&name),
        Some(entry) => Json(json!({
            "pipeline": name,
            "running": entry.running,
            "last_run": entry.last,
        }))
        .into_response(),
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
        Ok(Some(crate::evaluate::profile_segments(&connection, &pipeline, &key, as_of)?))
    })
    .await
    .expect("a DuckDB job panicked");
    match lookup {
        Ok(Some(segments)) => Json(json!({ "pipeline": name, "segments": segments })).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, Json(json!({ "error": "no such profile" }))).into_response(),
        Err(err) => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": format!("{err:#}") })))
                .into_response()
        }
    }
}
