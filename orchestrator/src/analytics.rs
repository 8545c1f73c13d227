//! Round analytics the controller adds to a round's metrics when the round finishes, beside
//! the stage metrics (the filter's acceptance, reward, length, diversity and agreement figures
//! come from the worker that ran it):
//!
//! - cost: `round.worker_seconds` (slot-seconds of every attempt, failed ones included),
//!   `round.gpu_seconds` (duration × the worker's GPUs per slot, where pools declare GPUs),
//!   `round.accepted_samples` (SFT records + preference pairs of the round's filter stages) and
//!   both per accepted sample (`round.worker_seconds_per_accepted`,
//!   `round.gpu_seconds_per_accepted`);
//! - drift: for each metric of [`DRIFTING`] a stage reported in this round and the previous one,
//!   `<stage>.<metric>_drift` = this round's value − the previous round's.
//!
//! The name `round` is reserved for these: no stage may have it.

use serde_json::{Map, Value, json};

use crate::store::tasks::TaskRow;
use flywheel_proto::stage::StageKind;
use flywheel_proto::state::TaskState;

/// The stage metrics whose change from round to round is recorded.
pub(crate) const DRIFTING: &[&str] = &[
    "reward_mean",
    "reward_p10",
    "reward_p50",
    "reward_p90",
    "response_chars_mean",
    "response_words_mean",
    "response_distinct_2",
    "prompt_distinct_2",
    "rm_checker_agreement",
    "sft_acceptance_rate",
    "pair_acceptance_rate",
];

/// The reserved prefix of round-level metrics.
pub(crate) const ROUND: &str = "round";

/// Adds cost and drift to `metrics` (a finishing round's metrics). `usage` is what the round's
/// attempts cost (slot-seconds, GPU-seconds); `previous` the previous round's stored metrics.
pub(crate) fn add(
    metrics: &mut Map<String, Value>,
    tasks: &[TaskRow],
    usage: (f64, Option<f64>),
    previous: Option<&Value>,
) {
    let accepted: f64 = tasks
        .iter()
        .filter(|t| t.state == TaskState::Succeeded && t.kind == StageKind::Filter.as_str())
        .flat_map(|t| ["sft_records", "pair_records"].map(|k| t.metrics[k].as_f64()))
        .flatten()
        .sum();
    let (worker_seconds, gpu_seconds) = usage;
    let mut put = |k: &str, v: f64| {
        if v.is_finite() {
            metrics.insert(format!("{ROUND}.{k}"), json!(v));
        }
    };
    put("worker_seconds", worker_seconds);
    put("accepted_samples", accepted);
    if accepted > 0.0 {
        put("worker_seconds_per_accepted", worker_seconds / accepted);
    }
    if let Some(gpu) = gpu_seconds {
        put("gpu_seconds", gpu);
        if accepted > 0.0 {
            put("gpu_seconds_per_accepted", gpu / accepted);
        }
    }
    let Some(previous) = previous.and_then(Value::as_object) else {
        return;
    };
    let drifts: Vec<(String, f64)> = metrics
        .iter()
        .filter(|(k, _)| {
            k.rsplit_once('.')
                .is_some_and(|(_, name)| DRIFTING.contains(&name))
        })
        .filter_map(|(k, v)| {
            Some((
                format!("{k}_drift"),
                v.as_f64()? - previous.get(k)?.as_f64()?,
            ))
        })
        .collect();
    for (k, d) in drifts {
        metrics.insert(k, json!(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(kind: &str, state: TaskState, metrics: Value) -> TaskRow {
        TaskRow {
            id: uuid::Uuid::nil(),
            campaign_id: uuid::Uuid::nil(),
            round_id: uuid::Uuid::nil(),
            round_index: 1,
            stage: kind.into(),
            stage_order: 0,
            kind: kind.into(),
            shard_index: 0,
            shard_count: 1,
            params: json!({}),
            pool: "cpu".into(),
            backend: "test".into(),
            gpu_kind: String::new(),
            gpu_count: 0,
            state,
            attempt: 1,
            max_attempts: 1,
            worker_id: None,
            progress: 1.0,
            progress_message: String::new(),
            progress_metrics: json!({}),
            metrics,
            last_error: None,
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn cost_per_accepted_sample_and_drift() {
        let tasks = [
            task(
                "filter",
                TaskState::Succeeded,
                json!({ "sft_records": 30.0, "pair_records": 10.0 }),
            ),
            task(
                "generate",
                TaskState::Succeeded,
                json!({ "sft_records": 99.0 }),
            ),
        ];
        let mut m: Map<String, Value> = serde_json::from_value(json!({
            "filter.reward_mean": 2.5, "filter.sft_acceptance_rate": 0.5, "filter.samples": 80.0,
        }))
        .unwrap();
        let previous = json!({ "filter.reward_mean": 2.0, "filter.samples": 60.0 });
        add(&mut m, &tasks, (120.0, Some(40.0)), Some(&previous));
        assert_eq!(m["round.accepted_samples"], 40.0, "filter stages only");
        assert_eq!(m["round.worker_seconds"], 120.0);
        assert_eq!(m["round.worker_seconds_per_accepted"], 3.0);
        assert_eq!(m["round.gpu_seconds"], 40.0);
        assert_eq!(m["round.gpu_seconds_per_accepted"], 1.0);
        assert_eq!(m["filter.reward_mean_drift"], 0.5);
        assert!(
            !m.contains_key("filter.sft_acceptance_rate_drift"),
            "no previous value"
        );
        assert!(
            !m.contains_key("filter.samples_drift"),
            "not a drifting metric"
        );
        let mut first = Map::new();
        add(&mut first, &tasks[1..], (5.0, None), None);
        assert_eq!(first["round.accepted_samples"], 0.0);
        assert!(!first.contains_key("round.gpu_seconds"));
        assert!(!first.contains_key("round.worker_seconds_per_accepted"));
    }
}
