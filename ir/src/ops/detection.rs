//! Detection ops: anchors, box coding, top-k, gathers, NMS, RoIAlign and mask pasting.
//!
//! Dynamic parts of Mask R-CNN use static shapes: a fixed maximum count plus a validity mask
//! (`u8`, 1 = valid), as XLA/TPU implementations do. Boxes are `[x0, y0, x1, y1]` in pixels.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, numel, Cost, IntRange, OpRule, RowRule};
use crate::types::{DType, TensorType};

/// detectron2's `DefaultAnchorGenerator` on one level: for a `grid[0] x grid[1]` feature map
/// of the given `stride`, anchors `[grid[0] * grid[1] * A, 4]` with `A = sizes * ratios`,
/// ordered by location (row-major) then cell anchor. Cell anchors loop sizes then aspect
/// ratios: `w = sqrt(size^2 / ratio)`, `h = ratio * w`, centred at `(x + offset) * stride`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Anchors {
    pub grid: [usize; 2],
    pub stride: f64,
    pub sizes: Vec<f64>,
    pub aspect_ratios: Vec<f64>,
    pub offset: f64,
}

impl Anchors {
    pub fn per_cell(&self) -> usize {
        self.sizes.len() * self.aspect_ratios.len()
    }
}

impl OpRule for Anchors {
    fn name(&self) -> &'static str {
        "anchors"
    }
    fn arity(&self) -> (usize, usize) {
        (0, 0)
    }
    fn infer(&self, _: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        if self.per_cell() == 0 || self.grid.contains(&0) {
            return Err("anchors need a non-empty grid, sizes and aspect ratios".into());
        }
        Ok(vec![TensorType::f32([
            self.grid[0] * self.grid[1] * self.per_cell(),
            4,
        ])])
    }
}

/// detectron2's `Box2BoxTransform.apply_deltas`: `deltas [N, 4k]` (dx, dy, dw, dh per box,
/// divided by `weights`; dw, dh clamped at `scale_clamp`) applied to `boxes [N, 4]`
/// -> `[N, 4k]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoxDecode {
    pub weights: [f64; 4],
    pub scale_clamp: f64,
}

impl OpRule for BoxDecode {
    fn name(&self) -> &'static str {
        "box_decode"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (d, b) = (i[0], i[1]);
        expect_rank("deltas", d, 2)?;
        expect_rank("boxes", b, 2)?;
        expect_float("deltas", d)?;
        if b.shape[1] != 4 || d.shape[1] % 4 != 0 || d.shape[0] != b.shape[0] || d.dtype != b.dtype {
            return Err(format!("expects deltas [N, 4k] and boxes [N, 4], found {d} and {b}"));
        }
        Ok(vec![d.clone()])
    }
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: 12 * numel(&i[0].shape),
            ..Cost::default()
        }
    }
}

/// Clamps boxes `[..., 4]` to the image: x to `[0, width]`, y to `[0, height]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipBoxes {
    pub height: f64,
    pub width: f64,
}

impl OpRule for ClipBoxes {
    fn name(&self) -> &'static str {
        "clip_boxes"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        expect_float("boxes", i[0])?;
        if i[0].shape.last() != Some(&4) {
            return Err(format!("boxes must be [..., 4], found {}", i[0]));
        }
        Ok(vec![i[0].clone()])
    }
}

/// The `k` largest entries along the last axis, in descending order (ties: lower index
/// first): outputs `values [..., k]` and `indices [..., k]` (i64). NaN counts as smallest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopK {
    pub k: usize,
}

impl OpRule for TopK {
    /// The indices are positions along the last axis.
    fn value_ranges(&self, _: &[Option<IntRange>], t: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![None, IntRange::indices(*t[0].shape.last().unwrap_or(&0))]
    }
    fn name(&self) -> &'static str {
        "top_k"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 1)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let x = i[0];
        expect_float("input", x)?;
        let n = *x
            .shape
            .last()
            .ok_or_else(|| format!("input must have rank >= 1, found {x}"))?;
        if self.k == 0 || self.k > n {
            return Err(format!("k = {} out of range for {x}", self.k));
        }
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = self.k;
        Ok(vec![x.with_shape(shape.clone()), TensorType::new(DType::I64, shape)])
    }
}

