//! Flywheel analytics of one round's samples, computed by the `filter` stage, the one stage that
//! sees every scored sample of the round. They become the filter's stage metrics (and so round
//! metrics, `filter.reward_p50`); the controller adds drift against the previous round and the
//! cost per accepted sample when the round finishes.
//!
//! - Acceptance at each filter step ([`Funnel`]): `sft_verified_rate`, `sft_min_reward_rate`,
//!   `sft_acceptance_rate`; `pair_distinct_rate`, `pair_margin_rate`, `pair_acceptance_rate`;
//!   `verified_sample_rate` (samples the verifier or the instruction checkers passed).
//! - Reward distribution: `reward_mean`, `reward_std` (population), `reward_p10|p50|p90`
//!   (nearest rank), `sft_reward_mean` (of the accepted SFT records).
//! - Length: `response_chars_mean`, `response_words_mean`, `sft_response_chars_mean`,
//!   `chosen_chars_mean`, `rejected_chars_mean` (verbosity of what is kept and preferred).
//! - Diversity: `prompt_distinct_2`, `response_distinct_1|2` (distinct whitespace-token n-grams
//!   over all n-grams, absent when there are none), `prompt_near_duplicate_rate` (MinHash, as the
//!   prompt dedup), `response_repeat_rate` (samples whose normalised text equals an earlier
//!   sample of the same prompt).
//! - `rm_checker_agreement`: over every (passed, failed) pair of samples of one prompt, the share
//!   the reward model ranks the passed one higher (a tie counts ½), from the model's own reward
//!   (`rm_reward` where the score stage overrode it with the checker, else `reward`);
//!   `rm_checker_pairs` is how many pairs. A falling agreement is reward hacking.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use crate::datasets::{Filtered, Funnel};
use crate::sdg::dedup;

/// Every figure above, plus `sft_records` and `pair_records`, for the filter's metrics.
pub fn of_filter(rows: &[Value], filtered: &Filtered) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: Option<f64>| {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            m.insert(k.to_string(), v);
        }
    };
    let Funnel {
        prompts,
        sft_candidates,
        sft_verified,
        sft_accepted,
        pair_candidates,
        pair_distinct,
        pair_accepted,
    } = filtered.funnel;
    put("sft_records", Some(filtered.sft.len() as f64));
    put("pair_records", Some(filtered.pairs.len() as f64));
    put("prompts", Some(prompts as f64));
    put("samples", Some(rows.len() as f64));
    put("sft_verified_rate", ratio(sft_verified, sft_candidates));
    put("sft_min_reward_rate", ratio(sft_accepted, sft_verified));
    put("sft_acceptance_rate", ratio(sft_accepted, sft_candidates));
    put("pair_distinct_rate", ratio(pair_distinct, pair_candidates));
    put("pair_margin_rate", ratio(pair_accepted, pair_distinct));
    put(
        "pair_acceptance_rate",
        ratio(pair_accepted, pair_candidates),
    );
    let checked: Vec<bool> = rows.iter().filter_map(passed).collect();
    put(
        "verified_sample_rate",
        ratio(checked.iter().filter(|&&p| p).count(), checked.len()),
    );

    let mut rewards: Vec<f64> = rows.iter().filter_map(|r| r["reward"].as_f64()).collect();
    rewards.sort_by(f64::total_cmp);
    put("reward_mean", mean(&rewards));
    put("reward_std", std_dev(&rewards));
    put("reward_p10", quantile(&rewards, 0.1));
    put("reward_p50", quantile(&rewards, 0.5));
    put("reward_p90", quantile(&rewards, 0.9));
    let sft_rewards: Vec<f64> = filtered
        .sft
        .iter()
        .filter_map(|r| r["reward"].as_f64())
        .collect();
    put("sft_reward_mean", mean(&sft_rewards));

    let responses: Vec<&str> = rows.iter().map(|r| text(&r["response"])).collect();
    put("response_chars_mean", mean_of(&responses, chars));
    put("response_words_mean", mean_of(&responses, words));
    let sft_answers: Vec<&str> = filtered
        .sft
        .iter()
        .filter_map(|r| {
            r["messages"]
                .as_array()?
                .last()
                .map(|t| text(&t["content"]))
        })
        .collect();
    put("sft_response_chars_mean", mean_of(&sft_answers, chars));
    let side = |k: &str| -> Vec<&str> { filtered.pairs.iter().map(|p| text(&p[k])).collect() };
    put("chosen_chars_mean", mean_of(&side("chosen"), chars));
    put("rejected_chars_mean", mean_of(&side("rejected"), chars));

    let mut prompts_seen = HashSet::new();
    let prompt_texts: Vec<&str> = rows
        .iter()
        .filter(|r| prompts_seen.insert(r["prompt_id"].to_string()))
        .map(|r| text(&r["prompt"]))
        .collect();
    put("prompt_distinct_2", distinct_n(&prompt_texts, 2));
    put("response_distinct_1", distinct_n(&responses, 1));
    put("response_distinct_2", distinct_n(&responses, 2));
    put(
        "prompt_near_duplicate_rate",
        near_duplicate_rate(&prompt_texts),
    );
    put("response_repeat_rate", repeat_rate(rows));

    let (agreement, pairs) = rm_checker_agreement(rows);
    if pairs > 0 {
        put("rm_checker_agreement", Some(agreement));
        put("rm_checker_pairs", Some(pairs as f64));
    }
    m
}

