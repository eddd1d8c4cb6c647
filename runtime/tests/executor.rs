//! The executor: live-bytes accounting on hand-built graphs with known answers, input / order /
//! parameter checks, and two detectron2 pyramids run end to end against the PyTorch fixtures.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use vitdet_ir::ops::*;
use vitdet_ir::{Graph, NodeIndex, TensorType, Value};
use vitdet_runtime::{peak_live_bytes, run, run_with_order, ParamStore, Program, RuntimeError};

fn input(g: &mut Graph, name: &str, shape: &[usize]) -> Value {
    g.add(
        Input {
            name: name.into(),
            ty: TensorType::f32(shape.to_vec()),
        },
        "",
        &[],
    )
    .unwrap()
}

fn param(g: &mut Graph, name: &str, shape: &[usize]) -> Value {
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
    .unwrap()
}

fn add(g: &mut Graph, a: Value, b: Value, scope: &str) -> Value {
    g.add(Binary { kind: BinaryKind::Add }, scope, &[a, b]).unwrap()
}

fn cpu() -> Device {
    Device::Cpu
}

/// x f32[4] -> relu -> concat(a, a) -> pad to 16 -> slice 0..4 -> + w; outputs e and b.
fn chain_graph() -> Graph {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[4]);
    let w = param(&mut g, "w", &[4]);
    let a = g.add(Unary { kind: UnaryKind::Relu }, "a", &[x]).unwrap();
    let b = g.add(Concat { axis: 0 }, "b", &[a, a]).unwrap();
    let c = g.add(Pad { pads: vec![[0, 8]] }, "c", &[b]).unwrap();
    let d = g
        .add(
            Slice {
                axis: 0,
                start: 0,
                end: 4,
            },
            "d",
            &[c],
        )
        .unwrap();
    let e = add(&mut g, d, w, "e");
    g.set_output("e", e);
    g.set_output("b", b);
    g.verify().unwrap();
    g
}

/// [`chain_graph`] with its parameter and an input.
fn chain_case() -> (Graph, ParamStore, Tensor) {
    let mut params = ParamStore::new();
    params.insert("w", Tensor::new(&[10f32, 20., 30., 40.], &cpu()).unwrap());
    let x = Tensor::new(&[-1f32, 2., -3., 4.], &cpu()).unwrap();
    (chain_graph(), params, x)
}

#[test]
fn peak_live_bytes_known_answer() {
    let (g, params, x) = chain_case();
    let out = run(&g, &params, &[("x", x)], &cpu()).unwrap();
    // x 16 | +a 32, x freed -> 16 | +b 48, a freed (both uses) -> 32 | +c 96 (b kept: output)
    // | +d 112, c freed -> 48 | +e 64, d freed -> 48. Peak 112; the parameter w is excluded.
    assert_eq!(out.peak_live_bytes, 112);
    assert_eq!(out.param_bytes, 16);
    assert_eq!(peak_live_bytes(&g, &g.topo_order().unwrap()).unwrap(), 112);
    assert_eq!(out.get("e").unwrap().to_vec1::<f32>().unwrap(), [10., 22., 30., 44.]);
    assert_eq!(
        out.get("b").unwrap().to_vec1::<f32>().unwrap(),
        [0., 2., 0., 4., 0., 2., 0., 4.]
    );
    assert_eq!(
        out.outputs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["e", "b"]
    );
}

/// A profiled run waits after every op but is otherwise the same run: same outputs, same
/// accounting, a time for every op kind the graph runs.
#[test]
fn profiled_and_device_timed_runs_match_and_time_every_op_kind() {
    let (g, params, x) = chain_case();
    let order = g.topo_order().unwrap();
    let plain = run_with_order(&g, &params, &[("x", x.clone())], &cpu(), &order).unwrap();
    let program = Program::new(&g, &order).unwrap();
    // On the CPU the device clock is the host's: the same op kinds as the other runs.
    let profiled = program.run_profiled(&params, &[("x", x.clone())], &cpu()).unwrap();
    let device_timed = program.run_device_timed(&params, &[("x", x)], &cpu()).unwrap();
    for run in [&profiled, &device_timed] {
        for ((n1, t1), (n2, t2)) in plain.outputs.iter().zip(&run.outputs) {
            assert_eq!(n1, n2);
            assert_eq!(t1.to_vec1::<f32>().unwrap(), t2.to_vec1::<f32>().unwrap(), "{n1}");
        }
        assert_eq!(run.peak_live_bytes, plain.peak_live_bytes);
        let kinds: Vec<&str> = run.op_seconds.keys().map(String::as_str).collect();
        assert_eq!(kinds, ["binary", "concat", "pad", "slice", "unary"]);
        assert!(run.op_seconds.values().all(|s| *s >= 0.0));
    }
}

