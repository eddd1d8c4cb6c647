//! A head on dynamic rows computes exactly what the same head computes on a static slice of
//! those rows: forward, BatchNorm running statistics and every gradient, bit for bit (the same
//! kernels see the same shapes). This is how the training graph's mask head runs on the sampled
//! foreground RoIs only, as detectron2's, whose BatchNorm normalizes over them alone.

mod common;

use candle_core::{Device, Tensor};
use common::f32s;
use vitdet::ir::ops::{
    BatchNormTrain, Conv2d, DynamicPrefix, Init, Input, LossNorm, PadRows, Parameter, RoiAlign, SigmoidBceLoss, Slice,
    Unary, UnaryKind,
};
use vitdet::ir::{DType as IrDType, Graph, TensorType, Value};
use vitdet::passes::differentiate;
use vitdet::runtime::{run, ParamStore, RunOutput};

const SLOTS: usize = 6;

/// How the head selects its rows from the `SLOTS` slots.
#[derive(Clone, Copy)]
enum Rows {
    /// `DynamicPrefix` by the `count` input.
    Dynamic,
    /// A static slice of the first `n`.
    First(usize),
}

fn param(g: &mut Graph, name: &str, shape: &[usize], init: Init, trainable: bool) -> Value {
    let p = Parameter {
        name: name.into(),
        ty: TensorType::f32(shape),
        init,
        trainable,
    };
    g.add(p, "head", &[]).unwrap()
}

/// RoIAlign of `boxes` on a trainable feature map -> conv -> BatchNorm -> ReLU -> conv ->
/// weighted sigmoid BCE against `targets`, with the BatchNorm's running statistics as outputs.
fn head(rows: Rows) -> Graph {
    let mut g = Graph::new();
    let input = |g: &mut Graph, name: &str, ty: TensorType| g.add(Input { name: name.into(), ty }, "", &[]).unwrap();
    let boxes = input(&mut g, "boxes", TensorType::f32([SLOTS, 4]));
    let targets = input(&mut g, "targets", TensorType::f32([SLOTS, 2, 7, 7]));
    let weights = input(&mut g, "weights", TensorType::f32([SLOTS]));
    let count = matches!(rows, Rows::Dynamic).then(|| input(&mut g, "count", TensorType::new(IrDType::I64, [])));
    let select = |g: &mut Graph, v: Value| match (rows, count) {
        (Rows::Dynamic, Some(count)) => g
            .add(
                DynamicPrefix {
                    min_rows: 1,
                    bound: SLOTS,
                },
                "head",
                &[v, count],
            )
            .unwrap(),
        (Rows::Dynamic, None) => unreachable!("a dynamic head declares its count"),
        (Rows::First(n), _) => g
            .add(
                Slice {
                    axis: 0,
                    start: 0,
                    end: n,
                },
                "head",
                &[v],
            )
            .unwrap(),
    };
    let (boxes, targets, weights) = (select(&mut g, boxes), select(&mut g, targets), select(&mut g, weights));
    let feature = param(&mut g, "feature", &[1, 3, 16, 16], Init::Normal { std: 1.0 }, true);
    let pooled = g
        .add(
            RoiAlign {
                output_size: [7, 7],
                scales: vec![0.25],
                sampling_ratio: 0,
                aligned: true,
                canonical_box_size: 224.0,
                canonical_level: 4,
                min_level: 2,
            },
            "head.pooler",
            &[feature, boxes],
        )
        .unwrap();
    let w1 = param(&mut g, "conv1.weight", &[4, 3, 3, 3], Init::Normal { std: 0.3 }, true);
    let y = g.add(Conv2d::same(1), "head.conv1", &[pooled, w1]).unwrap();
    let gamma = param(&mut g, "norm.weight", &[4], Init::Normal { std: 1.0 }, true);
    let beta = param(&mut g, "norm.bias", &[4], Init::Normal { std: 1.0 }, true);
    let mean = param(&mut g, "norm.running_mean", &[4], Init::Zeros, false);
    let var = param(&mut g, "norm.running_var", &[4], Init::Ones, false);
    let bn = BatchNormTrain {
        eps: 1e-5,
        momentum: 0.1,
    };
    let norm = g.add_node(bn, "head.norm", &[y, gamma, beta, mean, var]).unwrap();
    let out = |output| Value { node: norm, output };
    let a = g.add(Unary { kind: UnaryKind::Relu }, "head", &[out(0)]).unwrap();
    let w2 = param(&mut g, "conv2.weight", &[2, 4, 1, 1], Init::Normal { std: 0.3 }, true);
    let logits = g.add(Conv2d::same(0), "head.conv2", &[a, w2]).unwrap();
    let loss = SigmoidBceLoss {
        norm: LossNorm::WeightedMean,
    };
    let loss = g.add(loss, "head", &[logits, targets, weights]).unwrap();
    g.set_output("loss", loss);
    // The probabilities, padded back to the slots with zero rows (dynamic rows only).
    let probs = g
        .add(
            Unary {
                kind: UnaryKind::Sigmoid,
            },
            "head",
            &[logits],
        )
        .unwrap();
    if let Rows::Dynamic = rows {
        let probs = g.add(PadRows { rows: SLOTS }, "head", &[probs]).unwrap();
        g.set_output("probs", probs);
    } else {
        g.set_output("probs", probs);
    }
    g.set_output("running_mean", out(1));
    g.set_output("running_var", out(2));
    differentiate(&g, "loss").unwrap().graph
}

