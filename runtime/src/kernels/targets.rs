//! Training-target kernels (`vitdet_ir::ops::targets`): anchor and proposal matching and
//! sampling, and mask targets.
//!
//! Host loops: inputs on another device are copied to the CPU, and the results are host
//! tensors, which the executor moves to the run's device (keeping host copies where another
//! host loop reads them: the mask targets read the sampled RoIs without waiting for a GPU).
//!
//! Arithmetic follows detectron2 where its rounding decides an outcome: IoUs are computed in
//! f32 in `pairwise_iou`'s order of operations, so threshold comparisons and ties (low-quality
//! matches) are decided exactly as detectron2 decides them; regression targets (`get_deltas`)
//! are computed in f64 from the f32 boxes and rounded once. Mask targets reuse the RoIAlign
//! kernel of the detection family.
//!
//! Bad ground truth (a valid box that is not finite or has no area, a class outside
//! `0..num_classes`, a matched index out of range) and non-finite valid proposals (detectron2:
//! "training has diverged") are data errors naming the offending row.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use vitdet_ir::ops::{splitmix64, AnchorTargets, MaskTargets, ProposalTargets, RoiAlign};

use super::{KernelError, KernelResult};
use crate::dtype::describe;

// ------------------------------------------------------------------------------- helpers

fn data_error(msg: String) -> KernelError {
    KernelError::Candle(candle_core::Error::Msg(msg))
}

fn unsupported<T>(msg: String) -> KernelResult<T> {
    Err(KernelError::Unsupported(msg))
}

fn host_f32(t: &Tensor, what: &str) -> KernelResult<Vec<f32>> {
    if !t.dtype().is_float() {
        return unsupported(format!("{what} must be floating point, found {}", describe(t)));
    }
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

fn host_i64(t: &Tensor, what: &str) -> KernelResult<Vec<i64>> {
    if t.dtype().is_float() {
        return unsupported(format!("{what} must be integer, found {}", describe(t)));
    }
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?)
}

/// Nonzero entries of a u8 (or any) mask as booleans.
fn host_mask(t: &Tensor) -> KernelResult<Vec<bool>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|v| v != 0.0)
        .collect())
}

/// A result of the host loops: a host tensor (the executor places it).
fn host_tensor<T: candle_core::WithDType>(data: Vec<T>, shape: &[usize]) -> KernelResult<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Checks `boxes [N, 4]` and returns `N`.
fn boxes_len(t: &Tensor, what: &str) -> KernelResult<usize> {
    match t.dims() {
        [n, 4] => Ok(*n),
        _ => unsupported(format!("{what} must be [N, 4], found {}", describe(t))),
    }
}

fn check_len(t: &Tensor, n: usize, what: &str) -> KernelResult<()> {
    if t.dims() != [n] {
        return unsupported(format!("{what} must be [{n}], found {}", describe(t)));
    }
    Ok(())
}

/// The seed's bits as a `u64` (an i64 scalar, `[]` or `[1]`).
fn read_seed(seed: &Tensor) -> KernelResult<u64> {
    if seed.dtype() != DType::I64 || seed.elem_count() != 1 || seed.rank() > 1 {
        return unsupported(format!(
            "seed must be an i64 scalar ([] or [1]), found {}",
            describe(seed)
        ));
    }
    Ok(seed.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<i64>()?[0] as u64)
}

/// The sampling key of candidate `i`: the counter-based hash chain of `DropPathMask`.
pub fn sample_key(seed: u64, stream: u64, i: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ i)
}

/// `k` of `candidates` (or all when fewer) in ascending key order (ties by index): a uniformly
/// random subset in uniformly random order, like `candidates[torch.randperm(n)[:k]]`.
pub fn sample(candidates: &[usize], k: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut keyed: Vec<(u64, usize)> = candidates
        .iter()
        .map(|&i| (sample_key(seed, stream, i as u64), i))
        .collect();
    let k = k.min(keyed.len());
    if k == 0 {
        return Vec::new();
    }
    if k < keyed.len() {
        keyed.select_nth_unstable(k - 1);
        keyed.truncate(k);
    }
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// One box as read from f32 data.
type Box4 = [f32; 4];

fn box_at(data: &[f32], i: usize) -> Box4 {
    [data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]]
}

