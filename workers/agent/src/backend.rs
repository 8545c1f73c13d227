use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_proto::stage::{Role, StageKind};
use flywheel_proto::v1::{ArtifactRef, Assignment, Endpoint};
use serde_json::Value;

/// An assignment as a backend sees it: its stage kind and parameters parsed.
#[derive(Debug, Clone)]
pub struct Task {
    pub assignment: Assignment,
    pub kind: StageKind,
    pub params: Value,
}

impl Task {
    pub fn new(assignment: Assignment) -> Result<Self, TaskError> {
        let params = if assignment.params_json.is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_str(&assignment.params_json)
                .map_err(|e| TaskError::permanent(format!("params_json is not valid JSON: {e}")))?
        };
        let kind = StageKind::parse(&assignment.kind).ok_or_else(|| {
            TaskError::permanent(format!(
                "stage {}: unknown stage kind {:?} (controller and worker disagree about the contract)",
                assignment.stage, assignment.kind
            ))
        })?;
        Ok(Self {
            assignment,
            kind,
            params,
        })
    }

    /// All inputs with this role (a fan-in stage gets one per upstream shard).
    pub fn inputs(&self, role: Role) -> Vec<&ArtifactRef> {
        self.assignment
            .inputs
            .iter()
            .filter(|i| i.role == role.as_str())
            .collect()
    }

    pub fn input(&self, role: Role) -> Result<&ArtifactRef, TaskError> {
        self.inputs(role).into_iter().next().ok_or_else(|| {
            TaskError::permanent(format!(
                "stage {} ({}) needs an input {role}; check the recipe's needs",
                self.assignment.stage, self.assignment.kind
            ))
        })
    }

    /// A param that names an input role (`init`, `reference`), which the contract restricts to
    /// roles.
    pub fn role_param(&self, param: &str, value: &str) -> Result<Role, TaskError> {
        Role::parse(value).ok_or_else(|| {
            TaskError::permanent(format!(
                "stage {}: params.{param} {value:?} is not an input role",
                self.assignment.stage
            ))
        })
    }

    /// The ready endpoint of the serve stage `name` (a param such as `endpoint: generator`), as
    /// the controller filled it into the assignment. Missing means it went away between
    /// release and claim: retryable, and the task waits for the next one.
    pub fn endpoint(&self, name: &str) -> Result<&Endpoint, TaskError> {
        self.assignment
            .endpoints
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| {
                TaskError::retryable(format!(
                    "stage {}: endpoint {name:?} is not ready (its server stopped or moved); retrying",
                    self.assignment.stage
                ))
            })
    }

    /// The stage's params as the contract declares them for this kind and backend.
    pub fn typed<T: flywheel_proto::stage::Params>(&self) -> Result<T, TaskError> {
        flywheel_proto::stage::parse(&self.params)
            .map_err(|e| TaskError::permanent(format!("stage {}: {e}", self.assignment.stage)))
    }
}

/// An output a backend produced (already written to the artifact store).
#[derive(Debug, Clone)]
pub struct Output {
    pub name: String,
    pub kind: &'static str,
    pub uri: String,
    pub content_hash: String,
    pub metadata: Value,
}

#[derive(Debug, Clone, Default)]
pub struct TaskResult {
    pub outputs: Vec<Output>,
    pub metrics: HashMap<String, f64>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    pub message: String,
    pub retryable: bool,
    /// The task stopped because the controller cancelled or abandoned it.
    pub cancelled: bool,
}

impl TaskError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            cancelled: false,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            cancelled: false,
        }
    }
    pub fn cancelled() -> Self {
        Self {
            message: "cancelled by the controller".into(),
            retryable: false,
            cancelled: true,
        }
    }
}

