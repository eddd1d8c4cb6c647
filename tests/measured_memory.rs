//! The runtime's measured heap peak beside the memory planner's arena, on CPU runs of the tiny
//! presets at 128 and 256 px, in inference (the whole detector) and training (the training
//! graph and its gradients, with the attention unfused and fused) mode.
//!
//! The counting allocator is this test binary's global allocator; the executor resets its
//! high-water mark before every node and reads it back after, so each step's measured figure
//! covers the node's inputs, outputs and everything its kernel allocated meanwhile. The plan's
//! figure for a step is its live buffers plus the node's workspace.
//!
//! Tolerance: the measured peak within 3% of the planned arena, either way. What the plan does
//! not model (see `vitdet_passes::memory::workspace`): the gemm crate's packing buffers (tens of
//! KiB per product, sized from the machine's caches), the executor's own bookkeeping (tensor
//! headers, its map of held values) and the host-side tables of the detection kernels (f64
//! copies, sampling grids, match lists: up to a few MiB, data dependent, far from the peak step
//! in these models). At the smallest arena here (about 3.9 MB) the first two are under 1%.
//! Measured today: within 0.5% on every configuration.
//!
//! The training graph's mask head runs on dynamic rows (the sampled foreground RoIs), which the
//! plan reserves at their bound. So that the run fills the bound, the training graphs here sample
//! one foreground RoI per image ([`one_foreground`]): every synthetic image has an instance,
//! whose gt box the sampler counts as a foreground proposal.
//!
//! One warm-up run comes first: the first products on each thread allocate the gemm crate's
//! thread-local cache-sized slabs (about 1.5 MB on the 2-core development machine), which then
//! live as long as the process, like the rayon pool itself; they are not memory of a run.

mod common;

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use vitdet::ir::Graph;
use vitdet::models::{build_detector_for_image, build_detector_training_with, ModelConfig, TrainingConfig};
use vitdet::passes::{differentiate, fuse_attention, plan_memory, schedule};
use vitdet::runtime::{run_with_order, ParamStore};

#[global_allocator]
static ALLOC: vitdet::runtime::alloc::CountingAllocator = vitdet::runtime::alloc::CountingAllocator;

/// Measurements read process-wide counters: tests in this binary run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Measured peak over planned arena for `graph` run in its schedule on `inputs`, and the
/// worst measured over planned live bytes at a fused window-attention step (1.0 if none).
fn measure(name: &str, graph: &Graph, inputs: &[(&str, Tensor)]) -> (f64, f64) {
    let order = schedule(graph).unwrap();
    let plan = plan_memory(graph, &order).unwrap();
    plan.check(graph, &order).unwrap();
    let params = ParamStore::init_random(graph, 3, &Device::Cpu).unwrap();
    let inputs: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(n, t)| {
            let want = graph.inputs().find(|(_, m, _)| m == n).unwrap().2.shape.clone();
            (*n, t.reshape(want.as_slice()).unwrap())
        })
        .collect();
    let out = run_with_order(graph, &params, &inputs, &Device::Cpu, &order).unwrap();
    let measured = out.measured_peak_bytes.expect("the counting allocator is installed");
    let steps = out.measured_step_bytes.as_ref().unwrap();
    assert_eq!(steps.len(), order.len());
    let ratio = measured as f64 / plan.arena_bytes as f64;
    println!(
        "{name}: measured peak {measured} B, planned arena {} B (lower bound {} B), ratio {ratio:.4}",
        plan.arena_bytes, plan.lower_bound_bytes
    );
    // The steps where measurement and plan differ most, for whoever investigates a gap.
    let mut gaps: Vec<(i64, usize)> = steps
        .iter()
        .zip(plan.step_live_bytes.iter())
        .enumerate()
        .map(|(i, (&m, &p))| (m as i64 - p as i64, i))
        .collect();
    gaps.sort_by_key(|&(d, _)| -d.abs());
    // The fused attention's steps: measured over planned (its workspace rule), the worst.
    let mut attention = 1.0f64;
    for (i, &n) in order.iter().enumerate() {
        if graph.node(n).op.name().starts_with("window_attention") {
            let r = steps[i] as f64 / plan.step_live_bytes[i] as f64;
            if (r - 1.0).abs() > (attention - 1.0).abs() {
                attention = r;
            }
        }
    }
    if attention != 1.0 {
        println!("  window attention steps: worst measured / planned {attention:.4}");
    }
    (ratio, attention)
}

