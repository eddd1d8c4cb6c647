//! detectron2's `RPN` with `StandardRPNHead` at test time (scope `proposal_generator`): a head
//! shared over p2..p6, anchors, per-level top-k, box decoding, clipping, empty-box removal and
//! a level-wise batched NMS, in static shapes (a fixed proposal count plus a validity mask).

use vitdet_ir::ops::{
    Anchors, Binary, BinaryKind, BoxDecode, CompareKind, CompareScalar, IndexSelect, IotaLike, Nms, TopK,
};
use vitdet_ir::{DType, Value};

use crate::backbone::OUTPUT_STRIDES;
use crate::builder::{Builder, Result};
use crate::config::ModelConfig;

/// Anchor side per level p2..p6 (`DefaultAnchorGenerator` sizes `[[32], .., [512]]`).
pub const RPN_ANCHOR_SIZES: [f64; 5] = [32.0, 64.0, 128.0, 256.0, 512.0];
/// Anchor aspect ratios (h / w) of every level.
pub const RPN_ASPECT_RATIOS: [f64; 3] = [0.5, 1.0, 2.0];
/// detectron2's `_DEFAULT_SCALE_CLAMP`: `log(1000 / 16)`, the clamp on decoded `dw`, `dh`.
pub fn box_scale_clamp() -> f64 {
    (1000.0f64 / 16.0).ln()
}

/// Proposals: `boxes [P, 4]` (image pixels, clipped, descending objectness) and `valid [P]`
/// (u8) where `P` is the post-NMS top-k; plus the head's raw outputs per level, which the
/// training losses read.
pub(crate) struct Proposals {
    pub boxes: Value,
    pub valid: Value,
    pub levels: Vec<RpnLevel>,
}

/// The RPN head's outputs on one level, in detectron2's `RPN.forward` order (locations
/// row-major, then cell anchors): `logits [n]`, `deltas [n, 4]` and the level's `anchors [n, 4]`.
pub(crate) struct RpnLevel {
    pub logits: Value,
    pub deltas: Value,
    pub anchors: Value,
}

/// How many proposals the RPN keeps per level before NMS and in all after it (detectron2's
/// `pre_nms_topk`, `post_nms_topk`; the test-time values are in [`crate::DetectorConfig`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RpnTopk {
    pub pre_nms: usize,
    pub post_nms: usize,
}

