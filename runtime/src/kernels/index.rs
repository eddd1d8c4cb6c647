//! Index constants and comparison masks (`vitdet_ir::ops` `index` family).

use candle_core::{DType, Tensor};
use vitdet_ir::ops::{CompareKind, CompareScalar, IotaLike};

use super::KernelResult;
use crate::dtype::to_candle;

/// `start + step * index[axis]` shaped like `x` (values unread), on `x`'s device. Computed in
/// f64 (exact for integer results below 2^53) and converted to the op's dtype.
pub fn iota_like(op: &IotaLike, x: &Tensor) -> KernelResult<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims[op.axis];
    let line = Tensor::arange(0u32, n as u32, x.device())?
        .to_dtype(DType::F64)?
        .affine(op.step, op.start)?
        .to_dtype(to_candle(op.dtype))?;
    let mut view = vec![1usize; dims.len()];
    view[op.axis] = n;
    Ok(line.reshape(view)?.broadcast_as(dims)?.contiguous()?)
}

/// `x (kind) value` as u8; integer inputs are compared in f64 so a fractional `value` is exact.
pub fn compare_scalar(op: &CompareScalar, x: &Tensor) -> KernelResult<Tensor> {
    let x = if x.dtype().is_float() {
        x.clone()
    } else {
        x.to_dtype(DType::F64)?
    };
    let v = op.value;
    Ok(match op.kind {
        CompareKind::Gt => x.gt(v)?,
        CompareKind::Ge => x.ge(v)?,
        CompareKind::Lt => x.lt(v)?,
        CompareKind::Le => x.le(v)?,
        CompareKind::Eq => x.eq(v)?,
        CompareKind::Ne => x.ne(v)?,
    })
}
