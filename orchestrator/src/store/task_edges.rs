//! `task_edges`: the dependency edges of each round's stage DAG (task depends on task).

use sqlx::PgConnection;
use uuid::Uuid;

pub async fn insert_many(
    conn: &mut PgConnection,
    edges: &[(Uuid, Uuid)],
) -> Result<(), sqlx::Error> {
    if edges.is_empty() {
        return Ok(());
    }
    let (task, dep): (Vec<Uuid>, Vec<Uuid>) = edges.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO task_edges (task_id, depends_on) SELECT * FROM unnest($1::uuid[], $2::uuid[])",
    )
    .bind(task)
    .bind(dep)
    .execute(conn)
    .await?;
    Ok(())
}

/// The tasks that (transitively) depend on any of `roots`, roots excluded.
pub async fn descendants(
    conn: &mut PgConnection,
    roots: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH RECURSIVE down(id) AS (
             SELECT task_id FROM task_edges WHERE depends_on = ANY($1)
             UNION
             SELECT e.task_id FROM task_edges e JOIN down ON e.depends_on = down.id
         )
         SELECT id FROM down WHERE NOT (id = ANY($1))",
    )
    .bind(roots)
    .fetch_all(conn)
    .await
}

/// The tasks `task_id` consumes.
pub async fn dependencies(
    conn: &mut PgConnection,
    task_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT depends_on FROM task_edges WHERE task_id = $1")
        .bind(task_id)
        .fetch_all(conn)
        .await
}
