//! The `openai` backend: generation and LLM-as-judge through any OpenAI-compatible server
//! (vLLM, SGLang, TensorRT-LLM, NIM, `flywheel serve-model`).
//!
//! - `generate`: K samples per prompt from `/v1/chat/completions` (default) or
//!   `/v1/completions`, either as one request with `n = K` or as K requests (`use_n: false`,
//!   for servers without `n`; sample j gets `seed + j`).
//! - `filter` with `method: llm_judge`: the recipe's LLM-as-judge. For each prompt, two distinct
//!   responses are compared twice, with their order swapped; the pair is kept only when both
//!   verdicts agree. Writes `pairs` (TRL preference records) and `sft` (the winners). The judge
//!   is `model` at `base_url` (often another server than the generator's); `judge_prompt`
//!   replaces the default instruction (placeholders `{prompt}`, `{a}`, `{b}`).
//!
//! Params: the stage contract's `OpenaiGenerate` and `OpenaiJudge` (`docs/params.md`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::backend::{Backend, Task, TaskContext, TaskError, TaskResult};
use crate::datasets::{read_jsonl, write_jsonl};
use crate::http_client::{HttpCaller, http_settings, required};
use flywheel_proto::stage::{OpenaiGenerate, OpenaiJudge, Role, StageKind};

pub struct OpenAiBackend;

impl Backend for OpenAiBackend {
    fn name(&self) -> &str {
        "openai"
    }

    fn run(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let prefix = task.assignment.output_prefix.as_str();
        match task.kind {
            StageKind::Generate => generate(task, ctx, prefix),
            // The contract admits only `method: llm_judge` on this backend.
            StageKind::Filter => judge(task, ctx, prefix),
            other => Err(TaskError::permanent(format!(
                "the openai backend runs generate and filter (method: llm_judge) stages, not {other}"
            ))),
        }
    }
}

/// Sampling settings of one request.
#[derive(Clone)]
struct Sampling {
    url: String,
    chat: bool,
    model: String,
    temperature: f64,
    top_p: f64,
    max_tokens: u64,
}

/// The sampling settings of a params struct that declares them (generate's and the judge's).
macro_rules! sampling {
    ($task:expr, $p:expr, $default_model:expr) => {
        Sampling::new(
            required($task, "base_url", &$p.base_url)?,
            &$p.endpoint,
            &$p.model,
            &$default_model,
            $p.temperature,
            $p.top_p,
            $p.max_tokens,
        )
    };
}

impl Sampling {
    fn new(
        base_url: &str,
        endpoint: &str,
        model: &Option<String>,
        default_model: &str,
        temperature: f64,
        top_p: f64,
        max_tokens: i64,
    ) -> Self {
        let base = base_url.trim_end_matches('/');
        let chat = endpoint != "completions";
        Self {
            url: format!(
                "{base}/{}",
                if chat {
                    "chat/completions"
                } else {
                    "completions"
                }
            ),
            chat,
            model: model.clone().unwrap_or_else(|| default_model.to_string()),
            temperature,
            top_p,
            max_tokens: max_tokens.max(1) as u64,
        }
    }

    fn body(&self, prompt: &str, n: u64, seed: u64) -> Value {
        let mut body = json!({
            "model": self.model, "n": n, "temperature": self.temperature, "top_p": self.top_p,
            "max_tokens": self.max_tokens, "seed": seed,
        });
        if self.chat {
            body["messages"] = json!([{ "role": "user", "content": prompt }]);
        } else {
            body["prompt"] = json!(prompt);
        }
        body
    }

    /// The generated texts of a response, in choice order.
    fn texts(&self, response: &Value) -> Result<Vec<String>, TaskError> {
        let choices = response["choices"].as_array().ok_or_else(|| {
            TaskError::retryable(format!("{}: response has no choices", self.url))
        })?;
        let mut sorted: Vec<&Value> = choices.iter().collect();
        sorted.sort_by_key(|c| c["index"].as_u64().unwrap_or(0));
        Ok(sorted
            .into_iter()
            .map(|c| {
                let text = if self.chat {
                    &c["message"]["content"]
                } else {
                    &c["text"]
                };
                text.as_str().unwrap_or_default().to_string()
            })
            .collect())
    }
}

