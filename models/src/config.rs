//! [`ModelConfig`]: every knob of both backbone families, with serde (JSON / TOML) support,
//! resolution helpers and [`ModelConfig::validate`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::presets;

/// Which backbone family (see the crate docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// detectron2's ViTDet: the last trunk map feeds a simple feature pyramid.
    Vitdet,
    /// Li et al. 2021: four trunk taps, a multi-scale adapter and an FPN with BatchNorm.
    Vit,
}

/// Which blocks attend globally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionStrategy {
    /// Every block attends within `window_size` windows (`global_blocks` ignored).
    Window,
    /// Window attention except in `global_blocks` (the default).
    #[default]
    Hybrid,
    /// Every block attends over the whole token grid.
    Global,
}

/// Relative-position scheme of the attention logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelPos {
    /// detectron2's decomposed tables `rel_pos_h`, `rel_pos_w` in every block (vitdet default).
    Decomposed,
    /// BEiT bias tables `[(2s-1)^2, heads]`, one shared by all window blocks and one by all
    /// global blocks (vit default).
    SharedBias,
    /// No relative position.
    #[serde(rename = "none", alias = "disabled")]
    Disabled,
}

/// A backbone of either family, any size. Serialized field names are the ones accepted in
/// JSON / TOML config files; fields with a default may be omitted. A file may also start from a
/// preset with a `preset = "vit-b"` key and override individual fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub family: Family,
    /// Side of the (square, padded) input image in pixels. Default 1024.
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    /// Default 16.
    #[serde(default = "d_patch_size")]
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// MLP hidden width = `int(embed_dim * mlp_ratio)`. Default 4.
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Default true.
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    /// Window side in tokens for window blocks. Default 14.
    #[serde(default = "d_window_size")]
    pub window_size: usize,
    /// Zero-based indices of the global-attention blocks (hybrid strategy). Default: the last
    /// block of each quarter, `k * depth / 4 - 1` for `k = 1..=4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_blocks: Option<Vec<usize>>,
    /// Overrides `global_blocks`: `window` (none global), `hybrid`, `global` (all). Default hybrid.
    #[serde(default)]
    pub attention: AttentionStrategy,
    /// Absolute position embedding (class-token layout, resized bicubically). Default true.
    #[serde(default = "d_true")]
    pub abs_pos: bool,
    /// Image size the absolute position embedding was pre-trained at: its grid is
    /// `pretrain_img_size / patch_size` (+1 class token). Default 224.
    #[serde(default = "d_pretrain_img_size")]
    pub pretrain_img_size: usize,
    /// Default: `decomposed` for vitdet, `shared_bias` for vit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rel_pos: Option<RelPos>,
    /// Decomposed rel-pos only: the token grid the global blocks' tables are sized for
    /// (`2 s - 1` rows); when it differs from the token grid, `RelPosGather` interpolates
    /// (detectron2's behaviour when running a checkpoint at another size). Default: the grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rel_pos_global_size: Option<usize>,
    /// LayerNorm epsilon in the trunk (and the simple pyramid's channel LayerNorms). Default 1e-6.
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// Stochastic depth of the last block; block `i` uses `rate * i / (depth - 1)`. Default 0.
    #[serde(default)]
    pub drop_path_rate: f64,
    /// BEiT layer scale (`gamma_1`, `gamma_2`). Default false.
    #[serde(default)]
    pub layer_scale: bool,
    /// Channels of the pyramid outputs p2..p6. Default 256.
    #[serde(default = "d_out_channels")]
    pub out_channels: usize,
    /// GroupNorm groups of the vit family's 4x adapter. Default 32.
    #[serde(default = "d_group_norm_groups")]
    pub group_norm_groups: usize,
    /// Per-channel RGB mean subtracted in preprocessing (detectron2's).
    #[serde(default = "d_pixel_mean")]
    pub pixel_mean: [f64; 3],
    /// Per-channel RGB std divided in preprocessing (detectron2's).
    #[serde(default = "d_pixel_std")]
    pub pixel_std: [f64; 3],
    /// The Mask R-CNN heads and their test-time settings ([`crate::build_detector`]); ignored by
    /// [`crate::build_backbone`]. Every field has a default (detectron2's ViTDet COCO config).
    #[serde(default)]
    pub detector: DetectorConfig,
}

