//! The Mask R-CNN detector graphs: parameter counts against detectron2's, key names, output
//! types, config defaults.

use std::collections::BTreeMap;

use vitdet_ir::{DType, Graph, TensorType};
use vitdet_models::{
    build_backbone, build_detector, build_detector_for_image, DetectorConfig, ModelConfig, DETECTOR_OUTPUT_NAMES,
};

/// Trainable parameter elements whose name starts with `prefix`.
fn count(g: &Graph, prefix: &str) -> u64 {
    g.parameters()
        .filter(|(_, p)| p.trainable && p.name.starts_with(prefix))
        .map(|(_, p)| p.ty.numel() as u64)
        .sum()
}

fn shapes(g: &Graph, prefix: &str) -> BTreeMap<String, Vec<usize>> {
    g.parameters()
        .filter(|(_, p)| p.name.starts_with(prefix))
        .map(|(_, p)| (p.name.clone(), p.ty.shape.clone()))
        .collect()
}

fn output(g: &Graph, name: &str) -> TensorType {
    let o = g
        .outputs
        .iter()
        .find(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name}"));
    g.value_type(o.value).clone()
}

const RPN: u64 = 1_184_015;
const BOX_HEAD: u64 = 15_207_424;
const BOX_PREDICTOR: u64 = 411_025;
const MASK_HEAD: u64 = 2_644_304;

#[test]
fn vitdet_b_has_detectron2_parameter_counts() {
    let cfg = ModelConfig::preset("vitdet-b").unwrap();
    let g = build_detector(&cfg).unwrap();
    assert_eq!(count(&g, "backbone."), 91_449_024);
    assert_eq!(count(&g, "proposal_generator."), RPN);
    assert_eq!(count(&g, "roi_heads.box_head."), BOX_HEAD);
    assert_eq!(count(&g, "roi_heads.box_predictor."), BOX_PREDICTOR);
    assert_eq!(count(&g, "roi_heads.mask_head."), MASK_HEAD);
    assert_eq!(g.param_count(), 110_895_792);
    // Only the backbone, RPN and RoI heads hold parameters.
    assert_eq!(
        count(&g, "backbone.") + count(&g, "proposal_generator.") + count(&g, "roi_heads."),
        g.param_count()
    );
}

#[test]
fn vit_family_totals_match_the_paper() {
    // Table 5: 116M (ViT-B), 339M (ViT-L). The heads are the same size as ViTDet's (BatchNorm
    // has as many trainable parameters as the channel LayerNorm).
    for (name, total) in [("vit-b", 115_676_968u64), ("vit-l", 339_015_056)] {
        let g = build_detector(&ModelConfig::preset(name).unwrap()).unwrap();
        assert_eq!(count(&g, "proposal_generator."), RPN, "{name}");
        assert_eq!(count(&g, "roi_heads."), BOX_HEAD + BOX_PREDICTOR + MASK_HEAD, "{name}");
        assert_eq!(g.param_count(), total, "{name}");
        let backbone = build_backbone(&ModelConfig::preset(name).unwrap()).unwrap();
        assert_eq!(count(&g, "backbone."), backbone.param_count(), "{name}");
    }
}

#[test]
fn head_keys_are_detectron2_state_dict_keys() {
    let g = build_detector(&ModelConfig::preset("vitdet-b").unwrap()).unwrap();
    let mut e: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut put = |k: String, s: &[usize]| {
        e.insert(k, s.to_vec());
    };
    let r = "proposal_generator.rpn_head";
    for k in 0..2 {
        put(format!("{r}.conv.conv{k}.weight"), &[256, 256, 3, 3]);
        put(format!("{r}.conv.conv{k}.bias"), &[256]);
    }
    put(format!("{r}.objectness_logits.weight"), &[3, 256, 1, 1]);
    put(format!("{r}.objectness_logits.bias"), &[3]);
    put(format!("{r}.anchor_deltas.weight"), &[12, 256, 1, 1]);
    put(format!("{r}.anchor_deltas.bias"), &[12]);
    for i in 1..=4 {
        for (head, conv) in [("box_head", "conv"), ("mask_head", "mask_fcn")] {
            let p = format!("roi_heads.{head}.{conv}{i}");
            put(format!("{p}.weight"), &[256, 256, 3, 3]);
            put(format!("{p}.norm.weight"), &[256]);
            put(format!("{p}.norm.bias"), &[256]);
        }
    }
    put("roi_heads.box_head.fc1.weight".into(), &[1024, 256 * 7 * 7]);
    put("roi_heads.box_head.fc1.bias".into(), &[1024]);
    put("roi_heads.box_predictor.cls_score.weight".into(), &[81, 1024]);
    put("roi_heads.box_predictor.cls_score.bias".into(), &[81]);
    put("roi_heads.box_predictor.bbox_pred.weight".into(), &[320, 1024]);
    put("roi_heads.box_predictor.bbox_pred.bias".into(), &[320]);
    put("roi_heads.mask_head.deconv.weight".into(), &[256, 256, 2, 2]);
    put("roi_heads.mask_head.deconv.bias".into(), &[256]);
    put("roi_heads.mask_head.predictor.weight".into(), &[80, 256, 1, 1]);
    put("roi_heads.mask_head.predictor.bias".into(), &[80]);
    let mut found = shapes(&g, "proposal_generator.");
    found.extend(shapes(&g, "roi_heads."));
    assert_eq!(found, e);

    // The paper's model: BatchNorm in the head convs (running statistics are buffers).
    let g = build_detector(&ModelConfig::preset("vit-b").unwrap()).unwrap();
    let bn = shapes(&g, "roi_heads.box_head.conv1.norm.");
    let names: Vec<&str> = bn.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "roi_heads.box_head.conv1.norm.bias",
            "roi_heads.box_head.conv1.norm.running_mean",
            "roi_heads.box_head.conv1.norm.running_var",
            "roi_heads.box_head.conv1.norm.weight"
        ]
    );
}

