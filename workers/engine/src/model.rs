//! A decoder-only transformer in the recipe's family: token embedding, RoPE, RMSNorm, causal
//! attention with optional grouped-query heads, a gated (SiLU) MLP, an LM head and an optional
//! 5-attribute reward head read at the end-of-response position.
//!
//! Every op here has a backward pass: norms, RoPE and softmax are written out rather than using
//! candle's fused CPU kernels, which silently cut the autograd graph.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::EngineError;
use crate::rng::Rng;

/// Masked positions get this instead of -inf, so a fully masked row (a left pad) stays finite.
const MASKED: f64 = -1e9;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub max_seq: usize,
    pub rope_theta: f32,
    /// Whether the model has the 5-attribute reward head (a reward model).
    pub reward_head: bool,
}

impl ModelConfig {
    /// The demo size: about 0.2M parameters.
    pub fn small() -> Self {
        Self {
            vocab: crate::tokenizer::VOCAB,
            d_model: 96,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 256,
            max_seq: 96,
            rope_theta: 10_000.0,
            reward_head: false,
        }
    }

    /// A tiny size for tests.
    pub fn tiny() -> Self {
        Self {
            d_model: 32,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 1,
            d_ff: 64,
            max_seq: 64,
            ..Self::small()
        }
    }

    /// The same trunk with the 5-attribute reward head (a reward model).
    pub fn with_reward_head(self) -> Self {
        Self {
            reward_head: true,
            ..self
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: &str| Err(EngineError::Config(m.to_string()));
        if !self.d_model.is_multiple_of(self.n_heads) {
            return bad("d_model must be a multiple of n_heads");
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("n_heads must be a multiple of n_kv_heads");
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad("head dimension must be even (RoPE)");
        }
        Ok(())
    }
}

/// Each layer's variables, as `layers.{i}.{name}` names them (in [`Transformer::named_tensors`]'s order).
pub(crate) const LAYER_VARS: [&str; 9] = [
    "attn_norm",
    "wq",
    "wk",
    "wv",
    "wo",
    "mlp_norm",
    "w_gate",
    "w_up",
    "w_down",
];

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    mlp_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// Keys and values of earlier positions, per layer: `(batch, kv_heads, seq, head_dim)`.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Additive key mask `(batch, 1, 1, seq)`: 0 for real tokens, very negative for pads.
    key_mask: Tensor,
    pos: usize,
}

pub struct Transformer {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: Tensor,
    reward_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    // x: (..., in), w: (out, in)
    let dims = x.dims().to_vec();
    let last = *dims.last().expect("rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, last))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

fn rms_norm(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?.broadcast_mul(w)
}

/// RoPE on `(b, h, t, d)` with the rotation angles of positions `pos..pos + t`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let half = d / 2;
    let cos = cos.narrow(0, pos, t)?;
    let sin = sin.narrow(0, pos, t)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

fn repeat_kv(x: Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x);
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kvh, rep, t, d))?
        .contiguous()?
        .reshape((b, kvh * rep, t, d))
}

