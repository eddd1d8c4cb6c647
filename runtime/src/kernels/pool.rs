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

/// The gradient of max-pooling in windows that do not overlap (`kernel <= stride`, no padding:
/// detectron2's kernel-1 stride-2 `LastLevelMaxPool` and 2x2 `simfp` pool) as device tensor
/// ops. Each window sits at the start of its `stride` cell; the cells cover `[OH * sh, OW * sw]`,
/// which the input is cut or zero-padded to (no window reads a padded element). Each window's
/// elements are scanned in row-major order as [`MaxPool2dGrad`] says: an element replaces the
/// pick when it is greater or NaN. The pick's position gets the window's gradient (one term, so
/// exact); every other position, and rows or columns outside every cell, zero.
fn non_overlapping_scatter(
    x: &Tensor,
    dy: &Tensor,
    [kh, kw]: [usize; 2],
    [sh, sw]: [usize; 2],
) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (_, _, oh, ow) = dy.dims4()?;
    // `t` cut or zero-padded to `size` along `axis`.
    let fit = |t: &Tensor, axis: usize, size: usize| -> candle_core::Result<Tensor> {
        let len = t.dim(axis)?;
        if len >= size {
            t.narrow(axis, 0, size)
        } else {
            t.pad_with_zeros(axis, 0, size - len)
        }
    };
    // [N, C, OH, OW, KH * KW]: each window's elements, in scan order.
    let windows = fit(&fit(x, 2, oh * sh)?, 3, ow * sw)?
        .reshape((n, c, oh, sh, ow, sw))?
        .narrow(3, 0, kh)?
        .narrow(5, 0, kw)?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((n, c, oh, ow, kh * kw))?;
    let element = |e: usize| windows.narrow(4, e, 1);
    let mut best = element(0)?;
    let mut pick = Tensor::zeros(best.dims(), DType::U32, x.device())?;
    for e in 1..kh * kw {
        let v = element(e)?;
        let replace = (v.gt(&best)? + v.ne(&v)?)?.ne(0u8)?;
        best = replace.where_cond(&v, &best)?;
        pick = replace.where_cond(&Tensor::full(e as u32, pick.dims(), x.device())?, &pick)?;
    }
    let positions = Tensor::arange(0u32, (kh * kw) as u32, x.device())?;
    let onehot = pick.broadcast_eq(&positions.reshape((1, 1, 1, 1, kh * kw))?)?;
    let dx = onehot.where_cond(
        &dy.unsqueeze(4)?.broadcast_as(onehot.dims())?,
        &Tensor::zeros(onehot.dims(), dy.dtype(), dy.device())?,
    )?;
    let cells = dx
        .reshape((n, c, oh, ow, kh, kw))?
        .permute((0, 1, 2, 4, 3, 5))?
        .pad_with_zeros(3, 0, sh - kh)?
        .pad_with_zeros(5, 0, sw - kw)?
        .reshape((n, c, oh * sh, ow * sw))?;
    fit(&fit(&cells, 2, h)?, 3, w)?.contiguous()
}

/// Backward of [`max_pool2d`]: each window's gradient goes to the element PyTorch's CPU forward
/// picks (see [`MaxPool2dGrad`]). A host loop in f64 (exact for every float input; the summed
/// gradients are rounded once); inputs on another device are copied to the CPU and the result
/// copied back, except where windows do not overlap (`kernel <= stride`, no padding): a scatter
/// on the device (`non_overlapping_scatter`).
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
    if kh <= sh && kw <= sw && op.padding == [0, 0] && !x.device().is_cpu() {
        return Ok(non_overlapping_scatter(x, dy, op.kernel, op.stride)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The device path, run on the CPU, gives the host loop's values for detectron2's P6 pool
    /// (kernel 1, stride 2) on even and odd sides, and other strides.
    #[test]
    fn kernel_1_scatter_is_the_host_loops_gradient() {
        for (hw, stride) in [([8, 6], [2, 2]), ([7, 5], [2, 2]), ([9, 10], [3, 2]), ([4, 4], [1, 1])] {
            let op = MaxPool2dGrad {
                kernel: [1, 1],
                stride,
                padding: [0, 0],
            };
            let x = Tensor::randn(0f32, 1.0, (2, 3, hw[0], hw[1]), &Device::Cpu).unwrap();
            let y = max_pool2d(
                &MaxPool2d {
                    kernel: [1, 1],
                    stride,
                    padding: [0, 0],
                },
                &x,
            )
            .unwrap();
            let dy = Tensor::randn(0f32, 1.0, y.dims(), &Device::Cpu).unwrap();
            let host = max_pool2d_grad(&op, &x, &dy).unwrap();
            let ours = non_overlapping_scatter(&x, &dy, [1, 1], stride).unwrap();
            assert_eq!(ours.dims(), host.dims());
            assert_eq!(
                super::super::f64_values(&ours),
                super::super::f64_values(&host),
                "{hw:?} {stride:?}"
            );
        }
    }

    /// The device path for windows that tile the input or are spaced by a larger stride, run on
    /// the CPU, gives the host loop's values: ties (first maximum wins), NaN (last NaN wins), all
    /// `-inf` windows (first element), sides that leave rows and columns outside every window,
    /// and bf16.
    #[test]
    fn non_overlapping_scatter_is_the_host_loops_gradient() {
        for (hw, kernel, stride) in [
            ([8, 6], [2, 2], [2, 2]),
            ([7, 5], [2, 2], [2, 2]),
            ([9, 10], [3, 2], [3, 2]),
            ([4, 4], [1, 1], [1, 1]),
            ([9, 10], [2, 2], [3, 3]),
            ([7, 8], [2, 1], [3, 2]),
        ] {
            for dtype in [DType::F32, DType::BF16] {
                let (n, c) = (2, 3);
                let len = n * c * hw[0] * hw[1];
                // Few distinct values, so ties are common.
                let mut v: Vec<f32> = (0..len).map(|i| ((i * 37) % 5) as f32).collect();
                v[1] = f32::NAN;
                v[hw[1] + 1] = f32::NAN;
                v[2 * hw[1]..2 * hw[1] + 4].fill(f32::NEG_INFINITY);
                v[3 * hw[1]..3 * hw[1] + 4].fill(f32::NEG_INFINITY);
                let x = Tensor::from_vec(v, (n, c, hw[0], hw[1]), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let op = MaxPool2dGrad {
                    kernel,
                    stride,
                    padding: [0, 0],
                };
                let (oh, ow) = ((hw[0] - kernel[0]) / stride[0] + 1, (hw[1] - kernel[1]) / stride[1] + 1);
                let dy = Tensor::randn(0f32, 1.0, (n, c, oh, ow), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let host = max_pool2d_grad(&op, &x, &dy).unwrap();
                let ours = non_overlapping_scatter(&x, &dy, kernel, stride).unwrap();
                assert_eq!(ours.dims(), host.dims());
                assert_eq!(ours.dtype(), host.dtype());
                assert_eq!(
                    super::super::f64_values(&ours),
                    super::super::f64_values(&host),
                    "{hw:?} {kernel:?} {stride:?} {dtype:?}"
                );
            }
        }
    }
}
