//! pycocotools' `COCOeval` for boxes and masks: per image and category, detections sorted by
//! score (stable, as numpy's mergesort) are matched greedily to the best still-unmatched
//! ground truth at ten IoU thresholds, crowd regions and out-of-range objects are ignored, and
//! precision is interpolated at 101 recall points; [`CocoEval::stats`] are the 12 numbers of
//! `COCOeval.stats`, in its order. Every step follows pycocotools, down to its quirks (a
//! ground truth with id 0 counts as "unmatched", as pycocotools stores matches by id).

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::{Detections, GroundTruth};
use crate::mask::{box_iou, Runs};

/// What the IoU is computed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IouType {
    Bbox,
    Segm,
}

/// Area ranges all, small, medium, large (inclusive at both ends, as pycocotools compares).
pub const AREA_RANGES: [[f64; 2]; 4] = [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];
pub const AREA_LABELS: [&str; 4] = ["all", "small", "medium", "large"];
/// Detections per image kept for AP/AR.
pub const MAX_DETS: [usize; 3] = [1, 10, 100];

/// `np.linspace(.5, .95, 10)` exactly as numpy computes it (`i * step + start`, last = stop):
/// thresholds such as 0.9 come out one ulp low, which decides ties with exact IoUs.
pub fn iou_thresholds() -> [f64; 10] {
    let step = (0.95 - 0.5) / 9.0;
    let mut t = [0.0; 10];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as f64 * step + 0.5;
    }
    t[9] = 0.95;
    t
}

/// `np.linspace(0, 1, 101)`: `i * 0.01`, last = 1.
pub fn recall_thresholds() -> [f64; 101] {
    let mut r = [0.0; 101];
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as f64 * 0.01 + 0.0;
    }
    r[100] = 1.0;
    r
}

/// Accumulated results.
#[derive(Clone, Debug)]
pub struct CocoEval {
    /// Category ids, sorted (the K axis).
    pub cat_ids: Vec<i64>,
    /// `[T, R, K, A, M]` row-major; -1 where a category has no ground truth in the range.
    pub precision: Vec<f64>,
    /// `[T, K, A, M]` row-major; -1 likewise.
    pub recall: Vec<f64>,
    /// AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl.
    pub stats: [f64; 12],
}

/// The geometry IoUs are computed on (shared with TIDE).
pub(super) enum Geom<'a> {
    Box([f64; 4]),
    Mask(&'a Runs),
}

pub(super) fn iou(d: &Geom, g: &Geom, crowd: bool) -> f64 {
    match (d, g) {
        (Geom::Box(d), Geom::Box(g)) => box_iou(d, g, crowd),
        (Geom::Mask(d), Geom::Mask(g)) => d.iou(g, crowd),
        _ => unreachable!("one IoU type per evaluation"),
    }
}

struct Gt<'a> {
    id: i64,
    area: f64,
    crowd: bool,
    geom: Geom<'a>,
}

struct Dt<'a> {
    score: f64,
    area: f64,
    geom: Geom<'a>,
}

/// `evaluateImg`'s output for one image, category and area range.
struct ImgEval {
    /// Scores of the kept detections, best first.
    scores: Vec<f64>,
    /// `[T][D]`: matched to a ground truth whose id is non-zero.
    matched: Vec<Vec<bool>>,
    /// `[T][D]`: ignored (matched to an ignored ground truth, or unmatched and out of range).
    dt_ignore: Vec<Vec<bool>>,
    gt_ignore: Vec<bool>,
}

/// Indices sorting `scores` best first, ties in their original order (numpy's stable
/// `argsort(-scores, kind='mergesort')`).
fn by_score_desc(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).expect("scores are finite"));
    idx
}

