//! Launch geometry and parameters of the normalization kernels (`kernels/norm.cu`), shared by
//! the CUDA path and the host emulator.
//!
//! The input is viewed as `[outer, c, inner]` with `c` the channel axis. Which kernels run:
//!
//! * layer norm with `inner == 1` and group norm: `segments_fwd` / `segments_bwd`, one block per
//!   contiguous statistics segment;
//! * layer norm over a strided axis (`inner > 1`, e.g. channels of NCHW): `positions_fwd` /
//!   `positions_bwd`, one thread per `(outer, inner)` position;
//! * the backwards' `dweight`, `dbias` then come from `affine_grad_rows` (`inner == 1`) or
//!   `affine_grad_planes`, which read the statistics the `*_bwd` kernel stored;
//! * batch norm: `batch_fwd` (running statistics, one thread per element), `batch_train_fwd`
//!   and `batch_train_bwd` (one block per channel).

use super::sources::Module;
use super::Launch;

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels/norm.cu");

/// Largest block of the block-reduced kernels (`NORM_MAX_THREADS` in the source).
pub const MAX_THREADS: u32 = 1024;
/// Block of the one-thread-per-item kernels (`NORM_THREADS` in the source).
pub const THREADS: u32 = 256;
/// Rows each block of `affine_grad_rows` sums (before the grid's 65535-chunk cap).
pub const ROWS_PER_CHUNK: usize = 64;

/// The normalization module (no compile-time constants).
pub fn module() -> Module {
    Module::plain("norm", SOURCE)
}

/// The kernels' parameter block (`struct NormGeom` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormGeom {
    pub outer: i32,
    pub c: i32,
    pub inner: i32,
    /// Group norm's groups; 1 for layer and batch norm.
    pub groups: i32,
    /// 1 for layer norm over a strided axis (statistics per `(outer, inner)` position).
    pub per_position: i32,
    pub eps: f32,
    pub momentum: f32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for NormGeom {}

/// A block of a power of two threads, about 8 values each, for a reduction over `len` values.
fn reduction_block(len: usize) -> u32 {
    (len.div_ceil(8).next_power_of_two() as u32).clamp(32, MAX_THREADS)
}

impl NormGeom {
    /// `dims` viewed as `[outer, dims[axis], inner]`; every count the kernels index or launch
    /// with must fit 32 bits (the elements do, then all the others do).
    fn view(dims: &[usize], axis: usize) -> Result<NormGeom, String> {
        let c = *dims
            .get(axis)
            .ok_or_else(|| format!("axis {axis} out of range for {dims:?}"))?;
        let elems: usize = dims.iter().product();
        if elems == 0 {
            return Err(format!("input {dims:?} is empty"));
        }
        if elems > i32::MAX as usize {
            return Err(format!("input {dims:?} exceeds the kernels' 32-bit extents"));
        }
        Ok(NormGeom {
            outer: dims[..axis].iter().product::<usize>() as i32,
            c: c as i32,
            inner: dims[axis + 1..].iter().product::<usize>() as i32,
            groups: 1,
            per_position: 0,
            eps: 0.0,
            momentum: 0.0,
        })
    }

    /// Layer norm over `axis` of `dims`.
    pub fn layer(dims: &[usize], axis: usize, eps: f64) -> Result<NormGeom, String> {
        let g = NormGeom::view(dims, axis)?;
        Ok(NormGeom {
            per_position: (g.inner > 1) as i32,
            eps: eps as f32,
            ..g
        })
    }

    /// Group norm with `groups` groups on `[N, C, ...]`.
    pub fn group(dims: &[usize], groups: usize, eps: f64) -> Result<NormGeom, String> {
        if dims.len() < 2 {
            return Err(format!("group norm input must be [N, C, ...], found {dims:?}"));
        }
        if groups == 0 || !dims[1].is_multiple_of(groups) {
            return Err(format!("{groups} groups do not divide {} channels", dims[1]));
        }
        let g = NormGeom::view(dims, 1)?;
        Ok(NormGeom {
            groups: groups as i32,
            eps: eps as f32,
            ..g
        })
    }

