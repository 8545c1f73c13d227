//! Dataset files shared by every backend: JSONL reading and writing through the artifact store,
//! and the filter that turns scored samples into SFT data and preference pairs in TRL's formats
//! (`messages`; `prompt`/`chosen`/`rejected` with `chosen_reward`/`rejected_reward`).

use std::collections::BTreeMap;

use flywheel_proto::v1::ArtifactRef;
use serde_json::{Value, json};

use crate::artifacts;
use crate::backend::{Output, Task, TaskError, TaskResult};
use flywheel_proto::stage::Role;

/// JSON Lines text: one compact JSON value per line.
pub fn to_jsonl(rows: &[Value]) -> String {
    let mut text = String::new();
    for r in rows {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    text
}

/// Parses JSON Lines, skipping blank lines; the error names `source` and the line.
pub fn parse_jsonl(text: &str, source: &str) -> Result<Vec<Value>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{source}: line {}: bad JSONL: {e}", i + 1))
        })
        .collect()
}

pub fn read_jsonl(inputs: &[&ArtifactRef]) -> Result<Vec<Value>, TaskError> {
    let mut rows = Vec::new();
    for i in inputs {
        let bytes = artifacts::read(&i.uri, &i.content_hash)?;
        rows.extend(
            parse_jsonl(&String::from_utf8_lossy(&bytes), &i.uri).map_err(TaskError::permanent)?,
        );
    }
    Ok(rows)
}

/// Writes `rows` as `<prefix>/<role>.jsonl`, the output named by its role, recording the record
/// count and format.
pub fn write_jsonl(
    prefix: &str,
    role: Role,
    format: &str,
    rows: &[Value],
) -> Result<Output, TaskError> {
    let text = to_jsonl(rows);
    let (uri, content_hash) = artifacts::write(prefix, &format!("{role}.jsonl"), text.as_bytes())?;
    Ok(Output {
        name: role.to_string(),
        kind: "dataset",
        uri,
        content_hash,
        metadata: json!({ "records": rows.len(), "format": format }),
    })
}

/// Best-of-K and best-vs-worst filtering of scored samples (rows with `prompt_id`, `prompt`,
/// `response`, `reward`). Per prompt: the best sample becomes an SFT record when its reward is at
/// least `min_reward`; best and worst become a pair when their rewards differ by at least
/// `margin`. With `require_verified`, a sample a verifier rejected (`"verified": false`) is never
/// an SFT record or a chosen response.
pub fn filter(
    rows: &[Value],
    margin: f64,
    min_reward: f64,
    require_verified: bool,
) -> (Vec<Value>, Vec<Value>) {
    let mut by_prompt: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in rows {
        by_prompt
            .entry(r["prompt_id"].to_string())
            .or_default()
            .push(r);
    }
    let reward = |r: &Value| r["reward"].as_f64().unwrap_or(f64::NEG_INFINITY);
    let (mut sft, mut pairs) = (Vec::new(), Vec::new());
    for samples in by_prompt.values() {
        let best = samples
            .iter()
            .max_by(|a, b| reward(a).total_cmp(&reward(b)))
            .expect("non-empty");
        let worst = samples
            .iter()
            .min_by(|a, b| reward(a).total_cmp(&reward(b)))
            .expect("non-empty");
        let usable = !require_verified || best["verified"].as_bool() != Some(false);
        if usable && reward(best) >= min_reward {
            sft.push(json!({ "messages": [
                { "role": "user", "content": best["prompt"] },
                { "role": "assistant", "content": best["response"] },
            ], "reward": reward(best) }));
        }
        if usable
            && samples.len() > 1
            && reward(best) - reward(worst) >= margin
            && best["response"] != worst["response"]
        {
            pairs.push(json!({
                "prompt": best["prompt"], "chosen": best["response"], "rejected": worst["response"],
                "chosen_reward": reward(best), "rejected_reward": reward(worst),
            }));
        }
    }
    (sft, pairs)
}

/// The `filter` stage, the same for every backend: reads the `scores` inputs and writes `sft`
/// and `pairs` datasets, with the stage contract's `BuiltinFilter` params.
pub fn filter_stage(task: &Task) -> Result<TaskResult, TaskError> {
    let p: flywheel_proto::stage::BuiltinFilter = task.typed()?;
    let rows = read_jsonl(&task.inputs(Role::Scores))?;
    let (sft, pairs) = filter(
        &rows,
        p.margin,
        p.min_reward.unwrap_or(f64::NEG_INFINITY),
        p.require_verified,
    );
    let prefix = task.assignment.output_prefix.as_str();
    let metrics = [
        ("sft_records".to_string(), sft.len() as f64),
        ("pair_records".to_string(), pairs.len() as f64),
    ]
    .into();
    let mut outputs = vec![
        write_jsonl(prefix, Role::Sft, "trl.messages", &sft)?,
        write_jsonl(prefix, Role::Pairs, "trl.preference", &pairs)?,
    ];
    // Lineage: the settings that made these datasets.
    for o in &mut outputs {
        o.metadata["params"] = serde_json::to_value(&p).expect("params serialize");
    }
    Ok(TaskResult { outputs, metrics })
}

/// `(prompt, response)` of an SFT record in TRL's `messages` format.
pub fn sft_example(row: &Value) -> Option<(String, String)> {
    let m = row["messages"].as_array()?;
    Some((
        m.first()?["content"].as_str()?.to_string(),
        m.get(1)?["content"].as_str()?.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_of_k_and_pairs_with_margin() {
        let row = |p: &str, r: &str, w: f64| json!({ "prompt_id": p, "prompt": format!("q{p}"), "response": r, "reward": w });
        let rows = vec![
            row("1", "a", 1.0),
            row("1", "b", 3.0),
            row("1", "c", 2.0),
            row("2", "x", 1.0),
            row("2", "y", 1.1),
        ];
        let (sft, pairs) = filter(&rows, 0.5, 0.0, false);
        assert_eq!(sft.len(), 2);
        assert_eq!(sft[0]["messages"][1]["content"], "b");
        assert_eq!(pairs.len(), 1, "prompt 2's gap is under the margin");
        assert_eq!(pairs[0]["chosen"], "b");
        assert_eq!(pairs[0]["rejected"], "a");
        let (sft, _) = filter(&rows, 0.5, 2.0, false);
        assert_eq!(sft.len(), 1, "prompt 2's best is under min_reward");
        let mut rows = rows;
        rows[1]["verified"] = json!(false);
        let (sft, pairs) = filter(&rows, 0.5, 0.0, true);
        assert_eq!(sft.len(), 1, "prompt 1's best was rejected by the verifier");
        assert_eq!(pairs.len(), 0);
    }
}
