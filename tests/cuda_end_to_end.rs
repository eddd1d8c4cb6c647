//! The same weights and image through the compiled graphs on the CPU and on a GPU (runs where
//! one exists; skipped, saying so, elsewhere).
//!
//! Tolerances: f32 relative L2 1e-4 per output with TF32 off (candle's default): both devices
//! compute in f32 and differ in summation order only. bf16 (autocast, fused attention) 1e-2:
//! both sides round the same values to bf16, but the GPU accumulates its GEMMs and attention
//! differently before each rounding, so a few bf16 ulps (2^-8) accumulate over the blocks.
#![cfg(feature = "cuda")]

use vitdet::compile::{compile, CompileOptions, Target};
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

/// Runs `graph` on both devices with the same seeded weights and image; returns the outputs.
fn both(compiled: &vitdet::compile::Compiled, gpu: &Device) -> Vec<(String, Tensor, Tensor)> {
    let params = ParamStore::init_random(&compiled.graph, 0, &Device::Cpu).unwrap();
    let on_gpu = params.to_device(gpu).unwrap();
    let inputs: Vec<(String, Tensor)> = compiled
        .graph
        .inputs()
        .map(|(_, name, ty)| {
            (
                name.to_string(),
                Tensor::randn(0f32, 1.0, ty.shape.as_slice(), &Device::Cpu).unwrap(),
            )
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

#[test]
fn backbone_f32_and_bf16_match_the_cpu() {
    let Some(gpu) = cuda() else { return };
    for (precision, tol) in [(Precision::F32, 1e-4), (Precision::Bf16, 1e-2)] {
        let compiled = compile(&CompileOptions {
            model: "vitdet-tiny".into(),
            image_size: None,
            attention: None,
            target: Target::Backbone,
        })
        .unwrap();
        let mut compiled = compiled;
        if precision != Precision::F32 {
            compiled.graph = vitdet::compile::lower_inference(&compiled.graph, precision, true)
                .unwrap()
                .0;
            compiled.order = vitdet::passes::schedule(&compiled.graph).unwrap();
        }
        for (name, got, want) in both(&compiled, &gpu) {
            let e = rel_l2(&got, &want);
            assert!(e <= tol, "{precision:?} {name}: rel L2 {e:e}");
        }
    }
}

#[test]
fn detector_f32_matches_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let compiled = compile(&CompileOptions {
        model: "vitdet-tiny".into(),
        image_size: None,
        attention: None,
        target: Target::Detector { image_hw: None },
    })
    .unwrap();
    for (name, got, want) in both(&compiled, &gpu) {
        assert_eq!(got.dims(), want.dims(), "{name}");
        if got.dtype().is_float() && want.elem_count() > 0 {
            let e = rel_l2(&got, &want);
            assert!(e <= 1e-4, "{name}: rel L2 {e:e}");
        }
    }
}
