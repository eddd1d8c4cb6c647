//! The COCO mask codec, bit-exact with pycocotools (`maskApi.c`).
//!
//! A mask is held as [`Runs`]: the lengths of alternating runs of 0s and 1s over the pixels in
//! column-major order (x outer, y inner), starting with a possibly empty run of 0s. COCO files
//! store it compressed ([`Rle`], a string of 6-bit characters) or uncompressed (`counts` as a
//! list of integers); annotations may also be polygons, which [`Runs::from_polygon`] rasterizes
//! exactly as pycocotools' `frPoly` does, so areas and IoUs match pycocotools to the pixel.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// A compressed RLE as COCO files store it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rle {
    /// `[height, width]`.
    pub size: [usize; 2],
    pub counts: String,
}

/// Encodes a row-major `height x width` binary mask (nonzero = inside) as pycocotools does.
pub fn rle_encode(mask: &[u8], height: usize, width: usize) -> Rle {
    assert_eq!(mask.len(), height * width, "mask is not {height}x{width}");
    Runs::from_mask(mask, height, width).compress()
}

/// Upsampled boundary points a polygon may produce before it is refused: pycocotools allocates
/// one per 1/5 pixel of perimeter, so this bounds memory for absurd coordinates.
const MAX_POLYGON_POINTS: i64 = 100_000_000;

/// A run-length encoded binary mask (see the module docs); the counts always sum to
/// `height * width`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runs {
    height: usize,
    width: usize,
    counts: Vec<u32>,
}

impl Runs {
    /// Runs from explicit counts (an uncompressed COCO RLE), checked to cover the mask exactly.
    pub fn new(height: usize, width: usize, counts: Vec<u32>) -> Result<Self> {
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        let pixels = height as u64 * width as u64;
        if total != pixels {
            bail!("RLE counts sum to {total}, but a {height}x{width} mask has {pixels} pixels");
        }
        if pixels > u32::MAX as u64 {
            bail!("a {height}x{width} mask is larger than COCO's 32-bit run lengths allow");
        }
        Ok(Runs { height, width, counts })
    }

