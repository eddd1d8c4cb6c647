//! The convolutions' layout kernels (im2col, unpatchify) on CPU tensors of f32, f16 or bf16,
//! launched with the runtime's geometry ([`vitdet_runtime::cuda::im2col::Im2ColDims`],
//! [`vitdet_runtime::cuda::im2col::UnpatchifyDims`]).

use std::ffi::c_void;

use candle_core::{DType, Tensor};
use vitdet_runtime::cuda::im2col::{Im2ColDims, Im2ColTile, UnpatchifyDims};
use vitdet_runtime::cuda::Launch;

use crate::{Elems, Result};

type Kernel = unsafe extern "C" fn(Launch, *const c_void, *mut c_void, Im2ColDims);

mod ffi {
    use super::{c_void, Im2ColDims, Launch, UnpatchifyDims};
    // Element pointers are untyped here: one declaration per storage type, same C ABI.
    extern "C" {
        pub fn emu_im2col_f32(l: Launch, x: *const c_void, cols: *mut c_void, d: Im2ColDims);
        pub fn emu_im2col_f16(l: Launch, x: *const c_void, cols: *mut c_void, d: Im2ColDims);
        pub fn emu_im2col_bf16(l: Launch, x: *const c_void, cols: *mut c_void, d: Im2ColDims);
        pub fn emu_unpatchify_f32(l: Launch, y: *const c_void, b: *const c_void, o: *mut c_void, d: UnpatchifyDims);
        pub fn emu_unpatchify_f16(l: Launch, y: *const c_void, b: *const c_void, o: *mut c_void, d: UnpatchifyDims);
        pub fn emu_unpatchify_bf16(l: Launch, y: *const c_void, b: *const c_void, o: *mut c_void, d: UnpatchifyDims);
    }
}

/// The `[C*kh*kw, nb*r*Wo]` columns of `tile` of `x` (`[N, C, H, W]`), in `x`'s dtype. The
/// output buffer starts as NaNs, so a column the kernel fails to write shows.
pub fn columns(x: &Tensor, tile: &Im2ColTile) -> Result<Tensor> {
    let d = Im2ColDims::new(x.dims(), tile)?;
    let kernel: Kernel = match x.dtype() {
        DType::F32 => ffi::emu_im2col_f32,
        DType::F16 => ffi::emu_im2col_f16,
        DType::BF16 => ffi::emu_im2col_bf16,
        t => return Err(format!("the im2col kernel takes f32, f16 or bf16, not {t:?}")),
    };
    let input = Elems::of(x)?;
    let [rows, cols] = tile.columns_shape(x.dims()[1]);
    let mut out = Elems::unwritten(x.dtype(), rows * cols)?;
    unsafe { kernel(d.launch(), input.ptr(), out.mut_ptr(), d) };
    out.into_tensor(x.dtype(), &[rows, cols])
}

/// `y` (`[n, o * kh * kw, h * w]` elements, `dims` = `[n, o, kh, kw, h, w]`) as
/// `[n, o, h kh, w kw]` plus the channel `bias` where given, launched as the runtime does or
/// with `launch`.
pub fn unpatchify(y: &Tensor, bias: Option<&Tensor>, dims: [usize; 6], launch: Option<Launch>) -> Result<Tensor> {
    let d = UnpatchifyDims::new(dims)?;
    let kernel = match y.dtype() {
        DType::F32 => ffi::emu_unpatchify_f32,
        DType::F16 => ffi::emu_unpatchify_f16,
        DType::BF16 => ffi::emu_unpatchify_bf16,
        t => return Err(format!("the unpatchify kernel takes f32, f16 or bf16, not {t:?}")),
    };
    let input = Elems::of(y)?;
    let b = bias.map(Elems::of).transpose()?;
    let mut out = Elems::unwritten(y.dtype(), d.elems())?;
    let bias_ptr = b.as_ref().map_or(std::ptr::null(), |b| b.ptr());
    unsafe {
        kernel(
            launch.unwrap_or_else(|| d.launch()),
            input.ptr(),
            bias_ptr,
            out.mut_ptr(),
            d,
        )
    };
    out.into_tensor(y.dtype(), &d.out_dims())
}
