//! COCO-format instance datasets: an instances JSON (`images`, `annotations`, `categories`)
//! and a folder with the images.
//!
//! As detectron2's `load_coco_json` and its training filters:
//! * category ids map to contiguous class indices `0..K` in sorted id order
//!   ([`CocoDataset::class_index`], [`CocoDataset::category_id`] for writing results back);
//! * polygons with an odd number of coordinates or fewer than 3 points are dropped, and an
//!   annotation with no valid polygon left is ignored;
//! * training drops crowd annotations and skips images without any other annotation
//!   ([`CocoDataset::training_images`] counts both in a [`TrainFilterReport`]).
//!
//! Masks are decoded with [`crate::mask`] (pycocotools' polygon rasterization and RLE). Every
//! error names the file and the offending entry or field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use serde::Serialize;
use serde_json::{Map, Value};
use vitdet_runtime::preprocess::load_rgb;

use super::lsj::{eval_sample, EvalSample};
use super::GtInstance;
use crate::mask::{Rle, Runs};

#[derive(Clone, Debug, PartialEq)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    pub height: usize,
    pub width: usize,
}

/// An annotation's `segmentation` field.
#[derive(Clone, Debug, PartialEq)]
pub enum Segmentation {
    /// `[[x0, y0, x1, y1, ...], ...]`, all parts of one instance (valid ones only).
    Polygons(Vec<Vec<f64>>),
    /// `{"size": [h, w], "counts": "..."}`.
    CompressedRle(Rle),
    /// `{"size": [h, w], "counts": [n0, n1, ...]}`: column-major runs starting with zeros.
    UncompressedRle { size: [usize; 2], counts: Vec<u64> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct CocoAnnotation {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]`.
    pub bbox: [f64; 4],
    pub area: Option<f64>,
    pub iscrowd: bool,
    /// `None` when the annotation has no segmentation or no valid polygon.
    pub segmentation: Option<Segmentation>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
}

/// What [`CocoDataset::training_images`] left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrainFilterReport {
    pub images: usize,
    /// Images with at least one usable annotation.
    pub used: usize,
    /// Images skipped because no non-crowd annotation with a mask is left.
    pub skipped_images: usize,
    pub crowd_annotations: usize,
    /// Non-crowd annotations without a (valid) segmentation.
    pub annotations_without_mask: usize,
}

#[derive(Clone, Debug)]
pub struct CocoDataset {
    source: PathBuf,
    image_dir: PathBuf,
    pub images: Vec<CocoImage>,
    pub annotations: Vec<CocoAnnotation>,
    /// Sorted by id: position = class index.
    pub categories: Vec<CocoCategory>,
    image_by_id: HashMap<u64, usize>,
    class_by_id: HashMap<u64, usize>,
    /// Annotation indices of each image, in file order.
    per_image: Vec<Vec<usize>>,
}

type Obj = Map<String, Value>;

fn get<'a>(o: &'a Obj, key: &str, at: &str) -> Result<&'a Value> {
    o.get(key).ok_or_else(|| anyhow!("{at}: field `{key}` is missing"))
}

fn as_u64(v: &Value, at: &str) -> Result<u64> {
    v.as_u64()
        .ok_or_else(|| anyhow!("{at}: expected a non-negative integer, found {}", short(v)))
}

fn as_f64(v: &Value, at: &str) -> Result<f64> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => bail!("{at}: expected a number, found {}", short(v)),
    }
}

fn as_array<'a>(v: &'a Value, at: &str) -> Result<&'a Vec<Value>> {
    v.as_array()
        .ok_or_else(|| anyhow!("{at}: expected an array, found {}", short(v)))
}

fn as_object<'a>(v: &'a Value, at: &str) -> Result<&'a Obj> {
    v.as_object()
        .ok_or_else(|| anyhow!("{at}: expected an object, found {}", short(v)))
}

/// A value for an error message, cut to a readable length.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

fn parse_image(v: &Value, at: &str) -> Result<CocoImage> {
    let o = as_object(v, at)?;
    let file_name = get(o, "file_name", at)?;
    let file_name = file_name
        .as_str()
        .ok_or_else(|| anyhow!("{at}.file_name: expected a string, found {}", short(file_name)))?
        .to_string();
    let id = as_u64(get(o, "id", at)?, &format!("{at}.id"))?;
    let height = as_u64(get(o, "height", at)?, &format!("{at}.height"))? as usize;
    let width = as_u64(get(o, "width", at)?, &format!("{at}.width"))? as usize;
    if height == 0 || width == 0 {
        bail!("{at} (id {id}): size {width}x{height} is empty");
    }
    Ok(CocoImage {
        id,
        file_name,
        height,
        width,
    })
}

fn parse_size(o: &Obj, at: &str) -> Result<[usize; 2]> {
    let size = as_array(get(o, "size", at)?, &format!("{at}.size"))?;
    if size.len() != 2 {
        bail!("{at}.size: expected [height, width], found {} values", size.len());
    }
    Ok([
        as_u64(&size[0], &format!("{at}.size[0]"))? as usize,
        as_u64(&size[1], &format!("{at}.size[1]"))? as usize,
    ])
}

/// `Ok(None)` for a polygon list with no valid polygon (detectron2 ignores such annotations).
fn parse_segmentation(v: &Value, at: &str) -> Result<Option<Segmentation>> {
    match v {
        Value::Array(polys) => {
            let mut valid = Vec::new();
            for (i, p) in polys.iter().enumerate() {
                let pat = format!("{at}[{i}]");
                let coords = as_array(p, &pat)?
                    .iter()
                    .enumerate()
                    .map(|(j, c)| as_f64(c, &format!("{pat}[{j}]")))
                    .collect::<Result<Vec<f64>>>()?;
                if coords.len() % 2 == 0 && coords.len() >= 6 {
                    valid.push(coords);
                }
            }
            Ok((!valid.is_empty()).then_some(Segmentation::Polygons(valid)))
        }
        Value::Object(o) => {
            let size = parse_size(o, at)?;
            let counts = get(o, "counts", at)?;
            match counts {
                Value::String(s) => Ok(Some(Segmentation::CompressedRle(Rle {
                    size,
                    counts: s.clone(),
                }))),
                Value::Array(c) => {
                    let counts = c
                        .iter()
                        .enumerate()
                        .map(|(j, n)| as_u64(n, &format!("{at}.counts[{j}]")))
                        .collect::<Result<Vec<u64>>>()?;
                    let total: u64 = counts.iter().sum();
                    if total != (size[0] * size[1]) as u64 {
                        bail!(
                            "{at}: uncompressed RLE counts sum to {total}, a {}x{} mask has {} pixels",
                            size[0],
                            size[1],
                            size[0] * size[1]
                        );
                    }
                    Ok(Some(Segmentation::UncompressedRle { size, counts }))
                }
                other => bail!("{at}.counts: expected a string or an array, found {}", short(other)),
            }
        }
        other => bail!(
            "{at}: expected polygons (an array) or an RLE object, found {}",
            short(other)
        ),
    }
}

fn parse_annotation(v: &Value, at: &str) -> Result<CocoAnnotation> {
    let o = as_object(v, at)?;
    let id = as_u64(get(o, "id", at)?, &format!("{at}.id"))?;
    let at = format!("{at} (id {id})");
    let image_id = as_u64(get(o, "image_id", &at)?, &format!("{at}.image_id"))?;
    let category_id = as_u64(get(o, "category_id", &at)?, &format!("{at}.category_id"))?;
    let bbox_v = as_array(get(o, "bbox", &at)?, &format!("{at}.bbox"))?;
    if bbox_v.len() != 4 {
        bail!(
            "{at}.bbox: expected [x, y, width, height], found {} values",
            bbox_v.len()
        );
    }
    let mut bbox = [0.0; 4];
    for (k, b) in bbox_v.iter().enumerate() {
        bbox[k] = as_f64(b, &format!("{at}.bbox[{k}]"))?;
    }
    let area = o.get("area").map(|a| as_f64(a, &format!("{at}.area"))).transpose()?;
    let iscrowd = match o.get("iscrowd") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => match v.as_u64() {
            Some(0) => false,
            Some(1) => true,
            _ => bail!("{at}.iscrowd: expected 0 or 1, found {}", short(v)),
        },
    };
    let segmentation = match o.get("segmentation") {
        None | Some(Value::Null) => None,
        Some(s) => parse_segmentation(s, &format!("{at}.segmentation"))?,
    };
    Ok(CocoAnnotation {
        id,
        image_id,
        category_id,
        bbox,
        area,
        iscrowd,
        segmentation,
    })
}

fn parse_category(v: &Value, at: &str) -> Result<CocoCategory> {
    let o = as_object(v, at)?;
    let id = as_u64(get(o, "id", at)?, &format!("{at}.id"))?;
    let name = get(o, "name", at)?;
    let name = name
        .as_str()
        .ok_or_else(|| anyhow!("{at}.name: expected a string, found {}", short(name)))?
        .to_string();
    Ok(CocoCategory { id, name })
}

impl CocoDataset {
    /// Reads `instances_json` and checks it: required fields and types, unique ids, every
    /// annotation's image and category known, RLE sizes equal to their image's. Images are
    /// read later ([`CocoDataset::load_image`]); `image_dir` must be a folder.
    pub fn load(instances_json: impl AsRef<Path>, image_dir: impl AsRef<Path>) -> Result<Self> {
        let path = instances_json.as_ref();
        let image_dir = image_dir.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&doc, path, image_dir).with_context(|| format!("in {}", path.display()))
    }

    fn from_json(doc: &Value, source: &Path, image_dir: &Path) -> Result<Self> {
        let top = as_object(doc, "the top level")?;
        let mut images = Vec::new();
        let mut image_by_id = HashMap::new();
        for (i, v) in as_array(get(top, "images", "the top level")?, "images")?
            .iter()
            .enumerate()
        {
            let img = parse_image(v, &format!("images[{i}]"))?;
            if image_by_id.insert(img.id, images.len()).is_some() {
                bail!("images[{i}]: image id {} appears twice", img.id);
            }
            images.push(img);
        }
        let mut categories = Vec::new();
        for (i, v) in as_array(get(top, "categories", "the top level")?, "categories")?
            .iter()
            .enumerate()
        {
            categories.push(parse_category(v, &format!("categories[{i}]"))?);
        }
        categories.sort_by_key(|c| c.id);
        if let Some(w) = categories.windows(2).find(|w| w[0].id == w[1].id) {
            bail!("categories: category id {} appears twice", w[0].id);
        }
        let class_by_id: HashMap<u64, usize> = categories.iter().enumerate().map(|(k, c)| (c.id, k)).collect();

        let mut annotations = Vec::new();
        let mut per_image = vec![Vec::new(); images.len()];
        let mut seen = HashMap::new();
        let anns = match top.get("annotations") {
            None => &Vec::new(),
            Some(v) => as_array(v, "annotations")?,
        };
        for (i, v) in anns.iter().enumerate() {
            let at = format!("annotations[{i}]");
            let a = parse_annotation(v, &at)?;
            let at = format!("{at} (id {})", a.id);
            if seen.insert(a.id, i).is_some() {
                bail!("{at}: annotation id {} appears twice", a.id);
            }
            let Some(&img) = image_by_id.get(&a.image_id) else {
                bail!("{at}: image_id {} is not in `images`", a.image_id);
            };
            if !class_by_id.contains_key(&a.category_id) {
                bail!("{at}: category_id {} is not in `categories`", a.category_id);
            }
            let (h, w) = (images[img].height, images[img].width);
            if let Some(Segmentation::CompressedRle(Rle { size, .. }) | Segmentation::UncompressedRle { size, .. }) =
                &a.segmentation
            {
                if *size != [h, w] {
                    bail!(
                        "{at}: RLE size [{}, {}] differs from image {}'s [{h}, {w}] (height, width)",
                        size[0],
                        size[1],
                        a.image_id
                    );
                }
            }
            per_image[img].push(annotations.len());
            annotations.push(a);
        }
        if !image_dir.is_dir() {
            bail!("image folder {} does not exist or is not a folder", image_dir.display());
        }
        Ok(CocoDataset {
            source: source.to_path_buf(),
            image_dir: image_dir.to_path_buf(),
            images,
            annotations,
            categories,
            image_by_id,
            class_by_id,
            per_image,
        })
    }

    /// The instances JSON this dataset came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn image_dir(&self) -> &Path {
        &self.image_dir
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.categories.len()
    }

    /// Contiguous class index of a COCO category id.
    pub fn class_index(&self, category_id: u64) -> Option<usize> {
        self.class_by_id.get(&category_id).copied()
    }

    /// COCO category id of a class index (for writing detections back).
    pub fn category_id(&self, class: usize) -> Option<u64> {
        self.categories.get(class).map(|c| c.id)
    }

    /// Position in [`CocoDataset::images`] of an image id.
    pub fn image_index(&self, image_id: u64) -> Option<usize> {
        self.image_by_id.get(&image_id).copied()
    }

    /// Annotations of image `index` (all of them, crowd included).
    pub fn annotations_of(&self, index: usize) -> impl Iterator<Item = &CocoAnnotation> {
        self.per_image[index].iter().map(|&a| &self.annotations[a])
    }

    pub fn image_path(&self, index: usize) -> PathBuf {
        self.image_dir.join(&self.images[index].file_name)
    }

    /// Decodes image `index` to RGB8; the error names the file, also when its size differs
    /// from the JSON's.
    pub fn load_image(&self, index: usize) -> Result<RgbImage> {
        let info = &self.images[index];
        let path = self.image_path(index);
        let img = load_rgb(&path)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        if (h, w) != (info.height, info.width) {
            bail!(
                "{} is {w}x{h} but {} says image {} is {}x{}",
                path.display(),
                self.source.display(),
                info.id,
                info.width,
                info.height
            );
        }
        Ok(img)
    }

    /// Checks that every image file exists and has the size the JSON gives (reads headers
    /// only). Returns the first problem.
    pub fn check_images(&self) -> Result<()> {
        for (i, info) in self.images.iter().enumerate() {
            let path = self.image_path(i);
            let (w, h) = image::ImageReader::open(&path)
                .and_then(|r| r.with_guessed_format())
                .map_err(anyhow::Error::from)
                .and_then(|r| r.into_dimensions().map_err(anyhow::Error::from))
                .with_context(|| format!("reading image {}", path.display()))?;
            if (h as usize, w as usize) != (info.height, info.width) {
                bail!(
                    "{} is {w}x{h} but {} says image {} is {}x{}",
                    path.display(),
                    self.source.display(),
                    info.id,
                    info.width,
                    info.height
                );
            }
        }
        Ok(())
    }

    /// Whether an annotation is used for training: not crowd, and with a mask.
    fn trainable(a: &CocoAnnotation) -> bool {
        !a.iscrowd && a.segmentation.is_some()
    }

    /// The training instances of image `index`: non-crowd annotations with a mask, decoded to
    /// `height x width` bitmaps, in file order.
    pub fn instances(&self, index: usize) -> Result<Vec<GtInstance>> {
        let info = &self.images[index];
        self.annotations_of(index)
            .filter(|a| Self::trainable(a))
            .map(|a| {
                let seg = a.segmentation.as_ref().expect("trainable annotations have a mask");
                let mask = decode(seg, info.height, info.width)
                    .with_context(|| format!("{}: annotation {}", self.source.display(), a.id))?;
                Ok(GtInstance {
                    class: self.class_by_id[&a.category_id],
                    mask,
                })
            })
            .collect()
    }

    /// Image `index` and its instances prepared for validation at input side `size`
    /// ([`eval_sample`]: the long side resized to `size`, no augmentation).
    pub fn eval_sample(&self, index: usize, size: usize) -> Result<EvalSample> {
        let img = self.load_image(index)?;
        let instances = self.instances(index)?;
        eval_sample(&img, &instances, size).with_context(|| format!("preparing {}", self.image_path(index).display()))
    }

    /// Indices of the images used for training (those with at least one non-crowd annotation
    /// with a mask, as detectron2's `filter_empty_annotations`) and what was left out.
    pub fn training_images(&self) -> (Vec<usize>, TrainFilterReport) {
        let mut report = TrainFilterReport {
            images: self.images.len(),
            ..Default::default()
        };
        for a in &self.annotations {
            if a.iscrowd {
                report.crowd_annotations += 1;
            } else if a.segmentation.is_none() {
                report.annotations_without_mask += 1;
            }
        }
        let used: Vec<usize> = (0..self.images.len())
            .filter(|&i| self.annotations_of(i).any(Self::trainable))
            .collect();
        report.used = used.len();
        report.skipped_images = report.images - report.used;
        (used, report)
    }
}

/// A segmentation as a row-major `h x w` 0/1 mask (pycocotools' `annToMask`: the parts of a
/// polygon annotation are merged).
fn decode(seg: &Segmentation, h: usize, w: usize) -> Result<Vec<u8>> {
    let runs = match seg {
        Segmentation::Polygons(polys) => {
            let parts = polys
                .iter()
                .map(|p| Runs::from_polygon(p, h, w))
                .collect::<Result<Vec<_>>>()?;
            Runs::union(&parts)?
        }
        Segmentation::CompressedRle(rle) => Runs::from_rle(rle)?,
        Segmentation::UncompressedRle { size, counts } => {
            let counts = counts
                .iter()
                .map(|&c| u32::try_from(c).map_err(|_| anyhow!("RLE run length {c} exceeds 32 bits")))
                .collect::<Result<Vec<u32>>>()?;
            Runs::new(size[0], size[1], counts)?
        }
    };
    Ok(runs.decode())
}
