//! [`build_detector_training`]: the training-time Mask R-CNN (detectron2's `GeneralizedRCNN`
//! in training mode) as one forward graph from an image and its ground truth to the losses, for
//! autodiff to differentiate.

use vitdet_ir::ops::{
    max_positives, AnchorTargets, BinaryKind, Cast, CompareKind, CompareScalar, GatherRows, IotaLike, LossNorm,
    MaskTargets, ProposalTargets, SigmoidBceLoss, SmoothL1Loss, SoftmaxCrossEntropyLoss,
};
use vitdet_ir::{DType, Graph, Value};

use crate::backbone::{pyramid, INPUT_NAME};
use crate::builder::{Builder, Result, Training};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::roi_heads::{box_features, box_predictor, mask_logits, BOX_REG_WEIGHTS};
use crate::rpn::{rpn, RpnTopk};

/// Graph input: ground-truth boxes `[G, 4]` f32 (`x0, y0, x1, y1` in input pixels).
pub const GT_BOXES: &str = "gt_boxes";
/// Graph input: ground-truth classes `[G]` i64 in `0..num_classes`.
pub const GT_CLASSES: &str = "gt_classes";
/// Graph input: full-image ground-truth masks `[G, S, S]` u8 (nonzero = inside).
pub const GT_MASKS: &str = "gt_masks";
/// Graph input: `[G]` u8, 1 for the rows holding an instance (the rest is padding).
pub const GT_VALID: &str = "gt_valid";
/// Graph input: the step's random seed, an i64 scalar `[]` (drop path and target sampling).
pub const SEED: &str = "seed";

/// Names of the training graph's loss outputs (f32 scalars `[]`), detectron2's loss-dict keys
/// plus `loss`, their sum.
pub const LOSS_NAMES: [&str; 6] = [
    "loss_rpn_cls",
    "loss_rpn_loc",
    "loss_cls",
    "loss_box_reg",
    "loss_mask",
    "loss",
];

/// Names of the training graph's sampling statistics (f32 scalars `[]`), detectron2's event
/// names: positive and negative anchors in the RPN's sample, foreground and background RoIs in
/// the RoI heads' sample.
pub const SAMPLE_STAT_NAMES: [&str; 4] = [
    "rpn/num_pos_anchors",
    "rpn/num_neg_anchors",
    "roi_head/num_fg_samples",
    "roi_head/num_bg_samples",
];

/// Prefix of the outputs carrying updated buffers: `update/<buffer name>` is the new value of
/// a BatchNorm running statistic, to be written back to the parameter store after the step.
pub const BUFFER_UPDATE_PREFIX: &str = "update/";

/// Random stream of the RPN's anchor sampling (drop path uses streams `0..2 * depth`).
pub const ANCHOR_TARGETS_STREAM: u64 = 1 << 32;
/// Random stream of the RoI heads' proposal sampling.
pub const PROPOSAL_TARGETS_STREAM: u64 = (1 << 32) + 1;

/// The training-time settings of the heads: detectron2's values for ViTDet's COCO configs
/// (`configs/common/models/mask_rcnn_fpn.py`) by default.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    /// Proposals kept per level before the RPN's NMS (training: 2000).
    pub rpn_pre_nms_topk: usize,
    /// Proposals kept after the NMS (training: 1000).
    pub rpn_post_nms_topk: usize,
    /// Anchor matcher thresholds `[negative below, positive from]` (0.3, 0.7).
    pub rpn_iou_thresholds: [f64; 2],
    /// Anchors sampled per image (256); also the RPN losses' divisor.
    pub rpn_batch_size_per_image: usize,
    /// Largest positive fraction of the anchor sample (0.5).
    pub rpn_positive_fraction: f64,
    /// Foreground IoU threshold of the proposal matcher (0.5).
    pub roi_iou_threshold: f64,
    /// RoIs sampled per image (512).
    pub roi_batch_size_per_image: usize,
    /// Largest foreground fraction of the RoI sample (0.25).
    pub roi_positive_fraction: f64,
    /// Smooth-L1 beta of the RPN and box regression losses (0: L1, detectron2's default).
    pub smooth_l1_beta: f64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            rpn_pre_nms_topk: 2000,
            rpn_post_nms_topk: 1000,
            rpn_iou_thresholds: [0.3, 0.7],
            rpn_batch_size_per_image: 256,
            rpn_positive_fraction: 0.5,
            roi_iou_threshold: 0.5,
            roi_batch_size_per_image: 512,
            roi_positive_fraction: 0.25,
            smooth_l1_beta: 0.0,
        }
    }
}

