//! Normalization layers. Statistics are computed in f32 for half-precision inputs (f64 for f64).
//!
//! On the CPU, layer and group norm run as one fused custom op (`cpu::Norm`: two-pass
//! mean / biased variance with f64 accumulators, then the affine); on other devices they are
//! composed from candle ops (`*_portable`, public so tests can check them on the CPU too).
//!
//! The backward ops (`*_grad`) recompute the statistics from `x` and return `(dx, dw, db)`. On
//! the CPU they run as one fused f64 loop (`cpu_grad::norm_grad`, f32 for half inputs, rounded
//! back); elsewhere they are composed from candle ops (`norm_grad_portable`). Training batch
//! norm is composed from candle ops on every device, its statistics in f64 on the CPU.
//!
//! With the `cuda` feature, every op here runs on CUDA tensors as the runtime's own kernels
//! (`crate::cuda::norm`: one block per statistics group, f32 accumulation) when all its operands
//! share an f32, f16 or bf16 dtype; the candle-op paths above remain for the other cases.

use candle_core::{DType, Tensor};
use vitdet_ir::ops::{
    BatchNorm, BatchNormTrain, BatchNormTrainGrad, GroupNorm, GroupNormGrad, LayerNorm, LayerNormGrad,
};

use super::cpu::{self, NormKind};
use super::cpu_grad::{self, NormGradKind};
use super::{accum_dtype, channel_view, expect_float, KernelError, KernelResult};

