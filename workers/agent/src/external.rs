//! The `external` backend: `sft` and `preference` stages run by an external trainer process —
//! TRL, NeMo-Aligner, OpenRLHF, or `flywheel train` — from a command template.
//!
//! For each task it exports the stage's datasets in the trainer's format, renders the command
//! (placeholders like `{base_model}`, `{pairs_data}`, `{output_dir}`, `{lr}`), runs it in its own
//! process group, streams its log lines as progress (numbers such as `loss=0.41` or
//! `'loss': 0.41` become progress metrics), stops it on cancellation (SIGTERM to the group, then
//! SIGKILL after `grace_period_s`), fails with the tail of its log when it exits non-zero, and
//! registers the output directory as a model artifact with a content hash.
//!
//! Params: `template` (`trl`, `nemo_aligner`, `openrlhf`, `flywheel`) or `command` (a list of
//! arguments with placeholders), `algorithm` (`dpo` | `rpo` for preference stages), `lr`,
//! `epochs`, `batch_size`, `beta`, `eta`, `steps`, `gpus`, `seed`, `env` (a map of environment
//! variables), `grace_period_s` (default 10), `init` (the input role of the starting model of an
//! `sft` stage, default `base`). Every other scalar param is a placeholder too.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use flywheel_proto::stage::ExternalTrain;

use crate::artifacts;
use crate::backend::{Backend, Output, Task, TaskContext, TaskError, TaskResult};
use crate::datasets::{read_jsonl, to_jsonl};

/// How SFT records are written for a trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SftFormat {
    /// `{"messages": [{"role", "content"}, ...]}` (TRL, OpenRLHF with `--input_key messages`,
    /// `flywheel train`).
    Messages,
    /// NeMo-Aligner chat: `{"system", "mask", "conversations": [{"from", "value"}, ...]}`.
    NemoChat,
}

/// How preference pairs are written for a trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairFormat {
    /// TRL conversational preference: `prompt` (user messages), `chosen` / `rejected`
    /// (assistant messages). OpenRLHF reads the same with `--apply_chat_template`.
    Conversational,
    /// NeMo-Aligner DPO/RPO: templated `prompt`, `chosen_response`, `rejected_response`,
    /// `chosen_reward`, `rejected_reward`.
    NemoAligner,
    /// Strings with rewards: `prompt`, `chosen`, `rejected`, `chosen_reward`, `rejected_reward`
    /// (`flywheel train`).
    Plain,
}

/// A trainer's command lines and dataset formats.
pub struct Template {
    pub name: &'static str,
    pub sft: &'static [&'static str],
    pub preference: &'static [&'static str],
    pub sft_format: SftFormat,
    pub pair_format: PairFormat,
    /// Whether the trainer implements reward-aware RPO (NeMo-Aligner's `rpo_bwd_kl`).
    pub rpo: bool,
}

