//! Training: SFT (loss on response tokens only), DPO with an optional SFT term on chosen, RPO
//! (backward-KL distance between the policy's implicit reward gap and the reward model's gap),
//! and the reward model's attribute regression. AdamW, linear warm-up then linear decay to 10%,
//! global-norm gradient clipping, seeded batch order.
//!
//! On the CPU, [`sft`], [`preference`] and [`reward_model`] run the hand-written step of
//! [`crate::fused`]; elsewhere (CUDA) they run the candle graph below, which is also the
//! reference the fused step is tested against.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};

use crate::EngineError;
use crate::fused::{self, HostModel, Seq};
use crate::model::Transformer;
use crate::rng::Rng;
use crate::tokenizer::{PAD, encode_prompt, encode_response};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 32,
            lr: 3e-3,
            warmup: 20,
            weight_decay: 0.01,
            grad_clip: 1.0,
            seed: 0,
        }
    }
}

/// Reported after every step; return `false` to stop (cancellation).
pub type Progress<'a> = &'a mut dyn FnMut(usize, f64) -> bool;

/// Token ids of prompt+response, right-padded: inputs, next-token targets, and a mask that is 1
/// where the target is a response token.
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub mask: Tensor,
    /// Index of each row's last real input token (the end-of-response token for scoring).
    pub last: Tensor,
}

pub fn batch(
    examples: &[(&str, &str)],
    max_seq: usize,
    device: &Device,
) -> Result<Batch, EngineError> {
    let seqs: Vec<(Vec<u32>, usize)> = examples
        .iter()
        .map(|(p, r)| {
            let prompt = encode_prompt(p);
            let n = prompt.len();
            let mut ids = prompt;
            ids.extend(encode_response(r));
            ids.truncate(max_seq);
            (ids, n)
        })
        .collect();
    // Inputs hold the whole sequence (the end token too, for the reward head); its target is a pad.
    let t = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(1).max(1);
    let (mut inputs, mut targets, mut mask, mut last) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (ids, prompt_len) in &seqs {
        for i in 0..t {
            inputs.push(*ids.get(i).unwrap_or(&PAD));
            targets.push(*ids.get(i + 1).unwrap_or(&PAD));
            mask.push(if i + 1 >= *prompt_len && i + 1 < ids.len() {
                1f32
            } else {
                0.0
            });
        }
        last.push((ids.len() - 1) as u32);
    }
    let b = seqs.len();
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        last: Tensor::from_vec(last, b, device)?,
    })
}

