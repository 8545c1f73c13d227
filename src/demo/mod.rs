//! `flywheel demo`: a full weak-to-strong campaign on one machine. Postgres (from DATABASE_URL
//! or a private cluster), the controller, worker processes in two pools talking real gRPC, the
//! bootstrapped starting models, a 3-round campaign from `examples/demo.yaml`, live progress, and
//! a per-round table (also as JSON).

mod ablation;
mod bootstrap;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flywheel_orchestrator::spec::CampaignSpec;
use flywheel_orchestrator::{ControllerConfig, auth, store};
use flywheel_proto::ControlClient;
use flywheel_proto::v1::{Artifact, ListArtifactsRequest, Round};
use serde::Serialize;

use crate::pg::PrivatePostgres;

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// Campaign spec; `bootstrap://NAME` model uris are replaced by the bootstrapped models.
    /// Default: `examples/demo.yaml`, built into the binary.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Where models, artifacts and the private database go.
    #[arg(long, default_value = ".flywheel/demo")]
    workdir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    grpc_addr: std::net::SocketAddr,
    /// The web dashboard and /metrics (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    http_addr: std::net::SocketAddr,
    /// Also write the per-round table here, as JSON.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Leave the controller and workers up afterwards (Ctrl-C stops them).
    #[arg(long)]
    keep_running: bool,
    /// Run round 1 only, then train SFT-only, SFT+DPO and SFT+RPO from its SFT data and
    /// on-policy preference pairs over three seeds and compare them (mean ± sd).
    #[arg(long)]
    ablation: bool,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Run the campaign on the production path: serve stages running `flywheel serve-model`
    /// for every round's generator and candidate, generation and evaluation through the
    /// `openai` backend, SFT and RPO as external `flywheel train` processes
    /// (`examples/demo-served.yaml`).
    #[arg(long, conflicts_with_all = ["spec", "ablation"])]
    served: bool,
    /// Bootstrap tiny models in seconds (for tests; the models learn little).
    #[arg(long, hide = true)]
    tiny: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct ArtifactSummary {
    round: i32,
    stage: String,
    name: String,
    kind: String,
    uri: String,
    content_hash: String,
    id: String,
    parent_ids: Vec<String>,
    generator_id: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct RoundSummary {
    round: i32,
    generator_accuracy: f64,
    trained_accuracy: f64,
    mean_reward: f64,
    generator_mean_reward: f64,
    win_rate_vs_generator: f64,
    /// IFEval's prompt-level strict accuracy on the held-out prompts with instructions.
    instruction_following: f64,
    generator_instruction_following: f64,
    prompts: f64,
    responses: f64,
    sft_records: f64,
    pair_records: f64,
    promoted: bool,
    decision_reason: String,
    generator_id: String,
    trained_model_id: String,
    /// Content hash of the model that was to answer this round's generate requests.
    generator_hash: String,
    /// Every hash the servers reported while answering them (empty: in-process generation).
    served_hashes: Vec<String>,
    trained_model_hash: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    campaign_id: String,
    status: String,
    wall_time_s: f64,
    initial_generator_accuracy: f64,
    final_generator_accuracy: f64,
    rounds: Vec<RoundSummary>,
    artifact_root: String,
    artifacts: Vec<ArtifactSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ablation: Option<ablation::Ablation>,
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn say(msg: &str) {
    println!("{msg}");
}

/// The demo's campaign, so that the binary runs it from any directory.
const DEMO_SPEC: &str = include_str!("../../examples/demo.yaml");
/// The params of the demo spec's prompts stage.
const DEMO_PROMPTS: &str =
    "{ count: 6000, subtopics: [add, upper, reverse, count], max_difficulty: 1, brackets: 0.2 }";
const DEMO_SERVED_SPEC: &str = include_str!("../../examples/demo-served.yaml");

/// Runs the demo; `stop` (SIGTERM or SIGINT) at any point stops its worker processes and its private
/// Postgres before the process exits (status 130).
pub(crate) async fn run(args: DemoArgs, stop: impl std::future::Future<Output = ()>) -> Result<()> {
    let mut demo = Box::pin(run_demo(args));
    tokio::select! {
        r = &mut demo => return r,
        _ = stop => {}
    }
    // Dropping the demo kills its workers and stops its Postgres (their guards' Drop).
    drop(demo);
    eprintln!("demo: stopped by a signal; workers and the private Postgres are down");
    // A model still training on the blocking pool would otherwise hold the exit.
    std::process::exit(130);
}

async fn run_demo(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let spec_text = match &args.spec {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the campaign spec {}", path.display()))?,
        None if args.served => DEMO_SERVED_SPEC.to_string(),
        None => DEMO_SPEC.to_string(),
    };
    std::fs::create_dir_all(&args.workdir)?;
    let workdir = std::fs::canonicalize(&args.workdir)?;

    // 1. Postgres.
    let (private_pg, url) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            say("postgres: using DATABASE_URL");
            (None, url)
        }
        _ => {
            let pg = PrivatePostgres::start(&workdir.join("pg"))?;
            say(&format!(
                "postgres: started a private cluster in {} ({})",
                pg.root.display(),
                pg.url
            ));
            let url = pg.url.clone();
            (Some(pg), url)
        }
    };
    let pool = store::connect(&url, 16)
        .await
        .context("cannot connect to Postgres")?;
    store::migrate(&pool).await.context("migrations failed")?;

    // 2. Starting models.
    let models_dir = workdir.join("models");
    // The ablation's world asks for instruction following (below): the weak generator sees a
    // few quoted seed examples.
    let (seed, tiny, quoted) = (args.seed, args.tiny, args.ablation);
    let models = tokio::task::spawn_blocking(move || {
        bootstrap::run(&models_dir, seed, tiny, quoted, &|m| say(m))
    })
    .await??;
    say(&format!(
        "bootstrap: weak generator answers {:.1}% of held-out tasks",
        models.generator_accuracy * 100.0
    ));
    let spec = spec_text
        .replace(
            "bootstrap://base",
            &format!("file://{}", models.base.display()),
        )
        .replace(
            "bootstrap://generator",
            &format!("file://{}", models.generator.display()),
        )
        .replace(
            "bootstrap://reward",
            &format!("file://{}", models.reward.display()),
        );
    // The ablation works from round 1's data, so one round is enough; in the demo's own spec a
    // tenth of the training prompts then ask for the answer in quotes.
    let spec = if args.ablation {
        let spec = spec
            .lines()
            .map(|l| {
                if l.starts_with("rounds:") {
                    "rounds: 1"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        match &args.spec {
            None => spec.replacen(
                DEMO_PROMPTS,
                &DEMO_PROMPTS.replace(" }", ", quotes: 0.1 }"),
                1,
            ),
            Some(_) => spec,
        }
    } else {
        spec
    };

    // The ablation trains with the spec's own sft and preference settings (checked before the round runs).
    let recipe = match args.ablation {
        true => Some(ablation::Recipe::of(&CampaignSpec::from_yaml(&spec)?)?),
        false => None,
    };

    // 3. Controller (in this process) and workers (child processes, real gRPC).
    let artifact_root = workdir.join("artifacts");
    std::fs::create_dir_all(&artifact_root)?;
    let admin = auth::create_token(&pool, "demo", auth::Scope::Admin).await?;
    let worker_token = auth::create_token(&pool, "demo-workers", auth::Scope::Worker).await?;
    let listener = tokio::net::TcpListener::bind(args.grpc_addr).await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let http = tokio::net::TcpListener::bind(args.http_addr).await?;
    let dashboard = format!("http://{}/", http.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(flywheel_orchestrator::serve_with_http(
        pool.clone(),
        ControllerConfig::new(format!("file://{}", artifact_root.display())),
        listener,
        Some(http),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let exe = std::env::current_exe()?;
    let logs = workdir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut children = Children(Vec::new());
    // Served: the gpu pool runs servers and trainer processes (a server holds its slot for
    // the round), the cpu pool the builtin stages and the API clients.
    let workers: [(&str, &str, &[&str], &str); 2] = if args.served {
        [
            ("gpu-worker-1", "gpu", &["external"], "3"),
            ("cpu-worker-1", "cpu", &["builtin", "openai"], "2"),
        ]
    } else {
        [
            ("gpu-worker-1", "gpu", &["builtin"], "1"),
            ("cpu-worker-1", "cpu", &["builtin"], "1"),
        ]
    };
    for (name, pool_name, backends, slots) in workers {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let mut worker_args = vec![
            "worker",
            "--controller",
            &addr,
            "--name",
            name,
            "--pool",
            pool_name,
            "--slots",
            slots,
        ];
        for b in backends {
            worker_args.extend(["--backend", b]);
        }
        let child = Command::new(&exe)
            .args(worker_args)
            .env("FLYWHEEL_TOKEN", &worker_token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start a worker process")?;
        children.0.push(child);
    }
    say(&format!(
        "controller: gRPC control API at {addr} (admin token for this run: {admin})"
    ));
    say(&format!(
        "dashboard: {dashboard} (sign in with the admin token; Prometheus metrics at {dashboard}metrics)"
    ));
    say(&format!(
        "workers: gpu-worker-1 (pool gpu), cpu-worker-1 (pool cpu); logs in {}",
        logs.display()
    ));

    // 4. The campaign.
    let mut client = ControlClient::connect(&addr, &admin).await?;
    let campaign = client
        .create_campaign(spec)
        .await
        .map_err(|s| anyhow::anyhow!("campaign refused: {}", s.message()))?;
    say(&format!(
        "campaign {} ({}) submitted: {} rounds\n",
        campaign.name, campaign.id, campaign.rounds_total
    ));
    let status = follow(&mut client, &campaign.id).await?;

    // 5. Results.
    let rounds = client.list_rounds(campaign.id.clone()).await?;
    let artifacts = client
        .list_artifacts(ListArtifactsRequest {
            campaign_id: campaign.id.clone(),
            kind: String::new(),
        })
        .await?;
    let summary_rounds: Vec<RoundSummary> = rounds
        .iter()
        .map(|r| round_summary(r, &artifacts))
        .collect();
    let last_generator = summary_rounds
        .last()
        .map_or(models.generator_accuracy, |r| {
            if r.promoted {
                r.trained_accuracy
            } else {
                r.generator_accuracy
            }
        });
    let mut summary = Summary {
        campaign_id: campaign.id.clone(),
        status,
        wall_time_s: 0.0,
        initial_generator_accuracy: summary_rounds
            .first()
            .map_or(models.generator_accuracy, |r| r.generator_accuracy),
        final_generator_accuracy: last_generator,
        rounds: summary_rounds,
        artifact_root: artifact_root.display().to_string(),
        artifacts: artifacts
            .iter()
            .filter(|a| a.round_index >= 0)
            .map(|a| ArtifactSummary {
                round: a.round_index + 1,
                stage: a.producer_stage.clone(),
                name: a.name.clone(),
                kind: a.kind.clone(),
                uri: a.uri.clone(),
                content_hash: a.content_hash.clone(),
                id: a.id.clone(),
                parent_ids: a.parent_ids.clone(),
                generator_id: a.generator_id.clone(),
            })
            .collect(),
        ablation: None,
    };
    print_table(&summary);
    // A failed round says why: the errors of the tasks that failed for good.
    for r in &rounds {
        for st in &r.stages {
            for t in st.tasks.iter().filter(|t| t.state == "failed") {
                say(&format!(
                    "round {} stage {} shard {} failed: {}",
                    r.index + 1,
                    st.name,
                    t.shard_index,
                    t.last_error
                ));
            }
        }
    }
    say("\nartifacts (datasets are JSONL in TRL's formats; models are checkpoint directories):");
    for a in artifacts
        .iter()
        .filter(|a| a.round_index >= 0 && matches!(a.name.as_str(), "sft" | "pairs" | "model"))
    {
        say(&format!(
            "  round {} {:<6} {:<5} {}",
            a.round_index + 1,
            a.producer_stage,
            a.name,
            a.uri
        ));
    }
    if args.ablation {
        let sft = artifacts
            .iter()
            .find(|a| a.round_index == 0 && a.name == "sft")
            .context("round 1 produced no SFT data")?
            .uri
            .clone();
        let generator = models.generator.clone();
        let reward = models.reward.clone();
        say(&format!(
            "\nablation: SFT-only, SFT+DPO and SFT+RPO from round 1's SFT data and on-policy pairs, seeds {:?}",
            ablation::SEEDS
        ));
        let recipe = recipe.context("the ablation's recipe was read above")?;
        let result = tokio::task::spawn_blocking(move || {
            ablation::run(&generator, &reward, &sft, &recipe, &|m| say(m))
        })
        .await??;
        ablation::print(&result);
        summary.ablation = Some(result);
    }
    summary.wall_time_s = started.elapsed().as_secs_f64();
    say(&format!("\nwall time: {:.0} s", summary.wall_time_s));
    if let Some(path) = &args.summary_json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
        say(&format!("summary written to {}", path.display()));
    }

    if args.keep_running {
        say(&format!(
            "\n--keep-running: controller at {addr}; Ctrl-C (or SIGTERM) stops it"
        ));
        std::future::pending::<()>().await;
    }
    drop(children);
    let _ = stop_tx.send(());
    let _ = controller.await;
    pool.close().await;
    drop(private_pg);
    if summary.status != "succeeded" {
        bail!("campaign ended {}", summary.status);
    }
    Ok(())
}

fn metric(r: &Round, key: &str) -> f64 {
    r.metrics.get(key).copied().unwrap_or(f64::NAN)
}

/// An IFEval metric: from the `instructions` evaluation (held-out prompts that all carry an
/// instruction) where the spec has one, else from `evaluate`.
fn ifeval_metric(r: &Round, name: &str) -> f64 {
    r.metrics
        .get(&format!("instructions.{name}"))
        .or_else(|| r.metrics.get(&format!("evaluate.{name}")))
        .copied()
        .unwrap_or(f64::NAN)
}

fn round_summary(r: &Round, artifacts: &[Artifact]) -> RoundSummary {
    // A spec's starting model is registered without a hash: hash its directory here.
    let hash_of = |id: &str| {
        let Some(a) = artifacts.iter().find(|a| a.id == id) else {
            return String::new();
        };
        if !a.content_hash.is_empty() {
            return a.content_hash.clone();
        }
        flywheel_worker::artifacts::path_of(&a.uri)
            .ok()
            .and_then(|p| flywheel_worker::artifacts::hash_dir(&p).ok())
            .unwrap_or_default()
    };
    let mut served_hashes: Vec<String> = artifacts
        .iter()
        .filter(|a| a.round_index == r.index && a.producer_stage == "generate")
        .filter_map(|a| serde_json::from_str::<serde_json::Value>(&a.metadata_json).ok())
        .flat_map(|m| {
            m["served_hashes"]
                .as_array()
                .map(|h| {
                    h.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_else(Vec::new)
        })
        .collect();
    served_hashes.sort();
    served_hashes.dedup();
    RoundSummary {
        generator_hash: hash_of(&r.generator_id),
        served_hashes,
        trained_model_hash: hash_of(&r.trained_model_id),
        round: r.index + 1,
        generator_accuracy: metric(r, "evaluate.generator_accuracy"),
        trained_accuracy: metric(r, "evaluate.accuracy"),
        mean_reward: metric(r, "evaluate.mean_reward"),
        generator_mean_reward: metric(r, "evaluate.generator_mean_reward"),
        win_rate_vs_generator: metric(r, "evaluate.win_rate"),
        instruction_following: ifeval_metric(r, "ifeval_prompt_strict"),
        generator_instruction_following: ifeval_metric(r, "generator_ifeval_prompt_strict"),
        prompts: metric(r, "prompts.prompts"),
        responses: metric(r, "generate.responses_total"),
        sft_records: metric(r, "filter.sft_records"),
        pair_records: metric(r, "filter.pair_records"),
        promoted: r.decision == "promoted",
        decision_reason: r.decision_reason.clone(),
        generator_id: r.generator_id.clone(),
        trained_model_id: r.trained_model_id.clone(),
    }
}

/// A metric with two decimals, or `-` where the recipe does not measure it (the served demo
/// has no reward-model evaluation).
fn shown(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.2}")
    }
}

fn print_table(s: &Summary) {
    // IFEval's columns only where the evaluation measured instruction following.
    let ifeval = s.rounds.iter().any(|r| !r.instruction_following.is_nan());
    let ifeval_head = if ifeval {
        format!(" {:>8} {:>8}", "gen ifev", "new ifev")
    } else {
        String::new()
    };
    println!(
        "\n{:<6} {:>9} {:>9}{ifeval_head} {:>8} {:>8} {:>7} {:>6} {:>6}  promoted",
        "round", "gen acc", "new acc", "reward", "win rate", "samples", "sft", "pairs"
    );
    for r in &s.rounds {
        let ifeval_cells = if ifeval {
            format!(
                " {:>8} {:>8}",
                shown(r.generator_instruction_following),
                shown(r.instruction_following)
            )
        } else {
            String::new()
        };
        println!(
            "{:<6} {:>8.1}% {:>8.1}%{ifeval_cells} {:>8} {:>8} {:>7.0} {:>6.0} {:>6.0}  {}",
            r.round,
            r.generator_accuracy * 100.0,
            r.trained_accuracy * 100.0,
            shown(r.mean_reward),
            shown(r.win_rate_vs_generator),
            r.responses,
            r.sft_records,
            r.pair_records,
            if r.promoted { "yes" } else { "no" }
        );
    }
    println!(
        "generator accuracy: {:.1}% -> {:.1}% ({:+.1} points); campaign {}",
        s.initial_generator_accuracy * 100.0,
        s.final_generator_accuracy * 100.0,
        (s.final_generator_accuracy - s.initial_generator_accuracy) * 100.0,
        s.status
    );
}

/// Shows live progress (round, stage, shards, a bar) until the campaign ends; returns its status.
async fn follow(client: &mut ControlClient, id: &str) -> Result<String> {
    let tty = std::io::stdout().is_terminal();
    let mut last_line = String::new();
    let started = Instant::now();
    loop {
        let detail = client.get_campaign(id.to_string()).await?;
        let campaign = detail.campaign.context("no campaign")?;
        if let Some(round) = detail.rounds.last() {
            let line = progress_line(
                round,
                detail.rounds.len(),
                campaign.rounds_total,
                started.elapsed(),
            );
            if line != last_line {
                if tty {
                    print!("\r\x1b[2K{line}");
                    std::io::stdout().flush()?;
                } else if strip_time(&line) != strip_time(&last_line) {
                    println!("{line}");
                }
                last_line = line;
            }
        }
        if matches!(
            campaign.status.as_str(),
            "succeeded" | "failed" | "cancelled"
        ) {
            if tty {
                println!();
            }
            return Ok(campaign.status);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn strip_time(line: &str) -> &str {
    line.split_once("] ").map_or(line, |(_, rest)| rest)
}

fn progress_line(
    round: &Round,
    rounds_seen: usize,
    rounds_total: i32,
    elapsed: Duration,
) -> String {
    // A serve stage runs for most of its round: show the work its endpoint serves instead.
    let unfinished = || round.stages.iter().filter(|s| s.state != "succeeded");
    let stage = unfinished()
        .find(|s| s.kind != "serve")
        .or_else(|| unfinished().next())
        .or(round.stages.last());
    let Some(stage) = stage else {
        return String::new();
    };
    let total = stage.tasks.len().max(1);
    let done = stage
        .tasks
        .iter()
        .filter(|t| t.state == "succeeded")
        .count();
    let progress: f64 = stage
        .tasks
        .iter()
        .map(|t| {
            if t.state == "succeeded" {
                1.0
            } else {
                t.progress
            }
        })
        .sum::<f64>()
        / total as f64;
    let width = 20;
    let filled = (progress * width as f64).round() as usize;
    format!(
        "[{:>4.0}s] round {}/{} stage {:<9} {:<18} [{}{}] {}/{} shards",
        elapsed.as_secs_f64(),
        rounds_seen,
        rounds_total,
        stage.name,
        stage.state,
        "#".repeat(filled.min(width)),
        ".".repeat(width - filled.min(width)),
        done,
        total
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ablation_finds_the_demo_specs_prompts_stage() {
        assert_eq!(DEMO_SPEC.matches(DEMO_PROMPTS).count(), 1);
    }

    /// The ablation trains with the demo spec's own sft and preference settings.
    #[test]
    fn the_ablation_reads_its_training_settings_from_the_spec() {
        let recipe = ablation::Recipe::of(&CampaignSpec::from_yaml(DEMO_SPEC).unwrap()).unwrap();
        let text = DEMO_SPEC.replace("steps: 1200, lr: 0.003", "steps: 7, lr: 0.003");
        let changed = ablation::Recipe::of(&CampaignSpec::from_yaml(&text).unwrap()).unwrap();
        assert_eq!(recipe.sft_steps(), 1200);
        assert_eq!(changed.sft_steps(), 7);
    }
}
