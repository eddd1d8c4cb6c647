//! Detection kernels against PyTorch / torchvision / detectron2 references
//! (`tests/fixtures/detection.safetensors`, made by `generate_detection.py`: inputs rounded to
//! f32, references computed in f64 and stored as f32), plus small hand-computed cases.
//!
//! Tolerances:
//! * anchors, top-k, NMS, level assignment, gathers: exact (the kernels reproduce detectron2's
//!   f32 anchor arithmetic; the rest select or copy values).
//! * box decode: `atol 1e-5 + rtol 1e-6` (the kernel computes in f64 and rounds once, so the
//!   only difference is the reference's own f32 rounding of outputs up to ~1000 px: 0.5 ulp).
//! * RoIAlign: `atol 1e-5` (f64 accumulation of f32 features; outputs O(1)).
//! * mask paste: the u8 output must equal the thresholded f64 reference except where the soft
//!   value is within 1e-6 of the threshold (none are in the fixture).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use vitdet_ir::ops::*;
use vitdet_ir::Op;
use vitdet_runtime::kernels::{self, KernelError};

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures_dir().join("detection.safetensors"), &Device::Cpu)
        .expect("tests/fixtures/detection.safetensors")
}

fn run(op: impl Into<Op>, inputs: &[&Tensor]) -> Vec<Tensor> {
    let op = op.into();
    let inputs: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    kernels::execute(&op, &inputs).unwrap_or_else(|e| panic!("{op:?}: {e}"))
}

