//! Training checkpoints: round trip, bit-exact resume, damaged files, failed writes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use vitdet_ir::ops::{Init, Parameter};
use vitdet_ir::{Graph, TensorType};
use vitdet_runtime::checkpoint::{self, CheckpointMeta, FORMAT_VERSION};
use vitdet_runtime::optim::{AdamW, AdamWConfig, GroupConfig, ParamGroups, ParamInfo, WarmupCosine};
use vitdet_runtime::ParamStore;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("vitdet-checkpoint-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const NAMES: [(&str, &[usize]); 4] = [
    ("backbone.net.pos_embed", &[1, 2, 2, 3]),
    ("backbone.net.blocks.0.attn.qkv.weight", &[9, 3]),
    ("backbone.net.blocks.1.norm1.bias", &[3]),
    ("roi_heads.box_predictor.cls_score.weight", &[2, 3]),
];

fn tensor(shape: &[usize], seed: usize, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|k| ((seed * 31 + k) as f32 * 0.61).sin() * scale).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The trainable parameters plus two buffers of other dtypes, as a model's store holds them.
fn start() -> ParamStore {
    let mut store = ParamStore::from_tensors(
        NAMES
            .iter()
            .enumerate()
            .map(|(i, (n, s))| (n.to_string(), tensor(s, i, 1.0))),
    );
    store.insert(
        "backbone.fpn_lateral2.norm.running_var",
        Tensor::new(&[0.5f64, 1.5, 2.5][..], &Device::Cpu).unwrap(),
    );
    store.insert("backbone.mask", Tensor::new(&[1u8, 0, 1][..], &Device::Cpu).unwrap());
    store
}

fn groups() -> ParamGroups {
    let infos: Vec<ParamInfo> = NAMES.iter().map(|(n, s)| ParamInfo::new(*n, s.to_vec())).collect();
    ParamGroups::new(&infos, GroupConfig::paper(2)).unwrap()
}

/// Gradients of iteration `i` (the last parameter skips odd iterations, so step counts differ).
fn grads(i: u64) -> Vec<(String, Tensor)> {
    NAMES
        .iter()
        .enumerate()
        .filter(|(k, _)| !(*k == 3 && i % 2 == 1))
        .map(|(k, (n, s))| (n.to_string(), tensor(s, 100 + 7 * i as usize + k, 0.1 + i as f32)))
        .collect()
}

fn train(params: &mut ParamStore, opt: &mut AdamW, from: u64, to: u64) {
    let schedule = WarmupCosine::new(10, 3).unwrap();
    let groups = groups();
    for i in from..to {
        opt.step_groups(params, &grads(i), &groups, schedule.multiplier(i).unwrap())
            .unwrap();
    }
}

fn meta(iteration: u64) -> CheckpointMeta {
    CheckpointMeta {
        iteration,
        seed: 0xdead_beef_0123,
        model_config: serde_json::json!({"family": "vitdet", "depth": 2, "drop_path": 0.1}),
        grad_scaler: None,
    }
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

fn assert_same_store(a: &ParamStore, b: &ParamStore) {
    let names = |s: &ParamStore| s.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b));
    for (n, t) in a.iter() {
        let u = b.get(n).unwrap();
        assert_eq!((t.dtype(), t.dims()), (u.dtype(), u.dims()), "{n}");
        assert_eq!(bytes(t), bytes(u), "{n} differs");
    }
}

fn assert_same_optimizer(a: &AdamW, b: &AdamW) {
    assert_eq!(a.config(), b.config());
    let sa: Vec<_> = a.states().collect();
    let sb: Vec<_> = b.states().collect();
    assert_eq!(sa.len(), sb.len());
    for ((na, x), (nb, y)) in sa.into_iter().zip(sb) {
        assert_eq!(na, nb);
        assert_eq!(x.step, y.step, "{na}");
        assert_eq!(bytes(&x.exp_avg), bytes(&y.exp_avg), "{na} exp_avg");
        assert_eq!(bytes(&x.exp_avg_sq), bytes(&y.exp_avg_sq), "{na} exp_avg_sq");
    }
}

