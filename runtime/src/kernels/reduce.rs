//! Reductions.

use candle_core::Tensor;
use vitdet_ir::ops::ReduceSum;

use super::{accum_dtype, expect_float, KernelError, KernelResult};

/// Sum over `op.axes` (candle's `sum_keepdim`), accumulated in f32 for half types and rounded
/// back; the summed axes are dropped unless `keepdim`. No axes returns the input.
pub fn reduce_sum(op: &ReduceSum, x: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let dims = x.dims().to_vec();
    if let Some(&a) = op.axes.iter().find(|&&a| a >= dims.len()) {
        return Err(KernelError::Unsupported(format!(
            "reduce_sum axis {a} out of range for {dims:?}"
        )));
    }
    if op.axes.windows(2).any(|w| w[0] >= w[1]) {
        return Err(KernelError::Unsupported(format!(
            "reduce_sum axes {:?} must be strictly increasing",
            op.axes
        )));
    }
    if op.axes.is_empty() {
        return Ok(x.clone());
    }
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let y = x.to_dtype(acc)?.sum_keepdim(op.axes.clone())?;
    let y = if op.keepdim {
        y
    } else {
        let kept: Vec<usize> = (0..dims.len())
            .filter(|d| !op.axes.contains(d))
            .map(|d| dims[d])
            .collect();
        y.reshape(kept)?
    };
    Ok(y.to_dtype(dtype)?)
}
