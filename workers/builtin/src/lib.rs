//! The worker backend `builtin`: campaign stages on the builtin engine (`flywheel-engine`), with
//! the params the stage contract declares for it.
//!
//! Inputs and outputs go through the artifact store: datasets as JSONL (TRL formats), models as
//! checkpoint directories (`config.json` + `model.safetensors`) whose content hash covers both.

use std::collections::HashSet;
use std::path::Path;

use candle_core::Device;
use candle_nn::VarMap;
use flywheel_proto::stage::{
    BuiltinEvaluate, BuiltinGenerate, BuiltinPreference, BuiltinPrompts, BuiltinScore, BuiltinSft,
    Role, StageKind,
};
use flywheel_proto::v1::ArtifactRef;
use flywheel_worker::artifacts;
use flywheel_worker::datasets::{self, read_jsonl, write_jsonl};
use flywheel_worker::reward_endpoint;
use flywheel_worker::sdg::instructions::{Accuracy, Instruction};
use flywheel_worker::{Backend, Output, Task, TaskContext, TaskError, TaskResult};
use serde_json::{Value, json};

use flywheel_engine::reward;
use flywheel_engine::sample::{SampleConfig, sample};
use flywheel_engine::train::{Pair, PreferenceLoss, PreferenceObjective, TrainConfig};
use flywheel_engine::world::{self, Mix, Split};
use flywheel_engine::{EngineError, checkpoint, eval, jobs};

pub struct BuiltinBackend {
    device: Device,
}

impl BuiltinBackend {
    /// On the GPU when built with `cuda` and one is present, else on the CPU.
    pub fn new() -> Self {
        Self {
            device: flywheel_engine::default_device(),
        }
    }
}

impl Default for BuiltinBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// An engine result as a task's: cancellation stays cancellation, I/O and tensor errors are
/// worth a retry, the rest (bad config, no data, divergence) are not.
trait IntoTask<T> {
    fn task(self) -> Result<T, TaskError>;
}

impl<T> IntoTask<T> for Result<T, EngineError> {
    fn task(self) -> Result<T, TaskError> {
        self.map_err(|e| match e {
            EngineError::Cancelled => TaskError::cancelled(),
            EngineError::Io(..) | EngineError::Tensor(_) => TaskError::retryable(e.to_string()),
            _ => TaskError::permanent(e.to_string()),
        })
    }
}

/// A stable 64-bit seed from text (the campaign id, stage, round, shard).
fn seed_of(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain([0]))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
}

fn model_dir(m: &ArtifactRef) -> Result<std::path::PathBuf, TaskError> {
    Ok(artifacts::verified_dir(&m.uri, &m.content_hash)?)
}

/// The task world's prompt mix from a stage's params.
fn mix(
    subtopics: &Option<Vec<String>>,
    max_difficulty: i64,
    (brackets, quotes): (f64, f64),
    split: Split,
) -> Mix {
    let d = Mix::default();
    Mix {
        subtopics: subtopics.clone().unwrap_or(d.subtopics),
        max_difficulty: max_difficulty.clamp(1, 3) as u32,
        brackets,
        quotes,
        split,
    }
}

/// The verifiable instructions (IFEval's catalog) a task-world prompt asks for.
pub fn world_instructions(prompt: &str) -> Vec<Instruction> {
    match world::Format::of(prompt).1 {
        world::Format::Quotes => vec![Instruction::Quotation],
        _ => Vec::new(),
    }
}

/// The engine's training settings for a training stage's `steps`, `batch_size`, `lr`, `warmup`
/// and (resolved) `seed` params.
pub fn train_config(steps: i64, batch_size: i64, lr: f64, warmup: i64, seed: u64) -> TrainConfig {
    TrainConfig {
        steps: steps as usize,
        batch_size: batch_size as usize,
        lr,
        warmup: warmup as usize,
        seed,
        ..TrainConfig::default()
    }
}

