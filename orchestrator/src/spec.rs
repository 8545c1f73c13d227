//! Campaign specs: YAML, versioned by `apiVersion`, validated in full before anything is stored.
//!
//! Validation walks the document as a generic value so that it can report *every* problem with
//! its field path (`recipe.stages[3].params.beta: must be > 0`), not just the first one serde
//! trips on. Only a document that validates is turned into a [`CampaignSpec`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const API_VERSION: &str = "flywheel/v1";

/// One validation problem: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A spec that did not validate, with every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid campaign spec: {}", listed(problems))]
pub struct SpecError {
    pub problems: Vec<Problem>,
}

/// The first [`MAX_LISTED_PROBLEMS`](crate::limits::MAX_LISTED_PROBLEMS) problems, then a count.
fn listed(problems: &[Problem]) -> String {
    let max = crate::limits::MAX_LISTED_PROBLEMS;
    let mut out = problems
        .iter()
        .take(max)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > max {
        out.push_str(&format!("; and {} more problems", problems.len() - max));
    }
    out
}

/// Stage kinds and backends are the stage contract's (`flywheel_proto::stage`).
pub use flywheel_proto::stage::{BackendKind, StageKind};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub uri: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Models {
    /// The initial generator (the recipe's weak model).
    pub generator: ModelRef,
    /// The base (policy) model that each round's training starts from.
    pub base: ModelRef,
    /// The reward model, which also judges.
    pub reward: ModelRef,
}

/// Where a stage runs and how it is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub pool: String,
    pub backend: String,
    pub gpu_kind: String,
    pub gpu_count: u32,
    pub max_attempts: u32,
    pub backoff_initial_ms: u32,
    pub backoff_max_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    pub name: String,
    pub kind: StageKind,
    pub shards: u32,
    /// Stages (earlier in the recipe) this one consumes; defaults to the previous stage.
    pub needs: Vec<String>,
    pub params: Map<String, Value>,
    pub placement: Placement,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignSpec {
    pub name: String,
    pub models: Models,
    pub rounds: u32,
    pub stages: Vec<StageSpec>,
}

/// A promotion requirement: `metric op value`, e.g. `evaluate.win_rate >= 0.5`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub metric: String,
    pub op: CompareOp,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Ge,
    Gt,
    Le,
    Lt,
}

impl CompareOp {
    pub fn holds(self, left: f64, right: f64) -> bool {
        match self {
            Self::Ge => left >= right,
            Self::Gt => left > right,
            Self::Le => left <= right,
            Self::Lt => left < right,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ge => ">=",
            Self::Gt => ">",
            Self::Le => "<=",
            Self::Lt => "<",
        }
    }
}

impl Requirement {
    /// Parses `">= 0.5"` for `metric`.
    pub fn parse(metric: &str, condition: &str) -> Option<Self> {
        let condition = condition.trim();
        let (op, rest) = [
            (">=", CompareOp::Ge),
            ("<=", CompareOp::Le),
            (">", CompareOp::Gt),
            ("<", CompareOp::Lt),
        ]
        .into_iter()
        .find_map(|(sym, op)| condition.strip_prefix(sym).map(|rest| (op, rest)))?;
        let value: f64 = rest.trim().parse().ok()?;
        value.is_finite().then(|| Self {
            metric: metric.to_string(),
            op,
            value,
        })
    }
}

impl Requirement {
    /// The requirements in the `require` mapping of a `promote` stage's params (validated when
    /// the spec was parsed).
    pub fn from_params(params: &Value) -> Vec<Requirement> {
        params
            .get("require")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(metric, cond)| Requirement::parse(metric, cond.as_str()?))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Parses YAML into a generic value with bounded work: aliases may replay at most
/// [`MAX_YAML_ALIAS_EVENTS`](crate::limits::MAX_YAML_ALIAS_EVENTS) events in all (an alias bomb
/// is refused, not expanded), duplicate keys are an error (not "last one wins"), and only
/// `true`/`false` are booleans (YAML 1.2, as before).
fn parse_yaml(text: &str) -> Result<Value, String> {
    let options = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: crate::limits::MAX_YAML_ALIAS_EVENTS,
        },
        strict_booleans: true,
    };
    serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let e = e.to_string();
        let e = e.lines().next().unwrap_or_default();
        format!("not valid YAML: {}", crate::limits::truncate(e, 500))
    })
}

