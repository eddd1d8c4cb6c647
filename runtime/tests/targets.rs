//! Target-assignment kernels against detectron2 itself (`runtime/tests/fixtures/
//! targets.safetensors`, made by `generate_losses.py` with detectron2's `Matcher`,
//! `RPN.label_and_sample_anchors`, `ROIHeads.label_and_sample_proposals`, `Box2BoxTransform`
//! and `BitMasks.crop_and_resize`), and the random sampling by its invariants.
//!
//! The deterministic parts are exact: matching, labels, matched indices and mask targets must
//! be equal (the kernels compute IoUs in f32 in detectron2's order, and the fixture checks no
//! mask sample sits near the 0.5 threshold). Regression targets: `atol 1e-5 + rtol 1e-5`;
//! detectron2 computes them in f32 (centres and sizes of boxes up to ~100 px, rounded at each
//! of ~6 steps: ~1e-7 relative each, amplified by the (10, 10, 5, 5) weights to ~1e-6
//! absolute), the kernel in f64 from the same f32 boxes.
//!
//! Sampling is compared with the full labelling (a sample as large as the candidate set keeps
//! every labelled candidate): counts, the positive cap, only eligible candidates, order
//! (foreground first), determinism per seed, different draws for different seeds, and the
//! uniformity of the draw over many seeds.

mod common;

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};
use common::*;
use vitdet_ir::ops::*;
use vitdet_ir::Op;
use vitdet_runtime::kernels::{self, KernelError};

fn fixtures() -> HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/targets.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("runtime/tests/fixtures/targets.safetensors")
}

fn run(op: impl Into<Op>, inputs: &[&Tensor]) -> Vec<Tensor> {
    let op = op.into();
    let inputs: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    kernels::execute(&op, &inputs).unwrap_or_else(|e| panic!("{op:?}: {e}"))
}

