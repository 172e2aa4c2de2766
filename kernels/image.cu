// The pixel decoder's image ops for the device backend (src/backend/device/image.rs):
// im2col, depth-to-space, bilinear resize, per-row scale and the mask losses, each
// backward under its forward.  CPU twins: src/backend/image.rs (the same formulas, the
// reference the kernels are tested against in tests/backend_device.rs).
// Feature maps are channels-last (B,H,W,C).  B batch, H x W input pixels, C channels,
// K kernel, Ho x Wo output pixels, r upsampling factor, N rows, M masks, P pixels.
// No two threads write one element (the backwards are gathers, or the inverse of a
// permutation): no atomics, and the same sums run to run.
#include "common.cuh"

// A grid-stride loop with index type I: the ops below split an element index into
// (batch, pixel, channel) by division, and a 32-bit division is a few times cheaper than
// a 64-bit one, so each kernel runs its body with I = int whenever every index fits.
#define GRID_STRIDE_T(I, i, n) \
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)(n); i += (I)gridDim.x * (I)blockDim.x)
#define INDEX_FITS_INT(n) ((long long)(n) + (long long)gridDim.x * blockDim.x <= 2147483647LL)
// Runs BODY<int>(...) or BODY<long long>(...) by the element count n.
#define BY_INDEX_WIDTH(n, BODY, ...)                   \
    do {                                               \
        if (INDEX_FITS_INT(n)) BODY<int>(__VA_ARGS__); \
        else BODY<long long>(__VA_ARGS__);             \
    } while (0)

// Element e of a channels-last (B,H,W,C) tensor as (b, y, x, ch).
template <typename I>
struct Bhwc {
    I b;
    int y, x, ch;
};
template <typename I>
__device__ __forceinline__ Bhwc<I> split_bhwc(I e, int h, int w, int c) {
    Bhwc<I> p;
    p.ch = (int)(e % c);
    const I q = e / c;
    p.x = (int)(q % w);
    const I q2 = q / w;
    p.y = (int)(q2 % h);
    p.b = q2 / h;
    return p;
}

// ---- im2col (stride-1 convolution as a matrix product) ----

// x (B,H,W,C) -> out (B,Ho,Wo,K K C), each row ordered (ky, kx, c), zero padding:
//   out[(b,oy,ox), (ky,kx,c)] = x[b, oy+ky-pad, ox+kx-pad, c], 0 outside
template <typename I>
__device__ __forceinline__ void im2col_body(float* out, const float* x, long long n, int h, int w, int c, int k,
                                            int pad, int ho, int wo) {
    GRID_STRIDE_T(I, e, n) {
        const int ch = (int)(e % c);
        const I q = e / c;
        const int kk = (int)(q % (k * k));
        const I row = q / (k * k);
        const int ox = (int)(row % wo);
        const I r2 = row / wo;
        const int oy = (int)(r2 % ho);
        const I bi = r2 / ho;
        const int iy = oy + kk / k - pad, ix = ox + kk % k - pad;
        out[e] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[((bi * h + iy) * w + ix) * c + ch] : 0.0f;
    }
}
extern "C" __global__ void im2col_f32(float* out, const float* x, int b, int h, int w, int c, int k, int pad, int ho,
                                      int wo) {
    const long long n = (long long)b * ho * wo * k * k * c;
    const long long reach = (long long)b * h * w * c;  // x's length
    BY_INDEX_WIDTH(n > reach ? n : reach, im2col_body, out, x, n, h, w, c, k, pad, ho, wo);
}

