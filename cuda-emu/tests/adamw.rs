//! The fused AdamW kernel, run by the host emulator, against the runtime's op-by-op CPU
//! update (`optim::AdamW::step`) over several steps: per-parameter learning rates and weight
//! decays (zero included: no decay multiply), a parameter that misses a gradient in one step
//! (its step count, hence its bias corrections, lags the others), an empty parameter, both
//! branches of the moment lerp (beta1 0.9 and 0.3), and two chunkings: the runtime's, and small
//! chunks over few blocks so chunks straddle tensors and each block takes several.
//!
//! Exact equality of the bits (parameters and both moments): the kernel performs the CPU
//! update's f32 operations in the same order, each correctly rounded (no contraction into
//! fused multiply-adds, scalars rounded to f32 from the same f64 values), so nothing is left
//! to differ. Any change of operation order shows in some of the few thousand elements.

use std::collections::BTreeMap;

use candle_core::Tensor;
use common::Rng;

mod common;
use vitdet_cuda_emu::adamw::step;
use vitdet_runtime::cuda::adamw::FusedUpdate;
use vitdet_runtime::cuda::adamw::{CHUNK_ELEMS, MAX_BLOCKS};
use vitdet_runtime::optim::{AdamW, AdamWConfig};
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

/// (name, shape, lr, weight decay).
const PARAMS: [(&str, &[usize], f64, f64); 5] = [
    ("a.weight", &[3000], 1e-3, 0.05),
    ("a.bias", &[17, 33], 2e-3, 0.0),
    ("gamma", &[1], 5e-4, 0.1),
    ("lagging", &[600], 1e-3, 0.05),
    ("empty", &[4, 0], 1e-3, 0.05),
];
const STEPS: usize = 4;

fn run(config: AdamWConfig, chunk: usize, max_blocks: usize) {
    let mut rng = Rng(chunk as u64 * 7919 + (config.beta1 * 1000.0) as u64);
    let mut params = ParamStore::from_tensors(PARAMS.iter().map(|(n, s, ..)| (n.to_string(), rng.tensor(s, 1.0))));
    let hyper: BTreeMap<&str, (f64, f64)> = PARAMS.iter().map(|&(n, _, lr, wd)| (n, (lr, wd))).collect();
    let mut opt = AdamW::new(config).unwrap();
    for s in 0..STEPS {
        let grads: Vec<(String, Tensor)> = PARAMS
            .iter()
            // `lagging` has no gradient in step 1, so from then on its step count is one behind.
            .filter(|(n, ..)| !(s == 1 && *n == "lagging"))
            .map(|(n, shape, ..)| (n.to_string(), rng.tensor(shape, 0.5 + s as f32)))
            .collect();
        let before = params.clone();
        let before_opt = opt.clone();
        opt.step(&mut params, &grads, |n| hyper.get(n).copied()).unwrap();

        let updates: Vec<FusedUpdate> = grads
            .iter()
            .map(|(n, g)| {
                let state = before_opt.state(n);
                FusedUpdate {
                    param: before.get(n).unwrap(),
                    grad: g,
                    moments: state.map(|st| (&st.exp_avg, &st.exp_avg_sq)),
                    t: state.map_or(0, |st| st.step) + 1,
                    lr: hyper[n.as_str()].0,
                    weight_decay: hyper[n.as_str()].1,
                }
            })
            .collect();
        let got = step(&config, &updates, chunk, max_blocks).unwrap();
        for ((n, _), (p, m, v)) in grads.iter().zip(&got) {
            let what = format!("beta1 {} chunk {chunk} step {s} `{n}`", config.beta1);
            let want = opt.state(n).unwrap();
            assert!(bits(p) == bits(params.get(n).unwrap()), "{what}: parameter differs");
            assert!(bits(m) == bits(&want.exp_avg), "{what}: exp_avg differs");
            assert!(bits(v) == bits(&want.exp_avg_sq), "{what}: exp_avg_sq differs");
        }
    }
    assert_eq!(opt.state("lagging").unwrap().step, STEPS as u64 - 1);
}

#[test]
fn fused_step_matches_the_cpu_update_bit_for_bit() {
    let lerp_low = AdamWConfig::default();
    let lerp_high = AdamWConfig {
        beta1: 0.3,
        beta2: 0.99,
        eps: 1e-6,
    };
    for config in [lerp_low, lerp_high] {
        run(config, CHUNK_ELEMS, MAX_BLOCKS);
        // 256-element chunks over at most 5 blocks: 12 chunks for `a.weight` alone.
        run(config, 256, 5);
    }
}
