//! Group commit for worker reports. Heartbeats, completions and failures queue here; one task
//! drains whatever has accumulated and writes it all in a single transaction, then answers
//! every caller. Nothing is acknowledged before its transaction commits, and under load the
//! number of transactions per task falls well below one.
//!
//! A transaction first writes the rows its reports own (the reported attempts, their endpoints
//! and outputs), then takes the settling lock of the campaigns it touches
//! ([`store::campaigns::lock_settling`]) before anything decided from other tasks' states, so
//! that the writers of two controllers finishing a stage's last shards cannot each miss the
//! other's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use flywheel_proto::v1::Directive;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::Controller;
use crate::error::{Error, Result};
use crate::store::{self, artifacts::NewOutput, events::NewEvent, tasks::Beat};
use crate::store::{attempts::AttemptState, tasks::TaskState};

/// Most reports written in one transaction: large enough that the cost per report is low,
/// small enough that a transaction (which a stage handoff may wait behind) stays short.
const MAX_BATCH: usize = 512;

/// Why a report changed nothing.
#[derive(Debug)]
pub(crate) enum Rejected {
    /// The attempt is not the task's current running attempt.
    Stale,
    /// The write failed; the caller may retry.
    Unavailable(String),
}

type Reply<T> = oneshot::Sender<Result<T, Rejected>>;
/// What a heartbeat gets back: a directive per reported attempt.
pub(crate) type Directives = Vec<(Uuid, i32, Directive)>;

pub(crate) enum Report {
    Heartbeat {
        worker_id: Uuid,
        beats: Vec<Beat>,
        reply: Reply<Directives>,
    },
    Complete {
        worker_id: Uuid,
        task_id: Uuid,
        attempt: i32,
        outputs: Vec<NewOutput>,
        metrics: Value,
        reply: Reply<()>,
    },
    Fail {
        worker_id: Uuid,
        task_id: Uuid,
        attempt: i32,
        error: String,
        retryable: bool,
        reply: Reply<bool>,
    },
}

impl Report {
    fn reject(self, why: &str) {
        let e = || Rejected::Unavailable(why.to_string());
        match self {
            Report::Heartbeat { reply, .. } => drop(reply.send(Err(e()))),
            Report::Complete { reply, .. } => drop(reply.send(Err(e()))),
            Report::Fail { reply, .. } => drop(reply.send(Err(e()))),
        }
    }
}

pub(crate) fn channel() -> (mpsc::Sender<Report>, mpsc::Receiver<Report>) {
    mpsc::channel(MAX_BATCH * 4)
}

pub(crate) async fn run(
    ctl: Arc<Controller>,
    mut rx: mpsc::Receiver<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { return },
            _ = shutdown.changed() => return,
        }
        let reports = std::mem::take(&mut batch);
        write_batch(&ctl, reports).await;
    }
}

/// Writes reports in one transaction. If it fails and held more than one report, each report is
/// written again in a transaction of its own, so that one report the database refuses fails
/// only itself; when the database is unreachable every report is answered `Unavailable`.
async fn write_batch(ctl: &Controller, reports: Vec<Report>) {
    let e = match commit(ctl, &reports).await {
        Ok(committed) => return answer(ctl, reports, committed),
        Err(e) => e,
    };
    let unreachable = matches!(
        e,
        Error::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed)
    );
    if unreachable {
        ctl.database_unreachable();
    }
    if reports.len() == 1 || unreachable {
        tracing::warn!(error = %e, reports = reports.len(), "report batch failed");
        let why = e.to_string();
        for r in reports {
            r.reject(&why);
        }
        return;
    }
    tracing::warn!(error = %e, reports = reports.len(), "report batch failed; writing its reports one by one");
    for r in reports {
        let one = [r];
        match commit(ctl, &one).await {
            Ok(committed) => answer(ctl, one.into(), committed),
            Err(e) => {
                tracing::warn!(error = %e, "report failed");
                let [r] = one;
                r.reject(&e.to_string());
            }
        }
    }
}

