use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_proto::limits::{MAX_ENTRIES, MAX_TEXT_BYTES, fit_text};
use flywheel_proto::v1::{
    Assignment, Capabilities, Directive, Outcome, OutputArtifact, RegisterRequest, ReportRequest,
    RunningTask, TaskCompletion, TaskFailure, TaskProgress,
};
use flywheel_proto::{WorkerClient, connect_channel};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Code;
use uuid::Uuid;

use crate::backend::{Backend, Task, TaskContext, TaskError, TaskResult};

/// How a worker process identifies itself and what it can run.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Controller address, `http://host:port`.
    pub controller: String,
    /// A token with the `worker` scope.
    pub token: String,
    pub name: String,
    pub capabilities: Capabilities,
    /// Tasks run at once.
    pub slots: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the controller refused this worker: {0}")]
    Refused(String),
    #[error("no backend is configured")]
    NoBackend,
}

struct Running {
    ctx: TaskContext,
    /// Set when the controller says this attempt is no longer current: report nothing.
    abandoned: Arc<AtomicBool>,
    /// Set once the attempt's result is queued for the reporter: it heartbeats no more.
    finished: Arc<AtomicBool>,
}

/// Keyed by (task id, attempt): an abandoned attempt may still be winding down (stopping its
/// server, say) when the task's next attempt arrives on this worker, and each must keep its
/// own entry until its own thread ends.
type RunningMap = Arc<Mutex<HashMap<(String, i32), Running>>>;

/// The open session's client and how often the controller wants heartbeats: present only
/// while the assignment stream is open (no stream, no heartbeats).
#[derive(Clone)]
struct Connected {
    client: WorkerClient,
    beat_every: Duration,
}

/// A finished attempt's result, queued for the reporter; `settled` fires once the controller
/// has accepted or refused it for good.
struct Finished {
    task_id: String,
    attempt: i32,
    result: Result<TaskResult, TaskError>,
    settled: oneshot::Sender<()>,
}

/// Runs the worker until `shutdown` resolves. Reconnects whenever the stream breaks.
pub async fn run(
    config: WorkerConfig,
    backends: Vec<Arc<dyn Backend>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    if backends.is_empty() {
        return Err(WorkerError::NoBackend);
    }
    let worker_id = Uuid::new_v4().to_string();
    let running: RunningMap = Arc::default();
    let beat_now = Arc::new(tokio::sync::Notify::new());
    // The current session, replaced at every reconnect; the reporter waits on it.
    let (client_tx, client_rx) = watch::channel::<Option<Connected>>(None);
    let (finished_tx, finished_rx) = mpsc::unbounded_channel();
    let reporter = AbortOnDrop(tokio::spawn(reporter(
        worker_id.clone(),
        client_rx.clone(),
        finished_rx,
    )));
    let heartbeater = AbortOnDrop(tokio::spawn(heartbeater(
        worker_id.clone(),
        running.clone(),
        client_rx,
        beat_now.clone(),
    )));
    let backends: Arc<HashMap<String, Arc<dyn Backend>>> = Arc::new(
        backends
            .into_iter()
            .map(|b| (b.name().to_string(), b))
            .collect(),
    );
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = session(
            &config,
            &worker_id,
            &running,
            &client_tx,
            &finished_tx,
            &backends,
            &beat_now,
        );
        tokio::select! {
            r = session => {
                match r {
                    Ok(()) => tracing::warn!("assignment stream ended; reconnecting"),
                    Err(SessionError::Refused(msg)) => return Err(WorkerError::Refused(msg)),
                    Err(SessionError::Transient(msg)) => tracing::warn!(error = %msg, "controller unreachable; reconnecting"),
                }
            }
            _ = &mut shutdown => break,
        }
        client_tx.send_replace(None);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut shutdown => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    drop((reporter, heartbeater));
    Ok(())
}

/// Aborts the task when dropped, so that no path out of [`run`] leaves the reporter or the
/// heartbeater behind.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum SessionError {
    Refused(String),
    Transient(String),
}

fn classify(s: tonic::Status) -> SessionError {
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument => {
            SessionError::Refused(s.message().to_string())
        }
        _ => SessionError::Transient(s.to_string()),
    }
}

