// Host entry points of the emulated convolution layout kernels (im2col, unpatchify) (see cuda_emu.h).
#include "cuda_emu.h"
#include "common.cuh"
#include "im2col.cu"

#define IM2COL_LAUNCHERS(T, S)                                                                              \
    EMU_LAUNCHER(im2col_##S, (Launch l, const T* x, T* cols, Im2ColDims d), (x, cols, d))                   \
    EMU_LAUNCHER(unpatchify_##S, (Launch l, const T* y, const T* bias, T* out, UnpatchifyDims d), (y, bias, out, d))
VITDET_FOR_EACH_FLOAT(IM2COL_LAUNCHERS)
