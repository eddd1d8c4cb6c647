//! Detection kernels: anchors, box decoding and clipping, top-k, gathers, batched NMS,
//! multi-level RoIAlign and mask pasting (`vitdet_ir::ops::detection`), and the backward ops of
//! the gathers and of RoIAlign.
//!
//! These are hand-written loops on the host. Inputs on the CPU are read in place (after a
//! conversion to f32/f64 where needed); inputs on another device are **copied to the CPU,
//! computed there and the result copied back** to the input's device (simple and exact; these
//! ops are a small part of a detector's time). The exceptions: box decoding and clipping run as
//! the same arithmetic in device tensor ops there (`on_device`); `index_select`,
//! `gather_rows` and their backward ops check their indices on the host (unless the compiler
//! proved them in range and they live on a GPU) and then gather (scatter-add) with candle's
//! device-generic `index_select` (`index_add`). With the `cuda` feature, `top_k`,
//! `nms`, `roi_align` and `roi_align_grad` on CUDA tensors the runtime's kernels take
//! ([`crate::cuda::detection`]: f32/f16/bf16, `k <= 4096`, at most 393,216 NMS boxes, at most
//! 8 RoIAlign levels) run on the device instead: top-k and NMS with identical results,
//! RoIAlign accumulating in f32 (relative differences near 1e-7).
//!
//! Arithmetic: box math, RoIAlign and mask pasting are computed in f64 from the stored values
//! and rounded to the output dtype once (detectron2 computes them in the input dtype, f32;
//! the difference is f32 rounding). Anchors are computed exactly as detectron2 does, in f32.
//!
//! Run-time data errors (an out-of-range index) are reported as `KernelError::Candle` with a
//! message naming the index, as candle's own gathers report them; `Unsupported` is kept for
//! unsupported dtypes and malformed shapes.

use std::cmp::Ordering;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, WithDType};
use rayon::prelude::*;
use vitdet_ir::ops::{
    Anchors, BoxDecode, ClipBoxes, GatherRows, GatherRowsGrad, IndexSelect, IndexSelectGrad, Nms, PasteMasks, RoiAlign,
    RoiAlignGrad, TopK,
};

mod on_device;

use super::cpu::Real;
use super::{expect_float, KernelError, KernelResult};

// ------------------------------------------------------------------------------- helpers

fn unsupported<T>(msg: String) -> KernelResult<T> {
    Err(KernelError::Unsupported(msg))
}

fn data_error(msg: String) -> KernelError {
    KernelError::Candle(candle_core::Error::Msg(msg))
}

/// All elements of `t` (any device, any dtype), row-major, as f64.
fn host_f64(t: &Tensor) -> KernelResult<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

/// All elements of `t` as `T` (f32 or f64), row-major, on the host.
fn host_as<T: WithDType>(t: &Tensor) -> KernelResult<Vec<T>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(T::DTYPE)?
        .flatten_all()?
        .to_vec1::<T>()?)
}

/// All elements of an integer tensor as i64.
fn host_i64(t: &Tensor, what: &str) -> KernelResult<Vec<i64>> {
    if t.dtype().is_float() {
        return unsupported(format!("{what} must be integer, found {}", crate::dtype::describe(t)));
    }
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?)
}