/// Whether a checker passed the sample; `None` where no checker judged it.
fn passed(row: &Value) -> Option<bool> {
    row["verified"].as_bool()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn chars(s: &str) -> f64 {
    s.chars().count() as f64
}

fn words(s: &str) -> f64 {
    s.split_whitespace().count() as f64
}

fn ratio(part: usize, whole: usize) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

fn mean_of(texts: &[&str], f: fn(&str) -> f64) -> Option<f64> {
    mean(&texts.iter().map(|t| f(t)).collect::<Vec<_>>())
}

fn std_dev(xs: &[f64]) -> Option<f64> {
    let m = mean(xs)?;
    mean(&xs.iter().map(|x| (x - m).powi(2)).collect::<Vec<_>>()).map(f64::sqrt)
}

/// Nearest-rank quantile of sorted values: the smallest value with at least `q` of them at or
/// below it.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    (n > 0).then(|| sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
}

/// Distinct whitespace-token n-grams over all n-grams of `texts`.
fn distinct_n(texts: &[&str], n: usize) -> Option<f64> {
    let mut all = 0usize;
    let mut distinct = HashSet::new();
    for t in texts {
        let tokens: Vec<&str> = t.split_whitespace().collect();
        for gram in tokens.windows(n) {
            all += 1;
            distinct.insert(gram.to_vec());
        }
    }
    ratio(distinct.len(), all)
}

/// Share of texts that are an exact or near duplicate of an earlier one.
fn near_duplicate_rate(texts: &[&str]) -> Option<f64> {
    let fates = dedup::dedup(texts, &[], &[], dedup::Settings::default());
    let (kept, ..) = dedup::tally(&fates);
    ratio(texts.len() - kept, texts.len())
}

/// Share of samples whose normalised response equals an earlier sample's of the same prompt.
fn repeat_rate(rows: &[Value]) -> Option<f64> {
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let repeats = rows
        .iter()
        .filter(|r| {
            !seen.insert((
                r["prompt_id"].to_string(),
                dedup::normalise(text(&r["response"])),
            ))
        })
        .count();
    ratio(repeats, rows.len())
}

