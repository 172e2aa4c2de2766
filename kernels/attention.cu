// Biased attention (POPEN Eq. 5, 6): O = softmax(Q Kᵀ·scale + γ + mask) V per head.
// B batch, NH query heads, NKV kv heads (head h reads kv head h / (NH/NKV)), Tq queries,
// Tk keys, HS head size (1..=128, any value).
// Layouts: q, out, dout (B,NH,Tq,HS); k, v (B,NKV,Tk,HS) (the forward: (B,NKV,Ks,HS),
// Ks >= Tk rows per block of which the first Tk are read, so that a preallocated KV cache
// is read in place); bias γ (B,Tk) or null;
// key_mask (B,Tk) bytes, 1 = attend, or null; lse (B,NH,Tq) natural-log log-sum-exp.
// Causal: query i sees key j iff j <= i + (Tk - Tq).  A row that sees no key has out = 0,
// lse = -inf and zero gradients.  The Tq×Tk score matrix is never stored: tiles of 32 or
// 64 queries × 32 keys live in shared memory and registers only.
//
// Plain SIMT f32 (no tensor cores), register tiled: every thread computes a small tile of
// scores (4 × 4 or 2 × 4) and of its outputs from float4 reads of shared memory, so that
// a shared load feeds 8 to 16 FMAs (the layouts are written at each kernel).  Softmax
// runs in the log2 domain (exp2f is one instruction), scores as dot·scale·log2(e) +
// γ·log2(e).
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

// ---------------------------------------------------------------------------------------
// Forward, register tiled.  grid.x = ceil(Tq/64) · NH · B (query tile fastest), block
// 128.  A block takes 64 queries and walks the key tiles of 32.  Thread t belongs to
// row group rg = t / 8 (rows 4·rg .. 4·rg+3 of the block) and column group kg = t % 8;
// the 8 threads of a row group are 8 consecutive lanes of one warp, so a row's max and
// sum are three shuffles.  For S = Q Kᵀ a thread holds a 4 × 4 register tile (its rows
// × keys kg, kg+8, kg+16, kg+24): per 4 dimensions it reads 4 q rows (the same for its
// 8 lanes: broadcasts) and 4 k rows (8 distinct rows per 8 lanes at a stride ≡ 4 mod 32
// floats: no bank conflict) as float4, 8 loads for 64 FMAs.  For O += P V it holds its
// 4 rows × 16 dimensions (kg·4 + 32c + e): per 4 keys 4 P reads and 16 V reads (8 lanes
// read 128 consecutive bytes) for 256 FMAs.
// Dynamic shared memory (floats): q tile 64·qs, k tile 32·kst, v tile 32·qs, P 64·36,
// key row 32 (75 KB at HS = 128: three blocks per SM).
// ---------------------------------------------------------------------------------------
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

