//! `attempts`: one row per claim of a task, with how it ended. The history behind `tasks.attempt`.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

pub use flywheel_proto::state::AttemptState;

/// Closes running attempts: `(task, attempt, state, error)`.
pub async fn finish_many(
    conn: &mut PgConnection,
    finished: &[(Uuid, i32, AttemptState, Option<&str>)],
) -> Result<(), sqlx::Error> {
    if finished.is_empty() {
        return Ok(());
    }
    let task: Vec<_> = finished.iter().map(|f| f.0).collect();
    let attempt: Vec<_> = finished.iter().map(|f| f.1).collect();
    let state: Vec<_> = finished.iter().map(|f| f.2.as_str()).collect();
    let error: Vec<_> = finished.iter().map(|f| f.3).collect();
    sqlx::query(
        "UPDATE attempts a SET state = u.s, error = u.e, finished_at = now()
         FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[]) AS u(t, n, s, e)
         WHERE a.task_id = u.t AND a.attempt = u.n AND a.state = 'running'",
    )
    .bind(task)
    .bind(attempt)
    .bind(state)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records the cluster job each running attempt reported: `(task, attempt, job)`.
pub async fn set_external_jobs(
    conn: &mut PgConnection,
    jobs: &[(Uuid, i32, &str)],
) -> Result<(), sqlx::Error> {
    if jobs.is_empty() {
        return Ok(());
    }
    let task: Vec<_> = jobs.iter().map(|j| j.0).collect();
    let attempt: Vec<_> = jobs.iter().map(|j| j.1).collect();
    let job: Vec<_> = jobs.iter().map(|j| j.2).collect();
    sqlx::query(
        "UPDATE attempts a SET external_job = u.j
         FROM unnest($1::uuid[], $2::int[], $3::text[]) AS u(t, n, j)
         WHERE a.task_id = u.t AND a.attempt = u.n AND a.state = 'running'
           AND a.external_job IS DISTINCT FROM u.j",
    )
    .bind(task)
    .bind(attempt)
    .bind(job)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub attempt: i32,
    pub worker_id: Uuid,
    #[sqlx(try_from = "String")]
    pub state: AttemptState,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub external_job: Option<String>,
}

pub async fn list_for_task(
    conn: &mut PgConnection,
    task_id: Uuid,
) -> Result<Vec<AttemptRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT attempt, worker_id, state, error, started_at, finished_at, external_job FROM attempts
         WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(task_id)
    .fetch_all(conn)
    .await
}

/// What a round's attempts cost: slot-seconds on workers, and GPU-seconds (each attempt's
/// duration × its worker's GPUs per slot). Running attempts count up to now; `None` for GPU
/// seconds when no attempt ran on a worker that declares GPUs. The round's attempts are probed
/// by key: a join let the planner scan every attempt ever made.
pub async fn usage_for_round(
    conn: &mut PgConnection,
    round_id: Uuid,
) -> Result<(f64, Option<f64>), sqlx::Error> {
    sqlx::query_as(
        "SELECT COALESCE(sum(d.seconds), 0)::float8,
                sum(d.seconds * w.gpu_count / GREATEST(w.slots, 1)) FILTER (WHERE w.gpu_count > 0)::float8
         FROM (SELECT a.worker_id,
                      EXTRACT(EPOCH FROM COALESCE(a.finished_at, now()) - a.started_at)::float8 AS seconds
               FROM attempts a
               WHERE a.task_id = ANY(ARRAY(SELECT id FROM tasks WHERE round_id = $1))) d
         LEFT JOIN workers w ON w.id = d.worker_id",
    )
    .bind(round_id)
    .fetch_one(conn)
    .await
}
