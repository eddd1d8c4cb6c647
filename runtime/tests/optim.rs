//! AdamW, parameter groups and the schedule against PyTorch / fvcore / detectron2 references
//! (`tests/fixtures/optim.safetensors`, made by `generate_optim.py` next to it).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use vitdet_ir::ops::{Cast, Init, Input, LayerNorm, Parameter};
use vitdet_ir::{Graph, TensorType};
use vitdet_runtime::optim::{
    all_finite, is_norm_name, layer_id, lr_decay_multiplier, no_decay_reason, non_finite_gradients, AdamW, AdamWConfig,
    GroupConfig, NoDecay, OptimError, ParamGroups, ParamInfo, WarmupCosine,
};
use vitdet_runtime::ParamStore;

fn fixture() -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("tests/fixtures/optim.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn scalar_f64(t: &Tensor) -> f64 {
    t.to_scalar().unwrap()
}

/// Largest |got - want| / max(|want|, floor) over the elements.
fn max_rel_err(got: &Tensor, want: &Tensor, floor: f32) -> f32 {
    assert_eq!(got.dims(), want.dims());
    f32s(got)
        .iter()
        .zip(f32s(want))
        .map(|(a, b)| (a - b).abs() / b.abs().max(floor))
        .fold(0.0, f32::max)
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims() && f32s(a).iter().zip(f32s(b)).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Replays a fixture run (`prefix` = `adamw` or `adamw_b`) and compares every step.
///
/// Tolerances, relative 1e-6 (8 f32 ulps) throughout: the arithmetic is PyTorch's op for op and
/// the parameters come out bit-identical here, but PyTorch's vectorized CPU kernels fuse
/// multiply-adds (`lerp`, `addcmul`), so each moment can differ from ours by about an ulp per
/// step. A wrong formula (bias correction, decay order, eps placement) is off by 1e-4 or more.
/// `exp_avg` is compared relative to `|m_prev| + |g|`, the size of the lerp's terms, since it can
/// cancel to far less; `exp_avg_sq` (non-negative terms) relative to itself; parameters relative
/// to max(|p|, 1e-3), the scale of one update.
fn replay(prefix: &str, names: &[&str], steps: usize, config: AdamWConfig) {
    let (f, _) = fixture();
    let get = |k: String| f.get(&k).unwrap_or_else(|| panic!("fixture key `{k}`")).clone();
    let mut params = ParamStore::from_tensors(names.iter().map(|n| (n.to_string(), get(format!("{prefix}.init.{n}")))));
    let mut opt = AdamW::new(config).unwrap();
    for s in 0..steps {
        let grads: Vec<(String, Tensor)> = names
            .iter()
            .filter_map(|n| {
                f.get(&format!("{prefix}.grad.{s}.{n}"))
                    .map(|g| (n.to_string(), g.clone()))
            })
            .collect();
        let before = params.clone();
        let before_opt = opt.clone();
        opt.step(&mut params, &grads, |n| {
            Some((
                scalar_f64(&get(format!("{prefix}.lr.{s}.{n}"))),
                scalar_f64(&get(format!("{prefix}.wd.{n}"))),
            ))
        })
        .unwrap();
        for n in names {
            let p = params.get(n).unwrap();
            if !grads.iter().any(|(g, _)| g == n) {
                // No gradient: the parameter keeps its exact bits.
                assert!(
                    same_bits(p, before.get(n).unwrap()),
                    "{prefix} step {s}: `{n}` moved without a gradient"
                );
                match (before_opt.state(n), opt.state(n)) {
                    (None, None) => {}
                    (Some(a), Some(b)) => {
                        assert_eq!(
                            a.step, b.step,
                            "{prefix} step {s}: `{n}` step count moved without a gradient"
                        );
                        assert!(same_bits(&a.exp_avg, &b.exp_avg) && same_bits(&a.exp_avg_sq, &b.exp_avg_sq));
                    }
                    _ => panic!("{prefix} step {s}: state of `{n}` appeared or vanished without a gradient"),
                }
            }
            let want = get(format!("{prefix}.param.{s}.{n}"));
            let e = max_rel_err(p, &want, 1e-3);
            assert!(e <= 1e-6, "{prefix} step {s}: parameter `{n}` off by {e:e} (relative)");
            match f.get(&format!("{prefix}.step.{s}.{n}")) {
                None => assert!(
                    opt.state(n).is_none(),
                    "{prefix} step {s}: `{n}` has state before any gradient"
                ),
                Some(step) => {
                    let st = opt
                        .state(n)
                        .unwrap_or_else(|| panic!("{prefix} step {s}: no state for `{n}`"));
                    assert_eq!(
                        st.step as i64,
                        step.to_scalar::<i64>().unwrap(),
                        "{prefix} step {s}: `{n}` step"
                    );
                    // exp_avg: relative to |m_prev| + |g|, the size of the lerp's terms (the result can
                    // cancel to far less); exp_avg_sq: a sum of non-negative terms, relative to itself.
                    let m_prev = f
                        .get(&format!("{prefix}.exp_avg.{}.{n}", s.wrapping_sub(1)))
                        .filter(|_| s > 0)
                        .map(f32s)
                        .unwrap_or_else(|| vec![0.0; p.elem_count()]);
                    let Some(g) = grads.iter().find(|(g, _)| g == n).map(|(_, g)| f32s(g)) else {
                        continue; // checked above: unchanged
                    };
                    let want_m = f32s(&get(format!("{prefix}.exp_avg.{s}.{n}")));
                    for (i, (a, b)) in f32s(&st.exp_avg).into_iter().zip(want_m).enumerate() {
                        let e = (a - b).abs() / (m_prev[i].abs() + g[i].abs());
                        assert!(e <= 1e-6, "{prefix} step {s}: exp_avg[{i}] of `{n}`: {a:e} vs {b:e}");
                    }
                    let e = max_rel_err(&st.exp_avg_sq, &get(format!("{prefix}.exp_avg_sq.{s}.{n}")), 1e-30);
                    assert!(
                        e <= 1e-6,
                        "{prefix} step {s}: exp_avg_sq of `{n}` off by {e:e} (relative)"
                    );
                }
            }
        }
    }
}

#[test]
fn adamw_matches_pytorch() {
    replay("adamw", &["w", "b", "g", "t"], 6, AdamWConfig::default());
}

#[test]
fn adamw_matches_pytorch_with_large_lerp_weight() {
    let config = AdamWConfig {
        beta1: 0.3,
        beta2: 0.99,
        eps: 1e-6,
    };
    replay("adamw_b", &["x"], 3, config);
}

fn store(entries: &[(&str, &[usize])]) -> ParamStore {
    ParamStore::from_tensors(entries.iter().enumerate().map(|(i, (n, shape))| {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|k| ((i * 7 + k) as f32 * 0.37).sin()).collect();
        (n.to_string(), Tensor::from_vec(values, *shape, &Device::Cpu).unwrap())
    }))
}

