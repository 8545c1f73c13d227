//! The Postgres store: the only place SQL lives, one module per table.
//!
//! Functions take a `&mut PgConnection` so that callers compose several of them into one
//! transaction (`pool.begin()`); row structs stay here and are converted at the API edge.

pub mod api_tokens;
pub mod artifacts;
pub mod attempts;
pub mod campaigns;
pub mod controllers;
pub mod endpoints;
pub mod events;
pub mod pools;
pub mod round_cards;
pub mod rounds;
pub mod schedule_runs;
pub mod schedules;
pub mod task_edges;
pub mod tasks;
pub mod workers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use sqlx::PgConnection;

/// Embedded migrations from the workspace's `migrations/` folder.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// This process's id among the controllers sharing the database (`controllers.id`).
pub fn instance_id() -> uuid::Uuid {
    static ID: std::sync::OnceLock<uuid::Uuid> = std::sync::OnceLock::new();
    *ID.get_or_init(uuid::Uuid::new_v4)
}

/// The `application_name` of this process's connections: the wake-up notifications its
/// writes cause carry it, so that it can tell them from other controllers'.
pub fn application_name() -> String {
    format!("flywheel-{}", instance_id())
}

/// Opens a pool. Statement logging is off: the hot paths run thousands of statements a second.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .disable_statement_logging()
        .application_name(&application_name())
        // The batch statements join an array of keys (`unnest`) to a table. Their cached plans
        // guess 10 keys, and the statistics of a queue that just grew guess a small table; at
        // the default price of a random read the planner then picked sequential scans that grew
        // with the table (a completion batch scanning every attempt). Priced as the cached
        // reads they are, index probes win: each key is one probe.
        //
        // Prepared statements keep their generic plan. Statements whose array parameters
        // change size from call to call (a completion batch's stages, the pools an empty claim
        // looks at) were planned again at every call, since a plan made for the exact array
        // looked cheaper than the generic one: about 2,500 plannings per 40,000 dispatched
        // tasks, a few percent of Postgres' time.
        .options([
            ("random_page_cost", "1.1"),
            ("plan_cache_mode", "force_generic_plan"),
        ]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        // No ping before each use: it is a round trip (and a transaction in the statistics) on
        // every acquire; a connection that broke fails its first statement instead, which
        // every caller handles.
        .test_before_acquire(false)
        // Short, so that an unreachable database shows within seconds (health, reaper).
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(options)
        .await
}

/// Applies pending migrations. sqlx takes a Postgres advisory lock for the duration, so two
/// controllers starting at once apply them exactly once.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
