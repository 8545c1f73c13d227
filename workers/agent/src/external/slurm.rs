//! The Slurm executor: a trainer as a batch job on a Slurm cluster instead of a child process.
//!
//! The worker renders a batch script (nodes, GPUs per node, partition, account, QoS, time limit,
//! a pyxis/enroot container image, the environment) that starts the trainer with `srun` on every
//! node, with a torchrun-style rendezvous on the allocation's first node (`MASTER_ADDR`,
//! `MASTER_PORT`, `NNODES`, `NODE_RANK`); submits it with `sbatch --parsable` under a name made
//! of the task id; reports the job id at once (an immediate heartbeat: `slurm_job_id` in the
//! attempt's progress metrics, in Postgres); follows it with `scontrol show job` (which works
//! without an accounting store; `sacct` once the controller forgot the job); streams its output
//! file as progress and metrics; `scancel`s it when the task is stopped. A later attempt of the
//! same task finds the job by its name and re-attaches to it instead of submitting another.
//!
//! States: `PENDING` is shown with its reason; `COMPLETED` with exit code 0 succeeds, any other
//! exit code fails with the log's tail; `TIMEOUT`, `NODE_FAIL`, `PREEMPTED`, `BOOT_FAIL`,
//! `DEADLINE` and a cancellation by someone else are retryable; `FAILED` and `OUT_OF_MEMORY`
//! fail with the exit code and the log's tail (retried up to the stage's attempts, as a
//! trainer's non-zero exit is).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::LogFollower;
use crate::backend::{TaskContext, TaskError};
use flywheel_proto::stage::{Arg, ExternalServe, ExternalTrain};

/// How often the job's state and output are read.
pub(super) const POLL: Duration = Duration::from_millis(500);

/// What a job is: what it runs and where it writes its log.
pub(super) struct JobSpec<'a> {
    /// Attempts of one task share it; a live job with this name is re-attached to.
    pub name: String,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    /// The directory the script and the job's output file go to (on a filesystem the nodes
    /// share).
    pub work: &'a Path,
    /// Recorded as the job's comment, for a later attempt re-attached to the job: where a
    /// trainer writes its model, the port a server listens on.
    pub comment: String,
    /// Directories a container needs (besides `work`).
    pub mounts: &'a [&'a Path],
}

/// The Slurm params of a stage: what the job asks the cluster for.
pub(super) struct Resources<'a> {
    pub nodes: i64,
    pub gpus_per_node: i64,
    pub partition: &'a Option<String>,
    pub account: &'a Option<String>,
    pub qos: &'a Option<String>,
    pub time_limit: &'a Option<String>,
    pub container_image: &'a Option<String>,
    pub sbatch_args: &'a Option<Vec<Arg>>,
}

impl<'a> From<&'a ExternalTrain> for Resources<'a> {
    fn from(p: &'a ExternalTrain) -> Self {
        Self {
            nodes: p.nodes,
            gpus_per_node: p.gpus_per_node.unwrap_or(p.gpus),
            partition: &p.partition,
            account: &p.account,
            qos: &p.qos,
            time_limit: &p.time_limit,
            container_image: &p.container_image,
            sbatch_args: &p.sbatch_args,
        }
    }
}

impl<'a> From<&'a ExternalServe> for Resources<'a> {
    fn from(p: &'a ExternalServe) -> Self {
        Self {
            nodes: 1,
            gpus_per_node: p.gpus_per_node.unwrap_or(p.tensor_parallel),
            partition: &p.partition,
            account: &p.account,
            qos: &p.qos,
            time_limit: &p.time_limit,
            container_image: &p.container_image,
            sbatch_args: &p.sbatch_args,
        }
    }
}

