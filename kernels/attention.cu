// Biased attention on the SIMT pipes (the layouts and shared pieces: attention.cuh).
//
// Plain SIMT f32 (no tensor cores), register tiled: every thread computes a small tile of
// scores (4 × 4 or 2 × 4) and of its outputs from float4 reads of shared memory, so that
// a shared load feeds 8 to 16 FMAs (the layouts are written at each kernel).  Softmax
// runs in the log2 domain (exp2f is one instruction), scores as dot·scale·log2(e) +
// γ·log2(e).
#include "attention.cuh"

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
                                   int HS, int causal, float scale, int lay) {
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
    const AttRows qr = att_rows(lay, ATT_LAY_Q, b, h, NH, Tq, HS), orw = att_rows(lay, ATT_LAY_O, b, h, NH, Tq, HS);
    const AttRows kr = att_rows(lay, ATT_LAY_K, b, g, NKV, Ks, HS), vr = att_rows(lay, ATT_LAY_V, b, g, NKV, Ks, HS);

    ft_load_tile(qt, qs, q + qr.base + (size_t)i0 * qr.rs, FT_BQ, rows, HS, qr.rs);
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
        ft_load_tile(kt, kst, k + kr.base + (size_t)t0 * kr.rs, ATT_BK, kv, HS, kr.rs);
        ft_load_tile(vt, qs, v + vr.base + (size_t)t0 * vr.rs, ATT_BK, kv, HS, vr.rs);
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
        T* o = out + orw.base + (size_t)(i0 + rr) * orw.rs;
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
                      int causal, float scale, int lay) {
    ATT_BY_HEAD_SIZE(HS, attention_fwd_body<float, QS>(out, lse, q, k, v, bias, key_mask, B, NH, NKV, Tq, Tk, Ks, HS,
                                                       causal, scale, lay));
}

// bf16 q, k, v and out; f32 bias, lse and all arithmetic (tiles are widened to f32 in
// shared memory: the gain is halved global traffic, the accumulation stays exact f32).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3)
    attention_fwd_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, const float* bias, const unsigned char* key_mask, int B, int NH,
                       int NKV, int Tq, int Tk, int Ks, int HS, int causal, float scale, int lay) {
    attention_fwd_body<__nv_bfloat16, 0>(out, lse, q, k, v, bias, key_mask, B, NH, NKV, Tq, Tk, Ks, HS, causal,
                                         scale, lay);
}