// forward: out[(b,oy,ox), (ky,kx,c)] = x[b, oy+ky-pad, ox+kx-pad, c]
// so:      dx[b,iy,ix,c] = sum_{ky,kx} dout[(b, iy+pad-ky, ix+pad-kx), (ky,kx,c)] over the
//          (oy, ox) inside the output   (overwritten)
template <typename I>
__device__ __forceinline__ void im2col_bwd_body(float* dx, const float* dout, long long n, int h, int w, int c,
                                                int k, int pad, int ho, int wo) {
    // the largest index read is dout's, (B·Ho·Wo)·K²C: the caller's check covers it
    const I width = (I)k * k * c;
    GRID_STRIDE_T(I, e, n) {
        const Bhwc<I> px = split_bhwc<I>(e, h, w, c);
        const int ch = px.ch, ix = px.x, iy = px.y;
        const I bi = px.b;
        float acc = 0.0f;
        for (int ky = 0; ky < k; ++ky) {
            int oy = iy + pad - ky;
            if (oy < 0 || oy >= ho) continue;
            for (int kx = 0; kx < k; ++kx) {
                int ox = ix + pad - kx;
                if (ox < 0 || ox >= wo) continue;
                acc += dout[((bi * ho + oy) * wo + ox) * width + (ky * k + kx) * c + ch];
            }
        }
        dx[e] = acc;
    }
}
extern "C" __global__ void im2col_bwd_f32(float* dx, const float* dout, int b, int h, int w, int c, int k, int pad,
                                          int ho, int wo) {
    const long long n = (long long)b * h * w * c;
    const long long reach = (long long)b * ho * wo * k * k * c;  // dout's length
    BY_INDEX_WIDTH(n > reach ? n : reach, im2col_bwd_body, dx, dout, n, h, w, c, k, pad, ho, wo);
}

// ---- depth-to-space (the transposed conv k = r, stride r after a Linear) ----

// Index into x (B,H,W,r r C) of element e of out (B,rH,rW,C): out pixel (y r + dy,
// x r + dx) takes channels (dy, dx, .) of pixel (y, x).
template <typename I>
__device__ __forceinline__ I d2s_src(I e, int h, int w, int c, int r) {
    const Bhwc<I> o = split_bhwc<I>(e, h * r, w * r, c);
    return ((o.b * h + o.y / r) * w + o.x / r) * ((I)r * r * c) + ((o.y % r) * r + o.x % r) * c + o.ch;
}
template <typename I>
__device__ __forceinline__ void d2s_body(float* out, const float* x, long long n, int h, int w, int c, int r) {
    GRID_STRIDE_T(I, e, n) out[e] = x[d2s_src<I>(e, h, w, c, r)];
}
template <typename I>
__device__ __forceinline__ void d2s_bwd_body(float* dx, const float* dout, long long n, int h, int w, int c, int r) {
    GRID_STRIDE_T(I, e, n) dx[d2s_src<I>(e, h, w, c, r)] = dout[e];
}

// x (B,H,W,r r C) -> out (B,rH,rW,C) (both of n elements)
extern "C" __global__ void depth_to_space_f32(float* out, const float* x, long long n, int h, int w, int c, int r) {
    BY_INDEX_WIDTH(n, d2s_body, out, x, n, h, w, c, r);
}

// The forward is a permutation, so the backward is its inverse: dx (B,H,W,r r C)
// overwritten from dout (B,rH,rW,C).
extern "C" __global__ void depth_to_space_bwd_f32(float* dx, const float* dout, long long n, int h, int w, int c,
                                                  int r) {
    BY_INDEX_WIDTH(n, d2s_bwd_body, dx, dout, n, h, w, c, r);
}

// ---- bilinear resize, PyTorch's align_corners=False ----

// One output coordinate's taps along an axis, as the CPU twin computes them (in double):
// src = max((d + 1/2) in/out - 1/2, 0), i0 = floor(src) (at most in - 1),
// i1 = min(i0 + 1, in - 1), l1 = src - i0, l0 = 1 - l1.
struct Tap {
    int i0, i1;
    float l0, l1;
};
// scale = n_in / n_out in double, computed once per thread by the callers.
__device__ __forceinline__ Tap tap(int d, int n_in, double scale) {
    double src = ((double)d + 0.5) * scale - 0.5;
    if (src < 0.0) src = 0.0;
    int i0 = (int)floor(src);
    if (i0 > n_in - 1) i0 = n_in - 1;
    Tap t;
    t.i0 = i0;
    t.i1 = i0 < n_in - 1 ? i0 + 1 : i0;
    double l1 = src - (double)i0;
    t.l0 = (float)(1.0 - l1);
    t.l1 = (float)l1;
    return t;
}

