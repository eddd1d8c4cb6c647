//! Hand-written CPU loops for backward ops: fused normalization gradients, max-pool gradient
//! routing, the adjoint of the separable resize, and a strided im2col for the convolution weight
//! gradient. They read contiguous CPU data in place (callers convert half types to f32 and move
//! other devices' data to the host, or take a candle-op path), accumulate in f64 and parallelize
//! with rayon.

use crate::cuda::im2col::Im2ColTile;
use candle_core::{bail, DType, Device, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu::{SendPtr, Taps};

/// Runs `f` on the contiguous data of a CPU tensor of element type `T` (copying only when the
/// tensor is not contiguous).
pub(crate) fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("CPU tensor expected, found one on {:?}", t.device())
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        bail!("contiguous tensor expected")
    };
    Ok(f(&cpu.as_slice::<T>()?[a..b]))
}

// ----- normalization gradients -----

/// How a normalization's statistics are grouped; `x` is viewed as `[outer, c, inner]` (with
/// `outer = n` for group and batch norm). The affine weight is per `c` in every case.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NormGradKind {
    /// Statistics over `c` for every `(outer, inner)` position (layer norm over one axis).
    Axis { outer: usize, c: usize, inner: usize },
    /// Statistics over each `(n, group)` of `c / groups` channels and all `inner` positions.
    Group {
        n: usize,
        c: usize,
        groups: usize,
        inner: usize,
    },
    /// Statistics per channel over `n` and `inner` (batch norm in training).
    Batch { n: usize, c: usize, inner: usize },
}

impl NormGradKind {
    /// `(elements of x, channels)` this view describes.
    fn sizes(self) -> (usize, usize) {
        match self {
            NormGradKind::Axis { outer, c, inner } => (outer * c * inner, c),
            NormGradKind::Group { n, c, inner, .. } | NormGradKind::Batch { n, c, inner } => (n * c * inner, c),
        }
    }
}

/// Per-channel partial sums `(sum dy * xhat, sum dy)`.
type Partials = (Vec<f64>, Vec<f64>);

fn add_partials(mut a: Partials, b: Partials) -> Partials {
    a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
    a.1.iter_mut().zip(&b.1).for_each(|(x, y)| *x += y);
    a
}

