//! Task dispatch: the registry of connected workers and the loop that claims queued tasks for
//! their free slots and pushes them down each worker's assignment stream.
//!
//! One claim transaction serves every idle slot at once (one statement per capability group,
//! `FOR UPDATE SKIP LOCKED`), so the cost per task falls as load rises. Leases are reclaimed by
//! [`run_reaper`]; any report on a task is fenced by its attempt number in the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_proto::v1::{ArtifactRef, Assignment};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use uuid::Uuid;

use crate::Controller;
use crate::error::Result;
use crate::store::{self, events::NewEvent, tasks::ClaimGroup};

pub(crate) type AssignmentSender = mpsc::Sender<Result<Assignment, Status>>;

/// What a worker can run, as it registered.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Capabilities {
    pub(crate) pool: String,
    pub(crate) backends: Vec<String>,
    pub(crate) gpu_kind: String,
    pub(crate) gpu_count: i32,
}

struct Registered {
    caps: Capabilities,
    slots: usize,
    /// Task ids this controller believes the worker is running.
    assigned: HashSet<Uuid>,
    /// Present while the assignment stream is open; `stream_id` tells reconnects apart.
    stream: Option<(u64, AssignmentSender)>,
}

/// Workers known to this controller process.
#[derive(Default)]
pub(crate) struct Registry {
    workers: Mutex<HashMap<Uuid, Registered>>,
    next_stream: std::sync::atomic::AtomicU64,
}

impl Registry {
    pub(crate) fn register(
        &self,
        id: Uuid,
        caps: Capabilities,
        slots: usize,
        running: impl IntoIterator<Item = Uuid>,
    ) {
        let mut workers = self.workers.lock().expect("registry");
        let entry = workers.entry(id).or_insert_with(|| Registered {
            caps: caps.clone(),
            slots,
            assigned: HashSet::new(),
            stream: None,
        });
        entry.caps = caps;
        entry.slots = slots;
        entry.assigned = running.into_iter().collect();
    }

    /// Attaches an assignment stream; returns its id for [`Registry::detach`].
    pub(crate) fn attach(&self, id: Uuid, tx: AssignmentSender) -> Option<u64> {
        let stream_id = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut workers = self.workers.lock().expect("registry");
        let w = workers.get_mut(&id)?;
        w.stream = Some((stream_id, tx));
        Some(stream_id)
    }

    /// Detaches a stream if it is still the current one. Returns whether it was.
    pub(crate) fn detach(&self, id: Uuid, stream_id: u64) -> bool {
        let mut workers = self.workers.lock().expect("registry");
        match workers.get_mut(&id) {
            Some(w) if w.stream.as_ref().is_some_and(|(s, _)| *s == stream_id) => {
                w.stream = None;
                true
            }
            _ => false,
        }
    }

    /// Frees the slots held by these tasks (finished, failed, abandoned or reclaimed).
    pub(crate) fn release(&self, tasks: impl IntoIterator<Item = (Option<Uuid>, Uuid)>) -> bool {
        let mut workers = self.workers.lock().expect("registry");
        let mut freed = false;
        for (worker, task) in tasks {
            match worker.and_then(|w| workers.get_mut(&w)) {
                Some(w) => freed |= w.assigned.remove(&task),
                None => {
                    for w in workers.values_mut() {
                        freed |= w.assigned.remove(&task);
                    }
                }
            }
        }
        freed
    }

    /// Free slots of connected workers, grouped by capabilities. Slots are interleaved across
    /// workers so that a short batch spreads over them.
    fn idle_groups(&self) -> BTreeMap<Capabilities, Vec<Uuid>> {
        let workers = self.workers.lock().expect("registry");
        let mut per_group: BTreeMap<Capabilities, Vec<(Uuid, usize)>> = BTreeMap::new();
        for (id, w) in workers.iter() {
            let free = w.slots.saturating_sub(w.assigned.len());
            if w.stream.is_some() && free > 0 {
                per_group
                    .entry(w.caps.clone())
                    .or_default()
                    .push((*id, free));
            }
        }
        per_group
            .into_iter()
            .map(|(caps, mut ws)| {
                ws.sort();
                let mut slots = Vec::new();
                let max = ws.iter().map(|(_, f)| *f).max().unwrap_or(0);
                for round in 0..max {
                    slots.extend(ws.iter().filter(|(_, f)| *f > round).map(|(id, _)| *id));
                }
                (caps, slots)
            })
            .collect()
    }

