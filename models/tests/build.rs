//! Graph construction for every preset: verify, output shapes, parameter totals, scopes.

use std::collections::BTreeMap;

use vitdet_ir::{Graph, Op};
use vitdet_models::{build_backbone, build_backbone_batched, presets, AttentionStrategy, ModelConfig, RelPos};

fn trainable_with_prefix(g: &Graph, prefix: &str) -> u64 {
    g.parameters()
        .filter(|(_, p)| p.trainable && p.name.starts_with(prefix))
        .map(|(_, p)| p.ty.numel() as u64)
        .sum()
}

fn output_shapes(g: &Graph) -> BTreeMap<String, Vec<usize>> {
    g.outputs
        .iter()
        .map(|o| (o.name.clone(), g.value_type(o.value).shape.clone()))
        .collect()
}

fn count_ops(g: &Graph, name: &str) -> usize {
    g.graph.node_weights().filter(|n| n.op.name() == name).count()
}

#[test]
fn every_preset_builds_and_verifies() {
    for name in presets::NAMES {
        let cfg = ModelConfig::preset(name).unwrap();
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let g = build_backbone(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        g.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
        let s = cfg.image_size;
        let o = cfg.out_channels;
        let names: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["p2", "p3", "p4", "p5", "p6"], "{name}");
        let shapes = output_shapes(&g);
        for (i, p) in ["p2", "p3", "p4", "p5", "p6"].iter().enumerate() {
            let stride = 4 << i;
            let side = s.div_ceil(stride);
            assert_eq!(shapes[*p], vec![1, o, side, side], "{name} {p}");
        }
        let inputs: Vec<_> = g.inputs().map(|(_, n, t)| (n.to_string(), t.shape.clone())).collect();
        assert_eq!(inputs, vec![("image".to_string(), vec![1, 3, s, s])], "{name}");
    }
}

#[test]
fn tiny_output_shapes() {
    for name in ["vit-tiny", "vitdet-tiny"] {
        let g = build_backbone(&ModelConfig::preset(name).unwrap()).unwrap();
        g.verify().unwrap();
        let shapes = output_shapes(&g);
        assert_eq!(shapes["p2"], [1, 16, 32, 32], "{name}");
        assert_eq!(shapes["p3"], [1, 16, 16, 16], "{name}");
        assert_eq!(shapes["p4"], [1, 16, 8, 8], "{name}");
        assert_eq!(shapes["p5"], [1, 16, 4, 4], "{name}");
        assert_eq!(shapes["p6"], [1, 16, 2, 2], "{name}");
    }
}

