//! Timing a call on a device, and the memory it takes there.
//!
//! CUDA work is asynchronous: a call returns once its kernels are queued. Every timed call is
//! therefore bracketed by `Device::synchronize`, so the time covers the kernels themselves and
//! nothing queued before. Memory is the high-water mark of device allocations during the
//! calls above what was held before them (the inputs): the CUDA pool's `USED_MEM_HIGH` on a
//! GPU, the counting allocator on the CPU when the binary installs it (for a single kernel:
//! the executor restarts that allocator's mark at every node, so a whole graph run on the CPU
//! reports the executor's own measured peak instead).

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use vitdet_runtime::Device;

/// What timing a call measured.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// Median wall time of one call, milliseconds.
    pub median_ms: f64,
    pub min_ms: f64,
    /// Timed calls (after the warm-up ones).
    pub iters: usize,
    /// Peak bytes allocated during the calls above what was held before them; `None` where the
    /// device cannot tell (a CPU run without the counting allocator).
    pub peak_bytes: Option<u64>,
}

/// Runs `call` `warmup` times, then `iters` times timed, each between two synchronizations of
/// `device`. What a call returns is dropped after its time is taken.
pub fn time_calls<T>(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut call: impl FnMut() -> Result<T>,
) -> Result<Timing> {
    let iters = iters.max(1);
    for _ in 0..warmup {
        drop(call()?);
    }
    device.synchronize()?;
    let probe = MemoryProbe::start(device)?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        device.synchronize()?;
        let start = Instant::now();
        let out = call()?;
        device.synchronize()?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    let peak_bytes = probe.peak_above_start()?;
    ms.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        iters,
        peak_bytes,
    })
}

/// The high-water mark of a device's allocations from a starting point on.
pub struct MemoryProbe {
    device: Device,
    start_bytes: u64,
}

impl MemoryProbe {
    /// Restarts the device's high-water mark and records the bytes held now.
    pub fn start(device: &Device) -> Result<MemoryProbe> {
        let start_bytes = match device {
            Device::Cpu => {
                vitdet_runtime::alloc::reset_peak();
                vitdet_runtime::alloc::current_bytes() as u64
            }
            _ => cuda_pool::start(device)?,
        };
        Ok(MemoryProbe {
            device: device.clone(),
            start_bytes,
        })
    }

    /// Peak bytes held since [`MemoryProbe::start`] above the bytes held then.
    pub fn peak_above_start(&self) -> Result<Option<u64>> {
        let peak = match &self.device {
            Device::Cpu if !vitdet_runtime::alloc::installed() => return Ok(None),
            Device::Cpu => vitdet_runtime::alloc::peak_bytes() as u64,
            d => cuda_pool::peak(d)?,
        };
        Ok(Some(peak.saturating_sub(self.start_bytes)))
    }
}

/// The CUDA memory pool's counters (`vitdet_runtime::cuda::pool`).
#[cfg(feature = "cuda")]
mod cuda_pool {
    use anyhow::Result;
    use vitdet_runtime::cuda::pool;
    use vitdet_runtime::Device;

    pub fn start(device: &Device) -> Result<u64> {
        let dev = device.as_cuda_device()?;
        pool::reset_peak(dev)?;
        Ok(pool::used_bytes(dev)?)
    }

    pub fn peak(device: &Device) -> Result<u64> {
        Ok(pool::peak_bytes(device.as_cuda_device()?)?)
    }
}

/// Without the `cuda` feature no device other than the CPU can be created.
#[cfg(not(feature = "cuda"))]
mod cuda_pool {
    use anyhow::{bail, Result};
    use vitdet_runtime::Device;

    pub fn start(device: &Device) -> Result<u64> {
        bail!("no memory counters for {device:?} in a build without the `cuda` feature")
    }

    pub fn peak(device: &Device) -> Result<u64> {
        start(device)
    }
}

/// Prepares a device for benchmarking: on CUDA, the pool keeps freed memory (as PyTorch's
/// caching allocator does) instead of returning it to the driver at every synchronization.
pub fn prepare(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        vitdet_runtime::cuda::pool::keep_freed_memory(dev)?;
    }
    let _ = device;
    Ok(())
}
