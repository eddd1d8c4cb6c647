// Host entry points of the emulated broadcasting binary kernels (see cuda_emu.h).
#include "cuda_emu.h"
#include "common.cuh"
#include "binary.cu"

#define BINARY_LAUNCHERS(T, S)                                                                                \
    EMU_LAUNCHER(binary_add_##S, (Launch l, const T* a, const T* b, T* out, BinGeom g), (a, b, out, g))     \
    EMU_LAUNCHER(binary_sub_##S, (Launch l, const T* a, const T* b, T* out, BinGeom g), (a, b, out, g))     \
    EMU_LAUNCHER(binary_mul_##S, (Launch l, const T* a, const T* b, T* out, BinGeom g), (a, b, out, g))     \
    EMU_LAUNCHER(binary_div_##S, (Launch l, const T* a, const T* b, T* out, BinGeom g), (a, b, out, g))
VITDET_FOR_EACH_FLOAT(BINARY_LAUNCHERS)
