//! Graph construction, type errors, verification, serialization and printing.

use petgraph::visit::EdgeRef;
use vitdet_ir::ops::{
    Binary, BinaryKind, Conv2d, Init, Input, LayerNorm, Linear, MatMul, Parameter, Reshape, Unary, UnaryKind,
};
use vitdet_ir::{Graph, IrError, NodeIndex, Op, TensorType, Value};

fn param(g: &mut Graph, name: &str, shape: &[usize]) -> Value {
    let p = Parameter {
        name: name.into(),
        ty: TensorType::f32(shape),
        init: Init::Zeros,
        trainable: true,
    };
    g.add(p, name.rsplit_once('.').map_or("", |(s, _)| s), &[]).unwrap()
}

/// x [2, 8] -> linear(8 -> 4) -> gelu -> layer_norm -> + x2
fn small_graph() -> Graph {
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32([2, 8]),
            },
            "",
            &[],
        )
        .unwrap();
    let w = param(&mut g, "fc.weight", &[4, 8]);
    let b = param(&mut g, "fc.bias", &[4]);
    let y = g.add(Linear::default(), "fc", &[x, w, b]).unwrap();
    let y = g.add(Unary { kind: UnaryKind::Gelu }, "act", &[y]).unwrap();
    let lw = param(&mut g, "norm.weight", &[4]);
    let lb = param(&mut g, "norm.bias", &[4]);
    let z = g.add(LayerNorm { axis: 1, eps: 1e-6 }, "norm", &[y, lw, lb]).unwrap();
    let s = g.add(Binary { kind: BinaryKind::Add }, "sum", &[z, y]).unwrap();
    g.set_output("out", s);
    g
}

#[test]
fn builds_and_verifies() {
    let g = small_graph();
    g.verify().unwrap();
    assert_eq!(g.param_count(), 4 * 8 + 4 + 4 + 4);
    let out = g.outputs[0].value;
    assert_eq!(g.value_type(out), &TensorType::f32([2, 4]));
}

#[test]
fn type_error_names_node_scope_and_mismatch() {
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32([2, 8]),
            },
            "",
            &[],
        )
        .unwrap();
    let w = param(&mut g, "blocks.3.attn.qkv.weight", &[24, 7]);
    let err = g.add(Linear::default(), "blocks.3.attn.qkv", &[x, w]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, IrError::Type { node: 2, .. }), "{msg}");
    assert!(
        msg.contains("linear") && msg.contains("blocks.3.attn.qkv") && msg.contains("f32[24,7]"),
        "{msg}"
    );

    let x4 = g
        .add(
            Input {
                name: "img".into(),
                ty: TensorType::f32([1, 3, 8, 8]),
            },
            "",
            &[],
        )
        .unwrap();
    let cw = param(&mut g, "conv.weight", &[16, 4, 3, 3]);
    let msg = g.add(Conv2d::same(1), "conv", &[x4, cw]).unwrap_err().to_string();
    assert!(msg.contains("expects 4 input channels"), "{msg}");

    let msg = g.add(Reshape { shape: vec![5, 3] }, "r", &[x]).unwrap_err().to_string();
    assert!(msg.contains("cannot reshape f32[2,8]"), "{msg}");
    let msg = g.add(Linear::default(), "fc", &[x]).unwrap_err().to_string();
    assert!(msg.contains("takes 2..=3 inputs, given 1"), "{msg}");
}

#[test]
fn json_round_trip_is_identical() {
    let g = small_graph();
    let text = g.to_json().unwrap();
    let back = Graph::from_json(&text).unwrap();
    back.verify().unwrap();
    assert_eq!(back.to_json().unwrap(), text);
    assert_eq!(back.dump().unwrap(), g.dump().unwrap());
}

#[test]
fn verify_rejects_tampered_graphs() {
    // A stored type that disagrees with inference.
    let g = small_graph();
    let mut bad = g.clone();
    let gelu = bad
        .graph
        .node_indices()
        .find(|&i| matches!(bad.graph[i].op, Op::Unary(_)))
        .unwrap();
    bad.graph[gelu].outputs[0] = TensorType::f32([2, 5]);
    let msg = bad.verify().unwrap_err().to_string();
    assert!(
        msg.contains("stored type f32[2,5] but inferred f32[2,4]") && msg.contains("act"),
        "{msg}"
    );

    // A disconnected input.
    let mut bad = g.clone();
    let fc = bad
        .graph
        .node_indices()
        .find(|&i| matches!(bad.graph[i].op, Op::Linear(_)))
        .unwrap();
    let e = bad
        .graph
        .edges_directed(fc, petgraph::Direction::Incoming)
        .find(|e| e.weight().input == 0)
        .unwrap()
        .id();
    bad.graph.remove_edge(e);
    let msg = bad.verify().unwrap_err().to_string();
    assert!(msg.contains("input 0 is not connected") && msg.contains("fc"), "{msg}");

    // A cycle.
    let mut bad = g.clone();
    let sum = bad
        .graph
        .node_indices()
        .find(|&i| matches!(bad.graph[i].op, Op::Binary(_)))
        .unwrap();
    bad.graph.add_edge(sum, fc, vitdet_ir::Edge { output: 0, input: 3 });
    assert!(matches!(bad.verify().unwrap_err(), IrError::Cycle { .. }));

    // Duplicate parameter names.
    let mut bad = g.clone();
    param(&mut bad, "fc.weight", &[4, 8]);
    assert!(bad
        .verify()
        .unwrap_err()
        .to_string()
        .contains("`fc.weight` is declared twice"));

    // An output pointing nowhere.
    let mut bad = g;
    bad.set_output(
        "ghost",
        Value {
            node: NodeIndex::new(999),
            output: 0,
        },
    );
    assert!(bad.verify().unwrap_err().to_string().contains("output `ghost`"));
}

