//! A synthetic instance-segmentation dataset small enough to train on a CPU in minutes:
//! filled circles, rectangles, triangles and rings of random colors on a noisy, smoothly
//! varying background, 1-4 per image, possibly overlapping (later shapes occlude earlier ones).
//!
//! Masks are exact: a pixel belongs to a shape when its center lies inside it (no
//! anti-aliasing), the picture is painted from those very masks, and each instance's mask is
//! the set of its *visible* pixels. A shape is only placed if it and every shape it covers keep
//! a clearly visible area (at least `max(16, size²/400)` pixels and 30% of their own), so no
//! painted object is left unlabeled and no label is a sliver.
//!
//! Written in COCO layout: `DIR/{train,val}/NNNNNN.png` and
//! `DIR/annotations/instances_{train,val}.json` (segmentation as compressed RLE, `area` the mask
//! pixel count, `bbox` the mask's tight box as xywh). Everything follows from the seed: image
//! `i` of a split is drawn from its own random stream, so it does not depend on how many images
//! are generated. Geometry uses only `+ - * / sqrt` (no `sin`/`cos`), which IEEE 754 rounds the
//! same way everywhere, so the dataset is identical across platforms.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image::{ImageFormat, RgbImage};
use serde::Serialize;
use serde_json::json;
use vitdet_runtime::write_atomic;

use super::mask_box;
use super::rng::{Domain, Stream};
use crate::mask::rle_encode;

/// The synthetic categories: `(COCO category id, name)`.
pub const SYNTH_CATEGORIES: [(u64, &str); 4] = [(1, "circle"), (2, "rectangle"), (3, "triangle"), (4, "ring")];

/// Smallest and largest accepted image side.
pub const MIN_SIZE: usize = 32;
pub const MAX_SIZE: usize = 4096;

/// Fraction of its own (unoccluded) area an instance must keep visible.
const KEEP_FRACTION: f64 = 0.3;
/// Attempts to place each shape before giving up on it.
const ATTEMPTS: usize = 30;
/// Brightness change of a shape's linear shading per image side of distance.
const SHADE: f64 = 100.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// One labeled shape: its COCO category id and visible pixels (`size x size`, row-major, 0/1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthInstance {
    pub category_id: u64,
    pub mask: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct SynthImage {
    pub image: RgbImage,
    pub instances: Vec<SynthInstance>,
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    Disc {
        cx: f64,
        cy: f64,
        r: f64,
    },
    Ring {
        cx: f64,
        cy: f64,
        r: f64,
        inner: f64,
    },
    /// Center, unit axis `(ux, uy)`, half-extents along it (`a`) and across it (`b`).
    Rect {
        cx: f64,
        cy: f64,
        ux: f64,
        uy: f64,
        a: f64,
        b: f64,
    },
    Triangle {
        p: [(f64, f64); 3],
    },
}

impl Shape {
    fn category_id(&self) -> u64 {
        match self {
            Shape::Disc { .. } => 1,
            Shape::Rect { .. } => 2,
            Shape::Triangle { .. } => 3,
            Shape::Ring { .. } => 4,
        }
    }

    fn contains(&self, x: f64, y: f64) -> bool {
        match *self {
            Shape::Disc { cx, cy, r } => (x - cx) * (x - cx) + (y - cy) * (y - cy) <= r * r,
            Shape::Ring { cx, cy, r, inner } => {
                let d = (x - cx) * (x - cx) + (y - cy) * (y - cy);
                d <= r * r && d >= inner * inner
            }
            Shape::Rect { cx, cy, ux, uy, a, b } => {
                let (dx, dy) = (x - cx, y - cy);
                (dx * ux + dy * uy).abs() <= a && (-dx * uy + dy * ux).abs() <= b
            }
            Shape::Triangle { p } => {
                // Same sign of the three edge functions (either orientation).
                let e = |i: usize| {
                    let (a, b) = (p[i], p[(i + 1) % 3]);
                    (b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0)
                };
                let (e0, e1, e2) = (e(0), e(1), e(2));
                (e0 >= 0.0 && e1 >= 0.0 && e2 >= 0.0) || (e0 <= 0.0 && e1 <= 0.0 && e2 <= 0.0)
            }
        }
    }

