use vitdet_ir::ops::{Binary, BinaryKind, Init, Input, Linear, Parameter, Unary, UnaryKind};
use vitdet_ir::{Graph, TensorType};
use vitdet_passes::{liveness, params_by_scope, schedule, CostSummary};

/// x -> a = gelu(x) -> b = gelu(a) -> c = a + b, plus a linear layer's parameters.
fn diamond() -> Graph {
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32([2, 2]),
            },
            "",
            &[],
        )
        .unwrap();
    let a = g.add(Unary { kind: UnaryKind::Gelu }, "m.a", &[x]).unwrap();
    let b = g.add(Unary { kind: UnaryKind::Gelu }, "m.b", &[a]).unwrap();
    let c = g.add(Binary { kind: BinaryKind::Add }, "m.c", &[a, b]).unwrap();
    let w = g
        .add(
            Parameter {
                name: "m.fc.weight".into(),
                ty: TensorType::f32([3, 2]),
                init: Init::Zeros,
                trainable: true,
            },
            "m.fc",
            &[],
        )
        .unwrap();
    let buf = g
        .add(
            Parameter {
                name: "m.bn.running_mean".into(),
                ty: TensorType::f32([3]),
                init: Init::Zeros,
                trainable: false,
            },
            "m.bn",
            &[],
        )
        .unwrap();
    let y = g.add(Linear::default(), "m.fc", &[c, w]).unwrap();
    let z = g.add(Binary { kind: BinaryKind::Add }, "m.out", &[y, buf]).unwrap();
    g.set_output("z", z);
    g
}

#[test]
fn peak_live_bytes_of_a_diamond() {
    let g = diamond();
    let order = schedule(&g).unwrap();
    let l = liveness(&g, &order).unwrap();
    // 16-byte values x, a, b, c; 24-byte y, z. Peak: a, b, c live together (48), or
    // c, y (40), y, z (48) -> 48.
    assert_eq!(l.peak_bytes, 48);
    assert_eq!(l.param_bytes, 24 + 12);
    // Only the output survives to the end.
    assert_eq!(*l.profile.last().unwrap(), 24);
}

#[test]
fn params_are_summed_by_name_prefix() {
    let g = diamond();
    let by = params_by_scope(&g);
    assert_eq!(by["m"], 6);
    assert_eq!(by["m.fc"], 6);
    assert!(!by.contains_key("m.bn"), "buffers are not parameters: {by:?}");
    let c = CostSummary::of(&g);
    assert_eq!(c.params, 6);
    assert_eq!(c.flops, 2 * 2 * 3);
    assert_eq!(c.activations, 6);
    assert_eq!(c.ops["unary"], 2);
}
