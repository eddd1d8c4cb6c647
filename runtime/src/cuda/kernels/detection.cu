// Detection ops (vitdet_ir::ops::detection) on the GPU, with the CPU kernels' exact semantics
// (runtime/src/kernels/detection.rs):
//
// - top_k: one block per row. A radix select over order-preserving 32-bit keys of the scores
//   (three passes of 11/11/10 bits, shared-memory histograms) finds the k-th largest key; when
//   more elements share it than are needed, further passes over the tie key `n - 1 - index`
//   pick the lowest indices, so exactly k elements are selected. They are compacted into
//   shared memory and bitonic-sorted by (key descending, index ascending).
// - nms: the candidates are compacted and ranked by (score descending, index ascending); an
//   IoU bitmask over the sorted boxes (64 columns per word, f64 IoU as the CPU kernel) is
//   built and scanned greedily by one block, in rounds of `block_rows` rows so the mask's
//   memory stays bounded. Everything stays on the device (no host synchronization).
// - box_decode / clip_boxes: one thread per box (group of 4 deltas) or coordinate, the CPU
//   kernel's f64 arithmetic in its order, converted to the storage type as the CPU does.
// - roi_align / roi_align_grad: each box's pyramid level, then one thread per output
//   (gradient) element over its bilinear samples; sample positions and taps in f64 as the CPU
//   kernel, values accumulated in f32; the backward scatters with atomicAdd into f32
//   per-level gradients.
//
// Launch geometry and the order of launches: runtime/src/cuda/detection.rs.

#define TOPK_RADIX_BITS 11
#define TOPK_BINS (1 << TOPK_RADIX_BITS)
#define NMS_THREADS 256   // nms_candidates / nms_sort blocks (the sort's shared tile)
#define NMS_COLS 64       // mask columns per word (and threads per nms_mask block)
#define ROI_MAX_LEVELS 8
#define ROI_GRID_MAX 1024 // cap on the adaptive sampling grid per bin side

// ------------------------------------------------------------------------------- helpers

// 32-bit atomic add (the emulator's header only provides the float one).
__device__ __forceinline__ unsigned det_atomic_add(unsigned* p, unsigned v) {
#ifdef VITDET_EMU
    return std::atomic_ref<unsigned>(*p).fetch_add(v);
#else
    return atomicAdd(p, v);
#endif
}

// A product rounded on its own: never contracted into an FMA with a following add, so f64
// expressions round exactly as the CPU kernel's.
__device__ __forceinline__ double det_mul_rn(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ bool det_finite(float v) { return v == v && v - v == 0.0f; }

// Order-preserving key of a score: larger numbers get larger keys, -0 and +0 the same key,
// NaN key 0 (below -inf, whose key is 0x007fffff).
__device__ __forceinline__ unsigned det_score_key(float v) {
    if (v != v) return 0u;
    if (v == 0.0f) v = 0.0f;
    const unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// ------------------------------------------------------------------------------- box coding

// Parameters of box_decode and clip_boxes (`BoxGeom` in cuda/detection.rs).
struct BoxGeom {
    double wx, wy, ww, wh;  // box_decode: the deltas' weights
    double scale_clamp;     // box_decode: the largest dw, dh
    double width, height;   // clip_boxes: the image
    long long items;        // box_decode: boxes x groups; clip_boxes: coordinates
    int groups;             // box_decode: groups of 4 deltas per box
};

__device__ __forceinline__ double det_f64(float v) { return (double)v; }
template <class T>
__device__ __forceinline__ double det_f64(T v) { return (double)to_f32(v); }

// `v` in T as the CPU kernels convert f64 (candle's casts, like PyTorch's): to f32 (rounded to
// nearest), then to T.
template <class T>
__device__ __forceinline__ T det_round(double v) {
    return from_f32<T>((float)v);
}

// detectron2's Box2BoxTransform.apply_deltas for group q of box i (deltas [N, 4 groups],
// boxes [N, 4]): the CPU kernel's f64 steps in its order, each product rounded on its own.
template <class T>
__device__ void det_box_decode(const T* deltas, const T* boxes, T* out, BoxGeom g) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= g.items) return;
    const long long i = e / g.groups;
    const double x0 = det_f64(boxes[4 * i]), y0 = det_f64(boxes[4 * i + 1]);
    const double w = det_f64(boxes[4 * i + 2]) - x0, h = det_f64(boxes[4 * i + 3]) - y0;
    const double cx = x0 + det_mul_rn(0.5, w), cy = y0 + det_mul_rn(0.5, h);
    const T* d = deltas + 4 * e;
    const double dx = det_f64(d[0]) / g.wx, dy = det_f64(d[1]) / g.wy;
    double dw = det_f64(d[2]) / g.ww, dh = det_f64(d[3]) / g.wh;
    // torch.clamp(max=): NaN stays NaN.
    if (dw > g.scale_clamp) dw = g.scale_clamp;
    if (dh > g.scale_clamp) dh = g.scale_clamp;
    const double pcx = det_mul_rn(dx, w) + cx, pcy = det_mul_rn(dy, h) + cy;
    const double hw = det_mul_rn(0.5, det_mul_rn(exp(dw), w)), hh = det_mul_rn(0.5, det_mul_rn(exp(dh), h));
    T* o = out + 4 * e;
    o[0] = det_round<T>(pcx - hw);
    o[1] = det_round<T>(pcy - hh);
    o[2] = det_round<T>(pcx + hw);
    o[3] = det_round<T>(pcy + hh);
}

