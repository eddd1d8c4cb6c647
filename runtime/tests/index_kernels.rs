//! Kernels of the index helpers `IotaLike` and `CompareScalar`.

use candle_core::{Device, Tensor};
use vitdet_ir::ops::{CompareKind, CompareScalar, IotaLike};
use vitdet_ir::{DType, Op};
use vitdet_runtime::kernels;

fn exec(op: impl Into<Op>, x: &Tensor) -> Tensor {
    let mut out = kernels::execute(&op.into(), std::slice::from_ref(x)).unwrap();
    assert_eq!(out.len(), 1);
    out.remove(0)
}

#[test]
fn iota_like_counts_along_its_axis() {
    let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let iota = |axis, start, step, dtype| IotaLike {
        axis,
        start,
        step,
        dtype,
    };
    let y = exec(iota(1, 0.0, 1.0, DType::I64), &x);
    assert_eq!(y.to_vec2::<i64>().unwrap(), [[0, 1, 2], [0, 1, 2]]);
    let y = exec(iota(0, 0.0, 1.0, DType::I64), &x);
    assert_eq!(y.to_vec2::<i64>().unwrap(), [[0, 0, 0], [1, 1, 1]]);
    let y = exec(iota(0, 3.0, 0.0, DType::I64), &x.flatten_all().unwrap());
    assert_eq!(y.to_vec1::<i64>().unwrap(), [3; 6]);
    let y = exec(iota(1, 0.5, -2.0, DType::F32), &x);
    assert_eq!(y.to_vec2::<f32>().unwrap(), [[0.5, -1.5, -3.5], [0.5, -1.5, -3.5]]);
}

#[test]
fn compare_scalar_masks() {
    let x = Tensor::new(&[-1.0f32, 0.0, 1e-30, 2.0, f32::NAN], &Device::Cpu).unwrap();
    let cmp = |kind, value| CompareScalar { kind, value };
    let y = exec(cmp(CompareKind::Gt, 0.0), &x);
    assert_eq!(y.dtype(), candle_core::DType::U8);
    assert_eq!(y.to_vec1::<u8>().unwrap(), [0, 0, 1, 1, 0]);
    assert_eq!(
        exec(cmp(CompareKind::Le, 0.0), &x).to_vec1::<u8>().unwrap(),
        [1, 1, 0, 0, 0]
    );
    assert_eq!(
        exec(cmp(CompareKind::Ne, 0.0), &x).to_vec1::<u8>().unwrap(),
        [1, 0, 1, 1, 1]
    );
    let i = Tensor::new(&[0i64, 1, 2], &Device::Cpu).unwrap();
    assert_eq!(exec(cmp(CompareKind::Ge, 0.5), &i).to_vec1::<u8>().unwrap(), [0, 1, 1]);
    assert_eq!(exec(cmp(CompareKind::Eq, 1.0), &i).to_vec1::<u8>().unwrap(), [0, 1, 0]);
}
