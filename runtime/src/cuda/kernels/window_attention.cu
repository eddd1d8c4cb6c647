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
// tiles of TC_BK = 64 through shared memory (each fetched with cp.async into one of two stages
// while the block computes on the other, stored as rows, and read into fragments with
// ldmatrix; V, which P V reads along its columns, with ldmatrix.trans): S = Q K^T and
// O += P V run on mma.m16n8k16 with
// f32 accumulators, and the scores, probabilities, output and row statistics never leave the
// registers: a thread holds two rows' columns of each accumulator, the online softmax reduces
// row maxima and sums over the four threads sharing a row (xor shuffles), and P's accumulator
// fragments are fed back as the A operand of P V. Dynamic shared memory: see
// `tc_shared_bytes` (Rust).
#define TC_BQ 64
#define TC_BK 64
#define TC_THREADS 128  // four warps of 16 rows
static_assert(TC_BQ == TC_BK, "the products take query and key tiles alike");
// The tensor-core kernels exponentiate in base 2 (exp2f is the hardware's ex2; expf adds a
// range reduction): logits are carried times log2 e, and the stored lse converted back.
#define WA_LOG2E 1.4426950408889634f
#define WA_LN2 0.6931471805599453f
#define TC_LDT (HD + 8)      // row stride of the Q, K, V tiles (elements)
#define TC_LDR (TC_BK + 4)   // of the f32 relw rows: 16-byte rows, consecutive rows 4 banks apart

// Whether each TC_BK-key tile (or key block) is one whole row of the window, with the decomposed
// term (global attention at side TC_BK): that term's column part is then the same in every tile.
__device__ __forceinline__ bool wa_row_tiles(const WinGeom& g) { return g.rel == 1 && g.ww == TC_BK; }

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

// Elements d0 .. d0 + 7 of a tile row from `src` (zeros where null) into shared `dst`: an
// asynchronous copy where `vec` (see `tc_load8`), else element by element at once.
template <class T>
__device__ __forceinline__ void tc_copy8(T* dst, const T* src, int d0, bool vec) {
    if (vec) cp_async16(dst, src ? src + d0 : nullptr);
    else store16(dst, tc_load8(src, d0, false));
}

// One stage of a key stream: key tile j0's K and V rows (zero past N) and, where given, the
// keys' place in the window. Each thread takes one key (tid % TC_BK), so that it finds its
// token once.
template <class T>
__device__ __forceinline__ void wa_key_stage(const T* qkv, const T* bias, const WinGeom& g, int w, int h, int j0,
                                             bool vec, T* ks, T* vs, int* key_y, int* key_x) {
    const int n = g.wh * g.ww, tid = threadIdx.x;
    const int jj = tid % TC_BK, j = j0 + jj;
    const T *k = nullptr, *v = nullptr;
    if (j < n) {
        const Tok kt = token(g, w, j);
        k = head_slice(qkv, bias, g, kt, 1, h);
        v = head_slice(qkv, bias, g, kt, 2, h);
    }
    for (int c = tid / TC_BK; c < HD / 8; c += TC_THREADS / TC_BK) {
        tc_copy8(ks + jj * TC_LDT + c * 8, k, c * 8, vec);
        tc_copy8(vs + jj * TC_LDT + c * 8, v, c * 8, vec);
    }
    if (key_y && tid < TC_BK) {
        key_y[jj] = j / g.ww;
        key_x[jj] = j % g.ww;
    }
}

// Query i's slices of head h: its Q (the bias for a padded token, null past N) into `q`, its dO
// (null but for an unpadded token) into `d`. Whether it is an unpadded token.
template <class T>
__device__ __forceinline__ bool wa_query_slices(const T* qkv, const T* bias, const T* dout, const WinGeom& g, int w,
                                                int h, int i, const T*& q, const T*& d) {
    q = nullptr;
    d = nullptr;
    if (i >= g.wh * g.ww) return false;
    const Tok qt = token(g, w, i);
    q = head_slice(qkv, bias, g, qt, 0, h);
    if (qt.valid) d = dout + token_row(g, qt, g.channels) + h * HD;
    return qt.valid;
}

