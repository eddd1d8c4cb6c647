//! Dynamic loss scaling on the compiled training step, with the f32 graph taking a loss scale:
//! the arithmetic the f16 step does (seed the backward with the scale, unscale in f32, skip on
//! inf/NaN) without float16's rounding, so results can be compared exactly.
//!
//! Multiplying the loss seed by a power of two multiplies every backward value by it, and every
//! backward op is linear in its incoming gradient, so each rounding sees the same significand:
//! the scaled gradients are exactly `2^k` times the plain ones unless a value overflows or
//! lives among the subnormals. With 2^12 neither happens (gradients here are far from 2^-126 *
//! 2^12 and from f32's maximum), so the unscaled gradients must equal the plain ones bit for
//! bit. With f32's largest value as the scale, every gradient of magnitude above 1 overflows:
//! the scaler must find the inf, skip the optimizer step and back off (halve the scale).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use vitdet::compile::{compile_train, TrainOptions, TrainStep, LOSS_SCALE_INPUT};
use vitdet::models::ModelConfig;
use vitdet::passes::Precision;
use vitdet::runtime::optim::grad_scaler::{GradScaler, GradScalerConfig, GradScalerState};
use vitdet::runtime::optim::{AdamW, AdamWConfig};
use vitdet::runtime::{run_with_order, ParamStore};

fn step(cfg: &ModelConfig, loss_scale_input: bool) -> TrainStep {
    compile_train(
        cfg.clone(),
        &TrainOptions {
            max_instances: 8,
            precision: Precision::F32,
            loss_scale_input,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The step's gradients, by parameter, with `scale` fed to the loss-scale input when given.
fn gradients(
    step: &TrainStep,
    params: &ParamStore,
    inputs: &[(&str, Tensor)],
    scale: Option<f32>,
) -> Vec<(String, Tensor)> {
    let mut inputs = inputs.to_vec();
    if let Some(s) = scale {
        inputs.push((LOSS_SCALE_INPUT, Tensor::new(s, &Device::Cpu).unwrap()));
    }
    let out = run_with_order(&step.graph, params, &inputs, &Device::Cpu, &step.order).unwrap();
    step.gradients
        .iter()
        .map(|(p, o)| (p.clone(), out.get(o).unwrap().clone()))
        .collect()
}

/// Any tensor's values, exactly (f64 holds every f32 and every integer here).
fn exact(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn scaled_step_unscales_to_the_plain_gradients_and_skips_on_overflow() {
    let preset = ModelConfig::preset("vitdet-tiny").unwrap();
    let s = preset.image_size;
    let (cfg, inputs) = common::train_inputs(&preset, s, 8);
    let plain = step(&cfg, false);
    let scaled = step(&cfg, true);
    assert_eq!(plain.gradients, scaled.gradients);
    let (_, _, ty) = scaled.graph.inputs().find(|(_, n, _)| *n == LOSS_SCALE_INPUT).unwrap();
    assert_eq!(ty.dtype, vitdet::ir::DType::F32);
    assert!(plain.graph.inputs().all(|(_, n, _)| n != LOSS_SCALE_INPUT));
    let params = ParamStore::init_random(&plain.graph, 3, &Device::Cpu).unwrap();

    let reference = gradients(&plain, &params, &inputs, None);
    let largest = reference
        .iter()
        .flat_map(|(_, g)| common::f32s(g))
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(largest > 1.0, "the overflow case needs a gradient above 1 ({largest})");

    let mut scaler = GradScaler::from_state(GradScalerState {
        scale: 4096.0,
        ..GradScaler::new(GradScalerConfig::default()).unwrap().state()
    })
    .unwrap();
    let at_4096 = gradients(&scaled, &params, &inputs, Some(scaler.scale()));
    let unscaled = scaler.unscale(&at_4096).unwrap();
    assert!(!unscaled.found_inf);
    let mut nonzero = 0;
    for ((name, g), (_, r)) in unscaled.gradients.iter().zip(&reference) {
        let (g, r) = (common::f32s(g), common::f32s(r));
        assert_eq!(g, r, "{name}: unscaled gradient differs from the plain one");
        nonzero += r.iter().filter(|v| **v != 0.0).count();
    }
    assert!(nonzero > 10_000, "only {nonzero} nonzero gradient values");

    // Overflow: the step is skipped (AdamW untouched, parameters unchanged) and the scale halves.
    let mut overflow = GradScaler::from_state(GradScalerState {
        scale: f32::MAX,
        ..scaler.state()
    })
    .unwrap();
    let huge = gradients(&scaled, &params, &inputs, Some(overflow.scale()));
    let mut optimizer = AdamW::new(AdamWConfig::default()).unwrap();
    let mut stepped = params.clone();
    let done = overflow
        .step(&huge, |g| optimizer.step(&mut stepped, g, |_| Some((1e-3, 0.1))))
        .unwrap();
    assert!(done.skipped);
    assert_eq!(overflow.scale(), f32::MAX / 2.0);
    assert!(optimizer.states().next().is_none());
    let before: HashMap<&str, &Tensor> = params.iter().collect();
    for (name, t) in stepped.iter() {
        assert_eq!(exact(t), exact(before[name]), "{name} changed on a skipped step");
    }

    // A clean step at 4096 updates with exactly the plain gradients' AdamW step.
    let mut expected = params.clone();
    AdamW::new(AdamWConfig::default())
        .unwrap()
        .step(&mut expected, &reference, |_| Some((1e-3, 0.1)))
        .unwrap();
    let mut optimizer = AdamW::new(AdamWConfig::default()).unwrap();
    let mut stepped = params.clone();
    let done = scaler
        .step(&at_4096, |g| optimizer.step(&mut stepped, g, |_| Some((1e-3, 0.1))))
        .unwrap();
    assert!(!done.skipped);
    assert_eq!((scaler.scale(), scaler.growth_tracker()), (4096.0, 1));
    for (name, t) in stepped.iter() {
        assert_eq!(exact(t), exact(expected.get(name).unwrap()), "{name}");
    }
}
