//! The round planner: turns a campaign spec into each round's stage DAG, runs promotion gates,
//! and settles rounds — planning round N+1 only after round N's promotion decision.
//!
//! Every step is one transaction that locks the round (and campaign) rows it changes, so two
//! controllers on one database cannot settle the same round twice.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::sync::watch;
use uuid::Uuid;

use crate::Controller;
use crate::error::Result;
use crate::spec::{CampaignSpec, Requirement, round_metrics};
use crate::store::{self, events::NewEvent, tasks::NewTask};
use crate::{analytics, cards};
use flywheel_proto::state::{CampaignStatus, Decision, RoundStatus, TaskState};

pub(crate) const SYSTEM_ACTOR: &str = "controller";

/// Inserts round `round_index` of a campaign: its row, one task per stage shard, and the edges.
/// Tasks without dependencies start `queued`.
pub(crate) async fn plan_round(
    conn: &mut PgConnection,
    campaign_id: Uuid,
    spec: &CampaignSpec,
    round_index: i32,
    generator_id: Uuid,
) -> Result<Uuid> {
    let round_id = Uuid::new_v4();
    store::rounds::insert(conn, round_id, campaign_id, round_index, generator_id).await?;
    let mut ids: HashMap<&str, Vec<Uuid>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut edges = Vec::new();
    for (order, stage) in spec.stages.iter().enumerate() {
        let config_hash = CampaignSpec::stage_config_hash(stage);
        let shard_ids: Vec<Uuid> = (0..stage.shards).map(|_| Uuid::new_v4()).collect();
        for (shard, id) in shard_ids.iter().enumerate() {
            let p = &stage.placement;
            tasks.push(NewTask {
                id: *id,
                campaign_id,
                round_id,
                round_index,
                stage: stage.name.clone(),
                stage_order: order as i32,
                kind: stage.kind.as_str().to_string(),
                shard_index: shard as i32,
                shard_count: stage.shards as i32,
                params: Value::Object(stage.params.clone()),
                config_hash: config_hash.clone(),
                pool: p.pool.clone(),
                backend: p.backend.clone(),
                gpu_kind: p.gpu_kind.clone(),
                gpu_count: p.gpu_count as i32,
                max_attempts: p.max_attempts as i32,
                backoff_initial_ms: p.backoff_initial_ms as i32,
                backoff_max_ms: p.backoff_max_ms as i32,
                state: if stage.needs.is_empty() {
                    TaskState::Queued
                } else {
                    TaskState::Blocked
                },
            });
            for need in &stage.needs {
                let upstream = &ids[need.as_str()];
                if upstream.len() == shard_ids.len() && upstream.len() > 1 {
                    // Same fan-out on both sides: shard i consumes shard i (pipelined).
                    edges.push((*id, upstream[shard]));
                } else {
                    edges.extend(upstream.iter().map(|u| (*id, *u)));
                }
            }
        }
        ids.insert(&stage.name, shard_ids);
    }
    store::tasks::insert_many(conn, &tasks).await?;
    store::task_edges::insert_many(conn, &edges).await?;
    store::events::insert(
        conn,
        NewEvent {
            campaign_id: Some(campaign_id),
            task_id: None,
            kind: "round_planned",
            message: format!("round {} planned: {} tasks", round_index + 1, tasks.len()),
            actor: SYSTEM_ACTOR.into(),
            data: json!({ "round": round_index, "generator_id": generator_id, "tasks": tasks.len() }),
        },
    )
    .await?;
    Ok(round_id)
}

