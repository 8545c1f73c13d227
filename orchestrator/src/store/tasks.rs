//! `tasks`: the queue. Each row is one stage shard of one round, moving through
//! `blocked → queued → running → succeeded | failed | cancelled` (running → queued on retry).
//!
//! Every write to a running task is fenced by `attempt`: it matches `id AND attempt AND
//! state = 'running'` or changes nothing. Batch functions take slices and run one statement.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

pub use flywheel_proto::state::TaskState;

#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub round_id: Uuid,
    pub round_index: i32,
    pub stage: String,
    pub stage_order: i32,
    pub kind: String,
    pub shard_index: i32,
    pub shard_count: i32,
    pub params: Value,
    pub config_hash: String,
    pub pool: String,
    pub backend: String,
    pub gpu_kind: String,
    pub gpu_count: i32,
    pub max_attempts: i32,
    pub backoff_initial_ms: i32,
    pub backoff_max_ms: i32,
    /// `queued` for tasks without dependencies, else `blocked`.
    pub state: TaskState,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TaskRow {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub round_id: Uuid,
    pub round_index: i32,
    pub stage: String,
    pub stage_order: i32,
    pub kind: String,
    pub shard_index: i32,
    pub shard_count: i32,
    pub params: Value,
    pub pool: String,
    pub backend: String,
    pub gpu_kind: String,
    pub gpu_count: i32,
    #[sqlx(try_from = "String")]
    pub state: TaskState,
    pub attempt: i32,
    pub max_attempts: i32,
    pub worker_id: Option<Uuid>,
    pub progress: f64,
    pub progress_message: String,
    pub progress_metrics: Value,
    pub metrics: Value,
    pub last_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, campaign_id, round_id, round_index, stage, stage_order, kind, shard_index,
    shard_count, params, pool, backend, gpu_kind, gpu_count, state, attempt, max_attempts, worker_id,
    progress, progress_message, progress_metrics, metrics, last_error, started_at, finished_at";

/// A task just claimed for a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedRow {
    pub id: Uuid,
    pub attempt: i32,
    pub worker_id: Uuid,
    pub campaign_id: Uuid,
    pub round_id: Uuid,
    pub round_index: i32,
    pub stage: String,
    pub kind: String,
    pub shard_index: i32,
    pub shard_count: i32,
    /// As stored, JSON text: it goes to the worker as is, never decoded here.
    pub params: String,
    pub backend: String,
    pub pool: String,
    /// How long the task had been claimable when this claim took it.
    pub waited_s: f64,
}

/// A running attempt that just ended (completed, failed, expired).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SettledRow {
    pub id: Uuid,
    pub attempt: i32,
    pub campaign_id: Uuid,
    pub round_id: Uuid,
    pub stage: String,
    pub shard_index: i32,
    pub worker_id: Option<Uuid>,
    /// The task's state after settling.
    #[sqlx(try_from = "String")]
    pub state: TaskState,
    pub next_run_at: DateTime<Utc>,
    pub kind: String,
    pub pool: String,
    /// How long the attempt ran.
    pub ran_s: f64,
}

