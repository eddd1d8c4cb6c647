// Host entry points of the emulated tensor-core window-attention kernels (forward and backward), built with HD = 16
// (the mma tiles need head dims that are multiples of 16) in its own namespace, so its
// templates do not collide with the HD = 8 build of the same source.
#include "cuda_emu.h"

namespace tc16 {
#undef HD
#define HD 16
#define WA_NO_FMA_ENTRIES
#include "common.cuh"
#include "window_attention.cu"
}  // namespace tc16
using namespace tc16;

#define WA_TC_LAUNCHER(T, S)                                                                              \
    EMU_LAUNCHER_SMEM(window_attention_fwd_tc_##S, smem,                                                  \
                      (Launch l, unsigned smem, const T* qkv, const T* bias, const float* relh,          \
                       const float* relw, const T* relbias, T* out, float* lse, WinGeom g),              \
                      (qkv, bias, relh, relw, relbias, out, lse, g))
WA_TC_LAUNCHER(f16_t, f16)
WA_TC_LAUNCHER(bf16_t, bf16)

// The decomposed term's tables, the tensor-core backward's kernels and the tables' gradient,
// for the same head dim.
#define WA_TC_SIDE_LAUNCHERS(T, S)                                                                         \
    extern "C" void emu_window_attention_rel_tables_tc_##S(Launch l, const T* qkv, const T* bias,         \
                                                           const T* rh, const T* rw, float* relh,         \
                                                           float* relw, WinGeom g) {                      \
        emu::launch(dim3(l.grid[0], l.grid[1], l.grid[2]), dim3(l.block[0], l.block[1], l.block[2]), 0,  \
                    [&] { wa_rel_tables<T>(qkv, bias, rh, rw, relh, relw, g); });                          \
    }                                                                                                     \
    EMU_LAUNCHER(window_attention_bwd_dsum_tc_##S, (Launch l, const T* out, const T* dout, float* dsum, WinGeom g), \
                 (out, dout, dsum, g))                                                                    \
    EMU_LAUNCHER_SMEM(window_attention_bwd_tc_##S, smem,                                                  \
                      (Launch l, unsigned smem, const T* qkv, const T* bias, const float* relh,          \
                       const float* relw, const T* relbias, const T* dout, const float* lse,             \
                       const float* dsum, float* dq, float* drelh, float* drelw, float* drelbias,        \
                       float* dbias, T* dqkv, WinGeom g),                                                 \
                      (qkv, bias, relh, relw, relbias, dout, lse, dsum, dq, drelh, drelw, drelbias, dbias, dqkv, g)) \
    EMU_LAUNCHER(window_attention_bwd_dq_tc_##S,                                                          \
                 (Launch l, const float* dq, const float* drelh, const float* drelw, const T* rh, const T* rw, \
                  T* dqkv, WinGeom g),                                                                    \
                 (dq, drelh, drelw, rh, rw, dqkv, g))                                                     \
    extern "C" void emu_window_attention_rel_tables_grad_tc_##S(Launch l, const T* qkv, const T* bias,    \
                                                                const float* drel, float* dr, WinGeom g,  \
                                                                int axis) {                               \
        emu::launch(dim3(l.grid[0], l.grid[1], l.grid[2]), dim3(l.block[0], l.block[1], l.block[2]), 0,  \
                    [&] { wa_rel_tables_grad<T>(qkv, bias, drel, dr, g, axis); });                         \
    }
WA_TC_SIDE_LAUNCHERS(f16_t, f16)
WA_TC_SIDE_LAUNCHERS(bf16_t, bf16)
