// Host entry points of the emulated detection kernels: each launches one kernel over the
// given grid and block (see cuda_emu.h), with the dynamic shared memory the runtime passes.
#include "cuda_emu.h"
#include "common.cuh"
#include "detection.cu"

#define DET_LAUNCHERS(T, S)                                                                                      \
    EMU_LAUNCHER_SMEM(top_k_##S, smem, (Launch l, unsigned smem, const T* x, T* values, long long* indices,      \
                                        TopKGeom g),                                                             \
                      (x, values, indices, g))                                                                   \
    EMU_LAUNCHER_SMEM(top_k_hist_##S, smem,                                                                     \
                      (Launch l, unsigned smem, const T* x, const TopKState* state, unsigned* hist, TopKGeom g,  \
                       int pass),                                                                                \
                      (x, state, hist, g, pass))                                                                 \
    EMU_LAUNCHER_SMEM(top_k_compact_##S, smem,                                                                  \
                      (Launch l, unsigned smem, const T* x, TopKState* state, unsigned* cand, TopKGeom g),       \
                      (x, state, cand, g))                                                                       \
    EMU_LAUNCHER_SMEM(top_k_sort_##S, smem,                                                                     \
                      (Launch l, unsigned smem, const T* x, const unsigned* cand, T* values, long long* indices, \
                       TopKGeom g),                                                                              \
                      (x, cand, values, indices, g))                                                             \
    EMU_LAUNCHER(nms_candidates_##S,                                                                             \
                 (Launch l, const T* scores, const unsigned char* valid, unsigned long long* keys,               \
                  unsigned* state, NmsGeom g),                                                                   \
                 (scores, valid, keys, state, g))                                                                \
    EMU_LAUNCHER(nms_sort_##S,                                                                                   \
                 (Launch l, const T* boxes, const long long* groups, const unsigned long long* keys,             \
                  const unsigned* state, float* sorted_boxes, long long* sorted_groups, unsigned* order,         \
                  NmsGeom g),                                                                                    \
                 (boxes, groups, keys, state, sorted_boxes, sorted_groups, order, g))                            \
    EMU_LAUNCHER(roi_levels_##S, (Launch l, const T* boxes, int* levels, RoiGeom g), (boxes, levels, g))         \
    EMU_LAUNCHER(roi_align_fwd_##S, (Launch l, const T* boxes, const int* levels, T* out, RoiGeom g),           \
                 (boxes, levels, out, g))                                                                        \
    EMU_LAUNCHER(roi_align_bwd_##S, (Launch l, const T* boxes, const int* levels, const T* dy, RoiGeom g),      \
                 (boxes, levels, dy, g))                                                                         \
    EMU_LAUNCHER(box_decode_##S, (Launch l, const T* deltas, const T* boxes, T* out, BoxGeom g),                 \
                 (deltas, boxes, out, g))                                                                        \
    EMU_LAUNCHER(clip_boxes_##S, (Launch l, const T* boxes, T* out, BoxGeom g), (boxes, out, g))
VITDET_FOR_EACH_FLOAT(DET_LAUNCHERS)

EMU_LAUNCHER_SMEM(top_k_pick, smem, (Launch l, unsigned smem, TopKState* state, unsigned* hist, TopKGeom g, int pass),
                  (state, hist, g, pass))
EMU_LAUNCHER(nms_mask,
             (Launch l, const float* sorted_boxes, const long long* sorted_groups, const unsigned* state,
              unsigned long long* mask, NmsGeom g, int row0),
             (sorted_boxes, sorted_groups, state, mask, g, row0))
EMU_LAUNCHER_SMEM(nms_scan, smem,
                  (Launch l, unsigned smem, const unsigned* order, unsigned* state, const unsigned long long* mask,
                   unsigned long long* removed, long long* keep, unsigned char* keep_valid, NmsGeom g, int row0),
                  (order, state, mask, removed, keep, keep_valid, g, row0))
