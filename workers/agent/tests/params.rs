//! Every param the stage contract declares for the `openai` and `reward_endpoint` backends
//! changes what the stage does: each stage runs against a local server that records every
//! request, with baseline params and then once per declared param changed, and the requests sent
//! (path, authorization, body) or the outputs and metrics must differ. The HTTP timing params
//! (`timeout_s`, `max_retries`, `concurrency`) are shown by what they do to a slow or failing
//! server; `retry_backoff_ms` only spaces retries out in time (the HTTP client's unit test checks
//! retries happen at all).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_proto::stage::{
    OpenaiEvaluate, OpenaiGenerate, OpenaiJudge, OpenaiPrompts, Params, RewardEndpointScore,
};
use flywheel_proto::v1::{ArtifactRef, Assignment, Endpoint};
use flywheel_worker::openai::OpenAiBackend;
use flywheel_worker::reward_endpoint::RewardEndpointBackend;
use flywheel_worker::{Backend, Task, TaskContext, artifacts};
use serde_json::{Value, json};

/// Params shown by the timing test below, not by comparing requests.
const TIMING: &[&str] = &[
    "timeout_s",
    "max_retries",
    "retry_backoff_ms",
    "concurrency",
];

#[derive(Debug, Clone, PartialEq)]
struct Request {
    path: String,
    authorization: String,
    body: Value,
}

/// What the server answers: status, body, and how long it waits first.
type Reply = fn(&Request) -> (u16, Value, u64);

struct Server {
    base: String,
    requests: Arc<Mutex<Vec<Request>>>,
    max_in_flight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(reply: Reply) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight: Arc<AtomicUsize> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, mx, st) = (requests.clone(), Arc::clone(&max_in_flight), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let (r, inf, mx): (_, Arc<AtomicUsize>, Arc<AtomicUsize>) =
                    (r.clone(), in_flight.clone(), mx.clone());
                std::thread::spawn(move || {
                    stream.set_nonblocking(false).unwrap();
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let path = line.split(' ').nth(1).unwrap_or_default().to_string();
                    let (mut len, mut authorization) = (0, String::new());
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let lower = h.to_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length: ") {
                            len = v.parse().unwrap();
                        }
                        if lower.starts_with("authorization: ") {
                            authorization = h["authorization: ".len()..].to_string();
                        }
                    }
                    let mut body = vec![0u8; len];
                    reader.read_exact(&mut body).unwrap();
                    let req = Request {
                        path,
                        authorization,
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    };
                    let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                    mx.fetch_max(now, Ordering::SeqCst);
                    let (status, answer, delay) = reply(&req);
                    r.lock().unwrap().push(req);
                    std::thread::sleep(Duration::from_millis(delay));
                    inf.fetch_sub(1, Ordering::SeqCst);
                    let text = answer.to_string();
                    let mut stream = reader.into_inner();
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                        text.len()
                    );
                });
            }
        });
        Self {
            base,
            requests,
            max_in_flight,
            stop,
        }
    }

    fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// An OpenAI-compatible answer with `n` choices (the text says which path answered), and a
/// judge whose verdict depends on the request (always A for a prompt asking "Which response").
fn openai_reply(req: &Request) -> (u16, Value, u64) {
    let n = req.body["n"].as_u64().unwrap_or(1);
    let body = req.body.to_string();
    let text = if body.contains("Which response") {
        "A".to_string()
    } else if body.contains("Better answer") {
        if body.len().is_multiple_of(2) {
            "A"
        } else {
            "B"
        }
        .to_string()
    } else {
        format!("answer {} {}", req.body["seed"], req.path)
    };
    let choices: Vec<Value> = (0..n)
        .map(|i| json!({ "index": i, "message": { "content": format!("{text} #{i}") }, "text": format!("{text} #{i}") }))
        .collect();
    (
        200,
        json!({ "choices": choices, "usage": { "prompt_tokens": 3, "completion_tokens": 2 } }),
        0,
    )
}

