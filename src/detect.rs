//! `vitdet infer --out`: the whole Mask R-CNN on one image or a folder of images, written as
//! COCO results (`detections.json`) and pictures.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image::RgbImage;
use serde::Serialize;
use vitdet_ir::ops::PasteMasks;
use vitdet_ir::Op;
use vitdet_models::ModelConfig;
use vitdet_passes::Precision;
use vitdet_runtime::preprocess::{load_rgb, preprocess_rgb, Preprocessed};
use vitdet_runtime::{kernels, run_with_order, CandleDType, Device, ParamStore, Tensor};

use crate::compile::{compile_config_with, inference_lowering, Target};
use crate::detections::{coco_results, draw, Categories, CocoResult, Detection};
use crate::infer::load_params;
use crate::report::slowest_first;

/// detectron2's mask threshold when pasting.
pub const MASK_THRESHOLD: f64 = 0.5;

pub struct DetectOptions {
    pub model: String,
    pub weights: Option<PathBuf>,
    /// An image file, or a folder of PNG/JPEG images.
    pub image: PathBuf,
    pub out: PathBuf,
    pub score_thresh: Option<f64>,
    pub seed: u64,
    pub runner: Runner,
}

/// Where and in what precision the detector runs.
#[derive(Clone, Debug)]
pub struct Runner {
    pub device: Device,
    /// f32, or autocast to bf16 / f16 with the attention fused (weights converted on load).
    pub precision: Precision,
}

