//! The fused window-attention CUDA kernels, run by the host emulator, against the runtime's
//! CPU kernels on random inputs: padded windows on both axes, every relative-position family,
//! with and without the qkv bias, a batch of two and a global (one-window) block.
//!
//! Tolerance: relative L2 error 1e-5. Both sides compute in f32 and differ only in summation
//! order (the kernels stream keys in tiles with an online softmax; the CPU kernel takes whole
//! rows), which over rows of at most 35 tokens and head dim 8 stays near 1e-7.

use candle_core::{DType, Tensor};
use common::{rel_l2, Rng};
mod common;

use vitdet_cuda_emu::window_attention::{window_attention, window_attention_grad, HEAD_DIM};
use vitdet_ir::ops::{WindowAttention, WindowRelPos};
use vitdet_runtime::kernels::window_attention as cpu;

const HEADS: usize = 2;

/// The op of one configuration at head dim `hd`, and its random inputs in `dtype`: qkv, then
/// the qkv bias and the relative-position inputs the op takes.
fn case(
    rng: &mut Rng,
    dtype: DType,
    hd: usize,
    qkv: [usize; 3],
    window: [usize; 2],
    rel_pos: WindowRelPos,
    qkv_bias: bool,
) -> (WindowAttention, Vec<Tensor>) {
    let op = WindowAttention {
        heads: HEADS,
        window,
        scale: (hd as f64).powf(-0.5),
        rel_pos,
        qkv_bias,
    };
    let c = HEADS * hd;
    let [batch, h, w] = qkv;
    let mut draw = |shape: &[usize], scale: f32| rng.tensor(shape, scale).to_dtype(dtype).unwrap();
    let mut x = vec![draw(&[batch, h, w, 3 * c], 1.0)];
    if qkv_bias {
        x.push(draw(&[3 * c], 0.5));
    }
    let [wh, ww] = window;
    match rel_pos {
        WindowRelPos::None => {}
        WindowRelPos::Decomposed => {
            x.push(draw(&[wh, wh, hd], 0.3));
            x.push(draw(&[ww, ww, hd], 0.3));
        }
        WindowRelPos::Bias => x.push(draw(&[HEADS, wh * ww, wh * ww], 1.0)),
    }
    (op, x)
}

/// Forward and backward of one configuration on both sides.
fn check(batch: usize, hw: [usize; 2], window: [usize; 2], rel_pos: WindowRelPos, qkv_bias: bool) {
    let mut rng = Rng(batch as u64 * 1000 + hw[0] as u64 * 10 + window[0] as u64);
    let qkv = [batch, hw[0], hw[1]];
    let (op, x) = case(&mut rng, DType::F32, HEAD_DIM, qkv, window, rel_pos, qkv_bias);
    let what = format!("batch {batch} grid {hw:?} window {window:?} {rel_pos:?} bias {qkv_bias}");

    let want = cpu::window_attention(&op, &x).unwrap();
    let got = window_attention(&op, &x).unwrap();
    for (name, g, w) in [("out", &got[0], &want[0]), ("lse", &got[1], &want[1])] {
        let e = rel_l2(g, w);
        assert!(e <= 1e-5, "{what}: {name} rel L2 {e:e}");
    }

    let grad_op = op.grad();
    let dout = rng.tensor(want[0].dims(), 1.0);
    let mut gx = x.clone();
    gx.extend([want[0].clone(), want[1].clone(), dout]);
    let want = cpu::window_attention_grad(&grad_op, &gx).unwrap();
    let got = window_attention_grad(&grad_op, &gx).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: gradient count");
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = rel_l2(g, w);
        assert!(e <= 1e-5, "{what}: gradient of input {k} rel L2 {e:e}");
    }
}

#[test]
fn decomposed_with_bias_padded_on_both_axes() {
    check(1, [5, 7], [3, 4], WindowRelPos::Decomposed, true);
}

#[test]
fn decomposed_without_bias_batch_of_two() {
    check(2, [6, 4], [3, 3], WindowRelPos::Decomposed, false);
}

#[test]
fn beit_bias_padded() {
    check(1, [5, 5], [3, 3], WindowRelPos::Bias, true);
}

#[test]
fn no_relative_term() {
    check(1, [4, 6], [4, 3], WindowRelPos::None, true);
}

#[test]
fn global_block_decomposed() {
    // One window over the whole 5x7 grid: 35 keys, more than one 32-key tile.
    check(1, [5, 7], [5, 7], WindowRelPos::Decomposed, true);
}

#[test]
fn global_block_beit_bias() {
    check(1, [6, 6], [6, 6], WindowRelPos::Bias, true);
}

