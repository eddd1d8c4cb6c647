//! `conv_transpose2d` (the input gradient of every `conv2d` in training) against a plain-loop f64
//! reference, over every combination of stride, padding, output padding, dilation and kernel
//! size the CPU paths (flipped-kernel im2col convolution for stride 1, gemm + col2im otherwise)
//! have to handle, in f32, f64 and the half types, and with inputs large enough to be split
//! into tiles of images or of input rows; and `conv2d_grad_weight` (the other half of a
//! convolution's backward pass) against its own plain-loop reference.
//!
//! Inputs are rounded to f32 before both computations. Tolerances:
//! * f32 (atol 1e-5, rtol 1e-5): each output sums at most `Ci * ceil(kh / s) * ceil(kw / s)`
//!   (here <= 36) f32 products of O(1) values, rounding error ~ terms * 6e-8 * sum |terms|.
//! * f64 (atol 1e-12, rtol 1e-12): the same sums in f64 (error ~ 36 * 1.1e-16 * sum |terms|).
//! * f16 (atol 2e-2, rtol 2e-2) / bf16 (atol 1e-1, rtol 2e-2): inputs and result rounded to
//!   11 / 8 significant bits (relative 5e-4 / 4e-3 of O(1) values; sums of up to 36 terms).

#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::{DType, Tensor};
use common::*;
use vitdet_ir::ops::{Conv2dGradWeight, ConvTranspose2d};
use vitdet_ir::Op;
use vitdet_runtime::kernels;

const F32: (f64, f64) = (1e-5, 1e-5);
const F64: (f64, f64) = (1e-12, 1e-12);

/// `(H_out, W_out)`, or `None` when the padding leaves no output.
fn out_size(x: &[usize], w: &[usize], op: &ConvTranspose2d) -> Option<[usize; 2]> {
    let mut out = [0; 2];
    for d in 0..2 {
        let full = (x[2 + d] - 1) * op.stride[d] + op.dilation[d] * (w[2 + d] - 1) + op.output_padding[d] + 1;
        if full <= 2 * op.padding[d] {
            return None;
        }
        out[d] = full - 2 * op.padding[d];
    }
    Some(out)
}

/// PyTorch's definition: input pixel `(iy, ix)` times tap `(a, b)` lands on output
/// `(iy s + a d - p, ix s + b d - p)`; contributions outside the output are dropped.
fn reference(x: &Nd, w: &Nd, b: Option<&Nd>, op: &ConvTranspose2d) -> Nd {
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (o, kh, kw) = (w.shape[1], w.shape[2], w.shape[3]);
    let [ho, wo] = out_size(&x.shape, &w.shape, op).expect("valid attributes");
    let mut y = vec![0f64; n * o * ho * wo];
    for ni in 0..n {
        for oi in 0..o {
            let bias = b.map(|b| b.data[oi]).unwrap_or(0.0);
            y[(ni * o + oi) * ho * wo..][..ho * wo]
                .iter_mut()
                .for_each(|v| *v = bias);
        }
        for ci in 0..c {
            for iy in 0..h {
                for ix in 0..wd {
                    let xv = x.data[((ni * c + ci) * h + iy) * wd + ix];
                    for oi in 0..o {
                        for a in 0..kh {
                            let oy = (iy * op.stride[0] + a * op.dilation[0]) as isize - op.padding[0] as isize;
                            if oy < 0 || oy >= ho as isize {
                                continue;
                            }
                            for bb in 0..kw {
                                let ox = (ix * op.stride[1] + bb * op.dilation[1]) as isize - op.padding[1] as isize;
                                if ox < 0 || ox >= wo as isize {
                                    continue;
                                }
                                let wv = w.data[((ci * o + oi) * kh + a) * kw + bb];
                                y[((ni * o + oi) * ho + oy as usize) * wo + ox as usize] += xv * wv;
                            }
                        }
                    }
                }
            }
        }
    }
    Nd::new(&[n, o, ho, wo], y)
}

fn run(op: &ConvTranspose2d, ins: &[Tensor]) -> Result<Tensor, String> {
    let op = Op::ConvTranspose2d(op.clone());
    kernels::execute(&op, ins)
        .map(|mut v| v.remove(0))
        .map_err(|e| e.to_string())
}

/// One attribute set for one spatial axis: (kernel, stride, padding, output padding, dilation).
type Axis = (usize, usize, usize, usize, usize);

