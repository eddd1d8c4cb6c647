// The tensor-core window-attention kernels at HD = 64, the ViTDet-B/L head dim (see
// window_attention_tc.cpp).
#include "cuda_emu.h"

// The kernels are extern "C", so the namespace does not keep them apart from the HD = 16
// build's: they are renamed.
#define window_attention_fwd_tc_f16 window_attention_fwd_tc_f16_hd64
#define window_attention_fwd_tc_bf16 window_attention_fwd_tc_bf16_hd64
#define window_attention_bwd_dsum_tc_f16 window_attention_bwd_dsum_tc_f16_hd64
#define window_attention_bwd_dsum_tc_bf16 window_attention_bwd_dsum_tc_bf16_hd64
#define window_attention_bwd_kv_tc_f16 window_attention_bwd_kv_tc_f16_hd64
#define window_attention_bwd_kv_tc_bf16 window_attention_bwd_kv_tc_bf16_hd64
#define window_attention_bwd_q_tc_f16 window_attention_bwd_q_tc_f16_hd64
#define window_attention_bwd_q_tc_bf16 window_attention_bwd_q_tc_bf16_hd64
#define window_attention_bwd_dq_tc_f16 window_attention_bwd_dq_tc_f16_hd64
#define window_attention_bwd_dq_tc_bf16 window_attention_bwd_dq_tc_bf16_hd64

namespace tc64 {
#undef HD
#define HD 64
#define WA_NO_FMA_ENTRIES
#include "common.cuh"
#include "window_attention.cu"
}  // namespace tc64
using namespace tc64;

#include "window_attention_tc.h"
WA_TC_LAUNCHER(f16_t, f16, _hd64)
WA_TC_LAUNCHER(bf16_t, bf16, _hd64)
WA_TC_SIDE_LAUNCHERS(f16_t, f16, _hd64)
WA_TC_SIDE_LAUNCHERS(bf16_t, bf16, _hd64)
