//! The training graph of both tiny families: structure (inputs, loss outputs, parameters equal
//! to the inference detector's, drop path and BatchNorm in training form) and runs on the CPU
//! runtime with a synthetic image and two gt instances.
//!
//! Value checks at initialization, each pinned by zeroing a predictor so the expected value is
//! exact (f32 rounding aside: tolerance 1e-5 relative, a few ulp of sums of a few hundred f32
//! terms accumulated in f64):
//! * `loss_rpn_cls`: zero objectness logits give BCE = ln 2 on every sampled anchor; the sum is
//!   divided by 256 and the image has far more than 256 negatives, so the loss is ln 2 exactly
//!   when (and only when) exactly 256 anchors were sampled and the divisor is 256.
//! * `loss_cls`: zero class logits give cross-entropy ln(K + 1) = ln 81 on every RoI, so its
//!   mean over the sampled RoIs is ln 81 whatever their number.
//! * `loss_mask`: zero mask logits give BCE = ln 2 on every pixel, so the mean over the
//!   foreground pixels is ln 2 (and it is 0 without foreground).
//! * without valid gt: no positive anchor and no foreground RoI, so `loss_rpn_loc`,
//!   `loss_box_reg` and `loss_mask` are exactly 0.

use std::collections::BTreeMap;

use vitdet_ir::ops::DropPathMask;
use vitdet_ir::{Graph, Op};
use vitdet_models::{
    build_detector, build_detector_training, ModelConfig, BUFFER_UPDATE_PREFIX, GT_BOXES, GT_CLASSES, GT_MASKS,
    GT_VALID, LOSS_NAMES, SEED,
};
use vitdet_runtime::{Device, ParamStore, Tensor};

const FAMILIES: [&str; 2] = ["vitdet-tiny", "vit-tiny"];
const MAX_GT: usize = 3;
const LN2: f64 = std::f64::consts::LN_2;

fn params(g: &Graph) -> BTreeMap<String, (Vec<usize>, bool)> {
    g.parameters()
        .map(|(_, p)| (p.name.clone(), (p.ty.shape.clone(), p.trainable)))
        .collect()
}

fn tiny(name: &str) -> ModelConfig {
    ModelConfig::preset(name).unwrap()
}

