//! Whole backbones (trunk + pyramid) and single blocks of both families against PyTorch
//! references (tests/fixtures/generate.py; the ViTDet trunk there is checked against timm's
//! SAM ViT). References are computed in float64 from float32 weights and inputs, so the error
//! measured here is our float32 arithmetic alone.
//!
//! Tolerance: relative L2 error <= 1e-5. Float32 rounding (2^-24 ~ 6e-8) accumulated through
//! a few hundred dependent ops stays near 1e-6; a semantic mistake (a wrong index, eps or
//! interpolation) gives errors of 1e-3 and more.

mod common;

use candle_core::Device;
use common::{compare, load};
use vitdet::compile::lower_inference;
use vitdet::ir::{Graph, Value};
use vitdet::models::{build_backbone, ModelConfig};
use vitdet::passes::Precision;
use vitdet::runtime::{run, ParamStore};

const TOL: f64 = 1e-5;

/// The trunk output after block `i`: the last value computed in scope `backbone.net.blocks.i`.
fn block_output(graph: &Graph, i: usize) -> Value {
    let scope = format!("backbone.net.blocks.{i}");
    let order = graph.topo_order().unwrap();
    let idx = order
        .into_iter()
        .rfind(|&n| graph.node(n).scope == scope)
        .expect("block scope present");
    Value::from(idx)
}

fn check_family(preset: &str, weights: &str, io: &str) {
    let config = ModelConfig::preset(preset).unwrap();
    let mut graph = build_backbone(&config).unwrap();
    for i in 0..2 {
        let v = block_output(&graph, i);
        graph.set_output(&format!("block{i}"), v);
    }
    graph.verify().unwrap();
    let device = Device::Cpu;
    let params = ParamStore::load_safetensors(common::fixture(weights), &graph, &device).unwrap();
    let io = load(io);
    let out = run(&graph, &params, &[("image", io["image"].clone())], &device).unwrap();
    for name in ["block0", "block1", "p2", "p3", "p4", "p5", "p6"] {
        let (rel, max) = compare(out.get(name).unwrap(), &io[name]);
        eprintln!("{preset} {name}: rel L2 {rel:.2e}, max abs {max:.2e}");
        assert!(rel <= TOL, "{preset} {name}: relative L2 error {rel:.3e} > {TOL:e}");
    }
    // The graph `vitdet infer` runs in f32, attention fused: the fused CPU kernel does the same
    // arithmetic in the same order, so its outputs are the built graph's, bit for bit.
    let (fused, regions) = lower_inference(&graph, Precision::F32, true).unwrap();
    assert_eq!(regions, config.depth, "{preset}: every block's attention fused");
    let fused_out = run(&fused, &params, &[("image", io["image"].clone())], &device).unwrap();
    for name in ["block0", "block1", "p2", "p3", "p4", "p5", "p6"] {
        let (rel, max) = compare(fused_out.get(name).unwrap(), out.get(name).unwrap());
        assert!(
            rel == 0.0 && max == 0.0,
            "{preset} {name}: fused differs from built ({rel:e}, {max:e})"
        );
    }
}

#[test]
fn vitdet_tiny_matches_pytorch() {
    check_family("vitdet-tiny", "vitdet_tiny.safetensors", "vitdet_tiny_io.safetensors");
}

#[test]
fn vit_tiny_matches_pytorch() {
    check_family("vit-tiny", "vit_tiny.safetensors", "vit_tiny_io.safetensors");
}

#[test]
fn json_round_trip_gives_identical_outputs() {
    let config = ModelConfig::preset("vit-tiny").unwrap();
    let graph = build_backbone(&config).unwrap();
    let back = Graph::from_json(&graph.to_json().unwrap()).unwrap();
    back.verify().unwrap();
    assert_eq!(back.to_json().unwrap(), graph.to_json().unwrap());
    let device = Device::Cpu;
    let params = ParamStore::init_random(&graph, 7, &device).unwrap();
    let image = load("vit_tiny_io.safetensors")["image"].clone();
    let a = run(&graph, &params, &[("image", image.clone())], &device).unwrap();
    let b = run(&back, &params, &[("image", image)], &device).unwrap();
    for ((na, ta), (nb, tb)) in a.outputs.iter().zip(&b.outputs) {
        assert_eq!(na, nb);
        let (rel, max) = compare(ta, tb);
        assert!(rel == 0.0 && max == 0.0, "{na}: outputs differ after a JSON round trip");
    }
}

#[test]
fn measured_peak_equals_planned_peak() {
    for preset in ["vitdet-tiny", "vit-tiny"] {
        let graph = build_backbone(&ModelConfig::preset(preset).unwrap()).unwrap();
        let order = vitdet::passes::schedule(&graph).unwrap();
        let planned = vitdet::passes::liveness(&graph, &order).unwrap();
        let device = Device::Cpu;
        let params = ParamStore::init_random(&graph, 0, &device).unwrap();
        let image = load("vit_tiny_io.safetensors")["image"].clone();
        let out = vitdet::runtime::run_with_order(&graph, &params, &[("image", image)], &device, &order).unwrap();
        assert_eq!(out.peak_live_bytes, planned.peak_bytes, "{preset}");
        assert_eq!(out.param_bytes, planned.param_bytes, "{preset}");
    }
}
