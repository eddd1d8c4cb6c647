//! `vitdet-models`: configs and graph builders for the two ViT detection backbones, emitting
//! [`vitdet_ir::Graph`]s whose parameter names are detectron2's state-dict keys.
//!
//! # The two families
//!
//! Both share one plain ViT trunk (scope `backbone.net`): a 16x16 stride-16 patch embedding,
//! an absolute position embedding pre-trained on a 14x14 grid with a class token (bicubically
//! resized to the token grid), then `depth` pre-norm blocks (LayerNorm eps 1e-6, multi-head
//! attention, GELU MLP, optional drop path and layer scale). Most blocks attend inside
//! `window_size`-sized windows (tokens zero-padded to a multiple of the window); the
//! `global_blocks` attend over the whole grid. The [`AttentionStrategy`] override makes every
//! block window (`window`) or global (`global`).
//!
//! * **`vitdet-*`** ([`Family::Vitdet`]) is detectron2's ViTDet (`projects/ViTDet`): every
//!   block has its own decomposed relative-position tables `rel_pos_h`, `rel_pos_w`, and only
//!   the last trunk map feeds the *simple feature pyramid* (`backbone.simfp_{2..5}`: deconvs,
//!   channel LayerNorm, max-pool, each followed by 1x1 and 3x3 convs with channel LayerNorm)
//!   plus `LastLevelMaxPool` for p6.
//! * **`vit-*`** ([`Family::Vit`]) is the model of *Benchmarking Detection Transfer Learning
//!   with Vision Transformers* (Li et al. 2021): BEiT-style relative position *bias* tables,
//!   one shared by all window blocks (`backbone.net.window_rel_pos_bias`) and one by all
//!   global blocks (`backbone.net.global_rel_pos_bias`), optional layer scale
//!   (`gamma_1`, `gamma_2`); the outputs of blocks d/4, d/2, 3d/4 and d feed a multi-scale
//!   adapter (`backbone.adapter`: 4x up with deconv/GroupNorm/GELU/deconv, 2x up, identity,
//!   2x2 max-pool) and a detectron2 FPN with BatchNorm (`backbone.fpn_lateral{2..5}`,
//!   `backbone.fpn_output{2..5}`), p6 by max-pool.
//!
//! Both produce `p2`..`p6` (strides 4..64, `out_channels` channels) from one input `image`.
//!
//! # The detector
//!
//! [`build_detector`] adds detectron2's test-time Mask R-CNN to either backbone, configured by
//! [`ModelConfig::detector`] ([`DetectorConfig`], defaults from detectron2's ViTDet COCO
//! config): the RPN (`proposal_generator.rpn_head`: two shared 3x3 convs `conv.conv0`,
//! `conv.conv1` with ReLU, `objectness_logits`, `anchor_deltas`; anchors 32..512 for p2..p6 with
//! ratios 0.5, 1, 2; per-level top 1000, decode, clip, empty-box removal, level-wise NMS 0.7,
//! 1000 proposals), the box head (`roi_heads.box_head.conv1..4` with norm and ReLU, `fc1`;
//! `roi_heads.box_predictor.cls_score`, `bbox_pred`; softmax, class-specific decoding, clip,
//! score threshold, per-class NMS 0.5, 100 detections) and the mask head
//! (`roi_heads.mask_head.mask_fcn1..4`, `deconv`, `predictor`; the predicted class's mask,
//! sigmoid). The head norms are detectron2's channel LayerNorm for `vitdet-*` and BatchNorm for
//! `vit-*`. Counts that vary at run time are static maxima with a `valid` mask. `vitdet-b` has
//! detectron2's 110,895,792 parameters; `vit-b` 115,676,968 (the paper: 116M), `vit-l`
//! 339,015,056 (339M).
//!
//! # Training
//!
//! [`build_detector_training`] builds the same detector in training form as one forward graph
//! from an image and padded ground truth (`gt_boxes`, `gt_classes`, `gt_masks`, `gt_valid`) and
//! a `seed` to detectron2's five losses and their sum `loss`: drop path active, BatchNorm on
//! batch statistics, in-graph target assignment (anchor and proposal matching and sampling,
//! mask targets) and weighted losses. Its trainable parameters are exactly the inference
//! detector's, so checkpoints interchange; autodiff derives the backward graph from it.
//!
//! # Use
//!
//! ```
//! use vitdet_models::{build_backbone, ModelConfig};
//! let cfg = ModelConfig::load("vitdet-tiny").unwrap(); // or a path to a .json / .toml file
//! let graph = build_backbone(&cfg).unwrap();
//! graph.verify().unwrap();
//! assert_eq!(graph.outputs.len(), 5);
//!
//! // The whole Mask R-CNN; `build_detector_for_image` clips to a smaller resized image.
//! let detector = vitdet_models::build_detector(&cfg).unwrap();
//! detector.verify().unwrap();
//! assert_eq!(detector.outputs.len(), vitdet_models::DETECTOR_OUTPUT_NAMES.len());
//! ```
//!
//! # Parameter initialization (when no weights are loaded)
//!
//! Linear weights and `pos_embed`: truncated normal, std 0.02. Conv and deconv weights:
//! Normal with std `sqrt(2 / fan_out)`, `fan_out = out_channels * k * k` (detectron2's
//! `c2_msra_fill`). Biases: zeros. Norm weights ones, biases zeros; BatchNorm running mean
//! zeros and variance ones (buffers, `trainable = false`). Relative-position tables (decomposed
//! and BEiT): zeros (detectron2's `rel_pos_zero_init` default; the paper's "zero-init" row).
//! Layer scale: ones, i.e. identity, until BEiT weights are loaded (the IR's `Init` has no
//! arbitrary constant).
//!
//! BatchNorm's `num_batches_tracked` buffer is not declared: it does not affect inference, so a
//! weight loader should ignore that key.

mod adapter_fpn;
mod attention;
mod backbone;
mod builder;
mod config;
mod detector;
mod error;
pub mod presets;
mod roi_heads;
mod rpn;
mod simple_pyramid;
mod train;
mod vit;

pub use adapter_fpn::{ADAPTER_GN_EPS, FPN_BN_EPS};
pub use backbone::{build_backbone, build_backbone_batched, INPUT_NAME, OUTPUT_NAMES, OUTPUT_STRIDES};
pub use builder::TRUNC_NORMAL_STD;
pub use config::{
    quarter_blocks, AttentionStrategy, DetectorConfig, Family, ModelConfig, RelPos, PIXEL_MEAN, PIXEL_STD,
};
pub use detector::{build_detector, build_detector_for_image, DETECTOR_OUTPUT_NAMES};
pub use error::ModelError;
pub use roi_heads::{BOX_POOLER_SIZE, BOX_REG_WEIGHTS, HEAD_LN_EPS, MASK_POOLER_SIZE};
pub use rpn::{box_scale_clamp, RPN_ANCHOR_SIZES, RPN_ASPECT_RATIOS};
pub use simple_pyramid::PYRAMID_LN_EPS;
pub use train::{
    build_detector_training, build_detector_training_with, TrainingConfig, ANCHOR_TARGETS_STREAM, BUFFER_UPDATE_PREFIX,
    GT_BOXES, GT_CLASSES, GT_MASKS, GT_VALID, LOSS_NAMES, PROPOSAL_TARGETS_STREAM, SAMPLE_STAT_NAMES, SEED,
};
