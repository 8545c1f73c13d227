//! The controller's settings and the state one controller process shares between its loops and
//! services.

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
                .filter(|s| s.state == store::tasks::TaskState::Queued)
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
