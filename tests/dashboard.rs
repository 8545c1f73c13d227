//! The controller's HTTP side against a running test-backend campaign: the JSON API and its
//! auth, Prometheus /metrics (checked by promtool), the Grafana dashboard's metric names, and
//! the web dashboard in headless Chromium driven over WebDriver.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Cluster, Proc, example_spec, free_port, http, init_model, scripted_server, until};
use fantoccini::{ClientBuilder, Locator};
use serde_json::Value;

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn workers(c: &mut Cluster) {
    c.add_worker("cpu-1", "cpu", &["--slots", "4"]);
    c.add_worker(
        "gpu-1",
        "gpu",
        &["--gpu-kind", "h100", "--gpu-count", "1", "--slots", "4"],
    );
}

/// Metric families in a scrape (`# TYPE` lines).
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

fn sample(scrape: &str, prefix: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn json_api_auth_actions_metrics_and_grafana_names() {
    let mut c = Cluster::start().await;
    workers(&mut c);
    let addr = c.http_addr();
    let done = c.create(&example_spec(&[])).await;
    c.wait_status(&done.id, "succeeded", Duration::from_secs(60))
        .await;

    // Reads need a token; a read token reads.
    let (status, body) = http(&addr, "GET", "/api/v1/campaigns", None, None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(json(&body)["code"], "Unauthenticated");
    let (status, _) = http(&addr, "GET", "/api/v1/campaigns", Some("fw_nope"), None);
    assert_eq!(status, 401);
    let (status, body) = http(&addr, "GET", "/api/v1/campaigns", Some(&c.read_token), None);
    assert_eq!(status, 200);
    assert_eq!(json(&body)["campaigns"][0]["id"], done.id.as_str());
    let (_, body) = http(&addr, "GET", "/api/v1/whoami", Some(&c.read_token), None);
    assert_eq!(json(&body)["scope"], "read");

    let path = format!("/api/v1/campaigns/{}", done.id);
    let (status, body) = http(&addr, "GET", &path, Some(&c.read_token), None);
    assert_eq!(status, 200);
    let detail = json(&body);
    let rounds = detail["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    let rpo = &rounds[0]["stages"][5];
    assert_eq!(rpo["name"], "rpo");
    assert_eq!(rpo["needs"], serde_json::json!(["sft", "filter"]));
    assert!(rounds[0]["metrics"]["evaluate.win_rate"].is_number());
    let task_id = rpo["tasks"][0]["id"].as_str().unwrap();
    let (status, body) = http(
        &addr,
        "GET",
        &format!("/api/v1/tasks/{task_id}"),
        Some(&c.read_token),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let task = json(&body);
    assert_eq!(task["attempts"][0]["state"], "succeeded");
    assert_eq!(task["depends_on"].as_array().unwrap().len(), 2);
    let (status, body) = http(
        &addr,
        "GET",
        &format!("{path}/artifacts?kind=model"),
        Some(&c.read_token),
        None,
    );
    assert_eq!(status, 200);
    assert!(json(&body)["artifacts"].as_array().unwrap().len() >= 5);
    let (status, body) = http(
        &addr,
        "GET",
        &format!("{path}/events?limit=3"),
        Some(&c.read_token),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(json(&body)["events"].as_array().unwrap().len(), 3);
    let (status, body) = http(
        &addr,
        "GET",
        "/api/v1/tasks/not-a-uuid",
        Some(&c.read_token),
        None,
    );
    assert_eq!(
        (status, json(&body)["code"].as_str()),
        (400, Some("InvalidArgument"))
    );
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .starts_with("task_id:")
    );

    // Actions need an admin token; bad bodies name the problem; nothing changes on refusal.
    let slow = example_spec(&[(
        "params: { count: 12 }",
        "params: { count: 12, sleep_ms: 600000 }",
    )]);
    let running = c.create(&slow).await;
    let act = |verb: &str| format!("/api/v1/campaigns/{}/{verb}", running.id);
    let (status, body) = http(
        &addr,
        "POST",
        &act("pause"),
        Some(&c.read_token),
        Some("{}"),
    );
    assert_eq!(
        (status, json(&body)["code"].as_str()),
        (403, Some("PermissionDenied"))
    );
    let (status, _) = http(&addr, "POST", &act("pause"), None, None);
    assert_eq!(status, 401);
    let (status, body) = http(
        &addr,
        "POST",
        &act("retry-stage"),
        Some(&c.admin),
        Some("{\"round_index\": 0}"),
    );
    assert_eq!(status, 400);
    assert!(
        json(&body)["error"].as_str().unwrap().contains("stage"),
        "{body}"
    );
    let (status, body) = http(
        &addr,
        "POST",
        &act("pause"),
        Some(&c.admin),
        Some("{\"reason\": \"lunch\"}"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["status"], "paused");
    let (status, body) = http(&addr, "POST", &act("pause"), Some(&c.admin), None);
    assert_eq!(status, 409, "pausing twice is a conflict: {body}");
    let (status, body) = http(&addr, "POST", &act("resume"), Some(&c.admin), None);
    assert_eq!(
        (status, json(&body)["status"].as_str()),
        (200, Some("running"))
    );
    let (status, body) = http(
        &addr,
        "POST",
        &act("cancel"),
        Some(&c.admin),
        Some("{\"reason\": \"done\"}"),
    );
    assert_eq!(
        (status, json(&body)["status"].as_str()),
        (200, Some("cancelled"))
    );
    let (_, body) = http(
        &addr,
        "GET",
        &format!("/api/v1/campaigns/{}/events", running.id),
        Some(&c.read_token),
        None,
    );
    let by_alice: Vec<String> = json(&body)["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "alice")
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        by_alice,
        [
            "campaign_created",
            "campaign_paused",
            "campaign_resumed",
            "campaign_cancelled"
        ]
    );

    // Retry a failed stage from the API: the stage and what follows it run again.
    let failing = c
        .create(&example_spec(&[(
            "params: { margin: 0.2 }",
            "params: { margin: 0.2, fail_permanently: true }",
        )]))
        .await;
    c.wait_status(&failing.id, "failed", Duration::from_secs(60))
        .await;
    let (status, body) = http(
        &addr,
        "POST",
        &format!("/api/v1/campaigns/{}/retry-stage", failing.id),
        Some(&c.admin),
        Some("{\"round_index\": 0, \"stage\": \"filter\"}"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body)["task_ids"].as_array().unwrap().len(),
        5,
        "filter, sft, rpo, evaluate, promote"
    );

    // Prometheus: promtool accepts the scrape, and it carries what the run did.
    let (status, scrape) = http(&addr, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{scrape}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sample(&scrape, "flywheel_tasks_started_total{pool=\"cpu\"}").unwrap() >= 10.0);
    assert!(
        sample(
            &scrape,
            "flywheel_tasks_finished_total{pool=\"gpu\",outcome=\"succeeded\"}"
        )
        .unwrap()
            >= 6.0
    );
    assert!(sample(&scrape, "flywheel_dispatch_latency_seconds_count").unwrap() >= 16.0);
    assert!(
        scrape
            .contains("flywheel_stage_duration_seconds_bucket{kind=\"preference\",le=\"+Inf\"} 2")
    );
    assert_eq!(
        sample(&scrape, "flywheel_workers_live{pool=\"gpu\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&scrape, "flywheel_campaigns{status=\"cancelled\"}"),
        Some(1.0)
    );
    let failed = "flywheel_tasks_finished_total{pool=\"cpu\",outcome=\"failed\"}";
    assert!(sample(&scrape, failed).unwrap() >= 1.0);
    let win_rate = format!(
        "flywheel_round_metric{{campaign_id=\"{}\",metric=\"evaluate.win_rate\"}}",
        done.id
    );
    assert!(sample(&scrape, &win_rate).is_some(), "{scrape}");

    // Every metric the Grafana dashboard queries is exported under that name.
    let grafana: Value =
        serde_json::from_str(include_str!("../dashboards/grafana/flywheel.json")).unwrap();
    let exported = families(&scrape);
    let mut referenced = BTreeSet::new();
    for panel in grafana["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("flywheel_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| exported.contains(*f)))
                    .map(str::to_string)
                    .unwrap_or(name);
                referenced.insert(family);
            }
        }
    }
    assert!(referenced.len() >= 10, "{referenced:?}");
    let missing: Vec<_> = referenced.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "Grafana queries metrics that are not exported: {missing:?}"
    );
}

async fn css(client: &fantoccini::Client, selector: &str) -> fantoccini::elements::Element {
    client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(selector))
        .await
        .unwrap_or_else(|e| panic!("no element {selector:?} within 30 s: {e}"))
}

