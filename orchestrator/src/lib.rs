//! Flywheel's controller: the only process that writes campaign state to Postgres.
//!
//! # Layout
//! - [`spec`]: campaign specs (YAML) and their validation with field paths.
//! - [`limits`]: what one request may carry, checked at the API edge.
//! - [`store`]: all SQL, one module per table.
//! - `planner`: round DAGs, promotion gates, settling rounds.
//! - `dispatch`: connected workers, batched claims, the lease reaper.
//! - `writer`: group commit of worker heartbeats, completions and failures.
//! - `ops`: campaign operations (create, pause, resume, cancel, retry a stage, extend, change
//!   the promotion gate).
//! - [`schedules`], [`cron`], [`template`]: cron schedules that create or extend campaigns from
//!   spec templates.
//! - `api`: the gRPC services (worker protocol and control API).
//! - `http`: the web dashboard, its JSON API (the control API over HTTP) and `/metrics`;
//!   `metrics`: the Prometheus counters, histograms and scrape-time gauges.
//!
//! [`serve`] runs all of it on one listener until a shutdown future resolves.

pub mod auth;
pub mod cron;
pub mod limits;
pub mod schedules;
pub mod spec;
pub mod store;
pub mod template;

mod api;
mod dispatch;
mod error;
mod http;
mod metrics;
mod ops;
mod planner;
mod writer;

use std::future::Future;
use std::sync::Arc;

use flywheel_proto::v1::server::{ControlServiceServer, WorkerServiceServer};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use uuid::Uuid;

pub use error::{Error, Result};

/// Runtime settings of a controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Root of the artifact store: a `file://` URI (or a plain directory path).
    pub artifact_root: String,
    /// A running attempt whose worker has not heartbeated for this long is reclaimed.
    pub lease_ttl_ms: u32,
    /// How often workers are asked to heartbeat.
    pub heartbeat_interval_ms: u32,
    /// How long a checked token is trusted before it is checked again (so revocation takes
    /// effect within this time).
    pub token_cache_ttl_ms: u32,
    /// At shutdown, how long open requests and streams get to finish before they are dropped.
    pub shutdown_grace_ms: u32,
}

impl ControllerConfig {
    /// Defaults: 6 s leases with 2 s heartbeats, so a dead worker's task is reclaimed within
    /// about 6.5 s (the reaper runs every 0.5 s).
    pub fn new(artifact_root: impl Into<String>) -> Self {
        Self {
            artifact_root: artifact_root.into(),
            lease_ttl_ms: 6_000,
            heartbeat_interval_ms: 2_000,
            token_cache_ttl_ms: 5_000,
            shutdown_grace_ms: 5_000,
        }
    }
}

/// Shared state of one controller process.
pub(crate) struct Controller {
    pub(crate) pool: PgPool,
    pub(crate) config: ControllerConfig,
    pub(crate) registry: dispatch::Registry,
    pub(crate) auth: auth::Auth,
    pub(crate) dispatch_wake: Notify,
    pub(crate) planner_wake: Notify,
    /// When tasks put back with a backoff become claimable (this process's retries only; the
    /// dispatcher's periodic tick covers any other controller's).
    pub(crate) retries: std::sync::Mutex<std::collections::BTreeSet<chrono::DateTime<chrono::Utc>>>,
    /// Bumped after every commit that wrote events, for event streams.
    pub(crate) events: watch::Sender<u64>,
    pub(crate) writer: mpsc::Sender<writer::Report>,
    pub(crate) metrics: metrics::Metrics,
    /// Whether the last round trip to Postgres (the reaper's, every 0.5 s) worked. Health
    /// follows it, and leases are extended when it comes back.
    pub(crate) db_up: watch::Sender<bool>,
    /// Becomes true when the controller starts shutting down; long-lived streams end on it.
    pub(crate) stopping: watch::Receiver<bool>,
}

impl Controller {
    /// After attempts settled (committed): counts them, and remembers when those that went back
    /// to `queued` can be claimed again.
    pub(crate) fn settled(&self, settled: &[store::tasks::SettledRow]) {
        self.metrics.settled(settled);
        let mut retries = self.retries.lock().expect("retries");
        retries.extend(
            settled
                .iter()
                .filter(|s| s.state == "queued")
                .map(|s| s.next_run_at),
        );
    }

