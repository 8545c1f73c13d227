//! The whole model's training step on the CPU, written out by hand: one fused forward pass that
//! keeps what its backward pass needs, and that backward pass, for SFT, DPO / RPO and the reward
//! model's regression. The same computation as [`crate::model`]'s candle graph (the gradients
//! agree within float rounding, `tests/fused.rs`), without its per-op cost, which dominates a
//! model this small: each step is a few large matrix products (`gemm`, with the query, key and
//! value projections in one, and the gate and up projections in one) and plain loops.
//!
//! Sequences are packed, not padded: a row's pad positions neither feed nor read anything, so
//! skipping them changes no number. Rows are split between threads (one per core) by token count;
//! each thread runs forward and backward for its rows with its own gradients, summed at the end,
//! so no thread waits on another inside a step. Only the preference objectives couple rows
//! (chosen with rejected); they run the forward pass, combine the rows' sequence log-probabilities
//! on the calling thread, then run the backward pass.
//!
//! Parameters and gradients live in one flat vector each ([`HostModel`]), so that AdamW, the
//! gradient norm and the sum over threads are single loops; [`HostModel::write_back`] stores the
//! trained values in the candle variables the checkpoint is saved from.

mod infer;

use std::ops::Range;

use candle_core::Tensor;
use candle_nn::VarMap;

use crate::EngineError;
use crate::model::{ModelConfig, Transformer};
use crate::rng::Rng;
use crate::tokenizer::{encode_prompt, encode_response};
use crate::train::{PreferenceLoss, PreferenceObjective, Progress, TrainConfig, schedule};

/// Where one layer's parameters lie in the flat vector. `wqkv` holds `wq`, `wk`, `wv` one after
/// the other (their rows stacked), `wgu` holds `w_gate` then `w_up`: one product computes each.
#[derive(Debug, Clone)]
struct LayerLayout {
    attn_norm: Range<usize>,
    wqkv: Range<usize>,
    wo: Range<usize>,
    mlp_norm: Range<usize>,
    wgu: Range<usize>,
    w_down: Range<usize>,
}

#[derive(Debug, Clone)]
struct Layout {
    embed: Range<usize>,
    layers: Vec<LayerLayout>,
    final_norm: Range<usize>,
    lm_head: Range<usize>,
    reward_head: Option<Range<usize>>,
    total: usize,
}

impl Layout {
    fn new(c: &ModelConfig) -> Self {
        let mut at = 0;
        let mut take = |n: usize| {
            at += n;
            at - n..at
        };
        let dh = c.head_dim();
        let embed = take(c.vocab * c.d_model);
        let layers = (0..c.n_layers)
            .map(|_| LayerLayout {
                attn_norm: take(c.d_model),
                wqkv: take((c.n_heads + 2 * c.n_kv_heads) * dh * c.d_model),
                wo: take(c.d_model * c.n_heads * dh),
                mlp_norm: take(c.d_model),
                wgu: take(2 * c.d_ff * c.d_model),
                w_down: take(c.d_model * c.d_ff),
            })
            .collect();
        let final_norm = take(c.d_model);
        let lm_head = take(c.vocab * c.d_model);
        let reward_head = c.reward_head.then(|| take(5 * c.d_model));
        Self {
            embed,
            layers,
            final_norm,
            lm_head,
            reward_head,
            total: at,
        }
    }

    /// The range of the variable called `name` in the candle model (`layers.0.wq`, …).
    fn of(&self, c: &ModelConfig, name: &str) -> Option<Range<usize>> {
        let sub = |r: &Range<usize>, from: usize, len: usize| r.start + from..r.start + from + len;
        let q = c.n_heads * c.head_dim() * c.d_model;
        let kv = c.n_kv_heads * c.head_dim() * c.d_model;
        let ff = c.d_ff * c.d_model;
        match name {
            "embed" => return Some(self.embed.clone()),
            "final_norm" => return Some(self.final_norm.clone()),
            "lm_head" => return Some(self.lm_head.clone()),
            "reward_head" => return self.reward_head.clone(),
            _ => {}
        }
        let (index, field) = name.strip_prefix("layers.")?.split_once('.')?;
        let l = self.layers.get(index.parse::<usize>().ok()?)?;
        Some(match field {
            "attn_norm" => l.attn_norm.clone(),
            "wq" => sub(&l.wqkv, 0, q),
            "wk" => sub(&l.wqkv, q, kv),
            "wv" => sub(&l.wqkv, q + kv, kv),
            "wo" => l.wo.clone(),
            "mlp_norm" => l.mlp_norm.clone(),
            "w_gate" => sub(&l.wgu, 0, ff),
            "w_up" => sub(&l.wgu, ff, ff),
            "w_down" => l.w_down.clone(),
            _ => return None,
        })
    }

