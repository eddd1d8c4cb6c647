//! `linear` for f16 / bf16 on cuBLASLt with the bias added in the GEMM's epilogue (one kernel
//! instead of candle's GEMM plus a broadcast add over the whole output). f32 stays on candle's
//! cuBLAS path: cuBLASLt through cudarc computes f32 with TF32, which the runtime's f32
//! numerics do not allow.
//!
//! Row-major `y [M, N] = x [M, K] w^T` is, in cuBLASLt's column-major terms,
//! `Y' [N, M] = W'^T X'` with `W' = w` viewed `[K, N]` and `X' = x` viewed `[K, M]`: A = W'
//! transposed, B = X', the bias a per-row vector of Y' (one per output feature).

use std::sync::{Arc, OnceLock};

use candle_core::cuda_backend::cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Tensor};

use super::device::{cuda_device, tensor, view, warn_once, Cache};
use crate::kernels::{KernelError, KernelResult};

/// One cuBLASLt handle (and its workspace) per device.
fn handle(dev: &candle_core::cuda_backend::CudaDevice) -> KernelResult<Arc<CudaBlasLT>> {
    static HANDLES: Cache<String, Arc<CudaBlasLT>> = OnceLock::new();
    let key = format!("{:?}", dev.id());
    let mut handles = HANDLES.get_or_init(Default::default).lock().expect("cuBLASLt handles");
    if let Some(h) = handles.get(&key) {
        return Ok(h.clone());
    }
    let h =
        Arc::new(CudaBlasLT::new(dev.cuda_stream()).map_err(|e| KernelError::Unsupported(format!("cuBLASLt: {e:?}")))?);
    handles.insert(key, h.clone());
    Ok(h)
}

/// Whether [`linear_bias`] takes these operands.
pub fn supports(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    matches!(x.dtype(), DType::F16 | DType::BF16)
        && w.dtype() == x.dtype()
        && b.dtype() == x.dtype()
        && x.device().is_cuda()
        && w.rank() == 2
        && b.dims() == [w.dims()[0]]
}

/// [`linear_bias`], or `None` when cuBLASLt refuses the problem (no handle, no algorithm for
/// the shapes): the caller then runs it as candle's cuBLAS GEMM plus a bias add, and stderr
/// says so once per refusal.
pub fn linear_bias_or_none(x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Option<Tensor>> {
    match linear_bias(x, w, b) {
        Ok(y) => Ok(Some(y)),
        Err(KernelError::Unsupported(why)) => {
            warn_once(&why, "this linear runs on cuBLAS and a bias add instead");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `y = x @ w^T + b` for `x [..., K]`, `w [N, K]`, `b [N]` (see [`supports`]).
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
    match x.dtype() {
        DType::F16 => linear_t::<half::f16>(x, w, b),
        DType::BF16 => linear_t::<half::bf16>(x, w, b),
        d => Err(KernelError::Unsupported(format!(
            "cuBLASLt linear takes f16 or bf16, not {d:?}"
        ))),
    }
}

fn linear_t<T>(x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor>
where
    T: CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    CudaBlasLT: Matmul<T>,
{
    let dev = cuda_device(x)?;
    let (n, k) = w.dims2()?;
    let m = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    if m == 0 || n == 0 || k == 0 {
        // No rows, no output features, or an empty contraction (y = b): nothing for cuBLASLt.
        return Ok(b.broadcast_as(dims)?.contiguous()?);
    }
    let (x, w, b) = (aligned(x)?, aligned(w)?, aligned(b)?);
    // beta = 0: cuBLASLt writes every element without reading it.
    let mut y = unsafe { dev.alloc::<T>(m * n) }?;
    {
        let ((xs, xl), (ws, wl), (bs, bl)) = (x.storage_and_layout(), w.storage_and_layout(), b.storage_and_layout());
        let (xv, wv, bv) = (view::<T>(&xs, xl)?, view::<T>(&ws, wl)?, view::<T>(&bs, bl)?);
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        unsafe { handle(&dev)?.matmul(cfg, &wv, &xv, &mut y, Some(&bv), None) }
            .map_err(|e| KernelError::Unsupported(format!("cuBLASLt linear [{m}, {k}] x [{n}, {k}]^T: {e:?}")))?;
    }
    Ok(tensor(y, dims, &dev))
}

/// `t` contiguous and starting on a 256-byte boundary: cuBLASLt's heuristics assume the
/// default minimum alignment of its operands, which a view into a larger buffer need not have.
fn aligned(t: &Tensor) -> KernelResult<Tensor> {
    let offset_bytes = t.layout().start_offset() * t.dtype().size_in_bytes();
    if t.is_contiguous() && offset_bytes.is_multiple_of(256) {
        Ok(t.clone())
    } else {
        Ok(t.force_contiguous()?)
    }
}
