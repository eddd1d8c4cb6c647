//! The fused AdamW kernel on CPU f32 tensors: the runtime's table entries and layout
//! ([`vitdet_runtime::cuda::adamw`]) with host pointers in the table.

use candle_core::Tensor;
use vitdet_runtime::cuda::adamw::{layout, AdamWStep, AdamWTensor, FusedUpdate};
use vitdet_runtime::cuda::Launch;
use vitdet_runtime::optim::AdamWConfig;

use crate::{host, tensor, Result};

mod ffi {
    use super::{AdamWStep, AdamWTensor, Launch};
    extern "C" {
        pub fn emu_adamw_step(l: Launch, table: *const AdamWTensor, s: AdamWStep);
    }
}

/// Every update in one launch, chunks of `chunk` elements over at most `max_blocks` blocks
/// (the runtime uses `CHUNK_ELEMS` and `MAX_BLOCKS`): the new `(param, exp_avg, exp_avg_sq)`
/// of each, in order.
pub fn step(
    config: &AdamWConfig,
    updates: &[FusedUpdate],
    chunk: usize,
    max_blocks: usize,
) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
    let mut inputs = Vec::with_capacity(updates.len());
    for u in updates {
        let moments = match u.moments {
            Some((m, v)) => Some((host(m)?, host(v)?)),
            None => None,
        };
        inputs.push((host(u.param)?, host(u.grad)?, moments));
    }
    // NaN-filled outputs: an element the kernel does not write shows.
    let mut outputs: Vec<[Vec<f32>; 3]> = updates
        .iter()
        .map(|u| std::array::from_fn(|_| vec![f32::NAN; u.param.elem_count()]))
        .collect();
    let mut table: Vec<AdamWTensor> = updates
        .iter()
        .map(|u| AdamWTensor::new(config, u.param.elem_count(), u.t, u.lr, u.weight_decay))
        .collect();
    for ((entry, (p, g, moments)), [po, mo, vo]) in table.iter_mut().zip(&inputs).zip(outputs.iter_mut()) {
        entry.p = p.as_ptr() as u64;
        entry.g = g.as_ptr() as u64;
        if let Some((m, v)) = moments {
            entry.m = m.as_ptr() as u64;
            entry.v = v.as_ptr() as u64;
        }
        entry.p_out = po.as_mut_ptr() as u64;
        entry.m_out = mo.as_mut_ptr() as u64;
        entry.v_out = vo.as_mut_ptr() as u64;
    }
    let (shared, launch) = layout(config, &mut table, chunk, max_blocks)?;
    unsafe { ffi::emu_adamw_step(launch, table.as_ptr(), shared) };
    outputs
        .into_iter()
        .zip(updates)
        .map(|([p, m, v], u)| {
            let shape = u.param.dims();
            Ok((tensor(p, shape)?, tensor(m, shape)?, tensor(v, shape)?))
        })
        .collect()
}