fn nd(t: &Tensor) -> Nd {
    Nd::from_tensor(t)
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn t32(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
}

fn ti64(data: &[i64]) -> Tensor {
    Tensor::from_vec(data.to_vec(), data.len(), &Device::Cpu).unwrap()
}

const SCALE_CLAMP: f64 = 4.135_166_556_742_356; // ln(1000 / 16)

// ------------------------------------------------------------------------------- anchors

#[test]
fn anchors_match_detectron2_exactly() {
    let f = fixtures();
    let op = Anchors {
        grid: [5, 7],
        stride: 8.0,
        sizes: vec![32.0],
        aspect_ratios: vec![0.5, 1.0, 2.0],
        offset: 0.5,
    };
    let got = &run(op, &[])[0];
    assert_eq!(got.dtype(), DType::F32);
    assert_close(&nd(got), &nd(&f["anchors_5x7_s8"]), 0.0, 0.0, "anchors 5x7 stride 8");
    let op = Anchors {
        grid: [3, 4],
        stride: 16.0,
        sizes: vec![32.0, 45.25],
        aspect_ratios: vec![0.5, 1.0, 2.0],
        offset: 0.5,
    };
    assert_close(
        &nd(&run(op, &[])[0]),
        &nd(&f["anchors_3x4_s16_2sizes"]),
        0.0,
        0.0,
        "anchors 3x4 stride 16, 2 sizes",
    );
}

#[test]
fn anchors_hand_case() {
    // One cell, size 16, ratio 1, stride 4, offset 0.5: centre (2, 2), box (-6, -6, 10, 10).
    let op = Anchors {
        grid: [1, 2],
        stride: 4.0,
        sizes: vec![16.0],
        aspect_ratios: vec![1.0],
        offset: 0.5,
    };
    let got = nd(&run(op, &[])[0]);
    assert_eq!(got.data, vec![-6.0, -6.0, 10.0, 10.0, -2.0, -6.0, 14.0, 10.0]);
}

// ------------------------------------------------------------------------------- box coding

#[test]
fn box_decode_matches_detectron2() {
    let f = fixtures();
    for (w, dk, ok) in [
        ([1.0, 1.0, 1.0, 1.0], "decode_deltas_w1", "decode_out_w1"),
        ([10.0, 10.0, 5.0, 5.0], "decode_deltas_w10", "decode_out_w10"),
    ] {
        let op = BoxDecode {
            weights: w,
            scale_clamp: SCALE_CLAMP,
        };
        let got = nd(&run(op, &[&f[dk], &f["decode_boxes"]])[0]);
        let want = nd(&f[ok]);
        assert_close(&got, &want, 1e-5, 1e-6, ok);
        eprintln!("{ok}: max |diff| {:.2e}", max_abs_diff(&got, &want));
    }
}

#[test]
fn box_decode_hand_case_and_clamp() {
    // Box (0, 0, 10, 20): centre (5, 10). dx = 0.1 -> cx 6; dw = ln 2 -> w 20; dh = 100 is
    // clamped to SCALE_CLAMP -> h = 20 * 1000 / 16 = 1250.
    let boxes = t32(&[0.0, 0.0, 10.0, 20.0], &[1, 4]);
    let deltas = t32(&[0.1, 0.0, std::f32::consts::LN_2, 100.0], &[1, 4]);
    let got = nd(&run(
        BoxDecode {
            weights: [1.0; 4],
            scale_clamp: SCALE_CLAMP,
        },
        &[&deltas, &boxes],
    )[0]);
    let want = [6.0 - 10.0, 10.0 - 625.0, 6.0 + 10.0, 10.0 + 625.0];
    for (g, w) in got.data.iter().zip(want) {
        assert!((g - w).abs() < 1e-4, "{:?} vs {want:?}", got.data);
    }
}

#[test]
fn clip_boxes_clamps_each_coordinate() {
    let b = t32(
        &[-5.0, -1.0, 130.0, 50.0, 10.0, 70.0, 20.0, 90.0, f32::NAN, 1.0, 2.0, 3.0],
        &[3, 4],
    );
    let got = nd(&run(
        ClipBoxes {
            height: 60.0,
            width: 100.0,
        },
        &[&b],
    )[0]);
    assert_eq!(&got.data[..8], &[0.0, 0.0, 100.0, 50.0, 10.0, 60.0, 20.0, 60.0]);
    assert!(got.data[8].is_nan(), "NaN stays NaN");
}

// ------------------------------------------------------------------------------- top-k

/// The long row of the fixture script: `((i * 48271 + 12345) mod 196613 - 98306) / 4096`.
fn topk_long_row() -> Vec<f32> {
    (0..196_608u64)
        .map(|i| (((i * 48_271 + 12_345) % 196_613) as f64 - 98_306.0) as f32 / 4096.0)
        .collect()
}

#[test]
fn top_k_matches_torch() {
    let f = fixtures();
    let row = Tensor::from_vec(topk_long_row(), 196_608, &Device::Cpu).unwrap();
    let _ = run(TopK { k: 10 }, &[&row.narrow(0, 0, 1000).unwrap()]); // warm-up (thread pool)
    let start = std::time::Instant::now();
    let out = run(TopK { k: 1000 }, &[&row]);
    eprintln!("top-k 1000 of 196,608: {:.2} ms", start.elapsed().as_secs_f64() * 1e3);
    assert_close(&nd(&out[0]), &nd(&f["topk_long_values"]), 0.0, 0.0, "long values");
    assert_eq!(out[1].dtype(), DType::I64);
    assert_eq!(i64s(&out[1]), i64s(&f["topk_long_indices"]), "long indices");

    let out = run(TopK { k: 4 }, &[&f["topk_small_in"]]);
    assert_close(&nd(&out[0]), &nd(&f["topk_small_values"]), 0.0, 0.0, "small values");
    assert_eq!(i64s(&out[1]), i64s(&f["topk_small_indices"]), "small indices");
}

#[test]
fn top_k_ties_and_nan() {
    // Ties keep the lower index first; NaN is below -inf.
    let x = t32(&[1.0, f32::NAN, 3.0, 1.0, f32::NEG_INFINITY, 3.0, 1.0], &[1, 7]);
    let out = run(TopK { k: 6 }, &[&x]);
    assert_eq!(i64s(&out[1]), vec![2, 5, 0, 3, 6, 4]);
    let out = run(TopK { k: 7 }, &[&x]);
    assert_eq!(i64s(&out[1]), vec![2, 5, 0, 3, 6, 4, 1]);
    let v = nd(&out[0]);
    assert!(v.data[6].is_nan());
    assert!(matches!(
        kernels::execute(&TopK { k: 8 }.into(), &[x]),
        Err(KernelError::Unsupported(_))
    ));
}

// ------------------------------------------------------------------------------- gathers

#[test]
fn index_select_and_range_error() {
    let x = t32(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], &[3, 2]);
    let got = nd(&run(IndexSelect::new(0), &[&x, &ti64(&[2, 0, 2])])[0]);
    assert_eq!(got.shape, vec![3, 2]);
    assert_eq!(got.data, vec![4.0, 5.0, 0.0, 1.0, 4.0, 5.0]);
    let got = nd(&run(IndexSelect::new(1), &[&x, &ti64(&[1])])[0]);
    assert_eq!(got.data, vec![1.0, 3.0, 5.0]);
    for bad in [3i64, -1] {
        match kernels::execute(&IndexSelect::new(0).into(), &[x.clone(), ti64(&[0, bad])]) {
            Err(e) => assert!(e.to_string().contains(&format!("index {bad}")), "{e}"),
            Ok(_) => panic!("index {bad} accepted"),
        }
    }
}

