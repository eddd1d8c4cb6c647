//! Compiles the runtime's CUDA C kernel sources as host C++ against the emulation header.

use std::path::PathBuf;

fn main() {
    let kernels = PathBuf::from("../runtime/src/cuda/kernels");
    println!("cargo:rerun-if-changed=emu");
    println!("cargo:rerun-if-changed={}", kernels.display());
    // One translation unit per kernel family: `emu/<family>.cpp` includes its source.
    let mut shims: Vec<PathBuf> = std::fs::read_dir("emu")
        .expect("emu/ lists the kernel shims")
        .map(|e| e.expect("emu/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    shims.sort();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .files(&shims)
        .include("emu")
        .include(&kernels)
        .define("VITDET_EMU", None)
        .define("HD", "8")
        .opt_level(2)
        .warnings(false);
    // NVRTC contracts a * b + c into one fused multiply-add unless told not to; so does the host
    // compiler here where the machine has FMA, so a kernel that must round a product alone (to
    // give the CPU kernel's bits) and does not say so fails its exact test here too.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        build.flag("-mfma").flag("-ffp-contract=fast");
    }
    build.compile("vitdet_cuda_emu");
}
