//! Task dispatch: the registry of connected workers and the loops that claim queued tasks for
//! their free slots and push them down each worker's assignment stream.
//!
//! One claim transaction serves all the idle slots of a capability group at once (up to
//! [`MAX_CLAIM`], `FOR UPDATE SKIP LOCKED`), so the cost per task falls as load rises; the
//! smallest groups are claimed first, and a group is claimed by one loop at a time. The registry
//! also answers heartbeats whose lease was just written ([`Registry::unwritten_beats`]). Leases
//! are reclaimed by [`run_reaper`]; any report on a task is fenced by its attempt number in the
//! store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flywheel_proto::v1::{ArtifactRef, Assignment, Directive, Endpoint};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use uuid::Uuid;

use crate::Controller;
use crate::error::Result;
use crate::store::attempts::AttemptState;
use crate::store::{self, events::NewEvent, tasks::Beat, tasks::ClaimGroup};

/// Most tasks one claim transaction takes.
const MAX_CLAIM: usize = 256;

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
    /// The token that registered the worker: only it may report for the worker.
    token_id: Uuid,
    caps: Capabilities,
    slots: usize,
    /// Tasks this controller believes the worker is running, and those whose end the worker
    /// reported while the report is being written.
    assigned: HashMap<Uuid, Running>,
    /// Present while the assignment stream is open; `stream_id` tells reconnects apart.
    stream: Option<(u64, AssignmentSender)>,
    /// The last registration or heartbeat: liveness is kept here, not written to Postgres.
    last_beat: std::time::Instant,
}

/// An attempt the registry believes a worker runs.
struct Running {
    attempt: i32,
    /// Where it writes, when this process assigned it (not for tasks a reconnecting worker
    /// reported).
    prefix: Option<Arc<str>>,
    /// When its lease was last written (the claim, or a written heartbeat); `None` when
    /// unknown or when the attempt was given a directive other than `Continue`, so its next
    /// heartbeat is written.
    lease_written: Option<LeaseMark>,
    /// The worker reported the attempt ended (completed or failed): it no longer holds a slot
    /// there, though the report may not be written yet.
    ended: bool,
}

impl Running {
    fn reported(attempt: i32) -> Self {
        Self {
            attempt,
            prefix: None,
            lease_written: None,
            ended: false,
        }
    }
}

/// A moment no later than a lease write began, and the registry's lease epoch then: the mark
/// is fresh only while the epoch is unchanged ([`Registry::rewrite_leases`] bumps it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseMark {
    at: Instant,
    epoch: u64,
}

/// What the registry knows of a worker's task, for checking a report against it.
pub(crate) enum Assigned {
    /// This attempt runs on the worker, writing under this prefix (if this process assigned it).
    Running(Option<Arc<str>>),
    /// The worker is registered here, but not with this attempt of the task.
    NotThisAttempt,
    /// The worker is not registered with this controller.
    UnknownWorker,
}

/// Workers known to this controller process.
#[derive(Default)]
pub(crate) struct Registry {
    workers: Mutex<HashMap<Uuid, Registered>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// Bumped by [`Registry::rewrite_leases`]: lease marks taken before it are not fresh.
    lease_epoch: std::sync::atomic::AtomicU64,
    /// Capability groups a dispatch loop is claiming for now, each with whether another loop
    /// passed it over meanwhile (and so left it to this claim to look again).
    claiming: Mutex<HashMap<Capabilities, bool>>,
    /// Capability groups whose last claim found nothing, with the queue epoch that claim began
    /// in and when their pool's next task comes out of its backoff.
    empty: Mutex<HashMap<Capabilities, EmptyMark>>,
}

/// A claim that found nothing for a group.
#[derive(Debug, Clone, Copy)]
struct EmptyMark {
    epoch: u64,
    next: Option<chrono::DateTime<chrono::Utc>>,
}

