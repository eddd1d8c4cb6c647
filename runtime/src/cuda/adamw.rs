//! The fused AdamW step (`kernels/adamw.cu`): every parameter of a training step updated in one
//! launch from a device table of per-parameter buffers and scalars, with the arithmetic of
//! [`crate::optim::AdamW`]'s op-by-op update rounded the same way (bit-identical results).
//! Parameter layout, scalars and launch geometry live here for both the CUDA path and the host
//! emulator (whose table holds host pointers).

use super::sources::Module;
use super::Launch;
use crate::optim::AdamWConfig;

/// The kernel's CUDA C source.
pub const SOURCE: &str = include_str!("kernels/adamw.cu");

/// Threads per block.
pub const THREADS: u32 = 256;
/// Elements per chunk: 64 per thread, enough that finding a chunk's tensor (a binary search in
/// the table) costs little beside streaming it.
pub const CHUNK_ELEMS: usize = 16384;
/// Most blocks of a launch (several per SM on an H100); they stride over further chunks.
pub const MAX_BLOCKS: usize = 2048;

/// The AdamW module (no compile-time constants).
pub fn module() -> Module {
    Module::plain("adamw", SOURCE)
}

/// One parameter's entry of the kernel's table (`struct AdamWTensor` in the source). The
/// buffer fields are device addresses (host addresses in the emulator); `m` and `v` are 0 on a
/// parameter's first step (zero moments).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWTensor {
    pub p: u64,
    pub g: u64,
    pub m: u64,
    pub v: u64,
    pub p_out: u64,
    pub m_out: u64,
    pub v_out: u64,
    pub len: i64,
    /// Set by [`layout`].
    pub first_chunk: i64,
    pub decay: f32,
    pub has_decay: i32,
    pub neg_step_size: f32,
    pub bias_correction2_sqrt: f32,
}

/// The step's shared parameters (`struct AdamWStep` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub tensors: i32,
    pub chunk: i32,
    pub chunks: i64,
    pub w: f32,
    pub one_minus_w: f32,
    pub lerp_low: i32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for AdamWTensor {}
#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for AdamWStep {}

impl AdamWTensor {
    /// The entry of a parameter of `len` elements updated at step `t` (already incremented)
    /// with learning rate `lr` and weight decay `wd`, buffers unset. The scalars are those of
    /// `optim::AdamW`'s update: computed in f64 as Python does, each rounded once to f32 where
    /// that update hands it to an f32 tensor op.
    pub fn new(config: &AdamWConfig, len: usize, t: u64, lr: f64, wd: f64) -> AdamWTensor {
        let step = t as f64;
        let bias_correction1 = 1.0 - config.beta1.powf(step);
        let bias_correction2 = 1.0 - config.beta2.powf(step);
        let step_size = lr / bias_correction1;
        AdamWTensor {
            p: 0,
            g: 0,
            m: 0,
            v: 0,
            p_out: 0,
            m_out: 0,
            v_out: 0,
            len: len as i64,
            first_chunk: 0,
            decay: (1.0 - lr * wd) as f32,
            has_decay: (wd != 0.0) as i32,
            neg_step_size: (-step_size) as f32,
            bias_correction2_sqrt: bias_correction2.powf(0.5) as f32,
        }
    }
}

impl AdamWStep {
    /// The shared scalars of `config`, rounded as `optim::AdamW`'s update rounds them.
    fn new(config: &AdamWConfig, tensors: i32, chunk: i32, chunks: i64) -> AdamWStep {
        let w = (1.0 - config.beta1) as f32;
        AdamWStep {
            tensors,
            chunk,
            chunks,
            w,
            one_minus_w: 1.0f32 - w,
            lerp_low: (w.abs() < 0.5) as i32,
            beta2: config.beta2 as f32,
            one_minus_beta2: (1.0 - config.beta2) as f32,
            eps: config.eps as f32,
        }
    }
}

/// Numbers the chunks of `chunk` elements across `table` (each entry's `first_chunk`) and gives
/// the step's parameters and launch: at most `max_blocks` blocks of [`THREADS`] threads.
/// The runtime uses [`CHUNK_ELEMS`] and [`MAX_BLOCKS`]; tests pick small ones to cross chunk
/// boundaries and make blocks take several chunks.
pub fn layout(
    config: &AdamWConfig,
    table: &mut [AdamWTensor],
    chunk: usize,
    max_blocks: usize,
) -> Result<(AdamWStep, Launch), String> {
    if table.is_empty() || chunk == 0 || max_blocks == 0 {
        return Err(format!(
            "fused AdamW: {} tensors, chunk {chunk}, {max_blocks} blocks",
            table.len()
        ));
    }
    let tensors = i32::try_from(table.len()).map_err(|_| format!("fused AdamW: {} tensors", table.len()))?;
    let chunk_i32 = i32::try_from(chunk).map_err(|_| format!("fused AdamW: chunk of {chunk} elements"))?;
    let mut chunks = 0i64;
    for e in table.iter_mut() {
        e.first_chunk = chunks;
        chunks += (e.len as u64).div_ceil(chunk as u64) as i64;
    }
    let blocks = (chunks as usize).clamp(1, max_blocks);
    Ok((
        AdamWStep::new(config, tensors, chunk_i32, chunks),
        Launch::linear(blocks, THREADS),
    ))
}