fn generate(task: &Task, ctx: &TaskContext, prefix: &str) -> Result<TaskResult, TaskError> {
    let a = &task.assignment;
    let generator = task.input(Role::Generator)?;
    let p: OpenaiGenerate = task.typed()?;
    let sampling = sampling!(task, p, generator.name);
    let caller = HttpCaller::new(task, http_settings!(p))?;
    let rows = read_jsonl(&task.inputs(Role::Prompts))?;
    let mine: Vec<Value> = rows
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i as i32 % a.shard_count.max(1) == a.shard_index)
        .map(|(_, r)| r)
        .collect();
    let (k, use_n, seed) = (p.k.max(1) as u64, p.use_n, p.seed);
    // One request per prompt with n = k, or one per sample.
    let requests: Vec<(usize, u64)> = (0..mine.len())
        .flat_map(|p| {
            if use_n {
                vec![(p, 0)]
            } else {
                (0..k).map(|j| (p, j)).collect()
            }
        })
        .collect();
    let prompts: Arc<Vec<String>> = Arc::new(
        mine.iter()
            .map(|r| r["prompt"].as_str().unwrap_or_default().to_string())
            .collect(),
    );
    let shared = (caller.clone(), sampling.clone(), Arc::new(requests.clone()));
    let answers = caller.run_all(requests.len(), ctx, "requests", move |i| {
        let (caller, sampling, requests) = shared.clone();
        let prompts = prompts.clone();
        async move {
            let (p, j) = requests[i];
            let n = if use_n { k } else { 1 };
            let body = sampling.body(&prompts[p], n, seed.wrapping_add(p as u64 * 1000 + j));
            let response = caller.post_json(&sampling.url, &body).await?;
            caller.stats.add_usage(&response);
            sampling.texts(&response)
        }
    })?;
    let mut out = Vec::new();
    let mut per_prompt: BTreeMap<usize, u64> = BTreeMap::new();
    for ((p, _), texts) in requests.iter().zip(answers) {
        for text in texts {
            let sample = per_prompt.entry(*p).or_insert(0);
            out.push(json!({
                "prompt_id": mine[*p]["id"], "prompt": mine[*p]["prompt"], "sample": *sample,
                "response": text, "generator": generator.id, "model": sampling.model,
            }));
            *sample += 1;
        }
    }
    let file = write_jsonl(prefix, Role::Responses, "flywheel.responses", &out)?;
    let mut metrics = caller.stats.metric_map();
    metrics.insert("responses".into(), out.len() as f64);
    Ok(TaskResult {
        outputs: vec![file],
        metrics,
    })
}

const JUDGE_PROMPT: &str = "You are comparing two answers to the same request. Reply with the single letter of the better answer: A or B.\n\n[Request]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\nBetter answer (A or B):";

/// `Some(true)` when the judge prefers the first answer shown, `Some(false)` the second, `None`
/// when its reply names neither.
fn verdict(text: &str) -> Option<bool> {
    let t = text.trim().trim_start_matches(['[', '(', '"', '\'', '*']);
    match t.chars().next()?.to_ascii_uppercase() {
        'A' if !t[1..].starts_with(|c: char| c.is_ascii_alphabetic()) => Some(true),
        'B' if !t[1..].starts_with(|c: char| c.is_ascii_alphabetic()) => Some(false),
        _ => None,
    }
}