/// Two branches whose big intermediates overlap or not depending on the order.
fn branch_graph() -> (Graph, [NodeIndex; 6]) {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[1]);
    let big1 = g.add(Pad { pads: vec![[0, 99]] }, "big1", &[x]).unwrap();
    let s1 = g
        .add(
            Slice {
                axis: 0,
                start: 0,
                end: 1,
            },
            "s1",
            &[big1],
        )
        .unwrap();
    let big2 = g.add(Pad { pads: vec![[0, 199]] }, "big2", &[x]).unwrap();
    let s2 = g
        .add(
            Slice {
                axis: 0,
                start: 0,
                end: 1,
            },
            "s2",
            &[big2],
        )
        .unwrap();
    let out = add(&mut g, s1, s2, "out");
    g.set_output("y", out);
    (g, [x.node, big1.node, s1.node, big2.node, s2.node, out.node])
}

#[test]
fn peak_depends_on_the_order() {
    let (g, [x, big1, s1, big2, s2, out]) = branch_graph();
    let feed = || vec![("x", Tensor::new(&[3f32], &cpu()).unwrap())];
    // x 4 | big1 404 | s1 408, big1 freed 8 | big2 808, x freed 804 | s2 808 -> 8 | out 12
    let a = [x, big1, s1, big2, s2, out];
    let ra = run_with_order(&g, &ParamStore::new(), &feed(), &cpu(), &a).unwrap();
    assert_eq!(ra.peak_live_bytes, 808);
    assert_eq!(peak_live_bytes(&g, &a).unwrap(), 808);
    // x 4 | big1 404 | big2 1204, x freed 1200 | s1 1204 -> 804 | s2 808 -> 8 | out 12
    let b = [x, big1, big2, s1, s2, out];
    let rb = run_with_order(&g, &ParamStore::new(), &feed(), &cpu(), &b).unwrap();
    assert_eq!(rb.peak_live_bytes, 1204);
    assert_eq!(peak_live_bytes(&g, &b).unwrap(), 1204);
    assert_eq!(ra.get("y").unwrap().to_vec1::<f32>().unwrap(), [6.0]);
    assert_eq!(rb.get("y").unwrap().to_vec1::<f32>().unwrap(), [6.0]);
    assert_eq!(ra.param_bytes, 0);
}

#[test]
fn order_errors() {
    let (g, [x, big1, s1, big2, s2, out]) = branch_graph();
    let feed = || vec![("x", Tensor::new(&[3f32], &cpu()).unwrap())];
    let p = ParamStore::new();
    let err = run_with_order(&g, &p, &feed(), &cpu(), &[x, big1, s1, s1, big2, s2, out]).unwrap_err();
    assert!(
        matches!(err, RuntimeError::Order(ref m) if m.contains("twice")),
        "{err}"
    );
    let err = run_with_order(&g, &p, &feed(), &cpu(), &[x, s1, big1, big2, s2, out]).unwrap_err();
    assert!(
        err.to_string().contains("s1") && err.to_string().contains("not produced"),
        "{err}"
    );
    let err = run_with_order(&g, &p, &feed(), &cpu(), &[x, big1, s1]).unwrap_err();
    assert!(
        err.to_string().contains("big2") || err.to_string().contains("output `y`"),
        "{err}"
    );
    // A node missing from the order is reported by name before anything runs.
    let err = peak_live_bytes(&g, &[x, big1, s1, s2, out]).unwrap_err();
    assert!(err.to_string().contains("s2"), "{err}");
}

