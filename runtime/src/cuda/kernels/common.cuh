// Shared by every kernel source: storage types and conversions, compiled either by NVRTC for
// the GPU or, with VITDET_EMU defined, as host C++ by the emulator that tests the kernels on
// the CPU (see the `vitdet-cuda-emu` crate). No system headers: NVRTC needs no include path.

// Half-precision storage types: 16 bits, converted to f32 for arithmetic.
struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

// f32 bits to bf16, rounded to nearest even as cvt.rn.bf16.f32 does; a NaN stays a (quiet) NaN,
// as it does there, where the rounding carry would turn it into an infinity or zero. (The
// emulator's conversion, and the GPU's before compute 8.0.)
__device__ __forceinline__ bf16_t bf16_round(unsigned u) {
    bf16_t r;
    r.bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? (unsigned short)((u >> 16) | 0x40u)
                                              : (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return r;
}

#ifdef VITDET_EMU
__device__ __forceinline__ float to_f32(f16_t x) {
    _Float16 h;
    memcpy(&h, &x.bits, 2);
    return (float)h;
}
__device__ __forceinline__ float to_f32(bf16_t x) {
    unsigned u = ((unsigned)x.bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    _Float16 h = (_Float16)x;
    f16_t r;
    memcpy(&r.bits, &h, 2);
    return r;
}
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    unsigned u;
    memcpy(&u, &x, 4);
    return bf16_round(u);
}
#else
__device__ __forceinline__ float to_f32(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t x) { return __uint_as_float(((unsigned)x.bits) << 16); }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
#if __CUDA_ARCH__ >= 800
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
#else
// Before compute 8.0 there is no bf16 conversion instruction.
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) { return bf16_round(__float_as_uint(x)); }
#endif
#endif

#ifdef VITDET_EMU
#define VITDET_NEG_INF (-INFINITY)
#else
#define VITDET_NEG_INF (-__int_as_float(0x7f800000))
#endif

#ifndef VITDET_EMU
// Dynamic shared memory as a typed pointer (the emulator defines its own).
#define DYNAMIC_SHARED(T, name)                           \
    extern __shared__ __align__(16) unsigned char name##_raw[]; \
    T* name = reinterpret_cast<T*>(name##_raw)
#endif

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Instantiates `name<T>` as extern "C" entry points `name_f32`, `name_f16`, `name_bf16`, or
// only the one a module is compiled for (VITDET_T / VITDET_S defined: NVRTC's compile time
// grows with every instantiation).
// Expands VITDET_T / VITDET_S before M sees them (M pastes its arguments with ##, which would
// otherwise paste the macro names themselves).
#define VITDET_APPLY(M, T, S) M(T, S)
#ifdef VITDET_T
#define VITDET_FOR_EACH_FLOAT(M) VITDET_APPLY(M, VITDET_T, VITDET_S)
#else
#define VITDET_FOR_EACH_FLOAT(M) M(float, f32) M(f16_t, f16) M(bf16_t, bf16)
#endif

// The same for the half types only (tensor-core kernels): none in an f32 module.
#if defined(VITDET_T) && defined(VITDET_HALF)
#define VITDET_FOR_EACH_HALF(M) VITDET_APPLY(M, VITDET_T, VITDET_S)
#elif defined(VITDET_T)
#define VITDET_FOR_EACH_HALF(M)
#else
#define VITDET_FOR_EACH_HALF(M) M(f16_t, f16) M(bf16_t, bf16)
#endif

// The value of lane `lane ^ mask` of the warp (every lane of the warp calls it; in the emulator
// every thread of the block).
#ifdef VITDET_EMU
__device__ __forceinline__ float shfl_xor(float v, int mask) { return emu::shfl_xor(v, mask); }
#else
__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
#endif

// One warp's tensor-core product D += A B (PTX mma.m16n8k16: A 16x16 row-major, B 16x8
// column-major, f32 accumulators), fragments laid out as the PTX ISA specifies: with
// g = lane / 4 and t = lane % 4, a[0] holds A(g, 2t..2t+1), a[1] A(g+8, 2t..), a[2]
// A(g, 2t+8..), a[3] A(g+8, 2t+8..); b[0] B(2t..2t+1, g), b[1] B(2t+8.., g); d[0..1]
// D(g, 2t..2t+1), d[2..3] D(g+8, 2t..). Each 32-bit register packs two 16-bit values, the
// lower-indexed one in the low half. Every thread of the block must call it together (the
// emulator exchanges fragments through a block barrier).
#ifdef VITDET_EMU
__device__ __forceinline__ float emu_decode_f16(unsigned short b) { f16_t x; x.bits = b; return to_f32(x); }
__device__ __forceinline__ float emu_decode_bf16(unsigned short b) { bf16_t x; x.bits = b; return to_f32(x); }
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2], f16_t) {
    emu::mma_16816(d, a, b, emu_decode_f16);
}
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2], bf16_t) {
    emu::mma_16816(d, a, b, emu_decode_bf16);
}
#else
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2], f16_t) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2], bf16_t) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// 16-byte moves (one ld/st.v4.u32 instruction on the GPU): `p` must be 16-byte aligned, which
// the emulator checks.
struct alignas(16) vec16 {
    unsigned x, y, z, w;
};
#ifdef VITDET_EMU
__device__ __forceinline__ vec16 load16(const void* p) {
    emu::check_aligned(p, 16);
    vec16 v;
    memcpy(&v, p, 16);
    return v;
}
__device__ __forceinline__ void store16(void* p, vec16 v) {
    emu::check_aligned(p, 16);
    memcpy(p, &v, 16);
}
#else
__device__ __forceinline__ vec16 load16(const void* p) { return *reinterpret_cast<const vec16*>(p); }
__device__ __forceinline__ void store16(void* p, vec16 v) { *reinterpret_cast<vec16*>(p) = v; }
#endif
__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15u) == 0; }

