//! Training checkpoints: one safetensors file with the model, the optimizer state and where the
//! run stands.
//!
//! Layout:
//! * every parameter and buffer of the [`ParamStore`] under its own key, so a checkpoint is also
//!   a weights file: [`ParamStore::load_safetensors`] (`vitdet infer --weights`) loads it and
//!   reports the `optimizer.*` keys as skipped, since no model has an `optimizer` module;
//! * per parameter with AdamW state, `optimizer.exp_avg.<name>` and `optimizer.exp_avg_sq.<name>`
//!   (f32, the parameter's shape) and `optimizer.step.<name>` (an i64 scalar);
//! * `__metadata__`: `format` (`vitdet-checkpoint`), `format_version`, `iteration` (iterations
//!   completed: a resumed run continues at this iteration), `seed`, `model_config` (JSON),
//!   `optimizer` (JSON: `{"type": "adamw", "beta1", "beta2", "eps"}`), for a float16 run with
//!   loss scaling `grad_scaler` (JSON: torch's `GradScaler.state_dict()` keys, see
//!   [`GradScalerState`]; absent otherwise) and `checksum`, 16 hex digits of a 64-bit hash of
//!   every tensor, so a file damaged after its header is refused instead of resuming from
//!   corrupt weights.
//!
//! The checksum: state `h = 0x243f6a8885a308d3`; absorbing a word `w` (u64) sets
//! `x = (h ^ w) * 0x9e3779b97f4a7c15` (wrapping) and `h = x ^ (x >> 29)`; absorbing bytes absorbs
//! their length, then each 8-byte little-endian chunk (the last one zero-padded). For each tensor
//! in name (byte) order: its name's bytes, its safetensors dtype name's bytes (`F32`, `I64`, ...),
//! each dimension as a word, the word `u64::MAX`, then its data bytes.
//!
//! [`save`] writes with [`crate::write_atomic`] (temporary file in the same directory, fsync,
//! rename): a crash or a failed write leaves the previous checkpoint as it was. [`load`] restores
//! the store and the optimizer exactly (same bits), so training resumed from a checkpoint repeats
//! the uninterrupted run.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::dtype::to_candle;
use crate::optim::grad_scaler::GradScalerState;
use crate::optim::{AdamW, AdamWConfig, AdamWState};
use crate::params::{st_to_ir, RawView};
use crate::{ParamStore, RuntimeError};

/// Value of the `format` metadata entry.
pub const FORMAT: &str = "vitdet-checkpoint";
/// Version of this layout; [`load`] refuses newer ones.
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of the optimizer-state keys (no model parameter may start with it).
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

const EXP_AVG: &str = "optimizer.exp_avg.";
const EXP_AVG_SQ: &str = "optimizer.exp_avg_sq.";
const STEP: &str = "optimizer.step.";

/// What can go wrong saving or loading a checkpoint; the message names the file.
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint `{path}`: {message}")]
    Read { path: PathBuf, message: String },
    #[error("cannot write checkpoint `{path}`: {message}")]
    Write { path: PathBuf, message: String },
}

/// Where the run stands.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// Iterations completed; a resumed run's next iteration.
    pub iteration: u64,
    /// The run's seed (data order, initialization, drop path).
    pub seed: u64,
    /// The model configuration the parameters belong to.
    pub model_config: serde_json::Value,
    /// The loss scaler's state, for a run that scales its loss (float16).
    pub grad_scaler: Option<GradScalerState>,
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub params: ParamStore,
    pub optimizer: AdamW,
    pub meta: CheckpointMeta,
}

impl Checkpoint {
    /// Checks that the parameters fit `graph` (every parameter present, shapes and dtypes).
    pub fn check(&self, graph: &vitdet_ir::Graph) -> Result<(), RuntimeError> {
        self.params.check(graph)
    }
}

