//! Launch geometry and parameters of the fused windowed-attention kernels
//! (`kernels/window_attention.cu`), shared by the CUDA path and the host emulator.
//!
//! Forward: for the decomposed relative-position term, `rel_tables` first builds the per-row
//! tables `relh = q . rh` and `relw = q . rw`; then `fwd` (f32, one thread per query row) or
//! `fwd_tc` (f16 / bf16 with head dims that are multiples of 16, on the tensor cores) writes
//! `out` and `lse`. Backward:
//! the tables again, `bwd_q` (dq, D = rowsum(dout * out), the tables' and the BEiT bias's
//! gradients), then `bwd_kv` (dk, dv, the qkv bias's padded-token share), then
//! `rel_tables_grad` on each axis for `drh` and `drw`. For f16 / bf16 on the tensor cores
//! (`tensor_cores()`), `bwd_q` gives way to `bwd_dsum_tc` (D per row) and `bwd_q_tc` (one
//! block per 64 queries: dq in f32, the rel-pos gradients), `bwd_kv` to `bwd_kv_tc` (one block
//! per 64 keys: dk, dv, the qkv bias's padded-key share, from the same inputs), and
//! `bwd_dq_tc` adds the decomposed term's share to dq, into dqkv.

use vitdet_ir::ops::{WindowAttention, WindowGeometry, WindowRelPos};

use super::sources::Module;

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels/window_attention.cu");
use super::Launch;

/// Threads per block of every window-attention kernel (`BQ` in the source).
pub const THREADS: u32 = 128;
/// Query rows, keys per tile and threads of a tensor-core forward block (`TC_BQ`, `TC_BK`).
pub const TC_ROWS: usize = 64;
pub const TC_KEYS: usize = 64;
pub const TC_THREADS: u32 = 128;
/// Row stride (f32 elements) of the backward's staged relw rows (`TC_LDR`).
const TC_LDR: usize = TC_KEYS + 4;
/// Largest window side the decomposed term supports (`WIN_MAX` in the source).
pub const WIN_MAX: usize = 64;
/// Largest head dimension the kernels are compiled for (per-thread rows live in registers).
pub const HEAD_DIM_MAX: usize = 128;

/// The kernels compiled for head dimension `hd`.
pub fn module_for_head_dim(hd: usize) -> Module {
    Module {
        family: "window_attention",
        source: SOURCE,
        defines: vec![("HD", hd.to_string())],
    }
}

/// Which attention kernels half types run, from `VITDET_ATTENTION_KERNELS` (unset: the tensor
/// cores where they apply): `tensor-cores`, or `fma` for the f32-accumulating FMA kernels (the
/// reference path, for comparisons or a GPU where the tensor-core kernels misbehave). `true`
/// for `fma`; an error naming the variable for any other value.
pub fn fma_requested(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("tensor-cores") => Ok(false),
        Some("fma") => Ok(true),
        Some(other) => Err(format!(
            "VITDET_ATTENTION_KERNELS={other}: expected `tensor-cores` or `fma`"
        )),
    }
}

/// The kernels' parameter block (`struct WinGeom` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WinGeom {
    pub batch: i32,
    pub h: i32,
    pub w: i32,
    pub wh: i32,
    pub ww: i32,
    pub gh: i32,
    pub gw: i32,
    pub heads: i32,
    pub hd: i32,
    pub channels: i32,
    pub scale: f32,
    /// 0 none, 1 decomposed, 2 BEiT bias.
    pub rel: i32,
    pub has_bias: i32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for WinGeom {}

fn fits(what: &str, v: usize) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} {v} does not fit the kernels' 32-bit indexing"))
}