    /// Every variable's name, in the candle model's naming.
    fn names(&self, c: &ModelConfig) -> Vec<String> {
        let mut names = vec!["embed".to_string()];
        for i in 0..c.n_layers {
            for f in crate::model::LAYER_VARS {
                names.push(format!("layers.{i}.{f}"));
            }
        }
        names.extend(["final_norm".into(), "lm_head".into()]);
        if c.reward_head {
            names.push("reward_head".into());
        }
        names
    }
}

/// A model's parameters as one flat vector, for the hand-written step.
#[derive(Debug, Clone)]
pub struct HostModel {
    pub config: ModelConfig,
    layout: Layout,
    params: Vec<f32>,
    /// RoPE's cosines and sines, `(max_seq, head_dim / 2)` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl HostModel {
    /// A copy of `model`'s weights.
    pub fn of(model: &Transformer) -> Result<Self, EngineError> {
        let config = model.config.clone();
        // Token ids index the embedding directly: every id the tokenizer makes must have a row.
        if config.vocab < crate::tokenizer::VOCAB {
            return Err(EngineError::Config(format!(
                "vocab {} is smaller than the tokenizer's {}",
                config.vocab,
                crate::tokenizer::VOCAB
            )));
        }
        let layout = Layout::new(&config);
        let mut params = vec![0f32; layout.total];
        for (name, tensor) in model.named_tensors() {
            let range = layout
                .of(&config, &name)
                .ok_or_else(|| EngineError::Config(format!("unknown variable {name}")))?;
            params[range].copy_from_slice(&tensor.flatten_all()?.to_vec1::<f32>()?);
        }
        let (cos, sin) = rope_tables(&config);
        Ok(Self {
            config,
            layout,
            params,
            cos,
            sin,
        })
    }

    /// Stores these weights in `varmap`'s variables (the ones the trained model was built on).
    pub fn write_back(&self, varmap: &VarMap) -> Result<(), EngineError> {
        let data = varmap.data().lock().expect("varmap");
        for (name, var) in data.iter() {
            let range = self
                .layout
                .of(&self.config, name)
                .ok_or_else(|| EngineError::Config(format!("unknown variable {name}")))?;
            var.set(&Tensor::from_slice(
                &self.params[range],
                var.shape(),
                var.device(),
            )?)?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The gradient of the variable called `name` (candle's naming) within `grads`.
    pub fn grad_of<'g>(&self, name: &str, grads: &'g [f32]) -> Option<&'g [f32]> {
        Some(&grads[self.layout.of(&self.config, name)?])
    }

    /// Every variable's name (candle's naming).
    pub fn names(&self) -> Vec<String> {
        self.layout.names(&self.config)
    }
}

/// One training sequence: prompt and response tokens (cut at the model's context) and where the
/// response starts.
#[derive(Debug, Clone)]
pub struct Seq {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Seq {
    /// The same tokens as one row of [`crate::train::batch`].
    pub fn new(prompt: &str, response: &str, max_seq: usize) -> Self {
        let mut ids = encode_prompt(prompt);
        let prompt_len = ids.len();
        ids.extend(encode_response(response));
        ids.truncate(max_seq);
        Self { ids, prompt_len }
    }