/// Relative L2 bound of the tensor-core kernels' outputs and gradients in `dtype`: they round
/// P (and dS) to the half type before the products that take them (2^-11 relative per term in
/// f16, 2^-8 in bf16), and each result once; the CPU kernel keeps those in f32. f16 2e-3 (3e-4
/// observed), bf16 eight times that, as its unit roundoff.
fn tc_tolerance(dtype: DType) -> f64 {
    if dtype == DType::F16 {
        2e-3
    } else {
        1.6e-2
    }
}

/// The tensor-core forward (f16 or bf16, head dim 16 or 64) against the CPU kernel on the same half
/// inputs. Tolerance: out [`tc_tolerance`]; lse 1e-5 (both accumulate the products of the same
/// half values in f32).
fn check_tc(dtype: DType, hd: usize, hw: [usize; 2], window: [usize; 2], rel_pos: WindowRelPos, qkv_bias: bool) {
    use vitdet_cuda_emu::window_attention::window_attention_tc;
    let mut rng = Rng(hw[0] as u64 * 31 + window[1] as u64);
    let qkv = [1, hw[0], hw[1]];
    let (op, x) = case(&mut rng, dtype, hd, qkv, window, rel_pos, qkv_bias);
    let what =
        format!("tensor cores {dtype:?} head dim {hd}: grid {hw:?} window {window:?} {rel_pos:?} bias {qkv_bias}");
    let want = cpu::window_attention(&op, &x).unwrap();
    let got = window_attention_tc(&op, &x).unwrap();
    assert_eq!(got[0].dtype(), dtype, "{what}: output dtype");
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let e = rel_l2(&f32(&got[0]), &f32(&want[0]));
    assert!(e <= tc_tolerance(dtype), "{what}: out rel L2 {e:e}");
    let e = rel_l2(&got[1], &want[1]);
    assert!(e <= 1e-5, "{what}: lse rel L2 {e:e}");
}

#[test]
fn tensor_cores_decomposed_padded_multi_tile() {
    // 9x10 tokens, one 9x10 window: 90 queries (two 64-row blocks) and 90 keys (two tiles).
    for dtype in [DType::F16, DType::BF16] {
        check_tc(dtype, 16, [9, 10], [9, 10], WindowRelPos::Decomposed, true);
    }
}

#[test]
fn tensor_cores_windows_bias_and_none() {
    for dtype in [DType::F16, DType::BF16] {
        check_tc(dtype, 16, [5, 7], [3, 4], WindowRelPos::Bias, true);
        check_tc(dtype, 16, [5, 7], [3, 4], WindowRelPos::None, false);
    }
}

/// The tensor-core backward (f16 or bf16, head dim 16 or 64) against the CPU kernel's gradients on
/// the same half inputs, `out` and `lse` (the CPU forward's) and a random `dout`.
///
/// Tolerance: [`tc_tolerance`] per gradient. The kernel rounds P and dS to the half type before
/// the dV, dK and dQ products (independent errors across terms, so the sums keep a relative
/// error of a fraction of the unit roundoff: 3e-4 observed in f16); the CPU kernel keeps them
/// in f32. Both round each gradient once. The rel-pos and bias gradients come from dS in f32
/// and agree to ~1e-5. A wrong index or a missing term gives errors of order 1e-2 and up in f16
/// (a 1% error on the BEiT bias gradient alone gives 1e-2), which the f16 runs catch.
fn check_grad_tc(dtype: DType, hd: usize, hw: [usize; 2], window: [usize; 2], rel_pos: WindowRelPos, qkv_bias: bool) {
    use vitdet_cuda_emu::window_attention::window_attention_grad_tc;
    let mut rng = Rng(hw[1] as u64 * 77 + window[0] as u64 * 5 + qkv_bias as u64);
    let qkv = [1, hw[0], hw[1]];
    let (op, x) = case(&mut rng, dtype, hd, qkv, window, rel_pos, qkv_bias);
    let what = format!(
        "tensor-core backward {dtype:?} head dim {hd}: grid {hw:?} window {window:?} {rel_pos:?} bias {qkv_bias}"
    );
    let fwd = cpu::window_attention(&op, &x).unwrap();
    let grad_op = op.grad();
    let dout = rng.tensor(fwd[0].dims(), 1.0).to_dtype(dtype).unwrap();
    let mut gx = x.clone();
    gx.extend([fwd[0].clone(), fwd[1].clone(), dout]);
    let want = cpu::window_attention_grad(&grad_op, &gx).unwrap();
    let got = window_attention_grad_tc(&grad_op, &gx).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: gradient count");
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.dtype(), dtype, "{what}: gradient of input {k} dtype");
        let e = rel_l2(&f32(g), &f32(w));
        assert!(e <= tc_tolerance(dtype), "{what}: gradient of input {k} rel L2 {e:e}");
    }
}

