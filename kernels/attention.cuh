// Biased attention (POPEN Eq. 5, 6): O = softmax(Q Kᵀ·scale + γ + mask) V per head.
// B batch, NH query heads, NKV kv heads (head h reads kv head h / (NH/NKV)), Tq queries,
// Tk keys, HS head size (1..=128, any value).
// Layouts: q, out, dout (B,NH,Tq,HS); k, v (B,NKV,Tk,HS) (the forward: (B,NKV,Ks,HS),
// Ks >= Tk rows per block of which the first Tk are read, so that a preallocated KV cache
// is read in place) — or, per operand, token-major (see att_rows); bias γ (B,Tk) or null;
// key_mask (B,Tk) bytes, 1 = attend, or null; lse (B,NH,Tq) natural-log log-sum-exp.
// Causal: query i sees key j iff j <= i + (Tk - Tq).  A row that sees no key has out = 0,
// lse = -inf and zero gradients.  The Tq×Tk score matrix is never stored: tiles of 32 or
// 64 queries × 32 keys live in shared memory and registers only.
//
// Three files: this header (the layouts above, the tiles' strides and loads, the
// per-key row and its visibility vote), attention.cu (the SIMT f32 and bf16 kernels,
// the backward's preprocess and dγ sum, decode) and attention_tc.cu (the tensor-core
// kernels: the same blocks, tiles and arithmetic, every product an mma).
#pragma once
#include "common.cuh"

// Loop unrolling for nvcc; the host compiler of the emulator does not know the pragma.
#ifdef __CUDACC__
#define ATT_UNROLL _Pragma("unroll")
#else
#define ATT_UNROLL
#endif

#define ATT_THREADS 128
#define ATT_WARPS 4
#define ATT_BQ 32             // queries per tile of the dK / dV kernel
#define ATT_BK 32             // keys per tile
#define ATT_MAX_HS 128
#define DEC_CHUNK 128         // keys per decode block (one per thread)
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

// int min/max (CUDA's overloads are not in the emulator; these read the same on both).
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// acc + a·b as four fused multiply-adds, in order.  Written acc += a.x·b.x + … + a.w·b.w,
// the sum of products is formed first: an FMUL, three FFMA and an FADD, 5 instructions
// for 4 products, where the SIMT loops' issue slots are the limit.
__device__ __forceinline__ float fma4(float acc, float4 a, float4 b) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}
// The 4 floats of column i of 4 float4 rows.
__device__ __forceinline__ float4 col4(const float4 t[4], int i) {
    const float* r0 = &t[0].x;
    const float* r1 = &t[1].x;
    const float* r2 = &t[2].x;
    const float* r3 = &t[3].x;
    return make_float4(r0[i], r1[i], r2[i], r3[i]);
}

// Shared-memory row stride of the q-side tiles (and of every tile's padded width): a
// multiple of 4, rows read as float4.
__device__ __forceinline__ int att_qs(int hs) { return (hs + 3) & ~3; }

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// Additive per-key row of a key tile in the log2 domain: γ·log2(e), or -inf for padding
// and for keys past Tk.
__device__ __forceinline__ void att_load_keyrow(float* kb, const float* bias, const unsigned char* key_mask,
                                                int b, int t0, int Tk) {
    if (threadIdx.x < ATT_BK) {
        int j = t0 + threadIdx.x;
        float g = neg_inf();
        if (j < Tk && (key_mask == nullptr || key_mask[(size_t)b * Tk + j] != 0))
            g = bias ? bias[(size_t)b * Tk + j] * LOG2E_F : 0.0f;
        kb[threadIdx.x] = g;
    }
}

// Whether key_mask keeps any key of the tile t0 .. t0+31 of batch b (every tile without
// a mask).  Each warp reads the same 32 bytes and votes, so the answer is the same in
// every warp of the block: a loop may skip the tile with no barrier.  Skipping is exact:
// a tile whose keys are all hidden adds P = 0 (dS = 0) to every sum.
__device__ __forceinline__ bool att_tile_visible(const unsigned char* key_mask, int b, int t0, int Tk) {
    static_assert(ATT_BK == WARP_SIZE, "one key of the tile per lane");
    if (key_mask == nullptr) return true;
    const int j = t0 + (int)(threadIdx.x % WARP_SIZE);
    return __any_sync(FULL_MASK, j < Tk && key_mask[(size_t)b * Tk + j] != 0) != 0;
}

// Runs the statement with QS = ATT_MAX_HS when the padded head width is 128 (a body whose
// dimension loops unroll completely) and QS = 0 otherwise (the width read at run time):
//   ATT_BY_HEAD_SIZE(HS, attention_fwd_body<float, QS>(out, lse, ...));
#define ATT_BY_HEAD_SIZE(hs, ...)          \
    do {                                   \
        if (att_qs(hs) == ATT_MAX_HS) {    \
            constexpr int QS = ATT_MAX_HS; \
            __VA_ARGS__;                   \
        } else {                           \
            constexpr int QS = 0;          \
            __VA_ARGS__;                   \
        }                                  \
    } while (0)

// Last key (exclusive) that any of the queries i0..i0+rows-1 may see.
__device__ __forceinline__ int att_key_end(int causal, int i0, int rows, int Tq, int Tk) {
    if (!causal) return Tk;
    long e = (long)i0 + rows + Tk - Tq;  // last row's limit + 1
    return (int)(e < 0 ? 0 : (e > Tk ? Tk : e));
}

