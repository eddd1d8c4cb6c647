//! COCO evaluation of detection results: pycocotools' `COCOeval` (AP and AR for boxes and
//! masks, [`cocoeval`]) and the TIDE error breakdown of tidecv ([`tide`]).
//!
//! Inputs are a COCO instances file (ground truth) and a COCO results file (detections).
//! Conventions, all pycocotools' own unless noted:
//!
//! * The evaluated images are the ground-truth images and the categories are its `categories`;
//!   annotations and detections of other categories are left out of COCOeval (tidecv keeps
//!   them). A detection on an image the ground truth does not list is an error, as in
//!   pycocotools' `loadRes`.
//! * Box evaluation takes each detection's `area` as `w * h` of its box; mask evaluation takes
//!   it from the RLE (detectron2 drops `bbox` before loading mask results for this reason).
//!   Results without `bbox` use the box around the mask and the mask's area.
//! * Ground-truth `area` (required) decides the small/medium/large ranges; `iscrowd` regions
//!   are ignore regions; polygons are rasterized exactly as pycocotools does.

pub mod cocoeval;
pub mod json;
pub mod tide;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::mask::Runs;

pub use cocoeval::{CocoEval, IouType};
pub use tide::{TideMode, TideResult};

/// One image of the ground truth.
#[derive(Clone, Debug)]
pub struct Image {
    pub id: i64,
    /// `(height, width)`, needed for polygon and RLE annotations and mask detections.
    pub size: Option<(usize, usize)>,
}

/// One category of the ground truth.
#[derive(Clone, Debug)]
pub struct Category {
    pub id: i64,
    pub name: String,
}

/// One ground-truth annotation.
#[derive(Clone, Debug)]
pub struct Annotation {
    pub id: i64,
    pub image_id: i64,
    pub category_id: i64,
    /// `[x, y, w, h]`.
    pub bbox: Option<[f64; 4]>,
    pub area: Option<f64>,
    pub iscrowd: bool,
    /// The mask (polygons rasterized, RLEs decoded) at the image's size.
    pub segmentation: Option<Runs>,
}

/// A COCO instances file.
#[derive(Clone, Debug)]
pub struct GroundTruth {
    /// Where it came from, for error messages.
    pub source: String,
    pub images: Vec<Image>,
    pub categories: Vec<Category>,
    pub annotations: Vec<Annotation>,
}

/// One entry of a results file.
#[derive(Clone, Debug)]
pub struct Detection {
    pub image_id: i64,
    pub category_id: i64,
    pub score: f64,
    /// `[x, y, w, h]`.
    pub bbox: Option<[f64; 4]>,
    pub segmentation: Option<Runs>,
}

/// A COCO results file, in file order (pycocotools numbers detections by position).
#[derive(Clone, Debug)]
pub struct Detections {
    pub source: String,
    pub detections: Vec<Detection>,
}

/// Reads a JSON file (floats correctly rounded, see [`json`]), naming it in every error.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    json::parse(&text).map_err(|e| anyhow::anyhow!("{} is not valid JSON: {e}", path.display()))
}

/// What a field error is about: `file: annotations[3] (id 17)`.
struct Ctx<'a> {
    source: &'a str,
    item: String,
}

impl Ctx<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: {}: {msg}", self.source, self.item)
    }

    fn get<'v>(&self, obj: &'v Map<String, Value>, key: &str) -> Result<&'v Value> {
        obj.get(key).ok_or_else(|| self.err(format!("missing field `{key}`")))
    }

    /// An integer id; integral floats (`3.0`) are accepted as Python's json writes them.
    fn id(&self, obj: &Map<String, Value>, key: &str) -> Result<i64> {
        let v = self.get(obj, key)?;
        if let Some(i) = v.as_i64() {
            return Ok(i);
        }
        match v.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
            _ => Err(self.err(format!("`{key}` must be an integer, not {}", short(v)))),
        }
    }

    fn number(&self, v: &Value, key: &str) -> Result<f64> {
        match v.as_f64() {
            Some(f) if f.is_finite() => Ok(f),
            _ => Err(self.err(format!("`{key}` must be a finite number, not {}", short(v)))),
        }
    }

    fn bbox(&self, obj: &Map<String, Value>) -> Result<Option<[f64; 4]>> {
        let Some(v) = obj.get("bbox") else {
            return Ok(None);
        };
        let arr = v.as_array().filter(|a| a.len() == 4);
        let Some(arr) = arr else {
            return Err(self.err(format!("`bbox` must be [x, y, width, height], not {}", short(v))));
        };
        let mut b = [0.0; 4];
        for (o, x) in b.iter_mut().zip(arr) {
            *o = self.number(x, "bbox")?;
        }
        Ok(Some(b))
    }

    /// An RLE object `{"size": [h, w], "counts": "..." | [..]}`.
    fn rle(&self, obj: &Map<String, Value>) -> Result<Runs> {
        let size = self.get(obj, "size")?;
        let hw: Option<Vec<usize>> = size
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect());
        let Some(hw) = hw else {
            return Err(self.err(format!(
                "segmentation `size` must be [height, width], not {}",
                short(size)
            )));
        };
        let (h, w) = (hw[0], hw[1]);
        match self.get(obj, "counts")? {
            Value::String(s) => Runs::from_compressed(s, h, w),
            Value::Array(a) => {
                let counts: Option<Vec<u32>> = a
                    .iter()
                    .map(|v| v.as_u64().and_then(|c| u32::try_from(c).ok()))
                    .collect();
                match counts {
                    Some(c) => Runs::new(h, w, c),
                    None => Err(anyhow::anyhow!(
                        "uncompressed counts must be non-negative 32-bit integers"
                    )),
                }
            }
            other => Err(anyhow::anyhow!(
                "`counts` must be a string or a list, not {}",
                short(other)
            )),
        }
        .map_err(|e| self.err(format!("segmentation: {e}")))
    }
}

