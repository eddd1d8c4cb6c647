//! The detection CUDA kernels, run by the host emulator, against the runtime's CPU kernels on
//! random inputs (deterministic generator).
//!
//! Tolerances:
//! * box decoding and clipping: exact (the CPU kernel's f64 steps, rounded once).
//! * top-k and NMS: exact. Both select and order; the kernels compare the same values (scores
//!   as order-preserving keys, IoUs in f64 with the CPU kernel's operations and rounding).
//! * RoIAlign forward and backward: relative L2 error 1e-5. Sample positions, taps and weights
//!   are computed in f64 exactly as on the CPU; the kernels then round the weights to f32 and
//!   accumulate in f32 (forward) or add f32 contributions with atomics in any order (backward),
//!   where the CPU kernel accumulates in f64 (forward) or in f32 in box order (backward). With
//!   at most ~100 terms per value the f32 rounding stays near 1e-7 relative; 1e-5 leaves room
//!   yet fails on any wrong tap, weight, level or bin (errors of order 1e-1).

use candle_core::{DType, Device, Tensor};
use common::{rel_l2, values};

mod common;
use vitdet_cuda_emu::detection;
use vitdet_ir::ops::{BoxDecode, ClipBoxes, Nms, RoiAlign, RoiAlignGrad, TopK};
use vitdet_runtime::kernels::detection as cpu;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 7) as f32 / (1u64 << 24) as f32
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

// ------------------------------------------------------------------------------- top-k

/// Runs both sides and requires identical values (bit patterns; NaN as NaN) and indices.
fn check_top_k(x: &Tensor, k: usize) {
    check_top_k_on(x, k, |op, x| detection::top_k(op, x).unwrap());
}

/// [`check_top_k`] with the emulated side run by `run`.
fn check_top_k_on(x: &Tensor, k: usize, run: impl Fn(&TopK, &Tensor) -> Vec<Tensor>) {
    let op = TopK { k };
    let want = cpu::top_k(&op, x).unwrap();
    let got = run(&op, x);
    let (gi, wi) = (i64s(&got[1]), i64s(&want[1]));
    let first_bad = gi.iter().zip(&wi).position(|(a, b)| a != b);
    assert!(first_bad.is_none(), "k {k}: indices differ first at {first_bad:?}");
    let (gv, wv) = (f32s(&got[0]), f32s(&want[0]));
    for (j, (a, b)) in gv.iter().zip(&wv).enumerate() {
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "k {k}: value {j}: {a} vs {b}"
        );
    }
}

/// Scores on a coarse grid (about 50 copies of each of 400 values), with NaN, infinities and
/// both zeros mixed in.
fn duplicated_scores(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(100) {
            0 => f32::NAN,
            1 => f32::NEG_INFINITY,
            2 => f32::INFINITY,
            3 => -0.0,
            4 => 0.0,
            _ => (rng.below(400) as f32 - 200.0) / 8.0,
        })
        .collect()
}

/// Three rows of 20,000: duplicated scores with NaN and infinities, a row whose k-th score is
/// shared by thousands of entries (the tie-break passes pick the lowest indices), and a row of
/// mostly NaN (the selection reaches into the NaNs, ordered by index).
fn three_rows(rng: &mut Rng) -> Tensor {
    let n = 20_000;
    let mut data = duplicated_scores(rng, n);
    data.extend((0..n).map(|i| if i % 50 == 0 { rng.uniform() + 1.0 } else { 0.5 }));
    data.extend((0..n).map(|i| if i % 50 == 0 { rng.uniform() } else { f32::NAN }));
    Tensor::from_vec(data, (3, n), &Device::Cpu).unwrap()
}

/// The multi-block kernels (histogram and pick per radix pass, compaction, sort) on the same
/// rows, in chunks that divide the row and chunks that do not.
#[test]
fn top_k_multi_block_20000_scores_with_duplicates() {
    let x = three_rows(&mut Rng(7));
    for chunk in [2048, 777] {
        check_top_k_on(&x, 1000, |op, x| detection::top_k_chunked(op, x, chunk).unwrap());
    }
}

