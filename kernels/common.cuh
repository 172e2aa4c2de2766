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
// A load that skips the SM's L1 (not coherent across blocks): a value another block
// wrote in this launch, read after a fence and a count say it is there.
__device__ __forceinline__ float ld_cg(const float* p) { return __ldcg(p); }
#else
#include "emu/cuda_emu.h"
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dyn_shared())
// Per block, from the emulator's static pool (NaN-filled before each block).
#define SHARED(T, name, dims) \
    T(&name) dims = *reinterpret_cast<T(*) dims>(::emu::static_shared(sizeof(T dims), alignof(T)))
// load_float4 / store_float4 / load_uint4: cuda_emu.h (checks the alignment)
// The host's memory is coherent; the fences before it order the read.
inline float ld_cg(const float* p) { return *p; }
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
//
// 3×TF32, as CUTLASS's OpMultiplyAddFastF32 (PyTorch's f32 attention) and Triton's
// tf32x3: x = big + small with big = x rounded to TF32 and small = x − big (exact);
// a·b ≈ small_a·big_b + big_a·small_b + big_a·big_b, three TF32 products, the small
// terms first (small·small, about 2⁻²² of a·b, dropped).  The tensor cores read only a
// TF32 operand's 19 high bits, so small goes in as it is.  The same code runs on the
// emulator, whose product (kernels/emu) reads its operands the same way: its tests see
// the GPU's 3×TF32 arithmetic, not plain f32.

