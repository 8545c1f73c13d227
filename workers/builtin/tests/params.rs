//! Every param the stage contract declares for a builtin stage changes what the stage does: each
//! stage runs on tiny real models with baseline params, then once per declared param with that
//! param set to another valid value, and the outputs (content hashes) or metrics must differ.
//! The table below must cover every declared param, so a param added to the contract without a
//! backend that honours it fails here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::VarMap;
use flywheel_builtin::{BuiltinBackend, save_checkpoint};
use flywheel_engine::model::{ModelConfig, Transformer};
use flywheel_proto::stage::{
    BuiltinEvaluate, BuiltinFilter, BuiltinGenerate, BuiltinPreference, BuiltinPrompts,
    BuiltinScore, BuiltinSft, Params,
};
use flywheel_proto::v1::{ArtifactRef, Assignment};
use flywheel_worker::{Backend, Task, TaskContext};
use serde_json::{Value, json};

/// Params that change only speed or memory, never what a stage produces, with the reason.
const THROUGHPUT_ONLY: &[(&str, &str, &str)] = &[
    (
        "generate",
        "batch_size",
        "samples are drawn with one seeded generator each, so batching changes only speed",
    ),
    (
        "score",
        "batch_size",
        "scores are per response; batching changes only speed",
    ),
];

/// Params with a single allowed value, which documents the method rather than choosing it.
const SINGLE_VALUED: &[(&str, &str)] = &[("filter", "method")];

struct World {
    dir: PathBuf,
    generator: ArtifactRef,
    base: ArtifactRef,
    reward: ArtifactRef,
    runs: usize,
}

fn model(dir: &Path, name: &str, reward_head: bool, seed: u64) -> ArtifactRef {
    let mut config = ModelConfig::tiny();
    if reward_head {
        config = config.with_reward_head();
    }
    let varmap = VarMap::new();
    Transformer::fresh(config.clone(), &varmap, &Device::Cpu, seed).unwrap();
    let path = dir.join(name);
    let hash = save_checkpoint(&path, &config, &varmap).unwrap();
    ArtifactRef {
        id: format!("{name}-id"),
        role: name.into(),
        kind: "model".into(),
        uri: format!("file://{}", path.display()),
        content_hash: hash,
        name: name.into(),
    }
}

/// What a stage run produced: its outputs' content hashes and its metrics.
#[derive(Debug, PartialEq)]
struct Result_ {
    outputs: Vec<(String, String)>,
    metrics: BTreeMap<String, String>,
    refs: Vec<ArtifactRef>,
}

impl World {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("flywheel-params-{}", uuid()));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            generator: model(&dir, "generator", false, 1),
            base: model(&dir, "base", false, 2),
            reward: model(&dir, "reward", true, 3),
            dir,
            runs: 0,
        }
    }

    fn run(&mut self, kind: &str, params: &Value, inputs: &[ArtifactRef]) -> Result_ {
        self.runs += 1;
        let prefix = format!("file://{}/run-{}", self.dir.display(), self.runs);
        let assignment = Assignment {
            task_id: uuid(),
            attempt: 1,
            campaign_id: "campaign".into(),
            round_index: 0,
            stage: kind.into(),
            kind: kind.into(),
            shard_index: 0,
            shard_count: 1,
            params_json: params.to_string(),
            inputs: inputs.to_vec(),
            output_prefix: prefix,
            backend: "builtin".into(),
            endpoints: Vec::new(),
        };
        let task = Task::new(assignment).unwrap();
        let r = BuiltinBackend::new()
            .run(&task, &TaskContext::default())
            .unwrap_or_else(|e| panic!("{kind} with {params}: {e}"));
        let refs = r
            .outputs
            .iter()
            .map(|o| ArtifactRef {
                id: format!("{kind}-{}", o.name),
                role: o.name.clone(),
                kind: o.kind.into(),
                uri: o.uri.clone(),
                content_hash: o.content_hash.clone(),
                name: o.name.clone(),
            })
            .collect();
        Result_ {
            outputs: r
                .outputs
                .iter()
                .map(|o| (o.name.clone(), o.content_hash.clone()))
                .collect(),
            metrics: r
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), format!("{v:.9}")))
                .collect(),
            refs,
        }
    }
}

fn uuid() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            ^ (std::process::id() as u128) << 64
    )
}

fn with(base: &Value, key: &str, v: Value) -> Value {
    let mut p = base.clone();
    p[key] = v;
    p
}