#[test]
fn gather_rows_picks_per_row() {
    // data [2, 3, 2]: out[n] = data[n, idx[n]].
    let x = t32(&(0..12).map(|v| v as f32).collect::<Vec<_>>(), &[2, 3, 2]);
    let got = nd(&run(GatherRows::default(), &[&x, &ti64(&[2, 1])])[0]);
    assert_eq!(got.shape, vec![2, 2]);
    assert_eq!(got.data, vec![4.0, 5.0, 8.0, 9.0]);
    let err = kernels::execute(&GatherRows::default().into(), &[x, ti64(&[0, 3])]).expect_err("index 3 accepted");
    assert!(err.to_string().contains("index 3"), "{err}");
}

// ------------------------------------------------------------------------------- NMS

fn nms_keep(out: &[Tensor]) -> Vec<i64> {
    let keep = i64s(&out[0]);
    let flags = u8s(&out[1]);
    let n = flags.iter().filter(|&&v| v == 1).count();
    assert!(
        flags[..n].iter().all(|&v| v == 1) && flags[n..].iter().all(|&v| v == 0),
        "flags {flags:?}"
    );
    assert!(keep[n..].iter().all(|&v| v == 0), "unused slots are 0");
    keep[..n].to_vec()
}

#[test]
fn nms_matches_torchvision() {
    let f = fixtures();
    let (b, s) = (&f["nms_boxes"], &f["nms_scores"]);
    let plain = Nms {
        iou_threshold: 0.5,
        max_output: 300,
        score_threshold: None,
    };
    assert_eq!(nms_keep(&run(plain, &[b, s])), i64s(&f["nms_plain_keep"]), "plain nms");

    let want = i64s(&f["nms_batched_keep"]);
    let batched = Nms {
        iou_threshold: 0.5,
        max_output: 300,
        score_threshold: Some(0.2),
    };
    let got = nms_keep(&run(batched.clone(), &[b, s, &f["nms_groups"], &f["nms_valid"]]));
    assert_eq!(got, want, "batched nms");
    // Truncated: the first max_output of the same list.
    let short = Nms {
        max_output: 20,
        ..batched
    };
    assert_eq!(
        nms_keep(&run(short, &[b, s, &f["nms_groups"], &f["nms_valid"]])),
        want[..20].to_vec(),
        "max_output 20"
    );
}

#[test]
fn nms_hand_case() {
    // Boxes 0 and 1 overlap with IoU 81 / (100 + 100 - 81) = 0.68; box 2 is apart. Box 3 is
    // box 0 in another group, box 4 has a NaN score, box 5 is marked invalid.
    let b = t32(
        &[
            0.0, 0.0, 10.0, 10.0, 1.0, 1.0, 11.0, 11.0, 20.0, 20.0, 30.0, 30.0, 0.0, 0.0, 10.0, 10.0, 0.0, 0.0, 5.0,
            5.0, 20.0, 0.0, 25.0, 5.0,
        ],
        &[6, 4],
    );
    let s = t32(&[0.9, 0.95, 0.5, 0.3, f32::NAN, 0.99], &[6]);
    let g = ti64(&[0, 0, 0, 7, 0, 0]);
    let v = Tensor::from_vec(vec![1u8, 1, 1, 1, 1, 0], 6, &Device::Cpu).unwrap();
    let op = Nms {
        iou_threshold: 0.6,
        max_output: 5,
        score_threshold: None,
    };
    assert_eq!(nms_keep(&run(op.clone(), &[&b, &s, &g, &v])), vec![1, 2, 3]);
    // IoU 0.68 <= 0.7: both kept.
    let op7 = Nms {
        iou_threshold: 0.7,
        ..op.clone()
    };
    assert_eq!(nms_keep(&run(op7, &[&b, &s, &g, &v])), vec![1, 0, 2, 3]);
    // Without groups box 3 is suppressed by box 1 (IoU 0.68); without the mask box 5 is kept.
    assert_eq!(nms_keep(&run(op.clone(), &[&b, &s])), vec![5, 1, 2]);
    // A score threshold is strict: 0.5 drops box 2 and box 3.
    let thr = Nms {
        score_threshold: Some(0.5),
        ..op
    };
    assert_eq!(nms_keep(&run(thr, &[&b, &s, &g, &v])), vec![1]);
    // Equal scores: lower index first.
    let tie = t32(&[0.5; 6], &[6]);
    let op = Nms {
        iou_threshold: 0.6,
        max_output: 6,
        score_threshold: None,
    };
    // (box 4, now with a finite score, overlaps box 0 by IoU 0.25 only.)
    assert_eq!(nms_keep(&run(op, &[&b, &tie, &g, &v])), vec![0, 2, 3, 4]);
}

