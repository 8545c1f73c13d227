use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use flywheel_proto::v1::server::WorkerService;
use flywheel_proto::v1::*;
use serde_json::Value;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::metrics_json;
use crate::Controller;
use crate::auth::Scope;
use crate::dispatch::Capabilities;
use crate::error::{Error, parse_id};
use crate::store;
use crate::store::artifacts::NewOutput;
use crate::store::tasks::Beat;
use crate::writer::{self, Rejected, Report};

pub(crate) struct WorkerApi {
    pub(crate) ctl: Arc<Controller>,
}

fn rejected(e: Rejected, task_id: &str, attempt: i32) -> Status {
    match e {
        Rejected::Stale => Status::failed_precondition(format!(
            "stale attempt: attempt {attempt} of task {task_id} is not the running attempt; the report changed nothing"
        )),
        Rejected::Unavailable(msg) => {
            Status::unavailable(format!("report not recorded, retry: {msg}"))
        }
    }
}

/// The assignment stream of one worker connection; detaches from the registry when dropped
/// (the worker disconnected), so nothing more is sent to it.
struct AssignmentStream {
    inner: ReceiverStream<Result<Assignment, Status>>,
    ctl: Arc<Controller>,
    worker_id: Uuid,
    stream_id: u64,
}

impl Stream for AssignmentStream {
    type Item = Result<Assignment, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for AssignmentStream {
    fn drop(&mut self) {
        if self.ctl.registry.detach(self.worker_id, self.stream_id) {
            tracing::info!(worker_id = %self.worker_id, "worker disconnected");
            let ctl = self.ctl.clone();
            let id = self.worker_id;
            tokio::spawn(async move {
                if let Ok(mut conn) = ctl.pool.acquire().await {
                    let _ = store::workers::set_status(&mut conn, id, "offline").await;
                }
            });
        }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type StreamAssignmentsStream = Pin<Box<dyn Stream<Item = Result<Assignment, Status>> + Send>>;

    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let id = parse_id("worker_id", &r.worker_id)?;
        let caps = r
            .capabilities
            .ok_or_else(|| Error::invalid("capabilities", "is required"))?;
        if caps.pool.trim().is_empty() {
            return Err(Error::invalid("capabilities.pool", "must not be empty").into());
        }
        if caps.backends.is_empty() || caps.backends.iter().any(|b| b.trim().is_empty()) {
            return Err(Error::invalid(
                "capabilities.backends",
                "must list at least one backend name",
            )
            .into());
        }
        let slots = r.slots.clamp(1, 1024) as usize;
        let mut running = Vec::new();
        for t in &r.running {
            running.push(parse_id("running[].task_id", &t.task_id)?);
        }
        let name = if r.name.trim().is_empty() {
            id.to_string()
        } else {
            r.name.clone()
        };
        let labels = serde_json::to_value(&caps.labels).unwrap_or(Value::Null);
        {
            let mut tx = self.ctl.pool.begin().await.map_err(Error::from)?;
            store::pools::ensure(&mut tx, &caps.pool)
                .await
                .map_err(Error::from)?;
            store::workers::upsert(
                &mut tx,
                store::workers::NewWorker {
                    id,
                    name: &name,
                    pool: &caps.pool,
                    backends: &caps.backends,
                    gpu_kind: &caps.gpu_kind,
                    gpu_count: caps.gpu_count as i32,
                    labels,
                    slots: slots as i32,
                },
            )
            .await
            .map_err(Error::from)?;
            tx.commit().await.map_err(Error::from)?;
        }
        let capabilities = Capabilities {
            pool: caps.pool,
            backends: caps.backends,
            gpu_kind: caps.gpu_kind,
            gpu_count: caps.gpu_count as i32,
        };
        self.ctl.registry.register(id, capabilities, slots, running);
        tracing::info!(worker_id = %id, name = %name, "worker registered");
        Ok(Response::new(RegisterResponse {
            heartbeat_interval_ms: self.ctl.config.heartbeat_interval_ms,
            lease_ttl_ms: self.ctl.config.lease_ttl_ms,
        }))
    }

    async fn stream_assignments(
        &self,
        req: Request<StreamAssignmentsRequest>,
    ) -> Result<Response<Self::StreamAssignmentsStream>, Status> {
        self.ctl.auth.require(&req, Scope::Worker).await?;
        let id = parse_id("worker_id", &req.get_ref().worker_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let stream_id = self.ctl.registry.attach(id, tx).ok_or_else(|| {
            Status::not_found(format!(
                "worker {id} is not registered with this controller; call Register first"
            ))
        })?;
        self.ctl.dispatch_wake.notify_one();
        Ok(Response::new(Box::pin(AssignmentStream {
            inner: ReceiverStream::new(rx),
            ctl: self.ctl.clone(),
            worker_id: id,
            stream_id,
        })))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let worker_id = parse_id("worker_id", &r.worker_id)?;
        let mut beats = Vec::with_capacity(r.tasks.len());
        for t in r.tasks {
            beats.push(Beat {
                id: parse_id("tasks[].task_id", &t.task_id)?,
                attempt: t.attempt,
                progress: if t.progress.is_finite() {
                    t.progress.clamp(0.0, 1.0)
                } else {
                    0.0
                },
                message: t.message,
                metrics: metrics_json("tasks[].metrics", &t.metrics)?,
            });
        }
        let result = writer::submit(&self.ctl, |reply| Report::Heartbeat {
            worker_id,
            beats,
            reply,
        })
        .await?;
        let directives = result.map_err(|e| rejected(e, "", 0))?;
        Ok(Response::new(HeartbeatResponse {
            tasks: directives
                .into_iter()
                .map(|(id, attempt, d)| TaskDirective {
                    task_id: id.to_string(),
                    attempt,
                    directive: d as i32,
                })
                .collect(),
        }))
    }

    async fn complete_task(
        &self,
        req: Request<CompleteTaskRequest>,
    ) -> Result<Response<CompleteTaskResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let task_id = parse_id("task_id", &r.task_id)?;
        let mut outputs = Vec::with_capacity(r.outputs.len());
        let mut names = std::collections::HashSet::new();
        for o in r.outputs {
            if o.kind != "dataset" && o.kind != "model" {
                return Err(Error::invalid(
                    "outputs[].kind",
                    format!("{:?} must be \"dataset\" or \"model\"", o.kind),
                )
                .into());
            }
            if o.name.trim().is_empty() || !names.insert(o.name.clone()) {
                return Err(Error::invalid(
                    "outputs[].name",
                    format!("{:?} must be non-empty and unique", o.name),
                )
                .into());
            }
            if o.uri.trim().is_empty() {
                return Err(Error::invalid(
                    "outputs[].uri",
                    format!("output {:?} has no uri", o.name),
                )
                .into());
            }
            let metadata = if o.metadata_json.trim().is_empty() {
                Value::Object(Default::default())
            } else {
                serde_json::from_str(&o.metadata_json).map_err(|e| {
                    Error::invalid(
                        "outputs[].metadata_json",
                        format!("output {:?}: not valid JSON: {e}", o.name),
                    )
                })?
            };
            outputs.push(NewOutput {
                task_id,
                attempt: r.attempt,
                kind: o.kind,
                name: o.name,
                uri: o.uri,
                content_hash: o.content_hash,
                metadata,
            });
        }
        let metrics = metrics_json("metrics", &r.metrics)?;
        let attempt = r.attempt;
        let result = writer::submit(&self.ctl, |reply| Report::Complete {
            task_id,
            attempt,
            outputs,
            metrics,
            reply,
        })
        .await?;
        result.map_err(|e| rejected(e, &r.task_id, attempt))?;
        Ok(Response::new(CompleteTaskResponse {}))
    }

    async fn fail_task(
        &self,
        req: Request<FailTaskRequest>,
    ) -> Result<Response<FailTaskResponse>, Status> {
        self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let task_id = parse_id("task_id", &r.task_id)?;
        let attempt = r.attempt;
        let error = if r.error.trim().is_empty() {
            "worker reported a failure without a message".to_string()
        } else {
            r.error
        };
        let retryable = r.retryable;
        let result = writer::submit(&self.ctl, |reply| Report::Fail {
            task_id,
            attempt,
            error,
            retryable,
            reply,
        })
        .await?;
        let will_retry = result.map_err(|e| rejected(e, &r.task_id, attempt))?;
        Ok(Response::new(FailTaskResponse { will_retry }))
    }
}
