//! The controller's settings and the state one controller process shares between its loops and
//! services.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{Notify, mpsc, watch};
use uuid::Uuid;

use crate::{auth, dispatch, metrics, store, writer};

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
    /// Defaults: 6 s leases with 2 s heartbeats, so a dead worker's task is reclaimed about
    /// 6 s after its last heartbeat (the reaper wakes when the lease expires).
    pub fn new(artifact_root: impl Into<String>) -> Self {
        Self {
            artifact_root: artifact_root.into(),
            lease_ttl_ms: 6_000,
            heartbeat_interval_ms: 2_000,
            token_cache_ttl_ms: 60_000,
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
    /// Bumped whenever tasks may have become claimable (planned, unblocked, put back, a
    /// campaign resumed, another process's change, a backoff or tick come due): a capability
    /// group found with nothing to claim is not claimed for again until then
    /// ([`dispatch::Registry::known_empty`]).
    pub(crate) queue_epoch: std::sync::atomic::AtomicU64,
    pub(crate) planner_wake: Notify,
    /// New leases (claims), or the database back: the reaper recomputes when to look next.
    pub(crate) reaper_wake: Notify,
    /// Whether the reaper is waiting for a lease to expire. A new lease expires after every
    /// lease it already waits for (all are one TTL long), so a claim wakes it only when this is
    /// false. It is cleared before the reaper looks, so a claim committed during a look that
    /// missed it still wakes it.
    pub(crate) reaper_watching: std::sync::atomic::AtomicBool,
    /// A schedule or a campaign changed: the scheduler recomputes its next firing.
    pub(crate) schedules_wake: Notify,
    /// When tasks put back with a backoff become claimable (this process's retries only; the
    /// dispatcher's periodic tick covers any other controller's).
    pub(crate) retries: std::sync::Mutex<std::collections::BTreeSet<chrono::DateTime<chrono::Utc>>>,
    /// Bumped after every commit that wrote events, for event streams.
    pub(crate) events: watch::Sender<u64>,
    pub(crate) writer: mpsc::Sender<writer::Report>,
    pub(crate) metrics: metrics::Metrics,
    /// Whether Postgres is reachable: false once the wake-up connection or a write finds it
    /// unreachable, true again once the reaper gets through. Health follows it, and leases are
    /// extended when it comes back.
    pub(crate) db_up: watch::Sender<bool>,
    /// Becomes true when the controller starts shutting down; long-lived streams end on it.
    pub(crate) stopping: watch::Receiver<bool>,
}

impl Controller {
    /// How long after an attempt's lease was written a heartbeat of it is answered without
    /// writing (see [`dispatch::Registry::unwritten_beats`]): half a heartbeat interval, and at
    /// most a quarter of the lease, so a lease always has most of its time left when written.
    pub(crate) fn lease_write_window(&self) -> std::time::Duration {
        let ms = (self.config.heartbeat_interval_ms / 2).min(self.config.lease_ttl_ms / 4);
        std::time::Duration::from_millis(ms as u64)
    }

    /// After attempts settled (committed): counts them, and remembers when those that went back
    /// to `queued` can be claimed again.
    pub(crate) fn settled(&self, settled: &[store::tasks::SettledRow]) {
        self.metrics.settled(settled);
        let mut retries = self.retries.lock().expect("retries");
        retries.extend(
            settled
                .iter()
                .filter(|s| s.state == store::tasks::TaskState::Queued)
                .map(|s| s.next_run_at),
        );
    }

    /// Postgres was found unreachable: health says so, and the reaper probes until it is back.
    pub(crate) fn database_unreachable(&self) {
        self.db_up
            .send_if_modified(|up| std::mem::replace(up, false));
        self.reaper_wake.notify_one();
    }

    /// Tasks may have become claimable: bumps the queue epoch and wakes the dispatcher.
    pub(crate) fn queue_changed(&self) {
        self.queue_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.dispatch_wake.notify_one();
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

/// Says this controller is alive (its `controllers` row) every 1.5 lease periods, until
/// shutdown: its workers are online while it is (shown offline after 3 periods of silence, so
/// one lost beat changes nothing). One row, however many workers.
pub(crate) async fn run_liveness(ctl: Arc<Controller>, mut shutdown: watch::Receiver<bool>) {
    let every = std::time::Duration::from_millis(ctl.config.lease_ttl_ms as u64 * 3 / 2);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let beat = async {
            let mut conn = ctl.pool.acquire().await?;
            store::controllers::beat(&mut conn, store::instance_id()).await
        };
        if let Err(e) = beat.await {
            tracing::warn!(error = %e, "cannot record that this controller is alive");
        }
    }
}