    /// Positions whose next token is a response token (where the LM loss is read).
    fn scored(&self) -> Range<usize> {
        self.prompt_len.max(1) - 1..self.ids.len().saturating_sub(1)
    }
}

/// What a step's loss is.
pub enum Objective<'a> {
    /// Mean negative log-likelihood of the response tokens.
    Sft,
    /// `objective.loss` against `reference` over rows laid out as n chosen then the same prompts'
    /// n rejected, with the reward model's (chosen, rejected) `rewards` (read by RPO only).
    Preference {
        reference: &'a HostModel,
        objective: PreferenceObjective,
        rewards: &'a [(f64, f64)],
    },
    /// Mean squared error of the 5 attributes read at each row's last token.
    Reward(&'a [[f32; 5]]),
}

/// `c` (m×n, row-major) = `a`·`b`, plus `c` when `accumulate`; `a` is m×k and `b` k×n, each
/// given with its row and column strides (so a transpose is a stride swap).
#[allow(clippy::too_many_arguments)]
#[allow(unsafe_code)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(c.len() >= m * n, "matmul: output too small");
    assert!(
        (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "matmul: lhs too small"
    );
    assert!(
        (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "matmul: rhs too small"
    );
    // SAFETY: the asserts above keep every element gemm reads or writes inside the three slices,
    // and `c`, a unique borrow, aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `y` (n×out) = `x` (n×in) · `w`ᵀ (`w` out×in, row-major), plus `y` when `accumulate`.
fn linear(x: &[f32], w: &[f32], y: &mut [f32], n: usize, out: usize, accumulate: bool) {
    let inp = w.len() / out;
    matmul((n, out, inp), y, accumulate, x, (inp, 1), w, (1, inp));
}

/// For `y = x·wᵀ` (`w` out×in): adds `dyᵀ·x` to `dw` and returns `dx = dy·w`.
fn linear_backward(x: &[f32], w: &[f32], dy: &[f32], dw: &mut [f32], out: usize) -> Vec<f32> {
    let (n, inp) = (dy.len() / out, w.len() / out);
    let mut dx = vec![0f32; n * inp];
    matmul((n, inp, out), &mut dx, false, dy, (out, 1), w, (inp, 1));
    matmul((out, inp, n), dw, true, dy, (1, out), x, (inp, 1));
    dx
}

const EPS: f32 = 1e-5;

/// `y = x / rms(x) * g` row by row; returns each row's 1/rms.
fn rms_norm(x: &[f32], g: &[f32], y: &mut [f32]) -> Vec<f32> {
    let d = g.len();
    x.chunks_exact(d)
        .zip(y.chunks_exact_mut(d))
        .map(|(xr, yr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + EPS).sqrt();
            for ((y, x), g) in yr.iter_mut().zip(xr).zip(g) {
                *y = x * inv * g;
            }
            inv
        })
        .collect()
}

/// Backward of [`rms_norm`]: `dx += ∂L/∂x` and `dg += ∂L/∂g` given `dy`.
fn rms_norm_backward(
    x: &[f32],
    inv: &[f32],
    g: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dg: &mut [f32],
) {
    let d = g.len();
    for (((xr, dyr), dxr), &r) in x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
        .zip(inv)
    {
        let mut dot = 0.0;
        for i in 0..d {
            let xhat = xr[i] * r;
            dg[i] += dyr[i] * xhat;
            dot += dyr[i] * g[i] * xhat;
        }
        let mean = dot / d as f32;
        for i in 0..d {
            dxr[i] += r * (dyr[i] * g[i] - xr[i] * r * mean);
        }
    }
}

/// Rotates each `dh`-wide head of `row` (RoPE, halves layout) to position `pos`; `sign` -1
/// rotates back (the backward pass).
fn rotate(row: &mut [f32], dh: usize, cos: &[f32], sin: &[f32], sign: f32) {
    let half = dh / 2;
    for head in row.chunks_exact_mut(dh) {
        let (x1, x2) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            let s = sign * sin[i];
            x1[i] = a * cos[i] - b * s;
            x2[i] = a * s + b * cos[i];
        }
    }
}

/// Rotates the query and key heads of each `qkv` row (one token a row) to its token's position
/// (RoPE, with `cos` and `sin` tables of `head_dim / 2` a position); `sign` -1 rotates back (the
/// backward pass).
fn rotate_qk(
    qkv: &mut [f32],
    dm: &Dims,
    positions: impl IntoIterator<Item = usize>,
    (cos, sin): (&[f32], &[f32]),
    sign: f32,
) {
    let half = dm.dh / 2;
    for (row, p) in qkv.chunks_exact_mut(dm.qkv).zip(positions) {
        let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        rotate(&mut row[..(dm.h + dm.kv) * dm.dh], dm.dh, c, s, sign);
    }
}

/// Each packed token's position in its row.
fn positions(seqs: &[Seq]) -> impl Iterator<Item = usize> + '_ {
    seqs.iter().flat_map(|s| 0..s.ids.len())
}

/// What one layer's forward pass keeps for its backward pass.
struct LayerActs {
    x: Vec<f32>,
    inv1: Vec<f32>,
    h1: Vec<f32>,
    /// Queries and keys after RoPE, then values: `n × (heads + 2 kv_heads) · dh`.
    qkv: Vec<f32>,
    /// Attention weights, per row then head: `t × t` each.
    probs: Vec<f32>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    inv2: Vec<f32>,
    h2: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
}

/// One thread's rows after the forward pass.
struct Forward<'s> {
    seqs: &'s [Seq],
    /// Where each row starts in the packed tokens.
    starts: Vec<usize>,
    n: usize,
    layers: Vec<LayerActs>,
    x_out: Vec<f32>,
    inv_f: Vec<f32>,
    hf: Vec<f32>,
    /// The final hidden states at the scored positions, row after row (the LM head's input).
    scored_hidden: Vec<f32>,
    /// Softmax of the LM head at the scored positions, row after row.
    probs: Vec<f32>,
    /// Log-probability of each row's response.
    seq_logp: Vec<f64>,
    /// The 5 attributes at each row's last token (reward models).
    attributes: Vec<[f32; 5]>,
}