/// `(mean, rstd)` of the values `get(0..m)`, two passes in f64, biased variance.
fn moments(m: usize, get: impl Fn(usize) -> f64, eps: f64) -> (f64, f64) {
    let mean = (0..m).map(&get).sum::<f64>() / m.max(1) as f64;
    let var = (0..m).map(|k| (get(k) - mean).powi(2)).sum::<f64>() / m.max(1) as f64;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Backward of a normalization `y = xhat * w + b`, `xhat = (x - mean) * rstd`: returns
/// `(dx, dw, db)` with `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `g = dy * w`, the
/// means over each statistics group. All arithmetic in f64, one rounding to `T` at the end.
pub(crate) fn norm_grad<T: WithDType>(
    kind: NormGradKind,
    eps: f64,
    x: &[T],
    w: &[T],
    dy: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let f = |v: T| v.to_f64();
    let mut dx = vec![T::zero(); x.len()];
    let (c, sums) = match kind {
        NormGradKind::Axis { c, inner: 1, .. } => {
            // Rows of `c` contiguous values; blocks of rows per task.
            let rows = (16384 / c.max(1)).max(1);
            let sums = dx
                .par_chunks_mut((rows * c).max(1))
                .zip(x.par_chunks((rows * c).max(1)))
                .zip(dy.par_chunks((rows * c).max(1)))
                .fold(
                    || (vec![0f64; c], vec![0f64; c]),
                    |mut acc, ((dxb, xb), dyb)| {
                        for ((dxr, xr), dyr) in dxb.chunks_mut(c).zip(xb.chunks(c)).zip(dyb.chunks(c)) {
                            let (mean, rstd) = moments(c, |k| f(xr[k]), eps);
                            let (mut sg, mut sgx) = (0f64, 0f64);
                            for k in 0..c {
                                let (xh, d) = ((f(xr[k]) - mean) * rstd, f(dyr[k]));
                                let g = d * f(w[k]);
                                sg += g;
                                sgx += g * xh;
                                acc.0[k] += d * xh;
                                acc.1[k] += d;
                            }
                            let (mg, mgx) = (sg / c as f64, sgx / c as f64);
                            for k in 0..c {
                                let xh = (f(xr[k]) - mean) * rstd;
                                let g = f(dyr[k]) * f(w[k]);
                                dxr[k] = T::from_f64(rstd * (g - mg - xh * mgx));
                            }
                        }
                        acc
                    },
                )
                .reduce(|| (vec![0f64; c], vec![0f64; c]), add_partials);
            (c, sums)
        }
        NormGradKind::Axis { outer, c, inner } => {
            // Statistics over a strided axis (e.g. channels of NCHW): tasks take a tile of up to
            // TILE inner positions of one outer index and sweep the `c` contiguous runs of the
            // tile, keeping per-position sums (as the forward does), so every pass reads memory
            // in order.
            const TILE: usize = 512;
            let tiles_per = inner.div_ceil(TILE);
            let ptr = SendPtr(dx.as_mut_ptr());
            let sums = (0..outer * tiles_per)
                .into_par_iter()
                .fold(
                    || (vec![0f64; c], vec![0f64; c]),
                    |mut acc, t| {
                        let (o, i0) = (t / tiles_per, (t % tiles_per) * TILE);
                        let len = TILE.min(inner - i0);
                        let run = |k: usize| o * c * inner + k * inner + i0;
                        let mut mean = vec![0f64; len];
                        for k in 0..c {
                            for (m, v) in mean.iter_mut().zip(&x[run(k)..run(k) + len]) {
                                *m += f(*v);
                            }
                        }
                        mean.iter_mut().for_each(|m| *m /= c as f64);
                        let mut rstd = vec![0f64; len];
                        for k in 0..c {
                            for ((s, v), m) in rstd.iter_mut().zip(&x[run(k)..run(k) + len]).zip(&mean) {
                                *s += (f(*v) - m).powi(2);
                            }
                        }
                        rstd.iter_mut().for_each(|s| *s = 1.0 / (*s / c as f64 + eps).sqrt());
                        let (mut sg, mut sgx) = (vec![0f64; len], vec![0f64; len]);
                        for k in 0..c {
                            let wk = f(w[k]);
                            let (mut sdx, mut sd) = (0f64, 0f64);
                            for j in 0..len {
                                let xh = (f(x[run(k) + j]) - mean[j]) * rstd[j];
                                let d = f(dy[run(k) + j]);
                                sg[j] += d * wk;
                                sgx[j] += d * wk * xh;
                                sdx += d * xh;
                                sd += d;
                            }
                            acc.0[k] += sdx;
                            acc.1[k] += sd;
                        }
                        for k in 0..c {
                            let wk = f(w[k]);
                            // SAFETY: tasks cover disjoint (outer, inner-range) blocks, so every
                            // element of dx is written by exactly one task.
                            let out = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(run(k)), len) };
                            for j in 0..len {
                                let xh = (f(x[run(k) + j]) - mean[j]) * rstd[j];
                                let g = f(dy[run(k) + j]) * wk;
                                out[j] = T::from_f64(rstd[j] * (g - sg[j] / c as f64 - xh * sgx[j] / c as f64));
                            }
                        }
                        acc
                    },
                )
                .reduce(|| (vec![0f64; c], vec![0f64; c]), add_partials);
            (c, sums)
        }
        NormGradKind::Group { c, groups, inner, .. } => {
            let cg = c / groups;
            let chunk = (cg * inner).max(1);
            let sums = dx
                .par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .zip(dy.par_chunks(chunk))
                .enumerate()
                .fold(
                    || (vec![0f64; c], vec![0f64; c]),
                    |mut acc, (ng, ((dxg, xg), dyg))| {
                        let ch0 = (ng % groups) * cg;
                        let (mean, rstd) = moments(xg.len(), |k| f(xg[k]), eps);
                        let (mut sg, mut sgx) = (0f64, 0f64);
                        for (k, (&xv, &dv)) in xg.iter().zip(dyg).enumerate() {
                            let ch = ch0 + k / inner.max(1);
                            let (xh, d) = ((f(xv) - mean) * rstd, f(dv));
                            let g = d * f(w[ch]);
                            sg += g;
                            sgx += g * xh;
                            acc.0[ch] += d * xh;
                            acc.1[ch] += d;
                        }
                        let m = xg.len().max(1) as f64;
                        let (mg, mgx) = (sg / m, sgx / m);
                        for (k, ((o, &xv), &dv)) in dxg.iter_mut().zip(xg).zip(dyg).enumerate() {
                            let ch = ch0 + k / inner.max(1);
                            let xh = (f(xv) - mean) * rstd;
                            *o = T::from_f64(rstd * (f(dv) * f(w[ch]) - mg - xh * mgx));
                        }
                        acc
                    },
                )
                .reduce(|| (vec![0f64; c], vec![0f64; c]), add_partials);
            (c, sums)
        }
        NormGradKind::Batch { n, c, inner } => {
            // One task per channel: its values are `n` strided runs of `inner`; the channel's dx
            // is collected and scattered afterwards.
            let at = |b: usize, ch: usize, i: usize| (b * c + ch) * inner + i;
            let per_channel: Vec<(Vec<T>, f64, f64)> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let m = n * inner;
                    let get = |k: usize| f(x[at(k / inner, ch, k % inner)]);
                    let (mean, rstd) = moments(m, get, eps);
                    let (mut sdx, mut sd) = (0f64, 0f64);
                    for k in 0..m {
                        let d = f(dy[at(k / inner, ch, k % inner)]);
                        sdx += d * (get(k) - mean) * rstd;
                        sd += d;
                    }
                    let wc = f(w[ch]);
                    let (mg, mgx) = (wc * sd / m as f64, wc * sdx / m as f64);
                    let dxc = (0..m)
                        .map(|k| {
                            let g = f(dy[at(k / inner, ch, k % inner)]) * wc;
                            let xh = (get(k) - mean) * rstd;
                            T::from_f64(rstd * (g - mg - xh * mgx))
                        })
                        .collect();
                    (dxc, sdx, sd)
                })
                .collect();
            let mut sums = (vec![0f64; c], vec![0f64; c]);
            for (ch, (dxc, sdx, sd)) in per_channel.into_iter().enumerate() {
                sums.0[ch] = sdx;
                sums.1[ch] = sd;
                for (k, v) in dxc.into_iter().enumerate() {
                    dx[at(k / inner, ch, k % inner)] = v;
                }
            }
            (c, sums)
        }
    };
    debug_assert_eq!(sums.0.len(), c);
    let dw = sums.0.into_iter().map(T::from_f64).collect();
    let db = sums.1.into_iter().map(T::from_f64).collect();
    (dx, dw, db)
}

