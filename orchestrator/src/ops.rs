//! Campaign operations that people trigger through the control API. Each one is a single
//! transaction whose result, including its event, is committed before the caller hears of it.

use serde_json::json;
use uuid::Uuid;

use crate::Controller;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::planner;
use crate::spec::CampaignSpec;
use crate::store::attempts::AttemptState;
use crate::store::{self, campaigns::CampaignRow, events::NewEvent};
use flywheel_proto::state::{CampaignStatus, RoundStatus, Steer, TaskState};

fn event(campaign_id: Uuid, kind: &'static str, message: String, actor: &Principal) -> NewEvent {
    NewEvent {
        campaign_id: Some(campaign_id),
        task_id: None,
        kind,
        message,
        actor: actor.name.clone(),
        data: json!({}),
    }
}

/// Stores a validated campaign and its starting models, and plans round 0. With a
/// `request_id`, a repeated call returns the campaign the first one created.
pub(crate) async fn create_campaign(
    ctl: &Controller,
    spec_yaml: &str,
    spec: &CampaignSpec,
    request_id: Option<&str>,
    actor: &Principal,
) -> Result<CampaignRow> {
    if let Some(request_id) = request_id {
        let mut conn = ctl.pool.acquire().await?;
        if let Some(existing) = store::campaigns::by_request_id(&mut conn, request_id).await? {
            return same_request(existing, spec_yaml, request_id);
        }
    }
    let mut tx = ctl.pool.begin().await?;
    let id = create_campaign_in(&mut tx, spec_yaml, spec, actor).await?;
    if let Some(request_id) = request_id {
        store::campaigns::set_request_id(&mut tx, id, request_id).await?;
    }
    if let Err(e) = tx.commit().await {
        // Two calls with one request id raced; the other one's campaign stands.
        if let (Some(request_id), Some(db)) = (request_id, e.as_database_error())
            && db.is_unique_violation()
        {
            let mut conn = ctl.pool.acquire().await?;
            if let Some(existing) = store::campaigns::by_request_id(&mut conn, request_id).await? {
                return same_request(existing, spec_yaml, request_id);
            }
        }
        return Err(e.into());
    }
    ctl.queue_changed();
    ctl.events_changed();
    tracing::info!(campaign_id = %id, name = %spec.name, "campaign created");
    get(ctl, id).await
}

/// A retried create: the campaign its request id made, if the spec is the same one.
fn same_request(existing: CampaignRow, spec_yaml: &str, request_id: &str) -> Result<CampaignRow> {
    if existing.spec_yaml == spec_yaml {
        Ok(existing)
    } else {
        Err(Error::FailedPrecondition(format!(
            "request_id {request_id:?} already created campaign {} from a different spec",
            existing.id
        )))
    }
}

/// The transactional part of [`create_campaign`], shared with schedule firings.
pub(crate) async fn create_campaign_in(
    tx: &mut store::PgConnection,
    spec_yaml: &str,
    spec: &CampaignSpec,
    actor: &Principal,
) -> Result<Uuid> {
    let id = Uuid::new_v4();
    store::campaigns::insert(
        tx,
        store::campaigns::NewCampaign {
            id,
            name: &spec.name,
            spec_yaml,
            spec: serde_json::to_value(spec).expect("spec serializes"),
            rounds_total: spec.rounds as i32,
            created_by: &actor.name,
        },
    )
    .await?;
    let m = &spec.models;
    let generator =
        store::artifacts::insert_external(tx, id, "model", &m.generator.name, &m.generator.uri)
            .await?;
    let base =
        store::artifacts::insert_external(tx, id, "model", &m.base.name, &m.base.uri).await?;
    let reward =
        store::artifacts::insert_external(tx, id, "model", &m.reward.name, &m.reward.uri).await?;
    store::campaigns::set_models(tx, id, generator, base, reward).await?;
    store::events::insert(
        tx,
        event(
            id,
            "campaign_created",
            format!(
                "campaign {:?} created with {} rounds",
                spec.name, spec.rounds
            ),
            actor,
        ),
    )
    .await?;
    planner::plan_round(tx, id, spec, 0, generator).await?;
    Ok(id)
}

pub(crate) async fn get(ctl: &Controller, id: Uuid) -> Result<CampaignRow> {
    let mut conn = ctl.pool.acquire().await?;
    store::campaigns::get(&mut conn, id)
        .await?
        .ok_or_else(|| Error::NotFound {
            what: "campaign",
            id: id.to_string(),
        })
}

async fn locked(tx: &mut store::PgConnection, id: Uuid) -> Result<CampaignRow> {
    store::campaigns::lock(tx, id)
        .await?
        .ok_or_else(|| Error::NotFound {
            what: "campaign",
            id: id.to_string(),
        })
}