struct Dims {
    d: usize,
    h: usize,
    kv: usize,
    dh: usize,
    ff: usize,
    vocab: usize,
    qkv: usize,
}

impl Dims {
    /// Where head `head`'s query, and the key and value of its KV group, start in a `qkv` row.
    fn head(&self, head: usize) -> (usize, usize, usize) {
        let group = head / (self.h / self.kv);
        (
            head * self.dh,
            (self.h + group) * self.dh,
            (self.h + self.kv + group) * self.dh,
        )
    }

    fn of(c: &ModelConfig) -> Self {
        let dh = c.head_dim();
        Self {
            d: c.d_model,
            h: c.n_heads,
            kv: c.n_kv_heads,
            dh,
            ff: c.d_ff,
            vocab: c.vocab,
            qkv: (c.n_heads + 2 * c.n_kv_heads) * dh,
        }
    }
}

/// RoPE tables `(max_seq, dh / 2)`, as the candle model computes them.
fn rope_tables(c: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let dh = c.head_dim();
    let inv: Vec<f32> = (0..dh / 2)
        .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f32 / dh as f32))
        .collect();
    (0..c.max_seq)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .map(|a| (a.cos(), a.sin()))
        .unzip()
}

impl HostModel {
    fn rope(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    fn p(&self, r: &Range<usize>) -> &[f32] {
        &self.params[r.clone()]
    }

    /// The forward pass over `seqs`, keeping what the backward pass needs; the LM head runs at
    /// the scored positions (`lm`) or the reward head at each row's last token.
    fn forward<'s>(&self, seqs: &'s [Seq], lm: bool) -> Forward<'s> {
        let dm = Dims::of(&self.config);
        let (d, dh) = (dm.d, dm.dh);
        let mut starts = Vec::with_capacity(seqs.len());
        let mut n = 0;
        for s in seqs {
            starts.push(n);
            n += s.ids.len();
        }
        let embed = self.p(&self.layout.embed);
        let mut x = Vec::with_capacity(n * d);
        for s in seqs {
            for &t in &s.ids {
                x.extend_from_slice(&embed[t as usize * d..(t as usize + 1) * d]);
            }
        }
        let scale = 1.0 / (dh as f32).sqrt();
        let mut layers = Vec::with_capacity(self.layout.layers.len());
        for l in &self.layout.layers {
            let mut h1 = vec![0f32; n * d];
            let inv1 = rms_norm(&x, self.p(&l.attn_norm), &mut h1);
            let mut qkv = vec![0f32; n * dm.qkv];
            linear(&h1, self.p(&l.wqkv), &mut qkv, n, dm.qkv, false);
            rotate_qk(&mut qkv, &dm, positions(seqs), self.rope(), 1.0);
            let probs_len: usize = seqs.iter().map(|s| dm.h * s.ids.len().pow(2)).sum();
            let mut probs = vec![0f32; probs_len];
            let mut att = vec![0f32; n * dm.h * dh];
            let mut at = 0;
            for (s, &start) in seqs.iter().zip(&starts) {
                let t = s.ids.len();
                for head in 0..dm.h {
                    let (qo, ko, vo) = dm.head(head);
                    let pm = &mut probs[at..at + t * t];
                    at += t * t;
                    for i in 0..t {
                        let q = &qkv[(start + i) * dm.qkv + qo..][..dh];
                        let pr = &mut pm[i * t..i * t + i + 1];
                        let mut max = f32::NEG_INFINITY;
                        for (j, p) in pr.iter_mut().enumerate() {
                            let k = &qkv[(start + j) * dm.qkv + ko..][..dh];
                            *p = dot(q, k) * scale;
                            max = max.max(*p);
                        }
                        let mut sum = 0.0;
                        for p in pr.iter_mut() {
                            *p = (*p - max).exp();
                            sum += *p;
                        }
                        let o = &mut att[(start + i) * dm.h * dh + head * dh..][..dh];
                        for (j, p) in pr.iter_mut().enumerate() {
                            *p /= sum;
                            let v = &qkv[(start + j) * dm.qkv + vo..][..dh];
                            axpy(*p, v, o);
                        }
                    }
                }
            }
            let mut x_mid = x.clone();
            linear(&att, self.p(&l.wo), &mut x_mid, n, d, true);
            let mut h2 = vec![0f32; n * d];
            let inv2 = rms_norm(&x_mid, self.p(&l.mlp_norm), &mut h2);
            let mut gu = vec![0f32; n * 2 * dm.ff];
            linear(&h2, self.p(&l.wgu), &mut gu, n, 2 * dm.ff, false);
            let mut act = vec![0f32; n * dm.ff];
            for (a, g) in act.chunks_exact_mut(dm.ff).zip(gu.chunks_exact(2 * dm.ff)) {
                let (gate, up) = g.split_at(dm.ff);
                for f in 0..dm.ff {
                    a[f] = silu(gate[f]) * up[f];
                }
            }
            let mut x_out = x_mid.clone();
            linear(&act, self.p(&l.w_down), &mut x_out, n, d, true);
            layers.push(LayerActs {
                x: std::mem::replace(&mut x, x_out),
                inv1,
                h1,
                qkv,
                probs,
                att,
                x_mid,
                inv2,
                h2,
                gu,
                act,
            });
        }
        let mut hf = vec![0f32; n * d];
        let inv_f = rms_norm(&x, self.p(&self.layout.final_norm), &mut hf);
        let mut out = Forward {
            seqs,
            starts,
            n,
            layers,
            x_out: x,
            inv_f,
            hf,
            scored_hidden: Vec::new(),
            probs: Vec::new(),
            seq_logp: Vec::new(),
            attributes: Vec::new(),
        };
        if lm {
            self.lm_head(&mut out);
        } else {
            self.reward_head(&mut out);
        }
        out
    }

    /// Softmax of the LM head at the scored positions and each row's response log-probability.
    fn lm_head(&self, f: &mut Forward<'_>) {
        let (d, vocab) = (self.config.d_model, self.config.vocab);
        let m: usize = f.seqs.iter().map(|s| s.scored().len()).sum();
        let mut hsel = Vec::with_capacity(m * d);
        for (s, &start) in f.seqs.iter().zip(&f.starts) {
            let r = s.scored();
            hsel.extend_from_slice(&f.hf[(start + r.start) * d..(start + r.end) * d]);
        }
        let mut probs = vec![0f32; m * vocab];
        linear(
            &hsel,
            self.p(&self.layout.lm_head),
            &mut probs,
            m,
            vocab,
            false,
        );
        let mut rows = probs.chunks_exact_mut(vocab);
        f.seq_logp = f
            .seqs
            .iter()
            .map(|s| {
                s.scored()
                    .map(|i| {
                        let row = rows.next().expect("one row per scored position");
                        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                        let target = row[s.ids[i + 1] as usize] - max;
                        let mut sum = 0.0;
                        for v in row.iter_mut() {
                            *v = (*v - max).exp();
                            sum += *v;
                        }
                        for v in row.iter_mut() {
                            *v /= sum;
                        }
                        target as f64 - (sum as f64).ln()
                    })
                    .sum()
            })
            .collect();
        f.probs = probs;
        f.scored_hidden = hsel;
    }

    fn reward_head(&self, f: &mut Forward<'_>) {
        let d = self.config.d_model;
        let head = self.p(self
            .layout
            .reward_head
            .as_ref()
            .expect("checked by the caller"));
        f.attributes = f
            .seqs
            .iter()
            .zip(&f.starts)
            .map(|(s, &start)| {
                let h = &f.hf[(start + s.ids.len() - 1) * d..][..d];
                std::array::from_fn(|a| dot(h, &head[a * d..(a + 1) * d]))
            })
            .collect();
    }

    /// The backward pass: adds to `grads` the gradient of a loss whose derivative is `coef[r]`
    /// per scored log-probability of row `r` (LM objectives) or `dattr[r]` per attribute of row
    /// `r` (reward models).
    fn backward(&self, f: &Forward<'_>, coef: &[f32], dattr: &[[f32; 5]], grads: &mut [f32]) {
        let dm = Dims::of(&self.config);
        let (d, dh, n) = (dm.d, dm.dh, f.n);
        let lay = &self.layout;
        let mut dhf = vec![0f32; n * d];
        if dattr.is_empty() {
            // ∂ log p(target) / ∂ logits = onehot(target) − softmax.
            let mut dlogits = f.probs.clone();
            let mut rows = dlogits.chunks_exact_mut(dm.vocab);
            for (s, &c) in f.seqs.iter().zip(coef) {
                for i in s.scored() {
                    let row = rows.next().expect("one row per scored position");
                    for v in row.iter_mut() {
                        *v *= -c;
                    }
                    row[s.ids[i + 1] as usize] += c;
                }
            }
            let dhsel = linear_backward(
                &f.scored_hidden,
                self.p(&lay.lm_head),
                &dlogits,
                &mut grads[lay.lm_head.clone()],
                dm.vocab,
            );
            let mut at = 0;
            for (s, &start) in f.seqs.iter().zip(&f.starts) {
                let r = s.scored();
                let len = r.len() * d;
                dhf[(start + r.start) * d..][..len].copy_from_slice(&dhsel[at..at + len]);
                at += len;
            }
        } else {
            let range = lay.reward_head.clone().expect("checked by the caller");
            let head = self.p(&range);
            for ((s, &start), da) in f.seqs.iter().zip(&f.starts).zip(dattr) {
                let pos = (start + s.ids.len() - 1) * d;
                for (a, &g) in da.iter().enumerate() {
                    axpy(
                        g,
                        &f.hf[pos..pos + d],
                        &mut grads[range.start + a * d..][..d],
                    );
                    axpy(g, &head[a * d..(a + 1) * d], &mut dhf[pos..pos + d]);
                }
            }
        }
        let mut dx = vec![0f32; n * d];
        rms_norm_backward(
            &f.x_out,
            &f.inv_f,
            self.p(&lay.final_norm),
            &dhf,
            &mut dx,
            &mut grads[lay.final_norm.clone()],
        );

        let scale = 1.0 / (dh as f32).sqrt();
        for (l, a) in lay.layers.iter().zip(&f.layers).rev() {
            // MLP: x_out = x_mid + (silu(gate) * up) · w_downᵀ.
            let dact = linear_backward(
                &a.act,
                self.p(&l.w_down),
                &dx,
                &mut grads[l.w_down.clone()],
                d,
            );
            let mut dgu = vec![0f32; n * 2 * dm.ff];
            for ((dg, g), da) in dgu
                .chunks_exact_mut(2 * dm.ff)
                .zip(a.gu.chunks_exact(2 * dm.ff))
                .zip(dact.chunks_exact(dm.ff))
            {
                let (gate, up) = g.split_at(dm.ff);
                let (dgate, dup) = dg.split_at_mut(dm.ff);
                for i in 0..dm.ff {
                    let s = sigmoid(gate[i]);
                    dgate[i] = da[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s));
                    dup[i] = da[i] * gate[i] * s;
                }
            }
            let dh2 = linear_backward(
                &a.h2,
                self.p(&l.wgu),
                &dgu,
                &mut grads[l.wgu.clone()],
                2 * dm.ff,
            );
            // dx now flows into x_mid: the residual plus the norm's share.
            rms_norm_backward(
                &a.x_mid,
                &a.inv2,
                self.p(&l.mlp_norm),
                &dh2,
                &mut dx,
                &mut grads[l.mlp_norm.clone()],
            );

            // Attention: x_mid = x + att · woᵀ.
            let datt = linear_backward(&a.att, self.p(&l.wo), &dx, &mut grads[l.wo.clone()], d);
            let mut dqkv = vec![0f32; n * dm.qkv];
            let mut at = 0;
            let mut dp = Vec::new();
            for (s, &start) in f.seqs.iter().zip(&f.starts) {
                let t = s.ids.len();
                for head in 0..dm.h {
                    let (qo, ko, vo) = dm.head(head);
                    let pm = &a.probs[at..at + t * t];
                    at += t * t;
                    for i in 0..t {
                        let p = &pm[i * t..i * t + i + 1];
                        let dout = &datt[(start + i) * dm.h * dh + head * dh..][..dh];
                        dp.clear();
                        let mut weighted = 0.0;
                        for (j, &pj) in p.iter().enumerate() {
                            let v = &a.qkv[(start + j) * dm.qkv + vo..][..dh];
                            let g = dot(dout, v);
                            weighted += pj * g;
                            dp.push(g);
                            axpy(pj, dout, &mut dqkv[(start + j) * dm.qkv + vo..][..dh]);
                        }
                        for (j, &pj) in p.iter().enumerate() {
                            let ds = pj * (dp[j] - weighted) * scale;
                            let (qrow, krow) = ((start + i) * dm.qkv, (start + j) * dm.qkv);
                            // dq_i += ds · k_j, dk_j += ds · q_i.
                            for e in 0..dh {
                                dqkv[qrow + qo + e] += ds * a.qkv[krow + ko + e];
                                dqkv[krow + ko + e] += ds * a.qkv[qrow + qo + e];
                            }
                        }
                    }
                }
            }
            rotate_qk(&mut dqkv, &dm, positions(f.seqs), self.rope(), -1.0);
            let dh1 = linear_backward(
                &a.h1,
                self.p(&l.wqkv),
                &dqkv,
                &mut grads[l.wqkv.clone()],
                dm.qkv,
            );
            rms_norm_backward(
                &a.x,
                &a.inv1,
                self.p(&l.attn_norm),
                &dh1,
                &mut dx,
                &mut grads[l.attn_norm.clone()],
            );
        }
        let g_embed = &mut grads[lay.embed.clone()];
        for (s, &start) in f.seqs.iter().zip(&f.starts) {
            for (p, &tok) in s.ids.iter().enumerate() {
                axpy(
                    1.0,
                    &dx[(start + p) * d..][..d],
                    &mut g_embed[tok as usize * d..][..d],
                );
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// log σ(x), stably.
fn log_sigmoid64(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

/// Rows split into at most `parts` contiguous chunks of about equal token counts.
fn split(seqs: &[Seq], parts: usize) -> Vec<Range<usize>> {
    let total: usize = seqs.iter().map(|s| s.ids.len()).sum();
    let per = total.div_ceil(parts.max(1)).max(1);
    let mut out = Vec::new();
    let (mut start, mut acc) = (0, 0);
    for (i, s) in seqs.iter().enumerate() {
        acc += s.ids.len();
        if acc >= per && out.len() + 1 < parts {
            out.push(start..i + 1);
            start = i + 1;
            acc = 0;
        }
    }
    if start < seqs.len() {
        out.push(start..seqs.len());
    }
    out
}

/// The number of threads a step uses: one per core.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The loss of `objective` on `seqs` and its gradient, added to `grads` (one value per parameter).
pub fn loss_and_grads(
    model: &HostModel,
    seqs: &[Seq],
    objective: &Objective<'_>,
    grads: &mut [f32],
    threads: usize,
) -> Result<f64, EngineError> {
    if seqs.is_empty() || seqs.iter().any(|s| s.ids.is_empty()) {
        return Err(EngineError::Config(
            "a training batch needs non-empty rows".into(),
        ));
    }
    if matches!(objective, Objective::Reward(_)) && model.layout.reward_head.is_none() {
        return Err(EngineError::Config("this model has no reward head".into()));
    }
    let chunks = split(seqs, threads);
    let lm = !matches!(objective, Objective::Reward(_));
    let parts = || chunks.iter().map(|r| &seqs[r.clone()]).collect::<Vec<_>>();
    let forwards = in_parallel(parts(), |part| model.forward(part, lm));
    let rows = seqs.len();
    let scored = |r: Range<usize>| seqs[r].iter().map(|s| s.scored().len()).sum::<usize>();
    let (loss, coef, dattr): (f64, Vec<f32>, Vec<[f32; 5]>) = match objective {
        Objective::Sft => {
            let count = scored(0..rows).max(1) as f64;
            let total: f64 = forwards.iter().flat_map(|f| &f.seq_logp).sum();
            (
                -total / count,
                vec![(-1.0 / count) as f32; rows],
                Vec::new(),
            )
        }
        Objective::Reward(labels) => {
            if labels.len() != rows {
                return Err(EngineError::Config(format!(
                    "{} labels for {rows} rows",
                    labels.len()
                )));
            }
            let count = (rows * 5) as f64;
            let pred = forwards.iter().flat_map(|f| &f.attributes);
            let mut loss = 0.0;
            let dattr = pred
                .zip(*labels)
                .map(|(p, l)| {
                    std::array::from_fn(|a| {
                        let e = (p[a] - l[a]) as f64;
                        loss += e * e / count;
                        (2.0 * e / count) as f32
                    })
                })
                .collect();
            (loss, Vec::new(), dattr)
        }
        Objective::Preference {
            reference,
            objective,
            rewards,
        } => {
            if !rows.is_multiple_of(2) {
                return Err(EngineError::Config(
                    "a preference batch needs chosen and rejected rows".into(),
                ));
            }
            let n = rows / 2;
            let policy: Vec<f64> = forwards
                .iter()
                .flat_map(|f| f.seq_logp.iter().copied())
                .collect();
            let refs: Vec<f64> =
                in_parallel(parts(), |part| reference.forward(part, true).seq_logp)
                    .into_iter()
                    .flatten()
                    .collect();
            let (beta, mut loss) = (objective.beta, 0.0);
            let mut coef = vec![0f32; rows];
            for i in 0..n {
                let delta = (policy[i] - refs[i]) - (policy[n + i] - refs[n + i]);
                let a = beta * delta;
                // ∂loss/∂Δ for this pair.
                let g = match objective.loss {
                    PreferenceLoss::Dpo => {
                        loss -= log_sigmoid64(a) / n as f64;
                        -beta * sigmoid64(-a) / n as f64
                    }
                    PreferenceLoss::Rpo { eta } => {
                        let (rc, rr) = rewards.get(i).copied().ok_or_else(|| {
                            EngineError::Config(format!("{} rewards for {n} pairs", rewards.len()))
                        })?;
                        let b = eta * (rc - rr);
                        let (lb, lnb) = (log_sigmoid64(b), log_sigmoid64(-b));
                        loss += (lb.exp() * (lb - log_sigmoid64(a))
                            + lnb.exp() * (lnb - log_sigmoid64(-a)))
                            / n as f64;
                        beta * (sigmoid64(a) - sigmoid64(b)) / n as f64
                    }
                };
                coef[i] = g as f32;
                coef[n + i] = -g as f32;
            }
            if objective.sft_weight > 0.0 {
                let count = scored(0..n).max(1) as f64;
                let total: f64 = policy[..n].iter().sum();
                loss -= objective.sft_weight * total / count;
                for c in &mut coef[..n] {
                    *c -= (objective.sft_weight / count) as f32;
                }
            }
            (loss, coef, Vec::new())
        }
    };
    let starts = chunks.iter().map(|r| r.start);
    let len = grads.len();
    let partial = in_parallel(forwards.into_iter().zip(starts).collect(), |(f, start)| {
        let mut g = vec![0f32; len];
        let rows = start..start + f.seqs.len();
        let c = if coef.is_empty() {
            &[][..]
        } else {
            &coef[rows.clone()]
        };
        let da = if dattr.is_empty() {
            &[][..]
        } else {
            &dattr[rows]
        };
        model.backward(&f, c, da, &mut g);
        g
    });
    for g in partial {
        axpy(1.0, &g, grads);
    }
    Ok(loss)
}

/// Runs `f` on each item in its own thread (the first on this one) and returns the results in
/// order.
fn in_parallel<I: Send, T: Send>(items: Vec<I>, f: impl Fn(I) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let mut items = items.into_iter();
        let first = items.next();
        let handles: Vec<_> = items
            .map(|item| {
                let f = &f;
                scope.spawn(move || f(item))
            })
            .collect();
        let mut out: Vec<T> = first.into_iter().map(&f).collect();
        out.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("a step thread panicked")),
        );
        out
    })
}

