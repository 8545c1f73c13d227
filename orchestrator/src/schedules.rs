//! Cron schedules: creating, pausing, resuming and deleting them, and firing them.
//!
//! A schedule is a row in `schedules`; every scheduled time it has handled has a row in
//! `schedule_runs` saying what happened (started, appended, buffered, skipped, failed). Firing
//! is [`fire_due`]: each due schedule is handled in its own transaction that locks its row with
//! `SKIP LOCKED`, acts, records the runs and moves `next_fire_at` on, so when several
//! controllers share a database exactly one of them handles each scheduled time (and a unique
//! index on started runs backs that up). Time is a parameter, so tests drive it.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::{Principal, Scope};
use crate::cron::CronSchedule;
use crate::error::{Error, Result};
use crate::spec::CampaignSpec;
use crate::store::{
    self, PgConnection, events::NewEvent, schedule_runs::NewRun, schedule_runs::ScheduleRunRow,
    schedules::ScheduleRow,
};
use crate::{ops, template};

/// The shortest catch-up window: a firing is always allowed to be this late (controller ticks,
/// a busy database) without counting as missed.
pub const MIN_CATCH_UP_WINDOW_S: u32 = 10;
/// The longest catch-up window: a year (stored as a 32-bit count of seconds).
pub const MAX_CATCH_UP_WINDOW_S: u32 = 365 * 24 * 3600;
/// At most this many scheduled times are handled one by one per schedule and tick; older ones
/// after a long outage are recorded as one missed run.
const MAX_TIMES_PER_TICK: usize = 1000;

pub const MODES: [&str; 2] = ["new_campaign", "append_rounds"];
pub const OVERLAPS: [&str; 4] = ["skip", "buffer_one", "cancel_old", "allow"];

/// What a person asks for when creating a schedule.
#[derive(Debug, Clone)]
pub struct NewScheduleRequest {
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    pub template_yaml: String,
    pub params: BTreeMap<String, String>,
    /// `new_campaign` (each firing creates a campaign) or `append_rounds` (firings extend one
    /// long-running campaign, created by the first firing).
    pub mode: String,
    pub rounds_per_fire: u32,
    /// What a firing does while the previous run is still going: `skip`, `buffer_one`,
    /// `cancel_old` or `allow`.
    pub overlap: String,
    pub catch_up_window_s: u32,
}

/// One scheduled time handled by [`fire_due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    pub schedule: String,
    pub scheduled_for: DateTime<Utc>,
    pub outcome: &'static str,
    pub campaign_id: Option<Uuid>,
    pub message: String,
}

fn parse_cron(s: &ScheduleRow) -> Result<CronSchedule> {
    CronSchedule::parse(&s.cron, &s.time_zone)
        .map_err(|e| Error::FailedPrecondition(format!("stored schedule {}: {e}", s.name)))
}

/// Values a template may use without them being passed: the firing time in the schedule's zone.
fn builtins(name: &str, cron: &CronSchedule, at: DateTime<Utc>) -> BTreeMap<String, String> {
    let local = at.with_timezone(&cron.time_zone());
    BTreeMap::from([
        ("schedule".to_string(), name.to_string()),
        ("fire_time".to_string(), local.to_rfc3339()),
        (
            "fire_date".to_string(),
            local.format("%Y-%m-%d").to_string(),
        ),
    ])
}

fn params_of(s: &ScheduleRow) -> BTreeMap<String, String> {
    serde_json::from_value(s.params.clone()).unwrap_or_default()
}

/// Fills a template and validates the result as a campaign spec.
fn render_spec(
    template_yaml: &str,
    params: &BTreeMap<String, String>,
    builtins: &BTreeMap<String, String>,
) -> Result<(String, CampaignSpec)> {
    let yaml = template::render(template_yaml, params, builtins)
        .map_err(|e| Error::invalid("params", e.to_string()))?;
    let spec = CampaignSpec::from_yaml(&yaml)
        .map_err(|e| Error::invalid("template_yaml", format!("after filling, {e}")))?;
    Ok((yaml, spec))
}

/// Fills a campaign template given at submission (no built-in values).
pub fn render_submission(template_yaml: &str, params: &BTreeMap<String, String>) -> Result<String> {
    if params.is_empty() && !template_yaml.contains("{{") {
        return Ok(template_yaml.to_string());
    }
    template::render(template_yaml, params, &BTreeMap::new())
        .map_err(|e| Error::invalid("params", e.to_string()))
}