/// A tensor of `dtype` on `device` from f64 host data.
fn from_f64(data: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> KernelResult<Tensor> {
    let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?;
    Ok(if device.is_cpu() { t } else { t.to_device(device)? })
}

/// A tensor on `device` from host data of its own dtype.
fn from_host<T: WithDType>(data: Vec<T>, shape: &[usize], device: &Device) -> KernelResult<Tensor> {
    let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
    Ok(if device.is_cpu() { t } else { t.to_device(device)? })
}

/// The float type host loops read a tensor's values in: f64 for f64, f32 otherwise.
fn compute_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

// ------------------------------------------------------------------------------- anchors

/// detectron2's `DefaultAnchorGenerator` for one level, bit-exact: cell anchors
/// `(-w/2, -h/2, w/2, h/2)` with `w = sqrt(size^2 / ratio)`, `h = ratio * w` computed in f64
/// (Python floats) and rounded to f32; shifts `offset * stride + i * stride` rounded to f32
/// (`torch.arange(..., dtype=float32)`; exact for the usual integer strides and offsets 0 or
/// 0.5); anchor = shift + cell anchor added in f32. Order: grid rows, grid columns, then cell
/// anchors (sizes outer, aspect ratios inner).
///
/// The op has no inputs, so the result is created on the CPU.
pub fn anchors(op: &Anchors) -> KernelResult<Tensor> {
    let [gh, gw] = op.grid;
    if gh == 0 || gw == 0 || op.per_cell() == 0 {
        return unsupported(format!(
            "anchors need a non-empty grid, sizes and aspect ratios: {op:?}"
        ));
    }
    let mut cells: Vec<[f32; 4]> = Vec::with_capacity(op.per_cell());
    for &size in &op.sizes {
        let area = size.powf(2.0);
        for &ratio in &op.aspect_ratios {
            let w = (area / ratio).sqrt();
            let h = ratio * w;
            cells.push([(-w / 2.0) as f32, (-h / 2.0) as f32, (w / 2.0) as f32, (h / 2.0) as f32]);
        }
    }
    let shift = |i: usize| (op.offset * op.stride + i as f64 * op.stride) as f32;
    let mut out = Vec::with_capacity(gh * gw * cells.len() * 4);
    for y in 0..gh {
        let sy = shift(y);
        for x in 0..gw {
            let sx = shift(x);
            for c in &cells {
                out.extend_from_slice(&[sx + c[0], sy + c[1], sx + c[2], sy + c[3]]);
            }
        }
    }
    from_host(out, &[gh * gw * cells.len(), 4], &Device::Cpu)
}

// ------------------------------------------------------------------------------- box coding

/// detectron2's `Box2BoxTransform.apply_deltas` in f64: `w = x1 - x0`, `cx = x0 + 0.5 w`
/// (same for y); per group of 4 deltas `dx / wx`, `dy / wy`, `min(dw / ww, scale_clamp)`,
/// `min(dh / wh, scale_clamp)`; `pcx = dx w + cx`, `pw = exp(dw) w`;
/// out = `(pcx - 0.5 pw, pcy - 0.5 ph, pcx + 0.5 pw, pcy + 0.5 ph)`. Output in the deltas'
/// dtype, on their device.
pub fn box_decode(op: &BoxDecode, deltas: &Tensor, boxes: &Tensor) -> KernelResult<Tensor> {
    expect_float("deltas", deltas)?;
    expect_float("boxes", boxes)?;
    let (n, d4) = deltas.dims2()?;
    let (nb, four) = boxes.dims2()?;
    if four != 4 || d4 % 4 != 0 || nb != n {
        return unsupported(format!(
            "box_decode expects deltas [N, 4k] and boxes [N, 4], found {} and {}",
            crate::dtype::describe(deltas),
            crate::dtype::describe(boxes)
        ));
    }
    if !deltas.device().is_cpu() {
        #[cfg(feature = "cuda")]
        if crate::cuda::detection::run::boxes_supported(&[deltas, boxes]) {
            return crate::cuda::detection::run::box_decode(op, deltas, boxes);
        }
        return on_device::box_decode(op, deltas, boxes);
    }
    let d = host_f64(deltas)?;
    let b = host_f64(boxes)?;
    let [wx, wy, ww, wh] = op.weights;
    let clamp = op.scale_clamp;
    let mut out = vec![0f64; n * d4];
    for i in 0..n {
        let (x0, y0, x1, y1) = (b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]);
        let (w, h) = (x1 - x0, y1 - y0);
        let (cx, cy) = (x0 + 0.5 * w, y0 + 0.5 * h);
        for g in 0..d4 / 4 {
            let o = i * d4 + 4 * g;
            let dx = d[o] / wx;
            let dy = d[o + 1] / wy;
            // torch.clamp(max=): NaN stays NaN (f64::min would drop it).
            let cl = |v: f64| if v > clamp { clamp } else { v };
            let dw = cl(d[o + 2] / ww);
            let dh = cl(d[o + 3] / wh);
            let pcx = dx * w + cx;
            let pcy = dy * h + cy;
            let pw = dw.exp() * w;
            let ph = dh.exp() * h;
            out[o] = pcx - 0.5 * pw;
            out[o + 1] = pcy - 0.5 * ph;
            out[o + 2] = pcx + 0.5 * pw;
            out[o + 3] = pcy + 0.5 * ph;
        }
    }
    from_f64(out, &[n, d4], deltas.dtype(), deltas.device())
}

/// detectron2's `Boxes.clip`: x to `[0, width]`, y to `[0, height]` by `torch.clamp`'s
/// comparisons (NaN and -0 stay as they are).
pub fn clip_boxes(op: &ClipBoxes, boxes: &Tensor) -> KernelResult<Tensor> {
    expect_float("boxes", boxes)?;
    if boxes.dims().last() != Some(&4) {
        return unsupported(format!(
            "clip_boxes expects [..., 4], found {}",
            crate::dtype::describe(boxes)
        ));
    }
    if !boxes.device().is_cpu() {
        #[cfg(feature = "cuda")]
        if crate::cuda::detection::run::boxes_supported(&[boxes]) {
            return crate::cuda::detection::run::clip_boxes(op, boxes);
        }
        return on_device::clip_boxes(op, boxes);
    }
    let mut b = host_f64(boxes)?;
    for (i, v) in b.iter_mut().enumerate() {
        let hi = if i % 2 == 0 { op.width } else { op.height };
        if *v < 0.0 {
            *v = 0.0;
        } else if *v > hi {
            *v = hi;
        }
    }
    from_f64(b, boxes.dims(), boxes.dtype(), boxes.device())
}

// ------------------------------------------------------------------------------- top-k

/// Order of two positions of `row` for top-k: larger value first, NaN after every number,
/// equal values (and NaNs) by lower index first.
#[inline]
fn topk_order(row: &[f64], a: u32, b: u32) -> Ordering {
    let (va, vb) = (row[a as usize], row[b as usize]);
    match (va.is_nan(), vb.is_nan()) {
        (false, false) => vb.partial_cmp(&va).unwrap_or(Ordering::Equal).then(a.cmp(&b)),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (true, true) => a.cmp(&b),
    }
}

/// The positions of the `k` largest entries of `row`, in top-k order.
fn topk_row(row: &[f64], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    if k < row.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| topk_order(row, a, b));
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| topk_order(row, a, b));
    idx
}

