//! Launch geometry and parameters of the convolutions' layout kernels (`kernels/im2col.cu`):
//! im2col, and `unpatchify` for transposed convolutions whose kernel is their stride. Shared by
//! the CUDA path and the host emulator.
//!
//! Convolutions on CUDA run as im2col + one cuBLAS GEMM per tile (`kernels::conv`), as on the
//! CPU: the kernel writes a tile's `[C*kh*kw, nb*r*Wo]` columns, so `w [O, C*kh*kw] @ cols` is
//! the tile's output in NCHW order with no transpose. candle's own CUDA convolution builds its
//! columns in `[positions, C*kh*kw]` order (scattered reads) and transposes the product.

use super::sources::Module;
use super::Launch;

/// The kernel's CUDA C source.
pub const SOURCE: &str = include_str!("kernels/im2col.cu");

/// Threads per block.
pub const THREADS: u32 = 256;
/// Most block rows (`gridDim.y`'s limit); further column rows are taken by the same blocks.
pub const MAX_ROW_BLOCKS: usize = 65_535;

/// The im2col module with every dtype's entry points (`.for_dtype` narrows it to one).
pub fn module() -> Module {
    Module::plain("im2col", SOURCE)
}

/// One tile of a convolution's im2col columns: the convolution's geometry, and which images and
/// output rows of a contiguous `[N, C, H, W]` input the tile covers. Row `(c, a, b)`, column
/// `(i, y, z)` of the `[C*kh*kw, nb*r*Wo]` columns holds
/// `x[b0 + i, c, (r0 + y) sh + a dh - ph, z sw + b dw - pw]`, zero outside the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Im2ColTile {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    /// The convolution's output width `Wo`.
    pub out_w: usize,
    /// `(b0, nb)`: images `b0..b0 + nb`.
    pub images: (usize, usize),
    /// `(r0, r)`: output rows `r0..r0 + r`.
    pub rows: (usize, usize),
}

impl Im2ColTile {
    /// This convolution's tile of images `(b0, nb)` and output rows `(r0, r)`.
    pub fn tile(&self, images: (usize, usize), rows: (usize, usize)) -> Im2ColTile {
        Im2ColTile { images, rows, ..*self }
    }

    /// The columns' shape `[C*kh*kw, nb*r*Wo]` for `C` input channels.
    pub fn columns_shape(&self, channels: usize) -> [usize; 2] {
        [
            channels * self.kernel[0] * self.kernel[1],
            self.images.1 * self.rows.1 * self.out_w,
        ]
    }
}

/// The kernel's parameters (`struct Im2ColDims` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Im2ColDims {
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub kh: i32,
    pub kw: i32,
    pub sh: i32,
    pub sw: i32,
    pub ph: i32,
    pub pw: i32,
    pub dh: i32,
    pub dw: i32,
    pub out_w: i32,
    pub b0: i32,
    pub nb: i32,
    pub r0: i32,
    pub r: i32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Im2ColDims {}

impl Im2ColDims {
    /// The parameters of `tile` over an input of `dims` (`[N, C, H, W]`), or why the kernel
    /// cannot take it: a tile outside the input, or extents past its 32-bit indexing.
    pub fn new(dims: &[usize], tile: &Im2ColTile) -> Result<Im2ColDims, String> {
        let &[n, c, h, w] = dims else {
            return Err(format!("im2col: expected an [N, C, H, W] input, got {dims:?}"));
        };
        let (b0, nb) = tile.images;
        if b0 + nb > n {
            return Err(format!("im2col: images {b0}..{} of {n}", b0 + nb));
        }
        if [tile.kernel, tile.stride, tile.dilation].iter().any(|p| p.contains(&0)) {
            return Err(format!(
                "im2col: kernel, stride and dilation must be positive in {tile:?}"
            ));
        }
        let [rows, cols] = tile.columns_shape(c);
        let fits = |v: usize| i32::try_from(v).is_ok();
        // The largest input coordinate the kernel forms, before the padding is subtracted.
        let reach = |out: usize, k: usize, s: usize, d: usize| out * s + k * d;
        let (r0, r) = tile.rows;
        if !(fits(rows)
            && fits(cols)
            && fits(h.max(w))
            && fits(reach(r0 + r, tile.kernel[0], tile.stride[0], tile.dilation[0]))
            && fits(reach(tile.out_w, tile.kernel[1], tile.stride[1], tile.dilation[1])))
        {
            return Err(format!(
                "im2col: a tile of {rows} x {cols} columns over {dims:?} exceeds the kernel's 32-bit indexing"
            ));
        }
        let i = |v: usize| v as i32;
        Ok(Im2ColDims {
            c: i(c),
            h: i(h),
            w: i(w),
            kh: i(tile.kernel[0]),
            kw: i(tile.kernel[1]),
            sh: i(tile.stride[0]),
            sw: i(tile.stride[1]),
            ph: i(tile.padding[0]),
            pw: i(tile.padding[1]),
            dh: i(tile.dilation[0]),
            dw: i(tile.dilation[1]),
            out_w: i(tile.out_w),
            b0: i(b0),
            nb: i(nb),
            r0: i(r0),
            r: i(r),
        })
    }

