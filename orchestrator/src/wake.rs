//! Wake-ups instead of polling. The loops (dispatcher, planner, reaper, scheduler) sleep until
//! the next time they know of (a retry or a lease coming due, a schedule's next firing), until
//! this process wakes them after its own changes, or until another controller's change arrives
//! as a notification on `flywheel_wake` (triggers on `tasks`, `campaigns` and `schedules`, with
//! the writer's `application_name`); [`IDLE_TICK`] bounds every sleep as a safety net. So an
//! idle controller makes almost no transactions, however many workers wait on it.
//!
//! A token revoked anywhere (`api_tokens` changed) empties the token cache at once.
//!
//! The listening connection doubles as the database probe: when it drops, the database is
//! marked unreachable (health, and the reaper's lease extension when it comes back).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::watch;

use crate::Controller;
use crate::store;

/// The longest any loop sleeps without a reason to wake.
pub(crate) const IDLE_TICK: Duration = Duration::from_secs(60);

const CHANNEL: &str = "flywheel_wake";

/// Wakes this controller's loops for what other controllers (and clients such as the CLI's
/// admin commands) change in the database, until shutdown.
pub(crate) async fn run(ctl: Arc<Controller>, mut shutdown: watch::Receiver<bool>) {
    let own = store::application_name();
    let mut listener: Option<PgListener> = None;
    loop {
        let l = match listener.as_mut() {
            Some(l) => l,
            None => match listen(&ctl).await {
                Ok(l) => {
                    // Whatever changed while this controller was not listening.
                    wake_all(&ctl);
                    ctl.registry.rewrite_leases();
                    ctl.auth.forget();
                    listener.insert(l)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for wake-ups; retrying");
                    ctl.database_unreachable();
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            },
        };
        tokio::select! {
            received = l.try_recv() => match received {
                Ok(Some(n)) => route(&ctl, n.payload(), &own),
                // The connection dropped; the next call reconnects.
                Ok(None) => {
                    tracing::warn!("the wake-up connection to Postgres dropped");
                    ctl.database_unreachable();
                    listener = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "wake-up listener failed");
                    ctl.database_unreachable();
                    listener = None;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn listen(ctl: &Controller) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(&ctl.pool).await?;
    l.listen(CHANNEL).await?;
    Ok(l)
}

/// A notification's payload is `<application_name> <table>`. This process's own task changes
/// were followed by in-process wake-ups already; its campaign and schedule changes still
/// concern the scheduler (a buffered firing waits for a campaign to end).
fn route(ctl: &Controller, payload: &str, own: &str) {
    let (writer, table) = payload.rsplit_once(' ').unwrap_or((payload, ""));
    if table == "api_tokens" {
        ctl.auth.forget();
    }
    // Another process's change may change what running tasks are told (this process's own
    // cancels, pauses and round failures rewrite leases where they commit).
    if writer != own {
        ctl.registry.rewrite_leases();
        wake_all(ctl);
    } else if table == "campaigns" || table == "schedules" {
        ctl.schedules_wake.notify_one();
    }
}

fn wake_all(ctl: &Controller) {
    ctl.queue_changed();
    ctl.planner_wake.notify_one();
    ctl.reaper_wake.notify_one();
    ctl.schedules_wake.notify_one();
}

/// How long to sleep until `at` (now if it is past), at most [`IDLE_TICK`].
pub(crate) fn until(at: Option<chrono::DateTime<chrono::Utc>>) -> Duration {
    at.map_or(IDLE_TICK, |at| {
        (at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
            .min(IDLE_TICK)
    })
}