/// Pause, resume or cancel a campaign: one transaction that locks it, checks the action against
/// its status ([`Steer::apply`]), sets the new status and records the event.
pub(crate) async fn steer(
    ctl: &Controller,
    id: Uuid,
    action: Steer,
    reason: &str,
    actor: &Principal,
) -> Result<CampaignRow> {
    let mut tx = ctl.pool.begin().await?;
    match action {
        Steer::Cancel => cancel_in(&mut tx, id, reason, actor).await?,
        Steer::Pause | Steer::Resume => {
            let c = locked(&mut tx, id).await?;
            let to = action.apply(c.status).map_err(Error::FailedPrecondition)?;
            store::campaigns::set_status(&mut tx, id, to).await?;
            if action == Steer::Pause {
                stop_serving(&mut tx, id, None, "campaign paused").await?;
            }
            let (kind, message) = if action == Steer::Pause {
                ("campaign_paused", "campaign paused")
            } else {
                ("campaign_resumed", "campaign resumed")
            };
            let e = event(id, kind, with_reason(message, reason), actor);
            store::events::insert(&mut tx, e).await?;
        }
    }
    tx.commit().await?;
    // Running tasks may have been told to stop (cancel) or taken off their workers (pause):
    // their next heartbeats must hear it.
    ctl.registry.rewrite_leases();
    if action == Steer::Resume {
        ctl.queue_changed();
        ctl.planner_wake.notify_one();
    }
    ctl.events_changed();
    get(ctl, id).await
}

/// Stops the running servers of a campaign (or of one of its rounds) that is not going on:
/// their serve tasks go back to the queue and start again when it runs, and their endpoints
/// are gone (consumers wait for the next). Inside the caller's transaction.
pub(crate) async fn stop_serving(
    tx: &mut store::PgConnection,
    campaign_id: Uuid,
    round_id: Option<Uuid>,
    why: &str,
) -> Result<()> {
    let requeued = store::tasks::requeue_serving(tx, campaign_id, round_id).await?;
    let closed: Vec<_> = requeued
        .iter()
        .map(|(id, attempt)| (*id, *attempt, AttemptState::Cancelled, Some(why)))
        .collect();
    store::attempts::finish_many(tx, &closed).await?;
    let ids: Vec<Uuid> = requeued.iter().map(|r| r.0).collect();
    store::endpoints::retire(tx, &ids, false).await?;
    Ok(())
}

/// Cancel, inside a transaction (also a schedule's `cancel_old`): waiting tasks are cancelled
/// now; running ones are told to stop at their next heartbeat.
pub(crate) async fn cancel_in(
    tx: &mut store::PgConnection,
    id: Uuid,
    reason: &str,
    actor: &Principal,
) -> Result<()> {
    let c = locked(tx, id).await?;
    let to = Steer::Cancel
        .apply(c.status)
        .map_err(Error::FailedPrecondition)?;
    store::campaigns::set_status(tx, id, to).await?;
    let running = store::tasks::cancel_campaign(tx, id).await?;
    store::rounds::set_status_for_campaign(tx, id, RoundStatus::Running, RoundStatus::Cancelled)
        .await?;
    let message = with_reason(
        &format!(
            "campaign cancelled; {} running task(s) told to stop",
            running.len()
        ),
        reason,
    );
    store::events::insert(tx, event(id, "campaign_cancelled", message, actor)).await?;
    Ok(())
}

/// Extend by `rounds` more rounds. A campaign that already finished its rounds runs again from
/// its current generator.
pub(crate) async fn extend(
    ctl: &Controller,
    id: Uuid,
    rounds: u32,
    reason: &str,
    actor: &Principal,
) -> Result<CampaignRow> {
    let mut tx = ctl.pool.begin().await?;
    extend_in(&mut tx, id, rounds, reason, actor).await?;
    tx.commit().await?;
    ctl.queue_changed();
    ctl.events_changed();
    get(ctl, id).await
}

/// The transactional part of [`extend`], shared with `append_rounds` schedule firings.
pub(crate) async fn extend_in(
    tx: &mut store::PgConnection,
    id: Uuid,
    rounds: u32,
    reason: &str,
    actor: &Principal,
) -> Result<()> {
    if rounds == 0 || rounds > 1000 {
        return Err(Error::invalid("rounds", "must be between 1 and 1000"));
    }
    let c = locked(tx, id).await?;
    if matches!(c.status, CampaignStatus::Failed | CampaignStatus::Cancelled) {
        return Err(Error::FailedPrecondition(format!(
            "campaign is {}; only a running, paused or succeeded campaign can be extended",
            c.status
        )));
    }
    let total = c.rounds_total + rounds as i32;
    store::campaigns::set_rounds_total(tx, id, total).await?;
    if c.status == CampaignStatus::Succeeded {
        // Every planned round is settled: plan the next one from the current generator.
        let spec = CampaignSpec::stored(c.id, &c.spec)?;
        let generator = c
            .current_generator_id
            .ok_or_else(|| Error::FailedPrecondition("campaign has no current generator".into()))?;
        let next = c.current_round + 1;
        planner::plan_round(tx, id, &spec, next, generator).await?;
        store::campaigns::advance(tx, id, next, generator).await?;
        store::campaigns::set_status(tx, id, CampaignStatus::Running).await?;
    }
    let mut e = event(
        id,
        "campaign_extended",
        with_reason(
            &format!("campaign extended by {rounds} round(s) to {total}"),
            reason,
        ),
        actor,
    );
    e.data = json!({ "added": rounds, "rounds_total": total });
    store::events::insert(tx, e).await?;
    Ok(())
}