/// `Boxes.area()` in f32.
fn area(b: &Box4) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// detectron2's `pairwise_iou` for one pair, in f32 and its order of operations.
#[inline]
fn iou(a: &Box4, area_a: f32, b: &Box4, area_b: f32) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    if inter > 0.0 {
        inter / (area_a + area_b - inter)
    } else {
        0.0
    }
}

/// `Box2BoxTransform(weights).get_deltas(src, target)` in f64.
pub fn encode(src: &Box4, target: &Box4, weights: &[f64; 4]) -> [f64; 4] {
    let f = |v: f32| v as f64;
    let (sw, sh) = (f(src[2]) - f(src[0]), f(src[3]) - f(src[1]));
    let (scx, scy) = (f(src[0]) + 0.5 * sw, f(src[1]) + 0.5 * sh);
    let (tw, th) = (f(target[2]) - f(target[0]), f(target[3]) - f(target[1]));
    let (tcx, tcy) = (f(target[0]) + 0.5 * tw, f(target[1]) + 0.5 * th);
    let [wx, wy, ww, wh] = *weights;
    [
        wx * (tcx - scx) / sw,
        wy * (tcy - scy) / sh,
        ww * (tw / sw).ln(),
        wh * (th / sh).ln(),
    ]
}

/// The valid gt boxes as `(index, box, area)`, checking each is finite with positive size.
fn valid_gt(boxes: &[f32], valid: &[bool]) -> KernelResult<Vec<(usize, Box4, f32)>> {
    let mut out = Vec::new();
    for (g, &v) in valid.iter().enumerate() {
        if !v {
            continue;
        }
        let b = box_at(boxes, g);
        if b.iter().any(|c| !c.is_finite()) || !(b[2] > b[0] && b[3] > b[1]) {
            return Err(data_error(format!(
                "gt box {g} is valid but not a finite box of positive width and height: {b:?} \
                 (drop empty boxes, as detectron2's filter_empty_instances does, or mark them invalid)"
            )));
        }
        out.push((g, b, area(&b)));
    }
    Ok(out)
}

/// The best valid gt of a box: `(gt index, IoU)` with the first on ties, `(0, 0)` without gt
/// (`torch.max(dim=0)` over the valid rows).
#[inline]
fn best_match(b: &Box4, area_b: f32, gts: &[(usize, Box4, f32)]) -> (usize, f32) {
    let mut best = (gts.first().map_or(0, |g| g.0), f32::NEG_INFINITY);
    for (g, gb, ga) in gts {
        let v = iou(gb, *ga, b, area_b);
        if v > best.1 {
            best = (*g, v);
        }
    }
    if gts.is_empty() {
        best.1 = 0.0;
    }
    best
}

// ------------------------------------------------------------------------------- anchors

/// detectron2's `Matcher` on anchors (`labels [0, -1, 1]`): per anchor the matched gt index and
/// label (1 positive, 0 negative, -1 ignored), before sampling. Exposed for tests.
pub fn match_anchors(op: &AnchorTargets, anchors: &[f32], gts: &[(usize, Box4, f32)]) -> (Vec<i64>, Vec<i8>) {
    let a = anchors.len() / 4;
    // PyTorch compares an f32 tensor with a Python float in f32.
    let [lo, hi] = op.thresholds.map(|t| t as f32);
    if gts.is_empty() {
        return (vec![0; a], vec![0; a]);
    }
    const CHUNK: usize = 4096;
    let mut matched = vec![0i64; a];
    let mut labels = vec![0i8; a];
    // Per chunk: each gt's highest IoU over the chunk's anchors; reduced afterwards.
    let highest: Vec<f32> = matched
        .par_chunks_mut(CHUNK)
        .zip(labels.par_chunks_mut(CHUNK))
        .enumerate()
        .map(|(c, (m, l))| {
            let mut high = vec![f32::NEG_INFINITY; gts.len()];
            for j in 0..m.len() {
                let b = box_at(anchors, c * CHUNK + j);
                let ab = area(&b);
                let mut best = (gts[0].0, f32::NEG_INFINITY);
                for (k, (g, gb, ga)) in gts.iter().enumerate() {
                    let v = iou(gb, *ga, &b, ab);
                    if v > best.1 {
                        best = (*g, v);
                    }
                    if v > high[k] {
                        high[k] = v;
                    }
                }
                m[j] = best.0 as i64;
                let v = best.1;
                l[j] = if v < lo {
                    0
                } else if v < hi {
                    -1
                } else {
                    1
                };
            }
            high
        })
        .reduce(
            || vec![f32::NEG_INFINITY; gts.len()],
            |a, b| a.iter().zip(&b).map(|(x, y)| x.max(*y)).collect(),
        );
    if op.allow_low_quality_matches {
        // Every anchor that reaches some gt's highest IoU (ties included) becomes positive.
        labels.par_chunks_mut(CHUNK).enumerate().for_each(|(c, l)| {
            for (j, lab) in l.iter_mut().enumerate() {
                let b = box_at(anchors, c * CHUNK + j);
                let ab = area(&b);
                if gts
                    .iter()
                    .zip(&highest)
                    .any(|((_, gb, ga), &h)| iou(gb, *ga, &b, ab) == h)
                {
                    *lab = 1;
                }
            }
        });
    }
    (matched, labels)
}

