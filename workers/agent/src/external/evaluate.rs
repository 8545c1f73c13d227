//! `evaluate` stages on the external backend: an evaluation harness (lm-evaluation-harness's
//! `lm_eval`, or a command) run against a serve stage's endpoint, its results JSON turned into
//! stage metrics that promotion gates can name (`evaluate.ifeval.prompt_level_strict_acc`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use flywheel_proto::stage::ExternalEvaluate;

use super::templates::render;
use crate::backend::{Task, TaskContext, TaskError, TaskResult};

/// `lm_eval` against an OpenAI-compatible chat endpoint, as its README documents it.
pub const LM_EVAL: &[&str] = &[
    "lm_eval",
    "--model",
    "local-chat-completions",
    "--apply_chat_template",
    "--tasks",
    "{tasks}",
    "--model_args",
    "model={served_name},base_url={base_url}/chat/completions,num_concurrent={concurrency},max_retries=3,tokenized_requests=False",
    "--output_path",
    "{output_dir}",
];

pub(super) fn evaluate(
    task: &Task,
    ctx: &TaskContext,
    work: &Path,
) -> Result<TaskResult, TaskError> {
    let stage = &task.assignment.stage;
    let p: ExternalEvaluate = task.typed()?;
    let name = p.endpoint.as_deref().ok_or_else(|| {
        TaskError::permanent(format!("stage {stage}: params.endpoint is required"))
    })?;
    let endpoint = task.endpoint(name)?;
    let output_dir = work.join("results");
    std::fs::create_dir_all(&output_dir).map_err(|e| {
        TaskError::retryable(format!("cannot create {}: {e}", output_dir.display()))
    })?;
    let mut values = BTreeMap::new();
    values.insert("served_name".to_string(), endpoint.served_name.clone());
    values.insert(
        "base_url".to_string(),
        endpoint.url.trim_end_matches('/').to_string(),
    );
    values.insert("tasks".to_string(), p.tasks.join(","));
    values.insert("output_dir".to_string(), output_dir.display().to_string());
    values.insert("concurrency".to_string(), p.concurrency.to_string());
    let command: Vec<String> = match &p.command {
        Some(args) => args.iter().map(|a| a.0.clone()).collect(),
        None => {
            let mut args: Vec<String> = LM_EVAL.iter().map(|a| a.to_string()).collect();
            if let Some(n) = p.limit {
                args.extend(["--limit".to_string(), n.to_string()]);
            }
            if let Some(n) = p.num_fewshot {
                args.extend(["--num_fewshot".to_string(), n.to_string()]);
            }
            if let Some(path) = &p.include_path {
                args.extend(["--include_path".to_string(), path.clone()]);
            }
            args.extend(p.extra_args.iter().flatten().map(|a| a.0.clone()));
            args
        }
    };
    let argv = render(&command, &values)
        .map_err(|e| TaskError::permanent(format!("stage {stage}: command: {e}")))?;
    let env = super::process_env(&p.env);
    let logged =
        super::process::run_trainer(&argv, &env, work, ctx, super::grace(p.grace_period_s), None)?;
    let results = newest_results(&output_dir).ok_or_else(|| {
        TaskError::permanent(format!(
            "stage {stage}: {:?} exited 0 but wrote no results*.json under {}",
            argv[0],
            output_dir.display()
        ))
    })?;
    let text = std::fs::read_to_string(&results)
        .map_err(|e| TaskError::retryable(format!("cannot read {}: {e}", results.display())))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| {
        TaskError::permanent(format!(
            "stage {stage}: {} is not JSON: {e}",
            results.display()
        ))
    })?;
    let mut metrics: HashMap<String, f64> = lm_eval_metrics(&json).into_iter().collect();
    if metrics.is_empty() {
        return Err(TaskError::permanent(format!(
            "stage {stage}: {} has no numeric results for tasks {:?}",
            results.display(),
            p.tasks
        )));
    }
    for (k, v) in logged {
        metrics.entry(k).or_insert(v);
    }
    Ok(TaskResult {
        outputs: Vec::new(),
        metrics,
    })
}

/// The newest `results*.json` under `dir` (lm_eval writes
/// `<output_path>/<model>/results_<timestamp>.json`).
fn newest_results(dir: &Path) -> Option<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("results") && n.ends_with(".json"))
            {
                let modified = entry.metadata().and_then(|m| m.modified()).ok();
                found.push((modified, path));
            }
        }
    }
    found.into_iter().max().map(|(_, p)| p)
}

/// lm_eval's `results` as metrics: `{"ifeval": {"prompt_level_strict_acc,none": 0.6}}` becomes
/// `ifeval.prompt_level_strict_acc`; a filter other than `none` stays in the name
/// (`gsm8k.exact_match.strict-match`). Non-numbers (`alias`, `"N/A"`) are left out.
pub fn lm_eval_metrics(results: &Value) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Some(tasks) = results["results"].as_object() else {
        return out;
    };
    for (task, values) in tasks {
        let Some(values) = values.as_object() else {
            continue;
        };
        for (key, v) in values {
            let Some(x) = v.as_f64() else { continue };
            let name = match key.split_once(',') {
                Some((metric, "none")) => format!("{task}.{metric}"),
                Some((metric, filter)) => format!("{task}.{metric}.{filter}"),
                None => format!("{task}.{key}"),
            };
            out.insert(name, x);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lm_eval_results_become_gate_metrics() {
        // The shape lm_eval 0.4 writes (results_<timestamp>.json), trimmed.
        let results = json!({
            "results": {
                "ifeval": {
                    "alias": "ifeval",
                    "prompt_level_strict_acc,none": 0.61,
                    "prompt_level_strict_acc_stderr,none": 0.02,
                    "inst_level_strict_acc,none": 0.7,
                    "inst_level_strict_acc_stderr,none": "N/A",
                    "prompt_level_loose_acc,none": 0.65,
                    "inst_level_loose_acc,none": 0.74
                },
                "gsm8k": { "exact_match,strict-match": 0.4, "exact_match,flexible-extract": 0.45 }
            },
            "configs": {}, "versions": {}
        });
        let m = lm_eval_metrics(&results);
        assert_eq!(m["ifeval.prompt_level_strict_acc"], 0.61);
        assert_eq!(m["ifeval.prompt_level_strict_acc_stderr"], 0.02);
        assert_eq!(m["ifeval.inst_level_loose_acc"], 0.74);
        assert_eq!(m["gsm8k.exact_match.strict-match"], 0.4);
        assert!(!m.contains_key("ifeval.alias"));
        assert!(!m.contains_key("ifeval.inst_level_strict_acc_stderr"));
        assert_eq!(m.len(), 7);
    }

    #[test]
    fn the_template_renders_lm_evals_documented_arguments() {
        let mut values = BTreeMap::new();
        for (k, v) in [
            ("served_name", "flywheel-abc"),
            ("base_url", "http://10.0.0.5:8000/v1"),
            ("tasks", "ifeval,gsm8k"),
            ("output_dir", "/work/results"),
            ("concurrency", "8"),
        ] {
            values.insert(k.to_string(), v.to_string());
        }
        let argv: Vec<String> = LM_EVAL.iter().map(|a| a.to_string()).collect();
        let line = render(&argv, &values).unwrap().join(" ");
        assert_eq!(
            line,
            "lm_eval --model local-chat-completions --apply_chat_template --tasks ifeval,gsm8k \
             --model_args model=flywheel-abc,base_url=http://10.0.0.5:8000/v1/chat/completions,num_concurrent=8,max_retries=3,tokenized_requests=False \
             --output_path /work/results"
        );
    }
}
