//! The fused window-attention kernels (built with head dim [`HEAD_DIM`]).

use candle_core::{DType, Tensor};
use vitdet_ir::ops::{WindowAttention, WindowAttentionGrad, WindowRelPos};
use vitdet_ir::{DType as IrDType, TensorType};
use vitdet_runtime::cuda::window_attention::WinGeom;
use vitdet_runtime::cuda::Launch;

use crate::{host, tensor, Result};

/// The head dimension the emulated attention kernels are compiled for (`HD` in `build.rs`).
pub const HEAD_DIM: usize = 8;
/// The head dimensions of the emulated tensor-core kernels (`emu/window_attention_tc.cpp`,
/// `emu/window_attention_tc64.cpp`): the smallest the mma tiles take, and ViTDet-B/L's.
pub const TC_HEAD_DIMS: [usize; 2] = [16, 64];

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
            return Err(format!(
                "the emulator is built for head dim {HEAD_DIM}, not {}",
                geometry.head_dim
            ));
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
    Ok(vec![tensor(out, &g.out_dims())?, tensor(lse, &g.lse_dims())?])
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

/// The tensor-core kernels of one half type: element pointers are the 16-bit values' bits.
struct TcKernels {
    fwd: unsafe extern "C" fn(
        Launch,
        u32,
        *const u16,
        *const u16,
        *const f32,
        *const f32,
        *const u16,
        *mut u16,
        *mut f32,
        WinGeom,
    ),
    rel_tables:
        unsafe extern "C" fn(Launch, *const u16, *const u16, *const u16, *const u16, *mut f32, *mut f32, WinGeom),
    bwd_dsum: unsafe extern "C" fn(Launch, *const u16, *const u16, *mut f32, WinGeom),
    #[allow(clippy::type_complexity)]
    bwd_kv: unsafe extern "C" fn(
        Launch,
        u32,
        *const u16,
        *const u16,
        *const f32,
        *const f32,
        *const u16,
        *const u16,
        *const f32,
        *const f32,
        *mut f32,
        *mut u16,
        WinGeom,
    ),
    #[allow(clippy::type_complexity)]
    bwd_q: unsafe extern "C" fn(
        Launch,
        u32,
        *const u16,
        *const u16,
        *const f32,
        *const f32,
        *const u16,
        *const u16,
        *const f32,
        *const f32,
        *mut f32,
        *mut f32,
        *mut f32,
        *mut f32,
        WinGeom,
    ),
    bwd_dq: unsafe extern "C" fn(Launch, *const f32, *const f32, *const f32, *const u16, *const u16, *mut u16, WinGeom),
    rel_tables_grad: unsafe extern "C" fn(Launch, *const u16, *const u16, *const f32, *mut f32, WinGeom, i32),
}

