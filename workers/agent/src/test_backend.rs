//! The `test` backend: a deterministic stand-in for ML, for exercising the controller.
//!
//! It is **not** machine learning. Every stage reads its real inputs from the artifact store and
//! writes small, honest artifacts derived from them (JSONL datasets in TRL's shapes, JSON "model"
//! files), so lineage, hashes and data flow are checked for real. A "model" is a JSON file with
//! a `quality` number; training raises it by an amount computed from the training data, and
//! evaluation reports it back. Initial models named `test://...?quality=Q` start at Q.
//!
//! Its params are the stage contract's: its knobs (`TestKnobs`: `sleep_ms`, `fail_attempts`,
//! `fail_permanently`, `crash_attempts`) on every kind, and the builtin's params of the kind,
//! which it uses where it can (`count`, `k`, `policy`, `weights`, `verifier`, the filter's)
//! and records in its outputs' metadata (`params`) where it cannot (sampling and training
//! settings).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::artifacts;
use crate::backend::{Backend, Output, Task, TaskContext, TaskError, TaskResult};
use crate::datasets::{self, read_jsonl, write_jsonl};
use crate::reward_endpoint;
use flywheel_proto::stage::{
    BuiltinGenerate, BuiltinPreference, BuiltinPrompts, BuiltinScore, BuiltinSft, Role, StageKind,
    TestKnobs,
};

pub struct TestBackend;

impl Backend for TestBackend {
    fn name(&self) -> &str {
        "test"
    }

    fn run(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let attempt = task.assignment.attempt as i64;
        let knobs: TestKnobs = task.typed()?;
        if attempt <= knobs.crash_attempts {
            tracing::error!(
                attempt,
                "test backend: crashing the worker process as asked"
            );
            std::process::abort();
        }
        work_for(knobs.sleep_ms.max(0) as u64, ctx)?;
        if attempt <= knobs.fail_attempts {
            return Err(TaskError::retryable(format!(
                "test backend: attempt {attempt} fails as asked"
            )));
        }
        if knobs.fail_permanently {
            return Err(TaskError::permanent(
                "test backend: fails permanently as asked",
            ));
        }
        let prefix = task.assignment.output_prefix.as_str();
        let r = match task.kind {
            StageKind::SynthesizePrompts => synthesize(task, prefix),
            StageKind::Generate => generate(task, prefix),
            StageKind::Score => score(task, prefix),
            StageKind::Filter => datasets::filter_stage(task),
            StageKind::Sft => train(task, prefix, recorded::<BuiltinSft>(task)?),
            StageKind::Preference => train(task, prefix, recorded::<BuiltinPreference>(task)?),
            StageKind::Evaluate => evaluate(task),
            StageKind::Custom => Ok(TaskResult::default()),
            StageKind::Promote => Err(TaskError::permanent(
                "promote stages run in the controller, not on a backend",
            )),
            // The contract gives the test backend no serve kind; the controller never sends one.
            StageKind::Serve => Err(TaskError::permanent(
                "the test backend runs no servers; serve stages run on the external backend",
            )),
        }?;
        ctx.report(1.0, "done", &[]);
        Ok(r)
    }
}

/// The builtin params of the stage, resolved with their defaults, as recorded in the outputs.
fn recorded<T: flywheel_proto::stage::Params>(task: &Task) -> Result<Value, TaskError> {
    let p: T = task.typed()?;
    Ok(serde_json::to_value(p).expect("params serialize"))
}

fn work_for(ms: u64, ctx: &TaskContext) -> Result<(), TaskError> {
    let start = Instant::now();
    let total = Duration::from_millis(ms);
    while start.elapsed() < total {
        ctx.checkpoint()?;
        let done = start.elapsed().as_secs_f64() / total.as_secs_f64();
        ctx.report(done * 0.9, "working", &[]);
        std::thread::sleep(Duration::from_millis(10).min(total - start.elapsed().min(total)));
    }
    ctx.checkpoint()
}