/// The Mask R-CNN heads on top of the pyramid (detectron2's `RPN` with `StandardRPNHead`,
/// `StandardROIHeads` with `FastRCNNConvFCHead`, `FastRCNNOutputLayers` and
/// `MaskRCNNConvUpsampleHead`) and their inference settings. Defaults are detectron2's ViTDet
/// COCO values (`configs/common/models/mask_rcnn_fpn.py` + `mask_rcnn_vitdet.py`). In a config
/// file this is the `detector` table; omitted fields take their defaults, or the preset's when
/// the file starts from one (its fields override the preset's one by one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    /// Foreground classes (COCO: 80); the classifier has one more (background, last).
    #[serde(default = "d_num_classes")]
    pub num_classes: usize,
    /// 3x3 convs (with ReLU, channels kept) in the RPN head; ViTDet: 2 (`conv_dims=[-1, -1]`).
    /// With 1 the conv is `rpn_head.conv` itself, with more `rpn_head.conv.conv{k}`.
    #[serde(default = "d_rpn_num_conv")]
    pub rpn_num_conv: usize,
    /// Proposals kept per pyramid level before NMS, by objectness (test: 1000).
    #[serde(default = "d_topk")]
    pub rpn_pre_nms_topk: usize,
    /// Proposals kept after NMS over all levels (test: 1000): the RoI count of the box head.
    #[serde(default = "d_topk")]
    pub rpn_post_nms_topk: usize,
    /// IoU threshold of the RPN's per-level NMS (0.7).
    #[serde(default = "d_rpn_nms")]
    pub rpn_nms_thresh: f64,
    /// 3x3 conv + norm + ReLU layers of the box head (ViTDet: 4).
    #[serde(default = "d_head_num_conv")]
    pub box_head_num_conv: usize,
    /// Channels of the box head convs (256).
    #[serde(default = "d_head_conv_dim")]
    pub box_head_conv_dim: usize,
    /// Width of the box head's single fully connected layer (1024).
    #[serde(default = "d_box_head_fc_dim")]
    pub box_head_fc_dim: usize,
    /// 3x3 conv + norm + ReLU layers of the mask head before its deconv (4).
    #[serde(default = "d_head_num_conv")]
    pub mask_head_num_conv: usize,
    /// Channels of the mask head convs and deconv (256).
    #[serde(default = "d_head_conv_dim")]
    pub mask_head_conv_dim: usize,
    /// Detections scoring at or below this are dropped before the per-class NMS (test: 0.05).
    #[serde(default = "d_score_thresh")]
    pub score_thresh: f64,
    /// IoU threshold of the per-class detection NMS (0.5).
    #[serde(default = "d_box_nms")]
    pub box_nms_thresh: f64,
    /// Maximum detections per image (100): the static size of every output.
    #[serde(default = "d_detections")]
    pub detections_per_image: usize,
}

fn d_num_classes() -> usize {
    80
}
fn d_rpn_num_conv() -> usize {
    2
}
fn d_topk() -> usize {
    1000
}
fn d_rpn_nms() -> f64 {
    0.7
}
fn d_head_num_conv() -> usize {
    4
}
fn d_head_conv_dim() -> usize {
    256
}
fn d_box_head_fc_dim() -> usize {
    1024
}
fn d_score_thresh() -> f64 {
    0.05
}
fn d_box_nms() -> f64 {
    0.5
}
fn d_detections() -> usize {
    100
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            num_classes: d_num_classes(),
            rpn_num_conv: d_rpn_num_conv(),
            rpn_pre_nms_topk: d_topk(),
            rpn_post_nms_topk: d_topk(),
            rpn_nms_thresh: d_rpn_nms(),
            box_head_num_conv: d_head_num_conv(),
            box_head_conv_dim: d_head_conv_dim(),
            box_head_fc_dim: d_box_head_fc_dim(),
            mask_head_num_conv: d_head_num_conv(),
            mask_head_conv_dim: d_head_conv_dim(),
            score_thresh: d_score_thresh(),
            box_nms_thresh: d_box_nms(),
            detections_per_image: d_detections(),
        }
    }
}

