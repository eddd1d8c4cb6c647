//! Launch geometry and parameters of the fused windowed-attention kernels
//! (`kernels/window_attention.cu`), shared by the CUDA path and the host emulator.
//!
//! Forward: for the decomposed relative-position term, `rel_tables` first builds the per-row
//! tables `relh = q . rh` and `relw = q . rw`; then `fwd` writes `out` and `lse`. Backward:
//! the tables again, `bwd_q` (dq, D = rowsum(dout * out), the tables' and the BEiT bias's
//! gradients), then `bwd_kv` (dk, dv, the qkv bias's padded-token share), then
//! `rel_tables_grad` on each axis for `drh` and `drw`.

use vitdet_ir::ops::{WindowAttention, WindowGeometry, WindowRelPos};

use super::sources::{Module, WINDOW_ATTENTION};
use super::Launch;

/// Threads per block of every window-attention kernel (`BQ` in the source).
pub const THREADS: u32 = 128;
/// Largest window side the decomposed term supports (`WIN_MAX` in the source).
pub const WIN_MAX: usize = 64;
/// Largest head dimension the kernels are compiled for (per-thread rows live in registers).
pub const HEAD_DIM_MAX: usize = 128;

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

    /// Elements of the unpadded `[B, H, W, C]` output.
    pub fn out_elems(&self) -> usize {
        (self.batch * self.h * self.w * self.channels) as usize
    }

    /// `fwd`, `bwd_q`, `bwd_kv`: one thread per row of a (window, head).
    pub fn attention(&self) -> Launch {
        Launch {
            grid: [self.tokens().div_ceil(THREADS as usize) as u32, self.heads as u32, self.windows() as u32],
            block: [THREADS, 1, 1],
        }
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

    /// The module these parameters need (specialized on the head dimension).
    pub fn module(&self) -> Module {
        Module {
            source: WINDOW_ATTENTION,
            defines: vec![("HD", self.hd.to_string())],
        }
    }
}
