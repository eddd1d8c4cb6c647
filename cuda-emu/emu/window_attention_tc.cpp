// Host entry point of the emulated tensor-core window-attention forward, built with HD = 16
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

// The decomposed term's tables for the same head dim (the forward's first kernel).
extern "C" void emu_window_attention_rel_tables_tc_f16(Launch l, const f16_t* qkv, const f16_t* bias,
                                                       const f16_t* rh, const f16_t* rw, float* relh, float* relw,
                                                       WinGeom g) {
    emu::launch(dim3(l.grid[0], l.grid[1], l.grid[2]), dim3(l.block[0], l.block[1], l.block[2]), 0,
                [&] { wa_rel_tables<f16_t>(qkv, bias, rh, rw, relh, relw, g); });
}
