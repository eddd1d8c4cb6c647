//! Training-target assignment for Mask R-CNN: which anchors and proposals are positive,
//! negative or ignored, what they should regress to, and the mask each foreground RoI should
//! predict. These are detectron2's `Matcher`, `BalancedPositiveNegativeSampler`,
//! `Box2BoxTransform.get_deltas`, `add_ground_truth_to_proposals` and
//! `BitMasks.crop_and_resize`, in static shapes.
//!
//! Conventions shared by the ops:
//! * Ground truth is padded to a fixed count `G`: `gt_boxes [G, 4]` (`x0, y0, x1, y1` pixels),
//!   `gt_valid [G]` u8 (1 = a real instance). Invalid rows are ignored entirely, as if absent.
//!   A valid box must be finite with positive width and height (detectron2's data mapper drops
//!   empty boxes with `filter_empty_instances` before they reach the model); the kernels report
//!   any other valid box as an error rather than produce infinite targets.
//! * IoU is detectron2's `pairwise_iou` (`inter / (area_a + area_b - inter)`, 0 where the
//!   boxes do not intersect).
//! * Sampling is random but stateless: input `seed` is an i64 scalar (`[]` or `[1]`, as
//!   [`DropPathMask`](super::DropPathMask) takes), and candidate `i` gets the key
//!   `splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ i)` — the counter-based hash chain of
//!   [`DropPathMask::uniform`](super::DropPathMask::uniform). Taking the `k` candidates with the
//!   smallest keys (ties by index) draws a uniformly random `k`-subset, in a uniformly random
//!   order, as detectron2's `torch.randperm(n)[:k]` does. So any iteration's sample follows from
//!   its seed, and different `stream`s draw independently from one seed.
//! * The ops are not differentiable: their outputs are constants to autodiff, as detectron2
//!   computes targets under `torch.no_grad()`.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, numel, Cost, IntRange, OpRule, RowRule};
use crate::types::{DType, TensorType};

/// Checks the seed input: an i64 scalar (`[]` or `[1]`).
fn expect_seed(t: &TensorType) -> Result<(), String> {
    if t.dtype != DType::I64 || t.numel() != 1 || t.rank() > 1 {
        return Err(format!("seed must be an i64 scalar ([] or [1]), found {t}"));
    }
    Ok(())
}

/// Checks `boxes [N, 4]` of a float dtype and returns `N`.
fn expect_boxes(what: &str, t: &TensorType) -> Result<usize, String> {
    expect_float(what, t)?;
    if t.rank() != 2 || t.shape[1] != 4 {
        return Err(format!("{what} must be [N, 4], found {t}"));
    }
    Ok(t.shape[0])
}

/// Checks a `[n]` tensor of the given dtype.
fn expect_vector_of(what: &str, t: &TensorType, n: usize, dtype: DType) -> Result<(), String> {
    if t.shape != [n] || t.dtype != dtype {
        return Err(format!("{what} must be {dtype}[{n}], found {t}"));
    }
    Ok(())
}

/// Checks the sampler's attributes.
fn check_sampler(batch_size_per_image: usize, positive_fraction: f64) -> Result<(), String> {
    if batch_size_per_image == 0 {
        return Err("batch_size_per_image must be positive".into());
    }
    if !(0.0..=1.0).contains(&positive_fraction) {
        return Err(format!(
            "positive_fraction must be in [0, 1], found {positive_fraction}"
        ));
    }
    Ok(())
}

/// Checks `Box2BoxTransform` weights.
fn check_weights(weights: &[f64; 4]) -> Result<(), String> {
    if weights.iter().any(|w| !w.is_finite() || *w <= 0.0) {
        return Err(format!("box transform weights must be positive, found {weights:?}"));
    }
    Ok(())
}

/// The number of positives detectron2's `subsample_labels` aims for:
/// `int(batch_size_per_image * positive_fraction)`.
pub fn max_positives(batch_size_per_image: usize, positive_fraction: f64) -> usize {
    (batch_size_per_image as f64 * positive_fraction) as usize
}

