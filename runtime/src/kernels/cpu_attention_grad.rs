//! CPU custom op for the softmax backward over the last axis, in the style of the fused forward
//! softmax in `cpu`: contiguous f32/f64 data (callers convert half types to f32), rows split
//! over rayon tasks, dot products accumulated in f64.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::cpu::{contiguous_slice, par_rows2, Real};

/// `dx = y * (dy - sum(y * dy))` per row of the last axis, from the softmax output `y` and its
/// gradient `dy` (same shape). Per row: the dot product (8 running lanes so the loop
/// vectorizes, then summed in f64) and one pass writing the result.
pub(crate) struct SoftmaxGradLastDim;

#[inline(always)]
fn softmax_grad_row<T: Real>(y: &[T], dy: &[T], dx: &mut [T]) {
    let mut acc = [T::ZERO; 8];
    let (mut yc, mut gc) = (y.chunks_exact(8), dy.chunks_exact(8));
    for (a, b) in (&mut yc).zip(&mut gc) {
        for k in 0..8 {
            acc[k] = acc[k] + a[k] * b[k];
        }
    }
    let tail: f64 = yc
        .remainder()
        .iter()
        .zip(gc.remainder())
        .map(|(&a, &b)| a.to_f64() * b.to_f64())
        .sum();
    let dot = T::from_f64(acc.iter().map(|v| v.to_f64()).sum::<f64>() + tail);
    for ((d, &a), &b) in dx.iter_mut().zip(y).zip(dy) {
        *d = a * (b - dot);
    }
}

/// Rows of `dim` elements over rayon tasks (see `cpu::par_rows2`).
fn softmax_grad_rows<T: Real>(y: &[T], dy: &[T], dim: usize) -> Vec<T> {
    par_rows2(y, dy, dim, |a, b, d| {
        for ((d, a), b) in d.chunks_mut(dim).zip(a.chunks(dim)).zip(b.chunks(dim)) {
            softmax_grad_row(a, b, d);
        }
    })
}

impl CustomOp2 for SoftmaxGradLastDim {
    fn name(&self) -> &'static str {
        "vitdet-softmax-grad-last-dim-cpu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!("{}: shapes {:?} and {:?} differ", self.name(), l1.dims(), l2.dims());
        }
        let dim = *l1.dims().last().unwrap_or(&1);
        let name = self.name();
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(softmax_grad_rows(
                contiguous_slice::<f32>(s1, l1, name)?,
                contiguous_slice::<f32>(s2, l2, name)?,
                dim,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(softmax_grad_rows(
                contiguous_slice::<f64>(s1, l1, name)?,
                contiguous_slice::<f64>(s2, l2, name)?,
                dim,
            )),
            _ => bail!(
                "{name}: f32/f64 inputs of one dtype only, found {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Applies [`SoftmaxGradLastDim`] to f32/f64 tensors on the CPU.
pub(crate) fn softmax_grad_last_dim(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxGradLastDim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_match_the_formula_for_odd_lengths() {
        // Lengths around the 8-lane split; the reference is the formula in f64.
        for dim in [1usize, 7, 8, 9, 17] {
            let y: Vec<f64> = (0..3 * dim).map(|i| ((i * 37 % 11) as f64 + 1.0) / 13.0).collect();
            let dy: Vec<f64> = (0..3 * dim).map(|i| (i * 53 % 7) as f64 - 3.0).collect();
            let got = softmax_grad_rows(&y, &dy, dim);
            for r in 0..3 {
                let row = r * dim..(r + 1) * dim;
                let dot: f64 = y[row.clone()].iter().zip(&dy[row.clone()]).map(|(a, b)| a * b).sum();
                for i in row {
                    assert!((got[i] - y[i] * (dy[i] - dot)).abs() < 1e-12, "dim {dim} element {i}");
                }
            }
        }
    }
}