impl Registry {
    /// Registers (or re-registers) a worker. Refused when the id is registered here by another
    /// token.
    pub(crate) fn register(
        &self,
        id: Uuid,
        token_id: Uuid,
        caps: Capabilities,
        slots: usize,
        running: impl IntoIterator<Item = (Uuid, i32)>,
    ) -> bool {
        let mut workers = self.workers.lock().expect("registry");
        let entry = workers.entry(id).or_insert_with(|| Registered {
            token_id,
            caps: caps.clone(),
            slots,
            assigned: HashMap::new(),
            stream: None,
            last_beat: std::time::Instant::now(),
        });
        if entry.token_id != token_id {
            return false;
        }
        entry.last_beat = std::time::Instant::now();
        entry.caps = caps;
        entry.slots = slots;
        entry.assigned = running
            .into_iter()
            .map(|(t, a)| (t, Running::reported(a)))
            .collect();
        true
    }

    /// Records a heartbeat of the worker.
    pub(crate) fn touch(&self, id: Uuid) {
        if let Some(w) = self.workers.lock().expect("registry").get_mut(&id) {
            w.last_beat = std::time::Instant::now();
        }
    }

    /// Seconds since the worker's last heartbeat and whether its stream is open, if it is
    /// registered here.
    pub(crate) fn liveness(&self, id: Uuid) -> Option<(f64, bool)> {
        let workers = self.workers.lock().expect("registry");
        workers
            .get(&id)
            .map(|w| (w.last_beat.elapsed().as_secs_f64(), w.stream.is_some()))
    }

    /// The token a worker registered with, if it registered with this controller.
    pub(crate) fn owner(&self, id: Uuid) -> Option<Uuid> {
        let workers = self.workers.lock().expect("registry");
        workers.get(&id).map(|w| w.token_id)
    }

