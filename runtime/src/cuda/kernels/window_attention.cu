// Fused windowed attention (vitdet_ir::ops::WindowAttention), flash-attention style: one
// thread owns one query row (forward, dq pass) or one key row (dk/dv pass) and streams the
// other side through shared-memory tiles, so neither the [heads, N, N] logits nor the
// probabilities are ever stored. The window partition, the padding (padded tokens' q, k, v
// are the qkv bias, or zero) and the unpartition + crop are folded into the indexing: every
// kernel reads `qkv [B, H, W, 3C]` and writes `[B, H, W, C]` directly.
//
// The decomposed relative-position term (detectron2) enters as per-row tables
// relh [rows, wh] = q . rh and relw [rows, ww] = q . rw, rows = (window, head, query), built
// by `window_attention_rel_tables`: the logit of (i, j) adds relh[i, y_j] + relw[i, x_j].
// The BEiT bias is read from its [heads, N, N] input.
//
// Compile-time constants: HD (head dim, so per-thread rows stay in registers); WIN_MAX
// (largest window side the decomposed-gradient rows hold).

#ifndef WIN_MAX
#define WIN_MAX 64
#endif
#define BQ 128  // threads (rows) per block
#define BK 32   // keys per shared tile in the forward and dq passes
#define QT 16   // queries per shared tile in the dk/dv pass

struct WinGeom {
    int batch, h, w;         // unpadded token grid
    int wh, ww;              // window
    int gh, gw;              // windows along each axis
    int heads, hd, channels; // channels = heads * hd
    float scale;
    int rel;                 // 0 none, 1 decomposed, 2 BEiT bias
    int has_bias;
};

struct Tok {
    int b, y, x, ly, lx;
    bool valid;  // an unpadded token
};

// Token `t` of window `w` (windows numbered batch-major, then row-major within the image).
__device__ __forceinline__ Tok token(const WinGeom& g, int w, int t) {
    const int nw = g.gh * g.gw;
    const int b = w / nw, wi = w % nw;
    Tok k;
    k.b = b;
    k.ly = t / g.ww;
    k.lx = t % g.ww;
    k.y = (wi / g.gw) * g.wh + k.ly;
    k.x = (wi % g.gw) * g.ww + k.lx;
    k.valid = k.y < g.h && k.x < g.w;
    return k;
}

// Index of the first element of a valid token's row in a [B, H, W, stride] tensor.
__device__ __forceinline__ long token_row(const WinGeom& g, const Tok& k, int stride) {
    return ((long)(k.b * g.h + k.y) * g.w + k.x) * stride;
}

// Element d of part (0 q, 1 k, 2 v) of head h for a token, padded tokens reading the bias.
template <class T>
__device__ __forceinline__ float head_elem(const T* qkv, const T* bias, const WinGeom& g, const Tok& k,
                                           int part, int h, int d) {
    const int c = part * g.channels + h * HD + d;
    if (k.valid) return to_f32(qkv[token_row(g, k, 3 * g.channels) + c]);
    return g.has_bias ? to_f32(bias[c]) : 0.0f;
}

// The relative-position term of logit (query i, key j) for (window, head) row `row`, key j at
// (ky, kx) = (j / ww, j % ww) in its window (callers that stream keys compute those once).
template <class T>
__device__ __forceinline__ float rel_logit_at(const WinGeom& g, const float* relh, const float* relw,
                                              const T* relbias, long row, int h, int i, int j, int ky, int kx) {
    if (g.rel == 1) return relh[row * g.wh + ky] + relw[row * g.ww + kx];
    if (g.rel == 2) {
        const long n = (long)g.wh * g.ww;
        return to_f32(relbias[((long)h * n + i) * n + j]);
    }
    return 0.0f;
}

template <class T>
__device__ __forceinline__ float rel_logit(const WinGeom& g, const float* relh, const float* relw,
                                           const T* relbias, long row, int h, int i, int j) {
    return rel_logit_at(g, relh, relw, relbias, row, h, i, j, j / g.ww, j % g.ww);
}

// Keys j0 .. j0 + nk of (window w, head h) into the shared K and V tiles, as f32.
template <class T>
__device__ __forceinline__ void load_kv_tile(const T* qkv, const T* bias, const WinGeom& g, int w, int h, int j0,
                                             int nk, float (*ks)[HD], float (*vs)[HD]) {
    for (int e = threadIdx.x; e < nk * HD; e += blockDim.x) {
        const int jj = e / HD, d = e % HD;
        const Tok kt = token(g, w, j0 + jj);
        ks[jj][d] = head_elem(qkv, bias, g, kt, 1, h, d);
        vs[jj][d] = head_elem(qkv, bias, g, kt, 2, h, d);
    }
}

// Forward. Grid (ceil(N / BQ), heads, windows), BQ threads. Writes `out` for unpadded queries
// and `lse [windows, heads, N]` (padded query rows untouched: the caller zero-fills).
template <class T>
__device__ void wa_fwd(const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,
                       T* out, float* lse, WinGeom g) {
    __shared__ float ks[BK][HD];
    __shared__ float vs[BK][HD];
    const int n = g.wh * g.ww;
    const int h = blockIdx.y, w = blockIdx.z;
    const int i = blockIdx.x * BQ + threadIdx.x;
    const Tok qt = token(g, w, i < n ? i : 0);
    const bool active = i < n && qt.valid;
    const long row = ((long)w * g.heads + h) * n + i;
    float q[HD], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        q[d] = active ? head_elem(qkv, bias, g, qt, 0, h, d) : 0.0f;
        acc[d] = 0.0f;
    }
    float m = VITDET_NEG_INF, l = 0.0f;
    for (int j0 = 0; j0 < n; j0 += BK) {
        const int nk = imin(BK, n - j0);
        load_kv_tile(qkv, bias, g, w, h, j0, nk, ks, vs);
        __syncthreads();
        if (active) {
            // Online softmax, one key at a time: the running maximum rarely changes after the
            // first keys, so the rescale is rare and no per-tile score array is kept.
            for (int jj = 0; jj < nk; ++jj) {
                float dot = 0.0f;
#pragma unroll
                for (int d = 0; d < HD; ++d) dot += q[d] * ks[jj][d];
                const float s = g.scale * dot + rel_logit(g, relh, relw, relbias, row, h, i, j0 + jj);
                if (s > m) {
                    const float corr = expf(m - s);
                    l *= corr;
#pragma unroll
                    for (int d = 0; d < HD; ++d) acc[d] *= corr;
                    m = s;
                }
                const float p = expf(s - m);
                l += p;
#pragma unroll
                for (int d = 0; d < HD; ++d) acc[d] += p * vs[jj][d];
            }
        }
        __syncthreads();
    }
    if (active) {
        T* o = out + token_row(g, qt, g.channels) + h * HD;
        const float inv = 1.0f / l;
#pragma unroll
        for (int d = 0; d < HD; ++d) o[d] = from_f32<T>(acc[d] * inv);
        lse[row] = m + logf(l);
    }
}

