//! The parameter store: loader errors, float-width conversion, atomic save, seeded init.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::*;
use vitdet_ir::ops::*;
use vitdet_ir::{Graph, TensorType};
use vitdet_runtime::{ParamStore, RuntimeError};

fn cpu() -> Device {
    Device::Cpu
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("vitdet-params-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn p(name: &str, shape: &[usize], init: Init) -> Parameter {
    Parameter {
        name: name.into(),
        ty: TensorType::f32(shape.to_vec()),
        init,
        trainable: true,
    }
}

/// A graph declaring these parameters (each feeds an output so the graph is complete).
fn graph_with(params: Vec<Parameter>) -> Graph {
    let mut g = Graph::new();
    for prm in params {
        let name = prm.name.clone();
        let v = g.add(prm, "", &[]).unwrap();
        g.set_output(&name, v);
    }
    g
}

fn two_param_graph() -> Graph {
    graph_with(vec![
        p("a.weight", &[2, 3], Init::Zeros),
        p("a.bias", &[2], Init::Zeros),
    ])
}

fn save(path: &PathBuf, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn f32t(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|i| i as f32 * 0.5 - 1.0).collect::<Vec<_>>(), shape, &cpu()).unwrap()
}

#[test]
fn loads_exact_keys_and_ignores_num_batches_tracked() {
    let d = TempDir::new("ok");
    let path = d.file("w.safetensors");
    let counter = Tensor::new(0i64, &cpu()).unwrap();
    save(
        &path,
        &[
            ("a.weight", f32t(&[2, 3])),
            ("a.bias", f32t(&[2])),
            ("a.norm.num_batches_tracked", counter),
        ],
    );
    let store = ParamStore::load_safetensors(&path, &two_param_graph(), &cpu()).unwrap();
    assert_eq!(store.len(), 2);
    assert_eq!(
        store.get("a.weight").unwrap().to_vec2::<f32>().unwrap(),
        f32t(&[2, 3]).to_vec2::<f32>().unwrap()
    );
}

#[test]
fn missing_keys() {
    let d = TempDir::new("missing");
    let path = d.file("w.safetensors");
    save(&path, &[("a.weight", f32t(&[2, 3]))]);
    let err = ParamStore::load_safetensors(&path, &two_param_graph(), &cpu()).unwrap_err();
    assert!(
        matches!(&err, RuntimeError::KeyMismatch { missing, unexpected, .. } if missing.len() == 1 && unexpected.is_empty()),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("`a.bias`") && msg.contains("w.safetensors"), "{msg}");

    // Long lists show the first 10 names and a count.
    let many = graph_with((0..13).map(|i| p(&format!("p{i:02}"), &[1], Init::Zeros)).collect());
    let path2 = d.file("empty.safetensors");
    save(&path2, &[("p00", f32t(&[1]))]);
    let msg = ParamStore::load_safetensors(&path2, &many, &cpu())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("12 parameter(s) missing"), "{msg}");
    assert!(
        msg.contains("`p10`") && !msg.contains("`p11`") && msg.contains("(2 more)"),
        "{msg}"
    );
}

#[test]
fn unexpected_keys() {
    let d = TempDir::new("unexpected");
    let path = d.file("w.safetensors");
    save(
        &path,
        &[
            ("a.weight", f32t(&[2, 3])),
            ("a.bias", f32t(&[2])),
            ("a.extra", f32t(&[1])),
        ],
    );
    let err = ParamStore::load_safetensors(&path, &two_param_graph(), &cpu()).unwrap_err();
    assert!(
        matches!(&err, RuntimeError::KeyMismatch { missing, unexpected, .. } if missing.is_empty() && unexpected.len() == 1),
        "{err}"
    );
    assert!(err.to_string().contains("`a.extra`"), "{err}");

    // Keys of modules the graph does not build at all are skipped, and listed.
    save(
        &path,
        &[
            ("a.weight", f32t(&[2, 3])),
            ("a.bias", f32t(&[2])),
            ("roi_heads.box_predictor.bias", f32t(&[3])),
        ],
    );
    let store = ParamStore::load_safetensors(&path, &two_param_graph(), &cpu()).unwrap();
    assert_eq!(store.skipped_keys(), ["roi_heads.box_predictor.bias".to_string()]);
    assert_eq!(store.len(), 2);

    // Both kinds at once are reported together.
    save(&path, &[("a.weight", f32t(&[2, 3])), ("a.extra", f32t(&[1]))]);
    let msg = ParamStore::load_safetensors(&path, &two_param_graph(), &cpu())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("1 parameter(s) missing: `a.bias`") && msg.contains("1 unexpected key(s): `a.extra`"),
        "{msg}"
    );
}

