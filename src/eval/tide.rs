//! TIDE error breakdown (Bolya et al., ECCV 2020; the paper's Figure 4), replicating the
//! `tidecv` package with its defaults: foreground IoU 0.5, background IoU 0.1, at most 100
//! detections per image.
//!
//! Per image, detections (best score first) are matched greedily to the highest-IoU unused
//! ground truth of their class; unmatched ones inside a crowd region of their class are
//! ignored. Each false positive gets one error, tested in this order: localization (IoU with a
//! ground truth of its class in [0.1, 0.5]), classification (IoU >= 0.5 with another class),
//! duplicate (IoU >= 0.5 with an already matched ground truth of its class), background
//! (IoU <= 0.1 with everything), otherwise "both". Ground truth left unmatched and not the
//! target of a localization or classification error is a miss.
//!
//! An error's dAP is the AP50 gained by fixing all errors of that type: a localization or
//! classification error becomes a true positive (of the ground truth's class) when it is the
//! best-scoring such error on an unmatched ground truth and is dropped otherwise, as are
//! duplicates, background and "both" errors; fixing misses removes them from the ground truth
//! count. AP is tidecv's own (mean over classes, a class with any detection or ground truth
//! counts), not COCOeval's: precision at recall `i / 100` is read off the curve directly.

use std::collections::HashMap;

use anyhow::{bail, Result};
use serde::Serialize;

use super::cocoeval::{iou, Geom};
use super::{Detections, GroundTruth};

/// tidecv's `pos_threshold`.
pub const POS_THRESH: f64 = 0.5;
/// tidecv's `background_threshold`.
pub const BG_THRESH: f64 = 0.1;
/// tidecv's `max_dets` for COCO ground truth.
pub const MAX_DETS: usize = 100;

/// Boxes or masks (tidecv's `TIDE.BOX` / `TIDE.MASK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TideMode {
    Box,
    Mask,
}

/// The six main error types, in tidecv's order.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MainErrors<T> {
    #[serde(rename = "Cls")]
    pub cls: T,
    #[serde(rename = "Loc")]
    pub loc: T,
    #[serde(rename = "Both")]
    pub both: T,
    #[serde(rename = "Dupe")]
    pub dupe: T,
    #[serde(rename = "Bkg")]
    pub bkg: T,
    #[serde(rename = "Miss")]
    pub miss: T,
}

/// The special errors: AP gained with perfect precision (all false positives scored 0) or
/// perfect recall (false negatives removed).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SpecialErrors {
    #[serde(rename = "FalsePos")]
    pub false_pos: f64,
    #[serde(rename = "FalseNeg")]
    pub false_neg: f64,
}

/// TIDE of one run, in tidecv's units (AP points, 0..100).
#[derive(Clone, Debug, Serialize)]
pub struct TideResult {
    /// tidecv's AP at IoU 0.5.
    pub ap50: f64,
    /// dAP of each main error type.
    pub main: MainErrors<f64>,
    pub special: SpecialErrors,
    /// How many errors of each type.
    pub counts: MainErrors<usize>,
}

impl TideResult {
    /// tidecv's summary tables.
    pub fn to_text(&self) -> String {
        let m = &self.main;
        let c = &self.counts;
        format!(
            "AP50 (tidecv): {:.2}\n\
             Main errors  {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}\n\
             \x20 dAP        {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2}\n\
             \x20 count      {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}\n\
             Special errors  FalsePos {:.2}  FalseNeg {:.2}\n",
            self.ap50,
            "Cls",
            "Loc",
            "Both",
            "Dupe",
            "Bkg",
            "Miss",
            m.cls,
            m.loc,
            m.both,
            m.dupe,
            m.bkg,
            m.miss,
            c.cls,
            c.loc,
            c.both,
            c.dupe,
            c.bkg,
            c.miss,
            self.special.false_pos,
            self.special.false_neg
        )
    }
}

/// A point of a precision-recall curve.
#[derive(Clone, Copy)]
struct Point {
    score: f64,
    correct: bool,
}

/// tidecv's `APDataObject`: points keyed by detection, in insertion order (which breaks score
/// ties when sorting), and the number of ground-truth positives.
#[derive(Clone, Default)]
struct ApData {
    ids: Vec<usize>,
    points: Vec<Point>,
    slot: HashMap<usize, usize>,
    num_gt: i64,
}

