// CUDA execution model on the host CPU, so the same kernels/*.cu source that nvcc
// compiles to PTX also runs in `cargo test` on a machine without a GPU.
//
// Model (see DESIGN.md §3 and cuda_emu.cpp):
// - blocks are spread over a few host worker threads; a block runs on one worker;
// - a block's threads are fibers (ucontext) on that worker, scheduled round robin;
//   `__syncthreads()` and warp collectives yield to the block's scheduler, which
//   releases a barrier once every live (not yet returned) thread has reached it;
//   threads that return early simply leave the live set, so a `if (i >= n) return;`
//   before a barrier cannot deadlock the others;
// - static shared memory (`SHARED` in common.cuh) is a per-worker pool handed out in
//   declaration order; before each block it and the dynamic shared memory are filled
//   with 0xff bytes (NaN as f32, -1 as an integer), so a read of shared memory that
//   no thread wrote shows up in the results instead of reading the previous block's;
// - a write past the dynamic shared memory the launch asked for is an error (the GPU
//   faults on an out-of-range shared address), found by poison checks after each block;
//   so is a write past a static shared array (the GPU writes the next array silently):
//   each array is followed by a poisoned guard that no array owns;
// - `__syncthreads()` records its call site: threads of one block waiting at two
//   different barriers are an error (undefined on the GPU), not a silent release;
// - `load_float4` / `store_float4` / `load_uint4` check 16-byte alignment, as the GPU does (a
//   misaligned vector access faults there);
// - warp shuffles go through a per-warp exchange buffer (double buffered) and a warp
//   barrier; all live lanes of a warp must take part (the `mask` argument is checked
//   to cover them, as on Volta and later with full masks);
// - atomics are real host atomics, since blocks run concurrently.
//
// Only what our kernels use is emulated.  Something missing is a compile error here,
// never a silent difference.
#pragma once

#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cfloat>
#include <climits>
#include <type_traits>
#include <utility>