/// A stage's `seed` param, or one derived from its campaign and stage.
fn stage_seed(task: &Task, seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| seed_of(&[&task.assignment.campaign_id, &task.assignment.stage]))
}

fn save_model(
    prefix: &str,
    config: &flywheel_engine::model::ModelConfig,
    varmap: &VarMap,
    parent: &ArtifactRef,
) -> Result<Output, TaskError> {
    let uri = format!("{}/model", prefix.trim_end_matches('/'));
    let dir = artifacts::output_dir(&uri)?;
    checkpoint::save(&dir, config, varmap).task()?;
    let content_hash = artifacts::publish_dir(&dir, &uri)?;
    Ok(Output {
        name: Role::Model.to_string(),
        kind: "model",
        uri,
        content_hash,
        metadata: json!({ "format": "flywheel-builtin", "trained_from": parent.id, "config": config }),
    })
}

/// Saves a trained model and reports it with its training metrics.
fn trained(
    prefix: &str,
    t: &jobs::Trained,
    init: &ArtifactRef,
    records: usize,
    steps: usize,
) -> Result<TaskResult, TaskError> {
    let out = save_model(prefix, &t.config, &t.varmap, init)?;
    let metrics = [
        ("loss".to_string(), t.loss),
        ("records".to_string(), records as f64),
        ("steps".to_string(), steps as f64),
    ]
    .into();
    Ok(TaskResult {
        outputs: vec![out],
        metrics,
    })
}

impl Backend for BuiltinBackend {
    fn name(&self) -> &str {
        "builtin"
    }

    fn run(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let prefix = task.assignment.output_prefix.as_str();
        match task.kind {
            StageKind::SynthesizePrompts => self.synthesize(task, prefix),
            StageKind::Generate => self.generate(task, ctx, prefix),
            StageKind::Score => self.score(task, prefix),
            StageKind::Filter => datasets::filter_stage(task),
            StageKind::Sft => self.sft(task, ctx, prefix),
            StageKind::Preference => self.preference(task, ctx, prefix),
            StageKind::Evaluate => self.evaluate(task, ctx),
            other => Err(TaskError::permanent(format!(
                "the builtin backend does not run {other} stages"
            ))),
        }
    }
}

fn instructions_check(row: &mut Value) -> Result<Option<bool>, TaskError> {
    flywheel_worker::sdg::instructions::check_row(row).map_err(TaskError::permanent)
}

/// Scores rows (`prompt`, `response`) in place with the reward model's five attributes and
/// their weighted sum (`reward`), the task world's verifier overriding correctness where one
/// exists (`verified`) and the instruction checkers after it (`instructions_followed`);
/// `rm_reward` keeps the model's own verdict. Returns how many were verified correct and the
/// sum of the rewards.
pub fn score_rows(
    rm: &flywheel_engine::model::Transformer,
    rows: &mut [Value],
    p: &BuiltinScore,
) -> Result<(usize, f64), TaskError> {
    let weights = reward_endpoint::weights(&p.weights);
    let pairs: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["prompt"].as_str().unwrap_or_default().to_string(),
                r["response"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(p, r)| (p.as_str(), r.as_str()))
        .collect();
    let scores = reward::score(rm, &refs, p.batch_size as usize).task()?;
    let mut verified = 0usize;
    let mut total = 0.0;
    for ((row, (prompt, response)), mut attrs) in rows.iter_mut().zip(&pairs).zip(scores) {
        // The reward model's own verdict, before the checkers override it (for analytics).
        row["rm_reward"] = json!(reward::scalar(&attrs, &weights));
        if p.verifier && world::answer(prompt).is_some() {
            // Ground truth where a verifier exists, as the recipe does; the reward model elsewhere.
            let ok = world::verify(prompt, response);
            attrs[1] = if ok { 4.0 } else { 0.0 };
            verified += ok as usize;
            row["verified"] = json!(ok);
        }
        // Verifiable instructions are judged by their checkers, like the verifier.
        if instructions_check(row)? == Some(false) {
            attrs[1] = 0.0;
        }
        let scalar = reward::scalar(&attrs, &weights);
        total += scalar;
        row["attributes"] = reward_endpoint::attributes_json(attrs.map(f64::from));
        row["reward"] = json!(scalar);
    }
    Ok((verified, total))
}

