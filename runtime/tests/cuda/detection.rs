//! The detection CUDA kernels against the CPU kernels at detector sizes (skipped without a
//! CUDA device): top-k over one RPN level of a 1024 x 1024 image, NMS over the RPN's and the
//! box head's candidates, multi-level RoIAlign forward and backward, box decoding and
//! clipping, the heads' losses with their gradients (device tensor ops), the mask targets
//! (RoIAlign on the gt masks, on the device), and the anchors a program keeps on the device
//! across runs.
//!
//! Tolerances:
//! * top-k and NMS: exact, in every dtype (they select and order; the kernels compare the
//!   same values as the CPU kernels: scores as order-preserving keys, IoUs in f64 with the
//!   same operations).
//! * RoIAlign f32: relative L2 1e-5. Positions, taps and weights are the CPU kernel's (f64);
//!   the kernels accumulate in f32 where the CPU kernel uses f64 (forward), and add f32
//!   contributions by atomics in any order (backward). With tens of terms per value the f32
//!   rounding stays near 1e-7 relative.
//! * box decoding and clipping: the same f64 operations on both sides, rounded once to f32;
//!   CUDA's f64 `exp` and the host's may differ in the last f64 place, which survives the
//!   rounding to f32 at most as one f32 unit: 1e-6 relative per coordinate (plus 1e-3 absolute
//!   near 0), NaN where the CPU has NaN.
//! * losses and gradients (f32): relative 1e-6 per value, the device summing in another order
//!   than the host's f64 loop before the result is rounded to f32.
//! * mask targets: at most 0.1% of pixels may differ from the CPU's (detectron2's exact values):
//!   a bin's average of 0/1 samples thresholded at 0.5 can land on the other side when the GPU
//!   sums it in f32 where the CPU uses f64.
//! * RoIAlign bf16 / f16: relative L2 2^-8 / 2^-11 (one unit in the last place of the
//!   format): both sides round the same value once to the storage type, and values within
//!   f32 rounding of a rounding boundary may land on neighbouring representable values.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{rel_l2, TestRng};
use vitdet_ir::ops::{
    Anchors, BoxDecode, ClipBoxes, LossNorm, Nms, RoiAlign, RoiAlignGrad, SigmoidBceLoss, SigmoidBceLossGrad,
    SmoothL1Loss, SmoothL1LossGrad, SoftmaxCrossEntropyLoss, SoftmaxCrossEntropyLossGrad, TopK,
};
use vitdet_runtime::cuda::detection::run;
use vitdet_runtime::kernels::detection as cpu;
use vitdet_runtime::kernels::loss;

fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn host_i64(t: &Tensor) -> Vec<i64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
}

fn host_u8(t: &Tensor) -> Vec<u8> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

// ------------------------------------------------------------------------------- top-k

/// GPU and CPU top-k of `x` (a CPU tensor) in `dtype`: identical indices and values.
fn check_top_k(dev: &Device, x: &Tensor, k: usize, dtype: DType) {
    let op = TopK { k };
    let x = x.to_dtype(dtype).unwrap();
    let xg = x.to_device(dev).unwrap();
    assert!(run::top_k_supported(&op, &xg), "top_k {k} of {:?} {dtype:?}", x.dims());
    let got = run::top_k(&op, &xg).unwrap();
    let want = cpu::top_k(&op, &x).unwrap();
    let what = format!("top_k {k} of {:?} {dtype:?}", x.dims());
    let (gi, wi) = (host_i64(&got[1]), host_i64(&want[1]));
    assert!(
        gi == wi,
        "{what}: indices differ first at {:?}",
        gi.iter().zip(&wi).position(|(a, b)| a != b)
    );
    let (gv, wv) = (host_f32(&got[0]), host_f32(&want[0]));
    assert!(
        gv.iter()
            .zip(&wv)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())),
        "{what}: values differ"
    );
}