impl WinGeom {
    /// The parameters for `op` on the geometry its `qkv` input gives, or why the kernels
    /// cannot run it.
    pub fn new(op: &WindowAttention, g: &WindowGeometry) -> Result<WinGeom, String> {
        let rel = match op.rel_pos {
            WindowRelPos::None => 0,
            WindowRelPos::Decomposed => 1,
            WindowRelPos::Bias => 2,
        };
        if rel == 1 && g.window.iter().any(|&s| s > WIN_MAX) {
            return Err(format!(
                "window {:?} exceeds the decomposed kernels' largest side {WIN_MAX}",
                g.window
            ));
        }
        if g.head_dim == 0 || g.head_dim > HEAD_DIM_MAX {
            return Err(format!("head dim {} outside 1..={HEAD_DIM_MAX}", g.head_dim));
        }
        let windows = g.batch * g.windows();
        if g.heads > 65_535 || windows > 65_535 {
            return Err(format!("{} heads x {windows} windows exceed the launch grid", g.heads));
        }
        fits("tokens per window", g.tokens())?;
        fits("qkv row", 3 * g.channels)?;
        Ok(WinGeom {
            batch: fits("batch", g.batch)?,
            h: fits("height", g.hw[0])?,
            w: fits("width", g.hw[1])?,
            wh: g.window[0] as i32,
            ww: g.window[1] as i32,
            gh: g.grid[0] as i32,
            gw: g.grid[1] as i32,
            heads: g.heads as i32,
            hd: g.head_dim as i32,
            channels: g.channels as i32,
            scale: op.scale as f32,
            rel,
            has_bias: op.qkv_bias as i32,
        })
    }

    pub fn windows(&self) -> usize {
        (self.batch * self.gh * self.gw) as usize
    }

    pub fn tokens(&self) -> usize {
        (self.wh * self.ww) as usize
    }

    /// (window, head, query) rows: the length of `lse`.
    pub fn rows(&self) -> usize {
        self.windows() * self.heads as usize * self.tokens()
    }

    /// The unpadded output's shape, `[B, H, W, C]`.
    pub fn out_dims(&self) -> [usize; 4] {
        [self.batch, self.h, self.w, self.channels].map(|d| d as usize)
    }

    /// Elements of the unpadded `[B, H, W, C]` output.
    pub fn out_elems(&self) -> usize {
        self.out_dims().iter().product()
    }

    /// The log-sum-exp output's shape, `[windows, heads, tokens]`.
    pub fn lse_dims(&self) -> [usize; 3] {
        [self.windows(), self.heads as usize, self.tokens()]
    }

    /// `fwd`, `bwd_q`, `bwd_kv`: one thread per row of a (window, head).
    pub fn attention(&self) -> Launch {
        self.per_window_head(THREADS as usize, THREADS)
    }

    /// Grid (token tiles of `tile`, heads, windows) of blocks of `threads`.
    fn per_window_head(&self, tile: usize, threads: u32) -> Launch {
        Launch {
            grid: [
                self.tokens().div_ceil(tile) as u32,
                self.heads as u32,
                self.windows() as u32,
            ],
            block: [threads, 1, 1],
        }
    }

    /// Whether the tensor-core forward and backward take this head dim (for f16 / bf16 inputs).
    pub fn tensor_cores(&self) -> bool {
        self.hd % 16 == 0
    }

    /// `fwd_tc`: four warps per 64 query rows of a (window, head).
    pub fn attention_tc(&self) -> Launch {
        self.per_window_head(TC_ROWS, TC_THREADS)
    }

    /// Dynamic shared memory of `fwd_tc` (the layout at the top of `wa_fwd_tc`), for elements
    /// of `elem` bytes: two stages of the K and V rows and the keys' window coordinates, and
    /// where every key tile is one row of the window (`row_tiles`) the queries' f32 relw rows
    /// (scores, probabilities and output stay in registers).
    pub fn tc_shared_bytes(&self, elem: usize) -> usize {
        let ldt = self.hd as usize + 8;
        let relw = if self.row_tiles() { TC_ROWS * TC_LDR * 4 } else { 0 };
        elem * 4 * TC_KEYS * ldt + 4 * TC_KEYS * 4 + relw
    }

