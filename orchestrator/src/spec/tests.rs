use super::*;

const GOOD: &str = include_str!("../../../examples/test-backend.yaml");

#[test]
fn example_spec_validates() {
    let spec = CampaignSpec::from_yaml(GOOD).expect("valid");
    assert_eq!(spec.rounds, 2);
    let pref = spec
        .stages
        .iter()
        .find(|s| s.kind == StageKind::Preference)
        .unwrap();
    assert_eq!(pref.needs, vec!["sft".to_string(), "filter".to_string()]);
    let score = spec.stage("score").unwrap();
    assert_eq!(score.needs, vec!["generate".to_string()]);
    assert_eq!(spec.stage("generate").unwrap().placement.pool, "gpu");
    let gate = Requirement::from_params(&Value::Object(spec.stages.last().unwrap().params.clone()));
    assert_eq!(gate[0].metric, "evaluate.win_rate");
    assert_eq!(gate[0].op, CompareOp::Ge);
}

#[test]
fn every_example_spec_validates() {
    for (name, yaml) in [
        (
            "test-backend",
            include_str!("../../../examples/test-backend.yaml"),
        ),
        ("demo", include_str!("../../../examples/demo.yaml")),
        (
            "vllm-deployment",
            include_str!("../../../examples/vllm-deployment.yaml"),
        ),
        ("mixed", include_str!("../../../examples/mixed.yaml")),
        (
            "demo-served",
            include_str!("../../../examples/demo-served.yaml"),
        ),
        (
            "sdg-round",
            include_str!("../../../examples/sdg-round.yaml"),
        ),
    ] {
        if let Err(e) = CampaignSpec::from_yaml(yaml) {
            panic!("examples/{name}.yaml: {e}");
        }
    }
}

#[test]
fn every_file_in_examples_is_a_valid_spec_or_template() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // A template: every placeholder filled with a plausible value.
        let values = crate::template::parameters(&text)
            .unwrap()
            .into_iter()
            .map(|name| (name, "1".to_string()))
            .collect();
        let text = crate::template::render(&text, &values, &BTreeMap::new()).unwrap();
        if let Err(e) = CampaignSpec::from_yaml(&text) {
            panic!("{}: {e}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 5, "{checked} example files");
}

/// Bad specs, one problem each: unknown keys at every level, wrong types, values out of
/// range, and a backend that does not run the kind; each error names its path.
#[test]
fn bad_specs_name_the_path_of_their_problem() {
    let cases: &[(&str, &str, &str)] = &[
        ("rounds: 2", "rounds: 2\nround: 3", "round: unknown field"),
        (
            "  pool: cpu",
            "  pool: cpu\n  pol: gpu",
            "defaults.pol: unknown field",
        ),
        (
            "      params: { count: 12 }",
            "      params: { count: 12 }\n      shard: 2",
            "recipe.stages[0].shard: unknown field",
        ),
        (
            "params: { k: 4, temperature: 0.8 }",
            "params: { k: 4, temprature: 0.8 }",
            "recipe.stages[1].params.temprature: unknown field; did you mean temperature?",
        ),
        (
            "params: { k: 4, temperature: 0.8 }",
            "params: { k: four, temperature: 0.8 }",
            "recipe.stages[1].params.k: must be an integer",
        ),
        (
            "params: { k: 4, temperature: 0.8 }",
            "params: { k: 4, temperature: -1 }",
            "recipe.stages[1].params.temperature: must be >= 0",
        ),
        (
            "params: { margin: 0.2 }",
            "params: { margin: 0.2, require_verified: maybe }",
            "recipe.stages[3].params.require_verified: must be true or false",
        ),
        (
            "      kind: sft\n      pool: gpu",
            "      kind: sft\n      pool: gpu\n      backend: openai",
            "recipe.stages[4]: backend openai does not run sft stages; backends that do: builtin, external, test",
        ),
        (
            "      kind: evaluate\n",
            "      kind: evaluate\n      backend: vllm\n",
            "recipe.stages[6].backend: unknown backend \"vllm\"",
        ),
        (
            "params: { algorithm: rpo, beta: 0.1, eta: 1.0 }",
            "params: { algorithm: dpo, beta: 0.1, eta: 1.0 }",
            "recipe.stages[5].params.eta: applies to rpo only",
        ),
    ];
    for (from, to, expected) in cases {
        assert!(GOOD.contains(from), "the example has no {from:?}");
        let got = problems(&GOOD.replacen(from, to, 1));
        assert!(
            got.len() == 1 && got[0].starts_with(expected),
            "{to:?}: expected {expected:?}, got {got:?}"
        );
    }
}

#[test]
fn secrets_and_unknown_filter_methods_are_refused() {
    let yaml = include_str!("../../../examples/test-backend.yaml")
        .replace(
            "params: { margin: 0.2 }",
            "params: { margin: 0.2, method: vote }",
        )
        .replace(
            "params: { k: 4, temperature: 0.8 }",
            "params: { k: 4, api_key: sk-1 }",
        );
    let p = problems(&yaml);
    assert!(
        p.iter()
            .any(|m| m.starts_with("recipe.stages[3].params.method: unknown method")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("recipe.stages[1].params.api_key: secrets are not stored")),
        "{p:?}"
    );
}

fn problems(yaml: &str) -> Vec<String> {
    CampaignSpec::from_yaml(yaml)
        .unwrap_err()
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let bad = GOOD
        .replace("beta: 0.1", "beta: -1")
        .replace("k: 4", "k: 0")
        .replace("rounds: 2", "rounds: 0")
        .replace("algorithm: rpo", "algorithm: ppo");
    let got = problems(&bad);
    assert!(
        got.contains(&"recipe.stages[5].params.beta: must be > 0".to_string()),
        "{got:?}"
    );
    assert!(
        got.contains(&"recipe.stages[1].params.k: must be >= 1".to_string()),
        "{got:?}"
    );
    assert!(
        got.contains(&"rounds: must be between 1 and 1000".to_string()),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|p| p.starts_with("recipe.stages[5].params.algorithm: unknown algorithm")),
        "{got:?}"
    );
    assert_eq!(got.len(), 4, "{got:?}");
}