impl Runner {
    /// f32 on the CPU.
    pub fn cpu() -> Runner {
        Runner {
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ImageReport {
    pub image: String,
    pub image_id: u64,
    pub detections: usize,
    pub seconds: f64,
    /// Kernel time per op name, slowest first.
    pub op_seconds: Vec<(String, f64)>,
    /// The same time per scope (two components: `backbone.net`, `roi_heads.mask_head`, ...).
    pub scope_seconds: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
pub struct DetectSummary {
    pub model: String,
    /// The precision it ran in (f32, bf16, f16).
    pub dtype: &'static str,
    pub weights: String,
    pub images: Vec<ImageReport>,
    /// Images that could not be processed, with the reason.
    pub failed: Vec<(String, String)>,
    pub results: PathBuf,
}

/// The images to process: the file itself, or a folder's PNG/JPEG files in name order.
fn list_images(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading folder {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
            matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("folder {} has no .png/.jpg/.jpeg images", path.display());
    }
    Ok(files)
}

/// COCO-style ids: a numeric file stem (`000000397133.jpg` -> 397133), else the 1-based index.
fn image_id(path: &Path, index: usize) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(index as u64 + 1)
}

pub fn detect(opts: &DetectOptions) -> Result<DetectSummary> {
    let mut config = ModelConfig::load(&opts.model)?;
    if let Some(t) = opts.score_thresh {
        config.detector.score_thresh = t;
        config.validate().with_context(|| format!("--score-thresh {t}"))?;
    }
    let images = list_images(&opts.image)?;
    let square = compile_config_with(
        &opts.model,
        config.clone(),
        Target::Detector { image_hw: None },
        inference_lowering(opts.runner.precision),
    )?;
    let (params, weights) = load_params(opts.weights.as_deref(), &square.graph, opts.seed, &opts.runner.device)?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;

    let progress = indicatif::ProgressBar::new(images.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} images, {per_sec}, eta {eta} {msg}")
            .expect("valid progress template"),
    );
    if images.len() == 1 {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let categories = Categories::coco();
    let mut results: Vec<CocoResult> = Vec::new();
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for (index, path) in images.iter().enumerate() {
        progress.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let id = image_id(path, index);
        let start = Instant::now();
        match detect_one(&config, &params, path, &opts.runner) {
            Ok((rgb, dets, (op_seconds, scope_seconds))) => {
                let (h, w) = (rgb.height() as usize, rgb.width() as usize);
                results.extend(coco_results(&dets, id, h, w, &categories));
                let picture = if images.len() == 1 {
                    opts.out.join("detections.png")
                } else {
                    let stem = path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    opts.out.join(format!("{stem}.detections.png"))
                };
                write_png(&picture, &draw(&rgb, &dets, &categories))?;
                reports.push(ImageReport {
                    image: path.display().to_string(),
                    image_id: id,
                    detections: dets.len(),
                    seconds: start.elapsed().as_secs_f64(),
                    op_seconds,
                    scope_seconds,
                });
            }
            // One bad file in a folder does not lose the others' results.
            Err(e) if images.len() > 1 => {
                progress.suspend(|| eprintln!("skipping {}: {e:#}", path.display()));
                failed.push((path.display().to_string(), format!("{e:#}")));
            }
            Err(e) => return Err(e),
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    let json_path = opts.out.join("detections.json");
    vitdet_runtime::write_atomic(&json_path, serde_json::to_string(&results)?.as_bytes())
        .with_context(|| format!("writing {}", json_path.display()))?;
    Ok(DetectSummary {
        model: opts.model.clone(),
        dtype: opts.runner.precision.name(),
        weights,
        images: reports,
        failed,
        results: json_path,
    })
}

pub(crate) fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    vitdet_runtime::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// Kernel seconds per op name and per scope, slowest first.
type KernelSeconds = (Vec<(String, f64)>, Vec<(String, f64)>);

/// Runs the detector on one image; detections in original-image pixels, as detectron2's
/// `detector_postprocess`: boxes scaled from the resized frame and clipped to the image, empty
/// boxes dropped, masks pasted into the image and thresholded.
pub(crate) fn detect_one(
    config: &ModelConfig,
    params: &ParamStore,
    path: &Path,
    runner: &Runner,
) -> Result<(RgbImage, Vec<Detection>, KernelSeconds)> {
    let device = &runner.device;
    let rgb = load_rgb(path)?;
    let pre: Preprocessed = preprocess_rgb(&rgb, config.image_size, device)?;
    let (rh, rw) = pre.resized_hw;
    let compiled = compile_config_with(
        "",
        config.clone(),
        Target::Detector {
            image_hw: Some([rh, rw]),
        },
        inference_lowering(runner.precision),
    )?;
    let out = run_with_order(
        &compiled.graph,
        params,
        &[("image", pre.image)],
        device,
        &compiled.order,
    )?;
    let get = |name: &str| -> Result<Tensor> {
        Ok(out
            .get(name)
            .with_context(|| format!("detector has no output `{name}`"))?
            .to_device(&Device::Cpu)?)
    };
    let boxes = get("boxes")?.to_dtype(CandleDType::F32)?.to_vec2::<f32>()?;
    let scores = get("scores")?.to_dtype(CandleDType::F32)?.to_vec1::<f32>()?;
    let classes = get("classes")?.to_vec1::<i64>()?;
    let valid = get("valid")?.to_vec1::<u8>()?;
    let masks = get("masks")?.to_dtype(CandleDType::F32)?;

    let (oh, ow) = pre.original_hw;
    let (sx, sy) = (ow as f32 / rw as f32, oh as f32 / rh as f32);
    let mut kept = Vec::new();
    let mut dets = Vec::new();
    for i in 0..boxes.len() {
        if valid[i] == 0 {
            continue;
        }
        let b = &boxes[i];
        let clip = |v: f32, hi: usize| v.clamp(0.0, hi as f32);
        let bbox = [
            clip(b[0] * sx, ow),
            clip(b[1] * sy, oh),
            clip(b[2] * sx, ow),
            clip(b[3] * sy, oh),
        ];
        if bbox[2] - bbox[0] <= 0.0 || bbox[3] - bbox[1] <= 0.0 {
            continue;
        }
        kept.push(i as i64);
        dets.push(Detection {
            bbox,
            score: scores[i],
            class: usize::try_from(classes[i]).context("negative class index")?,
            mask: None,
        });
    }
    if !dets.is_empty() {
        let idx = Tensor::new(kept.as_slice(), &Device::Cpu)?;
        let masks = masks.index_select(&idx, 0)?;
        let flat: Vec<f32> = dets.iter().flat_map(|d| d.bbox).collect();
        let boxes = Tensor::from_vec(flat, (dets.len(), 4), &Device::Cpu)?;
        let paste = Op::PasteMasks(PasteMasks {
            height: oh,
            width: ow,
            threshold: MASK_THRESHOLD,
        });
        let pasted = kernels::execute(&paste, &[masks, boxes]).map_err(|e| anyhow::anyhow!("pasting masks: {e}"))?;
        let pasted = pasted[0].flatten_from(1)?.to_vec2::<u8>()?;
        for (d, m) in dets.iter_mut().zip(pasted) {
            d.mask = Some(m);
        }
    }
    let seconds = (slowest_first(&out.op_seconds), slowest_first(&out.scope_seconds));
    Ok((rgb, dets, seconds))
}

impl DetectSummary {
    pub fn to_text(&self) -> String {
        let mut s = format!("model    {} ({})  weights: {}\n", self.model, self.dtype, self.weights);
        for r in &self.images {
            s.push_str(&format!(
                "{}  id {}: {} detections in {:.2} s\n",
                r.image, r.image_id, r.detections, r.seconds
            ));
            let ops: Vec<String> = r
                .op_seconds
                .iter()
                .take(8)
                .map(|(k, v)| format!("{k} {v:.2}s"))
                .collect();
            s.push_str(&format!("         time by op: {}\n", ops.join(", ")));
        }
        for (img, why) in &self.failed {
            s.push_str(&format!("failed   {img}: {why}\n"));
        }
        s.push_str(&format!("wrote    {}\n", self.results.display()));
        s
    }
}
