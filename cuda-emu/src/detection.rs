//! The detection kernels (top-k, NMS, multi-level RoIAlign and its backward, box decoding and
//! clipping), launched as the runtime's `cuda::detection::run` does, on f32 host buffers (the
//! box kernels on f32, f16 or bf16 ones).

use candle_core::{DType, Device, Tensor};
use std::ffi::c_void;

use vitdet_ir::ops::{BoxDecode, ClipBoxes, Nms, RoiAlign, RoiAlignGrad, TopK};
use vitdet_runtime::cuda::detection::{
    BoxGeom, NmsGeom, RoiGeom, TopKGeom, NMS_MASK_BUDGET, TOPK_BINS, TOPK_STATE_WORDS,
};
use vitdet_runtime::cuda::Launch;

use crate::{host, tensor, Elems, Result};

mod ffi {
    use super::{c_void, BoxGeom, Launch, NmsGeom, RoiGeom, TopKGeom};
    extern "C" {
        pub fn emu_top_k_f32(l: Launch, smem: u32, x: *const f32, values: *mut f32, indices: *mut i64, g: TopKGeom);
        pub fn emu_top_k_hist_f32(
            l: Launch,
            smem: u32,
            x: *const f32,
            state: *const u32,
            hist: *mut u32,
            g: TopKGeom,
            pass: i32,
        );
        pub fn emu_top_k_pick(l: Launch, smem: u32, state: *mut u32, hist: *mut u32, g: TopKGeom, pass: i32);
        pub fn emu_top_k_compact_f32(l: Launch, smem: u32, x: *const f32, state: *mut u32, cand: *mut u32, g: TopKGeom);
        pub fn emu_top_k_sort_f32(
            l: Launch,
            smem: u32,
            x: *const f32,
            cand: *const u32,
            values: *mut f32,
            indices: *mut i64,
            g: TopKGeom,
        );
        pub fn emu_nms_candidates_f32(
            l: Launch,
            scores: *const f32,
            valid: *const u8,
            keys: *mut u64,
            state: *mut u32,
            g: NmsGeom,
        );
        pub fn emu_nms_sort_f32(
            l: Launch,
            boxes: *const f32,
            groups: *const i64,
            keys: *const u64,
            state: *const u32,
            sorted_boxes: *mut f32,
            sorted_groups: *mut i64,
            order: *mut u32,
            g: NmsGeom,
        );
        pub fn emu_nms_mask(
            l: Launch,
            sorted_boxes: *const f32,
            sorted_groups: *const i64,
            state: *const u32,
            mask: *mut u64,
            g: NmsGeom,
            row0: i32,
        );
        pub fn emu_nms_scan(
            l: Launch,
            smem: u32,
            order: *const u32,
            state: *mut u32,
            mask: *const u64,
            removed: *mut u64,
            keep: *mut i64,
            keep_valid: *mut u8,
            g: NmsGeom,
            row0: i32,
        );
        pub fn emu_roi_levels_f32(l: Launch, boxes: *const f32, levels: *mut i32, g: RoiGeom);
        pub fn emu_roi_align_fwd_f32(l: Launch, boxes: *const f32, levels: *const i32, out: *mut f32, g: RoiGeom);
        pub fn emu_roi_align_bwd_f32(l: Launch, boxes: *const f32, levels: *const i32, dy: *const f32, g: RoiGeom);
        // The box kernels' element pointers are untyped: one declaration per storage type.
        pub fn emu_box_decode_f32(l: Launch, d: *const c_void, b: *const c_void, o: *mut c_void, g: BoxGeom);
        pub fn emu_box_decode_f16(l: Launch, d: *const c_void, b: *const c_void, o: *mut c_void, g: BoxGeom);
        pub fn emu_box_decode_bf16(l: Launch, d: *const c_void, b: *const c_void, o: *mut c_void, g: BoxGeom);
        pub fn emu_clip_boxes_f32(l: Launch, b: *const c_void, o: *mut c_void, g: BoxGeom);
        pub fn emu_clip_boxes_f16(l: Launch, b: *const c_void, o: *mut c_void, g: BoxGeom);
        pub fn emu_clip_boxes_bf16(l: Launch, b: *const c_void, o: *mut c_void, g: BoxGeom);
    }
}

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

/// `[values, indices]` of the `k` largest entries along the last axis (f32 input), on the
/// kernels the runtime picks for the row length.
pub fn top_k(op: &TopK, x: &Tensor) -> Result<Vec<Tensor>> {
    let n = *x.dims().last().ok_or("top_k of a scalar")?;
    top_k_with(op, x, TopKGeom::new(x.elem_count() / n.max(1), n, op.k)?)
}

/// [`top_k`] on the multi-block kernels in chunks of `chunk` elements, whatever the row length.
pub fn top_k_chunked(op: &TopK, x: &Tensor, chunk: usize) -> Result<Vec<Tensor>> {
    let n = *x.dims().last().ok_or("top_k of a scalar")?;
    top_k_with(
        op,
        x,
        TopKGeom::new(x.elem_count() / n.max(1), n, op.k)?.with_chunk(chunk)?,
    )
}