    pub(crate) fn events_changed(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Where an attempt writes its outputs: unique per attempt, so a stale attempt can never
    /// overwrite the outputs of the current one.
    pub(crate) fn output_prefix(
        &self,
        campaign: Uuid,
        round: i32,
        stage: &str,
        shard: i32,
        attempt: i32,
    ) -> String {
        let root = &self.config.artifact_root;
        format!("{root}/campaigns/{campaign}/round-{round}/{stage}/shard-{shard}/attempt-{attempt}")
    }
}

/// Keeps gRPC health in step with the database: `NOT_SERVING` (overall and for both Flywheel
/// services) while Postgres is unreachable or the controller is shutting down.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut db_up: watch::Receiver<bool>,
    mut stopping: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    loop {
        let serving = *db_up.borrow_and_update() && !*stopping.borrow_and_update();
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in [
            "",
            <WorkerServiceServer<api::WorkerApi> as tonic::server::NamedService>::NAME,
            <ControlServiceServer<api::ControlApi> as tonic::server::NamedService>::NAME,
        ] {
            reporter.set_service_status(service, status).await;
        }
        tokio::select! {
            r = db_up.changed() => if r.is_err() { return },
            r = stopping.changed() => if r.is_err() { return },
        }
    }
}

/// Runs CPU-heavy request work (spec parsing and rendering) on the blocking pool, so a large
/// request never stalls the async runtime that serves health checks, heartbeats and pages.
pub(crate) async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::FailedPrecondition(format!("request processing failed: {e}")))?
}

/// Runs the controller on `listener` until `shutdown` resolves: gRPC services (worker
/// protocol, control API, health, reflection), the dispatcher, the planner, the scheduler, the
/// report writer and the lease reaper. Migrations must already be applied ([`store::migrate`]).
pub async fn serve(
    pool: PgPool,
    config: ControllerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_with_http(pool, config, listener, None, shutdown).await
}

/// [`serve`], plus the web dashboard, its JSON API and Prometheus `/metrics` on `http`.
pub async fn serve_with_http(
    pool: PgPool,
    mut config: ControllerConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // Workers that were running tasks when the previous controller stopped get one lease
    // period to reconnect and heartbeat before their tasks are reclaimed.
    {
        let mut conn = pool.acquire().await?;
        let extended =
            store::tasks::extend_all_leases(&mut conn, config.lease_ttl_ms as i64).await?;
        if extended > 0 {
            tracing::info!(
                tasks = extended,
                "running tasks from before the restart get a grace period"
            );
        }
    }
    // The artifact root as a URI without a trailing slash, once: output prefixes append to it.
    let root = config.artifact_root.trim_end_matches('/');
    config.artifact_root = if root.contains("://") {
        root.to_string()
    } else {
        format!("file://{root}")
    };
    let (writer_tx, writer_rx) = writer::channel();
    let (events, _) = watch::channel(0);
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctl = Arc::new(Controller {
        auth: auth::Auth::new(
            pool.clone(),
            std::time::Duration::from_millis(config.token_cache_ttl_ms as u64),
        ),
        pool,
        config,
        registry: dispatch::Registry::default(),
        dispatch_wake: Notify::new(),
        planner_wake: Notify::new(),
        retries: Default::default(),
        events,
        writer: writer_tx,
        metrics: metrics::Metrics::new(),
        db_up: watch::Sender::new(true),
        stopping: stop_rx.clone(),
    });
    let loops = vec![
        tokio::spawn(dispatch::run(ctl.clone(), stop_rx.clone())),
        tokio::spawn(dispatch::run_reaper(ctl.clone(), stop_rx.clone())),
        tokio::spawn(planner::run(ctl.clone(), stop_rx.clone())),
        tokio::spawn(schedules::run(ctl.clone(), stop_rx.clone())),
        tokio::spawn(writer::run(ctl.clone(), writer_rx, stop_rx.clone())),
    ];

    let http_server = http.map(|listener| {
        let app = http::router(ctl.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "http server failed");
            }
        })
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let health = tokio::spawn(report_health(
        health_reporter,
        ctl.db_up.subscribe(),
        stop_rx.clone(),
    ));
    // Both reflection versions: grpcurl and Postman use v1; grpcio-reflection, Evans and older
    // tools only know v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flywheel_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::FailedPrecondition(format!("reflection setup failed: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flywheel_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::FailedPrecondition(format!("reflection setup failed: {e}")))?;

    // On shutdown: stop the loops, end every assignment and event stream (workers reconnect to
    // a successor), then give open requests the grace period before dropping them, so a
    // connected worker cannot hold the process and its port.
    let signal = {
        let (ctl, stop_tx) = (ctl.clone(), stop_tx.clone());
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            ctl.registry.close_streams();
        }
    };
    let grace = std::time::Duration::from_millis(ctl.config.shutdown_grace_ms as u64);
    let mut stopping = stop_rx.clone();
    let deadline = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(WorkerServiceServer::new(api::WorkerApi {
            ctl: ctl.clone(),
        }))
        .add_service(ControlServiceServer::new(api::ControlApi {
            ctl: ctl.clone(),
        }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            signal,
        );
    let result = tokio::select! {
        r = server => r,
        _ = deadline => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over; closing the connections still open");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    health.abort();
    // Open event streams would hold a graceful shutdown forever; the state is in Postgres.
    if let Some(h) = http_server {
        h.abort();
    }
    for l in loops {
        let _ = l.await;
    }
    result.map_err(|e| Error::FailedPrecondition(format!("grpc server failed: {e}")))
}