/// 80,000 candidates (1,000 boxes x 80 classes, as a detector's box head gives) and 80,000
/// boxes of a single group, timed. Correctness is covered above; this checks the output is
/// consistent and reports the time.
#[test]
fn nms_timing_80k() {
    let mut r = TestRng::new(7);
    let n = 80_000;
    let mut boxes = Vec::with_capacity(4 * n);
    for _ in 0..n {
        let (cx, cy) = (r.uniform() * 1024.0, r.uniform() * 1024.0);
        let (w, h) = (8.0 + r.uniform() * 200.0, 8.0 + r.uniform() * 200.0);
        boxes.extend_from_slice(&[
            (cx - w / 2.0) as f32,
            (cy - h / 2.0) as f32,
            (cx + w / 2.0) as f32,
            (cy + h / 2.0) as f32,
        ]);
    }
    let scores: Vec<f32> = (0..n).map(|_| r.uniform() as f32).collect();
    let groups: Vec<i64> = (0..n as i64).map(|i| i % 80).collect();
    let (b, s, g) = (t32(&boxes, &[n, 4]), t32(&scores, &[n]), ti64(&groups));
    for (what, op, inputs) in [
        (
            "80 groups, threshold 0.05",
            Nms {
                iou_threshold: 0.5,
                max_output: 1000,
                score_threshold: Some(0.05),
            },
            vec![&b, &s, &g],
        ),
        (
            "one group",
            Nms {
                iou_threshold: 0.7,
                max_output: 1000,
                score_threshold: None,
            },
            vec![&b, &s],
        ),
    ] {
        // Warm-up on a few boxes (starts the thread pool).
        let few: Vec<Tensor> = inputs.iter().map(|t| t.narrow(0, 0, 1000).unwrap()).collect();
        let _ = run(op.clone(), &few.iter().collect::<Vec<_>>());
        let start = std::time::Instant::now();
        let out = run(op, &inputs);
        let kept = nms_keep(&out);
        eprintln!(
            "nms of {n} candidates ({what}): {:.1} ms, {} kept",
            start.elapsed().as_secs_f64() * 1e3,
            kept.len()
        );
        assert!(kept.windows(2).all(|w| scores[w[0] as usize] >= scores[w[1] as usize]));
    }
}

// ------------------------------------------------------------------------------- RoIAlign

fn roi_op(output_size: [usize; 2], sampling_ratio: usize, aligned: bool) -> RoiAlign {
    RoiAlign {
        output_size,
        scales: vec![0.25, 0.125, 0.0625, 0.03125],
        sampling_ratio,
        aligned,
        canonical_box_size: 224.0,
        canonical_level: 4,
        min_level: 2,
    }
}

#[test]
fn roi_align_matches_torchvision_multilevel() {
    let f = fixtures();
    let boxes = &f["roi_boxes"];
    let bx = Nd::from_tensor(boxes).data;
    let levels: Vec<i64> = kernels::detection::assign_levels(&roi_op([7, 7], 0, true), &bx, 4)
        .into_iter()
        .map(|l| l as i64)
        .collect();
    assert_eq!(levels, i64s(&f["roi_levels"]), "level assignment");
    let feats = ["roi_feat2", "roi_feat3", "roi_feat4", "roi_feat5"].map(|k| &f[k]);
    for (op, key) in [
        (roi_op([7, 7], 0, true), "roi_out_7x7"),
        (roi_op([14, 14], 0, true), "roi_out_14x14"),
        (roi_op([7, 7], 2, false), "roi_out_7x7_unaligned_sr2"),
    ] {
        let mut inputs: Vec<&Tensor> = feats.to_vec();
        inputs.push(boxes);
        let got = nd(&run(op, &inputs)[0]);
        let want = nd(&f[key]);
        assert_close(&got, &want, 1e-5, 0.0, key);
        eprintln!("{key}: max |diff| {:.2e}", max_abs_diff(&got, &want));
    }
}