#[test]
fn save_load_round_trip() {
    let dir = TempDir::new("1");
    let path = dir.path().join("ckpt.safetensors");
    let mut params = start();
    let config = AdamWConfig {
        beta1: 0.85,
        beta2: 0.995,
        eps: 1e-7,
    };
    let mut opt = AdamW::new(config).unwrap();
    train(&mut params, &mut opt, 0, 3);
    checkpoint::save(&path, &params, &opt, &meta(3)).unwrap();

    let loaded = checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_same_store(&params, &loaded.params);
    assert_same_optimizer(&opt, &loaded.optimizer);
    assert_eq!(loaded.meta, meta(3));
    // Iterations 0..3 with the last parameter skipping odd ones: steps 3, 3, 3, 2.
    let steps: Vec<u64> = loaded.optimizer.states().map(|(_, s)| s.step).collect();
    assert_eq!(steps, vec![3, 3, 3, 2]);

    // The metadata a user can inspect with any safetensors reader.
    let raw = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
    let m = header.metadata().clone().unwrap();
    assert_eq!(m["format"], "vitdet-checkpoint");
    assert_eq!(m["format_version"], FORMAT_VERSION.to_string());
    assert_eq!(m["iteration"], "3");
    let opt_meta: serde_json::Value = serde_json::from_str(&m["optimizer"]).unwrap();
    assert_eq!(
        opt_meta,
        serde_json::json!({"type": "adamw", "beta1": 0.85, "beta2": 0.995, "eps": 1e-7})
    );
}

/// A float16 run's loss scaler travels in the metadata (torch's state_dict keys) and comes back
/// exactly; runs without one have no `grad_scaler` entry.
#[test]
fn grad_scaler_state_round_trips() {
    use vitdet_runtime::optim::grad_scaler::{GradScaler, GradScalerConfig};
    let dir = TempDir::new("scaler");
    let path = dir.path().join("ckpt.safetensors");
    let params = start();
    let opt = AdamW::new(AdamWConfig::default()).unwrap();
    let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
    scaler.update(true);
    scaler.update(false);
    let with = CheckpointMeta {
        grad_scaler: Some(scaler.state()),
        ..meta(2)
    };
    checkpoint::save(&path, &params, &opt, &with).unwrap();
    let loaded = checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.meta, with);
    assert_eq!(
        GradScaler::from_state(loaded.meta.grad_scaler.unwrap()).unwrap(),
        scaler
    );
    let raw = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
    let entry: serde_json::Value = serde_json::from_str(&header.metadata().clone().unwrap()["grad_scaler"]).unwrap();
    assert_eq!(entry["scale"], 32768.0);
    assert_eq!(entry["_growth_tracker"], 1);

    checkpoint::save(&path, &params, &opt, &meta(2)).unwrap();
    let raw = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
    assert!(!header.metadata().clone().unwrap().contains_key("grad_scaler"));
    assert_eq!(checkpoint::load(&path, &Device::Cpu).unwrap().meta.grad_scaler, None);
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
    let dir = TempDir::new("2");
    let path = dir.path().join("ckpt.safetensors");

    let mut straight = start();
    let mut straight_opt = AdamW::new(AdamWConfig::default()).unwrap();
    train(&mut straight, &mut straight_opt, 0, 10);

    let mut first = start();
    let mut first_opt = AdamW::new(AdamWConfig::default()).unwrap();
    train(&mut first, &mut first_opt, 0, 5);
    checkpoint::save(&path, &first, &first_opt, &meta(5)).unwrap();
    drop((first, first_opt));

    let resumed = checkpoint::load(&path, &Device::Cpu).unwrap();
    let (mut params, mut opt) = (resumed.params, resumed.optimizer);
    train(&mut params, &mut opt, resumed.meta.iteration, 10);

    assert_same_store(&straight, &params);
    assert_same_optimizer(&straight_opt, &opt);
    // And training did move the parameters (the comparison is not between two unchanged stores).
    assert_ne!(
        bytes(straight.get(NAMES[1].0).unwrap()),
        bytes(start().get(NAMES[1].0).unwrap())
    );
}