/// `out = data.index_select(axis, indices)`: `indices [k]` (i64) picks `k` slices of `data`
/// along `axis`; an out-of-range index is an error at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexSelect {
    pub axis: usize,
    /// Every index is known to be in range (`passes::prove_index_ranges`): a GPU skips the
    /// run-time check, which would copy the indices to the host and wait for them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub indices_in_range: bool,
}

impl IndexSelect {
    pub fn new(axis: usize) -> Self {
        IndexSelect {
            axis,
            indices_in_range: false,
        }
    }
}

impl OpRule for IndexSelect {
    /// The selected values are the data's.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0]]
    }
    fn name(&self) -> &'static str {
        "index_select"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (x, idx) = (i[0], i[1]);
        if self.axis >= x.rank() {
            return Err(format!("axis {} out of range for {x}", self.axis));
        }
        if idx.rank() != 1 || idx.dtype != DType::I64 {
            return Err(format!("indices must be i64 [k], found {idx}"));
        }
        let mut shape = x.shape.clone();
        shape[self.axis] = idx.shape[0];
        Ok(vec![x.with_shape(shape)])
    }
}

/// Backward of [`IndexSelect`]: inputs `indices [k]` (i64) and `dy` (the gradient of the
/// selection, `dy.shape[axis] = k`) -> `dx` with `dx.shape[axis] = size`, zero except that
/// slice `indices[j]` of `dx` accumulates slice `j` of `dy` (repeated indices add up). An
/// index outside `0..size` is an error at run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexSelectGrad {
    pub axis: usize,
    pub size: usize,
    /// Every index is known to be in range (`passes::prove_index_ranges`): a GPU skips the
    /// run-time check, which would copy the indices to the host and wait for them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub indices_in_range: bool,
}

impl IndexSelectGrad {
    pub fn new(axis: usize, size: usize) -> Self {
        IndexSelectGrad {
            axis,
            size,
            indices_in_range: false,
        }
    }
}

impl OpRule for IndexSelectGrad {
    fn name(&self) -> &'static str {
        "index_select_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (idx, dy) = (i[0], i[1]);
        if idx.rank() != 1 || idx.dtype != DType::I64 {
            return Err(format!("indices must be i64 [k], found {idx}"));
        }
        expect_float("gradient", dy)?;
        if self.axis >= dy.rank() {
            return Err(format!("axis {} out of range for {dy}", self.axis));
        }
        if dy.shape[self.axis] != idx.shape[0] {
            return Err(format!(
                "gradient {dy} must have {} entries along axis {} (one per index)",
                idx.shape[0], self.axis
            ));
        }
        let mut shape = dy.shape.clone();
        shape[self.axis] = self.size;
        Ok(vec![dy.with_shape(shape)])
    }
    /// One add per gradient element.
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        Cost {
            flops: numel(&i[1].shape),
            ..Cost::default()
        }
    }
}

/// Per-row selection: `data [N, M, ...]`, `indices [N]` (i64) -> `[N, ...]` with
/// `out[n] = data[n, indices[n]]` (class-specific boxes and masks).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatherRows {
    /// Every index is known to be in range (`passes::prove_index_ranges`): a GPU skips the
    /// run-time check, which would copy the indices to the host and wait for them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub indices_in_range: bool,
}

impl OpRule for GatherRows {
    /// The selected values are the data's.
    fn value_ranges(&self, i: &[Option<IntRange>], _: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![i[0]]
    }
    fn name(&self) -> &'static str {
        "gather_rows"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (x, idx) = (i[0], i[1]);
        if x.rank() < 2 || idx.shape != [x.shape[0]] || idx.dtype != DType::I64 {
            return Err(format!(
                "expects data [N, M, ...] and i64 indices [N], found {x} and {idx}"
            ));
        }
        let mut shape = vec![x.shape[0]];
        shape.extend_from_slice(&x.shape[2..]);
        Ok(vec![x.with_shape(shape)])
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 1], &[0])
    }
}

/// Backward of [`GatherRows`]: inputs `indices [N]` (i64) and `dy [N, ...]` -> `dx [N, rows,
/// ...]`, zero except `dx[n, indices[n]] = dy[n]`. An index outside `0..rows` is an error at
/// run time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatherRowsGrad {
    /// `M`, the size of the gathered axis of the forward's data.
    pub rows: usize,
    /// Every index is known to be in range (`passes::prove_index_ranges`): a GPU skips the
    /// run-time check, which would copy the indices to the host and wait for them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub indices_in_range: bool,
}

