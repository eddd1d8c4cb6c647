//! Workspace of the fused window attention (`vitdet-runtime`'s `kernels/window_attention.rs`,
//! forward and backward), phase by phase as the kernel runs.
//!
//! Both directions first convert `qkv` to the accumulation dtype (f32 for f16/bf16 inputs: a
//! copy; the same dtype: none) and pad it to the window grid (`padded`, `[B, Hp, Wp, 3C]`, one
//! concatenation per padded axis); `padded` and the converted relative-position inputs live to
//! the end of the call. Windows are then processed by class (full windows, and the partial last
//! row / column of windows): a class's q, k, v are contiguous copies out of `padded`, and its
//! window-heads run in chunks whose logits stay under the kernel's chunk budget
//! ([`CHUNK_LOGIT_BYTES`]): a chunk holds `scale q`, the scores and the probabilities (the
//! backward also `dP` and `dS`). Per-chunk results accumulate over the class and are joined
//! into per-class blocks, which accumulate over the classes and are joined at the end.

use vitdet_ir::ops::{WindowAttention, WindowRelPos};
use vitdet_ir::{DType, TensorType};

/// The kernel's default chunk budget (`CHUNK_LOGIT_BYTES` in the runtime).
const CHUNK_LOGIT_BYTES: usize = 8 << 20;

/// One class of windows: `count` windows (batch included) with `valid` query rows of the
/// `window` tokens.
#[derive(Clone, Copy)]
struct Class {
    windows: usize,
    valid: usize,
}

/// What both directions share: sizes in bytes of the accumulation dtype.
struct Shape {
    /// Accumulation element size.
    acc: usize,
    /// Whether the inputs are converted (their dtype is not the accumulation dtype).
    converts: bool,
    heads: usize,
    head_dim: usize,
    /// Tokens per window.
    tokens: usize,
    /// Tokens of the unpadded and the padded grid (batch included).
    grid_tokens: usize,
    padded_tokens: usize,
    channels: usize,
    classes: Vec<Class>,
    /// Bytes the setup holds to the end: `padded` and the converted relative-position inputs.
    resident: usize,
    /// The setup's own peak (conversion and padding), beside nothing else of the call.
    setup_peak: usize,
}

/// The full windows along an axis of `len` tokens, then the padded last one: `(count, valid)`.
fn spans(len: usize, win: usize) -> Vec<(usize, usize)> {
    let (full, rem) = (len / win, len % win);
    let mut out = Vec::new();
    if full > 0 {
        out.push((full, win));
    }
    if rem > 0 {
        out.push((1, rem));
    }
    out
}

impl Shape {
    /// `None` when the geometry is not one the kernel accepts (then the node fails at run time,
    /// and its workspace does not matter).
    fn new(op: &WindowAttention, inputs: &[&TensorType]) -> Option<Shape> {
        let qkv = inputs.first()?;
        let g = op.geometry(qkv).ok()?;
        let elem = qkv.dtype.size_in_bytes();
        let acc = match qkv.dtype {
            DType::F16 | DType::BF16 => 4,
            _ => elem,
        };
        let converts = acc != elem;
        let c3 = 3 * g.channels;
        let [h, w] = g.hw;
        let [hp, wp] = g.padded;
        let b = g.batch;
        let grid_tokens = b * h * w;
        let padded_tokens = b * hp * wp;
        let converted = if converts { grid_tokens * c3 * acc } else { 0 };
        // Padding: the width, then the height, each a fill block and the concatenation,
        // beside the (converted) input.
        let mut setup_peak = converted;
        let mut current = 0; // the previous concatenation, if any
        if wp > w {
            let next = b * h * wp * c3 * acc;
            setup_peak = setup_peak.max(converted + b * h * (wp - w) * c3 * acc + next);
            current = next;
        }
        if hp > h {
            setup_peak = setup_peak.max(converted + current + b * (hp - h) * wp * c3 * acc + padded_tokens * c3 * acc);
        }
        let padded = if hp > h || wp > w || converts {
            padded_tokens * c3 * acc
        } else {
            0 // the input itself
        };
        // The qkv bias and the relative-position inputs, converted.
        let rel: usize = if converts {
            inputs[1..op.num_inputs()].iter().map(|t| t.numel() * acc).sum()
        } else {
            0
        };
        let resident = padded + rel;
        // Every (row span, column span) pair.
        let classes = {
            let rows = spans(h, g.window[0]);
            let cols = spans(w, g.window[1]);
            let mut out = Vec::with_capacity(rows.len() * cols.len());
            for &(ny, vh) in &rows {
                for &(nx, vw) in &cols {
                    out.push(Class {
                        windows: b * ny * nx,
                        valid: vh * vw,
                    });
                }
            }
            out
        };
        Some(Shape {
            acc,
            converts,
            heads: g.heads,
            head_dim: g.head_dim,
            tokens: g.tokens(),
            grid_tokens,
            padded_tokens,
            channels: g.channels,
            classes,
            resident,
            setup_peak: setup_peak + rel,
        })
    }