pub async fn insert_many(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<(), sqlx::Error> {
    macro_rules! col {
        ($f:ident) => {
            tasks.iter().map(|t| t.$f.clone()).collect::<Vec<_>>()
        };
    }
    sqlx::query(
        "INSERT INTO tasks (id, campaign_id, round_id, round_index, stage, stage_order, kind,
             shard_index, shard_count, params, config_hash, pool, backend, gpu_kind, gpu_count,
             max_attempts, backoff_initial_ms, backoff_max_ms, state, queued_at)
         SELECT u.*, CASE WHEN u.state = 'queued' THEN now() END
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int[], $5::text[], $6::int[], $7::text[],
                     $8::int[], $9::int[], $10::jsonb[], $11::text[], $12::text[], $13::text[],
                     $14::text[], $15::int[], $16::int[], $17::int[], $18::int[], $19::text[])
              AS u(id, campaign_id, round_id, round_index, stage, stage_order, kind, shard_index,
                   shard_count, params, config_hash, pool, backend, gpu_kind, gpu_count,
                   max_attempts, backoff_initial_ms, backoff_max_ms, state)",
    )
    .bind(col!(id))
    .bind(col!(campaign_id))
    .bind(col!(round_id))
    .bind(col!(round_index))
    .bind(col!(stage))
    .bind(col!(stage_order))
    .bind(col!(kind))
    .bind(col!(shard_index))
    .bind(col!(shard_count))
    .bind(col!(params))
    .bind(col!(config_hash))
    .bind(col!(pool))
    .bind(col!(backend))
    .bind(col!(gpu_kind))
    .bind(col!(gpu_count))
    .bind(col!(max_attempts))
    .bind(col!(backoff_initial_ms))
    .bind(col!(backoff_max_ms))
    .bind(tasks.iter().map(|t| t.state.as_str()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Capabilities shared by a group of idle worker slots.
pub struct ClaimGroup<'a> {
    pub pool: &'a str,
    pub backends: &'a [String],
    pub gpu_kind: &'a str,
    pub gpu_count: i32,
    /// One entry per free slot, interleaved across workers; the n-th claimed task goes to the
    /// n-th entry.
    pub slots: &'a [Uuid],
}

/// Claims up to `slots.len()` queued tasks the group can run, skipping rows other claimers hold,
/// and opens an attempt for each. One statement.
pub async fn claim(
    conn: &mut PgConnection,
    group: &ClaimGroup<'_>,
    lease_ttl_ms: i64,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    sqlx::query_as(
        "WITH picked AS (
             SELECT id, (row_number() OVER ())::int AS n FROM (
                 SELECT t.id FROM tasks t
                 WHERE t.state = 'queued' AND t.pool = $1 AND t.backend = ANY($2)
                   AND (t.gpu_kind = '' OR t.gpu_kind = $3) AND t.gpu_count <= $4
                   AND t.next_run_at <= now() AND t.kind <> 'promote'
                   AND EXISTS (SELECT 1 FROM campaigns c WHERE c.id = t.campaign_id AND c.status = 'running')
                 ORDER BY t.pool, t.round_index, t.stage_order, t.next_run_at, t.shard_index
                 LIMIT cardinality($5::uuid[])
                 FOR UPDATE OF t SKIP LOCKED
             ) AS locked
         ),
         claimed AS (
             UPDATE tasks t SET state = 'running', attempt = t.attempt + 1, worker_id = ($5::uuid[])[p.n],
                 lease_expires_at = now() + make_interval(secs => $6::float8 / 1000),
                 started_at = now(), finished_at = NULL, progress = 0, progress_message = ''
             FROM picked p
             WHERE t.id = p.id
             RETURNING t.id, t.attempt, t.worker_id, t.campaign_id, t.round_id, t.round_index, t.stage,
                       t.kind, t.shard_index, t.shard_count, t.params::text AS params, t.backend, t.pool,
                       extract(epoch FROM now() - greatest(t.next_run_at, t.queued_at, t.created_at))::float8 AS waited_s
         ),
         opened AS (
             INSERT INTO attempts (task_id, attempt, worker_id, state)
             SELECT id, attempt, worker_id, 'running' FROM claimed
         )
         SELECT * FROM claimed",
    )
    .bind(group.pool)
    .bind(group.backends)
    .bind(group.gpu_kind)
    .bind(group.gpu_count)
    .bind(group.slots)
    .bind(lease_ttl_ms as f64)
    .fetch_all(conn)
    .await
}

/// One task's heartbeat, from the worker running it.
pub struct Beat {
    pub worker_id: Uuid,
    pub id: Uuid,
    pub attempt: i32,
    pub progress: f64,
    pub message: String,
    pub metrics: Value,
    /// A serve task's endpoint, once its server answers.
    pub endpoint: Option<super::endpoints::NewEndpoint>,
    /// The cluster job the attempt runs in, once submitted.
    pub external_job: Option<String>,
}

