//! Attention building blocks: softmax and the two relative-position families, and their
//! backward ops.
//!
//! The relative-position ops read small tables (parameters) and are written with candle ops on
//! index tensors built on the host, so they run on any device without a CPU round trip. Their
//! backward ops scatter-add with candle's `index_add` over the same indices on the CPU; on other
//! devices, where an index only depends on `i - j`, as `diagonal_sums` (candle's CUDA
//! `index_add` walks every index in one thread per output column).

use candle_core::{DType, Tensor};
use vitdet_ir::ops::{RelPosBias, RelPosBiasGrad, RelPosGather, RelPosGatherGrad, Softmax, SoftmaxGrad};

use super::{accum_dtype, cpu, cpu_attention_grad, expect_float, KernelError, KernelResult};

/// Softmax along `op.axis`, stably (`exp(x - max) / sum`). On the CPU the last axis runs as one
/// fused custom op (`cpu::SoftmaxLastDim`); on a CUDA device (feature `cuda`) any axis of an
/// f32/f16/bf16 tensor runs the runtime's CUDA kernels (`crate::cuda::softmax`); anything else
/// uses candle's reductions ([`softmax_portable`]). Half types are computed in f32.
pub fn softmax(op: &Softmax, x: &Tensor) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    if op.axis >= x.rank() {
        return Err(KernelError::Unsupported(format!(
            "axis {} out of range for {:?}",
            op.axis,
            x.dims()
        )));
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::softmax::run::supports(x, op.axis) {
        return crate::cuda::softmax::run::softmax(op.axis, x);
    }
    if op.axis + 1 == x.rank() && x.device().is_cpu() {
        let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
        return Ok(cpu::softmax_last_dim(&x.to_dtype(acc)?)?.to_dtype(dtype)?);
    }
    softmax_portable(op, x)
}

/// Softmax from candle ops (max, subtract, exp, sum, divide).
pub fn softmax_portable(op: &Softmax, x: &Tensor) -> KernelResult<Tensor> {
    let (dtype, acc) = (x.dtype(), accum_dtype(x.dtype()));
    let xf = x.to_dtype(acc)?;
    let max = xf.max_keepdim(op.axis)?;
    let e = xf.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(op.axis)?;
    Ok(e.broadcast_div(&sum)?.to_dtype(dtype)?)
}

/// PyTorch's 1-d linear interpolation (`align_corners=False`) from `n_in` to `n_out` samples
/// as a dense `[n_out, n_in]` matrix (row-major, f64).
pub(crate) fn linear_interp_matrix(n_in: usize, n_out: usize) -> Vec<f64> {
    let mut m = vec![0f64; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    for d in 0..n_out {
        let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src as usize).min(n_in - 1);
        let i1 = if i0 + 1 < n_in { i0 + 1 } else { i0 };
        let l1 = src - i0 as f64;
        m[d * n_in + i0] += 1.0 - l1;
        m[d * n_in + i1] += l1;
    }
    m
}

/// detectron2's `get_rel_pos`: `table [L, C] -> [q, k, C]`. When `L != 2 max(q, k) - 1` the
/// table is first resized along `L` by linear interpolation (`align_corners=False`), computed as
/// an interpolation matrix times the table in f64. Entry `(i, j)` reads row
/// `trunc(i * max(k/q, 1) - j * max(q/k, 1) + (k - 1) * max(q/k, 1))`, evaluated in f64
/// (detectron2 evaluates it in the default float dtype; the two agree unless a coordinate lies
/// within rounding of an integer, which needs `q != k` with a ratio that is not a short binary
/// fraction).
pub fn rel_pos_gather(op: &RelPosGather, table: &Tensor) -> KernelResult<Tensor> {
    expect_float("table", table)?;
    let (l, c) = table.dims2()?;
    let (q, k) = (op.q_size, op.k_size);
    if q == 0 || k == 0 || l == 0 {
        return Err(KernelError::Unsupported(format!(
            "empty sizes q={q} k={k} for table [{l}, {c}]"
        )));
    }
    let target = 2 * q.max(k) - 1;
    let table = if l != target {
        let m = Tensor::from_vec(linear_interp_matrix(l, target), (target, l), table.device())?;
        m.matmul(&table.to_dtype(DType::F64)?.contiguous()?)?
            .to_dtype(table.dtype())?
    } else {
        table.clone()
    };
    let idx = Tensor::from_vec(rel_pos_gather_rows(q, k), q * k, table.device())?;
    Ok(table.index_select(&idx, 0)?.reshape((q, k, c))?)
}

