//! The stage contract: every stage kind, the backends that run each kind, and the params of every
//! (kind, backend) pair with their types, defaults, bounds and meaning. This is the only place
//! they are declared: the controller validates a spec's params by checking them against these
//! declarations, and backends read the same typed structs ([`parse`]). The README's parameter
//! table is generated from [`PARAMS`] (`flywheel params --markdown`) and checked in CI.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a stage does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    SynthesizePrompts,
    Generate,
    Score,
    Filter,
    Sft,
    Preference,
    Evaluate,
    /// Runs an OpenAI-compatible inference server for a model of the round (or gives a
    /// long-lived one the round's weights). Its endpoint being ready, not its completion,
    /// releases the stages that name it; it stops once they have all finished.
    Serve,
    /// Executed by the controller: compares round metrics with the gate and promotes or not.
    Promote,
    /// A user-defined stage the backend implements (exports, notifications, benchmarks).
    Custom,
}

impl StageKind {
    pub const ALL: [StageKind; 10] = [
        StageKind::SynthesizePrompts,
        StageKind::Generate,
        StageKind::Score,
        StageKind::Filter,
        StageKind::Sft,
        StageKind::Preference,
        StageKind::Evaluate,
        StageKind::Serve,
        StageKind::Promote,
        StageKind::Custom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::SynthesizePrompts => "synthesize_prompts",
            StageKind::Generate => "generate",
            StageKind::Score => "score",
            StageKind::Filter => "filter",
            StageKind::Sft => "sft",
            StageKind::Preference => "preference",
            StageKind::Evaluate => "evaluate",
            StageKind::Serve => "serve",
            StageKind::Promote => "promote",
            StageKind::Custom => "custom",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Stages whose work can be split into shards.
    pub fn shardable(self) -> bool {
        matches!(
            self,
            StageKind::Generate | StageKind::Score | StageKind::Custom
        )
    }

    /// Stages that produce a model.
    pub fn trains(self) -> bool {
        matches!(self, StageKind::Sft | StageKind::Preference)
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker backend: what runs a stage's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// The builtin engine (candle, CPU or CUDA).
    Builtin,
    /// Any OpenAI-compatible server (vLLM, SGLang, TRT-LLM, `flywheel serve-model`).
    Openai,
    /// An HTTP reward model service (NVIDIA's reward API shape or `{prompt, response}`).
    RewardEndpoint,
    /// A trainer command: TRL, NeMo-Aligner, OpenRLHF, `flywheel train` or a custom one.
    External,
    /// A deterministic stand-in for the builtin engine, for tests: not ML.
    Test,
}

impl BackendKind {
    pub const ALL: [BackendKind; 5] = [
        BackendKind::Builtin,
        BackendKind::Openai,
        BackendKind::RewardEndpoint,
        BackendKind::External,
        BackendKind::Test,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Builtin => "builtin",
            BackendKind::Openai => "openai",
            BackendKind::RewardEndpoint => "reward_endpoint",
            BackendKind::External => "external",
            BackendKind::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == s)
    }

    /// The stage kinds this backend runs (its capability list). `promote` runs in the
    /// controller, whatever the stage's backend.
    pub fn kinds(self) -> &'static [StageKind] {
        use StageKind::*;
        match self {
            BackendKind::Builtin => &[
                SynthesizePrompts,
                Generate,
                Score,
                Filter,
                Sft,
                Preference,
                Evaluate,
            ],
            BackendKind::Openai => &[SynthesizePrompts, Generate, Filter, Evaluate],
            BackendKind::RewardEndpoint => &[Score],
            BackendKind::External => &[Sft, Preference, Serve, Evaluate],
            BackendKind::Test => &[
                SynthesizePrompts,
                Generate,
                Score,
                Filter,
                Sft,
                Preference,
                Evaluate,
                Custom,
            ],
        }
    }

    pub fn runs(self, kind: StageKind) -> bool {
        kind == StageKind::Promote || self.kinds().contains(&kind)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an artifact is to the stage that reads or writes it. A stage's inputs are found by role:
/// the outputs of the stages it `needs`, named by what they hold, and the round's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Prompts (`synthesize_prompts`).
    Prompts,
    /// K responses per prompt (`generate`).
    Responses,
    /// Responses with their attributes and reward (`score`).
    Scores,
    /// SFT records (`filter`).
    Sft,
    /// Preference pairs (`filter`).
    Pairs,
    /// A trained model (`sft`, `preference`; the promotion candidate).
    Model,
    /// The round's generator.
    Generator,
    /// The base model each round's training starts from.
    Base,
    /// The reward model.
    Reward,
    /// Prompts that earlier rounds' `synthesize_prompts` stages wrote (for dedup across rounds).
    EarlierPrompts,
}

impl Role {
    pub const ALL: [Role; 10] = [
        Role::Prompts,
        Role::Responses,
        Role::Scores,
        Role::Sft,
        Role::Pairs,
        Role::Model,
        Role::Generator,
        Role::Base,
        Role::Reward,
        Role::EarlierPrompts,
    ];

