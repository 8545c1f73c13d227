//! Row structs → wire messages, and wire maps → JSON. The only place that knows both shapes.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use flywheel_proto::v1 as pb;
use serde_json::{Map, Value};

use crate::dispatch::Capabilities;
use crate::error::{Error, Result};
use crate::spec::StageKind;
use crate::store::tasks::TaskState;
use crate::store::{
    artifacts::ArtifactRow, attempts::AttemptRow, campaigns::CampaignRow, endpoints::EndpointRow,
    events::EventRow, rounds::RoundRow, schedule_runs::ScheduleRunRow, schedules::ScheduleRow,
    tasks::TaskRow, workers::WorkerRow,
};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn opt_ts(t: Option<DateTime<Utc>>) -> String {
    t.map(ts).unwrap_or_default()
}

fn opt_id(id: Option<uuid::Uuid>) -> String {
    id.map(|i| i.to_string()).unwrap_or_default()
}

/// Metrics from the wire: every value must be finite.
pub(super) fn metrics_json(field: &'static str, m: &HashMap<String, f64>) -> Result<Value> {
    crate::limits::entries(field, m.len())?;
    let mut out = Map::new();
    for (k, v) in m {
        crate::limits::name(field, k)?;
        if !v.is_finite() {
            return Err(Error::invalid(
                field,
                format!("metric {k:?} is not a finite number"),
            ));
        }
        out.insert(k.clone(), Value::from(*v));
    }
    Ok(Value::Object(out))
}

fn metrics_map(v: &Value) -> HashMap<String, f64> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn campaign(c: CampaignRow) -> pb::Campaign {
    pb::Campaign {
        id: c.id.to_string(),
        name: c.name,
        status: c.status.to_string(),
        rounds_total: c.rounds_total,
        current_round: c.current_round,
        current_generator_id: opt_id(c.current_generator_id),
        current_generator_uri: c.current_generator_uri.unwrap_or_default(),
        created_at: ts(c.created_at),
        updated_at: ts(c.updated_at),
    }
}

/// A task's state as people should read it: a queued worker task that no connected worker can
/// run is "waiting_for_worker", not silently queued.
fn visible_state(t: &TaskRow, workers: &[Capabilities]) -> String {
    if t.state == TaskState::Queued
        && t.kind != StageKind::Promote.as_str()
        && !workers
            .iter()
            .any(|w| w.can_run(&t.pool, &t.backend, &t.gpu_kind, t.gpu_count))
    {
        "waiting_for_worker".into()
    } else {
        t.state.to_string()
    }
}

fn stage_state(tasks: &[pb::Task]) -> String {
    let any = |s: &str| tasks.iter().any(|t| t.state == s);
    if tasks.iter().all(|t| t.state == "succeeded") {
        "succeeded"
    } else if any("failed") {
        "failed"
    } else if any("running") {
        "running"
    } else if any("waiting_for_worker") {
        "waiting_for_worker"
    } else if any("queued") {
        "queued"
    } else if any("cancelled") {
        "cancelled"
    } else if any("succeeded") {
        "running"
    } else {
        "blocked"
    }
    .into()
}

/// Rounds with their stages and tasks; `needs` maps each stage of the recipe to its inputs.
pub(super) fn rounds(
    rounds: Vec<RoundRow>,
    tasks: Vec<TaskRow>,
    workers: &[Capabilities],
    needs: &HashMap<String, Vec<String>>,
) -> Vec<pb::Round> {
    rounds
        .into_iter()
        .map(|r| {
            let mut stages: Vec<pb::Stage> = Vec::new();
            for t in tasks.iter().filter(|t| t.round_id == r.id) {
                let task = task(t, workers);
                match stages.last_mut() {
                    Some(s) if s.name == t.stage => s.tasks.push(task),
                    _ => stages.push(pb::Stage {
                        name: t.stage.clone(),
                        kind: t.kind.clone(),
                        state: String::new(),
                        tasks: vec![task],
                        needs: needs.get(&t.stage).cloned().unwrap_or_default(),
                    }),
                }
            }
            for s in &mut stages {
                s.state = stage_state(&s.tasks);
            }
            pb::Round {
                index: r.round_index,
                status: r.status.to_string(),
                generator_id: r.generator_id.to_string(),
                trained_model_id: opt_id(r.trained_model_id),
                decision: r.decision.unwrap_or_default(),
                decision_reason: r.decision_reason.unwrap_or_default(),
                metrics: metrics_map(&r.metrics),
                stages,
                started_at: ts(r.started_at),
                finished_at: opt_ts(r.finished_at),
            }
        })
        .collect()
}

pub(super) fn worker(w: WorkerRow) -> pb::Worker {
    pb::Worker {
        id: w.id.to_string(),
        name: w.name,
        pool: w.pool,
        backends: w.backends,
        gpu_kind: w.gpu_kind,
        gpu_count: w.gpu_count.max(0) as u32,
        labels: w
            .labels
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        status: w.status,
        heartbeat_age_s: w.heartbeat_age_s,
        current_tasks: w.current_tasks.iter().map(ToString::to_string).collect(),
        slots: w.slots.max(0) as u32,
    }
}

