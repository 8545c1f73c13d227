use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use flywheel_builtin::BuiltinBackend;
use flywheel_orchestrator::template::parse_assignments;
use flywheel_orchestrator::{ControllerConfig, auth, store};
use flywheel_proto::ControlClient;
use flywheel_proto::v1::{
    CampaignAction, Capabilities, CreateCampaignRequest, ExtendCampaignRequest,
    ListArtifactsRequest, RetryStageRequest, SetPromotionGateRequest,
};
use flywheel_worker::external::ExternalTrainerBackend;
use flywheel_worker::openai::OpenAiBackend;
use flywheel_worker::reward_endpoint::RewardEndpointBackend;
use flywheel_worker::{Backend, WorkerConfig, test_backend::TestBackend};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "flywheel",
    version,
    about = "Iterative alignment campaigns: controller, workers and CLI"
)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
pub(crate) struct ControlOpts {
    /// Controller address.
    #[arg(
        long,
        env = "FLYWHEEL_CONTROLLER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub(crate) controller: String,
    /// API token (scope `read` for reads, `admin` for changes).
    #[arg(long, env = "FLYWHEEL_TOKEN", hide_env_values = true)]
    pub(crate) token: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: gRPC worker protocol and control API.
    Server {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc_addr: SocketAddr,
        /// Root of the artifact store (a directory, or a file:// uri).
        #[arg(long, default_value = ".flywheel/artifacts")]
        artifact_root: String,
        #[arg(long, default_value_t = 6000)]
        lease_ttl_ms: u32,
        #[arg(long, default_value_t = 2000)]
        heartbeat_interval_ms: u32,
        /// Write the bound address here once listening (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Web dashboard, its JSON API and Prometheus /metrics; "off" disables them.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: String,
        /// Write the bound HTTP address here once listening.
        #[arg(long)]
        http_addr_file: Option<PathBuf>,
        /// How long a checked token is trusted before it is looked up again: a revoked token
        /// stops working within this time.
        #[arg(long, default_value_t = 5000)]
        token_cache_ttl_ms: u32,
        /// At shutdown (SIGTERM, SIGINT), how long open requests and streams get to finish.
        #[arg(long, default_value_t = 5000)]
        shutdown_grace_ms: u32,
    },
    /// Run a worker process.
    Worker {
        #[arg(
            long,
            env = "FLYWHEEL_CONTROLLER",
            default_value = "http://127.0.0.1:50051"
        )]
        controller: String,
        /// A token with the `worker` scope.
        #[arg(long, env = "FLYWHEEL_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, default_value = "worker")]
        name: String,
        #[arg(long, default_value = "default")]
        pool: String,
        /// Backends this worker runs (repeatable): builtin (the CPU engine), openai (any
        /// OpenAI-compatible server), reward_endpoint (an HTTP reward service), external (a
        /// trainer command: TRL, NeMo-Aligner, OpenRLHF, flywheel train), test (no ML).
        #[arg(long = "backend", default_values_t = vec!["test".to_string()])]
        backends: Vec<String>,
        #[arg(long, default_value = "")]
        gpu_kind: String,
        #[arg(long, default_value_t = 0)]
        gpu_count: u32,
        #[arg(long, default_value_t = 1)]
        slots: u32,
        /// Labels, `key=value` (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Manage campaigns.
    Campaign {
        #[command(subcommand)]
        command: CampaignCommand,
    },
    /// Manage cron schedules that create or extend campaigns.
    Schedule {
        #[command(subcommand)]
        command: crate::schedule_cli::ScheduleCommand,
    },
    /// Manage API tokens (talks to Postgres directly; run on the controller's host).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Inspect workers.
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// Run a full weak-to-strong campaign on this machine (Postgres, controller, workers, models).
    Demo(crate::demo::DemoArgs),
    /// Fine-tune a builtin checkpoint (sft, dpo or rpo) from a JSONL file; logs step=N loss=X.
    Train(crate::train_cli::TrainArgs),
    /// Write a freshly initialised builtin checkpoint (seeded).
    InitModel(crate::train_cli::InitModelArgs),
    /// Serve a builtin checkpoint over an OpenAI-compatible HTTP API.
    ServeModel(crate::serve_model::ServeModelArgs),
    /// Every param of every stage kind and backend, with its type, default and meaning.
    Params {
        /// As docs/params.md (Markdown); the default is the same table.
        #[arg(long)]
        markdown: bool,
    },
    /// Apply database migrations (the server also does this at start).
    Migrate {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(Subcommand)]