    /// The name on the wire and in the artifact store (an output's `name`, an input's `role`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prompts => "prompts",
            Role::Responses => "responses",
            Role::Scores => "scores",
            Role::Sft => "sft",
            Role::Pairs => "pairs",
            Role::Model => "model",
            Role::Generator => "generator",
            Role::Base => "base",
            Role::Reward => "reward",
            Role::EarlierPrompts => "earlier_prompts",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Params that name a serve stage of the recipe: the controller fills that stage's endpoint
/// (URL, served name, the model it serves) into the consumer's assignment.
pub const ENDPOINT_PARAMS: &[&str] = &[
    "endpoint",
    "candidate_endpoint",
    "generator_endpoint",
    "judge_endpoint",
    "reply_endpoint",
];

/// The HelpSteer2 attributes a reward model scores, in the order of every 5-number list.
pub const HELPSTEER2_ATTRIBUTES: [&str; 5] = [
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
];
/// The scalar reward's default weights, from the Nemotron-4-340B-Reward model card.
pub const HELPSTEER2_WEIGHTS: [f64; 5] = [0.3, 0.74, 0.46, 0.47, -0.33];

/// A bound on a param's value, checked at submission.
#[derive(Debug, Clone, Copy)]
pub enum Rule {
    None,
    /// An integer at least this large.
    IntAtLeast(i64),
    /// A number at least this large.
    AtLeast(f64),
    /// A number greater than zero.
    Positive,
    /// A number in (0, 1].
    Fraction,
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// Exactly this many numbers.
    Numbers(usize),
}

impl Rule {
    fn check(self, name: &str, v: &Value) -> Option<String> {
        match self {
            Rule::None => None,
            Rule::IntAtLeast(min) => (v.as_i64()? < min).then(|| format!("must be >= {min}")),
            Rule::AtLeast(min) => (v.as_f64()? < min).then(|| format!("must be >= {min}")),
            Rule::Positive => (v.as_f64()? <= 0.0).then(|| "must be > 0".to_string()),
            Rule::Fraction => {
                let x = v.as_f64()?;
                (x <= 0.0 || x > 1.0).then(|| "must be in (0, 1]".to_string())
            }
            Rule::OneOf(words) => {
                let s = v.as_str()?;
                (!words.contains(&s))
                    .then(|| format!("unknown {name} {s:?} (expected {})", words.join(" or ")))
            }
            Rule::Numbers(n) => {
                let ok = v
                    .as_array()
                    .is_some_and(|a| a.len() == n && a.iter().all(Value::is_number));
                (!ok).then(|| {
                    format!("must list {n} numbers (helpfulness, correctness, coherence, complexity, verbosity)")
                })
            }
        }
    }
}

/// One documented param.
#[derive(Debug, Clone, Copy)]
pub struct ParamDoc {
    pub name: &'static str,
    /// The Rust type, as declared (`i64`, `Option<String>`, ...).
    pub ty: &'static str,
    /// The default, as a person should read it (empty: required or derived, see `meaning`).
    pub default: &'static str,
    pub meaning: &'static str,
    pub rule: Rule,
}

/// The params of one (kind, backend) pair.
#[derive(Debug, Clone, Copy)]
pub struct ParamsDoc {
    pub kinds: &'static [StageKind],
    pub backend: BackendKind,
    pub params: &'static [ParamDoc],
    /// Checks one param's value against its declared type and bound; `None` if it is unknown.
    check_field: fn(&str, &Value) -> Option<Result<(), String>>,
    /// Checks the params as a whole (requirements between params), once every field is valid.
    check_all: fn(&Value) -> Vec<(&'static str, String)>,
    /// The defaults, as JSON.
    pub defaults: fn() -> Value,
}

/// The phrase for a value of the wrong type.
fn expected(ty: &str) -> String {
    let inner = ty
        .strip_prefix("Option<")
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(ty);
    match inner {
        "i64" | "u64" => "must be an integer".into(),
        "f64" => "must be a number".into(),
        "bool" => "must be true or false".into(),
        "String" => "must be a string".into(),
        "Vec<String>" => "must be a list of strings".into(),
        "Vec<f64>" => "must be a list of 5 numbers".into(),
        "Vec<Arg>" => "must be a list of arguments".into(),
        "Vars" => "must be a map of names to values".into(),
        other => format!("must be a {other}"),
    }
}

/// A params struct of the contract, tied to its declaration.
pub trait Params: DeserializeOwned + Default + Serialize {
    const DOC: ParamsDoc;
}

/// Requirements between a struct's params, beyond each param's own bound.
pub trait CrossChecks {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

macro_rules! params {
    (
        $(#[doc = $sdoc:literal])*
        $name:ident for [$($kind:ident),+] on $backend:ident {
            $(
                $(#[doc = $fdoc:literal])*
                $field:ident : $ty:ty = $default:expr, $shown:literal, $rule:expr;
            )*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $( $(#[doc = $fdoc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl $name {
            pub const DOC: ParamsDoc = ParamsDoc {
                kinds: &[$(StageKind::$kind),+],
                backend: BackendKind::$backend,
                params: &[$(ParamDoc {
                    name: stringify!($field),
                    ty: stringify!($ty),
                    default: $shown,
                    meaning: concat!($($fdoc),*),
                    rule: $rule,
                }),*],
                check_field: |name, value| {
                    match name {
                        $(stringify!($field) => Some({
                            let rule: Rule = $rule;
                            match serde_json::from_value::<$ty>(value.clone()) {
                                Err(_) => Err(expected(stringify!($ty))),
                                Ok(_) => match rule.check(name, value) {
                                    Some(msg) => Err(msg),
                                    None => Ok(()),
                                },
                            }
                        }),)*
                        _ => None,
                    }
                },
                check_all: |value| match serde_json::from_value::<$name>(value.clone()) {
                    Ok(p) => p.cross_checks(),
                    Err(e) => vec![("", e.to_string())],
                },
                defaults: || serde_json::to_value($name::default()).expect("params serialize"),
            };
        }

        impl Params for $name {
            const DOC: ParamsDoc = $name::DOC;
        }
    };
}

/// One command-line argument or environment value: a string, or a number or boolean written
/// as one in YAML (`[--warmup, 2]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Arg(pub String);

impl<'de> Deserialize<'de> for Arg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Arg(s)),
            v @ (Value::Number(_) | Value::Bool(_)) => Ok(Arg(v.to_string())),
            _ => Err(serde::de::Error::custom(
                "expected a string, number or boolean",
            )),
        }
    }
}

/// Names to values (environment variables, command placeholders).
pub type Vars = std::collections::BTreeMap<String, Arg>;

params! {
    /// `synthesize_prompts` on `builtin`: prompts from the task world (arithmetic, strings).
    BuiltinPrompts for [SynthesizePrompts] on Builtin {
        /// Prompts per shard.
        count: i64 = 64, "64", Rule::IntAtLeast(1);
        /// Seed of the prompt generator (default: derived from the campaign and round).
        seed: Option<u64> = None, "", Rule::None;
        /// Subtopics to draw from (default: all of add, sub, mul, reverse, sort, upper, count).
        subtopics: Option<Vec<String>> = None, "all", Rule::None;
        /// Highest difficulty level, 1 to 3.
        max_difficulty: i64 = 2, "2", Rule::IntAtLeast(1);
        /// Fraction of prompts that also ask for the answer in brackets.
        brackets: f64 = 0.3, "0.3", Rule::AtLeast(0.0);
        /// Fraction of prompts asking for the answer in quotes: IFEval's startend:quotation, recorded as the prompt's instruction.
        quotes: f64 = 0.0, "0.0", Rule::AtLeast(0.0);
        /// train (training prompts) or held_out (evaluation prompts, disjoint from train).
        split: String = "train".into(), "train", Rule::OneOf(&["train", "held_out"]);
    }
}
impl CrossChecks for BuiltinPrompts {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        format_shares(self.brackets, self.quotes)
    }
}

params! {
    /// `generate` on `builtin`: K samples per prompt with the KV-cached sampler.
    BuiltinGenerate for [Generate] on Builtin {
        /// Samples per prompt.
        k: i64 = 4, "4", Rule::IntAtLeast(1);
        /// Sampling temperature (0: greedy).
        temperature: f64 = 1.0, "1.0", Rule::AtLeast(0.0);
        /// Nucleus sampling mass.
        top_p: f64 = 1.0, "1.0", Rule::Fraction;
        /// Top-k sampling (0: off).
        top_k: i64 = 0, "0", Rule::IntAtLeast(0);
        /// Most tokens per response.
        max_tokens: i64 = 24, "24", Rule::IntAtLeast(1);
        /// Seed (default: derived from the campaign, round and shard).
        seed: Option<u64> = None, "", Rule::None;
        /// Sequences sampled together.
        batch_size: i64 = 128, "128", Rule::IntAtLeast(1);
        /// The model sampled: generator (the round's) or model (the model of an sft or preference stage in needs: on-policy samples of the round's policy, for preference pairs).
        policy: String = "generator".into(), "generator", Rule::OneOf(&["generator", "model"]);
    }
}
impl CrossChecks for BuiltinGenerate {}

params! {
    /// `score` on `builtin`: the reward model's five HelpSteer2 attributes and their weighted sum.
    BuiltinScore for [Score] on Builtin {
        /// Responses scored together.
        batch_size: i64 = 256, "256", Rule::IntAtLeast(1);
        /// Use the task's verifier for correctness where one exists.
        verifier: bool = true, "true", Rule::None;
        /// Weights of helpfulness, correctness, coherence, complexity, verbosity.
        weights: Option<Vec<f64>> = None, "0.3, 0.74, 0.46, 0.47, -0.33", Rule::Numbers(5);
    }
}
impl CrossChecks for BuiltinScore {}

params! {
    /// `filter` on `builtin` (and the same on `test`): verified best-of-K into SFT data,
    /// best-vs-worst into preference pairs.
    BuiltinFilter for [Filter] on Builtin {
        /// Always best_vs_worst here; llm_judge runs on the openai backend.
        method: String = "best_vs_worst".into(), "best_vs_worst", Rule::OneOf(&["best_vs_worst"]);
        /// Least reward gap between chosen and rejected.
        margin: f64 = 0.0, "0.0", Rule::AtLeast(0.0);
        /// Least reward of a chosen response (default: none).
        min_reward: Option<f64> = None, "", Rule::None;
        /// Keep only responses the verifier accepted, where one exists.
        require_verified: bool = false, "false", Rule::None;
    }
}
impl CrossChecks for BuiltinFilter {}

params! {
    /// `sft` on `builtin`: supervised fine-tuning on the stage's SFT data.
    BuiltinSft for [Sft] on Builtin {
        /// Input role of the starting model: base (default) or generator.
        init: String = "base".into(), "base", Rule::OneOf(&["base", "generator"]);
        /// Optimiser steps.
        steps: i64 = 300, "300", Rule::IntAtLeast(1);
        /// Peak learning rate.
        lr: f64 = 3e-3, "0.003", Rule::Positive;
        /// Sequences per step.
        batch_size: i64 = 32, "32", Rule::IntAtLeast(1);
        /// Linear warm-up steps.
        warmup: i64 = 20, "20", Rule::IntAtLeast(0);
        /// Seed of the batch order (default: derived from the campaign and stage).
        seed: Option<u64> = None, "", Rule::None;
    }
}
impl CrossChecks for BuiltinSft {}

params! {
    /// `preference` on `builtin`: DPO or RPO (NeMo-Aligner's `rpo_bwd_kl`) from the SFT model.
    BuiltinPreference for [Preference] on Builtin {
        /// dpo or rpo (required).
        algorithm: Option<String> = None, "", Rule::OneOf(&["dpo", "rpo"]);
        /// KL strength β.
        beta: f64 = 0.1, "0.1", Rule::Positive;
        /// RPO's reward scale η (rpo only).
        eta: Option<f64> = None, "1.0", Rule::Positive;
        /// Weight of the SFT term on chosen responses.
        sft_weight: f64 = 0.1, "0.1", Rule::AtLeast(0.0);
        /// Optimiser steps.
        steps: i64 = 100, "100", Rule::IntAtLeast(1);
        /// Peak learning rate.
        lr: f64 = 1e-3, "0.001", Rule::Positive;
        /// Pairs per step.
        batch_size: i64 = 32, "32", Rule::IntAtLeast(1);
        /// Linear warm-up steps.
        warmup: i64 = 20, "20", Rule::IntAtLeast(0);
        /// Seed of the batch order (default: derived from the campaign and stage).
        seed: Option<u64> = None, "", Rule::None;
        /// The frozen reference: init (the starting policy) or generator (the round's generator, i.e. the previous round's model, as Nemotron's iterative RPO); recorded as a parent of the trained model.
        reference: String = "init".into(), "init", Rule::OneOf(&["init", "generator"]);
    }
}
impl CrossChecks for BuiltinPreference {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        algorithm_checks(self.algorithm.as_deref(), self.eta.is_some())
    }
}

fn algorithm_checks(algorithm: Option<&str>, eta: bool) -> Vec<(&'static str, String)> {
    match algorithm {
        None => vec![("algorithm", "is required (dpo or rpo)".into())],
        Some("dpo") if eta => vec![("eta", "applies to rpo only".into())],
        _ => Vec::new(),
    }
}

params! {
    /// `evaluate` on `builtin`: held-out accuracy by verifier, mean reward and win rate.
    BuiltinEvaluate for [Evaluate] on Builtin {
        /// Held-out prompts.
        prompts: i64 = 200, "200", Rule::IntAtLeast(1);
        /// Seed of the held-out prompts.
        seed: u64 = 1234, "1234", Rule::None;
        /// Use the task's verifier for correctness in the reward.
        verifier: bool = true, "true", Rule::None;
        /// Subtopics of the held-out prompts (default: all).
        subtopics: Option<Vec<String>> = None, "all", Rule::None;
        /// Highest difficulty level, 1 to 3.
        max_difficulty: i64 = 2, "2", Rule::IntAtLeast(1);
        /// Fraction of prompts that also ask for the answer in brackets.
        brackets: f64 = 0.3, "0.3", Rule::AtLeast(0.0);
        /// Fraction of prompts asking for the answer in quotes (scored with IFEval's checker too).
        quotes: f64 = 0.0, "0.0", Rule::AtLeast(0.0);
    }
}
impl CrossChecks for BuiltinEvaluate {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        format_shares(self.brackets, self.quotes)
    }
}

/// The task world's format shares: each at most 1, together at most 1.
fn format_shares(brackets: f64, quotes: f64) -> Vec<(&'static str, String)> {
    if brackets + quotes > 1.0 {
        vec![(
            "quotes",
            format!(
                "brackets + quotes must be at most 1 (is {})",
                brackets + quotes
            ),
        )]
    } else {
        Vec::new()
    }
}

/// A template of `synthesize_prompts` on `openai`: its step name and the placeholders it may use.
pub type PromptTemplate = (&'static str, &'static [&'static str]);

/// The pipelines of `synthesize_prompts` on `openai`, and the templates each one uses (the
/// keys of its `templates` param) with the placeholders each template may use.
pub const PROMPT_PIPELINES: &[(&str, &[PromptTemplate])] = &[
    (
        "open_qa",
        &[
            ("macro_topics", &["n_macro_topics"]),
            ("subtopics", &["n_subtopics", "macro_topic"]),
            ("questions", &["n_openlines", "topic"]),
            ("revise", &["n_revisions", "openline"]),
        ],
    ),
    (
        "writing",
        &[
            ("macro_topics", &["n_macro_topics"]),
            (
                "writing_tasks",
                &["n_openlines", "topic", "text_material_type"],
            ),
            ("revise_writing", &["n_revisions", "openline"]),
        ],
    ),
    (
        "closed_qa",
        &[
            ("closed_qa", &["n_openlines", "document"]),
            ("closed_qa_join", &["document", "openline"]),
        ],
    ),
    (
        "math",
        &[
            ("math_macro_topics", &["n_macro_topics", "school_level"]),
            ("math_subtopics", &["n_subtopics", "macro_topic"]),
            ("math_problems", &["n_openlines", "topic"]),
            ("math_problems_beginner", &["n_openlines", "topic"]),
        ],
    ),
    (
        "coding",
        &[
            ("coding_macro_topics", &["n_macro_topics", "language"]),
            (
                "coding_subtopics",
                &["n_subtopics", "macro_topic", "language"],
            ),
            ("coding_problems", &["n_openlines", "topic", "language"]),
            (
                "coding_problems_intermediate",
                &["n_openlines", "topic", "language"],
            ),
            (
                "coding_problems_advanced",
                &["n_openlines", "topic", "language"],
            ),
        ],
    ),
    ("none", &[]),
];

/// Templates every pipeline uses for two-turn prompts: the follow-up an LLM playing the user
/// writes, and the second turn asking to revise an answer to follow an instruction.
pub const PROMPT_TURN_TEMPLATES: &[PromptTemplate] = &[
    ("follow_up", &["conversation"]),
    ("revise_turn", &["instruction"]),
];

params! {
    /// `synthesize_prompts` on `openai`: the recipe's LLM-written prompts. A pipeline
    /// (open_qa, writing, closed_qa, math, coding; none: seed prompts only) asks the endpoint
    /// for lists (topics, then subtopics, then prompts, then revisions), mixes in seed prompts,
    /// appends verifiable instructions, makes some prompts two-turn, removes duplicates (also
    /// of earlier rounds) and evaluation prompts, and splits the rest into SFT and preference
    /// pools. Every prompt records its provenance.
    OpenaiPrompts for [SynthesizePrompts] on Openai {
        /// open_qa, writing, closed_qa, math, coding, or none (seed prompts only).
        pipeline: String = "open_qa".into(), "open_qa", Rule::OneOf(&["open_qa", "writing", "closed_qa", "math", "coding", "none"]);
        /// The serve stage whose endpoint writes the prompts; or give base_url.
        endpoint: Option<String> = None, "", Rule::None;
        /// A server's API root (instead of endpoint).
        base_url: Option<String> = None, "", Rule::None;
        /// Model name sent (default: the endpoint's served name, else the generator's name).
        model: Option<String> = None, "", Rule::None;
        /// Topics to start from (skips the macro-topic step; for math and coding: the keywords).
        topics: Option<Vec<String>> = None, "", Rule::None;
        /// Macro topics asked for.
        n_macro_topics: i64 = 3, "3", Rule::IntAtLeast(1);
        /// Subtopics asked for per macro topic (0: use the macro topics themselves).
        n_subtopics: i64 = 2, "2", Rule::IntAtLeast(0);
        /// Prompts (questions, tasks, problems) asked for per topic or document.
        n_openlines: i64 = 2, "2", Rule::IntAtLeast(1);
        /// Revisions asked for per prompt (open_qa, writing; 0: keep the originals).
        n_revisions: i64 = 1, "1", Rule::IntAtLeast(0);
        /// writing: the document types (default: essay, email, poem, blog post, story).
        document_types: Option<Vec<String>> = None, "", Rule::None;
        /// closed_qa: JSONL of documents (a text or document field per line), any artifact URI.
        documents: Option<String> = None, "", Rule::None;
        /// math: the school level in the macro-topic template.
        school_level: String = "university".into(), "university", Rule::None;
        /// math: general or beginner; coding: beginner, intermediate or advanced.
        level: Option<String> = None, "general / beginner", Rule::None;
        /// coding: the programming language.
        language: String = "Python".into(), "Python", Rule::None;
        /// Templates replacing the defaults, by step name (see docs/prompts.md).
        templates: Option<std::collections::BTreeMap<String, String>> = None, "", Rule::None;
        /// Prompts kept at most (0: all the pipeline wrote).
        max_prompts: i64 = 0, "0", Rule::IntAtLeast(0);
        /// Highest share of answers that may fail to parse as a list before the stage fails.
        max_conversion_failure_rate: f64 = 0.2, "0.2", Rule::AtLeast(0.0);
        /// Seed prompts: JSONL or Parquet with prompt or messages per line or row, any artifact URI.
        seeds: Option<String> = None, "", Rule::None;
        /// Share of the output taken from the seed prompts (with seeds; pipeline none: all).
        seed_share: f64 = 0.5, "0.5", Rule::AtLeast(0.0);
        /// Share of prompts given verifiable instructions.
        instruction_share: f64 = 0.0, "0.0", Rule::AtLeast(0.0);
        /// Instructions per augmented prompt, at most.
        max_instructions: i64 = 1, "1", Rule::IntAtLeast(1);
        /// Instruction ids drawn from (default: the whole catalog).
        instruction_types: Option<Vec<String>> = None, "all", Rule::None;
        /// Share of prompts made two-turn: the generator answers, an LLM playing the user asks a follow-up.
        two_turn_share: f64 = 0.0, "0.0", Rule::AtLeast(0.0);
        /// The serve stage whose model answers two-turn prompts' first turns (default: the writer's endpoint).
        reply_endpoint: Option<String> = None, "", Rule::None;
        /// User turns of each multi-turn prompt: 2 (two-turn) or more (a dialogue: reply, follow-up, reply, ...).
        dialogue_turns: i64 = 2, "2", Rule::IntAtLeast(2);
        /// Share of the two-turn prompts whose second turn asks to revise the answer to follow an instruction.
        revise_share: f64 = 0.0, "0.0", Rule::AtLeast(0.0);
        /// Remove exact and near duplicates, within the stage and of earlier rounds.
        dedup: bool = true, "true", Rule::None;
        /// Least estimated Jaccard similarity (character 5-grams) of a near duplicate.
        near_duplicate_threshold: f64 = 0.8, "0.8", Rule::Fraction;
        /// Remove prompts sharing a word n-gram with an evaluation prompt (prompt inputs with split held_out, and eval_prompts).
        decontaminate: bool = true, "true", Rule::None;
        /// Evaluation prompt files (JSONL with prompt per line, any artifact URI), e.g. IFEval's.
        eval_prompts: Option<Vec<String>> = None, "", Rule::None;
        /// Words per decontamination n-gram.
        decontamination_ngram: i64 = 8, "8", Rule::IntAtLeast(1);
        /// Share of prompts in the preference pool (the rest: SFT), split by a hash of the prompt.
        preference_share: f64 = 0.5, "0.5", Rule::AtLeast(0.0);
        /// train, or held_out: evaluation prompts (no pools; other stages decontaminate against them).
        split: String = "train".into(), "train", Rule::OneOf(&["train", "held_out"]);
        /// Sampling temperature.
        temperature: f64 = 0.7, "0.7", Rule::AtLeast(0.0);
        /// Nucleus sampling mass.
        top_p: f64 = 0.95, "0.95", Rule::Fraction;
        /// Most tokens per answer.
        max_tokens: i64 = 512, "512", Rule::IntAtLeast(1);
        /// Seed of the requests and of every random choice.
        seed: u64 = 0, "0", Rule::None;
        /// Environment variable holding the API key.
        api_key_env: Option<String> = None, "", Rule::None;
        /// Seconds before a request times out.
        timeout_s: i64 = 120, "120", Rule::IntAtLeast(1);
        /// Retries of 429, 5xx, timeouts and connection errors.
        max_retries: i64 = 5, "5", Rule::IntAtLeast(0);
        /// First delay before an HTTP retry, doubled each time (not the task-retry `backoff_initial_ms`).
        retry_backoff_ms: i64 = 500, "500", Rule::IntAtLeast(0);
        /// Requests in flight.
        concurrency: i64 = 16, "16", Rule::IntAtLeast(1);
    }
}
impl CrossChecks for OpenaiPrompts {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let needs_llm = self.pipeline != "none" || self.two_turn_share > 0.0;
        match (&self.endpoint, &self.base_url) {
            (Some(_), Some(_)) => out.push(("base_url", "give endpoint or base_url, not both".into())),
            (None, None) if needs_llm => out.push((
                "endpoint",
                format!("is required: the serve stage that writes the prompts (or give base_url) for pipeline {}", self.pipeline),
            )),
            _ => {}
        }
        for (name, v) in [
            ("seed_share", self.seed_share),
            ("instruction_share", self.instruction_share),
            ("two_turn_share", self.two_turn_share),
            ("revise_share", self.revise_share),
            ("preference_share", self.preference_share),
            (
                "max_conversion_failure_rate",
                self.max_conversion_failure_rate,
            ),
        ] {
            if v > 1.0 {
                out.push((name, "must be in [0, 1]".into()));
            }
        }
        if self.seed_share >= 1.0 && self.pipeline != "none" {
            out.push((
                "seed_share",
                "must be below 1 with a pipeline (use pipeline: none for seed prompts only)".into(),
            ));
        }
        if self.seeds.is_none() && self.pipeline == "none" {
            out.push(("seeds", "is required with pipeline none".into()));
        }
        if self.pipeline == "closed_qa" && self.documents.is_none() {
            out.push(("documents", "is required with pipeline closed_qa".into()));
        }
        if self.documents.is_some() && self.pipeline != "closed_qa" {
            out.push((
                "documents",
                format!("applies to pipeline closed_qa, not {}", self.pipeline),
            ));
        }
        let levels: &[&str] = match self.pipeline.as_str() {
            "math" => &["general", "beginner"],
            "coding" => &["beginner", "intermediate", "advanced"],
            _ => &[],
        };
        if let Some(l) = &self.level {
            if levels.is_empty() {
                out.push((
                    "level",
                    format!(
                        "applies to pipelines math and coding, not {}",
                        self.pipeline
                    ),
                ));
            } else if !levels.contains(&l.as_str()) {
                out.push((
                    "level",
                    format!(
                        "unknown level {l:?} for {} (expected {})",
                        self.pipeline,
                        levels.join(" or ")
                    ),
                ));
            }
        }
        if self.document_types.is_some() && self.pipeline != "writing" {
            out.push((
                "document_types",
                format!("applies to pipeline writing, not {}", self.pipeline),
            ));
        }
        if let Some(types) = &self.instruction_types {
            for t in types {
                if !INSTRUCTION_IDS.contains(&t.as_str()) {
                    out.push(("instruction_types", format!("unknown instruction id {t:?}")));
                }
            }
            if types.is_empty() {
                out.push(("instruction_types", "is empty".into()));
            }
        }
        if self.dialogue_turns > 2 && self.two_turn_share == 0.0 {
            out.push((
                "dialogue_turns",
                "applies to multi-turn prompts: set two_turn_share too".into(),
            ));
        }
        if self.reply_endpoint.is_some() && self.two_turn_share == 0.0 {
            out.push((
                "reply_endpoint",
                "answers two-turn prompts: set two_turn_share too".into(),
            ));
        }
        if self.revise_share > 0.0 && self.two_turn_share == 0.0 {
            out.push((
                "revise_share",
                "applies to two-turn prompts: set two_turn_share too".into(),
            ));
        }
        let steps: Vec<(&str, &[&str])> = PROMPT_PIPELINES
            .iter()
            .find(|(p, _)| *p == self.pipeline)
            .map_or(&[][..], |(_, s)| *s)
            .iter()
            .chain(PROMPT_TURN_TEMPLATES)
            .copied()
            .collect();
        for (key, template) in self.templates.iter().flatten() {
            match steps.iter().find(|(k, _)| *k == key.as_str()) {
                None => out.push((
                    "templates",
                    format!(
                        "pipeline {} has no template {key:?} (it has {})",
                        self.pipeline,
                        steps.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                    ),
                )),
                Some((_, allowed)) => {
                    for name in placeholders(template) {
                        if !allowed.contains(&name.as_str()) {
                            out.push((
                                "templates",
                                format!("template {key} uses {{{name}}}, which it cannot fill (it has {})", allowed.join(", ")),
                            ));
                        }
                    }
                }
            }
        }
        out
    }
}

/// The `{name}` placeholders of a template (`{{` and `}}` are literal braces).
pub fn placeholders(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        if rest[i..].starts_with("{{") {
            rest = &rest[i + 2..];
            continue;
        }
        let Some(j) = rest[i..].find('}') else { break };
        let name = &rest[i + 1..i + j];
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(name.to_string());
        }
        rest = &rest[i + j + 1..];
    }
    out
}

