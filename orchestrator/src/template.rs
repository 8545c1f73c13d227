//! Spec templates: a campaign spec with `{{ name }}` placeholders, filled with text values at
//! submission or firing time and validated as a spec afterwards.
//!
//! Values are inserted as they are (like Helm), so a value can be a number, a list or a quoted
//! string; a value may not contain a line break. Every placeholder needs a value and every value
//! must be used, so a typo in either is reported instead of silently ignored.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template parameter {0}: no value given (pass it as {0}=...)")]
    Missing(String),
    #[error("template parameter {0}: not used by the template")]
    Unused(String),
    #[error("template parameter {0}: value must be a single line")]
    Multiline(String),
    #[error("template: placeholder at line {line} is not closed with }}}}")]
    Unclosed { line: usize },
    #[error(
        "template: placeholder {text:?} at line {line} must be a name of letters, digits and _"
    )]
    BadName { text: String, line: usize },
}

/// A placeholder occurrence: byte range in the text and the parameter name.
struct Placeholder<'a> {
    start: usize,
    end: usize,
    name: &'a str,
}

/// Every placeholder, in one pass over the text (line numbers are counted as it goes, so the
/// scan stays linear in the size of the template).
fn placeholders(text: &str) -> Result<Vec<Placeholder<'_>>, TemplateError> {
    let mut out = Vec::new();
    let mut from = 0;
    let mut line = 1;
    while let Some(open) = text[from..].find("{{").map(|i| from + i) {
        line += text[from..open].matches('\n').count();
        let close = text[open..]
            .find("}}")
            .map(|i| open + i)
            .ok_or(TemplateError::Unclosed { line })?;
        let inner = &text[open + 2..close];
        let name = inner.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(TemplateError::BadName {
                text: inner.to_string(),
                line,
            });
        }
        out.push(Placeholder {
            start: open,
            end: close + 2,
            name,
        });
        line += inner.matches('\n').count();
        from = close + 2;
    }
    Ok(out)
}

/// The parameter names a template uses, sorted.
pub fn parameters(text: &str) -> Result<BTreeSet<String>, TemplateError> {
    Ok(placeholders(text)?
        .into_iter()
        .map(|p| p.name.to_string())
        .collect())
}

/// Fills every placeholder. `builtins` are offered but need not be used (e.g. `fire_time`);
/// `values` must all be used.
pub fn render(
    text: &str,
    values: &BTreeMap<String, String>,
    builtins: &BTreeMap<String, String>,
) -> Result<String, TemplateError> {
    let found = placeholders(text)?;
    let used: BTreeSet<&str> = found.iter().map(|p| p.name).collect();
    if let Some(unused) = values.keys().find(|k| !used.contains(k.as_str())) {
        return Err(TemplateError::Unused(unused.clone()));
    }
    if let Some((name, _)) = values.iter().find(|(_, v)| v.contains('\n')) {
        return Err(TemplateError::Multiline(name.clone()));
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for p in &found {
        let value = values
            .get(p.name)
            .or_else(|| builtins.get(p.name))
            .ok_or_else(|| TemplateError::Missing(p.name.to_string()))?;
        out.push_str(&text[last..p.start]);
        out.push_str(value);
        last = p.end;
    }
    out.push_str(&text[last..]);
    Ok(out)
}

/// Parses `name=value` pairs (CLI flags); the error names the bad pair.
pub fn parse_assignments<'a>(
    pairs: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeMap<String, String>, String> {
    pairs
        .into_iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("parameter {pair:?} must look like name=value"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fills_values_and_builtins() {
        let t = "name: nightly-{{ fire_date }}\nrounds: {{rounds}}\nuri: \"{{ base_model }}\"\n";
        let out = render(
            t,
            &map(&[("rounds", "3"), ("base_model", "file:///m")]),
            &map(&[("fire_date", "2026-11-26"), ("fire_time", "x")]),
        )
        .unwrap();
        assert_eq!(
            out,
            "name: nightly-2026-11-26\nrounds: 3\nuri: \"file:///m\"\n"
        );
        assert_eq!(
            parameters(t).unwrap().into_iter().collect::<Vec<_>>(),
            ["base_model", "fire_date", "rounds"]
        );
    }

    #[test]
    fn scanning_is_linear() {
        // 100k placeholders over 100k lines: quadratic scanning took minutes for this.
        let t = "a: {{ x }}\n".repeat(100_000);
        let started = std::time::Instant::now();
        let out = render(&t, &map(&[("x", "1")]), &BTreeMap::new()).unwrap();
        assert_eq!(out.len(), "a: 1\n".len() * 100_000);
        assert_eq!(
            render(
                &format!("{t}b: {{{{ y"),
                &map(&[("x", "1")]),
                &BTreeMap::new()
            )
            .unwrap_err(),
            TemplateError::Unclosed { line: 100_001 }
        );
        // Generous: linear scanning takes milliseconds; quadratic took minutes.
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn every_problem_is_named() {
        let none = BTreeMap::new();
        assert_eq!(
            render("a: {{ x }}", &none, &none).unwrap_err().to_string(),
            "template parameter x: no value given (pass it as x=...)"
        );
        assert_eq!(
            render("a: {{ x }}", &map(&[("x", "1"), ("y", "2")]), &none)
                .unwrap_err()
                .to_string(),
            "template parameter y: not used by the template"
        );
        assert_eq!(
            render("a: {{ x }}", &map(&[("x", "1\nb: 2")]), &none).unwrap_err(),
            TemplateError::Multiline("x".into())
        );
        assert_eq!(
            render("a: 1\nb: {{ x", &none, &none).unwrap_err(),
            TemplateError::Unclosed { line: 2 }
        );
        assert!(matches!(
            render("a: {{ x-y }}", &none, &none).unwrap_err(),
            TemplateError::BadName { line: 1, .. }
        ));
        assert_eq!(
            parse_assignments(["a=1", "b"]).unwrap_err(),
            "parameter \"b\" must look like name=value"
        );
    }
}
