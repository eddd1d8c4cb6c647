//! Contractions: `linear` and batched `matmul`, on candle's matmul (the `gemm` crate on the CPU,
//! cuBLAS on CUDA). On CUDA, f16 / bf16 `linear` with a bias runs on cuBLASLt with the bias in
//! the GEMM epilogue (`crate::cuda::linear`), or on cuBLAS where cuBLASLt refuses it.
//!
//! Both backends need each operand's two innermost dims to be "tight": row-major (strides
//! `[cols, 1]`) or column-major (strides `[1, rows]`), and the batch dims to collapse to one
//! stride (possibly 0, for a broadcast operand). The kernels reshape operands to rank 2 or 3 so
//! that this always holds, and express `transpose_lhs`, `transpose_rhs` and `w^T` as column-major
//! views (no copy).

use candle_core::{DType, Tensor};
use vitdet_ir::ops::MatMul;

use super::{contraction_needs_f32, cpu_gemm, expect_float, KernelError, KernelResult};

/// `t` itself when its two innermost dims are tight row- or column-major, else a contiguous copy.
pub(crate) fn gemm_operand(t: &Tensor) -> candle_core::Result<Tensor> {
    let r = t.rank();
    let (d, s) = (t.dims(), t.stride());
    let (rows, cols, rs, cs) = (d[r - 2], d[r - 1], s[r - 2], s[r - 1]);
    let row_major = (cs == 1 || cols == 1) && (rs == cols || rows == 1);
    let col_major = (rs == 1 || rows == 1) && (cs == rows || cols == 1);
    if row_major || col_major {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// `t [..., r, c]` reshaped to `shape` (`[lead..., r, c]`: the batch dims merged or split, the
/// last two kept): candle's `reshape` copies every non-contiguous tensor, so a batch of
/// column-major matrices (the transposed view `x.t()` of a contiguous `x`) is reshaped through
/// its transpose instead and stays a view; `gemm_operand` takes it as it is.
fn batched(t: &Tensor, shape: &[usize]) -> candle_core::Result<Tensor> {
    let (r, q) = (t.rank(), shape.len());
    if t.dims() == shape {
        return Ok(t.clone());
    }
    if t.is_contiguous() || r < 2 || q < 2 || t.dims()[r - 2..] != shape[q - 2..] {
        return t.reshape(shape);
    }
    let tt = t.transpose(r - 2, r - 1)?;
    if !tt.is_contiguous() {
        return t.reshape(shape);
    }
    let mut swapped = shape.to_vec();
    swapped.swap(q - 2, q - 1);
    tt.reshape(swapped)?.transpose(q - 2, q - 1)
}

/// Runs `f` on the operands converted to f32 when the contraction cannot run in their dtype
/// (bf16 on the CPU), and rounds the result back.
pub(crate) fn with_contraction_dtype(
    ops: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> KernelResult<Tensor>,
) -> KernelResult<Tensor> {
    if contraction_needs_f32(ops[0]) {
        let dtype = ops[0].dtype();
        let up: Vec<Tensor> = ops.iter().map(|t| t.to_dtype(DType::F32)).collect::<Result<_, _>>()?;
        Ok(f(&up)?.to_dtype(dtype)?)
    } else {
        f(&ops.iter().map(|t| (*t).clone()).collect::<Vec<_>>())
    }
}

/// `y = x @ w^T + b`: `x [..., in]` is viewed as one `[M, in]` matrix (free when contiguous), `w`
/// `[out, in]` is used through its transposed view, and the bias is added with one broadcast add.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    let dims = x.dims().to_vec();
    let (inp, out) = (*dims.last().unwrap(), w.dim(0)?);
    if w.dims() != [out, inp] {
        return Err(KernelError::Unsupported(format!(
            "weight {:?} does not fit input {:?}",
            w.dims(),
            dims
        )));
    }
    #[cfg(feature = "cuda")]
    if let Some(b) = b.filter(|b| crate::cuda::linear::supports(x, w, b)) {
        if let Some(y) = crate::cuda::linear::linear_bias_or_none(x, w, b)? {
            return Ok(y);
        }
    }
    let mut ops = vec![x, w];
    ops.extend(b);
    with_contraction_dtype(&ops, |t| {
        let rows = t[0].elem_count() / inp.max(1);
        let x2 = batched(&t[0], &[rows, inp])?;
        let x2 = gemm_operand(&x2)?;
        let wt = gemm_operand(&t[1].t()?)?;
        let mut y = x2.matmul(&wt)?;
        if let Some(b) = t.get(2) {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims.clone();
        *out_dims.last_mut().unwrap() = out;
        Ok(y.reshape(out_dims)?)
    })
}

/// Batched `a [..., m, k] @ b [..., k, n]` (`a [..., k, m]`, `b [..., n, k]` used transposed
/// with the op's flags) with broadcast batch dims. An rhs without batch dims is folded: the lhs
/// batch becomes matrix rows (one gemm). A broadcast operand with a single batch element uses a
/// stride-0 batch view (no copy); only partially broadcast batch shapes are materialized. On the
/// CPU, a batch of small products is split over threads by element (`cpu_gemm`).
pub fn matmul(op: &MatMul, a: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    expect_float("lhs", a)?;
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || rb < 2 {
        return Err(KernelError::Unsupported(format!(
            "matmul needs rank >= 2, found {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let ((m, k), (bk, n)) = (op.lhs_dims(a.dims()), op.rhs_dims(b.dims()));
    if k != bk {
        return Err(KernelError::Unsupported(format!(
            "inner dimensions differ: {:?} @ {:?} (transpose_lhs={}, transpose_rhs={})",
            a.dims(),
            b.dims(),
            op.transpose_lhs,
            op.transpose_rhs
        )));
    }
    // A transposed lhs is a column-major view, which the paths below keep without a copy
    // where its batch allows (see `batched`).
    let a = &if op.transpose_lhs {
        a.transpose(ra - 2, ra - 1)?
    } else {
        a.clone()
    };
    let batch_a = a.dims()[..ra - 2].to_vec();
    let batch_b = b.dims()[..rb - 2].to_vec();
    let batch = vitdet_ir::ops::broadcast_shapes(&batch_a, &batch_b)
        .map_err(|e| KernelError::Unsupported(format!("matmul batch dims: {e}")))?;
    let (nb, nb_a, nb_b) = (prod(&batch), prod(&batch_a), prod(&batch_b));
    let rhs_mat = |t: &Tensor, lead: &[usize]| -> candle_core::Result<Tensor> {
        // `t` as [lead..., k, n], a transposed view when `transpose_rhs`.
        let mut s = lead.to_vec();
        if op.transpose_rhs {
            s.extend([n, k]);
            batched(t, &s)?.transpose(lead.len(), lead.len() + 1)
        } else {
            s.extend([k, n]);
            batched(t, &s)
        }
    };
    let mut out_dims = batch.clone();
    out_dims.extend([m, n]);
    with_contraction_dtype(&[a, b], |t| {
        let (a, b) = (&t[0], &t[1]);
        let y = if nb_b == 1 {
            // One rhs matrix for every batch element: fold the lhs batch into its rows.
            let a2 = if nb_a == 1 {
                batched(a, &[m, k])?
            } else {
                a.reshape((nb_a * m, k))?
            };
            let a2 = gemm_operand(&a2)?;
            let b2 = gemm_operand(&rhs_mat(b, &[])?)?;
            a2.matmul(&b2)?
        } else {
            let lhs = if nb_a == nb {
                batched(a, &[nb, m, k])?
            } else if nb_a == 1 {
                batched(a, &[1, m, k])?.broadcast_as((nb, m, k))?
            } else {
                let mut full = batch.clone();
                full.extend([m, k]);
                a.broadcast_as(full)?.contiguous()?.reshape((nb, m, k))?
            };
            let rhs = if nb_b == nb {
                rhs_mat(b, &[nb])?
            } else {
                // nb_b > 1 here, so a partial broadcast: materialize it.
                let mut full = batch.clone();
                let mut bd = b.dims()[rb - 2..].to_vec();
                full.append(&mut bd);
                rhs_mat(&b.broadcast_as(full)?.contiguous()?, &[nb])?
            };
            let (lhs, rhs) = (gemm_operand(&lhs)?, gemm_operand(&rhs)?);
            if cpu_gemm::applies(&lhs, &rhs) {
                cpu_gemm::batched_matmul(&lhs, &rhs)?
            } else {
                lhs.matmul(&rhs)?
            }
        };
        Ok(y.reshape(out_dims.clone())?)
    })
}

fn prod(s: &[usize]) -> usize {
    s.iter().product()
}