impl GatherRowsGrad {
    pub fn new(rows: usize) -> Self {
        GatherRowsGrad {
            rows,
            indices_in_range: false,
        }
    }
}

impl OpRule for GatherRowsGrad {
    fn name(&self) -> &'static str {
        "gather_rows_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (idx, dy) = (i[0], i[1]);
        expect_float("gradient", dy)?;
        if dy.rank() < 1 || idx.shape != [dy.shape[0]] || idx.dtype != DType::I64 {
            return Err(format!(
                "expects i64 indices [N] and a gradient [N, ...], found {idx} and {dy}"
            ));
        }
        if self.rows == 0 {
            return Err("rows must be positive".into());
        }
        let mut shape = vec![dy.shape[0], self.rows];
        shape.extend_from_slice(&dy.shape[1..]);
        Ok(vec![dy.with_shape(shape)])
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 1], &[0])
    }
}

/// Greedy non-maximum suppression (torchvision's `batched_nms`): among valid candidates —
/// score finite and above `score_threshold`, and, when a `valid [N]` (u8) input is given,
/// marked valid — repeatedly keep the highest score and drop the boxes of the same group whose
/// IoU with it exceeds `iou_threshold`. Inputs: `boxes [N, 4]`, `scores [N]`, optional
/// `groups [N]` (i64; boxes of different groups never suppress each other), optional
/// `valid [N]`. Outputs: `keep [max_output]` (i64, indices in descending score order,
/// 0 in unused slots) and `keep_valid [max_output]` (u8).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Nms {
    pub iou_threshold: f64,
    pub max_output: usize,
    pub score_threshold: Option<f64>,
}

impl OpRule for Nms {
    /// Kept indices are rows of `boxes` (unused slots hold 0).
    fn value_ranges(&self, _: &[Option<IntRange>], t: &[&TensorType]) -> Vec<Option<IntRange>> {
        vec![IntRange::indices(t[0].shape[0])]
    }
    fn name(&self) -> &'static str {
        "nms"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 4)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (b, s) = (i[0], i[1]);
        expect_float("boxes", b)?;
        if b.rank() != 2 || b.shape[1] != 4 || s.shape != [b.shape[0]] || s.dtype != b.dtype {
            return Err(format!("expects boxes [N, 4] and scores [N], found {b} and {s}"));
        }
        let n = b.shape[0];
        if let Some(g) = i.get(2) {
            if g.shape != [n] || g.dtype != DType::I64 {
                return Err(format!("groups must be i64 [{n}], found {g}"));
            }
        }
        if let Some(v) = i.get(3) {
            if v.shape != [n] || v.dtype != DType::U8 {
                return Err(format!("valid must be u8 [{n}], found {v}"));
            }
        }
        if self.max_output == 0 {
            return Err("max_output must be positive".into());
        }
        Ok(vec![
            TensorType::new(DType::I64, [self.max_output]),
            TensorType::new(DType::U8, [self.max_output]),
        ])
    }
}

/// detectron2's `ROIPooler` with `ROIAlignV2`: each box `[R, 4]` (image pixels) is assigned
/// to the level `floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))`
/// clamped to the levels given, then pooled by RoIAlign on that level's features
/// `[1, C, H_l, W_l]` with spatial scale `scales[l]`: `output_size` bins, each the average of
/// bilinear samples on a regular grid (`sampling_ratio` per bin side, or
/// `ceil(roi side / bins)` when 0); with `aligned`, box coordinates are shifted by -0.5 pixel.
/// Inputs: the level features (finest first), then boxes. Output `[R, C, oh, ow]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoiAlign {
    pub output_size: [usize; 2],
    pub scales: Vec<f64>,
    pub sampling_ratio: usize,
    pub aligned: bool,
    pub canonical_box_size: f64,
    pub canonical_level: usize,
    /// Level index of the first feature map (2 for p2).
    pub min_level: usize,
}

