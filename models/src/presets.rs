//! Named configs: detectron2's ViTDet sizes, the paper's ViT sizes and tiny test models.
//!
//! The tiny presets must stay in sync with `tests/fixtures/generate.py`, which builds the
//! PyTorch reference models with exactly these settings.

use crate::config::{DetectorConfig, Family, ModelConfig, RelPos};

/// Every preset name [`get`] accepts.
pub const NAMES: [&str; 8] = [
    "vit-b",
    "vit-l",
    "vit-h",
    "vitdet-b",
    "vitdet-l",
    "vitdet-h",
    "vit-tiny",
    "vitdet-tiny",
];

/// The preset called `name`, if any.
pub fn get(name: &str) -> Option<ModelConfig> {
    Some(match name {
        "vitdet-b" => vitdet(768, 12, 12, vec![2, 5, 8, 11], 0.1),
        "vitdet-l" => vitdet(1024, 24, 16, vec![5, 11, 17, 23], 0.4),
        "vitdet-h" => vitdet(1280, 32, 16, vec![7, 15, 23, 31], 0.5),
        // Paper, Appendix: dp 0.1 for ViT-B, 0.3 for ViT-L; ViT-H is not in the paper (0.5 as
        // ViTDet-H).
        "vit-b" => vit(768, 12, 12, 0.1),
        "vit-l" => vit(1024, 24, 16, 0.3),
        "vit-h" => vit(1280, 32, 16, 0.5),
        "vitdet-tiny" => {
            let mut c = vitdet(32, 4, 2, vec![1, 3], 0.0);
            c.image_size = 128;
            c.window_size = 3;
            c.out_channels = 16;
            c.detector = tiny_detector();
            c
        }
        "vit-tiny" => {
            let mut c = vit(32, 8, 2, 0.0);
            c.image_size = 128;
            c.window_size = 3;
            c.global_blocks = Some(vec![1, 3, 5, 7]);
            c.layer_scale = true;
            c.group_norm_groups = 8;
            c.out_channels = 16;
            c.detector = tiny_detector();
            c
        }
        _ => return None,
    })
}

/// detectron2 ViTDet: 1024 input, 14x14 windows, decomposed rel pos, simple feature pyramid.
fn vitdet(dim: usize, depth: usize, heads: usize, global: Vec<usize>, drop_path: f64) -> ModelConfig {
    let mut c = ModelConfig::new(Family::Vitdet, dim, depth, heads);
    c.global_blocks = Some(global);
    c.rel_pos = Some(RelPos::Decomposed);
    c.drop_path_rate = drop_path;
    c
}

/// The paper's model: hybrid attention with global blocks at the end of each quarter, abs pos
/// plus shared BEiT bias tables, adapter + FPN(BN).
fn vit(dim: usize, depth: usize, heads: usize, drop_path: f64) -> ModelConfig {
    let mut c = ModelConfig::new(Family::Vit, dim, depth, heads);
    c.global_blocks = Some(crate::config::quarter_blocks(depth));
    c.rel_pos = Some(RelPos::SharedBias);
    c.drop_path_rate = drop_path;
    c
}

/// Heads small enough for CPU tests and demos: narrow convs and fc, fewer proposals and
/// detections; COCO's 80 classes and every threshold as detectron2's.
fn tiny_detector() -> DetectorConfig {
    DetectorConfig {
        rpn_pre_nms_topk: 200,
        rpn_post_nms_topk: 100,
        box_head_conv_dim: 16,
        box_head_fc_dim: 64,
        mask_head_conv_dim: 16,
        detections_per_image: 20,
        ..DetectorConfig::default()
    }
}