/// The `k` largest entries along the last axis, descending; ties by lower index first; NaN is
/// smaller than every number (`-inf` included). Outputs `values` (the input's dtype; values are
/// copied exactly) and `indices` (i64). `select_nth_unstable` then a sort of the top `k`:
/// O(n + k log k) per row, rows in parallel.
pub fn top_k(op: &TopK, x: &Tensor) -> KernelResult<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::cuda::detection::run::top_k_supported(op, x) {
        return crate::cuda::detection::run::top_k(op, x);
    }
    expect_float("input", x)?;
    let n = match x.dims().last() {
        Some(&n) => n,
        None => return unsupported("top_k needs an input of rank >= 1".into()),
    };
    let k = op.k;
    if k == 0 || k > n || n > u32::MAX as usize {
        return unsupported(format!("top_k: k = {k} out of range for {}", crate::dtype::describe(x)));
    }
    let data = host_f64(x)?;
    let rows = data.len() / n;
    let mut vals = vec![0f64; rows * k];
    let mut inds = vec![0i64; rows * k];
    data.par_chunks(n)
        .zip(vals.par_chunks_mut(k).zip(inds.par_chunks_mut(k)))
        .for_each(|(row, (v, ix))| {
            for (j, p) in topk_row(row, k).into_iter().enumerate() {
                v[j] = row[p as usize];
                ix[j] = p as i64;
            }
        });
    let mut shape = x.dims().to_vec();
    *shape.last_mut().unwrap() = k;
    Ok(vec![
        from_f64(vals, &shape, x.dtype(), x.device())?,
        from_host(inds, &shape, x.device())?,
    ])
}

// ------------------------------------------------------------------------------- gathers

/// Checks `indices` against a dimension of size `size`; the error names the first bad index.
fn check_indices(idx: &[i64], size: usize, what: &str) -> KernelResult<()> {
    if let Some((p, &i)) = idx.iter().enumerate().find(|(_, &i)| i < 0 || i as u64 >= size as u64) {
        return Err(data_error(format!(
            "{what}: index {i} (position {p}) out of range for size {size}"
        )));
    }
    Ok(())
}

/// The i64 indices on their device, after a host-side range check against `size` unless the
/// graph proved them in range (`in_range`) and they live on a GPU, where the check would copy
/// them to the host and wait for the device. The CPU always checks (no wait there), so a wrong
/// proof is an error in CPU runs, not an out-of-bounds access.
fn checked_indices(indices: &Tensor, size: usize, in_range: bool, what: &str) -> KernelResult<Tensor> {
    if !in_range || indices.device().is_cpu() {
        check_indices(&host_i64(indices, what)?, size, what)?;
    }
    Ok(if indices.dtype() == DType::I64 {
        indices.clone()
    } else {
        indices.to_dtype(DType::I64)?
    })
}

/// `n * m + indices[n]`: the rows of a `[N, M, ...]` tensor viewed as `[N * M, ...]` that
/// `indices` picks, one per leading row (on the indices' device).
fn flat_rows(indices: &Tensor, m: usize) -> KernelResult<Tensor> {
    let n = indices.elem_count();
    let starts = Tensor::arange_step(0i64, (n * m) as i64, m as i64, indices.device())?;
    Ok((indices + starts)?)
}

/// `data.index_select(axis, indices)` with candle's gather (any device) after a range check of
/// the i64 indices (`checked_indices`): an index outside `0..size` is an error naming it.
pub fn index_select(op: &IndexSelect, data: &Tensor, indices: &Tensor) -> KernelResult<Tensor> {
    if op.axis >= data.rank() {
        return unsupported(format!(
            "index_select: axis {} out of range for {}",
            op.axis,
            crate::dtype::describe(data)
        ));
    }
    if indices.rank() != 1 {
        return unsupported(format!(
            "index_select: indices must be [k], found {}",
            crate::dtype::describe(indices)
        ));
    }
    let indices = checked_indices(
        indices,
        data.dims()[op.axis],
        op.indices_in_range,
        &format!("index_select along axis {}", op.axis),
    )?;
    Ok(data.index_select(&indices, op.axis)?)
}

/// `out[n] = data[n, indices[n]]` for `data [N, M, ...]`: one `index_select` of the rows
/// `n * M + indices[n]` of `data` viewed as `[N * M, ...]` (any device), after a range check.
pub fn gather_rows(op: &GatherRows, data: &Tensor, indices: &Tensor) -> KernelResult<Tensor> {
    let dims = data.dims().to_vec();
    if dims.len() < 2 || indices.dims() != [dims[0]] {
        return unsupported(format!(
            "gather_rows expects data [N, M, ...] and indices [N], found {} and {}",
            crate::dtype::describe(data),
            crate::dtype::describe(indices)
        ));
    }
    let (n, m) = (dims[0], dims[1]);
    let indices = checked_indices(indices, m, op.indices_in_range, "gather_rows")?;
    let flat = flat_rows(&indices, m)?;
    let mut view = vec![n * m];
    view.extend_from_slice(&dims[2..]);
    let out = data.contiguous()?.reshape(view)?.index_select(&flat, 0)?;
    let mut shape = vec![n];
    shape.extend_from_slice(&dims[2..]);
    Ok(out.reshape(shape)?)
}

/// Backward of [`index_select`]: `dx = zeros(shape with size along axis).index_add(indices,
/// dy, axis)` (any device, after a range check): repeated indices accumulate, computed in f32
/// for half types.
pub fn index_select_grad(op: &IndexSelectGrad, indices: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    expect_float("gradient", dy)?;
    let dims = dy.dims();
    if op.axis >= dims.len() || indices.dims() != [dims[op.axis]] {
        return unsupported(format!(
            "index_select_grad: expects indices [k] and a gradient with k entries along axis {}, found {} and {}",
            op.axis,
            crate::dtype::describe(indices),
            crate::dtype::describe(dy)
        ));
    }
    let idx = checked_indices(
        indices,
        op.size,
        op.indices_in_range,
        &format!("index_select_grad along axis {}", op.axis),
    )?;
    let mut shape = dims.to_vec();
    shape[op.axis] = op.size;
    let acc = super::accum_dtype(dy.dtype());
    let dx = Tensor::zeros(shape, acc, dy.device())?.index_add(&idx, &dy.to_dtype(acc)?.contiguous()?, op.axis)?;
    Ok(dx.to_dtype(dy.dtype())?)
}