// detectron2's Boxes.clip: x to [0, width], y to [0, height], NaN kept. One thread per
// coordinate of boxes [..., 4].
template <class T>
__device__ void det_clip_boxes(const T* boxes, T* out, BoxGeom g) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= g.items) return;
    double v = det_f64(boxes[e]);
    const double hi = e % 2 == 0 ? g.width : g.height;
    if (v == v) v = fmin(fmax(v, 0.0), hi);
    out[e] = det_round<T>(v);
}

// ------------------------------------------------------------------------------- top-k

struct TopKGeom {
    int rows;
    int n;           // row length
    int k;
    int sort_size;   // power of two >= k: entries of the shared sort buffer
    int index_bits;  // bit length of n - 1 (width of the tie key)
    int chunk;       // elements per block of the multi-block kernels (0: one block per row)
};

// After a histogram pass over `bins` bins: the bin holding the `remaining`-th largest counted
// element (bins ranked from the top) goes to *digit, the count of higher bins to *above.
// Every thread calls it; `sums` holds blockDim.x entries. Ends with a barrier.
__device__ __forceinline__ void topk_pick_bin(const unsigned* hist, unsigned* sums, int bins, unsigned remaining,
                                              unsigned* digit, unsigned* above) {
    const int t = threadIdx.x, nt = blockDim.x;
    const int per = (bins + nt - 1) / nt;
    // Thread t owns ranks [t * per, (t + 1) * per); rank 0 is the highest bin.
    const int r0 = imin(t * per, bins), r1 = imin(r0 + per, bins);
    unsigned own = 0;
    for (int r = r0; r < r1; ++r) own += hist[bins - 1 - r];
    sums[t] = own;
    __syncthreads();
    for (int off = 1; off < nt; off <<= 1) {
        const unsigned v = t >= off ? sums[t - off] : 0u;
        __syncthreads();
        sums[t] += v;
        __syncthreads();
    }
    const unsigned incl = sums[t], excl = incl - own;
    if (excl < remaining && remaining <= incl) {
        unsigned acc = excl;
        for (int r = r0; r < r1; ++r) {
            const unsigned c = hist[bins - 1 - r];
            if (acc + c >= remaining) {
                *digit = (unsigned)(bins - 1 - r);
                *above = acc;
                break;
            }
            acc += c;
        }
    }
    __syncthreads();
}

// Calls f(i, key) for this thread's elements i of a row of n and their score keys: elements
// t, t + nt, ... in rounds of TOPK_UNROLL whose loads are all issued before any is used. One
// block reads a whole row several times, so the loop is bound by load latency unless many loads
// are in flight.
#define TOPK_UNROLL 8
template <class T, class F>
__device__ __forceinline__ void topk_for_each_key(const T* __restrict__ xr, int n, F f) {
    const int t = threadIdx.x, nt = blockDim.x;
    for (int base = t; base < n; base += nt * TOPK_UNROLL) {
        unsigned keys[TOPK_UNROLL];
#pragma unroll
        for (int u = 0; u < TOPK_UNROLL; ++u) {
            const int i = base + u * nt;
            keys[u] = i < n ? det_score_key(to_f32(xr[i])) : 0u;
        }
#pragma unroll
        for (int u = 0; u < TOPK_UNROLL; ++u) {
            const int i = base + u * nt;
            if (i < n) f(i, keys[u]);
        }
    }
}

// The radix selection's state for one row: the bits of the k-th largest score key found so far
// and, where more elements share that key than are needed, of the smallest tie key n - 1 - index
// taken. `topk_row` keeps it in registers, the multi-block kernels in global memory.
struct TopKState {
    unsigned prefix, mask, remaining, ties;  // the k-th largest key's bits found so far
    unsigned tie_select;                     // more elements share that key than are needed
    unsigned tprefix, tmask;                 // the smallest taken tie key's bits found so far
    unsigned count;                          // entries compacted (multi-block kernels)
};

// Radix passes of a row: three over the score key, then as many over the tie key as its bits need.
__device__ __forceinline__ int topk_passes(const TopKGeom& g) {
    return 3 + (g.index_bits + TOPK_RADIX_BITS - 1) / TOPK_RADIX_BITS;
}

// What radix pass `pass` counts: passes 0-2 the score key's 11 / 11 / 10 bits, then the tie key
// n - 1 - index from its top bit, TOPK_RADIX_BITS at a time. False when it has nothing to do.
__device__ __forceinline__ bool topk_pass(const TopKState& s, const TopKGeom& g, int pass, bool* tie, int* shift,
                                          int* bins) {
    *tie = pass >= 3;
    if (!*tie) {
        *shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        *bins = pass == 2 ? 1024 : TOPK_BINS;
        return true;
    }
    const int top = g.index_bits - (pass - 3) * TOPK_RADIX_BITS;
    if (!s.tie_select || top <= 0) return false;
    const int width = imin(TOPK_RADIX_BITS, top);
    *shift = top - width;
    *bins = 1 << width;
    return true;
}

// The bin element `i` of the row (score key `key`) counts in during a pass, or -1.
__device__ __forceinline__ int topk_bin(const TopKState& s, const TopKGeom& g, bool tie, int shift, int bins, int i,
                                        unsigned key) {
    const unsigned top = (unsigned)(bins - 1);
    if (!tie) return (key & s.mask) == s.prefix ? (int)((key >> shift) & top) : -1;
    const unsigned t = (unsigned)(g.n - 1 - i);
    return (t & s.tmask) == s.tprefix && key == s.prefix ? (int)((t >> shift) & top) : -1;
}

