//! Spec validation: a walk over the YAML document as a generic value, collecting every problem
//! with its field path. Params are checked against the stage contract.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::*;

#[derive(Default)]
pub(super) struct Validator {
    pub(super) problems: Vec<Problem>,
}

const TOP_KEYS: &[&str] = &[
    "apiVersion",
    "name",
    "models",
    "rounds",
    "defaults",
    "recipe",
    "stop_when",
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
            location: None,
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

    pub(super) fn campaign(&mut self, doc: &Value) -> Option<CampaignSpec> {
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
        let stop_when = match top.get("stop_when") {
            None | Some(Value::Null) => None,
            Some(v) => Some(self.stop_when(v, stages.as_deref().unwrap_or_default())?),
        };
        Some(CampaignSpec {
            name: name?,
            models: models?,
            rounds: rounds?,
            stages: stages?,
            stop_when,
        })
    }

    fn stop_when(&mut self, v: &Value, stages: &[StageSpec]) -> Option<StopWhen> {
        let m = self.object(Some(v), "stop_when")?;
        self.unknown_keys(m, &["metric", "gain_below", "rounds"], "stop_when");
        let metric = self.string(m, "metric", "stop_when");
        if let Some(metric) = &metric {
            match metric.split_once('.') {
                Some((stage, name)) if !name.is_empty() => {
                    if stage != crate::analytics::ROUND
                        && !stages.is_empty()
                        && !stages.iter().any(|s| s.name == stage)
                    {
                        self.problem(
                            "stop_when.metric",
                            format!("{metric:?}: the recipe has no stage {stage:?}"),
                        );
                    }
                }
                _ => self.problem(
                    "stop_when.metric",
                    format!("{metric:?} must be <stage>.<metric>, e.g. evaluate.accuracy"),
                ),
            }
        }
        let gain_below = match m.get("gain_below").map(Value::as_f64) {
            Some(Some(g)) => Some(g),
            Some(None) => {
                self.problem("stop_when.gain_below", "must be a number");
                None
            }
            None => {
                self.problem("stop_when.gain_below", "is required");
                None
            }
        };
        let rounds = match m.get("rounds") {
            None => Some(1),
            Some(_) => self.opt_int(m, "rounds", "stop_when", 1, 1000),
        };
        Some(StopWhen {
            metric: metric?,
            gain_below: gain_below?,
            rounds: rounds?,
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
            self.endpoints(&mut stages);
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
            if n == crate::analytics::ROUND {
                self.problem(
                    join(path, "name"),
                    "\"round\" is reserved for the round's own metrics (round.worker_seconds, ...)",
                );
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

    pub(super) fn gate(&mut self, p: &Map<String, Value>, path: &str, earlier: &HashSet<String>) {
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

    /// Params that name an endpoint must name a serve stage defined earlier; the consumer then
    /// depends on it (released when the endpoint is ready). A serve stage needs a consumer, and
    /// one serving the candidate needs the training stage that makes it.
    fn endpoints(&mut self, stages: &mut [StageSpec]) {
        let serves: HashSet<String> = stages
            .iter()
            .filter(|s| s.kind == StageKind::Serve)
            .map(|s| s.name.clone())
            .collect();
        let mut consumed = HashSet::new();
        for i in 0..stages.len() {
            let mut named = Vec::new();
            for param in flywheel_proto::stage::ENDPOINT_PARAMS {
                let Some(v) = stages[i].params.get(*param).and_then(Value::as_str) else {
                    continue;
                };
                let at = format!("recipe.stages[{i}].params.{param}");
                let earlier = stages[..i].iter().any(|s| s.name == v);
                if !serves.contains(v) || !earlier {
                    let all: Vec<&str> = serves.iter().map(String::as_str).collect();
                    self.problem(
                        at,
                        format!(
                            "{v:?} is not a serve stage defined earlier in the recipe (serve stages: {})",
                            if all.is_empty() { "none".to_string() } else { all.join(", ") }
                        ),
                    );
                    continue;
                }
                named.push(v.to_string());
            }
            for n in named {
                consumed.insert(n.clone());
                if !stages[i].needs.contains(&n) {
                    stages[i].needs.push(n);
                }
            }
        }
        for (i, s) in stages.iter().enumerate() {
            if s.kind != StageKind::Serve {
                continue;
            }
            if !consumed.contains(&s.name) {
                self.problem(
                    format!("recipe.stages[{i}]"),
                    format!("no stage names the endpoint {:?} (endpoint, candidate_endpoint, generator_endpoint or judge_endpoint)", s.name),
                );
            }
            let candidate = s.params.get("model").and_then(Value::as_str) == Some("candidate");
            if candidate && !needs_a_training_stage(s, stages) {
                self.problem(
                    format!("recipe.stages[{i}].needs"),
                    "serving the candidate needs the sft or preference stage that trains it",
                );
            }
        }
    }

    fn recipe_shape(&mut self, stages: &[StageSpec]) {
        self.round_size(stages);
        // On-policy samples come from the model of a training stage the generate stage needs.
        for (i, s) in stages.iter().enumerate() {
            let on_policy = s.params.get("policy").and_then(Value::as_str) == Some("model");
            if s.kind == StageKind::Generate && on_policy && !needs_a_training_stage(s, stages) {
                self.problem(
                    format!("recipe.stages[{i}].needs"),
                    "policy: model samples the model of an sft or preference stage it needs; name one (e.g. needs: [sft, prompts])",
                );
            }
        }
        // The builtin evaluation judges the model a training stage it needs produced.
        for (i, s) in stages.iter().enumerate() {
            if s.kind == StageKind::Evaluate
                && s.placement.backend == "builtin"
                && !needs_a_training_stage(s, stages)
            {
                self.problem(
                    format!("recipe.stages[{i}].needs"),
                    "evaluate on builtin judges the model of an sft or preference stage it needs; name one (e.g. needs: [rpo])",
                );
            }
        }
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

/// Whether one of the stages `s` needs is an sft or preference stage (whose model it gets).
fn needs_a_training_stage(s: &StageSpec, stages: &[StageSpec]) -> bool {
    s.needs
        .iter()
        .any(|n| stages.iter().any(|t| &t.name == n && t.kind.trains()))
}

impl Validator {
    /// Strings (a YAML `"\0"` escape included) may not hold NUL: Postgres refuses to store it.
    pub(super) fn no_nul(&mut self, v: &Value, path: &str) {
        for (at, in_key) in crate::limits::nul_paths(v, path) {
            let what = if in_key {
                "key contains a NUL character"
            } else {
                "contains a NUL character"
            };
            self.problem(at, what);
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
