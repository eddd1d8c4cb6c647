//! Gradients of the whole training graph (targets, heads, losses) against finite differences.
//!
//! The backbone's gradients are checked against PyTorch in autodiff_reference.rs; this covers
//! what only the training graph has: RPN and RoI-head losses through RoIAlign, the box and mask
//! heads and the predictors. Parameters downstream of the proposals are probed: perturbing
//! them cannot change which proposals and RoIs are sampled, so the loss is smooth in them (a
//! backbone or RPN parameter can reorder the proposals and make the loss jump).
//!
//! The graph is the float32 training graph rebuilt in float64 (the ops are dtype-generic). With
//! steps of 1e-5 to 1e-6 times the parameter's RMS along a random direction, the difference
//! quotient's rounding error is ~1e-9 relative. What remains are ReLU inputs crossing zero
//! within the step (hundreds of thousands of units in the box head's first convolution): most
//! parameters agree to 1e-6 or better, the worst (box head, mask head convolutions) to 2.4e-4
//! (the box regression loss alone agrees to 1e-9 there). A wrong rule gives errors of order 1.
//! Tolerance: 2e-3 relative.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use vitdet::models::{build_detector_training, ModelConfig};
use vitdet::passes::differentiate;
use vitdet::runtime::{run, ParamStore};

const TOL: f64 = 2e-3;