// The state after a pass picked bin `digit`, with `above` counted elements in higher bins and
// `in_bin` in it.
__device__ __forceinline__ void topk_advance(TopKState& s, int pass, bool tie, int shift, int bins, unsigned digit,
                                             unsigned above, unsigned in_bin) {
    const unsigned field = (unsigned)(bins - 1) << shift;
    s.remaining -= above;
    if (!tie) {
        s.prefix |= digit << shift;
        s.mask |= field;
        s.ties = in_bin;  // elements whose key equals the k-th largest, after the last key pass
        if (pass == 2) s.tie_select = s.ties > s.remaining;
    } else {
        s.tprefix |= digit << shift;
        s.tmask |= field;
    }
}

// Whether element `i` (score key `key`) is among the k selected, once every pass has run.
__device__ __forceinline__ bool topk_taken(const TopKState& s, const TopKGeom& g, int i, unsigned key) {
    return key > s.prefix || (key == s.prefix && (!s.tie_select || (unsigned)(g.n - 1 - i) >= s.tprefix));
}

template <class T>
__device__ void topk_sort_write(unsigned* skey, unsigned* sidx, const T* __restrict__ xr, T* __restrict__ values,
                                long long* __restrict__ indices, const TopKGeom& g, long long row);

// One block per row, dynamic shared memory (TOPK_BINS + blockDim.x + 2 * sort_size) * 4 bytes
// (blockDim.x a power of two). Writes values [rows, k] and indices [rows, k].
template <class T>
__device__ void topk_row(const T* __restrict__ x, T* __restrict__ values, long long* __restrict__ indices,
                         TopKGeom g) {
    DYNAMIC_SHARED(unsigned, smem);
    unsigned* hist = smem;
    unsigned* sums = hist + TOPK_BINS;
    unsigned* skey = sums + blockDim.x;
    unsigned* sidx = skey + g.sort_size;
    __shared__ unsigned s_digit, s_above, s_count;
    const int t = threadIdx.x, nt = blockDim.x;
    const long long row = blockIdx.x;
    const T* xr = x + row * g.n;

    // The k-th largest score key, 11 + 11 + 10 bits; where more elements share it than are
    // needed, the lowest indices among them: the `remaining`-th largest tie key n - 1 - i.
    TopKState s = {};
    s.remaining = (unsigned)g.k;
    for (int pass = 0; pass < topk_passes(g); ++pass) {
        bool tie;
        int shift, bins;
        if (!topk_pass(s, g, pass, &tie, &shift, &bins)) continue;
        for (int b = t; b < bins; b += nt) hist[b] = 0;
        __syncthreads();
        topk_for_each_key(xr, g.n, [&](int i, unsigned key) {
            const int b = topk_bin(s, g, tie, shift, bins, i, key);
            if (b >= 0) det_atomic_add(&hist[b], 1u);
        });
        __syncthreads();
        topk_pick_bin(hist, sums, bins, s.remaining, &s_digit, &s_above);
        topk_advance(s, pass, tie, shift, bins, s_digit, s_above, hist[s_digit]);
        __syncthreads();  // hist is cleared by the next pass
    }

    // Compaction of exactly k elements (any order: the sort orders them), then padding that
    // sorts last.
    if (t == 0) s_count = 0;
    __syncthreads();
    topk_for_each_key(xr, g.n, [&](int i, unsigned key) {
        if (topk_taken(s, g, i, key)) {
            const unsigned p = det_atomic_add(&s_count, 1u);
            if (p < (unsigned)g.k) {  // always, unless the selection above is wrong
                skey[p] = key;
                sidx[p] = (unsigned)i;
            }
        }
    });
    for (int p = g.k + t; p < g.sort_size; p += nt) {
        skey[p] = 0u;
        sidx[p] = 0xffffffffu;
    }
    __syncthreads();

    topk_sort_write(skey, sidx, xr, values, indices, g, row);
}

// Sorts the block's `sort_size` shared entries (keys `skey`, row indices `sidx`; padding key 0,
// index 0xffffffff sorts last) and writes the first k as row `row`'s values and indices.
template <class T>
__device__ void topk_sort_write(unsigned* skey, unsigned* sidx, const T* __restrict__ xr, T* __restrict__ values,
                                long long* __restrict__ indices, const TopKGeom& g, long long row) {
    const int t = threadIdx.x, nt = blockDim.x;
    // Bitonic sort: entry a goes before b when its key is larger, or equal with a lower index.
    const int half = g.sort_size / 2;
    for (int size = 2; size <= g.sort_size; size <<= 1) {
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            for (int p = t; p < half; p += nt) {
                const int a = 2 * stride * (p / stride) + (p % stride), b = a + stride;
                const unsigned ka = skey[a], kb = skey[b], ia = sidx[a], ib = sidx[b];
                const bool b_first = kb > ka || (kb == ka && ib < ia);
                const bool a_first = ka > kb || (ka == kb && ia < ib);
                if ((a & size) == 0 ? b_first : a_first) {
                    skey[a] = kb;
                    skey[b] = ka;
                    sidx[a] = ib;
                    sidx[b] = ia;
                }
            }
            __syncthreads();
        }
    }
    for (int j = t; j < g.k; j += nt) {
        const unsigned i = sidx[j];
        values[row * g.k + j] = xr[i];
        indices[row * g.k + j] = (long long)i;
    }
}