/// AdamW as candle's (decoupled weight decay, bias-corrected moments), on flat vectors.
struct AdamW {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
    weight_decay: f64,
}

impl AdamW {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(len: usize, weight_decay: f64) -> Self {
        Self {
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: 0,
            weight_decay,
        }
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        self.t += 1;
        let scale_m = (1.0 / (1.0 - Self::BETA1.powi(self.t))) as f32;
        let scale_v = (1.0 / (1.0 - Self::BETA2.powi(self.t))) as f32;
        let decay = (1.0 - lr * self.weight_decay) as f32;
        let (b1, b2, lr, eps) = (
            Self::BETA1 as f32,
            Self::BETA2 as f32,
            lr as f32,
            Self::EPS as f32,
        );
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let update = (*m * scale_m) / ((*v * scale_v).sqrt() + eps);
            *p = *p * decay - update * lr;
        }
    }
}

/// [`crate::train::train_loop`] on the hand-written step, from `model`'s weights: `cfg.steps`
/// AdamW steps of `step_fn`'s loss and gradients, with the same schedule, clipping and divergence
/// check; the trained weights are written back to `varmap` (the variables `model` was built on).
/// Returns the mean loss of the last 10% of steps.
pub fn train_loop(
    model: &Transformer,
    varmap: &VarMap,
    cfg: &TrainConfig,
    progress: Progress<'_>,
    mut step_fn: impl FnMut(usize, &mut Rng, &HostModel, &mut [f32]) -> Result<f64, EngineError>,
) -> Result<f64, EngineError> {
    let mut model = HostModel::of(model)?;
    let mut opt = AdamW::new(model.len(), cfg.weight_decay);
    let mut rng = Rng::new(cfg.seed);
    let mut grads = vec![0f32; model.len()];
    let mut tail = Vec::new();
    for step in 0..cfg.steps {
        grads.fill(0.0);
        let value = step_fn(step, &mut rng, &model, &mut grads)?;
        if !value.is_finite() {
            return Err(EngineError::Diverged(step, value));
        }
        let norm = grads
            .iter()
            .map(|g| (*g as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm > cfg.grad_clip {
            let scale = (cfg.grad_clip / norm) as f32;
            grads.iter_mut().for_each(|g| *g *= scale);
        }
        opt.step(&mut model.params, &grads, schedule(cfg, step));
        if step >= cfg.steps - cfg.steps.div_ceil(10) {
            tail.push(value);
        }
        if !progress(step, value) {
            return Err(EngineError::Cancelled);
        }
    }
    model.write_back(varmap)?;
    Ok(tail.iter().sum::<f64>() / tail.len().max(1) as f64)
}