fn objects<'v>(source: &str, top: &'v Map<String, Value>, key: &str) -> Result<Vec<&'v Map<String, Value>>> {
    let Some(v) = top.get(key) else {
        bail!("{source}: missing top-level `{key}` (is this a COCO instances file?)");
    };
    let Some(arr) = v.as_array() else {
        bail!("{source}: `{key}` must be a list");
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_object()
                .ok_or_else(|| anyhow::anyhow!("{source}: {key}[{i}] is not an object"))
        })
        .collect()
}

impl GroundTruth {
    /// Loads a COCO instances file.
    pub fn load(path: &Path) -> Result<Self> {
        GroundTruth::from_value(&read_json(path)?, &path.display().to_string())
    }

    /// Parses an instances file; `source` names it in errors.
    pub fn from_value(root: &Value, source: &str) -> Result<Self> {
        let Some(top) = root.as_object() else {
            bail!("{source}: expected a JSON object with images, annotations and categories");
        };
        let mut images = Vec::new();
        let mut sizes = HashMap::new();
        for (i, obj) in objects(source, top, "images")?.into_iter().enumerate() {
            let mut ctx = Ctx {
                source,
                item: format!("images[{i}]"),
            };
            let id = ctx.id(obj, "id")?;
            ctx.item = format!("images[{i}] (id {id})");
            let dim = |key: &str| -> Result<Option<usize>> {
                match obj.get(key) {
                    None => Ok(None),
                    Some(v) => match v.as_u64() {
                        Some(d) if d > 0 => Ok(Some(d as usize)),
                        _ => Err(ctx.err(format!("`{key}` must be a positive integer, not {}", short(v)))),
                    },
                }
            };
            let size = match (dim("height")?, dim("width")?) {
                (Some(h), Some(w)) => Some((h, w)),
                _ => None,
            };
            if sizes.insert(id, size).is_some() {
                return Err(ctx.err("duplicate image id"));
            }
            images.push(Image { id, size });
        }
        let mut categories = Vec::new();
        let mut seen = HashSet::new();
        for (i, obj) in objects(source, top, "categories")?.into_iter().enumerate() {
            let ctx = Ctx {
                source,
                item: format!("categories[{i}]"),
            };
            let id = ctx.id(obj, "id")?;
            if !seen.insert(id) {
                return Err(ctx.err(format!("duplicate category id {id}")));
            }
            let name = obj.get("name").and_then(Value::as_str).unwrap_or("").to_string();
            categories.push(Category { id, name });
        }
        let mut annotations = Vec::new();
        let mut ids = HashSet::new();
        for (i, obj) in objects(source, top, "annotations")?.into_iter().enumerate() {
            let mut ctx = Ctx {
                source,
                item: format!("annotations[{i}]"),
            };
            let id = ctx.id(obj, "id")?;
            ctx.item = format!("annotations[{i}] (id {id})");
            if !ids.insert(id) {
                return Err(ctx.err("duplicate annotation id"));
            }
            let image_id = ctx.id(obj, "image_id")?;
            let Some(&size) = sizes.get(&image_id) else {
                return Err(ctx.err(format!("image_id {image_id} is not among the images")));
            };
            let category_id = ctx.id(obj, "category_id")?;
            let area = obj.get("area").map(|v| ctx.number(v, "area")).transpose()?;
            let iscrowd = match obj.get("iscrowd") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => match v.as_i64() {
                    Some(0) => false,
                    Some(1) => true,
                    _ => return Err(ctx.err(format!("`iscrowd` must be 0 or 1, not {}", short(v)))),
                },
            };
            let segmentation = match obj.get("segmentation") {
                None | Some(Value::Null) => None,
                Some(seg) => Some(gt_segmentation(&ctx, seg, size)?),
            };
            annotations.push(Annotation {
                id,
                image_id,
                category_id,
                bbox: ctx.bbox(obj)?,
                area,
                iscrowd,
                segmentation,
            });
        }
        Ok(GroundTruth {
            source: source.to_string(),
            images,
            categories,
            annotations,
        })
    }

    fn image_sizes(&self) -> HashMap<i64, Option<(usize, usize)>> {
        self.images.iter().map(|im| (im.id, im.size)).collect()
    }
}

