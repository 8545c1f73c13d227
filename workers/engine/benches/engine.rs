//! Engine benchmark at the demo model size (`ModelConfig::small`): training tokens/s for SFT and
//! DPO, batched KV-cached sampling tokens/s, and reward-model scoring records/s.
//!
//! With `--peer torch`, it then runs the PyTorch twin (`benches/torch_twin.py`, the same
//! architecture loaded from this engine's safetensors, trained on this engine's batches with
//! its optimiser, and sampling greedily with a KV cache from the same prompt batches) against
//! the engine, `--runs R` interleaved pairs (default 2), checks that both have the same
//! parameter count, the same loss on the first batch and the same greedy samples, and prints
//! both speeds and the ratio. PyTorch is installed from PyPI into `target/bench-torch/`
//! on first use (only for this benchmark).
//!
//! `cargo bench -p flywheel-engine --bench engine [-- --peer torch [--runs R]]`

use std::collections::HashSet;
use std::time::Instant;

use candle_nn::VarMap;
use flywheel_engine::model::{ModelConfig, Transformer};
use flywheel_engine::reward;
use flywheel_engine::sample::{SampleConfig, sample_ids};
use flywheel_engine::tokenizer::{encode_prompt, encode_response};
use flywheel_engine::train::{self, Pair, PreferenceLoss, PreferenceObjective, TrainConfig};
use flywheel_engine::world::{self, Mix};

fn tokens(data: &[(String, String)]) -> f64 {
    data.iter()
        .map(|(p, r)| (encode_prompt(p).len() + encode_response(r).len()) as f64)
        .sum::<f64>()
        / data.len() as f64
}

