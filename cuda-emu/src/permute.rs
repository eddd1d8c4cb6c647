//! The permute copy (`kernels/permute.cu`) on host bytes, planned and launched as the runtime
//! does ([`vitdet_runtime::cuda::permute::PermutePlan`]).

use std::ffi::c_void;

use candle_core::{DType, Device, Tensor};
use vitdet_runtime::cuda::permute::{alignment_at, PermuteDims, PermutePlan};
use vitdet_runtime::cuda::Launch;

use crate::Result;

type Kernel = unsafe extern "C" fn(Launch, *const c_void, *mut c_void, PermuteDims);

mod ffi {
    use super::{c_void, Launch, PermuteDims};
    // Unit pointers are untyped here: one declaration per unit and index width, same C ABI.
    extern "C" {
        pub fn emu_permute_u8_i32(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u8_i64(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u16_i32(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u16_i64(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u32_i32(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u32_i64(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u64_i32(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u64_i64(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u128_i32(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
        pub fn emu_permute_u128_i64(l: Launch, x: *const c_void, y: *mut c_void, d: PermuteDims);
    }
}

fn kernel(plan: &PermutePlan) -> Kernel {
    match (plan.unit, plan.wide) {
        (1, false) => ffi::emu_permute_u8_i32,
        (1, true) => ffi::emu_permute_u8_i64,
        (2, false) => ffi::emu_permute_u16_i32,
        (2, true) => ffi::emu_permute_u16_i64,
        (4, false) => ffi::emu_permute_u32_i32,
        (4, true) => ffi::emu_permute_u32_i64,
        (8, false) => ffi::emu_permute_u64_i32,
        (8, true) => ffi::emu_permute_u64_i64,
        (16, false) => ffi::emu_permute_u128_i32,
        _ => ffi::emu_permute_u128_i64,
    }
}

/// A CPU tensor's elements as little-endian bytes, row-major.
fn bytes_of(x: &Tensor) -> Result<Vec<u8>> {
    let x = x.flatten_all().map_err(|e| e.to_string())?;
    macro_rules! le_bytes {
        ($t:ty) => {
            x.to_vec1::<$t>()
                .map_err(|e| e.to_string())?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
    }
    Ok(match x.dtype() {
        DType::U8 => le_bytes!(u8),
        DType::U32 => le_bytes!(u32),
        DType::I64 => le_bytes!(i64),
        DType::F16 => le_bytes!(half::f16),
        DType::BF16 => le_bytes!(half::bf16),
        DType::F32 => le_bytes!(f32),
        DType::F64 => le_bytes!(f64),
        t => return Err(format!("no permute of {t:?}")),
    })
}

/// `x.permute(perm)` by the kernel, with `x`'s elements placed `offset` elements past a
/// 16-byte boundary (the plan sees that alignment, as the runtime sees a view's offset);
/// `wide` forces 64-bit indices; `launch` replaces the plan's geometry (fewer threads than
/// units: the grid-stride loop). The output starts as 0xFF bytes, so a unit the kernel fails to
/// write shows. Returns the plan too.
pub fn permute(
    x: &Tensor,
    perm: &[usize],
    offset: usize,
    wide: bool,
    launch: Option<Launch>,
) -> Result<(Tensor, PermutePlan)> {
    let elem = x.dtype().size_in_bytes();
    let bytes = bytes_of(x)?;
    let start = offset * elem;
    let align = alignment_at(start);
    let mut plan = PermutePlan::new(x.dims(), perm, elem, align)?;
    plan.wide |= wide;
    // u128 buffers: 16-byte aligned, as device allocations are (at least).
    let mut input = vec![0u128; (start + bytes.len()).div_ceil(16).max(1)];
    let mut output = vec![u128::MAX; bytes.len().div_ceil(16).max(1)];
    unsafe {
        let base = input.as_mut_ptr().cast::<u8>();
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(start), bytes.len());
        kernel(&plan)(
            launch.unwrap_or_else(|| plan.launch()),
            base.add(start).cast::<c_void>().cast_const(),
            output.as_mut_ptr().cast(),
            plan.dims,
        );
    }
    let out: Vec<u8> = output.iter().flat_map(|u| u.to_le_bytes()).take(bytes.len()).collect();
    let shape: Vec<usize> = perm.iter().map(|&a| x.dims()[a]).collect();
    let y = Tensor::from_raw_buffer(&out, x.dtype(), &shape, &Device::Cpu).map_err(|e| e.to_string())?;
    Ok((y, plan))
}
