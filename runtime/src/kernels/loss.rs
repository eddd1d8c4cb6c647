//! Loss kernels (`vitdet_ir::ops::loss`): weighted sigmoid BCE, smooth L1 and softmax
//! cross-entropy reduced to a scalar, and their gradients.
//!
//! Host loops in f64: losses read a few hundred thousand values at most (the RPN's anchors),
//! and f64 sums make the result independent of the thread count. On a GPU, the sigmoid BCE and
//! smooth L1 losses and their gradients run as the same f64 arithmetic in device tensor ops
//! (`on_device`), so the step does not wait for the device to copy their inputs to the host,
//! and so does the cross-entropy where the compiler proved its labels in range
//! (`labels_in_range`); otherwise it checks them on the host, computing there, and copies its
//! result back to the first input's device, in its dtype.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use vitdet_ir::ops::{
    LossNorm, SigmoidBceLoss, SigmoidBceLossGrad, SmoothL1Loss, SmoothL1LossGrad, SoftmaxCrossEntropyLoss,
    SoftmaxCrossEntropyLossGrad,
};

use super::{expect_float, KernelError, KernelResult};
use crate::dtype::describe;

mod on_device;

/// The elementwise losses the device path computes (see [`on_device`]).
#[derive(Clone, Copy, Debug)]
enum Elementwise {
    Bce,
    SmoothL1 { beta: f64 },
}

fn unsupported<T>(msg: String) -> KernelResult<T> {
    Err(KernelError::Unsupported(msg))
}

fn host_f64(t: &Tensor) -> KernelResult<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// A tensor of `like`'s dtype and device from f64 host data.
fn output(data: Vec<f64>, shape: &[usize], like: &Tensor) -> KernelResult<Tensor> {
    let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(like.dtype())?;
    Ok(if like.device().is_cpu() {
        t
    } else {
        t.to_device(like.device())?
    })
}

/// Checks that the weights have a prefix of the per-element shape `elems` and returns how
/// many elements each weight covers (the weights are broadcast over the trailing axes).
fn weights_per(w: &Tensor, elems: &[usize], what: &str) -> KernelResult<usize> {
    expect_float("weights", w)?;
    let r = w.rank();
    if r > elems.len() || w.dims() != &elems[..r] {
        return unsupported(format!(
            "{what}: weights must have a prefix of the shape {elems:?}, found {}",
            describe(w)
        ));
    }
    Ok(elems[r..].iter().product::<usize>())
}

/// The weights as one value per element of `elems` (see [`weights_per`]): returns the host
/// weights and the number of elements each one covers.
fn weights_per_element(w: &Tensor, elems: &[usize], what: &str) -> KernelResult<(Vec<f64>, usize)> {
    let per = weights_per(w, elems, what)?;
    Ok((host_f64(w)?, per))
}

/// Checks the norm's attributes and that a count input comes with [`LossNorm::CountInput`]
/// and only with it.
fn check_norm(norm: LossNorm, count: Option<&Tensor>, what: &str) -> KernelResult<()> {
    if let LossNorm::Constant { value } = norm {
        if !value.is_finite() || value <= 0.0 {
            return unsupported(format!(
                "{what}: the constant normalizer must be positive, found {value}"
            ));
        }
    }
    match (norm, count) {
        (LossNorm::CountInput, None) => unsupported(format!("{what}: norm `count_input` needs a count input")),
        (LossNorm::CountInput, Some(c)) => expect_float("count", c),
        (_, Some(_)) => unsupported(format!("{what}: a count input is only taken with norm `count_input`")),
        (_, None) => Ok(()),
    }
}

/// The divisor of the weighted sum; `None` when it is 0 (the loss is then 0).
fn normalizer(norm: LossNorm, w: &[f64], per: usize, count: Option<&Tensor>, what: &str) -> KernelResult<Option<f64>> {
    check_norm(norm, count, what)?;
    let n = match (norm, count) {
        (LossNorm::Sum, _) => 1.0,
        (LossNorm::Constant { value }, _) => value,
        (LossNorm::WeightedMean, _) => w.iter().sum::<f64>() * per as f64,
        (LossNorm::CountInput, Some(c)) => host_f64(c)?.iter().sum(),
        (LossNorm::CountInput, None) => unreachable!("checked"),
    };
    Ok((n != 0.0).then_some(n))
}