#[test]
fn input_checks() {
    let g = chain_graph();
    let mut params = ParamStore::new();
    params.insert("w", Tensor::zeros(4, DType::F32, &cpu()).unwrap());
    let ok = Tensor::zeros(4, DType::F32, &cpu()).unwrap();

    let err = run(&g, &params, &[], &cpu()).unwrap_err();
    assert_eq!(err.to_string(), "missing graph input `x` (expected f32[4])");

    let err = run(&g, &params, &[("x", ok.clone()), ("z", ok.clone())], &cpu()).unwrap_err();
    assert!(
        matches!(err, RuntimeError::UnexpectedInput { ref name, .. } if name == "z"),
        "{err}"
    );
    assert!(err.to_string().contains("`x`"), "lists the graph's inputs: {err}");

    let err = run(&g, &params, &[("x", ok.clone()), ("x", ok.clone())], &cpu()).unwrap_err();
    assert!(err.to_string().contains("more than once"), "{err}");

    let err = run(
        &g,
        &params,
        &[("x", Tensor::zeros(5, DType::F32, &cpu()).unwrap())],
        &cpu(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "input `x`: expected f32[4], found f32[5]");

    let err = run(
        &g,
        &params,
        &[("x", Tensor::zeros(4, DType::F64, &cpu()).unwrap())],
        &cpu(),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "input `x`: expected f32[4], found f64[4]");
}

#[test]
fn parameter_checks_at_run() {
    let g = chain_graph();
    let x = Tensor::zeros(4, DType::F32, &cpu()).unwrap();
    let err = run(&g, &ParamStore::new(), &[("x", x.clone())], &cpu()).unwrap_err();
    assert!(matches!(err, RuntimeError::MissingParameters { count: 1, .. }), "{err}");
    assert!(err.to_string().contains("`w`"), "{err}");
    let mut p = ParamStore::new();
    p.insert("w", Tensor::zeros(3, DType::F32, &cpu()).unwrap());
    let err = run(&g, &p, &[("x", x.clone())], &cpu()).unwrap_err();
    assert_eq!(err.to_string(), "parameter `w`: expected shape [4], found [3]");
    // Extra entries in a store are fine.
    let mut p = ParamStore::new();
    p.insert("w", Tensor::zeros(4, DType::F32, &cpu()).unwrap());
    p.insert("unused", Tensor::zeros(1, DType::F32, &cpu()).unwrap());
    run(&g, &p, &[("x", x)], &cpu()).unwrap();
}

#[test]
fn dead_values_and_repeated_inputs() {
    // x*x uses x twice through one node; an unused node's output is counted then freed.
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[8]); // 32 bytes
    let sq = g.add(Binary { kind: BinaryKind::Mul }, "sq", &[x, x]).unwrap();
    let _dead = g.add(Pad { pads: vec![[0, 92]] }, "dead", &[x]).unwrap(); // 400 bytes, unused
    let y = g.add(Affine { mul: 2.0, add: 1.0 }, "y", &[sq]).unwrap();
    g.set_output("y", y);
    let order = g.topo_order().unwrap();
    let xs = Tensor::new(&[1f32, 2., 3., 4., 5., 6., 7., 8.], &cpu()).unwrap();
    let r = run(&g, &ParamStore::new(), &[("x", xs)], &cpu()).unwrap();
    assert_eq!(r.peak_live_bytes, peak_live_bytes(&g, &order).unwrap());
    // Whatever the topological order: x and `dead` coexist (432), and possibly sq too (464).
    assert!(
        r.peak_live_bytes == 432 || r.peak_live_bytes == 464,
        "{}",
        r.peak_live_bytes
    );
    assert_eq!(r.get("y").unwrap().to_vec1::<f32>().unwrap()[2], 19.0);
    // Omitting the dead node from an explicit order skips it.
    let order: Vec<NodeIndex> = [x.node, sq.node, y.node].into();
    let r = run_with_order(
        &g,
        &ParamStore::new(),
        &[("x", Tensor::zeros(8, DType::F32, &cpu()).unwrap())],
        &cpu(),
        &order,
    )
    .unwrap();
    assert_eq!(r.peak_live_bytes, 64);
}

