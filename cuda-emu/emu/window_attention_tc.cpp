// The tensor-core window-attention kernels at HD = 16 (the mma tiles need head dims that are
// multiples of 16), in their own namespace so their templates do not collide with the HD = 8
// build of the same source (window_attention.cpp) or the HD = 64 one (window_attention_tc64.cpp).
#include "cuda_emu.h"

namespace tc16 {
#undef HD
#define HD 16
#define WA_NO_FMA_ENTRIES
#include "common.cuh"
#include "window_attention.cu"
}  // namespace tc16
using namespace tc16;

#include "window_attention_tc.h"
WA_TC_LAUNCHER(f16_t, f16, )
WA_TC_LAUNCHER(bf16_t, bf16, )
WA_TC_SIDE_LAUNCHERS(f16_t, f16, )
WA_TC_SIDE_LAUNCHERS(bf16_t, bf16, )