// x (B,H,W,C) -> out (B,Ho,Wo,C):
//   out = ly0 (lx0 x[i0,j0] + lx1 x[i0,j1]) + ly1 (lx0 x[i1,j0] + lx1 x[i1,j1])
template <typename I>
__device__ __forceinline__ void resize_body(float* out, const float* x, long long n, int h, int w, int c, int ho,
                                            int wo) {
    const double sy = (double)h / (double)ho, sx = (double)w / (double)wo;
    GRID_STRIDE_T(I, e, n) {
        const Bhwc<I> o = split_bhwc<I>(e, ho, wo, c);
        Tap a = tap(o.y, h, sy), t = tap(o.x, w, sx);
        const float* xb = x + o.b * h * w * c + o.ch;
        float p00 = xb[((I)a.i0 * w + t.i0) * c], p01 = xb[((I)a.i0 * w + t.i1) * c];
        float p10 = xb[((I)a.i1 * w + t.i0) * c], p11 = xb[((I)a.i1 * w + t.i1) * c];
        out[e] = a.l0 * (t.l0 * p00 + t.l1 * p01) + a.l1 * (t.l0 * p10 + t.l1 * p11);
    }
}
extern "C" __global__ void resize_bilinear_f32(float* out, const float* x, int b, int h, int w, int c, int ho,
                                               int wo) {
    const long long n = (long long)b * ho * wo * c;
    const long long reach = (long long)b * h * w * c;  // x's length
    BY_INDEX_WIDTH(n > reach ? n : reach, resize_body, out, x, n, h, w, c, ho, wo);
}

// The weight output coordinate d gives input coordinate i along an axis (both taps may
// be i at the last pixel).
__device__ __forceinline__ float tap_weight(Tap t, int i) {
    return (t.i0 == i ? t.l0 : 0.0f) + (t.i1 == i ? t.l1 : 0.0f);
}

// The output coordinates whose taps can reach input coordinate i: src(d) lies in
// (i - 1, i + 1], so d lies in ((i - 1/2) out/in - 1/2, (i + 3/2) out/in - 1/2]; one
// more on each side for rounding (tap_weight is exact, so extra d add 0).
// inv = n_out / n_in in double.
__device__ __forceinline__ void tap_range(int i, int n_out, double inv, int* lo, int* hi) {
    int a = (int)floor(((double)i - 0.5) * inv - 0.5) - 1;
    int z = (int)ceil(((double)i + 1.5) * inv - 0.5) + 1;
    *lo = a < 0 ? 0 : a;
    *hi = z > n_out - 1 ? n_out - 1 : z;
}

// forward: out[oy,ox] = sum_{a,e in {0,1}} ly_a lx_e x[iy_a, ix_e]
// so:      dx[iy,ix] = sum_{oy,ox} wy(oy,iy) wx(ox,ix) dout[oy,ox]   (overwritten), over
//          the few (oy, ox) whose taps reach (iy, ix)
template <typename I>
__device__ __forceinline__ void resize_bwd_body(float* dx, const float* dout, long long n, int h, int w, int c,
                                                int ho, int wo) {
    const double sy = (double)h / (double)ho, sx = (double)w / (double)wo;
    const double iy_inv = (double)ho / (double)h, ix_inv = (double)wo / (double)w;
    GRID_STRIDE_T(I, e, n) {
        const Bhwc<I> px = split_bhwc<I>(e, h, w, c);
        const int ch = px.ch, ix = px.x, iy = px.y;
        const I bi = px.b;
        int ylo, yhi, xlo, xhi;
        tap_range(iy, ho, iy_inv, &ylo, &yhi);
        tap_range(ix, wo, ix_inv, &xlo, &xhi);
        const float* db = dout + bi * ho * wo * c + ch;
        float acc = 0.0f;
        for (int oy = ylo; oy <= yhi; ++oy) {
            float wy = tap_weight(tap(oy, h, sy), iy);
            if (wy == 0.0f) continue;
            float row = 0.0f;
            for (int ox = xlo; ox <= xhi; ++ox) {
                float wx = tap_weight(tap(ox, w, sx), ix);
                if (wx != 0.0f) row += wx * db[((I)oy * wo + ox) * c];
            }
            acc += wy * row;
        }
        dx[e] = acc;
    }
}
extern "C" __global__ void resize_bilinear_bwd_f32(float* dx, const float* dout, int b, int h, int w, int c, int ho,
                                                   int wo) {
    const long long n = (long long)b * h * w * c;
    const long long reach = (long long)b * ho * wo * c;  // dout's length
    BY_INDEX_WIDTH(n > reach ? n : reach, resize_bwd_body, dx, dout, n, h, w, c, ho, wo);
}