fn axes() -> Vec<Axis> {
    let mut v = Vec::new();
    for k in 1..=3 {
        for s in 1..=3 {
            for p in 0..=2 {
                for d in 1..=2 {
                    // PyTorch allows output_padding < max(stride, dilation).
                    for q in 0..s.max(d) {
                        v.push((k, s, p, q, d));
                    }
                }
            }
        }
    }
    v
}

#[test]
fn every_attribute_combination_matches_the_reference() {
    let mut r = TestRng::new(0xdec0);
    let all = axes();
    let (mut checked, mut rejected) = (0, 0);
    for (i, &(kh, sh, ph, qh, dh)) in all.iter().enumerate() {
        // Pair each height setting with a pseudo-random width setting (non-square kernels,
        // strides, paddings and dilations).
        let (kw, sw, pw, qw, dw) = all[(i * 37 + 11) % all.len()];
        let op = ConvTranspose2d {
            stride: [sh, sw],
            padding: [ph, pw],
            output_padding: [qh, qw],
            dilation: [dh, dw],
        };
        let (n, ci, co) = (1 + i % 2, 1 + i % 3, 1 + (i / 3) % 3);
        let sx = [n, ci, 2 + i % 3, 3 + (i / 2) % 3];
        let sw_ = [ci, co, kh, kw];
        let x = Nd::randn(&sx, &mut r, 1.0, 0.0);
        let w = Nd::randn(&sw_, &mut r, 0.5, 0.0);
        let b = Nd::randn(&[co], &mut r, 1.0, 0.0);
        let bias = i % 4 != 0;
        for (dtype, tol) in [(DType::F32, F32), (DType::F64, F64)] {
            let mut ins = vec![x.tensor_as(dtype), w.tensor_as(dtype)];
            if bias {
                ins.push(b.tensor_as(dtype));
            }
            let what = format!("{sx:?} {sw_:?} {op:?} {dtype:?}");
            match (out_size(&sx, &sw_, &op), run(&op, &ins)) {
                (Some(_), Ok(got)) => {
                    assert_eq!(got.dtype(), dtype, "{what}");
                    let want = reference(&x, &w, bias.then_some(&b), &op);
                    assert_close(&Nd::from_tensor(&got), &want, tol.0, tol.1, &what);
                    // The lowering other devices run (a stride-1 convolution).
                    let lowered = kernels::conv::conv_transpose2d_portable(&op, &ins[0], &ins[1], ins.get(2))
                        .unwrap_or_else(|e| panic!("{what}: portable path: {e}"));
                    assert_close(
                        &Nd::from_tensor(&lowered),
                        &want,
                        tol.0,
                        tol.1,
                        &format!("{what} (portable)"),
                    );
                    checked += 1;
                }
                (None, Err(e)) => {
                    assert!(e.contains("no output"), "{what}: {e}");
                    rejected += 1;
                }
                (Some(_), Err(e)) => panic!("{what}: {e}"),
                (None, Ok(t)) => panic!("{what}: expected an error, got {:?}", t.dims()),
            }
        }
    }
    // 117 height settings, two dtypes each; the sweep must exercise both outcomes (and mostly
    // valid attributes).
    assert_eq!(checked + rejected, 2 * all.len());
    assert!(checked > 150 && rejected > 0, "{checked} checked, {rejected} rejected");
}

#[test]
fn symmetric_training_shapes() {
    // The input gradients of the heads' 3x3 / 1x1 convolutions, a strided 3x3 (stride-2
    // convolutions' gradients) and the pyramid's 2x2 stride-2 upsampling (kept on its own path).
    let mut r = TestRng::new(7);
    let op = |s: usize, p: usize, q: usize| ConvTranspose2d {
        stride: [s, s],
        padding: [p, p],
        output_padding: [q, q],
        dilation: [1, 1],
    };
    let cases: Vec<([usize; 4], [usize; 4], ConvTranspose2d)> = vec![
        ([5, 8, 7, 7], [8, 6, 3, 3], op(1, 1, 0)),
        ([3, 12, 6, 5], [12, 5, 1, 1], op(1, 0, 0)),
        ([2, 6, 5, 6], [6, 4, 3, 3], op(2, 1, 1)),
        ([1, 4, 4, 4], [4, 3, 2, 2], ConvTranspose2d::upsample(2)),
    ];
    for (sx, sw, o) in cases {
        let x = Nd::randn(&sx, &mut r, 1.0, 0.0);
        let w = Nd::randn(&sw, &mut r, 0.3, 0.0);
        let got = run(&o, &[x.tensor(), w.tensor()]).unwrap();
        let want = reference(&x, &w, None, &o);
        assert_close(
            &Nd::from_tensor(&got),
            &want,
            F32.0,
            F32.1,
            &format!("{sx:?} {sw:?} {o:?}"),
        );
    }
}