enum CampaignCommand {
    /// Validate and submit a campaign spec (or a template with its values).
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Template values, `name=value` (repeatable), for `{{ name }}` placeholders.
        #[arg(long = "param")]
        params: Vec<String>,
        /// Makes the call idempotent: run it again with the same id (after a timeout, say) and
        /// the campaign the first call created is returned instead of a second one.
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        opts: ControlOpts,
    },
    List {
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Rounds, stages, tasks and artifacts of a campaign.
    Show {
        id: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    Pause {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    Resume {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Re-run a failed stage of a round and everything downstream of it.
    RetryStage {
        id: String,
        #[arg(long)]
        round: i32,
        #[arg(long)]
        stage: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Add rounds; a campaign that finished its rounds runs again from its current generator.
    Extend {
        id: String,
        #[arg(long)]
        rounds: u32,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Replace a promote stage's gate for the rounds still to be planned.
    SetGate {
        id: String,
        /// The promote stage.
        #[arg(long, default_value = "promote")]
        stage: String,
        /// `<stage>.<metric><op><number>`, e.g. `evaluate.win_rate>=0.6` (repeatable).
        #[arg(long = "require", required = true)]
        require: Vec<String>,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        opts: ControlOpts,
    },
    /// Follow a campaign's events.
    Events {
        id: String,
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[command(flatten)]
        opts: ControlOpts,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it once; only its hash is stored.
    Create {
        #[arg(long, value_parser = ["admin", "worker", "read"])]
        scope: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// List tokens: id, name, scope, created, revoked (never the tokens themselves).
    List {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Revoke tokens by id or name. Running controllers refuse them within their token cache
    /// time (`--token-cache-ttl-ms`, 5 s by default).
    Revoke {
        /// A token id, or a name (every unrevoked token of that name).
        token: String,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(Subcommand)]
enum WorkersCommand {
    List {
        #[command(flatten)]
        opts: ControlOpts,
    },
}

fn init_tracing(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub(crate) async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Server {
            database_url,
            grpc_addr,
            artifact_root,
            lease_ttl_ms,
            heartbeat_interval_ms,
            addr_file,
            http_addr,
            http_addr_file,
            token_cache_ttl_ms,
            shutdown_grace_ms,
        } => {
            init_tracing("info");
            let Some(pool) = connect_when_reachable(&database_url).await? else {
                return Ok(());
            };
            let root = if artifact_root.contains("://") {
                artifact_root
            } else {
                std::fs::create_dir_all(&artifact_root)
                    .with_context(|| format!("cannot create {artifact_root}"))?;
                format!(
                    "file://{}",
                    std::fs::canonicalize(&artifact_root)?.display()
                )
            };
            let listener = tokio::net::TcpListener::bind(grpc_addr)
                .await
                .with_context(|| format!("cannot listen on {grpc_addr}"))?;
            let bound = listener.local_addr()?;
            let http = if http_addr == "off" {
                None
            } else {
                let addr: SocketAddr = http_addr.parse().with_context(|| {
                    format!("--http-addr {http_addr:?}: expected host:port or off")
                })?;
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (--http-addr)"))?;
                let http_bound = l.local_addr()?;
                tracing::info!(addr = %http_bound, "dashboard on http://{http_bound}/");
                if let Some(f) = &http_addr_file {
                    write_atomically(f, &http_bound.to_string())?;
                }
                Some(l)
            };
            if let Some(f) = addr_file {
                write_atomically(&f, &bound.to_string())?;
            }
            tracing::info!(addr = %bound, artifact_root = %root, "controller listening");
            let mut config = ControllerConfig::new(root);
            config.lease_ttl_ms = lease_ttl_ms;
            config.heartbeat_interval_ms = heartbeat_interval_ms;
            config.token_cache_ttl_ms = token_cache_ttl_ms;
            config.shutdown_grace_ms = shutdown_grace_ms;
            flywheel_orchestrator::serve_with_http(pool, config, listener, http, shutdown_signal())
                .await?;
        }
        Command::Worker {
            controller,
            token,
            name,
            pool,
            backends,
            gpu_kind,
            gpu_count,
            slots,
            labels,
        } => {
            init_tracing("info");
            let mut impls: Vec<Arc<dyn Backend>> = Vec::new();
            for b in &backends {
                match b.as_str() {
                    "test" => impls.push(Arc::new(TestBackend)),
                    "builtin" => impls.push(Arc::new(BuiltinBackend::new())),
                    "openai" => impls.push(Arc::new(OpenAiBackend)),
                    "reward_endpoint" => impls.push(Arc::new(RewardEndpointBackend)),
                    "external" => impls.push(Arc::new(ExternalTrainerBackend)),
                    other => bail!(
                        "--backend {other:?}: unknown backend (available: builtin, openai, reward_endpoint, external, test)"
                    ),
                }
            }
            let labels = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--label {l:?}: expected key=value"))
                })
                .collect::<Result<_>>()?;
            let config = WorkerConfig {
                controller,
                token,
                name,
                capabilities: Capabilities {
                    pool,
                    backends,
                    gpu_kind,
                    gpu_count,
                    labels,
                },
                slots,
            };
            flywheel_worker::run(config, impls, shutdown_signal()).await?;
        }
        Command::Campaign { command } => campaign(command).await?,
        Command::Schedule { command } => crate::schedule_cli::run(command).await?,
        Command::Train(args) => crate::train_cli::run(args)?,
        Command::InitModel(args) => crate::train_cli::init_model(args)?,
        Command::ServeModel(args) => {
            init_tracing("warn");
            crate::serve_model::run(args).await?;
        }
        Command::Demo(args) => {
            init_tracing("warn");
            crate::demo::run(args).await?;
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    scope,
                    name,
                    database_url,
                },
        } => {
            let pool = admin_pool(&database_url).await?;
            let scope = auth::Scope::parse(&scope).context("unknown scope")?;
            let name = name.unwrap_or_else(|| format!("{}-token", scope.as_str()));
            if name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
                bail!("--name: must be 1 to 200 characters without control characters");
            }
            let token = auth::create_token(&pool, &name, scope).await?;
            println!("{token}");
        }
        Command::Token {
            command: TokenCommand::List { database_url },
        } => {
            let pool = admin_pool(&database_url).await?;
            let mut conn = pool.acquire().await?;
            println!(
                "{:<38} {:<24} {:<7} {:<26} REVOKED",
                "ID", "NAME", "SCOPE", "CREATED"
            );
            for t in store::api_tokens::list(&mut conn).await? {
                println!(
                    "{:<38} {:<24} {:<7} {:<26} {}",
                    t.id,
                    t.name,
                    t.scope,
                    t.created_at.to_rfc3339(),
                    t.revoked_at
                        .map(|r| r.to_rfc3339())
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
        Command::Token {
            command:
                TokenCommand::Revoke {
                    token,
                    database_url,
                },
        } => {
            let pool = admin_pool(&database_url).await?;
            let mut conn = pool.acquire().await?;
            let revoked = store::api_tokens::revoke(&mut conn, &token).await?;
            if revoked.is_empty() {
                bail!(
                    "no unrevoked token has the id or name {token:?} (see `flywheel token list`)"
                );
            }
            for id in revoked {
                println!("revoked {id}");
            }
        }
        Command::Workers {
            command: WorkersCommand::List { opts },
        } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let workers = c.list_workers().await?;
            println!(
                "{:<38} {:<14} {:<8} {:<14} {:<9} {:>8}  TASKS",
                "ID", "NAME", "POOL", "GPU", "STATUS", "HB AGE"
            );
            for w in workers {
                let gpu = if w.gpu_count > 0 {
                    format!("{}x{}", w.gpu_count, w.gpu_kind)
                } else {
                    "-".into()
                };
                println!(
                    "{:<38} {:<14} {:<8} {:<14} {:<9} {:>7.1}s  {}",
                    w.id,
                    w.name,
                    w.pool,
                    gpu,
                    w.status,
                    w.heartbeat_age_s,
                    w.current_tasks.len()
                );
            }
        }
        Command::Params { markdown: _ } => print!("{}", flywheel_proto::stage::markdown()),
        Command::Migrate { database_url } => {
            admin_pool(&database_url).await?;
            println!("migrations applied");
        }
    }
    Ok(())
}

async fn campaign(command: CampaignCommand) -> Result<()> {
    match command {
        CampaignCommand::Create {
            file,
            params,
            request_id,
            opts,
        } => {
            let spec_yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let params = parse_assignments(params.iter().map(String::as_str))
                .map_err(|e| anyhow::anyhow!("--param: {e}"))?;
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let campaign = c
                .create_campaign_from(CreateCampaignRequest {
                    spec_yaml,
                    params: params.into_iter().collect(),
                    request_id: request_id.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?;
            println!("{}", campaign.id);
        }
        CampaignCommand::List { opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            println!(
                "{:<38} {:<28} {:<10} {:>6}",
                "ID", "NAME", "STATUS", "ROUND"
            );
            for x in c.list_campaigns().await.map_err(status_error)? {
                println!(
                    "{:<38} {:<28} {:<10} {:>3}/{}",
                    x.id,
                    x.name,
                    x.status,
                    x.current_round + 1,
                    x.rounds_total
                );
            }
        }
        CampaignCommand::Show { id, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let d = c.get_campaign(id.clone()).await.map_err(status_error)?;
            let x = d.campaign.context("controller sent no campaign")?;
            println!(
                "campaign {} ({})  status {}  round {}/{}",
                x.name,
                x.id,
                x.status,
                x.current_round + 1,
                x.rounds_total
            );
            println!(
                "generator {} {}",
                x.current_generator_id, x.current_generator_uri
            );
            for r in d.rounds {
                println!(
                    "\nround {}: {} {} {}",
                    r.index, r.status, r.decision, r.decision_reason
                );
                let mut metrics: Vec<_> = r.metrics.iter().collect();
                metrics.sort_by(|a, b| a.0.cmp(b.0));
                for (k, v) in metrics {
                    println!("    {k} = {v:.4}");
                }
                for s in r.stages {
                    let done = s.tasks.iter().filter(|t| t.state == "succeeded").count();
                    println!(
                        "  {:<12} {:<18} {:<18} {}/{} shards",
                        s.name,
                        s.kind,
                        s.state,
                        done,
                        s.tasks.len()
                    );
                    for t in s.tasks.iter().filter(|t| !t.last_error.is_empty()) {
                        println!(
                            "      shard {} attempt {}: {}",
                            t.shard_index, t.attempt, t.last_error
                        );
                    }
                }
            }
            let artifacts = c
                .list_artifacts(ListArtifactsRequest {
                    campaign_id: id,
                    kind: String::new(),
                })
                .await
                .map_err(status_error)?;
            println!("\nartifacts:");
            for a in artifacts {
                println!(
                    "  r{:<3} {:<8} {:<10} {:<10} {}",
                    a.round_index, a.kind, a.name, a.producer_stage, a.uri
                );
            }
        }
        CampaignCommand::Pause { id, reason, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let x = c
                .pause_campaign(CampaignAction {
                    campaign_id: id,
                    reason,
                })
                .await
                .map_err(status_error)?;
            println!("{} {}", x.id, x.status);
        }
        CampaignCommand::Resume { id, reason, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let x = c
                .resume_campaign(CampaignAction {
                    campaign_id: id,
                    reason,
                })
                .await
                .map_err(status_error)?;
            println!("{} {}", x.id, x.status);
        }
        CampaignCommand::Cancel { id, reason, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let x = c
                .cancel_campaign(CampaignAction {
                    campaign_id: id,
                    reason,
                })
                .await
                .map_err(status_error)?;
            println!("{} {}", x.id, x.status);
        }
        CampaignCommand::RetryStage {
            id,
            round,
            stage,
            opts,
        } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let ids = c
                .retry_stage(RetryStageRequest {
                    campaign_id: id,
                    round_index: round,
                    stage,
                })
                .await
                .map_err(status_error)?;
            println!("{} task(s) will run again", ids.len());
        }
        CampaignCommand::Extend {
            id,
            rounds,
            reason,
            opts,
        } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let x = c
                .extend_campaign(ExtendCampaignRequest {
                    campaign_id: id,
                    rounds,
                    reason,
                })
                .await
                .map_err(status_error)?;
            println!("{} {} rounds {}", x.id, x.status, x.rounds_total);
        }
        CampaignCommand::SetGate {
            id,
            stage,
            require,
            reason,
            opts,
        } => {
            let require = require
                .iter()
                .map(|r| crate::schedule_cli::parse_requirement(r))
                .collect::<Result<_>>()?;
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let x = c
                .set_promotion_gate(SetPromotionGateRequest {
                    campaign_id: id,
                    stage,
                    require,
                    reason,
                })
                .await
                .map_err(status_error)?;
            println!("{} gate changed for rounds after {}", x.id, x.current_round);
        }
        CampaignCommand::Events { id, after, opts } => {
            let mut c = ControlClient::connect(&opts.controller, &opts.token).await?;
            let mut stream = c.stream_events(id, after).await.map_err(status_error)?;
            while let Some(e) = stream.message().await.map_err(status_error)? {
                println!(
                    "{} {:>6} {:<18} {:<12} {}",
                    e.created_at, e.id, e.kind, e.actor, e.message
                );
            }
        }
    }
    Ok(())
}

/// One connection for an admin command on the controller's host, with migrations applied.
async fn admin_pool(database_url: &str) -> Result<sqlx::PgPool> {
    let pool = store::connect(database_url, 1)
        .await
        .context("cannot connect to Postgres")?;
    store::migrate(&pool).await.context("migrations failed")?;
    Ok(pool)
}

/// Connects to Postgres and applies migrations, retrying while the database is unreachable
/// (a controller may start before its database, or during a failover). `None` if a shutdown
/// signal came first.
async fn connect_when_reachable(database_url: &str) -> Result<Option<sqlx::PgPool>> {
    let connect = async {
        let mut wait = std::time::Duration::from_millis(250);
        loop {
            match store::connect(database_url, 16).await {
                Ok(pool) => match store::migrate(&pool).await {
                    Ok(()) => return Ok(pool),
                    // A database that answers but refuses the migrations will not heal.
                    Err(e @ sqlx::migrate::MigrateError::VersionMissing(_)) => {
                        return Err(anyhow::Error::new(e).context("migrations failed"));
                    }
                    Err(e) => tracing::warn!(error = %e, "migrations failed; retrying"),
                },
                Err(sqlx::Error::Configuration(e)) => {
                    bail!("DATABASE_URL is not a valid Postgres URL: {e}")
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot connect to Postgres; retrying")
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(5));
        }
    };
    tokio::select! {
        r = connect => r.map(Some),
        _ = shutdown_signal() => Ok(None),
    }
}

/// Writes `text` to `path` through a rename, so a reader never sees a partial file.
pub(crate) fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A gRPC error as the user should read it: the server's message, with the code for scripts.
pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}
