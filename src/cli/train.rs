//! `flywheel train`: the builtin engine's trainer as a command, so that it can run as an external
//! trainer (the `external` backend's `flywheel` template) or by hand. It logs one
//! `step=N loss=X` line per step on stdout and saves a checkpoint directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flywheel_engine::jobs::{self, Objective};
use flywheel_engine::train::{Pair, PreferenceLoss, PreferenceObjective, TrainConfig};
use serde_json::Value;

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// sft, dpo or rpo.
    #[arg(value_parser = ["sft", "dpo", "rpo"])]
    algorithm: String,
    /// Checkpoint directory to start from (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Frozen reference for dpo/rpo (default: --model).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// JSONL: `{"messages": [...]}` rows for sft; `{"prompt", "chosen", "rejected",
    /// "chosen_reward", "rejected_reward"}` rows for dpo/rpo.
    #[arg(long)]
    data: PathBuf,
    /// Where the trained checkpoint is written.
    #[arg(long)]
    output: PathBuf,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// RPO's reward scale η.
    #[arg(long, default_value_t = 1.0)]
    eta: f64,
    /// Weight of the SFT term on chosen responses (dpo/rpo).
    #[arg(long, default_value_t = 0.1)]
    sft_weight: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    flywheel_worker::datasets::parse_jsonl(&text, &path.display().to_string())
        .map_err(anyhow::Error::msg)
}

pub(crate) fn run(a: TrainArgs) -> Result<()> {
    let sft = a.algorithm == "sft";
    let cfg = TrainConfig {
        steps: a.steps.unwrap_or(if sft { 300 } else { 100 }),
        batch_size: a.batch_size,
        lr: a.lr.unwrap_or(if sft { 3e-3 } else { 1e-3 }),
        warmup: a.warmup,
        seed: a.seed,
        ..TrainConfig::default()
    };
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    if cfg.steps == 0 || cfg.batch_size == 0 {
        bail!("--steps and --batch-size must be at least 1");
    }
    let rows = read_rows(&a.data)?;
    let device = flywheel_engine::default_device();
    let stdout = std::io::stdout();
    let mut progress = |step: usize, loss: f64| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "step={step} loss={loss:.5}");
        let _ = out.flush();
        true
    };
    let sft_data: Vec<(String, String)>;
    let pairs: Vec<Pair>;
    let reference = a.reference.clone().unwrap_or_else(|| a.model.clone());
    let objective = if sft {
        sft_data = rows
            .iter()
            .filter_map(flywheel_worker::datasets::sft_example)
            .collect();
        println!("training sft on {} records", sft_data.len());
        Objective::Sft(&sft_data)
    } else {
        pairs = rows.iter().filter_map(Pair::from_row).collect();
        println!("training {} on {} pairs", a.algorithm, pairs.len());
        Objective::Preference {
            reference: &reference,
            pairs: &pairs,
            objective: PreferenceObjective {
                loss: if a.algorithm == "dpo" {
                    PreferenceLoss::Dpo
                } else {
                    PreferenceLoss::Rpo { eta: a.eta }
                },
                beta: a.beta,
                sft_weight: a.sft_weight,
            },
        }
    };
    let trained = jobs::fine_tune(&a.model, objective, &cfg, &device, &mut progress)?;
    trained.save(&a.output)?;
    println!(
        "done final_loss={:.5} saved to {}",
        trained.loss,
        a.output.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct InitModelArgs {
    /// Where the checkpoint is written.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value = "small", value_parser = ["tiny", "small"])]
    size: String,
    /// Add the 5-attribute reward head (for a reward model).
    #[arg(long)]
    reward_head: bool,
    /// Context length in tokens (bytes), prompt and response together.
    #[arg(long)]
    max_seq: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `flywheel init-model`: a freshly initialised builtin checkpoint (seeded), to start from.
pub(crate) fn init_model(a: InitModelArgs) -> Result<()> {
    use flywheel_engine::model::{ModelConfig, Transformer};
    let mut config = if a.size == "tiny" {
        ModelConfig::tiny()
    } else {
        ModelConfig::small()
    };
    if a.reward_head {
        config = config.with_reward_head();
    }
    if let Some(n) = a.max_seq {
        config.max_seq = n;
    }
    let varmap = candle_nn::VarMap::new();
    Transformer::fresh(
        config.clone(),
        &varmap,
        &flywheel_engine::default_device(),
        a.seed,
    )?;
    flywheel_engine::checkpoint::save(&a.output, &config, &varmap)?;
    println!("{}", a.output.display());
    Ok(())
}
