//! Large-scale jitter, as detectron2's ViTDet trains (`projects/ViTDet/configs/common/
//! coco_loader_lsj.py`), in its order:
//!
//! 1. `RandomFlip(horizontal=True)`: flip with probability 1/2.
//! 2. `ResizeScale(min_scale=0.1, max_scale=2.0, target_height=S, target_width=S)`: draw
//!    `scale ~ U(min, max)`, then `output_scale = min(S*scale/h, S*scale/w)` and
//!    `output = round(input * output_scale)` per side, where `round` is numpy's (ties to even).
//!    The image is resized with Pillow's BILINEAR (bit-exact, shared with inference
//!    preprocessing) and masks with Pillow's NEAREST (reproduced in [`nearest_index`]).
//! 3. `FixedSizeCrop(crop_size=(S, S), pad=False)`: one `u ~ U(0, 1)` gives the offset
//!    `round(max(size - S, 0) * u)` on both axes; the crop keeps at most `S` per side.
//! 4. detectron2's model then normalizes with the pixel mean/std and zero-pads to `S x S` at
//!    the bottom/right ([`vitdet_runtime::preprocess::normalize_and_pad`]).
//!
//! Boxes are recomputed from the transformed masks (`recompute_boxes=True`) and instances whose
//! mask became empty are dropped (`filter_empty_instances`). The random draws come in the same
//! order as detectron2's (flip, scale, crop), all three always drawn, from a [`Stream`] the
//! caller keys by (seed, iteration, sample).
//!
//! Masks are kept as bitmaps and resized with nearest neighbour (detectron2's `bitmask` mask
//! format); detectron2's default `polygon` format would instead scale polygon vertices and
//! rasterize at the end, which differs along mask borders.

use anyhow::{bail, Result};
use image::RgbImage;
use vitdet_runtime::preprocess::{normalize_and_pad, preprocess_rgb, resize_bilinear_pillow};
use vitdet_runtime::{Device, Tensor};

use super::rng::Stream;
use super::{mask_box, GtInstance};

/// The augmentation's settings; [`LsjConfig::vitdet`] gives detectron2 ViTDet's.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LsjConfig {
    /// Input side `S` of the model.
    pub size: usize,
    pub min_scale: f64,
    pub max_scale: f64,
    /// Probability of a horizontal flip.
    pub flip_prob: f64,
}

/// The random choices of one augmented sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LsjParams {
    pub flip: bool,
    /// `ResizeScale`'s scale factor.
    pub scale: f64,
    /// `FixedSizeCrop`'s `u`: the crop offset is `round(max_offset * u)`.
    pub crop: f64,
}

/// One model input with its ground truth, in input pixels.
#[derive(Clone, Debug)]
pub struct TrainSample {
    /// `f32 [3, S, S]` (RGB), normalized with the model's pixel mean/std, zero-padded.
    pub image: Tensor,
    /// `[h, w]` of the valid (unpadded) top-left region of `image`.
    pub image_hw: [usize; 2],
    /// `xyxy` boxes, the tight boxes of `masks` (exclusive ends, as detectron2's BitMasks).
    pub boxes: Vec<[f32; 4]>,
    /// Contiguous class indices.
    pub classes: Vec<usize>,
    /// `S x S` row-major 0/1 masks, zero in the padding.
    pub masks: Vec<Vec<u8>>,
}

/// A validation input: the sample plus how it maps back to the original image.
#[derive(Clone, Debug)]
pub struct EvalSample {
    pub sample: TrainSample,
    pub original_hw: [usize; 2],
    /// The `ResizeShortestEdge` factor (input pixels per original pixel, before rounding).
    pub scale: f64,
}