pub const TEMPLATES: [Template; 4] = [
    Template {
        name: "trl",
        sft: &[
            "trl",
            "sft",
            "--model_name_or_path",
            "{base_model}",
            "--dataset_name",
            "{sft_dir}",
            "--output_dir",
            "{output_dir}",
            "--learning_rate",
            "{lr}",
            "--num_train_epochs",
            "{epochs}",
            "--per_device_train_batch_size",
            "{batch_size}",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ],
        preference: &[
            "trl",
            "dpo",
            "--model_name_or_path",
            "{base_model}",
            "--dataset_name",
            "{pairs_dir}",
            "--output_dir",
            "{output_dir}",
            "--learning_rate",
            "{lr}",
            "--num_train_epochs",
            "{epochs}",
            "--per_device_train_batch_size",
            "{batch_size}",
            "--beta",
            "{beta}",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ],
        sft_format: SftFormat::Messages,
        pair_format: PairFormat::Conversational,
        rpo: false,
    },
    Template {
        name: "nemo_aligner",
        sft: &[
            "python",
            "/opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_sft.py",
            "trainer.num_nodes=1",
            "trainer.devices={gpus}",
            "model.restore_from_path={base_model}",
            "model.data.chat=True",
            "model.data.train_ds.file_path={sft_data}",
            "model.data.validation_ds.file_path={sft_data}",
            "model.optim.lr={lr}",
            "trainer.sft.max_epochs={epochs}",
            "model.global_batch_size={batch_size}",
            "exp_manager.explicit_log_dir={output_dir}",
        ],
        preference: &[
            "python",
            "/opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_dpo.py",
            "trainer.num_nodes=1",
            "trainer.devices={gpus}",
            "pretrained_checkpoint.restore_from_path={base_model}",
            "model.data.data_prefix={train: [{pairs_data}], validation: [{pairs_data}], test: [{pairs_data}]}",
            "++trainer.dpo.max_epochs={epochs}",
            "++model.global_batch_size={batch_size}",
            "++model.optim.lr={lr}",
            "++model.dpo.ref_policy_kl_penalty={beta}",
            "++model.dpo.preference_loss={preference_loss}",
            "++model.dpo.gt_reward_scale={eta}",
            "exp_manager.explicit_log_dir={output_dir}",
        ],
        sft_format: SftFormat::NemoChat,
        pair_format: PairFormat::NemoAligner,
        rpo: true,
    },
    Template {
        name: "openrlhf",
        sft: &[
            "deepspeed",
            "--module",
            "openrlhf.cli.train_sft",
            "--pretrain",
            "{base_model}",
            "--dataset",
            "{sft_data}",
            "--input_key",
            "messages",
            "--apply_chat_template",
            "--save_path",
            "{output_dir}",
            "--learning_rate",
            "{lr}",
            "--max_epochs",
            "{epochs}",
            "--train_batch_size",
            "{batch_size}",
        ],
        preference: &[
            "deepspeed",
            "--module",
            "openrlhf.cli.train_dpo",
            "--pretrain",
            "{base_model}",
            "--ref_pretrain",
            "{ref_model}",
            "--dataset",
            "{pairs_data}",
            "--prompt_key",
            "prompt",
            "--chosen_key",
            "chosen",
            "--rejected_key",
            "rejected",
            "--apply_chat_template",
            "--beta",
            "{beta}",
            "--save_path",
            "{output_dir}",
            "--learning_rate",
            "{lr}",
            "--max_epochs",
            "{epochs}",
            "--train_batch_size",
            "{batch_size}",
        ],
        sft_format: SftFormat::Messages,
        pair_format: PairFormat::Conversational,
        rpo: false,
    },
    Template {
        name: "flywheel",
        sft: &[
            "{flywheel}",
            "train",
            "sft",
            "--model",
            "{base_model}",
            "--data",
            "{sft_data}",
            "--output",
            "{output_dir}",
            "--lr",
            "{lr}",
            "--steps",
            "{steps}",
            "--batch-size",
            "{batch_size}",
            "--seed",
            "{seed}",
        ],
        preference: &[
            "{flywheel}",
            "train",
            "{algorithm}",
            "--model",
            "{base_model}",
            "--reference",
            "{ref_model}",
            "--data",
            "{pairs_data}",
            "--output",
            "{output_dir}",
            "--lr",
            "{lr}",
            "--steps",
            "{steps}",
            "--batch-size",
            "{batch_size}",
            "--beta",
            "{beta}",
            "--eta",
            "{eta}",
            "--seed",
            "{seed}",
        ],
        sft_format: SftFormat::Messages,
        pair_format: PairFormat::Plain,
        rpo: true,
    },
];

pub fn template(name: &str) -> Option<&'static Template> {
    TEMPLATES.iter().find(|t| t.name == name)
}

/// Fills `{name}` placeholders; braces around anything that is not a known-style name (such as
/// Hydra's `{train: [...]}`) are left alone. An unknown placeholder is an error naming it.
pub fn render(args: &[String], values: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    args.iter()
        .map(|arg| {
            let mut out = String::new();
            let mut rest = arg.as_str();
            while let Some(open) = rest.find('{') {
                out.push_str(&rest[..open]);
                let after = &rest[open + 1..];
                let name_len = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                let name = &after[..name_len];
                if !name.is_empty() && after[name_len..].starts_with('}') {
                    let v = values
                        .get(name)
                        .ok_or_else(|| format!("placeholder {{{name}}} has no value"))?;
                    out.push_str(v);
                    rest = &after[name_len + 1..];
                } else {
                    out.push('{');
                    rest = after;
                }
            }
            out.push_str(rest);
            Ok(out)
        })
        .collect()
}