    /// Window-heads per chunk for a class with `nq` query rows (the kernel's `Setup::chunk`).
    fn chunk(&self, nq: usize) -> usize {
        let per = nq * self.tokens * self.acc;
        let fit = (CHUNK_LOGIT_BYTES / per.max(1)).max(1);
        if fit >= self.heads {
            fit / self.heads * self.heads
        } else {
            (1..=fit).rev().find(|&d| self.heads.is_multiple_of(d)).unwrap_or(1)
        }
    }

    /// Rows (window-heads), chunk rows and bytes of one chunk's logits for class `c`.
    fn class_sizes(&self, c: Class) -> (usize, usize, usize) {
        let rows = c.windows * self.heads;
        let gc = self.chunk(c.valid).min(rows);
        (rows, gc, gc * c.valid * self.tokens * self.acc)
    }

    /// The class's contiguous q (valid rows), k and v.
    fn class_qkv(&self, c: Class) -> usize {
        let rows = c.windows * self.heads;
        rows * (c.valid + 2 * self.tokens) * self.head_dim * self.acc
    }

    /// A class's query-layout tensor (`[G, valid, hd]`): its share of `out`.
    fn class_rows(&self, c: Class) -> usize {
        c.windows * self.heads * c.valid * self.head_dim * self.acc
    }

    fn out_acc(&self) -> usize {
        self.grid_tokens * self.channels * self.acc
    }
}

/// `kernels::window_attention::window_attention`. `out_bytes`: its outputs (`out`, `lse`).
pub(super) fn forward(op: &WindowAttention, inputs: &[&TensorType], out_bytes: usize) -> usize {
    let Some(s) = Shape::new(op, inputs) else {
        return 0;
    };
    let mut peak = s.setup_peak;
    let mut blocks = 0; // earlier classes' output blocks
    for &c in &s.classes {
        let (rows, gc, logits) = s.class_sizes(c);
        let qkv = s.class_qkv(c);
        let outs = s.class_rows(c);
        let lse = rows * c.valid * 4;
        // A chunk: scale q, scores, probabilities (+ the bias rows of a partial class,
        // copied), its output; the earlier chunks' outputs and lse.
        let q_chunk = gc * c.valid * s.head_dim * s.acc;
        let bias_rows = match op.rel_pos {
            WindowRelPos::Bias if c.valid < s.tokens => s.heads * c.valid * s.tokens * s.acc,
            _ => 0,
        };
        // The decomposed term's per-row copies of q (by query row and by query column).
        let decomposed = match op.rel_pos {
            WindowRelPos::Decomposed => 2 * q_chunk,
            _ => 0,
        };
        let chunk = 2 * q_chunk + 2 * logits + bias_rows + decomposed;
        peak = peak.max(s.resident + blocks + qkv + outs + lse + chunk);
        // The class's end: the chunk outputs, their concatenation and its block layout.
        let end = qkv + 3 * outs + 2 * lse;
        peak = peak.max(s.resident + blocks + end);
        blocks += outs + lse;
    }
    // The joined output (and lse) beside the blocks, then the conversion to the input dtype.
    let joined = s.out_acc();
    let convert = if s.converts { out_bytes } else { 0 };
    peak = peak.max(s.resident + blocks + joined + convert);
    peak.saturating_sub(out_bytes)
}