fn grad(shape: &[usize], value: f32) -> Tensor {
    Tensor::full(value, shape, &Device::Cpu).unwrap()
}

#[test]
fn bad_gradients_are_errors_naming_the_parameter_and_change_nothing() {
    let mut params = store(&[("a.weight", &[2, 3]), ("a.bias", &[3])]);
    let original = params.clone();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let hyper = |_: &str| Some((1e-3, 0.1));
    let ok = ("a.weight".to_string(), grad(&[2, 3], 0.5));
    let cases: Vec<(Vec<(String, Tensor)>, &str)> = vec![
        (
            vec![ok.clone(), ("a.scale".into(), grad(&[3], 1.0))],
            "unknown parameter `a.scale`",
        ),
        (
            vec![ok.clone(), ("a.bias".into(), grad(&[4], 1.0))],
            "gradient for `a.bias`: expected shape [3]",
        ),
        (vec![ok.clone(), ok.clone()], "two gradients for parameter `a.weight`"),
        (
            vec![
                ok.clone(),
                ("a.bias".into(), grad(&[3], 1.0).to_dtype(DType::F64).unwrap()),
            ],
            "`a.bias`: AdamW updates f32",
        ),
    ];
    for (grads, expected) in cases {
        let e = opt.step(&mut params, &grads, hyper).unwrap_err().to_string();
        assert!(e.contains(expected), "`{e}` should contain `{expected}`");
    }
    // A gradient for a parameter without hyperparameters (a buffer, a frozen parameter).
    let e = opt
        .step(&mut params, std::slice::from_ref(&ok), |n| {
            (n != "a.weight").then_some((1e-3, 0.0))
        })
        .unwrap_err();
    assert!(
        matches!(e, OptimError::NoHyperparameters { ref name } if name == "a.weight"),
        "{e}"
    );
    let e = opt
        .step(&mut params, std::slice::from_ref(&ok), |_| Some((f64::NAN, 0.0)))
        .unwrap_err();
    assert!(e.to_string().contains("learning rate NaN"), "{e}");
    // Nothing moved, no state was created, although the first gradient of each call was valid.
    for (n, t) in original.iter() {
        assert!(same_bits(t, params.get(n).unwrap()), "`{n}` changed by a failed step");
    }
    assert!(opt.states().next().is_none());
}