/// IFEval's instruction ids that Flywheel can check (all but `language:response_language`).
pub const INSTRUCTION_IDS: [&str; 24] = [
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "startend:quotation",
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
];

params! {
    /// `generate` on `openai`: K samples per prompt from an OpenAI-compatible server.
    OpenaiGenerate for [Generate] on Openai {
        /// The serve stage whose endpoint answers (its URL and served name are filled in by
        /// the controller); or give base_url.
        endpoint: Option<String> = None, "", Rule::None;
        /// A server's API root, e.g. http://127.0.0.1:8000/v1 (instead of endpoint).
        base_url: Option<String> = None, "", Rule::None;
        /// chat (/chat/completions) or completions (/completions).
        api: String = "chat".into(), "chat", Rule::OneOf(&["chat", "completions"]);
        /// Model name sent (default: the endpoint's served name, else the generator's name).
        model: Option<String> = None, "", Rule::None;
        /// Samples per prompt.
        k: i64 = 4, "4", Rule::IntAtLeast(1);
        /// One request with n = k (true) or k requests with seeds seed + j (false).
        use_n: bool = true, "true", Rule::None;
        /// Sampling temperature.
        temperature: f64 = 1.0, "1.0", Rule::AtLeast(0.0);
        /// Nucleus sampling mass.
        top_p: f64 = 1.0, "1.0", Rule::Fraction;
        /// Most tokens per response.
        max_tokens: i64 = 256, "256", Rule::IntAtLeast(1);
        /// Seed sent with every request.
        seed: u64 = 0, "0", Rule::None;
        /// Environment variable holding the API key (the key never enters a spec).
        api_key_env: Option<String> = None, "", Rule::None;
        /// Seconds before a request times out.
        timeout_s: i64 = 120, "120", Rule::IntAtLeast(1);
        /// Retries of 429, 5xx, timeouts and connection errors.
        max_retries: i64 = 5, "5", Rule::IntAtLeast(0);
        /// First delay before an HTTP retry, doubled each time (not the task-retry `backoff_initial_ms`).
        retry_backoff_ms: i64 = 500, "500", Rule::IntAtLeast(0);
        /// Requests in flight.
        concurrency: i64 = 8, "8", Rule::IntAtLeast(1);
    }
}
impl CrossChecks for OpenaiGenerate {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        server_checks(&self.endpoint, &self.base_url)
    }
}

