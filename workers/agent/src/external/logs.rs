//! Metrics and progress in a trainer's log lines.

/// What a terminal shows of a log line: the text after its last carriage return (progress bars
/// redraw themselves with `\r`).
pub(super) fn shown(line: &str) -> &str {
    line.rsplit('\r')
        .find(|s| !s.trim().is_empty())
        .unwrap_or("")
}

fn metric_key(k: &str) -> bool {
    k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/'))
}

fn metric_value(v: &str) -> Option<f64> {
    let v = v.trim().trim_matches(|c| c == '\'' || c == '"');
    v.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Metrics in a trainer's log line, in two shapes only, so that warnings, paths and prose never
/// become metrics:
/// - a logged dict, the whole line `{...}`: transformers/TRL's `{'loss': 1.25, ...}`, with
///   numbers bare or quoted (transformers 5 logs `'loss': '6.243'`), or JSON;
/// - `key=number` words: `flywheel train`'s `step=3 loss=0.41`, Lightning/NeMo bars'
///   `train_loss=0.693,`.
pub fn parse_metrics(line: &str) -> Vec<(String, f64)> {
    let t = shown(line).trim();
    if let Some(inner) = t.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        return inner
            .split(',')
            .filter_map(|pair| {
                let (k, v) = pair.split_once(':')?;
                let k = k.trim().trim_matches(|c| c == '\'' || c == '"');
                Some((k.to_string(), metric_value(v)?)).filter(|_| metric_key(k))
            })
            .collect();
    }
    t.split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '|'))
        .filter_map(|word| {
            let (k, v) = word.split_once('=')?;
            Some((k.to_string(), metric_value(v)?)).filter(|_| metric_key(k))
        })
        .collect()
}

/// A progress bar's `done/total` (tqdm: ` 50%|█████     | 5/10 [00:03<00:03, 1.52it/s]`).
pub fn parse_progress(line: &str) -> Option<f64> {
    let t = shown(line);
    if !t.contains("%|") {
        return None;
    }
    t.split_whitespace().find_map(|w| {
        let (done, total) = w.split_once('/')?;
        let (done, total) = (done.parse::<f64>().ok()?, total.parse::<f64>().ok()?);
        (total > 0.0).then(|| (done / total).clamp(0.0, 1.0))
    })
}
