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
use crate::auth::{Principal, Scope};
use crate::dispatch::{Assigned, Capabilities, LeaseMark};
use crate::error::{Error, parse_id};
use crate::limits::{self, MAX_NAME_BYTES, MAX_TEXT_BYTES, MAX_URI_BYTES};
use crate::store;
use crate::store::artifacts::NewOutput;
use crate::store::endpoints::NewEndpoint;
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

/// An output's URI must lie under the attempt's output prefix, with no `.` or `..` segment (so
/// it cannot climb out of it): a worker can only publish what its attempt wrote.
fn check_output_uri(uri: &str, prefix: &str) -> Result<(), Error> {
    limits::text("outputs[].uri", uri, MAX_URI_BYTES)?;
    let rest = uri
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .filter(|r| !r.is_empty());
    let climbs = |r: &str| {
        r.split(['/', '\\'])
            .any(|seg| seg == "." || seg == ".." || seg.to_ascii_lowercase().contains("%2e"))
    };
    match rest {
        Some(r) if !climbs(r) => Ok(()),
        _ => Err(Error::invalid(
            "outputs[].uri",
            format!(
                "{} is not under this attempt's output prefix {prefix}/",
                limits::excerpt(uri)
            ),
        )),
    }
}

/// `sha256:` and 64 lowercase hex digits, as the artifact store computes it.
fn check_content_hash(hash: &str) -> Result<(), Error> {
    let ok = hash.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "outputs[].content_hash",
            format!(
                "{} must be \"sha256:\" and 64 lowercase hex digits (every output is verified by its hash)",
                limits::excerpt(hash)
            ),
        ))
    }
}

/// The field names a list of heartbeats is checked under: `tasks` of a Heartbeat, `heartbeats`
/// of a Report.
struct BeatFields {
    task_id: &'static str,
    message: &'static str,
    external_job: &'static str,
    metrics: &'static str,
    url: &'static str,
    served_name: &'static str,
    content_hash: &'static str,
    model_id: &'static str,
}

/// The field names of a list of heartbeats called `$list`.
macro_rules! beat_fields {
    ($list:literal) => {
        BeatFields {
            task_id: concat!($list, "[].task_id"),
            message: concat!($list, "[].message"),
            external_job: concat!($list, "[].external_job"),
            metrics: concat!($list, "[].metrics"),
            url: concat!($list, "[].endpoint.url"),
            served_name: concat!($list, "[].endpoint.served_name"),
            content_hash: concat!($list, "[].endpoint.content_hash"),
            model_id: concat!($list, "[].endpoint.model_id"),
        }
    };
}

const HEARTBEAT_FIELDS: BeatFields = beat_fields!("tasks");
const REPORT_FIELDS: BeatFields = beat_fields!("heartbeats");

/// A worker's heartbeats, checked (any bad one refuses them all, naming its field).
fn beats(worker_id: Uuid, tasks: Vec<TaskProgress>, f: &BeatFields) -> Result<Vec<Beat>, Status> {
    let mut beats = Vec::with_capacity(tasks.len());
    for t in tasks {
        limits::text(f.message, &t.message, MAX_TEXT_BYTES)?;
        limits::text(f.external_job, &t.external_job, MAX_TEXT_BYTES)?;
        let id = parse_id(f.task_id, &t.task_id)?;
        let endpoint = match t.endpoint {
            None => None,
            Some(e) => {
                limits::text(f.url, &e.url, MAX_TEXT_BYTES)?;
                limits::text(f.served_name, &e.served_name, MAX_TEXT_BYTES)?;
                limits::text(f.content_hash, &e.content_hash, MAX_TEXT_BYTES)?;
                if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
                    return Err(Error::invalid(
                        f.url,
                        format!("must be an http(s) URL, got {}", limits::excerpt(&e.url)),
                    )
                    .into());
                }
                let model_id = if e.model_id.is_empty() {
                    None
                } else {
                    Some(parse_id(f.model_id, &e.model_id)?)
                };
                Some(NewEndpoint {
                    task_id: id,
                    attempt: t.attempt,
                    url: e.url,
                    served_name: e.served_name,
                    model_id,
                    content_hash: e.content_hash,
                })
            }
        };
        beats.push(Beat {
            worker_id,
            id,
            endpoint,
            external_job: (!t.external_job.is_empty()).then_some(t.external_job),
            attempt: t.attempt,
            progress: if t.progress.is_finite() {
                t.progress.clamp(0.0, 1.0)
            } else {
                0.0
            },
            message: t.message,
            metrics: metrics_json(f.metrics, &t.metrics)?,
        });
    }
    Ok(beats)
}