/// Writes SFT records (`{"messages": ...}` rows) in a trainer's format.
pub fn export_sft(rows: &[Value], format: SftFormat) -> Vec<Value> {
    rows.iter()
        .filter_map(|r| r["messages"].as_array())
        .map(|messages| match format {
            SftFormat::Messages => json!({ "messages": messages }),
            SftFormat::NemoChat => json!({
                "system": "",
                "mask": "User",
                "conversations": messages.iter().map(|m| json!({
                    "from": if m["role"] == "assistant" { "Assistant" } else { "User" },
                    "value": m["content"],
                })).collect::<Vec<_>>(),
            }),
        })
        .collect()
}

/// Writes preference pairs (`prompt`, `chosen`, `rejected` strings with rewards) in a trainer's
/// format.
pub fn export_pairs(rows: &[Value], format: PairFormat) -> Vec<Value> {
    let reward = |r: &Value, k: &str, default: f64| r[k].as_f64().unwrap_or(default);
    rows.iter()
        .filter(|r| r["prompt"].is_string() && r["chosen"].is_string() && r["rejected"].is_string())
        .map(|r| match format {
            PairFormat::Conversational => json!({
                "prompt": [{ "role": "user", "content": r["prompt"] }],
                "chosen": [{ "role": "assistant", "content": r["chosen"] }],
                "rejected": [{ "role": "assistant", "content": r["rejected"] }],
            }),
            PairFormat::NemoAligner => json!({
                "prompt": format!(
                    "<extra_id_0>System\n\n<extra_id_1>User\n{}\n<extra_id_1>Assistant\n",
                    r["prompt"].as_str().unwrap_or_default()
                ),
                "chosen_response": format!("{}\n<extra_id_1>", r["chosen"].as_str().unwrap_or_default()),
                "rejected_response": format!("{}\n<extra_id_1>", r["rejected"].as_str().unwrap_or_default()),
                "chosen_reward": reward(r, "chosen_reward", 1.0),
                "rejected_reward": reward(r, "rejected_reward", 0.0),
            }),
            PairFormat::Plain => json!({
                "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                "chosen_reward": reward(r, "chosen_reward", 1.0),
                "rejected_reward": reward(r, "rejected_reward", 0.0),
            }),
        })
        .collect()
}

/// `params.extra_args`, rendered with the template's placeholders: flags a template has no slot
/// for (`--use_cpu true`, a DeepSpeed config, `trainer.precision=32`), appended to its command.
pub fn extra_args(
    p: &ExternalTrain,
    values: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    match (&p.extra_args, &p.command) {
        (None, _) => Ok(Vec::new()),
        (Some(_), Some(_)) => Err(
            "params.extra_args applies to templates; with params.command, put the arguments in the command"
                .into(),
        ),
        (Some(extra), None) => {
            let extra: Vec<String> = extra.iter().map(|a| a.0.clone()).collect();
            render(&extra, values).map_err(|e| format!("extra_args: {e}"))
        }
    }
}

/// What a terminal shows of a log line: the text after its last carriage return (progress bars
/// redraw themselves with `\r`).
fn shown(line: &str) -> &str {
    line.rsplit('\r')
        .find(|s| !s.trim().is_empty())
        .unwrap_or("")
}

fn metric_key(k: &str) -> bool {
    k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/'))
}

fn metric_value(v: &str) -> Option<f64> {
    let v = v.trim().trim_matches(|c| c == '\'' || c == '"');
    v.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Metrics in a trainer's log line, in two shapes only, so that warnings, paths and prose never
/// become metrics:
/// - a logged dict, the whole line `{...}`: transformers/TRL's `{'loss': 1.25, ...}`, with
///   numbers bare or quoted (transformers 5 logs `'loss': '6.243'`), or JSON;
/// - `key=number` words: `flywheel train`'s `step=3 loss=0.41`, Lightning/NeMo bars'
///   `train_loss=0.693,`.
pub fn parse_metrics(line: &str) -> Vec<(String, f64)> {
    let t = shown(line).trim();
    if let Some(inner) = t.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        return inner
            .split(',')
            .filter_map(|pair| {
                let (k, v) = pair.split_once(':')?;
                let k = k.trim().trim_matches(|c| c == '\'' || c == '"');
                Some((k.to_string(), metric_value(v)?)).filter(|_| metric_key(k))
            })
            .collect();
    }
    t.split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '|'))
        .filter_map(|word| {
            let (k, v) = word.split_once('=')?;
            Some((k.to_string(), metric_value(v)?)).filter(|_| metric_key(k))
        })
        .collect()
}

