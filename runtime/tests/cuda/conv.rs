//! Convolutions on CUDA, on both engines (the im2col kernel + cuBLAS GEMM per tile, and cuDNN
//! where it loads), against the CPU kernels on the same random inputs: the 3x3 "same"
//! convolution of the pyramid and heads (one large map, and a batch of RoI-sized maps), its
//! weight gradient, and its input gradient (a transposed convolution), plus strided, dilated
//! and asymmetric attributes, and a strided one whose input gradient needs an output padding.
//! Runs where a GPU exists; skipped, saying so, elsewhere. cuDNN is required where `$VITDET_CUDNN` names it, else skipped, saying why.
//! Also the pyramids' 2x2 stride-2 deconvolution (a GEMM and the unpatchify kernel), and the
//! pyramid's max-pool gradients (device tensor ops where windows do not overlap),
//! which select and copy, so they must equal the CPU's exactly.
//!
//! Tolerances (relative L2): f32 1e-5. TF32 is off (candle's default), so both sides multiply
//! in f32 and differ only in summation order: over K = C*kh*kw <= 576 products in the forward
//! and input gradient (a few 1e-7), over N*Ho*Wo <= 19,200 in the weight gradient (about 3e-6
//! estimated for plain f32 accumulation). TF32 would give about 1e-3.
//! f16 3e-3 and bf16 1e-2: the same half inputs; the GPU accumulates in f32 and rounds the
//! output once (2^-11 and 2^-8 relative per element). On the CPU, bf16 is widened to f32, but
//! f16 runs in f16 kernels whose weight gradient is itself a convolution: measured against
//! f32 on these shapes, the CPU's f16 is off by 4e-4 (forward, input gradient) and 1e-3
//! (weight gradient), its bf16 by 2.9e-3, so the GPU-CPU difference of either stays below the
//! bounds.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{rel_l2, Nd, TestRng};
use vitdet_ir::ops::{Conv2d, Conv2dGradWeight, ConvTranspose2d};
use vitdet_runtime::cuda::cudnn::{self, ConvEngine};
use vitdet_runtime::kernels::conv::{conv2d, conv2d_grad_weight, conv_transpose2d};

/// The engines to check: im2col always, cuDNN where it loads (and wherever it is named).
fn engines() -> Vec<ConvEngine> {
    match cudnn::status() {
        Ok(version) => {
            eprintln!("convolutions checked on im2col and {version}");
            vec![ConvEngine::Im2Col, ConvEngine::Cudnn]
        }
        Err(why) => {
            assert!(std::env::var_os("VITDET_CUDNN").is_none(), "{why}");
            eprintln!("cuDNN skipped: {why}");
            vec![ConvEngine::Im2Col]
        }
    }
}

#[test]
fn cudnn_loads_where_named() {
    if std::env::var_os("VITDET_CUDNN").is_none() {
        eprintln!("skipped: VITDET_CUDNN names no cuDNN library");
        return;
    }
    let version = cudnn::status().unwrap();
    assert!(version.starts_with("cuDNN 9."), "{version}");
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 3e-3,
        _ => 1e-2,
    }
}

fn randn(shape: &[usize], rng: &mut TestRng, scale: f64, dtype: DType) -> Tensor {
    Nd::randn(shape, rng, scale, 0.0).tensor_as(dtype)
}

fn on(t: &Tensor, dev: &Device) -> Tensor {
    t.to_device(dev).unwrap()
}

fn check(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    assert!(got.device().is_cuda(), "{what}: output left the GPU");
    assert_eq!(got.dtype(), dtype, "{what}: dtype");
    let e = rel_l2(got, want);
    assert!(e <= tolerance(dtype), "{what}: rel L2 {e:e}");
}

