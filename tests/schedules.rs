//! Schedules, templates and steering. Firing logic runs under a controlled clock (time is a
//! parameter of `fire_due`) against a real database; two-controller firing and steering run
//! against real controller and worker processes.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{Cluster, TestDb, example_spec, until};
use flywheel_orchestrator::schedules::{self, Firing, NewScheduleRequest};
use flywheel_orchestrator::store;
use flywheel_proto::v1::{
    CampaignAction, CreateCampaignRequest, CreateScheduleRequest, ExtendCampaignRequest,
    SetPromotionGateRequest,
};
use sqlx::PgPool;
use tonic::Code;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

async fn migrated_pool(db: &TestDb) -> PgPool {
    let pool = store::connect(&db.url, 8).await.unwrap();
    store::migrate(&pool).await.unwrap();
    pool
}

/// The example spec as a template: its name carries the firing date, its base model a parameter.
fn template() -> String {
    example_spec(&[
        (
            "name: test-backend-two-rounds",
            "name: nightly-{{ fire_date }}",
        ),
        ("uri: \"test://models/base\"", "uri: \"{{ base_model }}\""),
        ("rounds: 2", "rounds: 1"),
    ])
}

fn request(name: &str, cron: &str, tz: &str, overlap: &str) -> NewScheduleRequest {
    NewScheduleRequest {
        name: name.into(),
        cron: cron.into(),
        time_zone: tz.into(),
        template_yaml: template(),
        params: BTreeMap::from([("base_model".into(), "test://models/base-v2".into())]),
        mode: "new_campaign".into(),
        rounds_per_fire: 1,
        overlap: overlap.into(),
        catch_up_window_s: 600,
    }
}

fn outcomes(fired: &[Firing]) -> Vec<(String, &'static str)> {
    fired
        .iter()
        .map(|f| (f.scheduled_for.to_rfc3339(), f.outcome))
        .collect()
}

async fn campaign_status(pool: &PgPool, id: uuid::Uuid) -> String {
    let mut conn = pool.acquire().await.unwrap();
    store::campaigns::get(&mut conn, id)
        .await
        .unwrap()
        .unwrap()
        .status
        .to_string()
}

#[tokio::test]
async fn a_schedule_fires_under_a_controlled_clock_across_a_dst_change() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    // 02:00 Berlin does not exist on 2026-03-29: that night it fires at 03:00 CEST (01:00 UTC).
    let s = schedules::create(
        &pool,
        &request("nightly", "0 2 * * *", "Europe/Berlin", "skip"),
        "alice",
        at("2026-03-28T12:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(s.next_fire_at, at("2026-03-29T01:00:00Z"));
    assert_eq!(
        schedules::upcoming(&s, at("2026-03-28T12:00:00Z"), 3),
        [
            at("2026-03-29T01:00:00Z"),
            at("2026-03-30T00:00:00Z"),
            at("2026-03-31T00:00:00Z")
        ]
    );

    assert!(
        schedules::fire_due(&pool, at("2026-03-29T00:59:59Z"))
            .await
            .unwrap()
            .is_empty()
    );
    let fired = schedules::fire_due(&pool, at("2026-03-29T01:00:01Z"))
        .await
        .unwrap();
    assert_eq!(
        outcomes(&fired),
        [("2026-03-29T01:00:00+00:00".to_string(), "started")]
    );
    let id = fired[0].campaign_id.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let c = store::campaigns::get(&mut conn, id).await.unwrap().unwrap();
    assert_eq!(c.name, "nightly-2026-03-29", "fire_date is the local date");
    assert!(c.spec_yaml.contains("test://models/base-v2"));
    assert_eq!(c.created_by, "schedule:nightly");
    let events = store::events::list_after(&mut conn, id, 0, 100)
        .await
        .unwrap();
    assert_eq!(events[0].kind, "campaign_created");
    assert_eq!(events[0].actor, "schedule:nightly");
    // Handled once: the same instant again does nothing, and the next firing moved on.
    assert!(
        schedules::fire_due(&pool, at("2026-03-29T01:00:02Z"))
            .await
            .unwrap()
            .is_empty()
    );
    let s = schedules::get(&pool, "nightly").await.unwrap();
    assert_eq!(s.next_fire_at, at("2026-03-30T00:00:00Z"));
}

#[tokio::test]
async fn schedules_and_templates_refuse_bad_input_naming_the_field() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let now = at("2026-11-26T00:00:00Z");
    let err = |r: NewScheduleRequest| {
        let pool = pool.clone();
        async move {
            schedules::create(&pool, &r, "alice", now)
                .await
                .unwrap_err()
                .to_string()
        }
    };
    let mut r = request("x", "61 * * * *", "UTC", "skip");
    assert_eq!(
        err(r.clone()).await,
        "cron: cron minute: 61 is out of range 0-59"
    );
    r.cron = "@daily".into();
    r.time_zone = "Mars/Olympus".into();
    assert!(
        err(r.clone())
            .await
            .starts_with("time_zone: time zone: unknown zone")
    );
    r.time_zone = "UTC".into();
    r.params.clear();
    assert_eq!(
        err(r.clone()).await,
        "params: template parameter base_model: no value given (pass it as base_model=...)"
    );
    r.params.insert("base_model".into(), "test://m".into());
    r.params.insert("extra".into(), "1".into());
    assert_eq!(
        err(r.clone()).await,
        "params: template parameter extra: not used by the template"
    );
    r.params.remove("extra");
    r.template_yaml = r
        .template_yaml
        .replace("{ count: 12 }", "{ count: 12 }\n      shards: 0");
    let msg = err(r.clone()).await;
    assert!(
        msg.starts_with(
            "template_yaml: after filling, invalid campaign spec: recipe.stages[0].shards"
        ),
        "{msg}"
    );
    let mut r = request("x", "@daily", "UTC", "cancel_old");
    r.mode = "append_rounds".into();
    assert!(
        err(r.clone())
            .await
            .starts_with("overlap: cancel_old would cancel")
    );
    r.overlap = "sometimes".into();
    assert!(
        err(r.clone())
            .await
            .starts_with("overlap: \"sometimes\" is not one of")
    );
    let mut r = request("x", "@daily", "UTC", "skip");
    r.catch_up_window_s = 1;
    assert_eq!(
        err(r.clone()).await,
        "catch_up_window_s: must be at least 10 seconds"
    );
    // Nothing was stored by any of these; a good one is, once.
    assert!(schedules::list(&pool).await.unwrap().is_empty());
    let good = request("x", "@daily", "UTC", "skip");
    schedules::create(&pool, &good, "alice", now).await.unwrap();
    assert_eq!(
        err(good).await,
        "name: a schedule named \"x\" already exists"
    );
}