fn progress_reporter<'a>(
    ctx: &'a TaskContext,
    total: usize,
    what: &'a str,
) -> impl FnMut(usize, f64) -> bool + 'a {
    move |step, loss| {
        if step % 10 == 0 || step + 1 == total {
            ctx.report(
                (step + 1) as f64 / total as f64,
                format!("{what} step {}/{total}", step + 1),
                &[("loss", loss), ("step", step as f64)],
            );
        }
        !ctx.should_stop()
    }
}

impl BuiltinBackend {
    fn synthesize(&self, task: &Task, prefix: &str) -> Result<TaskResult, TaskError> {
        let a = &task.assignment;
        let p: BuiltinPrompts = task.typed()?;
        let seed = p
            .seed
            .unwrap_or_else(|| seed_of(&[&a.campaign_id, "prompts", &a.round_index.to_string()]));
        let (split, id_prefix) = if p.split == "held_out" {
            (Split::HeldOut, "eval-".to_string())
        } else {
            (Split::Train, format!("r{}-", a.round_index))
        };
        let prompts = world::generate(
            seed,
            p.count as usize,
            &mix(
                &p.subtopics,
                p.max_difficulty,
                (p.brackets, p.quotes),
                split,
            ),
            &id_prefix,
            &HashSet::new(),
        );
        // Each prompt carries the answer its verifier accepts, so that a backend without the
        // task world (evaluation through an API) can check answers.
        let split_name = p.split.clone();
        let rows: Vec<Value> = prompts
            .iter()
            .map(|p| {
                let mut row = serde_json::to_value(p).expect("prompt serializes");
                row["reference_answer"] = json!(world::answer(&p.prompt));
                row["split"] = json!(split_name);
                let instructions = world_instructions(&p.prompt);
                if !instructions.is_empty() {
                    row["instructions"] = json!(instructions);
                }
                row
            })
            .collect();
        let out = write_jsonl(prefix, Role::Prompts, "flywheel.prompts", &rows)?;
        Ok(TaskResult {
            outputs: vec![out],
            metrics: [("prompts".to_string(), rows.len() as f64)].into(),
        })
    }

