//! Dispatch benchmark: N workers, each a real gRPC client on its own connection, drain M no-op
//! tasks through the full lifecycle (claim → assignment over the stream → heartbeat → complete,
//! reported as the worker agent reports: per worker one heartbeat `Report` and one results
//! `Report` at a time, each carrying all that happened meanwhile) against a controller on
//! loopback and the local Postgres.
//!
//! Prints tasks/s (assignments received after the last campaign was created, over the time
//! from then until every campaign succeeded), dispatch latency (claim → assignment received,
//! under load; task committed → assignment received, at low load), stage handoff latency (a
//! stage's last shard committed → its successor's first assignment received; idle, and while
//! another campaign drains) and Postgres transactions per task from `pg_stat_database`.
//!
//! With `--peer graphile`, each run is followed by graphile-worker 0.18's drain of as many
//! no-op jobs with its "fast" preset against the same Postgres (installed from npm into
//! `target/bench-peer/` with the machine's Node on first use; `benches/peer/graphile_drain.js`),
//! and the ratio is printed. `--runs R` interleaves R runs of each.
//!
//! `cargo bench --bench dispatch -- [--workers N] [--slots S] [--tasks M] [--runs R]
//! [--peer graphile]`; needs DATABASE_URL (an admin connection) or a server on 127.0.0.1:5432.

mod common;

use common::arg;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flywheel_orchestrator::{ControllerConfig, auth, store};
use flywheel_proto::v1::{
    Capabilities, RegisterRequest, ReportRequest, TaskCompletion, TaskProgress,
};
use flywheel_proto::{ControlClient, WorkerClient, connect_channel};
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;

fn spec(tasks: usize) -> String {
    campaign(
        "bench",
        &format!("    - {{ name: noop, kind: custom, shards: {tasks} }}\n"),
    )
}

/// A round holds at most this many tasks (`limits::MAX_TASKS_PER_ROUND`): more take several
/// campaigns.
const ROUND_LIMIT: usize = flywheel_orchestrator::limits::MAX_TASKS_PER_ROUND as usize;

/// Creates campaigns holding `tasks` no-op tasks in all; returns their ids.
async fn enqueue(control: &mut ControlClient, tasks: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut left = tasks;
    while left > 0 {
        let n = left.min(ROUND_LIMIT);
        ids.push(control.create_campaign(spec(n)).await.unwrap().id);
        left -= n;
    }
    ids
}

/// Two one-shard stages, the second needing the first, on the `chain` pool's own worker.
fn chain_spec() -> String {
    campaign(
        "chain",
        "    - { name: a, kind: custom }\n    - { name: b, kind: custom, needs: [a] }\n",
    )
}

