//! Values with a dynamic row count: how `DynamicPrefix` makes them, which ops take them, and
//! what verification rejects.

use vitdet_ir::ops::{
    Binary, BinaryKind, Conv2d, Conv2dGradWeight, DynamicPrefix, Init, Input, PadRows, Parameter, ReduceSum, Reshape,
    Unary, UnaryKind,
};
use vitdet_ir::{DType, Graph, TensorType, Value};

fn input(g: &mut Graph, name: &str, ty: TensorType) -> Value {
    g.add(Input { name: name.into(), ty }, "", &[]).unwrap()
}

/// `x [8, 3, 5, 5]` and its dynamic prefix `[<=6, 3, 5, 5]` by the i64 input `count`.
fn prefix_graph() -> (Graph, Value, Value, Value) {
    let mut g = Graph::new();
    let x = input(&mut g, "x", TensorType::f32([8, 3, 5, 5]));
    let count = input(&mut g, "count", TensorType::new(DType::I64, []));
    let p = g
        .add(DynamicPrefix { min_rows: 1, bound: 6 }, "head", &[x, count])
        .unwrap();
    (g, x, count, p)
}

fn weight(g: &mut Graph) -> Value {
    let p = Parameter {
        name: "conv.weight".into(),
        ty: TensorType::f32([4, 3, 3, 3]),
        init: Init::Zeros,
        trainable: true,
    };
    g.add(p, "conv", &[]).unwrap()
}

#[test]
fn dynamic_rows_flow_through_per_row_ops_and_stop_at_reductions() {
    let (mut g, _, _, p) = prefix_graph();
    assert_eq!(g.value_type(p).to_string(), "f32[<=6,3,5,5]");
    let w = weight(&mut g);
    let y = g.add(Conv2d::same(1), "conv", &[p, w]).unwrap();
    assert_eq!(g.value_type(y).to_string(), "f32[<=6,4,5,5]");
    let r = g.add(Unary { kind: UnaryKind::Relu }, "conv", &[y]).unwrap();
    assert!(g.value_type(r).dynamic_rows);
    // A weight gradient and a sum over the rows are computed over the actual rows: static.
    let grad_weight = Conv2dGradWeight {
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
        kernel: [3, 3],
    };
    let gw = g.add(grad_weight, "conv", &[p, y]).unwrap();
    assert_eq!(g.value_type(gw), &TensorType::f32([4, 3, 3, 3]));
    let rows_sum = g
        .add(
            ReduceSum {
                axes: vec![0],
                keepdim: false,
            },
            "sum",
            &[r],
        )
        .unwrap();
    assert!(!g.value_type(rows_sum).dynamic_rows);
    // Summing within each row keeps the rows dynamic.
    let per_row = g
        .add(
            ReduceSum {
                axes: vec![1],
                keepdim: false,
            },
            "sum",
            &[r],
        )
        .unwrap();
    assert_eq!(g.value_type(per_row).to_string(), "f32[<=6,5,5]");
    g.set_output("gw", gw);
    g.set_output("sum", rows_sum);
    g.verify().unwrap();
}

#[test]
fn ops_that_cannot_take_dynamic_rows_are_type_errors() {
    let (mut g, x, _, p) = prefix_graph();
    // A reshape's static shape would not hold on fewer rows.
    let err = g
        .add(Reshape { shape: vec![6, 75] }, "flat", &[p])
        .unwrap_err()
        .to_string();
    assert!(err.contains("dynamic row count") && err.contains("reshape"), "{err}");
    // Mixing a dynamic operand with a static one of the same rows.
    let s = g
        .add(
            vitdet_ir::ops::Slice {
                axis: 0,
                start: 0,
                end: 6,
            },
            "s",
            &[x],
        )
        .unwrap();
    let err = g
        .add(Binary { kind: BinaryKind::Add }, "add", &[p, s])
        .unwrap_err()
        .to_string();
    assert!(err.contains("must have the dynamic rows of input 0"), "{err}");
    // The prefix's own bounds.
    let count = input(&mut g, "count2", TensorType::new(DType::I64, []));
    for (min_rows, bound) in [(0, 4), (5, 4), (1, 9)] {
        let err = g
            .add(DynamicPrefix { min_rows, bound }, "head", &[x, count])
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_rows"), "{err}");
    }
    let f = input(&mut g, "f", TensorType::f32([]));
    let err = g
        .add(DynamicPrefix { min_rows: 1, bound: 4 }, "head", &[x, f])
        .unwrap_err()
        .to_string();
    assert!(err.contains("count must be an i64 scalar"), "{err}");
    // Sources are static.
    let err = g
        .add(
            Input {
                name: "d".into(),
                ty: TensorType::f32([4]).with_dynamic_rows(),
            },
            "",
            &[],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("static shapes"), "{err}");
}

