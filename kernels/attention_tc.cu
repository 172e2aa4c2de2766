// Biased attention on tensor cores (the layouts and shared pieces: attention.cuh):
// forward, dQ and dK / dV with the blocks, tiles and softmax of the SIMT kernels in
// attention.cu, every product an mma_f32_16x8x8 (3×TF32 on a GPU, common.cuh).
#include "attention.cuh"

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
                                      int Tq, int Tk, int Ks, int HS, int causal, float scale, int lay) {
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
    const AttRows qr = att_rows(lay, ATT_LAY_Q, b, h, NH, Tq, HS), orw = att_rows(lay, ATT_LAY_O, b, h, NH, Tq, HS);
    const AttRows kr = att_rows(lay, ATT_LAY_K, b, kvh, NKV, Ks, HS);
    const AttRows vr = att_rows(lay, ATT_LAY_V, b, kvh, NKV, Ks, HS);

    ft_load_tile(qt, ks, q + qr.base + (size_t)i0 * qr.rs, FT_BQ, rows, HS, qr.rs);
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
        ft_load_tile(kt, ks, k + kr.base + (size_t)t0 * kr.rs, ATT_BK, kv, HS, kr.rs);
        ft_load_tile(vt, vs, v + vr.base + (size_t)t0 * vr.rs, ATT_BK, kv, HS, vr.rs);
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
        float* orow = out + orw.base + (size_t)(i0 + rr) * orw.rs;
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
                         int causal, float scale, int lay) {
    ATT_BY_HEAD_SIZE(HS, attention_fwd_tc_body<QS>(out, lse, q, k, v, bias, key_mask, B, NH, NKV, Tq, Tk, Ks, HS,
                                                   causal, scale, lay));
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
                                         int HS, int causal, float scale, int lay) {
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
    ft_load_qside(qt, dot_, lse2, Dt, ks, FT_BQ, q, dout, lse, D, bh, i0, NH, Tq, HS, lay);
    cp_async_wait_all();
    float acc[TC_MAX_COLS][4];
ATT_UNROLL
    for (int c = 0; c < TC_MAX_COLS; ++c)
        for (int e = 0; e < 4; ++e) acc[c][e] = 0.0f;
    const int kend = att_key_end(causal, i0, rows, Tq, Tk);
    const AttRows kr = att_rows(lay, ATT_LAY_K, b, kvh, NKV, Tk, HS);
    const AttRows vr = att_rows(lay, ATT_LAY_V, b, kvh, NKV, Tk, HS);
    for (int t0 = 0; t0 < kend; t0 += ATT_BK) {
        if (!att_tile_visible(key_mask, b, t0, Tk)) continue;  // all padding
        __syncthreads();
        const int kv = imin(ATT_BK, Tk - t0);
        ft_load_tile<true>(kt, sw, k + kr.base + (size_t)t0 * kr.rs, ATT_BK, kv, HS, kr.rs);
        ft_load_tile(vt, ks, v + vr.base + (size_t)t0 * vr.rs, ATT_BK, kv, HS, vr.rs);
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
        const AttRows qr = att_rows(lay, ATT_LAY_Q, b, h, NH, Tq, HS);
        float* o = dq + qr.base + (size_t)(i0 + rr) * qr.rs;
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
                            int B, int NH, int NKV, int Tq, int Tk, int HS, int causal, float scale, int lay) {
    ATT_BY_HEAD_SIZE(HS, attention_bwd_dq_tc_body<QS>(dq, q, k, v, bias, key_mask, lse, D, dout, B, NH, NKV, Tq, Tk,
                                                      HS, causal, scale, lay));
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
                                          int Tq, int Tk, int HS, int causal, float scale, int lay) {
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
    const AttRows kr = att_rows(lay, ATT_LAY_K, b, kvh, NKV, Tk, HS);
    const AttRows vr = att_rows(lay, ATT_LAY_V, b, kvh, NKV, Tk, HS);
    ft_load_tile(kt, ks, k + kr.base + (size_t)t0 * kr.rs, ATT_BK, kv, HS, kr.rs);
    ft_load_tile(vt, ks, v + vr.base + (size_t)t0 * vr.rs, ATT_BK, kv, HS, vr.rs);
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
            ft_load_qside<true>(qt, dot_, lse2, Dt, sw, ATT_BQ, q, dout, lse, D, bh, i0, NH, Tq, HS, lay);
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
        const size_t krow = kr.base + (size_t)(t0 + key) * kr.rs, vrow = vr.base + (size_t)(t0 + key) * vr.rs;
ATT_UNROLL
        for (int c = 0; c < TC_MAX_COLS / 2; ++c) {
            if (c_lo + c >= c_hi) break;
            for (int e = 0; e < 2; ++e) {
                const int d = 8 * (c_lo + c) + 2 * t + e;
                if (d < HS) {
                    dk[krow + d] = dka[c][2 * half + e] * scale;
                    dv[vrow + d] = dva[c][2 * half + e];
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
                             int causal, float scale, int lay) {
    ATT_BY_HEAD_SIZE(HS, attention_bwd_dkv_tc_body<QS>(dk, dv, dbias_part, q, k, v, bias, key_mask, lse, D, dout, B,
                                                       NH, NKV, Tq, Tk, HS, causal, scale, lay));
}
