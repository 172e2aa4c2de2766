// Biased attention (POPEN Eq. 5, 6): O = softmax(Q Kᵀ·scale + γ + mask) V per head.
// B batch, NH query heads, NKV kv heads (head h reads kv head h / (NH/NKV)), Tq queries,
// Tk keys, HS head size (1..=128, any value).
// Layouts: q, out, dout (B,NH,Tq,HS); k, v (B,NKV,Tk,HS) (the forward: (B,NKV,Ks,HS),
// Ks >= Tk rows per block of which the first Tk are read, so that a preallocated KV cache
// is read in place); bias γ (B,Tk) or null;
// key_mask (B,Tk) bytes, 1 = attend, or null; lse (B,NH,Tq) natural-log log-sum-exp.
// Causal: query i sees key j iff j <= i + (Tk - Tq).  A row that sees no key has out = 0,
// lse = -inf and zero gradients.  The Tq×Tk score matrix is never stored: tiles of 32
// queries × 32 keys live in shared memory and registers only.
//
// Plain SIMT f32 (no tensor cores): one block of 4 warps takes 32 queries (8 rows per
// warp); for score tiles a lane owns one key, for output rows a lane owns dimensions
// lane, lane+32, lane+64, lane+96.  Softmax runs in the log2 domain (exp2f is one
// instruction), scores as dot·scale·log2(e) + γ·log2(e).
#include "common.cuh"

// Loop unrolling for nvcc; the host compiler of the emulator does not know the pragma.
#ifdef __CUDACC__
#define ATT_UNROLL _Pragma("unroll")
#else
#define ATT_UNROLL
#endif

#define ATT_THREADS 128
#define ATT_WARPS 4
#define ATT_BQ 32             // queries per block
#define ATT_BK 32             // keys per tile (one per lane)
#define ATT_ROWS 8            // query rows per warp (ATT_BQ / ATT_WARPS)
#define ATT_NC 4              // dimension chunks of 32 per lane: HS <= 128
#define ATT_MAX_HS 128
#define ATT_PS 32             // row stride of the backward's 32×32 P / dS tiles (rows read as float4)
#define DEC_CHUNK 128         // keys per decode block (one per thread)
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

