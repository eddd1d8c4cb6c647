//! Convolutions on NCHW maps.
//!
//! candle's `conv2d` takes one padding, stride and dilation for both spatial axes. Symmetric
//! attributes go straight to it; asymmetric ones are lowered with candle ops
//! (explicit zero padding, zero-inserted ("dilated") kernels or inputs, stride-1 convolution then
//! subsampling), so every attribute combination the IR accepts runs on every device.
//!
//! candle's transposed-convolution weight layout is PyTorch's, `[C_in, C_out, kh, kw]`, so
//! weights are used as loaded.
//!
//! Ungrouped convolutions run as tiled im2col + gemm (`im2col_conv`): on the CPU those of stride
//! 1 with a kernel larger than 1x1, about twice as fast as candle's CPU kernel; on CUDA all of
//! them, with the columns from the runtime's im2col kernel (`cuda::im2col`) in
//! `[C*kh*kw, positions]` order, so one cuBLAS GEMM per tile yields NCHW directly, where
//! candle's CUDA convolution gathers `[positions, C*kh*kw]` columns with scattered reads and
//! transposes its product. 1x1 stride-1 convolutions of a few images are one GEMM per image
//! (`pointwise_conv`), and off the CPU so is the weight gradient of one image's
//! (`pointwise_grad_weight`). Transposed
//! convolutions (the input gradients of every `conv2d` in training) never use candle's CPU
//! kernel, a direct loop 10-25x slower (`deconv_cpu`): stride 1 runs as the flipped-kernel
//! convolution on the im2col path, every other attribute set as `w^T @ x` per tile plus a
//! col2im scatter-add. Other devices never use candle's `conv_transpose2d` either (on CUDA it is
//! a direct loop kernel): they lower it to a convolution (`conv_transpose2d_portable`).
//!
//! On CUDA, where cuDNN loads (`cuda::cudnn`), it runs every weight gradient (but a 1x1 one of
//! one image) and every convolution and transposed convolution but the GEMM-shaped ones below
//! (1x1, patchify and unpatchify); the im2col paths serve CUDA machines without cuDNN.
//!
//! Two fast paths turn "patchify" layers into a single gemm:
//! * `conv2d` with kernel == stride, no padding, no dilation, one group (ViT patch embedding):
//!   the input is rearranged into `[N*Ho*Wo, C*kh*kw]` patches and multiplied by `w^T`; the
//!   result is returned as an NCHW *view* of NHWC data, so the usual following permute to NHWC
//!   is free.
//! * `conv_transpose2d` with kernel == stride, no padding / output padding / dilation (the 2x2
//!   stride-2 deconvolutions of the feature pyramids): `w^T @ x` per image, then one pass that
//!   interleaves the kernel offsets into the output and adds the bias.
//!
//! `conv2d_grad_weight` (the weight gradient of `conv2d`) is the (strided) im2col columns of `x`
//! per tile times `dy^T`, summed over tiles, wherever there is an im2col kernel (CPU f32 / f64,
//! CUDA); elsewhere it is itself a convolution (`conv2d_grad_weight_portable`). Input gradients need no kernel of their own: that of
//! `conv2d` is a `conv_transpose2d` of `dy` and that of `conv_transpose2d` a `conv2d` of `dy`.

use candle_core::{DType, Storage, Tensor, WithDType};
use rayon::prelude::*;
use vitdet_ir::ops::{Conv2d, Conv2dGradWeight, ConvTranspose2d};

use super::cpu::{Col2Im, Im2Col};
use super::cpu_grad::{with_slice, StridedIm2Col};
use super::linear::{gemm_operand, with_contraction_dtype};
use super::{channel_view, expect_float, KernelError, KernelResult};
use crate::cuda::im2col::Im2ColTile;

/// PyTorch's `conv2d` (see the module doc for how attributes map to candle).
pub fn conv2d(op: &Conv2d, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    x.dims4()?;
    w.dims4()?;
    let mut ops = vec![x, w];
    ops.extend(b);
    with_contraction_dtype(&ops, |t| add_channel_bias(conv2d_nobias(op, &t[0], &t[1])?, t.get(2)))
}

/// `y [N, C, H, W] + b [C]` when there is a bias.
fn add_channel_bias(y: Tensor, b: Option<&Tensor>) -> KernelResult<Tensor> {
    Ok(match b {
        Some(b) => y.broadcast_add(&channel_view(b, 1, 4)?)?,
        None => y,
    })
}