impl From<crate::artifacts::ArtifactError> for TaskError {
    fn from(e: crate::artifacts::ArtifactError) -> Self {
        match e {
            crate::artifacts::ArtifactError::HashMismatch { .. } => Self::permanent(e.to_string()),
            _ => Self::retryable(e.to_string()),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    pub(crate) fraction: f64,
    pub(crate) message: String,
    pub(crate) metrics: HashMap<String, f64>,
}

/// What a running task shares with the agent: progress and a serve task's endpoint for
/// heartbeats, and the flags that heartbeat replies set.
#[derive(Clone, Default)]
pub struct TaskContext {
    pub(crate) progress: Arc<Mutex<Progress>>,
    pub(crate) stop: Arc<AtomicBool>,
    /// Set by `DIRECTIVE_STOP`: a serve task's consumers are done.
    pub(crate) finish: Arc<AtomicBool>,
    pub(crate) endpoint: Arc<Mutex<Option<Endpoint>>>,
    /// Wakes the reporter for an immediate heartbeat.
    pub(crate) beat_now: Arc<tokio::sync::Notify>,
    /// The cluster job the attempt runs in, and whether the controller has recorded it.
    pub(crate) external_job: Arc<(Mutex<ExternalJob>, std::sync::Condvar)>,
}

#[derive(Debug, Default)]
pub(crate) struct ExternalJob {
    pub(crate) id: Option<String>,
    /// The id a heartbeat that the controller acknowledged carried.
    pub(crate) recorded: Option<String>,
}

impl TaskContext {
    /// Records progress (0..1), a short message and metrics; sent with the next heartbeat.
    pub fn report(&self, fraction: f64, message: impl Into<String>, metrics: &[(&str, f64)]) {
        use flywheel_proto::limits::{MAX_ENTRIES, MAX_NAME_BYTES, MAX_TEXT_BYTES, fit_text};
        let mut p = self.progress.lock().expect("progress");
        p.fraction = fraction.clamp(0.0, 1.0);
        // A trainer's log line can carry anything; the controller refuses NUL and oversize text.
        p.message = fit_text(&message.into(), MAX_TEXT_BYTES);
        for (k, v) in metrics {
            // The controller refuses non-finite metrics; a NaN loss is left out, not faked.
            if v.is_finite() && (p.metrics.len() < MAX_ENTRIES || p.metrics.contains_key(*k)) {
                p.metrics.insert(fit_text(k, MAX_NAME_BYTES), *v);
            }
        }
    }

    /// A serve task's server answers: the endpoint goes to the controller at once (and with
    /// every heartbeat after), which then releases the stages that use it.
    pub fn ready(&self, endpoint: Endpoint) {
        *self.endpoint.lock().expect("endpoint") = Some(endpoint);
        self.beat_now.notify_one();
    }

    /// Sends a heartbeat now (what the task just reported goes to Postgres at once).
    pub fn beat_now(&self) {
        self.beat_now.notify_one();
    }

    /// Records the cluster job the attempt runs in (e.g. `slurm:1234`) on the attempt: it goes
    /// with every heartbeat, and this waits up to `wait` until the controller has it in
    /// Postgres. Returns whether it does.
    pub fn record_external_job(&self, job: String, wait: Duration) -> bool {
        let (lock, recorded) = &*self.external_job;
        let mut j = lock.lock().expect("external job");
        j.id = Some(job.clone());
        self.beat_now.notify_one();
        let (j, _) = recorded
            .wait_timeout_while(j, wait, |j| j.recorded.as_deref() != Some(job.as_str()))
            .expect("external job");
        j.recorded.as_deref() == Some(job.as_str())
    }

    /// The acknowledged heartbeat carried `job`.
    pub(crate) fn external_job_recorded(&self, job: Option<String>) {
        let (lock, recorded) = &*self.external_job;
        lock.lock().expect("external job").recorded = job;
        recorded.notify_all();
    }

    /// True once the controller says the work is done (a serve task's consumers finished):
    /// finish and report success.
    pub fn finish_requested(&self) -> bool {
        self.finish.load(Ordering::Relaxed)
    }

    /// True once the controller has cancelled or abandoned this attempt: stop soon.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// `Err(cancelled)` once the task should stop; call it between units of work.
    pub fn checkpoint(&self) -> Result<(), TaskError> {
        if self.should_stop() {
            Err(TaskError::cancelled())
        } else {
            Ok(())
        }
    }
}

/// A way to run tasks: `test` (deterministic, no ML), `builtin` (the CPU engine), ...
/// `run` is called on a blocking thread; it may take minutes.
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn run(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError>;
}