/// A ground-truth `segmentation` as pycocotools' `annToRLE` reads it: a list of polygons
/// merged into one mask, an uncompressed RLE or a compressed one.
fn gt_segmentation(ctx: &Ctx, seg: &Value, size: Option<(usize, usize)>) -> Result<Runs> {
    let runs = match seg {
        Value::Object(obj) => ctx.rle(obj)?,
        Value::Array(parts) => {
            let Some((h, w)) = size else {
                return Err(ctx.err("polygon segmentation needs the image's height and width"));
            };
            let mut polys = Vec::with_capacity(parts.len());
            for p in parts {
                let coords: Option<Vec<f64>> = p.as_array().and_then(|a| a.iter().map(Value::as_f64).collect());
                let Some(coords) = coords else {
                    return Err(ctx.err("polygon segmentation must be a list of lists of numbers"));
                };
                polys.push(coords);
            }
            // pycocotools reads the list by its first entry: 4 numbers would be taken for boxes
            // (and fail), fewer are refused; later short polygons are rasterized as they are.
            if polys.first().map_or(0, Vec::len) <= 4 {
                return Err(ctx.err("the first polygon needs at least 3 points (6 numbers)"));
            }
            let masks: Result<Vec<Runs>> = polys.iter().map(|p| Runs::from_polygon(p, h, w)).collect();
            Runs::union(&masks.map_err(|e| ctx.err(format!("segmentation: {e}")))?)
                .map_err(|e| ctx.err(format!("segmentation: {e}")))?
        }
        other => {
            return Err(ctx.err(format!(
                "`segmentation` must be polygons or an RLE, not {}",
                short(other)
            )))
        }
    };
    if let Some((h, w)) = size {
        if (runs.height(), runs.width()) != (h, w) {
            return Err(ctx.err(format!(
                "segmentation is {}x{} but the image is {h}x{w}",
                runs.height(),
                runs.width()
            )));
        }
    }
    Ok(runs)
}

impl Detections {
    /// Loads a COCO results file, checked against the ground truth's images.
    pub fn load(path: &Path, gt: &GroundTruth) -> Result<Self> {
        Detections::from_value(&read_json(path)?, &path.display().to_string(), gt)
    }

    /// Parses a results list; `source` names it in errors.
    pub fn from_value(root: &Value, source: &str, gt: &GroundTruth) -> Result<Self> {
        let Some(arr) = root.as_array() else {
            bail!("{source}: a results file must be a JSON list of detections");
        };
        let sizes = gt.image_sizes();
        let mut detections = Vec::with_capacity(arr.len());
        for (i, v) in arr.iter().enumerate() {
            let ctx = Ctx {
                source,
                item: format!("detection {i}"),
            };
            let Some(obj) = v.as_object() else {
                return Err(ctx.err("not an object"));
            };
            let image_id = ctx.id(obj, "image_id")?;
            let Some(&size) = sizes.get(&image_id) else {
                // pycocotools' loadRes refuses such files too ("Results do not correspond to
                // current coco set").
                return Err(ctx.err(format!(
                    "image_id {image_id} is not an image of the ground truth {}",
                    gt.source
                )));
            };
            let category_id = ctx.id(obj, "category_id")?;
            let score = ctx.number(ctx.get(obj, "score")?, "score")?;
            let segmentation = match obj.get("segmentation") {
                None | Some(Value::Null) => None,
                Some(Value::Object(rle)) => {
                    let runs = ctx.rle(rle)?;
                    match size {
                        Some((h, w)) if (runs.height(), runs.width()) != (h, w) => {
                            return Err(ctx.err(format!(
                                "segmentation is {}x{} but image {image_id} is {h}x{w}",
                                runs.height(),
                                runs.width()
                            )))
                        }
                        _ => {}
                    }
                    Some(runs)
                }
                Some(other) => {
                    return Err(ctx.err(format!(
                        "`segmentation` of a result must be an RLE {{\"size\", \"counts\"}}, not {}",
                        short(other)
                    )))
                }
            };
            let bbox = ctx.bbox(obj)?;
            if bbox.is_none() && segmentation.is_none() {
                return Err(ctx.err("has neither `bbox` nor `segmentation`"));
            }
            detections.push(Detection {
                image_id,
                category_id,
                score,
                bbox,
                segmentation,
            });
        }
        Ok(Detections {
            source: source.to_string(),
            detections,
        })
    }

