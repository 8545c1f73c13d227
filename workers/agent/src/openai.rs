//! The `openai` backend: generation and LLM-as-judge through any OpenAI-compatible server
//! (vLLM, SGLang, TensorRT-LLM, NIM, `flywheel serve-model`).
//!
//! - `generate`: K samples per prompt from `/v1/chat/completions` (default) or
//!   `/v1/completions`, either as one request with `n = K` or as K requests (`use_n: false`,
//!   for servers without `n`; sample j gets `seed + j`).
//!   Every response records which weights answered it (`served_by`: the server's
//!   `system_fingerprint`, which `flywheel serve-model` sets to its checkpoint's content hash,
//!   else the model name it answered as), and the dataset's metadata lists them
//!   (`served_hashes`, `served_models`). An answer from weights other than the endpoint's
//!   fails the task: lineage would lie.
//! - `evaluate`: the candidate's endpoint answers held-out prompts (greedy); accuracy by their
//!   reference answers, the generator's too when its endpoint is given, and a win rate of
//!   candidate over generator by a judge endpoint asked in both orders (a split verdict is a
//!   tie), with a bootstrap 95% interval.
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
use crate::http_client::{HttpCaller, http_settings};
use flywheel_proto::stage::{OpenaiEvaluate, OpenaiGenerate, OpenaiJudge, Role, StageKind};
use flywheel_proto::v1::Endpoint;

pub struct OpenAiBackend;

impl Backend for OpenAiBackend {
    fn name(&self) -> &str {
        "openai"
    }

    fn run(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let prefix = task.assignment.output_prefix.as_str();
        match task.kind {
            StageKind::SynthesizePrompts => crate::sdg::pipelines::synthesize(task, ctx, prefix),
            StageKind::Generate => generate(task, ctx, prefix),
            // The contract admits only `method: llm_judge` on this backend.
            StageKind::Filter => judge(task, ctx, prefix),
            StageKind::Evaluate => evaluate(task, ctx, prefix),
            other => Err(TaskError::permanent(format!(
                "the openai backend runs synthesize_prompts, generate, evaluate and filter (method: llm_judge) stages, not {other}"
            ))),
        }
    }
}

/// Sampling settings of one request.
#[derive(Clone)]
pub(crate) struct Sampling {
    pub(crate) url: String,
    chat: bool,
    pub(crate) model: String,
    temperature: f64,
    top_p: f64,
    max_tokens: u64,
}

/// The sampling settings of a params struct that declares them (generate's and the judge's).
macro_rules! sampling {
    ($task:expr, $p:expr, $default_model:expr) => {{
        let server = Server::resolve($task, "endpoint", &$p.endpoint, &$p.base_url)?;
        let model = $p
            .model
            .clone()
            .unwrap_or_else(|| server.default_model(&$default_model));
        let sampling = Sampling::new(
            &server.base,
            &$p.api,
            model,
            $p.temperature,
            $p.top_p,
            $p.max_tokens,
        );
        (server, sampling)
    }};
}

/// Where requests go: a serve stage's endpoint (filled in by the controller) or a literal URL.
pub(crate) struct Server {
    pub(crate) base: String,
    pub(crate) endpoint: Option<Endpoint>,
}

impl Server {
    pub(crate) fn resolve(
        task: &Task,
        param: &str,
        endpoint: &Option<String>,
        base_url: &Option<String>,
    ) -> Result<Self, TaskError> {
        match (endpoint, base_url) {
            (Some(name), _) => {
                let e = task.endpoint(name)?.clone();
                Ok(Self {
                    base: e.url.clone(),
                    endpoint: Some(e),
                })
            }
            (None, Some(url)) if !url.trim().is_empty() => Ok(Self {
                base: url.clone(),
                endpoint: None,
            }),
            _ => Err(TaskError::permanent(format!(
                "stage {}: params.{param} (a serve stage) or params.base_url is required",
                task.assignment.stage
            ))),
        }
    }

    /// The name requests send: the endpoint's served name, else `fallback`.
    pub(crate) fn default_model(&self, fallback: &str) -> String {
        self.endpoint
            .as_ref()
            .map_or_else(|| fallback.to_string(), |e| e.served_name.clone())
    }
}

