// Normalization kernels: layer norm over any axis, group norm, batch norm (inference and
// training) and their backwards. The input is viewed as [outer, c, inner], c the channel axis
// (the normalized axis of layer norm, the affine's length). All arithmetic is f32; half inputs
// are read as f32 and each output is rounded once.
//
// Statistics groups:
// * segments: contiguous runs of (c / groups) * inner values, one per (outer, group): group
//   norm, and layer norm over an axis with inner == 1 (groups == 1, a segment is one row);
// * positions: layer norm over a strided axis (inner > 1), one group per (outer, inner) position,
//   its c values inner apart;
// * channels: batch norm, one group per channel over outer and inner.
// Mean and biased variance are taken in two passes, as the CPU kernels do.

// Parameters of every normalization kernel (`NormGeom` in cuda/norm.rs).
struct NormGeom {
    int outer;
    int c;
    int inner;
    int groups;        // group norm's groups; 1 for layer and batch norm
    int per_position;  // 1: layer norm over a strided axis (statistics per (outer, inner) position)
    float eps;
    float momentum;  // batch_norm_train's running-statistics momentum
};

// Largest block of the block-reduced kernels (their launches use powers of two up to this).
#define NORM_MAX_THREADS 1024
// Block of the one-thread-per-item kernels.
#define NORM_THREADS 256

// Sums each of v[0..K) over the block, every thread receiving the totals (blockDim.x a power
// of two from 32 to NORM_MAX_THREADS; every thread of the block must call it). Each warp sums
// its lanes with xor shuffles, then every thread adds the warps' partials in the same order,
// so all get the same bits: two barriers per call, where a tree over shared memory takes one
// per level.
template <int K>
__device__ __forceinline__ void norm_block_sum(float (&v)[K]) {
    __shared__ float partial[K][NORM_MAX_THREADS / 32];
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int k = 0; k < K; ++k)
        for (int m = 16; m > 0; m >>= 1) v[k] += shfl_xor(v[k], m);
    if (threadIdx.x % 32 == 0)
        for (int k = 0; k < K; ++k) partial[k][warp] = v[k];
    __syncthreads();
    for (int k = 0; k < K; ++k) {
        float total = 0.0f;
        for (int i = 0; i < warps; ++i) total += partial[k][i];
        v[k] = total;
    }
    __syncthreads();  // everyone has read the totals before a next call overwrites them
}

// Mean and 1 / sqrt(biased variance + eps) of the `len` contiguous values at `x`, reduced
// over the block (every thread gets them).
template <class T>
__device__ __forceinline__ void norm_block_stats(const T* x, long len, float eps, float& mean, float& rstd) {
    float s[1] = {0.0f};
    for (long k = threadIdx.x; k < len; k += blockDim.x) s[0] += to_f32(x[k]);
    norm_block_sum<1>(s);
    mean = s[0] / (float)len;
    float q[1] = {0.0f};
    for (long k = threadIdx.x; k < len; k += blockDim.x) {
        const float d = to_f32(x[k]) - mean;
        q[0] += d * d;
    }
    norm_block_sum<1>(q);
    rstd = rsqrtf(q[0] / (float)len + eps);
}

// The channel of element k of segment `seg`.
__device__ __forceinline__ int norm_segment_channel(const NormGeom& g, long seg, long k) {
    const int cg = g.c / g.groups;
    return (int)(seg % g.groups) * cg + (int)(g.inner == 1 ? k : k / g.inner);
}

// Forward over segments: one block per segment, grid outer * groups.
template <class T>
__device__ void norm_segments_fwd(const T* x, const T* w, const T* b, T* y, NormGeom g) {
    const long seg = blockIdx.x;
    const long len = (long)(g.c / g.groups) * g.inner;
    const T* xs = x + seg * len;
    T* ys = y + seg * len;
    float mean, rstd;
    norm_block_stats(xs, len, g.eps, mean, rstd);
    for (long k = threadIdx.x; k < len; k += blockDim.x) {
        const int ch = norm_segment_channel(g, seg, k);
        ys[k] = from_f32<T>((to_f32(xs[k]) - mean) * rstd * to_f32(w[ch]) + to_f32(b[ch]));
    }
}

// Mean and rstd over the c values of position p = (o, i) (thread-local; reads are coalesced
// across the threads of consecutive positions).
template <class T>
__device__ __forceinline__ void norm_position_stats(const T* xp, const NormGeom& g, float& mean, float& rstd) {
    float s = 0.0f;
    for (int ch = 0; ch < g.c; ++ch) s += to_f32(xp[(long)ch * g.inner]);
    mean = s / (float)g.c;
    float q = 0.0f;
    for (int ch = 0; ch < g.c; ++ch) {
        const float d = to_f32(xp[(long)ch * g.inner]) - mean;
        q += d * d;
    }
    rstd = rsqrtf(q / (float)g.c + g.eps);
}

