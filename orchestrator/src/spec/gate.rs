//! Promotion gates: requirements on a round's metrics, and the metrics they are checked against.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

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
    /// The round metric the requirement reads: `<stage>.<metric>`, or for an interval bound
    /// (`evaluate.win_rate.lower`, `.upper`) the bound of the metric's bootstrap 95% interval
    /// (`evaluate.win_rate_ci_low`, `_ci_high`).
    pub fn metric_key(&self) -> String {
        match (
            self.metric.strip_suffix(".lower"),
            self.metric.strip_suffix(".upper"),
        ) {
            (Some(m), _) => format!("{m}_ci_low"),
            (_, Some(m)) => format!("{m}_ci_high"),
            _ => self.metric.clone(),
        }
    }

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
