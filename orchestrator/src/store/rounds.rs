//! `rounds`: one row per round of a campaign, with its generator and promotion decision.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

pub use flywheel_proto::state::{Decision, RoundStatus};

const COLUMNS: &str = "id, campaign_id, round_index, status, generator_id, trained_model_id,
    decision, decision_reason, metrics, started_at, finished_at";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RoundRow {
    pub id: Uuid,
    pub campaign_id: Uuid,
    pub round_index: i32,
    #[sqlx(try_from = "String")]
    pub status: RoundStatus,
    pub generator_id: Uuid,
    pub trained_model_id: Option<Uuid>,
    pub decision: Option<String>,
    pub decision_reason: Option<String>,
    pub metrics: Value,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    campaign_id: Uuid,
    round_index: i32,
    generator_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO rounds (id, campaign_id, round_index, status, generator_id)
         VALUES ($1, $2, $3, 'running', $4)",
    )
    .bind(id)
    .bind(campaign_id)
    .bind(round_index)
    .bind(generator_id)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn list(
    conn: &mut PgConnection,
    campaign_id: Uuid,
) -> Result<Vec<RoundRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rounds WHERE campaign_id = $1 ORDER BY round_index"
    )))
    .bind(campaign_id)
    .fetch_all(conn)
    .await
}

pub async fn find(
    conn: &mut PgConnection,
    campaign_id: Uuid,
    round_index: i32,
) -> Result<Option<RoundRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rounds WHERE campaign_id = $1 AND round_index = $2"
    )))
    .bind(campaign_id)
    .bind(round_index)
    .fetch_optional(conn)
    .await
}

/// Locks a round that is still running; `None` when it is gone or already settled.
pub async fn lock_running(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<RoundRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rounds WHERE id = $1 AND status = 'running' FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Running rounds of running campaigns whose every task succeeded.
pub async fn finished(conn: &mut PgConnection) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT r.id FROM rounds r JOIN campaigns c ON c.id = r.campaign_id
         WHERE r.status = 'running' AND c.status IN ('running', 'paused')
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.round_id = r.id AND t.state = 'running')
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.round_id = r.id
                           AND t.state NOT IN ('succeeded', 'running'))",
    )
    .fetch_all(conn)
    .await
}

/// Running rounds with a task that failed for good.
pub async fn with_failed_task(conn: &mut PgConnection) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT r.id FROM rounds r
         WHERE r.status = 'running'
           AND EXISTS (SELECT 1 FROM tasks t WHERE t.round_id = r.id AND t.state = 'failed')",
    )
    .fetch_all(conn)
    .await
}

pub async fn set_decision(
    conn: &mut PgConnection,
    id: Uuid,
    decision: Decision,
    reason: &str,
    trained_model_id: Option<Uuid>,
    metrics: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rounds SET decision = $2, decision_reason = $3, trained_model_id = $4, metrics = $5
         WHERE id = $1",
    )
    .bind(id)
    .bind(decision.as_str())
    .bind(reason)
    .bind(trained_model_id)
    .bind(metrics)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn finish(
    conn: &mut PgConnection,
    id: Uuid,
    status: RoundStatus,
    metrics: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE rounds SET status = $2, metrics = $3, finished_at = now() WHERE id = $1")
        .bind(id)
        .bind(status.as_str())
        .bind(metrics)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_status_for_campaign(
    conn: &mut PgConnection,
    campaign_id: Uuid,
    from: RoundStatus,
    to: RoundStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rounds SET status = $3, finished_at = CASE WHEN $3 = 'running' THEN NULL ELSE now() END
         WHERE campaign_id = $1 AND status = $2",
    )
    .bind(campaign_id)
    .bind(from.as_str())
    .bind(to.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn reopen(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rounds SET status = 'running', finished_at = NULL, decision = NULL,
         decision_reason = NULL, trained_model_id = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LatestMetricsRow {
    pub campaign_id: Uuid,
    pub round_index: i32,
    pub metrics: Value,
}

/// The latest settled round of each campaign active in the last week, with its metrics.
pub async fn latest_metrics(conn: &mut PgConnection) -> Result<Vec<LatestMetricsRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT DISTINCT ON (r.campaign_id) r.campaign_id, r.round_index, r.metrics
         FROM rounds r JOIN campaigns c ON c.id = r.campaign_id
         WHERE r.status = 'succeeded' AND c.updated_at > now() - interval '7 days'
         ORDER BY r.campaign_id, r.round_index DESC",
    )
    .fetch_all(conn)
    .await
}
