//! Activation checkpointing executed: every policy computes the same training step as no
//! checkpointing, in less memory.
//!
//! Recomputation reruns the very same ops on the very same inputs with the same kernels (the
//! clones are copies of the forward nodes, and drop path's masks, on here, are counter-based
//! random draws from the step's seed), so the losses and gradients are asserted bit-identical,
//! not merely close.

use candle_core::{DType, Device, Tensor};
use vitdet::ir::Graph;
use vitdet::models::{build_detector_training, ModelConfig};
use vitdet::passes::{apply_checkpointing, differentiate, CheckpointPolicy, Checkpointed, RECOMPUTE_SCOPE};
use vitdet::runtime::{run_with_order, ParamStore, RunOutput};

const MAX_GT: usize = 4;

/// The training graph of a tiny preset, with drop path on (its random masks are recomputed
/// too, and must come out the same).
fn training_graph(preset: &str) -> (ModelConfig, Graph) {
    let mut cfg = ModelConfig::preset(preset).unwrap();
    cfg.drop_path_rate = 0.3;
    let s = cfg.image_size;
    let forward = build_detector_training(&cfg, [s, s], MAX_GT).unwrap();
    let masks = forward
        .graph
        .node_indices()
        .filter(|&n| forward.node(n).op.name() == "drop_path_mask")
        .count();
    assert!(masks > 0, "{preset}: no drop path in the graph");
    (cfg, differentiate(&forward, "loss").unwrap().graph)
}

/// A deterministic image with two objects (so every loss has foreground).
fn inputs(graph: &Graph, s: usize) -> Vec<(&'static str, Tensor)> {
    let dev = Device::Cpu;
    let pixels: Vec<f32> = (0..3 * s * s)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
        .collect();
    let mut boxes = vec![0f32; MAX_GT * 4];
    boxes[..8].copy_from_slice(&[10.0, 12.0, 70.0, 60.0, 50.0, 40.0, 120.0, 110.0]);
    let mut masks = vec![0u8; MAX_GT * s * s];
    for (g, b) in boxes.chunks(4).take(2).enumerate() {
        for y in b[1] as usize..b[3] as usize {
            for x in b[0] as usize..b[2] as usize {
                masks[g * s * s + y * s + x] = 1;
            }
        }
    }
    let seed_shape = graph.inputs().find(|(_, n, _)| *n == "seed").unwrap().2.shape.clone();
    vec![
        ("image", Tensor::from_vec(pixels, (1, 3, s, s), &dev).unwrap()),
        ("gt_boxes", Tensor::from_vec(boxes, (MAX_GT, 4), &dev).unwrap()),
        ("gt_classes", Tensor::new(&[3i64, 17, 0, 0], &dev).unwrap()),
        ("gt_masks", Tensor::from_vec(masks, (MAX_GT, s, s), &dev).unwrap()),
        ("gt_valid", Tensor::new(&[1u8, 1, 0, 0], &dev).unwrap()),
        (
            "seed",
            Tensor::new(&[5i64], &dev)
                .unwrap()
                .reshape(seed_shape.as_slice())
                .unwrap(),
        ),
    ]
}

fn run(c: &Checkpointed, params: &ParamStore, inputs: &[(&str, Tensor)]) -> RunOutput {
    run_with_order(&c.graph, params, inputs, &Device::Cpu, &c.order).unwrap()
}

fn assert_identical(name: &str, a: &RunOutput, b: &RunOutput) {
    assert_eq!(a.outputs.len(), b.outputs.len(), "{name}: outputs differ");
    for ((na, ta), (nb, tb)) in a.outputs.iter().zip(&b.outputs) {
        assert_eq!(na, nb);
        let (ta, tb) = (ta.to_dtype(DType::F64).unwrap(), tb.to_dtype(DType::F64).unwrap());
        let diff = (&ta - &tb)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let diff = diff.to_scalar::<f64>().unwrap();
        assert!(diff == 0.0, "{name}: output `{na}` differs by {diff:e}");
    }
}

fn check_preset(preset: &str, global: Vec<String>) {
    let (cfg, graph) = training_graph(preset);
    let params = ParamStore::init_random(&graph, 11, &Device::Cpu).unwrap();
    let inputs = inputs(&graph, cfg.image_size);
    let none = apply_checkpointing(&graph, &CheckpointPolicy::None, 0).unwrap();
    let reference = run(&none, &params, &inputs);
    let loss = reference.get("loss").unwrap().to_scalar::<f32>().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{preset}: loss {loss}");

    let arena = none.plan.arena_bytes as u64;
    // The tiny backbones are a small part of the step's memory: an automatic budget halfway
    // between no recomputation and every block recomputed.
    let floor = apply_checkpointing(&graph, &CheckpointPolicy::Blocks, 0)
        .unwrap()
        .plan
        .arena_bytes as u64;
    let policies = [
        CheckpointPolicy::Blocks,
        CheckpointPolicy::Scopes(global),
        CheckpointPolicy::Auto {
            budget_bytes: (arena + floor) / 2,
        },
    ];
    for policy in policies {
        let c = apply_checkpointing(&graph, &policy, 0).unwrap();
        assert!(!c.checkpointed.is_empty(), "{preset} {policy:?}: nothing recomputed");
        assert!(c.recompute_flops > 0);
        let out = run(&c, &params, &inputs);
        assert_identical(&format!("{preset} {policy:?}"), &reference, &out);
        // Every clone runs after the forward: once the first backward node has run.
        let first_backward = c
            .order
            .iter()
            .position(|&n| c.graph.node(n).scope.starts_with("backward/"))
            .unwrap();
        let first_clone = c
            .order
            .iter()
            .position(|&n| c.graph.node(n).scope.starts_with(RECOMPUTE_SCOPE))
            .unwrap();
        assert!(
            first_clone > first_backward,
            "{preset} {policy:?}: recomputation during the forward"
        );
        // The runtime holds no more than planned, and less than without recomputation.
        assert!(out.peak_live_bytes < reference.peak_live_bytes, "{preset} {policy:?}");
        eprintln!(
            "{preset} {policy:?}: arena {} -> {} bytes, live peak {} -> {} bytes",
            arena, c.plan.arena_bytes, reference.peak_live_bytes, out.peak_live_bytes
        );
    }
}

#[test]
fn vit_tiny_policies_compute_the_same_step() {
    let global = [1, 3, 5, 7]
        .iter()
        .map(|i| format!("backbone.net.blocks.{i}"))
        .collect();
    check_preset("vit-tiny", global);
}

#[test]
fn vitdet_tiny_policies_compute_the_same_step() {
    let global = [1, 3].iter().map(|i| format!("backbone.net.blocks.{i}")).collect();
    check_preset("vitdet-tiny", global);
}
