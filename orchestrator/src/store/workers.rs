//! `workers`: registered worker processes, their capabilities and liveness.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRow {
    pub id: Uuid,
    pub name: String,
    pub pool: String,
    pub backends: Vec<String>,
    pub gpu_kind: String,
    pub gpu_count: i32,
    pub labels: Value,
    pub slots: i32,
    pub status: String,
    /// Seconds since the last heartbeat, computed by the database clock.
    pub heartbeat_age_s: f64,
    pub current_tasks: Vec<Uuid>,
}

pub struct NewWorker<'a> {
    pub id: Uuid,
    /// The token registering the worker.
    pub token_id: Uuid,
    pub name: &'a str,
    pub pool: &'a str,
    pub backends: &'a [String],
    pub gpu_kind: &'a str,
    pub gpu_count: i32,
    pub labels: Value,
    pub slots: i32,
    /// The controller process whose stream the worker opens.
    pub controller_id: Uuid,
}

/// Registers a worker, or updates its registration if the same token made it. Returns false
/// (and changes nothing) when the id is registered by another token.
pub async fn upsert(conn: &mut PgConnection, w: NewWorker<'_>) -> Result<bool, sqlx::Error> {
    let row: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO workers (id, name, pool, backends, gpu_kind, gpu_count, labels, slots, status,
                              token_id, controller_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'online', $9, $10)
         ON CONFLICT (id) DO UPDATE SET name = $2, pool = $3, backends = $4, gpu_kind = $5,
             gpu_count = $6, labels = $7, slots = $8, status = 'online', last_heartbeat_at = now(),
             token_id = $9, controller_id = $10
         WHERE workers.token_id = $9 OR workers.token_id IS NULL
         RETURNING id",
    )
    .bind(w.id)
    .bind(w.name)
    .bind(w.pool)
    .bind(w.backends)
    .bind(w.gpu_kind)
    .bind(w.gpu_count)
    .bind(w.labels)
    .bind(w.slots)
    .bind(w.token_id)
    .bind(w.controller_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.is_some())
}

/// The token a worker registered with: `None` if no such worker, `Some(None)` for a
/// registration older than token binding.
pub async fn owner(conn: &mut PgConnection, id: Uuid) -> Result<Option<Option<Uuid>>, sqlx::Error> {
    sqlx::query_scalar("SELECT token_id FROM workers WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

pub async fn set_status(
    conn: &mut PgConnection,
    id: Uuid,
    status: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE workers SET status = $2 WHERE id = $1")
        .bind(id)
        .bind(status)
        .execute(conn)
        .await?;
    Ok(())
}

/// Every worker, as the database knows it: `online` while its stream is open to a controller
/// that was alive within `stale_after_ms` (its heartbeats are kept in that controller's memory:
/// the age shown is that controller's last sign of life; the API shows this controller's own
/// workers from memory).
pub async fn list(
    conn: &mut PgConnection,
    stale_after_ms: i64,
) -> Result<Vec<WorkerRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT w.id, w.name, w.pool, w.backends, w.gpu_kind, w.gpu_count, w.labels, w.slots,
                CASE WHEN w.status = 'online' AND c.last_seen_at > now() - make_interval(secs => $1::float8 / 1000)
                     THEN 'online' ELSE 'offline' END AS status,
                extract(epoch FROM now() - coalesce(c.last_seen_at, w.last_heartbeat_at))::float8 AS heartbeat_age_s,
                coalesce(array_agg(t.id) FILTER (WHERE t.id IS NOT NULL), '{}') AS current_tasks
         FROM workers w
         LEFT JOIN controllers c ON c.id = w.controller_id
         LEFT JOIN tasks t ON t.worker_id = w.id AND t.state = 'running'
         GROUP BY w.id, c.last_seen_at ORDER BY w.pool, w.name",
    )
    .bind(stale_after_ms as f64)
    .fetch_all(conn)
    .await
}
