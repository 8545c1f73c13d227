//! The production loop through real servers: serve stages start `flywheel serve-model` (or a
//! fixture server from a custom command) for each round's generator and candidate, or swap a
//! long-lived server's weights; generation and evaluation go through the `openai` backend and
//! training through external `flywheel train` processes. The hashes the servers report prove
//! which model answered each round.

mod common;

use std::time::Duration;

use common::{
    Cluster, artifacts_of, endpoint_rows, hash_of, http, init_model, init_model_with,
    processes_mentioning, production_spec, production_workers, read_rows, serve_model,
    served_hashes, stage_error, until,
};
use flywheel_proto::v1::CampaignAction;
use flywheel_worker::artifacts;
use serde_json::Value;

const LAUNCH: &str = "{ template: flywheel, model: generator, startup_timeout_s: 60 }";
const GENERATE: &str = "{ endpoint: generator, k: 2, max_tokens: 6, seed: 1 }";

/// Waits until no `flywheel serve-model` process serves a model of this test's directory (a
/// stopped server may take a moment to exit after it closed its port).
async fn no_server_left(c: &Cluster) {
    let dir = c.dir.display().to_string();
    until("the servers to exit", Duration::from_secs(15), || {
        let dir = dir.clone();
        async move {
            let left: Vec<u32> = processes_mentioning("serve-model")
                .into_iter()
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|line| String::from_utf8_lossy(&line).contains(&dir))
                        .unwrap_or(false)
                })
                .collect();
            left.is_empty().then_some(())
        }
    })
    .await;
}

/// `GET /v1/models` of a server.
fn models_of(base: &str) -> Value {
    let addr = base.trim_start_matches("http://").trim_end_matches("/v1");
    let (status, body) = http(addr, "GET", "/v1/models", None, None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn each_round_is_answered_by_the_previous_rounds_promoted_model() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    production_workers(&mut c, &[], 1);
    let spec = production_spec("served", &model, &reward, 2, LAUNCH, GENERATE);
    let campaign = c.create(&spec).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(300))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    let arts = artifacts_of(&c, &campaign.id).await;
    // Round 1 is answered by the initial generator, round 2 by round 1's promoted model.
    let initial = artifacts::hash_dir(&model).unwrap();
    assert_eq!(served_hashes(&arts, 0), vec![initial.clone()]);
    assert_eq!(rounds[0].decision, "promoted");
    assert_eq!(rounds[1].generator_id, rounds[0].trained_model_id);
    let promoted = hash_of(&arts, &rounds[0].trained_model_id);
    assert_ne!(promoted, initial);
    assert_eq!(served_hashes(&arts, 1), vec![promoted.clone()]);
    // Every response says which weights answered and which model that is.
    for a in arts.iter().filter(|a| a.producer_stage == "generate") {
        for r in read_rows(a) {
            let want = if a.round_index == 0 {
                &initial
            } else {
                &promoted
            };
            assert_eq!(r["served_by"], want.as_str());
        }
    }
    // Evaluation went through both servers of the round.
    assert!(rounds[1].metrics.contains_key("evaluate.accuracy"));
    assert!(
        rounds[1]
            .metrics
            .contains_key("evaluate.generator_accuracy")
    );
    // Four endpoints, each stopped after its consumers finished, each with the weights it served.
    let rows = endpoint_rows(&c, &campaign.id).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(
        rows.iter().all(|r| r.4 == "stopped" && r.1 == 1),
        "{rows:?}"
    );
    let candidate_1 = rows.iter().find(|r| r.0 == "candidate").unwrap();
    assert_eq!(candidate_1.3, promoted);
    // The control API and the JSON API show the same endpoints.
    let listed = c
        .admin_client()
        .await
        .list_endpoints(campaign.id.clone())
        .await
        .unwrap();
    let seen: Vec<(String, i32, String, String, String)> = listed
        .iter()
        .map(|e| {
            (
                e.stage.clone(),
                e.attempt,
                e.url.clone(),
                e.content_hash.clone(),
                e.state.clone(),
            )
        })
        .collect();
    assert_eq!(seen, rows);
    assert_eq!(listed[2].round_index, 1);
    assert!(listed.iter().all(|e| !e.finished_at.is_empty()));
    let (status, body) = http(
        &c.http_addr(),
        "GET",
        &format!("/api/v1/campaigns/{}/endpoints", campaign.id),
        Some(&c.read_token),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["endpoints"].as_array().unwrap().len(), 4);
    no_server_left(&c).await;
}

