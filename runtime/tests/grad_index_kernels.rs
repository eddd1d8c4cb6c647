//! Backward kernels of the attention and detection families (`softmax_grad`,
//! `rel_pos_gather_grad`, `rel_pos_bias_grad`, `roi_align_grad`, `index_select_grad`,
//! `gather_rows_grad`) checked against central finite differences of their forward kernels, and
//! the `drop_path_mask` kernel.
//!
//! Finite-difference check: for a forward `f`, a cotangent `dy` and the backward's `dx`, the
//! directional derivative of `L(x) = <dy, f(x)>` along a random direction `v` must equal
//! `<dx, v>`: `(L(x + h v) - L(x - h v)) / 2h` with `h = 1e-6` in f64. Every op here but softmax
//! is linear in the differentiated input, so the difference quotient is exact up to rounding:
//! rounding in `L` is about `1e-16 * sum |dy f|`, i.e. about `1e-10` times the size of the
//! terms once divided by `2h`. Softmax adds a truncation error of `h^2 / 6` times a third
//! derivative of order 1, about `1e-13`. A relative tolerance of `1e-6` (relative to
//! `sum |dx_i v_i|`, the size of the terms of `<dx, v>`, so a sum that cancels to near zero is
//! still judged on its scale) is therefore loose by orders of magnitude for a correct adjoint,
//! while a wrong index, weight or level changes `<dx, v>` by the size of the terms it touches.

mod common;

use candle_core::{DType, Device, Tensor};
use common::TestRng;
use vitdet_ir::ops::{
    DropPathMask, GatherRows, GatherRowsGrad, IndexSelect, IndexSelectGrad, RelPosBias, RelPosBiasGrad, RelPosGather,
    RelPosGatherGrad, RoiAlign, RoiAlignGrad, Softmax, SoftmaxGrad,
};
use vitdet_ir::{Op, OpRule, TensorType};
use vitdet_runtime::kernels;

/// Central-difference step (f64).
const H: f64 = 1e-6;
/// Relative tolerance of the finite-difference check (see the module comment).
const TOL: f64 = 1e-6;

fn exec(op: impl Into<Op>, inputs: &[Tensor]) -> Vec<Tensor> {
    let op = op.into();
    kernels::execute(&op, inputs).unwrap_or_else(|e| panic!("{}: {e}", op.name()))
}

