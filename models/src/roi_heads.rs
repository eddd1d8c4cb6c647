//! detectron2's `StandardROIHeads` at test time (scope `roi_heads`): RoIAlign box pooler,
//! `FastRCNNConvFCHead` (`box_head.conv{1..n}` with norm + ReLU, `box_head.fc1` + ReLU),
//! `FastRCNNOutputLayers` (`box_predictor.cls_score`, `box_predictor.bbox_pred`) and its
//! `fast_rcnn_inference`, then the mask pooler, `MaskRCNNConvUpsampleHead`
//! (`mask_head.mask_fcn{1..n}`, `mask_head.deconv`, `mask_head.predictor`) and
//! `mask_rcnn_inference`, all in static shapes.

use vitdet_ir::ops::{BoxDecode, GatherRows, IndexSelect, Init, IotaLike, Nms, PadRows, RoiAlign};
use vitdet_ir::{DType, Value};

use crate::adapter_fpn::FPN_BN_EPS;
use crate::builder::{Builder, Norm, Result};
use crate::config::{Family, ModelConfig};
use crate::rpn::{box_scale_clamp, Proposals};

/// Epsilon of detectron2's channel `LayerNorm` (`get_norm("LN")`) in the vitdet heads.
pub const HEAD_LN_EPS: f64 = 1e-6;
/// `Box2BoxTransform` weights of the box head (`ROI_BOX_HEAD.BBOX_REG_WEIGHTS`).
pub const BOX_REG_WEIGHTS: [f64; 4] = [10.0, 10.0, 5.0, 5.0];
/// RoI pooler resolution of the box head.
pub const BOX_POOLER_SIZE: usize = 7;
/// RoI pooler resolution of the mask head (masks come out at twice this).
pub const MASK_POOLER_SIZE: usize = 14;

/// Test-time detections: `D = detections_per_image` slots in descending score order.
pub(crate) struct Detections {
    /// `[D, 4]` f32, clipped to the image.
    pub boxes: Value,
    /// `[D]` f32 class probability.
    pub scores: Value,
    /// `[D]` i64 in `0..num_classes`.
    pub classes: Value,
    /// `[D]` u8, 1 where the slot holds a detection.
    pub valid: Value,
    /// `[D, M, M]` f32 mask probabilities of the detected class, `M = 2 * 14`.
    pub masks: Value,
}

/// The conv norm of the heads: detectron2's channel LayerNorm for vitdet (`conv_norm = "LN"`),
/// BatchNorm for the paper's model.
fn head_norm(cfg: &ModelConfig) -> Norm {
    match cfg.family {
        Family::Vitdet => Norm::ChannelLayerNorm { eps: HEAD_LN_EPS },
        Family::Vit => Norm::BatchNorm { eps: FPN_BN_EPS },
    }
}

/// `ROIPooler(output, scales=(1/4, .., 1/32), sampling_ratio=0, pooler_type="ROIAlignV2")` on
/// `levels = [p2, .., p5]`.
fn pooler(b: &mut Builder, name: &str, levels: &[Value], boxes: Value, output: usize) -> Result<Value> {
    b.scoped(name, |b| {
        let mut ins = levels.to_vec();
        ins.push(boxes);
        b.op(
            RoiAlign {
                output_size: [output, output],
                scales: vec![1.0 / 4.0, 1.0 / 8.0, 1.0 / 16.0, 1.0 / 32.0],
                sampling_ratio: 0,
                aligned: true,
                canonical_box_size: 224.0,
                canonical_level: 4,
                min_level: 2,
            },
            &ins,
        )
    })
}

/// Emits the box and mask branches in scope `roi_heads` on `levels = [p2, .., p5]`.
pub(crate) fn roi_heads(
    b: &mut Builder,
    cfg: &ModelConfig,
    levels: &[Value],
    proposals: &Proposals,
    image_hw: [usize; 2],
) -> Result<Detections> {
    b.scoped("roi_heads", |b| {
        // ----- box branch -----
        let feat = box_features(b, cfg, levels, proposals.boxes)?;
        let (boxes, scores, classes, valid) = b.scoped("box_predictor", |b| {
            let (logits, deltas) = box_predictor(b, cfg, feat)?;
            fast_rcnn_inference(b, cfg, logits, deltas, proposals, image_hw)
        })?;

        // ----- mask branch (on the detected boxes) -----
        // The mask head runs on the valid detections only (they come first, at least one slot
        // runs), as detectron2's runs on the instances it returns; the other slots' masks are 0.
        let slots = b.shape(boxes)[0];
        let valid_count = b.sum_rows(valid)?;
        let count = b.row_count(valid_count)?;
        let detected = b.first_rows(boxes, count, slots)?;
        let detected_classes = b.first_rows(classes, count, slots)?;
        let logits = mask_logits(b, cfg, levels, detected)?;
        let masks = b.scoped("mask_head", |b| {
            // mask_rcnn_inference: the mask of the predicted class, sigmoid.
            let m = b.op(GatherRows::default(), &[logits, detected_classes])?;
            let m = b.sigmoid(m)?;
            b.op(PadRows { rows: slots }, &[m])
        })?;
        Ok(Detections {
            boxes,
            scores,
            classes,
            valid,
            masks,
        })
    })
}