// Backward, query side. Same grid as the forward. For each unpadded query i it recomputes
// P = exp(logit - lse), with D_i = dout_i . out_i (stored in `dsum` for the key side):
// dS = P (dout_i . v_j - D_i), dq_i = scale sum_j dS k_j plus the decomposed term's
// sum_j dS (rh[y_i, y_j] + rw[x_i, x_j]); the decomposed rows' gradients go to drelh / drelw,
// the BEiT bias gradient is accumulated into drelbias [heads, N, N] (f32, zero-filled).
template <class T>
__device__ void wa_bwd_q(const T* qkv, const T* bias, const float* relh, const float* relw, const T* rh,
                         const T* rw, const T* relbias, const T* out, const T* dout, const float* lse,
                         float* dsum, float* drelh, float* drelw, float* drelbias, T* dqkv, WinGeom g) {
    __shared__ float ks[BK][HD];
    __shared__ float vs[BK][HD];
    const int n = g.wh * g.ww;
    const int h = blockIdx.y, w = blockIdx.z;
    const int i = blockIdx.x * BQ + threadIdx.x;
    const Tok qt = token(g, w, i < n ? i : 0);
    const bool active = i < n && qt.valid;
    const long row = ((long)w * g.heads + h) * n + i;
    float q[HD], dout_i[HD], dq[HD];
    float dlse = 0.0f, row_lse = 0.0f;
    if (active) {
        const long o = token_row(g, qt, g.channels) + h * HD;
#pragma unroll
        for (int d = 0; d < HD; ++d) {
            q[d] = head_elem(qkv, bias, g, qt, 0, h, d);
            dout_i[d] = to_f32(dout[o + d]);
            dlse += dout_i[d] * to_f32(out[o + d]);
            dq[d] = 0.0f;
        }
        dsum[row] = dlse;
        row_lse = lse[row];
    }
    float gh[WIN_MAX], gw[WIN_MAX];
    for (int a = 0; a < WIN_MAX; ++a) {
        gh[a] = 0.0f;
        gw[a] = 0.0f;
    }
    for (int j0 = 0; j0 < n; j0 += BK) {
        const int nk = imin(BK, n - j0);
        load_kv_tile(qkv, bias, g, w, h, j0, nk, ks, vs);
        __syncthreads();
        if (active) {
            for (int jj = 0; jj < nk; ++jj) {
                const int j = j0 + jj;
                float dot = 0.0f, dp = 0.0f;
#pragma unroll
                for (int d = 0; d < HD; ++d) {
                    dot += q[d] * ks[jj][d];
                    dp += dout_i[d] * vs[jj][d];
                }
                const float s = g.scale * dot + rel_logit(g, relh, relw, relbias, row, h, i, j);
                const float ds = expf(s - row_lse) * (dp - dlse);
                const float sds = g.scale * ds;
#pragma unroll
                for (int d = 0; d < HD; ++d) dq[d] += sds * ks[jj][d];
                if (g.rel == 1) {
                    gh[j / g.ww] += ds;
                    gw[j % g.ww] += ds;
                } else if (g.rel == 2) {
                    atomicAdd(&drelbias[((long)h * n + i) * n + j], ds);
                }
            }
        }
        __syncthreads();
    }
    if (!active) return;
    if (g.rel == 1) {
        for (int a = 0; a < g.wh; ++a) {
            drelh[row * g.wh + a] = gh[a];
            const T* r = rh + ((long)qt.ly * g.wh + a) * HD;
#pragma unroll
            for (int d = 0; d < HD; ++d) dq[d] += gh[a] * to_f32(r[d]);
        }
        for (int a = 0; a < g.ww; ++a) {
            drelw[row * g.ww + a] = gw[a];
            const T* r = rw + ((long)qt.lx * g.ww + a) * HD;
#pragma unroll
            for (int d = 0; d < HD; ++d) dq[d] += gw[a] * to_f32(r[d]);
        }
    }
    T* o = dqkv + token_row(g, qt, 3 * g.channels) + h * HD;
#pragma unroll
    for (int d = 0; d < HD; ++d) o[d] = from_f32<T>(dq[d]);
}

// Backward, key side. Grid (ceil(N / BQ), heads, windows); one thread per key j (padded keys
// included: their gradient is the qkv bias's, accumulated into dbias [3C] f32, zero-filled).
// dv_j = sum_i P dout_i, dk_j = scale sum_i dS q_i over the unpadded queries.
template <class T>
__device__ void wa_bwd_kv(const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,
                          const T* dout, const float* lse, const float* dsum, float* dbias, T* dqkv, WinGeom g) {
    __shared__ float qs[QT][HD];
    __shared__ float dos[QT][HD];
    __shared__ float lses[QT], dsums[QT];
    __shared__ int valid[QT];
    const int n = g.wh * g.ww;
    const int h = blockIdx.y, w = blockIdx.z;
    const int j = blockIdx.x * BQ + threadIdx.x;
    const Tok kt = token(g, w, j < n ? j : 0);
    const bool active = j < n;
    const long rows = ((long)w * g.heads + h) * n;  // row of query 0
    float k[HD], v[HD], dk[HD], dv[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        k[d] = active ? head_elem(qkv, bias, g, kt, 1, h, d) : 0.0f;
        v[d] = active ? head_elem(qkv, bias, g, kt, 2, h, d) : 0.0f;
        dk[d] = 0.0f;
        dv[d] = 0.0f;
    }
    for (int i0 = 0; i0 < n; i0 += QT) {
        const int nq = imin(QT, n - i0);
        for (int e = threadIdx.x; e < nq * HD; e += blockDim.x) {
            const int ii = e / HD, d = e % HD;
            const Tok qt = token(g, w, i0 + ii);
            qs[ii][d] = qt.valid ? head_elem(qkv, bias, g, qt, 0, h, d) : 0.0f;
            dos[ii][d] = qt.valid ? to_f32(dout[token_row(g, qt, g.channels) + h * HD + d]) : 0.0f;
        }
        for (int ii = threadIdx.x; ii < nq; ii += blockDim.x) {
            const Tok qt = token(g, w, i0 + ii);
            valid[ii] = qt.valid;
            lses[ii] = qt.valid ? lse[rows + i0 + ii] : 0.0f;
            dsums[ii] = qt.valid ? dsum[rows + i0 + ii] : 0.0f;
        }
        __syncthreads();
        if (active) {
            for (int ii = 0; ii < nq; ++ii) {
                if (!valid[ii]) continue;
                const int i = i0 + ii;
                float dot = 0.0f, dp = 0.0f;
#pragma unroll
                for (int d = 0; d < HD; ++d) {
                    dot += qs[ii][d] * k[d];
                    dp += dos[ii][d] * v[d];
                }
                const float s = g.scale * dot + rel_logit(g, relh, relw, relbias, rows + i, h, i, j);
                const float p = expf(s - lses[ii]);
                const float sds = g.scale * p * (dp - dsums[ii]);
#pragma unroll
                for (int d = 0; d < HD; ++d) {
                    dv[d] += p * dos[ii][d];
                    dk[d] += sds * qs[ii][d];
                }
            }
        }
        __syncthreads();
    }
    if (!active) return;
    if (kt.valid) {
        T* o = dqkv + token_row(g, kt, 3 * g.channels) + h * HD;
#pragma unroll
        for (int d = 0; d < HD; ++d) {
            o[g.channels + d] = from_f32<T>(dk[d]);
            o[2 * g.channels + d] = from_f32<T>(dv[d]);
        }
    } else if (g.has_bias) {
#pragma unroll
        for (int d = 0; d < HD; ++d) {
            atomicAdd(&dbias[g.channels + h * HD + d], dk[d]);
            atomicAdd(&dbias[2 * g.channels + h * HD + d], dv[d]);
        }
    }
}

