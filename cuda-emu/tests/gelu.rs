//! The GELU CUDA kernels (forward and backward), run by the host emulator, against the
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
use vitdet_cuda_emu::gelu::{gelu, gelu_grad};
use vitdet_ir::ops::{Unary, UnaryGrad, UnaryKind};
use vitdet_runtime::cuda::gelu::launch;
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
    use vitdet_runtime::cuda::gelu::{MAX_BLOCKS, THREADS};
    assert_eq!(launch(1), Launch::linear(1, THREADS));
    assert_eq!(launch(THREADS as usize + 1), Launch::linear(2, THREADS));
    // ViT-B's MLP activation at 1024^2: [4096, 3072] elements.
    assert_eq!(launch(4096 * 3072), Launch::linear(MAX_BLOCKS, THREADS));
}