fn conv2d_nobias(op: &Conv2d, x: &Tensor, w: &Tensor) -> KernelResult<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let [ph, pw] = op.padding;
    let [sh, sw] = op.stride;
    let [dh, dw] = op.dilation;
    if op.groups == 0 || sh == 0 || sw == 0 || dh == 0 || dw == 0 {
        return Err(KernelError::Unsupported(format!("invalid conv2d attributes {op:?}")));
    }
    if is_pointwise([kh, kw], op.stride, op.padding, op.groups) && x.dim(0)? <= POINTWISE_MAX_IMAGES {
        return pointwise_conv(x, w);
    }
    if [kh, kw] == op.stride && op.padding == [0, 0] && op.dilation == [1, 1] && op.groups == 1 {
        return patchify_conv(x, w);
    }
    #[cfg(feature = "cuda")]
    if let Some(y) = on_cudnn(x, || crate::cuda::cudnn::conv2d(op, x, w))? {
        return Ok(y);
    }
    // im2col + GEMM: stride 1 and kernels over 1x1 on the CPU; any ungrouped convolution where
    // the device has an im2col kernel.
    let cpu_im2col = x.device().is_cpu() && op.stride == [1, 1] && [kh, kw] != [1, 1];
    if op.groups == 1 && (cpu_im2col || device_columns(x)) {
        return im2col_conv(x, w, op);
    }
    // Asymmetric padding: pad explicitly.
    let (x, pad) = if ph == pw {
        (x.clone(), ph)
    } else {
        (x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?, 0)
    };
    // Asymmetric dilation: dilate the kernel with zeros.
    let (w, dil) = if dh == dw {
        (w.clone(), dh)
    } else {
        (insert_zeros(&insert_zeros(w, 2, dh)?, 3, dw)?, 1)
    };
    if sh == sw {
        return Ok(x.conv2d(&w, pad, sh, dil, op.groups)?);
    }
    // Asymmetric stride: stride-1 convolution, then keep every sh-th row and sw-th column.
    let y = x.conv2d(&w, pad, 1, dil, op.groups)?;
    let y = subsample(&y, 2, sh)?;
    Ok(subsample(&y, 3, sw)?)
}

/// `f` (a cuDNN convolution of `x`) where cuDNN takes it; `None` sends the convolution down the
/// other paths (see `cuda::cudnn`).
#[cfg(feature = "cuda")]
fn on_cudnn(x: &Tensor, f: impl FnOnce() -> KernelResult<Tensor>) -> KernelResult<Option<Tensor>> {
    if crate::cuda::cudnn::takes(x)? {
        return crate::cuda::cudnn::or_im2col(f);
    }
    Ok(None)
}

/// Whether a convolution is a 1x1, stride-1, unpadded, ungrouped one: a product per image.
fn is_pointwise(kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2], groups: usize) -> bool {
    kernel == [1, 1] && stride == [1, 1] && padding == [0, 0] && groups == 1
}

/// Batches up to this size run 1x1 convolutions image by image ([`pointwise_conv`]); larger
/// ones (RoI batches of small maps) as one GEMM over all positions ([`patchify_conv`]).
const POINTWISE_MAX_IMAGES: usize = 8;

/// A 1x1, stride-1 convolution as `w [O, C] @ x_i [C, H*W]` per image: the product is the
/// image's NCHW output, with no copy of the input or the output (for a single image).
fn pointwise_conv(x: &Tensor, w: &Tensor) -> KernelResult<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    let w2 = w.reshape((o, c))?;
    let x = x.contiguous()?;
    let image = |i: usize| -> KernelResult<Tensor> { Ok(w2.matmul(&x.get(i)?.reshape((c, h * wd))?)?) };
    let y = if n == 1 {
        image(0)?.unsqueeze(0)?
    } else {
        Tensor::stack(&(0..n).map(image).collect::<KernelResult<Vec<_>>>()?, 0)?
    };
    Ok(y.reshape((n, o, h, wd))?)
}

/// The weight gradient of a 1x1, stride-1 convolution of one image as one GEMM,
/// `dy [O, H*W] @ x [C, H*W]^T` (the transpose a view), where cuDNN's legacy API spends about
/// ten times a GEMM's host time per call (the RPN's and pyramid's 1x1 layers).
fn pointwise_grad_weight(x: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let o = dy.dim(1)?;
    let x = x.contiguous()?.reshape((c, h * w))?;
    let dy = dy.contiguous()?.reshape((o, h * w))?;
    Ok(dy.matmul(&x.t()?)?.reshape((o, c, 1, 1))?)
}

/// kernel == stride, no padding: one gemm over non-overlapping patches.
fn patchify_conv(x: &Tensor, w: &Tensor) -> KernelResult<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let (ho, wo) = (h / kh, wd / kw);
    let x = if ho * kh != h || wo * kw != wd {
        x.narrow(2, 0, ho * kh)?.narrow(3, 0, wo * kw)?
    } else {
        x.clone()
    };
    let patches = x
        .reshape((n, c, ho, kh, wo, kw))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((n * ho * wo, c * kh * kw))?;
    let wt = gemm_operand(&w.reshape((o, c * kh * kw))?.t()?)?;
    let y = patches.matmul(&wt)?; // [N*Ho*Wo, O]
    Ok(y.reshape((n, ho, wo, o))?.permute((0, 3, 1, 2))?)
}

/// Bytes of the im2col buffer `im2col_conv` builds at a time on the CPU (cache-sized tiles).
const IM2COL_TILE_BYTES: usize = 32 << 20;
/// The same on other devices, where fewer, larger GEMMs run faster (ViTDet-B's largest 3x3
/// convolution, 256 channels at 256 x 256, takes three tiles in bf16).
const DEVICE_IM2COL_TILE_BYTES: usize = 128 << 20;

