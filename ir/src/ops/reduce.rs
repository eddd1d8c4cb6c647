//! Reductions.

use serde::{Deserialize, Serialize};

use super::{expect_float, numel, Cost, OpRule, RowRule};
use crate::types::TensorType;

/// Sum over `axes` (strictly increasing, each `< rank`). With `keepdim` the summed axes stay as
/// size 1, otherwise they are dropped; no axes is an identity copy. The output dtype is the
/// input's; f64 sums in f64, f32/f16/bf16 accumulate in f32 and round back (as PyTorch).
/// Autodiff uses it to reduce a broadcast operand's gradient to the operand's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReduceSum {
    pub axes: Vec<usize>,
    pub keepdim: bool,
}

impl OpRule for ReduceSum {
    fn name(&self) -> &'static str {
        "reduce_sum"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        if let Some(&a) = self.axes.iter().find(|&&a| a >= x.rank()) {
            return Err(format!("axis {a} out of range for {x}"));
        }
        if self.axes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("axes {:?} must be strictly increasing", self.axes));
        }
        let shape = (0..x.rank())
            .filter_map(|d| match (self.axes.contains(&d), self.keepdim) {
                (false, _) => Some(x.shape[d]),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect::<Vec<_>>();
        Ok(vec![x.with_shape(shape)])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        // One add per input element.
        Cost {
            flops: numel(&i[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        // Summing over the rows leaves a static result; otherwise each row is summed alone.
        if self.axes.contains(&0) {
            RowRule::new(&[0], &[])
        } else {
            RowRule::new(&[0], &[0])
        }
    }
}
