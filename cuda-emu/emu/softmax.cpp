// Host entry points of the emulated softmax kernels (see cuda_emu.h): each launches one kernel
// over the given grid and block.
#include "cuda_emu.h"
#include "common.cuh"
#include "softmax.cu"

#define SOFTMAX_LAUNCHERS(T, S)                                                                              \
    EMU_LAUNCHER(softmax_rows_##S, (Launch l, const T* x, T* y, SoftmaxDims d), (x, y, d))                  \
    EMU_LAUNCHER(softmax_cols_##S, (Launch l, const T* x, T* y, SoftmaxDims d), (x, y, d))                  \
    EMU_LAUNCHER(softmax_grad_rows_##S, (Launch l, const T* y, const T* dy, T* dx, SoftmaxDims d), (y, dy, dx, d)) \
    EMU_LAUNCHER(softmax_grad_cols_##S, (Launch l, const T* y, const T* dy, T* dx, SoftmaxDims d), (y, dy, dx, d))
VITDET_FOR_EACH_FLOAT(SOFTMAX_LAUNCHERS)
