//! Prometheus metrics in the text exposition format (0.0.4), written by hand: a few counter and
//! histogram families updated where things happen, and gauges read at scrape time from the
//! registry and Postgres.
//!
//! Every metric name is `flywheel_*`; `dashboards/grafana/flywheel.json` uses exactly these
//! (a test checks that each one it references is exported).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::Controller;
use crate::error::Result;
use crate::store::{self, tasks::SettledRow};
use crate::store::{campaigns::CampaignStatus, tasks::TaskState};

/// How a settled attempt ended, as counted by `flywheel_tasks_finished_total{outcome}`
/// (`retried`: it went back to the queue).
const OUTCOMES: [&str; 4] = ["succeeded", "failed", "retried", "cancelled"];
/// Reports rejected for naming an attempt that is no longer current.
const STALE_REPORTS: [&str; 3] = ["complete", "fail", "heartbeat"];
const QUEUE_STATES: [&str; 4] = ["blocked", "queued", "waiting_for_worker", "running"];

const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let v = v.max(0.0);
        for (bound, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *bound {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

struct Families {
    /// pool → attempts handed out.
    started: BTreeMap<String, u64>,
    /// pool → settled attempts by outcome, in the order of [`OUTCOMES`].
    finished: BTreeMap<String, [u64; 4]>,
    lease_expiries: u64,
    stale: BTreeMap<&'static str, u64>,
    dispatch_latency: Histogram,
    /// stage kind → durations of succeeded attempts.
    stage_duration: BTreeMap<String, Histogram>,
}

/// The controller's counters and histograms.
pub(crate) struct Metrics {
    families: Mutex<Families>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Self {
            families: Mutex::new(Families {
                started: BTreeMap::new(),
                finished: BTreeMap::new(),
                lease_expiries: 0,
                stale: STALE_REPORTS.iter().map(|r| (*r, 0)).collect(),
                dispatch_latency: Histogram::new(&LATENCY_BUCKETS),
                stage_duration: BTreeMap::new(),
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Families) -> T) -> T {
        f(&mut self.families.lock().expect("metrics"))
    }

    /// Attempts handed to workers: `(pool, seconds since the task became claimable)`. A pool's
    /// series exist (at zero) from then on, so dashboards can rate() them before the first
    /// failure.
    pub(crate) fn started<'a>(&self, sent: impl IntoIterator<Item = (&'a str, f64)>) {
        self.with(|f| {
            for (pool, latency_s) in sent {
                match f.started.get_mut(pool) {
                    Some(n) => *n += 1,
                    None => {
                        f.started.insert(pool.to_string(), 1);
                    }
                }
                f.dispatch_latency.observe(latency_s);
            }
        });
    }

    /// Attempts that ended: counted by outcome; succeeded ones feed the stage-duration histogram.
    pub(crate) fn settled<'a>(&self, rows: impl IntoIterator<Item = &'a SettledRow>) {
        self.with(|f| {
            for r in rows {
                // In the order of OUTCOMES: succeeded, failed, retried (back to queued), cancelled.
                let outcome = match r.state {
                    TaskState::Succeeded => 0,
                    TaskState::Failed => 1,
                    TaskState::Queued | TaskState::Blocked => 2,
                    _ => 3,
                };
                if !f.finished.contains_key(&r.pool) {
                    f.finished.insert(r.pool.clone(), [0; 4]);
                }
                f.finished.get_mut(&r.pool).expect("inserted")[outcome] += 1;
                if r.state == TaskState::Succeeded {
                    match f.stage_duration.get_mut(&r.kind) {
                        Some(h) => h.observe(r.ran_s),
                        None => {
                            let mut h = Histogram::new(&DURATION_BUCKETS);
                            h.observe(r.ran_s);
                            f.stage_duration.insert(r.kind.clone(), h);
                        }
                    }
                }
            }
        });
    }

    pub(crate) fn lease_expired(&self, n: usize) {
        self.with(|f| f.lease_expiries += n as u64);
    }

    /// A report for an attempt that is no longer current was refused (`complete`, `fail`,
    /// `heartbeat`).
    pub(crate) fn stale_report(&self, report: &'static str, n: u64) {
        if n > 0 {
            self.with(|f| *f.stale.entry(report).or_insert(0) += n);
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "+Inf".into()
    } else {
        "-Inf".into()
    }
}

fn histogram(out: &mut String, name: &str, extra: &[(&str, &str)], h: &Histogram) {
    for (bound, c) in h.bounds.iter().zip(&h.counts) {
        let le = number(*bound);
        let mut l = extra.to_vec();
        l.push(("le", &le));
        let _ = writeln!(out, "{name}_bucket{} {c}", labels(&l));
    }
    let mut l = extra.to_vec();
    l.push(("le", "+Inf"));
    let _ = writeln!(out, "{name}_bucket{} {}", labels(&l), h.count);
    let _ = writeln!(out, "{name}_sum{} {}", labels(extra), number(h.sum));
    let _ = writeln!(out, "{name}_count{} {}", labels(extra), h.count);
}

/// The whole exposition: counters and histograms from memory, gauges from the registry and
/// Postgres.
pub(crate) async fn render(ctl: &Controller) -> Result<String> {
    let mut conn = ctl.pool.acquire().await?;
    let depths = store::tasks::queue_depths(&mut conn).await?;
    let pools = store::pools::list(&mut conn).await?;
    let campaigns = store::campaigns::status_counts(&mut conn).await?;
    let round_metrics = store::rounds::latest_metrics(&mut conn).await?;
    drop(conn);
    let connected = ctl.registry.connected_capabilities();

    let f = ctl.metrics.with(|f| {
        (
            f.started.clone(),
            f.finished.clone(),
            f.lease_expiries,
            f.stale.clone(),
            f.dispatch_latency.clone(),
            f.stage_duration.clone(),
        )
    });
    let (started, finished, expiries, stale, latency, durations) = f;
    let mut out = String::new();

    header(
        &mut out,
        "flywheel_tasks_started_total",
        "counter",
        "Task attempts handed to workers, per pool.",
    );
    for (pool, n) in &started {
        let _ = writeln!(
            out,
            "flywheel_tasks_started_total{} {n}",
            labels(&[("pool", pool)])
        );
    }
    header(
        &mut out,
        "flywheel_tasks_finished_total",
        "counter",
        "Task attempts that ended, per pool and outcome (succeeded, failed, retried, cancelled).",
    );
    let pools_seen: std::collections::BTreeSet<&String> =
        started.keys().chain(finished.keys()).collect();
    for pool in pools_seen {
        let counts = finished.get(pool).copied().unwrap_or_default();
        for (outcome, n) in OUTCOMES.iter().zip(counts) {
            let _ = writeln!(
                out,
                "flywheel_tasks_finished_total{} {n}",
                labels(&[("pool", pool), ("outcome", outcome)])
            );
        }
    }
    header(
        &mut out,
        "flywheel_lease_expiries_total",
        "counter",
        "Running attempts reclaimed because their worker stopped heartbeating.",
    );
    let _ = writeln!(out, "flywheel_lease_expiries_total {expiries}");
    header(
        &mut out,
        "flywheel_stale_reports_rejected_total",
        "counter",
        "Worker reports refused because they named an attempt that is no longer current.",
    );
    for (report, n) in &stale {
        let _ = writeln!(
            out,
            "flywheel_stale_reports_rejected_total{} {n}",
            labels(&[("report", report)])
        );
    }
    header(
        &mut out,
        "flywheel_dispatch_latency_seconds",
        "histogram",
        "Time from a task becoming claimable to its assignment being sent to a worker.",
    );
    histogram(&mut out, "flywheel_dispatch_latency_seconds", &[], &latency);
    header(
        &mut out,
        "flywheel_stage_duration_seconds",
        "histogram",
        "Run time of succeeded task attempts, per stage kind.",
    );
    for (kind, h) in &durations {
        histogram(
            &mut out,
            "flywheel_stage_duration_seconds",
            &[("kind", kind)],
            h,
        );
    }

    // Queue depth per pool and state; queued tasks no connected worker can run are shown as
    // waiting_for_worker, as in the control API.
    let mut depth: BTreeMap<(String, &str), i64> = BTreeMap::new();
    for pool in &pools {
        for state in QUEUE_STATES {
            depth.insert((pool.clone(), state), 0);
        }
    }
    for (pool, state, backend, gpu_kind, gpu_count, n) in &depths {
        let state = match state.as_str() {
            "queued"
                if !connected
                    .iter()
                    .any(|c| c.can_run(pool, backend, gpu_kind, *gpu_count)) =>
            {
                "waiting_for_worker"
            }
            "blocked" => "blocked",
            "queued" => "queued",
            _ => "running",
        };
        for s in QUEUE_STATES {
            depth.entry((pool.clone(), s)).or_insert(0);
        }
        *depth.entry((pool.clone(), state)).or_insert(0) += n;
    }
    header(
        &mut out,
        "flywheel_queue_depth",
        "gauge",
        "Unfinished tasks per pool and state (blocked, queued, waiting_for_worker, running).",
    );
    for ((pool, state), n) in &depth {
        let _ = writeln!(
            out,
            "flywheel_queue_depth{} {n}",
            labels(&[("pool", pool), ("state", state)])
        );
    }

    let mut live: BTreeMap<String, u64> = pools.iter().map(|p| (p.clone(), 0)).collect();
    for c in &connected {
        *live.entry(c.pool.clone()).or_insert(0) += 1;
    }
    header(
        &mut out,
        "flywheel_workers_live",
        "gauge",
        "Workers with an open assignment stream to this controller, per pool.",
    );
    for (pool, n) in &live {
        let _ = writeln!(
            out,
            "flywheel_workers_live{} {n}",
            labels(&[("pool", pool)])
        );
    }

    header(
        &mut out,
        "flywheel_campaigns",
        "gauge",
        "Campaigns per status.",
    );
    for status in CampaignStatus::ALL.iter().map(|s| s.as_str()) {
        let n = campaigns
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(
            out,
            "flywheel_campaigns{} {n}",
            labels(&[("status", status)])
        );
    }

    header(
        &mut out,
        "flywheel_campaign_round",
        "gauge",
        "Index of the latest settled round of each recently active campaign.",
    );
    for m in &round_metrics {
        let _ = writeln!(
            out,
            "flywheel_campaign_round{} {}",
            labels(&[("campaign_id", &m.campaign_id.to_string())]),
            m.round_index
        );
    }
    header(
        &mut out,
        "flywheel_round_metric",
        "gauge",
        "Metrics of each recently active campaign's latest settled round (e.g. evaluate.accuracy, evaluate.mean_reward, evaluate.win_rate).",
    );
    for m in &round_metrics {
        let id = m.campaign_id.to_string();
        if let Some(obj) = m.metrics.as_object() {
            for (metric, v) in obj {
                if let Some(v) = v.as_f64() {
                    let _ = writeln!(
                        out,
                        "flywheel_round_metric{} {}",
                        labels(&[("campaign_id", &id), ("metric", metric)]),
                        number(v)
                    );
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let mut h = Histogram::new(&LATENCY_BUCKETS);
        h.observe(0.003);
        h.observe(0.2);
        h.observe(50.0);
        let mut out = String::new();
        histogram(&mut out, "x", &[("kind", "a\"b")], &h);
        assert!(out.contains("x_bucket{kind=\"a\\\"b\",le=\"0.0025\"} 0\n"));
        assert!(out.contains("x_bucket{kind=\"a\\\"b\",le=\"0.005\"} 1\n"));
        assert!(out.contains("x_bucket{kind=\"a\\\"b\",le=\"0.25\"} 2\n"));
        assert!(out.contains("x_bucket{kind=\"a\\\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{kind=\"a\\\"b\"} 3\n"));
    }
}
