//! Pooling.

use candle_core::Tensor;
use vitdet_ir::ops::MaxPool2d;

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