/// The batch script for `job` with the stage's Slurm params.
pub(super) fn batch_script(job: &JobSpec<'_>, p: &Resources<'_>) -> String {
    let mut s = String::from("#!/bin/bash\n");
    let mut directive = |d: String| s.push_str(&format!("#SBATCH {d}\n"));
    directive(format!("--job-name={}", job.name));
    directive(format!("--nodes={}", p.nodes));
    directive("--ntasks-per-node=1".into());
    if p.gpus_per_node > 0 {
        directive(format!("--gpus-per-node={}", p.gpus_per_node));
    }
    for (flag, v) in [
        ("partition", p.partition),
        ("account", p.account),
        ("qos", p.qos),
        ("time", p.time_limit),
    ] {
        if let Some(v) = v {
            directive(format!("--{flag}={v}"));
        }
    }
    directive(format!(
        "--output={}",
        job.work.join("slurm-%j.out").display()
    ));
    directive(format!("--comment={}", job.comment));
    for a in p.sbatch_args.iter().flatten() {
        directive(a.0.clone());
    }
    s.push_str("set -euo pipefail\n");
    for (k, v) in job.env {
        s.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    s.push_str(
        "# torchrun-style rendezvous on the allocation's first node\n\
         export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\n\
         export MASTER_PORT=${MASTER_PORT:-29500}\n\
         export NNODES=$SLURM_JOB_NUM_NODES\n",
    );
    let mut srun = vec!["srun".to_string(), "--kill-on-bad-exit=1".to_string()];
    if let Some(image) = p.container_image {
        srun.push(format!("--container-image={image}"));
        let mounts: Vec<String> = std::iter::once(job.work)
            .chain(job.mounts.iter().copied())
            .map(|d| format!("{0}:{0}", d.display()))
            .collect();
        srun.push(format!("--container-mounts={}", mounts.join(",")));
    }
    // NODE_RANK is each task's node index, known only inside the task.
    srun.push("bash".into());
    srun.push("-c".into());
    let program: Vec<String> = job.argv.iter().map(|a| shell_quote(a)).collect();
    srun.push(shell_quote(&format!(
        "export NODE_RANK=$SLURM_NODEID; exec {}",
        program.join(" ")
    )));
    s.push_str(&srun.join(" "));
    s.push('\n');
    s
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn run(program: &str, args: &[&str]) -> Result<String, TaskError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        TaskError::retryable(format!(
            "cannot run {program} (is this worker on a Slurm login node?): {e}"
        ))
    })?;
    if !out.status.success() {
        return Err(TaskError::retryable(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A job's fields from `scontrol show job -o` (`Key=Value` pairs).
#[derive(Debug, Default, Clone)]
pub(super) struct JobState {
    pub state: String,
    pub reason: String,
    pub exit_code: String,
    pub stdout: Option<PathBuf>,
    pub comment: Option<String>,
    /// The node the batch script runs on (a server's host).
    pub batch_host: Option<String>,
}

impl JobState {
    /// Whether the job has ended, for good or not.
    pub(super) fn ended(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "OUT_OF_MEMORY"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "PREEMPTED"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "CANCELLED"
        )
    }

    fn succeeded(&self) -> bool {
        self.state == "COMPLETED" && (self.exit_code.is_empty() || self.exit_code == "0:0")
    }

    /// How an ended job ended, for error messages.
    pub(super) fn end(&self, id: &str) -> String {
        match self.state.as_str() {
            "COMPLETED" | "FAILED" | "OUT_OF_MEMORY" => format!(
                "slurm job {id} ended {} with exit code {}",
                self.state, self.exit_code
            ),
            other => format!("slurm job {id} ended {other}"),
        }
    }
}

fn parse_scontrol(line: &str) -> JobState {
    let mut j = JobState::default();
    for field in line.split_whitespace() {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        match k {
            "JobState" => j.state = v.to_string(),
            "Reason" => j.reason = v.to_string(),
            "ExitCode" => j.exit_code = v.to_string(),
            "StdOut" => j.stdout = Some(PathBuf::from(v)),
            "Comment" if v != "(null)" => j.comment = Some(v.to_string()),
            "BatchHost" if v != "(null)" => j.batch_host = Some(v.to_string()),
            _ => {}
        }
    }
    j
}

pub(super) fn job_state(id: &str) -> Result<JobState, TaskError> {
    match run("scontrol", &["show", "job", "-o", id]) {
        Ok(line) if !line.is_empty() => Ok(parse_scontrol(&line)),
        // The controller forgets finished jobs after MinJobAge; accounting remembers them.
        _ => {
            let line = run(
                "sacct",
                &["-n", "-P", "-X", "-j", id, "-o", "State,ExitCode"],
            )?;
            let (state, exit) = line.split_once('|').ok_or_else(|| {
                TaskError::retryable(format!(
                    "slurm job {id} is unknown to scontrol and sacct (no accounting store?)"
                ))
            })?;
            Ok(JobState {
                // `CANCELLED by 0` and the like.
                state: state
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                exit_code: exit.to_string(),
                ..JobState::default()
            })
        }
    }
}

/// The id of a pending or running job named `name`, if there is one.
fn live_job(name: &str) -> Result<Option<String>, TaskError> {
    let out = run(
        "squeue",
        &[
            "-h",
            "-n",
            name,
            "-t",
            "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED",
            "-o",
            "%i",
        ],
    )?;
    Ok(out.lines().next().map(|l| l.trim().to_string()))
}

/// Re-attaches to the live job named like `job`, or submits it; returns its id and, for a job
/// submitted here, when. The id is recorded on the attempt in Postgres (`external_job`) before
/// this returns, unless the controller does not answer within a few seconds (a later attempt
/// finds the job by its name all the same).
pub(super) fn submit_or_attach(
    job: &JobSpec<'_>,
    p: &Resources<'_>,
    ctx: &TaskContext,
) -> Result<(String, Option<Instant>), TaskError> {
    std::fs::create_dir_all(job.work)
        .map_err(|e| TaskError::retryable(format!("cannot create {}: {e}", job.work.display())))?;
    let (id, attached) = match live_job(&job.name)? {
        Some(id) => (id, true),
        None => (submit(job, p)?, false),
    };
    let verb = if attached {
        "re-attached to"
    } else {
        "submitted"
    };
    tracing::info!(job = %id, name = %job.name, "{verb} slurm job");
    ctx.report(
        0.0,
        format!("{verb} slurm job {id}"),
        &[("slurm_job_id", numeric_id(&id))],
    );
    if !ctx.record_external_job(format!("slurm:{id}"), RECORD_WAIT) {
        tracing::warn!(job = %id, "the controller has not recorded the job yet; going on");
    }
    Ok((id, (!attached).then(Instant::now)))
}

/// How long a submission waits for the controller to record the job id.
const RECORD_WAIT: Duration = Duration::from_secs(10);

/// Seconds from submission until the job ran (a metric), once it runs.
pub(super) fn wait_metric(submitted: Option<Instant>, state: &JobState) -> Option<f64> {
    (state.state == "RUNNING" || state.ended())
        .then_some(submitted)
        .flatten()
        .map(|t| t.elapsed().as_secs_f64())
}

/// Submits `job` anew (a job of the same name may have ended before).
fn submit(job: &JobSpec<'_>, p: &Resources<'_>) -> Result<String, TaskError> {
    let script = job.work.join("slurm-job.sh");
    std::fs::write(&script, batch_script(job, p))
        .map_err(|e| TaskError::retryable(format!("cannot write {}: {e}", script.display())))?;
    let out = run("sbatch", &["--parsable", &script.display().to_string()])?;
    // `--parsable` prints `id` or `id;cluster`.
    Ok(out.split(';').next().unwrap_or_default().to_string())
}

pub(super) fn numeric_id(id: &str) -> f64 {
    id.parse().unwrap_or(f64::NAN)
}

/// Cancels the job and waits (up to the grace period and a little more) until it has left the
/// queue.
pub(super) fn cancel(id: &str, name: &str, grace: Duration) {
    let _ = run("scancel", &[id]);
    let deadline = Instant::now() + grace + Duration::from_secs(5);
    while Instant::now() < deadline && live_job(name).ok().flatten().is_some() {
        std::thread::sleep(POLL);
    }
}

/// Submits (or re-attaches to) the job and follows it to its end; returns the last value of
/// every metric its log showed and the directory its model was written to.
pub(super) fn run_job(
    job: &JobSpec<'_>,
    p: &ExternalTrain,
    ctx: &TaskContext,
    total_steps: Option<f64>,
) -> Result<(BTreeMap<String, f64>, PathBuf), TaskError> {
    let (id, mut submitted) = submit_or_attach(job, &p.into(), ctx)?;
    let numeric = numeric_id(&id);
    let mut follower = LogFollower::new(total_steps);
    follower.metrics.insert("slurm_job_id".into(), numeric);
    let mut offset = 0u64;
    let mut log: Option<PathBuf> = None;
    loop {
        let state = job_state(&id)?;
        if let Some(wait) = wait_metric(submitted, &state) {
            follower.metrics.insert("slurm_wait_s".into(), wait);
            submitted = None;
        }
        if log.is_none() {
            log = state.stdout.clone();
        }
        if let Some(path) = &log {
            offset = read_new_lines(path, offset, |line| follower.line(ctx, line));
        }
        if ctx.should_stop() {
            cancel(&id, &job.name, super::grace(p.grace_period_s));
            return Err(TaskError::cancelled());
        }
        if state.succeeded() {
            if let Some(path) = &log {
                read_new_lines(path, offset, |line| follower.line(ctx, line));
            }
            let output = state
                .comment
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(&job.comment));
            return Ok((follower.metrics, output));
        }
        if state.ended() {
            // Retried up to the stage's attempts, as a trainer's non-zero exit is.
            return Err(TaskError::retryable(format!(
                "{}; last lines of its log:\n{}",
                state.end(&id),
                follower.tail()
            )));
        }
        if state.state == "PENDING" {
            ctx.report(
                0.0,
                format!("slurm job {id} waiting on the cluster ({})", state.reason),
                &[("slurm_job_id", numeric)],
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Hands the complete lines after `offset` in the file to `line`; returns the new offset.
pub(super) fn read_new_lines(path: &Path, offset: u64, mut line: impl FnMut(String)) -> u64 {
    let Ok(mut f) = std::fs::File::open(path) else {
        return offset;
    };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return offset;
    }
    let mut buf = String::new();
    if f.read_to_string(&mut buf).is_err() {
        return offset;
    }
    let complete = buf.rfind('\n').map_or(0, |i| i + 1);
    for l in buf[..complete].lines() {
        line(l.to_string());
    }
    offset + complete as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-node × 8-GPU job: one task per node, the rendezvous on the first node, the container
    /// flags, every directive from the params.
    #[test]
    fn two_nodes_of_eight_gpus() {
        let p: ExternalTrain = serde_json::from_value(serde_json::json!({
            "executor": "slurm", "nodes": 2, "gpus": 8, "partition": "batch", "account": "llm",
            "qos": "high", "time_limit": "04:00:00", "container_image": "nvcr.io/nvidia/nemo:24.05",
            "sbatch_args": ["--exclusive"],
        }))
        .unwrap();
        let argv: Vec<String> = ["torchrun", "--nnodes", "2", "train.py", "--lr", "1e-5 x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let env = vec![("NCCL_DEBUG".to_string(), "WARN".to_string())];
        let job = JobSpec {
            name: "flywheel-t1".into(),
            argv: &argv,
            env: &env,
            work: Path::new("/shared/work/t1"),
            comment: "/shared/models/m1".into(),
            mounts: &[Path::new("/shared/models/m1")],
        };
        let s = batch_script(&job, &(&p).into());
        let want = "#!/bin/bash
#SBATCH --job-name=flywheel-t1
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --partition=batch
#SBATCH --account=llm
#SBATCH --qos=high
#SBATCH --time=04:00:00
#SBATCH --output=/shared/work/t1/slurm-%j.out
#SBATCH --comment=/shared/models/m1
#SBATCH --exclusive
set -euo pipefail
export NCCL_DEBUG=WARN
# torchrun-style rendezvous on the allocation's first node
export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export NNODES=$SLURM_JOB_NUM_NODES
srun --kill-on-bad-exit=1 --container-image=nvcr.io/nvidia/nemo:24.05 --container-mounts=/shared/work/t1:/shared/work/t1,/shared/models/m1:/shared/models/m1 bash -c 'export NODE_RANK=$SLURM_NODEID; exec torchrun --nnodes 2 train.py --lr '\\''1e-5 x'\\'''
";
        assert_eq!(s, want);
    }

    /// A server's job: one node, its tensor-parallel GPUs, the model directory mounted in the
    /// container, the port in the comment.
    #[test]
    fn a_server_job_is_one_node_with_its_tensor_parallel_gpus() {
        let p: ExternalServe = serde_json::from_value(serde_json::json!({
            "template": "vllm", "executor": "slurm", "tensor_parallel": 4,
            "container_image": "vllm/vllm-openai:v0.6.3", "time_limit": "02:00:00",
        }))
        .unwrap();
        let argv: Vec<String> = ["vllm", "serve", "/m/gen", "--port", "31337"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let job = JobSpec {
            name: "flywheel-t2".into(),
            argv: &argv,
            env: &[],
            work: Path::new("/shared/work/t2"),
            comment: "31337".into(),
            mounts: &[Path::new("/m/gen")],
        };
        let s = batch_script(&job, &(&p).into());
        for line in [
            "#SBATCH --nodes=1\n",
            "#SBATCH --gpus-per-node=4\n",
            "#SBATCH --time=02:00:00\n",
            "#SBATCH --comment=31337\n",
            "--container-mounts=/shared/work/t2:/shared/work/t2,/m/gen:/m/gen ",
            "exec vllm serve /m/gen --port 31337'",
        ] {
            assert!(s.contains(line), "{line:?} missing from\n{s}");
        }
    }

    #[test]
    fn scontrol_fields() {
        let j = parse_scontrol(
            "JobId=7 JobName=x JobState=FAILED Reason=NonZeroExitCode Dependency=(null) BatchHost=node-3 ExitCode=3:0 StdOut=/w/slurm-7.out Comment=/m",
        );
        assert_eq!(j.state, "FAILED");
        assert_eq!(j.exit_code, "3:0");
        assert_eq!(j.stdout.unwrap(), PathBuf::from("/w/slurm-7.out"));
        assert_eq!(j.comment.unwrap(), "/m");
        assert_eq!(j.batch_host.unwrap(), "node-3");
    }
}