/// Exactly one of a serve stage's endpoint and a literal base_url.
fn server_checks(
    endpoint: &Option<String>,
    base_url: &Option<String>,
) -> Vec<(&'static str, String)> {
    match (endpoint, base_url) {
        (Some(_), Some(_)) => vec![("base_url", "give endpoint or base_url, not both".into())],
        (Some(e), None) if e == "chat" || e == "completions" => vec![(
            "endpoint",
            format!("names a serve stage; the API flavour {e:?} is now set with `api`"),
        )],
        (None, None) => vec![(
            "endpoint",
            "is required: the serve stage that answers (or give base_url)".into(),
        )],
        _ => Vec::new(),
    }
}

fn required(name: &'static str, v: &Option<String>) -> Vec<(&'static str, String)> {
    match v {
        Some(s) if !s.trim().is_empty() => Vec::new(),
        _ => vec![(name, "is required".into())],
    }
}

params! {
    /// `filter` on `openai` with `method: llm_judge`: two responses per prompt judged twice by an
    /// LLM with the order swapped; kept only when both verdicts agree.
    OpenaiJudge for [Filter] on Openai {
        /// llm_judge (required).
        method: Option<String> = None, "", Rule::OneOf(&["llm_judge"]);
        /// The serve stage of the judge; or give base_url.
        endpoint: Option<String> = None, "", Rule::None;
        /// The judge server's API root (instead of endpoint).
        base_url: Option<String> = None, "", Rule::None;
        /// chat or completions.
        api: String = "chat".into(), "chat", Rule::OneOf(&["chat", "completions"]);
        /// The judge model's name (default: the endpoint's served name, else the generator's).
        model: Option<String> = None, "", Rule::None;
        /// The judge prompt, with {prompt}, {a} and {b} (default: a short A/B question).
        judge_prompt: Option<String> = None, "", Rule::None;
        /// Judge sampling temperature.
        temperature: f64 = 0.0, "0.0", Rule::AtLeast(0.0);
        /// Judge nucleus sampling mass.
        top_p: f64 = 1.0, "1.0", Rule::Fraction;
        /// Most tokens of a verdict.
        max_tokens: i64 = 4, "4", Rule::IntAtLeast(1);
        /// Environment variable holding the API key.
        api_key_env: Option<String> = None, "", Rule::None;
        /// Seconds before a request times out.
        timeout_s: i64 = 120, "120", Rule::IntAtLeast(1);
        /// Retries of 429, 5xx, timeouts and connection errors.
        max_retries: i64 = 5, "5", Rule::IntAtLeast(0);
        /// First delay before an HTTP retry, doubled each time (not the task-retry `backoff_initial_ms`).
        retry_backoff_ms: i64 = 500, "500", Rule::IntAtLeast(0);
        /// Requests in flight.
        concurrency: i64 = 8, "8", Rule::IntAtLeast(1);
    }
}
impl CrossChecks for OpenaiJudge {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        let mut out = server_checks(&self.endpoint, &self.base_url);
        if self.method.is_none() {
            out.push((
                "method",
                "is required: the openai backend filters with llm_judge (best_vs_worst runs on builtin or test)".into(),
            ));
        }
        out
    }
}