/// detectron2's `params_by_scope` numbers for ViTDet-B at 1024x1024.
#[test]
fn vitdet_b_parameter_counts_match_detectron2() {
    let g = build_backbone(&ModelConfig::preset("vitdet-b").unwrap()).unwrap();
    assert_eq!(trainable_with_prefix(&g, "backbone.net."), 85_889_024);
    assert_eq!(trainable_with_prefix(&g, "backbone."), 91_449_024);
    assert_eq!(g.param_count(), 91_449_024);
    // Decomposed tables: 14x14 windows -> 27 rows, 64x64 global grid -> 127 rows.
    let shape = |n: &str| {
        g.parameters()
            .find(|(_, p)| p.name == n)
            .map(|(_, p)| p.ty.shape.clone())
    };
    assert_eq!(shape("backbone.net.blocks.0.attn.rel_pos_h"), Some(vec![27, 64]));
    assert_eq!(shape("backbone.net.blocks.2.attn.rel_pos_w"), Some(vec![127, 64]));
    assert_eq!(shape("backbone.net.pos_embed"), Some(vec![1, 197, 768]));
    // Drop path rates 0.1 * i / 11 for blocks 1..=11, two branches each.
    assert_eq!(count_ops(&g, "drop_path"), 22);
    let rates: Vec<f64> = g
        .graph
        .node_weights()
        .filter(|n| n.scope == "backbone.net.blocks.11.drop_path")
        .map(|n| match &n.op {
            Op::DropPath(d) => d.rate,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(rates.len(), 2);
    assert!(rates.iter().all(|r| (r - 0.1).abs() < 1e-12));
}

#[test]
fn vit_b_shares_two_bias_tables() {
    let g = build_backbone(&ModelConfig::preset("vit-b").unwrap()).unwrap();
    assert_eq!(count_ops(&g, "rel_pos_bias"), 2);
    assert_eq!(count_ops(&g, "rel_pos_gather"), 0);
    let shape = |n: &str| {
        g.parameters()
            .find(|(_, p)| p.name == n)
            .map(|(_, p)| p.ty.shape.clone())
    };
    assert_eq!(
        shape("backbone.net.window_rel_pos_bias.relative_position_bias_table"),
        Some(vec![729, 12])
    );
    assert_eq!(
        shape("backbone.net.global_rel_pos_bias.relative_position_bias_table"),
        Some(vec![16129, 12])
    );
    assert!(g
        .parameters()
        .all(|(_, p)| !p.name.contains("rel_pos_h") && !p.name.contains("gamma")));
    // Trunk: ViTDet-B's minus its per-block tables plus the two shared ones.
    let trunk = trainable_with_prefix(&g, "backbone.net.");
    assert_eq!(trunk, 85_889_024 - 27_648 - 65_024 + 729 * 12 + 16_129 * 12);
    // BN running stats are buffers, not parameters.
    let buffers: Vec<_> = g
        .parameters()
        .filter(|(_, p)| !p.trainable)
        .map(|(_, p)| p.name.clone())
        .collect();
    assert_eq!(buffers.len(), 16);
    assert!(buffers
        .iter()
        .all(|n| n.ends_with(".norm.running_mean") || n.ends_with(".norm.running_var")));
}

#[test]
fn scopes_are_module_paths() {
    for name in ["vit-tiny", "vitdet-tiny"] {
        let g = build_backbone(&ModelConfig::preset(name).unwrap()).unwrap();
        for n in g.graph.node_weights() {
            match &n.op {
                Op::Input(_) => assert_eq!(n.scope, ""),
                Op::Parameter(p) => {
                    let leaf = p.name.strip_prefix(&format!("{}.", n.scope));
                    assert!(
                        leaf.is_some_and(|l| !l.contains('.')),
                        "{name}: param {} in scope {}",
                        p.name,
                        n.scope
                    );
                }
                _ => assert!(
                    n.scope.starts_with("backbone"),
                    "{name}: {} in scope `{}`",
                    n.op.name(),
                    n.scope
                ),
            }
        }
        let scope_of = |op: &str| -> Vec<String> {
            let mut v: Vec<String> = g
                .graph
                .node_weights()
                .filter(|n| n.op.name() == op)
                .map(|n| n.scope.clone())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        assert_eq!(scope_of("softmax").len(), if name == "vit-tiny" { 8 } else { 4 });
        assert!(scope_of("softmax")
            .iter()
            .all(|s| s.starts_with("backbone.net.blocks.") && s.ends_with(".attn")));
        // The bicubic pos-embed resize belongs to the trunk; the FPN's nearest upsampling to
        // `backbone` (FPN.forward).
        let want: &[&str] = if name == "vit-tiny" {
            &["backbone", "backbone.net"]
        } else {
            &["backbone.net"]
        };
        assert_eq!(scope_of("resize"), want);
    }
}

#[test]
fn window_padding_and_partition() {
    // vitdet-tiny: 8x8 grid, window 3 -> padded to 9x9 = 9 windows of 9 tokens.
    let g = build_backbone(&ModelConfig::preset("vitdet-tiny").unwrap()).unwrap();
    let pads: Vec<_> = g.graph.node_weights().filter(|n| n.op.name() == "pad").collect();
    assert_eq!(pads.len(), 2); // blocks 0 and 2
    assert_eq!(pads[0].outputs[0].shape, [1, 9, 9, 32]);
    let softmax: Vec<_> = g
        .graph
        .node_weights()
        .filter(|n| n.op.name() == "softmax")
        .map(|n| n.outputs[0].shape.clone())
        .collect();
    // blocks 0..3: window [9 windows * 2 heads, 9, 9], global [2, 64, 64]
    assert_eq!(
        softmax,
        vec![vec![18, 9, 9], vec![2, 64, 64], vec![18, 9, 9], vec![2, 64, 64]]
    );
    // vitdet-b: 64 -> 70 for 14x14 windows.
    let g = build_backbone(&ModelConfig::preset("vitdet-b").unwrap()).unwrap();
    let pad = g.graph.node_weights().find(|n| n.op.name() == "pad").unwrap();
    assert_eq!(pad.outputs[0].shape, [1, 70, 70, 768]);
}

#[test]
fn attention_strategies_and_ablations() {
    for family in ["vit-tiny", "vitdet-tiny"] {
        for attention in [
            AttentionStrategy::Window,
            AttentionStrategy::Hybrid,
            AttentionStrategy::Global,
        ] {
            for rel_pos in [RelPos::Decomposed, RelPos::SharedBias, RelPos::Disabled] {
                for abs_pos in [false, true] {
                    let mut cfg = ModelConfig::preset(family).unwrap();
                    cfg.attention = attention;
                    cfg.rel_pos = Some(rel_pos);
                    cfg.abs_pos = abs_pos;
                    cfg.drop_path_rate = 0.2;
                    let g = build_backbone(&cfg).unwrap_or_else(|e| panic!("{family} {attention:?} {rel_pos:?}: {e}"));
                    g.verify().unwrap();
                    let pads = count_ops(&g, "pad");
                    let windows = match attention {
                        AttentionStrategy::Window => cfg.depth,
                        AttentionStrategy::Hybrid => cfg.depth / 2,
                        AttentionStrategy::Global => 0,
                    };
                    assert_eq!(pads, windows, "{family} {attention:?}");
                    let tables = g
                        .parameters()
                        .filter(|(_, p)| p.name.ends_with("relative_position_bias_table"))
                        .count();
                    let expect = match (rel_pos, attention) {
                        (RelPos::SharedBias, AttentionStrategy::Hybrid) => 2,
                        (RelPos::SharedBias, _) => 1,
                        _ => 0,
                    };
                    assert_eq!(tables, expect, "{family} {attention:?} {rel_pos:?}");
                    assert_eq!(g.parameters().any(|(_, p)| p.name == "backbone.net.pos_embed"), abs_pos);
                }
            }
        }
    }
}

#[test]
fn batched_and_other_sizes() {
    let mut cfg = ModelConfig::preset("vitdet-tiny").unwrap();
    let g = build_backbone_batched(&cfg, 3).unwrap();
    g.verify().unwrap();
    assert_eq!(output_shapes(&g)["p2"], [3, 16, 32, 32]);
    // A grid that equals the pre-training grid needs no resize; 224 -> 14x14.
    cfg.image_size = 224;
    let g = build_backbone(&cfg).unwrap();
    g.verify().unwrap();
    assert_eq!(count_ops(&g, "resize"), 0);
    // Global tables sized for another grid are interpolated by RelPosGather.
    cfg.rel_pos_global_size = Some(64);
    let g = build_backbone(&cfg).unwrap();
    g.verify().unwrap();
    let t = g
        .parameters()
        .find(|(_, p)| p.name == "backbone.net.blocks.1.attn.rel_pos_h")
        .unwrap()
        .1;
    assert_eq!(t.ty.shape, [127, 16]);
}

#[test]
fn graph_json_round_trip() {
    let g = build_backbone(&ModelConfig::preset("vit-tiny").unwrap()).unwrap();
    let back = Graph::from_json(&g.to_json().unwrap()).unwrap();
    back.verify().unwrap();
    assert_eq!(back.param_count(), g.param_count());
}
