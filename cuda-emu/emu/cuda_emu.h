// A host emulation of the small part of CUDA C the runtime's kernels use, so the very sources
// NVRTC compiles for the GPU also run (slowly) on the CPU: every block of a launch runs in
// turn, its threads as OS threads meeting at `__syncthreads()` on a barrier. `__shared__`
// variables become statics (blocks run one at a time), dynamic shared memory is one buffer
// filled with NaN bytes at the start of every block, so reading it before writing shows. Of the
// warp-level operations only mma.m16n8k16, ldmatrix and the xor shuffle (common.cuh's
// `mma_16816`, `ldmatrix_x4`, `shfl_xor`) exist, exchanged through the block barrier, so every
// thread of the block must call them together; kernels using other warp intrinsics do not
// build here, which keeps them out of the tested set. cp.async copies land at the wait that
// covers them.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

namespace emu {
inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<unsigned char> dynamic_shared;

// One warp's fragments, exchanged for an emulated mma.
struct WarpFragments {
    unsigned a[32][4];
    unsigned b[32][2];
    float shuffled[32];
    const void* rows[32];
};
inline std::vector<WarpFragments> warp_fragments;

inline std::mutex launch_lock;

// Runs one launch; launches are serialized (the emulated device state above is global).
template <class F>
void launch(dim3 grid, dim3 block, size_t shared_bytes, F&& body) {
    std::lock_guard<std::mutex> serial(launch_lock);
    block_dim = block;
    grid_dim = grid;
    const unsigned threads = block.x * block.y * block.z;
    warp_fragments.assign((threads + 31) / 32, WarpFragments{});
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                // Each block starts from NaN bytes, not from what the previous block left.
                dynamic_shared.assign(shared_bytes, 0xFF);
                std::barrier<> barrier(threads);
                block_barrier = &barrier;
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t) {
                    pool.emplace_back([&, t] {
                        thread_idx = dim3(t % block.x, t / block.x % block.y, t / block.x / block.y);
                        block_idx = dim3(bx, by, bz);
                        body();
                        // A thread that returns leaves the barrier's later phases, as an exited
                        // GPU thread no longer counts at __syncthreads.
                        barrier.arrive_and_drop();
                    });
                }
                for (auto& th : pool) th.join();
            }
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