impl Sampling {
    pub(crate) fn new(
        base_url: &str,
        api: &str,
        model: String,
        temperature: f64,
        top_p: f64,
        max_tokens: i64,
    ) -> Self {
        let base = base_url.trim_end_matches('/');
        let chat = api != "completions";
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
            model,
            temperature,
            top_p,
            max_tokens: max_tokens.max(1) as u64,
        }
    }

    pub(crate) fn body(&self, prompt: &str, n: u64, seed: u64) -> Value {
        self.body_messages(&json!([{ "role": "user", "content": prompt }]), n, seed)
    }

    /// A request continuing a conversation (TRL's `messages`); on `/completions`, the turns
    /// as one text.
    pub(crate) fn body_messages(&self, messages: &Value, n: u64, seed: u64) -> Value {
        let mut body = json!({
            "model": self.model, "n": n, "temperature": self.temperature, "top_p": self.top_p,
            "max_tokens": self.max_tokens, "seed": seed,
        });
        if self.chat {
            body["messages"] = messages.clone();
        } else {
            body["prompt"] = json!(crate::datasets::conversation_text(messages, false));
        }
        body
    }

    /// The generated texts of a response, in choice order.
    pub(crate) fn texts(&self, response: &Value) -> Result<Vec<String>, TaskError> {
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
    let (server, sampling) = sampling!(task, p, generator.name);
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
    // A conversation (`messages`) is sent as it is; a plain prompt as one user turn.
    let prompts: Arc<Vec<Value>> = Arc::new(
        mine.iter()
            .map(|r| match r.get("messages").filter(|m| m.is_array()) {
                Some(m) => m.clone(),
                None => json!([{ "role": "user", "content": r["prompt"] }]),
            })
            .collect(),
    );
    let shared = (caller.clone(), sampling.clone(), Arc::new(requests.clone()));
    let answers = caller.run_all(requests.len(), ctx, "requests", move |i| {
        let (caller, sampling, requests) = shared.clone();
        let prompts = prompts.clone();
        async move {
            let (p, j) = requests[i];
            let n = if use_n { k } else { 1 };
            let body =
                sampling.body_messages(&prompts[p], n, seed.wrapping_add(p as u64 * 1000 + j));
            let response = caller.post_json(&sampling.url, &body).await?;
            caller.stats.add_usage(&response);
            Ok((sampling.texts(&response)?, served_by(&response)))
        }
    })?;
    let weights = Weights::check(task, &server, answers.iter().map(|(_, w)| w))?;
    // The model that answered: the endpoint's, else (a literal URL) the round's generator.
    let answered_by = server
        .endpoint
        .as_ref()
        .map_or_else(|| generator.id.clone(), |e| e.model_id.clone());
    let mut out = Vec::new();
    let mut per_prompt: BTreeMap<usize, u64> = BTreeMap::new();
    for ((p, _), (texts, by)) in requests.iter().zip(answers) {
        for text in texts {
            let sample = per_prompt.entry(*p).or_insert(0);
            let mut row = json!({
                "prompt_id": mine[*p]["id"], "prompt": mine[*p]["prompt"], "sample": *sample,
                "response": text, "generator": answered_by, "model": sampling.model,
                "served_by": by,
            });
            crate::datasets::carry_prompt_fields(&mine[*p], &mut row);
            out.push(row);
            *sample += 1;
        }
    }
    let mut file = write_jsonl(prefix, Role::Responses, "flywheel.responses", &out)?;
    weights.annotate(&mut file.metadata);
    let mut metrics = caller.stats.metric_map();
    metrics.insert("responses".into(), out.len() as f64);
    metrics.insert(
        "weights_verified".into(),
        f64::from(u8::from(weights.verified)),
    );
    Ok(TaskResult {
        outputs: vec![file],
        metrics,
    })
}

/// Sends one request; returns its first choice's text and the weights that answered it.
pub(crate) async fn ask(
    caller: &HttpCaller,
    sampling: &Sampling,
    body: &Value,
) -> Result<(String, String), TaskError> {
    let response = caller.post_json(&sampling.url, body).await?;
    caller.stats.add_usage(&response);
    let text = sampling
        .texts(&response)?
        .into_iter()
        .next()
        .unwrap_or_default();
    Ok((text, served_by(&response)))
}