#[test]
fn one_rpn_conv_is_named_conv() {
    let mut cfg = ModelConfig::preset("vitdet-tiny").unwrap();
    cfg.detector.rpn_num_conv = 1;
    let g = build_detector(&cfg).unwrap();
    let keys: Vec<String> = shapes(&g, "proposal_generator.rpn_head.conv").into_keys().collect();
    assert_eq!(
        keys,
        [
            "proposal_generator.rpn_head.conv.bias",
            "proposal_generator.rpn_head.conv.weight"
        ]
    );
}

fn check_outputs(g: &Graph, d: usize) {
    let names: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, DETECTOR_OUTPUT_NAMES);
    assert_eq!(output(g, "boxes"), TensorType::f32([d, 4]));
    assert_eq!(output(g, "scores"), TensorType::f32([d]));
    assert_eq!(output(g, "classes"), TensorType::new(DType::I64, [d]));
    assert_eq!(output(g, "valid"), TensorType::new(DType::U8, [d]));
    assert_eq!(output(g, "masks"), TensorType::f32([d, 28, 28]));
}

#[test]
fn tiny_detectors_build_and_verify() {
    for name in ["vitdet-tiny", "vit-tiny"] {
        let cfg = ModelConfig::preset(name).unwrap();
        let g = build_detector(&cfg).unwrap();
        g.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
        check_outputs(&g, cfg.detector.detections_per_image);
        let inputs: Vec<(&str, TensorType)> = g.inputs().map(|(_, n, t)| (n, t.clone())).collect();
        assert_eq!(inputs, [("image", TensorType::f32([1, 3, 128, 128]))], "{name}");
        // The backbone's parameters are unchanged by the heads.
        let backbone = build_backbone(&cfg).unwrap();
        assert_eq!(shapes(&g, "backbone."), shapes(&backbone, "backbone."), "{name}");
        // The JSON form round-trips.
        let back = Graph::from_json(&g.to_json().unwrap()).unwrap();
        assert_eq!(back.graph.node_count(), g.graph.node_count());
    }
}

/// The value types of every node of `op` (by op name).
fn op_types(g: &Graph, op: &str) -> Vec<(vitdet_ir::Op, Vec<TensorType>)> {
    g.graph
        .node_indices()
        .map(|i| g.node(i))
        .filter(|n| n.op.name() == op)
        .map(|n| (n.op.clone(), n.outputs.clone()))
        .collect()
}

#[test]
fn static_sizes_follow_the_config() {
    let cfg = ModelConfig::preset("vitdet-tiny").unwrap();
    let g = build_detector_for_image(&cfg, [96, 128]).unwrap();
    // Per-level top-k: min(pre_nms_topk = 200, H * W * 3) for p2..p6 of a 128 input
    // (32, 16, 8, 4, 2 cells a side).
    let ks: Vec<usize> = op_types(&g, "top_k").iter().map(|(_, t)| t[0].shape[0]).collect();
    assert_eq!(ks, [200, 200, 192, 48, 12]);
    let nms = op_types(&g, "nms");
    assert_eq!(nms.len(), 2);
    match &nms[0].0 {
        vitdet_ir::Op::Nms(n) => assert_eq!((n.iou_threshold, n.max_output, n.score_threshold), (0.7, 100, None)),
        o => panic!("{o:?}"),
    }
    match &nms[1].0 {
        vitdet_ir::Op::Nms(n) => assert_eq!(
            (n.iou_threshold, n.max_output, n.score_threshold),
            (0.5, 20, Some(0.05))
        ),
        o => panic!("{o:?}"),
    }
    // Both clips use the given image size, not the padded input.
    for (op, _) in op_types(&g, "clip_boxes") {
        match op {
            vitdet_ir::Op::ClipBoxes(c) => assert_eq!((c.height, c.width), (96.0, 128.0)),
            o => panic!("{o:?}"),
        }
    }
    // RoIAlign: 100 proposals at 7x7, then 20 detections at 14x14.
    let roi: Vec<Vec<usize>> = op_types(&g, "roi_align")
        .into_iter()
        .map(|(_, t)| t[0].shape.clone())
        .collect();
    assert_eq!(roi, [vec![100, 16, 7, 7], vec![20, 16, 14, 14]]);

    assert!(build_detector_for_image(&cfg, [0, 128]).is_err());
    assert!(build_detector_for_image(&cfg, [128, 129]).is_err());
}

