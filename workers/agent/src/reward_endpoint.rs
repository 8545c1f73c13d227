//! The `reward_endpoint` backend: the `score` stage through an HTTP reward service.
//!
//! Each (prompt, response) is posted to `params.url`, by default as an OpenAI-style chat request
//! (`{"model", "messages": [user, assistant]}`, the shape of NVIDIA's reward-model API), or as
//! `{"prompt", "response"}` with `request: pair`. The answer is read at `attributes_path` (a
//! dotted path, default the whole body): a JSON object of the five HelpSteer2 attributes
//! (NVIDIA's shape), a list of `{"token": attribute, "logprob": score}` (the same scores as
//! NVIDIA's API returns them in `choices.0.logprobs.content`), or a single number (a scalar
//! reward). Flywheel computes the weighted scalar itself (`weights`, default HelpSteer2's).
//! Params: the stage contract's `RewardEndpointScore` (`docs/params.md`).

use std::sync::Arc;

use serde_json::{Value, json};

use crate::backend::{Backend, Task, TaskContext, TaskError, TaskResult};
use crate::datasets::{read_jsonl, write_jsonl};
use crate::http_client::{HttpCaller, at_path, http_settings, required};
use flywheel_proto::stage::{RewardEndpointScore, Role, StageKind};

/// HelpSteer2's attributes and the default weights: the stage contract's.
pub use flywheel_proto::stage::{
    HELPSTEER2_ATTRIBUTES as ATTRIBUTES, HELPSTEER2_WEIGHTS as DEFAULT_WEIGHTS,
};

/// A stage's `weights` param (5 numbers, validated with the spec), or the default.
pub fn weights(param: &Option<Vec<f64>>) -> [f64; 5] {
    match param {
        Some(w) if w.len() == 5 => std::array::from_fn(|i| w[i]),
        _ => DEFAULT_WEIGHTS,
    }
}

