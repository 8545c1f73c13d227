//! `endpoints`: the inference servers serve tasks run. Only the current attempt's `ready` row
//! releases consumers and is handed to them.

use sqlx::PgConnection;
use uuid::Uuid;

/// A serve task's report that its server answers.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub task_id: Uuid,
    pub attempt: i32,
    pub url: String,
    pub served_name: String,
    pub model_id: Option<Uuid>,
    pub content_hash: String,
}

/// A ready endpoint as one consumer sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConsumerEndpointRow {
    pub consumer_id: Uuid,
    pub stage: String,
    pub url: String,
    pub served_name: String,
    pub model_id: Option<Uuid>,
    pub content_hash: String,
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct EndpointRow {
    pub task_id: Uuid,
    pub attempt: i32,
    pub round_index: i32,
    pub stage: String,
    pub url: String,
    pub served_name: String,
    pub model_id: Option<Uuid>,
    pub content_hash: String,
    pub state: String,
    pub ready_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Records endpoints of serve attempts that are still current and running; returns
/// `(task, campaign, stage)` of those whose endpoint became ready by this call (a repeated
/// report changes nothing).
pub async fn ready(
    conn: &mut PgConnection,
    new: &[&NewEndpoint],
) -> Result<Vec<(Uuid, Uuid, String)>, sqlx::Error> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let id: Vec<_> = new.iter().map(|e| e.task_id).collect();
    let attempt: Vec<_> = new.iter().map(|e| e.attempt).collect();
    let url: Vec<_> = new.iter().map(|e| e.url.as_str()).collect();
    let name: Vec<_> = new.iter().map(|e| e.served_name.as_str()).collect();
    let model: Vec<_> = new.iter().map(|e| e.model_id).collect();
    let hash: Vec<_> = new.iter().map(|e| e.content_hash.as_str()).collect();
    sqlx::query_as(
        "INSERT INTO endpoints (task_id, attempt, campaign_id, stage, url, served_name, model_id,
                                content_hash, state)
         SELECT t.id, t.attempt, t.campaign_id, t.stage, u.url, u.name,
                (SELECT a.id FROM artifacts a WHERE a.id = u.model), u.hash, 'ready'
         FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::uuid[], $6::text[])
              AS u(id, a, url, name, model, hash)
         JOIN tasks t ON t.id = u.id AND t.attempt = u.a AND t.state = 'running' AND t.kind = 'serve'
         ON CONFLICT (task_id, attempt) DO NOTHING
         RETURNING task_id, campaign_id, stage",
    )
    .bind(id)
    .bind(attempt)
    .bind(url)
    .bind(name)
    .bind(model)
    .bind(hash)
    .fetch_all(conn)
    .await
}

/// Closes the ready endpoints of these tasks: `stopped` (the serve task succeeded) or `gone`.
/// Queued consumers of a gone endpoint go back to `blocked` until a new one is ready.
pub async fn retire(
    conn: &mut PgConnection,
    task_ids: &[Uuid],
    stopped: bool,
) -> Result<Vec<Uuid>, sqlx::Error> {
    if task_ids.is_empty() {
        return Ok(Vec::new());
    }
    let retired: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE endpoints SET state = $2, finished_at = now()
         WHERE task_id = ANY($1) AND state = 'ready'
         RETURNING task_id",
    )
    .bind(task_ids)
    .bind(if stopped { "stopped" } else { "gone" })
    .fetch_all(&mut *conn)
    .await?;
    if !stopped && !retired.is_empty() {
        sqlx::query(
            "UPDATE tasks t SET state = 'blocked'
             WHERE t.state = 'queued'
               AND t.id IN (SELECT task_id FROM task_edges WHERE depends_on = ANY($1))",
        )
        .bind(&retired)
        .execute(conn)
        .await?;
    }
    Ok(retired)
}

/// The ready endpoints of the serve tasks each of `consumers` depends on.
pub async fn for_consumers(
    conn: &mut PgConnection,
    consumers: &[Uuid],
) -> Result<Vec<ConsumerEndpointRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.task_id AS consumer_id, d.stage, p.url, p.served_name, p.model_id, p.content_hash
         FROM task_edges e
         JOIN tasks d ON d.id = e.depends_on AND d.kind = 'serve'
         JOIN endpoints p ON p.task_id = d.id AND p.attempt = d.attempt AND p.state = 'ready'
         WHERE e.task_id = ANY($1)",
    )
    .bind(consumers)
    .fetch_all(conn)
    .await
}

/// Every endpoint a campaign's serve tasks reported, oldest first.
pub async fn list(
    conn: &mut PgConnection,
    campaign_id: Uuid,
) -> Result<Vec<EndpointRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.task_id, p.attempt, t.round_index, p.stage, p.url, p.served_name, p.model_id,
                p.content_hash, p.state, p.ready_at, p.finished_at
         FROM endpoints p JOIN tasks t ON t.id = p.task_id
         WHERE p.campaign_id = $1 ORDER BY p.ready_at",
    )
    .bind(campaign_id)
    .fetch_all(conn)
    .await
}
