//! The im2col CUDA kernel, run by the host emulator: its columns element for element against a
//! direct reading of the layout `Im2ColTile` documents (whole inputs, tiles of images and of
//! rows, stride, asymmetric padding and dilation, kernels larger than the input), in f32 and in
//! the half types (a copy, so exact in every dtype); and `w @ columns` against the runtime's
//! CPU `conv2d`, which ties the layout to the convolution the CUDA path computes from it
//! (relative L2 1e-6: the same products, summed in another order by another GEMM). And the
//! unpatchify kernel of kernel-equals-stride transposed convolutions: the CPU's permute and
//! bias add, bit for bit.

use candle_core::DType;
use common::{rel_l2, Rng};

mod common;
use vitdet_cuda_emu::im2col::{columns, unpatchify};
use vitdet_ir::ops::Conv2d;
use vitdet_runtime::cuda::im2col::Im2ColTile;
use vitdet_runtime::kernels::conv::conv2d;

/// The columns read straight from the definition: row `(c, a, b)`, column `(i, y, z)` holds
/// `x[b0 + i, c, (r0 + y) sh + a dh - ph, z sw + b dw - pw]`, zero outside.
fn reference(x: &[f32], [_, c, h, w]: [usize; 4], t: &Im2ColTile) -> Vec<f32> {
    let [kh, kw] = t.kernel;
    let (b0, nb) = t.images;
    let (r0, r) = t.rows;
    let mut out = Vec::new();
    for ci in 0..c {
        for a in 0..kh {
            for b in 0..kw {
                for i in 0..nb {
                    for y in 0..r {
                        for z in 0..t.out_w {
                            let iy = ((r0 + y) * t.stride[0] + a * t.dilation[0]) as isize - t.padding[0] as isize;
                            let ix = (z * t.stride[1] + b * t.dilation[1]) as isize - t.padding[1] as isize;
                            let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                            out.push(if inside {
                                x[(((b0 + i) * c + ci) * h + iy as usize) * w + ix as usize]
                            } else {
                                0.0
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// The convolution's output size along one axis.
fn out_size(size: usize, k: usize, s: usize, p: usize, d: usize) -> usize {
    (size + 2 * p - d * (k - 1) - 1) / s + 1
}

/// A whole-input tile of the convolution with these attributes over `dims`.
fn full_tile(
    dims: [usize; 4],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
) -> Im2ColTile {
    let ho = out_size(dims[2], kernel[0], stride[0], padding[0], dilation[0]);
    let wo = out_size(dims[3], kernel[1], stride[1], padding[1], dilation[1]);
    Im2ColTile {
        kernel,
        stride,
        padding,
        dilation,
        out_w: wo,
        images: (0, dims[0]),
        rows: (0, ho),
    }
}

fn check_exact(dims: [usize; 4], tile: &Im2ColTile, dtype: DType) {
    let what = format!("{dims:?} {tile:?} {dtype:?}");
    let mut rng = Rng(dims.iter().fold(tile.out_w as u64 + 3, |a, &d| a * 131 + d as u64));
    // Values exact in every dtype (multiples of 1/8 below 16), so the copy is compared bit for
    // bit after the round trip through f32.
    let x = (rng.tensor(&dims, 16.0) * 8.0)
        .unwrap()
        .round()
        .unwrap()
        .affine(0.125, 0.0)
        .unwrap();
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let got = columns(&x.to_dtype(dtype).unwrap(), tile).unwrap();
    let [rows, cols] = tile.columns_shape(dims[1]);
    assert_eq!(got.dims(), [rows, cols], "{what}");
    let got: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = reference(&xs, dims, tile);
    let wrong = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count();
    assert_eq!(wrong, 0, "{what}: {wrong} of {} columns elements differ", want.len());
}

#[test]
fn columns_match_the_layout_in_every_dtype() {
    let dims = [2, 3, 7, 9];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // The pyramid's and heads' 3x3 "same" convolution, whole input.
        let t = full_tile(dims, [3, 3], [1, 1], [1, 1], [1, 1]);
        check_exact(dims, &t, dtype);
        // Tiles: one image's middle rows; both images' last row.
        check_exact(
            dims,
            &Im2ColTile {
                images: (1, 1),
                rows: (2, 3),
                ..t
            },
            dtype,
        );
        check_exact(
            dims,
            &Im2ColTile {
                images: (0, 2),
                rows: (6, 1),
                ..t
            },
            dtype,
        );
    }
}

#[test]
fn columns_of_strided_dilated_and_oversized_kernels() {
    let dims = [1, 2, 8, 11];
    for (kernel, stride, padding, dilation) in [
        ([3, 2], [2, 2], [1, 0], [2, 1]),
        ([1, 3], [1, 2], [0, 2], [1, 3]),
        ([5, 5], [3, 1], [2, 2], [1, 1]),
        // Wider than the input: only the padding makes room.
        ([3, 13], [1, 1], [1, 2], [1, 1]),
    ] {
        let t = full_tile(dims, kernel, stride, padding, dilation);
        check_exact(dims, &t, DType::F32);
        check_exact(
            dims,
            &Im2ColTile {
                rows: (1, t.rows.1 - 1),
                ..t
            },
            DType::F32,
        );
    }
}

#[test]
fn weight_times_columns_is_the_convolution() {
    let mut rng = Rng(5);
    let (n, c, h, w, o) = (3, 4, 9, 10, 5);
    let x = rng.tensor(&[n, c, h, w], 1.0);
    for (kernel, stride, padding, dilation) in [([3, 3], [1, 1], [1, 1], [1, 1]), ([3, 2], [2, 1], [2, 0], [1, 2])] {
        let wt = rng.tensor(&[o, c, kernel[0], kernel[1]], 0.5);
        let op = Conv2d {
            stride,
            padding,
            dilation,
            groups: 1,
        };
        let want = conv2d(&op, &x, &wt, None).unwrap();
        let (_, _, ho, wo) = want.dims4().unwrap();
        let t = full_tile([n, c, h, w], kernel, stride, padding, dilation);
        let cols = columns(&x, &t).unwrap();
        let got = wt
            .reshape((o, c * kernel[0] * kernel[1]))
            .unwrap()
            .matmul(&cols)
            .unwrap()
            .reshape((o, n, ho, wo))
            .unwrap()
            .permute((1, 0, 2, 3))
            .unwrap();
        let e = rel_l2(&got, &want);
        assert!(e <= 1e-6, "{op:?} kernel {kernel:?}: rel L2 {e:e}");
    }
}

/// The product `[n, o * kh * kw, h * w]` of a kernel-equals-stride deconvolution, interleaved
/// and biased by the kernel, against the CPU path's permute and broadcast add: the same bits in
/// every dtype (a copy, or one f32 add rounded once as candle's half-type add), with and without
/// the bias, square and non-square kernels, and blocks that stride over the output.
#[test]
fn unpatchify_gives_the_cpu_permute_and_bias_bits() {
    use candle_core::{Device, Tensor};
    use vitdet_runtime::cuda::Launch;
    let mut rng = Rng(11);
    for (dims, launch) in [
        ([2usize, 3, 2, 2, 5, 4], None),
        ([1, 4, 2, 3, 3, 7], None),
        ([1, 5, 2, 2, 6, 6], Some(Launch::linear(2, 64))),
    ] {
        let [n, o, kh, kw, h, w] = dims;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let y = rng.tensor(&[n, o * kh * kw, h * w], 2.0).to_dtype(dtype).unwrap();
            let b = rng.tensor(&[o], 1.0).to_dtype(dtype).unwrap();
            let permuted = y
                .reshape((n, o, kh, kw, h, w))
                .unwrap()
                .permute((0, 1, 4, 2, 5, 3))
                .unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
            };
            for bias in [None, Some(&b)] {
                let want = match bias {
                    Some(b) => permuted.broadcast_add(&b.reshape((1, o, 1, 1, 1, 1)).unwrap()).unwrap(),
                    None => permuted.contiguous().unwrap(),
                };
                let want = want.reshape((n, o, h * kh, w * kw)).unwrap();
                let got = unpatchify(&y, bias, dims, launch).unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.device().location(), Device::Cpu.location());
                assert_eq!(bits(&got), bits(&want), "{dims:?} {dtype:?} bias {}", bias.is_some());
            }
        }
    }
}