#[tokio::test]
async fn the_dashboard_shows_a_running_campaign_live_in_chromium() {
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: install Debian's chromium and chromium-driver (scripts/test does)"
        );
    }
    let mut c = Cluster::start().await;
    workers(&mut c);
    let addr = c.http_addr();
    // The first stage of each round takes 4 s, long enough to watch it change state.
    let spec = example_spec(&[(
        "params: { count: 12 }",
        "params: { count: 12, sleep_ms: 4000 }",
    )]);

    let port = free_port();
    let driver_log = std::fs::File::create(c.dir.join("chromedriver.log")).unwrap();
    let _driver = Proc {
        child: Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(driver_log)
            .spawn()
            .expect("start chromedriver"),
        name: "chromedriver".into(),
    };
    let driver_url = format!("http://127.0.0.1:{port}");
    let profile = c.dir.join("chromium-profile");
    let caps: serde_json::Map<String, Value> = serde_json::from_value(serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,2000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    }))
    .unwrap();
    let client = until(
        "chromedriver to accept a session",
        Duration::from_secs(30),
        || {
            let (url, caps) = (driver_url.clone(), caps.clone());
            async move {
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&url)
                    .await
                    .ok()
            }
        },
    )
    .await;

    // Sign in with a read token, see the campaign appear in the list, open it.
    client.goto(&format!("http://{addr}/")).await.unwrap();
    css(&client, "#token")
        .await
        .send_keys(&c.read_token)
        .await
        .unwrap();
    css(&client, "#login-form button")
        .await
        .click()
        .await
        .unwrap();
    // Signed in (the list is showing); the campaign created now appears without a reload.
    css(&client, "#campaign-list table").await;
    let campaign = c.create(&spec).await;
    let row = css(
        &client,
        &format!("#campaign-list tr[data-id=\"{}\"]", campaign.id),
    )
    .await;
    assert!(
        row.text()
            .await
            .unwrap()
            .contains("test-backend-two-rounds")
    );
    row.click().await.unwrap();

    // Live: the first stage is seen running, then succeeded, then round 1 appears, all without
    // a reload (a marker set on the page survives).
    css(
        &client,
        "#dag .stage[data-name=\"prompts\"][data-state=\"running\"]",
    )
    .await;
    client
        .execute("window.__stillSamePage = true;", vec![])
        .await
        .unwrap();
    css(
        &client,
        "#dag .stage[data-name=\"prompts\"][data-state=\"succeeded\"]",
    )
    .await;
    css(&client, "#rounds .round[data-index=\"1\"]").await;
    css(&client, "#campaign-status .s-succeeded").await;
    let same = client
        .execute("return window.__stillSamePage === true;", vec![])
        .await
        .unwrap();
    assert_eq!(
        same,
        Value::Bool(true),
        "the page reloaded instead of updating live"
    );
    assert_eq!(
        css(&client, "#rounds .round[data-index=\"0\"]")
            .await
            .attr("data-status")
            .await
            .unwrap()
            .as_deref(),
        Some("succeeded")
    );
    // Charts drawn by uPlot, the lineage with the promoted model, and the events.
    css(&client, "#charts .chart .uplot").await;
    let charts = client
        .find_all(Locator::Css("#charts .chart .uplot"))
        .await
        .unwrap();
    assert!(charts.len() >= 4, "{} charts", charts.len());
    // Dataset sizes of very different magnitudes on a log axis, with short axis labels; rounds
    // numbered from 1, as in the CLI and the demo's summary.
    let sizes = css(&client, "#charts .chart[data-title=\"Dataset sizes\"]").await;
    assert_eq!(
        sizes.attr("data-scale").await.unwrap().as_deref(),
        Some("log")
    );
    let labels = client
        .execute(
            "return [compact(20000), compact(1800), compact(1500000), compact(0.25)]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(labels, serde_json::json!(["20k", "1.8k", "1.5M", "0.25"]));
    let timeline = css(&client, "#rounds").await.text().await.unwrap();
    assert!(
        timeline.contains("Round 1") && !timeline.contains("Round 0"),
        "{timeline}"
    );
    let lineage = css(&client, "#lineage").await.text().await.unwrap();
    assert!(lineage.contains("promoted after round 1"), "{lineage}");
    // Flywheel analytics per round, each chart with its series.
    for (title, series) in [
        (
            "Acceptance at each filter step",
            "filter.sft_acceptance_rate",
        ),
        ("Reward distribution", "filter.reward_p50"),
        ("Response length (characters)", "filter.response_chars_mean"),
        ("Diversity", "filter.response_distinct_2"),
        (
            "Reward model agreement with checkers",
            "filter.rm_checker_agreement",
        ),
        ("Win rate with its 95% interval", "evaluate.win_rate_ci_low"),
        (
            "Drift from the previous round: rewards and rates",
            "filter.reward_mean_drift",
        ),
        (
            "Drift from the previous round: length",
            "filter.response_chars_mean_drift",
        ),
        (
            "Cost per accepted sample (s)",
            "round.worker_seconds_per_accepted",
        ),
    ] {
        let chart = css(
            &client,
            &format!("#analytics .chart[data-title=\"{title}\"] .uplot"),
        )
        .await;
        let legend = chart.text().await.unwrap();
        assert!(legend.contains(series), "{title}: {legend}");
    }
    // The last finished round's data and model cards, and round 1's a click away.
    let model = css(
        &client,
        "#round-cards .cards[data-round=\"1\"] .round-card[data-kind=\"model\"]",
    )
    .await;
    assert!(
        model
            .text()
            .await
            .unwrap()
            .contains("Model card: test-backend-two-rounds · round 2"),
    );
    css(&client, "#round-cards button[data-card-round=\"0\"]")
        .await
        .click()
        .await
        .unwrap();
    let data = css(
        &client,
        "#round-cards .cards[data-round=\"0\"] .round-card[data-kind=\"data\"]",
    )
    .await;
    let text = data.text().await.unwrap();
    assert!(
        text.contains("Data card: test-backend-two-rounds · round 1")
            && text.contains("## Filter `filter`"),
        "{text}"
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.unwrap();
    std::fs::write(dir.join("dashboard.png"), &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"));

    // The workers page lists both workers with their pools; a task page shows its attempts.
    client
        .goto(&format!("http://{addr}/#/workers"))
        .await
        .unwrap();
    let gpu = css(&client, "#worker-list tr[data-name=\"gpu-1\"]").await;
    assert!(gpu.text().await.unwrap().contains("h100"));
    let rounds = c.rounds(&campaign.id).await;
    let task = &rounds[1].stages[1].tasks[0];
    client
        .goto(&format!("http://{addr}/#/task/{}", task.id))
        .await
        .unwrap();
    let attempts = css(&client, "#attempts table").await.text().await.unwrap();
    assert!(attempts.contains("succeeded"), "{attempts}");

    // A synthetic-data campaign: per-pipeline counts and removal counts are charted per round
    // (round 1 removes everything round 0 wrote).
    c.add_worker("sdg-1", "sdg", &["--backend", "openai"]);
    let (_writer, base) = scripted_server(&c.dir).await;
    let model = init_model(&c.dir, "gen", false);
    let sdg = c
        .create(&format!(
            "apiVersion: flywheel/v1
name: sdg-charts
models:
  generator: {{ name: tiny, uri: \"file://{m}\" }}
  base: {{ name: base, uri: \"file://{m}\" }}
  reward: {{ name: reward, uri: \"file://{m}\" }}
rounds: 2
defaults: {{ pool: sdg, backend: openai, max_attempts: 1 }}
recipe:
  stages:
    - {{ name: open_qa, kind: synthesize_prompts, params: {{ base_url: \"{base}\", topics: [Tea], n_revisions: 1 }} }}
    - {{ name: math, kind: synthesize_prompts, needs: [], params: {{ base_url: \"{base}\", pipeline: math, topics: [Sets] }} }}
",
            m = model.display()
        ))
        .await;
    c.wait_status(&sdg.id, "succeeded", Duration::from_secs(60))
        .await;
    client
        .goto(&format!("http://{addr}/#/campaign/{}", sdg.id))
        .await
        .unwrap();
    for title in ["Synthetic prompts by pipeline", "Prompts removed"] {
        let chart = css(
            &client,
            &format!("#charts .chart[data-title=\"{title}\"] .uplot"),
        )
        .await;
        let legend = chart.text().await.unwrap();
        assert!(
            legend.contains("open_qa.") && legend.contains("math."),
            "{title}: {legend}"
        );
    }
    let removed = css(&client, "#charts .chart[data-title=\"Prompts removed\"]")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        removed.contains("open_qa.removed_earlier_round"),
        "{removed}"
    );
    client.close().await.unwrap();
}