    /// Rows of the columns, `C*kh*kw`.
    pub fn rows(&self) -> usize {
        (self.c * self.kh * self.kw) as usize
    }

    /// Columns, `nb*r*Wo`.
    pub fn cols(&self) -> usize {
        (self.nb * self.r * self.out_w) as usize
    }

    /// Blocks of [`THREADS`] across a row's columns, one block row per column row (at most
    /// [`MAX_ROW_BLOCKS`]).
    pub fn launch(&self) -> Launch {
        Launch {
            grid: [
                self.cols().div_ceil(THREADS as usize).max(1) as u32,
                self.rows().clamp(1, MAX_ROW_BLOCKS) as u32,
                1,
            ],
            block: [THREADS, 1, 1],
        }
    }
}

/// Most blocks of an `unpatchify` launch; they stride over the rest.
pub const UNPATCHIFY_MAX_BLOCKS: usize = 4096;

/// `unpatchify`'s parameters (`struct UnpatchifyDims` in the source): the GEMM product
/// `[n, o, kh, kw, h, w]` becomes `[n, o, h kh, w kw]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpatchifyDims {
    pub n: i32,
    pub o: i32,
    pub kh: i32,
    pub kw: i32,
    pub h: i32,
    pub w: i32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for UnpatchifyDims {}

impl UnpatchifyDims {
    /// The dims `[n, o, kh, kw, h, w]`, each within the kernel's 32-bit indexing.
    pub fn new(dims: [usize; 6]) -> Result<UnpatchifyDims, String> {
        let fit = |v: usize| i32::try_from(v).map_err(|_| format!("unpatchify dims {dims:?} exceed 32 bits"));
        Ok(UnpatchifyDims {
            n: fit(dims[0])?,
            o: fit(dims[1])?,
            kh: fit(dims[2])?,
            kw: fit(dims[3])?,
            h: fit(dims[4])?,
            w: fit(dims[5])?,
        })
    }

    /// Output elements.
    pub fn elems(&self) -> usize {
        [self.n, self.o, self.kh, self.kw, self.h, self.w]
            .iter()
            .map(|&v| v as usize)
            .product()
    }

    /// The output's shape `[n, o, h kh, w kw]`.
    pub fn out_dims(&self) -> [usize; 4] {
        let u = |v: i32| v as usize;
        [u(self.n), u(self.o), u(self.h * self.kh), u(self.w * self.kw)]
    }

    /// One thread per output element, up to [`UNPATCHIFY_MAX_BLOCKS`] blocks.
    pub fn launch(&self) -> Launch {
        Launch::linear(
            self.elems().div_ceil(THREADS as usize).clamp(1, UNPATCHIFY_MAX_BLOCKS),
            THREADS,
        )
    }
}

