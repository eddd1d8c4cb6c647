//! Normalization layers.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_vector, numel, Cost, OpRule, RowRule};
use crate::types::TensorType;

/// Layer normalization over one axis: `y = (x - mean) / sqrt(var + eps) * w + b`, biased
/// variance, `w, b [C]` with `C = x.shape[axis]`. `axis = rank - 1` is `nn.LayerNorm`;
/// `axis = 1` on NCHW is detectron2's channel-wise `LayerNorm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerNorm {
    pub axis: usize,
    pub eps: f64,
}

impl OpRule for LayerNorm {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 3)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        let c = *x
            .shape
            .get(self.axis)
            .ok_or_else(|| format!("axis {} out of range for {x}", self.axis))?;
        expect_vector("weight", i[1], c, x)?;
        expect_vector("bias", i[2], c, x)?;
        Ok(vec![x.clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        let n = numel(&i[0].shape);
        Cost {
            macs: 5 * n,
            flops: 8 * n,
            activations: 0,
        }
    }
    fn rows(&self) -> RowRule {
        // Normalizing over the rows themselves (axis 0) is not a per-row computation.
        if self.axis == 0 {
            RowRule::none()
        } else {
            RowRule::new(&[0], &[0])
        }
    }
}

/// Backward of [`LayerNorm`] with the same `axis` and `eps`: inputs `(x, weight [C], dy)`, outputs
/// `(dx, dweight [C], dbias [C])`. The statistics are recomputed from `x` (biased variance, as the
/// forward): with `xhat = (x - mean) * rstd` and `g = dy * w` over the `C` entries along `axis`,
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`; `dweight = sum(dy * xhat)` and
/// `dbias = sum(dy)` over every other axis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerNormGrad {
    pub axis: usize,
    pub eps: f64,
}

impl OpRule for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer_norm_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 3)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        let c = *x
            .shape
            .get(self.axis)
            .ok_or_else(|| format!("axis {} out of range for {x}", self.axis))?;
        expect_vector("weight", i[1], c, x)?;
        expect_same_type("gradient", i[2], x)?;
        Ok(vec![x.clone(), i[1].clone(), i[1].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: NORM_GRAD_FLOPS * numel(&i[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        if self.axis == 0 {
            RowRule::none()
        } else {
            RowRule::new(&[0, 2], &[0])
        }
    }
}

/// Group normalization on `[N, C, ...]`: statistics over each group of `C / groups` channels
/// and all spatial positions; per-channel `w, b [C]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f64,
}

impl OpRule for GroupNorm {
    fn name(&self) -> &'static str {
        "group_norm"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 3)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        if x.rank() < 2 {
            return Err(format!("input must be [N, C, ...], found {x}"));
        }
        let c = x.shape[1];
        if self.groups == 0 || !c.is_multiple_of(self.groups) {
            return Err(format!("{} groups do not divide {c} channels", self.groups));
        }
        expect_vector("weight", i[1], c, x)?;
        expect_vector("bias", i[2], c, x)?;
        Ok(vec![x.clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        let n = numel(&i[0].shape);
        Cost {
            macs: 5 * n,
            flops: 8 * n,
            activations: 0,
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[0])
    }
}

/// Backward of [`GroupNorm`] with the same `groups` and `eps`: inputs `(x [N, C, ...],
/// weight [C], dy)`, outputs `(dx, dweight [C], dbias [C])`. Statistics are recomputed from `x`
/// per (sample, group); `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * w`
/// and the means over each group; `dweight = sum(dy * xhat)`, `dbias = sum(dy)` over `N` and the
/// spatial axes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupNormGrad {
    pub groups: usize,
    pub eps: f64,
}

impl OpRule for GroupNormGrad {
    fn name(&self) -> &'static str {
        "group_norm_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 3)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        if x.rank() < 2 {
            return Err(format!("input must be [N, C, ...], found {x}"));
        }
        let c = x.shape[1];
        if self.groups == 0 || !c.is_multiple_of(self.groups) {
            return Err(format!("{} groups do not divide {c} channels", self.groups));
        }
        expect_vector("weight", i[1], c, x)?;
        expect_same_type("gradient", i[2], x)?;
        Ok(vec![x.clone(), i[1].clone(), i[1].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: NORM_GRAD_FLOPS * numel(&i[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 2], &[0])
    }
}