// The decomposed term's tables: relh [rows, wh] = q_i . rh[y_i, :], relw [rows, ww] =
// q_i . rw[x_i, :], rows = (window, head, query). One thread per row; padded queries' rows
// are zero. Grid ceil(rows / BQ), BQ threads.
template <class T>
__device__ void wa_rel_tables(const T* qkv, const T* bias, const T* rh, const T* rw, float* relh, float* relw,
                              WinGeom g) {
    const int n = g.wh * g.ww;
    const long total = (long)g.batch * g.gh * g.gw * g.heads * n;
    const long row = (long)blockIdx.x * BQ + threadIdx.x;
    if (row >= total) return;
    const int i = (int)(row % n), h = (int)(row / n % g.heads), w = (int)(row / n / g.heads);
    const Tok qt = token(g, w, i);
    float q[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) q[d] = qt.valid ? head_elem(qkv, bias, g, qt, 0, h, d) : 0.0f;
    for (int a = 0; a < g.wh; ++a) {
        const T* r = rh + ((long)qt.ly * g.wh + a) * HD;
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < HD; ++d) dot += q[d] * to_f32(r[d]);
        relh[row * g.wh + a] = dot;
    }
    for (int a = 0; a < g.ww; ++a) {
        const T* r = rw + ((long)qt.lx * g.ww + a) * HD;
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < HD; ++d) dot += q[d] * to_f32(r[d]);
        relw[row * g.ww + a] = dot;
    }
}

// Gradient of one decomposed table with respect to its input: axis 0 gives
// drh [wh, wh, HD] (drh[a, b, d] = sum over windows, heads and query columns of the query row
// a of drelh[row, b] q[d]), axis 1 drw [ww, ww, HD] likewise over query rows. One thread per
// output element, f32 output. Grid ceil(side * side * HD / BQ), BQ threads.
template <class T>
__device__ void wa_rel_tables_grad(const T* qkv, const T* bias, const float* drel, float* dr, WinGeom g, int axis) {
    const int side = axis == 0 ? g.wh : g.ww;
    const int other = axis == 0 ? g.ww : g.wh;
    const int e = blockIdx.x * BQ + threadIdx.x;
    if (e >= side * side * HD) return;
    const int d = e % HD, b = e / HD % side, a = e / HD / side;
    const int n = g.wh * g.ww;
    const int windows = g.batch * g.gh * g.gw;
    float acc = 0.0f;
    for (int w = 0; w < windows; ++w) {
        for (int o = 0; o < other; ++o) {
            const int i = axis == 0 ? a * g.ww + o : o * g.ww + a;
            const Tok qt = token(g, w, i);
            if (!qt.valid) continue;
            for (int h = 0; h < g.heads; ++h) {
                const long row = ((long)w * g.heads + h) * n + i;
                acc += drel[row * side + b] * head_elem(qkv, bias, g, qt, 0, h, d);
            }
        }
    }
    dr[e] = acc;
}

#define WA_ENTRY(T, S)                                                                                          \
    extern "C" __global__ void window_attention_fwd_##S(const T* qkv, const T* bias, const float* relh,         \
                                                        const float* relw, const T* relbias, T* out,            \
                                                        float* lse, WinGeom g) {                                \
        wa_fwd<T>(qkv, bias, relh, relw, relbias, out, lse, g);                                                 \
    }                                                                                                           \
    extern "C" __global__ void window_attention_bwd_q_##S(                                                      \
        const T* qkv, const T* bias, const float* relh, const float* relw, const T* rh, const T* rw,            \
        const T* relbias, const T* out, const T* dout, const float* lse, float* dsum, float* drelh,             \
        float* drelw, float* drelbias, T* dqkv, WinGeom g) {                                                    \
        wa_bwd_q<T>(qkv, bias, relh, relw, rh, rw, relbias, out, dout, lse, dsum, drelh, drelw, drelbias, dqkv, \
                    g);                                                                                         \
    }                                                                                                           \
    extern "C" __global__ void window_attention_bwd_kv_##S(const T* qkv, const T* bias, const float* relh,      \
                                                           const float* relw, const T* relbias, const T* dout,  \
                                                           const float* lse, const float* dsum, float* dbias,   \
                                                           T* dqkv, WinGeom g) {                                \
        wa_bwd_kv<T>(qkv, bias, relh, relw, relbias, dout, lse, dsum, dbias, dqkv, g);                          \
    }                                                                                                           \
    extern "C" __global__ void window_attention_rel_tables_##S(const T* qkv, const T* bias, const T* rh,        \
                                                               const T* rw, float* relh, float* relw,           \
                                                               WinGeom g) {                                     \
        wa_rel_tables<T>(qkv, bias, rh, rw, relh, relw, g);                                                     \
    }                                                                                                           \
    extern "C" __global__ void window_attention_rel_tables_grad_##S(const T* qkv, const T* bias,               \
                                                                    const float* drel, float* dr, WinGeom g,   \
                                                                    int axis) {                                \
        wa_rel_tables_grad<T>(qkv, bias, drel, dr, g, axis);                                                    \
    }
#ifndef WA_NO_FMA_ENTRIES
VITDET_FOR_EACH_FLOAT(WA_ENTRY)
#endif

