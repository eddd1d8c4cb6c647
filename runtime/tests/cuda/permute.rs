//! The permute copy kernel (reached through the runtime's `permute`, which takes it for a
//! contiguous CUDA input whose permutation is not a view) against the CPU's, bit for bit:
//! ViTDet-B's window partition at 1024 px and its inverse, the qkv split, NCHW -> NHWC, integer
//! and f64 elements, and an input that starts at an odd offset into its buffer. Runs where a GPU
//! exists; skipped, saying so, elsewhere.

use crate::common;

use candle_core::{DType, Tensor};
use common::{Nd, TestRng};
use vitdet_ir::ops::Permute;
use vitdet_runtime::kernels::shape::permute;

fn same_bits(got: &Tensor, want: &Tensor, what: &str) {
    assert!(got.device().is_cuda(), "{what}: output on {:?}", got.device());
    assert_eq!(got.dims(), want.dims(), "{what}");
    let host = |t: &Tensor| -> Vec<u64> {
        let t = t.to_device(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap();
        t.to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert!(host(got) == host(want), "{what}: the copies differ");
}

#[test]
fn permute_copies_give_the_cpu_bits() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(3);
    let cases: &[(&[usize], &[usize], DType)] = &[
        (&[1, 5, 14, 5, 14, 768], &[0, 1, 3, 2, 4, 5], DType::BF16),
        (&[1, 5, 5, 14, 14, 768], &[0, 1, 3, 2, 4, 5], DType::F32),
        (&[1, 4096, 3, 12, 64], &[2, 0, 3, 1, 4], DType::F16),
        (&[1, 256, 64, 64], &[0, 2, 3, 1], DType::F32),
        (&[3, 7, 5], &[2, 0, 1], DType::I64),
        (&[6, 10, 4], &[1, 0, 2], DType::U8),
        (&[4, 9, 2], &[2, 1, 0], DType::F64),
    ];
    for &(shape, perm, dtype) in cases {
        let what = format!("{shape:?} {dtype:?} by {perm:?}");
        let x = Nd::randn(shape, &mut rng, 10.0, 0.0).tensor_as(DType::F32);
        let x = if dtype == DType::U8 || dtype == DType::I64 {
            x.abs().unwrap()
        } else {
            x
        };
        let x = x.to_dtype(dtype).unwrap();
        let op = Permute { perm: perm.to_vec() };
        let got = permute(&op, &x.to_device(&dev).unwrap()).unwrap();
        same_bits(&got, &permute(&op, &x).unwrap(), &what);
    }
    // A contiguous view one element into its buffer: the plan copies element by element.
    let x = Nd::randn(&[9, 8, 16], &mut rng, 1.0, 0.0).tensor_as(DType::BF16);
    let view = x
        .flatten_all()
        .unwrap()
        .narrow(0, 1, 8 * 8 * 16)
        .unwrap()
        .reshape((8, 8, 16))
        .unwrap();
    let op = Permute { perm: vec![1, 0, 2] };
    let got = permute(&op, &view.to_device(&dev).unwrap()).unwrap();
    same_bits(&got, &permute(&op, &view).unwrap(), "odd offset");
}