/// [`norm_grad`] on CPU tensors `x`, `w [C]`, `dy` of one dtype, f32 or f64.
pub(crate) fn norm_grad_tensors(
    kind: NormGradKind,
    eps: f64,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    fn run<T: WithDType>(
        kind: NormGradKind,
        eps: f64,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (dx, dw, db) = with_slice::<T, _>(x, |xs| {
            with_slice::<T, _>(w, |ws| with_slice::<T, _>(dy, |ds| norm_grad(kind, eps, xs, ws, ds)))
        })???;
        let c = dw.len();
        Ok((
            Tensor::from_vec(dx, x.dims(), &Device::Cpu)?,
            Tensor::from_vec(dw, c, &Device::Cpu)?,
            Tensor::from_vec(db, c, &Device::Cpu)?,
        ))
    }
    let (numel, c) = kind.sizes();
    if x.elem_count() != numel || dy.elem_count() != numel || w.elem_count() != c {
        bail!(
            "norm gradient {kind:?}: input {:?}, weight {:?} and gradient {:?} do not fit",
            x.dims(),
            w.dims(),
            dy.dims()
        );
    }
    match x.dtype() {
        DType::F32 => run::<f32>(kind, eps, x, w, dy),
        DType::F64 => run::<f64>(kind, eps, x, w, dy),
        d => bail!("norm gradient: f32 or f64 expected, found {d:?}"),
    }
}

