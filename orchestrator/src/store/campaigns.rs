//! `campaigns`: one row per campaign with its spec, status and current generator.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

pub use flywheel_proto::state::CampaignStatus;

const COLUMNS: &str = "c.id, c.name, c.spec_yaml, c.spec, c.status, c.rounds_total, c.current_round,
    c.current_generator_id, c.base_model_id, c.reward_model_id, c.created_by, c.created_at, c.updated_at,
    g.uri AS current_generator_uri";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CampaignRow {
    pub id: Uuid,
    pub name: String,
    pub spec_yaml: String,
    pub spec: Value,
    #[sqlx(try_from = "String")]
    pub status: CampaignStatus,
    pub rounds_total: i32,
    pub current_round: i32,
    pub current_generator_id: Option<Uuid>,
    pub base_model_id: Option<Uuid>,
    pub reward_model_id: Option<Uuid>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub current_generator_uri: Option<String>,
}

pub struct NewCampaign<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub spec_yaml: &'a str,
    pub spec: Value,
    pub rounds_total: i32,
    pub created_by: &'a str,
}

pub async fn insert(conn: &mut PgConnection, c: NewCampaign<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO campaigns (id, name, spec_yaml, spec, status, rounds_total, created_by)
         VALUES ($1, $2, $3, $4, 'running', $5, $6)",
    )
    .bind(c.id)
    .bind(c.name)
    .bind(c.spec_yaml)
    .bind(c.spec)
    .bind(c.rounds_total)
    .bind(c.created_by)
    .execute(conn)
    .await?;
    Ok(())
}

/// The campaign created by a request id, if any.
pub async fn by_request_id(
    conn: &mut PgConnection,
    request_id: &str,
) -> Result<Option<CampaignRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM campaigns c LEFT JOIN artifacts g ON g.id = c.current_generator_id
         WHERE c.request_id = $1"
    )))
    .bind(request_id)
    .fetch_optional(conn)
    .await
}

pub async fn set_request_id(
    conn: &mut PgConnection,
    id: Uuid,
    request_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE campaigns SET request_id = $2 WHERE id = $1")
        .bind(id)
        .bind(request_id)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_models(
    conn: &mut PgConnection,
    id: Uuid,
    generator: Uuid,
    base: Uuid,
    reward: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE campaigns SET current_generator_id = $2, base_model_id = $3, reward_model_id = $4,
         updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(generator)
    .bind(base)
    .bind(reward)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Option<CampaignRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM campaigns c LEFT JOIN artifacts g ON g.id = c.current_generator_id
         WHERE c.id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Locks the campaign row for the rest of the transaction.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Option<CampaignRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM campaigns c LEFT JOIN artifacts g ON g.id = c.current_generator_id
         WHERE c.id = $1 FOR UPDATE OF c"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Serializes settling within these campaigns until the transaction ends: a transaction that
/// decides from other tasks' states (is the stage done, may a dependent run, does a retry wait
/// for an endpoint) holds this first, so it sees every concurrent settlement that held it
/// before. Transaction-scoped advisory locks, taken in one order (no deadlock between takers).
pub async fn lock_settling(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT pg_advisory_xact_lock(1718384999, k)
         FROM (SELECT DISTINCT hashtext(id::text) AS k FROM unnest($1::uuid[]) AS id) AS keys
         ORDER BY k",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<CampaignRow>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM campaigns c LEFT JOIN artifacts g ON g.id = c.current_generator_id
         ORDER BY c.created_at DESC"
    )))
    .fetch_all(conn)
    .await
}

pub async fn set_status(
    conn: &mut PgConnection,
    id: Uuid,
    status: CampaignStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE campaigns SET status = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(status.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn advance(
    conn: &mut PgConnection,
    id: Uuid,
    current_round: i32,
    generator: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE campaigns SET current_round = $2, current_generator_id = $3, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(current_round)
    .bind(generator)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn set_rounds_total(
    conn: &mut PgConnection,
    id: Uuid,
    rounds_total: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE campaigns SET rounds_total = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(rounds_total)
        .execute(conn)
        .await?;
    Ok(())
}

/// Replaces the effective spec (the submitted `spec_yaml` is kept as it was).
pub async fn set_spec(conn: &mut PgConnection, id: Uuid, spec: Value) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE campaigns SET spec = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(spec)
        .execute(conn)
        .await?;
    Ok(())
}

/// `(status, count)` over all campaigns.
pub async fn status_counts(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT status, count(*) FROM campaigns GROUP BY status")
        .fetch_all(conn)
        .await
}