// ---------------------------------------------------------------- end to end

fn load(path: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures_dir().join(path), &cpu()).unwrap()
}

/// A conv (no bias) followed by detectron2's channel LayerNorm, as the simple pyramid's tails.
fn conv_ln(g: &mut Graph, x: Value, prefix: &str, cin: usize, cout: usize, k: usize) -> Value {
    let w = param(g, &format!("{prefix}.weight"), &[cout, cin, k, k]);
    let y = g.add(Conv2d::same(k / 2), prefix, &[x, w]).unwrap();
    let nw = param(g, &format!("{prefix}.norm.weight"), &[cout]);
    let nb = param(g, &format!("{prefix}.norm.bias"), &[cout]);
    g.add(
        LayerNorm { axis: 1, eps: 1e-6 },
        &format!("{prefix}.norm"),
        &[y, nw, nb],
    )
    .unwrap()
}

fn deconv(g: &mut Graph, x: Value, prefix: &str, cin: usize, cout: usize) -> Value {
    let w = param(g, &format!("{prefix}.weight"), &[cin, cout, 2, 2]);
    let b = param(g, &format!("{prefix}.bias"), &[cout]);
    g.add(ConvTranspose2d::upsample(2), prefix, &[x, w, b]).unwrap()
}

#[test]
fn simple_feature_pyramid_matches_detectron2() {
    // detectron2's SimpleFeaturePyramid of the tiny ViTDet fixture, from the trunk output.
    let mut g = Graph::new();
    let trunk = input(&mut g, "trunk", &[1, 8, 8, 32]);
    let x = g.add(Permute { perm: vec![0, 3, 1, 2] }, "backbone", &[trunk]).unwrap();
    let p = "backbone.simfp_2";
    let y = deconv(&mut g, x, &format!("{p}.0"), 32, 16);
    let (lw, lb) = (
        param(&mut g, &format!("{p}.1.weight"), &[16]),
        param(&mut g, &format!("{p}.1.bias"), &[16]),
    );
    let y = g
        .add(LayerNorm { axis: 1, eps: 1e-6 }, &format!("{p}.1"), &[y, lw, lb])
        .unwrap();
    let y = g.add(Unary { kind: UnaryKind::Gelu }, &format!("{p}.2"), &[y]).unwrap();
    let y = deconv(&mut g, y, &format!("{p}.3"), 16, 8);
    let y = conv_ln(&mut g, y, &format!("{p}.4"), 8, 16, 1);
    let p2 = conv_ln(&mut g, y, &format!("{p}.5"), 16, 16, 3);
    let p = "backbone.simfp_3";
    let y = deconv(&mut g, x, &format!("{p}.0"), 32, 16);
    let y = conv_ln(&mut g, y, &format!("{p}.1"), 16, 16, 1);
    let p3 = conv_ln(&mut g, y, &format!("{p}.2"), 16, 16, 3);
    let p = "backbone.simfp_4";
    let y = conv_ln(&mut g, x, &format!("{p}.0"), 32, 16, 1);
    let p4 = conv_ln(&mut g, y, &format!("{p}.1"), 16, 16, 3);
    let p = "backbone.simfp_5";
    let y = g.add(MaxPool2d::new(2, 2), &format!("{p}.0"), &[x]).unwrap();
    let y = conv_ln(&mut g, y, &format!("{p}.1"), 32, 16, 1);
    let p5 = conv_ln(&mut g, y, &format!("{p}.2"), 16, 16, 3);
    let p6 = g.add(MaxPool2d::new(1, 2), "backbone.top_block", &[p5]).unwrap();
    for (n, v) in [("p2", p2), ("p3", p3), ("p4", p4), ("p5", p5), ("p6", p6)] {
        g.set_output(n, v);
    }
    g.verify().unwrap();

    let weights = load("vitdet_tiny.safetensors");
    let params = ParamStore::from_tensors(g.parameters().map(|(_, p)| (p.name.clone(), weights[&p.name].clone())));
    let io = load("vitdet_tiny_io.safetensors");
    let out = run(&g, &params, &[("trunk", io["trunk"].clone())], &cpu()).unwrap();
    for name in ["p2", "p3", "p4", "p5", "p6"] {
        // The fixtures README's model tolerance: f32 through a few layers of O(1) values.
        assert_close(
            &Nd::from_tensor(out.get(name).unwrap()),
            &Nd::from_tensor(&io[name]),
            1e-4,
            1e-4,
            name,
        );
    }
}

