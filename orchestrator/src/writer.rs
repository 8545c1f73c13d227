//! Group commit for worker reports. Heartbeats, completions and failures queue here; one task
//! drains whatever has accumulated and writes it all in a single transaction, then answers
//! every caller. Nothing is acknowledged before its transaction commits, and under load the
//! number of transactions per task falls well below one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use flywheel_proto::v1::Directive;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::Controller;
use crate::error::{Error, Result};
use crate::store::{self, artifacts::NewOutput, events::NewEvent, tasks::Beat};

/// Most reports written in one transaction.
const MAX_BATCH: usize = 2048;

/// Why a report changed nothing.
#[derive(Debug)]
pub(crate) enum Rejected {
    /// The attempt is not the task's current running attempt.
    Stale,
    /// The write failed; the caller may retry.
    Unavailable(String),
}

/// A task attempt: `(task id, attempt)`.
type AttemptKey = (Uuid, i32);
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
        task_id: Uuid,
        attempt: i32,
        outputs: Vec<NewOutput>,
        metrics: Value,
        reply: Reply<()>,
    },
    Fail {
        task_id: Uuid,
        attempt: i32,
        error: String,
        retryable: bool,
        reply: Reply<bool>,
    },
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
        if let Err(e) = write_batch(&ctl, reports).await {
            tracing::warn!(error = %e, "report batch failed");
        }
    }
}

#[derive(Default)]
struct Batch {
    workers: Vec<Uuid>,
    beats: Vec<Beat>,
    heartbeat_replies: Vec<(Uuid, Vec<AttemptKey>, Reply<Directives>)>,
    completions: Vec<(Uuid, i32, Value)>,
    outputs: Vec<NewOutput>,
    completion_replies: Vec<(AttemptKey, Reply<()>)>,
    failures: Vec<(Uuid, i32, String, bool)>,
    failure_replies: Vec<(AttemptKey, Reply<bool>)>,
}

async fn write_batch(ctl: &Controller, reports: Vec<Report>) -> Result<()> {
    let mut b = Batch::default();
    for r in reports {
        match r {
            Report::Heartbeat {
                worker_id,
                beats,
                reply,
            } => {
                b.workers.push(worker_id);
                b.heartbeat_replies.push((
                    worker_id,
                    beats.iter().map(|x| (x.id, x.attempt)).collect(),
                    reply,
                ));
                b.beats.extend(beats);
            }
            Report::Complete {
                task_id,
                attempt,
                outputs,
                metrics,
                reply,
            } => {
                b.completions.push((task_id, attempt, metrics));
                b.outputs.extend(outputs);
                b.completion_replies.push(((task_id, attempt), reply));
            }
            Report::Fail {
                task_id,
                attempt,
                error,
                retryable,
                reply,
            } => {
                b.failures.push((task_id, attempt, error, retryable));
                b.failure_replies.push(((task_id, attempt), reply));
            }
        }
    }
    match commit(ctl, &b).await {
        Ok(result) => {
            answer(ctl, b, result);
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            for (_, _, reply) in b.heartbeat_replies {
                let _ = reply.send(Err(Rejected::Unavailable(msg.clone())));
            }
            for (_, reply) in b.completion_replies {
                let _ = reply.send(Err(Rejected::Unavailable(msg.clone())));
            }
            for (_, reply) in b.failure_replies {
                let _ = reply.send(Err(Rejected::Unavailable(msg.clone())));
            }
            Err(e)
        }
    }
}

struct Committed {
    /// Current attempts that heartbeated, with their cancel flag.
    alive: HashMap<(Uuid, i32), bool>,
    completed: HashSet<(Uuid, i32)>,
    /// Settled failures: (task, attempt) → will retry.
    failed: HashMap<(Uuid, i32), bool>,
    released: Vec<(Option<Uuid>, Uuid)>,
    wake_dispatch: bool,
    wake_planner: bool,
    events: bool,
}