// int min/max (CUDA's overloads are not in the emulator; these read the same on both).
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Shared-memory row strides: q-side tiles are read as float4 broadcasts (stride a
// multiple of 4), k-side tiles are read one row per lane (odd stride: no bank conflict).
__device__ __forceinline__ int att_qs(int hs) { return (hs + 3) & ~3; }
__device__ __forceinline__ int att_ks(int hs) { return att_qs(hs) + 1; }

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// The f32 tile load four values per global load when rows are 16-byte aligned (hs a
// multiple of 4, so there are no pad columns); false: not taken.  Stores stay scalar
// (the k-side stride is odd).
__device__ __forceinline__ bool att_load_tile4(float* dst, int ds, const float* src, int valid, int hs) {
    if ((hs & 3) != 0 || (reinterpret_cast<uintptr_t>(src) & 15) != 0) return false;
    const int w4 = hs / 4;
    for (int idx = threadIdx.x; idx < ATT_BQ * w4; idx += blockDim.x) {
        const int r = idx / w4, d = 4 * (idx - r * w4);
        const float4 v = r < valid ? load_float4(src + (size_t)r * hs + d) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        float* o = dst + r * ds + d;
        o[0] = v.x;
        o[1] = v.y;
        o[2] = v.z;
        o[3] = v.w;
    }
    return true;
}
__device__ __forceinline__ bool att_load_tile4(float*, int, const __nv_bfloat16*, int, int) { return false; }

// rows × hs of src (row stride hs) into dst (row stride ds), rows past `valid` and the
// pad columns [hs, ds or qs) as zeros, so that padded dot products add exact zeros.
template <typename T>
__device__ __forceinline__ void att_load_tile(float* dst, int ds, const T* src, int valid, int hs) {
    if (att_load_tile4(dst, ds, src, valid, hs)) return;
    int w = att_qs(hs);
    for (int idx = threadIdx.x; idx < ATT_BQ * w; idx += blockDim.x) {
        int r = idx / w, d = idx - r * w;
        dst[r * ds + d] = (r < valid && d < hs) ? ld(src + (size_t)r * hs + d) : 0.0f;
    }
}

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

// Dot products of this warp's 8 query rows (q tile, stride qs, zero padded) with the
// lane's key (k tile, stride ks): acc[r] = q[row0 + r] · k[lane].
__device__ __forceinline__ void att_dots(float acc[ATT_ROWS], const float* qt, int qs, int row0, const float* kt,
                                         int ks, int hs) {
    int lane = threadIdx.x % WARP_SIZE;
    const float* kr = kt + lane * ks;
ATT_UNROLL
    for (int r = 0; r < ATT_ROWS; ++r) acc[r] = 0.0f;
    int w = att_qs(hs);
    for (int d = 0; d < w; d += 4) {
        float k0 = kr[d], k1 = kr[d + 1], k2 = kr[d + 2], k3 = kr[d + 3];
ATT_UNROLL
        for (int r = 0; r < ATT_ROWS; ++r) {
            float4 qv = load_float4(qt + (row0 + r) * qs + d);
            acc[r] += qv.x * k0 + qv.y * k1 + qv.z * k2 + qv.w * k3;
        }
    }
}

// Last key (exclusive) that any of the queries i0..i0+rows-1 may see.
__device__ __forceinline__ int att_key_end(int causal, int i0, int rows, int Tq, int Tk) {
    if (!causal) return Tk;
    long e = (long)i0 + rows + Tk - Tq;  // last row's limit + 1
    return (int)(e < 0 ? 0 : (e > Tk ? Tk : e));
}

// ---------------------------------------------------------------------------------------
// Forward.  grid.x = ceil(Tq/32) · NH · B (query tile fastest), block 128.
// Dynamic shared memory (floats): q tile 32·qs, k and v tiles 32·ks each, P 32·32, key
// row 32.
// ---------------------------------------------------------------------------------------
template <typename T>
__device__ void attention_fwd_body(T* out, float* lse, const T* q, const T* k, const T* v, const float* bias,
                                   const unsigned char* key_mask, int B, int NH, int NKV, int Tq, int Tk, int Ks,
                                   int HS, int causal, float scale) {
    DYN_SHARED(float, fwd_sm);
    const int qs = att_qs(HS), ks = att_ks(HS);
    float* qt = fwd_sm;
    float* kt = qt + ATT_BQ * qs;
    float* vt = kt + ATT_BK * ks;
    float* pt = vt + ATT_BK * ks;
    float* kb = pt + ATT_BQ * ATT_BK;

    const int ntq = (Tq + ATT_BQ - 1) / ATT_BQ;
    const int tile = blockIdx.x % ntq, bh = blockIdx.x / ntq;
    const int b = bh / NH, h = bh % NH, g = h / (NH / NKV);
    const int i0 = tile * ATT_BQ, rows = imin(ATT_BQ, Tq - i0);
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int row0 = warp * ATT_ROWS;
    const int off = Tk - Tq;
    const float sl2 = scale * LOG2E_F;
    const T* qh = q + ((size_t)bh * Tq + i0) * HS;
    const T* kh = k + (size_t)(b * NKV + g) * Ks * HS;
    const T* vh = v + (size_t)(b * NKV + g) * Ks * HS;

    att_load_tile(qt, qs, qh, rows, HS);

    float m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][ATT_NC];
ATT_UNROLL
    for (int r = 0; r < ATT_ROWS; ++r) {
        m[r] = neg_inf();
        l[r] = 0.0f;
ATT_UNROLL
        for (int c = 0; c < ATT_NC; ++c) acc[r][c] = 0.0f;
    }

    const int kend = att_key_end(causal, i0, rows, Tq, Tk);
    for (int t0 = 0; t0 < kend; t0 += ATT_BK) {
        __syncthreads();  // the previous tile is no longer read
        const int kv = imin(ATT_BK, Tk - t0);
        att_load_tile(kt, ks, kh + (size_t)t0 * HS, kv, HS);
        att_load_tile(vt, ks, vh + (size_t)t0 * HS, kv, HS);
        att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
        __syncthreads();

        float s[ATT_ROWS];
        att_dots(s, qt, qs, row0, kt, ks, HS);
        const int j = t0 + lane;
ATT_UNROLL
        for (int r = 0; r < ATT_ROWS; ++r) {
            const int i = i0 + row0 + r;
            float x = s[r] * sl2 + kb[lane];
            if (causal && j > i + off) x = neg_inf();
            const float mn = fmaxf(m[r], warp_max(x));
            float p = 0.0f, corr = 1.0f;
            if (mn != neg_inf()) {  // warp-uniform
                p = exp2f(x - mn);
                corr = exp2f(m[r] - mn);  // 0 on the first visible tile
            }
            // Each lane keeps a partial row sum; one warp sum at the end.
            l[r] = l[r] * corr + p;
ATT_UNROLL
            for (int c = 0; c < ATT_NC; ++c) acc[r][c] *= corr;
            m[r] = mn;
            pt[(row0 + r) * ATT_BK + lane] = p;
        }
        __syncwarp();
        // Four keys per step, P read as float4 broadcasts; the keys up to the next
        // multiple of 4 past kend have p = 0 exactly (causally hidden), so adding them
        // changes nothing, and each acc element adds its terms in key order as before.
        const int jn = imin(ATT_BK, (imin(ATT_BK, kend - t0) + 3) & ~3);
        for (int jj = 0; jj < jn; jj += 4) {
            float vv[4][ATT_NC];
ATT_UNROLL
            for (int e = 0; e < 4; ++e)
ATT_UNROLL
                for (int c = 0; c < ATT_NC; ++c) vv[e][c] = vt[(jj + e) * ks + imin(lane + 32 * c, qs - 1)];
ATT_UNROLL
            for (int r = 0; r < ATT_ROWS; ++r) {
                const float4 p = load_float4(pt + (row0 + r) * ATT_BK + jj);
ATT_UNROLL
                for (int c = 0; c < ATT_NC; ++c) {
                    acc[r][c] += p.x * vv[0][c];
                    acc[r][c] += p.y * vv[1][c];
                    acc[r][c] += p.z * vv[2][c];
                    acc[r][c] += p.w * vv[3][c];
                }
            }
        }
    }

ATT_UNROLL
    for (int r = 0; r < ATT_ROWS; ++r) {
        const float tot = warp_sum(l[r]);
        const int rr = row0 + r;
        if (rr >= rows) continue;
        const bool any = tot > 0.0f;
        const float inv = any ? 1.0f / tot : 0.0f;
        T* o = out + ((size_t)bh * Tq + i0 + rr) * HS;
ATT_UNROLL
        for (int c = 0; c < ATT_NC; ++c) {
            const int d = lane + 32 * c;
            if (d < HS) st(o + d, acc[r][c] * inv);
        }
        if (lane == 0) lse[(size_t)bh * Tq + i0 + rr] = any ? (m[r] + log2f(tot)) * LN2_F : neg_inf();
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1)
    attention_fwd_f32(float* out, float* lse, const float* q, const float* k, const float* v, const float* bias,
                      const unsigned char* key_mask, int B, int NH, int NKV, int Tq, int Tk, int Ks, int HS,
                      int causal, float scale) {
    attention_fwd_body<float>(out, lse, q, k, v, bias, key_mask, B, NH, NKV, Tq, Tk, Ks, HS, causal, scale);
}

// 166 registers without spills at one block per SM guaranteed (ptxas spills at its
// default target of 128).
// bf16 q, k, v and out; f32 bias, lse and all arithmetic (tiles are widened to f32 in
// shared memory: the gain is halved global traffic, the accumulation stays exact f32).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1)
    attention_fwd_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, const float* bias, const unsigned char* key_mask, int B, int NH,
                       int NKV, int Tq, int Tk, int Ks, int HS, int causal, float scale) {
    attention_fwd_body<__nv_bfloat16>(out, lse, q, k, v, bias, key_mask, B, NH, NKV, Tq, Tk, Ks, HS, causal,
                                      scale);
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

// P and dS of this warp's 8 query rows × the lane's key, from the q / dout tiles
// (stride qs), k / v tiles (stride ks), the key row, lse·log2(e) and D per query row.
__device__ __forceinline__ void att_p_ds(float p[ATT_ROWS], float ds[ATT_ROWS], const float* qt, const float* dot_,
                                         int qs, int row0, const float* kt, const float* vt, int ks, int HS,
                                         const float* kb, const float* lse2, const float* Dt, float sl2, int causal,
                                         int i0, int t0, int off) {
    const int lane = threadIdx.x % WARP_SIZE;
    float dp[ATT_ROWS];
    att_dots(p, qt, qs, row0, kt, ks, HS);
    att_dots(dp, dot_, qs, row0, vt, ks, HS);
    const int j = t0 + lane;
ATT_UNROLL
    for (int r = 0; r < ATT_ROWS; ++r) {
        const int i = i0 + row0 + r;
        const float l2 = lse2[row0 + r];
        float x = p[r] * sl2 + kb[lane];
        const bool hidden = (causal && j > i + off) || l2 == neg_inf();
        const float pr = hidden ? 0.0f : exp2f(x - l2);
        p[r] = pr;
        ds[r] = pr * (dp[r] - Dt[row0 + r]);
    }
}

// Loads the query-side tiles of the backward: q, dout (32 rows from i0 of head bh),
// lse·log2(e) and D; rows past Tq get lse = −inf (they then contribute nothing).
__device__ __forceinline__ void att_load_qside(float* qt, float* dot_, float* lse2, float* Dt, int qs,
                                               const float* q, const float* dout, const float* lse, const float* D,
                                               size_t bh, int i0, int Tq, int HS) {
    const int rows = imin(ATT_BQ, Tq - i0);
    att_load_tile(qt, qs, q + (bh * Tq + i0) * HS, rows, HS);
    att_load_tile(dot_, qs, dout + (bh * Tq + i0) * HS, rows, HS);
    if (threadIdx.x < ATT_BQ) {
        const int r = threadIdx.x;
        lse2[r] = r < rows ? lse[bh * Tq + i0 + r] * LOG2E_F : neg_inf();
        Dt[r] = r < rows ? D[bh * Tq + i0 + r] : 0.0f;
    }
}

// Two kinds of block in one launch, both reading only the inputs and writing disjoint
// outputs, so the result is deterministic without atomics:
// - blocks [0, nkvb): one 32-key tile of one (b, kv head) each; loop over the heads of
//   the group and the query tiles that see the keys; accumulate dK, dV in registers
//   (thread = key lane × dims warp, warp+4, ...) and Σ_i dS for dγ, written per kv
//   head to dbias_part (B,NKV,Tk) (null: not wanted);
// - blocks [nkvb, nkvb + nqb): one 32-query tile of one (b, head) each; loop over key
//   tiles; accumulate dQ (thread = row × dims lane, lane+32, ...).
// P and dP are recomputed in both kinds (7 tile products instead of 5): the price of
// determinism without a dQ atomic.
// Dynamic shared memory (floats): q, dout tiles 32·qs each, k, v tiles 32·ks each,
// P and dS 32·32 each, key row, lse·log2e and D 32 each (about 74 KB at HS = 128: three
// blocks per SM, so registers may go to 170 without costing a block; at the default
// bound of 128 ptxas spilled).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3)
    attention_bwd_f32(float* dq, float* dk, float* dv, float* dbias_part, const float* q, const float* k,
                      const float* v, const float* bias, const unsigned char* key_mask, const float* lse,
                      const float* D, const float* dout, int B, int NH, int NKV, int Tq, int Tk, int HS, int causal,
                      float scale) {
    DYN_SHARED(float, bwd_sm);
    const int qs = att_qs(HS), ks = att_ks(HS);
    float* qt = bwd_sm;
    float* dot_ = qt + ATT_BQ * qs;
    float* kt = dot_ + ATT_BQ * qs;
    float* vt = kt + ATT_BK * ks;
    float* pt = vt + ATT_BK * ks;
    float* dst = pt + ATT_BQ * ATT_PS;
    float* kb = dst + ATT_BQ * ATT_PS;
    float* lse2 = kb + ATT_BK;
    float* Dt = lse2 + ATT_BQ;

    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int row0 = warp * ATT_ROWS;
    const int off = Tk - Tq;
    const int group = NH / NKV;
    const float sl2 = scale * LOG2E_F;
    const int ntk = (Tk + ATT_BK - 1) / ATT_BK, ntq = (Tq + ATT_BQ - 1) / ATT_BQ;
    const int nkvb = ntk * NKV * B;

    if ((int)blockIdx.x < nkvb) {
        // ---- dK, dV, dγ of one key tile ----
        const int tile = blockIdx.x % ntk, bg = blockIdx.x / ntk;
        const int b = bg / NKV, g = bg % NKV;
        const int t0 = tile * ATT_BK, kv = imin(ATT_BK, Tk - t0);
        att_load_tile(kt, ks, k + ((size_t)bg * Tk + t0) * HS, kv, HS);
        att_load_tile(vt, ks, v + ((size_t)bg * Tk + t0) * HS, kv, HS);
        att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
        // Thread (warp, lane) owns key t0+lane and dims 4·warp + 16c + e (c < 8, e < 4), so
        // that the q-side rows, the same for the whole warp, are read as float4
        // broadcasts (qs is a multiple of 4 and the tiles start 16-byte aligned).
        float dka[ATT_MAX_HS / ATT_WARPS], dva[ATT_MAX_HS / ATT_WARPS], dg = 0.0f;
ATT_UNROLL
        for (int c = 0; c < ATT_MAX_HS / ATT_WARPS; ++c) dka[c] = dva[c] = 0.0f;
        // First query that sees key t0 under the causal rule: i + off >= t0.
        const int ifirst = causal ? imax(0, t0 - off) : 0;
        for (int hh = 0; hh < group; ++hh) {
            const size_t bh = (size_t)b * NH + g * group + hh;
            for (int i0 = (ifirst / ATT_BQ) * ATT_BQ; i0 < Tq; i0 += ATT_BQ) {
                __syncthreads();  // previous tiles no longer read (and k/v/kb loaded)
                att_load_qside(qt, dot_, lse2, Dt, qs, q, dout, lse, D, bh, i0, Tq, HS);
                __syncthreads();
                float p[ATT_ROWS], ds[ATT_ROWS];
                att_p_ds(p, ds, qt, dot_, qs, row0, kt, vt, ks, HS, kb, lse2, Dt, sl2, causal, i0, t0, off);
ATT_UNROLL
                for (int r = 0; r < ATT_ROWS; ++r) {
                    pt[(row0 + r) * ATT_PS + lane] = p[r];
                    dst[(row0 + r) * ATT_PS + lane] = ds[r];
                }
                __syncthreads();
                for (int i = 0; i < ATT_BQ; ++i) {
                    const float pv = pt[i * ATT_PS + lane], dsv = dst[i * ATT_PS + lane];
                    dg += dsv;
ATT_UNROLL
                    for (int c = 0; c < ATT_MAX_HS / (4 * ATT_WARPS); ++c) {
                        const int d = 4 * warp + 4 * ATT_WARPS * c;
                        if (d < qs) {  // pad columns hold zeros
                            const float4 o = load_float4(dot_ + i * qs + d), x = load_float4(qt + i * qs + d);
                            dva[4 * c] += pv * o.x;
                            dva[4 * c + 1] += pv * o.y;
                            dva[4 * c + 2] += pv * o.z;
                            dva[4 * c + 3] += pv * o.w;
                            dka[4 * c] += dsv * x.x;
                            dka[4 * c + 1] += dsv * x.y;
                            dka[4 * c + 2] += dsv * x.z;
                            dka[4 * c + 3] += dsv * x.w;
                        }
                    }
                }
            }
        }
        if (lane < kv) {
            const size_t krow = ((size_t)bg * Tk + t0 + lane) * HS;
ATT_UNROLL
            for (int c = 0; c < ATT_MAX_HS / ATT_WARPS; ++c) {
                const int d = 4 * warp + 4 * ATT_WARPS * (c / 4) + c % 4;
                if (d < HS) {
                    dk[krow + d] = dka[c] * scale;
                    dv[krow + d] = dva[c];
                }
            }
            // Every warp summed the same dS column; warp 0 writes it.
            if (warp == 0 && dbias_part) dbias_part[(size_t)bg * Tk + t0 + lane] = dg;
        }
    } else {
        // ---- dQ of one query tile ----
        const int qb = blockIdx.x - nkvb;
        const int tile = qb % ntq, bhi = qb / ntq;
        const size_t bh = bhi;
        const int b = bhi / NH, h = bhi % NH, g = h / group;
        const int i0 = tile * ATT_BQ, rows = imin(ATT_BQ, Tq - i0);
        att_load_qside(qt, dot_, lse2, Dt, qs, q, dout, lse, D, bh, i0, Tq, HS);
        float acc[ATT_ROWS][ATT_NC];
ATT_UNROLL
        for (int r = 0; r < ATT_ROWS; ++r)
ATT_UNROLL
            for (int c = 0; c < ATT_NC; ++c) acc[r][c] = 0.0f;
        const int kend = att_key_end(causal, i0, rows, Tq, Tk);
        const size_t bg = (size_t)b * NKV + g;
        for (int t0 = 0; t0 < kend; t0 += ATT_BK) {
            __syncthreads();
            const int kv = imin(ATT_BK, Tk - t0);
            att_load_tile(kt, ks, k + (bg * Tk + t0) * HS, kv, HS);
            att_load_tile(vt, ks, v + (bg * Tk + t0) * HS, kv, HS);
            att_load_keyrow(kb, bias, key_mask, b, t0, Tk);
            __syncthreads();
            float p[ATT_ROWS], ds[ATT_ROWS];
            att_p_ds(p, ds, qt, dot_, qs, row0, kt, vt, ks, HS, kb, lse2, Dt, sl2, causal, i0, t0, off);
ATT_UNROLL
            for (int r = 0; r < ATT_ROWS; ++r) dst[(row0 + r) * ATT_PS + lane] = ds[r];
            __syncwarp();
            // Four keys per step as in the forward (dS = 0 exactly on hidden keys).
            const int jn = imin(ATT_BK, (imin(ATT_BK, kend - t0) + 3) & ~3);
            for (int jj = 0; jj < jn; jj += 4) {
                float kk[4][ATT_NC];
ATT_UNROLL
                for (int e = 0; e < 4; ++e)
ATT_UNROLL
                    for (int c = 0; c < ATT_NC; ++c) kk[e][c] = kt[(jj + e) * ks + imin(lane + 32 * c, qs - 1)];
ATT_UNROLL
                for (int r = 0; r < ATT_ROWS; ++r) {
                    const float4 d = load_float4(dst + (row0 + r) * ATT_PS + jj);
ATT_UNROLL
                    for (int c = 0; c < ATT_NC; ++c) {
                        acc[r][c] += d.x * kk[0][c];
                        acc[r][c] += d.y * kk[1][c];
                        acc[r][c] += d.z * kk[2][c];
                        acc[r][c] += d.w * kk[3][c];
                    }
                }
            }
        }
ATT_UNROLL
        for (int r = 0; r < ATT_ROWS; ++r) {
            const int rr = row0 + r;
            if (rr >= rows) continue;
            float* o = dq + (bh * Tq + i0 + rr) * HS;
ATT_UNROLL
            for (int c = 0; c < ATT_NC; ++c) {
                const int d = lane + 32 * c;
                if (d < HS) o[d] = acc[r][c] * scale;
            }
        }
    }
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
