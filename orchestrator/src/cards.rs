//! A finished round's data card and model card: markdown rendered from what Postgres recorded
//! of the round — the stages that made the data and their params, every dataset with its record
//! count and content hash, the filter's steps, the analytics, the trained model's parents, its
//! evaluation, the gate and its decision. Stored in `round_cards` with the round.

use std::collections::HashMap;
use std::fmt::Write;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::artifacts::ArtifactRow;
use crate::store::rounds::RoundRow;
use crate::store::tasks::TaskRow;
use flywheel_proto::stage::StageKind;

/// What a card is rendered from.
pub(crate) struct RoundFacts<'a> {
    pub campaign_name: &'a str,
    pub campaign_id: Uuid,
    pub rounds_total: i32,
    pub round: &'a RoundRow,
    pub tasks: &'a [TaskRow],
    /// Every artifact of the campaign (its starting models included).
    pub artifacts: &'a [ArtifactRow],
    /// The round's metrics as stored (analytics included).
    pub metrics: &'a Map<String, Value>,
}

/// A card's text and the SHA-256 of it.
pub(crate) struct Card {
    pub kind: &'static str,
    pub markdown: String,
    pub content_hash: String,
}

impl Card {
    fn new(kind: &'static str, markdown: String) -> Self {
        let content_hash = format!("{:x}", Sha256::digest(markdown.as_bytes()));
        Self {
            kind,
            markdown,
            content_hash,
        }
    }
}

/// The data card and the model card of the round.
pub(crate) fn render(f: &RoundFacts) -> [Card; 2] {
    // One task per stage (its first shard), in recipe order.
    let mut stages: Vec<&TaskRow> = f.tasks.iter().filter(|t| t.shard_index == 0).collect();
    stages.sort_by_key(|t| t.stage_order);
    [
        Card::new("data", data_card(f, &stages)),
        Card::new("model", model_card(f, &stages)),
    ]
}

fn of_kind<'a>(stages: &[&'a TaskRow], kind: StageKind) -> impl Iterator<Item = &'a TaskRow> {
    stages
        .iter()
        .copied()
        .filter(move |t| t.kind == kind.as_str())
}

fn stage_names<'a>(stages: &[&'a TaskRow], kind: StageKind) -> Vec<&'a str> {
    of_kind(stages, kind).map(|t| t.stage.as_str()).collect()
}

fn artifact<'a>(f: &RoundFacts<'a>, id: Uuid) -> Option<&'a ArtifactRow> {
    f.artifacts.iter().find(|a| a.id == id)
}

/// `name` (`id`, sha256 `abc…`) of an artifact, or its bare id when it is unknown.
fn describe(f: &RoundFacts, id: Uuid) -> String {
    match artifact(f, id) {
        Some(a) => format!(
            "`{}` (artifact `{}`, sha256 `{}`)",
            a.name,
            a.id,
            short(&a.content_hash)
        ),
        None => format!("artifact `{id}`"),
    }
}

/// The first 16 hex digits of a content hash (`sha256:` dropped), `-` when none is recorded.
fn short(hash: &str) -> &str {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    match hex.get(..16).unwrap_or(hex) {
        "" => "-",
        h => h,
    }
}

fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x}"),
        Some(x) => format!("{x:.4}"),
        None => v.to_string(),
    }
}

fn heading(f: &RoundFacts, what: &str) -> String {
    let mut s = format!(
        "# {what}: {} · round {}\n\n",
        f.campaign_name,
        f.round.round_index + 1
    );
    let _ = writeln!(
        s,
        "Campaign `{}` (`{}`), round {} of {}. Generator of the round: {}.\n",
        f.campaign_name,
        f.campaign_id,
        f.round.round_index + 1,
        f.rounds_total,
        describe(f, f.round.generator_id)
    );
    s
}

