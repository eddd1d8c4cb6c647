// Host entry points of the emulated window-attention kernels: each launches one kernel
// over the given grid and block (see cuda_emu.h). Built with HD = 8 (head dim of the
// attention kernels under test).
#include "cuda_emu.h"
#include "common.cuh"
#include "window_attention.cu"

#define WA_LAUNCHERS(T, S)                                                                                        \
    EMU_LAUNCHER(window_attention_fwd_##S,                                                                        \
                 (Launch l, const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,  \
                  T* out, float* lse, WinGeom g),                                                                 \
                 (qkv, bias, relh, relw, relbias, out, lse, g))                                                   \
    EMU_LAUNCHER(window_attention_bwd_q_##S,                                                                      \
                 (Launch l, const T* qkv, const T* bias, const float* relh, const float* relw, const T* rh,       \
                  const T* rw, const T* relbias, const T* out, const T* dout, const float* lse, float* dsum,      \
                  float* drelh, float* drelw, float* drelbias, T* dqkv, WinGeom g),                               \
                 (qkv, bias, relh, relw, rh, rw, relbias, out, dout, lse, dsum, drelh, drelw, drelbias, dqkv, g)) \
    EMU_LAUNCHER(window_attention_bwd_kv_##S,                                                                     \
                 (Launch l, const T* qkv, const T* bias, const float* relh, const float* relw, const T* relbias,  \
                  const T* dout, const float* lse, const float* dsum, float* dbias, T* dqkv, WinGeom g),          \
                 (qkv, bias, relh, relw, relbias, dout, lse, dsum, dbias, dqkv, g))                               \
    EMU_LAUNCHER(window_attention_rel_tables_##S,                                                                 \
                 (Launch l, const T* qkv, const T* bias, const T* rh, const T* rw, float* relh, float* relw,      \
                  WinGeom g),                                                                                     \
                 (qkv, bias, rh, rw, relh, relw, g))                                                              \
    EMU_LAUNCHER(window_attention_rel_tables_grad_##S,                                                            \
                 (Launch l, const T* qkv, const T* bias, const float* drel, float* dr, WinGeom g, int axis),      \
                 (qkv, bias, drel, dr, g, axis))
VITDET_FOR_EACH_FLOAT(WA_LAUNCHERS)