/// The training graph with one foreground slot in its RoI sample (see the module doc).
fn one_foreground(cfg: &ModelConfig, s: usize) -> Graph {
    let tc = TrainingConfig::default();
    let tc = TrainingConfig {
        roi_positive_fraction: 1.0 / tc.roi_batch_size_per_image as f64,
        ..tc
    };
    build_detector_training_with(cfg, [s, s], 8, &tc).unwrap()
}

/// The tolerance (see the module doc).
const TOLERANCE: f64 = 0.03;

/// Measured over planned live bytes at each fused window-attention step: the workspace rule
/// (`vitdet_passes::memory::workspace`'s window attention phases) against the kernel. Measured
/// today: within 2% at 256 px; at 128 px the steps are only 0.6-2.5 MB and 20-90 KB the rule
/// does not count (the gemm crate's packing buffers, the small per-chunk tensors) leave them up
/// to 7.7% above the plan.
const ATTENTION_STEP_TOLERANCE: f64 = 0.09;

#[test]
fn measured_peak_is_within_3_percent_of_the_planned_arena() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(vitdet::runtime::alloc::installed());
    let mut failures = Vec::new();
    let mut warmed_up = false;
    for preset in ["vit-tiny", "vitdet-tiny"] {
        for s in [128usize, 256] {
            let mut cfg = ModelConfig::preset(preset).unwrap();
            cfg.image_size = s;
            let (cfg, train) = common::train_inputs(&cfg, s, 8);
            let infer = build_detector_for_image(&cfg, [s, s]).unwrap();
            let image = vec![("image", train[0].1.to_dtype(DType::F32).unwrap())];
            if !warmed_up {
                let _ = measure("warm-up", &infer, &image);
                warmed_up = true;
            }
            let forward = one_foreground(&cfg, s);
            let train_graph = differentiate(&forward, "loss").unwrap().graph;
            // The fused window attention, whose kernel's scratch the plan models phase by phase.
            let fused = fuse_attention(&forward).unwrap().graph;
            let fused_graph = differentiate(&fused, "loss").unwrap().graph;
            for (mode, graph, inputs) in [
                ("infer", &infer, &image),
                ("train", &train_graph, &train),
                ("train fused", &fused_graph, &train),
            ] {
                let name = format!("{preset} {s}px {mode}");
                let (ratio, attention) = measure(&name, graph, inputs);
                if (ratio - 1.0).abs() > TOLERANCE {
                    failures.push(format!("{name}: measured / planned = {ratio:.4}"));
                }
                if (attention - 1.0).abs() > ATTENTION_STEP_TOLERANCE {
                    failures.push(format!("{name}: at a window attention step {attention:.4}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "outside {TOLERANCE}: {failures:?}");
}

#[test]
fn the_breakdown_splits_the_arena() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = ModelConfig::preset("vitdet-tiny").unwrap();
    let s = cfg.image_size;
    let forward = one_foreground(&cfg, s);
    let graph = differentiate(&forward, "loss").unwrap().graph;
    let order = schedule(&graph).unwrap();
    let plan = plan_memory(&graph, &order).unwrap();
    let b = plan.breakdown(&graph, &order, 123);
    println!("{}", serde_json::to_string(&b).unwrap());
    assert_eq!(
        b.saved_activations + b.gradients_at_peak + b.transient_activations + b.workspace + b.fragmentation,
        b.arena
    );
    assert_eq!(b.arena, plan.arena_bytes as u64);
    assert_eq!(b.parameters, graph.param_bytes() as u64);
    assert_eq!(b.optimizer_state, 123);
    // The peak of a training step is in the backward pass, holding what the forward saved.
    assert!(b.saved_activations > 0 && b.gradients > 0);
    assert!(b.gradients_at_peak <= b.gradients);
    let infer = build_detector_for_image(&cfg, [s, s]).unwrap();
    let order = schedule(&infer).unwrap();
    let b = plan_memory(&infer, &order).unwrap().breakdown(&infer, &order, 0);
    assert_eq!((b.saved_activations, b.gradients, b.gradients_at_peak), (0, 0, 0));
    assert!(b.transient_activations > 0);
}
