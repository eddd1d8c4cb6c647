//! detectron2's ViTDet test-time preprocessing.
//!
//! 1. Read a PNG or JPEG into RGB8 (grayscale, gray+alpha and RGBA are converted to RGB; alpha is
//!    dropped).
//! 2. `ResizeShortestEdge(short=size, max_size=size)`: the short side is scaled to `size`, then
//!    both sides are scaled down so that the long side is at most `size`; each side is rounded as
//!    `floor(x + 0.5)` (detectron2's `get_output_shape`, evaluated in f64).
//! 3. Resize exactly as detectron2 does (`PIL.Image.resize(..., BILINEAR)` on uint8):
//!    [`resize_bilinear_pillow`] reproduces Pillow's algorithm bit for bit (a triangle filter
//!    whose support widens when downscaling, separable passes, horizontal first, each rounded
//!    to uint8 through 22-bit fixed-point weights). Skipped when the size does not change. (A
//!    float triangle filter such as `image::imageops::resize(FilterType::Triangle)` differs by
//!    one gray level on about 5% of the pixels.)
//! 4. To f32 CHW, `(x - mean) / std` per RGB channel (evaluated in f64, then rounded to f32), and
//!    zero padding at the bottom and right up to `size x size`.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::RuntimeError;

/// detectron2's ViTDet pixel mean (RGB, 0-255 scale).
pub const PIXEL_MEAN: [f64; 3] = [123.675, 116.28, 103.53];
/// detectron2's ViTDet pixel std (RGB, 0-255 scale).
pub const PIXEL_STD: [f64; 3] = [58.395, 57.12, 57.375];

/// A preprocessed image.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// `f32 [1, 3, size, size]`, normalized and zero-padded.
    pub image: Tensor,
    /// `(h, w)` of the resized image inside `image` (top-left corner).
    pub resized_hw: (usize, usize),
    /// `(h, w)` of the original image.
    pub original_hw: (usize, usize),
    /// The scale factor `ResizeShortestEdge` applied (before rounding the sides).
    pub scale: f64,
}

/// Reads an image file into RGB8. The error names the file.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage, RuntimeError> {
    let path = path.as_ref();
    let img = image::ImageReader::open(path)
        .map_err(|e| RuntimeError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .with_guessed_format()
        .map_err(|e| RuntimeError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .decode()
        .map_err(|e| RuntimeError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(img.to_rgb8())
}

/// detectron2's `ResizeShortestEdge.get_output_shape(h, w, short, max_size)`:
/// `(new_h, new_w, scale)`.
pub fn shortest_edge_shape(h: usize, w: usize, short: usize, max_size: usize) -> (usize, usize, f64) {
    let (hf, wf, s) = (h as f64, w as f64, short as f64);
    let scale = s / hf.min(wf);
    let (mut nh, mut nw) = if h < w { (s, scale * wf) } else { (scale * hf, s) };
    let mut total = scale;
    let longest = nh.max(nw);
    if longest > max_size as f64 {
        let k = max_size as f64 / longest;
        nh *= k;
        nw *= k;
        total *= k;
    }
    ((nh + 0.5).floor() as usize, (nw + 0.5).floor() as usize, total)
}

/// Reads `path` and preprocesses it to `[1, 3, size, size]` on `device`.
pub fn preprocess_image(path: impl AsRef<Path>, size: usize, device: &Device) -> Result<Preprocessed, RuntimeError> {
    preprocess_rgb(&load_rgb(path)?, size, device)
}

/// Preprocesses an RGB8 image to `[1, 3, size, size]` on `device`.
pub fn preprocess_rgb(img: &RgbImage, size: usize, device: &Device) -> Result<Preprocessed, RuntimeError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if size == 0 || w == 0 || h == 0 {
        return Err(RuntimeError::Preprocess(format!(
            "cannot resize a {w}x{h} image to size {size}"
        )));
    }
    let (nh, nw, scale) = shortest_edge_shape(h, w, size, size);
    let resized;
    let src = if (nh, nw) == (h, w) {
        img
    } else {
        resized = resize_bilinear_pillow(img, nw, nh);
        &resized
    };
    let image = normalize_and_pad(src, size, device)?;
    Ok(Preprocessed {
        image,
        resized_hw: (nh, nw),
        original_hw: (h, w),
        scale,
    })
}

/// `(x - mean) / std` per channel to f32 CHW, zero-padded at the bottom / right to
/// `[1, 3, size, size]`. The image must fit in `size x size`.
pub fn normalize_and_pad(img: &RgbImage, size: usize, device: &Device) -> Result<Tensor, RuntimeError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w > size || h > size {
        return Err(RuntimeError::Preprocess(format!(
            "a {w}x{h} image does not fit in {size}x{size}"
        )));
    }
    let mut data = vec![0f32; 3 * size * size];
    let raw = img.as_raw();
    for y in 0..h {
        for x in 0..w {
            let p = &raw[(y * w + x) * 3..(y * w + x) * 3 + 3];
            for c in 0..3 {
                data[c * size * size + y * size + x] = ((p[c] as f64 - PIXEL_MEAN[c]) / PIXEL_STD[c]) as f32;
            }
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, size, size), device)?)
}