/// `(x - mean) / sqrt(var + eps) * w + b` over `op.axis` (biased variance).
pub fn layer_norm(op: &LayerNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let dims = x.dims();
    let c = *dims
        .get(op.axis)
        .ok_or_else(|| KernelError::Unsupported(format!("axis {} out of range for {dims:?}", op.axis)))?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::norm::run::supports(&[x, w, b]) {
        return crate::cuda::norm::run::layer_norm(op, x, w, b);
    }
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
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::norm::run::supports(&[x, w, b]) {
        return crate::cuda::norm::run::group_norm(op, x, w, b);
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
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::norm::run::supports(&[x, w, b, mean, var]) {
        return crate::cuda::norm::run::batch_norm(op, x, w, b, mean, var);
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

// ----- training: batch statistics and gradients -----

/// Checks `x [.., C at axis, ..]`, `w [C]` and `dy` like `x` for a normalization backward and
/// returns `C`.
fn check_grad_inputs(what: &str, x: &Tensor, w: &Tensor, dy: &Tensor, axis: usize) -> KernelResult<usize> {
    expect_float("input", x)?;
    let c = *x
        .dims()
        .get(axis)
        .ok_or_else(|| KernelError::Unsupported(format!("{what}: axis {axis} out of range for {:?}", x.dims())))?;
    if w.dims() != [c] || dy.dims() != x.dims() || w.dtype() != x.dtype() || dy.dtype() != x.dtype() {
        return Err(KernelError::Unsupported(format!(
            "{what}: weight {:?} {:?} must be [{c}] and gradient {:?} {:?} like input {:?} {:?}",
            w.dtype(),
            w.dims(),
            dy.dtype(),
            dy.dims(),
            x.dtype(),
            x.dims()
        )));
    }
    Ok(c)
}

/// The fused CPU backward (f32 for half types), rounded back to the input dtype.
fn fused_grad(x: &Tensor, w: &Tensor, dy: &Tensor, kind: NormGradKind, eps: f64) -> KernelResult<Vec<Tensor>> {
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let (dx, dw, db) =
        cpu_grad::norm_grad_tensors(kind, eps, &x.to_dtype(acc)?, &w.to_dtype(acc)?, &dy.to_dtype(acc)?)?;
    Ok(vec![dx.to_dtype(dtype)?, dw.to_dtype(dtype)?, db.to_dtype(dtype)?])
}

/// Backward of [`layer_norm`]: `(dx, dweight, dbias)`.
pub fn layer_norm_grad(op: &LayerNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> KernelResult<Vec<Tensor>> {
    let c = check_grad_inputs("layer_norm_grad", x, w, dy, op.axis)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::norm::run::supports(&[x, w, dy]) {
        return crate::cuda::norm::run::layer_norm_grad(op, x, w, dy);
    }
    if !x.device().is_cpu() {
        return layer_norm_grad_portable(op, x, w, dy);
    }
    let dims = x.dims();
    let kind = NormGradKind::Axis {
        outer: dims[..op.axis].iter().product(),
        c,
        inner: dims[op.axis + 1..].iter().product(),
    };
    fused_grad(x, w, dy, kind, op.eps)
}

/// Layer norm backward from candle ops (the non-CPU path).
pub fn layer_norm_grad_portable(op: &LayerNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> KernelResult<Vec<Tensor>> {
    check_grad_inputs("layer_norm_grad", x, w, dy, op.axis)?;
    norm_grad_portable(x, w, dy, op.axis, x.dims(), &[op.axis], op.eps)
}

/// Backward of [`group_norm`]: `(dx, dweight, dbias)`.
pub fn group_norm_grad(op: &GroupNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> KernelResult<Vec<Tensor>> {
    let c = check_group_grad(op, x, w, dy)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::norm::run::supports(&[x, w, dy]) {
        return crate::cuda::norm::run::group_norm_grad(op, x, w, dy);
    }
    if !x.device().is_cpu() {
        return group_norm_grad_portable(op, x, w, dy);
    }
    let dims = x.dims();
    let kind = NormGradKind::Group {
        n: dims[0],
        c,
        groups: op.groups,
        inner: dims[2..].iter().product(),
    };
    fused_grad(x, w, dy, kind, op.eps)
}

fn check_group_grad(op: &GroupNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> KernelResult<usize> {
    let c = check_grad_inputs("group_norm_grad", x, w, dy, 1)?;
    if op.groups == 0 || !c.is_multiple_of(op.groups) {
        return Err(KernelError::Unsupported(format!(
            "group_norm_grad: {} groups on input {:?}",
            op.groups,
            x.dims()
        )));
    }
    Ok(c)
}

/// Group norm backward from candle ops (the non-CPU path).
pub fn group_norm_grad_portable(op: &GroupNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> KernelResult<Vec<Tensor>> {
    check_group_grad(op, x, w, dy)?;
    let n = x.dim(0)?;
    let per = x.elem_count() / (n * op.groups).max(1);
    norm_grad_portable(x, w, dy, 1, &[n, op.groups, per], &[2], op.eps)
}

/// `[n, c, inner]`: the batch-statistics view of `[N, C, ...]`.
fn batch_view(x: &Tensor) -> [usize; 3] {
    let d = x.dims();
    [d[0], d[1], d[2..].iter().product()]
}

/// Backward of [`batch_norm_train`] (batch statistics): `(dx, dweight, dbias)`.
pub fn batch_norm_train_grad(
    op: &BatchNormTrainGrad,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> KernelResult<Vec<Tensor>> {
    check_grad_inputs("batch_norm_train_grad", x, w, dy, 1)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::norm::run::supports(&[x, w, dy]) {
        return crate::cuda::norm::run::batch_norm_train_grad(op, x, w, dy);
    }
    if !x.device().is_cpu() {
        return batch_norm_train_grad_portable(op, x, w, dy);
    }
    let [n, c, inner] = batch_view(x);
    fused_grad(x, w, dy, NormGradKind::Batch { n, c, inner }, op.eps)
}

/// Batch norm (training) backward from candle ops (the non-CPU path).
pub fn batch_norm_train_grad_portable(
    op: &BatchNormTrainGrad,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> KernelResult<Vec<Tensor>> {
    check_grad_inputs("batch_norm_train_grad", x, w, dy, 1)?;
    norm_grad_portable(x, w, dy, 1, &batch_view(x), &[0, 2], op.eps)
}

/// Normalization backward from candle ops, in f32 for half types (f64 for f64). Statistics are
/// taken over `stat_axes` of `x` reshaped to `stat_shape`; the affine is per `channel_axis` of
/// `x`'s own shape.
fn norm_grad_portable(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    channel_axis: usize,
    stat_shape: &[usize],
    stat_axes: &[usize],
    eps: f64,
) -> KernelResult<Vec<Tensor>> {
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let dims = x.dims().to_vec();
    let axes = stat_axes.to_vec();
    let xs = x.to_dtype(acc)?.reshape(stat_shape)?;
    let dyf = dy.to_dtype(acc)?;
    let mean = xs.mean_keepdim(axes.clone())?;
    let xc = xs.broadcast_sub(&mean)?;
    let rstd = (xc.sqr()?.mean_keepdim(axes.clone())? + eps)?.sqrt()?.recip()?;
    let xhat_s = xc.broadcast_mul(&rstd)?;
    let g = dyf.broadcast_mul(&channel_view(&w.to_dtype(acc)?, channel_axis, dims.len())?)?;
    let gs = g.reshape(stat_shape)?;
    let mg = gs.mean_keepdim(axes.clone())?;
    let mgx = gs.mul(&xhat_s)?.mean_keepdim(axes)?;
    let dx = gs
        .broadcast_sub(&mg)?
        .sub(&xhat_s.broadcast_mul(&mgx)?)?
        .broadcast_mul(&rstd)?
        .reshape(dims.as_slice())?;
    let others: Vec<usize> = (0..dims.len()).filter(|&d| d != channel_axis).collect();
    let c = dims[channel_axis];
    let xhat = xhat_s.reshape(dims.as_slice())?;
    let (dw, db) = if others.is_empty() {
        (dyf.mul(&xhat)?, dyf)
    } else {
        (
            dyf.mul(&xhat)?.sum_keepdim(others.clone())?.reshape(c)?,
            dyf.sum_keepdim(others)?.reshape(c)?,
        )
    };
    Ok(vec![dx.to_dtype(dtype)?, dw.to_dtype(dtype)?, db.to_dtype(dtype)?])
}

/// Batch norm with batch statistics (training): `(y, new_running_mean, new_running_var)`, see
/// [`BatchNormTrain`]. Statistics are computed in f64 on the CPU (in f32 for half types, f64 for
/// f64, elsewhere) from candle ops, then `y` and the running statistics are rounded to their
/// dtypes.
pub fn batch_norm_train(
    op: &BatchNormTrain,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
) -> KernelResult<Vec<Tensor>> {
    expect_float("input", x)?;
    if x.rank() < 2 {
        return Err(KernelError::Unsupported(format!(
            "batch_norm_train input must be [N, C, ...], found {:?}",
            x.dims()
        )));
    }
    let [n, c, inner] = batch_view(x);
    let m = n * inner;
    if m < 2 {
        return Err(KernelError::Unsupported(format!(
            "batch_norm_train needs more than 1 value per channel, input is {:?}",
            x.dims()
        )));
    }
    for (what, t) in [("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv)] {
        if t.dims() != [c] {
            return Err(KernelError::Unsupported(format!(
                "batch_norm_train {what} must be [{c}], found {:?}",
                t.dims()
            )));
        }
    }
    if !(0.0..=1.0).contains(&op.momentum) {
        return Err(KernelError::Unsupported(format!(
            "batch_norm_train momentum must be in [0, 1], found {}",
            op.momentum
        )));
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::norm::run::supports(&[x, w, b, rm, rv]) {
        return crate::cuda::norm::run::batch_norm_train(op, x, w, b, rm, rv);
    }
    let dtype = x.dtype();
    let acc = if x.device().is_cpu() {
        DType::F64
    } else {
        accum_dtype(dtype)
    };
    let xs = x.to_dtype(acc)?.reshape((n, c, inner))?;
    let mean = xs.mean_keepdim(vec![0, 2])?; // [1, C, 1]
    let xc = xs.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(vec![0, 2])?;
    let scale = (var.clone() + op.eps)?
        .sqrt()?
        .recip()?
        .mul(&w.to_dtype(acc)?.reshape((1, c, 1))?)?;
    let y = xc
        .broadcast_mul(&scale)?
        .broadcast_add(&b.to_dtype(acc)?.reshape((1, c, 1))?)?
        .reshape(x.dims())?
        .to_dtype(dtype)?;
    let running = |old: &Tensor, batch: &Tensor| -> KernelResult<Tensor> {
        let new = (old.to_dtype(acc)? * (1.0 - op.momentum))? + (batch.reshape(c)? * op.momentum)?;
        Ok(new?.to_dtype(old.dtype())?)
    };
    let unbiased = (var * (m as f64 / (m - 1) as f64))?;
    Ok(vec![y, running(rm, &mean)?, running(rv, &unbiased)?])
}