/// Runs the stage with `baseline` and once per entry of `changes`, checks that every declared
/// param of `T` is covered, and that each change changes the result.
fn check<T: Params>(
    world: &mut World,
    kind: &str,
    baseline: Value,
    inputs: &[ArtifactRef],
    changes: &[(&str, Value)],
) -> Vec<ArtifactRef> {
    let declared: Vec<&str> = T::DOC.params.iter().map(|p| p.name).collect();
    for name in &declared {
        let exempt = THROUGHPUT_ONLY
            .iter()
            .any(|(k, p, _)| *k == kind && p == name)
            || SINGLE_VALUED.iter().any(|(k, p)| *k == kind && p == name);
        assert!(
            exempt || changes.iter().any(|(p, _)| p == name),
            "{kind}.{name} is declared but this test does not show that it changes anything"
        );
    }
    let base = world.run(kind, &baseline, inputs);
    for (name, value) in changes {
        assert!(declared.contains(name), "{kind}.{name} is not declared");
        let changed = world.run(kind, &with(&baseline, name, value.clone()), inputs);
        assert!(
            changed.outputs != base.outputs || changed.metrics != base.metrics,
            "{kind}.{name} = {value} changed nothing"
        );
    }
    base.refs
}

fn by_role(refs: &[ArtifactRef], role: &str) -> ArtifactRef {
    refs.iter().find(|r| r.role == role).cloned().unwrap()
}

#[test]
fn every_builtin_param_changes_what_its_stage_does() {
    let mut w = World::new();
    let (generator, base, reward) = (w.generator.clone(), w.base.clone(), w.reward.clone());

    let prompts = check::<BuiltinPrompts>(
        &mut w,
        "synthesize_prompts",
        json!({ "count": 12 }),
        &[],
        &[
            ("count", json!(13)),
            ("seed", json!(99)),
            ("subtopics", json!(["add"])),
            ("max_difficulty", json!(1)),
            ("brackets", json!(0.9)),
            ("quotes", json!(0.5)),
            ("split", json!("held_out")),
        ],
    );
    let prompts = by_role(&prompts, "prompts");

    // A trained model of the round, for on-policy samples.
    let mut policy = base.clone();
    policy.role = "model".into();
    let responses = check::<BuiltinGenerate>(
        &mut w,
        "generate",
        json!({ "k": 2, "max_tokens": 6 }),
        &[prompts.clone(), generator.clone(), policy],
        &[
            ("policy", json!("model")),
            ("k", json!(3)),
            ("temperature", json!(0.3)),
            ("top_p", json!(0.3)),
            ("top_k", json!(2)),
            ("max_tokens", json!(3)),
            ("seed", json!(99)),
        ],
    );
    let responses = by_role(&responses, "responses");

    let scores = check::<BuiltinScore>(
        &mut w,
        "score",
        json!({}),
        &[responses.clone(), reward.clone()],
        &[
            ("verifier", json!(false)),
            ("weights", json!([1.0, 0.0, 0.0, 0.0, 0.0])),
        ],
    );
    let scores = by_role(&scores, "scores");

    let filtered = check::<BuiltinFilter>(
        &mut w,
        "filter",
        json!({}),
        std::slice::from_ref(&scores),
        &[
            ("margin", json!(0.5)),
            ("min_reward", json!(2.0)),
            ("require_verified", json!(true)),
        ],
    );
    let (sft, pairs) = (by_role(&filtered, "sft"), by_role(&filtered, "pairs"));

    let trained = check::<BuiltinSft>(
        &mut w,
        "sft",
        json!({ "steps": 2, "batch_size": 4, "warmup": 0 }),
        &[sft.clone(), base.clone(), generator.clone()],
        &[
            ("init", json!("generator")),
            ("steps", json!(3)),
            ("lr", json!(0.01)),
            ("batch_size", json!(2)),
            ("warmup", json!(1)),
            ("seed", json!(99)),
        ],
    );
    let trained = by_role(&trained, "model");

    check::<BuiltinPreference>(
        &mut w,
        "preference",
        json!({ "algorithm": "rpo", "steps": 2, "batch_size": 4, "warmup": 0 }),
        &[pairs.clone(), trained.clone(), generator.clone()],
        &[
            ("reference", json!("generator")),
            ("algorithm", json!("dpo")),
            ("beta", json!(0.5)),
            ("eta", json!(3.0)),
            ("sft_weight", json!(1.0)),
            ("steps", json!(3)),
            ("lr", json!(0.01)),
            ("batch_size", json!(2)),
            ("warmup", json!(1)),
            ("seed", json!(99)),
        ],
    );

    let mut candidate = trained.clone();
    candidate.role = "model".into();
    check::<BuiltinEvaluate>(
        &mut w,
        "evaluate",
        json!({ "prompts": 8 }),
        &[candidate, generator.clone(), reward.clone()],
        &[
            ("prompts", json!(9)),
            ("seed", json!(99)),
            ("verifier", json!(false)),
            ("subtopics", json!(["reverse"])),
            ("max_difficulty", json!(1)),
            ("brackets", json!(0.9)),
            ("quotes", json!(0.5)),
        ],
    );
    let _ = std::fs::remove_dir_all(&w.dir);
}