fn inputs(count: i64) -> Vec<(&'static str, Tensor)> {
    let dev = Device::Cpu;
    // Boxes of different sizes over the 64 x 64 image the stride-4 map covers.
    let boxes: Vec<f32> = (0..SLOTS)
        .flat_map(|i| {
            let o = 3.0 * i as f32;
            [o, o + 1.0, o + 20.0 + 4.0 * i as f32, o + 30.0]
        })
        .collect();
    let targets: Vec<f32> = (0..SLOTS * 2 * 49).map(|i| ((i * 7) % 3 == 0) as u8 as f32).collect();
    let weights: Vec<f32> = (0..SLOTS).map(|i| if i < 4 { 1.0 } else { 0.0 }).collect();
    vec![
        ("boxes", Tensor::from_vec(boxes, (SLOTS, 4), &dev).unwrap()),
        ("targets", Tensor::from_vec(targets, (SLOTS, 2, 7, 7), &dev).unwrap()),
        ("weights", Tensor::from_vec(weights, SLOTS, &dev).unwrap()),
        ("count", Tensor::new(count, &dev).unwrap()),
    ]
}

fn outputs(rows: Rows, count: i64) -> (Graph, RunOutput) {
    let graph = head(rows);
    let params = ParamStore::init_random(&graph, 5, &Device::Cpu).unwrap();
    let mut feed = inputs(count);
    if let Rows::First(_) = rows {
        feed.retain(|(name, _)| *name != "count");
    }
    let out = run(&graph, &params, &feed, &Device::Cpu).unwrap();
    (graph, out)
}

/// The dynamic run's outputs equal the static slice's, its padded `probs` in their first rows
/// and zero after.
fn assert_same(dynamic: &RunOutput, slice: &RunOutput) {
    assert_eq!(dynamic.outputs.len(), slice.outputs.len());
    for ((name, x), (name_b, y)) in dynamic.outputs.iter().zip(&slice.outputs) {
        assert_eq!(name, name_b);
        if name == "probs" {
            let rows = y.dim(0).unwrap();
            assert_eq!(x.dim(0).unwrap(), SLOTS);
            assert_eq!(f32s(&x.narrow(0, 0, rows).unwrap()), f32s(y));
            assert!(f32s(&x.narrow(0, rows, SLOTS - rows).unwrap())
                .iter()
                .all(|&v| v == 0.0));
            continue;
        }
        assert_eq!(x.dims(), y.dims(), "{name}");
        assert_eq!(f32s(x), f32s(y), "{name}");
    }
}

#[test]
fn dynamic_rows_compute_what_a_static_slice_computes() {
    let (graph, _) = outputs(Rows::Dynamic, 3);
    assert!(graph.outputs.iter().any(|o| o.name == "grad/feature"));
    assert!(graph.outputs.iter().any(|o| o.name == "grad/norm.weight"));
    // Counts below, at and past the bound (clamped), and 0 (raised to min_rows).
    for (count, rows) in [(3, 3), (1, 1), (6, 6), (9, 6), (0, 1)] {
        let (_, dynamic) = outputs(Rows::Dynamic, count);
        let (_, slice) = outputs(Rows::First(rows), count);
        assert_same(&dynamic, &slice);
    }
    // The rows past the count matter to what a static head computes: with weight 0 the loss
    // ignores them, but the BatchNorm's statistics (and so every gradient before it) do not.
    let (_, three) = outputs(Rows::Dynamic, 3);
    let (_, all) = outputs(Rows::First(4), 3);
    let mean = |o: &RunOutput| f32s(o.get("running_mean").unwrap());
    assert_ne!(mean(&three), mean(&all));
}