async fn commit(ctl: &Controller, b: &Batch) -> Result<Committed> {
    let mut tx = ctl.pool.begin().await?;
    let ttl = ctl.config.lease_ttl_ms as i64;
    let mut events = Vec::new();

    let alive = store::tasks::heartbeat(&mut tx, &b.beats, ttl).await?;
    store::workers::touch(&mut tx, &b.workers).await?;

    // Completions: the same (task, attempt) reported twice in one batch counts once.
    let mut seen = HashSet::new();
    let completions: Vec<_> = b
        .completions
        .iter()
        .filter(|c| seen.insert((c.0, c.1)))
        .cloned()
        .collect();
    let completed = store::tasks::complete(&mut tx, &completions).await?;
    let accepted: HashSet<(Uuid, i32)> = completed.iter().map(|c| (c.id, c.attempt)).collect();
    let closed: Vec<_> = completed
        .iter()
        .map(|c| (c.id, c.attempt, "succeeded", None))
        .collect();
    store::attempts::finish_many(&mut tx, &closed).await?;
    let outputs: Vec<NewOutput> = b
        .outputs
        .iter()
        .filter(|o| accepted.contains(&(o.task_id, o.attempt)))
        .cloned()
        .collect();
    store::artifacts::insert_outputs(&mut tx, &outputs).await?;
    let completed_ids: Vec<Uuid> = completed.iter().map(|c| c.id).collect();
    let unblocked = store::tasks::unblock_dependents(&mut tx, &completed_ids).await?;
    let pairs: Vec<(Uuid, String)> = completed
        .iter()
        .map(|c| (c.round_id, c.stage.clone()))
        .collect();
    for (campaign_id, _round, round_index, stage) in
        store::tasks::completed_stages(&mut tx, &pairs).await?
    {
        events.push(NewEvent {
            campaign_id: Some(campaign_id),
            task_id: None,
            kind: "stage_succeeded",
            message: format!("round {round_index}: stage {stage} succeeded"),
            actor: crate::planner::SYSTEM_ACTOR.into(),
            data: json!({ "round": round_index, "stage": stage }),
        });
    }

    let failed = store::tasks::fail(&mut tx, &b.failures).await?;
    let errors: HashMap<(Uuid, i32), &str> = b
        .failures
        .iter()
        .map(|f| ((f.0, f.1), f.2.as_str()))
        .collect();
    let closed: Vec<_> = failed
        .iter()
        .map(|f| {
            let state = if f.state == "cancelled" {
                "cancelled"
            } else {
                "failed"
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
        let (kind, what) = match f.state.as_str() {
            "queued" => (
                "task_retrying",
                format!("will retry at {}", f.next_run_at.format("%H:%M:%S%.3f")),
            ),
            "cancelled" => ("task_cancelled", "cancelled".to_string()),
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
    let mut released: Vec<(Option<Uuid>, Uuid)> =
        completed.iter().map(|c| (c.worker_id, c.id)).collect();
    released.extend(failed.iter().map(|f| (f.worker_id, f.id)));
    Ok(Committed {
        alive: alive
            .into_iter()
            .map(|(id, a, cancel)| ((id, a), cancel))
            .collect(),
        completed: accepted,
        failed: failed
            .iter()
            .map(|f| ((f.id, f.attempt), f.state == "queued"))
            .collect(),
        released,
        wake_dispatch: !unblocked.is_empty() || !failed.is_empty() || !completed.is_empty(),
        wake_planner: !completed.is_empty() || failed.iter().any(|f| f.state != "queued"),
        events: !events.is_empty(),
    })
}

fn answer(ctl: &Controller, b: Batch, c: Committed) {
    let mut released = c.released;
    let mut stale = [0u64; 3];
    for (worker_id, worker_tasks, reply) in b.heartbeat_replies {
        let directives = worker_tasks
            .into_iter()
            .map(|(id, attempt)| {
                let d = match c.alive.get(&(id, attempt)) {
                    Some(true) => Directive::Cancel,
                    Some(false) => Directive::Continue,
                    None => {
                        released.push((Some(worker_id), id));
                        stale[2] += 1;
                        Directive::Abandon
                    }
                };
                (id, attempt, d)
            })
            .collect();
        let _ = reply.send(Ok(directives));
    }
    for (key, reply) in b.completion_replies {
        let accepted = c.completed.contains(&key);
        stale[0] += u64::from(!accepted);
        let _ = reply.send(if accepted {
            Ok(())
        } else {
            Err(Rejected::Stale)
        });
    }
    for (key, reply) in b.failure_replies {
        let settled = c.failed.get(&key).copied();
        stale[1] += u64::from(settled.is_none());
        let _ = reply.send(settled.ok_or(Rejected::Stale));
    }
    for (report, n) in ["complete", "fail", "heartbeat"].into_iter().zip(stale) {
        ctl.metrics.stale_report(report, n);
    }
    if ctl.registry.release(released) || c.wake_dispatch {
        ctl.dispatch_wake.notify_one();
    }
    if c.wake_planner {
        ctl.planner_wake.notify_one();
    }
    if c.events {
        ctl.events_changed();
    }
}

/// Sends a report and waits for the batch it lands in to commit.
pub(crate) async fn submit<T>(
    ctl: &Controller,
    make: impl FnOnce(oneshot::Sender<Result<T, Rejected>>) -> Report,
) -> Result<Result<T, Rejected>> {
    let (tx, rx) = oneshot::channel();
    ctl.writer
        .send(make(tx))
        .await
        .map_err(|_| Error::ShuttingDown)?;
    rx.await.map_err(|_| Error::ShuttingDown)
}
