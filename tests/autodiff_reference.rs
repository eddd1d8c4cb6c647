//! Whole-backbone parameter gradients of both tiny families against PyTorch autograd
//! (tests/fixtures/generate_grads.py: float64 references from the committed float32 weights).
//!
//! The loss is `sum_k sum(p_k * r_k)` over the pyramid outputs with the fixture's fixed probes,
//! so every parameter of trunk and pyramid receives a gradient through every op of the model.
//!
//! Tolerance: relative L2 error <= 2e-5 per parameter (measured worst: 2.1e-6, a LayerNorm
//! weight of vitdet-tiny; 9.3e-7 for vit-tiny). The forward pass alone already agrees
//! to ~1e-6 (backbone_reference.rs); the backward pass doubles the depth of the float32
//! computation and sums over up to 16k positions per weight, so errors of 1e-6..1e-5 are
//! rounding; a wrong rule gives O(1) errors in the parameters it touches.

mod common;

use candle_core::{DType, Device};
use common::{compare, load};
use vitdet::ir::ops::{Binary, BinaryKind, Input, ReduceSum};
use vitdet::ir::{TensorType, Value};
use vitdet::models::{build_backbone, ModelConfig};
use vitdet::passes::differentiate;
use vitdet::runtime::{run, ParamStore};

const TOL: f64 = 2e-5;

fn check(preset: &str, stem: &str) {
    let config = ModelConfig::preset(preset).unwrap();
    let mut graph = build_backbone(&config).unwrap();
    let reference = load(&format!("{stem}_grads.safetensors"));
    let mut loss: Option<Value> = None;
    let mut probes = Vec::new();
    for k in ["p2", "p3", "p4", "p5", "p6"] {
        let out = graph.outputs.iter().find(|o| o.name == k).unwrap().value;
        let probe = reference[&format!("probe.{k}")].clone();
        let ty = TensorType::new(vitdet::ir::DType::F32, probe.dims().to_vec());
        let name = format!("probe.{k}");
        let r = graph.add(Input { name: name.clone(), ty }, "loss", &[]).unwrap();
        let prod = graph.add(Binary { kind: BinaryKind::Mul }, "loss", &[out, r]).unwrap();
        let s = graph
            .add(
                ReduceSum {
                    axes: (0..4).collect(),
                    keepdim: false,
                },
                "loss",
                &[prod],
            )
            .unwrap();
        loss = Some(match loss {
            None => s,
            Some(l) => graph.add(Binary { kind: BinaryKind::Add }, "loss", &[l, s]).unwrap(),
        });
        probes.push((name, probe));
    }
    graph.set_output("loss", loss.unwrap());
    let diff = differentiate(&graph, "loss").unwrap();
    assert!(
        diff.unreached.is_empty(),
        "{preset}: no gradient for {:?}",
        diff.unreached
    );

    let device = Device::Cpu;
    let params =
        ParamStore::load_safetensors(common::fixture(&format!("{stem}.safetensors")), &graph, &device).unwrap();
    let image = load(&format!("{stem}_io.safetensors"))["image"].clone();
    let mut inputs = vec![("image", image)];
    inputs.extend(probes.iter().map(|(n, t)| (n.as_str(), t.clone())));
    let out = run(&diff.graph, &params, &inputs, &device).unwrap();

    let l = out
        .get("loss")
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    let lref = reference["loss"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!(
        (l - lref).abs() <= 1e-5 * lref.abs(),
        "{preset}: loss {l} vs PyTorch {lref}"
    );

    let mut worst = (0.0, String::new());
    for (param, output) in &diff.gradients {
        let ours = out.get(output).unwrap();
        let theirs = reference
            .get(&format!("grad.{param}"))
            .unwrap_or_else(|| panic!("{preset}: PyTorch has no parameter {param}"));
        let (rel, _) = compare(ours, theirs);
        if rel > worst.0 {
            worst = (rel, param.clone());
        }
        assert!(
            rel <= TOL,
            "{preset} {param}: gradient relative L2 error {rel:.3e} > {TOL:e}"
        );
    }
    let trainable = graph.parameters().filter(|(_, p)| p.trainable).count();
    assert_eq!(diff.gradients.len(), trainable);
    assert_eq!(
        trainable,
        reference.keys().filter(|k| k.starts_with("grad.")).count(),
        "{preset}: parameter count"
    );
    eprintln!(
        "{preset}: {} gradients, worst relative L2 {:.2e} ({})",
        trainable, worst.0, worst.1
    );
}

#[test]
fn vitdet_tiny_gradients_match_pytorch() {
    check("vitdet-tiny", "vitdet_tiny");
}

#[test]
fn vit_tiny_gradients_match_pytorch() {
    check("vit-tiny", "vit_tiny");
}
