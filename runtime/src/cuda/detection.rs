//! Launch geometry and parameters of the detection kernels (`kernels/detection.cu`), shared by
//! the CUDA path and the host emulator. Results are those of the CPU kernels in
//! [`crate::kernels::detection`] (see each part for what differs in rounding).
//!
//! - `top_k`: one launch, one block per row (radix select, compaction, bitonic sort in shared
//!   memory); rows over [`TOPK_MULTI_BLOCK_ROW`] the same steps over chunks of the row on many blocks
//!   (`top_k_hist` and `top_k_pick` per radix pass, `top_k_compact`, `top_k_sort`). Values and
//!   indices are exactly the CPU kernel's, ties by lower index. `k` is limited to
//!   [`TOPK_SORT_MAX`] (the shared sort buffer).
//! - `nms`: `nms_candidates` (compaction of the valid candidates into 64-bit sort keys),
//!   `nms_sort` (rank sort by score, then index), then per round of
//!   [`NmsGeom::block_rows`] sorted boxes `nms_mask` (IoU bitmask, f64 as the CPU kernel) and
//!   `nms_scan` (greedy scan on the device). The keep list is exactly the CPU kernel's; no
//!   value is read back to the host.
//! - `roi_align`: `roi_levels` (each box's level), then `roi_align_fwd`; `roi_align_grad`:
//!   `roi_levels`, then `roi_align_bwd` scattering into f32 per-level gradients.
//! - `box_decode`, `clip_boxes`: one launch each, the CPU kernel's f64 arithmetic, converted to
//!   the storage type as the CPU converts (through f32). `exp` is the GPU's (within an ulp of
//!   f64, so the rounded result is the CPU's but where the f64 value lies within that ulp of a
//!   rounding boundary); the emulator, with the host's `exp`, gives the CPU's bits.

use vitdet_ir::ops::{BoxDecode, ClipBoxes, Nms, RoiAlign};

use super::sources::Module;
use super::Launch;

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("kernels/detection.cu");

/// The detection kernel module, with every dtype's entry points: it is small (NVRTC compiles it
/// in about 1.5 s), so one module serves all dtypes.
pub fn module() -> Module {
    Module::plain("detection", SOURCE)
}

fn fits(what: &str, v: usize) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("{what} {v} does not fit the kernels' 32-bit indexing"))
}

// ------------------------------------------------------------------------------- top-k

/// Largest `k` of the top-k kernel: its selection is bitonic-sorted in shared memory
/// (8 bytes per entry, with the 2048-bin histogram and the scan row under the default 48 KiB).
pub const TOPK_SORT_MAX: usize = 4096;
/// Histogram bins of a radix pass (`TOPK_BINS` in the source).
pub const TOPK_BINS: usize = 2048;
/// Bits of a radix pass (`TOPK_RADIX_BITS` in the source).
const TOPK_RADIX_BITS: i32 = TOPK_BINS.trailing_zeros() as i32;
/// Rows longer than this get 1024 threads per block instead of 256 (one block reads the whole
/// row several times; more threads keep more loads in flight).
pub const TOPK_LONG_ROW: usize = 65_536;
/// Rows longer than this (eight chunks) run on the multi-block kernels in chunks of
/// `TOPK_CHUNK`: one block per row left all but one SM idle (the RPN's top-2000 of 196,608
/// scores took 0.36 ms on an H200, PyTorch's 0.09 ms). At 1024 px the RPN's two finest levels
/// (196,608 and 49,152 scores) take them.
pub const TOPK_MULTI_BLOCK_ROW: usize = 8 * TOPK_CHUNK;
/// Elements per block of the multi-block top-k: 256 threads with eight loads in flight each.
pub const TOPK_CHUNK: usize = 2048;
/// Threads per block of the multi-block top-k's histogram, pick and compaction kernels.
const TOPK_CHUNK_THREADS: u32 = 256;
/// 32-bit words of the multi-block top-k's per-row state (`struct TopKState` in the source).
pub const TOPK_STATE_WORDS: usize = 8;

/// The top-k parameter block (`struct TopKGeom` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopKGeom {
    pub rows: i32,
    pub n: i32,
    pub k: i32,
    /// Power of two `>= k`: entries of the shared sort buffer.
    pub sort_size: i32,
    /// Bit length of `n - 1`: the width of the tie key `n - 1 - index`.
    pub index_bits: i32,
    /// Elements per block of the multi-block kernels; 0 runs one block per row (`top_k`).
    pub chunk: i32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for TopKGeom {}

impl TopKGeom {
    /// The parameters for the top `k` of `rows` rows of `n`, or why the kernel cannot run them.
    pub fn new(rows: usize, n: usize, k: usize) -> Result<TopKGeom, String> {
        if k == 0 || k > n {
            return Err(format!("k = {k} out of range for rows of {n}"));
        }
        if k > TOPK_SORT_MAX {
            return Err(format!(
                "k = {k} exceeds the kernel's shared-memory sort of {TOPK_SORT_MAX}"
            ));
        }
        if rows == 0 || rows > i32::MAX as usize {
            return Err(format!("{rows} rows do not fit the launch grid"));
        }
        Ok(TopKGeom {
            rows: rows as i32,
            n: fits("row length", n)?,
            k: k as i32,
            sort_size: k.next_power_of_two() as i32,
            index_bits: (usize::BITS - (n - 1).leading_zeros()) as i32,
            chunk: if n > TOPK_MULTI_BLOCK_ROW { TOPK_CHUNK as i32 } else { 0 },
        })
    }