    /// Dynamic shared memory of `bwd_kv_tc` (the layout at the top of `wa_bwd_kv_tc`), likewise: the K
    /// and V rows, and two stages of the Q and dO rows, four values per query and, where every
    /// key block is one row of the window (`row_tiles`), the queries' f32 relw rows.
    pub fn tc_bwd_kv_shared_bytes(&self, elem: usize) -> usize {
        let ldt = self.hd as usize + 8;
        let relw = if self.row_tiles() { 2 * TC_ROWS * TC_LDR * 4 } else { 0 };
        elem * (2 * TC_KEYS * ldt + 4 * TC_ROWS * ldt) + 2 * 4 * TC_ROWS * 4 + relw
    }

    /// Dynamic shared memory of `bwd_q_tc` (the layout at the top of `wa_bwd_q_tc`), likewise: two stages
    /// of the K and V rows and the keys' window coordinates; then for the decomposed term either
    /// (`row_tiles`) the queries' relw rows and their gradient, or the f32 dS tile and the
    /// queries' drelh and drelw rows.
    pub fn tc_bwd_q_shared_bytes(&self, elem: usize) -> usize {
        let ldt = self.hd as usize + 8;
        let rel = match self.rel {
            1 if self.row_tiles() => 2 * TC_ROWS * TC_LDR * 4,
            1 => (TC_ROWS * (TC_KEYS + 1) + TC_ROWS * (self.wh + self.ww) as usize) * 4,
            _ => 0,
        };
        elem * 4 * TC_KEYS * ldt + 4 * TC_KEYS * 4 + rel
    }

    /// Whether every 64-key tile is one whole row of the window, with the decomposed term
    /// (`wa_row_tiles` in the source).
    fn row_tiles(&self) -> bool {
        self.rel == 1 && self.ww as usize == TC_KEYS
    }

    /// `bwd_kv_tc` and `bwd_q_tc`: four warps per 64 keys, or per 64 queries, of a (window, head).
    pub fn attention_bwd_tc(&self) -> Launch {
        self.per_window_head(TC_KEYS, TC_THREADS)
    }

    /// `bwd_dsum_tc`: one thread per row.
    pub fn bwd_dsum_tc(&self) -> Launch {
        Launch::covering(self.rows(), THREADS)
    }

    /// `bwd_dq_tc`: one thread per element of the `[rows, hd]` f32 dq accumulator.
    pub fn bwd_dq_tc(&self) -> Launch {
        Launch::covering(self.rows() * self.hd as usize, THREADS)
    }

    /// `rel_tables`: one thread per row.
    pub fn rel_tables(&self) -> Launch {
        Launch::covering(self.rows(), THREADS)
    }

    /// `rel_tables_grad` on `axis` (0: `drh`, 1: `drw`): one thread per output element.
    pub fn rel_tables_grad(&self, axis: usize) -> Launch {
        Launch::covering(self.rel_table_elems(axis), THREADS)
    }

    /// Elements of `rh` (axis 0) or `rw` (axis 1).
    pub fn rel_table_elems(&self, axis: usize) -> usize {
        let side = if axis == 0 { self.wh } else { self.ww } as usize;
        side * side * self.hd as usize
    }

    /// The module these parameters need for `dtype` (specialized on the head dimension).
    pub fn module(&self, dtype: candle_core::DType) -> Module {
        module_for_head_dim(self.hd as usize).for_dtype(dtype)
    }
}

/// The kernels on candle CUDA tensors, in the order the module doc gives.
#[cfg(feature = "cuda")]
pub mod run {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{DType, Tensor};
    use vitdet_ir::ops::{WindowAttention, WindowAttentionGrad};

    use std::sync::OnceLock;

    use super::{fma_requested, WinGeom};
    use crate::cuda::device::{compute_capability, config, cuda_device, function, suffix, tensor, view, zeros};
    use crate::kernels::{KernelError, KernelResult};