/// One parameter's update: its value, gradient and moments (`None` on its first step), its
/// step count `t` (already incremented) and this step's learning rate and weight decay. What
/// the fused step (`run::step`, and the emulator's) takes.
pub struct FusedUpdate<'a> {
    pub param: &'a candle_core::Tensor,
    pub grad: &'a candle_core::Tensor,
    pub moments: Option<(&'a candle_core::Tensor, &'a candle_core::Tensor)>,
    pub t: u64,
    pub lr: f64,
    pub weight_decay: f64,
}

/// The fused step on candle CUDA tensors.
#[cfg(feature = "cuda")]
pub mod run {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
    use candle_core::{DType, Device, Tensor};

    use super::{layout, module, AdamWTensor, FusedUpdate, CHUNK_ELEMS, MAX_BLOCKS};
    use crate::cuda::device::{config as launch_config, cuda_device, function, tensor, view};
    use crate::kernels::{KernelError, KernelResult};
    use crate::optim::AdamWConfig;

    /// Every update of `updates` in one launch: the new `(param, exp_avg, exp_avg_sq)` of each,
    /// in order, in fresh buffers (the inputs are left as they were). All tensors must be f32
    /// on the first parameter's CUDA device.
    pub fn step(config: &AdamWConfig, updates: &[FusedUpdate]) -> KernelResult<Vec<(Tensor, Tensor, Tensor)>> {
        let Some(first) = updates.first() else {
            return Ok(Vec::new());
        };
        let dev = cuda_device(first.param)?;
        let device = Device::Cuda(dev.clone());
        // Contiguous f32 inputs on the device, four per update (moments absent on a first step).
        let mut inputs: Vec<[Option<Tensor>; 4]> = Vec::with_capacity(updates.len());
        for u in updates {
            let (m, v) = match u.moments {
                Some((m, v)) => (Some(m), Some(v)),
                None => (None, None),
            };
            let mut four: [Option<Tensor>; 4] = Default::default();
            for (slot, t) in four.iter_mut().zip([Some(u.param), Some(u.grad), m, v]) {
                let Some(t) = t else { continue };
                if t.dtype() != DType::F32 || !t.device().same_device(&device) || t.dims() != u.param.dims() {
                    return Err(KernelError::Unsupported(format!(
                        "fused AdamW: every tensor must be f32 of its parameter's shape on {:?}, found {}",
                        dev,
                        crate::dtype::describe(t)
                    )));
                }
                *slot = Some(t.contiguous()?);
            }
            inputs.push(four);
        }
        let mut table: Vec<AdamWTensor> = updates
            .iter()
            .map(|u| AdamWTensor::new(config, u.param.elem_count(), u.t, u.lr, u.weight_decay))
            .collect();
        let (shared, launch) = layout(config, &mut table, CHUNK_ELEMS, MAX_BLOCKS).map_err(KernelError::Unsupported)?;
        // Every element of the outputs is written by the kernel.
        let mut outputs = Vec::with_capacity(updates.len());
        for u in updates {
            let len = u.param.elem_count().max(1);
            outputs.push(unsafe { [dev.alloc::<f32>(len)?, dev.alloc::<f32>(len)?, dev.alloc::<f32>(len)?] });
        }
        let f = function(&dev, &module(), "adamw_step")?;
        let stream = dev.cuda_stream();
        {
            let storages: Vec<Vec<_>> = inputs
                .iter()
                .map(|four| four.iter().flatten().map(|t| t.storage_and_layout()).collect())
                .collect();
            let mut views = Vec::with_capacity(storages.len());
            for four in &storages {
                let v: Vec<_> = four
                    .iter()
                    .map(|(s, l)| view::<f32>(s, l))
                    .collect::<KernelResult<_>>()?;
                views.push(v);
            }
            // The address guards record the kernel's reads and writes on the stream when
            // dropped, so they live until after the launch.
            let mut guards = Vec::new();
            for ((entry, four), outs) in table.iter_mut().zip(&views).zip(outputs.iter_mut()) {
                let mut ins = four.iter().map(|v| v.device_ptr(&stream));
                let (p, gp) = ins.next().expect("parameter");
                let (g, gg) = ins.next().expect("gradient");
                (entry.p, entry.g) = (p, g);
                guards.extend([gp, gg]);
                if let (Some((m, gm)), Some((v, gv))) = (ins.next(), ins.next()) {
                    (entry.m, entry.v) = (m, v);
                    guards.extend([gm, gv]);
                }
                let [po, mo, vo] = outs;
                for (field, out) in [&mut entry.p_out, &mut entry.m_out, &mut entry.v_out]
                    .into_iter()
                    .zip([po, mo, vo])
                {
                    let (ptr, guard) = out.device_ptr_mut(&stream);
                    *field = ptr;
                    guards.push(guard);
                }
            }
            let table_dev = dev.clone_htod(&table)?;
            let mut l = f.builder();
            l.arg(&table_dev).arg(&shared);
            unsafe { l.launch(launch_config(launch, 0)) }.map_err(candle_core::Error::wrap)?;
            drop(guards);
        }
        Ok(outputs
            .into_iter()
            .zip(updates)
            .map(|([p, m, v], u)| {
                let shape = u.param.dims();
                (tensor(p, shape, &dev), tensor(m, shape, &dev), tensor(v, shape, &dev))
            })
            .collect())
    }
}
