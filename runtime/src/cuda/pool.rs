//! The device memory pool candle allocates from (`cuMemAllocAsync` on the device's default
//! pool), configured to keep freed memory and read for the measured peak.
//!
//! The default pool's release threshold is 0: at every synchronization it returns freed memory
//! to the driver, and the next step allocates it again. [`keep_freed_memory`] raises the
//! threshold so a training loop reuses its memory, as PyTorch's caching allocator does. The
//! pool's `USED_MEM_HIGH` is the high-water mark of bytes in use by allocations, the GPU
//! counterpart of the counting allocator's heap peak: [`reset_peak`] before a step,
//! [`peak_bytes`] after it.

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::CudaDevice;

use crate::kernels::{KernelError, KernelResult};

fn check(what: &str, r: sys::CUresult) -> KernelResult<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Unsupported(format!("{what}: {r:?}")))
    }
}

fn default_pool(dev: &CudaDevice) -> KernelResult<sys::CUmemoryPool> {
    super::device::bind(dev)?;
    let ctx = dev.cuda_stream().context().clone();
    let mut pool = std::ptr::null_mut();
    check("cuDeviceGetDefaultMemPool", unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
    })?;
    Ok(pool)
}

fn set(dev: &CudaDevice, attr: sys::CUmemPool_attribute, mut value: u64) -> KernelResult<()> {
    let pool = default_pool(dev)?;
    check("cuMemPoolSetAttribute", unsafe {
        sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void)
    })
}

fn get(dev: &CudaDevice, attr: sys::CUmemPool_attribute) -> KernelResult<u64> {
    let pool = default_pool(dev)?;
    let mut value = 0u64;
    check("cuMemPoolGetAttribute", unsafe {
        sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void)
    })?;
    Ok(value)
}

/// Keep freed memory in the pool instead of returning it to the driver at synchronizations.
pub fn keep_freed_memory(dev: &CudaDevice) -> KernelResult<()> {
    set(
        dev,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        u64::MAX,
    )
}

/// Bytes currently allocated from the pool.
pub fn used_bytes(dev: &CudaDevice) -> KernelResult<u64> {
    get(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
}

/// High-water mark of allocated bytes since the last [`reset_peak`].
pub fn peak_bytes(dev: &CudaDevice) -> KernelResult<u64> {
    get(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
}

/// Restarts the high-water mark. The driver accepts only 0; the mark then follows the use at
/// each later allocation, so it reads 0 until one happens (callers subtract the use at the
/// reset with `saturating_sub`, which gives 0 growth then).
pub fn reset_peak(dev: &CudaDevice) -> KernelResult<()> {
    set(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
}