#[test]
fn training_graph_structure() {
    for name in FAMILIES {
        let mut cfg = tiny(name);
        cfg.drop_path_rate = 0.3;
        let g = build_detector_training(&cfg, [96, 128], MAX_GT).unwrap();
        g.verify().unwrap();
        // Same parameters and buffers as the inference detector: checkpoints interchange.
        assert_eq!(params(&g), params(&build_detector(&cfg).unwrap()), "{name}");
        let inputs: BTreeMap<&str, String> = g.inputs().map(|(_, n, t)| (n, t.to_string())).collect();
        let want: BTreeMap<&str, String> = [
            ("image", "f32[1,3,128,128]"),
            (GT_BOXES, "f32[3,4]"),
            (GT_CLASSES, "i64[3]"),
            (GT_MASKS, "u8[3,128,128]"),
            (GT_VALID, "u8[3]"),
            (SEED, "i64[]"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        assert_eq!(inputs, want, "{name}");
        for loss in LOSS_NAMES {
            let o = g.outputs.iter().find(|o| o.name == loss).unwrap();
            assert_eq!(g.value_type(o.value).to_string(), "f32[]", "{name}: {loss}");
        }
        // Drop path: two masks per block with a positive rate, detectron2's linear schedule
        // (block 0 has rate 0 and none).
        let mut rates: Vec<f64> = g
            .graph
            .node_weights()
            .filter_map(|n| match &n.op {
                Op::DropPathMask(DropPathMask { rate, .. }) => Some(*rate),
                _ => None,
            })
            .collect();
        rates.dedup();
        let want: Vec<f64> = (1..cfg.depth).map(|i| cfg.drop_path_at(i)).collect();
        assert_eq!(rates, want, "{name}: drop path rates");
        assert!(!g
            .graph
            .node_weights()
            .any(|n| matches!(n.op, Op::DropPath(_) | Op::BatchNorm(_))));
        // One update output per BatchNorm buffer (the vit family's FPN and heads).
        let updates: Vec<String> = g
            .outputs
            .iter()
            .filter_map(|o| o.name.strip_prefix(BUFFER_UPDATE_PREFIX).map(str::to_string))
            .collect();
        let buffers: Vec<String> = g
            .parameters()
            .filter(|(_, p)| !p.trainable)
            .map(|(_, p)| p.name.clone())
            .collect();
        let (mut u, mut bf) = (updates.clone(), buffers.clone());
        u.sort();
        bf.sort();
        assert_eq!(u, bf, "{name}: updated buffers");
        assert_eq!(buffers.is_empty(), name == "vitdet-tiny");
    }
}

#[test]
fn bad_arguments_are_errors() {
    let cfg = tiny("vitdet-tiny");
    for (hw, g) in [([0, 128], 2), ([128, 129], 2), ([128, 128], 0)] {
        let e = build_detector_training(&cfg, hw, g).unwrap_err().to_string();
        assert!(e.contains("image size") || e.contains("max_gt"), "{e}");
    }
}

/// A 128x128 image with two objects (rectangles brighter than a noisy background), their
/// boxes, classes and masks, and a padding row.
fn sample(valid: [u8; 3]) -> Vec<(&'static str, Tensor)> {
    let dev = Device::Cpu;
    let s = 128;
    let objects = [([20usize, 30, 70, 90], 3i64), ([60, 10, 120, 50], 17)];
    let mut img = Tensor::randn(0f32, 0.3, (1, 3, s, s), &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut masks = vec![0u8; MAX_GT * s * s];
    for (g, ([x0, y0, x1, y1], _)) in objects.iter().enumerate() {
        for y in *y0..*y1 {
            for x in *x0..*x1 {
                masks[g * s * s + y * s + x] = 1;
                for c in 0..3 {
                    img[c * s * s + y * s + x] += 1.0 + c as f32 * 0.5;
                }
            }
        }
    }
    let mut boxes = vec![0f32; MAX_GT * 4];
    let mut classes = vec![0i64; MAX_GT];
    for (g, (b, c)) in objects.iter().enumerate() {
        for k in 0..4 {
            boxes[4 * g + k] = b[k] as f32;
        }
        classes[g] = *c;
    }
    vec![
        ("image", Tensor::from_vec(img, (1, 3, s, s), &dev).unwrap()),
        (GT_BOXES, Tensor::from_vec(boxes, (MAX_GT, 4), &dev).unwrap()),
        (GT_CLASSES, Tensor::from_vec(classes, MAX_GT, &dev).unwrap()),
        (GT_MASKS, Tensor::from_vec(masks, (MAX_GT, s, s), &dev).unwrap()),
        (GT_VALID, Tensor::from_vec(valid.to_vec(), MAX_GT, &dev).unwrap()),
    ]
}

/// Runs the graph and returns the losses by name (and the full output).
fn losses(g: &Graph, params: &ParamStore, inputs: &[(&'static str, Tensor)], seed: i64) -> BTreeMap<String, f64> {
    let mut feed: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (*n, t.clone())).collect();
    feed.push((SEED, Tensor::new(seed, &Device::Cpu).unwrap()));
    let out = vitdet_runtime::run(g, params, &feed, &Device::Cpu).unwrap();
    LOSS_NAMES
        .iter()
        .map(|&n| {
            let t = out.get(n).unwrap();
            assert_eq!(t.dtype(), vitdet_runtime::CandleDType::F32);
            (
                n.to_string(),
                t.to_dtype(vitdet_runtime::CandleDType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
            )
        })
        .collect()
}

/// Zeroes the weight and bias of the listed predictors.
fn zero(params: &mut ParamStore, modules: &[&str]) {
    for m in modules {
        for leaf in ["weight", "bias"] {
            let name = format!("{m}.{leaf}");
            let t = params.get(&name).unwrap_or_else(|| panic!("no parameter {name}"));
            let z = t.zeros_like().unwrap();
            params.insert(name, z);
        }
    }
}

fn rel_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "{what}: got {got}, want {want}"
    );
}

#[test]
fn training_graph_runs_and_losses_are_meaningful() {
    for name in FAMILIES {
        let mut cfg = tiny(name);
        cfg.drop_path_rate = 0.2;
        let k = cfg.detector.num_classes as f64;
        let g = build_detector_training(&cfg, [128, 128], MAX_GT).unwrap();
        let mut params = ParamStore::init_random(&g, 5, &Device::Cpu).unwrap();
        let data = sample([1, 1, 0]);

        // Random init: every loss finite and positive (two gt boxes: low-quality matching
        // gives positive anchors, appended gt gives foreground RoIs), `loss` is their sum.
        let l = losses(&g, &params, &data, 1);
        for (n, v) in &l {
            assert!(v.is_finite() && *v > 0.0, "{name}: {n} = {v}");
        }
        let parts: f64 = LOSS_NAMES[..5].iter().map(|n| l[*n]).sum();
        rel_close(l["loss"], parts, &format!("{name}: loss is the sum"));
        // Reproducible from the seed; another seed draws other samples and drop-path masks.
        assert_eq!(losses(&g, &params, &data, 1), l, "{name}: same seed");
        assert_ne!(losses(&g, &params, &data, 2), l, "{name}: another seed");

        // Zero predictors: exact values (see the module doc).
        zero(
            &mut params,
            &[
                "proposal_generator.rpn_head.objectness_logits",
                "roi_heads.box_predictor.cls_score",
                "roi_heads.mask_head.predictor",
            ],
        );
        let l = losses(&g, &params, &data, 3);
        rel_close(l["loss_rpn_cls"], LN2, &format!("{name}: loss_rpn_cls"));
        rel_close(l["loss_cls"], (k + 1.0).ln(), &format!("{name}: loss_cls"));
        rel_close(l["loss_mask"], LN2, &format!("{name}: loss_mask"));
        assert!(l["loss_rpn_loc"] > 0.0 && l["loss_box_reg"] > 0.0, "{name}: {l:?}");

        // No valid gt: only negatives and background.
        let l = losses(&g, &params, &sample([0, 0, 0]), 3);
        rel_close(l["loss_rpn_cls"], LN2, &format!("{name}: loss_rpn_cls without gt"));
        rel_close(l["loss_cls"], (k + 1.0).ln(), &format!("{name}: loss_cls without gt"));
        for n in ["loss_rpn_loc", "loss_box_reg", "loss_mask"] {
            assert_eq!(l[n], 0.0, "{name}: {n} without gt");
        }
    }
}

#[test]
fn batch_norm_updates_its_running_statistics() {
    let cfg = tiny("vit-tiny");
    let g = build_detector_training(&cfg, [128, 128], MAX_GT).unwrap();
    let params = ParamStore::init_random(&g, 5, &Device::Cpu).unwrap();
    let mut feed: Vec<(&str, Tensor)> = sample([1, 1, 0]);
    feed.push((SEED, Tensor::new(0i64, &Device::Cpu).unwrap()));
    let out = vitdet_runtime::run(&g, &params, &feed, &Device::Cpu).unwrap();
    let name = "backbone.fpn_output2.norm.running_var";
    let new = out.get(&format!("{BUFFER_UPDATE_PREFIX}{name}")).unwrap();
    let old = params.get(name).unwrap();
    assert_eq!(new.dims(), old.dims());
    assert_eq!(new.dtype(), vitdet_runtime::CandleDType::F32);
    // momentum 0.1 towards the batch variance: moved, and still positive.
    let (n, o) = (new.to_vec1::<f32>().unwrap(), old.to_vec1::<f32>().unwrap());
    assert!(n.iter().zip(&o).any(|(a, b)| a != b) && n.iter().all(|&v| v > 0.0));
}

/// Without foreground RoIs detectron2's mask head runs on no rows, and PyTorch's BatchNorm
/// leaves its running statistics alone on an empty batch: the mask head's must come out of the
/// step bit for bit as they went in, while the rest of the model's still move. With
/// foreground, the mask head's move too.
#[test]
fn mask_head_batch_norm_statistics_stay_without_foreground() {
    let cfg = tiny("vit-tiny");
    let g = build_detector_training(&cfg, [128, 128], MAX_GT).unwrap();
    let params = ParamStore::init_random(&g, 5, &Device::Cpu).unwrap();
    let updates: Vec<String> = g
        .outputs
        .iter()
        .filter_map(|o| o.name.strip_prefix(BUFFER_UPDATE_PREFIX).map(str::to_string))
        .collect();
    let in_mask_head = |n: &String| n.starts_with("roi_heads.mask_head.");
    assert!(updates.iter().filter(|n| in_mask_head(n)).count() >= 2, "{updates:?}");
    assert!(updates.iter().any(|n| !in_mask_head(n)), "{updates:?}");
    for (valid, foreground) in [([0, 0, 0], false), ([1, 1, 0], true)] {
        let mut feed = sample(valid);
        feed.push((SEED, Tensor::new(0i64, &Device::Cpu).unwrap()));
        let out = vitdet_runtime::run(&g, &params, &feed, &Device::Cpu).unwrap();
        let fg = out.get("roi_head/num_fg_samples").unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(fg > 0.0, foreground, "valid {valid:?}: {fg} foreground RoIs");
        for name in &updates {
            let new = out.get(&format!("{BUFFER_UPDATE_PREFIX}{name}")).unwrap();
            let new = new.to_vec1::<f32>().unwrap();
            let old = params.get(name).unwrap().to_vec1::<f32>().unwrap();
            let moved = new.iter().zip(&old).any(|(a, b)| a.to_bits() != b.to_bits());
            let should_move = foreground || !in_mask_head(name);
            assert_eq!(moved, should_move, "valid {valid:?}: {name}");
        }
    }
}