// The tensor-core kernels need mma.m16n8k16 in f16 / bf16: compute 8.0 and later
// (the Rust side, `Operands::tensor_cores`, picks the FMA kernels before that).
#if HD % 16 == 0 && (defined(VITDET_EMU) || __CUDA_ARCH__ >= 800)
// Tensor-core forward for f16 / bf16 (head dims that are multiples of 16), flash-attention-2
// style. A block of four warps owns TC_BQ = 64 query rows (16 per warp) and streams keys in
// tiles of TC_BK = 64 through shared memory: S = Q K^T and O += P V run on mma.m16n8k16 with
// f32 accumulators, and the scores, probabilities, output and row statistics never leave the
// registers: a thread holds two rows' columns of each accumulator, the online softmax reduces
// row maxima and sums over the four threads sharing a row (xor shuffles), and P's accumulator
// fragments are fed back as the A operand of P V. Dynamic shared memory: see
// `tc_shared_bytes` (Rust).
#define TC_BQ 64
#define TC_BK 64
// The tensor-core kernels exponentiate in base 2 (exp2f is the hardware's ex2; expf adds a
// range reduction): logits are carried times log2 e, and the stored lse converted back.
#define WA_LOG2E 1.4426950408889634f
#define WA_LN2 0.6931471805599453f
#define TC_LDT (HD + 8)      // row stride of the Q, K, V tiles (elements)

// Whether each TC_BK-key tile (or key block) is one whole row of the window, with the decomposed
// term (global attention at side TC_BK): that term's column part is then the same in every tile.
__device__ __forceinline__ bool wa_row_tiles(const WinGeom& g) { return g.rel == 1 && g.ww == TC_BK; }
#define TC_LDV (TC_BK + 8)   // of the transposed key tiles [d][key] (elements)
#define TC_LDQ (TC_BQ + 8)   // of the backward's transposed query tiles [d][query] (elements)
#define TC_LDP (TC_BK + 8)   // of the backward's dS tile (elements)

// Element 0 of head h's part (0 q, 1 k, 2 v) for token `k`: its slice of the token's qkv row,
// the qkv bias for a padded token, or null (zeros) for a padded token without a bias.
template <class T>
__device__ __forceinline__ const T* head_slice(const T* qkv, const T* bias, const WinGeom& g, const Tok& k, int part,
                                               int h) {
    const int c = part * g.channels + h * HD;
    if (k.valid) return qkv + token_row(g, k, 3 * g.channels) + c;
    return g.has_bias ? bias + c : nullptr;
}

// Elements d0 .. d0 + 7 of a tile row from `src` (zeros where null), packed as they lie in
// memory: one 16-byte load where `vec` (the inputs' base addresses are 16-byte aligned, and so
// is every slice, HD and the channel counts being multiples of 8 here), else element by element.
template <class T>
__device__ __forceinline__ vec16 tc_load8(const T* src, int d0, bool vec) {
    if (src == nullptr) return vec16{0u, 0u, 0u, 0u};
    if (vec) return load16(src + d0);
    unsigned words[4];
    for (int k = 0; k < 4; ++k) words[k] = pack2(src[d0 + 2 * k], src[d0 + 2 * k + 1]);
    return vec16{words[0], words[1], words[2], words[3]};
}

// Those 8 elements as column `c`, rows d0 .. d0 + 7, of a transposed shared tile (row stride
// `ld`): tiles read as mma B operands along their rows, so that each fragment is adjacent pairs.
template <class T>
__device__ __forceinline__ void tc_store8_t(T* tile, int ld, int c, int d0, vec16 x) {
    const unsigned words[4] = {x.x, x.y, x.z, x.w};
    for (int k = 0; k < 8; ++k) tile[(d0 + k) * ld + c].bits = (unsigned short)(words[k / 2] >> (16 * (k % 2)));
}

// Keys j0 .. j0 + TC_BK of (window w, head h), rows past the window's N zero: K as rows into
// `ks` (when given) and transposed into `kt` (when given), V as rows into `vs` (when given) and
// transposed into `vt` (when given). Consecutive threads take consecutive keys, so a warp's
// transposed stores fill whole shared-memory words, free of bank conflicts (and its 16-byte row
// stores land in distinct banks, TC_LDT * 2 bytes being an odd multiple of 16).
template <class T>
__device__ __forceinline__ void tc_load_key_tile(const T* qkv, const T* bias, const WinGeom& g, int w, int h, int j0,
                                                 bool vec, T* ks, T* kt, T* vs, T* vt) {
    const int n = g.wh * g.ww;
    for (int e = threadIdx.x; e < TC_BK * (HD / 8); e += blockDim.x) {
        const int jj = e % TC_BK, d0 = e / TC_BK * 8, j = j0 + jj;
        const T *k = nullptr, *v = nullptr;
        if (j < n) {
            const Tok tok = token(g, w, j);
            k = head_slice(qkv, bias, g, tok, 1, h);
            v = head_slice(qkv, bias, g, tok, 2, h);
        }
        const vec16 kx = tc_load8(k, d0, vec), vx = tc_load8(v, d0, vec);
        if (ks) store16(ks + jj * TC_LDT + d0, kx);
        if (kt) tc_store8_t(kt, TC_LDV, jj, d0, kx);
        if (vs) store16(vs + jj * TC_LDT + d0, vx);
        if (vt) tc_store8_t(vt, TC_LDV, jj, d0, vx);
    }
}

// A fragment of rows r0..r0+15, columns k0..k0+15 of a row-major tile with row stride ld.
template <class T>
__device__ __forceinline__ void wa_tc_frag_a(unsigned a[4], const T* m, int ld, int r0, int k0, int gq, int tq) {
    // Each pair is adjacent and starts at an even element (k and ld even): one 4-byte load.
    const int k = k0 + 2 * tq;
    a[0] = load32(m + (r0 + gq) * ld + k);
    a[1] = load32(m + (r0 + gq + 8) * ld + k);
    a[2] = load32(m + (r0 + gq) * ld + k + 8);
    a[3] = load32(m + (r0 + gq + 8) * ld + k + 8);
}

// B fragment with B(k, c) = m[c * ld + k]: rows k0..k0+15, column c0 + gq. Every B operand is
// read this way, its pairs adjacent: row-major tiles used transposed (K in Q K^T) and the tiles
// kept transposed for the products that use them as they are (V in P V, ...).
template <class T>
__device__ __forceinline__ void wa_tc_frag_bt(unsigned b[2], const T* m, int ld, int k0, int c0, int gq, int tq) {
    const int k = k0 + 2 * tq, c = c0 + gq;
    b[0] = load32(m + c * ld + k);
    b[1] = load32(m + c * ld + k + 8);
}

// The A fragment of columns 16 kt..16 kt+15 of a warp's 16-row accumulator `acc[tile][4]`
// (8-column tiles), rounded to T.
template <class T>
__device__ __forceinline__ void wa_tc_acc_as_a(unsigned a[4], const float acc[][4], int kt) {
    const float* lo = acc[2 * kt];
    const float* hi = acc[2 * kt + 1];
    a[0] = pack2(from_f32<T>(lo[0]), from_f32<T>(lo[1]));
    a[1] = pack2(from_f32<T>(lo[2]), from_f32<T>(lo[3]));
    a[2] = pack2(from_f32<T>(hi[0]), from_f32<T>(hi[1]));
    a[3] = pack2(from_f32<T>(hi[2]), from_f32<T>(hi[3]));
}