/// Five attributes and a scalar, so that `attributes_path` can pick either.
fn reward_reply(req: &Request) -> (u16, Value, u64) {
    let len = req.body.to_string().len() as f64;
    (
        200,
        json!({ "helpfulness": 3.0, "correctness": len / 100.0, "coherence": 2.0, "complexity": 1.0, "verbosity": 0.5, "score": 1.5 }),
        0,
    )
}

struct Run {
    dir: std::path::PathBuf,
    n: usize,
    /// Ready endpoints every assignment carries (the controller fills those a stage names).
    endpoints: Vec<Endpoint>,
}

impl Run {
    /// A task of `kind` for `backend`, writing under a prefix of its own.
    fn task(
        &mut self,
        backend: &dyn Backend,
        kind: &str,
        params: &Value,
        inputs: &[ArtifactRef],
    ) -> Task {
        self.n += 1;
        Task::new(Assignment {
            task_id: format!("t{}", self.n),
            attempt: 1,
            campaign_id: "c".into(),
            round_index: 0,
            stage: kind.into(),
            kind: kind.into(),
            shard_index: 0,
            shard_count: 1,
            params_json: params.to_string(),
            inputs: inputs.to_vec(),
            output_prefix: format!("file://{}/run-{}", self.dir.display(), self.n),
            backend: backend.name().into(),
            endpoints: self.endpoints.clone(),
        })
        .unwrap()
    }

    fn dataset(&mut self, name: &str, rows: &[Value]) -> ArtifactRef {
        let prefix = format!("file://{}/inputs", self.dir.display());
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        let (uri, content_hash) =
            artifacts::write(&prefix, &format!("{name}.jsonl"), text.as_bytes()).unwrap();
        ArtifactRef {
            id: format!("{name}-id"),
            role: name.into(),
            kind: "dataset".into(),
            uri,
            content_hash,
            name: name.into(),
        }
    }

    fn stage(
        &mut self,
        backend: &dyn Backend,
        kind: &str,
        params: &Value,
        inputs: &[ArtifactRef],
    ) -> Result<(Vec<String>, BTreeMap<String, String>), String> {
        let r = backend
            .run(
                &self.task(backend, kind, params, inputs),
                &TaskContext::default(),
            )
            .map_err(|e| e.message)?;
        Ok((
            r.outputs
                .iter()
                .map(|o| format!("{} {}", o.content_hash, o.metadata))
                .collect(),
            r.metrics
                .iter()
                .map(|(k, v)| (k.clone(), format!("{v:.6}")))
                .collect(),
        ))
    }
}

impl Run {
    /// Runs a stage and returns its outputs as the inputs of the stages after it.
    fn outputs(
        &mut self,
        backend: &dyn Backend,
        kind: &str,
        params: &Value,
        inputs: &[ArtifactRef],
    ) -> Vec<ArtifactRef> {
        let r = backend
            .run(
                &self.task(backend, kind, params, inputs),
                &TaskContext::default(),
            )
            .unwrap();
        r.outputs
            .into_iter()
            .map(|o| ArtifactRef {
                id: format!("{kind}-{}", o.name),
                role: o.name.clone(),
                kind: o.kind.into(),
                uri: o.uri,
                content_hash: o.content_hash,
                name: o.name,
            })
            .collect()
    }
}

fn generator() -> ArtifactRef {
    ArtifactRef {
        id: "gen".into(),
        role: "generator".into(),
        kind: "model".into(),
        uri: "test://gen".into(),
        content_hash: String::new(),
        name: "gen-model".into(),
    }
}

