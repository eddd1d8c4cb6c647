//! `linear` with a bias on CUDA (f16 / bf16 run on cuBLASLt with the bias in the epilogue)
//! against the CPU kernel on the same inputs; skipped, saying so, without a GPU.
//!
//! Tolerance: relative L2 2e-3 for f16 and 1e-2 for bf16: both sides accumulate in f32 and
//! round the output once to the half type (about 2^-11 and 2^-8 relative per element).
#![cfg(feature = "cuda")]

mod common;

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