/// The box pooler and `FastRCNNConvFCHead` (current scope `roi_heads`) on `boxes [R, 4]`:
/// features `[R, box_head_fc_dim]`.
pub(crate) fn box_features(b: &mut Builder, cfg: &ModelConfig, levels: &[Value], boxes: Value) -> Result<Value> {
    let det = &cfg.detector;
    let norm = head_norm(cfg);
    let x = pooler(b, "box_pooler", levels, boxes, BOX_POOLER_SIZE)?;
    b.scoped("box_head", |b| {
        let mut x = x;
        for i in 1..=det.box_head_num_conv {
            x = b.conv_norm(&format!("conv{i}"), x, det.box_head_conv_dim, 3, norm)?;
            x = b.relu(x)?;
        }
        let s = b.shape(x);
        let x = b.reshape(x, vec![s[0], s[1..].iter().product()])?;
        // c2_xavier_fill: kaiming_uniform(a=1), bound sqrt(3 / fan_in).
        let bound = (3.0 / b.shape(x)[1] as f64).sqrt();
        let x = b.linear_init("fc1", x, det.box_head_fc_dim, true, Init::Uniform { bound })?;
        b.relu(x)
    })
}

/// `FastRCNNOutputLayers` (current scope `roi_heads.box_predictor`) on box features: class
/// logits `[R, K + 1]` (background last) and class-specific deltas `[R, 4K]`.
pub(crate) fn box_predictor(b: &mut Builder, cfg: &ModelConfig, feat: Value) -> Result<(Value, Value)> {
    let k = cfg.detector.num_classes;
    let logits = b.linear_init("cls_score", feat, k + 1, true, Init::Normal { std: 0.01 })?;
    let deltas = b.linear_init("bbox_pred", feat, 4 * k, true, Init::Normal { std: 0.001 })?;
    Ok((logits, deltas))
}

/// The mask pooler and `MaskRCNNConvUpsampleHead` (current scope `roi_heads`) on
/// `boxes [R, 4]`: per-class mask logits `[R, K, 28, 28]`.
pub(crate) fn mask_logits(b: &mut Builder, cfg: &ModelConfig, levels: &[Value], boxes: Value) -> Result<Value> {
    let det = &cfg.detector;
    let norm = head_norm(cfg);
    let x = pooler(b, "mask_pooler", levels, boxes, MASK_POOLER_SIZE)?;
    b.scoped("mask_head", |b| {
        let mut x = x;
        for i in 1..=det.mask_head_num_conv {
            x = b.conv_norm(&format!("mask_fcn{i}"), x, det.mask_head_conv_dim, 3, norm)?;
            x = b.relu(x)?;
        }
        let x = b.conv_transpose("deconv", x, det.mask_head_conv_dim, 2)?;
        let x = b.scoped("deconv_relu", |b| b.relu(x))?;
        let inp = b.shape(x)[1];
        let (w, bias) = b.conv2d_params("predictor", inp, det.num_classes, 1, 0.001)?;
        b.scoped("predictor", |b| b.conv2d_apply(x, w, bias, 0))
    })
}

/// `fast_rcnn_inference_single_image`: softmax, drop the background column (the last), decode
/// class-specific boxes, clip, flatten to `R * K` candidates (class id = column), keep scores
/// `> score_thresh` of valid proposals, per-class NMS, top `detections_per_image`.
/// Returns `(boxes [D, 4], scores [D], classes [D] i64, valid [D] u8)`.
fn fast_rcnn_inference(
    b: &mut Builder,
    cfg: &ModelConfig,
    logits: Value,
    deltas: Value,
    proposals: &Proposals,
    image_hw: [usize; 2],
) -> Result<(Value, Value, Value, Value)> {
    let det = &cfg.detector;
    let k = det.num_classes;
    let r = b.shape(logits)[0];
    let probs = b.softmax(logits, 1)?;
    let probs = b.slice(probs, 1, 0, k)?;
    let boxes = b.op(
        BoxDecode {
            weights: BOX_REG_WEIGHTS,
            scale_clamp: box_scale_clamp(),
        },
        &[deltas, proposals.boxes],
    )?;
    let boxes = b.reshape(boxes, vec![r * k, 4])?;
    let boxes = b.clip_boxes(boxes, image_hw)?;
    let iota = |b: &mut Builder, axis: usize| -> Result<Value> {
        let v = b.op(
            IotaLike {
                axis,
                start: 0.0,
                step: 1.0,
                dtype: DType::I64,
            },
            &[probs],
        )?;
        b.reshape(v, vec![r * k])
    };
    let class_ids = iota(b, 1)?;
    let row_ids = iota(b, 0)?;
    // Candidate (row, class) is valid when its proposal is.
    let valid = b.op(IndexSelect::new(0), &[proposals.valid, row_ids])?;
    let scores = b.reshape(probs, vec![r * k])?;
    let nms = b.op_multi(
        Nms {
            iou_threshold: det.box_nms_thresh,
            max_output: det.detections_per_image,
            score_threshold: Some(det.score_thresh),
        },
        &[boxes, scores, class_ids, valid],
    )?;
    let keep = Value { node: nms, output: 0 };
    let keep_valid = Value { node: nms, output: 1 };
    let boxes = b.op(IndexSelect::new(0), &[boxes, keep])?;
    let scores = b.op(IndexSelect::new(0), &[scores, keep])?;
    let classes = b.op(IndexSelect::new(0), &[class_ids, keep])?;
    Ok((boxes, scores, classes, keep_valid))
}