params! {
    /// `evaluate` on `openai`: the round's candidate judged through its endpoint — accuracy on
    /// held-out prompts by their reference answers, win rate over the generator by an LLM judge
    /// asked in both orders (with a bootstrap 95% interval), and the generator's accuracy for
    /// comparison.
    OpenaiEvaluate for [Evaluate] on Openai {
        /// The serve stage of the candidate (required).
        candidate_endpoint: Option<String> = None, "", Rule::None;
        /// The serve stage of the round's generator (for generator_accuracy and win_rate).
        generator_endpoint: Option<String> = None, "", Rule::None;
        /// The serve stage of the judge (for win_rate; needs generator_endpoint).
        judge_endpoint: Option<String> = None, "", Rule::None;
        /// A long-lived judge's API root (instead of judge_endpoint), e.g. a NIM.
        judge_base_url: Option<String> = None, "", Rule::None;
        /// The judge model's name at judge_base_url (default: the endpoint's served name).
        judge_model: Option<String> = None, "", Rule::None;
        /// The judge prompt, with {prompt}, {a} and {b} (default: a short A/B question).
        judge_prompt: Option<String> = None, "", Rule::None;
        /// Held-out prompts used, at most (0: all the input has).
        prompts: i64 = 0, "0", Rule::IntAtLeast(0);
        /// chat or completions.
        api: String = "chat".into(), "chat", Rule::OneOf(&["chat", "completions"]);
        /// Most tokens per answer.
        max_tokens: i64 = 24, "24", Rule::IntAtLeast(1);
        /// Resamples of the win rate's bootstrap interval.
        bootstrap: i64 = 1000, "1000", Rule::IntAtLeast(1);
        /// Seed of the bootstrap.
        seed: u64 = 1234, "1234", Rule::None;
        /// Environment variable holding the API key.
        api_key_env: Option<String> = None, "", Rule::None;
        /// Seconds before a request times out.
        timeout_s: i64 = 120, "120", Rule::IntAtLeast(1);
        /// Retries of 429, 5xx, timeouts and connection errors.
        max_retries: i64 = 5, "5", Rule::IntAtLeast(0);
        /// First delay before an HTTP retry, doubled each time (not the task-retry `backoff_initial_ms`).
        retry_backoff_ms: i64 = 500, "500", Rule::IntAtLeast(0);
        /// Requests in flight.
        concurrency: i64 = 32, "32", Rule::IntAtLeast(1);
    }
}
impl CrossChecks for OpenaiEvaluate {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        let mut out = required("candidate_endpoint", &self.candidate_endpoint);
        let judged = self.judge_endpoint.is_some() || self.judge_base_url.is_some();
        if judged && self.generator_endpoint.is_none() {
            out.push((
                "judge_endpoint",
                "judges the candidate against the generator: give generator_endpoint too".into(),
            ));
        }
        if self.judge_endpoint.is_some() && self.judge_base_url.is_some() {
            out.push((
                "judge_base_url",
                "give judge_endpoint or judge_base_url, not both".into(),
            ));
        }
        if self.judge_model.is_some() && self.judge_base_url.is_none() {
            out.push((
                "judge_model",
                "applies to judge_base_url (an endpoint names its model)".into(),
            ));
        }
        out
    }
}

params! {
    /// `score` on `reward_endpoint`: five attributes (or a scalar) from an HTTP reward service.
    RewardEndpointScore for [Score] on RewardEndpoint {
        /// The service URL (required).
        url: Option<String> = None, "", Rule::None;
        /// Model name sent in chat requests.
        model: String = String::new(), "", Rule::None;
        /// chat (NVIDIA's reward API: the exchange as messages) or pair ({prompt, response}).
        request: String = "chat".into(), "chat", Rule::OneOf(&["chat", "pair"]);
        /// Where the answer is in the reply, dotted (e.g. data.0.score; default: found).
        attributes_path: String = String::new(), "", Rule::None;
        /// Weights of helpfulness, correctness, coherence, complexity, verbosity.
        weights: Option<Vec<f64>> = None, "0.3, 0.74, 0.46, 0.47, -0.33", Rule::Numbers(5);
        /// Environment variable holding the API key.
        api_key_env: Option<String> = None, "", Rule::None;
        /// Seconds before a request times out.
        timeout_s: i64 = 120, "120", Rule::IntAtLeast(1);
        /// Retries of 429, 5xx, timeouts and connection errors.
        max_retries: i64 = 5, "5", Rule::IntAtLeast(0);
        /// First delay before an HTTP retry, doubled each time (not the task-retry `backoff_initial_ms`).
        retry_backoff_ms: i64 = 500, "500", Rule::IntAtLeast(0);
        /// Requests in flight.
        concurrency: i64 = 8, "8", Rule::IntAtLeast(1);
    }
}
impl CrossChecks for RewardEndpointScore {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        required("url", &self.url)
    }
}