impl ApData {
    fn push(&mut self, id: usize, p: Point) {
        // A Python dict: re-inserting a key keeps its place.
        if let Some(&s) = self.slot.get(&id) {
            self.points[s] = p;
        } else {
            self.slot.insert(id, self.points.len());
            self.ids.push(id);
            self.points.push(p);
        }
    }

    fn is_empty(&self) -> bool {
        self.points.is_empty() && self.num_gt == 0
    }

    /// tidecv's `get_ap`, in AP points.
    fn ap(&self) -> f64 {
        if self.num_gt == 0 {
            return 0.0;
        }
        let mut pts = self.points.clone();
        // Python's sort by -score is stable.
        pts.sort_by(|a, b| b.score.partial_cmp(&a.score).expect("scores are finite"));
        let (mut tp, mut fp) = (0usize, 0usize);
        let mut precisions = Vec::with_capacity(pts.len());
        let mut recalls = Vec::with_capacity(pts.len());
        for p in &pts {
            if p.correct {
                tp += 1;
            } else {
                fp += 1;
            }
            precisions.push(tp as f64 / (tp + fp) as f64);
            recalls.push(tp as f64 / self.num_gt as f64);
        }
        for i in (1..precisions.len()).rev() {
            if precisions[i] > precisions[i - 1] {
                precisions[i - 1] = precisions[i];
            }
        }
        let mut sum = 0.0;
        for bar in 0..=100 {
            // tidecv's recall axis is x / 100 (COCOeval's is x * 0.01).
            let x = bar as f64 / 100.0;
            let idx = recalls.partition_point(|&r| r < x);
            if idx < precisions.len() {
                sum += precisions[idx];
            }
        }
        sum / 101.0 * 100.0
    }
}

/// tidecv's `ClassedAPDataObject`, classes in insertion order.
#[derive(Clone, Default)]
struct ClassedAp {
    order: Vec<i64>,
    objs: HashMap<i64, ApData>,
}

impl ClassedAp {
    fn obj(&mut self, class: i64) -> &mut ApData {
        if !self.objs.contains_key(&class) {
            self.order.push(class);
        }
        self.objs.entry(class).or_default()
    }

    fn m_ap(&self) -> f64 {
        let aps: Vec<f64> = self
            .order
            .iter()
            .map(|c| &self.objs[c])
            .filter(|o| !o.is_empty())
            .map(ApData::ap)
            .collect();
        if aps.is_empty() {
            // tidecv divides by zero here (no ground truth and no detections at all).
            return 0.0;
        }
        aps.iter().sum::<f64>() / aps.len() as f64
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cls,
    Loc,
    Both,
    Dupe,
    Bkg,
    Miss,
}

/// One error: the data point it contributes as is, and once fixed.
struct Error {
    kind: Kind,
    /// Detection index (pred errors) or ground-truth index (misses), for keys.
    id: usize,
    original: Option<(i64, Point)>,
    fixed: Fixed,
}

enum Fixed {
    /// The data point disappears.
    Drop,
    /// It becomes this point of this class.
    Point(i64, Point),
    /// One ground-truth positive of this class is removed (a fixed miss).
    RemoveGt(i64),
}

/// A localization or classification error's claim on a ground truth (tidecv's
/// `BestGTMatch`): the best-scoring claim on an unmatched ground truth wins.
struct Claim {
    pred: usize,
    gt: usize,
    /// The ground truth was already matched: the claim can only be dropped.
    suppress: bool,
}

struct GtItem<'a> {
    class: i64,
    crowd: bool,
    geom: Geom<'a>,
}

struct DtItem<'a> {
    class: i64,
    score: f64,
    geom: Geom<'a>,
}

