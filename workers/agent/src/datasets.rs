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
///
/// The checkers judge first, the reward second: a response that follows the prompt's verifiable
/// instructions ranks above every one that does not, then a correct one (not `"verified":
/// false`) above an incorrect one, whatever the rewards; a pair decided by a checker needs no
/// reward margin and records which (`judge`: `instructions` or `verifier`). A prompt of the
/// `sft` pool yields no pair, one of the `preference` pool no SFT record. A two-turn prompt (`messages`) yields a conversation: the SFT record has every
/// turn, the pair keeps the turns before the answer in `messages`.
pub fn filter(rows: &[Value], margin: f64, min_reward: f64, require_verified: bool) -> Filtered {
    let mut by_prompt: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in rows {
        by_prompt
            .entry(r["prompt_id"].to_string())
            .or_default()
            .push(r);
    }
    let reward = |r: &Value| r["reward"].as_f64().unwrap_or(f64::NEG_INFINITY);
    // The checkers rank before the reward: instructions followed (strictly), then correct.
    let follows = |r: &Value| {
        r.get("instructions_followed").is_none_or(|v| {
            v["strict"]
                .as_array()
                .is_some_and(|a| a.iter().all(|x| x == true))
        })
    };
    let correct = |r: &Value| r["verified"].as_bool() != Some(false);
    let rank = |a: &&&Value, b: &&&Value| {
        follows(a)
            .cmp(&follows(b))
            .then(correct(a).cmp(&correct(b)))
            .then(reward(a).total_cmp(&reward(b)))
    };
    let (mut sft, mut pairs) = (Vec::new(), Vec::new());
    let mut funnel = Funnel {
        prompts: by_prompt.len(),
        ..Funnel::default()
    };
    for samples in by_prompt.values() {
        let best = samples.iter().max_by(rank).expect("non-empty");
        let worst = samples.iter().min_by(rank).expect("non-empty");
        let pool = best["pool"].as_str();
        let usable = !require_verified || best["verified"].as_bool() != Some(false);
        let turns: Vec<Value> = match best["messages"].as_array() {
            Some(m) => m.clone(),
            None => vec![json!({ "role": "user", "content": best["prompt"] })],
        };
        if pool != Some("preference") {
            funnel.sft_candidates += 1;
            let verified = usable && follows(best);
            funnel.sft_verified += verified as usize;
            if verified && reward(best) >= min_reward {
                funnel.sft_accepted += 1;
                let mut messages = turns.clone();
                messages.push(json!({ "role": "assistant", "content": best["response"] }));
                sft.push(json!({ "messages": messages, "reward": reward(best) }));
            }
        }
        if pool == Some("sft") || samples.len() < 2 {
            continue;
        }
        let decided_by = if follows(best) && !follows(worst) {
            Some("instructions")
        } else if correct(best) && !correct(worst) {
            Some("verifier")
        } else {
            None
        };
        funnel.pair_candidates += 1;
        let distinct = usable && best["response"] != worst["response"];
        funnel.pair_distinct += distinct as usize;
        if distinct && (decided_by.is_some() || reward(best) - reward(worst) >= margin) {
            funnel.pair_accepted += 1;
            let mut pair = json!({
                "prompt": best["prompt"], "chosen": best["response"], "rejected": worst["response"],
                "chosen_reward": reward(best), "rejected_reward": reward(worst),
            });
            if best["messages"].is_array() {
                pair["messages"] = json!(turns);
            }
            if let Some(checker) = decided_by {
                pair["judge"] = json!(checker);
            }
            pairs.push(pair);
        }
    }
    Filtered { sft, pairs, funnel }
}

/// What [`filter`] made, and how many prompts passed each of its steps.
#[derive(Debug, Clone, Default)]
pub struct Filtered {
    pub sft: Vec<Value>,
    pub pairs: Vec<Value>,
    pub funnel: Funnel,
}