fn campaign(pool: &str, stages: &str) -> String {
    format!(
        "apiVersion: flywheel/v1
name: dispatch-bench
models: {{ generator: {{ uri: \"none://g\" }}, base: {{ uri: \"none://b\" }}, reward: {{ uri: \"none://r\" }} }}
rounds: 1
defaults: {{ pool: {pool}, backend: test }}
recipe:
  stages:
{stages}"
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
    pool: &'static str,
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
                pool: pool.into(),
                backends: vec!["test".into()],
                ..Default::default()
            }),
            slots,
            running: vec![],
        })
        .await
        .unwrap();
    let mut stream = client.stream_assignments(id.clone()).await.unwrap();
    // Reports go as the worker agent sends them: heartbeats and results each in their own
    // `Report`, one of each in flight at a time, each carrying everything that happened
    // meanwhile. A task's heartbeat goes in one report and, once answered, its completion in
    // a results report, so that both are written.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, i32)>();
    let (beaten_tx, mut beaten_rx) = mpsc::unbounded_channel::<(String, i32)>();
    let mut results_client = client.clone();
    let results_id = id.clone();
    let results = tokio::spawn(async move {
        let mut beaten = Vec::new();
        while beaten_rx.recv_many(&mut beaten, 1024).await > 0 {
            let request = ReportRequest {
                worker_id: results_id.clone(),
                completions: beaten
                    .drain(..)
                    .map(|(task_id, attempt)| TaskCompletion {
                        task_id,
                        attempt,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            // Errors only happen when the benchmark shuts the controller down.
            if results_client.report(request).await.is_err() {
                return;
            }
        }
    });
    let heartbeat_id = id.clone();
    let heartbeater = tokio::spawn(async move {
        let _results = AbortOnDrop(results);
        let mut arrived = Vec::new();
        while done_rx.recv_many(&mut arrived, 1024).await > 0 {
            let request = ReportRequest {
                worker_id: heartbeat_id.clone(),
                heartbeats: arrived
                    .iter()
                    .map(|(task_id, attempt)| TaskProgress {
                        task_id: task_id.clone(),
                        attempt: *attempt,
                        progress: 0.5,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            if client.report(request).await.is_err() {
                return;
            }
            for a in arrived.drain(..) {
                if beaten_tx.send(a).is_err() {
                    return;
                }
            }
        }
    });
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
        if done_tx.send((a.task_id, a.attempt)).is_err() {
            heartbeater.abort();
            return;
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one Flywheel run measured.
struct Run {
    tasks_per_s: f64,
    enqueue_ms: f64,
    claim_to_receipt: [Duration; 2],
    low_load: [Duration; 2],
    handoff_idle: [Duration; 2],
    handoff_load: [Duration; 2],
    /// Handoffs measured under load that finished while the other campaign still drained.
    handoffs_under_load: usize,
    xacts_per_task: f64,
}

fn p50_p99(mut v: Vec<Duration>) -> [Duration; 2] {
    v.sort();
    [percentile(&v, 0.5), percentile(&v, 0.99)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn fresh_database(
    admin: &mut PgConnection,
    admin_url: &str,
    prefix: &str,
) -> (String, String) {
    let db = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut *admin)
        .await
        .unwrap();
    let url = format!("{}/{db}", admin_url.rsplit_once('/').unwrap().0);
    (db, url)
}

async fn drop_database(admin: &mut PgConnection, db: &str) {
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(admin)
    .await;
}

/// A campaign's status, read from its row (GetCampaign reads every task of the campaign:
/// polled, it would be a load of its own on the controller being measured).
async fn campaign_status(conn: &mut PgConnection, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM campaigns WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(conn)
        .await
        .unwrap()
}

async fn wait_succeeded(conn: &mut PgConnection, id: &str) {
    while campaign_status(conn, id).await != "succeeded" {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Stage `a`'s last shard committed (its `finished_at`, set in the committing transaction) →
/// stage `b`'s assignment received by the worker.
async fn handoff(
    conn: &mut PgConnection,
    campaign: &str,
    receipts: &Mutex<Vec<(String, SystemTime)>>,
) -> Duration {
    let (done, b): (chrono::DateTime<chrono::Utc>, String) = sqlx::query_as(
        "SELECT (SELECT max(t.finished_at) FROM tasks t JOIN rounds r ON r.id = t.round_id
                 WHERE r.campaign_id = $1::uuid AND t.stage = 'a'),
                (SELECT t.id::text FROM tasks t JOIN rounds r ON r.id = t.round_id
                 WHERE r.campaign_id = $1::uuid AND t.stage = 'b')",
    )
    .bind(campaign)
    .fetch_one(conn)
    .await
    .unwrap();
    let received = receipts
        .lock()
        .unwrap()
        .iter()
        .find(|(id, _)| *id == b)
        .map(|(_, at)| *at)
        .expect("b's assignment was received");
    let received: chrono::DateTime<chrono::Utc> = received.into();
    (received - done).to_std().unwrap_or_default()
}

async fn flywheel_run(
    admin: &mut PgConnection,
    admin_url: &str,
    workers: usize,
    slots: u32,
    tasks: usize,
) -> Run {
    let (db, url) = fresh_database(admin, admin_url, "fw_bench").await;
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
    let (chain_tx, _chain_rx) = mpsc::unbounded_channel();
    let mut worker_tasks = Vec::new();
    for _ in 0..workers {
        worker_tasks.push(tokio::spawn(worker(
            addr.clone(),
            worker_token.clone(),
            "bench",
            slots,
            receipts.clone(),
            rx_tx.clone(),
        )));
    }
    worker_tasks.push(tokio::spawn(worker(
        addr.clone(),
        worker_token.clone(),
        "chain",
        4,
        receipts.clone(),
        chain_tx,
    )));
    let mut control = ControlClient::connect(&addr, &admin_token).await.unwrap();
    // Let the workers connect before the work arrives.
    while control
        .list_workers()
        .await
        .unwrap()
        .iter()
        .filter(|w| w.status == "online")
        .count()
        < workers + 1
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut conn = PgConnection::connect(&url).await.unwrap();
    // Phase 1: throughput under load.
    let before = xacts(&url, &db).await;
    let start = Instant::now();
    let campaigns = enqueue(&mut control, tasks).await;
    let enqueued = start.elapsed();
    // Workers take tasks while later campaigns are still being created: only assignments
    // received from here on count, so the rate covers the same tasks as the time (graphile-worker
    // enqueues before its workers start).
    let drain = Instant::now();
    let mut drained = 0;
    for _ in 0..tasks {
        drained += usize::from(rx.recv().await.unwrap() >= drain);
    }
    for id in &campaigns {
        wait_succeeded(&mut conn, id).await;
    }
    let elapsed = drain.elapsed();
    let after = xacts(&url, &db).await;
    // Claim (the claiming transaction's start, tasks.started_at) to receipt by the worker.
    let taken = std::mem::take(&mut *receipts.lock().unwrap());
    let claimed: std::collections::HashMap<String, chrono::DateTime<chrono::Utc>> =
        sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>)>(
            "SELECT id::text, started_at FROM tasks WHERE started_at IS NOT NULL",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let lat: Vec<Duration> = taken
        .iter()
        .filter_map(|(id, at)| {
            let at: chrono::DateTime<chrono::Utc> = (*at).into();
            (at - *claimed.get(id)?).to_std().ok()
        })
        .collect();

    // Phase 2: latency at low load, one task at a time.
    let samples = 50;
    let mut low = Vec::new();
    for _ in 0..samples {
        control.create_campaign(spec(1)).await.unwrap();
        let committed = Instant::now();
        let got = rx.recv().await.unwrap();
        low.push(got.saturating_duration_since(committed));
    }

    // Phase 3: stage handoffs, idle and while another campaign of `tasks` drains.
    let chains = 20;
    let mut idle = Vec::new();
    for _ in 0..chains {
        let c = control.create_campaign(chain_spec()).await.unwrap();
        wait_succeeded(&mut conn, &c.id).await;
        idle.push(handoff(&mut conn, &c.id, &receipts).await);
    }
    let background = enqueue(&mut control, tasks).await;
    let mut loaded = Vec::new();
    let mut under_load = 0;
    for _ in 0..chains {
        let c = control.create_campaign(chain_spec()).await.unwrap();
        wait_succeeded(&mut conn, &c.id).await;
        loaded.push(handoff(&mut conn, &c.id, &receipts).await);
        let status = campaign_status(&mut conn, background.last().unwrap()).await;
        under_load += usize::from(status != "succeeded");
    }
    for id in &background {
        wait_succeeded(&mut conn, id).await;
    }

    let commits = (after.0 - before.0) as f64;
    let rollbacks = (after.1 - before.1) as f64;
    for w in worker_tasks {
        w.abort();
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    pool.close().await;
    drop(conn);
    drop_database(admin, &db).await;
    let _ = std::fs::remove_dir_all(dir);
    Run {
        tasks_per_s: drained as f64 / elapsed.as_secs_f64(),
        enqueue_ms: ms(enqueued),
        claim_to_receipt: p50_p99(lat),
        low_load: p50_p99(low),
        handoff_idle: p50_p99(idle),
        handoff_load: p50_p99(loaded),
        handoffs_under_load: under_load,
        xacts_per_task: (commits + rollbacks) / tasks as f64,
    }
}

const GRAPHILE_WORKER: &str = "0.18.0";

/// Installs graphile-worker into a scratch folder under `target/` (once) and returns it.
fn graphile_install() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-peer")
        .join(format!("graphile-worker-{GRAPHILE_WORKER}"));
    if dir.join("node_modules/graphile-worker").exists() {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!(
        "installing graphile-worker {GRAPHILE_WORKER} from npm into {} ...",
        dir.display()
    );
    let status = std::process::Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(&dir)
        .arg(format!("graphile-worker@{GRAPHILE_WORKER}"))
        .status()
        .expect("npm is missing: install Node.js and npm (Debian: nodejs npm) for --peer graphile");
    assert!(
        status.success(),
        "npm install graphile-worker@{GRAPHILE_WORKER} failed"
    );
    dir
}

/// graphile-worker's drain of `jobs` no-op jobs on a fresh database: jobs/s.
async fn graphile_run(
    admin: &mut PgConnection,
    admin_url: &str,
    install: &std::path::Path,
    jobs: usize,
) -> f64 {
    let (db, url) = fresh_database(admin, admin_url, "gw_bench").await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer/graphile_drain.js");
    let out = std::process::Command::new("node")
        .arg(&script)
        .arg(&url)
        .arg(jobs.to_string())
        .env("NODE_PATH", install.join("node_modules"))
        .env("GRAPHILE_WORKER_VERSION", GRAPHILE_WORKER)
        .output()
        .expect("node is missing: install Node.js for --peer graphile");
    drop_database(admin, &db).await;
    assert!(
        out.status.success(),
        "graphile-worker drain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("graphile-worker drain printed {line:?}: {e}"));
    v["jobs_per_s"].as_f64().unwrap()
}

#[tokio::main]
async fn main() {
    let workers = arg("--workers", 8);
    let slots = arg("--slots", 64) as u32;
    let tasks = arg("--tasks", 20_000);
    let runs = arg("--runs", 1).max(1);
    let args: Vec<String> = std::env::args().collect();
    let peer = args
        .iter()
        .position(|a| a == "--peer")
        .and_then(|i| args.get(i + 1))
        .cloned();
    if let Some(p) = &peer {
        assert_eq!(p, "graphile", "--peer takes graphile");
    }
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .expect("connect to Postgres (DATABASE_URL)");
    let install = peer.as_ref().map(|_| graphile_install());

    println!(
        "dispatch benchmark: {workers} workers x {slots} slots over gRPC, {tasks} no-op tasks, {runs} run(s)"
    );
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let r = flywheel_run(&mut admin, &admin_url, workers, slots, tasks).await;
        println!("run {run}:");
        println!(
            "  enqueue ({tasks} tasks, {ROUND_LIMIT} per CreateCampaign at most): {:.0} ms",
            r.enqueue_ms
        );
        println!(
            "  drain: {:.0} tasks/s (claim, assignment, heartbeat, complete)",
            r.tasks_per_s
        );
        let latency = |what: &str, [p50, p99]: [Duration; 2]| {
            println!("  {what}: p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99))
        };
        latency(
            "dispatch latency under load (claim transaction -> assignment received)",
            r.claim_to_receipt,
        );
        latency(
            "dispatch latency at low load (task committed -> assignment received)",
            r.low_load,
        );
        latency(
            "stage handoff idle (last shard committed -> successor's assignment received)",
            r.handoff_idle,
        );
        latency(
            &format!(
                "stage handoff under load ({} of 20 while {tasks} other tasks drained)",
                r.handoffs_under_load
            ),
            r.handoff_load,
        );
        println!(
            "  postgres transactions: {:.3} per task (all controller traffic during the drain)",
            r.xacts_per_task
        );
        if let Some(dir) = &install {
            let g = graphile_run(&mut admin, &admin_url, dir, tasks).await;
            let ratio = r.tasks_per_s / g;
            ratios.push(ratio);
            println!(
                "  graphile-worker {GRAPHILE_WORKER} fast preset: {g:.0} jobs/s  ->  Flywheel / graphile-worker = {ratio:.2}x"
            );
        }
    }
    if !ratios.is_empty() {
        ratios.sort_by(f64::total_cmp);
        println!(
            "ratio over {} run(s): min {:.2}x, median {:.2}x, max {:.2}x",
            ratios.len(),
            ratios[0],
            ratios[ratios.len() / 2],
            ratios[ratios.len() - 1]
        );
    }
}