#[derive(Serialize, Deserialize)]
struct OptimizerMeta {
    #[serde(rename = "type")]
    kind: String,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

/// Writes `params`, `optimizer`'s state and `meta` to `path` atomically (see the module doc).
/// Errors, before anything is written, for a parameter under the reserved `optimizer.` prefix
/// or optimizer state that does not match a parameter of the store.
pub fn save(
    path: impl AsRef<Path>,
    params: &ParamStore,
    optimizer: &AdamW,
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    let err = |message: String| CheckpointError::Write {
        path: path.to_path_buf(),
        message,
    };
    let mut views: BTreeMap<String, RawView> = BTreeMap::new();
    let mut add = |name: String, t: &Tensor| -> Result<(), CheckpointError> {
        let view = RawView::from_tensor(t).map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        views.insert(name, view);
        Ok(())
    };
    for (name, t) in params.iter() {
        if name.starts_with(OPTIMIZER_PREFIX) {
            return Err(err(format!(
                "parameter `{name}` uses the prefix `{OPTIMIZER_PREFIX}` reserved for optimizer state"
            )));
        }
        add(name.to_string(), t)?;
    }
    for (name, s) in optimizer.states() {
        let p = params.get(name).ok_or_else(|| {
            err(format!(
                "optimizer state for `{name}`, which is not in the parameter store"
            ))
        })?;
        if s.exp_avg.dims() != p.dims() {
            return Err(err(format!(
                "optimizer state for `{name}` has shape {:?} but the parameter has {:?}",
                s.exp_avg.dims(),
                p.dims()
            )));
        }
        add(format!("{EXP_AVG}{name}"), &s.exp_avg)?;
        add(format!("{EXP_AVG_SQ}{name}"), &s.exp_avg_sq)?;
        let step = i64::try_from(s.step).map_err(|_| err(format!("step count of `{name}` overflows i64")))?;
        add(
            format!("{STEP}{name}"),
            &Tensor::new(step, &Device::Cpu).map_err(|e| err(e.to_string()))?,
        )?;
    }

    let config = optimizer.config();
    let optimizer_meta = OptimizerMeta {
        kind: "adamw".into(),
        beta1: config.beta1,
        beta2: config.beta2,
        eps: config.eps,
    };
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    metadata.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    metadata.insert("iteration".to_string(), meta.iteration.to_string());
    metadata.insert("seed".to_string(), meta.seed.to_string());
    metadata.insert("model_config".to_string(), meta.model_config.to_string());
    metadata.insert(
        "optimizer".to_string(),
        serde_json::to_string(&optimizer_meta).map_err(|e| err(e.to_string()))?,
    );
    if let Some(state) = &meta.grad_scaler {
        metadata.insert(
            "grad_scaler".to_string(),
            serde_json::to_string(state).map_err(|e| err(e.to_string()))?,
        );
    }
    let checksum = checksum(views.iter().map(|(k, v)| (k.as_str(), v.dtype(), v.shape(), v.data())));
    metadata.insert("checksum".to_string(), format!("{checksum:016x}"));

    let bytes = safetensors::tensor::serialize(views, &Some(metadata)).map_err(|e| err(e.to_string()))?;
    crate::fsio::write_atomic(path, &bytes).map_err(|e| err(e.to_string()))
}

/// Reads a checkpoint written by [`save`], placing every tensor on `device`. Errors name the
/// file and the problem: unreadable, truncated or otherwise not safetensors, not a checkpoint
/// (no or wrong metadata), a newer format, a checksum mismatch (damaged data), or incomplete
/// or inconsistent optimizer state.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Checkpoint, CheckpointError> {
    let path = path.as_ref();
    let err = |message: String| CheckpointError::Read {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file (truncated or corrupt?): {e:?}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| err(format!("{e:?}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let entry = |key: &str| -> Result<&String, CheckpointError> {
        metadata.get(key).ok_or_else(|| {
            err(format!(
                "metadata entry `{key}` missing (a plain weights file is not a training checkpoint)"
            ))
        })
    };
    if entry("format")? != FORMAT {
        return Err(err(format!(
            "metadata `format` is `{}`, expected `{FORMAT}`",
            metadata["format"]
        )));
    }
    let number = |key: &str| -> Result<u64, CheckpointError> {
        let text = entry(key)?;
        text.parse()
            .map_err(|_| err(format!("metadata `{key}` is `{text}`, not a whole number")))
    };
    let version = number("format_version")?;
    if version != FORMAT_VERSION as u64 {
        return Err(err(format!(
            "format version {version}, but this build reads version {FORMAT_VERSION}"
        )));
    }
    let iteration = number("iteration")?;
    let seed = number("seed")?;
    let model_config: serde_json::Value = serde_json::from_str(entry("model_config")?)
        .map_err(|e| err(format!("metadata `model_config` is not JSON: {e}")))?;
    let optimizer_meta: OptimizerMeta = serde_json::from_str(entry("optimizer")?)
        .map_err(|e| err(format!("metadata `optimizer` is not valid: {e}")))?;
    let grad_scaler: Option<GradScalerState> = metadata
        .get("grad_scaler")
        .map(|text| serde_json::from_str(text))
        .transpose()
        .map_err(|e| err(format!("metadata `grad_scaler` is not valid: {e}")))?;
    if optimizer_meta.kind != "adamw" {
        return Err(err(format!(
            "optimizer type `{}` is not supported (only `adamw`)",
            optimizer_meta.kind
        )));
    }
    let expected = u64::from_str_radix(entry("checksum")?, 16).map_err(|_| {
        err(format!(
            "metadata `checksum` is `{}`, not hexadecimal",
            metadata["checksum"]
        ))
    })?;
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let found = checksum(
        tensors
            .iter()
            .map(|(k, v)| (k.as_str(), v.dtype(), v.shape(), std::borrow::Cow::Borrowed(v.data()))),
    );
    if found != expected {
        return Err(err(format!(
            "checksum mismatch (stored {expected:016x}, data gives {found:016x}): the file is damaged"
        )));
    }

    let mut params = BTreeMap::new();
    let mut exp_avg = BTreeMap::new();
    let mut exp_avg_sq = BTreeMap::new();
    let mut steps = BTreeMap::new();
    for (name, view) in &tensors {
        let dtype = st_to_ir(view.dtype())
            .ok_or_else(|| err(format!("tensor `{name}` has unsupported dtype {:?}", view.dtype())))?;
        let t = Tensor::from_raw_buffer(view.data(), to_candle(dtype), view.shape(), device)
            .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        if let Some(p) = name.strip_prefix(EXP_AVG) {
            exp_avg.insert(p.to_string(), t);
        } else if let Some(p) = name.strip_prefix(EXP_AVG_SQ) {
            exp_avg_sq.insert(p.to_string(), t);
        } else if let Some(p) = name.strip_prefix(STEP) {
            if view.dtype() != StDtype::I64 || !view.shape().is_empty() {
                return Err(err(format!("`{name}` must be an i64 scalar")));
            }
            let step = t
                .to_device(&Device::Cpu)
                .and_then(|t| t.to_scalar::<i64>())
                .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
            let step = u64::try_from(step).map_err(|_| err(format!("`{name}` is negative ({step})")))?;
            steps.insert(p.to_string(), step);
        } else if name.starts_with(OPTIMIZER_PREFIX) {
            return Err(err(format!("unknown optimizer key `{name}`")));
        } else {
            params.insert(name.clone(), t);
        }
    }

    let mut states = BTreeMap::new();
    for (name, m) in exp_avg {
        let missing = |key: &str| {
            err(format!(
                "optimizer state of `{name}` is incomplete: `{key}{name}` missing"
            ))
        };
        let v = exp_avg_sq.remove(&name).ok_or_else(|| missing(EXP_AVG_SQ))?;
        let step = steps.remove(&name).ok_or_else(|| missing(STEP))?;
        let p: &Tensor = params.get(&name).ok_or_else(|| {
            err(format!(
                "optimizer state for `{name}`, which is not a parameter in the file"
            ))
        })?;
        if m.dims() != p.dims() {
            return Err(err(format!(
                "optimizer state of `{name}` has shape {:?} but the parameter has {:?}",
                m.dims(),
                p.dims()
            )));
        }
        states.insert(
            name,
            AdamWState {
                step,
                exp_avg: m,
                exp_avg_sq: v,
            },
        );
    }
    if let Some(name) = exp_avg_sq.keys().chain(steps.keys()).next() {
        return Err(err(format!(
            "optimizer state of `{name}` is incomplete: `{EXP_AVG}{name}` missing"
        )));
    }
    let config = AdamWConfig {
        beta1: optimizer_meta.beta1,
        beta2: optimizer_meta.beta2,
        eps: optimizer_meta.eps,
    };
    let optimizer = AdamW::from_states(config, states).map_err(|e| err(e.to_string()))?;
    Ok(Checkpoint {
        params: ParamStore::from_tensors(params),
        optimizer,
        meta: CheckpointMeta {
            iteration,
            seed,
            model_config,
            grad_scaler,
        },
    })
}

/// A 64-bit hash of (name, dtype, shape, bytes) over tensors in name order: word-at-a-time
/// multiply-xorshift, fast enough to hash a ViT-L checkpoint in about a second. It guards against
/// accidental damage, not tampering.
fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, StDtype, &'a [usize], std::borrow::Cow<'a, [u8]>)>) -> u64 {
    let mut h = Hasher(0x243f_6a88_85a3_08d3);
    for (name, dtype, shape, data) in tensors {
        h.bytes(name.as_bytes());
        h.bytes(format!("{dtype:?}").as_bytes());
        for &d in shape {
            h.word(d as u64);
        }
        h.word(u64::MAX); // ends the shape, so [2, 3] + data never equals [2] + other data
        h.bytes(&data);
    }
    h.0
}

struct Hasher(u64);

impl Hasher {
    fn word(&mut self, w: u64) {
        let x = (self.0 ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("8-byte chunk")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(last));
        }
    }
}