fn try_run(op: impl Into<Op>, inputs: &[&Tensor]) -> Result<Vec<Tensor>, KernelError> {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    kernels::execute(&op.into(), &inputs)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn seed(s: i64) -> Tensor {
    Tensor::new(s, &Device::Cpu).unwrap()
}

fn close(got: f32, want: f32, what: &str) {
    let tol = 1e-5 + 1e-5 * want.abs();
    assert!((got - want).abs() <= tol, "{what}: got {got}, want {want}");
}

const RPN_WEIGHTS: [f64; 4] = [1.0; 4];
const ROI_WEIGHTS: [f64; 4] = [10.0, 10.0, 5.0, 5.0];

fn rpn_op(batch: usize, fraction: f64, stream: u64) -> AnchorTargets {
    AnchorTargets {
        thresholds: [0.3, 0.7],
        allow_low_quality_matches: true,
        batch_size_per_image: batch,
        positive_fraction: fraction,
        weights: RPN_WEIGHTS,
        stream,
    }
}

/// Sampled labels from the outputs: 1 positive, 0 negative, -1 not sampled.
fn labels_of(out: &[Tensor]) -> Vec<i64> {
    f32s(&out[0])
        .iter()
        .zip(f32s(&out[1]))
        .map(|(&o, w)| if w == 0.0 { -1 } else { o as i64 })
        .collect()
}

// ------------------------------------------------------------------------------- RPN

#[test]
fn anchor_targets_match_detectron2() {
    let f = fixtures();
    let anchors = &f["rpn_anchors"];
    let a = anchors.dims()[0];
    // A sample as large as the anchor set, all of it allowed positive: every labelled anchor
    // is kept, so the labels are detectron2's Matcher labels.
    let out = run(
        rpn_op(a, 1.0, 0),
        &[anchors, &f["rpn_gt_boxes"], &f["rpn_gt_valid"], &seed(1)],
    );
    assert_eq!(labels_of(&out), i64s(&f["rpn_labels"]), "labels");
    assert_eq!(i64s(&out[3]), i64s(&f["rpn_matched"]), "matched gt");
    let (got, want) = (f32s(&out[2]), f32s(&f["rpn_deltas"]));
    let labels = labels_of(&out);
    for i in 0..a {
        for k in 0..4 {
            if labels[i] == 1 {
                close(got[4 * i + k], want[4 * i + k], &format!("anchor {i} delta {k}"));
            } else {
                assert_eq!(got[4 * i + k], 0.0, "anchor {i}: no target unless positive");
            }
        }
    }
    // The fixture exercises the padded row (never matched) and low-quality matches (the tiny
    // gt 3 overlaps no anchor by 0.7): without them, fewer anchors are positive.
    assert!(!i64s(&out[3]).contains(&2), "the invalid gt row is never matched");
    let strict = AnchorTargets {
        allow_low_quality_matches: false,
        ..rpn_op(a, 1.0, 0)
    };
    let strict = labels_of(&run(
        strict,
        &[anchors, &f["rpn_gt_boxes"], &f["rpn_gt_valid"], &seed(1)],
    ));
    let count = |l: &[i64]| l.iter().filter(|&&v| v == 1).count();
    assert!(count(&strict) < count(&labels), "low-quality matches add positives");
    assert!((0..a).all(|i| strict[i] != 1 || labels[i] == 1));
}

/// Anchors of a 128x128 image on strides 8, 16, 32 (3 ratios), a few gt boxes.
fn big_rpn_case() -> (Tensor, Tensor, Tensor) {
    let mut all = Vec::new();
    for (stride, size) in [(8.0, 32.0), (16.0, 64.0), (32.0, 128.0)] {
        let g = (128.0 / stride) as usize;
        let op = Anchors {
            grid: [g, g],
            stride,
            sizes: vec![size],
            aspect_ratios: vec![0.5, 1.0, 2.0],
            offset: 0.0,
        };
        all.push(run(op, &[]).remove(0));
    }
    let anchors = Tensor::cat(&all, 0).unwrap();
    let gt = Tensor::new(
        &[
            [10.0f32, 12.0, 70.0, 60.0],
            [60.0, 50.0, 120.0, 125.0],
            [0.0, 0.0, 0.0, 0.0],
            [20.0, 80.0, 52.0, 100.0],
            [90.0, 5.0, 126.0, 40.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let valid = Tensor::new(&[1u8, 1, 0, 1, 1], &Device::Cpu).unwrap();
    (anchors, gt, valid)
}

#[test]
fn anchor_sampling_keeps_detectron2_counts() {
    let (anchors, gt, valid) = big_rpn_case();
    let a = anchors.dims()[0];
    // Full labelling; then detectron2's 256 / 0.5 with two thresholds settings: the default
    // (fewer positives than the cap) and a low one (more positives than the cap of 128).
    for thresholds in [[0.3, 0.7], [0.05, 0.1]] {
        let op = |batch: usize, frac: f64| AnchorTargets {
            thresholds,
            ..rpn_op(batch, frac, 5)
        };
        let full = run(op(a, 1.0), &[&anchors, &gt, &valid, &seed(0)]);
        let full_labels = labels_of(&full);
        let pos: HashSet<usize> = (0..a).filter(|&i| full_labels[i] == 1).collect();
        let neg: HashSet<usize> = (0..a).filter(|&i| full_labels[i] == 0).collect();
        let mut draws = HashSet::new();
        for s in [0, 1, 2] {
            let out = run(op(256, 0.5), &[&anchors, &gt, &valid, &seed(s)]);
            let labels = labels_of(&out);
            let sp: Vec<usize> = (0..a).filter(|&i| labels[i] == 1).collect();
            let sn: Vec<usize> = (0..a).filter(|&i| labels[i] == 0).collect();
            assert_eq!(sp.len(), pos.len().min(128), "{thresholds:?}: positives");
            assert_eq!(sn.len(), neg.len().min(256 - sp.len()), "{thresholds:?}: negatives");
            assert!(sp.iter().all(|i| pos.contains(i)) && sn.iter().all(|i| neg.contains(i)));
            // Targets of sampled positives are those of the full run; matched is sample-free.
            let (d, fd) = (f32s(&out[2]), f32s(&full[2]));
            for &i in &sp {
                assert_eq!(d[4 * i..4 * i + 4], fd[4 * i..4 * i + 4]);
            }
            assert_eq!(i64s(&out[3]), i64s(&full[3]));
            // Same seed, same sample.
            let again = run(op(256, 0.5), &[&anchors, &gt, &valid, &seed(s)]);
            assert_eq!(labels_of(&again), labels);
            draws.insert(labels);
        }
        assert_eq!(draws.len(), 3, "{thresholds:?}: different seeds draw different samples");
        if thresholds == [0.05, 0.1] {
            assert!(pos.len() > 128, "the low thresholds must exceed the positive cap");
        }
    }
}

#[test]
fn anchor_sampling_is_uniform_over_seeds() {
    let (anchors, gt, valid) = big_rpn_case();
    let a = anchors.dims()[0];
    let op = AnchorTargets {
        thresholds: [0.05, 0.1],
        ..rpn_op(256, 0.5, 9)
    };
    let full = labels_of(&run(
        AnchorTargets {
            batch_size_per_image: a,
            positive_fraction: 1.0,
            ..op.clone()
        },
        &[&anchors, &gt, &valid, &seed(0)],
    ));
    let pos: Vec<usize> = (0..a).filter(|&i| full[i] == 1).collect();
    let trials = 400;
    let mut hits = vec![0usize; a];
    for s in 0..trials {
        for (i, l) in labels_of(&run(op.clone(), &[&anchors, &gt, &valid, &seed(s)]))
            .into_iter()
            .enumerate()
        {
            if l == 1 {
                hits[i] += 1;
            }
        }
    }
    // Each positive is drawn with probability p = 128 / |pos|: its count over the trials is
    // Binomial(trials, p). 6 standard deviations: a correct sampler essentially never fails
    // (and the seeds are fixed, so the test is deterministic), a biased one (e.g. always the
    // first anchors) fails by far.
    let p = 128.0 / pos.len() as f64;
    let (mean, sd) = (trials as f64 * p, (trials as f64 * p * (1.0 - p)).sqrt());
    for &i in &pos {
        let h = hits[i] as f64;
        assert!(
            (h - mean).abs() <= 6.0 * sd,
            "anchor {i}: {h} draws, expected {mean:.1} +- {sd:.1}"
        );
    }
}

#[test]
fn anchor_targets_without_gt_sample_negatives_only() {
    let (anchors, gt, _) = big_rpn_case();
    let none = Tensor::zeros(5, DType::U8, &Device::Cpu).unwrap();
    let out = run(rpn_op(256, 0.5, 0), &[&anchors, &gt, &none, &seed(3)]);
    let labels = labels_of(&out);
    assert_eq!(labels.iter().filter(|&&l| l == 0).count(), 256);
    assert!(!labels.contains(&1));
    assert!(f32s(&out[2]).iter().all(|&v| v == 0.0));
    assert!(i64s(&out[3]).iter().all(|&v| v == 0));
}

#[test]
fn bad_gt_is_an_error() {
    let (anchors, _, _) = big_rpn_case();
    let gt = Tensor::new(&[[10.0f32, 10.0, 10.0, 30.0]], &Device::Cpu).unwrap();
    let valid = Tensor::new(&[1u8], &Device::Cpu).unwrap();
    match try_run(rpn_op(256, 0.5, 0), &[&anchors, &gt, &valid, &seed(0)]) {
        Err(KernelError::Candle(e)) => assert!(e.to_string().contains("gt box 0"), "{e}"),
        other => panic!("expected a data error, got {other:?}"),
    }
    // The same box marked invalid is ignored.
    let invalid = Tensor::new(&[0u8], &Device::Cpu).unwrap();
    assert!(try_run(rpn_op(256, 0.5, 0), &[&anchors, &gt, &invalid, &seed(0)]).is_ok());
}

// ------------------------------------------------------------------------------- RoI heads

fn roi_op(k: usize, batch: usize, fraction: f64, stream: u64) -> ProposalTargets {
    ProposalTargets {
        num_classes: k,
        iou_threshold: 0.5,
        batch_size_per_image: batch,
        positive_fraction: fraction,
        weights: ROI_WEIGHTS,
        append_gt: true,
        stream,
    }
}

fn box_key(b: &[f32]) -> [u32; 4] {
    [b[0].to_bits(), b[1].to_bits(), b[2].to_bits(), b[3].to_bits()]
}

#[test]
fn proposal_targets_match_detectron2() {
    let f = fixtures();
    let k = 5;
    let ins = [
        &f["roi_proposals"],
        &f["roi_proposal_valid"],
        &f["roi_gt_boxes"],
        &f["roi_gt_classes"],
        &f["roi_gt_valid"],
    ];
    let s = 256;
    let mut inputs: Vec<&Tensor> = ins.to_vec();
    let sd = seed(11);
    inputs.push(&sd);
    let out = run(roi_op(k, s, 1.0, 0), &inputs);
    let (rois, weights, labels, deltas, matched, fg) = (
        f32s(&out[0]),
        f32s(&out[1]),
        i64s(&out[2]),
        f32s(&out[3]),
        i64s(&out[4]),
        f32s(&out[5]),
    );
    let ref_boxes = f32s(&f["roi_ref_boxes"]);
    let ref_classes = i64s(&f["roi_ref_classes"]);
    let ref_gt = f32s(&f["roi_ref_gt_boxes"]);
    let ref_deltas = f32s(&f["roi_ref_deltas"]);
    let gt = f32s(&f["roi_gt_boxes"]);
    let m = ref_classes.len();
    let by_box: HashMap<[u32; 4], usize> = (0..m).map(|r| (box_key(&ref_boxes[4 * r..4 * r + 4]), r)).collect();
    assert_eq!(by_box.len(), m, "fixture boxes are distinct");
    let used = weights.iter().filter(|&&w| w == 1.0).count();
    assert_eq!(used, m, "every candidate is sampled");
    let n_fg = ref_classes.iter().filter(|&&c| c < k as i64).count();
    for slot in 0..s {
        if slot >= m {
            assert_eq!(
                (weights[slot], labels[slot], fg[slot]),
                (0.0, k as i64, 0.0),
                "unused slot {slot}"
            );
            assert_eq!(rois[4 * slot..4 * slot + 4], [0.0; 4]);
            continue;
        }
        // Foreground first (detectron2's cat([fg, bg])).
        assert_eq!(fg[slot] == 1.0, slot < n_fg, "slot {slot}: foreground first");
        let r = *by_box.get(&box_key(&rois[4 * slot..4 * slot + 4])).unwrap_or_else(|| {
            panic!(
                "slot {slot}: box {:?} not a detectron2 candidate",
                &rois[4 * slot..4 * slot + 4]
            )
        });
        assert_eq!(labels[slot], ref_classes[r], "slot {slot} label");
        if ref_classes[r] < k as i64 {
            let g = matched[slot] as usize;
            assert_eq!(gt[4 * g..4 * g + 4], ref_gt[4 * r..4 * r + 4], "slot {slot} matched gt");
            for q in 0..4 {
                close(
                    deltas[4 * slot + q],
                    ref_deltas[4 * r + q],
                    &format!("slot {slot} delta {q}"),
                );
            }
        } else {
            assert_eq!(
                deltas[4 * slot..4 * slot + 4],
                [0.0; 4],
                "background slot {slot} has no target"
            );
        }
    }
}

/// Many random proposals around a few gt boxes.
fn big_roi_case(rng: &mut TestRng) -> Vec<Tensor> {
    let gt = [
        [10.0f32, 10.0, 60.0, 50.0],
        [50.0, 40.0, 120.0, 110.0],
        [80.0, 5.0, 100.0, 30.0],
    ];
    let mut props = Vec::new();
    for i in 0..1500 {
        let b = gt[i % 3];
        let (w, h) = (b[2] - b[0], b[3] - b[1]);
        let j = |s: f32, rng: &mut TestRng| (rng.uniform() as f32 - 0.5) * s;
        let x0 = b[0] + j(w, rng);
        let y0 = b[1] + j(h, rng);
        props.extend_from_slice(&[
            x0,
            y0,
            x0 + w * (0.6 + rng.uniform() as f32),
            y0 + h * (0.6 + rng.uniform() as f32),
        ]);
    }
    let p = props.len() / 4;
    let valid: Vec<u8> = (0..p).map(|i| u8::from(i % 7 != 0)).collect();
    vec![
        Tensor::from_vec(props, (p, 4), &Device::Cpu).unwrap(),
        Tensor::from_vec(valid, p, &Device::Cpu).unwrap(),
        Tensor::new(&gt, &Device::Cpu).unwrap(),
        Tensor::new(&[2i64, 0, 7], &Device::Cpu).unwrap(),
        Tensor::new(&[1u8, 1, 1], &Device::Cpu).unwrap(),
    ]
}

#[test]
fn proposal_sampling_keeps_detectron2_counts() {
    let mut rng = TestRng::new(3);
    let ins = big_roi_case(&mut rng);
    let k = 10;
    let with_seed = |s: i64| {
        let mut v: Vec<Tensor> = ins.clone();
        v.push(seed(s));
        v
    };
    let full = run(roi_op(k, 4096, 1.0, 2), &refs(&with_seed(0)));
    let key_label: HashMap<[u32; 4], i64> = {
        let (r, l, w) = (f32s(&full[0]), i64s(&full[2]), f32s(&full[1]));
        (0..4096)
            .filter(|&s| w[s] == 1.0)
            .map(|s| (box_key(&r[4 * s..4 * s + 4]), l[s]))
            .collect()
    };
    let n_fg = key_label.values().filter(|&&l| l < k as i64).count();
    let n_bg = key_label.len() - n_fg;
    assert!(
        n_fg > 128 && n_bg > 384,
        "the case must exceed both caps: {n_fg} fg, {n_bg} bg"
    );
    let mut draws = HashSet::new();
    for s in [0, 1, 2] {
        let out = run(roi_op(k, 512, 0.25, 2), &refs(&with_seed(s)));
        let (rois, w, l, fg) = (f32s(&out[0]), f32s(&out[1]), i64s(&out[2]), f32s(&out[5]));
        assert!(w.iter().all(|&v| v == 1.0), "512 slots used");
        assert_eq!(
            fg.iter().filter(|&&v| v == 1.0).count(),
            128,
            "int(512 * 0.25) foreground"
        );
        assert!(fg[..128].iter().all(|&v| v == 1.0), "foreground first");
        let mut seen = HashSet::new();
        for slot in 0..512 {
            let key = box_key(&rois[4 * slot..4 * slot + 4]);
            assert!(seen.insert(key), "slot {slot}: a candidate sampled twice");
            assert_eq!(
                key_label.get(&key),
                Some(&l[slot]),
                "slot {slot}: an eligible candidate with its label"
            );
        }
        let again = run(roi_op(k, 512, 0.25, 2), &refs(&with_seed(s)));
        assert_eq!(f32s(&again[0]), rois, "same seed, same sample");
        draws.insert(rois.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
    assert_eq!(draws.len(), 3, "different seeds draw different samples");
    // Another stream draws another sample from the same seed.
    let other = run(roi_op(k, 512, 0.25, 3), &refs(&with_seed(0)));
    let first = run(roi_op(k, 512, 0.25, 2), &refs(&with_seed(0)));
    assert_ne!(f32s(&other[0]), f32s(&first[0]));
}

#[test]
fn proposal_targets_without_gt_are_background() {
    let mut rng = TestRng::new(4);
    let mut ins = big_roi_case(&mut rng);
    ins[4] = Tensor::zeros(3, DType::U8, &Device::Cpu).unwrap();
    ins.push(seed(0));
    let out = run(roi_op(10, 512, 0.25, 0), &ins.iter().collect::<Vec<_>>());
    assert!(
        f32s(&out[1]).iter().all(|&w| w == 1.0),
        "enough valid proposals for 512 slots"
    );
    assert!(i64s(&out[2]).iter().all(|&l| l == 10));
    assert!(f32s(&out[5]).iter().all(|&v| v == 0.0));
    assert!(f32s(&out[3]).iter().all(|&v| v == 0.0));
}

#[test]
fn appended_gt_is_foreground_with_zero_deltas() {
    // No proposal at all: the candidates are the gt boxes themselves (IoU 1 with their gt).
    let props = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
    let pvalid = Tensor::zeros(4, DType::U8, &Device::Cpu).unwrap();
    let gt = Tensor::new(&[[1.0f32, 2.0, 30.0, 40.0], [5.0, 5.0, 9.0, 9.0]], &Device::Cpu).unwrap();
    let classes = Tensor::new(&[4i64, 1], &Device::Cpu).unwrap();
    let gvalid = Tensor::new(&[1u8, 1], &Device::Cpu).unwrap();
    let out = run(
        roi_op(5, 8, 0.25, 0),
        &[&props, &pvalid, &gt, &classes, &gvalid, &seed(0)],
    );
    assert_eq!(f32s(&out[1]), [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let mut got: Vec<(i64, i64)> = i64s(&out[4])[..2]
        .iter()
        .copied()
        .zip(i64s(&out[2])[..2].iter().copied())
        .collect();
    got.sort();
    assert_eq!(got, [(0, 4), (1, 1)], "(matched, label) of the two gt candidates");
    assert!(f32s(&out[3]).iter().all(|&v| v == 0.0), "a gt box regresses to itself");
    // Class out of range is an error naming the gt.
    let bad = Tensor::new(&[4i64, 5], &Device::Cpu).unwrap();
    match try_run(roi_op(5, 8, 0.25, 0), &[&props, &pvalid, &gt, &bad, &gvalid, &seed(0)]) {
        Err(KernelError::Candle(e)) => assert!(e.to_string().contains("gt 1 has class 5"), "{e}"),
        other => panic!("expected a data error, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------- masks

#[test]
fn mask_targets_match_detectron2_exactly() {
    let f = fixtures();
    let out = run(
        MaskTargets { size: 28 },
        &[&f["mask_gt"], &f["mask_rois"], &f["mask_matched"]],
    )
    .remove(0);
    assert_eq!(out.dims(), f["mask_ref"].dims());
    let (got, want) = (f32s(&out), f32s(&f["mask_ref"]));
    let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 0, "{diff} of {} mask pixels differ", want.len());
}

#[test]
fn mask_targets_skip_invalid_rows() {
    let f = fixtures();
    let r = f["mask_rois"].dims()[0];
    // Row 0 invalid with an out-of-range index: not read, zeros.
    let mut m = i64s(&f["mask_matched"]);
    m[0] = 99;
    let matched = Tensor::from_vec(m, r, &Device::Cpu).unwrap();
    let mut v = vec![1u8; r];
    v[0] = 0;
    let valid = Tensor::from_vec(v, r, &Device::Cpu).unwrap();
    let out = run(
        MaskTargets { size: 28 },
        &[&f["mask_gt"], &f["mask_rois"], &matched, &valid],
    )
    .remove(0);
    let (got, want) = (f32s(&out), f32s(&f["mask_ref"]));
    assert!(got[..784].iter().all(|&x| x == 0.0));
    assert_eq!(got[784..], want[784..]);
    // Valid with an out-of-range index: an error naming it.
    match try_run(MaskTargets { size: 28 }, &[&f["mask_gt"], &f["mask_rois"], &matched]) {
        Err(KernelError::Candle(e)) => assert!(e.to_string().contains("matched index 99 (row 0)"), "{e}"),
        other => panic!("expected a data error, got {other:?}"),
    }
}

fn refs(v: &[Tensor]) -> Vec<&Tensor> {
    v.iter().collect()
}