fn task_directives(directives: writer::Directives) -> Vec<TaskDirective> {
    directives
        .into_iter()
        .map(|(id, attempt, d)| TaskDirective {
            task_id: id.to_string(),
            attempt,
            directive: d as i32,
        })
        .collect()
}

/// A failure's error as stored: within the limit (else refused), and never empty.
fn failure_error(error: String) -> Result<String, Error> {
    limits::text("error", &error, MAX_TEXT_BYTES)?;
    Ok(if error.trim().is_empty() {
        "worker reported a failure without a message".to_string()
    } else {
        error
    })
}

/// A refusal of item `i` of a Report's list: a bad field is named with the item's place.
fn item_status(refused: Status, list: &str, i: usize) -> Status {
    if refused.code() == tonic::Code::InvalidArgument {
        Status::invalid_argument(format!("{list}[{i}].{}", refused.message()))
    } else {
        refused
    }
}

/// What became of one item of a Report: refused by its checks, or settled by the writer.
async fn settle_item<T>(
    task_id: String,
    attempt: i32,
    queued: Result<writer::Pending<T>, Status>,
    will_retry: impl FnOnce(T) -> bool,
) -> Result<ReportOutcome, Status> {
    let settled = match queued {
        Ok(p) => p
            .settled()
            .await?
            .map_err(|e| rejected(e, &task_id, attempt)),
        Err(refused) => Err(refused),
    };
    Ok(match settled {
        Ok(v) => ReportOutcome {
            task_id,
            attempt,
            outcome: Outcome::Accepted as i32,
            error: String::new(),
            will_retry: will_retry(v),
        },
        Err(refused) => outcome_of(task_id, attempt, refused),
    })
}

/// What a Report says of a completion or failure that was refused (by its checks or by the
/// writer).
fn outcome_of(task_id: String, attempt: i32, refused: Status) -> ReportOutcome {
    let outcome = match refused.code() {
        tonic::Code::FailedPrecondition => Outcome::Stale,
        tonic::Code::Unavailable => Outcome::Unavailable,
        _ => Outcome::Invalid,
    };
    ReportOutcome {
        task_id,
        attempt,
        outcome: outcome as i32,
        error: refused.message().to_string(),
        will_retry: false,
    }
}

/// A worker's heartbeats on their way: those answered without a write, and those queued for
/// the writer.
struct Beaten {
    /// Every beat's `(task, attempt)`, in the order reported.
    order: Vec<(Uuid, i32)>,
    unwritten: Vec<(Uuid, i32)>,
    written: Option<(writer::Pending<writer::Directives>, LeaseMark)>,
}

impl Beaten {
    /// The directive of every beat, in the order reported, once the written ones committed.
    async fn settled(
        self,
        ctl: &Controller,
        worker_id: Uuid,
    ) -> Result<writer::Directives, Status> {
        let mut told: std::collections::HashMap<(Uuid, i32), Directive> = self
            .unwritten
            .into_iter()
            .map(|key| (key, Directive::Continue))
            .collect();
        if let Some((pending, began)) = self.written {
            let written = pending.settled().await?.map_err(|e| rejected(e, "", 0))?;
            ctl.registry.beats_written(worker_id, &written, began);
            told.extend(written.into_iter().map(|(id, a, d)| ((id, a), d)));
        }
        Ok(self
            .order
            .into_iter()
            .map(|(id, a)| {
                (
                    id,
                    a,
                    told.get(&(id, a)).copied().unwrap_or(Directive::Abandon),
                )
            })
            .collect())
    }
}

impl WorkerApi {
    /// Answers the beats whose leases are fresh (see `Registry::unwritten_beats`) and queues the
    /// rest for the writer.
    async fn queue_beats(&self, worker_id: Uuid, beats: Vec<Beat>) -> Result<Beaten, Status> {
        let order = beats.iter().map(|b| (b.id, b.attempt)).collect();
        let (unwritten, beats) =
            self.ctl
                .registry
                .unwritten_beats(worker_id, beats, self.ctl.lease_write_window());
        let written = if beats.is_empty() {
            None
        } else {
            let began = self.ctl.registry.lease_mark();
            let pending = writer::enqueue(&self.ctl, |reply| Report::Heartbeat {
                worker_id,
                beats,
                reply,
            })
            .await?;
            Some((pending, began))
        };
        Ok(Beaten {
            order,
            unwritten,
            written,
        })
    }

