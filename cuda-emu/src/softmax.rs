//! The softmax kernels on CPU tensors of f32, f16 or bf16 (computed in the tensor's own storage
//! type, as on the GPU), launched with the runtime's geometry
//! ([`vitdet_runtime::cuda::softmax::SoftmaxDims`]).

use std::ffi::c_void;

use candle_core::{DType, Tensor};
use vitdet_runtime::cuda::softmax::SoftmaxDims;
use vitdet_runtime::cuda::Launch;

use crate::{Elems, Result};

type Forward = unsafe extern "C" fn(Launch, *const c_void, *mut c_void, SoftmaxDims);
type Backward = unsafe extern "C" fn(Launch, *const c_void, *const c_void, *mut c_void, SoftmaxDims);

mod ffi {
    use super::{c_void, Launch, SoftmaxDims};
    // Element pointers are untyped here: one declaration per storage type, same C ABI.
    extern "C" {
        pub fn emu_softmax_rows_f32(l: Launch, x: *const c_void, y: *mut c_void, d: SoftmaxDims);
        pub fn emu_softmax_rows_f16(l: Launch, x: *const c_void, y: *mut c_void, d: SoftmaxDims);
        pub fn emu_softmax_rows_bf16(l: Launch, x: *const c_void, y: *mut c_void, d: SoftmaxDims);
        pub fn emu_softmax_cols_f32(l: Launch, x: *const c_void, y: *mut c_void, d: SoftmaxDims);
        pub fn emu_softmax_cols_f16(l: Launch, x: *const c_void, y: *mut c_void, d: SoftmaxDims);
        pub fn emu_softmax_cols_bf16(l: Launch, x: *const c_void, y: *mut c_void, d: SoftmaxDims);
        pub fn emu_softmax_grad_rows_f32(
            l: Launch,
            y: *const c_void,
            dy: *const c_void,
            dx: *mut c_void,
            d: SoftmaxDims,
        );
        pub fn emu_softmax_grad_rows_f16(
            l: Launch,
            y: *const c_void,
            dy: *const c_void,
            dx: *mut c_void,
            d: SoftmaxDims,
        );
        pub fn emu_softmax_grad_rows_bf16(
            l: Launch,
            y: *const c_void,
            dy: *const c_void,
            dx: *mut c_void,
            d: SoftmaxDims,
        );
        pub fn emu_softmax_grad_cols_f32(
            l: Launch,
            y: *const c_void,
            dy: *const c_void,
            dx: *mut c_void,
            d: SoftmaxDims,
        );
        pub fn emu_softmax_grad_cols_f16(
            l: Launch,
            y: *const c_void,
            dy: *const c_void,
            dx: *mut c_void,
            d: SoftmaxDims,
        );
        pub fn emu_softmax_grad_cols_bf16(
            l: Launch,
            y: *const c_void,
            dy: *const c_void,
            dx: *mut c_void,
            d: SoftmaxDims,
        );
    }
}

/// The forward kernel [`SoftmaxDims::kernel`] names, for `dtype`.
fn forward_kernel(d: &SoftmaxDims, dtype: DType) -> Result<Forward> {
    Ok(match (d.rows(), dtype) {
        (true, DType::F32) => ffi::emu_softmax_rows_f32,
        (true, DType::F16) => ffi::emu_softmax_rows_f16,
        (true, DType::BF16) => ffi::emu_softmax_rows_bf16,
        (false, DType::F32) => ffi::emu_softmax_cols_f32,
        (false, DType::F16) => ffi::emu_softmax_cols_f16,
        (false, DType::BF16) => ffi::emu_softmax_cols_bf16,
        (_, t) => return Err(format!("softmax kernels take f32, f16 or bf16, not {t:?}")),
    })
}

/// The backward kernel [`SoftmaxDims::kernel`] names, for `dtype`.
fn backward_kernel(d: &SoftmaxDims, dtype: DType) -> Result<Backward> {
    Ok(match (d.rows(), dtype) {
        (true, DType::F32) => ffi::emu_softmax_grad_rows_f32,
        (true, DType::F16) => ffi::emu_softmax_grad_rows_f16,
        (true, DType::BF16) => ffi::emu_softmax_grad_rows_bf16,
        (false, DType::F32) => ffi::emu_softmax_grad_cols_f32,
        (false, DType::F16) => ffi::emu_softmax_grad_cols_f16,
        (false, DType::BF16) => ffi::emu_softmax_grad_cols_bf16,
        (_, t) => return Err(format!("softmax kernels take f32, f16 or bf16, not {t:?}")),
    })
}

/// Softmax of `x` along `axis`, in `x`'s dtype.
pub fn softmax(axis: usize, x: &Tensor) -> Result<Tensor> {
    let d = SoftmaxDims::new(x.dims(), axis)?;
    let kernel = forward_kernel(&d, x.dtype())?;
    let input = Elems::of(x)?;
    let mut out = input.unwritten_like();
    unsafe { kernel(d.launch(), input.ptr(), out.mut_ptr(), d) };
    out.into_tensor(x.dtype(), x.dims())
}

/// Softmax backward from the output `y` and its gradient `dy`, in their dtype.
pub fn softmax_grad(axis: usize, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if y.dims() != dy.dims() || y.dtype() != dy.dtype() {
        return Err(format!(
            "y {:?} {:?} and dy {:?} {:?} differ",
            y.dims(),
            y.dtype(),
            dy.dims(),
            dy.dtype()
        ));
    }
    let d = SoftmaxDims::new(y.dims(), axis)?;
    let kernel = backward_kernel(&d, y.dtype())?;
    let (yh, dyh) = (Elems::of(y)?, Elems::of(dy)?);
    let mut out = yh.unwritten_like();
    unsafe { kernel(d.launch(), yh.ptr(), dyh.ptr(), out.mut_ptr(), d) };
    out.into_tensor(y.dtype(), y.dims())
}