#[test]
fn malformed_json_is_an_error() {
    assert!(matches!(Graph::from_json("{\"graph\": 3}"), Err(IrError::Json(_))));
    let text = small_graph().to_json().unwrap().replace("\"linear\"", "\"no_such_op\"");
    assert!(Graph::from_json(&text).is_err());
}

#[test]
fn dump_and_dot() {
    let g = small_graph();
    let dump = g.dump().unwrap();
    assert_eq!(
        dump.lines().filter(|l| l.starts_with('%')).count(),
        g.graph.node_count()
    );
    assert!(dump.contains("linear(%0, %1, %2) : f32[2,4]  # fc"), "{dump}");
    assert!(dump.contains("layer_norm{axis=1, eps=1e-6}"), "{dump}");
    assert!(dump.contains("output \"out\""), "{dump}");
    let dot = g.to_dot();
    assert!(
        dot.starts_with("digraph") && dot.contains("n0 -> n3;") && dot.trim_end().ends_with('}'),
        "{dot}"
    );
}

#[test]
fn costs_follow_fvcore_conventions() {
    let g = small_graph();
    let c = g.cost();
    // linear: 2*8 inputs * 4 outputs macs; layer norm: 5 per element (8 elements).
    assert_eq!(c.macs, 2 * 8 * 4 + 5 * 8);
    assert_eq!(c.activations, 8);
}

#[test]
fn artifact_round_trip_and_schedule_checks() {
    use vitdet_ir::Artifact;
    let g = small_graph();
    let order = g.topo_order().unwrap();
    let a = Artifact::new("infer", g.clone(), order.clone(), serde_json::json!({"note": "x"}));
    let back = Artifact::from_json(&a.to_json().unwrap()).unwrap();
    assert_eq!(back.schedule, order);
    assert_eq!(back.metadata["note"], "x");

    let mut reversed = order.clone();
    reversed.reverse();
    let bad = Artifact::new("infer", g.clone(), reversed, serde_json::Value::Null);
    let msg = Artifact::from_json(&bad.to_json().unwrap()).unwrap_err().to_string();
    assert!(msg.contains("before its input"), "{msg}");

    let bad = Artifact::new("infer", g.clone(), order[1..].to_vec(), serde_json::Value::Null);
    let msg = Artifact::from_json(&bad.to_json().unwrap()).unwrap_err().to_string();
    assert!(msg.contains("covers"), "{msg}");

    let text = a.to_json().unwrap().replace("vitdet-artifact/1", "vitdet-artifact/9");
    assert!(Artifact::from_json(&text)
        .unwrap_err()
        .to_string()
        .contains("vitdet-artifact/9"));
}

#[test]
fn matmul_transpose_flags_shape_cost_and_serialization() {
    let mut g = Graph::new();
    let a = param(&mut g, "a", &[2, 4, 3]); // used as [2, 3, 4]
    let b = param(&mut g, "b", &[5, 4]); // used as [4, 5]
    let op = MatMul {
        transpose_lhs: true,
        transpose_rhs: true,
    };
    let y = g.add(op.clone(), "mm", &[a, b]).unwrap();
    assert_eq!(g.value_type(y).shape, [2, 3, 5]);
    // fvcore: one multiply-add per output element and inner index.
    assert_eq!(g.cost().macs, 2 * 3 * 5 * 4);
    // Untransposed, the same operands do not contract (3 vs 5), and the error says which flags.
    let err = g.add(MatMul::new(false), "bad", &[a, b]).unwrap_err().to_string();
    assert!(err.contains("inner dimensions differ"), "{err}");
    let err = g.add(MatMul::new(true), "bad", &[a, b]).unwrap_err().to_string();
    assert!(err.contains("(3 vs 4)"), "{err}");
    // `transpose_lhs` is written only when set: graphs written before it existed read back.
    let json = |op: &MatMul| serde_json::to_string(op).unwrap();
    assert_eq!(json(&MatMul::new(true)), r#"{"transpose_rhs":true}"#);
    assert_eq!(json(&op), r#"{"transpose_lhs":true,"transpose_rhs":true}"#);
    let old: MatMul = serde_json::from_str(r#"{"transpose_rhs":false}"#).unwrap();
    assert_eq!(old, MatMul::new(false));
    let back: MatMul = serde_json::from_str(&json(&op)).unwrap();
    assert_eq!(back, op);
}