/// Runs the planner until shutdown: woken when a stage finishes or a failed task will not simply
/// retry here (the writer), and for changes elsewhere ([`crate::wake`]).
pub(crate) async fn run(ctl: Arc<Controller>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = step(&ctl).await {
            tracing::warn!(error = %e, "planner step failed; will retry");
        }
        tokio::select! {
            _ = ctl.planner_wake.notified() => {}
            _ = tokio::time::sleep(crate::wake::IDLE_TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn step(ctl: &Controller) -> Result<()> {
    let mut changed = false;
    let promotions = {
        let mut conn = ctl.pool.acquire().await?;
        store::tasks::ready_promotions(&mut conn).await?
    };
    for task in promotions {
        changed |= run_promotion(ctl, task.id).await?;
    }
    let finished = {
        let mut conn = ctl.pool.acquire().await?;
        store::rounds::finished(&mut conn).await?
    };
    for round_id in finished {
        changed |= finish_round(ctl, round_id).await?;
    }
    let failed = {
        let mut conn = ctl.pool.acquire().await?;
        store::rounds::with_failed_task(&mut conn).await?
    };
    for round_id in failed {
        changed |= fail_round(ctl, round_id).await?;
    }
    if changed {
        ctl.events_changed();
        ctl.queue_changed();
    }
    Ok(())
}

fn metrics_of(tasks: &[store::tasks::TaskRow]) -> serde_json::Map<String, Value> {
    let metrics = round_metrics(
        tasks
            .iter()
            .filter(|t| t.state == TaskState::Succeeded)
            .filter_map(|t| t.metrics.as_object().map(|m| (t.stage.as_str(), m))),
    );
    metrics.into_iter().map(|(k, v)| (k, json!(v))).collect()
}

/// Runs a ready promote task: compares the round's metrics with the gate and records the decision.
async fn run_promotion(ctl: &Controller, task_id: Uuid) -> Result<bool> {
    let mut tx = ctl.pool.begin().await?;
    let Some(task) = store::tasks::lock_queued(&mut tx, task_id).await? else {
        // Release what this transaction locked now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(false);
    };
    let Some(round) = store::rounds::lock_running(&mut tx, task.round_id).await? else {
        // Release what this transaction locked now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(false);
    };
    let Some(campaign) = store::campaigns::get(&mut tx, task.campaign_id).await? else {
        // Release what this transaction locked now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(false);
    };
    let tasks = store::tasks::list_for_round(&mut tx, round.id).await?;
    let metrics = metrics_of(&tasks);
    let candidate = match store::tasks::last_training_task(&mut tx, round.id).await? {
        Some(t) => store::artifacts::model_of_task(&mut tx, t).await?,
        None => None,
    };
    // The gate the round was planned with: a gate changed later applies to later rounds.
    let requirements = Requirement::from_params(&task.params);
    let mut failures = Vec::new();
    for r in &requirements {
        match metrics.get(&r.metric_key()).and_then(Value::as_f64) {
            Some(v) if r.op.holds(v, r.value) => {}
            Some(v) => failures.push(format!(
                "{} = {v:.4}, needs {} {}",
                r.metric,
                r.op.as_str(),
                r.value
            )),
            None if r.metric_key() != r.metric => failures.push(format!(
                "{} was not reported by any stage (its interval, {}, is missing)",
                r.metric,
                r.metric_key()
            )),
            None => failures.push(format!("{} was not reported by any stage", r.metric)),
        }
    }
    if candidate.is_none() {
        failures.push("no trained model in this round".into());
    }
    let promoted = failures.is_empty();
    let (decision, reason) = if promoted {
        let passed: Vec<_> = requirements
            .iter()
            .map(|r| format!("{} {} {}", r.metric, r.op.as_str(), r.value))
            .collect();
        (
            Decision::Promoted,
            format!("gate passed: {}", passed.join(", ")),
        )
    } else {
        (
            Decision::Rejected,
            format!(
                "gate failed: {}; the previous generator stays",
                failures.join("; ")
            ),
        )
    };
    store::rounds::set_decision(
        &mut tx,
        round.id,
        decision,
        &reason,
        candidate,
        &Value::Object(metrics.clone()),
    )
    .await?;
    store::tasks::succeed_inline(
        &mut tx,
        task.id,
        &json!({ "promoted": if promoted { 1.0 } else { 0.0 } }),
    )
    .await?;
    store::events::insert(
        &mut tx,
        NewEvent {
            campaign_id: Some(campaign.id),
            task_id: Some(task.id),
            kind: if promoted { "round_promoted" } else { "round_rejected" },
            message: format!("round {}: {reason}", round.round_index + 1),
            actor: SYSTEM_ACTOR.into(),
            data: json!({ "round": round.round_index, "candidate_id": candidate, "metrics": metrics }),
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(campaign_id = %campaign.id, round = round.round_index, decision = %decision, "promotion gate ran");
    Ok(true)
}

/// Settles a round whose tasks all succeeded: applies the promotion, then plans the next round
/// or finishes the campaign.
async fn finish_round(ctl: &Controller, round_id: Uuid) -> Result<bool> {
    let mut tx = ctl.pool.begin().await?;
    let Some(round) = store::rounds::lock_running(&mut tx, round_id).await? else {
        // Release what this transaction locked now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(false);
    };
    let Some(campaign) = store::campaigns::lock(&mut tx, round.campaign_id).await? else {
        // Release what this transaction locked now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(false);
    };
    let tasks = store::tasks::list_for_round(&mut tx, round.id).await?;
    if tasks.iter().any(|t| t.state != TaskState::Succeeded) {
        tx.rollback().await?;
        return Ok(false);
    }
    let mut metrics = metrics_of(&tasks);
    let usage = store::attempts::usage_for_round(&mut tx, round.id).await?;
    let previous = if round.round_index > 0 {
        store::rounds::find(&mut tx, campaign.id, round.round_index - 1).await?
    } else {
        None
    };
    analytics::add(
        &mut metrics,
        &tasks,
        usage,
        previous.as_ref().map(|r| &r.metrics),
    );
    let artifacts = store::artifacts::list(&mut tx, campaign.id, None).await?;
    let facts = cards::RoundFacts {
        campaign_name: &campaign.name,
        campaign_id: campaign.id,
        rounds_total: campaign.rounds_total,
        round: &round,
        tasks: &tasks,
        artifacts: &artifacts,
        metrics: &metrics,
    };
    for card in cards::render(&facts) {
        store::round_cards::insert(
            &mut tx,
            round.id,
            card.kind,
            &card.markdown,
            &card.content_hash,
        )
        .await?;
    }
    let metrics = Value::Object(metrics);
    store::rounds::finish(&mut tx, round.id, RoundStatus::Succeeded, &metrics).await?;
    let generator = match (round.decision.as_deref(), round.trained_model_id) {
        (Some(d), Some(model)) if d == Decision::Promoted.as_str() => model,
        _ => round.generator_id,
    };
    let next = round.round_index + 1;
    let mut events = vec![NewEvent {
        campaign_id: Some(campaign.id),
        task_id: None,
        kind: "round_succeeded",
        message: format!("round {} finished", round.round_index + 1),
        actor: SYSTEM_ACTOR.into(),
        data: json!({ "round": round.round_index, "metrics": metrics, "generator_id": generator }),
    }];
    // The stored spec is read only where another round may follow: one that no longer reads
    // must not keep a campaign's last round from finishing.
    let follows = next < campaign.rounds_total && campaign.status.is_active();
    let spec = if follows {
        Some(CampaignSpec::stored(campaign.id, &campaign.spec)?)
    } else {
        None
    };
    let plateau = match spec.as_ref().and_then(|s| s.stop_when.as_ref()) {
        Some(stop) => plateau(&mut tx, campaign.id, stop)
            .await?
            .map(|gains| (stop, gains)),
        None => None,
    };
    match (&spec, &plateau) {
        (Some(spec), None) => {
            plan_round(&mut tx, campaign.id, spec, next, generator).await?;
            store::campaigns::advance(&mut tx, campaign.id, next, generator).await?;
        }
        _ => {
            store::campaigns::advance(&mut tx, campaign.id, round.round_index, generator).await?;
            if campaign.status.is_active() {
                store::campaigns::set_status(&mut tx, campaign.id, CampaignStatus::Succeeded)
                    .await?;
                events.push(match &plateau {
                    Some((stop, gains)) => NewEvent {
                        campaign_id: Some(campaign.id),
                        task_id: None,
                        kind: "campaign_plateaued",
                        message: format!(
                            "campaign stopped after round {} of {}: {} gained less than {} in each of the last {} round(s) ({})",
                            round.round_index + 1,
                            campaign.rounds_total,
                            stop.metric,
                            stop.gain_below,
                            stop.rounds,
                            gains.iter().map(|g| format!("{g:+.4}")).collect::<Vec<_>>().join(", ")
                        ),
                        actor: SYSTEM_ACTOR.into(),
                        data: json!({ "round": round.round_index, "metric": stop.metric, "gain_below": stop.gain_below,
                                      "rounds": stop.rounds, "gains": gains, "generator_id": generator }),
                    },
                    None => NewEvent {
                        campaign_id: Some(campaign.id),
                        task_id: None,
                        kind: "campaign_succeeded",
                        message: format!("campaign finished after {} rounds", round.round_index + 1),
                        actor: SYSTEM_ACTOR.into(),
                        data: json!({ "generator_id": generator }),
                    },
                });
            }
        }
    }
    store::events::insert_many(&mut tx, &events).await?;
    tx.commit().await?;
    tracing::info!(campaign_id = %campaign.id, round = round.round_index, "round finished");
    Ok(true)
}

/// The gains of `stop.metric` over the campaign's finished rounds (the one finishing in this
/// transaction included) when they make a plateau.
async fn plateau(
    tx: &mut PgConnection,
    campaign_id: Uuid,
    stop: &crate::spec::StopWhen,
) -> Result<Option<Vec<f64>>> {
    let history: Vec<Option<f64>> = store::rounds::list(tx, campaign_id)
        .await?
        .iter()
        .filter(|r| r.status == RoundStatus::Succeeded)
        .map(|r| r.metrics.get(&stop.metric).and_then(Value::as_f64))
        .collect();
    Ok(stop.plateau(&history))
}

/// Fails a round with a task that failed for good, and its campaign with it. Blocked tasks stay
/// blocked so that `retry-stage` can pick the round up again.
async fn fail_round(ctl: &Controller, round_id: Uuid) -> Result<bool> {
    let mut tx = ctl.pool.begin().await?;
    let Some(round) = store::rounds::lock_running(&mut tx, round_id).await? else {
        // Release what this transaction locked now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(false);
    };
    let Some(campaign) = store::campaigns::lock(&mut tx, round.campaign_id).await? else {
        // Release what this transaction locked now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(false);
    };
    let tasks = store::tasks::list_for_round(&mut tx, round.id).await?;
    let Some(failed) = tasks.iter().find(|t| t.state == TaskState::Failed) else {
        // Release what this transaction locked now, not when the connection is next used.
        tx.rollback().await?;
        return Ok(false);
    };
    let metrics = Value::Object(metrics_of(&tasks));
    store::rounds::finish(&mut tx, round.id, RoundStatus::Failed, &metrics).await?;
    crate::ops::stop_serving(&mut tx, campaign.id, Some(round.id), "round failed").await?;
    let error = failed.last_error.clone().unwrap_or_default();
    let mut events = vec![NewEvent {
        campaign_id: Some(campaign.id),
        task_id: Some(failed.id),
        kind: "round_failed",
        message: format!(
            "round {} failed: stage {} shard {} failed after {} attempt(s): {error}",
            round.round_index + 1,
            failed.stage,
            failed.shard_index,
            failed.attempt
        ),
        actor: SYSTEM_ACTOR.into(),
        data: json!({ "round": round.round_index, "stage": failed.stage, "error": error }),
    }];
    if campaign.status.is_active() {
        store::campaigns::set_status(&mut tx, campaign.id, CampaignStatus::Failed).await?;
        events.push(NewEvent {
            campaign_id: Some(campaign.id),
            task_id: None,
            kind: "campaign_failed",
            message: format!(
                "campaign failed in round {} (stage {}); retry-stage can resume it",
                round.round_index + 1,
                failed.stage
            ),
            actor: SYSTEM_ACTOR.into(),
            data: json!({ "round": round.round_index, "stage": failed.stage }),
        });
    }
    store::events::insert_many(&mut tx, &events).await?;
    tx.commit().await?;
    // Its servers were taken off their workers: their next heartbeats must hear it.
    ctl.registry.rewrite_leases();
    tracing::warn!(campaign_id = %campaign.id, round = round.round_index, stage = %failed.stage, "round failed");
    Ok(true)
}