// Multi-block top-k, for rows long enough that one block per row leaves the GPU idle
// (g.chunk > 0; the RPN's 196,608 scores at 1024). The same passes, selection and order as
// `topk_row`: each radix pass is a histogram over chunks of g.chunk elements (`topk_hist`, grid
// (chunks, rows)) added into a global per-row histogram, from which one block per row picks the
// bin (`topk_pick`); the selected k are compacted by the chunks (`topk_compact`) and sorted by
// one block per row (`topk_sort`). The per-row state lives in global memory, zero-filled by the
// caller, as are the histograms (each pick clears its row's after reading it).

// Dynamic shared memory: TOPK_BINS counters.
template <class T>
__device__ void topk_hist_impl(const T* __restrict__ x, const TopKState* state, unsigned* hist, TopKGeom g,
                               int pass) {
    DYNAMIC_SHARED(unsigned, counts);
    const long long row = blockIdx.y;
    const TopKState s = state[row];
    bool tie;
    int shift, bins;
    if (!topk_pass(s, g, pass, &tie, &shift, &bins)) return;
    for (int b = threadIdx.x; b < bins; b += blockDim.x) counts[b] = 0;
    __syncthreads();
    const int i0 = blockIdx.x * g.chunk;
    topk_for_each_key(x + row * g.n + i0, imin(g.chunk, g.n - i0), [&](int i, unsigned key) {
        const int b = topk_bin(s, g, tie, shift, bins, i0 + i, key);
        if (b >= 0) det_atomic_add(&counts[b], 1u);
    });
    __syncthreads();
    for (int b = threadIdx.x; b < bins; b += blockDim.x)
        if (counts[b]) det_atomic_add(&hist[row * TOPK_BINS + b], counts[b]);
}

// One block per row (blockDim a power of two); dynamic shared memory: blockDim counters.
__device__ void topk_pick_impl(TopKState* state, unsigned* hist, TopKGeom g, int pass) {
    DYNAMIC_SHARED(unsigned, sums);
    __shared__ unsigned s_digit, s_above;
    const long long row = blockIdx.x;
    TopKState s = state[row];
    bool tie;
    int shift, bins;
    if (!topk_pass(s, g, pass, &tie, &shift, &bins)) return;
    if (pass == 0) s.remaining = (unsigned)g.k;  // the state starts zero-filled
    unsigned* h = hist + row * TOPK_BINS;
    topk_pick_bin(h, sums, bins, s.remaining, &s_digit, &s_above);
    if (threadIdx.x == 0) {
        topk_advance(s, pass, tie, shift, bins, s_digit, s_above, h[s_digit]);
        state[row] = s;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < bins; b += blockDim.x) h[b] = 0;
}

// The selected elements of each chunk, staged in shared memory (dynamic: 2 k words) and
// appended to the row's candidates `cand [rows][2][k]` (keys, then indices) at one offset per
// block.
template <class T>
__device__ void topk_compact_impl(const T* __restrict__ x, TopKState* state, unsigned* cand, TopKGeom g) {
    DYNAMIC_SHARED(unsigned, stage);
    __shared__ unsigned s_local, s_base;
    const long long row = blockIdx.y;
    const TopKState s = state[row];
    if (threadIdx.x == 0) s_local = 0;
    __syncthreads();
    const int i0 = blockIdx.x * g.chunk;
    topk_for_each_key(x + row * g.n + i0, imin(g.chunk, g.n - i0), [&](int i, unsigned key) {
        const int at = i0 + i;
        if (topk_taken(s, g, at, key)) {
            const unsigned p = det_atomic_add(&s_local, 1u);
            if (p < (unsigned)g.k) {  // always, unless the selection above is wrong
                stage[p] = key;
                stage[g.k + p] = (unsigned)at;
            }
        }
    });
    __syncthreads();
    const unsigned local = s_local < (unsigned)g.k ? s_local : (unsigned)g.k;
    if (threadIdx.x == 0) s_base = local ? det_atomic_add(&state[row].count, local) : 0u;
    __syncthreads();
    unsigned* c = cand + row * 2 * g.k;
    for (unsigned j = threadIdx.x; j < local; j += blockDim.x)
        if (s_base + j < (unsigned)g.k) {
            c[s_base + j] = stage[j];
            c[g.k + s_base + j] = stage[g.k + j];
        }
}

// One block per row (blockDim a power of two); dynamic shared memory: 2 sort_size words.
template <class T>
__device__ void topk_sort_impl(const T* __restrict__ x, const unsigned* cand, T* values, long long* indices,
                               TopKGeom g) {
    DYNAMIC_SHARED(unsigned, smem);
    unsigned* skey = smem;
    unsigned* sidx = smem + g.sort_size;
    const long long row = blockIdx.x;
    const unsigned* c = cand + row * 2 * g.k;
    for (int p = threadIdx.x; p < g.sort_size; p += blockDim.x) {
        skey[p] = p < g.k ? c[p] : 0u;
        sidx[p] = p < g.k ? c[g.k + p] : 0xffffffffu;
    }
    __syncthreads();
    topk_sort_write(skey, sidx, x + row * g.n, values, indices, g, row);
}

// ------------------------------------------------------------------------------- NMS

