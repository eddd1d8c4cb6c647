// The copy y = x.permute(perm) into a contiguous y, of a contiguous x (the runtime's
// kernels/shape.rs `permute` on a CUDA tensor: window partition and its inverse, the qkv split,
// NCHW <-> NHWC).
//
// Pure data movement, so the kernels see only units of 1, 2, 4, 8 or 16 bytes: the host
// (cuda/permute.rs) merges the output axes that stay adjacent in x, drops axes of size 1, and
// where the innermost axis is contiguous in x too (window partition keeps the channels) moves
// it in the widest unit that divides its bytes and the buffers' alignment, so a thread copies
// 16 bytes at once. One thread per output unit, writes contiguous; blocks stride over the rest.
// Indices are 32-bit where every offset fits, 64-bit otherwise.

#define PERMUTE_MAX_RANK 8

struct PermuteDims {
    int rank;
    long long total;                     // output units
    long long dims[PERMUTE_MAX_RANK];    // output dims (units on the innermost axis)
    long long strides[PERMUTE_MAX_RANK]; // the stride in x, in units, of each output axis
};

struct alignas(16) Unit16 {
    unsigned long long lo, hi;
};

template <class U, class I>
__device__ void permute_copy(const U* __restrict__ x, U* __restrict__ y, const PermuteDims& d) {
    const I total = (I)d.total;
    const I step = (I)gridDim.x * (I)blockDim.x;
    for (I e = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; e < total; e += step) {
        I rest = e, src = 0;
        for (int a = d.rank - 1; a > 0; --a) {
            const I n = (I)d.dims[a];
            src += (rest % n) * (I)d.strides[a];
            rest /= n;
        }
        y[e] = x[src + rest * (I)d.strides[0]];
    }
}

#define PERMUTE_ENTRY(U, S)                                                                       \
    extern "C" __global__ void permute_##S##_i32(const U* x, U* y, PermuteDims d) {              \
        permute_copy<U, unsigned int>(x, y, d);                                                   \
    }                                                                                             \
    extern "C" __global__ void permute_##S##_i64(const U* x, U* y, PermuteDims d) {              \
        permute_copy<U, unsigned long long>(x, y, d);                                             \
    }
PERMUTE_ENTRY(unsigned char, u8)
PERMUTE_ENTRY(unsigned short, u16)
PERMUTE_ENTRY(unsigned int, u32)
PERMUTE_ENTRY(unsigned long long, u64)
PERMUTE_ENTRY(Unit16, u128)