/// Fires `*/10 * * * *` at minute 0 (starting a campaign), then at minute 10 while it runs.
async fn overlap_case(pool: &PgPool, name: &str, overlap: &str) -> (uuid::Uuid, Vec<Firing>) {
    schedules::create(
        pool,
        &request(name, "*/10 * * * *", "UTC", overlap),
        "alice",
        at("2026-11-26T09:55:00Z"),
    )
    .await
    .unwrap();
    let first = schedules::fire_due(pool, at("2026-11-26T10:00:01Z"))
        .await
        .unwrap();
    let first: Vec<_> = first.into_iter().filter(|f| f.schedule == name).collect();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].outcome, "started");
    let second = schedules::fire_due(pool, at("2026-11-26T10:10:01Z"))
        .await
        .unwrap();
    let second = second.into_iter().filter(|f| f.schedule == name).collect();
    (first[0].campaign_id.unwrap(), second)
}

#[tokio::test]
async fn overlap_policies_decide_what_a_firing_does_while_the_previous_run_goes_on() {
    // One database per policy keeps the cases independent.
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let (a, fired) = overlap_case(&pool, "skip", "skip").await;
    assert_eq!(fired[0].outcome, "skipped_overlap");
    assert!(fired[0].message.contains(&a.to_string()));
    assert_eq!(campaign_status(&pool, a).await, "running");

    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let (a, fired) = overlap_case(&pool, "allow", "allow").await;
    assert_eq!(fired[0].outcome, "started");
    assert_ne!(fired[0].campaign_id, Some(a));
    assert_eq!(campaign_status(&pool, a).await, "running");

    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let (a, fired) = overlap_case(&pool, "cancel", "cancel_old").await;
    assert_eq!(fired[0].outcome, "started");
    assert!(fired[0].message.contains("cancelled the previous run"));
    assert_eq!(campaign_status(&pool, a).await, "cancelled");
    let mut conn = pool.acquire().await.unwrap();
    let events = store::events::list_after(&mut conn, a, 0, 100)
        .await
        .unwrap();
    let cancelled = events
        .iter()
        .find(|e| e.kind == "campaign_cancelled")
        .unwrap();
    assert_eq!(cancelled.actor, "schedule:cancel");
    assert!(cancelled.message.contains("superseded by the firing for"));
    drop(conn);

    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let (a, fired) = overlap_case(&pool, "buffer", "buffer_one").await;
    assert_eq!(fired[0].outcome, "buffered");
    // A second overlapping firing finds the buffer full.
    let fired = schedules::fire_due(&pool, at("2026-11-26T10:20:01Z"))
        .await
        .unwrap();
    assert_eq!(fired[0].outcome, "skipped_overlap");
    assert!(fired[0].message.contains("already buffered"));
    // Still running: nothing starts.
    assert!(
        schedules::fire_due(&pool, at("2026-11-26T10:21:00Z"))
            .await
            .unwrap()
            .is_empty()
    );
    // The previous run finishes: the buffered firing (for 10:10) starts at the next tick.
    let mut conn = pool.acquire().await.unwrap();
    store::campaigns::set_status(&mut conn, a, store::campaigns::CampaignStatus::Succeeded)
        .await
        .unwrap();
    drop(conn);
    let fired = schedules::fire_due(&pool, at("2026-11-26T10:22:00Z"))
        .await
        .unwrap();
    assert_eq!(
        outcomes(&fired),
        [("2026-11-26T10:10:00+00:00".to_string(), "started")]
    );
    assert!(
        schedules::get(&pool, "buffer")
            .await
            .unwrap()
            .buffered_for
            .is_none()
    );
}