fn exec1(op: impl Into<Op>, inputs: &[Tensor]) -> Tensor {
    let mut out = exec(op, inputs);
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn randn(shape: &[usize], rng: &mut TestRng) -> Tensor {
    let n = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    values(a).iter().zip(values(b)).map(|(x, y)| x * y).sum()
}

fn axpy(x: &Tensor, v: &Tensor, h: f64) -> Tensor {
    (x + (v * h).unwrap()).unwrap()
}

/// `(<dx, v>, finite difference, sum |dx_i v_i|)` summed over the inputs `xs` for random
/// directions: `forward` maps the inputs to the op's outputs; `dxs` are the backward's results.
fn fd_terms(
    forward: &dyn Fn(&[Tensor]) -> Vec<Tensor>,
    xs: &[Tensor],
    dys: &[Tensor],
    dxs: &[Tensor],
    rng: &mut TestRng,
) -> Vec<(f64, f64, f64)> {
    assert_eq!(xs.len(), dxs.len());
    let loss = |xs: &[Tensor]| -> f64 {
        let ys = forward(xs);
        assert_eq!(ys.len(), dys.len());
        ys.iter().zip(dys).map(|(y, dy)| dot(dy, y)).sum()
    };
    (0..3)
        .map(|_| {
            let vs: Vec<Tensor> = xs.iter().map(|x| randn(x.dims(), rng)).collect();
            let plus: Vec<Tensor> = xs.iter().zip(&vs).map(|(x, v)| axpy(x, v, H)).collect();
            let minus: Vec<Tensor> = xs.iter().zip(&vs).map(|(x, v)| axpy(x, v, -H)).collect();
            let fd = (loss(&plus) - loss(&minus)) / (2.0 * H);
            let analytic: f64 = dxs.iter().zip(&vs).map(|(d, v)| dot(d, v)).sum();
            let scale: f64 = dxs
                .iter()
                .zip(&vs)
                .map(|(d, v)| values(d).iter().zip(values(v)).map(|(a, b)| (a * b).abs()).sum::<f64>())
                .sum();
            (analytic, fd, scale)
        })
        .collect()
}

/// Asserts the backward `dxs` matches finite differences of `forward` at `xs` for cotangents
/// `dys` (see the module comment for the tolerance).
fn check_vjp(
    what: &str,
    forward: &dyn Fn(&[Tensor]) -> Vec<Tensor>,
    xs: &[Tensor],
    dys: &[Tensor],
    dxs: &[Tensor],
    rng: &mut TestRng,
) {
    for (dx, x) in dxs.iter().zip(xs) {
        assert_eq!(dx.dims(), x.dims(), "{what}: gradient shape");
        assert_eq!(dx.dtype(), x.dtype(), "{what}: gradient dtype");
    }
    for (analytic, fd, scale) in fd_terms(forward, xs, dys, dxs, rng) {
        assert!(scale > 0.0, "{what}: zero gradient, nothing checked");
        assert!(
            (analytic - fd).abs() <= TOL * scale,
            "{what}: <dx, v> = {analytic} but finite differences give {fd} (scale {scale})"
        );
    }
}

// ------------------------------------------------------------------------------- the check

#[test]
fn the_finite_difference_check_rejects_a_slightly_wrong_gradient() {
    // The same check as every test below, on softmax with the gradient scaled by 1 + 1e-4: it
    // must fail, or the tolerance would be too loose to mean anything.
    let mut rng = TestRng::new(1);
    let x = randn(&[3, 6], &mut rng);
    let dy = randn(&[3, 6], &mut rng);
    let sm = Softmax { axis: 1 };
    let y = exec1(sm.clone(), std::slice::from_ref(&x));
    let dx = exec1(SoftmaxGrad { axis: 1 }, &[y, dy.clone()]);
    let forward = |xs: &[Tensor]| exec(sm.clone(), xs);
    let wrong = (&dx * (1.0 + 1e-4)).unwrap();
    for (analytic, fd, scale) in fd_terms(
        &forward,
        std::slice::from_ref(&x),
        std::slice::from_ref(&dy),
        &[wrong],
        &mut rng,
    ) {
        assert!((analytic - fd).abs() > TOL * scale, "{analytic} vs {fd}");
    }
    check_vjp("softmax", &forward, &[x], &[dy], &[dx], &mut rng);
}

// ------------------------------------------------------------------------------- softmax

#[test]
fn softmax_grad_matches_finite_differences_on_every_axis() {
    let mut rng = TestRng::new(2);
    // Last axis of 11 exercises the fused CPU kernel's 8-lane loop and its tail; axes 0 and 1
    // take the candle-op path.
    let shape = [3, 4, 11];
    for axis in 0..3 {
        let x = (randn(&shape, &mut rng) * 2.0).unwrap();
        let dy = randn(&shape, &mut rng);
        let y = exec1(Softmax { axis }, std::slice::from_ref(&x));
        let dx = exec1(SoftmaxGrad { axis }, &[y, dy.clone()]);
        let forward = |xs: &[Tensor]| exec(Softmax { axis }, xs);
        check_vjp(&format!("softmax axis {axis}"), &forward, &[x], &[dy], &[dx], &mut rng);
    }
}

#[test]
fn softmax_grad_in_f32_and_half_types_follows_f64() {
    let mut rng = TestRng::new(3);
    let x = randn(&[5, 19], &mut rng);
    let dy = randn(&[5, 19], &mut rng);
    let y = exec1(Softmax { axis: 1 }, std::slice::from_ref(&x));
    let want = values(&exec1(SoftmaxGrad { axis: 1 }, &[y.clone(), dy.clone()]));
    // Inputs rounded to f32 (2^-24 relative) or bf16 (2^-9): the result moves by about that
    // much relative to the terms y * dy (|y| <= 1, |dy| ~ 3 at most here); bounds 1e-5 and 2e-2.
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        for axis in [0, 1] {
            let yy = exec1(Softmax { axis }, std::slice::from_ref(&x));
            let want = if axis == 1 {
                want.clone()
            } else {
                values(&exec1(SoftmaxGrad { axis }, &[yy.clone(), dy.clone()]))
            };
            let got = exec1(
                SoftmaxGrad { axis },
                &[yy.to_dtype(dtype).unwrap(), dy.to_dtype(dtype).unwrap()],
            );
            assert_eq!(got.dtype(), dtype);
            for (g, w) in values(&got).iter().zip(&want) {
                assert!((g - w).abs() <= tol, "{dtype:?} axis {axis}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn softmax_grad_rejects_mismatched_inputs() {
    let y = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
    let dy = Tensor::zeros((3, 2), DType::F64, &Device::Cpu).unwrap();
    let err = kernels::execute(&SoftmaxGrad { axis: 1 }.into(), &[y.clone(), dy]).unwrap_err();
    assert!(err.to_string().contains("one shape and dtype"), "{err}");
    let err = kernels::execute(&SoftmaxGrad { axis: 2 }.into(), &[y.clone(), y.clone()]).unwrap_err();
    assert!(err.to_string().contains("axis 2 out of range"), "{err}");
    let rule = SoftmaxGrad { axis: 0 };
    let (a, b) = (TensorType::f32([2, 3]), TensorType::f32([2, 4]));
    assert!(rule.infer(&[&a, &b]).unwrap_err().contains("one shape"));
    assert_eq!(rule.infer(&[&a, &a]).unwrap(), vec![a.clone()]);
}

// ------------------------------------------------------------------------------- relative positions

#[test]
fn rel_pos_gather_grad_matches_finite_differences_with_and_without_resizing() {
    let mut rng = TestRng::new(4);
    // (q, k, table_len): the table fits (L = 2 max(q, k) - 1) with q = k and with q != k in both
    // directions; the table is upsampled (5 -> 7) and downsampled (13 -> 9, 11 -> 9).
    for (q, k, l) in [(4, 4, 7), (3, 5, 9), (5, 2, 9), (4, 4, 5), (3, 5, 13), (5, 3, 11)] {
        let c = 3;
        let table = randn(&[l, c], &mut rng);
        let dy = randn(&[q, k, c], &mut rng);
        let op = RelPosGatherGrad {
            q_size: q,
            k_size: k,
            table_len: l,
        };
        let dtable = exec1(op, std::slice::from_ref(&dy));
        let forward = |xs: &[Tensor]| exec(RelPosGather { q_size: q, k_size: k }, xs);
        check_vjp(
            &format!("rel_pos_gather q={q} k={k} L={l}"),
            &forward,
            &[table],
            &[dy],
            &[dtable],
            &mut rng,
        );
    }
}

#[test]
fn rel_pos_gather_grad_checks_its_gradient_shape() {
    let op = RelPosGatherGrad {
        q_size: 4,
        k_size: 4,
        table_len: 7,
    };
    let dy = Tensor::zeros((4, 3, 2), DType::F32, &Device::Cpu).unwrap();
    let err = kernels::execute(&op.clone().into(), &[dy]).unwrap_err();
    assert!(err.to_string().contains("must be [4, 4, C]"), "{err}");
    let t = TensorType::f32([4, 4, 2]);
    assert_eq!(op.infer(&[&t]).unwrap(), vec![TensorType::f32([7, 2])]);
    assert!(op.infer(&[&TensorType::f32([4, 5, 2])]).is_err());
}

#[test]
fn rel_pos_bias_grad_matches_finite_differences() {
    let mut rng = TestRng::new(5);
    for window in [[2, 3], [3, 3], [1, 4]] {
        let heads = 2;
        let op = RelPosBias { window };
        let n = window[0] * window[1];
        let table = randn(&[op.table_len(), heads], &mut rng);
        let dy = randn(&[heads, n, n], &mut rng);
        let dtable = exec1(RelPosBiasGrad { window }, std::slice::from_ref(&dy));
        let forward = |xs: &[Tensor]| exec(RelPosBias { window }, xs);
        check_vjp(
            &format!("rel_pos_bias {window:?}"),
            &forward,
            &[table],
            &[dy],
            &[dtable],
            &mut rng,
        );
    }
    let dy = Tensor::zeros((2, 6, 5), DType::F32, &Device::Cpu).unwrap();
    let err = kernels::execute(&RelPosBiasGrad { window: [2, 3] }.into(), &[dy]).unwrap_err();
    assert!(err.to_string().contains("does not fit window"), "{err}");
}

// ------------------------------------------------------------------------------- RoIAlign

/// Three levels (strides 4, 8, 16 of a 64 x 48 image) and a canonical box size of 16, so boxes
/// of side ~8, ~16 and ~32 go to levels 0, 1 and 2.
fn roi_op(sampling_ratio: usize, aligned: bool) -> RoiAlign {
    RoiAlign {
        output_size: [3, 2],
        scales: vec![0.25, 0.125, 0.0625],
        sampling_ratio,
        aligned,
        canonical_box_size: 16.0,
        canonical_level: 3,
        min_level: 2,
    }
}

const LEVEL_SHAPES: [[usize; 4]; 3] = [[1, 2, 12, 16], [1, 2, 6, 8], [1, 2, 3, 4]];

/// Boxes (image pixels) over all three levels, several partly or mostly outside the map. Their
/// coordinates are irrational-looking fractions, so no sample point falls exactly on an integer
/// grid position: there bilinear interpolation is not differentiable in the *coordinates*,
/// and both kernels pick one side by the same rule. The gradient checked here is with respect
/// to the features, in which RoIAlign is linear everywhere, so such points would not break the
/// check; avoiding them keeps the test about the adjoint and not about a tie rule.
fn roi_boxes() -> Tensor {
    let b: [[f64; 4]; 7] = [
        [3.31, 5.17, 10.93, 12.41],   // ~7.6 px: level 0
        [-4.37, -3.13, 4.21, 5.87],   // level 0, top-left corner outside the image
        [20.13, 9.71, 37.29, 25.53],  // ~16.6 px: level 1
        [51.77, 38.19, 69.41, 55.03], // level 1, bottom-right outside the image
        [9.07, 6.53, 43.61, 40.29],   // ~34 px: level 2
        [-21.3, 30.7, 13.9, 61.1],    // level 2, left and bottom outside
        [60.9, 44.1, 63.7, 47.3],     // tiny box in the bottom-right corner: level 0
    ];
    Tensor::from_vec(b.concat(), (7, 4), &Device::Cpu).unwrap()
}

#[test]
fn roi_align_grad_matches_finite_differences_over_three_levels() {
    let mut rng = TestRng::new(6);
    let boxes = roi_boxes();
    // Adaptive sampling with aligned boxes (ROIAlignV2, detectron2's default) and a fixed
    // 2 x 2 grid without alignment (ROIAlign, sides clamped to >= 1).
    for (sampling_ratio, aligned) in [(0, true), (2, false)] {
        let roi = roi_op(sampling_ratio, aligned);
        let feats: Vec<Tensor> = LEVEL_SHAPES.iter().map(|s| randn(s, &mut rng)).collect();
        let dy = randn(&[7, 2, 3, 2], &mut rng);
        let op = RoiAlignGrad {
            roi: roi.clone(),
            feature_shapes: LEVEL_SHAPES.to_vec(),
        };
        let dfeats = exec(op, &[boxes.clone(), dy.clone()]);
        assert_eq!(dfeats.len(), 3);
        for (l, d) in dfeats.iter().enumerate() {
            // Every level receives gradient, so the level assignment is exercised.
            assert!(values(d).iter().any(|v| *v != 0.0), "level {l} got no gradient");
        }
        let forward = |xs: &[Tensor]| {
            let mut inputs = xs.to_vec();
            inputs.push(boxes.clone());
            exec(roi.clone(), &inputs)
        };
        check_vjp(
            &format!("roi_align sampling {sampling_ratio} aligned {aligned}"),
            &forward,
            &feats,
            &[dy],
            &dfeats,
            &mut rng,
        );
    }
}

#[test]
fn roi_align_grad_of_a_box_far_outside_is_zero_and_no_boxes_give_zeros() {
    let roi = roi_op(2, true);
    let op = RoiAlignGrad {
        roi: roi.clone(),
        feature_shapes: LEVEL_SHAPES.to_vec(),
    };
    // Every sample lies beyond [-1, W]: the forward reads nothing, so the gradient is zero.
    let far = Tensor::new(&[[300.0f64, 300.0, 308.0, 308.0]], &Device::Cpu).unwrap();
    let dy = Tensor::ones((1, 2, 3, 2), DType::F64, &Device::Cpu).unwrap();
    for d in exec(op.clone(), &[far, dy]) {
        assert!(values(&d).iter().all(|v| *v == 0.0));
    }
    // No boxes (a batch without proposals): forward [0, C, 3, 2] and zero gradients.
    let none = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
    let feats: Vec<Tensor> = LEVEL_SHAPES
        .iter()
        .map(|s| Tensor::ones(s.as_slice(), DType::F32, &Device::Cpu).unwrap())
        .collect();
    let mut inputs = feats.clone();
    inputs.push(none.clone());
    assert_eq!(exec1(roi, &inputs).dims(), [0, 2, 3, 2]);
    let dy = Tensor::zeros((0, 2, 3, 2), DType::F32, &Device::Cpu).unwrap();
    let d = exec(op, &[none, dy]);
    for (d, s) in d.iter().zip(LEVEL_SHAPES) {
        assert_eq!(d.dims(), s);
        assert_eq!(d.dtype(), DType::F32);
        assert!(values(d).iter().all(|v| *v == 0.0));
    }
}

#[test]
fn roi_align_grad_in_f32_follows_f64() {
    let mut rng = TestRng::new(7);
    let op = RoiAlignGrad {
        roi: roi_op(0, true),
        feature_shapes: LEVEL_SHAPES.to_vec(),
    };
    let dy = randn(&[7, 2, 3, 2], &mut rng);
    let want = exec(op.clone(), &[roi_boxes(), dy.clone()]);
    let got = exec(
        op,
        &[
            roi_boxes().to_dtype(DType::F32).unwrap(),
            dy.to_dtype(DType::F32).unwrap(),
        ],
    );
    // f32 rounding of the boxes (~4e-6 px at 64 px) and of the accumulations: a few 1e-7 of
    // gradient entries of order 1; 1e-5 bound.
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.dtype(), DType::F32);
        for (a, b) in values(g).iter().zip(values(w)) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
    }
}

#[test]
fn roi_align_grad_checks_its_inputs() {
    let op = RoiAlignGrad {
        roi: roi_op(0, true),
        feature_shapes: LEVEL_SHAPES.to_vec(),
    };
    let boxes = roi_boxes();
    let dy = Tensor::zeros((7, 2, 2, 2), DType::F64, &Device::Cpu).unwrap();
    let err = kernels::execute(&op.clone().into(), &[boxes.clone(), dy]).unwrap_err();
    assert!(err.to_string().contains("gradient [R, 2, 3, 2]"), "{err}");
    let mut two = op.clone();
    two.feature_shapes.pop();
    let dy = Tensor::zeros((7, 2, 3, 2), DType::F64, &Device::Cpu).unwrap();
    let err = kernels::execute(&two.into(), &[boxes, dy]).unwrap_err();
    assert!(err.to_string().contains("2 feature shapes for 3 scales"), "{err}");
    let (b, g) = (TensorType::f32([7, 4]), TensorType::f32([7, 2, 3, 2]));
    let types = op.infer(&[&b, &g]).unwrap();
    let want: Vec<TensorType> = LEVEL_SHAPES.iter().map(|s| TensorType::f32(s.to_vec())).collect();
    assert_eq!(types, want);
}

// ------------------------------------------------------------------------------- gathers

fn i64s(v: &[i64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

#[test]
fn index_select_grad_accumulates_repeated_indices() {
    let mut rng = TestRng::new(8);
    let idx = [2i64, 0, 2, 1, 2];
    for axis in 0..3 {
        let mut shape = vec![3, 4, 2];
        let x = randn(&shape, &mut rng);
        let size = shape[axis];
        let idx: Vec<i64> = idx.iter().map(|&i| i.min(size as i64 - 1)).collect();
        shape[axis] = idx.len();
        let dy = randn(&shape, &mut rng);
        let dx = exec1(IndexSelectGrad::new(axis, size), &[i64s(&idx), dy.clone()]);
        let forward = |xs: &[Tensor]| exec(IndexSelect::new(axis), &[xs[0].clone(), i64s(&idx)]);
        check_vjp(
            &format!("index_select axis {axis}"),
            &forward,
            &[x],
            &[dy],
            &[dx],
            &mut rng,
        );
    }
    // A plain case by hand: rows 1, 1, 0 of a 3-row gradient.
    let dy = Tensor::new(&[[1.0f32], [2.0], [4.0]], &Device::Cpu).unwrap();
    let dx = exec1(IndexSelectGrad::new(0, 3), &[i64s(&[1, 1, 0]), dy]);
    assert_eq!(dx.to_vec2::<f32>().unwrap(), [[4.0], [3.0], [0.0]]);
}

#[test]
fn index_select_grad_rejects_out_of_range_indices() {
    let dy = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let op = IndexSelectGrad::new(0, 4);
    for bad in [[0i64, 4], [-1, 0]] {
        let err = kernels::execute(&op.clone().into(), &[i64s(&bad), dy.clone()]).unwrap_err();
        assert!(err.to_string().contains("out of range for size 4"), "{err}");
    }
    let err = kernels::execute(&op.clone().into(), &[i64s(&[0, 1, 2]), dy]).unwrap_err();
    assert!(err.to_string().contains("k entries along axis 0"), "{err}");
    let (i, g) = (TensorType::new(vitdet_ir::DType::I64, [2]), TensorType::f32([2, 3]));
    assert_eq!(op.infer(&[&i, &g]).unwrap(), vec![TensorType::f32([4, 3])]);
    assert!(op.infer(&[&i, &TensorType::f32([3, 3])]).is_err());
}

#[test]
fn gather_rows_grad_matches_finite_differences() {
    let mut rng = TestRng::new(9);
    let idx = [3i64, 0, 3];
    let x = randn(&[3, 4, 2, 2], &mut rng);
    let dy = randn(&[3, 2, 2], &mut rng);
    let dx = exec1(GatherRowsGrad::new(4), &[i64s(&idx), dy.clone()]);
    let forward = |xs: &[Tensor]| exec(GatherRows::default(), &[xs[0].clone(), i64s(&idx)]);
    check_vjp(
        "gather_rows",
        &forward,
        &[x],
        std::slice::from_ref(&dy),
        std::slice::from_ref(&dx),
        &mut rng,
    );
    // Only the selected rows are non-zero, and they are dy itself.
    let d = values(&dx);
    for n in 0..3 {
        for m in 0..4 {
            let row = &d[(n * 4 + m) * 4..][..4];
            if m as i64 == idx[n] {
                assert_eq!(row, values(&dy.get(n).unwrap()).as_slice());
            } else {
                assert!(row.iter().all(|v| *v == 0.0));
            }
        }
    }
    let err = kernels::execute(&GatherRowsGrad::new(4).into(), &[i64s(&[0, 4, 1]), dy]).unwrap_err();
    assert!(err.to_string().contains("index 4 (position 1) out of range"), "{err}");
}

// ------------------------------------------------------------------------------- drop path mask

fn mask(rate: f64, stream: u64, batch: usize, seed: i64) -> Vec<f32> {
    let op = DropPathMask { rate, stream, batch };
    exec1(op, &[Tensor::new(&[seed], &Device::Cpu).unwrap()])
        .to_vec1()
        .unwrap()
}

#[test]
fn splitmix64_is_the_reference_generator() {
    // First two outputs of Vigna's splitmix64.c seeded with 0 (the state advances by the
    // golden gamma before each output).
    assert_eq!(vitdet_ir::ops::splitmix64(0), 0xE220_A839_7B1D_CDAF);
    assert_eq!(vitdet_ir::ops::splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
}

#[test]
fn drop_path_mask_is_a_function_of_seed_and_stream() {
    let a = mask(0.5, 3, 64, 12345);
    assert_eq!(a, mask(0.5, 3, 64, 12345), "same seed, same mask");
    assert_ne!(a, mask(0.5, 3, 64, 12346), "another seed");
    assert_ne!(a, mask(0.5, 4, 64, 12345), "another stream");
    // A longer batch extends the mask: entry b depends on (seed, stream, b) only.
    assert_eq!(&mask(0.5, 3, 80, 12345)[..64], a.as_slice());
    // A scalar seed and a [1] seed are the same seed; negative seeds are valid bit patterns.
    let op = DropPathMask {
        rate: 0.5,
        stream: 3,
        batch: 64,
    };
    let scalar = exec1(op.clone(), &[Tensor::new(12345i64, &Device::Cpu).unwrap()]);
    assert_eq!(scalar.to_vec1::<f32>().unwrap(), a);
    assert_eq!(mask(0.5, 0, 16, -7).len(), 16);
    assert_eq!(mask(0.0, 9, 5, 77), [1.0; 5], "rate 0 keeps everything");
}

#[test]
fn drop_path_mask_keeps_one_minus_rate_and_scales_by_its_inverse() {
    let (rate, batch, seeds) = (0.3, 8, 2500);
    let scale = (1.0 / (1.0 - rate)) as f32;
    let mut kept = 0usize;
    let mut per_slot = [0usize; 8];
    for seed in 0..seeds {
        for (b, v) in mask(rate, 1, batch, seed).into_iter().enumerate() {
            assert!(v == 0.0 || v == scale, "entry {v}");
            if v != 0.0 {
                kept += 1;
                per_slot[b] += 1;
            }
        }
    }
    // 20000 Bernoulli(0.7) draws: standard deviation of the kept fraction sqrt(0.21 / 20000)
    // = 0.0032; 5 standard deviations is 0.016. Per slot (2500 draws, sd 0.0092): 0.046.
    let n = (batch * seeds as usize) as f64;
    let frac = kept as f64 / n;
    assert!((frac - (1.0 - rate)).abs() < 0.016, "kept fraction {frac}");
    for (b, &k) in per_slot.iter().enumerate() {
        let f = k as f64 / seeds as f64;
        assert!((f - (1.0 - rate)).abs() < 0.046, "slot {b} kept fraction {f}");
    }
    // Streams are independent: two sites agree on about 0.7^2 + 0.3^2 = 0.58 of the draws.
    let agree = (0..seeds)
        .flat_map(|s| mask(rate, 1, batch, s).into_iter().zip(mask(rate, 2, batch, s)))
        .filter(|(a, b)| a == b)
        .count() as f64
        / n;
    assert!((agree - 0.58).abs() < 0.02, "two streams agree on {agree} of the draws");
}

#[test]
fn drop_path_mask_rejects_bad_seeds_and_rates() {
    let op = |rate| DropPathMask {
        rate,
        stream: 0,
        batch: 2,
    };
    let u32_seed = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    let err = kernels::execute(&op(0.1).into(), &[u32_seed]).unwrap_err();
    assert!(err.to_string().contains("seed must be an i64 scalar"), "{err}");
    let two = Tensor::new(&[1i64, 2], &Device::Cpu).unwrap();
    assert!(kernels::execute(&op(0.1).into(), &[two]).is_err());
    let seed = Tensor::new(&[1i64], &Device::Cpu).unwrap();
    let err = kernels::execute(&op(1.0).into(), &[seed]).unwrap_err();
    assert!(err.to_string().contains("drop rate must be in [0, 1)"), "{err}");
    let i64_scalar = TensorType::new(vitdet_ir::DType::I64, Vec::<usize>::new());
    assert_eq!(op(0.1).infer(&[&i64_scalar]).unwrap(), vec![TensorType::f32([2])]);
    assert!(op(0.1).infer(&[&TensorType::f32([1])]).is_err());
}