    /// Whether the kernels take this application (dtype and geometry); the caller runs the
    /// candle-op kernel otherwise.
    pub fn supports(op: &WindowAttention, qkv: &Tensor) -> bool {
        geometry(op, qkv).is_ok()
    }

    fn geometry(op: &WindowAttention, qkv: &Tensor) -> KernelResult<WinGeom> {
        suffix(qkv.dtype())?;
        let g = crate::kernels::window_attention::geometry(op, qkv)?;
        WinGeom::new(op, &g).map_err(|m| KernelError::Unsupported(format!("window_attention on CUDA: {m}")))
    }

    /// The forward inputs, contiguous, in the op's order.
    struct Operands {
        g: WinGeom,
        dev: CudaDevice,
        dtype: DType,
        qkv: Tensor,
        bias: Option<Tensor>,
        rh: Option<Tensor>,
        rw: Option<Tensor>,
        relbias: Option<Tensor>,
    }

    impl Operands {
        fn new(op: &WindowAttention, x: &[Tensor]) -> KernelResult<Operands> {
            let g = geometry(op, &x[0])?;
            let c = |t: &Tensor| -> KernelResult<Tensor> {
                if t.dtype() != x[0].dtype() {
                    return Err(KernelError::Unsupported(format!(
                        "window_attention: input dtypes differ ({:?} and {:?})",
                        x[0].dtype(),
                        t.dtype()
                    )));
                }
                Ok(t.contiguous()?)
            };
            let mut next = 1;
            let bias = if op.qkv_bias {
                next += 1;
                Some(c(&x[1])?)
            } else {
                None
            };
            let (mut rh, mut rw, mut relbias) = (None, None, None);
            match g.rel {
                1 => {
                    rh = Some(c(&x[next])?);
                    rw = Some(c(&x[next + 1])?);
                }
                2 => relbias = Some(c(&x[next])?),
                _ => {}
            }
            Ok(Operands {
                g,
                dev: cuda_device(&x[0])?,
                dtype: x[0].dtype(),
                qkv: c(&x[0])?,
                bias,
                rh,
                rw,
                relbias,
            })
        }

        /// Whether the tensor-core kernels run: half types, a head dim they take, a GPU with the
        /// f16 / bf16 mma (compute 8.0 and later; the module leaves them out before), and no
        /// `VITDET_ATTENTION_KERNELS=fma` ([`fma_requested`]).
        fn tensor_cores(&self) -> KernelResult<bool> {
            static FMA: OnceLock<Result<bool, String>> = OnceLock::new();
            let fma = FMA.get_or_init(|| fma_requested(std::env::var("VITDET_ATTENTION_KERNELS").ok().as_deref()));
            let fma = fma.clone().map_err(KernelError::Unsupported)?;
            Ok(!fma && self.dtype != DType::F32 && self.g.tensor_cores() && compute_capability(&self.dev)?.0 >= 8)
        }

        /// An absent optional input: the kernels never read it, any buffer of the type will do.
        fn or_qkv<'a>(&'a self, t: &'a Option<Tensor>) -> &'a Tensor {
            t.as_ref().unwrap_or(&self.qkv)
        }

        fn name(&self, kernel: &str) -> KernelResult<String> {
            Ok(format!("window_attention_{kernel}_{}", suffix(self.dtype)?))
        }