/// The resized-table row [`rel_pos_gather`] reads for each `(i, j)`, row-major over `[q, k]`.
fn rel_pos_gather_rows(q: usize, k: usize) -> Vec<u32> {
    let (qf, kf) = (q as f64, k as f64);
    let q_scale = (kf / qf).max(1.0);
    let k_scale = (qf / kf).max(1.0);
    let mut idx = Vec::with_capacity(q * k);
    for i in 0..q {
        for j in 0..k {
            let r = i as f64 * q_scale - j as f64 * k_scale + (kf - 1.0) * k_scale;
            idx.push(r as u32);
        }
    }
    idx
}

/// BEiT's relative position bias: `table [(2h-1)(2w-1), heads] -> [heads, h*w, h*w]` with entry
/// `(n, i, j) = table[(yi - yj + h - 1) * (2w - 1) + (xi - xj + w - 1), n]`.
pub fn rel_pos_bias(op: &RelPosBias, table: &Tensor) -> KernelResult<Tensor> {
    let (rows, heads) = table.dims2()?;
    let [h, w] = op.window;
    if h == 0 || w == 0 || rows != op.table_len() {
        return Err(KernelError::Unsupported(format!(
            "table [{rows}, {heads}] does not fit window {:?}",
            op.window
        )));
    }
    let n = h * w;
    let idx = Tensor::from_vec(rel_pos_bias_rows(h, w), n * n, table.device())?;
    Ok(table
        .index_select(&idx, 0)?
        .reshape((n, n, heads))?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// The table row [`rel_pos_bias`] reads for each token pair `(i, j)`, row-major over `[n, n]`.
fn rel_pos_bias_rows(h: usize, w: usize) -> Vec<u32> {
    let n = h * w;
    let mut idx = Vec::with_capacity(n * n);
    for i in 0..n {
        let (yi, xi) = (i / w, i % w);
        for j in 0..n {
            let (yj, xj) = (j / w, j % w);
            idx.push(((yi + h - 1 - yj) * (2 * w - 1) + (xi + w - 1 - xj)) as u32);
        }
    }
    idx
}

// ------------------------------------------------------------------------------- backward

/// Softmax backward `dx = y * (dy - sum(dy * y, axis))` from the softmax output `y` and its
/// gradient `dy`. On the CPU the last axis runs as one fused custom op
/// (`cpu_attention_grad::SoftmaxGradLastDim`, one pass per row for the dot product and one for
/// the result); on a CUDA device (feature `cuda`) any axis of an f32/f16/bf16 tensor runs the
/// runtime's CUDA kernels (`crate::cuda::softmax`); anything else uses candle ops. Half types
/// are computed in f32.
pub fn softmax_grad(op: &SoftmaxGrad, y: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    expect_float("softmax output", y)?;
    if y.dims() != dy.dims() || y.dtype() != dy.dtype() {
        return Err(KernelError::Unsupported(format!(
            "softmax_grad: output {} and gradient {} must have one shape and dtype",
            crate::dtype::describe(y),
            crate::dtype::describe(dy)
        )));
    }
    if op.axis >= y.rank() {
        return Err(KernelError::Unsupported(format!(
            "softmax_grad: axis {} out of range for {:?}",
            op.axis,
            y.dims()
        )));
    }
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() && crate::cuda::softmax::run::supports(y, op.axis) {
        return crate::cuda::softmax::run::softmax_grad(op.axis, y, dy);
    }
    let (dtype, acc) = (y.dtype(), accum_dtype(y.dtype()));
    let (yf, dyf) = (y.to_dtype(acc)?, dy.to_dtype(acc)?);
    if op.axis + 1 == y.rank() && y.device().is_cpu() {
        return Ok(cpu_attention_grad::softmax_grad_last_dim(&yf, &dyf)?.to_dtype(dtype)?);
    }
    let dot = (&yf * &dyf)?.sum_keepdim(op.axis)?;
    Ok((yf * dyf.broadcast_sub(&dot)?)?.to_dtype(dtype)?)
}

/// `zeros([size, rest]).index_add(rows, src, 0)` in `src`'s accumulation dtype (f32 for half
/// types, so repeated rows add up without half-precision rounding).
fn scatter_rows(rows: Vec<u32>, src: &Tensor, size: usize) -> KernelResult<Tensor> {
    let acc = accum_dtype(src.dtype());
    let (n, rest) = src.dims2()?;
    let idx = Tensor::from_vec(rows, n, src.device())?;
    let zeros = Tensor::zeros((size, rest), acc, src.device())?;
    Ok(zeros.index_add(&idx, &src.to_dtype(acc)?.contiguous()?, 0)?)
}

/// Backward of [`rel_pos_gather`]: `dy [q, k, C] -> dtable [table_len, C]`. Each `dy[i, j]` is
/// added to the resized-table row the forward read; when the forward resized the table
/// (`table_len != 2 max(q, k) - 1`), the result goes back through the transposed interpolation
/// matrix, in f64 like the forward's resize.
pub fn rel_pos_gather_grad(op: &RelPosGatherGrad, dy: &Tensor) -> KernelResult<Tensor> {
    expect_float("gradient", dy)?;
    let (q, k, l) = (op.q_size, op.k_size, op.table_len);
    let dims = dy.dims();
    if q == 0 || k == 0 || l == 0 || dims.len() != 3 || dims[..2] != [q, k] {
        return Err(KernelError::Unsupported(format!(
            "rel_pos_gather_grad: gradient must be [{q}, {k}, C] for table_len {l}, found {}",
            crate::dtype::describe(dy)
        )));
    }
    let c = dims[2];
    let target = 2 * q.max(k) - 1;
    // With q == k the row read for (i, j) is i - j + k - 1: a diagonal sum.
    let g = if q == k && !dy.device().is_cpu() {
        rel_pos_gather_grad_by_diagonals(dy)?
    } else {
        scatter_rows(rel_pos_gather_rows(q, k), &dy.reshape((q * k, c))?, target)?
    };
    let g = if l != target {
        // Forward: resized = M table with M [target, l]; adjoint: dtable = M^T g.
        let m = Tensor::from_vec(linear_interp_matrix(l, target), (target, l), dy.device())?;
        m.t()?.contiguous()?.matmul(&g.to_dtype(DType::F64)?)?
    } else {
        g
    };
    Ok(g.to_dtype(dy.dtype())?)
}

/// Backward of [`rel_pos_bias`]: `dy [heads, n, n] -> dtable [(2h-1)(2w-1), heads]`, each
/// `dy[:, i, j]` added to the table row of the pair's relative offset.
pub fn rel_pos_bias_grad(op: &RelPosBiasGrad, dy: &Tensor) -> KernelResult<Tensor> {
    expect_float("gradient", dy)?;
    let [h, w] = op.window;
    let n = h * w;
    let (heads, n1, n2) = dy.dims3()?;
    if n == 0 || n1 != n || n2 != n {
        return Err(KernelError::Unsupported(format!(
            "rel_pos_bias_grad: gradient [{heads}, {n1}, {n2}] does not fit window {:?}",
            op.window
        )));
    }
    if !dy.device().is_cpu() {
        return Ok(rel_pos_bias_grad_by_diagonals(dy, [h, w])?.to_dtype(dy.dtype())?);
    }
    let src = dy.permute((1, 2, 0))?.reshape((n * n, heads))?;
    Ok(scatter_rows(rel_pos_bias_rows(h, w), &src, op.table_len())?.to_dtype(dy.dtype())?)
}

/// The scatter of [`rel_pos_gather_grad`] for `q == k` (row `i - j + k - 1`), in the
/// accumulation dtype, as [`diagonal_sums`].
fn rel_pos_gather_grad_by_diagonals(dy: &Tensor) -> candle_core::Result<Tensor> {
    diagonal_sums(&dy.to_dtype(accum_dtype(dy.dtype()))?.unsqueeze(0)?)?.squeeze(0)
}

/// [`rel_pos_bias_grad`] in the accumulation dtype as [`diagonal_sums`]: the table row is
/// `(yi - yj + h - 1) (2w - 1) + (xi - xj + w - 1)`, so sum the diagonals of the rows' pairs,
/// then of the columns'.
fn rel_pos_bias_grad_by_diagonals(dy: &Tensor, [h, w]: [usize; 2]) -> candle_core::Result<Tensor> {
    let heads = dy.dim(0)?;
    let t = dy
        .to_dtype(accum_dtype(dy.dtype()))?
        .reshape((heads, h, w, h, w))?
        .permute((1, 3, 2, 4, 0))?
        .reshape((1, h, h, w * w * heads))?;
    let t = diagonal_sums(&t)?.reshape((2 * h - 1, w, w, heads))?;
    diagonal_sums(&t)?.reshape(((2 * h - 1) * (2 * w - 1), heads))
}

/// `t [A, n, m, B] -> out [A, n + m - 1, B]` with `out[a, i - j + m - 1, b]` the sum of every
/// `t[a, i, j, b]`, as a few dense ops: the columns reversed (`j' = m - 1 - j`, so the output
/// index is `i + j'`), each row padded with `n` zeros, and the flat rows re-read one element
/// shorter, which shifts row `i` right by `i` (what wraps in from the row above is padding);
/// the sum over `i` is then the output. Sums run in `t`'s dtype, in order of `i`.
fn diagonal_sums(t: &Tensor) -> candle_core::Result<Tensor> {
    let (a, n, m, b) = t.dims4()?;
    let reversed = Tensor::from_vec((0..m as u32).rev().collect::<Vec<_>>(), m, t.device())?;
    let padded = t.index_select(&reversed, 2)?.pad_with_zeros(2, 0, n)?;
    padded
        .reshape((a, n * (n + m), b))?
        .narrow(1, 0, n * (n + m - 1))?
        .reshape((a, n, n + m - 1, b))?
        .sum(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Small integers, so every sum is exact whatever its order.
    fn integers(dims: &[usize], seed: u32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n as u32)
            .map(|i| ((i * 7919 + seed * 104729) % 17) as f32 - 8.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// The device path, run on the CPU, equals the CPU's `index_add` scatter exactly, for
    /// detectron2's window (14) and a small global size, and BEiT's windows.
    #[test]
    fn diagonal_sums_are_the_scatters() {
        for (n, c) in [(14, 64), (5, 3), (1, 4)] {
            let dy = integers(&[n, n, c], n as u32);
            let scatter = scatter_rows(rel_pos_gather_rows(n, n), &dy.reshape((n * n, c)).unwrap(), 2 * n - 1).unwrap();
            let ours = rel_pos_gather_grad_by_diagonals(&dy).unwrap();
            assert_eq!(ours.dims(), scatter.dims());
            assert_eq!(
                super::super::f64_values(&ours),
                super::super::f64_values(&scatter),
                "q = k = {n}"
            );
        }
        for (h, w, heads) in [(3, 4, 2), (7, 7, 3), (1, 2, 1)] {
            let n = h * w;
            let dy = integers(&[heads, n, n], (h * w) as u32);
            let op = RelPosBias { window: [h, w] };
            let src = dy.permute((1, 2, 0)).unwrap().reshape((n * n, heads)).unwrap();
            let scatter = scatter_rows(rel_pos_bias_rows(h, w), &src, op.table_len()).unwrap();
            let ours = rel_pos_bias_grad_by_diagonals(&dy, [h, w]).unwrap();
            assert_eq!(ours.dims(), scatter.dims());
            assert_eq!(
                super::super::f64_values(&ours),
                super::super::f64_values(&scatter),
                "window {h}x{w}"
            );
        }
    }

    /// Not a tautology: the sums do depend on which diagonal each element lands on.
    #[test]
    fn diagonal_sums_place_each_element_on_its_offset() {
        let mut v = vec![0f32; 9];
        v[2] = 1.0; // (i, j) = (0, 2): row 0 - 2 + 2 = 0
        v[3] = 10.0; // (1, 0): row 1 - 0 + 2 = 3
        let t = Tensor::from_vec(v, (1, 3, 3, 1), &Device::Cpu).unwrap();
        let out = diagonal_sums(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(out, vec![1.0, 0.0, 0.0, 10.0, 0.0]);
    }
}