/// One connection: register, open the stream, heartbeat while it is open, run what arrives.
async fn session(
    config: &WorkerConfig,
    worker_id: &str,
    running: &RunningMap,
    client_tx: &watch::Sender<Option<Connected>>,
    finished: &mpsc::UnboundedSender<Finished>,
    backends: &Arc<HashMap<String, Arc<dyn Backend>>>,
    beat_now: &Arc<tokio::sync::Notify>,
) -> Result<(), SessionError> {
    let channel = connect_channel(&config.controller)
        .await
        .map_err(|e| SessionError::Transient(e.to_string()))?;
    let mut client = WorkerClient::new(channel, &config.token)
        .map_err(|e| SessionError::Refused(e.to_string()))?;
    let still_running: Vec<RunningTask> = running
        .lock()
        .expect("running")
        .iter()
        .filter(|(_, r)| !r.abandoned.load(Ordering::Relaxed))
        .map(|((id, attempt), _)| RunningTask {
            task_id: id.clone(),
            attempt: *attempt,
        })
        .collect();
    let reg = client
        .register(RegisterRequest {
            worker_id: worker_id.to_string(),
            name: config.name.clone(),
            capabilities: Some(config.capabilities.clone()),
            slots: config.slots.max(1),
            running: still_running,
        })
        .await
        .map_err(classify)?;
    let mut stream = client
        .stream_assignments(worker_id.to_string())
        .await
        .map_err(classify)?;
    tracing::info!(worker_id, controller = %config.controller, "connected");
    client_tx.send_replace(Some(Connected {
        client,
        beat_every: Duration::from_millis(reg.heartbeat_interval_ms.max(50) as u64),
    }));
    let result = loop {
        match stream.message().await {
            Ok(Some(assignment)) => start_task(assignment, running, finished, backends, beat_now),
            Ok(None) => break Ok(()),
            Err(status) => break Err(SessionError::Transient(status.to_string())),
        }
    };
    // No stream, no heartbeats: the controller must not think a deaf worker is alive.
    client_tx.send_replace(None);
    result
}

fn start_task(
    assignment: Assignment,
    running: &RunningMap,
    finished: &mpsc::UnboundedSender<Finished>,
    backends: &Arc<HashMap<String, Arc<dyn Backend>>>,
    beat_now: &Arc<tokio::sync::Notify>,
) {
    let ctx = TaskContext {
        beat_now: beat_now.clone(),
        ..TaskContext::default()
    };
    let abandoned = Arc::new(AtomicBool::new(false));
    let finished_flag = Arc::new(AtomicBool::new(false));
    let task_id = assignment.task_id.clone();
    let attempt = assignment.attempt;
    running.lock().expect("running").insert(
        (task_id.clone(), attempt),
        Running {
            ctx: ctx.clone(),
            abandoned: abandoned.clone(),
            finished: finished_flag.clone(),
        },
    );
    tracing::info!(task_id = %task_id, attempt, stage = %assignment.stage, shard = assignment.shard_index, "task started");
    let backend = backends.get(&assignment.backend).cloned();
    let running = running.clone();
    let finished = finished.clone();
    tokio::spawn(async move {
        let result = match backend {
            None => Err(TaskError::permanent(format!(
                "this worker has no backend {:?}",
                assignment.backend
            ))),
            Some(backend) => {
                let ctx = ctx.clone();
                tokio::task::spawn_blocking(move || {
                    let task = Task::new(assignment)?;
                    backend.run(&task, &ctx)
                })
                .await
                .unwrap_or_else(|e| Err(TaskError::retryable(format!("backend panicked: {e}"))))
            }
        };
        finished_flag.store(true, Ordering::Relaxed);
        if !abandoned.load(Ordering::Relaxed) {
            let (settled, reported) = oneshot::channel();
            let queued = finished.send(Finished {
                task_id: task_id.clone(),
                attempt,
                result,
                settled,
            });
            // The reporter is gone only when the worker is shutting down.
            if queued.is_ok() {
                let _ = reported.await;
            }
        }
        running.lock().expect("running").remove(&(task_id, attempt));
    });
}