    /// The same top-k on the multi-block kernels in chunks of `chunk` elements (0: one block per
    /// row), whatever the row length.
    pub fn with_chunk(self, chunk: usize) -> Result<TopKGeom, String> {
        Ok(TopKGeom {
            chunk: fits("top-k chunk", chunk)?,
            ..self
        })
    }

    /// Chunks per row of the multi-block kernels.
    pub fn chunks(&self) -> usize {
        (self.n as usize).div_ceil((self.chunk as usize).max(1))
    }

    /// Radix passes of the multi-block kernels: three over the score key, then as many over the
    /// tie key as its bits need (each does nothing unless ties must be broken); `topk_passes` in
    /// the source.
    pub fn passes(&self) -> i32 {
        3 + (self.index_bits + TOPK_RADIX_BITS - 1) / TOPK_RADIX_BITS
    }

    /// `top_k_hist` and `top_k_compact`: one block per chunk of each row.
    pub fn chunk_launch(&self) -> Launch {
        Launch {
            grid: [self.chunks() as u32, self.rows as u32, 1],
            block: [TOPK_CHUNK_THREADS, 1, 1],
        }
    }

    /// Dynamic shared memory of `top_k_hist` (the histogram).
    pub fn hist_shared_bytes(&self) -> u32 {
        (TOPK_BINS * 4) as u32
    }

    /// `top_k_pick`: one block per row.
    pub fn pick_launch(&self) -> Launch {
        Launch::linear(self.rows as usize, TOPK_CHUNK_THREADS)
    }

    /// Dynamic shared memory of `top_k_pick` (its scan row).
    pub fn pick_shared_bytes(&self) -> u32 {
        TOPK_CHUNK_THREADS * 4
    }

    /// Dynamic shared memory of `top_k_compact` (a chunk's selection, keys and indices).
    pub fn compact_shared_bytes(&self) -> u32 {
        (2 * self.k as usize * 4) as u32
    }

    /// `top_k_sort`: one block per row.
    pub fn sort_launch(&self) -> Launch {
        Launch::linear(self.rows as usize, self.threads())
    }

    /// Dynamic shared memory of `top_k_sort` (keys and indices).
    pub fn sort_shared_bytes(&self) -> u32 {
        (2 * self.sort_size as usize * 4) as u32
    }

    /// Threads per block (a power of two, as the kernel's scan and sort need).
    pub fn threads(&self) -> u32 {
        if self.n as usize > TOPK_LONG_ROW {
            1024
        } else {
            256
        }
    }

    /// `top_k`: one block per row.
    pub fn launch(&self) -> Launch {
        Launch::linear(self.rows as usize, self.threads())
    }

    /// Dynamic shared memory of `top_k`: histogram, scan row, sort keys and indices.
    pub fn shared_bytes(&self) -> u32 {
        ((TOPK_BINS + self.threads() as usize + 2 * self.sort_size as usize) * 4) as u32
    }

    /// Elements of the `values` and `indices` outputs.
    pub fn out_elems(&self) -> usize {
        self.rows as usize * self.k as usize
    }
}

// ------------------------------------------------------------------------------- NMS

/// Threads of the `nms_candidates`, `nms_sort` and `nms_scan` blocks (`NMS_THREADS`).
pub const NMS_THREADS: u32 = 256;
/// Mask columns per word, and threads of an `nms_mask` block (`NMS_COLS`).
pub const NMS_COLS: usize = 64;
/// Largest box count: `nms_scan` holds one removed bit per box in dynamic shared memory, which
/// with its 768 bytes of static tiles (64 diagonal words, 64 kept rows) must stay within the
/// 48 KiB a launch gets without opting in.
pub const NMS_MAX_BOXES: usize = (48 * 1024 - NMS_SCAN_STATIC_BYTES) * 8;
/// `nms_scan`'s static shared memory: `diag[NMS_COLS]` (u64) and `kept_rows[NMS_COLS]` (int).
const NMS_SCAN_STATIC_BYTES: usize = NMS_COLS * (8 + 4);
/// Default bound on the IoU mask of one round (the rows of a round shrink to fit it).
pub const NMS_MASK_BUDGET: usize = 64 << 20;

/// The NMS parameter block (`struct NmsGeom` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NmsGeom {
    pub iou_threshold: f64,
    pub score_threshold: f64,
    pub n: i32,
    /// `ceil(n / 64)`: mask words per row.
    pub words: i32,
    /// Sorted boxes per (mask, scan) round: a multiple of 64.
    pub block_rows: i32,
    pub max_output: i32,
    pub has_groups: i32,
    pub has_valid: i32,
    pub has_threshold: i32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for NmsGeom {}