// Forward over positions (layer norm over a strided axis): one thread per (outer, inner)
// position, NORM_THREADS-thread blocks covering outer * inner.
template <class T>
__device__ void norm_positions_fwd(const T* x, const T* w, const T* b, T* y, NormGeom g) {
    const long p = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= (long)g.outer * g.inner) return;
    const long base = p / g.inner * g.c * g.inner + p % g.inner;
    float mean, rstd;
    norm_position_stats(x + base, g, mean, rstd);
    for (int ch = 0; ch < g.c; ++ch) {
        const long e = base + (long)ch * g.inner;
        y[e] = from_f32<T>((to_f32(x[e]) - mean) * rstd * to_f32(w[ch]) + to_f32(b[ch]));
    }
}

// Backward over segments: dx = rstd * (gr - mean(gr) - xhat * mean(gr * xhat)), gr = dy * w,
// and the segment's mean and rstd for norm_affine_grad. One block per segment.
template <class T>
__device__ void norm_segments_bwd(const T* x, const T* w, const T* dy, T* dx, float* mean_out, float* rstd_out,
                                  NormGeom g) {
    const long seg = blockIdx.x;
    const long len = (long)(g.c / g.groups) * g.inner;
    const long off = seg * len;
    float mean, rstd;
    norm_block_stats(x + off, len, g.eps, mean, rstd);
    float s[2] = {0.0f, 0.0f};
    for (long k = threadIdx.x; k < len; k += blockDim.x) {
        const float gr = to_f32(dy[off + k]) * to_f32(w[norm_segment_channel(g, seg, k)]);
        s[0] += gr;
        s[1] += gr * (to_f32(x[off + k]) - mean) * rstd;
    }
    norm_block_sum<2>(s);
    const float mg = s[0] / (float)len, mgx = s[1] / (float)len;
    for (long k = threadIdx.x; k < len; k += blockDim.x) {
        const float gr = to_f32(dy[off + k]) * to_f32(w[norm_segment_channel(g, seg, k)]);
        const float xh = (to_f32(x[off + k]) - mean) * rstd;
        dx[off + k] = from_f32<T>(rstd * (gr - mg - xh * mgx));
    }
    if (threadIdx.x == 0) {
        mean_out[seg] = mean;
        rstd_out[seg] = rstd;
    }
}

// Backward over positions, as norm_segments_bwd with one thread per (outer, inner) position;
// stores each position's mean and rstd for norm_affine_grad.
template <class T>
__device__ void norm_positions_bwd(const T* x, const T* w, const T* dy, T* dx, float* mean_out, float* rstd_out,
                                   NormGeom g) {
    const long p = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= (long)g.outer * g.inner) return;
    const long base = p / g.inner * g.c * g.inner + p % g.inner;
    float mean, rstd;
    norm_position_stats(x + base, g, mean, rstd);
    float sg = 0.0f, sgx = 0.0f;
    for (int ch = 0; ch < g.c; ++ch) {
        const long e = base + (long)ch * g.inner;
        const float gr = to_f32(dy[e]) * to_f32(w[ch]);
        sg += gr;
        sgx += gr * (to_f32(x[e]) - mean) * rstd;
    }
    const float mg = sg / (float)g.c, mgx = sgx / (float)g.c;
    for (int ch = 0; ch < g.c; ++ch) {
        const long e = base + (long)ch * g.inner;
        const float gr = to_f32(dy[e]) * to_f32(w[ch]);
        const float xh = (to_f32(x[e]) - mean) * rstd;
        dx[e] = from_f32<T>(rstd * (gr - mg - xh * mgx));
    }
    mean_out[p] = mean;
    rstd_out[p] = rstd;
}

// Index into the statistics of element (o, ch, i): per position, or per segment.
__device__ __forceinline__ long norm_stat_index(const NormGeom& g, long o, int ch, long i) {
    return g.per_position ? o * g.inner + i : o * g.groups + ch / (g.c / g.groups);
}