    /// Records the assignment and returns the worker's stream, if it is still connected.
    fn assign(&self, worker: Uuid, task: Uuid) -> Option<AssignmentSender> {
        let mut workers = self.workers.lock().expect("registry");
        let w = workers.get_mut(&worker)?;
        w.assigned.insert(task);
        w.stream.as_ref().map(|(_, tx)| tx.clone())
    }

    /// Capabilities of workers with an open stream (used to tell tasks nobody can run).
    pub(crate) fn connected_capabilities(&self) -> Vec<Capabilities> {
        let workers = self.workers.lock().expect("registry");
        workers
            .values()
            .filter(|w| w.stream.is_some())
            .map(|w| w.caps.clone())
            .collect()
    }
}

impl Capabilities {
    /// Whether a worker with these capabilities can run a task with these requirements.
    pub(crate) fn can_run(
        &self,
        pool: &str,
        backend: &str,
        gpu_kind: &str,
        gpu_count: i32,
    ) -> bool {
        self.pool == pool
            && self.backends.iter().any(|b| b == backend)
            && (gpu_kind.is_empty() || self.gpu_kind == gpu_kind)
            && self.gpu_count >= gpu_count
    }
}

/// Claims and sends assignments until shutdown.
pub(crate) async fn run(ctl: Arc<Controller>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let wait = match dispatch_once(&ctl).await {
            Ok(DispatchOutcome::Saturated) => continue,
            Ok(DispatchOutcome::Drained) => next_retry_wait(&ctl),
            Err(e) => {
                tracing::warn!(error = %e, "dispatch failed; will retry");
                Duration::from_millis(500)
            }
        };
        tokio::select! {
            _ = ctl.dispatch_wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

enum DispatchOutcome {
    /// Every free slot got a task: there may be more work for slots freed meanwhile.
    Saturated,
    /// Fewer tasks than slots (or no slots): wait for a wake-up.
    Drained,
}

/// How long the dispatcher may sleep: until the earliest known retry comes due, at most 2 s
/// (the tick that also picks up other controllers' retries). Retries already due are dropped
/// from the set, since the dispatch about to run claims them.
fn next_retry_wait(ctl: &Controller) -> Duration {
    let fallback = Duration::from_secs(2);
    let now = chrono::Utc::now();
    let mut retries = ctl.retries.lock().expect("retries");
    let later = retries.split_off(&now);
    let due = !retries.is_empty();
    *retries = later;
    if due {
        return Duration::ZERO;
    }
    retries.first().map_or(fallback, |at| {
        (*at - now).to_std().unwrap_or_default().min(fallback)
    })
}

async fn dispatch_once(ctl: &Controller) -> Result<DispatchOutcome> {
    let groups = ctl.registry.idle_groups();
    if groups.is_empty() {
        return Ok(DispatchOutcome::Drained);
    }
    let wanted: usize = groups.values().map(Vec::len).sum();
    let claim_began = std::time::Instant::now();
    let mut tx = ctl.pool.begin().await?;
    let mut claimed = Vec::new();
    for (caps, slots) in &groups {
        let group = ClaimGroup {
            pool: &caps.pool,
            backends: &caps.backends,
            gpu_kind: &caps.gpu_kind,
            gpu_count: caps.gpu_count,
            slots,
        };
        claimed.extend(store::tasks::claim(&mut tx, &group, ctl.config.lease_ttl_ms as i64).await?);
    }
    if claimed.is_empty() {
        tx.rollback().await?;
        return Ok(DispatchOutcome::Drained);
    }
    let ids: Vec<Uuid> = claimed.iter().map(|c| c.id).collect();
    let mut inputs: HashMap<Uuid, Vec<ArtifactRef>> = HashMap::new();
    for row in store::artifacts::inputs_for(&mut tx, &ids).await? {
        inputs.entry(row.task_id).or_default().push(ArtifactRef {
            id: row.id.to_string(),
            role: row.role,
            kind: row.kind,
            uri: row.uri,
            content_hash: row.content_hash,
            name: row.name,
        });
    }
    tx.commit().await?;

    let mut undeliverable = Vec::new();
    let mut started = Vec::with_capacity(claimed.len());
    for c in &claimed {
        let assignment = Assignment {
            task_id: c.id.to_string(),
            attempt: c.attempt,
            campaign_id: c.campaign_id.to_string(),
            round_index: c.round_index,
            stage: c.stage.clone(),
            kind: c.kind.clone(),
            shard_index: c.shard_index,
            shard_count: c.shard_count,
            params_json: c.params.to_string(),
            inputs: inputs.remove(&c.id).unwrap_or_default(),
            output_prefix: ctl.output_prefix(
                c.campaign_id,
                c.round_index,
                &c.stage,
                c.shard_index,
                c.attempt,
            ),
            backend: c.backend.clone(),
        };
        let sent = match ctl.registry.assign(c.worker_id, c.id) {
            Some(stream) => stream.try_send(Ok(assignment)).is_ok(),
            None => false,
        };
        if sent {
            let latency = c.waited_s + claim_began.elapsed().as_secs_f64();
            started.push((c.pool.as_str(), latency));
        } else {
            undeliverable.push((c.id, c.attempt, c.worker_id));
        }
    }
    ctl.metrics.started(started);
    if !undeliverable.is_empty() {
        // The worker went away between claim and send: give the attempt back at once rather
        // than waiting for its lease to expire.
        let mut tx = ctl.pool.begin().await?;
        let failed: Vec<_> = undeliverable
            .iter()
            .map(|(t, a, _)| {
                (
                    *t,
                    *a,
                    "worker disconnected before receiving the task".to_string(),
                    true,
                )
            })
            .collect();
        let settled = store::tasks::fail(&mut tx, &failed).await?;
        ctl.settled(&settled);
        let closed: Vec<_> = settled
            .iter()
            .map(|s| (s.id, s.attempt, "failed", Some("undelivered")))
            .collect();
        store::attempts::finish_many(&mut tx, &closed).await?;
        tx.commit().await?;
        ctl.registry
            .release(undeliverable.iter().map(|(t, _, w)| (Some(*w), *t)));
    }
    Ok(if claimed.len() >= wanted {
        DispatchOutcome::Saturated
    } else {
        DispatchOutcome::Drained
    })
}

/// Reclaims expired leases every second: the attempt is closed as `lease_expired` and the task
/// is retried with backoff (or failed when out of attempts).
pub(crate) async fn run_reaper(ctl: Arc<Controller>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = reap_once(&ctl).await {
            tracing::warn!(error = %e, "lease reaper failed; will retry");
        }
    }
}

async fn reap_once(ctl: &Controller) -> Result<()> {
    let mut tx = ctl.pool.begin().await?;
    let expired = store::tasks::expire_leases(&mut tx).await?;
    if expired.is_empty() {
        tx.rollback().await?;
        return Ok(());
    }
    let closed: Vec<_> = expired
        .iter()
        .map(|s| {
            (
                s.id,
                s.attempt,
                "lease_expired",
                Some("no heartbeat before the lease expired"),
            )
        })
        .collect();
    store::attempts::finish_many(&mut tx, &closed).await?;
    let events: Vec<NewEvent> = expired
        .iter()
        .map(|s| NewEvent {
            campaign_id: Some(s.campaign_id),
            task_id: Some(s.id),
            kind: "lease_expired",
            message: format!(
                "stage {} shard {} attempt {}: lease expired (worker {} stopped heartbeating); task is now {}",
                s.stage,
                s.shard_index,
                s.attempt,
                s.worker_id.map(|w| w.to_string()).unwrap_or_default(),
                s.state
            ),
            actor: crate::planner::SYSTEM_ACTOR.into(),
            data: serde_json::json!({ "attempt": s.attempt, "worker_id": s.worker_id, "state": s.state }),
        })
        .collect();
    store::events::insert_many(&mut tx, &events).await?;
    tx.commit().await?;
    tracing::warn!(count = expired.len(), "reclaimed expired leases");
    ctl.metrics.lease_expired(expired.len());
    ctl.settled(&expired);
    ctl.registry
        .release(expired.iter().map(|s| (s.worker_id, s.id)));
    ctl.dispatch_wake.notify_one();
    ctl.planner_wake.notify_one();
    ctl.events_changed();
    Ok(())
}
