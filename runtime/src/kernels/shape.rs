//! Data-movement ops.
//!
//! `slice` is a view (no copy). `reshape` is a view of contiguous data (candle copies
//! non-contiguous data first). `permute` produces contiguous data, so later ops read it
//! sequentially; when the permuted view is already contiguous (e.g. undoing an earlier view)
//! it costs nothing.

use candle_core::Tensor;
use vitdet_ir::ops::{Concat, DynamicPrefix, Expand, Pad, PadRows, Permute, Reshape, Slice};

use super::{KernelError, KernelResult};

/// Same elements in row-major order under a new shape.
pub fn reshape(op: &Reshape, x: &Tensor) -> KernelResult<Tensor> {
    Ok(x.reshape(op.shape.as_slice())?)
}

/// Output axis `k` is input axis `perm[k]`; the result is contiguous.
pub fn permute(op: &Permute, x: &Tensor) -> KernelResult<Tensor> {
    if op.perm.len() != x.rank() {
        return Err(KernelError::Unsupported(format!(
            "{:?} is not a permutation of {:?}",
            op.perm,
            x.dims()
        )));
    }
    // A permutation that keeps the layout contiguous is a view (the memory planner's rule); a
    // strided input goes through candle's copy, which makes one copy where the kernel would
    // need two.
    let y = x.permute(op.perm.clone())?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.is_contiguous() && !y.is_contiguous() {
        return crate::cuda::permute::run::permute(x, &op.perm);
    }
    Ok(y.contiguous()?)
}

/// Zero padding, one candle `pad_with_zeros` per padded axis.
pub fn pad(op: &Pad, x: &Tensor) -> KernelResult<Tensor> {
    if op.pads.len() != x.rank() {
        return Err(KernelError::Unsupported(format!(
            "{} pad pairs for {:?}",
            op.pads.len(),
            x.dims()
        )));
    }
    let mut y = x.clone();
    for (d, [before, after]) in op.pads.iter().enumerate() {
        if *before > 0 || *after > 0 {
            y = y.pad_with_zeros(d, *before, *after)?;
        }
    }
    Ok(y)
}

/// Elements `start..end` along `axis`, as a view.
pub fn slice(op: &Slice, x: &Tensor) -> KernelResult<Tensor> {
    if op.start >= op.end {
        return Err(KernelError::Unsupported(format!(
            "empty slice {}..{}",
            op.start, op.end
        )));
    }
    Ok(x.narrow(op.axis, op.start, op.end - op.start)?)
}

/// Concatenation along `axis`.
pub fn concat(op: &Concat, xs: &[Tensor]) -> KernelResult<Tensor> {
    if xs.len() == 1 {
        return Ok(xs[0].clone());
    }
    Ok(Tensor::cat(xs, op.axis)?)
}

/// Broadcast to `shape`, as a view (stride 0 on the broadcast axes).
pub fn expand(op: &Expand, x: &Tensor) -> KernelResult<Tensor> {
    Ok(x.broadcast_as(op.shape.as_slice())?)
}

/// The first `clamp(count, min_rows, bound)` rows of `x`, a view (no copy). The count is read
/// back to the host: the row count decides the shapes of the kernels downstream.
pub fn dynamic_prefix(op: &DynamicPrefix, x: &Tensor, count: &Tensor) -> KernelResult<Tensor> {
    let count = count.to_dtype(candle_core::DType::I64)?.to_scalar::<i64>()?;
    if count < 0 {
        return Err(KernelError::Unsupported(format!("row count {count} is negative")));
    }
    let rows = (count as usize).clamp(op.min_rows, op.bound);
    Ok(x.narrow(0, 0, rows)?)
}

/// Zero rows appended up to `rows`.
pub fn pad_rows(op: &PadRows, x: &Tensor) -> KernelResult<Tensor> {
    let have = x.dim(0)?;
    if have > op.rows {
        return Err(KernelError::Unsupported(format!(
            "{have} rows exceed the bound {}",
            op.rows
        )));
    }
    Ok(x.pad_with_zeros(0, 0, op.rows - have)?)
}