    /// Whether every detection carries a mask (an empty list counts as both).
    fn all_have_masks(&self) -> Result<bool> {
        let with = self.detections.iter().filter(|d| d.segmentation.is_some()).count();
        if with != 0 && with != self.detections.len() {
            let i = self
                .detections
                .iter()
                .position(|d| d.segmentation.is_none())
                .unwrap_or(0);
            bail!(
                "{}: {with} of {} detections have a `segmentation` but detection {i} has none; \
                 give all or none",
                self.source,
                self.detections.len()
            );
        }
        Ok(with == self.detections.len())
    }

    /// The `[x, y, w, h]` box and area each detection is evaluated with for boxes: its own box
    /// and `w * h`, or, for results without boxes, the mask's box and area (pycocotools'
    /// `loadRes` decides by the first result; mixing is refused here instead).
    fn boxes(&self) -> Result<Vec<([f64; 4], f64)>> {
        let with = self.detections.iter().filter(|d| d.bbox.is_some()).count();
        if with != 0 && with != self.detections.len() {
            let i = self.detections.iter().position(|d| d.bbox.is_none()).unwrap_or(0);
            bail!(
                "{}: {with} of {} detections have a `bbox` but detection {i} has none; give all or none",
                self.source,
                self.detections.len()
            );
        }
        Ok(self
            .detections
            .iter()
            .map(|d| match (&d.bbox, &d.segmentation) {
                (Some(b), _) => (*b, b[2] * b[3]),
                (None, Some(m)) => (m.to_bbox(), m.area() as f64),
                (None, None) => unreachable!("rejected when loading"),
            })
            .collect())
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

/// `COCOeval.stats` for boxes and masks, and TIDE for both.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub bbox: [f64; 12],
    /// `None` when the results (or the ground truth) carry no masks.
    pub segm: Option<[f64; 12]>,
    pub tide: TideReport,
}

/// TIDE per evaluation type (`segm` is tidecv's "mask" mode).
#[derive(Clone, Debug, Serialize)]
pub struct TideReport {
    pub bbox: TideResult,
    pub segm: Option<TideResult>,
}

/// Evaluates `dets` against `gt`: COCOeval and TIDE for boxes, and for masks when the results
/// have them and the ground truth is not boxes-only.
pub fn evaluate(gt: &GroundTruth, dets: &Detections) -> Result<EvalReport> {
    let gt_masks = gt.annotations.is_empty() || gt.annotations.iter().any(|a| a.segmentation.is_some());
    let masks = dets.all_have_masks()? && gt_masks;
    let bbox = CocoEval::run(gt, dets, IouType::Bbox)?;
    let tide_bbox = tide::evaluate(gt, dets, TideMode::Box)?;
    let (segm, tide_segm) = if masks {
        (
            Some(CocoEval::run(gt, dets, IouType::Segm)?.stats),
            Some(tide::evaluate(gt, dets, TideMode::Mask)?),
        )
    } else {
        (None, None)
    };
    Ok(EvalReport {
        bbox: bbox.stats,
        segm,
        tide: TideReport {
            bbox: tide_bbox,
            segm: tide_segm,
        },
    })
}

impl EvalReport {
    /// pycocotools' `summarize()` lines per type, then TIDE's main and special errors.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let types = [("bbox", Some(&self.bbox)), ("segm", self.segm.as_ref())];
        for (name, stats) in types {
            let Some(stats) = stats else { continue };
            s += &format!("COCO {name}\n{}", cocoeval::summary_text(stats));
        }
        let tides = [("bbox", Some(&self.tide.bbox)), ("segm", self.tide.segm.as_ref())];
        for (name, t) in tides {
            let Some(t) = t else { continue };
            s += &format!("\nTIDE {name}\n{}", t.to_text());
        }
        if self.segm.is_none() {
            s += "\n(segm not evaluated: the results or the ground truth have no masks)\n";
        }
        s
    }
}