impl OpRule for RoiAlign {
    fn name(&self) -> &'static str {
        "roi_align"
    }
    fn arity(&self) -> (usize, usize) {
        (2, usize::MAX)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (feats, boxes) = i.split_at(i.len() - 1);
        let boxes = boxes[0];
        if feats.len() != self.scales.len() {
            return Err(format!("{} feature maps for {} scales", feats.len(), self.scales.len()));
        }
        let c = feats[0].shape.get(1).copied().unwrap_or(0);
        for f in feats {
            expect_rank("features", f, 4)?;
            if f.shape[0] != 1 || f.shape[1] != c || f.dtype != feats[0].dtype {
                return Err(format!(
                    "feature maps must be [1, C, H, W] with one C and dtype, found {f}"
                ));
            }
        }
        if boxes.rank() != 2 || boxes.shape[1] != 4 || boxes.dtype != feats[0].dtype {
            return Err(format!("boxes must be [R, 4] of the features' dtype, found {boxes}"));
        }
        Ok(vec![feats[0].with_shape([
            boxes.shape[0],
            c,
            self.output_size[0],
            self.output_size[1],
        ])])
    }
    fn cost(&self, _: &[&TensorType], o: &[TensorType]) -> Cost {
        Cost {
            flops: 4 * 4 * numel(&o[0].shape),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        // The boxes (last input) are the rows; the feature levels are static.
        RowRule::new(&[self.scales.len()], &[0])
    }
}

/// Backward of [`RoiAlign`] with respect to the features: inputs `boxes [R, 4]` and
/// `dy [R, C, oh, ow]` -> one gradient per level, `[1, C, H_l, W_l]` as in `feature_shapes`
/// (finest first, as the forward's inputs). Each box goes to the level the forward assigned it
/// and each bin's gradient, divided by the number of samples, is spread over the four bilinear
/// neighbours of every sample with the forward's weights, clamping and out-of-range rule (the
/// adjoint of the forward, as detectron2's/torchvision's `ROIAlign` backward). Boxes get no
/// gradient: detectron2 detaches proposals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoiAlignGrad {
    pub roi: RoiAlign,
    pub feature_shapes: Vec<[usize; 4]>,
}

impl OpRule for RoiAlignGrad {
    fn name(&self) -> &'static str {
        "roi_align_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (boxes, dy) = (i[0], i[1]);
        expect_float("gradient", dy)?;
        if self.feature_shapes.len() != self.roi.scales.len() || self.feature_shapes.is_empty() {
            return Err(format!(
                "{} feature shapes for {} scales",
                self.feature_shapes.len(),
                self.roi.scales.len()
            ));
        }
        let c = self.feature_shapes[0][1];
        if let Some(f) = self.feature_shapes.iter().find(|f| f[0] != 1 || f[1] != c) {
            return Err(format!("feature shapes must be [1, C, H, W] with one C, found {f:?}"));
        }
        if boxes.rank() != 2 || boxes.shape[1] != 4 || boxes.dtype != dy.dtype {
            return Err(format!("boxes must be [R, 4] of the gradient's dtype, found {boxes}"));
        }
        let [oh, ow] = self.roi.output_size;
        if dy.shape != [boxes.shape[0], c, oh, ow] {
            return Err(format!(
                "gradient must be [{}, {c}, {oh}, {ow}], found {dy}",
                boxes.shape[0]
            ));
        }
        Ok(self.feature_shapes.iter().map(|f| dy.with_shape(f.to_vec())).collect())
    }
    /// Four multiply-adds per sample as in the forward, plus zeroing the level gradients.
    fn cost(&self, i: &[&TensorType], o: &[TensorType]) -> Cost {
        Cost {
            flops: 4 * 4 * numel(&i[1].shape) + o.iter().map(|t| numel(&t.shape)).sum::<u64>(),
            ..Cost::default()
        }
    }
    fn rows(&self) -> RowRule {
        RowRule::new(&[0, 1], &[])
    }
}

/// detectron2's `paste_masks_in_image`: per-box mask probabilities `[R, M, M]` are resampled
/// bilinearly into their boxes `[R, 4]` on a `height x width` canvas (zero outside the box) and
/// thresholded (`>= threshold`, as detectron2): output `[R, height, width]` u8.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasteMasks {
    pub height: usize,
    pub width: usize,
    pub threshold: f64,
}

impl OpRule for PasteMasks {
    fn name(&self) -> &'static str {
        "paste_masks"
    }
    fn arity(&self) -> (usize, usize) {
        (2, 2)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let (m, b) = (i[0], i[1]);
        expect_float("masks", m)?;
        if m.rank() != 3 || b.shape != [m.shape[0], 4] {
            return Err(format!("expects masks [R, M, M] and boxes [R, 4], found {m} and {b}"));
        }
        Ok(vec![TensorType::new(DType::U8, [m.shape[0], self.height, self.width])])
    }
}