/// Validates and stores a schedule; its first firing is the first cron time after `now`.
pub async fn create(
    pool: &PgPool,
    req: &NewScheduleRequest,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<ScheduleRow> {
    crate::limits::name("name", &req.name)?;
    let name = req.name.trim();
    crate::limits::text("cron", &req.cron, crate::limits::MAX_NAME_BYTES)?;
    crate::limits::text("time_zone", &req.time_zone, crate::limits::MAX_NAME_BYTES)?;
    crate::limits::text(
        "template_yaml",
        &req.template_yaml,
        crate::limits::MAX_SPEC_BYTES,
    )?;
    crate::limits::entries("params", req.params.len())?;
    for (k, v) in &req.params {
        crate::limits::name("params", k)?;
        crate::limits::text("params", v, crate::limits::MAX_TEXT_BYTES)?;
    }
    let cron = CronSchedule::parse(&req.cron, &req.time_zone).map_err(|e| {
        let field = if matches!(e, crate::cron::CronError::TimeZone(_)) {
            "time_zone"
        } else {
            "cron"
        };
        Error::invalid(field, e.to_string())
    })?;
    if !MODES.contains(&req.mode.as_str()) {
        return Err(Error::invalid(
            "mode",
            format!("{:?} is not one of {}", req.mode, MODES.join(", ")),
        ));
    }
    if !OVERLAPS.contains(&req.overlap.as_str()) {
        return Err(Error::invalid(
            "overlap",
            format!("{:?} is not one of {}", req.overlap, OVERLAPS.join(", ")),
        ));
    }
    if req.mode == "append_rounds" && req.overlap == "cancel_old" {
        return Err(Error::invalid(
            "overlap",
            "cancel_old would cancel the long-running campaign that append_rounds extends; use skip, buffer_one or allow",
        ));
    }
    if !(1..=1000).contains(&req.rounds_per_fire) {
        return Err(Error::invalid(
            "rounds_per_fire",
            "must be between 1 and 1000",
        ));
    }
    if req.catch_up_window_s < MIN_CATCH_UP_WINDOW_S {
        return Err(Error::invalid(
            "catch_up_window_s",
            format!("must be at least {MIN_CATCH_UP_WINDOW_S} seconds"),
        ));
    }
    if req.catch_up_window_s > MAX_CATCH_UP_WINDOW_S {
        return Err(Error::invalid(
            "catch_up_window_s",
            format!("must be at most {MAX_CATCH_UP_WINDOW_S} seconds (a year)"),
        ));
    }
    let first = cron
        .next_after(now)
        .ok_or_else(|| Error::invalid("cron", "never fires after now"))?;
    // Validate the template now, as it will be filled at the first firing.
    let (template, params, builtins) = (
        req.template_yaml.clone(),
        req.params.clone(),
        builtins(name, &cron, first),
    );
    crate::off_runtime(move || render_spec(&template, &params, &builtins).map(drop)).await?;
    let id = Uuid::new_v4();
    let mut tx = pool.begin().await?;
    let inserted = store::schedules::insert(
        &mut tx,
        store::schedules::NewSchedule {
            id,
            name,
            cron: cron.expression(),
            time_zone: &req.time_zone,
            template_yaml: &req.template_yaml,
            params: json!(req.params),
            mode: &req.mode,
            rounds_per_fire: req.rounds_per_fire as i32,
            overlap: &req.overlap,
            catch_up_window_s: req.catch_up_window_s as i32,
            next_fire_at: first,
            created_by: actor,
        },
    )
    .await?;
    if !inserted {
        return Err(Error::invalid(
            "name",
            format!("a schedule named {name:?} already exists"),
        ));
    }
    schedule_event(
        &mut tx,
        "schedule_created",
        format!(
            "schedule {name:?} created: {:?} in {}, first firing {first}",
            req.cron, req.time_zone
        ),
        actor,
        id,
    )
    .await?;
    tx.commit().await?;
    get(pool, &id.to_string()).await
}

async fn schedule_event(
    tx: &mut PgConnection,
    kind: &'static str,
    message: String,
    actor: &str,
    schedule_id: Uuid,
) -> Result<()> {
    store::events::insert(
        tx,
        NewEvent {
            campaign_id: None,
            task_id: None,
            kind,
            message,
            actor: actor.to_string(),
            data: json!({ "schedule_id": schedule_id }),
        },
    )
    .await?;
    Ok(())
}

fn not_found(key: &str) -> Error {
    Error::NotFound {
        what: "schedule",
        id: key.to_string(),
    }
}

/// A schedule by id or name.
pub async fn get(pool: &PgPool, key: &str) -> Result<ScheduleRow> {
    let mut conn = pool.acquire().await?;
    store::schedules::find(&mut conn, key)
        .await?
        .ok_or_else(|| not_found(key))
}

pub async fn list(pool: &PgPool) -> Result<Vec<ScheduleRow>> {
    let mut conn = pool.acquire().await?;
    Ok(store::schedules::list(&mut conn).await?)
}

pub async fn recent_runs(pool: &PgPool, id: Uuid, limit: i64) -> Result<Vec<ScheduleRunRow>> {
    let mut conn = pool.acquire().await?;
    Ok(store::schedule_runs::recent(&mut conn, id, limit).await?)
}

/// The next `n` firing times of a stored schedule after `now` (none while paused).
pub fn upcoming(s: &ScheduleRow, now: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
    if s.status != "active" {
        return Vec::new();
    }
    let Ok(cron) = parse_cron(s) else {
        return Vec::new();
    };
    let mut times = vec![s.next_fire_at];
    times.extend(cron.upcoming(s.next_fire_at.max(now), n.saturating_sub(1)));
    times.truncate(n);
    times
}

/// Pauses a schedule: nothing fires until it is resumed, and a buffered firing is dropped.
pub async fn pause(pool: &PgPool, key: &str, actor: &str) -> Result<ScheduleRow> {
    let mut tx = pool.begin().await?;
    let s = store::schedules::lock(&mut tx, key)
        .await?
        .ok_or_else(|| not_found(key))?;
    if s.status == "paused" {
        return Err(Error::FailedPrecondition(format!(
            "schedule {:?} is already paused",
            s.name
        )));
    }
    store::schedules::set_status(&mut tx, s.id, "paused", s.next_fire_at).await?;
    schedule_event(
        &mut tx,
        "schedule_paused",
        format!("schedule {:?} paused", s.name),
        actor,
        s.id,
    )
    .await?;
    tx.commit().await?;
    get(pool, &s.id.to_string()).await
}

/// Resumes a paused schedule. Times that passed while it was paused are not fired: the next
/// firing is the first cron time after `now`.
pub async fn resume(
    pool: &PgPool,
    key: &str,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<ScheduleRow> {
    let mut tx = pool.begin().await?;
    let s = store::schedules::lock(&mut tx, key)
        .await?
        .ok_or_else(|| not_found(key))?;
    if s.status == "active" {
        return Err(Error::FailedPrecondition(format!(
            "schedule {:?} is not paused",
            s.name
        )));
    }
    let next = parse_cron(&s)?
        .next_after(now)
        .ok_or_else(|| Error::FailedPrecondition("schedule never fires again".into()))?;
    store::schedules::set_status(&mut tx, s.id, "active", next).await?;
    schedule_event(
        &mut tx,
        "schedule_resumed",
        format!("schedule {:?} resumed; next firing {next}", s.name),
        actor,
        s.id,
    )
    .await?;
    tx.commit().await?;
    get(pool, &s.id.to_string()).await
}

/// Deletes a schedule and its run history; the campaigns it started stay.
pub async fn delete(pool: &PgPool, key: &str, actor: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    let s = store::schedules::lock(&mut tx, key)
        .await?
        .ok_or_else(|| not_found(key))?;
    store::schedules::delete(&mut tx, s.id).await?;
    schedule_event(
        &mut tx,
        "schedule_deleted",
        format!("schedule {:?} deleted", s.name),
        actor,
        s.id,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Handles every schedule due at `now`: fires, buffers or skips each scheduled time up to `now`
/// and starts buffered firings whose previous run has finished. Returns what it did.
pub async fn fire_due(pool: &PgPool, now: DateTime<Utc>) -> Result<Vec<Firing>> {
    let ids = {
        let mut conn = pool.acquire().await?;
        store::schedules::due(&mut conn, now).await?
    };
    let mut fired = Vec::new();
    for id in ids {
        let mut tx = pool.begin().await?;
        // Another controller holding the row is handling it; one that already did has moved
        // `next_fire_at` past `now`.
        let Some(s) = store::schedules::lock_skip_locked(&mut tx, id).await? else {
            tx.rollback().await?;
            continue;
        };
        if s.status != "active" || (s.next_fire_at > now && s.buffered_for.is_none()) {
            // A dropped transaction's ROLLBACK is sent only when its connection is next used;
            // until then the row would stay locked and every controller would skip it.
            tx.rollback().await?;
            continue;
        }
        let runs = handle(&mut tx, &s, now).await?;
        tx.commit().await?;
        fired.extend(runs.into_iter().map(|r| Firing {
            schedule: s.name.clone(),
            scheduled_for: r.scheduled_for,
            outcome: r.outcome,
            campaign_id: r.campaign_id,
            message: r.message,
        }));
    }
    Ok(fired)
}

async fn record(
    tx: &mut PgConnection,
    schedule_id: Uuid,
    now: DateTime<Utc>,
    runs: &mut Vec<NewRun>,
    run: NewRun,
) -> Result<()> {
    store::schedule_runs::insert(tx, schedule_id, &run, now).await?;
    runs.push(run);
    Ok(())
}

/// The firing state of one schedule while it is being handled.
struct Handling<'a> {
    schedule: &'a ScheduleRow,
    actor: Principal,
    buffered_for: Option<DateTime<Utc>>,
    target: Option<Uuid>,
}

async fn handle(tx: &mut PgConnection, s: &ScheduleRow, now: DateTime<Utc>) -> Result<Vec<NewRun>> {
    let cron = parse_cron(s)?;
    let mut h = Handling {
        schedule: s,
        actor: Principal {
            // A schedule acts by itself, not through a token.
            token_id: Uuid::nil(),
            name: format!("schedule:{}", s.name),
            scope: Scope::Admin,
        },
        buffered_for: s.buffered_for,
        target: s.target_campaign_id,
    };
    let mut runs = Vec::new();
    if let Some(at) = h.buffered_for
        && !h.previous_running(tx).await?
    {
        h.buffered_for = None;
        runs.push(
            h.start(
                tx,
                &cron,
                at,
                "buffered firing started: the previous run finished",
            )
            .await?,
        );
    }
    let window = Duration::seconds(s.catch_up_window_s as i64);
    let mut at = s.next_fire_at;
    let mut handled = 0;
    while at <= now {
        if handled == MAX_TIMES_PER_TICK {
            let run = NewRun {
                scheduled_for: at,
                outcome: "skipped_missed",
                campaign_id: None,
                message: format!(
                    "this and every later time up to {now} were missed (more than {MAX_TIMES_PER_TICK} times due at once)"
                ),
            };
            record(tx, s.id, now, &mut runs, run).await?;
            at = cron.next_after(now).unwrap_or(now + Duration::days(36_500));
            break;
        }
        let late = now - at;
        let run = if late > window {
            NewRun {
                scheduled_for: at,
                outcome: "skipped_missed",
                campaign_id: None,
                message: format!(
                    "missed by {}s, beyond the catch-up window of {}s",
                    late.num_seconds(),
                    window.num_seconds()
                ),
            }
        } else {
            h.fire(tx, &cron, at).await?
        };
        // Recorded at once: a later time in this loop sees a run started by an earlier one.
        record(tx, s.id, now, &mut runs, run).await?;
        handled += 1;
        at = cron.next_after(at).unwrap_or(now + Duration::days(36_500));
    }
    // A buffered firing still waiting changes nothing: no write.
    if !runs.is_empty() || at != s.next_fire_at || h.buffered_for != s.buffered_for {
        store::schedules::set_firing_state(tx, s.id, at, h.buffered_for, h.target).await?;
    }
    Ok(runs)
}

impl Handling<'_> {
    /// Whether the previous run is still going: a started campaign that is running or paused
    /// (`new_campaign`), or the long-running campaign still working (`append_rounds`).
    async fn previous_running(&self, tx: &mut PgConnection) -> Result<bool> {
        Ok(!self.running_campaigns(tx).await?.is_empty())
    }

    async fn running_campaigns(&self, tx: &mut PgConnection) -> Result<Vec<Uuid>> {
        if self.schedule.mode == "append_rounds" {
            let Some(target) = self.target else {
                return Ok(Vec::new());
            };
            let running = store::campaigns::get(tx, target)
                .await?
                .is_some_and(|c| c.status.is_active());
            return Ok(if running { vec![target] } else { Vec::new() });
        }
        Ok(store::schedule_runs::active_campaigns(tx, self.schedule.id).await?)
    }

    /// A scheduled time within the catch-up window: applies the overlap policy.
    async fn fire(
        &mut self,
        tx: &mut PgConnection,
        cron: &CronSchedule,
        at: DateTime<Utc>,
    ) -> Result<NewRun> {
        let running = self.running_campaigns(tx).await?;
        let skipped = |message: String| NewRun {
            scheduled_for: at,
            outcome: "skipped_overlap",
            campaign_id: None,
            message,
        };
        if running.is_empty() || self.schedule.overlap == "allow" {
            return self.start(tx, cron, at, "").await;
        }
        let ids = running
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        match self.schedule.overlap.as_str() {
            "skip" => Ok(skipped(format!("the previous run ({ids}) is still going"))),
            "buffer_one" => match self.buffered_for {
                None => {
                    self.buffered_for = Some(at);
                    Ok(NewRun {
                        scheduled_for: at,
                        outcome: "buffered",
                        campaign_id: None,
                        message: format!("held until the previous run ({ids}) finishes"),
                    })
                }
                Some(held) => Ok(skipped(format!(
                    "the previous run ({ids}) is still going and the firing for {held} is already buffered"
                ))),
            },
            _ => {
                // cancel_old
                for id in &running {
                    ops::cancel_in(
                        tx,
                        *id,
                        &format!("superseded by the firing for {at}"),
                        &self.actor,
                    )
                    .await?;
                }
                self.start(tx, cron, at, &format!("cancelled the previous run ({ids})"))
                    .await
            }
        }
    }

    /// Starts a campaign from the template, or extends the long-running one.
    async fn start(
        &mut self,
        tx: &mut PgConnection,
        cron: &CronSchedule,
        at: DateTime<Utc>,
        note: &str,
    ) -> Result<NewRun> {
        let s = self.schedule;
        let suffix = if note.is_empty() {
            String::new()
        } else {
            format!("; {note}")
        };
        if s.mode == "append_rounds"
            && let Some(target) = self.target
        {
            let reason = format!("scheduled firing for {at}");
            match ops::extend_in(tx, target, s.rounds_per_fire as u32, &reason, &self.actor).await {
                Ok(()) => {
                    return Ok(NewRun {
                        scheduled_for: at,
                        outcome: "appended",
                        campaign_id: Some(target),
                        message: format!("{} round(s) appended{suffix}", s.rounds_per_fire),
                    });
                }
                Err(Error::FailedPrecondition(why)) => {
                    return Ok(NewRun {
                        scheduled_for: at,
                        outcome: "failed",
                        campaign_id: Some(target),
                        message: why,
                    });
                }
                // The long-running campaign was deleted: start a new one.
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let (yaml, spec) = match render_spec(
            &s.template_yaml,
            &params_of(s),
            &builtins(&s.name, cron, at),
        ) {
            Ok(filled) => filled,
            Err(e) => {
                return Ok(NewRun {
                    scheduled_for: at,
                    outcome: "failed",
                    campaign_id: None,
                    message: e.to_string(),
                });
            }
        };
        let id = ops::create_campaign_in(tx, &yaml, &spec, &self.actor).await?;
        if s.mode == "append_rounds" {
            self.target = Some(id);
        }
        Ok(NewRun {
            scheduled_for: at,
            outcome: "started",
            campaign_id: Some(id),
            message: format!("campaign {:?} started{suffix}", spec.name),
        })
    }
}

/// Fires due schedules until shutdown, sleeping until the next firing (woken earlier when a
/// schedule or a campaign changes, [`crate::wake`]).
pub(crate) async fn run(
    ctl: std::sync::Arc<crate::Controller>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match fire_due(&ctl.pool, Utc::now()).await {
            Ok(fired) if !fired.is_empty() => {
                for f in &fired {
                    tracing::info!(schedule = %f.schedule, scheduled_for = %f.scheduled_for, outcome = f.outcome, "schedule handled");
                }
                // A `cancel_old` firing told running tasks to stop: their next heartbeats
                // must hear it.
                ctl.registry.rewrite_leases();
                ctl.queue_changed();
                ctl.events_changed();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "firing schedules failed; will retry"),
        }
        let next = async {
            let mut conn = ctl.pool.acquire().await?;
            store::schedules::next_fire_at(&mut conn).await
        };
        let wait = match next.await {
            Ok(next) => crate::wake::until(next),
            Err(e) => {
                tracing::warn!(error = %e, "reading the next firing failed; will retry");
                std::time::Duration::from_millis(500)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctl.schedules_wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
