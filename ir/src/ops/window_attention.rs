//! Fused windowed multi-head self-attention (detectron2's `Block` attention path from the
//! window partition to the crop after the unpartition) and its backward op.
//!
//! The q/k/v and output projections are ordinary `linear` ops outside the fused op: they are
//! GEMMs that the runtime already runs at full speed, and keeping them outside lets their own
//! VJP rules produce the weight gradients. What the fused op absorbs is everything whose
//! memory grows with the number of token pairs: window partition with padding, the split into
//! heads, the scaled scores, the relative-position term, softmax, the product with `v`, the
//! head merge, the window unpartition and the crop. Its kernels work on a few window-heads at a
//! time, so the `[windows * heads, N, N]` probabilities are never resident at once, and the
//! backward recomputes them from `q`, `k` and the saved row log-sum-exp (flash-attention
//! style) instead of keeping them.
//!
//! Padding is exact: detectron2 zero-pads the *normed tokens* before the qkv linear, so a
//! padded token's q, k and v all equal the qkv bias (or zero without one), and padded keys do
//! take part in every softmax of their window. The fused op therefore receives the qkv linear
//! applied to the unpadded tokens plus the bias itself, and fills padded positions with it.
//! Padded *query* rows only produce outputs that the crop discards, so they are never computed.

use serde::{Deserialize, Serialize};

use super::{expect_float, expect_rank, expect_same_dtype, Cost, OpRule};
use crate::types::{DType, TensorType};

/// The relative-position term added to the scaled logits, and the inputs it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowRelPos {
    /// No term.
    None,
    /// detectron2's decomposed term: two inputs `rh [wh, wh, hd]` and `rw [ww, ww, hd]` (the
    /// `rel_pos_gather` outputs for the window) and
    /// `logit[(y,x),(y',x')] += q(y,x) . rh[y,y'] + q(y,x) . rw[x,x']` with `q` unscaled.
    Decomposed,
    /// A BEiT bias: one input `[heads, N, N]` added to the logits of every window.
    Bias,
}

impl WindowRelPos {
    /// Number of inputs the term takes.
    pub fn inputs(self) -> usize {
        match self {
            WindowRelPos::None => 0,
            WindowRelPos::Decomposed => 2,
            WindowRelPos::Bias => 1,
        }
    }
}

/// Fused windowed attention.
///
/// Inputs, in order: `qkv [B, H, W, 3C]` (the qkv linear of the unpadded tokens, channels
/// ordered `(3, heads, hd)` as detectron2's), the qkv bias `[3C]` when `qkv_bias`, then the
/// relative-position inputs of `rel_pos` (see [`WindowRelPos`]).
///
/// Semantics: pad the token grid at the bottom/right to multiples of `window` with tokens whose
/// q, k, v equal the bias (zero without one); split it into `nW = (Hp/wh)(Wp/ww)` windows of
/// `N = wh*ww` tokens; per window and head, `softmax(scale * q k^T + rel) v`; merge heads,
/// reassemble the grid and crop to `[B, H, W, C]`. A global block is the one-window case
/// (`window = [H, W]`, no padding).
///
/// Outputs: `out [B, H, W, C]` (qkv's dtype) and `lse [B*nW, heads, N]`, the log-sum-exp of
/// every logit row, which the backward uses to recompute probabilities. `lse` is kept in the
/// accumulation dtype (f32 for f32/f16/bf16, f64 for f64: in f32 it would limit a float64
/// gradient check to ~1e-7); rows of padded queries are never computed and hold 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowAttention {
    pub heads: usize,
    /// Window height and width in tokens.
    pub window: [usize; 2],
    /// Multiplier of `q` before `q k^T` (detectron2: `hd^-0.5`).
    pub scale: f64,
    pub rel_pos: WindowRelPos,
    pub qkv_bias: bool,
}

/// Backward of [`WindowAttention`] (same attributes).
///
/// Inputs: the forward's inputs, then its outputs `out` and `lse`, then `dout [B, H, W, C]`.
/// Outputs: one gradient per forward input, same types: `dqkv`, `dbias` when `qkv_bias` (only
/// the padded tokens' share: the unpadded tokens' bias gradient flows through the qkv linear's
/// own VJP), and the gradient of each relative-position input. Per window-head chunk it
/// recomputes `P = exp(logits - lse)`, then with `D = rowsum(dout * out)`:
/// `dv = P^T do`, `dS = P * (do v^T - D)`, `dq = scale dS k (+ rel terms)`, `dk = scale dS^T q`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowAttentionGrad {
    pub heads: usize,
    pub window: [usize; 2],
    pub scale: f64,
    pub rel_pos: WindowRelPos,
    pub qkv_bias: bool,
}