template <class T>
__device__ void wa_fwd_tc(const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,
                          T* out, float* lse, WinGeom g) {
    DYNAMIC_SHARED(unsigned char, smem);
    T* qs = reinterpret_cast<T*>(smem);
    T* ks = qs + TC_BQ * TC_LDT;
    T* vt = ks + TC_BK * TC_LDT;  // V transposed: [HD][TC_LDV]

    const int n = g.wh * g.ww;
    const int h = blockIdx.y, w = blockIdx.z;
    const int i0 = blockIdx.x * TC_BQ;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, tq = lane % 4;
    const int r0 = warp * 16;

    const bool vec = aligned16(qkv) && (!g.has_bias || aligned16(bias));
    // The query tile, then this warp's Q fragments, kept in registers for the whole key loop.
    for (int e = tid; e < TC_BQ * (HD / 8); e += blockDim.x) {
        const int r = e / (HD / 8), d0 = e % (HD / 8) * 8, i = i0 + r;
        const T* q = i < n ? head_slice(qkv, bias, g, token(g, w, i), 0, h) : nullptr;
        store16(qs + r * TC_LDT + d0, tc_load8(q, d0, vec));
    }
    __syncthreads();
    unsigned qa[HD / 16][4];
    for (int kt = 0; kt < HD / 16; ++kt) wa_tc_frag_a(qa[kt], qs, TC_LDT, r0, kt * 16, gq, tq);

    // The thread's two query rows (fragment rows gq and gq + 8), their running max (of the
    // logits in log2 units), this thread's share of their sums (its columns; summed over the
    // quad at the end) and its columns of O.
    int qi[2];
    bool query[2];
    long qrow[2];
    float m[2], l[2];
    for (int r = 0; r < 2; ++r) {
        qi[r] = i0 + r0 + gq + 8 * r;
        query[r] = qi[r] < n && token(g, w, qi[r]).valid;
        qrow[r] = ((long)w * g.heads + h) * n + qi[r];
        m[r] = VITDET_NEG_INF;
        l[r] = 0.0f;
    }
    float o[HD / 8][4];
    for (int nt = 0; nt < HD / 8; ++nt)
        for (int e = 0; e < 4; ++e) o[nt][e] = 0.0f;

    // Where every key tile is one whole row of the window (global attention at side TC_BK), the
    // decomposed term's column part is the same in every tile: this thread's columns of its
    // rows' relw stay in registers, and relh is read once per row and tile. The sums are the
    // general path's.
    const bool row_tiles = wa_row_tiles(g);
    float relw_cols[2][TC_BK / 8][2];
    for (int r = 0; r < 2; ++r)
        for (int nt = 0; nt < TC_BK / 8; ++nt)
            for (int c = 0; c < 2; ++c)
                relw_cols[r][nt][c] = row_tiles && query[r] ? relw[qrow[r] * g.ww + nt * 8 + 2 * tq + c] : 0.0f;

    // The tile's keys' positions in the window, for the decomposed term (one division each per
    // tile rather than per logit).
    __shared__ int key_y[TC_BK], key_x[TC_BK];
    for (int j0 = 0; j0 < n; j0 += TC_BK) {
        float relh_row[2];
        for (int r = 0; r < 2; ++r) relh_row[r] = row_tiles && query[r] ? relh[qrow[r] * g.wh + j0 / g.ww] : 0.0f;
        __syncthreads();  // every warp is done with the previous K and V tiles
        tc_load_key_tile(qkv, bias, g, w, h, j0, vec, ks, (T*)nullptr, (T*)nullptr, vt);
        for (int jj = tid; jj < TC_BK; jj += blockDim.x) {
            key_y[jj] = (j0 + jj) / g.ww;
            key_x[jj] = (j0 + jj) % g.ww;
        }
        __syncthreads();
        // S = Q K^T: accumulator element e of tile nt is row gq + 8 (e / 2), key nt * 8 + 2 tq + e % 2.
        float sc[TC_BK / 8][4];
        for (int nt = 0; nt < TC_BK / 8; ++nt) {
            for (int e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
            for (int kt = 0; kt < HD / 16; ++kt) {
                unsigned b[2];
                wa_tc_frag_bt(b, ks, TC_LDT, kt * 16, nt * 8, gq, tq);
                mma_16816(sc[nt], qa[kt], b, T());
            }
        }
        // Logits, and the rows' new maxima over the quad that shares them.
        float mx[2] = {m[0], m[1]};
        for (int nt = 0; nt < TC_BK / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const int r = e / 2, jj = nt * 8 + 2 * tq + e % 2, j = j0 + jj;
                float s = VITDET_NEG_INF;
                if (j < n) {
                    const float rel =
                        row_tiles  ? relh_row[r] + relw_cols[r][nt][e % 2]
                        : query[r] ? rel_logit_at(g, relh, relw, relbias, qrow[r], h, qi[r], j, key_y[jj], key_x[jj])
                                   : 0.0f;
                    s = (g.scale * sc[nt][e] + rel) * WA_LOG2E;
                }
                sc[nt][e] = s;
                mx[r] = fmaxf(mx[r], s);
            }
        float corr[2];
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], shfl_xor(mx[r], 1));
            mx[r] = fmaxf(mx[r], shfl_xor(mx[r], 2));
            // Each tile holds key j0 < n, so the max is finite from the first tile on.
            corr[r] = exp2f(m[r] - mx[r]);
            m[r] = mx[r];
            l[r] *= corr[r];
        }
        // P = exp(s - m) (= 2^(s - m) in log2 units), in place; O rescaled.
        for (int nt = 0; nt < TC_BK / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(sc[nt][e] - m[e / 2]);
                l[e / 2] += p;
                sc[nt][e] = p;
            }
        for (int nt = 0; nt < HD / 8; ++nt)
            for (int e = 0; e < 4; ++e) o[nt][e] *= corr[e / 2];
        // O += P V: two adjacent P accumulator tiles are one A fragment.
        for (int kt = 0; kt < TC_BK / 16; ++kt) {
            unsigned a[4];
            wa_tc_acc_as_a<T>(a, sc, kt);
            for (int nt = 0; nt < HD / 8; ++nt) {
                unsigned b[2];
                wa_tc_frag_bt(b, vt, TC_LDV, kt * 16, nt * 8, gq, tq);
                mma_16816(o[nt], a, b, T());
            }
        }
    }
    for (int r = 0; r < 2; ++r) {
        l[r] += shfl_xor(l[r], 1);
        l[r] += shfl_xor(l[r], 2);
    }
    // Unpadded queries: out = O / l, lse = m ln 2 + ln l (m in log2 units).
    for (int r = 0; r < 2; ++r) {
        if (qi[r] >= n) continue;
        const Tok qt = token(g, w, qi[r]);
        if (!qt.valid) continue;
        const long base = token_row(g, qt, g.channels) + h * HD;
        for (int nt = 0; nt < HD / 8; ++nt) {
            const int col = nt * 8 + 2 * tq;
            out[base + col] = from_f32<T>(o[nt][2 * r] / l[r]);
            out[base + col + 1] = from_f32<T>(o[nt][2 * r + 1] / l[r]);
        }
        if (tq == 0) lse[qrow[r]] = m[r] * WA_LN2 + logf(l[r]);
    }
}