impl CampaignSpec {
    /// Parses and validates a YAML spec.
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
        let doc = parse_yaml(text).map_err(|message| SpecError {
            problems: vec![Problem {
                path: "$".into(),
                message,
            }],
        })?;
        let mut v = Validator::default();
        v.no_nul(&doc, "");
        let spec = v.campaign(&doc);
        match spec {
            Some(spec) if v.problems.is_empty() => Ok(spec),
            _ => Err(SpecError {
                problems: v.problems,
            }),
        }
    }

    /// This spec with the promotion gate of `stage` replaced; the gate is validated like one
    /// in a submitted spec, with paths starting at `require`.
    pub fn with_gate(
        &self,
        stage: &str,
        require: &BTreeMap<String, String>,
    ) -> Result<Self, SpecError> {
        let Some(i) = self
            .stages
            .iter()
            .position(|s| s.name == stage && s.kind == StageKind::Promote)
        else {
            return Err(SpecError {
                problems: vec![Problem {
                    path: "stage".into(),
                    message: format!("the recipe has no promote stage named {stage:?}"),
                }],
            });
        };
        let earlier: HashSet<String> = self.stages[..i].iter().map(|s| s.name.clone()).collect();
        let gate: Map<String, Value> = require
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let params: Map<String, Value> = [("require".to_string(), Value::Object(gate))]
            .into_iter()
            .collect();
        let mut v = Validator::default();
        v.gate(&params, "", &earlier);
        if !v.problems.is_empty() {
            return Err(SpecError {
                problems: v.problems,
            });
        }
        let mut spec = self.clone();
        spec.stages[i].params.extend(params);
        Ok(spec)
    }

    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Stable hash of a stage's configuration (kind, params, placement): part of artifact lineage.
    pub fn stage_config_hash(stage: &StageSpec) -> String {
        use sha2::{Digest, Sha256};
        let canonical = serde_json::to_vec(stage).unwrap_or_default();
        format!("sha256:{:x}", Sha256::digest(canonical))
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

const TOP_KEYS: &[&str] = &[
    "apiVersion",
    "name",
    "models",
    "rounds",
    "defaults",
    "recipe",
];
const PLACEMENT_KEYS: &[&str] = &[
    "pool",
    "backend",
    "gpu_kind",
    "gpu_count",
    "max_attempts",
    "backoff_initial_ms",
    "backoff_max_ms",
];
const STAGE_KEYS: &[&str] = &["name", "kind", "shards", "needs", "params"];

impl Validator {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn object<'a>(&mut self, v: Option<&'a Value>, path: &str) -> Option<&'a Map<String, Value>> {
        match v {
            None | Some(Value::Null) => {
                self.problem(path, "is required");
                None
            }
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                self.problem(path, "must be a mapping");
                None
            }
        }
    }

    fn unknown_keys(&mut self, m: &Map<String, Value>, allowed: &[&str], path: &str) {
        for key in m.keys().filter(|k| !allowed.contains(&k.as_str())) {
            self.problem(
                join(path, key),
                format!("unknown field (expected one of: {})", allowed.join(", ")),
            );
        }
    }

    fn string(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
        match m.get(key) {
            None | Some(Value::Null) => {
                self.problem(join(path, key), "is required");
                None
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.problem(join(path, key), "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.problem(join(path, key), "must be a string");
                None
            }
        }
    }

    fn opt_string(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
        match m.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.problem(join(path, key), "must be a string");
                None
            }
        }
    }

    /// An optional integer within `[min, max]`.
    fn opt_int(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
        min: u64,
        max: u64,
    ) -> Option<u32> {
        let v = m.get(key)?;
        match v.as_u64() {
            Some(n) if n >= min && n <= max => Some(n as u32),
            Some(_) | None if v.is_i64() || v.is_u64() => {
                self.problem(join(path, key), format!("must be between {min} and {max}"));
                None
            }
            _ => {
                self.problem(join(path, key), "must be an integer");
                None
            }
        }
    }

    fn campaign(&mut self, doc: &Value) -> Option<CampaignSpec> {
        let top = self.object(Some(doc), "$")?;
        self.unknown_keys(top, TOP_KEYS, "");
        match top.get("apiVersion") {
            Some(Value::String(v)) if v == API_VERSION => {}
            Some(Value::String(v)) => self.problem(
                "apiVersion",
                format!("unsupported version {v:?} (this controller reads {API_VERSION:?})"),
            ),
            _ => self.problem(
                "apiVersion",
                format!("is required and must be {API_VERSION:?}"),
            ),
        }
        let name = self.string(top, "name", "");
        if let Some(n) = &name
            && n.len() > 200
        {
            self.problem("name", "must be at most 200 characters");
        }
        let models = self.models(top.get("models"));
        let rounds = match top.get("rounds") {
            None => {
                self.problem("rounds", "is required");
                None
            }
            Some(_) => self.opt_int(top, "rounds", "", 1, 1000),
        };
        let defaults = self.placement(
            top.get("defaults").and_then(Value::as_object),
            &Placement {
                pool: "default".into(),
                backend: "builtin".into(),
                gpu_kind: String::new(),
                gpu_count: 0,
                max_attempts: 3,
                backoff_initial_ms: 1000,
                backoff_max_ms: 60_000,
            },
            "defaults",
        );
        if let Some(d) = top.get("defaults")
            && !d.is_object()
        {
            self.problem("defaults", "must be a mapping");
        }
        let stages = self.recipe(top.get("recipe"), &defaults);
        Some(CampaignSpec {
            name: name?,
            models: models?,
            rounds: rounds?,
            stages: stages?,
        })
    }

    fn models(&mut self, v: Option<&Value>) -> Option<Models> {
        let m = self.object(v, "models")?;
        self.unknown_keys(m, &["generator", "base", "reward"], "models");
        let mut model = |key: &str| {
            let path = format!("models.{key}");
            let obj = self.object(m.get(key), &path)?;
            self.unknown_keys(obj, &["name", "uri"], &path);
            let uri = self.string(obj, "uri", &path);
            let name = self.opt_string(obj, "name", &path);
            let uri = uri?;
            Some(ModelRef {
                name: name.unwrap_or_else(|| uri.clone()),
                uri,
            })
        };
        let generator = model("generator");
        let base = model("base");
        let reward = model("reward");
        Some(Models {
            generator: generator?,
            base: base?,
            reward: reward?,
        })
    }

    fn placement(
        &mut self,
        m: Option<&Map<String, Value>>,
        inherited: &Placement,
        path: &str,
    ) -> Placement {
        let mut p = inherited.clone();
        let Some(m) = m else { return p };
        if path == "defaults" {
            self.unknown_keys(m, PLACEMENT_KEYS, path);
        }
        for (key, slot) in [("pool", &mut p.pool), ("backend", &mut p.backend)] {
            if let Some(s) = self.opt_string(m, key, path) {
                if s.trim().is_empty() {
                    self.problem(join(path, key), "must not be empty");
                } else {
                    *slot = s;
                }
            }
        }
        if let Some(s) = self.opt_string(m, "gpu_kind", path) {
            p.gpu_kind = s;
        }
        if let Some(n) = self.opt_int(m, "gpu_count", path, 0, 1024) {
            p.gpu_count = n;
        }
        if let Some(n) = self.opt_int(m, "max_attempts", path, 1, 100) {
            p.max_attempts = n;
        }
        if let Some(n) = self.opt_int(m, "backoff_initial_ms", path, 1, 86_400_000) {
            p.backoff_initial_ms = n;
        }
        if let Some(n) = self.opt_int(m, "backoff_max_ms", path, 1, 86_400_000) {
            p.backoff_max_ms = n;
        }
        if p.backoff_max_ms < p.backoff_initial_ms {
            self.problem(
                join(path, "backoff_max_ms"),
                "must be >= backoff_initial_ms",
            );
        }
        p
    }

    fn recipe(&mut self, v: Option<&Value>, defaults: &Placement) -> Option<Vec<StageSpec>> {
        let recipe = self.object(v, "recipe")?;
        self.unknown_keys(recipe, &["stages"], "recipe");
        let list = match recipe.get("stages") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(Value::Array(_)) => {
                self.problem("recipe.stages", "must list at least one stage");
                return None;
            }
            None | Some(Value::Null) => {
                self.problem("recipe.stages", "is required");
                return None;
            }
            Some(_) => {
                self.problem("recipe.stages", "must be a list");
                return None;
            }
        };
        let mut stages = Vec::new();
        let mut seen = HashSet::new();
        let mut ok = true;
        for (i, raw) in list.iter().enumerate() {
            let path = format!("recipe.stages[{i}]");
            match self.stage(raw, &path, defaults, &seen, stages.last()) {
                Some(stage) => {
                    seen.insert(stage.name.clone());
                    stages.push(stage);
                }
                None => ok = false,
            }
        }
        if ok {
            self.recipe_shape(&stages);
        }
        ok.then_some(stages)
    }

    fn stage(
        &mut self,
        raw: &Value,
        path: &str,
        defaults: &Placement,
        earlier: &HashSet<String>,
        previous: Option<&StageSpec>,
    ) -> Option<StageSpec> {
        let m = self.object(Some(raw), path)?;
        let allowed: Vec<&str> = STAGE_KEYS.iter().chain(PLACEMENT_KEYS).copied().collect();
        self.unknown_keys(m, &allowed, path);
        let name = self.string(m, "name", path);
        if let Some(n) = &name {
            if !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                self.problem(
                    join(path, "name"),
                    "must contain only letters, digits, '-' and '_'",
                );
            }
            if earlier.contains(n) {
                self.problem(join(path, "name"), format!("duplicate stage name {n:?}"));
            }
        }
        let kind = self.string(m, "kind", path).and_then(|k| {
            let kind = StageKind::parse(&k);
            if kind.is_none() {
                let all: Vec<_> = StageKind::ALL.iter().map(|k| k.as_str()).collect();
                self.problem(
                    join(path, "kind"),
                    format!("unknown kind {k:?} (expected one of: {})", all.join(", ")),
                );
            }
            kind
        });
        let shards = self.opt_int(m, "shards", path, 1, 100_000).unwrap_or(1);
        if let Some(k) = kind
            && shards > 1
            && !k.shardable()
        {
            self.problem(
                join(path, "shards"),
                format!(
                    "a {} stage cannot be sharded (only generate, score and custom can)",
                    k.as_str()
                ),
            );
        }
        let needs = match m.get("needs") {
            None | Some(Value::Null) => previous.map(|p| vec![p.name.clone()]).unwrap_or_default(),
            Some(Value::Array(items)) => {
                let mut needs = Vec::new();
                for (j, item) in items.iter().enumerate() {
                    let p = format!("{path}.needs[{j}]");
                    match item.as_str() {
                        Some(n) if earlier.contains(n) => needs.push(n.to_string()),
                        Some(n) => self.problem(
                            p,
                            format!("{n:?} is not a stage defined earlier in the recipe"),
                        ),
                        None => self.problem(p, "must be a stage name"),
                    }
                }
                needs
            }
            Some(_) => {
                self.problem(join(path, "needs"), "must be a list of stage names");
                Vec::new()
            }
        };
        let params = match m.get("params") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => {
                self.problem(join(path, "params"), "must be a mapping");
                Map::new()
            }
        };
        let placement = self.placement(Some(m), defaults, path);
        if let Some(k) = kind {
            self.params(k, &placement.backend, &params, path, earlier);
        }
        Some(StageSpec {
            name: name?,
            kind: kind?,
            shards,
            needs,
            params,
            placement,
        })
    }

    /// A stage's params against the stage contract of its (kind, backend), plus what only the
    /// controller knows: the promotion gate, and that secrets never enter a spec.
    fn params(
        &mut self,
        kind: StageKind,
        backend: &str,
        p: &Map<String, Value>,
        stage_path: &str,
        earlier: &HashSet<String>,
    ) {
        let path = join(stage_path, "params");
        // Secrets never reach Postgres: a spec names the variable that holds a key.
        let secrets = ["api_key", "token", "password", "secret"];
        for key in secrets {
            if p.contains_key(key) {
                self.problem(
                    join(&path, key),
                    "secrets are not stored in specs; put it in the worker's environment and name the variable in api_key_env",
                );
            }
        }
        if kind == StageKind::Promote {
            return self.gate(p, &path, earlier);
        }
        let Some(backend) = BackendKind::parse(backend) else {
            let all: Vec<&str> = BackendKind::ALL.iter().map(|b| b.as_str()).collect();
            return self.problem(
                join(stage_path, "backend"),
                format!(
                    "unknown backend {backend:?} (expected one of: {})",
                    all.join(", ")
                ),
            );
        };
        let others: Map<String, Value> = p
            .iter()
            .filter(|(k, _)| !secrets.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for problem in flywheel_proto::stage::check(kind, backend, &others) {
            let at = if problem.param.is_empty() {
                stage_path.to_string()
            } else {
                join(&path, &problem.param)
            };
            self.problem(at, problem.message);
        }
    }

    fn gate(&mut self, p: &Map<String, Value>, path: &str, earlier: &HashSet<String>) {
        let req_path = join(path, "require");
        let Some(require) = p.get("require").and_then(Value::as_object) else {
            self.problem(
                req_path,
                "is required: a mapping of metric to condition, e.g. evaluate.win_rate: \">= 0.5\"",
            );
            return;
        };
        if require.is_empty() {
            self.problem(req_path.clone(), "must name at least one metric");
        }
        for (metric, cond) in require {
            let p = join(&req_path, metric);
            let stage = metric.split('.').next().unwrap_or_default();
            if !metric.contains('.') || !earlier.contains(stage) {
                self.problem(
                    p.clone(),
                    "metric must be <stage>.<metric> naming an earlier stage",
                );
            }
            if cond
                .as_str()
                .and_then(|c| Requirement::parse(metric, c))
                .is_none()
            {
                self.problem(
                    p,
                    "condition must look like \">= 0.5\" (one of >=, >, <=, <, then a number)",
                );
            }
        }
    }

    fn recipe_shape(&mut self, stages: &[StageSpec]) {
        self.round_size(stages);
        let promotes: Vec<_> = stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == StageKind::Promote)
            .collect();
        if promotes.len() > 1 {
            self.problem(
                format!("recipe.stages[{}].kind", promotes[1].0),
                "a recipe has at most one promote stage",
            );
        }
        if let Some((i, _)) = promotes.first() {
            if *i != stages.len() - 1 {
                self.problem(
                    format!("recipe.stages[{i}]"),
                    "the promote stage must be the last stage",
                );
            }
            if !stages[..*i].iter().any(|s| s.kind.trains()) {
                self.problem(
                    format!("recipe.stages[{i}]"),
                    "a promote stage needs an earlier sft or preference stage to promote",
                );
            }
        }
    }
}

