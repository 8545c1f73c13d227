//! `demo --ablation`: SFT only, SFT+DPO and SFT+RPO on identical data, over three seeds, the
//! preference step done as the recipe does it.
//!
//! Per seed: SFT from the round's generator on round 1's SFT data (the settings of the spec's
//! `sft` stage);
//! preference pairs sampled from that SFT model (the current policy) on training prompts of
//! which a share ask for the answer in quotes (IFEval's `startend:quotation`), scored like the
//! builtin `score` stage and paired by the `filter` stage's own ranking: the checkers first
//! (instruction followed, answer correct), the reward model second; DPO and RPO from the SFT
//! model against a frozen reference, with the settings of the spec's `preference` stage (its
//! algorithm aside: both run). Every variant is evaluated on the same held-out prompts:
//! accuracy (no instruction) and IFEval prompt-level strict accuracy (every prompt quoted).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result};
use candle_nn::VarMap;
use flywheel_builtin::{score_rows, train_config, world_instructions};
use flywheel_engine::sample::{SampleConfig, sample};
use flywheel_engine::train::{self, Pair, PreferenceLoss, PreferenceObjective, TrainConfig};
use flywheel_engine::world::{self, Mix, Split};
use flywheel_engine::{checkpoint, eval, model::Transformer};
use flywheel_orchestrator::spec::CampaignSpec;
use flywheel_proto::stage::{
    self as contract, BuiltinPreference, BuiltinScore, BuiltinSft, StageKind,
};
use flywheel_worker::sdg::instructions::Accuracy;
use serde::Serialize;
use serde_json::{Value, json};

pub(crate) const SEEDS: [u64; 3] = [1, 2, 3];

/// The preference data of the ablation: how many prompts, which share is quoted, K.
const PREFERENCE_PROMPTS: usize = 800;
const QUOTED_SHARE: f64 = 0.5;
const K: usize = 8;