/// [`AnchorTargets`]: inputs `anchors [A, 4]`, `gt_boxes [G, 4]`, `gt_valid [G]`, `seed`;
/// outputs `objectness [A]`, `weights [A]`, `deltas [A, 4]` (f32) and `matched [A]` (i64).
pub fn anchor_targets(
    op: &AnchorTargets,
    anchors: &Tensor,
    gt_boxes: &Tensor,
    gt_valid: &Tensor,
    seed: &Tensor,
) -> KernelResult<Vec<Tensor>> {
    let a = boxes_len(anchors, "anchor_targets: anchors")?;
    let g = boxes_len(gt_boxes, "anchor_targets: gt_boxes")?;
    check_len(gt_valid, g, "anchor_targets: gt_valid")?;
    let seed = read_seed(seed)?;
    let anc = host_f32(anchors, "anchors")?;
    let gts = valid_gt(&host_f32(gt_boxes, "gt_boxes")?, &host_mask(gt_valid)?)?;
    let (matched, labels) = match_anchors(op, &anc, &gts);

    let pos: Vec<usize> = (0..a).filter(|&i| labels[i] == 1).collect();
    let neg: Vec<usize> = (0..a).filter(|&i| labels[i] == 0).collect();
    let want_pos = vitdet_ir::ops::max_positives(op.batch_size_per_image, op.positive_fraction);
    let pos = sample(&pos, want_pos, seed, op.stream);
    let neg = sample(&neg, op.batch_size_per_image - pos.len(), seed, op.stream);

    let mut objectness = vec![0f32; a];
    let mut weights = vec![0f32; a];
    let mut deltas = vec![0f32; 4 * a];
    let gt_box = |i: usize| {
        gts.iter()
            .find(|(g, _, _)| *g as i64 == matched[i])
            .map(|(_, b, _)| *b)
            .expect("positives have a valid matched gt")
    };
    for &i in &pos {
        objectness[i] = 1.0;
        weights[i] = 1.0;
        let d = encode(&box_at(&anc, i), &gt_box(i), &op.weights);
        for (k, v) in d.iter().enumerate() {
            deltas[4 * i + k] = *v as f32;
        }
    }
    for &i in &neg {
        weights[i] = 1.0;
    }
    Ok(vec![
        host_tensor(objectness, &[a])?,
        host_tensor(weights, &[a])?,
        host_tensor(deltas, &[a, 4])?,
        host_tensor(matched, &[a])?,
    ])
}

// ------------------------------------------------------------------------------- proposals

