//! Spatial resizing of `[N, C, H, W]` (PyTorch's `F.interpolate`, no antialiasing).
//!
//! Every mode is separable: each output is a weighted sum of a few source taps per axis (taps
//! and weights computed on the host in f64). On the CPU, bilinear and bicubic run as one
//! hand-written f64 kernel (`cpu::ResizeF64`: along W, then along H, as PyTorch's
//! bicubic does). Elsewhere, and for nearest, each axis gathers its taps with `index_select`
//! and sums them with per-output weights (device-generic candle ops), in f32 (f64 for f64
//! inputs); nearest just gathers, which is exact.
//!
//! * nearest: PyTorch's legacy `nearest`, `src = min(floor(dst * (in / out)), in - 1)` with the
//!   scale and product in f32 as PyTorch's kernel computes them.
//! * bilinear: `src = max((dst + 0.5) * in / out - 0.5, 0)` (`align_corners=False`) or
//!   `dst * (in - 1) / (out - 1)` (`True`); taps `floor(src)` and the next one (clamped).
//! * bicubic: the same source coordinate without the clamp at 0, four taps `floor(src) - 1 ..=
//!   floor(src) + 2` clamped into the image, Keys' cubic convolution with `A = -0.75`.
//!
//! `resize_grad` is the exact adjoint: the same taps (one definition, `taps`), each output's
//! gradient scattered back to its sources with the same weights (an f64 host loop on the CPU,
//! candle's `index_add` per tap elsewhere).

use candle_core::{DType, Device, Tensor};
use vitdet_ir::ops::{Resize, ResizeGrad, ResizeMode};

use super::cpu::{self, Taps};
use super::cpu_grad::{self, with_slice};
use super::{accum_dtype, expect_float, KernelError, KernelResult};

/// Resizes the last two axes to `op.size`.
pub fn resize(op: &Resize, x: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let (_, _, h, w) = x.dims4()?;
    let [oh, ow] = op.size;
    if oh == 0 || ow == 0 || h == 0 || w == 0 {
        return Err(KernelError::Unsupported(format!(
            "resize of {:?} to {:?}",
            x.dims(),
            op.size
        )));
    }
    let dtype = x.dtype();
    if op.mode != ResizeMode::Nearest && x.device().is_cpu() {
        let kernel = cpu::ResizeF64 {
            out_h: oh,
            out_w: ow,
            taps_h: taps(op, h, oh),
            taps_w: taps(op, w, ow),
        };
        let y = x.to_dtype(DType::F64)?.contiguous()?.apply_op1_no_bwd(&kernel)?;
        return Ok(y.to_dtype(dtype)?);
    }
    resize_portable(op, x)
}

/// Resize from candle ops (`index_select` per tap, weighted sum): the non-CPU path, public so
/// tests can check it on the CPU.
pub fn resize_portable(op: &Resize, x: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let (_, _, h, w) = x.dims4()?;
    let [oh, ow] = op.size;
    let dtype = x.dtype();
    let compute = match op.mode {
        ResizeMode::Nearest => dtype,
        _ => accum_dtype(dtype),
    };
    let xc = x.to_dtype(compute)?;
    let y = resize_axis(&xc, 2, &taps(op, h, oh))?;
    let y = resize_axis(&y, 3, &taps(op, w, ow))?;
    Ok(y.to_dtype(dtype)?)
}

/// Backward of [`resize`]: `dy [N, C, h, w]` -> `dx [N, C, op.input_size]`, the transpose of the
/// forward's interpolation (taps shared with the forward). On the CPU one f64 pass for every
/// mode, rounded to the dtype once; elsewhere [`resize_grad_portable`].
pub fn resize_grad(op: &ResizeGrad, dy: &Tensor) -> KernelResult<Tensor> {
    let (n, c, oh, ow) = check_resize_grad(op, dy)?;
    if !dy.device().is_cpu() {
        return resize_grad_portable(op, dy);
    }
    let [h, w] = op.input_size;
    let fwd = forward_of(op);
    let (taps_h, taps_w) = (taps(&fwd, h, oh), taps(&fwd, w, ow));
    let g = dy.to_dtype(DType::F64)?;
    let dx = with_slice::<f64, _>(&g, |gs| cpu_grad::resize_grad(gs, [h, w], [oh, ow], &taps_h, &taps_w))?;
    Ok(Tensor::from_vec(dx, (n, c, h, w), &Device::Cpu)?.to_dtype(dy.dtype())?)
}

/// Resize backward from candle ops (`index_add` per tap): the non-CPU path, public so tests can
/// check it on the CPU. Computed in f32 (f64 for f64, the dtype itself for nearest, whose
/// adjoint only adds gradients) like [`resize_portable`].
pub fn resize_grad_portable(op: &ResizeGrad, dy: &Tensor) -> KernelResult<Tensor> {
    let (_, _, oh, ow) = check_resize_grad(op, dy)?;
    let [h, w] = op.input_size;
    let fwd = forward_of(op);
    let dtype = dy.dtype();
    let g = dy.to_dtype(accum_dtype(dtype))?;
    let g = resize_axis_adjoint(&g, 2, h, &taps(&fwd, h, oh))?;
    let g = resize_axis_adjoint(&g, 3, w, &taps(&fwd, w, ow))?;
    Ok(g.to_dtype(dtype)?)
}