#[test]
fn config_ranges_are_checked() {
    for (b1, b2, eps) in [
        (1.0, 0.999, 1e-8),
        (0.9, -0.1, 1e-8),
        (0.9, 0.999, -1.0),
        (f64::NAN, 0.9, 1e-8),
    ] {
        let e = AdamW::new(AdamWConfig {
            beta1: b1,
            beta2: b2,
            eps,
        })
        .unwrap_err();
        assert!(matches!(e, OptimError::Config(_)), "{e}");
    }
}

#[test]
fn non_finite_gradients_are_found() {
    let mut values = vec![1.0f32; 6];
    let clean = vec![
        (
            "a".to_string(),
            Tensor::from_vec(values.clone(), (2, 3), &Device::Cpu).unwrap(),
        ),
        (
            "b".to_string(),
            Tensor::new(&[f32::MAX, -f32::MAX][..], &Device::Cpu).unwrap(),
        ),
    ];
    assert!(all_finite(&clean).unwrap());
    values[4] = f32::NAN;
    let nan = Tensor::from_vec(values.clone(), (2, 3), &Device::Cpu).unwrap();
    values[4] = f32::NEG_INFINITY;
    let inf = Tensor::from_vec(values, (2, 3), &Device::Cpu).unwrap();
    let grads = vec![
        ("x".to_string(), nan),
        clean[0].clone(),
        ("y".to_string(), inf),
        clean[1].clone(),
    ];
    assert!(!all_finite(&grads).unwrap());
    assert_eq!(
        non_finite_gradients(&grads).unwrap(),
        vec!["x".to_string(), "y".to_string()]
    );
}

/// Exact: the same f64 formula as fvcore (one `cos` from the platform's libm), so equality is
/// expected bit for bit; a 1e-15 relative slack covers a libm whose `cos` rounds the other way.
#[test]
fn schedule_matches_detectron2() {
    let (f, _) = fixture();
    let mut cases = 0;
    for key in f.keys().filter(|k| k.starts_with("sched.") && k.ends_with(".iters")) {
        let case = key.trim_start_matches("sched.").trim_end_matches(".iters");
        let (max_iter, warmup) = case.split_once('_').unwrap();
        let s = WarmupCosine::new(max_iter.parse().unwrap(), warmup.parse().unwrap()).unwrap();
        let iters: Vec<i64> = f[key].to_vec1().unwrap();
        let values = f64s(&f[&format!("sched.{case}.values")]);
        for (i, want) in iters.iter().zip(values) {
            let got = s.multiplier(*i as u64).unwrap();
            assert!(
                (got - want).abs() <= 1e-15 * want.abs(),
                "schedule {case} at {i}: {got:e} vs detectron2 {want:e}"
            );
        }
        cases += 1;
    }
    assert_eq!(cases, 7);
}

