//! Reading a list out of an LLM's answer, whatever shape it took: a JSON array (also inside a
//! fenced code block, or of objects with one text field), a YAML-style `- item` list, a
//! numbered list (`1.`, `1)`, `(1)`), a bulleted list (`*`, `-`, `•`), or one item per line.
//! An answer with no list in it is an error (a conversion failure the stage counts).

use serde_json::Value;

/// The items of the list in `answer`, trimmed, in order, without empty ones.
pub fn parse_list(answer: &str) -> Result<Vec<String>, String> {
    let text = strip_fence(answer.trim());
    if let Some(items) = json_list(text) {
        return non_empty(items, answer);
    }
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let marked: Vec<String> = lines.iter().filter_map(|l| strip_marker(l)).collect();
    if !marked.is_empty() {
        return non_empty(marked, answer);
    }
    // No markers: one item per line, unless it is a single line of prose.
    if lines.len() > 1 {
        return non_empty(lines.iter().map(|l| unquote(l)).collect(), answer);
    }
    Err(format!(
        "no list in the answer: {:?}",
        answer.chars().take(120).collect::<String>()
    ))
}

fn non_empty(items: Vec<String>, answer: &str) -> Result<Vec<String>, String> {
    let items: Vec<String> = items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        Err(format!(
            "an empty list in the answer: {:?}",
            answer.chars().take(120).collect::<String>()
        ))
    } else {
        Ok(items)
    }
}

fn strip_fence(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    let rest = rest.split_once('\n').map_or("", |(_, body)| body);
    rest.trim_end().strip_suffix("```").unwrap_or(rest).trim()
}

/// A JSON array of strings (or of objects whose single string field is the item), possibly
/// with prose around it.
fn json_list(text: &str) -> Option<Vec<String>> {
    let start = text.find('[')?;
    let end = text.rfind(']')?;
    if end <= start {
        return None;
    }
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&text[start..=end]) else {
        return None;
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::String(s) => Some(s),
            Value::Object(o) => {
                let strings: Vec<&Value> = o.values().filter(|v| v.is_string()).collect();
                (strings.len() == 1).then(|| strings[0].as_str().unwrap_or_default().to_string())
            }
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// The item of a line that starts with a list marker.
fn strip_marker(line: &str) -> Option<String> {
    for bullet in ["- ", "* ", "• ", "+ "] {
        if let Some(rest) = line.strip_prefix(bullet) {
            return Some(unquote(rest));
        }
    }
    let digits = line.chars().take_while(char::is_ascii_digit).count();
    let (open, body) = match line.strip_prefix('(') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let digits = if open {
        body.chars().take_while(char::is_ascii_digit).count()
    } else {
        digits
    };
    if digits == 0 || digits > 4 {
        return None;
    }
    let after = &body[digits..];
    let rest = after
        .strip_prefix(". ")
        .or_else(|| after.strip_prefix(") "))
        .or_else(|| after.strip_prefix(": "))
        .or_else(|| after.strip_prefix('.').filter(|r| r.is_empty()))?;
    Some(unquote(rest))
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix("**")
        .and_then(|r| r.strip_suffix("**"))
        .unwrap_or(s);
    let s = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(s);
    s.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_of_list() {
        let want = vec!["Food and drinks".to_string(), "Technology".to_string()];
        for answer in [
            r#"["Food and drinks", "Technology"]"#,
            "Here are two topics:\n```json\n[\"Food and drinks\", \"Technology\"]\n```",
            r#"[{"topic": "Food and drinks"}, {"topic": "Technology"}]"#,
            "- Food and drinks\n- Technology",
            "Sure! Here you go:\n1. Food and drinks\n2. Technology",
            "1) Food and drinks\n2) \"Technology\"",
            "(1) Food and drinks\n(2) Technology",
            "* **Food and drinks**\n* Technology",
            "• Food and drinks\n• Technology",
            "Food and drinks\nTechnology",
        ] {
            assert_eq!(parse_list(answer).unwrap(), want, "{answer}");
        }
    }

    #[test]
    fn prose_is_a_failure() {
        assert!(parse_list("I cannot help with that.").is_err());
        assert!(parse_list("").is_err());
        assert!(parse_list("[]").is_err());
    }
}
