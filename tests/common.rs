//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// A tensor's values as f32, flattened.
pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

pub fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Relative L2 error `|a - b| / |b|` and the largest absolute difference, computed in f64.
pub fn compare(ours: &Tensor, reference: &Tensor) -> (f64, f64) {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let a = ours.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = reference.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap();
    let num = diff
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let max = diff.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    (num / den.max(f64::MIN_POSITIVE), max)
}

/// Runs the `vitdet` binary.
pub fn vitdet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vitdet"))
        .args(args)
        .output()
        .expect("run vitdet")
}

pub fn ok(args: &[&str]) -> String {
    let out = vitdet(args);
    assert!(
        out.status.success(),
        "vitdet {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn fails(args: &[&str]) -> String {
    let out = vitdet(args);
    assert!(!out.status.success(), "vitdet {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// One synthetic training image (seed 9, no scale jitter or flip) as the inputs of a training
/// graph of side `s` with room for `max_gt` instances, and `cfg` with the dataset's classes.
pub fn train_inputs(
    cfg: &vitdet::models::ModelConfig,
    s: usize,
    max_gt: usize,
) -> (vitdet::models::ModelConfig, Vec<(&'static str, Tensor)>) {
    use vitdet::data::synthetic::{generate, SynthOptions};
    use vitdet::data::{collate, CocoDataset, LsjConfig, TrainLoader};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&SynthOptions {
        out: data.clone(),
        train: 1,
        val: 0,
        size: s,
        seed: 9,
    })
    .unwrap();
    let dataset = CocoDataset::load(data.join("annotations/instances_train.json"), data.join("train")).unwrap();
    let mut cfg = cfg.clone();
    cfg.detector.num_classes = dataset.num_classes();
    let lsj = LsjConfig {
        min_scale: 1.0,
        max_scale: 1.0,
        flip_prob: 0.0,
        ..LsjConfig::vitdet(s)
    };
    let loader = TrainLoader::new(dataset, lsj, 1, 0).unwrap();
    let batch = collate(&loader.samples(0).unwrap(), max_gt).unwrap();
    let inputs = vec![
        ("image", batch.images.clone()),
        ("gt_boxes", batch.gt_boxes.get(0).unwrap()),
        ("gt_classes", batch.gt_classes.get(0).unwrap()),
        ("gt_masks", batch.gt_masks.get(0).unwrap()),
        ("gt_valid", batch.gt_valid.get(0).unwrap()),
        (
            "seed",
            Tensor::new(&[17i64], &Device::Cpu).unwrap().reshape(()).unwrap(),
        ),
    ];
    (cfg, inputs)
}

/// `vitdet-tiny` compiled for `target` (f32; the config's image size and attention).
pub fn compile_tiny(target: vitdet::compile::Target) -> vitdet::compile::Compiled {
    vitdet::compile::compile(&vitdet::compile::CompileOptions {
        model: "vitdet-tiny".into(),
        image_size: None,
        attention: None,
        target,
    })
    .unwrap()
}