    /// Batch norm on `[N, C, ...]` (`momentum` is used by `batch_train_fwd` only).
    pub fn batch(dims: &[usize], eps: f64, momentum: f64) -> Result<NormGeom, String> {
        if dims.len() < 2 {
            return Err(format!("batch norm input must be [N, C, ...], found {dims:?}"));
        }
        let g = NormGeom::view(dims, 1)?;
        Ok(NormGeom {
            eps: eps as f32,
            momentum: momentum as f32,
            ..g
        })
    }

    pub fn elems(&self) -> usize {
        self.outer as usize * self.c as usize * self.inner as usize
    }

    /// Values per channel of batch norm (`outer * inner`).
    pub fn per_channel(&self) -> usize {
        self.outer as usize * self.inner as usize
    }

    fn segments(&self) -> usize {
        self.outer as usize * self.groups as usize
    }

    fn segment_len(&self) -> usize {
        (self.c / self.groups) as usize * self.inner as usize
    }

    /// Whether layer norm runs the per-position kernels (statistics over a strided axis).
    pub fn by_position(&self) -> bool {
        self.per_position != 0
    }

    /// Entries of the mean and rstd buffers `*_bwd` writes: one per position or per segment.
    pub fn stats_len(&self) -> usize {
        if self.by_position() {
            self.outer as usize * self.inner as usize
        } else {
            self.segments()
        }
    }

    /// `segments_fwd`, `segments_bwd`: one block per segment.
    pub fn segments_launch(&self) -> Launch {
        Launch::linear(self.segments(), reduction_block(self.segment_len()))
    }

    /// `positions_fwd`, `positions_bwd`: one thread per position.
    pub fn positions_launch(&self) -> Launch {
        Launch::covering(self.outer as usize * self.inner as usize, THREADS)
    }

    /// Whether `dweight`, `dbias` come from `affine_grad_rows` (`inner == 1`) rather than
    /// `affine_grad_planes`.
    pub fn affine_grad_by_rows(&self) -> bool {
        self.inner == 1
    }

    /// `affine_grad_rows`: blocks of consecutive channels by chunks of rows.
    pub fn affine_grad_rows_launch(&self) -> Launch {
        let threads = (self.c as u32).next_power_of_two().clamp(32, THREADS);
        let chunks = (self.outer as usize).div_ceil(ROWS_PER_CHUNK).clamp(1, 65_535);
        Launch {
            grid: [(self.c as u32).div_ceil(threads), chunks as u32, 1],
            block: [threads, 1, 1],
        }
    }

    /// `affine_grad_planes`: one block per `(outer, channel)` plane.
    pub fn affine_grad_planes_launch(&self) -> Launch {
        Launch::linear(
            self.outer as usize * self.c as usize,
            reduction_block(self.inner as usize),
        )
    }

    /// `batch_fwd`: one thread per element.
    pub fn elements_launch(&self) -> Launch {
        Launch::covering(self.elems(), THREADS)
    }

    /// `batch_train_fwd`, `batch_train_bwd`: one block per channel.
    pub fn channels_launch(&self) -> Launch {
        Launch::linear(self.c as usize, reduction_block(self.per_channel()))
    }
}

/// The kernels on candle CUDA tensors, in the order the module doc gives. Every operand has the
/// input's dtype; `dweight`, `dbias` are accumulated in f32 and rounded once to it.
#[cfg(feature = "cuda")]
pub mod run {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{DType, Tensor};
    use vitdet_ir::ops::{
        BatchNorm, BatchNormTrain, BatchNormTrainGrad, GroupNorm, GroupNormGrad, LayerNorm, LayerNormGrad,
    };

    use super::{module, NormGeom};
    use crate::cuda::device::{config, cuda_device, function, launch_into_new, suffix, tensor, view, zeros, Kernel};
    use crate::kernels::{KernelError, KernelResult};

    /// Whether the kernels take these operands: f32, f16 or bf16, all of the first one's dtype,
    /// and a non-empty input within 32-bit extents; the caller runs its other path otherwise.
    pub fn supports(operands: &[&Tensor]) -> bool {
        let dtype = operands[0].dtype();
        suffix(dtype).is_ok()
            && operands.iter().all(|t| t.dtype() == dtype)
            && (1..=i32::MAX as usize).contains(&operands[0].elem_count())
    }

