//! Fine-tuning a checkpoint directory end to end: load it trainable, run SFT or a preference
//! objective, and hand back the trained weights. Shared by the `builtin` backend and the
//! `flywheel train` command (which lets this engine run as an external trainer).

use std::path::Path;

use candle_core::Device;
use candle_nn::VarMap;

use crate::EngineError;
use crate::checkpoint;
use crate::model::ModelConfig;
use crate::train::{self, Pair, PreferenceObjective, Progress, TrainConfig};

/// What to train on.
pub enum Objective<'a> {
    Sft(&'a [(String, String)]),
    /// Against the frozen model in `reference`.
    Preference {
        reference: &'a Path,
        pairs: &'a [Pair],
        objective: PreferenceObjective,
    },
}

/// The trained model: its config, weights, and the mean loss of the last 10% of steps.
pub struct Trained {
    pub config: ModelConfig,
    pub varmap: VarMap,
    pub loss: f64,
}

impl Trained {
    pub fn save(&self, dir: &Path) -> Result<(), EngineError> {
        checkpoint::save(dir, &self.config, &self.varmap)
    }
}

/// Fine-tunes the checkpoint in `init`.
pub fn fine_tune(
    init: &Path,
    objective: Objective<'_>,
    cfg: &TrainConfig,
    device: &Device,
    progress: Progress<'_>,
) -> Result<Trained, EngineError> {
    let config = checkpoint::read_config(init)?;
    let varmap = VarMap::new();
    let model = checkpoint::load_trainable(init, config.clone(), &varmap, device)?;
    let loss = match objective {
        Objective::Sft(data) => train::sft(&model, &varmap, data, cfg, progress)?,
        Objective::Preference {
            reference,
            pairs,
            objective,
        } => {
            let reference = checkpoint::load_frozen(reference, device)?;
            train::preference(&model, &varmap, &reference, pairs, objective, cfg, progress)?
        }
    };
    Ok(Trained {
        config,
        varmap,
        loss,
    })
}