        /// relh, relw (one-element placeholders without the decomposed term).
        fn rel_tables<T: CudaDType>(&self) -> KernelResult<(CudaSlice<f32>, CudaSlice<f32>)> {
            let g = self.g;
            if g.rel != 1 {
                return Ok((zeros(&self.dev, 1)?, zeros(&self.dev, 1)?));
            }
            let mut relh = zeros::<f32>(&self.dev, g.rows() * g.wh as usize)?;
            let mut relw = zeros::<f32>(&self.dev, g.rows() * g.ww as usize)?;
            let f = function(&self.dev, &g.module(self.dtype), &self.name("rel_tables")?)?;
            let (qs, ql) = self.qkv.storage_and_layout();
            let bias = self.or_qkv(&self.bias);
            let (bs, bl) = bias.storage_and_layout();
            let (hs, hl) = self.rh.as_ref().expect("decomposed").storage_and_layout();
            let (ws, wl) = self.rw.as_ref().expect("decomposed").storage_and_layout();
            let (q, b, rh, rw) = (
                view::<T>(&qs, ql)?,
                view::<T>(&bs, bl)?,
                view::<T>(&hs, hl)?,
                view::<T>(&ws, wl)?,
            );
            let mut l = f.builder();
            l.arg(&q)
                .arg(&b)
                .arg(&rh)
                .arg(&rw)
                .arg(&mut relh)
                .arg(&mut relw)
                .arg(&g);
            unsafe { l.launch(config(g.rel_tables(), 0)) }.map_err(candle_core::Error::wrap)?;
            Ok((relh, relw))
        }
    }

    /// Forward: `[out, lse]`.
    pub fn forward(op: &WindowAttention, x: &[Tensor]) -> KernelResult<Vec<Tensor>> {
        let o = Operands::new(op, x)?;
        match o.dtype {
            DType::F32 => forward_t::<f32>(&o),
            DType::F16 => forward_t::<half::f16>(&o),
            DType::BF16 => forward_t::<half::bf16>(&o),
            d => Err(KernelError::Unsupported(format!(
                "window_attention on CUDA: dtype {d:?}"
            ))),
        }
    }