/// A progress bar's `done/total` (tqdm: ` 50%|█████     | 5/10 [00:03<00:03, 1.52it/s]`).
pub fn parse_progress(line: &str) -> Option<f64> {
    let t = shown(line);
    if !t.contains("%|") {
        return None;
    }
    t.split_whitespace().find_map(|w| {
        let (done, total) = w.split_once('/')?;
        let (done, total) = (done.parse::<f64>().ok()?, total.parse::<f64>().ok()?);
        (total > 0.0).then(|| (done / total).clamp(0.0, 1.0))
    })
}

pub struct ExternalTrainerBackend;

impl Backend for ExternalTrainerBackend {
    fn name(&self) -> &str {
        "external"
    }

    fn run(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let kind = task.assignment.kind.as_str();
        if !matches!(kind, "sft" | "preference") {
            return Err(TaskError::permanent(format!(
                "the external backend runs sft and preference stages, not {kind}"
            )));
        }
        let work = std::env::temp_dir().join(format!("flywheel-train-{}", uuid::Uuid::new_v4()));
        let result = train(task, ctx, kind, &work);
        let _ = std::fs::remove_dir_all(&work);
        result
    }
}

fn write_jsonl_file(path: &Path, rows: &[Value]) -> Result<(), TaskError> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))
        .and_then(|_| std::fs::write(path, to_jsonl(rows)))
        .map_err(|e| TaskError::retryable(format!("cannot write {}: {e}", path.display())))
}

