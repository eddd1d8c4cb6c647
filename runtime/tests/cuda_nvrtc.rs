//! Every CUDA kernel module compiles with NVRTC for the H100 (compute 9.0). Needs only the
//! NVRTC library, not a GPU: it runs on any machine where the `cuda` build starts.
#![cfg(feature = "cuda")]

#[test]
fn every_kernel_module_compiles_for_compute_90() {
    let modules = vitdet_runtime::cuda::modules();
    assert!(!modules.is_empty());
    for m in modules {
        let ptx =
            vitdet_runtime::cuda::device::compile_for(&m, 9, 0).unwrap_or_else(|e| panic!("module {}: {e}", m.name()));
        assert!(
            ptx.contains(".entry"),
            "module {} produced no kernel entry points",
            m.name()
        );
        // Per-dtype modules name their entry points with the dtype's suffix, not the macro's.
        assert!(
            !ptx.contains("VITDET_"),
            "module {} has unexpanded entry point names",
            m.name()
        );
    }
    // The names the attention launches look up.
    let m = vitdet_runtime::cuda::window_attention::module_for_head_dim(64).for_dtype(candle_core::DType::BF16);
    let ptx = vitdet_runtime::cuda::device::compile_for(&m, 9, 0).unwrap();
    for name in [
        "window_attention_fwd_bf16",
        "window_attention_fwd_tc_bf16",
        "window_attention_bwd_kv_tc_bf16",
        "window_attention_bwd_q_tc_bf16",
    ] {
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "{name} missing from {}",
            m.name()
        );
    }
    // The im2col kernel the convolutions look up, in a per-dtype module.
    let m = vitdet_runtime::cuda::im2col::module().for_dtype(candle_core::DType::F16);
    let ptx = vitdet_runtime::cuda::device::compile_for(&m, 9, 0).unwrap();
    assert!(
        ptx.contains(".entry im2col_f16("),
        "im2col_f16 missing from {}",
        m.name()
    );
}

/// The oldest GPUs CUDA 13 builds for (compute 7.5, Turing) lack bf16 conversions and the
/// m16n8k16 mma: every module must still assemble there, the tensor-core attention and the
/// bf16 conversion instruction left out. Compiling for the real architecture `sm_75` makes NVRTC
/// assemble the PTX too, which is where an instruction the architecture lacks is refused.
#[test]
fn every_kernel_module_assembles_for_compute_75() {
    for m in vitdet_runtime::cuda::modules() {
        let ptx = vitdet_runtime::cuda::device::ptx(&m, "sm_75").unwrap_or_else(|e| panic!("module {}: {e}", m.name()));
        assert!(
            ptx.contains(".entry"),
            "module {} produced no kernel entry points",
            m.name()
        );
    }
}