/// Logits on a grid of 1/64 (many ties at f32 and below), with a few NaN and infinities.
fn logits(rng: &mut TestRng, n: usize) -> Tensor {
    let v: Vec<f32> = (0..n)
        .map(|_| match rng.next_u64() % 1000 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            _ => (rng.normal() * 256.0).round() as f32 / 64.0,
        })
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

#[test]
fn top_k_rpn_level_of_a_1024_image() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(1);
    // p2 at 1024 x 1024: 256 x 256 locations x 3 anchors.
    let x = logits(&mut rng, 196_608);
    for k in [1000, 2000, 4096] {
        check_top_k(&dev, &x, k, DType::F32);
    }
    for dtype in [DType::F16, DType::BF16] {
        check_top_k(&dev, &x, 2000, dtype);
    }
    // Two images, and short rows (one block each).
    let x2 = Tensor::cat(&[&x, &logits(&mut rng, 196_608)], 0)
        .unwrap()
        .reshape((2, 196_608))
        .unwrap();
    check_top_k(&dev, &x2, 1000, DType::F32);
    let short = logits(&mut rng, 300 * 81).reshape((300, 81)).unwrap();
    check_top_k(&dev, &short, 10, DType::F32);
}

// ------------------------------------------------------------------------------- boxes

/// The RPN's decode of 2000 top-k anchors and the box head's class-specific decode of 1000
/// proposals, then clipping to the image, on the GPU (the box kernels, no host copy) and the CPU
/// (within 1e-6 relative: the GPU's f64 exp is within an ulp of the host's).
#[test]
fn box_decode_and_clip_rpn_and_box_head() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(4);
    let mut uniform =
        |n: usize, lo: f64, hi: f64| -> Vec<f32> { (0..n).map(|_| (lo + (hi - lo) * rng.uniform()) as f32).collect() };
    let clamp = (1000.0f64 / 16.0).ln();
    for (n, k, weights) in [(2000, 1, [1.0; 4]), (1000, 80, [10.0, 10.0, 5.0, 5.0])] {
        let op = BoxDecode {
            weights,
            scale_clamp: clamp,
        };
        // Boxes inside a 1024 image; deltas wide enough to hit the scale clamp and leave it.
        let corners = uniform(n * 2, 0.0, 900.0);
        let sizes = uniform(n * 2, 1.0, 300.0);
        let boxes: Vec<f32> = (0..n)
            .flat_map(|i| {
                let (x, y) = (corners[2 * i], corners[2 * i + 1]);
                [x, y, x + sizes[2 * i], y + sizes[2 * i + 1]]
            })
            .collect();
        let boxes = Tensor::from_vec(boxes, (n, 4), &Device::Cpu).unwrap();
        let deltas = Tensor::from_vec(uniform(n * 4 * k, -6.0, 6.0), (n, 4 * k), &Device::Cpu).unwrap();
        let want = cpu::box_decode(&op, &deltas, &boxes).unwrap();
        let got = cpu::box_decode(&op, &deltas.to_device(&dev).unwrap(), &boxes.to_device(&dev).unwrap()).unwrap();
        assert!(got.device().is_cuda());
        let clip = ClipBoxes {
            width: 1024.0,
            height: 1024.0,
        };
        let want_clipped = cpu::clip_boxes(&clip, &want.reshape((n * k, 4)).unwrap()).unwrap();
        let got_clipped = cpu::clip_boxes(&clip, &got.reshape((n * k, 4)).unwrap()).unwrap();
        for (what, g, w) in [("decoded", &got, &want), ("clipped", &got_clipped, &want_clipped)] {
            for (i, (a, b)) in host_f32(g).iter().zip(host_f32(w)).enumerate() {
                let close = (a - b).abs() <= 1e-6 * b.abs() + 1e-3;
                assert!(close || (a.is_nan() && b.is_nan()), "{what} [{n}, {k}] {i}: {a} vs {b}");
            }
        }
    }
}

// ------------------------------------------------------------------------------- losses