impl Transformer {
    /// Builds the model's variables through `vb` (fresh or loaded).
    pub fn new(config: ModelConfig, vb: VarBuilder) -> Result<Self, EngineError> {
        config.validate()?;
        crate::keep_freed_memory();
        let c = &config;
        let dh = c.head_dim();
        let init = candle_nn::init::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let out_init = candle_nn::init::Init::Randn {
            mean: 0.0,
            stdev: 0.02 / (2.0 * c.n_layers as f64).sqrt(),
        };
        let ones = candle_nn::init::Init::Const(1.0);
        let embed = vb.get_with_hints((c.vocab, c.d_model), "embed", init)?;
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let l = vb.pp(format!("layers.{i}"));
            layers.push(Layer {
                attn_norm: l.get_with_hints(c.d_model, "attn_norm", ones)?,
                wq: l.get_with_hints((c.n_heads * dh, c.d_model), "wq", init)?,
                wk: l.get_with_hints((c.n_kv_heads * dh, c.d_model), "wk", init)?,
                wv: l.get_with_hints((c.n_kv_heads * dh, c.d_model), "wv", init)?,
                wo: l.get_with_hints((c.d_model, c.n_heads * dh), "wo", out_init)?,
                mlp_norm: l.get_with_hints(c.d_model, "mlp_norm", ones)?,
                w_gate: l.get_with_hints((c.d_ff, c.d_model), "w_gate", init)?,
                w_up: l.get_with_hints((c.d_ff, c.d_model), "w_up", init)?,
                w_down: l.get_with_hints((c.d_model, c.d_ff), "w_down", out_init)?,
            });
        }
        let final_norm = vb.get_with_hints(c.d_model, "final_norm", ones)?;
        let lm_head = vb.get_with_hints((c.vocab, c.d_model), "lm_head", init)?;
        let reward_head = if c.reward_head {
            Some(vb.get_with_hints((5, c.d_model), "reward_head", init)?)
        } else {
            None
        };
        let device = vb.device().clone();
        let inv: Vec<f32> = (0..dh / 2)
            .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f32 / dh as f32))
            .collect();
        let angles: Vec<f32> = (0..c.max_seq)
            .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (c.max_seq, dh / 2), &device)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
            embed,
            layers,
            final_norm,
            lm_head,
            reward_head,
            config,
            device,
        })
    }

    /// A freshly initialised model whose variables live in `varmap` (for training). The
    /// initialisation is drawn from `seed` (candle's CPU generator cannot be seeded), so the same
    /// seed gives the same model.
    pub fn fresh(
        config: ModelConfig,
        varmap: &VarMap,
        device: &Device,
        seed: u64,
    ) -> Result<Self, EngineError> {
        let model = Self::new(config, VarBuilder::from_varmap(varmap, DType::F32, device))?;
        let data = varmap.data().lock().expect("varmap");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            if name.ends_with("norm") {
                continue;
            }
            let var = &data[name];
            let stdev = if name.ends_with("wo") || name.ends_with("w_down") {
                0.02 / (2.0 * model.config.n_layers as f64).sqrt()
            } else {
                0.02
            };
            let tag = name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64));
            let mut rng = Rng::derive(seed, &[tag]);
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| {
                    // Box–Muller.
                    let (u1, u2) = (rng.unit().max(f64::MIN_POSITIVE), rng.unit());
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * stdev)
                        as f32
                })
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), device)?)?;
        }
        drop(data);
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every weight with its variable name (`embed`, `layers.0.wq`, …), as checkpoints name them.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("embed".to_string(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            let tensors = [
                &l.attn_norm,
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.mlp_norm,
                &l.w_gate,
                &l.w_up,
                &l.w_down,
            ];
            for (name, t) in LAYER_VARS.iter().zip(tensors) {
                out.push((format!("layers.{i}.{name}"), t));
            }
        }
        out.push(("final_norm".into(), &self.final_norm));
        out.push(("lm_head".into(), &self.lm_head));
        if let Some(head) = &self.reward_head {
            out.push(("reward_head".into(), head));
        }
        out
    }

    fn causal_mask(&self, t: usize, past: usize) -> candle_core::Result<Tensor> {
        let total = past + t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..total).map(move |j| if j > past + i { MASKED as f32 } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (1, 1, t, total), &self.device)
    }

    /// Hidden states `(b, t, d)` of `tokens` `(b, t)`. With a cache, the tokens continue the
    /// cached sequence and their keys and values are appended to it.
    pub fn hidden(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor, EngineError> {
        let (b, t) = tokens.dims2()?;
        let c = &self.config;
        let pos = cache.as_ref().map_or(0, |k| k.pos);
        if pos + t > c.max_seq {
            return Err(EngineError::Config(format!(
                "sequence of {} tokens exceeds max_seq {}",
                pos + t,
                c.max_seq
            )));
        }
        let dh = c.head_dim();
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, c.d_model))?;
        let mut mask = self.causal_mask(t, pos)?;
        if let Some(km) = cache.as_ref().map(|k| &k.key_mask) {
            mask = mask.broadcast_add(&km.narrow(3, 0, pos + t)?)?;
        }
        for (i, l) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &l.attn_norm)?;
            let q = linear(&h, &l.wq)?
                .reshape((b, t, c.n_heads, dh))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = linear(&h, &l.wk)?
                .reshape((b, t, c.n_kv_heads, dh))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = linear(&h, &l.wv)?
                .reshape((b, t, c.n_kv_heads, dh))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = rope(&q, &self.cos, &self.sin, pos)?;
            let mut k = rope(&k, &self.cos, &self.sin, pos)?;
            let mut v = v;
            if let Some(cache) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &cache.layers[i] {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                cache.layers[i] = Some((k.clone(), v.clone()));
            }
            let rep = c.n_heads / c.n_kv_heads;
            let k = repeat_kv(k, rep)?;
            let v = repeat_kv(v, rep)?;
            let att = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let o = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, c.n_heads * dh))?;
            x = (x + linear(&o, &l.wo)?)?;
            let h = rms_norm(&x, &l.mlp_norm)?;
            let gated = (candle_nn::Activation::Silu.forward(&linear(&h, &l.w_gate)?)?
                * linear(&h, &l.w_up)?)?;
            x = (x + linear(&gated, &l.w_down)?)?;
        }
        if let Some(cache) = cache {
            cache.pos += t;
        }
        Ok(rms_norm(&x, &self.final_norm)?)
    }

    /// Next-token logits `(b, t, vocab)`.
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor, EngineError> {
        Ok(linear(&self.hidden(tokens, None)?, &self.lm_head)?)
    }

    pub fn logits_of_hidden(&self, hidden: &Tensor) -> Result<Tensor, EngineError> {
        Ok(linear(hidden, &self.lm_head)?)
    }

    /// The 5 attribute scores `(b, 5)` read at `positions` (the end-of-response token of each row).
    pub fn attributes(&self, tokens: &Tensor, positions: &Tensor) -> Result<Tensor, EngineError> {
        let head = self
            .reward_head
            .as_ref()
            .ok_or(EngineError::Config("this model has no reward head".into()))?;
        let h = self.hidden(tokens, None)?;
        let (b, _, d) = h.dims3()?;
        let idx = positions
            .reshape((b, 1, 1))?
            .broadcast_as((b, 1, d))?
            .contiguous()?;
        let last = h.gather(&idx, 1)?.reshape((b, d))?;
        Ok(linear(&last, head)?)
    }

    /// A cache for a batch whose first `pads[i]` positions (left padding) must be ignored.
    pub fn new_cache(&self, pads: &[usize]) -> Result<KvCache, EngineError> {
        let mask: Vec<f32> = pads
            .iter()
            .flat_map(|&p| {
                (0..self.config.max_seq).map(move |j| if j < p { MASKED as f32 } else { 0.0 })
            })
            .collect();
        let full = Tensor::from_vec(mask, (pads.len(), 1, 1, self.config.max_seq), &self.device)?;
        Ok(KvCache {
            layers: vec![None; self.config.n_layers],
            key_mask: full,
            pos: 0,
        })
    }
}
