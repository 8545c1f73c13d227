//! The Slurm executor on a real one-node Slurm cluster (Debian's slurm-wlm, started by
//! `scripts/test`, config in `target/slurm`): a training stage as a batch job followed to its
//! end, a failing job, a cancelled job, a worker killed mid-job whose successor re-attaches
//! to the same job; and each round's generator served from a Slurm job.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    Cluster, artifacts_of, endpoint_rows, hash_of, http, init_model, model_spec, production_spec,
    production_workers, served_hashes, stage_error, until,
};
use flywheel_worker::artifacts;

/// The cluster's config; the tests fail (never pass silently) where no cluster runs.
fn slurm_conf() -> String {
    let conf = std::env::var("SLURM_CONF").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/slurm/slurm.conf").to_string()
    });
    assert!(
        Path::new(&conf).exists(),
        "{conf} is missing: run scripts/test, which starts a one-node Slurm cluster"
    );
    let ok = Command::new("sinfo")
        .env("SLURM_CONF", &conf)
        .arg("-h")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "sinfo fails: the Slurm cluster of {conf} is not running (run scripts/test)"
    );
    conf
}

fn slurm(conf: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .env("SLURM_CONF", conf)
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Jobs the controller knows named `name` (finished ones are kept for MinJobAge, 300 s).
fn jobs_named(conf: &str, name: &str) -> Vec<String> {
    slurm(conf, "scontrol", &["show", "job", "-o"])
        .lines()
        .filter(|l| l.split_whitespace().any(|f| f == format!("JobName={name}")))
        .map(String::from)
        .collect()
}

fn worker(c: &mut Cluster, name: &str, conf: &str) -> usize {
    c.add_worker_with_env(
        name,
        "cpu",
        &[
            "--backend",
            "builtin",
            "--backend",
            "external",
            "--slots",
            "3",
        ],
        &[("SLURM_CONF", conf)],
    )
}

/// The cluster job each attempt of the task recorded, by attempt.
async fn attempt_jobs(c: &Cluster, task: &str) -> Vec<(i32, Option<String>)> {
    sqlx::query_as(
        "SELECT attempt, external_job FROM attempts WHERE task_id = $1::uuid ORDER BY attempt",
    )
    .bind(task)
    .fetch_all(&mut c.db.connect().await)
    .await
    .unwrap()
}

/// Waits until the job named `name` runs on the cluster.
async fn job_running(conf: &str, name: &str) {
    until("the job to run", Duration::from_secs(120), || async {
        let q = slurm(conf, "squeue", &["-h", "-n", name, "-o", "%T"]);
        (q.trim() == "RUNNING").then_some(())
    })
    .await;
}

/// The sft task's id once it runs, and its Slurm job's name.
async fn running_sft(c: &Cluster, campaign: &str) -> (String, String) {
    let id = until("the sft task to run", Duration::from_secs(90), || async {
        let rounds = c.rounds(campaign).await;
        let s = rounds[0].stages.iter().find(|s| s.name == "sft")?;
        (s.tasks[0].state == "running").then(|| s.tasks[0].id.clone())
    })
    .await;
    let name = format!("flywheel-{id}");
    (id, name)
}

#[tokio::test]
async fn a_training_stage_runs_as_a_slurm_job_followed_to_completion() {
    let conf = slurm_conf();
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    worker(&mut c, "login-0", &conf);
    let stages = "    - { name: prompts, kind: synthesize_prompts, params: { count: 8 } }
    - { name: generate, kind: generate, params: { k: 2, max_tokens: 6 } }
    - { name: score, kind: score }
    - { name: filter, kind: filter, params: { margin: 0.0 } }
    - { name: sft, kind: sft, backend: external, params: { template: flywheel, executor: slurm, gpus_per_node: 0, steps: 12, batch_size: 4, lr: 0.001, time_limit: \"00:10:00\" } }
";
    let campaign = c
        .create(&model_spec("slurm-ok", &model, &reward, stages))
        .await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(180))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    let sft = rounds[0].stages.iter().find(|s| s.name == "sft").unwrap();
    let task = &sft.tasks[0];
    // The job id is on the attempt in Postgres; the job ran under the task's name and ended
    // COMPLETED with exit code 0.
    let (_, detail) = http(
        &c.http_addr(),
        "GET",
        &format!("/api/v1/tasks/{}", task.id),
        Some(&c.read_token),
        None,
    );
    let detail: serde_json::Value = serde_json::from_str(&detail).unwrap();
    let progress: serde_json::Value =
        serde_json::from_str(detail["progress_metrics_json"].as_str().unwrap()).unwrap();
    let job_id = progress["slurm_job_id"]
        .as_f64()
        .expect("slurm_job_id recorded") as u64;
    let jobs = jobs_named(&conf, &format!("flywheel-{}", task.id));
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].contains(&format!("JobId={job_id} ")), "{jobs:?}");
    assert!(jobs[0].contains("JobState=COMPLETED"), "{jobs:?}");
    assert!(jobs[0].contains("ExitCode=0:0"), "{jobs:?}");
    assert!(jobs[0].contains("TimeLimit=00:10:00"), "{jobs:?}");
    // The job's log was followed: the trainer's step and loss are the task's metrics.
    let metrics: serde_json::Value =
        serde_json::from_str(detail["metrics_json"].as_str().unwrap()).unwrap();
    assert_eq!(metrics["step"].as_f64(), Some(11.0), "{metrics}");
    assert!(metrics["loss"].is_number(), "{metrics}");
    assert_eq!(
        metrics["slurm_job_id"].as_f64(),
        Some(job_id as f64),
        "{metrics}"
    );
    let waited = metrics["slurm_wait_s"].as_f64().unwrap();
    assert!(waited >= 0.0, "{metrics}");
    eprintln!("slurm job {job_id}: {waited:.2} s from sbatch to RUNNING");
    // ... and recorded on the attempt, in the task's detail too.
    let want = format!("slurm:{job_id}");
    assert_eq!(attempt_jobs(&c, &task.id).await, [(1, Some(want.clone()))]);
    assert_eq!(
        detail["attempts"][0]["external_job"],
        want.as_str(),
        "{detail}"
    );
    // The model is registered with the hash of what the job wrote.
    let arts = artifacts_of(&c, &campaign.id).await;
    let m = arts
        .iter()
        .find(|a| a.producer_stage == "sft" && a.kind == "model")
        .unwrap();
    let dir = flywheel_worker::artifacts::path_of(&m.uri).unwrap();
    assert_eq!(
        flywheel_worker::artifacts::hash_dir(&dir).unwrap(),
        m.content_hash
    );
}

