//! Index range analysis: the detector's gathers (inference and training, forward and backward)
//! are all proven in range by construction; indices the graph does not bound are not; the mark
//! survives serialization.

use vitdet_ir::ops::{IndexSelect, Slice};
use vitdet_ir::ops::{Init, Input, IotaLike, Parameter, Reshape, TopK};
use vitdet_ir::{DType, Graph, Op, TensorType, Value};
use vitdet_models::{build_detector, build_detector_training, ModelConfig};
use vitdet_passes::{differentiate, prove_index_ranges};

/// (ops that check indices, those of them marked in range).
fn marks(g: &Graph) -> (usize, usize) {
    let mut count = (0, 0);
    for n in g.graph.node_indices() {
        let marked = match &g.node(n).op {
            Op::IndexSelect(o) => o.indices_in_range,
            Op::GatherRows(o) => o.indices_in_range,
            Op::IndexSelectGrad(o) => o.indices_in_range,
            Op::GatherRowsGrad(o) => o.indices_in_range,
            Op::SoftmaxCrossEntropyLoss(o) => o.labels_in_range,
            Op::SoftmaxCrossEntropyLossGrad(o) => o.labels_in_range,
            _ => continue,
        };
        count.0 += 1;
        count.1 += marked as usize;
    }
    count
}

#[test]
fn the_detectors_gathers_are_in_range_by_construction() {
    for family in ["vitdet-tiny", "vit-tiny"] {
        let cfg = ModelConfig::preset(family).unwrap();
        let infer = build_detector(&cfg).unwrap();
        assert_eq!(marks(&infer).1, 0, "{family}: nothing is marked before the pass");
        let (proven, n) = prove_index_ranges(&infer).unwrap();
        let (total, marked) = marks(&proven);
        assert!(total >= 10, "{family}: {total} index ops");
        assert_eq!((marked, n), (total, total), "{family} inference");
        proven.verify().unwrap();

        // Training: top-k and NMS positions, the sampled classes (the cross-entropy's labels;
        // clamped to the last class, the class-specific gathers' indices) and the mask head's
        // foreground prefix of them, and the backward scatters.
        let forward = build_detector_training(&cfg, [cfg.image_size, cfg.image_size], 4).unwrap();
        let step = differentiate(&forward, "loss").unwrap().graph;
        let (proven, n) = prove_index_ranges(&step).unwrap();
        let (total, marked) = marks(&proven);
        assert!(
            proven
                .graph
                .node_indices()
                .any(|i| matches!(proven.node(i).op, Op::GatherRowsGrad(_))),
            "{family}: the step scatters gradients"
        );
        assert_eq!((marked, n), (total, total), "{family} training");
        let losses = proven
            .graph
            .node_indices()
            .filter(|&i| matches!(proven.node(i).op, Op::SoftmaxCrossEntropyLoss(ref o) if o.labels_in_range))
            .count();
        assert_eq!(
            losses, 1,
            "{family}: the box predictor's cross-entropy has proven labels"
        );
    }
}

fn input(g: &mut Graph, name: &str, ty: TensorType) -> Value {
    g.add(Input { name: name.into(), ty }, "", &[]).unwrap()
}

fn select(g: &mut Graph, data: Value, idx: Value) -> Value {
    g.add(IndexSelect::new(0), "", &[data, idx]).unwrap()
}

#[test]
fn indices_the_graph_does_not_bound_keep_their_check() {
    let mut g = Graph::new();
    let data = g
        .add(
            Parameter {
                name: "data".into(),
                ty: TensorType::f32([5, 3]),
                init: Init::Zeros,
                trainable: false,
            },
            "",
            &[],
        )
        .unwrap();
    // From the caller: anything.
    let given = input(&mut g, "given", TensorType::new(DType::I64, [2]));
    let a = select(&mut g, data, given);
    // Top-k positions of a 10-wide score vector index a 5-row tensor: not provably in range.
    let scores = input(&mut g, "scores", TensorType::f32([10]));
    let top = g.add_node(TopK { k: 4 }, "", &[scores]).unwrap();
    let wide = Value { node: top, output: 1 };
    let b = select(&mut g, data, wide);
    // The same positions of the first 5 scores are, also through a reshape and a slice.
    let five = g
        .add(
            Slice {
                axis: 0,
                start: 0,
                end: 5,
            },
            "",
            &[scores],
        )
        .unwrap();
    let top5 = g.add_node(TopK { k: 4 }, "", &[five]).unwrap();
    let idx = g
        .add(Reshape { shape: vec![4] }, "", &[Value { node: top5, output: 1 }])
        .unwrap();
    let c = select(&mut g, data, idx);
    // An iota that reaches past the rows is not; one that stays within them is.
    let iota = |g: &mut Graph, start: f64, step: f64| {
        let op = IotaLike {
            axis: 0,
            start,
            step,
            dtype: DType::I64,
        };
        g.add(op, "", &[given]).unwrap()
    };
    let (past, within) = (iota(&mut g, 4.0, 1.0), iota(&mut g, 3.0, 1.0));
    let d = select(&mut g, data, past);
    let e = select(&mut g, data, within);
    for (name, v) in [("a", a), ("b", b), ("c", c), ("d", d), ("e", e)] {
        g.set_output(name, v);
    }
    let (proven, n) = prove_index_ranges(&g).unwrap();
    let marked = |v: Value| match &proven.node(v.node).op {
        Op::IndexSelect(o) => o.indices_in_range,
        other => panic!("{} is not an index_select", other.name()),
    };
    assert_eq!(
        [a, b, c, d, e].map(marked),
        [false, false, true, false, true],
        "caller's, too wide, top-k of 5, iota 4..=5, iota 3..=4"
    );
    assert_eq!(n, 2);

    // The mark is part of the op: it survives a JSON round trip, and unmarked ops serialize
    // as before.
    let json = proven.to_json().unwrap();
    assert!(json.contains("\"indices_in_range\":true"));
    let back = Graph::from_json(&json).unwrap();
    assert_eq!(marks(&back), (5, 2));
    assert!(!g.to_json().unwrap().contains("indices_in_range"));
}