impl NmsGeom {
    /// The parameters for `op` on `n` boxes with a mask of at most `mask_budget` bytes per
    /// round (at least 64 rows), or why the kernels cannot run it.
    pub fn new(op: &Nms, n: usize, has_groups: bool, has_valid: bool, mask_budget: usize) -> Result<NmsGeom, String> {
        if n == 0 || n > NMS_MAX_BOXES {
            return Err(format!("{n} boxes outside the kernels' 1..={NMS_MAX_BOXES}"));
        }
        if op.max_output == 0 {
            return Err("max_output must be positive".into());
        }
        let words = n.div_ceil(NMS_COLS);
        let all_rows = words * NMS_COLS;
        let budget_rows = (mask_budget / (8 * words)) / NMS_COLS * NMS_COLS;
        let block_rows = budget_rows.clamp(NMS_COLS, all_rows);
        Ok(NmsGeom {
            iou_threshold: op.iou_threshold,
            score_threshold: op.score_threshold.unwrap_or(0.0),
            n: n as i32,
            words: words as i32,
            block_rows: block_rows as i32,
            max_output: fits("max_output", op.max_output)?,
            has_groups: has_groups as i32,
            has_valid: has_valid as i32,
            has_threshold: op.score_threshold.is_some() as i32,
        })
    }

    /// `nms_candidates` and `nms_sort`: one thread per box.
    pub fn per_box(&self) -> Launch {
        Launch::covering(self.n as usize, NMS_THREADS)
    }

    /// `nms_mask` of one round: (words, block_rows / 64) blocks of 64 threads.
    pub fn mask(&self) -> Launch {
        Launch {
            grid: [self.words as u32, (self.block_rows as usize / NMS_COLS) as u32, 1],
            block: [NMS_COLS as u32, 1, 1],
        }
    }

    /// `nms_scan` of one round: one block.
    pub fn scan(&self) -> Launch {
        Launch::linear(1, NMS_THREADS)
    }

    /// Dynamic shared memory of `nms_scan`: one removed bit per box.
    pub fn scan_shared_bytes(&self) -> u32 {
        self.words as u32 * 8
    }

    /// The first sorted row of each round.
    pub fn rounds(&self) -> impl Iterator<Item = i32> {
        (0..self.n).step_by(self.block_rows as usize)
    }

    /// Words of the mask buffer (one round's rows).
    pub fn mask_words(&self) -> usize {
        self.block_rows as usize * self.words as usize
    }
}

// ------------------------------------------------------------------------------- RoIAlign

/// Most pyramid levels the RoIAlign kernels take (`ROI_MAX_LEVELS`).
pub const ROI_MAX_LEVELS: usize = 8;
/// Threads per block of the RoIAlign kernels.
pub const ROI_THREADS: u32 = 256;

/// The RoIAlign parameter block (`struct RoiGeom` in the source). `maps` holds the device
/// addresses of the level maps (features in the forward, f32 gradients in the backward), set
/// by the caller with [`RoiGeom::with_maps`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoiGeom {
    pub scales: [f64; ROI_MAX_LEVELS],
    pub canonical_box_size: f64,
    pub maps: [u64; ROI_MAX_LEVELS],
    pub heights: [i32; ROI_MAX_LEVELS],
    pub widths: [i32; ROI_MAX_LEVELS],
    pub levels: i32,
    pub boxes: i32,
    pub channels: i32,
    pub oh: i32,
    pub ow: i32,
    pub sampling_ratio: i32,
    pub aligned: i32,
    pub canonical_level: i32,
    pub min_level: i32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for RoiGeom {}

impl RoiGeom {
    /// The parameters for `op` on `boxes` boxes and level maps of `channels` x `hw[l]`, or why
    /// the kernels cannot run them.
    pub fn new(op: &RoiAlign, hw: &[(usize, usize)], channels: usize, boxes: usize) -> Result<RoiGeom, String> {
        if hw.is_empty() || hw.len() > ROI_MAX_LEVELS || hw.len() != op.scales.len() {
            return Err(format!(
                "{} level maps for {} scales (the kernels take 1..={ROI_MAX_LEVELS})",
                hw.len(),
                op.scales.len()
            ));
        }
        let [oh, ow] = op.output_size;
        if boxes == 0 || oh == 0 || ow == 0 || channels == 0 || hw.iter().any(|&(h, w)| h == 0 || w == 0) {
            return Err(format!(
                "nothing to pool: {boxes} boxes, output {oh}x{ow}, channels {channels}, level maps {hw:?}"
            ));
        }
        fits("output elements", boxes * channels * oh * ow)?;
        let mut g = RoiGeom {
            scales: [0.0; ROI_MAX_LEVELS],
            canonical_box_size: op.canonical_box_size,
            maps: [0; ROI_MAX_LEVELS],
            heights: [0; ROI_MAX_LEVELS],
            widths: [0; ROI_MAX_LEVELS],
            levels: hw.len() as i32,
            boxes: fits("boxes", boxes)?,
            channels: fits("channels", channels)?,
            oh: oh as i32,
            ow: ow as i32,
            sampling_ratio: fits("sampling ratio", op.sampling_ratio)?,
            aligned: op.aligned as i32,
            canonical_level: fits("canonical level", op.canonical_level)?,
            min_level: fits("min level", op.min_level)?,
        };
        for (l, &(h, w)) in hw.iter().enumerate() {
            fits("level map", channels * h * w)?;
            g.scales[l] = op.scales[l];
            g.heights[l] = h as i32;
            g.widths[l] = w as i32;
        }
        Ok(g)
    }

