//! `api_tokens`: hashes of bearer tokens and their scopes. Tokens themselves are never stored.

use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, sqlx::FromRow)]
pub struct TokenRow {
    pub name: String,
    pub scope: String,
}

pub async fn insert(
    conn: &mut PgConnection,
    name: &str,
    scope: &str,
    token_hash: &str,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO api_tokens (id, name, scope, token_hash) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(name)
        .bind(scope)
        .bind(token_hash)
        .execute(conn)
        .await?;
    Ok(id)
}

pub async fn find(
    conn: &mut PgConnection,
    token_hash: &str,
) -> Result<Option<TokenRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, scope FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(conn)
    .await
}
