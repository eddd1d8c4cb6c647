//! The fused window-attention CUDA kernels against the CPU kernel on the same random inputs
//! (runs where a GPU exists; skipped, saying so, elsewhere).
//!
//! f16 / bf16 run on the tensor-core kernels (`fwd_tc`, `bwd_kv_tc`, `bwd_q_tc`), f32 on the f32 kernels.
//!
//! Also the backward ops of the unfused attention's relative-position tables, which run as
//! diagonal sums on the GPU where the CPU scatters rows with `index_add`.
//!
//! Tolerances: f32 relative L2 1e-5 (both sides f32, different summation order over rows of
//! up to 4096 keys); bf16 / f16 1e-2 (inputs rounded once to the half type on both sides, the
//! CUDA kernels accumulate in f32 and round outputs once, the CPU kernel likewise: the residual
//! is a few half-precision ulps of the output).

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{rel_l2, Nd, TestRng};
use vitdet_ir::ops::{WindowAttention, WindowAttentionGrad, WindowRelPos};
use vitdet_runtime::kernels::window_attention as wa;

struct Case {
    batch: usize,
    hw: [usize; 2],
    window: [usize; 2],
    heads: usize,
    head_dim: usize,
    rel_pos: WindowRelPos,
    qkv_bias: bool,
}

fn inputs(c: &Case, rng: &mut TestRng, dtype: DType) -> Vec<Tensor> {
    let ch = c.heads * c.head_dim;
    let mut x = vec![Nd::randn(&[c.batch, c.hw[0], c.hw[1], 3 * ch], rng, 1.0, 0.0).tensor_as(dtype)];
    if c.qkv_bias {
        x.push(Nd::randn(&[3 * ch], rng, 0.5, 0.0).tensor_as(dtype));
    }
    let [wh, ww] = c.window;
    match c.rel_pos {
        WindowRelPos::None => {}
        WindowRelPos::Decomposed => {
            x.push(Nd::randn(&[wh, wh, c.head_dim], rng, 0.2, 0.0).tensor_as(dtype));
            x.push(Nd::randn(&[ww, ww, c.head_dim], rng, 0.2, 0.0).tensor_as(dtype));
        }
        WindowRelPos::Bias => x.push(Nd::randn(&[c.heads, wh * ww, wh * ww], rng, 1.0, 0.0).tensor_as(dtype)),
    }
    x
}

fn to(xs: &[Tensor], dev: &Device) -> Vec<Tensor> {
    xs.iter().map(|t| t.to_device(dev).unwrap()).collect()
}

fn check(c: Case, dtype: DType, tol: f64, dev: &Device) {
    let op = WindowAttention {
        heads: c.heads,
        window: c.window,
        scale: (c.head_dim as f64).powf(-0.5),
        rel_pos: c.rel_pos,
        qkv_bias: c.qkv_bias,
    };
    let grad_op = WindowAttentionGrad {
        heads: c.heads,
        window: c.window,
        scale: op.scale,
        rel_pos: c.rel_pos,
        qkv_bias: c.qkv_bias,
    };
    let what = format!(
        "{:?} grid {:?} window {:?} hd {} {dtype:?}",
        c.rel_pos, c.hw, c.window, c.head_dim
    );
    let mut rng = TestRng::new(7);
    let x = inputs(&c, &mut rng, dtype);
    let want = wa::window_attention(&op, &x).unwrap();
    let got = wa::window_attention(&op, &to(&x, dev)).unwrap();
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.device().is_cuda(), "{what}: output {k} left the GPU");
        let e = rel_l2(g, w);
        assert!(e <= tol, "{what}: forward output {k} rel L2 {e:e}");
    }
    let dout = Nd::randn(want[0].dims(), &mut rng, 1.0, 0.0).tensor_as(dtype);
    let mut gx = x.clone();
    gx.extend([want[0].clone(), want[1].clone(), dout]);
    let want = wa::window_attention_grad(&grad_op, &gx).unwrap();
    let got = wa::window_attention_grad(&grad_op, &to(&gx, dev)).unwrap();
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = rel_l2(g, w);
        assert!(e <= tol, "{what}: gradient {k} rel L2 {e:e}");
    }
}