/// The token and window geometry of one application, derived from `qkv [B, H, W, 3C]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowGeometry {
    pub batch: usize,
    /// Unpadded grid.
    pub hw: [usize; 2],
    /// Padded grid (multiples of the window).
    pub padded: [usize; 2],
    pub window: [usize; 2],
    /// Windows along each axis.
    pub grid: [usize; 2],
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl WindowGeometry {
    /// Tokens per window.
    pub fn tokens(&self) -> usize {
        self.window[0] * self.window[1]
    }
    /// Windows per image.
    pub fn windows(&self) -> usize {
        self.grid[0] * self.grid[1]
    }
}

/// The dtype `lse` is kept in for inputs of dtype `d`.
pub fn lse_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The attributes both ops share, with the shape rules.
struct Attrs {
    heads: usize,
    window: [usize; 2],
    rel_pos: WindowRelPos,
    qkv_bias: bool,
    scale: f64,
}

impl Attrs {
    fn num_inputs(&self) -> usize {
        1 + self.qkv_bias as usize + self.rel_pos.inputs()
    }

    fn geometry(&self, qkv: &TensorType) -> Result<WindowGeometry, String> {
        expect_rank("qkv", qkv, 4)?;
        expect_float("qkv", qkv)?;
        if !self.scale.is_finite() {
            return Err(format!("scale must be finite, found {}", self.scale));
        }
        let [wh, ww] = self.window;
        if self.heads == 0 || wh == 0 || ww == 0 {
            return Err(format!("empty heads {} or window {:?}", self.heads, self.window));
        }
        let s = &qkv.shape;
        if !s[3].is_multiple_of(3 * self.heads) || s[3] == 0 {
            return Err(format!(
                "qkv {qkv} must have 3 * heads * head_dim channels (heads {})",
                self.heads
            ));
        }
        let (h, w) = (s[1], s[2]);
        let padded = [h.div_ceil(wh) * wh, w.div_ceil(ww) * ww];
        Ok(WindowGeometry {
            batch: s[0],
            hw: [h, w],
            padded,
            window: self.window,
            grid: [padded[0] / wh, padded[1] / ww],
            channels: s[3] / 3,
            heads: self.heads,
            head_dim: s[3] / 3 / self.heads,
        })
    }

    /// Checks the forward inputs (`i[..num_inputs]`) and returns the geometry.
    fn check_inputs(&self, i: &[&TensorType]) -> Result<WindowGeometry, String> {
        if i.len() < self.num_inputs() {
            return Err(format!(
                "takes {} forward inputs (qkv{}{}), given {}",
                self.num_inputs(),
                if self.qkv_bias { ", bias" } else { "" },
                match self.rel_pos {
                    WindowRelPos::None => "",
                    WindowRelPos::Decomposed => ", rh, rw",
                    WindowRelPos::Bias => ", rel bias",
                },
                i.len()
            ));
        }
        let qkv = i[0];
        let g = self.geometry(qkv)?;
        let mut next = 1;
        if self.qkv_bias {
            super::expect_vector("qkv bias", i[1], 3 * g.channels, qkv)?;
            next = 2;
        }
        let [wh, ww] = g.window;
        let n = g.tokens();
        let expect = |what: &str, t: &TensorType, shape: [usize; 3]| {
            expect_same_dtype(qkv, t, what)?;
            if t.shape != shape {
                return Err(format!("{what} must have shape {shape:?}, found {t}"));
            }
            Ok(())
        };
        match self.rel_pos {
            WindowRelPos::None => {}
            WindowRelPos::Decomposed => {
                expect("rel_pos_h embeddings", i[next], [wh, wh, g.head_dim])?;
                expect("rel_pos_w embeddings", i[next + 1], [ww, ww, g.head_dim])?;
            }
            WindowRelPos::Bias => expect("relative position bias", i[next], [g.heads, n, n])?,
        }
        Ok(g)
    }

    fn out_types(&self, qkv: &TensorType, g: &WindowGeometry) -> Vec<TensorType> {
        vec![
            qkv.with_shape([g.batch, g.hw[0], g.hw[1], g.channels]),
            TensorType::new(lse_dtype(qkv.dtype), [g.batch * g.windows(), g.heads, g.tokens()]),
        ]
    }

    /// Multiply-adds of one forward: per valid query row and head, `N * hd` for the scores
    /// and as many for `P v`, plus `(wh + ww) * hd` for the decomposed term.
    fn forward_macs(&self, g: &WindowGeometry) -> u64 {
        let rows = (g.batch * g.hw[0] * g.hw[1] * g.heads) as u64;
        let rel = match self.rel_pos {
            WindowRelPos::Decomposed => (g.window[0] + g.window[1]) as u64,
            _ => 0,
        };
        rows * (2 * g.tokens() as u64 + rel) * g.head_dim as u64
    }
}

