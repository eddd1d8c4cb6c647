//! The sigmoid BCE and smooth L1 losses and their gradients as tensor ops on the inputs'
//! device: the host loops' f64 arithmetic element by element (same operations, same order),
//! summed by the device. On the CPU the gradients equal the host loops' to the last bits of
//! the normalizer's sum, and the losses to f64 rounding of the sum (tested below); callers have
//! validated the shapes, the norm and the count.

use candle_core::{DType, Tensor};
use vitdet_ir::ops::LossNorm;

use super::Elementwise;
use crate::kernels::KernelResult;

fn f64s(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F64)
}

/// An f64 scalar on `t`'s device.
fn scalar(v: f64, t: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::new(v, t.device())
}

/// `a` where `mask` (u8, `a`'s shape), else 0.
fn keep(mask: &Tensor, a: &Tensor) -> candle_core::Result<Tensor> {
    mask.where_cond(a, &a.zeros_like()?)
}

/// The weights (a prefix of the elements' shape) broadcast to one per element, f64.
fn per_element(w: &Tensor, elems: &[usize], per: usize) -> candle_core::Result<Tensor> {
    let mut shape = w.dims().to_vec();
    shape.resize(elems.len(), 1);
    debug_assert_eq!(elems[w.rank()..].iter().product::<usize>(), per);
    f64s(w)?.reshape(shape)?.broadcast_as(elems)?.contiguous()
}

/// The normalizer as an f64 scalar `[]` (0 stands for "none": the loss and gradient are 0).
fn normalizer(norm: LossNorm, w: &Tensor, per: usize, count: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match (norm, count) {
        (LossNorm::Sum, _) => scalar(1.0, w),
        (LossNorm::Constant { value }, _) => scalar(value, w),
        (LossNorm::WeightedMean, _) => f64s(w)?.sum_all()?.broadcast_mul(&scalar(per as f64, w)?),
        (LossNorm::CountInput, Some(c)) => f64s(c)?.sum_all(),
        (LossNorm::CountInput, None) => unreachable!("the caller checked the count"),
    }
}

/// `a / n`, or 0 where `n` is 0.
fn divide_unless_zero(a: &Tensor, n: &Tensor) -> candle_core::Result<Tensor> {
    let quotient = a.broadcast_div(n)?;
    keep(&n.ne(0.0)?, &quotient)
}

/// The per-element loss `f(x, t)` in f64.
fn value(kind: Elementwise, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    match kind {
        // max(x, 0) - x t + ln(1 + exp(-|x|))
        Elementwise::Bce => {
            let softplus = x.abs()?.neg()?.exp()?.broadcast_add(&scalar(1.0, x)?)?.log()?;
            (x.relu()? - (x * t)?)? + softplus
        }
        // |d| (beta < 1e-5), else 0.5 d^2 / beta inside |d| < beta and |d| - beta / 2 outside.
        Elementwise::SmoothL1 { beta } => {
            let d = (x - t)?;
            let a = d.abs()?;
            if beta < 1e-5 {
                return Ok(a);
            }
            let inside = d
                .broadcast_mul(&scalar(0.5, &d)?)?
                .mul(&d)?
                .broadcast_div(&scalar(beta, &d)?)?;
            let outside = a.broadcast_sub(&scalar(0.5 * beta, &a)?)?;
            a.lt(beta)?.where_cond(&inside, &outside)
        }
    }
}