    fn geometry(g: Result<NormGeom, String>, what: &str) -> KernelResult<NormGeom> {
        g.map_err(|m| KernelError::Unsupported(format!("{what} on CUDA: {m}")))
    }

    /// `[x, per_channel.., like_x..]`, contiguous, after checking they all have `x`'s dtype, the
    /// per-channel operands (weights, biases, statistics) are `[c]` and the others (gradients)
    /// have `x`'s shape: what the kernels index them by.
    fn operands(
        what: &str,
        g: &NormGeom,
        x: &Tensor,
        per_channel: &[&Tensor],
        like_x: &[&Tensor],
    ) -> KernelResult<Vec<Tensor>> {
        let channels = [g.c as usize];
        let shaped = per_channel
            .iter()
            .map(|t| (*t, &channels[..]))
            .chain(like_x.iter().map(|t| (*t, x.dims())));
        let mut out = vec![x.contiguous()?];
        for (t, dims) in shaped {
            if t.dtype() != x.dtype() || t.dims() != dims {
                return Err(KernelError::Unsupported(format!(
                    "{what} on CUDA: operand {:?} {:?} must be {:?} {dims:?} (input {:?})",
                    t.dtype(),
                    t.dims(),
                    x.dtype(),
                    x.dims()
                )));
            }
            out.push(t.contiguous()?);
        }
        Ok(out)
    }

    /// A buffer of `len` (at least 1) elements that a kernel writes in full: no zero fill.
    fn written<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> KernelResult<CudaSlice<T>> {
        Ok(unsafe { dev.alloc::<T>(len) }?)
    }

    /// Entry point `norm_<name>` for `dtype`, from the module compiled for that dtype only.
    fn kernel(dev: &CudaDevice, name: &str, dtype: DType) -> KernelResult<Kernel> {
        function(
            dev,
            &module().for_dtype(dtype),
            &format!("norm_{name}_{}", suffix(dtype)?),
        )
    }

    /// Runs `f::<T>` for `dtype`.
    macro_rules! by_dtype {
        ($what:expr, $dtype:expr, $f:ident($($arg:expr),*)) => {
            match $dtype {
                DType::F32 => $f::<f32>($($arg),*),
                DType::F16 => $f::<half::f16>($($arg),*),
                DType::BF16 => $f::<half::bf16>($($arg),*),
                d => Err(KernelError::Unsupported(format!("{} on CUDA: dtype {d:?}", $what))),
            }
        };
    }

    /// `y` of layer norm (segments or positions) and group norm (segments).
    fn affine_fwd<T: CudaDType + DeviceRepr + ValidAsZeroBits>(g: NormGeom, x: &[Tensor]) -> KernelResult<Tensor> {
        let dev = cuda_device(&x[0])?;
        let (entry, launch) = if g.by_position() {
            ("positions_fwd", g.positions_launch())
        } else {
            ("segments_fwd", g.segments_launch())
        };
        let f = kernel(&dev, entry, x[0].dtype())?;
        // x, w, b.
        let inputs: Vec<&Tensor> = x.iter().collect();
        launch_into_new::<T, NormGeom>(&f, &inputs, g.elems(), &g, launch, x[0].dims())
    }