#[tokio::test]
async fn a_long_lived_server_is_swapped_to_each_rounds_generator() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    // The server starts on other weights: only the swap makes it answer as the generator.
    let other = init_model_with(&c.dir, "other", false, &["--seed", "5"]);
    let (_server, base) = serve_model(&c.dir, &other, "long-lived").await;
    production_workers(&mut c, &[], 1);
    let swap = format!("{{ url: \"{base}\", swap: sglang, served_name: long-lived }}");
    let spec = production_spec("swapped", &model, &reward, 2, &swap, GENERATE);
    let campaign = c.create(&spec).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(300))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    let arts = artifacts_of(&c, &campaign.id).await;
    assert_eq!(
        served_hashes(&arts, 0),
        vec![artifacts::hash_dir(&model).unwrap()]
    );
    let promoted = hash_of(&arts, &rounds[0].trained_model_id);
    assert_eq!(served_hashes(&arts, 1), vec![promoted.clone()]);
    // The server is still up (Flywheel does not own it), serving round 2's generator.
    let models = models_of(&base);
    assert_eq!(models["data"][0]["content_hash"], promoted.as_str());
}

#[tokio::test]
async fn a_refused_swap_fails_generation_with_the_servers_message() {
    let mut c = Cluster::start().await;
    let reward = init_model(&c.dir, "rm", true);
    let good = init_model(&c.dir, "good", false);
    let (_server, base) = serve_model(&c.dir, &good, "long-lived").await;
    // A generator directory that is not a checkpoint: the server refuses to load it.
    let broken = c.dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{}").unwrap();
    production_workers(&mut c, &[], 1);
    let swap = format!("{{ url: \"{base}\", swap: sglang, served_name: long-lived }}");
    let spec = production_spec("refused", &broken, &reward, 1, &swap, GENERATE);
    let campaign = c.create(&spec).await;
    c.wait_status(&campaign.id, "failed", Duration::from_secs(120))
        .await;
    let error = stage_error(&c, &campaign.id, "generator").await;
    let rounds = c.rounds(&campaign.id).await;
    assert!(error.contains("refused the new weights"), "{error}");
    assert!(error.contains("cannot load the checkpoint"), "{error}");
    // Nothing was generated on the old weights.
    let generate = rounds[0]
        .stages
        .iter()
        .find(|s| s.name == "generate")
        .unwrap();
    assert!(
        generate.tasks.iter().all(|t| t.state == "blocked"),
        "{generate:?}"
    );
    let models = models_of(&base);
    assert_eq!(
        models["data"][0]["content_hash"],
        artifacts::hash_dir(&good).unwrap().as_str()
    );
}

