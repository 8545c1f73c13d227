//! `serve` stages: an OpenAI-compatible inference server for a model of the round.
//!
//! Launched (`template` or `command`): the server runs in its own process group on a free port
//! (another one if the port was taken meanwhile), dies with the worker (`setpriv --pdeathsig`),
//! and is ready once `GET /v1/models` lists its served name; the endpoint (URL, served name,
//! the model and the content hash the server reports, else the hash of the directory it was
//! started on) then goes to the controller, which releases the consumers. It is stopped
//! (SIGTERM to the group, SIGKILL after `grace_period_s`) when the controller says the
//! consumers are done, or on cancellation; a server that exits on its own fails the task
//! (retryable: it is started again, elsewhere if need be) with the end of its log.
//!
//! Attached (`url` + `swap`): a long-lived server is given the round's weights
//! (`sglang`: `POST /update_weights_from_disk`; `vllm_lora`: `POST /v1/load_lora_adapter`),
//! and must then report them; a refusal fails the task with the server's message, so the old
//! weights are never used silently.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use flywheel_proto::stage::{ExternalServe, Role};
use flywheel_proto::v1::Endpoint;

use super::slurm;
use super::templates::render;
use crate::artifacts;
use crate::backend::{Task, TaskContext, TaskError, TaskResult};
use crate::http_client::{HttpCaller, HttpSettings};

/// The servers' command templates.
pub const SERVE_TEMPLATES: [(&str, &[&str]); 4] = [
    (
        "vllm",
        &[
            "vllm",
            "serve",
            "{model_path}",
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--served-model-name",
            "{served_name}",
            "--tensor-parallel-size",
            "{tensor_parallel}",
        ],
    ),
    (
        "sglang",
        &[
            "python",
            "-m",
            "sglang.launch_server",
            "--model-path",
            "{model_path}",
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--served-model-name",
            "{served_name}",
            "--tp",
            "{tensor_parallel}",
        ],
    ),
    (
        "trtllm",
        &[
            "trtllm-serve",
            "{model_path}",
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--tp_size",
            "{tensor_parallel}",
        ],
    ),
    (
        "flywheel",
        &[
            "{flywheel}",
            "serve-model",
            "--model",
            "{model_path}",
            "--name",
            "{served_name}",
            "--addr",
            "{host}:{port}",
        ],
    ),
];

/// Log lines kept for error messages.
const TAIL_LINES: usize = 40;
/// Ports tried when the chosen one turns out to be taken.
const PORT_TRIES: usize = 5;

