//! The softmax CUDA kernels (forward and backward), run by the host emulator, against the
//! runtime's CPU kernels on random inputs: the last axis at row lengths that give blocks of 32,
//! 128 and 256 threads (rows longer and shorter than the block, one-element rows, rows with
//! -inf entries), and inner axes (the column kernels).
//!
//! Tolerances (relative L2 error): f32 1e-6. Both sides compute in f32; the forward kernel
//! merges per-thread (max, sum) pairs with rescaling and the backward sums the dot product in
//! a tree, so they differ from the CPU only by summation order and a few roundings, a few
//! 1e-7 at most over these rows. f16 2e-3 and bf16 1.6e-2: both sides read the same half
//! inputs, compute in f32 and round once, so an element differs by at most one unit in the
//! last place of the half type (2^-11, 2^-8 relative) where the f32 results straddle a
//! rounding boundary, and few do: the bounds are four such units, far below what a wrong
//! kernel gives (wrong max or sum: O(1)).

use candle_core::{DType, Device, Tensor};
use common::{rel_l2, Rng};

mod common;
use vitdet_cuda_emu::softmax::{softmax, softmax_grad};
use vitdet_ir::ops::{Softmax, SoftmaxGrad};
use vitdet_runtime::kernels::attention as cpu;

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-6,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

/// Forward and backward of one shape and axis on both sides; `mask` sets every third input
/// element to -inf (each row keeps finite entries).
fn check(shape: &[usize], axis: usize, dtype: DType, mask: bool) {
    let mut rng = Rng(shape.iter().fold(axis as u64 + 7, |a, &d| a * 31 + d as u64));
    let mut x = rng.tensor(shape, 4.0);
    if mask {
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &e)| if i % 3 == 1 { f32::NEG_INFINITY } else { e })
            .collect();
        x = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    }
    let x = x.to_dtype(dtype).unwrap();
    let what = format!("{shape:?} axis {axis} {dtype:?} mask {mask}");

    let y = cpu::softmax(&Softmax { axis }, &x).unwrap();
    let got = softmax(axis, &x).unwrap();
    assert_eq!(got.dtype(), dtype);
    let e = rel_l2(&got, &y);
    assert!(e <= tolerance(dtype), "{what}: softmax rel L2 {e:e}");

    let dy = rng.tensor(shape, 1.0).to_dtype(dtype).unwrap();
    let want = cpu::softmax_grad(&SoftmaxGrad { axis }, &y, &dy).unwrap();
    let got = softmax_grad(axis, &y, &dy).unwrap();
    let e = rel_l2(&got, &want);
    assert!(e <= tolerance(dtype), "{what}: softmax_grad rel L2 {e:e}");
}

#[test]
fn last_axis_rows_match_the_cpu_kernels() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // 32 threads over 37 (some threads take two elements), 128 over 300, 256 over 1100.
        check(&[3, 37], 1, dtype, false);
        check(&[2, 2, 300], 2, dtype, false);
        check(&[2, 1100], 1, dtype, false);
        // Fewer elements than threads, and one-element rows (all ones; dx all zeros).
        check(&[5, 10], 1, dtype, false);
        check(&[4, 1], 1, dtype, false);
    }
}

#[test]
fn masked_rows_match_the_cpu_kernels() {
    check(&[3, 40], 1, DType::F32, true);
    check(&[2, 300], 1, DType::F32, true);
}

#[test]
fn inner_axes_match_the_cpu_kernels() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        check(&[3, 5, 7], 1, dtype, false);
        check(&[40, 6], 0, dtype, false);
        check(&[2, 3, 9, 5], 2, dtype, false);
        check(&[2, 3, 9, 5], 0, dtype, false);
    }
}
