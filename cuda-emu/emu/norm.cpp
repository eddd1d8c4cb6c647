// Host entry points of the emulated normalization kernels: each launches one kernel over the
// given grid and block (see cuda_emu.h).
#include "cuda_emu.h"
#include "common.cuh"
#include "norm.cu"

#define NORM_LAUNCHERS(T, S)                                                                                  \
    EMU_LAUNCHER(norm_segments_fwd_##S, (Launch l, const T* x, const T* w, const T* b, T* y, NormGeom g),     \
                 (x, w, b, y, g))                                                                             \
    EMU_LAUNCHER(norm_positions_fwd_##S, (Launch l, const T* x, const T* w, const T* b, T* y, NormGeom g),    \
                 (x, w, b, y, g))                                                                             \
    EMU_LAUNCHER(norm_segments_bwd_##S,                                                                       \
                 (Launch l, const T* x, const T* w, const T* dy, T* dx, float* mean, float* rstd, NormGeom g), \
                 (x, w, dy, dx, mean, rstd, g))                                                               \
    EMU_LAUNCHER(norm_positions_bwd_##S,                                                                      \
                 (Launch l, const T* x, const T* w, const T* dy, T* dx, float* mean, float* rstd, NormGeom g), \
                 (x, w, dy, dx, mean, rstd, g))                                                               \
    EMU_LAUNCHER(norm_affine_grad_rows_##S,                                                                   \
                 (Launch l, const T* x, const T* dy, const float* mean, const float* rstd, float* dw,         \
                  float* db, NormGeom g),                                                                     \
                 (x, dy, mean, rstd, dw, db, g))                                                              \
    EMU_LAUNCHER(norm_affine_grad_planes_##S,                                                                 \
                 (Launch l, const T* x, const T* dy, const float* mean, const float* rstd, float* dw,         \
                  float* db, NormGeom g),                                                                     \
                 (x, dy, mean, rstd, dw, db, g))                                                              \
    EMU_LAUNCHER(norm_batch_fwd_##S,                                                                          \
                 (Launch l, const T* x, const T* w, const T* b, const T* rmean, const T* rvar, T* y,          \
                  NormGeom g),                                                                                \
                 (x, w, b, rmean, rvar, y, g))                                                                \
    EMU_LAUNCHER(norm_batch_train_fwd_##S,                                                                    \
                 (Launch l, const T* x, const T* w, const T* b, const T* rmean, const T* rvar, T* y,          \
                  T* new_rmean, T* new_rvar, NormGeom g),                                                     \
                 (x, w, b, rmean, rvar, y, new_rmean, new_rvar, g))                                           \
    EMU_LAUNCHER(norm_batch_train_bwd_##S,                                                                    \
                 (Launch l, const T* x, const T* w, const T* dy, T* dx, float* dw, float* db, NormGeom g),    \
                 (x, w, dy, dx, dw, db, g))
VITDET_FOR_EACH_FLOAT(NORM_LAUNCHERS)