    /// The parameters with the level maps at these device addresses (finest first).
    pub fn with_maps(mut self, addresses: &[u64]) -> RoiGeom {
        self.maps[..addresses.len()].copy_from_slice(addresses);
        self
    }

    /// `roi_levels`: one thread per box.
    pub fn per_box(&self) -> Launch {
        Launch::covering(self.boxes as usize, ROI_THREADS)
    }

    /// `roi_align_fwd` / `roi_align_bwd`: one thread per element of `[R, C, oh, ow]`.
    pub fn per_output(&self) -> Launch {
        Launch::covering(self.out_elems(), ROI_THREADS)
    }

    pub fn out_elems(&self) -> usize {
        (self.boxes * self.channels * self.oh * self.ow) as usize
    }

    /// Elements of level `l`'s map `[C, H_l, W_l]`.
    pub fn map_elems(&self, l: usize) -> usize {
        (self.channels * self.heights[l] * self.widths[l]) as usize
    }
}

/// Threads per block of the box kernels.
pub const BOX_THREADS: u32 = 256;

/// The box kernels' parameter block (`struct BoxGeom` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxGeom {
    pub wx: f64,
    pub wy: f64,
    pub ww: f64,
    pub wh: f64,
    pub scale_clamp: f64,
    pub width: f64,
    pub height: f64,
    /// `box_decode`: boxes times groups; `clip_boxes`: coordinates.
    pub items: i64,
    /// `box_decode`: groups of 4 deltas per box.
    pub groups: i32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for BoxGeom {}

impl BoxGeom {
    /// `box_decode` of `boxes` boxes with `groups` groups of 4 deltas each.
    pub fn decode(op: &BoxDecode, boxes: usize, groups: usize) -> Result<BoxGeom, String> {
        let [wx, wy, ww, wh] = op.weights;
        Ok(BoxGeom {
            wx,
            wy,
            ww,
            wh,
            scale_clamp: op.scale_clamp,
            width: 0.0,
            height: 0.0,
            items: (boxes * groups) as i64,
            groups: fits("box groups", groups.max(1))?,
        })
    }

    /// `clip_boxes` of `coords` coordinates (a multiple of 4).
    pub fn clip(op: &ClipBoxes, coords: usize) -> BoxGeom {
        BoxGeom {
            wx: 1.0,
            wy: 1.0,
            ww: 1.0,
            wh: 1.0,
            scale_clamp: 0.0,
            width: op.width,
            height: op.height,
            items: coords as i64,
            groups: 1,
        }
    }

    /// One thread per item.
    pub fn launch(&self) -> Launch {
        Launch::covering(self.items as usize, BOX_THREADS)
    }
}

