//! The normalization CUDA kernels against the CPU kernels on the same random inputs, at the
//! model's sizes and at odd ones (runs where a GPU exists; skipped, saying so, elsewhere).
//!
//! Tolerances (relative L2 per output): f32 1e-5 (both sides read the same f32 values; the CPU
//! accumulates in f64, the kernels in f32 in another order, over at most 2048 values per sum:
//! a few f32 ulps, near 1e-7). f16 2e-3 and bf16 1e-2: both sides read the same half values,
//! compute in f32 (f64 statistics on the CPU) and round each output once, so they differ only
//! where the f32 results fall on either side of a rounding boundary, by one half-precision ulp
//! (2^-11 and 2^-8 relative) on a fraction of the elements.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{rel_l2, Nd, TestRng};
use vitdet_ir::ops::{
    BatchNorm, BatchNormTrain, BatchNormTrainGrad, GroupNorm, GroupNormGrad, LayerNorm, LayerNormGrad,
};
use vitdet_runtime::kernels::norm;

const EPS: f64 = 1e-6;
const DTYPES: [(DType, f64); 3] = [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)];

/// `x` off-centre, `w` around 1, `b`, `dy`, and running statistics (variance positive).
struct Inputs {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    dy: Tensor,
    mean: Tensor,
    var: Tensor,
}

impl Inputs {
    fn new(dims: &[usize], c: usize, dtype: DType, seed: u64) -> Inputs {
        let mut rng = TestRng::new(seed);
        let mut t =
            |shape: &[usize], scale: f64, offset: f64| Nd::randn(shape, &mut rng, scale, offset).tensor_as(dtype);
        Inputs {
            x: t(dims, 2.0, 0.5),
            w: t(&[c], 0.3, 1.0),
            b: t(&[c], 0.3, 0.0),
            dy: t(dims, 1.0, 0.0),
            mean: t(&[c], 0.3, 0.1),
            var: t(&[c], 0.1, 1.0),
        }
    }

    fn to(&self, dev: &Device) -> Inputs {
        let m = |t: &Tensor| t.to_device(dev).unwrap();
        Inputs {
            x: m(&self.x),
            w: m(&self.w),
            b: m(&self.b),
            dy: m(&self.dy),
            mean: m(&self.mean),
            var: m(&self.var),
        }
    }
}

/// Asserts the GPU outputs match the CPU ones: same count, dtypes and shapes, within `tol`.
fn compare(what: &str, got: &[Tensor], want: &[Tensor], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.device().is_cuda(), "{what}: output {k} left the GPU");
        assert_eq!((g.dtype(), g.dims()), (w.dtype(), w.dims()), "{what}: output {k}");
        let e = rel_l2(g, w);
        assert!(e <= tol, "{what}: output {k} rel L2 {e:e} > {tol:e}");
    }
}

fn check_layer_norm(dev: &Device, dims: &[usize], axis: usize) {
    for (dtype, tol) in DTYPES {
        let what = format!("layer_norm {dims:?} axis {axis} {dtype:?}");
        let cpu = Inputs::new(dims, dims[axis], dtype, 7 + axis as u64);
        let gpu = cpu.to(dev);
        let op = LayerNorm { axis, eps: EPS };
        let want = norm::layer_norm(&op, &cpu.x, &cpu.w, &cpu.b).unwrap();
        let got = norm::layer_norm(&op, &gpu.x, &gpu.w, &gpu.b).unwrap();
        compare(&what, &[got], &[want], tol);
        let op = LayerNormGrad { axis, eps: EPS };
        let want = norm::layer_norm_grad(&op, &cpu.x, &cpu.w, &cpu.dy).unwrap();
        let got = norm::layer_norm_grad(&op, &gpu.x, &gpu.w, &gpu.dy).unwrap();
        compare(&format!("{what} grad"), &got, &want, tol);
    }
}

fn check_group_norm(dev: &Device, dims: &[usize], groups: usize) {
    for (dtype, tol) in DTYPES {
        let what = format!("group_norm {dims:?} groups {groups} {dtype:?}");
        let cpu = Inputs::new(dims, dims[1], dtype, 11 + groups as u64);
        let gpu = cpu.to(dev);
        let op = GroupNorm { groups, eps: EPS };
        let want = norm::group_norm(&op, &cpu.x, &cpu.w, &cpu.b).unwrap();
        let got = norm::group_norm(&op, &gpu.x, &gpu.w, &gpu.b).unwrap();
        compare(&what, &[got], &[want], tol);
        let op = GroupNormGrad { groups, eps: EPS };
        let want = norm::group_norm_grad(&op, &cpu.x, &cpu.w, &cpu.dy).unwrap();
        let got = norm::group_norm_grad(&op, &gpu.x, &gpu.w, &gpu.dy).unwrap();
        compare(&format!("{what} grad"), &got, &want, tol);
    }
}

fn check_batch_norm(dev: &Device, dims: &[usize]) {
    for (dtype, tol) in DTYPES {
        let what = format!("batch_norm {dims:?} {dtype:?}");
        let cpu = Inputs::new(dims, dims[1], dtype, 13);
        let gpu = cpu.to(dev);
        let op = BatchNorm { eps: EPS };
        let want = norm::batch_norm(&op, &cpu.x, &cpu.w, &cpu.b, &cpu.mean, &cpu.var).unwrap();
        let got = norm::batch_norm(&op, &gpu.x, &gpu.w, &gpu.b, &gpu.mean, &gpu.var).unwrap();
        compare(&what, &[got], &[want], tol);
        let op = BatchNormTrain {
            eps: EPS,
            momentum: 0.1,
        };
        let want = norm::batch_norm_train(&op, &cpu.x, &cpu.w, &cpu.b, &cpu.mean, &cpu.var).unwrap();
        let got = norm::batch_norm_train(&op, &gpu.x, &gpu.w, &gpu.b, &gpu.mean, &gpu.var).unwrap();
        compare(&format!("{what} train"), &got, &want, tol);
        let op = BatchNormTrainGrad { eps: EPS };
        let want = norm::batch_norm_train_grad(&op, &cpu.x, &cpu.w, &cpu.dy).unwrap();
        let got = norm::batch_norm_train_grad(&op, &gpu.x, &gpu.w, &gpu.dy).unwrap();
        compare(&format!("{what} train grad"), &got, &want, tol);
    }
}

#[test]
fn layer_norm_on_cuda() {
    let Some(dev) = common::cuda_device() else { return };
    // ViT-L tokens (2048 rows of 1024), an odd row length, and the pyramid's channel LayerNorm.
    check_layer_norm(&dev, &[2, 32, 32, 1024], 3);
    check_layer_norm(&dev, &[37, 1000], 1);
    check_layer_norm(&dev, &[2, 256, 32, 48], 1);
    check_layer_norm(&dev, &[3, 7, 5, 9], 2);
}

#[test]
fn group_norm_on_cuda() {
    let Some(dev) = common::cuda_device() else { return };
    check_group_norm(&dev, &[2, 256, 20, 24], 32);
    check_group_norm(&dev, &[3, 30, 7, 9], 5);
    check_group_norm(&dev, &[64, 40], 4);
}

#[test]
fn batch_norm_on_cuda() {
    let Some(dev) = common::cuda_device() else { return };
    check_batch_norm(&dev, &[4, 64, 14, 18]);
    check_batch_norm(&dev, &[33, 20]);
}
