//! Normalization layers.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_vector, numel, Cost, OpRule};
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
        if self.groups == 0 || c % self.groups != 0 {
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
}