/// RPN targets (detectron2's `RPN.label_and_sample_anchors` and the target half of
/// `RPN.losses`) for one image.
///
/// Inputs: `anchors [A, 4]` (all levels concatenated, as the RPN orders its logits),
/// `gt_boxes [G, 4]`, `gt_valid [G]` u8, `seed`.
///
/// 1. Matching (`Matcher(thresholds=[low, high], labels=[0, -1, 1])`): each anchor takes the
///    valid gt of highest IoU (the first on ties) and is negative when that IoU is `< low`,
///    ignored in `[low, high)`, positive when `>= high`. With `allow_low_quality_matches`,
///    for every valid gt the anchors whose IoU with it equals that gt's highest IoU (ties
///    included, even when that highest IoU is 0, as detectron2) become positive too, keeping
///    their matched gt. With no valid gt every anchor is negative (matched index 0).
/// 2. Sampling (`subsample_labels(batch_size_per_image, positive_fraction)`): at most
///    `int(batch_size_per_image * positive_fraction)` positives and then up to
///    `batch_size_per_image` in all with negatives, each drawn uniformly (see the module doc);
///    the rest are ignored.
/// 3. Regression targets: `Box2BoxTransform(weights).get_deltas(anchor, matched gt)`.
///
/// Outputs (all `[A]` unless noted):
/// * `objectness` f32: 1 for sampled positives, 0 otherwise (the BCE target, and the weight of
///   the box-regression loss);
/// * `weights` f32: 1 for sampled anchors (positive or negative), 0 for ignored ones (the BCE
///   weight);
/// * `deltas [A, 4]` f32: regression targets of sampled positives, 0 elsewhere;
/// * `matched` i64: the matched gt index (0 when there is no valid gt).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnchorTargets {
    /// `[low, high]` IoU thresholds (detectron2: `[0.3, 0.7]`).
    pub thresholds: [f64; 2],
    pub allow_low_quality_matches: bool,
    /// Anchors sampled per image (256).
    pub batch_size_per_image: usize,
    /// Largest fraction of positives in the sample (0.5).
    pub positive_fraction: f64,
    /// `Box2BoxTransform` weights (`(1, 1, 1, 1)` for the RPN).
    pub weights: [f64; 4],
    /// Random stream of this op (see the module doc).
    pub stream: u64,
}

impl OpRule for AnchorTargets {
    fn name(&self) -> &'static str {
        "anchor_targets"
    }
    fn arity(&self) -> (usize, usize) {
        (4, 4)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let [lo, hi] = self.thresholds;
        if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) || lo > hi {
            return Err(format!(
                "thresholds must satisfy 0 <= low <= high <= 1, found {:?}",
                self.thresholds
            ));
        }
        check_sampler(self.batch_size_per_image, self.positive_fraction)?;
        check_weights(&self.weights)?;
        let a = expect_boxes("anchors", i[0])?;
        let g = expect_boxes("gt_boxes", i[1])?;
        expect_vector_of("gt_valid", i[2], g, DType::U8)?;
        expect_seed(i[3])?;
        Ok(vec![
            TensorType::f32([a]),
            TensorType::f32([a]),
            TensorType::f32([a, 4]),
            TensorType::new(DType::I64, [a]),
        ])
    }
    /// About 12 flops per IoU (anchor x gt pair).
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 12 * i[0].shape[0] as u64 * i[1].shape[0] as u64,
            ..Cost::default()
        }
    }
}

/// RoI-head targets (detectron2's `ROIHeads.label_and_sample_proposals` and the target half
/// of `FastRCNNOutputLayers.losses`) for one image.
///
/// Inputs: `proposals [P, 4]`, `proposal_valid [P]` u8, `gt_boxes [G, 4]`,
/// `gt_classes [G]` i64 (in `0..num_classes`: a valid gt's class outside it is a run-time
/// error), `gt_valid [G]` u8, `seed`.
///
/// 1. Candidates: the valid proposals, then — with `append_gt` (detectron2's
///    `proposal_append_gt`, on by default) — the valid gt boxes as extra proposals, in that
///    order (candidate index `P + g` is gt `g`).
/// 2. Matching (`Matcher(thresholds=[iou_threshold], labels=[0, 1])`, no low-quality
///    matches): a candidate's matched gt is the valid gt of highest IoU (first on ties); it is
///    foreground with that gt's class when the IoU is `>= iou_threshold`, background otherwise
///    (all background with no valid gt).
/// 3. Sampling (`subsample_labels(batch_size_per_image, positive_fraction, num_classes)`): up
///    to `S_fg = int(batch_size_per_image * positive_fraction)` foreground and then up to
///    `batch_size_per_image` in all with background candidates, each drawn uniformly.
///
/// Outputs, `S = batch_size_per_image` slots holding the sampled foreground candidates first
/// (in sampling order), then the sampled background ones, then unused slots (detectron2's
/// order: `cat([sampled_fg_idxs, sampled_bg_idxs])`):
/// * `rois [S, 4]` (the proposals' dtype): the sampled boxes; unused slots hold zeros;
/// * `weights [S]` f32: 1 for used slots, 0 for unused ones;
/// * `labels [S]` i64: the class of foreground slots, `num_classes` (background) elsewhere;
/// * `deltas [S, 4]` f32: `Box2BoxTransform(weights).get_deltas(roi, matched gt)` for
///   foreground slots, 0 elsewhere;
/// * `matched [S]` i64: the matched gt index (0 for unused slots and when there is no gt);
/// * `foreground [S]` f32: 1 for foreground slots, 0 elsewhere.
///
/// Since the foreground comes first and there are at most `S_fg` of it, the first `S_fg`
/// slots hold every foreground RoI: the mask head runs on those.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProposalTargets {
    /// Foreground classes `K`; the background label is `K`.
    pub num_classes: usize,
    /// Foreground IoU threshold (0.5).
    pub iou_threshold: f64,
    /// RoIs sampled per image (512).
    pub batch_size_per_image: usize,
    /// Largest fraction of foreground in the sample (0.25).
    pub positive_fraction: f64,
    /// `Box2BoxTransform` weights of the box head (`(10, 10, 5, 5)`).
    pub weights: [f64; 4],
    /// Add the gt boxes to the candidates (detectron2's `proposal_append_gt`).
    pub append_gt: bool,
    /// Random stream of this op (see the module doc).
    pub stream: u64,
}

