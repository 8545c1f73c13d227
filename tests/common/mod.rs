//! Test harness: a private database per test, and the real `flywheel` binary run as controller
//! and worker processes. Waiting is done by polling a condition against a deadline.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::path::Path;

use flywheel_proto::v1::{Artifact, Campaign, ListArtifactsRequest, Round};
use flywheel_proto::{ControlClient, WorkerClient, connect_channel};
use flywheel_worker::artifacts;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

pub const BIN: &str = env!("CARGO_BIN_EXE_flywheel");

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url
        .rsplit_once('/')
        .expect("DATABASE_URL has a database name");
    format!("{base}/{db}")
}

/// A database of its own, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!("fw_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin_url()).await.expect(
            "cannot reach Postgres: set DATABASE_URL or run scripts/test, which starts one",
        );
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = with_database(&admin_url(), &name);
        Self { name, url }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A controller, its workers and tokens, over a private database and artifact directory.
pub struct Cluster {
    pub db: TestDb,
    pub dir: PathBuf,
    pub controller: Option<Proc>,
    pub grpc_addr: String,
    /// Where controllers started from now on put artifacts (a directory or an `s3://` root).
    pub artifact_root: String,
    pub admin: String,
    pub worker_token: String,
    pub read_token: String,
    pub workers: Vec<Proc>,
    /// The database URL controllers started from now on use (a proxy, in the outage test).
    pub controller_database_url: String,
    /// Extra flags for controllers started from now on.
    pub controller_args: Vec<String>,
}

pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until some session of the test's database waits for an advisory lock (the settling
/// lock a test holds elsewhere).
pub async fn until_advisory_lock_awaited(db: &TestDb, who: &str) {
    until(
        &format!("{who} to wait for the settling lock"),
        Duration::from_secs(20),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .fetch_one(&mut db.connect().await)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
}

/// Holds a campaign's settling lock (`store::campaigns::lock_settling`) in an open transaction
/// on a connection of its own, until that connection commits or is dropped: writes that decide
/// from other tasks' states wait meanwhile.
pub async fn hold_settling_lock(db: &TestDb, campaign: &str) -> PgConnection {
    let mut conn = db.connect().await;
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    let id = uuid::Uuid::parse_str(campaign).unwrap();
    flywheel_orchestrator::store::campaigns::lock_settling(&mut conn, &[id])
        .await
        .unwrap();
    conn
}

/// Creates a token with `flywheel token create`.
pub fn token(db: &TestDb, scope: &str, name: &str) -> String {
    let out = Command::new(BIN)
        .args(["token", "create", "--scope", scope, "--name", name])
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run flywheel token create");
    assert!(
        out.status.success(),
        "token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Cluster {
    pub async fn start() -> Self {
        let mut c = Self::without_controller().await;
        c.start_controller().await;
        c
    }

    /// A database, tokens and a directory; no controller yet (set the controller fields, then
    /// call [`Cluster::start_controller`]).
    pub async fn without_controller() -> Self {
        let db = TestDb::new().await;
        let dir = std::env::temp_dir().join(format!("flywheel-test-{}", db.name));
        std::fs::create_dir_all(&dir).unwrap();
        let admin = token(&db, "admin", "alice");
        let worker_token = token(&db, "worker", "workers");
        let read_token = token(&db, "read", "viewer");
        Self {
            artifact_root: dir.join("artifacts").display().to_string(),
            controller_database_url: db.url.clone(),
            db,
            dir,
            controller: None,
            grpc_addr: "127.0.0.1:0".into(),
            admin,
            worker_token,
            read_token,
            workers: Vec::new(),
            controller_args: Vec::new(),
        }
    }

    /// Starts (or restarts, on the same address) the controller and waits until it listens.
    pub async fn start_controller(&mut self) {
        let (proc, addr) = self.spawn_controller("controller", &self.grpc_addr).await;
        self.controller = Some(proc);
        self.grpc_addr = addr;
    }

    /// Starts another controller process on the same database; returns it and its address.
    pub async fn spawn_controller(&self, name: &str, grpc_addr: &str) -> (Proc, String) {
        let (proc, addr_file) = self.spawn_controller_process(name, grpc_addr);
        let addr = wait_for_file(&addr_file, &format!("{name} to listen")).await;
        (proc, addr)
    }

    /// Starts a controller process without waiting for it; returns it and the file it writes
    /// its address to once it listens.
    pub fn spawn_controller_process(&self, name: &str, grpc_addr: &str) -> (Proc, PathBuf) {
        let addr_file = self.dir.join(format!("{name}.addr"));
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "server",
                "--grpc-addr",
                grpc_addr,
                "--lease-ttl-ms",
                "3000",
                "--heartbeat-interval-ms",
                "500",
            ])
            .arg("--addr-file")
            .arg(&addr_file)
            .args(["--http-addr", "127.0.0.1:0", "--http-addr-file"])
            .arg(self.dir.join(format!("{name}.http-addr")))
            .args(["--artifact-root", &self.artifact_root])
            .args(&self.controller_args)
            .env("DATABASE_URL", &self.controller_database_url)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn controller");
        let proc = Proc {
            child,
            name: name.into(),
        };
        (proc, addr_file)
    }

    /// The controller's HTTP address (dashboard, JSON API, /metrics).
    pub fn http_addr(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.http-addr")).expect("http address file")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Starts a worker process: `pool`, and extra args such as `--gpu-kind h100`.
    pub fn add_worker(&mut self, name: &str, pool: &str, extra: &[&str]) -> usize {
        self.add_worker_with_env(name, pool, extra, &[])
    }

    /// [`Cluster::add_worker`] with extra environment variables.
    pub fn add_worker_with_env(
        &mut self,
        name: &str,
        pool: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(BIN)
            .args([
                "worker",
                "--controller",
                &self.url(),
                "--name",
                name,
                "--pool",
                pool,
                "--backend",
                "test",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .env("FLYWHEEL_TOKEN", &self.worker_token)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn worker");
        self.workers.push(Proc {
            child,
            name: name.into(),
        });
        self.workers.len() - 1
    }

    pub async fn admin_client(&self) -> ControlClient {
        ControlClient::connect(&self.url(), &self.admin)
            .await
            .unwrap()
    }

    pub async fn client_with(&self, token: &str) -> ControlClient {
        ControlClient::connect(&self.url(), token).await.unwrap()
    }

    pub async fn worker_client(&self) -> WorkerClient {
        WorkerClient::new(
            connect_channel(&self.url()).await.unwrap(),
            &self.worker_token,
        )
        .unwrap()
    }

    pub async fn create(&self, spec: &str) -> Campaign {
        self.admin_client()
            .await
            .create_campaign(spec.to_string())
            .await
            .expect("create campaign")
    }

    /// Waits until the campaign reaches `status`, failing early on another terminal status.
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Campaign {
        let url = self.url();
        let admin = self.admin.clone();
        let log = self.dir.join("controller.log");
        until(
            &format!("campaign {id} to be {status} (log: {})", log.display()),
            timeout,
            || {
                let (url, admin, id) = (url.clone(), admin.clone(), id.to_string());
                async move {
                    let mut c = ControlClient::connect(&url, &admin).await.ok()?;
                    let d = c.get_campaign(id).await.ok()?;
                    let campaign = d.campaign?;
                    if campaign.status != status
                        && ["succeeded", "failed", "cancelled"].contains(&campaign.status.as_str())
                    {
                        panic!(
                            "campaign ended {} instead of {status}: {:#?}",
                            campaign.status, d.rounds
                        );
                    }
                    (campaign.status == status).then_some(campaign)
                }
            },
        )
        .await
    }

    pub async fn rounds(&self, id: &str) -> Vec<Round> {
        self.admin_client()
            .await
            .list_rounds(id.to_string())
            .await
            .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.workers.clear();
        self.controller = None;
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A one-round recipe on the test backend in pool cpu, with fast retries: `stages` is the
/// indented list under `recipe.stages`, `extra_defaults` more indented `defaults` lines.
pub fn one_round_spec(name: &str, stages: &str, extra_defaults: &str) -> String {
    format!(
        "apiVersion: flywheel/v1
name: {name}
models:
  generator: {{ uri: \"test://gen\" }}
  base: {{ uri: \"test://base\" }}
  reward: {{ uri: \"test://reward\" }}
rounds: 1
defaults:
  pool: cpu
  backend: test
  backoff_initial_ms: 50
  backoff_max_ms: 200
{extra_defaults}
recipe:
  stages:
{stages}"
    )
}

/// The shipped example spec with some text replaced.
pub fn example_spec(replacements: &[(&str, &str)]) -> String {
    let mut s = include_str!("../../examples/test-backend.yaml").to_string();
    for (from, to) in replacements {
        assert!(s.contains(from), "example spec has no {from:?}");
        s = s.replace(from, to);
    }
    s
}

/// One HTTP/1.1 request over a fresh connection: `(status, body)`. Enough for the JSON API and
/// /metrics, which send sized bodies.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, token, body);
    (status, body)
}

/// [`http`] with the response's header block.
pub fn http_full(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the HTTP server");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    conn.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, head.to_string(), body.to_string())
}

/// The Python with the test's PyPI packages (openai, moto); `scripts/test` creates it.
pub fn python() -> PathBuf {
    let p = std::env::var_os("FLYWHEEL_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python")
        });
    assert!(
        p.exists(),
        "{} is missing: run scripts/test, which creates it with the openai and moto packages",
        p.display()
    );
    p
}

/// A free TCP port on localhost (for servers that take a port, not an address file).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for a file a child process writes once it listens, and returns its contents.
pub async fn wait_for_file(path: &std::path::Path, what: &str) -> String {
    let p = path.to_path_buf();
    until(what, Duration::from_secs(30), || {
        let p = p.clone();
        async move { std::fs::read_to_string(p).ok().filter(|s| !s.is_empty()) }
    })
    .await
}

/// A fresh tiny builtin checkpoint.
pub fn init_model(dir: &Path, name: &str, reward_head: bool) -> PathBuf {
    init_model_with(dir, name, reward_head, &[])
}

pub fn init_model_with(dir: &Path, name: &str, reward_head: bool, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut cmd = Command::new(BIN);
    cmd.args(["init-model", "--size", "tiny", "--output"])
        .arg(&out)
        .args(extra);
    if reward_head {
        cmd.arg("--reward-head");
    }
    let status = cmd.status().expect("run flywheel init-model");
    assert!(status.success());
    out
}

/// `flywheel serve-model` on a free port; returns the process and its base URL (`.../v1`).
pub async fn serve_model(dir: &Path, model: &Path, name: &str) -> (Proc, String) {
    let addr_file = dir.join(format!("{name}.serve-addr"));
    let log = std::fs::File::create(dir.join(format!("{name}.serve.log"))).unwrap();
    let child = Command::new(BIN)
        .args([
            "serve-model",
            "--name",
            name,
            "--addr",
            "127.0.0.1:0",
            "--model",
        ])
        .arg(model)
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn serve-model");
    let proc = Proc {
        child,
        name: "serve-model".into(),
    };
    let addr = wait_for_file(&addr_file, "serve-model to listen").await;
    (proc, format!("http://{addr}/v1"))
}

pub async fn artifacts_of(c: &Cluster, campaign: &str) -> Vec<Artifact> {
    c.admin_client()
        .await
        .list_artifacts(ListArtifactsRequest {
            campaign_id: campaign.to_string(),
            kind: String::new(),
        })
        .await
        .unwrap()
}

pub fn read_rows(a: &Artifact) -> Vec<Value> {
    let bytes = artifacts::read(&a.uri, &a.content_hash).unwrap();
    String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Starts the scripted fixture server; returns it and its API root.
pub async fn scripted_server(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let child = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sdg_scripted_server.py"
        ))
        .args(["--port", &port.to_string(), "--log"])
        .arg(dir.join("scripted-requests.jsonl"))
        .stdout(Stdio::null())
        .spawn()
        .expect("start the scripted server");
    let base = format!("http://127.0.0.1:{port}/v1");
    until(
        "the scripted server to listen",
        Duration::from_secs(20),
        || async {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(())
        },
    )
    .await;
    (
        Proc {
            child,
            name: "scripted-server".into(),
        },
        base,
    )
}

/// The last error of the first task of `stage` in round 0 of a campaign.
pub async fn stage_error(c: &Cluster, campaign: &str, stage: &str) -> String {
    let rounds = c.rounds(campaign).await;
    let s = rounds[0]
        .stages
        .iter()
        .find(|s| s.name == stage)
        .unwrap_or_else(|| panic!("no stage {stage} in round 0"));
    s.tasks[0].last_error.clone()
}

/// The Python reward service of `tests/fixtures/reward_service.py`; returns it and its port.
pub async fn reward_service(dir: &Path) -> (Proc, String) {
    let port_file = dir.join("reward.port");
    let service = Proc {
        child: Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/reward_service.py"
            ))
            .arg(&port_file)
            .spawn()
            .expect("start the reward service"),
        name: "reward-service".into(),
    };
    let port = wait_for_file(&port_file, "the reward service to listen").await;
    (service, port)
}

/// A campaign spec whose generator and base are `model`: `defaults` is the inside of the
/// defaults mapping, `stages` the recipe's stage list (indented YAML).
pub fn campaign_spec(
    name: &str,
    model: &Path,
    reward: &Path,
    rounds: u32,
    defaults: &str,
    stages: &str,
) -> String {
    format!(
        "apiVersion: flywheel/v1
name: {name}
models:
  generator: {{ name: tiny, uri: \"file://{model}\" }}
  base: {{ name: base, uri: \"file://{model}\" }}
  reward: {{ name: reward, uri: \"file://{reward}\" }}
rounds: {rounds}
defaults: {{ {defaults} }}
recipe:
  stages:
{stages}",
        model = model.display(),
        reward = reward.display(),
    )
}

/// One round on the `cpu` pool, builtin by default, two attempts with short backoff.
pub fn model_spec(name: &str, model: &Path, reward: &Path, stages: &str) -> String {
    campaign_spec(
        name,
        model,
        reward,
        1,
        "pool: cpu, backend: builtin, max_attempts: 2, backoff_initial_ms: 200, backoff_max_ms: 1000",
        stages,
    )
}

/// A campaign whose generator is served by the stage `generator` (its params given) and whose
/// candidate is served for evaluation; the gate always passes, so that round N+1's generator
/// is round N's trained model.
pub fn production_spec(
    name: &str,
    model: &Path,
    reward: &Path,
    rounds: u32,
    generator: &str,
    generate: &str,
) -> String {
    campaign_spec(
        name,
        model,
        reward,
        rounds,
        "pool: cpu, backend: builtin, max_attempts: 3, backoff_initial_ms: 200, backoff_max_ms: 1000",
        &format!(
            "    - {{ name: prompts, kind: synthesize_prompts, params: {{ count: 8 }} }}
    - {{ name: heldout, kind: synthesize_prompts, needs: [], params: {{ split: held_out, seed: 3, count: 6 }} }}
    - name: generator
      kind: serve
      backend: external
      pool: gpu
      needs: []
      params: {generator}
    - name: generate
      kind: generate
      backend: openai
      shards: 2
      needs: [prompts]
      params: {generate}
    - {{ name: score, kind: score }}
    - {{ name: filter, kind: filter }}
    - name: sft
      kind: sft
      backend: external
      pool: gpu
      params: {{ template: flywheel, init: generator, steps: 2, batch_size: 4 }}
    - name: candidate
      kind: serve
      backend: external
      pool: gpu
      needs: [sft]
      params: {{ template: flywheel, model: candidate, startup_timeout_s: 60 }}
    - name: evaluate
      kind: evaluate
      backend: openai
      needs: [heldout]
      params: {{ candidate_endpoint: candidate, generator_endpoint: generator, max_tokens: 6 }}
    - name: promote
      kind: promote
      params: {{ require: {{ evaluate.prompts: \">= 1\" }} }}
"
        ),
    )
}

/// The `served_hashes` of the generate stage's responses in round `round` (0-based).
pub fn served_hashes(arts: &[Artifact], round: i32) -> Vec<String> {
    let mut hashes: Vec<String> = arts
        .iter()
        .filter(|a| a.round_index == round && a.producer_stage == "generate")
        .flat_map(|a| {
            let m: Value = serde_json::from_str(&a.metadata_json).unwrap();
            assert_eq!(m["weights_verified"], true, "{m}");
            m["served_hashes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    hashes.sort();
    hashes.dedup();
    hashes
}

pub fn hash_of(arts: &[Artifact], id: &str) -> String {
    arts.iter()
        .find(|a| a.id == id)
        .unwrap()
        .content_hash
        .clone()
}

pub async fn endpoint_rows(
    c: &Cluster,
    campaign: &str,
) -> Vec<(String, i32, String, String, String)> {
    let mut conn = c.db.connect().await;
    sqlx::query_as(
        "SELECT stage, attempt, url, content_hash, state FROM endpoints
         WHERE campaign_id = $1::uuid ORDER BY ready_at",
    )
    .bind(campaign)
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

/// Workers for [`production_spec`]: `gpu-N` run servers and trainers (a server holds its slot;
/// `env` is theirs, e.g. `SLURM_CONF`), `cpu-0` the rest.
pub fn production_workers(c: &mut Cluster, env: &[(&str, &str)], gpu_workers: usize) {
    for i in 0..gpu_workers {
        c.add_worker_with_env(
            &format!("gpu-{i}"),
            "gpu",
            &["--backend", "external", "--slots", "3"],
            env,
        );
    }
    c.add_worker(
        "cpu-0",
        "cpu",
        &[
            "--backend",
            "builtin",
            "--backend",
            "openai",
            "--slots",
            "3",
        ],
    );
}
