//! `flywheel serve-model`: a builtin checkpoint behind an OpenAI-compatible HTTP API
//! (`/v1/models`, `/v1/chat/completions`, `/v1/completions`), so that a promoted model can be
//! tried with standard clients and the `openai` backend can be tested against a real server.
//!
//! Sampling parameters: `n`, `temperature`, `top_p`, `top_k` (an extension), `max_tokens`,
//! `seed`, `stop`; `stream: true` is refused (answers come whole). The model is single-turn: a
//! chat request is answered to its last user message (system and earlier turns are not seen), a
//! completion request treats `prompt` as the user turn.
//!
//! Requests in flight are batched: one sampling thread takes every request waiting (up to
//! `--max-batch` sequences) into one KV-cached batch, each sequence with its request's own
//! settings, so that 64 concurrent clients get the engine's batched speed (dynamic batching:
//! a request that arrives during a batch joins the next one).
//!
//! Which weights answer: `/v1/models` lists the checkpoint's content hash (`content_hash`, the
//! artifact store's directory hash), and every response carries the hash of the weights that
//! produced it as `system_fingerprint`. `POST /update_weights_from_disk {"model_path": ...}`
//! (SGLang's API) loads another checkpoint in place; requests already batched finish on the
//! old weights, later ones use the new.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flywheel_engine::model::Transformer;
use flywheel_engine::sample::{Row, SampleConfig, sample_rows};
use flywheel_engine::tokenizer::{END, decode, encode_prompt};
use serde_json::{Value, json};
use tokio::sync::oneshot;

#[derive(clap::Args)]
pub(crate) struct ServeModelArgs {
    /// Checkpoint directory (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The model id clients ask for (default: the directory's name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Write the bound address here once listening (useful with port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Most sequences sampled together in one batch.
    #[arg(long, default_value_t = 128)]
    max_batch: usize,
}

/// A loaded checkpoint and the content hash of its directory.
struct Weights {
    model: Arc<Transformer>,
    hash: String,
    path: PathBuf,
}

struct Served {
    name: String,
    created: u64,
    weights: RwLock<Arc<Weights>>,
    /// Requests waiting for the sampling thread.
    jobs: mpsc::Sender<Job>,
}

impl Served {
    fn weights(&self) -> Arc<Weights> {
        self.weights.read().expect("weights").clone()
    }
}

/// Token ids per prompt and sample, and the hash of the weights that produced them.
type Sampled = (Vec<Vec<Vec<u32>>>, String);

/// One request's sampling work: `n` samples of each prompt.
struct Job {
    prompts: Vec<String>,
    n: usize,
    cfg: SampleConfig,
    reply: oneshot::Sender<Result<Sampled, String>>,
}

fn load(path: &Path) -> Result<Weights> {
    let device = flywheel_engine::default_device();
    let model = flywheel_engine::checkpoint::load_frozen(path, &device)
        .with_context(|| format!("cannot load the checkpoint in {}", path.display()))?;
    let hash = flywheel_worker::artifacts::hash_dir(path)
        .with_context(|| format!("cannot hash {}", path.display()))?;
    Ok(Weights {
        model: Arc::new(model),
        hash,
        path: path.to_path_buf(),
    })
}

/// The longest a batch waits for the clients of the last one.
const MAX_GATHER: std::time::Duration = std::time::Duration::from_millis(50);

