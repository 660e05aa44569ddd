//! Benchmark: one run of the real `segmentd` binary delivering a large audience, all adds, to
//! a fake Meta Custom Audiences endpoint on loopback.
//!
//! It measures the request rate the run sustains against the connection's configured
//! `rate_limit`, and the binary's peak resident memory next to DuckDB's `memory_limit`
//! (members are read from DuckDB one batch at a time, so memory beyond DuckDB's own stays
//! flat whatever the audience size). The fake endpoint checks every row is a SHA-256 digest
//! and keeps the audience, so the run is also checked to deliver every member once.
//!
//! ```sh
//! cargo build && cargo run --example meta_delivery -- [members] [requests_per_second]
//! ```
//!
//! Defaults: 1,000,000 members, 5 requests per second, 10,000 rows per request.

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};

/// Rows per request: Meta's maximum.
const BATCH_SIZE: usize = 10_000;
/// DuckDB's memory limit for the run.
const MEMORY_LIMIT_MB: u64 = 1024;

/// What the fake endpoint saw.
#[derive(Default)]
struct Seen {
    /// Digests added.
    audience: HashSet<String>,
    /// Rows received, repeats included.
    rows: usize,
    /// When each request arrived.
    arrivals: Vec<Instant>,
    /// Rows that were not SHA-256 digests.
    malformed: usize,
    /// Bodies checked so far.
    kept: usize,
}

/// Answers at once, the way a platform acknowledges a request before processing it; the rows
/// are checked and kept by [`keep`] on another task, so the fake's own parsing (unoptimised in
/// a debug build) does not slow the client down.
async fn users(
    State(fake): State<Fake>,
    Path((_version, audience_id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> (StatusCode, axum::Json<Value>) {
    fake.seen.lock().unwrap().arrivals.push(Instant::now());
    // `{"payload": {"schema": ["EMAIL"], "data": [["<digest>"], ...]}}`: one `[` for the
    // schema, one for the data and one per row; digests hold no brackets.
    let rows = body
        .iter()
        .filter(|b| **b == b'[')
        .count()
        .saturating_sub(2);
    fake.bodies.send(body).expect("the keeper runs");
    let answer = json!({
        "audience_id": audience_id,
        "num_received": rows,
        "num_invalid_entries": 0,
        "invalid_entry_samples": {},
    });
    (StatusCode::OK, axum::Json(answer))
}

/// Parses each body received and keeps its rows.
async fn keep(
    seen: Arc<Mutex<Seen>>,
    mut bodies: tokio::sync::mpsc::UnboundedReceiver<axum::body::Bytes>,
) {
    while let Some(body) = bodies.recv().await {
        let body: Value = serde_json::from_slice(&body).expect("a JSON body");
        let data = body["payload"]["data"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut seen = seen.lock().unwrap();
        seen.rows += data.len();
        for row in &data {
            let digest = row[0].as_str().unwrap_or_default();
            if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                seen.audience.insert(digest.to_string());
            } else {
                seen.malformed += 1;
            }
        }
        seen.kept += 1;
    }
}

/// The fake endpoint's state.
#[derive(Clone)]
struct Fake {
    /// What it saw.
    seen: Arc<Mutex<Seen>>,
    /// Bodies waiting to be checked.
    bodies: tokio::sync::mpsc::UnboundedSender<axum::body::Bytes>,
}

/// The largest resident set any waited-for child reached, in bytes.
fn children_peak_rss() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_CHILDREN is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr());
        usage.assume_init()
    };
    u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
}

