//! Batched sampling with a KV cache: temperature, top-k and top-p, K samples per prompt,
//! reproducible for a seed (each sample draws from its own generator).

use candle_core::Tensor;

use crate::EngineError;
use crate::fused::HostModel;
use crate::model::Transformer;
use crate::rng::Rng;
use crate::tokenizer::{END, PAD, decode, encode_prompt};

#[derive(Debug, Clone)]
pub struct SampleConfig {
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub top_p: f64,
    pub max_tokens: usize,
    pub seed: u64,
    pub batch_size: usize,
}

impl SampleConfig {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_tokens,
            seed: 0,
            batch_size: 64,
        }
    }
}

pub(crate) fn pick_token(logits: &[f32], cfg: &SampleConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        return logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(END, |(i, _)| i as u32);
    }
    let mut order: Vec<usize> = (0..logits.len()).filter(|&i| i as u32 != PAD).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if cfg.top_k > 0 {
        order.truncate(cfg.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / cfg.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (n, p) in probs.iter_mut().enumerate() {
        *p /= total;
        kept += *p;
        if kept >= cfg.top_p {
            cut = n + 1;
            break;
        }
    }
    let mass: f64 = probs[..cut].iter().sum();
    let mut u = rng.unit() * mass;
    for (n, p) in probs[..cut].iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return order[n] as u32;
        }
    }
    order[cut - 1] as u32
}

/// `k` responses for each prompt: `out[i][j]` is sample j of prompt i. `progress(done, total)` is
/// called after each batch; returning `false` stops with `Cancelled`.
pub fn sample(
    model: &Transformer,
    prompts: &[String],
    k: usize,
    cfg: &SampleConfig,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Vec<Vec<String>>, EngineError> {
    Ok(sample_ids(model, prompts, k, cfg, progress)?
        .into_iter()
        .map(|samples| samples.iter().map(|ids| decode(ids)).collect())
        .collect())
}

/// [`sample`] as token ids: each sample ends with `<|end|>` unless it ran out of `max_tokens`
/// (or of the model's context).
pub fn sample_ids(
    model: &Transformer,
    prompts: &[String],
    k: usize,
    cfg: &SampleConfig,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Vec<Vec<Vec<u32>>>, EngineError> {
    let requests: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .collect();
    let mut out = vec![vec![Vec::new(); k]; prompts.len()];
    let host = cpu_copy(model)?;
    for (chunk_no, chunk) in requests.chunks(cfg.batch_size.max(1)).enumerate() {
        let mut rows: Vec<Row> = chunk
            .iter()
            .map(|(i, j)| Row {
                prompt: &prompts[*i],
                cfg,
                rng: Rng::derive(cfg.seed, &[*i as u64, *j as u64]),
            })
            .collect();
        let generated = match &host {
            Some(host) => host.sample_rows(&mut rows)?,
            None => sample_rows_on_graph(model, &mut rows)?,
        };
        for ((i, j), g) in chunk.iter().zip(generated) {
            out[*i][*j] = g;
        }
        if !progress((chunk_no + 1) * cfg.batch_size.max(1), requests.len()) {
            return Err(EngineError::Cancelled);
        }
    }
    Ok(out)
}

/// One sequence of a batch: its prompt, its own sampling settings (`batch_size` and `seed`
/// are not read) and its own generator.
pub struct Row<'a> {
    pub prompt: &'a str,
    pub cfg: &'a SampleConfig,
    pub rng: Rng,
}

impl Row<'_> {
    /// The generator of sample `j` of prompt `i` of a request seeded `seed`, as [`sample_ids`]
    /// draws it.
    pub fn rng_of(seed: u64, i: usize, j: usize) -> Rng {
        Rng::derive(seed, &[i as u64, j as u64])
    }
}