/// Baseline, then each change: the requests or results must differ; every declared param is
/// covered (or a timing param).
#[allow(clippy::too_many_arguments)]
fn check<T: Params>(
    run: &mut Run,
    server: &Server,
    backend: &dyn Backend,
    kind: &str,
    baseline: Value,
    inputs: &[ArtifactRef],
    changes: &[(&str, Value)],
    single_valued: &[&str],
) {
    for p in T::DOC.params {
        assert!(
            TIMING.contains(&p.name)
                || single_valued.contains(&p.name)
                || changes.iter().any(|(c, _)| *c == p.name),
            "{kind} on {}: {} is declared but not shown to change anything",
            backend.name(),
            p.name
        );
    }
    let base = run.stage(backend, kind, &baseline, inputs).unwrap();
    let base_requests = server.take();
    assert!(!base_requests.is_empty());
    for (name, value) in changes {
        let mut params = baseline.clone();
        params[*name] = value.clone();
        let result = run.stage(backend, kind, &params, inputs);
        let requests = server.take();
        assert!(
            requests != base_requests || result.as_ref().ok() != Some(&base),
            "{kind} on {}: {name} = {value} changed nothing",
            backend.name()
        );
    }
}

#[test]
fn every_openai_and_reward_endpoint_param_changes_what_the_stage_does() {
    let dir = std::env::temp_dir().join(format!("flywheel-http-params-{}", std::process::id()));
    let mut run = Run {
        dir: dir.clone(),
        n: 0,
        endpoints: Vec::new(),
    };
    let prompts = run.dataset(
        "prompts",
        &[
            json!({ "id": "p0", "prompt": "add 2 and 3" }),
            json!({ "id": "p1", "prompt": "reverse abc" }),
        ],
    );
    let responses = run.dataset(
        "responses",
        &[
            json!({ "prompt_id": "p0", "prompt": "add 2 and 3", "sample": 0, "response": "5" }),
            json!({ "prompt_id": "p0", "prompt": "add 2 and 3", "sample": 1, "response": "6" }),
            json!({ "prompt_id": "p1", "prompt": "reverse abc", "sample": 0, "response": "cba" }),
            json!({ "prompt_id": "p1", "prompt": "reverse abc", "sample": 1, "response": "abc" }),
        ],
    );

    let llm = Server::start(openai_reply);
    let v1 = format!("{}/v1", llm.base);
    run.endpoints = ["served", "other", "judge"]
        .iter()
        .map(|name| Endpoint {
            name: name.to_string(),
            url: format!("{}/{name}/v1", llm.base),
            served_name: format!("{name}-model"),
            model_id: format!("{name}-id"),
            content_hash: String::new(),
        })
        .collect();
    check::<OpenaiGenerate>(
        &mut run,
        &llm,
        &OpenAiBackend,
        "generate",
        json!({ "base_url": v1 }),
        &[prompts.clone(), generator()],
        &[
            ("endpoint", json!("served")),
            ("base_url", json!(format!("{}/other/v1", llm.base))),
            ("api", json!("completions")),
            ("model", json!("another-model")),
            ("k", json!(2)),
            ("use_n", json!(false)),
            ("temperature", json!(0.2)),
            ("top_p", json!(0.5)),
            ("max_tokens", json!(7)),
            ("seed", json!(42)),
            ("api_key_env", json!("PATH")),
        ],
        &[],
    );
    check::<OpenaiJudge>(
        &mut run,
        &llm,
        &OpenAiBackend,
        "filter",
        json!({ "method": "llm_judge", "base_url": v1 }),
        &[responses.clone(), generator()],
        &[
            ("endpoint", json!("judge")),
            ("base_url", json!(format!("{}/other/v1", llm.base))),
            ("api", json!("completions")),
            ("model", json!("judge-model")),
            (
                "judge_prompt",
                json!("Which response is better, A or B? {prompt} A: {a} B: {b}"),
            ),
            ("temperature", json!(0.7)),
            ("top_p", json!(0.5)),
            ("max_tokens", json!(2)),
            ("api_key_env", json!("PATH")),
        ],
        &["method"],
    );

    let held_out = run.dataset(
        "prompts",
        &[
            json!({ "id": "e0", "prompt": "add 2 3", "reference_answer": "5" }),
            json!({ "id": "e1", "prompt": "upper ab", "reference_answer": "AB" }),
            json!({ "id": "e2", "prompt": "reverse abc", "reference_answer": "cba" }),
        ],
    );
    check::<OpenaiEvaluate>(
        &mut run,
        &llm,
        &OpenAiBackend,
        "evaluate",
        json!({ "candidate_endpoint": "served", "generator_endpoint": "other",
                "judge_base_url": format!("{}/judge/v1", llm.base), "bootstrap": 5 }),
        std::slice::from_ref(&held_out),
        &[
            ("candidate_endpoint", json!("judge")),
            ("generator_endpoint", json!("judge")),
            ("judge_endpoint", json!("other")),
            ("judge_base_url", json!(format!("{}/judge2/v1", llm.base))),
            ("judge_model", json!("a-judge")),
            (
                "judge_prompt",
                json!("Which response is better, A or B? {prompt} A: {a} B: {b}"),
            ),
            ("prompts", json!(1)),
            ("api", json!("completions")),
            ("max_tokens", json!(7)),
            ("bootstrap", json!(1)),
            ("seed", json!(99)),
            ("api_key_env", json!("PATH")),
        ],
        &[],
    );

    let rm = Server::start(reward_reply);
    check::<RewardEndpointScore>(
        &mut run,
        &rm,
        &RewardEndpointBackend,
        "score",
        json!({ "url": format!("{}/v1/rewards", rm.base) }),
        std::slice::from_ref(&responses),
        &[
            ("url", json!(format!("{}/v2/rewards", rm.base))),
            ("model", json!("nemotron-reward")),
            ("request", json!("pair")),
            ("attributes_path", json!("score")),
            ("weights", json!([1.0, 0.0, 0.0, 0.0, 0.0])),
            ("api_key_env", json!("PATH")),
        ],
        &[],
    );

    // Timing: a server that always answers 503 gets max_retries + 1 requests per call.
    let failing = Server::start(|_| (503, json!({ "error": "busy" }), 0));
    for retries in [0, 2] {
        let params = json!({ "url": format!("{}/r", failing.base), "max_retries": retries, "retry_backoff_ms": 1, "concurrency": 1 });
        let mut one = run.dataset(
            "one-response",
            &[json!({ "prompt_id": "p0", "prompt": "x", "sample": 0, "response": "y" })],
        );
        one.role = "responses".into();
        assert!(
            run.stage(&RewardEndpointBackend, "score", &params, &[one])
                .is_err()
        );
        assert_eq!(failing.take().len(), retries + 1, "max_retries {retries}");
    }
    // A slow server: timeout_s 1 fails what the default waits for; concurrency bounds what is
    // in flight.
    let slow = Server::start(|_| (200, json!({ "score": 1.0 }), 1200));
    let params = json!({ "url": format!("{}/r", slow.base), "timeout_s": 1, "max_retries": 0 });
    let e = run
        .stage(
            &RewardEndpointBackend,
            "score",
            &params,
            std::slice::from_ref(&responses),
        )
        .unwrap_err();
    assert!(
        e.contains("gave up") || e.contains("timed out") || e.contains("timeout"),
        "{e}"
    );
    let slow = Server::start(|_| (200, json!({ "score": 1.0 }), 300));
    let params =
        json!({ "url": format!("{}/r", slow.base), "attributes_path": "score", "concurrency": 1 });
    run.stage(
        &RewardEndpointBackend,
        "score",
        &params,
        std::slice::from_ref(&responses),
    )
    .unwrap();
    assert_eq!(slow.max_in_flight.swap(0, Ordering::SeqCst), 1);
    let params =
        json!({ "url": format!("{}/r", slow.base), "attributes_path": "score", "concurrency": 4 });
    run.stage(
        &RewardEndpointBackend,
        "score",
        &params,
        std::slice::from_ref(&responses),
    )
    .unwrap();
    assert!(slow.max_in_flight.load(Ordering::SeqCst) > 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// A prompt writer for `synthesize_prompts`: list requests get a numbered list of three items
/// named after the request (a revision request gets its question back twice more, once as an
/// exact and once as a near duplicate); a follow-up request gets a question; anything else a
/// reply. Every fifth seed gets prose, a conversion failure.
fn writer_reply(req: &Request) -> (u16, Value, u64) {
    let content = req.body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    let seed = req.body["seed"].as_u64().unwrap_or(0);
    let tag = content.len() % 997;
    let text = if content.contains("followup request") {
        format!("And what about case {tag}?")
    } else if seed % 5 == 4 && !content.contains("Please revise") {
        "I would rather not.".to_string()
    } else if let Some(q) = content
        .strip_prefix("Question: ")
        .and_then(|r| r.split("\n\n").next())
    {
        format!(
            "1. {q} Please answer in detail.\n2. {q} Please answer in detail!\n3. {q} Please answer in much detail."
        )
    } else if content.contains("list") || content.contains("List") {
        format!(
            "1. Item {tag} alpha of {seed}\n2. Item {tag} beta of {seed}\n3. Item {tag} gamma of {seed}"
        )
    } else {
        format!("Reply {tag}")
    };
    (
        200,
        json!({ "choices": [{ "index": 0, "message": { "content": text } }], "usage": { "prompt_tokens": 3, "completion_tokens": 2 } }),
        0,
    )
}

/// `synthesize_prompts` on `openai`: every param changes the requests or the prompts. Params of
/// one pipeline only are shown on that pipeline.
#[test]
fn every_prompt_synthesis_param_changes_the_prompts() {
    let dir = std::env::temp_dir().join(format!("flywheel-sdg-params-{}", std::process::id()));
    let mut run = Run {
        dir: dir.clone(),
        n: 0,
        endpoints: Vec::new(),
    };
    let llm = Server::start(writer_reply);
    let v1 = format!("{}/v1", llm.base);
    run.endpoints = vec![Endpoint {
        name: "writer".into(),
        url: format!("{}/writer/v1", llm.base),
        served_name: "writer-model".into(),
        model_id: "writer-id".into(),
        content_hash: String::new(),
    }];
    let file = |run: &mut Run, name: &str, rows: &[Value]| run.dataset(name, rows).uri;
    let seeds = file(
        &mut run,
        "seeds",
        &[
            json!({ "prompt": "What is the capital of France and why did it become the capital?" }),
            json!({ "prompt": "Tell me what is the capital of Spain." }),
            json!({ "prompt": "Write a limerick about a cat who learns to cook pasta at night." }),
            json!({ "messages": [{ "role": "user", "content": "Hi" }, { "role": "assistant", "content": "Hello" }, { "role": "user", "content": "Plan a picnic for six people." }] }),
        ],
    );
    let other_seeds = file(
        &mut run,
        "seeds2",
        &[json!({ "prompt": "Name three rivers." })],
    );
    let eval_file = file(
        &mut run,
        "eval",
        &[json!({ "prompt": "Write a limerick about a cat who learns to cook pasta at night" })],
    );
    let empty_eval = file(
        &mut run,
        "eval2",
        &[json!({ "prompt": "unrelated words entirely" })],
    );
    let documents = file(
        &mut run,
        "docs",
        &[
            json!({ "text": "The Nile is a river." }),
            json!({ "document": "Rust is a language." }),
        ],
    );
    let mut held_out = run.dataset(
        "held",
        &[json!({ "id": "e0", "prompt": "What is the capital of France and why did it become the capital?", "split": "held_out" })],
    );
    held_out.role = "prompts".into();
    let inputs = [held_out, generator()];
    let baseline = json!({
        "base_url": v1, "n_macro_topics": 2, "n_subtopics": 1, "n_openlines": 2, "n_revisions": 3,
        "seeds": seeds, "seed_share": 0.5, "instruction_share": 0.5, "two_turn_share": 0.5,
        "revise_share": 0.5, "eval_prompts": [eval_file], "max_conversion_failure_rate": 1.0,
    });
    let only_for_pipelines = [
        "document_types",
        "documents",
        "school_level",
        "level",
        "language",
    ];
    check::<OpenaiPrompts>(
        &mut run,
        &llm,
        &OpenAiBackend,
        "synthesize_prompts",
        baseline.clone(),
        &inputs,
        &[
            ("pipeline", json!("math")),
            ("endpoint", json!("writer")),
            ("base_url", json!(format!("{}/other/v1", llm.base))),
            ("model", json!("another-model")),
            ("topics", json!(["volcanoes"])),
            ("n_macro_topics", json!(3)),
            ("n_subtopics", json!(0)),
            ("n_openlines", json!(1)),
            ("n_revisions", json!(0)),
            (
                "templates",
                json!({ "questions": "Give {n_openlines} questions (a list) on {topic}." }),
            ),
            ("max_prompts", json!(2)),
            ("max_conversion_failure_rate", json!(0.0)),
            ("seeds", json!(other_seeds)),
            ("seed_share", json!(0.2)),
            ("instruction_share", json!(1.0)),
            ("max_instructions", json!(3)),
            ("instruction_types", json!(["punctuation:no_comma"])),
            ("two_turn_share", json!(0.0)),
            ("reply_endpoint", json!("writer")),
            ("dialogue_turns", json!(3)),
            ("revise_share", json!(0.0)),
            ("dedup", json!(false)),
            ("near_duplicate_threshold", json!(1.0)),
            ("decontaminate", json!(false)),
            ("eval_prompts", json!([empty_eval])),
            ("decontamination_ngram", json!(4)),
            ("preference_share", json!(0.0)),
            ("split", json!("held_out")),
            ("temperature", json!(0.1)),
            ("top_p", json!(0.5)),
            ("max_tokens", json!(9)),
            ("seed", json!(42)),
            ("api_key_env", json!("PATH")),
        ],
        &only_for_pipelines,
    );
    // The params of one pipeline, on it.
    let on = |pipeline: &str, extra: Value| {
        let mut b = json!({ "pipeline": pipeline, "base_url": v1, "n_macro_topics": 2, "n_subtopics": 1,
                            "max_conversion_failure_rate": 1.0 });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (baseline, changes) in [
        (
            on("writing", json!({})),
            vec![("document_types", json!(["Haiku"]))],
        ),
        (
            on("closed_qa", json!({ "documents": documents })),
            vec![(
                "documents",
                json!(file(
                    &mut run,
                    "docs2",
                    &[json!({ "text": "Bees make honey." })]
                )),
            )],
        ),
        (
            on("math", json!({})),
            vec![
                ("school_level", json!("high school")),
                ("level", json!("beginner")),
            ],
        ),
        (
            on("coding", json!({})),
            vec![("language", json!("Rust")), ("level", json!("advanced"))],
        ),
    ] {
        let names: Vec<&str> = changes.iter().map(|(n, _)| *n).collect();
        let others: Vec<&str> = OpenaiPrompts::DOC
            .params
            .iter()
            .map(|p| p.name)
            .filter(|n| !names.contains(n))
            .collect();
        check::<OpenaiPrompts>(
            &mut run,
            &llm,
            &OpenAiBackend,
            "synthesize_prompts",
            baseline,
            &inputs,
            &changes,
            &others,
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The external trainer's params, through a `command` that records its arguments and
/// environment in the model it writes: each param that reaches the trainer changes the model's
/// content hash. `template` and `extra_args` are rendered by the unit tests of each trainer's
/// documented arguments and run for real with `flywheel train` in `tests/integrations.rs`;
/// `grace_period_s` only times the SIGKILL after a SIGTERM on cancellation.
#[test]
fn every_external_param_reaches_the_trainer() {
    use flywheel_proto::stage::ExternalTrain;
    use flywheel_worker::external::ExternalTrainerBackend;

    let dir = std::env::temp_dir().join(format!("flywheel-ext-params-{}", std::process::id()));
    let mut run = Run {
        dir: dir.clone(),
        n: 0,
        endpoints: Vec::new(),
    };
    let model = |name: &str| {
        let path = dir.join("models").join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("weights"), name).unwrap();
        ArtifactRef {
            id: format!("{name}-id"),
            role: name.into(),
            kind: "model".into(),
            uri: format!("file://{}", path.display()),
            content_hash: artifacts::hash_dir(&path).unwrap(),
            name: name.into(),
        }
    };
    let (base, generator, sft_model) = (model("base"), model("generator"), model("model"));
    let sft = run.dataset(
        "sft",
        &[json!({ "messages": [{ "role": "user", "content": "q" }, { "role": "assistant", "content": "a" }] })],
    );
    let pairs = run.dataset(
        "pairs",
        &[json!({ "prompt": "q", "chosen": "a", "rejected": "b", "chosen_reward": 2.0, "rejected_reward": 1.0 })],
    );
    // The trainer: writes its arguments and its FLYWHEEL_* environment into the output dir.
    let record = "out=$1; shift; printf '%s\\n' \"$@\" > \"$out/args\"; env | grep '^FW_' | sort > \"$out/env\"";
    let command = |extra: &[&str]| {
        let mut c = vec![
            "sh",
            "-c",
            record,
            "trainer",
            "{output_dir}",
            "{base_model}",
            "{ref_model}",
            "{lr}",
            "{epochs}",
            "{batch_size}",
            "{beta}",
            "{eta}",
            "{steps}",
            "{gpus}",
            "{seed}",
            "{algorithm}",
        ];
        c.extend_from_slice(extra);
        json!(c)
    };
    let signature = |run: &mut Run, kind: &str, params: Value, inputs: &[ArtifactRef]| {
        run.stage(&ExternalTrainerBackend, kind, &params, inputs)
            .unwrap_or_else(|e| panic!("{kind} {params}: {e}"))
    };
    // The Slurm executor and its params need a cluster: tests/slurm.rs runs them on one, and
    // the batch-script unit test (external::slurm) shows each in the script.
    let mut covered_elsewhere = vec!["template", "extra_args", "grace_period_s", "executor"];
    covered_elsewhere.extend_from_slice(flywheel_proto::stage::SLURM_PARAMS);
    let sft_inputs = [sft.clone(), base.clone(), generator.clone()];
    let pref_inputs = [pairs.clone(), sft_model.clone(), base.clone()];
    let changes: &[(&str, &str, Value)] = &[
        ("sft", "init", json!("generator")),
        ("preference", "reference", json!("base")),
        ("sft", "lr", json!(0.5)),
        ("sft", "epochs", json!(3)),
        ("sft", "batch_size", json!(2)),
        ("preference", "beta", json!(0.5)),
        ("preference", "eta", json!(2.0)),
        ("sft", "steps", json!(9)),
        ("sft", "gpus", json!(4)),
        ("sft", "seed", json!(5)),
        ("preference", "algorithm", json!("dpo")),
        ("sft", "env", json!({ "FW_FLAG": "on" })),
        ("sft", "vars", json!({ "mine": "7" })),
        ("sft", "command", command(&["extra"])),
    ];
    for p in ExternalTrain::DOC.params {
        assert!(
            covered_elsewhere.contains(&p.name) || changes.iter().any(|(_, c, _)| *c == p.name),
            "external: {} is declared but not shown to reach the trainer",
            p.name
        );
    }
    for (kind, name, value) in changes {
        let inputs: &[ArtifactRef] = if *kind == "sft" {
            &sft_inputs
        } else {
            &pref_inputs
        };
        let mut baseline = json!({ "command": command(&[]) });
        if *kind == "preference" {
            baseline["algorithm"] = json!("rpo");
        }
        let mut changed = baseline.clone();
        match *name {
            // A command's own placeholder needs a value; the change is the value.
            "vars" => {
                baseline["command"] = command(&["{mine}"]);
                baseline["vars"] = json!({ "mine": "1" });
                changed["command"] = command(&["{mine}"]);
                changed["vars"] = value.clone();
            }
            "env" => {
                baseline["env"] = json!({ "FW_FLAG": "off" });
                changed["env"] = value.clone();
            }
            _ => changed[*name] = value.clone(),
        }
        let before = signature(&mut run, kind, baseline, inputs);
        let after = signature(&mut run, kind, changed, inputs);
        assert_ne!(
            before.0, after.0,
            "{kind}.{name} = {value} did not reach the trainer"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Another valid value for a declared param, from its type and rule.
fn another(p: &flywheel_proto::stage::ParamDoc, current: &Value) -> Value {
    use flywheel_proto::stage::Rule;
    match (p.rule, p.ty) {
        (Rule::OneOf(words), _) => json!(
            words
                .iter()
                .find(|w| current.as_str() != Some(**w))
                .unwrap()
        ),
        (Rule::Numbers(n), _) => json!((0..n).map(|i| i as f64).collect::<Vec<_>>()),
        (_, "bool") => json!(!current.as_bool().unwrap()),
        (_, "i64") => json!(current.as_i64().unwrap() + 1),
        (_, "f64") => json!(current.as_f64().unwrap() + 0.5),
        (_, "u64" | "Option<u64>") => json!(current.as_u64().unwrap_or(0) + 7),
        (_, "Option<f64>") => json!(current.as_f64().unwrap_or(0.0) + 0.5),
        (_, "Option<Vec<String>>") => json!(["add"]),
        (rule, ty) => panic!("{}: no other value for {ty} {rule:?}", p.name),
    }
}

/// The test backend takes the builtin's params of each kind it records in its outputs: each one
/// changes the outputs it writes (their `params` metadata, or their content).
#[test]
fn the_test_backend_records_every_builtin_param_it_takes() {
    use flywheel_proto::stage::{BackendKind, StageKind, docs_for};
    use flywheel_worker::test_backend::TestBackend;

    let dir = std::env::temp_dir().join(format!("flywheel-test-params-{}", std::process::id()));
    let mut run = Run {
        dir: dir.clone(),
        n: 0,
        endpoints: Vec::new(),
    };
    let model = |role: &str| ArtifactRef {
        id: role.into(),
        role: role.into(),
        kind: "model".into(),
        uri: format!("test://{role}?quality=0.4"),
        content_hash: String::new(),
        name: role.into(),
    };
    let mut inputs: Vec<ArtifactRef> = vec![model("generator"), model("base"), model("model")];
    // Each kind's inputs, from the previous kind's outputs.
    let stages = [
        (
            "synthesize_prompts",
            StageKind::SynthesizePrompts,
            json!({ "count": 4 }),
        ),
        ("generate", StageKind::Generate, json!({})),
        ("score", StageKind::Score, json!({})),
        ("filter", StageKind::Filter, json!({})),
        ("sft", StageKind::Sft, json!({})),
        (
            "preference",
            StageKind::Preference,
            json!({ "algorithm": "rpo" }),
        ),
    ];
    for (kind, stage_kind, baseline) in stages {
        let docs = docs_for(stage_kind, BackendKind::Test);
        let builtin: Vec<_> = docs
            .iter()
            .filter(|d| d.backend == BackendKind::Builtin)
            .collect();
        assert_eq!(builtin.len(), 1, "{kind}");
        let defaults = (builtin[0].defaults)();
        let base = run.stage(&TestBackend, kind, &baseline, &inputs).unwrap();
        for p in builtin[0].params {
            if p.name == "method" {
                continue; // a single allowed value
            }
            let current = baseline.get(p.name).unwrap_or(&defaults[p.name]).clone();
            let mut changed = baseline.clone();
            changed[p.name] = another(p, &current);
            if p.name == "eta" && changed["algorithm"] == "dpo" {
                continue;
            }
            let after = run.stage(&TestBackend, kind, &changed, &inputs);
            assert!(
                after.as_ref().ok() != Some(&base),
                "test backend: {kind}.{} = {} changed nothing",
                p.name,
                changed[p.name]
            );
        }
        // The next kind reads what this one wrote.
        inputs.extend(run.outputs(&TestBackend, kind, &baseline, &inputs));
    }
    let _ = std::fs::remove_dir_all(dir);
}