    /// Whether `attempt` of `task` is assigned to `worker` here, and where it writes.
    pub(crate) fn assigned(&self, worker: Uuid, task: Uuid, attempt: i32) -> Assigned {
        let workers = self.workers.lock().expect("registry");
        match workers.get(&worker) {
            None => Assigned::UnknownWorker,
            Some(w) => match w.assigned.get(&task) {
                Some(r) if r.attempt == attempt => Assigned::Running(r.prefix.clone()),
                _ => Assigned::NotThisAttempt,
            },
        }
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

    /// Ends every open assignment stream (at shutdown): the workers see the stream close and
    /// reconnect, to this controller's successor.
    pub(crate) fn close_streams(&self) {
        let mut workers = self.workers.lock().expect("registry");
        for w in workers.values_mut() {
            w.stream = None;
        }
    }

    /// Frees the slots held by these attempts `(worker, task, attempt)` (finished, failed,
    /// abandoned or reclaimed). A slot is freed only for the attempt that holds it, so a report
    /// naming another attempt of a task the worker runs frees nothing.
    pub(crate) fn release(
        &self,
        tasks: impl IntoIterator<Item = (Option<Uuid>, Uuid, i32)>,
    ) -> bool {
        let mut workers = self.workers.lock().expect("registry");
        let mut freed = false;
        let remove = |w: &mut Registered, task: Uuid, attempt: i32| {
            if w.assigned.get(&task).is_some_and(|r| r.attempt == attempt) {
                w.assigned.remove(&task);
                true
            } else {
                false
            }
        };
        for (worker, task, attempt) in tasks {
            match worker.and_then(|w| workers.get_mut(&w)) {
                Some(w) => freed |= remove(w, task, attempt),
                None => {
                    for w in workers.values_mut() {
                        freed |= remove(w, task, attempt);
                    }
                }
            }
        }
        freed
    }

    /// Frees the slots of attempts `(task, attempt)` the worker reports ended, before the report
    /// is written: the worker runs them no longer, so the next tasks can be claimed while the
    /// report commits. The entries stay until the write releases them ([`Registry::release`]),
    /// accepted or stale. Returns whether a slot was freed.
    pub(crate) fn ended(&self, worker: Uuid, tasks: &[(Uuid, i32)]) -> bool {
        let mut workers = self.workers.lock().expect("registry");
        let Some(w) = workers.get_mut(&worker) else {
            return false;
        };
        let mut freed = false;
        for (task, attempt) in tasks {
            if let Some(r) = w.assigned.get_mut(task).filter(|r| r.attempt == *attempt) {
                freed |= !r.ended;
                r.ended = true;
            }
        }
        freed
    }

    /// Free slots of connected workers (of one capability group, if given), grouped by
    /// capabilities. Slots are interleaved across workers so that a short batch spreads over
    /// them.
    fn idle_groups(&self, only: Option<&Capabilities>) -> BTreeMap<Capabilities, Vec<Uuid>> {
        let workers = self.workers.lock().expect("registry");
        let mut per_group: BTreeMap<Capabilities, Vec<(Uuid, usize)>> = BTreeMap::new();
        for (id, w) in workers.iter() {
            let busy = w.assigned.values().filter(|r| !r.ended).count();
            let free = w.slots.saturating_sub(busy);
            if w.stream.is_some() && free > 0 && only.is_none_or(|c| *c == w.caps) {
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

    /// Takes a capability group for one claim and returns its free slots now (at most
    /// [`MAX_CLAIM`]; the rest follow at once), unless another dispatch loop is claiming for it
    /// (which then looks again when it is done) or none is free. Slots are read only once the
    /// group is taken, so two loops never hand out the same slot.
    fn begin_claim(&self, caps: &Capabilities) -> Option<ClaimTurn<'_>> {
        {
            let mut claiming = self.claiming.lock().expect("claiming");
            if let Some(passed_over) = claiming.get_mut(caps) {
                *passed_over = true;
                return None;
            }
            claiming.insert(caps.clone(), false);
        }
        let mut slots = self
            .idle_groups(Some(caps))
            .remove(caps)
            .unwrap_or_default();
        slots.truncate(MAX_CLAIM);
        let turn = ClaimTurn {
            registry: self,
            caps: caps.clone(),
            slots,
            ended: false,
        };
        // An empty turn is dropped here, which releases the group.
        (!turn.slots.is_empty()).then_some(turn)
    }

    /// Whether a claim for the group would find nothing: its last claim, begun in this queue
    /// epoch, found nothing, and no backoff of its pool has come due since. Then returns when
    /// the next one does (if any). Idle groups cost no claim per wake-up of the dispatcher
    /// (every completion elsewhere wakes it).
    fn known_empty(
        &self,
        caps: &Capabilities,
        epoch: u64,
    ) -> Option<Option<chrono::DateTime<chrono::Utc>>> {
        let empty = self.empty.lock().expect("empty groups");
        let mark = empty.get(caps).filter(|m| m.epoch == epoch)?;
        match mark.next {
            Some(at) if at <= chrono::Utc::now() => None,
            next => Some(next),
        }
    }

    /// Records what a claim for the group begun in queue epoch `epoch` found.
    fn claimed(
        &self,
        caps: &Capabilities,
        epoch: u64,
        found: usize,
        next: Option<chrono::DateTime<chrono::Utc>>,
    ) {
        let mut empty = self.empty.lock().expect("empty groups");
        if found == 0 {
            empty.insert(caps.clone(), EmptyMark { epoch, next });
        } else {
            empty.remove(caps);
        }
    }

    /// Records the assignment, whose lease was written by a claim marked `claimed`, and returns
    /// the worker's stream, if it is still connected.
    fn assign(
        &self,
        worker: Uuid,
        task: Uuid,
        attempt: i32,
        prefix: Arc<str>,
        claimed: LeaseMark,
    ) -> Option<AssignmentSender> {
        let mut workers = self.workers.lock().expect("registry");
        let w = workers.get_mut(&worker)?;
        w.assigned.insert(
            task,
            Running {
                attempt,
                prefix: Some(prefix),
                lease_written: Some(claimed),
                ended: false,
            },
        );
        w.stream.as_ref().map(|(_, tx)| tx.clone())
    }

    /// Splits a worker's heartbeats into those answered here and those to write. A beat is
    /// answered `Continue` without a write when its attempt runs on the worker as this process
    /// assigned it and its lease was written less than `window` ago: writing it would move the
    /// lease by less than that, and the progress it carries waits for the next written beat.
    /// Beats carrying an endpoint or a cluster job, and beats of attempts not known here as
    /// current (stale ones included), are always written, so the store fences them.
    pub(crate) fn unwritten_beats(
        &self,
        worker: Uuid,
        beats: Vec<Beat>,
        window: Duration,
    ) -> (Vec<(Uuid, i32)>, Vec<Beat>) {
        let epoch = self.lease_epoch.load(std::sync::atomic::Ordering::SeqCst);
        let workers = self.workers.lock().expect("registry");
        let Some(w) = workers.get(&worker) else {
            return (Vec::new(), beats);
        };
        let fresh = |b: &Beat| {
            b.endpoint.is_none()
                && b.external_job.is_none()
                && w.assigned.get(&b.id).is_some_and(|r| {
                    r.attempt == b.attempt
                        && r.prefix.is_some()
                        && r.lease_written
                            .is_some_and(|m| m.epoch == epoch && m.at.elapsed() < window)
                })
        };
        let (fresh, written): (Vec<Beat>, Vec<Beat>) = beats.into_iter().partition(fresh);
        (fresh.iter().map(|b| (b.id, b.attempt)).collect(), written)
    }

    /// Marks the start of a lease write (a claim, or heartbeats sent to the writer).
    pub(crate) fn lease_mark(&self) -> LeaseMark {
        LeaseMark {
            at: Instant::now(),
            epoch: self.lease_epoch.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// Records what written heartbeats of a worker were told: a `Continue` means the lease was
    /// written after `began`; any other directive makes every later beat of that attempt
    /// written too.
    pub(crate) fn beats_written(
        &self,
        worker: Uuid,
        directives: &[(Uuid, i32, Directive)],
        began: LeaseMark,
    ) {
        let mut workers = self.workers.lock().expect("registry");
        let Some(w) = workers.get_mut(&worker) else {
            return;
        };
        for (task, attempt, d) in directives {
            if let Some(r) = w.assigned.get_mut(task).filter(|r| r.attempt == *attempt) {
                r.lease_written = (*d == Directive::Continue).then_some(began);
            }
        }
    }

    /// Makes the next heartbeat of every attempt go to the store: something outside the report
    /// path (a cancel, a pause, another controller) may have changed what it should be told.
    pub(crate) fn rewrite_leases(&self) {
        self.lease_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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

/// One dispatch loop's turn at claiming for a capability group; ends when dropped.
struct ClaimTurn<'a> {
    registry: &'a Registry,
    caps: Capabilities,
    slots: Vec<Uuid>,
    ended: bool,
}

impl ClaimTurn<'_> {
    /// Ends the turn; returns whether another loop passed the group over meanwhile. Reading
    /// the mark and releasing the group are one step: a loop passing it over later finds it
    /// free instead.
    fn end(mut self) -> bool {
        self.ended = true;
        self.registry
            .claiming
            .lock()
            .expect("claiming")
            .remove(&self.caps)
            .unwrap_or(false)
    }
}

impl Drop for ClaimTurn<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.registry
                .claiming
                .lock()
                .expect("claiming")
                .remove(&self.caps);
        }
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
            Ok(DispatchOutcome::Drained(next)) => {
                crate::wake::until(next_retry(&ctl).into_iter().chain(next).min())
            }
            Err(e) => {
                tracing::warn!(error = %e, "dispatch failed; will retry");
                Duration::from_millis(500)
            }
        };
        tokio::select! {
            _ = ctl.dispatch_wake.notified() => {}
            // A retry or backoff came due, or the idle tick: look at every group again.
            _ = tokio::time::sleep(wait) => {
                ctl.queue_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            _ = shutdown.changed() => return,
        }
    }
}

enum DispatchOutcome {
    /// A group got a task for every slot claimed for (or was passed over by the other loop):
    /// there may be more work.
    Saturated,
    /// Fewer tasks than slots (or no slots): wait for a wake-up, or until the next queued task
    /// of the idle slots' pools comes out of its backoff (if one does).
    Drained(Option<chrono::DateTime<chrono::Utc>>),
}

/// When the earliest retry this process knows of comes due (other controllers' changes wake
/// the dispatcher). Retries already due are dropped from the set, since the dispatch about to
/// run claims them.
fn next_retry(ctl: &Controller) -> Option<chrono::DateTime<chrono::Utc>> {
    let now = chrono::Utc::now();
    let mut retries = ctl.retries.lock().expect("retries");
    let later = retries.split_off(&now);
    let due = !retries.is_empty();
    *retries = later;
    if due {
        Some(now)
    } else {
        retries.first().copied()
    }
}

async fn dispatch_once(ctl: &Controller) -> Result<DispatchOutcome> {
    let mut groups: Vec<(Capabilities, usize)> = ctl
        .registry
        .idle_groups(None)
        .into_iter()
        .map(|(caps, slots)| (caps, slots.len()))
        .collect();
    if groups.is_empty() {
        return Ok(DispatchOutcome::Drained(None));
    }
    // Smallest groups first, each in its own transaction: a few free slots of one pool (the
    // next stage of a chain, on its own worker) are not held behind a big claim for another.
    // A group another loop is claiming for is left to it.
    groups.sort_by_key(|(_, free)| *free);
    // Whether a group this loop claimed for may have more work now: it filled every slot it
    // asked for, or another loop passed it over meanwhile. Then this loop goes on at once;
    // else it waits for the next wake-up.
    let mut more = false;
    let mut claimed_any = false;
    let mut next: Option<chrono::DateTime<chrono::Utc>> = None;
    // Read before any claim begins: a change committed during a claim that found nothing
    // makes the group worth another look.
    let epoch = ctl.queue_epoch.load(std::sync::atomic::Ordering::SeqCst);
    for (caps, _) in &groups {
        if let Some(group_next) = ctl.registry.known_empty(caps, epoch) {
            next = next.into_iter().chain(group_next).min();
            continue;
        }
        let Some(turn) = ctl.registry.begin_claim(caps) else {
            continue;
        };
        let wanted = turn.slots.len();
        let (claimed, group_next) = claim_group(ctl, caps, &turn.slots).await?;
        ctl.registry.claimed(caps, epoch, claimed, group_next);
        let passed_over = turn.end();
        more |= claimed >= wanted || passed_over;
        claimed_any |= claimed > 0;
        next = next.into_iter().chain(group_next).min();
    }
    Ok(if more {
        DispatchOutcome::Saturated
    } else if claimed_any {
        DispatchOutcome::Drained(None)
    } else {
        DispatchOutcome::Drained(next)
    })
}

/// Inputs as handed to workers, grouped by the task or round they are for, in the order read.
fn by_owner(rows: Vec<store::artifacts::InputRow>) -> HashMap<Uuid, Vec<ArtifactRef>> {
    let mut inputs: HashMap<Uuid, Vec<ArtifactRef>> = HashMap::new();
    for row in rows {
        inputs.entry(row.owner).or_default().push(ArtifactRef {
            id: row.id.to_string(),
            role: row.role,
            kind: row.kind,
            uri: row.uri,
            content_hash: row.content_hash,
            name: row.name,
        });
    }
    inputs
}

/// Claims queued tasks for one capability group's free slots and sends them. Returns how many
/// it claimed, and when none: when the group's pool next has a task coming out of its backoff.
async fn claim_group(
    ctl: &Controller,
    caps: &Capabilities,
    slots: &[Uuid],
) -> Result<(usize, Option<chrono::DateTime<chrono::Utc>>)> {
    let claim_began = ctl.registry.lease_mark();
    let mut tx = ctl.pool.begin().await?;
    let group = ClaimGroup {
        pool: &caps.pool,
        backends: &caps.backends,
        gpu_kind: &caps.gpu_kind,
        gpu_count: caps.gpu_count,
        slots,
    };
    let claimed = store::tasks::claim(&mut tx, &group, ctl.config.lease_ttl_ms as i64).await?;
    if claimed.is_empty() {
        let next = store::tasks::next_claimable(&mut tx, &[caps.pool.as_str()]).await?;
        tx.rollback().await?;
        return Ok((0, next));
    }
    let ids: Vec<Uuid> = claimed.iter().map(|c| c.id).collect();
    // Each task's inputs: its dependencies' outputs, its round's models, earlier prompts.
    let (earlier, upstream): (Vec<_>, Vec<_>) = store::artifacts::inputs_for(&mut tx, &ids)
        .await?
        .into_iter()
        .partition(|row| row.role == "earlier_prompts");
    let (mut upstream, mut earlier) = (by_owner(upstream), by_owner(earlier));
    let mut rounds: Vec<Uuid> = claimed.iter().map(|c| c.round_id).collect();
    rounds.sort_unstable();
    rounds.dedup();
    let models = by_owner(store::artifacts::round_inputs(&mut tx, &rounds).await?);
    let mut endpoints: HashMap<Uuid, Vec<Endpoint>> = HashMap::new();
    for row in store::endpoints::for_consumers(&mut tx, &ids).await? {
        endpoints
            .entry(row.consumer_id)
            .or_default()
            .push(Endpoint {
                name: row.stage,
                url: row.url,
                served_name: row.served_name,
                model_id: row.model_id.map(|m| m.to_string()).unwrap_or_default(),
                content_hash: row.content_hash,
            });
    }
    tx.commit().await?;
    // New leases (committed): a reaper waiting for none must now look when they expire.
    if !ctl
        .reaper_watching
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        ctl.reaper_wake.notify_one();
    }

    let mut undeliverable = Vec::new();
    let mut started = Vec::with_capacity(claimed.len());
    for c in &claimed {
        let prefix: Arc<str> = ctl
            .output_prefix(
                c.campaign_id,
                c.round_index,
                &c.stage,
                c.shard_index,
                c.attempt,
            )
            .into();
        let assignment = Assignment {
            task_id: c.id.to_string(),
            attempt: c.attempt,
            campaign_id: c.campaign_id.to_string(),
            round_index: c.round_index,
            stage: c.stage.clone(),
            kind: c.kind.clone(),
            shard_index: c.shard_index,
            shard_count: c.shard_count,
            params_json: c.params.clone(),
            inputs: upstream
                .remove(&c.id)
                .into_iter()
                .flatten()
                .chain(models.get(&c.round_id).into_iter().flatten().cloned())
                .chain(earlier.remove(&c.id).into_iter().flatten())
                .collect(),
            output_prefix: prefix.to_string(),
            backend: c.backend.clone(),
            endpoints: endpoints.remove(&c.id).unwrap_or_default(),
        };
        let sent = match ctl
            .registry
            .assign(c.worker_id, c.id, c.attempt, prefix, claim_began)
        {
            Some(stream) => stream.try_send(Ok(assignment)).is_ok(),
            None => false,
        };
        if sent {
            let latency = c.waited_s + claim_began.at.elapsed().as_secs_f64();
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
        let campaigns: Vec<Uuid> = claimed.iter().map(|c| c.campaign_id).collect();
        store::campaigns::lock_settling(&mut tx, &campaigns).await?;
        let failed: Vec<_> = undeliverable
            .iter()
            .map(|(t, a, w)| {
                (
                    *t,
                    *a,
                    *w,
                    "worker disconnected before receiving the task",
                    true,
                )
            })
            .collect();
        let settled = store::tasks::fail(&mut tx, &failed).await?;
        ctl.settled(&settled);
        let closed: Vec<_> = settled
            .iter()
            .map(|s| (s.id, s.attempt, AttemptState::Failed, Some("undelivered")))
            .collect();
        store::attempts::finish_many(&mut tx, &closed).await?;
        tx.commit().await?;
        ctl.registry
            .release(undeliverable.iter().map(|(t, a, w)| (Some(*w), *t, *a)));
    }
    Ok((claimed.len(), None))
}

/// Reclaims expired leases as they expire: the attempt is closed as `lease_expired` and the
/// task is retried with backoff (or failed when out of attempts). Between looks it sleeps until
/// the earliest lease expires (woken earlier by new claims, other controllers, or a database
/// found unreachable, which it then probes twice a second until it is back).
pub(crate) async fn run_reaper(ctl: Arc<Controller>, mut shutdown: watch::Receiver<bool>) {
    /// Past the expiry, so that the lease has expired by the database's clock too.
    const SLACK: chrono::TimeDelta = chrono::TimeDelta::milliseconds(20);
    loop {
        ctl.reaper_watching
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let wait = match reap_once(&ctl).await {
            Ok(next) => {
                ctl.reaper_watching
                    .store(next.is_some(), std::sync::atomic::Ordering::SeqCst);
                ctl.db_up
                    .send_if_modified(|was| !std::mem::replace(was, true));
                crate::wake::until(next.map(|at| at + SLACK))
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease reaper failed; will retry");
                ctl.db_up
                    .send_if_modified(|was| std::mem::replace(was, false));
                Duration::from_millis(500)
            }
        };
        let wait = if *ctl.db_up.borrow() {
            wait
        } else {
            wait.min(Duration::from_millis(500))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctl.reaper_wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Settles expired leases; returns when the earliest remaining one expires.
async fn reap_once(ctl: &Controller) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    let mut tx = ctl.pool.begin().await?;
    if !*ctl.db_up.borrow() {
        // Back from a database outage: no heartbeat could be recorded meanwhile, so every
        // running lease gets one more period (as at controller start) before anything is
        // reclaimed; live workers' next heartbeats keep their tasks.
        let ttl = ctl.config.lease_ttl_ms as i64;
        let extended = store::tasks::extend_all_leases(&mut tx, ttl).await?;
        let next = store::tasks::next_lease_expiry(&mut tx).await?;
        tx.commit().await?;
        tracing::warn!(
            tasks = extended,
            "database reachable again; running leases extended by one period"
        );
        return Ok(next);
    }
    // Whether a retry waits for an endpoint is decided under the settling lock (as in the
    // writer).
    let campaigns = store::tasks::campaigns_with_expired_leases(&mut tx).await?;
    let expired = if campaigns.is_empty() {
        Vec::new()
    } else {
        store::campaigns::lock_settling(&mut tx, &campaigns).await?;
        store::tasks::expire_leases(&mut tx, &campaigns).await?
    };
    let next = store::tasks::next_lease_expiry(&mut tx).await?;
    if expired.is_empty() {
        tx.rollback().await?;
        return Ok(next);
    }
    let closed: Vec<_> = expired
        .iter()
        .map(|s| {
            (
                s.id,
                s.attempt,
                AttemptState::LeaseExpired,
                Some("no heartbeat before the lease expired"),
            )
        })
        .collect();
    store::attempts::finish_many(&mut tx, &closed).await?;
    // A server whose worker went silent is gone: its consumers wait for the next one.
    store::endpoints::retire(&mut tx, &store::tasks::serve_ids(&expired), false).await?;
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
        .release(expired.iter().map(|s| (s.worker_id, s.id, s.attempt)));
    ctl.queue_changed();
    ctl.planner_wake.notify_one();
    ctl.events_changed();
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Capabilities {
        Capabilities {
            pool: "cpu".into(),
            backends: vec!["test".into()],
            gpu_kind: String::new(),
            gpu_count: 0,
        }
    }

    fn beat(worker_id: Uuid, id: Uuid, attempt: i32) -> Beat {
        Beat {
            worker_id,
            id,
            attempt,
            progress: 0.5,
            message: String::new(),
            metrics: serde_json::json!({}),
            endpoint: None,
            external_job: None,
        }
    }

    #[test]
    fn a_group_is_claimed_by_one_loop_at_a_time() {
        let r = Registry::default();
        let worker = Uuid::new_v4();
        assert!(r.register(worker, Uuid::new_v4(), caps(), 2, Vec::new()));
        let (tx, _rx) = mpsc::channel(4);
        r.attach(worker, tx).unwrap();
        let turn = r.begin_claim(&caps()).expect("the group is free");
        assert_eq!(turn.slots, [worker, worker]);
        assert!(r.begin_claim(&caps()).is_none(), "another loop holds it");
        assert!(turn.end(), "it was passed over meanwhile");
        let turn = r
            .begin_claim(&caps())
            .expect("free again once the turn ended");
        assert!(!turn.end());
    }

    #[test]
    fn a_slot_is_free_once_its_attempt_is_reported_ended_and_held_by_the_next_attempt() {
        let r = Registry::default();
        let worker = Uuid::new_v4();
        let (task, other) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(r.register(worker, Uuid::new_v4(), caps(), 1, vec![(task, 1)]));
        let (tx, _rx) = mpsc::channel(4);
        r.attach(worker, tx).unwrap();
        assert!(
            r.idle_groups(None).is_empty(),
            "the reported task holds the slot"
        );
        assert!(
            !r.ended(worker, &[(task, 2)]),
            "another attempt frees nothing"
        );
        assert!(!r.ended(Uuid::new_v4(), &[(task, 1)]), "nor another worker");
        assert!(r.ended(worker, &[(task, 1)]));
        assert!(!r.ended(worker, &[(task, 1)]), "freed once");
        assert_eq!(r.idle_groups(None)[&caps()], [worker]);
        // Its report is still checked against the attempt until written.
        assert!(matches!(r.assigned(worker, task, 1), Assigned::Running(_)));

        // The retried task comes back to the slot; the first attempt's write frees nothing.
        r.assign(worker, task, 2, "p".into(), r.lease_mark());
        assert!(r.idle_groups(None).is_empty());
        assert!(!r.release([(Some(worker), task, 1)]));
        assert!(r.idle_groups(None).is_empty());
        r.assign(worker, other, 1, "p".into(), r.lease_mark());
        assert!(r.ended(worker, &[(task, 2), (other, 1)]));
        assert!(r.release([(Some(worker), task, 2), (Some(worker), other, 1)]));
        assert_eq!(r.idle_groups(None)[&caps()], [worker]);
    }

    #[test]
    fn a_group_found_empty_is_skipped_until_the_queue_changes_or_a_backoff_ends() {
        let r = Registry::default();
        assert_eq!(r.known_empty(&caps(), 0), None, "never claimed for");
        r.claimed(&caps(), 0, 0, None);
        assert_eq!(r.known_empty(&caps(), 0), Some(None));
        assert_eq!(r.known_empty(&caps(), 1), None, "the queue changed since");

        // A claim that found tasks clears the mark.
        r.claimed(&caps(), 1, 3, None);
        assert_eq!(r.known_empty(&caps(), 1), None);

        // Skipped until its pool's next task comes out of its backoff.
        let later = chrono::Utc::now() + chrono::TimeDelta::seconds(60);
        r.claimed(&caps(), 1, 0, Some(later));
        assert_eq!(r.known_empty(&caps(), 1), Some(Some(later)));
        let due = chrono::Utc::now() - chrono::TimeDelta::milliseconds(1);
        r.claimed(&caps(), 1, 0, Some(due));
        assert_eq!(r.known_empty(&caps(), 1), None);
    }

    /// Which of these beats the registry answers without a write.
    fn unwritten(r: &Registry, worker: Uuid, beats: Vec<Beat>) -> Vec<(Uuid, i32)> {
        r.unwritten_beats(worker, beats, Duration::from_secs(1)).0
    }

    #[test]
    fn only_fresh_beats_of_attempts_assigned_here_go_unwritten() {
        let r = Registry::default();
        let worker = Uuid::new_v4();
        let (fresh, old, reported) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert!(r.register(worker, Uuid::new_v4(), caps(), 4, [(reported, 1)]));
        let (tx, _rx) = mpsc::channel(4);
        r.attach(worker, tx).unwrap();
        let now = r.lease_mark();
        let long_ago = LeaseMark {
            at: now.at - Duration::from_secs(2),
            ..now
        };
        r.assign(worker, fresh, 2, "p".into(), now).unwrap();
        r.assign(worker, old, 1, "p".into(), long_ago).unwrap();

        let mut with_job = beat(worker, fresh, 2);
        with_job.external_job = Some("slurm:1".into());
        let beats = vec![
            beat(worker, fresh, 2),
            beat(worker, fresh, 1),    // another attempt: the store fences it
            beat(worker, old, 1),      // lease written too long ago
            beat(worker, reported, 1), // assigned by an earlier controller process
            with_job,
        ];
        let (answered, written) = r.unwritten_beats(worker, beats, Duration::from_secs(1));
        assert_eq!(answered, [(fresh, 2)]);
        assert_eq!(written.len(), 4);
        // Another worker's beat of the same attempt is written (and fenced by the store).
        assert!(unwritten(&r, Uuid::new_v4(), vec![beat(worker, fresh, 2)]).is_empty());

        // A written beat told to go on renews the window; any other directive ends it.
        r.beats_written(worker, &[(old, 1, Directive::Continue)], r.lease_mark());
        assert_eq!(
            unwritten(&r, worker, vec![beat(worker, old, 1)]),
            [(old, 1)]
        );
        r.beats_written(worker, &[(old, 1, Directive::Cancel)], r.lease_mark());
        assert!(unwritten(&r, worker, vec![beat(worker, old, 1)]).is_empty());

        // After a change outside the report path, every next beat is written, including one
        // whose write began before the change and was recorded after it.
        let before = r.lease_mark();
        r.rewrite_leases();
        assert!(unwritten(&r, worker, vec![beat(worker, fresh, 2)]).is_empty());
        r.beats_written(worker, &[(old, 1, Directive::Continue)], before);
        assert!(unwritten(&r, worker, vec![beat(worker, old, 1)]).is_empty());
    }
}
