//! Compiles the runtime's CUDA C kernel sources as host C++ against the emulation header.

use std::path::PathBuf;

fn main() {
    let kernels = PathBuf::from("../runtime/src/cuda/kernels");
    println!("cargo:rerun-if-changed=emu");
    println!("cargo:rerun-if-changed={}", kernels.display());
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("emu/shim.cpp")
        .include("emu")
        .include(&kernels)
        .define("VITDET_EMU", None)
        .define("HD", "8")
        .opt_level(2)
        .warnings(false)
        .compile("vitdet_cuda_emu");
}