/// Runs TIDE at IoU 0.5 over all ground-truth images.
pub fn evaluate(gt: &GroundTruth, dets: &Detections, mode: TideMode) -> Result<TideResult> {
    let gts: Vec<GtItem> = gt
        .annotations
        .iter()
        .map(|a| {
            let geom = match mode {
                TideMode::Box => match a.bbox {
                    Some(b) => Geom::Box(b),
                    None => bail!("{}: annotation id {}: missing field `bbox`", gt.source, a.id),
                },
                TideMode::Mask => match &a.segmentation {
                    Some(m) => Geom::Mask(m),
                    None => bail!("{}: annotation id {}: missing field `segmentation`", gt.source, a.id),
                },
            };
            Ok(GtItem {
                class: a.category_id,
                crowd: a.iscrowd,
                geom,
            })
        })
        .collect::<Result<_>>()?;
    let boxes = match mode {
        TideMode::Box => dets.boxes()?,
        TideMode::Mask => Vec::new(),
    };
    let dts: Vec<DtItem> = dets
        .detections
        .iter()
        .enumerate()
        .map(|(n, d)| {
            let geom = match mode {
                TideMode::Box => Geom::Box(boxes[n].0),
                TideMode::Mask => match &d.segmentation {
                    Some(m) => Geom::Mask(m),
                    None => bail!("{}: detection {n} has no `segmentation`", dets.source),
                },
            };
            Ok(DtItem {
                class: d.category_id,
                score: d.score,
                geom,
            })
        })
        .collect::<Result<_>>()?;

    let mut gts_of: HashMap<i64, Vec<usize>> = HashMap::new();
    for (g, a) in gt.annotations.iter().enumerate() {
        gts_of.entry(a.image_id).or_default().push(g);
    }
    let mut dts_of: HashMap<i64, Vec<usize>> = HashMap::new();
    for (n, d) in dets.detections.iter().enumerate() {
        dts_of.entry(d.image_id).or_default().push(n);
    }

    let mut run = Run {
        gts: &gts,
        dts: &dts,
        ap: ClassedAp::default(),
        errors: Vec::new(),
        claims: Vec::new(),
        false_negatives: HashMap::new(),
    };
    // Image ids are unique (checked when loading); tidecv walks them in file order.
    for im in &gt.images {
        let empty = Vec::new();
        run.image(
            gts_of.get(&im.id).unwrap_or(&empty),
            dts_of.get(&im.id).unwrap_or(&empty),
        );
    }
    Ok(run.finish())
}

/// An error as found, before the claims on ground truth are settled.
#[derive(Clone, Copy)]
struct Recorded {
    kind: Kind,
    /// Detection index, or ground-truth index for misses.
    id: usize,
    /// The data point the error contributes unfixed (none for misses and ignored detections).
    original: Option<(i64, Point)>,
    /// Index into `claims` for localization and classification errors.
    claim: Option<usize>,
}

fn rec(kind: Kind, id: usize, original: Option<(i64, Point)>, claim: Option<usize>) -> Recorded {
    Recorded {
        kind,
        id,
        original,
        claim,
    }
}

struct Run<'a> {
    gts: &'a [GtItem<'a>],
    dts: &'a [DtItem<'a>],
    ap: ClassedAp,
    /// Errors in the order tidecv records them.
    errors: Vec<Recorded>,
    claims: Vec<Claim>,
    /// Unmatched non-crowd ground truth per class (tidecv's `false_negatives`).
    false_negatives: HashMap<i64, usize>,
}

/// First index of the largest value (numpy's argmax), and that value.
fn argmax(row: impl Iterator<Item = f64>) -> (usize, f64) {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in row.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best
}

