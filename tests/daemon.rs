//! The daemon through its HTTP API: health, a manual trigger, the run's result and a profile
//! look-up, against the real binary.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Project;

const PIPELINE: &str = r#"
time_zone = "UTC"
as_of = "2024-06-30 12:00:00"

[sources.people]
format = "jsonl"
path = "people.jsonl"
columns = { id = "VARCHAR", country = "VARCHAR", visits = "INTEGER" }

[master]
key = "id"
source = "people"
columns = { id = "VARCHAR", country = "VARCHAR", visits = "INTEGER" }
"#;

const PEOPLE: &str = r#"{"id": "a", "country": "FR", "visits": 3}
{"id": "b", "country": "DE", "visits": 12}
{"id": "c", "country": "FR", "visits": 40}
"#;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn a_manual_trigger_runs_the_pipeline_and_profiles_can_be_looked_up() {
    let project = Project::new();
    let port = free_port();
    let config = std::fs::read_to_string(project.path("config.toml")).unwrap();
    project.write(
        "config.toml",
        &format!("{config}\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    project.write("pipelines/web/pipeline.toml", PIPELINE);
    project.write("pipelines/web/people.jsonl", PEOPLE);
    project.write(
        "pipelines/web/segments/french.toml",
        "[rule]\nattribute = \"country\"\nop = \"=\"\nvalue = \"FR\"\n\n[[activations]]\nname = \"export\"\nconnection = \"exports\"\n",
    );
    project.write(
        "pipelines/web/segments/frequent/french_regulars.toml",
        "[rule]\nall = [{ segment = \"french\" }, { attribute = \"visits\", op = \">=\", value = 10 }]\n",
    );

    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_segmentd"))
            .arg("run")
            .current_dir(project.dir.path())
            .env("SEGMENTD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    let started = Instant::now();
    loop {
        if let Ok(response) = client.get(format!("{base}/health")).send().await {
            assert_eq!(response.status().as_u16(), 200);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon answers /health"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let unknown = client
        .post(format!("{base}/pipelines/nope/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);

    let triggered = client
        .post(format!("{base}/pipelines/web/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(triggered.status().as_u16(), 202);
    let body: serde_json::Value = triggered.json().await.unwrap();
    assert_eq!(body["status"], "queued");

    let summary = loop {
        let (status, body) = get_json(&client, &format!("{base}/pipelines/web/runs/latest")).await;
        assert_eq!(status, 200);
        if !body["last_run"].is_null() && body["running"] == false {
            break body["last_run"].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run finishes: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(summary["status"], "succeeded", "{summary}");
    assert_eq!(summary["trigger"], "http");
    assert_eq!(common::segment_size(&summary, "french"), 2);
    assert_eq!(
        common::segment_size(&summary, "frequent/french_regulars"),
        1
    );
    assert_eq!(
        common::activation(&summary, "french/export")["delivered_adds"],
        2
    );

    let (status, body) = get_json(&client, &format!("{base}/pipelines/web/profiles/c")).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["segments"],
        serde_json::json!(["french", "frequent/french_regulars"])
    );
    let (status, body) = get_json(&client, &format!("{base}/pipelines/web/profiles/b")).await;
    assert_eq!(
        (status, body["segments"].clone()),
        (200, serde_json::json!([]))
    );
    let (status, _) = get_json(&client, &format!("{base}/pipelines/web/profiles/zz")).await;
    assert_eq!(status, 404);
}