/// A graph that declares the trainable parameters and the f64 buffer (not the u8 one).
fn graph() -> Graph {
    let mut g = Graph::new();
    for (name, shape) in NAMES {
        g.add(
            Parameter {
                name: name.into(),
                ty: TensorType::f32(shape.to_vec()),
                init: Init::Zeros,
                trainable: true,
            },
            "",
            &[],
        )
        .unwrap();
    }
    g.add(
        Parameter {
            name: "backbone.fpn_lateral2.norm.running_var".into(),
            ty: TensorType::new(vitdet_ir::DType::F64, vec![3]),
            init: Init::Ones,
            trainable: false,
        },
        "",
        &[],
    )
    .unwrap();
    g
}

#[test]
fn a_checkpoint_is_also_a_weights_file() {
    let dir = TempDir::new("3");
    let path = dir.path().join("ckpt.safetensors");
    let mut params = start();
    params.insert("backbone.mask", Tensor::new(&[1u8][..], &Device::Cpu).unwrap());
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    train(&mut params, &mut opt, 0, 2);
    // Drop the tensor the graph does not declare, so the weights match the graph exactly.
    let params = ParamStore::from_tensors(
        params
            .iter()
            .filter(|(n, _)| *n != "backbone.mask")
            .map(|(n, t)| (n.to_string(), t.clone())),
    );
    checkpoint::save(&path, &params, &opt, &meta(2)).unwrap();

    let g = graph();
    let weights = ParamStore::load_safetensors(&path, &g, &Device::Cpu).unwrap();
    assert_same_store(&params, &weights);
    // Optimizer state is reported as skipped (no model builds an `optimizer` module).
    let skipped = weights.skipped_keys();
    assert_eq!(skipped.len(), 3 * NAMES.len());
    assert!(skipped.iter().all(|k| k.starts_with("optimizer.")), "{skipped:?}");
    checkpoint::load(&path, &Device::Cpu).unwrap().check(&g).unwrap();
}

fn saved(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("ckpt.safetensors");
    let mut params = start();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    train(&mut params, &mut opt, 0, 2);
    checkpoint::save(&path, &params, &opt, &meta(2)).unwrap();
    path
}

fn load_err(path: &Path) -> String {
    checkpoint::load(path, &Device::Cpu).unwrap_err().to_string()
}

#[test]
fn damaged_files_are_refused_with_the_file_and_the_problem() {
    let dir = TempDir::new("4");
    let path = saved(dir.path());
    let good = std::fs::read(&path).unwrap();
    let shown = format!("cannot read checkpoint `{}`", path.display());

    // Truncated (a write cut short by a crash without the atomic rename, a partial copy).
    std::fs::write(&path, &good[..good.len() - 100]).unwrap();
    let e = load_err(&path);
    assert!(e.starts_with(&shown) && e.contains("truncated or corrupt"), "{e}");

    // One flipped bit in the tensor data: the header still parses, the checksum does not match.
    let mut flipped = good.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x10;
    std::fs::write(&path, &flipped).unwrap();
    let e = load_err(&path);
    assert!(e.starts_with(&shown) && e.contains("checksum mismatch"), "{e}");

    // Missing file.
    let e = load_err(&dir.path().join("nope.safetensors"));
    assert!(e.contains("nope.safetensors") && e.contains("No such file"), "{e}");

    // A plain weights file is not a checkpoint.
    start().save_safetensors(&path).unwrap();
    let e = load_err(&path);
    assert!(e.starts_with(&shown) && e.contains("`format` missing"), "{e}");
}

