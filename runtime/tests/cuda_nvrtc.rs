//! Every CUDA kernel module compiles with NVRTC for the H100 (compute 9.0). Needs only the
//! NVRTC library, not a GPU: it runs on any machine where the `cuda` build starts.
#![cfg(feature = "cuda")]

#[test]
fn every_kernel_module_compiles_for_compute_90() {
    let modules = vitdet_runtime::cuda::modules();
    assert!(!modules.is_empty());
    for m in modules {
        let ptx = vitdet_runtime::cuda::device::compile_for(&m, 9, 0)
            .unwrap_or_else(|e| panic!("module {}: {e}", m.name()));
        assert!(ptx.contains(".entry"), "module {} produced no kernel entry points", m.name());
    }
}
