//! The broadcasting binary kernels on CPU tensors of f32, f16 or bf16 (computed in the tensors'
//! own storage type, as on the GPU), with the runtime's geometry
//! ([`vitdet_runtime::cuda::binary::BinGeom`]) and launch.

use std::ffi::c_void;

use candle_core::{DType, Tensor};
use vitdet_ir::ops::BinaryKind;
use vitdet_runtime::cuda::binary::{kernel_name, launch, BinGeom};
use vitdet_runtime::cuda::Launch;

use crate::{Elems, Result};

type Kernel = unsafe extern "C" fn(Launch, *const c_void, *const c_void, *mut c_void, BinGeom);

mod ffi {
    use super::{c_void, BinGeom, Launch};
    // Element pointers are untyped here: one declaration per storage type, same C ABI.
    extern "C" {
        pub fn emu_binary_add_f32(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_add_f16(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_add_bf16(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_sub_f32(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_sub_f16(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_sub_bf16(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_mul_f32(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_mul_f16(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_mul_bf16(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_div_f32(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_div_f16(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
        pub fn emu_binary_div_bf16(l: Launch, a: *const c_void, b: *const c_void, out: *mut c_void, g: BinGeom);
    }
}

/// `a kind b` with broadcasting, as the runtime's CUDA path runs it (add, sub, mul, div).
pub fn binary(kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary_with(kind, a, b, None)
}

/// [`binary`] in the given launch (`None`: the runtime's), e.g. a small grid whose blocks stride
/// over the output several times.
pub fn binary_with(kind: BinaryKind, a: &Tensor, b: &Tensor, grid: Option<Launch>) -> Result<Tensor> {
    let name = kernel_name(kind).ok_or_else(|| format!("no binary kernel for {kind:?}"))?;
    if a.dtype() != b.dtype() {
        return Err(format!("operands of {:?} and {:?}", a.dtype(), b.dtype()));
    }
    let kernel: Kernel = match (name, a.dtype()) {
        ("binary_add", DType::F32) => ffi::emu_binary_add_f32,
        ("binary_add", DType::F16) => ffi::emu_binary_add_f16,
        ("binary_add", DType::BF16) => ffi::emu_binary_add_bf16,
        ("binary_sub", DType::F32) => ffi::emu_binary_sub_f32,
        ("binary_sub", DType::F16) => ffi::emu_binary_sub_f16,
        ("binary_sub", DType::BF16) => ffi::emu_binary_sub_bf16,
        ("binary_mul", DType::F32) => ffi::emu_binary_mul_f32,
        ("binary_mul", DType::F16) => ffi::emu_binary_mul_f16,
        ("binary_mul", DType::BF16) => ffi::emu_binary_mul_bf16,
        ("binary_div", DType::F32) => ffi::emu_binary_div_f32,
        ("binary_div", DType::F16) => ffi::emu_binary_div_f16,
        ("binary_div", DType::BF16) => ffi::emu_binary_div_bf16,
        (_, t) => return Err(format!("the binary kernels take f32, f16 or bf16, not {t:?}")),
    };
    let (dims, g) = BinGeom::new(a.dims(), b.dims())
        .ok_or_else(|| format!("shapes {:?} and {:?} do not fit the kernel", a.dims(), b.dims()))?;
    let (ah, bh) = (Elems::of(a)?, Elems::of(b)?);
    let mut out = Elems::unwritten(a.dtype(), g.numel as usize)?;
    let l = grid.unwrap_or_else(|| launch(g.numel as usize));
    unsafe { kernel(l, ah.ptr(), bh.ptr(), out.mut_ptr(), g) };
    out.into_tensor(a.dtype(), &dims)
}