/// The kernels on candle CUDA tensors, in the order the module doc gives.
#[cfg(feature = "cuda")]
pub mod run {
    use candle_core::cuda_backend::cudarc::driver::{
        DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use vitdet_ir::ops::{BoxDecode, ClipBoxes, Nms, RoiAlign, RoiAlignGrad, TopK};

    use super::{module, BoxGeom, NmsGeom, RoiGeom, TopKGeom, NMS_MASK_BUDGET};
    use crate::cuda::device::{config, cuda_device, function, launch_into_new, suffix, tensor, view, zeros};
    use crate::kernels::{KernelError, KernelResult};

    fn unsupported(m: impl std::fmt::Display) -> KernelError {
        KernelError::Unsupported(m.to_string())
    }

    fn float_suffix(t: &Tensor) -> bool {
        suffix(t.dtype()).is_ok()
    }

    /// Whether every operand is on a CUDA device (the kernels read them all there).
    fn on_cuda<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> bool {
        ts.into_iter().all(|t| t.device().is_cuda())
    }

    // ---------------------------------------------------------------- top-k

    /// Whether the kernel takes this top-k (an f32/f16/bf16 input, `k <= TOPK_SORT_MAX`).
    pub fn top_k_supported(op: &TopK, x: &Tensor) -> bool {
        top_k_geometry(op, x).is_ok()
    }

    fn top_k_geometry(op: &TopK, x: &Tensor) -> KernelResult<TopKGeom> {
        suffix(x.dtype())?;
        if !on_cuda([x]) {
            return Err(unsupported("top_k on CUDA: the input is not on a CUDA device"));
        }
        let n = *x
            .dims()
            .last()
            .ok_or_else(|| unsupported("top_k on CUDA: a scalar input"))?;
        let rows = x.elem_count().checked_div(n).unwrap_or(0);
        TopKGeom::new(rows, n, op.k).map_err(|m| unsupported(format!("top_k on CUDA: {m}")))
    }

    /// `[values, indices]` of the `k` largest entries along the last axis.
    pub fn top_k(op: &TopK, x: &Tensor) -> KernelResult<Vec<Tensor>> {
        let g = top_k_geometry(op, x)?;
        match x.dtype() {
            DType::F32 => top_k_t::<f32>(&g, x),
            DType::F16 => top_k_t::<half::f16>(&g, x),
            DType::BF16 => top_k_t::<half::bf16>(&g, x),
            d => Err(unsupported(format!("top_k on CUDA: dtype {d:?}"))),
        }
    }

    fn top_k_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(g: &TopKGeom, x: &Tensor) -> KernelResult<Vec<Tensor>> {
        let dev = cuda_device(x)?;
        let x = x.contiguous()?;
        // Every row's sort writes all k of its values and indices.
        let mut values = unsafe { dev.alloc::<T>(g.out_elems().max(1)) }?;
        let mut indices = unsafe { dev.alloc::<i64>(g.out_elems().max(1)) }?;
        let s = suffix(x.dtype())?;
        {
            let (xs, xl) = x.storage_and_layout();
            let xv = view::<T>(&xs, xl)?;
            if g.chunk == 0 {
                let f = function(&dev, &module(), &format!("top_k_{s}"))?;
                let mut l = f.builder();
                l.arg(&xv).arg(&mut values).arg(&mut indices).arg(g);
                unsafe { l.launch(config(g.launch(), g.shared_bytes())) }.map_err(candle_core::Error::wrap)?;
            } else {
                let rows = g.rows as usize;
                let mut state = zeros::<u32>(&dev, rows * super::TOPK_STATE_WORDS)?;
                let mut hist = zeros::<u32>(&dev, rows * super::TOPK_BINS)?;
                let mut cand = zeros::<u32>(&dev, rows * 2 * g.k as usize)?;
                let (fh, fp) = (
                    function(&dev, &module(), &format!("top_k_hist_{s}"))?,
                    function(&dev, &module(), "top_k_pick")?,
                );
                for pass in 0..g.passes() {
                    let mut l = fh.builder();
                    l.arg(&xv).arg(&state).arg(&mut hist).arg(g).arg(&pass);
                    unsafe { l.launch(config(g.chunk_launch(), g.hist_shared_bytes())) }
                        .map_err(candle_core::Error::wrap)?;
                    let mut l = fp.builder();
                    l.arg(&mut state).arg(&mut hist).arg(g).arg(&pass);
                    unsafe { l.launch(config(g.pick_launch(), g.pick_shared_bytes())) }
                        .map_err(candle_core::Error::wrap)?;
                }
                let f = function(&dev, &module(), &format!("top_k_compact_{s}"))?;
                let mut l = f.builder();
                l.arg(&xv).arg(&mut state).arg(&mut cand).arg(g);
                unsafe { l.launch(config(g.chunk_launch(), g.compact_shared_bytes())) }
                    .map_err(candle_core::Error::wrap)?;
                let f = function(&dev, &module(), &format!("top_k_sort_{s}"))?;
                let mut l = f.builder();
                l.arg(&xv).arg(&cand).arg(&mut values).arg(&mut indices).arg(g);
                unsafe { l.launch(config(g.sort_launch(), g.sort_shared_bytes())) }
                    .map_err(candle_core::Error::wrap)?;
            }
        }
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = g.k as usize;
        Ok(vec![tensor(values, shape.clone(), &dev), tensor(indices, shape, &dev)])
    }

    // ---------------------------------------------------------------- NMS

    /// Whether the kernels take this NMS: f32/f16/bf16 boxes and scores of one dtype, i64
    /// groups, u8 valid flags, at most `NMS_MAX_BOXES` boxes (none: the CPU kernel's zeros).
    pub fn nms_supported(
        op: &Nms,
        boxes: &Tensor,
        scores: &Tensor,
        groups: Option<&Tensor>,
        valid: Option<&Tensor>,
    ) -> bool {
        let n = boxes.dims().first().copied().unwrap_or(0);
        float_suffix(boxes)
            && on_cuda([boxes, scores].into_iter().chain(groups).chain(valid))
            && scores.dtype() == boxes.dtype()
            && boxes.dims() == [n, 4]
            && scores.dims() == [n]
            && groups.is_none_or(|t| t.dtype() == DType::I64 && t.dims() == [n])
            && valid.is_none_or(|t| t.dtype() == DType::U8 && t.dims() == [n])
            && NmsGeom::new(op, n, groups.is_some(), valid.is_some(), NMS_MASK_BUDGET).is_ok()
    }

    /// `[keep, keep_valid]`, the CPU kernel's outputs.
    pub fn nms(
        op: &Nms,
        boxes: &Tensor,
        scores: &Tensor,
        groups: Option<&Tensor>,
        valid: Option<&Tensor>,
    ) -> KernelResult<Vec<Tensor>> {
        if !nms_supported(op, boxes, scores, groups, valid) {
            return Err(unsupported(format!(
                "nms on CUDA: boxes {}, scores {}",
                crate::dtype::describe(boxes),
                crate::dtype::describe(scores)
            )));
        }
        let g = NmsGeom::new(op, boxes.dims()[0], groups.is_some(), valid.is_some(), NMS_MASK_BUDGET)
            .map_err(|m| unsupported(format!("nms on CUDA: {m}")))?;
        match boxes.dtype() {
            DType::F32 => nms_t::<f32>(&g, boxes, scores, groups, valid),
            DType::F16 => nms_t::<half::f16>(&g, boxes, scores, groups, valid),
            DType::BF16 => nms_t::<half::bf16>(&g, boxes, scores, groups, valid),
            d => Err(unsupported(format!("nms on CUDA: dtype {d:?}"))),
        }
    }

    fn nms_t<T: CudaDType + DeviceRepr>(
        g: &NmsGeom,
        boxes: &Tensor,
        scores: &Tensor,
        groups: Option<&Tensor>,
        valid: Option<&Tensor>,
    ) -> KernelResult<Vec<Tensor>> {
        let dev = cuda_device(boxes)?;
        let n = g.n as usize;
        let (boxes, scores) = (boxes.contiguous()?, scores.contiguous()?);
        // Absent inputs: one-element placeholders the kernels never read.
        let groups = match groups {
            Some(t) => t.contiguous()?,
            None => Tensor::zeros(1, DType::I64, boxes.device())?,
        };
        let valid = match valid {
            Some(t) => t.contiguous()?,
            None => Tensor::zeros(1, DType::U8, boxes.device())?,
        };
        let dt = suffix(boxes.dtype())?;
        let m = module();
        let mut keys = zeros::<u64>(&dev, n)?;
        let mut state = zeros::<u32>(&dev, 2)?; // candidate count, kept count
        let mut sorted_boxes = zeros::<f32>(&dev, 4 * n)?;
        let mut sorted_groups = zeros::<i64>(&dev, n)?;
        let mut order = zeros::<u32>(&dev, n)?;
        let mut mask = zeros::<u64>(&dev, g.mask_words())?;
        let mut removed = zeros::<u64>(&dev, g.words as usize)?;
        let mut keep = zeros::<i64>(&dev, g.max_output as usize)?;
        let mut keep_valid = zeros::<u8>(&dev, g.max_output as usize)?;
        {
            let (bs, bl) = boxes.storage_and_layout();
            let (ss, sl) = scores.storage_and_layout();
            let (gs, gl) = groups.storage_and_layout();
            let (vs, vl) = valid.storage_and_layout();
            let (bv, sv) = (view::<T>(&bs, bl)?, view::<T>(&ss, sl)?);
            let (gv, vv) = (view::<i64>(&gs, gl)?, view::<u8>(&vs, vl)?);

            let f = function(&dev, &m, &format!("nms_candidates_{dt}"))?;
            let mut l = f.builder();
            l.arg(&sv).arg(&vv).arg(&mut keys).arg(&mut state).arg(g);
            unsafe { l.launch(config(g.per_box(), 0)) }.map_err(candle_core::Error::wrap)?;

            let f = function(&dev, &m, &format!("nms_sort_{dt}"))?;
            let mut l = f.builder();
            l.arg(&bv).arg(&gv).arg(&keys).arg(&state);
            l.arg(&mut sorted_boxes).arg(&mut sorted_groups).arg(&mut order).arg(g);
            unsafe { l.launch(config(g.per_box(), 0)) }.map_err(candle_core::Error::wrap)?;
        }
        let fmask = function(&dev, &m, "nms_mask")?;
        let fscan = function(&dev, &m, "nms_scan")?;
        for row0 in g.rounds() {
            let mut l = fmask.builder();
            l.arg(&sorted_boxes)
                .arg(&sorted_groups)
                .arg(&state)
                .arg(&mut mask)
                .arg(g)
                .arg(&row0);
            unsafe { l.launch(config(g.mask(), 0)) }.map_err(candle_core::Error::wrap)?;
            let mut l = fscan.builder();
            l.arg(&order).arg(&mut state).arg(&mask).arg(&mut removed);
            l.arg(&mut keep).arg(&mut keep_valid).arg(g).arg(&row0);
            unsafe { l.launch(config(g.scan(), g.scan_shared_bytes())) }.map_err(candle_core::Error::wrap)?;
        }
        let k = g.max_output as usize;
        Ok(vec![tensor(keep, k, &dev), tensor(keep_valid, k, &dev)])
    }

    // ---------------------------------------------------------------- box coding

    /// Whether the box kernels take these operands: on a CUDA device, of one f32/f16/bf16
    /// dtype (f64 and mixed dtypes run as tensor ops).
    pub fn boxes_supported(operands: &[&Tensor]) -> bool {
        let dtype = operands[0].dtype();
        float_suffix(operands[0]) && on_cuda(operands.iter().copied()) && operands.iter().all(|t| t.dtype() == dtype)
    }

    /// [`crate::kernels::detection::box_decode`] for `deltas [N, 4k]`, `boxes [N, 4]`
    /// (validated by the caller).
    pub fn box_decode(op: &BoxDecode, deltas: &Tensor, boxes: &Tensor) -> KernelResult<Tensor> {
        let (n, d4) = deltas.dims2()?;
        let g = BoxGeom::decode(op, n, d4 / 4).map_err(unsupported)?;
        box_kernel("box_decode", &[deltas, boxes], g)
    }

    /// [`crate::kernels::detection::clip_boxes`] for `boxes [..., 4]` (validated by the caller).
    pub fn clip_boxes(op: &ClipBoxes, boxes: &Tensor) -> KernelResult<Tensor> {
        box_kernel("clip_boxes", &[boxes], BoxGeom::clip(op, boxes.elem_count()))
    }

    /// Runs `kernel` on contiguous `inputs` into a tensor shaped as the first.
    fn box_kernel(kernel: &str, inputs: &[&Tensor], g: BoxGeom) -> KernelResult<Tensor> {
        match inputs[0].dtype() {
            DType::F32 => box_kernel_t::<f32>(kernel, inputs, g),
            DType::F16 => box_kernel_t::<half::f16>(kernel, inputs, g),
            DType::BF16 => box_kernel_t::<half::bf16>(kernel, inputs, g),
            d => Err(unsupported(format!("{kernel} on CUDA: dtype {d:?}"))),
        }
    }

    fn box_kernel_t<T: CudaDType + DeviceRepr>(kernel: &str, inputs: &[&Tensor], g: BoxGeom) -> KernelResult<Tensor> {
        let x = inputs[0];
        let n = x.elem_count();
        if n == 0 {
            return Ok(x.clone());
        }
        let dev = cuda_device(x)?;
        let f = function(&dev, &module(), &format!("{kernel}_{}", suffix(x.dtype())?))?;
        launch_into_new::<T, BoxGeom>(&f, inputs, n, &g, g.launch(), x.dims())
    }

    // ---------------------------------------------------------------- RoIAlign

    /// The level maps and boxes of a forward, contiguous, with their parameters.
    fn roi_geometry(op: &RoiAlign, feats: &[Tensor], boxes: &Tensor) -> KernelResult<RoiGeom> {
        let dtype = boxes.dtype();
        suffix(dtype)?;
        if !on_cuda(feats.iter().chain([boxes])) {
            return Err(unsupported("roi_align on CUDA: an input is not on a CUDA device"));
        }
        let mut hw = Vec::with_capacity(feats.len());
        let c = feats.first().map_or(0, |f| f.dims().get(1).copied().unwrap_or(0));
        for f in feats {
            match f.dims() {
                &[1, fc, h, w] if fc == c && f.dtype() == dtype => hw.push((h, w)),
                _ => {
                    return Err(unsupported(format!(
                        "roi_align on CUDA: level map {} for boxes {}",
                        crate::dtype::describe(f),
                        crate::dtype::describe(boxes)
                    )))
                }
            }
        }
        let r = match boxes.dims() {
            &[r, 4] => r,
            _ => {
                return Err(unsupported(format!(
                    "roi_align on CUDA: boxes {}",
                    crate::dtype::describe(boxes)
                )))
            }
        };
        RoiGeom::new(op, &hw, c, r).map_err(|m| unsupported(format!("roi_align on CUDA: {m}")))
    }

    /// Whether the kernels take this RoIAlign: level maps `[1, C, H, W]` and boxes of one
    /// f32/f16/bf16 dtype, at most `ROI_MAX_LEVELS` levels.
    pub fn roi_align_supported(op: &RoiAlign, inputs: &[Tensor]) -> bool {
        match inputs.split_last() {
            Some((boxes, feats)) => roi_geometry(op, feats, boxes).is_ok(),
            None => false,
        }
    }

    /// `[R, C, oh, ow]`: each box pooled on its level.
    pub fn roi_align(op: &RoiAlign, inputs: &[Tensor]) -> KernelResult<Tensor> {
        let (boxes, feats) = inputs
            .split_last()
            .ok_or_else(|| unsupported("roi_align without inputs"))?;
        let g = roi_geometry(op, feats, boxes)?;
        match boxes.dtype() {
            DType::F32 => roi_align_t::<f32>(g, feats, boxes),
            DType::F16 => roi_align_t::<half::f16>(g, feats, boxes),
            DType::BF16 => roi_align_t::<half::bf16>(g, feats, boxes),
            d => Err(unsupported(format!("roi_align on CUDA: dtype {d:?}"))),
        }
    }

    /// Each box's level (`roi_levels`), as i32 on the device.
    fn roi_levels<T: CudaDType + DeviceRepr>(
        g: &RoiGeom,
        boxes: &Tensor,
    ) -> KernelResult<candle_core::cuda_backend::cudarc::driver::CudaSlice<i32>> {
        let dev = cuda_device(boxes)?;
        let mut levels = zeros::<i32>(&dev, g.boxes as usize)?;
        let f = function(&dev, &module(), &format!("roi_levels_{}", suffix(boxes.dtype())?))?;
        let (bs, bl) = boxes.storage_and_layout();
        let bv = view::<T>(&bs, bl)?;
        let mut l = f.builder();
        l.arg(&bv).arg(&mut levels).arg(g);
        unsafe { l.launch(config(g.per_box(), 0)) }.map_err(candle_core::Error::wrap)?;
        Ok(levels)
    }

    fn roi_align_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        g: RoiGeom,
        feats: &[Tensor],
        boxes: &Tensor,
    ) -> KernelResult<Tensor> {
        let dev = cuda_device(boxes)?;
        let shape = (g.boxes as usize, g.channels as usize, g.oh as usize, g.ow as usize);
        let mut out = zeros::<T>(&dev, g.out_elems())?;
        let boxes = boxes.contiguous()?;
        let feats: Vec<Tensor> = feats
            .iter()
            .map(|f| f.contiguous())
            .collect::<candle_core::Result<_>>()?;
        let levels = roi_levels::<T>(&g, &boxes)?;
        let f = function(&dev, &module(), &format!("roi_align_fwd_{}", suffix(boxes.dtype())?))?;
        let stream = dev.cuda_stream();
        let storages: Vec<_> = feats.iter().map(|f| f.storage_and_layout()).collect();
        let maps = storages
            .iter()
            .map(|(s, l)| view::<T>(s, l))
            .collect::<KernelResult<Vec<_>>>()?;
        // The addresses stay valid while `maps` borrows the storages (until after the launch).
        let ptrs: Vec<_> = maps.iter().map(|v| v.device_ptr(&stream)).collect();
        let g = g.with_maps(&ptrs.iter().map(|(p, _)| *p).collect::<Vec<u64>>());
        let (bs, bl) = boxes.storage_and_layout();
        let bv = view::<T>(&bs, bl)?;
        let mut l = f.builder();
        l.arg(&bv).arg(&levels).arg(&mut out).arg(&g);
        unsafe { l.launch(config(g.per_output(), 0)) }.map_err(candle_core::Error::wrap)?;
        drop(ptrs);
        Ok(tensor(out, shape, &dev))
    }

