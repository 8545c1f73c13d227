//! Dispatch benchmark: N workers, each a real gRPC client on its own connection, drain M no-op
//! tasks through the full lifecycle (claim → assignment over the stream → heartbeat → complete)
//! against a controller on loopback and the local Postgres.
//!
//! Prints tasks/s, dispatch latency (slot freed → next assignment received, under load; and
//! task committed → assignment received, at low load) and Postgres transactions per task from
//! `pg_stat_database`.
//!
//! `cargo bench --bench dispatch -- [--workers N] [--slots S] [--tasks M]`; needs DATABASE_URL
//! (an admin connection) or a server on 127.0.0.1:5432.

mod common;

use common::arg;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flywheel_orchestrator::{ControllerConfig, auth, store};
use flywheel_proto::v1::{
    Capabilities, CompleteTaskRequest, HeartbeatRequest, RegisterRequest, TaskProgress,
};
use flywheel_proto::{ControlClient, WorkerClient, connect_channel};
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;

fn spec(tasks: usize) -> String {
    format!(
        "apiVersion: flywheel/v1
name: dispatch-bench
models: {{ generator: {{ uri: \"none://g\" }}, base: {{ uri: \"none://b\" }}, reward: {{ uri: \"none://r\" }} }}
rounds: 1
defaults: {{ pool: bench, backend: noop }}
recipe:
  stages:
    - {{ name: noop, kind: custom, shards: {tasks} }}
"
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn xacts(url: &str, db: &str) -> (i64, i64) {
    // Cumulative statistics are flushed by each backend at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_as("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1")
        .bind(db)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// A bench worker: runs every assignment as a no-op (heartbeat, then complete), concurrently.
/// Records, per assignment, the time since the slot it fills was freed.
async fn worker(
    addr: String,
    token: String,
    slots: u32,
    receipts: Arc<Mutex<Vec<(String, SystemTime)>>>,
    received: mpsc::UnboundedSender<Instant>,
) {
    let channel = connect_channel(&addr).await.unwrap();
    let mut client = WorkerClient::new(channel, &token).unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    client
        .register(RegisterRequest {
            worker_id: id.clone(),
            name: "bench".into(),
            capabilities: Some(Capabilities {
                pool: "bench".into(),
                backends: vec!["noop".into()],
                ..Default::default()
            }),
            slots,
            running: vec![],
        })
        .await
        .unwrap();
    let mut stream = client.stream_assignments(id.clone()).await.unwrap();
    loop {
        let a = match stream.message().await {
            Ok(Some(a)) => a,
            Ok(None) => panic!("bench worker {id}: assignment stream ended"),
            Err(e) => panic!("bench worker {id}: assignment stream failed: {e}"),
        };
        let _ = received.send(Instant::now());
        receipts
            .lock()
            .unwrap()
            .push((a.task_id.clone(), SystemTime::now()));
        let mut c = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let beat = HeartbeatRequest {
                worker_id: id.clone(),
                tasks: vec![TaskProgress {
                    task_id: a.task_id.clone(),
                    attempt: a.attempt,
                    progress: 0.5,
                    ..Default::default()
                }],
            };
            let _ = c.heartbeat(beat).await;
            let done = CompleteTaskRequest {
                worker_id: id,
                task_id: a.task_id,
                attempt: a.attempt,
                ..Default::default()
            };
            // Errors only happen when the benchmark shuts the controller down.
            let _ = c.complete_task(done).await;
        });
    }
}

#[tokio::main]
async fn main() {
    let workers = arg("--workers", 8);
    let slots = arg("--slots", 64) as u32;
    let tasks = arg("--tasks", 20_000);
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db = format!("fw_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .expect("connect to Postgres (DATABASE_URL)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);

    let pool = store::connect(&url, 8).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let admin_token = auth::create_token(&pool, "bench-admin", auth::Scope::Admin)
        .await
        .unwrap();
    let worker_token = auth::create_token(&pool, "bench-worker", auth::Scope::Worker)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(&db);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(flywheel_orchestrator::serve(
        pool.clone(),
        ControllerConfig::new(dir.display().to_string()),
        listener,
        async move {
            let _ = stop_rx.await;
        },
    ));

    let receipts = Arc::new(Mutex::new(Vec::new()));
    let (rx_tx, mut rx) = mpsc::unbounded_channel();
    let mut worker_tasks = Vec::new();
    for _ in 0..workers {
        worker_tasks.push(tokio::spawn(worker(
            addr.clone(),
            worker_token.clone(),
            slots,
            receipts.clone(),
            rx_tx.clone(),
        )));
    }
    let mut control = ControlClient::connect(&addr, &admin_token).await.unwrap();
    // Let the workers connect before the work arrives.
    while control
        .list_workers()
        .await
        .unwrap()
        .iter()
        .filter(|w| w.status == "online")
        .count()
        < workers
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Phase 1: throughput under load.
    let before = xacts(&url, &db).await;
    let start = Instant::now();
    let campaign = control.create_campaign(spec(tasks)).await.unwrap();
    let enqueued = start.elapsed();
    let drain = Instant::now();
    for _ in 0..tasks {
        rx.recv().await.unwrap();
    }
    loop {
        let c = control
            .get_campaign(campaign.id.clone())
            .await
            .unwrap()
            .campaign
            .unwrap();
        if c.status == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = drain.elapsed();
    let after = xacts(&url, &db).await;
    // Claim (the claiming transaction's start, tasks.started_at) to receipt by the worker.
    let receipts = std::mem::take(&mut *receipts.lock().unwrap());
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let claimed: std::collections::HashMap<String, chrono::DateTime<chrono::Utc>> =
        sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>)>(
            "SELECT id::text, started_at FROM tasks WHERE started_at IS NOT NULL",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut lat: Vec<Duration> = receipts
        .iter()
        .filter_map(|(id, at)| {
            let at: chrono::DateTime<chrono::Utc> = (*at).into();
            (at - *claimed.get(id)?).to_std().ok()
        })
        .collect();
    lat.sort();

    // Phase 2: latency at low load, one task at a time.
    let samples = 50;
    let mut low = Vec::new();
    for _ in 0..samples {
        control.create_campaign(spec(1)).await.unwrap();
        let committed = Instant::now();
        let got = rx.recv().await.unwrap();
        low.push(got.saturating_duration_since(committed));
    }
    low.sort();

    let commits = (after.0 - before.0) as f64;
    let rollbacks = (after.1 - before.1) as f64;
    println!(
        "dispatch benchmark: {workers} workers x {slots} slots over gRPC, {tasks} no-op tasks"
    );
    println!(
        "  enqueue (CreateCampaign with {tasks} tasks): {:.0} ms",
        enqueued.as_secs_f64() * 1e3
    );
    println!(
        "  drain: {:.2} s  ->  {:.0} tasks/s (claim, assignment, heartbeat, complete)",
        elapsed.as_secs_f64(),
        tasks as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  dispatch latency under load (claim transaction -> assignment received): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  dispatch latency at low load (task committed -> assignment received, {samples} samples): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&low, 0.5).as_secs_f64() * 1e3,
        percentile(&low, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  postgres transactions: {commits:.0} commits + {rollbacks:.0} rollbacks = {:.3} per task (all controller traffic, incl. planner ticks)",
        (commits + rollbacks) / tasks as f64
    );

    for w in worker_tasks {
        w.abort();
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    pool.close().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
    let _ = std::fs::remove_dir_all(dir);
}
