//! Failure handling through real processes: dead workers, a restarted controller, retries,
//! permanent errors, retry-stage and cancellation.

mod common;

use std::time::Duration;

use common::{Cluster, until};
use flywheel_proto::v1::{
    CampaignAction, CompleteTaskRequest, HeartbeatRequest, OutputArtifact, RetryStageRequest,
    TaskProgress,
};
use sqlx::Row;
use tonic::Code;

fn spec(stages: &str, extra_defaults: &str) -> String {
    common::one_round_spec("failures", stages, extra_defaults)
}

/// `(attempt, state)` of every attempt of the tasks of one stage, in order.
async fn attempts(c: &Cluster, stage: &str) -> Vec<(i32, String)> {
    let mut conn = c.db.connect().await;
    sqlx::query("SELECT a.attempt, a.state FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE t.stage = $1 ORDER BY t.shard_index, a.attempt")
        .bind(stage)
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_workers_task_is_reclaimed_and_its_late_completion_rejected() {
    let mut c = Cluster::start().await;
    c.add_worker("cpu-1", "cpu", &[]);
    c.add_worker("cpu-2", "cpu", &[]);
    let stages =
        "    - { name: slow, kind: synthesize_prompts, params: { count: 4, sleep_ms: 1500 } }
    - { name: after, kind: custom }";
    let campaign = c.create(&spec(stages, "")).await;

    // Find the worker running the slow task, then kill -9 it mid-task.
    let (task_id, worker_id) = until(
        "slow task to be running",
        Duration::from_secs(20),
        || async {
            let rounds = c.rounds(&campaign.id).await;
            let t = &rounds[0].stages[0].tasks[0];
            (t.state == "running").then(|| (t.id.clone(), t.worker_id.clone()))
        },
    )
    .await;
    let workers = c.admin_client().await.list_workers().await.unwrap();
    let name = workers
        .iter()
        .find(|w| w.id == worker_id)
        .unwrap()
        .name
        .clone();
    let victim = c.workers.iter_mut().find(|p| p.name == name).unwrap();
    victim.kill9();

    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(30))
        .await;
    assert_eq!(
        attempts(&c, "slow").await,
        vec![(1, "lease_expired".into()), (2, "succeeded".into())]
    );

    // The dead attempt reports late: rejected, and nothing changes.
    let mut wc = c.worker_client().await;
    let late = wc
        .complete_task(CompleteTaskRequest {
            worker_id: worker_id.clone(),
            task_id: task_id.clone(),
            attempt: 1,
            outputs: vec![OutputArtifact {
                name: "prompts".into(),
                kind: "dataset".into(),
                uri: "file:///tmp/x".into(),
                content_hash: String::new(),
                metadata_json: String::new(),
            }],
            metrics: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(
        late.message().contains("stale attempt"),
        "{}",
        late.message()
    );
    let beat = wc
        .heartbeat(HeartbeatRequest {
            worker_id,
            tasks: vec![TaskProgress {
                task_id: task_id.clone(),
                attempt: 1,
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    assert_eq!(
        beat.tasks[0].directive,
        flywheel_proto::v1::Directive::Abandon as i32
    );
    assert_eq!(
        attempts(&c, "slow").await,
        vec![(1, "lease_expired".into()), (2, "succeeded".into())]
    );
    let mut conn = c.db.connect().await;
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM artifacts WHERE producer_task_id = $1::uuid")
            .bind(&task_id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(n, 1, "only the current attempt's output is recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_controller_finishes_the_campaign_without_rerunning_stages() {
    let mut c = Cluster::start().await;
    c.add_worker("gpu-1", "gpu", &["--gpu-kind", "h100", "--gpu-count", "1"]);
    c.add_worker("cpu-1", "cpu", &[]);
    let spec = common::example_spec(&[(
        "params: { lr: 0.0001, steps: 50 }",
        "params: { lr: 0.0001, steps: 50, sleep_ms: 1200 }",
    )]);
    let campaign = c.create(&spec).await;
    until(
        "round 0 sft to be running",
        Duration::from_secs(30),
        || async {
            let rounds = c.rounds(&campaign.id).await;
            (rounds[0].stages[4].state == "running").then_some(())
        },
    )
    .await;
    c.controller.as_mut().unwrap().kill9();
    c.start_controller().await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(60))
        .await;

    let mut conn = c.db.connect().await;
    let rows = sqlx::query("SELECT t.stage, t.round_index, count(a.*) FROM tasks t LEFT JOIN attempts a ON a.task_id = t.id WHERE t.kind <> 'promote' GROUP BY t.id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        2 * 11,
        "prompts, 3 generate, 3 score, filter, sft, rpo, evaluate per round"
    );
    for r in rows {
        let n: i64 = r.get(2);
        assert_eq!(
            n,
            1,
            "stage {} of round {} ran {n} times",
            r.get::<String, _>(0),
            r.get::<i32, _>(1)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_errors_back_off_and_permanent_errors_do_not_retry() {
    let mut c = Cluster::start().await;
    c.add_worker("cpu-1", "cpu", &[]);
    let stages = "    - { name: flaky, kind: synthesize_prompts, params: { fail_attempts: 2 } }
    - { name: broken, kind: custom, params: { fail_permanently: true } }
    - { name: never, kind: custom }";
    let campaign = c.create(&spec(stages, "  max_attempts: 3")).await;
    c.wait_status(&campaign.id, "failed", Duration::from_secs(30))
        .await;
    assert_eq!(
        attempts(&c, "flaky").await,
        vec![
            (1, "failed".into()),
            (2, "failed".into()),
            (3, "succeeded".into())
        ]
    );
    assert_eq!(attempts(&c, "broken").await, vec![(1, "failed".into())]);
    let rounds = c.rounds(&campaign.id).await;
    assert_eq!(rounds[0].status, "failed");
    assert_eq!(rounds[0].stages[2].state, "blocked");
    assert!(
        rounds[0].stages[1].tasks[0]
            .last_error
            .contains("fails permanently")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_stage_reruns_exactly_the_failed_stage_and_its_descendants() {
    let mut c = Cluster::start().await;
    c.add_worker("gpu-1", "gpu", &["--gpu-kind", "h100", "--gpu-count", "1"]);
    c.add_worker("cpu-1", "cpu", &[]);
    let spec = common::example_spec(&[
        ("rounds: 2", "rounds: 1"),
        (
            "params: { margin: 0.2 }",
            "params: { margin: 0.2, fail_attempts: 1 }\n      max_attempts: 1",
        ),
    ]);
    let campaign = c.create(&spec).await;
    c.wait_status(&campaign.id, "failed", Duration::from_secs(30))
        .await;

    let mut admin = c.admin_client().await;
    let err = admin
        .retry_stage(RetryStageRequest {
            campaign_id: campaign.id.clone(),
            round_index: 0,
            stage: "score".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "score did not fail: {}",
        err.message()
    );
    let err = admin
        .retry_stage(RetryStageRequest {
            campaign_id: campaign.id.clone(),
            round_index: 0,
            stage: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let ids = admin
        .retry_stage(RetryStageRequest {
            campaign_id: campaign.id.clone(),
            round_index: 0,
            stage: "filter".into(),
        })
        .await
        .unwrap();
    assert_eq!(ids.len(), 5, "filter, sft, rpo, evaluate, promote");
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(30))
        .await;
    for upstream in ["prompts", "generate", "score"] {
        assert!(
            attempts(&c, upstream)
                .await
                .iter()
                .all(|(a, s)| *a == 1 && s == "succeeded"),
            "{upstream} ran again"
        );
    }
    assert_eq!(
        attempts(&c, "filter").await,
        vec![(1, "failed".into()), (2, "succeeded".into())]
    );
    for downstream in ["sft", "rpo", "evaluate"] {
        assert_eq!(
            attempts(&c, downstream).await,
            vec![(1, "succeeded".into())]
        );
    }
    let mut conn = c.db.connect().await;
    let actor: String = sqlx::query_scalar("SELECT actor FROM events WHERE kind = 'stage_retried'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(actor, "alice");
}

/// Retry-stage decides which reset tasks may run under the campaign's settling lock, as the
/// writer does: a dependency completing at the same moment is seen by one of them.
#[tokio::test(flavor = "multi_thread")]
async fn retry_stage_waits_for_the_settling_lock_before_queueing() {
    let mut c = Cluster::start().await;
    c.add_worker("cpu-1", "cpu", &[]);
    let stages = "    - { name: once, kind: custom, params: { fail_attempts: 1 } }";
    let campaign = c.create(&spec(stages, "  max_attempts: 1")).await;
    c.wait_status(&campaign.id, "failed", Duration::from_secs(30))
        .await;

    let mut other = common::hold_settling_lock(&c.db, &campaign.id).await;
    let mut admin = c.admin_client().await;
    let campaign_id = campaign.id.clone();
    let retry = tokio::spawn(async move {
        admin
            .retry_stage(RetryStageRequest {
                campaign_id,
                round_index: 0,
                stage: "once".into(),
            })
            .await
    });
    common::until_advisory_lock_awaited(&c.db, "retry-stage").await;
    // The waiter is retry-stage itself: its reset is not committed, so nothing ran again.
    assert_eq!(
        attempts(&c, "once").await,
        vec![(1, "failed".into())],
        "the task ran again while the settling lock was held"
    );
    assert!(!retry.is_finished());
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    assert_eq!(retry.await.unwrap().unwrap().len(), 1);
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(30))
        .await;
    assert_eq!(
        attempts(&c, "once").await,
        vec![(1, "failed".into()), (2, "succeeded".into())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_reaches_a_running_worker_through_its_heartbeat() {
    let mut c = Cluster::start().await;
    c.add_worker("cpu-1", "cpu", &[]);
    let stages = "    - { name: long, kind: custom, params: { sleep_ms: 600000 } }
    - { name: after, kind: custom }";
    let campaign = c.create(&spec(stages, "")).await;
    until(
        "long task to be running",
        Duration::from_secs(20),
        || async { (c.rounds(&campaign.id).await[0].stages[0].state == "running").then_some(()) },
    )
    .await;
    let mut admin = c.admin_client().await;
    let cancelled = admin
        .cancel_campaign(CampaignAction {
            campaign_id: campaign.id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    assert_eq!(cancelled.status, "cancelled");
    until(
        "the running task to stop",
        Duration::from_secs(10),
        || async {
            let rounds = c.rounds(&campaign.id).await;
            (rounds[0].stages[0].tasks[0].state == "cancelled").then_some(())
        },
    )
    .await;
    assert_eq!(attempts(&c, "long").await, vec![(1, "cancelled".into())]);
    assert_eq!(c.rounds(&campaign.id).await[0].stages[1].state, "cancelled");
    let err = admin
        .pause_campaign(CampaignAction {
            campaign_id: campaign.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}
