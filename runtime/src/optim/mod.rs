//! Training-side optimization: the paper's AdamW with ViTDet parameter groups and its learning
//! rate schedule.
//!
//! * [`AdamW`] updates the f32 parameters of a [`crate::ParamStore`] from named gradients with
//!   exactly `torch.optim.AdamW`'s arithmetic (decoupled decay, bias-corrected moments), one op at
//!   a time in PyTorch's order so CPU and CUDA runs agree and a resumed run repeats bit for bit.
//! * [`ParamGroups`] gives each trainable parameter its learning-rate multiplier (detectron2
//!   ViTDet's layer-wise decay, `get_vit_lr_decay_rate`) and weight decay (none on norms,
//!   biases, position tables and layer-scale gammas); [`GroupsReport`] summarizes them.
//! * [`WarmupCosine`] is detectron2's `WarmupParamScheduler(CosineParamScheduler(1, 0))` read
//!   through `LRMultiplier`: linear warmup from `warmup_factor` then half-period cosine to 0.
//! * [`non_finite_gradients`] / [`all_finite`] let a trainer skip a step whose gradients
//!   overflowed (mixed precision) instead of poisoning the moments.
//!
//! A training step at iteration `i` is
//! `opt.step_groups(&mut params, &grads, &groups, schedule.multiplier(i)?)`: each parameter's
//! learning rate is `(base_lr * lr_mult) * multiplier`, detectron2's order of operations.
//!
//! Errors are [`OptimError`]s naming the parameter or setting at fault.

mod adamw;
pub mod grad_scaler;
mod groups;
mod schedule;

pub use adamw::{AdamW, AdamWConfig, AdamWState};
pub use groups::{
    is_norm_name, layer_id, lr_decay_multiplier, no_decay_reason, GroupConfig, GroupRow, GroupsReport, NoDecay,
    ParamGroups, ParamHyper, ParamInfo,
};
pub use schedule::WarmupCosine;

use candle_core::Tensor;
use thiserror::Error;

/// What can go wrong when configuring or stepping the optimizer.
#[derive(Debug, Error)]
pub enum OptimError {
    /// A hyperparameter or schedule setting is out of range.
    #[error("invalid optimizer setting: {0}")]
    Config(String),

    /// A gradient names a parameter the store does not hold.
    #[error("gradient for unknown parameter `{name}`")]
    UnknownGradient { name: String },

    /// The same parameter received two gradients in one step.
    #[error("two gradients for parameter `{name}`")]
    DuplicateGradient { name: String },

    /// A gradient's shape differs from its parameter's.
    #[error("gradient for `{name}`: expected shape {expected:?} (the parameter's), found {found:?}")]
    GradientShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A parameter or gradient that is not f32.
    #[error("`{name}`: AdamW updates f32 parameters from f32 gradients, found {found}")]
    Dtype { name: String, found: String },

    /// A gradient for a parameter that has no learning rate / weight decay (not trainable).
    #[error("gradient for `{name}`, which has no optimizer hyperparameters (not a trainable parameter)")]
    NoHyperparameters { name: String },

    /// A parameter name the layer-wise decay rule cannot place.
    #[error("parameter `{name}`: {message}")]
    ParamName { name: String, message: String },

    /// The schedule was asked for an iteration outside `[0, max_iter]`.
    #[error("schedule: iteration {iteration} is past max_iter {max_iter}")]
    IterationOutOfRange { iteration: u64, max_iter: u64 },

    /// A tensor operation on one parameter failed (e.g. gradient on another device).
    #[error("updating `{name}`: {source}")]
    Update {
        name: String,
        #[source]
        source: candle_core::Error,
    },

    /// The fused CUDA update (one launch over every parameter) failed; no parameter changed.
    #[error("fused AdamW step: {0}")]
    Fused(crate::kernels::KernelError),

    /// A tensor operation outside any one parameter failed.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Names of the gradients holding a NaN or an infinity, in the given order.
pub fn non_finite_gradients(grads: &[(String, Tensor)]) -> Result<Vec<String>, OptimError> {
    let mut bad = Vec::new();
    for (name, g) in grads {
        // `g - g` is 0 where g is finite and NaN where it is NaN or +-inf, and a sum is NaN as soon
        // as one term is: one reduction per tensor, on the tensor's own device.
        let s = g
            .sub(g)
            .and_then(|d| d.sum_all())
            .and_then(|s| s.to_dtype(candle_core::DType::F64))
            .and_then(|s| s.to_scalar::<f64>())
            .map_err(|source| OptimError::Update {
                name: name.clone(),
                source,
            })?;
        if !s.is_finite() {
            bad.push(name.clone());
        }
    }
    Ok(bad)
}

/// Whether every gradient is finite (no NaN, no infinity). A trainer calls this before
/// [`AdamW::step`] and skips the step (and, with loss scaling, lowers the scale) when it is false.
pub fn all_finite(grads: &[(String, Tensor)]) -> Result<bool, OptimError> {
    Ok(non_finite_gradients(grads)?.is_empty())
}
