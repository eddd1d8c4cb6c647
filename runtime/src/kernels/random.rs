//! Random ops (`vitdet_ir::ops::random`): masks computed on the host from a seed value, so a
//! step's randomness is a pure function of its seed and independent of device and thread count.

use candle_core::{DType, Device, Tensor};
use vitdet_ir::ops::DropPathMask;

use super::{KernelError, KernelResult};

/// The stochastic-depth keep mask `[batch]` (f32) of [`DropPathMask`]: entry `b` is
/// `1 / (1 - rate)` when `DropPathMask::uniform(seed, stream, b) >= rate`, else 0. The seed is
/// an i64 scalar (`[]` or `[1]`) whose bits are read as a `u64`; the mask is built on the host
/// and placed on the seed's device.
pub fn drop_path_mask(op: &DropPathMask, seed: &Tensor) -> KernelResult<Tensor> {
    if !(0.0..1.0).contains(&op.rate) {
        return Err(KernelError::Unsupported(format!(
            "drop_path_mask: drop rate must be in [0, 1), found {}",
            op.rate
        )));
    }
    if seed.dtype() != DType::I64 || seed.elem_count() != 1 || seed.rank() > 1 {
        return Err(KernelError::Unsupported(format!(
            "drop_path_mask: seed must be an i64 scalar ([] or [1]), found {}",
            crate::dtype::describe(seed)
        )));
    }
    let device = seed.device();
    let value = seed.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<i64>()?[0] as u64;
    let mask: Vec<f32> = (0..op.batch as u64).map(|b| op.value(value, b) as f32).collect();
    Ok(Tensor::from_vec(mask, op.batch, &Device::Cpu)?.to_device(device)?)
}