    /// Whether the kernels take this RoIAlign backward (as [`roi_align_supported`], with the
    /// gradient's dtype).
    pub fn roi_align_grad_supported(op: &RoiAlignGrad, boxes: &Tensor, dy: &Tensor) -> bool {
        roi_grad_geometry(op, boxes, dy).is_ok()
    }

    fn roi_grad_geometry(op: &RoiAlignGrad, boxes: &Tensor, dy: &Tensor) -> KernelResult<RoiGeom> {
        suffix(dy.dtype())?;
        if !on_cuda([boxes, dy]) {
            return Err(unsupported("roi_align_grad on CUDA: an input is not on a CUDA device"));
        }
        let roi = &op.roi;
        let c = op.feature_shapes.first().map_or(0, |f| f[1]);
        if boxes.dtype() != dy.dtype() || op.feature_shapes.iter().any(|f| f[0] != 1 || f[1] != c) {
            return Err(unsupported(format!(
                "roi_align_grad on CUDA: boxes {}, gradient {}, feature shapes {:?}",
                crate::dtype::describe(boxes),
                crate::dtype::describe(dy),
                op.feature_shapes
            )));
        }
        let r = boxes.dims().first().copied().unwrap_or(0);
        let [oh, ow] = roi.output_size;
        if boxes.dims() != [r, 4] || dy.dims() != [r, c, oh, ow] {
            return Err(unsupported(format!(
                "roi_align_grad on CUDA: boxes {} and gradient {} for [{r}, {c}, {oh}, {ow}]",
                crate::dtype::describe(boxes),
                crate::dtype::describe(dy)
            )));
        }
        let hw: Vec<(usize, usize)> = op.feature_shapes.iter().map(|f| (f[2], f[3])).collect();
        RoiGeom::new(roi, &hw, c, r).map_err(|m| unsupported(format!("roi_align_grad on CUDA: {m}")))
    }

