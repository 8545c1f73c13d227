//! `controllers`: the controller processes sharing the database, and when each was last alive.
//! A worker is online while its stream to a live controller is open.

use sqlx::PgConnection;
use uuid::Uuid;

/// Records that controller `id` started (and is alive).
pub async fn insert(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO controllers (id) VALUES ($1) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that controller `id` is alive now (one row written, however many workers it has).
pub async fn beat(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    let r = sqlx::query("UPDATE controllers SET last_seen_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    if r.rows_affected() == 0 {
        // Deleted by an operator meanwhile.
        insert(conn, id).await?;
    }
    Ok(())
}