fn check_dloss(d: &Tensor, what: &str) -> KernelResult<()> {
    if d.rank() != 0 {
        return unsupported(format!("{what}: dloss must be a scalar [], found {}", describe(d)));
    }
    Ok(())
}

/// Reads a `dloss` scalar.
fn read_dloss(d: &Tensor, what: &str) -> KernelResult<f64> {
    check_dloss(d, what)?;
    Ok(host_f64(d)?[0])
}

/// Checks `target` has the input's shape and dtype.
fn expect_target(x: &Tensor, t: &Tensor, what: &str) -> KernelResult<()> {
    expect_float("input", x)?;
    if t.dims() != x.dims() || t.dtype() != x.dtype() {
        return unsupported(format!(
            "{what}: target {} must have the input's type {}",
            describe(t),
            describe(x)
        ));
    }
    Ok(())
}

/// `sum_e(w(e) * f(x_e, t_e)) / n` over elementwise `f`, in parallel chunks, f64.
fn weighted_sum(x: &[f64], t: &[f64], w: &[f64], per: usize, f: impl Fn(f64, f64) -> f64 + Sync) -> f64 {
    const CHUNK: usize = 8192;
    x.par_chunks(CHUNK)
        .zip(t.par_chunks(CHUNK))
        .enumerate()
        .map(|(c, (xs, ts))| {
            let mut acc = 0.0;
            for (j, (&xv, &tv)) in xs.iter().zip(ts).enumerate() {
                let wv = w[(c * CHUNK + j) / per];
                if wv != 0.0 {
                    acc += wv * f(xv, tv);
                }
            }
            acc
        })
        .sum()
}

/// `dloss / n * w(e) * g(x_e, t_e)` per element.
fn weighted_grad(
    x: &[f64],
    t: &[f64],
    w: &[f64],
    per: usize,
    scale: f64,
    g: impl Fn(f64, f64) -> f64 + Sync,
) -> Vec<f64> {
    x.par_iter()
        .zip(t.par_iter())
        .enumerate()
        .map(|(e, (&xv, &tv))| {
            let wv = w[e / per];
            if wv == 0.0 {
                0.0
            } else {
                scale * wv * g(xv, tv)
            }
        })
        .collect()
}

// ------------------------------------------------------------------------------- BCE

/// `max(x, 0) - x t + log(1 + exp(-|x|))`: PyTorch's `binary_cross_entropy_with_logits` per
/// element, without overflow for large `|x|`.
fn bce(x: f64, t: f64) -> f64 {
    x.max(0.0) - x * t + (-x.abs()).exp().ln_1p()
}

/// `sigmoid(x)` without overflow.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// [`SigmoidBceLoss`]: inputs `logits, targets, weights [, count]`, output `[]`.
pub fn sigmoid_bce_loss(op: &SigmoidBceLoss, x: &[Tensor]) -> KernelResult<Tensor> {
    let what = "sigmoid_bce_loss";
    expect_target(&x[0], &x[1], what)?;
    if !x[0].device().is_cpu() {
        let per = weights_per(&x[2], x[0].dims(), what)?;
        check_norm(op.norm, x.get(3), what)?;
        return on_device::loss(Elementwise::Bce, op.norm, x, per);
    }
    let (w, per) = weights_per_element(&x[2], x[0].dims(), what)?;
    let Some(n) = normalizer(op.norm, &w, per, x.get(3), what)? else {
        return output(vec![0.0], &[], &x[0]);
    };
    let s = weighted_sum(&host_f64(&x[0])?, &host_f64(&x[1])?, &w, per, bce);
    output(vec![s / n], &[], &x[0])
}

/// [`SigmoidBceLossGrad`]: inputs `logits, targets, weights, dloss [, count]`, output
/// `dlogits = dloss / n * w * (sigmoid(x) - t)`.
pub fn sigmoid_bce_loss_grad(op: &SigmoidBceLossGrad, x: &[Tensor]) -> KernelResult<Tensor> {
    let what = "sigmoid_bce_loss_grad";
    expect_target(&x[0], &x[1], what)?;
    if !x[0].device().is_cpu() {
        let per = weights_per(&x[2], x[0].dims(), what)?;
        check_dloss(&x[3], what)?;
        check_norm(op.norm, x.get(4), what)?;
        return on_device::grad(Elementwise::Bce, op.norm, x, per);
    }
    let (w, per) = weights_per_element(&x[2], x[0].dims(), what)?;
    let d = read_dloss(&x[3], what)?;
    let n = normalizer(op.norm, &w, per, x.get(4), what)?;
    let scale = n.map_or(0.0, |n| d / n);
    let g = weighted_grad(&host_f64(&x[0])?, &host_f64(&x[1])?, &w, per, scale, |xv, tv| {
        sigmoid(xv) - tv
    });
    output(g, x[0].dims(), &x[0])
}

