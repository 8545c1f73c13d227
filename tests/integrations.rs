//! Real engines, each against a real counterpart: `flywheel serve-model` with the official
//! openai Python client; campaigns whose generation and judging go through the `openai` backend
//! to `serve-model`; the `reward_endpoint` backend against a local reward service; the `external`
//! backend running `flywheel train` (plus a cancelled and a failing trainer); and the artifact
//! store on a local S3-compatible server (moto).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    Cluster, Proc, artifacts_of, example_spec, free_port, http, http_full, init_model,
    init_model_with, model_spec, processes_mentioning, python, read_rows, reward_service,
    serve_model, until,
};
use flywheel_proto::v1::{Artifact, CampaignAction, Round};
use flywheel_worker::artifacts;
use serde_json::Value;

fn rounds_metric(rounds: &[Round], key: &str) -> f64 {
    *rounds[0]
        .metrics
        .get(key)
        .unwrap_or_else(|| panic!("no metric {key} in {:?}", rounds[0].metrics))
}

#[tokio::test]
async fn serve_model_answers_the_official_openai_python_client() {
    let dir = tempdir("serve");
    let model = init_model(&dir, "m", false);
    let (_server, base) = serve_model(&dir, &model, "tiny-chat").await;
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/openai_client_check.py"
        ))
        .args([&base, "tiny-chat"])
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["models"], serde_json::json!(["tiny-chat"]));
    let chat = got["chat_choices"].as_array().unwrap();
    assert_eq!(chat.len(), 3, "n=3 gives three choices");
    assert_eq!(
        got["chat_again"], got["chat_choices"],
        "the same seed samples the same"
    );
    for f in got["chat_finish"].as_array().unwrap() {
        assert!(f == "stop" || f == "length", "{f}");
    }
    let usage = &got["chat_usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 3);
    let completions = got["completion_choices"].as_array().unwrap();
    assert_eq!(completions.len(), 4, "2 prompts x n=2");
    for (i, c) in completions.iter().enumerate() {
        assert_eq!(c[0].as_u64(), Some(i as u64));
    }
    assert_eq!(got["completion_object"], "text_completion");
    assert_eq!(got["missing_model"], "NotFoundError");
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fw-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const SECRET: &str = "sk-test-4f1c9e0b7a";

#[tokio::test]
async fn openai_backend_generates_and_judges_through_serve_model() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "tiny", false);
    let (_server, base) = serve_model(&c.dir, &model, "tiny").await;
    // The judge is another model on another server, with room for two answers in its context.
    let judge_model = init_model_with(&c.dir, "judge", false, &["--max-seq", "512", "--seed", "9"]);
    let (_judge_server, judge_base) = serve_model(&c.dir, &judge_model, "judge").await;
    c.add_worker_with_env(
        "cpu-1",
        "cpu",
        &[
            "--backend",
            "builtin",
            "--backend",
            "openai",
            "--slots",
            "3",
        ],
        &[("FLYWHEEL_TEST_OPENAI_KEY", SECRET)],
    );
    let stages = format!(
        "    - {{ name: prompts, kind: synthesize_prompts, params: {{ count: 6 }} }}
    - name: generate
      kind: generate
      shards: 2
      backend: openai
      params: {{ base_url: \"{base}\", k: 3, max_tokens: 8, temperature: 1.0, seed: 5, concurrency: 4, api_key_env: FLYWHEEL_TEST_OPENAI_KEY }}
    - name: complete
      kind: generate
      needs: [prompts]
      backend: openai
      params: {{ base_url: \"{base}\", api: completions, use_n: false, k: 2, max_tokens: 4 }}
    - name: judge
      kind: filter
      needs: [generate]
      backend: openai
      params: {{ method: llm_judge, base_url: \"{judge_base}\", model: judge }}
"
    );
    let campaign = c
        .create(&model_spec("openai", &model, &model, &stages))
        .await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(120))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    // 6 prompts x k=3 over two shards, one request each (n=3).
    assert_eq!(rounds_metric(&rounds, "generate.responses_total"), 18.0);
    assert_eq!(rounds_metric(&rounds, "generate.requests_total"), 6.0);
    assert!(rounds_metric(&rounds, "generate.completion_tokens_total") >= 18.0);
    // Without n: one request per sample.
    assert_eq!(rounds_metric(&rounds, "complete.requests"), 12.0);
    assert_eq!(rounds_metric(&rounds, "complete.responses"), 12.0);
    // Every judged pair is asked twice, order swapped; kept pairs are the agreeing ones.
    let judged = rounds_metric(&rounds, "judge.judged");
    assert!(judged >= 1.0);
    assert_eq!(rounds_metric(&rounds, "judge.requests"), 2.0 * judged);
    assert_eq!(
        rounds_metric(&rounds, "judge.pair_records") + rounds_metric(&rounds, "judge.disagreed"),
        judged
    );
    let arts = artifacts_of(&c, &campaign.id).await;
    let responses = arts
        .iter()
        .find(|a| a.producer_stage == "generate" && a.name == "responses")
        .unwrap();
    let rows = read_rows(responses);
    assert_eq!(rows.len(), 9);
    assert!(
        rows.iter()
            .all(|r| r["model"] == "tiny" && r["response"].is_string())
    );
    let pairs = arts
        .iter()
        .find(|a| a.producer_stage == "judge" && a.name == "pairs")
        .unwrap();
    for p in read_rows(pairs) {
        assert_eq!(p["judge"], "llm");
        assert_ne!(p["chosen"], p["rejected"]);
    }
    // The key is only ever in the worker's environment.
    let log = std::fs::read_to_string(c.dir.join("cpu-1.log")).unwrap();
    assert!(!log.contains(SECRET));
    let mut conn = c.db.connect().await;
    let leaked: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM campaigns WHERE spec_yaml LIKE '%' || $1 || '%')
              + (SELECT count(*) FROM events WHERE message LIKE '%' || $1 || '%')
              + (SELECT count(*) FROM tasks WHERE params::text LIKE '%' || $1 || '%')",
    )
    .bind(SECRET)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
}

/// The reward service's attributes for a response (the same function as the Python service).
fn expected_attributes(response: &str) -> [f64; 5] {
    let n = response.len();
    [
        (n % 5) as f64,
        if response.chars().any(|c| c.is_ascii_digit()) {
            4.0
        } else {
            1.0
        },
        3.5,
        0.5,
        (n as f64 / 10.0).min(4.0),
    ]
}

#[tokio::test]
async fn reward_endpoint_backend_scores_through_a_local_reward_service() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "tiny", false);
    let (_service, port) = reward_service(&c.dir).await;
    c.add_worker(
        "cpu-1",
        "cpu",
        &["--backend", "builtin", "--backend", "reward_endpoint"],
    );
    let stages = format!(
        "    - {{ name: prompts, kind: synthesize_prompts, params: {{ count: 5 }} }}
    - {{ name: generate, kind: generate, params: {{ k: 2, max_tokens: 6 }} }}
    - name: score
      kind: score
      backend: reward_endpoint
      params: {{ url: \"http://127.0.0.1:{port}/v1/chat/completions\", model: test-reward, concurrency: 3 }}
    - name: score_scalar
      kind: score
      needs: [generate]
      backend: reward_endpoint
      params: {{ url: \"http://127.0.0.1:{port}/scalar\", request: pair, attributes_path: data.0.score }}
    - {{ name: filter, kind: filter, needs: [score], params: {{ margin: 0.0 }} }}
"
    );
    let campaign = c
        .create(&model_spec("reward", &model, &model, &stages))
        .await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(90))
        .await;
    let arts = artifacts_of(&c, &campaign.id).await;
    let scores = read_rows(arts.iter().find(|a| a.producer_stage == "score").unwrap());
    assert_eq!(scores.len(), 10);
    let weights = [0.3, 0.74, 0.46, 0.47, -0.33];
    for row in &scores {
        let expected = expected_attributes(row["response"].as_str().unwrap());
        let names = [
            "helpfulness",
            "correctness",
            "coherence",
            "complexity",
            "verbosity",
        ];
        for (name, e) in names.iter().zip(expected) {
            assert_eq!(row["attributes"][name].as_f64().unwrap(), e, "{name}");
        }
        let reward: f64 = expected.iter().zip(weights).map(|(a, w)| a * w).sum();
        assert!((row["reward"].as_f64().unwrap() - reward).abs() < 1e-9);
    }
    let scalar = read_rows(
        arts.iter()
            .find(|a| a.producer_stage == "score_scalar")
            .unwrap(),
    );
    for row in &scalar {
        // Python's len(): characters.
        let expected = row["response"].as_str().unwrap().chars().count() as f64 / 10.0;
        assert_eq!(row["reward"].as_f64().unwrap(), expected);
        assert!(row.get("attributes").is_none());
    }
    let rounds = c.rounds(&campaign.id).await;
    assert_eq!(rounds_metric(&rounds, "score.requests"), 10.0);
    assert!(rounds_metric(&rounds, "filter.sft_records") >= 1.0);
}

/// The first shard of round 0's `sft` stage.
async fn sft_task(c: &Cluster, campaign: &str) -> Option<flywheel_proto::v1::Task> {
    let rounds = c.rounds(campaign).await;
    let stage = rounds.first()?.stages.iter().find(|s| s.name == "sft")?;
    stage.tasks.first().cloned()
}

#[tokio::test]
async fn external_trainer_runs_flywheel_train_streams_progress_and_stops_on_cancel() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "tiny", false);
    let reward = init_model(&c.dir, "tiny-reward", true);
    c.add_worker(
        "cpu-1",
        "cpu",
        &[
            "--backend",
            "builtin",
            "--backend",
            "external",
            "--slots",
            "3",
        ],
    );
    let data_stages = "    - { name: prompts, kind: synthesize_prompts, params: { count: 8 } }
    - { name: generate, kind: generate, params: { k: 2, max_tokens: 6 } }
    - { name: score, kind: score }
    - { name: filter, kind: filter, params: { margin: 0.0 } }
";
    let trained = format!(
        "{data_stages}    - {{ name: sft, kind: sft, backend: external, params: {{ template: flywheel, steps: 12, batch_size: 4, lr: 0.001, extra_args: [--warmup, 2] }} }}
    - {{ name: rpo, kind: preference, backend: external, needs: [sft, filter], params: {{ template: flywheel, algorithm: rpo, steps: 8, batch_size: 4, beta: 0.1, eta: 1.0 }} }}
"
    );
    let endless = format!(
        "{data_stages}    - {{ name: sft, kind: sft, backend: external, params: {{ template: flywheel, steps: 100000000, batch_size: 2, grace_period_s: 5 }} }}
"
    );
    let failing = "    - { name: prompts, kind: synthesize_prompts, params: { count: 2 } }
    - name: sft
      kind: sft
      backend: external
      max_attempts: 1
      params: { command: [sh, -c, \"echo step=0 loss=2.5; echo 'RuntimeError: CUDA out of memory' >&2; exit 3\"] }
";
    let ok = c
        .create(&model_spec("external-ok", &model, &reward, &trained))
        .await;
    let cancel = c
        .create(&model_spec("external-cancel", &model, &reward, &endless))
        .await;
    let fail = c
        .create(&model_spec("external-fail", &model, &reward, failing))
        .await;

    // A trainer that exits non-zero fails the task with the tail of its log.
    c.wait_status(&fail.id, "failed", Duration::from_secs(60))
        .await;
    let rounds = c.rounds(&fail.id).await;
    let error = &rounds[0].stages[1].tasks[0].last_error;
    assert!(error.contains("exit status: 3"), "{error}");
    assert!(error.contains("CUDA out of memory"), "{error}");

    // Cancelling stops the running trainer process (SIGTERM to its group).
    until(
        "the endless trainer to log steps",
        Duration::from_secs(60),
        || async {
            let task = sft_task(&c, &cancel.id).await?;
            task.progress_message.starts_with("step=").then_some(())
        },
    )
    .await;
    assert!(
        !processes_mentioning(&cancel.id).is_empty(),
        "the trainer runs"
    );
    // Its log lines arrive as progress: the message and the parsed metrics.
    let task = sft_task(&c, &cancel.id).await.unwrap();
    let (_, detail) = http(
        &c.http_addr(),
        "GET",
        &format!("/api/v1/tasks/{}", task.id),
        Some(&c.read_token),
        None,
    );
    let detail: Value = serde_json::from_str(&detail).unwrap();
    let progress: Value =
        serde_json::from_str(detail["progress_metrics_json"].as_str().unwrap()).unwrap();
    assert!(
        progress["loss"].is_number() && progress["step"].is_number(),
        "{progress}"
    );
    c.admin_client()
        .await
        .cancel_campaign(CampaignAction {
            campaign_id: cancel.id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap();
    until(
        "the trainer task to be cancelled",
        Duration::from_secs(30),
        || async { (sft_task(&c, &cancel.id).await?.state == "cancelled").then_some(()) },
    )
    .await;
    assert!(
        processes_mentioning(&cancel.id).is_empty(),
        "the trainer process is gone once its task is cancelled"
    );

    // A real run: SFT then RPO through `flywheel train`, models registered with content hashes.
    c.wait_status(&ok.id, "succeeded", Duration::from_secs(120))
        .await;
    let rounds = c.rounds(&ok.id).await;
    assert!(
        rounds_metric(&rounds, "sft.loss") > 0.0,
        "loss parsed from the trainer's log"
    );
    assert_eq!(rounds_metric(&rounds, "sft.step"), 11.0);
    assert!(rounds_metric(&rounds, "rpo.records") >= 1.0);
    let arts = artifacts_of(&c, &ok.id).await;
    let sft = arts.iter().find(|a| a.producer_stage == "sft").unwrap();
    let rpo = arts.iter().find(|a| a.producer_stage == "rpo").unwrap();
    assert_eq!(sft.kind, "model");
    let dir = artifacts::path_of(&sft.uri).unwrap();
    assert!(dir.join("model.safetensors").exists());
    assert_eq!(artifacts::hash_dir(&dir).unwrap(), sft.content_hash);
    assert!(
        rpo.parent_ids.contains(&sft.id),
        "rpo trained from the sft model"
    );
}

/// A moto S3 server on a free port with a bucket; returns the process and its endpoint.
async fn moto(dir: &Path, bucket: &str) -> (Proc, String) {
    let port = free_port();
    let log = std::fs::File::create(dir.join("moto.log")).unwrap();
    let server = python().with_file_name("moto_server");
    let child = Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start moto_server");
    let proc = Proc {
        child,
        name: "moto".into(),
    };
    let addr = format!("127.0.0.1:{port}");
    until("moto to answer", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move { std::net::TcpStream::connect(&addr).ok().map(|_| ()) }
    })
    .await;
    let (status, body) = http(&addr, "PUT", &format!("/{bucket}"), None, None);
    assert_eq!(status, 200, "create bucket: {body}");
    (proc, format!("http://{addr}"))
}

fn s3_options(endpoint: &str) -> [(&str, &str); 5] {
    [
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_region", "us-east-1"),
        ("aws_allow_http", "true"),
        ("aws_endpoint", endpoint),
    ]
}

const S3_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_ALLOW_HTTP", "true"),
];

#[tokio::test]
async fn artifact_store_on_s3_round_trips_uploads_in_parts_and_detects_corruption() {
    let dir = tempdir("s3");
    let (_moto, endpoint) = moto(&dir, "flywheel-unit").await;
    artifacts::configure_s3_bucket("flywheel-unit", &s3_options(&endpoint));

    let prefix = "s3://flywheel-unit/runs/1";
    let (uri, hash) = artifacts::write(prefix, "small.jsonl", b"{\"a\":1}\n").unwrap();
    assert_eq!(uri, "s3://flywheel-unit/runs/1/small.jsonl");
    assert_eq!(artifacts::read(&uri, &hash).unwrap(), b"{\"a\":1}\n");

    // 20 MiB goes up in three parts (moto's ETag of a multipart object ends in -<parts>).
    let big: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let (big_uri, big_hash) = artifacts::write(prefix, "big.bin", &big).unwrap();
    assert_eq!(artifacts::read(&big_uri, &big_hash).unwrap(), big);
    let host = endpoint.trim_start_matches("http://");
    let (status, head, _) = http_full(host, "HEAD", "/flywheel-unit/runs/1/big.bin", None, None);
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase().contains("-3\""),
        "multipart ETag expected: {head}"
    );

    // A changed object no longer matches the recorded hash.
    artifacts::write(prefix, "small.jsonl", b"{\"a\":2}\n").unwrap();
    let err = artifacts::read(&uri, &hash).unwrap_err();
    assert!(
        matches!(err, artifacts::ArtifactError::HashMismatch { .. }),
        "{err}"
    );

    // Directories (models): published file by file, downloaded into the cache and verified.
    let local = dir.join("model");
    std::fs::create_dir_all(local.join("sub")).unwrap();
    std::fs::write(local.join("config.json"), b"{}").unwrap();
    std::fs::write(local.join("sub/weights.bin"), vec![7u8; 1000]).unwrap();
    let expected = artifacts::hash_dir(&local).unwrap();
    let model_uri = format!("{prefix}/model");
    assert_eq!(
        artifacts::publish_dir(&local, &model_uri).unwrap(),
        expected
    );
    let fetched = artifacts::verified_dir(&model_uri, &expected).unwrap();
    assert_eq!(artifacts::hash_dir(&fetched).unwrap(), expected);
    assert!(artifacts::verified_dir(&model_uri, "sha256:0000").is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_campaign_keeps_its_artifacts_on_s3() {
    let mut c = Cluster::start().await;
    let (_moto, endpoint) = moto(&c.dir, "flywheel-runs").await;
    // Restart the controller with an S3 artifact root; workers get credentials from their env.
    c.controller = None;
    c.artifact_root = "s3://flywheel-runs/campaigns".into();
    c.grpc_addr = "127.0.0.1:0".into();
    c.start_controller().await;
    let env: Vec<(&str, &str)> = S3_ENV
        .iter()
        .copied()
        .chain([("AWS_ENDPOINT", endpoint.as_str())])
        .collect();
    c.add_worker_with_env("cpu-1", "cpu", &["--slots", "4"], &env);
    c.add_worker_with_env(
        "gpu-1",
        "gpu",
        &["--gpu-kind", "h100", "--gpu-count", "1", "--slots", "4"],
        &env,
    );
    let campaign = c.create(&example_spec(&[])).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(90))
        .await;
    let arts = artifacts_of(&c, &campaign.id).await;
    let produced: Vec<&Artifact> = arts
        .iter()
        .filter(|a| !a.producer_stage.is_empty())
        .collect();
    assert!(produced.len() >= 20);
    assert!(
        produced
            .iter()
            .all(|a| a.uri.starts_with("s3://flywheel-runs/campaigns/")
                && a.content_hash.starts_with("sha256:")),
        "{produced:#?}"
    );
    // The objects are really in the bucket, with the recorded hashes.
    artifacts::configure_s3_bucket("flywheel-runs", &s3_options(&endpoint));
    for a in &produced {
        artifacts::read(&a.uri, &a.content_hash).unwrap();
    }
}