/// [`build_detector_training_with`] with detectron2's training settings
/// ([`TrainingConfig::default`]).
pub fn build_detector_training(cfg: &ModelConfig, image_size: [usize; 2], max_gt: usize) -> Result<Graph> {
    build_detector_training_with(cfg, image_size, max_gt, &TrainingConfig::default())
}

/// The training-time Mask R-CNN for one image as one graph, batch 1.
///
/// Inputs: `image [1, 3, S, S]` f32 (normalized and padded as for [`crate::build_detector`],
/// `S = cfg.image_size`), [`GT_BOXES`] `[G, 4]`, [`GT_CLASSES`] `[G]` i64, [`GT_MASKS`]
/// `[G, S, S]` u8, [`GT_VALID`] `[G]` u8 and [`SEED`] `[]` i64, with `G = max_gt` (pad with
/// invalid rows). `image_size` (height, width) is the resized image inside the padded input,
/// as `image_hw` of [`crate::build_detector_for_image`]: proposals are clipped to it.
///
/// Outputs: [`LOSS_NAMES`] (f32 scalars), [`SAMPLE_STAT_NAMES`] (f32 scalars, counts that
/// carry no gradient) and, for the BatchNorm of the `vit` family, one
/// [`BUFFER_UPDATE_PREFIX`] output per running statistic.
///
/// The graph is [`crate::build_detector`]'s backbone, RPN and heads (same modules, parameter
/// names and shapes, so checkpoints interchange) in training form:
/// * drop path is active: block `i` multiplies its two residual branches by per-sample
///   `DropPathMask`s of rate `drop_path_rate * i / (depth - 1)` (detectron2's linearly
///   increasing rates), on streams `2i` and `2i + 1` of the seed;
/// * BatchNorm (`vit` family: FPN and heads) uses batch statistics (`BatchNormTrain`, those
///   of this graph's one image and its RoIs; the paper syncs them across all GPUs' images);
/// * the RPN keeps `rpn_pre_nms_topk` per level and `rpn_post_nms_topk` after NMS (2000 / 1000),
///   and its proposals carry no gradient (detectron2 detaches them);
/// * RPN losses (`RPN.losses`): `AnchorTargets` (matcher 0.3 / 0.7 with low-quality matches,
///   256 anchors, half positive at most) on all anchors; `loss_rpn_cls` = BCE summed over the
///   sampled anchors / 256, `loss_rpn_loc` = L1 of the deltas summed over the sampled positives
///   / 256;
/// * RoI losses (`FastRCNNOutputLayers.losses`): `ProposalTargets` (gt appended to the
///   proposals, matcher 0.5, 512 RoIs, a quarter foreground at most); the box head runs on the
///   512 sampled slots; `loss_cls` = cross-entropy mean over the sampled RoIs, `loss_box_reg` =
///   L1 of the gt class's deltas summed over the foreground / the number of sampled RoIs;
/// * mask loss (`mask_rcnn_loss`): the mask head runs on the sampled foreground RoIs only
///   (`select_foreground_proposals`): the first `count` slots, `count` being the number of
///   foreground RoIs, at most `int(512 * 0.25) = 128` (the sample lists foreground first). The
///   rows are dynamic (`DynamicPrefix`, bounded by 128: plans and FLOP counts use the
///   bound), so its kernels, and in the `vit` family its BatchNorm statistics, see the
///   foreground RoIs alone, as detectron2's. The targets are `MaskTargets` (RoIAlign crop of the
///   matched gt mask, `>= 0.5`); `loss_mask` = BCE of the gt class's mask logits, mean over the
///   foreground RoIs' pixels.
///
/// Deviations from detectron2 (static shapes): when fewer than 512 RoIs can be sampled, the
/// box head also runs on the empty slots (zero boxes, weight 0); in the `vit` family its
/// BatchNorm statistics then include those rows. Without any foreground RoI (an image without
/// instances) the mask head runs on one slot of weight 0: the loss and its gradients are 0 and
/// the `vit` family's mask-head BatchNorm running statistics stay as they were, as in
/// detectron2 (whose mask head runs on no rows, and PyTorch's BatchNorm leaves its statistics
/// alone on an empty batch).
pub fn build_detector_training_with(
    cfg: &ModelConfig,
    image_size: [usize; 2],
    max_gt: usize,
    tc: &TrainingConfig,
) -> Result<Graph> {
    cfg.validate()?;
    let s = cfg.image_size;
    let bad = |m: String| Err(ModelError::Invalid(m));
    if image_size.iter().any(|&d| d == 0 || d > s) {
        return bad(format!(
            "image size {}x{} must be positive and fit the {s}x{s} input",
            image_size[0], image_size[1]
        ));
    }
    if max_gt == 0 {
        return bad("max_gt must be positive (pad with invalid rows)".into());
    }
    for (name, v) in [
        ("rpn_pre_nms_topk", tc.rpn_pre_nms_topk),
        ("rpn_post_nms_topk", tc.rpn_post_nms_topk),
        ("rpn_batch_size_per_image", tc.rpn_batch_size_per_image),
        ("roi_batch_size_per_image", tc.roi_batch_size_per_image),
    ] {
        if v == 0 {
            return bad(format!("training `{name}` must be positive"));
        }
    }
    let mask_slots = max_positives(tc.roi_batch_size_per_image, tc.roi_positive_fraction);
    if mask_slots == 0 {
        return bad(format!(
            "training samples no foreground RoI (roi_batch_size_per_image {} x roi_positive_fraction {})",
            tc.roi_batch_size_per_image, tc.roi_positive_fraction
        ));
    }
    let det = &cfg.detector;
    let k = det.num_classes;

    let mut b = Builder::new();
    let image = b.input(INPUT_NAME, vec![1, 3, s, s])?;
    let gt_boxes = b.input(GT_BOXES, vec![max_gt, 4])?;
    let gt_classes = b.typed_input(GT_CLASSES, DType::I64, vec![max_gt])?;
    let gt_masks = b.typed_input(GT_MASKS, DType::U8, vec![max_gt, s, s])?;
    let gt_valid = b.typed_input(GT_VALID, DType::U8, vec![max_gt])?;
    let seed = b.typed_input(SEED, DType::I64, vec![])?;
    b.training = Some(Training {
        seed,
        buffer_updates: Vec::new(),
    });

    let feats = pyramid(&mut b, cfg, image)?;
    let topk = RpnTopk {
        pre_nms: tc.rpn_pre_nms_topk,
        post_nms: tc.rpn_post_nms_topk,
    };
    let proposals = rpn(&mut b, cfg, &feats, image_size, topk)?;

    // ----- RPN losses -----
    let (loss_rpn_cls, loss_rpn_loc, rpn_stats) = b.scoped("proposal_generator", |b| {
        let cat = |b: &mut Builder, f: fn(&crate::rpn::RpnLevel) -> Value| {
            let vs: Vec<Value> = proposals.levels.iter().map(f).collect();
            b.concat(&vs, 0)
        };
        let logits = cat(b, |l| l.logits)?;
        let deltas = cat(b, |l| l.deltas)?;
        let anchors = b.scoped("anchor_generator", |b| cat(b, |l| l.anchors))?;
        let targets = b.op_multi(
            AnchorTargets {
                thresholds: tc.rpn_iou_thresholds,
                allow_low_quality_matches: true,
                batch_size_per_image: tc.rpn_batch_size_per_image,
                positive_fraction: tc.rpn_positive_fraction,
                weights: [1.0; 4],
                stream: ANCHOR_TARGETS_STREAM,
            },
            &[anchors, gt_boxes, gt_valid, seed],
        )?;
        let out = |output| Value { node: targets, output };
        let (objectness, sampled, target_deltas) = (out(0), out(1), out(2));
        // Both divided by batch_size_per_image * num_images, whatever was sampled.
        let norm = LossNorm::Constant {
            value: tc.rpn_batch_size_per_image as f64,
        };
        let cls = b.op(SigmoidBceLoss { norm }, &[logits, objectness, sampled])?;
        // The objectness target is 1 exactly on the sampled positives.
        let (pos, all) = (b.sum_rows(objectness)?, b.sum_rows(sampled)?);
        let neg = b.binary(BinaryKind::Sub, all, pos)?;
        let loc = b.op(
            SmoothL1Loss {
                beta: tc.smooth_l1_beta,
                norm,
            },
            &[deltas, target_deltas, objectness],
        )?;
        Ok((cls, loc, [pos, neg]))
    })?;

    // ----- RoI heads -----
    let levels = &feats[..4];
    let (loss_cls, loss_box_reg, loss_mask, roi_stats) = b.scoped("roi_heads", |b| {
        let targets = b.op_multi(
            ProposalTargets {
                num_classes: k,
                iou_threshold: tc.roi_iou_threshold,
                batch_size_per_image: tc.roi_batch_size_per_image,
                positive_fraction: tc.roi_positive_fraction,
                weights: BOX_REG_WEIGHTS,
                append_gt: true,
                stream: PROPOSAL_TARGETS_STREAM,
            },
            &[proposals.boxes, proposals.valid, gt_boxes, gt_classes, gt_valid, seed],
        )?;
        let out = |output| Value { node: targets, output };
        let (rois, sampled, labels, target_deltas, matched, foreground) =
            (out(0), out(1), out(2), out(3), out(4), out(5));
        let r = tc.roi_batch_size_per_image;
        // The gt class of foreground slots as an index into the K class-specific outputs
        // (background slots, label K, read class K - 1 with weight 0).
        let last = b.op(
            IotaLike {
                axis: 0,
                start: (k - 1) as f64,
                step: 0.0,
                dtype: DType::I64,
            },
            &[labels],
        )?;
        let class_idx = b.binary(BinaryKind::Minimum, labels, last)?;

        let feat = box_features(b, cfg, levels, rois)?;
        let (loss_cls, loss_box_reg) = b.scoped("box_predictor", |b| {
            let (logits, deltas) = box_predictor(b, cfg, feat)?;
            let cls = b.op(
                SoftmaxCrossEntropyLoss::new(LossNorm::WeightedMean),
                &[logits, labels, sampled],
            )?;
            let deltas = b.reshape(deltas, vec![r, k, 4])?;
            let deltas = b.op(GatherRows::default(), &[deltas, class_idx])?;
            // Summed over the foreground, divided by the number of sampled RoIs.
            let reg = b.op(
                SmoothL1Loss {
                    beta: tc.smooth_l1_beta,
                    norm: LossNorm::CountInput,
                },
                &[deltas, target_deltas, foreground, sampled],
            )?;
            Ok((cls, reg))
        })?;

        let (fg, all) = (b.sum_rows(foreground)?, b.sum_rows(sampled)?);
        let bg = b.binary(BinaryKind::Sub, all, fg)?;

        // The mask head runs on the sampled foreground RoIs only, as detectron2's
        // `select_foreground_proposals`: the first `count` slots, at most `m`. At least one slot
        // runs (kernels are not defined on empty tensors); without foreground its weight is 0.
        let m = mask_slots.min(r);
        let count = b.row_count(fg)?;
        let first = |b: &mut Builder, v: Value| b.first_rows(v, count, m);
        let (mask_rois, mask_matched, mask_fg, mask_class) = (
            first(b, rois)?,
            first(b, matched)?,
            first(b, foreground)?,
            first(b, class_idx)?,
        );
        let first_update = b.updates_recorded();
        let logits = mask_logits(b, cfg, levels, mask_rois)?;
        // PyTorch's BatchNorm leaves its running statistics alone on an empty batch, and
        // without foreground detectron2's mask head runs on none: the one weight-0 slot must not
        // move them (the `vit` family's mask head normalizes with BatchNorm).
        let any_fg = b.op(
            CompareScalar {
                kind: CompareKind::Gt,
                value: 0.0,
            },
            &[fg],
        )?;
        let any_fg = b.op(Cast { dtype: DType::F32 }, &[any_fg])?;
        b.keep_updates_if(first_update, any_fg)?;
        let loss_mask = b.scoped("mask_head", |b| {
            let size = b.shape(logits)[2];
            let targets = b.op(MaskTargets { size }, &[gt_masks, mask_rois, mask_matched, mask_fg])?;
            let logits = b.op(GatherRows::default(), &[logits, mask_class])?;
            b.op(
                SigmoidBceLoss {
                    norm: LossNorm::WeightedMean,
                },
                &[logits, targets, mask_fg],
            )
        })?;
        Ok((loss_cls, loss_box_reg, loss_mask, [fg, bg]))
    })?;

    let parts = [loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg, loss_mask];
    let mut total = parts[0];
    for &p in &parts[1..] {
        total = b.add(total, p)?;
    }
    let updates = b.training.take().map(|t| t.buffer_updates).unwrap_or_default();
    let mut graph = b.finish();
    for (name, v) in LOSS_NAMES.iter().zip(parts.iter().chain([&total])) {
        graph.set_output(name, *v);
    }
    for (name, v) in SAMPLE_STAT_NAMES.iter().zip(rpn_stats.iter().chain(&roi_stats)) {
        graph.set_output(name, *v);
    }
    for u in updates {
        graph.set_output(&format!("{BUFFER_UPDATE_PREFIX}{}", u.name), u.updated);
    }
    Ok(graph)
}