// `rows` × hs of src (row stride hs) into dst (row stride ds, a multiple of 4; with SW a
// multiple of 32 and the rows swizzled as mma_off lays them out), rows past `valid` and
// the pad columns [hs, qs) as zeros.  When the rows are 16-byte aligned f32,
// asynchronous 16-byte copies: every copy of the tile is in flight at once, and the
// caller waits with cp_async_wait_all() before its __syncthreads() (one memory latency
// per tile, not one per copy); otherwise plain loads and float4 stores.
template <bool SW = false, typename T>
__device__ __forceinline__ void ft_load_tile(float* dst, int ds, const T* src, int rows, int valid, int hs) {
    const int qs = att_qs(hs), w4 = qs / 4;
    const bool vec = sizeof(T) == 4 && (hs & 3) == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0;
    for (int idx = threadIdx.x; idx < rows * w4; idx += blockDim.x) {
        const int r = idx / w4, d = 4 * (idx - r * w4);
        const T* sr = src + (size_t)r * hs + d;
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

// Register tile of dot products: s[r][c] = a[row0 + r] · b[kg + 8c] over the padded
// width qs (a: stride qs, read as broadcasts by the 8 lanes of a row group; b: stride
// bs ≡ 4 mod 32, 8 distinct rows per 8 lanes).
template <int R>
__device__ __forceinline__ void ft_dots(float s[R][4], const float* a, int qs, int row0, const float* bt, int bs,
                                        int kg) {
ATT_UNROLL
    for (int r = 0; r < R; ++r)
ATT_UNROLL
        for (int c = 0; c < 4; ++c) s[r][c] = 0.0f;
ATT_UNROLL  // complete when qs is a compile-time constant (the QS = 128 bodies)
    for (int d = 0; d < qs; d += 4) {
        float4 av[R], bv[4];
ATT_UNROLL
        for (int r = 0; r < R; ++r) av[r] = load_float4(a + (row0 + r) * qs + d);
ATT_UNROLL
        for (int c = 0; c < 4; ++c) bv[c] = load_float4(bt + (kg + 8 * c) * bs + d);
ATT_UNROLL
        for (int r = 0; r < R; ++r)
ATT_UNROLL
            for (int c = 0; c < 4; ++c)
                s[r][c] = fma4(s[r][c], av[r], bv[c]);
    }
}

// acc[r][c] += Σ_j w[row0 + r][j] · t[j][d(c)] over the first `keys` keys of a 32-key
// tile: w is a P or dS tile (stride FT_PS, rows read as float4 broadcasts by the row
// group's 8 lanes), t a v or k tile (stride ts), d(c) = 4·kg + 32·(c / 4) + c % 4 the
// thread's 16 dimensions (8 lanes read 128 consecutive bytes).  Four keys per step: the
// keys up to the next multiple of 4 must carry w = 0 exactly (causally hidden) and finite
// t rows (zeros past Tk), so that adding them changes nothing; each acc element adds its
// terms in key order.
__device__ __forceinline__ void ft_rows_times_tile(float acc[4][FT_DIMS], const float* w, int row0, const float* t,
                                                   int ts, int keys, int kg, int qs) {
    const int jn = imin(ATT_BK, (keys + 3) & ~3);
    for (int jj = 0; jj < jn; jj += 4) {
        float4 wr[4];
ATT_UNROLL
        for (int r = 0; r < 4; ++r) wr[r] = load_float4(w + (row0 + r) * FT_PS + jj);
ATT_UNROLL
        for (int c = 0; c < FT_DIMS / 4; ++c) {
            const int d = 4 * kg + 32 * c;
            if (d >= qs) continue;
            float4 tv[4];
ATT_UNROLL
            for (int e = 0; e < 4; ++e) tv[e] = load_float4(t + (jj + e) * ts + d);
ATT_UNROLL
            for (int r = 0; r < 4; ++r) {
                float* a = acc[r] + 4 * c;
                const float4 x = wr[r];
ATT_UNROLL
                for (int i = 0; i < 4; ++i) a[i] = fma4(a[i], x, col4(tv, i));
            }
        }
    }
}

// QS: the padded head width when known at compile time (128: every loop over dimensions
// unrolls completely), 0 for any other (read from HS at run time).
template <typename T, int QS>
__device__ void attention_fwd_body(T* out, float* lse, const T* q, const T* k, const T* v, const float* bias,
                                   const unsigned char* key_mask, int B, int NH, int NKV, int Tq, int Tk, int Ks,
                                   int HS, int causal, float scale) {
    DYN_SHARED(float, fwd_sm);
    const int qs = QS > 0 ? QS : att_qs(HS), kst = ft_ks(qs);
    float* qt = fwd_sm;
    float* kt = qt + FT_BQ * qs;
    float* vt = kt + ATT_BK * kst;
    float* pt = vt + ATT_BK * qs;
    float* kb = pt + FT_BQ * FT_PS;

    const int ntq = (Tq + FT_BQ - 1) / FT_BQ;
    // Last query tile first: under the causal rule a tile's work grows with its index, and
    // the longest blocks starting first leave the shortest for the end of the grid.
    const int tile = ntq - 1 - (int)(blockIdx.x % ntq), bh = blockIdx.x / ntq;
    const int b = bh / NH, h = bh % NH, g = h / (NH / NKV);
    const int i0 = tile * FT_BQ, rows = imin(FT_BQ, Tq - i0);
    const int rg = threadIdx.x / 8, kg = threadIdx.x % 8;
    const int off = Tk - Tq;
    const float sl2 = scale * LOG2E_F;
    const T* qh = q + ((size_t)bh * Tq + i0) * HS;
    const T* kh = k + (size_t)(b * NKV + g) * Ks * HS;
    const T* vh = v + (size_t)(b * NKV + g) * Ks * HS;

    ft_load_tile(qt, qs, qh, FT_BQ, rows, HS);
    cp_async_wait_all();

    float m[4], l[4], acc[4][FT_DIMS];
ATT_UNROLL
    for (int r = 0; r < 4; ++r) {
        m[r] = neg_inf();
        l[r] = 0.0f;
ATT_UNROLL
        for (int c = 0; c < FT_DIMS; ++c) acc[r][c] = 0.0f;
    }

    const int kend = att_key_end(causal, i0, rows, Tq, Tk);
    for (int t0 = 0; t0 < kend; t0 += ATT_BK) {
        if (!att_tile_visible(key_mask, b, t0, Tk)) continue;  // all padding
        __syncthreads();  // the previous tile is no longer read
        const int kv = imin(ATT_BK, Tk - t0);
        ft_load_tile(kt, kst, kh + (size_t)t0 * HS, ATT_BK, kv, HS);
        ft_load_tile(vt, qs, vh + (size_t)t0 * HS, ATT_BK, kv, HS);
        att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
        cp_async_wait_all();
        __syncthreads();

        float s[4][4];
        ft_dots<4>(s, qt, qs, 4 * rg, kt, kst, kg);
ATT_UNROLL
        for (int r = 0; r < 4; ++r) {
            const int i = i0 + 4 * rg + r;
            float x[4], mx = neg_inf();
ATT_UNROLL
            for (int c = 0; c < 4; ++c) {
                const int jj = kg + 8 * c;
                x[c] = s[r][c] * sl2 + kb[jj];
                if (causal && t0 + jj > i + off) x[c] = neg_inf();
                mx = fmaxf(mx, x[c]);
            }
            // the row's 8 lanes: consecutive, so xor 1, 2, 4 stays in the group
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 4));
            const float mn = fmaxf(m[r], mx);
            float corr = 1.0f, ps = 0.0f;
            if (mn != neg_inf()) corr = exp2f(m[r] - mn);  // 0 on the first visible tile
ATT_UNROLL
            for (int c = 0; c < 4; ++c) {
                const float p = mn != neg_inf() ? exp2f(x[c] - mn) : 0.0f;
                ps += p;
                pt[(4 * rg + r) * FT_PS + kg + 8 * c] = p;
            }
            // Each lane keeps a partial row sum; the group's sum at the end.
            l[r] = l[r] * corr + ps;
ATT_UNROLL
            for (int c = 0; c < FT_DIMS; ++c) acc[r][c] *= corr;
            m[r] = mn;
        }
        __syncwarp();  // a row group's P rows are written and read by its own 8 lanes
        ft_rows_times_tile(acc, pt, 4 * rg, vt, qs, imin(ATT_BK, kend - t0), kg, qs);
    }

ATT_UNROLL
    for (int r = 0; r < 4; ++r) {
        float tot = l[r];
        tot += __shfl_xor_sync(FULL_MASK, tot, 1);
        tot += __shfl_xor_sync(FULL_MASK, tot, 2);
        tot += __shfl_xor_sync(FULL_MASK, tot, 4);
        const int rr = 4 * rg + r;
        if (rr >= rows) continue;
        const bool any = tot > 0.0f;
        const float inv = any ? 1.0f / tot : 0.0f;
        T* o = out + ((size_t)bh * Tq + i0 + rr) * HS;
ATT_UNROLL
        for (int c = 0; c < FT_DIMS; ++c) {
            const int d = 4 * kg + 32 * (c / 4) + c % 4;
            if (d < HS) st(o + d, acc[r][c] * inv);
        }
        if (kg == 0) lse[(size_t)bh * Tq + i0 + rr] = any ? (m[r] + log2f(tot)) * LN2_F : neg_inf();
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3)
    attention_fwd_f32(float* out, float* lse, const float* q, const float* k, const float* v, const float* bias,
                      const unsigned char* key_mask, int B, int NH, int NKV, int Tq, int Tk, int Ks, int HS,
                      int causal, float scale) {
    ATT_BY_HEAD_SIZE(HS, attention_fwd_body<float, QS>(out, lse, q, k, v, bias, key_mask, B, NH, NKV, Tq, Tk, Ks, HS,
                                                       causal, scale));
}

// bf16 q, k, v and out; f32 bias, lse and all arithmetic (tiles are widened to f32 in
// shared memory: the gain is halved global traffic, the accumulation stays exact f32).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3)
    attention_fwd_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, const float* bias, const unsigned char* key_mask, int B, int NH,
                       int NKV, int Tq, int Tk, int Ks, int HS, int causal, float scale) {
    attention_fwd_body<__nv_bfloat16, 0>(out, lse, q, k, v, bias, key_mask, B, NH, NKV, Tq, Tk, Ks, HS, causal,
                                         scale);
}

// ---------------------------------------------------------------------------------------
// Forward on tensor cores (mma_f32_16x8x8: 3×TF32 on a GPU), for head widths whose
// padded width qs is a multiple of 8.  The same grid, block, tiles (64 queries, 32 keys)
// and arithmetic as attention_fwd_body; warp w owns query rows 16w .. 16w+15 of the block
// and holds them as mma fragments: lane 4g + t keeps rows g and g+8, scores of keys t,
// t+4 of each 8-key column (so a row's max and sum are two shuffles among its 4 lanes)
// and output dimensions 2t, 2t+1 of each 8-wide column.  P stays in registers: S takes
// its keys in A order (mma_load_bt_a_order), so the score fragment of 8 keys is the A
// operand of O += P V as it is (mma_c_as_a).  q (as A) and k (as Bᵀ) at the stride
// ks ≡ 4 mod 32 and v (as B) at ks + 4 ≡ 8 mod 32 are read without bank conflicts.
// Dynamic shared memory (floats): q 64·ks, k 32·ks, v 32·(ks + 4), key row 32 (68 KB at
// HS = 128: three blocks per SM).
// ---------------------------------------------------------------------------------------
#define TC_MAX_COLS (ATT_MAX_HS / 8)  // 8-wide output columns at most

// Row stride of a swizzled tile (mma_off<true>): the padded width rounded up to 32, 4
// floats under ft_ks(qs), so it fits the space of a ks-strided tile.
__device__ __forceinline__ int tc_sw(int qs) { return (qs + 31) & ~31; }

