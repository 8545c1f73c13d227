//! `events`: the append-only event log. Rows are only ever inserted.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct NewEvent {
    pub campaign_id: Option<Uuid>,
    pub task_id: Option<Uuid>,
    pub kind: &'static str,
    pub message: String,
    pub actor: String,
    pub data: Value,
}

#[derive(Debug, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub campaign_id: Option<Uuid>,
    pub task_id: Option<Uuid>,
    pub kind: String,
    pub message: String,
    pub actor: String,
    pub data: Value,
    pub created_at: DateTime<Utc>,
}

pub async fn insert_many(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let campaign: Vec<_> = events.iter().map(|e| e.campaign_id).collect();
    let task: Vec<_> = events.iter().map(|e| e.task_id).collect();
    let kind: Vec<_> = events.iter().map(|e| e.kind).collect();
    let message: Vec<_> = events.iter().map(|e| e.message.as_str()).collect();
    let actor: Vec<_> = events.iter().map(|e| e.actor.as_str()).collect();
    let data: Vec<_> = events.iter().map(|e| e.data.clone()).collect();
    sqlx::query(
        "INSERT INTO events (campaign_id, task_id, kind, message, actor, data)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[])",
    )
    .bind(campaign)
    .bind(task)
    .bind(kind)
    .bind(message)
    .bind(actor)
    .bind(data)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn insert(conn: &mut PgConnection, event: NewEvent) -> Result<(), sqlx::Error> {
    insert_many(conn, std::slice::from_ref(&event)).await
}

pub async fn list_after(
    conn: &mut PgConnection,
    campaign_id: Uuid,
    after_id: i64,
    limit: i64,
) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, campaign_id, task_id, kind, message, actor, data, created_at
         FROM events WHERE campaign_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(campaign_id)
    .bind(after_id)
    .bind(limit)
    .fetch_all(conn)
    .await
}