/// The RPN's objectness BCE and box L1 over 261,888 anchors (256 sampled), the mask head's
/// BCE over 128 RoIs of 28x28 pixels and the box predictor's cross-entropy, with their
/// gradients, on the GPU and the CPU.
#[test]
fn losses_of_the_rpn_and_the_mask_head() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(5);
    let mut values =
        |n: usize, f: &mut dyn FnMut(f64) -> f64| -> Vec<f32> { (0..n).map(|_| f(rng.uniform()) as f32).collect() };
    let anchors = 261_888;
    let logits = values(anchors, &mut |u| 8.0 * u - 4.0);
    let objectness = values(anchors, &mut |u| (u < 0.1) as u8 as f64);
    let sampled = values(anchors, &mut |u| (u < 256.0 / 261_888.0) as u8 as f64);
    let deltas = values(anchors * 4, &mut |u| 2.0 * u - 1.0);
    let targets = values(anchors * 4, &mut |u| 2.0 * u - 1.0);
    let masks = values(128 * 784, &mut |u| 6.0 * u - 3.0);
    let mask_targets = values(128 * 784, &mut |u| (u < 0.4) as u8 as f64);
    let fg = values(128, &mut |u| (u < 0.8) as u8 as f64);
    let t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap();
    let dloss = Tensor::new(0.7f32, &Device::Cpu).unwrap();
    let rpn = LossNorm::Constant { value: 256.0 };
    let mean = LossNorm::WeightedMean;
    let bce_inputs = [
        (
            vec![
                t(&logits, &[anchors]),
                t(&objectness, &[anchors]),
                t(&sampled, &[anchors]),
            ],
            rpn,
        ),
        (
            vec![
                t(&masks, &[128, 28, 28]),
                t(&mask_targets, &[128, 28, 28]),
                t(&fg, &[128]),
            ],
            mean,
        ),
    ];
    let l1 = vec![
        t(&deltas, &[anchors, 4]),
        t(&targets, &[anchors, 4]),
        t(&objectness, &[anchors]),
    ];
    let on = |x: &[Tensor]| x.iter().map(|t| t.to_device(&dev).unwrap()).collect::<Vec<_>>();
    let with_dloss = |x: &[Tensor]| x.iter().cloned().chain([dloss.clone()]).collect::<Vec<_>>();
    let check = |what: &str, got: Tensor, want: Tensor| {
        assert!(got.device().is_cuda(), "{what} left the GPU");
        for (i, (a, b)) in host_f32(&got).iter().zip(host_f32(&want)).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-12, "{what} [{i}]: {a} vs {b}");
        }
    };
    for (x, norm) in &bce_inputs {
        let (op, grad) = (SigmoidBceLoss { norm: *norm }, SigmoidBceLossGrad { norm: *norm });
        check(
            "bce",
            loss::sigmoid_bce_loss(&op, &on(x)).unwrap(),
            loss::sigmoid_bce_loss(&op, x).unwrap(),
        );
        let (gx, cx) = (on(&with_dloss(x)), with_dloss(x));
        check(
            "bce grad",
            loss::sigmoid_bce_loss_grad(&grad, &gx).unwrap(),
            loss::sigmoid_bce_loss_grad(&grad, &cx).unwrap(),
        );
    }
    // The box predictor's cross-entropy over 512 RoIs of 81 classes, labels proven in range.
    let class_logits = values(512 * 81, &mut |u| 10.0 * u - 5.0);
    let labels: Vec<i64> = (0..512).map(|i| (i * 37 % 81) as i64).collect();
    let ce = vec![
        t(&class_logits, &[512, 81]),
        Tensor::from_vec(labels, 512, &Device::Cpu).unwrap(),
        Tensor::ones(512, DType::F32, &Device::Cpu).unwrap(),
    ];
    let op = SoftmaxCrossEntropyLoss {
        norm: mean,
        labels_in_range: true,
    };
    let grad = SoftmaxCrossEntropyLossGrad {
        norm: mean,
        labels_in_range: true,
    };
    let want = loss::softmax_cross_entropy_loss(&op, &ce).unwrap();
    check("ce", loss::softmax_cross_entropy_loss(&op, &on(&ce)).unwrap(), want);
    let (gx, cx) = (on(&with_dloss(&ce)), with_dloss(&ce));
    let want = loss::softmax_cross_entropy_loss_grad(&grad, &cx).unwrap();
    check(
        "ce grad",
        loss::softmax_cross_entropy_loss_grad(&grad, &gx).unwrap(),
        want,
    );
    let (op, grad) = (
        SmoothL1Loss { beta: 0.0, norm: rpn },
        SmoothL1LossGrad { beta: 0.0, norm: rpn },
    );
    check(
        "l1",
        loss::smooth_l1_loss(&op, &on(&l1)).unwrap(),
        loss::smooth_l1_loss(&op, &l1).unwrap(),
    );
    let (gx, cx) = (on(&with_dloss(&l1)), with_dloss(&l1));
    check(
        "l1 grad",
        loss::smooth_l1_loss_grad(&grad, &gx).unwrap(),
        loss::smooth_l1_loss_grad(&grad, &cx).unwrap(),
    );
}