// ---- per-row scale ----

// out (N,C) = x (N,C) g (N), row-broadcast.  The backward's dx = dout g is the same op.
template <typename I>
__device__ __forceinline__ void mul_rows_body(float* out, const float* x, const float* g, long long n, int c) {
    GRID_STRIDE_T(I, e, n) out[e] = x[e] * g[e / c];
}
extern "C" __global__ void mul_rows_f32(float* out, const float* x, const float* g, long long n, int c) {
    BY_INDEX_WIDTH(n, mul_rows_body, out, x, g, n, c);
}

// forward: out[n,i] = x[n,i] g[n]
// so:      dg[n] = sum_i dout[n,i] x[n,i]   (overwritten).  One block per row.
extern "C" __global__ void mul_rows_bwd_dg_f32(float* dg, const float* x, const float* dout, int c) {
    SHARED(float, part, [32]);
    size_t off = (size_t)blockIdx.x * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += dout[off + j] * x[off + j];
    s = block_sum(s, part);
    if (threadIdx.x == 0) dg[blockIdx.x] = s;
}

// ---- mask losses (LISA/PixelLM: BCE-with-logits and Dice) ----

// The loss sums of pixels [lo, hi) of one mask, added into this thread's
// acc = (sum bce_j, sum sigma_j/s t_j, sum sigma_j/s, sum t_j/s), four pixels per load
// when the rows are 16-byte aligned (P a multiple of 4).
struct MaskLossAcc {
    float bce = 0.0f, inter = 0.0f, ssig = 0.0f, st = 0.0f;
    __device__ __forceinline__ void add(float x, float t, float s) {
        // max(x,0) - x t + log(1 + e^{-|x|}): no overflow for either sign; the one
        // exponential also gives sigma(x) = (x >= 0 ? 1 : e^{-|x|}) / (1 + e^{-|x|})
        const float e = expf(-fabsf(x));
        bce += fmaxf(x, 0.0f) - x * t + log1pf(e);
        float sg = (x >= 0.0f ? 1.0f : e) / (1.0f + e) / s;
        inter += sg * t;
        ssig += sg;
        st += t / s;
    }
};

// Mask losses in two or three launches so that every SM has work however few the masks
// (one block per mask left most of a GPU idle):
// mask_loss_part_f32, grid (chunks, M): part (M, chunks, 4) = the sums of MaskLossAcc
// over one chunk of `chunk` pixels (a multiple of 4) of one mask, by a block tree;
// mask_loss_finish_f32, grid M, one warp: adds each mask's chunks in order into
// sums (M, 4) and out (M, 2) = (BCE averaged over the P pixels, Dice loss
// 1 - (2 sum sigma/s t + eps)/(sum sigma/s + sum t/s + eps)), s = dice_scale,
// eps = dice_eps (PixelLM's smoothing); mask_loss_bwd_f32 reads sums.
extern "C" __global__ void mask_loss_part_f32(float* part, const float* logits, const float* target, int p, int chunk,
                                              float dice_scale) {
    SHARED(float, scratch, [4][32]);
    const size_t m = blockIdx.y;
    const int lo = blockIdx.x * chunk, hi = lo + chunk < p ? lo + chunk : p;
    const float *x = logits + m * p, *t = target + m * p;
    MaskLossAcc a;
    int head = lo;
    if ((p & 3) == 0 && ((reinterpret_cast<uintptr_t>(logits) | reinterpret_cast<uintptr_t>(target)) & 15) == 0) {
        head = lo + ((hi - lo) & ~3);
        for (int j = lo + 4 * threadIdx.x; j < head; j += 4 * blockDim.x) {
            float4 xv = load_float4(x + j), tv = load_float4(t + j);
            a.add(xv.x, tv.x, dice_scale);
            a.add(xv.y, tv.y, dice_scale);
            a.add(xv.z, tv.z, dice_scale);
            a.add(xv.w, tv.w, dice_scale);
        }
    }
    for (int j = head + threadIdx.x; j < hi; j += blockDim.x) a.add(x[j], t[j], dice_scale);
    // the four sums over the block at once: warp trees, then warp 0 over the warps
    float v[4] = {warp_sum(a.bce), warp_sum(a.inter), warp_sum(a.ssig), warp_sum(a.st)};
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (lane == 0)
        for (int k = 0; k < 4; ++k) scratch[k][warp] = v[k];
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x / WARP_SIZE;
        float* o = part + 4 * (m * gridDim.x + blockIdx.x);
        for (int k = 0; k < 4; ++k) {
            const float t = warp_sum(lane < nw ? scratch[k][lane] : 0.0f);
            if (lane == 0) o[k] = t;
        }
    }
}

