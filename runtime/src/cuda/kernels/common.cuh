// Shared by every kernel source: storage types and conversions, compiled either by NVRTC for
// the GPU or, with VITDET_EMU defined, as host C++ by the emulator that tests the kernels on
// the CPU (see the `vitdet-cuda-emu` crate). No system headers: NVRTC needs no include path.

// Half-precision storage types: 16 bits, converted to f32 for arithmetic.
struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

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
    bf16_t r;
    r.bits = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    return r;
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
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
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
#ifdef VITDET_T
#define VITDET_FOR_EACH_FLOAT(M) M(VITDET_T, VITDET_S)
#else
#define VITDET_FOR_EACH_FLOAT(M) M(float, f32) M(f16_t, f16) M(bf16_t, bf16)
#endif