pub(super) fn serve(task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
    let stage = task.assignment.stage.clone();
    let p: ExternalServe = task.typed()?;
    let role = match p.model.as_str() {
        "candidate" => Role::Model,
        other => task.role_param("model", other)?,
    };
    let model = task.input(role)?.clone();
    let dir = artifacts::verified_dir(&model.uri, &model.content_hash)?;
    // A model registered without a hash (a spec's starting model) is hashed here: the hash of
    // the directory this server is given is what it must report.
    let expected = if model.content_hash.is_empty() {
        artifacts::hash_dir(&dir)?
    } else {
        model.content_hash.clone()
    };
    // trtllm-serve has no served-name flag: it answers as the model path it was given.
    let served_name = match (&p.served_name, p.template.as_deref()) {
        (Some(name), _) => name.clone(),
        (None, Some("trtllm")) => dir.display().to_string(),
        (None, _) => format!("flywheel-{}", model.id),
    };
    let began = Instant::now();
    let (mut server, url, reported) = match &p.url {
        Some(url) => {
            let reported = swap(task, &p, url, &dir, &served_name)?;
            (None, url.trim_end_matches('/').to_string(), reported)
        }
        None => {
            let (server, url, reported) = launch(task, &p, &dir, &served_name, ctx)?;
            (Some(server), url, reported)
        }
    };
    let grace = super::grace(p.grace_period_s);
    // The weights the server says it answers with must be the ones asked for.
    if let Some(h) = &reported
        && *h != expected
    {
        if let Some(s) = server.as_mut() {
            s.stop(grace);
        }
        return Err(TaskError::permanent(format!(
            "stage {stage}: the server at {url} reports weights {h}, not {expected} ({}): refusing to serve them as this round's {}",
            model.id, p.model
        )));
    }
    let ready_s = began.elapsed().as_secs_f64();
    ctx.ready(Endpoint {
        name: stage.clone(),
        url: url.clone(),
        served_name: served_name.clone(),
        model_id: model.id.clone(),
        content_hash: reported.clone().unwrap_or(expected),
    });
    let verified = if reported.is_some() { 1.0 } else { 0.0 };
    tracing::info!(stage, url, served_name, ready_s, "endpoint ready");
    let mut metrics = vec![("ready_s", ready_s), ("weights_reported", verified)];
    metrics.extend(server.iter().flat_map(Running::job_metrics));
    loop {
        ctx.report(0.5, format!("serving {served_name} at {url}"), &metrics);
        if ctx.finish_requested() || ctx.should_stop() {
            if let Some(s) = server.as_mut() {
                s.stop(grace);
            }
            if ctx.should_stop() {
                return Err(TaskError::cancelled());
            }
            break;
        }
        if let Some(s) = server.as_mut()
            && let Some(end) = s.ended()
        {
            return Err(TaskError::retryable(format!(
                "stage {stage}: server {end} while serving; last lines of its log:\n{}",
                s.tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut metrics: std::collections::HashMap<String, f64> = metrics
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    metrics.insert("served_s".into(), began.elapsed().as_secs_f64() - ready_s);
    Ok(TaskResult {
        outputs: Vec::new(),
        metrics,
    })
}

/// Starts the server (as a child process or a Slurm job) and waits until it is ready; returns
/// it, its API root and the content hash it reports (if it reports one).
fn launch(
    task: &Task,
    p: &ExternalServe,
    dir: &Path,
    served_name: &str,
    ctx: &TaskContext,
) -> Result<(Running, String, Option<String>), TaskError> {
    let stage = &task.assignment.stage;
    let command =
        server_command(p).map_err(|e| TaskError::permanent(format!("stage {stage}: {e}")))?;
    let host = p.bind_host();
    let slurm = p.executor == "slurm";
    let env = super::process_env(&p.env);
    let timeout = Duration::from_secs(p.startup_timeout_s.max(1) as u64);
    let grace = super::grace(p.grace_period_s);
    let argv_for = |port: u16| {
        let mut values = BTreeMap::new();
        values.insert("model_path".to_string(), dir.display().to_string());
        values.insert("host".to_string(), host.to_string());
        values.insert("port".to_string(), port.to_string());
        values.insert("served_name".to_string(), served_name.to_string());
        values.insert("tensor_parallel".to_string(), p.tensor_parallel.to_string());
        values.insert("flywheel".to_string(), flywheel_exe());
        render(&command, &values)
            .map_err(|e| TaskError::permanent(format!("stage {stage}: command: {e}")))
    };
    let mut last_taken = String::new();
    for _ in 0..PORT_TRIES {
        // A job's node is not this machine: any port is a guess there, retried if taken.
        let mut port = free_port(if slurm { "127.0.0.1" } else { host })?;
        let (mut server, node) = if slurm {
            let work =
                std::env::temp_dir().join(format!("flywheel-serve-{}", task.assignment.task_id));
            let argv = argv_for(port)?;
            let job = slurm::JobSpec {
                name: format!("flywheel-{}", task.assignment.task_id),
                argv: &argv,
                env: &env,
                work: &work,
                comment: port.to_string(),
                mounts: &[dir],
            };
            let (server, node, job_port) = SlurmServer::start(&job, &p.into(), grace, ctx)?;
            // A job re-attached to listens where the attempt that submitted it said.
            port = job_port.unwrap_or(port);
            (Running::Slurm(Box::new(server)), Some(node))
        } else {
            (Running::Local(Server::spawn(&argv_for(port)?, &env)?), None)
        };
        let advertised = match (&p.advertise_host, host, node) {
            (Some(h), _, _) => h.clone(),
            (None, "0.0.0.0" | "::", Some(node)) => node,
            (None, "0.0.0.0" | "::", None) => nix_hostname(),
            (None, h, _) => h.to_string(),
        };
        let url = format!("http://{advertised}:{port}/v1");
        match wait_ready(&mut server, &url, served_name, timeout, ctx) {
            Ok(reported) => return Ok((server, url, reported)),
            Err(Startup::PortTaken) => {
                last_taken = server.tail();
                tracing::warn!(stage, port, "port was taken; trying another");
            }
            Err(Startup::Failed(e)) => {
                server.stop(grace);
                return Err(e);
            }
        }
    }
    Err(TaskError::retryable(format!(
        "stage {stage}: every port tried was taken; last log:\n{last_taken}"
    )))
}

/// The server's argument list, placeholders unfilled: the template's (with `extra_args`) or the
/// given command.
pub fn server_command(p: &ExternalServe) -> Result<Vec<String>, String> {
    match (&p.command, &p.template) {
        (Some(args), _) => Ok(args.iter().map(|a| a.0.clone()).collect()),
        (None, Some(name)) => {
            let (_, args) = SERVE_TEMPLATES
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| {
                    format!("params.template {name:?} is not one of vllm, sglang, trtllm, flywheel")
                })?;
            let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            args.extend(p.extra_args.iter().flatten().map(|a| a.0.clone()));
            Ok(args)
        }
        (None, None) => {
            Err("params.template or params.command is required to start a server".into())
        }
    }
}

enum Startup {
    PortTaken,
    Failed(TaskError),
}

/// Polls `GET {url}/models` until it lists `served_name`, the server exits, the startup timeout
/// passes, or the task is stopped.
fn wait_ready(
    server: &mut Running,
    url: &str,
    served_name: &str,
    timeout: Duration,
    ctx: &TaskContext,
) -> Result<Option<String>, Startup> {
    let deadline = Instant::now() + timeout;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Startup::Failed(TaskError::permanent(format!("http client: {e}"))))?;
    loop {
        if ctx.should_stop() {
            return Err(Startup::Failed(TaskError::cancelled()));
        }
        if let Some(end) = server.ended() {
            let tail = server.tail();
            let lower = tail.to_lowercase();
            if lower.contains("address already in use") || lower.contains("eaddrinuse") {
                return Err(Startup::PortTaken);
            }
            return Err(Startup::Failed(TaskError::retryable(format!(
                "server {:?} {end} before it was ready; last lines of its log:\n{tail}",
                server.program()
            ))));
        }
        if let Ok(models) = get_json(&client, &format!("{url}/models"))
            && let Some(m) = listed(&models, served_name)
        {
            return Ok(m["content_hash"].as_str().map(String::from));
        }
        if Instant::now() > deadline {
            let tail = server.tail();
            return Err(Startup::Failed(TaskError::retryable(format!(
                "server {:?} was not ready (GET {url}/models listing {served_name:?}) within {}s; last lines of its log:\n{tail}",
                server.program(),
                timeout.as_secs(),
            ))));
        }
        ctx.report(0.0, format!("waiting for {url} to list {served_name}"), &[]);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The entry of `/v1/models` for `name`.
fn listed<'a>(models: &'a Value, name: &str) -> Option<&'a Value> {
    models["data"]
        .as_array()?
        .iter()
        .find(|m| m["id"].as_str() == Some(name))
}

fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let client = client.clone();
    let url = url.to_string();
    crate::io::block_on(async move {
        let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        resp.json::<Value>().await.map_err(|e| e.to_string())
    })
}

/// Gives a long-lived server the round's weights; returns the content hash it then reports.
fn swap(
    task: &Task,
    p: &ExternalServe,
    url: &str,
    dir: &Path,
    served_name: &str,
) -> Result<Option<String>, TaskError> {
    let stage = &task.assignment.stage;
    let api = url.trim_end_matches('/');
    let root = api.trim_end_matches("/v1");
    let caller = HttpCaller::new(
        task,
        HttpSettings {
            api_key_env: &p.api_key_env,
            timeout_s: p.startup_timeout_s,
            max_retries: 2,
            retry_backoff_ms: 500,
            concurrency: 1,
        },
    )?;
    let path = dir.display().to_string();
    let (endpoint, body) = match p.swap.as_deref() {
        Some("sglang") => (
            format!("{root}/update_weights_from_disk"),
            json!({ "model_path": path }),
        ),
        Some("vllm_lora") => (
            format!("{api}/load_lora_adapter"),
            json!({ "lora_name": served_name, "lora_path": path }),
        ),
        other => {
            return Err(TaskError::permanent(format!(
                "stage {stage}: params.swap {other:?} is not sglang or vllm_lora"
            )));
        }
    };
    let answer = crate::io::block_on({
        let caller = caller.clone();
        let endpoint = endpoint.clone();
        async move { caller.post_json(&endpoint, &body).await }
    })
    .map_err(|e| {
        TaskError::permanent(format!(
            "stage {stage}: the server refused the new weights ({endpoint}): {}; the old weights are not used",
            e.message
        ))
    })?;
    if answer.get("success") == Some(&Value::Bool(false)) {
        return Err(TaskError::permanent(format!(
            "stage {stage}: the server refused the new weights ({endpoint}): {}; the old weights are not used",
            answer["message"].as_str().unwrap_or("no message")
        )));
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| TaskError::permanent(format!("http client: {e}")))?;
    let models = get_json(&client, &format!("{api}/models"))
        .map_err(|e| TaskError::retryable(format!("stage {stage}: GET {api}/models: {e}")))?;
    let entry = listed(&models, served_name).ok_or_else(|| {
        TaskError::permanent(format!(
            "stage {stage}: after the swap, {api}/models does not list {served_name:?}: {models}"
        ))
    })?;
    Ok(entry["content_hash"].as_str().map(String::from))
}

fn flywheel_exe() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "flywheel".into())
}