template <int QS>
__device__ void attention_fwd_tc_body(float* out, float* lse, const float* q, const float* k, const float* v,
                                      const float* bias, const unsigned char* key_mask, int B, int NH, int NKV,
                                      int Tq, int Tk, int Ks, int HS, int causal, float scale) {
    DYN_SHARED(float, tc_sm);
    const int qs = QS > 0 ? QS : att_qs(HS), ks = ft_ks(qs), vs = ks + 4;
    float* qt = tc_sm;
    float* kt = qt + FT_BQ * ks;
    float* vt = kt + ATT_BK * ks;
    float* kb = vt + ATT_BK * vs;

    const int ntq = (Tq + FT_BQ - 1) / FT_BQ;
    const int tile = ntq - 1 - (int)(blockIdx.x % ntq), bh = blockIdx.x / ntq;
    const int b = bh / NH, h = bh % NH, kvh = h / (NH / NKV);
    const int i0 = tile * FT_BQ, rows = imin(FT_BQ, Tq - i0);
    const int lane = threadIdx.x % WARP_SIZE, r0 = 16 * (threadIdx.x / WARP_SIZE);
    const int g = lane / 4, t = lane % 4;
    const int off = Tk - Tq;
    const float sl2 = scale * LOG2E_F;
    const float* qh = q + ((size_t)bh * Tq + i0) * HS;
    const float* kh = k + (size_t)(b * NKV + kvh) * Ks * HS;
    const float* vh = v + (size_t)(b * NKV + kvh) * Ks * HS;

    ft_load_tile(qt, ks, qh, FT_BQ, rows, HS);
    cp_async_wait_all();

    // rows r0 + g (index 0) and r0 + g + 8 (index 1)
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
    float o[TC_MAX_COLS][4];
ATT_UNROLL
    for (int c = 0; c < TC_MAX_COLS; ++c)
        for (int e = 0; e < 4; ++e) o[c][e] = 0.0f;

    const int kend = att_key_end(causal, i0, rows, Tq, Tk);
    for (int t0 = 0; t0 < kend; t0 += ATT_BK) {
        if (!att_tile_visible(key_mask, b, t0, Tk)) continue;  // all padding
        __syncthreads();  // the previous tile is no longer read
        const int kv = imin(ATT_BK, Tk - t0);
        ft_load_tile(kt, ks, kh + (size_t)t0 * HS, ATT_BK, kv, HS);
        ft_load_tile(vt, vs, vh + (size_t)t0 * HS, ATT_BK, kv, HS);
        att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
        cp_async_wait_all();
        __syncthreads();

        // S (16 × 32) = Q Kᵀ: four 8-key columns in A order (entries e = 0, 1 of column n
        // are keys 8n + t, 8n + t + 4), k over the padded width
        float s[4][4];
ATT_UNROLL
        for (int n = 0; n < 4; ++n)
            for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
ATT_UNROLL  // complete in the QS = 128 bodies
        for (int d0 = 0; d0 < qs; d0 += 8) {
            float a[4];
            mma_load_a(a, qt, ks, r0, d0);
ATT_UNROLL
            for (int n = 0; n < 4; ++n) {
                float bb[2];
                mma_load_bt_a_order(bb, kt, ks, d0, 8 * n);
                mma_f32_16x8x8(s[n], a, bb);
            }
        }
        // online softmax of rows g (e = 0, 1) and g + 8 (e = 2, 3)
ATT_UNROLL
        for (int half = 0; half < 2; ++half) {
            const int i = i0 + r0 + g + 8 * half;
            float x[8], mx = neg_inf();
ATT_UNROLL
            for (int n = 0; n < 4; ++n)
                for (int e = 0; e < 2; ++e) {
                    const int jj = 8 * n + t + 4 * e;
                    float xv = s[n][2 * half + e] * sl2 + kb[jj];
                    if (causal && t0 + jj > i + off) xv = neg_inf();
                    x[2 * n + e] = xv;
                    mx = fmaxf(mx, xv);
                }
            // the row's 4 lanes are consecutive: xor 1, 2 stays among them
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            const float mn = fmaxf(m[half], mx);
            float corr = 1.0f, ps = 0.0f;
            if (mn != neg_inf()) corr = exp2f(m[half] - mn);
ATT_UNROLL
            for (int n = 0; n < 4; ++n)
                for (int e = 0; e < 2; ++e) {
                    const float p = mn != neg_inf() ? exp2f(x[2 * n + e] - mn) : 0.0f;
                    ps += p;
                    s[n][2 * half + e] = p;  // the scores' fragment now holds P
                }
            l[half] = l[half] * corr + ps;  // a partial row sum per lane; summed at the end
ATT_UNROLL
            for (int c = 0; c < TC_MAX_COLS; ++c) {
                o[c][2 * half] *= corr;
                o[c][2 * half + 1] *= corr;
            }
            m[half] = mn;
        }
        // O (16 × qs) += P (16 × 32) V (32 × qs), 8 keys a step, P from its registers:
        // hidden keys carry P = 0, keys past Tk zero rows of V, so all 32 keys are added
ATT_UNROLL
        for (int n = 0; n < 4; ++n) {
            float a[4];
            mma_c_as_a(a, s[n]);
ATT_UNROLL
            for (int c = 0; c < TC_MAX_COLS; ++c) {
                if (8 * c >= qs) break;
                float bb[2];
                mma_load_b(bb, vt, vs, 8 * n, 8 * c);
                mma_f32_16x8x8(o[c], a, bb);
            }
        }
    }

ATT_UNROLL
    for (int half = 0; half < 2; ++half) {
        float tot = l[half];
        tot += __shfl_xor_sync(FULL_MASK, tot, 1);
        tot += __shfl_xor_sync(FULL_MASK, tot, 2);
        const int rr = r0 + g + 8 * half;
        if (rr >= rows) continue;
        const bool any = tot > 0.0f;
        const float inv = any ? 1.0f / tot : 0.0f;
        float* orow = out + ((size_t)bh * Tq + i0 + rr) * HS;
ATT_UNROLL
        for (int c = 0; c < TC_MAX_COLS; ++c)
            for (int e = 0; e < 2; ++e) {
                const int d = 8 * c + 2 * t + e;
                if (d < HS) orow[d] = o[c][2 * half + e] * inv;
            }
        if (t == 0) lse[(size_t)bh * Tq + i0 + rr] = any ? (m[half] + log2f(tot)) * LN2_F : neg_inf();
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3)
    attention_fwd_tc_f32(float* out, float* lse, const float* q, const float* k, const float* v, const float* bias,
                         const unsigned char* key_mask, int B, int NH, int NKV, int Tq, int Tk, int Ks, int HS,
                         int causal, float scale) {
    ATT_BY_HEAD_SIZE(HS, attention_fwd_tc_body<QS>(out, lse, q, k, v, bias, key_mask, B, NH, NKV, Tq, Tk, Ks, HS,
                                                   causal, scale));
}

// ---------------------------------------------------------------------------------------
// Backward.
// forward was: S = scale·Q Kᵀ + γ (−inf where hidden), P = softmax(S) = exp(S − lse),
//              O = P V
// so, with D_i = Σ_d dO_id O_id:
//   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − D),  dQ = scale·dS K,  dK = scale·dSᵀ Q,
//   dγ_j = Σ_{heads, i} dS_ij.
// ---------------------------------------------------------------------------------------

// D (B·NH·Tq) = rowsum(dout ∘ out); one warp per row, block 128.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_bwd_preprocess_f32(float* D, const float* out, const float* dout, int rows, int HS) {
    const int row = blockIdx.x * ATT_WARPS + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;  // whole warps leave; no block barrier follows
    const float* o = out + (size_t)row * HS;
    const float* g = dout + (size_t)row * HS;
    float acc = 0.0f;
    for (int d = lane; d < HS; d += WARP_SIZE) acc += o[d] * g[d];
    acc = warp_sum(acc);
    if (lane == 0) D[row] = acc;
}