struct Committed {
    /// Current attempts that heartbeated, with the directive they get.
    alive: HashMap<(Uuid, i32), Directive>,
    completed: HashSet<(Uuid, i32)>,
    /// Settled failures: (task, attempt) → will retry.
    failed: HashMap<(Uuid, i32), bool>,
    released: Vec<(Option<Uuid>, Uuid, i32)>,
    /// Tasks were unblocked or put back: the queue changed. (Slots freed by ended attempts
    /// wake the dispatcher through the registry's release.)
    queue_changed: bool,
    wake_planner: bool,
    events: bool,
}

async fn commit(ctl: &Controller, reports: &[Report]) -> Result<Committed> {
    let mut beats: Vec<&Beat> = Vec::new();
    // Completions: the same (task, attempt) reported twice in one batch counts once.
    let mut seen = HashSet::new();
    let mut completions = Vec::new();
    let mut outputs: Vec<&NewOutput> = Vec::new();
    let mut failures = Vec::new();
    for r in reports {
        match r {
            Report::Heartbeat { beats: b, .. } => beats.extend(b),
            Report::Complete {
                worker_id,
                task_id,
                attempt,
                outputs: o,
                metrics,
                ..
            } => {
                if seen.insert((*task_id, *attempt)) {
                    completions.push((*task_id, *attempt, *worker_id, metrics.clone()));
                    outputs.extend(o);
                }
            }
            Report::Fail {
                worker_id,
                task_id,
                attempt,
                error,
                retryable,
                ..
            } => failures.push((*task_id, *attempt, *worker_id, error.as_str(), *retryable)),
        }
    }

    let mut tx = ctl.pool.begin().await?;
    let ttl = ctl.config.lease_ttl_ms as i64;
    let mut events = Vec::new();

    // A beat of an attempt that completes or fails in this same batch is not written: the
    // report that ends the attempt says more. It is answered as that report is.
    let ending: HashSet<(Uuid, i32, Uuid)> = completions
        .iter()
        .map(|c| (c.0, c.1, c.2))
        .chain(failures.iter().map(|f| (f.0, f.1, f.2)))
        .collect();
    let (elided, beats): (Vec<&Beat>, Vec<&Beat>) = beats
        .into_iter()
        .partition(|b| ending.contains(&(b.id, b.attempt, b.worker_id)));
    // The rows the reports own: the reported attempts, their endpoints and outputs.
    let alive = store::tasks::heartbeat(&mut tx, &beats, ttl).await?;
    // Endpoints of serve attempts that are current: readiness releases their consumers.
    let current: HashSet<(Uuid, i32)> = alive.iter().map(|a| (a.0, a.1)).collect();
    let reported: Vec<&store::endpoints::NewEndpoint> = beats
        .iter()
        .filter(|b| current.contains(&(b.id, b.attempt)))
        .filter_map(|b| b.endpoint.as_ref())
        .collect();
    let ready = store::endpoints::ready(&mut tx, &reported).await?;
    let jobs: Vec<(Uuid, i32, &str)> = beats
        .iter()
        .filter(|b| current.contains(&(b.id, b.attempt)))
        .filter_map(|b| Some((b.id, b.attempt, b.external_job.as_deref()?)))
        .collect();
    store::attempts::set_external_jobs(&mut tx, &jobs).await?;
    let completed = store::tasks::complete(&mut tx, &completions).await?;
    let accepted: HashSet<(Uuid, i32)> = completed.iter().map(|c| (c.id, c.attempt)).collect();
    let outputs: Vec<NewOutput> = outputs
        .into_iter()
        .filter(|o| accepted.contains(&(o.task_id, o.attempt)))
        .cloned()
        .collect();
    store::artifacts::insert_outputs(&mut tx, &outputs).await?;
    store::endpoints::retire(&mut tx, &store::tasks::serve_ids(&completed), true).await?;

    // What is decided from other tasks' states, under the settling lock of every campaign
    // this transaction touches.
    let mut campaigns: Vec<Uuid> = completed
        .iter()
        .map(|c| c.campaign_id)
        .chain(ready.iter().map(|r| r.1))
        .collect();
    if !failures.is_empty() {
        let failing: Vec<Uuid> = failures.iter().map(|f| f.0).collect();
        campaigns.extend(store::tasks::campaigns_of(&mut tx, &failing).await?);
    }
    store::campaigns::lock_settling(&mut tx, &campaigns).await?;
    let released_by: Vec<Uuid> = ready
        .iter()
        .map(|r| r.0)
        .chain(completed.iter().map(|c| c.id))
        .collect();
    let unblocked = store::tasks::unblock_dependents(&mut tx, &released_by).await?;
    for (task_id, campaign_id, stage) in &ready {
        let Some(e) = reported.iter().find(|e| e.task_id == *task_id) else {
            continue;
        };
        let weights = if e.content_hash.is_empty() {
            "not reported by the server"
        } else {
            &e.content_hash
        };
        events.push(NewEvent {
            campaign_id: Some(*campaign_id),
            task_id: Some(*task_id),
            kind: "endpoint_ready",
            message: format!(
                "stage {stage} attempt {}: endpoint {} ready at {} (weights {weights})",
                e.attempt, e.served_name, e.url
            ),
            actor: crate::planner::SYSTEM_ACTOR.into(),
            data: json!({ "stage": stage, "url": e.url, "served_name": e.served_name,
                          "model_id": e.model_id, "content_hash": e.content_hash,
                          "attempt": e.attempt }),
        });
    }
    let pairs: Vec<(Uuid, String)> = completed
        .iter()
        .map(|c| (c.round_id, c.stage.clone()))
        .collect();
    let stages_done = store::tasks::completed_stages(&mut tx, &pairs).await?;
    for (campaign_id, _round, round_index, stage) in &stages_done {
        events.push(NewEvent {
            campaign_id: Some(*campaign_id),
            task_id: None,
            kind: "stage_succeeded",
            message: format!("round {}: stage {stage} succeeded", round_index + 1),
            actor: crate::planner::SYSTEM_ACTOR.into(),
            data: json!({ "round": round_index, "stage": stage }),
        });
    }

    let failed = store::tasks::fail(&mut tx, &failures).await?;
    store::endpoints::retire(&mut tx, &store::tasks::serve_ids(&failed), false).await?;
    let errors: HashMap<(Uuid, i32), &str> = failures.iter().map(|f| ((f.0, f.1), f.3)).collect();
    let closed: Vec<_> = failed
        .iter()
        .map(|f| {
            let state = if f.state == TaskState::Cancelled {
                AttemptState::Cancelled
            } else {
                AttemptState::Failed
            };
            (
                f.id,
                f.attempt,
                state,
                errors.get(&(f.id, f.attempt)).copied(),
            )
        })
        .collect();
    store::attempts::finish_many(&mut tx, &closed).await?;
    for f in &failed {
        let error = errors.get(&(f.id, f.attempt)).copied().unwrap_or_default();
        let (kind, what) = match f.state {
            TaskState::Queued => (
                "task_retrying",
                format!("will retry at {}", f.next_run_at.format("%H:%M:%S%.3f")),
            ),
            TaskState::Blocked => (
                "task_retrying",
                "will retry once its endpoint is ready again".to_string(),
            ),
            TaskState::Cancelled => ("task_cancelled", "cancelled".to_string()),
            _ => ("task_failed", "failed for good".to_string()),
        };
        events.push(NewEvent {
            campaign_id: Some(f.campaign_id),
            task_id: Some(f.id),
            kind,
            message: format!(
                "stage {} shard {} attempt {} {what}: {error}",
                f.stage, f.shard_index, f.attempt
            ),
            actor: crate::planner::SYSTEM_ACTOR.into(),
            data: json!({ "attempt": f.attempt, "error": error, "state": f.state }),
        });
    }
    store::events::insert_many(&mut tx, &events).await?;
    tx.commit().await?;

    ctl.settled(&completed);
    ctl.settled(&failed);
    let mut released: Vec<(Option<Uuid>, Uuid, i32)> = completed
        .iter()
        .map(|c| (c.worker_id, c.id, c.attempt))
        .collect();
    released.extend(failed.iter().map(|f| (f.worker_id, f.id, f.attempt)));
    let mut alive: HashMap<(Uuid, i32), Directive> = alive
        .into_iter()
        .map(|(id, a, cancel, stop)| {
            let d = if cancel {
                Directive::Cancel
            } else if stop {
                Directive::Stop
            } else {
                Directive::Continue
            };
            ((id, a), d)
        })
        .collect();
    let settled_failures: HashMap<(Uuid, i32), bool> = failed
        .iter()
        .map(|f| {
            let retrying = matches!(f.state, TaskState::Queued | TaskState::Blocked);
            ((f.id, f.attempt), retrying)
        })
        .collect();
    for b in elided {
        let key = (b.id, b.attempt);
        if accepted.contains(&key) || settled_failures.contains_key(&key) {
            alive.insert(key, Directive::Continue);
        }
    }
    Ok(Committed {
        alive,
        completed: accepted,
        failed: settled_failures,
        released,
        queue_changed: !unblocked.is_empty() || !failed.is_empty(),
        // The planner acts on finished stages (a round's end, a promotion made ready) and on
        // tasks that will not simply retry; a completion inside a stage changes neither.
        wake_planner: !stages_done.is_empty()
            || failed.iter().any(|f| f.state != TaskState::Queued),
        events: !events.is_empty(),
    })
}

