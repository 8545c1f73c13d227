//! `artifacts` and `artifact_parents`: references to datasets and models in the artifact store,
//! with their lineage. Content lives behind `uri`; only references and hashes are stored here.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArtifactRow {
    pub id: Uuid,
    pub campaign_id: Option<Uuid>,
    pub round_index: Option<i32>,
    pub kind: String,
    pub name: String,
    pub uri: String,
    pub content_hash: String,
    pub config_hash: String,
    pub producer_task_id: Option<Uuid>,
    pub producer_stage: Option<String>,
    pub parent_ids: Vec<Uuid>,
    pub generator_id: Option<Uuid>,
    pub judge_id: Option<Uuid>,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

/// An input handed to a task: an artifact and the role the task uses it in.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InputRow {
    /// The task it is for ([`inputs_for`]), or the round whose every task gets it
    /// ([`round_inputs`]).
    pub owner: Uuid,
    pub id: Uuid,
    pub role: String,
    pub kind: String,
    pub uri: String,
    pub content_hash: String,
    pub name: String,
}

/// An output reported by a worker for an accepted completion.
#[derive(Debug, Clone)]
pub struct NewOutput {
    pub task_id: Uuid,
    pub attempt: i32,
    pub kind: String,
    pub name: String,
    pub uri: String,
    pub content_hash: String,
    pub metadata: Value,
}

/// Registers a model or dataset that exists outside Flywheel (a campaign's starting models).
pub async fn insert_external(
    conn: &mut PgConnection,
    campaign_id: Uuid,
    kind: &str,
    name: &str,
    uri: &str,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO artifacts (id, campaign_id, kind, name, uri) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(campaign_id)
    .bind(kind)
    .bind(name)
    .bind(uri)
    .execute(conn)
    .await?;
    Ok(id)
}

/// Inserts task outputs with their lineage: producer, config hash, generator and judge of the
/// round, and as parents every artifact the task consumed (its dependencies' outputs and, for
/// training stages, the base model). Returns the new ids.
pub async fn insert_outputs(
    conn: &mut PgConnection,
    outputs: &[NewOutput],
) -> Result<Vec<Uuid>, sqlx::Error> {
    if outputs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = outputs.iter().map(|_| Uuid::new_v4()).collect();
    let task: Vec<_> = outputs.iter().map(|o| o.task_id).collect();
    let attempt: Vec<_> = outputs.iter().map(|o| o.attempt).collect();
    let kind: Vec<_> = outputs.iter().map(|o| o.kind.as_str()).collect();
    let name: Vec<_> = outputs.iter().map(|o| o.name.as_str()).collect();
    let uri: Vec<_> = outputs.iter().map(|o| o.uri.as_str()).collect();
    let hash: Vec<_> = outputs.iter().map(|o| o.content_hash.as_str()).collect();
    let meta: Vec<_> = outputs.iter().map(|o| o.metadata.clone()).collect();
    sqlx::query(
        "INSERT INTO artifacts (id, campaign_id, round_index, kind, name, uri, content_hash,
             config_hash, producer_task_id, producer_attempt, generator_id, judge_id, metadata)
         SELECT u.id, t.campaign_id, t.round_index, u.kind, u.name, u.uri, u.hash, t.config_hash,
                t.id, u.attempt, COALESCE(g.id, r.generator_id), c.reward_model_id, u.meta
         FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[], $7::text[], $8::jsonb[])
              AS u(id, task, attempt, kind, name, uri, hash, meta)
         JOIN tasks t ON t.id = u.task
         JOIN rounds r ON r.id = t.round_id
         JOIN campaigns c ON c.id = t.campaign_id
         -- Whose samples the output holds where that is not the round's generator: the trained
         -- model an on-policy generate task (`policy: model`) sampled, or, for a dataset, the
         -- generator the datasets it was made from name.
         LEFT JOIN LATERAL (
             SELECT CASE WHEN p.kind = 'model' THEN p.id ELSE p.generator_id END AS id
             FROM task_edges e
             JOIN tasks d ON d.id = e.depends_on
             JOIN artifacts p ON p.producer_task_id = d.id AND p.producer_attempt = d.attempt
             WHERE e.task_id = t.id
               AND ((t.kind = 'generate' AND t.params->>'policy' = 'model'
                     AND d.kind IN ('sft', 'preference') AND p.name = 'model')
                    OR (u.kind = 'dataset' AND p.kind = 'dataset'
                        AND p.generator_id IS DISTINCT FROM r.generator_id))
             LIMIT 1
         ) g ON true",
    )
    .bind(&ids)
    .bind(task)
    .bind(attempt)
    .bind(kind)
    .bind(name)
    .bind(uri)
    .bind(hash)
    .bind(meta)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO artifact_parents (artifact_id, parent_id)
         SELECT a.id, p.id FROM artifacts a
         JOIN task_edges e ON e.task_id = a.producer_task_id
         JOIN tasks d ON d.id = e.depends_on
         JOIN artifacts p ON p.producer_task_id = d.id AND p.producer_attempt = d.attempt
         WHERE a.id = ANY($1)
         UNION
         SELECT a.id, c.base_model_id FROM artifacts a
         JOIN tasks t ON t.id = a.producer_task_id
         JOIN campaigns c ON c.id = t.campaign_id
         WHERE a.id = ANY($1) AND t.kind = 'sft' AND c.base_model_id IS NOT NULL
         UNION
         SELECT a.id, r.generator_id FROM artifacts a
         JOIN tasks t ON t.id = a.producer_task_id
         JOIN rounds r ON r.id = t.round_id
         WHERE a.id = ANY($1) AND t.kind = 'preference' AND t.params->>'reference' = 'generator'
         ON CONFLICT DO NOTHING",
    )
    .bind(&ids)
    .execute(conn)
    .await?;
    Ok(ids)
}