/// Backward of [`gather_rows`]: `dy [N, ...] -> dx [N, M, ...]`, zero except
/// `dx[n, indices[n]] = dy[n]`: one `index_add` into rows `n * M + indices[n]` of `dx` viewed as
/// `[N * M, ...]` (any device; the rows are distinct, so nothing accumulates), after a range
/// check.
pub fn gather_rows_grad(op: &GatherRowsGrad, indices: &Tensor, dy: &Tensor) -> KernelResult<Tensor> {
    expect_float("gradient", dy)?;
    let dims = dy.dims().to_vec();
    if dims.is_empty() || indices.dims() != [dims[0]] || op.rows == 0 {
        return unsupported(format!(
            "gather_rows_grad expects indices [N] and a gradient [N, ...] with rows > 0, found {} and {} (rows {})",
            crate::dtype::describe(indices),
            crate::dtype::describe(dy),
            op.rows
        ));
    }
    let (n, m) = (dims[0], op.rows);
    let indices = checked_indices(indices, m, op.indices_in_range, "gather_rows_grad")?;
    let flat = flat_rows(&indices, m)?;
    let mut view = vec![n * m];
    view.extend_from_slice(&dims[1..]);
    let dx = Tensor::zeros(view, dy.dtype(), dy.device())?.index_add(&flat, &dy.contiguous()?, 0)?;
    let mut shape = vec![n, m];
    shape.extend_from_slice(&dims[1..]);
    Ok(dx.reshape(shape)?)
}

// ------------------------------------------------------------------------------- NMS

/// One NMS group's candidates in descending score order (structure of arrays) and whether
/// each is still unsuppressed (1) or not (0).
struct GroupBoxes {
    x0: Vec<f64>,
    y0: Vec<f64>,
    x1: Vec<f64>,
    y1: Vec<f64>,
    area: Vec<f64>,
    alive: Vec<u8>,
}

impl GroupBoxes {
    fn with_capacity(m: usize) -> Self {
        GroupBoxes {
            x0: Vec::with_capacity(m),
            y0: Vec::with_capacity(m),
            x1: Vec::with_capacity(m),
            y1: Vec::with_capacity(m),
            area: Vec::with_capacity(m),
            alive: Vec::with_capacity(m),
        }
    }

    fn push(&mut self, b: &[f64]) {
        self.x0.push(b[0]);
        self.y0.push(b[1]);
        self.x1.push(b[2]);
        self.y1.push(b[3]);
        self.area.push((b[2] - b[0]) * (b[3] - b[1]));
        self.alive.push(1);
    }

    /// Suppresses the candidates after `p` whose IoU with `p` exceeds `thr` (torchvision's
    /// inner loop; testing already-suppressed ones again changes nothing, so it is branch-free
    /// and vectorizes).
    #[allow(clippy::neg_cmp_op_on_partial_ord)] // a NaN IoU suppresses nothing, as in torchvision
    fn suppress_after(&mut self, p: usize, thr: f64) {
        let (ix0, iy0, ix1, iy1, ia) = (self.x0[p], self.y0[p], self.x1[p], self.y1[p], self.area[p]);
        let n = self.x0.len();
        let alive = &mut self.alive[p + 1..n];
        let m = alive.len();
        let (x0s, y0s, x1s, y1s, areas) = (
            &self.x0[p + 1..n],
            &self.y0[p + 1..n],
            &self.x1[p + 1..n],
            &self.y1[p + 1..n],
            &self.area[p + 1..n],
        );
        let run = |base: usize, alive: &mut [u8]| {
            let m = alive.len();
            let r = base..base + m;
            let (x0s, y0s, x1s, y1s, areas) = (
                &x0s[r.clone()],
                &y0s[r.clone()],
                &x1s[r.clone()],
                &y1s[r.clone()],
                &areas[r],
            );
            for j in 0..m {
                let w = (ix1.min(x1s[j]) - ix0.max(x0s[j])).max(0.0);
                let h = (iy1.min(y1s[j]) - iy0.max(y0s[j])).max(0.0);
                let inter = w * h;
                alive[j] &= (!(inter / (ia + areas[j] - inter) > thr)) as u8;
            }
        };
        const CHUNK: usize = 16_384;
        if m > CHUNK {
            alive
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, al)| run(c * CHUNK, al));
        } else {
            run(0, alive);
        }
    }
}