/// Forward, weight gradient and input gradient of one convolution, CUDA against CPU.
fn check_conv(x_dims: [usize; 4], out_channels: usize, kernel: [usize; 2], op: &Conv2d, dtype: DType, dev: &Device) {
    let what = format!("{x_dims:?} -> {out_channels} {kernel:?} {op:?} {dtype:?}");
    let mut rng = TestRng::new(x_dims.iter().product::<usize>() as u64 + out_channels as u64);
    let x = randn(&x_dims, &mut rng, 1.0, dtype);
    let w = randn(&[out_channels, x_dims[1], kernel[0], kernel[1]], &mut rng, 0.2, dtype);
    let b = randn(&[out_channels], &mut rng, 0.5, dtype);

    for engine in engines() {
        cudnn::with_engine(engine, || {
            check_engine(&x, &w, &b, kernel, op, dtype, dev, &format!("{what} {engine:?}"))
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn check_engine(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    kernel: [usize; 2],
    op: &Conv2d,
    dtype: DType,
    dev: &Device,
    what: &str,
) {
    let x_dims = x.dims().to_vec();
    let mut rng = TestRng::new(x.elem_count() as u64 + 7);
    let y = conv2d(op, x, w, Some(b)).unwrap();
    let got = conv2d(op, &on(x, dev), &on(w, dev), Some(&on(b, dev))).unwrap();
    check(&format!("{what}: forward"), &got, &y, dtype);

    let dy = randn(y.dims(), &mut rng, 1.0, dtype);
    let gw = Conv2dGradWeight {
        stride: op.stride,
        padding: op.padding,
        dilation: op.dilation,
        groups: op.groups,
        kernel,
    };
    let want = conv2d_grad_weight(&gw, x, &dy).unwrap();
    let got = conv2d_grad_weight(&gw, &on(x, dev), &on(&dy, dev)).unwrap();
    check(&format!("{what}: weight gradient"), &got, &want, dtype);

    // The input gradient: the transposed convolution of dy, with the output padding that
    // restores x's size.
    let (h, wd) = (x_dims[2], x_dims[3]);
    let (ho, wo) = (y.dim(2).unwrap(), y.dim(3).unwrap());
    let restore = |size: usize, out: usize, d: usize| {
        let k = kernel[d];
        size + 2 * op.padding[d] - ((out - 1) * op.stride[d] + op.dilation[d] * (k - 1) + 1)
    };
    let tr = ConvTranspose2d {
        stride: op.stride,
        padding: op.padding,
        output_padding: [restore(h, ho, 0), restore(wd, wo, 1)],
        dilation: op.dilation,
    };
    let wt = w.clone();
    let want = conv_transpose2d(&tr, &dy, &wt, None).unwrap();
    assert_eq!(want.dims(), x_dims, "{what}: input gradient shape");
    let got = conv_transpose2d(&tr, &on(&dy, dev), &on(&wt, dev), None).unwrap();
    check(&format!("{what}: input gradient"), &got, &want, dtype);
}

#[test]
fn pyramid_and_head_3x3_convolutions() {
    let Some(dev) = common::cuda_device() else { return };
    let same = Conv2d {
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // One map large enough to be split into row tiles (32 MiB of columns in f32 at
        // 64 channels x 9 taps x 160 columns is 2.5 MiB a row: 13 rows a tile).
        check_conv([1, 64, 120, 160], 64, [3, 3], &same, dtype, &dev);
        // A batch of RoI maps (the mask head's 14 x 14), several images a tile.
        check_conv([37, 32, 14, 14], 48, [3, 3], &same, dtype, &dev);
    }
}

/// The RPN's 1x1 objectness and box-delta layers and a pyramid lateral at ViT-B's sizes, one
/// image: their weight gradients run as one GEMM on CUDA.
#[test]
fn rpn_and_pyramid_1x1_convolutions() {
    let Some(dev) = common::cuda_device() else { return };
    let pointwise = Conv2d {
        stride: [1, 1],
        padding: [0, 0],
        dilation: [1, 1],
        groups: 1,
    };
    for dtype in [DType::F32, DType::BF16] {
        check_conv([1, 256, 64, 64], 3, [1, 1], &pointwise, dtype, &dev);
        check_conv([1, 256, 32, 40], 12, [1, 1], &pointwise, dtype, &dev);
        check_conv([1, 768, 32, 32], 256, [1, 1], &pointwise, dtype, &dev);
    }
}

#[test]
fn strided_dilated_and_asymmetric_convolutions() {
    let Some(dev) = common::cuda_device() else { return };
    for (kernel, stride, padding, dilation) in [
        ([3, 3], [2, 2], [1, 1], [1, 1]),
        ([3, 2], [1, 1], [2, 0], [2, 1]),
        ([5, 3], [2, 1], [1, 2], [1, 2]),
    ] {
        let op = Conv2d {
            stride,
            padding,
            dilation,
            groups: 1,
        };
        check_conv([2, 6, 17, 19], 5, kernel, &op, DType::F32, &dev);
    }
    // Stride 2 over an even map: the input gradient is a transposed convolution with output
    // padding [1, 1] (16 -> 8 -> 16), in every dtype.
    let op = Conv2d {
        stride: [2, 2],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        check_conv([2, 6, 16, 18], 5, [3, 3], &op, dtype, &dev);
    }
}

/// cuDNN refuses tensors with a zero extent; the runtime answers an empty batch (of RoIs, say)
/// without calling it.
/// The pyramids' 2x2 stride-2 deconvolution with its bias (one GEMM, then the unpatchify
/// kernel on the GPU), in a batch of two with a non-square map, against the CPU.
#[test]
fn pyramid_2x2_deconvolution_with_bias() {
    let Some(dev) = common::cuda_device() else { return };
    let up = ConvTranspose2d::upsample(2);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut rng = TestRng::new(29);
        let x = randn(&[2, 96, 12, 20], &mut rng, 1.0, dtype);
        let w = randn(&[96, 48, 2, 2], &mut rng, 0.1, dtype);
        let b = randn(&[48], &mut rng, 0.5, dtype);
        let want = conv_transpose2d(&up, &x, &w, Some(&b)).unwrap();
        let got = conv_transpose2d(&up, &on(&x, &dev), &on(&w, &dev), Some(&on(&b, &dev))).unwrap();
        assert_eq!(got.dims(), [2, 48, 24, 40]);
        check(&format!("2x2 deconvolution {dtype:?}"), &got, &want, dtype);
    }
}

#[test]
fn an_empty_batch_on_cudnn_gives_an_empty_output_and_a_zero_weight_gradient() {
    let Some(dev) = common::cuda_device() else { return };
    if !engines().contains(&ConvEngine::Cudnn) {
        return;
    }
    let same = Conv2d::same(1);
    let x = Tensor::zeros((0, 4, 8, 8), DType::F32, &dev).unwrap();
    let w = Tensor::ones((3, 4, 3, 3), DType::F32, &dev).unwrap();
    let dy = Tensor::zeros((0, 3, 8, 8), DType::F32, &dev).unwrap();
    let gw = Conv2dGradWeight {
        stride: same.stride,
        padding: same.padding,
        dilation: same.dilation,
        groups: 1,
        kernel: [3, 3],
    };
    cudnn::with_engine(ConvEngine::Cudnn, || {
        let y = conv2d(&same, &x, &w, None).unwrap();
        assert_eq!(y.dims(), [0, 3, 8, 8]);
        let g = conv2d_grad_weight(&gw, &x, &dy).unwrap();
        assert_eq!(g.dims(), [3, 4, 3, 3]);
        let total: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(total, 0.0, "weight gradient over no images");
    });
}

/// The max-pool gradients of detectron2's pyramid on the GPU equal the CPU's host loop exactly:
/// `simfp_5`'s 2x2 stride-2 pool of ViT-B's 768 x 64 x 64 map (ties included: the input is
/// rounded to a few values) and `LastLevelMaxPool`'s kernel-1 stride-2 one, in f32 and bf16.
#[test]
fn pyramid_max_pool_gradients_equal_the_cpu() {
    use vitdet_ir::ops::MaxPool2dGrad;
    use vitdet_runtime::kernels::pool::max_pool2d_grad;
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(5);
    for dtype in [DType::F32, DType::BF16] {
        for (kernel, stride, c, side) in [(2, 2, 768, 64), (1, 2, 256, 16), (2, 2, 8, 7)] {
            let x = Nd::randn(&[1, c, side, side], &mut rng, 2.0, 0.0)
                .tensor_as(dtype)
                .round()
                .unwrap();
            let out = (side - kernel) / stride + 1;
            let dy = Nd::randn(&[1, c, out, out], &mut rng, 1.0, 0.0).tensor_as(dtype);
            let op = MaxPool2dGrad {
                kernel: [kernel, kernel],
                stride: [stride, stride],
                padding: [0, 0],
            };
            let cpu = max_pool2d_grad(&op, &x, &dy).unwrap();
            let gpu = max_pool2d_grad(&op, &x.to_device(&dev).unwrap(), &dy.to_device(&dev).unwrap()).unwrap();
            assert!(gpu.device().is_cuda());
            let (g, w) = (Nd::from_tensor(&gpu), Nd::from_tensor(&cpu));
            assert!(
                g.data == w.data,
                "max_pool2d_grad k{kernel} s{stride} {c}x{side}^2 {dtype:?} differs"
            );
        }
    }
}
