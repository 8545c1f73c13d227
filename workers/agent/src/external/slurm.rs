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
use flywheel_proto::stage::ExternalTrain;

/// How often the job's state and output are read.
const POLL: Duration = Duration::from_millis(500);

/// What a job is: where it runs its trainer and writes its log and model.
pub(super) struct JobSpec<'a> {
    /// Attempts of one task share it; a live job with this name is re-attached to.
    pub name: String,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    /// The directory the script and the job's output file go to (on a filesystem the nodes
    /// share).
    pub work: &'a Path,
    /// Where the trainer writes the model; recorded in the job's comment, so that a later
    /// attempt re-attached to the job knows where to find it.
    pub output_dir: &'a Path,
}

/// The batch script for `job` with the stage's Slurm params.
pub(super) fn batch_script(job: &JobSpec<'_>, p: &ExternalTrain) -> String {
    let mut s = String::from("#!/bin/bash\n");
    let mut directive = |d: String| s.push_str(&format!("#SBATCH {d}\n"));
    directive(format!("--job-name={}", job.name));
    directive(format!("--nodes={}", p.nodes));
    directive("--ntasks-per-node=1".into());
    let gpus = p.gpus_per_node.unwrap_or(p.gpus);
    if gpus > 0 {
        directive(format!("--gpus-per-node={gpus}"));
    }
    for (flag, v) in [
        ("partition", &p.partition),
        ("account", &p.account),
        ("qos", &p.qos),
        ("time", &p.time_limit),
    ] {
        if let Some(v) = v {
            directive(format!("--{flag}={v}"));
        }
    }
    directive(format!(
        "--output={}",
        job.work.join("slurm-%j.out").display()
    ));
    directive(format!("--comment={}", job.output_dir.display()));
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
    if let Some(image) = &p.container_image {
        srun.push(format!("--container-image={image}"));
        srun.push(format!(
            "--container-mounts={}:{0},{}:{1}",
            job.work.display(),
            job.output_dir.display()
        ));
    }
    // NODE_RANK is each task's node index, known only inside the task.
    srun.push("bash".into());
    srun.push("-c".into());
    let trainer: Vec<String> = job.argv.iter().map(|a| shell_quote(a)).collect();
    srun.push(shell_quote(&format!(
        "export NODE_RANK=$SLURM_NODEID; exec {}",
        trainer.join(" ")
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
struct JobState {
    state: String,
    reason: String,
    exit_code: String,
    stdout: Option<PathBuf>,
    comment: Option<PathBuf>,
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
            "Comment" if v != "(null)" => j.comment = Some(PathBuf::from(v)),
            _ => {}
        }
    }
    j
}

fn job_state(id: &str) -> Result<JobState, TaskError> {
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

/// Submits (or re-attaches to) the job and follows it to its end; returns the last value of
/// every metric its log showed and the directory its model was written to.
pub(super) fn run_job(
    job: &JobSpec<'_>,
    p: &ExternalTrain,
    ctx: &TaskContext,
    total_steps: Option<f64>,
) -> Result<(BTreeMap<String, f64>, PathBuf), TaskError> {
    std::fs::create_dir_all(job.work)
        .map_err(|e| TaskError::retryable(format!("cannot create {}: {e}", job.work.display())))?;
    let (id, attached) = match live_job(&job.name)? {
        Some(id) => (id, true),
        None => {
            let script = job.work.join("slurm-job.sh");
            std::fs::write(&script, batch_script(job, p)).map_err(|e| {
                TaskError::retryable(format!("cannot write {}: {e}", script.display()))
            })?;
            let out = run("sbatch", &["--parsable", &script.display().to_string()])?;
            // `--parsable` prints `id` or `id;cluster`.
            (out.split(';').next().unwrap_or_default().to_string(), false)
        }
    };
    let numeric: f64 = id.parse().unwrap_or(f64::NAN);
    let verb = if attached {
        "re-attached to"
    } else {
        "submitted"
    };
    tracing::info!(job = %id, name = %job.name, "{verb} slurm job");
    ctx.report(
        0.0,
        format!("{verb} slurm job {id}"),
        &[("slurm_job_id", numeric)],
    );
    ctx.beat_now();

    let mut follower = LogFollower::new(total_steps);
    follower.metrics.insert("slurm_job_id".into(), numeric);
    let mut offset = 0u64;
    let mut log: Option<PathBuf> = None;
    loop {
        let state = job_state(&id)?;
        if log.is_none() {
            log = state.stdout.clone();
        }
        if let Some(path) = &log {
            offset = read_new_lines(path, offset, |line| follower.line(ctx, line));
        }
        if ctx.should_stop() {
            let _ = run("scancel", &[&id]);
            let deadline = Instant::now() + super::grace(p.grace_period_s) + Duration::from_secs(5);
            while Instant::now() < deadline && live_job(&job.name)?.is_some() {
                std::thread::sleep(POLL);
            }
            return Err(TaskError::cancelled());
        }
        let exit_ok = state.exit_code.is_empty() || state.exit_code == "0:0";
        // Retried up to the stage's attempts, as a trainer's non-zero exit is.
        let failure = |what: String| {
            TaskError::retryable(format!(
                "slurm job {id} {what}; last lines of its log:\n{}",
                follower.tail()
            ))
        };
        match state.state.as_str() {
            "PENDING" => ctx.report(
                0.0,
                format!("slurm job {id} waiting on the cluster ({})", state.reason),
                &[("slurm_job_id", numeric)],
            ),
            "COMPLETED" if exit_ok => {
                if let Some(path) = &log {
                    read_new_lines(path, offset, |line| follower.line(ctx, line));
                }
                let output = state
                    .comment
                    .unwrap_or_else(|| job.output_dir.to_path_buf());
                return Ok((follower.metrics, output));
            }
            "COMPLETED" | "FAILED" | "OUT_OF_MEMORY" => {
                return Err(failure(format!(
                    "ended {} with exit code {}",
                    state.state, state.exit_code
                )));
            }
            "TIMEOUT" | "NODE_FAIL" | "PREEMPTED" | "BOOT_FAIL" | "DEADLINE" | "CANCELLED" => {
                return Err(failure(format!("ended {}", state.state)));
            }
            _ => {}
        }
        std::thread::sleep(POLL);
    }
}

/// Hands the complete lines after `offset` in the file to `line`; returns the new offset.
fn read_new_lines(path: &Path, offset: u64, mut line: impl FnMut(String)) -> u64 {
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
            output_dir: Path::new("/shared/models/m1"),
        };
        let s = batch_script(&job, &p);
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

    #[test]
    fn scontrol_fields() {
        let j = parse_scontrol(
            "JobId=7 JobName=x JobState=FAILED Reason=NonZeroExitCode Dependency=(null) ExitCode=3:0 StdOut=/w/slurm-7.out Comment=/m",
        );
        assert_eq!(j.state, "FAILED");
        assert_eq!(j.exit_code, "3:0");
        assert_eq!(j.stdout.unwrap(), PathBuf::from("/w/slurm-7.out"));
        assert_eq!(j.comment.unwrap(), PathBuf::from("/m"));
    }
}
