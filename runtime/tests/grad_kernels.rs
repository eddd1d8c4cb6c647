//! Backward kernels of the dense families against central finite differences of the forward
//! kernels (`kernels::execute`), on small random f64 inputs.
//!
//! The check uses the scalar `L(x) = <dy, f(x)>` for a random `dy`: for random directions `v`,
//! `<dx, v>` must equal `(L(x + h v) - L(x - h v)) / 2h` with `h = 1e-6`. Tolerance: relative
//! 1e-6 of `sum |dx_i v_i|` (the size of the terms making up `<dx, v>`). Justification: the
//! truncation error of the central difference is `h^2 / 6 * L'''`, about 1e-13 for these smooth
//! (or piecewise linear, away from kinks) functions of O(1) inputs, and the rounding error is
//! about `2.2e-16 * sum |dy_j f_j| / h`, at most ~1e-8 for the O(100) O(1) terms here; both are
//! far below 1e-6, while a wrong gradient (a missing term, a wrong index) is off by O(1).
//!
//! Piecewise-linear ops (relu, abs, max pooling) are only differentiated away from their kinks:
//! random inputs lie within `h` of a kink or tie with probability ~1e-6.
//!
//! f32 runs of every kernel are compared with the f64 runs: atol = rtol = 1e-5 relative to the
//! largest output magnitude (f32 rounding of O(1) values summed over at most a few hundred terms
//! is ~1e-6 of the scale).

#![allow(clippy::needless_range_loop, clippy::type_complexity)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use vitdet_ir::ops::*;
use vitdet_ir::Op;
use vitdet_runtime::kernels::{self, conv, norm, resize};

const H: f64 = 1e-6;
const FD_RTOL: f64 = 1e-6;
const F32_TOL: f64 = 1e-5;

fn rng(seed: u64) -> TestRng {
    TestRng::new(seed)
}

fn randn(shape: &[usize], r: &mut TestRng) -> Tensor {
    Nd::randn(shape, r, 1.0, 0.0).tensor_as(DType::F64)
}

fn run(op: impl Into<Op>, inputs: &[Tensor]) -> Vec<Tensor> {
    let op = op.into();
    kernels::execute(&op, inputs).unwrap_or_else(|e| panic!("{op:?}: {e}"))
}

fn run1(op: impl Into<Op>, inputs: &[Tensor]) -> Tensor {
    let mut out = run(op, inputs);
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    vals(a).iter().zip(vals(b)).map(|(x, y)| x * y).sum()
}

/// `<dy, f(inputs)[out]>` for the forward op `f`.
fn loss(op: &Op, inputs: &[Tensor], out: usize, dy: &Tensor) -> f64 {
    let y = kernels::execute(op, inputs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    dot(dy, &y[out])
}

/// Checks `grad` (the gradient of `<dy, f(inputs)[out]>` with respect to `inputs[wrt]`) in three
/// random directions against central differences (see the module doc for the tolerance).
fn fd_check(what: &str, op: impl Into<Op>, inputs: &[Tensor], out: usize, dy: &Tensor, wrt: usize, grad: &Tensor) {
    let op = op.into();
    assert_eq!(grad.dims(), inputs[wrt].dims(), "{what}: gradient shape");
    let mut r = rng(0xfd + wrt as u64);
    for k in 0..3 {
        let v = randn(inputs[wrt].dims(), &mut r);
        let at = |s: f64| -> f64 {
            let mut xs = inputs.to_vec();
            xs[wrt] = (&inputs[wrt] + (&v * s).unwrap()).unwrap();
            loss(&op, &xs, out, dy)
        };
        let fd = (at(H) - at(-H)) / (2.0 * H);
        let an = dot(grad, &v);
        let scale: f64 = vals(grad).iter().zip(vals(&v)).map(|(g, v)| (g * v).abs()).sum();
        assert!(
            (fd - an).abs() <= FD_RTOL * scale + 1e-12,
            "{what} (input {wrt}, direction {k}): analytic {an} vs finite difference {fd} (scale {scale:e})"
        );
    }
}

/// Runs `op` on the inputs rounded to f32 and compares every output with the f64 run.
fn agrees_in_f32(what: &str, op: impl Into<Op>, inputs: &[Tensor]) {
    let op = op.into();
    let want = run(op.clone(), inputs);
    let got = run(
        op,
        &inputs
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect::<Vec<_>>(),
    );
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.dtype(), DType::F32, "{what}: output {i} dtype");
        let (g, w) = (Nd::from_tensor(g), Nd::from_tensor(w));
        let scale = w.data.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        assert_close(&g, &w, F32_TOL * scale, F32_TOL, &format!("{what}: f32 output {i}"));
    }
}

/// Two runs that must agree to f64 rounding (different summation orders): 1e-12 of the scale.
fn same(what: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (Nd::from_tensor(g), Nd::from_tensor(w));
        let scale = w.data.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        assert_close(&g, &w, 1e-12 * scale, 1e-12, &format!("{what}: output {i}"));
    }
}

// ------------------------------------------------------------------------------ reduce_sum