fn answer(ctl: &Controller, reports: Vec<Report>, c: Committed) {
    let mut released = c.released;
    let mut stale = [0u64; 3];
    for r in reports {
        match r {
            Report::Heartbeat {
                worker_id,
                beats,
                reply,
            } => {
                let directives = beats
                    .iter()
                    .map(|b| {
                        let d = match c.alive.get(&(b.id, b.attempt)) {
                            Some(d) => *d,
                            None => {
                                released.push((Some(worker_id), b.id, b.attempt));
                                stale[2] += 1;
                                Directive::Abandon
                            }
                        };
                        (b.id, b.attempt, d)
                    })
                    .collect();
                let _ = reply.send(Ok(directives));
            }
            // A stale end still ends the attempt on the worker: its registry entry goes too.
            Report::Complete {
                worker_id,
                task_id,
                attempt,
                reply,
                ..
            } => {
                let accepted = c.completed.contains(&(task_id, attempt));
                if !accepted {
                    released.push((Some(worker_id), task_id, attempt));
                    stale[0] += 1;
                }
                let _ = reply.send(if accepted {
                    Ok(())
                } else {
                    Err(Rejected::Stale)
                });
            }
            Report::Fail {
                worker_id,
                task_id,
                attempt,
                reply,
                ..
            } => {
                let settled = c.failed.get(&(task_id, attempt)).copied();
                if settled.is_none() {
                    released.push((Some(worker_id), task_id, attempt));
                    stale[1] += 1;
                }
                let _ = reply.send(settled.ok_or(Rejected::Stale));
            }
        }
    }
    for (report, n) in ["complete", "fail", "heartbeat"].into_iter().zip(stale) {
        ctl.metrics.stale_report(report, n);
    }
    let freed = ctl.registry.release(released);
    if c.queue_changed {
        ctl.queue_changed();
    } else if freed {
        ctl.dispatch_wake.notify_one();
    }
    if c.wake_planner {
        ctl.planner_wake.notify_one();
    }
    if c.events {
        ctl.events_changed();
    }
}

/// A report queued for the writer; awaiting it waits for the batch it lands in to commit.
pub(crate) struct Pending<T>(oneshot::Receiver<Result<T, Rejected>>);

impl<T> Pending<T> {
    pub(crate) async fn settled(self) -> Result<Result<T, Rejected>> {
        self.0.await.map_err(|_| Error::ShuttingDown)
    }
}

/// Queues a report without waiting for it: reports queued back to back (a worker's whole
/// `Report`) land in the same transaction or in consecutive ones, in order.
pub(crate) async fn enqueue<T>(
    ctl: &Controller,
    make: impl FnOnce(oneshot::Sender<Result<T, Rejected>>) -> Report,
) -> Result<Pending<T>> {
    let (tx, rx) = oneshot::channel();
    ctl.writer
        .send(make(tx))
        .await
        .map_err(|_| Error::ShuttingDown)?;
    Ok(Pending(rx))
}
