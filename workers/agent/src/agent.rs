use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_proto::v1::{
    Assignment, Capabilities, CompleteTaskRequest, Directive, FailTaskRequest, HeartbeatRequest,
    OutputArtifact, RegisterRequest, RunningTask, TaskProgress,
};
use flywheel_proto::{WorkerClient, connect_channel};
use tokio::sync::watch;
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
}

/// Keyed by (task id, attempt): an abandoned attempt may still be winding down (stopping its
/// server, say) when the task's next attempt arrives on this worker, and each must keep its
/// own entry until its own thread ends.
type RunningMap = Arc<Mutex<HashMap<(String, i32), Running>>>;

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
    // The current client, replaced at every reconnect; reporters wait on it.
    let (client_tx, client_rx) = watch::channel::<Option<WorkerClient>>(None);
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
            &config, &worker_id, &running, &client_tx, &client_rx, &backends, &beat_now,
        );
        tokio::select! {
            r = session => {
                match r {
                    Ok(()) => tracing::warn!("assignment stream ended; reconnecting"),
                    Err(SessionError::Refused(msg)) => return Err(WorkerError::Refused(msg)),
                    Err(SessionError::Transient(msg)) => tracing::warn!(error = %msg, "controller unreachable; reconnecting"),
                }
            }
            _ = &mut shutdown => return Ok(()),
        }
        client_tx.send_replace(None);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut shutdown => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
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
    client_tx: &watch::Sender<Option<WorkerClient>>,
    client_rx: &watch::Receiver<Option<WorkerClient>>,
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
    client_tx.send_replace(Some(client.clone()));

    let heartbeats = tokio::spawn(heartbeat_loop(
        client.clone(),
        worker_id.to_string(),
        running.clone(),
        Duration::from_millis(reg.heartbeat_interval_ms.max(50) as u64),
        beat_now.clone(),
    ));
    let result = loop {
        match stream.message().await {
            Ok(Some(assignment)) => start_task(
                assignment, worker_id, running, client_rx, backends, beat_now,
            ),
            Ok(None) => break Ok(()),
            Err(status) => break Err(SessionError::Transient(status.to_string())),
        }
    };
    // No stream, no heartbeats: the controller must not think a deaf worker is alive.
    heartbeats.abort();
    result
}

async fn heartbeat_loop(
    mut client: WorkerClient,
    worker_id: String,
    running: RunningMap,
    every: Duration,
    beat_now: Arc<tokio::sync::Notify>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = beat_now.notified() => {}
        }
        let tasks: Vec<TaskProgress> = running
            .lock()
            .expect("running")
            .iter()
            .filter(|(_, r)| !r.abandoned.load(Ordering::Relaxed))
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
            .collect();
        let sent_jobs: Vec<(String, i32, String)> = tasks
            .iter()
            .filter(|t| !t.external_job.is_empty())
            .map(|t| (t.task_id.clone(), t.attempt, t.external_job.clone()))
            .collect();
        let reply = match client
            .heartbeat(HeartbeatRequest {
                worker_id: worker_id.clone(),
                tasks,
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                continue;
            }
        };
        let map = running.lock().expect("running");
        // The reply comes after the beat's commit: the jobs it carried are in Postgres.
        for (id, attempt, job) in sent_jobs {
            if let Some(r) = map.get(&(id, attempt)) {
                r.ctx.external_job_recorded(Some(job));
            }
        }
        for d in reply.tasks {
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
                Ok(Directive::Abandon) => {
                    tracing::warn!(task_id = %d.task_id, attempt = d.attempt, "attempt is stale; abandoning it");
                    r.abandoned.store(true, Ordering::Relaxed);
                    r.ctx.stop.store(true, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
}

fn start_task(
    assignment: Assignment,
    worker_id: &str,
    running: &RunningMap,
    client_rx: &watch::Receiver<Option<WorkerClient>>,
    backends: &Arc<HashMap<String, Arc<dyn Backend>>>,
    beat_now: &Arc<tokio::sync::Notify>,
) {
    let ctx = TaskContext {
        beat_now: beat_now.clone(),
        ..TaskContext::default()
    };
    let abandoned = Arc::new(AtomicBool::new(false));
    let task_id = assignment.task_id.clone();
    let attempt = assignment.attempt;
    running.lock().expect("running").insert(
        (task_id.clone(), attempt),
        Running {
            ctx: ctx.clone(),
            abandoned: abandoned.clone(),
        },
    );
    tracing::info!(task_id = %task_id, attempt, stage = %assignment.stage, shard = assignment.shard_index, "task started");
    let backend = backends.get(&assignment.backend).cloned();
    let worker_id = worker_id.to_string();
    let running = running.clone();
    let client_rx = client_rx.clone();
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
        if !abandoned.load(Ordering::Relaxed) {
            report(client_rx, &worker_id, &task_id, attempt, result).await;
        }
        running.lock().expect("running").remove(&(task_id, attempt));
    });
}

/// Reports a result until the controller accepts or rejects it. Transient failures (controller
/// down, database unavailable) are retried, across reconnects.
async fn report(
    mut client_rx: watch::Receiver<Option<WorkerClient>>,
    worker_id: &str,
    task_id: &str,
    attempt: i32,
    result: Result<TaskResult, TaskError>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let client = client_rx.borrow_and_update().clone();
        let Some(mut client) = client else {
            let _ = client_rx.changed().await;
            continue;
        };
        let sent = match &result {
            Ok(r) => {
                client
                    .complete_task(CompleteTaskRequest {
                        worker_id: worker_id.to_string(),
                        task_id: task_id.to_string(),
                        attempt,
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
                    })
                    .await
            }
            Err(e) => client
                .fail_task(FailTaskRequest {
                    worker_id: worker_id.to_string(),
                    task_id: task_id.to_string(),
                    attempt,
                    error: flywheel_proto::limits::fit_text(
                        &e.message,
                        flywheel_proto::limits::MAX_TEXT_BYTES,
                    ),
                    retryable: e.retryable,
                })
                .await
                .map(|_| ()),
        };
        match sent {
            Ok(()) => {
                tracing::info!(task_id, attempt, ok = result.is_ok(), "task reported");
                return;
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                ) =>
            {
                tracing::warn!(task_id, error = %s, "report failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(s) => {
                tracing::warn!(task_id, attempt, error = %s, "report rejected");
                return;
            }
        }
    }
}
