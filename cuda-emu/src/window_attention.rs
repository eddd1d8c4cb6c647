//! The fused window-attention kernels (built with head dim [`HEAD_DIM`]).

use candle_core::Tensor;
use vitdet_ir::ops::{WindowAttention, WindowAttentionGrad, WindowRelPos};
use vitdet_ir::{DType as IrDType, TensorType};
use vitdet_runtime::cuda::window_attention::WinGeom;
use vitdet_runtime::cuda::Launch;

use crate::{host, tensor, Result};

/// The head dimension the emulated attention kernels are compiled for (`HD` in `build.rs`).
pub const HEAD_DIM: usize = 8;
/// The head dimension of the emulated tensor-core forward (`emu/window_attention_tc.cpp`).
pub const TC_HEAD_DIM: usize = 16;

mod ffi {
    use super::{Launch, WinGeom};
    extern "C" {
        pub fn emu_window_attention_fwd_f32(
            l: Launch,
            qkv: *const f32,
            bias: *const f32,
            relh: *const f32,
            relw: *const f32,
            relbias: *const f32,
            out: *mut f32,
            lse: *mut f32,
            g: WinGeom,
        );
        pub fn emu_window_attention_bwd_q_f32(
            l: Launch,
            qkv: *const f32,
            bias: *const f32,
            relh: *const f32,
            relw: *const f32,
            rh: *const f32,
            rw: *const f32,
            relbias: *const f32,
            out: *const f32,
            dout: *const f32,
            lse: *const f32,
            dsum: *mut f32,
            drelh: *mut f32,
            drelw: *mut f32,
            drelbias: *mut f32,
            dqkv: *mut f32,
            g: WinGeom,
        );
        pub fn emu_window_attention_bwd_kv_f32(
            l: Launch,
            qkv: *const f32,
            bias: *const f32,
            relh: *const f32,
            relw: *const f32,
            relbias: *const f32,
            dout: *const f32,
            lse: *const f32,
            dsum: *const f32,
            dbias: *mut f32,
            dqkv: *mut f32,
            g: WinGeom,
        );
        pub fn emu_window_attention_rel_tables_f32(
            l: Launch,
            qkv: *const f32,
            bias: *const f32,
            rh: *const f32,
            rw: *const f32,
            relh: *mut f32,
            relw: *mut f32,
            g: WinGeom,
        );
        pub fn emu_window_attention_fwd_tc_f16(
            l: Launch,
            smem: u32,
            qkv: *const u16,
            bias: *const u16,
            relh: *const f32,
            relw: *const f32,
            relbias: *const u16,
            out: *mut u16,
            lse: *mut f32,
            g: WinGeom,
        );
        pub fn emu_window_attention_rel_tables_tc_f16(
            l: Launch,
            qkv: *const u16,
            bias: *const u16,
            rh: *const u16,
            rw: *const u16,
            relh: *mut f32,
            relw: *mut f32,
            g: WinGeom,
        );
        pub fn emu_window_attention_rel_tables_grad_f32(
            l: Launch,
            qkv: *const f32,
            bias: *const f32,
            drel: *const f32,
            dr: *mut f32,
            g: WinGeom,
            axis: i32,
        );
    }
}


/// The inputs of one application, on the host.
struct Inputs {
    g: WinGeom,
    qkv: Vec<f32>,
    bias: Option<Vec<f32>>,
    rh: Option<Vec<f32>>,
    rw: Option<Vec<f32>>,
    relbias: Option<Vec<f32>>,
}

fn ptr(v: &Option<Vec<f32>>) -> *const f32 {
    v.as_ref().map_or(std::ptr::null(), |v| v.as_ptr())
}

impl Inputs {
    fn new(op: &WindowAttention, x: &[Tensor]) -> Result<Inputs> {
        let qkv = &x[0];
        let geometry = op.geometry(&TensorType::new(IrDType::F32, qkv.dims().to_vec()))?;
        let g = WinGeom::new(op, &geometry)?;
        if geometry.head_dim != HEAD_DIM {
            return Err(format!("the emulator is built for head dim {HEAD_DIM}, not {}", geometry.head_dim));
        }
        let mut next = 1;
        let bias = if op.qkv_bias {
            next += 1;
            Some(host(&x[1])?)
        } else {
            None
        };
        let (mut rh, mut rw, mut relbias) = (None, None, None);
        match op.rel_pos {
            WindowRelPos::None => {}
            WindowRelPos::Decomposed => {
                rh = Some(host(&x[next])?);
                rw = Some(host(&x[next + 1])?);
            }
            WindowRelPos::Bias => relbias = Some(host(&x[next])?),
        }
        Ok(Inputs {
            g,
            qkv: host(qkv)?,
            bias,
            rh,
            rw,
            relbias,
        })
    }