// ----- max pooling -----

/// Routes each window's gradient of a `[planes, h, w]` f64 max pooling to the element PyTorch's
/// CPU forward picks (see `vitdet_ir::ops::MaxPool2dGrad`), accumulating over windows.
pub(crate) fn max_pool2d_grad(
    x: &[f64],
    dy: &[f64],
    [h, w]: [usize; 2],
    [oh, ow]: [usize; 2],
    [kh, kw]: [usize; 2],
    [sh, sw]: [usize; 2],
    [ph, pw]: [usize; 2],
) -> Vec<f64> {
    let mut dx = vec![0f64; x.len()];
    if h * w == 0 || oh * ow == 0 {
        return dx;
    }
    dx.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w))
        .zip(dy.par_chunks(oh * ow))
        .for_each(|((dxp, xp), dyp)| {
            for oy in 0..oh {
                // In-bounds rows of the window (padding <= kernel / 2 keeps it non-empty).
                let y0 = (oy * sh).saturating_sub(ph);
                let y1 = (oy * sh + kh).saturating_sub(ph).min(h);
                for ox in 0..ow {
                    let x0 = (ox * sw).saturating_sub(pw);
                    let x1 = (ox * sw + kw).saturating_sub(pw).min(w);
                    if y0 >= y1 || x0 >= x1 {
                        continue;
                    }
                    let (mut best, mut val) = (y0 * w + x0, f64::NEG_INFINITY);
                    for yy in y0..y1 {
                        for xx in x0..x1 {
                            let v = xp[yy * w + xx];
                            if v > val || v.is_nan() {
                                val = v;
                                best = yy * w + xx;
                            }
                        }
                    }
                    dxp[best] += dyp[oy * ow + ox];
                }
            }
        });
    dx
}

// ----- resize -----

/// The adjoint of `cpu::ResizeF64` on `[planes, oh, ow]` f64 gradients: each output's gradient
/// is scattered to its taps with the same weights (transpose of the H pass, then of the W pass).
pub(crate) fn resize_grad(
    dy: &[f64],
    [h, w]: [usize; 2],
    [oh, ow]: [usize; 2],
    taps_h: &Taps,
    taps_w: &Taps,
) -> Vec<f64> {
    let mut dx = vec![0f64; dy.len() / (oh * ow).max(1) * h * w];
    if h * w == 0 || oh * ow == 0 {
        return dx;
    }
    dx.par_chunks_mut(h * w).zip(dy.par_chunks(oh * ow)).for_each(|(d, g)| {
        // transpose of the H pass: [oh, ow] -> [h, ow]
        let tmp: std::borrow::Cow<[f64]> = if taps_h.is_empty() {
            std::borrow::Cow::Borrowed(g)
        } else {
            let mut t = vec![0f64; h * ow];
            for (idx, wt) in taps_h {
                for o in 0..oh {
                    let k = wt[o];
                    let src = &g[o * ow..(o + 1) * ow];
                    let dst = &mut t[idx[o] as usize * ow..(idx[o] as usize + 1) * ow];
                    for (dv, sv) in dst.iter_mut().zip(src) {
                        *dv += k * sv;
                    }
                }
            }
            std::borrow::Cow::Owned(t)
        };
        // transpose of the W pass: [h, ow] -> [h, w]
        if taps_w.is_empty() {
            d.copy_from_slice(&tmp);
        } else {
            for y in 0..h {
                let src = &tmp[y * ow..(y + 1) * ow];
                let dst = &mut d[y * w..(y + 1) * w];
                for (idx, wt) in taps_w {
                    for o in 0..ow {
                        dst[idx[o] as usize] += wt[o] * src[o];
                    }
                }
            }
        }
    });
    dx
}

