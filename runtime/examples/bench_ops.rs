//! Times the hot kernels at ViT-B / 1024x1024 sizes on the CPU:
//! `cargo run --release -p vitdet-runtime --example bench_ops [filter]`
//! (set `VITDET_DEFAULT_MALLOC=1` to skip `alloc::retain_freed_memory`).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use vitdet_ir::ops::*;
use vitdet_ir::Op;
use vitdet_runtime::kernels;

fn time(name: &str, filter: &Option<String>, reps: usize, mut f: impl FnMut() -> Tensor) {
    if let Some(flt) = filter {
        if !name.contains(flt.as_str()) {
            return;
        }
    }
    let _ = f(); // warm up
    let t0 = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    println!("{name:60} {:9.2} ms", t0.elapsed().as_secs_f64() * 1e3 / reps as f64);
}

fn exec(op: impl Into<Op>, ins: &[&Tensor]) -> Tensor {
    let ins: Vec<Tensor> = ins.iter().map(|t| (*t).clone()).collect();
    kernels::execute(&op.into(), &ins).unwrap().remove(0)
}

fn main() {
    let filter = std::env::args().nth(1);
    if std::env::var_os("VITDET_DEFAULT_MALLOC").is_none() {
        println!("retain_freed_memory: {}", vitdet_runtime::alloc::retain_freed_memory());
    }
    let dev = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
    let x = r(&[1, 64, 64, 768]);
    let w = r(&[2304, 768]);
    let b = r(&[2304]);
    time("linear qkv [4096,768]x[2304,768]^T", &filter, 3, || {
        exec(Linear {}, &[&x, &w, &b])
    });
    let w2 = r(&[3072, 768]);
    let b2 = r(&[3072]);
    time("linear fc1 [4096,768]x[3072,768]^T", &filter, 3, || {
        exec(Linear {}, &[&x, &w2, &b2])
    });
    let q = r(&[12, 4096, 64]);
    let k = r(&[12, 4096, 64]);
    time("matmul q@k^T global [12,4096,64]", &filter, 2, || {
        exec(MatMul::new(true), &[&q, &k])
    });
    let s = r(&[12, 4096, 4096]);
    time("softmax last [12,4096,4096] fused", &filter, 2, || {
        exec(Softmax { axis: 2 }, &[&s])
    });
    time("softmax last [12,4096,4096] portable", &filter, 1, || {
        kernels::attention::softmax_portable(&Softmax { axis: 2 }, &s).unwrap()
    });
    time("matmul attn@v global [12,4096,4096]x[12,4096,64]", &filter, 2, || {
        exec(MatMul::new(false), &[&s, &q])
    });
    drop(s);
    let qw = r(&[300, 196, 64]);
    time("matmul q@k^T window [300,196,64]", &filter, 3, || {
        exec(MatMul::new(true), &[&qw, &qw])
    });
    let sw = r(&[300, 196, 196]);
    time("softmax window [300,196,196]", &filter, 3, || {
        exec(Softmax { axis: 2 }, &[&sw])
    });
    let h = r(&[1, 64, 64, 3072]);
    time("gelu [4096,3072]", &filter, 3, || {
        exec(Unary { kind: UnaryKind::Gelu }, &[&h])
    });
    time("gelu [4096,3072] candle gelu_erf", &filter, 3, || h.gelu_erf().unwrap());
    time("add [4096,3072]", &filter, 3, || {
        exec(Binary { kind: BinaryKind::Add }, &[&h, &h])
    });
    let g = r(&[768]);
    time("layer_norm last [4096,768]", &filter, 5, || {
        exec(LayerNorm { axis: 3, eps: 1e-6 }, &[&x, &g, &g])
    });
    time("layer_norm last portable [4096,768]", &filter, 5, || {
        kernels::norm::layer_norm_portable(&LayerNorm { axis: 3, eps: 1e-6 }, &x, &g, &g).unwrap()
    });
    let f = r(&[1, 256, 256, 256]);
    let g256 = r(&[256]);
    time("channel layer_norm axis1 [1,256,256,256]", &filter, 3, || {
        exec(LayerNorm { axis: 1, eps: 1e-6 }, &[&f, &g256, &g256])
    });
    time("channel layer_norm portable [1,256,256,256]", &filter, 2, || {
        kernels::norm::layer_norm_portable(&LayerNorm { axis: 1, eps: 1e-6 }, &f, &g256, &g256).unwrap()
    });
    time("permute NHWC->NCHW [1,64,64,768]", &filter, 5, || {
        exec(Permute { perm: vec![0, 3, 1, 2] }, &[&x])
    });
    time("pad window [1,64,64,768]->[1,70,70,768]", &filter, 5, || {
        exec(
            Pad {
                pads: vec![[0, 0], [0, 6], [0, 6], [0, 0]],
            },
            &[&x],
        )
    });
    let img = r(&[1, 3, 1024, 1024]);
    let pw = r(&[768, 3, 16, 16]);
    let pb = r(&[768]);
    time("patch embed conv 16x16/16 (patchify gemm)", &filter, 3, || {
        exec(
            Conv2d {
                stride: [16, 16],
                padding: [0, 0],
                dilation: [1, 1],
                groups: 1,
            },
            &[&img, &pw, &pb],
        )
    });
    time("patch embed conv 16x16/16 (candle conv2d)", &filter, 1, || {
        img.conv2d(&pw, 0, 16, 1, 1).unwrap()
    });
    let xc = r(&[1, 768, 64, 64]);
    let dw = r(&[768, 384, 2, 2]);
    let db = r(&[384]);
    time("deconv 2x2/2 [1,768,64,64] (gemm)", &filter, 3, || {
        exec(ConvTranspose2d::upsample(2), &[&xc, &dw, &db])
    });
    time("deconv 2x2/2 [1,768,64,64] (candle)", &filter, 1, || {
        xc.conv_transpose2d(&dw, 0, 0, 2, 1).unwrap()
    });
    let c3 = r(&[1, 256, 128, 128]);
    let w3 = r(&[256, 256, 3, 3]);
    time("conv 3x3 [1,256,128,128] (im2col gemm)", &filter, 2, || {
        exec(Conv2d::same(1), &[&c3, &w3])
    });
    time("conv 3x3 [1,256,128,128] (candle)", &filter, 2, || {
        c3.conv2d(&w3, 1, 1, 1, 1).unwrap()
    });
    let c1 = r(&[1, 256, 256, 256]);
    time("conv 3x3 [1,256,256,256] (im2col gemm, tiled)", &filter, 1, || {
        exec(Conv2d::same(1), &[&c1, &w3])
    });
    // The 3x3 convolutions of the Mask R-CNN heads and the pyramid / RPN at 1024x1024.
    for (name, shape, reps) in [
        ("conv 3x3 box head [1000,256,7,7]", [1000, 256, 7, 7], 1),
        ("conv 3x3 mask head [100,256,14,14]", [100, 256, 14, 14], 2),
        ("conv 3x3 p2 [1,256,256,256]", [1, 256, 256, 256], 1),
        ("conv 3x3 p4 [1,256,64,64]", [1, 256, 64, 64], 5),
    ] {
        let xs = r(&shape);
        let gflop = 2.0 * (shape.iter().product::<usize>() * 256 * 9) as f64 * 1e-9;
        time(&format!("{name} ({gflop:.1} GFLOP)"), &filter, reps, || {
            exec(Conv2d::same(1), &[&xs, &w3])
        });
    }
    let pos = r(&[1, 768, 14, 14]);
    let bic = Resize {
        size: [64, 64],
        mode: ResizeMode::Bicubic,
        align_corners: false,
    };
    time("bicubic [1,768,14,14]->64x64", &filter, 3, || {
        exec(bic.clone(), &[&pos])
    });
    time("bicubic [1,768,14,14]->64x64 portable", &filter, 3, || {
        kernels::resize::resize_portable(&bic, &pos).unwrap()
    });
    let _ = DType::F32;
}