// P and dS of rows row0 .. row0+R-1 × keys kg + 8c of a 32-key tile, in place of the
// dot products: s holds q·k on entry and P on return, dp holds dout·v and becomes dS.
// lse2 (lse·log2 e, −inf for rows past Tq) and Dt are indexed by the tile's row.
template <int R>
__device__ __forceinline__ void ft_p_ds(float s[R][4], float dp[R][4], const float* kb, const float* lse2,
                                        const float* Dt, int row0, int kg, float sl2, int causal, int i0, int t0,
                                        int off) {
ATT_UNROLL
    for (int r = 0; r < R; ++r) {
        const int i = i0 + row0 + r;
        const float l2 = lse2[row0 + r], dd = Dt[row0 + r];
ATT_UNROLL
        for (int c = 0; c < 4; ++c) {
            const int jj = kg + 8 * c;
            const float x = s[r][c] * sl2 + kb[jj];
            const bool hidden = (causal && t0 + jj > i + off) || l2 == neg_inf();
            const float p = hidden ? 0.0f : exp2f(x - l2);
            s[r][c] = p;
            dp[r][c] = p * (dp[r][c] - dd);
        }
    }
}

// Loads the query-side tiles of the backward: `rows` rows of q and dout from i0 of head
// bh (stride qs), lse·log2(e) and D; rows past Tq get lse = −inf (they then contribute
// nothing).
template <bool SW = false>
__device__ __forceinline__ void ft_load_qside(float* qt, float* dot_, float* lse2, float* Dt, int qs, int rows,
                                              const float* q, const float* dout, const float* lse, const float* D,
                                              size_t bh, int i0, int Tq, int HS) {
    const int valid = imin(rows, Tq - i0);
    ft_load_tile<SW>(qt, qs, q + (bh * Tq + i0) * HS, rows, valid, HS);
    ft_load_tile<SW>(dot_, qs, dout + (bh * Tq + i0) * HS, rows, valid, HS);
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        lse2[r] = r < valid ? lse[bh * Tq + i0 + r] * LOG2E_F : neg_inf();
        Dt[r] = r < valid ? D[bh * Tq + i0 + r] : 0.0f;
    }
}

