//! Reductions.

use std::ops::AddAssign;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use vitdet_ir::ops::ReduceSum;

use super::cpu::{contiguous_slice, Real};
use super::{accum_dtype, expect_float, KernelError, KernelResult};

/// Sum over `op.axes`, accumulated in f32 for half types and rounded back; the summed axes are
/// dropped unless `keepdim`. No axes returns the input. On the CPU, contiguous inputs in the
/// shapes of bias and norm gradients (see [`SumForm`]) run a parallel kernel; others, and
/// other devices, candle's `sum_keepdim` (single-threaded on the CPU, with per-element index
/// arithmetic for axes other than the last).
pub fn reduce_sum(op: &ReduceSum, x: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let dims = x.dims().to_vec();
    if let Some(&a) = op.axes.iter().find(|&&a| a >= dims.len()) {
        return Err(KernelError::Unsupported(format!(
            "reduce_sum axis {a} out of range for {dims:?}"
        )));
    }
    if op.axes.windows(2).any(|w| w[0] >= w[1]) {
        return Err(KernelError::Unsupported(format!(
            "reduce_sum axes {:?} must be strictly increasing",
            op.axes
        )));
    }
    if op.axes.is_empty() {
        return Ok(x.clone());
    }
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let x = x.to_dtype(acc)?;
    let y = match SumForm::of(&dims, &op.axes) {
        // Contiguous input only: a copy would be workspace the memory plan does not count.
        Some(form) if x.device().is_cpu() && x.is_contiguous() => {
            let keep: Vec<usize> = (0..dims.len())
                .map(|d| if op.axes.contains(&d) { 1 } else { dims[d] })
                .collect();
            x.apply_op1_no_bwd(&form)?.reshape(keep)?
        }
        _ => x.sum_keepdim(op.axes.clone())?,
    };
    let y = if op.keepdim {
        y
    } else {
        let kept: Vec<usize> = (0..dims.len())
            .filter(|d| !op.axes.contains(d))
            .map(|d| dims[d])
            .collect();
        y.reshape(kept)?
    };
    Ok(y.to_dtype(dtype)?)
}

/// A sum over some axes of a contiguous tensor, its axes merged into runs of summed and kept
/// ones (axes of size 1 dropped), in the two forms the gradients of biases and norm
/// parameters take:
/// * `Inner`: `[outer, kept, inner]` summed over `outer` and `inner` (either may be 1): a conv
///   bias gradient sums `[N, C, H * W]` over N and H * W; a sum over trailing axes is
///   `[1, kept, inner]`.
/// * `Leading`: `[rows, kept]` summed over `rows`: a linear bias gradient sums `[M, N]` over M.
///
/// Each output element is summed by one thread in a fixed order (contiguous runs in eight
/// interleaved partial sums, then rows in turn), so results do not depend on the thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumForm {
    Inner { outer: usize, kept: usize, inner: usize },
    Leading { rows: usize, kept: usize },
}

impl SumForm {
    /// The form of summing a tensor of `dims` over `axes`, if it has one of the two.
    pub fn of(dims: &[usize], axes: &[usize]) -> Option<SumForm> {
        let mut runs: Vec<(bool, usize)> = Vec::new();
        for (d, &n) in dims.iter().enumerate() {
            let summed = axes.contains(&d);
            match runs.last_mut() {
                _ if n == 1 => {}
                Some((s, len)) if *s == summed => *len *= n,
                _ => runs.push((summed, n)),
            }
        }
        let inner = |outer, kept, inner| Some(SumForm::Inner { outer, kept, inner });
        match runs[..] {
            [] => inner(1, 1, 1),
            [(true, r)] => inner(1, 1, r),
            [(false, k)] => inner(1, k, 1),
            [(false, k), (true, r)] => inner(1, k, r),
            [(true, o), (false, k), (true, r)] => inner(o, k, r),
            [(true, rows), (false, kept)] => Some(SumForm::Leading { rows, kept }),
            _ => None,
        }
    }

    fn kept(&self) -> usize {
        match *self {
            SumForm::Inner { kept, .. } | SumForm::Leading { kept, .. } => kept,
        }
    }

    fn sum<T: Real + AddAssign>(&self, x: &[T]) -> Vec<T> {
        let mut out = vec![T::ZERO; self.kept()];
        match *self {
            SumForm::Inner { outer, kept, inner } => out.par_iter_mut().enumerate().for_each(|(k, o)| {
                let mut total = T::ZERO;
                for b in 0..outer {
                    let start = (b * kept + k) * inner;
                    total += sum_run(&x[start..start + inner]);
                }
                *o = total;
            }),
            // Columns in blocks of 64, each block walking the rows (contiguous reads per row).
            SumForm::Leading { rows, kept } => out.par_chunks_mut(64).enumerate().for_each(|(c, acc)| {
                let j0 = c * 64;
                for r in 0..rows {
                    let row = &x[r * kept + j0..r * kept + j0 + acc.len()];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
            }),
        }
        out
    }
}

/// The sum of a contiguous run: eight interleaved partial sums (vectorizable, and about three
/// bits more accurate than one running sum on long runs), combined pairwise, then the tail.
#[inline]
fn sum_run<T: Real + AddAssign>(v: &[T]) -> T {
    let mut lanes = [T::ZERO; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &e) in lanes.iter_mut().zip(c) {
            *l += e;
        }
    }
    let quads = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    let mut total = (quads[0] + quads[2]) + (quads[1] + quads[3]);
    for &e in tail {
        total += e;
    }
    total
}

impl CustomOp1 for SumForm {
    fn name(&self) -> &'static str {
        "vitdet-sum-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.sum(contiguous_slice::<f32>(s, l, name)?)),
            CpuStorage::F64(_) => CpuStorage::F64(self.sum(contiguous_slice::<f64>(s, l, name)?)),
            _ => bail!("{}: f32/f64 only, found {:?}", self.name(), s.dtype()),
        };
        Ok((out, Shape::from(self.kept())))
    }
}
