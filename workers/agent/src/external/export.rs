//! Datasets in each trainer's format.

use serde_json::{Value, json};

/// How SFT records are written for a trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SftFormat {
    /// `{"messages": [{"role", "content"}, ...]}` (TRL, OpenRLHF with `--input_key messages`,
    /// `flywheel train`).
    Messages,
    /// NeMo-Aligner chat: `{"system", "mask", "conversations": [{"from", "value"}, ...]}`.
    NemoChat,
}

/// How preference pairs are written for a trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairFormat {
    /// TRL conversational preference: `prompt` (user messages), `chosen` / `rejected`
    /// (assistant messages). OpenRLHF reads the same with `--apply_chat_template`.
    Conversational,
    /// NeMo-Aligner DPO/RPO: templated `prompt`, `chosen_response`, `rejected_response`,
    /// `chosen_reward`, `rejected_reward`.
    NemoAligner,
    /// Strings with rewards: `prompt`, `chosen`, `rejected`, `chosen_reward`, `rejected_reward`
    /// (`flywheel train`).
    Plain,
}

/// Writes SFT records (`{"messages": ...}` rows) in a trainer's format.
pub fn export_sft(rows: &[Value], format: SftFormat) -> Vec<Value> {
    rows.iter()
        .filter_map(|r| r["messages"].as_array())
        .map(|messages| match format {
            SftFormat::Messages => json!({ "messages": messages }),
            SftFormat::NemoChat => json!({
                "system": "",
                "mask": "User",
                "conversations": messages.iter().map(|m| json!({
                    "from": if m["role"] == "assistant" { "Assistant" } else { "User" },
                    "value": m["content"],
                })).collect::<Vec<_>>(),
            }),
        })
        .collect()
}

/// Writes preference pairs (`prompt`, `chosen`, `rejected` strings with rewards) in a trainer's
/// format.
pub fn export_pairs(rows: &[Value], format: PairFormat) -> Vec<Value> {
    let reward = |r: &Value, k: &str, default: f64| r[k].as_f64().unwrap_or(default);
    rows.iter()
        .filter(|r| r["prompt"].is_string() && r["chosen"].is_string() && r["rejected"].is_string())
        .map(|r| match format {
            PairFormat::Conversational => json!({
                "prompt": [{ "role": "user", "content": r["prompt"] }],
                "chosen": [{ "role": "assistant", "content": r["chosen"] }],
                "rejected": [{ "role": "assistant", "content": r["rejected"] }],
            }),
            PairFormat::NemoAligner => json!({
                "prompt": format!(
                    "<extra_id_0>System\n\n<extra_id_1>User\n{}\n<extra_id_1>Assistant\n",
                    r["prompt"].as_str().unwrap_or_default()
                ),
                "chosen_response": format!("{}\n<extra_id_1>", r["chosen"].as_str().unwrap_or_default()),
                "rejected_response": format!("{}\n<extra_id_1>", r["rejected"].as_str().unwrap_or_default()),
                "chosen_reward": reward(r, "chosen_reward", 1.0),
                "rejected_reward": reward(r, "rejected_reward", 0.0),
            }),
            PairFormat::Plain => json!({
                "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                "chosen_reward": reward(r, "chosen_reward", 1.0),
                "rejected_reward": reward(r, "rejected_reward", 0.0),
            }),
        })
        .collect()
}
