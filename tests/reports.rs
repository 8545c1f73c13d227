//! The batched worker report (`Report`: heartbeats, completions and failures in one call),
//! through a real controller: each item is fenced on its own, and a worker killed while its
//! reports are in flight loses nothing the controller acknowledged.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Cluster, until};
use flywheel_proto::v1::{
    Assignment, CampaignAction, Capabilities, Directive, Outcome, OutputArtifact, RegisterRequest,
    ReportRequest, TaskCompletion, TaskFailure, TaskProgress,
};
use flywheel_proto::{WorkerClient, connect_channel};

const HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn beat(task_id: &str, attempt: i32) -> TaskProgress {
    TaskProgress {
        task_id: task_id.into(),
        attempt,
        progress: 0.5,
        ..Default::default()
    }
}

fn completion(task_id: &str, attempt: i32, outputs: Vec<OutputArtifact>) -> TaskCompletion {
    TaskCompletion {
        task_id: task_id.into(),
        attempt,
        outputs,
        metrics: Default::default(),
    }
}

fn dataset(uri: String) -> OutputArtifact {
    OutputArtifact {
        name: "prompts".into(),
        kind: "dataset".into(),
        uri,
        content_hash: HASH.into(),
        metadata_json: String::new(),
    }
}

/// A worker driven by hand: registered in pool `cpu` with `slots` slots, its assignment stream
/// open.
async fn hand_worker(
    c: &Cluster,
    slots: u32,
) -> (WorkerClient, String, tonic::Streaming<Assignment>) {
    let id = uuid::Uuid::new_v4().to_string();
    let mut w =
        WorkerClient::new(connect_channel(&c.url()).await.unwrap(), &c.worker_token).unwrap();
    w.register(RegisterRequest {
        worker_id: id.clone(),
        name: "hand".into(),
        capabilities: Some(Capabilities {
            pool: "cpu".into(),
            backends: vec!["test".into()],
            ..Default::default()
        }),
        slots,
        running: vec![],
    })
    .await
    .unwrap();
    let stream = w.stream_assignments(id.clone()).await.unwrap();
    (w, id, stream)
}

