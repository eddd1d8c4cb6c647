//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

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
