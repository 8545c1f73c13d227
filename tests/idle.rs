//! An idle controller is idle: with no campaigns it makes at most one transaction a second, and
//! connected idle workers add no database writes (their liveness is kept in memory; the
//! controller's own liveness row is written every 1.5 lease periods). Counted through
//! `pg_stat_database` and `pg_stat_user_tables` on the test's own database.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, until};
use sqlx::PgConnection;

/// How long each measurement runs. Postgres flushes a backend's statistics up to ~10 s after
/// its last activity, so a window starts 10 s after what came before it and runs long enough
/// that a flush landing on either side of its edge changes its rate little.
const WINDOW: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(12);

/// What one window saw.
struct Window {
    transactions_per_s: f64,
    /// Tuple writes per table, but for `controllers` (one row per controller, every 1.5 lease
    /// periods: flat in the number of workers by construction, and counted separately).
    writes: Vec<(String, i64)>,
    liveness_writes: i64,
}

/// Transactions of the current database so far, and tuple writes per table: one query, so
/// one transaction of its own.
async fn counters(conn: &mut PgConnection) -> (i64, Vec<(String, i64)>) {
    let (xacts, tables): (i64, sqlx::types::Json<Vec<(String, i64)>>) = sqlx::query_as(
        "SELECT (SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database
                 WHERE datname = current_database()),
                (SELECT coalesce(json_agg(json_build_array(relname, n_tup_ins + n_tup_upd + n_tup_del)), '[]')
                 FROM pg_stat_user_tables)",
    )
    .fetch_one(conn)
    .await
    .unwrap();
    (xacts, tables.0)
}

/// One window, after the statistics of what came before it have settled (less this
/// function's own reads: one transaction per read).
async fn measure(conn: &mut PgConnection) -> Window {
    tokio::time::sleep(SETTLE).await;
    let (x0, w0) = counters(conn).await;
    let began = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let (x1, w1) = counters(conn).await;
    let secs = began.elapsed().as_secs_f64();
    let xacts = (x1 - x0 - 1).max(0);
    let mut changed: Vec<(String, i64)> = w1
        .iter()
        .map(|(t, n)| {
            let before = w0.iter().find(|(b, _)| b == t).map_or(0, |(_, n)| *n);
            (t.clone(), n - before)
        })
        .filter(|(_, n)| *n != 0)
        .collect();
    let liveness_writes = changed
        .iter()
        .find(|(t, _)| t == "controllers")
        .map_or(0, |(_, n)| *n);
    changed.retain(|(t, _)| t != "controllers");
    Window {
        transactions_per_s: xacts as f64 / secs,
        writes: changed,
        liveness_writes,
    }
}

#[tokio::test]
async fn an_idle_controller_with_workers_writes_no_more_than_without() {
    let mut c = Cluster::start().await;
    let mut conn = c.db.connect().await;
    let alone = measure(&mut conn).await;
    for i in 0..8 {
        c.add_worker(&format!("idle-{i}"), "cpu", &[]);
    }
    // Registrations are writes: wait until all eight are in the statistics.
    until("8 registrations", Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT (n_tup_ins + n_tup_upd)::int8 FROM pg_stat_user_tables WHERE relname = 'workers'",
        )
        .fetch_one(&mut c.db.connect().await)
        .await
        .unwrap();
        (n >= 8).then_some(())
    })
    .await;
    let fleet = measure(&mut conn).await;
    eprintln!(
        "idle controller: {:.2} tx/s, writes {:?} (+{} liveness) alone; {:.2} tx/s, writes {:?} (+{} liveness) with 8 workers",
        alone.transactions_per_s,
        alone.writes,
        alone.liveness_writes,
        fleet.transactions_per_s,
        fleet.writes,
        fleet.liveness_writes
    );
    let total = |w: &Window| w.writes.iter().map(|(_, n)| n).sum::<i64>();
    assert!(
        total(&fleet) <= total(&alone),
        "8 idle workers made writes {:?} in {WINDOW:?}, none made {:?}",
        fleet.writes,
        alone.writes
    );
    // The controller's liveness row is as busy with workers as without (give or take a beat
    // at each edge of the windows).
    assert!(
        fleet.liveness_writes <= alone.liveness_writes + 2,
        "liveness writes: {} with 8 workers, {} alone",
        fleet.liveness_writes,
        alone.liveness_writes
    );
    for (who, w) in [("alone", &alone), ("with 8 workers", &fleet)] {
        assert!(
            w.transactions_per_s <= 1.0,
            "idle controller {who}: {:.2} transactions/s",
            w.transactions_per_s
        );
    }
}