params! {
    /// `sft` and `preference` on `external`: a trainer command, from a template or given.
    ExternalTrain for [Sft, Preference] on External {
        /// trl, nemo_aligner, openrlhf or flywheel (or give command).
        template: Option<String> = None, "", Rule::OneOf(&["trl", "nemo_aligner", "openrlhf", "flywheel"]);
        /// The trainer's argument list with {placeholders} (instead of template).
        command: Option<Vec<Arg>> = None, "", Rule::None;
        /// Arguments appended to a template's command, with the same placeholders.
        extra_args: Option<Vec<Arg>> = None, "", Rule::None;
        /// Values for a command's own {placeholders}.
        vars: Vars = Vars::new(), "", Rule::None;
        /// Environment of the trainer process.
        env: Vars = Vars::new(), "", Rule::None;
        /// dpo or rpo (preference stages; required there).
        algorithm: Option<String> = None, "", Rule::OneOf(&["dpo", "rpo"]);
        /// Input role of the starting model of an sft stage: base (default) or generator.
        init: String = "base".into(), "base", Rule::OneOf(&["base", "generator"]);
        /// Input role of a preference stage's reference: base or generator (default: the
        /// starting model).
        reference: Option<String> = None, "", Rule::OneOf(&["base", "generator"]);
        /// Learning rate (default: 1e-5 for sft, 5e-7 for preference).
        lr: Option<f64> = None, "", Rule::Positive;
        /// Epochs.
        epochs: i64 = 1, "1", Rule::IntAtLeast(1);
        /// Global batch size.
        batch_size: i64 = 8, "8", Rule::IntAtLeast(1);
        /// KL strength β.
        beta: f64 = 0.1, "0.1", Rule::Positive;
        /// RPO's reward scale η.
        eta: f64 = 1.0, "1.0", Rule::Positive;
        /// Optimiser steps (templates that take them; also drives progress).
        steps: i64 = 100, "100", Rule::IntAtLeast(1);
        /// GPUs per node.
        gpus: i64 = 1, "1", Rule::IntAtLeast(1);
        /// Seed.
        seed: u64 = 1234, "1234", Rule::None;
        /// Seconds between SIGTERM and SIGKILL when the task is stopped.
        grace_period_s: i64 = 10, "10", Rule::IntAtLeast(0);
        /// local (a child process of the worker) or slurm (a batch job: sbatch, srun).
        executor: String = "local".into(), "local", Rule::OneOf(&["local", "slurm"]);
        /// slurm: nodes of the job (templates pass it as trainer.num_nodes and the like).
        nodes: i64 = 1, "1", Rule::IntAtLeast(1);
        /// slurm: GPUs per node (default: gpus).
        gpus_per_node: Option<i64> = None, "gpus", Rule::IntAtLeast(0);
        /// slurm: partition.
        partition: Option<String> = None, "", Rule::None;
        /// slurm: account.
        account: Option<String> = None, "", Rule::None;
        /// slurm: QoS.
        qos: Option<String> = None, "", Rule::None;
        /// slurm: time limit (sbatch --time, e.g. 04:00:00); over it the job ends TIMEOUT and is retried.
        time_limit: Option<String> = None, "", Rule::None;
        /// slurm: a container image for pyxis/enroot (srun --container-image).
        container_image: Option<String> = None, "", Rule::None;
        /// slurm: further #SBATCH directives, e.g. [--exclusive].
        sbatch_args: Option<Vec<Arg>> = None, "", Rule::None;
    }
}
/// The placeholders the external backend fills itself: a command's `vars` may not reuse them
/// (they would be overwritten, and the spec would not do what it says).
pub const EXTERNAL_PLACEHOLDERS: &[&str] = &[
    "lr",
    "epochs",
    "batch_size",
    "beta",
    "eta",
    "steps",
    "gpus",
    "nodes",
    "seed",
    "algorithm",
    "base_model",
    "ref_model",
    "sft_data",
    "sft_dir",
    "pairs_data",
    "pairs_dir",
    "data_dir",
    "output_dir",
    "preference_loss",
    "flywheel",
];

/// The `external` training params that only the Slurm executor reads.
pub const SLURM_PARAMS: &[&str] = &[
    "nodes",
    "gpus_per_node",
    "partition",
    "account",
    "qos",
    "time_limit",
    "container_image",
    "sbatch_args",
];

/// The `serve` params that only the Slurm executor reads (a server runs on one node).
pub const SLURM_SERVE_PARAMS: &[&str] = &[
    "gpus_per_node",
    "partition",
    "account",
    "qos",
    "time_limit",
    "container_image",
    "sbatch_args",
];

/// Slurm params given without the Slurm executor: accepted and ignored, they would lie.
fn slurm_param_checks<P: Serialize + Default>(
    params: &P,
    executor: &str,
    names: &[&'static str],
) -> Vec<(&'static str, String)> {
    if executor == "slurm" {
        return Vec::new();
    }
    let given = serde_json::to_value(params).expect("params serialize");
    let defaults = serde_json::to_value(P::default()).expect("params serialize");
    names
        .iter()
        .filter(|name| given[**name] != defaults[**name])
        .map(|name| (*name, "applies to executor slurm".to_string()))
        .collect()
}

impl CrossChecks for ExternalTrain {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        let mut out = slurm_param_checks(self, &self.executor, SLURM_PARAMS);
        if let Some(k) = self
            .vars
            .keys()
            .find(|k| EXTERNAL_PLACEHOLDERS.contains(&k.as_str()))
        {
            out.push((
                "vars",
                format!("{k:?} is a placeholder the backend fills itself; set the param instead, or pick another name"),
            ));
        }
        match (&self.template, &self.command) {
            (None, None) => out.push((
                "template",
                "is required (trl, nemo_aligner, openrlhf, flywheel), or give command".into(),
            )),
            (Some(_), Some(_)) => {
                out.push(("command", "give template or command, not both".into()))
            }
            _ => {}
        }
        if self.command.is_some() && self.extra_args.is_some() {
            out.push((
                "extra_args",
                "applies to templates; with command, put the arguments in the command".into(),
            ));
        }
        if self.template.is_some() && !self.vars.is_empty() {
            out.push((
                "vars",
                "applies to command; templates take their own params".into(),
            ));
        }
        out
    }
}

params! {
    /// `serve` on `external`: an OpenAI-compatible server for a model of the round, started from
    /// a template (vllm, sglang, trtllm, flywheel) or a command on a free port, ready once
    /// `GET /v1/models` lists its served name; or, with `url`, a long-lived server given the
    /// round's weights by `swap`.
    ExternalServe for [Serve] on External {
        /// Which model: generator (the round's), candidate (the model a training stage in
        /// needs produced), base or reward.
        model: String = "generator".into(), "generator", Rule::OneOf(&["generator", "candidate", "base", "reward"]);
        /// vllm, sglang, trtllm or flywheel (or give command, or url).
        template: Option<String> = None, "", Rule::OneOf(&["vllm", "sglang", "trtllm", "flywheel"]);
        /// The server's argument list with {model_path}, {host}, {port}, {served_name},
        /// {tensor_parallel}, {flywheel} (instead of template).
        command: Option<Vec<Arg>> = None, "", Rule::None;
        /// Arguments appended to a template's command.
        extra_args: Option<Vec<Arg>> = None, "", Rule::None;
        /// Environment of the server process.
        env: Vars = Vars::new(), "", Rule::None;
        /// The name clients ask for (default: flywheel-<artifact id>, so that the name says
        /// which weights answer; trtllm, which has no such flag, answers as the model path).
        served_name: Option<String> = None, "", Rule::None;
        /// GPUs the model is split over.
        tensor_parallel: i64 = 1, "1", Rule::IntAtLeast(1);
        /// Address the server binds (default: 127.0.0.1; 0.0.0.0 with executor slurm).
        host: Option<String> = None, "127.0.0.1", Rule::None;
        /// Host name consumers use (default: host, or, when host is 0.0.0.0, this machine's
        /// name, or the job's node with executor slurm).
        advertise_host: Option<String> = None, "", Rule::None;
        /// Seconds to wait for readiness before failing with the server's log.
        startup_timeout_s: i64 = 600, "600", Rule::IntAtLeast(1);
        /// Seconds between SIGTERM and SIGKILL when the server is stopped.
        grace_period_s: i64 = 10, "10", Rule::IntAtLeast(0);
        /// A long-lived server's API root, e.g. http://10.0.0.5:30000/v1 (instead of starting one).
        url: Option<String> = None, "", Rule::None;
        /// How a long-lived server gets the weights: sglang (POST /update_weights_from_disk) or
        /// vllm_lora (POST /v1/load_lora_adapter; requests then name the adapter).
        swap: Option<String> = None, "", Rule::OneOf(&["sglang", "vllm_lora"]);
        /// Environment variable holding the API key of a long-lived server.
        api_key_env: Option<String> = None, "", Rule::None;
        /// local (a child process of the worker, dying with it) or slurm (a one-node batch
        /// job: sbatch, srun; a worker that dies leaves it serving, and its successor
        /// re-attaches to it).
        executor: String = "local".into(), "local", Rule::OneOf(&["local", "slurm"]);
        /// slurm: GPUs of the job (default: tensor_parallel).
        gpus_per_node: Option<i64> = None, "tensor_parallel", Rule::IntAtLeast(0);
        /// slurm: partition.
        partition: Option<String> = None, "", Rule::None;
        /// slurm: account.
        account: Option<String> = None, "", Rule::None;
        /// slurm: QoS.
        qos: Option<String> = None, "", Rule::None;
        /// slurm: time limit (sbatch --time); a server over it ends TIMEOUT and is started again.
        time_limit: Option<String> = None, "", Rule::None;
        /// slurm: a container image for pyxis/enroot (srun --container-image).
        container_image: Option<String> = None, "", Rule::None;
        /// slurm: further #SBATCH directives, e.g. [--exclusive].
        sbatch_args: Option<Vec<Arg>> = None, "", Rule::None;
    }
}
impl ExternalServe {
    /// The address the server binds.
    pub fn bind_host(&self) -> &str {
        match (&self.host, self.executor.as_str()) {
            (Some(h), _) => h,
            (None, "slurm") => "0.0.0.0",
            (None, _) => "127.0.0.1",
        }
    }
}
impl CrossChecks for ExternalServe {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        let mut out = slurm_param_checks(self, &self.executor, SLURM_SERVE_PARAMS);
        if self.executor == "slurm" && self.url.is_some() {
            out.push((
                "executor",
                "a long-lived server given by url is not started, so it has no executor".into(),
            ));
        }
        let given = [
            self.template.is_some(),
            self.command.is_some(),
            self.url.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => out.push((
                "template",
                "is required (vllm, sglang, trtllm, flywheel), or give command, or url".into(),
            )),
            1 => {}
            _ => out.push(("url", "give one of template, command and url".into())),
        }
        match (&self.url, &self.swap) {
            (Some(_), None) => out.push((
                "swap",
                "is required with url: sglang or vllm_lora (to restart instead, give template)"
                    .into(),
            )),
            (None, Some(_)) => {
                out.push(("swap", "applies to a long-lived server given by url".into()))
            }
            _ => {}
        }
        if self.extra_args.is_some() && self.template.is_none() {
            out.push(("extra_args", "applies to templates".into()));
        }
        out
    }
}

