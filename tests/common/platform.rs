//! A fake destination platform on loopback that speaks the `webhook` connector's protocol and
//! keeps the audience it was sent: adds insert keys, removes delete them.

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
    /// How long it takes to answer each request.
    pub delay: Duration,
    /// Requests received.
    pub requests: usize,
}

async fn receive(
    State(platform): State<Arc<Mutex<Platform>>>,
    body: axum::Json<serde_json::Value>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let delay = platform.lock().unwrap().delay;
    tokio::time::sleep(delay).await;
    let mut platform = platform.lock().unwrap();
    platform.requests += 1;
    let add = body["change"] == "add";
    let mut rejected = Vec::new();
    for member in body["members"].as_array().unwrap() {
        let key = member["key"].as_str().unwrap().to_string();
        if platform.rejects.contains(&key) {
            rejected.push(serde_json::json!({ "key": key, "reason": "invalid address" }));
        } else if add {
            *platform.adds.entry(key.clone()).or_default() += 1;
            platform.audience.insert(key);
        } else {
            platform.audience.remove(&key);
        }
    }
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
            "[connections.platform]\ntype = \"webhook\"\nurl = \"{}\"\nbatch_size = {batch_size}\n\n\
             [connections.platform.retry]\ninitial_delay_seconds = 0.05\nmax_attempts = 3\n",
            self.url
        )
    }
}
