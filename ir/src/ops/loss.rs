//! Losses with per-element weights, and their gradients.
//!
//! Each loss reduces to a scalar `[]`: `loss = sum_i(w_i * l_i) / n`, where `l_i` is the
//! per-element loss, `w` the `weights` input and `n` the normalizer chosen by the op's
//! [`LossNorm`]. Sampled and ignored entries (static shapes: a fixed number of anchors or RoI
//! slots) are expressed by the weights: a weight of 0 removes an entry from the sum exactly,
//! even when its loss is not finite (an unused slot may hold anything), and gives it a zero
//! gradient.
//!
//! `weights` has a *prefix* of the per-element shape (`[]`, `[N]`, `[N, 4]`, ... for
//! `[N, 4]` elements) and is broadcast over the remaining axes, so one weight per RoI covers
//! its 4 box deltas or its 28x28 mask pixels.
//!
//! # Normalization
//!
//! detectron2 divides its Mask R-CNN losses by counts, some of them data dependent:
//! * RPN objectness (`RPN.losses`): BCE summed over the sampled anchors, divided by
//!   `batch_size_per_image * num_images` (256 per image) — a constant, even when fewer anchors
//!   were sampled: [`LossNorm::Constant`].
//! * RPN box regression: L1 summed over the sampled positive anchors, divided by the same
//!   constant: [`LossNorm::Constant`].
//! * RoI classification (`FastRCNNOutputLayers.losses`): cross-entropy *mean* over the sampled
//!   RoIs (up to 512; fewer when there are not enough proposals): [`LossNorm::WeightedMean`]
//!   with the sampled-slot weights.
//! * RoI box regression (`box_reg_loss`): L1 summed over the foreground RoIs, divided by the
//!   number of *sampled* RoIs (`max(gt_classes.numel(), 1)`), not the foreground count: the
//!   weights are the foreground mask and the divisor the sum of another tensor, the
//!   sampled-slot weights: [`LossNorm::CountInput`].
//! * Mask (`mask_rcnn_loss`): BCE mean over the pixels of the foreground RoIs' masks
//!   (`num_fg * 28 * 28`): [`LossNorm::WeightedMean`] with one weight per RoI, which counts
//!   each RoI's 784 pixels.
//!
//! When the normalizer is 0 (nothing was sampled, no foreground) the loss and its gradient
//! are 0, as detectron2 returns 0 in those cases (`cross_entropy` on empty input,
//! `mask_rcnn_loss` without foreground, `box_reg_loss` dividing by `max(n, 1)`).
//!
//! # Gradients
//!
//! Each loss has a gradient op taking the forward inputs, then `dloss []` (the gradient of
//! the scalar output), then the `count` input when the norm is [`LossNorm::CountInput`]; it
//! returns the gradient of the first input (predictions / logits). Targets, labels, weights
//! and counts get no gradient: detectron2 computes them without gradient.

use serde::{Deserialize, Serialize};

use super::{expect_float, numel, Cost, OpRule, RowRule};
use crate::types::{DType, TensorType};

/// How a loss's weighted sum is normalized (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LossNorm {
    /// `sum(w * l)`.
    Sum,
    /// `sum(w * l) / value`, `value > 0`.
    Constant { value: f64 },
    /// `sum(w * l) / sum(w)`, with `w` broadcast to the elements (a weighted mean); 0 when
    /// `sum(w) = 0`.
    WeightedMean,
    /// `sum(w * l) / sum(count)` over an extra trailing input `count` (any float shape); 0
    /// when `sum(count) = 0`.
    CountInput,
}

impl LossNorm {
    /// Number of extra inputs the norm needs (the `count`).
    pub fn extra_inputs(self) -> usize {
        match self {
            LossNorm::CountInput => 1,
            _ => 0,
        }
    }

    fn check(self) -> Result<(), String> {
        if let LossNorm::Constant { value } = self {
            if !value.is_finite() || value <= 0.0 {
                return Err(format!("the constant normalizer must be positive, found {value}"));
            }
        }
        Ok(())
    }
}