/// `{"helpfulness": .., "correctness": .., ...}` for a score row.
pub fn attributes_json(values: impl IntoIterator<Item = f64>) -> Value {
    Value::Object(
        ATTRIBUTES
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

pub struct RewardEndpointBackend;

impl Backend for RewardEndpointBackend {
    fn name(&self) -> &str {
        "reward_endpoint"
    }

    fn run(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        match task.kind {
            StageKind::Score => score(task, ctx),
            other => Err(TaskError::permanent(format!(
                "the reward_endpoint backend runs score stages, not {other}"
            ))),
        }
    }
}

/// What the service said about one response.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    Attributes([f64; 5]),
    Scalar(f64),
}

/// Reads a reward service's answer at `path`.
pub fn parse_reward(body: &Value, path: &str) -> Result<Judgement, String> {
    let v = at_path(body, path).ok_or_else(|| format!("no value at {path:?} in the response"))?;
    if let Some(x) = v.as_f64() {
        return Ok(Judgement::Scalar(x));
    }
    let lookup = |name: &str| -> Option<f64> {
        match v {
            Value::Object(m) => m.get(name).and_then(Value::as_f64),
            Value::Array(items) => items
                .iter()
                .find(|i| i["token"].as_str() == Some(name))
                .and_then(|i| i["logprob"].as_f64()),
            _ => None,
        }
    };
    let mut attrs = [0.0; 5];
    for (slot, name) in attrs.iter_mut().zip(ATTRIBUTES) {
        *slot = lookup(name).ok_or_else(|| {
            format!("the response has no {name:?} score at {path:?} (expected the five HelpSteer2 attributes or a number)")
        })?;
    }
    Ok(Judgement::Attributes(attrs))
}

fn score(task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
    let p: RewardEndpointScore = task.typed()?;
    let url = required(task, "url", &p.url)?.to_string();
    let model = p.model.clone();
    let pair_request = p.request == "pair";
    let path = p.attributes_path.clone();
    let weights = weights(&p.weights);
    let caller = HttpCaller::new(task, http_settings!(p))?;
    let mut rows = read_jsonl(&task.inputs(Role::Responses))?;
    let bodies: Arc<Vec<Value>> = Arc::new(
        rows.iter()
            .map(|r| {
                // A two-turn prompt is judged with its whole conversation.
                let mut turns = match r.get("messages").and_then(Value::as_array) {
                    Some(m) => m.clone(),
                    None => vec![json!({ "role": "user", "content": r["prompt"] })],
                };
                if pair_request {
                    let prompt = crate::datasets::conversation_text(&Value::Array(turns), false);
                    json!({ "prompt": prompt, "response": r["response"] })
                } else {
                    turns.push(json!({ "role": "assistant", "content": r["response"] }));
                    json!({ "model": model, "messages": turns })
                }
            })
            .collect(),
    );
    let shared = (caller.clone(), url.clone(), path.clone());
    let judgements = caller.run_all(rows.len(), ctx, "scored", move |i| {
        let (caller, url, path) = shared.clone();
        let bodies = bodies.clone();
        async move {
            let response = caller.post_json(&url, &bodies[i]).await?;
            parse_reward(&response, &path).map_err(|e| TaskError::permanent(format!("{url}: {e}")))
        }
    })?;
    let mut total = 0.0;
    let (mut checked, mut followed) = (0usize, 0usize);
    for (row, j) in rows.iter_mut().zip(judgements) {
        // Verifiable instructions are judged by their checkers first.
        if let Some(ok) = crate::sdg::instructions::check_row(row)
            .map_err(|e| TaskError::permanent(format!("stage {}: {e}", task.assignment.stage)))?
        {
            checked += 1;
            followed += usize::from(ok);
        }
        let reward = match j {
            Judgement::Attributes(a) => {
                row["attributes"] = attributes_json(a);
                a.iter().zip(weights).map(|(x, w)| x * w).sum()
            }
            Judgement::Scalar(x) => x,
        };
        row["reward"] = json!(reward);
        total += reward;
    }
    let out = write_jsonl(
        &task.assignment.output_prefix,
        Role::Scores,
        "flywheel.scores",
        &rows,
    )?;
    let mut metrics = caller.stats.metric_map();
    metrics.insert("records".into(), rows.len() as f64);
    metrics.insert("mean_reward".into(), total / rows.len().max(1) as f64);
    if checked > 0 {
        metrics.insert("instruction_checked".into(), checked as f64);
        metrics.insert(
            "instruction_followed_fraction".into(),
            followed as f64 / checked as f64,
        );
    }
    Ok(TaskResult {
        outputs: vec![out],
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_shapes() {
        let nvidia = json!({"helpfulness": 1.6, "correctness": 1.6, "coherence": 3.3, "complexity": 0.5, "verbosity": 0.5});
        assert_eq!(
            parse_reward(&nvidia, "").unwrap(),
            Judgement::Attributes([1.6, 1.6, 3.3, 0.5, 0.5])
        );
        let logprobs = json!({"choices": [{"logprobs": {"content": [
            {"token": "helpfulness", "logprob": 3.0}, {"token": "correctness", "logprob": 2.0},
            {"token": "coherence", "logprob": 4.0}, {"token": "complexity", "logprob": 1.0},
            {"token": "verbosity", "logprob": 0.5}]}}]});
        assert_eq!(
            parse_reward(&logprobs, "choices.0.logprobs.content").unwrap(),
            Judgement::Attributes([3.0, 2.0, 4.0, 1.0, 0.5])
        );
        assert_eq!(
            parse_reward(&json!({"data": [{"score": 0.25}]}), "data.0.score").unwrap(),
            Judgement::Scalar(0.25)
        );
        assert!(
            parse_reward(&json!({"helpfulness": 1}), "")
                .unwrap_err()
                .contains("\"correctness\"")
        );
        assert!(
            parse_reward(&json!({}), "x.y")
                .unwrap_err()
                .contains("no value")
        );
    }
}