/// Which weights answered a response: the server's `system_fingerprint` (a content hash, from
/// `flywheel serve-model`), else the model name it answered as.
pub(crate) fn served_by(response: &Value) -> String {
    response["system_fingerprint"]
        .as_str()
        .filter(|f| !f.is_empty())
        .or_else(|| response["model"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// What the servers said about the weights that answered a task's requests.
pub(crate) struct Weights {
    endpoint: Option<Endpoint>,
    pub(crate) hashes: Vec<String>,
    models: Vec<String>,
    /// Every answer came with a content hash, and all were the endpoint's.
    pub(crate) verified: bool,
}

impl Weights {
    /// Refuses answers from weights other than the endpoint's (a swap that did not happen, a
    /// server restarted on another checkpoint): recording them as the endpoint's would lie.
    pub(crate) fn check<'a>(
        task: &Task,
        server: &Server,
        served: impl Iterator<Item = &'a String>,
    ) -> Result<Self, TaskError> {
        let mut hashes = std::collections::BTreeSet::new();
        let mut models = std::collections::BTreeSet::new();
        let mut all_hashed = true;
        for s in served {
            if s.starts_with("sha256:") {
                hashes.insert(s.clone());
            } else {
                all_hashed = false;
                models.insert(s.clone());
            }
        }
        let expected = server.endpoint.as_ref().map(|e| e.content_hash.as_str());
        if let Some(want) = expected.filter(|h| !h.is_empty())
            && let Some(other) = hashes.iter().find(|h| h.as_str() != want)
        {
            return Err(TaskError::permanent(format!(
                "stage {}: the server answered with weights {other}, but endpoint {} serves {want}",
                task.assignment.stage,
                server.endpoint.as_ref().map_or("", |e| e.name.as_str())
            )));
        }
        let verified = all_hashed && !hashes.is_empty() && expected.is_some();
        Ok(Self {
            endpoint: server.endpoint.clone(),
            hashes: hashes.into_iter().collect(),
            models: models.into_iter().collect(),
            verified,
        })
    }

    pub(crate) fn annotate(&self, metadata: &mut Value) {
        metadata["served_hashes"] = json!(self.hashes);
        metadata["served_models"] = json!(self.models);
        metadata["weights_verified"] = json!(self.verified);
        if let Some(e) = &self.endpoint {
            metadata["endpoint"] = json!({
                "name": e.name, "url": e.url, "served_name": e.served_name,
                "model_id": e.model_id, "content_hash": e.content_hash,
            });
        }
    }
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
    let (_, sampling) = sampling!(task, p, generator.name);
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
    let verdicts = judge_both_orders(&caller, ctx, &sampling, &judge_prompt, &candidates)?;
    let (mut pairs, mut sft) = (Vec::new(), Vec::new());
    let mut disagreed = 0;
    for (c, v) in candidates.iter().zip(&verdicts) {
        // First verdict: is x better? Second (order swapped): is y better?
        let winner = match *v {
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

/// A judge's verdicts with x shown first, then with y shown first.
type BothOrders = (Option<bool>, Option<bool>);

/// The judge's verdicts on `(prompt, x, y)` items, asked twice each: with x as answer A, then
/// with y as answer A. Each verdict is `Some(true)` when the judge prefers answer A.
fn judge_both_orders(
    caller: &HttpCaller,
    ctx: &TaskContext,
    sampling: &Sampling,
    template: &str,
    items: &[(String, String, String)],
) -> Result<Vec<BothOrders>, TaskError> {
    let shared = (
        caller.clone(),
        sampling.clone(),
        Arc::new(items.to_vec()),
        Arc::new(template.to_string()),
    );
    let verdicts = caller.run_all(items.len() * 2, ctx, "judgements", move |i| {
        let (caller, sampling, items, template) = shared.clone();
        async move {
            let (prompt, x, y) = &items[i / 2];
            let (a, b) = if i % 2 == 0 { (x, y) } else { (y, x) };
            let text = template
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
    Ok(verdicts.chunks(2).map(|v| (v[0], v[1])).collect())
}

/// The greedy answers of one endpoint to `prompts`, with which weights gave each.
fn answer_all(
    task: &Task,
    caller: &HttpCaller,
    ctx: &TaskContext,
    server: &Server,
    sampling: &Sampling,
    prompts: &Arc<Vec<String>>,
    seed: u64,
) -> Result<(Vec<String>, Weights), TaskError> {
    let shared = (caller.clone(), sampling.clone(), prompts.clone());
    let answers = caller.run_all(prompts.len(), ctx, "answers", move |i| {
        let (caller, sampling, prompts) = shared.clone();
        async move { ask(&caller, &sampling, &sampling.body(&prompts[i], 1, seed)).await }
    })?;
    let weights = Weights::check(task, server, answers.iter().map(|(_, w)| w))?;
    Ok((answers.into_iter().map(|(t, _)| t).collect(), weights))
}

/// A judge's verdicts on (candidate, generator) pairs, asked in both orders: 1 when both
/// prefer the candidate, 0 when both prefer the generator, ½ otherwise (a split or unreadable
/// verdict, or identical answers, which are not sent).
pub fn pairwise_scores(first: &[Option<bool>], swapped: &[Option<bool>]) -> Vec<f64> {
    first
        .iter()
        .zip(swapped)
        .map(|(a, b)| match (a, b) {
            (Some(true), Some(false)) => 1.0,
            (Some(false), Some(true)) => 0.0,
            _ => 0.5,
        })
        .collect()
}

/// The mean of `scores` and its bootstrap 95% percentile interval (`resamples` resamples of
/// the prompts with replacement, seeded).
pub fn bootstrap_mean(scores: &[f64], resamples: usize, seed: u64) -> (f64, f64, f64) {
    let n = scores.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let mean = scores.iter().sum::<f64>() / n as f64;
    // A seeded generator, so that intervals are reproducible.
    let mut rng = crate::sdg::Rng::new(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| scores[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((means.len() - 1) as f64 * q).round() as usize];
    (mean, at(0.025), at(0.975))
}

/// Fraction of answers equal (spaces trimmed) to their prompt's reference answer, over the
/// prompts that have one; `None` when none has.
pub fn reference_accuracy(references: &[Option<String>], answers: &[String]) -> Option<f64> {
    let checked: Vec<bool> = references
        .iter()
        .zip(answers)
        .filter_map(|(r, a)| r.as_ref().map(|r| r == a.trim()))
        .collect();
    (!checked.is_empty())
        .then(|| checked.iter().filter(|ok| **ok).count() as f64 / checked.len() as f64)
}

fn evaluate(task: &Task, ctx: &TaskContext, prefix: &str) -> Result<TaskResult, TaskError> {
    let stage = &task.assignment.stage;
    let p: OpenaiEvaluate = task.typed()?;
    let caller = HttpCaller::new(task, http_settings!(p))?;
    let mut rows = read_jsonl(&task.inputs(Role::Prompts))?;
    if p.prompts > 0 {
        rows.truncate(p.prompts as usize);
    }
    if rows.is_empty() {
        return Err(TaskError::permanent(format!(
            "stage {stage}: no held-out prompts: give it a synthesize_prompts stage (split: held_out) or a prompts dataset in needs"
        )));
    }
    let prompts: Arc<Vec<String>> = Arc::new(
        rows.iter()
            .map(|r| r["prompt"].as_str().unwrap_or_default().to_string())
            .collect(),
    );
    let references: Vec<Option<String>> = rows
        .iter()
        .map(|r| r["reference_answer"].as_str().map(String::from))
        .collect();
    let greedy = |server: &Server| {
        Sampling::new(
            &server.base,
            &p.api,
            server.default_model(""),
            0.0,
            1.0,
            p.max_tokens,
        )
    };
    let candidate = Server::resolve(task, "candidate_endpoint", &p.candidate_endpoint, &None)?;
    let (cand, cand_weights) = answer_all(
        task,
        &caller,
        ctx,
        &candidate,
        &greedy(&candidate),
        &prompts,
        p.seed,
    )?;
    let mut metrics = std::collections::HashMap::new();
    metrics.insert("prompts".to_string(), prompts.len() as f64);
    let verified = references.iter().filter(|r| r.is_some()).count();
    metrics.insert("verified_prompts".to_string(), verified as f64);
    let accuracy = reference_accuracy(&references, &cand);
    if let Some(a) = accuracy {
        metrics.insert("accuracy".to_string(), a);
    }
    // IFEval's accuracies where the prompts carry verifiable instructions.
    let instructions: Vec<Vec<crate::sdg::instructions::Instruction>> = rows
        .iter()
        .map(crate::sdg::instructions::of_row)
        .collect::<Result<_, _>>()
        .map_err(|e| TaskError::permanent(format!("stage {stage}: held-out prompts: {e}")))?;
    let ifeval = |answers: &[String], prefix: &str| {
        crate::sdg::instructions::Accuracy::metrics_of(&instructions, answers, prefix)
    };
    metrics.extend(ifeval(&cand, ""));
    let mut generator_answers = None;
    if p.generator_endpoint.is_some() {
        let server = Server::resolve(task, "generator_endpoint", &p.generator_endpoint, &None)?;
        let (answers, _) = answer_all(
            task,
            &caller,
            ctx,
            &server,
            &greedy(&server),
            &prompts,
            p.seed,
        )?;
        metrics.extend(ifeval(&answers, "generator_"));
        if let (Some(a), Some(g)) = (accuracy, reference_accuracy(&references, &answers)) {
            metrics.insert("generator_accuracy".to_string(), g);
            metrics.insert("accuracy_gain".to_string(), a - g);
        }
        generator_answers = Some(answers);
    }
    let mut scores = Vec::new();
    let judged = p.judge_endpoint.is_some() || p.judge_base_url.is_some();
    if let (true, Some(gen_answers)) = (judged, &generator_answers) {
        let judge = Server::resolve(task, "judge_endpoint", &p.judge_endpoint, &p.judge_base_url)?;
        let model = p
            .judge_model
            .clone()
            .unwrap_or_else(|| judge.default_model(""));
        let sampling = Sampling::new(&judge.base, &p.api, model, 0.0, 1.0, 4);
        let template = p
            .judge_prompt
            .clone()
            .unwrap_or_else(|| JUDGE_PROMPT.to_string());
        // Only prompts whose answers differ are judged: identical answers are a tie.
        let differing: Vec<usize> = (0..prompts.len())
            .filter(|i| cand[*i] != gen_answers[*i])
            .collect();
        let items: Vec<(String, String, String)> = differing
            .iter()
            .map(|&i| (prompts[i].clone(), cand[i].clone(), gen_answers[i].clone()))
            .collect();
        let verdicts = judge_both_orders(&caller, ctx, &sampling, &template, &items)?;
        let (first, swapped): (Vec<_>, Vec<_>) = verdicts.into_iter().unzip();
        let judged = pairwise_scores(&first, &swapped);
        scores = vec![0.5; prompts.len()];
        for (at, s) in differing.iter().zip(judged) {
            scores[*at] = s;
        }
        let (win_rate, lo, hi) = bootstrap_mean(&scores, p.bootstrap as usize, p.seed);
        metrics.insert("win_rate".to_string(), win_rate);
        metrics.insert("win_rate_ci_low".to_string(), lo);
        metrics.insert("win_rate_ci_high".to_string(), hi);
        let count = |v: f64| scores.iter().filter(|s| **s == v).count() as f64;
        metrics.insert("wins".to_string(), count(1.0));
        metrics.insert("losses".to_string(), count(0.0));
        metrics.insert("ties".to_string(), count(0.5));
    }
    metrics.extend(caller.stats.metric_map());
    let out: Vec<Value> = (0..prompts.len())
        .map(|i| {
            json!({
                "prompt_id": rows[i]["id"], "prompt": prompts[i],
                "reference_answer": references[i], "response": cand[i],
                "correct": references[i].as_ref().map(|r| r == cand[i].trim()),
                "generator_response": generator_answers.as_ref().map(|g| &g[i]),
                "score": scores.get(i),
                "instructions_followed": (!instructions[i].is_empty())
                    .then(|| crate::sdg::instructions::Verdict::of(&instructions[i], &cand[i])),
            })
        })
        .collect();
    let mut file = write_jsonl(prefix, Role::Responses, "flywheel.eval", &out)?;
    cand_weights.annotate(&mut file.metadata);
    Ok(TaskResult {
        outputs: vec![file],
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::{bootstrap_mean, pairwise_scores, reference_accuracy, verdict};

    #[test]
    fn pairwise_scores_need_both_orders_to_agree() {
        let first = [Some(true), Some(false), Some(true), None];
        let swapped = [Some(false), Some(true), Some(true), Some(false)];
        assert_eq!(pairwise_scores(&first, &swapped), vec![1.0, 0.0, 0.5, 0.5]);
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean() {
        let scores = [1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 1.0];
        let (mean, lo, hi) = bootstrap_mean(&scores, 2000, 7);
        assert_eq!(mean, 0.6875);
        assert!(lo < mean && mean < hi, "{lo} {mean} {hi}");
        assert!(lo >= 0.0 && hi <= 1.0);
        assert_eq!(bootstrap_mean(&scores, 2000, 7), (mean, lo, hi));
        assert_eq!(bootstrap_mean(&[1.0; 5], 100, 1), (1.0, 1.0, 1.0));
    }

    #[test]
    fn accuracy_counts_only_prompts_with_a_reference() {
        let refs = [Some("4".to_string()), None, Some("[ab]".to_string())];
        let answers = ["4 ".to_string(), "x".to_string(), "ab".to_string()];
        assert_eq!(reference_accuracy(&refs, &answers), Some(0.5));
        assert_eq!(reference_accuracy(&[None], &answers[..1]), None);
    }

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
