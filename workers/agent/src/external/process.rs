//! The trainer process: its own process group, its output streamed as progress, stopped on
//! cancellation.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::logs::{parse_metrics, parse_progress, shown};
use crate::backend::{TaskContext, TaskError};

/// Log lines kept for the error message of a failed trainer.
const TAIL_LINES: usize = 30;

/// Runs the trainer, streaming its output as progress; returns the last value of every metric
/// it logged.
pub(super) fn run_trainer(
    argv: &[String],
    env: &[(String, String)],
    cwd: &Path,
    ctx: &TaskContext,
    grace: Duration,
    total_steps: Option<f64>,
) -> Result<BTreeMap<String, f64>, TaskError> {
    std::fs::create_dir_all(cwd)
        .map_err(|e| TaskError::retryable(format!("cannot create {}: {e}", cwd.display())))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(cwd);
    let mut child = spawn_in_group(cmd, env, "trainer", &argv[0])?;
    let (tx, rx) = mpsc::channel::<String>();
    pipe_lines(&mut child, move |line| tx.send(line).is_ok());
    let mut follower = LogFollower::new(total_steps);
    let mut streams_open = true;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => follower.line(ctx, line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => streams_open = false,
        }
        if ctx.should_stop() {
            stop(&mut child, grace);
            return Err(TaskError::cancelled());
        }
        if !streams_open {
            break;
        }
    }
    let status = child
        .wait()
        .map_err(|e| TaskError::retryable(format!("waiting for the trainer: {e}")))?;
    if !status.success() {
        return Err(TaskError::retryable(format!(
            "trainer {:?} exited with {status}; last lines of its log:\n{}",
            argv[0],
            follower.tail()
        )));
    }
    Ok(follower.metrics)
}

/// A trainer's log, line by line: the metrics it logs, its progress (by `step` of
/// `total_steps`, else its own progress bar) reported to the controller, and the last lines kept
/// for an error message.
pub(super) struct LogFollower {
    pub(super) metrics: BTreeMap<String, f64>,
    tail: VecDeque<String>,
    bar: f64,
    total_steps: Option<f64>,
}

impl LogFollower {
    pub(super) fn new(total_steps: Option<f64>) -> Self {
        Self {
            metrics: BTreeMap::new(),
            tail: VecDeque::with_capacity(TAIL_LINES),
            bar: 0.0,
            total_steps,
        }
    }

    pub(super) fn line(&mut self, ctx: &TaskContext, line: String) {
        for (k, v) in parse_metrics(&line) {
            self.metrics.insert(k, v);
        }
        if let Some(f) = parse_progress(&line) {
            self.bar = f;
        }
        let fraction = match (self.metrics.get("step"), self.total_steps) {
            (Some(step), Some(total)) if total > 0.0 => (step + 1.0) / total,
            _ => self.bar,
        };
        let metric_list: Vec<(&str, f64)> =
            self.metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let message: String = shown(&line).chars().take(200).collect();
        ctx.report(fraction, message, &metric_list);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The last lines seen, joined.
    pub(super) fn tail(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Starts `cmd` with `env`, no stdin and piped output, in its own process group, so that a stop
/// reaches launchers' children (deepspeed, torchrun, a server's workers).
pub(super) fn spawn_in_group(
    mut cmd: Command,
    env: &[(String, String)],
    what: &str,
    program: &str,
) -> Result<Child, TaskError> {
    use std::os::unix::process::CommandExt;
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| TaskError::permanent(format!("cannot start {what} {program:?}: {e}")))
}

/// Reads the child's stdout and stderr line by line on threads of their own, handing each line
/// to `sink` until it returns false or the streams close.
pub(super) fn pipe_lines(
    child: &mut Child,
    sink: impl Fn(String) -> bool + Clone + Send + 'static,
) {
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let sink = sink.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if !sink(line) {
                    break;
                }
            }
        });
    }
}

/// SIGTERM to the trainer's process group, then SIGKILL once `grace` has passed.
pub(super) fn stop(child: &mut Child, grace: Duration) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let group = Pid::from_raw(child.id() as i32);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            // The leader is gone; make sure its children are too.
            let _ = killpg(group, Signal::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait();
}