impl CocoEval {
    /// Runs evaluate, accumulate and summarize.
    pub fn run(gt: &GroundTruth, dets: &Detections, iou_type: IouType) -> Result<CocoEval> {
        let mut img_ids: Vec<i64> = gt.images.iter().map(|im| im.id).collect();
        img_ids.sort_unstable();
        img_ids.dedup();
        let mut cat_ids: Vec<i64> = gt.categories.iter().map(|c| c.id).collect();
        cat_ids.sort_unstable();
        cat_ids.dedup();
        let img_index: HashMap<i64, usize> = img_ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let cat_index: HashMap<i64, usize> = cat_ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let (ni, nk) = (img_ids.len(), cat_ids.len());

        // Per (image, category), ground truth and detections in file order.
        let mut gts: Vec<Vec<Gt>> = (0..ni * nk).map(|_| Vec::new()).collect();
        for a in &gt.annotations {
            let (Some(&i), Some(&k)) = (img_index.get(&a.image_id), cat_index.get(&a.category_id)) else {
                continue;
            };
            let what = || format!("{}: annotation id {}", gt.source, a.id);
            let Some(area) = a.area else {
                bail!("{}: missing field `area` (it decides small/medium/large)", what());
            };
            let geom = match iou_type {
                IouType::Bbox => match a.bbox {
                    Some(b) => Geom::Box(b),
                    None => bail!("{}: missing field `bbox`", what()),
                },
                IouType::Segm => match &a.segmentation {
                    Some(m) => Geom::Mask(m),
                    None => bail!("{}: missing field `segmentation`, needed to evaluate masks", what()),
                },
            };
            gts[i * nk + k].push(Gt {
                id: a.id,
                area,
                crowd: a.iscrowd,
                geom,
            });
        }
        let boxes = match iou_type {
            IouType::Bbox => dets.boxes()?,
            IouType::Segm => Vec::new(),
        };
        let mut dts: Vec<Vec<Dt>> = (0..ni * nk).map(|_| Vec::new()).collect();
        for (n, d) in dets.detections.iter().enumerate() {
            let (Some(&i), Some(&k)) = (img_index.get(&d.image_id), cat_index.get(&d.category_id)) else {
                continue;
            };
            let (geom, area) = match iou_type {
                IouType::Bbox => (Geom::Box(boxes[n].0), boxes[n].1),
                IouType::Segm => match &d.segmentation {
                    Some(m) => (Geom::Mask(m), m.area() as f64),
                    None => bail!("{}: detection {n} has no `segmentation`", dets.source),
                },
            };
            dts[i * nk + k].push(Dt {
                score: d.score,
                area,
                geom,
            });
        }

        let thresholds = iou_thresholds();
        let max_det = *MAX_DETS.last().expect("non-empty");
        // evals[(k * A + a) * I + i], as pycocotools orders evalImgs.
        let na = AREA_RANGES.len();
        let mut evals: Vec<Option<ImgEval>> = (0..nk * na * ni).map(|_| None).collect();
        for i in 0..ni {
            for k in 0..nk {
                let (g, d) = (&gts[i * nk + k], &dts[i * nk + k]);
                if g.is_empty() && d.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = d.iter().map(|x| x.score).collect();
                let mut order = by_score_desc(&scores);
                order.truncate(max_det);
                let dsorted: Vec<&Dt> = order.iter().map(|&j| &d[j]).collect();
                // ious[dt][gt], ground truth in file order.
                let ious: Vec<Vec<f64>> = dsorted
                    .iter()
                    .map(|dt| g.iter().map(|gt| iou(&dt.geom, &gt.geom, gt.crowd)).collect())
                    .collect();
                for (a, range) in AREA_RANGES.iter().enumerate() {
                    evals[(k * na + a) * ni + i] = Some(evaluate_img(g, &dsorted, &ious, range, &thresholds));
                }
            }
        }

        let (t_n, r_n, a_n, m_n) = (thresholds.len(), 101, na, MAX_DETS.len());
        let mut precision = vec![-1.0; t_n * r_n * nk * a_n * m_n];
        let mut recall = vec![-1.0; t_n * nk * a_n * m_n];
        let rec_thrs = recall_thresholds();
        for k in 0..nk {
            for a in 0..na {
                let es: Vec<&ImgEval> = (0..ni).filter_map(|i| evals[(k * na + a) * ni + i].as_ref()).collect();
                let npig = es.iter().flat_map(|e| &e.gt_ignore).filter(|&&ig| !ig).count();
                if npig == 0 {
                    continue;
                }
                for (m, &md) in MAX_DETS.iter().enumerate() {
                    let mut scores = Vec::new();
                    // (image, position) of each concatenated detection.
                    let mut at = Vec::new();
                    for (e_i, e) in es.iter().enumerate() {
                        let n = e.scores.len().min(md);
                        scores.extend_from_slice(&e.scores[..n]);
                        at.extend((0..n).map(|p| (e_i, p)));
                    }
                    let order = by_score_desc(&scores);
                    for t in 0..t_n {
                        let (mut tp, mut fp) = (0.0f64, 0.0f64);
                        let mut rc = Vec::with_capacity(order.len());
                        let mut pr = Vec::with_capacity(order.len());
                        for &j in &order {
                            let (e_i, p) = at[j];
                            if es[e_i].dt_ignore[t][p] {
                                // Neither: the running sums repeat.
                            } else if es[e_i].matched[t][p] {
                                tp += 1.0;
                            } else {
                                fp += 1.0;
                            }
                            rc.push(tp / npig as f64);
                            pr.push(tp / (fp + tp + f64::EPSILON));
                        }
                        let nd = rc.len();
                        recall[((t * nk + k) * a_n + a) * m_n + m] = if nd > 0 { rc[nd - 1] } else { 0.0 };
                        // Precision envelope: the best precision at any higher recall.
                        for i in (1..nd).rev() {
                            if pr[i] > pr[i - 1] {
                                pr[i - 1] = pr[i];
                            }
                        }
                        for (r, &thr) in rec_thrs.iter().enumerate() {
                            // np.searchsorted(rc, thr, side='left')
                            let pi = rc.partition_point(|&x| x < thr);
                            let q = if pi < nd { pr[pi] } else { 0.0 };
                            precision[(((t * r_n + r) * nk + k) * a_n + a) * m_n + m] = q;
                        }
                    }
                }
            }
        }

        let mut eval = CocoEval {
            cat_ids,
            precision,
            recall,
            stats: [0.0; 12],
        };
        eval.stats = eval.summarize();
        Ok(eval)
    }

