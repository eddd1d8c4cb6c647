//! The normalization CUDA kernels, run by the host emulator, against the runtime's CPU kernels
//! on random f32 inputs: layer norm over the last axis (rows longer than a block, and more rows
//! than one chunk of the weight-gradient kernel), over a strided axis (the channels of NCHW, a
//! middle and a leading axis), group norm with one, several and per-channel groups (with and
//! without spatial axes), inference batch norm, and training batch norm with its running
//! statistics and backward.
//!
//! Tolerance: relative L2 error 1e-5 per output. Both sides read the same f32 values; the CPU
//! kernels accumulate the statistics and sums in f64 and round once, the kernels accumulate in
//! f32 in another order. Over the at most 646 values summed here that differs by a few f32
//! ulps (around 1e-7 relative), while any wrong term (a mean off by one value, a biased for an
//! unbiased variance, a missing chunk of rows) moves the outputs by 1e-3 or more.

use candle_core::Tensor;
use common::{rel_l2, Rng};

mod common;
use vitdet_cuda_emu::norm as emu;
use vitdet_ir::ops::{
    BatchNorm, BatchNormTrain, BatchNormTrainGrad, GroupNorm, GroupNormGrad, LayerNorm, LayerNormGrad,
};
use vitdet_runtime::kernels::norm as cpu;

const TOLERANCE: f64 = 1e-5;
const EPS: f64 = 1e-5;

/// Asserts each emulated output is within [`TOLERANCE`] of the CPU kernel's.
fn compare(what: &str, names: &[&str], got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for ((name, g), w) in names.iter().zip(got).zip(want) {
        assert_eq!(g.dims(), w.dims(), "{what}: {name} shape");
        let e = rel_l2(g, w);
        assert!(e <= TOLERANCE, "{what}: {name} rel L2 {e:e}");
    }
}

/// Inputs of a normalization over `c` channels: `x` off-centre, `w` around 1, `b` and `dy`.
fn inputs(dims: &[usize], c: usize, seed: u64) -> [Tensor; 4] {
    let mut rng = Rng(seed);
    [
        rng.tensor_around(dims, 2.0, 0.5),
        rng.tensor_around(&[c], 0.5, 1.0),
        rng.tensor_around(&[c], 0.5, 0.0),
        rng.tensor_around(dims, 1.0, 0.0),
    ]
}

fn check_layer_norm(dims: &[usize], axis: usize) {
    let what = format!("layer_norm {dims:?} axis {axis}");
    let [x, w, b, dy] = inputs(dims, dims[axis], dims.iter().product::<usize>() as u64 + axis as u64);
    let op = LayerNorm { axis, eps: EPS };
    let want = cpu::layer_norm(&op, &x, &w, &b).unwrap();
    let got = emu::layer_norm(&op, &x, &w, &b).unwrap();
    compare(&what, &["y"], &[got], &[want]);

    let op = LayerNormGrad { axis, eps: EPS };
    let want = cpu::layer_norm_grad(&op, &x, &w, &dy).unwrap();
    let got = emu::layer_norm_grad(&op, &x, &w, &dy).unwrap();
    compare(&format!("{what} grad"), &["dx", "dweight", "dbias"], &got, &want);
}

fn check_group_norm(dims: &[usize], groups: usize) {
    let what = format!("group_norm {dims:?} groups {groups}");
    let [x, w, b, dy] = inputs(dims, dims[1], dims.iter().product::<usize>() as u64 + groups as u64);
    let op = GroupNorm { groups, eps: EPS };
    let want = cpu::group_norm(&op, &x, &w, &b).unwrap();
    let got = emu::group_norm(&op, &x, &w, &b).unwrap();
    compare(&what, &["y"], &[got], &[want]);

    let op = GroupNormGrad { groups, eps: EPS };
    let want = cpu::group_norm_grad(&op, &x, &w, &dy).unwrap();
    let got = emu::group_norm_grad(&op, &x, &w, &dy).unwrap();
    compare(&format!("{what} grad"), &["dx", "dweight", "dbias"], &got, &want);
}

fn check_batch_norm(dims: &[usize]) {
    let what = format!("batch_norm {dims:?}");
    let c = dims[1];
    let [x, w, b, dy] = inputs(dims, c, dims.iter().product::<usize>() as u64);
    let mut rng = Rng(c as u64);
    let (rm, rv) = (rng.tensor_around(&[c], 0.5, 0.2), rng.tensor_around(&[c], 0.5, 1.0));

    let op = BatchNorm { eps: EPS };
    let want = cpu::batch_norm(&op, &x, &w, &b, &rm, &rv).unwrap();
    let got = emu::batch_norm(&op, &x, &w, &b, &rm, &rv).unwrap();
    compare(&what, &["y"], &[got], &[want]);

    let op = BatchNormTrain {
        eps: EPS,
        momentum: 0.1,
    };
    let want = cpu::batch_norm_train(&op, &x, &w, &b, &rm, &rv).unwrap();
    let got = emu::batch_norm_train(&op, &x, &w, &b, &rm, &rv).unwrap();
    compare(
        &format!("{what} train"),
        &["y", "running_mean", "running_var"],
        &got,
        &want,
    );

    let op = BatchNormTrainGrad { eps: EPS };
    let want = cpu::batch_norm_train_grad(&op, &x, &w, &dy).unwrap();
    let got = emu::batch_norm_train_grad(&op, &x, &w, &dy).unwrap();
    compare(&format!("{what} train grad"), &["dx", "dweight", "dbias"], &got, &want);
}

#[test]
fn layer_norm_last_axis_rows_longer_than_a_block() {
    // 15 rows of 40 channels, 32-thread blocks: 8 threads take a second value.
    check_layer_norm(&[3, 5, 40], 2);
}

#[test]
fn layer_norm_last_axis_rows_over_two_weight_gradient_chunks() {
    // 70 rows: a full chunk of 64 and a partial one for dweight and dbias.
    check_layer_norm(&[70, 24], 1);
}

#[test]
fn channel_layer_norm_of_nchw() {
    // The simple feature pyramid's LayerNorm over axis 1 of [N, C, H, W].
    check_layer_norm(&[2, 6, 5, 7], 1);
}

#[test]
fn layer_norm_middle_and_leading_axes() {
    check_layer_norm(&[3, 9, 4], 1);
    check_layer_norm(&[7, 10], 0);
}

#[test]
fn group_norm_several_groups() {
    check_group_norm(&[2, 12, 5, 6], 3);
}

#[test]
fn group_norm_one_group_and_one_per_channel() {
    check_group_norm(&[2, 6, 3, 5], 1);
    check_group_norm(&[2, 6, 3, 5], 6);
}

#[test]
fn group_norm_without_spatial_axes() {
    // inner == 1: the weight gradient runs by rows with per-(sample, group) statistics.
    check_group_norm(&[5, 8], 2);
    check_group_norm(&[2, 8, 7], 4);
}

#[test]
fn batch_norm_nchw() {
    check_batch_norm(&[3, 5, 4, 6]);
}

#[test]
fn batch_norm_without_spatial_axes() {
    check_batch_norm(&[6, 4]);
}

#[test]
fn batch_norm_channels_longer_than_a_block() {
    // 646 values per channel over 128-thread blocks.
    check_batch_norm(&[2, 3, 17, 19]);
}
