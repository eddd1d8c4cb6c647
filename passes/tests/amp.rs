//! Mixed precision: the autocast rewrite of the training graphs of both families.

use vitdet_ir::{DType, Graph};
use vitdet_models::{build_detector_training, ModelConfig};
use vitdet_passes::amp::low_precision_nodes;
use vitdet_passes::{autocast, differentiate, liveness, schedule, Precision};

fn training_forward(model: &str) -> Graph {
    let cfg = ModelConfig::load(model).unwrap();
    let s = cfg.image_size;
    build_detector_training(&cfg, [s, s], 3).unwrap()
}

fn peak(graph: &Graph) -> usize {
    liveness(graph, &schedule(graph).unwrap()).unwrap().peak_bytes
}

#[test]
fn autocast_keeps_losses_and_gradients_f32_and_lowers_activation_memory() {
    for model in ["vit-tiny", "vitdet-tiny"] {
        let forward = training_forward(model);
        let full = differentiate(&forward, "loss").unwrap();
        for precision in [Precision::Bf16, Precision::F16] {
            let low = low_dtype(precision);
            let cast = autocast(&forward, precision).unwrap();
            cast.verify().unwrap();
            // The same parameters, still f32 (the optimizer's master weights).
            assert_eq!(cast.param_bytes(), forward.param_bytes(), "{model}");
            let mixed = differentiate(&cast, "loss").unwrap();
            mixed.graph.verify().unwrap();
            for o in &mixed.graph.outputs {
                let t = mixed.graph.value_type(o.value);
                let want = forward
                    .outputs
                    .iter()
                    .find(|f| f.name == o.name)
                    .map(|f| forward.value_type(f.value).dtype)
                    .unwrap_or(DType::F32);
                assert_eq!(t.dtype, want, "{model} {precision:?}: output {} is {t}", o.name);
            }
            assert_eq!(mixed.gradients.len(), full.gradients.len(), "{model}");
            // Every contraction of forward and backward runs in the low dtype.
            let g = &mixed.graph;
            for n in g.graph.node_indices() {
                let node = g.node(n);
                if matches!(node.op.name(), "linear" | "matmul" | "conv2d" | "conv_transpose2d") {
                    assert_eq!(
                        node.outputs[0].dtype,
                        low,
                        "{model}: {} in {}",
                        node.op.name(),
                        node.scope
                    );
                }
            }
            assert!(!low_precision_nodes(g).is_empty());
            // Activations shrink, though not by half: norms, softmax and losses stay f32.
            let (p32, plow) = (peak(&full.graph), peak(&mixed.graph));
            assert!(plow < p32 * 9 / 10, "{model} {precision:?}: peak {plow} vs f32 {p32}");
        }
        // f32 is the identity.
        let same = autocast(&forward, Precision::F32).unwrap();
        assert_eq!(same.graph.node_count(), forward.graph.node_count());
    }
}

fn low_dtype(p: Precision) -> DType {
    match p {
        Precision::Bf16 => DType::BF16,
        Precision::F16 => DType::F16,
        Precision::F32 => DType::F32,
    }
}

#[test]
fn precision_names_parse_and_bad_ones_are_named() {
    assert_eq!(Precision::parse("bf16").unwrap(), Precision::Bf16);
    assert_eq!(Precision::parse("fp16").unwrap(), Precision::F16);
    let err = Precision::parse("int8").unwrap_err();
    assert!(err.contains("int8") && err.contains("bf16"), "{err}");
}

#[test]
fn weight_casts_fold_into_low_precision_parameters_for_inference() {
    use std::collections::HashMap;
    use vitdet_passes::fold_parameter_casts;
    let cfg = ModelConfig::load("vitdet-tiny").unwrap();
    let forward = vitdet_models::build_backbone(&cfg).unwrap();
    let amp = autocast(&forward, Precision::Bf16).unwrap();
    let folded = fold_parameter_casts(&amp).unwrap();
    folded.verify().unwrap();

    // What each parameter of the autocast graph feeds: casts to bf16 only, or something else.
    let mut only_cast: HashMap<String, bool> = amp.parameters().map(|(_, p)| (p.name.clone(), true)).collect();
    let params: HashMap<_, _> = amp.parameters().map(|(n, p)| (n, p.name.clone())).collect();
    for i in 0..amp.graph.node_count() {
        let n = vitdet_ir::NodeIndex::new(i);
        let is_cast = amp.node(n).op.name() == "cast";
        for v in amp.inputs_of(n) {
            if let Some(name) = params.get(&v.node) {
                if !is_cast {
                    only_cast.insert(name.clone(), false);
                }
            }
        }
    }
    let mut lowered = 0;
    for (_, p) in folded.parameters() {
        let want = if only_cast[&p.name] { DType::BF16 } else { DType::F32 };
        assert_eq!(p.ty.dtype, want, "{}", p.name);
        lowered += (want == DType::BF16) as usize;
    }
    // The linear and conv weights at least; the norms' stay f32.
    assert!(lowered >= 20, "only {lowered} parameters lowered");
    assert!(folded.param_bytes() < amp.param_bytes());
    let casts = |g: &Graph| {
        (0..g.graph.node_count())
            .filter(|&i| g.node(vitdet_ir::NodeIndex::new(i)).op.name() == "cast")
            .count()
    };
    assert_eq!(casts(&folded), casts(&amp) - lowered);
    for (o, a) in folded.outputs.iter().zip(&amp.outputs) {
        assert_eq!(o.name, a.name);
        assert_eq!(folded.value_type(o.value), amp.value_type(a.value), "{}", o.name);
    }
}