#[test]
fn wrong_shape() {
    let d = TempDir::new("shape");
    let path = d.file("w.safetensors");
    save(&path, &[("a.weight", f32t(&[3, 2])), ("a.bias", f32t(&[2]))]);
    let err = ParamStore::load_safetensors(&path, &two_param_graph(), &cpu()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "parameter `a.weight`: expected shape [2, 3], found [3, 2]"
    );
}

#[test]
fn wrong_dtype() {
    let d = TempDir::new("dtype");
    let path = d.file("w.safetensors");
    save(
        &path,
        &[
            ("a.weight", f32t(&[2, 3])),
            ("a.bias", Tensor::new(&[1i64, 2], &cpu()).unwrap()),
        ],
    );
    let err = ParamStore::load_safetensors(&path, &two_param_graph(), &cpu()).unwrap_err();
    assert_eq!(err.to_string(), "parameter `a.bias`: expected dtype f32, found i64");
}

#[test]
fn other_float_widths_are_converted() {
    let d = TempDir::new("widths");
    for dtype in [DType::F16, DType::BF16, DType::F64] {
        let path = d.file("w.safetensors");
        save(
            &path,
            &[
                ("a.weight", f32t(&[2, 3]).to_dtype(dtype).unwrap()),
                ("a.bias", f32t(&[2]).to_dtype(dtype).unwrap()),
            ],
        );
        let store = ParamStore::load_safetensors(&path, &two_param_graph(), &cpu()).unwrap();
        let w = store.get("a.weight").unwrap();
        assert_eq!(w.dtype(), DType::F32, "{dtype:?} converted to the graph's f32");
        // The test values (multiples of 0.5 in [-1, 1.5]) are exact in every width.
        assert_eq!(w.to_vec2::<f32>().unwrap(), f32t(&[2, 3]).to_vec2::<f32>().unwrap());
    }
}

