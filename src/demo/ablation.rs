//! `demo --ablation`: from the same round-1 data, SFT only vs SFT+DPO vs SFT+RPO.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Result;
use candle_nn::VarMap;
use flywheel_engine::train::{self, Pair, PreferenceLoss, PreferenceObjective, TrainConfig};
use flywheel_engine::world::{self, Split};
use flywheel_engine::{checkpoint, eval, model::Transformer};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub(crate) struct Variant {
    name: &'static str,
    accuracy: f64,
    mean_reward: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Ablation {
    sft_records: usize,
    pairs: usize,
    variants: Vec<Variant>,
}

fn read(uri: &str) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(uri.trim_start_matches("file://"))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

fn evaluate(
    name: &'static str,
    model: &Transformer,
    rm: &Transformer,
    prompts: &[String],
) -> Result<Variant> {
    let answers = eval::answers(model, prompts)?;
    let rewards = eval::rewards(
        rm,
        prompts,
        &answers,
        true,
        &flywheel_proto::stage::HELPSTEER2_WEIGHTS,
    )?;
    Ok(Variant {
        name,
        accuracy: eval::accuracy(prompts, &answers),
        mean_reward: rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
    })
}

pub(crate) fn run(
    generator: &Path,
    reward: &Path,
    sft_uri: &str,
    pairs_uri: &str,
) -> Result<Ablation> {
    let dev = candle_core::Device::Cpu;
    let sft: Vec<(String, String)> = read(sft_uri)?
        .iter()
        .filter_map(flywheel_worker::datasets::sft_example)
        .collect();
    let pairs: Vec<Pair> = read(pairs_uri)?.iter().filter_map(Pair::from_row).collect();
    let rm = checkpoint::load_frozen(reward, &dev)?;
    let prompts: Vec<String> = world::generate(
        1234,
        200,
        &super::bootstrap::demo_mix(Split::HeldOut),
        "e",
        &HashSet::new(),
    )
    .into_iter()
    .map(|p| p.prompt)
    .collect();
    let config = checkpoint::read_config(generator)?;

    // The same settings as the demo recipe's sft and rpo stages.
    let varmap = VarMap::new();
    let model = checkpoint::load_trainable(generator, config.clone(), &varmap, &dev)?;
    train::sft(
        &model,
        &varmap,
        &sft,
        &TrainConfig {
            steps: 900,
            lr: 3e-3,
            ..TrainConfig::default()
        },
        &mut |_, _| true,
    )?;
    let sft_dir = std::env::temp_dir().join(format!("flywheel-ablation-{}", std::process::id()));
    checkpoint::save(&sft_dir, &config, &varmap)?;
    let mut variants = vec![evaluate("sft", &model, &rm, &prompts)?];
    for (name, loss) in [
        ("sft+dpo", PreferenceLoss::Dpo),
        ("sft+rpo", PreferenceLoss::Rpo { eta: 1.0 }),
    ] {
        let varmap = VarMap::new();
        let policy = checkpoint::load_trainable(&sft_dir, config.clone(), &varmap, &dev)?;
        let reference = checkpoint::load_frozen(&sft_dir, &dev)?;
        let cfg = TrainConfig {
            steps: 40,
            lr: 5e-4,
            ..TrainConfig::default()
        };
        train::preference(
            &policy,
            &varmap,
            &reference,
            &pairs,
            PreferenceObjective {
                loss,
                beta: 0.1,
                sft_weight: 0.1,
            },
            &cfg,
            &mut |_, _| true,
        )?;
        variants.push(evaluate(name, &policy, &rm, &prompts)?);
    }
    let _ = std::fs::remove_dir_all(&sft_dir);
    Ok(Ablation {
        sft_records: sft.len(),
        pairs: pairs.len(),
        variants,
    })
}

pub(crate) fn print(a: &Ablation) {
    println!(
        "{:<8} {:>9} {:>11}   (from {} SFT records, {} pairs)",
        "variant", "accuracy", "mean reward", a.sft_records, a.pairs
    );
    for v in &a.variants {
        println!(
            "{:<8} {:>8.1}% {:>11.2}",
            v.name,
            v.accuracy * 100.0,
            v.mean_reward
        );
    }
}
