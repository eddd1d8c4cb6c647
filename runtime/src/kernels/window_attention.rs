//! Fused windowed attention ([`WindowAttention`]) and its backward ([`WindowAttentionGrad`]),
//! written with candle tensor ops so they run on any device.
//!
//! Memory is bounded by working on chunks of window-heads: per chunk, the logits, the
//! probabilities and (backward) their gradient are `[chunk, Nq, N]` with at most
//! [`CHUNK_LOGIT_BYTES`] of logits, however many windows the image has. The forward keeps only
//! the row log-sum-exp; the backward recomputes the probabilities from it.
//!
//! Padded query rows are skipped by grouping the windows into at most four *classes* of equal
//! valid extent: the interior windows (all tokens valid), the last window column and the last
//! window row (cut by the padding at the right / bottom) and the corner. All windows of a
//! class share one set of valid query rows, so a class's queries are one dense
//! `[windows * heads, vh * vw, hd]` tensor, while its keys and values keep all `wh * ww`
//! tokens: padded keys (q, k, v = the qkv bias) take part in the softmax as in detectron2.
//!
//! On CUDA devices the runtime's own kernels ([`crate::cuda::window_attention`]) run instead
//! for f32 / f16 / bf16 inputs whose geometry they take (head dim <= 128, decomposed windows
//! <= 64 a side); `KernelOptions::portable` forces this candle-op path.
//!
//! The contractions go through the runtime's `matmul` kernel (candle's gemm / cuBLAS); half
//! types are computed in f32 (the IR's `lse_dtype`), f64 stays f64.

use candle_core::{DType, Tensor};
use vitdet_ir::ops::{MatMul, WindowAttention, WindowAttentionGrad, WindowGeometry, WindowRelPos};
use vitdet_ir::TensorType;

use super::{accum_dtype, expect_float, linear, KernelError, KernelResult};

/// Default upper bound on the logits of one chunk (bytes in the accumulation dtype), unless a
/// single window-head is larger (a global block then computes one head at a time).
pub const CHUNK_LOGIT_BYTES: usize = 8 << 20;

/// Knobs of the kernels, for tests and tuning.
#[derive(Clone, Copy, Debug)]
pub struct KernelOptions {
    /// Upper bound on one chunk's logits, in bytes ([`CHUNK_LOGIT_BYTES`] by default).
    pub chunk_bytes: usize,
    /// Use the candle-op softmax epilogue even on the CPU (the path other devices take).
    pub portable: bool,
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            chunk_bytes: CHUNK_LOGIT_BYTES,
            portable: false,
        }
    }
}

/// `a @ b` or `a @ b^T` through the runtime's matmul kernel.
fn mm(a: &Tensor, b: &Tensor, transpose_rhs: bool) -> KernelResult<Tensor> {
    linear::matmul(&MatMul::new(transpose_rhs), a, b)
}

/// Windows `start..start + count` along one axis, each with `valid` unpadded tokens.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    count: usize,
    valid: usize,
}

/// The full windows along an axis of `len` tokens, then the padded last one if any.
fn spans(len: usize, win: usize) -> Vec<Span> {
    let (full, rem) = (len / win, len % win);
    let mut out = Vec::with_capacity(2);
    if full > 0 {
        out.push(Span {
            start: 0,
            count: full,
            valid: win,
        });
    }
    if rem > 0 {
        out.push(Span {
            start: full,
            count: 1,
            valid: rem,
        });
    }
    out
}

/// The relative-position inputs, in the accumulation dtype.
enum Rel {
    None,
    Decomposed {
        rh: Tensor,
        rw: Tensor,
    },
    /// `[heads, wh, ww, N]`: the BEiT bias with its query axis split into the window grid.
    Bias(Tensor),
}

/// The geometry `op` has on `qkv` (its shape rule), as a kernel error when it does not apply.
pub(crate) fn geometry(op: &WindowAttention, qkv: &Tensor) -> KernelResult<WindowGeometry> {
    let ir_dtype = crate::dtype::from_candle(qkv.dtype())
        .ok_or_else(|| KernelError::Unsupported(format!("qkv dtype {:?}", qkv.dtype())))?;
    op.geometry(&TensorType::new(ir_dtype, qkv.dims().to_vec()))
        .map_err(|m| KernelError::Unsupported(format!("window_attention: {m}")))
}

/// What both directions derive from the inputs.
struct Setup {
    g: WindowGeometry,
    dtype: DType,
    acc: DType,
    scale: f64,
    /// `qkv` padded to `[B, Hp, Wp, 3C]` with the bias (or zeros), in `acc`.
    padded: Tensor,
    rel: Rel,
    options: KernelOptions,
}

impl Setup {
    fn new(op: &WindowAttention, x: &[Tensor], options: KernelOptions) -> KernelResult<Setup> {
        let qkv = &x[0];
        expect_float("qkv", qkv)?;
        let g = geometry(op, qkv)?;
        let (dtype, acc) = (qkv.dtype(), accum_dtype(qkv.dtype()));
        let mut next = 1;
        let bias = if op.qkv_bias {
            next = 2;
            Some(x[1].to_dtype(acc)?)
        } else {
            None
        };
        let rel = match op.rel_pos {
            WindowRelPos::None => Rel::None,
            WindowRelPos::Decomposed => Rel::Decomposed {
                rh: x[next].to_dtype(acc)?,
                rw: x[next + 1].to_dtype(acc)?,
            },
            WindowRelPos::Bias => {
                let n = g.tokens();
                Rel::Bias(x[next].to_dtype(acc)?.reshape((g.heads, g.window[0], g.window[1], n))?)
            }
        };
        let padded = pad_tokens(&qkv.to_dtype(acc)?, bias.as_ref(), &g)?;
        Ok(Setup {
            g,
            dtype,
            acc,
            scale: op.scale,
            padded,
            rel,
            options,
        })
    }