/// The sampling thread: takes every waiting job (up to `max_batch` sequences) into one batch
/// on the current weights, and answers each job with its share.
fn batcher(served: Arc<Served>, jobs: mpsc::Receiver<Job>, max_batch: usize) {
    // After a batch of several requests, their clients send the next ones within moments: wait
    // until as many as the last batch had are back (or a full batch), for at most half the time
    // that batch took, rather than start a small batch or idle. A lone client never waits.
    let mut last_jobs = 0;
    let mut last_took = std::time::Duration::ZERO;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        let mut rows = batch[0].prompts.len() * batch[0].n;
        let deadline = std::time::Instant::now() + (last_took / 2).min(MAX_GATHER);
        while rows < max_batch {
            let waited_for = last_jobs > 1 && batch.len() < last_jobs;
            let next = match waited_for {
                true => {
                    jobs.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                }
                // Whatever else is already waiting joins too.
                false => jobs.try_recv().map_err(|_| mpsc::RecvTimeoutError::Timeout),
            };
            match next {
                Ok(j) => {
                    rows += j.prompts.len() * j.n;
                    batch.push(j);
                }
                Err(_) => break,
            }
        }
        let began = std::time::Instant::now();
        last_jobs = batch.len();
        let weights = served.weights();
        let mut seqs = Vec::with_capacity(rows);
        for (b, job) in batch.iter().enumerate() {
            for (i, prompt) in job.prompts.iter().enumerate() {
                for j in 0..job.n {
                    seqs.push((b, i, j, prompt.as_str()));
                }
            }
        }
        let mut engine_rows: Vec<Row> = seqs
            .iter()
            .map(|(b, i, j, prompt)| Row {
                prompt,
                cfg: &batch[*b].cfg,
                rng: Row::rng_of(batch[*b].cfg.seed, *i, *j),
            })
            .collect();
        let result = sample_rows(&weights.model, &mut engine_rows).map_err(|e| e.to_string());
        let mut outs: Vec<Vec<Vec<Vec<u32>>>> = batch
            .iter()
            .map(|job| vec![vec![Vec::new(); job.n]; job.prompts.len()])
            .collect();
        if let Ok(generated) = &result {
            for ((b, i, j, _), ids) in seqs.iter().zip(generated) {
                outs[*b][*i][*j] = ids.clone();
            }
        }
        last_took = began.elapsed();
        for (job, out) in batch.into_iter().zip(outs) {
            let answer = match &result {
                Ok(_) => Ok((out, weights.hash.clone())),
                Err(e) => Err(e.clone()),
            };
            let _ = job.reply.send(answer);
        }
    }
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::BAD_REQUEST => "invalid_request_error",
            _ => "server_error",
        };
        let body = json!({ "error": {
            "message": self.message, "type": kind, "param": self.param, "code": Value::Null,
        } });
        (self.status, Json(body)).into_response()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) async fn run(a: ServeModelArgs) -> Result<()> {
    let weights = tokio::task::spawn_blocking({
        let path = a.model.clone();
        move || load(&path)
    })
    .await??;
    let name = a.name.unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "flywheel-model".into())
    });
    let (jobs, queue) = mpsc::channel();
    let state = Arc::new(Served {
        name,
        created: now(),
        weights: RwLock::new(Arc::new(weights)),
        jobs,
    });
    std::thread::Builder::new().name("sampler".into()).spawn({
        let state = state.clone();
        let max_batch = a.max_batch.max(1);
        move || batcher(state, queue, max_batch)
    })?;
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/update_weights_from_disk", post(update_weights))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(a.addr)
        .await
        .with_context(|| format!("cannot listen on {}", a.addr))?;
    let bound = listener.local_addr()?;
    if let Some(f) = &a.addr_file {
        super::common::write_atomically(f, &bound.to_string())?;
    }
    eprintln!(
        "serving model {:?} ({}) at http://{bound}/v1 (OpenAI-compatible)",
        state.name,
        state.weights().hash
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    Ok(())
}

async fn models(State(s): State<Arc<Served>>) -> Json<Value> {
    let w = s.weights();
    Json(json!({ "object": "list", "data": [
        { "id": s.name, "object": "model", "created": s.created, "owned_by": "flywheel",
          "root": w.path.display().to_string(), "content_hash": w.hash,
          "max_model_len": w.model.config.max_seq },
    ] }))
}

/// SGLang's `POST /update_weights_from_disk`: loads the checkpoint at `model_path` and serves
/// it from the next batch on. A checkpoint that does not load leaves the old weights serving
/// and answers 400 with `success: false`.
async fn update_weights(
    State(s): State<Arc<Served>>,
    b: Result<Json<Value>, JsonRejection>,
) -> Response {
    let refuse = |status: StatusCode, message: String| {
        (
            status,
            Json(json!({ "success": false, "message": message })),
        )
            .into_response()
    };
    let body = match body_of(b) {
        Ok(b) => b,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.message),
    };
    let Some(path) = body
        .get("model_path")
        .and_then(Value::as_str)
        .map(PathBuf::from)
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "model_path is required: the checkpoint directory to load".into(),
        );
    };
    let loaded = tokio::task::spawn_blocking(move || load(&path)).await;
    match loaded {
        Ok(Ok(w)) => {
            let hash = w.hash.clone();
            *s.weights.write().expect("weights") = Arc::new(w);
            eprintln!("weights updated: now serving {hash}");
            Json(json!({ "success": true, "message": format!("serving {hash}"), "content_hash": hash }))
                .into_response()
        }
        Ok(Err(e)) => refuse(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Sampling settings of a request, validated.
struct Request {
    n: usize,
    cfg: SampleConfig,
    stop: Vec<String>,
}

fn parse(s: &Served, body: &Value) -> Result<Request, ApiError> {
    match body.get("model").and_then(Value::as_str) {
        Some(m) if m == s.name => {}
        Some(m) => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    s.name
                ),
                param: Some("model"),
            });
        }
        None => return Err(ApiError::invalid("model", "model is required")),
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid(
            "stream",
            "streaming is not supported by this server; send stream: false",
        ));
    }
    let num = |key: &'static str, default: f64, ok: fn(f64) -> bool, what: &str| match body.get(key)
    {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| ok(*x))
            .ok_or_else(|| ApiError::invalid(key, format!("{key} must be {what}"))),
    };
    let n = num(
        "n",
        1.0,
        |x| x.fract() == 0.0 && (1.0..=128.0).contains(&x),
        "an integer from 1 to 128",
    )? as usize;
    let temperature = num(
        "temperature",
        1.0,
        |x| (0.0..=2.0).contains(&x),
        "between 0 and 2",
    )?;
    let top_p = num("top_p", 1.0, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
    let top_k = num(
        "top_k",
        0.0,
        |x| x.fract() == 0.0 && x >= 0.0,
        "a non-negative integer",
    )? as usize;
    let max_seq = s.weights().model.config.max_seq as f64;
    let max_tokens = num(
        "max_tokens",
        64.0_f64.min(max_seq),
        |x| x.fract() == 0.0 && x >= 1.0,
        "a positive integer",
    )? as usize;
    let seed = match body.get("seed") {
        None | Some(Value::Null) => now() ^ 0x9e37_79b9_7f4a_7c15,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::invalid("seed", "seed must be an integer"))?,
    };
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && a.len() <= 4 => a
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect(),
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop must be a string or a list of up to 4 strings",
            ));
        }
    };
    Ok(Request {
        n,
        cfg: SampleConfig {
            temperature,
            top_k,
            top_p,
            max_tokens,
            seed,
            batch_size: 64,
        },
        stop,
    })
}