// x rounded to TF32 (to nearest, ties away from zero) as the tensor cores read it: half
// a TF32 unit added to the magnitude bits, the 13 low bits cleared.  cvt.rna.tf32.f32
// compiles to the same integer add and mask behind a test for ±inf; here ±inf stays
// ±inf without the test (the add stays in the cleared bits), and a NaN whose payload
// carries into the sign gives big = −0 and small = NaN, so the product is NaN still.
__device__ __forceinline__ unsigned tf32_big(float x) { return (__float_as_uint(x) + 0x1000u) & 0xffffe000u; }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ void mma_tf32_16x8x8(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
__device__ __forceinline__ void mma_tf32_16x8x8(float c[4], const unsigned a[4], const unsigned b[2]) {
    ::emu::warp_mma_tf32_16x8x8(c, a, b);
}
#endif

__device__ __forceinline__ void mma_f32_16x8x8(float c[4], const float a[4], const float b[2]) {
    unsigned ab[4], as[4], bb[2], bs[2];
    for (int i = 0; i < 4; ++i) {
        ab[i] = tf32_big(a[i]);
        as[i] = __float_as_uint(a[i] - __uint_as_float(ab[i]));
    }
    for (int i = 0; i < 2; ++i) {
        bb[i] = tf32_big(b[i]);
        bs[i] = __float_as_uint(b[i] - __uint_as_float(bb[i]));
    }
    mma_tf32_16x8x8(c, as, bb);
    mma_tf32_16x8x8(c, ab, bs);
    mma_tf32_16x8x8(c, ab, bb);
}

// mma_f32_16x8x8's operands read from row-major tiles (row stride ld) in its layout:
// A = tile rows row0 .. row0+15 × columns col0 .. col0+7; B[k][n] = tile[k0 + k][n0 + n]
// (mma_load_b) or tile[n0 + n][k0 + k] (mma_load_bt: the tile's rows are B's columns, as
// K's rows are for Q Kᵀ).
//
// Banks.  A and Bᵀ reads take 8 rows × 4 columns per register (lane 4g + t: row g,
// column t), B reads 4 rows × 8 columns (row t, column g).  A plain tile serves one kind
// without conflict: ld ≡ 4 mod 32 the first (bank 4g + t), ld ≡ 8 mod 32 the second
// (bank 8t + g), never both.  A tile read both ways (K in dQ: Q Kᵀ then dS K; Q and dO
// in dK / dV) is swizzled (SW): ld a multiple of 32 and element (r, c) at
// r·ld + (c ^ mma_swz(r)), mma_swz(r) = 4·π(r mod 8) with π = 0 2 4 6 1 3 5 7.  Rows
// g = 0..7 then XOR bits 2..4 of the column with 8 different values (A, Bᵀ: bank
// (c ^ 4π(g)), all 32 distinct), and rows t = 0..3 (or 4..7) with 8t (or 8t + 4), which
// moves B's 8 columns to 4 different 8-bank groups.  The swizzle moves whole 4-float
// groups, so a row's float4 / 16-byte copies stay whole.  emu_selftest_mma_banks
// (kernels/emu/selftest.cu) counts the wavefronts of every read the kernels make.
__device__ __forceinline__ int mma_swz(int r) { return ((r & 3) << 3) | (r & 4); }

// Offset of element (r, c) of a tile, plain or swizzled.
template <bool SW>
__device__ __forceinline__ int mma_off(int ld, int r, int c) {
    return r * ld + (SW ? c ^ mma_swz(r) : c);
}

// Offsets of the elements a lane reads for one operand: A (4), B (2) or Bᵀ (2).
template <bool SW>
__device__ __forceinline__ void mma_offs_a(int o[4], int ld, int row0, int col0) {
    const int lane = threadIdx.x % WARP_SIZE, r = row0 + lane / 4, c = col0 + lane % 4;
    o[0] = mma_off<SW>(ld, r, c);
    o[1] = mma_off<SW>(ld, r + 8, c);
    o[2] = mma_off<SW>(ld, r, c + 4);
    o[3] = mma_off<SW>(ld, r + 8, c + 4);
}
template <bool SW>
__device__ __forceinline__ void mma_offs_b(int o[2], int ld, int k0, int n0) {
    const int lane = threadIdx.x % WARP_SIZE, k = k0 + lane % 4, n = n0 + lane / 4;
    o[0] = mma_off<SW>(ld, k, n);
    o[1] = mma_off<SW>(ld, k + 4, n);
}
template <bool SW>
__device__ __forceinline__ void mma_offs_bt(int o[2], int ld, int k0, int n0) {
    const int lane = threadIdx.x % WARP_SIZE, k = k0 + lane % 4, n = n0 + lane / 4;
    o[0] = mma_off<SW>(ld, n, k);
    o[1] = mma_off<SW>(ld, n, k + 4);
}

// Bᵀ with its columns in the k order of an A operand: B[k][n] = tile[n0 + σ(n)][k0 + k],
// σ(g) = g / 2 + 4·(g mod 2) (rows 0 4 1 5 2 6 3 7).  Lane 4g + t's C fragment of the
// product then holds columns t and t + 4 (not 2t and 2t + 1) of rows g and g + 8: an A
// operand in the plain k order (mma_c_as_a), read against B as mma_load_b reads it.  The
// warp reads the same 8 rows as mma_offs_bt, in another lane order: the same banks.
template <bool SW>
__device__ __forceinline__ void mma_offs_bt_a_order(int o[2], int ld, int k0, int n0) {
    const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, k = k0 + lane % 4;
    const int n = n0 + (g >> 1) + 4 * (g & 1);
    o[0] = mma_off<SW>(ld, n, k);
    o[1] = mma_off<SW>(ld, n, k + 4);
}

template <bool SW = false>
__device__ __forceinline__ void mma_load_a(float a[4], const float* tile, int ld, int row0, int col0) {
    int o[4];
    mma_offs_a<SW>(o, ld, row0, col0);
    for (int i = 0; i < 4; ++i) a[i] = tile[o[i]];
}
template <bool SW = false>
__device__ __forceinline__ void mma_load_b(float b[2], const float* tile, int ld, int k0, int n0) {
    int o[2];
    mma_offs_b<SW>(o, ld, k0, n0);
    for (int i = 0; i < 2; ++i) b[i] = tile[o[i]];
}
template <bool SW = false>
__device__ __forceinline__ void mma_load_bt(float b[2], const float* tile, int ld, int k0, int n0) {
    int o[2];
    mma_offs_bt<SW>(o, ld, k0, n0);
    for (int i = 0; i < 2; ++i) b[i] = tile[o[i]];
}

template <bool SW = false>
__device__ __forceinline__ void mma_load_bt_a_order(float b[2], const float* tile, int ld, int k0, int n0) {
    int o[2];
    mma_offs_bt_a_order<SW>(o, ld, k0, n0);
    for (int i = 0; i < 2; ++i) b[i] = tile[o[i]];
}

// A C fragment (16 rows × 8 columns: lane 4g + t holds entries 2t, 2t + 1 of rows g and
// g + 8) as an A operand (lane 4g + t holds columns t, t + 4): A[g][t] = C[g][2t],
// A[g][t + 4] = C[g][2t + 1], and the same for row g + 8.  When C is a product with Bᵀ
// read by mma_load_bt_a_order, its entries 2t, 2t + 1 are its columns t, t + 4, so the A
// operand is C in the plain column order, to multiply B read by mma_load_b.
__device__ __forceinline__ void mma_c_as_a(float a[4], const float c[4]) {
    a[0] = c[0];
    a[1] = c[2];
    a[2] = c[1];
    a[3] = c[3];
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

// Row kernels (norms, per-row dots) run on the launch the wrappers' `per_row` picks: a
// warp per row (blockDim 32 × rows per block) for short rows, a block per row (blockDim
// a multiple of 32 × 1) for long ones.  A short row on a whole block left most of its
// threads idle and made every row wait at two barriers per sum.
// The row this thread works on (uniform over a warp, and over the block in the second case):
__device__ __forceinline__ long long row_index() { return (long long)blockIdx.x * blockDim.y + threadIdx.y; }
// Sum over the threads of one row, a warp or the block; every one gets the total.  The
// choice is uniform over the block, so the barriers in block_sum are reached by all.
__device__ __forceinline__ float row_sum(float v, float* part) {
    return blockDim.x == WARP_SIZE ? warp_sum(v) : block_sum(v, part);
}
