//! `Program::run_device_timed` on a GPU: the same outputs as a plain run, and spans on the
//! device's clock that cover every node, are never negative and add up to no more than the
//! call's wall time.

use std::time::Instant;

use candle_core::{Device, Tensor};
use vitdet_ir::ops::{Input, MatMul, Unary, UnaryKind};
use vitdet_ir::{Graph, TensorType};
use vitdet_runtime::{ParamStore, Program};

use crate::common;

#[test]
fn device_clock_spans_cover_the_run() {
    let Some(dev) = common::cuda_device() else { return };
    let n = 2048;
    let mut g = Graph::new();
    let input = Input {
        name: "x".into(),
        ty: TensorType::f32(vec![n, n]),
    };
    let x = g.add(input, "in", &[]).unwrap();
    let product = MatMul {
        transpose_lhs: false,
        transpose_rhs: false,
    };
    let y = g.add(product, "big.matmul", &[x, x]).unwrap();
    let z = g.add(Unary { kind: UnaryKind::Relu }, "small.relu", &[y]).unwrap();
    g.set_output("z", z);
    let order = g.topo_order().unwrap();
    let program = Program::new(&g, &order).unwrap();
    let x = Tensor::randn(0f32, 1f32, (n, n), &Device::Cpu).unwrap();
    let params = ParamStore::new();
    let plain = program.run(&params, &[("x", x.clone())], &dev).unwrap();
    let start = Instant::now();
    let timed = program.run_device_timed(&params, &[("x", x)], &dev).unwrap();
    let wall = start.elapsed().as_secs_f64();
    let (a, b) = (plain.get("z").unwrap(), timed.get("z").unwrap());
    // The same kernels; cuBLAS may pick another algorithm for a call, hence not bit for bit.
    assert!(common::rel_l2(a, b) <= 1e-6, "{}", common::rel_l2(a, b));
    let names: Vec<&String> = timed.op_seconds.keys().collect();
    assert_eq!(
        names,
        ["input", "matmul", "unary"],
        "every node but parameters has a span"
    );
    let spans: f64 = timed.op_seconds.values().sum();
    let by_scope: f64 = timed.scope_seconds.values().sum();
    eprintln!("device clock: {:?} (wall {:.3} ms)", timed.op_seconds, wall * 1e3);
    assert!(timed.op_seconds.values().all(|&s| s >= 0.0));
    assert!((spans - by_scope).abs() <= 1e-9, "{spans} vs {by_scope}");
    assert!(spans > 0.0 && spans <= wall, "spans {spans} s, wall {wall} s");
    // An f32 2048^3 product is 17 GFLOP: far above a launch, on any GPU.
    assert!(timed.op_seconds["matmul"] > 1e-5, "{:?}", timed.op_seconds);
}