    fn forward_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(o: &Operands) -> KernelResult<Vec<Tensor>> {
        let g = o.g;
        let (relh, relw) = o.rel_tables::<T>()?;
        let mut out = zeros::<T>(&o.dev, g.out_elems())?;
        let mut lse = zeros::<f32>(&o.dev, g.rows())?;
        // Half types run on the tensor cores where the head dim allows.
        let tc = o.tensor_cores()?;
        let f = function(&o.dev, &g.module(o.dtype), &o.name(if tc { "fwd_tc" } else { "fwd" })?)?;
        let (launch, shared) = if tc {
            let bytes = g.tc_shared_bytes(o.dtype.size_in_bytes());
            f.allow_shared_bytes(bytes)?;
            (g.attention_tc(), bytes as u32)
        } else {
            (g.attention(), 0)
        };
        {
            let (qs, ql) = o.qkv.storage_and_layout();
            let bias = o.or_qkv(&o.bias);
            let (bs, bl) = bias.storage_and_layout();
            let relbias = o.or_qkv(&o.relbias);
            let (rs, rl) = relbias.storage_and_layout();
            let (q, b, rb) = (view::<T>(&qs, ql)?, view::<T>(&bs, bl)?, view::<T>(&rs, rl)?);
            let mut l = f.builder();
            l.arg(&q)
                .arg(&b)
                .arg(&relh)
                .arg(&relw)
                .arg(&rb)
                .arg(&mut out)
                .arg(&mut lse)
                .arg(&g);
            unsafe { l.launch(config(launch, shared)) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(vec![
            tensor(out, g.out_dims().as_slice(), &o.dev),
            tensor(lse, g.lse_dims().as_slice(), &o.dev),
        ])
    }

    /// Backward: one gradient per forward input.
    pub fn backward(op: &WindowAttentionGrad, x: &[Tensor]) -> KernelResult<Vec<Tensor>> {
        let fwd = op.forward();
        let nf = fwd.num_inputs();
        let o = Operands::new(&fwd, &x[..nf])?;
        let rest = [x[nf].contiguous()?, x[nf + 1].contiguous()?, x[nf + 2].contiguous()?];
        let grads = match o.dtype {
            DType::F32 => backward_t::<f32>(&o, &rest),
            DType::F16 => backward_t::<half::f16>(&o, &rest),
            DType::BF16 => backward_t::<half::bf16>(&o, &rest),
            d => Err(KernelError::Unsupported(format!(
                "window_attention_grad on CUDA: dtype {d:?}"
            ))),
        }?;
        // The f32 accumulators of the small inputs, back to the inputs' dtype and shapes.
        grads
            .into_iter()
            .zip(x)
            .map(|(g, input)| Ok(g.to_dtype(o.dtype)?.reshape(input.dims())?))
            .collect()
    }

    fn backward_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        o: &Operands,
        [out, lse, dout]: &[Tensor; 3],
    ) -> KernelResult<Vec<Tensor>> {
        let g = o.g;
        let n = g.tokens();
        let (relh, relw) = o.rel_tables::<T>()?;
        let mut dsum = zeros::<f32>(&o.dev, g.rows())?;
        let mut drelh = zeros::<f32>(&o.dev, if g.rel == 1 { g.rows() * g.wh as usize } else { 1 })?;
        let mut drelw = zeros::<f32>(&o.dev, if g.rel == 1 { g.rows() * g.ww as usize } else { 1 })?;
        let mut drelbias = zeros::<f32>(&o.dev, if g.rel == 2 { g.heads as usize * n * n } else { 1 })?;
        let mut dqkv = zeros::<T>(&o.dev, o.qkv.elem_count())?;
        let mut dbias = zeros::<f32>(&o.dev, 3 * g.channels as usize)?;
        let (qs, ql) = o.qkv.storage_and_layout();
        let bias = o.or_qkv(&o.bias);
        let (bs, bl) = bias.storage_and_layout();
        let (rh_t, rw_t, rb_t) = (o.or_qkv(&o.rh), o.or_qkv(&o.rw), o.or_qkv(&o.relbias));
        let ((hs, hl), (ws, wl), (rs, rl)) = (
            rh_t.storage_and_layout(),
            rw_t.storage_and_layout(),
            rb_t.storage_and_layout(),
        );
        let ((os, ol), (ls, ll), (ds, dl)) = (
            out.storage_and_layout(),
            lse.storage_and_layout(),
            dout.storage_and_layout(),
        );
        let q = view::<T>(&qs, ql)?;
        let b = view::<T>(&bs, bl)?;
        let (rh, rw, rb) = (view::<T>(&hs, hl)?, view::<T>(&ws, wl)?, view::<T>(&rs, rl)?);
        let (outv, lsev, doutv) = (view::<T>(&os, ol)?, view::<f32>(&ls, ll)?, view::<T>(&ds, dl)?);
        // What the key-side kernels (and the tensor-core query pass) read, in their order.
        macro_rules! key_side_inputs {
            ($l:expr) => {
                $l.arg(&q)
                    .arg(&b)
                    .arg(&relh)
                    .arg(&relw)
                    .arg(&rb)
                    .arg(&doutv)
                    .arg(&lsev)
                    .arg(&dsum)
            };
        }
        let module = g.module(o.dtype);
        let elem = o.dtype.size_in_bytes();
        let tc = o.tensor_cores()?;
        // The query side. Half types on the tensor cores: D per row, then the query pass (dq
        // before the decomposed term's share, the rel-pos gradients); otherwise `bwd_q` (D,
        // dq, the rel-pos gradients).
        let mut dq = None;
        if tc {
            let fd = function(&o.dev, &module, &o.name("bwd_dsum_tc")?)?;
            let mut l = fd.builder();
            l.arg(&outv).arg(&doutv).arg(&mut dsum).arg(&g);
            unsafe { l.launch(config(g.bwd_dsum_tc(), 0)) }.map_err(candle_core::Error::wrap)?;
            let mut dq_acc = zeros::<f32>(&o.dev, g.rows() * g.hd as usize)?;
            let f = function(&o.dev, &module, &o.name("bwd_q_tc")?)?;
            let bytes = g.tc_bwd_q_shared_bytes(elem);
            f.allow_shared_bytes(bytes)?;
            let mut l = f.builder();
            key_side_inputs!(l);
            l.arg(&mut dq_acc)
                .arg(&mut drelh)
                .arg(&mut drelw)
                .arg(&mut drelbias)
                .arg(&g);
            unsafe { l.launch(config(g.attention_bwd_tc(), bytes as u32)) }.map_err(candle_core::Error::wrap)?;
            dq = Some(dq_acc);
        } else {
            let fq = function(&o.dev, &module, &o.name("bwd_q")?)?;
            let mut l = fq.builder();
            l.arg(&q)
                .arg(&b)
                .arg(&relh)
                .arg(&relw)
                .arg(&rh)
                .arg(&rw)
                .arg(&rb)
                .arg(&outv)
                .arg(&doutv)
                .arg(&lsev);
            l.arg(&mut dsum)
                .arg(&mut drelh)
                .arg(&mut drelw)
                .arg(&mut drelbias)
                .arg(&mut dqkv)
                .arg(&g);
            unsafe { l.launch(config(g.attention(), 0)) }.map_err(candle_core::Error::wrap)?;
        }
        // The key side, one kernel on either path: dk, dv and the padded keys' share of the
        // qkv bias.
        let (kernel, launch, bytes) = if tc {
            ("bwd_kv_tc", g.attention_bwd_tc(), g.tc_bwd_kv_shared_bytes(elem))
        } else {
            ("bwd_kv", g.attention(), 0)
        };
        let fkv = function(&o.dev, &module, &o.name(kernel)?)?;
        if bytes > 0 {
            fkv.allow_shared_bytes(bytes)?;
        }
        let mut l = fkv.builder();
        key_side_inputs!(l);
        l.arg(&mut dbias).arg(&mut dqkv).arg(&g);
        unsafe { l.launch(config(launch, bytes as u32)) }.map_err(candle_core::Error::wrap)?;
        // Tensor cores: dq plus the decomposed term's share, into dqkv.
        if let Some(dq) = &dq {
            let fq = function(&o.dev, &module, &o.name("bwd_dq_tc")?)?;
            let mut l = fq.builder();
            l.arg(dq)
                .arg(&drelh)
                .arg(&drelw)
                .arg(&rh)
                .arg(&rw)
                .arg(&mut dqkv)
                .arg(&g);
            unsafe { l.launch(config(g.bwd_dq_tc(), 0)) }.map_err(candle_core::Error::wrap)?;
        }

        let mut grads = vec![tensor(dqkv, o.qkv.dims(), &o.dev)];
        if o.bias.is_some() {
            grads.push(tensor(dbias, 3 * g.channels as usize, &o.dev));
        }
        match g.rel {
            1 => {
                let fg = function(&o.dev, &g.module(o.dtype), &o.name("rel_tables_grad")?)?;
                for (axis, drel) in [(0usize, &drelh), (1, &drelw)] {
                    let mut dr = zeros::<f32>(&o.dev, g.rel_table_elems(axis))?;
                    let axis_arg = axis as i32;
                    let mut l = fg.builder();
                    l.arg(&q).arg(&b).arg(drel).arg(&mut dr).arg(&g).arg(&axis_arg);
                    unsafe { l.launch(config(g.rel_tables_grad(axis), 0)) }.map_err(candle_core::Error::wrap)?;
                    grads.push(tensor(dr, g.rel_table_elems(axis), &o.dev));
                }
            }
            2 => grads.push(tensor(drelbias, g.heads as usize * n * n, &o.dev)),
            _ => {}
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::fma_requested;

    #[test]
    fn the_attention_kernels_variable_takes_two_values() {
        assert_eq!(fma_requested(None), Ok(false));
        assert_eq!(fma_requested(Some("tensor-cores")), Ok(false));
        assert_eq!(fma_requested(Some("fma")), Ok(true));
        let err = fma_requested(Some("FMA")).unwrap_err();
        assert!(err.contains("VITDET_ATTENTION_KERNELS=FMA"), "{err}");
    }
}