fn train(task: &Task, ctx: &TaskContext, kind: &str, work: &Path) -> Result<TaskResult, TaskError> {
    let stage = &task.assignment.stage;
    let p: ExternalTrain = task.typed()?;
    let tpl = match p.template.as_deref() {
        Some(name) => Some(template(name).ok_or_else(|| {
            TaskError::permanent(format!(
                "stage {stage}: params.template {name:?} is not one of {}",
                TEMPLATES.map(|t| t.name).join(", ")
            ))
        })?),
        None => None,
    };
    let algorithm = p.algorithm.as_deref().unwrap_or("dpo");
    if kind == "preference" && algorithm == "rpo" && tpl.is_some_and(|t| !t.rpo) {
        return Err(TaskError::permanent(format!(
            "stage {stage}: template {} has no reward-aware RPO; use nemo_aligner (rpo_bwd_kl) or flywheel",
            tpl.map(|t| t.name).unwrap_or_default()
        )));
    }
    let command: Vec<String> = match (&p.command, tpl) {
        (Some(args), _) => args.iter().map(|a| a.0.clone()).collect(),
        (None, Some(t)) => {
            let args = if kind == "sft" { t.sft } else { t.preference };
            args.iter().map(|s| s.to_string()).collect()
        }
        (None, None) => {
            return Err(TaskError::permanent(format!(
                "stage {stage}: params.template (trl, nemo_aligner, openrlhf, flywheel) or params.command is required"
            )));
        }
    };
    let sft_format = tpl.map_or(SftFormat::Messages, |t| t.sft_format);
    let pair_format = tpl.map_or(PairFormat::Plain, |t| t.pair_format);

    // Inputs: the starting model, the reference, and the datasets in the trainer's format.
    let init_role = if kind == "sft" {
        p.init.as_str()
    } else {
        "model"
    };
    let init = task.input(init_role)?;
    let base_model = artifacts::verified_dir(&init.uri, &init.content_hash)?;
    let reference = match p.reference.as_deref() {
        Some(role) => {
            let r = task.input(role)?;
            artifacts::verified_dir(&r.uri, &r.content_hash)?
        }
        None => base_model.clone(),
    };
    let data_dir = work.join("data");
    let sft_data = data_dir.join("sft/train.jsonl");
    let pairs_data = data_dir.join("pairs/train.jsonl");
    let records = if kind == "sft" {
        let rows = export_sft(&read_jsonl(&task.inputs("sft"))?, sft_format);
        write_jsonl_file(&sft_data, &rows)?;
        rows.len()
    } else {
        let rows = export_pairs(&read_jsonl(&task.inputs("pairs"))?, pair_format);
        write_jsonl_file(&pairs_data, &rows)?;
        rows.len()
    };
    let model_uri = format!(
        "{}/model",
        task.assignment.output_prefix.trim_end_matches('/')
    );
    let output_dir = artifacts::output_dir(&model_uri)?;
    std::fs::create_dir_all(&output_dir).map_err(|e| {
        TaskError::retryable(format!("cannot create {}: {e}", output_dir.display()))
    })?;

    // Placeholders: the declared params (with their defaults), a command's own `vars`, and the
    // paths below.
    let lr = p.lr.unwrap_or(if kind == "sft" { 1e-5 } else { 5e-7 });
    let mut values: BTreeMap<String, String> = p
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in [
        ("lr", lr.to_string()),
        ("epochs", p.epochs.to_string()),
        ("batch_size", p.batch_size.to_string()),
        ("beta", p.beta.to_string()),
        ("eta", p.eta.to_string()),
        ("steps", p.steps.to_string()),
        ("gpus", p.gpus.to_string()),
        ("seed", p.seed.to_string()),
        ("algorithm", algorithm.to_string()),
    ] {
        values.insert(k.to_string(), v);
    }
    let path = |d: &Path| d.display().to_string();
    values.insert("base_model".into(), path(&base_model));
    values.insert("ref_model".into(), path(&reference));
    values.insert("sft_data".into(), path(&sft_data));
    values.insert("sft_dir".into(), path(&data_dir.join("sft")));
    values.insert("pairs_data".into(), path(&pairs_data));
    values.insert("pairs_dir".into(), path(&data_dir.join("pairs")));
    values.insert("data_dir".into(), path(&data_dir));
    values.insert("output_dir".into(), path(&output_dir));
    values.insert(
        "preference_loss".into(),
        if algorithm == "rpo" {
            "rpo_bwd_kl"
        } else {
            "dpo"
        }
        .into(),
    );
    let exe = std::env::current_exe()
        .map(|p| path(&p))
        .unwrap_or_else(|_| "flywheel".into());
    values.insert("flywheel".into(), exe);
    let mut argv = render(&command, &values)
        .map_err(|e| TaskError::permanent(format!("stage {stage}: command: {e}")))?;
    argv.extend(
        extra_args(&p, &values).map_err(|e| TaskError::permanent(format!("stage {stage}: {e}")))?,
    );

    let env: Vec<(String, String)> = p
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    let grace = Duration::from_secs(p.grace_period_s.max(0) as u64);
    let total_steps = values["steps"].parse::<f64>().ok();
    let metrics = run_trainer(&argv, &env, work, ctx, grace, total_steps)?;

    let empty = std::fs::read_dir(&output_dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if empty {
        return Err(TaskError::permanent(format!(
            "trainer {:?} exited 0 but wrote nothing to {}",
            argv[0],
            output_dir.display()
        )));
    }
    let content_hash = artifacts::publish_dir(&output_dir, &model_uri)?;
    let mut result_metrics: std::collections::HashMap<String, f64> = metrics.into_iter().collect();
    result_metrics.insert("records".into(), records as f64);
    Ok(TaskResult {
        outputs: vec![Output {
            name: "model".into(),
            kind: "model",
            uri: model_uri,
            content_hash,
            metadata: json!({
                "format": tpl.map_or("custom", |t| t.name),
                "trained_from": init.id,
                "trainer": argv[0],
            }),
        }],
        metrics: result_metrics,
    })
}

/// Log lines kept for the error message of a failed trainer.
const TAIL_LINES: usize = 30;

/// Runs the trainer, streaming its output as progress; returns the last value of every metric
/// it logged.
fn run_trainer(
    argv: &[String],
    env: &[(String, String)],
    cwd: &Path,
    ctx: &TaskContext,
    grace: Duration,
    total_steps: Option<f64>,
) -> Result<BTreeMap<String, f64>, TaskError> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(cwd)
        .map_err(|e| TaskError::retryable(format!("cannot create {}: {e}", cwd.display())))?;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a stop reaches launchers' children (deepspeed, torchrun).
        .process_group(0)
        .spawn()
        .map_err(|e| TaskError::permanent(format!("cannot start trainer {:?}: {e}", argv[0])))?;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
    // The trainer's own progress bar, where it logs no step count.
    let mut bar = 0.0;
    let mut streams_open = true;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                for (k, v) in parse_metrics(&line) {
                    metrics.insert(k, v);
                }
                if let Some(f) = parse_progress(&line) {
                    bar = f;
                }
                let fraction = match (metrics.get("step"), total_steps) {
                    (Some(step), Some(total)) if total > 0.0 => (step + 1.0) / total,
                    _ => bar,
                };
                let metric_list: Vec<(&str, f64)> =
                    metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                let message: String = shown(&line).chars().take(200).collect();
                ctx.report(fraction, message, &metric_list);
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => streams_open = false,
        }
        if ctx.should_stop() {
            stop(&mut child, grace);
            return Err(TaskError::cancelled());
        }
        if !streams_open {
            break;
        }
    }
    let status = child
        .wait()
        .map_err(|e| TaskError::retryable(format!("waiting for the trainer: {e}")))?;
    if !status.success() {
        let lines: Vec<String> = tail.into_iter().collect();
        return Err(TaskError::retryable(format!(
            "trainer {:?} exited with {status}; last lines of its log:\n{}",
            argv[0],
            lines.join("\n")
        )));
    }
    Ok(metrics)
}