#[tokio::test]
async fn append_mode_extends_one_long_running_campaign() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let mut r = request("weekly", "0 6 * * mon", "UTC", "allow");
    r.mode = "append_rounds".into();
    r.rounds_per_fire = 2;
    schedules::create(&pool, &r, "alice", at("2026-11-26T00:00:00Z"))
        .await
        .unwrap();
    let fired = schedules::fire_due(&pool, at("2026-11-30T06:00:01Z"))
        .await
        .unwrap();
    assert_eq!(fired[0].outcome, "started");
    let id = fired[0].campaign_id.unwrap();
    // The campaign finished its round; the next firing appends two rounds and it runs again.
    let mut conn = pool.acquire().await.unwrap();
    store::campaigns::set_status(&mut conn, id, store::campaigns::CampaignStatus::Succeeded)
        .await
        .unwrap();
    let fired = schedules::fire_due(&pool, at("2026-12-07T06:00:01Z"))
        .await
        .unwrap();
    assert_eq!(fired[0].outcome, "appended");
    assert_eq!(fired[0].campaign_id, Some(id));
    let c = store::campaigns::get(&mut conn, id).await.unwrap().unwrap();
    assert_eq!(
        (c.status.as_str(), c.rounds_total, c.current_round),
        ("running", 3, 1)
    );
    let rounds = store::rounds::list(&mut conn, id).await.unwrap();
    assert_eq!(rounds.len(), 2, "round 1 was planned by the append");
    let events = store::events::list_after(&mut conn, id, 0, 100)
        .await
        .unwrap();
    let extended = events
        .iter()
        .find(|e| e.kind == "campaign_extended")
        .unwrap();
    assert_eq!(extended.actor, "schedule:weekly");
}

#[tokio::test]
async fn catch_up_after_an_outage_fires_within_the_window_and_records_what_it_skipped() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    let mut r = request("hourly", "0 * * * *", "UTC", "skip");
    r.catch_up_window_s = 90 * 60;
    schedules::create(&pool, &r, "alice", at("2026-11-26T07:30:00Z"))
        .await
        .unwrap();
    // The controller was down from before 08:00 until 11:05.
    let fired = schedules::fire_due(&pool, at("2026-11-26T11:05:00Z"))
        .await
        .unwrap();
    assert_eq!(
        outcomes(&fired),
        [
            ("2026-11-26T08:00:00+00:00".to_string(), "skipped_missed"),
            ("2026-11-26T09:00:00+00:00".to_string(), "skipped_missed"),
            ("2026-11-26T10:00:00+00:00".to_string(), "started"),
            ("2026-11-26T11:00:00+00:00".to_string(), "skipped_overlap"),
        ]
    );
    assert!(
        fired[0]
            .message
            .contains("beyond the catch-up window of 5400s")
    );
    let s = schedules::get(&pool, "hourly").await.unwrap();
    assert_eq!(s.next_fire_at, at("2026-11-26T12:00:00Z"));
    let runs = schedules::recent_runs(&pool, s.id, 10).await.unwrap();
    assert_eq!(runs.len(), 4, "every scheduled time has a recorded outcome");

    // Paused schedules do not fire; resuming does not fire what passed while paused.
    schedules::pause(&pool, "hourly", "alice").await.unwrap();
    assert!(
        schedules::fire_due(&pool, at("2026-11-26T13:00:00Z"))
            .await
            .unwrap()
            .is_empty()
    );
    let s = schedules::resume(&pool, "hourly", "alice", at("2026-11-26T13:30:00Z"))
        .await
        .unwrap();
    assert_eq!(s.next_fire_at, at("2026-11-26T14:00:00Z"));
    schedules::delete(&pool, "hourly", "alice").await.unwrap();
    assert!(schedules::get(&pool, "hourly").await.is_err());
}

