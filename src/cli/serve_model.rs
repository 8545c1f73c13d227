//! `flywheel serve-model`: a builtin checkpoint behind an OpenAI-compatible HTTP API
//! (`/v1/models`, `/v1/chat/completions`, `/v1/completions`), so that a promoted model can be
//! tried with standard clients and the `openai` backend can be tested against a real server.
//!
//! Sampling parameters: `n`, `temperature`, `top_p`, `top_k` (an extension), `max_tokens`,
//! `seed`, `stop`; `stream: true` is refused (answers come whole). The model is single-turn: a
//! chat request is answered to its last user message (system and earlier turns are not seen), a
//! completion request treats `prompt` as the user turn.
//! Requests are served one at a time on blocking threads; choices of one request are sampled in
//! one batch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flywheel_engine::model::Transformer;
use flywheel_engine::sample::{SampleConfig, sample_ids};
use flywheel_engine::tokenizer::{END, decode, encode_prompt};
use serde_json::{Value, json};
use tokio::sync::Mutex;

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
}

struct Served {
    name: String,
    model: Arc<Transformer>,
    created: u64,
    /// One sampling job at a time: the engine uses every core for one batch.
    busy: Mutex<()>,
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
    let device = flywheel_engine::default_device();
    let model = flywheel_engine::checkpoint::load_frozen(&a.model, &device)
        .with_context(|| format!("cannot load the checkpoint in {}", a.model.display()))?;
    let name = a.name.unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "flywheel-model".into())
    });
    let state = Arc::new(Served {
        name,
        model: Arc::new(model),
        created: now(),
        busy: Mutex::new(()),
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(a.addr)
        .await
        .with_context(|| format!("cannot listen on {}", a.addr))?;
    let bound = listener.local_addr()?;
    if let Some(f) = &a.addr_file {
        super::common::write_atomically(f, &bound.to_string())?;
    }
    eprintln!(
        "serving model {:?} at http://{bound}/v1 (OpenAI-compatible)",
        state.name
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn models(State(s): State<Arc<Served>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [
        { "id": s.name, "object": "model", "created": s.created, "owned_by": "flywheel" },
    ] }))
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
    let max_seq = s.model.config.max_seq as f64;
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
) -> Result<Vec<Vec<Choice>>, ApiError> {
    let context = s.model.config.max_seq;
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
    let _turn = s.busy.lock().await;
    let model = s.model.clone();
    let cfg = req.cfg.clone();
    let n = req.n;
    let ids = tokio::task::spawn_blocking(move || {
        sample_ids(&model, &prompts, n, &cfg, &mut |_, _| true)
    })
    .await
    .map_err(|e| server_error(e.to_string()))?
    .map_err(|e| server_error(e.to_string()))?;
    Ok(ids
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
        .collect())
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
    let choices = generate(&s, vec![prompt], &req, "messages")
        .await?
        .remove(0);
    let completion_tokens = choices.iter().map(|c| c.tokens).sum();
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": now(),
        "model": s.name,
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
    let per_prompt = generate(&s, prompts, &req, "prompt").await?;
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
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })))
}