    /// The decomposed term's per-row tables (empty without that term).
    fn rel_tables(&self) -> (Vec<f32>, Vec<f32>) {
        let g = self.g;
        if g.rel != 1 {
            return (Vec::new(), Vec::new());
        }
        let mut relh = vec![0.0; g.rows() * g.wh as usize];
        let mut relw = vec![0.0; g.rows() * g.ww as usize];
        unsafe {
            ffi::emu_window_attention_rel_tables_f32(
                g.rel_tables(),
                self.qkv.as_ptr(),
                ptr(&self.bias),
                ptr(&self.rh),
                ptr(&self.rw),
                relh.as_mut_ptr(),
                relw.as_mut_ptr(),
                g,
            )
        };
        (relh, relw)
    }
}

/// The forward kernels: `[out, lse]` as the runtime's `window_attention` returns them.
pub fn window_attention(op: &WindowAttention, x: &[Tensor]) -> Result<Vec<Tensor>> {
    let inp = Inputs::new(op, x)?;
    let g = inp.g;
    let (relh, relw) = inp.rel_tables();
    let mut out = vec![0.0; g.out_elems()];
    let mut lse = vec![0.0; g.rows()];
    unsafe {
        ffi::emu_window_attention_fwd_f32(
            g.attention(),
            inp.qkv.as_ptr(),
            ptr(&inp.bias),
            relh.as_ptr(),
            relw.as_ptr(),
            ptr(&inp.relbias),
            out.as_mut_ptr(),
            lse.as_mut_ptr(),
            g,
        )
    };
    let (b, h, w, c) = (g.batch as usize, g.h as usize, g.w as usize, g.channels as usize);
    Ok(vec![
        tensor(out, &[b, h, w, c])?,
        tensor(lse, &[g.windows(), g.heads as usize, g.tokens()])?,
    ])
}

/// The backward kernels: one gradient per forward input, as `window_attention_grad` returns.
pub fn window_attention_grad(op: &WindowAttentionGrad, x: &[Tensor]) -> Result<Vec<Tensor>> {
    let fwd = op.forward();
    let nf = fwd.num_inputs();
    let inp = Inputs::new(&fwd, &x[..nf])?;
    let g = inp.g;
    let (out, lse, dout) = (host(&x[nf])?, host(&x[nf + 1])?, host(&x[nf + 2])?);
    let (relh, relw) = inp.rel_tables();
    let n = g.tokens();
    let mut dsum = vec![0.0; g.rows()];
    let mut drelh = vec![0.0; relh.len()];
    let mut drelw = vec![0.0; relw.len()];
    let mut drelbias = vec![0.0; if g.rel == 2 { g.heads as usize * n * n } else { 0 }];
    let mut dqkv = vec![0.0; inp.qkv.len()];
    let mut dbias = vec![0.0; 3 * g.channels as usize];
    unsafe {
        ffi::emu_window_attention_bwd_q_f32(
            g.attention(),
            inp.qkv.as_ptr(),
            ptr(&inp.bias),
            relh.as_ptr(),
            relw.as_ptr(),
            ptr(&inp.rh),
            ptr(&inp.rw),
            ptr(&inp.relbias),
            out.as_ptr(),
            dout.as_ptr(),
            lse.as_ptr(),
            dsum.as_mut_ptr(),
            drelh.as_mut_ptr(),
            drelw.as_mut_ptr(),
            drelbias.as_mut_ptr(),
            dqkv.as_mut_ptr(),
            g,
        );
        ffi::emu_window_attention_bwd_kv_f32(
            g.attention(),
            inp.qkv.as_ptr(),
            ptr(&inp.bias),
            relh.as_ptr(),
            relw.as_ptr(),
            ptr(&inp.relbias),
            dout.as_ptr(),
            lse.as_ptr(),
            dsum.as_ptr(),
            dbias.as_mut_ptr(),
            dqkv.as_mut_ptr(),
            g,
        );
    }
    let mut grads = vec![tensor(dqkv, x[0].dims())?];
    if fwd.qkv_bias {
        grads.push(tensor(dbias, &[3 * g.channels as usize])?);
    }
    match fwd.rel_pos {
        WindowRelPos::None => {}
        WindowRelPos::Decomposed => {
            for (axis, drel) in [(0, &drelh), (1, &drelw)] {
                let mut dr = vec![0.0; g.rel_table_elems(axis)];
                unsafe {
                    ffi::emu_window_attention_rel_tables_grad_f32(
                        g.rel_tables_grad(axis),
                        inp.qkv.as_ptr(),
                        ptr(&inp.bias),
                        drel.as_ptr(),
                        dr.as_mut_ptr(),
                        g,
                        axis as i32,
                    )
                };
                grads.push(tensor(dr, x[grads.len()].dims())?);
            }
        }
        WindowRelPos::Bias => grads.push(tensor(drelbias, x[grads.len()].dims())?),
    }
    Ok(grads)
}