/// The same rows on one block per row (their length would take the multi-block kernels).
#[test]
fn top_k_20000_scores_with_duplicates() {
    let x = three_rows(&mut Rng(7));
    check_top_k_on(&x, 1000, |op, x| detection::top_k_chunked(op, x, 0).unwrap());
}

#[test]
fn top_k_long_row_takes_the_multi_block_path() {
    // Past TOPK_MULTI_BLOCK_ROW a row runs on the multi-block kernels, past TOPK_LONG_ROW
    // (65,536) with the sort on 1024 threads: the RPN's P2 level at 1024 px has 196,608 scores;
    // 70,000 with the RPN's k of 2000 exercise the same path in the emulator.
    let n = 70_000;
    assert!(n > vitdet_runtime::cuda::detection::TOPK_LONG_ROW);
    let mut rng = Rng(13);
    let x = Tensor::from_vec(duplicated_scores(&mut rng, n), (1, n), &Device::Cpu).unwrap();
    check_top_k(&x, 2000);
}

#[test]
fn top_k_small_rows_and_extreme_k() {
    let mut rng = Rng(11);
    let data = duplicated_scores(&mut rng, 4 * 37);
    let x = Tensor::from_vec(data, (2, 2, 37), &Device::Cpu).unwrap();
    for k in [1, 5, 36, 37] {
        check_top_k(&x, k);
    }
}

// ------------------------------------------------------------------------------- NMS

struct NmsCase {
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    valid: Tensor,
}

/// `n` boxes jittered around a few centres (so many overlap above the thresholds), scores on a
/// coarse grid (ties), some non-finite scores, four groups, about 10% invalid.
fn nms_case(n: usize, seed: u64) -> NmsCase {
    let mut rng = Rng(seed);
    let centres: Vec<(f32, f32)> = (0..12)
        .map(|_| (rng.uniform() * 200.0, rng.uniform() * 150.0))
        .collect();
    let mut boxes = Vec::with_capacity(4 * n);
    for _ in 0..n {
        let (cx, cy) = centres[rng.below(centres.len() as u64) as usize];
        let (cx, cy) = (cx + rng.uniform() * 12.0, cy + rng.uniform() * 12.0);
        let (w, h) = (20.0 + rng.uniform() * 30.0, 20.0 + rng.uniform() * 30.0);
        boxes.extend([cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]);
    }
    let scores: Vec<f32> = (0..n)
        .map(|_| match rng.below(40) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            _ => rng.below(64) as f32 / 64.0,
        })
        .collect();
    let groups: Vec<i64> = (0..n).map(|_| rng.below(4) as i64 * 3 - 2).collect();
    let valid: Vec<u8> = (0..n).map(|_| (rng.below(10) != 0) as u8).collect();
    NmsCase {
        boxes: Tensor::from_vec(boxes, (n, 4), &Device::Cpu).unwrap(),
        scores: Tensor::from_vec(scores, n, &Device::Cpu).unwrap(),
        groups: Tensor::from_vec(groups, n, &Device::Cpu).unwrap(),
        valid: Tensor::from_vec(valid, n, &Device::Cpu).unwrap(),
    }
}

/// Both sides, with the mask budget `budget`; returns the number of kept boxes.
fn check_nms(op: &Nms, c: &NmsCase, groups: bool, valid: bool, budget: usize) -> usize {
    let (g, v) = (groups.then_some(&c.groups), valid.then_some(&c.valid));
    let want = cpu::nms(op, &c.boxes, &c.scores, g, v).unwrap();
    let got = detection::nms_with_mask_budget(op, &c.boxes, &c.scores, g, v, budget).unwrap();
    let what = format!("{op:?} groups {groups} valid {valid} budget {budget}");
    assert_eq!(i64s(&got[0]), i64s(&want[0]), "{what}: keep");
    assert_eq!(u8s(&got[1]), u8s(&want[1]), "{what}: keep_valid");
    u8s(&want[1]).iter().map(|&f| f as usize).sum()
}