/// 2,000 task-world prompts and their correct answers.
fn task_data() -> (Vec<world::Prompt>, Vec<(String, String)>) {
    let prompts = world::generate(1, 2000, &Mix::default(), "b", &HashSet::new());
    let data = prompts
        .iter()
        .map(|p| (p.prompt.clone(), world::answer(&p.prompt).unwrap()))
        .collect();
    (prompts, data)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(peer) = value("--peer") {
        assert_eq!(peer, "torch", "--peer takes torch");
        let runs = value("--runs").map_or(2, |r| r.parse().expect("--runs takes a number"));
        return twin::compare(runs);
    }
    let dev = candle_core::Device::Cpu;
    let config = ModelConfig::small();
    let (prompts, data) = task_data();
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
        let out = sample_ids(&model, &texts[..n], 1, &cfg, &mut |_, _| true).unwrap();
        let s = t.elapsed().as_secs_f64();
        let generated: usize = out.iter().map(|v| v[0].len()).sum();
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

/// The engine against its PyTorch twin on the same weights and batches.
mod twin {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Instant;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;
    use flywheel_engine::fused::{self, HostModel, Objective, Seq};
    use flywheel_engine::model::{ModelConfig, Transformer};
    use flywheel_engine::rng::Rng;
    use flywheel_engine::sample::{SampleConfig, sample_ids};
    use flywheel_engine::tokenizer::{END, PAD, encode_prompt};
    use flywheel_engine::train::{self, Batch, PreferenceLoss, PreferenceObjective, TrainConfig};

    const SFT_STEPS: usize = 60;
    const DPO_STEPS: usize = 30;
    const BATCH: usize = 32;
    const BETA: f64 = 0.1;
    const SFT_WEIGHT: f64 = 0.1;
    const SAMPLE_BATCH: usize = 64;
    const SAMPLE_BATCHES: usize = 8;
    const SAMPLE_TOKENS: usize = 16;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// A Python with torch and safetensors, installed into `target/bench-torch/` on first use.
    fn python() -> PathBuf {
        let venv = root().join("target/bench-torch");
        let python = venv.join("bin/python");
        let ready = |p: &Path| {
            Command::new(p)
                .args(["-c", "import torch, safetensors"])
                .status()
                .is_ok_and(|s| s.success())
        };
        if ready(&python) {
            return python;
        }
        eprintln!(
            "installing torch and safetensors from PyPI into {} ...",
            venv.display()
        );
        let venv_ok = python.exists()
            || Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .expect("python3 is missing (the torch peer needs it)")
                .success();
        assert!(
            venv_ok,
            "python3 -m venv failed (install Debian's python3-venv)"
        );
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "torch", "safetensors", "numpy"])
            .status()
            .expect("pip");
        assert!(
            pip.success() && ready(&python),
            "pip could not install torch and safetensors from PyPI"
        );
        python
    }

    /// `steps` batches of `BATCH` rows drawn from `data`; with `pairs`, the same prompts follow
    /// with rejected responses (the response and an `x`), as a DPO batch is laid out. Each batch
    /// comes padded (what the twin reads) and packed (what the engine's fused step reads): the
    /// same rows.
    fn batches(
        data: &[(String, String)],
        steps: usize,
        seed: u64,
        pairs: bool,
        config: &ModelConfig,
        dev: &Device,
    ) -> Vec<(Batch, Vec<Seq>)> {
        let mut rng = Rng::new(seed);
        (0..steps)
            .map(|_| {
                let picked: Vec<&(String, String)> = (0..BATCH)
                    .map(|_| &data[rng.below(data.len() as u64) as usize])
                    .collect();
                let rejected: Vec<(&str, String)> = if pairs {
                    picked
                        .iter()
                        .map(|(p, r)| (p.as_str(), format!("{r}x")))
                        .collect()
                } else {
                    Vec::new()
                };
                let mut rows: Vec<(&str, &str)> = picked
                    .iter()
                    .map(|(p, r)| (p.as_str(), r.as_str()))
                    .collect();
                rows.extend(rejected.iter().map(|(p, r)| (*p, r.as_str())));
                let seqs = rows
                    .iter()
                    .map(|(p, r)| Seq::new(p, r, config.max_seq))
                    .collect();
                (train::batch(&rows, config.max_seq, dev).unwrap(), seqs)
            })
            .collect()
    }

    fn real_tokens(batches: &[(Batch, Vec<Seq>)]) -> f64 {
        batches
            .iter()
            .map(|(b, _)| {
                let ids: Vec<u32> = b.inputs.flatten_all().unwrap().to_vec1().unwrap();
                ids.iter().filter(|&&t| t != PAD).count() as f64
            })
            .sum()
    }

    fn save_batches(
        out: &mut HashMap<String, Tensor>,
        prefix: &str,
        batches: &[(Batch, Vec<Seq>)],
    ) {
        for (i, (b, _)) in batches.iter().enumerate() {
            out.insert(
                format!("{prefix}.{i}.inputs"),
                b.inputs.to_dtype(DType::I64).unwrap(),
            );
            out.insert(
                format!("{prefix}.{i}.targets"),
                b.targets.to_dtype(DType::I64).unwrap(),
            );
            out.insert(format!("{prefix}.{i}.mask"), b.mask.clone());
        }
    }

    /// Trains a fresh seed-1 model over `batches` with the engine's CPU training loop (the
    /// fused step): SFT, or `preference` against the seed-1 reference; returns the first step's
    /// loss and the seconds all steps took.
    fn engine_run(
        config: &ModelConfig,
        cfg: &TrainConfig,
        dev: &Device,
        preference: Option<PreferenceObjective>,
        batches: &[(Batch, Vec<Seq>)],
    ) -> (f64, f64) {
        let varmap = VarMap::new();
        let policy = Transformer::fresh(config.clone(), &varmap, dev, 1).unwrap();
        let reference = Transformer::fresh(config.clone(), &VarMap::new(), dev, 1).unwrap();
        let reference = HostModel::of(&reference).unwrap();
        let objective = match preference {
            None => Objective::Sft,
            Some(objective) => Objective::Preference {
                reference: &reference,
                objective,
                rewards: &[],
            },
        };
        let mut first = None;
        let began = Instant::now();
        fused::train_loop(
            &policy,
            &varmap,
            cfg,
            &mut |step, l| {
                if step == 0 {
                    first = Some(l);
                }
                true
            },
            |step, _, model, grads| {
                fused::loss_and_grads(model, &batches[step].1, &objective, grads, fused::threads())
            },
        )
        .unwrap();
        (first.unwrap(), began.elapsed().as_secs_f64())
    }

    /// Greedy samples of `prompts` from the fresh seed-1 model, `SAMPLE_BATCH` at a time, and the
    /// seconds they took.
    fn engine_sample(
        config: &ModelConfig,
        dev: &Device,
        prompts: &[String],
    ) -> (Vec<Vec<u32>>, f64) {
        let model = Transformer::fresh(config.clone(), &VarMap::new(), dev, 1).unwrap();
        let cfg = SampleConfig {
            batch_size: SAMPLE_BATCH,
            ..SampleConfig::greedy(SAMPLE_TOKENS)
        };
        let began = Instant::now();
        let out = sample_ids(&model, prompts, 1, &cfg, &mut |_, _| true).unwrap();
        let seconds = began.elapsed().as_secs_f64();
        (out.into_iter().map(|mut s| s.remove(0)).collect(), seconds)
    }

    pub(super) fn compare(runs: usize) {
        let dev = Device::Cpu;
        let config = ModelConfig::small();
        let (prompts, data) = super::task_data();
        let prompts: Vec<String> = prompts
            .into_iter()
            .take(SAMPLE_BATCHES * SAMPLE_BATCH)
            .map(|p| p.prompt)
            .collect();
        let sft_batches = batches(&data, SFT_STEPS, 7, false, &config, &dev);
        let dpo_batches = batches(&data, DPO_STEPS, 8, true, &config, &dev);

        let work = root().join("target/bench-peer/torch-twin");
        std::fs::create_dir_all(&work).unwrap();
        let varmap = VarMap::new();
        Transformer::fresh(config.clone(), &varmap, &dev, 1).unwrap();
        let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        varmap.save(work.join("model.safetensors")).unwrap();
        let mut tensors = HashMap::new();
        save_batches(&mut tensors, "sft", &sft_batches);
        save_batches(&mut tensors, "dpo", &dpo_batches);
        for (i, chunk) in prompts.chunks(SAMPLE_BATCH).enumerate() {
            let encoded: Vec<Vec<u32>> = chunk.iter().map(|p| encode_prompt(p)).collect();
            let width = encoded.iter().map(Vec::len).max().unwrap_or(0);
            let pads: Vec<i64> = encoded.iter().map(|e| (width - e.len()) as i64).collect();
            let ids: Vec<i64> = encoded
                .iter()
                .flat_map(|e| {
                    std::iter::repeat_n(PAD as i64, width - e.len())
                        .chain(e.iter().map(|&t| t as i64))
                })
                .collect();
            let n = chunk.len();
            tensors.insert(
                format!("sample.{i}.prompts"),
                Tensor::from_vec(ids, (n, width), &dev).unwrap(),
            );
            tensors.insert(
                format!("sample.{i}.pads"),
                Tensor::from_vec(pads, n, &dev).unwrap(),
            );
        }
        candle_core::safetensors::save(&tensors, work.join("batches.safetensors")).unwrap();
        let cfg = TrainConfig::default();
        let meta = serde_json::json!({
            "model": config,
            "train": { "lr": cfg.lr, "warmup": cfg.warmup, "weight_decay": cfg.weight_decay,
                       "grad_clip": cfg.grad_clip },
            "sft_steps": SFT_STEPS, "dpo_steps": DPO_STEPS, "beta": BETA, "sft_weight": SFT_WEIGHT,
            "sample_max_tokens": SAMPLE_TOKENS, "end": END,
        });
        std::fs::write(work.join("meta.json"), meta.to_string()).unwrap();
        let python = python();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/torch_twin.py");
        let (sft_tokens, dpo_tokens) = (real_tokens(&sft_batches), real_tokens(&dpo_batches));
        let padded: f64 = sft_batches
            .iter()
            .chain(&dpo_batches)
            .map(|(b, _)| b.inputs.elem_count() as f64)
            .sum();
        // Both count real tokens; the twin also computes the pad positions, the engine packs rows.
        println!(
            "batches: {:.0}% of padded positions are pads (the twin computes them, the engine's packed rows skip them)",
            100.0 * (1.0 - (sft_tokens + dpo_tokens) / padded)
        );
        println!(
            "engine vs PyTorch twin: {params} parameters, SFT {SFT_STEPS} steps x {BATCH} rows, DPO {DPO_STEPS} steps x {BATCH} pairs, {threads} threads, {runs} interleaved run(s)"
        );
        let mut ratios: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for run in 1..=runs {
            let sft_cfg = TrainConfig {
                steps: SFT_STEPS,
                ..cfg.clone()
            };
            let dpo_cfg = TrainConfig {
                steps: DPO_STEPS,
                ..cfg.clone()
            };
            let dpo = Some(PreferenceObjective {
                loss: PreferenceLoss::Dpo,
                beta: BETA,
                sft_weight: SFT_WEIGHT,
            });
            let (sft_first, sft_s) = engine_run(&config, &sft_cfg, &dev, None, &sft_batches);
            let (dpo_first, dpo_s) = engine_run(&config, &dpo_cfg, &dev, dpo, &dpo_batches);
            let (samples, sample_s) = engine_sample(&config, &dev, &prompts);
            let out = Command::new(&python)
                .arg(&script)
                .arg(&work)
                .arg(threads.to_string())
                .output()
                .expect("run the torch twin");
            assert!(
                out.status.success(),
                "torch twin failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8_lossy(&out.stdout);
            let t: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap())
                .unwrap_or_else(|e| panic!("torch twin printed {line:?}: {e}"));
            let f = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("no {k} in {t}"));
            // The same computation: same size, same loss from the same weights on the same batch.
            assert_eq!(
                t["params"].as_u64(),
                Some(params as u64),
                "parameter counts differ"
            );
            for (what, ours, theirs) in [
                ("sft", sft_first, f("sft_first_loss")),
                ("dpo", dpo_first, f("dpo_first_loss")),
            ] {
                assert!(
                    (ours - theirs).abs() <= 1e-4 * ours.abs().max(1.0),
                    "{what} first-batch loss: engine {ours}, torch {theirs}"
                );
            }
            println!(
                "run {run} (torch {}, {} threads): first-batch loss sft {sft_first:.6} / {:.6}, dpo {dpo_first:.6} / {:.6}",
                t["torch"].as_str().unwrap_or("?"),
                t["threads"],
                f("sft_first_loss"),
                f("dpo_first_loss")
            );
            // Greedy sampling: the same tokens (a near tie may break the other way in float
            // rounding now and then), generated tokens counted up to each row's end token.
            let theirs: Vec<Vec<u32>> = serde_json::from_value(t["samples"].clone()).unwrap();
            let same = samples.iter().zip(&theirs).filter(|(a, b)| a == b).count();
            assert!(
                theirs.len() == samples.len() && same * 10 >= samples.len() * 9,
                "greedy samples: {same} of {} rows equal",
                samples.len()
            );
            let generated = |s: &[Vec<u32>]| s.iter().map(Vec::len).sum::<usize>() as f64;
            println!(
                "  sampling: {same} of {} greedy rows identical; engine {} generated tokens, torch {}",
                samples.len(),
                generated(&samples),
                generated(&theirs)
            );
            let sample_tokens = generated(&samples);
            let torch_sample_s = f("sample_seconds") * sample_tokens / generated(&theirs);
            for (i, (what, tokens, ours, theirs)) in [
                ("sft", sft_tokens, sft_s, f("sft_seconds")),
                ("dpo", dpo_tokens, dpo_s, f("dpo_seconds")),
                ("sampling", sample_tokens, sample_s, torch_sample_s),
            ]
            .into_iter()
            .enumerate()
            {
                let ratio = theirs / ours;
                ratios[i].push(ratio);
                println!(
                    "  {what}: engine {:.0} tokens/s, torch {:.0}  ->  engine / torch = {ratio:.2}x",
                    tokens / ours,
                    tokens / theirs
                );
            }
        }
        for (what, r) in ["sft", "dpo", "sampling"].iter().zip(&mut ratios) {
            r.sort_by(f64::total_cmp);
            println!(
                "{what} ratio over {runs} run(s): min {:.2}x, max {:.2}x",
                r[0],
                r[r.len() - 1]
            );
        }
    }
}
