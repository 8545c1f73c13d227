//! Evaluation: held-out accuracy by verifier, mean reward, and head-to-head win rate judged by
//! the reward model.

use crate::EngineError;
use crate::model::Transformer;
use crate::reward;
use crate::sample::{SampleConfig, sample};
use crate::world;

/// Greedy answers of `model` to `prompts`.
pub fn answers(model: &Transformer, prompts: &[String]) -> Result<Vec<String>, EngineError> {
    let out = sample(model, prompts, 1, &SampleConfig::greedy(24), &mut |_, _| {
        true
    })?;
    Ok(out.into_iter().map(|mut v| v.remove(0)).collect())
}

/// Fraction of prompts whose answer the verifier accepts.
pub fn accuracy(prompts: &[String], answers: &[String]) -> f64 {
    let ok = prompts
        .iter()
        .zip(answers)
        .filter(|(p, a)| world::verify(p, a))
        .count();
    ok as f64 / prompts.len().max(1) as f64
}

/// Scalar rewards of answers by the reward model, weighted by `weights`; with `verifier`, the
/// correctness attribute comes from the task's verifier wherever one exists (as in the score
/// stage).
pub fn rewards(
    rm: &Transformer,
    prompts: &[String],
    answers: &[String],
    verifier: bool,
    weights: &[f64; 5],
) -> Result<Vec<f64>, EngineError> {
    let rows: Vec<(&str, &str)> = prompts
        .iter()
        .zip(answers)
        .map(|(p, a)| (p.as_str(), a.as_str()))
        .collect();
    let scores = reward::score(rm, &rows, 128)?;
    Ok(scores
        .into_iter()
        .zip(&rows)
        .map(|(mut attrs, (p, a))| {
            if verifier && world::answer(p).is_some() {
                attrs[1] = if world::verify(p, a) { 4.0 } else { 0.0 };
            }
            reward::scalar(&attrs, weights)
        })
        .collect())
}

/// Per prompt: 1 where `a`'s reward is higher, 0.5 on a tie, 0 where lower (their mean is the
/// win rate; a bootstrap over them gives its interval).
pub fn win_scores(rewards_a: &[f64], rewards_b: &[f64]) -> Vec<f64> {
    rewards_a
        .iter()
        .zip(rewards_b)
        .map(|(a, b)| {
            if (a - b).abs() < 1e-6 {
                0.5
            } else if a > b {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}
