//! AdamW with `torch.optim.AdamW`'s arithmetic.
//!
//! Per parameter with a gradient `g`, at its own step count `t` (incremented first), PyTorch's
//! single-tensor path does, in f32 element-wise ops with the f64 scalars rounded to f32:
//!
//! ```text
//! p  *= 1 - lr*wd                        (skipped when wd == 0)
//! m   = lerp(m, g, 1 - beta1)            (m + w*(g - m) for w < 0.5, else g - (g - m)*(1 - w))
//! v   = v*beta2 + ((1 - beta2)*g)*g
//! d   = sqrt(v) / sqrt(1 - beta2^t) + eps
//! p  += (-(lr / (1 - beta1^t)) * m) / d
//! ```
//!
//! Each line is done with the same candle ops on every device, so CPU and CUDA agree and a run
//! resumed from a checkpoint repeats an uninterrupted one bit for bit. (PyTorch's vectorized CPU
//! `lerp` fuses a multiply-add, so its `m` can differ from this one by an ulp.) The scalar parts
//! (`beta^t`, the bias corrections, `lr / bc1`) are computed in f64 with `powf`, as Python does.
//!
//! Parameters without a gradient in a step are left alone, their state too (PyTorch skips
//! parameters whose `.grad` is None).
//!
//! With the `cuda` feature, a step whose gradients live on a CUDA device runs as one fused
//! launch over every parameter (`crate::cuda::adamw`) with the same f32 operations in the same
//! order, so its results are bit-identical to the op-by-op update.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{OptimError, ParamGroups};
use crate::dtype::describe;
use crate::ParamStore;

/// AdamW's fixed hyperparameters (the learning rate and weight decay are per step and per
/// parameter, see [`AdamW::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    /// The paper's `(0.9, 0.999)` with PyTorch's `eps = 1e-8`.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges PyTorch checks: betas in `[0, 1)`, `eps >= 0`, all finite.
    pub fn validate(&self) -> Result<(), OptimError> {
        for (what, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(OptimError::Config(format!("AdamW {what} must be in [0, 1), found {b}")));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(OptimError::Config(format!(
                "AdamW eps must be finite and >= 0, found {}",
                self.eps
            )));
        }
        Ok(())
    }
}

/// One parameter's optimizer state: PyTorch's `step`, `exp_avg` and `exp_avg_sq`.
#[derive(Debug, Clone)]
pub struct AdamWState {
    /// Updates applied so far to this parameter.
    pub step: u64,
    /// First moment, same shape as the parameter (f32).
    pub exp_avg: Tensor,
    /// Second moment, same shape as the parameter (f32).
    pub exp_avg_sq: Tensor,
}

/// AdamW over named f32 parameters.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    state: BTreeMap<String, AdamWState>,
}

impl AdamW {
    /// A fresh optimizer (no state: each parameter's moments start at zero on its first step).
    pub fn new(config: AdamWConfig) -> Result<Self, OptimError> {
        config.validate()?;
        Ok(AdamW {
            config,
            state: BTreeMap::new(),
        })
    }