#[test]
fn nms_matches_the_cpu_keep_list() {
    let n = 300;
    let c = nms_case(n, 3);
    let words = n.div_ceil(64);
    for (iou, thr) in [(0.5, Some(0.2)), (0.7, None), (0.3, Some(0.0))] {
        for max_output in [40, 400] {
            let op = Nms {
                iou_threshold: iou,
                max_output,
                score_threshold: thr,
            };
            // One round (the default budget) and five rounds of 64 rows.
            for budget in [detection_budget_default(), 64 * words * 8] {
                let kept = check_nms(&op, &c, true, true, budget);
                if max_output == 400 {
                    // Suppression happened, and the cap was not what limited the list.
                    let candidates = candidates(&op, &c);
                    assert!(kept > 20 && kept < candidates, "{op:?}: {kept} kept of {candidates}");
                } else {
                    assert_eq!(kept, max_output, "{op:?}: the cap of {max_output}");
                }
            }
            check_nms(&op, &c, false, false, 64 * words * 8);
            check_nms(&op, &c, true, false, 128 * words * 8);
        }
    }
}

/// An IoU of exactly the threshold (0.5) does not suppress; equal scores (-0 and +0 too) go
/// by lower index: A (0) keeps B (1, IoU 1/2) but drops its copy C (2), B drops its copy F (5),
/// D (3) is alone, E (4, score -0) drops its copy at index 6 (score +0).
#[test]
fn nms_iou_at_the_threshold_and_score_ties() {
    let boxes: Vec<f32> = [
        [0.0, 0.0, 2.0, 1.0],
        [0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 2.0, 1.0],
        [10.0, 10.0, 12.0, 11.0],
        [20.0, 20.0, 21.0, 21.0],
        [0.0, 0.0, 1.0, 1.0],
        [20.0, 20.0, 21.0, 21.0],
    ]
    .concat();
    let scores = [0.9f32, 0.8, 0.9, 0.8, -0.0, 0.8, 0.0];
    let c = NmsCase {
        boxes: Tensor::from_vec(boxes, (7, 4), &Device::Cpu).unwrap(),
        scores: Tensor::from_vec(scores.to_vec(), 7, &Device::Cpu).unwrap(),
        groups: Tensor::zeros(7, DType::I64, &Device::Cpu).unwrap(),
        valid: Tensor::ones(7, DType::U8, &Device::Cpu).unwrap(),
    };
    let op = Nms {
        iou_threshold: 0.5,
        max_output: 6,
        score_threshold: None,
    };
    check_nms(&op, &c, false, false, detection_budget_default());
    let got = detection::nms(&op, &c.boxes, &c.scores, None, None).unwrap();
    assert_eq!(i64s(&got[0]), [0, 1, 3, 4, 0, 0]);
    assert_eq!(u8s(&got[1]), [1, 1, 1, 1, 0, 0]);
}

/// Candidates of the grouped, masked case: finite score above the threshold, valid.
fn candidates(op: &Nms, c: &NmsCase) -> usize {
    let (s, v) = (f32s(&c.scores), u8s(&c.valid));
    (0..s.len())
        .filter(|&i| s[i].is_finite() && op.score_threshold.is_none_or(|t| s[i] as f64 > t) && v[i] != 0)
        .count()
}

fn detection_budget_default() -> usize {
    vitdet_runtime::cuda::detection::NMS_MASK_BUDGET
}

// ------------------------------------------------------------------------------- RoIAlign

const C: usize = 3;
const LEVELS: [(usize, usize); 3] = [(20, 24), (10, 12), (5, 6)];