#[tokio::test]
async fn a_server_whose_worker_dies_is_started_elsewhere_and_generation_completes() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    production_workers(&mut c, &[], 2);
    // Enough requests, one at a time, that generation is still running when the server dies.
    let generate =
        "{ endpoint: generator, k: 1, use_n: false, max_tokens: 6, seed: 1, concurrency: 1 }";
    let spec = production_spec("killed", &model, &reward, 1, LAUNCH, generate)
        .replace("params: { count: 8 }", "params: { count: 1200 }");
    let campaign = c.create(&spec).await;
    // Once the generate shards have answers in flight, kill the worker running the server.
    let worker: String = until(
        "generation to be under way",
        Duration::from_secs(120),
        || {
            let db = &c.db;
            let id = campaign.id.clone();
            async move {
                let mut conn = db.connect().await;
                let busy: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM tasks WHERE campaign_id = $1::uuid AND stage = 'generate'
                 AND state = 'running' AND (progress_metrics->>'requests')::float8 > 0",
                )
                .bind(&id)
                .fetch_one(&mut conn)
                .await
                .unwrap();
                if busy == 0 {
                    return None;
                }
                sqlx::query_scalar(
                    "SELECT w.name FROM tasks t JOIN workers w ON w.id = t.worker_id
                 WHERE t.campaign_id = $1::uuid AND t.stage = 'generator' AND t.state = 'running'",
                )
                .bind(&id)
                .fetch_optional(&mut conn)
                .await
                .unwrap()
            }
        },
    )
    .await;
    let first_url = endpoint_rows(&c, &campaign.id).await[0].2.clone();
    c.workers
        .iter_mut()
        .find(|w| w.name == worker)
        .unwrap()
        .kill9();
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(300))
        .await;
    // The server was started again (a new attempt, another URL); the old one is gone.
    let rows = endpoint_rows(&c, &campaign.id).await;
    let generator: Vec<_> = rows.iter().filter(|r| r.0 == "generator").collect();
    assert_eq!(generator.len(), 2, "{rows:?}");
    assert_eq!(generator[0].4, "gone");
    assert_eq!(generator[1].4, "stopped");
    assert_ne!(generator[1].2, first_url);
    // Every generate shard has exactly one accepted result, and some retried against the new URL.
    let accepted: Vec<(i32, i64, i32)> = sqlx::query_as(
        "SELECT t.shard_index, count(a.*) FILTER (WHERE a.state = 'succeeded'), max(t.attempt)
         FROM tasks t JOIN attempts a ON a.task_id = t.id
         WHERE t.campaign_id = $1::uuid AND t.stage = 'generate' GROUP BY t.shard_index",
    )
    .bind(&campaign.id)
    .fetch_all(&mut c.db.connect().await)
    .await
    .unwrap();
    assert_eq!(accepted.len(), 2);
    assert!(accepted.iter().all(|a| a.1 == 1), "{accepted:?}");
    assert!(
        accepted.iter().any(|a| a.2 >= 2),
        "no shard retried: {accepted:?}"
    );
    let arts = artifacts_of(&c, &campaign.id).await;
    let responses: Vec<_> = arts
        .iter()
        .filter(|a| a.producer_stage == "generate")
        .collect();
    assert_eq!(responses.len(), 2);
    assert_eq!(
        served_hashes(&arts, 0),
        vec![artifacts::hash_dir(&model).unwrap()]
    );
    // The killed worker's server died with it.
    no_server_left(&c).await;
}

/// Whether something listens on the endpoint's port.
/// Waits until the campaign's `n`th endpoint (1-based, in order of readiness) is the last one
/// and ready; returns its URL.
async fn nth_endpoint_ready(c: &Cluster, campaign: &str, n: usize) -> String {
    until(
        "the endpoint to be ready",
        Duration::from_secs(60),
        || async move {
            let rows = endpoint_rows(c, campaign).await;
            (rows.len() == n && rows[n - 1].4 == "ready").then(|| rows[n - 1].2.clone())
        },
    )
    .await
}

fn listening(url: &str) -> bool {
    let addr = url.trim_start_matches("http://").trim_end_matches("/v1");
    std::net::TcpStream::connect(addr).is_ok()
}