/// Extends the leases of current attempts running on the reporting worker and records
/// progress. Returns the `(id, attempt, cancel_requested, stop)` of the attempts that are
/// current, `stop` meaning a serve task whose consumers have all succeeded; any other beat was
/// stale (or not the reporter's).
pub async fn heartbeat(
    conn: &mut PgConnection,
    beats: &[&Beat],
    lease_ttl_ms: i64,
) -> Result<Vec<(Uuid, i32, bool, bool)>, sqlx::Error> {
    if beats.is_empty() {
        return Ok(Vec::new());
    }
    let id: Vec<_> = beats.iter().map(|b| b.id).collect();
    let attempt: Vec<_> = beats.iter().map(|b| b.attempt).collect();
    let progress: Vec<_> = beats.iter().map(|b| b.progress).collect();
    let message: Vec<_> = beats.iter().map(|b| b.message.as_str()).collect();
    let metrics: Vec<_> = beats.iter().map(|b| b.metrics.clone()).collect();
    let worker: Vec<_> = beats.iter().map(|b| b.worker_id).collect();
    sqlx::query_as(
        "UPDATE tasks t SET lease_expires_at = now() + make_interval(secs => $6::float8 / 1000),
             progress = u.p, progress_message = u.m, progress_metrics = u.x
         FROM unnest($1::uuid[], $2::int[], $3::float8[], $4::text[], $5::jsonb[], $7::uuid[])
              AS u(id, a, p, m, x, w)
         WHERE t.id = u.id AND t.attempt = u.a AND t.state = 'running' AND t.worker_id = u.w
         RETURNING t.id, t.attempt, t.cancel_requested,
                   t.kind = 'serve' AND NOT EXISTS (SELECT 1 FROM task_edges e JOIN tasks d ON d.id = e.task_id
                                                    WHERE e.depends_on = t.id AND d.state <> 'succeeded') AS stop",
    )
    .bind(id)
    .bind(attempt)
    .bind(progress)
    .bind(message)
    .bind(metrics)
    .bind(lease_ttl_ms as f64)
    .bind(worker)
    .fetch_all(conn)
    .await
}

/// Marks current attempts as succeeded, task and attempt row in one statement: `(id, attempt,
/// worker, metrics)`. Pairs that are stale, or whose attempt runs on another worker, are left
/// out of the result.
pub async fn complete(
    conn: &mut PgConnection,
    done: &[(Uuid, i32, Uuid, Value)],
) -> Result<Vec<SettledRow>, sqlx::Error> {
    if done.is_empty() {
        return Ok(Vec::new());
    }
    let id: Vec<_> = done.iter().map(|d| d.0).collect();
    let attempt: Vec<_> = done.iter().map(|d| d.1).collect();
    let worker: Vec<_> = done.iter().map(|d| d.2).collect();
    let metrics: Vec<_> = done.iter().map(|d| d.3.clone()).collect();
    sqlx::query_as(
        "WITH done AS (
             UPDATE tasks t SET state = 'succeeded', metrics = u.x, progress = 1, finished_at = now(),
                 lease_expires_at = NULL, last_error = NULL
             FROM unnest($1::uuid[], $2::int[], $3::jsonb[], $4::uuid[]) AS u(id, a, x, w)
             WHERE t.id = u.id AND t.attempt = u.a AND t.state = 'running' AND t.worker_id = u.w
             RETURNING t.id, t.attempt, t.campaign_id, t.round_id, t.stage, t.shard_index, t.worker_id,
                       t.state, t.next_run_at, t.kind, t.pool,
                       extract(epoch FROM now() - t.started_at)::float8 AS ran_s
         ),
         closed AS (
             UPDATE attempts a SET state = 'succeeded', error = NULL, finished_at = now()
             FROM done d WHERE a.task_id = d.id AND a.attempt = d.attempt AND a.state = 'running'
         )
         SELECT * FROM done",
    )
    .bind(id)
    .bind(attempt)
    .bind(metrics)
    .bind(worker)
    .fetch_all(conn)
    .await
}

/// The serve tasks among settled attempts: their endpoints close with them.
pub fn serve_ids(settled: &[SettledRow]) -> Vec<Uuid> {
    settled
        .iter()
        .filter(|s| s.kind == "serve")
        .map(|s| s.id)
        .collect()
}