/// Reports the worker's results: one `Report` at a time carries every result finished since
/// the last one. Results the controller could not record (unavailable, or no session) are kept
/// and sent again, across reconnects; a result is dropped only once the controller has
/// accepted it or refused it for good (stale, invalid). Heartbeats go separately
/// ([`heartbeater`]), so that a slow write of results never holds them up.
async fn reporter(
    worker_id: String,
    mut session: watch::Receiver<Option<Connected>>,
    mut finished: mpsc::UnboundedReceiver<Finished>,
) {
    let mut pending: Vec<Finished> = Vec::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = session.borrow_and_update().clone();
        let Some(Connected { mut client, .. }) = connected else {
            tokio::select! {
                _ = session.changed() => {}
                f = finished.recv() => match f {
                    Some(f) => pending.push(f),
                    None => return,
                },
            }
            continue;
        };
        if pending.is_empty() {
            tokio::select! {
                f = finished.recv() => match f {
                    Some(f) => pending.push(f),
                    None => return,
                },
                _ = session.changed() => continue,
            }
        }
        while pending.len() < MAX_ENTRIES {
            match finished.try_recv() {
                Ok(f) => pending.push(f),
                Err(_) => break,
            }
        }
        let batch = pending.len().min(MAX_ENTRIES);
        let mut request = ReportRequest {
            worker_id: worker_id.clone(),
            ..Default::default()
        };
        for f in &pending[..batch] {
            match &f.result {
                Ok(r) => request.completions.push(completion(f, r)),
                Err(e) => request.failures.push(TaskFailure {
                    task_id: f.task_id.clone(),
                    attempt: f.attempt,
                    error: fit_text(&e.message, MAX_TEXT_BYTES),
                    retryable: e.retryable,
                }),
            }
        }
        let reply = match client.report(request).await {
            Ok(reply) => reply,
            Err(s) if transient(s.code()) => {
                tracing::warn!(error = %s, results = batch, "report failed; retrying");
                back_off(&mut backoff).await;
                continue;
            }
            Err(s) => {
                for f in pending.drain(..batch) {
                    tracing::warn!(task_id = %f.task_id, attempt = f.attempt, error = %s, "report rejected");
                    let _ = f.settled.send(());
                }
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let outcomes: HashMap<(&str, i32), (Outcome, &str)> = reply
            .completions
            .iter()
            .chain(&reply.failures)
            .map(|o| {
                let outcome = Outcome::try_from(o.outcome).unwrap_or(Outcome::Unspecified);
                ((o.task_id.as_str(), o.attempt), (outcome, o.error.as_str()))
            })
            .collect();
        let mut kept = Vec::new();
        for f in pending.drain(..batch) {
            match outcomes.get(&(f.task_id.as_str(), f.attempt)) {
                Some((Outcome::Accepted, _)) => {
                    tracing::info!(task_id = %f.task_id, attempt = f.attempt, ok = f.result.is_ok(), "task reported");
                    let _ = f.settled.send(());
                }
                Some((Outcome::Stale | Outcome::Invalid, error)) => {
                    tracing::warn!(task_id = %f.task_id, attempt = f.attempt, error, "report rejected");
                    let _ = f.settled.send(());
                }
                other => {
                    let error = other.map_or("no outcome in the reply", |(_, e)| e);
                    tracing::warn!(task_id = %f.task_id, error, "result not recorded; retrying");
                    kept.push(f);
                }
            }
        }
        if !kept.is_empty() {
            back_off(&mut backoff).await;
        }
        kept.append(&mut pending);
        pending = kept;
    }
}

/// Heartbeats for the whole worker while a session is open: one `Report` carrying the running
/// attempts' progress every `beat_every`, or at once when a task asks. It is sent even when
/// nothing runs, as the worker's liveness.
async fn heartbeater(
    worker_id: String,
    running: RunningMap,
    mut session: watch::Receiver<Option<Connected>>,
    beat_now: Arc<tokio::sync::Notify>,
) {
    let mut next_beat = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = session.borrow_and_update().clone();
        let Some(Connected {
            mut client,
            beat_every,
        }) = connected
        else {
            if session.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            _ = beat_now.notified() => {}
            _ = tokio::time::sleep_until(next_beat) => {}
            _ = session.changed() => continue,
        }
        next_beat = tokio::time::Instant::now() + beat_every;
        let heartbeats = heartbeats(&running);
        let sent_jobs: Vec<(String, i32, String)> = heartbeats
            .iter()
            .filter(|t| !t.external_job.is_empty())
            .map(|t| (t.task_id.clone(), t.attempt, t.external_job.clone()))
            .collect();
        let request = ReportRequest {
            worker_id: worker_id.clone(),
            heartbeats,
            ..Default::default()
        };
        match client.report(request).await {
            Ok(reply) => {
                backoff = Duration::from_millis(50);
                apply_directives(&running, sent_jobs, &reply.directives);
            }
            Err(s) if transient(s.code()) => {
                tracing::warn!(error = %s, "heartbeat failed; retrying");
                back_off(&mut backoff).await;
                next_beat = tokio::time::Instant::now();
            }
            Err(s) => tracing::warn!(error = %s, "heartbeat refused"),
        }
    }
}