#[tokio::test]
async fn pause_and_cancel_stop_the_campaigns_servers() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    production_workers(&mut c, &[], 1);
    // The prompts never come: the server is up and its consumer waits.
    let spec = production_spec("stopped", &model, &reward, 1, LAUNCH, GENERATE).replace(
        "{ name: prompts, kind: synthesize_prompts, params: { count: 8 } }",
        "{ name: prompts, kind: synthesize_prompts, backend: test, params: { sleep_ms: 600000 } }",
    );
    let campaign = c.create(&spec).await;
    let url = nth_endpoint_ready(&c, &campaign.id, 1).await;
    assert!(listening(&url));
    let mut client = c.admin_client().await;
    let action = || CampaignAction {
        campaign_id: campaign.id.clone(),
        reason: String::new(),
    };
    client.pause_campaign(action()).await.unwrap();
    until(
        "the paused campaign's server to stop",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            async move { (!listening(&url)).then_some(()) }
        },
    )
    .await;
    assert_eq!(endpoint_rows(&c, &campaign.id).await[0].4, "gone");
    no_server_left(&c).await;
    // Resumed, the server starts again.
    client.resume_campaign(action()).await.unwrap();
    let url = nth_endpoint_ready(&c, &campaign.id, 2).await;
    assert!(listening(&url));
    client.cancel_campaign(action()).await.unwrap();
    c.wait_status(&campaign.id, "cancelled", Duration::from_secs(30))
        .await;
    until(
        "the cancelled campaign's server to stop",
        Duration::from_secs(30),
        || {
            let url = url.clone();
            async move { (!listening(&url)).then_some(()) }
        },
    )
    .await;
    // The port is free again.
    let port: u16 = url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/v1")
        .parse()
        .unwrap();
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the server's port is free");
    no_server_left(&c).await;
}

/// Regression: a paused server that takes a while to exit was still winding down when the
/// resumed task's next attempt reached the same worker; the old attempt's cleanup then dropped
/// the new attempt from the worker's heartbeats, so the new server never heard the cancel
/// (and, its lease unrenewed, a third server started beside it).
#[tokio::test]
async fn an_attempt_still_stopping_does_not_hide_the_next_one() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    production_workers(&mut c, &[], 1);
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rule_server.py");
    let slow_to_exit = format!(
        "{{ command: [python3, \"{fixture}\", --port, \"{{port}}\", --name, \"{{served_name}}\", --rule, generator, --term-delay, \"3\"], model: generator, startup_timeout_s: 30 }}"
    );
    let spec = production_spec("overlap", &model, &reward, 1, &slow_to_exit, GENERATE).replace(
        "{ name: prompts, kind: synthesize_prompts, params: { count: 8 } }",
        "{ name: prompts, kind: synthesize_prompts, backend: test, params: { sleep_ms: 600000 } }",
    );
    let campaign = c.create(&spec).await;
    let first = nth_endpoint_ready(&c, &campaign.id, 1).await;
    let mut client = c.admin_client().await;
    let action = || CampaignAction {
        campaign_id: campaign.id.clone(),
        reason: String::new(),
    };
    // Resumed at once: the first server is still draining when the second attempt starts.
    client.pause_campaign(action()).await.unwrap();
    client.resume_campaign(action()).await.unwrap();
    let second = nth_endpoint_ready(&c, &campaign.id, 2).await;
    until("the first server to exit", Duration::from_secs(30), || {
        let first = first.clone();
        async move { (!listening(&first)).then_some(()) }
    })
    .await;
    assert!(listening(&second), "the second server is serving");
    client.cancel_campaign(action()).await.unwrap();
    c.wait_status(&campaign.id, "cancelled", Duration::from_secs(30))
        .await;
    until(
        "the second server to hear the cancel and exit",
        Duration::from_secs(30),
        || {
            let second = second.clone();
            async move { (!listening(&second)).then_some(()) }
        },
    )
    .await;
    let rows = endpoint_rows(&c, &campaign.id).await;
    assert_eq!(rows.len(), 2, "no third server: {rows:?}");
    assert!(rows.iter().all(|r| r.4 == "gone"), "{rows:?}");
}