/// [`ProposalTargets`]: inputs `proposals [P, 4]`, `proposal_valid [P]`, `gt_boxes [G, 4]`,
/// `gt_classes [G]`, `gt_valid [G]`, `seed`; outputs `rois [S, 4]`, `weights [S]`,
/// `labels [S]`, `deltas [S, 4]`, `matched [S]`, `foreground [S]` (see the op's doc).
pub fn proposal_targets(op: &ProposalTargets, x: &[Tensor]) -> KernelResult<Vec<Tensor>> {
    let [proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, seed] = x else {
        return unsupported(format!("proposal_targets takes 6 inputs, given {}", x.len()));
    };
    let p = boxes_len(proposals, "proposal_targets: proposals")?;
    check_len(proposal_valid, p, "proposal_targets: proposal_valid")?;
    let g = boxes_len(gt_boxes, "proposal_targets: gt_boxes")?;
    check_len(gt_classes, g, "proposal_targets: gt_classes")?;
    check_len(gt_valid, g, "proposal_targets: gt_valid")?;
    let seed = read_seed(seed)?;
    let k = op.num_classes;

    let props = host_f32(proposals, "proposals")?;
    let props_exact = proposals
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let pvalid = host_mask(proposal_valid)?;
    let gt = host_f32(gt_boxes, "gt_boxes")?;
    let gt_exact = gt_boxes
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let classes = host_i64(gt_classes, "gt_classes")?;
    let gts = valid_gt(&gt, &host_mask(gt_valid)?)?;
    for (gi, _, _) in &gts {
        if !(0..k as i64).contains(&classes[*gi]) {
            return Err(data_error(format!("gt {gi} has class {} outside 0..{k}", classes[*gi])));
        }
    }

    // Candidates: valid proposals, then the valid gt boxes (index p + g).
    let mut cands: Vec<usize> = Vec::with_capacity(p + gts.len());
    for i in (0..p).filter(|&i| pvalid[i]) {
        let b = box_at(&props, i);
        if b.iter().any(|c| !c.is_finite()) {
            return Err(data_error(format!(
                "proposal {i} is valid but not finite: {b:?} (training has diverged)"
            )));
        }
        cands.push(i);
    }
    if op.append_gt {
        cands.extend(gts.iter().map(|(gi, _, _)| p + gi));
    }
    let cand_box = |c: usize| if c < p { box_at(&props, c) } else { box_at(&gt, c - p) };
    let cand_exact = |c: usize| -> [f64; 4] {
        let (d, i) = if c < p { (&props_exact, c) } else { (&gt_exact, c - p) };
        [d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]]
    };

    // Matching: (matched gt, foreground) per candidate.
    let matches: Vec<(usize, bool)> = cands
        .par_iter()
        .map(|&c| {
            let b = cand_box(c);
            let (gi, v) = best_match(&b, area(&b), &gts);
            (gi, !gts.is_empty() && v >= op.iou_threshold as f32)
        })
        .collect();
    let fg: Vec<usize> = (0..cands.len()).filter(|&j| matches[j].1).collect();
    let bg: Vec<usize> = (0..cands.len()).filter(|&j| !matches[j].1).collect();
    let to_cand = |js: &[usize]| js.iter().map(|&j| cands[j]).collect::<Vec<_>>();
    let (fg_c, bg_c) = (to_cand(&fg), to_cand(&bg));
    let s = op.batch_size_per_image;
    let fg_s = sample(
        &fg_c,
        vitdet_ir::ops::max_positives(s, op.positive_fraction),
        seed,
        op.stream,
    );
    let bg_s = sample(&bg_c, s - fg_s.len(), seed, op.stream);

    let pos_of: std::collections::HashMap<usize, usize> = cands.iter().enumerate().map(|(j, &c)| (c, j)).collect();
    let mut rois = vec![0f64; 4 * s];
    let mut weights = vec![0f32; s];
    let mut labels = vec![k as i64; s];
    let mut deltas = vec![0f32; 4 * s];
    let mut matched = vec![0i64; s];
    let mut foreground = vec![0f32; s];
    for (slot, (&c, is_fg)) in fg_s
        .iter()
        .map(|c| (c, true))
        .chain(bg_s.iter().map(|c| (c, false)))
        .enumerate()
    {
        let (gi, _) = matches[pos_of[&c]];
        rois[4 * slot..4 * slot + 4].copy_from_slice(&cand_exact(c));
        weights[slot] = 1.0;
        matched[slot] = gi as i64;
        if is_fg {
            let b = cand_box(c);
            if !(b[2] > b[0] && b[3] > b[1]) {
                return Err(data_error(format!(
                    "foreground proposal {c} has no area: {b:?} (its regression target is undefined)"
                )));
            }
            labels[slot] = classes[gi];
            foreground[slot] = 1.0;
            let d = encode(&b, &box_at(&gt, gi), &op.weights);
            for (q, v) in d.iter().enumerate() {
                deltas[4 * slot + q] = *v as f32;
            }
        }
    }
    let rois = host_tensor(rois, &[s, 4])?.to_dtype(proposals.dtype())?;
    Ok(vec![
        rois,
        host_tensor(weights, &[s])?,
        host_tensor(labels, &[s])?,
        host_tensor(deltas, &[s, 4])?,
        host_tensor(matched, &[s])?,
        host_tensor(foreground, &[s])?,
    ])
}

