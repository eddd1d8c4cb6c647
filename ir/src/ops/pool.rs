//! Pooling.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, numel, Cost, OpRule};
use crate::types::TensorType;

/// Max pooling on NCHW (padding counts as -inf). `kernel 1, stride 2` is detectron2's
/// `LastLevelMaxPool` (p6 from p5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaxPool2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl MaxPool2d {
    pub fn new(kernel: usize, stride: usize) -> Self {
        MaxPool2d {
            kernel: [kernel, kernel],
            stride: [stride, stride],
            padding: [0, 0],
        }
    }
}

impl OpRule for MaxPool2d {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_rank("input", x, 4)?;
        expect_float("input", x)?;
        let mut out = x.shape[..2].to_vec();
        for d in 0..2 {
            let padded = x.shape[2 + d] + 2 * self.padding[d];
            if self.kernel[d] == 0
                || self.stride[d] == 0
                || padded < self.kernel[d]
                || 2 * self.padding[d] > self.kernel[d]
            {
                return Err(format!(
                    "kernel {:?} stride {:?} padding {:?} invalid for {x}",
                    self.kernel, self.stride, self.padding
                ));
            }
            out.push((padded - self.kernel[d]) / self.stride[d] + 1);
        }
        Ok(vec![x.with_shape(out)])
    }
}

/// Backward of [`MaxPool2d`] with the same attributes: inputs `(x [N, C, H, W], dy)` with `dy`
/// of the pooled size -> `dx` like `x`. Each window's gradient goes to the element PyTorch's
/// CPU forward picks: scanning the in-bounds window elements in row-major order, an element
/// replaces the current pick when it is greater or is NaN (so the first maximum wins, or the
/// last NaN), starting from the first in-bounds element (which a window of all `-inf` keeps).
/// Overlapping windows accumulate; padding never receives gradient.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaxPool2dGrad {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl OpRule for MaxPool2dGrad {
    fn name(&self) -> &'static str {
        "max_pool2d_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let forward = MaxPool2d {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        let pooled = forward.infer(&i[..1])?.remove(0);
        if i[1] != &pooled {
            return Err(format!("gradient {} must have the pooled type {pooled}", i[1]));
        }
        Ok(vec![i[0].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        // One comparison per window element to find the argmax, one add per routed gradient.
        let dy = &i[1].shape;
        Cost {
            flops: numel(dy) * (self.kernel[0] * self.kernel[1]) as u64 + numel(dy),
            ..Cost::default()
        }
    }
}
