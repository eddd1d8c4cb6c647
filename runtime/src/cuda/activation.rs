//! Exact GELU forward and backward, and ReLU's backward (`kernels/activation.cu`): one pass
//! over the tensor each, computed in f32 and rounded once. Launch geometry lives here for both
//! the CUDA path and the host emulator.

use super::sources::Module;
use super::Launch;

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels/activation.cu");

/// Threads per block.
pub const THREADS: u32 = 256;
/// Most blocks of a launch (about 16 per SM on an H100); they stride over the rest.
pub const MAX_BLOCKS: usize = 2048;

/// The module with every dtype's entry points (`.for_dtype` narrows it to one).
pub fn module() -> Module {
    Module::plain("activation", SOURCE)
}

/// The launch over `n` elements: a thread per element, up to [`MAX_BLOCKS`] blocks.
pub fn launch(n: usize) -> Launch {
    Launch::linear(n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS), THREADS)
}

/// The kernels on candle CUDA tensors.
#[cfg(feature = "cuda")]
pub mod run {
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};

    use super::{launch, module};
    use crate::cuda::device::{cuda_device, function, launch_into_new, suffix};
    use crate::kernels::{KernelError, KernelResult};

    /// Whether the kernels take `x` (f32, f16 or bf16); the caller runs candle ops otherwise.
    pub fn supports(x: &Tensor) -> bool {
        suffix(x.dtype()).is_ok()
    }

    /// `gelu(x)`, in `x`'s dtype.
    pub fn gelu(x: &Tensor) -> KernelResult<Tensor> {
        apply("gelu", &[&x.contiguous()?])
    }

    /// `dy * gelu'(x)`, for `x` and `dy` of one shape and dtype (checked by the caller).
    pub fn gelu_grad(x: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
        apply("gelu_grad", &[&x.contiguous()?, &dy.contiguous()?])
    }

    /// `dy` where `x > 0`, else zero (PyTorch's `threshold_backward`), for `x` and `dy` of one
    /// shape and dtype (checked by the caller).
    pub fn relu_grad(x: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
        apply("relu_grad", &[&x.contiguous()?, &dy.contiguous()?])
    }

    /// [`apply_t`] for the inputs' storage type.
    fn apply(kernel: &str, inputs: &[&Tensor]) -> KernelResult<Tensor> {
        match inputs[0].dtype() {
            DType::F32 => apply_t::<f32>(kernel, inputs),
            DType::F16 => apply_t::<half::f16>(kernel, inputs),
            DType::BF16 => apply_t::<half::bf16>(kernel, inputs),
            t => Err(KernelError::Unsupported(format!("{kernel} on CUDA: dtype {t:?}"))),
        }
    }

    /// Launches `kernel` over contiguous `inputs` of one shape, into a new tensor of it.
    fn apply_t<T: CudaDType + DeviceRepr>(kernel: &str, inputs: &[&Tensor]) -> KernelResult<Tensor> {
        let x = inputs[0];
        let n = x.elem_count();
        if n == 0 {
            return Ok(x.clone());
        }
        let dev = cuda_device(x)?;
        let f = function(
            &dev,
            &module().for_dtype(x.dtype()),
            &format!("{kernel}_{}", suffix(x.dtype())?),
        )?;
        launch_into_new::<T, i64>(&f, inputs, n, &(n as i64), launch(n), x.dims())
    }
}