#[tokio::test]
async fn concurrent_firing_handles_each_scheduled_time_once() {
    let db = TestDb::new().await;
    let pool = migrated_pool(&db).await;
    schedules::create(
        &pool,
        &request("race", "*/5 * * * *", "UTC", "allow"),
        "alice",
        at("2026-11-26T09:59:00Z"),
    )
    .await
    .unwrap();
    let mut t = at("2026-11-26T10:00:01Z");
    for _ in 0..10 {
        // Two controllers' ticks at the same moment, on separate connections.
        let (a, b) = tokio::join!(schedules::fire_due(&pool, t), schedules::fire_due(&pool, t));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.len() + b.len(), 1, "one of them fired, once");
        t += chrono::Duration::minutes(5);
    }
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(store::campaigns::list(&mut conn).await.unwrap().len(), 10);
}

#[tokio::test]
async fn two_controller_processes_fire_a_schedule_once() {
    let c = Cluster::start().await;
    let (_second, second_addr) = c.spawn_controller("controller-2", "127.0.0.1:0").await;
    let mut admin = c.admin_client().await;
    // Every 2 seconds; "allow" so that every firing starts a campaign.
    let s = admin
        .create_schedule(CreateScheduleRequest {
            name: "often".into(),
            cron: "*/2 * * * * *".into(),
            template_yaml: template(),
            params: [("base_model".to_string(), "test://m".to_string())].into(),
            overlap: "allow".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(s.upcoming.len(), 5);
    let pool = store::connect(&c.db.url, 2).await.unwrap();
    let id = uuid::Uuid::parse_str(&s.id).unwrap();
    let runs = until("six firings", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            let runs = schedules::recent_runs(&pool, id, 100).await.unwrap();
            (runs.len() >= 6).then_some(runs)
        }
    })
    .await;
    let mut times: Vec<_> = runs.iter().map(|r| r.scheduled_for).collect();
    times.sort();
    times.dedup();
    assert_eq!(times.len(), runs.len(), "no scheduled time handled twice");
    assert!(runs.iter().all(|r| r.outcome == "started"), "{runs:#?}");
    for w in times.windows(2) {
        assert_eq!(w[1] - w[0], chrono::Duration::seconds(2), "no time skipped");
    }
    let mut conn = pool.acquire().await.unwrap();
    let campaigns = store::campaigns::list(&mut conn).await.unwrap();
    assert!(campaigns.len() >= runs.len());
    // The second controller answers with the same state.
    let mut other =
        flywheel_proto::ControlClient::connect(&format!("http://{second_addr}"), &c.admin)
            .await
            .unwrap();
    assert_eq!(other.list_schedules().await.unwrap()[0].name, "often");
    other.pause_schedule("often".into()).await.unwrap();
    let d = admin.get_schedule("often".into()).await.unwrap();
    assert_eq!(d.schedule.unwrap().status, "paused");
    let err = c
        .client_with(&c.read_token)
        .await
        .delete_schedule("often".into())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    admin.delete_schedule("often".into()).await.unwrap();
    assert_eq!(
        admin.get_schedule("often".into()).await.unwrap_err().code(),
        Code::NotFound
    );
}