// ------------------------------------------------------------------------------- NMS

struct NmsInputs {
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    valid: Tensor,
}

/// `n` boxes clustered around `clusters` centres of a 1024 image, scores from `score`, group
/// ids below `groups`, about 5% invalid.
fn nms_inputs(
    rng: &mut TestRng,
    n: usize,
    clusters: usize,
    groups: u64,
    score: impl Fn(&mut TestRng) -> f32,
) -> NmsInputs {
    let centres: Vec<(f64, f64)> = (0..clusters)
        .map(|_| (rng.uniform() * 1024.0, rng.uniform() * 1024.0))
        .collect();
    let mut b = Vec::with_capacity(4 * n);
    for _ in 0..n {
        let (cx, cy) = centres[(rng.next_u64() % clusters as u64) as usize];
        let (cx, cy) = (cx + rng.normal() * 10.0, cy + rng.normal() * 10.0);
        let (w, h) = (16.0 + rng.uniform() * 200.0, 16.0 + rng.uniform() * 200.0);
        b.extend([cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0].map(|v| v.clamp(0.0, 1024.0) as f32));
    }
    let s: Vec<f32> = (0..n).map(|_| score(rng)).collect();
    let g: Vec<i64> = (0..n).map(|_| (rng.next_u64() % groups) as i64).collect();
    let v: Vec<u8> = (0..n).map(|_| !rng.next_u64().is_multiple_of(20) as u8).collect();
    NmsInputs {
        boxes: Tensor::from_vec(b, (n, 4), &Device::Cpu).unwrap(),
        scores: Tensor::from_vec(s, n, &Device::Cpu).unwrap(),
        groups: Tensor::from_vec(g, n, &Device::Cpu).unwrap(),
        valid: Tensor::from_vec(v, n, &Device::Cpu).unwrap(),
    }
}

/// GPU and CPU NMS in `dtype`: identical keep lists and flags; returns the kept count.
fn check_nms(dev: &Device, op: &Nms, x: &NmsInputs, dtype: DType) -> usize {
    let (b, s) = (x.boxes.to_dtype(dtype).unwrap(), x.scores.to_dtype(dtype).unwrap());
    let (bg, sg) = (b.to_device(dev).unwrap(), s.to_device(dev).unwrap());
    let (gg, vg) = (x.groups.to_device(dev).unwrap(), x.valid.to_device(dev).unwrap());
    assert!(
        run::nms_supported(op, &bg, &sg, Some(&gg), Some(&vg)),
        "{op:?} {dtype:?}"
    );
    let got = run::nms(op, &bg, &sg, Some(&gg), Some(&vg)).unwrap();
    let want = cpu::nms(op, &b, &s, Some(&x.groups), Some(&x.valid)).unwrap();
    assert_eq!(host_i64(&got[0]), host_i64(&want[0]), "{op:?} {dtype:?}: keep");
    let flags = host_u8(&want[1]);
    assert_eq!(host_u8(&got[1]), flags, "{op:?} {dtype:?}: keep_valid");
    flags.iter().map(|&f| f as usize).sum()
}