    /// One gradient per level, `[1, C, H_l, W_l]` in `dy`'s dtype (accumulated in f32).
    pub fn roi_align_grad(op: &RoiAlignGrad, boxes: &Tensor, dy: &Tensor) -> KernelResult<Vec<Tensor>> {
        let g = roi_grad_geometry(op, boxes, dy)?;
        let grads = match dy.dtype() {
            DType::F32 => roi_align_grad_t::<f32>(g, boxes, dy),
            DType::F16 => roi_align_grad_t::<half::f16>(g, boxes, dy),
            DType::BF16 => roi_align_grad_t::<half::bf16>(g, boxes, dy),
            d => Err(unsupported(format!("roi_align_grad on CUDA: dtype {d:?}"))),
        }?;
        grads
            .into_iter()
            .zip(&op.feature_shapes)
            .map(|(t, f)| Ok(t.reshape(f.to_vec())?.to_dtype(dy.dtype())?))
            .collect()
    }

    fn roi_align_grad_t<T: CudaDType + DeviceRepr>(
        g: RoiGeom,
        boxes: &Tensor,
        dy: &Tensor,
    ) -> KernelResult<Vec<Tensor>> {
        let dev = cuda_device(dy)?;
        let mut grads = (0..g.levels as usize)
            .map(|l| zeros::<f32>(&dev, g.map_elems(l)))
            .collect::<KernelResult<Vec<_>>>()?;
        {
            let (boxes, dy) = (boxes.contiguous()?, dy.contiguous()?);
            let levels = roi_levels::<T>(&g, &boxes)?;
            let f = function(&dev, &module(), &format!("roi_align_bwd_{}", suffix(dy.dtype())?))?;
            let stream = dev.cuda_stream();
            let ptrs: Vec<_> = grads.iter_mut().map(|s| s.device_ptr_mut(&stream)).collect();
            let g = g.with_maps(&ptrs.iter().map(|(p, _)| *p).collect::<Vec<u64>>());
            let (bs, bl) = boxes.storage_and_layout();
            let (ds, dl) = dy.storage_and_layout();
            let (bv, dv) = (view::<T>(&bs, bl)?, view::<T>(&ds, dl)?);
            let mut l = f.builder();
            l.arg(&bv).arg(&levels).arg(&dv).arg(&g);
            unsafe { l.launch(config(g.per_output(), 0)) }.map_err(candle_core::Error::wrap)?;
            drop(ptrs);
        }
        Ok(grads
            .into_iter()
            .enumerate()
            .map(|(l, s)| tensor(s, g.map_elems(l), &dev))
            .collect())
    }
}