#[test]
fn every_filter_in_the_examples_feeds_a_training_stage() {
    for (name, yaml) in [
        ("demo", include_str!("../../../examples/demo.yaml")),
        (
            "vllm-deployment",
            include_str!("../../../examples/vllm-deployment.yaml"),
        ),
        ("mixed", include_str!("../../../examples/mixed.yaml")),
        (
            "demo-served",
            include_str!("../../../examples/demo-served.yaml"),
        ),
        (
            "sdg-round",
            include_str!("../../../examples/sdg-round.yaml"),
        ),
    ] {
        let spec = CampaignSpec::from_yaml(yaml).unwrap();
        for f in spec.stages.iter().filter(|s| s.kind == StageKind::Filter) {
            assert!(
                spec.stages
                    .iter()
                    .any(|t| t.kind.trains() && t.needs.contains(&f.name)),
                "examples/{name}.yaml: the pairs and SFT data of stage {} reach no training stage",
                f.name
            );
        }
    }
}

#[test]
fn yaml_is_parsed_with_bounded_work_and_without_duplicate_keys() {
    let good = GOOD;
    let dup = good.replacen("rounds: ", "rounds: 1\nrounds: ", 1);
    let got = problems(&dup);
    assert!(
        got[0].starts_with("$: not valid YAML:") && got[0].contains("uplicate"),
        "{got:?}"
    );
    // An alias bomb: each level doubles the one below; expanded, 2^20 entries.
    let mut bomb = String::from("a0: &a0 [x, x]\n");
    for i in 1..=20 {
        bomb.push_str(&format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
    }
    let got = problems(&bomb);
    assert!(got[0].starts_with("$: not valid YAML:"), "{got:?}");
    // A few aliases are fine.
    let aliased = format!("x-defaults: &d {{ pool: cpu, backend: test }}\n{good}");
    assert!(
        CampaignSpec::from_yaml(&aliased)
            .is_err_and(|e| e.problems.iter().all(|p| !p.message.contains("YAML")))
    );
}

#[test]
fn rounds_too_large_to_plan_are_refused_with_the_limit() {
    let stages = "apiVersion: flywheel/v1\nname: big\nmodels:\n  generator: { uri: \"test://g\" }\n  base: { uri: \"test://b\" }\n  reward: { uri: \"test://r\" }\nrounds: 1\ndefaults: { pool: cpu, backend: test }\nrecipe:\n  stages:\n    - { name: a, kind: synthesize_prompts, shards: 1000 }\n    - { name: b, kind: generate, shards: 999, needs: [a] }\n";
    let got = problems(stages);
    assert!(
        got.iter()
            .any(|p| p.contains("999000 dependencies") && p.contains("the limit is 100000")),
        "{got:?}"
    );
    let many = stages
        .replace("shards: 1000", "shards: 9500")
        .replace("shards: 999,", "shards: 9500,");
    let got = problems(&many);
    assert!(
        got.iter()
            .any(|p| p.contains("19000 tasks") && p.contains("the limit is 10000")),
        "{got:?}"
    );
}

#[test]
fn long_problem_lists_are_cut_after_twenty() {
    let mut yaml = String::from(GOOD);
    for i in 0..150 {
        yaml.push_str(&format!("unknown_{i}: 1\n"));
    }
    let e = CampaignSpec::from_yaml(&yaml).unwrap_err();
    assert!(e.problems.len() >= 150);
    let text = e.to_string();
    assert!(text.contains("more problems"), "{text}");
    assert_eq!(text.matches("unknown_").count(), 20, "{text}");
}

#[test]
fn structural_problems() {
    let got =
        problems("apiVersion: flywheel/v0\nname: x\nrounds: two\nrecipe: {stages: []}\nextra: 1\n");
    assert!(
        got.iter()
            .any(|p| p.starts_with("apiVersion: unsupported version")),
        "{got:?}"
    );
    assert!(
        got.contains(&"rounds: must be an integer".to_string()),
        "{got:?}"
    );
    assert!(got.contains(&"models: is required".to_string()), "{got:?}");
    assert!(
        got.contains(&"recipe.stages: must list at least one stage".to_string()),
        "{got:?}"
    );
    assert!(
        got.iter().any(|p| p.starts_with("extra: unknown field")),
        "{got:?}"
    );
}

#[test]
fn stage_graph_problems() {
    let bad = GOOD
        .replace("needs: [sft, filter]", "needs: [sft, nowhere]")
        .replace("name: score", "name: generate");
    let got = problems(&bad);
    assert!(
        got.iter()
            .any(|p| p.starts_with("recipe.stages[5].needs[1]: \"nowhere\"")),
        "{got:?}"
    );
    assert!(
        got.contains(&"recipe.stages[2].name: duplicate stage name \"generate\"".to_string()),
        "{got:?}"
    );
}

#[test]
fn gate_conditions_are_checked() {
    let bad = GOOD.replace("\">= 0.5\"", "\"about half\"");
    let got = problems(&bad);
    assert!(
        got.iter()
            .any(|p| p.starts_with("recipe.stages[7].params.require.evaluate.win_rate: condition")),
        "{got:?}"
    );
    assert!(
        Requirement::parse("m", "> 1e-3")
            .unwrap()
            .op
            .holds(0.1, 1e-3)
    );
    assert!(Requirement::parse("m", "=> 1").is_none());
}

#[test]
fn sharded_metrics_are_averaged_and_totalled() {
    let a: Map<String, Value> =
        serde_json::from_str(r#"{"records": 4, "mean_reward": 1.0}"#).unwrap();
    let b: Map<String, Value> =
        serde_json::from_str(r#"{"records": 6, "mean_reward": 2.0}"#).unwrap();
    let m = round_metrics([("score", &a), ("score", &b), ("sft", &a)]);
    assert_eq!(m["score.mean_reward"], 1.5);
    assert_eq!(m["score.records_total"], 10.0);
    assert_eq!(m["sft.records"], 4.0);
    assert!(!m.contains_key("sft.records_total"));
}

#[test]
fn not_yaml() {
    assert!(problems(":\n  - [")[0].starts_with("$: not valid YAML"));
}

#[test]
fn problems_point_at_their_line_and_column() {
    let bad = GOOD.replace("k: 4, temperature: 0.8", "k: 4, temprature: 0.8");
    let e = CampaignSpec::from_yaml(&bad).unwrap_err();
    let line = bad.lines().position(|l| l.contains("temprature")).unwrap() as u64 + 1;
    assert_eq!(e.problems.len(), 1);
    let (l, c) = e.problems[0].location.expect("a location");
    assert_eq!(l, line, "{e}");
    // The column is the field's value, on that line.
    assert!(
        (c as usize) <= bad.lines().nth(line as usize - 1).unwrap().len(),
        "{e}"
    );
    assert!(
        e.to_string().ends_with(&format!(
            "recipe.stages[1].params.temprature: unknown field; did you mean temperature? (line {l}, column {c})"
        )),
        "{e}"
    );
    // A missing field points at its enclosing mapping.
    let e = CampaignSpec::from_yaml(&GOOD.replace("      kind: evaluate\n", "")).unwrap_err();
    assert!(e.problems.iter().all(|p| p.location.is_some()), "{e}");
}

const SERVED: &str = include_str!("../../../examples/demo-served.yaml");

#[test]
fn consumers_of_an_endpoint_depend_on_its_serve_stage() {
    let spec = CampaignSpec::from_yaml(SERVED).expect("valid");
    let generate = spec.stage("generate").unwrap();
    assert_eq!(
        generate.needs,
        vec!["prompts".to_string(), "generator".to_string()]
    );
    let evaluate = spec.stage("evaluate").unwrap();
    assert_eq!(
        evaluate.needs,
        vec![
            "heldout".to_string(),
            "candidate".to_string(),
            "generator".to_string()
        ]
    );
}

#[test]
fn endpoint_references_are_checked_at_submission() {
    // A consumer naming a stage that is not a serve stage, or one that does not exist.
    let got = problems(&SERVED.replace("endpoint: generator, k: 8", "endpoint: prompts, k: 8"));
    assert!(
        got.iter().any(|p| p.starts_with(
            "recipe.stages[3].params.endpoint: \"prompts\" is not a serve stage defined earlier"
        )),
        "{got:?}"
    );
    let got =
        problems(&SERVED.replace("candidate_endpoint: candidate", "candidate_endpoint: nope"));
    assert!(
        got.iter()
            .any(|p| p.starts_with("recipe.stages[9].params.candidate_endpoint: \"nope\"")),
        "{got:?}"
    );
    // The old meaning of `endpoint` gets a pointer to `api`.
    let got = problems(&SERVED.replace("endpoint: generator, k: 8", "endpoint: chat, k: 8"));
    assert!(
        got.iter().any(|p| p.contains("is now set with `api`")),
        "{got:?}"
    );
    // A serve stage nobody uses; a candidate served without the stage that trains it.
    let got = problems(&SERVED.replace(
        "params: { candidate_endpoint: candidate, generator_endpoint: generator, max_tokens: 24 }",
        "params: { candidate_endpoint: generator, max_tokens: 24 }",
    ));
    assert!(
        got.iter()
            .any(|p| p.starts_with("recipe.stages[8]: no stage names the endpoint \"candidate\"")),
        "{got:?}"
    );
    // The builtin evaluation without a training stage among its needs has no model to judge.
    let demo = include_str!("../../../examples/demo.yaml");
    let got = problems(&demo.replace(
        "      kind: evaluate\n      needs: [rpo]\n",
        "      kind: evaluate\n      needs: [evaluate]\n",
    ));
    assert!(
        got.iter().any(|p| p.starts_with(
            "recipe.stages[7].needs: evaluate on builtin judges the model of an sft or preference stage it needs"
        )),
        "{got:?}"
    );
    let got = problems(&SERVED.replace("needs: [rpo]", "needs: [heldout]"));
    assert!(
        got.iter().any(|p| p
            == "recipe.stages[8].needs: serving the candidate needs the sft or preference stage that trains it"),
        "{got:?}"
    );
    // Launch or attach, not both; a swap needs a long-lived server.
    let got = problems(&SERVED.replace(
        "params: { template: flywheel, model: generator, startup_timeout_s: 120 }",
        "params: { template: flywheel, url: \"http://x:1/v1\", swap: sglang }",
    ));
    assert!(
        got.iter()
            .any(|p| p.starts_with("recipe.stages[2].params.url: give one of")),
        "{got:?}"
    );
    let got = problems(&SERVED.replace(
        "params: { template: flywheel, model: generator, startup_timeout_s: 120 }",
        "params: { template: flywheel, swap: sglang }",
    ));
    assert!(
        got.iter()
            .any(|p| p.starts_with("recipe.stages[2].params.swap: applies to a long-lived")),
        "{got:?}"
    );
    // Serve runs on external only.
    let got = problems(&SERVED.replace(
        "kind: serve\n      backend: external\n      pool: gpu\n      needs: []",
        "kind: serve\n      backend: openai\n      pool: gpu\n      needs: []",
    ));
    assert!(
        got.iter().any(|p| p.starts_with("recipe.stages[2]")),
        "{got:?}"
    );
}

#[test]
fn interval_bounds_read_the_metrics_bootstrap_interval() {
    let key = |m: &str| Requirement::parse(m, ">= 0.5").unwrap().metric_key();
    assert_eq!(key("evaluate.win_rate.lower"), "evaluate.win_rate_ci_low");
    assert_eq!(key("evaluate.win_rate.upper"), "evaluate.win_rate_ci_high");
    assert_eq!(key("evaluate.win_rate"), "evaluate.win_rate");
}