/// Fixed-point precision of Pillow's 8-bit resampling weights.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling taps for one axis: `(first input index, fixed-point weights)` per output.
fn pillow_taps(n_in: usize, n_out: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = n_in as f64 / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the bilinear filter's support is 1
    let ss = 1.0 / filterscale;
    let mut taps = Vec::with_capacity(n_out);
    for o in 0..n_out {
        let center = (o as f64 + 0.5) * scale;
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
        let mut w: Vec<f64> = (lo..hi)
            .map(|i| {
                let x = (i as f64 - center + 0.5) * ss;
                (1.0 - x.abs()).max(0.0)
            })
            .collect();
        let total: f64 = w.iter().sum();
        if total != 0.0 {
            w.iter_mut().for_each(|v| *v /= total);
        }
        let one = (1u32 << PRECISION_BITS) as f64;
        let fixed = w
            .iter()
            .map(|&v| {
                if v < 0.0 {
                    (-0.5 + v * one) as i32
                } else {
                    (0.5 + v * one) as i32
                }
            })
            .collect();
        taps.push((lo, fixed));
    }
    taps
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB8 image to `new_w x new_h` exactly as Pillow's `Image.resize(..., BILINEAR)`
/// does (what detectron2's `ResizeTransform` calls): for each axis that changes size, a
/// triangle filter with support `max(in / out, 1)` centered at `(o + 0.5) * in / out`, weights
/// normalized to sum 1 and rounded to 22-bit fixed point; the horizontal pass runs first and
/// both passes round to uint8 (`(2^21 + sum) >> 22`, clamped).
pub fn resize_bilinear_pillow(img: &RgbImage, new_w: usize, new_h: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut cur: Vec<u8> = img.as_raw().clone();
    let mut cw = w;
    if new_w != w {
        let taps = pillow_taps(w, new_w);
        let mut out = vec![0u8; h * new_w * 3];
        for y in 0..h {
            for (x, (lo, k)) in taps.iter().enumerate() {
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (j, &kj) in k.iter().enumerate() {
                        acc += cur[(y * cw + lo + j) * 3 + c] as i32 * kj;
                    }
                    out[(y * new_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        cur = out;
        cw = new_w;
    }
    if new_h != h {
        let taps = pillow_taps(h, new_h);
        let mut out = vec![0u8; new_h * cw * 3];
        for (y, (lo, k)) in taps.iter().enumerate() {
            for x in 0..cw {
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (j, &kj) in k.iter().enumerate() {
                        acc += cur[((lo + j) * cw + x) * 3 + c] as i32 * kj;
                    }
                    out[(y * cw + x) * 3 + c] = clip8(acc);
                }
            }
        }
        cur = out;
    }
    RgbImage::from_raw(new_w as u32, new_h as u32, cur).expect("buffer size matches")
}