impl WindowAttention {
    fn attrs(&self) -> Attrs {
        Attrs {
            heads: self.heads,
            window: self.window,
            rel_pos: self.rel_pos,
            qkv_bias: self.qkv_bias,
            scale: self.scale,
        }
    }

    /// The geometry for a `qkv` input of type `qkv`.
    pub fn geometry(&self, qkv: &TensorType) -> Result<WindowGeometry, String> {
        self.attrs().geometry(qkv)
    }

    /// Number of inputs: qkv, the bias when present, the relative-position inputs.
    pub fn num_inputs(&self) -> usize {
        self.attrs().num_inputs()
    }

    /// The backward op with the same attributes.
    pub fn grad(&self) -> WindowAttentionGrad {
        WindowAttentionGrad {
            heads: self.heads,
            window: self.window,
            scale: self.scale,
            rel_pos: self.rel_pos,
            qkv_bias: self.qkv_bias,
        }
    }
}

impl WindowAttentionGrad {
    fn attrs(&self) -> Attrs {
        Attrs {
            heads: self.heads,
            window: self.window,
            rel_pos: self.rel_pos,
            qkv_bias: self.qkv_bias,
            scale: self.scale,
        }
    }

    /// The forward op with the same attributes.
    pub fn forward(&self) -> WindowAttention {
        WindowAttention {
            heads: self.heads,
            window: self.window,
            scale: self.scale,
            rel_pos: self.rel_pos,
            qkv_bias: self.qkv_bias,
        }
    }
}

impl OpRule for WindowAttention {
    fn name(&self) -> &'static str {
        "window_attention"
    }
    fn arity(&self) -> (usize, usize) {
        (1, 4)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let a = self.attrs();
        if i.len() != a.num_inputs() {
            return Err(format!(
                "takes {} inputs for these attributes, given {}",
                a.num_inputs(),
                i.len()
            ));
        }
        let g = a.check_inputs(i)?;
        Ok(a.out_types(i[0], &g))
    }
    /// `macs` as `Attrs::forward_macs`; `flops` twice that plus 5 per logit (scale, add,
    /// exp, sum, divide); `activations` the logits and outputs of the valid query rows (what
    /// fvcore would count for the unfused matmuls).
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        let a = self.attrs();
        let Ok(g) = a.geometry(i[0]) else {
            return Cost::default();
        };
        let rows = (g.batch * g.hw[0] * g.hw[1] * g.heads) as u64;
        let macs = a.forward_macs(&g);
        Cost {
            macs,
            flops: 2 * macs + 5 * rows * g.tokens() as u64,
            activations: rows * (g.tokens() + g.head_dim) as u64,
        }
    }
}

impl OpRule for WindowAttentionGrad {
    fn name(&self) -> &'static str {
        "window_attention_grad"
    }
    fn arity(&self) -> (usize, usize) {
        (4, 7)
    }
    fn infer(&self, i: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        let a = self.attrs();
        let nf = a.num_inputs();
        if i.len() != nf + 3 {
            return Err(format!(
                "takes the {nf} forward inputs, out, lse and the output gradient ({} inputs), given {}",
                nf + 3,
                i.len()
            ));
        }
        let g = a.check_inputs(i)?;
        let expected = a.out_types(i[0], &g);
        let (out, lse, dout) = (i[nf], i[nf + 1], i[nf + 2]);
        if *out != expected[0] || *lse != expected[1] || *dout != expected[0] {
            return Err(format!(
                "out, lse and output gradient must be {}, {}, {}; found {out}, {lse}, {dout}",
                expected[0], expected[1], expected[0]
            ));
        }
        Ok(i[..nf].iter().map(|t| (*t).clone()).collect())
    }
    /// Five contractions per valid query row (recomputed scores, `dv`, `dP`, `dq`, `dk`) and
    /// three times the decomposed term (recompute, `dq`, table gradients).
    fn cost(&self, i: &[&TensorType], _: &[TensorType]) -> Cost {
        let a = self.attrs();
        let Ok(g) = a.geometry(i[0]) else {
            return Cost::default();
        };
        let rows = (g.batch * g.hw[0] * g.hw[1] * g.heads) as u64;
        let rel = match self.rel_pos {
            WindowRelPos::Decomposed => 3 * (g.window[0] + g.window[1]) as u64,
            _ => 0,
        };
        let macs = rows * (5 * g.tokens() as u64 + rel) * g.head_dim as u64;
        Cost {
            macs,
            flops: 2 * macs + 6 * rows * g.tokens() as u64,
            activations: 0,
        }
    }
}
