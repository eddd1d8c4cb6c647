//! [`build_detector`]: the whole Mask R-CNN at test time (backbone, RPN, box and mask heads)
//! as one static-shape graph.

use vitdet_ir::Graph;

use crate::backbone::{pyramid, INPUT_NAME};
use crate::builder::{Builder, Result};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::roi_heads::roi_heads;
use crate::rpn::{rpn, RpnTopk};

/// Names of the detector graph's outputs, in order: `boxes [D, 4]` f32 (`x0, y0, x1, y1` in
/// input-image pixels), `scores [D]` f32, `classes [D]` i64 (`0..num_classes`), `valid [D]`
/// u8 and `masks [D, 28, 28]` f32 probabilities, `D = detector.detections_per_image`.
pub const DETECTOR_OUTPUT_NAMES: [&str; 5] = ["boxes", "scores", "classes", "valid", "masks"];

/// The detector for an image filling the whole (square) input: [`build_detector_for_image`]
/// with `image_hw = [image_size, image_size]`.
pub fn build_detector(cfg: &ModelConfig) -> Result<Graph> {
    build_detector_for_image(cfg, [cfg.image_size, cfg.image_size])
}

/// The test-time Mask R-CNN graph, batch 1: input `image [1, 3, S, S]` (normalized, padded
/// as for [`crate::build_backbone`]), outputs [`DETECTOR_OUTPUT_NAMES`]. Parameter names are
/// detectron2's state-dict keys (`backbone.*`, `proposal_generator.rpn_head.*`,
/// `roi_heads.box_head.*`, `roi_heads.box_predictor.*`, `roi_heads.mask_head.*`).
///
/// `image_hw` (height, width) is the size of the image inside the padded input: proposals
/// and detections are clipped to it. detectron2 clips to the `image_sizes` of its `ImageList`,
/// the resized image *before* padding (e.g. 683 x 1024 for a 4:3 landscape photo at 1024), so
/// pass that for detectron2's results; boxes are in that resized frame (detectron2's
/// `detector_postprocess` then scales them to the original image). Shapes are static, so it is
/// a build parameter, not an input: one graph per resized size. It must lie in
/// `1..=image_size` on both axes.
///
/// Dynamic counts become fixed sizes with validity masks: `rpn_post_nms_topk` proposals (those
/// past the NMS survivors are invalid and never become detections) and `detections_per_image`
/// detections; output rows with `valid = 0` hold arbitrary (finite) values, and their masks
/// are 0: the mask head runs on the valid detections only (a dynamic row count bounded by
/// `detections_per_image`, at least 1, so without any valid detection slot 0 still gets a
/// mask; plans and FLOP counts use the bound). Masks are the 28x28 per-box
/// probabilities (`mask_rcnn_inference`); pasting them into the image
/// (`PasteMasks`, detectron2's `paste_masks_in_image`, in the *original* image frame) is left
/// to a separate step, so the graph has no `pasted` output.
///
/// Deviation: detectron2 also drops detection candidates whose decoded box is non-finite;
/// here only non-finite scores are dropped (inside `Nms`). Decoded sizes are clamped, so boxes
/// are finite whenever the deltas are.
pub fn build_detector_for_image(cfg: &ModelConfig, image_hw: [usize; 2]) -> Result<Graph> {
    cfg.validate()?;
    let s = cfg.image_size;
    if image_hw.iter().any(|&d| d == 0 || d > s) {
        return Err(ModelError::Invalid(format!(
            "image size {}x{} must be positive and fit the {s}x{s} input",
            image_hw[0], image_hw[1]
        )));
    }
    let mut b = Builder::new();
    let image = b.input(INPUT_NAME, vec![1, 3, s, s])?;
    let feats = pyramid(&mut b, cfg, image)?;
    let topk = RpnTopk {
        pre_nms: cfg.detector.rpn_pre_nms_topk,
        post_nms: cfg.detector.rpn_post_nms_topk,
    };
    let proposals = rpn(&mut b, cfg, &feats, image_hw, topk)?;
    let d = roi_heads(&mut b, cfg, &feats[..4], &proposals, image_hw)?;
    let mut graph = b.finish();
    for (name, v) in DETECTOR_OUTPUT_NAMES
        .iter()
        .zip([d.boxes, d.scores, d.classes, d.valid, d.masks])
    {
        graph.set_output(name, v);
    }
    Ok(graph)
}