// Asynchronous copies from global to shared memory (cp.async, compute 8.0 and later), so a
// block can fetch its next tile while it computes on the current one: `cp_async16` moves 16
// bytes (both addresses 16-byte aligned), `cp_async4` 4; a null source stores zeros instead.
// `cp_async_commit` closes the group of copies this thread issued since the last one;
// `cp_async_wait<N>` returns once all but the N newest groups have landed (this thread's
// copies only: a block barrier must follow before other threads read them). The emulator
// delays each copy until a wait covers it, as the GPU may. (Defined for compute 8.0 and later
// only, as the kernels that use them.)
#ifdef VITDET_EMU
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    if (src == nullptr) {
        store16(dst, vec16{0u, 0u, 0u, 0u});
        return;
    }
    emu::async_copy(dst, src, 16);
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    if (src == nullptr) {
        emu::check_aligned(dst, 4);
        memset(dst, 0, 4);
        return;
    }
    emu::async_copy(dst, src, 4);
}
__device__ __forceinline__ void cp_async_commit() { emu::async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    emu::async_wait(N);
}
#elif __CUDA_ARCH__ >= 800
__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    if (src == nullptr) {
        store16(dst, vec16{0u, 0u, 0u, 0u});
        return;
    }
    // .ca: through L1, where the other threads reading the same 32-byte sectors find them.
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(shared_address(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    if (src == nullptr) {
        *reinterpret_cast<unsigned*>(dst) = 0u;
        return;
    }
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(shared_address(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif

// Four 8x8 matrices of 16-bit elements from shared memory (ldmatrix.x4): lane l gives the
// address of row l % 8 of matrix l / 8 (16-byte aligned); r[m] receives elements
// (lane / 4, 2 (lane % 4)) and (lane / 4, 2 (lane % 4) + 1) of matrix m, or with the .trans
// form (`ldmatrix_x4_trans`) elements (2 (lane % 4), lane / 4) and (2 (lane % 4) + 1, lane / 4).
// Every lane of the warp calls it (in the emulator every thread of the block).
#ifdef VITDET_EMU
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row) { emu::ldmatrix_x4(r, row, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* row) { emu::ldmatrix_x4(r, row, true); }
#elif __CUDA_ARCH__ >= 800
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}
#endif

// Two 16-bit values packed into one mma register, `lo` in the low half.
template <class T>
__device__ __forceinline__ unsigned pack2(T lo, T hi) {
    return (unsigned)lo.bits | ((unsigned)hi.bits << 16);
}