/// Settles failed attempts: back to `queued` after an exponential backoff while the error is
/// retryable and attempts remain, `cancelled` if cancellation was requested, else `failed`.
/// `source` yields `(id, attempt, error, retryable, worker_id_before)`.
const SETTLE_FAILED: &str = "
    UPDATE tasks t SET
        state = CASE WHEN t.cancel_requested THEN 'cancelled'
                     WHEN f.retryable AND t.attempt - t.attempt_base < t.max_attempts THEN
                         CASE WHEN EXISTS (SELECT 1 FROM task_edges e JOIN tasks d ON d.id = e.depends_on
                                           WHERE e.task_id = t.id AND d.kind = 'serve' AND d.state <> 'succeeded'
                                             AND NOT EXISTS (SELECT 1 FROM endpoints p WHERE p.task_id = d.id
                                                             AND p.attempt = d.attempt AND p.state = 'ready'))
                              THEN 'blocked' ELSE 'queued' END
                     ELSE 'failed' END,
        next_run_at = now() + make_interval(secs => least(t.backoff_max_ms::float8,
            t.backoff_initial_ms * power(2, greatest(t.attempt - t.attempt_base - 1, 0))) / 1000),
        queued_at = now(), last_error = f.error, lease_expires_at = NULL, worker_id = NULL,
        finished_at = CASE WHEN f.retryable AND NOT t.cancel_requested
                            AND t.attempt - t.attempt_base < t.max_attempts THEN NULL ELSE now() END
    FROM ({source}) AS f(id, attempt, error, retryable, worker_id_before)
    WHERE t.id = f.id AND t.attempt = f.attempt AND t.state = 'running'
    RETURNING t.id, t.attempt, t.campaign_id, t.round_id, t.stage, t.shard_index,
              f.worker_id_before AS worker_id, t.state, t.next_run_at, t.kind, t.pool,
              extract(epoch FROM now() - t.started_at)::float8 AS ran_s";

/// Settles failed attempts reported by the worker running them: `(id, attempt, worker, error,
/// retryable)`.
pub async fn fail(
    conn: &mut PgConnection,
    failed: &[(Uuid, i32, Uuid, &str, bool)],
) -> Result<Vec<SettledRow>, sqlx::Error> {
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    let id: Vec<_> = failed.iter().map(|f| f.0).collect();
    let attempt: Vec<_> = failed.iter().map(|f| f.1).collect();
    let worker: Vec<_> = failed.iter().map(|f| f.2).collect();
    let error: Vec<_> = failed.iter().map(|f| f.3).collect();
    let retryable: Vec<_> = failed.iter().map(|f| f.4).collect();
    let source = "SELECT u.id, u.a, u.e, u.r, t.worker_id AS worker_id_before
                  FROM unnest($1::uuid[], $2::int[], $3::text[], $4::bool[], $5::uuid[]) AS u(id, a, e, r, w)
                  JOIN tasks t ON t.id = u.id AND t.worker_id = u.w";
    let sql = SETTLE_FAILED.replace("{source}", source);
    sqlx::query_as(AssertSqlSafe(sql))
        .bind(id)
        .bind(attempt)
        .bind(error)
        .bind(retryable)
        .bind(worker)
        .fetch_all(conn)
        .await
}

/// The campaigns of these tasks.
pub async fn campaigns_of(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT DISTINCT campaign_id FROM tasks WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(conn)
        .await
}

/// The campaigns with a running attempt whose lease has expired.
pub async fn campaigns_with_expired_leases(
    conn: &mut PgConnection,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT campaign_id FROM tasks WHERE state = 'running' AND lease_expires_at < now()",
    )
    .fetch_all(conn)
    .await
}

/// Settles every running attempt of these campaigns whose lease has expired, as a retryable
/// failure.
pub async fn expire_leases(
    conn: &mut PgConnection,
    campaigns: &[Uuid],
) -> Result<Vec<SettledRow>, sqlx::Error> {
    let source =
        "SELECT id, attempt, 'lease expired: no heartbeat from the worker', true, worker_id
                  FROM tasks WHERE state = 'running' AND lease_expires_at < now()
                    AND campaign_id = ANY($1)
                  FOR UPDATE SKIP LOCKED";
    let sql = SETTLE_FAILED.replace("{source}", source);
    sqlx::query_as(AssertSqlSafe(sql))
        .bind(campaigns)
        .fetch_all(conn)
        .await
}

/// When the earliest running lease expires (the reaper's next look).
pub async fn next_lease_expiry(
    conn: &mut PgConnection,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(lease_expires_at) FROM tasks WHERE state = 'running'")
        .fetch_one(conn)
        .await
}

/// When the next queued task of these pools that is waiting out a backoff becomes claimable.
pub async fn next_claimable(
    conn: &mut PgConnection,
    pools: &[&str],
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT min(next_run_at) FROM tasks
         WHERE state = 'queued' AND pool = ANY($1) AND next_run_at > now()",
    )
    .bind(pools)
    .fetch_one(conn)
    .await
}