/// The per-element derivative `g(x, t)` in f64.
fn derivative(kind: Elementwise, x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    let one = scalar(1.0, x)?;
    match kind {
        // sigmoid(x) - t, without overflow: 1 / (1 + exp(-x)) for x >= 0, e / (1 + e) below.
        Elementwise::Bce => {
            let upper = x.neg()?.exp()?.broadcast_add(&one)?.recip()?;
            let e = x.exp()?;
            let lower = e.broadcast_div(&e.broadcast_add(&one)?)?;
            x.ge(0.0)?.where_cond(&upper, &lower)? - t
        }
        // d / beta inside |d| < beta, else sign(d) (0 at 0).
        Elementwise::SmoothL1 { beta } => {
            let d = (x - t)?;
            let sign = (d.gt(0.0)?.to_dtype(DType::F64)? - d.lt(0.0)?.to_dtype(DType::F64)?)?;
            if beta < 1e-5 {
                return Ok(sign);
            }
            let inside = d.broadcast_div(&scalar(beta, &d)?)?;
            d.abs()?.lt(beta)?.where_cond(&inside, &sign)
        }
    }
}

/// The loss of inputs `prediction, target, weights [, count]`: `sum(w f) / n` (0 when `n` is
/// 0; weight-0 elements add nothing, whatever their value), a scalar of the prediction's dtype.
pub(super) fn loss(kind: Elementwise, norm: LossNorm, x: &[Tensor], per: usize) -> KernelResult<Tensor> {
    let (p, t) = (f64s(&x[0])?, f64s(&x[1])?);
    let w = per_element(&x[2], p.dims(), per)?;
    let n = normalizer(norm, &x[2], per, x.get(3))?;
    let terms = keep(&w.ne(0.0)?, &(&w * value(kind, &p, &t)?)?)?;
    let sum = terms.sum_all()?;
    Ok(divide_unless_zero(&sum, &n)?.to_dtype(x[0].dtype())?)
}

/// The gradient of inputs `prediction, target, weights, dloss [, count]`: `(dloss / n) w g`
/// per element (0 for weight-0 elements and when `n` is 0), in the prediction's dtype.
pub(super) fn grad(kind: Elementwise, norm: LossNorm, x: &[Tensor], per: usize) -> KernelResult<Tensor> {
    let (p, t) = (f64s(&x[0])?, f64s(&x[1])?);
    let w = per_element(&x[2], p.dims(), per)?;
    let n = normalizer(norm, &x[2], per, x.get(4))?;
    let scale = divide_unless_zero(&f64s(&x[3])?, &n)?;
    let g = w.broadcast_mul(&scale)?.mul(&derivative(kind, &p, &t)?)?;
    Ok(keep(&w.ne(0.0)?, &g)?.to_dtype(x[0].dtype())?)
}

/// `logsumexp` of each row of `logits [N, C]` (f64) as `[N, 1]`: `m + ln(sum(exp(x - m)))` with
/// `m` the row's maximum, or `m` itself when it is not finite.
fn logsumexp_rows(logits: &Tensor) -> candle_core::Result<Tensor> {
    let m = logits.max_keepdim(1)?;
    let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + &m)?;
    m.abs()?.lt(f64::INFINITY)?.where_cond(&lse, &m)
}

/// The cross-entropy of inputs `logits [N, C], labels [N], weights [, count]` with labels known
/// to be in `0..C`: `sum(w (logsumexp(x) - x[label])) / n`, a scalar of the logits' dtype.
pub(super) fn cross_entropy(norm: LossNorm, x: &[Tensor], per: usize) -> KernelResult<Tensor> {
    let logits = f64s(&x[0])?;
    let n_rows = logits.dim(0)?;
    let labels = x[1].to_dtype(DType::I64)?.reshape((n_rows, 1))?;
    let picked = logits.gather(&labels, 1)?;
    let rows = (logsumexp_rows(&logits)? - picked)?.squeeze(1)?;
    let w = per_element(&x[2], &[n_rows], per)?;
    let n = normalizer(norm, &x[2], per, x.get(3))?;
    let terms = keep(&w.ne(0.0)?, &(&w * rows)?)?;
    Ok(divide_unless_zero(&terms.sum_all()?, &n)?.to_dtype(x[0].dtype())?)
}