    /// The classes of windows: every (row span, column span) pair.
    fn classes(&self) -> Vec<(Span, Span)> {
        let (rows, cols) = (
            spans(self.g.hw[0], self.g.window[0]),
            spans(self.g.hw[1], self.g.window[1]),
        );
        rows.iter().flat_map(|&r| cols.iter().map(move |&c| (r, c))).collect()
    }

    /// Window-heads per chunk for a class with `nq` query rows: a multiple of `heads` when
    /// whole windows fit the budget, else a divisor of `heads` (so a chunk never splits a
    /// window's heads unevenly, which keeps the BEiT bias a plain broadcast).
    fn chunk(&self, nq: usize) -> usize {
        let per = nq * self.g.tokens() * self.acc.size_in_bytes();
        let fit = (self.options.chunk_bytes / per.max(1)).max(1);
        let heads = self.g.heads;
        if fit >= heads {
            fit / heads * heads
        } else {
            (1..=fit).rev().find(|&d| heads.is_multiple_of(d)).unwrap_or(1)
        }
    }
}

/// `[B, H, W, 3C]` -> `[B, Hp, Wp, 3C]`, new positions holding the bias (or zero).
fn pad_tokens(qkv: &Tensor, bias: Option<&Tensor>, g: &WindowGeometry) -> KernelResult<Tensor> {
    let [h, w] = g.hw;
    let [hp, wp] = g.padded;
    let c3 = 3 * g.channels;
    let fill = |shape: (usize, usize, usize, usize)| -> candle_core::Result<Tensor> {
        match bias {
            Some(b) => b.reshape((1, 1, 1, c3))?.broadcast_as(shape)?.contiguous(),
            None => Tensor::zeros(shape, qkv.dtype(), qkv.device()),
        }
    };
    let mut t = qkv.contiguous()?;
    if wp > w {
        t = Tensor::cat(&[&t, &fill((g.batch, h, wp - w, c3))?], 2)?;
    }
    if hp > h {
        t = Tensor::cat(&[&t, &fill((g.batch, hp - h, wp, c3))?], 1)?;
    }
    Ok(t)
}

/// One class's q, k, v: `q [G, vh*vw, hd]` (valid query rows only), `k, v [G, N, hd]`, with
/// `G = B * rows * cols * heads` ordered (b, window row, window column, head).
struct ClassQkv {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    windows: usize,
    valid: [usize; 2],
}

fn class_qkv(s: &Setup, (sy, sx): (Span, Span)) -> KernelResult<ClassQkv> {
    let g = &s.g;
    let [wh, ww] = g.window;
    let t = s
        .padded
        .reshape(vec![g.batch, g.grid[0], wh, g.grid[1], ww, 3, g.heads, g.head_dim])?
        .narrow(1, sy.start, sy.count)?
        .narrow(3, sx.start, sx.count)?
        .permute(vec![5, 0, 1, 3, 6, 2, 4, 7])?; // [3, B, ny, nx, heads, wh, ww, hd]
    let windows = g.batch * sy.count * sx.count;
    let rows = windows * g.heads;
    let (vh, vw) = (sy.valid, sx.valid);
    let q = t
        .narrow(0, 0, 1)?
        .narrow(5, 0, vh)?
        .narrow(6, 0, vw)?
        .contiguous()?
        .reshape((rows, vh * vw, g.head_dim))?;
    let kv =
        |i| -> candle_core::Result<Tensor> { t.narrow(0, i, 1)?.contiguous()?.reshape((rows, wh * ww, g.head_dim)) };
    Ok(ClassQkv {
        q,
        k: kv(1)?,
        v: kv(2)?,
        windows,
        valid: [vh, vw],
    })
}

/// A class's slice of a `[B, H, W, C]` tensor (`out` or its gradient) in the query layout
/// `[G, vh*vw, hd]`.
fn class_rows(t: &Tensor, g: &WindowGeometry, (sy, sx): (Span, Span)) -> KernelResult<Tensor> {
    let [wh, ww] = g.window;
    let (vh, vw) = (sy.valid, sx.valid);
    Ok(t.narrow(1, sy.start * wh, sy.count * vh)?
        .narrow(2, sx.start * ww, sx.count * vw)?
        .contiguous()?
        .reshape(vec![g.batch, sy.count, vh, sx.count, vw, g.heads, g.head_dim])?
        .permute(vec![0, 1, 3, 5, 2, 4, 6])?
        .contiguous()?
        .reshape((g.batch * sy.count * sx.count * g.heads, vh * vw, g.head_dim))?)
}

/// The inverse of [`class_rows`]: `[G, vh*vw, hd]` -> the class's `[B, ny*vh, nx*vw, C]` block.
fn class_block(t: &Tensor, g: &WindowGeometry, (sy, sx): (Span, Span)) -> KernelResult<Tensor> {
    let (vh, vw) = (sy.valid, sx.valid);
    Ok(
        t.reshape(vec![g.batch, sy.count, sx.count, g.heads, vh, vw, g.head_dim])?
            .permute(vec![0, 1, 4, 2, 5, 3, 6])?
            .contiguous()?
            .reshape((g.batch, sy.count * vh, sx.count * vw, g.channels))?,
    )
}

/// Joins per-class blocks (row-major over the classes) into the full grid: columns along axis
/// 2 within a row span, row spans along axis 1.
fn join_classes(blocks: Vec<Tensor>, cols: usize) -> KernelResult<Tensor> {
    let mut rows = Vec::new();
    for row in blocks.chunks(cols) {
        rows.push(if row.len() == 1 {
            row[0].clone()
        } else {
            Tensor::cat(row, 2)?
        });
    }
    Ok(if rows.len() == 1 {
        rows.remove(0)
    } else {
        Tensor::cat(&rows, 1)?
    })
}

/// One chunk's scores and the pieces of its relative-position term, before the softmax.
struct ChunkLogits {
    /// `scale * q`, `[gc, nq, hd]` (the backward's `dk` reads it).
    qs: Tensor,
    /// `(scale q) k^T`, `[gc, nq, N]`.
    scores: Tensor,
    rel: ChunkRel,
    window: [usize; 2],
    valid: [usize; 2],
}