fn check(preset: &str) {
    let preset_cfg = ModelConfig::preset(preset).unwrap();
    let s = preset_cfg.image_size;
    let (cfg, inputs) = common::train_inputs(&preset_cfg, s, 8);
    let forward = to_f64(&build_detector_training(&cfg, [s, s], 8).unwrap());
    let seed_shape = forward.inputs().find(|(_, n, _)| *n == "seed").unwrap().2.shape.clone();
    let inputs: Vec<(&str, Tensor)> = inputs
        .into_iter()
        .map(|(n, t)| match n {
            "seed" => (n, t.reshape(seed_shape.as_slice()).unwrap()),
            _ if t.dtype() == DType::F32 => (n, t.to_dtype(DType::F64).unwrap()),
            _ => (n, t),
        })
        .collect();
    let diff = differentiate(&forward, "loss").unwrap();
    // Zero-initialized biases put many ReLU inputs exactly at 0 (e.g. on empty RoI slots), where
    // the derivative is a convention (0, as PyTorch) and a difference quotient sees half the
    // slope: noise on every parameter moves them off the kinks.
    let mut params = ParamStore::init_random(&forward, 3, &Device::Cpu).unwrap();
    let mut names: Vec<String> = params.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    let mut rng = 0x1234_5678u64;
    let mut uniform = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((rng >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    for name in names {
        let t = params.get(&name).unwrap();
        if name.contains("running_var") {
            continue;
        }
        let noise: Vec<f64> = (0..t.elem_count()).map(|_| 0.03 * uniform()).collect();
        let noise = Tensor::from_vec(noise, t.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(t.dtype())
            .unwrap();
        let t = (t + noise).unwrap();
        params.insert(name, t);
    }
    assert_eq!(
        params.get("roi_heads.box_predictor.cls_score.weight").unwrap().dtype(),
        DType::F64
    );
    let out = run(&diff.graph, &params, &inputs, &Device::Cpu).unwrap();
    let loss_of = |p: &ParamStore| -> f64 {
        let o = run(&forward, p, &inputs, &Device::Cpu).unwrap();
        o.get("loss")
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0]
    };
    let base = loss_of(&params);
    let grads: HashMap<&str, &str> = diff.gradients.iter().map(|(p, g)| (p.as_str(), g.as_str())).collect();
    let mut probed: Vec<&str> = grads.keys().copied().filter(|n| n.starts_with("roi_heads.")).collect();
    probed.sort();
    assert!(probed.len() > 10, "{preset}: too few parameters probed");
    let mut checked = 0;
    let mut worst = 0f64;
    for name in probed {
        let p = params.get(name).unwrap();
        let g = out.get(grads[name]).unwrap().to_dtype(DType::F64).unwrap();
        let n = p.elem_count();
        let dir: Vec<f64> = (0..n).map(|_| uniform()).collect();
        let dir = Tensor::from_vec(dir, p.dims(), &Device::Cpu).unwrap();
        let analytic = (&g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let p64 = p.to_dtype(DType::F64).unwrap();
        let rms = (p64.sqr().unwrap().mean_all().unwrap().to_scalar::<f64>().unwrap())
            .sqrt()
            .max(1e-2);
        // A difference quotient is wrong when a ReLU input crosses zero within the step; which
        // units cross depends on the step, so three steps are tried and the closest one kept:
        // a wrong gradient matches none of them (the first step is kept when it agrees to 1e-6).
        let mut numeric = f64::NAN;
        let mut h = 0.0;
        for k in [1e-5, 3e-6, 1e-6] {
            let step = k * rms;
            let shifted = |sign: f64| {
                let mut store = params.clone();
                store.insert(name, (&p64 + (&dir * (sign * step)).unwrap()).unwrap());
                loss_of(&store)
            };
            let q = (shifted(1.0) - shifted(-1.0)) / (2.0 * step);
            if numeric.is_nan() || (q - analytic).abs() < (numeric - analytic).abs() {
                (numeric, h) = (q, step);
            }
            if (numeric - analytic).abs() <= 1e-6 * analytic.abs().max(numeric.abs()) {
                break;
            }
        }
        let scale = analytic.abs().max(numeric.abs());
        // float64 rounding of the loss (~1e-15 relative, amplified by summation order) divided
        // by the step: below ~1000x that, the difference quotient is noise.
        if scale < 1000.0 * base.abs() * 1e-14 / h {
            continue;
        }
        let err = (analytic - numeric).abs() / scale;
        assert!(
            err < TOL,
            "{preset} {name}: analytic {analytic:.6e} vs finite difference {numeric:.6e} ({err:.1e})"
        );
        worst = worst.max(err);
        checked += 1;
    }
    assert!(
        checked > 10,
        "{preset}: only {checked} parameters had a measurable gradient"
    );
    eprintln!("{preset}: {checked} parameters agree with finite differences (worst {worst:.1e})");
}

/// The graph rebuilt in float64: every f32 type in an op's attributes (parameters, inputs,
/// casts) becomes f64, and an op that still produces f32 (anchor generation and target
/// assignment always do) is followed by a cast to f64.
fn to_f64(g: &vitdet::ir::Graph) -> vitdet::ir::Graph {
    use vitdet::ir::ops::Cast;
    use vitdet::ir::{DType as IrDType, Graph, Op, Value};
    fn widen(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) if s == "f32" => *s = "f64".into(),
            serde_json::Value::Array(a) => a.iter_mut().for_each(widen),
            serde_json::Value::Object(o) => o.values_mut().for_each(widen),
            _ => {}
        }
    }
    let mut out = Graph::new();
    let mut map: HashMap<Value, Value> = HashMap::new();
    for n in g.topo_order().unwrap() {
        let node = g.node(n);
        let mut op = serde_json::to_value(&node.op).unwrap();
        widen(&mut op);
        let op: Op = serde_json::from_value(op).unwrap();
        let inputs: Vec<Value> = g.inputs_of(n).iter().map(|v| map[v]).collect();
        let new = out.add_node(op, &node.scope, &inputs).unwrap();
        for (output, ty) in out.node(new).outputs.clone().into_iter().enumerate() {
            let v = Value { node: new, output };
            let v = if ty.dtype == IrDType::F32 {
                out.add(Cast { dtype: IrDType::F64 }, "f64", &[v]).unwrap()
            } else {
                v
            };
            map.insert(Value { node: n, output }, v);
        }
    }
    for o in &g.outputs {
        out.set_output(&o.name, map[&o.value]);
    }
    out
}

#[test]
fn vitdet_tiny_training_gradients() {
    check("vitdet-tiny");
}

#[test]
fn vit_tiny_training_gradients() {
    check("vit-tiny");
}