/// One generated text: the text (cut at a stop string), why it ended, its token count.
struct Choice {
    text: String,
    finish_reason: &'static str,
    tokens: usize,
}

async fn generate(
    s: &Arc<Served>,
    prompts: Vec<String>,
    req: &Request,
    param: &'static str,
) -> Result<(Vec<Vec<Choice>>, String), ApiError> {
    let context = s.weights().model.config.max_seq;
    if let Some(long) = prompts
        .iter()
        .map(|p| encode_prompt(p).len())
        .find(|n| *n >= context)
    {
        return Err(ApiError::invalid(
            param,
            format!("this model's context is {context} tokens; the prompt has {long}"),
        ));
    }
    let (reply, answer) = oneshot::channel();
    s.jobs
        .send(Job {
            prompts,
            n: req.n,
            cfg: req.cfg.clone(),
            reply,
        })
        .map_err(|_| server_error("the sampler has stopped".into()))?;
    let (ids, hash) = answer
        .await
        .map_err(|_| server_error("the sampler has stopped".into()))?
        .map_err(server_error)?;
    let choices = ids
        .into_iter()
        .map(|choices| {
            choices
                .into_iter()
                .map(|ids| {
                    let text = decode(&ids);
                    let ended = ids.last() == Some(&END);
                    let tokens = ids.len();
                    match req
                        .stop
                        .iter()
                        .filter_map(|st| text.find(st.as_str()))
                        .min()
                    {
                        Some(i) => Choice {
                            text: text[..i].to_string(),
                            finish_reason: "stop",
                            tokens,
                        },
                        None => Choice {
                            text,
                            finish_reason: if ended { "stop" } else { "length" },
                            tokens,
                        },
                    }
                })
                .collect()
        })
        .collect();
    Ok((choices, hash))
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        param: None,
    }
}

fn body_of(b: Result<Json<Value>, JsonRejection>) -> Result<Value, ApiError> {
    b.map(|Json(v)| v).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("request body: {}", e.body_text()),
        param: None,
    })
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens })
}

async fn chat(
    State(s): State<Arc<Served>>,
    b: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_of(b)?;
    let req = parse(&s, &body)?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "messages must be a non-empty list"))?;
    let prompt = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .ok_or_else(|| {
            ApiError::invalid(
                "messages",
                "messages must include a user message with text content",
            )
        })?
        .to_string();
    let prompt_tokens = encode_prompt(&prompt).len();
    let (mut per_prompt, hash) = generate(&s, vec![prompt], &req, "messages").await?;
    let choices = per_prompt.remove(0);
    let completion_tokens = choices.iter().map(|c| c.tokens).sum();
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": now(),
        "model": s.name,
        "system_fingerprint": hash,
        "choices": choices.into_iter().enumerate().map(|(i, c)| json!({
            "index": i,
            "message": { "role": "assistant", "content": c.text },
            "logprobs": Value::Null,
            "finish_reason": c.finish_reason,
        })).collect::<Vec<_>>(),
        "usage": usage(prompt_tokens, completion_tokens),
    })))
}

async fn completions(
    State(s): State<Arc<Served>>,
    b: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_of(b)?;
    let req = parse(&s, &body)?;
    let prompts: Vec<String> = match body.get("prompt") {
        Some(Value::String(p)) => vec![p.clone()],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|p| p.as_str().map(String::from))
            .collect(),
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a string or a non-empty list of strings",
            ));
        }
    };
    let prompt_tokens = prompts.iter().map(|p| encode_prompt(p).len()).sum();
    let (per_prompt, hash) = generate(&s, prompts, &req, "prompt").await?;
    let mut completion_tokens = 0;
    let mut choices = Vec::new();
    // OpenAI's order: all choices of prompt 0, then of prompt 1, ...
    for c in per_prompt.into_iter().flatten() {
        completion_tokens += c.tokens;
        choices.push(json!({
            "index": choices.len(), "text": c.text, "logprobs": Value::Null,
            "finish_reason": c.finish_reason,
        }));
    }
    Ok(Json(json!({
        "id": format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "text_completion",
        "created": now(),
        "model": s.name,
        "system_fingerprint": hash,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })))
}