/// Waits `backoff`, then doubles it (up to 2 s) for the next failure.
async fn back_off(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

fn completion(f: &Finished, r: &TaskResult) -> TaskCompletion {
    TaskCompletion {
        task_id: f.task_id.clone(),
        attempt: f.attempt,
        outputs: r
            .outputs
            .iter()
            .map(|o| OutputArtifact {
                name: o.name.clone(),
                kind: o.kind.to_string(),
                uri: o.uri.clone(),
                content_hash: o.content_hash.clone(),
                metadata_json: o.metadata.to_string(),
            })
            .collect(),
        metrics: r.metrics.clone(),
    }
}

/// Progress of the running attempts, but for abandoned ones and those whose result is queued.
fn heartbeats(running: &RunningMap) -> Vec<TaskProgress> {
    running
        .lock()
        .expect("running")
        .iter()
        .filter(|(_, r)| {
            !r.abandoned.load(Ordering::Relaxed) && !r.finished.load(Ordering::Relaxed)
        })
        .map(|((id, attempt), r)| {
            let p = r.ctx.progress.lock().expect("progress").clone();
            TaskProgress {
                task_id: id.clone(),
                attempt: *attempt,
                progress: p.fraction,
                message: p.message,
                metrics: p.metrics,
                endpoint: r.ctx.endpoint.lock().expect("endpoint").clone(),
                external_job: r
                    .ctx
                    .external_job
                    .0
                    .lock()
                    .expect("external job")
                    .id
                    .clone()
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// Acts on what the controller said of the heartbeats (committed: the cluster jobs they
/// carried are in Postgres).
fn apply_directives(
    running: &RunningMap,
    sent_jobs: Vec<(String, i32, String)>,
    directives: &[flywheel_proto::v1::TaskDirective],
) {
    let map = running.lock().expect("running");
    for (id, attempt, job) in sent_jobs {
        if let Some(r) = map.get(&(id, attempt)) {
            r.ctx.external_job_recorded(Some(job));
        }
    }
    for d in directives {
        let Some(r) = map.get(&(d.task_id.clone(), d.attempt)) else {
            continue;
        };
        match Directive::try_from(d.directive) {
            Ok(Directive::Cancel) => {
                tracing::info!(task_id = %d.task_id, "cancelled by the controller");
                r.ctx.stop.store(true, Ordering::Relaxed);
            }
            Ok(Directive::Stop) if !r.ctx.finish.swap(true, Ordering::Relaxed) => {
                tracing::info!(task_id = %d.task_id, "consumers finished; stopping");
            }
            // A beat taken before the attempt finished may be answered after its result was
            // written: the attempt is over, not stale.
            Ok(Directive::Abandon) if !r.finished.load(Ordering::Relaxed) => {
                tracing::warn!(task_id = %d.task_id, attempt = d.attempt, "attempt is stale; abandoning it");
                r.abandoned.store(true, Ordering::Relaxed);
                r.ctx.stop.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}
