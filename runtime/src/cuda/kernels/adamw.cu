// Fused AdamW: every parameter of a training step updated in one launch (multi-tensor apply),
// with exactly the f32 arithmetic of the runtime's op-by-op update (runtime/src/optim/adamw.rs,
// torch.optim.AdamW's single-tensor path): each line below is one rounded f32 operation in the
// same order, never contracted into a fused multiply-add, so the result is bit for bit the CPU
// update's. The `+ 0.0f` terms are the `affine(a, 0)` of that update (they turn -0 into +0).
//
// A device table holds one entry per parameter: its buffers (parameter, gradient, moments; the
// moments null on a parameter's first step, read as zeros), length and this step's scalars.
// The parameters are cut into chunks of `chunk` elements, numbered across the table (entry k's
// chunks start at `first_chunk`); blocks stride over that flattened chunk list, find the owner
// of a chunk by binary search, and their threads stride through it (coalesced). Master
// weights, gradients and moments are f32; results go to separate output buffers.

struct AdamWTensor {
    const float* p;
    const float* g;
    const float* m;  // null: first step, zero moments
    const float* v;
    float* p_out;
    float* m_out;
    float* v_out;
    long long len;
    long long first_chunk;
    float decay;                  // (1 - lr * wd) as f32
    int has_decay;                // wd != 0 (PyTorch skips the multiply otherwise)
    float neg_step_size;          // -(lr / (1 - beta1^t)) as f32
    float bias_correction2_sqrt;  // (1 - beta2^t)^0.5 as f32
};

struct AdamWStep {
    int tensors;
    int chunk;           // elements per chunk
    long long chunks;    // chunks of all tensors
    float w;             // lerp weight (1 - beta1) as f32
    float one_minus_w;   // 1 - w, in f32
    int lerp_low;        // |w| < 0.5: m + w (g - m); else g - (g - m)(1 - w)
    float beta2;
    float one_minus_beta2;  // (1 - beta2) as f32
    float eps;
};

// One correctly rounded f32 operation each.
__device__ __forceinline__ float adamw_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float adamw_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float adamw_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float adamw_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float adamw_sqrt(float a) { return __fsqrt_rn(a); }

// The table entry owning chunk `c`: the last whose first chunk is <= c (an empty tensor shares
// its first chunk with the next entry, which therefore wins).
__device__ __forceinline__ int adamw_owner(const AdamWTensor* table, int tensors, long long c) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table[mid].first_chunk <= c) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void adamw_step(const AdamWTensor* __restrict__ table, AdamWStep s) {
    for (long long c = blockIdx.x; c < s.chunks; c += gridDim.x) {
        const AdamWTensor e = table[adamw_owner(table, s.tensors, c)];
        const long long start = (c - e.first_chunk) * s.chunk;
        const long long end = start + s.chunk < e.len ? start + s.chunk : e.len;
        const float* __restrict__ p_in = e.p;
        const float* __restrict__ g_in = e.g;
        const float* __restrict__ m_in = e.m;
        const float* __restrict__ v_in = e.v;
        float* __restrict__ p_out = e.p_out;
        float* __restrict__ m_out = e.m_out;
        float* __restrict__ v_out = e.v_out;
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float g = g_in[i];
            float p = p_in[i];
            float m = m_in ? m_in[i] : 0.0f;
            float v = v_in ? v_in[i] : 0.0f;
            // p *= 1 - lr * wd
            if (e.has_decay) p = adamw_add(adamw_mul(p, e.decay), 0.0f);
            // m = lerp(m, g, 1 - beta1)
            const float diff = adamw_sub(g, m);
            if (s.lerp_low) m = adamw_add(adamw_add(adamw_mul(diff, s.w), 0.0f), m);
            else m = adamw_sub(g, adamw_add(adamw_mul(diff, s.one_minus_w), 0.0f));
            // v = v * beta2 + ((1 - beta2) * g) * g
            const float gg = adamw_mul(adamw_add(adamw_mul(g, s.one_minus_beta2), 0.0f), g);
            v = adamw_add(adamw_add(adamw_mul(v, s.beta2), 0.0f), gg);
            // p += (-step_size * m) / (sqrt(v) / sqrt(1 - beta2^t) + eps)
            const float denom = adamw_add(adamw_div(adamw_sqrt(v), e.bias_correction2_sqrt), s.eps);
            p = adamw_add(adamw_div(adamw_add(adamw_mul(m, e.neg_step_size), 0.0f), denom), p);
            p_out[i] = p;
            m_out[i] = m;
            v_out[i] = v;
        }
    }
}