// D (B,NH,Tq) = rowsum(dout ∘ out) (out and dout in the layout of lay's ATT_LAY_O);
// one warp per row, block 128.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_bwd_preprocess_f32(float* D, const float* out, const float* dout, int B, int NH, int Tq, int HS,
                                 int lay) {
    const int row = blockIdx.x * ATT_WARPS + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= B * NH * Tq) return;  // whole warps leave; no block barrier follows
    const int bh = row / Tq, i = row % Tq;
    const AttRows orw = att_rows(lay, ATT_LAY_O, bh / NH, bh % NH, NH, Tq, HS);
    const float* o = out + orw.base + (size_t)i * orw.rs;
    const float* g = dout + orw.base + (size_t)i * orw.rs;
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
                                      float scale, int lay) {
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
    ft_load_qside(qt, dot_, lse2, Dt, qs, FT_BQ, q, dout, lse, D, bh, i0, NH, Tq, HS, lay);
    cp_async_wait_all();
    float acc[4][FT_DIMS];
ATT_UNROLL
    for (int r = 0; r < 4; ++r)
ATT_UNROLL
        for (int c = 0; c < FT_DIMS; ++c) acc[r][c] = 0.0f;
    const int kend = att_key_end(causal, i0, rows, Tq, Tk);
    const AttRows kr = att_rows(lay, ATT_LAY_K, b, g, NKV, Tk, HS), vr = att_rows(lay, ATT_LAY_V, b, g, NKV, Tk, HS);
    for (int t0 = 0; t0 < kend; t0 += ATT_BK) {
        if (!att_tile_visible(key_mask, b, t0, Tk)) continue;  // all padding
        __syncthreads();
        const int kv = imin(ATT_BK, Tk - t0);
        ft_load_tile(kt, kst, k + kr.base + (size_t)t0 * kr.rs, ATT_BK, kv, HS, kr.rs);
        ft_load_tile(vt, kst, v + vr.base + (size_t)t0 * vr.rs, ATT_BK, kv, HS, vr.rs);
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
        const AttRows qr = att_rows(lay, ATT_LAY_Q, b, h, NH, Tq, HS);
        float* o = dq + qr.base + (size_t)(i0 + rr) * qr.rs;
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
                         int NH, int NKV, int Tq, int Tk, int HS, int causal, float scale, int lay) {
    ATT_BY_HEAD_SIZE(HS, attention_bwd_dq_body<QS>(dq, q, k, v, bias, key_mask, lse, D, dout, B, NH, NKV, Tq, Tk, HS,
                                                   causal, scale, lay));
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
                                       int Tq, int Tk, int HS, int causal, float scale, int lay) {
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
    const AttRows kr = att_rows(lay, ATT_LAY_K, b, g, NKV, Tk, HS), vr = att_rows(lay, ATT_LAY_V, b, g, NKV, Tk, HS);
    ft_load_tile(kt, kst, k + kr.base + (size_t)t0 * kr.rs, ATT_BK, kv, HS, kr.rs);
    ft_load_tile(vt, kst, v + vr.base + (size_t)t0 * vr.rs, ATT_BK, kv, HS, vr.rs);
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
            ft_load_qside(qt, dot_, lse2, Dt, qs, ATT_BQ, q, dout, lse, D, bh, i0, NH, Tq, HS, lay);
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
        const size_t krow = kr.base + (size_t)(t0 + key) * kr.rs, vrow = vr.base + (size_t)(t0 + key) * vr.rs;
ATT_UNROLL
        for (int c = 0; c < 8; ++c) {
            const int d = 4 * dg + 64 * (c / 4) + c % 4;
            if (d < HS) {
                dk[krow + d] = dka[e][c] * scale;
                dv[vrow + d] = dva[e][c];
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
                          int causal, float scale, int lay) {
    ATT_BY_HEAD_SIZE(HS, attention_bwd_dkv_body<QS>(dk, dv, dbias_part, q, k, v, bias, key_mask, lse, D, dout, B, NH,
                                                    NKV, Tq, Tk, HS, causal, scale, lay));
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
// (B,NH,nsplit,HS+2); attention_decode_reduce_f32 merges the splits.  With one split
// (len <= 128) the block writes out and lse itself, as the reduce would (part unused):
// a decode step of a short cache is one launch.
// q (B,NH,HS), k_cache, v_cache (B,NKV,Tmax,HS), bias (B,len) or null; out (B,NH,HS) and
// lse (B,NH) or null as attention_decode_reduce_f32 takes them.
// grid.x = nsplit · NH · B, block 128; no dynamic shared memory.
//
// Scores: a group of G lanes per key, G the least power of two that covers the row's
// units (float4s when HS is a multiple of 4 and the caches 16-byte aligned, else
// floats), at most 32; a warp takes 32 / G keys at a time and sums each group in log2 G
// shuffles.  Σ p v: R = 128 / HS rows of HS threads when HS <= 64 (row r sums keys r,
// r + R, ..., each coalesced over the cache row; the R partials are added in row order),
// else a thread per dimension over all keys.  (A warp per key spent five shuffles on
// every key whatever HS, and a thread per dimension left 3/4 of the block idle at
// HS = 32.)
// ---------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_decode_f32(float* part, float* out, float* lse, const float* q, const float* k_cache,
                         const float* v_cache, const float* bias, int B, int NH, int NKV, int Tmax, int len, int HS,
                         float scale, int nsplit) {
    SHARED(float4, qv4, [ATT_MAX_HS / 4]);
    SHARED(float, sc, [DEC_CHUNK]);
    SHARED(float, red, [ATT_WARPS]);
    SHARED(float, pv, [ATT_THREADS]);
    float* qv = &qv4[0].x;
    const int split = blockIdx.x % nsplit, bh = blockIdx.x / nsplit;
    const int b = bh / NH, h = bh % NH, g = h / (NH / NKV);
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int j0 = split * DEC_CHUNK, jn = imin(DEC_CHUNK, len - j0);
    const float sl2 = scale * LOG2E_F;
    const float* kh = k_cache + (size_t)(b * NKV + g) * Tmax * HS;
    const float* vh = v_cache + (size_t)(b * NKV + g) * Tmax * HS;
    for (int d = threadIdx.x; d < HS; d += blockDim.x) qv[d] = q[(size_t)bh * HS + d];
    __syncthreads();
    const bool v4 = HS % 4 == 0 && ((reinterpret_cast<uintptr_t>(k_cache) & 15) == 0);
    const int units = v4 ? HS / 4 : HS;
    int G = 1;
    while (G < units && G < WARP_SIZE) G <<= 1;
    const int kpw = WARP_SIZE / G, sub = lane / G, gl = lane % G;
    // base is uniform over the warp: every lane reaches every shuffle
    for (int base = warp * kpw; base < jn; base += ATT_WARPS * kpw) {
        const int jj = base + sub;
        float a = 0.0f;
        if (jj < jn) {
            const float* kr = kh + (size_t)(j0 + jj) * HS;
            if (v4) {
                for (int u = gl; u < units; u += G) a = fma4(a, qv4[u], load_float4(kr + 4 * u));
            } else {
                for (int d = gl; d < HS; d += G) a += qv[d] * kr[d];
            }
        }
        for (int o = G / 2; o > 0; o >>= 1) a += __shfl_xor_sync(FULL_MASK, a, o);
        if (gl == 0 && jj < jn) sc[jj] = a * sl2 + (bias ? bias[(size_t)b * len + j0 + jj] * LOG2E_F : 0.0f);
    }
    __syncthreads();
    // Block max of the chunk (thread t holds key t).
    float x = (int)threadIdx.x < jn ? sc[threadIdx.x] : neg_inf();
    float mw = warp_max(x);
    if (lane == 0) red[warp] = mw;
    __syncthreads();
    float mx = red[0];
    for (int w = 1; w < ATT_WARPS; ++w) mx = fmaxf(mx, red[w]);
    const float p = mx == neg_inf() ? 0.0f : exp2f(x - mx);
    __syncthreads();  // everyone has read red (and sc)
    sc[threadIdx.x] = p;
    float lw = warp_sum(p);
    if (lane == 0) red[warp] = lw;
    __syncthreads();
    float l = 0.0f;
    for (int w = 0; w < ATT_WARPS; ++w) l += red[w];
    // one split: the reduce's answer here (its weight exp2(m - max) is exp2(0) = 1)
    const bool fin = nsplit == 1;
    float* o = fin ? nullptr : part + (size_t)(bh * nsplit + split) * (HS + 2);
    if (threadIdx.x == 0) {
        if (!fin) {
            o[0] = mx;
            o[1] = l;
        } else if (lse) {
            lse[bh] = l > 0.0f ? (mx + log2f(l)) * LN2_F : neg_inf();
        }
    }
    // the split's Σ p v, or out (B,NH,HS) normalized
    float* ov = fin ? out + (size_t)bh * HS : o + 2;
    auto fv = [fin, l](float a) { return !fin ? a : l > 0.0f ? a / l : 0.0f; };
    if (HS <= ATT_THREADS / 2) {
        const int R = ATT_THREADS / HS, r = threadIdx.x / HS, d = threadIdx.x % HS;
        if (r < R) {
            float a = 0.0f;
            for (int jj = r; jj < jn; jj += R) a += sc[jj] * vh[(size_t)(j0 + jj) * HS + d];
            pv[threadIdx.x] = a;
        }
        __syncthreads();
        if ((int)threadIdx.x < HS) {
            float a = 0.0f;
            for (int rr = 0; rr < R; ++rr) a += pv[rr * HS + threadIdx.x];
            ov[threadIdx.x] = fv(a);
        }
    } else {
        for (int d = threadIdx.x; d < HS; d += blockDim.x) {
            float a = 0.0f;
            for (int jj = 0; jj < jn; ++jj) a += sc[jj] * vh[(size_t)(j0 + jj) * HS + d];
            ov[d] = fv(a);
        }
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