pub(super) fn artifact(a: ArtifactRow) -> pb::Artifact {
    pb::Artifact {
        id: a.id.to_string(),
        campaign_id: opt_id(a.campaign_id),
        round_index: a.round_index.unwrap_or(-1),
        kind: a.kind,
        name: a.name,
        uri: a.uri,
        content_hash: a.content_hash,
        config_hash: a.config_hash,
        producer_task_id: opt_id(a.producer_task_id),
        producer_stage: a.producer_stage.unwrap_or_default(),
        parent_ids: a.parent_ids.iter().map(ToString::to_string).collect(),
        generator_id: opt_id(a.generator_id),
        judge_id: opt_id(a.judge_id),
        metadata_json: a.metadata.to_string(),
        created_at: ts(a.created_at),
    }
}

pub(super) fn endpoint(e: EndpointRow) -> pb::ServedEndpoint {
    pb::ServedEndpoint {
        task_id: e.task_id.to_string(),
        attempt: e.attempt,
        round_index: e.round_index,
        stage: e.stage,
        url: e.url,
        served_name: e.served_name,
        model_id: opt_id(e.model_id),
        content_hash: e.content_hash,
        state: e.state,
        ready_at: ts(e.ready_at),
        finished_at: e.finished_at.map(ts).unwrap_or_default(),
    }
}

pub(super) fn event(e: EventRow) -> pb::Event {
    pb::Event {
        id: e.id,
        campaign_id: opt_id(e.campaign_id),
        kind: e.kind,
        message: e.message,
        actor: e.actor,
        data_json: e.data.to_string(),
        created_at: ts(e.created_at),
    }
}

pub(super) fn task(t: &TaskRow, workers: &[Capabilities]) -> pb::Task {
    pb::Task {
        id: t.id.to_string(),
        shard_index: t.shard_index,
        shard_count: t.shard_count,
        state: visible_state(t, workers),
        attempt: t.attempt,
        max_attempts: t.max_attempts,
        worker_id: opt_id(t.worker_id),
        progress: t.progress,
        last_error: t.last_error.clone().unwrap_or_default(),
        started_at: opt_ts(t.started_at),
        finished_at: opt_ts(t.finished_at),
        progress_message: t.progress_message.clone(),
    }
}

pub(super) fn task_detail(
    t: TaskRow,
    attempts: Vec<AttemptRow>,
    depends_on: Vec<uuid::Uuid>,
    workers: &[Capabilities],
) -> pb::TaskDetail {
    pb::TaskDetail {
        task: Some(task(&t, workers)),
        campaign_id: t.campaign_id.to_string(),
        round_index: t.round_index,
        stage: t.stage,
        kind: t.kind,
        pool: t.pool,
        backend: t.backend,
        params_json: t.params.to_string(),
        progress_metrics_json: t.progress_metrics.to_string(),
        metrics_json: t.metrics.to_string(),
        attempts: attempts
            .into_iter()
            .map(|a| pb::Attempt {
                attempt: a.attempt,
                worker_id: a.worker_id.to_string(),
                state: a.state.to_string(),
                error: a.error.unwrap_or_default(),
                started_at: ts(a.started_at),
                finished_at: opt_ts(a.finished_at),
                external_job: a.external_job.unwrap_or_default(),
            })
            .collect(),
        depends_on: depends_on.iter().map(ToString::to_string).collect(),
    }
}

pub(super) fn schedule(s: ScheduleRow, now: DateTime<Utc>) -> pb::Schedule {
    let upcoming: Vec<String> = crate::schedules::upcoming(&s, now, 5)
        .into_iter()
        .map(ts)
        .collect();
    pb::Schedule {
        id: s.id.to_string(),
        next_fire_at: upcoming.first().cloned().unwrap_or_default(),
        upcoming,
        params: serde_json::from_value(s.params).unwrap_or_default(),
        name: s.name,
        cron: s.cron,
        time_zone: s.time_zone,
        mode: s.mode,
        rounds_per_fire: s.rounds_per_fire as u32,
        overlap: s.overlap,
        catch_up_window_s: s.catch_up_window_s as u32,
        status: s.status,
        buffered_for: opt_ts(s.buffered_for),
        target_campaign_id: opt_id(s.target_campaign_id),
        created_by: s.created_by,
        created_at: ts(s.created_at),
        template_yaml: s.template_yaml,
    }
}

pub(super) fn schedule_run(r: ScheduleRunRow) -> pb::ScheduleRun {
    pb::ScheduleRun {
        scheduled_for: ts(r.scheduled_for),
        outcome: r.outcome,
        campaign_id: opt_id(r.campaign_id),
        message: r.message,
        recorded_at: ts(r.recorded_at),
    }
}

/// A schedule request from the wire, with the documented defaults filled in.
pub(super) fn new_schedule(r: pb::CreateScheduleRequest) -> crate::schedules::NewScheduleRequest {
    fn or(s: String, default: &str) -> String {
        if s.trim().is_empty() {
            default.to_string()
        } else {
            s
        }
    }
    crate::schedules::NewScheduleRequest {
        name: r.name,
        cron: r.cron,
        time_zone: or(r.time_zone, "UTC"),
        template_yaml: r.template_yaml,
        params: r.params.into_iter().collect(),
        mode: or(r.mode, "new_campaign"),
        rounds_per_fire: if r.rounds_per_fire == 0 {
            1
        } else {
            r.rounds_per_fire
        },
        overlap: or(r.overlap, "skip"),
        catch_up_window_s: if r.catch_up_window_s == 0 {
            600
        } else {
            r.catch_up_window_s
        },
    }
}