#[tokio::test]
async fn a_job_that_exits_3_fails_the_task_with_its_log() {
    let conf = slurm_conf();
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    worker(&mut c, "login-0", &conf);
    let stages = "    - { name: prompts, kind: synthesize_prompts, params: { count: 2 } }
    - name: sft
      kind: sft
      backend: external
      max_attempts: 1
      params: { executor: slurm, gpus_per_node: 0, command: [sh, -c, \"echo step=0 loss=2.5; echo 'RuntimeError: CUDA out of memory' >&2; exit 3\"] }
";
    let campaign = c
        .create(&model_spec("slurm-fail", &model, &reward, stages))
        .await;
    c.wait_status(&campaign.id, "failed", Duration::from_secs(90))
        .await;
    let error = stage_error(&c, &campaign.id, "sft").await;
    assert!(error.contains("ended FAILED with exit code 3:0"), "{error}");
    assert!(error.contains("CUDA out of memory"), "{error}");
}

#[tokio::test]
async fn cancelling_the_campaign_scancels_the_job() {
    let conf = slurm_conf();
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    worker(&mut c, "login-0", &conf);
    let stages = "    - { name: prompts, kind: synthesize_prompts, params: { count: 2 } }
    - { name: sft, kind: sft, backend: external, params: { executor: slurm, gpus_per_node: 0, command: [sleep, \"600\"] } }
";
    let campaign = c
        .create(&model_spec("slurm-cancel", &model, &reward, stages))
        .await;
    let (_, name) = running_sft(&c, &campaign.id).await;
    job_running(&conf, &name).await;
    c.admin_client()
        .await
        .cancel_campaign(flywheel_proto::v1::CampaignAction {
            campaign_id: campaign.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    c.wait_status(&campaign.id, "cancelled", Duration::from_secs(30))
        .await;
    until(
        "the job to leave squeue",
        Duration::from_secs(60),
        || async {
            slurm(&conf, "squeue", &["-h", "-n", &name])
                .trim()
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let jobs = jobs_named(&conf, &name);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].contains("JobState=CANCELLED"), "{jobs:?}");
}

#[tokio::test]
async fn a_restarted_worker_reattaches_to_the_running_job() {
    let conf = slurm_conf();
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    let first = worker(&mut c, "login-0", &conf);
    // The job outlives the worker: it writes the model after 8 s.
    let stages = "    - { name: prompts, kind: synthesize_prompts, params: { count: 2 } }
    - { name: sft, kind: sft, backend: external, max_attempts: 3, params: { executor: slurm, gpus_per_node: 0, command: [sh, -c, \"sleep 8; echo weights > {output_dir}/weights\"] } }
";
    let campaign = c
        .create(&model_spec("slurm-reattach", &model, &reward, stages))
        .await;
    let (_, name) = running_sft(&c, &campaign.id).await;
    job_running(&conf, &name).await;
    c.workers[first].kill9();
    worker(&mut c, "login-1", &conf);
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(120))
        .await;
    // One job for the task, though two attempts ran it.
    let jobs = jobs_named(&conf, &name);
    assert_eq!(jobs.len(), 1, "a second job was submitted: {jobs:?}");
    let rounds = c.rounds(&campaign.id).await;
    let task = &rounds[0]
        .stages
        .iter()
        .find(|s| s.name == "sft")
        .unwrap()
        .tasks[0];
    assert!(task.attempt >= 2, "attempt {}", task.attempt);
    // Every attempt recorded the same job.
    let recorded = attempt_jobs(&c, &task.id).await;
    assert!(recorded.len() >= 2, "{recorded:?}");
    assert!(
        recorded
            .iter()
            .all(|(_, j)| j.is_some() && *j == recorded[0].1),
        "{recorded:?}"
    );
    let arts = artifacts_of(&c, &campaign.id).await;
    let m = arts
        .iter()
        .find(|a| a.producer_stage == "sft" && a.kind == "model")
        .unwrap();
    let dir: PathBuf = flywheel_worker::artifacts::path_of(&m.uri).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("weights")).unwrap(),
        "weights\n"
    );
}

#[tokio::test]
async fn a_job_over_its_time_limit_ends_timeout_and_is_retried() {
    let conf = slurm_conf();
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    worker(&mut c, "login-0", &conf);
    // The first job outlives its 1-minute limit; the retry finds the marker and finishes.
    let marker = c.dir.join("first-job-ran");
    let stages = format!(
        "    - {{ name: prompts, kind: synthesize_prompts, params: {{ count: 2 }} }}
    - {{ name: sft, kind: sft, backend: external, max_attempts: 2, params: {{ executor: slurm, gpus_per_node: 0, time_limit: \"1\", command: [sh, -c, \"if [ -e {m} ]; then echo w > {{output_dir}}/weights; else touch {m}; sleep 600; fi\"] }} }}
",
        m = marker.display()
    );
    let campaign = c
        .create(&model_spec("slurm-timeout", &model, &reward, &stages))
        .await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(240))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    let task = &rounds[0]
        .stages
        .iter()
        .find(|s| s.name == "sft")
        .unwrap()
        .tasks[0];
    assert_eq!(task.attempt, 2);
    let jobs = jobs_named(&conf, &format!("flywheel-{}", task.id));
    let states: Vec<&str> = jobs
        .iter()
        .filter_map(|j| j.split_whitespace().find(|f| f.starts_with("JobState=")))
        .collect();
    assert_eq!(
        states,
        ["JobState=TIMEOUT", "JobState=COMPLETED"],
        "{jobs:?}"
    );
}

/// A generator served from a Slurm job, and the workers: `gpu` submits jobs and trains, `cpu`
/// generates and evaluates through the endpoints.
fn slurm_served(c: &mut Cluster, conf: &str, name: &str, rounds: u32, generate: &str) -> String {
    let model = init_model(&c.dir, "gen", false);
    let reward = init_model(&c.dir, "rm", true);
    production_workers(c, &[("SLURM_CONF", conf)], 1);
    let launch = "{ template: flywheel, model: generator, executor: slurm, gpus_per_node: 0, time_limit: \"00:10:00\", startup_timeout_s: 60 }";
    production_spec(name, &model, &reward, rounds, launch, generate)
}

/// The Slurm job ids the serve stage `stage` reported, one per task, in round order.
async fn served_job_ids(c: &Cluster, campaign: &str, stage: &str) -> Vec<(String, u64)> {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT id::text, (metrics->>'slurm_job_id')::float8 FROM tasks
         WHERE campaign_id = $1::uuid AND stage = $2 ORDER BY round_index",
    )
    .bind(campaign)
    .bind(stage)
    .fetch_all(&mut c.db.connect().await)
    .await
    .unwrap();
    rows.into_iter().map(|(id, job)| (id, job as u64)).collect()
}

#[tokio::test]
async fn each_rounds_generator_is_served_from_a_slurm_job() {
    let conf = slurm_conf();
    let mut c = Cluster::start().await;
    let spec = slurm_served(
        &mut c,
        &conf,
        "slurm-served",
        2,
        "{ endpoint: generator, k: 2, max_tokens: 6, seed: 1 }",
    );
    let campaign = c.create(&spec).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(300))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    let arts = artifacts_of(&c, &campaign.id).await;
    // Round 2 was answered, through the job's server, by round 1's promoted model.
    let initial = artifacts::hash_dir(&c.dir.join("gen")).unwrap();
    assert_eq!(served_hashes(&arts, 0), vec![initial.clone()]);
    assert_eq!(rounds[1].generator_id, rounds[0].trained_model_id);
    let promoted = hash_of(&arts, &rounds[0].trained_model_id);
    assert_ne!(promoted, initial);
    assert_eq!(served_hashes(&arts, 1), vec![promoted.clone()]);
    // The server listened on all addresses of the job's node, which the endpoint names.
    // (The test cluster's one node is this machine, by its short name.)
    let node =
        String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout).unwrap();
    let rows = endpoint_rows(&c, &campaign.id).await;
    let served: Vec<_> = rows.iter().filter(|r| r.0 == "generator").collect();
    assert_eq!(served.len(), 2, "{rows:?}");
    assert_eq!(served[1].3, promoted);
    for r in &served {
        assert!(
            r.2.starts_with(&format!("http://{}:", node.trim())),
            "{r:?}"
        );
        assert_eq!(r.4, "stopped", "{r:?}");
    }
    // One job per round's server, recorded on its task, cancelled once its consumers finished.
    let jobs = served_job_ids(&c, &campaign.id, "generator").await;
    assert_eq!(jobs.len(), 2);
    for (task, job) in jobs {
        let named = jobs_named(&conf, &format!("flywheel-{task}"));
        assert_eq!(named.len(), 1, "{named:?}");
        assert!(named[0].contains(&format!("JobId={job} ")), "{named:?}");
        assert!(named[0].contains("JobState=CANCELLED"), "{named:?}");
    }
}

#[tokio::test]
async fn a_slurm_server_outlives_its_worker_and_the_successor_reattaches() {
    let conf = slurm_conf();
    let mut c = Cluster::start().await;
    // Requests one at a time, so that generation is under way when the worker dies.
    let spec = slurm_served(
        &mut c,
        &conf,
        "slurm-served-reattach",
        1,
        "{ endpoint: generator, k: 1, use_n: false, max_tokens: 6, seed: 1, concurrency: 1 }",
    )
    .replace("params: { count: 8 }", "params: { count: 1000 }");
    let campaign = c.create(&spec).await;
    let first_url = until(
        "generation to be under way",
        Duration::from_secs(120),
        || async {
            let busy: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE campaign_id = $1::uuid AND stage = 'generate'
                 AND state = 'running' AND (progress_metrics->>'requests')::float8 > 0",
            )
            .bind(&campaign.id)
            .fetch_one(&mut c.db.connect().await)
            .await
            .unwrap();
            let rows = endpoint_rows(&c, &campaign.id).await;
            (busy > 0)
                .then(|| rows.first().filter(|r| r.4 == "ready").map(|r| r.2.clone()))
                .flatten()
        },
    )
    .await;
    c.workers[0].kill9();
    c.add_worker_with_env(
        "gpu-1",
        "gpu",
        &["--backend", "external", "--slots", "3"],
        &[("SLURM_CONF", &conf)],
    );
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(300))
        .await;
    // The second attempt found the job serving and reported the same endpoint; one job ran.
    let rows = endpoint_rows(&c, &campaign.id).await;
    let served: Vec<_> = rows.iter().filter(|r| r.0 == "generator").collect();
    assert_eq!(served.len(), 2, "{rows:?}");
    assert_eq!(served[1].1, 2, "{rows:?}");
    assert_eq!(served[1].2, first_url);
    assert_eq!(served[1].4, "stopped");
    let jobs = served_job_ids(&c, &campaign.id, "generator").await;
    let named = jobs_named(&conf, &format!("flywheel-{}", jobs[0].0));
    assert_eq!(named.len(), 1, "a second job was submitted: {named:?}");
    let job = format!("slurm:{}", jobs[0].1);
    assert_eq!(
        attempt_jobs(&c, &jobs[0].0).await,
        [(1, Some(job.clone())), (2, Some(job))]
    );
    assert!(named[0].contains("JobState=CANCELLED"), "{named:?}");
    // Generation never lost its server: every shard succeeded at its first attempt.
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT attempt FROM tasks WHERE campaign_id = $1::uuid AND stage = 'generate'",
    )
    .bind(&campaign.id)
    .fetch_all(&mut c.db.connect().await)
    .await
    .unwrap();
    assert!(attempts.iter().all(|a| *a == 1), "{attempts:?}");
}
