//! Flywheel analytics and round cards on a finished test-backend campaign (real controller,
//! worker processes and Postgres): every figure is recomputed here by hand from the round's
//! scored samples and its attempts, and the cards are checked against the recorded artifacts.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{Cluster, artifacts_of, example_spec, http, read_rows};
use flywheel_proto::v1::Artifact;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The figures of `flywheel_worker::analytics`, from the definitions in its docs.
fn by_hand(rows: &[Value], margin: f64) -> BTreeMap<&'static str, f64> {
    let mut by_prompt: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in rows {
        by_prompt
            .entry(r["prompt_id"].to_string())
            .or_default()
            .push(r);
    }
    let reward = |r: &Value| r["reward"].as_f64().unwrap();
    // The verifier ranks first, the reward second.
    let rank = |a: &&&Value, b: &&&Value| {
        (a["verified"] == true)
            .cmp(&(b["verified"] == true))
            .then(reward(a).total_cmp(&reward(b)))
    };
    let (mut verified, mut pairs_distinct, mut pairs) = (0.0, 0.0, 0.0);
    let (mut agree, mut compared) = (0.0, 0.0);
    let mut sft_rewards = vec![];
    for samples in by_prompt.values() {
        let best = samples.iter().max_by(rank).unwrap();
        let worst = samples.iter().min_by(rank).unwrap();
        if best["verified"] == true {
            verified += 1.0;
            sft_rewards.push(reward(best));
            if best["response"] != worst["response"] {
                pairs_distinct += 1.0;
                let by_verifier = worst["verified"] == false;
                pairs += (by_verifier || reward(best) - reward(worst) >= margin) as u8 as f64;
            }
        }
        for g in samples.iter().filter(|s| s["verified"] == true) {
            for b in samples.iter().filter(|s| s["verified"] == false) {
                compared += 1.0;
                agree += if reward(g) > reward(b) {
                    1.0
                } else if reward(g) == reward(b) {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    let prompts = by_prompt.len() as f64;
    let n = rows.len() as f64;
    let mut rewards: Vec<f64> = rows.iter().map(reward).collect();
    rewards.sort_by(f64::total_cmp);
    let mean = rewards.iter().sum::<f64>() / n;
    let std = (rewards.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let rank = |q: f64| rewards[((q * n).ceil() as usize).max(1) - 1];
    let responses: Vec<&str> = rows
        .iter()
        .map(|r| r["response"].as_str().unwrap())
        .collect();
    let distinct = |texts: &[&str], k: usize| {
        let grams: Vec<Vec<&str>> = texts
            .iter()
            .flat_map(|t| {
                let w: Vec<&str> = t.split_whitespace().collect();
                w.windows(k).map(<[&str]>::to_vec).collect::<Vec<_>>()
            })
            .collect();
        grams.iter().collect::<HashSet<_>>().len() as f64 / grams.len() as f64
    };
    let prompt_texts: Vec<&str> = by_prompt
        .values()
        .map(|s| s[0]["prompt"].as_str().unwrap())
        .collect();
    let passed = rows.iter().filter(|r| r["verified"] == true).count() as f64;
    let chars = |t: &&str| t.chars().count() as f64;
    BTreeMap::from([
        ("prompts", prompts),
        ("samples", n),
        ("sft_records", verified),
        ("pair_records", pairs),
        ("sft_verified_rate", verified / prompts),
        ("sft_min_reward_rate", 1.0),
        ("sft_acceptance_rate", verified / prompts),
        ("pair_distinct_rate", pairs_distinct / prompts),
        ("pair_margin_rate", pairs / pairs_distinct),
        ("pair_acceptance_rate", pairs / prompts),
        ("verified_sample_rate", passed / n),
        ("reward_mean", mean),
        ("reward_std", std),
        ("reward_p10", rank(0.1)),
        ("reward_p50", rank(0.5)),
        ("reward_p90", rank(0.9)),
        (
            "sft_reward_mean",
            sft_rewards.iter().sum::<f64>() / sft_rewards.len() as f64,
        ),
        (
            "response_chars_mean",
            responses.iter().map(chars).sum::<f64>() / n,
        ),
        (
            "response_words_mean",
            responses
                .iter()
                .map(|t| t.split_whitespace().count() as f64)
                .sum::<f64>()
                / n,
        ),
        ("response_distinct_1", distinct(&responses, 1)),
        ("response_distinct_2", distinct(&responses, 2)),
        ("prompt_distinct_2", distinct(&prompt_texts, 2)),
        // The test backend's samples of a prompt all differ ("answer #s to: ...").
        ("response_repeat_rate", 0.0),
        ("rm_checker_agreement", agree / compared),
        ("rm_checker_pairs", compared),
    ])
}

/// A number as the cards show it: whole numbers bare, others to 4 places.
fn shown(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x}")
    } else {
        format!("{x:.4}")
    }
}

/// A content hash as the cards show it: 16 hex digits.
fn short_hash(hash: &str) -> &str {
    &hash.strip_prefix("sha256:").unwrap()[..16]
}

fn round_outputs<'a>(arts: &'a [Artifact], round: i32, stage: &str) -> Vec<&'a Artifact> {
    arts.iter()
        .filter(|a| a.round_index == round && a.producer_stage == stage && a.kind == "dataset")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn analytics_match_a_hand_computation_and_each_round_has_its_cards() {
    let mut c = Cluster::start().await;
    c.add_worker("gpu-1", "gpu", &["--gpu-kind", "h100", "--gpu-count", "2"]);
    c.add_worker("cpu-1", "cpu", &[]);
    let spec = example_spec(&[(
        "params: { margin: 0.2 }",
        "params: { margin: 0.2, require_verified: true }",
    )]);
    let campaign = c.create(&spec).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(120))
        .await;
    let rounds = c.rounds(&campaign.id).await;
    let arts = artifacts_of(&c, &campaign.id).await;
    let mut db = c.db.connect().await;
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        let rows: Vec<Value> = round_outputs(&arts, r.index, "score")
            .into_iter()
            .flat_map(read_rows)
            .collect();
        assert_eq!(rows.len(), 48, "12 prompts × k 4");
        for (name, want) in by_hand(&rows, 0.2) {
            let got = r.metrics[&format!("filter.{name}")];
            assert!(
                (got - want).abs() < 1e-9,
                "round {}: filter.{name} = {got}, by hand {want}",
                r.index + 1
            );
        }
        // Near duplicates are the prompt dedup's own MinHash, run on the round's prompts.
        let prompts: Vec<String> = rows
            .iter()
            .filter(|r| r["sample"] == 0)
            .map(|r| r["prompt"].as_str().unwrap().to_string())
            .collect();
        let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let fates = flywheel_worker::sdg::dedup::dedup(&texts, &[], &[], Default::default());
        let kept = flywheel_worker::sdg::dedup::tally(&fates).0;
        assert_eq!(
            r.metrics["filter.prompt_near_duplicate_rate"],
            (texts.len() - kept) as f64 / texts.len() as f64
        );
        // Cost: every attempt's duration, and ×2 GPUs (one slot) on the gpu worker.
        let (worker_s, gpu_s): (f64, f64) = sqlx::query_as(
            "SELECT sum(EXTRACT(EPOCH FROM a.finished_at - a.started_at))::float8,
                    sum(EXTRACT(EPOCH FROM a.finished_at - a.started_at) * 2)
                        FILTER (WHERE t.pool = 'gpu')::float8
             FROM attempts a JOIN tasks t ON t.id = a.task_id JOIN rounds r ON r.id = t.round_id
             WHERE r.campaign_id = $1::uuid AND r.round_index = $2",
        )
        .bind(&campaign.id)
        .bind(r.index)
        .fetch_one(&mut db)
        .await
        .unwrap();
        let accepted = r.metrics["filter.sft_records"] + r.metrics["filter.pair_records"];
        let close = |k: &str, want: f64| {
            let got = r.metrics[k];
            assert!((got - want).abs() < 1e-6, "{k} = {got}, by hand {want}");
        };
        close("round.worker_seconds", worker_s);
        close("round.gpu_seconds", gpu_s);
        close("round.accepted_samples", accepted);
        close("round.worker_seconds_per_accepted", worker_s / accepted);
        close("round.gpu_seconds_per_accepted", gpu_s / accepted);
    }
    // Drift: round 2's value less round 1's; none for the first round.
    for name in [
        "reward_mean",
        "reward_p50",
        "response_chars_mean",
        "rm_checker_agreement",
    ] {
        let key = format!("filter.{name}");
        let drift = rounds[1].metrics[&key] - rounds[0].metrics[&key];
        assert!(
            (rounds[1].metrics[&format!("{key}_drift")] - drift).abs() < 1e-12,
            "{key}"
        );
        assert!(!rounds[0].metrics.contains_key(&format!("{key}_drift")));
    }

    // /metrics carries the latest round's analytics.
    let (status, scrape) = http(&c.http_addr(), "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    for key in ["filter.reward_p50", "round.worker_seconds_per_accepted"] {
        let line = format!(
            "flywheel_round_metric{{campaign_id=\"{}\",metric=\"{key}\"}} ",
            campaign.id
        );
        let value: f64 = scrape
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in /metrics"))
            .parse()
            .unwrap();
        assert!((value - rounds[1].metrics[key]).abs() < 1e-9, "{key}");
    }

    // Each round's data card and model card.
    let mut client = c.admin_client().await;
    for r in &rounds {
        let cards = client
            .round_cards(campaign.id.clone(), r.index)
            .await
            .unwrap();
        let kinds: Vec<&str> = cards.iter().map(|c| c.kind.as_str()).collect();
        assert_eq!(kinds, ["data", "model"]);
        for card in &cards {
            assert_eq!(
                card.content_hash,
                format!("{:x}", Sha256::digest(card.markdown.as_bytes()))
            );
            assert!(
                card.markdown
                    .contains(&format!("round {} of 2", r.index + 1)),
                "{}",
                card.markdown
            );
        }
        let data = &cards[0].markdown;
        for a in ["prompts", "generate", "score", "filter"]
            .iter()
            .flat_map(|s| round_outputs(&arts, r.index, s))
        {
            let records =
                serde_json::from_str::<Value>(&a.metadata_json).unwrap()["records"].clone();
            let line = format!(
                "| {} | {} | {} | `{}` | {} |",
                a.name,
                a.producer_stage,
                records,
                short_hash(&a.content_hash),
                a.uri
            );
            assert!(data.contains(&line), "no {line:?} in\n{data}");
        }
        assert!(data.contains("\"require_verified\":true"), "{data}");
        assert!(
            data.contains(&format!(
                "| SFT records | {} | {} |",
                r.metrics["filter.sft_records"],
                shown(r.metrics["filter.sft_acceptance_rate"])
            )),
            "{data}"
        );
        assert!(
            data.contains("| round.gpu_seconds_per_accepted |"),
            "{data}"
        );
        let model = &cards[1].markdown;
        let trained = arts.iter().find(|a| a.id == r.trained_model_id).unwrap();
        let sft = arts
            .iter()
            .find(|a| a.round_index == r.index && a.producer_stage == "sft" && a.kind == "model")
            .unwrap();
        for want in [
            format!(
                "`{}` (artifact `{}`, sha256 `{}`)",
                trained.name,
                trained.id,
                short_hash(&trained.content_hash)
            ),
            format!("Decision: **{}**", r.decision),
            "made by stage `rpo` from ".to_string(),
            format!("`{}` (`{}`)", sft.name, short_hash(&sft.content_hash)),
            format!(
                "| evaluate.win_rate | {} |",
                shown(r.metrics["evaluate.win_rate"])
            ),
        ] {
            assert!(model.contains(&want), "no {want:?} in\n{model}");
        }
    }
    // The same from the CLI (rounds counted from 1) and over HTTP; a round that does not
    // exist is named.
    let out = std::process::Command::new(common::BIN)
        .args([
            "campaign",
            "cards",
            &campaign.id,
            "--round",
            "2",
            "--kind",
            "model",
        ])
        .args(["--controller", &c.url()])
        .env("FLYWHEEL_TOKEN", &c.read_token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let model_card = &client.round_cards(campaign.id.clone(), 1).await.unwrap()[1];
    assert_eq!(printed, format!("{}\n", model_card.markdown));
    let (status, body) = http(
        &c.http_addr(),
        "GET",
        &format!("/api/v1/campaigns/{}/rounds/1/cards", campaign.id),
        Some(&c.admin),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["cards"][1]["kind"], "model");
    let err = client
        .round_cards(campaign.id.clone(), 7)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("round index 7 of campaign"),
        "{}",
        err.message()
    );
}

#[test]
fn a_stage_may_not_take_the_reserved_name_round() {
    let spec = example_spec(&[
        ("- name: filter\n", "- name: round\n"),
        ("needs: [sft, filter]", "needs: [sft, round]"),
    ]);
    let err = flywheel_orchestrator::spec::CampaignSpec::from_yaml(&spec)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("recipe.stages[3].name: \"round\" is reserved"),
        "{err}"
    );
    let stop = example_spec(&[(
        "rounds: 2",
        "rounds: 3\nstop_when: { metric: round.worker_seconds_per_accepted, gain_below: 0.5 }",
    )]);
    flywheel_orchestrator::spec::CampaignSpec::from_yaml(&stop).expect("round.* is a metric");
}