/// Emits the RPN in scope `proposal_generator` on `feats = [p2, .., p6]`.
///
/// `image_hw` is the size boxes are clipped to (detectron2: the `image_sizes` of the
/// `ImageList`, i.e. the resized image before padding).
pub(crate) fn rpn(
    b: &mut Builder,
    cfg: &ModelConfig,
    feats: &[Value],
    image_hw: [usize; 2],
    topk: RpnTopk,
) -> Result<Proposals> {
    let det = &cfg.detector;
    let c = cfg.out_channels;
    let a = RPN_ASPECT_RATIOS.len();
    b.scoped("proposal_generator", |b| {
        // StandardRPNHead: its parameters once, applied to every level. With one conv the
        // module is `conv` itself; with several, an `nn.Sequential` of `conv0`, `conv1`, ...
        // (`self.conv.add_module(f"conv{k}", conv)` in rpn.py). Init: Normal(0.01), bias 0.
        let (convs, obj, deltas) = b.scoped("rpn_head", |b| {
            let mut convs = Vec::new();
            for k in 0..det.rpn_num_conv {
                let name = if det.rpn_num_conv == 1 {
                    "conv".to_string()
                } else {
                    format!("conv.conv{k}")
                };
                convs.push(b.conv2d_params(&name, c, c, 3, 0.01)?);
            }
            let obj = b.conv2d_params("objectness_logits", c, a, 1, 0.01)?;
            let deltas = b.conv2d_params("anchor_deltas", c, 4 * a, 1, 0.01)?;
            Ok((convs, obj, deltas))
        })?;

        let (mut boxes, mut scores, mut levels) = (Vec::new(), Vec::new(), Vec::new());
        let mut raw = Vec::with_capacity(feats.len());
        for (l, &x) in feats.iter().enumerate() {
            let [_, _, h, w] = b.shape(x)[..] else {
                unreachable!("pyramid levels are NCHW")
            };
            let n = h * w * a;
            let (logits, d) = b.scoped("rpn_head", |b| {
                let mut t = x;
                for &(wt, bias) in &convs {
                    t = b.conv2d_apply(t, wt, bias, 1)?;
                    t = b.relu(t)?;
                }
                let logits = b.conv2d_apply(t, obj.0, obj.1, 0)?;
                let d = b.conv2d_apply(t, deltas.0, deltas.1, 0)?;
                Ok((logits, d))
            })?;
            // (1, A, H, W) -> (1, H, W, A) -> (H*W*A); (1, A*4, H, W) -> (1, A, 4, H, W)
            // -> (1, H, W, A, 4) -> (H*W*A, 4): detectron2's RPN.forward order.
            let logits = b.permute(logits, vec![0, 2, 3, 1])?;
            let logits = b.reshape(logits, vec![n])?;
            let d = b.reshape(d, vec![1, a, 4, h, w])?;
            let d = b.permute(d, vec![0, 3, 4, 1, 2])?;
            let d = b.reshape(d, vec![n, 4])?;
            let anchors = b.scoped("anchor_generator", |b| {
                b.op(
                    Anchors {
                        grid: [h, w],
                        stride: OUTPUT_STRIDES[l] as f64,
                        sizes: vec![RPN_ANCHOR_SIZES[l]],
                        aspect_ratios: RPN_ASPECT_RATIOS.to_vec(),
                        offset: 0.0,
                    },
                    &[],
                )
            })?;
            // find_top_rpn_proposals: top min(n, pre_nms_topk) per level (detectron2 decodes
            // every anchor first; decoding only the selected ones gives the same boxes).
            let k = n.min(topk.pre_nms);
            let top = b.op_multi(TopK { k }, &[logits])?;
            let (top_scores, top_idx) = (Value { node: top, output: 0 }, Value { node: top, output: 1 });
            raw.push(RpnLevel {
                logits,
                deltas: d,
                anchors,
            });
            let d = b.op(IndexSelect::new(0), &[d, top_idx])?;
            let anchors = b.op(IndexSelect::new(0), &[anchors, top_idx])?;
            let decoded = b.op(
                BoxDecode {
                    weights: [1.0; 4],
                    scale_clamp: box_scale_clamp(),
                },
                &[d, anchors],
            )?;
            // torch.full((k,), level_id): the NMS group of this level's proposals.
            let lvl = b.op(
                IotaLike {
                    axis: 0,
                    start: l as f64,
                    step: 0.0,
                    dtype: DType::I64,
                },
                &[top_scores],
            )?;
            boxes.push(decoded);
            scores.push(top_scores);
            levels.push(lvl);
        }
        let boxes = b.concat(&boxes, 0)?;
        let scores = b.concat(&scores, 0)?;
        let levels = b.concat(&levels, 0)?;
        let boxes = b.clip_boxes(boxes, image_hw)?;
        let valid = nonempty(b, boxes)?;
        // Non-finite scores are invalid in Nms itself (detectron2's `valid_mask`).
        let nms = b.op_multi(
            Nms {
                iou_threshold: det.rpn_nms_thresh,
                max_output: topk.post_nms,
                score_threshold: None,
            },
            &[boxes, scores, levels, valid],
        )?;
        let keep = Value { node: nms, output: 0 };
        let keep_valid = Value { node: nms, output: 1 };
        let boxes = b.op(IndexSelect::new(0), &[boxes, keep])?;
        Ok(Proposals {
            boxes,
            valid: keep_valid,
            levels: raw,
        })
    })
}

/// detectron2's `Boxes.nonempty(threshold=0)`: `(x1 - x0 > 0) & (y1 - y0 > 0)` as u8 `[N]`,
/// computed as `min(w, h) > 0`.
fn nonempty(b: &mut Builder, boxes: Value) -> Result<Value> {
    let n = b.shape(boxes)[0];
    let hi = b.slice(boxes, 1, 2, 4)?;
    let lo = b.slice(boxes, 1, 0, 2)?;
    let wh = b.binary(BinaryKind::Sub, hi, lo)?;
    let w = b.slice(wh, 1, 0, 1)?;
    let h = b.slice(wh, 1, 1, 2)?;
    let side = b.op(
        Binary {
            kind: BinaryKind::Minimum,
        },
        &[w, h],
    )?;
    let ok = b.op(
        CompareScalar {
            kind: CompareKind::Gt,
            value: 0.0,
        },
        &[side],
    )?;
    b.reshape(ok, vec![n])
}