/// Checks `weights` against the per-element shape `elems` (a prefix of it, same dtype as `x`).
fn expect_weights(w: &TensorType, elems: &[usize], x: &TensorType) -> Result<(), String> {
    if w.dtype != x.dtype || w.rank() > elems.len() || w.shape[..] != elems[..w.rank()] {
        return Err(format!(
            "weights must be {} with a prefix of the shape {elems:?}, found {w}",
            x.dtype
        ));
    }
    Ok(())
}

/// Checks the optional `count` input of [`LossNorm::CountInput`] (`at` = its position).
fn expect_count(norm: LossNorm, i: &[&TensorType], at: usize) -> Result<(), String> {
    norm.check()?;
    let want = at + norm.extra_inputs();
    if i.len() != want {
        return Err(format!(
            "norm {norm:?} takes {want} inputs, given {} (the count input goes last, only with `count_input`)",
            i.len()
        ));
    }
    if norm == LossNorm::CountInput {
        expect_float("count", i[at])?;
    }
    Ok(())
}

/// Checks a `dloss` input: a scalar `[]` of `x`'s dtype.
fn expect_dloss(t: &TensorType, x: &TensorType) -> Result<(), String> {
    if t.rank() != 0 || t.dtype != x.dtype {
        return Err(format!("dloss must be a {} scalar [], found {t}", x.dtype));
    }
    Ok(())
}

/// Checks `(x, target, weights)` for the elementwise losses: float `x`, `target` of its type.
fn expect_elementwise(x: &TensorType, t: &TensorType, w: &TensorType) -> Result<(), String> {
    expect_float("input", x)?;
    if t != x {
        return Err(format!("target must have the input's type {x}, found {t}"));
    }
    expect_weights(w, &x.shape, x)
}

/// Checks `(logits [N, C], labels [N] i64, weights)` for cross-entropy.
fn expect_classification(x: &TensorType, labels: &TensorType, w: &TensorType) -> Result<(), String> {
    expect_float("logits", x)?;
    if x.rank() != 2 || x.shape[1] == 0 {
        return Err(format!("logits must be [N, C] with C > 0, found {x}"));
    }
    if labels.shape != [x.shape[0]] || labels.dtype != DType::I64 {
        return Err(format!("labels must be i64[{}], found {labels}", x.shape[0]));
    }
    expect_weights(w, &x.shape[..1], x)
}

fn scalar_like(x: &TensorType) -> TensorType {
    x.with_shape(Vec::<usize>::new())
}

/// `sum(w * bce_with_logits(x, t)) / n` (PyTorch's `binary_cross_entropy_with_logits` per
/// element, in its stable form `max(x, 0) - x t + log(1 + exp(-|x|))`). Inputs: `logits`,
/// `targets` (same type, values in `[0, 1]`), `weights`, and `count` with
/// [`LossNorm::CountInput`]. Output `[]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SigmoidBceLoss {
    pub norm: LossNorm,
}

impl OpRule for SigmoidBceLoss {
    fn name(&self) -> &'static str {
        "sigmoid_bce_loss"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 4)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_elementwise(i[0], i[1], i[2])?;
        expect_count(self.norm, i, 3)?;
        Ok(vec![scalar_like(i[0])])
    }
    /// About 8 flops per element (exp, log, products, sum).
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 8 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 1, 2], &[])
    }
}

/// Gradient of [`SigmoidBceLoss`]: inputs `(logits, targets, weights, dloss [, count])`,
/// output `dlogits = dloss * w * (sigmoid(x) - t) / n`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SigmoidBceLossGrad {
    pub norm: LossNorm,
}

impl OpRule for SigmoidBceLossGrad {
    fn name(&self) -> &'static str {
        "sigmoid_bce_loss_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (4, 5)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_elementwise(i[0], i[1], i[2])?;
        expect_dloss(i[3], i[0])?;
        expect_count(self.norm, i, 4)?;
        Ok(vec![i[0].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 6 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 1, 2], &[0])
    }
}