    /// An optimizer resuming from saved state (see [`crate::checkpoint`]). Each state's moments
    /// must be f32 and of one shape, and its step at least 1.
    pub fn from_states(config: AdamWConfig, states: BTreeMap<String, AdamWState>) -> Result<Self, OptimError> {
        config.validate()?;
        for (name, s) in &states {
            for t in [&s.exp_avg, &s.exp_avg_sq] {
                if t.dtype() != DType::F32 {
                    return Err(OptimError::Dtype {
                        name: name.clone(),
                        found: format!("optimizer state {}", describe(t)),
                    });
                }
            }
            if s.exp_avg.dims() != s.exp_avg_sq.dims() {
                return Err(OptimError::Config(format!(
                    "state of `{name}`: exp_avg has shape {:?} but exp_avg_sq {:?}",
                    s.exp_avg.dims(),
                    s.exp_avg_sq.dims()
                )));
            }
            if s.step == 0 {
                return Err(OptimError::Config(format!(
                    "state of `{name}`: step 0 (state exists only after a first update)"
                )));
            }
        }
        Ok(AdamW { config, state: states })
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// The state of one parameter, if it has been updated at least once.
    pub fn state(&self, name: &str) -> Option<&AdamWState> {
        self.state.get(name)
    }

    /// Every parameter's state, in name order.
    pub fn states(&self) -> impl Iterator<Item = (&str, &AdamWState)> {
        self.state.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// One update of the parameters that have a gradient. `hyper(name)` gives that parameter's
    /// `(lr, weight_decay)` for this step; `None` marks a parameter that must not be trained.
    ///
    /// Everything is checked before any parameter changes: each gradient must name a parameter
    /// of `params` (once), match its shape, be f32 like the parameter, and have hyperparameters
    /// (finite, `lr >= 0`, `weight_decay >= 0`); an existing state must match the parameter's
    /// shape. A tensor failure midway (e.g. out of device memory) leaves the parameters updated
    /// before it changed.
    pub fn step(
        &mut self,
        params: &mut ParamStore,
        grads: &[(String, Tensor)],
        hyper: impl Fn(&str) -> Option<(f64, f64)>,
    ) -> Result<(), OptimError> {
        let mut seen = BTreeSet::new();
        let mut plan = Vec::with_capacity(grads.len());
        for (name, g) in grads {
            if !seen.insert(name.as_str()) {
                return Err(OptimError::DuplicateGradient { name: name.clone() });
            }
            let p = params
                .get(name)
                .ok_or_else(|| OptimError::UnknownGradient { name: name.clone() })?;
            if g.dims() != p.dims() {
                return Err(OptimError::GradientShape {
                    name: name.clone(),
                    expected: p.dims().to_vec(),
                    found: g.dims().to_vec(),
                });
            }
            for (what, t) in [("parameter", p), ("gradient", g)] {
                if t.dtype() != DType::F32 {
                    return Err(OptimError::Dtype {
                        name: name.clone(),
                        found: format!("{what} {}", describe(t)),
                    });
                }
            }
            if let Some(s) = self.state.get(name) {
                if s.exp_avg.dims() != p.dims() {
                    return Err(OptimError::Config(format!(
                        "state of `{name}` has shape {:?} but the parameter has {:?}",
                        s.exp_avg.dims(),
                        p.dims()
                    )));
                }
            }
            let (lr, wd) = hyper(name).ok_or_else(|| OptimError::NoHyperparameters { name: name.clone() })?;
            if !(lr.is_finite() && lr >= 0.0 && wd.is_finite() && wd >= 0.0) {
                return Err(OptimError::Config(format!(
                    "`{name}`: learning rate {lr} and weight decay {wd} must be finite and >= 0"
                )));
            }
            plan.push((name, g, lr, wd));
        }

        #[cfg(feature = "cuda")]
        if plan.first().is_some_and(|(_, g, ..)| g.device().is_cuda()) {
            return self.step_fused(params, &plan);
        }
        for (name, g, lr, wd) in plan {
            let p = params.get(name).expect("checked above");
            let (step, m, v) = match self.state.get(name.as_str()) {
                Some(s) => (s.step, s.exp_avg.clone(), s.exp_avg_sq.clone()),
                None => {
                    let zeros = p.zeros_like().map_err(|source| OptimError::Update {
                        name: name.clone(),
                        source,
                    })?;
                    (0, zeros.clone(), zeros)
                }
            };
            let (new_p, new_state) =
                self.update(step + 1, p, g, m, v, lr, wd)
                    .map_err(|source| OptimError::Update {
                        name: name.clone(),
                        source,
                    })?;
            params.insert(name.clone(), new_p);
            self.state.insert(name.clone(), new_state);
        }
        Ok(())
    }

    /// The checked `plan` of [`AdamW::step`] as one fused CUDA launch over every parameter
    /// (`crate::cuda::adamw`), bit-identical to the op-by-op update. All or nothing: the new
    /// values and moments are written to fresh buffers and stored only once the launch is queued.
    #[cfg(feature = "cuda")]
    fn step_fused(&mut self, params: &mut ParamStore, plan: &[(&String, &Tensor, f64, f64)]) -> Result<(), OptimError> {
        use crate::cuda::adamw::{run::step, FusedUpdate};
        let updates: Vec<FusedUpdate> = plan
            .iter()
            .map(|&(name, g, lr, wd)| {
                let state = self.state.get(name.as_str());
                FusedUpdate {
                    param: params.get(name).expect("checked above"),
                    grad: g,
                    moments: state.map(|s| (&s.exp_avg, &s.exp_avg_sq)),
                    t: state.map_or(0, |s| s.step) + 1,
                    lr,
                    weight_decay: wd,
                }
            })
            .collect();
        let steps: Vec<u64> = updates.iter().map(|u| u.t).collect();
        let updated = step(&self.config, &updates).map_err(OptimError::Fused)?;
        for ((&(name, ..), (p, exp_avg, exp_avg_sq)), t) in plan.iter().zip(updated).zip(steps) {
            params.insert(name.clone(), p);
            self.state.insert(
                name.clone(),
                AdamWState {
                    step: t,
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
        Ok(())
    }

    /// [`AdamW::step`] with the learning rates and weight decays of `groups`, the learning rates
    /// scaled by the schedule's `multiplier` (`(base_lr * lr_mult) * multiplier`, detectron2's
    /// `LRMultiplier`). A gradient for a parameter outside the groups is an error.
    pub fn step_groups(
        &mut self,
        params: &mut ParamStore,
        grads: &[(String, Tensor)],
        groups: &ParamGroups,
        multiplier: f64,
    ) -> Result<(), OptimError> {
        if !(multiplier.is_finite() && multiplier >= 0.0) {
            return Err(OptimError::Config(format!(
                "learning rate multiplier must be finite and >= 0, found {multiplier}"
            )));
        }
        self.step(params, grads, |name| {
            groups.get(name).map(|h| (h.lr * multiplier, h.weight_decay))
        })
    }

    /// One parameter's update at step `t` (already incremented); see the module doc.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        t: u64,
        p: &Tensor,
        g: &Tensor,
        m: Tensor,
        v: Tensor,
        lr: f64,
        wd: f64,
    ) -> candle_core::Result<(Tensor, AdamWState)> {
        let AdamWConfig { beta1, beta2, eps } = self.config;
        // `affine(a, 0)` is one f32 multiply by `a as f32` (the cast PyTorch's kernels apply to
        // Python scalars); `affine(1, b)` one f32 add.
        let p = if wd != 0.0 {
            p.affine(1.0 - lr * wd, 0.0)?
        } else {
            p.clone()
        };
        let w = (1.0 - beta1) as f32;
        let m = if w.abs() < 0.5 {
            g.sub(&m)?.affine(w as f64, 0.0)?.add(&m)?
        } else {
            g.sub(&g.sub(&m)?.affine((1.0f32 - w) as f64, 0.0)?)?
        };
        let v = v.affine(beta2, 0.0)?.add(&g.affine(1.0 - beta2, 0.0)?.mul(g)?)?;

        let step = t as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        // A true division by the f32 scalar (multiplying by its reciprocal would round differently).
        let divisor = Tensor::new(bias_correction2_sqrt as f32, p.device())?;
        let denom = v.sqrt()?.broadcast_div(&divisor)?.affine(1.0, eps)?;
        let p = m.affine(-step_size, 0.0)?.div(&denom)?.add(&p)?;
        Ok((
            p,
            AdamWState {
                step: t,
                exp_avg: m,
                exp_avg_sq: v,
            },
        ))
    }
}
