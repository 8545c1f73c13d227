//! `pools`: the named worker pools, created the first time a worker registers with one.

use sqlx::PgConnection;

pub async fn ensure(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO pools (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM pools ORDER BY name")
        .fetch_all(conn)
        .await
}