impl Run<'_> {
    fn image(&mut self, gt_idx: &[usize], dt_idx: &[usize]) {
        for &g in gt_idx {
            if !self.gts[g].crowd {
                self.ap.obj(self.gts[g].class).num_gt += 1;
            }
        }
        let truths: Vec<usize> = gt_idx.iter().copied().filter(|&g| !self.gts[g].crowd).collect();
        if dt_idx.is_empty() {
            for &g in &truths {
                self.ap.obj(self.gts[g].class);
                *self.false_negatives.entry(self.gts[g].class).or_default() += 1;
                self.errors.push(rec(Kind::Miss, g, None, None));
            }
            return;
        }
        let regions: Vec<usize> = gt_idx.iter().copied().filter(|&g| self.gts[g].crowd).collect();
        let mut preds: Vec<usize> = dt_idx.to_vec();
        preds.sort_by(|&a, &b| {
            self.dts[b]
                .score
                .partial_cmp(&self.dts[a].score)
                .expect("scores are finite")
        });
        preds.truncate(MAX_DETS);
        let (np, ng) = (preds.len(), truths.len());
        let gt_iou: Vec<Vec<f64>> = preds
            .iter()
            .map(|&p| {
                truths
                    .iter()
                    .map(|&g| iou(&self.dts[p].geom, &self.gts[g].geom, false))
                    .collect()
            })
            .collect();
        let same = |p: usize, g: usize| self.dts[preds[p]].class == self.gts[truths[g]].class;
        let cls_iou = |p: usize, g: usize| if same(p, g) { gt_iou[p][g] } else { 0.0 };

        // Some(true) matched, Some(false) unmatched, None ignored (in a crowd region).
        let mut used: Vec<Option<bool>> = vec![Some(false); np];
        let mut gt_used = vec![false; ng];
        if ng > 0 {
            let mut buffer: Vec<Vec<f64>> = (0..np).map(|p| (0..ng).map(|g| cls_iou(p, g)).collect()).collect();
            for p in 0..np {
                let (g, v) = argmax(buffer[p].iter().copied());
                if v >= POS_THRESH {
                    used[p] = Some(true);
                    gt_used[g] = true;
                    for row in buffer.iter_mut() {
                        row[g] = 0.0;
                    }
                }
            }
        }
        for &r in &regions {
            for p in 0..np {
                let d = &self.dts[preds[p]];
                if used[p] != Some(true)
                    && iou(&d.geom, &self.gts[r].geom, true) > POS_THRESH
                    && self.gts[r].class == d.class
                {
                    used[p] = None;
                }
            }
        }

        let mut usable = vec![false; ng];
        for p in 0..np {
            let d = &self.dts[preds[p]];
            let id = preds[p];
            if let Some(correct) = used[p] {
                self.ap.obj(d.class).push(
                    id,
                    Point {
                        score: d.score,
                        correct,
                    },
                );
            }
            if used[p] == Some(true) {
                continue;
            }
            // An ignored detection's error has no data point until it is fixed.
            let original = used[p].map(|_| {
                (
                    d.class,
                    Point {
                        score: d.score,
                        correct: false,
                    },
                )
            });
            if ng == 0 {
                self.errors.push(rec(Kind::Bkg, id, original, None));
                continue;
            }
            let mut claim = |kind: Kind, g: usize, errors: &mut Vec<_>, claims: &mut Vec<Claim>| {
                usable[g] |= !gt_used[g];
                claims.push(Claim {
                    pred: id,
                    gt: truths[g],
                    suppress: gt_used[g],
                });
                errors.push(rec(kind, id, original, Some(claims.len() - 1)));
            };
            let (g, v) = argmax((0..ng).map(|g| cls_iou(p, g)));
            if (BG_THRESH..=POS_THRESH).contains(&v) {
                claim(Kind::Loc, g, &mut self.errors, &mut self.claims);
                continue;
            }
            let (g, v) = argmax((0..ng).map(|g| if same(p, g) { 0.0 } else { gt_iou[p][g] }));
            if v >= POS_THRESH {
                claim(Kind::Cls, g, &mut self.errors, &mut self.claims);
                continue;
            }
            let (_, v) = argmax((0..ng).map(|g| if gt_used[g] { cls_iou(p, g) } else { 0.0 }));
            if v >= POS_THRESH {
                self.errors.push(rec(Kind::Dupe, id, original, None));
                continue;
            }
            let (_, v) = argmax(gt_iou[p].iter().copied());
            if v <= BG_THRESH {
                self.errors.push(rec(Kind::Bkg, id, original, None));
                continue;
            }
            self.errors.push(rec(Kind::Both, id, original, None));
        }
        for (g, &t) in truths.iter().enumerate() {
            if !gt_used[g] {
                self.ap.obj(self.gts[t].class);
                *self.false_negatives.entry(self.gts[t].class).or_default() += 1;
                if !usable[g] {
                    self.errors.push(rec(Kind::Miss, t, None, None));
                }
            }
        }
    }

    fn finish(self) -> TideResult {
        // The best-scoring claim per ground truth; the first of equal scores wins.
        let mut best: HashMap<usize, (f64, usize)> = HashMap::new();
        for c in self.claims.iter().filter(|c| !c.suppress) {
            let score = self.dts[c.pred].score;
            match best.get(&c.gt) {
                Some(&(s, _)) if s >= score => {}
                _ => {
                    best.insert(c.gt, (score, c.pred));
                }
            }
        }
        let errors: Vec<Error> = self
            .errors
            .iter()
            .map(
                |&Recorded {
                     kind,
                     id,
                     original,
                     claim,
                 }| {
                    let fixed = match kind {
                        Kind::Miss => Fixed::RemoveGt(self.gts[id].class),
                        Kind::Cls | Kind::Loc => {
                            let c = &self.claims[claim.expect("claims come with cls/loc errors")];
                            let class = if kind == Kind::Cls {
                                self.gts[c.gt].class
                            } else {
                                self.dts[id].class
                            };
                            if !c.suppress && best.get(&c.gt).map(|b| b.1) == Some(c.pred) {
                                Fixed::Point(
                                    class,
                                    Point {
                                        score: self.dts[id].score,
                                        correct: true,
                                    },
                                )
                            } else {
                                Fixed::Drop
                            }
                        }
                        Kind::Both | Kind::Dupe | Kind::Bkg => Fixed::Drop,
                    };
                    Error {
                        kind,
                        id,
                        original,
                        fixed,
                    }
                },
            )
            .collect();
        let ap50 = self.ap.m_ap();
        let delta = |kind: Kind| (fix(&self.ap, &errors, |e| e.kind == kind, None).m_ap() - ap50).max(0.0);
        let main = MainErrors {
            cls: delta(Kind::Cls),
            loc: delta(Kind::Loc),
            both: delta(Kind::Both),
            dupe: delta(Kind::Dupe),
            bkg: delta(Kind::Bkg),
            miss: delta(Kind::Miss),
        };
        let perfect = |p: Point| Point {
            score: if p.correct { 1.0 } else { 0.0 },
            correct: p.correct,
        };
        let special = SpecialErrors {
            false_pos: fix(&self.ap, &errors, |_| false, Some(&perfect)).m_ap() - ap50,
            false_neg: {
                let mut ap = fix(&self.ap, &errors, |_| false, None);
                for (class, n) in &self.false_negatives {
                    ap.obj(*class).num_gt -= *n as i64;
                }
                ap.m_ap() - ap50
            },
        };
        let count = |kind: Kind| errors.iter().filter(|e| e.kind == kind).count();
        TideResult {
            ap50,
            main,
            special,
            counts: MainErrors {
                cls: count(Kind::Cls),
                loc: count(Kind::Loc),
                both: count(Kind::Both),
                dupe: count(Kind::Dupe),
                bkg: count(Kind::Bkg),
                miss: count(Kind::Miss),
            },
        }
    }
}