    /// `(dx, dweight, dbias)` of layer and group norm: the `*_bwd` kernel, then the affine sums.
    fn affine_bwd<T: CudaDType + DeviceRepr + ValidAsZeroBits>(g: NormGeom, x: &[Tensor]) -> KernelResult<Vec<Tensor>> {
        let dev = cuda_device(&x[0])?;
        let dtype = x[0].dtype();
        let (entry, launch) = if g.by_position() {
            ("positions_bwd", g.positions_launch())
        } else {
            ("segments_bwd", g.segments_launch())
        };
        let (sums, sums_launch) = if g.affine_grad_by_rows() {
            ("affine_grad_rows", g.affine_grad_rows_launch())
        } else {
            ("affine_grad_planes", g.affine_grad_planes_launch())
        };
        let f = kernel(&dev, entry, dtype)?;
        let fs = kernel(&dev, sums, dtype)?;
        let mut dx = written::<T>(&dev, g.elems())?;
        let mut mean = written::<f32>(&dev, g.stats_len())?;
        let mut rstd = written::<f32>(&dev, g.stats_len())?;
        let mut dw = zeros::<f32>(&dev, g.c as usize)?;
        let mut db = zeros::<f32>(&dev, g.c as usize)?;
        {
            let guards: Vec<_> = x.iter().map(|t| t.storage_and_layout()).collect();
            let v = guards
                .iter()
                .map(|(s, l)| view::<T>(s, l))
                .collect::<KernelResult<Vec<_>>>()?;
            let (xv, wv, dyv) = (&v[0], &v[1], &v[2]);
            let mut l = f.builder();
            l.arg(xv)
                .arg(wv)
                .arg(dyv)
                .arg(&mut dx)
                .arg(&mut mean)
                .arg(&mut rstd)
                .arg(&g);
            unsafe { l.launch(config(launch, 0)) }.map_err(candle_core::Error::wrap)?;
            let mut l = fs.builder();
            l.arg(xv)
                .arg(dyv)
                .arg(&mean)
                .arg(&rstd)
                .arg(&mut dw)
                .arg(&mut db)
                .arg(&g);
            unsafe { l.launch(config(sums_launch, 0)) }.map_err(candle_core::Error::wrap)?;
        }
        let c = g.c as usize;
        Ok(vec![
            tensor(dx, x[0].dims(), &dev),
            tensor(dw, c, &dev).to_dtype(dtype)?,
            tensor(db, c, &dev).to_dtype(dtype)?,
        ])
    }

    /// Layer norm over `op.axis`.
    pub fn layer_norm(op: &LayerNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
        let g = geometry(NormGeom::layer(x.dims(), op.axis, op.eps), "layer_norm")?;
        let x = operands("layer_norm", &g, x, &[w, b], &[])?;
        by_dtype!("layer_norm", x[0].dtype(), affine_fwd(g, &x))
    }