#[test]
fn verify_wants_one_count_and_static_outputs() {
    let (mut g, x, _, p) = prefix_graph();
    let r = g.add(Unary { kind: UnaryKind::Relu }, "act", &[p]).unwrap();
    let total = g
        .add(
            ReduceSum {
                axes: vec![0, 1, 2, 3],
                keepdim: false,
            },
            "sum",
            &[r],
        )
        .unwrap();
    g.set_output("total", total);
    g.verify().unwrap();

    let mut bad = g.clone();
    bad.set_output("rows", r);
    let err = bad.verify().unwrap_err().to_string();
    assert!(err.contains("output `rows` has a dynamic row count"), "{err}");

    let mut bad = g.clone();
    let other = input(&mut bad, "other_count", TensorType::new(DType::I64, []));
    bad.add(DynamicPrefix { min_rows: 1, bound: 2 }, "head", &[x, other])
        .unwrap();
    let err = bad.verify().unwrap_err().to_string();
    assert!(err.contains("read different counts"), "{err}");

    // One count raised to different minimums gives different rows at a count below them.
    let (mut bad, count) = (g.clone(), g.inputs().find(|(_, n, _)| *n == "count").unwrap().0.into());
    bad.add(DynamicPrefix { min_rows: 2, bound: 6 }, "head", &[x, count])
        .unwrap();
    let err = bad.verify().unwrap_err().to_string();
    assert!(err.contains("different min_rows (1 and 2)"), "{err}");
}

#[test]
fn json_keeps_the_flag_and_omits_it_for_static_types() {
    let (mut g, _, _, p) = prefix_graph();
    let total = g
        .add(
            ReduceSum {
                axes: vec![0],
                keepdim: false,
            },
            "sum",
            &[p],
        )
        .unwrap();
    g.set_output("total", total);
    let json = g.to_json().unwrap();
    assert_eq!(json.matches("\"dynamic_rows\"").count(), 1, "{json}");
    let back = Graph::from_json(&json).unwrap();
    back.verify().unwrap();
    assert!(back.value_type(p).dynamic_rows);
    assert!(!back.value_type(total).dynamic_rows);
}

#[test]
fn pad_rows_makes_a_dynamic_value_static_again() {
    let (mut g, x, _, p) = prefix_graph();
    let r = g.add(Unary { kind: UnaryKind::Relu }, "act", &[p]).unwrap();
    let padded = g.add(PadRows { rows: 6 }, "pad", &[r]).unwrap();
    assert_eq!(g.value_type(padded), &TensorType::f32([6, 3, 5, 5]));
    g.set_output("padded", padded);
    g.verify().unwrap();
    // Only a dynamic value, and to at least its bound.
    for (v, rows) in [(x, 8), (r, 5)] {
        let err = g.add(PadRows { rows }, "pad", &[v]).unwrap_err().to_string();
        assert!(err.contains("dynamic rows bounded by at most"), "{err}");
    }
}

#[test]
fn with_rows_lowers_the_bound_and_retypes() {
    let (mut g, _, _, p) = prefix_graph();
    let w = weight(&mut g);
    let y = g.add(Conv2d::same(1), "conv", &[p, w]).unwrap();
    let padded = g.add(PadRows { rows: 6 }, "pad", &[y]).unwrap();
    g.set_output("padded", padded);
    let two = g.with_rows(2).unwrap();
    two.verify().unwrap();
    assert_eq!(two.value_type(y).to_string(), "f32[<=2,4,5,5]");
    assert_eq!(two.value_type(padded), &TensorType::f32([6, 4, 5, 5]));
    // A row count past the bound keeps it.
    assert_eq!(g.with_rows(9).unwrap().value_type(y).to_string(), "f32[<=6,4,5,5]");
}