fn data_card(f: &RoundFacts, stages: &[&TaskRow]) -> String {
    let mut s = heading(f, "Data card");
    s.push_str(
        "## Sources\n\n| stage | kind | backend | shards | params |\n|---|---|---|---|---|\n",
    );
    let data_kinds = [
        StageKind::SynthesizePrompts,
        StageKind::Generate,
        StageKind::Score,
        StageKind::Filter,
    ];
    for t in stages
        .iter()
        .filter(|t| data_kinds.iter().any(|k| k.as_str() == t.kind))
    {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | `{}` |",
            t.stage, t.kind, t.backend, t.shard_count, t.params
        );
    }
    s.push_str(
        "\n## Datasets\n\n| dataset | stage | records | sha256 | uri |\n|---|---|---|---|---|\n",
    );
    let order: HashMap<&str, i32> = f
        .tasks
        .iter()
        .map(|t| (t.stage.as_str(), t.stage_order))
        .collect();
    let mut datasets: Vec<&ArtifactRow> = f
        .artifacts
        .iter()
        .filter(|a| a.kind == "dataset" && a.round_index == Some(f.round.round_index))
        .collect();
    datasets.sort_by_key(|a| {
        let stage = a.producer_stage.as_deref().unwrap_or_default();
        (
            order.get(stage).copied().unwrap_or(i32::MAX),
            a.name.clone(),
        )
    });
    for a in datasets {
        let _ = writeln!(
            s,
            "| {} | {} | {} | `{}` | {} |",
            a.name,
            a.producer_stage.as_deref().unwrap_or("-"),
            a.metadata.get("records").map_or("-".into(), number),
            short(&a.content_hash),
            a.uri
        );
    }
    for t in of_kind(stages, StageKind::Filter) {
        let m = &t.metrics;
        let get = |k: &str| m.get(k).map_or("-".to_string(), number);
        let _ = write!(
            s,
            "\n## Filter `{}`\n\nParams: `{}`.\n\n| step | passed | rate |\n|---|---|---|\n\
             | prompts | {} | |\n\
             | SFT: best sample passed the verifier and the instructions | | {} |\n\
             | SFT: reached min_reward | | {} |\n\
             | SFT records | {} | {} |\n\
             | pairs: best and worst differ | | {} |\n\
             | pairs: margin met or decided by a checker | | {} |\n\
             | pairs | {} | {} |\n",
            t.stage,
            t.params,
            get("prompts"),
            get("sft_verified_rate"),
            get("sft_min_reward_rate"),
            get("sft_records"),
            get("sft_acceptance_rate"),
            get("pair_distinct_rate"),
            get("pair_margin_rate"),
            get("pair_records"),
            get("pair_acceptance_rate"),
        );
    }
    // The filters' metrics are the round's analytics; `round.*` is its cost.
    let filters = stage_names(stages, StageKind::Filter);
    s.push_str(
        "\n## Analytics\n\n| metric | value | drift from the previous round |\n|---|---|---|\n",
    );
    for (k, v) in f.metrics {
        let is_analytics = k
            .split_once('.')
            .is_some_and(|(stage, _)| stage == crate::analytics::ROUND || filters.contains(&stage));
        if !is_analytics || k.ends_with("_drift") {
            continue;
        }
        let drift = f
            .metrics
            .get(&format!("{k}_drift"))
            .map_or(String::new(), |d| {
                format!("{:+.4}", d.as_f64().unwrap_or(0.0))
            });
        let _ = writeln!(s, "| {k} | {} | {drift} |", number(v));
    }
    s
}

fn model_card(f: &RoundFacts, stages: &[&TaskRow]) -> String {
    let mut s = heading(f, "Model card");
    let Some(model) = f.round.trained_model_id else {
        s.push_str("This round trained no model.\n");
        return s;
    };
    let _ = writeln!(s, "## Model\n\n{}", describe(f, model));
    if let Some(a) = artifact(f, model) {
        let _ = writeln!(s, "\nURI: {}", a.uri);
    }
    let decision = f.round.decision.as_deref().unwrap_or("undecided");
    let _ = writeln!(
        s,
        "\nDecision: **{decision}**{}.",
        f.round
            .decision_reason
            .as_deref()
            .filter(|r| !r.is_empty())
            .map_or(String::new(), |r| format!(" ({r})"))
    );
    s.push_str("\n## Lineage\n\n");
    // Walk the trained model's parents back to the round's inputs.
    let mut frontier = vec![model];
    let mut seen = vec![];
    while let Some(id) = frontier.pop() {
        if seen.contains(&id) {
            continue;
        }
        seen.push(id);
        let Some(a) = artifact(f, id) else { continue };
        if a.kind != "model" {
            continue;
        }
        let parents: Vec<String> = a
            .parent_ids
            .iter()
            .filter_map(|p| artifact(f, *p))
            .map(|p| format!("`{}` (`{}`)", p.name, short(&p.content_hash)))
            .collect();
        let origin = match (&a.producer_stage, parents.is_empty()) {
            (Some(stage), false) => format!("made by stage `{stage}` from {}", parents.join(", ")),
            (Some(stage), true) => format!("made by stage `{stage}`"),
            (None, _) => format!("a starting model, {}", a.uri),
        };
        let _ = writeln!(
            s,
            "- `{}` (sha256 `{}`): {origin}",
            a.name,
            short(&a.content_hash)
        );
        frontier.extend(a.parent_ids.iter().copied());
    }
    s.push_str("\n## Training\n\n| stage | kind | backend | params |\n|---|---|---|---|\n");
    for t in stages
        .iter()
        .filter(|t| StageKind::parse(&t.kind).is_some_and(StageKind::trains))
    {
        let _ = writeln!(
            s,
            "| {} | {} | {} | `{}` |",
            t.stage, t.kind, t.backend, t.params
        );
    }
    s.push_str("\n## Evaluation\n\n| metric | value |\n|---|---|\n");
    let evaluations = stage_names(stages, StageKind::Evaluate);
    for (k, v) in f.metrics {
        if k.split_once('.')
            .is_some_and(|(stage, _)| evaluations.contains(&stage))
        {
            let _ = writeln!(s, "| {k} | {} |", number(v));
        }
    }
    for t in of_kind(stages, StageKind::Promote) {
        let _ = writeln!(s, "\n## Gate `{}`\n\n`{}`", t.stage, t.params);
    }
    s
}
