//! Synthetic data generation through real campaigns: every `synthesize_prompts` pipeline on the
//! `openai` backend against the scripted fixture server (canned answers, so counts, parsing,
//! revisions, failures and provenance are checked exactly) and against `flywheel serve-model`
//! (the wire format and the weights that wrote the prompts); dedup across rounds and
//! decontamination; a two-turn round trip through generate, score, filter and a trainer's
//! export; and seed files that fail the stage with the file and line named.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Cluster, artifacts_of, campaign_spec, init_model, read_rows, reward_service, scripted_server,
    serve_model, stage_error,
};
use flywheel_proto::v1::Artifact;
use serde_json::{Value, json};

fn write_jsonl(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Campaigns on the `openai` backend, one attempt per task; the model stands in for all three.
fn spec(name: &str, model: &Path, rounds: u32, stages: &str) -> String {
    campaign_spec(
        name,
        model,
        model,
        rounds,
        "pool: cpu, backend: openai, max_attempts: 1",
        stages,
    )
}

/// The prompts a stage wrote in a round.
fn prompts_of(arts: &[Artifact], stage: &str, round: i32) -> Vec<Value> {
    read_rows(
        arts.iter()
            .find(|a| a.producer_stage == stage && a.round_index == round && a.name == "prompts")
            .unwrap_or_else(|| panic!("no prompts of {stage} in round {round}")),
    )
}

fn metric(c: &BTreeMap<String, f64>, key: &str) -> f64 {
    *c.get(key)
        .unwrap_or_else(|| panic!("no metric {key} in {c:?}"))
}

#[tokio::test]
async fn every_pipeline_against_the_scripted_server_with_dedup_across_rounds() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    c.add_worker("cpu-0", "cpu", &["--backend", "openai", "--slots", "4"]);
    let (_server, base) = scripted_server(&c.dir).await;
    let held_out = write_jsonl(
        &c.dir,
        "held-out.jsonl",
        &[json!({ "prompt": "What shaped The history of Technology the most?" })],
    );
    let docs = write_jsonl(
        &c.dir,
        "docs.jsonl",
        &[
            json!({ "text": "The Nile is the longest river in Africa." }),
            json!({ "document": "Rust guarantees memory safety without a garbage collector." }),
            json!({ "text": "An unlistable text." }),
        ],
    );
    let llm = format!("base_url: \"{base}\", seed: 5");
    let stages = format!(
        "    - {{ name: heldout, kind: synthesize_prompts, params: {{ pipeline: none, seeds: \"file://{held}\", split: held_out }} }}
    - {{ name: open_qa, kind: synthesize_prompts, needs: [heldout], params: {{ {llm}, n_macro_topics: 2, n_subtopics: 2, n_openlines: 2, n_revisions: 1 }} }}
    - {{ name: writing, kind: synthesize_prompts, needs: [], params: {{ {llm}, pipeline: writing, topics: [Rivers], document_types: [Poem, Technical report], n_openlines: 2, n_revisions: 1 }} }}
    - {{ name: closed_qa, kind: synthesize_prompts, needs: [], params: {{ {llm}, pipeline: closed_qa, documents: \"file://{docs}\", n_openlines: 2, max_conversion_failure_rate: 0.5 }} }}
    - {{ name: math, kind: synthesize_prompts, needs: [], params: {{ {llm}, pipeline: math, n_macro_topics: 2, n_subtopics: 2, n_openlines: 2, level: beginner }} }}
    - {{ name: coding, kind: synthesize_prompts, needs: [], params: {{ {llm}, pipeline: coding, topics: [Closures], language: Rust, level: advanced, n_openlines: 2 }} }}
",
        held = held_out.display(),
        docs = docs.display(),
    );
    let campaign = c.create(&spec("sdg-pipelines", &model, 2, &stages)).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(120))
        .await;
    let arts = artifacts_of(&c, &campaign.id).await;
    let rounds = c.rounds(&campaign.id).await;
    let m = |round: usize, stage: &str| -> BTreeMap<String, f64> {
        rounds[round]
            .metrics
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&format!("{stage}."))?.to_string(), *v)))
            .collect()
    };

    // open_qa: 1 macro-topic request (2 of 3 kept), 2 subtopic requests (a fenced JSON array
    // each), 4 question requests (bullets), 8 revision requests (`1)` lists, 1 of 2 kept); the
    // revision of the held-out question is removed as contaminated.
    let open = prompts_of(&arts, "open_qa", 0);
    let om = m(0, "open_qa");
    assert_eq!(metric(&om, "list_requests"), 15.0);
    assert_eq!(metric(&om, "synthetic_prompts"), 8.0);
    assert_eq!(metric(&om, "removed_contaminated"), 1.0);
    assert_eq!(open.len(), 7);
    let q = open
        .iter()
        .find(|r| r["provenance"]["topic"] == "The history of Food and drinks")
        .unwrap();
    assert_eq!(q["provenance"]["macro_topic"], "Food and drinks");
    assert_eq!(
        q["provenance"]["templates"],
        json!(["macro_topics", "subtopics", "questions", "revise"])
    );
    assert!(
        q["provenance"]["original"]
            .as_str()
            .unwrap()
            .starts_with("What shaped The history of Food and drinks")
    );
    assert!(
        q["prompt"]
            .as_str()
            .unwrap()
            .ends_with("Explain it to a child.")
    );
    assert_eq!(q["provenance"]["written_by"]["base_url"], base);
    assert!(["sft", "preference"].contains(&q["pool"].as_str().unwrap()));
    assert!(!open.iter().any(|r| {
        r["prompt"]
            .as_str()
            .unwrap()
            .contains("What shaped The history of Technology the most?")
    }));

    // writing: 1 topic x 2 document types, 2 tasks each, 1 revision each.
    let writing = prompts_of(&arts, "writing", 0);
    assert_eq!(writing.len(), 4);
    assert_eq!(metric(&m(0, "writing"), "list_requests"), 6.0);
    assert!(writing.iter().any(|r| {
        r["provenance"]["document_type"] == "Technical report"
            && r["prompt"]
                .as_str()
                .unwrap()
                .ends_with("Use no more than 300 words.")
    }));

    // closed_qa: the unlistable document's answer is a counted conversion failure; the others'
    // instructions are joined to their document.
    let closed = prompts_of(&arts, "closed_qa", 0);
    let cm = m(0, "closed_qa");
    assert_eq!(metric(&cm, "conversion_failures"), 1.0);
    assert!((metric(&cm, "conversion_failure_rate") - 1.0 / 3.0).abs() < 1e-9);
    assert_eq!(closed.len(), 4);
    assert!(closed.iter().any(|r| r["prompt"]
        == "The Nile is the longest river in Africa.\n\nSummarize the text in one sentence."));
    assert_eq!(closed[0]["provenance"]["document"]["line"], 1);

    // math: macro topics, subtopics (a bare JSON array), beginner problems.
    let math = prompts_of(&arts, "math", 0);
    assert_eq!(math.len(), 8);
    assert_eq!(metric(&m(0, "math"), "list_requests"), 7.0);
    assert!(math.iter().all(|r| r["provenance"]["level"] == "beginner"));
    assert!(
        math.iter()
            .any(|r| r["prompt"] == "Compute a simple example of Eigenvalues in Linear algebra.")
    );

    // coding: given topics, the advanced template, the language filled in.
    let coding = prompts_of(&arts, "coding", 0);
    assert_eq!(coding.len(), 2);
    assert_eq!(
        coding[0]["provenance"]["templates"],
        json!(["coding_problems_advanced"])
    );
    assert!(coding[0]["prompt"].as_str().unwrap().contains("Rust"));
    let log = std::fs::read_to_string(c.dir.join("scripted-requests.jsonl")).unwrap();
    assert!(log.contains("suitable for advanced programmers"));

    // Round 2 asks the same questions and gets the same answers: every prompt was seen in
    // round 1 and is removed.
    for (stage, first) in [
        ("open_qa", 7),
        ("writing", 4),
        ("closed_qa", 4),
        ("math", 8),
        ("coding", 2),
    ] {
        let again = m(1, stage);
        assert_eq!(
            metric(&again, "prompts"),
            0.0,
            "{stage} in round 2: {again:?}"
        );
        assert_eq!(
            metric(&again, "removed_earlier_round"),
            first as f64,
            "{stage}"
        );
        assert!(prompts_of(&arts, stage, 1).is_empty());
    }
    // Per-pipeline counts are round metrics (the dashboard charts them).
    assert_eq!(metric(&m(0, "open_qa"), "prompts_open_qa"), 7.0);
    assert_eq!(metric(&m(0, "heldout"), "prompts_seed"), 1.0);
}