/// Log-probability of each target token `(b, t)`.
pub fn token_logprobs(model: &Transformer, b: &Batch) -> Result<Tensor, EngineError> {
    let logits = model.logits(&b.inputs)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    Ok(logp
        .gather(&b.targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// The SFT loss of one batch.
pub fn sft_batch_loss(model: &Transformer, b: &Batch) -> Result<Tensor, EngineError> {
    sft_loss(&token_logprobs(model, b)?, &b.mask)
}

/// Mean negative log-likelihood over masked (response) tokens.
pub fn sft_loss(logp: &Tensor, mask: &Tensor) -> Result<Tensor, EngineError> {
    let total = (logp * mask)?.sum_all()?;
    Ok((total.neg()? / mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?)
}

/// Summed log-probability of each row's response `(b,)`.
pub fn sequence_logprob(logp: &Tensor, mask: &Tensor) -> Result<Tensor, EngineError> {
    Ok((logp * mask)?.sum(D::Minus1)?)
}

/// log σ(x), computed stably as −softplus(−x).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor, EngineError> {
    let z = x.neg()?;
    let softplus = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(softplus.neg()?)
}

/// DPO: mean of −log σ(β·Δ), Δ = (π_c − ref_c) − (π_r − ref_r) (sequence log-probs).
pub fn dpo_loss(
    pc: &Tensor,
    pr: &Tensor,
    rc: &Tensor,
    rr: &Tensor,
    beta: f64,
) -> Result<Tensor, EngineError> {
    let delta = ((pc - rc)? - (pr - rr)?)?;
    Ok(log_sigmoid(&(delta * beta)?)?.neg()?.mean_all()?)
}

/// RPO with the backward-KL distance (NeMo-Aligner `rpo_bwd_kl`): mean of D[a‖b] with
/// a = β·Δ and b = η·(r_c − r_l), D[a‖b] = σ(b)(logσ(b) − logσ(a)) + σ(−b)(logσ(−b) − logσ(−a)).
#[allow(clippy::too_many_arguments)]
pub fn rpo_loss(
    pc: &Tensor,
    pr: &Tensor,
    rc: &Tensor,
    rr: &Tensor,
    reward_c: &Tensor,
    reward_r: &Tensor,
    beta: f64,
    eta: f64,
) -> Result<Tensor, EngineError> {
    let a = ((((pc - rc)? - (pr - rr)?)?) * beta)?;
    let b = ((reward_c - reward_r)? * eta)?;
    let (la, lna) = (log_sigmoid(&a)?, log_sigmoid(&a.neg()?)?);
    let (lb, lnb) = (log_sigmoid(&b)?, log_sigmoid(&b.neg()?)?);
    let d = ((lb.exp()? * (&lb - la)?)? + (lnb.exp()? * (&lnb - lna)?)?)?;
    Ok(d.mean_all()?)
}

pub(crate) fn schedule(cfg: &TrainConfig, step: usize) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * (step + 1) as f64 / cfg.warmup as f64;
    }
    let rest = (cfg.steps - cfg.warmup).max(1) as f64;
    let frac = (step - cfg.warmup) as f64 / rest;
    cfg.lr * (1.0 - 0.9 * frac.min(1.0))
}

/// Runs `cfg.steps` optimizer steps of `loss_fn(step, rng)` over the variables in `varmap`.
/// Returns the mean loss of the last 10% of steps.
pub fn train_loop(
    varmap: &VarMap,
    cfg: &TrainConfig,
    progress: Progress<'_>,
    mut loss_fn: impl FnMut(usize, &mut Rng) -> Result<Tensor, EngineError>,
) -> Result<f64, EngineError> {
    let vars = varmap.all_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut rng = Rng::new(cfg.seed);
    let mut tail = Vec::new();
    for step in 0..cfg.steps {
        opt.set_learning_rate(schedule(cfg, step));
        let loss = loss_fn(step, &mut rng)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(EngineError::Diverged(step, value));
        }
        let mut grads = loss.backward()?;
        let mut norm2 = 0.0;
        for v in &vars {
            if let Some(g) = grads.get(v) {
                norm2 += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        let norm = norm2.sqrt();
        if norm > cfg.grad_clip {
            let scale = cfg.grad_clip / norm;
            for v in &vars {
                if let Some(g) = grads.get(v) {
                    let scaled = (g * scale)?;
                    grads.insert(v, scaled);
                }
            }
        }
        opt.step(&grads)?;
        if step >= cfg.steps - cfg.steps.div_ceil(10) {
            tail.push(value);
        }
        if !progress(step, value) {
            return Err(EngineError::Cancelled);
        }
    }
    Ok(tail.iter().sum::<f64>() / tail.len().max(1) as f64)
}

fn pick<'a, T>(data: &'a [T], n: usize, rng: &mut Rng) -> Vec<&'a T> {
    (0..n)
        .map(|_| &data[rng.below(data.len() as u64) as usize])
        .collect()
}