/// SIGTERM to the trainer's process group, then SIGKILL once `grace` has passed.
fn stop(child: &mut Child, grace: Duration) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let group = Pid::from_raw(child.id() as i32);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            // The leader is gone; make sure its children are too.
            let _ = killpg(group, Signal::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<String, String> {
        [
            ("base_model", "/m/base"),
            ("ref_model", "/m/ref"),
            ("sft_data", "/d/sft/train.jsonl"),
            ("sft_dir", "/d/sft"),
            ("pairs_data", "/d/pairs/train.jsonl"),
            ("pairs_dir", "/d/pairs"),
            ("output_dir", "/out"),
            ("lr", "1e-6"),
            ("epochs", "2"),
            ("batch_size", "16"),
            ("beta", "0.1"),
            ("eta", "1.0"),
            ("gpus", "8"),
            ("steps", "50"),
            ("seed", "3"),
            ("algorithm", "rpo"),
            ("preference_loss", "rpo_bwd_kl"),
            ("flywheel", "/bin/flywheel"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn line(name: &str, sft: bool) -> String {
        let t = template(name).unwrap();
        let args: Vec<String> = (if sft { t.sft } else { t.preference })
            .iter()
            .map(|s| s.to_string())
            .collect();
        render(&args, &values()).unwrap().join(" ")
    }

    #[test]
    fn templates_render_each_trainers_documented_arguments() {
        // TRL CLI (`trl sft|dpo`, TrlParser over SFTConfig / DPOConfig / ModelConfig).
        assert_eq!(
            line("trl", true),
            "trl sft --model_name_or_path /m/base --dataset_name /d/sft --output_dir /out --learning_rate 1e-6 --num_train_epochs 2 --per_device_train_batch_size 16 --logging_steps 1 --report_to none"
        );
        assert_eq!(
            line("trl", false),
            "trl dpo --model_name_or_path /m/base --dataset_name /d/pairs --output_dir /out --learning_rate 1e-6 --num_train_epochs 2 --per_device_train_batch_size 16 --beta 0.1 --logging_steps 1 --report_to none"
        );
        // NeMo-Aligner Hydra overrides (docs/user-guide/dpo.rst, conf/gpt_sft.yaml, gpt_dpo.yaml).
        assert_eq!(
            line("nemo_aligner", true),
            "python /opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_sft.py trainer.num_nodes=1 trainer.devices=8 model.restore_from_path=/m/base model.data.chat=True model.data.train_ds.file_path=/d/sft/train.jsonl model.data.validation_ds.file_path=/d/sft/train.jsonl model.optim.lr=1e-6 trainer.sft.max_epochs=2 model.global_batch_size=16 exp_manager.explicit_log_dir=/out"
        );
        assert_eq!(
            line("nemo_aligner", false),
            "python /opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_dpo.py trainer.num_nodes=1 trainer.devices=8 pretrained_checkpoint.restore_from_path=/m/base model.data.data_prefix={train: [/d/pairs/train.jsonl], validation: [/d/pairs/train.jsonl], test: [/d/pairs/train.jsonl]} ++trainer.dpo.max_epochs=2 ++model.global_batch_size=16 ++model.optim.lr=1e-6 ++model.dpo.ref_policy_kl_penalty=0.1 ++model.dpo.preference_loss=rpo_bwd_kl ++model.dpo.gt_reward_scale=1.0 exp_manager.explicit_log_dir=/out"
        );
        // OpenRLHF CLI (openrlhf.cli.train_sft / train_dpo argparse flags).
        assert_eq!(
            line("openrlhf", true),
            "deepspeed --module openrlhf.cli.train_sft --pretrain /m/base --dataset /d/sft/train.jsonl --input_key messages --apply_chat_template --save_path /out --learning_rate 1e-6 --max_epochs 2 --train_batch_size 16"
        );
        assert_eq!(
            line("openrlhf", false),
            "deepspeed --module openrlhf.cli.train_dpo --pretrain /m/base --ref_pretrain /m/ref --dataset /d/pairs/train.jsonl --prompt_key prompt --chosen_key chosen --rejected_key rejected --apply_chat_template --beta 0.1 --save_path /out --learning_rate 1e-6 --max_epochs 2 --train_batch_size 16"
        );
        assert_eq!(
            line("flywheel", false),
            "/bin/flywheel train rpo --model /m/base --reference /m/ref --data /d/pairs/train.jsonl --output /out --lr 1e-6 --steps 50 --batch-size 16 --beta 0.1 --eta 1.0 --seed 3"
        );
        let err = render(&["{nope}".to_string()], &values()).unwrap_err();
        assert_eq!(err, "placeholder {nope} has no value");
    }

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort();
        k
    }

    #[test]
    fn exported_datasets_have_exactly_the_fields_each_trainer_reads() {
        let sft = [json!({ "messages": [
            { "role": "user", "content": "2+2?" }, { "role": "assistant", "content": "4" }
        ], "reward": 3.0 })];
        let pair = [json!({ "prompt": "2+2?", "chosen": "4", "rejected": "5",
            "chosen_reward": 3.5, "rejected_reward": 0.5, "judge": "rm" })];
        // TRL SFTTrainer conversational LM; OpenRLHF --input_key messages.
        let m = &export_sft(&sft, SftFormat::Messages)[0];
        assert_eq!(keys(m), ["messages"]);
        // NeMo-Aligner chat SFT (dummy-sft.jsonl shape).
        let n = &export_sft(&sft, SftFormat::NemoChat)[0];
        assert_eq!(keys(n), ["conversations", "mask", "system"]);
        assert_eq!(
            n["conversations"][1],
            json!({ "from": "Assistant", "value": "4" })
        );
        // TRL DPOTrainer conversational preference; OpenRLHF with --prompt_key prompt.
        let c = &export_pairs(&pair, PairFormat::Conversational)[0];
        assert_eq!(keys(c), ["chosen", "prompt", "rejected"]);
        assert_eq!(
            c["chosen"],
            json!([{ "role": "assistant", "content": "4" }])
        );
        // NeMo-Aligner DPOModelDataset, rewards for RPO.
        let na = &export_pairs(&pair, PairFormat::NemoAligner)[0];
        assert_eq!(
            keys(na),
            [
                "chosen_response",
                "chosen_reward",
                "prompt",
                "rejected_response",
                "rejected_reward"
            ]
        );
        assert_eq!(
            na["prompt"],
            "<extra_id_0>System\n\n<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n"
        );
        assert_eq!(na["chosen_response"], "4\n<extra_id_1>");
        let p = &export_pairs(&pair, PairFormat::Plain)[0];
        assert_eq!(
            keys(p),
            [
                "chosen",
                "chosen_reward",
                "prompt",
                "rejected",
                "rejected_reward"
            ]
        );
    }

    #[test]
    fn log_lines_become_metrics() {
        assert_eq!(
            parse_metrics("{'loss': 1.25, 'grad_norm': 3.0, 'learning_rate': 1e-05, 'epoch': 0.5}"),
            [
                ("loss".to_string(), 1.25),
                ("grad_norm".to_string(), 3.0),
                ("learning_rate".to_string(), 1e-5),
                ("epoch".to_string(), 0.5)
            ]
        );
        assert_eq!(
            parse_metrics("step=3 loss=0.5 note=fine"),
            [("step".to_string(), 3.0), ("loss".to_string(), 0.5)]
        );
        assert!(parse_metrics("Epoch 1/3: training").is_empty());
    }

    #[test]
    fn extra_args_follow_the_rendered_template() {
        let v = values();
        let params: ExternalTrain = serde_json::from_value(json!({ "template": "trl", "extra_args": ["--use_cpu", true, "--bf16", "false", "--output_dir", "{output_dir}"] })).unwrap();
        let mut argv = render(
            &template("trl")
                .unwrap()
                .sft
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
            &v,
        )
        .unwrap();
        argv.extend(extra_args(&params, &v).unwrap());
        let line = argv.join(" ");
        assert!(
            line.ends_with("--use_cpu true --bf16 false --output_dir /out"),
            "{line}"
        );
        assert!(line.starts_with("trl sft"), "{line}");
        let both: ExternalTrain =
            serde_json::from_value(json!({ "command": ["x"], "extra_args": ["y"] })).unwrap();
        assert!(extra_args(&both, &v).is_err());
        assert!(
            extra_args(&ExternalTrain::default(), &v)
                .unwrap()
                .is_empty()
        );
    }

    /// Lines as TRL 1.16 on transformers 5 prints them (`trl sft ... --use_cpu true`): quoted
    /// numbers in the logged dicts, tqdm bars redrawn with `\r`, and warnings with paths.
    #[test]
    fn real_trl_log_lines_become_the_right_metrics_and_progress() {
        let logged = "{'loss': '6.243', 'grad_norm': '12.51', 'learning_rate': '4.5e-05', 'num_tokens': '2048.0', 'mean_token_accuracy': '0.03125', 'epoch': '0.5'}";
        assert_eq!(
            parse_metrics(logged),
            [
                ("loss".to_string(), 6.243),
                ("grad_norm".to_string(), 12.51),
                ("learning_rate".to_string(), 4.5e-5),
                ("num_tokens".to_string(), 2048.0),
                ("mean_token_accuracy".to_string(), 0.03125),
                ("epoch".to_string(), 0.5)
            ]
        );
        let summary = "{'train_runtime': '6.104', 'train_samples_per_second': '3.277', 'train_steps_per_second': '1.638', 'train_loss': '5.912', 'epoch': '1.0'}";
        assert_eq!(parse_metrics(summary).len(), 5);
        for noise in [
            "/usr/local/lib/python3.11/site-packages/trl/scripts/sft.py:1541: UserWarning: You passed a tokenizer with padding_side not equal to right",
            "  warnings.warn(",
            "[2026-11-30 10:02:11,402] [INFO] [real_accelerator.py:203:get_accelerator] Setting ds_accelerator to cpu (auto detect)",
            "Map: 100%|██████████| 64/64 [00:00<00:00, 3210.55 examples/s]",
        ] {
            assert!(
                parse_metrics(noise).is_empty(),
                "{noise}: {:?}",
                parse_metrics(noise)
            );
        }
        let bar = "  0%|          | 0/10 [00:00<?, ?it/s]\r 50%|█████     | 5/10 [00:03<00:03,  1.52it/s]";
        assert_eq!(parse_progress(bar), Some(0.5));
        assert!(parse_metrics(bar).is_empty());
        assert_eq!(parse_progress(logged), None);
        // NeMo/Lightning bars carry metrics as key=value.
        assert_eq!(
            parse_metrics(
                "Epoch 0: 100%|██████████| 10/10 [00:05<00:00, train_loss=0.693, lr=1e-06, v_num=0]"
            ),
            [
                ("train_loss".to_string(), 0.693),
                ("lr".to_string(), 1e-6),
                ("v_num".to_string(), 0.0)
            ]
        );
    }
}