/// Every pipeline through `flywheel serve-model`: a tiny model writes poor lists, so failures are
/// allowed; what is checked is the wire format (every request answered), the counts of
/// requests each pipeline makes, and that the prompts record the weights that wrote them.
#[tokio::test]
async fn every_pipeline_through_serve_model_records_the_weights_that_wrote_it() {
    let mut c = Cluster::start().await;
    // The default templates are long: a context that holds them.
    let model = common::init_model_with(&c.dir, "gen", false, &["--max-seq", "640"]);
    c.add_worker("cpu-0", "cpu", &["--backend", "openai", "--slots", "5"]);
    let (_server, base) = serve_model(&c.dir, &model, "tiny-writer").await;
    let docs = write_jsonl(&c.dir, "docs.jsonl", &[json!({ "text": "add 2 3" })]);
    let llm = format!(
        "base_url: \"{base}\", model: tiny-writer, max_tokens: 12, max_conversion_failure_rate: 1.0, n_macro_topics: 2, n_subtopics: 1, n_openlines: 2"
    );
    let stages = format!(
        "    - {{ name: open_qa, kind: synthesize_prompts, params: {{ {llm}, n_revisions: 1 }} }}
    - {{ name: writing, kind: synthesize_prompts, needs: [], params: {{ {llm}, pipeline: writing, topics: [add], document_types: [Poem], n_revisions: 0 }} }}
    - {{ name: closed_qa, kind: synthesize_prompts, needs: [], params: {{ {llm}, pipeline: closed_qa, documents: \"file://{docs}\" }} }}
    - {{ name: math, kind: synthesize_prompts, needs: [], params: {{ {llm}, pipeline: math }} }}
    - {{ name: coding, kind: synthesize_prompts, needs: [], params: {{ {llm}, pipeline: coding, topics: [sort] }} }}
",
        docs = docs.display()
    );
    let campaign = c.create(&spec("sdg-served", &model, 1, &stages)).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(120))
        .await;
    let arts = artifacts_of(&c, &campaign.id).await;
    let rounds = c.rounds(&campaign.id).await;
    let hash = flywheel_worker::artifacts::hash_dir(&model).unwrap();
    for stage in ["open_qa", "writing", "closed_qa", "math", "coding"] {
        let get = |k: &str| rounds[0].metrics[&format!("{stage}.{k}")];
        // The requests made: one per list, every one answered (no HTTP failures).
        assert!(get("list_requests") >= 1.0, "{stage}");
        assert!(get("requests") >= get("list_requests"), "{stage}");
        let out = arts
            .iter()
            .find(|a| a.producer_stage == stage && a.name == "prompts")
            .unwrap();
        let meta: Value = serde_json::from_str(&out.metadata_json).unwrap();
        assert_eq!(meta["served_hashes"], json!([hash]), "{stage}: {meta}");
        for r in read_rows(out) {
            assert_eq!(r["provenance"]["pipeline"], stage);
            assert_eq!(r["provenance"]["written_by"]["base_url"], base);
        }
    }
    assert_eq!(rounds[0].metrics["writing.list_requests"], 1.0);
    assert_eq!(rounds[0].metrics["closed_qa.list_requests"], 1.0);
    assert_eq!(rounds[0].metrics["coding.list_requests"], 1.0);
}

/// Seed prompts (one a conversation, one in IFEval's format) with two-turn prompts and
/// instructions, through generate, score (a reward service), filter and a trainer's export:
/// `messages` records end to end.
#[tokio::test]
async fn two_turn_prompts_round_trip_through_score_filter_and_the_trainer_export() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    c.add_worker(
        "cpu-0",
        "cpu",
        &[
            "--backend",
            "openai",
            "--backend",
            "reward_endpoint",
            "--backend",
            "builtin",
            "--backend",
            "external",
        ],
    );
    let (_server, base) = scripted_server(&c.dir).await;
    let (_rm, rm_port) = reward_service(&c.dir).await;
    let seeds = write_jsonl(
        &c.dir,
        "seeds.jsonl",
        &[
            json!({ "prompt": "Plan a weekend trip to the mountains for a family of four." }),
            json!({ "prompt": "plan a weekend trip to the mountains for a family of four!" }),
            json!({ "prompt": "Explain how vaccines train the immune system, step by step, for a curious teenager." }),
            json!({ "prompt": "Explain how vaccines train the immune system, step by step, for a curious teenagers." }),
            json!({ "messages": [
                { "role": "user", "content": "Hi there." },
                { "role": "assistant", "content": "Hello! How can I help?" },
                { "role": "user", "content": "Suggest a name for a bakery." } ] }),
            json!({ "prompt": "Write a haiku about autumn leaves.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}] }),
            json!({ "prompt": "Describe the water cycle to a ten year old using a simple story about a raindrop." }),
            json!({ "prompt": "List four ways to reduce food waste at home and explain why each one works." }),
        ],
    );
    // Every eligible seed becomes two-turn: the draw is seeded by the campaign id, and at a
    // share of 0.6 it drew none of the four in about 3% of runs (0.4^4).
    let stages = format!(
        "    - {{ name: prompts, kind: synthesize_prompts, params: {{ pipeline: none, seeds: \"file://{seeds}\", base_url: \"{base}\", two_turn_share: 1.0, instruction_share: 1.0, instruction_types: [punctuation:no_comma], preference_share: 0.0, seed: 3 }} }}
    - {{ name: generate, kind: generate, params: {{ base_url: \"{base}\", k: 2 }} }}
    - {{ name: score, kind: score, backend: reward_endpoint, params: {{ url: \"http://127.0.0.1:{rm_port}/v1/chat/completions\", model: test-reward }} }}
    - {{ name: filter, kind: filter, backend: builtin }}
    - {{ name: sft, kind: sft, backend: external, params: {{ command: [sh, -c, \"cp {{sft_dir}}/train.jsonl {{output_dir}}/train.jsonl\"] }} }}
    - {{ name: dialogues, kind: synthesize_prompts, needs: [], params: {{ pipeline: none, seeds: \"file://{seeds}\", base_url: \"{base}\", two_turn_share: 1.0, dialogue_turns: 3 }} }}
",
        seeds = seeds.display()
    );
    let campaign = c.create(&spec("sdg-two-turn", &model, 1, &stages)).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(120))
        .await;
    let arts = artifacts_of(&c, &campaign.id).await;
    let rounds = c.rounds(&campaign.id).await;
    let get = |k: &str| rounds[0].metrics[&format!("prompts.{k}")];
    assert_eq!(get("removed_exact"), 1.0);
    assert_eq!(get("removed_near"), 1.0);
    assert_eq!(get("prompts"), 6.0);
    let prompts = prompts_of(&arts, "prompts", 0);
    let two_turn: Vec<&Value> = prompts
        .iter()
        .filter(|r| r["provenance"]["templates"] == json!(["follow_up"]))
        .collect();
    assert!(!two_turn.is_empty(), "{prompts:?}");
    for r in &two_turn {
        let m = r["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1]["content"], "Here is my answer.",
            "the endpoint answered the first turn"
        );
        assert_eq!(
            m[2]["content"],
            "Could you give a concrete example of that?"
        );
        assert_eq!(r["prompt"], m[2]["content"]);
    }
    let haiku = prompts
        .iter()
        .find(|r| r["prompt"] == "Write a haiku about autumn leaves.")
        .unwrap();
    assert_eq!(
        haiku["instructions"],
        json!([{ "id": "punctuation:no_comma" }])
    );
    assert!(
        prompts
            .iter()
            .any(|r| r["messages"][0]["content"] == "Hi there.")
    );

    // Dialogues: user, reply, follow-up, reply, follow-up (the seed conversation, and the seed
    // carrying its own instructions, stay as they are).
    let dialogues = prompts_of(&arts, "dialogues", 0);
    let five = dialogues
        .iter()
        .filter(|r| r["messages"].as_array().is_some_and(|m| m.len() == 5))
        .count();
    assert_eq!(five, dialogues.len() - 2, "{dialogues:?}");
    assert_eq!(rounds[0].metrics["dialogues.requests"], 4.0 * five as f64);

    // Every conversation reached the scorer whole, and the trainer's SFT file has each turn.
    let scores = read_rows(arts.iter().find(|a| a.producer_stage == "score").unwrap());
    let scored_two_turn = scores
        .iter()
        .filter(|s| s["messages"].as_array().is_some_and(|m| m.len() == 3))
        .count();
    assert_eq!(scored_two_turn, 2 * (two_turn.len() + 1));
    let haiku_score = scores
        .iter()
        .find(|s| s["prompt"] == "Write a haiku about autumn leaves.")
        .unwrap();
    assert_eq!(
        haiku_score["instructions_followed"]["strict"],
        json!([true])
    );
    let model_dir = flywheel_worker::artifacts::path_of(
        &arts
            .iter()
            .find(|a| a.producer_stage == "sft" && a.kind == "model")
            .unwrap()
            .uri,
    )
    .unwrap();
    let exported: Vec<Value> = std::fs::read_to_string(model_dir.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let four_turns = exported
        .iter()
        .filter(|r| r["messages"].as_array().is_some_and(|m| m.len() == 4))
        .count();
    assert_eq!(four_turns, two_turn.len() + 1, "{exported:?}");
    for r in &exported {
        let m = r["messages"].as_array().unwrap();
        assert_eq!(m.last().unwrap()["role"], "assistant");
    }
}

/// Bad seed files (JSONL and Parquet) fail the stage, naming the file and the line or column;
/// a good Parquet file seeds it.
#[tokio::test]
async fn bad_seed_files_fail_the_stage_naming_file_and_line() {
    let mut c = Cluster::start().await;
    let model = init_model(&c.dir, "gen", false);
    c.add_worker("cpu-0", "cpu", &["--backend", "openai", "--slots", "4"]);
    let missing = write_jsonl(
        &c.dir,
        "missing.jsonl",
        &[json!({ "prompt": "ok" }), json!({ "text": "no prompt" })],
    );
    let invalid = c.dir.join("invalid.jsonl");
    std::fs::write(
        &invalid,
        "{\"prompt\": \"ok\"}\n{\"prompt\": \"ok\"}\n{not json\n",
    )
    .unwrap();
    let empty = c.dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let fixtures = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"));
    let wrong_schema = fixtures.join("seeds-wrong-schema.parquet");
    for (name, file, expected) in [
        (
            "missing",
            &missing,
            format!(
                "{}: line 2: missing column prompt (or messages)",
                missing.display()
            ),
        ),
        (
            "invalid",
            &invalid,
            format!("{}: line 3: invalid JSON", invalid.display()),
        ),
        (
            "empty",
            &empty,
            format!("{}: the seed file is empty", empty.display()),
        ),
        (
            "wrong-schema",
            &wrong_schema,
            format!(
                "{}: missing column prompt (or messages); the file has text, id",
                wrong_schema.display()
            ),
        ),
    ] {
        let stages = format!(
            "    - {{ name: prompts, kind: synthesize_prompts, params: {{ pipeline: none, seeds: \"file://{}\" }} }}\n",
            file.display()
        );
        let campaign = c
            .create(&spec(&format!("bad-seeds-{name}"), &model, 1, &stages))
            .await;
        c.wait_status(&campaign.id, "failed", Duration::from_secs(60))
            .await;
        let error = stage_error(&c, &campaign.id, "prompts").await;
        assert!(error.contains(&expected), "{name}: {error}");
    }
    // A good Parquet file (written by pyarrow) seeds a stage.
    let stages = format!(
        "    - {{ name: prompts, kind: synthesize_prompts, params: {{ pipeline: none, seeds: \"file://{}\" }} }}\n",
        fixtures.join("seeds.parquet").display()
    );
    let campaign = c.create(&spec("parquet-seeds", &model, 1, &stages)).await;
    c.wait_status(&campaign.id, "succeeded", Duration::from_secs(60))
        .await;
    let arts = artifacts_of(&c, &campaign.id).await;
    let prompts = prompts_of(&arts, "prompts", 0);
    assert_eq!(prompts.len(), 2);
    assert!(
        prompts
            .iter()
            .any(|r| r["prompt"] == "Name three rivers in Europe.")
    );
}