/// torchvision's `batched_nms` (CPU `nms` per group) with static-shape outputs.
///
/// Candidates are the boxes with a finite score, above `score_threshold` when set, and with
/// `valid[i] != 0` when `valid` is given. They are ordered by descending score with ties by
/// lower index first (torchvision sorts with a stable descending sort). Greedily, the first
/// unsuppressed candidate is kept and every later candidate of its group whose IoU with it is
/// `> iou_threshold` is suppressed; IoU = `inter / (area_a + area_b - inter)` with
/// `area = (x1 - x0) * (y1 - y0)` (no +1), in f64. Groups never suppress each other, which is
/// what torchvision's per-class and coordinate-offset paths both compute (the offset trick
/// adds rounding torchvision does not intend; this kernel has none).
///
/// Outputs: `keep [max_output]` i64, the kept indices in descending score order (0 in unused
/// slots), and `keep_valid [max_output]` u8. The loop stops once `max_output` boxes are kept,
/// so the cost is at most `max_output` x (group size) IoUs.
pub fn nms(
    op: &Nms,
    boxes: &Tensor,
    scores: &Tensor,
    groups: Option<&Tensor>,
    valid: Option<&Tensor>,
) -> KernelResult<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if boxes.device().is_cuda() && crate::cuda::detection::run::nms_supported(op, boxes, scores, groups, valid) {
        return crate::cuda::detection::run::nms(op, boxes, scores, groups, valid);
    }
    expect_float("boxes", boxes)?;
    expect_float("scores", scores)?;
    let (n, four) = boxes.dims2()?;
    if four != 4 || scores.dims() != [n] {
        return unsupported(format!(
            "nms expects boxes [N, 4] and scores [N], found {} and {}",
            crate::dtype::describe(boxes),
            crate::dtype::describe(scores)
        ));
    }
    if op.max_output == 0 || n > u32::MAX as usize {
        return unsupported(format!("nms: max_output {} for {n} boxes", op.max_output));
    }
    let b = host_f64(boxes)?;
    let s = host_f64(scores)?;
    let g = match groups {
        Some(t) if t.dims() == [n] => Some(host_i64(t, "nms groups")?),
        Some(t) => {
            return unsupported(format!(
                "nms: groups must be [{n}], found {}",
                crate::dtype::describe(t)
            ))
        }
        None => None,
    };
    let v = match valid {
        Some(t) if t.dims() == [n] => Some(host_i64(t, "nms valid")?),
        Some(t) => return unsupported(format!("nms: valid must be [{n}], found {}", crate::dtype::describe(t))),
        None => None,
    };
    // (score, index) pairs of the candidates, sorted by descending score then index (finite
    // scores: a total order).
    let mut cands: Vec<(f64, u32)> = (0..n)
        .filter(|&i| {
            s[i].is_finite() && op.score_threshold.is_none_or(|t| s[i] > t) && v.as_ref().is_none_or(|v| v[i] != 0)
        })
        .map(|i| (s[i], i as u32))
        .collect();
    cands.par_sort_unstable_by(|a, c| c.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&c.1)));
    let order: Vec<u32> = cands.into_iter().map(|(_, i)| i).collect();

    // Dense group numbers in order of first appearance (a table lookup for small
    // non-negative group ids, a hash map otherwise).
    let mut n_groups = 0usize;
    let gid: Vec<usize> = match &g {
        None => vec![0; order.len()],
        Some(g) => {
            let max = order.iter().map(|&i| g[i as usize]).max().unwrap_or(0);
            let min = order.iter().map(|&i| g[i as usize]).min().unwrap_or(0);
            if min >= 0 && max < 1 << 20 {
                let mut table = vec![usize::MAX; max as usize + 1];
                order
                    .iter()
                    .map(|&i| {
                        let t = &mut table[g[i as usize] as usize];
                        if *t == usize::MAX {
                            *t = n_groups;
                            n_groups += 1;
                        }
                        *t
                    })
                    .collect()
            } else {
                let mut map: HashMap<i64, usize> = HashMap::new();
                order
                    .iter()
                    .map(|&i| {
                        *map.entry(g[i as usize]).or_insert_with(|| {
                            n_groups += 1;
                            n_groups - 1
                        })
                    })
                    .collect()
            }
        }
    };
    let n_groups = if g.is_none() {
        usize::from(!order.is_empty())
    } else {
        n_groups
    };
    let mut sizes = vec![0usize; n_groups];
    for &l in &gid {
        sizes[l] += 1;
    }
    // Each group's candidates in the global order, as contiguous coordinate arrays (the inner
    // loop then runs sequentially); `place[k]` = (group, position) of order[k].
    let mut lists: Vec<GroupBoxes> = sizes.iter().map(|&m| GroupBoxes::with_capacity(m)).collect();
    let mut place: Vec<(usize, usize)> = Vec::with_capacity(order.len());
    for (&i, &l) in order.iter().zip(&gid) {
        let i = i as usize;
        place.push((l, lists[l].x0.len()));
        lists[l].push(&b[4 * i..4 * i + 4]);
    }
    let mut keep = Vec::with_capacity(op.max_output);
    for (k, &i) in order.iter().enumerate() {
        if keep.len() == op.max_output {
            break;
        }
        let (l, p) = place[k];
        let gb = &mut lists[l];
        if gb.alive[p] == 0 {
            continue;
        }
        keep.push(i as i64);
        gb.suppress_after(p, op.iou_threshold);
    }
    let mut flags = vec![1u8; keep.len()];
    keep.resize(op.max_output, 0);
    flags.resize(op.max_output, 0);
    let dev = boxes.device();
    Ok(vec![
        from_host(keep, &[op.max_output], dev)?,
        from_host(flags, &[op.max_output], dev)?,
    ])
}

// ------------------------------------------------------------------------------- RoIAlign

/// The pyramid level (0-based, relative to the first feature map) of each box: detectron2's
/// `assign_boxes_to_levels`, `floor(canonical_level + log2(sqrt(area) / canonical_box_size +
/// 1e-8))` clamped to the available levels, in f64. A box whose level is not a number
/// (negative area) goes to the first level.
pub fn assign_levels(op: &RoiAlign, boxes: &[f64], n_levels: usize) -> Vec<usize> {
    let min = op.min_level as f64;
    let max = (op.min_level + n_levels - 1) as f64;
    boxes
        .chunks(4)
        .map(|b| {
            let size = ((b[2] - b[0]) * (b[3] - b[1])).sqrt();
            let l = (op.canonical_level as f64 + (size / op.canonical_box_size + 1e-8).log2()).floor();
            if l.is_nan() {
                0
            } else {
                (l.clamp(min, max) - min) as usize
            }
        })
        .collect()
}

/// One bilinear sample: four (offset in the plane, weight) taps, torchvision's
/// `bilinear_interpolate` (zero weights outside `[-1, H] x [-1, W]`).
type Sample = [(usize, f64); 4];