#[test]
fn nms_rpn_proposals() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(2);
    // Training: 2000 per level on p2..p5 plus p6's 768 anchors, five level groups.
    let x = nms_inputs(&mut rng, 8768, 300, 5, |r| (r.normal() * 64.0).round() as f32 / 16.0);
    let op = Nms {
        iou_threshold: 0.7,
        max_output: 1000,
        score_threshold: None,
    };
    for dtype in [DType::F32, DType::BF16] {
        let kept = check_nms(&dev, &op, &x, dtype);
        assert!(kept > 0, "{dtype:?}: nothing kept");
    }
}

#[test]
fn nms_box_head_detections() {
    let Some(dev) = common::cuda_device() else { return };
    let mut rng = TestRng::new(3);
    // 1000 proposals x 80 classes, score threshold 0.05: a few thousand candidates.
    let x = nms_inputs(&mut rng, 80_000, 400, 80, |r| {
        let u = r.uniform() as f32;
        u * u * u * 0.5
    });
    for max_output in [100, 100_000] {
        let op = Nms {
            iou_threshold: 0.5,
            max_output,
            score_threshold: Some(0.05),
        };
        check_nms(&dev, &op, &x, DType::F32);
    }
}

// ------------------------------------------------------------------------------- RoIAlign

/// p2..p5 of a 1024 x 1024 image with `c` channels, and `r` boxes of 8..800 px.
fn roi_inputs(rng: &mut TestRng, c: usize, r: usize) -> (Vec<Tensor>, Tensor) {
    let feats: Vec<Tensor> = [256usize, 128, 64, 32]
        .iter()
        .map(|&s| {
            common::Nd::randn(&[1, c, s, s], rng, 1.0, 0.0)
                .tensor()
                .to_dtype(DType::F32)
                .unwrap()
        })
        .collect();
    let mut b = Vec::with_capacity(4 * r);
    for _ in 0..r {
        let (w, h) = (8.0 * 100f64.powf(rng.uniform()), 8.0 * 100f64.powf(rng.uniform()));
        let (x0, y0) = (
            rng.uniform() * (1024.0 - w.min(1000.0)),
            rng.uniform() * (1024.0 - h.min(1000.0)),
        );
        b.extend([x0, y0, (x0 + w).min(1024.0), (y0 + h).min(1024.0)].map(|v| v as f32));
    }
    (feats, Tensor::from_vec(b, (r, 4), &Device::Cpu).unwrap())
}

fn pooler(output: usize) -> RoiAlign {
    RoiAlign {
        output_size: [output, output],
        scales: vec![0.25, 0.125, 0.0625, 0.03125],
        sampling_ratio: 0,
        aligned: true,
        canonical_box_size: 224.0,
        canonical_level: 4,
        min_level: 2,
    }
}

fn check_roi_align(dev: &Device, output: usize, dtype: DType, tol: f64) {
    let mut rng = TestRng::new(4 + output as u64);
    let (feats, boxes) = roi_inputs(&mut rng, 32, 512);
    let op = pooler(output);
    let mut inputs: Vec<Tensor> = feats.iter().map(|f| f.to_dtype(dtype).unwrap()).collect();
    inputs.push(boxes.to_dtype(dtype).unwrap());
    let on_dev: Vec<Tensor> = inputs.iter().map(|t| t.to_device(dev).unwrap()).collect();
    assert!(run::roi_align_supported(&op, &on_dev));
    let got = run::roi_align(&op, &on_dev).unwrap();
    let want = cpu::roi_align(&op, &inputs).unwrap();
    let e = rel_l2(&got, &want);
    assert!(e <= tol, "roi_align {output}x{output} {dtype:?}: rel L2 {e:e}");

    let grad_op = RoiAlignGrad {
        roi: op,
        feature_shapes: feats
            .iter()
            .map(|f| f.dims4().map(|(a, b, c, d)| [a, b, c, d]).unwrap())
            .collect(),
    };
    let dy = common::Nd::randn(want.dims(), &mut rng, 1.0, 0.0)
        .tensor()
        .to_dtype(dtype)
        .unwrap();
    let boxes = &inputs[inputs.len() - 1];
    let (bg, dyg) = (boxes.to_device(dev).unwrap(), dy.to_device(dev).unwrap());
    assert!(run::roi_align_grad_supported(&grad_op, &bg, &dyg));
    let got = run::roi_align_grad(&grad_op, &bg, &dyg).unwrap();
    let want = cpu::roi_align_grad(&grad_op, boxes, &dy).unwrap();
    for (l, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.dtype(), dtype);
        let e = rel_l2(g, w);
        assert!(
            e <= tol,
            "roi_align_grad {output}x{output} {dtype:?}: level {l} rel L2 {e:e}"
        );
    }
}