    /// Gives back the slots of attempts the worker reports ended (their reports queued for the
    /// writer): the next claim for them overlaps the writes.
    fn ended(&self, worker_id: Uuid, attempts: &[(Uuid, i32)]) {
        if self.ctl.registry.ended(worker_id, attempts) {
            self.ctl.dispatch_wake.notify_one();
        }
    }

    /// Checks that `worker_id` was registered by the caller's token: another token may neither
    /// report for a worker nor take its assignment stream.
    async fn check_owner(&self, worker_id: Uuid, who: &Principal) -> Result<(), Status> {
        let owner = match self.ctl.registry.owner(worker_id) {
            Some(token) => Some(Some(token)),
            None => {
                let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
                store::workers::owner(&mut conn, worker_id)
                    .await
                    .map_err(Error::from)?
            }
        };
        match owner {
            None => Err(Status::not_found(format!(
                "worker {worker_id} is not registered; call Register first"
            ))),
            Some(Some(token)) if token == who.token_id => Ok(()),
            Some(_) => Err(Status::permission_denied(format!(
                "worker {worker_id} was registered with another token; token {:?} cannot act for it",
                who.name
            ))),
        }
    }

    /// Where `attempt` of `task_id` on `worker_id` writes, or why the report is refused.
    async fn output_prefix(
        &self,
        worker_id: Uuid,
        task_id: Uuid,
        attempt: i32,
    ) -> Result<Arc<str>, Status> {
        let stale = || rejected(Rejected::Stale, &task_id.to_string(), attempt);
        match self.ctl.registry.assigned(worker_id, task_id, attempt) {
            Assigned::Running(Some(prefix)) => return Ok(prefix),
            Assigned::NotThisAttempt => return Err(stale()),
            // Assigned by an earlier controller process, or reported before re-registering.
            Assigned::Running(None) | Assigned::UnknownWorker => {}
        }
        let mut conn = self.ctl.pool.acquire().await.map_err(Error::from)?;
        let t = store::tasks::get(&mut conn, task_id)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound {
                what: "task",
                id: task_id.to_string(),
            })?;
        if t.state != store::tasks::TaskState::Running
            || t.attempt != attempt
            || t.worker_id != Some(worker_id)
        {
            return Err(stale());
        }
        Ok(self
            .ctl
            .output_prefix(
                t.campaign_id,
                t.round_index,
                &t.stage,
                t.shard_index,
                attempt,
            )
            .into())
    }

    /// A completion checked against the attempt it names (running on this worker, outputs
    /// under its prefix): its outputs and metrics, ready for the writer.
    async fn check_completion(
        &self,
        worker_id: Uuid,
        task_id: Uuid,
        attempt: i32,
        outputs: Vec<OutputArtifact>,
        metrics: &std::collections::HashMap<String, f64>,
    ) -> Result<(Vec<NewOutput>, Value), Status> {
        limits::entries("outputs", outputs.len())?;
        let prefix = self.output_prefix(worker_id, task_id, attempt).await?;
        let mut checked = Vec::with_capacity(outputs.len());
        let mut names = std::collections::HashSet::new();
        for o in outputs {
            if o.kind != "dataset" && o.kind != "model" {
                return Err(Error::invalid(
                    "outputs[].kind",
                    format!(
                        "{} must be \"dataset\" or \"model\"",
                        limits::excerpt(&o.kind)
                    ),
                )
                .into());
            }
            limits::name("outputs[].name", &o.name)?;
            if !names.insert(o.name.clone()) {
                return Err(Error::invalid(
                    "outputs[].name",
                    format!("{:?} appears twice; output names are unique", o.name),
                )
                .into());
            }
            check_content_hash(&o.content_hash)?;
            check_output_uri(&o.uri, &prefix)?;
            limits::text("outputs[].metadata_json", &o.metadata_json, MAX_TEXT_BYTES)?;
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
            if !limits::nul_paths(&metadata, "").is_empty() {
                return Err(Error::invalid(
                    "outputs[].metadata_json",
                    format!(
                        "output {:?}: contains a NUL character, which cannot be stored",
                        o.name
                    ),
                )
                .into());
            }
            checked.push(NewOutput {
                task_id,
                attempt,
                kind: o.kind,
                name: o.name,
                uri: o.uri,
                content_hash: o.content_hash,
                metadata,
            });
        }
        let metrics = metrics_json("metrics", metrics)?;
        Ok((checked, metrics))
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
        let who = self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let id = parse_id("worker_id", &r.worker_id)?;
        let caps = r
            .capabilities
            .ok_or_else(|| Error::invalid("capabilities", "is required"))?;
        limits::name("capabilities.pool", &caps.pool)?;
        limits::entries("capabilities.backends", caps.backends.len())?;
        if caps.backends.is_empty() {
            return Err(Error::invalid(
                "capabilities.backends",
                "must list at least one backend name",
            )
            .into());
        }
        for b in &caps.backends {
            limits::name("capabilities.backends", b)?;
        }
        limits::text("capabilities.gpu_kind", &caps.gpu_kind, MAX_NAME_BYTES)?;
        limits::entries("capabilities.labels", caps.labels.len())?;
        for (k, v) in &caps.labels {
            limits::name("capabilities.labels", k)?;
            limits::text("capabilities.labels", v, MAX_NAME_BYTES)?;
        }
        if !r.name.is_empty() {
            limits::name("name", &r.name)?;
        }
        limits::entries("running", r.running.len())?;
        let slots = r.slots.clamp(1, 1024) as usize;
        let mut running = Vec::new();
        for t in &r.running {
            running.push((parse_id("running[].task_id", &t.task_id)?, t.attempt));
        }
        let name = if r.name.trim().is_empty() {
            id.to_string()
        } else {
            r.name.clone()
        };
        let labels = serde_json::to_value(&caps.labels).unwrap_or(Value::Null);
        {
            let mut tx = self.ctl.pool.begin().await.map_err(Error::from)?;
            if !store::pools::ensure(&mut tx, &caps.pool, limits::MAX_POOLS)
                .await
                .map_err(Error::from)?
            {
                return Err(Error::LimitReached(format!(
                    "capabilities.pool: {} is a new pool, and there are already {} pools (the limit)",
                    limits::excerpt(&caps.pool),
                    limits::MAX_POOLS
                ))
                .into());
            }
            let registered = store::workers::upsert(
                &mut tx,
                store::workers::NewWorker {
                    id,
                    token_id: who.token_id,
                    name: &name,
                    pool: &caps.pool,
                    backends: &caps.backends,
                    gpu_kind: &caps.gpu_kind,
                    gpu_count: caps.gpu_count as i32,
                    labels,
                    slots: slots as i32,
                    controller_id: store::instance_id(),
                },
            )
            .await
            .map_err(Error::from)?;
            if !registered {
                return Err(Error::PermissionDenied(format!(
                    "worker_id: {id} is registered with another token; pick a new id"
                ))
                .into());
            }
            tx.commit().await.map_err(Error::from)?;
        }
        let capabilities = Capabilities {
            pool: caps.pool,
            backends: caps.backends,
            gpu_kind: caps.gpu_kind,
            gpu_count: caps.gpu_count as i32,
        };
        if !self
            .ctl
            .registry
            .register(id, who.token_id, capabilities, slots, running)
        {
            return Err(Status::permission_denied(format!(
                "worker_id: {id} is registered with another token; pick a new id"
            )));
        }
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
        let who = self.ctl.auth.require(&req, Scope::Worker).await?;
        let id = parse_id("worker_id", &req.get_ref().worker_id)?;
        match self.ctl.registry.owner(id) {
            Some(token) if token != who.token_id => {
                return Err(Status::permission_denied(format!(
                    "worker {id} was registered with another token; token {:?} cannot take its assignments",
                    who.name
                )));
            }
            _ => {}
        }
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
        let who = self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let worker_id = parse_id("worker_id", &r.worker_id)?;
        limits::entries("tasks", r.tasks.len())?;
        self.check_owner(worker_id, &who).await?;
        // Liveness stays in memory; only what a beat says about tasks goes to Postgres, so an
        // idle worker's heartbeat writes nothing.
        self.ctl.registry.touch(worker_id);
        if r.tasks.is_empty() {
            return Ok(Response::new(HeartbeatResponse { tasks: Vec::new() }));
        }
        let beats = beats(worker_id, r.tasks, &HEARTBEAT_FIELDS)?;
        let beaten = self.queue_beats(worker_id, beats).await?;
        let directives = beaten.settled(&self.ctl, worker_id).await?;
        Ok(Response::new(HeartbeatResponse {
            tasks: task_directives(directives),
        }))
    }

    async fn complete_task(
        &self,
        req: Request<CompleteTaskRequest>,
    ) -> Result<Response<CompleteTaskResponse>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let worker_id = parse_id("worker_id", &r.worker_id)?;
        let task_id = parse_id("task_id", &r.task_id)?;
        self.check_owner(worker_id, &who).await?;
        let (outputs, metrics) = self
            .check_completion(worker_id, task_id, r.attempt, r.outputs, &r.metrics)
            .await?;
        let attempt = r.attempt;
        let pending = writer::enqueue(&self.ctl, |reply| Report::Complete {
            worker_id,
            task_id,
            attempt,
            outputs,
            metrics,
            reply,
        })
        .await?;
        self.ended(worker_id, &[(task_id, attempt)]);
        let result = pending.settled().await?;
        result.map_err(|e| rejected(e, &r.task_id, attempt))?;
        Ok(Response::new(CompleteTaskResponse {}))
    }

    async fn fail_task(
        &self,
        req: Request<FailTaskRequest>,
    ) -> Result<Response<FailTaskResponse>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let worker_id = parse_id("worker_id", &r.worker_id)?;
        let task_id = parse_id("task_id", &r.task_id)?;
        let error = failure_error(r.error)?;
        self.check_owner(worker_id, &who).await?;
        let attempt = r.attempt;
        let retryable = r.retryable;
        let pending = writer::enqueue(&self.ctl, |reply| Report::Fail {
            worker_id,
            task_id,
            attempt,
            error,
            retryable,
            reply,
        })
        .await?;
        self.ended(worker_id, &[(task_id, attempt)]);
        let will_retry = pending
            .settled()
            .await?
            .map_err(|e| rejected(e, &r.task_id, attempt))?;
        Ok(Response::new(FailTaskResponse { will_retry }))
    }

    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let who = self.ctl.auth.require(&req, Scope::Worker).await?;
        let r = req.into_inner();
        let worker_id = parse_id("worker_id", &r.worker_id)?;
        limits::entries("heartbeats", r.heartbeats.len())?;
        limits::entries("completions", r.completions.len())?;
        limits::entries("failures", r.failures.len())?;
        self.check_owner(worker_id, &who).await?;
        self.ctl.registry.touch(worker_id);
        let beats = beats(worker_id, r.heartbeats, &REPORT_FIELDS)?;

        // Everything goes to the writer back to back, heartbeats first, so that it lands in
        // one transaction (or consecutive ones, in this order); each item is fenced there on
        // its own.
        let beaten = self.queue_beats(worker_id, beats).await?;
        let mut completions = Vec::with_capacity(r.completions.len());
        let mut ended = Vec::with_capacity(r.completions.len() + r.failures.len());
        for (i, c) in r.completions.into_iter().enumerate() {
            let attempt = c.attempt;
            let checked = match parse_id("task_id", &c.task_id) {
                Ok(task_id) => self
                    .check_completion(worker_id, task_id, attempt, c.outputs, &c.metrics)
                    .await
                    .map(|(outputs, metrics)| (task_id, outputs, metrics)),
                Err(e) => Err(e.into()),
            };
            let queued = match checked {
                Ok((task_id, outputs, metrics)) => {
                    ended.push((task_id, attempt));
                    Ok(writer::enqueue(&self.ctl, |reply| Report::Complete {
                        worker_id,
                        task_id,
                        attempt,
                        outputs,
                        metrics,
                        reply,
                    })
                    .await?)
                }
                Err(refused) => Err(item_status(refused, "completions", i)),
            };
            completions.push((c.task_id, attempt, queued));
        }
        let mut failures = Vec::with_capacity(r.failures.len());
        for (i, f) in r.failures.into_iter().enumerate() {
            let attempt = f.attempt;
            let checked = parse_id("task_id", &f.task_id)
                .and_then(|task_id| Ok((task_id, failure_error(f.error)?)));
            let queued = match checked {
                Ok((task_id, error)) => {
                    ended.push((task_id, attempt));
                    Ok(writer::enqueue(&self.ctl, |reply| Report::Fail {
                        worker_id,
                        task_id,
                        attempt,
                        error,
                        retryable: f.retryable,
                        reply,
                    })
                    .await?)
                }
                Err(e) => Err(item_status(e.into(), "failures", i)),
            };
            failures.push((f.task_id, attempt, queued));
        }
        self.ended(worker_id, &ended);

        let directives = task_directives(beaten.settled(&self.ctl, worker_id).await?);
        let mut response = ReportResponse {
            directives,
            completions: Vec::with_capacity(completions.len()),
            failures: Vec::with_capacity(failures.len()),
        };
        for (task_id, attempt, queued) in completions {
            let o = settle_item(task_id, attempt, queued, |()| false).await?;
            response.completions.push(o);
        }
        for (task_id, attempt, queued) in failures {
            let o = settle_item(task_id, attempt, queued, |will_retry| will_retry).await?;
            response.failures.push(o);
        }
        Ok(Response::new(response))
    }
}
