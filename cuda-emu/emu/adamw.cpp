// Host entry point of the emulated fused AdamW kernel (see cuda_emu.h). The table it reads
// holds host pointers.
#include "cuda_emu.h"
#include "common.cuh"
#include "adamw.cu"

EMU_LAUNCHER(adamw_step, (Launch l, const AdamWTensor* table, AdamWStep s), (table, s))