/// On the CPU, a copy of `model`'s weights for the hand-written forward pass ([`HostModel`]),
/// which samples several times faster than the candle graph; `None` elsewhere (CUDA).
fn cpu_copy(model: &Transformer) -> Result<Option<HostModel>, EngineError> {
    model
        .device()
        .is_cpu()
        .then(|| HostModel::of(model))
        .transpose()
}

/// Samples every row in one batch, each with its own settings: requests with different
/// temperatures or lengths share the model's passes. On the CPU through [`HostModel`] (each row
/// its own KV cache); elsewhere the candle graph, left-padded with one cache.
pub fn sample_rows(model: &Transformer, rows: &mut [Row]) -> Result<Vec<Vec<u32>>, EngineError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    match cpu_copy(model)? {
        Some(host) => host.sample_rows(rows),
        None => sample_rows_on_graph(model, rows),
    }
}

/// [`sample_rows`] on the candle graph: left-padded, one KV cache for the batch. The path on
/// CUDA, and the reference the CPU sampler is tested against.
pub fn sample_rows_on_graph(
    model: &Transformer,
    rows: &mut [Row],
) -> Result<Vec<Vec<u32>>, EngineError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let dev = model.device().clone();
    let encoded: Vec<Vec<u32>> = rows.iter().map(|r| encode_prompt(r.prompt)).collect();
    let width = encoded.iter().map(Vec::len).max().unwrap_or(1);
    let room = model.config.max_seq.saturating_sub(width);
    let budgets: Vec<usize> = rows.iter().map(|r| r.cfg.max_tokens.min(room)).collect();
    let budget = budgets.iter().copied().max().unwrap_or(0);
    let pads: Vec<usize> = encoded.iter().map(|e| width - e.len()).collect();
    let mut ids = Vec::with_capacity(rows.len() * width);
    for (e, p) in encoded.iter().zip(&pads) {
        ids.extend(std::iter::repeat_n(PAD, *p));
        ids.extend(e);
    }
    let mut cache = model.new_cache(&pads)?;
    let tokens = Tensor::from_vec(ids, (rows.len(), width), &dev)?;
    let mut hidden = model.hidden(&tokens, Some(&mut cache))?;
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
    let mut done: Vec<bool> = budgets.iter().map(|b| *b == 0).collect();
    for _ in 0..budget {
        if done.iter().all(|d| *d) {
            break;
        }
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        let logits: Vec<Vec<f32>> = model.logits_of_hidden(&last)?.squeeze(1)?.to_vec2()?;
        let mut next = Vec::with_capacity(rows.len());
        for (r, row) in logits.iter().enumerate() {
            let t = if done[r] {
                PAD
            } else {
                pick_token(row, rows[r].cfg, &mut rows[r].rng)
            };
            if !done[r] {
                generated[r].push(t);
                done[r] = t == END || generated[r].len() >= budgets[r];
            }
            next.push(t);
        }
        if done.iter().all(|d| *d) {
            break;
        }
        hidden = model.hidden(
            &Tensor::from_vec(next, (rows.len(), 1), &dev)?,
            Some(&mut cache),
        )?;
    }
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a top-k or top-p cut, tokens are drawn with their softmax probabilities (the pad
    /// never).
    #[test]
    fn a_draw_follows_the_softmax() {
        let mut logits = vec![f32::NEG_INFINITY; PAD as usize + 1];
        logits[..3].copy_from_slice(&[0.0, 2f32.ln(), 3f32.ln()]);
        logits[PAD as usize] = 10.0;
        let cfg = SampleConfig {
            temperature: 1.0,
            ..SampleConfig::greedy(1)
        };
        let mut rng = Rng::new(5);
        let mut counts = [0usize; 3];
        let n = 60_000;
        for _ in 0..n {
            counts[pick_token(&logits, &cfg, &mut rng) as usize] += 1;
        }
        for (i, c) in counts.iter().enumerate() {
            let expected = (i + 1) as f64 / 6.0;
            assert!(
                (*c as f64 / n as f64 - expected).abs() < 0.01,
                "token {i}: {c} of {n}"
            );
        }
    }
}
