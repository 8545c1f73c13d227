//! The `flywheel` command line: one module per command group, shared helpers in [`common`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

mod campaign;
pub(crate) mod common;
mod schedule;
pub(crate) mod serve_model;
mod token;
mod train;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use common::{ControlOpts, admin_pool, shutdown_signal, write_atomically};
use flywheel_builtin::BuiltinBackend;
use flywheel_orchestrator::{ControllerConfig, store};
use flywheel_proto::ControlClient;
use flywheel_proto::v1::Capabilities;
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
        /// How long a checked token is trusted before it is looked up again. A revocation
        /// reaches running controllers at once (a notification); this bounds it otherwise.
        #[arg(long, default_value_t = 60000)]
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
        command: campaign::CampaignCommand,
    },
    /// Manage cron schedules that create or extend campaigns.
    Schedule {
        #[command(subcommand)]
        command: schedule::ScheduleCommand,
    },
    /// Manage API tokens (talks to Postgres directly; run on the controller's host).
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Inspect workers.
    Workers {
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// Run a full weak-to-strong campaign on this machine (Postgres, controller, workers, models).
    Demo(crate::demo::DemoArgs),
    /// Fine-tune a builtin checkpoint (sft, dpo or rpo) from a JSONL file; logs step=N loss=X.
    Train(train::TrainArgs),
    /// Write a freshly initialised builtin checkpoint (seeded).
    InitModel(train::InitModelArgs),
    /// Serve a builtin checkpoint over an OpenAI-compatible HTTP API.
    ServeModel(serve_model::ServeModelArgs),
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
        Command::Campaign { command } => campaign::run(command).await?,
        Command::Schedule { command } => schedule::run(command).await?,
        Command::Train(args) => train::run(args)?,
        Command::InitModel(args) => train::init_model(args)?,
        Command::ServeModel(args) => {
            init_tracing("warn");
            serve_model::run(args).await?;
        }
        Command::Demo(args) => {
            init_tracing("warn");
            crate::demo::run(args, shutdown_signal()).await?;
        }
        Command::Token { command } => token::run(command).await?,
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
