//! Evaluating a trained model on a dataset split: detections for every image (as
//! `vitdet infer --out` computes them), then COCO AP and TIDE against the split's annotations.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use vitdet_models::ModelConfig;
use vitdet_runtime::ParamStore;

use crate::compile::{compile_config_with, inference_lowering, Target};
use crate::data::CocoDataset;
use crate::detect::{detect_one, Runner};
use crate::detections::{Categories, CocoResult, Detection};
use crate::eval::{evaluate, Detections, EvalReport, GroundTruth};

/// A dataset split in COCO layout: `DIR/annotations/instances_<split>.json` and `DIR/<split>/`.
pub fn split_paths(data: &Path, split: &str) -> (PathBuf, PathBuf) {
    (
        data.join("annotations").join(format!("instances_{split}.json")),
        data.join(split),
    )
}

/// The result of [`evaluate_split`].
pub struct SplitEval {
    pub report: EvalReport,
    /// COCO results for every image.
    pub results: Vec<CocoResult>,
    /// Detections per image (dataset order), for pictures.
    pub detections: Vec<Vec<Detection>>,
    pub categories: Categories,
    pub dataset: CocoDataset,
    pub seconds: f64,
}

/// Runs the detector `model` (its class count set from the dataset) with the weights in
/// `weights` (a weights file or a training checkpoint) on every image of `split` and evaluates
/// the detections. `on_image(done, total)` reports progress.
pub fn evaluate_split(
    model: &ModelConfig,
    weights: &Path,
    data: &Path,
    split: &str,
    runner: &Runner,
    on_image: &mut dyn FnMut(usize, usize),
) -> Result<SplitEval> {
    let (annotations, images) = split_paths(data, split);
    let dataset = CocoDataset::load(&annotations, &images)?;
    let mut model = model.clone();
    model.detector.num_classes = dataset.num_classes();
    let categories = Categories::from_dataset(&dataset);
    // The weights as the lowered graph stores them (converted to its dtypes on load).
    let square = compile_config_with(
        "",
        model.clone(),
        Target::Detector { image_hw: None },
        inference_lowering(runner.precision),
    )?;
    let params = ParamStore::load_safetensors(weights, &square.graph, &runner.device).with_context(|| {
        format!(
            "loading {} for {} classes",
            weights.display(),
            model.detector.num_classes
        )
    })?;
    let start = Instant::now();
    let mut results = Vec::new();
    let mut detections = Vec::new();
    for (i, image) in dataset.images.iter().enumerate() {
        let path = dataset.image_path(i);
        let (rgb, dets, _) =
            detect_one(&model, &params, &path, runner).with_context(|| format!("detecting on {}", path.display()))?;
        let (h, w) = (rgb.height() as usize, rgb.width() as usize);
        results.extend(crate::detections::coco_results(&dets, image.id, h, w, &categories));
        detections.push(dets);
        on_image(i + 1, dataset.images.len());
    }
    let seconds = start.elapsed().as_secs_f64();
    let gt = GroundTruth::load(&annotations)?;
    let dets = Detections::from_value(&serde_json::to_value(&results)?, "the model's detections", &gt)?;
    let report = evaluate(&gt, &dets)?;
    Ok(SplitEval {
        report,
        results,
        detections,
        categories,
        dataset,
        seconds,
    })
}