/// Three levels of an 80 x 96 image (strides 4, 8, 16) and boxes of 4..64 px, some reaching
/// past the image; canonical box size 28 spreads them over all levels.
fn roi_op(aligned: bool, sampling_ratio: usize) -> RoiAlign {
    RoiAlign {
        output_size: [3, 4],
        scales: vec![0.25, 0.125, 0.0625],
        sampling_ratio,
        aligned,
        canonical_box_size: 28.0,
        canonical_level: 4,
        min_level: 2,
    }
}

fn roi_inputs(rng: &mut Rng, r: usize) -> (Vec<Tensor>, Tensor) {
    let feats: Vec<Tensor> = LEVELS
        .iter()
        .map(|&(h, w)| {
            let v: Vec<f32> = (0..C * h * w).map(|_| rng.uniform() * 2.0 - 1.0).collect();
            Tensor::from_vec(v, (1, C, h, w), &Device::Cpu).unwrap()
        })
        .collect();
    let mut b = Vec::with_capacity(4 * r);
    for _ in 0..r {
        // Log-uniform sides, so small boxes (level 0) are as common as large ones.
        let (w, h) = (4.0 * 16f32.powf(rng.uniform()), 4.0 * 16f32.powf(rng.uniform()));
        let (x0, y0) = (rng.uniform() * 110.0 - 15.0, rng.uniform() * 95.0 - 15.0);
        b.extend([x0, y0, x0 + w, y0 + h]);
    }
    (feats, Tensor::from_vec(b, (r, 4), &Device::Cpu).unwrap())
}

fn check_roi_align(aligned: bool, sampling_ratio: usize, seed: u64) {
    let op = roi_op(aligned, sampling_ratio);
    let mut rng = Rng(seed);
    let r = 14;
    let (feats, boxes) = roi_inputs(&mut rng, r);
    let levels = cpu::assign_levels(
        &op,
        &f32s(&boxes).iter().map(|&v| v as f64).collect::<Vec<_>>(),
        LEVELS.len(),
    );
    assert!(
        (0..LEVELS.len()).all(|l| levels.contains(&l)),
        "boxes on every level: {levels:?}"
    );
    let what = format!("aligned {aligned} sampling ratio {sampling_ratio}");

    let mut inputs = feats.clone();
    inputs.push(boxes.clone());
    let want = cpu::roi_align(&op, &inputs).unwrap();
    let got = detection::roi_align(&op, &inputs).unwrap();
    let e = rel_l2(&got, &want);
    eprintln!("{what}: forward rel L2 {e:.2e}");
    assert!(e <= 1e-5, "{what}: forward rel L2 {e:e}");

    let grad_op = RoiAlignGrad {
        roi: op.clone(),
        feature_shapes: LEVELS.iter().map(|&(h, w)| [1, C, h, w]).collect(),
    };
    let dy: Vec<f32> = (0..want.elem_count()).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    let dy = Tensor::from_vec(dy, want.dims(), &Device::Cpu).unwrap();
    let want = cpu::roi_align_grad(&grad_op, &boxes, &dy).unwrap();
    let got = detection::roi_align_grad(&grad_op, &boxes, &dy).unwrap();
    assert_eq!(got.len(), LEVELS.len());
    for (l, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(w.dtype(), DType::F32);
        let e = rel_l2(g, w);
        eprintln!("{what}: gradient of level {l} rel L2 {e:.2e}");
        assert!(e <= 1e-5, "{what}: gradient of level {l} rel L2 {e:e}");
    }
}

#[test]
fn roi_align_v2_adaptive_grid() {
    check_roi_align(true, 0, 5);
}

#[test]
fn roi_align_unaligned_fixed_grid() {
    check_roi_align(false, 2, 6);
}

#[test]
fn roi_align_aligned_fixed_grid() {
    check_roi_align(true, 3, 8);
}