/// The emulator's entry points for one half type, by name (`emu/window_attention_tc.cpp`).
macro_rules! tc_kernels {
    (
        $fwd:ident,
        $rel_tables:ident,
        $bwd_dsum:ident,
        $bwd_kv:ident,
        $bwd_q:ident,
        $bwd_dq:ident,
        $rel_tables_grad:ident
    ) => {{
        extern "C" {
            fn $fwd(
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
            fn $rel_tables(
                l: Launch,
                qkv: *const u16,
                bias: *const u16,
                rh: *const u16,
                rw: *const u16,
                relh: *mut f32,
                relw: *mut f32,
                g: WinGeom,
            );
            fn $bwd_dsum(l: Launch, out: *const u16, dout: *const u16, dsum: *mut f32, g: WinGeom);
            fn $bwd_kv(
                l: Launch,
                smem: u32,
                qkv: *const u16,
                bias: *const u16,
                relh: *const f32,
                relw: *const f32,
                relbias: *const u16,
                dout: *const u16,
                lse: *const f32,
                dsum: *const f32,
                dbias: *mut f32,
                dqkv: *mut u16,
                g: WinGeom,
            );
            fn $bwd_q(
                l: Launch,
                smem: u32,
                qkv: *const u16,
                bias: *const u16,
                relh: *const f32,
                relw: *const f32,
                relbias: *const u16,
                dout: *const u16,
                lse: *const f32,
                dsum: *const f32,
                dq: *mut f32,
                drelh: *mut f32,
                drelw: *mut f32,
                drelbias: *mut f32,
                g: WinGeom,
            );
            fn $bwd_dq(
                l: Launch,
                dq: *const f32,
                drelh: *const f32,
                drelw: *const f32,
                rh: *const u16,
                rw: *const u16,
                dqkv: *mut u16,
                g: WinGeom,
            );
            fn $rel_tables_grad(
                l: Launch,
                qkv: *const u16,
                bias: *const u16,
                drel: *const f32,
                dr: *mut f32,
                g: WinGeom,
                axis: i32,
            );
        }
        TcKernels {
            fwd: $fwd,
            rel_tables: $rel_tables,
            bwd_dsum: $bwd_dsum,
            bwd_kv: $bwd_kv,
            bwd_q: $bwd_q,
            bwd_dq: $bwd_dq,
            rel_tables_grad: $rel_tables_grad,
        }
    }};
}

/// The tensor-core kernels for `dtype` (f16 or bf16) at head dim `hd` (one of [`TC_HEAD_DIMS`]).
fn tc_kernels(dtype: DType, hd: usize) -> Result<TcKernels> {
    Ok(match (dtype, hd) {
        (DType::F16, 16) => tc_kernels!(
            emu_window_attention_fwd_tc_f16,
            emu_window_attention_rel_tables_tc_f16,
            emu_window_attention_bwd_dsum_tc_f16,
            emu_window_attention_bwd_kv_tc_f16,
            emu_window_attention_bwd_q_tc_f16,
            emu_window_attention_bwd_dq_tc_f16,
            emu_window_attention_rel_tables_grad_tc_f16
        ),
        (DType::BF16, 16) => tc_kernels!(
            emu_window_attention_fwd_tc_bf16,
            emu_window_attention_rel_tables_tc_bf16,
            emu_window_attention_bwd_dsum_tc_bf16,
            emu_window_attention_bwd_kv_tc_bf16,
            emu_window_attention_bwd_q_tc_bf16,
            emu_window_attention_bwd_dq_tc_bf16,
            emu_window_attention_rel_tables_grad_tc_bf16
        ),
        (DType::F16, 64) => tc_kernels!(
            emu_window_attention_fwd_tc_f16_hd64,
            emu_window_attention_rel_tables_tc_f16_hd64,
            emu_window_attention_bwd_dsum_tc_f16_hd64,
            emu_window_attention_bwd_kv_tc_f16_hd64,
            emu_window_attention_bwd_q_tc_f16_hd64,
            emu_window_attention_bwd_dq_tc_f16_hd64,
            emu_window_attention_rel_tables_grad_tc_f16_hd64
        ),
        (DType::BF16, 64) => tc_kernels!(
            emu_window_attention_fwd_tc_bf16_hd64,
            emu_window_attention_rel_tables_tc_bf16_hd64,
            emu_window_attention_bwd_dsum_tc_bf16_hd64,
            emu_window_attention_bwd_kv_tc_bf16_hd64,
            emu_window_attention_bwd_q_tc_bf16_hd64,
            emu_window_attention_bwd_dq_tc_bf16_hd64,
            emu_window_attention_rel_tables_grad_tc_bf16_hd64
        ),
        (DType::F16 | DType::BF16, hd) => {
            return Err(format!(
                "the tensor-core emulation is built for head dims {TC_HEAD_DIMS:?}, not {hd}"
            ))
        }
        (t, _) => return Err(format!("the tensor-core kernels take f16 or bf16, not {t:?}")),
    })
}

/// The elements of a CPU tensor rounded to `dtype` (f16 or bf16), as bits.
fn host_half(t: &Tensor, dtype: DType) -> Result<Vec<u16>> {
    let t = t
        .to_dtype(dtype)
        .and_then(|t| t.flatten_all())
        .map_err(|e| e.to_string())?;
    let bits = match dtype {
        DType::F16 => t
            .to_vec1::<half::f16>()
            .map(|v| v.into_iter().map(|x| x.to_bits()).collect()),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .map(|v| v.into_iter().map(|x| x.to_bits()).collect()),
        t => return Err(format!("expected f16 or bf16, not {t:?}")),
    };
    bits.map_err(|e| e.to_string())
}

/// The f16 / bf16 inputs of one tensor-core application (head dims [`TC_HEAD_DIMS`], the dtype
/// of the first input), with the decomposed term's tables built by the emulated `rel_tables`
/// kernel.
struct TcInputs {
    dtype: DType,
    kernels: TcKernels,
    g: WinGeom,
    inputs: Vec<Vec<u16>>,
    /// Where qkv (`inputs[0]`) starts in its buffer (see [`place_qkv`]).
    qkv_offset: usize,
    bias: Option<usize>,
    rh: Option<usize>,
    relbias: Option<usize>,
    relh: Vec<f32>,
    relw: Vec<f32>,
}

/// qkv's values in a buffer with room to place them: at a 16-byte aligned address (the
/// kernels' vector tile loads), or 2 bytes past one (`misaligned`: their element-wise path).
/// Returns the buffer and the offset of the first value.
fn place_qkv(values: &[u16], misaligned: bool) -> (Vec<u16>, usize) {
    let mut buffer = vec![0u16; values.len() + 8];
    let want = if misaligned { 2 } else { 0 };
    let offset = (0..8)
        .find(|o| (buffer.as_ptr() as usize + 2 * o) % 16 == want)
        .expect("a u16 buffer is 2-byte aligned");
    buffer[offset..offset + values.len()].copy_from_slice(values);
    (buffer, offset)
}

impl TcInputs {
    fn new(op: &WindowAttention, x: &[Tensor], misaligned: bool) -> Result<TcInputs> {
        let dtype = x[0].dtype();
        let geometry = op.geometry(&TensorType::new(IrDType::F16, x[0].dims().to_vec()))?;
        let kernels = tc_kernels(dtype, geometry.head_dim)?;
        let g = WinGeom::new(op, &geometry)?;
        let mut inputs: Vec<Vec<u16>> = x.iter().map(|t| host_half(t, dtype)).collect::<Result<_>>()?;
        let (qkv, qkv_offset) = place_qkv(&inputs[0], misaligned);
        inputs[0] = qkv;
        let bias = op.qkv_bias.then_some(1);
        let next = 1 + op.qkv_bias as usize;
        let (rh, relbias) = match op.rel_pos {
            WindowRelPos::None => (None, None),
            WindowRelPos::Decomposed => (Some(next), None),
            WindowRelPos::Bias => (None, Some(next)),
        };
        let mut t = TcInputs {
            dtype,
            kernels,
            g,
            inputs,
            qkv_offset,
            bias,
            rh,
            relbias,
            relh: vec![0.0; 1],
            relw: vec![0.0; 1],
        };
        if let Some(k) = rh {
            t.relh = vec![0.0; g.rows() * g.wh as usize];
            t.relw = vec![0.0; g.rows() * g.ww as usize];
            unsafe {
                (t.kernels.rel_tables)(
                    g.rel_tables(),
                    t.qkv(),
                    t.ptr(bias),
                    t.ptr(Some(k)),
                    t.ptr(Some(k + 1)),
                    t.relh.as_mut_ptr(),
                    t.relw.as_mut_ptr(),
                    g,
                )
            };
        }
        Ok(t)
    }

    /// The qkv input.
    fn qkv(&self) -> *const u16 {
        self.inputs[0][self.qkv_offset..].as_ptr()
    }

    /// Input `k` (null when absent: the kernels never read it).
    fn ptr(&self, k: Option<usize>) -> *const u16 {
        k.map_or(std::ptr::null(), |k| self.inputs[k].as_ptr())
    }
}

/// A CPU tensor of `dtype` (f16 or bf16) from the values' bits.
fn tensor_half(v: Vec<u16>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let device = &candle_core::Device::Cpu;
    match dtype {
        DType::F16 => Tensor::from_vec(
            v.into_iter().map(half::f16::from_bits).collect::<Vec<_>>(),
            shape,
            device,
        ),
        _ => Tensor::from_vec(
            v.into_iter().map(half::bf16::from_bits).collect::<Vec<_>>(),
            shape,
            device,
        ),
    }
    .map_err(|e| e.to_string())
}

/// The tensor-core forward on f16 or bf16 inputs (head dims [`TC_HEAD_DIMS`]): `[out (the
/// inputs' dtype), lse (f32)]`.
pub fn window_attention_tc(op: &WindowAttention, x: &[Tensor]) -> Result<Vec<Tensor>> {
    window_attention_tc_placed(op, x, false)
}

/// [`window_attention_tc`] with qkv 16-byte aligned, or (`misaligned`) not.
pub fn window_attention_tc_placed(op: &WindowAttention, x: &[Tensor], misaligned: bool) -> Result<Vec<Tensor>> {
    let t = TcInputs::new(op, x, misaligned)?;
    let g = t.g;
    let mut out = vec![0u16; g.out_elems()];
    let mut lse = vec![0f32; g.rows()];
    unsafe {
        (t.kernels.fwd)(
            g.attention_tc(),
            g.tc_shared_bytes(2) as u32,
            t.qkv(),
            t.ptr(t.bias),
            t.relh.as_ptr(),
            t.relw.as_ptr(),
            t.ptr(t.relbias),
            out.as_mut_ptr(),
            lse.as_mut_ptr(),
            g,
        )
    };
    Ok(vec![
        tensor_half(out, &g.out_dims(), t.dtype)?,
        tensor(lse, &g.lse_dims())?,
    ])
}

/// The tensor-core backward on f16 or bf16 inputs (head dims [`TC_HEAD_DIMS`]), in the order
/// `run::backward` launches it: one gradient per forward input, in the inputs' dtype (the f32
/// accumulators of the small inputs rounded to it, as there).
pub fn window_attention_grad_tc(op: &WindowAttentionGrad, x: &[Tensor]) -> Result<Vec<Tensor>> {
    window_attention_grad_tc_placed(op, x, false)
}

/// [`window_attention_grad_tc`] with qkv 16-byte aligned, or (`misaligned`) not.
pub fn window_attention_grad_tc_placed(
    op: &WindowAttentionGrad,
    x: &[Tensor],
    misaligned: bool,
) -> Result<Vec<Tensor>> {
    let fwd = op.forward();
    let nf = fwd.num_inputs();
    let t = TcInputs::new(&fwd, &x[..nf], misaligned)?;
    let g = t.g;
    let n = g.tokens();
    let lse = x[nf + 1].to_dtype(candle_core::DType::F32).map_err(|e| e.to_string())?;
    let (out, lse, dout) = (
        host_half(&x[nf], t.dtype)?,
        host(&lse)?,
        host_half(&x[nf + 2], t.dtype)?,
    );
    let decomposed = t.rh.is_some();
    let mut dsum = vec![0f32; g.rows()];
    let mut dq = vec![0f32; g.rows() * g.hd as usize];
    let mut drelh = vec![0f32; if decomposed { g.rows() * g.wh as usize } else { 1 }];
    let mut drelw = vec![0f32; if decomposed { g.rows() * g.ww as usize } else { 1 }];
    let mut drelbias = vec![
        0f32;
        if t.relbias.is_some() {
            g.heads as usize * n * n
        } else {
            1
        }
    ];
    let mut dbias = vec![0f32; 3 * g.channels as usize];
    let mut dqkv = vec![0u16; x[0].elem_count()];
    unsafe {
        (t.kernels.bwd_dsum)(g.bwd_dsum_tc(), out.as_ptr(), dout.as_ptr(), dsum.as_mut_ptr(), g);
        (t.kernels.bwd_q)(
            g.attention_bwd_tc(),
            g.tc_bwd_q_shared_bytes(2) as u32,
            t.qkv(),
            t.ptr(t.bias),
            t.relh.as_ptr(),
            t.relw.as_ptr(),
            t.ptr(t.relbias),
            dout.as_ptr(),
            lse.as_ptr(),
            dsum.as_ptr(),
            dq.as_mut_ptr(),
            drelh.as_mut_ptr(),
            drelw.as_mut_ptr(),
            drelbias.as_mut_ptr(),
            g,
        );
        (t.kernels.bwd_kv)(
            g.attention_bwd_tc(),
            g.tc_bwd_kv_shared_bytes(2) as u32,
            t.qkv(),
            t.ptr(t.bias),
            t.relh.as_ptr(),
            t.relw.as_ptr(),
            t.ptr(t.relbias),
            dout.as_ptr(),
            lse.as_ptr(),
            dsum.as_ptr(),
            dbias.as_mut_ptr(),
            dqkv.as_mut_ptr(),
            g,
        );
        (t.kernels.bwd_dq)(
            g.bwd_dq_tc(),
            dq.as_ptr(),
            drelh.as_ptr(),
            drelw.as_ptr(),
            t.ptr(t.rh),
            t.ptr(t.rh.map(|k| k + 1)),
            dqkv.as_mut_ptr(),
            g,
        );
    }
    let half = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
        tensor(v, shape)?.to_dtype(t.dtype).map_err(|e| e.to_string())
    };
    let mut grads = vec![tensor_half(dqkv, x[0].dims(), t.dtype)?];
    if fwd.qkv_bias {
        grads.push(half(dbias, &[3 * g.channels as usize])?);
    }
    match fwd.rel_pos {
        WindowRelPos::None => {}
        WindowRelPos::Decomposed => {
            for (axis, drel) in [(0, &drelh), (1, &drelw)] {
                let mut dr = vec![0.0; g.rel_table_elems(axis)];
                unsafe {
                    (t.kernels.rel_tables_grad)(
                        g.rel_tables_grad(axis),
                        t.qkv(),
                        t.ptr(t.bias),
                        drel.as_ptr(),
                        dr.as_mut_ptr(),
                        g,
                        axis as i32,
                    )
                };
                grads.push(half(dr, x[grads.len()].dims())?);
            }
        }
        WindowRelPos::Bias => grads.push(half(drelbias, x[grads.len()].dims())?),
    }
    Ok(grads)
}
