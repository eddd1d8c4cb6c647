//! Pooling.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, OpRule};
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