#ifdef __CUDACC__
#error "cuda_emu.h is for host compilers only"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Static shared memory goes through SHARED(T, name, dims) (common.cuh), which the
// emulator allocates per block and fills with NaN; a bare __shared__ would be one
// zero-initialised copy per worker thread, hiding reads of unwritten shared memory.
#define __shared__ __shared___is_not_emulated_use_SHARED_from_common_cuh
#define __constant__ static const
#define __restrict__ __restrict

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
// Aligned as on the GPU (8 and 16 bytes), so that host layouts of arrays and structs of
// them match the device's.
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace emu {

// Per-fiber view of the launch, read by threadIdx/blockIdx/... below.
struct ThreadCtx {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

ThreadCtx& ctx();
void* dyn_shared();
// `bytes` of this block's static shared memory, aligned to `align`: the next piece of
// the pool for the calling thread (every thread declares the same pieces in order).
void* static_shared(size_t bytes, size_t align);
// Barrier at a call site (file, line).
void syncthreads(const char* file, int line);
// A launch error unless `p` is a multiple of `align` (what = "float4 load", ...).
void check_align(const void* p, size_t align, const char* what);
// Warp collectives: exchange `bits` (up to 8 bytes) and return the value held by
// lane `src` (or the caller's own when `src` is out of range or has exited).
uint64_t warp_exchange(unsigned mask, uint64_t bits, int src);
// c (16×8) += a (16×8) · b (8×8) over the warp, in mma.m16n8k8's register layout (see
// mma_f32_16x8x8 in common.cuh), the operands read as TF32 (their 19 high bits), the
// products summed in f32.
void warp_mma_tf32_16x8x8(float c[4], const unsigned a[4], const unsigned b[2]);
// Ballot over the live lanes of the caller's warp.
unsigned warp_ballot(unsigned mask, bool pred);
void syncwarp(unsigned mask);
int lane_id();

template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace emu

inline float4 load_float4(const float* p) {
    ::emu::check_align(p, 16, "float4 load");
    float4 v;
    std::memcpy(&v, p, 16);
    return v;
}
inline uint4 load_uint4(const void* p) {
    ::emu::check_align(p, 16, "uint4 load");
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}
inline void store_float4(float* p, float4 v) {
    ::emu::check_align(p, 16, "float4 store");
    std::memcpy(p, &v, 16);
}

#define threadIdx (::emu::ctx().thread_idx)
#define blockIdx (::emu::ctx().block_idx)
#define blockDim (::emu::ctx().block_dim)
#define gridDim (::emu::ctx().grid_dim)
static constexpr int warpSize = 32;

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = ::emu::lane_id();
    int base = lane & ~(width - 1);
    int s = base + (src & (width - 1));
    return ::emu::from_bits<T>(::emu::warp_exchange(mask, ::emu::to_bits(v), s));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    int lane = ::emu::lane_id();
    int s = lane ^ m;
    // Lanes outside the caller's width segment read their own value (CUDA semantics).
    if ((s & ~(width - 1)) != (lane & ~(width - 1))) s = lane;
    return ::emu::from_bits<T>(::emu::warp_exchange(mask, ::emu::to_bits(v), s));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    int lane = ::emu::lane_id();
    int s = lane + (int)d;
    if ((s & ~(width - 1)) != (lane & ~(width - 1))) s = lane;
    return ::emu::from_bits<T>(::emu::warp_exchange(mask, ::emu::to_bits(v), s));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    int lane = ::emu::lane_id();
    int s = lane - (int)d;
    if (s < (lane & ~(width - 1))) s = lane;
    return ::emu::from_bits<T>(::emu::warp_exchange(mask, ::emu::to_bits(v), s));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::emu::warp_ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return ::emu::warp_ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    // All live lanes voted: compare against the ballot of `true`.
    unsigned yes = ::emu::warp_ballot(mask, pred != 0);
    unsigned live = ::emu::warp_ballot(mask, true);
    return yes == live;
}

// ---- atomics (blocks run concurrently on host threads) ----
inline float atomicAdd(float* p, float v) {
    uint32_t expected = __atomic_load_n(reinterpret_cast<uint32_t*>(p), __ATOMIC_RELAXED);
    for (;;) {
        float cur;
        std::memcpy(&cur, &expected, 4);
        float nv = cur + v;
        uint32_t desired;
        std::memcpy(&desired, &nv, 4);
        if (__atomic_compare_exchange_n(reinterpret_cast<uint32_t*>(p), &expected, desired, false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return cur;
    }
}
inline double atomicAdd(double* p, double v) {
    uint64_t expected = __atomic_load_n(reinterpret_cast<uint64_t*>(p), __ATOMIC_RELAXED);
    for (;;) {
        double cur;
        std::memcpy(&cur, &expected, 8);
        double nv = cur + v;
        uint64_t desired;
        std::memcpy(&desired, &nv, 8);
        if (__atomic_compare_exchange_n(reinterpret_cast<uint64_t*>(p), &expected, desired, false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return cur;
    }
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <class T, class F>
inline T atomic_update(T* p, F f) {
    T expected = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &expected, f(expected), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return expected;
}
inline int atomicMax(int* p, int v) { return atomic_update(p, [v](int o) { return o > v ? o : v; }); }
inline int atomicMin(int* p, int v) { return atomic_update(p, [v](int o) { return o < v ? o : v; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
    return atomic_update(p, [v](unsigned o) { return o > v ? o : v; });
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* p, int cmp, int v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}

// ---- math intrinsics ----
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((__uint128_t)a * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
template <class T>
inline T __ldg(const T* p) { return *p; }
using std::isnan;
using std::isinf;
using std::isfinite;

// bf16 storage type with round-to-nearest-even conversion, as cuda_bf16.h does.
struct __nv_bfloat16 {
    uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t b = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    __nv_bfloat16 h;
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        h.x = (uint16_t)((b >> 16) | 0x40);  // quiet NaN
    } else {
        uint32_t rounding = 0x7fffu + ((b >> 16) & 1u);
        h.x = (uint16_t)((b + rounding) >> 16);
    }
    return h;
}