#define WA_TC_ENTRY(T, S)                                                                                      \
    extern "C" __global__ void window_attention_fwd_tc_##S(const T* qkv, const T* bias, const float* relh,    \
                                                           const float* relw, const T* relbias, T* out,       \
                                                           float* lse, WinGeom g) {                           \
        wa_fwd_tc<T>(qkv, bias, relh, relw, relbias, out, lse, g);                                             \
    }
VITDET_FOR_EACH_HALF(WA_TC_ENTRY)

// Tensor-core backward for f16 / bf16, flash-attention-2 style. Three kernels:
// `wa_bwd_dsum_tc` stores D = rowsum(dout * out) per row; `wa_bwd_tc` gives a block of four
// warps TC_BK = 64 keys of a (window, head) (16 per warp) and streams the queries in tiles of
// TC_BQ = 64: each warp recomputes S^T = K Q^T and dP^T = V dO^T for its keys on the mma, turns
// them in registers into P^T = exp(scale s + rel - lse) and dS^T = P^T (dP^T - D), and feeds
// those accumulator fragments straight back as A operands of dV += P^T dO and dK += dS^T Q
// (the m16n8 accumulator layout of two adjacent column tiles is the m16k16 A layout). dS also
// goes to shared memory (as T for dQ += scale dS K, accumulated across key blocks into a
// global f32 buffer with atomicAdd; as f32 for the decomposed term's row sums). Then
// `wa_bwd_dq_tc` adds the decomposed term's q-gradient and writes dq into dqkv. The results
// are the f32 kernels' (`wa_bwd_q`, `wa_bwd_kv`): drelh / drelw rows, the BEiT drelbias and the
// padded keys' share of dbias through atomicAdd. Dynamic shared memory: see
// `tc_bwd_shared_bytes` (Rust).
#define TC_LDB (TC_BK + 1)  // row stride of the f32 dS tile: one thread per query row reads columns
#define TC_BWD_THREADS (2 * TC_BQ)                          // threads of `wa_bwd_tc`
#define TC_BWD_TILE_LOADS (TC_BQ * (HD / 8) / TC_BWD_THREADS)  // 16-byte loads per thread per tile
#define TC_BWD_TILE_ROUND 4                                 // of which in flight at once
#define TC_BWD_RELW_ROUND 32                                // relw loads in flight per thread (all)

// D = dout . out per (window, head, query) row, zero for padded queries. One thread per row:
// grid ceil(rows / BQ), BQ threads.
template <class T>
__device__ void wa_bwd_dsum_tc(const T* out, const T* dout, float* dsum, WinGeom g) {
    const int n = g.wh * g.ww;
    const long total = (long)g.batch * g.gh * g.gw * g.heads * n;
    const long row = (long)blockIdx.x * BQ + threadIdx.x;
    if (row >= total) return;
    const int i = (int)(row % n), h = (int)(row / n % g.heads), w = (int)(row / n / g.heads);
    const Tok qt = token(g, w, i);
    float acc = 0.0f;
    if (qt.valid) {
        const long o = token_row(g, qt, g.channels) + h * HD;
#pragma unroll
        for (int d = 0; d < HD; ++d) acc += to_f32(dout[o + d]) * to_f32(out[o + d]);
    }
    dsum[row] = acc;
}

// The key-block kernel. Grid (ceil(N / TC_BK), heads, windows), 2 * TC_BQ = 128 threads (the
// decomposed row sums split the threads in two halves of one query row each). `dq` is
// [rows, HD] f32, zero-filled; drelh, drelw, drelbias, dbias zero-filled as for the f32 kernels.
template <class T>
__device__ void wa_bwd_tc(const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,
                          const T* dout, const float* lse, const float* dsum, float* dq, float* drelh, float* drelw,
                          float* drelbias, float* dbias, T* dqkv, WinGeom g) {
    DYNAMIC_SHARED(unsigned char, smem);
    // K, V, Q and dO as rows; K, Q and dO also transposed ([d][key or query]), for the
    // products that take them as B operands along their rows (dQ += dS K, dK += dS^T Q,
    // dV += P^T dO), so that every fragment is adjacent pairs.
    T* ks = reinterpret_cast<T*>(smem);
    T* vs = ks + TC_BK * TC_LDT;
    T* kts = vs + TC_BK * TC_LDT;                                 // stride TC_LDV
    T* qs = kts + HD * TC_LDV;
    T* dos = qs + TC_BQ * TC_LDT;
    T* qts = dos + TC_BQ * TC_LDT;                                // stride TC_LDQ
    T* dots = qts + HD * TC_LDQ;                                  // stride TC_LDQ
    T* dss = dots + HD * TC_LDQ;                                  // dS [query][key], stride TC_LDP
    float* dsf = reinterpret_cast<float*>(dss + TC_BQ * TC_LDP);  // dS [query][key] f32, stride TC_LDB
    float* q_lse = dsf + TC_BQ * TC_LDB;
    float* q_d = q_lse + TC_BQ;
    int* q_valid = reinterpret_cast<int*>(q_d + TC_BQ);
    float* q_relh = reinterpret_cast<float*>(q_valid + TC_BQ);

    const int n = g.wh * g.ww;
    const int h = blockIdx.y, w = blockIdx.z;
    const int j0 = blockIdx.x * TC_BK;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, tq = lane % 4;
    const int r0 = warp * 16;  // this warp's keys (rows of S^T, dK, dV) and queries (rows of dQ)
    const long rows0 = ((long)w * g.heads + h) * n;  // row of query 0
    // This block's keys are one whole row of the window.
    const bool row_tiles = wa_row_tiles(g);

    // This block's keys and values; keys past N are zero (and masked out of P below).
    const bool vec = aligned16(qkv) && (!g.has_bias || aligned16(bias)) && aligned16(dout);
    tc_load_key_tile(qkv, bias, g, w, h, j0, vec, ks, kts, vs, (T*)nullptr);
    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt)
