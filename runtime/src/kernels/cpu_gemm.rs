//! Batched products of small matrices on the CPU.
//!
//! candle's CPU matmul runs one `gemm` call per batch element, each split over every thread.
//! For the many small products of attention (`[196, 64] @ [64, 196]` per window-head), the
//! threads then meet at a barrier tens of thousands of times per call and spend more time
//! waking each other than multiplying. [`BatchedGemm`] makes the same single-threaded `gemm`
//! call per element and splits the batch over rayon tasks instead. Each element is the same
//! call candle makes (`gemm` splits work over threads by output blocks, so the arithmetic of an
//! element does not depend on the parallelism): the results are candle's, bit for bit.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu::SendPtr;

/// Largest product (`m * n * k` multiply-adds) still split over the batch rather than inside
/// each `gemm`: up to about 0.3 ms of work on one core, enough to amortize a task's
/// scheduling, small enough that a batch of them spreads evenly over the threads. Larger ones
/// (global attention's `[4096, 64] @ [64, 4096]`) keep candle's split of each product, whose
/// per-product synchronization is then small beside the product.
const MAX_SMALL_PRODUCT: usize = 1 << 23;

/// Whether [`batched_matmul`] takes `a [b, m, k] @ b [b, k, n]`: a CPU f32 / f64 batch of at
/// least two small products.
pub(crate) fn applies(a: &Tensor, b: &Tensor) -> bool {
    let (Ok((nb, m, k)), Ok((_, _, n))) = (a.dims3(), b.dims3()) else {
        return false;
    };
    a.device().is_cpu()
        && matches!(a.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && a.dtype() == b.dtype()
        && nb >= 2
        && m * n * k <= MAX_SMALL_PRODUCT
}

/// `a [b, m, k] @ b [b, k, n] -> [b, m, n]` (contiguous) for operands whose two inner dims are
/// tight row- or column-major, any batch stride (0 for a broadcast operand).
pub(crate) fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.apply_op2_no_bwd(b, &BatchedGemm)
}

struct BatchedGemm;

/// One operand's data from its first element, and its (batch, row, column) strides.
struct Operand<'a, T> {
    data: &'a [T],
    strides: [isize; 3],
}

fn operand<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<Operand<'a, T>> {
    let st = l.stride();
    if st.len() != 3 {
        bail!("batched gemm: expected a rank-3 operand, found strides {st:?}");
    }
    Ok(Operand {
        data: &s.as_slice::<T>()?[l.start_offset()..],
        strides: [st[0] as isize, st[1] as isize, st[2] as isize],
    })
}

fn run<T: WithDType + 'static>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(Vec<T>, Shape)> {
    let (nb, m, k) = l1.shape().dims3()?;
    let (nb2, k2, n) = l2.shape().dims3()?;
    if nb != nb2 || k != k2 {
        bail!("batched gemm: [{nb}, {m}, {k}] @ [{nb2}, {k2}, {n}]");
    }
    let (a, b) = (operand::<T>(s1, l1)?, operand::<T>(s2, l2)?);
    let mut dst = vec![T::zero(); nb * m * n];
    let out = SendPtr(dst.as_mut_ptr());
    (0..nb).into_par_iter().for_each(|i| {
        let i = i as isize;
        // SAFETY: element `i` reads its operand matrices (inside the storages, as the layouts
        // say) and writes only its own `m * n` block of `dst`.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.get().offset(i * (m * n) as isize),
                1,
                n as isize,
                false,
                a.data.as_ptr().offset(i * a.strides[0]),
                a.strides[2],
                a.strides[1],
                b.data.as_ptr().offset(i * b.strides[0]),
                b.strides[2],
                b.strides[1],
                T::zero(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    Ok((dst, Shape::from((nb, m, n))))
}

impl CustomOp2 for BatchedGemm {
    fn name(&self) -> &'static str {
        "batched-gemm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (v, s) = run::<f32>((s1, l1), (s2, l2))?;
                Ok((CpuStorage::F32(v), s))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (v, s) = run::<f64>((s1, l1), (s2, l2))?;
                Ok((CpuStorage::F64(v), s))
            }
            _ => bail!("batched gemm: f32 or f64 operands of one dtype expected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{applies, batched_matmul};

    /// The batch-split products equal candle's matmul bit for bit, for row- and column-major
    /// operands and a broadcast (stride-0) lhs batch, in f32 and f64.
    #[test]
    fn equals_candle_matmul_bit_for_bit() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // Inner sizes from one k block to several (the attention's 64, 196 and longer sums).
        for (dtype, (nb, m, k, n)) in [
            (DType::F32, (5, 37, 64, 29)),
            (DType::F64, (5, 37, 64, 29)),
            (DType::F32, (3, 196, 196, 64)),
            (DType::F32, (2, 64, 1500, 48)),
            (DType::F64, (2, 33, 900, 70)),
        ] {
            let a = Tensor::randn(0f32, 1.0, (nb, m, k), &dev)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1.0, (nb, k, n), &dev)?.to_dtype(dtype)?;
            let bt = Tensor::randn(0f32, 1.0, (nb, n, k), &dev)?
                .to_dtype(dtype)?
                .transpose(1, 2)?;
            let at = Tensor::randn(0f32, 1.0, (nb, k, m), &dev)?
                .to_dtype(dtype)?
                .transpose(1, 2)?;
            let a1 = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?
                .to_dtype(dtype)?
                .broadcast_as((nb, m, k))?;
            for (x, y) in [(&a, &b), (&a, &bt), (&at, &b), (&at, &bt), (&a1, &b)] {
                assert!(applies(x, y));
                let ours = batched_matmul(x, y)?;
                let theirs = x.matmul(y)?;
                assert_eq!(ours.dims(), theirs.dims());
                let diff = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?;
                assert_eq!(diff.to_scalar::<f64>()?, 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn leaves_large_or_single_products_to_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let small = Tensor::zeros((1, 8, 8), DType::F32, &dev)?;
        assert!(!applies(&small, &small), "one product: candle splits it over threads");
        let big = Tensor::zeros((2, 512, 512), DType::F32, &dev)?;
        assert!(!applies(&big, &big), "512^3 products: candle splits each over threads");
        let half = Tensor::zeros((4, 8, 8), DType::BF16, &dev)?;
        assert!(!applies(&half, &half), "bf16 is computed in f32 by the caller");
        Ok(())
    }
}