    /// `(xmin, ymin, xmax, ymax)` enclosing the shape.
    fn bounds(&self) -> (f64, f64, f64, f64) {
        match *self {
            Shape::Disc { cx, cy, r } | Shape::Ring { cx, cy, r, .. } => (cx - r, cy - r, cx + r, cy + r),
            Shape::Rect { cx, cy, ux, uy, a, b } => {
                let (ex, ey) = (ux.abs() * a + uy.abs() * b, uy.abs() * a + ux.abs() * b);
                (cx - ex, cy - ey, cx + ex, cy + ey)
            }
            Shape::Triangle { p } => (
                p[0].0.min(p[1].0).min(p[2].0),
                p[0].1.min(p[1].1).min(p[2].1),
                p[0].0.max(p[1].0).max(p[2].0),
                p[0].1.max(p[1].1).max(p[2].1),
            ),
        }
    }

    /// Row-major indices of the pixels of a `size x size` image whose centers
    /// `(x + 0.5, y + 0.5)` lie inside the shape. Only a margin around [`Shape::bounds`] is
    /// tested; `contains` alone decides.
    fn pixels(&self, size: usize) -> Vec<usize> {
        let (x0, y0, x1, y1) = self.bounds();
        let lo = |v: f64| ((v - 1.0).floor().max(0.0) as usize).min(size);
        let hi = |v: f64| ((v + 1.0).ceil().max(0.0) as usize).min(size);
        let mut out = Vec::new();
        for y in lo(y0)..hi(y1) {
            for x in lo(x0)..hi(x1) {
                if self.contains(x as f64 + 0.5, y as f64 + 0.5) {
                    out.push(y * size + x);
                }
            }
        }
        out
    }
}

fn random_shape(rng: &mut Stream, size: usize) -> Shape {
    let s = size as f64;
    let r = rng.uniform(0.08, 0.28) * s;
    let (cx, cy) = (rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.9) * s);
    match rng.below(4) {
        0 => Shape::Disc { cx, cy, r },
        1 => {
            let (ux, uy) = rng.direction();
            Shape::Rect {
                cx,
                cy,
                ux,
                uy,
                a: r * rng.uniform(0.45, 1.0),
                b: r * rng.uniform(0.45, 1.0),
            }
        }
        2 => {
            // Vertices near 120 degrees apart (rotations by cos 120 = -1/2, sin 120 = sqrt(3)/2),
            // each pushed in or out and jittered so triangles vary without degenerating.
            let (ux, uy) = rng.direction();
            let (c, sn) = (-0.5, 3f64.sqrt() / 2.0);
            let dirs = [
                (ux, uy),
                (c * ux - sn * uy, sn * ux + c * uy),
                (c * ux + sn * uy, -sn * ux + c * uy),
            ];
            let mut p = [(0.0, 0.0); 3];
            for (k, (dx, dy)) in dirs.into_iter().enumerate() {
                let rk = r * rng.uniform(0.75, 1.1);
                let (jx, jy) = rng.in_unit_disc();
                p[k] = (cx + dx * rk + jx * 0.2 * r, cy + dy * rk + jy * 0.2 * r);
            }
            Shape::Triangle { p }
        }
        _ => Shape::Ring {
            cx,
            cy,
            r,
            inner: r * rng.uniform(0.4, 0.65),
        },
    }
}