/// The file format's checksum (see `checkpoint`'s module doc), rebuilt here so a test can write
/// a well-formed file whose optimizer state is incomplete.
fn checksum(tensors: &[(String, safetensors::tensor::TensorView<'_>)]) -> u64 {
    fn word(h: &mut u64, w: u64) {
        let x = (*h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *h = x ^ (x >> 29);
    }
    fn bytes(h: &mut u64, b: &[u8]) {
        word(h, b.len() as u64);
        for c in b.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            word(h, u64::from_le_bytes(w));
        }
    }
    let mut h = 0x243f_6a88_85a3_08d3;
    for (name, v) in tensors {
        bytes(&mut h, name.as_bytes());
        bytes(&mut h, format!("{:?}", v.dtype()).as_bytes());
        for &d in v.shape() {
            word(&mut h, d as u64);
        }
        word(&mut h, u64::MAX);
        bytes(&mut h, v.data());
    }
    h
}

/// Rewrites the checkpoint at `path` without `drop_key`, with a valid checksum.
fn rewrite_without(path: &Path, drop_key: &str) {
    let raw = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
    let mut meta: HashMap<String, String> = header.metadata().clone().unwrap();
    let mut kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != drop_key).collect();
    assert!(kept.len() < st.len(), "`{drop_key}` not in the checkpoint");
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    meta.insert("checksum".into(), format!("{:016x}", checksum(&kept)));
    let out = safetensors::tensor::serialize(kept, &Some(meta)).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn incomplete_optimizer_state_is_refused() {
    let dir = TempDir::new("5");
    let name = NAMES[1].0;
    for (drop_key, expected) in [
        (
            format!("optimizer.exp_avg_sq.{name}"),
            format!("`optimizer.exp_avg_sq.{name}` missing"),
        ),
        (
            format!("optimizer.step.{name}"),
            format!("`optimizer.step.{name}` missing"),
        ),
        (
            format!("optimizer.exp_avg.{name}"),
            format!("`optimizer.exp_avg.{name}` missing"),
        ),
        (
            name.to_string(),
            format!("optimizer state for `{name}`, which is not a parameter"),
        ),
    ] {
        let path = saved(dir.path());
        // Sanity: the untouched file loads, so the error below comes from the removed key.
        checkpoint::load(&path, &Device::Cpu).unwrap();
        rewrite_without(&path, &drop_key);
        let e = load_err(&path);
        assert!(e.contains(&path.display().to_string()) && e.contains(&expected), "{e}");
    }
}

#[test]
fn failed_writes_leave_the_previous_checkpoint_intact() {
    let dir = TempDir::new("6");
    let path = saved(dir.path());
    let before = std::fs::read(&path).unwrap();

    let mut params = start();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    train(&mut params, &mut opt, 0, 4);

    // Into a directory that does not exist.
    let missing = dir.path().join("no/such/dir/ckpt.safetensors");
    let e = checkpoint::save(&missing, &params, &opt, &meta(4))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot write checkpoint") && e.contains("no/such/dir"),
        "{e}"
    );
    assert!(!missing.exists());

    // A write that fails midway over an existing checkpoint: the temporary file cannot be
    // created (a directory sits at its name; this fails even for root, unlike a read-only
    // directory). The previous checkpoint must be untouched and still load.
    let tmp = dir.path().join(format!(".ckpt.safetensors.tmp-{}", std::process::id()));
    std::fs::create_dir(&tmp).unwrap();
    let e = checkpoint::save(&path, &params, &opt, &meta(4))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(checkpoint::load(&path, &Device::Cpu).unwrap().meta.iteration, 2);

    // Once the obstacle is gone the same save succeeds and replaces it.
    std::fs::remove_dir(&tmp).unwrap();
    checkpoint::save(&path, &params, &opt, &meta(4)).unwrap();
    assert_eq!(checkpoint::load(&path, &Device::Cpu).unwrap().meta.iteration, 4);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "ckpt.safetensors")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn inconsistent_state_is_refused_before_writing() {
    let dir = TempDir::new("7");
    let path = dir.path().join("ckpt.safetensors");
    let mut params = start();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    train(&mut params, &mut opt, 0, 1);

    let mut reserved = params.clone();
    reserved.insert("optimizer.lr", Tensor::new(1f32, &Device::Cpu).unwrap());
    let e = checkpoint::save(&path, &reserved, &opt, &meta(1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`optimizer.lr`") && e.contains("reserved"), "{e}");

    // State for a parameter the store no longer holds.
    let fewer = ParamStore::from_tensors(
        params
            .iter()
            .filter(|(n, _)| *n != NAMES[0].0)
            .map(|(n, t)| (n.to_string(), t.clone())),
    );
    let e = checkpoint::save(&path, &fewer, &opt, &meta(1)).unwrap_err().to_string();
    assert!(
        e.contains(NAMES[0].0) && e.contains("not in the parameter store"),
        "{e}"
    );
    assert!(!path.exists());
}
