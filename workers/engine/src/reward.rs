//! Reward model scoring and the programmatic attribute labels it is trained on.

use candle_core::Tensor;

use crate::EngineError;
use crate::fused::HostModel;
use crate::model::Transformer;
use crate::train::batch;
use crate::world;

/// The weighted sum of the five attributes (helpfulness, correctness, coherence, complexity,
/// verbosity); the weights are the caller's (Flywheel's default is the stage contract's).
pub fn scalar(attributes: &[f32; 5], weights: &[f64; 5]) -> f64 {
    attributes
        .iter()
        .zip(weights)
        .map(|(a, w)| *a as f64 * w)
        .sum()
}

/// Labels (0..4) for a response, computed by program: correctness from the verifier, coherence
/// from well-formedness (quotes around the answer allowed), verbosity from length against the answer asked for, complexity from the
/// task's difficulty, helpfulness overall.
pub fn labels(prompt: &str, response: &str) -> [f32; 5] {
    let correct = world::verify(prompt, response);
    let expected_len = world::answer(prompt).map_or(8, |a| a.len()).max(1) as f32;
    // Form is judged inside one pair of surrounding quotes: the answer a quoted prompt asks for
    // (and the verifier requires) is as coherent as the bare one.
    let core = response
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(response);
    let well_formed = !core.is_empty()
        && core
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "[]-".contains(c))
        && (core.starts_with('[') == core.ends_with(']'));
    let coherence = if well_formed {
        4.0
    } else if response.is_empty() {
        0.0
    } else {
        1.5
    };
    let verbosity = (2.0 * response.len() as f32 / expected_len).min(4.0);
    let complexity = world::difficulty(prompt) as f32 * 4.0 / 3.0;
    let correctness = if correct { 4.0 } else { 0.0 };
    let helpfulness = if correct {
        3.0 + coherence / 4.0
    } else {
        coherence / 4.0
    };
    [helpfulness, correctness, coherence, complexity, verbosity]
}

/// Attribute scores for `(prompt, response)` pairs.
pub fn score(
    model: &Transformer,
    rows: &[(&str, &str)],
    batch_size: usize,
) -> Result<Vec<[f32; 5]>, EngineError> {
    let mut out = Vec::with_capacity(rows.len());
    if model.device().is_cpu() {
        let host = HostModel::of(model)?;
        for chunk in rows.chunks(batch_size.max(1)) {
            out.extend(host.score(chunk)?);
        }
        return Ok(out);
    }
    for chunk in rows.chunks(batch_size.max(1)) {
        let b = batch(chunk, model.config.max_seq, model.device())?;
        let pred: Tensor = model.attributes(&b.inputs, &b.last)?;
        for row in pred.to_vec2::<f32>()? {
            out.push([row[0], row[1], row[2], row[3], row[4]]);
        }
    }
    Ok(out)
}