/// `loss = sum(pad_rows(prefix(w)^2) * c)`: the gradient crosses the padding (back to the
/// dynamic rows) and the prefix (back to all of `w`'s rows), so `dloss/dw = 2 w c` on the first
/// `clamp(count, 1, 5)` rows and 0 after, exactly (doubling is exact in floating point).
#[test]
fn gradients_cross_the_prefix_and_the_padding() {
    use vitdet::ir::ops::{Binary, BinaryKind, ReduceSum};
    let (rows, cols, bound, padded) = (6, 3, 5, 8);
    let mut g = Graph::new();
    let w = param(&mut g, "w", &[rows, cols], Init::Normal { std: 1.0 }, true);
    let input = |g: &mut Graph, name: &str, ty: TensorType| g.add(Input { name: name.into(), ty }, "", &[]).unwrap();
    let count = input(&mut g, "count", TensorType::new(IrDType::I64, []));
    let c = input(&mut g, "c", TensorType::f32([padded, cols]));
    let mul = |g: &mut Graph, a: Value, b: Value| g.add(Binary { kind: BinaryKind::Mul }, "head", &[a, b]).unwrap();
    let y = g
        .add(DynamicPrefix { min_rows: 1, bound }, "head", &[w, count])
        .unwrap();
    let z = mul(&mut g, y, y);
    let p = g.add(PadRows { rows: padded }, "head", &[z]).unwrap();
    let q = mul(&mut g, p, c);
    let sum = ReduceSum {
        axes: vec![0, 1],
        keepdim: false,
    };
    let loss = g.add(sum, "head", &[q]).unwrap();
    g.set_output("loss", loss);
    let diff = differentiate(&g, "loss").unwrap();
    diff.graph.verify().unwrap();
    assert_eq!(diff.gradients, vec![("w".to_string(), "grad/w".to_string())]);

    let params = ParamStore::init_random(&g, 7, &Device::Cpu).unwrap();
    let cs: Vec<f32> = (0..padded * cols).map(|i| 0.25 + i as f32 * 0.5).collect();
    let ws = f32s(params.get("w").unwrap());
    for (count, live) in [(3i64, 3), (0, 1), (5, 5), (9, 5)] {
        let feed = vec![
            ("count", Tensor::new(count, &Device::Cpu).unwrap()),
            ("c", Tensor::from_vec(cs.clone(), (padded, cols), &Device::Cpu).unwrap()),
        ];
        let out = run(&diff.graph, &params, &feed, &Device::Cpu).unwrap();
        assert_eq!(out.dynamic_rows, Some(live), "count {count}");
        let grad = out.get("grad/w").unwrap();
        assert_eq!(grad.dims(), [rows, cols]);
        let want: Vec<f32> = (0..rows * cols)
            .map(|i| if i / cols < live { 2.0 * ws[i] * cs[i] } else { 0.0 })
            .collect();
        assert_eq!(f32s(grad), want, "count {count}");
    }
}

#[test]
fn a_negative_count_is_an_error() {
    let graph = head(Rows::Dynamic);
    let params = ParamStore::init_random(&graph, 5, &Device::Cpu).unwrap();
    let err = run(&graph, &params, &inputs(-1), &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("row count -1 is negative") && err.contains("dynamic_prefix"),
        "{err}"
    );
}

#[test]
fn the_detector_runs_its_mask_head_on_the_valid_detections() {
    use vitdet::models::{build_detector, ModelConfig};
    let mut cfg = ModelConfig::preset("vitdet-tiny").unwrap();
    // Random weights score every class near 1/81: this threshold keeps some candidates, not
    // enough to fill the 20 detection slots.
    cfg.detector.score_thresh = 0.014;
    let graph = build_detector(&cfg).unwrap();
    let params = ParamStore::init_random(&graph, 1, &Device::Cpu).unwrap();
    let s = cfg.image_size;
    let image = Tensor::randn(0f32, 1.0, (1, 3, s, s), &Device::Cpu).unwrap();
    let out = run(&graph, &params, &[("image", image)], &Device::Cpu).unwrap();
    let valid: Vec<u8> = out.get("valid").unwrap().to_vec1().unwrap();
    let n = valid.iter().filter(|&&v| v == 1).count();
    let slots = valid.len();
    assert!(
        n > 1 && n < slots,
        "{n} of {slots} detections: pick a seed with some, not all"
    );
    assert!(valid[..n].iter().all(|&v| v == 1), "valid detections come first");
    assert_eq!(out.dynamic_rows, Some(n));
    let masks = out.get("masks").unwrap();
    assert_eq!(masks.dims(), [slots, 28, 28]);
    let rest = f32s(&masks.narrow(0, n, slots - n).unwrap());
    assert!(rest.iter().all(|&v| v == 0.0), "masks of empty slots are 0");
    // Sigmoid probabilities, strictly inside (0, 1), on the valid rows.
    let kept = f32s(&masks.narrow(0, 0, n).unwrap());
    assert!(kept.iter().all(|&v| v > 0.0 && v < 1.0));
}