// ------------------------------------------------------------------------------- masks

/// [`MaskTargets`]: `BitMasks.crop_and_resize`. The RoIs of each gt are pooled together by
/// the detection family's RoIAlign kernel on that gt's mask as a one-channel, one-level
/// feature map (scale 1, adaptive sampling, aligned), then thresholded with `>= 0.5`.
///
/// The pooling and thresholding run as tensor ops on the masks' device (on a GPU, as detectron2
/// crops them: `pooled`); only `matched` and `valid`, which the executor hands over from their
/// host copies, are read on the host. The GPU's RoIAlign accumulates in f32 where the CPU's uses
/// f64, so a bin averaging to within f32 rounding of 0.5 could threshold the other way.
pub fn mask_targets(
    op: &MaskTargets,
    gt_masks: &Tensor,
    rois: &Tensor,
    matched: &Tensor,
    valid: Option<&Tensor>,
) -> KernelResult<Tensor> {
    let (g, h, w) = match gt_masks.dims() {
        &[g, h, w] => (g, h, w),
        _ => {
            return unsupported(format!(
                "mask_targets: gt_masks must be [G, H, W], found {}",
                describe(gt_masks)
            ))
        }
    };
    let r = boxes_len(rois, "mask_targets: rois")?;
    check_len(matched, r, "mask_targets: matched")?;
    let idx = host_i64(matched, "mask_targets: matched")?;
    let use_row = match valid {
        Some(v) => {
            check_len(v, r, "mask_targets: valid")?;
            host_mask(v)?
        }
        None => vec![true; r],
    };
    let m = op.size;
    if r == 0 || h == 0 || w == 0 {
        return Ok(Tensor::zeros((r, m, m), DType::F32, gt_masks.device())?);
    }
    let mut rows_of: Vec<Vec<usize>> = vec![Vec::new(); g];
    for (i, (&gi, &u)) in idx.iter().zip(&use_row).enumerate() {
        if !u {
            continue;
        }
        if gi < 0 || gi as u64 >= g as u64 {
            return Err(data_error(format!(
                "mask_targets: matched index {gi} (row {i}) out of range for {g} gt masks"
            )));
        }
        rows_of[gi as usize].push(i);
    }
    pooled(&mask_pooler(m), gt_masks, rois, &rows_of, r)
}

/// `BitMasks.crop_and_resize`'s RoIAlign: `m x m` bins on one level at scale 1, adaptive
/// sampling, aligned.
fn mask_pooler(m: usize) -> RoiAlign {
    RoiAlign {
        output_size: [m, m],
        scales: vec![1.0],
        sampling_ratio: 0,
        aligned: true,
        canonical_box_size: 224.0,
        canonical_level: 0,
        min_level: 0,
    }
}

/// RoIAlign of the f32 `boxes` at `rows` on gt `gi`'s mask: `[rows, 1, m, m]` f32, on the
/// masks' device.
fn pool_rows(align: &RoiAlign, gt_masks: &Tensor, boxes: &Tensor, gi: usize, rows: &[usize]) -> KernelResult<Tensor> {
    let (_, h, w) = gt_masks.dims3()?;
    let plane = gt_masks.narrow(0, gi, 1)?.reshape((1, 1, h, w))?.to_dtype(DType::F32)?;
    let sel = Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        boxes.device(),
    )?;
    super::detection::roi_align(align, &[plane, boxes.index_select(&sel, 0)?])
}