params! {
    /// `evaluate` on `external`: an evaluation harness run against a serve stage's endpoint —
    /// `lm_eval` (lm-evaluation-harness, `local-chat-completions`) or a command — whose results
    /// JSON becomes the stage's metrics (`<task>.<metric>`, e.g. `ifeval.prompt_level_strict_acc`).
    ExternalEvaluate for [Evaluate] on External {
        /// lm_eval (or give command).
        template: Option<String> = None, "", Rule::OneOf(&["lm_eval"]);
        /// The harness's argument list with {served_name}, {base_url}, {tasks}, {output_dir},
        /// {concurrency} (instead of template); it must write lm_eval's results JSON under
        /// {output_dir}.
        command: Option<Vec<Arg>> = None, "", Rule::None;
        /// The serve stage whose model is evaluated (required).
        endpoint: Option<String> = None, "", Rule::None;
        /// Tasks or task groups, e.g. [ifeval] (required).
        tasks: Vec<String> = Vec::new(), "", Rule::None;
        /// Examples per task, at most (default: all).
        limit: Option<i64> = None, "", Rule::IntAtLeast(1);
        /// Few-shot examples in each prompt (default: the task's).
        num_fewshot: Option<i64> = None, "", Rule::IntAtLeast(0);
        /// A directory of task definitions of your own (lm_eval --include_path).
        include_path: Option<String> = None, "", Rule::None;
        /// Requests in flight.
        concurrency: i64 = 8, "8", Rule::IntAtLeast(1);
        /// Arguments appended to the template's command.
        extra_args: Option<Vec<Arg>> = None, "", Rule::None;
        /// Environment of the harness process.
        env: Vars = Vars::new(), "", Rule::None;
        /// Seconds between SIGTERM and SIGKILL when the task is stopped.
        grace_period_s: i64 = 10, "10", Rule::IntAtLeast(0);
    }
}
impl CrossChecks for ExternalEvaluate {
    fn cross_checks(&self) -> Vec<(&'static str, String)> {
        let mut out = required("endpoint", &self.endpoint);
        if self.tasks.is_empty() {
            out.push((
                "tasks",
                "is required: the tasks to run, e.g. [ifeval]".into(),
            ));
        }
        match (&self.template, &self.command) {
            (None, None) => out.push(("template", "is required (lm_eval), or give command".into())),
            (Some(_), Some(_)) => {
                out.push(("command", "give template or command, not both".into()))
            }
            _ => {}
        }
        if self.command.is_some() && self.extra_args.is_some() {
            out.push(("extra_args", "applies to templates".into()));
        }
        out
    }
}

params! {
    /// The test backend's own knobs, on every kind it runs.
    TestKnobs for [Custom] on Test {
        /// Work this long, honouring cancellation.
        sleep_ms: i64 = 0, "0", Rule::IntAtLeast(0);
        /// Attempts 1..=N fail, retryably.
        fail_attempts: i64 = 0, "0", Rule::IntAtLeast(0);
        /// Fail without retry.
        fail_permanently: bool = false, "false", Rule::None;
        /// Attempts 1..=N abort the worker process.
        crash_attempts: i64 = 0, "0", Rule::IntAtLeast(0);
    }
}
impl CrossChecks for TestKnobs {}

/// Every documented (kind, backend) pair. The test backend takes its own knobs on every kind,
/// and, for the kinds whose outputs record them, the builtin's params (see [`docs_for`]).
pub const PARAMS: &[ParamsDoc] = &[
    BuiltinPrompts::DOC,
    BuiltinGenerate::DOC,
    BuiltinScore::DOC,
    BuiltinFilter::DOC,
    BuiltinSft::DOC,
    BuiltinPreference::DOC,
    BuiltinEvaluate::DOC,
    OpenaiPrompts::DOC,
    OpenaiGenerate::DOC,
    OpenaiJudge::DOC,
    OpenaiEvaluate::DOC,
    RewardEndpointScore::DOC,
    ExternalTrain::DOC,
    ExternalServe::DOC,
    ExternalEvaluate::DOC,
    TestKnobs::DOC,
];

/// The declarations that apply to `kind` on `backend`. The test backend, a stand-in for the
/// builtin engine, takes the builtin's params where it records them in its outputs (prompts,
/// responses, scores, datasets, models: `metadata.params`), and its knobs everywhere;
/// `evaluate` has no outputs, so there it takes only its knobs.
pub fn docs_for(kind: StageKind, backend: BackendKind) -> Vec<&'static ParamsDoc> {
    let of = |b: BackendKind| {
        PARAMS
            .iter()
            .filter(move |d| d.backend == b && d.kinds.contains(&kind))
    };
    match backend {
        BackendKind::Test => {
            let mut docs: Vec<_> = if kind == StageKind::Evaluate {
                Vec::new()
            } else {
                of(BackendKind::Builtin).collect()
            };
            docs.push(&TestKnobs::DOC);
            docs
        }
        b => of(b).collect(),
    }
}

/// A problem with a stage's params: the param (empty: the params as a whole) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamProblem {
    pub param: String,
    pub message: String,
}

