//! Checkpoints: a directory with `config.json` and `model.safetensors`, identified by the
//! content hash of both files (see `flywheel_worker::artifacts::hash_dir`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::EngineError;
use crate::model::{ModelConfig, Transformer};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Saves a trained model's variables and config into `dir` (created if needed).
pub fn save(dir: &Path, config: &ModelConfig, varmap: &VarMap) -> Result<(), EngineError> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::Io(dir.display().to_string(), e))?;
    let cfg = serde_json::to_vec_pretty(config).expect("config serializes");
    std::fs::write(dir.join(CONFIG_FILE), cfg)
        .map_err(|e| EngineError::Io(dir.display().to_string(), e))?;
    varmap.save(dir.join(WEIGHTS_FILE))?;
    Ok(())
}

pub fn read_config(dir: &Path) -> Result<ModelConfig, EngineError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| EngineError::Io(path.display().to_string(), e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| EngineError::Checkpoint(format!("{}: bad config: {e}", path.display())))
}

fn tensors(
    dir: &Path,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>, EngineError> {
    let path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::load(&path, device)
        .map_err(|e| EngineError::Checkpoint(format!("{}: {e}", path.display())))
}

/// Loads a frozen model (plain tensors, no gradient tracking): for sampling, scoring, and as a
/// DPO/RPO reference.
pub fn load_frozen(dir: &Path, device: &Device) -> Result<Transformer, EngineError> {
    let config = read_config(dir)?;
    let map = tensors(dir, device)?;
    check_shapes(dir, &config, &map, false)?;
    Transformer::new(config, VarBuilder::from_tensors(map, DType::F32, device))
}

/// Loads a checkpoint into a trainable model with `config`. The checkpoint must match `config`'s
/// shapes; only a reward head that `config` adds may be absent from it (it starts fresh).
pub fn load_trainable(
    dir: &Path,
    config: ModelConfig,
    varmap: &VarMap,
    device: &Device,
) -> Result<Transformer, EngineError> {
    let model = Transformer::fresh(config.clone(), varmap, device, 0)?;
    let map = tensors(dir, device)?;
    check_shapes(dir, &config, &map, true)?;
    for (name, var) in varmap.data().lock().expect("varmap").iter() {
        if let Some(t) = map.get(name) {
            var.set(t)?;
        }
    }
    Ok(model)
}

/// Fails with a clear error when the checkpoint's tensors do not fit the model's config.
fn check_shapes(
    dir: &Path,
    config: &ModelConfig,
    map: &std::collections::HashMap<String, Tensor>,
    new_head_allowed: bool,
) -> Result<(), EngineError> {
    let probe = VarMap::new();
    Transformer::new(
        config.clone(),
        VarBuilder::from_varmap(&probe, DType::F32, &Device::Cpu),
    )?;
    for (name, var) in probe.data().lock().expect("varmap").iter() {
        match map.get(name) {
            Some(t) if t.dims() == var.dims() => {}
            Some(t) => {
                return Err(EngineError::Checkpoint(format!(
                    "{}: tensor {name} has shape {:?} but the model expects {:?}",
                    dir.display(),
                    t.dims(),
                    var.dims()
                )));
            }
            None if new_head_allowed && name == "reward_head" => {}
            None => {
                return Err(EngineError::Checkpoint(format!(
                    "{}: tensor {name} is missing",
                    dir.display()
                )));
            }
        }
    }
    Ok(())
}
