//! `workers`: registered worker processes, their capabilities and liveness.

use chrono::{DateTime, Utc};
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
    pub last_heartbeat_at: DateTime<Utc>,
    /// Seconds since the last heartbeat, computed by the database clock.
    pub heartbeat_age_s: f64,
    pub current_tasks: Vec<Uuid>,
}

pub struct NewWorker<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub pool: &'a str,
    pub backends: &'a [String],
    pub gpu_kind: &'a str,
    pub gpu_count: i32,
    pub labels: Value,
    pub slots: i32,
}

pub async fn upsert(conn: &mut PgConnection, w: NewWorker<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO workers (id, name, pool, backends, gpu_kind, gpu_count, labels, slots, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'online')
         ON CONFLICT (id) DO UPDATE SET name = $2, pool = $3, backends = $4, gpu_kind = $5,
             gpu_count = $6, labels = $7, slots = $8, status = 'online', last_heartbeat_at = now()",
    )
    .bind(w.id)
    .bind(w.name)
    .bind(w.pool)
    .bind(w.backends)
    .bind(w.gpu_kind)
    .bind(w.gpu_count)
    .bind(w.labels)
    .bind(w.slots)
    .execute(conn)
    .await?;
    Ok(())
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

pub async fn touch(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE workers SET last_heartbeat_at = now(), status = 'online' WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<WorkerRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT w.id, w.name, w.pool, w.backends, w.gpu_kind, w.gpu_count, w.labels, w.slots,
                w.status, w.last_heartbeat_at,
                extract(epoch FROM now() - w.last_heartbeat_at)::float8 AS heartbeat_age_s,
                coalesce(array_agg(t.id) FILTER (WHERE t.id IS NOT NULL), '{}') AS current_tasks
         FROM workers w LEFT JOIN tasks t ON t.worker_id = w.id AND t.state = 'running'
         GROUP BY w.id ORDER BY w.pool, w.name",
    )
    .fetch_all(conn)
    .await
}
