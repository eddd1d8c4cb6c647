//! The activation CUDA kernels (reached through the runtime's `unary` / `unary_grad`, which
//! dispatch to them on a CUDA device). ReLU's gradient: the CPU kernel's bits. GELU: against
//! the CPU kernels in f64 on the same inputs: ViT-B's MLP
//! activation at 1024 px ([4096, 3072]) and a small odd size. Runs where a GPU exists;
//! skipped, saying so, elsewhere.
//!
//! Tolerances (relative L2 against the f64 result): f32 1e-6, the kernel's erfcf / expf within
//! a few ulps and one or two roundings per element. f16 1e-3 and bf16 8e-3: the f32 result
//! rounded once to the half type (relative error at most 2^-11 and 2^-8 per element, about
//! half that in RMS): the bounds are about twice the worst case.
//!
//! Also the broadcasting binary kernels, the other elementwise family (exact bits).

use crate::common;

use candle_core::{DType, Device};
use common::{rel_l2, Nd, TestRng};
use vitdet_ir::ops::{Unary, UnaryGrad, UnaryKind};
use vitdet_runtime::cuda::activation::run::supports;

use vitdet_runtime::kernels::elementwise::{unary, unary_grad};

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-6,
        DType::F16 => 1e-3,
        _ => 8e-3,
    }
}

fn check(shape: &[usize], dtype: DType, dev: &Device) {
    let what = format!("{shape:?} {dtype:?}");
    let mut rng = TestRng::new(shape.iter().product::<usize>() as u64);
    let x = Nd::randn(shape, &mut rng, 3.0, 0.0).tensor_as(dtype);
    let dy = Nd::randn(shape, &mut rng, 1.0, 0.0).tensor_as(dtype);
    let (xd, dyd) = (x.to_device(dev).unwrap(), dy.to_device(dev).unwrap());
    assert!(supports(&xd), "{what}: the CUDA kernels decline it");
    let (x64, dy64) = (x.to_dtype(DType::F64).unwrap(), dy.to_dtype(DType::F64).unwrap());

    let (fwd, bwd) = (Unary { kind: UnaryKind::Gelu }, UnaryGrad { kind: UnaryKind::Gelu });
    let got = unary(&fwd, &xd).unwrap();
    assert!(got.device().is_cuda() && got.dtype() == dtype, "{what}: output {got:?}");
    let e = rel_l2(&got, &unary(&fwd, &x64).unwrap());
    assert!(e <= tolerance(dtype), "{what}: gelu rel L2 {e:e}");

    let got = unary_grad(&bwd, &xd, &dyd).unwrap();
    assert!(got.device().is_cuda() && got.dtype() == dtype, "{what}: output {got:?}");
    let e = rel_l2(&got, &unary_grad(&bwd, &x64, &dy64).unwrap());
    assert!(e <= tolerance(dtype), "{what}: gelu_grad rel L2 {e:e}");
}

/// ReLU's gradient at the RPN head's finest level ([1, 256, 256, 256] in bf16) and in the box
/// head's f32: exactly the CPU kernel's bits.
#[test]
fn relu_grad_gives_the_cpu_bits() {
    let Some(dev) = common::cuda_device() else { return };
    for (shape, dtype) in [
        (&[1usize, 256, 256, 256][..], DType::BF16),
        (&[512, 1024][..], DType::F32),
    ] {
        let mut rng = TestRng::new(17);
        let x = Nd::randn(shape, &mut rng, 1.0, 0.0).tensor_as(dtype);
        let dy = Nd::randn(shape, &mut rng, 1.0, 0.0).tensor_as(dtype);
        let op = UnaryGrad { kind: UnaryKind::Relu };
        let want = unary_grad(&op, &x, &dy).unwrap();
        let got = unary_grad(&op, &x.to_device(&dev).unwrap(), &dy.to_device(&dev).unwrap()).unwrap();
        assert!(
            got.device().is_cuda() && got.dtype() == dtype,
            "{shape:?}: output {got:?}"
        );
        let got = got.to_device(&Device::Cpu).unwrap();
        let diff = got
            .ne(&want)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{shape:?} {dtype:?}: elements that differ from the CPU");
    }
}

#[test]
fn mlp_activation_f32_f16_bf16() {
    let Some(dev) = common::cuda_device() else { return };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        check(&[4096, 3072], dtype, &dev);
        check(&[7, 33], dtype, &dev);
    }
}

/// Broadcasting add, sub, mul and div (`cuda::binary`) on the GPU against candle's CPU ops, in
/// the eager attention's rel-pos add shapes (at a quarter of the global block's side) and a
/// channel bias: each element is one f32 operation rounded once on both sides, so the bits
/// must agree (NaN as NaN).
#[test]
fn broadcasting_binary_ops_equal_the_cpu() {
    use vitdet_ir::ops::{Binary, BinaryKind};
    use vitdet_runtime::kernels::elementwise::binary;
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(21);
    let shapes: [(&[usize], &[usize]); 3] = [
        (&[4, 16, 16, 16, 16], &[4, 16, 16, 16, 1]),
        (&[4, 16, 16, 16, 16], &[4, 16, 16, 1, 16]),
        (&[2, 256, 32, 32], &[1, 256, 1, 1]),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (da, db) in shapes {
            let a = Nd::randn(da, &mut rng, 1.0, 0.0).tensor_as(dtype);
            let b = Nd::randn(db, &mut rng, 1.0, 0.0).tensor_as(dtype);
            for kind in [BinaryKind::Add, BinaryKind::Sub, BinaryKind::Mul, BinaryKind::Div] {
                let op = Binary { kind };
                let want = binary(&op, &a, &b).unwrap();
                let got = binary(&op, &a.to_device(&dev).unwrap(), &b.to_device(&dev).unwrap()).unwrap();
                assert!(got.device().is_cuda());
                let (g, w) = (Nd::from_tensor(&got), Nd::from_tensor(&want));
                let same = g
                    .data
                    .iter()
                    .zip(&w.data)
                    .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()));
                assert!(same, "{dtype:?} {da:?} {kind:?} {db:?}: the GPU differs from the CPU");
            }
        }
    }
}