enum ChunkRel {
    None,
    /// `[gc, nq, wh]` and `[gc, nq, ww]`, contiguous.
    Decomposed {
        relh: Tensor,
        relw: Tensor,
    },
    /// `[heads, nq, N]` for the class's valid query rows, and the chunk's first head.
    Bias {
        rows: Tensor,
        first_head: usize,
    },
}

/// The chunk's scores and rel-term pieces. `g0` is the chunk's first window-head, so
/// `g0 % heads` is its first head.
fn chunk_logits(s: &Setup, qc: &Tensor, kc: &Tensor, valid: [usize; 2], g0: usize) -> KernelResult<ChunkLogits> {
    let nq = qc.dim(1)?;
    let [vh, vw] = valid;
    let n = s.g.tokens();
    let qs = qc.affine(s.scale, 0.0)?;
    let scores = mm(&qs, kc, true)?;
    let rel = match &s.rel {
        Rel::None => ChunkRel::None,
        Rel::Decomposed { rh, rw } => {
            let (relh, relw) = decomposed_terms(qc, rh, rw, valid)?;
            ChunkRel::Decomposed {
                relh: relh.contiguous()?.reshape((qc.dim(0)?, nq, s.g.window[0]))?,
                relw: relw.contiguous()?.reshape((qc.dim(0)?, nq, s.g.window[1]))?,
            }
        }
        Rel::Bias(bias) => ChunkRel::Bias {
            rows: bias.narrow(1, 0, vh)?.narrow(2, 0, vw)?.reshape((s.g.heads, nq, n))?,
            first_head: g0 % s.g.heads,
        },
    };
    Ok(ChunkLogits {
        qs,
        scores,
        rel,
        window: s.g.window,
        valid,
    })
}

impl ChunkLogits {
    /// The logits `[gc, nq, N]` with candle ops (scores + rel_h + rel_w as detectron2 adds
    /// them, or + the bias rows of each chunk row's head).
    fn full(&self) -> KernelResult<Tensor> {
        let (gc, nq, n) = self.scores.dims3()?;
        let [wh, ww] = self.window;
        let [vh, vw] = self.valid;
        Ok(match &self.rel {
            ChunkRel::None => self.scores.clone(),
            ChunkRel::Decomposed { relh, relw } => self
                .scores
                .reshape((gc, vh, vw, wh, ww))?
                .broadcast_add(&relh.reshape((gc, vh, vw, wh, 1))?)?
                .broadcast_add(&relw.reshape((gc, vh, vw, 1, ww))?)?
                .reshape((gc, nq, n))?,
            ChunkRel::Bias { rows, first_head } => {
                let heads = rows.dim(0)?;
                if gc % heads == 0 {
                    self.scores
                        .reshape((gc / heads, heads, nq, n))?
                        .broadcast_add(rows)?
                        .reshape((gc, nq, n))?
                } else {
                    self.scores.broadcast_add(&rows.narrow(0, *first_head, gc)?)?
                }
            }
        })
    }

    /// `(P, lse)`: the softmax of the logits over the keys and its row log-sum-exp `[gc, nq]`.
    fn softmax(&self, portable: bool) -> KernelResult<(Tensor, Tensor)> {
        if !portable && self.scores.device().is_cpu() {
            return cpu_rows::softmax(self);
        }
        let a = self.full()?;
        let m = a.max_keepdim(2)?;
        let e = a.broadcast_sub(&m)?.exp()?;
        let sum = e.sum_keepdim(2)?;
        Ok((e.broadcast_div(&sum)?, (m + sum.log()?)?.squeeze(2)?))
    }

    /// `P = exp(logits - lse)` from a saved `lse [gc, nq, 1]`.
    fn probs(&self, lse: &Tensor, portable: bool) -> KernelResult<Tensor> {
        if !portable && self.scores.device().is_cpu() {
            return cpu_rows::probs(self, lse);
        }
        Ok(self.full()?.broadcast_sub(lse)?.exp()?)
    }
}

/// detectron2's decomposed terms for the valid queries `q [gc, vh*vw, hd]`:
/// `relh [gc, vh, vw, wh] = q . rh[y]` and `relw [gc, vh, vw, ww] = q . rw[x]`, as matmuls
/// batched over the indexed axis.
fn decomposed_terms(q: &Tensor, rh: &Tensor, rw: &Tensor, [vh, vw]: [usize; 2]) -> KernelResult<(Tensor, Tensor)> {
    let (gc, _, hd) = q.dims3()?;
    let (wh, ww) = (rh.dim(0)?, rw.dim(0)?);
    let q4 = q.reshape((gc, vh, vw, hd))?;
    let qh = q4.permute((1, 0, 2, 3))?.contiguous()?.reshape((vh, gc * vw, hd))?;
    let relh = mm(&qh, &rh.narrow(0, 0, vh)?, true)?
        .reshape((vh, gc, vw, wh))?
        .permute((1, 0, 2, 3))?;
    let qw = q4.permute((2, 0, 1, 3))?.contiguous()?.reshape((vw, gc * vh, hd))?;
    let relw = mm(&qw, &rw.narrow(0, 0, vw)?, true)?
        .reshape((vw, gc, vh, ww))?
        .permute((1, 2, 0, 3))?;
    Ok((relh, relw))
}

/// Forward: `[out [B, H, W, C], lse [B*nW, heads, N]]`.
pub fn window_attention(op: &WindowAttention, x: &[Tensor]) -> KernelResult<Vec<Tensor>> {
    window_attention_with(op, x, KernelOptions::default())
}

