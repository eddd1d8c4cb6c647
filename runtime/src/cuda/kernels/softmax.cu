// Softmax along one axis and its backward (vitdet_ir::ops::Softmax, SoftmaxGrad), on a
// contiguous tensor seen as [outer, n, inner] with `n` the softmax axis. Every storage type
// is computed in f32 and rounded once on the store.
//
// Last axis (inner == 1; the attention rows of 196 or 4096): one block per row, blocks
// striding over rows, the block's threads striding along the row so loads coalesce. The
// forward keeps a per-thread online (max, sum of exp) pair and merges the pairs in shared
// memory, so `x` is read twice (statistics, output) rather than three times; the backward
// reduces the row's dot(y, dy) the same way, then writes. Other axes: one thread per
// (outer, inner) column walking the axis with stride `inner` (neighbouring threads read
// neighbouring columns, so those loads coalesce as well).
//
// The row kernels take a power-of-two block of at most SOFTMAX_MAX_THREADS threads (the tree
// reductions halve it).

#define SOFTMAX_MAX_THREADS 256

struct SoftmaxDims {
    long long outer;
    long long n;  // the softmax axis
    long long inner;
};

// Adds `x` to a running (max m, sum s of exp(. - m)) pair. -inf adds nothing (so an all -inf
// row keeps (-inf, 0) and yields 0/0 = NaN, as exp(x - max) / sum does); NaN poisons `s`.
__device__ __forceinline__ void softmax_online_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else if (x != VITDET_NEG_INF) {
        s += expf(x - m);
    }
}

// Merges the pair (m2, s2) into (m, s).
__device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == VITDET_NEG_INF) return;  // both empty
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// Sum of one value per thread of the block, returned to every thread. `red` holds
// blockDim.x floats and is free again when this returns.
__device__ __forceinline__ float softmax_block_sum(float v, float* red) {
    const int t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) red[t] += red[t + half];
        __syncthreads();
    }
    const float total = red[0];
    __syncthreads();
    return total;
}

// Forward over the last axis: grid-stride over the `outer` rows of `n` elements.
template <class T>
__device__ void softmax_rows(const T* __restrict__ x, T* __restrict__ y, SoftmaxDims d) {
    __shared__ float red_m[SOFTMAX_MAX_THREADS];
    __shared__ float red_s[SOFTMAX_MAX_THREADS];
    const int n = (int)d.n, t = threadIdx.x;
    for (long long row = blockIdx.x; row < d.outer; row += gridDim.x) {
        const T* xr = x + row * d.n;
        T* yr = y + row * d.n;
        float m = VITDET_NEG_INF, s = 0.0f;
        for (int j = t; j < n; j += blockDim.x) softmax_online_add(m, s, to_f32(xr[j]));
        red_m[t] = m;
        red_s[t] = s;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half /= 2) {
            if (t < half) softmax_merge(red_m[t], red_s[t], red_m[t + half], red_s[t + half]);
            __syncthreads();
        }
        const float mx = red_m[0], sum = red_s[0];
        __syncthreads();  // red_* are rewritten for the next row
        for (int j = t; j < n; j += blockDim.x) yr[j] = from_f32<T>(expf(to_f32(xr[j]) - mx) / sum);
    }
}

// Forward over an inner axis: one thread per (outer, inner) column.
template <class T>
__device__ void softmax_cols(const T* __restrict__ x, T* __restrict__ y, SoftmaxDims d) {
    const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d.outer * d.inner) return;
    const long long o = col / d.inner, i = col % d.inner;
    const T* xc = x + o * d.n * d.inner + i;
    T* yc = y + o * d.n * d.inner + i;
    float m = VITDET_NEG_INF, s = 0.0f;
    for (long long j = 0; j < d.n; ++j) softmax_online_add(m, s, to_f32(xc[j * d.inner]));
    for (long long j = 0; j < d.n; ++j) yc[j * d.inner] = from_f32<T>(expf(to_f32(xc[j * d.inner]) - m) / s);
}

// Backward over the last axis: dx = y * (dy - dot(y, dy)) per row.
template <class T>
__device__ void softmax_grad_rows(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                                  SoftmaxDims d) {
    __shared__ float red[SOFTMAX_MAX_THREADS];
    const int n = (int)d.n, t = threadIdx.x;
    for (long long row = blockIdx.x; row < d.outer; row += gridDim.x) {
        const long long base = row * d.n;
        float part = 0.0f;
        for (int j = t; j < n; j += blockDim.x) part += to_f32(y[base + j]) * to_f32(dy[base + j]);
        const float dot = softmax_block_sum(part, red);
        for (int j = t; j < n; j += blockDim.x) {
            const float yj = to_f32(y[base + j]);
            dx[base + j] = from_f32<T>(yj * (to_f32(dy[base + j]) - dot));
        }
    }
}

// Backward over an inner axis: one thread per (outer, inner) column.
template <class T>
__device__ void softmax_grad_cols(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                                  SoftmaxDims d) {
    const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d.outer * d.inner) return;
    const long long base = (col / d.inner) * d.n * d.inner + col % d.inner;
    float dot = 0.0f;
    for (long long j = 0; j < d.n; ++j) {
        const long long e = base + j * d.inner;
        dot += to_f32(y[e]) * to_f32(dy[e]);
    }
    for (long long j = 0; j < d.n; ++j) {
        const long long e = base + j * d.inner;
        dx[e] = from_f32<T>(to_f32(y[e]) * (to_f32(dy[e]) - dot));
    }
}

#define SOFTMAX_ENTRY(T, S)                                                                                \
    extern "C" __global__ void softmax_rows_##S(const T* x, T* y, SoftmaxDims d) {                         \
        softmax_rows<T>(x, y, d);                                                                          \
    }                                                                                                      \
    extern "C" __global__ void softmax_cols_##S(const T* x, T* y, SoftmaxDims d) {                         \
        softmax_cols<T>(x, y, d);                                                                          \
    }                                                                                                      \
    extern "C" __global__ void softmax_grad_rows_##S(const T* y, const T* dy, T* dx, SoftmaxDims d) {      \
        softmax_grad_rows<T>(y, dy, dx, d);                                                                \
    }                                                                                                      \
    extern "C" __global__ void softmax_grad_cols_##S(const T* y, const T* dy, T* dx, SoftmaxDims d) {      \
        softmax_grad_cols<T>(y, dy, dx, d);                                                                \
    }
VITDET_FOR_EACH_FLOAT(SOFTMAX_ENTRY)
