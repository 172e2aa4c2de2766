// Shared by every kernel file: the same source compiles with nvcc (to PTX) and with the
// host C++ compiler against the emulator (kernels/emu/cuda_emu.h) for CPU tests.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <stdint.h>
// Dynamic shared memory, declared the same way on both sides.
#define DYN_SHARED(T, name) extern __shared__ __align__(16) unsigned char name##_raw[]; T* name = reinterpret_cast<T*>(name##_raw)
// Static shared memory: SHARED(float, tile, [32][33]).  Declare it at the top level of
// the kernel (every thread of the block runs the declaration, in the same order).
#define SHARED(T, name, dims) __shared__ T name dims
// 16-byte vector access; the address must be 16-byte aligned (the GPU faults otherwise).
__device__ __forceinline__ float4 load_float4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void store_float4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ uint4 load_uint4(const void* p) { return *reinterpret_cast<const uint4*>(p); }
#else
#include "emu/cuda_emu.h"
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dyn_shared())
// Per block, from the emulator's static pool (NaN-filled before each block).
#define SHARED(T, name, dims) \
    T(&name) dims = *reinterpret_cast<T(*) dims>(::emu::static_shared(sizeof(T dims), alignof(T)))
// load_float4 / store_float4 / load_uint4: cuda_emu.h (checks the alignment)
#endif

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// Asynchronous 16-byte copy global -> shared (sm_80 `cp.async`, no register on the way):
// `valid` false writes zeros and reads nothing (src must still be a mapped address).  The
// copies a thread issued are complete after cp_async_wait_all(); other threads see them
// after the __syncthreads() that follows.  On the emulator both are a checked float4 copy.
#ifdef __CUDACC__
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
#else
inline void cp_async16(float* dst, const float* src, bool valid) {
    store_float4(dst, valid ? load_float4(src) : make_float4(0.0f, 0.0f, 0.0f, 0.0f));
}
inline void cp_async_wait_all() {}
#endif

// Warp-wide c (16×8) += a (16×8) · b (8×8) in f32, in the register layout of the tensor
// cores' `mma.m16n8k8` (PTX ISA, tf32 fragments): lane = 4·g + t (g = lane / 4, t = lane
// % 4) holds a[0..3] = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]; b[0..1] = B[t][g],
// B[t+4][g]; c[0..3] = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].  Every lane of the
// warp must call it together.
// GPU: 3×TF32, as CUTLASS's OpMultiplyAddFastF32 (PyTorch's f32 attention): x = big +
// small with big = tf32(x), small = tf32(x − big); a·b ≈ small_a·big_b + big_a·small_b +
// big_a·big_b, three tensor-core products (small·small, about 2⁻²² of a·b, dropped), the
// small terms first.  Emulator: the same sums in plain f32 (one warp-wide exchange of the
// fragments, kernels/emu).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ unsigned tf32_big(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void mma_tf32_16x8x8(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_f32_16x8x8(float c[4], const float a[4], const float b[2]) {
    unsigned ab[4], as[4], bb[2], bs[2];
    for (int i = 0; i < 4; ++i) {
        ab[i] = tf32_big(a[i]);
        as[i] = tf32_big(a[i] - __uint_as_float(ab[i]));
    }
    for (int i = 0; i < 2; ++i) {
        bb[i] = tf32_big(b[i]);
        bs[i] = tf32_big(b[i] - __uint_as_float(bb[i]));
    }
    mma_tf32_16x8x8(c, as, bb);
    mma_tf32_16x8x8(c, ab, bs);
    mma_tf32_16x8x8(c, ab, bb);
}
#else
__device__ __forceinline__ void mma_f32_16x8x8(float c[4], const float a[4], const float b[2]) {
    ::emu::warp_mma_16x8x8(c, a, b);
}
#endif

// mma_f32_16x8x8's operands read from row-major tiles (row stride ld) in its layout:
// A = tile rows row0 .. row0+15 × columns col0 .. col0+7; B[k][n] = tile[k0 + k][n0 + n]
// (mma_load_b) or tile[n0 + n][k0 + k] (mma_load_bt: the tile's rows are B's columns, as
// K's rows are for Q Kᵀ).
__device__ __forceinline__ void mma_load_a(float a[4], const float* tile, int ld, int row0, int col0) {
    const int lane = threadIdx.x % WARP_SIZE;
    const float* p = tile + (row0 + lane / 4) * ld + col0 + lane % 4;
    a[0] = p[0];
    a[1] = p[8 * ld];
    a[2] = p[4];
    a[3] = p[8 * ld + 4];
}
__device__ __forceinline__ void mma_load_b(float b[2], const float* tile, int ld, int k0, int n0) {
    const int lane = threadIdx.x % WARP_SIZE;
    const float* p = tile + (k0 + lane % 4) * ld + n0 + lane / 4;
    b[0] = p[0];
    b[1] = p[4 * ld];
}
__device__ __forceinline__ void mma_load_bt(float b[2], const float* tile, int ld, int k0, int n0) {
    const int lane = threadIdx.x % WARP_SIZE;
    const float* p = tile + (n0 + lane / 4) * ld + k0 + lane % 4;
    b[0] = p[0];
    b[1] = p[4];
}

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim a multiple of 32); every thread gets the total.  `part`
// holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* part) {
    v = warp_sum(v);
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    __syncthreads();  // part may still be read from a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int nw = blockDim.x / WARP_SIZE;
    float t = lane < nw ? part[lane] : 0.0f;
    return warp_sum(t);
}