#[test]
fn roi_align_box_and_mask_poolers() {
    let Some(dev) = common::cuda_device() else { return };
    for output in [7, 14] {
        check_roi_align(&dev, output, DType::F32, 1e-5);
    }
    check_roi_align(&dev, 7, DType::BF16, 1.0 / 256.0);
    check_roi_align(&dev, 7, DType::F16, 1.0 / 2048.0);
}

/// The mask targets of detectron2's fixture (runtime/tests/fixtures/targets.safetensors) with the
/// masks and RoIs on the GPU, against the CPU's, which equal detectron2's.
#[test]
fn mask_targets_on_the_device() {
    use vitdet_ir::ops::MaskTargets;
    use vitdet_runtime::kernels::targets::mask_targets;
    let Some(dev) = common::cuda_device() else { return };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/targets.safetensors");
    let f = candle_core::safetensors::load(&path, &Device::Cpu).expect("targets fixture");
    let op = MaskTargets { size: 28 };
    let cpu = mask_targets(&op, &f["mask_gt"], &f["mask_rois"], &f["mask_matched"], None).unwrap();
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let gpu = mask_targets(&op, &on(&f["mask_gt"]), &on(&f["mask_rois"]), &f["mask_matched"], None).unwrap();
    assert!(gpu.device().is_cuda(), "the targets stay on the device");
    let (g, c) = (host_f32(&gpu), host_f32(&cpu));
    let differ = g.iter().zip(&c).filter(|(a, b)| a != b).count();
    eprintln!("mask targets: {differ} of {} pixels differ from the CPU's", c.len());
    assert!(differ * 1000 <= c.len(), "{differ} of {} pixels differ", c.len());
}

// ------------------------------------------------------------------------------- anchors

/// A program's anchors, made on the host and placed on the GPU by its first run, are reused by
/// later runs (no anchors kernel runs again) and stay the CPU's values.
#[test]
fn a_program_keeps_its_anchors_on_the_device() {
    use vitdet_ir::Graph;
    use vitdet_runtime::{ParamStore, Program};
    let Some(dev) = common::cuda_device() else { return };
    let mut g = Graph::new();
    let anchors = Anchors {
        grid: [64, 64],
        stride: 16.0,
        sizes: vec![128.0],
        aspect_ratios: vec![0.5, 1.0, 2.0],
        offset: 0.0,
    };
    let a = g.add(anchors, "rpn", &[]).unwrap();
    let clip = ClipBoxes {
        width: 1024.0,
        height: 1024.0,
    };
    let clipped = g.add(clip, "rpn", &[a]).unwrap();
    g.set_output("anchors", clipped);
    let order = g.topo_order().unwrap();
    let program = Program::new(&g, &order).unwrap();
    let want = program.run(&ParamStore::new(), &[], &Device::Cpu).unwrap();
    let want = host_f32(want.get("anchors").unwrap());
    for run in 0..3 {
        let got = program.run_profiled(&ParamStore::new(), &[], &dev).unwrap();
        assert_eq!(host_f32(got.get("anchors").unwrap()), want, "run {run}");
        assert_eq!(
            got.op_seconds.contains_key("anchors"),
            run == 0,
            "run {run}: the anchors kernel ran"
        );
    }
}