fn unit_hash(parts: &[&str]) -> f64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64
}

/// A model's quality: from a test model file, or `?quality=Q` on an external uri (default 0.3).
fn model_quality(m: &flywheel_proto::v1::ArtifactRef) -> Result<f64, TaskError> {
    if m.uri.starts_with("file://") {
        let bytes = artifacts::read(&m.uri, &m.content_hash)?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| TaskError::permanent(format!("{}: not a test model: {e}", m.uri)))?;
        return v
            .get("quality")
            .and_then(Value::as_f64)
            .ok_or_else(|| TaskError::permanent(format!("{}: no quality", m.uri)));
    }
    Ok(m.uri
        .split("quality=")
        .nth(1)
        .and_then(|q| q.parse().ok())
        .unwrap_or(0.3))
}

fn synthesize(task: &Task, prefix: &str) -> Result<TaskResult, TaskError> {
    let a = &task.assignment;
    let p: BuiltinPrompts = task.typed()?;
    let count = p.count.max(0) as u64;
    let rows: Vec<Value> = (0..count)
        .map(|i| json!({ "id": format!("r{}-p{i}", a.round_index), "prompt": format!("round {} task {i}: add {} and {}", a.round_index, i, i * 7 % 13) }))
        .collect();
    let mut out = write_jsonl(prefix, Role::Prompts, "flywheel.prompts", &rows)?;
    out.metadata["params"] = serde_json::to_value(&p).expect("params serialize");
    Ok(TaskResult {
        outputs: vec![out],
        metrics: [("prompts".to_string(), count as f64)].into(),
    })
}

fn generate(task: &Task, prefix: &str) -> Result<TaskResult, TaskError> {
    let a = &task.assignment;
    let params: BuiltinGenerate = task.typed()?;
    let generator = task.input(task.role_param("policy", &params.policy)?)?;
    let quality = model_quality(generator)?;
    let k = params.k.max(1);
    let prompts = read_jsonl(&task.inputs(Role::Prompts))?;
    let mut rows = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        if i as i32 % a.shard_count.max(1) != a.shard_index {
            continue;
        }
        for s in 0..k {
            rows.push(json!({
                "prompt_id": p["id"], "prompt": p["prompt"], "sample": s,
                "response": format!("{} answer #{s} to: {}", generator.name, p["prompt"].as_str().unwrap_or_default()),
                "generator": generator.id, "generator_quality": quality,
            }));
        }
    }
    let n = rows.len() as f64;
    let mut out = write_jsonl(prefix, Role::Responses, "flywheel.responses", &rows)?;
    out.metadata["params"] = serde_json::to_value(&params).expect("params serialize");
    Ok(TaskResult {
        outputs: vec![out],
        metrics: [("responses".to_string(), n)].into(),
    })
}

fn score(task: &Task, prefix: &str) -> Result<TaskResult, TaskError> {
    let params: BuiltinScore = task.typed()?;
    let weights = reward_endpoint::weights(&params.weights);
    let mut rows = read_jsonl(&task.inputs(Role::Responses))?;
    for r in &mut rows {
        let q = r["generator_quality"].as_f64().unwrap_or(0.3);
        let id = format!("{}#{}", r["prompt_id"], r["sample"]);
        let attrs: Vec<f64> = [
            "helpfulness",
            "correctness",
            "coherence",
            "complexity",
            "verbosity",
        ]
        .iter()
        .map(|name| (4.0 * q + 1.5 * (unit_hash(&[&id, name]) - 0.5)).clamp(0.0, 4.0))
        .collect();
        let reward: f64 = attrs.iter().zip(&weights).map(|(a, w)| a * w).sum();
        r["attributes"] = json!({ "helpfulness": attrs[0], "correctness": attrs[1], "coherence": attrs[2], "complexity": attrs[3], "verbosity": attrs[4] });
        r["reward"] = json!(reward);
        if params.verifier {
            // A stand-in checker: a sample of a model of quality q passes with probability q.
            r["verified"] = json!(unit_hash(&[&id, "verified"]) < q);
        }
    }
    let mean = rows
        .iter()
        .filter_map(|r| r["reward"].as_f64())
        .sum::<f64>()
        / rows.len().max(1) as f64;
    let mut out = write_jsonl(prefix, Role::Scores, "flywheel.scores", &rows)?;
    out.metadata["params"] = serde_json::to_value(&params).expect("params serialize");
    Ok(TaskResult {
        outputs: vec![out],
        metrics: [
            ("records".to_string(), rows.len() as f64),
            ("mean_reward".to_string(), mean),
        ]
        .into(),
    })
}