/// Supervised fine-tuning on `(prompt, response)` pairs.
pub fn sft(
    model: &Transformer,
    varmap: &VarMap,
    data: &[(String, String)],
    cfg: &TrainConfig,
    progress: Progress<'_>,
) -> Result<f64, EngineError> {
    if data.is_empty() {
        return Err(EngineError::NoData("sft"));
    }
    if model.device().is_cpu() {
        let max_seq = model.config.max_seq;
        return fused::train_loop(model, varmap, cfg, progress, |_, rng, m, grads| {
            let rows: Vec<Seq> = pick(data, cfg.batch_size, rng)
                .into_iter()
                .map(|(p, r)| Seq::new(p, r, max_seq))
                .collect();
            fused::loss_and_grads(m, &rows, &fused::Objective::Sft, grads, fused::threads())
        });
    }
    train_loop(varmap, cfg, progress, |_, rng| {
        let rows: Vec<(&str, &str)> = pick(data, cfg.batch_size, rng)
            .into_iter()
            .map(|(p, r)| (p.as_str(), r.as_str()))
            .collect();
        sft_batch_loss(model, &batch(&rows, model.config.max_seq, model.device())?)
    })
}

/// A preference pair with the reward model's scores.
#[derive(Debug, Clone)]
pub struct Pair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