// dQ = scale · dS K, one block per 64-query tile of one (b, head), walking the key tiles
// of 32 that its rows see (the forward's layout: thread = row group t / 8 × column group
// t % 8; S and dP as two 4 × 4 register tiles; dQ as 4 rows × 16 dimensions).
// P and dP are recomputed here and in attention_bwd_dkv_f32: the price of determinism
// without a dQ atomic.
// Dynamic shared memory (floats): q, dout tiles 64·qs each, k, v tiles 32·kst each, dS
// 64·36, key row 32, lse·log2e and D 64 each (107 KB at HS = 128: two blocks per SM).
template <int QS>
__device__ void attention_bwd_dq_body(float* dq, const float* q, const float* k, const float* v, const float* bias,
                                      const unsigned char* key_mask, const float* lse, const float* D,
                                      const float* dout, int B, int NH, int NKV, int Tq, int Tk, int HS, int causal,
                                      float scale) {
    DYN_SHARED(float, dq_sm);
    const int qs = QS > 0 ? QS : att_qs(HS), kst = ft_ks(qs);
    float* qt = dq_sm;
    float* dot_ = qt + FT_BQ * qs;
    float* kt = dot_ + FT_BQ * qs;
    float* vt = kt + ATT_BK * kst;
    float* dst = vt + ATT_BK * kst;
    float* kb = dst + FT_BQ * FT_PS;
    float* lse2 = kb + ATT_BK;
    float* Dt = lse2 + FT_BQ;

    const int rg = threadIdx.x / 8, kg = threadIdx.x % 8;
    const int off = Tk - Tq;
    const float sl2 = scale * LOG2E_F;
    const int ntq = (Tq + FT_BQ - 1) / FT_BQ;
    const int tile = ntq - 1 - (int)(blockIdx.x % ntq), bhi = blockIdx.x / ntq;  // longest first
    const size_t bh = bhi;
    const int b = bhi / NH, h = bhi % NH, g = h / (NH / NKV);
    const int i0 = tile * FT_BQ, rows = imin(FT_BQ, Tq - i0);
    ft_load_qside(qt, dot_, lse2, Dt, qs, FT_BQ, q, dout, lse, D, bh, i0, Tq, HS);
    cp_async_wait_all();
    float acc[4][FT_DIMS];
ATT_UNROLL
    for (int r = 0; r < 4; ++r)
ATT_UNROLL
        for (int c = 0; c < FT_DIMS; ++c) acc[r][c] = 0.0f;
    const int kend = att_key_end(causal, i0, rows, Tq, Tk);
    const size_t bg = (size_t)b * NKV + g;
    for (int t0 = 0; t0 < kend; t0 += ATT_BK) {
        if (!att_tile_visible(key_mask, b, t0, Tk)) continue;  // all padding
        __syncthreads();
        const int kv = imin(ATT_BK, Tk - t0);
        ft_load_tile(kt, kst, k + (bg * Tk + t0) * HS, ATT_BK, kv, HS);
        ft_load_tile(vt, kst, v + (bg * Tk + t0) * HS, ATT_BK, kv, HS);
        att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
        cp_async_wait_all();
        __syncthreads();
        float p[4][4], ds[4][4];
        ft_dots<4>(p, qt, qs, 4 * rg, kt, kst, kg);
        ft_dots<4>(ds, dot_, qs, 4 * rg, vt, kst, kg);
        ft_p_ds<4>(p, ds, kb, lse2, Dt, 4 * rg, kg, sl2, causal, i0, t0, off);
ATT_UNROLL
        for (int r = 0; r < 4; ++r)
ATT_UNROLL
            for (int c = 0; c < 4; ++c) dst[(4 * rg + r) * FT_PS + kg + 8 * c] = ds[r][c];
        __syncwarp();  // a row group's dS rows are written and read by its own 8 lanes
        // dS = 0 exactly on hidden keys, and k rows past Tk are zeros.
        ft_rows_times_tile(acc, dst, 4 * rg, kt, kst, imin(ATT_BK, kend - t0), kg, qs);
    }
ATT_UNROLL
    for (int r = 0; r < 4; ++r) {
        const int rr = 4 * rg + r;
        if (rr >= rows) continue;
        float* o = dq + (bh * Tq + i0 + rr) * HS;
ATT_UNROLL
        for (int c = 0; c < FT_DIMS; ++c) {
            const int d = 4 * kg + 32 * (c / 4) + c % 4;
            if (d < HS) o[d] = acc[r][c] * scale;
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)
    attention_bwd_dq_f32(float* dq, const float* q, const float* k, const float* v, const float* bias,
                         const unsigned char* key_mask, const float* lse, const float* D, const float* dout, int B,
                         int NH, int NKV, int Tq, int Tk, int HS, int causal, float scale) {
    ATT_BY_HEAD_SIZE(HS, attention_bwd_dq_body<QS>(dq, q, k, v, bias, key_mask, lse, D, dout, B, NH, NKV, Tq, Tk, HS,
                                                   causal, scale));
}

// dQ on tensor cores (mma_f32_16x8x8), for head widths whose padded width qs is a
// multiple of 8: the blocks, tiles and arithmetic of attention_bwd_dq_body, in the
// fragment layout of attention_fwd_tc_f32 (warp w owns query rows 16w .. 16w+15; S and dP
// as four 8-key fragments, dQ as qs/8 8-wide ones).  dS stays in registers: S and dP
// take their keys in A order (mma_load_bt_a_order), so each dS fragment is an A operand
// of dQ = dS K as it is (mma_c_as_a).  The k tile is read as Bᵀ (Q Kᵀ) and as B (dS K),
// so it is swizzled (stride tc_sw, see mma_off); the others are read one way, at strides
// ≡ 4 mod 32: no bank conflict.
// Dynamic shared memory (floats): q, dout tiles 64·ks each, k, v tiles 32·ks each, key
// row 32, lse·log2e and D 64 each (100 KB at HS = 128).
template <int QS>
__device__ void attention_bwd_dq_tc_body(float* dq, const float* q, const float* k, const float* v,
                                         const float* bias, const unsigned char* key_mask, const float* lse,
                                         const float* D, const float* dout, int B, int NH, int NKV, int Tq, int Tk,
                                         int HS, int causal, float scale) {
    DYN_SHARED(float, dqt_sm);
    const int qs = QS > 0 ? QS : att_qs(HS), ks = ft_ks(qs), sw = tc_sw(qs);
    float* qt = dqt_sm;
    float* dot_ = qt + FT_BQ * ks;
    float* kt = dot_ + FT_BQ * ks;
    float* vt = kt + ATT_BK * ks;
    float* kb = vt + ATT_BK * ks;
    float* lse2 = kb + ATT_BK;
    float* Dt = lse2 + FT_BQ;
    const int lane = threadIdx.x % WARP_SIZE, r0 = 16 * (threadIdx.x / WARP_SIZE);
    const int g = lane / 4, t = lane % 4;
    const int off = Tk - Tq;
    const float sl2 = scale * LOG2E_F;
    const int ntq = (Tq + FT_BQ - 1) / FT_BQ;
    const int tile = ntq - 1 - (int)(blockIdx.x % ntq), bhi = blockIdx.x / ntq;  // longest first
    const size_t bh = bhi;
    const int b = bhi / NH, h = bhi % NH, kvh = h / (NH / NKV);
    const int i0 = tile * FT_BQ, rows = imin(FT_BQ, Tq - i0);
    ft_load_qside(qt, dot_, lse2, Dt, ks, FT_BQ, q, dout, lse, D, bh, i0, Tq, HS);
    cp_async_wait_all();
    float acc[TC_MAX_COLS][4];
ATT_UNROLL
    for (int c = 0; c < TC_MAX_COLS; ++c)
        for (int e = 0; e < 4; ++e) acc[c][e] = 0.0f;
    const int kend = att_key_end(causal, i0, rows, Tq, Tk);
    const size_t bg = (size_t)b * NKV + kvh;
    for (int t0 = 0; t0 < kend; t0 += ATT_BK) {
        if (!att_tile_visible(key_mask, b, t0, Tk)) continue;  // all padding
        __syncthreads();
        const int kv = imin(ATT_BK, Tk - t0);
        ft_load_tile<true>(kt, sw, k + (bg * Tk + t0) * HS, ATT_BK, kv, HS);
        ft_load_tile(vt, ks, v + (bg * Tk + t0) * HS, ATT_BK, kv, HS);
        att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
        cp_async_wait_all();
        __syncthreads();
        // S = Q Kᵀ and dP = dO Vᵀ (16 × 32 each), keys in A order: lane 4g + t's entries
        // e = 0, 1 of key group n are keys 8n + t, 8n + t + 4
        float sc[4][4], dp[4][4];
ATT_UNROLL
        for (int n = 0; n < 4; ++n)
            for (int e = 0; e < 4; ++e) sc[n][e] = dp[n][e] = 0.0f;
ATT_UNROLL  // complete in the QS = 128 bodies
        for (int d0 = 0; d0 < qs; d0 += 8) {
            float a[4], ao[4];
            mma_load_a(a, qt, ks, r0, d0);
            mma_load_a(ao, dot_, ks, r0, d0);
ATT_UNROLL
            for (int n = 0; n < 4; ++n) {
                float bk[2], bv[2];
                mma_load_bt_a_order<true>(bk, kt, sw, d0, 8 * n);
                mma_load_bt_a_order(bv, vt, ks, d0, 8 * n);
                mma_f32_16x8x8(sc[n], a, bk);
                mma_f32_16x8x8(dp[n], ao, bv);
            }
        }
        // P and dS = P ∘ (dP − D) of rows g (e = 0, 1) and g + 8 (e = 2, 3), in place of S
ATT_UNROLL
        for (int half = 0; half < 2; ++half) {
            const int rr = r0 + g + 8 * half, i = i0 + rr;
            const float l2 = lse2[rr], dd = Dt[rr];
ATT_UNROLL
            for (int n = 0; n < 4; ++n)
                for (int e = 0; e < 2; ++e) {
                    const int jj = 8 * n + t + 4 * e;
                    const float x = sc[n][2 * half + e] * sl2 + kb[jj];
                    const bool hidden = (causal && t0 + jj > i + off) || l2 == neg_inf();
                    const float p = hidden ? 0.0f : exp2f(x - l2);
                    sc[n][2 * half + e] = p * (dp[n][2 * half + e] - dd);
                }
        }
        // dQ (16 × qs) += dS (16 × 32) K (32 × qs), dS from registers (mma_c_as_a): dS = 0
        // on hidden keys, k rows past Tk are zeros
ATT_UNROLL
        for (int n = 0; n < 4; ++n) {
            float a[4];
            mma_c_as_a(a, sc[n]);
ATT_UNROLL
            for (int c = 0; c < TC_MAX_COLS; ++c) {
                if (8 * c >= qs) break;
                float bb[2];
                mma_load_b<true>(bb, kt, sw, 8 * n, 8 * c);
                mma_f32_16x8x8(acc[c], a, bb);
            }
        }
    }
ATT_UNROLL
    for (int half = 0; half < 2; ++half) {
        const int rr = r0 + g + 8 * half;
        if (rr >= rows) continue;
        float* o = dq + (bh * Tq + i0 + rr) * HS;
ATT_UNROLL
        for (int c = 0; c < TC_MAX_COLS; ++c)
            for (int e = 0; e < 2; ++e) {
                const int d = 8 * c + 2 * t + e;
                if (d < HS) o[d] = acc[c][2 * half + e] * scale;
            }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)
    attention_bwd_dq_tc_f32(float* dq, const float* q, const float* k, const float* v, const float* bias,
                            const unsigned char* key_mask, const float* lse, const float* D, const float* dout,
                            int B, int NH, int NKV, int Tq, int Tk, int HS, int causal, float scale) {
    ATT_BY_HEAD_SIZE(HS, attention_bwd_dq_tc_body<QS>(dq, q, k, v, bias, key_mask, lse, D, dout, B, NH, NKV, Tq, Tk,
                                                      HS, causal, scale));
}

// dK = scale · dSᵀ Q, dV = Pᵀ dO and Σ_i dS for dγ, one block per 32-key tile of one
// (b, kv head), looping over the heads of the group and the 32-query tiles that see the
// keys.  S and dP as 2 × 4 register tiles (thread = rows 2·(t / 8) + r × keys t % 8 + 8c),
// P and dS stored transposed (key-major, rows read as float4); then thread t owns keys
// 4·(t / 16) .. +3 × dimensions 4·(t % 16) + 64c + e (c < 2): per 4 query rows 8 P / dS
// reads (broadcasts over 16 lanes) and 16 q / dout reads for 256 FMAs.  dγ goes per kv
// head to dbias_part (B,NKV,Tk) (null: not wanted).
// Dynamic shared memory (floats): q, dout tiles 32·qs each, k, v tiles 32·kst each,
// Pᵀ and dSᵀ 32·36 each, key row, lse·log2e and D 32 each (74 KB at HS = 128: three
// blocks per SM).
template <int QS>
__device__ void attention_bwd_dkv_body(float* dk, float* dv, float* dbias_part, const float* q, const float* k,
                                       const float* v, const float* bias, const unsigned char* key_mask,
                                       const float* lse, const float* D, const float* dout, int B, int NH, int NKV,
                                       int Tq, int Tk, int HS, int causal, float scale) {
    DYN_SHARED(float, dkv_sm);
    const int qs = QS > 0 ? QS : att_qs(HS), kst = ft_ks(qs);
    float* qt = dkv_sm;
    float* dot_ = qt + ATT_BQ * qs;
    float* kt = dot_ + ATT_BQ * qs;
    float* vt = kt + ATT_BK * kst;
    float* pT = vt + ATT_BK * kst;
    float* dsT = pT + ATT_BK * FT_PS;
    float* kb = dsT + ATT_BK * FT_PS;
    float* lse2 = kb + ATT_BK;
    float* Dt = lse2 + ATT_BQ;

    const int rg = threadIdx.x / 8, kg = threadIdx.x % 8;   // S / dP tiles
    const int kq = threadIdx.x / 16, dg = threadIdx.x % 16;  // dK / dV tiles
    const int off = Tk - Tq;
    const int group = NH / NKV;
    const float sl2 = scale * LOG2E_F;
    const int ntk = (Tk + ATT_BK - 1) / ATT_BK;
    const int tile = blockIdx.x % ntk, bg = blockIdx.x / ntk;
    const int b = bg / NKV, g = bg % NKV;
    const int t0 = tile * ATT_BK, kv = imin(ATT_BK, Tk - t0);
    ft_load_tile(kt, kst, k + ((size_t)bg * Tk + t0) * HS, ATT_BK, kv, HS);
    ft_load_tile(vt, kst, v + ((size_t)bg * Tk + t0) * HS, ATT_BK, kv, HS);
    att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
    cp_async_wait_all();
    float dka[4][8], dva[4][8], dgs[4];
ATT_UNROLL
    for (int e = 0; e < 4; ++e) {
        dgs[e] = 0.0f;
ATT_UNROLL
        for (int c = 0; c < 8; ++c) dka[e][c] = dva[e][c] = 0.0f;
    }
    // First query that sees key t0 under the causal rule: i + off >= t0.
    const int ifirst = causal ? imax(0, t0 - off) : 0;
    // a tile of padding only: dK = dV = 0 and no dγ, without a query tile
    const int heads = att_tile_visible(key_mask, b, t0, Tk) ? group : 0;
    for (int hh = 0; hh < heads; ++hh) {
        const size_t bh = (size_t)b * NH + g * group + hh;
        for (int i0 = (ifirst / ATT_BQ) * ATT_BQ; i0 < Tq; i0 += ATT_BQ) {
            __syncthreads();  // previous tiles no longer read (and k/v/kb loaded)
            ft_load_qside(qt, dot_, lse2, Dt, qs, ATT_BQ, q, dout, lse, D, bh, i0, Tq, HS);
            cp_async_wait_all();
            __syncthreads();
            float p[2][4], ds[2][4];
            ft_dots<2>(p, qt, qs, 2 * rg, kt, kst, kg);
            ft_dots<2>(ds, dot_, qs, 2 * rg, vt, kst, kg);
            ft_p_ds<2>(p, ds, kb, lse2, Dt, 2 * rg, kg, sl2, causal, i0, t0, off);
ATT_UNROLL
            for (int r = 0; r < 2; ++r)
ATT_UNROLL
                for (int c = 0; c < 4; ++c) {
                    pT[(kg + 8 * c) * FT_PS + 2 * rg + r] = p[r][c];
                    dsT[(kg + 8 * c) * FT_PS + 2 * rg + r] = ds[r][c];
                }
            __syncthreads();
            // Rows past Tq have P = dS = 0 and zero q / dout rows.
            for (int ii = 0; ii < ATT_BQ; ii += 4) {
                float4 pv[4], sv[4];
ATT_UNROLL
                for (int e = 0; e < 4; ++e) {
                    pv[e] = load_float4(pT + (4 * kq + e) * FT_PS + ii);
                    sv[e] = load_float4(dsT + (4 * kq + e) * FT_PS + ii);
                    dgs[e] += sv[e].x + sv[e].y + sv[e].z + sv[e].w;
                }
ATT_UNROLL
                for (int c = 0; c < 2; ++c) {
                    const int d = 4 * dg + 64 * c;
                    if (d >= qs) continue;
                    float4 o[4], x[4];
ATT_UNROLL
                    for (int u = 0; u < 4; ++u) {
                        o[u] = load_float4(dot_ + (ii + u) * qs + d);
                        x[u] = load_float4(qt + (ii + u) * qs + d);
                    }
ATT_UNROLL
                    for (int e = 0; e < 4; ++e) {
                        float* va = dva[e] + 4 * c;
                        float* ka = dka[e] + 4 * c;
                        const float4 pw = pv[e], sw = sv[e];
ATT_UNROLL
                        for (int i = 0; i < 4; ++i) {
                            va[i] = fma4(va[i], pw, col4(o, i));
                            ka[i] = fma4(ka[i], sw, col4(x, i));
                        }
                    }
                }
            }
        }
    }
ATT_UNROLL
    for (int e = 0; e < 4; ++e) {
        const int key = 4 * kq + e;
        if (key >= kv) continue;
        const size_t krow = ((size_t)bg * Tk + t0 + key) * HS;
ATT_UNROLL
        for (int c = 0; c < 8; ++c) {
            const int d = 4 * dg + 64 * (c / 4) + c % 4;
            if (d < HS) {
                dk[krow + d] = dka[e][c] * scale;
                dv[krow + d] = dva[e][c];
            }
        }
        // The 16 lanes of a key group summed the same dS rows; the first writes them.
        if (dg == 0 && dbias_part) dbias_part[(size_t)bg * Tk + t0 + key] = dgs[e];
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3)
    attention_bwd_dkv_f32(float* dk, float* dv, float* dbias_part, const float* q, const float* k,
                          const float* v, const float* bias, const unsigned char* key_mask, const float* lse,
                          const float* D, const float* dout, int B, int NH, int NKV, int Tq, int Tk, int HS,
                          int causal, float scale) {
    ATT_BY_HEAD_SIZE(HS, attention_bwd_dkv_body<QS>(dk, dv, dbias_part, q, k, v, bias, key_mask, lse, D, dout, B, NH,
                                                    NKV, Tq, Tk, HS, causal, scale));
}

// dK, dV and dγ on tensor cores (mma_f32_16x8x8), for head widths whose padded width qs
// is a multiple of 8: the blocks (32 keys of one (b, kv head)), query tiles (32) and
// arithmetic of attention_bwd_dkv_body, transposed so that keys are the mma rows.  Per
// query tile: warp w computes Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for keys 16·(w % 2) .. +15 ×
// queries 16·(w / 2) .. +15 and writes Pᵀ and dSᵀ to shared memory; then warp w adds
// dV += Pᵀ dO and dK += dSᵀ Q for the same 16 keys × the (w / 2)-th half of the 8-wide
// dimension columns.  The q and dout tiles are read as Bᵀ and as B, so they are swizzled
// (stride tc_sw, see mma_off).  dγ: each lane sums the dS it computes in registers, over
// all query tiles; the 4 lanes of a key row and the two warps that share its keys add
// up at the end.
// Dynamic shared memory (floats): q, dout, k, v tiles 32·ks each, Pᵀ and dSᵀ 32·36
// each, key row, lse·log2e and D 32 each (75 KB at HS = 128).
template <int QS>
__device__ void attention_bwd_dkv_tc_body(float* dk, float* dv, float* dbias_part, const float* q, const float* k,
                                          const float* v, const float* bias, const unsigned char* key_mask,
                                          const float* lse, const float* D, const float* dout, int B, int NH, int NKV,
                                          int Tq, int Tk, int HS, int causal, float scale) {
    DYN_SHARED(float, dkvt_sm);
    const int qs = QS > 0 ? QS : att_qs(HS), ks = ft_ks(qs), sw = tc_sw(qs);
    float* qt = dkvt_sm;
    float* dot_ = qt + ATT_BQ * ks;
    float* kt = dot_ + ATT_BQ * ks;
    float* vt = kt + ATT_BK * ks;
    float* pT = vt + ATT_BK * ks;
    float* dsT = pT + ATT_BK * FT_PS;
    float* kb = dsT + ATT_BK * FT_PS;
    float* lse2 = kb + ATT_BK;
    float* Dt = lse2 + ATT_BQ;
    const int lane = threadIdx.x % WARP_SIZE, w = threadIdx.x / WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int kr0 = 16 * (w % 2), qc0 = 16 * (w / 2);  // key rows; query columns of Sᵀ
    const int ncols = qs / 8, c_lo = (w / 2) * ((ncols + 1) / 2), c_hi = imin(ncols, c_lo + (ncols + 1) / 2);
    const int off = Tk - Tq;
    const int group = NH / NKV;
    const float sl2 = scale * LOG2E_F;
    const int ntk = (Tk + ATT_BK - 1) / ATT_BK;
    const int tile = blockIdx.x % ntk, bg = blockIdx.x / ntk;
    const int b = bg / NKV, kvh = bg % NKV;
    const int t0 = tile * ATT_BK, kv = imin(ATT_BK, Tk - t0);
    ft_load_tile(kt, ks, k + ((size_t)bg * Tk + t0) * HS, ATT_BK, kv, HS);
    ft_load_tile(vt, ks, v + ((size_t)bg * Tk + t0) * HS, ATT_BK, kv, HS);
    att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
    cp_async_wait_all();
    // this warp's dK, dV columns c_lo + c (c < TC_MAX_COLS / 2), rows kr0 + g (+8)
    float dka[TC_MAX_COLS / 2][4], dva[TC_MAX_COLS / 2][4];
ATT_UNROLL
    for (int c = 0; c < TC_MAX_COLS / 2; ++c)
        for (int e = 0; e < 4; ++e) dka[c][e] = dva[c][e] = 0.0f;
    float dgs[2] = {0.0f, 0.0f};  // Σ dS of keys kr0 + g (+ 8) over this lane's queries
    const int ifirst = causal ? imax(0, t0 - off) : 0;
    // a tile of padding only: dK = dV = 0 and no dγ, without a query tile
    const int heads = att_tile_visible(key_mask, b, t0, Tk) ? group : 0;
    for (int hh = 0; hh < heads; ++hh) {
        const size_t bh = (size_t)b * NH + kvh * group + hh;
        for (int i0 = (ifirst / ATT_BQ) * ATT_BQ; i0 < Tq; i0 += ATT_BQ) {
            __syncthreads();  // previous tiles no longer read (and k/v/kb loaded)
            ft_load_qside<true>(qt, dot_, lse2, Dt, sw, ATT_BQ, q, dout, lse, D, bh, i0, Tq, HS);
            cp_async_wait_all();
            __syncthreads();
            float sc[2][4], dp[2][4];
ATT_UNROLL
            for (int n = 0; n < 2; ++n)
                for (int e = 0; e < 4; ++e) sc[n][e] = dp[n][e] = 0.0f;
ATT_UNROLL  // complete in the QS = 128 bodies
            for (int d0 = 0; d0 < qs; d0 += 8) {
                float ak[4], av[4];
                mma_load_a(ak, kt, ks, kr0, d0);
                mma_load_a(av, vt, ks, kr0, d0);
ATT_UNROLL
                for (int n = 0; n < 2; ++n) {
                    float bq[2], bo[2];
                    mma_load_bt<true>(bq, qt, sw, d0, qc0 + 8 * n);
                    mma_load_bt<true>(bo, dot_, sw, d0, qc0 + 8 * n);
                    mma_f32_16x8x8(sc[n], ak, bq);
                    mma_f32_16x8x8(dp[n], av, bo);
                }
            }
            // Pᵀ and dSᵀ of keys kr0 + g (e = 0, 1) and kr0 + g + 8 (e = 2, 3)
ATT_UNROLL
            for (int half = 0; half < 2; ++half) {
                const int jj = kr0 + g + 8 * half;
ATT_UNROLL
                for (int n = 0; n < 2; ++n)
                    for (int e = 0; e < 2; ++e) {
                        const int ii = qc0 + 8 * n + 2 * t + e;
                        const float l2 = lse2[ii];
                        const float x = sc[n][2 * half + e] * sl2 + kb[jj];
                        const bool hidden = (causal && t0 + jj > i0 + ii + off) || l2 == neg_inf();
                        const float p = hidden ? 0.0f : exp2f(x - l2);
                        const float ds = p * (dp[n][2 * half + e] - Dt[ii]);
                        pT[jj * FT_PS + ii] = p;
                        dsT[jj * FT_PS + ii] = ds;
                        dgs[half] += ds;
                    }
            }
            __syncthreads();  // Pᵀ and dSᵀ come from all four warps
            // Rows past Tq have P = dS = 0 and zero q / dout rows.
            for (int j0 = 0; j0 < ATT_BQ; j0 += 8) {
                float ap[4], as[4];
                mma_load_a(ap, pT, FT_PS, kr0, j0);
                mma_load_a(as, dsT, FT_PS, kr0, j0);
ATT_UNROLL
                for (int c = 0; c < TC_MAX_COLS / 2; ++c) {
                    if (c_lo + c >= c_hi) break;
                    float bo[2], bq[2];
                    mma_load_b<true>(bo, dot_, sw, j0, 8 * (c_lo + c));
                    mma_load_b<true>(bq, qt, sw, j0, 8 * (c_lo + c));
                    mma_f32_16x8x8(dva[c], ap, bo);
                    mma_f32_16x8x8(dka[c], as, bq);
                }
            }
        }
    }
ATT_UNROLL
    for (int half = 0; half < 2; ++half) {
        const int key = kr0 + g + 8 * half;
        if (key >= kv) continue;
        const size_t krow = ((size_t)bg * Tk + t0 + key) * HS;
ATT_UNROLL
        for (int c = 0; c < TC_MAX_COLS / 2; ++c) {
            if (c_lo + c >= c_hi) break;
            for (int e = 0; e < 2; ++e) {
                const int d = 8 * (c_lo + c) + 2 * t + e;
                if (d < HS) {
                    dk[krow + d] = dka[c][2 * half + e] * scale;
                    dv[krow + d] = dva[c][2 * half + e];
                }
            }
        }
    }
    if (dbias_part == nullptr) return;  // uniform: no barrier is skipped by some threads
    // dγ: the row's 4 lanes, then warps w ≥ 2 hand their keys' sums to warps w − 2
    // through the dSᵀ tile (no longer read once every warp is past the barrier)
ATT_UNROLL
    for (int half = 0; half < 2; ++half) {
        dgs[half] += __shfl_xor_sync(FULL_MASK, dgs[half], 1);
        dgs[half] += __shfl_xor_sync(FULL_MASK, dgs[half], 2);
    }
    __syncthreads();
    if (w >= 2 && t == 0)
        for (int half = 0; half < 2; ++half) dsT[kr0 + g + 8 * half] = dgs[half];
    __syncthreads();
    if (w < 2 && t == 0)
        for (int half = 0; half < 2; ++half) {
            const int key = kr0 + g + 8 * half;
            if (key < kv) dbias_part[(size_t)bg * Tk + t0 + key] = dgs[half] + dsT[key];
        }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)
    attention_bwd_dkv_tc_f32(float* dk, float* dv, float* dbias_part, const float* q, const float* k,
                             const float* v, const float* bias, const unsigned char* key_mask, const float* lse,
                             const float* D, const float* dout, int B, int NH, int NKV, int Tq, int Tk, int HS,
                             int causal, float scale) {
    ATT_BY_HEAD_SIZE(HS, attention_bwd_dkv_tc_body<QS>(dk, dv, dbias_part, q, k, v, bias, key_mask, lse, D, dout, B,
                                                       NH, NKV, Tq, Tk, HS, causal, scale));
}

// dbias (B,Tk) = Σ over kv heads of dbias_part (B,NKV,Tk), in head order.
extern "C" __global__ void attention_bwd_dbias_f32(float* dbias, const float* part, int B, int NKV, int Tk) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * Tk) return;
    const int b = idx / Tk, j = idx % Tk;
    float s = 0.0f;
    for (int g = 0; g < NKV; ++g) s += part[((size_t)b * NKV + g) * Tk + j];
    dbias[idx] = s;
}

// ---------------------------------------------------------------------------------------
// Decode: one query per (b, head) over the first `len` positions of a KV cache.
// Split over keys: block (split, head, b) takes keys [split·128, split·128 + 128) and
// writes (m·log2e-domain max, sum of exp2, unnormalized Σ p v) to part
// (B,NH,nsplit,HS+2); attention_decode_reduce_f32 merges the splits.
// q (B,NH,HS), k_cache, v_cache (B,NKV,Tmax,HS), bias (B,len) or null.
// grid.x = nsplit · NH · B, block 128; no dynamic shared memory.
// ---------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_decode_f32(float* part, const float* q, const float* k_cache, const float* v_cache, const float* bias,
                         int B, int NH, int NKV, int Tmax, int len, int HS, float scale, int nsplit) {
    SHARED(float, qv, [ATT_MAX_HS]);
    SHARED(float, sc, [DEC_CHUNK]);
    SHARED(float, red, [ATT_WARPS]);
    const int split = blockIdx.x % nsplit, bh = blockIdx.x / nsplit;
    const int b = bh / NH, h = bh % NH, g = h / (NH / NKV);
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int j0 = split * DEC_CHUNK, jn = imin(DEC_CHUNK, len - j0);
    const float sl2 = scale * LOG2E_F;
    const float* kh = k_cache + (size_t)(b * NKV + g) * Tmax * HS;
    const float* vh = v_cache + (size_t)(b * NKV + g) * Tmax * HS;
    for (int d = threadIdx.x; d < HS; d += blockDim.x) qv[d] = q[(size_t)bh * HS + d];
    __syncthreads();
    // Scores: a warp per key, lanes over dimensions (coalesced reads of the cache row).
    for (int jj = warp; jj < DEC_CHUNK; jj += ATT_WARPS) {
        float x = neg_inf();
        if (jj < jn) {
            const float* kr = kh + (size_t)(j0 + jj) * HS;
            float a = 0.0f;
            for (int d = lane; d < HS; d += WARP_SIZE) a += qv[d] * kr[d];
            a = warp_sum(a);
            x = a * sl2 + (bias ? bias[(size_t)b * len + j0 + jj] * LOG2E_F : 0.0f);
        }
        if (lane == 0) sc[jj] = x;
    }
    __syncthreads();
    // Block max of the chunk (thread t holds key t).
    float x = sc[threadIdx.x];
    float mw = warp_max(x);
    if (lane == 0) red[warp] = mw;
    __syncthreads();
    float mx = red[0];
    for (int w = 1; w < ATT_WARPS; ++w) mx = fmaxf(mx, red[w]);
    const float p = mx == neg_inf() ? 0.0f : exp2f(x - mx);
    __syncthreads();  // everyone has read red
    sc[threadIdx.x] = p;
    float lw = warp_sum(p);
    if (lane == 0) red[warp] = lw;
    __syncthreads();
    float* o = part + (size_t)(bh * nsplit + split) * (HS + 2);
    if (threadIdx.x == 0) {
        float l = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) l += red[w];
        o[0] = mx;
        o[1] = l;
    }
    // Σ_j p_j v_j: a thread per dimension, coalesced over the cache row.
    for (int d = threadIdx.x; d < HS; d += blockDim.x) {
        float a = 0.0f;
        for (int jj = 0; jj < jn; ++jj) a += sc[jj] * vh[(size_t)(j0 + jj) * HS + d];
        o[2 + d] = a;
    }
}

