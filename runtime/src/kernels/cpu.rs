//! Hand-written CPU kernels, wrapped as candle custom ops (`cpu_fwd` only). The dispatching
//! kernels use them only for tensors on the CPU and take a candle-op path on other devices, so
//! the CUDA "no implementation" error of these ops is never reached in practice; if it is, it
//! names the op.
//!
//! They take contiguous f32 or f64 data (callers convert half types to f32 and make inputs
//! contiguous), parallelize with rayon, and compute statistics with f64 accumulators.

use crate::cuda::im2col::Im2ColTile;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use vitdet_ir::ops::UnaryKind;

/// The float types the CPU kernels are written for.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    const ZERO: Self;
    const NEG_INF: Self;
}

impl Real for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
}

impl Real for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    const ZERO: Self = 0.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
}

/// `exp` for f32 written so the compiler can vectorize loops over it (no calls, no branches
/// that cannot become selects): Cody-Waite range reduction `x = n ln2 + r` and Cephes' degree-5
/// minimax polynomial for `e^r` (`expf`), with `2^n` assembled in the exponent bits. Relative
/// error below 1e-7 (about 1 ulp) for `-87.3 <= x <= 88`; 0 below -87.3 (the true value is
/// denormal) and +inf above 88 (where the true value is within 1.6x of `f32::MAX`); NaN stays
/// NaN. The softmax kernel calls it on `x - max <= 0` only.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_375; // few mantissa bits: n * C1 is exact
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
    let xc = x.clamp(-87.3, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // t's low mantissa bits hold n in two's complement: no float -> int conversion needed.
    let ni = (t.to_bits() as i32).wrapping_sub(0x4b40_0000);
    let r = xc - n * C1 - n * C2;
    let z = r * r;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let e_r = p * z + r + 1.0;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = e_r * scale;
    let y = if x < -87.3 { 0.0 } else { y };
    let y = if x > 88.0 { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// A raw pointer that rayon tasks may share when they write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer. A closure calling this captures the `Send` wrapper, not its raw field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// The data of a contiguous CPU storage under layout `l`, or an error naming `op`.
pub(crate) fn contiguous_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

// ----- im2col -----

/// The im2col column matrix of a tile of a stride-1 convolution, built in one pass from a
/// contiguous, unpadded f32/f64 `[N, C, H, W]` input: `[C * kh * kw, nb * r * Wo]` with row
/// `(c, a, b)` holding `x[b0 + i, c, y + a * dh - ph, z + b * dw - pw]` (zero outside the
/// input) at column `(i, y - r0, z)`, for images `b0..b0 + nb` and output rows `r0..r0 + r`.
/// Parallel over the rows of the column matrix.
/// The tile's stride must be 1 (callers with other strides use `StridedIm2Col`).
pub(crate) struct Im2Col(pub Im2ColTile);

impl Im2Col {
    fn build<T: candle_core::WithDType>(&self, src: &[T], dims: &[usize]) -> Vec<T> {
        let (c, h, w) = (dims[1], dims[2], dims[3]);
        let [kh, kw] = self.0.kernel;
        let [ph, pw] = self.0.padding;
        let [dh, dw] = self.0.dilation;
        let wo = self.0.out_w;
        let (b0, nb) = self.0.images;
        let (r0, r) = self.0.rows;
        let cols = nb * r * wo;
        let len = c * kh * kw * cols;
        let mut out: Vec<T> = Vec::with_capacity(len);
        if cols == 0 {
            return out;
        }
        // Every element is written exactly once below (copied or zeroed), so the buffer is not
        // cleared first.
        let fill = |d: &mut [std::mem::MaybeUninit<T>], v: &[T]| {
            // SAFETY: `MaybeUninit<T>` has `T`'s layout, and the lengths match.
            assert_eq!(d.len(), v.len());
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), d.as_mut_ptr() as *mut T, v.len()) }
        };
        let zero = |d: &mut [std::mem::MaybeUninit<T>]| {
            d.iter_mut().for_each(|e| {
                e.write(T::zero());
            })
        };
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(row, dst)| {
                let (ci, a, b) = (row / (kh * kw), row / kw % kh, row % kw);
                // Output columns z whose input column z + b dw - pw lies inside [0, w).
                let shift = (b * dw) as isize - pw as isize;
                let z0 = (-shift).clamp(0, wo as isize) as usize;
                let z1 = (w as isize - shift).clamp(z0 as isize, wo as isize) as usize;
                for i in 0..nb {
                    let plane = &src[((b0 + i) * c + ci) * h * w..][..h * w];
                    for y in 0..r {
                        let iy = (r0 + y + a * dh) as isize - ph as isize;
                        let d = &mut dst[(i * r + y) * wo..][..wo];
                        if iy < 0 || iy >= h as isize || z0 == z1 {
                            zero(d);
                            continue;
                        }
                        let line = &plane[iy as usize * w..][..w];
                        let s0 = (z0 as isize + shift) as usize;
                        zero(&mut d[..z0]);
                        fill(&mut d[z0..z1], &line[s0..s0 + (z1 - z0)]);
                        zero(&mut d[z1..]);
                    }
                }
            });
        // SAFETY: all `len` elements were initialized above (each row of `cols` elements is
        // covered by `nb * r` output lines of `wo` elements, each zeroed or copied in full).
        unsafe { out.set_len(len) };
        out
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "vitdet-im2col-cpu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() != 4 {
            bail!("{}: expected a rank-4 input, got {dims:?}", self.name());
        }
        let shape = Shape::from((
            dims[1] * self.0.kernel[0] * self.0.kernel[1],
            self.0.images.1 * self.0.rows.1 * self.0.out_w,
        ));
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.build(contiguous_slice::<f32>(s, l, self.name())?, dims)),
            CpuStorage::F64(_) => CpuStorage::F64(self.build(contiguous_slice::<f64>(s, l, self.name())?, dims)),
            _ => bail!("{}: f32 or f64 input expected, got {:?}", self.name(), s.dtype()),
        };
        Ok((out, shape))
    }
}