#[test]
fn batchnorm_fpn_matches_and_loads_real_keys() {
    // detectron2's FPN (BN, sum fusion) of the tiny ViT+FPN fixture, from the adapter outputs;
    // its weights are written to a file with the FPN keys (and BN `num_batches_tracked`
    // counters, which the loader ignores) and loaded back through `load_safetensors`.
    let mut g = Graph::new();
    let c: Vec<Value> = [(2, 32), (3, 16), (4, 8), (5, 4)]
        .iter()
        .map(|(s, hw)| input(&mut g, &format!("c{s}"), &[1, 32, *hw, *hw]))
        .collect();
    let conv_bn = |g: &mut Graph, x: Value, prefix: &str, cin: usize, k: usize| -> Value {
        let w = param(g, &format!("{prefix}.weight"), &[16, cin, k, k]);
        let y = g.add(Conv2d::same(k / 2), prefix, &[x, w]).unwrap();
        let n: Vec<Value> = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|s| param(g, &format!("{prefix}.norm.{s}"), &[16]))
            .collect();
        g.add(
            BatchNorm { eps: 1e-5 },
            &format!("{prefix}.norm"),
            &[y, n[0], n[1], n[2], n[3]],
        )
        .unwrap()
    };
    let mut prev = conv_bn(&mut g, c[3], "backbone.fpn_lateral5", 32, 1);
    let mut outs = vec![("p5".to_string(), conv_bn(&mut g, prev, "backbone.fpn_output5", 16, 3))];
    for (i, s) in [(2usize, 4usize), (1, 3), (0, 2)] {
        let lat = conv_bn(&mut g, c[i], &format!("backbone.fpn_lateral{s}"), 32, 1);
        let hw = 32 >> i;
        let up = g
            .add(
                Resize {
                    size: [hw, hw],
                    mode: ResizeMode::Nearest,
                    align_corners: false,
                },
                "backbone",
                &[prev],
            )
            .unwrap();
        prev = add(&mut g, lat, up, "backbone");
        outs.push((
            format!("p{s}"),
            conv_bn(&mut g, prev, &format!("backbone.fpn_output{s}"), 16, 3),
        ));
    }
    let p6 = g.add(MaxPool2d::new(1, 2), "backbone.top_block", &[outs[0].1]).unwrap();
    outs.push(("p6".into(), p6));
    for (n, v) in &outs {
        g.set_output(n, *v);
    }
    g.verify().unwrap();

    let weights = load("vit_tiny.safetensors");
    let mut subset: HashMap<String, Tensor> = weights
        .iter()
        .filter(|(k, _)| k.starts_with("backbone.fpn_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(
        subset.keys().any(|k| k.ends_with(".num_batches_tracked")),
        "the fixture has BN counters"
    );
    subset.retain(|_, v| v.dtype() == DType::F32 || v.rank() == 0);
    let dir = std::env::temp_dir().join(format!("vitdet-fpn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fpn.safetensors");
    candle_core::safetensors::save(&subset, &path).unwrap();
    let params = ParamStore::load_safetensors(&path, &g, &cpu()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let io = load("vit_tiny_io.safetensors");
    let feeds: Vec<(&str, Tensor)> = ["c2", "c3", "c4", "c5"].iter().map(|n| (*n, io[*n].clone())).collect();
    let out = run(&g, &params, &feeds, &cpu()).unwrap();
    for name in ["p2", "p3", "p4", "p5", "p6"] {
        assert_close(
            &Nd::from_tensor(out.get(name).unwrap()),
            &Nd::from_tensor(&io[name]),
            1e-4,
            1e-4,
            name,
        );
    }
}

/// The values a host loop reads (a seed, a row count, also when a device kernel reads them
/// too) are the ones a GPU run keeps a host copy of; the rest are not.
#[test]
fn values_host_loops_read_are_known_to_the_program() {
    let mut g = Graph::new();
    let scalar = |g: &mut Graph, name: &str| {
        let ty = TensorType::new(vitdet_ir::DType::I64, Vec::<usize>::new());
        g.add(Input { name: name.into(), ty }, "", &[]).unwrap()
    };
    let (seed, count, both, out) = (
        scalar(&mut g, "seed"),
        scalar(&mut g, "count"),
        scalar(&mut g, "both"),
        scalar(&mut g, "returned"),
    );
    let mask = g
        .add(
            DropPathMask {
                rate: 0.2,
                stream: 1,
                batch: 4,
            },
            "",
            &[seed],
        )
        .unwrap();
    let x = input(&mut g, "x", &[4, 3]);
    let prefix = |g: &mut Graph, c: Value| g.add(DynamicPrefix { min_rows: 1, bound: 4 }, "", &[x, c]).unwrap();
    let rows = prefix(&mut g, count);
    let sum = ReduceSum {
        axes: vec![0],
        keepdim: false,
    };
    let total = g.add(sum, "", &[rows]).unwrap();
    let widened = g
        .add(
            Cast {
                dtype: vitdet_ir::DType::F32,
            },
            "",
            &[both],
        )
        .unwrap();
    let masked = g.add(Binary { kind: BinaryKind::Mul }, "", &[mask, widened]).unwrap();
    let _ = g
        .add(
            DropPathMask {
                rate: 0.1,
                stream: 2,
                batch: 4,
            },
            "",
            &[both],
        )
        .unwrap();
    g.set_output("mask", masked);
    g.set_output("total", total);
    g.set_output("returned", out);
    // Data movement feeding a host loop: its inputs are wanted on the host too (the levels'
    // anchors concatenated for the anchor targets).
    let parts = [0, 1].map(|i| {
        let ty = TensorType::new(vitdet_ir::DType::I64, [1]);
        g.add(
            Input {
                name: format!("part{i}"),
                ty,
            },
            "",
            &[],
        )
        .unwrap()
    });
    let joined = g.add(Concat { axis: 0 }, "", &parts).unwrap();
    let first = g
        .add(
            Slice {
                axis: 0,
                start: 0,
                end: 1,
            },
            "",
            &[joined],
        )
        .unwrap();
    let scalar_seed = g.add(Reshape { shape: vec![] }, "", &[first]).unwrap();
    let drop = DropPathMask {
        rate: 0.1,
        stream: 3,
        batch: 4,
    };
    let other = g.add(drop, "", &[scalar_seed]).unwrap();
    g.set_output("other", other);
    let order = g.topo_order().unwrap();
    let program = Program::new(&g, &order).unwrap();
    let read = [seed, count, both, out, x].map(|v| program.reads_on_host(v));
    assert_eq!(read, [true, true, true, false, false], "seed, count, both, returned, x");
    let moved = [parts[0], parts[1], joined, first, scalar_seed, other].map(|v| program.reads_on_host(v));
    assert_eq!(
        moved,
        [true, true, true, true, true, false],
        "parts, concat, slice, reshape, mask"
    );
    let feed = [
        ("seed", Tensor::new(7i64, &cpu()).unwrap()),
        ("count", Tensor::new(2i64, &cpu()).unwrap()),
        ("both", Tensor::new(1i64, &cpu()).unwrap()),
        ("returned", Tensor::new(3i64, &cpu()).unwrap()),
        ("part0", Tensor::new(&[5i64], &cpu()).unwrap()),
        ("part1", Tensor::new(&[6i64], &cpu()).unwrap()),
        ("x", Tensor::ones((4, 3), DType::F32, &cpu()).unwrap()),
    ];
    let out = program.run(&ParamStore::new(), &feed, &cpu()).unwrap();
    assert_eq!(out.get("total").unwrap().to_vec1::<f32>().unwrap(), [2.0; 3]);
}
