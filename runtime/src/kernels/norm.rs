//! Normalization layers. Statistics are computed in f32 for half-precision inputs (f64 for f64).
//!
//! On the CPU, layer and group norm run as one fused custom op (`cpu::Norm`: two-pass
//! mean / biased variance with f64 accumulators, then the affine); on other devices they are
//! composed from candle ops (`*_portable`, public so tests can check them on the CPU too).

use candle_core::Tensor;
use vitdet_ir::ops::{BatchNorm, GroupNorm, LayerNorm};

use super::cpu::{self, NormKind};
use super::{accum_dtype, channel_view, expect_float, KernelError, KernelResult};

/// `(x - mean) / sqrt(var + eps) * w + b` over `op.axis` (biased variance).
pub fn layer_norm(op: &LayerNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let dims = x.dims();
    let c = *dims
        .get(op.axis)
        .ok_or_else(|| KernelError::Unsupported(format!("axis {} out of range for {dims:?}", op.axis)))?;
    if !x.device().is_cpu() {
        return layer_norm_portable(op, x, w, b);
    }
    let kind = NormKind::Axis {
        outer: dims[..op.axis].iter().product(),
        c,
        inner: dims[op.axis + 1..].iter().product(),
    };
    fused(x, w, b, kind, op.eps)
}

/// Layer norm from candle ops (the non-CPU path).
pub fn layer_norm_portable(op: &LayerNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let rank = x.rank();
    let xf = x.to_dtype(acc)?;
    let mean = xf.mean_keepdim(op.axis)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(op.axis)?;
    let y = xc.broadcast_div(&(var + op.eps)?.sqrt()?)?;
    let y = y
        .broadcast_mul(&channel_view(&w.to_dtype(acc)?, op.axis, rank)?)?
        .broadcast_add(&channel_view(&b.to_dtype(acc)?, op.axis, rank)?)?;
    Ok(y.to_dtype(dtype)?)
}

/// Group norm on `[N, C, ...]`: statistics over each group of `C / groups` channels and all
/// positions, per-channel affine.
pub fn group_norm(op: &GroupNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let dims = x.dims();
    if dims.len() < 2 || op.groups == 0 || !dims[1].is_multiple_of(op.groups) {
        return Err(KernelError::Unsupported(format!(
            "{} groups on input {dims:?}",
            op.groups
        )));
    }
    if !x.device().is_cpu() {
        return group_norm_portable(op, x, w, b);
    }
    let kind = NormKind::Group {
        n: dims[0],
        c: dims[1],
        groups: op.groups,
        inner: dims[2..].iter().product(),
    };
    fused(x, w, b, kind, op.eps)
}

/// Group norm from candle ops (the non-CPU path).
pub fn group_norm_portable(op: &GroupNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let dims = x.dims().to_vec();
    let (n, g) = (dims[0], op.groups);
    let per = x.elem_count() / (n * g).max(1);
    let xf = x.to_dtype(acc)?.reshape((n, g, per))?;
    let mean = xf.mean_keepdim(2)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let y = xc.broadcast_div(&(var + op.eps)?.sqrt()?)?.reshape(dims.as_slice())?;
    let y = y
        .broadcast_mul(&channel_view(&w.to_dtype(acc)?, 1, dims.len())?)?
        .broadcast_add(&channel_view(&b.to_dtype(acc)?, 1, dims.len())?)?;
    Ok(y.to_dtype(dtype)?)
}

fn fused(x: &Tensor, w: &Tensor, b: &Tensor, kind: NormKind, eps: f64) -> KernelResult<Tensor> {
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let y = cpu::norm(&x.to_dtype(acc)?, &w.to_dtype(acc)?, &b.to_dtype(acc)?, kind, eps)?;
    Ok(y.to_dtype(dtype)?)
}

/// Inference batch norm on `[N, C, ...]` with running statistics, computed as PyTorch's CPU
/// kernel does: `alpha = w / sqrt(var + eps)`, `beta = b - mean * alpha`, `y = x * alpha + beta`.
pub fn batch_norm(
    op: &BatchNorm,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    mean: &Tensor,
    var: &Tensor,
) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    if x.rank() < 2 {
        return Err(KernelError::Unsupported(format!(
            "batch norm input must be [N, C, ...], found {:?}",
            x.dims()
        )));
    }
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let alpha = w.to_dtype(acc)?.div(&(var.to_dtype(acc)? + op.eps)?.sqrt()?)?;
    let beta = b.to_dtype(acc)?.sub(&mean.to_dtype(acc)?.mul(&alpha)?)?;
    let rank = x.rank();
    let y = x
        .to_dtype(acc)?
        .broadcast_mul(&channel_view(&alpha, 1, rank)?)?
        .broadcast_add(&channel_view(&beta, 1, rank)?)?;
    Ok(y.to_dtype(dtype)?)
}