// ----- col2im -----

/// The scatter-add half of a transposed convolution computed as `cols = w^T @ x`: `cols` is
/// `[Co * kh * kw, nb, r, W]` for input rows `r0..r0 + r` of `nb` images, and column
/// `(co, a, b), (i, y, ix)` is added to `out[i, co, (r0 + y) sh + a dh - ph, ix sw + b dw - pw]`
/// (dropped outside `[Ho, Wo]`: that is how padding crops; output-padding rows stay as they are).
/// Parallel over the `nb * Co` output planes, so no two tasks write the same element.
pub(crate) struct Col2Im {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    /// Input width `W`.
    pub in_w: usize,
    /// Output size `[Ho, Wo]`.
    pub out: [usize; 2],
    /// Output channels `Co`.
    pub channels: usize,
    /// Images in the tile.
    pub images: usize,
    /// Input rows of the tile: `(r0, r)`.
    pub rows: (usize, usize),
}

impl Col2Im {
    /// Adds the columns into `out`, the `[nb, Co, Ho, Wo]` output of the tile's images.
    pub(crate) fn add_into<T: candle_core::WithDType>(&self, cols: &[T], out: &mut [T]) -> Result<()> {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [ph, pw] = self.padding;
        let [dh, dw] = self.dilation;
        let [ho, wo] = self.out;
        let (w, co, nb) = (self.in_w, self.channels, self.images);
        let (r0, r) = self.rows;
        let (plane, tw) = (ho * wo, nb * r * w);
        if cols.len() != co * kh * kw * tw || out.len() != nb * co * plane {
            bail!(
                "col2im: {} columns and {} outputs do not fit {co} channels x {kh}x{kw} taps, \
                 {nb} images of {r} rows x {w} -> {ho}x{wo}",
                cols.len(),
                out.len()
            );
        }
        if plane == 0 || tw == 0 || sh == 0 || sw == 0 {
            return Ok(());
        }
        // The input columns `ix0..ix1` of kernel column `b` land inside `[0, Wo)`.
        let col_range = |b: usize| -> (usize, usize, usize) {
            let shift = (b * dw) as isize - pw as isize; // ox = ix sw + shift
            let ix0 = if shift >= 0 {
                0
            } else {
                ((-shift) as usize).div_ceil(sw).min(w)
            };
            let room = wo as isize - shift;
            let ix1 = if room <= 0 {
                0
            } else {
                (room as usize).div_ceil(sw).min(w)
            };
            let ox0 = if ix0 < ix1 { (ix0 * sw) as isize + shift } else { 0 };
            (ix0, ix1.max(ix0), ox0 as usize)
        };
        let ranges: Vec<(usize, usize, usize)> = (0..kw).map(col_range).collect();
        // Tiny planes (RoI heads) are batched so each task has some work.
        let min_len = (4096 / (plane * kh * kw)).max(1);
        out.par_chunks_mut(plane)
            .with_min_len(min_len)
            .enumerate()
            .for_each(|(idx, dst)| {
                let (i, c) = (idx / co, idx % co);
                for a in 0..kh {
                    for (b, &(ix0, ix1, ox0)) in ranges.iter().enumerate() {
                        if ix0 == ix1 {
                            continue;
                        }
                        let src = &cols[((c * kh + a) * kw + b) * tw + i * r * w..][..r * w];
                        for y in 0..r {
                            let oy = ((r0 + y) * sh + a * dh) as isize - ph as isize;
                            if oy < 0 || oy >= ho as isize {
                                continue;
                            }
                            let line = &mut dst[oy as usize * wo..][..wo];
                            let s = &src[y * w + ix0..y * w + ix1];
                            if sw == 1 {
                                for (d, &v) in line[ox0..ox0 + s.len()].iter_mut().zip(s) {
                                    *d += v;
                                }
                            } else {
                                for (d, &v) in line[ox0..].iter_mut().step_by(sw).zip(s) {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
            });
        Ok(())
    }
}

// ----- softmax over the last axis -----

/// Softmax over the last axis of a contiguous f32/f64 tensor. Per row: the max (8 running
/// lanes, so the loop vectorizes), `exp(x - max)` written to the output, its sum (8 lanes, then
/// f64), and a scaling pass. Rows are split over rayon tasks; on x86-64 CPUs with AVX2 the f32
/// loops are compiled for AVX2 (runtime dispatch, same results: no FMA contraction).
pub(crate) struct SoftmaxLastDim;

#[inline(always)]
fn softmax_row<T: Real>(s: &[T], d: &mut [T]) {
    let mut m = [T::NEG_INF; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            m[k] = if c[k] > m[k] { c[k] } else { m[k] };
        }
    }
    let mut max = T::NEG_INF;
    for &v in chunks.remainder().iter().chain(m.iter()) {
        if v > max {
            max = v;
        }
    }
    if max == T::NEG_INF {
        // A row of -inf: exp(-inf - 0) / 0 gives NaN, as in PyTorch.
        max = T::ZERO;
    }
    for (dv, &sv) in d.iter_mut().zip(s) {
        *dv = (sv - max).exp();
    }
    let mut acc = [T::ZERO; 8];
    let mut chunks = d.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] = acc[k] + c[k];
        }
    }
    let sum: f64 = acc.iter().chain(chunks.remainder()).map(|v| v.to_f64()).sum();
    let inv = T::from_f64(1.0 / sum);
    for v in d.iter_mut() {
        *v = *v * inv;
    }
}

#[inline(always)]
fn softmax_block<T: Real>(src: &[T], dst: &mut [T], dim: usize) {
    for (s, d) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(dim)) {
        softmax_row(s, d);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_block_avx2(src: &[f32], dst: &mut [f32], dim: usize) {
    softmax_block(src, dst, dim)
}

/// Elements per parallel block for rows of `dim` elements: whole rows, about 16K elements or an
/// equal share per thread, whichever is smaller.
fn rows_block(len: usize, dim: usize) -> usize {
    let rows = len / dim;
    let per_task = (16384 / dim)
        .max(1)
        .min(rows.div_ceil(rayon::current_num_threads()).max(1));
    per_task * dim
}

/// Runs `f` on blocks of whole rows of `dim` elements in parallel (see [`rows_block`]); a
/// trailing partial row goes to the last block.
fn par_rows<T: Real>(src: &[T], dim: usize, f: impl Fn(&[T], &mut [T]) + Sync + Send) -> Vec<T> {
    let mut dst = vec![T::ZERO; src.len()];
    if dim == 0 || src.is_empty() {
        return dst;
    }
    let block = rows_block(src.len(), dim);
    dst.par_chunks_mut(block)
        .zip(src.par_chunks(block))
        .for_each(|(d, s)| f(s, d));
    dst
}

/// [`par_rows`] over two inputs of one length, read block by block side by side.
pub(crate) fn par_rows2<T: Real>(
    a: &[T],
    b: &[T],
    dim: usize,
    f: impl Fn(&[T], &[T], &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut dst = vec![T::ZERO; a.len()];
    if dim == 0 || a.is_empty() {
        return dst;
    }
    let block = rows_block(a.len(), dim);
    dst.par_chunks_mut(block)
        .zip(a.par_chunks(block).zip(b.par_chunks(block)))
        .for_each(|(d, (x, y))| f(x, y, d));
    dst
}

fn softmax_rows_f32(src: &[f32], dim: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return par_rows(src, dim, |s, d| unsafe { softmax_block_avx2(s, d, dim) });
    }
    par_rows(src, dim, |s, d| softmax_block(s, d, dim))
}

fn softmax_rows_f64(src: &[f64], dim: usize) -> Vec<f64> {
    par_rows(src, dim, |s, d| softmax_block(s, d, dim))
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "vitdet-softmax-last-dim-cpu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = *l.dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(softmax_rows_f32(contiguous_slice::<f32>(s, l, self.name())?, dim)),
            CpuStorage::F64(_) => CpuStorage::F64(softmax_rows_f64(contiguous_slice::<f64>(s, l, self.name())?, dim)),
            _ => bail!("{}: f32/f64 only, found {:?}", self.name(), s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }
}

// ----- GELU -----

/// Exact (erf) GELU for f32, `x * Phi(x)` with the normal CDF written through `erfc` so that
/// negative inputs keep their relative accuracy (`1 + erf(x / sqrt 2)` cancels there):
/// `Phi(x) = erfc(|z|) / 2` for `x < 0` and `1 - erfc(|z|) / 2` otherwise, `z = x / sqrt 2`.
/// `erfc(z) = t exp(-z^2 + P(t))`, `t = 1 / (1 + z / 2)`, with the degree-9 polynomial `P` of
/// the classic Chebyshev fit (Numerical Recipes' `erfcc`, fractional error < 1.2e-7 for all
/// `z >= 0`). Evaluated in f32 with [`exp_f32`], vectorizable, no branches. Relative error of
/// the GELU value (tested against f64): below 1e-6 for `x >= -3`, below 1e-5 for `x < -3`
/// (where the f32 exponent `-z^2` carries its own rounding; PyTorch's f32 `1 + erf` loses all
/// digits there, e.g. it returns -0 at x = -6).
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn normal_cdf_f32(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = 0.170_872_77f32;
    let p = p * t - 0.822_152_23;
    let p = p * t + 1.488_515_87;
    let p = p * t - 1.135_203_98;
    let p = p * t + 0.278_868_07;
    let p = p * t - 0.186_288_06;
    let p = p * t + 0.096_784_18;
    let p = p * t + 0.374_091_96;
    let p = p * t + 1.000_023_68;
    let p = p * t - 1.265_512_23;
    let half_erfc = 0.5 * t * exp_f32(p - 0.5 * x * x); // z^2 = x^2 / 2 with one rounding
    if x < 0.0 {
        half_erfc
    } else {
        1.0 - half_erfc
    }
}

/// `x * Phi(x)`, see [`normal_cdf_f32`].
#[inline(always)]
pub(crate) fn gelu_f32(x: f32) -> f32 {
    x * normal_cdf_f32(x)
}

/// GELU's backward `dy * (Phi(x) + x phi(x))`, `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`: the same
/// `Phi` as the forward, so the derivative and the value come from one approximation.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn gelu_grad_f32(x: f32, dy: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_280_401_432_7;
    let pdf = INV_SQRT_2PI * exp_f32(-0.5 * x * x);
    dy * (normal_cdf_f32(x) + x * pdf)
}

#[inline(always)]
fn gelu_block(src: &[f32], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = gelu_f32(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_block_avx2(src: &[f32], dst: &mut [f32]) {
    gelu_block(src, dst)
}

/// [`gelu_f32`] over a contiguous f32 tensor, in parallel blocks.
pub(crate) struct GeluF32;

impl CustomOp1 for GeluF32 {
    fn name(&self) -> &'static str {
        "vitdet-gelu-f32-cpu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_slice::<f32>(s, l, self.name())?;
        // Blocks of 16K elements; the last block may be shorter (gelu_block takes any length).
        let block = 16384.min(src.len().max(1));
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            let out = par_rows(src, block, |s, d| unsafe { gelu_block_avx2(s, d) });
            return Ok((CpuStorage::F32(out), l.shape().clone()));
        }
        Ok((CpuStorage::F32(par_rows(src, block, gelu_block)), l.shape().clone()))
    }
}

/// Applies [`GeluF32`] to an f32 tensor on the CPU.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&GeluF32)
}

