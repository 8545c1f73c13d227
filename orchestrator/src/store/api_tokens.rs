//! `api_tokens`: hashes of bearer tokens and their scopes. Tokens themselves are never stored.

use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, sqlx::FromRow)]
pub struct TokenRow {
    pub id: Uuid,
    pub name: String,
    pub scope: String,
}

/// A token as `flywheel token list` shows it (never the token itself).
#[derive(Debug, sqlx::FromRow)]
pub struct TokenListRow {
    pub id: Uuid,
    pub name: String,
    pub scope: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
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
        "SELECT id, name, scope FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(conn)
    .await
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<TokenListRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, scope, created_at, revoked_at FROM api_tokens ORDER BY created_at, name",
    )
    .fetch_all(conn)
    .await
}

/// Revokes the unrevoked tokens whose id or name is `which`; returns their ids.
pub async fn revoke(conn: &mut PgConnection, which: &str) -> Result<Vec<Uuid>, sqlx::Error> {
    let id = Uuid::parse_str(which).ok();
    sqlx::query_scalar(
        "UPDATE api_tokens SET revoked_at = now()
         WHERE revoked_at IS NULL AND (id = $1 OR name = $2) RETURNING id",
    )
    .bind(id)
    .bind(which)
    .fetch_all(conn)
    .await
}