/// Batch normalization on `[N, C, ...]` with running statistics (inference form):
/// inputs `x, w, b, running_mean, running_var`, `y = (x - mean) / sqrt(var + eps) * w + b`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNorm {
    pub eps: f64,
}

impl OpRule for BatchNorm {
    fn name(&self) -> &'static str {
        "batch_norm"
    }
    fn arity(&self) -> (usize, usize) {
        (5, 5)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        if x.rank() < 2 {
            return Err(format!("input must be [N, C, ...], found {x}"));
        }
        let c = x.shape[1];
        for (what, t) in ["weight", "bias", "running_mean", "running_var"].iter().zip(&i[1..]) {
            expect_vector(what, t, c, x)?;
        }
        Ok(vec![x.clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        let n = numel(&i[0].shape);
        Cost {
            macs: 2 * n,
            flops: 2 * n,
            activations: 0,
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[0])
    }
}

/// Batch normalization in training mode on `[N, C, ...]`: inputs `x, w, b, running_mean,
/// running_var`, outputs `(y, new_running_mean, new_running_var)`. `y` normalizes with the batch
/// statistics of each channel over `N` and the spatial axes (biased variance):
/// `y = (x - mean) / sqrt(var + eps) * w + b`. The running statistics follow PyTorch:
/// `new = (1 - momentum) * old + momentum * batch`, with the unbiased batch variance
/// (`m / (m - 1)` times the biased one, `m` values per channel, so `m >= 2` is required).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNormTrain {
    pub eps: f64,
    pub momentum: f64,
}

impl OpRule for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch_norm_train"
    }
    fn arity(&self) -> (usize, usize) {
        (5, 5)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        if x.rank() < 2 {
            return Err(format!("input must be [N, C, ...], found {x}"));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(format!("momentum must be in [0, 1], found {}", self.momentum));
        }
        let c = x.shape[1];
        if x.numel() / c.max(1) < 2 {
            return Err(format!(
                "batch statistics need more than 1 value per channel, input is {x}"
            ));
        }
        for (what, t) in ["weight", "bias", "running_mean", "running_var"].iter().zip(&i[1..]) {
            expect_vector(what, t, c, x)?;
        }
        Ok(vec![x.clone(), i[3].clone(), i[4].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        // Two passes for the statistics, then the normalization as layer/group norm.
        Cost {
            flops: 8 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0], &[0])
    }
}

/// Backward of [`BatchNormTrain`] with the same `eps` (the running statistics carry no
/// gradient): inputs `(x [N, C, ...], weight [C], dy)`, outputs `(dx, dweight [C], dbias [C])`.
/// Batch statistics are recomputed from `x` per channel; `dx = rstd * (g - mean(g) - xhat *
/// mean(g * xhat))` with `g = dy * w`, the means over `N` and the spatial axes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNormTrainGrad {
    pub eps: f64,
}

impl OpRule for BatchNormTrainGrad {
    fn name(&self) -> &'static str {
        "batch_norm_train_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 3)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        if x.rank() < 2 {
            return Err(format!("input must be [N, C, ...], found {x}"));
        }
        expect_vector("weight", i[1], x.shape[1], x)?;
        expect_same_type("gradient", i[2], x)?;
        Ok(vec![x.clone(), i[1].clone(), i[1].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: NORM_GRAD_FLOPS * numel(&i[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 2], &[0])
    }
}

/// Plain flops per element of a fused normalization backward: recomputing `xhat`, the two
/// reductions (`sum g`, `sum g * xhat`, plus `dweight`, `dbias`) and the `dx` formula.
const NORM_GRAD_FLOPS: u64 = 12;

/// A gradient must have exactly the type of the value it is the gradient of.
fn expect_same_type(what: &str, t: &TensorType, x: &TensorType) -> Result<(), String> {
    if t != x {
        return Err(format!("{what} {t} must have the input's type {x}"));
    }
    Ok(())
}