async fn states(c: &Cluster, campaign: &str) -> Vec<(i32, String, i32)> {
    let mut conn = c.db.connect().await;
    sqlx::query_as(
        "SELECT shard_index, state, attempt FROM tasks WHERE campaign_id = $1::uuid ORDER BY shard_index",
    )
    .bind(campaign)
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

/// A heartbeat that arrives while its attempt's lease is fresh is answered without a write
/// (the claim just wrote the lease). That must hide nothing the attempt should hear: a beat
/// naming another attempt is still told to abandon it, and after a cancel the next beat is
/// told to cancel.
#[tokio::test(flavor = "multi_thread")]
async fn beats_answered_without_a_write_still_hear_fencing_and_cancel() {
    let c = Cluster::start().await;
    let (mut w, id, mut stream) = hand_worker(&c, 1).await;
    let campaign = c
        .create(&common::one_round_spec(
            "fresh-beats",
            "    - { name: work, kind: custom }\n",
            "",
        ))
        .await;
    let a = stream.message().await.unwrap().expect("an assignment");
    let told = |r: &flywheel_proto::v1::ReportResponse| -> Vec<i32> {
        r.directives.iter().map(|d| d.directive).collect()
    };

    let reply = w
        .report(ReportRequest {
            worker_id: id.clone(),
            heartbeats: vec![beat(&a.task_id, a.attempt), beat(&a.task_id, a.attempt + 1)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        told(&reply),
        [Directive::Continue as i32, Directive::Abandon as i32]
    );

    c.admin_client()
        .await
        .cancel_campaign(CampaignAction {
            campaign_id: campaign.id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let reply = w
        .report(ReportRequest {
            worker_id: id.clone(),
            heartbeats: vec![beat(&a.task_id, a.attempt)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(told(&reply), [Directive::Cancel as i32]);
    assert_eq!(states(&c, &campaign.id).await, [(0, "running".into(), 1)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_fences_and_checks_each_item_on_its_own() {
    let c = Cluster::start().await;
    let (mut w, id, mut stream) = hand_worker(&c, 3).await;
    let campaign = c
        .create(&common::one_round_spec(
            "report",
            "    - { name: work, kind: custom, shards: 3 }\n",
            "",
        ))
        .await;
    let mut shards = Vec::new();
    for _ in 0..3 {
        shards.push(stream.message().await.unwrap().expect("an assignment"));
    }
    shards.sort_by_key(|a| a.shard_index);
    let [s0, s1, s2] = &shards[..] else {
        unreachable!()
    };

    let reply = w
        .report(ReportRequest {
            worker_id: id.clone(),
            heartbeats: vec![beat(&s0.task_id, s0.attempt), beat(&s1.task_id, 7)],
            completions: vec![
                completion(
                    &s0.task_id,
                    s0.attempt,
                    vec![dataset(format!("{}/prompts.jsonl", s0.output_prefix))],
                ),
                completion(&s1.task_id, 7, vec![]),
                completion(
                    &s2.task_id,
                    s2.attempt,
                    vec![dataset("file:///etc/passwd".into())],
                ),
            ],
            failures: vec![TaskFailure {
                task_id: "not-a-task".into(),
                attempt: 1,
                error: "boom".into(),
                retryable: true,
            }],
        })
        .await
        .unwrap();
    let directives: Vec<(String, i32)> = reply
        .directives
        .iter()
        .map(|d| (d.task_id.clone(), d.directive))
        .collect();
    assert_eq!(
        directives,
        [
            (s0.task_id.clone(), Directive::Continue as i32),
            (s1.task_id.clone(), Directive::Abandon as i32)
        ],
        "the current attempt's beat goes on (its completion is accepted with it); the other attempt's is stale"
    );
    let outcomes: Vec<i32> = reply.completions.iter().map(|o| o.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Accepted as i32,
            Outcome::Stale as i32,
            Outcome::Invalid as i32
        ],
        "{:?}",
        reply.completions
    );
    assert!(
        reply.completions[1].error.contains("stale attempt"),
        "{:?}",
        reply.completions[1]
    );
    assert!(
        reply.completions[2]
            .error
            .starts_with("completions[2].outputs[].uri"),
        "{:?}",
        reply.completions[2]
    );
    assert_eq!(reply.failures.len(), 1);
    assert_eq!(reply.failures[0].outcome, Outcome::Invalid as i32);
    assert!(
        reply.failures[0].error.starts_with("failures[0].task_id"),
        "{:?}",
        reply.failures[0]
    );
    // Only the accepted item changed anything.
    assert_eq!(
        states(&c, &campaign.id).await,
        [
            (0, "succeeded".into(), 1),
            (1, "running".into(), 1),
            (2, "running".into(), 1)
        ]
    );
    let mut conn = c.db.connect().await;
    let outputs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM artifacts WHERE campaign_id = $1::uuid AND producer_task_id IS NOT NULL",
    )
    .bind(&campaign.id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(outputs, 1);

    // Sent again, the accepted completion is stale; the rest finish the campaign.
    let reply = w
        .report(ReportRequest {
            worker_id: id.clone(),
            completions: vec![
                completion(&s0.task_id, s0.attempt, vec![]),
                completion(&s1.task_id, s1.attempt, vec![]),
            ],
            failures: vec![TaskFailure {
                task_id: s2.task_id.clone(),
                attempt: s2.attempt,
                error: "permanent".into(),
                retryable: false,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let outcomes: Vec<i32> = reply
        .completions
        .iter()
        .chain(&reply.failures)
        .map(|o| o.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Stale as i32,
            Outcome::Accepted as i32,
            Outcome::Accepted as i32
        ]
    );
    assert!(!reply.failures[0].will_retry);
    assert_eq!(
        states(&c, &campaign.id).await,
        [
            (0, "succeeded".into(), 1),
            (1, "succeeded".into(), 1),
            (2, "failed".into(), 1)
        ]
    );
}

/// `(task id, attempt)` of every result the worker's log says the controller accepted.
fn acknowledged(log: &str) -> Vec<(String, i32)> {
    let mut plain = String::new();
    let mut chars = log.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // An ANSI colour sequence: ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(ch);
        }
    }
    plain
        .lines()
        .filter(|l| l.contains("task reported"))
        .map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {l:?}"))
                    .to_string()
            };
            (field("task_id="), field("attempt=").parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_with_reports_in_flight_loses_nothing_acknowledged() {
    let mut c = Cluster::start().await;
    let victim = c.add_worker("victim", "cpu", &["--slots", "16"]);
    let campaign = c
        .create(&common::one_round_spec(
            "crash",
            "    - { name: work, kind: custom, shards: 1000, params: { sleep_ms: 50 } }\n",
            "",
        ))
        .await;
    let mut conn = c.db.connect().await;
    let succeeded =
        "SELECT count(*) FROM tasks WHERE campaign_id = $1::uuid AND state = 'succeeded'";
    until("40 tasks to succeed", Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar(succeeded)
            .bind(&campaign.id)
            .fetch_one(&mut c.db.connect().await)
            .await
            .unwrap();
        (n >= 40).then_some(())
    })
    .await;
    // Killed while it runs 16 tasks and reports others: some of its results are finished but
    // not (or not yet known to be) recorded.
    c.workers[victim].kill9();
    let log = std::fs::read_to_string(c.dir.join("victim.log")).unwrap();
    let acked = acknowledged(&log);
    assert!(!acked.is_empty(), "the log shows no acknowledged result");
    let left: i64 = sqlx::query_scalar(succeeded)
        .bind(&campaign.id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(left < 1000, "the victim finished everything before it died");

    c.add_worker("rescuer", "cpu", &["--slots", "16"]);
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(120))
        .await;
    // Every task succeeded exactly once; each acknowledged result is the one that counts.
    let attempts: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT a.task_id::text, a.attempt, a.state FROM attempts a JOIN tasks t ON t.id = a.task_id
         WHERE t.campaign_id = $1::uuid",
    )
    .bind(&campaign.id)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut wins: HashMap<&str, Vec<i32>> = HashMap::new();
    for (task, attempt, state) in &attempts {
        if state == "succeeded" {
            wins.entry(task).or_default().push(*attempt);
        }
    }
    assert_eq!(wins.len(), 1000);
    assert!(
        wins.values().all(|w| w.len() == 1),
        "a task succeeded twice"
    );
    let acked: HashSet<(String, i32)> = acked.into_iter().collect();
    for (task, attempt) in &acked {
        assert_eq!(
            wins.get(task.as_str()),
            Some(&vec![*attempt]),
            "task {task}: attempt {attempt} was acknowledged but is not the recorded success"
        );
    }
    // What the victim had not got acknowledged ran again (lease expired, retried).
    let rerun = attempts
        .iter()
        .filter(|(_, _, state)| state == "lease_expired")
        .count();
    assert!(rerun > 0, "no attempt was in flight when the worker died");
}

/// Two controllers on one database settle the last two shards of a stage at the same time: each
/// transaction sees the other's shard still running when it writes its own. Whichever decides
/// second (is the stage done, may its successor run) must see the first one's commit, or the
/// successor stays blocked for good. Here the test plays the other controller: it completes one
/// shard in an open transaction holding the campaign's settling lock, while the controller's
/// writer settles the other.
#[tokio::test(flavor = "multi_thread")]
async fn a_stage_whose_last_shards_settle_concurrently_releases_its_successor() {
    use flywheel_orchestrator::store;
    let c = Cluster::start().await;
    let (mut w, id, mut stream) = hand_worker(&c, 2).await;
    let campaign = c
        .create(&common::one_round_spec(
            "concurrent-settle",
            "    - { name: fan, kind: custom, shards: 2 }\n    - { name: next, kind: custom, needs: [fan] }\n",
            "",
        ))
        .await;
    let a = stream.message().await.unwrap().expect("an assignment");
    let b = stream.message().await.unwrap().expect("an assignment");
    let uuid = |s: &str| uuid::Uuid::parse_str(s).unwrap();

    let mut other = c.db.connect().await;
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    let done = [(
        uuid(&a.task_id),
        a.attempt,
        uuid(&id),
        serde_json::json!({}),
    )];
    assert_eq!(
        store::tasks::complete(&mut other, &done)
            .await
            .unwrap()
            .len(),
        1
    );
    store::campaigns::lock_settling(&mut other, &[uuid(&campaign.id)])
        .await
        .unwrap();
    assert!(
        store::tasks::unblock_dependents(&mut other, &[uuid(&a.task_id)])
            .await
            .unwrap()
            .is_empty(),
        "the other shard still runs as this transaction sees it"
    );

    let report = tokio::spawn(async move {
        w.report(ReportRequest {
            worker_id: id,
            completions: vec![completion(&b.task_id, b.attempt, vec![])],
            ..Default::default()
        })
        .await
        .unwrap()
    });
    common::until_advisory_lock_awaited(&c.db, "the writer").await;
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();

    let reply = report.await.unwrap();
    assert_eq!(reply.completions[0].outcome, Outcome::Accepted as i32);
    let next = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the successor stage is released")
        .unwrap()
        .expect("an assignment");
    assert_eq!(next.stage, "next");
}

/// A worker's slot is free once it reports the attempt ended, before the report is written:
/// the next task is claimed and sent while the completion still waits for the writer. The
/// completion is acknowledged only once written, and then counts.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_is_refilled_while_its_completion_is_being_written() {
    let c = Cluster::start().await;
    let (w, id, mut stream) = hand_worker(&c, 1).await;
    let campaign = c
        .create(&common::one_round_spec(
            "refill",
            "    - { name: work, kind: custom, shards: 2 }\n",
            "",
        ))
        .await;
    let a = stream.message().await.unwrap().expect("an assignment");

    // Hold the campaign's settling lock: the writer, which takes it before committing a
    // completion, waits.
    let mut other = common::hold_settling_lock(&c.db, &campaign.id).await;
    let (mut reporter, reporter_id, done) = (w.clone(), id.clone(), a.clone());
    let report = tokio::spawn(async move {
        reporter
            .report(ReportRequest {
                worker_id: reporter_id,
                completions: vec![completion(&done.task_id, done.attempt, vec![])],
                ..Default::default()
            })
            .await
            .unwrap()
    });
    let b = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the freed slot is given the next shard while the completion waits")
        .unwrap()
        .expect("an assignment");
    assert_ne!(b.task_id, a.task_id);
    common::until_advisory_lock_awaited(&c.db, "the writer").await;
    assert!(!report.is_finished(), "acknowledged before it was written");
    assert_eq!(
        states(&c, &campaign.id).await,
        [(0, "running".into(), 1), (1, "running".into(), 1)],
        "both attempts run as the store sees it, the first one's end not yet written"
    );

    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    let reply = report.await.unwrap();
    assert_eq!(reply.completions[0].outcome, Outcome::Accepted as i32);
    let mut w = w;
    let reply = w
        .report(ReportRequest {
            worker_id: id,
            completions: vec![completion(&b.task_id, b.attempt, vec![])],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reply.completions[0].outcome, Outcome::Accepted as i32);
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(30))
        .await;
}

/// The worker agent's heartbeats do not wait behind its results: while a completion waits for
/// the writer (the settling lock held elsewhere), the worker's heartbeats still reach the
/// controller, which hears from it after the stall began. The completion is then written.
#[tokio::test(flavor = "multi_thread")]
async fn an_agents_heartbeats_go_on_while_its_results_wait_to_be_written() {
    let mut c = Cluster::start().await;
    c.add_worker("cpu-1", "cpu", &[]);
    let campaign = c
        .create(&common::one_round_spec(
            "beats-beside-results",
            "    - { name: work, kind: custom, params: { sleep_ms: 1000 } }\n",
            "",
        ))
        .await;
    until("the task to run", Duration::from_secs(20), || async {
        (states(&c, &campaign.id).await == [(0, "running".to_string(), 1)]).then_some(())
    })
    .await;
    let mut other = common::hold_settling_lock(&c.db, &campaign.id).await;
    common::until_advisory_lock_awaited(&c.db, "the writer, with the completion").await;
    let stalled = std::time::Instant::now();
    let admin = c.admin_client().await;
    until(
        "a heartbeat received after the results stalled",
        Duration::from_secs(20),
        || {
            let mut admin = admin.clone();
            async move {
                let workers = admin.list_workers().await.ok()?;
                let w = workers.iter().find(|w| w.name == "cpu-1")?;
                (w.heartbeat_age_s + 0.05 < stalled.elapsed().as_secs_f64()
                    && stalled.elapsed() > Duration::from_secs(1))
                .then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        states(&c, &campaign.id).await,
        [(0, "running".into(), 1)],
        "the completion was written while the settling lock was held"
    );
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(30))
        .await;
    assert_eq!(states(&c, &campaign.id).await, [(0, "succeeded".into(), 1)]);
}