/// tidecv's `fix_errors`: the errors selected by `condition` replaced by their fixed form,
/// the others as they were, then all true positives, with `transform` applied to every point.
fn fix(
    ap: &ClassedAp,
    errors: &[Error],
    condition: impl Fn(&Error) -> bool,
    transform: Option<&dyn Fn(Point) -> Point>,
) -> ClassedAp {
    let mut gt_pos: Vec<(i64, i64)> = ap.order.iter().map(|c| (*c, ap.objs[c].num_gt)).collect();
    let mut out = ClassedAp::default();
    let tr = |p: Point| transform.map_or(p, |t| t(p));
    for e in errors {
        let mut point = e.original;
        if condition(e) {
            point = match e.fixed {
                Fixed::Drop => None,
                Fixed::Point(c, p) => Some((c, p)),
                Fixed::RemoveGt(c) => {
                    if let Some(slot) = gt_pos.iter_mut().find(|(k, _)| *k == c) {
                        slot.1 -= 1;
                    }
                    None
                }
            };
        }
        if let Some((c, p)) = point {
            out.obj(c).push(e.id, tr(p));
        }
    }
    for (c, _) in &gt_pos {
        let src = &ap.objs[c];
        for (id, p) in src.ids.iter().zip(&src.points) {
            if p.correct {
                out.obj(*c).push(*id, tr(*p));
            }
        }
    }
    for (c, n) in gt_pos {
        out.obj(c).num_gt += n;
    }
    out
}