#[test]
fn schedule_shape_by_hand() {
    let s = WarmupCosine::new(100, 10).unwrap();
    // Warmup starts at the warmup factor, reaches the cosine at 10, cosine ends at 0.
    assert_eq!(s.multiplier(0).unwrap(), 0.001);
    let at10 = 0.5 * (1.0 + (std::f64::consts::PI * 0.1).cos());
    assert_eq!(s.multiplier(10).unwrap(), at10);
    let at5 = s.multiplier(5).unwrap();
    assert!((at5 - (0.001 + at10) / 2.0).abs() < 1e-15, "{at5}");
    assert!((s.multiplier(50).unwrap() - 0.5).abs() < 1e-15);
    assert!(s.multiplier(100).unwrap().abs() < 1e-15);
    assert!(matches!(
        s.multiplier(101),
        Err(OptimError::IterationOutOfRange {
            iteration: 101,
            max_iter: 100
        })
    ));
    assert!(WarmupCosine::new(0, 0).is_err());
    assert!(WarmupCosine::new(10, 11).is_err());
    assert!(WarmupCosine::with_warmup_factor(10, 1, -1.0).is_err());
}

/// Exact: the same `pow` as Python's `float ** int`.
#[test]
fn layer_decay_matches_detectron2() {
    let (f, meta) = fixture();
    let names: Vec<String> = serde_json::from_str(&meta["decay_names"]).unwrap();
    for (num_layers, rate) in [(24usize, 0.8f64), (32, 0.9), (24, 0.7)] {
        let want = f64s(&f[&format!("decay.{num_layers}_{rate}")]);
        for (name, want) in names.iter().zip(want) {
            let got = lr_decay_multiplier(name, rate, num_layers).unwrap();
            assert_eq!(got, want, "{name} ({num_layers} layers, rate {rate})");
        }
    }
}

#[test]
fn layer_ids_by_hand() {
    assert_eq!(layer_id("backbone.net.pos_embed", 12).unwrap(), 0);
    assert_eq!(layer_id("backbone.net.patch_embed.proj.bias", 12).unwrap(), 0);
    assert_eq!(layer_id("backbone.net.blocks.0.norm1.weight", 12).unwrap(), 1);
    assert_eq!(layer_id("backbone.net.blocks.11.attn.qkv.weight", 12).unwrap(), 12);
    assert_eq!(layer_id("backbone.simfp_2.0.weight", 12).unwrap(), 13);
    assert_eq!(layer_id("roi_heads.box_predictor.cls_score.weight", 12).unwrap(), 13);
    // Only names under `backbone` are placed in the trunk.
    assert_eq!(layer_id("head.blocks.0.weight", 12).unwrap(), 13);
    let e = layer_id("backbone.net.blocks.12.mlp.fc1.weight", 12)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block 12 does not exist in a 12-block ViT"), "{e}");
    let e = layer_id("backbone.net.blocks.first.weight", 12)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`backbone.net.blocks.first.weight`") && e.contains("not a block number"),
        "{e}"
    );
}

/// Trainable parameter names and shapes of the tiny presets, read from the model fixtures.
fn preset_params(files: &[&str]) -> Vec<ParamInfo> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut infos = Vec::new();
    for file in files {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            // Buffers (BatchNorm statistics) are not trained.
            if name.contains("running_") || name.ends_with("num_batches_tracked") {
                continue;
            }
            infos.push(ParamInfo::new(name, view.shape().to_vec()));
        }
    }
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    infos
}