#[test]
fn half_types_and_strided_inputs() {
    let mut r = TestRng::new(11);
    let op = ConvTranspose2d {
        stride: [2, 1],
        padding: [1, 2],
        output_padding: [1, 0],
        dilation: [1, 2],
    };
    let x = Nd::randn(&[2, 4, 5, 6], &mut r, 1.0, 0.0);
    let w = Nd::randn(&[4, 3, 3, 3], &mut r, 0.3, 0.0);
    let b = Nd::randn(&[3], &mut r, 1.0, 0.0);
    let want = reference(&x, &w, Some(&b), &op);
    for (dtype, tol) in [(DType::F16, (2e-2, 2e-2)), (DType::BF16, (1e-1, 2e-2))] {
        let got = run(&op, &[x.tensor_as(dtype), w.tensor_as(dtype), b.tensor_as(dtype)]).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert_close(&Nd::from_tensor(&got), &want, tol.0, tol.1, &format!("{dtype:?}"));
    }
    // A non-contiguous input (a transposed view of a transposed copy) gives the same values.
    let xt = x
        .tensor()
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    assert!(!xt.is_contiguous());
    let got = run(&op, &[xt, w.tensor(), b.tensor()]).unwrap();
    assert_close(&Nd::from_tensor(&got), &want, F32.0, F32.1, "non-contiguous input");
}

#[test]
fn tiles_of_input_rows() {
    // 128 * 3 * 3 taps * 90 columns * 4 bytes = 405 KiB of columns per input row, so a 32 MiB
    // tile holds 80 of the 100 rows: two row tiles whose outputs overlap (3 taps, stride 2).
    let mut r = TestRng::new(13);
    let op = ConvTranspose2d {
        stride: [2, 2],
        padding: [1, 1],
        output_padding: [1, 0],
        dilation: [1, 1],
    };
    let x = Nd::randn(&[1, 2, 100, 90], &mut r, 1.0, 0.0);
    let w = Nd::randn(&[2, 128, 3, 3], &mut r, 0.3, 0.0);
    let got = run(&op, &[x.tensor(), w.tensor()]).unwrap();
    let want = reference(&x, &w, None, &op);
    assert_close(&Nd::from_tensor(&got), &want, F32.0, F32.1, "row tiles");
}

#[test]
fn tiles_of_images() {
    // 64 * 3 * 3 taps * 7 * 7 * 4 bytes = 110 KiB of columns per image: 297 images per 32 MiB
    // tile, so 600 images make three tiles (the last one partial).
    let mut r = TestRng::new(17);
    let op = ConvTranspose2d {
        stride: [1, 1],
        padding: [1, 1],
        output_padding: [0, 0],
        dilation: [1, 1],
    };
    let x = Nd::randn(&[600, 2, 7, 7], &mut r, 1.0, 0.0);
    let w = Nd::randn(&[2, 64, 3, 3], &mut r, 0.3, 0.0);
    let b = Nd::randn(&[64], &mut r, 1.0, 0.0);
    let got = run(&op, &[x.tensor(), w.tensor(), b.tensor()]).unwrap();
    let want = reference(&x, &w, Some(&b), &op);
    assert_close(&Nd::from_tensor(&got), &want, F32.0, F32.1, "image tiles");
}