/// Its gradient, inputs `logits, labels, weights, dloss [, count]`: row `r` is
/// `(dloss / n) w_r (softmax(x_r) - onehot(label_r))` (0 for weight-0 rows and when `n` is 0).
pub(super) fn cross_entropy_grad(norm: LossNorm, x: &[Tensor], per: usize) -> KernelResult<Tensor> {
    let logits = f64s(&x[0])?;
    let (n_rows, classes) = logits.dims2()?;
    let labels = x[1].to_dtype(DType::I64)?.reshape((n_rows, 1))?;
    let columns = Tensor::arange(0i64, classes as i64, logits.device())?.reshape((1, classes))?;
    let onehot = labels.broadcast_eq(&columns)?.to_dtype(DType::F64)?;
    let probs = logits.broadcast_sub(&logsumexp_rows(&logits)?)?.exp()?;
    let w = per_element(&x[2], &[n_rows], per)?.reshape((n_rows, 1))?;
    let n = normalizer(norm, &x[2], per, x.get(4))?;
    let scale = divide_unless_zero(&f64s(&x[3])?, &n)?;
    let g = w.broadcast_mul(&scale)?.broadcast_mul(&(probs - onehot)?)?;
    // As the host loop: nothing where the weight or the scale is 0, whatever the logits.
    let live = w.ne(0.0)?.broadcast_mul(&scale.ne(0.0)?)?;
    let live = live.broadcast_as((n_rows, classes))?.contiguous()?;
    Ok(keep(&live, &g)?.to_dtype(x[0].dtype())?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use vitdet_ir::ops::{
        SigmoidBceLoss, SigmoidBceLossGrad, SmoothL1Loss, SmoothL1LossGrad, SoftmaxCrossEntropyLoss,
        SoftmaxCrossEntropyLossGrad,
    };

    use super::*;

    fn t(v: Vec<f64>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    use crate::kernels::f64_values as vals;

    /// Predictions and targets `[12, 4]` with large, zero and non-finite values, weights per
    /// row with zeros on the non-finite rows, and a count.
    fn inputs() -> Vec<Tensor> {
        let p: Vec<f64> = (0..48)
            .map(|i| match i {
                5 => 0.0,
                9 => 60.0,
                13 => -60.0,
                40 => f64::NAN,
                41 => f64::INFINITY,
                _ => ((i * 37 % 23) as f64 - 11.0) * 0.31,
            })
            .collect();
        let tg: Vec<f64> = (0..48)
            .map(|i| if i == 5 { 0.0 } else { ((i * 7) % 3) as f64 * 0.5 })
            .collect();
        let w: Vec<f64> = (0..12).map(|r| if r == 10 { 0.0 } else { (r % 3) as f64 }).collect();
        vec![
            t(p, &[12, 4]),
            t(tg, &[12, 4]),
            t(w, &[12]),
            t(vec![1.5], &[]),
            t(vec![3.0, 4.0], &[2]),
        ]
    }

    fn close(got: &[f64], want: &[f64], rel: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= rel * b.abs() || a.to_bits() == b.to_bits(),
                "{what}[{i}]: {a:e} vs {b:e}"
            );
        }
    }

    /// The device path, run on the CPU, against the host loops for both losses, every norm,
    /// f64 (to rounding of the sums) and f32 (to a unit of f32 where a sum rounds differently).
    #[test]
    fn device_ops_match_the_host_loops() {
        let norms = [
            LossNorm::Sum,
            LossNorm::Constant { value: 256.0 },
            LossNorm::WeightedMean,
            LossNorm::CountInput,
        ];
        for dtype in [DType::F64, DType::F32] {
            let x: Vec<Tensor> = inputs().iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
            let rel = if dtype == DType::F64 { 1e-14 } else { 1.2e-7 };
            for norm in norms {
                let count = (norm == LossNorm::CountInput).then(|| x[4].clone());
                let fwd: Vec<Tensor> = x[..3].iter().cloned().chain(count.clone()).collect();
                let bwd: Vec<Tensor> = x[..4].iter().cloned().chain(count).collect();
                for kind in [
                    Elementwise::Bce,
                    Elementwise::SmoothL1 { beta: 0.0 },
                    Elementwise::SmoothL1 { beta: 0.8 },
                ] {
                    let what = format!("{kind:?} {norm:?} {dtype:?}");
                    let (host_loss, host_grad) = match kind {
                        Elementwise::Bce => (
                            super::super::sigmoid_bce_loss(&SigmoidBceLoss { norm }, &fwd).unwrap(),
                            super::super::sigmoid_bce_loss_grad(&SigmoidBceLossGrad { norm }, &bwd).unwrap(),
                        ),
                        Elementwise::SmoothL1 { beta } => (
                            super::super::smooth_l1_loss(&SmoothL1Loss { beta, norm }, &fwd).unwrap(),
                            super::super::smooth_l1_loss_grad(&SmoothL1LossGrad { beta, norm }, &bwd).unwrap(),
                        ),
                    };
                    let ours = loss(kind, norm, &fwd, 4).unwrap();
                    assert_eq!((ours.dims(), ours.dtype()), (host_loss.dims(), host_loss.dtype()));
                    close(&vals(&ours), &vals(&host_loss), rel, &format!("loss {what}"));
                    assert!(vals(&host_loss)[0].is_finite(), "weight 0 hides the non-finite rows");
                    let ours = grad(kind, norm, &bwd, 4).unwrap();
                    assert_eq!((ours.dims(), ours.dtype()), (host_grad.dims(), host_grad.dtype()));
                    close(&vals(&ours), &vals(&host_grad), rel, &format!("grad {what}"));
                }
            }
        }
        // The cross-entropy: 12 rows of 4 classes, labels in range, NaN and infinite logits in
        // a weight-0 row.
        for dtype in [DType::F64, DType::F32] {
            let x: Vec<Tensor> = inputs().iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
            let labels = Tensor::from_vec(
                (0..12).map(|r| (r * 5 % 4) as i64).collect::<Vec<_>>(),
                12,
                &Device::Cpu,
            )
            .unwrap();
            let rel = if dtype == DType::F64 { 1e-14 } else { 1.2e-7 };
            for norm in norms {
                let count = (norm == LossNorm::CountInput).then(|| x[4].clone());
                let fwd: Vec<Tensor> = [x[0].clone(), labels.clone(), x[2].clone()]
                    .into_iter()
                    .chain(count.clone())
                    .collect();
                let bwd: Vec<Tensor> = [x[0].clone(), labels.clone(), x[2].clone(), x[3].clone()]
                    .into_iter()
                    .chain(count)
                    .collect();
                let what = format!("cross-entropy {norm:?} {dtype:?}");
                let host = super::super::softmax_cross_entropy_loss(&SoftmaxCrossEntropyLoss::new(norm), &fwd).unwrap();
                let ours = cross_entropy(norm, &fwd, 1).unwrap();
                assert_eq!((ours.dims(), ours.dtype()), (host.dims(), host.dtype()));
                close(&vals(&ours), &vals(&host), rel, &format!("loss {what}"));
                let host = super::super::softmax_cross_entropy_loss_grad(&SoftmaxCrossEntropyLossGrad::new(norm), &bwd)
                    .unwrap();
                let ours = cross_entropy_grad(norm, &bwd, 1).unwrap();
                assert_eq!((ours.dims(), ours.dtype()), (host.dims(), host.dtype()));
                close(&vals(&ours), &vals(&host), rel, &format!("grad {what}"));
            }
        }

        // A zero normalizer gives 0 for the loss and its gradient.
        let mut x = inputs();
        x[2] = x[2].zeros_like().unwrap();
        let l = loss(Elementwise::Bce, LossNorm::WeightedMean, &x[..3], 4).unwrap();
        let g = grad(Elementwise::Bce, LossNorm::WeightedMean, &x[..4], 4).unwrap();
        assert_eq!(vals(&l), [0.0]);
        assert!(vals(&g).iter().all(|&v| v == 0.0));
    }
}