// Query tile i0's Q rows (the bias for padded tokens, zero past N) and, where `dos` is given,
// its dO rows (zero for padded tokens), at once. One query row per thread, as above.
template <class T>
__device__ __forceinline__ void wa_query_rows(const T* qkv, const T* bias, const T* dout, const WinGeom& g, int w,
                                              int h, int i0, bool vec, T* qs, T* dos) {
    const int tid = threadIdx.x, r = tid % TC_BQ;
    const T *q, *d;
    wa_query_slices(qkv, bias, dout, g, w, h, i0 + r, q, d);
    for (int c = tid / TC_BQ; c < HD / 8; c += TC_THREADS / TC_BQ) {
        store16(qs + r * TC_LDT + c * 8, tc_load8(q, c * 8, vec));
        if (dos) store16(dos + r * TC_LDT + c * 8, tc_load8(d, c * 8, vec));
    }
}

// Where every key tile is one whole row of the window (`wa_row_tiles`), the decomposed term's
// column part is the same in every tile: the relw rows of query tile i0 (zero past N, and in
// the padding columns), f32 [TC_BQ][TC_LDR], read by the threads that own each element.
__device__ __forceinline__ void wa_relw_rows(const float* relw, const WinGeom& g, long rows0, int i0, float* rows) {
    const int n = g.wh * g.ww;
    for (int e = threadIdx.x; e < TC_BQ * TC_LDR; e += TC_THREADS) {
        const int r = e / TC_LDR, c = e % TC_LDR, i = i0 + r;
        rows[e] = i < n && c < TC_BK ? relw[(rows0 + i) * g.ww + c] : 0.0f;
    }
}

// The two-stage stream's step before tile t of `tiles` is used: issues tile t + 1 into the other
// stage (`issue(t + 1)`, which commits its copies; that stage was released by the barrier that
// ended the previous step), waits for tile t's copies, and meets the block.
template <class Issue>
__device__ __forceinline__ void wa_stream_step(int t, int tiles, Issue issue) {
    if (t + 1 < tiles) {
        issue(t + 1);
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
}

// A thread's two query rows of a 64-query block (fragment rows gq and gq + 8 of its warp's 16):
// index in the window, whether an unpadded token, and row of the per-row tables.
struct WaQueryRows {
    int i[2];
    bool valid[2];
    long row[2];
};
__device__ __forceinline__ WaQueryRows wa_query_rows_of(const WinGeom& g, int w, long rows0, int i0, int r0, int gq) {
    const int n = g.wh * g.ww;
    WaQueryRows q;
    for (int r = 0; r < 2; ++r) {
        q.i[r] = i0 + r0 + gq + 8 * r;
        q.valid[r] = q.i[r] < n && token(g, w, q.i[r]).valid;
        q.row[r] = rows0 + q.i[r];
    }
    return q;
}

// The two-stage key stream of the forward and the query pass, at the start of their dynamic
// shared memory: per stage the K and V rows and the keys' place in the window (the block's
// query rows pass through stage 1 before the stream starts).
template <class T>
struct WaKeyStream {
    T* tiles;   // 2 x (K, V) rows
    int* keys;  // 2 x (y, x) x TC_BK
    __device__ explicit WaKeyStream(unsigned char* smem)
        : tiles(reinterpret_cast<T*>(smem)), keys(reinterpret_cast<int*>(tiles + 4 * TC_BK * TC_LDT)) {}
    // The shared memory after the stream's.
    __device__ float* end() const { return reinterpret_cast<float*>(keys + 4 * TC_BK); }
    __device__ T* k(int s) const { return tiles + s * 2 * TC_BK * TC_LDT; }
    __device__ T* v(int s) const { return k(s) + TC_BK * TC_LDT; }
    __device__ int* key_y(int s) const { return keys + s * 2 * TC_BK; }
    __device__ int* key_x(int s) const { return key_y(s) + TC_BK; }
    // Issues and commits key tile t into stage t % 2.
    __device__ void issue(const T* qkv, const T* bias, const WinGeom& g, int w, int h, int t, bool vec) const {
        const int s = t & 1;
        wa_key_stage(qkv, bias, g, w, h, t * TC_BK, vec, k(s), v(s), key_y(s), key_x(s));
        cp_async_commit();
    }
};

// Row tiles: the relh of the thread's rows at key row ky (zero for padded rows, and without
// row tiles).
__device__ __forceinline__ void wa_relh_at(float out[2], const float* relh, const WinGeom& g, const WaQueryRows& q,
                                           bool row_tiles, int ky) {
    for (int r = 0; r < 2; ++r) out[r] = row_tiles && q.valid[r] ? relh[q.row[r] * g.wh + ky] : 0.0f;
}

// The A fragments of rows r0..r0+15 of a row-major tile (row stride TC_LDT), one per 16-wide
// slice of the head dim, through ldmatrix: matrices (rows +0, +8) x (columns +0, +8) are
// a[kt][0..3].
template <class T>
__device__ __forceinline__ void wa_tc_frags_a(unsigned a[][4], const T* m, int r0, int lane) {
#pragma unroll
    for (int kt = 0; kt < HD / 16; ++kt)
        ldmatrix_x4(a[kt], m + (r0 + (lane & 15)) * TC_LDT + kt * 16 + (lane & 16 ? 8 : 0));
}

// The B fragments of n-tiles n0 and n0 + 8 (b[0..1], b[2..3]), rows k0 .. k0 + 15, of a
// product whose B operand is a row-major tile used transposed, B(k, c) = m[c * ld + k] (K in
// Q K^T, Q and dO in the key pass's S^T and dP^T), through ldmatrix: each fragment is pairs
// adjacent along the tile's rows.
template <class T>
__device__ __forceinline__ void wa_tc_frag_bt(unsigned b[4], const T* m, int ld, int k0, int n0, int lane) {
    ldmatrix_x4(b, m + (n0 + (lane & 7) + (lane & 16 ? 8 : 0)) * ld + k0 + (lane & 8));
}

// The B fragments of n-tiles n0 and n0 + 8 (b[0..1], b[2..3]), rows k0 .. k0 + 15, of a
// product whose B operand is stored as rows: B(k, c) = m[k * ld + c] (dO or Q in the key
// pass, K in the query pass), through ldmatrix.trans.
template <class T>
__device__ __forceinline__ void wa_tc_frag_b_rows(unsigned b[4], const T* m, int ld, int k0, int n0, int lane) {
    ldmatrix_x4_trans(b, m + (k0 + (lane & 15)) * ld + n0 + (lane & 16 ? 8 : 0));
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

// This warp's 16 rows against a tile's 64 rows (a key or a query tile: TC_BK = TC_BQ): S = A M^T,
// with A's fragments `a` (`wa_tc_frags_a`) and M the tile's rows (row stride TC_LDT).
// Accumulator element e of tile nt is row gq + 8 (e / 2), column nt * 8 + 2 tq + e % 2.
template <class T>
__device__ __forceinline__ void wa_tc_rows_product(float s[][4], const unsigned a[][4], const T* m, int lane) {
#pragma unroll
    for (int nt = 0; nt < TC_BK / 8; nt += 2) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[nt][e] = 0.0f;
            s[nt + 1][e] = 0.0f;
        }
#pragma unroll
        for (int kt = 0; kt < HD / 16; ++kt) {
            unsigned b[4];
            wa_tc_frag_bt(b, m, TC_LDT, kt * 16, nt * 8, lane);
            mma_16816(s[nt], a[kt], b, T());
            mma_16816(s[nt + 1], a[kt], b + 2, T());
        }
    }
}

