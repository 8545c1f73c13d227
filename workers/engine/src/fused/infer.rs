//! Inference on the hand-written CPU forward pass: KV-cached sampling and reward scoring.
//!
//! Each row keeps its own cache and positions (no left padding), and rows are split between
//! threads that never wait on each other: a row's tokens depend only on its prompt, its settings
//! and its own generator, so the split changes no output.

use crate::EngineError;
use crate::sample::{Row, pick_token};
use crate::tokenizer::{END, encode_prompt};

use super::{
    Dims, HostModel, Seq, axpy, dot, in_parallel, linear, rms_norm, rotate_qk, silu, split, threads,
};

/// Keys (after RoPE) and values of every position so far, per layer, row after row.
struct KvCache {
    /// `[layer][row * max_seq * kv_width + pos * kv_width ..]`
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: Vec<usize>,
    kv_width: usize,
    max_seq: usize,
}

impl KvCache {
    fn new(layers: usize, rows: usize, kv_width: usize, max_seq: usize) -> Self {
        Self {
            k: vec![vec![0f32; rows * max_seq * kv_width]; layers],
            v: vec![vec![0f32; rows * max_seq * kv_width]; layers],
            len: vec![0; rows],
            kv_width,
            max_seq,
        }
    }

    fn at(&self, row: usize, pos: usize) -> usize {
        (row * self.max_seq + pos) * self.kv_width
    }
}

impl HostModel {
    /// Runs `tokens[i]` through the model as the continuation of cached row `rows[i]`, appends
    /// their keys and values to the cache, and returns the final hidden state of each item's last
    /// token (`items × d_model`).
    fn advance(&self, cache: &mut KvCache, rows: &[usize], tokens: &[&[u32]]) -> Vec<f32> {
        let dm = Dims::of(&self.config);
        let (d, dh) = (dm.d, dm.dh);
        let kv_width = dm.kv * dh;
        // (row, position) of every token, in order.
        let places: Vec<(usize, usize)> = rows
            .iter()
            .zip(tokens)
            .flat_map(|(&r, t)| (0..t.len()).map(move |i| (r, i)))
            .map(|(r, i)| (r, cache.len[r] + i))
            .collect();
        let n = places.len();
        let embed = self.p(&self.layout.embed);
        let mut x = Vec::with_capacity(n * d);
        for &t in tokens.iter().flat_map(|t| t.iter()) {
            x.extend_from_slice(&embed[t as usize * d..(t as usize + 1) * d]);
        }
        let scale = 1.0 / (dh as f32).sqrt();
        let rep = dm.h / dm.kv;
        let mut h = vec![0f32; n * d];
        let mut qkv = vec![0f32; n * dm.qkv];
        let mut att = vec![0f32; n * dm.h * dh];
        let mut scores = Vec::with_capacity(self.config.max_seq);
        let mut gu = vec![0f32; n * 2 * dm.ff];
        let mut act = vec![0f32; n * dm.ff];
        for (layer, l) in self.layout.layers.iter().enumerate() {
            rms_norm(&x, self.p(&l.attn_norm), &mut h);
            linear(&h, self.p(&l.wqkv), &mut qkv, n, dm.qkv, false);
            rotate_qk(&mut qkv, &dm, places.iter().map(|p| p.1), self.rope(), 1.0);
            for (row, &(r, pos)) in qkv.chunks(dm.qkv).zip(&places) {
                let at = cache.at(r, pos);
                let (k, v) = row[dm.h * dh..].split_at(kv_width);
                cache.k[layer][at..at + kv_width].copy_from_slice(k);
                cache.v[layer][at..at + kv_width].copy_from_slice(v);
            }
            att.fill(0.0);
            for (i, &(r, pos)) in places.iter().enumerate() {
                for head in 0..dm.h {
                    let q = &qkv[i * dm.qkv + head * dh..][..dh];
                    let g = (head / rep) * dh;
                    scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..=pos {
                        let s = dot(q, &cache.k[layer][cache.at(r, j) + g..][..dh]) * scale;
                        max = max.max(s);
                        scores.push(s);
                    }
                    let mut sum = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut att[(i * dm.h + head) * dh..][..dh];
                    for (j, s) in scores.iter().enumerate() {
                        axpy(s / sum, &cache.v[layer][cache.at(r, j) + g..][..dh], o);
                    }
                }
            }
            linear(&att, self.p(&l.wo), &mut x, n, d, true);
            rms_norm(&x, self.p(&l.mlp_norm), &mut h);
            linear(&h, self.p(&l.wgu), &mut gu, n, 2 * dm.ff, false);
            for (a, g) in act.chunks_exact_mut(dm.ff).zip(gu.chunks_exact(2 * dm.ff)) {
                let (gate, up) = g.split_at(dm.ff);
                for f in 0..dm.ff {
                    a[f] = silu(gate[f]) * up[f];
                }
            }
            linear(&act, self.p(&l.w_down), &mut x, n, d, true);
        }
        for (&r, t) in rows.iter().zip(tokens) {
            cache.len[r] += t.len();
        }
        // The final norm of each item's last token only.
        let mut last = Vec::with_capacity(rows.len() * d);
        let mut end = 0;
        for t in tokens {
            end += t.len();
            last.extend_from_slice(&x[(end - 1) * d..end * d]);
        }
        let mut out = vec![0f32; last.len()];
        rms_norm(&last, self.p(&self.layout.final_norm), &mut out);
        out
    }