impl OpRule for ProposalTargets {
    /// `labels` are classes `0..num_classes` or `num_classes` (a valid gt with a class outside
    /// `0..num_classes` is a run-time error); `matched` indexes the gt (0 without any).
    fn value_ranges(&self, _: &[Option<IntRange>], t: &[&TensorType]) -> Vec<Option<IntRange>> {
        let classes = i64::try_from(self.num_classes).ok().map(|k| IntRange::new(0, k));
        let matched = IntRange::indices(t[2].shape[0]).unwrap_or(IntRange::new(0, 0));
        vec![None, None, classes, None, Some(matched)]
    }
    fn name(&self) -> &'static str {
        "proposal_targets"
    }
    fn arity(&self) -> (usize, usize) {
        (6, 6)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        if self.num_classes == 0 {
            return Err("num_classes must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.iou_threshold) {
            return Err(format!("iou_threshold must be in [0, 1], found {}", self.iou_threshold));
        }
        check_sampler(self.batch_size_per_image, self.positive_fraction)?;
        check_weights(&self.weights)?;
        let p = expect_boxes("proposals", i[0])?;
        expect_vector_of("proposal_valid", i[1], p, DType::U8)?;
        let g = expect_boxes("gt_boxes", i[2])?;
        expect_vector_of("gt_classes", i[3], g, DType::I64)?;
        expect_vector_of("gt_valid", i[4], g, DType::U8)?;
        expect_seed(i[5])?;
        let s = self.batch_size_per_image;
        Ok(vec![
            i[0].with_shape([s, 4]),
            TensorType::f32([s]),
            TensorType::new(DType::I64, [s]),
            TensorType::f32([s, 4]),
            TensorType::new(DType::I64, [s]),
            TensorType::f32([s]),
        ])
    }
    /// About 12 flops per IoU (candidate x gt pair).
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        let g = i[2].shape[0] as u64;
        let candidates = i[0].shape[0] as u64 + if self.append_gt { g } else { 0 };
        Cost {
            flops: 12 * candidates * g,
            ..Cost::default()
        }
    }
}

/// Mask targets: detectron2's `BitMasks.crop_and_resize` as `mask_rcnn_loss` uses it. For
/// RoI `r`, the full-image mask `gt_masks[matched[r]]` is sampled by RoIAlign
/// (`ROIAlign((size, size), spatial_scale=1, sampling_ratio=0, aligned=True)`) over the box
/// `rois[r]`, and thresholded with `>= 0.5`.
///
/// Inputs: `gt_masks [G, H, W]` (u8 or float; nonzero / the value is the mask), `rois [R, 4]`
/// (image pixels), `matched [R]` i64, and optionally `valid [R]` (u8 or float): rows where it
/// is 0 are not computed (zeros) and their `matched` index is not read. Output
/// `[R, size, size]` f32 with values 0 and 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskTargets {
    /// Side of the target masks (28).
    pub size: usize,
}

impl OpRule for MaskTargets {
    fn name(&self) -> &'static str {
        "mask_targets"
    }
    fn arity(&self) -> (usize, usize) {
        (3, 4)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        if self.size == 0 {
            return Err("size must be positive".into());
        }
        let m = i[0];
        expect_rank("gt_masks", m, 3)?;
        if m.dtype != DType::U8 && !m.dtype.is_float() {
            return Err(format!("gt_masks must be u8 or floating point, found {m}"));
        }
        let r = expect_boxes("rois", i[1])?;
        expect_vector_of("matched", i[2], r, DType::I64)?;
        if let Some(v) = i.get(3) {
            if v.shape != [r] || !(v.dtype == DType::U8 || v.dtype.is_float()) {
                return Err(format!("valid must be [{r}] u8 or float, found {v}"));
            }
        }
        Ok(vec![TensorType::f32([r, self.size, self.size])])
    }
    /// RoIAlign's 4 taps of 4 flops per sample, about 4 samples per output bin.
    fn cost(&self, _: &[&TensorType], o: &[TensorType]) -> Cost {
        Cost {
            flops: 4 * 4 * 4 * numel(&o[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[1, 2, 3], &[0])
    }
}
