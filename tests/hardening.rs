//! Regression tests for the hardening issue, through real processes: worker identity and output
//! checks, poisoned reports, a large request, a database outage, token revocation, shutdown with
//! a connected worker, bounded and validated input, and generic gRPC clients.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{BIN, Cluster, example_spec, http_full, token, until};
use flywheel_proto::v1::{
    Capabilities, CompleteTaskRequest, CreateCampaignRequest, CreateScheduleRequest,
    HeartbeatRequest, ListArtifactsRequest, OutputArtifact, RegisterRequest, TaskProgress,
};
use flywheel_proto::{WorkerClient, connect_channel};
use sqlx::Row;
use tonic::Code;

fn spec(name: &str, stages: &str) -> String {
    common::one_round_spec(name, stages, "")
}

fn register(worker_id: &str, pool: &str, slots: u32) -> RegisterRequest {
    RegisterRequest {
        worker_id: worker_id.into(),
        name: format!("hand-{pool}"),
        capabilities: Some(Capabilities {
            pool: pool.into(),
            backends: vec!["test".into()],
            ..Default::default()
        }),
        slots,
        running: Vec::new(),
    }
}

async fn worker_client(c: &Cluster, token: &str) -> WorkerClient {
    WorkerClient::new(connect_channel(&c.url()).await.unwrap(), token).unwrap()
}

fn output(uri: &str, hash: &str) -> OutputArtifact {
    OutputArtifact {
        name: "prompts".into(),
        kind: "dataset".into(),
        uri: uri.into(),
        content_hash: hash.into(),
        metadata_json: String::new(),
    }
}

const HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn beat(task_id: &str, attempt: i32, message: &str) -> TaskProgress {
    TaskProgress {
        task_id: task_id.into(),
        attempt,
        progress: 0.5,
        message: message.into(),
        metrics: Default::default(),
        endpoint: None,
        external_job: String::new(),
    }
}

/// Waits until `n` tasks of the campaign are running.
async fn wait_running(c: &Cluster, campaign_id: &str, n: i64) {
    let sql = "SELECT count(*) FROM tasks WHERE campaign_id = $1 AND state = 'running'";
    until(
        &format!("{n} running task(s)"),
        Duration::from_secs(30),
        || async { (count(c, sql, campaign_id).await == n).then_some(()) },
    )
    .await;
}

