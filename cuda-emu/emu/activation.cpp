// Host entry points of the emulated activation kernels (see cuda_emu.h).
#include "cuda_emu.h"
#include "common.cuh"
#include "activation.cu"

#define ACTIVATION_LAUNCHERS(T, S)                                                                    \
    EMU_LAUNCHER(gelu_##S, (Launch l, const T* x, T* y, long long n), (x, y, n))               \
    EMU_LAUNCHER(gelu_grad_##S, (Launch l, const T* x, const T* dy, T* dx, long long n), (x, dy, dx, n))     \
    EMU_LAUNCHER(relu_grad_##S, (Launch l, const T* x, const T* dy, T* dx, long long n), (x, dy, dx, n))
VITDET_FOR_EACH_FLOAT(ACTIVATION_LAUNCHERS)
