//! The runtime's CUDA kernels against its CPU kernels, one module per kernel family, in one
//! test binary: each test binary links the whole runtime, and a GPU session carries every one
//! of them. Runs where a GPU exists; each test is skipped, saying so, elsewhere.
//!
//!     cargo test --features cuda -p vitdet-runtime --test cuda [family::]
#![cfg(feature = "cuda")]

#[path = "../common/mod.rs"]
mod common;

mod activation;
mod adamw;
mod clock;
mod conv;
mod detection;
mod linear;
mod norm;
mod permute;
mod softmax;
mod window_attention;