#[inline(always)]
fn gelu_grad_block(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((d, &a), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d = gelu_grad_f32(a, g);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_grad_block_avx2(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    gelu_grad_block(x, dy, dx)
}

/// ReLU's backward as PyTorch's `threshold_backward`: 0 where `x <= 0`, else `dy` (so a NaN
/// input passes `dy` through).
#[inline(always)]
fn relu_grad_block<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    for ((d, &a), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d = if a <= T::ZERO { T::ZERO } else { g };
    }
}

/// Elementwise gradient kernels run in blocks of this many elements (see [`par_rows2`]).
const ELEMENTWISE_BLOCK: usize = 16384;

/// The backward of a unary function in one pass over contiguous `x` and `dy` of one shape,
/// where the candle expression makes several passes over temporaries: GELU ([`gelu_grad_f32`])
/// in f32, ReLU in f32 and f64.
pub(crate) struct UnaryGradCpu(pub UnaryKind);

impl UnaryGradCpu {
    /// Whether the op has a kernel for `kind` in `dtype`.
    pub(crate) fn takes(kind: UnaryKind, dtype: candle_core::DType) -> bool {
        use candle_core::DType::{F32, F64};
        matches!((kind, dtype), (UnaryKind::Gelu, F32) | (UnaryKind::Relu, F32 | F64))
    }
}

impl CustomOp2 for UnaryGradCpu {
    fn name(&self) -> &'static str {
        "vitdet-unary-grad-cpu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        if l1.dims() != l2.dims() {
            bail!("{name}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let out = match (self.0, s1, s2) {
            (UnaryKind::Gelu, CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (x, dy) = (contiguous_slice(s1, l1, name)?, contiguous_slice(s2, l2, name)?);
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    let dx = par_rows2(x, dy, ELEMENTWISE_BLOCK, |a, g, d| unsafe {
                        gelu_grad_block_avx2(a, g, d)
                    });
                    return Ok((CpuStorage::F32(dx), l1.shape().clone()));
                }
                CpuStorage::F32(par_rows2(x, dy, ELEMENTWISE_BLOCK, gelu_grad_block))
            }
            (UnaryKind::Relu, CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(par_rows2(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                ELEMENTWISE_BLOCK,
                relu_grad_block,
            )),
            (UnaryKind::Relu, CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(par_rows2(
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                ELEMENTWISE_BLOCK,
                relu_grad_block,
            )),
            (kind, _, _) => bail!(
                "{name}: no kernel for {kind:?} on {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Applies [`UnaryGradCpu`] (see [`UnaryGradCpu::takes`]) to CPU tensors.
pub(crate) fn unary_grad(kind: UnaryKind, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &UnaryGradCpu(kind))
}

// ----- separable resize -----

/// Per-axis resize taps: `taps[t] = (source index per output, weight per output)`; empty for
/// an axis whose size does not change.
pub(crate) type Taps = Vec<(Vec<u32>, Vec<f64>)>;

/// Separable resize of the last two axes of a contiguous f64 `[.., H, W]` tensor: along W
/// first, then along H (PyTorch's bicubic order), each output a weighted sum of its taps.
/// Parallel over the leading `N * C` planes.
pub(crate) struct ResizeF64 {
    pub out_h: usize,
    pub out_w: usize,
    pub taps_h: Taps,
    pub taps_w: Taps,
}

impl CustomOp1 for ResizeF64 {
    fn name(&self) -> &'static str {
        "vitdet-resize-f64-cpu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_slice::<f64>(s, l, self.name())?;
        let dims = l.dims();
        let r = dims.len();
        if r < 2 {
            bail!("{}: rank {} input", self.name(), r);
        }
        let (h, w) = (dims[r - 2], dims[r - 1]);
        let (oh, ow) = (self.out_h, self.out_w);
        let planes = src.len() / (h * w).max(1);
        let mut dst = vec![0f64; planes * oh * ow];
        dst.par_chunks_mut((oh * ow).max(1))
            .zip(src.par_chunks((h * w).max(1)))
            .for_each(|(d, x)| {
                // along W: [h, w] -> [h, ow]
                let tmp: std::borrow::Cow<[f64]> = if self.taps_w.is_empty() {
                    std::borrow::Cow::Borrowed(x)
                } else {
                    let mut t = vec![0f64; h * ow];
                    for y in 0..h {
                        let row = &x[y * w..(y + 1) * w];
                        let out = &mut t[y * ow..(y + 1) * ow];
                        for (idx, wt) in &self.taps_w {
                            for o in 0..ow {
                                out[o] += wt[o] * row[idx[o] as usize];
                            }
                        }
                    }
                    std::borrow::Cow::Owned(t)
                };
                // along H: [h, ow] -> [oh, ow]
                if self.taps_h.is_empty() {
                    d.copy_from_slice(&tmp);
                } else {
                    for o in 0..oh {
                        let out = &mut d[o * ow..(o + 1) * ow];
                        for (idx, wt) in &self.taps_h {
                            let row = &tmp[idx[o] as usize * ow..(idx[o] as usize + 1) * ow];
                            let k = wt[o];
                            for (dv, sv) in out.iter_mut().zip(row) {
                                *dv += k * sv;
                            }
                        }
                    }
                }
            });
        let mut shape = dims.to_vec();
        shape[r - 2] = oh;
        shape[r - 1] = ow;
        Ok((CpuStorage::F64(dst), Shape::from(shape)))
    }
}

// ----- normalizations -----

/// How a normalization groups elements. `x` is viewed as `[outer, c, inner]`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NormKind {
    /// Statistics over the `c` axis for every `(outer, inner)` position, per-`c` affine
    /// (layer norm over one axis; `inner == 1` is the last axis).
    Axis { outer: usize, c: usize, inner: usize },
    /// `x` viewed as `[n, groups, c / groups, inner]`: statistics over each `(n, group)`, per-`c`
    /// affine (group norm).
    Group {
        n: usize,
        c: usize,
        groups: usize,
        inner: usize,
    },
}

/// A fused normalization `(x - mean) / sqrt(var + eps) * w + b` (biased variance, two passes
/// with f64 accumulators). Inputs `x, w, b`, all contiguous and of one dtype (f32 or f64).
pub(crate) struct Norm {
    pub kind: NormKind,
    pub eps: f64,
}

/// `(mean, 1 / sqrt(var + eps))` of a slice, two-pass.
fn stats<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mut acc = [0f64; 4];
    let mut chunks = x.chunks_exact(4);
    for c in &mut chunks {
        for k in 0..4 {
            acc[k] += c[k].to_f64();
        }
    }
    let mut sum: f64 = acc.iter().sum();
    sum += chunks.remainder().iter().map(|v| v.to_f64()).sum::<f64>();
    let mean = sum / n;
    let mut acc = [0f64; 4];
    let mut chunks = x.chunks_exact(4);
    for c in &mut chunks {
        for k in 0..4 {
            let d = c[k].to_f64() - mean;
            acc[k] += d * d;
        }
    }
    let mut sq: f64 = acc.iter().sum();
    sq += chunks
        .remainder()
        .iter()
        .map(|v| (v.to_f64() - mean) * (v.to_f64() - mean))
        .sum::<f64>();
    (mean, 1.0 / (sq / n + eps).sqrt())
}

fn norm_impl<T: Real>(kind: NormKind, eps: f64, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
    let mut dst = vec![T::ZERO; x.len()];
    match kind {
        NormKind::Axis { c, inner: 1, .. } => {
            let min_rows = (4096 / c.max(1)).max(1);
            dst.par_chunks_mut(c)
                .with_min_len(min_rows)
                .zip(x.par_chunks(c).with_min_len(min_rows))
                .for_each(|(d, s)| {
                    let (mean, rstd) = stats(s, eps);
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    for i in 0..c {
                        d[i] = (s[i] - mean) * rstd * w[i] + b[i];
                    }
                });
        }
        NormKind::Axis { outer, c, inner } => {
            // Tiles of up to TILE inner positions; each tile accumulates per-position sums over c.
            const TILE: usize = 512;
            let tiles_per = inner.div_ceil(TILE);
            let ptr = SendPtr(dst.as_mut_ptr());
            (0..outer * tiles_per).into_par_iter().for_each(|t| {
                let (o, i0) = (t / tiles_per, (t % tiles_per) * TILE);
                let len = TILE.min(inner - i0);
                let base = o * c * inner + i0;
                let mut mean = vec![0f64; len];
                for ci in 0..c {
                    let row = &x[base + ci * inner..base + ci * inner + len];
                    for (m, v) in mean.iter_mut().zip(row) {
                        *m += v.to_f64();
                    }
                }
                mean.iter_mut().for_each(|m| *m /= c as f64);
                let mut var = vec![0f64; len];
                for ci in 0..c {
                    let row = &x[base + ci * inner..base + ci * inner + len];
                    for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
                        let d = v.to_f64() - m;
                        *s += d * d;
                    }
                }
                let mean_t: Vec<T> = mean.iter().map(|&m| T::from_f64(m)).collect();
                let rstd_t: Vec<T> = var
                    .iter()
                    .map(|&s| T::from_f64(1.0 / (s / c as f64 + eps).sqrt()))
                    .collect();
                for ci in 0..c {
                    let off = base + ci * inner;
                    let row = &x[off..off + len];
                    // SAFETY: tiles cover disjoint (outer, inner-range) blocks, so every output
                    // element is written by exactly one task.
                    let out = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(off), len) };
                    let (wc, bc) = (w[ci], b[ci]);
                    for i in 0..len {
                        out[i] = (row[i] - mean_t[i]) * rstd_t[i] * wc + bc;
                    }
                }
            });
        }
        NormKind::Group { n, c, groups, inner } => {
            debug_assert_eq!(x.len(), n * c * inner);
            let cg = c / groups;
            let chunk = cg * inner;
            dst.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .enumerate()
                .for_each(|(ng, (d, s))| {
                    let g = ng % groups;
                    let (mean, rstd) = stats(s, eps);
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    for k in 0..cg {
                        let ch = g * cg + k;
                        let scale = rstd * w[ch];
                        let bc = b[ch];
                        let (dr, sr) = (&mut d[k * inner..(k + 1) * inner], &s[k * inner..(k + 1) * inner]);
                        for i in 0..inner {
                            dr[i] = (sr[i] - mean) * scale + bc;
                        }
                    }
                });
        }
    }
    dst
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "vitdet-norm-cpu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(norm_impl(
                self.kind,
                self.eps,
                contiguous_slice::<f32>(s1, l1, name)?,
                contiguous_slice::<f32>(s2, l2, name)?,
                contiguous_slice::<f32>(s3, l3, name)?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(norm_impl(
                self.kind,
                self.eps,
                contiguous_slice::<f64>(s1, l1, name)?,
                contiguous_slice::<f64>(s2, l2, name)?,
                contiguous_slice::<f64>(s3, l3, name)?,
            )),
            _ => bail!("{name}: x, w, b must all be f32 or all f64, found {:?}", s1.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Applies [`Norm`] to contiguous f32/f64 tensors on the CPU.
pub(crate) fn norm(x: &Tensor, w: &Tensor, b: &Tensor, kind: NormKind, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &Norm { kind, eps })
}