/// [`window_attention`] with explicit [`KernelOptions`].
pub fn window_attention_with(op: &WindowAttention, x: &[Tensor], options: KernelOptions) -> KernelResult<Vec<Tensor>> {
    if x.len() != op.num_inputs() {
        return Err(KernelError::Unsupported(format!(
            "window_attention takes {} inputs for its attributes, given {}",
            op.num_inputs(),
            x.len()
        )));
    }
    #[cfg(feature = "cuda")]
    if x[0].device().is_cuda() && !options.portable && crate::cuda::window_attention::run::supports(op, &x[0]) {
        return crate::cuda::window_attention::run::forward(op, x);
    }
    let s = Setup::new(op, x, options)?;
    let g = s.g;
    let [wh, ww] = g.window;
    let classes = s.classes();
    let mut out_blocks = Vec::with_capacity(classes.len());
    let mut lse_blocks = Vec::with_capacity(classes.len());
    for &class in &classes {
        let c = class_qkv(&s, class)?;
        let (rows, nq, _) = c.q.dims3()?;
        let step = s.chunk(nq);
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for g0 in (0..rows).step_by(step) {
            let gc = step.min(rows - g0);
            let qc = c.q.narrow(0, g0, gc)?;
            let logits = chunk_logits(&s, &qc, &c.k.narrow(0, g0, gc)?, c.valid, g0)?;
            let (p, lse) = logits.softmax(s.options.portable)?;
            outs.push(mm(&p, &c.v.narrow(0, g0, gc)?, false)?);
            lses.push(lse);
        }
        let o = Tensor::cat(&outs, 0)?;
        out_blocks.push(class_block(&o, &g, class)?);
        // lse rows of this class -> [B, ny, nx, heads, wh, ww] with padded queries at 0.
        let (sy, sx) = class;
        let l = Tensor::cat(&lses, 0)?
            .reshape(vec![g.batch, sy.count, sx.count, g.heads, sy.valid, sx.valid])?
            .pad_with_zeros(4, 0, wh - sy.valid)?
            .pad_with_zeros(5, 0, ww - sx.valid)?;
        lse_blocks.push(l);
    }
    let cols = spans(g.hw[1], ww).len();
    let out = join_classes(out_blocks, cols)?.to_dtype(s.dtype)?;
    // The lse blocks join along the window-row and window-column axes (1 and 2), as the
    // output blocks do along the token axes.
    let lse = join_classes(lse_blocks, cols)?.reshape((g.batch * g.windows(), g.heads, g.tokens()))?;
    Ok(vec![out, lse])
}

/// Backward: one gradient per forward input (see [`WindowAttentionGrad`]).
pub fn window_attention_grad(op: &WindowAttentionGrad, x: &[Tensor]) -> KernelResult<Vec<Tensor>> {
    window_attention_grad_with(op, x, KernelOptions::default())
}

/// [`window_attention_grad`] with explicit [`KernelOptions`].
pub fn window_attention_grad_with(
    op: &WindowAttentionGrad,
    x: &[Tensor],
    options: KernelOptions,
) -> KernelResult<Vec<Tensor>> {
    let fwd = op.forward();
    let nf = fwd.num_inputs();
    if x.len() != nf + 3 {
        return Err(KernelError::Unsupported(format!(
            "window_attention_grad takes {} inputs for its attributes, given {}",
            nf + 3,
            x.len()
        )));
    }
    #[cfg(feature = "cuda")]
    if x[0].device().is_cuda() && !options.portable && crate::cuda::window_attention::run::supports(&fwd, &x[0]) {
        return crate::cuda::window_attention::run::backward(op, x);
    }
    let s = Setup::new(&fwd, &x[..nf], options)?;
    let g = s.g;
    let [wh, ww] = g.window;
    let n = g.tokens();
    let out = x[nf].to_dtype(s.acc)?;
    let lse = x[nf + 1]
        .to_dtype(s.acc)?
        .reshape(vec![g.batch, g.grid[0], g.grid[1], g.heads, wh, ww])?;
    let dout = x[nf + 2].to_dtype(s.acc)?;

    let mut drel = RelGrads::new(&s)?;
    let classes = s.classes();
    let mut blocks = Vec::with_capacity(classes.len());
    for &class in &classes {
        let (sy, sx) = class;
        let [vh, vw] = [sy.valid, sx.valid];
        let c = class_qkv(&s, class)?;
        let o = class_rows(&out, &g, class)?;
        let d_o = class_rows(&dout, &g, class)?;
        let l = lse
            .narrow(1, sy.start, sy.count)?
            .narrow(2, sx.start, sx.count)?
            .narrow(4, 0, vh)?
            .narrow(5, 0, vw)?
            .contiguous()?
            .reshape((c.windows * g.heads, vh * vw, 1))?;
        let (rows, nq, _) = c.q.dims3()?;
        let step = s.chunk(nq);
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for g0 in (0..rows).step_by(step) {
            let gc = step.min(rows - g0);
            let (qc, kc, vc) = (c.q.narrow(0, g0, gc)?, c.k.narrow(0, g0, gc)?, c.v.narrow(0, g0, gc)?);
            let doc = d_o.narrow(0, g0, gc)?;
            let logits = chunk_logits(&s, &qc, &kc, c.valid, g0)?;
            let p = logits.probs(&l.narrow(0, g0, gc)?, s.options.portable)?;
            let qs = logits.qs;
            let dd = (&doc * &o.narrow(0, g0, gc)?)?.sum_keepdim(2)?;
            dvs.push(mm(&p.t()?, &doc, false)?);
            let dp = mm(&doc, &vc, true)?;
            let decomposed = matches!(s.rel, Rel::Decomposed { .. });
            let (ds, sums) = logit_grad(&p, &dp, &dd, decomposed.then_some(g.window), s.options.portable)?;
            let mut dq = mm(&ds, &kc, false)?.affine(s.scale, 0.0)?;
            dks.push(mm(&ds.t()?, &qs, false)?);
            if let Some(extra) = drel.accumulate(&s, &qc, &ds, sums, c.valid, g0)? {
                dq = (dq + extra)?;
            }
            dqs.push(dq);
        }
        drel.end_class(c.valid, g.window)?;
        // Window layout [B, ny, nx, heads, wh, ww, hd] for q (zero on padded rows), k, v.
        let win = vec![g.batch, sy.count, sx.count, g.heads, wh, ww, g.head_dim];
        let dq = Tensor::cat(&dqs, 0)?
            .reshape(vec![g.batch, sy.count, sx.count, g.heads, vh, vw, g.head_dim])?
            .pad_with_zeros(4, 0, wh - vh)?
            .pad_with_zeros(5, 0, ww - vw)?;
        let dk = Tensor::cat(&dks, 0)?.reshape(win.clone())?;
        let dv = Tensor::cat(&dvs, 0)?.reshape(win)?;
        let block = Tensor::stack(&[dq, dk, dv], 0)? // [3, B, ny, nx, heads, wh, ww, hd]
            .permute(vec![1, 2, 5, 3, 6, 0, 4, 7])?
            .contiguous()?
            .reshape((g.batch, sy.count * wh, sx.count * ww, 3 * g.channels))?;
        blocks.push(block);
    }
    let cols = spans(g.hw[1], ww).len();
    let dpadded = join_classes(blocks, cols)?; // [B, Hp, Wp, 3C]
    let [h, w] = g.hw;
    let mut grads = vec![dpadded.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()?];
    if fwd.qkv_bias {
        // Padded tokens are the bias itself: their q, k, v gradients are its gradient.
        let mut db = Tensor::zeros(3 * g.channels, s.acc, dpadded.device())?;
        if g.padded[1] > w {
            db = (db + dpadded.narrow(1, 0, h)?.narrow(2, w, g.padded[1] - w)?.sum((0, 1, 2))?)?;
        }
        if g.padded[0] > h {
            db = (db + dpadded.narrow(1, h, g.padded[0] - h)?.sum((0, 1, 2))?)?;
        }
        grads.push(db);
    }
    grads.extend(drel.finish(&s, n)?);
    grads.into_iter().map(|t| Ok(t.to_dtype(s.dtype)?)).collect()
}