/// The kernels on candle CUDA tensors.
#[cfg(feature = "cuda")]
pub mod run {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};

    use super::{module, Im2ColDims, Im2ColTile, UnpatchifyDims};
    use crate::cuda::device::{config, cuda_device, function, launch_into_new, suffix, tensor, view};
    use crate::kernels::{KernelError, KernelResult};

    /// Whether the kernel takes tiles of `x` (f32/f16/bf16); the caller lowers the convolution
    /// otherwise.
    pub fn supports(x: &Tensor) -> bool {
        suffix(x.dtype()).is_ok()
    }

    /// The `[C*kh*kw, nb*r*Wo]` columns of `tile` of `x` (`[N, C, H, W]`), in `x`'s dtype.
    pub fn columns(x: &Tensor, tile: &Im2ColTile) -> KernelResult<Tensor> {
        let d = Im2ColDims::new(x.dims(), tile).map_err(|m| KernelError::Unsupported(format!("{m} (CUDA)")))?;
        let x = x.contiguous()?;
        match x.dtype() {
            DType::F32 => columns_t::<f32>(&d, &x),
            DType::F16 => columns_t::<half::f16>(&d, &x),
            DType::BF16 => columns_t::<half::bf16>(&d, &x),
            t => Err(KernelError::Unsupported(format!("im2col on CUDA: dtype {t:?}"))),
        }
    }

    fn columns_t<T: CudaDType + DeviceRepr>(d: &Im2ColDims, x: &Tensor) -> KernelResult<Tensor> {
        let shape = (d.rows(), d.cols());
        if shape.0 * shape.1 == 0 {
            return Ok(Tensor::zeros(shape, x.dtype(), x.device())?);
        }
        let dev = cuda_device(x)?;
        let f = function(
            &dev,
            &module().for_dtype(x.dtype()),
            &format!("im2col_{}", suffix(x.dtype())?),
        )?;
        launch_into_new::<T, Im2ColDims>(&f, &[x], shape.0 * shape.1, d, d.launch(), shape)
    }

    /// The product `y` of a kernel-equals-stride transposed convolution (contiguous
    /// `[n, o * kh * kw, h * w]` elements, `dims` = `[n, o, kh, kw, h, w]`) as `[n, o, h kh, w kw]`,
    /// plus the channel `bias` where given, in `y`'s dtype.
    pub fn unpatchify(y: &Tensor, bias: Option<&Tensor>, dims: [usize; 6]) -> KernelResult<Tensor> {
        let d = UnpatchifyDims::new(dims).map_err(KernelError::Unsupported)?;
        let y = y.contiguous()?;
        let bias = bias.map(|b| b.contiguous()).transpose()?;
        match y.dtype() {
            DType::F32 => unpatchify_t::<f32>(&d, &y, bias.as_ref()),
            DType::F16 => unpatchify_t::<half::f16>(&d, &y, bias.as_ref()),
            DType::BF16 => unpatchify_t::<half::bf16>(&d, &y, bias.as_ref()),
            t => Err(KernelError::Unsupported(format!("unpatchify on CUDA: dtype {t:?}"))),
        }
    }

    fn unpatchify_t<T: CudaDType + DeviceRepr>(
        d: &UnpatchifyDims,
        y: &Tensor,
        bias: Option<&Tensor>,
    ) -> KernelResult<Tensor> {
        let dev = cuda_device(y)?;
        if d.elems() == 0 {
            return Ok(Tensor::zeros(d.out_dims().to_vec(), y.dtype(), y.device())?);
        }
        let f = function(
            &dev,
            &module().for_dtype(y.dtype()),
            &format!("unpatchify_{}", suffix(y.dtype())?),
        )?;
        // Every element is written by the kernel.
        let mut out = unsafe { dev.alloc::<T>(d.elems()) }?;
        {
            let (ys, yl) = y.storage_and_layout();
            let yv = view::<T>(&ys, yl)?;
            // Without a bias the kernel reads a null pointer's absence (a zero device address).
            let b = bias.map(|b| b.storage_and_layout());
            let bv = b.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
            let null = 0u64;
            let mut l = f.builder();
            l.arg(&yv);
            match &bv {
                Some(bv) => l.arg(bv),
                None => l.arg(&null),
            };
            l.arg(&mut out).arg(d);
            unsafe { l.launch(config(d.launch(), 0)) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(tensor(out, d.out_dims().to_vec(), &dev))
    }
}
