//! `schedules`: cron schedules with their template, overlap policy and next firing time.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

const COLUMNS: &str = "id, name, cron, time_zone, template_yaml, params, mode, rounds_per_fire,
    overlap, catch_up_window_s, status, next_fire_at, buffered_for, target_campaign_id,
    created_by, created_at, updated_at";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: Uuid,
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    pub template_yaml: String,
    pub params: Value,
    pub mode: String,
    pub rounds_per_fire: i32,
    pub overlap: String,
    pub catch_up_window_s: i32,
    pub status: String,
    pub next_fire_at: DateTime<Utc>,
    pub buffered_for: Option<DateTime<Utc>>,
    pub target_campaign_id: Option<Uuid>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewSchedule<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub cron: &'a str,
    pub time_zone: &'a str,
    pub template_yaml: &'a str,
    pub params: Value,
    pub mode: &'a str,
    pub rounds_per_fire: i32,
    pub overlap: &'a str,
    pub catch_up_window_s: i32,
    pub next_fire_at: DateTime<Utc>,
    pub created_by: &'a str,
}

/// Inserts a schedule; `Ok(false)` when the name is taken.
pub async fn insert(conn: &mut PgConnection, s: NewSchedule<'_>) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO schedules (id, name, cron, time_zone, template_yaml, params, mode,
             rounds_per_fire, overlap, catch_up_window_s, status, next_fire_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'active', $11, $12)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(s.id)
    .bind(s.name)
    .bind(s.cron)
    .bind(s.time_zone)
    .bind(s.template_yaml)
    .bind(s.params)
    .bind(s.mode)
    .bind(s.rounds_per_fire)
    .bind(s.overlap)
    .bind(s.catch_up_window_s)
    .bind(s.next_fire_at)
    .bind(s.created_by)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules ORDER BY name"
    )))
    .fetch_all(conn)
    .await
}

/// A schedule by id or by name.
pub async fn find(conn: &mut PgConnection, key: &str) -> Result<Option<ScheduleRow>, sqlx::Error> {
    let id = Uuid::parse_str(key).ok();
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules WHERE id = $1 OR name = $2"
    )))
    .bind(id)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Active schedules with a firing due at `now` or a buffered firing waiting.
pub async fn due(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM schedules
         WHERE status = 'active' AND (next_fire_at <= $1 OR buffered_for IS NOT NULL)
         ORDER BY next_fire_at",
    )
    .bind(now)
    .fetch_all(conn)
    .await
}

/// When the next active schedule fires.
pub async fn next_fire_at(conn: &mut PgConnection) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(next_fire_at) FROM schedules WHERE status = 'active'")
        .fetch_one(conn)
        .await
}

/// Locks a schedule for this transaction, or `None` if another controller holds it (it is
/// firing it now) or it no longer exists.
pub async fn lock_skip_locked(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules WHERE id = $1 FOR UPDATE SKIP LOCKED"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Locks a schedule by id or name, waiting for a controller that is firing it.
pub async fn lock(conn: &mut PgConnection, key: &str) -> Result<Option<ScheduleRow>, sqlx::Error> {
    let id = Uuid::parse_str(key).ok();
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM schedules WHERE id = $1 OR name = $2 FOR UPDATE"
    )))
    .bind(id)
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// Stores the firing state after a schedule was handled.
pub async fn set_firing_state(
    conn: &mut PgConnection,
    id: Uuid,
    next_fire_at: DateTime<Utc>,
    buffered_for: Option<DateTime<Utc>>,
    target_campaign_id: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE schedules SET next_fire_at = $2, buffered_for = $3, target_campaign_id = $4,
         updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(next_fire_at)
    .bind(buffered_for)
    .bind(target_campaign_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Pauses or resumes; resuming sets the next firing, pausing drops a buffered one.
pub async fn set_status(
    conn: &mut PgConnection,
    id: Uuid,
    status: &str,
    next_fire_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE schedules SET status = $2, next_fire_at = $3, buffered_for = NULL,
         updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(next_fire_at)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn delete(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM schedules WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}