#[test]
fn bad_operands_are_errors() {
    let op = ConvTranspose2d {
        stride: [1, 1],
        padding: [0, 0],
        output_padding: [0, 0],
        dilation: [1, 1],
    };
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
    let w = Tensor::zeros((2, 5, 3, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = run(&op, &[x.clone(), w]).unwrap_err();
    assert!(e.contains("input channels"), "{e}");
    let w = Tensor::zeros((3, 5, 3, 3), DType::F64, &candle_core::Device::Cpu).unwrap();
    assert!(run(&op, &[x.clone(), w]).is_err(), "mixed dtypes");
    let zero_stride = ConvTranspose2d { stride: [0, 1], ..op };
    let w = Tensor::zeros((3, 5, 3, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = run(&zero_stride, &[x, w]).unwrap_err();
    assert!(e.contains("invalid"), "{e}");
}

/// `dw[o, c, a, b] = sum over (n, y, z) of dy[n, o, y, z] x[n, g c_g + c, y s + a d - p, z s + b d - p]`.
fn grad_weight_reference(x: &Nd, dy: &Nd, op: &Conv2dGradWeight) -> Nd {
    let (n, cin, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (o, ho, wo) = (dy.shape[1], dy.shape[2], dy.shape[3]);
    let [kh, kw] = op.kernel;
    let (cg, og) = (cin / op.groups, o / op.groups);
    let mut dw = vec![0f64; o * cg * kh * kw];
    for ni in 0..n {
        for oi in 0..o {
            for c in 0..cg {
                let xc = (oi / og) * cg + c;
                for a in 0..kh {
                    for b in 0..kw {
                        let mut s = 0.0;
                        for y in 0..ho {
                            let iy = (y * op.stride[0] + a * op.dilation[0]) as isize - op.padding[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for z in 0..wo {
                                let ix = (z * op.stride[1] + b * op.dilation[1]) as isize - op.padding[1] as isize;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                s += dy.data[((ni * o + oi) * ho + y) * wo + z]
                                    * x.data[((ni * cin + xc) * h + iy as usize) * wd + ix as usize];
                            }
                        }
                        dw[((oi * cg + c) * kh + a) * kw + b] += s;
                    }
                }
            }
        }
    }
    Nd::new(&[o, cg, kh, kw], dw)
}

#[test]
fn grad_weight_matches_the_reference() {
    // Stride 1 (contiguous im2col) and strided (strided im2col) columns, both gemm orientations,
    // groups, dilation, asymmetric attributes, and 300 images of 64 channels (110 KiB of f32
    // columns each, 297 per 32 MiB tile: two image tiles summed). f32 tolerance: sums of up to
    // 300 * 49 = 14700 products of N(0, 1) values (typical magnitude ~120), rounding ~ 1e-7
    // relative to the sum of |terms| ~ 1e4: atol 2e-3. f64: the same sums with 1e-16 rounding,
    // atol 1e-9 leaves a wide margin.
    let mut r = TestRng::new(19);
    let gw = |k: [usize; 2], s: [usize; 2], p: [usize; 2], d: [usize; 2], g: usize| Conv2dGradWeight {
        stride: s,
        padding: p,
        dilation: d,
        groups: g,
        kernel: k,
    };
    let cases: Vec<([usize; 4], usize, Conv2dGradWeight)> = vec![
        ([2, 4, 7, 6], 6, gw([3, 3], [1, 1], [1, 1], [1, 1], 2)),
        ([1, 3, 9, 8], 2, gw([3, 2], [1, 1], [2, 0], [2, 3], 1)),
        ([2, 2, 9, 10], 3, gw([3, 3], [2, 3], [1, 0], [1, 2], 1)),
        ([1, 4, 8, 8], 4, gw([1, 1], [2, 2], [0, 0], [1, 1], 2)),
        // More output channels than Cin/g*kh*kw (the `dy @ cols^T` orientation).
        ([2, 3, 6, 5], 8, gw([1, 1], [1, 1], [0, 0], [1, 1], 1)),
        ([1, 4, 7, 6], 10, gw([2, 1], [2, 1], [1, 0], [1, 1], 2)),
        ([300, 64, 7, 7], 2, gw([3, 3], [1, 1], [1, 1], [1, 1], 1)),
    ];
    for (sx, o, op) in cases {
        let mut ho_wo = [0; 2];
        for d in 0..2 {
            ho_wo[d] = (sx[2 + d] + 2 * op.padding[d] - op.dilation[d] * (op.kernel[d] - 1) - 1) / op.stride[d] + 1;
        }
        let x = Nd::randn(&sx, &mut r, 1.0, 0.0);
        let dy = Nd::randn(&[sx[0], o, ho_wo[0], ho_wo[1]], &mut r, 1.0, 0.0);
        let want = grad_weight_reference(&x, &dy, &op);
        for (dtype, tol) in [(DType::F32, (2e-3, 1e-5)), (DType::F64, (1e-9, 1e-12))] {
            let got = kernels::execute(
                &Op::Conv2dGradWeight(op.clone()),
                &[x.tensor_as(dtype), dy.tensor_as(dtype)],
            )
            .unwrap()
            .remove(0);
            assert_close(
                &Nd::from_tensor(&got),
                &want,
                tol.0,
                tol.1,
                &format!("{sx:?} {op:?} {dtype:?}"),
            );
        }
    }
}
