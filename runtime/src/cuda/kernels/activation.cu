// Activations and their gradients (vitdet_ir::ops::Unary / UnaryGrad) where candle's composed
// kernels make several passes over f32 temporaries: exact (erf) GELU and its derivative, and
// ReLU's gradient. On contiguous tensors of `n` elements; every storage type is computed in
// f32 and rounded once on the store, as the CPU kernels do.
//
//   gelu(x)  = x Phi(x),            Phi(x) = erfc(-x / sqrt 2) / 2
//   gelu'(x) = Phi(x) + x phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// Phi goes through erfc rather than 1 + erf so that it keeps its relative accuracy for
// negative x, where 1 + erf cancels. One thread per element, blocks striding over the tensor:
// the backward reads x and dy and writes dx in one pass, where the composition of candle ops
// it replaces made about a dozen passes over f32 intermediates.

#define GELU_INV_SQRT2 0.70710678118654752f
#define GELU_INV_SQRT_2PI 0.39894228040143268f

__device__ __forceinline__ float gelu_cdf(float x) { return 0.5f * erfcf(-x * GELU_INV_SQRT2); }

template <class T>
__device__ void gelu_forward(const T* __restrict__ x, T* __restrict__ y, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = to_f32(x[i]);
        y[i] = from_f32<T>(v * gelu_cdf(v));
    }
}

template <class T>
__device__ void gelu_backward(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = to_f32(x[i]);
        const float pdf = GELU_INV_SQRT_2PI * expf(-0.5f * v * v);
        dx[i] = from_f32<T>(to_f32(dy[i]) * (gelu_cdf(v) + v * pdf));
    }
}

// ReLU's gradient as PyTorch's threshold_backward: dy where x > 0, else zero (a NaN x passes dy
// through). Exact in every storage type.
template <class T>
__device__ void relu_backward(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dx[i] = to_f32(x[i]) <= 0.0f ? from_f32<T>(0.0f) : dy[i];
}

#define ACTIVATION_ENTRY(T, S)                                                                                   \
    extern "C" __global__ void gelu_##S(const T* x, T* y, long long n) { gelu_forward<T>(x, y, n); }       \
    extern "C" __global__ void gelu_grad_##S(const T* x, const T* dy, T* dx, long long n) {                \
        gelu_backward<T>(x, dy, dx, n);                                                                    \
    }                                                                                                      \
    extern "C" __global__ void relu_grad_##S(const T* x, const T* dy, T* dx, long long n) {                \
        relu_backward<T>(x, dy, dx, n);                                                                    \
    }
VITDET_FOR_EACH_FLOAT(ACTIVATION_ENTRY)
