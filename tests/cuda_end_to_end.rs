//! The same weights and image through the compiled graphs on the CPU and on a GPU (runs where
//! one exists; skipped, saying so, elsewhere).
//!
//! Tolerances: f32 relative L2 1e-4 per output with TF32 off (candle's default): both devices
//! compute in f32 and differ in summation order only. bf16 (autocast, fused attention) 1e-2:
//! both sides round the same values to bf16, but the GPU accumulates its GEMMs and attention
//! differently before each rounding, so a few bf16 ulps (2^-8) accumulate over the blocks.
//! The f32 training step (losses and every parameter's gradient, fused attention): the loss
//! 1e-4, gradients 1e-3 relative L2, the backward adding its own reordered sums to the
//! forward's. The sampled proposals must be the same on both devices for this to hold; with
//! these weights the RPN scores that decide them differ by far more than the devices do.
#![cfg(feature = "cuda")]

mod common;

use vitdet::compile::{compile_train, Target, TrainOptions, LOSS};
use vitdet::models::ModelConfig;
use vitdet::passes::Precision;
use vitdet::runtime::{run_with_order, Device, ParamStore, Tensor};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    let f = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let (g, w) = (f(got), f(want));
    let d = (&g - &w)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let n = w.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    (d / n.max(1e-300)).sqrt()
}

/// Runs `graph` on both devices with the same seeded weights and inputs (standard normal, the
/// image uniform over 0..255 when `pixels`); returns the outputs.
fn both_with(compiled: &vitdet::compile::Compiled, gpu: &Device, pixels: bool) -> Vec<(String, Tensor, Tensor)> {
    let params = ParamStore::init_random(&compiled.graph, 0, &Device::Cpu).unwrap();
    let on_gpu = params.to_device(gpu).unwrap();
    let inputs: Vec<(String, Tensor)> = compiled
        .graph
        .inputs()
        .map(|(_, name, ty)| {
            let shape = ty.shape.as_slice();
            let t = if pixels && name == vitdet::models::INPUT_NAME {
                Tensor::rand(0f32, 255.0, shape, &Device::Cpu)
            } else {
                Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
            };
            (name.to_string(), t.unwrap())
        })
        .collect();
    let cpu_in: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let gpu_in: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.to_device(gpu).unwrap()))
        .collect();
    let want = run_with_order(&compiled.graph, &params, &cpu_in, &Device::Cpu, &compiled.order).unwrap();
    let got = run_with_order(&compiled.graph, &on_gpu, &gpu_in, gpu, &compiled.order).unwrap();
    want.outputs
        .into_iter()
        .zip(got.outputs)
        .map(|((name, w), (_, g))| (name, g, w))
        .collect()
}

fn both(compiled: &vitdet::compile::Compiled, gpu: &Device) -> Vec<(String, Tensor, Tensor)> {
    both_with(compiled, gpu, false)
}

#[test]
fn backbone_f32_and_bf16_match_the_cpu() {
    let Some(gpu) = cuda() else { return };
    // The graph as built (f32, attention unfused), and as `vitdet infer` runs it: attention
    // fused, in f32 and autocast to bf16.
    for (precision, fused, tol) in [
        (Precision::F32, false, 1e-4),
        (Precision::F32, true, 1e-4),
        (Precision::Bf16, true, 1e-2),
    ] {
        let mut compiled = common::compile_tiny(Target::Backbone);
        if fused {
            compiled.graph = vitdet::compile::lower_inference(&compiled.graph, precision, true)
                .unwrap()
                .0;
            compiled.order = vitdet::passes::schedule(&compiled.graph).unwrap();
        }
        for (name, got, want) in both(&compiled, &gpu) {
            let e = rel_l2(&got, &want);
            assert!(e <= tol, "{precision:?} (fused {fused}) {name}: rel L2 {e:e}");
        }
    }
}

#[test]
fn detector_f32_matches_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let compiled = common::compile_tiny(Target::Detector { image_hw: None });
    for (name, got, want) in both(&compiled, &gpu) {
        assert_eq!(got.dims(), want.dims(), "{name}");
        if got.dtype().is_float() && want.elem_count() > 0 {
            let e = rel_l2(&got, &want);
            assert!(e <= 1e-4, "{name}: rel L2 {e:e}");
        }
    }
}

#[test]
fn training_step_f32_matches_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let preset = ModelConfig::preset("vitdet-tiny").unwrap();
    let (cfg, inputs) = common::train_inputs(&preset, preset.image_size, 8);
    let step = compile_train(
        cfg,
        &TrainOptions {
            max_instances: 8,
            precision: Precision::F32,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        step.fused_attention > 0,
        "the step should run the fused attention kernels"
    );
    let params = ParamStore::init_random(&step.graph, 3, &Device::Cpu).unwrap();
    let on_gpu = params.to_device(&gpu).unwrap();
    let gpu_in: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (*n, t.to_device(&gpu).unwrap())).collect();
    let want = run_with_order(&step.graph, &params, &inputs, &Device::Cpu, &step.order).unwrap();
    let got = run_with_order(&step.graph, &on_gpu, &gpu_in, &gpu, &step.order).unwrap();

    let e = rel_l2(got.get(LOSS).unwrap(), want.get(LOSS).unwrap());
    assert!(e <= 1e-4, "loss: rel L2 {e:e}");
    let mut checked = 0;
    for (param, output) in &step.gradients {
        let (g, w) = (got.get(output).unwrap(), want.get(output).unwrap());
        assert!(g.device().is_cuda(), "{param}: gradient left the GPU");
        let norm = w.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        if norm == 0.0 {
            // Structurally zero (e.g. rows of absent classes): zero on the GPU too, up to noise.
            let most = g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(most <= 1e-6, "{param}: zero on the CPU, up to {most:e} on the GPU");
        } else {
            let e = rel_l2(g, w);
            assert!(e <= 1e-3, "{param}: gradient rel L2 {e:e}");
        }
        checked += 1;
    }
    assert!(checked > 50, "only {checked} gradients");
}

/// The acceptance check at full size: ViTDet-B's backbone and pyramid at 1024x1024 (seeded
/// random weights, an image of uniform pixels) as `vitdet infer` runs them (attention fused),
/// in f32 and bf16, where twelve 768-wide blocks, windows padded from 64 to 70 tokens a side
/// and 4096-token global attention accumulate the devices' differences. Each level's error is
/// printed (`cpu-vs-gpu ...` lines, which scripts/gpu/summary.py collects).
#[test]
fn vitdet_b_backbone_at_1024_matches_the_cpu() {
    let Some(gpu) = cuda() else { return };
    for (precision, tol) in [(Precision::F32, 1e-4), (Precision::Bf16, 1e-2)] {
        let mut compiled = vitdet::compile::compile(&vitdet::compile::CompileOptions {
            model: "vitdet-b".into(),
            image_size: None,
            attention: None,
            target: Target::Backbone,
        })
        .unwrap();
        compiled.graph = vitdet::compile::lower_inference(&compiled.graph, precision, true)
            .unwrap()
            .0;
        compiled.order = vitdet::passes::schedule(&compiled.graph).unwrap();
        for (name, got, want) in both_with(&compiled, &gpu, true) {
            let e = rel_l2(&got, &want);
            eprintln!("cpu-vs-gpu vitdet-b backbone 1024 {precision:?} {name}: rel L2 {e:.2e} (at most {tol:e})");
            assert!(e <= tol, "{precision:?} {name}: rel L2 {e:e}");
        }
    }
}