async fn task_states(c: &Cluster, id: &str, round: i32, stage: &str) -> Vec<(String, String)> {
    c.rounds(id)
        .await
        .into_iter()
        .find(|r| r.index == round)
        .map(|r| {
            r.stages
                .into_iter()
                .filter(|s| s.name == stage)
                .flat_map(|s| s.tasks)
                .map(|t| (t.state, t.started_at))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the first shard of a stage is in `state`.
async fn wait_task(c: &Cluster, id: &str, round: i32, stage: &str, state: &str) {
    until(
        &format!("round {round} {stage} to be {state}"),
        Duration::from_secs(20),
        || async move {
            let s = task_states(c, id, round, stage).await;
            (s.first().map(|t| t.0.as_str()) == Some(state)).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn pause_resume_extend_regate_and_cancel_a_running_campaign() {
    let mut c = Cluster::start().await;
    c.add_worker("cpu-1", "cpu", &["--slots", "4"]);
    c.add_worker(
        "gpu-1",
        "gpu",
        &["--gpu-kind", "h100", "--gpu-count", "1", "--slots", "4"],
    );
    let mut admin = c.admin_client().await;
    // A template submitted with its values; the first stage is slow enough to pause during.
    let spec = example_spec(&[
        ("rounds: 2", "rounds: {{ rounds }}"),
        (
            "params: { count: 12 }",
            "params: { count: 12, sleep_ms: {{ slow_ms }} }",
        ),
    ]);
    let err = admin
        .create_campaign_from(CreateCampaignRequest {
            spec_yaml: spec.clone(),
            params: [("rounds".to_string(), "1".to_string())].into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("slow_ms: no value given"),
        "{}",
        err.message()
    );
    let campaign = admin
        .create_campaign_from(CreateCampaignRequest {
            spec_yaml: spec,
            params: [
                ("rounds".to_string(), "1".to_string()),
                ("slow_ms".to_string(), "2500".to_string()),
            ]
            .into(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let id = campaign.id.clone();
    let action = |reason: &str| CampaignAction {
        campaign_id: id.clone(),
        reason: reason.into(),
    };

    // Pause while the first stage runs: it finishes, nothing new starts.
    wait_task(&c, &id, 0, "prompts", "running").await;
    admin.pause_campaign(action("maintenance")).await.unwrap();
    wait_task(&c, &id, 0, "prompts", "succeeded").await;
    // Extend and re-gate while paused: round 1 will need an impossible win rate.
    let x = admin
        .extend_campaign(ExtendCampaignRequest {
            campaign_id: id.clone(),
            rounds: 1,
            reason: "one more".into(),
        })
        .await
        .unwrap();
    assert_eq!(x.rounds_total, 2);
    let bad_gate = admin
        .set_promotion_gate(SetPromotionGateRequest {
            campaign_id: id.clone(),
            stage: "promote".into(),
            require: [("evaluate.nope".to_string(), "=> 2".to_string())].into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_gate.code(), Code::InvalidArgument);
    assert!(
        bad_gate
            .message()
            .contains("require.evaluate.nope: condition must look like")
    );
    admin
        .set_promotion_gate(SetPromotionGateRequest {
            campaign_id: id.clone(),
            stage: "promote".into(),
            require: [("evaluate.win_rate".to_string(), ">= 2".to_string())].into(),
            reason: "stricter from now on".into(),
        })
        .await
        .unwrap();
    let generate = task_states(&c, &id, 0, "generate").await;
    assert!(
        generate
            .iter()
            .all(|(s, started)| s == "queued" && started.is_empty()),
        "nothing starts while paused: {generate:?}"
    );
    admin.resume_campaign(action("")).await.unwrap();

    let done = c
        .wait_status(&id, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(done.rounds_total, 2);
    let rounds = c.rounds(&id).await;
    assert_eq!(
        rounds[0].decision, "promoted",
        "round 0 kept the gate it was planned with"
    );
    assert_eq!(rounds[1].decision, "rejected");
    assert!(
        rounds[1].decision_reason.contains("needs >= 2"),
        "{}",
        rounds[1].decision_reason
    );

    // A finished campaign can be extended: round 2 runs; cancel reaches it.
    admin
        .extend_campaign(ExtendCampaignRequest {
            campaign_id: id.clone(),
            rounds: 1,
            reason: String::new(),
        })
        .await
        .unwrap();
    wait_task(&c, &id, 2, "prompts", "running").await;
    admin.cancel_campaign(action("enough")).await.unwrap();
    wait_task(&c, &id, 2, "prompts", "cancelled").await;

    // Every action is an event naming who did it; generation started only after the resume.
    let mut events = admin.stream_events(id.clone(), 0).await.unwrap();
    let mut seen = Vec::new();
    while let Some(e) = events.message().await.unwrap() {
        let done = e.kind == "campaign_cancelled";
        seen.push(e);
        if done {
            break;
        }
    }
    let by_alice: Vec<&str> = seen
        .iter()
        .filter(|e| e.actor == "alice")
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        by_alice,
        [
            "campaign_created",
            "campaign_paused",
            "campaign_extended",
            "gate_changed",
            "campaign_resumed",
            "campaign_extended",
            "campaign_cancelled"
        ]
    );
    let resumed_at = &seen
        .iter()
        .find(|e| e.kind == "campaign_resumed")
        .unwrap()
        .created_at;
    let rounds = c.rounds(&id).await;
    for t in &rounds[0].stages[1].tasks {
        assert!(
            t.started_at >= *resumed_at,
            "{} < {resumed_at}",
            t.started_at
        );
    }
}
