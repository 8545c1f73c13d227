//! The `external` backend: `sft` and `preference` stages run by an external trainer process —
//! TRL, NeMo-Aligner, OpenRLHF, or `flywheel train` — from a command template; and `serve`
//! stages, an inference server process (vLLM, SGLang, TRT-LLM, `flywheel serve-model`) or a
//! weight swap on a long-lived one ([`serve`]); and `evaluate` stages, an evaluation harness
//! (`lm_eval`) against a served model ([`evaluate`]).
//!
//! For each task it exports the stage's datasets in the trainer's format ([`export`]), renders
//! the command ([`templates`]: placeholders like `{base_model}`, `{pairs_data}`, `{output_dir}`,
//! `{lr}`), runs it in its own process group and streams its log lines as progress
//! ([`process`], with metrics read by [`logs`]), stops it on cancellation (SIGTERM to the group,
//! then SIGKILL after `grace_period_s`), fails with the tail of its log when it exits non-zero,
//! and registers the output directory as a model artifact with a content hash.
//!
//! Its params are the stage contract's `ExternalTrain` (`docs/params.md`).

pub mod evaluate;
pub mod export;
pub mod logs;
mod process;
pub mod serve;
mod slurm;
pub mod templates;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use flywheel_proto::stage::{ExternalTrain, Role, StageKind};

pub use export::{PairFormat, SftFormat, export_pairs, export_sft};
pub use logs::{parse_metrics, parse_progress};
pub use templates::{TEMPLATES, Template, render, template};

use crate::artifacts;
use crate::backend::{Backend, Output, Task, TaskContext, TaskError, TaskResult};
use crate::datasets::{read_jsonl, to_jsonl};

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

/// A stage's `env` param as a process environment.
fn process_env(vars: &flywheel_proto::stage::Vars) -> Vec<(String, String)> {
    vars.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()
}

/// A stage's `grace_period_s`: how long a stopped process gets between SIGTERM and SIGKILL.
fn grace(seconds: i64) -> Duration {
    Duration::from_secs(seconds.max(0) as u64)
}

pub struct ExternalTrainerBackend;

impl Backend for ExternalTrainerBackend {
    fn name(&self) -> &str {
        "external"
    }

    fn run(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let kind = task.kind;
        if kind == StageKind::Serve {
            return serve::serve(task, ctx);
        }
        if !kind.trains() && kind != StageKind::Evaluate {
            return Err(TaskError::permanent(format!(
                "the external backend runs sft, preference, evaluate and serve stages, not {kind}"
            )));
        }
        let work = std::env::temp_dir().join(format!("flywheel-{kind}-{}", uuid::Uuid::new_v4()));
        let result = if kind == StageKind::Evaluate {
            evaluate::evaluate(task, ctx, &work)
        } else {
            train(task, ctx, kind, &work)
        };
        let _ = std::fs::remove_dir_all(&work);
        result
    }
}

/// Copies the files under `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) -> Result<(), TaskError> {
    let fail = |e: std::io::Error| {
        TaskError::retryable(format!(
            "cannot copy {} to {}: {e}",
            from.display(),
            to.display()
        ))
    };
    std::fs::create_dir_all(to).map_err(fail)?;
    for entry in std::fs::read_dir(from).map_err(fail)? {
        let entry = entry.map_err(fail)?;
        let target = to.join(entry.file_name());
        if entry.file_type().map_err(fail)?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(fail)?;
        }
    }
    Ok(())
}

fn write_jsonl_file(path: &Path, rows: &[Value]) -> Result<(), TaskError> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))
        .and_then(|_| std::fs::write(path, to_jsonl(rows)))
        .map_err(|e| TaskError::retryable(format!("cannot write {}: {e}", path.display())))
}

fn train(
    task: &Task,
    ctx: &TaskContext,
    kind: StageKind,
    work: &Path,
) -> Result<TaskResult, TaskError> {
    let sft = kind == StageKind::Sft;
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
    if !sft && algorithm == "rpo" && tpl.is_some_and(|t| !t.rpo) {
        return Err(TaskError::permanent(format!(
            "stage {stage}: template {} has no reward-aware RPO; use nemo_aligner (rpo_bwd_kl) or flywheel",
            tpl.map(|t| t.name).unwrap_or_default()
        )));
    }
    let command: Vec<String> = match (&p.command, tpl) {
        (Some(args), _) => args.iter().map(|a| a.0.clone()).collect(),
        (None, Some(t)) => {
            let args = if sft { t.sft } else { t.preference };
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
    let init_role = if sft {
        task.role_param("init", &p.init)?
    } else {
        Role::Model
    };
    let init = task.input(init_role)?;
    let base_model = artifacts::verified_dir(&init.uri, &init.content_hash)?;
    let reference = match p.reference.as_deref() {
        Some(role) => {
            let r = task.input(task.role_param("reference", role)?)?;
            artifacts::verified_dir(&r.uri, &r.content_hash)?
        }
        None => base_model.clone(),
    };
    let data_dir = work.join("data");
    let sft_data = data_dir.join("sft/train.jsonl");
    let pairs_data = data_dir.join("pairs/train.jsonl");
    let records = if sft {
        let rows = export_sft(&read_jsonl(&task.inputs(Role::Sft))?, sft_format);
        write_jsonl_file(&sft_data, &rows)?;
        rows.len()
    } else {
        let rows = export_pairs(&read_jsonl(&task.inputs(Role::Pairs))?, pair_format);
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
    let lr = p.lr.unwrap_or(if sft { 1e-5 } else { 5e-7 });
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
        ("nodes", p.nodes.to_string()),
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
    // The contract refuses `vars` that reuse these names; keep its list and this map in step.
    debug_assert!(
        values
            .keys()
            .filter(|k| !p.vars.contains_key(*k))
            .all(|k| flywheel_proto::stage::EXTERNAL_PLACEHOLDERS.contains(&k.as_str())),
        "a placeholder the backend fills is missing from stage::EXTERNAL_PLACEHOLDERS"
    );
    let mut argv = render(&command, &values)
        .map_err(|e| TaskError::permanent(format!("stage {stage}: command: {e}")))?;
    argv.extend(
        extra_args(&p, &values).map_err(|e| TaskError::permanent(format!("stage {stage}: {e}")))?,
    );

    let total_steps = values["steps"].parse::<f64>().ok();
    let env = process_env(&p.env);
    let metrics = if p.executor == "slurm" {
        let job = slurm::JobSpec {
            name: format!("flywheel-{}", task.assignment.task_id),
            argv: &argv,
            env: &env,
            work,
            comment: output_dir.display().to_string(),
            mounts: &[&output_dir],
        };
        let (metrics, written) = slurm::run_job(&job, &p, ctx, total_steps)?;
        // A job re-attached to wrote its model where the attempt that submitted it said: this
        // attempt publishes it under its own prefix.
        if written != output_dir {
            copy_dir(&written, &output_dir)?;
        }
        metrics
    } else {
        process::run_trainer(&argv, &env, work, ctx, grace(p.grace_period_s), total_steps)?
    };

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
            name: Role::Model.to_string(),
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

#[cfg(test)]
mod tests;