#pragma unroll
        for (int o = 0; o < 4; ++o) {
            dk[nt][o] = 0.0f;
            dv[nt][o] = 0.0f;
        }

    for (int i0 = 0; i0 < n; i0 += TC_BQ) {
        // The query tile: q and dout of unpadded queries, zero elsewhere (their P is zero), as
        // rows and transposed; consecutive threads take consecutive queries (see
        // `tc_load_key_tile`). The block holds too few warps (two per scheduler) to hide global
        // loads one at a time, so they are issued in rounds of TC_BWD_TILE_ROUND, each before
        // its shared-memory stores.
#pragma unroll
        for (int u0 = 0; u0 < TC_BWD_TILE_LOADS; u0 += TC_BWD_TILE_ROUND) {
            vec16 qx[TC_BWD_TILE_ROUND], dx[TC_BWD_TILE_ROUND];
#pragma unroll
            for (int u = 0; u < TC_BWD_TILE_ROUND && u0 + u < TC_BWD_TILE_LOADS; ++u) {
                const int e = tid + (u0 + u) * TC_BWD_THREADS;
                const int r = e % TC_BQ, d0 = e / TC_BQ * 8, i = i0 + r;
                const T *q = nullptr, *d = nullptr;
                if (i < n) {
                    const Tok qt = token(g, w, i);
                    if (qt.valid) {
                        q = head_slice(qkv, bias, g, qt, 0, h);
                        d = dout + token_row(g, qt, g.channels) + h * HD;
                    }
                }
                qx[u] = tc_load8(q, d0, vec);
                dx[u] = tc_load8(d, d0, vec);
            }
#pragma unroll
            for (int u = 0; u < TC_BWD_TILE_ROUND && u0 + u < TC_BWD_TILE_LOADS; ++u) {
                const int e = tid + (u0 + u) * TC_BWD_THREADS;
                const int r = e % TC_BQ, d0 = e / TC_BQ * 8;
                store16(qs + r * TC_LDT + d0, qx[u]);
                store16(dos + r * TC_LDT + d0, dx[u]);
                tc_store8_t(qts, TC_LDQ, r, d0, qx[u]);
                tc_store8_t(dots, TC_LDQ, r, d0, dx[u]);
            }
        }
        for (int r = tid; r < TC_BQ; r += blockDim.x) {
            const int i = i0 + r;
            const bool valid = i < n && token(g, w, i).valid;
            q_valid[r] = valid;
            q_lse[r] = valid ? lse[rows0 + i] : 0.0f;
            q_d[r] = valid ? dsum[rows0 + i] : 0.0f;
            if (row_tiles) q_relh[r] = valid ? relh[(rows0 + i) * g.wh + j0 / g.ww] : 0.0f;
        }
        // Where this block's keys are one whole row of the window (global attention at side
        // TC_BK), the tile's relw terms, read coalesced into the f32 dS tile that each element's
        // dS then overwrites; loads first, as above. (Hoisting the per-query values above the
        // tile loads as well makes ptxas spill.)
        if (row_tiles) {
#pragma unroll
            for (int e0 = 0; e0 < TC_BQ * TC_BK; e0 += TC_BWD_RELW_ROUND * TC_BWD_THREADS) {
                float v[TC_BWD_RELW_ROUND];
#pragma unroll
                for (int u = 0; u < TC_BWD_RELW_ROUND; ++u) {
                    const int e = e0 + tid + u * TC_BWD_THREADS;
                    const int r = e / TC_BK, kx = e % TC_BK, i = i0 + r;
                    v[u] = i < n ? relw[(rows0 + i) * g.ww + kx] : 0.0f;
                }
#pragma unroll
                for (int u = 0; u < TC_BWD_RELW_ROUND; ++u) {
                    const int e = e0 + tid + u * TC_BWD_THREADS;
                    dsf[e / TC_BK * TC_LDB + e % TC_BK] = v[u];
                }
            }
        }
        __syncthreads();

        // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys against the tile's 64 queries.
        float s[TC_BQ / 8][4], dp[TC_BQ / 8][4];
#pragma unroll
        for (int nt = 0; nt < TC_BQ / 8; ++nt) {
#pragma unroll
            for (int o = 0; o < 4; ++o) {
                s[nt][o] = 0.0f;
                dp[nt][o] = 0.0f;
            }
#pragma unroll
            for (int kt = 0; kt < HD / 16; ++kt) {
                unsigned a[4], b[2];
                wa_tc_frag_a(a, ks, TC_LDT, r0, kt * 16, gq, tq);
                wa_tc_frag_bt(b, qs, TC_LDT, kt * 16, nt * 8, gq, tq);
                mma_16816(s[nt], a, b, T());
                wa_tc_frag_a(a, vs, TC_LDT, r0, kt * 16, gq, tq);
                wa_tc_frag_bt(b, dos, TC_LDT, kt * 16, nt * 8, gq, tq);
                mma_16816(dp[nt], a, b, T());
            }
        }
        // In place: s becomes P^T, dp becomes dS^T. dS is also published for dQ and the
        // decomposed row sums; the BEiT bias gradient is dS itself.
#pragma unroll
        for (int nt = 0; nt < TC_BQ / 8; ++nt)
#pragma unroll
            for (int o = 0; o < 4; ++o) {
                const int key = r0 + gq + (o >= 2 ? 8 : 0), r = nt * 8 + 2 * tq + (o & 1);
                const int j = j0 + key, i = i0 + r;
                const bool live = q_valid[r] && j < n;
                float p = 0.0f;
                if (live) {
                    const float rel = row_tiles ? q_relh[r] + dsf[r * TC_LDB + key]
                                                : rel_logit(g, relh, relw, relbias, rows0 + i, h, i, j);
                    const float x = g.scale * s[nt][o] + rel - q_lse[r];
                    p = exp2f(x * WA_LOG2E);
                }
                const float ds = p * (dp[nt][o] - q_d[r]);
                s[nt][o] = p;
                dp[nt][o] = ds;
                dss[r * TC_LDP + key] = from_f32<T>(ds);
                if (g.rel == 1) dsf[r * TC_LDB + key] = ds;
                else if (g.rel == 2 && live) atomicAdd(&drelbias[((long)h * n + i) * n + j], ds);
            }
        // dV += P^T dO, dK += dS^T Q (scale applied once at the end).
#pragma unroll
        for (int kt = 0; kt < TC_BQ / 16; ++kt) {
            unsigned ap[4], ad[4];
            wa_tc_acc_as_a<T>(ap, s, kt);
            wa_tc_acc_as_a<T>(ad, dp, kt);
#pragma unroll
            for (int nt = 0; nt < HD / 8; ++nt) {
                unsigned b[2];
                wa_tc_frag_bt(b, dots, TC_LDQ, kt * 16, nt * 8, gq, tq);
                mma_16816(dv[nt], ap, b, T());
                wa_tc_frag_bt(b, qts, TC_LDQ, kt * 16, nt * 8, gq, tq);
                mma_16816(dk[nt], ad, b, T());
            }
        }
        __syncthreads();

        // dQ += scale dS K for this warp's 16 queries, summed over the key blocks in global f32.
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int kt = 0; kt < TC_BK / 16; ++kt) {
                unsigned a[4], b[2];
                wa_tc_frag_a(a, dss, TC_LDP, r0, kt * 16, gq, tq);
                wa_tc_frag_bt(b, kts, TC_LDV, kt * 16, nt * 8, gq, tq);
                mma_16816(c, a, b, T());
            }