/// The logit gradient `dS = P * (dP - D)` (`D [gc, nq, 1]`), and with `window` (the
/// decomposed term) its sums over the key columns `[gc, nq, wh]` and key rows `[gc, nq, ww]`.
#[allow(clippy::type_complexity)]
fn logit_grad(
    p: &Tensor,
    dp: &Tensor,
    d: &Tensor,
    window: Option<[usize; 2]>,
    portable: bool,
) -> KernelResult<(Tensor, Option<(Tensor, Tensor)>)> {
    if !portable && p.device().is_cpu() {
        return cpu_rows::logit_grad(p, dp, d, window);
    }
    let ds = (p * dp.broadcast_sub(d)?)?;
    let sums = match window {
        Some([wh, ww]) => {
            let (gc, nq, _) = ds.dims3()?;
            let ds5 = ds.reshape((gc, nq, wh, ww))?;
            Some((ds5.sum(3)?, ds5.sum(2)?))
        }
        None => None,
    };
    Ok((ds, sums))
}

/// Accumulators for the relative-position gradients.
enum RelGrads {
    None,
    /// Full `[wh, wh, hd]` and `[ww, ww, hd]` table-embedding gradients.
    Decomposed {
        drh: Tensor,
        drw: Tensor,
    },
    /// `total [heads, wh, ww, N]`, the bias gradient with its query axis split, and the
    /// current class's `[hb, nq, N]` sums per block of `hb` heads (`hb` = the chunk's heads).
    Bias {
        total: Tensor,
        class: Vec<Option<Tensor>>,
    },
}

impl RelGrads {
    fn new(s: &Setup) -> KernelResult<RelGrads> {
        let dev = s.padded.device();
        Ok(match &s.rel {
            Rel::None => RelGrads::None,
            Rel::Decomposed { rh, rw } => RelGrads::Decomposed {
                drh: rh.zeros_like()?,
                drw: rw.zeros_like()?,
            },
            Rel::Bias(_) => {
                let [wh, ww] = s.g.window;
                RelGrads::Bias {
                    total: Tensor::zeros((s.g.heads, wh, ww, wh * ww), s.acc, dev)?,
                    class: Vec::new(),
                }
            }
        })
    }

