//! The softmax CUDA kernels (reached through the runtime's `softmax` / `softmax_grad`, which
//! dispatch to them on a CUDA device) against the CPU kernels on the same random inputs: the
//! attention shapes (rows of 196 and 4096), and inner axes. Runs where a GPU exists; skipped,
//! saying so, elsewhere.
//!
//! Tolerances (relative L2): f32 1e-6. Both sides compute in f32 and differ by summation order
//! (the kernels merge per-thread online (max, sum) pairs and reduce the backward's dot product
//! in a tree) and the GPU's `expf` (within 2 ulps): a few 1e-7 over rows of 4096. f16 2e-3
//! and bf16 1.6e-2: the same half inputs on both sides, f32 arithmetic, one rounding of the
//! output, so elements differ by at most one half-precision ulp (2^-11, 2^-8 relative) and only
//! where the f32 results straddle a rounding boundary; the bounds are four such ulps.

use crate::common;

use candle_core::{DType, Device};
use common::{rel_l2, Nd, TestRng};
use vitdet_ir::ops::{Softmax, SoftmaxGrad};
use vitdet_runtime::cuda::softmax::run::supports;
use vitdet_runtime::kernels::attention::{softmax, softmax_grad};

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-6,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

fn check(shape: &[usize], axis: usize, dtype: DType, dev: &Device) {
    let what = format!("{shape:?} axis {axis} {dtype:?}");
    let mut rng = TestRng::new(shape.iter().product::<usize>() as u64 + axis as u64);
    let x = Nd::randn(shape, &mut rng, 3.0, 0.0).tensor_as(dtype);
    let xd = x.to_device(dev).unwrap();
    assert!(supports(&xd, axis), "{what}: the CUDA kernels decline it");

    let y = softmax(&Softmax { axis }, &x).unwrap();
    let got = softmax(&Softmax { axis }, &xd).unwrap();
    assert!(got.device().is_cuda() && got.dtype() == dtype, "{what}: output {got:?}");
    let e = rel_l2(&got, &y);
    assert!(e <= tolerance(dtype), "{what}: softmax rel L2 {e:e}");

    let dy = Nd::randn(shape, &mut rng, 1.0, 0.0).tensor_as(dtype);
    let want = softmax_grad(&SoftmaxGrad { axis }, &y, &dy).unwrap();
    let got = softmax_grad(
        &SoftmaxGrad { axis },
        &y.to_device(dev).unwrap(),
        &dy.to_device(dev).unwrap(),
    )
    .unwrap();
    let e = rel_l2(&got, &want);
    assert!(e <= tolerance(dtype), "{what}: softmax_grad rel L2 {e:e}");
}

#[test]
fn attention_rows_f32_f16_bf16() {
    let Some(dev) = common::cuda_device() else { return };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // Window attention (14 x 14 tokens) and global attention at 1024 px (64 x 64 tokens).
        check(&[2, 12, 196, 196], 3, dtype, &dev);
        check(&[12, 64, 4096], 2, dtype, &dev);
        // A row shorter than a block, and one-element rows.
        check(&[300, 7], 1, dtype, &dev);
        check(&[5, 1], 1, dtype, &dev);
    }
}

#[test]
fn inner_axes_f32_f16_bf16() {
    let Some(dev) = common::cuda_device() else { return };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        check(&[4, 33, 50], 1, dtype, &dev);
        check(&[1000, 3, 5], 0, dtype, &dev);
        check(&[2, 3, 64, 9], 2, dtype, &dev);
    }
}