#[test]
fn reduce_sum_hand_values() {
    let x = Tensor::new(&[[1f64, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
    let sum = |axes: &[usize], keepdim: bool| {
        run1(
            ReduceSum {
                axes: axes.to_vec(),
                keepdim,
            },
            std::slice::from_ref(&x),
        )
    };
    let y = sum(&[0], false);
    assert_eq!((y.dims(), vals(&y)), (&[3][..], vec![5., 7., 9.]));
    let y = sum(&[1], true);
    assert_eq!((y.dims(), vals(&y)), (&[2, 1][..], vec![6., 15.]));
    let y = sum(&[0, 1], false);
    assert_eq!((y.dims(), vals(&y)), (&[][..], vec![21.]));
    let y = sum(&[0, 1], true);
    assert_eq!((y.dims(), vals(&y)), (&[1, 1][..], vec![21.]));
    let y = sum(&[], false);
    assert_eq!((y.dims(), vals(&y)), (&[2, 3][..], vec![1., 2., 3., 4., 5., 6.]));
    // The output type agrees with the IR's type rule.
    let t = vitdet_ir::TensorType::new(vitdet_ir::DType::F64, [2, 3]);
    let rule = ReduceSum {
        axes: vec![1],
        keepdim: false,
    };
    assert_eq!(rule.infer(&[&t]).unwrap()[0].shape, [2]);
}

/// The CPU kernel's two forms (and shapes that fall back to candle) against a sum in f64 of
/// the same f32 values, per element within 1e-6 of the sum of magnitudes: f32 accumulation
/// over up to 6,000 terms of one sign or the other, in eight partial sums, stays within a few
/// 1e-7 of that; a wrong index or a dropped term is off by O(1).
#[test]
fn reduce_sum_matches_an_f64_sum_on_every_form() {
    use vitdet_runtime::kernels::reduce::SumForm;
    let mut rng = TestRng::new(11);
    let cases: [(&[usize], &[usize], Option<SumForm>); 9] = [
        // A conv bias gradient: [N, C, H, W] over N, H, W.
        (
            &[3, 5, 40, 50],
            &[0, 2, 3],
            Some(SumForm::Inner {
                outer: 3,
                kept: 5,
                inner: 2000,
            }),
        ),
        // A linear bias gradient: [B, M, N] over B, M (130 columns: two full blocks of 64 and a tail).
        (&[2, 47, 130], &[0, 1], Some(SumForm::Leading { rows: 94, kept: 130 })),
        // Trailing axes, with a size-1 axis between them.
        (
            &[6, 1, 33],
            &[1, 2],
            Some(SumForm::Inner {
                outer: 1,
                kept: 6,
                inner: 33,
            }),
        ),
        // Everything; and only size-1 axes (the input itself).
        (
            &[7, 9],
            &[0, 1],
            Some(SumForm::Inner {
                outer: 1,
                kept: 1,
                inner: 63,
            }),
        ),
        (
            &[4, 1, 3],
            &[1],
            Some(SumForm::Inner {
                outer: 1,
                kept: 12,
                inner: 1,
            }),
        ),
        // Runs that are short of eight, and an empty axis.
        (
            &[5, 3],
            &[1],
            Some(SumForm::Inner {
                outer: 1,
                kept: 5,
                inner: 3,
            }),
        ),
        (
            &[4, 6, 0],
            &[2],
            Some(SumForm::Inner {
                outer: 1,
                kept: 24,
                inner: 0,
            }),
        ),
        // Kept, summed, kept, summed: candle's path.
        (&[3, 4, 5, 6], &[1, 3], None),
        (&[3, 4, 5], &[1], None),
    ];
    for (dims, axes, form) in cases {
        let what = format!("{dims:?} over {axes:?}");
        assert_eq!(SumForm::of(dims, axes), form, "{what}: form");
        let x = Nd::randn(dims, &mut rng, 1.0, 0.0).tensor_as(DType::F32);
        for keepdim in [false, true] {
            let op = ReduceSum {
                axes: axes.to_vec(),
                keepdim,
            };
            let got = run1(op.clone(), std::slice::from_ref(&x));
            assert_eq!(got.dtype(), DType::F32, "{what}");
            let x64 = x.to_dtype(DType::F64).unwrap();
            let want = x64.sum_keepdim(axes.to_vec()).unwrap();
            let scale = x64.abs().unwrap().sum_keepdim(axes.to_vec()).unwrap();
            let shape = op
                .infer(&[&vitdet_ir::TensorType::new(vitdet_ir::DType::F32, dims.to_vec())])
                .unwrap();
            assert_eq!(got.dims(), shape[0].shape.as_slice(), "{what} keepdim {keepdim}: shape");
            for ((g, w), m) in vals(&got).iter().zip(vals(&want)).zip(vals(&scale)) {
                assert!(
                    (g - w).abs() <= 1e-6 * m.max(1.0),
                    "{what}: {g} vs {w} (magnitudes {m})"
                );
            }
        }
    }
}

#[test]
fn reduce_sum_half_types_accumulate_in_f32() {
    // 4096 ones: an f16 running sum would stop at 2048 (2049 is not representable); f32
    // accumulation gives 4096, which f16 and bf16 represent exactly.
    for dtype in [DType::F16, DType::BF16] {
        let x = Tensor::ones((2, 4096), dtype, &Device::Cpu).unwrap();
        let y = run1(
            ReduceSum {
                axes: vec![1],
                keepdim: false,
            },
            &[x],
        );
        assert_eq!(y.dtype(), dtype);
        assert_eq!(vals(&y), vec![4096.0, 4096.0], "{dtype:?}");
    }
}

#[test]
fn reduce_sum_rejects_bad_axes() {
    let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    for axes in [vec![2], vec![1, 0], vec![1, 1]] {
        let op: Op = ReduceSum { axes, keepdim: false }.into();
        let err = kernels::execute(&op, std::slice::from_ref(&x)).unwrap_err().to_string();
        assert!(err.contains("reduce_sum"), "{err}");
    }
    let ints = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
    let op: Op = ReduceSum {
        axes: vec![0],
        keepdim: false,
    }
    .into();
    assert!(kernels::execute(&op, &[ints]).is_err());
}

// ------------------------------------------------------------------------------ unary_grad

const KINDS: [UnaryKind; 9] = [
    UnaryKind::Gelu,
    UnaryKind::Relu,
    UnaryKind::Sigmoid,
    UnaryKind::Exp,
    UnaryKind::Log,
    UnaryKind::Neg,
    UnaryKind::Sqrt,
    UnaryKind::Tanh,
    UnaryKind::Abs,
];

#[test]
fn unary_grad_matches_finite_differences_elementwise() {
    let mut r = rng(1);
    let x0 = Nd::randn(&[4, 25], &mut r, 2.0, 0.0);
    let dy = randn(&[4, 25], &mut r);
    for kind in KINDS {
        // log and sqrt on positive inputs.
        let x = match kind {
            UnaryKind::Log | UnaryKind::Sqrt => x0.tensor_as(DType::F64).abs().unwrap().affine(1.0, 0.1).unwrap(),
            _ => x0.tensor_as(DType::F64),
        };
        let dx = vals(&run1(UnaryGrad { kind }, &[x.clone(), dy.clone()]));
        // The Jacobian is diagonal: one perturbation of every element gives every column.
        let f = |s: f64| vals(&run1(Unary { kind }, &[x.affine(1.0, s).unwrap()]));
        let (fp, fm) = (f(H), f(-H));
        let dyv = vals(&dy);
        for i in 0..dx.len() {
            let fd = dyv[i] * (fp[i] - fm[i]) / (2.0 * H);
            // Per element: 1e-6 of |dx| + |dy| (the FD error is ~1e-9 |dy| max(|f|, 1) here).
            assert!(
                (dx[i] - fd).abs() <= FD_RTOL * (dx[i].abs() + dyv[i].abs()),
                "{kind:?} at x = {}: analytic {} vs finite difference {fd}",
                vals(&x)[i],
                dx[i]
            );
        }
        agrees_in_f32(&format!("unary_grad {kind:?}"), UnaryGrad { kind }, &[x, dy.clone()]);
    }
}

#[test]
fn unary_grad_special_points() {
    let nan = f64::NAN;
    let x = Tensor::new(&[0f64, -1., 2., nan], &Device::Cpu).unwrap();
    let dy = Tensor::new(&[3f64, 3., 3., 3.], &Device::Cpu).unwrap();
    let g = |kind| vals(&run1(UnaryGrad { kind }, &[x.clone(), dy.clone()]));
    // relu: threshold_backward zeroes x <= 0 and passes NaN inputs through (as PyTorch).
    assert_eq!(g(UnaryKind::Relu), vec![0., 0., 3., 3.]);
    // abs: sign(0) = 0, and 0 for NaN (PyTorch's CPU sgn).
    assert_eq!(g(UnaryKind::Abs), vec![0., -3., 3., 0.]);
    assert_eq!(g(UnaryKind::Neg), vec![-3.; 4]);
    // GELU'(0) = Phi(0) = 1/2.
    assert_eq!(g(UnaryKind::Gelu)[0], 1.5);
    // Half types compute in f32 and round.
    let xh = Tensor::new(&[1.5f32, -0.5], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let dyh = Tensor::ones(2, DType::BF16, &Device::Cpu).unwrap();
    let gh = run1(UnaryGrad { kind: UnaryKind::Tanh }, &[xh, dyh]);
    assert_eq!(gh.dtype(), DType::BF16);
    let want: Vec<f64> = [1.5f64, -0.5].iter().map(|v| 1.0 - v.tanh().powi(2)).collect();
    for (a, b) in vals(&gh).iter().zip(want) {
        // bf16 keeps 8 significant bits: relative rounding error <= 2^-8.
        assert!((a - b).abs() <= b.abs() / 256.0, "bf16 tanh' {a} vs {b}");
    }
    // Mismatched gradient shapes are an error, not a panic.
    let op: Op = UnaryGrad { kind: UnaryKind::Exp }.into();
    let short = Tensor::ones(3, DType::F64, &Device::Cpu).unwrap();
    assert!(kernels::execute(&op, &[x, short]).is_err());
}

// ------------------------------------------------------------------------------ norms

#[test]
fn layer_norm_grad_matches_finite_differences() {
    let mut r = rng(2);
    // Token layout (last axis) and detectron2's channel LayerNorm (axis 1 of NCHW).
    // 20 x 30 = 600 positions per channel: more than one 512-position tile of the fused loop.
    for (shape, axis) in [
        (vec![2, 3, 8], 2),
        (vec![2, 6, 3, 4], 1),
        (vec![5, 7], 0),
        (vec![1, 3, 20, 30], 1),
    ] {
        let c = shape[axis];
        let x = Nd::randn(&shape, &mut r, 2.0, 0.5).tensor_as(DType::F64);
        let w = randn(&[c], &mut r);
        let b = randn(&[c], &mut r);
        let dy = randn(&shape, &mut r);
        let eps = 1e-6;
        let grads = run(LayerNormGrad { axis, eps }, &[x.clone(), w.clone(), dy.clone()]);
        assert_eq!(grads.len(), 3);
        let fwd = LayerNorm { axis, eps };
        let ins = [x.clone(), w.clone(), b];
        for (wrt, g) in grads.iter().enumerate() {
            fd_check(
                &format!("layer_norm {shape:?} axis {axis}"),
                fwd.clone(),
                &ins,
                0,
                &dy,
                wrt,
                g,
            );
        }
        let op = LayerNormGrad { axis, eps };
        same(
            "layer_norm_grad portable vs fused",
            &norm::layer_norm_grad_portable(&op, &x, &w, &dy).unwrap(),
            &grads,
        );
        agrees_in_f32("layer_norm_grad", op, &[x, w, dy]);
    }
}

#[test]
fn group_norm_grad_matches_finite_differences() {
    let mut r = rng(3);
    for (shape, groups) in [
        (vec![2, 6, 3, 3], 3),
        (vec![2, 6, 3, 3], 1),
        (vec![1, 4, 5, 2], 4),
        (vec![3, 4, 5], 2),
    ] {
        let c = shape[1];
        let x = Nd::randn(&shape, &mut r, 1.5, -0.3).tensor_as(DType::F64);
        let w = randn(&[c], &mut r);
        let b = randn(&[c], &mut r);
        let dy = randn(&shape, &mut r);
        let eps = 1e-5;
        let op = GroupNormGrad { groups, eps };
        let grads = run(op.clone(), &[x.clone(), w.clone(), dy.clone()]);
        let ins = [x.clone(), w.clone(), b];
        for (wrt, g) in grads.iter().enumerate() {
            fd_check(
                &format!("group_norm {shape:?} groups {groups}"),
                GroupNorm { groups, eps },
                &ins,
                0,
                &dy,
                wrt,
                g,
            );
        }
        same(
            "group_norm_grad portable vs fused",
            &norm::group_norm_grad_portable(&op, &x, &w, &dy).unwrap(),
            &grads,
        );
        agrees_in_f32("group_norm_grad", op, &[x, w, dy]);
    }
}

#[test]
fn batch_norm_train_hand_values() {
    // Channel 0 holds {1, 2, 3, 4}: mean 2.5, biased variance 1.25, unbiased 5/3.
    // Channel 1 holds {0, 0, 2, 2}: mean 1, biased variance 1, unbiased 4/3.
    let x = Tensor::new(&[[[[1f64, 2.]], [[0., 0.]]], [[[3., 4.]], [[2., 2.]]]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[2f64, 1.], &Device::Cpu).unwrap();
    let b = Tensor::new(&[1f64, -1.], &Device::Cpu).unwrap();
    let rm = Tensor::new(&[0f64, 10.], &Device::Cpu).unwrap();
    let rv = Tensor::new(&[1f64, 2.], &Device::Cpu).unwrap();
    let op = BatchNormTrain {
        eps: 0.0,
        momentum: 0.1,
    };
    let out = run(op, &[x, w, b, rm, rv]);
    assert_eq!(out.len(), 3);
    let s = 2.0 / 1.25f64.sqrt();
    let want_y = [
        (1.0 - 2.5) * s + 1.0,
        (2.0 - 2.5) * s + 1.0,
        -2.0,
        -2.0,
        (3.0 - 2.5) * s + 1.0,
        (4.0 - 2.5) * s + 1.0,
        0.0,
        0.0,
    ];
    for (a, b) in vals(&out[0]).iter().zip(want_y) {
        assert!((a - b).abs() < 1e-14, "y {a} vs {b}");
    }
    // new = 0.9 old + 0.1 batch.
    let want_rm = [0.25, 9.0 + 0.1];
    let want_rv = [0.9 + 0.1 * 5.0 / 3.0, 1.8 + 0.1 * 4.0 / 3.0];
    for (a, b) in vals(&out[1])
        .iter()
        .zip(want_rm)
        .chain(vals(&out[2]).iter().zip(want_rv))
    {
        assert!((a - b).abs() < 1e-14, "running statistic {a} vs {b}");
    }
    // One value per channel has no batch variance: an error, as in PyTorch.
    let one = Tensor::zeros((1, 2, 1, 1), DType::F64, &Device::Cpu).unwrap();
    let v = Tensor::ones(2, DType::F64, &Device::Cpu).unwrap();
    let op: Op = BatchNormTrain {
        eps: 1e-5,
        momentum: 0.1,
    }
    .into();
    let err = kernels::execute(&op, &[one, v.clone(), v.clone(), v.clone(), v])
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than 1 value"), "{err}");
}

#[test]
fn batch_norm_train_grad_matches_finite_differences() {
    let mut r = rng(4);
    for shape in [vec![2, 3, 4, 5], vec![4, 2], vec![3, 2, 5]] {
        let c = shape[1];
        let x = Nd::randn(&shape, &mut r, 1.5, 0.7).tensor_as(DType::F64);
        let w = randn(&[c], &mut r);
        let b = randn(&[c], &mut r);
        let rm = randn(&[c], &mut r);
        let rv = randn(&[c], &mut r).abs().unwrap();
        let dy = randn(&shape, &mut r);
        let eps = 1e-5;
        let op = BatchNormTrainGrad { eps };
        let grads = run(op.clone(), &[x.clone(), w.clone(), dy.clone()]);
        let fwd = BatchNormTrain { eps, momentum: 0.1 };
        let ins = [x.clone(), w.clone(), b, rm, rv];
        for (wrt, g) in grads.iter().enumerate() {
            fd_check(
                &format!("batch_norm_train {shape:?}"),
                fwd.clone(),
                &ins,
                0,
                &dy,
                wrt,
                g,
            );
        }
        same(
            "batch_norm_train_grad portable vs fused",
            &norm::batch_norm_train_grad_portable(&op, &x, &w, &dy).unwrap(),
            &grads,
        );
        agrees_in_f32("batch_norm_train_grad", op, &[x.clone(), w.clone(), dy]);
        agrees_in_f32("batch_norm_train", fwd, &ins);
    }
}

#[test]
fn norm_grads_reject_mismatched_inputs() {
    let x = Tensor::zeros((2, 4, 3), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let dy = Tensor::zeros((2, 4, 2), DType::F32, &Device::Cpu).unwrap();
    let ops: [Op; 3] = [
        LayerNormGrad { axis: 1, eps: 1e-5 }.into(),
        GroupNormGrad { groups: 2, eps: 1e-5 }.into(),
        BatchNormTrainGrad { eps: 1e-5 }.into(),
    ];
    for op in ops {
        let err = kernels::execute(&op, &[x.clone(), w.clone(), dy.clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gradient"), "{}: {err}", op.name());
    }
    let op: Op = GroupNormGrad { groups: 3, eps: 1e-5 }.into();
    assert!(kernels::execute(&op, &[x.clone(), w, x]).is_err());
}

// ------------------------------------------------------------------------------ convolutions

struct ConvCase {
    name: &'static str,
    n: usize,
    cin: usize,
    cout: usize,
    hw: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
}

fn conv_cases() -> Vec<ConvCase> {
    let c = |name, n, cin, cout, hw, kernel, stride, padding, dilation, groups| ConvCase {
        name,
        n,
        cin,
        cout,
        hw,
        kernel,
        stride,
        padding,
        dilation,
        groups,
    };
    vec![
        c("3x3 s1 p1", 2, 3, 4, [5, 6], [3, 3], [1, 1], [1, 1], [1, 1], 1),
        // (8 + 2 - 3) % 2 = 1: the last input row and column are never read.
        c("3x3 s2 p1", 2, 3, 2, [8, 7], [3, 3], [2, 2], [1, 1], [1, 1], 1),
        c("2x2 s2", 1, 4, 3, [6, 6], [2, 2], [2, 2], [0, 0], [1, 1], 1),
        c("2x2 s2, odd size", 2, 2, 3, [5, 7], [2, 2], [2, 2], [0, 0], [1, 1], 1),
        c("1x1", 2, 5, 3, [3, 4], [1, 1], [1, 1], [0, 0], [1, 1], 1),
        c("1x1 s2", 1, 3, 2, [5, 5], [1, 1], [2, 2], [0, 0], [1, 1], 1),
        c("3x3 dilation 2", 1, 2, 3, [7, 6], [3, 3], [1, 1], [2, 2], [2, 2], 1),
        c("asymmetric", 2, 2, 2, [7, 8], [3, 2], [2, 1], [1, 0], [1, 2], 1),
        c(
            "16x16 patch s16",
            1,
            3,
            2,
            [32, 16],
            [16, 16],
            [16, 16],
            [0, 0],
            [1, 1],
            1,
        ),
    ]
}

fn conv_op(c: &ConvCase, groups: usize) -> Conv2d {
    Conv2d {
        stride: c.stride,
        padding: c.padding,
        dilation: c.dilation,
        groups,
    }
}

fn grad_weight_op(c: &ConvCase, groups: usize) -> Conv2dGradWeight {
    Conv2dGradWeight {
        stride: c.stride,
        padding: c.padding,
        dilation: c.dilation,
        groups,
        kernel: c.kernel,
    }
}

#[test]
fn conv2d_grad_weight_matches_finite_differences() {
    let mut r = rng(5);
    let mut cases = conv_cases();
    cases.push(ConvCase {
        name: "3x3 s2 groups 2",
        n: 2,
        cin: 4,
        cout: 6,
        hw: [7, 6],
        kernel: [3, 3],
        stride: [2, 2],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 2,
    });
    for c in &cases {
        let g = c.groups;
        let x = randn(&[c.n, c.cin, c.hw[0], c.hw[1]], &mut r);
        let w = randn(&[c.cout, c.cin / g, c.kernel[0], c.kernel[1]], &mut r);
        let y = run1(conv_op(c, g), &[x.clone(), w.clone()]);
        let dy = randn(y.dims(), &mut r);
        let op = grad_weight_op(c, g);
        let dw = run1(op.clone(), &[x.clone(), dy.clone()]);
        fd_check(c.name, conv_op(c, g), &[x.clone(), w], 0, &dy, 1, &dw);
        same(
            &format!("{}: portable vs im2col", c.name),
            &[conv::conv2d_grad_weight_portable(&op, &x, &dy).unwrap()],
            &[dw],
        );
        agrees_in_f32(c.name, op, &[x, dy]);
    }
}

#[test]
fn conv2d_grad_weight_tiles_large_inputs() {
    // 64 channels x 3x3 taps x (64 x 128) outputs in f64 is 38 MB of columns: more than one
    // 32 MB im2col tile, so the row tiles are summed.
    let mut r = rng(6);
    let x = randn(&[1, 64, 64, 128], &mut r);
    let dy = randn(&[1, 2, 64, 128], &mut r);
    let op = Conv2dGradWeight {
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
        kernel: [3, 3],
    };
    let dw = run1(op.clone(), &[x.clone(), dy.clone()]);
    // Sums of 8192 products of O(1) terms: f64 rounding ~1e-12 of the scale.
    let scale = vals(&dw).iter().fold(0f64, |m, v| m.max(v.abs()));
    let portable = conv::conv2d_grad_weight_portable(&op, &x, &dy).unwrap();
    assert_close(
        &Nd::from_tensor(&portable),
        &Nd::from_tensor(&dw),
        1e-11 * scale,
        0.0,
        "tiled dw",
    );
}

/// The `output_padding` that makes `conv_transpose2d` of the conv output restore `size`.
fn restore_padding(c: &ConvCase, out: [usize; 2]) -> [usize; 2] {
    [0, 1].map(|d| {
        let covered = (out[d] - 1) * c.stride[d] + c.dilation[d] * (c.kernel[d] - 1) + 1;
        c.hw[d] + 2 * c.padding[d] - covered
    })
}

#[test]
fn conv2d_input_grad_is_conv_transpose2d() {
    let mut r = rng(7);
    for c in &conv_cases() {
        let x = randn(&[c.n, c.cin, c.hw[0], c.hw[1]], &mut r);
        let w = randn(&[c.cout, c.cin, c.kernel[0], c.kernel[1]], &mut r);
        let y = run1(conv_op(c, 1), &[x.clone(), w.clone()]);
        let dy = randn(y.dims(), &mut r);
        let out = [y.dims()[2], y.dims()[3]];
        let deconv = ConvTranspose2d {
            stride: c.stride,
            padding: c.padding,
            output_padding: restore_padding(c, out),
            dilation: c.dilation,
        };
        let dx = run1(deconv, &[dy.clone(), w.clone()]);
        fd_check(c.name, conv_op(c, 1), &[x, w], 0, &dy, 0, &dx);
    }
}

#[test]
fn conv_transpose2d_grads_are_conv2d_and_grad_weight() {
    let mut r = rng(8);
    // (name, n, cin, cout, hw, kernel, stride, padding, output_padding, dilation)
    let cases: [(
        &str,
        usize,
        usize,
        usize,
        [usize; 2],
        [usize; 2],
        [usize; 2],
        [usize; 2],
        [usize; 2],
        [usize; 2],
    ); 6] = [
        (
            "2x2 s2 (pyramid deconv)",
            2,
            3,
            2,
            [4, 5],
            [2, 2],
            [2, 2],
            [0, 0],
            [0, 0],
            [1, 1],
        ),
        ("3x3 s2 p1 op1", 1, 2, 3, [4, 3], [3, 3], [2, 2], [1, 1], [1, 1], [1, 1]),
        ("3x3 s1 p1", 2, 2, 2, [5, 4], [3, 3], [1, 1], [1, 1], [0, 0], [1, 1]),
        ("4x4 s2 p1", 1, 3, 2, [3, 4], [4, 4], [2, 2], [1, 1], [0, 0], [1, 1]),
        ("1x1", 2, 4, 3, [3, 3], [1, 1], [1, 1], [0, 0], [0, 0], [1, 1]),
        ("asymmetric", 1, 2, 2, [3, 4], [3, 2], [2, 1], [1, 0], [1, 0], [2, 1]),
    ];
    for (name, n, cin, cout, hw, kernel, stride, padding, output_padding, dilation) in cases {
        let x = randn(&[n, cin, hw[0], hw[1]], &mut r);
        let w = randn(&[cin, cout, kernel[0], kernel[1]], &mut r);
        let fwd = ConvTranspose2d {
            stride,
            padding,
            output_padding,
            dilation,
        };
        let y = run1(fwd.clone(), &[x.clone(), w.clone()]);
        let dy = randn(y.dims(), &mut r);
        // Input gradient: conv2d of dy with the same weight ([Cin, Cout] read as [O, C]).
        let conv = Conv2d {
            stride,
            padding,
            dilation,
            groups: 1,
        };
        let dx = run1(conv, &[dy.clone(), w.clone()]);
        fd_check(name, fwd.clone(), &[x.clone(), w.clone()], 0, &dy, 0, &dx);
        // Weight gradient: the conv2d weight gradient with the roles swapped.
        let gw = Conv2dGradWeight {
            stride,
            padding,
            dilation,
            groups: 1,
            kernel,
        };
        let dw = run1(gw, &[dy.clone(), x.clone()]);
        fd_check(name, fwd, &[x, w], 0, &dy, 1, &dw);
    }
}

#[test]
fn conv2d_grad_weight_rejects_wrong_gradient_size() {
    let x = Tensor::zeros((1, 2, 5, 5), DType::F32, &Device::Cpu).unwrap();
    let dy = Tensor::zeros((1, 3, 4, 5), DType::F32, &Device::Cpu).unwrap();
    let op: Op = Conv2dGradWeight {
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
        kernel: [3, 3],
    }
    .into();
    let err = kernels::execute(&op, &[x, dy]).unwrap_err().to_string();
    assert!(err.contains("output size"), "{err}");
}

// ------------------------------------------------------------------------------ max pooling

#[test]
fn max_pool2d_grad_matches_finite_differences() {
    let mut r = rng(9);
    for (kernel, stride, padding) in [
        ([3, 3], [2, 2], [1, 1]),
        ([2, 2], [2, 2], [0, 0]),
        ([1, 1], [2, 2], [0, 0]),
        ([3, 3], [1, 1], [1, 1]),
        ([3, 2], [2, 1], [1, 0]),
    ] {
        let x = randn(&[2, 3, 7, 6], &mut r);
        let fwd = MaxPool2d {
            kernel,
            stride,
            padding,
        };
        let y = run1(fwd.clone(), std::slice::from_ref(&x));
        let dy = randn(y.dims(), &mut r);
        let op = MaxPool2dGrad {
            kernel,
            stride,
            padding,
        };
        let dx = run1(op.clone(), &[x.clone(), dy.clone()]);
        let what = format!("max_pool2d k{kernel:?} s{stride:?} p{padding:?}");
        fd_check(&what, fwd, std::slice::from_ref(&x), 0, &dy, 0, &dx);
        // Each window routes its whole gradient: the totals agree.
        let (sx, sy): (f64, f64) = (vals(&dx).iter().sum(), vals(&dy).iter().sum());
        assert!(
            (sx - sy).abs() < 1e-12 * vals(&dy).iter().map(|v| v.abs()).sum::<f64>(),
            "{what}"
        );
        agrees_in_f32(&what, op, &[x, dy]);
    }
}

#[test]
fn max_pool2d_grad_follows_pytorch_picks() {
    // Expected gradients as PyTorch 2.x computes them on the CPU (`F.max_pool2d` backward).
    let t = |rows: &[[f64; 4]; 2]| Tensor::new(&[[*rows]], &Device::Cpu).unwrap();
    let grad = |x: &Tensor, op: MaxPool2dGrad| {
        let y = run1(
            MaxPool2d {
                kernel: op.kernel,
                stride: op.stride,
                padding: op.padding,
            },
            std::slice::from_ref(x),
        );
        let dy = Tensor::ones(y.dims(), DType::F64, &Device::Cpu).unwrap();
        vals(&run1(op, &[x.clone(), dy]))
    };
    let whole = MaxPool2dGrad {
        kernel: [2, 4],
        stride: [1, 1],
        padding: [0, 0],
    };
    // Ties: the first maximum in row-major order.
    let x = t(&[[1., 5., 5., 2.], [5., 2., 0., 5.]]);
    assert_eq!(grad(&x, whole.clone()), vec![0., 1., 0., 0., 0., 0., 0., 0.]);
    // NaN: every NaN replaces the pick, so the last one wins.
    let nan = f64::NAN;
    let x = t(&[[1., nan, 3., nan], [0., 2., 5., 5.]]);
    assert_eq!(grad(&x, whole), vec![0., 0., 0., 1., 0., 0., 0., 0.]);
    // Windows of -inf (and padding) route to their first in-bounds element.
    let ninf = f64::NEG_INFINITY;
    let x = t(&[[ninf; 4], [ninf; 4]]);
    let padded = MaxPool2dGrad {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [1, 1],
    };
    assert_eq!(grad(&x, padded), vec![1., 1., 0., 1., 1., 1., 0., 1.]);
    // Overlapping windows accumulate: a 3x3 stride-1 pool of a map whose maximum is in the middle.
    let x = Tensor::new(&[[[[0f64, 1., 0.], [1., 9., 1.], [0., 1., 0.]]]], &Device::Cpu).unwrap();
    let op = MaxPool2dGrad {
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
    };
    assert_eq!(grad(&x, op), vec![0., 0., 0., 0., 9., 0., 0., 0., 0.]);
}

#[test]
fn max_pool2d_grad_rejects_wrong_gradient_size() {
    let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let dy = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let op: Op = MaxPool2dGrad {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0, 0],
    }
    .into();
    assert!(kernels::execute(&op, &[x, dy]).is_err());
}

// ------------------------------------------------------------------------------ resize

#[test]
fn resize_grad_is_the_adjoint_of_resize() {
    let mut r = rng(10);
    let sizes: [([usize; 2], [usize; 2]); 6] = [
        ([4, 4], [8, 8]),
        ([5, 7], [9, 4]),
        ([6, 6], [3, 3]),
        ([3, 3], [7, 5]),
        ([4, 5], [4, 11]),
        ([1, 3], [2, 1]),
    ];
    for mode in [ResizeMode::Nearest, ResizeMode::Bilinear, ResizeMode::Bicubic] {
        for align_corners in [false, true] {
            if mode == ResizeMode::Nearest && align_corners {
                continue; // nearest ignores align_corners
            }
            for (input, size) in sizes {
                let x = randn(&[2, 3, input[0], input[1]], &mut r);
                let fwd = Resize {
                    size,
                    mode,
                    align_corners,
                };
                let dy = randn(&[2, 3, size[0], size[1]], &mut r);
                let op = ResizeGrad {
                    input_size: input,
                    mode,
                    align_corners,
                };
                let dx = run1(op.clone(), std::slice::from_ref(&dy));
                let what = format!("resize {mode:?} align {align_corners} {input:?} -> {size:?}");
                fd_check(&what, fwd, std::slice::from_ref(&x), 0, &dy, 0, &dx);
                same(
                    &format!("{what}: portable"),
                    &[resize::resize_grad_portable(&op, &dy).unwrap()],
                    std::slice::from_ref(&dx),
                );
                agrees_in_f32(&what, op, &[dy]);
            }
        }
    }
}

#[test]
fn resize_grad_nearest_half_types_add_exactly() {
    // 2x nearest upsampling: each input pixel collects 4 gradients; small integers add exactly.
    let dy = Tensor::ones((1, 1, 4, 6), DType::F16, &Device::Cpu).unwrap();
    let op = ResizeGrad {
        input_size: [2, 3],
        mode: ResizeMode::Nearest,
        align_corners: false,
    };
    let dx = run1(op.clone(), std::slice::from_ref(&dy));
    assert_eq!(dx.dtype(), DType::F16);
    assert_eq!(vals(&dx), vec![4.0; 6]);
    assert_eq!(vals(&resize::resize_grad_portable(&op, &dy).unwrap()), vec![4.0; 6]);
}

// ------------------------------------------------------------------------------ IR type rules

/// Every backward op's type rule on valid inputs, its error on a mismatch, and its JSON form.
#[test]
fn ir_rules_and_serialization() {
    use vitdet_ir::{DType as D, TensorType as T};
    let f = |s: &[usize]| T::new(D::F32, s);
    let infer = |op: &Op, ins: &[&T]| op.rule().infer(ins);
    let nchw = f(&[2, 4, 6, 6]);
    let c4 = f(&[4]);
    let cases: Vec<(Op, Vec<T>, Vec<T>)> = vec![
        (
            ReduceSum {
                axes: vec![0, 2],
                keepdim: false,
            }
            .into(),
            vec![nchw.clone()],
            vec![f(&[4, 6])],
        ),
        (
            UnaryGrad { kind: UnaryKind::Gelu }.into(),
            vec![nchw.clone(), nchw.clone()],
            vec![nchw.clone()],
        ),
        (
            LayerNormGrad { axis: 1, eps: 1e-6 }.into(),
            vec![nchw.clone(), c4.clone(), nchw.clone()],
            vec![nchw.clone(), c4.clone(), c4.clone()],
        ),
        (
            GroupNormGrad { groups: 2, eps: 1e-5 }.into(),
            vec![nchw.clone(), c4.clone(), nchw.clone()],
            vec![nchw.clone(), c4.clone(), c4.clone()],
        ),
        (
            BatchNormTrain {
                eps: 1e-5,
                momentum: 0.1,
            }
            .into(),
            vec![nchw.clone(), c4.clone(), c4.clone(), c4.clone(), c4.clone()],
            vec![nchw.clone(), c4.clone(), c4.clone()],
        ),
        (
            BatchNormTrainGrad { eps: 1e-5 }.into(),
            vec![nchw.clone(), c4.clone(), nchw.clone()],
            vec![nchw.clone(), c4.clone(), c4.clone()],
        ),
        (
            Conv2dGradWeight {
                stride: [2, 2],
                padding: [1, 1],
                dilation: [1, 1],
                groups: 2,
                kernel: [3, 3],
            }
            .into(),
            vec![nchw.clone(), f(&[2, 6, 3, 3])],
            vec![f(&[6, 2, 3, 3])],
        ),
        (
            MaxPool2dGrad {
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1, 1],
            }
            .into(),
            vec![nchw.clone(), f(&[2, 4, 3, 3])],
            vec![nchw.clone()],
        ),
        (
            ResizeGrad {
                input_size: [3, 5],
                mode: ResizeMode::Bicubic,
                align_corners: false,
            }
            .into(),
            vec![nchw.clone()],
            vec![f(&[2, 4, 3, 5])],
        ),
    ];
    for (op, ins, outs) in &cases {
        let refs: Vec<&T> = ins.iter().collect();
        assert_eq!(&infer(op, &refs).unwrap(), outs, "{}", op.name());
        let (lo, hi) = op.rule().arity();
        assert!(lo <= ins.len() && ins.len() <= hi, "{}", op.name());
        let json = serde_json::to_string(op).unwrap();
        assert!(json.contains(&format!("\"op\":\"{}\"", op.name())), "{json}");
        assert_eq!(&serde_json::from_str::<Op>(&json).unwrap(), op);
        let cost = op.rule().cost(&refs, outs);
        assert!(cost.flops > 0, "{}: flops", op.name());
        // Only the contraction counts multiply-adds, as its forward does.
        assert_eq!(cost.macs > 0, op.name() == "conv2d_grad_weight", "{}: macs", op.name());
    }
    // Mismatches are errors naming the problem.
    let err = |op: Op, ins: &[&T]| infer(&op, ins).unwrap_err();
    let e = err(
        ReduceSum {
            axes: vec![1, 0],
            keepdim: true,
        }
        .into(),
        &[&nchw],
    );
    assert!(e.contains("strictly increasing"), "{e}");
    let e = err(
        ReduceSum {
            axes: vec![4],
            keepdim: true,
        }
        .into(),
        &[&nchw],
    );
    assert!(e.contains("out of range"), "{e}");
    let e = err(UnaryGrad { kind: UnaryKind::Exp }.into(), &[&nchw, &c4]);
    assert!(e.contains("gradient"), "{e}");
    let e = err(LayerNormGrad { axis: 3, eps: 0.0 }.into(), &[&nchw, &c4, &nchw]);
    assert!(e.contains("weight"), "{e}");
    let e = err(GroupNormGrad { groups: 3, eps: 0.0 }.into(), &[&nchw, &c4, &nchw]);
    assert!(e.contains("groups"), "{e}");
    let e = err(
        BatchNormTrain {
            eps: 0.0,
            momentum: 1.5,
        }
        .into(),
        &[&nchw, &c4, &c4, &c4, &c4],
    );
    assert!(e.contains("momentum"), "{e}");
    let e = err(
        BatchNormTrain {
            eps: 0.0,
            momentum: 0.1,
        }
        .into(),
        &[&f(&[1, 4, 1, 1]), &c4, &c4, &c4, &c4],
    );
    assert!(e.contains("more than 1 value"), "{e}");
    let e = err(
        Conv2dGradWeight {
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
            kernel: [3, 3],
        }
        .into(),
        &[&nchw, &f(&[2, 3, 5, 6])],
    );
    assert!(e.contains("output size"), "{e}");
    let e = err(
        MaxPool2dGrad {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        }
        .into(),
        &[&nchw, &nchw],
    );
    assert!(e.contains("pooled"), "{e}");
    let e = err(
        ResizeGrad {
            input_size: [0, 4],
            mode: ResizeMode::Nearest,
            align_corners: false,
        }
        .into(),
        &[&nchw],
    );
    assert!(e.contains("empty"), "{e}");
}