    /// Adds one chunk's contribution (logit gradient `ds [gc, nq, N]`, and for the decomposed
    /// term its sums from [`logit_grad`]) and returns the extra query gradient the decomposed
    /// term adds, if any.
    fn accumulate(
        &mut self,
        s: &Setup,
        q: &Tensor,
        ds: &Tensor,
        sums: Option<(Tensor, Tensor)>,
        [vh, vw]: [usize; 2],
        g0: usize,
    ) -> KernelResult<Option<Tensor>> {
        let (gc, nq, n) = ds.dims3()?;
        let [wh, ww] = s.g.window;
        match (self, &s.rel) {
            (RelGrads::None, _) => Ok(None),
            (RelGrads::Decomposed { drh, drw }, Rel::Decomposed { rh, rw }) => {
                let hd = q.dim(2)?;
                let (sum_h, sum_w) = sums.ok_or_else(|| {
                    KernelError::Unsupported("window_attention_grad: decomposed term without its sums".into())
                })?;
                let q4 = q.reshape((gc, vh, vw, hd))?;
                // Height term, batched over the query row y: [vh, gc*vw, wh].
                let dsh = sum_h
                    .reshape((gc, vh, vw, wh))?
                    .permute((1, 0, 2, 3))?
                    .contiguous()?
                    .reshape((vh, gc * vw, wh))?;
                let qh = q4.permute((1, 0, 2, 3))?.contiguous()?.reshape((vh, gc * vw, hd))?;
                let dqh = mm(&dsh, &rh.narrow(0, 0, vh)?.contiguous()?, false)?
                    .reshape((vh, gc, vw, hd))?
                    .permute((1, 0, 2, 3))?;
                let gh = mm(&dsh.transpose(1, 2)?, &qh, false)?; // [vh, wh, hd]
                *drh = (&*drh + gh.pad_with_zeros(0, 0, wh - vh)?)?;
                // Width term, batched over the query column x: [vw, gc*vh, ww].
                let dsw = sum_w
                    .reshape((gc, vh, vw, ww))?
                    .permute((2, 0, 1, 3))?
                    .contiguous()?
                    .reshape((vw, gc * vh, ww))?;
                let qw = q4.permute((2, 0, 1, 3))?.contiguous()?.reshape((vw, gc * vh, hd))?;
                let dqw = mm(&dsw, &rw.narrow(0, 0, vw)?.contiguous()?, false)?
                    .reshape((vw, gc, vh, hd))?
                    .permute((1, 2, 0, 3))?;
                let gw = mm(&dsw.transpose(1, 2)?, &qw, false)?; // [vw, ww, hd]
                *drw = (&*drw + gw.pad_with_zeros(0, 0, ww - vw)?)?;
                Ok(Some((dqh + dqw)?.reshape((gc, nq, hd))?))
            }
            (RelGrads::Bias { class, .. }, Rel::Bias(_)) => {
                let heads = s.g.heads;
                // Chunks hold whole windows (a multiple of heads) or `gc | heads` heads of one.
                let (block, part) = if gc % heads == 0 {
                    (0, ds.reshape((gc / heads, heads, nq, n))?.sum(0)?)
                } else {
                    ((g0 % heads) / gc, ds.clone())
                };
                if class.len() <= block {
                    class.resize(block + 1, None);
                }
                class[block] = Some(match class[block].take() {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
                Ok(None)
            }
            _ => Err(KernelError::Unsupported(
                "window_attention_grad: relative-position gradients do not match the term".into(),
            )),
        }
    }

    /// Folds the finished class's bias sums (valid query rows `vh x vw`) into the total.
    fn end_class(&mut self, [vh, vw]: [usize; 2], [wh, ww]: [usize; 2]) -> KernelResult<()> {
        if let RelGrads::Bias { total, class } = self {
            let blocks: Vec<Tensor> = class.drain(..).flatten().collect();
            if blocks.is_empty() {
                return Ok(());
            }
            let (heads, n) = (total.dim(0)?, total.dim(3)?);
            let part = Tensor::cat(&blocks, 0)?
                .reshape((heads, vh, vw, n))?
                .pad_with_zeros(1, 0, wh - vh)?
                .pad_with_zeros(2, 0, ww - vw)?;
            *total = (&*total + part)?;
        }
        Ok(())
    }

    fn finish(self, _s: &Setup, n: usize) -> KernelResult<Vec<Tensor>> {
        Ok(match self {
            RelGrads::None => vec![],
            RelGrads::Decomposed { drh, drw } => vec![drh, drw],
            RelGrads::Bias { total, .. } => {
                let heads = total.dim(0)?;
                vec![total.reshape((heads, n, n))?]
            }
        })
    }
}

/// The CPU softmax epilogue: one pass per logit row (rows split over rayon tasks) that adds the
/// rel term to the scores and computes the probabilities and the log-sum-exp, instead of the
/// portable path's separate broadcast adds, max, exp, sum and divide over the whole chunk.
mod cpu_rows {
    use candle_core::{Storage, StorageRef, Tensor, WithDType};
    use rayon::prelude::*;

    use super::{ChunkLogits, ChunkRel, KernelError, KernelResult};
    use crate::kernels::cpu::Real;

    /// A read lock on a contiguous CPU tensor's data.
    struct Held<'a> {
        storage: StorageRef<'a>,
        range: (usize, usize),
    }

    impl<'a> Held<'a> {
        fn new(t: &'a Tensor) -> KernelResult<Held<'a>> {
            let (storage, layout) = t.storage_and_layout();
            let range = layout
                .contiguous_offsets()
                .ok_or_else(|| KernelError::Unsupported("window_attention: CPU rows must be contiguous".into()))?;
            Ok(Held { storage, range })
        }

        fn slice<T: WithDType>(&self) -> KernelResult<&[T]> {
            match &*self.storage {
                Storage::Cpu(c) => Ok(&c.as_slice::<T>()?[self.range.0..self.range.1]),
                _ => Err(KernelError::Unsupported(
                    "window_attention: CPU rows on another device".into(),
                )),
            }
        }
    }

    /// What each row adds to its scores.
    enum Terms<'a, T> {
        None,
        /// Per row: `wh` height terms and `ww` width terms.
        Decomposed {
            relh: &'a [T],
            relw: &'a [T],
            window: [usize; 2],
        },
        /// `[heads, nq, N]` rows; chunk row `r` is window-head `r / nq`, head
        /// `(first + r / nq) % heads`.
        Bias {
            rows: &'a [T],
            heads: usize,
            first: usize,
            nq: usize,
        },
    }

    impl<T: Real> Terms<'_, T> {
        /// `dst = scores row r + terms`, in detectron2's order `(s + rel_h) + rel_w`.
        #[inline(always)]
        fn fill(&self, r: usize, src: &[T], dst: &mut [T]) {
            let n = dst.len();
            match *self {
                Terms::None => dst.copy_from_slice(src),
                Terms::Decomposed {
                    relh,
                    relw,
                    window: [wh, ww],
                } => {
                    let (rh, rw) = (&relh[r * wh..(r + 1) * wh], &relw[r * ww..(r + 1) * ww]);
                    for ky in 0..wh {
                        let (d, sv) = (&mut dst[ky * ww..(ky + 1) * ww], &src[ky * ww..(ky + 1) * ww]);
                        let a = rh[ky];
                        for ((d, &x), &b) in d.iter_mut().zip(sv).zip(rw) {
                            *d = (x + a) + b;
                        }
                    }
                }
                Terms::Bias { rows, heads, first, nq } => {
                    let head = (first + r / nq) % heads;
                    let b = &rows[(head * nq + r % nq) * n..][..n];
                    for ((d, &x), &y) in dst.iter_mut().zip(src).zip(b) {
                        *d = x + y;
                    }
                }
            }
        }
    }

