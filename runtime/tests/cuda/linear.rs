//! `linear` with a bias on CUDA (f16 / bf16 run on cuBLASLt with the bias in the epilogue)
//! against the CPU kernel on the same inputs; skipped, saying so, without a GPU.
//!
//! Tolerance: relative L2 2e-3 for f16 and 1e-2 for bf16: both sides accumulate in f32 and
//! round the output once to the half type (about 2^-11 and 2^-8 relative per element).
//!
//! Also the sums of bias and norm-parameter gradients, which run as products with a ones
//! vector on the GPU.

use crate::common;

use candle_core::DType;
use common::{rel_l2, Nd, TestRng};
use vitdet_runtime::kernels::linear::linear;

#[test]
fn bias_epilogue_matches_the_cpu() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(3);
    // A ViT-B qkv projection on 300 tokens, batched as [2, 150, 768].
    let x = Nd::randn(&[2, 150, 768], &mut rng, 1.0, 0.0);
    let w = Nd::randn(&[2304, 768], &mut rng, 0.05, 0.0);
    let b = Nd::randn(&[2304], &mut rng, 0.5, 0.0);
    for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        let (xc, wc, bc) = (x.tensor_as(dtype), w.tensor_as(dtype), b.tensor_as(dtype));
        let want = linear(&xc, &wc, Some(&bc)).unwrap();
        let on = |t: &candle_core::Tensor| t.to_device(&dev).unwrap();
        let got = linear(&on(&xc), &on(&wc), Some(&on(&bc))).unwrap();
        assert_eq!(got.dims(), [2, 150, 2304]);
        assert_eq!(got.dtype(), dtype);
        let e = rel_l2(&got, &want);
        assert!(e <= tol, "{dtype:?}: rel L2 {e:e}");
    }
}

/// Operands that are views into larger buffers (a row range starting off cuBLASLt's 256-byte
/// alignment, a bias narrowed from a packed vector), and an input with no rows.
#[test]
fn offset_views_and_empty_inputs() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(5);
    let x = Nd::randn(&[41, 96], &mut rng, 1.0, 0.0);
    let w = Nd::randn(&[80, 96], &mut rng, 0.1, 0.0);
    let packed = Nd::randn(&[3 * 80], &mut rng, 0.5, 0.0);
    for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        let on = |t: &candle_core::Tensor| t.to_device(&dev).unwrap();
        let (xc, wc, pc) = (x.tensor_as(dtype), w.tensor_as(dtype), packed.tensor_as(dtype));
        // Rows 3.. start 3 * 96 * 2 = 576 bytes in (not a multiple of 256); bias elements 7..87.
        let (xv, bv) = (xc.narrow(0, 3, 37).unwrap(), pc.narrow(0, 7, 80).unwrap());
        let want = linear(&xv, &wc, Some(&bv)).unwrap();
        let (xg, bg) = (on(&xc).narrow(0, 3, 37).unwrap(), on(&pc).narrow(0, 7, 80).unwrap());
        let got = linear(&xg, &on(&wc), Some(&bg)).unwrap();
        assert_eq!(got.dims(), [37, 80]);
        let e = rel_l2(&got, &want);
        assert!(e <= tol, "{dtype:?} offset views: rel L2 {e:e}");

        let empty = on(&xc).narrow(0, 0, 0).unwrap();
        let got = linear(&empty, &on(&wc), Some(&bg)).unwrap();
        assert_eq!(got.dims(), [0, 80], "{dtype:?}: no rows");
    }
}

/// `reduce_sum` in the shapes of the training step's bias gradients (a linear's `[4096, 768]`
/// over rows, a pyramid conv's `[1, 256, 64, 64]` and the mask head's `[128, 256, 14, 14]` over
/// all but channels, a leading-and-trailing mix, and a middle axis), GPU against CPU. Both accumulate in
/// f32 and round once: relative L2 1e-5 for f32 (the summation orders differ over up to 25,088
/// terms; an f32 running sum of K terms drifts by about sqrt(K) 2^-24 of their magnitude, 1e-5
/// at K = 25,088; measured 1.7e-6 on an H200 at K = 12,288), 2^-8 for bf16 (one rounding of
/// values that can straddle a rounding boundary).
#[test]
fn bias_gradient_sums_match_the_cpu() {
    use vitdet_ir::ops::ReduceSum;
    use vitdet_runtime::kernels::reduce::reduce_sum;
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(8);
    let cases: [(&[usize], &[usize], bool); 5] = [
        (&[4096, 768], &[0], false),
        (&[1, 256, 64, 64], &[0, 2, 3], false),
        (&[128, 256, 14, 14], &[0, 2, 3], true),
        (&[3, 4096, 64], &[0, 1], false),
        // The eager attention's rel-pos gradient (a middle axis: one batched product).
        (&[4, 16, 16, 16, 16], &[3], true),
    ];
    for (dims, axes, keepdim) in cases {
        let x = Nd::randn(dims, &mut rng, 1.0, 0.1);
        let op = ReduceSum {
            axes: axes.to_vec(),
            keepdim,
        };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1.0 / 256.0)] {
            let xc = x.tensor_as(dtype);
            let want = reduce_sum(&op, &xc).unwrap();
            let got = reduce_sum(&op, &xc.to_device(&dev).unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.dtype(), dtype);
            let e = rel_l2(&got, &want);
            assert!(e <= tol, "{dims:?} over {axes:?} {dtype:?}: rel L2 {e:e}");
        }
    }
}
