//! Every op kernel against a plain-loop f64 reference on small random inputs.
//!
//! Inputs are rounded to f32 before both computations, so differences come only from the
//! kernels' f32 arithmetic. Tolerances (with a one-line justification each):
//! * `EXACT` (0): data movement and gathers copy values.
//! * `ELEM` (atol 1e-6, rtol 1e-6): elementwise f32 math, a few ulp of the result.
//! * `DOT` (atol 1e-5, rtol 1e-5): contractions of <= ~100 f32 products of O(1) values; the
//!   rounding error grows like k * 6e-8 * sum |terms|.
//! * `NORM` (atol 1e-5, rtol 1e-5): f32 normalization of O(1) values (the statistics are f64).
//! * `RESIZE` (atol 1e-6, rtol 1e-6): bilinear/bicubic run in f64 and are rounded to f32 once.

#![allow(clippy::type_complexity, clippy::needless_range_loop)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use vitdet_ir::ops::*;
use vitdet_ir::Op;
use vitdet_runtime::kernels::{self, attention, norm, resize, KernelError};

const EXACT: (f64, f64) = (0.0, 0.0);
const ELEM: (f64, f64) = (1e-6, 1e-6);
const DOT: (f64, f64) = (1e-5, 1e-5);
const NORM: (f64, f64) = (1e-5, 1e-5);
const RESIZE: (f64, f64) = (1e-6, 1e-6);

