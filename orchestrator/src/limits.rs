//! What one request may carry, in one place. Checked at the API edge before anything reaches
//! Postgres (which, among other things, refuses U+0000 in text); every error names the field and
//! the limit. `dashboards/README.md` and ARCHITECTURE.md list the same numbers.

pub(crate) use crate::error::excerpt;
pub use crate::error::truncate;
use crate::error::{Error, Result};

/// A campaign spec or schedule template, in bytes.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Names and identifiers (worker, pool, backend, token, stage, schedule, metric, label), free
/// text (progress messages, errors, output metadata) and list sizes: the wire contract's.
pub use flywheel_proto::limits::{MAX_ENTRIES, MAX_NAME_BYTES, MAX_TEXT_BYTES};
/// An artifact URI.
pub const MAX_URI_BYTES: usize = 4096;
/// Worker pools in the database; a new pool past this is refused.
pub const MAX_POOLS: i64 = 256;
/// Tasks one round may have (all stages' shards).
pub const MAX_TASKS_PER_ROUND: u64 = 10_000;
/// Dependency edges between the tasks of one round.
pub const MAX_EDGES_PER_ROUND: u64 = 100_000;
/// YAML events replayed through aliases while parsing one spec (an alias bomb's expansion).
pub const MAX_YAML_ALIAS_EVENTS: usize = 10_000;
/// A gRPC error message; longer ones are cut (clients refuse large `grpc-message` headers).
pub use crate::error::MAX_STATUS_BYTES;
/// Problems listed in one spec error; the rest are counted.
pub const MAX_LISTED_PROBLEMS: usize = 20;

/// `value` as a field of a request: at most `max` bytes and no NUL character.
pub(crate) fn text(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes; the limit is {max}", value.len()),
        ));
    }
    if let Some(at) = value.find('\0') {
        return Err(Error::invalid(
            field,
            format!("contains a NUL character (byte {at}), which cannot be stored"),
        ));
    }
    Ok(())
}

/// Where a JSON value holds a NUL character (which Postgres' text and jsonb refuse), as
/// `(path, in_key)` in field-path notation (`a.b[2]`; `$` for the value itself).
pub(crate) fn nul_paths(v: &serde_json::Value, path: &str) -> Vec<(String, bool)> {
    use serde_json::Value;
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match v {
        Value::String(s) if s.contains('\0') => {
            vec![(
                if path.is_empty() {
                    "$".into()
                } else {
                    path.into()
                },
                false,
            )]
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .flat_map(|(i, item)| nul_paths(item, &format!("{path}[{i}]")))
            .collect(),
        Value::Object(m) => m
            .iter()
            .flat_map(|(k, item)| {
                if k.contains('\0') {
                    vec![(join(&k.replace('\0', "\\0")), true)]
                } else {
                    nul_paths(item, &join(k))
                }
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A name: non-empty after trimming, at most [`MAX_NAME_BYTES`], no control characters.
pub(crate) fn name(field: &'static str, value: &str) -> Result<()> {
    text(field, value, MAX_NAME_BYTES)?;
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A list or map of a request: at most [`MAX_ENTRIES`] entries.
pub(crate) fn entries(field: &'static str, len: usize) -> Result<()> {
    if len > MAX_ENTRIES {
        return Err(Error::invalid(
            field,
            format!("has {len} entries; the limit is {MAX_ENTRIES}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_limits_name_the_field() {
        assert!(text("message", "ok", 10).is_ok());
        assert_eq!(
            text("message", "a\0b", 10).unwrap_err().to_string(),
            "message: contains a NUL character (byte 1), which cannot be stored"
        );
        assert_eq!(
            text("message", "abcdef", 3).unwrap_err().to_string(),
            "message: is 6 bytes; the limit is 3"
        );
        assert!(name("name", "  ").is_err());
        assert!(name("name", "a\u{1b}b").is_err());
        let long = "é".repeat(5000);
        let cut = truncate(&long, 100);
        assert!(cut.len() <= 100 && cut.ends_with("more bytes)"));
        assert!(excerpt(&"x".repeat(1000)).len() < 100);
    }
}