/// torchvision's per-axis sample position -> (low, high, l, h) with its clamping; `None` when
/// the coordinate is outside `[-1, size]`.
fn axis_taps(mut c: f64, size: usize) -> Option<(usize, usize, f64, f64)> {
    if c < -1.0 || c > size as f64 {
        return None;
    }
    if c <= 0.0 {
        c = 0.0;
    }
    let mut low = c as usize;
    let high;
    if low >= size - 1 {
        low = size - 1;
        high = size - 1;
        c = low as f64;
    } else {
        high = low + 1;
    }
    let l = c - low as f64;
    Some((low, high, l, 1.0 - l))
}

/// The bilinear samples of one box on an `h x w` level, as torchvision's `roi_align`
/// computes them (f64 arithmetic in its order of operations): per bin (row-major), its samples
/// (row-major over iy, ix). Returns the samples, the samples per bin and the divisor of the
/// bin average (`max(samples per bin, 1)`). Shared by the forward and its adjoint.
fn roi_align_samples(op: &RoiAlign, h: usize, w: usize, scale: f64, bx: &[f64]) -> (Vec<Sample>, usize, f64) {
    let [oh, ow] = op.output_size;
    let offset = if op.aligned { 0.5 } else { 0.0 };
    let x0 = bx[0] * scale - offset;
    let y0 = bx[1] * scale - offset;
    let x1 = bx[2] * scale - offset;
    let y1 = bx[3] * scale - offset;
    let mut rw = x1 - x0;
    let mut rh = y1 - y0;
    if !op.aligned {
        rw = rw.max(1.0);
        rh = rh.max(1.0);
    }
    let bin_h = rh / oh as f64;
    let bin_w = rw / ow as f64;
    let (gh, gw) = if op.sampling_ratio > 0 {
        (op.sampling_ratio, op.sampling_ratio)
    } else {
        let g = |v: f64| if v.is_finite() && v > 0.0 { v.ceil() as usize } else { 0 };
        (g(rh / oh as f64), g(rw / ow as f64))
    };
    let count = (gh * gw).max(1) as f64;
    // Per bin, its samples (row-major over iy, ix), as torchvision's pre-calculation.
    let mut samples: Vec<Sample> = Vec::with_capacity(oh * ow * gh * gw);
    for ph in 0..oh {
        for pw in 0..ow {
            for iy in 0..gh {
                let y = y0 + ph as f64 * bin_h + (iy as f64 + 0.5) * bin_h / gh as f64;
                for ix in 0..gw {
                    let x = x0 + pw as f64 * bin_w + (ix as f64 + 0.5) * bin_w / gw as f64;
                    let s = match (axis_taps(y, h), axis_taps(x, w)) {
                        (Some((yl, yh, ly, hy)), Some((xl, xh, lx, hx))) => [
                            (yl * w + xl, hy * hx),
                            (yl * w + xh, hy * lx),
                            (yh * w + xl, ly * hx),
                            (yh * w + xh, ly * lx),
                        ],
                        _ => [(0, 0.0); 4],
                    };
                    samples.push(s);
                }
            }
        }
    }
    (samples, gh * gw, count)
}

/// RoIAlign of one box on one level `[C, H, W]` into `out [C, oh, ow]`, as torchvision's CPU
/// `roi_align`.
#[allow(clippy::too_many_arguments)]
fn roi_align_box<T: Real>(
    op: &RoiAlign,
    feat: &[T],
    c: usize,
    h: usize,
    w: usize,
    scale: f64,
    bx: &[f64],
    out: &mut [T],
) {
    let [oh, ow] = op.output_size;
    let (samples, per_bin, count) = roi_align_samples(op, h, w, scale, bx);
    for ch in 0..c {
        let plane = &feat[ch * h * w..(ch + 1) * h * w];
        let o = &mut out[ch * oh * ow..(ch + 1) * oh * ow];
        for (bin, ov) in o.iter_mut().enumerate() {
            let mut acc = 0.0f64;
            for s in &samples[bin * per_bin..(bin + 1) * per_bin] {
                acc += s[0].1 * plane[s[0].0].to_f64()
                    + s[1].1 * plane[s[1].0].to_f64()
                    + s[2].1 * plane[s[2].0].to_f64()
                    + s[3].1 * plane[s[3].0].to_f64();
            }
            *ov = T::from_f64(acc / count);
        }
    }
}