namespace emu {
// mma.m16n8k16 (see common.cuh for the fragment layout): every lane posts its fragments, the
// block meets, each lane computes its four outputs from its warp's fragments, the block meets
// again before the fragments can be overwritten.
inline void mma_16816(float d[4], const unsigned a[4], const unsigned b[2], float (*decode)(unsigned short)) {
    const unsigned tid = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
    WarpFragments& w = warp_fragments[tid / 32];
    const unsigned lane = tid % 32;
    for (int r = 0; r < 4; ++r) w.a[lane][r] = a[r];
    for (int r = 0; r < 2; ++r) w.b[lane][r] = b[r];
    __syncthreads();
    auto half = [&](unsigned reg, unsigned k) { return decode((unsigned short)(k % 2 ? reg >> 16 : reg & 0xFFFF)); };
    auto A = [&](unsigned r, unsigned k) {
        return half(w.a[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k);
    };
    auto B = [&](unsigned k, unsigned c) { return half(w.b[c * 4 + (k % 8) / 2][k >= 8], k); };
    const unsigned g = lane / 4, t = lane % 4;
    for (int o = 0; o < 4; ++o) {
        const unsigned r = g + (o >= 2 ? 8 : 0), c = 2 * t + o % 2;
        float acc = d[o];
        for (unsigned k = 0; k < 16; ++k) acc += A(r, k) * B(k, c);
        d[o] = acc;
    }
    __syncthreads();
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.b16: lanes 8m..8m+7 give the addresses of the eight
// 16-byte rows of matrix m; each lane receives, in r[m], two adjacent elements of that matrix:
// (lane / 4, 2 (lane % 4)) and (lane / 4, 2 (lane % 4) + 1), or with `trans`
// (2 (lane % 4), lane / 4) and (2 (lane % 4) + 1, lane / 4); the first in the low half.
inline void ldmatrix_x4(unsigned r[4], const void* row, bool trans) {
    const unsigned tid = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
    WarpFragments& w = warp_fragments[tid / 32];
    const unsigned lane = tid % 32;
    w.rows[lane] = row;
    __syncthreads();
    for (unsigned m = 0; m < 4; ++m) {
        unsigned short half[2];
        for (unsigned k = 0; k < 2; ++k) {
            const unsigned i = trans ? 2 * (lane % 4) + k : lane / 4;  // row of the matrix
            const unsigned j = trans ? lane / 4 : 2 * (lane % 4) + k;  // element of the row
            const void* p = w.rows[8 * m + i];
            if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
                std::fprintf(stderr, "emulated ldmatrix: row address %p is not 16-byte aligned\n", p);
                std::abort();
            }
            std::memcpy(&half[k], static_cast<const unsigned char*>(p) + 2 * j, 2);
        }
        r[m] = (unsigned)half[0] | ((unsigned)half[1] << 16);
    }
    __syncthreads();
}

// __shfl_xor_sync over a full warp: every lane posts its value, the block meets, each lane
// reads its partner's, the block meets again before the slots can be overwritten.
inline float shfl_xor(float v, int mask) {
    const unsigned tid = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
    WarpFragments& w = warp_fragments[tid / 32];
    const unsigned lane = tid % 32;
    w.shuffled[lane] = v;
    __syncthreads();
    const float r = w.shuffled[lane ^ (unsigned)mask];
    __syncthreads();
    return r;
}
}  // namespace emu
namespace emu {
// A vector move's address must be aligned to its size on the GPU (else a misaligned-address
// fault): the emulator stops at the first that is not.
inline void check_aligned(const void* p, std::size_t bytes) {
    if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
        std::fprintf(stderr, "emulated kernel: %zu-byte access at %p is misaligned\n", bytes, p);
        std::abort();
    }
}

// cp.async as the GPU orders it: a copy lands only once a cp_async_wait covers its committed
// group, so a kernel that reads a stage before waiting for it reads what was there before (the
// NaN bytes of fresh dynamic shared memory, or the previous tile) and its test fails. Sources
// are kernel inputs, unchanged during a launch, so reading them at the wait is reading them at
// the issue. Each emulated thread is an OS thread of one block: the queues start empty.
struct AsyncCopy {
    void* dst;
    const void* src;
    std::size_t bytes;
};
inline thread_local std::vector<AsyncCopy> async_open;
inline thread_local std::vector<std::vector<AsyncCopy>> async_committed;

inline void async_copy(void* dst, const void* src, std::size_t bytes) {
    check_aligned(dst, bytes);
    check_aligned(src, bytes);
    async_open.push_back({dst, src, bytes});
}
inline void async_commit() {
    async_committed.push_back(std::move(async_open));
    async_open.clear();
}
// All but the `newest` most recent committed groups land.
inline void async_wait(std::size_t newest) {
    while (async_committed.size() > newest) {
        for (const AsyncCopy& c : async_committed.front()) std::memcpy(c.dst, c.src, c.bytes);
        async_committed.erase(async_committed.begin());
    }
}
}  // namespace emu
// The intrinsics that round one operation on its own, never contracted into a fused
// multiply-add with a neighbour (the emulator's build contracts where the host has FMA, as
// NVRTC does): operands and result pass through volatiles, so the host compiler sees no
// product feeding a sum.
inline float __fmul_rn(float a, float b) {
    volatile float x = a, y = b, r = x * y;
    return r;
}
inline float __fadd_rn(float a, float b) {
    volatile float x = a, y = b, r = x + y;
    return r;
}
inline float __fsub_rn(float a, float b) {
    volatile float x = a, y = b, r = x - y;
    return r;
}
inline float __fdiv_rn(float a, float b) {
    volatile float x = a, y = b, r = x / y;
    return r;
}
inline float __fsqrt_rn(float a) {
    volatile float x = a, r = std::sqrt(x);
    return r;
}
inline double __dmul_rn(double a, double b) {
    volatile double x = a, y = b, r = x * y;
    return r;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu::dynamic_shared.data())

// The launch geometry the Rust side passes by value (vitdet_runtime::cuda::Launch).
struct Launch {
    unsigned grid[3];
    unsigned block[3];
};

// `extern "C" void emu_<name>(Launch l, params...)`: launches kernel `name` with `smem` bytes
// of dynamic shared memory (an expression of the parameters).
#define EMU_LAUNCHER_SMEM(name, smem, params, args) EMU_LAUNCHER_NAMED(emu_##name, name, smem, params, args)
// The same under another entry name (builds of one kernel at several compile-time constants).
#define EMU_LAUNCHER_NAMED(entry, kernel, smem, params, args)                                             \
    extern "C" void entry params {                                                                       \
        emu::launch(dim3(l.grid[0], l.grid[1], l.grid[2]), dim3(l.block[0], l.block[1], l.block[2]), smem, \
                    [&] { kernel args; });                                                               \
    }
#define EMU_LAUNCHER(name, params, args) EMU_LAUNCHER_SMEM(name, 0, params, args)