// dweight = sum(dy * xhat), dbias = sum(dy) over every axis but c, for inner == 1: grid
// (ceil(c / blockDim.x), chunks), a thread per channel summing the rows of its block's chunk
// (consecutive threads read consecutive channels), then one atomicAdd per chunk into the
// zero-filled f32 dw, db.
template <class T>
__device__ void norm_affine_grad_rows(const T* x, const T* dy, const float* mean, const float* rstd, float* dw,
                                      float* db, NormGeom g) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= g.c) return;
    const long rows_per_chunk = ((long)g.outer + gridDim.y - 1) / gridDim.y;
    const long r0 = (long)blockIdx.y * rows_per_chunk;
    const long r1 = r0 + rows_per_chunk < g.outer ? r0 + rows_per_chunk : g.outer;
    float sdx = 0.0f, sd = 0.0f;
    for (long r = r0; r < r1; ++r) {
        const long e = r * g.c + ch;
        const long s = norm_stat_index(g, r, ch, 0);
        const float d = to_f32(dy[e]);
        sdx += d * (to_f32(x[e]) - mean[s]) * rstd[s];
        sd += d;
    }
    if (r0 < r1) {
        atomicAdd(&dw[ch], sdx);
        atomicAdd(&db[ch], sd);
    }
}

// The same sums for inner > 1: one block per (outer, channel) plane of inner contiguous
// values (grid outer * c), reduced over the block, one atomicAdd per plane.
template <class T>
__device__ void norm_affine_grad_planes(const T* x, const T* dy, const float* mean, const float* rstd, float* dw,
                                        float* db, NormGeom g) {
    const long plane = blockIdx.x;
    const long o = plane / g.c;
    const int ch = (int)(plane % g.c);
    const long off = plane * g.inner;
    float s[2] = {0.0f, 0.0f};
    for (long i = threadIdx.x; i < g.inner; i += blockDim.x) {
        const long st = norm_stat_index(g, o, ch, i);
        const float d = to_f32(dy[off + i]);
        s[0] += d * (to_f32(x[off + i]) - mean[st]) * rstd[st];
        s[1] += d;
    }
    norm_block_sum<2>(s);
    if (threadIdx.x == 0) {
        atomicAdd(&dw[ch], s[0]);
        atomicAdd(&db[ch], s[1]);
    }
}

// Inference batch norm, as PyTorch's CPU kernel: alpha = w / sqrt(var + eps),
// beta = b - mean * alpha, y = x * alpha + beta. One thread per element.
template <class T>
__device__ void norm_batch_fwd(const T* x, const T* w, const T* b, const T* rmean, const T* rvar, T* y,
                               NormGeom g) {
    const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long)g.outer * g.c * g.inner) return;
    const int ch = (int)(e / g.inner % g.c);
    const float alpha = to_f32(w[ch]) / sqrtf(to_f32(rvar[ch]) + g.eps);
    const float beta = to_f32(b[ch]) - to_f32(rmean[ch]) * alpha;
    y[e] = from_f32<T>(to_f32(x[e]) * alpha + beta);
}

// The k-th of the outer * inner values of channel ch.
__device__ __forceinline__ long norm_channel_elem(const NormGeom& g, int ch, long k) {
    return (k / g.inner * g.c + ch) * g.inner + k % g.inner;
}

// Mean and rstd of channel ch over outer and inner, reduced over the block.
template <class T>
__device__ __forceinline__ void norm_channel_stats(const T* x, const NormGeom& g, int ch, float& mean, float& var,
                                                   float& rstd) {
    const long m = (long)g.outer * g.inner;
    float s[1] = {0.0f};
    for (long k = threadIdx.x; k < m; k += blockDim.x) s[0] += to_f32(x[norm_channel_elem(g, ch, k)]);
    norm_block_sum<1>(s);
    mean = s[0] / (float)m;
    float q[1] = {0.0f};
    for (long k = threadIdx.x; k < m; k += blockDim.x) {
        const float d = to_f32(x[norm_channel_elem(g, ch, k)]) - mean;
        q[0] += d * d;
    }
    norm_block_sum<1>(q);
    var = q[0] / (float)m;
    rstd = rsqrtf(var + g.eps);
}

// Training batch norm: y with the batch statistics of each channel, and the running
// statistics (1 - momentum) * old + momentum * batch, the variance unbiased. One block per
// channel (grid c).
template <class T>
__device__ void norm_batch_train_fwd(const T* x, const T* w, const T* b, const T* rmean, const T* rvar, T* y,
                                     T* new_rmean, T* new_rvar, NormGeom g) {
    const int ch = blockIdx.x;
    const long m = (long)g.outer * g.inner;
    float mean, var, rstd;
    norm_channel_stats(x, g, ch, mean, var, rstd);
    const float scale = rstd * to_f32(w[ch]), shift = to_f32(b[ch]);
    for (long k = threadIdx.x; k < m; k += blockDim.x) {
        const long e = norm_channel_elem(g, ch, k);
        y[e] = from_f32<T>((to_f32(x[e]) - mean) * scale + shift);
    }
    if (threadIdx.x == 0) {
        const float keep = 1.0f - g.momentum;
        const float unbiased = var * ((float)m / (float)(m - 1));
        new_rmean[ch] = from_f32<T>(keep * to_f32(rmean[ch]) + g.momentum * mean);
        new_rvar[ch] = from_f32<T>(keep * to_f32(rvar[ch]) + g.momentum * unbiased);
    }
}