impl LsjConfig {
    /// detectron2 ViTDet's LSJ for input side `size`: scales 0.1..2.0, flip probability 1/2.
    pub fn vitdet(size: usize) -> Self {
        LsjConfig {
            size,
            min_scale: 0.1,
            max_scale: 2.0,
            flip_prob: 0.5,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.size == 0 {
            bail!("LSJ input size must be positive");
        }
        if !(self.min_scale > 0.0 && self.min_scale <= self.max_scale && self.max_scale.is_finite()) {
            bail!(
                "LSJ scale range [{}, {}] must satisfy 0 < min <= max < inf",
                self.min_scale,
                self.max_scale
            );
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            bail!("LSJ flip probability {} is not in [0, 1]", self.flip_prob);
        }
        Ok(())
    }

    /// Draws flip, scale and crop, in detectron2's order.
    pub fn draw(&self, rng: &mut Stream) -> LsjParams {
        let flip = rng.unit() < self.flip_prob;
        let scale = rng.uniform(self.min_scale, self.max_scale);
        let crop = rng.unit();
        LsjParams { flip, scale, crop }
    }

    /// Applies flip, resize and crop to an image and its instances (masks of the image's size),
    /// then normalizes and pads to `S x S`.
    pub fn apply(&self, image: &RgbImage, instances: &[GtInstance], p: &LsjParams) -> Result<TrainSample> {
        self.validate()?;
        let (h, w) = (image.height() as usize, image.width() as usize);
        check_instances(instances, h, w)?;
        if h == 0 || w == 0 {
            bail!("cannot augment an empty {w}x{h} image");
        }
        let s = self.size;
        let flipped;
        let img = if p.flip {
            flipped = image::imageops::flip_horizontal(image);
            &flipped
        } else {
            image
        };
        let (nh, nw) = resize_scale_shape(h, w, s, p.scale);
        let resized;
        let img = if (nh, nw) == (h, w) {
            img
        } else {
            resized = resize_bilinear_pillow(img, nw, nh);
            &resized
        };
        let (oy, ox) = crop_offset(nh, nw, s, p.crop);
        let (ch, cw) = (nh.min(s), nw.min(s));
        let cropped = image::imageops::crop_imm(img, ox as u32, oy as u32, cw as u32, ch as u32).to_image();
        let tensor = normalize_and_pad(&cropped, s, &Device::Cpu)?.squeeze(0)?;

        // Masks: source pixel of each kept output pixel through flip, nearest resize and crop.
        let ys: Vec<usize> = nearest_index(h, nh)[oy..oy + ch].to_vec();
        let xs: Vec<usize> = nearest_index(w, nw)[ox..ox + cw]
            .iter()
            .map(|&x| if p.flip { w - 1 - x } else { x })
            .collect();
        let mut sample = TrainSample {
            image: tensor,
            image_hw: [ch, cw],
            boxes: Vec::new(),
            classes: Vec::new(),
            masks: Vec::new(),
        };
        for inst in instances {
            let mut m = vec![0u8; s * s];
            for (y, &sy) in ys.iter().enumerate() {
                let src = &inst.mask[sy * w..(sy + 1) * w];
                for (x, &sx) in xs.iter().enumerate() {
                    m[y * s + x] = u8::from(src[sx] != 0);
                }
            }
            push_instance(&mut sample, inst.class, m, s);
        }
        Ok(sample)
    }
}

fn check_instances(instances: &[GtInstance], h: usize, w: usize) -> Result<()> {
    for (i, inst) in instances.iter().enumerate() {
        if inst.mask.len() != h * w {
            bail!(
                "instance {i}: mask has {} pixels, the {w}x{h} image has {}",
                inst.mask.len(),
                h * w
            );
        }
    }
    Ok(())
}

/// Keeps the instance if its mask is not empty, with the mask's tight box.
fn push_instance(sample: &mut TrainSample, class: usize, mask: Vec<u8>, s: usize) {
    if let Some((x0, y0, x1, y1)) = mask_box(&mask, s, s) {
        sample.boxes.push([x0 as f32, y0 as f32, x1 as f32, y1 as f32]);
        sample.classes.push(class);
        sample.masks.push(mask);
    }
}

/// detectron2's `ResizeScale._get_resize` output `(h, w)` for an `h x w` input, target side
/// `target` and scale factor `scale`: `output_scale = min(target*scale/h, target*scale/w)`,
/// each side `round(side * output_scale)` with ties to even (numpy's `round`). A side that
/// would round to 0 (an extreme aspect ratio at a small scale) is kept at 1 pixel.
pub fn resize_scale_shape(h: usize, w: usize, target: usize, scale: f64) -> (usize, usize) {
    let t = target as f64 * scale;
    let output_scale = (t / h as f64).min(t / w as f64);
    let side = |n: usize| ((n as f64 * output_scale).round_ties_even() as usize).max(1);
    (side(h), side(w))
}

/// `FixedSizeCrop`'s offset `(y, x)` into an `h x w` image for crop side `size` and draw `u`:
/// `round(max(h - size, 0) * u)` (ties to even), the same `u` on both axes.
pub fn crop_offset(h: usize, w: usize, size: usize, u: f64) -> (usize, usize) {
    let off = |n: usize| (n.saturating_sub(size) as f64 * u).round_ties_even() as usize;
    (off(h), off(w))
}

/// Pillow's `resize(NEAREST)` source index of each of `n_out` outputs along an axis of `n_in`:
/// `floor(x)` where `x` starts at `0.5 * n_in / n_out` and grows by `n_in / n_out` per output,
/// accumulated in f64 exactly as Pillow's affine nearest path does (so rounding drifts the
/// same way).
pub fn nearest_index(n_in: usize, n_out: usize) -> Vec<usize> {
    let step = n_in as f64 / n_out as f64;
    let mut x = step * 0.5;
    (0..n_out)
        .map(|_| {
            let i = (x as usize).min(n_in - 1);
            x += step;
            i
        })
        .collect()
}

/// Nearest-neighbour resize of a row-major `h x w` mask to `nh x nw` (Pillow's NEAREST).
pub fn resize_nearest(mask: &[u8], h: usize, w: usize, nh: usize, nw: usize) -> Vec<u8> {
    let (ys, xs) = (nearest_index(h, nh), nearest_index(w, nw));
    let mut out = Vec::with_capacity(nh * nw);
    for &sy in &ys {
        out.extend(xs.iter().map(|&sx| mask[sy * w + sx]));
    }
    out
}

/// The validation input of an image: detectron2's test-time `ResizeShortestEdge(S, max_size=S)`
/// (the inference preprocessing of [`preprocess_rgb`]: the long side becomes `S`), normalized
/// and zero-padded; masks follow with nearest resizing and boxes are their tight boxes.
pub fn eval_sample(image: &RgbImage, instances: &[GtInstance], size: usize) -> Result<EvalSample> {
    let (h, w) = (image.height() as usize, image.width() as usize);
    check_instances(instances, h, w)?;
    let pre = preprocess_rgb(image, size, &Device::Cpu)?;
    let (nh, nw) = pre.resized_hw;
    let mut sample = TrainSample {
        image: pre.image.squeeze(0)?,
        image_hw: [nh, nw],
        boxes: Vec::new(),
        classes: Vec::new(),
        masks: Vec::new(),
    };
    for inst in instances {
        let r = resize_nearest(&inst.mask, h, w, nh, nw);
        let mut m = vec![0u8; size * size];
        for y in 0..nh {
            m[y * size..y * size + nw].copy_from_slice(&r[y * nw..(y + 1) * nw]);
        }
        push_instance(&mut sample, inst.class, m, size);
    }
    Ok(EvalSample {
        sample,
        original_hw: [h, w],
        scale: pre.scale,
    })
}
