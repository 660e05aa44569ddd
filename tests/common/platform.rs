//! A fake destination platform on loopback that speaks the `webhook` connector's protocol and
//! keeps the audience it was sent: adds insert keys, removes delete them, and the batches of a
//! replace are kept aside per session until its last batch makes them the whole audience.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;

/// What the fake platform holds and how it behaves.
#[derive(Default)]
pub struct Platform {
    /// The audience: keys added and not removed since.
    pub audience: BTreeSet<String>,
    /// How many times each key was accepted as an add.
    pub adds: BTreeMap<String, u32>,
    /// Keys it always rejects.
    pub rejects: BTreeSet<String>,
    /// Keys it rejects in removes only.
    pub rejected_removes: BTreeSet<String>,
    /// How long it takes to answer each request.
    pub delay: Duration,
    /// Requests answered.
    pub requests: usize,
    /// Requests that arrived, answered or not yet.
    pub arrivals: usize,
    /// Keys received in each replace session that has not had its last batch yet.
    pub sessions: BTreeMap<u64, BTreeSet<String>>,
    /// Replaces completed.
    pub replaces: usize,
    /// The audience's size after each request, in order.
    pub sizes: Vec<usize>,
    /// Batch sequences it answers with HTTP 500 instead of taking them.
    pub failing_sequences: BTreeSet<u64>,
}

async fn receive(
    State(platform): State<Arc<Mutex<Platform>>>,
    body: axum::Json<serde_json::Value>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let delay = {
        let mut platform = platform.lock().unwrap();
        platform.arrivals += 1;
        platform.delay
    };
    tokio::time::sleep(delay).await;
    let mut platform = platform.lock().unwrap();
    platform.requests += 1;
    let sequence = body["sequence"].as_u64().unwrap();
    if platform.failing_sequences.contains(&sequence) {
        let size = platform.audience.len();
        platform.sizes.push(size);
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({ "error": "unavailable" })),
        );
    }
    let change = body["change"].as_str().unwrap().to_string();
    let session = body["replace"]["session"].as_u64();
    let mut rejected = Vec::new();
    for member in body["members"].as_array().unwrap() {
        let key = member["key"].as_str().unwrap().to_string();
        if platform.rejects.contains(&key)
            || (change == "remove" && platform.rejected_removes.contains(&key))
        {
            rejected.push(serde_json::json!({ "key": key, "reason": "invalid address" }));
            continue;
        }
        match (change.as_str(), session) {
            ("add", _) => {
                *platform.adds.entry(key.clone()).or_default() += 1;
                platform.audience.insert(key);
            }
            ("remove", _) => {
                platform.audience.remove(&key);
            }
            ("replace", Some(session)) => {
                platform.sessions.entry(session).or_default().insert(key);
            }
            other => panic!("a batch the webhook protocol does not have: {other:?}"),
        }
    }
    if let Some(session) = session {
        let batches = body["replace"]["batches"].as_u64().unwrap();
        if sequence + 1 == batches {
            platform.audience = platform.sessions.remove(&session).unwrap_or_default();
            platform.replaces += 1;
        }
    }
    let size = platform.audience.len();
    platform.sizes.push(size);
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "rejected": rejected })),
    )
}

/// A running fake platform: its state and the URL to post to.
pub struct FakePlatform {
    pub state: Arc<Mutex<Platform>>,
    pub url: String,
    _runtime: tokio::runtime::Runtime,
}

impl FakePlatform {
    /// Starts the server on a free loopback port.
    pub fn start() -> FakePlatform {
        let state = Arc::new(Mutex::new(Platform::default()));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/audience", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/audience", post(receive))
            .with_state(Arc::clone(&state));
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakePlatform {
            state,
            url,
            _runtime: runtime,
        }
    }

    /// The audience, sorted.
    pub fn audience(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .audience
            .iter()
            .cloned()
            .collect()
    }

    /// config.toml with one `webhook` connection called `platform` pointing here.
    pub fn config(&self, batch_size: usize) -> String {
        format!(
            "[connections.platform]\ntype = \"webhook\"\nurl = \"{}\"\n\
             batch_size = {batch_size}\n\n\
             [connections.platform.retry]\ninitial_delay_seconds = 0.05\nmax_attempts = 3\n",
            self.url
        )
    }
}