struct NmsGeom {
    double iou_threshold;
    double score_threshold;
    int n;           // boxes
    int words;       // ceil(n / 64): mask words per row
    int block_rows;  // mask rows per round (a multiple of 64)
    int max_output;
    int has_groups, has_valid, has_threshold;
};

// Candidates (finite score, above the threshold, marked valid) as 64-bit sort keys
// (score key << 32 | ~index: descending keys = descending score, then ascending index) at
// keys[0, M), M counted in state[0]. One thread per box.
template <class T>
__device__ void nms_candidates_impl(const T* __restrict__ scores, const unsigned char* __restrict__ valid,
                                    unsigned long long* __restrict__ keys, unsigned* __restrict__ state, NmsGeom g) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= g.n) return;
    const float s = to_f32(scores[i]);
    bool ok = det_finite(s);
    if (g.has_threshold) ok = ok && (double)s > g.score_threshold;
    if (g.has_valid) ok = ok && valid[i] != 0;
    if (!ok) return;
    const unsigned p = det_atomic_add(&state[0], 1u);
    keys[p] = ((unsigned long long)det_score_key(s) << 32) | (unsigned long long)(~(unsigned)i);
}

// Sorts the M candidates by rank (the number of larger keys; keys are distinct) and gathers
// their boxes (as f32, exact for every input dtype), groups and indices in that order.
// NMS_THREADS threads per block, blocks covering n.
template <class T>
__device__ void nms_sort_impl(const T* __restrict__ boxes, const long long* __restrict__ groups,
                              const unsigned long long* __restrict__ keys, const unsigned* __restrict__ state,
                              float* __restrict__ sorted_boxes, long long* __restrict__ sorted_groups,
                              unsigned* __restrict__ order, NmsGeom g) {
    __shared__ unsigned long long tile[NMS_THREADS];
    const int m = (int)state[0];
    const int base = blockIdx.x * NMS_THREADS, t = threadIdx.x;
    if (base >= m) return;
    const int i = base + t;
    const unsigned long long mine = i < m ? keys[i] : 0ull;
    int rank = 0;
    for (int j0 = 0; j0 < m; j0 += NMS_THREADS) {
        tile[t] = j0 + t < m ? keys[j0 + t] : 0ull;  // 0 is below every candidate's key
        __syncthreads();
        const int nj = imin(NMS_THREADS, m - j0);
        for (int jj = 0; jj < nj; ++jj) rank += tile[jj] > mine;
        __syncthreads();
    }
    if (i >= m) return;
    const unsigned idx = ~(unsigned)(mine & 0xffffffffull);
    order[rank] = idx;
    for (int c = 0; c < 4; ++c) sorted_boxes[4 * (long long)rank + c] = to_f32(boxes[4 * (long long)idx + c]);
    sorted_groups[rank] = g.has_groups ? groups[idx] : 0;
}

// Mask rows [row0, row0 + block_rows): bit jj of word (i - row0, cb) is set when sorted box
// j = 64 cb + jj comes after i, is in i's group and has IoU > iou_threshold with it (f64, the
// CPU kernel's formula: area = (x1 - x0)(y1 - y0), IoU = inter / (area_i + area_j - inter),
// NaN suppresses nothing). Grid (words, block_rows / 64), 64 threads. Words left of a row's
// own word are never read and not written; rounds after max_output keeps do nothing.
__device__ __forceinline__ void nms_mask_impl(const float* __restrict__ sorted_boxes,
                                              const long long* __restrict__ sorted_groups,
                                              const unsigned* __restrict__ state, unsigned long long* __restrict__ mask,
                                              NmsGeom g, int row0) {
    __shared__ double cx0[NMS_COLS], cy0[NMS_COLS], cx1[NMS_COLS], cy1[NMS_COLS], carea[NMS_COLS];
    __shared__ long long cgroup[NMS_COLS];
    const int m = (int)state[0];
    const int rb = row0 + blockIdx.y * NMS_COLS, cb = blockIdx.x * NMS_COLS, t = threadIdx.x;
    if (rb >= m || cb >= m || cb + NMS_COLS - 1 < rb || (int)state[1] >= g.max_output) return;
    const int j = cb + t;
    if (j < m) {
        const float* b = sorted_boxes + 4 * (long long)j;
        cx0[t] = b[0];
        cy0[t] = b[1];
        cx1[t] = b[2];
        cy1[t] = b[3];
        carea[t] = det_mul_rn((double)b[2] - (double)b[0], (double)b[3] - (double)b[1]);
        cgroup[t] = sorted_groups[j];
    }
    __syncthreads();
    const int i = rb + t;
    if (i >= m) return;
    const float* b = sorted_boxes + 4 * (long long)i;
    const double x0 = b[0], y0 = b[1], x1 = b[2], y1 = b[3];
    const double area = det_mul_rn(x1 - x0, y1 - y0);
    const long long group = sorted_groups[i];
    const int ncols = imin(NMS_COLS, m - cb);
    unsigned long long bits = 0;
    for (int jj = 0; jj < ncols; ++jj) {
        if (cb + jj <= i || cgroup[jj] != group) continue;
        const double w = fmax(fmin(x1, cx1[jj]) - fmax(x0, cx0[jj]), 0.0);
        const double h = fmax(fmin(y1, cy1[jj]) - fmax(y0, cy0[jj]), 0.0);
        const double inter = det_mul_rn(w, h);
        if (inter / (area + carea[jj] - inter) > g.iou_threshold) bits |= 1ull << jj;
    }
    mask[(long long)(i - row0) * g.words + blockIdx.x] = bits;
}

