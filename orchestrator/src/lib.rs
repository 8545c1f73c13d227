//! Flywheel's controller: the only process that writes campaign state to Postgres.
//!
//! # Layout
//! - [`spec`]: campaign specs (YAML) and their validation with field paths.
//! - [`limits`]: what one request may carry, checked at the API edge.
//! - [`store`]: all SQL, one module per table.
//! - `planner`: round DAGs, promotion gates, settling rounds; `analytics`: the cost and drift
//!   it adds to a finished round's metrics; `cards`: its data card and model card.
//! - `dispatch`: connected workers, batched claims, the lease reaper.
//! - `writer`: group commit of worker heartbeats, completions and failures.
//! - `ops`: campaign operations (create, pause, resume, cancel, retry a stage, extend, change
//!   the promotion gate).
//! - [`schedules`], [`cron`], [`template`]: cron schedules that create or extend campaigns from
//!   spec templates.
//! - `api`: the gRPC services (worker protocol and control API).
//! - `http`: the web dashboard, its JSON API (the control API over HTTP) and `/metrics`;
//!   `metrics`: the Prometheus counters, histograms and scrape-time gauges.
//! - `controller`: [`ControllerConfig`] and the state one controller process shares.
//!
//! [`serve`] runs all of it on one listener until a shutdown future resolves.

pub mod auth;
pub mod cron;
pub mod limits;
pub mod schedules;
pub mod spec;
pub mod store;
pub mod template;

mod analytics;
mod api;
mod cards;
mod controller;
mod dispatch;
mod error;
mod http;
mod metrics;
mod ops;
mod planner;
mod wake;
mod writer;

use std::future::Future;
use std::sync::Arc;

use flywheel_proto::v1::server::{ControlServiceServer, WorkerServiceServer};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

pub(crate) use controller::Controller;
pub use controller::ControllerConfig;
pub use error::{Error, Result};

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
        store::controllers::insert(&mut conn, store::instance_id()).await?;
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
        queue_epoch: Default::default(),
        planner_wake: Notify::new(),
        reaper_wake: Notify::new(),
        reaper_watching: Default::default(),
        schedules_wake: Notify::new(),
        retries: Default::default(),
        events,
        writer: writer_tx,
        metrics: metrics::Metrics::new(),
        db_up: watch::Sender::new(true),
        stopping: stop_rx.clone(),
    });
    let loops = vec![
        // Two dispatch loops: while one claims for a big group, the other serves the rest (a
        // chain's next stage is not held behind a claim for a fan-out stage).
        tokio::spawn(dispatch::run(ctl.clone(), stop_rx.clone())),
        tokio::spawn(dispatch::run(ctl.clone(), stop_rx.clone())),
        tokio::spawn(dispatch::run_reaper(ctl.clone(), stop_rx.clone())),
        tokio::spawn(planner::run(ctl.clone(), stop_rx.clone())),
        tokio::spawn(schedules::run(ctl.clone(), stop_rx.clone())),
        tokio::spawn(writer::run(ctl.clone(), writer_rx, stop_rx.clone())),
        tokio::spawn(wake::run(ctl.clone(), stop_rx.clone())),
        tokio::spawn(controller::run_liveness(ctl.clone(), stop_rx.clone())),
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