    fn generate(
        &self,
        task: &Task,
        ctx: &TaskContext,
        prefix: &str,
    ) -> Result<TaskResult, TaskError> {
        let a = &task.assignment;
        let p: BuiltinGenerate = task.typed()?;
        // The round's generator, or (on-policy) the model of a training stage it needs.
        let generator = task.input(task.role_param("policy", &p.policy)?)?;
        let model = checkpoint::load_frozen(&model_dir(generator)?, &self.device).task()?;
        let rows = read_jsonl(&task.inputs(Role::Prompts))?;
        let mine: Vec<&Value> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as i32 % a.shard_count.max(1) == a.shard_index)
            .map(|(_, r)| r)
            .collect();
        let prompts: Vec<String> = mine
            .iter()
            .map(|r| r["prompt"].as_str().unwrap_or_default().to_string())
            .collect();
        let k = p.k as usize;
        let cfg = SampleConfig {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            max_tokens: p.max_tokens as usize,
            seed: p.seed.unwrap_or_else(|| {
                seed_of(&[
                    &a.campaign_id,
                    "generate",
                    &a.round_index.to_string(),
                    &a.shard_index.to_string(),
                ])
            }),
            batch_size: p.batch_size as usize,
        };
        let samples = sample(&model, &prompts, k, &cfg, &mut |done, total| {
            ctx.report(
                done.min(total) as f64 / total.max(1) as f64,
                format!("sampled {}/{total}", done.min(total)),
                &[],
            );
            !ctx.should_stop()
        })
        .task()?;
        let mut out = Vec::new();
        let mut tokens = 0usize;
        for (row, responses) in mine.iter().zip(samples) {
            for (s, response) in responses.into_iter().enumerate() {
                tokens += response.len() + 1;
                let mut sample = json!({ "prompt_id": row["id"], "prompt": row["prompt"], "sample": s, "response": response, "generator": generator.id });
                datasets::carry_prompt_fields(row, &mut sample);
                out.push(sample);
            }
        }
        let n = out.len() as f64;
        let file = write_jsonl(prefix, Role::Responses, "flywheel.responses", &out)?;
        Ok(TaskResult {
            outputs: vec![file],
            metrics: [
                ("responses".to_string(), n),
                ("tokens".to_string(), tokens as f64),
            ]
            .into(),
        })
    }

    fn score(&self, task: &Task, prefix: &str) -> Result<TaskResult, TaskError> {
        let rm =
            checkpoint::load_frozen(&model_dir(task.input(Role::Reward)?)?, &self.device).task()?;
        let p: BuiltinScore = task.typed()?;
        let mut rows = read_jsonl(&task.inputs(Role::Responses))?;
        let (verified, total) = score_rows(&rm, &mut rows, &p)?;
        let n = rows.len();
        let out = write_jsonl(prefix, Role::Scores, "flywheel.scores", &rows)?;
        Ok(TaskResult {
            outputs: vec![out],
            metrics: [
                ("records".to_string(), n as f64),
                ("mean_reward".to_string(), total / n.max(1) as f64),
                (
                    "verified_fraction".to_string(),
                    verified as f64 / n.max(1) as f64,
                ),
            ]
            .into(),
        })
    }

    fn sft(&self, task: &Task, ctx: &TaskContext, prefix: &str) -> Result<TaskResult, TaskError> {
        let p: BuiltinSft = task.typed()?;
        let init = task.input(task.role_param("init", &p.init)?)?;
        let data: Vec<(String, String)> = read_jsonl(&task.inputs(Role::Sft))?
            .iter()
            .filter_map(datasets::sft_example)
            .collect();
        let cfg = train_config(
            p.steps,
            p.batch_size,
            p.lr,
            p.warmup,
            stage_seed(task, p.seed),
        );
        let t = jobs::fine_tune(
            &model_dir(init)?,
            jobs::Objective::Sft(&data),
            &cfg,
            &self.device,
            &mut progress_reporter(ctx, cfg.steps, "sft"),
        )
        .task()?;
        trained(prefix, &t, init, data.len(), cfg.steps)
    }

    fn preference(
        &self,
        task: &Task,
        ctx: &TaskContext,
        prefix: &str,
    ) -> Result<TaskResult, TaskError> {
        let init = task.input(Role::Model)?;
        let dir = model_dir(init)?;
        let pairs: Vec<Pair> = read_jsonl(&task.inputs(Role::Pairs))?
            .iter()
            .filter_map(Pair::from_row)
            .collect();
        let p: BuiltinPreference = task.typed()?;
        let loss_kind = match p.algorithm.as_deref() {
            Some("dpo") => PreferenceLoss::Dpo,
            Some("rpo") => PreferenceLoss::Rpo {
                eta: p.eta.unwrap_or(1.0),
            },
            other => {
                return Err(TaskError::permanent(format!(
                    "stage {}: params.algorithm {other:?} must be dpo or rpo",
                    task.assignment.stage
                )));
            }
        };
        let cfg = train_config(
            p.steps,
            p.batch_size,
            p.lr,
            p.warmup,
            stage_seed(task, p.seed),
        );
        // The reference, frozen: the starting policy itself, or the round's generator.
        let reference = match p.reference.as_str() {
            "generator" => task.input(Role::Generator)?,
            _ => init,
        };
        let t = jobs::fine_tune(
            &dir,
            jobs::Objective::Preference {
                reference: &model_dir(reference)?,
                pairs: &pairs,
                objective: PreferenceObjective {
                    loss: loss_kind,
                    beta: p.beta,
                    sft_weight: p.sft_weight,
                },
            },
            &cfg,
            &self.device,
            &mut progress_reporter(ctx, cfg.steps, "preference"),
        )
        .task()?;
        let mut result = trained(prefix, &t, init, pairs.len(), cfg.steps)?;
        result.outputs[0].metadata["reference"] =
            json!({ "id": reference.id, "content_hash": reference.content_hash });
        Ok(result)
    }

    fn evaluate(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let candidate =
            checkpoint::load_frozen(&model_dir(task.input(Role::Model)?)?, &self.device).task()?;
        let generator =
            checkpoint::load_frozen(&model_dir(task.input(Role::Generator)?)?, &self.device)
                .task()?;
        let rm =
            checkpoint::load_frozen(&model_dir(task.input(Role::Reward)?)?, &self.device).task()?;
        let p: BuiltinEvaluate = task.typed()?;
        let prompts: Vec<String> = world::generate(
            p.seed,
            p.prompts as usize,
            &mix(
                &p.subtopics,
                p.max_difficulty,
                (p.brackets, p.quotes),
                Split::HeldOut,
            ),
            "eval-",
            &HashSet::new(),
        )
        .into_iter()
        .map(|p| p.prompt)
        .collect();
        ctx.checkpoint()?;
        let cand = eval::answers(&candidate, &prompts).task()?;
        ctx.report(0.5, "candidate evaluated", &[]);
        ctx.checkpoint()?;
        let gen_answers = eval::answers(&generator, &prompts).task()?;
        let verifier = p.verifier;
        let cand_rewards = eval::rewards(
            &rm,
            &prompts,
            &cand,
            verifier,
            &reward_endpoint::DEFAULT_WEIGHTS,
        )
        .task()?;
        let gen_rewards = eval::rewards(
            &rm,
            &prompts,
            &gen_answers,
            verifier,
            &reward_endpoint::DEFAULT_WEIGHTS,
        )
        .task()?;
        // The win rate's bootstrap 95% interval over the prompts, as the openai evaluation
        // reports it (gates can use its bounds: evaluate.win_rate.lower).
        let (win_rate, win_low, win_high) = flywheel_worker::openai::bootstrap_mean(
            &eval::win_scores(&cand_rewards, &gen_rewards),
            1000,
            p.seed,
        );
        let accuracy = eval::accuracy(&prompts, &cand);
        let generator_accuracy = eval::accuracy(&prompts, &gen_answers);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        // IFEval's accuracies over the prompts with instructions (the quoted ones).
        let instructions: Vec<Vec<Instruction>> =
            prompts.iter().map(|p| world_instructions(p)).collect();
        let mut metrics: std::collections::HashMap<String, f64> =
            Accuracy::metrics_of(&instructions, &cand, "")
                .into_iter()
                .chain(Accuracy::metrics_of(
                    &instructions,
                    &gen_answers,
                    "generator_",
                ))
                .collect();
        metrics.extend([
            ("accuracy".to_string(), accuracy),
            ("generator_accuracy".to_string(), generator_accuracy),
            ("accuracy_gain".to_string(), accuracy - generator_accuracy),
            ("mean_reward".to_string(), mean(&cand_rewards)),
            ("generator_mean_reward".to_string(), mean(&gen_rewards)),
            ("win_rate".to_string(), win_rate),
            ("win_rate_ci_low".to_string(), win_low),
            ("win_rate_ci_high".to_string(), win_high),
            ("prompts".to_string(), prompts.len() as f64),
        ]);
        Ok(TaskResult {
            outputs: Vec::new(),
            metrics,
        })
    }
}

/// Writes a model checkpoint to `dir` and returns its content hash (used to bootstrap models
/// outside a campaign, e.g. by the demo).
pub fn save_checkpoint(
    dir: &Path,
    config: &flywheel_engine::model::ModelConfig,
    varmap: &VarMap,
) -> Result<String, EngineError> {
    checkpoint::save(dir, config, varmap)?;
    artifacts::hash_dir(dir).map_err(|e| EngineError::Checkpoint(e.to_string()))
}
