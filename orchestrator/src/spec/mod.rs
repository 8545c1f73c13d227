//! Campaign specs: YAML, versioned by `apiVersion`, validated in full before anything is stored.
//!
//! Validation walks the document as a generic value so that it can report *every* problem with
//! its field path (`recipe.stages[3].params.beta: must be > 0`), not just the first one serde
//! trips on. Only a document that validates is turned into a [`CampaignSpec`].
//!
//! - this module: the spec's types, parsing (`from_yaml`) and the stored form;
//! - `validate`: the walk over the document, every problem with its path;
//! - [`gate`]: promotion requirements and the round metrics they are checked against.
//!
//! Stage kinds, backends and params are the stage contract's (`flywheel_proto::stage`).

mod gate;
mod locate;
mod validate;

pub use gate::{CompareOp, Requirement, round_metrics};
use validate::Validator;

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const API_VERSION: &str = "flywheel/v1";

/// One validation problem: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    /// Line and column (1-based) of the field in the submitted YAML, or of its nearest
    /// enclosing field; `None` when there is no text to point at.
    pub location: Option<(u64, u64)>,
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
        .map(|p| match p.location {
            Some((line, column)) => format!("{p} (line {line}, column {column})"),
            None => p.to_string(),
        })
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
    /// Stop before `rounds` when the flywheel no longer turns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_when: Option<StopWhen>,
}

/// A plateau: `metric` (`<stage>.<metric>`) gained less than `gain_below` from one round to
/// the next in each of the last `rounds` rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopWhen {
    pub metric: String,
    pub gain_below: f64,
    pub rounds: u32,
}

impl StopWhen {
    /// The gains of the last `rounds` rounds when each is below `gain_below` (the campaign
    /// stops), given the metric's value in every round so far, oldest first.
    pub fn plateau(&self, values: &[Option<f64>]) -> Option<Vec<f64>> {
        let n = self.rounds as usize;
        if values.len() < n + 1 {
            return None;
        }
        let tail = &values[values.len() - n - 1..];
        let gains: Option<Vec<f64>> = tail.windows(2).map(|w| Some(w[1]? - w[0]?)).collect();
        gains.filter(|g| g.iter().all(|x| *x < self.gain_below))
    }
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: crate::limits::MAX_YAML_ALIAS_EVENTS,
        },
        strict_booleans: true,
    }
}

/// Parses YAML into a generic value with bounded work: aliases may replay at most
/// [`MAX_YAML_ALIAS_EVENTS`](crate::limits::MAX_YAML_ALIAS_EVENTS) events in all (an alias bomb
/// is refused, not expanded), duplicate keys are an error (not "last one wins"), and only
/// `true`/`false` are booleans (YAML 1.2, as before).
fn parse_yaml(text: &str) -> Result<Value, String> {
    serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| {
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
                location: None,
            }],
        })?;
        let mut v = Validator::default();
        v.no_nul(&doc, "");
        let spec = v.campaign(&doc);
        match spec {
            Some(spec) if v.problems.is_empty() => Ok(spec),
            _ => {
                let lines = locate::locations(text, yaml_options());
                let mut problems = v.problems;
                for p in &mut problems {
                    p.location = locate::find(&lines, &p.path);
                }
                Err(SpecError { problems })
            }
        }
    }

    /// A campaign's spec as stored (JSON). One that no longer reads (written by another version)
    /// is an error naming the campaign, never an empty spec.
    pub fn stored(campaign_id: uuid::Uuid, spec: &Value) -> Result<Self, crate::Error> {
        serde_json::from_value(spec.clone()).map_err(|e| {
            crate::Error::FailedPrecondition(format!(
                "the stored spec of campaign {campaign_id} no longer reads ({e}); it was written by another version of Flywheel"
            ))
        })
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
                    location: None,
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

#[cfg(test)]
mod tests;