// Operands that are token-major, one bit each in a kernel's `lay` (AttnLayout in
// src/kernels/attention/mod.rs): q and dq; k and dk; v and dv; out and dout.
#define ATT_LAY_Q 1
#define ATT_LAY_K 2
#define ATT_LAY_V 4
#define ATT_LAY_O 8

// Where the rows of head h (of H) of batch b lie in an operand: element base + t·rs is
// the start of row t.  Head-major (the bit clear): (B,H,ts,HS), a head's rows adjacent
// (ts: rows per head block, a cache's capacity for k and v).  Token-major (the bit set):
// (B,ts,H,HS), a token's heads adjacent, as a linear layer writes them, so that the
// layer's output is read (and its gradient written) in place, with no split or merge.
struct AttRows {
    size_t base;
    int rs;
};
__device__ __forceinline__ AttRows att_rows(int lay, int bit, int b, int h, int H, int ts, int HS) {
    if (lay & bit) return {((size_t)b * ts * H + h) * HS, H * HS};
    return {((size_t)b * H + h) * ts * HS, HS};
}

// Tile geometry shared by the SIMT and the tensor-core kernels.
#define FT_BQ 64                 // queries per forward block
#define FT_PS (ATT_BK + 4)       // row stride of the P / dS tiles (and of Pᵀ / dSᵀ: 32 + 4)
#define FT_DIMS 16               // output dimensions per thread (16 · 8 = 128 = ATT_MAX_HS)

// Row stride of every kernel's k (and the backward's v) tile: a multiple of 4 that is
// ≡ 4 mod 32, so that 8 lanes reading float4s of 8 consecutive rows hit 8 distinct bank
// quads.
__device__ __forceinline__ int ft_ks(int hs) {
    const int qs = att_qs(hs);
    return ((qs - 4 + 31) & ~31) + 4;
}

// `rows` × hs of src (row stride rs) into dst (row stride ds, a multiple of 4; with SW a
// multiple of 32 and the rows swizzled as mma_off lays them out), rows past `valid` and
// the pad columns [hs, qs) as zeros.  When the rows are 16-byte aligned f32,
// asynchronous 16-byte copies: every copy of the tile is in flight at once, and the
// caller waits with cp_async_wait_all() before its __syncthreads() (one memory latency
// per tile, not one per copy); otherwise plain loads and float4 stores.
template <bool SW = false, typename T>
__device__ __forceinline__ void ft_load_tile(float* dst, int ds, const T* src, int rows, int valid, int hs,
                                             int rs) {
    const int qs = att_qs(hs), w4 = qs / 4;
    const bool vec =
        sizeof(T) == 4 && (hs & 3) == 0 && (rs & 3) == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0;
    for (int idx = threadIdx.x; idx < rows * w4; idx += blockDim.x) {
        const int r = idx / w4, d = 4 * (idx - r * w4);
        const T* sr = src + (size_t)r * rs + d;
        if (vec) {
            cp_async16(dst + mma_off<SW>(ds, r, d), reinterpret_cast<const float*>(r < valid ? sr : src), r < valid);
            continue;
        }
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r < valid) {
            x.x = ld(sr);
            if (d + 1 < hs) x.y = ld(sr + 1);
            if (d + 2 < hs) x.z = ld(sr + 2);
            if (d + 3 < hs) x.w = ld(sr + 3);
        }
        store_float4(dst + mma_off<SW>(ds, r, d), x);
    }
}

// ---------------------------------------------------------------------------------------
// Backward.
// forward was: S = scale·Q Kᵀ + γ (−inf where hidden), P = softmax(S) = exp(S − lse),
//              O = P V
// so, with D_i = Σ_d dO_id O_id:
//   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − D),  dQ = scale·dS K,  dK = scale·dSᵀ Q,
//   dγ_j = Σ_{heads, i} dS_ij.
// ---------------------------------------------------------------------------------------

// Loads the query-side tiles of the backward: `rows` rows of q and dout from i0 of head
// bh (of NH; stride qs), lse·log2(e) and D; rows past Tq get lse = −inf (they then
// contribute nothing).
template <bool SW = false>
__device__ __forceinline__ void ft_load_qside(float* qt, float* dot_, float* lse2, float* Dt, int qs, int rows,
                                              const float* q, const float* dout, const float* lse, const float* D,
                                              size_t bh, int i0, int NH, int Tq, int HS, int lay) {
    const int valid = imin(rows, Tq - i0);
    const int b = (int)(bh / NH), h = (int)(bh % NH);
    const AttRows qr = att_rows(lay, ATT_LAY_Q, b, h, NH, Tq, HS), orw = att_rows(lay, ATT_LAY_O, b, h, NH, Tq, HS);
    ft_load_tile<SW>(qt, qs, q + qr.base + (size_t)i0 * qr.rs, rows, valid, HS, qr.rs);
    ft_load_tile<SW>(dot_, qs, dout + orw.base + (size_t)i0 * orw.rs, rows, valid, HS, orw.rs);
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        lse2[r] = r < valid ? lse[bh * Tq + i0 + r] * LOG2E_F : neg_inf();
        Dt[r] = r < valid ? D[bh * Tq + i0 + r] : 0.0f;
    }
}
