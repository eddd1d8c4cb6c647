//! AdamW on CUDA tensors (one fused launch over every parameter, `cuda::adamw`) against the
//! op-by-op CPU update over several steps. Runs where a GPU exists; skipped, saying so,
//! elsewhere.
//!
//! Exact equality of the bits (parameters and both moments): the kernel performs the CPU
//! update's f32 operations in the same order, each correctly rounded (`__fmul_rn`, `__fadd_rn`,
//! `__fdiv_rn`, `__fsqrt_rn`: no contraction into fused multiply-adds, IEEE division and square
//! root), from scalars rounded to f32 from the same f64 values, so nothing is left to differ.

use crate::common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::{Nd, TestRng};
use vitdet_runtime::cuda::adamw::{CHUNK_ELEMS, MAX_BLOCKS};
use vitdet_runtime::optim::{AdamW, AdamWConfig, OptimError};
use vitdet_runtime::ParamStore;

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn on(dev: &Device, ts: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    ts.iter().map(|(n, t)| (n.clone(), t.to_device(dev).unwrap())).collect()
}

/// (name, shape, lr, weight decay). `big` has more chunks than a launch has blocks, so blocks
/// take several chunks.
fn params() -> Vec<(&'static str, Vec<usize>, f64, f64)> {
    let big = CHUNK_ELEMS * MAX_BLOCKS + 12_345;
    vec![
        ("big", vec![big], 1e-3, 0.1),
        ("blocks.0.attn.qkv.weight", vec![2304, 768], 8e-4, 0.1),
        ("blocks.0.norm1.bias", vec![768], 8e-4, 0.0),
        ("gamma", vec![1], 1e-4, 0.0),
        ("lagging", vec![1000, 3], 2e-3, 0.05),
    ]
}

fn run(config: AdamWConfig, dev: &Device) {
    let spec = params();
    let mut rng = TestRng::new(17);
    let init: Vec<(String, Tensor)> = spec
        .iter()
        .map(|(n, s, ..)| (n.to_string(), Nd::randn(s, &mut rng, 0.5, 0.0).tensor()))
        .collect();
    let hyper: BTreeMap<String, (f64, f64)> = spec.iter().map(|(n, _, lr, wd)| (n.to_string(), (*lr, *wd))).collect();
    let mut cpu = ParamStore::from_tensors(init.clone());
    let mut gpu = ParamStore::from_tensors(on(dev, &init));
    let (mut cpu_opt, mut gpu_opt) = (AdamW::new(config).unwrap(), AdamW::new(config).unwrap());
    for s in 0..4 {
        let grads: Vec<(String, Tensor)> = spec
            .iter()
            // `lagging` misses step 1: from then on its step count (bias corrections) lags.
            .filter(|(n, ..)| !(s == 1 && *n == "lagging"))
            .map(|(n, shape, ..)| {
                (
                    n.to_string(),
                    Nd::randn(shape, &mut rng, 1e-2 * (s + 1) as f64, 0.0).tensor(),
                )
            })
            .collect();
        cpu_opt.step(&mut cpu, &grads, |n| hyper.get(n).copied()).unwrap();
        gpu_opt
            .step(&mut gpu, &on(dev, &grads), |n| hyper.get(n).copied())
            .unwrap();
        for (n, ..) in &spec {
            let what = format!("beta1 {} step {s} `{n}`", config.beta1);
            let (p, want) = (gpu.get(n).unwrap(), cpu.get(n).unwrap());
            assert!(p.device().is_cuda(), "{what}: parameter left the GPU");
            assert!(bits(p) == bits(want), "{what}: parameter differs");
            let (gs, cs) = (gpu_opt.state(n).unwrap(), cpu_opt.state(n).unwrap());
            assert_eq!(gs.step, cs.step, "{what}: step count");
            assert!(bits(&gs.exp_avg) == bits(&cs.exp_avg), "{what}: exp_avg differs");
            assert!(
                bits(&gs.exp_avg_sq) == bits(&cs.exp_avg_sq),
                "{what}: exp_avg_sq differs"
            );
        }
    }
}

#[test]
fn fused_step_matches_the_cpu_update_bit_for_bit() {
    let Some(dev) = common::cuda_device() else { return };
    run(AdamWConfig::default(), &dev);
    // beta1 < 0.5 takes the other branch of the moment's lerp.
    run(
        AdamWConfig {
            beta1: 0.3,
            beta2: 0.99,
            eps: 1e-6,
        },
        &dev,
    );
}

#[test]
fn a_parameter_off_the_gpu_fails_the_whole_step() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(3);
    let mut store = ParamStore::from_tensors([
        (
            "a".to_string(),
            Nd::randn(&[10], &mut rng, 1.0, 0.0).tensor().to_device(&dev).unwrap(),
        ),
        ("b".to_string(), Nd::randn(&[10], &mut rng, 1.0, 0.0).tensor()),
    ]);
    let before: Vec<Vec<u32>> = ["a", "b"].iter().map(|n| bits(store.get(n).unwrap())).collect();
    let grads = on(
        &dev,
        &[
            ("a".into(), Nd::randn(&[10], &mut rng, 1.0, 0.0).tensor()),
            ("b".into(), Nd::randn(&[10], &mut rng, 1.0, 0.0).tensor()),
        ],
    );
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let e = opt.step(&mut store, &grads, |_| Some((1e-3, 0.1))).unwrap_err();
    assert!(matches!(e, OptimError::Fused(_)), "{e}");
    let after: Vec<Vec<u32>> = ["a", "b"].iter().map(|n| bits(store.get(n).unwrap())).collect();
    assert_eq!(before, after, "a failed fused step changed a parameter");
    assert!(opt.state("a").is_none(), "a failed fused step left optimizer state");
}