/// `sum(w * smooth_l1(x - t)) / n` with detectron2's `smooth_l1_loss`: `|d|` when
/// `beta < 1e-5` (detectron2 treats such a beta as plain L1; its Mask R-CNN configs use
/// `beta = 0`), otherwise `0.5 d^2 / beta` for `|d| < beta` and `|d| - 0.5 beta` beyond.
/// Inputs: `pred`, `target` (same type, e.g. `[N, 4]`), `weights` (`[N]` or `[N, 4]`, any
/// prefix), and `count` with [`LossNorm::CountInput`]. Output `[]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SmoothL1Loss {
    pub beta: f64,
    pub norm: LossNorm,
}

fn check_beta(beta: f64) -> Result<(), String> {
    if !beta.is_finite() || beta < 0.0 {
        return Err(format!("beta must be finite and >= 0, found {beta}"));
    }
    Ok(())
}

impl OpRule for SmoothL1Loss {
    fn name(&self) -> &'static str {
        "smooth_l1_loss"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 4)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        check_beta(self.beta)?;
        expect_elementwise(i[0], i[1], i[2])?;
        expect_count(self.norm, i, 3)?;
        Ok(vec![scalar_like(i[0])])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 4 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
}

/// Gradient of [`SmoothL1Loss`]: inputs `(pred, target, weights, dloss [, count])`, output
/// `dpred = dloss * w * g(x - t) / n` with `g(d) = sign(d)` for L1 (`sign(0) = 0`, as
/// PyTorch's `abs`) and `d / beta` inside `|d| < beta` otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SmoothL1LossGrad {
    pub beta: f64,
    pub norm: LossNorm,
}

impl OpRule for SmoothL1LossGrad {
    fn name(&self) -> &'static str {
        "smooth_l1_loss_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (4, 5)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        check_beta(self.beta)?;
        expect_elementwise(i[0], i[1], i[2])?;
        expect_dloss(i[3], i[0])?;
        expect_count(self.norm, i, 4)?;
        Ok(vec![i[0].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 4 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
}

/// `sum_n(w_n * (logsumexp(x_n) - x_n[labels_n])) / n` (PyTorch's `cross_entropy` per row).
/// Inputs: `logits [N, C]`, `labels [N]` i64 in `0..C` (every label must be in range, weighted
/// or not), `weights` (`[N]` or `[]`), and `count` with [`LossNorm::CountInput`]. Output `[]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SoftmaxCrossEntropyLoss {
    pub norm: LossNorm,
    /// Every label is known to be in `0..C` (`passes::prove_index_ranges`): a GPU computes the
    /// loss on the device instead of checking the labels on the host (a copy and a wait).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub labels_in_range: bool,
}

impl SoftmaxCrossEntropyLoss {
    pub fn new(norm: LossNorm) -> Self {
        SoftmaxCrossEntropyLoss {
            norm,
            labels_in_range: false,
        }
    }
}

impl OpRule for SoftmaxCrossEntropyLoss {
    fn name(&self) -> &'static str {
        "softmax_cross_entropy_loss"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 4)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_classification(i[0], i[1], i[2])?;
        expect_count(self.norm, i, 3)?;
        Ok(vec![scalar_like(i[0])])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 4 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
}

/// Gradient of [`SoftmaxCrossEntropyLoss`]: inputs `(logits, labels, weights, dloss
/// [, count])`, output `dlogits[n] = dloss * w_n * (softmax(x_n) - onehot(labels_n)) / n`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SoftmaxCrossEntropyLossGrad {
    pub norm: LossNorm,
    /// Every label is known to be in `0..C` (`passes::prove_index_ranges`): a GPU computes the
    /// loss on the device instead of checking the labels on the host (a copy and a wait).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub labels_in_range: bool,
}

impl SoftmaxCrossEntropyLossGrad {
    pub fn new(norm: LossNorm) -> Self {
        SoftmaxCrossEntropyLossGrad {
            norm,
            labels_in_range: false,
        }
    }
}

impl OpRule for SoftmaxCrossEntropyLossGrad {
    fn name(&self) -> &'static str {
        "softmax_cross_entropy_loss_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (4, 5)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_classification(i[0], i[1], i[2])?;
        expect_dloss(i[3], i[0])?;
        expect_count(self.norm, i, 4)?;
        Ok(vec![i[0].clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 5 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
}