async fn count(c: &Cluster, sql: &str, id: &str) -> i64 {
    let mut conn = c.db.connect().await;
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(uuid::Uuid::parse_str(id).unwrap())
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_are_accepted_only_from_the_worker_and_token_running_the_task() {
    let mut c = Cluster::start().await;
    // This test is the worker of pool cpu (one slot); a real worker serves pool gpu.
    let owner_id = uuid::Uuid::new_v4().to_string();
    let mut owner = worker_client(&c, &c.worker_token).await;
    owner.register(register(&owner_id, "cpu", 1)).await.unwrap();
    let mut stream = owner.stream_assignments(owner_id.clone()).await.unwrap();
    let campaign = c
        .create(&spec(
            "identity",
            "    - { name: work, kind: custom, shards: 2 }\n",
        ))
        .await;
    let a = stream.message().await.unwrap().expect("an assignment");
    let (task, attempt, prefix) = (a.task_id.clone(), a.attempt, a.output_prefix.clone());
    let good = output(&format!("{prefix}/prompts.jsonl"), HASH);

    // Another worker token can neither report for this worker nor take its id or stream.
    let stranger_token = token(&c.db, "worker", "stranger");
    let mut stranger = worker_client(&c, &stranger_token).await;
    let complete = |worker_id: &str, outputs: Vec<OutputArtifact>| CompleteTaskRequest {
        worker_id: worker_id.into(),
        task_id: task.clone(),
        attempt,
        outputs,
        metrics: Default::default(),
    };
    let e = stranger
        .complete_task(complete(&owner_id, vec![good.clone()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = stranger
        .heartbeat(HeartbeatRequest {
            worker_id: owner_id.clone(),
            tasks: vec![beat(&task, attempt, "")],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = stranger
        .register(register(&owner_id, "cpu", 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = stranger
        .stream_assignments(owner_id.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // A worker id nobody registered.
    let nobody = uuid::Uuid::new_v4().to_string();
    let e = stranger
        .complete_task(complete(&nobody, vec![good.clone()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // The stranger's own registration does not run this task.
    let stranger_id = uuid::Uuid::new_v4().to_string();
    stranger
        .register(register(&stranger_id, "elsewhere", 1))
        .await
        .unwrap();
    let e = stranger
        .complete_task(complete(&stranger_id, vec![good.clone()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // The owner itself must publish hashed outputs under its attempt's prefix.
    for (bad, field) in [
        (output("file:///etc/passwd", ""), "outputs[].content_hash"),
        (output("file:///etc/passwd", HASH), "outputs[].uri"),
        (
            output(&format!("{prefix}/../../../../etc/passwd"), HASH),
            "outputs[].uri",
        ),
        (output(&format!("{prefix}/%2e%2e/x"), HASH), "outputs[].uri"),
        (output(&format!("{prefix}-other/x"), HASH), "outputs[].uri"),
    ] {
        let e = owner
            .complete_task(complete(&owner_id, vec![bad.clone()]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}: {e}", bad.uri);
        assert!(e.message().starts_with(field), "{e}");
    }
    let running = "SELECT count(*) FROM tasks WHERE campaign_id = $1 AND state = 'running'";
    assert_eq!(count(&c, running, &campaign.id).await, 1);
    let artifacts =
        "SELECT count(*) FROM artifacts WHERE campaign_id = $1 AND producer_task_id IS NOT NULL";
    assert_eq!(count(&c, artifacts, &campaign.id).await, 0);

    // A heartbeat naming another attempt is told to abandon it, and frees no slot.
    let r = owner
        .heartbeat(HeartbeatRequest {
            worker_id: owner_id.clone(),
            tasks: vec![beat(&task, attempt + 5, ""), beat(&task, attempt, "")],
        })
        .await
        .unwrap();
    let directives: Vec<i32> = r.tasks.iter().map(|d| d.directive).collect();
    assert_eq!(
        directives,
        [
            flywheel_proto::v1::Directive::Abandon as i32,
            flywheel_proto::v1::Directive::Continue as i32
        ]
    );
    // A dispatch pass for another pool claims for every idle slot in one transaction: once the
    // gpu task runs, a slot freed by that heartbeat would have been given shard 1.
    c.add_worker("gpu-1", "gpu", &[]);
    let barrier = c
        .create(&spec(
            "barrier",
            "    - { name: other, kind: synthesize_prompts, pool: gpu, params: { count: 1, sleep_ms: 30000 } }\n",
        ))
        .await;
    wait_running(&c, &barrier.id, 1).await;
    let on_owner = "SELECT count(*) FROM tasks WHERE worker_id = $1 AND state = 'running'";
    assert_eq!(
        count(&c, on_owner, &owner_id).await,
        1,
        "a --slots 1 worker got two tasks"
    );

    // The real completion is accepted, once.
    owner
        .complete_task(complete(&owner_id, vec![good.clone()]))
        .await
        .unwrap();
    let e = owner
        .complete_task(complete(&owner_id, vec![good]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nul_in_a_report_fails_that_report_alone() {
    let mut c = Cluster::start().await;
    c.add_worker("cpu-1", "cpu", &[]);
    let campaign = c
        .create(&spec(
            "healthy",
            "    - { name: work, kind: synthesize_prompts, params: { count: 4, sleep_ms: 3000 } }\n",
        ))
        .await;
    wait_running(&c, &campaign.id, 1).await;

    // 12 senders of NUL progress messages while the healthy task runs and heartbeats.
    let attacker_id = uuid::Uuid::new_v4().to_string();
    worker_client(&c, &c.worker_token)
        .await
        .register(register(&attacker_id, "attack", 1))
        .await
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..12 {
        let mut w = worker_client(&c, &c.worker_token).await;
        let (done, refused, id) = (done.clone(), refused.clone(), attacker_id.clone());
        senders.push(tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let task = uuid::Uuid::new_v4().to_string();
                let e = w
                    .heartbeat(HeartbeatRequest {
                        worker_id: id.clone(),
                        tasks: vec![beat(&task, 1, "\0")],
                    })
                    .await
                    .unwrap_err();
                assert_eq!(e.code(), Code::InvalidArgument, "{e}");
                assert!(e.message().starts_with("tasks[].message"), "{e}");
                assert!(e.message().contains("NUL"), "{e}");
                refused.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(60))
        .await;
    done.store(true, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    assert!(refused.load(Ordering::SeqCst) > 12);
    let mut job = beat(&uuid::Uuid::new_v4().to_string(), 1, "ok");
    job.external_job = "slurm:\0".into();
    let e = worker_client(&c, &c.worker_token)
        .await
        .heartbeat(HeartbeatRequest {
            worker_id: attacker_id.clone(),
            tasks: vec![job],
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("tasks[].external_job"), "{e}");
    let attempts =
        "SELECT count(*) FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE t.campaign_id = $1";
    assert_eq!(count(&c, attempts, &campaign.id).await, 1);

    // NUL in a spec's name or a worker's name: the field is named, not "database unavailable".
    for (name, field) in [
        ("bad\0name", "spec_yaml"),
        ("\"bad\\0name\"", "invalid campaign spec: name"),
    ] {
        let e = c
            .admin_client()
            .await
            .create_campaign(spec(name, "    - { name: w, kind: synthesize_prompts }\n"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(
            e.message().starts_with(field) && e.message().contains("NUL"),
            "{e}"
        );
    }
    let mut r = register(&uuid::Uuid::new_v4().to_string(), "cpu", 1);
    r.name = "w\0".into();
    let e = worker_client(&c, &c.worker_token)
        .await
        .register(r)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().starts_with("name:"), "{e}");
}

async fn health_status(channel: tonic::transport::Channel, service: &str) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_request_does_not_stall_health_or_other_calls() {
    let c = Cluster::start().await;
    // ~900 KB: 100k placeholders to fill, then a large document to parse and validate.
    let big = format!(
        "{}x-pad: [{}]\n",
        example_spec(&[]),
        "{{ v }}, ".repeat(100_000)
    );
    assert!(big.len() < (1 << 20));
    let mut admin = c.admin_client().await;
    let request = tokio::spawn(async move {
        let started = Instant::now();
        let r = admin
            .create_campaign_from(CreateCampaignRequest {
                spec_yaml: big,
                params: [("v".to_string(), "1".to_string())].into(),
                request_id: String::new(),
            })
            .await;
        (r, started.elapsed())
    });
    let channel = connect_channel(&c.url()).await.unwrap();
    let mut worst = Duration::ZERO;
    let mut checks = 0;
    while !request.is_finished() {
        let t = Instant::now();
        assert_eq!(health_status(channel.clone(), "").await, 1, "SERVING");
        worst = worst.max(t.elapsed());
        checks += 1;
    }
    let (r, took) = request.await.unwrap();
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("x-pad"), "{}", e.message());
    eprintln!("large request: {took:?}; {checks} health checks meanwhile, slowest {worst:?}");
    // Before: 15 s without an answer. Generous, as the machine may be busy.
    assert!(
        worst < Duration::from_secs(2),
        "health stalled for {worst:?}"
    );

    // Over the size limit: refused before any work, naming the limit.
    let e = c
        .admin_client()
        .await
        .create_campaign("#".repeat((1 << 20) + 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("spec_yaml: is 1048577 bytes; the limit is 1048576"),
        "{e}"
    );
}

/// A TCP proxy in front of Postgres that can be cut (every connection dropped, new ones closed
/// at once) and restored: a database outage as the controller sees it.
struct DbProxy {
    addr: String,
    up: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl DbProxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                conns2.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Self { addr, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn running_work_survives_a_database_outage_longer_than_the_lease() {
    let mut c = Cluster::without_controller().await;
    let (head, rest) = c.db.url.split_once("@").unwrap();
    let (host_port, db) = rest.split_once('/').unwrap();
    let proxy = DbProxy::start(host_port.to_string()).await;
    c.controller_database_url = format!("{head}@{}/{db}", proxy.addr);

    // A controller started while the database is unreachable waits for it.
    proxy.cut();
    let (proc, addr_file) = c.spawn_controller_process("controller", "127.0.0.1:0");
    let log = c.dir.join("controller.log");
    until(
        "the controller to retry its database connection",
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (text.matches("cannot connect to Postgres; retrying").count() >= 2).then_some(())
        },
    )
    .await;
    proxy.restore();
    c.grpc_addr = common::wait_for_file(&addr_file, "the controller to listen").await;
    c.controller = Some(proc);

    // Four attempts running on two live workers, then 5 s without a database (lease: 3 s).
    c.add_worker("cpu-1", "cpu", &["--slots", "2"]);
    c.add_worker("cpu-2", "cpu", &["--slots", "2"]);
    let campaign = c
        .create(&spec(
            "outage",
            "    - { name: work, kind: custom, shards: 4, params: { sleep_ms: 9000 } }\n",
        ))
        .await;
    wait_running(&c, &campaign.id, 4).await;
    let channel = connect_channel(&c.url()).await.unwrap();
    proxy.cut();
    let cut_at = Instant::now();
    until(
        "health NOT_SERVING while the database is down",
        Duration::from_secs(20),
        || async {
            let s = health_status(channel.clone(), "flywheel.v1.WorkerService").await;
            (s == 2).then_some(())
        },
    )
    .await;
    // The outage itself lasts a fixed time: longer than the lease.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(cut_at.elapsed())).await;
    proxy.restore();
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(90))
        .await;
    assert_eq!(health_status(channel.clone(), "").await, 1);
    let mut conn = c.db.connect().await;
    let attempts: Vec<(i32, String)> = sqlx::query(
        "SELECT a.attempt, a.state FROM attempts a JOIN tasks t ON t.id = a.task_id
         WHERE t.campaign_id = $1 ORDER BY t.shard_index",
    )
    .bind(uuid::Uuid::parse_str(&campaign.id).unwrap())
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    assert_eq!(attempts, vec![(1, "succeeded".to_string()); 4]);
    let log = std::fs::read_to_string(c.dir.join("controller.log")).unwrap();
    assert!(
        log.contains("running leases extended by one period"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_stops_working_at_once_though_checks_are_cached() {
    // The default cache time (60 s): the revocation reaches the controller as a notification.
    let c = Cluster::start().await;
    let mut viewer = c.client_with(&c.read_token).await;
    viewer.list_campaigns().await.unwrap();

    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("token")
            .args(args)
            .env("DATABASE_URL", &c.db.url)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, listed, _) = cli(&["list"]);
    assert!(
        ok && listed.contains("viewer") && listed.contains("read"),
        "{listed}"
    );
    assert!(!listed.contains(&c.read_token), "token list shows no token");
    let (ok, out, err) = cli(&["revoke", "viewer"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("revoked "), "{out}");
    let revoked_at = Instant::now();
    until(
        "the revoked token to be refused",
        Duration::from_secs(5),
        || {
            let mut viewer = viewer.clone();
            async move {
                let e = viewer.list_campaigns().await.err()?;
                (e.code() == Code::Unauthenticated).then_some(())
            }
        },
    )
    .await;
    eprintln!("revocation took effect after {:?}", revoked_at.elapsed());
    let (_, listed, _) = cli(&["list"]);
    let line = listed.lines().find(|l| l.contains("viewer")).unwrap();
    assert!(
        !line.trim_end().ends_with('-'),
        "revoked time listed: {line}"
    );
    // The other tokens still work; an unknown name is an error.
    c.admin_client().await.list_campaigns().await.unwrap();
    let (ok, _, err) = cli(&["revoke", "nobody"]);
    assert!(!ok && err.contains("no unrevoked token"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_controller_with_connected_workers_and_streams() {
    let mut c = Cluster::without_controller().await;
    c.controller_args = vec!["--shutdown-grace-ms".into(), "1000".into()];
    c.start_controller().await;
    c.add_worker("cpu-1", "cpu", &[]);
    let campaign = c
        .create(&spec(
            "long",
            "    - { name: work, kind: synthesize_prompts, params: { count: 4, sleep_ms: 60000 } }\n",
        ))
        .await;
    wait_running(&c, &campaign.id, 1).await;
    let _events = c
        .admin_client()
        .await
        .stream_events(campaign.id.clone(), 0)
        .await
        .unwrap();
    let http_addr = c.http_addr();
    let controller = c.controller.as_mut().unwrap();
    let pid = controller.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let signalled = Instant::now();
    let status = until("the controller to exit", Duration::from_secs(15), || {
        let r = controller.child.try_wait().unwrap();
        async move { r }
    })
    .await;
    eprintln!(
        "controller exited {status} {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert!(status.success(), "{status}");
    for addr in [&c.grpc_addr, &http_addr] {
        std::net::TcpListener::bind(addr.as_str())
            .unwrap_or_else(|e| panic!("{addr} still taken after the controller exited: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_naming_the_field_and_stores_nothing() {
    let mut c = Cluster::start().await;
    let mut admin = c.admin_client().await;
    let before = admin.list_campaigns().await.unwrap().len();

    // A 1 MB id is not echoed back whole.
    let e = admin.get_campaign("x".repeat(1 << 20)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().len() < 300, "{} bytes", e.message().len());

    // Specs that are too big to plan, an alias bomb, duplicate keys: refused at once.
    let huge = spec(
        "huge",
        "    - { name: a, kind: synthesize_prompts, shards: 1000 }\n    - { name: b, kind: generate, shards: 999, needs: [a] }\n",
    );
    let mut bomb = example_spec(&[]);
    bomb.push_str("x-a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..=8 {
        bomb.push_str(&format!(
            "x-a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n",
            p = i - 1
        ));
    }
    let duplicate = example_spec(&[("rounds: 2", "rounds: 2\nrounds: 5")]);
    for (what, yaml, expect) in [
        ("1000 x 999 shards", huge, "999000 dependencies"),
        ("alias bomb", bomb, "not valid YAML"),
        ("duplicate key", duplicate, "not valid YAML"),
    ] {
        let started = Instant::now();
        let e = admin.create_campaign(yaml).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
        assert!(e.message().contains(expect), "{what}: {e}");
        eprintln!("{what}: refused in {:?}", started.elapsed());
    }
    assert_eq!(admin.list_campaigns().await.unwrap().len(), before);

    // 150 problems: the CLI prints the first 20 and a count, not "h2 protocol error".
    let mut many = example_spec(&[]);
    for i in 0..150 {
        many.push_str(&format!("unknown_{i}: 1\n"));
    }
    let file = c.dir.join("many.yaml");
    std::fs::write(&file, many).unwrap();
    let out = Command::new(BIN)
        .args(["campaign", "create", "-f"])
        .arg(&file)
        .args(["--controller", &c.url()])
        .env("FLYWHEEL_TOKEN", &c.admin)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("more problems") && err.contains("InvalidArgument"),
        "{err}"
    );

    // A catch-up window past 32 bits.
    let e = admin
        .create_schedule(CreateScheduleRequest {
            name: "wide".into(),
            cron: "@daily".into(),
            template_yaml: example_spec(&[]),
            catch_up_window_s: 1 << 31,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("catch_up_window_s:"), "{e}");

    // Artifacts of a campaign that does not exist.
    let e = admin
        .list_artifacts(ListArtifactsRequest {
            campaign_id: uuid::Uuid::new_v4().to_string(),
            kind: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Pools are bounded: a worker token cannot add /metrics lines forever. (The real worker's
    // pool exists first.)
    c.add_worker("cpu-1", "cpu", &[]);
    until("the cpu pool to exist", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let w = admin.list_workers().await.ok()?;
            (!w.is_empty()).then_some(())
        }
    })
    .await;
    let mut w = worker_client(&c, &c.worker_token).await;
    let mut refused_at = None;
    for i in 0..300 {
        let id = uuid::Uuid::new_v4().to_string();
        match w.register(register(&id, &format!("pool-{i}"), 1)).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(e.message().contains("256 pools"), "{e}");
                refused_at = Some(i);
                break;
            }
        }
    }
    assert!(refused_at.is_some_and(|i| i <= 256), "{refused_at:?}");

    // Idempotent create: a retry with the same request id returns the first campaign.
    let once = spec(
        "secret-project-x",
        "    - { name: p, kind: synthesize_prompts, params: { count: 2 } }\n    - { name: g, kind: generate, params: { k: 2 } }\n    - { name: s, kind: score }\n    - { name: f, kind: filter }\n    - { name: t, kind: sft }\n    - { name: e, kind: evaluate }\n",
    );
    let req = |yaml: &str| CreateCampaignRequest {
        spec_yaml: yaml.into(),
        params: Default::default(),
        request_id: "retry-me-1".into(),
    };
    let first = admin.create_campaign_from(req(&once)).await.unwrap();
    let again = admin.create_campaign_from(req(&once)).await.unwrap();
    assert_eq!(first.id, again.id);
    let e = admin
        .create_campaign_from(req(&once.replace("count: 2", "count: 3")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert_eq!(admin.list_campaigns().await.unwrap().len(), before + 1);

    // A finished campaign: an event says so; /metrics carries its id, never its name.
    c.wait_status(&first.id, "succeeded", Duration::from_secs(60))
        .await;
    let failing = c
        .create(&spec(
            "fails",
            "    - { name: p, kind: synthesize_prompts, max_attempts: 1, params: { fail_permanently: true } }\n",
        ))
        .await;
    c.wait_status(&failing.id, "failed", Duration::from_secs(60))
        .await;
    let mut conn = c.db.connect().await;
    for (id, kind) in [
        (&first.id, "campaign_succeeded"),
        (&failing.id, "campaign_failed"),
    ] {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE campaign_id = $1 AND kind = $2")
                .bind(uuid::Uuid::parse_str(id).unwrap())
                .bind(kind)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(n, 1, "{kind}");
    }
    let addr = c.http_addr();
    let (status, _, scrape) = http_full(&addr, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    assert!(
        scrape.contains(&format!("campaign_id=\"{}\"", first.id)),
        "{scrape}"
    );
    assert!(!scrape.contains("secret-project-x"), "{scrape}");

    // HTTP: lower-case bearer, JSON errors for bad query strings, security headers.
    let raw = |path: &str, auth: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let lower = raw("/api/v1/campaigns", &format!("bearer {}", c.read_token));
    assert!(lower.starts_with("HTTP/1.1 200"), "{lower}");
    let head = lower.split("\r\n\r\n").next().unwrap().to_lowercase();
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    let bad = raw(
        &format!("/api/v1/campaigns/{}/events?after_id=abc", first.id),
        &format!("Bearer {}", c.read_token),
    );
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let body: serde_json::Value =
        serde_json::from_str(bad.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("query string:"),
        "{body}"
    );
    assert_eq!(body["code"], "InvalidArgument");
    let (_, page_head, _) = http_full(&addr, "GET", "/", None, None);
    let page_head = page_head.to_lowercase();
    assert!(
        page_head.contains("content-security-policy: default-src 'self'")
            && page_head.contains("frame-ancestors 'none'"),
        "{page_head}"
    );
    assert!(page_head.contains("x-frame-options: deny"), "{page_head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_worker_is_shown_offline_after_its_controller_restarts() {
    let mut c = Cluster::start().await;
    c.add_worker("cpu-1", "cpu", &[]);
    let admin = c.admin_client().await;
    until("the worker to be online", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let w = admin.list_workers().await.ok()?;
            w.iter().any(|w| w.status == "online").then_some(())
        }
    })
    .await;
    // Both die without a goodbye; a new controller never hears of the worker again.
    c.controller.as_mut().unwrap().kill9();
    c.workers[0].kill9();
    c.start_controller().await;
    let admin = c.admin_client().await;
    until(
        "the dead worker to be offline",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                let w = admin.list_workers().await.ok()?;
                (w.len() == 1 && w[0].status == "offline").then_some(())
            }
        },
    )
    .await;
}

#[test]
fn generic_grpc_clients_list_services_and_get_invalid_argument_for_bad_bytes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(Cluster::start());
    let out = Command::new(common::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/grpc_generic_client.py"
        ))
        .args([&c.grpc_addr, &c.read_token])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services: BTreeSet<&str> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("services: "))
        .unwrap()
        .split(',')
        .collect();
    for s in ["flywheel.v1.ControlService", "flywheel.v1.WorkerService"] {
        assert!(services.contains(s), "{services:?}");
    }
    let non_utf8 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("non-utf8: "))
        .unwrap();
    assert!(non_utf8.starts_with("INVALID_ARGUMENT"), "{non_utf8}");
    drop(rt);
}