extern "C" __global__ void mask_loss_finish_f32(float* out, float* sums, const float* part, int chunks, int p,
                                                float dice_eps) {
    const size_t m = blockIdx.x;
    const int lane = threadIdx.x;
    if (lane >= WARP_SIZE) return;  // one warp per mask (blockDim 32)
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c = lane; c < chunks; c += WARP_SIZE)
        for (int k = 0; k < 4; ++k) s[k] += part[4 * (m * chunks + c) + k];
    for (int k = 0; k < 4; ++k) s[k] = warp_sum(s[k]);
    if (lane == 0) {
        for (int k = 0; k < 4; ++k) sums[4 * m + k] = s[k];
        out[2 * m] = s[0] / (float)p;
        out[2 * m + 1] = 1.0f - (2.0f * s[1] + dice_eps) / (s[2] + s[3] + dice_eps);
    }
}

// forward: bce = (1/P) sum_j [max(x_j,0) - x_j t_j + log1p(e^{-|x_j|})]
// so:      d bce/d x_j = (sigma_j - t_j)/P
// forward: dice = 1 - num/den, num = 2 sum sigma_j t_j/s + eps, den = sum sigma_j/s + sum t_j/s + eps
// so:      d dice/d sigma_j = -(2 t_j/s)/den + num/(s den^2),  d sigma_j/d x_j = sigma_j (1 - sigma_j)
// dlogits (M,P) = w_bce d bce + w_dice d dice, overwritten; sums (M, 4) from
// mask_loss_finish_f32.  grid (ceil(P / (4 blockDim)), M), four pixels per thread (one
// float4 of each row when P is a multiple of 4 and the rows are 16-byte aligned).
struct MaskLossGrad {
    float common, two_over_sden, w_bce_p, w_dice;
    __device__ __forceinline__ float at(float x, float t) const {
        const float e = expf(-fabsf(x));
        const float sg = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
        return w_bce_p * (sg - t) + w_dice * (common - two_over_sden * t) * sg * (1.0f - sg);
    }
};
extern "C" __global__ void mask_loss_bwd_f32(float* dlogits, const float* logits, const float* target,
                                             const float* sums, int p, float w_bce, float w_dice, float dice_scale,
                                             float dice_eps) {
    const int j = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (j >= p) return;
    const size_t m = blockIdx.y, off = m * p + j;
    const float* s = sums + 4 * m;
    const float num = 2.0f * s[1] + dice_eps, den = s[2] + s[3] + dice_eps;
    MaskLossGrad g;
    g.common = num / (dice_scale * den * den);
    g.two_over_sden = 2.0f / (dice_scale * den);
    g.w_bce_p = w_bce / (float)p;
    g.w_dice = w_dice;
    if ((p & 3) == 0 &&
        ((reinterpret_cast<uintptr_t>(logits) | reinterpret_cast<uintptr_t>(target) |
          reinterpret_cast<uintptr_t>(dlogits)) & 15) == 0) {
        const float4 x = load_float4(logits + off), t = load_float4(target + off);
        store_float4(dlogits + off, make_float4(g.at(x.x, t.x), g.at(x.y, t.y), g.at(x.z, t.z), g.at(x.w, t.w)));
    } else {
        for (int k = 0; k < 4 && j + k < p; ++k) dlogits[off + k] = g.at(logits[off + k], target[off + k]);
    }
}