    /// Mean of the entries > -1 over the selected IoU thresholds, all categories (and recall
    /// points for AP), one area range and max-detections setting; -1 if there are none.
    fn summary(&self, ap: bool, iou_thr: Option<f64>, area: usize, max_dets: usize) -> f64 {
        let thresholds = iou_thresholds();
        let nk = self.cat_ids.len();
        let (a_n, m_n) = (AREA_RANGES.len(), MAX_DETS.len());
        let Some(m) = MAX_DETS.iter().position(|&d| d == max_dets) else {
            return -1.0;
        };
        // pycocotools selects thresholds with `==`; keep that (0.75 is exactly representable
        // in its linspace, 0.9 is not).
        let ts: Vec<usize> = (0..thresholds.len())
            .filter(|&t| iou_thr.is_none_or(|v| thresholds[t] == v))
            .collect();
        let (mut sum, mut n) = (0.0, 0usize);
        for &t in &ts {
            for k in 0..nk {
                if ap {
                    for r in 0..101 {
                        let v = self.precision[(((t * 101 + r) * nk + k) * a_n + area) * m_n + m];
                        if v > -1.0 {
                            sum += v;
                            n += 1;
                        }
                    }
                } else {
                    let v = self.recall[((t * nk + k) * a_n + area) * m_n + m];
                    if v > -1.0 {
                        sum += v;
                        n += 1;
                    }
                }
            }
        }
        if n == 0 {
            -1.0
        } else {
            sum / n as f64
        }
    }

