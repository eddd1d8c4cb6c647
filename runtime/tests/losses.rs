//! Loss kernels and their gradients against PyTorch (`runtime/tests/fixtures/losses.safetensors`,
//! made by `generate_losses.py`: inputs rounded to f32, references and autograd gradients
//! computed in f64 and stored as f32) and against central finite differences.
//!
//! Tolerances:
//! * vs PyTorch: `atol 1e-7 + rtol 2e-6`. The kernels read the same f32 inputs, accumulate in
//!   f64 and round once, so the only differences are the two f32 roundings of the output
//!   (0.5 ulp each, ~6e-8 relative) plus f64 summation order.
//! * finite differences: f64 inputs, step 1e-5, central differences, so the truncation error
//!   is O(h^2 * f''') ~ 1e-10 and the rounding error ~ 1e-16 / 1e-5 = 1e-11 on O(1) values:
//!   `atol 1e-7` leaves a wide margin while catching any wrong factor or sign.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use vitdet_ir::ops::*;
use vitdet_ir::{Op, TensorType};
use vitdet_runtime::kernels::{self, KernelError};

fn fixtures() -> HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/losses.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("runtime/tests/fixtures/losses.safetensors")
}

fn run(op: impl Into<Op>, inputs: &[&Tensor]) -> Tensor {
    let op = op.into();
    let inputs: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    let mut out = kernels::execute(&op, &inputs).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn scalar(t: &Tensor) -> f64 {
    assert_eq!(t.rank(), 0, "a loss is a scalar []");
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn close(got: f64, want: f64, what: &str) {
    let tol = 1e-7 + 2e-6 * want.abs();
    assert!((got - want).abs() <= tol, "{what}: got {got}, want {want}");
}

const ATOL: f64 = 1e-7;
const RTOL: f64 = 2e-6;

/// Checks a forward op and its gradient op against the fixture: `inputs` are the forward
/// inputs in order (count last when present), the gradient op gets `dloss` before the count.
fn check_pair(fwd: Op, grad: Op, inputs: &[&Tensor], has_count: bool, want: &Tensor, want_grad: &Tensor, what: &str) {
    let f = fixtures();
    close(scalar(&run(fwd, inputs)), scalar(want), what);
    let mut gin: Vec<&Tensor> = inputs[..3].to_vec();
    gin.push(&f["dloss"]);
    if has_count {
        gin.push(inputs[3]);
    }
    let g = run(grad, &gin);
    assert_eq!(g.dims(), inputs[0].dims());
    assert_close(
        &Nd::from_tensor(&g),
        &Nd::from_tensor(want_grad),
        ATOL,
        RTOL,
        &format!("{what} grad"),
    );
}

#[test]
fn sigmoid_bce_matches_pytorch() {
    let f = fixtures();
    let (x, t) = (&f["bce_logits"], &f["bce_targets"]);
    // Weights per row, broadcast over 5 columns; mean over the weighted elements.
    let norm = LossNorm::WeightedMean;
    check_pair(
        SigmoidBceLoss { norm }.into(),
        SigmoidBceLossGrad { norm }.into(),
        &[x, t, &f["bce_w_rows"]],
        false,
        &f["bce_mean_rows"],
        &f["bce_mean_rows_grad"],
        "bce mean, row weights",
    );
    // Full-shape weights, constant normalizer (the RPN's 256).
    let norm = LossNorm::Constant { value: 256.0 };
    check_pair(
        SigmoidBceLoss { norm }.into(),
        SigmoidBceLossGrad { norm }.into(),
        &[x, t, &f["bce_w_full"]],
        false,
        &f["bce_const_full"],
        &f["bce_const_full_grad"],
        "bce / 256, full weights",
    );
    let sum = run(SigmoidBceLoss { norm: LossNorm::Sum }, &[x, t, &f["bce_w_rows"]]);
    close(scalar(&sum), scalar(&f["bce_sum_rows"]), "bce sum");
}

#[test]
fn smooth_l1_matches_pytorch_and_fvcore() {
    let f = fixtures();
    let (p, q) = (&f["sl1_pred"], &f["sl1_target"]);
    // beta 0 = L1 (detectron2's configs), normalized by the sum of a count input.
    let norm = LossNorm::CountInput;
    check_pair(
        SmoothL1Loss { beta: 0.0, norm }.into(),
        SmoothL1LossGrad { beta: 0.0, norm }.into(),
        &[p, q, &f["sl1_w_rows"], &f["sl1_count"]],
        true,
        &f["l1_count"],
        &f["l1_count_grad"],
        "l1 / count",
    );
    let norm = LossNorm::Constant { value: 3.0 };
    check_pair(
        SmoothL1Loss { beta: 0.5, norm }.into(),
        SmoothL1LossGrad { beta: 0.5, norm }.into(),
        &[p, q, &f["sl1_w_full"]],
        false,
        &f["sl1_const"],
        &f["sl1_const_grad"],
        "smooth l1 beta 0.5 / 3",
    );
}

#[test]
fn cross_entropy_matches_pytorch() {
    let f = fixtures();
    let norm = LossNorm::WeightedMean;
    check_pair(
        SoftmaxCrossEntropyLoss::new(norm).into(),
        SoftmaxCrossEntropyLossGrad::new(norm).into(),
        &[&f["ce_logits"], &f["ce_labels"], &f["ce_w"]],
        false,
        &f["ce_mean"],
        &f["ce_mean_grad"],
        "cross-entropy mean",
    );
}

// ------------------------------------------------------------------------------- finite differences

fn t64(nd: &Nd) -> Tensor {
    nd.tensor_as(DType::F64)
}

/// Central differences of the scalar `loss(x)` against `grad` (the gradient op's output for
/// `dloss = 1`), element by element.
fn check_fd(loss: impl Fn(&Tensor) -> f64, x: &Nd, grad: &Tensor, what: &str) {
    let h = 1e-5;
    let g = Nd::from_tensor(grad);
    let mut fd = Nd::zeros(&x.shape);
    for i in 0..x.numel() {
        let mut up = x.clone();
        up.data[i] += h;
        let mut down = x.clone();
        down.data[i] -= h;
        fd.data[i] = (loss(&t64(&up)) - loss(&t64(&down))) / (2.0 * h);
    }
    assert_close(&g, &fd, 1e-7, 1e-6, what);
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = TestRng::new(7);
    let one = Tensor::new(1.0f64, &Device::Cpu).unwrap();

    // BCE, soft targets, row weights, weighted mean.
    let x = Nd::randn(&[4, 3], &mut rng, 2.0, 0.0);
    let t = Nd::new(&[4, 3], (0..12).map(|_| rng.uniform()).collect());
    let w = Nd::new(&[4], vec![1.0, 0.5, 0.0, 2.0]);
    let norm = LossNorm::WeightedMean;
    let (tt, wt) = (t64(&t), t64(&w));
    let g = run(SigmoidBceLossGrad { norm }, &[&t64(&x), &tt, &wt, &one]);
    check_fd(
        |xx| scalar(&run(SigmoidBceLoss { norm }, &[xx, &tt, &wt])),
        &x,
        &g,
        "bce",
    );

    // Smooth L1 with beta (differences kept away from the kinks at |d| = beta and 0).
    let p = Nd::randn(&[5, 4], &mut rng, 1.0, 0.0);
    let q = Nd::new(
        &[5, 4],
        p.data
            .iter()
            .enumerate()
            .map(|(i, v)| v + [0.05, -0.3, 1.2, -2.0][i % 4])
            .collect(),
    );
    let w = Nd::randn(&[5, 4], &mut rng, 1.0, 0.0);
    let count = Tensor::new(&[2.0f64, 3.0, 0.5], &Device::Cpu).unwrap();
    let norm = LossNorm::CountInput;
    let (qt, wt) = (t64(&q), t64(&w));
    for beta in [0.0, 0.5] {
        let g = run(SmoothL1LossGrad { beta, norm }, &[&t64(&p), &qt, &wt, &one, &count]);
        check_fd(
            |pp| scalar(&run(SmoothL1Loss { beta, norm }, &[pp, &qt, &wt, &count])),
            &p,
            &g,
            &format!("smooth l1 beta {beta}"),
        );
    }

    // Cross-entropy, per-row weights, plain sum.
    let z = Nd::randn(&[4, 5], &mut rng, 2.0, 0.0);
    let labels = Tensor::new(&[4i64, 0, 2, 2], &Device::Cpu).unwrap();
    let w = t64(&Nd::new(&[4], vec![1.0, 0.0, 0.7, 1.3]));
    let norm = LossNorm::Sum;
    let g = run(SoftmaxCrossEntropyLossGrad::new(norm), &[&t64(&z), &labels, &w, &one]);
    check_fd(
        |zz| scalar(&run(SoftmaxCrossEntropyLoss::new(norm), &[zz, &labels, &w])),
        &z,
        &g,
        "cross-entropy",
    );
}

// ------------------------------------------------------------------------------- edge cases

#[test]
fn zero_normalizer_gives_zero_loss_and_gradient() {
    let x = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
    let t = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
    let w = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let d = Tensor::new(1.0f32, &Device::Cpu).unwrap();
    // detectron2: no foreground -> mask loss 0; no sampled RoI -> box loss 0.
    let norm = LossNorm::WeightedMean;
    assert_eq!(scalar(&run(SigmoidBceLoss { norm }, &[&x, &t, &w])), 0.0);
    let g = run(SigmoidBceLossGrad { norm }, &[&x, &t, &w, &d]);
    assert_eq!(Nd::from_tensor(&g).data, vec![0.0; 4]);
    let count = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let ones = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    let norm = LossNorm::CountInput;
    assert_eq!(
        scalar(&run(SmoothL1Loss { beta: 0.0, norm }, &[&x, &t, &ones, &count])),
        0.0
    );
}

#[test]
fn zero_weights_mask_non_finite_entries() {
    // Unused static slots may hold anything; a zero weight removes them exactly.
    let x = Tensor::new(&[[0.5f32, 1.0], [f32::NAN, f32::INFINITY]], &Device::Cpu).unwrap();
    let t = Tensor::new(&[[0.0f32, 0.0], [f32::NAN, 1.0]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
    let loss = scalar(&run(
        SmoothL1Loss {
            beta: 0.0,
            norm: LossNorm::Sum,
        },
        &[&x, &t, &w],
    ));
    assert_eq!(loss, 1.5);
    let d = Tensor::new(2.0f32, &Device::Cpu).unwrap();
    let g = run(
        SmoothL1LossGrad {
            beta: 0.0,
            norm: LossNorm::Sum,
        },
        &[&x, &t, &w, &d],
    );
    assert_eq!(Nd::from_tensor(&g).data, vec![2.0, 2.0, 0.0, 0.0]);
}

#[test]
fn large_logits_stay_finite() {
    // The naive log(sigmoid(x)) would give -inf for x = -100 in f32.
    let x = Tensor::new(&[100.0f32, -100.0], &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.0f32, 1.0], &Device::Cpu).unwrap();
    let w = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    let loss = scalar(&run(SigmoidBceLoss { norm: LossNorm::Sum }, &[&x, &t, &w]));
    assert!((loss - 200.0).abs() < 1e-4, "{loss}");
    let z = Tensor::new(&[[1000.0f32, 0.0, -1000.0]], &Device::Cpu).unwrap();
    let l = Tensor::new(&[2i64], &Device::Cpu).unwrap();
    let w = Tensor::ones(1, DType::F32, &Device::Cpu).unwrap();
    let loss = scalar(&run(SoftmaxCrossEntropyLoss::new(LossNorm::Sum), &[&z, &l, &w]));
    assert!((loss - 2000.0).abs() < 1e-3, "{loss}");
}

#[test]
fn bad_inputs_are_errors() {
    let z = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    let labels = Tensor::new(&[1i64, 3], &Device::Cpu).unwrap();
    let op: Op = SoftmaxCrossEntropyLoss::new(LossNorm::Sum).into();
    match kernels::execute(&op, &[z.clone(), labels, w.clone()]) {
        Err(KernelError::Candle(e)) => assert!(e.to_string().contains("label 3 (row 1)"), "{e}"),
        other => panic!("expected a data error, got {other:?}"),
    }
    // Type rules: count only with count_input; weights a prefix of the element shape.
    let f = |s: &[usize]| TensorType::f32(s.to_vec());
    let rule = SmoothL1Loss {
        beta: 0.0,
        norm: LossNorm::CountInput,
    };
    let err = rule.infer(&[&f(&[2, 4]), &f(&[2, 4]), &f(&[2])]).unwrap_err();
    assert!(err.contains("count"), "{err}");
    let rule = SmoothL1Loss {
        beta: 0.0,
        norm: LossNorm::Sum,
    };
    assert!(rule.infer(&[&f(&[2, 4]), &f(&[2, 4]), &f(&[4])]).is_err());
    assert_eq!(rule.infer(&[&f(&[2, 4]), &f(&[2, 4]), &f(&[2])]).unwrap(), vec![f(&[])]);
    let rule = SigmoidBceLoss {
        norm: LossNorm::Constant { value: 0.0 },
    };
    assert!(rule.infer(&[&f(&[2]), &f(&[2]), &f(&[2])]).is_err());
    let grad = SigmoidBceLossGrad { norm: LossNorm::Sum };
    let err = grad.infer(&[&f(&[2]), &f(&[2]), &f(&[2]), &f(&[1])]).unwrap_err();
    assert!(err.contains("dloss"), "{err}");
    let _ = (z, w);
}