// The greedy scan of rows [row0, row0 + block_rows): one block of at least 64 threads,
// dynamic shared memory words * 8 bytes for the removed-bit set (kept in `removed` between
// rounds; state[1] counts the kept boxes). A row not removed by an earlier kept row is kept
// (its original index goes to keep, keep_valid to 1) and removes the rows its mask row marks.
// Per word of 64 rows: the rows' own mask words (the diagonal block) are loaded into shared
// memory, every thread takes the same keep decisions from them and the word's removed bits,
// then the kept rows' later words are OR-ed into the removed set (each word by one thread) and
// their indices written, so no decision waits on a global load.
__device__ __forceinline__ void nms_scan_impl(const unsigned* __restrict__ order, unsigned* __restrict__ state,
                                              const unsigned long long* __restrict__ mask,
                                              unsigned long long* __restrict__ removed, long long* __restrict__ keep,
                                              unsigned char* __restrict__ keep_valid, NmsGeom g, int row0) {
    DYNAMIC_SHARED(unsigned long long, rem);
    __shared__ unsigned long long diag[NMS_COLS];
    __shared__ int kept_rows[NMS_COLS];  // rows kept in the current word, relative to row0
    const int m = (int)state[0];
    int kept = (int)state[1];
    const int hi = imin(row0 + g.block_rows, m);
    if (row0 >= hi || kept >= g.max_output) return;
    const int t = threadIdx.x, nt = blockDim.x;
    const int wlo = row0 / NMS_COLS, wend = (m + NMS_COLS - 1) / NMS_COLS;
    for (int v = wlo + t; v < wend; v += nt) rem[v] = removed[v];
    for (int w = wlo; w * NMS_COLS < hi && kept < g.max_output; ++w) {
        __syncthreads();  // the previous word's updates are done; diag and kept_rows are free
        const int base = w * NMS_COLS;
        if (t < NMS_COLS) diag[t] = base + t < hi ? mask[(long long)(base + t - row0) * g.words + w] : 0ull;
        __syncthreads();
        unsigned long long cur = rem[w];
        const int nb = imin(NMS_COLS, hi - base), kept0 = kept;
        int nk = 0;
        for (int b = 0; b < nb && kept < g.max_output; ++b) {
            if ((cur >> b) & 1ull) continue;
            if (t == 0) kept_rows[nk] = base + b - row0;
            ++nk;
            ++kept;
            cur |= diag[b];
        }
        __syncthreads();  // kept_rows is complete
        if (t < nk) {
            keep[kept0 + t] = (long long)order[row0 + kept_rows[t]];
            keep_valid[kept0 + t] = 1;
        }
        for (int v = w + 1 + t; v < wend; v += nt) {
            unsigned long long acc = 0;
            for (int q = 0; q < nk; ++q) acc |= mask[(long long)kept_rows[q] * g.words + v];
            rem[v] |= acc;
        }
    }
    __syncthreads();
    for (int v = wlo + t; v < wend; v += nt) removed[v] = rem[v];
    if (t == 0) state[1] = (unsigned)kept;
}

// ------------------------------------------------------------------------------- RoIAlign

struct RoiGeom {
    double scales[ROI_MAX_LEVELS];
    double canonical_box_size;
    // Device addresses of the level maps [C, H_l, W_l] (T in the forward, f32 gradients in the
    // backward).
    unsigned long long maps[ROI_MAX_LEVELS];
    int heights[ROI_MAX_LEVELS], widths[ROI_MAX_LEVELS];
    int levels, boxes, channels, oh, ow;
    int sampling_ratio, aligned, canonical_level, min_level;
};

// detectron2's assign_boxes_to_levels in f64: floor(canonical_level + log2(sqrt(area) /
// canonical_box_size + 1e-8)) clamped to the levels, relative to the first; NaN -> 0.
template <class T>
__device__ void roi_levels_impl(const T* __restrict__ boxes, int* __restrict__ levels, RoiGeom g) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= g.boxes) return;
    const T* b = boxes + 4 * (long long)r;
    const double x0 = to_f32(b[0]), y0 = to_f32(b[1]), x1 = to_f32(b[2]), y1 = to_f32(b[3]);
    const double size = sqrt(det_mul_rn(x1 - x0, y1 - y0));
    const double l = floor((double)g.canonical_level + log2(size / g.canonical_box_size + 1e-8));
    const double lo = g.min_level, top = g.min_level + g.levels - 1;
    levels[r] = l != l ? 0 : (int)(fmin(fmax(l, lo), top) - lo);
}

// One box on its level: the sampling grid (torchvision's roi_align, as the CPU kernel).
struct RoiBox {
    double x0, y0, bin_w, bin_h;
    int gh, gw;
    float count;  // divisor of the bin average: max(gh * gw, 1)
    int h, w;
};

__device__ __forceinline__ int roi_grid_side(double v) {
    if (!(v - v == 0.0) || !(v > 0.0)) return 0;
    return (int)fmin(ceil(v), (double)ROI_GRID_MAX);
}