    /// Backward of layer norm: `(dx, dweight, dbias)`.
    pub fn layer_norm_grad(op: &LayerNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> KernelResult<Vec<Tensor>> {
        let g = geometry(NormGeom::layer(x.dims(), op.axis, op.eps), "layer_norm_grad")?;
        let x = operands("layer_norm_grad", &g, x, &[w], &[dy])?;
        by_dtype!("layer_norm_grad", x[0].dtype(), affine_bwd(g, &x))
    }

    /// Group norm.
    pub fn group_norm(op: &GroupNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> KernelResult<Tensor> {
        let g = geometry(NormGeom::group(x.dims(), op.groups, op.eps), "group_norm")?;
        let x = operands("group_norm", &g, x, &[w, b], &[])?;
        by_dtype!("group_norm", x[0].dtype(), affine_fwd(g, &x))
    }

    /// Backward of group norm: `(dx, dweight, dbias)`.
    pub fn group_norm_grad(op: &GroupNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> KernelResult<Vec<Tensor>> {
        let g = geometry(NormGeom::group(x.dims(), op.groups, op.eps), "group_norm_grad")?;
        let x = operands("group_norm_grad", &g, x, &[w], &[dy])?;
        by_dtype!("group_norm_grad", x[0].dtype(), affine_bwd(g, &x))
    }

    fn batch_fwd<T: CudaDType + DeviceRepr + ValidAsZeroBits>(g: NormGeom, x: &[Tensor]) -> KernelResult<Tensor> {
        let dev = cuda_device(&x[0])?;
        let f = kernel(&dev, "batch_fwd", x[0].dtype())?;
        // x, w, b, running mean, running variance.
        let inputs: Vec<&Tensor> = x.iter().collect();
        launch_into_new::<T, NormGeom>(&f, &inputs, g.elems(), &g, g.elements_launch(), x[0].dims())
    }

    /// Inference batch norm with running statistics.
    pub fn batch_norm(
        op: &BatchNorm,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        mean: &Tensor,
        var: &Tensor,
    ) -> KernelResult<Tensor> {
        let g = geometry(NormGeom::batch(x.dims(), op.eps, 0.0), "batch_norm")?;
        let x = operands("batch_norm", &g, x, &[w, b, mean, var], &[])?;
        by_dtype!("batch_norm", x[0].dtype(), batch_fwd(g, &x))
    }

    fn batch_train_fwd<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        g: NormGeom,
        x: &[Tensor],
    ) -> KernelResult<Vec<Tensor>> {
        let dev = cuda_device(&x[0])?;
        let f = kernel(&dev, "batch_train_fwd", x[0].dtype())?;
        let mut y = written::<T>(&dev, g.elems())?;
        let mut new_mean = written::<T>(&dev, g.c as usize)?;
        let mut new_var = written::<T>(&dev, g.c as usize)?;
        {
            let guards: Vec<_> = x.iter().map(|t| t.storage_and_layout()).collect();
            let v = guards
                .iter()
                .map(|(s, l)| view::<T>(s, l))
                .collect::<KernelResult<Vec<_>>>()?;
            let mut l = f.builder();
            l.arg(&v[0]).arg(&v[1]).arg(&v[2]).arg(&v[3]).arg(&v[4]);
            l.arg(&mut y).arg(&mut new_mean).arg(&mut new_var).arg(&g);
            unsafe { l.launch(config(g.channels_launch(), 0)) }.map_err(candle_core::Error::wrap)?;
        }
        let c = g.c as usize;
        Ok(vec![
            tensor(y, x[0].dims(), &dev),
            tensor(new_mean, c, &dev),
            tensor(new_var, c, &dev),
        ])
    }

    /// Training batch norm: `(y, new_running_mean, new_running_var)`.
    pub fn batch_norm_train(
        op: &BatchNormTrain,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        rm: &Tensor,
        rv: &Tensor,
    ) -> KernelResult<Vec<Tensor>> {
        let g = geometry(NormGeom::batch(x.dims(), op.eps, op.momentum), "batch_norm_train")?;
        if g.per_channel() < 2 {
            return Err(KernelError::Unsupported(format!(
                "batch_norm_train needs more than 1 value per channel, input is {:?}",
                x.dims()
            )));
        }
        let x = operands("batch_norm_train", &g, x, &[w, b, rm, rv], &[])?;
        by_dtype!("batch_norm_train", x[0].dtype(), batch_train_fwd(g, &x))
    }

    fn batch_train_bwd<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        g: NormGeom,
        x: &[Tensor],
    ) -> KernelResult<Vec<Tensor>> {
        let dev = cuda_device(&x[0])?;
        let dtype = x[0].dtype();
        let f = kernel(&dev, "batch_train_bwd", dtype)?;
        let mut dx = written::<T>(&dev, g.elems())?;
        let mut dw = written::<f32>(&dev, g.c as usize)?;
        let mut db = written::<f32>(&dev, g.c as usize)?;
        {
            let guards: Vec<_> = x.iter().map(|t| t.storage_and_layout()).collect();
            let v = guards
                .iter()
                .map(|(s, l)| view::<T>(s, l))
                .collect::<KernelResult<Vec<_>>>()?;
            let mut l = f.builder();
            l.arg(&v[0])
                .arg(&v[1])
                .arg(&v[2])
                .arg(&mut dx)
                .arg(&mut dw)
                .arg(&mut db)
                .arg(&g);
            unsafe { l.launch(config(g.channels_launch(), 0)) }.map_err(candle_core::Error::wrap)?;
        }
        let c = g.c as usize;
        Ok(vec![
            tensor(dx, x[0].dims(), &dev),
            tensor(dw, c, &dev).to_dtype(dtype)?,
            tensor(db, c, &dev).to_dtype(dtype)?,
        ])
    }

    /// Backward of training batch norm: `(dx, dweight, dbias)`.
    pub fn batch_norm_train_grad(
        op: &BatchNormTrainGrad,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> KernelResult<Vec<Tensor>> {
        let g = geometry(NormGeom::batch(x.dims(), op.eps, 0.0), "batch_norm_train_grad")?;
        let x = operands("batch_norm_train_grad", &g, x, &[w], &[dy])?;
        by_dtype!("batch_norm_train_grad", x[0].dtype(), batch_train_bwd(g, &x))
    }
}