fn main() {
    let mut args = std::env::args().skip(1);
    let members: usize = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("members"));
    let rate: f64 = args
        .next()
        .map_or(5.0, |a| a.parse().expect("requests per second"));

    let binary = std::env::current_exe()
        .expect("the example's path")
        .parent()
        .and_then(|examples| examples.parent())
        .expect("target/<profile>/examples")
        .join("segmentd");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build` first",
        binary.display()
    );

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("a loopback port");
    let address = listener.local_addr().expect("an address");
    let (bodies, received) = tokio::sync::mpsc::unbounded_channel();
    runtime.spawn(keep(Arc::clone(&seen), received));
    let app = axum::Router::new()
        .route("/{version}/{audience}/users", post(users))
        .with_state(Fake {
            seen: Arc::clone(&seen),
            bodies,
        });
    runtime.spawn(async move { axum::serve(listener, app).await.expect("the fake endpoint") });

    let dir = tempfile::tempdir().expect("a temporary folder");
    let write = |path: &str, text: &str| {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    let mut people = String::with_capacity(members * 32);
    people.push_str("id,email\n");
    for id in 1..=members {
        people.push_str(&format!("{id},Person.{id}@Example.com\n"));
    }
    write("pipelines/bench/people.csv", &people);
    drop(people);
    write(
        "config.toml",
        &format!(
            "[duckdb]\nmemory_limit = \"{MEMORY_LIMIT_MB}MB\"\nthreads = 2\n\n\
             [connections.meta]\ntype = \"meta\"\naccess_token_env = \"BENCH_META_TOKEN\"\n\
             base_url = \"http://{address}\"\nbatch_size = {BATCH_SIZE}\n\n\
             [connections.meta.rate_limit]\nrequests_per_second = {rate}\n"
        ),
    );
    write(
        "pipelines/bench/pipeline.toml",
        "as_of = \"2024-06-30 12:00:00\"\n\n[sources.people]\nformat = \"csv\"\n\
         path = \"people.csv\"\ncolumns = { id = \"BIGINT\", email = \"VARCHAR\" }\n\n\
         [master]\nkey = \"id\"\nsource = \"people\"\n\
         columns = { id = \"BIGINT\", email = \"VARCHAR\" }\n",
    );
    write(
        "pipelines/bench/segments/everyone.toml",
        "[[activations]]\nname = \"audience\"\nconnection = \"meta\"\nidentifiers = [\"email\"]\n\
         [activations.settings]\naudience_id = \"23851234567890123\"\n",
    );

    println!(
        "delivering {members} adds at {rate} requests/s, {BATCH_SIZE} rows per request, \
         DuckDB memory_limit {MEMORY_LIMIT_MB} MB"
    );
    let started = Instant::now();
    let output = Command::new(&binary)
        .args([
            "--config",
            &dir.path().join("config.toml").to_string_lossy(),
        ])
        .args(["refresh", "bench", "--json"])
        .env("BENCH_META_TOKEN", "EAAB-bench-token")
        .env("SEGMENTD_LOG", "warn")
        .output()
        .expect("segmentd runs");
    let wall = started.elapsed();
    let peak = children_peak_rss();
    assert!(
        output.status.success(),
        "segmentd failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // Let the keeper check every body before reading what it kept.
    loop {
        let seen = seen.lock().unwrap();
        if seen.kept == seen.arrivals.len() {
            break;
        }
        drop(seen);
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = seen.lock().unwrap();
    let requests = seen.arrivals.len();
    let span = match (seen.arrivals.first(), seen.arrivals.last()) {
        (Some(first), Some(last)) => last.duration_since(*first),
        _ => Duration::ZERO,
    };
    // N requests spaced at the rate take N - 1 periods from the first to the last.
    let sustained = if requests > 1 {
        (requests - 1) as f64 / span.as_secs_f64()
    } else {
        0.0
    };
    let beyond_duckdb = peak.saturating_sub(MEMORY_LIMIT_MB << 20);
    println!("run wall time            {:.1} s", wall.as_secs_f64());
    println!("requests                 {requests}");
    println!(
        "rows received            {} ({} distinct, {} malformed)",
        seen.rows,
        seen.audience.len(),
        seen.malformed
    );
    println!("delivery span            {:.1} s", span.as_secs_f64());
    println!(
        "sustained request rate   {sustained:.2} /s ({:.1} % of {rate})",
        100.0 * sustained / rate
    );
    println!("peak resident memory     {} MB", peak >> 20);
    println!("beyond DuckDB's limit    {} MB", beyond_duckdb >> 20);

    let mut failed = Vec::new();
    if seen.audience.len() != members || seen.malformed > 0 {
        failed.push("the endpoint did not receive every member exactly as digests");
    }
    if sustained < 0.9 * rate {
        failed.push("the sustained rate is under 90 % of the configured rate");
    }
    if beyond_duckdb > 300 << 20 {
        failed.push("peak memory beyond DuckDB's limit is over 300 MB");
    }
    if failed.is_empty() {
        println!("targets met");
    } else {
        for failure in &failed {
            println!("target missed: {failure}");
        }
        std::process::exit(1);
    }
}
