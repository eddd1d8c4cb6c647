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
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .files(&shims)
        .include("emu")
        .include(&kernels)
        .define("VITDET_EMU", None)
        .define("HD", "8")
        .opt_level(2)
        .warnings(false)
        .compile("vitdet_cuda_emu");
}
