//! A `webhook` activation end to end: the real binary delivers to a server on loopback that
//! fails first, and the acknowledged state advances only for what the server accepted.

mod common;

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use common::{Project, activation};

const PIPELINE: &str = r#"
time_zone = "UTC"
as_of = "2024-06-30 12:00:00"

[sources.people]
format = "parquet"
path = "people.parquet"
columns = { id = "BIGINT", email = "VARCHAR", country = "VARCHAR" }

[master]
key = "id"
source = "people"
columns = { id = "BIGINT", email = "VARCHAR", country = "VARCHAR" }
"#;

#[derive(Default)]
struct Received {
    /// Status codes to answer before answering normally.
    failures: Vec<u16>,
    /// Every request body, in order.
    bodies: Vec<serde_json::Value>,
    /// Keys to reject in the next successful answer.
    reject: Vec<String>,
}

async fn receive(
    State(state): State<Arc<Mutex<Received>>>,
    body: axum::Json<serde_json::Value>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let mut state = state.lock().unwrap();
    state.bodies.push(body.0);
    if !state.failures.is_empty() {
        let status = state.failures.remove(0);
        return (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(serde_json::json!({})),
        );
    }
    let rejected: Vec<serde_json::Value> = std::mem::take(&mut state.reject)
        .into_iter()
        .map(|key| serde_json::json!({ "key": key, "reason": "address bounced" }))
        .collect();
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "rejected": rejected })),
    )
}

/// Writes people.parquet with DuckDB, through a throw-away database.
fn write_people(project: &Project, rows: &str) {
    let store = segmentd::store::Store::open(&project.path("scratch.duckdb"), "1GB", 1).unwrap();
    let target = project.path("pipelines/crm/people.parquet");
    store
        .connection()
        .unwrap()
        .execute_batch(&format!(
            "COPY (SELECT * FROM (VALUES {rows}) AS t(id, email, country)) \
             TO '{}' (FORMAT parquet)",
            target.display()
        ))
        .unwrap();
}

fn sent_keys(body: &serde_json::Value) -> Vec<String> {
    body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn webhook_delivery_retries_and_acknowledges_only_what_was_accepted() {
    let state = Arc::new(Mutex::new(Received {
        failures: vec![503],
        ..Default::default()
    }));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .route("/hook", post(receive))
        .with_state(Arc::clone(&state));
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });

    let project = Project::new();
    project.write(
        "config.toml",
        &format!(
            "[connections.crm]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{port}/hook\"\n\n\
             [connections.crm.retry]\ninitial_delay_seconds = 0.05\nmax_attempts = 3\n"
        ),
    );
    project.write("pipelines/crm/pipeline.toml", PIPELINE);
    project.write(
        "pipelines/crm/segments/french.toml",
        // The audience is tiny, so one removal is half of it: the removal brake is opened.
        "[rule]\nattribute = \"country\"\nop = \"=\"\nvalue = \"FR\"\n\n[[activations]]\n\
         name = \"sync\"\nconnection = \"crm\"\nidentifiers = [\"email\"]\n\
         max_removal_share = 1.0\n",
    );
    write_people(
        &project,
        "(1, 'ann@example.com', 'FR'), (2, 'bob@example.com', 'DE'), (3, 'cy@example.com', 'FR')",
    );
    state.lock().unwrap().reject = vec!["3".into()];

    // First run: 503, then accepted with member 3 rejected.
    let (ok, first, stderr) = project.refresh("crm");
    assert!(ok, "{stderr}\n{first}");
    let entry = activation(&first, "french/sync");
    assert_eq!(
        (entry["adds"].as_i64(), entry["delivered_adds"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(entry["rejected"], 1);
    {
        let received = state.lock().unwrap();
        assert_eq!(received.bodies.len(), 2, "one failed attempt, one accepted");
        assert_eq!(
            received.bodies[0], received.bodies[1],
            "the retry sends the same batch"
        );
        assert_eq!(sent_keys(&received.bodies[1]), ["1", "3"]);
        assert_eq!(received.bodies[1]["change"], "add");
        assert_eq!(
            received.bodies[1]["members"][0]["identifiers"]["email"],
            "ann@example.com"
        );
    }

    // Second run: the rejected member was never acknowledged, so it is offered again.
    let (ok, second, stderr) = project.refresh("crm");
    assert!(ok, "{stderr}");
    let entry = activation(&second, "french/sync");
    assert_eq!(
        (entry["adds"].as_i64(), entry["removes"].as_i64()),
        (Some(1), Some(0))
    );
    assert_eq!(
        sent_keys(state.lock().unwrap().bodies.last().unwrap()),
        ["3"]
    );

    // Ann moves to Germany and changes her email: she is removed by the email she was sent with.
    write_people(
        &project,
        "(1, 'ann@new.example', 'DE'), (2, 'bob@example.com', 'DE'), (3, 'cy@example.com', 'FR')",
    );
    let (ok, third, stderr) = project.refresh("crm");
    assert!(ok, "{stderr}");
    let entry = activation(&third, "french/sync");
    assert_eq!(
        (entry["adds"].as_i64(), entry["removes"].as_i64()),
        (Some(0), Some(1))
    );
    let received = state.lock().unwrap();
    let last = received.bodies.last().unwrap();
    assert_eq!(last["change"], "remove");
    assert_eq!(sent_keys(last), ["1"]);
    assert_eq!(
        last["members"][0]["identifiers"]["email"],
        "ann@example.com"
    );
}
