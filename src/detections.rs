//! Detections in original-image coordinates: COCO results JSON and a picture.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::coco::{rle_encode, Rle, CATEGORY_IDS, CLASS_NAMES};

/// What a model's contiguous class indices stand for: COCO category ids and names.
#[derive(Clone, Debug, PartialEq)]
pub struct Categories {
    pub ids: Vec<u64>,
    pub names: Vec<String>,
}

impl Categories {
    /// The 80 COCO classes in detectron2's order.
    pub fn coco() -> Self {
        Categories {
            ids: CATEGORY_IDS.iter().map(|&i| i as u64).collect(),
            names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A dataset's categories in the contiguous order training used (sorted ids).
    pub fn from_dataset(dataset: &crate::data::CocoDataset) -> Self {
        let mut cats: Vec<_> = dataset.categories.iter().map(|c| (c.id, c.name.clone())).collect();
        cats.sort_by_key(|c| c.0);
        Categories {
            ids: cats.iter().map(|c| c.0).collect(),
            names: cats.into_iter().map(|c| c.1).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn name(&self, class: usize) -> &str {
        self.names.get(class).map(String::as_str).unwrap_or("?")
    }
}

/// One detected instance.
#[derive(Clone, Debug)]
pub struct Detection {
    /// `[x0, y0, x1, y1]` in original image pixels.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Contiguous class index (see [`Categories`]).
    pub class: usize,
    /// Binary mask over the original image, row-major, if the model predicts masks.
    pub mask: Option<Vec<u8>>,
}

/// One entry of a COCO results file.
#[derive(Clone, Debug, Serialize)]
pub struct CocoResult {
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]`.
    pub bbox: [f32; 4],
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Rle>,
}

/// COCO results for one image of `height x width` pixels.
pub fn coco_results(
    dets: &[Detection],
    image_id: u64,
    height: usize,
    width: usize,
    categories: &Categories,
) -> Vec<CocoResult> {
    dets.iter()
        .map(|d| {
            let [x0, y0, x1, y1] = d.bbox;
            CocoResult {
                image_id,
                category_id: categories.ids.get(d.class).copied().unwrap_or(u64::MAX),
                bbox: [x0, y0, x1 - x0, y1 - y0],
                score: d.score,
                segmentation: d.mask.as_ref().map(|m| rle_encode(m, height, width)),
            }
        })
        .collect()
}

/// A distinct, stable color per class.
fn class_color(class: usize) -> [u8; 3] {
    // Golden-angle hues: neighbouring class indices get well-separated colors.
    let h = (class as f32 * 137.508) % 360.0;
    let (s, v) = (0.75f32, 0.95f32);
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [
        ((r + m) * 255.0) as u8,
        ((g + m) * 255.0) as u8,
        ((b + m) * 255.0) as u8,
    ]
}

fn blend(p: &mut Rgb<u8>, color: [u8; 3], alpha: f32) {
    for (channel, &c) in p.0.iter_mut().zip(&color) {
        *channel = (*channel as f32 * (1.0 - alpha) + c as f32 * alpha).round() as u8;
    }
}

fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, color: [u8; 3]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            img.put_pixel(x as u32, y as u32, Rgb(color));
        }
    }
}

/// Draws `text` with its top-left corner at (x, y), 8x8 glyphs scaled by `scale`.
fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: i64, color: [u8; 3]) {
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let gx = x + (i as i64 * 8 + col) * scale;
                    let gy = y + row as i64 * scale;
                    fill_rect(img, gx, gy, gx + scale, gy + scale, color);
                }
            }
        }
    }
}

/// The image with each detection's mask (translucent), box, class name and score drawn on it,
/// lowest score first so the most confident ones end up on top.
pub fn draw(image: &RgbImage, dets: &[Detection], categories: &Categories) -> RgbImage {
    let mut img = image.clone();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let scale = ((w.max(h) as f32 / 640.0).round() as i64).max(1);
    let thickness = scale.max(2);
    let mut order: Vec<&Detection> = dets.iter().collect();
    order.sort_by(|a, b| a.score.total_cmp(&b.score));
    for d in order {
        let color = class_color(d.class);
        if let Some(mask) = &d.mask {
            for (i, &m) in mask.iter().enumerate().take(w * h) {
                if m != 0 {
                    blend(img.get_pixel_mut((i % w) as u32, (i / w) as u32), color, 0.45);
                }
            }
        }
        let [x0, y0, x1, y1] = d.bbox.map(|v| v.round() as i64);
        fill_rect(&mut img, x0, y0, x1, y0 + thickness, color);
        fill_rect(&mut img, x0, y1 - thickness, x1, y1, color);
        fill_rect(&mut img, x0, y0, x0 + thickness, y1, color);
        fill_rect(&mut img, x1 - thickness, y0, x1, y1, color);
        let label = format!("{} {:.2}", categories.name(d.class), d.score);
        let (tw, th) = (label.len() as i64 * 8 * scale + 2 * scale, 8 * scale + 2 * scale);
        let ty = if y0 - th >= 0 { y0 - th } else { y0 };
        fill_rect(&mut img, x0, ty, x0 + tw, ty + th, color);
        draw_text(&mut img, x0 + scale, ty + scale, &label, scale, [0, 0, 0]);
    }
    img
}
