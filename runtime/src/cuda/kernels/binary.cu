// Broadcasting add, sub, mul and div (vitdet_ir::ops::Binary) of two contiguous operands read
// through broadcast strides (0 along the dims an operand repeats) into a contiguous output.
// candle's CUDA kernel for this case divides the element index by every dim in 64-bit
// arithmetic reading dims and strides from global memory; this one takes the dims collapsed
// on the host (adjacent dims that both operands step through alike become one) as a kernel
// parameter, in 32-bit arithmetic. Every storage type is computed in f32 and rounded once, as
// the CPU kernels (half's f32 arithmetic) do.

#define BIN_MAX_DIMS 6

struct BinGeom {
    unsigned numel;
    int rank;  // collapsed dims, 1 .. BIN_MAX_DIMS, outermost first
    unsigned dims[BIN_MAX_DIMS];
    unsigned a_strides[BIN_MAX_DIMS];
    unsigned b_strides[BIN_MAX_DIMS];
};

// OP: 0 add, 1 sub, 2 mul, 3 div.
template <class T, int OP>
__device__ void binary_impl(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, BinGeom g) {
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < g.numel; i += stride) {
        unsigned rem = i, ia = 0, ib = 0;
        for (int d = g.rank - 1; d > 0; --d) {
            const unsigned q = rem / g.dims[d], r = rem - q * g.dims[d];
            ia += r * g.a_strides[d];
            ib += r * g.b_strides[d];
            rem = q;
        }
        ia += rem * g.a_strides[0];
        ib += rem * g.b_strides[0];
        const float x = to_f32(a[ia]), y = to_f32(b[ib]);
        out[i] = from_f32<T>(OP == 0 ? x + y : OP == 1 ? x - y : OP == 2 ? x * y : x / y);
    }
}

#define BINARY_ENTRY(T, S)                                                                                   \
    extern "C" __global__ void binary_add_##S(const T* a, const T* b, T* out, BinGeom g) {                   \
        binary_impl<T, 0>(a, b, out, g);                                                                     \
    }                                                                                                        \
    extern "C" __global__ void binary_sub_##S(const T* a, const T* b, T* out, BinGeom g) {                   \
        binary_impl<T, 1>(a, b, out, g);                                                                     \
    }                                                                                                        \
    extern "C" __global__ void binary_mul_##S(const T* a, const T* b, T* out, BinGeom g) {                   \
        binary_impl<T, 2>(a, b, out, g);                                                                     \
    }                                                                                                        \
    extern "C" __global__ void binary_div_##S(const T* a, const T* b, T* out, BinGeom g) {                   \
        binary_impl<T, 3>(a, b, out, g);                                                                     \
    }
VITDET_FOR_EACH_FLOAT(BINARY_ENTRY)
