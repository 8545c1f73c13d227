//! Seed prompt files: JSON Lines from any artifact URI, each line an object with `prompt` (a
//! string) or `messages` (TRL's conversational format: a list of `{role, content}` ending with a
//! user turn). Errors name the file and the line.

use serde_json::Value;

/// One seed prompt: its text (the last user turn) and, for a conversation, every turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    pub prompt: String,
    pub messages: Option<Value>,
    /// Verifiable instructions the line carries (`instructions`, or IFEval's
    /// `instruction_id_list` with `kwargs`).
    pub instructions: Vec<super::instructions::Instruction>,
    /// 1-based line in the file.
    pub line: usize,
}

/// Parses a seed file's text; `source` names it in errors.
pub fn parse(text: &str, source: &str) -> Result<Vec<Seed>, String> {
    let mut seeds = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("{source}: line {n}: invalid JSON: {e}"))?;
        let instructions =
            super::instructions::of_row(&v).map_err(|e| format!("{source}: line {n}: {e}"))?;
        let seed = match (v.get("prompt"), v.get("messages")) {
            (Some(Value::String(p)), _) if !p.trim().is_empty() => Seed {
                prompt: p.clone(),
                messages: None,
                instructions,
                line: n,
            },
            (_, Some(m @ Value::Array(turns))) => {
                let last = turns.last().ok_or_else(|| {
                    format!("{source}: line {n}: column messages is an empty list")
                })?;
                for (j, t) in turns.iter().enumerate() {
                    let ok = matches!(t["role"].as_str(), Some("system" | "user" | "assistant"))
                        && t["content"].is_string();
                    if !ok {
                        return Err(format!(
                            "{source}: line {n}: messages[{j}] needs role (system, user or assistant) and content (a string)"
                        ));
                    }
                }
                if last["role"] != "user" {
                    return Err(format!(
                        "{source}: line {n}: messages must end with a user turn"
                    ));
                }
                Seed {
                    prompt: last["content"].as_str().unwrap_or_default().to_string(),
                    messages: Some(m.clone()),
                    instructions,
                    line: n,
                }
            }
            (Some(_), _) => {
                return Err(format!(
                    "{source}: line {n}: column prompt must be a non-empty string"
                ));
            }
            _ => {
                return Err(format!(
                    "{source}: line {n}: missing column prompt (or messages)"
                ));
            }
        };
        seeds.push(seed);
    }
    if seeds.is_empty() {
        return Err(format!("{source}: the seed file is empty"));
    }
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_and_conversations() {
        let text = "{\"prompt\": \"Hi\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"A\"}, {\"role\": \"assistant\", \"content\": \"B\"}, {\"role\": \"user\", \"content\": \"C\"}]}\n";
        let s = parse(text, "seeds.jsonl").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].prompt, "C");
        assert_eq!(s[1].line, 3);
    }

    #[test]
    fn bad_files_name_the_file_and_line() {
        let e = parse("{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n", "s.jsonl").unwrap_err();
        assert_eq!(e, "s.jsonl: line 2: missing column prompt (or messages)");
        let e = parse("{\"prompt\": \"a\"}\n{oops\n", "s.jsonl").unwrap_err();
        assert!(e.starts_with("s.jsonl: line 2: invalid JSON"), "{e}");
        assert_eq!(
            parse("\n\n", "s.jsonl").unwrap_err(),
            "s.jsonl: the seed file is empty"
        );
        let e = parse("{\"prompt\": 3}", "s.jsonl").unwrap_err();
        assert!(e.contains("line 1: column prompt"), "{e}");
        let e = parse(
            "{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}",
            "s",
        )
        .unwrap_err();
        assert!(e.contains("end with a user turn"), "{e}");
    }
}