#[test]
fn groups_of_both_families() {
    for (files, blocks) in [
        (["vitdet_tiny.safetensors", "vitdet_tiny_detector.safetensors"], 4),
        (["vit_tiny.safetensors", "vit_tiny_detector.safetensors"], 8),
    ] {
        let infos = preset_params(&files);
        let n = infos
            .iter()
            .filter(|i| i.name.starts_with("backbone.net.blocks.") && i.name.ends_with(".norm1.weight"))
            .count();
        assert_eq!(n, blocks, "{files:?}: trunk depth");
        let groups = ParamGroups::new(&infos, GroupConfig::paper(n)).unwrap();
        assert_eq!(groups.len(), infos.len());
        for info in &infos {
            let h = groups.get(&info.name).unwrap();
            let leaf = info.name.rsplit('.').next().unwrap();
            // Every weight is decayed unless it is a norm's, every bias and table is not.
            let expect_decay = leaf == "weight" && !info.is_norm;
            assert_eq!(h.weight_decay == 0.1, expect_decay, "{}", info.name);
            assert_eq!(h.weight_decay == 0.0, !expect_decay, "{}", info.name);
            assert_eq!(h.lr, 1e-4 * h.lr_mult, "{}", info.name);
        }
        let total: usize = groups.report().rows.iter().map(|r| r.params).sum();
        assert_eq!(total, infos.len());
    }
    // The norms named by position, and the others.
    for name in [
        "backbone.simfp_2.1.weight",
        "backbone.adapter.up4.1.bias",
        "backbone.net.blocks.3.norm2.weight",
        "backbone.simfp_3.1.norm.bias",
        "backbone.fpn_output4.norm.weight",
        "roi_heads.mask_head.mask_fcn2.norm.weight",
    ] {
        assert!(is_norm_name(name), "{name}");
    }
    for name in [
        "backbone.simfp_2.0.weight",
        "backbone.simfp_2.3.weight",
        "backbone.adapter.up4.0.weight",
        "backbone.adapter.up2.0.bias",
        "backbone.net.blocks.0.attn.qkv.weight",
        "roi_heads.box_head.fc1.weight",
    ] {
        assert!(!is_norm_name(name), "{name}");
    }
    let reason = |n: &str| no_decay_reason(&ParamInfo::new(n, vec![4]));
    assert_eq!(reason("backbone.net.pos_embed"), Some(NoDecay::PositionTable));
    assert_eq!(
        reason("backbone.net.blocks.1.attn.rel_pos_w"),
        Some(NoDecay::PositionTable)
    );
    assert_eq!(
        reason("backbone.net.window_rel_pos_bias.relative_position_bias_table"),
        Some(NoDecay::PositionTable)
    );
    assert_eq!(reason("backbone.net.blocks.1.gamma_2"), Some(NoDecay::LayerScale));
    assert_eq!(reason("backbone.net.blocks.1.norm1.bias"), Some(NoDecay::Norm));
    assert_eq!(reason("roi_heads.box_head.fc1.bias"), Some(NoDecay::Bias));
    assert_eq!(reason("backbone.net.patch_embed.proj.weight"), None);
}