#pragma unroll
            for (int o = 0; o < 4; ++o) {
                const int r = r0 + gq + (o >= 2 ? 8 : 0), d = nt * 8 + 2 * tq + (o & 1);
                if (q_valid[r]) atomicAdd(&dq[(rows0 + i0 + r) * HD + d], g.scale * c[o]);
            }
        }
        // Decomposed term: sums of dS over this block's keys by key row (drelh) and by key column
        // (drelw). Where the keys are one row of the window, drelw's are dS itself (consecutive
        // threads add consecutive columns of one query row: coalesced atomics) and drelh's one
        // sum per query row (threads 0..63).
        if (row_tiles) {
            for (int e = tid; e < TC_BQ * TC_BK; e += blockDim.x) {
                const int r = e / TC_BK, kx = e % TC_BK;
                if (q_valid[r]) atomicAdd(&drelw[(rows0 + i0 + r) * g.ww + kx], dsf[r * TC_LDB + kx]);
            }
            if (tid < TC_BQ && q_valid[tid]) {
                float sum = 0.0f;
                for (int kx = 0; kx < TC_BK; ++kx) sum += dsf[tid * TC_LDB + kx];
                atomicAdd(&drelh[(rows0 + i0 + tid) * g.wh + j0 / g.ww], sum);
            }
        } else if (g.rel == 1) {
            const int r = tid % TC_BQ, i = i0 + r;
            const int jend = imin(j0 + TC_BK, n);
            const float* dsr = dsf + r * TC_LDB - j0;  // indexed by key
            if (q_valid[r] && tid < TC_BQ) {
                for (int a = j0 / g.ww; a * g.ww < jend; ++a) {
                    float sum = 0.0f;
                    const int start = a * g.ww > j0 ? a * g.ww : j0;
                    for (int j = start; j < imin((a + 1) * g.ww, jend); ++j) sum += dsr[j];
                    atomicAdd(&drelh[(rows0 + i) * g.wh + a], sum);
                }
            } else if (q_valid[r]) {
                for (int b = 0; b < g.ww; ++b) {
                    float sum = 0.0f;
                    for (int j = j0 + (b - j0 % g.ww + g.ww) % g.ww; j < jend; j += g.ww) sum += dsr[j];
                    atomicAdd(&drelw[(rows0 + i) * g.ww + b], sum);
                }
            }
        }
        __syncthreads();
    }

    // dk, dv of this warp's keys: into dqkv for unpadded keys, the qkv bias for padded ones.
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt)
#pragma unroll
        for (int o = 0; o < 4; ++o) {
            const int j = j0 + r0 + gq + (o >= 2 ? 8 : 0), d = nt * 8 + 2 * tq + (o & 1);
            if (j >= n) continue;
            const Tok kt = token(g, w, j);
            const float dkv = g.scale * dk[nt][o];
            if (kt.valid) {
                T* o_row = dqkv + token_row(g, kt, 3 * g.channels) + h * HD;
                o_row[g.channels + d] = from_f32<T>(dkv);
                o_row[2 * g.channels + d] = from_f32<T>(dv[nt][o]);
            } else if (g.has_bias) {
                atomicAdd(&dbias[g.channels + h * HD + d], dkv);
                atomicAdd(&dbias[2 * g.channels + h * HD + d], dv[nt][o]);
            }
        }
}

// dq of unpadded queries into dqkv's q part: the accumulated scale dS K plus, for the
// decomposed term, sum_a drelh[row, a] rh[y_i, a] + sum_b drelw[row, b] rw[x_i, b]. One thread
// per (row, d): grid ceil(rows * HD / BQ), BQ threads.
template <class T>
__device__ void wa_bwd_dq_tc(const float* dq, const float* drelh, const float* drelw, const T* rh, const T* rw,
                             T* dqkv, WinGeom g) {
    const int n = g.wh * g.ww;
    const long total = (long)g.batch * g.gh * g.gw * g.heads * n * HD;
    const long e = (long)blockIdx.x * BQ + threadIdx.x;
    if (e >= total) return;
    const long row = e / HD;
    const int d = (int)(e % HD);
    const int i = (int)(row % n), h = (int)(row / n % g.heads), w = (int)(row / n / g.heads);
    const Tok qt = token(g, w, i);
    if (!qt.valid) return;
    float acc = dq[e];
    if (g.rel == 1) {
        for (int a = 0; a < g.wh; ++a) acc += drelh[row * g.wh + a] * to_f32(rh[((long)qt.ly * g.wh + a) * HD + d]);
        for (int b = 0; b < g.ww; ++b) acc += drelw[row * g.ww + b] * to_f32(rw[((long)qt.lx * g.ww + b) * HD + d]);
    }
    dqkv[token_row(g, qt, 3 * g.channels) + h * HD + d] = from_f32<T>(acc);
}

#define WA_TC_BWD_ENTRY(T, S)                                                                                  \
    extern "C" __global__ void window_attention_bwd_dsum_tc_##S(const T* out, const T* dout, float* dsum,     \
                                                                WinGeom g) {                                  \
        wa_bwd_dsum_tc<T>(out, dout, dsum, g);                                                                 \
    }                                                                                                          \
    extern "C" __global__ void window_attention_bwd_tc_##S(                                                    \
        const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias, const T* dout,    \
        const float* lse, const float* dsum, float* dq, float* drelh, float* drelw, float* drelbias,           \
        float* dbias, T* dqkv, WinGeom g) {                                                                    \
        wa_bwd_tc<T>(qkv, bias, relh, relw, relbias, dout, lse, dsum, dq, drelh, drelw, drelbias, dbias, dqkv, \
                     g);                                                                                       \
    }                                                                                                          \
    extern "C" __global__ void window_attention_bwd_dq_tc_##S(const float* dq, const float* drelh,            \
                                                              const float* drelw, const T* rh, const T* rw,   \
                                                              T* dqkv, WinGeom g) {                           \
        wa_bwd_dq_tc<T>(dq, drelh, drelw, rh, rw, dqkv, g);                                                    \
    }
VITDET_FOR_EACH_HALF(WA_TC_BWD_ENTRY)
#endif
