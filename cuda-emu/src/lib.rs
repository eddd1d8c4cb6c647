//! Runs the runtime's CUDA C kernels on the host, to test them where no GPU exists.
//!
//! `build.rs` compiles the sources in `runtime/src/cuda/kernels` as C++ against
//! `emu/cuda_emu.h`, which runs each block's threads as OS threads meeting at a barrier. The
//! functions here launch them with the runtime's own launch geometry
//! ([`vitdet_runtime::cuda`]) in the order the CUDA path does, on f32 host buffers, so tests
//! can compare them with the runtime's CPU kernels. One module per kernel family, one
//! `emu/<family>.cpp` translation unit each.

use candle_core::{Device, Tensor};

pub mod norm;
pub mod adamw;
pub mod detection;
pub mod softmax;
pub mod window_attention;

pub type Result<T> = std::result::Result<T, String>;

/// A CPU tensor's elements as f32, in row-major order.
pub fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string())
}

/// A CPU tensor from f32 elements.
pub fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| e.to_string())
}