fn judge(task: &Task, ctx: &TaskContext, prefix: &str) -> Result<TaskResult, TaskError> {
    let generator = task.input(Role::Generator)?;
    let p: OpenaiJudge = task.typed()?;
    let sampling = sampling!(task, p, generator.name);
    let caller = HttpCaller::new(task, http_settings!(p))?;
    let judge_prompt = p
        .judge_prompt
        .clone()
        .unwrap_or_else(|| JUDGE_PROMPT.to_string());
    let mut rows = read_jsonl(&task.inputs(Role::Responses))?;
    if rows.is_empty() {
        rows = read_jsonl(&task.inputs(Role::Scores))?;
    }
    // Per prompt, the first two distinct responses.
    let mut by_prompt: BTreeMap<String, (Value, Vec<String>)> = BTreeMap::new();
    for r in &rows {
        let entry = by_prompt
            .entry(r["prompt_id"].to_string())
            .or_insert_with(|| (r["prompt"].clone(), Vec::new()));
        let response = r["response"].as_str().unwrap_or_default().to_string();
        if entry.1.len() < 2 && !entry.1.contains(&response) {
            entry.1.push(response);
        }
    }
    let candidates: Vec<(String, String, String)> = by_prompt
        .into_values()
        .filter(|(_, r)| r.len() == 2)
        .map(|(p, r)| {
            (
                p.as_str().unwrap_or_default().to_string(),
                r[0].clone(),
                r[1].clone(),
            )
        })
        .collect();
    // Two requests per candidate: (A, B) and (B, A).
    let shared = (
        caller.clone(),
        sampling.clone(),
        Arc::new(candidates.clone()),
        Arc::new(judge_prompt),
    );
    let verdicts = caller.run_all(candidates.len() * 2, ctx, "judgements", move |i| {
        let (caller, sampling, candidates, judge_prompt) = shared.clone();
        async move {
            let (prompt, x, y) = &candidates[i / 2];
            let (a, b) = if i % 2 == 0 { (x, y) } else { (y, x) };
            let text = judge_prompt
                .replace("{prompt}", prompt)
                .replace("{a}", a)
                .replace("{b}", b);
            let response = caller
                .post_json(&sampling.url, &sampling.body(&text, 1, 0))
                .await?;
            caller.stats.add_usage(&response);
            Ok(sampling
                .texts(&response)?
                .into_iter()
                .next()
                .and_then(|t| verdict(&t)))
        }
    })?;
    let (mut pairs, mut sft) = (Vec::new(), Vec::new());
    let mut disagreed = 0;
    for (c, v) in candidates.iter().zip(verdicts.chunks(2)) {
        // First verdict: is x better? Second (order swapped): is y better?
        let winner = match (v[0], v[1]) {
            (Some(true), Some(false)) => Some((&c.1, &c.2)),
            (Some(false), Some(true)) => Some((&c.2, &c.1)),
            _ => None,
        };
        let Some((chosen, rejected)) = winner else {
            disagreed += 1;
            continue;
        };
        pairs.push(json!({
            "prompt": c.0, "chosen": chosen, "rejected": rejected,
            "chosen_reward": 1.0, "rejected_reward": 0.0, "judge": "llm", "judge_model": sampling.model,
        }));
        sft.push(json!({ "messages": [
            { "role": "user", "content": c.0 }, { "role": "assistant", "content": chosen },
        ] }));
    }
    let outputs = vec![
        write_jsonl(prefix, Role::Sft, "trl.messages", &sft)?,
        write_jsonl(prefix, Role::Pairs, "trl.preference", &pairs)?,
    ];
    let mut metrics = caller.stats.metric_map();
    metrics.insert("judged".into(), candidates.len() as f64);
    metrics.insert("pair_records".into(), pairs.len() as f64);
    metrics.insert("sft_records".into(), sft.len() as f64);
    metrics.insert(
        "agreement".into(),
        pairs.len() as f64 / candidates.len().max(1) as f64,
    );
    metrics.insert("disagreed".into(), disagreed as f64);
    Ok(TaskResult { outputs, metrics })
}

#[cfg(test)]
mod tests {
    use super::verdict;

    #[test]
    fn verdicts_are_read_strictly() {
        assert_eq!(verdict("A"), Some(true));
        assert_eq!(verdict(" b."), Some(false));
        assert_eq!(verdict("[A]"), Some(true));
        assert_eq!(verdict("Answer A"), None);
        assert_eq!(verdict("Both"), None);
        assert_eq!(verdict(""), None);
    }
}