/// Gives every running lease at least `ttl_ms` from now: after a controller restart, live
/// workers get one lease period to reconnect before their tasks are reclaimed.
pub async fn extend_all_leases(conn: &mut PgConnection, ttl_ms: i64) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE tasks SET lease_expires_at = greatest(lease_expires_at,
             now() + make_interval(secs => $1::float8 / 1000))
         WHERE state = 'running'",
    )
    .bind(ttl_ms as f64)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Queues blocked dependents of `completed` whose dependencies have all succeeded (a serve
/// dependency counts once its current attempt's endpoint is ready).
pub async fn unblock_dependents(
    conn: &mut PgConnection,
    completed: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    if completed.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "UPDATE tasks t SET state = 'queued', queued_at = now(), next_run_at = now()
         WHERE t.state = 'blocked'
           AND t.id IN (SELECT task_id FROM task_edges WHERE depends_on = ANY($1))
           AND NOT EXISTS (SELECT 1 FROM task_edges e JOIN tasks d ON d.id = e.depends_on
                           WHERE e.task_id = t.id AND d.state <> 'succeeded'
                             AND NOT (d.kind = 'serve' AND EXISTS (
                                 SELECT 1 FROM endpoints p WHERE p.task_id = d.id
                                 AND p.attempt = d.attempt AND p.state = 'ready')))
         RETURNING t.id",
    )
    .bind(completed)
    .fetch_all(conn)
    .await
}

/// Of the given `(round, stage)` pairs, those whose every task has succeeded, with campaign id.
/// Unfinished is running or neither running nor succeeded: one partial index each.
pub async fn completed_stages(
    conn: &mut PgConnection,
    pairs: &[(Uuid, String)],
) -> Result<Vec<(Uuid, Uuid, i32, String)>, sqlx::Error> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let unique: std::collections::BTreeSet<_> = pairs.iter().cloned().collect();
    let (round, stage): (Vec<Uuid>, Vec<String>) = unique.into_iter().unzip();
    sqlx::query_as(
        "SELECT t.campaign_id, t.round_id, t.round_index, t.stage
         FROM unnest($1::uuid[], $2::text[]) AS u(r, s)
         JOIN tasks t ON t.round_id = u.r AND t.stage = u.s AND t.shard_index = 0
         WHERE NOT EXISTS (SELECT 1 FROM tasks o WHERE o.round_id = u.r AND o.stage = u.s
                           AND o.state = 'running')
           AND NOT EXISTS (SELECT 1 FROM tasks o WHERE o.round_id = u.r AND o.stage = u.s
                           AND o.state NOT IN ('succeeded', 'running'))",
    )
    .bind(round)
    .bind(stage)
    .fetch_all(conn)
    .await
}

pub async fn list_for_campaign(
    conn: &mut PgConnection,
    campaign_id: Uuid,
) -> Result<Vec<TaskRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM tasks WHERE round_id IN (SELECT id FROM rounds WHERE campaign_id = $1)
         ORDER BY round_index, stage_order, shard_index"
    )))
    .bind(campaign_id)
    .fetch_all(conn)
    .await
}

pub async fn list_for_round(
    conn: &mut PgConnection,
    round_id: Uuid,
) -> Result<Vec<TaskRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM tasks WHERE round_id = $1 ORDER BY stage_order, shard_index"
    )))
    .bind(round_id)
    .fetch_all(conn)
    .await
}

/// Promote tasks of running campaigns whose dependencies are done: the controller runs these.
pub async fn ready_promotions(conn: &mut PgConnection) -> Result<Vec<TaskRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM tasks WHERE state = 'queued' AND kind = 'promote'
           AND campaign_id IN (SELECT id FROM campaigns WHERE status = 'running')"
    )))
    .fetch_all(conn)
    .await
}

/// Locks a queued task for the controller to run it inline.
pub async fn lock_queued(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<TaskRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM tasks WHERE id = $1 AND state = 'queued' FOR UPDATE SKIP LOCKED"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Records a task the controller ran itself as one succeeded attempt.
pub async fn succeed_inline(
    conn: &mut PgConnection,
    id: Uuid,
    metrics: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE tasks SET state = 'succeeded', attempt = attempt + 1, metrics = $2, progress = 1,
             started_at = now(), finished_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(metrics)
    .execute(conn)
    .await?;
    Ok(())
}

/// The last training task (sft or preference) of a round: its model is the promotion candidate.
pub async fn last_training_task(
    conn: &mut PgConnection,
    round_id: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM tasks WHERE round_id = $1 AND kind IN ('sft', 'preference')
         ORDER BY stage_order DESC LIMIT 1",
    )
    .bind(round_id)
    .fetch_optional(conn)
    .await
}