fn top_k_with(op: &TopK, x: &Tensor, g: TopKGeom) -> Result<Vec<Tensor>> {
    let data = host(x)?;
    // Unwritten outputs show: NaN values and index -1 (the runtime allocates them uninitialized).
    let mut values = vec![f32::NAN; g.out_elems()];
    let mut indices = vec![-1i64; g.out_elems()];
    let rows = g.rows as usize;
    if g.chunk == 0 {
        unsafe {
            ffi::emu_top_k_f32(
                g.launch(),
                g.shared_bytes(),
                data.as_ptr(),
                values.as_mut_ptr(),
                indices.as_mut_ptr(),
                g,
            )
        };
    } else {
        let mut state = vec![0u32; rows * TOPK_STATE_WORDS];
        let mut hist = vec![0u32; rows * TOPK_BINS];
        let mut cand = vec![0u32; rows * 2 * op.k];
        for pass in 0..g.passes() {
            unsafe {
                ffi::emu_top_k_hist_f32(
                    g.chunk_launch(),
                    g.hist_shared_bytes(),
                    data.as_ptr(),
                    state.as_ptr(),
                    hist.as_mut_ptr(),
                    g,
                    pass,
                );
                ffi::emu_top_k_pick(
                    g.pick_launch(),
                    g.pick_shared_bytes(),
                    state.as_mut_ptr(),
                    hist.as_mut_ptr(),
                    g,
                    pass,
                );
            }
        }
        assert!(hist.iter().all(|&c| c == 0), "each pick clears its histogram");
        unsafe {
            ffi::emu_top_k_compact_f32(
                g.chunk_launch(),
                g.compact_shared_bytes(),
                data.as_ptr(),
                state.as_mut_ptr(),
                cand.as_mut_ptr(),
                g,
            );
            ffi::emu_top_k_sort_f32(
                g.sort_launch(),
                g.sort_shared_bytes(),
                data.as_ptr(),
                cand.as_ptr(),
                values.as_mut_ptr(),
                indices.as_mut_ptr(),
                g,
            );
        }
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = op.k;
    Ok(vec![
        tensor(values, &shape)?,
        Tensor::from_vec(indices, shape, &Device::Cpu).map_err(err)?,
    ])
}

/// `[keep, keep_valid]` of greedy NMS (f32 boxes and scores, i64 groups, u8 valid flags).
pub fn nms(
    op: &Nms,
    boxes: &Tensor,
    scores: &Tensor,
    groups: Option<&Tensor>,
    valid: Option<&Tensor>,
) -> Result<Vec<Tensor>> {
    nms_with_mask_budget(op, boxes, scores, groups, valid, NMS_MASK_BUDGET)
}

/// [`nms`] with the IoU mask of a round bounded by `mask_budget` bytes (a small budget runs
/// several mask/scan rounds).
pub fn nms_with_mask_budget(
    op: &Nms,
    boxes: &Tensor,
    scores: &Tensor,
    groups: Option<&Tensor>,
    valid: Option<&Tensor>,
    mask_budget: usize,
) -> Result<Vec<Tensor>> {
    let n = boxes.dims()[0];
    let g = NmsGeom::new(op, n, groups.is_some(), valid.is_some(), mask_budget)?;
    let (b, s) = (host(boxes)?, host(scores)?);
    let groups = match groups {
        Some(t) => t.to_vec1::<i64>().map_err(err)?,
        None => vec![0],
    };
    let valid = match valid {
        Some(t) => t.to_vec1::<u8>().map_err(err)?,
        None => vec![0],
    };
    let mut keys = vec![0u64; n];
    let mut state = [0u32; 2];
    let mut sorted_boxes = vec![0f32; 4 * n];
    let mut sorted_groups = vec![0i64; n];
    let mut order = vec![0u32; n];
    let mut mask = vec![0u64; g.mask_words()];
    let mut removed = vec![0u64; g.words as usize];
    let mut keep = vec![0i64; op.max_output];
    let mut keep_valid = vec![0u8; op.max_output];
    unsafe {
        ffi::emu_nms_candidates_f32(
            g.per_box(),
            s.as_ptr(),
            valid.as_ptr(),
            keys.as_mut_ptr(),
            state.as_mut_ptr(),
            g,
        );
        ffi::emu_nms_sort_f32(
            g.per_box(),
            b.as_ptr(),
            groups.as_ptr(),
            keys.as_ptr(),
            state.as_ptr(),
            sorted_boxes.as_mut_ptr(),
            sorted_groups.as_mut_ptr(),
            order.as_mut_ptr(),
            g,
        );
        for row0 in g.rounds() {
            ffi::emu_nms_mask(
                g.mask(),
                sorted_boxes.as_ptr(),
                sorted_groups.as_ptr(),
                state.as_ptr(),
                mask.as_mut_ptr(),
                g,
                row0,
            );
            ffi::emu_nms_scan(
                g.scan(),
                g.scan_shared_bytes(),
                order.as_ptr(),
                state.as_mut_ptr(),
                mask.as_ptr(),
                removed.as_mut_ptr(),
                keep.as_mut_ptr(),
                keep_valid.as_mut_ptr(),
                g,
                row0,
            );
        }
    }
    Ok(vec![
        Tensor::from_vec(keep, op.max_output, &Device::Cpu).map_err(err)?,
        Tensor::from_vec(keep_valid, op.max_output, &Device::Cpu).map_err(err)?,
    ])
}

/// Each box's level (`roi_levels`).
fn roi_levels(g: &RoiGeom, boxes: &[f32]) -> Vec<i32> {
    let mut levels = vec![0i32; g.boxes as usize];
    unsafe { ffi::emu_roi_levels_f32(g.per_box(), boxes.as_ptr(), levels.as_mut_ptr(), *g) };
    levels
}

/// Multi-level RoIAlign: inputs the level maps `[1, C, H_l, W_l]` then boxes `[R, 4]` (f32).
pub fn roi_align(op: &RoiAlign, inputs: &[Tensor]) -> Result<Tensor> {
    let (boxes, feats) = inputs.split_last().ok_or("roi_align without inputs")?;
    let c = feats[0].dims()[1];
    let hw: Vec<(usize, usize)> = feats.iter().map(|f| (f.dims()[2], f.dims()[3])).collect();
    let g = RoiGeom::new(op, &hw, c, boxes.dims()[0])?;
    let b = host(boxes)?;
    let maps: Vec<Vec<f32>> = feats.iter().map(host).collect::<Result<_>>()?;
    let levels = roi_levels(&g, &b);
    let g = g.with_maps(&maps.iter().map(|m| m.as_ptr() as u64).collect::<Vec<_>>());
    let mut out = vec![0f32; g.out_elems()];
    unsafe { ffi::emu_roi_align_fwd_f32(g.per_output(), b.as_ptr(), levels.as_ptr(), out.as_mut_ptr(), g) };
    let [oh, ow] = op.output_size;
    tensor(out, &[g.boxes as usize, c, oh, ow])
}

/// Backward of [`roi_align`]: one gradient per level, `[1, C, H_l, W_l]`.
pub fn roi_align_grad(op: &RoiAlignGrad, boxes: &Tensor, dy: &Tensor) -> Result<Vec<Tensor>> {
    let c = op.feature_shapes[0][1];
    let hw: Vec<(usize, usize)> = op.feature_shapes.iter().map(|f| (f[2], f[3])).collect();
    let g = RoiGeom::new(&op.roi, &hw, c, boxes.dims()[0])?;
    let (b, d) = (host(boxes)?, host(dy)?);
    let levels = roi_levels(&g, &b);
    let mut grads: Vec<Vec<f32>> = (0..hw.len()).map(|l| vec![0f32; g.map_elems(l)]).collect();
    let g = g.with_maps(&grads.iter_mut().map(|m| m.as_mut_ptr() as u64).collect::<Vec<_>>());
    unsafe { ffi::emu_roi_align_bwd_f32(g.per_output(), b.as_ptr(), levels.as_ptr(), d.as_ptr(), g) };
    grads
        .into_iter()
        .zip(&op.feature_shapes)
        .map(|(v, f)| tensor(v, f))
        .collect()
}

/// `box_decode` of `deltas [N, 4k]` and `boxes [N, 4]` (f32, f16 or bf16, one dtype).
pub fn box_decode(op: &BoxDecode, deltas: &Tensor, boxes: &Tensor) -> Result<Tensor> {
    let (n, d4) = deltas.dims2().map_err(err)?;
    let g = BoxGeom::decode(op, n, d4 / 4)?;
    let kernel = match deltas.dtype() {
        DType::F32 => ffi::emu_box_decode_f32,
        DType::F16 => ffi::emu_box_decode_f16,
        DType::BF16 => ffi::emu_box_decode_bf16,
        t => return Err(format!("the box kernels take f32, f16 or bf16, not {t:?}")),
    };
    let (d, b) = (Elems::of(deltas)?, Elems::of(boxes)?);
    let mut out = d.unwritten_like();
    unsafe { kernel(g.launch(), d.ptr(), b.ptr(), out.mut_ptr(), g) };
    out.into_tensor(deltas.dtype(), deltas.dims())
}

/// `clip_boxes` of `boxes [..., 4]` (f32, f16 or bf16).
pub fn clip_boxes(op: &ClipBoxes, boxes: &Tensor) -> Result<Tensor> {
    let g = BoxGeom::clip(op, boxes.elem_count());
    let kernel = match boxes.dtype() {
        DType::F32 => ffi::emu_clip_boxes_f32,
        DType::F16 => ffi::emu_clip_boxes_f16,
        DType::BF16 => ffi::emu_clip_boxes_bf16,
        t => return Err(format!("the box kernels take f32, f16 or bf16, not {t:?}")),
    };
    let b = Elems::of(boxes)?;
    let mut out = b.unwritten_like();
    unsafe { kernel(g.launch(), b.ptr(), out.mut_ptr(), g) };
    out.into_tensor(boxes.dtype(), boxes.dims())
}
