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
                "prompt": prompt_turns(r),
                "chosen": [{ "role": "assistant", "content": r["chosen"] }],
                "rejected": [{ "role": "assistant", "content": r["rejected"] }],
            }),
            PairFormat::NemoAligner => json!({
                "prompt": nemo_prompt(&prompt_turns(r)),
                "chosen_response": format!("{}\n<extra_id_1>", r["chosen"].as_str().unwrap_or_default()),
                "rejected_response": format!("{}\n<extra_id_1>", r["rejected"].as_str().unwrap_or_default()),
                "chosen_reward": reward(r, "chosen_reward", 1.0),
                "rejected_reward": reward(r, "rejected_reward", 0.0),
            }),
            PairFormat::Plain => json!({
                "prompt": crate::datasets::conversation_text(&Value::Array(prompt_turns(r)), false),
                "chosen": r["chosen"], "rejected": r["rejected"],
                "chosen_reward": reward(r, "chosen_reward", 1.0),
                "rejected_reward": reward(r, "rejected_reward", 0.0),
            }),
        })
        .collect()
}

/// The turns a pair's answers reply to: its conversation (`messages`, two-turn prompts), else
/// the prompt as one user turn.
fn prompt_turns(r: &Value) -> Vec<Value> {
    match r["messages"].as_array() {
        Some(m) => m.clone(),
        None => vec![json!({ "role": "user", "content": r["prompt"] })],
    }
}

/// NeMo-Aligner's chat template up to the assistant's answer.
fn nemo_prompt(turns: &[Value]) -> String {
    let mut out = String::from("<extra_id_0>System\n\n");
    for t in turns {
        let who = if t["role"] == "assistant" {
            "Assistant"
        } else {
            "User"
        };
        out.push_str(&format!(
            "<extra_id_1>{who}\n{}\n",
            t["content"].as_str().unwrap_or_default()
        ));
    }
    out.push_str("<extra_id_1>Assistant\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-turn pair keeps its earlier turns in every format.
    #[test]
    fn two_turn_pairs_keep_the_conversation() {
        let pair = json!({
            "prompt": "And then?", "chosen": "good", "rejected": "bad",
            "chosen_reward": 2.0, "rejected_reward": 1.0,
            "messages": [
                { "role": "user", "content": "Hi" },
                { "role": "assistant", "content": "Hello" },
                { "role": "user", "content": "And then?" },
            ],
        });
        let trl = &export_pairs(std::slice::from_ref(&pair), PairFormat::Conversational)[0];
        assert_eq!(trl["prompt"], pair["messages"]);
        assert_eq!(
            trl["chosen"],
            json!([{ "role": "assistant", "content": "good" }])
        );
        let nemo = &export_pairs(std::slice::from_ref(&pair), PairFormat::NemoAligner)[0];
        assert_eq!(
            nemo["prompt"],
            "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello\n<extra_id_1>User\nAnd then?\n<extra_id_1>Assistant\n"
        );
        let plain = &export_pairs(&[pair], PairFormat::Plain)[0];
        assert_eq!(
            plain["prompt"],
            "User: Hi\n\nAssistant: Hello\n\nUser: And then?"
        );
        // A single-turn pair is unchanged.
        let one = json!({ "prompt": "Q", "chosen": "a", "rejected": "b" });
        assert_eq!(
            export_pairs(std::slice::from_ref(&one), PairFormat::Conversational)[0]["prompt"],
            json!([{ "role": "user", "content": "Q" }])
        );
        assert_eq!(export_pairs(&[one], PairFormat::Plain)[0]["prompt"], "Q");
    }
}
