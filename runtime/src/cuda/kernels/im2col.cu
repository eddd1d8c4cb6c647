// Layout kernels of the convolutions. The im2col columns that turn a convolution into one GEMM (the runtime's
// kernels/conv.rs: conv2d, its weight gradient, and transposed convolutions lowered to
// convolutions), over a tile of a contiguous [N, C, H, W] input: images b0..b0+nb, output
// rows r0..r0+r. The columns are [C*kh*kw, nb*r*Wo] row-major; row (c, a, b), column (i, y, z)
// holds x[b0+i, c, (r0+y)*sh + a*dh - ph, z*sw + b*dw - pw], zero outside the input. Row-major
// [K, P] columns make `w [O, K] @ cols` come out in NCHW order, and let neighbouring threads
// (neighbouring columns) write, and at stride 1 read, neighbouring elements.
//
// Pure data movement, so every storage type is copied as it is. Block rows (blockIdx.y) stride
// over the column rows, threads over the columns. Tiles are bounded by the caller so that a
// row's columns and the input's extents fit in 32-bit ints; the row offset is 64-bit.

struct Im2ColDims {
    int c, h, w;      // input channels and size
    int kh, kw;       // kernel
    int sh, sw;       // stride
    int ph, pw;       // padding
    int dh, dw;       // dilation
    int out_w;        // output width Wo
    int b0, nb;       // images of the tile
    int r0, r;        // output rows of the tile
};

template <class T>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ cols, Im2ColDims d) {
    const int taps = d.kh * d.kw;
    const int nrows = d.c * taps;
    const int ncols = d.nb * d.r * d.out_w;
    for (int row = blockIdx.y; row < nrows; row += gridDim.y) {
        const int ci = row / taps;
        const int a = row / d.kw % d.kh;
        const int b = row % d.kw;
        T* __restrict__ dst = cols + (long long)row * ncols;
        for (int col = blockIdx.x * blockDim.x + threadIdx.x; col < ncols; col += gridDim.x * blockDim.x) {
            const int z = col % d.out_w;
            const int t = col / d.out_w;
            const int y = t % d.r;
            const int i = t / d.r;
            const int iy = (d.r0 + y) * d.sh + a * d.dh - d.ph;
            const int ix = z * d.sw + b * d.dw - d.pw;
            T v = T();  // +0 in every storage type
            if (iy >= 0 && iy < d.h && ix >= 0 && ix < d.w) {
                v = x[(((long long)(d.b0 + i) * d.c + ci) * d.h + iy) * d.w + ix];
            }
            dst[col] = v;
        }
    }
}

// The output of a transposed convolution whose kernel is its stride (the pyramids' 2x2
// stride-2 deconvolutions; the runtime's `unpatchify_deconv`): the GEMM product
// y [N, O, kh, kw, H, W] interleaved into [N, O, H kh, W kw], plus the channel bias where one
// is given (added in f32 and rounded once, as the CPU's add; a copy without). One thread per
// output element, so writes are contiguous; blocks stride over the rest.
struct UnpatchifyDims {
    int n, o, kh, kw, h, w;
};

template <class T>
__device__ void unpatchify(const T* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out,
                           UnpatchifyDims d) {
    const int ow = d.w * d.kw, oh = d.h * d.kh;
    const long long total = (long long)d.n * d.o * oh * ow;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int ox = (int)(e % ow), oy = (int)(e / ow % oh);
        const long long plane = e / ow / oh;  // image * O + channel
        const long long src = ((plane * d.kh + oy % d.kh) * d.kw + ox % d.kw) * ((long long)d.h * d.w) +
                              (long long)(oy / d.kh) * d.w + ox / d.kw;
        out[e] = bias ? from_f32<T>(to_f32(y[src]) + to_f32(bias[plane % d.o])) : y[src];
    }
}

#define IM2COL_ENTRY(T, S)                                                                \
    extern "C" __global__ void im2col_##S(const T* x, T* cols, Im2ColDims d) {           \
        im2col<T>(x, cols, d);                                                            \
    }                                                                                     \
    extern "C" __global__ void unpatchify_##S(const T* y, const T* bias, T* out, UnpatchifyDims d) { \
        unpatchify<T>(y, bias, out, d);                                                   \
    }
VITDET_FOR_EACH_FLOAT(IM2COL_ENTRY)