/// Prompts at each step of the filter. SFT: candidates (prompts not of the preference pool) →
/// best sample passed the verifier and the instruction checkers → reached `min_reward` (an SFT
/// record). Pairs: candidates (prompts not of the sft pool, with two samples or more) → usable
/// best and a worst that differs from it → margin met or decided by a checker (a pair).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Funnel {
    pub prompts: usize,
    pub sft_candidates: usize,
    pub sft_verified: usize,
    pub sft_accepted: usize,
    pub pair_candidates: usize,
    pub pair_distinct: usize,
    pub pair_accepted: usize,
}

/// The `filter` stage, the same for every backend: reads the `scores` inputs and writes `sft`
/// and `pairs` datasets, with the stage contract's `BuiltinFilter` params.
pub fn filter_stage(task: &Task) -> Result<TaskResult, TaskError> {
    let p: flywheel_proto::stage::BuiltinFilter = task.typed()?;
    let rows = read_jsonl(&task.inputs(Role::Scores))?;
    let filtered = filter(
        &rows,
        p.margin,
        p.min_reward.unwrap_or(f64::NEG_INFINITY),
        p.require_verified,
    );
    let metrics = crate::analytics::of_filter(&rows, &filtered)
        .into_iter()
        .collect();
    let Filtered { sft, pairs, .. } = filtered;
    let prefix = task.assignment.output_prefix.as_str();
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

/// Fields of a prompt row that travel with its responses through score and filter: the
/// conversation (`messages`), the verifiable `instructions`, and the `pool` (sft or preference).
pub const PROMPT_FIELDS: [&str; 3] = ["messages", "instructions", "pool"];

/// Copies a prompt row's [`PROMPT_FIELDS`] onto a row made from it.
pub fn carry_prompt_fields(prompt: &Value, row: &mut Value) {
    for f in PROMPT_FIELDS {
        if let Some(v) = prompt.get(f).filter(|v| !v.is_null()) {
            row[f] = v.clone();
        }
    }
}

/// The turns of a conversation as one text. A lone user turn is its content; otherwise each
/// turn is labelled (`User:`, `Assistant:`), and with `open_reply` an `Assistant:` label ends
/// the text for the reply.
pub fn conversation_text(messages: &Value, open_reply: bool) -> String {
    let turns = messages.as_array().map(Vec::as_slice).unwrap_or_default();
    if let [only] = turns
        && only["role"] == "user"
        && !open_reply
    {
        return only["content"].as_str().unwrap_or_default().to_string();
    }
    let mut text: Vec<String> = turns
        .iter()
        .map(|t| {
            let who = match t["role"].as_str() {
                Some("assistant") => "Assistant",
                Some("system") => "System",
                _ => "User",
            };
            format!("{who}: {}", t["content"].as_str().unwrap_or_default())
        })
        .collect();
    if open_reply {
        text.push("Assistant:".into());
    }
    text.join("\n\n")
}

/// `(prompt, response)` of an SFT record in TRL's `messages` format: the last assistant turn,
/// and the turns before it as the prompt.
pub fn sft_example(row: &Value) -> Option<(String, String)> {
    let m = row["messages"].as_array()?;
    let (last, before) = m.split_last()?;
    if last["role"] != "assistant" || before.is_empty() {
        return None;
    }
    Some((
        conversation_text(&Value::Array(before.to_vec()), false),
        last["content"].as_str()?.to_string(),
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
        let Filtered { sft, pairs, .. } = filter(&rows, 0.5, 0.0, false);
        assert_eq!(sft.len(), 2);
        assert_eq!(sft[0]["messages"][1]["content"], "b");
        assert_eq!(pairs.len(), 1, "prompt 2's gap is under the margin");
        assert_eq!(pairs[0]["chosen"], "b");
        assert_eq!(pairs[0]["rejected"], "a");
        let Filtered { sft, .. } = filter(&rows, 0.5, 2.0, false);
        assert_eq!(sft.len(), 1, "prompt 2's best is under min_reward");
        let mut rows = rows;
        rows[1]["verified"] = json!(false);
        // The verifier ranks first: prompt 1's best correct sample is "c", and the answer it
        // rejected is the pair's rejected one, with no margin needed.
        let Filtered { sft, pairs, .. } = filter(&rows, 0.5, 0.0, true);
        assert_eq!(sft.len(), 2);
        assert_eq!(sft[0]["messages"][1]["content"], "c");
        assert_eq!(pairs.len(), 1);
        assert_eq!(
            (
                &pairs[0]["chosen"],
                &pairs[0]["rejected"],
                &pairs[0]["judge"]
            ),
            (&json!("c"), &json!("b"), &json!("verifier"))
        );
    }

    #[test]
    fn the_verifier_decides_before_the_reward() {
        let row = |r: &str, w: f64, ok: bool| json!({ "prompt_id": "1", "prompt": "q", "response": r, "reward": w, "verified": ok });
        // The reward model prefers the wrong answer; the verifier decides, with no margin.
        let rows = vec![row("wrong", 3.0, false), row("right", 1.0, true)];
        let Filtered { sft, pairs, funnel } = filter(&rows, 10.0, 0.0, false);
        assert_eq!(sft[0]["messages"][1]["content"], "right");
        assert_eq!(pairs[0]["chosen"], "right");
        assert_eq!(pairs[0]["rejected"], "wrong");
        assert_eq!(pairs[0]["judge"], "verifier");
        assert_eq!(
            funnel,
            Funnel {
                prompts: 1,
                sft_candidates: 1,
                sft_verified: 1,
                sft_accepted: 1,
                pair_candidates: 1,
                pair_distinct: 1,
                pair_accepted: 1,
            }
        );
    }

    #[test]
    fn instruction_checkers_judge_first_and_pools_stay_apart() {
        let followed = |ok: bool| json!({ "strict": [ok], "loose": [ok] });
        let row = |p: &str, r: &str, w: f64, ok: bool, pool: &str| {
            json!({ "prompt_id": p, "prompt": "q", "response": r, "reward": w, "pool": pool,
                    "instructions_followed": followed(ok), "verified": ok })
        };
        // The reward model prefers "b", which breaks the instruction: "a" is chosen anyway,
        // with no reward margin needed.
        let rows = vec![
            row("1", "a", 1.0, true, "preference"),
            row("1", "b", 3.0, false, "preference"),
        ];
        let Filtered { sft, pairs, .. } = filter(&rows, 10.0, 0.0, false);
        assert!(
            sft.is_empty(),
            "a preference-pool prompt yields no SFT record"
        );
        assert_eq!(pairs[0]["chosen"], "a");
        assert_eq!(pairs[0]["judge"], "instructions");
        let rows = vec![
            row("1", "a", 1.0, true, "sft"),
            row("1", "b", 3.0, false, "sft"),
        ];
        let Filtered { sft, pairs, .. } = filter(&rows, 0.0, 0.0, false);
        assert!(pairs.is_empty(), "an SFT-pool prompt yields no pair");
        assert_eq!(sft[0]["messages"][1]["content"], "a");
        // Nothing followed the instructions: no SFT record at all.
        let rows = vec![row("1", "a", 1.0, false, "sft")];
        assert!(filter(&rows, 0.0, 0.0, false).sft.is_empty());
        // A conversation stays one.
        let turns = json!([{ "role": "user", "content": "Hi" }, { "role": "assistant", "content": "Hello" }, { "role": "user", "content": "q" }]);
        let mut a = json!({ "prompt_id": "2", "prompt": "q", "response": "x", "reward": 2.0, "messages": turns });
        let mut b = a.clone();
        b["response"] = json!("y");
        b["reward"] = json!(1.0);
        a["pool"] = json!("preference");
        b["pool"] = json!("preference");
        let Filtered { pairs, .. } = filter(&[a.clone(), b], 0.0, 0.0, false);
        assert_eq!(pairs[0]["messages"], turns);
        a["pool"] = json!("sft");
        let Filtered { sft, .. } = filter(&[a], 0.0, 0.0, false);
        assert_eq!(sft[0]["messages"].as_array().unwrap().len(), 4);
    }
}