// ----- strided im2col -----

/// The im2col columns of a strided, dilated, padded convolution over a tile of a contiguous
/// `[N, C, H, W]` input: `[C * kh * kw, nb * r * Wo]`, row `(c, a, b)` holding
/// `x[b0 + i, c, (r0 + y) sh + a dh - ph, z sw + b dw - pw]` (zero outside the input) at column
/// `(i, y, z)`, for images `b0..b0 + nb` and output rows `r0..r0 + r`.
pub(crate) struct StridedIm2Col(pub Im2ColTile);

impl StridedIm2Col {
    pub(crate) fn build<T: WithDType>(&self, src: &[T], [c, h, w]: [usize; 3]) -> Vec<T> {
        let [kh, kw] = self.0.kernel;
        let [sh, sw] = self.0.stride;
        let [ph, pw] = self.0.padding;
        let [dh, dw] = self.0.dilation;
        let wo = self.0.out_w;
        let (b0, nb) = self.0.images;
        let (r0, r) = self.0.rows;
        let cols = nb * r * wo;
        let mut out = vec![T::zero(); c * kh * kw * cols];
        if cols == 0 {
            return out;
        }
        out.par_chunks_mut(cols).enumerate().for_each(|(row, dst)| {
            let (ci, a, b) = (row / (kh * kw), row / kw % kh, row % kw);
            // Output columns z0..z1 read inside the input: 0 <= z sw + b dw - pw < w.
            let shift = (b * dw) as isize - pw as isize;
            let z0 = if shift >= 0 {
                0
            } else {
                ((-shift) as usize).div_ceil(sw).min(wo)
            };
            let room = w as isize - shift;
            let z1 = if room <= 0 {
                0
            } else {
                (room as usize).div_ceil(sw).min(wo)
            }
            .max(z0);
            if z0 == z1 {
                return;
            }
            let ix0 = (z0 * sw) as isize + shift;
            for i in 0..nb {
                let plane = &src[((b0 + i) * c + ci) * h * w..][..h * w];
                for y in 0..r {
                    let iy = ((r0 + y) * sh + a * dh) as isize - ph as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let line = &plane[iy as usize * w + ix0 as usize..(iy as usize + 1) * w];
                    let d = &mut dst[(i * r + y) * wo..][z0..z1];
                    for (dv, &sv) in d.iter_mut().zip(line.iter().step_by(sw)) {
                        *dv = sv;
                    }
                }
            }
        });
        out
    }

    /// The columns of a contiguous f32/f64 CPU tensor as a `[C * kh * kw, nb * r * Wo]` tensor.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let shape = (
            c * self.0.kernel[0] * self.0.kernel[1],
            self.0.images.1 * self.0.rows.1 * self.0.out_w,
        );
        match x.dtype() {
            DType::F32 => Tensor::from_vec(
                with_slice::<f32, _>(x, |s| self.build(s, [c, h, w]))?,
                shape,
                &Device::Cpu,
            ),
            DType::F64 => Tensor::from_vec(
                with_slice::<f64, _>(x, |s| self.build(s, [c, h, w]))?,
                shape,
                &Device::Cpu,
            ),
            d => bail!("strided im2col: f32 or f64 expected, found {d:?}"),
        }
    }
}
