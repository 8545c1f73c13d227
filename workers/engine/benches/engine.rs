//! Engine benchmark at the demo model size (`ModelConfig::small`): training tokens/s for SFT and
//! DPO, batched KV-cached sampling tokens/s, and reward-model scoring records/s.
//!
//! `cargo bench -p flywheel-engine --bench engine`

use std::collections::HashSet;
use std::time::Instant;

use candle_nn::VarMap;
use flywheel_engine::model::{ModelConfig, Transformer};
use flywheel_engine::reward;
use flywheel_engine::sample::{SampleConfig, sample};
use flywheel_engine::tokenizer::{encode_prompt, encode_response};
use flywheel_engine::train::{self, Pair, PreferenceLoss, PreferenceObjective, TrainConfig};
use flywheel_engine::world::{self, Mix};

fn tokens(data: &[(String, String)]) -> f64 {
    data.iter()
        .map(|(p, r)| (encode_prompt(p).len() + encode_response(r).len()) as f64)
        .sum::<f64>()
        / data.len() as f64
}

fn main() {
    let dev = candle_core::Device::Cpu;
    let config = ModelConfig::small();
    let prompts = world::generate(1, 2000, &Mix::default(), "b", &HashSet::new());
    let data: Vec<(String, String)> = prompts
        .iter()
        .map(|p| (p.prompt.clone(), world::answer(&p.prompt).unwrap()))
        .collect();
    let per_example = tokens(&data);
    let varmap = VarMap::new();
    let model = Transformer::fresh(config.clone(), &varmap, &dev, 1).unwrap();
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    println!(
        "engine benchmark: d_model {} x {} layers, {} heads ({} kv), {params} parameters, {:.1} tokens per example",
        config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, per_example
    );

    let cfg = TrainConfig {
        steps: 100,
        batch_size: 32,
        ..TrainConfig::default()
    };
    let t = Instant::now();
    train::sft(&model, &varmap, &data, &cfg, &mut |_, _| true).unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "  sft: {:.1} steps/s, {:.0} training tokens/s (batch 32)",
        cfg.steps as f64 / s,
        cfg.steps as f64 * 32.0 * per_example / s
    );

    let pairs: Vec<Pair> = data
        .iter()
        .map(|(p, r)| Pair {
            prompt: p.clone(),
            chosen: r.clone(),
            rejected: format!("{r}x"),
            chosen_reward: 3.0,
            rejected_reward: 1.0,
        })
        .collect();
    let reference = Transformer::fresh(config.clone(), &VarMap::new(), &dev, 1).unwrap();
    let cfg = TrainConfig {
        steps: 50,
        batch_size: 32,
        ..TrainConfig::default()
    };
    for (name, loss) in [
        ("dpo", PreferenceLoss::Dpo),
        ("rpo", PreferenceLoss::Rpo { eta: 1.0 }),
    ] {
        let t = Instant::now();
        train::preference(
            &model,
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
        )
        .unwrap();
        let s = t.elapsed().as_secs_f64();
        // Each step runs 32 pairs = 64 sequences through the policy (with backward) and the reference.
        println!(
            "  {name}: {:.1} steps/s, {:.0} training tokens/s (32 pairs a step)",
            cfg.steps as f64 / s,
            cfg.steps as f64 * 64.0 * per_example / s
        );
    }

    let texts: Vec<String> = prompts.iter().take(512).map(|p| p.prompt.clone()).collect();
    for batch in [1usize, 64, 256] {
        let cfg = SampleConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_tokens: 16,
            seed: 1,
            batch_size: batch,
        };
        let n = if batch == 1 { 32 } else { 512 };
        let t = Instant::now();
        let out = sample(&model, &texts[..n], 1, &cfg, &mut |_, _| true).unwrap();
        let s = t.elapsed().as_secs_f64();
        let generated: usize = out.iter().map(|v| v[0].len() + 1).sum();
        println!(
            "  sampling, batch {batch}: {:.0} generated tokens/s ({n} prompts, KV cache)",
            generated as f64 / s
        );
    }

    let rm = Transformer::fresh(config.with_reward_head(), &VarMap::new(), &dev, 1).unwrap();
    let rows: Vec<(&str, &str)> = data.iter().map(|(p, r)| (p.as_str(), r.as_str())).collect();
    let t = Instant::now();
    reward::score(&rm, &rows, 256).unwrap();
    println!(
        "  reward scoring: {:.0} records/s (batch 256)",
        rows.len() as f64 / t.elapsed().as_secs_f64()
    );
}
