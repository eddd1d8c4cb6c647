//! `vitdet-runtime`: executes `vitdet-ir` graphs on candle devices (the CPU always; CUDA with
//! the `cuda` cargo feature).
//!
//! * [`run`] / [`run_with_order`] execute a verified [`vitdet_ir::Graph`] op by op, free every
//!   value after its last use and report the peak of live bytes ([`executor`] defines it);
//!   a [`Program`] is a graph and order checked once, for repeated runs.
//! * [`kernels`] hold one module per op family; [`kernels::execute`] runs a single op.
//! * [`ParamStore`] loads weights from safetensors (keys = the graph's parameter names),
//!   initializes them from a seed, and saves them atomically.
//! * [`optim`]: AdamW with `torch.optim.AdamW`'s arithmetic, ViTDet's parameter groups
//!   (layer-wise lr decay, no weight decay on norms, biases, position tables) and the warmup +
//!   half-cosine schedule; errors are [`optim::OptimError`].
//! * [`checkpoint`] saves and loads training checkpoints (parameters, optimizer state, iteration)
//!   as one safetensors file, atomically; errors are [`checkpoint::CheckpointError`].
//! * [`cuda`]: the runtime's own CUDA C kernels (fused attention, ...), compiled by NVRTC
//!   with the `cuda` feature and launched in place of candle ops on CUDA tensors.
//! * [`preprocess`] reads images and applies detectron2's ViTDet test-time preprocessing.
//! * [`alloc::retain_freed_memory`] (opt-in, for applications) stops glibc from returning large
//!   freed blocks to the kernel, which otherwise costs a page fault per 4 KiB of every large
//!   op result.
//! * [`alloc::CountingAllocator`] (opt-in, installed with `#[global_allocator]`) counts heap
//!   bytes, so [`RunOutput::measured_peak_bytes`] reports a run's measured peak beside the plan.
//!
//! All other fallible functions return [`RuntimeError`], whose messages name the input, parameter,
//! file or node (op and scope) at fault. The runtime never falls back silently: an op or
//! attribute combination it cannot execute is an [`RuntimeError::Unsupported`] error.
//!
//! This crate depends on `vitdet-ir` only (not on the model builders or passes), so an
//! application can embed it to run compiled artifacts.

pub mod alloc;
pub mod checkpoint;
pub mod cuda;
pub mod dtype;
mod error;
pub mod executor;
mod fsio;
pub mod kernels;
pub mod optim;
pub mod params;
pub mod preprocess;

pub use error::RuntimeError;
pub use executor::{peak_live_bytes, run, run_with_order, Program, RunOutput};
pub use fsio::write_atomic;
pub use optim::{AdamW, AdamWConfig, GroupConfig, ParamGroups, WarmupCosine};
pub use params::ParamStore;
pub use preprocess::{preprocess_image, preprocess_rgb, Preprocessed};

pub use candle_core::{DType as CandleDType, Device, Tensor};