/// Box decoding and clipping give the CPU kernels' bits in f32, f16 and bf16: clamped and NaN
/// scales, inverted and degenerate boxes, coordinates past the image and -0, over two groups of
/// deltas per box (class-specific regression) and blocks that end mid-box.
#[test]
fn box_decode_and_clip_give_the_cpu_bits() {
    let decode = BoxDecode {
        weights: [10.0, 10.0, 5.0, 5.0],
        scale_clamp: (1000.0f64 / 16.0).ln(),
    };
    let clip = ClipBoxes {
        width: 333.0,
        height: 200.0,
    };
    let mut rng = Rng(7);
    let n = 300;
    let mut boxes = Vec::new();
    let mut deltas = Vec::new();
    for i in 0..n {
        let x0 = rng.uniform() * 500.0 - 100.0;
        let y0 = rng.uniform() * 300.0 - 50.0;
        let (w, h) = match i % 9 {
            3 => (-5.0, 0.0),
            4 => (0.0, 0.0),
            _ => (rng.uniform() * 200.0, rng.uniform() * 150.0),
        };
        boxes.extend([x0, y0, x0 + w, y0 + h]);
        for g in 0..2 {
            let big = if (i + g) % 7 == 0 { 40.0 } else { 0.0 };
            let nan = if (i + g) % 13 == 5 { f32::NAN } else { 0.0 };
            let u = |r: &mut Rng| r.uniform() * 4.0 - 2.0;
            deltas.extend([u(&mut rng), u(&mut rng), u(&mut rng) + big + nan, u(&mut rng) - big]);
        }
    }
    boxes[0] = -0.0;
    let bits = |t: &Tensor| -> Vec<u32> {
        let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let b = Tensor::from_vec(boxes.clone(), (n, 4), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let d = Tensor::from_vec(deltas.clone(), (n, 8), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = cpu::box_decode(&decode, &d, &b).unwrap();
        let got = detection::box_decode(&decode, &d, &b).unwrap();
        assert_eq!((got.dims(), got.dtype()), (want.dims(), want.dtype()));
        assert_eq!(bits(&got), bits(&want), "box_decode {dtype:?}");
        assert!(
            bits(&want).iter().any(|&v| f32::from_bits(v).is_nan()),
            "the inputs exercise NaN"
        );

        let decoded = want.reshape((2 * n, 4)).unwrap();
        let want = cpu::clip_boxes(&clip, &decoded).unwrap();
        let got = detection::clip_boxes(&clip, &decoded).unwrap();
        assert_eq!(bits(&got), bits(&want), "clip_boxes {dtype:?}");
        let want = cpu::clip_boxes(&clip, &b).unwrap();
        assert_eq!(
            bits(&detection::clip_boxes(&clip, &b).unwrap()),
            bits(&want),
            "clip of -0 {dtype:?}"
        );
        assert_eq!(bits(&want)[0], (-0.0f32).to_bits(), "clip keeps -0");
    }
}

/// A bound between two half values, just above their midpoint by less than f32 resolves: the
/// CPU converts f64 to a half type through f32 (as PyTorch's casts do), where the value ties and
/// rounds to even, so the kernels must too (rounding once would go up).
#[test]
fn clipped_bounds_convert_as_the_cpu_does() {
    let width = 1.0 + 2f64.powi(-8) + 2f64.powi(-30); // bf16: 1 and 1 + 2^-7's midpoint, plus
    let height = 1.0 + 2f64.powi(-11) + 2f64.powi(-30); // f16: 1 and 1 + 2^-10's midpoint, plus
    let clip = ClipBoxes { width, height };
    for (dtype, i) in [(DType::BF16, 0), (DType::F16, 1)] {
        let b = Tensor::from_vec(vec![5.0f32; 4], (1, 4), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = values(&cpu::clip_boxes(&clip, &b).unwrap());
        assert_eq!(want[i], 1.0, "{dtype:?}: the CPU's conversion through f32");
        assert_eq!(values(&detection::clip_boxes(&clip, &b).unwrap()), want, "{dtype:?}");
    }
}