    /// Runs from a row-major `height x width` mask (nonzero = inside).
    pub fn from_mask(mask: &[u8], height: usize, width: usize) -> Self {
        assert_eq!(mask.len(), height * width, "mask is not {height}x{width}");
        let mut counts = Vec::new();
        let (mut current, mut run) = (false, 0u32);
        for x in 0..width {
            for y in 0..height {
                let v = mask[y * width + x] != 0;
                if v != current {
                    counts.push(run);
                    run = 0;
                    current = v;
                }
                run += 1;
            }
        }
        counts.push(run);
        Runs { height, width, counts }
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// The run lengths, starting with a run of 0s.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// The row-major `height x width` mask, 1 inside.
    pub fn decode(&self) -> Vec<u8> {
        let mut mask = vec![0u8; self.height * self.width];
        let mut p = 0usize;
        for (i, &c) in self.counts.iter().enumerate() {
            if i % 2 == 1 {
                for q in p..p + c as usize {
                    let (x, y) = (q / self.height, q % self.height);
                    mask[y * self.width + x] = 1;
                }
            }
            p += c as usize;
        }
        mask
    }

    /// Number of pixels inside.
    pub fn area(&self) -> u64 {
        self.counts.iter().skip(1).step_by(2).map(|&c| c as u64).sum()
    }

    /// `[x, y, width, height]` of the pixels inside, as pycocotools' `toBbox` computes it
    /// (`[0, 0, 0, 0]` for an empty mask). The unsigned wrap-around of the C code is kept so
    /// that even odd run layouts give pycocotools' answer.
    pub fn to_bbox(&self) -> [f64; 4] {
        let h = self.height as u32;
        let m = (self.counts.len() / 2) * 2;
        if m == 0 || h == 0 {
            return [0.0; 4];
        }
        let (mut xs, mut ys, mut xe, mut ye) = (self.width as u32, h, 0u32, 0u32);
        let (mut cc, mut xp) = (0u32, 0u32);
        for (j, &c) in self.counts[..m].iter().enumerate() {
            cc = cc.wrapping_add(c);
            let t = cc.wrapping_sub((j % 2) as u32);
            let y = t % h;
            let x = (t - y) / h;
            if j % 2 == 0 {
                xp = x;
            } else if xp < x {
                // A run of 1s that wraps into the next column spans the full height.
                ys = 0;
                ye = h - 1;
            }
            xs = xs.min(x);
            xe = xe.max(x);
            ys = ys.min(y);
            ye = ye.max(y);
        }
        [
            xs as f64,
            ys as f64,
            xe.wrapping_sub(xs).wrapping_add(1) as f64,
            ye.wrapping_sub(ys).wrapping_add(1) as f64,
        ]
    }

    /// The compressed form: each count (minus the count two places back, from the fourth on)
    /// as 5-bit groups with a continuation bit, offset by 48 into printable ASCII.
    pub fn compress(&self) -> Rle {
        let mut s = String::new();
        for i in 0..self.counts.len() {
            let mut x = self.counts[i] as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            loop {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push((c + 48) as char);
                if !more {
                    break;
                }
            }
        }
        Rle {
            size: [self.height, self.width],
            counts: s,
        }
    }

    /// Decodes a compressed counts string of a `height x width` mask.
    pub fn from_compressed(counts: &str, height: usize, width: usize) -> Result<Self> {
        let bytes = counts.as_bytes();
        let mut out: Vec<u32> = Vec::new();
        let mut p = 0;
        while p < bytes.len() {
            let (mut x, mut k, mut more) = (0i64, 0u32, true);
            while more {
                let Some(&b) = bytes.get(p) else {
                    bail!("compressed RLE ends in the middle of a count");
                };
                if !(48..48 + 64).contains(&b) {
                    bail!(
                        "compressed RLE has the character {:?} at {p}, outside '0'..='o'",
                        b as char
                    );
                }
                if k >= 7 {
                    bail!("compressed RLE has a count longer than 7 characters at {p}");
                }
                let c = (b - 48) as i64;
                x |= (c & 0x1f) << (5 * k);
                more = c & 0x20 != 0;
                p += 1;
                k += 1;
                if !more && c & 0x10 != 0 {
                    // Sign-extend the last group: deltas may be negative.
                    x |= -1i64 << (5 * k);
                }
            }
            if out.len() > 2 {
                x += out[out.len() - 2] as i64;
            }
            if !(0..=u32::MAX as i64).contains(&x) {
                bail!("compressed RLE decodes to the run length {x}");
            }
            out.push(x as u32);
        }
        Runs::new(height, width, out)
    }

    /// Decodes a compressed COCO RLE.
    pub fn from_rle(rle: &Rle) -> Result<Self> {
        Runs::from_compressed(&rle.counts, rle.size[0], rle.size[1])
    }

    /// Rasterizes one polygon `[x0, y0, x1, y1, ...]` (an odd trailing coordinate is ignored,
    /// as pycocotools does) into a `height x width` mask. This is pycocotools' `rleFrPoly`: the
    /// boundary is walked on a 5x finer integer grid and a pixel is inside when its center lies
    /// inside, so areas and IoUs agree with pycocotools exactly.
    pub fn from_polygon(xy: &[f64], height: usize, width: usize) -> Result<Self> {
        check_size(height, width)?;
        let scale = 5.0f64;
        let k = xy.len() / 2;
        if let Some(v) = xy[..2 * k].iter().find(|v| !v.is_finite() || v.abs() * scale > 1e9) {
            bail!("polygon coordinate {v} is not a finite number of a plausible size");
        }
        if k == 0 {
            return Runs::new(height, width, vec![(height * width) as u32]);
        }
        // Truncation toward zero, as C's (int) cast.
        let mut x: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j] + 0.5) as i32 as i64).collect();
        let mut y: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j + 1] + 0.5) as i32 as i64).collect();
        x.push(x[0]);
        y.push(y[0]);
        let total: i64 = (0..k)
            .map(|j| (x[j] - x[j + 1]).abs().max((y[j] - y[j + 1]).abs()) + 1)
            .sum();
        if total > MAX_POLYGON_POINTS {
            bail!("polygon is too large to rasterize ({total} boundary points)");
        }
        // Dense boundary points (u, v) on the upsampled grid.
        let (mut u, mut v) = (Vec::with_capacity(total as usize), Vec::with_capacity(total as usize));
        for j in 0..k {
            let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
            let dx = (xe - xs).abs();
            let dy = (ys - ye).abs();
            let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
            if flip {
                std::mem::swap(&mut xs, &mut xe);
                std::mem::swap(&mut ys, &mut ye);
            }
            // dx == dy == 0 gives NaN as in C; that point's v is never read (its u repeats).
            let s = if dx >= dy {
                (ye - ys) as f64 / dx as f64
            } else {
                (xe - xs) as f64 / dy as f64
            };
            if dx >= dy {
                for d in 0..=dx {
                    let t = if flip { dx - d } else { d };
                    u.push(t + xs);
                    v.push((ys as f64 + s * t as f64 + 0.5) as i32 as i64);
                }
            } else {
                for d in 0..=dy {
                    let t = if flip { dy - d } else { d };
                    v.push(t + ys);
                    u.push((xs as f64 + s * t as f64 + 0.5) as i32 as i64);
                }
            }
        }
        // Where the boundary crosses a pixel-center column, the first pixel inside below it.
        let (hf, wf) = (height as f64, width as f64);
        let mut a: Vec<u32> = Vec::new();
        for j in 1..u.len() {
            if u[j] == u[j - 1] {
                continue;
            }
            let xd = (if u[j] < u[j - 1] { u[j] } else { u[j] - 1 }) as f64;
            let xd = (xd + 0.5) / scale - 0.5;
            if xd.floor() != xd || xd < 0.0 || xd > wf - 1.0 {
                continue;
            }
            let yd = v[j].min(v[j - 1]) as f64;
            let mut yd = (yd + 0.5) / scale - 0.5;
            if yd < 0.0 {
                yd = 0.0;
            } else if yd > hf {
                yd = hf;
            }
            let yd = yd.ceil();
            a.push((xd as i64 * height as i64 + yd as i64) as u32);
        }
        // Sorted crossings toggle inside/outside; differences are the run lengths.
        a.push((height * width) as u32);
        a.sort_unstable();
        let mut prev = 0u32;
        for aj in a.iter_mut() {
            let t = *aj;
            *aj -= prev;
            prev = t;
        }
        // Two crossings at the same place cancel: drop the empty run, join its neighbours.
        let mut b = vec![a[0]];
        let mut j = 1;
        while j < a.len() {
            if a[j] > 0 {
                b.push(a[j]);
                j += 1;
            } else {
                j += 1;
                if j < a.len() {
                    *b.last_mut().expect("b starts non-empty") += a[j];
                    j += 1;
                }
            }
        }
        Runs::new(height, width, b)
    }

    /// The mask of an `[x, y, width, height]` box, rasterized as the polygon of its corners
    /// (pycocotools' `frBbox`).
    pub fn from_bbox(bb: [f64; 4], height: usize, width: usize) -> Result<Self> {
        let (xs, ys) = (bb[0], bb[1]);
        let (xe, ye) = (xs + bb[2], ys + bb[3]);
        Runs::from_polygon(&[xs, ys, xs, ye, xe, ye, xe, ys], height, width)
    }

    /// The union of masks of one size (pycocotools' `merge`).
    pub fn union(masks: &[Runs]) -> Result<Self> {
        let Some(first) = masks.first() else {
            bail!("the union of no masks has no size");
        };
        let mut acc = first.clone();
        for b in &masks[1..] {
            if (b.height, b.width) != (acc.height, acc.width) {
                bail!(
                    "cannot merge a {}x{} mask with a {}x{} one",
                    b.height,
                    b.width,
                    acc.height,
                    acc.width
                );
            }
            let mut out = Vec::new();
            let (mut ca, mut cb) = (acc.counts[0], b.counts[0]);
            let (mut ia, mut ib) = (1, 1);
            let (mut va, mut vb, mut v) = (false, false, false);
            let (mut cc, mut more) = (0u32, true);
            while more {
                let c = ca.min(cb);
                cc += c;
                ca -= c;
                if ca == 0 && ia < acc.counts.len() {
                    ca = acc.counts[ia];
                    ia += 1;
                    va = !va;
                }
                cb -= c;
                if cb == 0 && ib < b.counts.len() {
                    cb = b.counts[ib];
                    ib += 1;
                    vb = !vb;
                }
                more = ca as u64 + cb as u64 > 0;
                let vp = v;
                v = va || vb;
                if v != vp || !more {
                    out.push(cc);
                    cc = 0;
                }
            }
            acc = Runs::new(acc.height, acc.width, out)?;
        }
        Ok(acc)
    }

    /// IoU of this (detected) mask with `gt`, as pycocotools' `iou`: for a crowd `gt` the
    /// union is this mask's area alone; masks of different sizes give -1 where their boxes
    /// overlap, as in pycocotools.
    pub fn iou(&self, gt: &Runs, crowd: bool) -> f64 {
        // pycocotools only walks the runs where the bounding boxes overlap.
        let o = box_iou(&self.to_bbox(), &gt.to_bbox(), crowd);
        if o.is_nan() || o <= 0.0 {
            return o;
        }
        if (self.height, self.width) != (gt.height, gt.width) {
            return -1.0;
        }
        let (mut ca, mut cb) = (self.counts[0], gt.counts[0]);
        let (mut ia, mut ib) = (1, 1);
        let (mut va, mut vb) = (false, false);
        let (mut inter, mut union) = (0u64, 0u64);
        loop {
            let c = ca.min(cb);
            if va || vb {
                union += c as u64;
                if va && vb {
                    inter += c as u64;
                }
            }
            ca -= c;
            if ca == 0 && ia < self.counts.len() {
                ca = self.counts[ia];
                ia += 1;
                va = !va;
            }
            cb -= c;
            if cb == 0 && ib < gt.counts.len() {
                cb = gt.counts[ib];
                ib += 1;
                vb = !vb;
            }
            if ca as u64 + cb as u64 == 0 {
                break;
            }
        }
        if inter == 0 {
            union = 1;
        } else if crowd {
            union = self.area();
        }
        inter as f64 / union as f64
    }
}