/// detectron2's `ROIPooler` (`ROIAlign`/`ROIAlignV2`) over several levels: each box goes to
/// the level of [`assign_levels`] and is pooled there by torchvision's `roi_align` (CPU
/// kernel semantics: sample positions `start + p * bin + (i + 0.5) * bin / grid`, adaptive grid
/// `ceil(roi side / bins)` when `sampling_ratio == 0`, samples outside `[-1, H] x [-1, W]`
/// count as 0 but still count in the average, coordinates clamped into the map, roi sides
/// forced `>= 1` when not `aligned`). Features are read as f32 (f64 for f64 inputs), samples
/// accumulated in f64; boxes in parallel.
pub fn roi_align(op: &RoiAlign, inputs: &[Tensor]) -> KernelResult<Tensor> {
    #[cfg(feature = "cuda")]
    if inputs.first().is_some_and(|t| t.device().is_cuda())
        && crate::cuda::detection::run::roi_align_supported(op, inputs)
    {
        return crate::cuda::detection::run::roi_align(op, inputs);
    }
    let (feats, boxes) = inputs.split_at(inputs.len() - 1);
    let boxes = &boxes[0];
    if feats.is_empty() || feats.len() != op.scales.len() {
        return unsupported(format!(
            "roi_align: {} feature maps for {} scales",
            feats.len(),
            op.scales.len()
        ));
    }
    if op.output_size.contains(&0) {
        return unsupported(format!("roi_align: output size {:?}", op.output_size));
    }
    let dtype = feats[0].dtype();
    let c = feats[0].dims().get(1).copied().unwrap_or(0);
    let mut dims = Vec::new();
    for f in feats {
        expect_float("features", f)?;
        let (b, cc, h, w) = f.dims4()?;
        if b != 1 || cc != c || f.dtype() != dtype || h == 0 || w == 0 {
            return unsupported(format!(
                "roi_align: feature maps must be [1, C, H, W] with one C and dtype, found {}",
                crate::dtype::describe(f)
            ));
        }
        dims.push((h, w));
    }
    let (r, four) = boxes.dims2()?;
    if four != 4 {
        return unsupported(format!(
            "roi_align: boxes must be [R, 4], found {}",
            crate::dtype::describe(boxes)
        ));
    }
    let bx = host_f64(boxes)?;
    let levels = assign_levels(op, &bx, feats.len());
    let [oh, ow] = op.output_size;
    let shape = [r, c, oh, ow];
    fn run<T: Real + WithDType>(
        op: &RoiAlign,
        feats: &[Tensor],
        dims: &[(usize, usize)],
        bx: &[f64],
        levels: &[usize],
        c: usize,
    ) -> KernelResult<Vec<T>> {
        let data: Vec<Vec<T>> = feats.iter().map(host_as::<T>).collect::<KernelResult<_>>()?;
        let per_box = c * op.output_size[0] * op.output_size[1];
        let mut out = vec![T::ZERO; levels.len() * per_box];
        if per_box > 0 {
            out.par_chunks_mut(per_box).enumerate().for_each(|(i, o)| {
                let l = levels[i];
                let (h, w) = dims[l];
                roi_align_box(op, &data[l], c, h, w, op.scales[l], &bx[4 * i..4 * i + 4], o);
            });
        }
        Ok(out)
    }
    let device = feats[0].device();
    let t = if compute_dtype(&feats[0]) == DType::F64 {
        from_host(run::<f64>(op, feats, &dims, &bx, &levels, c)?, &shape, device)?
    } else {
        from_host(run::<f32>(op, feats, &dims, &bx, &levels, c)?, &shape, device)?
    };
    Ok(if t.dtype() == dtype { t } else { t.to_dtype(dtype)? })
}

/// Backward of [`roi_align`] with respect to the features: `boxes [R, 4]`, `dy [R, C, oh, ow]`
/// -> one gradient `[1, C, H_l, W_l]` per level of `op.feature_shapes`. Each box goes to the
/// level [`assign_levels`] gives (as in the forward) and each bin's gradient, divided by the
/// bin's sample count, is added to the four bilinear taps of each of its samples with the
/// forward's weights (`roi_align_samples`: same positions, clamping and out-of-range rule),
/// which is torchvision's `roi_align_backward`. Boxes get no gradient.
///
/// Host loop like the forward: `dy` is read as f32 (f64 for f64), per-sample products are
/// formed in f64 and added into a buffer of that type. Parallel over channels (each channel's
/// planes are written by one task), boxes in order within a channel, so the result does not
/// depend on the thread count.
pub fn roi_align_grad(op: &RoiAlignGrad, boxes: &Tensor, dy: &Tensor) -> KernelResult<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda() && crate::cuda::detection::run::roi_align_grad_supported(op, boxes, dy) {
        return crate::cuda::detection::run::roi_align_grad(op, boxes, dy);
    }
    expect_float("gradient", dy)?;
    let roi = &op.roi;
    let shapes = &op.feature_shapes;
    if shapes.is_empty() || shapes.len() != roi.scales.len() {
        return unsupported(format!(
            "roi_align_grad: {} feature shapes for {} scales",
            shapes.len(),
            roi.scales.len()
        ));
    }
    let c = shapes[0][1];
    if let Some(f) = shapes.iter().find(|f| f[0] != 1 || f[1] != c || f[2] == 0 || f[3] == 0) {
        return unsupported(format!(
            "roi_align_grad: feature shapes must be non-empty [1, C, H, W] with one C, found {f:?}"
        ));
    }
    let [oh, ow] = roi.output_size;
    let (r, four) = boxes.dims2()?;
    if four != 4 || dy.dims() != [r, c, oh, ow] {
        return unsupported(format!(
            "roi_align_grad: expects boxes [R, 4] and a gradient [R, {c}, {oh}, {ow}], found {} and {}",
            crate::dtype::describe(boxes),
            crate::dtype::describe(dy)
        ));
    }
    let bx = host_f64(boxes)?;
    let levels = assign_levels(roi, &bx, shapes.len());
    fn run<T: Real + WithDType>(
        op: &RoiAlignGrad,
        dy: &Tensor,
        bx: &[f64],
        levels: &[usize],
    ) -> KernelResult<Vec<Vec<T>>> {
        let roi = &op.roi;
        let g = host_as::<T>(dy)?;
        let c = op.feature_shapes[0][1];
        let bins = roi.output_size[0] * roi.output_size[1];
        let mut grads = Vec::with_capacity(op.feature_shapes.len());
        for (l, f) in op.feature_shapes.iter().enumerate() {
            let (h, w) = (f[2], f[3]);
            let boxes: Vec<usize> = (0..levels.len()).filter(|&i| levels[i] == l).collect();
            let samples: Vec<(Vec<Sample>, usize, f64)> = boxes
                .par_iter()
                .map(|&i| roi_align_samples(roi, h, w, roi.scales[l], &bx[4 * i..4 * i + 4]))
                .collect();
            let mut grad = vec![T::ZERO; c * h * w];
            if !boxes.is_empty() {
                grad.par_chunks_mut(h * w).enumerate().for_each(|(ch, plane)| {
                    for (&i, (smp, per_bin, count)) in boxes.iter().zip(&samples) {
                        let gy = &g[(i * c + ch) * bins..][..bins];
                        for (bin, &gv) in gy.iter().enumerate() {
                            let gv = Real::to_f64(gv) / *count;
                            for s in &smp[bin * per_bin..(bin + 1) * per_bin] {
                                for &(o, wt) in s {
                                    plane[o] += <T as Real>::from_f64(wt * gv);
                                }
                            }
                        }
                    }
                });
            }
            grads.push(grad);
        }
        Ok(grads)
    }
    let device = dy.device();
    let dtype = dy.dtype();
    let outs: Vec<Tensor> = if compute_dtype(dy) == DType::F64 {
        run::<f64>(op, dy, &bx, &levels)?
            .into_iter()
            .zip(shapes)
            .map(|(g, f)| from_host(g, f, device))
            .collect::<KernelResult<_>>()?
    } else {
        run::<f32>(op, dy, &bx, &levels)?
            .into_iter()
            .zip(shapes)
            .map(|(g, f)| from_host(g, f, device))
            .collect::<KernelResult<_>>()?
    };
    outs.into_iter()
        .map(|t| Ok(if t.dtype() == dtype { t } else { t.to_dtype(dtype)? }))
        .collect()
}