// Training batch norm backward: one block per channel; dw = sum(dy * xhat), db = sum(dy) (f32,
// written once per channel) are also what dx's means need.
template <class T>
__device__ void norm_batch_train_bwd(const T* x, const T* w, const T* dy, T* dx, float* dw, float* db, NormGeom g) {
    const int ch = blockIdx.x;
    const long m = (long)g.outer * g.inner;
    float mean, var, rstd;
    norm_channel_stats(x, g, ch, mean, var, rstd);
    float s[2] = {0.0f, 0.0f};
    for (long k = threadIdx.x; k < m; k += blockDim.x) {
        const long e = norm_channel_elem(g, ch, k);
        const float d = to_f32(dy[e]);
        s[0] += d * (to_f32(x[e]) - mean) * rstd;
        s[1] += d;
    }
    norm_block_sum<2>(s);
    const float wc = to_f32(w[ch]);
    const float mg = wc * s[1] / (float)m, mgx = wc * s[0] / (float)m;
    for (long k = threadIdx.x; k < m; k += blockDim.x) {
        const long e = norm_channel_elem(g, ch, k);
        const float xh = (to_f32(x[e]) - mean) * rstd;
        dx[e] = from_f32<T>(rstd * (to_f32(dy[e]) * wc - mg - xh * mgx));
    }
    if (threadIdx.x == 0) {
        dw[ch] = s[0];
        db[ch] = s[1];
    }
}

#define NORM_ENTRY(T, S)                                                                                          \
    extern "C" __global__ void norm_segments_fwd_##S(const T* x, const T* w, const T* b, T* y, NormGeom g) {      \
        norm_segments_fwd<T>(x, w, b, y, g);                                                                      \
    }                                                                                                             \
    extern "C" __global__ void norm_positions_fwd_##S(const T* x, const T* w, const T* b, T* y, NormGeom g) {     \
        norm_positions_fwd<T>(x, w, b, y, g);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void norm_segments_bwd_##S(const T* x, const T* w, const T* dy, T* dx, float* mean,    \
                                                     float* rstd, NormGeom g) {                                   \
        norm_segments_bwd<T>(x, w, dy, dx, mean, rstd, g);                                                        \
    }                                                                                                             \
    extern "C" __global__ void norm_positions_bwd_##S(const T* x, const T* w, const T* dy, T* dx, float* mean,   \
                                                      float* rstd, NormGeom g) {                                  \
        norm_positions_bwd<T>(x, w, dy, dx, mean, rstd, g);                                                       \
    }                                                                                                             \
    extern "C" __global__ void norm_affine_grad_rows_##S(const T* x, const T* dy, const float* mean,             \
                                                         const float* rstd, float* dw, float* db, NormGeom g) {   \
        norm_affine_grad_rows<T>(x, dy, mean, rstd, dw, db, g);                                                   \
    }                                                                                                             \
    extern "C" __global__ void norm_affine_grad_planes_##S(const T* x, const T* dy, const float* mean,           \
                                                           const float* rstd, float* dw, float* db, NormGeom g) { \
        norm_affine_grad_planes<T>(x, dy, mean, rstd, dw, db, g);                                                 \
    }                                                                                                             \
    extern "C" __global__ void norm_batch_fwd_##S(const T* x, const T* w, const T* b, const T* rmean,            \
                                                  const T* rvar, T* y, NormGeom g) {                              \
        norm_batch_fwd<T>(x, w, b, rmean, rvar, y, g);                                                            \
    }                                                                                                             \
    extern "C" __global__ void norm_batch_train_fwd_##S(const T* x, const T* w, const T* b, const T* rmean,      \
                                                        const T* rvar, T* y, T* new_rmean, T* new_rvar,           \
                                                        NormGeom g) {                                             \
        norm_batch_train_fwd<T>(x, w, b, rmean, rvar, y, new_rmean, new_rvar, g);                                 \
    }                                                                                                             \
    extern "C" __global__ void norm_batch_train_bwd_##S(const T* x, const T* w, const T* dy, T* dx, float* dw,   \
                                                        float* db, NormGeom g) {                                  \
        norm_batch_train_bwd<T>(x, w, dy, dx, dw, db, g);                                                         \
    }
VITDET_FOR_EACH_FLOAT(NORM_ENTRY)