    /// Rows per rayon task: about 16K elements, at most an equal share per thread.
    fn rows_per_task(rows: usize, n: usize) -> usize {
        (16384 / n.max(1))
            .max(1)
            .min(rows.div_ceil(rayon::current_num_threads()).max(1))
    }

    /// Locks the chunk's tensors and runs `f` on the scores and the row terms.
    fn with_rows<T: Real + WithDType, R>(
        c: &ChunkLogits,
        f: impl FnOnce(&[T], usize, &Terms<T>) -> KernelResult<R>,
    ) -> KernelResult<R> {
        let (_, nq, n) = c.scores.dims3()?;
        let scores = Held::new(&c.scores)?;
        match &c.rel {
            ChunkRel::None => f(scores.slice()?, n, &Terms::None),
            ChunkRel::Decomposed { relh, relw } => {
                let (h, w) = (Held::new(relh)?, Held::new(relw)?);
                let terms = Terms::Decomposed {
                    relh: h.slice()?,
                    relw: w.slice()?,
                    window: c.window,
                };
                f(scores.slice()?, n, &terms)
            }
            ChunkRel::Bias { rows, first_head } => {
                let held = Held::new(rows)?;
                let terms = Terms::Bias {
                    rows: held.slice()?,
                    heads: rows.dim(0)?,
                    first: *first_head,
                    nq,
                };
                f(scores.slice()?, n, &terms)
            }
        }
    }

    /// Softmax of one filled row in place; returns its log-sum-exp. Max and sum run over 8
    /// lanes so the loops vectorize (the sum's lanes are combined in f64).
    #[inline(always)]
    fn softmax_row<T: Real>(row: &mut [T]) -> f64 {
        let mut lanes = [T::NEG_INF; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for k in 0..8 {
                lanes[k] = if c[k] > lanes[k] { c[k] } else { lanes[k] };
            }
        }
        let mut max = T::NEG_INF;
        for &v in chunks.remainder().iter().chain(lanes.iter()) {
            if v > max {
                max = v;
            }
        }
        if max == T::NEG_INF {
            max = T::ZERO; // a row of -inf gives NaN, as the unfused softmax does
        }
        for v in row.iter_mut() {
            *v = (*v - max).exp();
        }
        let mut acc = [T::ZERO; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for k in 0..8 {
                acc[k] = acc[k] + c[k];
            }
        }
        let sum: f64 = acc.iter().chain(chunks.remainder()).map(|&v| Real::to_f64(v)).sum();
        let inv = <T as Real>::from_f64(1.0 / sum);
        for v in row.iter_mut() {
            *v = *v * inv;
        }
        Real::to_f64(max) + sum.ln()
    }

    /// Rows `first..` of one task: fill (scores + terms), then either the softmax with its
    /// log-sum-exp ([`Lse::Out`]) or `exp(logit - lse)` from saved values ([`Lse::In`]).
    #[inline(always)]
    fn rows_task<T: Real>(s: &[T], terms: &Terms<T>, first: usize, out: &mut [T], lse: Lse<'_, T>) {
        match lse {
            Lse::Out(lc) => {
                let n = out.len() / lc.len().max(1);
                for (k, (row, l)) in out.chunks_mut(n).zip(lc.iter_mut()).enumerate() {
                    let r = first + k;
                    terms.fill(r, &s[r * n..(r + 1) * n], row);
                    *l = <T as Real>::from_f64(softmax_row(row));
                }
            }
            Lse::In(lse, n) => {
                for (k, row) in out.chunks_mut(n).enumerate() {
                    let r = first + k;
                    terms.fill(r, &s[r * n..(r + 1) * n], row);
                    let l = lse[r];
                    for v in row.iter_mut() {
                        *v = (*v - l).exp();
                    }
                }
            }
        }
    }

    /// The row log-sum-exp: computed into a task's slice, or read from the saved values
    /// (with the row length).
    enum Lse<'a, T> {
        Out(&'a mut [T]),
        In(&'a [T], usize),
    }

    /// [`rows_task`] compiled for AVX2 + FMA (the f32 `exp` vectorizes 8-wide).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_task_avx2(s: &[f32], terms: &Terms<f32>, first: usize, out: &mut [f32], lse: Lse<'_, f32>) {
        rows_task(s, terms, first, out, lse)
    }

    /// A task body: [`rows_task`] for some `T`, possibly compiled for wider vectors.
    type RowsTask<T> = for<'a, 'b> fn(&[T], &Terms<'b, T>, usize, &mut [T], Lse<'a, T>);

