//! Type rules of the index helpers `IotaLike` and `CompareScalar`.

use vitdet_ir::ops::{CompareKind, CompareScalar, Input, IotaLike};
use vitdet_ir::{DType, Graph, TensorType};

fn input(g: &mut Graph, ty: TensorType) -> vitdet_ir::Value {
    g.add(Input { name: "x".into(), ty }, "", &[]).unwrap()
}

#[test]
fn iota_like_takes_the_input_shape_and_its_own_dtype() {
    let mut g = Graph::new();
    let x = input(&mut g, TensorType::f32([5, 3]));
    let iota = |axis, start, step, dtype| IotaLike {
        axis,
        start,
        step,
        dtype,
    };
    let y = g.add(iota(1, 0.0, 1.0, DType::I64), "", &[x]).unwrap();
    assert_eq!(g.value_type(y), &TensorType::new(DType::I64, [5, 3]));
    let y = g.add(iota(0, 0.5, 0.0, DType::F32), "", &[x]).unwrap();
    assert_eq!(g.value_type(y), &TensorType::f32([5, 3]));
    assert!(g.add(iota(2, 0.0, 1.0, DType::I64), "", &[x]).is_err());
    assert!(g.add(iota(0, 0.5, 1.0, DType::I64), "", &[x]).is_err());
    assert!(g.add(iota(0, f64::INFINITY, 0.0, DType::F32), "", &[x]).is_err());
    assert!(g.add(iota(0, 0.0, 1.0, DType::I64), "", &[]).is_err());
}

#[test]
fn compare_scalar_gives_a_u8_mask() {
    let mut g = Graph::new();
    let x = input(&mut g, TensorType::f32([4, 1]));
    let y = g
        .add(
            CompareScalar {
                kind: CompareKind::Gt,
                value: 0.0,
            },
            "",
            &[x],
        )
        .unwrap();
    assert_eq!(g.value_type(y), &TensorType::new(DType::U8, [4, 1]));
    assert!(g
        .add(
            CompareScalar {
                kind: CompareKind::Eq,
                value: f64::NAN
            },
            "",
            &[x]
        )
        .is_err());
    let json = serde_json::to_string(&g.node(y.node).op).unwrap();
    assert_eq!(json, r#"{"op":"compare_scalar","kind":"gt","value":0.0}"#);
}