/// f16 elements of a CPU tensor, as bits.
fn host_f16(t: &Tensor) -> Result<Vec<u16>> {
    let v = t
        .to_dtype(candle_core::DType::F16)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<half::f16>())
        .map_err(|e| e.to_string())?;
    Ok(v.into_iter().map(|x| x.to_bits()).collect())
}

/// The tensor-core forward on f16 inputs (head dim [`TC_HEAD_DIM`]): `[out (f16), lse (f32)]`.
pub fn window_attention_tc_f16(op: &WindowAttention, x: &[Tensor]) -> Result<Vec<Tensor>> {
    let qkv = &x[0];
    let geometry = op.geometry(&TensorType::new(IrDType::F16, qkv.dims().to_vec()))?;
    let g = WinGeom::new(op, &geometry)?;
    if geometry.head_dim != TC_HEAD_DIM {
        return Err(format!("the tensor-core emulation is built for head dim {TC_HEAD_DIM}, not {}", geometry.head_dim));
    }
    let inputs: Vec<Vec<u16>> = x.iter().map(host_f16).collect::<Result<_>>()?;
    let opt = |k: usize| inputs.get(k).map_or(std::ptr::null(), |v| v.as_ptr());
    let mut next = 1;
    let bias = if op.qkv_bias {
        next += 1;
        opt(1)
    } else {
        std::ptr::null()
    };
    let (mut relh, mut relw) = (vec![0f32; 1], vec![0f32; 1]);
    let mut relbias = std::ptr::null();
    match op.rel_pos {
        WindowRelPos::None => {}
        WindowRelPos::Decomposed => {
            relh = vec![0.0; g.rows() * g.wh as usize];
            relw = vec![0.0; g.rows() * g.ww as usize];
            unsafe {
                ffi::emu_window_attention_rel_tables_tc_f16(
                    g.rel_tables(),
                    inputs[0].as_ptr(),
                    bias,
                    opt(next),
                    opt(next + 1),
                    relh.as_mut_ptr(),
                    relw.as_mut_ptr(),
                    g,
                )
            };
        }
        WindowRelPos::Bias => relbias = opt(next),
    }
    let mut out = vec![0u16; g.out_elems()];
    let mut lse = vec![0f32; g.rows()];
    unsafe {
        ffi::emu_window_attention_fwd_tc_f16(
            g.attention_tc(),
            g.tc_shared_bytes() as u32,
            inputs[0].as_ptr(),
            bias,
            relh.as_ptr(),
            relw.as_ptr(),
            relbias,
            out.as_mut_ptr(),
            lse.as_mut_ptr(),
            g,
        )
    };
    let (b, h, w, c) = (g.batch as usize, g.h as usize, g.w as usize, g.channels as usize);
    let out: Vec<half::f16> = out.into_iter().map(half::f16::from_bits).collect();
    Ok(vec![
        Tensor::from_vec(out, &[b, h, w, c][..], &candle_core::Device::Cpu).map_err(|e| e.to_string())?,
        tensor(lse, &[g.windows(), g.heads as usize, g.tokens()])?,
    ])
}