    /// The f32 task body for this CPU.
    fn f32_task() -> RowsTask<f32> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return |s, t, first, o, l| unsafe { rows_task_avx2(s, t, first, o, l) };
        }
        rows_task::<f32>
    }

    /// Runs `task` over rayon tasks of whole rows.
    fn run_rows<T: Real>(s: &[T], n: usize, terms: &Terms<T>, out: &mut [T], lse: Lse<'_, T>, task: RowsTask<T>) {
        let rows = s.len() / n.max(1);
        let per = rows_per_task(rows, n);
        match lse {
            Lse::Out(lse) => out
                .par_chunks_mut(per * n)
                .zip(lse.par_chunks_mut(per))
                .enumerate()
                .for_each(|(i, (o, l))| task(s, terms, i * per, o, Lse::Out(l))),
            Lse::In(lse, n) => out
                .par_chunks_mut(per * n)
                .enumerate()
                .for_each(|(i, o)| task(s, terms, i * per, o, Lse::In(lse, n))),
        }
    }

    fn softmax_typed<T: Real + WithDType>(c: &ChunkLogits, task: RowsTask<T>) -> KernelResult<(Tensor, Tensor)> {
        let (gc, nq, n) = c.scores.dims3()?;
        let (p, lse) = with_rows::<T, _>(c, |s, n, terms| {
            let mut p = vec![T::ZERO; s.len()];
            let mut lse = vec![T::ZERO; s.len() / n];
            run_rows(s, n, terms, &mut p, Lse::Out(&mut lse), task);
            Ok((p, lse))
        })?;
        let dev = c.scores.device();
        Ok((
            Tensor::from_vec(p, (gc, nq, n), dev)?,
            Tensor::from_vec(lse, (gc, nq), dev)?,
        ))
    }

    fn probs_typed<T: Real + WithDType>(c: &ChunkLogits, lse: &Tensor, task: RowsTask<T>) -> KernelResult<Tensor> {
        let (gc, nq, n) = c.scores.dims3()?;
        let lse = lse.contiguous()?;
        let held = Held::new(&lse)?;
        let lse: &[T] = held.slice()?;
        let p = with_rows::<T, _>(c, |s, n, terms| {
            let mut p = vec![T::ZERO; s.len()];
            run_rows(s, n, terms, &mut p, Lse::In(lse, n), task);
            Ok(p)
        })?;
        Ok(Tensor::from_vec(p, (gc, nq, n), c.scores.device())?)
    }

    /// [`super::logit_grad`] on the CPU: one pass per row writes `dS` and, for the decomposed
    /// term, its sums over key columns and key rows.
    #[allow(clippy::assign_op_pattern)] // `Real` has no `AddAssign`
    fn logit_grad_typed<T: Real + WithDType>(
        p: &Tensor,
        dp: &Tensor,
        d: &Tensor,
        window: Option<[usize; 2]>,
    ) -> KernelResult<(Tensor, Option<(Tensor, Tensor)>)> {
        let (gc, nq, n) = p.dims3()?;
        let (p, dp, d) = (p.contiguous()?, dp.contiguous()?, d.contiguous()?);
        let (hp, hdp, hd) = (Held::new(&p)?, Held::new(&dp)?, Held::new(&d)?);
        let (ps, dps, ds_): (&[T], &[T], &[T]) = (hp.slice()?, hdp.slice()?, hd.slice()?);
        let rows = gc * nq;
        let [wh, ww] = window.unwrap_or([0, 0]);
        let mut out = vec![T::ZERO; rows * n];
        let mut sh = vec![T::ZERO; rows * wh];
        let mut sw = vec![T::ZERO; rows * ww];
        let per = rows_per_task(rows, n);
        let body = |first: usize, o: &mut [T], sh: &mut [T], sw: &mut [T]| {
            for (k, row) in o.chunks_mut(n).enumerate() {
                let r = first + k;
                let (pr, dpr, dr) = (&ps[r * n..(r + 1) * n], &dps[r * n..(r + 1) * n], ds_[r]);
                for ((o, &a), &b) in row.iter_mut().zip(pr).zip(dpr) {
                    *o = a * (b - dr);
                }
                if wh > 0 {
                    let (h, w) = (&mut sh[k * wh..(k + 1) * wh], &mut sw[k * ww..(k + 1) * ww]);
                    for (ky, kr) in row.chunks(ww).enumerate() {
                        let mut acc = T::ZERO;
                        for (wv, &v) in w.iter_mut().zip(kr) {
                            acc = acc + v;
                            *wv = *wv + v;
                        }
                        h[ky] = acc;
                    }
                }
            }
        };
        if wh > 0 {
            out.par_chunks_mut(per * n)
                .zip(sh.par_chunks_mut(per * wh).zip(sw.par_chunks_mut(per * ww)))
                .enumerate()
                .for_each(|(i, (o, (h, w)))| body(i * per, o, h, w));
        } else {
            out.par_chunks_mut(per * n)
                .enumerate()
                .for_each(|(i, o)| body(i * per, o, &mut [], &mut []));
        }
        let dev = p.device();
        let ds = Tensor::from_vec(out, (gc, nq, n), dev)?;
        let sums = match window {
            Some([wh, ww]) => Some((
                Tensor::from_vec(sh, (gc, nq, wh), dev)?,
                Tensor::from_vec(sw, (gc, nq, ww), dev)?,
            )),
            None => None,
        };
        Ok((ds, sums))
    }

    /// [`super::logit_grad`] on the CPU (f32 or f64).
    #[allow(clippy::type_complexity)]
    pub(super) fn logit_grad(
        p: &Tensor,
        dp: &Tensor,
        d: &Tensor,
        window: Option<[usize; 2]>,
    ) -> KernelResult<(Tensor, Option<(Tensor, Tensor)>)> {
        match p.dtype() {
            candle_core::DType::F32 => logit_grad_typed::<f32>(p, dp, d, window),
            candle_core::DType::F64 => logit_grad_typed::<f64>(p, dp, d, window),
            d => Err(KernelError::Unsupported(format!(
                "window_attention_grad: CPU rows in {d:?}"
            ))),
        }
    }

    /// [`ChunkLogits::softmax`] on the CPU (f32 or f64).
    pub(super) fn softmax(c: &ChunkLogits) -> KernelResult<(Tensor, Tensor)> {
        match c.scores.dtype() {
            candle_core::DType::F32 => softmax_typed::<f32>(c, f32_task()),
            candle_core::DType::F64 => softmax_typed::<f64>(c, rows_task::<f64>),
            d => Err(KernelError::Unsupported(format!("window_attention: CPU rows in {d:?}"))),
        }
    }

    /// [`ChunkLogits::probs`] on the CPU (f32 or f64).
    pub(super) fn probs(c: &ChunkLogits, lse: &Tensor) -> KernelResult<Tensor> {
        match c.scores.dtype() {
            candle_core::DType::F32 => probs_typed::<f32>(c, lse, f32_task()),
            candle_core::DType::F64 => probs_typed::<f64>(c, lse, rows_task::<f64>),
            d => Err(KernelError::Unsupported(format!("window_attention: CPU rows in {d:?}"))),
        }
    }
}
