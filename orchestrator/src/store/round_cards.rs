//! `round_cards`: the data card and model card of each finished round (markdown).

use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CardRow {
    pub kind: String,
    pub markdown: String,
    pub content_hash: String,
}

/// Stores a round's card; a card already written for the round and kind is kept.
pub async fn insert(
    conn: &mut PgConnection,
    round_id: Uuid,
    kind: &str,
    markdown: &str,
    content_hash: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO round_cards (round_id, kind, markdown, content_hash)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(round_id)
    .bind(kind)
    .bind(markdown)
    .bind(content_hash)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn list_for_round(
    conn: &mut PgConnection,
    round_id: Uuid,
) -> Result<Vec<CardRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT kind, markdown, content_hash FROM round_cards WHERE round_id = $1 ORDER BY kind",
    )
    .bind(round_id)
    .fetch_all(conn)
    .await
}