// ------------------------------------------------------------------------------- smooth L1

/// detectron2's `smooth_l1_loss` of one difference (`beta < 1e-5`: plain L1).
fn smooth_l1(d: f64, beta: f64) -> f64 {
    let a = d.abs();
    if beta < 1e-5 {
        a
    } else if a < beta {
        0.5 * d * d / beta
    } else {
        a - 0.5 * beta
    }
}

/// Its derivative: `sign(d)` (0 at 0, as PyTorch's `abs`), `d / beta` inside `|d| < beta`.
fn smooth_l1_grad(d: f64, beta: f64) -> f64 {
    if beta >= 1e-5 && d.abs() < beta {
        d / beta
    } else if d > 0.0 {
        1.0
    } else if d < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn check_beta(beta: f64, what: &str) -> KernelResult<()> {
    if !beta.is_finite() || beta < 0.0 {
        return unsupported(format!("{what}: beta must be finite and >= 0, found {beta}"));
    }
    Ok(())
}

/// [`SmoothL1Loss`]: inputs `pred, target, weights [, count]`, output `[]`.
pub fn smooth_l1_loss(op: &SmoothL1Loss, x: &[Tensor]) -> KernelResult<Tensor> {
    let what = "smooth_l1_loss";
    check_beta(op.beta, what)?;
    expect_target(&x[0], &x[1], what)?;
    if !x[0].device().is_cpu() {
        let per = weights_per(&x[2], x[0].dims(), what)?;
        check_norm(op.norm, x.get(3), what)?;
        return on_device::loss(Elementwise::SmoothL1 { beta: op.beta }, op.norm, x, per);
    }
    let (w, per) = weights_per_element(&x[2], x[0].dims(), what)?;
    let Some(n) = normalizer(op.norm, &w, per, x.get(3), what)? else {
        return output(vec![0.0], &[], &x[0]);
    };
    let beta = op.beta;
    let s = weighted_sum(&host_f64(&x[0])?, &host_f64(&x[1])?, &w, per, |p, t| {
        smooth_l1(p - t, beta)
    });
    output(vec![s / n], &[], &x[0])
}

/// [`SmoothL1LossGrad`]: inputs `pred, target, weights, dloss [, count]`, output `dpred`.
pub fn smooth_l1_loss_grad(op: &SmoothL1LossGrad, x: &[Tensor]) -> KernelResult<Tensor> {
    let what = "smooth_l1_loss_grad";
    check_beta(op.beta, what)?;
    expect_target(&x[0], &x[1], what)?;
    if !x[0].device().is_cpu() {
        let per = weights_per(&x[2], x[0].dims(), what)?;
        check_dloss(&x[3], what)?;
        check_norm(op.norm, x.get(4), what)?;
        return on_device::grad(Elementwise::SmoothL1 { beta: op.beta }, op.norm, x, per);
    }
    let (w, per) = weights_per_element(&x[2], x[0].dims(), what)?;
    let d = read_dloss(&x[3], what)?;
    let n = normalizer(op.norm, &w, per, x.get(4), what)?;
    let scale = n.map_or(0.0, |n| d / n);
    let beta = op.beta;
    let g = weighted_grad(&host_f64(&x[0])?, &host_f64(&x[1])?, &w, per, scale, |p, t| {
        smooth_l1_grad(p - t, beta)
    });
    output(g, x[0].dims(), &x[0])
}

// ------------------------------------------------------------------------------- cross-entropy

/// Checks the shapes of `(logits [N, C], labels [N])` and returns `(N, C)`.
fn classification_shape(logits: &Tensor, labels: &Tensor, what: &str) -> KernelResult<(usize, usize)> {
    expect_float("logits", logits)?;
    let (n, c) = match logits.dims() {
        &[n, c] if c > 0 => (n, c),
        _ => return unsupported(format!("{what}: logits must be [N, C], found {}", describe(logits))),
    };
    if labels.dims() != [n] || labels.dtype().is_float() {
        return unsupported(format!(
            "{what}: labels must be integer [{n}], found {}",
            describe(labels)
        ));
    }
    Ok((n, c))
}

/// Checks `(logits [N, C], labels [N])` and returns `(N, C, labels)`; every label must be in
/// `0..C`.
fn classification(logits: &Tensor, labels: &Tensor, what: &str) -> KernelResult<(usize, usize, Vec<i64>)> {
    let (n, c) = classification_shape(logits, labels, what)?;
    let l = labels.to_device(&Device::Cpu)?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if let Some((r, v)) = l.iter().enumerate().find(|(_, &v)| v < 0 || v as u64 >= c as u64) {
        return Err(KernelError::Candle(candle_core::Error::Msg(format!(
            "{what}: label {v} (row {r}) out of range for {c} classes"
        ))));
    }
    Ok((n, c, l))
}

/// `logsumexp(row)` without overflow.
fn logsumexp(row: &[f64]) -> f64 {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// [`SoftmaxCrossEntropyLoss`]: inputs `logits [N, C], labels [N], weights [, count]`, output
/// `[]`.
pub fn softmax_cross_entropy_loss(op: &SoftmaxCrossEntropyLoss, x: &[Tensor]) -> KernelResult<Tensor> {
    let what = "softmax_cross_entropy_loss";
    if op.labels_in_range && !x[0].device().is_cpu() {
        let (n, _) = classification_shape(&x[0], &x[1], what)?;
        let per = weights_per(&x[2], &[n], what)?;
        check_norm(op.norm, x.get(3), what)?;
        return on_device::cross_entropy(op.norm, x, per);
    }
    let (n, c, labels) = classification(&x[0], &x[1], what)?;
    let (w, per) = weights_per_element(&x[2], &[n], what)?;
    let Some(norm) = normalizer(op.norm, &w, per, x.get(3), what)? else {
        return output(vec![0.0], &[], &x[0]);
    };
    let logits = host_f64(&x[0])?;
    let s: f64 = (0..n)
        .into_par_iter()
        .map(|r| {
            let wv = w[r / per];
            if wv == 0.0 {
                return 0.0;
            }
            let row = &logits[r * c..(r + 1) * c];
            wv * (logsumexp(row) - row[labels[r] as usize])
        })
        .sum();
    output(vec![s / norm], &[], &x[0])
}

/// [`SoftmaxCrossEntropyLossGrad`]: inputs `logits, labels, weights, dloss [, count]`, output
/// `dlogits[r] = dloss / n * w_r * (softmax(x_r) - onehot(labels_r))`.
pub fn softmax_cross_entropy_loss_grad(op: &SoftmaxCrossEntropyLossGrad, x: &[Tensor]) -> KernelResult<Tensor> {
    let what = "softmax_cross_entropy_loss_grad";
    if op.labels_in_range && !x[0].device().is_cpu() {
        let (n, _) = classification_shape(&x[0], &x[1], what)?;
        let per = weights_per(&x[2], &[n], what)?;
        check_dloss(&x[3], what)?;
        check_norm(op.norm, x.get(4), what)?;
        return on_device::cross_entropy_grad(op.norm, x, per);
    }
    let (n, c, labels) = classification(&x[0], &x[1], what)?;
    let (w, per) = weights_per_element(&x[2], &[n], what)?;
    let d = read_dloss(&x[3], what)?;
    let norm = normalizer(op.norm, &w, per, x.get(4), what)?;
    let scale = norm.map_or(0.0, |norm| d / norm);
    let logits = host_f64(&x[0])?;
    let mut g = vec![0f64; n * c];
    g.par_chunks_mut(c).enumerate().for_each(|(r, out)| {
        let wv = w[r / per];
        if wv == 0.0 || scale == 0.0 {
            return;
        }
        let row = &logits[r * c..(r + 1) * c];
        let lse = logsumexp(row);
        for (j, o) in out.iter_mut().enumerate() {
            let onehot = if j as i64 == labels[r] { 1.0 } else { 0.0 };
            *o = scale * wv * ((row[j] - lse).exp() - onehot);
        }
    });
    output(g, &[n, c], &x[0])
}