    fn summarize(&self) -> [f64; 12] {
        let md = MAX_DETS[2];
        [
            self.summary(true, None, 0, md),
            self.summary(true, Some(0.5), 0, md),
            self.summary(true, Some(0.75), 0, md),
            self.summary(true, None, 1, md),
            self.summary(true, None, 2, md),
            self.summary(true, None, 3, md),
            self.summary(false, None, 0, MAX_DETS[0]),
            self.summary(false, None, 0, MAX_DETS[1]),
            self.summary(false, None, 0, md),
            self.summary(false, None, 1, md),
            self.summary(false, None, 2, md),
            self.summary(false, None, 3, md),
        ]
    }
}

/// Greedy matching of one image and category in one area range (pycocotools' `evaluateImg`).
/// `dts` are sorted best first and `ious[d][g]` follows the ground truth's file order.
fn evaluate_img(gts: &[Gt], dts: &[&Dt], ious: &[Vec<f64>], range: &[f64; 2], thresholds: &[f64]) -> ImgEval {
    let out_of_range = |area: f64| area < range[0] || area > range[1];
    let ignore: Vec<bool> = gts.iter().map(|g| g.crowd || out_of_range(g.area)).collect();
    // Ignored ground truth last, otherwise in file order.
    let gt_order: Vec<usize> = (0..gts.len())
        .filter(|&g| !ignore[g])
        .chain((0..gts.len()).filter(|&g| ignore[g]))
        .collect();
    let gt_ignore: Vec<bool> = gt_order.iter().map(|&g| ignore[g]).collect();
    let (nt, nd) = (thresholds.len(), dts.len());
    let mut matched = vec![vec![false; nd]; nt];
    let mut dt_ignore = vec![vec![false; nd]; nt];
    for (t, &thr) in thresholds.iter().enumerate() {
        let mut gt_taken = vec![false; gts.len()];
        for d in 0..nd {
            let mut best = thr.min(1.0 - 1e-10);
            let mut m: Option<usize> = None;
            for (gi, &g) in gt_order.iter().enumerate() {
                if gt_taken[gi] && !gts[g].crowd {
                    continue;
                }
                // Once matched to a regular ground truth, ignored ones (sorted last) can't win.
                if let Some(mi) = m {
                    if !gt_ignore[mi] && gt_ignore[gi] {
                        break;
                    }
                }
                if ious[d][g] < best {
                    continue;
                }
                best = ious[d][g];
                m = Some(gi);
            }
            if let Some(mi) = m {
                dt_ignore[t][d] = gt_ignore[mi];
                matched[t][d] = gts[gt_order[mi]].id != 0;
                gt_taken[mi] = true;
            }
        }
        for d in 0..nd {
            if !matched[t][d] && out_of_range(dts[d].area) {
                dt_ignore[t][d] = true;
            }
        }
    }
    ImgEval {
        scores: dts.iter().map(|d| d.score).collect(),
        matched,
        dt_ignore,
        gt_ignore,
    }
}

/// The 12 lines of pycocotools' `summarize()`.
pub fn summary_text(stats: &[f64; 12]) -> String {
    let lines: [(bool, &str, &str, usize); 12] = [
        (true, "0.50:0.95", "all", 100),
        (true, "0.50", "all", 100),
        (true, "0.75", "all", 100),
        (true, "0.50:0.95", "small", 100),
        (true, "0.50:0.95", "medium", 100),
        (true, "0.50:0.95", "large", 100),
        (false, "0.50:0.95", "all", 1),
        (false, "0.50:0.95", "all", 10),
        (false, "0.50:0.95", "all", 100),
        (false, "0.50:0.95", "small", 100),
        (false, "0.50:0.95", "medium", 100),
        (false, "0.50:0.95", "large", 100),
    ];
    let mut s = String::new();
    for ((ap, iou, area, md), v) in lines.iter().zip(stats) {
        let (title, kind) = if *ap {
            ("Average Precision", "(AP)")
        } else {
            ("Average Recall", "(AR)")
        };
        s += &format!(" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={md:>3} ] = {v:0.3}\n");
    }
    s
}