#[derive(Debug, Serialize)]
pub(crate) struct Measured {
    accuracy: f64,
    instruction_following: f64,
    mean_reward: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Variant {
    name: &'static str,
    /// One per seed, in the order of [`SEEDS`].
    runs: Vec<Measured>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Ablation {
    seeds: Vec<u64>,
    sft_records: usize,
    /// On-policy pairs per seed, and how many of them a checker decided.
    pairs: Vec<usize>,
    checker_pairs: Vec<usize>,
    reference: &'static str,
    variants: Vec<Variant>,
}

fn read(uri: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(uri.trim_start_matches("file://"))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

fn held_out(quotes: f64, count: usize) -> Vec<String> {
    let mix = Mix {
        quotes,
        brackets: if quotes > 0.0 { 0.0 } else { 0.2 },
        ..super::bootstrap::demo_mix(Split::HeldOut)
    };
    world::generate(1234, count, &mix, "e", &HashSet::new())
        .into_iter()
        .map(|p| p.prompt)
        .collect()
}

struct Eval {
    plain: Vec<String>,
    quoted: Vec<String>,
}

fn evaluate(model: &Transformer, rm: &Transformer, e: &Eval) -> Result<Measured> {
    let answers = eval::answers(model, &e.plain)?;
    let rewards = eval::rewards(
        rm,
        &e.plain,
        &answers,
        true,
        &flywheel_proto::stage::HELPSTEER2_WEIGHTS,
    )?;
    let quoted = eval::answers(model, &e.quoted)?;
    let instructions: Vec<_> = e.quoted.iter().map(|p| world_instructions(p)).collect();
    let following = Accuracy::of(
        instructions
            .iter()
            .zip(&quoted)
            .map(|(i, a)| (i.as_slice(), a.as_str())),
    )
    .map_or(0.0, |a| a.prompt_strict);
    Ok(Measured {
        accuracy: eval::accuracy(&e.plain, &answers),
        instruction_following: following,
        mean_reward: rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
    })
}

/// Pairs from `policy`'s own samples, ranked checkers first (the filter stage's ranking).
fn on_policy_pairs(policy: &Transformer, rm: &Transformer, seed: u64) -> Result<Vec<Value>> {
    let mix = Mix {
        quotes: QUOTED_SHARE,
        brackets: 0.1,
        ..super::bootstrap::demo_mix(Split::Train)
    };
    let prompts: Vec<String> = world::generate(
        seed ^ 0x5EED,
        PREFERENCE_PROMPTS,
        &mix,
        "p",
        &HashSet::new(),
    )
    .into_iter()
    .map(|p| p.prompt)
    .collect();
    let cfg = SampleConfig {
        temperature: 1.0,
        max_tokens: 16,
        seed,
        batch_size: 128,
        ..SampleConfig::greedy(16)
    };
    let samples = sample(policy, &prompts, K, &cfg, &mut |_, _| true)?;
    let mut rows = Vec::new();
    for (i, (prompt, responses)) in prompts.iter().zip(samples).enumerate() {
        for response in responses {
            let mut row = json!({ "prompt_id": i, "prompt": prompt, "response": response });
            let instructions = world_instructions(prompt);
            if !instructions.is_empty() {
                row["instructions"] = json!(instructions);
            }
            rows.push(row);
        }
    }
    score_rows(rm, &mut rows, &BuiltinScore::default())?;
    // The demo recipe's filter: margin 1.0 where no checker decides.
    Ok(flywheel_worker::datasets::filter(&rows, 1.0, f64::NEG_INFINITY, false).pairs)
}

/// The training settings the ablation takes from the campaign spec.
pub(crate) struct Recipe {
    sft: BuiltinSft,
    preference: BuiltinPreference,
}

impl Recipe {
    /// The params of `spec`'s first `sft` and `preference` stages, as the builtin backend reads them.
    pub(crate) fn of(spec: &CampaignSpec) -> Result<Self> {
        let params = |kind: StageKind| {
            let stage = spec
                .stages
                .iter()
                .find(|s| s.kind == kind)
                .with_context(|| format!("the spec has no {kind} stage for the ablation"))?;
            Ok::<_, anyhow::Error>(Value::Object(stage.params.clone()))
        };
        Ok(Self {
            sft: contract::parse(&params(StageKind::Sft)?).map_err(anyhow::Error::msg)?,
            preference: contract::parse(&params(StageKind::Preference)?)
                .map_err(anyhow::Error::msg)?,
        })
    }

    fn sft_config(&self, seed: u64) -> TrainConfig {
        let p = &self.sft;
        train_config(p.steps, p.batch_size, p.lr, p.warmup, seed)
    }

    fn preference_config(&self, seed: u64) -> TrainConfig {
        let p = &self.preference;
        train_config(p.steps, p.batch_size, p.lr, p.warmup, seed)
    }

    fn objective(&self, loss: PreferenceLoss) -> PreferenceObjective {
        PreferenceObjective {
            loss,
            beta: self.preference.beta,
            sft_weight: self.preference.sft_weight,
        }
    }

    #[cfg(test)]
    pub(crate) fn sft_steps(&self) -> i64 {
        self.sft.steps
    }

    fn eta(&self) -> f64 {
        self.preference.eta.unwrap_or(1.0)
    }
}

pub(crate) fn run(
    generator: &Path,
    reward: &Path,
    sft_uri: &str,
    recipe: &Recipe,
    log: &dyn Fn(&str),
) -> Result<Ablation> {
    let dev = candle_core::Device::Cpu;
    let sft: Vec<(String, String)> = read(sft_uri)?
        .iter()
        .filter_map(flywheel_worker::datasets::sft_example)
        .collect();
    let rm = checkpoint::load_frozen(reward, &dev)?;
    let evals = Eval {
        plain: held_out(0.0, 200),
        quoted: held_out(1.0, 100),
    };
    let config = checkpoint::read_config(generator)?;
    let names = ["sft", "sft+dpo", "sft+rpo"];
    let mut variants: Vec<Variant> = names
        .iter()
        .map(|&name| Variant { name, runs: vec![] })
        .collect();
    let (mut pairs_per_seed, mut checker_pairs) = (vec![], vec![]);
    for seed in SEEDS {
        // The demo recipe's sft stage.
        let varmap = VarMap::new();
        let model = checkpoint::load_trainable(generator, config.clone(), &varmap, &dev)?;
        train::sft(
            &model,
            &varmap,
            &sft,
            &recipe.sft_config(seed),
            &mut |_, _| true,
        )?;
        let sft_dir =
            std::env::temp_dir().join(format!("flywheel-ablation-{}-{seed}", std::process::id()));
        checkpoint::save(&sft_dir, &config, &varmap)?;
        variants[0].runs.push(evaluate(&model, &rm, &evals)?);
        let rows = on_policy_pairs(&model, &rm, seed)?;
        pairs_per_seed.push(rows.len());
        checker_pairs.push(rows.iter().filter(|p| p["judge"].is_string()).count());
        let pairs: Vec<Pair> = rows.iter().filter_map(Pair::from_row).collect();
        for (i, loss) in [
            PreferenceLoss::Dpo,
            PreferenceLoss::Rpo { eta: recipe.eta() },
        ]
        .into_iter()
        .enumerate()
        {
            let varmap = VarMap::new();
            let policy = checkpoint::load_trainable(&sft_dir, config.clone(), &varmap, &dev)?;
            let reference = checkpoint::load_frozen(&sft_dir, &dev)?;
            train::preference(
                &policy,
                &varmap,
                &reference,
                &pairs,
                recipe.objective(loss),
                &recipe.preference_config(seed),
                &mut |_, _| true,
            )?;
            variants[i + 1].runs.push(evaluate(&policy, &rm, &evals)?);
        }
        let _ = std::fs::remove_dir_all(&sft_dir);
        let line: Vec<String> = variants
            .iter()
            .map(|v| {
                let r = v.runs.last().expect("a run per seed");
                format!(
                    "{} {:.1}% / IF {:.1}%",
                    v.name,
                    r.accuracy * 100.0,
                    r.instruction_following * 100.0
                )
            })
            .collect();
        log(&format!("ablation seed {seed}: {}", line.join(", ")));
    }
    Ok(Ablation {
        seeds: SEEDS.to_vec(),
        sft_records: sft.len(),
        pairs: pairs_per_seed,
        checker_pairs,
        reference: "sft",
        variants,
    })
}

/// Mean and (sample) standard deviation.
fn mean_sd(xs: impl Iterator<Item = f64>) -> (f64, f64) {
    let xs: Vec<f64> = xs.collect();
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

pub(crate) fn print(a: &Ablation) {
    println!(
        "{:<8} {:>16} {:>22} {:>14}   (seeds {:?}; {} SFT records; on-policy pairs {:?}, checker-decided {:?}; reference: {})",
        "variant",
        "accuracy",
        "instruction following",
        "mean reward",
        a.seeds,
        a.sft_records,
        a.pairs,
        a.checker_pairs,
        a.reference
    );
    for v in &a.variants {
        let (acc, acc_sd) = mean_sd(v.runs.iter().map(|r| r.accuracy * 100.0));
        let (ifo, if_sd) = mean_sd(v.runs.iter().map(|r| r.instruction_following * 100.0));
        let (rew, rew_sd) = mean_sd(v.runs.iter().map(|r| r.mean_reward));
        println!(
            "{:<8} {:>8.1}% ± {:>4.1} {:>14.1}% ± {:>4.1} {:>8.2} ± {:.2}",
            v.name, acc, acc_sd, ifo, if_sd, rew, rew_sd
        );
    }
}