    /// Samples `rows` (each with its own settings and generator): the same tokens as
    /// [`crate::sample::sample_rows`] up to float rounding.
    pub fn sample_rows(&self, rows: &mut [Row]) -> Result<Vec<Vec<u32>>, EngineError> {
        let max_seq = self.config.max_seq;
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| encode_prompt(r.prompt)).collect();
        if let Some(p) = prompts.iter().find(|p| p.len() > max_seq) {
            return Err(EngineError::Config(format!(
                "sequence of {} tokens exceeds max_seq {max_seq}",
                p.len()
            )));
        }
        let seqs: Vec<Seq> = prompts
            .iter()
            .map(|ids| Seq {
                ids: ids.clone(),
                prompt_len: ids.len(),
            })
            .collect();
        let chunks = split(&seqs, threads());
        let mut work = Vec::with_capacity(chunks.len());
        let mut rest = &mut rows[..];
        for c in &chunks {
            let (head, tail) = rest.split_at_mut(c.len());
            work.push((head, &prompts[c.clone()]));
            rest = tail;
        }
        let out = in_parallel(work, |(rows, prompts)| self.sample_chunk(rows, prompts));
        Ok(out.into_iter().flatten().collect())
    }

    fn sample_chunk(&self, rows: &mut [Row], prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
        let c = &self.config;
        let dm = Dims::of(c);
        let mut cache = KvCache::new(c.n_layers, rows.len(), dm.kv * dm.dh, c.max_seq);
        let budgets: Vec<usize> = rows
            .iter()
            .zip(prompts)
            .map(|(r, p)| r.cfg.max_tokens.min(c.max_seq - p.len()))
            .collect();
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
        let mut active: Vec<usize> = (0..rows.len()).filter(|&r| budgets[r] > 0).collect();
        let mut next: Vec<[u32; 1]> = Vec::new();
        let mut feed: Vec<&[u32]> = active.iter().map(|&r| prompts[r].as_slice()).collect();
        let lm_head = self.p(&self.layout.lm_head);
        while !active.is_empty() {
            let hidden = self.advance(&mut cache, &active, &feed);
            let mut logits = vec![0f32; active.len() * dm.vocab];
            linear(&hidden, lm_head, &mut logits, active.len(), dm.vocab, false);
            next.clear();
            let mut still = Vec::with_capacity(active.len());
            for (&r, row_logits) in active.iter().zip(logits.chunks_exact(dm.vocab)) {
                let t = pick_token(row_logits, rows[r].cfg, &mut rows[r].rng);
                generated[r].push(t);
                if t != END && generated[r].len() < budgets[r] {
                    still.push(r);
                    next.push([t]);
                }
            }
            active = still;
            feed = next.iter().map(|t| t.as_slice()).collect();
        }
        generated
    }

    /// The 5 attributes of each `(prompt, response)` at its last token (a reward model).
    pub fn score(&self, rows: &[(&str, &str)]) -> Result<Vec<[f32; 5]>, EngineError> {
        if self.layout.reward_head.is_none() {
            return Err(EngineError::Config("this model has no reward head".into()));
        }
        let seqs: Vec<Seq> = rows
            .iter()
            .map(|(p, r)| Seq::new(p, r, self.config.max_seq))
            .collect();
        let chunks = split(&seqs, threads());
        let parts: Vec<&[Seq]> = chunks.iter().map(|c| &seqs[c.clone()]).collect();
        let out = in_parallel(parts, |part| self.forward(part, false).attributes);
        Ok(out.into_iter().flatten().collect())
    }
}