#[test]
fn report_rows_and_multipliers() {
    let infos: Vec<ParamInfo> = [
        ("backbone.net.pos_embed", vec![1, 4, 4, 8]),
        ("backbone.net.patch_embed.proj.weight", vec![8, 3, 2, 2]),
        ("backbone.net.blocks.0.attn.qkv.weight", vec![24, 8]),
        ("backbone.net.blocks.0.attn.qkv.bias", vec![24]),
        ("backbone.net.blocks.1.norm1.weight", vec![8]),
        ("roi_heads.box_predictor.cls_score.weight", vec![3, 8]),
    ]
    .into_iter()
    .map(|(n, s)| ParamInfo::new(n, s))
    .collect();
    let config = GroupConfig {
        base_lr: 2e-4,
        weight_decay: 0.05,
        lr_decay_rate: 0.5,
        num_layers: 2,
    };
    let report = ParamGroups::new(&infos, config).unwrap().report();
    let rows: Vec<(&str, bool, usize, u64, f64, f64)> = report
        .rows
        .iter()
        .map(|r| {
            (
                r.group.as_str(),
                r.decayed,
                r.params,
                r.elements,
                r.lr_mult,
                r.weight_decay,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("embeddings", true, 1, 96, 0.125, 0.05),
            ("embeddings", false, 1, 128, 0.125, 0.0),
            ("block 0", true, 1, 192, 0.25, 0.05),
            ("block 0", false, 1, 24, 0.25, 0.0),
            ("block 1", false, 1, 8, 0.5, 0.0),
            ("rest", true, 1, 24, 1.0, 0.05),
        ]
    );
    let text = report.to_string();
    assert!(text.lines().count() == 2 + rows.len() + 1, "{text}");
    assert!(text.contains("block 0") && text.ends_with("6          472"), "{text}");
    let bad = GroupConfig {
        lr_decay_rate: 0.0,
        ..config
    };
    assert!(ParamGroups::new(&infos, bad).is_err());
    let twice = vec![infos[0].clone(), infos[0].clone()];
    assert!(ParamGroups::new(&twice, config)
        .unwrap_err()
        .to_string()
        .contains("listed twice"));
}

#[test]
fn norms_from_the_graph() {
    // A norm whose parameters' names say nothing (weight through a cast), next to a plain weight
    // and a buffer.
    let mut g = Graph::new();
    let x = g
        .add(
            Input {
                name: "x".into(),
                ty: TensorType::f32(vec![1, 4, 2, 2]),
            },
            "",
            &[],
        )
        .unwrap();
    let param = |g: &mut Graph, name: &str, trainable: bool| {
        g.add(
            Parameter {
                name: name.into(),
                ty: TensorType::f32(vec![4]),
                init: Init::Ones,
                trainable,
            },
            "",
            &[],
        )
        .unwrap()
    };
    let w = param(&mut g, "m.1.weight", true);
    let w = g
        .add(
            Cast {
                dtype: vitdet_ir::DType::F32,
            },
            "",
            &[w],
        )
        .unwrap();
    let b = param(&mut g, "m.1.bias", true);
    let y = g.add(LayerNorm { axis: 1, eps: 1e-6 }, "m.1", &[x, w, b]).unwrap();
    g.set_output("y", y);
    param(&mut g, "m.2.weight", true);
    param(&mut g, "m.2.running_mean", false);
    let infos = ParamInfo::from_graph(&g);
    let got: Vec<(&str, bool)> = infos.iter().map(|i| (i.name.as_str(), i.is_norm)).collect();
    assert_eq!(
        got,
        vec![("m.1.bias", true), ("m.1.weight", true), ("m.2.weight", false)]
    );
}

#[test]
fn step_groups_uses_group_lr_times_multiplier() {
    let infos = vec![
        ParamInfo::new("backbone.net.blocks.0.mlp.fc1.weight", vec![2, 2]),
        ParamInfo::new("roi_heads.box_head.fc1.bias", vec![2]),
    ];
    let groups = ParamGroups::new(&infos, GroupConfig::paper(2)).unwrap();
    let start = store(&[(&infos[0].name, &[2, 2]), (&infos[1].name, &[2])]);
    let grads = vec![
        (infos[0].name.clone(), grad(&[2, 2], 0.3)),
        (infos[1].name.clone(), grad(&[2], -0.2)),
    ];
    let mult = 0.25;
    let (mut a, mut b) = (start.clone(), start.clone());
    let mut oa = AdamW::new(AdamWConfig::default()).unwrap();
    let mut ob = oa.clone();
    oa.step_groups(&mut a, &grads, &groups, mult).unwrap();
    // The same with explicit values: 1e-4 * 0.7^2 (block 0 of 2) with decay 0.1; 1e-4 without.
    ob.step(&mut b, &grads, |n| {
        Some(if n.starts_with("backbone") {
            (1e-4 * 0.7f64.powf(2.0) * mult, 0.1)
        } else {
            (1e-4 * mult, 0.0)
        })
    })
    .unwrap();
    for (n, t) in a.iter() {
        assert!(same_bits(t, b.get(n).unwrap()), "{n}");
        assert!(!same_bits(t, start.get(n).unwrap()), "{n} did not move");
    }
    let e = oa
        .step_groups(&mut a, &[("extra".into(), grad(&[1], 1.0))], &groups, 1.0)
        .unwrap_err();
    assert!(e.to_string().contains("`extra`"), "{e}");
    assert!(oa.step_groups(&mut a, &grads, &groups, f64::INFINITY).is_err());
}
