//! Seed prompt files from any artifact URI: JSON Lines (each line an object) or Parquet (each
//! row), with `prompt` (a string) or `messages` (TRL's conversational format: a list of
//! `{role, content}` ending with a user turn), and optionally verifiable instructions
//! (`instructions`, or IFEval's `instruction_id_list` with `kwargs`). Errors name the file and
//! the line, row or column.

use serde_json::Value;

/// One seed prompt: its text (the last user turn) and, for a conversation, every turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    pub prompt: String,
    pub messages: Option<Value>,
    /// Verifiable instructions the line carries.
    pub instructions: Vec<super::instructions::Instruction>,
    /// 1-based line (JSONL) or row (Parquet) in the file.
    pub line: usize,
}

/// Parses a seed file, Parquet (by its `PAR1` magic) or JSON Lines; `source` names it in
/// errors.
pub fn parse_file(bytes: &[u8], source: &str) -> Result<Vec<Seed>, String> {
    if bytes.starts_with(b"PAR1") {
        return parse_parquet(bytes, source);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| format!("{source}: not UTF-8 text"))?;
    parse(text, source)
}

/// Parses JSON Lines seeds; `source` names the file in errors.
pub fn parse(text: &str, source: &str) -> Result<Vec<Seed>, String> {
    let mut seeds = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("{source}: line {n}: invalid JSON: {e}"))?;
        seeds.push(seed_of(&v, &format!("{source}: line {n}"), n)?);
    }
    non_empty(seeds, source)
}

/// Parses a Parquet seed file: each row as a JSON object.
fn parse_parquet(bytes: &[u8], source: &str) -> Result<Vec<Seed>, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(bytes::Bytes::copy_from_slice(bytes))
        .map_err(|e| format!("{source}: not a readable Parquet file: {e}"))?;
    let columns: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    if !columns.iter().any(|c| c == "prompt" || c == "messages") {
        return Err(format!(
            "{source}: missing column prompt (or messages); the file has {}",
            columns.join(", ")
        ));
    }
    let mut seeds = Vec::new();
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| format!("{source}: {e}"))?;
    for (i, row) in rows.enumerate() {
        let n = i + 1;
        let row = row.map_err(|e| format!("{source}: row {n}: {e}"))?;
        seeds.push(seed_of(
            &row.to_json_value(),
            &format!("{source}: row {n}"),
            n,
        )?);
    }
    non_empty(seeds, source)
}

fn non_empty(seeds: Vec<Seed>, source: &str) -> Result<Vec<Seed>, String> {
    if seeds.is_empty() {
        return Err(format!("{source}: the seed file is empty"));
    }
    Ok(seeds)
}

/// One seed from a line's or row's object; `at` names it in errors (`file: line 3`).
fn seed_of(v: &Value, at: &str, n: usize) -> Result<Seed, String> {
    let instructions = super::instructions::of_row(v).map_err(|e| format!("{at}: {e}"))?;
    match (v.get("prompt"), v.get("messages")) {
        (Some(Value::String(p)), _) if !p.trim().is_empty() => Ok(Seed {
            prompt: p.clone(),
            messages: None,
            instructions,
            line: n,
        }),
        (_, Some(m @ Value::Array(turns))) => {
            let last = turns
                .last()
                .ok_or_else(|| format!("{at}: column messages is an empty list"))?;
            for (j, t) in turns.iter().enumerate() {
                let ok = matches!(t["role"].as_str(), Some("system" | "user" | "assistant"))
                    && t["content"].is_string();
                if !ok {
                    return Err(format!(
                        "{at}: messages[{j}] needs role (system, user or assistant) and content (a string)"
                    ));
                }
            }
            if last["role"] != "user" {
                return Err(format!("{at}: messages must end with a user turn"));
            }
            Ok(Seed {
                prompt: last["content"].as_str().unwrap_or_default().to_string(),
                messages: Some(m.clone()),
                instructions,
                line: n,
            })
        }
        (Some(_), _) => Err(format!("{at}: column prompt must be a non-empty string")),
        _ => Err(format!("{at}: missing column prompt (or messages)")),
    }
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

    /// Parquet files written by pyarrow (`tests/fixtures/*.parquet`, snappy-compressed).
    #[test]
    fn parquet_prompts_conversations_and_a_wrong_schema() {
        let fixture = |name: &str| {
            std::fs::read(format!(
                "{}/../../tests/fixtures/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
        };
        let s = parse_file(&fixture("seeds.parquet"), "seeds.parquet").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].prompt, "Write a limerick about a cat.");
        assert_eq!(s[1].line, 2);
        let s = parse_file(&fixture("seeds-messages.parquet"), "m.parquet").unwrap();
        assert_eq!(s[0].prompt, "Plan a picnic.");
        assert_eq!(s[0].messages.as_ref().unwrap().as_array().unwrap().len(), 3);
        assert_eq!(s[1].prompt, "Suggest a book.");
        let e = parse_file(&fixture("seeds-wrong-schema.parquet"), "w.parquet").unwrap_err();
        assert_eq!(
            e,
            "w.parquet: missing column prompt (or messages); the file has text, id"
        );
        let e = parse_file(b"PAR1 truncated", "t.parquet").unwrap_err();
        assert!(
            e.starts_with("t.parquet: not a readable Parquet file"),
            "{e}"
        );
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
