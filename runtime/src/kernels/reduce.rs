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
/// shapes of bias and norm gradients (see [`SumForm`]) run a parallel kernel; on a CUDA device
/// they run as a product with a ones vector (`SumForm::sum_by_matmul`); others, and other
/// devices, candle's `sum_keepdim` (single-threaded on the CPU, with per-element index
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
    let form = SumForm::of(&dims, &op.axes);
    let on_gpu = x.device().is_cuda() && x.is_contiguous() && x.elem_count() > 0;
    let y = match (form, middle_run(&dims, &op.axes)) {
        (Some(form), _) if on_gpu => form.sum_by_matmul(x)?.reshape(keep_dims(&dims, &op.axes))?,
        (None, Some(run)) if on_gpu => middle_sum_by_matmul(x, run)?.reshape(keep_dims(&dims, &op.axes))?,
        _ => sum_in(x.to_dtype(acc)?, form, &dims, &op.axes)?.to_dtype(dtype)?,
    };
    Ok(if op.keepdim {
        y
    } else {
        let kept: Vec<usize> = (0..dims.len())
            .filter(|d| !op.axes.contains(d))
            .map(|d| dims[d])
            .collect();
        y.reshape(kept)?
    })
}

/// The sum of `x` (already in its accumulation dtype) over `axes`, keeping them as 1.
fn sum_in(x: Tensor, form: Option<SumForm>, dims: &[usize], axes: &[usize]) -> candle_core::Result<Tensor> {
    Ok(match form {
        // Contiguous input only: a copy would be workspace the memory plan does not count.
        Some(form) if x.device().is_cpu() && x.is_contiguous() => {
            x.apply_op1_no_bwd(&form)?.reshape(keep_dims(dims, axes))?
        }
        _ => x.sum_keepdim(axes.to_vec())?,
    })
}

/// `[outer, summed, inner]` where `axes` are one run of dims with kept dims on both sides (the
/// eager attention's rel-pos gradient sums `[12, 64, 64, 64, 64]` over axis 3).
fn middle_run(dims: &[usize], axes: &[usize]) -> Option<(usize, usize, usize)> {
    let (first, last) = (*axes.first()?, *axes.last()?);
    if last - first + 1 != axes.len() || first == 0 || last + 1 >= dims.len() {
        return None;
    }
    let size = |r: std::ops::Range<usize>| dims[r].iter().product::<usize>();
    Some((size(0..first), size(first..last + 1), size(last + 1..dims.len())))
}

/// The sum over the middle of contiguous `x [outer, summed, inner]` as one (batched) product
/// with a ones row (shared by every batch: stride 0), in `x`'s dtype with f32 accumulation and
/// one rounding (see [`SumForm::sum_by_matmul`]); flat, `outer * inner` values.
fn middle_sum_by_matmul(x: &Tensor, (outer, summed, inner): (usize, usize, usize)) -> candle_core::Result<Tensor> {
    let ones = Tensor::ones((1, 1, summed), x.dtype(), x.device())?.broadcast_as((outer, 1, summed))?;
    ones.matmul(&x.reshape((outer, summed, inner))?)?.flatten_all()
}

/// `dims` with the `axes` set to 1.
fn keep_dims(dims: &[usize], axes: &[usize]) -> Vec<usize> {
    (0..dims.len())
        .map(|d| if axes.contains(&d) { 1 } else { dims[d] })
        .collect()
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

    /// The sum of contiguous `x` (of the form's shape, any float dtype) as a product with a
    /// ones vector, in `x`'s dtype, flat (`kept` values): a GEMM reads the
    /// rows coalesced where candle's CUDA reduction strides across them (a linear bias
    /// gradient sums `[4096, 768]` over its rows). cuBLAS accumulates in f32 for every float
    /// type (candle leaves reduced-precision GEMMs off) and rounds once, as the f32 sum
    /// rounded back does. With a batch (`outer > 1`) a half type is summed in f32, so the
    /// partial sums are not rounded.
    fn sum_by_matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // `x [rows, inner] @ ones [inner, 1]`: the sums of the rows.
        let row_sums = |x: &Tensor, rows: usize, inner: usize| -> candle_core::Result<Tensor> {
            let ones = Tensor::ones((inner, 1), x.dtype(), x.device())?;
            x.reshape((rows, inner))?.matmul(&ones)?.flatten_all()
        };
        match *self {
            SumForm::Leading { rows, kept } => middle_sum_by_matmul(x, (1, rows, kept)),
            SumForm::Inner { outer: 1, kept, inner } => row_sums(x, kept, inner),
            SumForm::Inner { outer, kept, inner } => {
                let per_item = row_sums(&x.to_dtype(accum_dtype(x.dtype()))?, outer * kept, inner)?;
                middle_sum_by_matmul(&per_item, (1, outer, kept))?.to_dtype(x.dtype())
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The CUDA path's products, run on the CPU in f32, give the CPU kernel's sums in every
    /// form (small integers: exact in any order), including a batch of conv bias gradients.
    #[test]
    fn sums_by_matmul_are_the_sums() {
        let cases: [(&[usize], &[usize]); 5] = [
            (&[6, 5], &[0]),
            (&[1, 4, 3, 3], &[0, 2, 3]),
            (&[3, 4, 2, 5], &[0, 2, 3]),
            (&[2, 3, 7], &[0, 1]),
            (&[4, 6], &[1]),
        ];
        for (dims, axes) in cases {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i * 13) % 11) as f32 - 5.0).collect();
            let x = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
            let form = SumForm::of(dims, axes).expect("a bias-gradient form");
            let ours = form.sum_by_matmul(&x).unwrap().reshape(keep_dims(dims, axes)).unwrap();
            let want = sum_in(x.clone(), Some(form), dims, axes).unwrap();
            assert_eq!(ours.dims(), want.dims());
            assert_eq!(
                super::super::f64_values(&ours),
                super::super::f64_values(&want),
                "{dims:?} {axes:?}"
            );
        }
    }

    /// The middle-run product (the GPU path of sums with kept dims on both sides), run on the
    /// CPU, gives candle's sums exactly (small integers); other axes have no middle run.
    #[test]
    fn middle_sums_by_matmul_are_the_sums() {
        for (dims, axes) in [
            (&[2, 3, 4, 5, 6][..], &[3][..]),
            (&[4, 3, 5], &[1]),
            (&[2, 3, 4, 5], &[1, 2]),
        ] {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i * 13) % 11) as f32 - 5.0).collect();
            let x = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
            assert!(SumForm::of(dims, axes).is_none(), "{dims:?} {axes:?} has a form");
            let run = middle_run(dims, axes).expect("a middle run");
            let ours = middle_sum_by_matmul(&x, run)
                .unwrap()
                .reshape(keep_dims(dims, axes))
                .unwrap();
            let want = x.sum_keepdim(axes.to_vec()).unwrap();
            assert_eq!(
                super::super::f64_values(&ours),
                super::super::f64_values(&want),
                "{dims:?} {axes:?}"
            );
        }
        assert_eq!(middle_run(&[2, 3, 4], &[0]), None);
        assert_eq!(middle_run(&[2, 3, 4], &[2]), None);
        assert_eq!(middle_run(&[2, 3, 4, 5], &[1, 3]), None);
    }
}