/// [`mask_targets`]' values on the masks' device: each gt's rows pooled together, put back in
/// RoI order by one gather (rows of no gt read a zero row), then thresholded.
fn pooled(
    align: &RoiAlign,
    gt_masks: &Tensor,
    rois: &Tensor,
    rows_of: &[Vec<usize>],
    r: usize,
) -> KernelResult<Tensor> {
    let m = align.output_size[0];
    let dev = gt_masks.device();
    let boxes = rois.to_device(dev)?.to_dtype(DType::F32)?;
    let mut parts = Vec::new();
    let mut source: Vec<usize> = Vec::new();
    for (gi, rows) in rows_of.iter().enumerate() {
        if !rows.is_empty() {
            parts.push(pool_rows(align, gt_masks, &boxes, gi, rows)?.reshape((rows.len(), m * m))?);
            source.extend(rows);
        }
    }
    // Where each RoI's row is in the concatenated parts; the zero row after them by default.
    let mut at = vec![source.len() as u32; r];
    for (p, &i) in source.iter().enumerate() {
        at[i] = p as u32;
    }
    parts.push(Tensor::zeros((1, m * m), DType::F32, dev)?);
    let pooled = Tensor::cat(&parts, 0)?.index_select(&Tensor::from_vec(at, r, dev)?, 0)?;
    let half = Tensor::new(0.5f32, dev)?;
    Ok(pooled.broadcast_ge(&half)?.to_dtype(DType::F32)?.reshape((r, m, m))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each RoI's target is its own RoIAlign on its gt's mask, thresholded at 0.5, whatever the
    /// grouping by gt: RoIs of three gt masks (blobs of several shapes), one RoI invalid (zeros),
    /// one gt without RoIs, RoIs in no order.
    #[test]
    fn targets_are_each_rois_own_pooling() {
        let (g, h, w, m) = (4, 40, 50, 7);
        let mut masks = vec![0u8; g * h * w];
        for gi in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let (cy, cx) = (10.0 + 8.0 * gi as f64, 12.0 + 9.0 * gi as f64);
                    let d = ((y as f64 - cy) / (10.0 + 2.0 * gi as f64)).powi(2) + ((x as f64 - cx) / 14.0).powi(2);
                    masks[(gi * h + y) * w + x] = u8::from(d <= 1.0 || (gi == 2 && x % 5 == 0));
                }
            }
        }
        let masks = Tensor::from_vec(masks, (g, h, w), &Device::Cpu).unwrap();
        let rois: Vec<f32> = vec![
            5.0, 4.0, 20.0, 17.0, 10.0, 12.0, 30.0, 25.0, 0.5, 0.5, 49.5, 39.5, 14.2, 3.7, 22.9, 31.1, 2.0, 2.0, 3.0,
            3.0, 30.0, 20.0, 45.0, 38.0,
        ];
        let r = rois.len() / 4;
        let rois = Tensor::from_vec(rois, (r, 4), &Device::Cpu).unwrap();
        let matched = Tensor::from_vec(vec![2i64, 0, 1, 2, 0, 1], r, &Device::Cpu).unwrap();
        let valid = Tensor::from_vec(vec![1u8, 1, 1, 0, 1, 1], r, &Device::Cpu).unwrap();
        let ours = mask_targets(&MaskTargets { size: m }, &masks, &rois, &matched, Some(&valid)).unwrap();
        // One RoI at a time, on the host.
        let mut alone = vec![0f32; r * m * m];
        for (i, gi) in [(0, 2), (1, 0), (2, 1), (4, 0), (5, 1)] {
            let pooled = pool_rows(&mask_pooler(m), &masks, &rois, gi, &[i])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (o, v) in alone[i * m * m..(i + 1) * m * m].iter_mut().zip(pooled) {
                *o = if v >= 0.5 { 1.0 } else { 0.0 };
            }
        }
        let host = Tensor::from_vec(alone, (r, m, m), &Device::Cpu).unwrap();
        assert_eq!(ours.dims(), host.dims());
        let (a, b) = (super::super::f64_values(&ours), super::super::f64_values(&host));
        assert_eq!(a, b);
        let ones = b.iter().filter(|&&v| v == 1.0).count();
        assert!(ones > 20 && ones < b.len() / 2, "{ones} of {} foreground", b.len());
        assert!(b[3 * m * m..4 * m * m].iter().all(|&v| v == 0.0), "the invalid row");
    }
}