/// The reward model's agreement with the checkers, and over how many sample pairs.
fn rm_checker_agreement(rows: &[Value]) -> (f64, usize) {
    let mut by_prompt: HashMap<String, (Vec<f64>, Vec<f64>)> = HashMap::new();
    for r in rows {
        let (Some(ok), Some(reward)) = (
            passed(r),
            r.get("rm_reward")
                .and_then(Value::as_f64)
                .or(r["reward"].as_f64()),
        ) else {
            continue;
        };
        let e = by_prompt.entry(r["prompt_id"].to_string()).or_default();
        (if ok { &mut e.0 } else { &mut e.1 }).push(reward);
    }
    let (mut agree, mut pairs) = (0.0, 0usize);
    for (good, bad) in by_prompt.values() {
        for g in good {
            for b in bad {
                pairs += 1;
                agree += match g.total_cmp(b) {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Less => 0.0,
                };
            }
        }
    }
    (if pairs > 0 { agree / pairs as f64 } else { 0.0 }, pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::filter;
    use serde_json::json;

    fn row(p: &str, prompt: &str, resp: &str, reward: f64, ok: Option<bool>) -> Value {
        let mut r = json!({ "prompt_id": p, "prompt": prompt, "response": resp, "reward": reward });
        if let Some(ok) = ok {
            r["verified"] = json!(ok);
        }
        r
    }

    #[test]
    fn every_figure_by_hand() {
        let rows = vec![
            row("1", "add two and two", "4", 3.0, Some(true)),
            row("1", "add two and two", "5", 1.0, Some(false)),
            row("1", "add two and two", "4", 2.0, Some(true)),
            row("2", "reverse the word cat", "tac", 0.5, Some(false)),
            row("2", "reverse the word cat", "the cat", 0.5, Some(false)),
            row("3", "upper case dog", "DOG", 1.0, None),
        ];
        let filtered = filter(&rows, 1.0, 0.0, true);
        let m = of_filter(&rows, &filtered);
        let get = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("no {k}"));
        // Prompt 1: best "4" (3.0) verified → SFT; worst "5" (1.0), margin 2 ≥ 1 → pair.
        // Prompt 2: best fails the verifier → neither. Prompt 3: one sample, no verdict → SFT.
        assert_eq!(get("prompts"), 3.0);
        assert_eq!(get("samples"), 6.0);
        assert_eq!(get("sft_records"), 2.0);
        assert_eq!(get("pair_records"), 1.0);
        assert_eq!(get("sft_verified_rate"), 2.0 / 3.0);
        assert_eq!(get("sft_min_reward_rate"), 1.0);
        assert_eq!(get("sft_acceptance_rate"), 2.0 / 3.0);
        // Pair candidates: prompts 1 and 2 (prompt 3 has one sample); prompt 2 is unusable.
        assert_eq!(get("pair_distinct_rate"), 0.5);
        assert_eq!(get("pair_margin_rate"), 1.0);
        assert_eq!(get("pair_acceptance_rate"), 0.5);
        assert_eq!(get("verified_sample_rate"), 2.0 / 5.0);
        assert_eq!(get("reward_mean"), 8.0 / 6.0);
        let var = [3.0, 1.0, 2.0, 0.5, 0.5, 1.0]
            .iter()
            .map(|x: &f64| (x - 8.0 / 6.0).powi(2))
            .sum::<f64>()
            / 6.0;
        assert!((get("reward_std") - var.sqrt()).abs() < 1e-12);
        // Sorted: 0.5 0.5 1 1 2 3: p10 = 1st, p50 = 3rd, p90 = 6th.
        assert_eq!(get("reward_p10"), 0.5);
        assert_eq!(get("reward_p50"), 1.0);
        assert_eq!(get("reward_p90"), 3.0);
        assert_eq!(get("sft_reward_mean"), 2.0);
        assert_eq!(
            get("response_chars_mean"),
            (1 + 1 + 1 + 3 + 7 + 3) as f64 / 6.0
        );
        assert_eq!(get("response_words_mean"), 7.0 / 6.0);
        assert_eq!(get("sft_response_chars_mean"), 2.0);
        assert_eq!(get("chosen_chars_mean"), 1.0);
        assert_eq!(get("rejected_chars_mean"), 1.0);
        // Tokens: 4 5 4 tac the cat DOG → 6 distinct of 7; one bigram ("the cat").
        assert_eq!(get("response_distinct_1"), 6.0 / 7.0);
        assert_eq!(get("response_distinct_2"), 1.0);
        // Prompt bigrams: 3 + 3 + 2 = 8, all distinct.
        assert_eq!(get("prompt_distinct_2"), 1.0);
        assert_eq!(get("prompt_near_duplicate_rate"), 0.0);
        // The second "4" of prompt 1 repeats the first.
        assert_eq!(get("response_repeat_rate"), 1.0 / 6.0);
        // Prompt 1: passed {3, 2} × failed {1}: both ranked right. Prompt 2 has no passed one.
        assert_eq!(get("rm_checker_agreement"), 1.0);
        assert_eq!(get("rm_checker_pairs"), 2.0);
    }

    #[test]
    fn agreement_reads_the_models_own_reward_and_counts_ties_half() {
        let mut good = row("1", "q", "a", 4.0, Some(true));
        good["rm_reward"] = json!(1.0);
        let bad = row("1", "q", "b", 1.0, Some(false));
        let mut worse = row("1", "q", "c", 0.0, Some(false));
        worse["rm_reward"] = json!(2.0);
        assert_eq!(rm_checker_agreement(&[good, bad, worse]), (0.25, 2));
    }

    #[test]
    fn near_duplicate_prompts_are_counted() {
        let rows = vec![
            row(
                "1",
                "write a short poem about the sea at night",
                "x",
                1.0,
                None,
            ),
            row(
                "2",
                "Write a short poem about the sea at night!",
                "y",
                1.0,
                None,
            ),
            row("3", "explain how a transistor works", "z", 1.0, None),
        ];
        let m = of_filter(&rows, &filter(&rows, 0.0, 0.0, false));
        assert_eq!(m["prompt_near_duplicate_rate"], 1.0 / 3.0);
        assert!(!m.contains_key("rm_checker_agreement"), "no checker judged");
    }
}