/// The im2col buffer budget for convolutions of `x`.
fn tile_budget(x: &Tensor) -> usize {
    if x.device().is_cpu() {
        IM2COL_TILE_BYTES
    } else {
        DEVICE_IM2COL_TILE_BYTES
    }
}

/// Tiles `(b0, nb, r0, r)` of `n` images of `rows` rows each, whose columns (`row_bytes` per
/// row) stay under `budget`: as many whole images together as fit, or, when one image does
/// not, runs of rows of one image.
fn tiles(n: usize, rows: usize, row_bytes: usize, budget: usize) -> Vec<(usize, usize, usize, usize)> {
    let image_bytes = rows * row_bytes;
    let mut tiles = Vec::new();
    if image_bytes <= budget {
        let per_tile = (budget / image_bytes.max(1)).clamp(1, n.max(1));
        for b0 in (0..n).step_by(per_tile) {
            tiles.push((b0, per_tile.min(n - b0), 0, rows));
        }
    } else {
        let per_tile = (budget / row_bytes.max(1)).clamp(1, rows.max(1));
        for b0 in 0..n {
            for r0 in (0..rows).step_by(per_tile) {
                tiles.push((b0, 1, r0, per_tile.min(rows - r0)));
            }
        }
    }
    tiles
}

/// Whether the device's own im2col kernel takes `x` (CUDA, f32/f16/bf16).
fn device_columns(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::cuda::im2col::run::supports(x);
    }
    let _ = x;
    false
}

/// Whether [`columns`] takes `x`: f32 / f64 on the CPU, f32 / f16 / bf16 on CUDA.
fn columns_supported(x: &Tensor) -> bool {
    (x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)) || device_columns(x)
}

/// The `[C*kh*kw, nb*r*Wo]` im2col columns of `tile` of the contiguous `[N, C, H, W]` input `x`
/// (see [`Im2ColTile`]): on the CPU from [`Im2Col`] (stride 1) or [`StridedIm2Col`], on CUDA
/// from the im2col kernel. Callers check [`columns_supported`] first.
fn columns(x: &Tensor, tile: &Im2ColTile) -> KernelResult<Tensor> {
    // A whole image under a 1x1, stride-1, unpadded kernel is its own columns: a view.
    let (_, c, h, w) = x.dims4()?;
    let whole = tile.images.1 == 1 && tile.rows == (0, h) && tile.out_w == w;
    if whole && tile.kernel == [1, 1] && tile.stride == [1, 1] && tile.padding == [0, 0] {
        return Ok(x.get(tile.images.0)?.reshape((c, h * w))?);
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::cuda::im2col::run::columns(x, tile);
    }
    if tile.stride == [1, 1] {
        return Ok(x.apply_op1_no_bwd(&Im2Col(*tile))?);
    }
    Ok(StridedIm2Col(*tile).apply(x)?)
}

/// Ungrouped convolution as im2col + gemm (stride 1 on the CPU; any stride on CUDA, with its
/// im2col kernel), over tiles of output rows (or,
/// for batches of small maps, of whole images) so the column buffer stays under
/// `IM2COL_TILE_BYTES`: for each tile, the `kh * kw` shifted windows of the padded input form
/// `[C * kh * kw, images * rows * Wo]` columns, multiplied by the `[O, C * kh * kw]` weight.
/// About twice as fast as candle's CPU `conv2d` for the 3x3 convolutions of the pyramids and
/// heads (0.43 s vs 0.80 s for 256 -> 256 channels at 128 x 128 on the 2-core development VM);
/// f32 / f64 build the columns on the host in one pass (`im2col_conv_host`), 15-35 % faster
/// again than stacking candle views for the Mask R-CNN heads and the stride-4 pyramid level.
fn im2col_conv(x: &Tensor, w: &Tensor, op: &Conv2d) -> KernelResult<Tensor> {
    let (n, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let Some([ho, wo]) = op.output_size([h, wd], [kh, kw]) else {
        return Err(KernelError::Unsupported(format!(
            "conv2d {op:?}: kernel {kh}x{kw} larger than the padded {h}x{wd} input"
        )));
    };
    // The whole convolution as a tile; each tile narrows its images and rows.
    let whole = Im2ColTile {
        kernel: [kh, kw],
        stride: op.stride,
        padding: op.padding,
        dilation: op.dilation,
        out_w: wo,
        images: (0, n),
        rows: (0, ho),
    };
    match x.dtype() {
        DType::F32 if x.device().is_cpu() => im2col_conv_host::<f32>(x, w, &whole),
        DType::F64 if x.device().is_cpu() => im2col_conv_host::<f64>(x, w, &whole),
        _ => im2col_conv_tiles(x, w, &whole),
    }
}

/// [`im2col_conv`] for f32 / f64: each tile's column matrix is built in one pass from the
/// contiguous input ([`Im2Col`], padding applied on the fly), multiplied by the weight, and the
/// `[O, nb, r, Wo]` product is copied once into its place in the `[N, O, Ho, Wo]` output.
fn im2col_conv_host<T: WithDType>(x: &Tensor, w: &Tensor, whole: &Im2ColTile) -> KernelResult<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let (ho, wo) = (whole.rows.1, whole.out_w);
    let k = c * kh * kw;
    let w2 = w.reshape((o, k))?;
    let x = x.contiguous()?;
    let hw = ho * wo;
    let columns = |b0: usize, nb: usize, r0: usize, r: usize| columns(&x, &whole.tile((b0, nb), (r0, r)));
    let tiles = tiles(n, ho, k * wo * T::DTYPE.size_in_bytes(), IM2COL_TILE_BYTES);
    if n == 1 && tiles.len() == 1 {
        return Ok(w2.matmul(&columns(0, 1, 0, ho)?)?.reshape((1, o, ho, wo))?);
    }
    let mut out = vec![T::zero(); n * o * hw];
    for (b0, nb, r0, r) in tiles {
        let y = w2.matmul(&columns(b0, nb, r0, r)?)?; // [O, nb * r * Wo]
        let (storage, layout) = y.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(KernelError::Unsupported("im2col_conv: CPU tensors only".into()));
        };
        let ys = match layout.contiguous_offsets() {
            Some((a, b)) => &cpu.as_slice::<T>()?[a..b],
            None => return Err(KernelError::Unsupported("im2col_conv: non-contiguous product".into())),
        };
        let (tw, len) = (nb * r * wo, r * wo);
        out[b0 * o * hw..(b0 + nb) * o * hw]
            .par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(idx, dst)| {
                let (i, oc) = (idx / o, idx % o);
                dst[r0 * wo..r0 * wo + len].copy_from_slice(&ys[oc * tw + i * len..][..len]);
            });
    }
    Ok(Tensor::from_vec(out, (n, o, ho, wo), x.device())?)
}

