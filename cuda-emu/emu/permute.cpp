// Host entry points of the emulated permute copy (see cuda_emu.h).
#include "cuda_emu.h"
#include "common.cuh"
#include "permute.cu"

#define PERMUTE_LAUNCHERS(U, S)                                                                  \
    EMU_LAUNCHER(permute_##S##_i32, (Launch l, const U* x, U* y, PermuteDims d), (x, y, d))     \
    EMU_LAUNCHER(permute_##S##_i64, (Launch l, const U* x, U* y, PermuteDims d), (x, y, d))
PERMUTE_LAUNCHERS(unsigned char, u8)
PERMUTE_LAUNCHERS(unsigned short, u16)
PERMUTE_LAUNCHERS(unsigned int, u32)
PERMUTE_LAUNCHERS(unsigned long long, u64)
PERMUTE_LAUNCHERS(Unit16, u128)
