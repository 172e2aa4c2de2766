// DPO log-prob reductions (Eq. 3): fused log-softmax + gather of the target token's
// log-prob, weighted per-sequence sums, and the backward w * (onehot - softmax) *
// upstream, without materializing the T x V log-softmax.  The same kernels give the
// SFT cross-entropy.  CPU twins in src/kernels/logprob.rs.
// B sequences, T positions, R = B*T rows, V vocabulary.
// A target of IGNORE_INDEX (-100, as in PyTorch) marks an ignored row (lp = 0, no
// gradient).  The host entry points reject any other target outside [0, V); here, where
// no error can be reported, every out-of-range target is treated as ignored so that the
// kernels never read out of bounds on it.
#include "common.cuh"

// (max, sum of exp(x - max)) pairs combine associatively; an empty side has
// m = -inf, s = 0 and must not produce exp(-inf - -inf) = NaN.
__device__ __forceinline__ void ms_combine(float& m, float& s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) {
        m = m2;
        s = s2;
        return;
    }
    float mm = fmaxf(m, m2);
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// One value into a running (max, sum of exp(x - max)).
__device__ __forceinline__ void ms_push(float& m, float& s, float xv) {
    if (xv > m) {
        s = s * expf(m - xv) + 1.f;  // exp(-inf) = 0 on the first element
        m = xv;
    } else if (xv != -INFINITY) {  // a row of -inf so far would give NaN
        s += expf(xv - m);
    }
}

// lp (R), lse (R), logits (R, V), targets (R).  One block per row: one pass over V
// keeping a running (max, sum) per thread, then a warp/block combine.  Rows are read
// four values per load when V is a multiple of 4 (then every row is 16-byte aligned):
// the running max moves once per four values.
// lp[r] = logits[r, t] - lse[r], lse[r] = log sum_v exp(logits[r, v]).
extern "C" __global__ void logprob_fwd_f32(float* __restrict__ lp, float* __restrict__ lse,
                                           const float* __restrict__ logits,
                                           const int* __restrict__ targets, int v) {
    SHARED(float, sm, [32]);
    SHARED(float, ss, [32]);
    size_t r = blockIdx.x;
    const float* x = logits + r * v;
    float m = -INFINITY, s = 0.f;
    int head = 0;
    if ((v & 3) == 0 && (reinterpret_cast<uintptr_t>(logits) & 15) == 0) {
        head = v;
        for (int k = 4 * threadIdx.x; k < v; k += 4 * blockDim.x) {
            float4 q = load_float4(x + k);
            float mx = fmaxf(fmaxf(q.x, q.y), fmaxf(q.z, q.w));
            if (mx == -INFINITY) continue;  // nothing to add
            if (mx > m) {
                s *= expf(m - mx);  // 0 while m = -inf (s is 0 then too)
                m = mx;
            }
            s += expf(q.x - m) + expf(q.y - m) + expf(q.z - m) + expf(q.w - m);
        }
    }
    for (int k = head + threadIdx.x; k < v; k += blockDim.x) ms_push(m, s, x[k]);
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(FULL_MASK, m, o);
        float s2 = __shfl_xor_sync(FULL_MASK, s, o);
        ms_combine(m, s, m2, s2);
    }
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x / WARP_SIZE;
        m = lane < nw ? sm[lane] : -INFINITY;
        s = lane < nw ? ss[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(FULL_MASK, m, o);
            float s2 = __shfl_xor_sync(FULL_MASK, s, o);
            ms_combine(m, s, m2, s2);
        }
        if (lane == 0) {
            float l = m + logf(s);
            lse[r] = l;
            int t = targets[r];
            lp[r] = (t >= 0 && t < v) ? x[t] - l : 0.f;
        }
    }
}

// out (B), scale (B), lp (B, T), w (B, T), targets (B, T).  One block per sequence.
// out[b] = scale[b] * sum_t w[b,t] lp[b,t], scale[b] = 1 / #{t : w[b,t] != 0 and
// targets[b,t] in [0, V)} when normalize (0 when no position counts), else 1.  Eq. 3's
// 1/|y|: |y| counts the response tokens, not the weights (lambda-weighted tokens count
// once), and an ignored target is no token (ignore_index leaves it out of the mean).
extern "C" __global__ void seq_weighted_sum_f32(float* __restrict__ out, float* __restrict__ scale,
                                                const float* __restrict__ lp,
                                                const float* __restrict__ w,
                                                const int* __restrict__ targets, int t, int v,
                                                int normalize) {
    SHARED(float, s1, [32]);
    SHARED(float, s2, [32]);
    size_t b = blockIdx.x;
    float acc = 0.f, cnt = 0.f;
    for (int k = threadIdx.x; k < t; k += blockDim.x) {
        float wv = w[b * t + k];
        int y = targets[b * t + k];
        acc += wv * lp[b * t + k];
        cnt += (wv != 0.f && y >= 0 && y < v) ? 1.f : 0.f;
    }
    acc = warp_sum(acc);
    cnt = warp_sum(cnt);
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) {
        s1[warp] = acc;
        s2[warp] = cnt;
    }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x / WARP_SIZE;
        acc = warp_sum(lane < nw ? s1[lane] : 0.f);
        cnt = warp_sum(lane < nw ? s2[lane] : 0.f);
        if (lane == 0) {
            float sc = normalize ? (cnt > 0.f ? 1.f / cnt : 0.f) : 1.f;
            scale[b] = sc;
            out[b] = acc * sc;
        }
    }
}

// forward: out[b] = scale[b] * sum_t w[b,t] * (logits[b,t,y] - lse[b,t])
// so:      dlogits[b,t,v] = d_out[b] * scale[b] * w[b,t] * (1[v == y] - exp(logits[b,t,v] - lse[b,t]))
// dlogits (R, V) overwritten, logits (R, V), lse (R), targets (R), w (R), d_out (B),
// scale (B).  One block per row.
extern "C" __global__ void logprob_bwd_f32(float* __restrict__ dlogits,
                                           const float* __restrict__ logits,
                                           const float* __restrict__ lse,
                                           const int* __restrict__ targets,
                                           const float* __restrict__ w,
                                           const float* __restrict__ d_out,
                                           const float* __restrict__ scale, int t, int v) {
    size_t r = blockIdx.x;
    size_t b = r / t;
    int y = targets[r];
    bool valid = y >= 0 && y < v;
    float coef = valid ? d_out[b] * scale[b] * w[r] : 0.f;
    float l = lse[r];
    const float* x = logits + r * v;
    float* dx = dlogits + r * v;
    auto d = [coef, l, y](int k, float xv) { return coef * ((k == y ? 1.f : 0.f) - expf(xv - l)); };
    int head = 0;
    if ((v & 3) == 0 && ((reinterpret_cast<uintptr_t>(logits) | reinterpret_cast<uintptr_t>(dlogits)) & 15) == 0) {
        head = v;
        for (int k = 4 * threadIdx.x; k < v; k += 4 * blockDim.x) {
            float4 q = load_float4(x + k);
            store_float4(dx + k, make_float4(d(k, q.x), d(k + 1, q.y), d(k + 2, q.z), d(k + 3, q.w)));
        }
    }
    for (int k = head + threadIdx.x; k < v; k += blockDim.x) dx[k] = d(k, x[k]);
}