fn vitdet_b_window(rel_pos: WindowRelPos) -> Case {
    // ViTDet-B's windowed block at 1024 / 4 (a 16x16 grid: two 14-token windows a side,
    // padded), head dim 64.
    Case {
        batch: 1,
        hw: [16, 16],
        window: [14, 14],
        heads: 4,
        head_dim: 64,
        rel_pos,
        qkv_bias: true,
    }
}

#[test]
fn windowed_decomposed_f32_bf16_f16() {
    let Some(dev) = common::cuda_device() else { return };
    check(vitdet_b_window(WindowRelPos::Decomposed), DType::F32, 1e-5, &dev);
    check(vitdet_b_window(WindowRelPos::Decomposed), DType::BF16, 1e-2, &dev);
    check(vitdet_b_window(WindowRelPos::Decomposed), DType::F16, 1e-2, &dev);
}

#[test]
fn windowed_beit_bias_and_none() {
    let Some(dev) = common::cuda_device() else { return };
    check(vitdet_b_window(WindowRelPos::Bias), DType::F32, 1e-5, &dev);
    check(vitdet_b_window(WindowRelPos::None), DType::F32, 1e-5, &dev);
}

#[test]
fn global_decomposed_head_dim_80() {
    let Some(dev) = common::cuda_device() else { return };
    let c = Case {
        batch: 1,
        hw: [32, 32],
        window: [32, 32],
        heads: 2,
        head_dim: 80,
        rel_pos: WindowRelPos::Decomposed,
        qkv_bias: true,
    };
    check(c, DType::F32, 1e-5, &dev);
}

#[test]
fn global_beit_bias_tensor_cores_head_dim_80() {
    // The f16 / bf16 forward runs on the tensor cores (head dim a multiple of 16).
    let Some(dev) = common::cuda_device() else { return };
    let case = |dtype| Case {
        batch: 1,
        hw: [20, 20],
        window: [20, 20],
        heads: 2,
        head_dim: 80,
        rel_pos: if dtype == DType::F16 {
            WindowRelPos::Bias
        } else {
            WindowRelPos::Decomposed
        },
        qkv_bias: true,
    };
    check(case(DType::F16), DType::F16, 1e-2, &dev);
    check(case(DType::BF16), DType::BF16, 1e-2, &dev);
}

/// `rel_pos_gather_grad` (detectron2's decomposed tables: window 14 and global 64, head dim 64)
/// and `rel_pos_bias_grad` (BEiT's table, a 14 x 14 window and 12 heads) on the GPU against the
/// CPU. Relative L2 1e-6 in f32: both sides add the same f32 terms (at most 64, or 196 per
/// table entry for BEiT's) in different orders; bf16 2^-8: both accumulate in f32 and round once.
#[test]
fn relative_position_table_gradients() {
    use vitdet_ir::ops::{RelPosBias, RelPosBiasGrad, RelPosGatherGrad};
    use vitdet_runtime::kernels::attention;
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(11);
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1.0 / 256.0)] {
        for n in [14, 64] {
            let dy = Nd::randn(&[n, n, 64], &mut rng, 1.0, 0.0).tensor_as(dtype);
            let op = RelPosGatherGrad {
                q_size: n,
                k_size: n,
                table_len: 2 * n - 1,
            };
            let cpu = attention::rel_pos_gather_grad(&op, &dy).unwrap();
            let gpu = attention::rel_pos_gather_grad(&op, &dy.to_device(&dev).unwrap()).unwrap();
            assert!(gpu.device().is_cuda());
            let err = rel_l2(&gpu, &cpu);
            assert!(
                err <= tol,
                "rel_pos_gather_grad {n}x{n} {dtype:?}: rel L2 {err:.2e} > {tol:.0e}"
            );
        }
        let window = [14, 14];
        let dy = Nd::randn(&[12, 196, 196], &mut rng, 1.0, 0.0).tensor_as(dtype);
        let op = RelPosBiasGrad { window };
        let cpu = attention::rel_pos_bias_grad(&op, &dy).unwrap();
        let gpu = attention::rel_pos_bias_grad(&op, &dy.to_device(&dev).unwrap()).unwrap();
        assert_eq!(cpu.dims(), [RelPosBias { window }.table_len(), 12]);
        let err = rel_l2(&gpu, &cpu);
        assert!(
            err <= tol,
            "rel_pos_bias_grad {window:?} {dtype:?}: rel L2 {err:.2e} > {tol:.0e}"
        );
    }
}
