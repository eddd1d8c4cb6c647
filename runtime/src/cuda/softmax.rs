//! Launch geometry and parameters of the softmax kernels (`kernels/softmax.cu`), shared by the
//! CUDA path and the host emulator.
//!
//! The input is seen as `[outer, n, inner]` with `n` the softmax axis. The last axis
//! (`inner == 1`) runs `softmax_rows` / `softmax_grad_rows`: one block per row, blocks striding
//! over rows. Other axes run `softmax_cols` / `softmax_grad_cols`: one thread per
//! `(outer, inner)` column. One launch per op either way.

use super::sources::Module;
use super::Launch;

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels/softmax.cu");

/// Largest block of the row kernels (`SOFTMAX_MAX_THREADS` in the source: their shared
/// reduction arrays).
pub const MAX_ROW_THREADS: u32 = 256;
/// Most blocks a row launch starts; further rows are taken by the same blocks in turn.
pub const MAX_ROW_BLOCKS: usize = 1 << 20;
/// Threads per block of the column kernels.
pub const COLUMN_THREADS: u32 = 256;

/// The softmax module with every dtype's entry points (`.for_dtype` narrows it to one).
pub fn module() -> Module {
    Module::plain("softmax", SOURCE)
}

/// A tensor's extents around the softmax axis (`struct SoftmaxDims` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftmaxDims {
    pub outer: i64,
    /// The softmax axis.
    pub n: i64,
    pub inner: i64,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for SoftmaxDims {}

impl SoftmaxDims {
    /// The extents of a contiguous tensor of `dims` around `axis`, or why the kernels cannot
    /// take it.
    pub fn new(dims: &[usize], axis: usize) -> Result<SoftmaxDims, String> {
        if axis >= dims.len() {
            return Err(format!("softmax axis {axis} out of range for {dims:?}"));
        }
        let n = dims[axis];
        // The row kernels index within a row with 32-bit ints.
        if n > i32::MAX as usize {
            return Err(format!(
                "softmax axis of {n} elements exceeds the kernels' 32-bit row indexing"
            ));
        }
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        Ok(SoftmaxDims {
            outer: outer as i64,
            n: n as i64,
            inner: inner as i64,
        })
    }

    /// Whether the axis is the last one (the row kernels run).
    pub fn rows(&self) -> bool {
        self.inner == 1
    }

    pub fn elems(&self) -> usize {
        (self.outer * self.n * self.inner) as usize
    }

    /// Threads per row: a power of two giving each thread about four elements, within
    /// 32..=[`MAX_ROW_THREADS`] (64 for the 196-token window rows, 256 for 4096-token rows).
    pub fn row_threads(&self) -> u32 {
        let per_four = (self.n as usize).div_ceil(4).next_power_of_two() as u32;
        per_four.clamp(32, MAX_ROW_THREADS)
    }

    /// The launch of the kernel [`SoftmaxDims::kernel`] names.
    pub fn launch(&self) -> Launch {
        if self.rows() {
            Launch::linear((self.outer as usize).clamp(1, MAX_ROW_BLOCKS), self.row_threads())
        } else {
            Launch::covering((self.outer * self.inner) as usize, COLUMN_THREADS)
        }
    }

    /// The kernel's name for `op` (`softmax` or `softmax_grad`), without the dtype suffix.
    pub fn kernel(&self, op: &str) -> String {
        format!("{op}_{}", if self.rows() { "rows" } else { "cols" })
    }
}

/// The kernels on candle CUDA tensors.
#[cfg(feature = "cuda")]
pub mod run {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};

    use super::{module, SoftmaxDims};
    use crate::cuda::device::{config, cuda_device, function, suffix, tensor, view};
    use crate::kernels::{KernelError, KernelResult};

    /// Whether the kernels take a softmax of `x` along `axis` (f32/f16/bf16, extents that fit);
    /// the caller runs the candle-op kernel otherwise.
    pub fn supports(x: &Tensor, axis: usize) -> bool {
        suffix(x.dtype()).is_ok() && SoftmaxDims::new(x.dims(), axis).is_ok()
    }

    fn dims(x: &Tensor, axis: usize) -> KernelResult<SoftmaxDims> {
        SoftmaxDims::new(x.dims(), axis).map_err(|m| KernelError::Unsupported(format!("softmax on CUDA: {m}")))
    }

    /// Softmax of `x` along `axis`, in `x`'s dtype.
    pub fn softmax(axis: usize, x: &Tensor) -> KernelResult<Tensor> {
        let d = dims(x, axis)?;
        if d.elems() == 0 {
            return Ok(x.clone());
        }
        let x = x.contiguous()?;
        match x.dtype() {
            DType::F32 => softmax_t::<f32>(d, &x),
            DType::F16 => softmax_t::<half::f16>(d, &x),
            DType::BF16 => softmax_t::<half::bf16>(d, &x),
            t => Err(KernelError::Unsupported(format!("softmax on CUDA: dtype {t:?}"))),
        }
    }

    fn softmax_t<T: CudaDType + DeviceRepr>(d: SoftmaxDims, x: &Tensor) -> KernelResult<Tensor> {
        let dev = cuda_device(x)?;
        let f = function(
            &dev,
            &module().for_dtype(x.dtype()),
            &format!("{}_{}", d.kernel("softmax"), suffix(x.dtype())?),
        )?;
        // Every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(d.elems()) }?;
        {
            let (xs, xl) = x.storage_and_layout();
            let xv = view::<T>(&xs, xl)?;
            let mut l = f.builder();
            l.arg(&xv).arg(&mut y).arg(&d);
            unsafe { l.launch(config(d.launch(), 0)) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(tensor(y, x.dims(), &dev))
    }

    /// Softmax backward `y * (dy - sum(y * dy, axis))` from the output `y` and its gradient
    /// `dy` (one shape and dtype, checked by the caller).
    pub fn softmax_grad(axis: usize, y: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
        let d = dims(y, axis)?;
        if d.elems() == 0 {
            return Ok(y.clone());
        }
        let (y, dy) = (y.contiguous()?, dy.contiguous()?);
        match y.dtype() {
            DType::F32 => softmax_grad_t::<f32>(d, &y, &dy),
            DType::F16 => softmax_grad_t::<half::f16>(d, &y, &dy),
            DType::BF16 => softmax_grad_t::<half::bf16>(d, &y, &dy),
            t => Err(KernelError::Unsupported(format!("softmax_grad on CUDA: dtype {t:?}"))),
        }
    }

    fn softmax_grad_t<T: CudaDType + DeviceRepr>(d: SoftmaxDims, y: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
        let dev = cuda_device(y)?;
        let f = function(
            &dev,
            &module().for_dtype(y.dtype()),
            &format!("{}_{}", d.kernel("softmax_grad"), suffix(y.dtype())?),
        )?;
        // Every element is written by the kernel.
        let mut dx = unsafe { dev.alloc::<T>(d.elems()) }?;
        {
            let (ys, yl) = y.storage_and_layout();
            let (gs, gl) = dy.storage_and_layout();
            let (yv, gv) = (view::<T>(&ys, yl)?, view::<T>(&gs, gl)?);
            let mut l = f.builder();
            l.arg(&yv).arg(&gv).arg(&mut dx).arg(&d);
            unsafe { l.launch(config(d.launch(), 0)) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(tensor(dx, y.dims(), &dev))
    }
}