fn check_size(height: usize, width: usize) -> Result<()> {
    if height == 0 || width == 0 || height as u64 * width as u64 > u32::MAX as u64 {
        bail!("a mask of {height}x{width} pixels is not supported");
    }
    Ok(())
}

/// IoU of `[x, y, w, h]` boxes as pycocotools' `bbIou` computes it: for a crowd `gt` the union
/// is the detection's area alone.
pub fn box_iou(dt: &[f64; 4], gt: &[f64; 4], crowd: bool) -> f64 {
    let ga = gt[2] * gt[3];
    let da = dt[2] * dt[3];
    let w = (dt[2] + dt[0]).min(gt[2] + gt[0]) - dt[0].max(gt[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (dt[3] + dt[1]).min(gt[3] + gt[1]) - dt[1].max(gt[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let u = if crowd { da } else { da + ga - i };
    i / u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_round_trip_with_negative_deltas() {
        // Long runs, then short ones: deltas against the count two back go negative.
        let r = Runs::new(10, 50, vec![3, 400, 2, 90, 5]).unwrap();
        let s = r.compress();
        assert_eq!(Runs::from_rle(&s).unwrap(), r);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Runs::new(2, 2, vec![1, 2]).is_err());
        assert!(Runs::from_compressed("0", 2, 2).is_err(), "sums to 0, not 4");
        assert!(Runs::from_compressed("4\x7f", 2, 2).is_err(), "bad character");
        assert!(Runs::from_compressed("P", 2, 2).is_err(), "ends mid-count");
        assert!(Runs::from_polygon(&[0.0, 0.0, f64::NAN, 1.0, 2.0, 2.0], 4, 4).is_err());
        assert!(Runs::from_polygon(&[0.0, 0.0, 1.0, 1.0, 2.0, 0.0], 0, 4).is_err());
    }

    #[test]
    fn decode_is_row_major() {
        // 2x3, column-major runs: 1 zero, 2 ones, 3 zeros -> pixels (y1,x0), (y0,x1).
        let r = Runs::new(2, 3, vec![1, 2, 3]).unwrap();
        assert_eq!(r.decode(), vec![0, 1, 0, 1, 0, 0]);
        assert_eq!(Runs::from_mask(&r.decode(), 2, 3), r);
        assert_eq!(r.area(), 2);
        assert_eq!(r.to_bbox(), [0.0, 0.0, 2.0, 2.0]);
    }

    #[test]
    fn crowd_iou_divides_by_the_detection() {
        let a = [0.0, 0.0, 10.0, 10.0];
        let crowd = [5.0, 0.0, 100.0, 100.0];
        assert_eq!(box_iou(&a, &crowd, true), 0.5);
        assert_eq!(box_iou(&a, &crowd, false), 50.0 / (100.0 + 10000.0 - 50.0));
    }
}