template <class T>
__device__ __forceinline__ RoiBox roi_box(const T* boxes, int r, int level, const RoiGeom& g) {
    const T* b = boxes + 4 * (long long)r;
    const double scale = g.scales[level], offset = g.aligned ? 0.5 : 0.0;
    const double x0 = det_mul_rn((double)to_f32(b[0]), scale) - offset;
    const double y0 = det_mul_rn((double)to_f32(b[1]), scale) - offset;
    const double x1 = det_mul_rn((double)to_f32(b[2]), scale) - offset;
    const double y1 = det_mul_rn((double)to_f32(b[3]), scale) - offset;
    double rw = x1 - x0, rh = y1 - y0;
    if (!g.aligned) {
        rw = fmax(rw, 1.0);
        rh = fmax(rh, 1.0);
    }
    RoiBox k;
    k.x0 = x0;
    k.y0 = y0;
    k.bin_h = rh / g.oh;
    k.bin_w = rw / g.ow;
    k.gh = g.sampling_ratio > 0 ? g.sampling_ratio : roi_grid_side(rh / g.oh);
    k.gw = g.sampling_ratio > 0 ? g.sampling_ratio : roi_grid_side(rw / g.ow);
    k.count = (float)(k.gh * k.gw > 1 ? k.gh * k.gw : 1);
    k.h = g.heights[level];
    k.w = g.widths[level];
    return k;
}

// One axis of torchvision's bilinear_interpolate: taps lo/hi with weights (1 - frac, frac);
// ok = false outside [-1, size] (the sample then reads tap 0 with weight 0, as the CPU kernel).
struct RoiTaps {
    int lo, hi;
    double wlo, whi;
    bool ok;
};

__device__ __forceinline__ RoiTaps roi_taps(double c, int size) {
    RoiTaps a;
    a.ok = !(c < -1.0 || c > (double)size);
    if (!a.ok) {
        a.lo = a.hi = 0;
        a.wlo = a.whi = 0.0;
        return a;
    }
    if (c <= 0.0) c = 0.0;
    int lo = c != c ? 0 : (int)c;  // Rust's `as usize`: NaN -> 0
    if (lo >= size - 1) {
        a.lo = a.hi = size - 1;
        c = (double)(size - 1);
    } else {
        a.lo = lo;
        a.hi = lo + 1;
    }
    const double frac = c - a.lo;
    a.whi = frac;
    a.wlo = 1.0 - frac;
    return a;
}

// Sample (iy, ix) of bin (ph, pw): position y0 + ph bin_h + (iy + 0.5) bin_h / gh (f64, the
// CPU kernel's order of operations).
__device__ __forceinline__ double roi_pos(double start, int p, double bin, int i, int grid) {
    return start + det_mul_rn((double)p, bin) + ((double)i + 0.5) * bin / (double)grid;
}

// Element e of a row-major [R, C, oh, ow] output (or its gradient): box, channel, bin.
struct RoiElem {
    int r, c, ph, pw;
};
__device__ __forceinline__ RoiElem roi_elem(long long e, const RoiGeom& g) {
    RoiElem q;
    q.pw = (int)(e % g.ow);
    q.ph = (int)(e / g.ow % g.oh);
    q.c = (int)(e / ((long long)g.ow * g.oh) % g.channels);
    q.r = (int)(e / ((long long)g.ow * g.oh * g.channels));
    return q;
}

// Forward: one thread per output element (r, c, ph, pw) of [R, C, oh, ow].
template <class T>
__device__ void roi_align_fwd_impl(const T* __restrict__ boxes, const int* __restrict__ levels, T* __restrict__ out,
                                   RoiGeom g) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)g.boxes * g.channels * g.oh * g.ow) return;
    const RoiElem q = roi_elem(e, g);
    const int pw = q.pw, ph = q.ph, c = q.c, level = levels[q.r];
    const RoiBox k = roi_box(boxes, q.r, level, g);
    const T* plane = reinterpret_cast<const T*>(g.maps[level]) + (long long)c * k.h * k.w;
    float acc = 0.0f;
    for (int iy = 0; iy < k.gh; ++iy) {
        const RoiTaps ty = roi_taps(roi_pos(k.y0, ph, k.bin_h, iy, k.gh), k.h);
        for (int ix = 0; ix < k.gw; ++ix) {
            const RoiTaps tx = roi_taps(roi_pos(k.x0, pw, k.bin_w, ix, k.gw), k.w);
            const bool ok = ty.ok && tx.ok;
            const int lo = ok ? ty.lo * k.w : 0, hi = ok ? ty.hi * k.w : 0;
            const int xl = ok ? tx.lo : 0, xh = ok ? tx.hi : 0;
            const float w00 = ok ? (float)(ty.wlo * tx.wlo) : 0.0f, w01 = ok ? (float)(ty.wlo * tx.whi) : 0.0f;
            const float w10 = ok ? (float)(ty.whi * tx.wlo) : 0.0f, w11 = ok ? (float)(ty.whi * tx.whi) : 0.0f;
            acc += w00 * to_f32(plane[lo + xl]) + w01 * to_f32(plane[lo + xh]) + w10 * to_f32(plane[hi + xl]) +
                   w11 * to_f32(plane[hi + xh]);
        }
    }
    out[e] = from_f32<T>(acc / k.count);
}

