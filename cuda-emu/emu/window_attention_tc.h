// Host entry points of the emulated tensor-core window-attention kernels (forward and backward),
// for the head dim of the translation unit that includes this after the kernel source:
// `emu_window_attention_*_tc_<S><TAIL>` launch the kernels `window_attention_*_tc_<S>` for
// element type T. window_attention_tc.cpp builds them at HD = 16 (no tail) and
// window_attention_tc64.cpp at HD = 64 (tail `_hd64`), the ViTDet-B/L head dim, where every loop
// over 16-wide head-dim slices runs more than once.
#pragma once

#define WA_TC_LAUNCHER(T, S, TAIL)                                                                        \
    EMU_LAUNCHER_NAMED(emu_window_attention_fwd_tc_##S##TAIL, window_attention_fwd_tc_##S, smem,          \
                       (Launch l, unsigned smem, const T* qkv, const T* bias, const float* relh,         \
                        const float* relw, const T* relbias, T* out, float* lse, WinGeom g),             \
                       (qkv, bias, relh, relw, relbias, out, lse, g))

// The decomposed term's tables, the tensor-core backward's kernels and the tables' gradient,
// for the same head dim.
#define WA_TC_SIDE_LAUNCHERS(T, S, TAIL)                                                                   \
    extern "C" void emu_window_attention_rel_tables_tc_##S##TAIL(Launch l, const T* qkv, const T* bias,   \
                                                                 const T* rh, const T* rw, float* relh,   \
                                                                 float* relw, WinGeom g) {                \
        emu::launch(dim3(l.grid[0], l.grid[1], l.grid[2]), dim3(l.block[0], l.block[1], l.block[2]), 0,  \
                    [&] { wa_rel_tables<T>(qkv, bias, rh, rw, relh, relw, g); });                          \
    }                                                                                                     \
    EMU_LAUNCHER_NAMED(emu_window_attention_bwd_dsum_tc_##S##TAIL, window_attention_bwd_dsum_tc_##S, 0,    \
                       (Launch l, const T* out, const T* dout, float* dsum, WinGeom g), (out, dout, dsum, g)) \
    EMU_LAUNCHER_NAMED(emu_window_attention_bwd_kv_tc_##S##TAIL, window_attention_bwd_kv_tc_##S, smem,    \
                       (Launch l, unsigned smem, const T* qkv, const T* bias, const float* relh,         \
                        const float* relw, const T* relbias, const T* dout, const float* lse,            \
                        const float* dsum, float* dbias, T* dqkv, WinGeom g),                             \
                       (qkv, bias, relh, relw, relbias, dout, lse, dsum, dbias, dqkv, g))                 \
    EMU_LAUNCHER_NAMED(emu_window_attention_bwd_q_tc_##S##TAIL, window_attention_bwd_q_tc_##S, smem,      \
                       (Launch l, unsigned smem, const T* qkv, const T* bias, const float* relh,         \
                        const float* relw, const T* relbias, const T* dout, const float* lse,            \
                        const float* dsum, float* dq, float* drelh, float* drelw, float* drelbias,       \
                        WinGeom g),                                                                       \
                       (qkv, bias, relh, relw, relbias, dout, lse, dsum, dq, drelh, drelw, drelbias, g))  \
    EMU_LAUNCHER_NAMED(emu_window_attention_bwd_dq_tc_##S##TAIL, window_attention_bwd_dq_tc_##S, 0,        \
                       (Launch l, const float* dq, const float* drelh, const float* drelw, const T* rh,  \
                        const T* rw, T* dqkv, WinGeom g),                                                 \
                       (dq, drelh, drelw, rh, rw, dqkv, g))                                               \
    extern "C" void emu_window_attention_rel_tables_grad_tc_##S##TAIL(Launch l, const T* qkv, const T* bias, \
                                                                      const float* drel, float* dr,       \
                                                                      WinGeom g, int axis) {              \
        emu::launch(dim3(l.grid[0], l.grid[1], l.grid[2]), dim3(l.block[0], l.block[1], l.block[2]), 0,  \
                    [&] { wa_rel_tables_grad<T>(qkv, bias, drel, dr, g, axis); });                         \
    }
