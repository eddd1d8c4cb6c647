//! The activation CUDA kernels, run by the host emulator. ReLU's gradient is exact: the same
//! bits as the CPU kernel, zeros, NaN and infinities included. The GELU kernels (forward and
//! backward), against the
//! runtime's f64 CPU kernels on the same inputs: x spread over [-8, 8] (both tails, where
//! gelu tends to 0 and x, and the zero of gelu' near -0.75), in the runtime's launch and in a
//! small grid whose blocks stride over the tensor several times.
//!
//! Tolerances, per element, with `w` the f64 result and `s` the largest |w|:
//! * f32: |got - w| <= 4e-7 |w| + 1e-7 s. The kernel evaluates erfcf and expf in f32 (a few
//!   units of 2^-24 each) and rounds a product or two; near gelu''s zero the sum cancels, so an
//!   absolute term of the scale's size covers that.
//! * f16 / bf16: the f32 result rounded once, so one unit of the half type's precision
//!   (2^-10 |w|, 2^-7 |w|) where it straddles a rounding boundary, plus the f32 bound.
//!   A wrong formula or a skipped element (the output starts as NaN) fails by far more.

use candle_core::{DType, Tensor};
use common::{values, Rng};

mod common;
use vitdet_cuda_emu::activation::{gelu, gelu_grad, relu_grad};
use vitdet_ir::ops::{Unary, UnaryGrad, UnaryKind};
use vitdet_runtime::cuda::activation::launch;
use vitdet_runtime::cuda::Launch;
use vitdet_runtime::kernels::elementwise as cpu;

/// Every element of `got` within the module doc's bound of the f64 `want`.
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let unit = match got.dtype() {
        DType::F32 => 0.0,
        DType::F16 => 2f64.powi(-10),
        _ => 2f64.powi(-7),
    };
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let bound = (4e-7 + unit) * b.abs() + 1e-7 * scale;
        assert!(
            (a - b).abs() <= bound,
            "{what}: element {i}: {a} vs {b} (bound {bound:e})"
        );
    }
}

fn check(shape: &[usize], dtype: DType, grid: Option<Launch>) {
    let n: usize = shape.iter().product();
    let l = grid.unwrap_or_else(|| launch(n));
    let mut rng = Rng(n as u64 * 13 + 5);
    let x = rng.tensor(shape, 8.0).to_dtype(dtype).unwrap();
    let dy = rng.tensor(shape, 2.0).to_dtype(dtype).unwrap();
    let what = format!("{shape:?} {dtype:?} {l:?}");

    // The f64 reference on the very inputs the kernel reads (already rounded to `dtype`).
    let (x64, dy64) = (x.to_dtype(DType::F64).unwrap(), dy.to_dtype(DType::F64).unwrap());
    let want = cpu::unary(&Unary { kind: UnaryKind::Gelu }, &x64).unwrap();
    let want_grad = cpu::unary_grad(&UnaryGrad { kind: UnaryKind::Gelu }, &x64, &dy64).unwrap();

    let got = gelu(l, &x).unwrap();
    assert_eq!(got.dtype(), dtype);
    assert_close(&got, &want.to_dtype(dtype).unwrap(), &format!("{what} gelu"));
    let got = gelu_grad(l, &x, &dy).unwrap();
    assert_eq!(got.dtype(), dtype);
    assert_close(&got, &want_grad.to_dtype(dtype).unwrap(), &format!("{what} gelu_grad"));
}

#[test]
fn gelu_matches_the_f64_cpu_kernels_in_the_runtime_launch() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // Less than a block, a partial last block, several blocks.
        check(&[37], dtype, None);
        check(&[3, 300], dtype, None);
        check(&[4, 1024], dtype, None);
    }
}

#[test]
fn blocks_stride_over_what_the_grid_does_not_cover() {
    // 3 blocks of 64 threads over 1000 elements: each thread takes five or six.
    for dtype in [DType::F32, DType::BF16] {
        check(&[10, 100], dtype, Some(Launch::linear(3, 64)));
    }
}

#[test]
fn the_runtime_launch_caps_its_blocks() {
    use vitdet_runtime::cuda::activation::{MAX_BLOCKS, THREADS};
    assert_eq!(launch(1), Launch::linear(1, THREADS));
    assert_eq!(launch(THREADS as usize + 1), Launch::linear(2, THREADS));
    // ViT-B's MLP activation at 1024^2: [4096, 3072] elements.
    assert_eq!(launch(4096 * 3072), Launch::linear(MAX_BLOCKS, THREADS));
}

/// ReLU's gradient takes dy where x > 0 and zero elsewhere, NaN x passing dy through (PyTorch's
/// threshold_backward): the CPU kernel's bits exactly, over random values and the edge cases.
#[test]
fn relu_grad_gives_the_cpu_kernels_bits() {
    let edges = [
        0.0f32,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-30,
        -1e-30,
        2.5,
        -2.5,
    ];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut rng = Rng(91);
        let mut xs = rng.values(500, 3.0, 0.0);
        xs.extend(edges);
        let mut dys = rng.values(xs.len(), 2.0, 0.0);
        dys[3] = f32::NAN; // a NaN gradient where x > 0 passes through, where x <= 0 is zeroed
        dys[4] = f32::NAN;
        let n = xs.len();
        let x = Tensor::from_vec(xs, n, &candle_core::Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let dy = Tensor::from_vec(dys, n, &candle_core::Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = cpu::unary_grad(&UnaryGrad { kind: UnaryKind::Relu }, &x, &dy).unwrap();
        for l in [launch(n), Launch::linear(2, 64)] {
            let got = relu_grad(l, &x, &dy).unwrap();
            assert_eq!(got.dtype(), dtype);
            let bits = |t: &Tensor| -> Vec<u32> {
                let t = t.to_dtype(DType::F32).unwrap();
                t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(&got), bits(&want), "{dtype:?} {l:?}");
        }
    }
}
