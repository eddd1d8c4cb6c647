//! `compile::lower_inference` stores the low-precision ops' weights in bf16 (the weight casts
//! folded into their parameters). With the f32 weights converted once (`ParamStore::cast_to`),
//! the outputs must equal, bit for bit, those of the autocast graph that casts the weights on
//! every run: the same conversion of the same values, done at load instead of in the graph.

mod common;

use vitdet::compile::{lower_inference, Target};
use vitdet::passes::{autocast, schedule, Precision};
use vitdet::runtime::{run_with_order, Device, ParamStore, Tensor};

#[test]
fn folded_weight_casts_give_the_autocast_outputs_exactly() {
    let compiled = common::compile_tiny(Target::Backbone);
    let (lowered, fused) = lower_inference(&compiled.graph, Precision::Bf16, true).unwrap();
    assert!(fused > 0);
    // The same fused graph, autocast but with f32 weights cast in the graph.
    let fused_graph = vitdet::passes::fuse_attention(&compiled.graph).unwrap().graph;
    let cast_in_graph = autocast(&fused_graph, Precision::Bf16).unwrap();
    assert!(lowered.param_bytes() < cast_in_graph.param_bytes());

    let f32_params = ParamStore::init_random(&cast_in_graph, 5, &Device::Cpu).unwrap();
    // The f32 store does not fit the lowered graph as it is: a clear dtype error...
    let (_, ty) = lowered.inputs().map(|(_, n, t)| (n, t.clone())).next().unwrap();
    let image = Tensor::randn(0f32, 1.0, ty.shape.as_slice(), &Device::Cpu).unwrap();
    let inputs = [(vitdet::models::INPUT_NAME, image)];
    let order = schedule(&lowered).unwrap();
    let err = run_with_order(&lowered, &f32_params, &inputs, &Device::Cpu, &order).unwrap_err();
    assert!(err.to_string().contains("bf16"), "{err}");
    // ...and converted once, the same outputs as casting on every run.
    let bf16_params = f32_params.cast_to(&lowered).unwrap();
    let got = run_with_order(&lowered, &bf16_params, &inputs, &Device::Cpu, &order).unwrap();
    let want_order = schedule(&cast_in_graph).unwrap();
    let want = run_with_order(&cast_in_graph, &f32_params, &inputs, &Device::Cpu, &want_order).unwrap();
    assert_eq!(got.outputs.len(), want.outputs.len());
    for ((name, g), (_, w)) in got.outputs.iter().zip(&want.outputs) {
        let bits = |t: &Tensor| {
            t.to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(g), bits(w), "{name} differs");
    }
}