fn check_resize_grad(op: &ResizeGrad, dy: &Tensor) -> KernelResult<(usize, usize, usize, usize)> {
    expect_float("gradient", dy)?;
    let dims = dy.dims4()?;
    if op.input_size.contains(&0) || dims.2 == 0 || dims.3 == 0 {
        return Err(KernelError::Unsupported(format!(
            "resize_grad of {:?} to {:?}",
            dy.dims(),
            op.input_size
        )));
    }
    Ok(dims)
}

/// The forward resize a `ResizeGrad` is the adjoint of (its `size` is not used by [`taps`]).
fn forward_of(op: &ResizeGrad) -> Resize {
    Resize {
        size: op.input_size,
        mode: op.mode,
        align_corners: op.align_corners,
    }
}

/// Adjoint of [`resize_axis`]: `dx[.., idx_t[o], ..] += w_t[o] * dy[.., o, ..]` along `dim`, which
/// has `n_in` entries in `dx`.
fn resize_axis_adjoint(dy: &Tensor, dim: usize, n_in: usize, taps: &Taps) -> candle_core::Result<Tensor> {
    if taps.is_empty() {
        return Ok(dy.clone());
    }
    let n_out = taps[0].0.len();
    let mut shape = dy.dims().to_vec();
    shape[dim] = n_in;
    let mut wshape = vec![1usize; dy.rank()];
    wshape[dim] = n_out;
    let mut dx = Tensor::zeros(shape, dy.dtype(), dy.device())?;
    for (idx, weights) in taps {
        let idx = Tensor::from_vec(idx.clone(), n_out, dy.device())?;
        let src = if weights.iter().all(|&w| w == 1.0) {
            dy.clone()
        } else {
            let w = Tensor::from_vec(weights.clone(), wshape.as_slice(), dy.device())?.to_dtype(dy.dtype())?;
            dy.broadcast_mul(&w)?
        };
        dx = dx.index_add(&idx, &src.contiguous()?, dim)?;
    }
    Ok(dx)
}

/// The taps of one axis resized from `n_in` to `n_out` (empty for the identity).
fn taps(op: &Resize, n_in: usize, n_out: usize) -> Taps {
    if n_in == n_out {
        return Vec::new();
    }
    let last = (n_in - 1) as i64;
    let clamp = |i: i64| i.clamp(0, last) as u32;
    let src = |d: usize| -> f64 {
        if op.align_corners {
            let scale = if n_out > 1 {
                (n_in - 1) as f64 / (n_out - 1) as f64
            } else {
                0.0
            };
            d as f64 * scale
        } else {
            (d as f64 + 0.5) * (n_in as f64 / n_out as f64) - 0.5
        }
    };
    match op.mode {
        ResizeMode::Nearest => {
            let scale = n_in as f32 / n_out as f32;
            let idx = (0..n_out).map(|d| clamp(((d as f32) * scale).floor() as i64)).collect();
            vec![(idx, vec![1.0; n_out])]
        }
        ResizeMode::Bilinear => {
            let mut t: Taps = vec![(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
            for d in 0..n_out {
                let s = src(d).max(0.0);
                let i0 = (s.floor() as i64).min(last);
                let l1 = (s - i0 as f64).clamp(0.0, 1.0);
                t[0].0.push(clamp(i0));
                t[0].1.push(1.0 - l1);
                t[1].0.push(clamp(i0 + 1));
                t[1].1.push(l1);
            }
            t
        }
        ResizeMode::Bicubic => {
            const A: f64 = -0.75;
            let cc1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
            let cc2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
            let mut t: Taps = vec![(Vec::new(), Vec::new()); 4];
            for d in 0..n_out {
                let s = src(d);
                let i = s.floor();
                let f = s - i;
                let i = i as i64;
                let ws = [cc2(f + 1.0), cc1(f), cc1(1.0 - f), cc2(2.0 - f)];
                for (k, wk) in ws.iter().enumerate() {
                    t[k].0.push(clamp(i - 1 + k as i64));
                    t[k].1.push(*wk);
                }
            }
            t
        }
    }
}

/// `y[.., o, ..] = sum_t w_t[o] * x[.., idx_t[o], ..]` along `dim`.
fn resize_axis(x: &Tensor, dim: usize, taps: &Taps) -> candle_core::Result<Tensor> {
    if taps.is_empty() {
        return Ok(x.clone());
    }
    let n_out = taps[0].0.len();
    let mut wshape = vec![1usize; x.rank()];
    wshape[dim] = n_out;
    let mut acc: Option<Tensor> = None;
    for (idx, weights) in taps {
        let idx = Tensor::from_vec(idx.clone(), n_out, x.device())?;
        let g = x.index_select(&idx, dim)?;
        let term = if weights.iter().all(|&w| w == 1.0) {
            g
        } else {
            let w = Tensor::from_vec(weights.clone(), wshape.as_slice(), x.device())?.to_dtype(x.dtype())?;
            g.broadcast_mul(&w)?
        };
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    Ok(acc.expect("at least one tap"))
}