#[test]
fn tensor_core_backward_decomposed_padded_multi_tile() {
    // Windows of 9x10 = 90 tokens (two query tiles, two key blocks) over an 11x12 grid: a 2x2
    // grid of windows padded by 7 rows and 8 columns.
    for dtype in [DType::F16, DType::BF16] {
        check_grad_tc(dtype, 16, [11, 12], [9, 10], WindowRelPos::Decomposed, true);
    }
}

#[test]
fn tensor_core_backward_decomposed_global_without_bias() {
    for dtype in [DType::F16, DType::BF16] {
        check_grad_tc(dtype, 16, [9, 10], [9, 10], WindowRelPos::Decomposed, false);
    }
}

#[test]
fn tensor_core_backward_beit_bias_and_none() {
    for dtype in [DType::F16, DType::BF16] {
        check_grad_tc(dtype, 16, [5, 7], [3, 4], WindowRelPos::Bias, true);
        check_grad_tc(dtype, 16, [5, 7], [3, 4], WindowRelPos::None, false);
        check_grad_tc(dtype, 16, [9, 10], [9, 10], WindowRelPos::None, true);
    }
}

/// A global block 64 tokens wide (`ww` equal to the kernels' 64-key tile: every key tile one row
/// of the window), where the decomposed term's column part is read once per row: kept in
/// registers by the forward, staged per query tile by the backward's key pass, and summed per
/// query row in shared memory by its query pass.
#[test]
fn tensor_cores_rows_as_key_tiles() {
    for dtype in [DType::F16, DType::BF16] {
        check_tc(dtype, 16, [3, 64], [3, 64], WindowRelPos::Decomposed, true);
        check_grad_tc(dtype, 16, [3, 64], [3, 64], WindowRelPos::Decomposed, true);
    }
}

/// ViTDet-B/L's head dim, where the products' loops over 16-wide head-dim slices (Q K^T's
/// k-steps, P V's and the backward's output tiles) run four times.
#[test]
fn tensor_cores_head_dim_64() {
    for dtype in [DType::F16, DType::BF16] {
        check_tc(dtype, 64, [9, 10], [9, 10], WindowRelPos::Decomposed, true);
        check_tc(dtype, 64, [5, 7], [3, 4], WindowRelPos::Bias, false);
    }
}

#[test]
fn tensor_core_backward_head_dim_64() {
    for dtype in [DType::F16, DType::BF16] {
        check_grad_tc(dtype, 64, [9, 10], [9, 10], WindowRelPos::Decomposed, true);
    }
}

/// ViTDet's global blocks: head dim 64 with every 64-key tile one row of the window.
#[test]
fn tensor_cores_head_dim_64_rows_as_key_tiles() {
    check_tc(DType::BF16, 64, [2, 64], [2, 64], WindowRelPos::Decomposed, true);
    check_grad_tc(DType::BF16, 64, [2, 64], [2, 64], WindowRelPos::Decomposed, true);
}

/// The tile loads' two paths: 16-byte moves when qkv is 16-byte aligned, element by element
/// when it is not (a view at an odd offset). They copy the same bits, so forward and backward
/// must agree exactly (relative L2 0).
#[test]
fn tensor_cores_misaligned_qkv_gives_the_same_bits() {
    use vitdet_cuda_emu::window_attention::{window_attention_grad_tc_placed, window_attention_tc_placed};
    for (dtype, hd) in [(DType::BF16, 16), (DType::F16, 64)] {
        let mut rng = Rng(hd as u64);
        let (op, x) = case(&mut rng, dtype, hd, [1, 9, 10], [9, 10], WindowRelPos::Decomposed, true);
        let aligned = window_attention_tc_placed(&op, &x, false).unwrap();
        let misaligned = window_attention_tc_placed(&op, &x, true).unwrap();
        for (a, m) in aligned.iter().zip(&misaligned) {
            assert_eq!(rel_l2(m, a), 0.0, "{dtype:?} head dim {hd}: forward");
        }
        let mut gx = x.clone();
        let dout = rng.tensor(aligned[0].dims(), 1.0).to_dtype(dtype).unwrap();
        gx.extend([aligned[0].clone(), aligned[1].clone(), dout]);
        let aligned = window_attention_grad_tc_placed(&op.grad(), &gx, false).unwrap();
        let misaligned = window_attention_grad_tc_placed(&op.grad(), &gx, true).unwrap();
        for (k, (a, m)) in aligned.iter().zip(&misaligned).enumerate() {
            assert_eq!(rel_l2(m, a), 0.0, "{dtype:?} head dim {hd}: gradient of input {k}");
        }
    }
}