/// `kernels::window_attention::window_attention_grad`. `out_bytes`: its outputs (the input
/// gradients).
pub(super) fn backward(op: &WindowAttention, inputs: &[&TensorType], out_bytes: usize) -> usize {
    let Some(s) = Shape::new(op, inputs) else {
        return 0;
    };
    // `out` and `dout` in the accumulation dtype (copies when converted); the bias gradient's
    // accumulator `[heads, wh, ww, N]`.
    let converted = if s.converts { 2 * s.out_acc() } else { 0 };
    let bias_total = match op.rel_pos {
        WindowRelPos::Bias => s.heads * s.tokens * s.tokens * s.acc,
        _ => 0,
    };
    let resident = s.resident + converted + bias_total;
    let mut peak = s.setup_peak;
    let mut blocks = 0; // earlier classes' gradient blocks
    for &c in &s.classes {
        let (rows, gc, logits) = s.class_sizes(c);
        let qkv = s.class_qkv(c);
        let o = s.class_rows(c);
        let lse = rows * c.valid * 4;
        // q, k, v of the class's windows with their padded rows: the gradient block.
        let block = c.windows * s.heads * 3 * s.tokens * s.head_dim * s.acc;
        let bias_rows = match op.rel_pos {
            WindowRelPos::Bias if c.valid < s.tokens => s.heads * c.valid * s.tokens * s.acc,
            _ => 0,
        };
        // The class's bias-gradient sums, per block of chunk heads, held across chunks (made
        // after a chunk's peak, so a class of one chunk never holds them beside it).
        let bias_sums = match op.rel_pos {
            WindowRelPos::Bias if rows > gc => s.heads.min(gc) * c.valid * s.tokens * s.acc,
            _ => 0,
        };
        // A chunk: scale q, scores, P, dP, dS and a copy of dS^T (the key gradient's product
        // reshapes the transposed view), the query/key/value gradients; the earlier chunks'
        // gradients (at most the class's q, k, v).
        let q_chunk = gc * c.valid * s.head_dim * s.acc;
        let kv_chunk = gc * s.tokens * s.head_dim * s.acc;
        // The decomposed term's gradient: q copied by query row and column, and the two query
        // gradients it adds.
        let decomposed = match op.rel_pos {
            WindowRelPos::Decomposed => 4 * q_chunk,
            _ => 0,
        };
        let chunk = 5 * logits + bias_rows + 3 * q_chunk + 2 * kv_chunk + decomposed;
        let base = resident + blocks + qkv + 2 * o + lse + bias_sums;
        peak = peak.max(base + qkv + chunk);
        // The class's end: the chunk gradients, their concatenations, the stacked block and
        // its token layout.
        peak = peak.max(base + 2 * qkv + 2 * block);
        blocks += block;
    }
    // The joined padded gradient beside the blocks; then the unpadded slice, and the
    // conversion of every gradient to the input dtype.
    let dpadded = s.padded_tokens * 3 * s.channels * s.acc;
    let dqkv = s.grid_tokens * 3 * s.channels * s.acc;
    peak = peak.max(resident + blocks + dpadded);
    let convert = if s.converts { out_bytes } else { 0 };
    let sliced = if s.padded_tokens > s.grid_tokens { dqkv } else { 0 };
    peak = peak.max(resident + dpadded + sliced + bias_total + convert);
    peak.saturating_sub(out_bytes)
}
