//! The activation kernels on CPU tensors of f32, f16 or bf16 (computed in the tensor's own
//! storage type, as on the GPU), launched with a given geometry (the runtime's is
//! [`vitdet_runtime::cuda::activation::launch`]).

use std::ffi::c_void;

use candle_core::{DType, Tensor};
use vitdet_runtime::cuda::Launch;

use crate::{Elems, Result};

mod ffi {
    use super::{c_void, Launch};
    // Element pointers are untyped here: one declaration per storage type, same C ABI.
    extern "C" {
        pub fn emu_gelu_f32(l: Launch, x: *const c_void, y: *mut c_void, n: i64);
        pub fn emu_gelu_f16(l: Launch, x: *const c_void, y: *mut c_void, n: i64);
        pub fn emu_gelu_bf16(l: Launch, x: *const c_void, y: *mut c_void, n: i64);
        pub fn emu_gelu_grad_f32(l: Launch, x: *const c_void, dy: *const c_void, dx: *mut c_void, n: i64);
        pub fn emu_gelu_grad_f16(l: Launch, x: *const c_void, dy: *const c_void, dx: *mut c_void, n: i64);
        pub fn emu_gelu_grad_bf16(l: Launch, x: *const c_void, dy: *const c_void, dx: *mut c_void, n: i64);
        pub fn emu_relu_grad_f32(l: Launch, x: *const c_void, dy: *const c_void, dx: *mut c_void, n: i64);
        pub fn emu_relu_grad_f16(l: Launch, x: *const c_void, dy: *const c_void, dx: *mut c_void, n: i64);
        pub fn emu_relu_grad_bf16(l: Launch, x: *const c_void, dy: *const c_void, dx: *mut c_void, n: i64);
    }
}

/// `gelu(x)`, in `x`'s dtype.
pub fn gelu(launch: Launch, x: &Tensor) -> Result<Tensor> {
    let kernel = match x.dtype() {
        DType::F32 => ffi::emu_gelu_f32,
        DType::F16 => ffi::emu_gelu_f16,
        DType::BF16 => ffi::emu_gelu_bf16,
        t => return Err(format!("the activation kernels take f32, f16 or bf16, not {t:?}")),
    };
    let n = x.elem_count();
    let input = Elems::of(x)?;
    let mut out = input.unwritten_like();
    unsafe { kernel(launch, input.ptr(), out.mut_ptr(), n as i64) };
    out.into_tensor(x.dtype(), x.dims())
}

/// The kernel of one gradient: `x` and `dy` in, `dx` out, `n` elements.
type GradKernel = unsafe extern "C" fn(Launch, *const c_void, *const c_void, *mut c_void, i64);

/// `dy * gelu'(x)`, in their dtype.
pub fn gelu_grad(launch: Launch, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    grad(
        launch,
        x,
        dy,
        [ffi::emu_gelu_grad_f32, ffi::emu_gelu_grad_f16, ffi::emu_gelu_grad_bf16],
    )
}

/// `dy` where `x > 0`, else zero, in their dtype.
pub fn relu_grad(launch: Launch, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    grad(
        launch,
        x,
        dy,
        [ffi::emu_relu_grad_f32, ffi::emu_relu_grad_f16, ffi::emu_relu_grad_bf16],
    )
}

/// Runs the f32, f16 or bf16 one of `kernels` (in that order) on `x` and `dy`.
fn grad(launch: Launch, x: &Tensor, dy: &Tensor, kernels: [GradKernel; 3]) -> Result<Tensor> {
    if x.dims() != dy.dims() || x.dtype() != dy.dtype() {
        return Err(format!(
            "x {:?} {:?} and dy {:?} {:?} differ",
            x.dims(),
            x.dtype(),
            dy.dims(),
            dy.dtype()
        ));
    }
    let kernel = match x.dtype() {
        DType::F32 => kernels[0],
        DType::F16 => kernels[1],
        DType::BF16 => kernels[2],
        t => return Err(format!("the activation kernels take f32, f16 or bf16, not {t:?}")),
    };
    let n = x.elem_count();
    let (xh, dyh) = (Elems::of(x)?, Elems::of(dy)?);
    let mut out = xh.unwritten_like();
    unsafe { kernel(launch, xh.ptr(), dyh.ptr(), out.mut_ptr(), n as i64) };
    out.into_tensor(x.dtype(), x.dims())
}