impl DetectorConfig {
    /// Checks the section describes buildable heads; the message names the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(m));
        for (name, v) in [
            ("detector.num_classes", self.num_classes),
            ("detector.rpn_num_conv", self.rpn_num_conv),
            ("detector.rpn_pre_nms_topk", self.rpn_pre_nms_topk),
            ("detector.rpn_post_nms_topk", self.rpn_post_nms_topk),
            ("detector.box_head_conv_dim", self.box_head_conv_dim),
            ("detector.box_head_fc_dim", self.box_head_fc_dim),
            ("detector.mask_head_conv_dim", self.mask_head_conv_dim),
            ("detector.detections_per_image", self.detections_per_image),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        for (name, v) in [
            ("detector.rpn_nms_thresh", self.rpn_nms_thresh),
            ("detector.box_nms_thresh", self.box_nms_thresh),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("`{name}` must be in [0, 1], found {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.score_thresh) {
            return bad(format!(
                "`detector.score_thresh` must be in [0, 1), found {}",
                self.score_thresh
            ));
        }
        Ok(())
    }
}

fn d_image_size() -> usize {
    1024
}
fn d_patch_size() -> usize {
    16
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_true() -> bool {
    true
}
fn d_window_size() -> usize {
    14
}
fn d_pretrain_img_size() -> usize {
    224
}
fn d_norm_eps() -> f64 {
    1e-6
}
fn d_out_channels() -> usize {
    256
}
fn d_group_norm_groups() -> usize {
    32
}
/// detectron2's `PIXEL_MEAN` (RGB, 0..255).
pub const PIXEL_MEAN: [f64; 3] = [123.675, 116.28, 103.53];
/// detectron2's `PIXEL_STD` (RGB, 0..255).
pub const PIXEL_STD: [f64; 3] = [58.395, 57.12, 57.375];
fn d_pixel_mean() -> [f64; 3] {
    PIXEL_MEAN
}
fn d_pixel_std() -> [f64; 3] {
    PIXEL_STD
}

fn parse_err(origin: &str, message: impl std::fmt::Display) -> ModelError {
    ModelError::Parse {
        path: origin.to_string(),
        message: message.to_string().trim_end().to_string(),
    }
}

/// The global blocks of the paper's hybrid schedule: the last block of each quarter.
pub fn quarter_blocks(depth: usize) -> Vec<usize> {
    (1..=4)
        .map(|k| k * depth / 4)
        .filter(|&b| b > 0)
        .map(|b| b - 1)
        .collect()
}

impl ModelConfig {
    /// A config with the given family and trunk size and every other field at its default.
    pub fn new(family: Family, embed_dim: usize, depth: usize, num_heads: usize) -> Self {
        ModelConfig {
            family,
            image_size: d_image_size(),
            patch_size: d_patch_size(),
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: d_mlp_ratio(),
            qkv_bias: true,
            window_size: d_window_size(),
            global_blocks: None,
            attention: AttentionStrategy::Hybrid,
            abs_pos: true,
            pretrain_img_size: d_pretrain_img_size(),
            rel_pos: None,
            rel_pos_global_size: None,
            norm_eps: d_norm_eps(),
            drop_path_rate: 0.0,
            layer_scale: false,
            out_channels: d_out_channels(),
            group_norm_groups: d_group_norm_groups(),
            pixel_mean: PIXEL_MEAN,
            pixel_std: PIXEL_STD,
            detector: DetectorConfig::default(),
        }
    }

    /// A named preset (see [`presets::NAMES`]).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        presets::get(name).ok_or_else(|| ModelError::UnknownPreset {
            name: name.to_string(),
            valid: presets::NAMES.to_vec(),
        })
    }

    /// A preset name, or a path to a `.json` / `.toml` config file. The result is validated;
    /// errors about a file name the file.
    pub fn load(arg: &str) -> Result<Self, ModelError> {
        if let Some(cfg) = presets::get(arg) {
            return Ok(cfg);
        }
        let path = Path::new(arg);
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        let is_json = match ext.as_deref() {
            Some("json") => true,
            Some("toml") => false,
            _ => {
                return Err(ModelError::UnknownPreset {
                    name: arg.to_string(),
                    valid: presets::NAMES.to_vec(),
                })
            }
        };
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: arg.to_string(),
            source,
        })?;
        let cfg = if is_json {
            Self::parse_json(&text, arg)?
        } else {
            Self::parse_toml(&text, arg)?
        };
        cfg.validate().map_err(|e| match e {
            ModelError::Invalid(message) => ModelError::Parse {
                path: arg.to_string(),
                message,
            },
            e => e,
        })?;
        Ok(cfg)
    }

    /// Parses JSON config text (not validated). A `"preset"` key starts from that preset.
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        Self::parse_json(text, "<json>")
    }

    /// Parses TOML config text (not validated). A `preset` key starts from that preset.
    pub fn from_toml_str(text: &str) -> Result<Self, ModelError> {
        Self::parse_toml(text, "<toml>")
    }

    fn parse_json(text: &str, origin: &str) -> Result<Self, ModelError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| parse_err(origin, e))?;
        if value.get("preset").is_some() {
            return Self::from_value_with_preset(value, origin);
        }
        serde_json::from_str(text).map_err(|e| parse_err(origin, e))
    }

    fn parse_toml(text: &str, origin: &str) -> Result<Self, ModelError> {
        let value: toml::Value = toml::from_str(text).map_err(|e| parse_err(origin, e))?;
        if value.get("preset").is_some() {
            let json = serde_json::to_value(value).map_err(|e| parse_err(origin, e))?;
            return Self::from_value_with_preset(json, origin);
        }
        toml::from_str(text).map_err(|e| parse_err(origin, e))
    }

    fn from_value_with_preset(value: serde_json::Value, origin: &str) -> Result<Self, ModelError> {
        let serde_json::Value::Object(mut fields) = value else {
            return Err(parse_err(origin, "expected a table / object at the top level"));
        };
        let preset = fields.remove("preset").unwrap_or_default();
        let name = preset
            .as_str()
            .ok_or_else(|| parse_err(origin, format!("`preset` must be a string, found {preset}")))?;
        let base = presets::get(name).ok_or_else(|| {
            parse_err(
                origin,
                format!("unknown preset `{name}` (valid: {})", presets::NAMES.join(", ")),
            )
        })?;
        let serde_json::Value::Object(mut merged) = serde_json::to_value(base).map_err(|e| parse_err(origin, e))?
        else {
            unreachable!("a struct serializes to an object")
        };
        // Tables merge field by field, so `[detector] num_classes = 4` keeps the preset's heads.
        for (key, value) in fields {
            match (merged.get_mut(&key), value) {
                (Some(serde_json::Value::Object(base)), serde_json::Value::Object(over)) => base.extend(over),
                (_, value) => {
                    merged.insert(key, value);
                }
            }
        }
        serde_json::from_value(serde_json::Value::Object(merged)).map_err(|e| parse_err(origin, e))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serializes")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }

    // ----- resolved quantities -----

    /// Token grid side: `image_size / patch_size`.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Grid of the pre-trained absolute position embedding.
    pub fn pretrain_grid(&self) -> usize {
        self.pretrain_img_size / self.patch_size
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// MLP hidden width (`int(embed_dim * mlp_ratio)`, as PyTorch code computes it).
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// The relative-position scheme, resolving the family default.
    pub fn rel_pos_kind(&self) -> RelPos {
        self.rel_pos.unwrap_or(match self.family {
            Family::Vitdet => RelPos::Decomposed,
            Family::Vit => RelPos::SharedBias,
        })
    }

    /// Global-attention block indices after applying the attention strategy, sorted.
    pub fn global_block_indices(&self) -> Vec<usize> {
        match self.attention {
            AttentionStrategy::Window => Vec::new(),
            AttentionStrategy::Global => (0..self.depth).collect(),
            AttentionStrategy::Hybrid => {
                let mut v = self.global_blocks.clone().unwrap_or_else(|| quarter_blocks(self.depth));
                v.sort_unstable();
                v
            }
        }
    }

    /// Whether block `i` attends globally.
    pub fn is_global(&self, i: usize) -> bool {
        self.global_block_indices().contains(&i)
    }

    /// Drop-path rate of block `i`: `drop_path_rate * i / (depth - 1)` (`torch.linspace`).
    pub fn drop_path_at(&self, i: usize) -> f64 {
        if self.depth <= 1 {
            0.0
        } else {
            self.drop_path_rate * i as f64 / (self.depth - 1) as f64
        }
    }

    /// Side of the square attention grid of block `i` (window or whole token grid).
    pub fn attention_size(&self, i: usize) -> usize {
        if self.is_global(i) {
            self.grid()
        } else {
            self.window_size
        }
    }

    /// Side the decomposed rel-pos tables of block `i` are sized for (`2 s - 1` rows).
    pub fn rel_pos_table_size(&self, i: usize) -> usize {
        if self.is_global(i) {
            self.rel_pos_global_size.unwrap_or(self.grid())
        } else {
            self.window_size
        }
    }

    /// The vit family's adapter inputs: outputs of blocks `d/4-1, d/2-1, 3d/4-1, d-1`.
    pub fn pyramid_taps(&self) -> [usize; 4] {
        let d = self.depth;
        [d / 4 - 1, d / 2 - 1, 3 * d / 4 - 1, d - 1]
    }

    /// Checks the config describes a buildable model; the message names the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(m));
        for (name, v) in [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("out_channels", self.out_channels),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!(
                "`embed_dim` {} is not divisible by `num_heads` {}",
                self.embed_dim, self.num_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "`image_size` {} is not divisible by `patch_size` {}",
                self.image_size, self.patch_size
            ));
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 || self.mlp_hidden() == 0 {
            return bad(format!("`mlp_ratio` {} gives an empty MLP", self.mlp_ratio));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return bad(format!("`norm_eps` must be positive, found {}", self.norm_eps));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return bad(format!(
                "`drop_path_rate` must be in [0, 1), found {}",
                self.drop_path_rate
            ));
        }
        if let Some(blocks) = &self.global_blocks {
            let mut seen = vec![false; self.depth];
            for &b in blocks {
                if b >= self.depth {
                    return bad(format!(
                        "`global_blocks` index {b} is out of range for depth {}",
                        self.depth
                    ));
                }
                if std::mem::replace(&mut seen[b], true) {
                    return bad(format!("`global_blocks` lists block {b} twice"));
                }
            }
        }
        let any_window = (0..self.depth).any(|i| !self.is_global(i));
        if any_window && self.window_size == 0 {
            return bad("`window_size` must be positive when some blocks use window attention".into());
        }
        if self.abs_pos && (self.pretrain_img_size == 0 || !self.pretrain_img_size.is_multiple_of(self.patch_size)) {
            return bad(format!(
                "`pretrain_img_size` {} must be a positive multiple of `patch_size` {}",
                self.pretrain_img_size, self.patch_size
            ));
        }
        if let Some(s) = self.rel_pos_global_size {
            if self.rel_pos_kind() != RelPos::Decomposed {
                return bad("`rel_pos_global_size` only applies to `rel_pos = \"decomposed\"`".into());
            }
            if s == 0 {
                return bad("`rel_pos_global_size` must be positive".into());
            }
        }
        if self.pixel_std.iter().any(|&s| s.is_nan() || s <= 0.0) {
            return bad(format!(
                "`pixel_std` entries must be positive, found {:?}",
                self.pixel_std
            ));
        }
        self.detector.validate()?;
        match self.family {
            Family::Vitdet => {
                if !self.embed_dim.is_multiple_of(4) {
                    return bad(format!(
                        "vitdet family: `embed_dim` {} must be divisible by 4 (the simple pyramid's 4x branch has embed_dim/4 channels)",
                        self.embed_dim
                    ));
                }
            }
            Family::Vit => {
                if self.depth < 4 || !self.depth.is_multiple_of(4) {
                    return bad(format!(
                        "vit family: `depth` {} must be a positive multiple of 4 (the adapter taps blocks d/4, d/2, 3d/4, d)",
                        self.depth
                    ));
                }
                if !self.grid().is_multiple_of(2) {
                    return bad(format!(
                        "vit family: the token grid {} (`image_size / patch_size`) must be even for the FPN's 2x top-down path",
                        self.grid()
                    ));
                }
                if self.group_norm_groups == 0 || !self.embed_dim.is_multiple_of(self.group_norm_groups) {
                    return bad(format!(
                        "vit family: `group_norm_groups` {} must divide `embed_dim` {}",
                        self.group_norm_groups, self.embed_dim
                    ));
                }
            }
        }
        Ok(())
    }
}