/// "Training": the new quality moves toward the quality of the data (mean reward / 4) plus a
/// bonus that grows with the amount of data. SFT starts from the base model, preference
/// training from its `model` input (the SFT model).
fn train(task: &Task, prefix: &str, params: Value) -> Result<TaskResult, TaskError> {
    let a = &task.assignment;
    let (start, data_role) = if task.kind == StageKind::Sft {
        (task.input(Role::Base)?, Role::Sft)
    } else {
        (task.input(Role::Model)?, Role::Pairs)
    };
    let start_q = model_quality(start)?;
    let data = read_jsonl(&task.inputs(data_role))?;
    if data.is_empty() {
        return Err(TaskError::permanent(format!(
            "no {data_role} records to train on"
        )));
    }
    let rewards: Vec<f64> = data
        .iter()
        .filter_map(|r| {
            r.get("reward")
                .or_else(|| r.get("chosen_reward"))
                .and_then(Value::as_f64)
        })
        .collect();
    let data_q = (rewards.iter().sum::<f64>()
        / rewards.len().max(1) as f64
        / (4.0
            * reward_endpoint::DEFAULT_WEIGHTS
                .iter()
                .filter(|w| **w > 0.0)
                .sum::<f64>()))
    .clamp(0.0, 1.0);
    let bonus = 0.15 * (data.len() as f64 / 20.0).min(1.0);
    let quality = (start_q.max(data_q) + bonus * (1.0 - start_q.max(data_q))).min(0.99);
    let model = json!({
        "format": "flywheel-test-model", "name": format!("{}-r{}", a.stage, a.round_index),
        "quality": quality, "trained_from": start.id, "records": data.len(),
    });
    let (uri, content_hash) = artifacts::write(prefix, "model.json", model.to_string().as_bytes())?;
    let out = Output {
        name: Role::Model.to_string(),
        kind: "model",
        uri,
        content_hash,
        metadata: json!({ "format": "flywheel-test-model", "params": params }),
    };
    Ok(TaskResult {
        outputs: vec![out],
        metrics: [
            ("loss".to_string(), 1.0 - quality),
            ("records".to_string(), data.len() as f64),
        ]
        .into(),
    })
}

fn evaluate(task: &Task) -> Result<TaskResult, TaskError> {
    let candidate = model_quality(task.input(Role::Model)?)?;
    let generator = model_quality(task.input(Role::Generator)?)?;
    let win_rate = 1.0 / (1.0 + (-(candidate - generator) * 10.0).exp());
    // A 95% interval as if the win rate were measured on 200 prompts (normal approximation of
    // the binomial), so that gates on its bounds have something to read.
    let half = 1.96 * (win_rate * (1.0 - win_rate) / 200.0).sqrt();
    Ok(TaskResult {
        outputs: Vec::new(),
        metrics: [
            ("accuracy".to_string(), candidate),
            ("generator_accuracy".to_string(), generator),
            ("accuracy_gain".to_string(), candidate - generator),
            ("win_rate".to_string(), win_rate),
            ("win_rate_ci_low".to_string(), (win_rate - half).max(0.0)),
            ("win_rate_ci_high".to_string(), (win_rate + half).min(1.0)),
            ("mean_reward".to_string(), candidate * 4.0),
        ]
        .into(),
    })
}