#[test]
fn roi_align_hand_case() {
    // A 1 x 1 x 4 x 4 ramp f(y, x) = 4y + x is linear, so every bilinear sample inside the map
    // equals the ramp at the sample point, and a bin's average is the ramp at the bin centre.
    // Box (0.5, 0.5, 2.5, 2.5), aligned: (0, 0)..(2, 2) in map coordinates, 2 x 2 bins:
    // centres (0.5, 0.5), (0.5, 1.5), (1.5, 0.5), (1.5, 1.5).
    let feat = t32(&(0..16).map(|v| v as f32).collect::<Vec<_>>(), &[1, 1, 4, 4]);
    let boxes = t32(&[0.5, 0.5, 2.5, 2.5], &[1, 4]);
    let op = RoiAlign {
        output_size: [2, 2],
        scales: vec![1.0],
        sampling_ratio: 0,
        aligned: true,
        canonical_box_size: 224.0,
        canonical_level: 4,
        min_level: 4,
    };
    let got = nd(&run(op, &[&feat, &boxes])[0]);
    let want = [0.5 * 4.0 + 0.5, 0.5 * 4.0 + 1.5, 1.5 * 4.0 + 0.5, 1.5 * 4.0 + 1.5];
    for (g, w) in got.data.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{:?} vs {want:?}", got.data);
    }
}

// ------------------------------------------------------------------------------- mask paste

#[test]
fn paste_masks_matches_detectron2() {
    let f = fixtures();
    let op = PasteMasks {
        height: 60,
        width: 80,
        threshold: 0.5,
    };
    let got = run(op, &[&f["paste_masks"], &f["paste_boxes"]]);
    assert_eq!(got[0].dtype(), DType::U8);
    assert_eq!(got[0].dims(), &[5, 60, 80]);
    let got = u8s(&got[0]);
    let want = u8s(&f["paste_out"]);
    let soft = nd(&f["paste_soft"]).data;
    let mut near = 0;
    for i in 0..got.len() {
        if (soft[i] - 0.5).abs() < 1e-6 {
            near += 1;
            continue;
        }
        assert_eq!(got[i], want[i], "pixel {i} (mask {}, soft {})", i / 4800, soft[i]);
    }
    let ones = want.iter().filter(|&&v| v == 1).count();
    eprintln!("paste: {ones} pixels set, {near} within 1e-6 of the threshold");
    assert!(ones > 1000);
}

#[test]
fn paste_masks_hand_case() {
    // A 2 x 2 mask [[1, 0], [0, 0]] on the box (0, 0, 4, 4) of a 4 x 4 canvas: pixel centres
    // x + 0.5 map to mask coordinates (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, so the
    // weights of cell (0, 0) along an axis are 0.75, 0.75, 0.25, 0 (zero padding beyond).
    let m = t32(&[1.0, 0.0, 0.0, 0.0], &[1, 2, 2]);
    let b = t32(&[0.0, 0.0, 4.0, 4.0], &[1, 4]);
    let got = u8s(&run(
        PasteMasks {
            height: 4,
            width: 4,
            threshold: 0.5,
        },
        &[&m, &b],
    )[0]);
    // 0.75 * 0.75 = 0.5625 >= 0.5; 0.75 * 0.25 < 0.5.
    assert_eq!(got, vec![1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // `>=`: a threshold equal to the value keeps the pixel.
    let got = u8s(&run(
        PasteMasks {
            height: 4,
            width: 4,
            threshold: 0.5625,
        },
        &[&m, &b],
    )[0]);
    assert_eq!(got[..2], [1, 1]);
}

// ------------------------------------------------------------------------------- dtypes

#[test]
fn float_outputs_keep_the_input_dtype() {
    let f = fixtures();
    // f64 and bf16 inputs: outputs in the same dtype, with the same selections.
    for dtype in [DType::F64, DType::BF16] {
        let x = f["topk_small_in"].to_dtype(dtype).unwrap();
        let out = run(TopK { k: 4 }, &[&x]);
        assert_eq!(out[0].dtype(), dtype);
        let want = f["topk_small_values"].to_dtype(dtype).unwrap();
        assert_close(&nd(&out[0]), &nd(&want), 0.0, 0.0, "top-k values");
        let boxes = f["roi_boxes"].to_dtype(dtype).unwrap();
        let mut inputs: Vec<Tensor> = ["roi_feat2", "roi_feat3", "roi_feat4", "roi_feat5"]
            .iter()
            .map(|k| f[*k].to_dtype(dtype).unwrap())
            .collect();
        inputs.push(boxes);
        let got = &kernels::execute(&roi_op([7, 7], 0, true).into(), &inputs).unwrap()[0];
        assert_eq!(got.dtype(), dtype);
        if dtype == DType::F64 {
            assert_close(&nd(got), &nd(&f["roi_out_7x7"]), 1e-5, 0.0, "roi_align f64");
        }
        let d = f["decode_deltas_w1"].to_dtype(dtype).unwrap();
        let b = f["decode_boxes"].to_dtype(dtype).unwrap();
        assert_eq!(
            run(
                BoxDecode {
                    weights: [1.0; 4],
                    scale_clamp: SCALE_CLAMP
                },
                &[&d, &b]
            )[0]
            .dtype(),
            dtype
        );
    }
}