// Backward: one thread per element of dy [R, C, oh, ow]; each tap of each sample gets
// weight * dy / count (formed in f64 and rounded once, as the CPU kernel) by atomicAdd into
// the f32 gradient of the box's level. Exact zeros are not added.
template <class T>
__device__ void roi_align_bwd_impl(const T* __restrict__ boxes, const int* __restrict__ levels,
                                   const T* __restrict__ dy, RoiGeom g) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)g.boxes * g.channels * g.oh * g.ow) return;
    const RoiElem q = roi_elem(e, g);
    const int pw = q.pw, ph = q.ph, c = q.c, level = levels[q.r];
    const RoiBox k = roi_box(boxes, q.r, level, g);
    float* plane = reinterpret_cast<float*>(g.maps[level]) + (long long)c * k.h * k.w;
    const double gv = (double)to_f32(dy[e]) / (double)k.count;
    for (int iy = 0; iy < k.gh; ++iy) {
        const RoiTaps ty = roi_taps(roi_pos(k.y0, ph, k.bin_h, iy, k.gh), k.h);
        for (int ix = 0; ix < k.gw; ++ix) {
            const RoiTaps tx = roi_taps(roi_pos(k.x0, pw, k.bin_w, ix, k.gw), k.w);
            const bool ok = ty.ok && tx.ok;
            const int lo = ok ? ty.lo * k.w : 0, hi = ok ? ty.hi * k.w : 0;
            const int xl = ok ? tx.lo : 0, xh = ok ? tx.hi : 0;
            const int offs[4] = {lo + xl, lo + xh, hi + xl, hi + xh};
            const double wts[4] = {ty.wlo * tx.wlo, ty.wlo * tx.whi, ty.whi * tx.wlo, ty.whi * tx.whi};
            for (int q = 0; q < 4; ++q) {
                const float v = (float)((ok ? wts[q] : 0.0) * gv);
                if (v != 0.0f) atomicAdd(plane + offs[q], v);
            }
        }
    }
}

// ------------------------------------------------------------------------------- entry points

#define DET_ENTRY(T, S)                                                                                            \
    extern "C" __global__ void top_k_##S(const T* x, T* values, long long* indices, TopKGeom g) {                 \
        topk_row<T>(x, values, indices, g);                                                                        \
    }                                                                                                              \
    extern "C" __global__ void top_k_hist_##S(const T* x, const TopKState* state, unsigned* hist, TopKGeom g,     \
                                              int pass) {                                                          \
        topk_hist_impl<T>(x, state, hist, g, pass);                                                                \
    }                                                                                                              \
    extern "C" __global__ void top_k_compact_##S(const T* x, TopKState* state, unsigned* cand, TopKGeom g) {      \
        topk_compact_impl<T>(x, state, cand, g);                                                                   \
    }                                                                                                              \
    extern "C" __global__ void top_k_sort_##S(const T* x, const unsigned* cand, T* values, long long* indices,     \
                                              TopKGeom g) {                                                        \
        topk_sort_impl<T>(x, cand, values, indices, g);                                                            \
    }                                                                                                              \
    extern "C" __global__ void nms_candidates_##S(const T* scores, const unsigned char* valid,                   \
                                                  unsigned long long* keys, unsigned* state, NmsGeom g) {          \
        nms_candidates_impl<T>(scores, valid, keys, state, g);                                                     \
    }                                                                                                              \
    extern "C" __global__ void nms_sort_##S(const T* boxes, const long long* groups,                              \
                                            const unsigned long long* keys, const unsigned* state,                 \
                                            float* sorted_boxes, long long* sorted_groups, unsigned* order,        \
                                            NmsGeom g) {                                                           \
        nms_sort_impl<T>(boxes, groups, keys, state, sorted_boxes, sorted_groups, order, g);                       \
    }                                                                                                              \
    extern "C" __global__ void roi_levels_##S(const T* boxes, int* levels, RoiGeom g) {                           \
        roi_levels_impl<T>(boxes, levels, g);                                                                      \
    }                                                                                                              \
    extern "C" __global__ void roi_align_fwd_##S(const T* boxes, const int* levels, T* out, RoiGeom g) {          \
        roi_align_fwd_impl<T>(boxes, levels, out, g);                                                              \
    }                                                                                                              \
    extern "C" __global__ void roi_align_bwd_##S(const T* boxes, const int* levels, const T* dy, RoiGeom g) {     \
        roi_align_bwd_impl<T>(boxes, levels, dy, g);                                                               \
    }                                                                                                              \
    extern "C" __global__ void box_decode_##S(const T* deltas, const T* boxes, T* out, BoxGeom g) {                \
        det_box_decode<T>(deltas, boxes, out, g);                                                                  \
    }                                                                                                              \
    extern "C" __global__ void clip_boxes_##S(const T* boxes, T* out, BoxGeom g) { det_clip_boxes<T>(boxes, out, g); }
VITDET_FOR_EACH_FLOAT(DET_ENTRY)

extern "C" __global__ void top_k_pick(TopKState* state, unsigned* hist, TopKGeom g, int pass) {
    topk_pick_impl(state, hist, g, pass);
}

extern "C" __global__ void nms_mask(const float* sorted_boxes, const long long* sorted_groups, const unsigned* state,
                                    unsigned long long* mask, NmsGeom g, int row0) {
    nms_mask_impl(sorted_boxes, sorted_groups, state, mask, g, row0);
}

extern "C" __global__ void nms_scan(const unsigned* order, unsigned* state, const unsigned long long* mask,
                                    unsigned long long* removed, long long* keep, unsigned char* keep_valid, NmsGeom g,
                                    int row0) {
    nms_scan_impl(order, state, mask, removed, keep, keep_valid, g, row0);
}