/// Applies [`SoftmaxLastDim`] to an f32/f64 tensor on the CPU.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x <= 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 1.5e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    fn pdf(t: f64) -> f64 {
        (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }

    /// The normal CDF in f64: 1/2 + the integral of the pdf from 0 to x (Simpson, 20000
    /// intervals).
    fn phi(x: f64) -> f64 {
        let n = 20_000;
        let h = x / n as f64;
        let mut s = pdf(0.0) + pdf(x);
        for i in 1..n {
            s += pdf(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        0.5 + s * h / 3.0
    }

    /// The largest `error(x)` over x in [-6, 6] (steps of 0.0137): for x >= -3, and below.
    fn worst_errors(error: impl Fn(f32) -> f64) -> (f64, f64) {
        let (mut worst, mut worst_tail) = (0f64, 0f64);
        let mut x = -6.0f32;
        while x <= 6.0 {
            let err = error(x);
            if x >= -3.0 {
                worst = worst.max(err);
            } else {
                worst_tail = worst_tail.max(err);
            }
            x += 0.0137;
        }
        (worst, worst_tail)
    }

    #[test]
    fn gelu_f32_is_accurate() {
        // Reference: x * Phi(x) with Phi from an f64 Simpson integration.
        let (worst, worst_tail) = worst_errors(|x| {
            let want = x as f64 * phi(x as f64);
            // Near x = -6 the Simpson Phi itself is only good to ~1e-12 absolute.
            (gelu_f32(x) as f64 - want).abs() / (want.abs() + 1e-12)
        });
        assert!(worst < 1e-6, "max relative error {worst:e} for x >= -3");
        assert!(worst_tail < 1e-5, "max relative error {worst_tail:e} for x < -3");
        assert_eq!(gelu_f32(0.0), 0.0);
        assert_eq!(gelu_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu_f32(-30.0), 0.0);
        assert_eq!(gelu_f32(30.0), 30.0);
        assert!(gelu_f32(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_grad_f32_is_accurate() {
        // Reference: Phi(x) + x pdf(x) in f64. The two terms cancel for negative x (the
        // derivative is zero near x = -0.752), so the error is bounded relative to the terms'
        // magnitudes, as the f32 rounding of each term bounds it.
        let (worst, worst_tail) = worst_errors(|x| {
            let xd = x as f64;
            let (cdf, slope) = (phi(xd), xd * pdf(xd));
            (gelu_grad_f32(x, 1.0) as f64 - (cdf + slope)).abs() / (cdf.abs() + slope.abs() + 1e-30)
        });
        assert!(worst < 1e-6, "max relative error {worst:e} for x >= -3");
        assert!(worst_tail < 1e-5, "max relative error {worst_tail:e} for x < -3");
        // GELU'(0) = 1/2, dy scales, saturation to 0 and to dy, NaN passes through.
        assert_eq!(gelu_grad_f32(0.0, 3.0), 1.5);
        assert_eq!(gelu_grad_f32(-30.0, 1.0), 0.0);
        assert_eq!(gelu_grad_f32(30.0, 2.0), 2.0);
        assert!(gelu_grad_f32(f32::NAN, 1.0).is_nan());
        // Blocks in parallel and a tail shorter than a block: the op equals the scalar function.
        let n = 16384 * 2 + 5;
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let dys: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let x = Tensor::from_vec(xs.clone(), n, &candle_core::Device::Cpu).unwrap();
        let dy = Tensor::from_vec(dys.clone(), n, &candle_core::Device::Cpu).unwrap();
        let got = unary_grad(UnaryKind::Gelu, &x, &dy).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n {
            assert_eq!(got[i], gelu_grad_f32(xs[i], dys[i]), "element {i}");
        }
    }

    #[test]
    fn softmax_rows_handle_odd_lengths_and_special_rows() {
        for dim in [1usize, 7, 8, 9, 33] {
            let src: Vec<f32> = (0..3 * dim).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let out = softmax_rows_f32(&src, dim);
            for (s, d) in src.chunks(dim).zip(out.chunks(dim)) {
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = s.iter().map(|&v| (v as f64 - m).exp()).sum();
                for (a, b) in s.iter().zip(d) {
                    let want = (*a as f64 - m).exp() / z;
                    assert!(
                        (*b as f64 - want).abs() <= 1e-7 + 1e-6 * want,
                        "dim {dim}: {b} vs {want}"
                    );
                }
            }
        }
        let out = softmax_rows_f32(&[f32::NEG_INFINITY; 4], 4);
        assert!(out.iter().all(|v| v.is_nan()), "an all -inf row is NaN as in PyTorch");
        let out = softmax_rows_f32(&[0.0, f32::NEG_INFINITY], 2);
        assert_eq!(out, [1.0, 0.0]);
    }
}