/// The closest of `known` to `word`, if it is close enough to be a likely typo.
fn closest<'a>(word: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != *cb);
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    };
    known
        .map(|k| (distance(word, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

/// Checks a stage's params against the contract of its (kind, backend): every key known (an
/// unknown one is reported with the closest known key), every value of its declared type and
/// within its bound, and the requirements between params. `promote` params are the gate's,
/// checked by the controller.
pub fn check(
    kind: StageKind,
    backend: BackendKind,
    params: &Map<String, Value>,
) -> Vec<ParamProblem> {
    let problem = |param: &str, message: String| ParamProblem {
        param: param.to_string(),
        message,
    };
    if kind == StageKind::Promote {
        return Vec::new();
    }
    if !backend.runs(kind) {
        let others: Vec<&str> = BackendKind::ALL
            .iter()
            .filter(|b| b.runs(kind))
            .map(|b| b.as_str())
            .collect();
        return vec![problem(
            "",
            format!(
                "backend {backend} does not run {kind} stages; backends that do: {}",
                others.join(", ")
            ),
        )];
    }
    let docs = docs_for(kind, backend);
    let mut problems = Vec::new();
    for (key, value) in params {
        let Some(result) = docs.iter().find_map(|d| (d.check_field)(key, value)) else {
            let known = docs.iter().flat_map(|d| d.params.iter().map(|p| p.name));
            let hint = match closest(key, known) {
                Some(k) => format!("; did you mean {k}?"),
                None => format!(
                    "; {kind} on {backend} takes {}",
                    docs.iter()
                        .flat_map(|d| d.params.iter().map(|p| p.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            problems.push(problem(key, format!("unknown field{hint}")));
            continue;
        };
        if let Err(message) = result {
            problems.push(problem(key, message));
        }
    }
    if problems.is_empty() {
        for d in &docs {
            let own: Map<String, Value> = params
                .iter()
                .filter(|(k, _)| d.params.iter().any(|p| p.name == k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (param, message) in (d.check_all)(&Value::Object(own)) {
                problems.push(problem(param, message));
            }
        }
    }
    problems
}

/// A stage's params as the backend reads them: the fields declared by `T` (with their
/// defaults), leaving out the keys of the other declarations that apply (the test backend's
/// knobs). The controller validated the params at submission, so an error here means a worker
/// and its controller disagree about the contract.
pub fn parse<T: Params>(params: &Value) -> Result<T, String> {
    let own: Map<String, Value> = params
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| T::DOC.params.iter().any(|p| p.name == k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    serde_json::from_value(Value::Object(own)).map_err(|e| format!("stage params: {e}"))
}

/// A declared type as the reference shows it.
fn human_type(ty: &str) -> String {
    let (inner, optional) = match ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
        Some(t) => (t, true),
        None => (ty, false),
    };
    let word = match inner {
        "i64" | "u64" => "integer",
        "f64" => "number",
        "bool" => "boolean",
        "String" => "string",
        "Vec<String>" => "list of strings",
        "Vec<f64>" => "list of numbers",
        "Vec<Arg>" => "list of arguments",
        "Vars" => "map",
        other => other,
    };
    if optional {
        format!("{word} (optional)")
    } else {
        word.to_string()
    }
}

/// `docs/params.md`: the parameter reference, generated from [`PARAMS`]
/// (`flywheel params --markdown > docs/params.md`; a test checks the file matches).
pub fn markdown() -> String {
    let mut out = String::from(
        "# Stage params\n\n\
         Generated from the stage contract (`proto/src/stage.rs`) by `flywheel params --markdown`;\n\
         a test fails when this file and the code disagree. A param not listed for a stage's\n\
         (kind, backend) is refused at submission, as is a backend that does not run the kind.\n\
         `—` as a default: required, or derived as the meaning says.\n\n\
         | kind | backend | param | type | default | meaning |\n|---|---|---|---|---|---|\n",
    );
    for d in PARAMS {
        let kinds = d
            .kinds
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let backend = if d.backend == BackendKind::Test {
            "test (also the builtin's params of the kind, recorded in its outputs; not on evaluate)"
                .to_string()
        } else {
            d.backend.to_string()
        };
        let kinds = if d.backend == BackendKind::Test {
            "every kind it runs".to_string()
        } else {
            kinds
        };
        for p in d.params {
            let ty = human_type(p.ty);
            out.push_str(&format!(
                "| {kinds} | {backend} | `{}` | {ty} | {} | {} |\n",
                p.name,
                if p.default.is_empty() {
                    "—".to_string()
                } else {
                    format!("`{}`", p.default)
                },
                p.meaning.trim()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(kind: StageKind, backend: BackendKind, v: Value) -> Vec<String> {
        check(kind, backend, v.as_object().unwrap())
            .into_iter()
            .map(|p| format!("{}: {}", p.param, p.message))
            .collect()
    }

    /// A prompt-synthesis spec that could not do what it says is refused, naming the param.
    #[test]
    fn prompt_synthesis_params_that_cannot_work_are_refused() {
        use BackendKind::Openai;
        use StageKind::SynthesizePrompts;
        let p = |v: Value| problems(SynthesizePrompts, Openai, v);
        assert_eq!(
            p(json!({})),
            [
                "endpoint: is required: the serve stage that writes the prompts (or give base_url) for pipeline open_qa"
            ]
        );
        assert!(p(json!({ "pipeline": "none", "seeds": "file:///s.jsonl" })).is_empty());
        assert_eq!(
            p(json!({ "base_url": "http://x/v1", "pipeline": "closed_qa" })),
            ["documents: is required with pipeline closed_qa"]
        );
        assert_eq!(
            p(json!({ "base_url": "http://x/v1", "templates": { "writing_tasks": "x" } })),
            [
                "templates: pipeline open_qa has no template \"writing_tasks\" (it has macro_topics, subtopics, questions, revise, follow_up, revise_turn)"
            ]
        );
        assert_eq!(
            p(
                json!({ "base_url": "http://x/v1", "templates": { "questions": "{n_openlines} on {subject}" } })
            ),
            [
                "templates: template questions uses {subject}, which it cannot fill (it has n_openlines, topic)"
            ]
        );
        assert_eq!(
            p(json!({ "base_url": "http://x/v1", "pipeline": "math", "level": "expert" })),
            ["level: unknown level \"expert\" for math (expected general or beginner)"]
        );
        assert_eq!(
            p(json!({ "base_url": "http://x/v1", "instruction_types": ["keywords:rhymes"] })),
            ["instruction_types: unknown instruction id \"keywords:rhymes\""]
        );
        assert_eq!(
            p(json!({ "base_url": "http://x/v1", "two_turn_share": 1.5 })),
            ["two_turn_share: must be in [0, 1]"]
        );
        assert_eq!(
            p(json!({ "base_url": "http://x/v1", "revise_share": 0.5, "dialogue_turns": 3 })),
            [
                "dialogue_turns: applies to multi-turn prompts: set two_turn_share too",
                "revise_share: applies to two-turn prompts: set two_turn_share too"
            ]
        );
        assert_eq!(
            p(json!({ "pipeline": "none" })),
            ["seeds: is required with pipeline none"]
        );
        assert_eq!(
            problems(
                SynthesizePrompts,
                BackendKind::Builtin,
                json!({ "brackets": 0.7, "quotes": 0.5 })
            ),
            ["quotes: brackets + quotes must be at most 1 (is 1.2)"]
        );
    }

    /// The Slurm params need the Slurm executor: accepted and ignored they would lie.
    #[test]
    fn slurm_params_need_the_slurm_executor() {
        let p = |v: Value| problems(StageKind::Sft, BackendKind::External, v);
        assert_eq!(
            p(json!({ "template": "trl", "partition": "batch", "nodes": 2 })),
            [
                "nodes: applies to executor slurm",
                "partition: applies to executor slurm"
            ]
        );
        assert!(
            p(json!({ "template": "trl", "executor": "slurm", "partition": "batch", "nodes": 2 }))
                .is_empty()
        );
        let serve = |v: Value| problems(StageKind::Serve, BackendKind::External, v);
        assert_eq!(
            serve(json!({ "template": "vllm", "time_limit": "01:00:00" })),
            ["time_limit: applies to executor slurm"]
        );
        // A server runs on one node: nodes is no serve param.
        assert_eq!(
            serve(json!({ "template": "vllm", "executor": "slurm", "nodes": 2 })),
            ["nodes: unknown field; did you mean model?"]
        );
        assert_eq!(
            serve(json!({ "url": "http://x/v1", "swap": "sglang", "executor": "slurm" })),
            ["executor: a long-lived server given by url is not started, so it has no executor"]
        );
        let slurm: ExternalServe =
            serde_json::from_value(json!({ "template": "vllm", "executor": "slurm" })).unwrap();
        assert_eq!(slurm.bind_host(), "0.0.0.0");
        assert_eq!(ExternalServe::default().bind_host(), "127.0.0.1");
        assert!(serve(json!({ "template": "vllm", "executor": "slurm", "partition": "gpu", "gpus_per_node": 8 })).is_empty());
    }

    #[test]
    fn typos_types_bounds_and_backends_are_named() {
        use BackendKind::*;
        use StageKind::*;
        assert_eq!(
            problems(
                Generate,
                Openai,
                json!({ "base_url": "http://x/v1", "temprature": 0.7 })
            ),
            ["temprature: unknown field; did you mean temperature?"]
        );
        assert_eq!(
            problems(Generate, Builtin, json!({ "k": "four", "top_p": 2.0 })),
            ["k: must be an integer", "top_p: must be in (0, 1]"]
        );
        assert_eq!(
            problems(Sft, Openai, json!({})),
            [": backend openai does not run sft stages; backends that do: builtin, external, test"]
        );
        assert_eq!(
            problems(
                Preference,
                Builtin,
                json!({ "algorithm": "dpo", "eta": 1.0 })
            ),
            ["eta: applies to rpo only"]
        );
        assert_eq!(
            problems(Preference, Builtin, json!({})),
            ["algorithm: is required (dpo or rpo)"]
        );
        assert_eq!(
            problems(Sft, Builtin, json!({ "epochs": 2 })),
            [
                "epochs: unknown field; sft on builtin takes init, steps, lr, batch_size, warmup, seed"
            ]
        );
        // The test backend takes the builtin's params and its knobs.
        assert!(
            problems(
                Generate,
                Test,
                json!({ "k": 2, "temperature": 0.5, "sleep_ms": 10 })
            )
            .is_empty()
        );
        assert_eq!(
            problems(Score, RewardEndpoint, json!({})),
            ["url: is required"]
        );
        assert!(problems(Promote, Openai, json!({ "require": {} })).is_empty());
        assert_eq!(
            problems(
                Sft,
                External,
                json!({ "command": ["t", "{lr}"], "vars": { "lr": "5" } })
            ),
            [
                "vars: \"lr\" is a placeholder the backend fills itself; set the param instead, or pick another name"
            ]
        );
    }

    #[test]
    fn backends_read_the_declared_defaults() {
        let p: BuiltinGenerate = parse(&json!({ "k": 8, "sleep_ms": 5 })).unwrap();
        assert_eq!((p.k, p.max_tokens, p.temperature), (8, 24, 1.0));
        let p: OpenaiGenerate = parse(&json!({ "base_url": "u" })).unwrap();
        assert_eq!((p.max_tokens, p.concurrency, p.use_n), (256, 8, true));
        let knobs: TestKnobs = parse(&json!({ "k": 8, "sleep_ms": 5 })).unwrap();
        assert_eq!(knobs.sleep_ms, 5);
    }

    #[test]
    fn the_parameter_reference_matches_the_code() {
        assert!(
            include_str!("../../docs/params.md") == markdown(),
            "docs/params.md is out of date: run `flywheel params --markdown > docs/params.md`"
        );
    }

    #[test]
    fn every_declared_default_passes_its_own_bound() {
        for d in PARAMS {
            let defaults = (d.defaults)();
            for p in d.params {
                assert!(!p.meaning.trim().is_empty(), "{} has no meaning", p.name);
                let v = &defaults[p.name];
                if !v.is_null() {
                    assert_eq!((d.check_field)(p.name, v), Some(Ok(())), "{}", p.name);
                }
            }
        }
    }
}
