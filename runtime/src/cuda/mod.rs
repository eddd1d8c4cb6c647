//! The runtime's own CUDA kernels, for the ops where candle's CUDA backend is slow or missing.
//!
//! The kernels are CUDA C ([`sources`]) compiled at run time by NVRTC, so building the
//! `cuda` feature needs no kernel compiler beyond candle's own. Their parameter blocks and
//! launch geometry live here and are always compiled: the host emulator (the
//! `vitdet-cuda-emu` crate) runs the very same sources with the same launches on the CPU, which
//! is how the kernels are tested on machines without a GPU. With the `cuda` feature, `device`
//! compiles, caches and launches them on candle CUDA tensors.

pub mod activation;
pub mod adamw;
pub mod binary;
#[cfg(feature = "cuda")]
pub mod cudnn;
pub mod detection;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod events;
pub mod im2col;
#[cfg(feature = "cuda")]
pub mod linear;
pub mod norm;
pub mod permute;
#[cfg(feature = "cuda")]
pub mod pool;
pub mod softmax;
pub mod sources;
pub mod window_attention;

/// The GPU's name (`NVIDIA H100 80GB HBM3`) for a CUDA device; `None` for any other device, in
/// a build without the `cuda` feature, or where the driver cannot tell.
pub fn gpu_name(device: &candle_core::Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        return device::device_name(dev).ok();
    }
    let _ = device;
    None
}

/// Every kernel module, with representative compile-time constants: what the NVRTC
/// compile test builds.
pub fn modules() -> Vec<sources::Module> {
    vec![
        // The attention kernels at ViTDet-B/L (64) and ViT-H (80) head dims.
        window_attention::module_for_head_dim(64).for_dtype(candle_core::DType::F32),
        window_attention::module_for_head_dim(64).for_dtype(candle_core::DType::BF16),
        window_attention::module_for_head_dim(80).for_dtype(candle_core::DType::F16),
        detection::module(),
        binary::module(),
        activation::module(),
        im2col::module(),
        softmax::module(),
        adamw::module(),
        norm::module(),
        permute::module(),
    ]
}

/// Every module the runtime loads, in every dtype, with the attention kernels at `head_dims`:
/// what `vitdet kernels` compiles ahead of time into the kernel cache.
pub fn runtime_modules(head_dims: &[usize]) -> Vec<sources::Module> {
    use candle_core::DType;
    let mut modules = vec![adamw::module(), detection::module(), permute::module()];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        modules.push(binary::module().for_dtype(dtype));
        modules.push(activation::module().for_dtype(dtype));
        modules.push(im2col::module().for_dtype(dtype));
        modules.push(norm::module().for_dtype(dtype));
        modules.push(softmax::module().for_dtype(dtype));
        for &hd in head_dims {
            modules.push(window_attention::module_for_head_dim(hd).for_dtype(dtype));
        }
    }
    modules
}

/// Grid and block of one kernel launch (`#[repr(C)]`: the emulator takes it by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Launch {
    /// A one-dimensional launch of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: usize, threads: u32) -> Launch {
        Launch {
            grid: [blocks as u32, 1, 1],
            block: [threads, 1, 1],
        }
    }

    /// Enough blocks of `threads` threads to cover `items`.
    pub fn covering(items: usize, threads: u32) -> Launch {
        Launch::linear(items.div_ceil(threads as usize).max(1), threads)
    }
}