impl Pair {
    /// A pair from a TRL-style preference record; missing rewards default to 1 and 0 (as
    /// NeMo-Aligner does).
    pub fn from_row(r: &serde_json::Value) -> Option<Self> {
        Some(Self {
            prompt: r["prompt"].as_str()?.to_string(),
            chosen: r["chosen"].as_str()?.to_string(),
            rejected: r["rejected"].as_str()?.to_string(),
            chosen_reward: r["chosen_reward"].as_f64().unwrap_or(1.0),
            rejected_reward: r["rejected_reward"].as_f64().unwrap_or(0.0),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PreferenceLoss {
    Dpo,
    Rpo { eta: f64 },
}

/// The preference objective: `loss` at KL coefficient `beta`, plus `sft_weight` × SFT loss on
/// the chosen responses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreferenceObjective {
    pub loss: PreferenceLoss,
    pub beta: f64,
    pub sft_weight: f64,
}

/// The preference loss of one batch laid out as `n` chosen rows, then the same prompts' `n`
/// rejected rows: `objective.loss` against the frozen `reference`, plus `objective.sft_weight` ×
/// SFT loss on the chosen rows. `rewards` are the reward model's (chosen, rejected) scores of
/// each pair, which only RPO reads.
pub fn preference_batch_loss(
    policy: &Transformer,
    reference: &Transformer,
    b: &Batch,
    objective: PreferenceObjective,
    rewards: &[(f64, f64)],
) -> Result<Tensor, EngineError> {
    let PreferenceObjective {
        loss,
        beta,
        sft_weight,
    } = objective;
    let n = b.inputs.dim(0)? / 2;
    let lp = token_logprobs(policy, b)?;
    let seq = sequence_logprob(&lp, &b.mask)?;
    let reference_seq = sequence_logprob(&token_logprobs(reference, b)?, &b.mask)?.detach();
    let (pc, pr) = (seq.narrow(0, 0, n)?, seq.narrow(0, n, n)?);
    let (rc, rr) = (
        reference_seq.narrow(0, 0, n)?,
        reference_seq.narrow(0, n, n)?,
    );
    let pref = match loss {
        PreferenceLoss::Dpo => dpo_loss(&pc, &pr, &rc, &rr, beta)?,
        PreferenceLoss::Rpo { eta } => {
            let dev = policy.device();
            let rw_c = Tensor::from_vec(rewards.iter().map(|r| r.0 as f32).collect(), n, dev)?;
            let rw_r = Tensor::from_vec(rewards.iter().map(|r| r.1 as f32).collect(), n, dev)?;
            rpo_loss(&pc, &pr, &rc, &rr, &rw_c, &rw_r, beta, eta)?
        }
    };
    if sft_weight > 0.0 {
        let chosen_lp = lp.narrow(0, 0, n)?;
        let chosen_mask = b.mask.narrow(0, 0, n)?;
        Ok((pref + (sft_loss(&chosen_lp, &chosen_mask)? * sft_weight)?)?)
    } else {
        Ok(pref)
    }
}

/// DPO or RPO against a frozen reference, plus the SFT term on the chosen responses.
pub fn preference(
    policy: &Transformer,
    varmap: &VarMap,
    reference: &Transformer,
    pairs: &[Pair],
    objective: PreferenceObjective,
    cfg: &TrainConfig,
    progress: Progress<'_>,
) -> Result<f64, EngineError> {
    if pairs.is_empty() {
        return Err(EngineError::NoData("preference"));
    }
    if policy.device().is_cpu() {
        let reference = HostModel::of(reference)?;
        let max_seq = policy.config.max_seq;
        return fused::train_loop(policy, varmap, cfg, progress, |_, rng, m, grads| {
            let chosen = pick(pairs, cfg.batch_size, rng);
            let mut rows: Vec<Seq> = chosen
                .iter()
                .map(|p| Seq::new(&p.prompt, &p.chosen, max_seq))
                .collect();
            rows.extend(
                chosen
                    .iter()
                    .map(|p| Seq::new(&p.prompt, &p.rejected, max_seq)),
            );
            let rewards: Vec<(f64, f64)> = chosen
                .iter()
                .map(|p| (p.chosen_reward, p.rejected_reward))
                .collect();
            let objective = fused::Objective::Preference {
                reference: &reference,
                objective,
                rewards: &rewards,
            };
            fused::loss_and_grads(m, &rows, &objective, grads, fused::threads())
        });
    }
    train_loop(varmap, cfg, progress, |_, rng| {
        let chosen = pick(pairs, cfg.batch_size, rng);
        let mut rows: Vec<(&str, &str)> = chosen
            .iter()
            .map(|p| (p.prompt.as_str(), p.chosen.as_str()))
            .collect();
        rows.extend(
            chosen
                .iter()
                .map(|p| (p.prompt.as_str(), p.rejected.as_str())),
        );
        let b = batch(&rows, policy.config.max_seq, policy.device())?;
        let rewards: Vec<(f64, f64)> = chosen
            .iter()
            .map(|p| (p.chosen_reward, p.rejected_reward))
            .collect();
        preference_batch_loss(policy, reference, &b, objective, &rewards)
    })
}

/// Reward-model regression: MSE between the 5 predicted attributes and the labels.
pub fn reward_model(
    model: &Transformer,
    varmap: &VarMap,
    data: &[(String, String, [f32; 5])],
    cfg: &TrainConfig,
    progress: Progress<'_>,
) -> Result<f64, EngineError> {
    if data.is_empty() {
        return Err(EngineError::NoData("reward model"));
    }
    if model.device().is_cpu() {
        let max_seq = model.config.max_seq;
        return fused::train_loop(model, varmap, cfg, progress, |_, rng, m, grads| {
            let picked = pick(data, cfg.batch_size, rng);
            let rows: Vec<Seq> = picked
                .iter()
                .map(|(p, r, _)| Seq::new(p, r, max_seq))
                .collect();
            let labels: Vec<[f32; 5]> = picked.iter().map(|(_, _, l)| *l).collect();
            fused::loss_and_grads(
                m,
                &rows,
                &fused::Objective::Reward(&labels),
                grads,
                fused::threads(),
            )
        });
    }
    train_loop(varmap, cfg, progress, |_, rng| {
        let rows = pick(data, cfg.batch_size, rng);
        let text: Vec<(&str, &str)> = rows
            .iter()
            .map(|(p, r, _)| (p.as_str(), r.as_str()))
            .collect();
        let b = batch(&text, model.config.max_seq, model.device())?;
        let labels: Vec<f32> = rows
            .iter()
            .flat_map(|(_, _, l)| l.iter().copied())
            .collect();
        let labels = Tensor::from_vec(labels, (rows.len(), 5), model.device())?;
        let pred = model.attributes(&b.inputs, &b.last)?;
        Ok((pred - labels)?.sqr()?.mean_all()?)
    })
}
