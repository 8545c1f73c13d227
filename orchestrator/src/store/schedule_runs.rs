//! `schedule_runs`: what happened to each scheduled time. Rows are only ever inserted.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScheduleRunRow {
    pub id: i64,
    pub schedule_id: Uuid,
    pub scheduled_for: DateTime<Utc>,
    pub outcome: String,
    pub campaign_id: Option<Uuid>,
    pub message: String,
    pub recorded_at: DateTime<Utc>,
}

pub struct NewRun {
    pub scheduled_for: DateTime<Utc>,
    pub outcome: &'static str,
    pub campaign_id: Option<Uuid>,
    pub message: String,
}

pub async fn insert(
    conn: &mut PgConnection,
    schedule_id: Uuid,
    run: &NewRun,
    recorded_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO schedule_runs (schedule_id, scheduled_for, outcome, campaign_id, message,
             recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(schedule_id)
    .bind(run.scheduled_for)
    .bind(run.outcome)
    .bind(run.campaign_id)
    .bind(&run.message)
    .bind(recorded_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// The most recent runs of a schedule, newest first.
pub async fn recent(
    conn: &mut PgConnection,
    schedule_id: Uuid,
    limit: i64,
) -> Result<Vec<ScheduleRunRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, schedule_id, scheduled_for, outcome, campaign_id, message, recorded_at
         FROM schedule_runs WHERE schedule_id = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(schedule_id)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Campaigns this schedule started that are still running or paused.
pub async fn active_campaigns(
    conn: &mut PgConnection,
    schedule_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT r.campaign_id FROM schedule_runs r JOIN campaigns c ON c.id = r.campaign_id
         WHERE r.schedule_id = $1 AND r.outcome = 'started' AND c.status IN ('running', 'paused')",
    )
    .bind(schedule_id)
    .fetch_all(conn)
    .await
}