/// [`im2col_conv`] with candle ops around the columns: those of the device's im2col kernel
/// (CUDA), or, where there is none (f16 on the CPU), stacked from shifted views of the padded
/// input.
fn im2col_conv_tiles(x: &Tensor, w: &Tensor, whole: &Im2ColTile) -> KernelResult<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let ([ph, pw], [dh, dw]) = (whole.padding, whole.dilation);
    let (ho, wo) = (whole.rows.1, whole.out_w);
    let by_kernel = columns_supported(x);
    if !by_kernel && whole.stride != [1, 1] {
        return Err(KernelError::Unsupported(format!(
            "im2col convolution of stride {:?} needs an im2col kernel for {:?} on {:?}",
            whole.stride,
            x.dtype(),
            x.device().location()
        )));
    }
    let x = x.contiguous()?;
    let xp = if by_kernel {
        x.clone()
    } else {
        x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?
    };
    let k = c * kh * kw;
    let w2 = w.reshape((o, k))?;
    // The `kh * kw` shifted windows of output rows `r0..r0 + r` of images `b0..b0 + nb`,
    // as columns `[C*kh*kw, nb*r*Wo]`: one large GEMM per tile, whatever the batch size (a
    // batch of RoIs is thousands of tiny images).
    let columns = |b0: usize, nb: usize, r0: usize, r: usize| -> KernelResult<Tensor> {
        if by_kernel {
            return columns(&x, &whole.tile((b0, nb), (r0, r)));
        }
        let mut windows = Vec::with_capacity(kh * kw);
        for a in 0..kh {
            for b in 0..kw {
                windows.push(xp.narrow(0, b0, nb)?.narrow(2, r0 + a * dh, r)?.narrow(3, b * dw, wo)?);
            }
        }
        // [nb, C, kh*kw, r, Wo] -> [C, kh*kw, nb, r, Wo] -> [C*kh*kw, nb*r*Wo]
        let stacked = Tensor::stack(&windows, 2)?;
        let cols = if nb == 1 {
            stacked
        } else {
            stacked.permute((1, 2, 0, 3, 4))?.contiguous()?
        };
        Ok(cols.reshape((k, nb * r * wo))?)
    };
    // Each tile's product `[O, nb*r*Wo]` as its `[nb, O, r, Wo]` block of the output; the
    // blocks of an image's row tiles are joined along the rows, whole-image blocks along the
    // batch.
    let mut images: Vec<Tensor> = Vec::with_capacity(n);
    let mut rows_of_image: Vec<Tensor> = Vec::new();
    for (b0, nb, r0, r) in tiles(n, ho, k * wo * x.dtype().size_in_bytes(), tile_budget(&x)) {
        let y = w2.matmul(&columns(b0, nb, r0, r)?)?;
        let block = if nb == 1 {
            y.reshape((1, o, r, wo))?
        } else {
            y.reshape((o, nb, r, wo))?.permute((1, 0, 2, 3))?
        };
        if r == ho {
            images.push(block);
            continue;
        }
        rows_of_image.push(block);
        if r0 + r == ho {
            images.push(Tensor::cat(&rows_of_image, 2)?);
            rows_of_image.clear();
        }
    }
    Ok(match images.len() {
        0 => Tensor::zeros((n, o, ho, wo), x.dtype(), x.device())?,
        1 => images.pop().expect("one block").contiguous()?,
        _ => Tensor::cat(&images, 0)?,
    })
}