/// Cancels a campaign's waiting tasks and flags its running ones, whose workers learn of it at
/// their next heartbeat. Returns the ids of the running tasks flagged.
/// Takes the running serve tasks of a campaign (of one round, if given) off their workers and
/// queues them with a fresh retry budget: their servers stop (the workers' next heartbeats are
/// told to abandon) and start again when the campaign runs. Returns `(id, attempt)` of each.
pub async fn requeue_serving(
    conn: &mut PgConnection,
    campaign_id: Uuid,
    round_id: Option<Uuid>,
) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE tasks SET state = 'queued', worker_id = NULL, lease_expires_at = NULL,
             attempt_base = attempt, queued_at = now(), next_run_at = now()
         WHERE round_id IN (SELECT id FROM rounds WHERE campaign_id = $1 AND ($2::uuid IS NULL OR id = $2))
           AND kind = 'serve' AND state = 'running'
         RETURNING id, attempt",
    )
    .bind(campaign_id)
    .bind(round_id)
    .fetch_all(conn)
    .await
}

pub async fn cancel_campaign(
    conn: &mut PgConnection,
    campaign_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query(
        "UPDATE tasks SET state = 'cancelled', finished_at = now()
         WHERE round_id IN (SELECT id FROM rounds WHERE campaign_id = $1) AND state IN ('blocked', 'queued')",
    )
    .bind(campaign_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar(
        "UPDATE tasks SET cancel_requested = true
         WHERE round_id IN (SELECT id FROM rounds WHERE campaign_id = $1) AND state = 'running'
         RETURNING id",
    )
    .bind(campaign_id)
    .fetch_all(conn)
    .await
}

/// Resets tasks to run again (a retried stage and its descendants): they become `blocked`, keep
/// their attempt counter (so old attempts stay fenced off) and get a fresh retry budget.
/// Running tasks are left alone. Returns the ids reset.
pub async fn reset(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE tasks SET state = 'blocked', cancel_requested = false, attempt_base = attempt,
             last_error = NULL, worker_id = NULL, lease_expires_at = NULL, progress = 0,
             progress_message = '', metrics = '{}', next_run_at = now(), started_at = NULL,
             finished_at = NULL
         WHERE id = ANY($1) AND state <> 'running'
         RETURNING id",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Queues those of `ids` that are blocked with every dependency succeeded (or, for a serve
/// dependency, ready).
pub async fn queue_ready(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE tasks t SET state = 'queued', queued_at = now(), next_run_at = now()
         WHERE t.id = ANY($1) AND t.state = 'blocked'
           AND NOT EXISTS (SELECT 1 FROM task_edges e JOIN tasks d ON d.id = e.depends_on
                           WHERE e.task_id = t.id AND d.state <> 'succeeded'
                             AND NOT (d.kind = 'serve' AND EXISTS (
                                 SELECT 1 FROM endpoints p WHERE p.task_id = d.id
                                 AND p.attempt = d.attempt AND p.state = 'ready')))
         RETURNING t.id",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Tasks of one stage of a round.
pub async fn ids_of_stage(
    conn: &mut PgConnection,
    round_id: Uuid,
    stage: &str,
) -> Result<Vec<(Uuid, TaskState)>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, state FROM tasks WHERE round_id = $1 AND stage = $2 ORDER BY shard_index",
    )
    .bind(round_id)
    .bind(stage)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(id, s)| {
            Ok((
                id,
                TaskState::try_from(s).map_err(|e| sqlx::Error::Decode(e.into()))?,
            ))
        })
        .collect()
}

pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Option<TaskRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM tasks WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Tasks per pool and state, for the queue-depth gauges: `(pool, state, backend, gpu_kind,
/// gpu_count, count)` over unfinished tasks.
pub async fn queue_depths(
    conn: &mut PgConnection,
) -> Result<Vec<(String, String, String, String, i32, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pool, state, backend, gpu_kind, gpu_count, count(*) FROM tasks
         WHERE state IN ('blocked', 'queued', 'running')
         GROUP BY pool, state, backend, gpu_kind, gpu_count",
    )
    .fetch_all(conn)
    .await
}
