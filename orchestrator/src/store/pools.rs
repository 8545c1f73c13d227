//! `pools`: the named worker pools, created the first time a worker registers with one.

use sqlx::PgConnection;

/// Creates the pool if it is new and fewer than `max` pools exist. Returns whether the pool
/// exists afterwards.
pub async fn ensure(conn: &mut PgConnection, name: &str, max: i64) -> Result<bool, sqlx::Error> {
    sqlx::query(
        "INSERT INTO pools (name) SELECT $1 WHERE (SELECT count(*) FROM pools) < $2
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(max)
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pools WHERE name = $1)")
        .bind(name)
        .fetch_one(conn)
        .await
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM pools ORDER BY name")
        .fetch_all(conn)
        .await
}