template <class T>
__device__ void wa_fwd_tc(const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,
                          T* out, float* lse, WinGeom g) {
    DYNAMIC_SHARED(unsigned char, smem);
    const WaKeyStream<T> stream(smem);
    float* relw_rows = stream.end();  // row tiles only
    const int n = g.wh * g.ww;
    const int h = blockIdx.y, w = blockIdx.z;
    const int i0 = blockIdx.x * TC_BQ;
    const bool row_tiles = wa_row_tiles(g);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, tq = lane % 4;
    const int r0 = warp * 16;

    const bool vec = aligned16(qkv) && (!g.has_bias || aligned16(bias));
    // The first keys stream in while the query tile is read, then this warp's Q fragments,
    // kept in registers for the whole key loop.
    stream.issue(qkv, bias, g, w, h, 0, vec);
    wa_query_rows(qkv, bias, (const T*)nullptr, g, w, h, i0, vec, stream.k(1), (T*)nullptr);
    if (row_tiles) wa_relw_rows(relw, g, ((long)w * g.heads + h) * n, i0, relw_rows);
    __syncthreads();
    unsigned qa[HD / 16][4];
    wa_tc_frags_a(qa, stream.k(1), r0, lane);

    // The thread's two query rows (fragment rows gq and gq + 8), their running max (of the
    // logits in log2 units), this thread's share of their sums (its columns; summed over the
    // quad at the end) and its columns of O.
    const WaQueryRows qr = wa_query_rows_of(g, w, ((long)w * g.heads + h) * n, i0, r0, gq);
    const int* qi = qr.i;
    const bool* query = qr.valid;
    const long* qrow = qr.row;
    float m[2] = {VITDET_NEG_INF, VITDET_NEG_INF}, l[2] = {0.0f, 0.0f};
    float o[HD / 8][4];
    for (int nt = 0; nt < HD / 8; ++nt)
        for (int e = 0; e < 4; ++e) o[nt][e] = 0.0f;

    // Row tiles: the tile's relh is read once per row and tile, relw from the block's rows.
    __syncthreads();  // stage 1 is free
    const int tiles = (n + TC_BK - 1) / TC_BK;
    for (int t = 0; t < tiles; ++t) {
        const int s = t & 1, j0 = t * TC_BK;
        float relh_row[2];
        wa_relh_at(relh_row, relh, g, qr, row_tiles, j0 / g.ww);
        wa_stream_step(t, tiles, [&](int next) { stream.issue(qkv, bias, g, w, h, next, vec); });
        const T *ks = stream.k(s), *vs = stream.v(s);
        // The keys' positions in the window, for the decomposed term (one division each per
        // tile rather than per logit).
        const int *key_y = stream.key_y(s), *key_x = stream.key_x(s);
        // S = Q K^T.
        float sc[TC_BK / 8][4];
        wa_tc_rows_product<T>(sc, qa, ks, lane);
        // Logits, and the rows' new maxima over the quad that shares them.
        float mx[2] = {m[0], m[1]};
        for (int nt = 0; nt < TC_BK / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                const int r = e / 2, jj = nt * 8 + 2 * tq + e % 2, j = j0 + jj;
                float s = VITDET_NEG_INF;
                if (j < n) {
                    const float rel =
                        row_tiles  ? relh_row[r] + relw_rows[(r0 + gq + 8 * r) * TC_LDR + jj]
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
            for (int nt = 0; nt < HD / 8; nt += 2) {
                unsigned b[4];
                wa_tc_frag_b_rows(b, vs, TC_LDT, kt * 16, nt * 8, lane);
                mma_16816(o[nt], a, b, T());
                mma_16816(o[nt + 1], a, b + 2, T());
            }
        }
        __syncthreads();  // this stage is free for the tile after next
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

// Tensor-core backward for f16 / bf16, flash-attention-2 style, in four kernels:
// - `wa_bwd_dsum_tc` stores D = rowsum(dout * out) per query row;
// - `wa_bwd_kv_tc` gives a block of four warps TC_BK = 64 keys of a (window, head), 16 per
//   warp, and streams the queries past them in tiles of TC_BQ = 64: each warp recomputes
//   S^T = K Q^T and dP^T = V dO^T for its keys, turns them in registers into
//   P^T = exp(scale s + rel - lse) and dS^T = P^T (dP^T - D), and feeds those accumulator
//   fragments straight back as A operands of dV += P^T dO and dK += dS^T Q (the m16n8
//   accumulator layout of two adjacent column tiles is the m16k16 A layout);
// - `wa_bwd_q_tc` gives a block 64 queries and streams the keys, as the forward does:
//   S = Q K^T and dP = dO V^T again, then dQ += dS K, and the decomposed term's gradients
//   (dS summed by key row and by key column) and the BEiT bias's;
// - `wa_bwd_dq_tc` adds the decomposed term's q-gradient and writes dq into dqkv.
// Every block owns what it writes, so dq, dk, dv and the decomposed rows need no atomics; only
// the BEiT bias (shared by the windows) and the qkv bias's padded-token share (by the keys)
// are summed with atomicAdd. Recomputing S and dP in both key and query passes costs two more
// products per tile pair, which is cheap beside the atomics it replaces.
//
// Each streamed tile is fetched with cp.async into one of two shared-memory stages while the
// block computes on the other, and every fragment is read with ldmatrix: products that take a
// tile along its columns (dO and Q in dV and dK, K in dQ) with ldmatrix.trans, so every tile is
// stored once, as rows. The results are the f32 kernels' (`wa_bwd_q`, `wa_bwd_kv`). Dynamic
// shared memory: see `tc_bwd_kv_shared_bytes` and `tc_bwd_q_shared_bytes` (Rust).
#define TC_LDB (TC_BK + 1)       // row stride of the f32 dS tile: one thread per query row reads columns

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

// One stage of the key pass: query tile i0's Q and dO rows (zero for padded queries), their
// lse, D and validity, and where the keys are one row `ky` of the window (`row_tiles`) their
// relh at that row and relw rows. Each thread takes one query row (tid % TC_BQ), so that it
// finds its token once.
template <class T>
__device__ __forceinline__ void wa_bwd_kv_stage(const T* qkv, const T* bias, const T* dout, const float* lse,
                                                const float* dsum, const float* relh, const float* relw,
                                                const WinGeom& g, int w, int h, long rows0, int i0, int ky,
                                                bool row_tiles, bool vec, T* qs, T* dos, float* q_lse, float* q_d,
                                                float* q_relh, int* q_valid, float* relw_tile) {
    const int n = g.wh * g.ww, tid = threadIdx.x;
    const int r = tid % TC_BQ, i = i0 + r;
    const T *q, *d;
    const bool valid = wa_query_slices(qkv, bias, dout, g, w, h, i, q, d);
    if (!valid) q = nullptr;  // a padded query's row is masked out: zeros
    for (int c = tid / TC_BQ; c < HD / 8; c += TC_THREADS / TC_BQ) {
        tc_copy8(qs + r * TC_LDT + c * 8, q, c * 8, vec);
        tc_copy8(dos + r * TC_LDT + c * 8, d, c * 8, vec);
    }
    if (tid < TC_BQ) {
        const long row = rows0 + i;
        q_valid[r] = valid;
        cp_async4(q_lse + r, valid ? lse + row : nullptr);
        cp_async4(q_d + r, valid ? dsum + row : nullptr);
        if (row_tiles) cp_async4(q_relh + r, valid ? relh + row * g.wh + ky : nullptr);
    }
    if (row_tiles)
        for (int e = tid; e < TC_BQ * (TC_BK / 4); e += TC_THREADS) {
            const int rr = e / (TC_BK / 4), c4 = e % (TC_BK / 4) * 4, ii = i0 + rr;
            cp_async16(relw_tile + rr * TC_LDR + c4, ii < n ? relw + (rows0 + ii) * g.ww + c4 : nullptr);
        }
}

// The key pass. Grid (ceil(N / TC_BK), heads, windows), TC_THREADS threads: dk and dv of
// the block's keys into dqkv, the padded keys' share into dbias (zero-filled).
template <class T>
__device__ void wa_bwd_kv_tc(const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,
                             const T* dout, const float* lse, const float* dsum, float* dbias, T* dqkv, WinGeom g) {
    DYNAMIC_SHARED(unsigned char, smem);
    // The block's K and V rows; then per stage the Q and dO rows, four per-query values, and
    // (row tiles only) the relw rows.
    T* ks = reinterpret_cast<T*>(smem);
    T* vs = ks + TC_BK * TC_LDT;
    T* stage_tiles = vs + TC_BK * TC_LDT;                                         // 2 x (Q, dO)
    float* stage_rows = reinterpret_cast<float*>(stage_tiles + 4 * TC_BQ * TC_LDT);  // 2 x 4 x TC_BQ
    float* stage_relw = stage_rows + 8 * TC_BQ;                                   // 2 x TC_BQ x TC_LDR

    const int n = g.wh * g.ww;
    const int h = blockIdx.y, w = blockIdx.z;
    const int j0 = blockIdx.x * TC_BK;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, tq = lane % 4;
    const int r0 = warp * 16;  // this warp's keys: rows of S^T, dK, dV
    const long rows0 = ((long)w * g.heads + h) * n;  // row of query 0
    const bool row_tiles = wa_row_tiles(g);
    const bool vec = aligned16(qkv) && (!g.has_bias || aligned16(bias)) && aligned16(dout);

    // The block's keys' place in the window (in shared memory: registers are the scarcer).
    __shared__ int key_y[TC_BK], key_x[TC_BK];
    for (int jj = tid; jj < TC_BK; jj += TC_THREADS) {
        key_y[jj] = (j0 + jj) / g.ww;
        key_x[jj] = (j0 + jj) % g.ww;
    }

    auto stage = [&](int s, int i0) {
        T* qs = stage_tiles + s * 2 * TC_BQ * TC_LDT;
        float* rows = stage_rows + s * 4 * TC_BQ;
        wa_bwd_kv_stage(qkv, bias, dout, lse, dsum, relh, relw, g, w, h, rows0, i0, j0 / g.ww, row_tiles, vec, qs,
                        qs + TC_BQ * TC_LDT, rows, rows + TC_BQ, rows + 2 * TC_BQ,
                        reinterpret_cast<int*>(rows + 3 * TC_BQ), stage_relw + s * TC_BQ * TC_LDR);
        cp_async_commit();
    };
    // The block's keys (zero past N, and masked out of P below), then the first query tile.
    wa_key_stage(qkv, bias, g, w, h, j0, vec, ks, vs, (int*)nullptr, (int*)nullptr);
    stage(0, 0);
    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt)
#pragma unroll
        for (int o = 0; o < 4; ++o) {
            dk[nt][o] = 0.0f;
            dv[nt][o] = 0.0f;
        }

    const int tiles = (n + TC_BQ - 1) / TC_BQ;
    for (int t = 0; t < tiles; ++t) {
        const int s = t & 1, i0 = t * TC_BQ;
        wa_stream_step(t, tiles, [&](int next) { stage(next & 1, next * TC_BQ); });
        const T* qs = stage_tiles + s * 2 * TC_BQ * TC_LDT;
        const T* dos = qs + TC_BQ * TC_LDT;
        const float* q_lse = stage_rows + s * 4 * TC_BQ;
        const float* q_d = q_lse + TC_BQ;
        const float* q_relh = q_d + TC_BQ;
        const int* q_valid = reinterpret_cast<const int*>(q_relh + TC_BQ);
        const float* relw_tile = stage_relw + s * TC_BQ * TC_LDR;

        // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys against the tile's 64 queries, one
        // product after the other (the K and V fragments read once per tile: holding them across
        // tiles, or both at once, makes ptxas spill at head dim 80).
        float sc[TC_BQ / 8][4], dp[TC_BQ / 8][4];
        {
            unsigned ka[HD / 16][4];
            wa_tc_frags_a(ka, ks, r0, lane);
            wa_tc_rows_product<T>(sc, ka, qs, lane);
        }
        {
            unsigned va[HD / 16][4];
            wa_tc_frags_a(va, vs, r0, lane);
            wa_tc_rows_product<T>(dp, va, dos, lane);
        }
        // In place: sc becomes P^T, dp becomes dS^T.
#pragma unroll
        for (int nt = 0; nt < TC_BQ / 8; ++nt)
#pragma unroll
            for (int o = 0; o < 4; ++o) {
                const int key = r0 + gq + (o >= 2 ? 8 : 0), r = nt * 8 + 2 * tq + (o & 1);
                const int j = j0 + key, i = i0 + r;
                float p = 0.0f;
                if (q_valid[r] && j < n) {
                    const float rel = row_tiles ? q_relh[r] + relw_tile[r * TC_LDR + key]
                                                : rel_logit_at(g, relh, relw, relbias, rows0 + i, h, i, j, key_y[key],
                                                               key_x[key]);
                    p = exp2f((g.scale * sc[nt][o] + rel - q_lse[r]) * WA_LOG2E);
                }
                sc[nt][o] = p;
                dp[nt][o] = p * (dp[nt][o] - q_d[r]);
            }
        // dV += P^T dO, dK += dS^T Q (scale applied once at the end).
#pragma unroll
        for (int kt = 0; kt < TC_BQ / 16; ++kt) {
            unsigned ap[4], ad[4];
            wa_tc_acc_as_a<T>(ap, sc, kt);
            wa_tc_acc_as_a<T>(ad, dp, kt);
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt += 2) {
                unsigned b[4];
                wa_tc_frag_b_rows(b, dos, TC_LDT, kt * 16, nt * 8, lane);
                mma_16816(dv[nt], ap, b, T());
                mma_16816(dv[nt + 1], ap, b + 2, T());
                wa_tc_frag_b_rows(b, qs, TC_LDT, kt * 16, nt * 8, lane);
                mma_16816(dk[nt], ad, b, T());
                mma_16816(dk[nt + 1], ad, b + 2, T());
            }
        }
        __syncthreads();  // this stage is free for the tile after next
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

// The query pass. Grid (ceil(N / TC_BQ), heads, windows), TC_THREADS threads: dq (f32,
// before the decomposed term's share) of the block's queries into `dq`, their drelh and drelw
// rows, and their share of drelbias (zero-filled, atomicAdd).
template <class T>
__device__ void wa_bwd_q_tc(const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,
                            const T* dout, const float* lse, const float* dsum, float* dq, float* drelh,
                            float* drelw, float* drelbias, WinGeom g) {
    DYNAMIC_SHARED(unsigned char, smem);
    // The key stream; then, for the decomposed term, either (row tiles) the block's relw rows
    // and their gradient, or the f32 dS tile and the block's drelh and drelw rows.
    const WaKeyStream<T> stream(smem);
    float* rel_area = stream.end();
    float* relw_rows = rel_area;                       // row tiles: [TC_BQ][TC_LDR]
    float* drelw_rows = relw_rows + TC_BQ * TC_LDR;    // row tiles: [TC_BQ][TC_LDR]
    float* dsf = rel_area;                             // else: dS [query][key], stride TC_LDB
    float* drelh_acc = dsf + TC_BQ * TC_LDB;           // else: [TC_BQ][wh]
    float* drelw_acc = drelh_acc + TC_BQ * g.wh;       // else: [TC_BQ][ww]

    const int n = g.wh * g.ww;
    const int h = blockIdx.y, w = blockIdx.z;
    const int i0 = blockIdx.x * TC_BQ;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, tq = lane % 4;
    const int r0 = warp * 16;  // this warp's queries: rows of S, dP, dQ
    const long rows0 = ((long)w * g.heads + h) * n;
    const bool row_tiles = wa_row_tiles(g);
    const bool vec = aligned16(qkv) && (!g.has_bias || aligned16(bias)) && aligned16(dout);

    // The block's Q and dO rows go through stage 1's tiles into this warp's A fragments, kept
    // in registers for the whole key loop; stage 0 streams the first keys meanwhile.
    stream.issue(qkv, bias, g, w, h, 0, vec);
    wa_query_rows(qkv, bias, dout, g, w, h, i0, vec, stream.k(1), stream.v(1));
    if (row_tiles) wa_relw_rows(relw, g, rows0, i0, relw_rows);
    if (g.rel == 1)
        for (int e = tid; e < TC_BQ * (row_tiles ? TC_LDR : g.wh + g.ww); e += TC_THREADS) {
            if (row_tiles) drelw_rows[e] = 0.0f;
            else drelh_acc[e] = 0.0f;  // drelw_acc follows drelh_acc
        }
    __syncthreads();
    unsigned qa[HD / 16][4], da[HD / 16][4];
    wa_tc_frags_a(qa, stream.k(1), r0, lane);
    wa_tc_frags_a(da, stream.v(1), r0, lane);
    // The thread's two query rows, their lse and D.
    const WaQueryRows qr = wa_query_rows_of(g, w, rows0, i0, r0, gq);
    const int* qi = qr.i;
    const bool* query = qr.valid;
    const long* qrow = qr.row;
    float q_lse[2], q_d[2];
    for (int r = 0; r < 2; ++r) {
        q_lse[r] = query[r] ? lse[qrow[r]] : 0.0f;
        q_d[r] = query[r] ? dsum[qrow[r]] : 0.0f;
    }
    float dqa[HD / 8][4];
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt)
#pragma unroll
        for (int o = 0; o < 4; ++o) dqa[nt][o] = 0.0f;
    __syncthreads();  // stage 1 is free

    const int tiles = (n + TC_BK - 1) / TC_BK;
    for (int t = 0; t < tiles; ++t) {
        const int s = t & 1, j0 = t * TC_BK;
        // Row tiles: this tile is row j0 / ww of the window; its relh per query row.
        float relh_row[2];
        wa_relh_at(relh_row, relh, g, qr, row_tiles, j0 / g.ww);
        wa_stream_step(t, tiles, [&](int next) { stream.issue(qkv, bias, g, w, h, next, vec); });
        const T *ks = stream.k(s), *vs = stream.v(s);
        const int *key_y = stream.key_y(s), *key_x = stream.key_x(s);

        // S = Q K^T and dP = dO V^T: this warp's 16 queries against the tile's 64 keys.
        float sc[TC_BK / 8][4], dp[TC_BK / 8][4];
        wa_tc_rows_product<T>(sc, qa, ks, lane);
        wa_tc_rows_product<T>(dp, da, vs, lane);
        // dS in place of dP; its sums for the decomposed term.
        float hsum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int nt = 0; nt < TC_BK / 8; ++nt)
#pragma unroll
            for (int o = 0; o < 4; ++o) {
                const int r = o / 2, row = r0 + gq + 8 * r, jj = nt * 8 + 2 * tq + (o & 1), j = j0 + jj;
                const bool live = query[r] && j < n;
                float p = 0.0f;
                if (live) {
                    const float rel = row_tiles ? relh_row[r] + relw_rows[row * TC_LDR + jj]
                                                : rel_logit_at(g, relh, relw, relbias, qrow[r], h, qi[r], j,
                                                               key_y[jj], key_x[jj]);
                    p = exp2f((g.scale * sc[nt][o] + rel - q_lse[r]) * WA_LOG2E);
                }
                const float ds = p * (dp[nt][o] - q_d[r]);
                dp[nt][o] = ds;
                if (row_tiles) {
                    drelw_rows[row * TC_LDR + jj] += ds;  // this thread's own element
                    hsum[r] += ds;
                } else if (g.rel == 1) {
                    dsf[row * TC_LDB + jj] = ds;
                } else if (g.rel == 2 && live) {
                    atomicAdd(&drelbias[((long)h * n + qi[r]) * n + j], ds);
                }
            }
        // dQ += dS K (scale applied once at the end).
#pragma unroll
        for (int kt = 0; kt < TC_BK / 16; ++kt) {
            unsigned a[4];
            wa_tc_acc_as_a<T>(a, dp, kt);
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt += 2) {
                unsigned b[4];
                wa_tc_frag_b_rows(b, ks, TC_LDT, kt * 16, nt * 8, lane);
                mma_16816(dqa[nt], a, b, T());
                mma_16816(dqa[nt + 1], a, b + 2, T());
            }
        }
        if (row_tiles) {
            // The tile's keys are one row of the window: one drelh sum per query row, over the
            // four threads that share it.
            for (int r = 0; r < 2; ++r) {
                hsum[r] += shfl_xor(hsum[r], 1);
                hsum[r] += shfl_xor(hsum[r], 2);
                if (tq == 0 && query[r]) drelh[qrow[r] * g.wh + j0 / g.ww] = hsum[r];
            }
        } else if (g.rel == 1) {
            // dS summed by key row (threads 0..63, one query row each) and by key column
            // (threads 64..127) into the block's rows.
            __syncthreads();
            const int r = tid % TC_BQ;
            const int jend = imin(j0 + TC_BK, n);
            const float* dsr = dsf + r * TC_LDB - j0;  // indexed by key
            if (tid < TC_BQ) {
                for (int a = j0 / g.ww; a * g.ww < jend; ++a) {
                    float sum = 0.0f;
                    const int start = a * g.ww > j0 ? a * g.ww : j0;
                    for (int j = start; j < imin((a + 1) * g.ww, jend); ++j) sum += dsr[j];
                    drelh_acc[r * g.wh + a] += sum;
                }
            } else {
                for (int b = 0; b < g.ww; ++b) {
                    float sum = 0.0f;
                    for (int j = j0 + (b - j0 % g.ww + g.ww) % g.ww; j < jend; j += g.ww) sum += dsr[j];
                    drelw_acc[r * g.ww + b] += sum;
                }
            }
        }
        __syncthreads();  // this stage (and the dS tile) is free
    }

    // dq of this warp's queries; the block's drelw (and drelh) rows.
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt)
#pragma unroll
        for (int o = 0; o < 4; ++o) {
            const int r = o / 2;
            if (query[r]) dq[qrow[r] * HD + nt * 8 + 2 * tq + (o & 1)] = g.scale * dqa[nt][o];
        }
    if (g.rel == 1)
        for (int e = tid; e < TC_BQ * (row_tiles ? TC_BK : g.wh + g.ww); e += TC_THREADS) {
            const int wide = row_tiles ? TC_BK : g.wh + g.ww;
            const int r = e / wide, c = e % wide, i = i0 + r;
            if (i >= n || !token(g, w, i).valid) continue;
            if (row_tiles) drelw[(rows0 + i) * g.ww + c] = drelw_rows[r * TC_LDR + c];
            else if (c < g.wh) drelh[(rows0 + i) * g.wh + c] = drelh_acc[r * g.wh + c];
            else drelw[(rows0 + i) * g.ww + c - g.wh] = drelw_acc[r * g.ww + c - g.wh];
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
    extern "C" __global__ void window_attention_bwd_kv_tc_##S(                                                 \
        const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias, const T* dout,    \
        const float* lse, const float* dsum, float* dbias, T* dqkv, WinGeom g) {                               \
        wa_bwd_kv_tc<T>(qkv, bias, relh, relw, relbias, dout, lse, dsum, dbias, dqkv, g);                      \
    }                                                                                                          \
    extern "C" __global__ void window_attention_bwd_q_tc_##S(                                                  \
        const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias, const T* dout,    \
        const float* lse, const float* dsum, float* dq, float* drelh, float* drelw, float* drelbias,           \
        WinGeom g) {                                                                                           \
        wa_bwd_q_tc<T>(qkv, bias, relh, relw, relbias, dout, lse, dsum, dq, drelh, drelw, drelbias, g);        \
    }                                                                                                          \
    extern "C" __global__ void window_attention_bwd_dq_tc_##S(const float* dq, const float* drelh,            \
                                                              const float* drelw, const T* rh, const T* rw,   \
                                                              T* dqkv, WinGeom g) {                           \
        wa_bwd_dq_tc<T>(dq, drelh, drelw, rh, rw, dqkv, g);                                                    \
    }
VITDET_FOR_EACH_HALF(WA_TC_BWD_ENTRY)
#endif