fn nix_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A free TCP port on `host` (the server binds it a moment later; a race is retried).
fn free_port(host: &str) -> Result<u16, TaskError> {
    let l = std::net::TcpListener::bind((host, 0))
        .map_err(|e| TaskError::permanent(format!("cannot bind {host}: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| TaskError::retryable(e.to_string()))
}

/// A started server: a child process of this worker, or a Slurm job.
enum Running {
    Local(Server),
    Slurm(Box<SlurmServer>),
}

impl Running {
    fn program(&self) -> &str {
        match self {
            Running::Local(s) => &s.program,
            Running::Slurm(s) => &s.program,
        }
    }

    /// How the server ended, if it has.
    fn ended(&mut self) -> Option<String> {
        match self {
            Running::Local(s) => s.exited().map(|status| format!("exited with {status}")),
            Running::Slurm(s) => {
                s.poll(false);
                s.state.ended().then(|| s.state.end(&s.id))
            }
        }
    }

    fn tail(&mut self) -> String {
        match self {
            Running::Local(s) => s.tail(),
            Running::Slurm(s) => {
                s.poll(true);
                s.lines.iter().cloned().collect::<Vec<_>>().join("\n")
            }
        }
    }

    fn stop(&mut self, grace: Duration) {
        match self {
            Running::Local(s) => s.stop(grace),
            Running::Slurm(s) => s.stop(grace),
        }
    }

    /// The Slurm job's id and wait in the queue, as metrics of the attempt.
    fn job_metrics(&self) -> Vec<(&'static str, f64)> {
        match self {
            Running::Local(_) => Vec::new(),
            Running::Slurm(s) => std::iter::once(("slurm_job_id", slurm::numeric_id(&s.id)))
                .chain(s.waited_s.map(|w| ("slurm_wait_s", w)))
                .collect(),
        }
    }
}

/// A server in a one-node Slurm job. It is not cancelled when the worker dies: the next
/// attempt of the task re-attaches to it by name.
struct SlurmServer {
    program: String,
    id: String,
    name: String,
    work: std::path::PathBuf,
    state: slurm::JobState,
    polled: Option<Instant>,
    log: Option<std::path::PathBuf>,
    offset: u64,
    lines: VecDeque<String>,
    /// Seconds from submission until the job ran (none for a job re-attached to).
    waited_s: Option<f64>,
}

impl SlurmServer {
    /// Submits the job (or re-attaches to it) and waits until it runs or ends; returns it, the
    /// node it runs on and the port in its comment.
    fn start(
        job: &slurm::JobSpec<'_>,
        resources: &slurm::Resources<'_>,
        grace: Duration,
        ctx: &TaskContext,
    ) -> Result<(Self, String, Option<u16>), TaskError> {
        let (id, submitted) = slurm::submit_or_attach(job, resources, ctx)?;
        let mut server = Self {
            program: job.argv[0].clone(),
            id,
            name: job.name.clone(),
            work: job.work.to_path_buf(),
            state: slurm::JobState::default(),
            polled: None,
            log: None,
            offset: 0,
            lines: VecDeque::new(),
            waited_s: None,
        };
        loop {
            server.poll(true);
            if ctx.should_stop() {
                server.stop(grace);
                return Err(TaskError::cancelled());
            }
            let st = &server.state;
            if st.state == "RUNNING" || st.ended() {
                server.waited_s = slurm::wait_metric(submitted, st);
                let node = st.batch_host.clone().unwrap_or_else(nix_hostname);
                let port = st.comment.as_deref().and_then(|c| c.parse().ok());
                return Ok((server, node, port));
            }
            ctx.report(
                0.0,
                format!(
                    "slurm job {} waiting on the cluster ({})",
                    server.id, st.reason
                ),
                &[("slurm_job_id", slurm::numeric_id(&server.id))],
            );
            std::thread::sleep(slurm::POLL);
        }
    }

    /// Reads the job's state and new log lines (at most every POLL unless `now`).
    fn poll(&mut self, now: bool) {
        if !now && self.polled.is_some_and(|t| t.elapsed() < slurm::POLL) {
            return;
        }
        self.polled = Some(Instant::now());
        match slurm::job_state(&self.id) {
            Ok(state) => self.state = state,
            // A busy slurmctld: the state is read again at the next poll.
            Err(e) => tracing::warn!(job = %self.id, "cannot read the job's state: {}", e.message),
        }
        if self.log.is_none() {
            self.log = self.state.stdout.clone();
        }
        if let Some(path) = &self.log {
            let lines = &mut self.lines;
            self.offset = slurm::read_new_lines(path, self.offset, |line| {
                if lines.len() == TAIL_LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            });
        }
    }

    fn stop(&mut self, grace: Duration) {
        if !self.state.ended() {
            slurm::cancel(&self.id, &self.name, grace);
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// A server process: its own process group, its log kept in a ring buffer.
struct Server {
    program: String,
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
    status: Option<ExitStatus>,
}

impl Server {
    fn spawn(argv: &[String], env: &[(String, String)]) -> Result<Self, TaskError> {
        // Dies with this worker, even on SIGKILL (the kernel sends it the signal).
        let cmd = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).args(argv);
            c
        } else {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        };
        let mut child = super::process::spawn_in_group(cmd, env, "server", &argv[0])?;
        let log: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let ring = log.clone();
        super::process::pipe_lines(&mut child, move |line| {
            let mut l = ring.lock().expect("log");
            if l.len() == TAIL_LINES {
                l.pop_front();
            }
            l.push_back(line);
            true
        });
        Ok(Self {
            program: argv[0].clone(),
            child,
            log,
            status: None,
        })
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn tail(&self) -> String {
        // Let the log readers catch up with a process that just exited.
        std::thread::sleep(Duration::from_millis(50));
        let l = self.log.lock().expect("log");
        l.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn stop(&mut self, grace: Duration) {
        if self.status.is_none() {
            super::process::stop(&mut self.child, grace);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Never leave a server behind, whatever path returned.
        if self.exited().is_none() {
            super::process::stop(&mut self.child, Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_proto::v1::{ArtifactRef, Assignment};
    use std::sync::atomic::Ordering;

    const RECORDER: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/recording_server.py"
    );

    fn model(dir: &Path, role: &str) -> ArtifactRef {
        let path = dir.join(role);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("weights"), role).unwrap();
        ArtifactRef {
            id: format!("{role}-id"),
            role: role.into(),
            kind: "model".into(),
            uri: format!("file://{}", path.display()),
            content_hash: artifacts::hash_dir(&path).unwrap(),
            name: role.into(),
        }
    }

    /// What a serve stage did with `params`: the server's argv and FW_* environment, the POSTs
    /// a long-lived server got, and the endpoint reported (port left out: it is free-picked).
    fn served(dir: &Path, params: &Value) -> Result<Value, String> {
        let record = dir.join(format!("record-{}", uuid::Uuid::new_v4().simple()));
        let text = params
            .to_string()
            .replace("RECORD", &record.display().to_string());
        let task = Task::new(Assignment {
            task_id: "t".into(),
            attempt: 1,
            stage: "generator".into(),
            kind: "serve".into(),
            shard_count: 1,
            params_json: text,
            inputs: vec![
                model(dir, "generator"),
                model(dir, "base"),
                model(dir, "model"),
            ],
            backend: "external".into(),
            ..Default::default()
        })
        .unwrap();
        let ctx = TaskContext::default();
        let running = {
            let (task, ctx) = (task.clone(), ctx.clone());
            std::thread::spawn(move || serve(&task, &ctx))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            if let Some(e) = ctx.endpoint.lock().unwrap().clone() {
                break e;
            }
            if running.is_finished() {
                return Err(running.join().unwrap().unwrap_err().message);
            }
            assert!(Instant::now() < deadline, "no endpoint");
            std::thread::sleep(Duration::from_millis(20));
        };
        ctx.finish.store(true, Ordering::Relaxed);
        running.join().unwrap().map_err(|e| e.message)?;
        let started: Value = std::fs::read_to_string(&record)
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap_or(Value::Null);
        // What a long-lived server (recording to `long`) was asked, taken for this run.
        let long_posts = dir.join("long.posts");
        let posts: Vec<Value> = std::fs::read_to_string(&long_posts)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let _ = std::fs::remove_file(&long_posts);
        let port = endpoint
            .url
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches("/v1")
            .to_string();
        let strip = |v: String| {
            v.replace(&record.display().to_string(), "RECORD")
                .replace(&port, "PORT")
        };
        Ok(json!({
            "argv": strip(started["argv"].to_string()), "env": started["env"],
            "posts": strip(serde_json::to_string(&posts).unwrap()),
            "url": strip(endpoint.url.clone()), "served_name": endpoint.served_name,
            "model_id": endpoint.model_id, "content_hash": endpoint.content_hash,
        }))
    }

    #[test]
    fn every_serve_param_changes_the_server_or_its_endpoint() {
        let dir =
            std::env::temp_dir().join(format!("flywheel-serve-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let command = |extra: &[&str]| {
            let mut c = vec![
                "python3",
                RECORDER,
                "RECORD",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--name",
                "{served_name}",
                "--model",
                "{model_path}",
                "--tp",
                "{tensor_parallel}",
            ];
            c.extend_from_slice(extra);
            json!(c)
        };
        let baseline = json!({ "command": command(&[]), "startup_timeout_s": 20 });
        let base = served(&dir, &baseline).unwrap();
        // A long-lived server for url, swap and api_key_env.
        let mut long_lived = std::process::Command::new("python3")
            .args([
                RECORDER,
                &dir.join("long").display().to_string(),
                "--host",
                "127.0.0.1",
            ])
            .args([
                "--port",
                &free_port("127.0.0.1").unwrap().to_string(),
                "--name",
                "live",
            ])
            .spawn()
            .unwrap();
        let started: Value = loop {
            if let Ok(t) = std::fs::read_to_string(dir.join("long")) {
                break serde_json::from_str(&t).unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let args: Vec<String> = serde_json::from_value(started["argv"].clone()).unwrap();
        let live = format!("http://127.0.0.1:{}/v1", args[3]);
        let attach = json!({ "url": live, "swap": "sglang", "served_name": "live" });
        let attached = served(&dir, &attach).unwrap();
        let changes: &[(&Value, &str, Value)] = &[
            (&baseline, "model", json!("base")),
            (&baseline, "command", command(&["--extra"])),
            (&baseline, "env", json!({ "FW_FLAG": "on" })),
            (&baseline, "served_name", json!("custom-name")),
            (&baseline, "tensor_parallel", json!(4)),
            (&baseline, "host", json!("127.0.0.2")),
            (&baseline, "advertise_host", json!("localhost")),
            (
                &attach,
                "url",
                json!(live.replace("127.0.0.1", "localhost")),
            ),
            (&attach, "swap", json!("vllm_lora")),
            (&attach, "api_key_env", json!("PATH")),
        ];
        // Shown elsewhere: templates and extra_args by rendering (below), startup_timeout_s by
        // a server that never becomes ready (below), grace_period_s by the trainers' stop.
        // The Slurm executor and its params need a cluster: tests/slurm.rs serves through one.
        let mut elsewhere = vec![
            "template",
            "extra_args",
            "startup_timeout_s",
            "grace_period_s",
            "executor",
        ];
        elsewhere.extend_from_slice(flywheel_proto::stage::SLURM_SERVE_PARAMS);
        for p in ExternalServe::DOC.params {
            assert!(
                elsewhere.contains(&p.name) || changes.iter().any(|(_, c, _)| *c == p.name),
                "serve: {} is declared but not shown to change anything",
                p.name
            );
        }
        for (from, name, value) in changes {
            let mut params = (*from).clone();
            params[*name] = value.clone();
            let got = served(&dir, &params).unwrap_or_else(|e| panic!("{name}: {e}"));
            let before = if std::ptr::eq(*from, &baseline) {
                &base
            } else {
                &attached
            };
            assert_ne!(&got, before, "serve: {name} = {value} changed nothing");
        }
        let _ = long_lived.kill();
        let _ = long_lived.wait();
        // A server that never answers fails after startup_timeout_s with its log.
        let began = Instant::now();
        let e = served(
            &dir,
            &json!({ "command": ["sh", "-c", "echo warming up; sleep 30"], "startup_timeout_s": 1 }),
        )
        .unwrap_err();
        assert!(began.elapsed() < Duration::from_secs(10));
        assert!(e.contains("not ready") && e.contains("warming up"), "{e}");
        // A port taken between choosing and binding it: the server is started on another.
        let marker = dir.join("port-taken-once");
        let script = format!(
            "if [ ! -e {m} ]; then touch {m}; echo 'OSError: [Errno 98] Address already in use' >&2; exit 1; fi; exec python3 {RECORDER} RECORD --host \"$1\" --port \"$2\" --name \"$3\"",
            m = marker.display()
        );
        let retried = served(
            &dir,
            &json!({ "command": ["sh", "-c", script, "sh", "{host}", "{port}", "{served_name}"] }),
        )
        .unwrap();
        assert!(marker.exists());
        assert_eq!(retried["served_name"], "flywheel-generator-id");
        // One that exits early fails at once with its status and log.
        let e = served(
            &dir,
            &json!({ "command": ["sh", "-c", "echo broken >&2; exit 3"] }),
        )
        .unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn serve_templates_render_each_servers_documented_arguments() {
        let values: BTreeMap<String, String> = [
            ("model_path", "/m/policy"),
            ("host", "0.0.0.0"),
            ("port", "8000"),
            ("served_name", "flywheel-abc"),
            ("tensor_parallel", "8"),
            ("flywheel", "/bin/flywheel"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let line = |template: &str, extra: Option<Vec<&str>>| {
            let p = ExternalServe {
                template: Some(template.into()),
                extra_args: extra.map(|e| {
                    e.into_iter()
                        .map(|a| flywheel_proto::stage::Arg(a.into()))
                        .collect()
                }),
                ..Default::default()
            };
            render(&server_command(&p).unwrap(), &values)
                .unwrap()
                .join(" ")
        };
        assert_eq!(
            line("vllm", Some(vec!["--max-model-len", "8192"])),
            "vllm serve /m/policy --host 0.0.0.0 --port 8000 --served-model-name flywheel-abc --tensor-parallel-size 8 --max-model-len 8192"
        );
        assert_eq!(
            line("sglang", None),
            "python -m sglang.launch_server --model-path /m/policy --host 0.0.0.0 --port 8000 --served-model-name flywheel-abc --tp 8"
        );
        assert_eq!(
            line("trtllm", None),
            "trtllm-serve /m/policy --host 0.0.0.0 --port 8000 --tp_size 8"
        );
        assert_eq!(
            line("flywheel", None),
            "/bin/flywheel serve-model --model /m/policy --name flywheel-abc --addr 0.0.0.0:8000"
        );
    }
}