/// A smooth background: a 4x4 grid of random colors, bilinearly interpolated; `size * size`
/// RGB values, row-major.
fn background(rng: &mut Stream, size: usize) -> Vec<f64> {
    const G: usize = 4;
    let mut grid = [0.0f64; G * G * 3];
    for v in grid.iter_mut() {
        *v = rng.uniform(30.0, 225.0);
    }
    // Grid cell and fraction of each pixel center along an axis (the same for x and y).
    let step = (G - 1) as f64 / size as f64;
    let axis: Vec<(usize, f64)> = (0..size)
        .map(|i| {
            let g = (i as f64 + 0.5) * step;
            let c = (g as usize).min(G - 2);
            (c, g - c as f64)
        })
        .collect();
    let mut out = vec![0.0; size * size * 3];
    for (y, &(y0, fy)) in axis.iter().enumerate() {
        for (x, &(x0, fx)) in axis.iter().enumerate() {
            let (i00, i01) = ((y0 * G + x0) * 3, (y0 * G + x0 + 1) * 3);
            let (i10, i11) = (((y0 + 1) * G + x0) * 3, ((y0 + 1) * G + x0 + 1) * 3);
            let o = (y * size + x) * 3;
            for ch in 0..3 {
                let top = grid[i00 + ch] * (1.0 - fx) + grid[i01 + ch] * fx;
                let bottom = grid[i10 + ch] * (1.0 - fx) + grid[i11 + ch] * fx;
                out[o + ch] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    out
}

/// One of three uniform values in `[-1, 1)` packed in a 64-bit draw (21 bits each): per-pixel
/// noise from a single draw per pixel.
fn noise(bits: u64, k: usize) -> f64 {
    ((bits >> (21 * k)) & 0x1f_ffff) as f64 * (2.0 / (1u64 << 21) as f64) - 1.0
}

fn to_u8(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Image `index` of `split`, drawn from its own stream of `seed`. `size` must be in
/// [`MIN_SIZE`]`..=`[`MAX_SIZE`] (see [`generate`] for the checked entry point).
pub fn synth_image(size: usize, seed: u64, split: Split, index: u64) -> SynthImage {
    assert!(
        (MIN_SIZE..=MAX_SIZE).contains(&size),
        "synthetic image size {size} out of range"
    );
    let mut rng = Stream::new(seed, Domain::Synthetic, split as u64, index);
    let min_area = 16usize.max(size * size / 400);
    let wanted = rng.range_inclusive(1, 4);

    // owner[p] = index of the visible shape at pixel p (u8::MAX: background).
    let mut owner = vec![u8::MAX; size * size];
    let mut shapes: Vec<(Shape, usize)> = Vec::new(); // shape, unoccluded area
    let mut visible: Vec<usize> = Vec::new();
    let mut k = 0;
    // The first shape always finds room in an empty image; the loop bound is a safeguard.
    while k < wanted || (shapes.is_empty() && k < wanted + 100) {
        k += 1;
        for _ in 0..ATTEMPTS {
            let shape = random_shape(&mut rng, size);
            let px = shape.pixels(size);
            let area = px.len();
            if area < min_area {
                continue;
            }
            let mut covered = vec![0usize; shapes.len()];
            for &p in &px {
                if owner[p] != u8::MAX {
                    covered[owner[p] as usize] += 1;
                }
            }
            let ok = shapes.iter().enumerate().all(|(j, &(_, full))| {
                let left = visible[j] - covered[j];
                left >= min_area && left as f64 >= KEEP_FRACTION * full as f64
            });
            if !ok {
                continue;
            }
            let id = shapes.len() as u8;
            for &p in &px {
                owner[p] = id;
            }
            for (j, c) in covered.into_iter().enumerate() {
                visible[j] -= c;
            }
            shapes.push((shape, area));
            visible.push(area);
            break;
        }
    }

    // Paint: each shape's visible pixels in a color that stands out from the background under
    // it, with a gentle linear shading; noise on every pixel (one draw per pixel).
    let bg = background(&mut rng, size);
    let n = shapes.len();
    let mut sums = vec![[0.0f64; 3]; n];
    let mut counts = vec![0usize; n];
    for (p, &o) in owner.iter().enumerate() {
        if o != u8::MAX {
            counts[o as usize] += 1;
            for ch in 0..3 {
                sums[o as usize][ch] += bg[p * 3 + ch];
            }
        }
    }
    // Per shape: color, shading direction, center.
    let mut paint = Vec::with_capacity(n);
    for (j, (shape, _)) in shapes.iter().enumerate() {
        let mean = sums[j].map(|v| v / counts[j] as f64);
        let mut color = [0.0; 3];
        for _ in 0..20 {
            color = [
                rng.uniform(0.0, 255.0),
                rng.uniform(0.0, 255.0),
                rng.uniform(0.0, 255.0),
            ];
            let dist: f64 = (0..3).map(|ch| (color[ch] - mean[ch]).abs()).sum();
            if dist >= 150.0 {
                break;
            }
        }
        let (gx, gy) = rng.direction();
        let (cx, cy) = match *shape {
            Shape::Disc { cx, cy, .. } | Shape::Ring { cx, cy, .. } | Shape::Rect { cx, cy, .. } => (cx, cy),
            Shape::Triangle { p } => ((p[0].0 + p[1].0 + p[2].0) / 3.0, (p[0].1 + p[1].1 + p[2].1) / 3.0),
        };
        paint.push((color, gx, gy, cx, cy));
    }
    let shade = SHADE / size as f64;
    let mut raw = vec![0u8; size * size * 3];
    for y in 0..size {
        for x in 0..size {
            let p = y * size + x;
            let bits = rng.next_u64();
            let o = owner[p];
            for ch in 0..3 {
                let v = if o == u8::MAX {
                    bg[p * 3 + ch] + 14.0 * noise(bits, ch)
                } else {
                    let (color, gx, gy, cx, cy) = paint[o as usize];
                    let g = ((x as f64 + 0.5 - cx) * gx + (y as f64 + 0.5 - cy) * gy) * shade;
                    color[ch] + g + 8.0 * noise(bits, ch)
                };
                raw[p * 3 + ch] = to_u8(v);
            }
        }
    }
    let image = RgbImage::from_raw(size as u32, size as u32, raw).expect("buffer size matches");
    let instances = shapes
        .iter()
        .enumerate()
        .map(|(j, (shape, _))| SynthInstance {
            category_id: shape.category_id(),
            mask: owner.iter().map(|&o| u8::from(o == j as u8)).collect(),
        })
        .collect();
    SynthImage { image, instances }
}

pub struct SynthOptions {
    pub out: PathBuf,
    pub train: usize,
    pub val: usize,
    pub size: usize,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct SplitSummary {
    pub split: Split,
    pub images: usize,
    pub instances: usize,
    /// Instances per category, in [`SYNTH_CATEGORIES`] order.
    pub per_category: Vec<(String, usize)>,
    pub annotations: PathBuf,
    pub image_dir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct SynthSummary {
    pub size: usize,
    pub seed: u64,
    pub splits: Vec<SplitSummary>,
    pub seconds: f64,
}

impl SynthSummary {
    pub fn to_text(&self) -> String {
        let mut s = format!("synthetic dataset, {0}x{0} images, seed {1}\n", self.size, self.seed);
        for sp in &self.splits {
            let per: Vec<String> = sp.per_category.iter().map(|(n, c)| format!("{n} {c}")).collect();
            s += &format!(
                "  {:<5} {:>6} images {:>7} instances ({})  {}\n",
                sp.split.name(),
                sp.images,
                sp.instances,
                per.join(", "),
                sp.annotations.display()
            );
        }
        s += &format!("  {:.2} s\n", self.seconds);
        s
    }
}

/// Writes the dataset (see the module docs for the layout). Every file is written atomically;
/// each split's annotation file is written after its images, so it only lists files that exist.
pub fn generate(opts: &SynthOptions) -> Result<SynthSummary> {
    if !(MIN_SIZE..=MAX_SIZE).contains(&opts.size) {
        bail!("--size {} is out of range: use {MIN_SIZE}..={MAX_SIZE}", opts.size);
    }
    if opts.train + opts.val == 0 {
        bail!("nothing to generate: --train and --val are both 0");
    }
    let start = Instant::now();
    let mut splits = Vec::new();
    for (split, n) in [(Split::Train, opts.train), (Split::Val, opts.val)] {
        if n > 0 {
            splits.push(write_split(opts, split, n)?);
        }
    }
    Ok(SynthSummary {
        size: opts.size,
        seed: opts.seed,
        splits,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))
}

fn write_split(opts: &SynthOptions, split: Split, n: usize) -> Result<SplitSummary> {
    let image_dir = opts.out.join(split.name());
    let ann_dir = opts.out.join("annotations");
    create_dir(&image_dir)?;
    create_dir(&ann_dir)?;
    let size = opts.size;
    // Images are independent (each has its own random stream), so workers make and write them
    // in parallel; more workers than cores, as each file's fsync mostly waits on the disk.
    let workers = std::thread::available_parallelism()
        .map_or(1, |c| c.get())
        .max(8)
        .min(n);
    let made: Vec<Vec<(u64, String, Vec<SynthInstance>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|k| {
                let image_dir = &image_dir;
                scope.spawn(move || -> Result<Vec<_>> {
                    let mut out = Vec::new();
                    for i in (k..n).step_by(workers) {
                        let sample = synth_image(size, opts.seed, split, i as u64);
                        let image_id = i as u64 + 1;
                        let file_name = format!("{image_id:06}.png");
                        let mut png = Vec::new();
                        sample
                            .image
                            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
                            .context("encoding PNG")?;
                        let path = image_dir.join(&file_name);
                        write_atomic(&path, &png).with_context(|| format!("writing {}", path.display()))?;
                        out.push((image_id, file_name, sample.instances));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("synthetic dataset worker panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let mut made: Vec<_> = made.into_iter().flatten().collect();
    made.sort_by_key(|m| m.0);

    let mut images = Vec::with_capacity(n);
    let mut annotations = Vec::new();
    let mut per_category = vec![0usize; SYNTH_CATEGORIES.len()];
    for (image_id, file_name, instances) in made {
        images.push(json!({"id": image_id, "file_name": file_name, "height": size, "width": size}));
        for inst in &instances {
            let (x0, y0, x1, y1) = mask_box(&inst.mask, size, size).expect("placed instances are visible");
            let area = inst.mask.iter().filter(|&&v| v != 0).count();
            let rle = rle_encode(&inst.mask, size, size);
            per_category[(inst.category_id - 1) as usize] += 1;
            annotations.push(json!({
                "id": annotations.len() + 1,
                "image_id": image_id,
                "category_id": inst.category_id,
                "segmentation": {"size": rle.size, "counts": rle.counts},
                "area": area as f64,
                "bbox": [x0 as f64, y0 as f64, (x1 - x0) as f64, (y1 - y0) as f64],
                "iscrowd": 0,
            }));
        }
    }
    let categories: Vec<_> = SYNTH_CATEGORIES
        .iter()
        .map(|&(id, name)| json!({"id": id, "name": name, "supercategory": "shape"}))
        .collect();
    let instances = annotations.len();
    let doc = json!({
        "info": {
            "description": format!("vitdet synthetic shapes, {} split", split.name()),
            "version": "1",
            "seed": opts.seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    });
    let path = ann_dir.join(format!("instances_{}.json", split.name()));
    write_atomic(&path, serde_json::to_string(&doc)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(SplitSummary {
        split,
        images: n,
        instances,
        per_category: SYNTH_CATEGORIES
            .iter()
            .zip(per_category)
            .map(|(&(_, name), c)| (name.to_string(), c))
            .collect(),
        annotations: path,
        image_dir,
    })
}