/// Replaces the promotion gate of a `promote` stage for rounds planned from now on; the round in
/// flight keeps the gate it was planned with.
pub(crate) async fn set_gate(
    ctl: &Controller,
    id: Uuid,
    stage: &str,
    require: &std::collections::BTreeMap<String, String>,
    reason: &str,
    actor: &Principal,
) -> Result<CampaignRow> {
    let mut tx = ctl.pool.begin().await?;
    let c = locked(&mut tx, id).await?;
    if c.status.is_final() {
        return Err(Error::FailedPrecondition(format!(
            "campaign is {}; the gate only applies to rounds still to come",
            c.status
        )));
    }
    let spec = CampaignSpec::stored(c.id, &c.spec)?.with_gate(stage, require)?;
    store::campaigns::set_spec(
        &mut tx,
        id,
        serde_json::to_value(&spec).expect("spec serializes"),
    )
    .await?;
    let gate: Vec<String> = require.iter().map(|(m, c)| format!("{m} {c}")).collect();
    let mut e = event(
        id,
        "gate_changed",
        with_reason(
            &format!(
                "promotion gate of stage {stage:?} for rounds after {}: {}",
                c.current_round,
                gate.join(", ")
            ),
            reason,
        ),
        actor,
    );
    e.data = json!({ "stage": stage, "require": require, "from_round": c.current_round + 1 });
    store::events::insert(&mut tx, e).await?;
    tx.commit().await?;
    ctl.events_changed();
    get(ctl, id).await
}

/// Re-runs a failed or cancelled stage of a round and everything downstream of it; nothing
/// upstream runs again. Returns the ids of the tasks that will run.
pub(crate) async fn retry_stage(
    ctl: &Controller,
    id: Uuid,
    round_index: i32,
    stage: &str,
    actor: &Principal,
) -> Result<Vec<Uuid>> {
    let mut tx = ctl.pool.begin().await?;
    let c = locked(&mut tx, id).await?;
    if matches!(
        c.status,
        CampaignStatus::Succeeded | CampaignStatus::Cancelled
    ) {
        return Err(Error::FailedPrecondition(format!(
            "campaign is {}; only a failed, running or paused campaign can retry a stage",
            c.status
        )));
    }
    let round = store::rounds::find(&mut tx, id, round_index)
        .await?
        .ok_or_else(|| {
            Error::invalid(
                "round_index",
                format!("campaign has no round {}", round_index + 1),
            )
        })?;
    let stage_tasks = store::tasks::ids_of_stage(&mut tx, round.id, stage).await?;
    if stage_tasks.is_empty() {
        return Err(Error::invalid(
            "stage",
            format!("round {} has no stage {stage:?}", round_index + 1),
        ));
    }
    if !stage_tasks
        .iter()
        .any(|(_, s)| matches!(s, TaskState::Failed | TaskState::Cancelled))
    {
        return Err(Error::FailedPrecondition(format!(
            "stage {stage:?} of round {} has no failed or cancelled task to retry",
            round_index + 1
        )));
    }
    // The stage's unfinished shards and everything downstream of them; finished shards and
    // their own descendants keep their results.
    let roots: Vec<Uuid> = stage_tasks
        .iter()
        .filter(|(_, s)| *s != TaskState::Succeeded)
        .map(|(t, _)| *t)
        .collect();
    let mut redo = roots.clone();
    redo.extend(store::task_edges::descendants(&mut tx, &roots).await?);
    let reset = store::tasks::reset(&mut tx, &redo).await?;
    // Which reset tasks may run is decided from their dependencies' states: under the settling
    // lock (taken after the rows, as the writer does), so a dependency completing meanwhile is
    // seen either here or by the writer's unblocking.
    store::campaigns::lock_settling(&mut tx, &[id]).await?;
    store::tasks::queue_ready(&mut tx, &reset).await?;
    if round.status != RoundStatus::Running {
        store::rounds::reopen(&mut tx, round.id).await?;
    }
    if c.status != CampaignStatus::Running {
        store::campaigns::set_status(&mut tx, id, CampaignStatus::Running).await?;
    }
    let mut e = event(
        id,
        "stage_retried",
        format!(
            "stage {stage:?} of round {} retried: {} task(s) will run again",
            round_index + 1,
            reset.len()
        ),
        actor,
    );
    e.data = json!({ "round": round_index, "stage": stage, "tasks": reset });
    store::events::insert(&mut tx, e).await?;
    tx.commit().await?;
    ctl.queue_changed();
    ctl.events_changed();
    Ok(reset)
}

fn with_reason(message: &str, reason: &str) -> String {
    if reason.trim().is_empty() {
        message.to_string()
    } else {
        format!("{message}: {reason}")
    }
}