#[test]
fn full_size_detector_shapes() {
    let cfg = ModelConfig::preset("vitdet-b").unwrap();
    let g = build_detector(&cfg).unwrap();
    check_outputs(&g, 100);
    // p6 of a 1024 input has 16 * 16 * 3 = 768 anchors, fewer than 1000.
    let ks: Vec<usize> = op_types(&g, "top_k").iter().map(|(_, t)| t[0].shape[0]).collect();
    assert_eq!(ks, [1000, 1000, 1000, 1000, 768]);
    let nms: Vec<Vec<usize>> = op_types(&g, "nms")
        .into_iter()
        .map(|(_, t)| t[0].shape.clone())
        .collect();
    assert_eq!(nms, [vec![1000], vec![100]]);
}

#[test]
fn detector_config_defaults_and_round_trips() {
    let d = DetectorConfig::default();
    assert_eq!(
        (
            d.num_classes,
            d.rpn_num_conv,
            d.rpn_pre_nms_topk,
            d.rpn_post_nms_topk,
            d.detections_per_image
        ),
        (80, 2, 1000, 1000, 100)
    );
    assert_eq!((d.rpn_nms_thresh, d.score_thresh, d.box_nms_thresh), (0.7, 0.05, 0.5));
    assert_eq!(
        (
            d.box_head_num_conv,
            d.box_head_conv_dim,
            d.box_head_fc_dim,
            d.mask_head_num_conv,
            d.mask_head_conv_dim
        ),
        (4, 256, 1024, 4, 256)
    );
    for name in ["vitdet-b", "vit-b"] {
        assert_eq!(ModelConfig::preset(name).unwrap().detector, d, "{name}");
    }
    // A file without a `detector` section gets the defaults; a partial section overrides
    // only its fields.
    let cfg = ModelConfig::from_toml_str("family = \"vitdet\"\nembed_dim = 64\ndepth = 4\nnum_heads = 2\n").unwrap();
    assert_eq!(cfg.detector, d);
    let cfg = ModelConfig::from_toml_str("preset = \"vitdet-b\"\n[detector]\nscore_thresh = 0.3\n").unwrap();
    assert_eq!(
        cfg.detector,
        DetectorConfig {
            score_thresh: 0.3,
            ..d.clone()
        }
    );
    let cfg = ModelConfig::from_json_str(r#"{"preset": "vit-b", "detector": {"detections_per_image": 50}}"#).unwrap();
    assert_eq!(cfg.detector.detections_per_image, 50);
    for name in ["vitdet-tiny", "vit-b"] {
        let mut cfg = ModelConfig::preset(name).unwrap();
        cfg.detector.score_thresh = 0.25;
        cfg.detector.num_classes = 3;
        assert_eq!(ModelConfig::from_json_str(&cfg.to_json()).unwrap(), cfg, "{name} json");
        assert_eq!(ModelConfig::from_toml_str(&cfg.to_toml()).unwrap(), cfg, "{name} toml");
    }
    let e = ModelConfig::from_toml_str("preset = \"vitdet-b\"\n[detector]\nscore_threshold = 0.3\n").unwrap_err();
    assert!(e.to_string().contains("score_threshold"), "{e}");
}

#[test]
fn invalid_detector_configs_error_clearly() {
    type Edit = fn(&mut DetectorConfig);
    let cases: [(Edit, &str); 4] = [
        (|d| d.num_classes = 0, "detector.num_classes"),
        (|d| d.rpn_nms_thresh = 1.5, "detector.rpn_nms_thresh"),
        (|d| d.detections_per_image = 0, "detector.detections_per_image"),
        (|d| d.score_thresh = f64::NAN, "detector.score_thresh"),
    ];
    for (edit, needle) in cases {
        let mut cfg = ModelConfig::preset("vitdet-tiny").unwrap();
        edit(&mut cfg.detector);
        let e = build_detector(&cfg).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
}

#[test]
fn score_threshold_and_class_count_are_config_fields() {
    let mut cfg = ModelConfig::preset("vitdet-tiny").unwrap();
    cfg.detector.score_thresh = 0.0;
    cfg.detector.num_classes = 3;
    let g = build_detector(&cfg).unwrap();
    g.verify().unwrap();
    let s = shapes(&g, "roi_heads.box_predictor.");
    assert_eq!(s["roi_heads.box_predictor.cls_score.weight"], [4, 64]);
    assert_eq!(s["roi_heads.box_predictor.bbox_pred.weight"], [12, 64]);
    assert_eq!(
        shapes(&g, "roi_heads.mask_head.predictor.")["roi_heads.mask_head.predictor.weight"],
        [3, 16, 1, 1]
    );
    match &op_types(&g, "nms")[1].0 {
        vitdet_ir::Op::Nms(n) => assert_eq!(n.score_threshold, Some(0.0)),
        o => panic!("{o:?}"),
    }
}