impl Validator {
    /// Strings (a YAML `"\0"` escape included) may not hold NUL: Postgres refuses to store it.
    fn no_nul(&mut self, v: &Value, path: &str) {
        match v {
            Value::String(s) if s.contains('\0') => self.problem(
                if path.is_empty() { "$" } else { path },
                "contains a NUL character",
            ),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.no_nul(item, &format!("{path}[{i}]"));
                }
            }
            Value::Object(m) => {
                for (k, item) in m {
                    if k.contains('\0') {
                        self.problem(
                            join(path, &k.replace('\0', "\\0")),
                            "key contains a NUL character",
                        );
                    } else {
                        self.no_nul(item, &join(path, k));
                    }
                }
            }
            _ => {}
        }
    }

    /// A round's tasks and dependency edges, counted as the planner makes them (a stage with
    /// the same shard count as its input is pipelined shard by shard, else every shard depends
    /// on every input shard), must stay within the documented limits.
    fn round_size(&mut self, stages: &[StageSpec]) {
        let shards: HashMap<&str, u64> = stages
            .iter()
            .map(|s| (s.name.as_str(), u64::from(s.shards)))
            .collect();
        let tasks: u64 = shards.values().sum();
        let edges: u64 = stages
            .iter()
            .flat_map(|s| {
                let own = u64::from(s.shards);
                s.needs.iter().map(move |n| (own, n))
            })
            .map(|(own, n)| {
                let up = shards.get(n.as_str()).copied().unwrap_or(1);
                if up == own { own } else { own * up }
            })
            .sum();
        let (max_tasks, max_edges) = (
            crate::limits::MAX_TASKS_PER_ROUND,
            crate::limits::MAX_EDGES_PER_ROUND,
        );
        if tasks > max_tasks {
            self.problem(
                "recipe.stages",
                format!(
                    "a round would have {tasks} tasks; the limit is {max_tasks} (lower shards)"
                ),
            );
        }
        if edges > max_edges {
            self.problem(
                "recipe.stages",
                format!(
                    "a round would have {edges} dependencies between tasks; the limit is {max_edges} (give connected stages the same shard count, or fewer shards)"
                ),
            );
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Merges task metrics into round metrics keyed `<stage>.<metric>`. For a sharded stage that
/// is the mean over its shards, and `<stage>.<metric>_total` is their sum.
pub fn round_metrics<'a>(
    tasks: impl IntoIterator<Item = (&'a str, &'a Map<String, Value>)>,
) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    for (stage, metrics) in tasks {
        for (k, v) in metrics {
            if let Some(x) = v.as_f64() {
                let e = sums.entry(format!("{stage}.{k}")).or_insert((0.0, 0));
                e.0 += x;
                e.1 += 1;
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, (sum, n)) in sums {
        out.insert(k.clone(), sum / n as f64);
        if n > 1 {
            out.insert(format!("{k}_total"), sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = include_str!("../../examples/test-backend.yaml");

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
        let gate =
            Requirement::from_params(&Value::Object(spec.stages.last().unwrap().params.clone()));
        assert_eq!(gate[0].metric, "evaluate.win_rate");
        assert_eq!(gate[0].op, CompareOp::Ge);
    }

    #[test]
    fn every_example_spec_validates() {
        for (name, yaml) in [
            (
                "test-backend",
                include_str!("../../examples/test-backend.yaml"),
            ),
            ("demo", include_str!("../../examples/demo.yaml")),
            (
                "vllm-deployment",
                include_str!("../../examples/vllm-deployment.yaml"),
            ),
            ("mixed", include_str!("../../examples/mixed.yaml")),
        ] {
            if let Err(e) = CampaignSpec::from_yaml(yaml) {
                panic!("examples/{name}.yaml: {e}");
            }
        }
    }

    #[test]
    fn secrets_and_unknown_filter_methods_are_refused() {
        let yaml = include_str!("../../examples/test-backend.yaml")
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
            ("demo", include_str!("../../examples/demo.yaml")),
            (
                "vllm-deployment",
                include_str!("../../examples/vllm-deployment.yaml"),
            ),
            ("mixed", include_str!("../../examples/mixed.yaml")),
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
        let got = problems(
            "apiVersion: flywheel/v0\nname: x\nrounds: two\nrecipe: {stages: []}\nextra: 1\n",
        );
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
                .any(|p| p
                    .starts_with("recipe.stages[7].params.require.evaluate.win_rate: condition")),
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
}
