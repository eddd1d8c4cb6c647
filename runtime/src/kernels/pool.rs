//! Pooling.

use candle_core::{DType, Device, Tensor};
use vitdet_ir::ops::{MaxPool2d, MaxPool2dGrad};

use super::cpu_grad::{self, with_slice};

use super::{expect_float, KernelError, KernelResult};

/// Max pooling on NCHW (candle's `max_pool2d_with_stride`; any kernel, stride, e.g. detectron2's
/// kernel-1 stride-2 `LastLevelMaxPool`). Padding is explicit `-inf` borders, so padded
/// positions never win (PyTorch's semantics; `padding <= kernel / 2` keeps every window
/// non-empty).
pub fn max_pool2d(op: &MaxPool2d, x: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let (n, c, h, w) = x.dims4()?;
    let [kh, kw] = op.kernel;
    let [sh, sw] = op.stride;
    let [ph, pw] = op.padding;
    if kh == 0 || kw == 0 || sh == 0 || sw == 0 || h + 2 * ph < kh || w + 2 * pw < kw {
        return Err(KernelError::Unsupported(format!(
            "max_pool2d {op:?} on input {:?}",
            x.dims()
        )));
    }
    let x = if ph > 0 || pw > 0 {
        let ninf = |hh: usize, ww: usize| -> candle_core::Result<Tensor> {
            Tensor::full(f32::NEG_INFINITY, (n, c, hh, ww), x.device())?.to_dtype(x.dtype())
        };
        let mut y = x.clone();
        if ph > 0 {
            let band = ninf(ph, w)?;
            y = Tensor::cat(&[&band, &y, &band], 2)?;
        }
        if pw > 0 {
            let band = ninf(h + 2 * ph, pw)?;
            y = Tensor::cat(&[&band, &y, &band], 3)?;
        }
        y
    } else {
        x.clone()
    };
    Ok(x.max_pool2d_with_stride((kh, kw), (sh, sw))?)
}

/// Backward of [`max_pool2d`]: each window's gradient goes to the element PyTorch's CPU forward
/// picks (see [`MaxPool2dGrad`]). A host loop in f64 (exact for every float input; the summed
/// gradients are rounded once); inputs on another device are copied to the CPU and the result
/// copied back.
pub fn max_pool2d_grad(op: &MaxPool2dGrad, x: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let (n, c, h, w) = x.dims4()?;
    let [kh, kw] = op.kernel;
    let [sh, sw] = op.stride;
    let [ph, pw] = op.padding;
    if kh == 0 || kw == 0 || sh == 0 || sw == 0 || h + 2 * ph < kh || w + 2 * pw < kw || 2 * ph > kh || 2 * pw > kw {
        return Err(KernelError::Unsupported(format!(
            "max_pool2d_grad {op:?} on input {:?}",
            x.dims()
        )));
    }
    let (oh, ow) = ((h + 2 * ph - kh) / sh + 1, (w + 2 * pw - kw) / sw + 1);
    if dy.dims() != [n, c, oh, ow] || dy.dtype() != x.dtype() {
        return Err(KernelError::Unsupported(format!(
            "max_pool2d_grad: gradient {:?} {:?} must be {:?} [{n}, {c}, {oh}, {ow}]",
            dy.dtype(),
            dy.dims(),
            x.dtype()
        )));
    }
    let host = |t: &Tensor| -> candle_core::Result<Tensor> { t.to_device(&Device::Cpu)?.to_dtype(DType::F64) };
    let (xh, dyh) = (host(x)?, host(dy)?);
    let dx = with_slice::<f64, _>(&xh, |xs| {
        with_slice::<f64, _>(&dyh, |ds| {
            cpu_grad::max_pool2d_grad(xs, ds, [h, w], [oh, ow], op.kernel, op.stride, op.padding)
        })
    })??;
    Ok(Tensor::from_vec(dx, (n, c, h, w), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?)
}
