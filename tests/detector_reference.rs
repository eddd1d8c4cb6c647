//! The whole test-time Mask R-CNN (backbone, RPN, box head + fast_rcnn_inference, mask head)
//! of both tiny presets against a float64 PyTorch/torchvision re-expression of detectron2's
//! test-time heads (tests/fixtures/generate_detector.py). The backbone weights are the ones of
//! tests/backbone_reference.rs; the head weights (`NAME_detector.safetensors`) are drawn so that
//! every discrete decision (top-k, NMS IoUs, the 0.05 score threshold, RoI levels, RoIAlign
//! sample counts, the top-20 cut) has a clear margin, so a float32 implementation must take
//! the same decisions.
//!
//! Checks: the same RPN proposals (count and order, boxes within 1e-3 px), the same valid
//! detection slots (so the same count), identical classes, boxes within 1e-3 px, scores within
//! 1e-4, masks within 2e-4. The tolerances are ~3x what float32 arithmetic gives: PyTorch's own
//! float32 run of these models (printed by the generator) is off the float64 reference by up to
//! 3.1e-4 px on proposals and boxes, 2.4e-5 on scores and 3.8e-5 on masks; this runtime measured
//! 3.2e-4 px, 3.8e-5 and 5.5e-5 (vit-tiny; vitdet-tiny is 2-5x smaller). Why that large:
//! boxes are up to 128 px (float32 spacing 7.6e-6 px there) and a decoded box multiplies the
//! relative error of its deltas by its size through `exp(dw) * width`; the scores are confident
//! (0.36..0.81), and a softmax probability moves by p(1-p) times the logit error, ~1e-5 after
//! the backbone, four convs and two linear layers. A semantic error (a half-pixel convention, a
//! wrong delta weight, clamp, anchor or RoI level, a wrong mask class) moves boxes by 0.1 px and
//! scores or masks by 1e-2 or more, and any wrong discrete decision fails the exact checks.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{compare, fixture, load};
use vitdet::ir::{Graph, Value};
use vitdet::models::{build_backbone, build_detector, ModelConfig};
use vitdet::runtime::{run, ParamStore};

const BOX_TOL: f64 = 1e-3;
const SCORE_TOL: f64 = 1e-4;
const MASK_TOL: f64 = 2e-4;

/// The RPN's proposal boxes: the only sink of scope `proposal_generator` (the `IndexSelect`
/// after the NMS), i.e. its last node in topological order; its second input is the NMS keep
/// index, whose node's second output is the proposals' validity.
fn proposal_values(graph: &Graph) -> (Value, Value) {
    let order = graph.topo_order().unwrap();
    let idx = order
        .into_iter()
        .rev()
        .find(|&n| graph.node(n).scope == "proposal_generator")
        .expect("proposal_generator scope present");
    let keep = graph.inputs_of(idx)[1];
    (
        Value::from(idx),
        Value {
            node: keep.node,
            output: 1,
        },
    )
}

/// Backbone weights (loaded and key-checked against the backbone graph) plus the head weights;
/// the union must be exactly the detector's parameters.
fn detector_params(preset: &str, name: &str, graph: &Graph, device: &Device) -> ParamStore {
    let cfg = ModelConfig::preset(preset).unwrap();
    let backbone = build_backbone(&cfg).unwrap();
    let mut params = ParamStore::load_safetensors(fixture(&format!("{name}.safetensors")), &backbone, device).unwrap();
    let heads: HashMap<String, Tensor> = load(&format!("{name}_detector.safetensors"));
    for (k, t) in heads {
        if k.ends_with(".num_batches_tracked") {
            continue;
        }
        assert!(
            k.starts_with("proposal_generator.") || k.starts_with("roi_heads."),
            "{name}: head key {k}"
        );
        assert!(params.insert(k.clone(), t).is_none(), "{name}: {k} in both files");
    }
    params.check(graph).unwrap();
    assert_eq!(
        params.len(),
        graph.parameters().count(),
        "{name}: extra keys in the head file"
    );
    params
}

fn check_detector(preset: &str, name: &str) {
    let cfg = ModelConfig::preset(preset).unwrap();
    let mut graph = build_detector(&cfg).unwrap();
    let (proposals, proposals_valid) = proposal_values(&graph);
    graph.set_output("proposals", proposals);
    graph.set_output("proposals_valid", proposals_valid);
    graph.verify().unwrap();
    let device = Device::Cpu;
    let params = detector_params(preset, name, &graph, &device);
    let image = load(&format!("{name}_io.safetensors"))["image"].clone();
    let reference = load(&format!("{name}_detector_io.safetensors"));
    let out = run(&graph, &params, &[("image", image)], &device).unwrap();
    let get = |k: &str| out.get(k).unwrap_or_else(|| panic!("{preset}: no output {k}")).clone();

    // Proposals: same count, same boxes in the same (descending objectness) order.
    let m = reference["proposals"].dims()[0];
    let pvalid = get("proposals_valid").to_vec1::<u8>().unwrap();
    let pm = pvalid.iter().filter(|&&v| v == 1).count();
    assert_eq!(pm, m, "{preset}: valid proposals");
    assert!(
        pvalid[..m].iter().all(|&v| v == 1),
        "{preset}: valid proposals come first"
    );
    let (_, pmax) = compare(&get("proposals").narrow(0, 0, m).unwrap(), &reference["proposals"]);
    eprintln!("{preset}: {m} proposals, max |box diff| {pmax:.2e} px");
    assert!(
        pmax <= BOX_TOL,
        "{preset}: proposals differ by {pmax:.3e} px > {BOX_TOL:e}"
    );

    // Detections: identical valid mask (count) and classes, boxes / scores / masks close.
    let valid = get("valid").to_vec1::<u8>().unwrap();
    assert_eq!(
        valid,
        reference["valid"].to_vec1::<u8>().unwrap(),
        "{preset}: valid slots"
    );
    let n = reference["scores"].dims()[0];
    assert!(n >= 5, "{preset}: the fixture should hold several detections");
    let classes = get("classes").narrow(0, 0, n).unwrap().to_vec1::<i64>().unwrap();
    assert_eq!(
        classes,
        reference["classes"].to_vec1::<i64>().unwrap(),
        "{preset}: classes"
    );
    for (k, tol) in [("boxes", BOX_TOL), ("scores", SCORE_TOL), ("masks", MASK_TOL)] {
        let (rel, max) = compare(&get(k).narrow(0, 0, n).unwrap(), &reference[k]);
        eprintln!("{preset} {k} ({n} detections): rel L2 {rel:.2e}, max abs {max:.2e}");
        assert!(max <= tol, "{preset} {k}: max abs error {max:.3e} > {tol:e}");
    }
}

#[test]
fn vitdet_tiny_detector_matches_pytorch() {
    check_detector("vitdet-tiny", "vitdet_tiny");
}

#[test]
fn vit_tiny_detector_matches_pytorch() {
    check_detector("vit-tiny", "vit_tiny");
}