// ------------------------------------------------------------------------------- mask paste

/// detectron2's `paste_masks_in_image` (`_do_paste_mask`): for box `(x0, y0, x1, y1)`, the
/// image pixel `(x, y)` samples the mask at the normalized coordinates
/// `gx = (x + 0.5 - x0) / (x1 - x0) * 2 - 1` (same for y), i.e. `F.grid_sample(mask, grid,
/// mode="bilinear", padding_mode="zeros", align_corners=False)`, and the result is
/// thresholded with `>= threshold` (detectron2's comparison). A negative threshold gives
/// detectron2's debugging output `(value * 255) as u8` instead. f64 arithmetic.
///
/// The whole canvas is computed (detectron2's GPU path). detectron2's CPU path only writes the
/// box grown by one pixel; the two differ only where a pixel centre outside that region still
/// samples the mask's border, which with masks in `[0, 1]` stays below a threshold of 0.5.
pub fn paste_masks(op: &PasteMasks, masks: &Tensor, boxes: &Tensor) -> KernelResult<Tensor> {
    expect_float("masks", masks)?;
    expect_float("boxes", boxes)?;
    let (r, mh, mw) = masks.dims3()?;
    if boxes.dims() != [r, 4] {
        return unsupported(format!(
            "paste_masks expects masks [R, M, M] and boxes [R, 4], found {} and {}",
            crate::dtype::describe(masks),
            crate::dtype::describe(boxes)
        ));
    }
    let (ih, iw) = (op.height, op.width);
    let m = host_f64(masks)?;
    let bx = host_f64(boxes)?;
    let thr = op.threshold;
    // A pixel that samples no mask cell has the value 0.
    let zero = if thr >= 0.0 { (0.0 >= thr) as u8 } else { 0 };
    let mut out = vec![zero; r * ih * iw];
    if ih * iw > 0 && mh * mw > 0 {
        out.par_chunks_mut(ih * iw).enumerate().for_each(|(i, canvas)| {
            let (x0, y0, x1, y1) = (bx[4 * i], bx[4 * i + 1], bx[4 * i + 2], bx[4 * i + 3]);
            let mask = &m[i * mh * mw..(i + 1) * mh * mw];
            // grid_sample's unnormalization (align_corners=False): ((g + 1) * size - 1) / 2.
            let src = |p: usize, lo: f64, hi: f64, size: usize| {
                let g = (p as f64 + 0.5 - lo) / (hi - lo) * 2.0 - 1.0;
                ((g + 1.0) * size as f64 - 1.0) / 2.0
            };
            let ys: Vec<f64> = (0..ih).map(|y| src(y, y0, y1, mh)).collect();
            let xs: Vec<f64> = (0..iw).map(|x| src(x, x0, x1, mw)).collect();
            let at = |yy: i64, xx: i64| -> f64 {
                if yy >= 0 && xx >= 0 && (yy as usize) < mh && (xx as usize) < mw {
                    mask[yy as usize * mw + xx as usize]
                } else {
                    0.0
                }
            };
            for (y, &iy) in ys.iter().enumerate() {
                // Rows whose taps are all outside the mask are zero (NaN rows too: no taps).
                if !(iy > -1.0 && iy < mh as f64) {
                    continue;
                }
                let row = &mut canvas[y * iw..(y + 1) * iw];
                let iy0 = iy.floor();
                for (x, &ix) in xs.iter().enumerate() {
                    if !(ix > -1.0 && ix < mw as f64) {
                        continue;
                    }
                    let ix0 = ix.floor();
                    let (ix1, iy1) = (ix0 + 1.0, iy0 + 1.0);
                    let nw = (ix1 - ix) * (iy1 - iy);
                    let ne = (ix - ix0) * (iy1 - iy);
                    let sw = (ix1 - ix) * (iy - iy0);
                    let se = (ix - ix0) * (iy - iy0);
                    let (a, b) = (ix0 as i64, iy0 as i64);
                    let v = at(b, a) * nw + at(b, a + 1) * ne + at(b + 1, a) * sw + at(b + 1, a + 1) * se;
                    row[x] = if thr >= 0.0 {
                        (v >= thr) as u8
                    } else {
                        (v * 255.0).clamp(0.0, 255.0) as u8
                    };
                }
            }
        });
    }
    from_host(out, &[r, ih, iw], masks.device())
}