#[test]
fn unreadable_and_corrupt_files() {
    let d = TempDir::new("corrupt");
    let g = two_param_graph();
    let err = ParamStore::load_safetensors(d.file("nope.safetensors"), &g, &cpu()).unwrap_err();
    assert!(
        matches!(err, RuntimeError::WeightsFile { .. }) && err.to_string().contains("nope.safetensors"),
        "{err}"
    );

    let garbage = d.file("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let err = ParamStore::load_safetensors(&garbage, &g, &cpu()).unwrap_err();
    assert!(
        matches!(err, RuntimeError::WeightsFile { .. }) && err.to_string().contains("garbage.safetensors"),
        "{err}"
    );

    // A valid file cut short.
    let good = d.file("good.safetensors");
    save(&good, &[("a.weight", f32t(&[2, 3])), ("a.bias", f32t(&[2]))]);
    let bytes = std::fs::read(&good).unwrap();
    let cut = d.file("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    let err = ParamStore::load_safetensors(&cut, &g, &cpu()).unwrap_err();
    assert!(
        matches!(err, RuntimeError::WeightsFile { .. }) && err.to_string().contains("cut.safetensors"),
        "{err}"
    );
}

#[test]
fn save_is_atomic_and_round_trips() {
    let d = TempDir::new("save");
    let g = graph_with(vec![
        p("w", &[3, 4], Init::Normal { std: 1.0 }),
        Parameter {
            name: "h".into(),
            ty: TensorType::new(vitdet_ir::DType::F16, [5]),
            init: Init::Uniform { bound: 2.0 },
            trainable: true,
        },
        Parameter {
            name: "d".into(),
            ty: TensorType::new(vitdet_ir::DType::F64, [2]),
            init: Init::Ones,
            trainable: false,
        },
    ]);
    let store = ParamStore::init_random(&g, 7, &cpu()).unwrap();
    let path = d.file("weights.safetensors");
    std::fs::write(&path, b"old contents").unwrap();
    store.save_safetensors(&path).unwrap();
    let names: Vec<String> = std::fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["weights.safetensors"], "no temporary file is left behind");
    let back = ParamStore::load_safetensors(&path, &g, &cpu()).unwrap();
    for (name, t) in store.iter() {
        let u = back.get(name).unwrap();
        assert_eq!(u.dtype(), t.dtype());
        assert_close(&Nd::from_tensor(u), &Nd::from_tensor(t), 0.0, 0.0, name);
    }
    // Writing into a missing directory fails with the path in the message.
    let err = store.save_safetensors(d.file("no/such/dir/w.safetensors")).unwrap_err();
    assert!(
        matches!(err, RuntimeError::WeightsWrite { .. }) && err.to_string().contains("w.safetensors"),
        "{err}"
    );
}

#[test]
fn init_random_is_seeded_per_name() {
    let base = vec![
        p("a", &[64], Init::Normal { std: 1.0 }),
        p("b", &[32], Init::TruncNormal { std: 0.02 }),
    ];
    let g1 = graph_with(base.clone());
    let mut more = vec![p("0_first", &[16], Init::Normal { std: 1.0 })];
    more.extend(base);
    let g2 = graph_with(more);
    let s1 = ParamStore::init_random(&g1, 42, &cpu()).unwrap();
    let s1b = ParamStore::init_random(&g1, 42, &cpu()).unwrap();
    let s2 = ParamStore::init_random(&g2, 42, &cpu()).unwrap();
    let s3 = ParamStore::init_random(&g1, 43, &cpu()).unwrap();
    let v = |s: &ParamStore, n: &str| s.get(n).unwrap().to_vec1::<f32>().unwrap();
    for n in ["a", "b"] {
        assert_eq!(v(&s1, n), v(&s1b, n), "same seed, same values");
        assert_eq!(v(&s1, n), v(&s2, n), "adding a parameter does not change `{n}`");
        assert_ne!(v(&s1, n), v(&s3, n), "another seed changes `{n}`");
    }
    assert_ne!(v(&s1, "a")[..32], v(&s1, "b")[..], "names get different streams");
}

#[test]
fn init_kinds_follow_their_distributions() {
    let n = 20_000;
    let g = graph_with(vec![
        p("zeros", &[3], Init::Zeros),
        p("ones", &[3], Init::Ones),
        p("normal", &[n], Init::Normal { std: 0.5 }),
        p("trunc", &[n], Init::TruncNormal { std: 0.02 }),
        p("uniform", &[n], Init::Uniform { bound: 0.1 }),
    ]);
    let s = ParamStore::init_random(&g, 1, &cpu()).unwrap();
    let v = |name: &str| -> Vec<f64> {
        s.get(name)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| x as f64)
            .collect()
    };
    assert_eq!(v("zeros"), [0.0; 3]);
    assert_eq!(v("ones"), [1.0; 3]);
    let stats = |x: &[f64]| {
        let m = x.iter().sum::<f64>() / x.len() as f64;
        (
            m,
            (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / x.len() as f64).sqrt(),
        )
    };
    // n = 20000 samples: the mean's standard error is std / 141, the std's about std / 200.
    let (m, sd) = stats(&v("normal"));
    assert!(m.abs() < 0.02 && (sd - 0.5).abs() < 0.015, "normal: mean {m}, std {sd}");
    let t = v("trunc");
    assert!(t.iter().all(|x| x.abs() <= 0.04 + 1e-9), "truncated at 2 std");
    let (m, sd) = stats(&t);
    // A standard normal truncated to [-2, 2] has std 0.8796.
    assert!(
        m.abs() < 0.001 && (sd - 0.02 * 0.8796).abs() < 0.0005,
        "trunc: mean {m}, std {sd}"
    );
    let u = v("uniform");
    assert!(u.iter().all(|x| x.abs() <= 0.1));
    let (m, sd) = stats(&u);
    assert!(
        m.abs() < 0.002 && (sd - 0.1 / 3f64.sqrt()).abs() < 0.002,
        "uniform: mean {m}, std {sd}"
    );
}

#[test]
fn random_init_of_an_integer_parameter_is_an_error() {
    let g = graph_with(vec![Parameter {
        name: "idx".into(),
        ty: TensorType::new(vitdet_ir::DType::I64, [4]),
        init: Init::Normal { std: 1.0 },
        trainable: false,
    }]);
    let err = ParamStore::init_random(&g, 0, &cpu()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "parameter `idx`: cannot initialize: random init of a i64 tensor"
    );
}