#[tokio::test]
async fn evaluation_through_the_api_matches_hand_computed_numbers() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    production_workers(&mut c, &[], 1);
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rule_server.py");
    let serve = |rule: &str| {
        format!(
            "{{ command: [python3, \"{fixture}\", --port, \"{{port}}\", --name, \"{{served_name}}\", --rule, {rule}], model: {}, startup_timeout_s: 30 }}",
            if rule == "candidate" {
                "candidate"
            } else {
                "generator"
            }
        )
    };
    let spec = format!(
        "apiVersion: flywheel/v1
name: eval-numbers
models:
  generator: {{ name: tiny, uri: \"file://{m}\" }}
  base: {{ name: base, uri: \"file://{m}\" }}
  reward: {{ name: reward, uri: \"file://{m}\" }}
rounds: 1
defaults: {{ pool: cpu, backend: builtin, max_attempts: 1 }}
recipe:
  stages:
    - {{ name: heldout, kind: synthesize_prompts, params: {{ split: held_out, seed: 11, count: 40, subtopics: [add, upper, reverse] }} }}
    - {{ name: sft, kind: sft, backend: external, pool: gpu, needs: [], params: {{ command: [sh, -c, \"echo weights > {{output_dir}}/weights\"] }} }}
    - {{ name: candidate, kind: serve, backend: external, pool: gpu, needs: [sft], params: {cand} }}
    - {{ name: generator, kind: serve, backend: external, pool: gpu, needs: [], params: {generator} }}
    - {{ name: judge, kind: serve, backend: external, pool: gpu, needs: [], params: {judge} }}
    - name: evaluate
      kind: evaluate
      backend: openai
      needs: [heldout]
      params: {{ candidate_endpoint: candidate, generator_endpoint: generator, judge_endpoint: judge, bootstrap: 500, seed: 3 }}
    - {{ name: promote, kind: promote, params: {{ require: {{ evaluate.win_rate: \">= 0.5\" }} }} }}
",
        m = model.display(),
        cand = serve("candidate"),
        generator = serve("generator"),
        judge = serve("judge"),
    );
    let campaign = c.create(&spec).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(120))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    let arts = artifacts_of(&c, &campaign.id).await;
    let prompts = read_rows(arts.iter().find(|a| a.producer_stage == "heldout").unwrap());
    // By the fixture's rules: the candidate gets add and upper right, everything else wrong
    // ("x", like the generator); the judge prefers the answer that is not "x" in both orders,
    // and identical answers are a tie.
    let n = prompts.len() as f64;
    let right = prompts
        .iter()
        .filter(|p| matches!(p["subtopic"].as_str(), Some("add" | "upper")))
        .count() as f64;
    assert!(right > 0.0 && right < n);
    let m = &rounds[0].metrics;
    assert_eq!(m["evaluate.prompts"], n);
    assert_eq!(m["evaluate.accuracy"], right / n);
    assert_eq!(m["evaluate.generator_accuracy"], 0.0);
    assert_eq!(m["evaluate.accuracy_gain"], right / n);
    assert_eq!(m["evaluate.wins"], right);
    assert_eq!(m["evaluate.ties"], n - right);
    assert_eq!(m["evaluate.losses"], 0.0);
    let win_rate = (right + 0.5 * (n - right)) / n;
    assert_eq!(m["evaluate.win_rate"], win_rate);
    assert!(m["evaluate.win_rate_ci_low"] < win_rate && win_rate < m["evaluate.win_rate_ci_high"]);
    // Two judge requests per differing answer, none for ties.
    assert_eq!(rounds[0].decision, "promoted");
    let eval = read_rows(
        arts.iter()
            .find(|a| a.producer_stage == "evaluate")
            .unwrap(),
    );
    assert_eq!(
        eval.iter().filter(|r| r["correct"] == true).count() as f64,
        right
    );
}

#[tokio::test]
async fn a_spec_naming_an_endpoint_it_does_not_serve_is_refused_at_submission() {
    let c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let spec = production_spec("refused-spec", &model, &model, 1, LAUNCH, GENERATE);
    let mut client = c.admin_client().await;
    for (bad, path) in [
        (
            spec.replace("{ endpoint: generator, k: 2", "{ endpoint: prompts, k: 2"),
            "recipe.stages[3].params.endpoint",
        ),
        (
            spec.replace(
                "candidate_endpoint: candidate",
                "candidate_endpoint: nowhere",
            ),
            "recipe.stages[8].params.candidate_endpoint",
        ),
        (
            spec.replace(
                "kind: serve\n      backend: external",
                "kind: serve\n      backend: test",
            ),
            "recipe.stages[2]",
        ),
    ] {
        let e = client.create_campaign(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(path), "{path}: {}", e.message());
    }
    // Nothing was stored.
    assert!(client.list_campaigns().await.unwrap().is_empty());
}

/// lm-evaluation-harness from PyPI (with its dependencies, in `target/lmeval-env`, which
/// `scripts/test` creates) run by the `lm_eval` template against a served model, on a task
/// defined here: its results JSON becomes stage metrics, and a gate reads them.
#[tokio::test]
async fn lm_eval_runs_for_real_against_a_served_model_and_its_results_gate_promotion() {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/lmeval-env/bin");
    assert!(
        bin.join("lm_eval").exists(),
        "no {}/lm_eval: scripts/test installs lm-eval there",
        bin.display()
    );
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    // The model's greedy answers, asked as lm_eval asks them: half the targets are its own
    // first lines, half are not, so exact_match must be 0.5.
    let (_probe, base) = serve_model(&c.dir, &model, "probe").await;
    let addr = base.trim_start_matches("http://").trim_end_matches("/v1");
    let prompts = [
        "add 1 2",
        "upper abc",
        "reverse abc",
        "add 4 4",
        "upper dog",
        "sort cab",
    ];
    let mut rows = String::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let request = serde_json::json!({
            "model": "probe", "messages": [{ "role": "user", "content": prompt }],
            "max_tokens": 16, "temperature": 0.0,
        });
        let (status, body) = http(
            addr,
            "POST",
            "/v1/chat/completions",
            None,
            Some(&request.to_string()),
        );
        assert_eq!(status, 200, "{body}");
        let reply: Value = serde_json::from_str(&body).unwrap();
        let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
        let first = text.split('\n').next().unwrap();
        let target = if i % 2 == 0 {
            first.to_string()
        } else {
            format!("{first} (not this)")
        };
        rows.push_str(&format!(
            "{}\n",
            serde_json::json!({ "prompt": prompt, "answer": target })
        ));
    }
    let tasks = c.dir.join("lm-tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    let data = tasks.join("echo.jsonl");
    std::fs::write(&data, rows).unwrap();
    std::fs::write(
        tasks.join("flywheel_echo.yaml"),
        format!(
            "task: flywheel_echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {}
test_split: test
output_type: generate_until
doc_to_text: \"{{{{prompt}}}}\"
doc_to_target: \"{{{{answer}}}}\"
generation_kwargs:
  until: [\"\\n\"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
",
            data.display()
        ),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    c.add_worker_with_env(
        "gpu-0",
        "gpu",
        &["--backend", "external", "--slots", "3"],
        &[("PATH", &path)],
    );
    let spec = format!(
        "apiVersion: flywheel/v1
name: lm-eval-for-real
models:
  generator: {{ name: tiny, uri: \"file://{m}\" }}
  base: {{ name: base, uri: \"file://{m}\" }}
  reward: {{ name: reward, uri: \"file://{m}\" }}
rounds: 1
defaults: {{ pool: gpu, backend: external, max_attempts: 1 }}
recipe:
  stages:
    - {{ name: sft, kind: sft, needs: [], params: {{ command: [sh, -c, \"cp -r {m}/. {{output_dir}}/\"] }} }}
    - {{ name: candidate, kind: serve, needs: [sft], params: {{ template: flywheel, model: candidate, startup_timeout_s: 60 }} }}
    - name: harness
      kind: evaluate
      needs: [candidate]
      params:
        template: lm_eval
        endpoint: candidate
        tasks: [flywheel_echo]
        include_path: {tasks}
        concurrency: 2
        env: {{ HF_DATASETS_OFFLINE: \"1\", HF_HUB_OFFLINE: \"1\" }}
    - {{ name: promote, kind: promote, params: {{ require: {{ harness.flywheel_echo.exact_match: \">= 0.5\" }} }} }}
",
        m = model.display(),
        tasks = tasks.display(),
    );
    let campaign = c.create(&spec).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(240))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    let m = &rounds[0].metrics;
    assert_eq!(m["harness.flywheel_echo.exact_match"], 0.5, "{m:?}");
    assert_eq!(
        rounds[0].decision, "promoted",
        "{}",
        rounds[0].decision_reason
    );
}