// out (B,NH,HS) from the splits of attention_decode_f32, and lse (B,NH) when not null
// (natural log, as attention_fwd_f32 writes it; -inf when no key is visible);
// grid.x = NH · B, block 128.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_decode_reduce_f32(float* out, float* lse, const float* part, int B, int NH, int HS, int nsplit) {
    const int bh = blockIdx.x;
    const float* pp = part + (size_t)bh * nsplit * (HS + 2);
    float mx = neg_inf();
    for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, pp[(size_t)s * (HS + 2)]);
    float l = 0.0f;
    for (int s = 0; s < nsplit; ++s) {
        const float m = pp[(size_t)s * (HS + 2)];
        if (m != neg_inf()) l += exp2f(m - mx) * pp[(size_t)s * (HS + 2) + 1];
    }
    // the scores were scaled by log2(e): back to natural log
    if (lse && threadIdx.x == 0) lse[bh] = l > 0.0f ? (mx + log2f(l)) * LN2_F : neg_inf();
    for (int d = threadIdx.x; d < HS; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < nsplit; ++s) {
            const float m = pp[(size_t)s * (HS + 2)];
            if (m != neg_inf()) a += exp2f(m - mx) * pp[(size_t)s * (HS + 2) + 2 + d];
        }
        out[(size_t)bh * HS + d] = l > 0.0f ? a / l : 0.0f;
    }
}