/// The weight gradient of [`conv2d`] (see [`Conv2dGradWeight`]): `x [N, Cin, H, W]`,
/// `dy [N, O, Ho, Wo]` -> `dw [O, Cin/groups, kh, kw]`.
pub fn conv2d_grad_weight(op: &Conv2dGradWeight, x: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    let (n, cin, _, _, o, ho, wo) = check_grad_weight(op, x, dy)?;
    with_contraction_dtype(&[x, dy], |t| {
        let (x, dy) = (&t[0], &t[1]);
        if is_pointwise(op.kernel, op.stride, op.padding, op.groups) && n == 1 && !x.device().is_cpu() {
            return pointwise_grad_weight(x, dy);
        }
        #[cfg(feature = "cuda")]
        if let Some(y) = on_cudnn(x, || crate::cuda::cudnn::conv2d_grad_weight(op, x, dy))? {
            return Ok(y);
        }
        if !columns_supported(x) {
            return conv2d_grad_weight_portable(op, x, dy);
        }
        let [kh, kw] = op.kernel;
        let g = op.groups;
        let (og, kg) = (o / g, cin / g * kh * kw);
        let k = cin * kh * kw;
        let x = x.contiguous()?;
        // Tiles of whole images, or of output rows of one image, keep the columns under the
        // budget; their products are summed, in f32 for the half types (each product is rounded
        // once, as a single GEMM's would be, and the sum is not rounded at every tile).
        let whole = Im2ColTile {
            kernel: op.kernel,
            stride: op.stride,
            padding: op.padding,
            dilation: op.dilation,
            out_w: wo,
            images: (0, n),
            rows: (0, ho),
        };
        let tiles = tiles(n, ho, k * wo * x.dtype().size_in_bytes(), tile_budget(&x));
        let sum_dtype = if tiles.len() > 1 && matches!(x.dtype(), DType::F16 | DType::BF16) {
            DType::F32
        } else {
            x.dtype()
        };
        // Per group, `cols @ dy^T` (`dw^T`) or `dy @ cols^T` (`dw`), summed over tiles: the
        // gemm is fastest with the longer of `Cin/g*kh*kw` and `O/g` as its rows (1.3-2.5x for
        // the tiny model's 16-channel 3x3 and 80-channel 1x1 layers; no difference at ViT-B's
        // 256 channels). Both operands are views (dy^T / cols^T column-major).
        let cols_first = kg >= og;
        let mut acc: Vec<Option<Tensor>> = vec![None; g];
        for (b0, nb, r0, r) in tiles {
            let cols = columns(&x, &whole.tile((b0, nb), (r0, r)))?; // [Cin*kh*kw, nb*r*Wo]
            let dyt = if nb == 1 {
                dy.get(b0)?.narrow(1, r0, r)?.contiguous()?.reshape((o, r * wo))?
            } else {
                dy.narrow(0, b0, nb)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((o, nb * r * wo))?
            };
            for (gi, slot) in acc.iter_mut().enumerate() {
                let (cg, dg) = (cols.narrow(0, gi * kg, kg)?, dyt.narrow(0, gi * og, og)?);
                let part = if cols_first {
                    cg.matmul(&dg.t()?)? // [Cin/g*kh*kw, O/g]
                } else {
                    dg.matmul(&gemm_operand(&cg.t()?)?)? // [O/g, Cin/g*kh*kw]
                };
                let part = part.to_dtype(sum_dtype)?;
                *slot = Some(match slot.take() {
                    None => part,
                    Some(sum) => (sum + part)?,
                });
            }
        }
        let parts = acc
            .into_iter()
            .map(|p| match p {
                Some(p) if cols_first => p.t(),
                Some(p) => Ok(p),
                None => Tensor::zeros((og, kg), sum_dtype, x.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dw = if g == 1 {
            parts[0].contiguous()?
        } else {
            Tensor::cat(&parts, 0)?
        };
        Ok(dw.to_dtype(x.dtype())?.reshape((o, cin / g, kh, kw))?)
    })
}

/// The weight gradient as a convolution (the non-CPU path, and half types on the CPU; public so
/// tests can check it on the CPU): per group, `x` with batch and channels swapped
/// (`[Cin/g, N, H, W]`) convolved with `dy` likewise swapped (`[O/g, N, Ho, Wo]`, as the weight)
/// at stride `dilation`, dilation `stride` and the same padding gives `dw^T` on a grid of at
/// least `kh x kw`, cropped to it.
pub fn conv2d_grad_weight_portable(op: &Conv2dGradWeight, x: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    let (_, cin, _, _, o, _, _) = check_grad_weight(op, x, dy)?;
    let g = op.groups;
    let (cg, og) = (cin / g, o / g);
    let [kh, kw] = op.kernel;
    let conv = Conv2d {
        stride: op.dilation,
        padding: op.padding,
        dilation: op.stride,
        groups: 1,
    };
    let parts = (0..g)
        .map(|gi| -> KernelResult<Tensor> {
            let xg = x.narrow(1, gi * cg, cg)?.transpose(0, 1)?.contiguous()?;
            let dyg = dy.narrow(1, gi * og, og)?.transpose(0, 1)?.contiguous()?;
            let full = conv2d(&conv, &xg, &dyg, None)?; // [Cin/g, O/g, >= kh, >= kw]
            Ok(full.narrow(2, 0, kh)?.narrow(3, 0, kw)?.transpose(0, 1)?)
        })
        .collect::<KernelResult<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
}

/// Validates the operands of a weight gradient; returns `(N, Cin, H, W, O, Ho, Wo)`.
fn check_grad_weight(
    op: &Conv2dGradWeight,
    x: &Tensor,
    dy: &Tensor,
) -> KernelResult<(usize, usize, usize, usize, usize, usize, usize)> {
    expect_float("input", x)?;
    let (n, cin, h, w) = x.dims4()?;
    let (n2, o, ho, wo) = dy.dims4()?;
    let bad = |why: String| {
        Err(KernelError::Unsupported(format!(
            "conv2d_grad_weight {op:?} with input {:?} and gradient {:?}: {why}",
            x.dims(),
            dy.dims()
        )))
    };
    if dy.dtype() != x.dtype() {
        return bad(format!("dtypes {:?} and {:?} differ", x.dtype(), dy.dtype()));
    }
    let g = op.groups;
    if g == 0 || !cin.is_multiple_of(g) || !o.is_multiple_of(g) || n != n2 {
        return bad("groups must divide both channel counts and the batches must agree".into());
    }
    if op.kernel.contains(&0) || op.stride.contains(&0) || op.dilation.contains(&0) {
        return bad("kernel, stride and dilation must be positive".into());
    }
    for (d, (size, out)) in [(h, ho), (w, wo)].into_iter().enumerate() {
        let span = op.dilation[d] * (op.kernel[d] - 1) + 1;
        let padded = size + 2 * op.padding[d];
        if padded < span || out != (padded - span) / op.stride[d] + 1 {
            return bad("the gradient does not have the convolution's output size".into());
        }
    }
    Ok((n, cin, h, w, o, ho, wo))
}

/// PyTorch's `conv_transpose2d` (groups 1), weight `[C_in, C_out, kh, kw]`.
pub fn conv_transpose2d(op: &ConvTranspose2d, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> KernelResult<Tensor> {
    expect_float("input", x)?;
    x.dims4()?;
    w.dims4()?;
    let mut ops = vec![x, w];
    ops.extend(b);
    with_contraction_dtype(&ops, |t| {
        let (x, w, b) = (&t[0], &t[1], t.get(2));
        let (_, _, kh, kw) = w.dims4()?;
        if [kh, kw] == op.stride && op.padding == [0, 0] && op.output_padding == [0, 0] && op.dilation == [1, 1] {
            return unpatchify_deconv(x, w, b);
        }
        add_channel_bias(conv_transpose2d_nobias(op, x, w)?, b)
    })
}

fn conv_transpose2d_nobias(op: &ConvTranspose2d, x: &Tensor, w: &Tensor) -> KernelResult<Tensor> {
    let ([sh, sw], [dh, dw]) = (op.stride, op.dilation);
    if sh == 0 || sw == 0 || dh == 0 || dw == 0 {
        return Err(KernelError::Unsupported(format!(
            "invalid conv_transpose2d attributes {op:?}"
        )));
    }
    if x.device().is_cpu() {
        if w.dtype() != x.dtype() {
            return Err(KernelError::Unsupported(format!(
                "conv_transpose2d: input {:?} and weight {:?} dtypes differ",
                x.dtype(),
                w.dtype()
            )));
        }
        return match x.dtype() {
            DType::F32 => deconv_cpu::<f32>(op, x, w),
            DType::F64 => deconv_cpu::<f64>(op, x, w),
            // Half types are widened (f32 accumulation, one rounding back).
            dt => Ok(deconv_cpu::<f32>(op, &x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?)?.to_dtype(dt)?),
        };
    }
    #[cfg(feature = "cuda")]
    if let Some(y) = on_cudnn(x, || crate::cuda::cudnn::conv_transpose2d(op, x, w))? {
        return Ok(y);
    }
    // Other devices: candle's CUDA conv_transpose2d is a direct loop kernel, 10-90x slower than
    // cuDNN on the pyramid's and heads' shapes, so the transposed convolution (every 3x3 conv's
    // input gradient among them) is lowered to a convolution, which runs as im2col + GEMM.
    deconv_as_conv(op, x, w)
}

/// [`conv_transpose2d`] as other devices than the CPU run it (`deconv_as_conv`), callable on
/// the CPU to test that path.
pub fn conv_transpose2d_portable(
    op: &ConvTranspose2d,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> KernelResult<Tensor> {
    let mut ops = vec![x, w];
    ops.extend(b);
    with_contraction_dtype(&ops, |t| add_channel_bias(deconv_as_conv(op, &t[0], &t[1])?, t.get(2)))
}

/// A transposed convolution as a stride-1 convolution: insert (s - 1) zeros between input
/// pixels, pad by d (k - 1) - p on each side (plus the output padding at the end; negative
/// amounts crop), and correlate with the spatially flipped kernel, transposed to
/// [C_out, C_in, kh, kw].
fn deconv_as_conv(op: &ConvTranspose2d, x: &Tensor, w: &Tensor) -> KernelResult<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let [ph, pw] = op.padding;
    let [sh, sw] = op.stride;
    let [oph, opw] = op.output_padding;
    let [dh, dw] = op.dilation;
    let before_h = (dh * (kh - 1)) as isize - ph as isize;
    let before_w = (dw * (kw - 1)) as isize - pw as isize;
    let wf = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    let conv = |padding: [usize; 2]| Conv2d {
        stride: [1, 1],
        padding,
        dilation: [dh, dw],
        groups: 1,
    };
    // Stride 1 without cropping or output padding (the input gradient of a stride-1 "same"
    // convolution): the convolution pads, no padded copy of the input is made.
    if [sh, sw] == [1, 1] && [oph, opw] == [0, 0] && before_h >= 0 && before_w >= 0 {
        return conv2d_nobias(&conv([before_h as usize, before_w as usize]), x, &wf);
    }
    let xd = insert_zeros(&insert_zeros(x, 2, sh)?, 3, sw)?;
    let xd = pad_or_crop(&xd, 2, before_h, before_h + oph as isize)?;
    let xd = pad_or_crop(&xd, 3, before_w, before_w + opw as isize)?;
    conv2d_nobias(&conv([0, 0]), &xd, &wf)
}

/// Transposed convolution on the CPU (f32 / f64, any stride, padding, output padding and
/// dilation). Stride 1 with a kernel larger than 1x1 and no cropping or output padding runs as
/// the flipped-kernel convolution on the im2col path; everything else as `cols = w^T @ x`, one
/// gemm per tile (`w` viewed `[Ci, Co*kh*kw]`, the tile's inputs `[Ci, nb*r*W]`), then a
/// parallel scatter-add of the columns into the output ([`Col2Im`]). Tiles of whole images, or
/// of input rows of one image, keep `cols` under `IM2COL_TILE_BYTES`. Unlike a zero-insertion
/// lowering, no work is spent on the zeros between strided inputs.
fn deconv_cpu<T: WithDType>(op: &ConvTranspose2d, x: &Tensor, w: &Tensor) -> KernelResult<Tensor> {
    let (n, ci, h, wd) = x.dims4()?;
    let (wci, co, kh, kw) = w.dims4()?;
    let bad = |why: &str| {
        Err(KernelError::Unsupported(format!(
            "conv_transpose2d {op:?} with input {:?} and weight {:?}: {why}",
            x.dims(),
            w.dims()
        )))
    };
    if wci != ci {
        return bad("the weight's first axis must be the input channels");
    }
    if h == 0 || wd == 0 || kh == 0 || kw == 0 {
        return bad("empty spatial axes or kernel");
    }
    let mut out_hw = [0usize; 2];
    for (d, size) in [h, wd].into_iter().enumerate() {
        let full = (size - 1) * op.stride[d] + op.dilation[d] * (w.dim(2 + d)? - 1) + op.output_padding[d] + 1;
        if full <= 2 * op.padding[d] {
            return bad("the padding leaves no output");
        }
        out_hw[d] = full - 2 * op.padding[d];
    }
    let [ho, wo] = out_hw;
    let plane = ho * wo;
    let [dh, dw] = op.dilation;
    let reach = [dh * (kh - 1), dw * (kw - 1)];
    if n * ci * co > 0
        && op.stride == [1, 1]
        && [kh, kw] != [1, 1]
        && op.output_padding == [0, 0]
        && reach[0] >= op.padding[0]
        && reach[1] >= op.padding[1]
    {
        // Stride 1: a convolution of x padded by d (k - 1) - p with the flipped kernel, on the
        // im2col path. Its gemm contracts over Ci * kh * kw rather than Ci and writes Co rather
        // than Co * kh * kw values per pixel: 1.4-4x faster than gemm + col2im for the heads'
        // and pyramid's 3x3 convolutions.
        let wf = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let pad = [reach[0] - op.padding[0], reach[1] - op.padding[1]];
        let conv = Conv2d {
            stride: [1, 1],
            padding: pad,
            dilation: op.dilation,
            groups: 1,
        };
        return im2col_conv(x, &wf, &conv);
    }
    let mut out = vec![T::zero(); n * co * plane];
    if n == 0 || ci == 0 || co == 0 {
        return Ok(Tensor::from_vec(out, (n, co, ho, wo), x.device())?);
    }
    let m = co * kh * kw;
    let wt = gemm_operand(&w.reshape((ci, m))?.t()?)?; // [Co*kh*kw, Ci], column-major view
    let x = x.contiguous()?;
    // Tiles of images or of input rows.
    for (b0, nb, r0, r) in tiles(n, h, m * wd * T::DTYPE.size_in_bytes(), IM2COL_TILE_BYTES) {
        let xt = if nb == 1 {
            x.get(b0)?.narrow(1, r0, r)?.contiguous()?.reshape((ci, r * wd))?
        } else {
            // [nb, Ci, H*W] -> [Ci, nb*H*W]: one gemm for a batch of small maps (RoI heads).
            x.narrow(0, b0, nb)?
                .reshape((nb, ci, h * wd))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((ci, nb * h * wd))?
        };
        let cols = wt.matmul(&xt)?; // [Co*kh*kw, nb*r*W]
        let scatter = Col2Im {
            kernel: [kh, kw],
            stride: op.stride,
            padding: op.padding,
            dilation: op.dilation,
            in_w: wd,
            out: out_hw,
            channels: co,
            images: nb,
            rows: (r0, r),
        };
        let dst = &mut out[b0 * co * plane..(b0 + nb) * co * plane];
        with_slice::<T, _>(&cols, |c| scatter.add_into(c, dst))??;
    }
    Ok(Tensor::from_vec(out, (n, co, ho, wo), x.device())?)
}

/// kernel == stride, no padding: `w^T @ x` per image, then interleave the kernel offsets.
fn unpatchify_deconv(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> KernelResult<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (_, o, kh, kw) = w.dims4()?;
    let wt = gemm_operand(&w.reshape((c, o * kh * kw))?.t()?)?; // [O*kh*kw, C]
    let y = if n == 1 {
        wt.matmul(&gemm_operand(&x.reshape((c, h * wd))?)?)?
    } else {
        let x3 = gemm_operand(&x.reshape((n, c, h * wd))?)?;
        wt.unsqueeze(0)?.broadcast_as((n, o * kh * kw, c))?.matmul(&x3)?
    };
    // On CUDA one kernel interleaves the kernel offsets and adds the bias (candle's broadcast
    // add of the permuted view indexes six strided dims per element).
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() && crate::cuda::im2col::run::supports(&y) && b.is_none_or(|b| b.dtype() == y.dtype()) {
        return crate::cuda::im2col::run::unpatchify(&y, b, [n, o, kh, kw, h, wd]);
    }
    // [N, O, kh, kw, H, W] -> [N, O, H, kh, W, kw]
    let y = y.reshape((n, o, kh, kw, h, wd))?.permute((0, 1, 4, 2, 5, 3))?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((1, o, 1, 1, 1, 1))?)?,
        None => y.contiguous()?,
    };
    Ok(y.reshape((n, o, h * kh, wd * kw))?)
}

/// Inserts `s - 1` zeros between consecutive elements along `dim` (length `(n - 1) s + 1`).
pub(crate) fn insert_zeros(x: &Tensor, dim: usize, s: usize) -> candle_core::Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let len = x.dim(dim)?;
    let xu = x.unsqueeze(dim + 1)?;
    let mut zshape = xu.dims().to_vec();
    zshape[dim + 1] = s - 1;
    let z = Tensor::zeros(zshape, x.dtype(), x.device())?;
    let mut merged = x.dims().to_vec();
    merged[dim] = len * s;
    Tensor::cat(&[xu, z], dim + 1)?
        .reshape(merged)?
        .narrow(dim, 0, (len - 1) * s + 1)
}

/// Zero-pads (positive amounts) or crops (negative amounts) both ends of `dim`.
pub(crate) fn pad_or_crop(x: &Tensor, dim: usize, before: isize, after: isize) -> candle_core::Result<Tensor> {
    let mut x = x.clone();
    let len = x.dim(dim)? as isize;
    let (cb, ca) = ((-before).max(0), (-after).max(0));
    if cb > 0 || ca > 0 {
        x = x.narrow(dim, cb as usize, (len - cb - ca).max(0) as usize)?;
    }
    if before > 0 || after > 0 {
        x = x.pad_with_zeros(dim, before.max(0) as usize, after.max(0) as usize)?;
    }
    Ok(x)
}

/// Every `s`-th element along `dim`, starting at 0.
fn subsample(x: &Tensor, dim: usize, s: usize) -> candle_core::Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let n = x.dim(dim)?.div_ceil(s);
    let idx: Vec<u32> = (0..n as u32).map(|i| i * s as u32).collect();
    let idx = Tensor::from_vec(idx, n, x.device())?;
    x.index_select(&idx, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The GEMM weight gradient of a 1x1 convolution (other devices' path), run on the CPU,
    /// equals the CPU kernel's (small integers: exact in any order).
    #[test]
    fn pointwise_grad_weight_is_the_weight_gradient() {
        let ints = |dims: &[usize], seed: usize| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i * 7 + seed) % 9) as f32 - 4.0).collect();
            Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
        };
        let (x, dy) = (ints(&[1, 6, 5, 7], 1), ints(&[1, 3, 5, 7], 2));
        let op = Conv2dGradWeight {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            kernel: [1, 1],
        };
        let want = conv2d_grad_weight(&op, &x, &dy).unwrap();
        let got = pointwise_grad_weight(&x, &dy).unwrap();
        assert_eq!(got.dims(), [3, 6, 1, 1]);
        assert_eq!(super::super::f64_values(&got), super::super::f64_values(&want));
    }
}