fn exec(op: impl Into<Op>, inputs: &[Tensor]) -> Nd {
    let op = op.into();
    let out = kernels::execute(&op, inputs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    assert_eq!(out.len(), 1);
    Nd::from_tensor(&out[0])
}

fn check(got: &Nd, want: &Nd, tol: (f64, f64), what: &str) {
    assert_close(got, want, tol.0, tol.1, what);
}

fn rng() -> TestRng {
    TestRng::new(0x5eed)
}

// ---------------------------------------------------------------- elementwise

/// erf by composite Simpson integration of 2/sqrt(pi) exp(-t^2) (an independent reference).
fn erf_ref(x: f64) -> f64 {
    let n = 4000;
    let h = x / n as f64;
    let f = |t: f64| (-t * t).exp();
    let mut s = f(0.0) + f(x);
    for i in 1..n {
        s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn unary_ops() {
    let mut r = rng();
    let x = Nd::randn(&[3, 41], &mut r, 3.0, 0.0);
    let pos = Nd::new(
        &x.shape,
        x.data.iter().map(|v| ((v.abs() + 0.1) as f32) as f64).collect(),
    );
    let cases: Vec<(UnaryKind, &Nd, fn(f64) -> f64)> = vec![
        (UnaryKind::Gelu, &x, |v| 0.5 * v * (1.0 + erf_ref(v / 2f64.sqrt()))),
        (UnaryKind::Relu, &x, |v| v.max(0.0)),
        (UnaryKind::Sigmoid, &x, |v| 1.0 / (1.0 + (-v).exp())),
        (UnaryKind::Exp, &x, f64::exp),
        (UnaryKind::Log, &pos, f64::ln),
        (UnaryKind::Neg, &x, |v| -v),
        (UnaryKind::Sqrt, &pos, f64::sqrt),
        (UnaryKind::Tanh, &x, f64::tanh),
        (UnaryKind::Abs, &x, f64::abs),
    ];
    for (kind, input, f) in cases {
        let want = Nd::new(&input.shape, input.data.iter().map(|&v| f(v)).collect());
        let got = exec(Unary { kind }, &[input.tensor()]);
        check(&got, &want, ELEM, &format!("{kind:?}"));
    }
}

fn broadcast_ref(a: &Nd, b: &Nd, f: fn(f64, f64) -> f64) -> Nd {
    let rank = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let out: Vec<usize> = sa.iter().zip(&sb).map(|(x, y)| *x.max(y)).collect();
    let (a2, b2) = (Nd::new(&sa, a.data.clone()), Nd::new(&sb, b.data.clone()));
    let mut y = Nd::zeros(&out);
    for_each_index(&out, |i| {
        let ia: Vec<usize> = i.iter().zip(&sa).map(|(x, d)| if *d == 1 { 0 } else { *x }).collect();
        let ib: Vec<usize> = i.iter().zip(&sb).map(|(x, d)| if *d == 1 { 0 } else { *x }).collect();
        y.set(i, f(a2.at(&ia), b2.at(&ib)));
    });
    y
}

#[test]
fn binary_ops_broadcast() {
    let mut r = rng();
    let shapes: [(&[usize], &[usize]); 5] = [
        (&[2, 3, 4], &[2, 3, 4]),
        (&[2, 3, 4], &[3, 1]),
        (&[2, 3, 4], &[4]),
        (&[1, 4], &[2, 3, 1]),
        (&[3, 1, 5], &[1, 2, 5]),
    ];
    let kinds: [(BinaryKind, fn(f64, f64) -> f64); 6] = [
        (BinaryKind::Add, |a, b| a + b),
        (BinaryKind::Sub, |a, b| a - b),
        (BinaryKind::Mul, |a, b| a * b),
        (BinaryKind::Div, |a, b| a / b),
        (BinaryKind::Maximum, f64::max),
        (BinaryKind::Minimum, f64::min),
    ];
    for (sa, sb) in shapes {
        let a = Nd::randn(sa, &mut r, 1.0, 0.0);
        let b = Nd::randn(sb, &mut r, 1.0, 3.0); // away from 0 for Div
        for (kind, f) in kinds {
            let got = exec(Binary { kind }, &[a.tensor(), b.tensor()]);
            check(
                &got,
                &broadcast_ref(&a, &b, f),
                ELEM,
                &format!("{kind:?} {sa:?} {sb:?}"),
            );
        }
    }
}

#[test]
fn affine_cast_drop_path() {
    let mut r = rng();
    let x = Nd::randn(&[4, 5], &mut r, 1.0, 0.0);
    let got = exec(Affine { mul: 0.125, add: -2.5 }, &[x.tensor()]);
    check(
        &got,
        &Nd::new(&x.shape, x.data.iter().map(|v| v * 0.125 - 2.5).collect()),
        ELEM,
        "affine",
    );
    let got = exec(DropPath { rate: 0.3 }, &[x.tensor()]);
    check(&got, &x, EXACT, "drop_path is the identity at inference");
    let out = kernels::execute(
        &Cast {
            dtype: vitdet_ir::DType::F16,
        }
        .into(),
        &[x.tensor()],
    )
    .unwrap();
    assert_eq!(out[0].dtype(), DType::F16);
    let want = Nd::new(
        &x.shape,
        x.data.iter().map(|v| half::f16::from_f64(*v).to_f64()).collect(),
    );
    check(&Nd::from_tensor(&out[0]), &want, EXACT, "cast to f16 rounds to nearest");
}

// ---------------------------------------------------------------- contractions

fn matmul_ref(a: &Nd, b: &Nd, transpose_rhs: bool) -> Nd {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let n = if transpose_rhs {
        b.shape[rb - 2]
    } else {
        b.shape[rb - 1]
    };
    let (ba, bb) = (&a.shape[..ra - 2], &b.shape[..rb - 2]);
    let rank = ba.len().max(bb.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (pa, pb) = (pad(ba), pad(bb));
    let batch: Vec<usize> = pa.iter().zip(&pb).map(|(x, y)| *x.max(y)).collect();
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    let mut y = Nd::zeros(&out_shape);
    let a2 = Nd::new(&[pa.clone(), vec![m, k]].concat(), a.data.clone());
    let b2 = Nd::new(&[pb.clone(), b.shape[rb - 2..].to_vec()].concat(), b.data.clone());
    for_each_index(&out_shape, |i| {
        let bi = &i[..rank];
        let ia: Vec<usize> = bi.iter().zip(&pa).map(|(x, d)| if *d == 1 { 0 } else { *x }).collect();
        let ib: Vec<usize> = bi.iter().zip(&pb).map(|(x, d)| if *d == 1 { 0 } else { *x }).collect();
        let (mi, ni) = (i[rank], i[rank + 1]);
        let mut s = 0.0;
        for kk in 0..k {
            let av = a2.at(&[ia.clone(), vec![mi, kk]].concat());
            let bv = if transpose_rhs {
                b2.at(&[ib.clone(), vec![ni, kk]].concat())
            } else {
                b2.at(&[ib.clone(), vec![kk, ni]].concat())
            };
            s += av * bv;
        }
        y.set(i, s);
    });
    y
}

#[test]
fn linear_contiguous_and_strided() {
    let mut r = rng();
    let x = Nd::randn(&[2, 3, 5], &mut r, 1.0, 0.0);
    let w = Nd::randn(&[4, 5], &mut r, 1.0, 0.0);
    let b = Nd::randn(&[4], &mut r, 1.0, 0.0);
    let mut want = matmul_ref(&x, &Nd::new(&[5, 4], transpose2(&w)), false);
    for_each_index(&want.shape.clone(), |i| {
        let v = want.at(i) + b.data[i[2]];
        want.set(i, v)
    });
    check(
        &exec(Linear {}, &[x.tensor(), w.tensor(), b.tensor()]),
        &want,
        DOT,
        "linear",
    );
    // A non-contiguous input (a transposed view) goes through the same kernel.
    let xt = Tensor::from_vec(transpose_last2(&x), (2, 5, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert!(!xt.is_contiguous());
    check(
        &exec(Linear {}, &[xt, w.tensor(), b.tensor()]),
        &want,
        DOT,
        "linear, strided input",
    );
    // Without bias, rank-1 input.
    let x1 = Nd::randn(&[5], &mut r, 1.0, 0.0);
    let want1 = matmul_ref(
        &Nd::new(&[1, 5], x1.data.clone()),
        &Nd::new(&[5, 4], transpose2(&w)),
        false,
    );
    check(
        &exec(Linear {}, &[x1.tensor(), w.tensor()]),
        &Nd::new(&[4], want1.data),
        DOT,
        "linear rank 1",
    );
}

fn transpose2(w: &Nd) -> Vec<f64> {
    let (r, c) = (w.shape[0], w.shape[1]);
    (0..c)
        .flat_map(|j| (0..r).map(move |i| (i, j)))
        .map(|(i, j)| w.data[i * c + j])
        .collect()
}

fn transpose_last2(x: &Nd) -> Vec<f64> {
    let s = &x.shape;
    let (b, m, k) = (s[0], s[1], s[2]);
    let mut out = vec![0.0; x.numel()];
    for bi in 0..b {
        for i in 0..m {
            for j in 0..k {
                out[bi * m * k + j * m + i] = x.data[bi * m * k + i * k + j];
            }
        }
    }
    out
}

#[test]
fn matmul_batched_broadcast_transposed() {
    let mut r = rng();
    let cases: [(&[usize], &[usize], bool); 8] = [
        (&[2, 3, 4, 5], &[2, 3, 5, 6], false),
        (&[2, 3, 4, 5], &[2, 3, 6, 5], true),
        (&[3, 4, 5], &[5, 6], false),
        (&[3, 4, 5], &[6, 5], true),
        (&[2, 1, 4, 5], &[3, 5, 6], false),
        (&[4, 5], &[2, 5, 6], false),
        (&[1, 4, 5], &[3, 6, 5], true),
        (&[2, 2, 3, 4, 5], &[2, 2, 3, 5, 2], false),
    ];
    for (sa, sb, t) in cases {
        let a = Nd::randn(sa, &mut r, 1.0, 0.0);
        let b = Nd::randn(sb, &mut r, 1.0, 0.0);
        let got = exec(MatMul::new(t), &[a.tensor(), b.tensor()]);
        check(
            &got,
            &matmul_ref(&a, &b, t),
            DOT,
            &format!("matmul {sa:?} @ {sb:?} t={t}"),
        );
    }
}

/// `a^T`: the contiguous `[..., k, m]` tensor of `a` (logical shape `[..., m, k]`) transposed.
fn transposed_copy(a: &Nd) -> Tensor {
    let r = a.shape.len();
    let (m, k) = (a.shape[r - 2], a.shape[r - 1]);
    let batch: usize = a.shape[..r - 2].iter().product();
    let stored = transpose_last2(&Nd::new(&[batch, m, k], a.data.clone()));
    let mut dims = a.shape.clone();
    dims.swap(r - 2, r - 1);
    Tensor::from_vec(stored, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// `a` as the transposed view of [`transposed_copy`].
fn transposed_view(a: &Nd) -> Tensor {
    let r = a.shape.len();
    let t = transposed_copy(a).transpose(r - 2, r - 1).unwrap();
    assert!(!t.is_contiguous() || a.shape[r - 2] == 1 || a.shape[r - 1] == 1);
    t
}

#[test]
fn matmul_of_transposed_views() {
    // Column-major operands (what `p.t()` and `ds.t()` are in the attention backward) in every
    // batch arrangement the kernel reshapes: single matrices, a batch of one, batches folded
    // into rows, merged batch dims, and a broadcast lhs.
    let mut r = rng();
    let cases: [(&[usize], &[usize], bool); 7] = [
        (&[4, 5], &[5, 6], false),
        (&[1, 4, 5], &[1, 5, 6], false),
        (&[1, 4, 5], &[6, 5], true),
        (&[3, 4, 5], &[5, 6], false),
        (&[3, 4, 5], &[3, 6, 5], true),
        (&[2, 3, 4, 5], &[2, 3, 5, 6], false),
        (&[1, 4, 5], &[3, 5, 6], false),
    ];
    for (sa, sb, t) in cases {
        let a = Nd::randn(sa, &mut r, 1.0, 0.0);
        let b = Nd::randn(sb, &mut r, 1.0, 0.0);
        let want = matmul_ref(&a, &b, t);
        for (lhs, rhs, what) in [
            (transposed_view(&a), b.tensor(), "lhs"),
            (a.tensor(), transposed_view(&b), "rhs"),
            (transposed_view(&a), transposed_view(&b), "both"),
        ] {
            let got = exec(MatMul::new(t), &[lhs, rhs]);
            check(
                &got,
                &want,
                DOT,
                &format!("matmul {sa:?} @ {sb:?} t={t}, transposed {what}"),
            );
        }
    }
    // `transpose_lhs`: the lhs stored as `a^T`, contiguous or itself a transposed view.
    for (sa, sb, t) in cases {
        let a = Nd::randn(sa, &mut r, 1.0, 0.0);
        let b = Nd::randn(sb, &mut r, 1.0, 0.0);
        let want = matmul_ref(&a, &b, t);
        let op = MatMul {
            transpose_lhs: true,
            transpose_rhs: t,
        };
        let rank = sa.len();
        let a_t_view = a.tensor().transpose(rank - 2, rank - 1).unwrap();
        for (lhs, what) in [(transposed_copy(&a), "contiguous"), (a_t_view, "a view")] {
            let got = exec(op.clone(), &[lhs, b.tensor()]);
            check(&got, &want, DOT, &format!("matmul {sa:?}^T @ {sb:?} t={t}, lhs {what}"));
        }
    }
    // `linear` with a transposed rank-2 input.
    let x = Nd::randn(&[4, 5], &mut r, 1.0, 0.0);
    let w = Nd::randn(&[3, 5], &mut r, 1.0, 0.0);
    check(
        &exec(Linear {}, &[transposed_view(&x), w.tensor()]),
        &matmul_ref(&x, &w, true),
        DOT,
        "linear, transposed rank-2 input",
    );
}

#[test]
fn bf16_contractions_on_cpu() {
    // candle's CPU gemm has no bf16 kernel; the runtime computes in f32 and rounds to bf16.
    let mut r = rng();
    let a = Nd::randn(&[2, 4, 8], &mut r, 1.0, 0.0);
    let b = Nd::randn(&[2, 8, 3], &mut r, 1.0, 0.0);
    let out = kernels::execute(
        &MatMul::new(false).into(),
        &[a.tensor_as(DType::BF16), b.tensor_as(DType::BF16)],
    )
    .unwrap();
    assert_eq!(out[0].dtype(), DType::BF16);
    let a16 = Nd::from_tensor(&a.tensor_as(DType::BF16));
    let b16 = Nd::from_tensor(&b.tensor_as(DType::BF16));
    // bf16 keeps 8 mantissa bits: relative rounding 2^-8 of the result.
    check(
        &Nd::from_tensor(&out[0]),
        &matmul_ref(&a16, &b16, false),
        (1e-2, 8e-3),
        "bf16 matmul",
    );
}

fn conv2d_ref(x: &Nd, w: &Nd, b: Option<&Nd>, op: &Conv2d) -> Nd {
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (o, cg, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    let og = o / op.groups;
    let ho = (h + 2 * op.padding[0] - op.dilation[0] * (kh - 1) - 1) / op.stride[0] + 1;
    let wo = (wd + 2 * op.padding[1] - op.dilation[1] * (kw - 1) - 1) / op.stride[1] + 1;
    assert_eq!(cg * op.groups, c);
    let mut y = Nd::zeros(&[n, o, ho, wo]);
    for_each_index(&[n, o, ho, wo], |i| {
        let (ni, oi, yi, xi) = (i[0], i[1], i[2], i[3]);
        let g = oi / og;
        let mut s = b.map(|b| b.data[oi]).unwrap_or(0.0);
        for ci in 0..cg {
            for a in 0..kh {
                for bb in 0..kw {
                    let iy = (yi * op.stride[0] + a * op.dilation[0]) as isize - op.padding[0] as isize;
                    let ix = (xi * op.stride[1] + bb * op.dilation[1]) as isize - op.padding[1] as isize;
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                        continue;
                    }
                    s += x.at(&[ni, g * cg + ci, iy as usize, ix as usize]) * w.at(&[oi, ci, a, bb]);
                }
            }
        }
        y.set(i, s);
    });
    y
}

#[test]
fn conv2d_all_attribute_paths() {
    let mut r = rng();
    let conv = |s: [usize; 2], p: [usize; 2], d: [usize; 2], g: usize| Conv2d {
        stride: s,
        padding: p,
        dilation: d,
        groups: g,
    };
    let cases: Vec<(&[usize], &[usize], Conv2d, bool)> = vec![
        (&[2, 3, 7, 6], &[4, 3, 3, 3], conv([1, 1], [1, 1], [1, 1], 1), true),
        (&[1, 4, 9, 8], &[6, 2, 3, 3], conv([2, 2], [1, 1], [1, 1], 2), true),
        (&[1, 3, 9, 9], &[2, 3, 3, 3], conv([1, 1], [2, 2], [2, 2], 1), false),
        (&[1, 3, 8, 9], &[5, 3, 1, 1], conv([1, 1], [0, 0], [1, 1], 1), true),
        (&[1, 3, 8, 9], &[5, 3, 1, 1], conv([2, 2], [0, 0], [1, 1], 1), true),
        // asymmetric padding, stride, dilation (lowered with candle ops)
        (&[1, 3, 7, 8], &[4, 3, 3, 2], conv([1, 1], [1, 2], [1, 1], 1), true),
        (&[2, 3, 9, 8], &[4, 3, 3, 3], conv([1, 2], [1, 1], [1, 1], 1), true),
        (&[1, 2, 9, 10], &[3, 2, 2, 3], conv([2, 1], [0, 1], [2, 1], 1), true),
        (&[2, 2, 8, 9], &[3, 2, 3, 2], conv([1, 1], [2, 1], [2, 1], 1), true),
        // patchify fast path (kernel == stride), incl. a size that does not divide
        (&[2, 3, 8, 12], &[5, 3, 4, 4], conv([4, 4], [0, 0], [1, 1], 1), true),
        (&[1, 3, 10, 9], &[5, 3, 4, 2], conv([4, 2], [0, 0], [1, 1], 1), false),
    ];
    for (sx, sw, op, bias) in cases {
        let x = Nd::randn(sx, &mut r, 1.0, 0.0);
        let w = Nd::randn(sw, &mut r, 0.3, 0.0);
        let b = Nd::randn(&[sw[0]], &mut r, 1.0, 0.0);
        let mut ins = vec![x.tensor(), w.tensor()];
        if bias {
            ins.push(b.tensor());
        }
        let got = exec(op.clone(), &ins);
        check(
            &got,
            &conv2d_ref(&x, &w, bias.then_some(&b), &op),
            DOT,
            &format!("conv2d {sx:?} {sw:?} {op:?}"),
        );
    }
}

#[test]
fn conv2d_tiled_im2col_matches_candle() {
    // Large enough for the CPU im2col path to split the output rows into several tiles
    // (64 * 9 * 600 * 4 bytes per output row, 32 MiB per tile -> 2 tiles); candle's own
    // convolution is the reference. DOT tolerance: 576-term f32 dot products of N(0,1) values.
    let x = Tensor::randn(0f32, 1.0, (1, 64, 40, 600), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.05, (4, 64, 3, 3), &Device::Cpu).unwrap();
    let got = exec(Conv2d::same(1), &[x.clone(), w.clone()]);
    let want = Nd::from_tensor(&x.conv2d(&w, 1, 1, 1, 1).unwrap());
    check(&got, &want, DOT, "tiled im2col conv");
}

#[test]
fn conv2d_batched_im2col_matches_candle() {
    // A batch of small maps (as RoI heads have): 64 * 9 * 20 * 20 * 4 bytes per image, 32 MiB
    // per tile -> 36 images per GEMM -> 3 tiles for 80 images.
    let x = Tensor::randn(0f32, 1.0, (80, 64, 20, 20), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.05, (8, 64, 3, 3), &Device::Cpu).unwrap();
    let got = exec(Conv2d::same(1), &[x.clone(), w.clone()]);
    let want = Nd::from_tensor(&x.conv2d(&w, 1, 1, 1, 1).unwrap());
    check(&got, &want, DOT, "batched im2col conv");
}

#[test]
fn conv2d_im2col_padding_dilation_dtypes() {
    // The CPU im2col path (stride 1, one group, kernel > 1x1): batches, asymmetric padding and
    // dilation, padding wider than the kernel reach (all-zero column rows), a non-contiguous
    // input, and every float dtype (f32 / f64 build columns on the host, f16 / bf16 take the
    // candle-op path or are widened to f32).
    let mut r = rng();
    let conv = |p: [usize; 2], d: [usize; 2]| Conv2d {
        stride: [1, 1],
        padding: p,
        dilation: d,
        groups: 1,
    };
    let cases: Vec<(&[usize], &[usize], Conv2d)> = vec![
        (&[3, 4, 5, 6], &[5, 4, 3, 3], conv([1, 1], [1, 1])),
        (&[2, 3, 6, 7], &[4, 3, 3, 2], conv([2, 1], [1, 2])),
        (&[2, 2, 3, 4], &[3, 2, 3, 3], conv([4, 3], [1, 1])),
        (&[1, 3, 7, 5], &[2, 3, 2, 3], conv([0, 2], [2, 1])),
    ];
    for (sx, sw, op) in cases {
        let x = Nd::randn(sx, &mut r, 1.0, 0.0);
        let w = Nd::randn(sw, &mut r, 0.3, 0.0);
        let b = Nd::randn(&[sw[0]], &mut r, 1.0, 0.0);
        let want = conv2d_ref(&x, &w, Some(&b), &op);
        for (dtype, tol) in [
            (DType::F32, DOT),
            (DType::F64, DOT),
            (DType::F16, (2e-2, 2e-2)),
            (DType::BF16, (1e-1, 2e-2)),
        ] {
            let ins = [x.tensor_as(dtype), w.tensor_as(dtype), b.tensor_as(dtype)];
            let got = exec(op.clone(), &ins);
            check(&got, &want, tol, &format!("im2col conv {sx:?} {sw:?} {op:?} {dtype:?}"));
        }
        // The same input as a transposed (non-contiguous) view.
        let xt = x
            .tensor()
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let got = exec(op.clone(), &[xt, w.tensor(), b.tensor()]);
        check(
            &got,
            &want,
            DOT,
            &format!("im2col conv {sx:?} {sw:?} {op:?} non-contiguous"),
        );
    }
}

fn conv_transpose2d_ref(x: &Nd, w: &Nd, b: Option<&Nd>, op: &ConvTranspose2d) -> Nd {
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (o, kh, kw) = (w.shape[1], w.shape[2], w.shape[3]);
    let ho = (h - 1) * op.stride[0] + op.dilation[0] * (kh - 1) + op.output_padding[0] + 1 - 2 * op.padding[0];
    let wo = (wd - 1) * op.stride[1] + op.dilation[1] * (kw - 1) + op.output_padding[1] + 1 - 2 * op.padding[1];
    let mut y = Nd::zeros(&[n, o, ho, wo]);
    for_each_index(&[n, o, ho, wo], |i| {
        let v = b.map(|b| b.data[i[1]]).unwrap_or(0.0);
        y.set(i, v);
    });
    for_each_index(&[n, c, h, wd], |i| {
        let (ni, ci, iy, ix) = (i[0], i[1], i[2], i[3]);
        for oi in 0..o {
            for a in 0..kh {
                for bb in 0..kw {
                    let oy = (iy * op.stride[0] + a * op.dilation[0]) as isize - op.padding[0] as isize;
                    let ox = (ix * op.stride[1] + bb * op.dilation[1]) as isize - op.padding[1] as isize;
                    if oy < 0 || ox < 0 || oy >= ho as isize || ox >= wo as isize {
                        continue;
                    }
                    let idx = [ni, oi, oy as usize, ox as usize];
                    let v = y.at(&idx) + x.at(i) * w.at(&[ci, oi, a, bb]);
                    y.set(&idx, v);
                }
            }
        }
    });
    y
}

#[test]
fn conv_transpose2d_all_attribute_paths() {
    let mut r = rng();
    let op = |s: [usize; 2], p: [usize; 2], q: [usize; 2], d: [usize; 2]| ConvTranspose2d {
        stride: s,
        padding: p,
        output_padding: q,
        dilation: d,
    };
    let cases: Vec<(&[usize], &[usize], ConvTranspose2d, bool)> = vec![
        // kernel == stride fast path (the pyramids' 2x2 s2 deconvolutions), batch 1 and 2
        (&[1, 4, 3, 5], &[4, 6, 2, 2], ConvTranspose2d::upsample(2), true),
        (&[2, 3, 4, 3], &[3, 2, 2, 2], ConvTranspose2d::upsample(2), false),
        (&[1, 3, 3, 4], &[3, 2, 3, 2], op([3, 2], [0, 0], [0, 0], [1, 1]), true),
        // symmetric general case (candle's conv_transpose2d)
        (&[1, 3, 4, 5], &[3, 2, 3, 3], op([2, 2], [1, 1], [1, 1], [1, 1]), true),
        (&[2, 2, 3, 3], &[2, 3, 3, 3], op([1, 1], [0, 0], [0, 0], [2, 2]), true),
        // asymmetric (lowered to zero insertion + convolution)
        (&[1, 3, 4, 5], &[3, 2, 3, 2], op([2, 1], [1, 0], [1, 0], [1, 2]), true),
        (&[2, 2, 3, 4], &[2, 3, 2, 3], op([1, 3], [0, 2], [0, 2], [1, 1]), false),
    ];
    for (sx, sw, o, bias) in cases {
        let x = Nd::randn(sx, &mut r, 1.0, 0.0);
        let w = Nd::randn(sw, &mut r, 0.3, 0.0);
        let b = Nd::randn(&[sw[1]], &mut r, 1.0, 0.0);
        let mut ins = vec![x.tensor(), w.tensor()];
        if bias {
            ins.push(b.tensor());
        }
        let got = exec(o.clone(), &ins);
        check(
            &got,
            &conv_transpose2d_ref(&x, &w, bias.then_some(&b), &o),
            DOT,
            &format!("deconv {sx:?} {sw:?} {o:?}"),
        );
    }
}

// ---------------------------------------------------------------- norms

fn axis_norm_ref(x: &Nd, w: &Nd, b: &Nd, axis: usize, eps: f64) -> Nd {
    let mut y = x.clone();
    let mut outer_shape = x.shape.clone();
    outer_shape[axis] = 1;
    let c = x.shape[axis];
    for_each_index(&outer_shape, |i| {
        let idx = |k: usize| {
            let mut j = i.to_vec();
            j[axis] = k;
            j
        };
        let mean = (0..c).map(|k| x.at(&idx(k))).sum::<f64>() / c as f64;
        let var = (0..c).map(|k| (x.at(&idx(k)) - mean).powi(2)).sum::<f64>() / c as f64;
        for k in 0..c {
            y.set(
                &idx(k),
                (x.at(&idx(k)) - mean) / (var + eps).sqrt() * w.data[k] + b.data[k],
            );
        }
    });
    y
}

#[test]
fn layer_norm_any_axis_fused_and_portable() {
    let mut r = rng();
    let cases: [(&[usize], usize, f64); 4] = [
        (&[4, 7, 16], 2, 1e-6),
        (&[2, 6, 3, 5], 1, 1e-6),
        (&[5, 3, 4], 0, 1e-5),
        (&[3, 700], 1, 1e-6),
    ];
    for (shape, axis, eps) in cases {
        // A large mean and a small spread test the two-pass variance.
        let x = Nd::randn(shape, &mut r, 0.5, 20.0);
        let w = Nd::randn(&[shape[axis]], &mut r, 0.1, 1.0);
        let b = Nd::randn(&[shape[axis]], &mut r, 0.1, 0.0);
        let op = LayerNorm { axis, eps };
        let want = axis_norm_ref(&x, &w, &b, axis, eps);
        check(
            &exec(op.clone(), &[x.tensor(), w.tensor(), b.tensor()]),
            &want,
            NORM,
            &format!("layer_norm {shape:?} axis {axis}"),
        );
        let portable = norm::layer_norm_portable(&op, &x.tensor(), &w.tensor(), &b.tensor()).unwrap();
        // The portable path computes the statistics in f32: values around 20 carry an ulp of
        // 1.9e-6, i.e. 4e-6 of the std (0.5), and the mean and x - mean each round: ~3e-5.
        check(
            &Nd::from_tensor(&portable),
            &want,
            (3e-5, 1e-5),
            &format!("layer_norm portable {shape:?} axis {axis}"),
        );
    }
    // f64 in, f64 out
    let x = Nd::randn(&[3, 8], &mut r, 1.0, 0.0);
    let (w, b) = (Nd::randn(&[8], &mut r, 1.0, 0.0), Nd::randn(&[8], &mut r, 1.0, 0.0));
    let out = kernels::execute(
        &LayerNorm { axis: 1, eps: 1e-6 }.into(),
        &[
            x.tensor_as(DType::F64),
            w.tensor_as(DType::F64),
            b.tensor_as(DType::F64),
        ],
    )
    .unwrap();
    assert_eq!(out[0].dtype(), DType::F64);
    check(
        &Nd::from_tensor(&out[0]),
        &axis_norm_ref(&x, &w, &b, 1, 1e-6),
        (1e-12, 1e-12),
        "layer_norm f64",
    );
}

fn group_norm_ref(x: &Nd, w: &Nd, b: &Nd, groups: usize, eps: f64) -> Nd {
    let (n, c) = (x.shape[0], x.shape[1]);
    let inner: usize = x.shape[2..].iter().product();
    let cg = c / groups;
    let mut y = x.clone();
    for ni in 0..n {
        for g in 0..groups {
            let base = ni * c * inner + g * cg * inner;
            let s = &x.data[base..base + cg * inner];
            let mean = s.iter().sum::<f64>() / s.len() as f64;
            let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / s.len() as f64;
            for k in 0..cg * inner {
                let ch = g * cg + k / inner;
                y.data[base + k] = (s[k] - mean) / (var + eps).sqrt() * w.data[ch] + b.data[ch];
            }
        }
    }
    y
}

#[test]
fn group_norm_fused_and_portable() {
    let mut r = rng();
    for (shape, groups) in [
        (&[2usize, 8, 5, 5][..], 4usize),
        (&[1, 6, 7][..], 3),
        (&[3, 4, 2, 2][..], 1),
    ] {
        let x = Nd::randn(shape, &mut r, 2.0, 1.0);
        let w = Nd::randn(&[shape[1]], &mut r, 0.1, 1.0);
        let b = Nd::randn(&[shape[1]], &mut r, 0.1, 0.0);
        let op = GroupNorm { groups, eps: 1e-5 };
        let want = group_norm_ref(&x, &w, &b, groups, 1e-5);
        check(
            &exec(op.clone(), &[x.tensor(), w.tensor(), b.tensor()]),
            &want,
            NORM,
            &format!("group_norm {shape:?}"),
        );
        let portable = norm::group_norm_portable(&op, &x.tensor(), &w.tensor(), &b.tensor()).unwrap();
        check(
            &Nd::from_tensor(&portable),
            &want,
            NORM,
            &format!("group_norm portable {shape:?}"),
        );
    }
}

#[test]
fn batch_norm_inference() {
    let mut r = rng();
    let x = Nd::randn(&[2, 5, 3, 4], &mut r, 1.0, 0.0);
    let w = Nd::randn(&[5], &mut r, 0.1, 1.0);
    let b = Nd::randn(&[5], &mut r, 0.1, 0.0);
    let mean = Nd::randn(&[5], &mut r, 0.5, 0.0);
    let var = Nd::new(&[5], (0..5).map(|_| ((0.5 + r.uniform()) as f32) as f64).collect());
    let mut want = x.clone();
    for_each_index(&x.shape, |i| {
        let c = i[1];
        want.set(
            i,
            (x.at(i) - mean.data[c]) / (var.data[c] + 1e-5).sqrt() * w.data[c] + b.data[c],
        );
    });
    let got = exec(
        BatchNorm { eps: 1e-5 },
        &[x.tensor(), w.tensor(), b.tensor(), mean.tensor(), var.tensor()],
    );
    check(&got, &want, NORM, "batch_norm");
}

// ---------------------------------------------------------------- attention

fn softmax_ref(x: &Nd, axis: usize) -> Nd {
    let mut y = x.clone();
    let mut outer = x.shape.clone();
    outer[axis] = 1;
    for_each_index(&outer, |i| {
        let idx = |k: usize| {
            let mut j = i.to_vec();
            j[axis] = k;
            j
        };
        let n = x.shape[axis];
        let m = (0..n).map(|k| x.at(&idx(k))).fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = (0..n).map(|k| (x.at(&idx(k)) - m).exp()).sum();
        for k in 0..n {
            y.set(&idx(k), (x.at(&idx(k)) - m).exp() / s);
        }
    });
    y
}

#[test]
fn softmax_axes_fused_and_portable() {
    let mut r = rng();
    for (shape, axis) in [
        (&[3usize, 4, 37][..], 2usize),
        (&[2, 5, 3][..], 1),
        (&[4, 3][..], 0),
        (&[2, 1000][..], 1),
    ] {
        let x = Nd::randn(shape, &mut r, 4.0, 50.0); // large logits test the max subtraction
        let want = softmax_ref(&x, axis);
        // Probabilities <= 1; f32 exp/sum/divide: a few ulp of each value.
        check(
            &exec(Softmax { axis }, &[x.tensor()]),
            &want,
            (1e-7, 2e-6),
            &format!("softmax {shape:?} axis {axis}"),
        );
        let portable = attention::softmax_portable(&Softmax { axis }, &x.tensor()).unwrap();
        check(
            &Nd::from_tensor(&portable),
            &want,
            (1e-7, 2e-6),
            &format!("softmax portable {shape:?} axis {axis}"),
        );
    }
    // f16 input: computed in f32 and rounded to f16.
    let x = Nd::randn(&[2, 9], &mut r, 1.0, 0.0);
    let out = kernels::execute(&Softmax { axis: 1 }.into(), &[x.tensor_as(DType::F16)]).unwrap();
    assert_eq!(out[0].dtype(), DType::F16);
    check(
        &Nd::from_tensor(&out[0]),
        &softmax_ref(&Nd::from_tensor(&x.tensor_as(DType::F16)), 1),
        (1e-4, 1e-3),
        "softmax f16",
    );
}

/// detectron2's get_rel_pos written directly from its definition.
fn rel_pos_gather_ref(table: &Nd, q: usize, k: usize) -> Nd {
    let (l, c) = (table.shape[0], table.shape[1]);
    let target = 2 * q.max(k) - 1;
    let resized = if l == target {
        table.clone()
    } else {
        let mut t = Nd::zeros(&[target, c]);
        let scale = l as f64 / target as f64;
        for d in 0..target {
            let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = src.floor() as usize;
            let i1 = (i0 + 1).min(l - 1);
            let lam = src - i0 as f64;
            for ch in 0..c {
                t.set(&[d, ch], (1.0 - lam) * table.at(&[i0, ch]) + lam * table.at(&[i1, ch]));
            }
        }
        t
    };
    let mut y = Nd::zeros(&[q, k, c]);
    for i in 0..q {
        for j in 0..k {
            let qc = i as f64 * (k as f64 / q as f64).max(1.0);
            let kc = j as f64 * (q as f64 / k as f64).max(1.0);
            let row = (qc - kc + (k as f64 - 1.0) * (q as f64 / k as f64).max(1.0)) as usize;
            for ch in 0..c {
                y.set(&[i, j, ch], resized.at(&[row, ch]));
            }
        }
    }
    y
}

#[test]
fn rel_pos_gather_with_and_without_interpolation() {
    let mut r = rng();
    let table = Nd::randn(&[5, 4], &mut r, 1.0, 0.0);
    for (q, k) in [(3, 3), (7, 7), (4, 7), (7, 4), (1, 1), (2, 2)] {
        let got = exec(RelPosGather { q_size: q, k_size: k }, &[table.tensor()]);
        // Interpolation is an f64 matrix product of two taps; the gather itself is exact.
        check(
            &got,
            &rel_pos_gather_ref(&table, q, k),
            ELEM,
            &format!("rel_pos_gather q={q} k={k}"),
        );
    }
}

#[test]
fn rel_pos_bias_beit_index() {
    let mut r = rng();
    for [h, w] in [[3usize, 3usize], [2, 4], [1, 1]] {
        let heads = 3;
        let table = Nd::randn(&[(2 * h - 1) * (2 * w - 1), heads], &mut r, 1.0, 0.0);
        let n = h * w;
        let mut want = Nd::zeros(&[heads, n, n]);
        for hd in 0..heads {
            for i in 0..n {
                for j in 0..n {
                    let (yi, xi, yj, xj) = ((i / w) as isize, (i % w) as isize, (j / w) as isize, (j % w) as isize);
                    let row = (yi - yj + h as isize - 1) * (2 * w as isize - 1) + (xi - xj + w as isize - 1);
                    want.set(&[hd, i, j], table.at(&[row as usize, hd]));
                }
            }
        }
        check(
            &exec(RelPosBias { window: [h, w] }, &[table.tensor()]),
            &want,
            EXACT,
            &format!("rel_pos_bias {h}x{w}"),
        );
    }
}

// ---------------------------------------------------------------- shape ops

#[test]
fn shape_ops() {
    let mut r = rng();
    let x = Nd::randn(&[2, 3, 4], &mut r, 1.0, 0.0);
    check(
        &exec(Reshape { shape: vec![4, 6] }, &[x.tensor()]),
        &Nd::new(&[4, 6], x.data.clone()),
        EXACT,
        "reshape",
    );

    let mut want = Nd::zeros(&[4, 2, 3]);
    for_each_index(&x.shape, |i| want.set(&[i[2], i[0], i[1]], x.at(i)));
    let out = kernels::execute(&Permute { perm: vec![2, 0, 1] }.into(), &[x.tensor()]).unwrap();
    assert!(out[0].is_contiguous());
    check(&Nd::from_tensor(&out[0]), &want, EXACT, "permute");

    let pads = vec![[0, 1], [2, 0], [1, 3]];
    let mut want = Nd::zeros(&[3, 5, 8]);
    for_each_index(&x.shape, |i| want.set(&[i[0], i[1] + 2, i[2] + 1], x.at(i)));
    check(&exec(Pad { pads }, &[x.tensor()]), &want, EXACT, "pad");

    let mut want = Nd::zeros(&[2, 3, 2]);
    for_each_index(&[2, 3, 2], |i| want.set(i, x.at(&[i[0], i[1], i[2] + 1])));
    check(
        &exec(
            Slice {
                axis: 2,
                start: 1,
                end: 3,
            },
            &[x.tensor()],
        ),
        &want,
        EXACT,
        "slice",
    );

    let y = Nd::randn(&[2, 1, 4], &mut r, 1.0, 0.0);
    let mut want = Nd::zeros(&[2, 4, 4]);
    for_each_index(&[2, 4, 4], |i| {
        let v = if i[1] < 3 { x.at(i) } else { y.at(&[i[0], 0, i[2]]) };
        want.set(i, v)
    });
    check(
        &exec(Concat { axis: 1 }, &[x.tensor(), y.tensor()]),
        &want,
        EXACT,
        "concat",
    );
    // A reshape of a non-contiguous value (a slice) copies correctly.
    let sliced = kernels::execute(
        &Slice {
            axis: 2,
            start: 1,
            end: 3,
        }
        .into(),
        &[x.tensor()],
    )
    .unwrap();
    let got = exec(Reshape { shape: vec![12] }, &sliced);
    let mut want = Vec::new();
    for_each_index(&[2, 3, 2], |i| want.push(x.at(&[i[0], i[1], i[2] + 1])));
    check(&got, &Nd::new(&[12], want), EXACT, "reshape of a slice");
}

#[test]
fn max_pool2d_kernels_strides_padding() {
    let mut r = rng();
    let x = Nd::randn(&[2, 3, 7, 6], &mut r, 1.0, 0.0);
    let cases = [
        ([2, 2], [2, 2], [0, 0]),
        ([1, 1], [2, 2], [0, 0]),
        ([3, 3], [2, 2], [1, 1]),
        ([2, 3], [1, 2], [1, 0]),
    ];
    for (k, s, p) in cases {
        let op = MaxPool2d {
            kernel: k,
            stride: s,
            padding: p,
        };
        let ho = (7 + 2 * p[0] - k[0]) / s[0] + 1;
        let wo = (6 + 2 * p[1] - k[1]) / s[1] + 1;
        let mut want = Nd::zeros(&[2, 3, ho, wo]);
        for_each_index(&[2, 3, ho, wo], |i| {
            let mut m = f64::NEG_INFINITY;
            for a in 0..k[0] {
                for b in 0..k[1] {
                    let y = (i[2] * s[0] + a) as isize - p[0] as isize;
                    let xx = (i[3] * s[1] + b) as isize - p[1] as isize;
                    if y >= 0 && xx >= 0 && y < 7 && xx < 6 {
                        m = m.max(x.at(&[i[0], i[1], y as usize, xx as usize]));
                    }
                }
            }
            want.set(i, m);
        });
        check(
            &exec(op.clone(), &[x.tensor()]),
            &want,
            EXACT,
            &format!("max_pool2d {op:?}"),
        );
    }
}

// ---------------------------------------------------------------- resize

/// PyTorch's interpolate written as a direct 2-d sum over taps (not separable passes).
fn resize_ref(x: &Nd, size: [usize; 2], mode: ResizeMode, align: bool) -> Nd {
    let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let src = |d: usize, n_in: usize, n_out: usize| -> f64 {
        if align {
            if n_out > 1 {
                d as f64 * (n_in - 1) as f64 / (n_out - 1) as f64
            } else {
                0.0
            }
        } else {
            (d as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5
        }
    };
    // (index, weight) taps of one output coordinate
    let taps = |d: usize, n_in: usize, n_out: usize| -> Vec<(usize, f64)> {
        if n_in == n_out {
            return vec![(d, 1.0)];
        }
        let cl = |i: i64| i.clamp(0, n_in as i64 - 1) as usize;
        match mode {
            ResizeMode::Nearest => vec![(cl((d as f32 * (n_in as f32 / n_out as f32)).floor() as i64), 1.0)],
            ResizeMode::Bilinear => {
                let s = src(d, n_in, n_out).max(0.0);
                let i0 = s.floor() as i64;
                let l = s - i0 as f64;
                vec![(cl(i0), 1.0 - l), (cl(i0 + 1), l)]
            }
            ResizeMode::Bicubic => {
                let s = src(d, n_in, n_out);
                let i0 = s.floor() as i64;
                let t = s - i0 as f64;
                let a = -0.75;
                let k = |x: f64| {
                    let x = x.abs();
                    if x <= 1.0 {
                        (a + 2.0) * x.powi(3) - (a + 3.0) * x * x + 1.0
                    } else if x < 2.0 {
                        a * x.powi(3) - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
                    } else {
                        0.0
                    }
                };
                (-1..=2).map(|o| (cl(i0 + o), k(t - o as f64))).collect()
            }
        }
    };
    let mut y = Nd::zeros(&[n, c, size[0], size[1]]);
    for_each_index(&[n, c, size[0], size[1]], |i| {
        let mut s = 0.0;
        for (iy, wy) in taps(i[2], h, size[0]) {
            for (ix, wx) in taps(i[3], w, size[1]) {
                s += wy * wx * x.at(&[i[0], i[1], iy, ix]);
            }
        }
        y.set(i, s);
    });
    y
}

#[test]
fn resize_all_modes() {
    let mut r = rng();
    let x = Nd::randn(&[2, 3, 5, 7], &mut r, 1.0, 0.0);
    for mode in [ResizeMode::Nearest, ResizeMode::Bilinear, ResizeMode::Bicubic] {
        for align in [false, true] {
            if mode == ResizeMode::Nearest && align {
                continue;
            }
            for size in [[10, 14], [3, 4], [8, 5], [5, 7], [1, 1], [11, 2]] {
                let op = Resize {
                    size,
                    mode,
                    align_corners: align,
                };
                let tol = if mode == ResizeMode::Nearest { EXACT } else { RESIZE };
                let want = resize_ref(&x, size, mode, align);
                check(&exec(op.clone(), &[x.tensor()]), &want, tol, &format!("{op:?}"));
                // The portable (non-CPU) path computes in f32: a few ulp of O(1) values.
                let portable = resize::resize_portable(&op, &x.tensor()).unwrap();
                let tol = if mode == ResizeMode::Nearest { EXACT } else { ELEM };
                check(&Nd::from_tensor(&portable), &want, tol, &format!("portable {op:?}"));
            }
        }
    }
}

// ---------------------------------------------------------------- errors

#[test]
fn unsupported_requests_are_errors() {
    let x = Tensor::zeros((1, 1, 4, 4), DType::U32, &Device::Cpu).unwrap();
    match kernels::execute(&MaxPool2d::new(2, 2).into(), &[x]) {
        Err(KernelError::Unsupported(m)) => assert!(m.contains("floating point"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let x = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    match kernels::execute(
        &Op::Input(Input {
            name: "x".into(),
            ty: vitdet_ir::TensorType::f32([2, 2]),
        }),
        &[],
    ) {
        Err(KernelError::Unsupported(_)) => {}
        other => panic!("expected Unsupported, got {other:?}"),
    }
    match kernels::execute(&Unary { kind: UnaryKind::Gelu }.into(), &[x.clone(), x]) {
        Err(KernelError::Unsupported(m)) => assert!(m.contains("inputs"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}