/// The models every task of these rounds is handed, once per round.
pub async fn round_inputs(
    conn: &mut PgConnection,
    round_ids: &[Uuid],
) -> Result<Vec<InputRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id AS owner, a.id, m.role, a.kind, a.uri, a.content_hash, a.name
         FROM rounds r
         JOIN campaigns c ON c.id = r.campaign_id
         CROSS JOIN LATERAL (VALUES (1, 'generator', r.generator_id), (2, 'base', c.base_model_id),
                                    (3, 'reward', c.reward_model_id)) AS m(n, role, artifact_id)
         JOIN artifacts a ON a.id = m.artifact_id
         WHERE r.id = ANY($1)
         ORDER BY r.id, m.n",
    )
    .bind(round_ids)
    .fetch_all(conn)
    .await
}

/// Inputs of each task besides its round's models ([`round_inputs`]): the current outputs of
/// the tasks it depends on (role = output name) and, for a `synthesize_prompts` task, the
/// prompts every earlier round's `synthesize_prompts` tasks wrote (role `earlier_prompts`, for
/// dedup across rounds).
pub async fn inputs_for(
    conn: &mut PgConnection,
    task_ids: &[Uuid],
) -> Result<Vec<InputRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.task_id AS owner, a.id, a.name AS role, a.kind, a.uri, a.content_hash, a.name
         FROM unnest($1::uuid[]) AS q(id)
         JOIN task_edges e ON e.task_id = q.id
         JOIN tasks d ON d.id = e.depends_on
         JOIN artifacts a ON a.producer_task_id = d.id AND a.producer_attempt = d.attempt
         UNION ALL
         SELECT t.id, a.id, 'earlier_prompts', a.kind, a.uri, a.content_hash, a.name
         FROM tasks t
         JOIN rounds r ON r.id = t.round_id
         JOIN rounds er ON er.campaign_id = r.campaign_id AND er.round_index < r.round_index
         JOIN tasks et ON et.round_id = er.id AND et.kind = 'synthesize_prompts'
                      AND et.state = 'succeeded'
         JOIN artifacts a ON a.producer_task_id = et.id AND a.producer_attempt = et.attempt
                         AND a.name = 'prompts'
         WHERE t.id = ANY($1) AND t.kind = 'synthesize_prompts'",
    )
    .bind(task_ids)
    .fetch_all(conn)
    .await
}

/// The current `model` output of the given task, if it has succeeded.
pub async fn model_of_task(
    conn: &mut PgConnection,
    task_id: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT a.id FROM artifacts a JOIN tasks t ON t.id = a.producer_task_id
         WHERE t.id = $1 AND a.producer_attempt = t.attempt AND a.kind = 'model'
         ORDER BY a.created_at DESC LIMIT 1",
    )
    .bind(task_id)
    .fetch_optional(conn)
    .await
}

pub async fn list(
    conn: &mut PgConnection,
    campaign_id: Uuid,
    kind: Option<&str>,
) -> Result<Vec<ArtifactRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.id, a.campaign_id, a.round_index, a.kind, a.name, a.uri, a.content_hash,
                a.config_hash, a.producer_task_id, t.stage AS producer_stage,
                coalesce(array_agg(p.parent_id) FILTER (WHERE p.parent_id IS NOT NULL), '{}') AS parent_ids,
                a.generator_id, a.judge_id, a.metadata, a.created_at
         FROM artifacts a
         LEFT JOIN tasks t ON t.id = a.producer_task_id
         LEFT JOIN artifact_parents p ON p.artifact_id = a.id
         WHERE a.campaign_id = $1 AND ($2::text IS NULL OR a.kind = $2)
         GROUP BY a.id, t.stage
         ORDER BY a.created_at, a.name",
    )
    .bind(campaign_id)
    .bind(kind)
    .fetch_all(conn)
    .await
}
