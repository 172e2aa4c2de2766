// The pixel decoder's image ops for the device backend (src/backend/device/image.rs):
// im2col, depth-to-space, bilinear resize, per-row scale and the mask losses, each
// backward under its forward.  CPU twins: src/backend/image.rs (the same formulas, the
// reference the kernels are tested against in tests/backend_device.rs).
// Feature maps are channels-last (B,H,W,C).  B batch, H x W input pixels, C channels,
// K kernel, Ho x Wo output pixels, r upsampling factor, N rows, M masks, P pixels.
// No two threads write one element (the backwards are gathers, or the inverse of a
// permutation): no atomics, and the same sums run to run.
#include "common.cuh"

// The layout ops below (im2col, depth-to-space, resize, per-row scale) run on 2-D blocks
// that the wrappers pick: threadIdx.y picks a pixel (or a row) among the block's
// blockDim.y, threadIdx.x walks that pixel's channels, four floats at a time (float4)
// when every run is a multiple of 4 floats and the pointers are 16-byte aligned.  The
// grid names the pixel run, the row and the image, so no thread divides per element;
// grid.y and grid.z are at most 65535 and the kernels loop over the rest.  Offsets are
// 64-bit once per pixel and ints within one (a pixel's K K C, a row's W C: the wrappers
// check that every int, plus a grid step, fits).

// The float4 path applies: every run a multiple of 4 floats and both pointers aligned.
__device__ __forceinline__ bool vec_ok(bool runs_of_4, const void* a, const void* b) {
    return runs_of_4 && ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

// Unit j of a run: 4 floats when V (one float4 access), 1 otherwise (in .x; the other
// lanes are 0 and dead on the GPU).
template <bool V>
__device__ __forceinline__ float4 ld(const float* p) {
    if (V) return load_float4(p);
    return make_float4(*p, 0.0f, 0.0f, 0.0f);
}
template <bool V>
__device__ __forceinline__ void st(float* p, float4 v) {
    if (V) store_float4(p, v);
    else *p = v.x;
}
// acc + a v per lane (one rounding, as fmaf)
__device__ __forceinline__ float4 fma4(float a, float4 v, float4 acc) {
    return make_float4(fmaf(a, v.x, acc.x), fmaf(a, v.y, acc.y), fmaf(a, v.z, acc.z), fmaf(a, v.w, acc.w));
}
__device__ __forceinline__ float4 add4(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float4 zero4() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }

// dst[0, n) = src[0, n) (or 0) by threads t, t + step, ... of a block row.
template <bool V>
__device__ __forceinline__ void copy_run(float* dst, const float* src, int n, int t, int step) {
    const int u = V ? 4 : 1;
    for (int j = u * t; j < n; j += u * step) st<V>(dst + j, ld<V>(src + j));
}
template <bool V>
__device__ __forceinline__ void zero_run(float* dst, int n, int t, int step) {
    const int u = V ? 4 : 1;
    for (int j = u * t; j < n; j += u * step) st<V>(dst + j, zero4());
}

// This thread's pixel along the grid's x: blockIdx.x blockDim.y + threadIdx.y.
__device__ __forceinline__ unsigned pixel_x() { return blockIdx.x * blockDim.y + threadIdx.y; }

// ---- im2col (stride-1 convolution as a matrix product) ----

// x (B,H,W,C) -> out (B,Ho,Wo,K K C), each row ordered (ky, kx, c), zero padding:
//   out[(b,oy,ox), (ky,kx,c)] = x[b, oy+ky-pad, ox+kx-pad, c], 0 outside
// grid (Wo / blockDim.y, Ho, B): thread row ty copies output pixel ox's K K runs of C
// floats (x pixel (iy, ix) or zeros).
template <bool V>
__device__ __forceinline__ void im2col_body(float* out, const float* x, int b, int h, int w, int c, int k, int pad,
                                            int ho, int wo, int ox) {
    const int kkc = k * k * c;
    for (int bi = blockIdx.z; bi < b; bi += gridDim.z)
        for (int oy = blockIdx.y; oy < ho; oy += gridDim.y) {
            float* o = out + (((long long)bi * ho + oy) * wo + ox) * kkc;
            for (int ky = 0; ky < k; ++ky) {
                const int iy = oy - pad + ky;
                for (int kx = 0; kx < k; ++kx, o += c) {
                    const int ix = ox - pad + kx;
                    if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                        copy_run<V>(o, x + (((long long)bi * h + iy) * w + ix) * c, c, threadIdx.x, blockDim.x);
                    else
                        zero_run<V>(o, c, threadIdx.x, blockDim.x);
                }
            }
        }
}
extern "C" __global__ void im2col_f32(float* out, const float* x, int b, int h, int w, int c, int k, int pad, int ho,
                                      int wo) {
    const unsigned ox = pixel_x();
    if (ox >= (unsigned)wo) return;
    if (vec_ok(c % 4 == 0, out, x)) im2col_body<true>(out, x, b, h, w, c, k, pad, ho, wo, (int)ox);
    else im2col_body<false>(out, x, b, h, w, c, k, pad, ho, wo, (int)ox);
}

// forward: out[(b,oy,ox), (ky,kx,c)] = x[b, oy+ky-pad, ox+kx-pad, c]
// so:      dx[b,iy,ix,c] = sum_{ky,kx} dout[(b, iy+pad-ky, ix+pad-kx), (ky,kx,c)] over the
//          (oy, ox) inside the output   (overwritten)
// grid (W / blockDim.y, H, B): thread row ty sums input pixel ix's K K taps, in (ky, kx)
// order as the CPU twin, a float4 of channels at a time.
template <bool V>
__device__ __forceinline__ void im2col_bwd_body(float* dx, const float* dout, int b, int h, int w, int c, int k,
                                                int pad, int ho, int wo, int ix) {
    const int kkc = k * k * c, u = V ? 4 : 1;
    for (int bi = blockIdx.z; bi < b; bi += gridDim.z)
        for (int iy = blockIdx.y; iy < h; iy += gridDim.y) {
            float* d = dx + (((long long)bi * h + iy) * w + ix) * c;
            for (int j = u * threadIdx.x; j < c; j += u * blockDim.x) {
                float4 acc = zero4();
                for (int ky = 0; ky < k; ++ky) {
                    const int oy = iy + pad - ky;
                    if (oy < 0 || oy >= ho) continue;
                    const float* row = dout + ((long long)bi * ho + oy) * wo * kkc + ky * k * c + j;
                    for (int kx = 0; kx < k; ++kx) {
                        const int ox = ix + pad - kx;
                        if (ox < 0 || ox >= wo) continue;
                        acc = add4(acc, ld<V>(row + (long long)ox * kkc + kx * c));
                    }
                }
                st<V>(d + j, acc);
            }
        }
}
extern "C" __global__ void im2col_bwd_f32(float* dx, const float* dout, int b, int h, int w, int c, int k, int pad,
                                          int ho, int wo) {
    const unsigned ix = pixel_x();
    if (ix >= (unsigned)w) return;
    if (vec_ok(c % 4 == 0, dx, dout)) im2col_bwd_body<true>(dx, dout, b, h, w, c, k, pad, ho, wo, (int)ix);
    else im2col_bwd_body<false>(dx, dout, b, h, w, c, k, pad, ho, wo, (int)ix);
}

// ---- depth-to-space (the transposed conv k = r, stride r after a Linear) ----

// x (B,H,W,r r C) -> out (B,rH,rW,C): out pixel (y r + dy, x r + dx) takes channels
// (dy, dx, .) of pixel (y, x), so out row y r + dy is W runs of r C floats, run x being
// channels (dy, ., .) of x pixel (y, x).  grid (W / blockDim.y, r H, B): thread row ty
// copies run x of one out row (BWD: the inverse copy, dx from dout).
template <bool V, bool BWD>
__device__ __forceinline__ void d2s_body(float* dst, const float* src, int b, int h, int w, int c, int r, int xx) {
    const int run = r * c, rows = r * h;
    for (int bi = blockIdx.z; bi < b; bi += gridDim.z)
        for (int row = blockIdx.y; row < rows; row += gridDim.y) {
            const int y = row / r, dy = row - y * r;  // once per run
            const long long xo = ((((long long)bi * h + y) * w + xx) * r + dy) * run;
            const long long oo = (((long long)bi * rows + row) * w + xx) * run;
            if (BWD) copy_run<V>(dst + xo, src + oo, run, threadIdx.x, blockDim.x);
            else copy_run<V>(dst + oo, src + xo, run, threadIdx.x, blockDim.x);
        }
}

// x (B,H,W,r r C) -> out (B,rH,rW,C) (both of B H W r r C elements)
extern "C" __global__ void depth_to_space_f32(float* out, const float* x, int b, int h, int w, int c, int r) {
    const unsigned xx = pixel_x();
    if (xx >= (unsigned)w) return;
    if (vec_ok(r * c % 4 == 0, out, x)) d2s_body<true, false>(out, x, b, h, w, c, r, (int)xx);
    else d2s_body<false, false>(out, x, b, h, w, c, r, (int)xx);
}

// The forward is a permutation, so the backward is its inverse: dx (B,H,W,r r C)
// overwritten from dout (B,rH,rW,C).
extern "C" __global__ void depth_to_space_bwd_f32(float* dx, const float* dout, int b, int h, int w, int c, int r) {
    const unsigned xx = pixel_x();
    if (xx >= (unsigned)w) return;
    if (vec_ok(r * c % 4 == 0, dx, dout)) d2s_body<true, true>(dx, dout, b, h, w, c, r, (int)xx);
    else d2s_body<false, true>(dx, dout, b, h, w, c, r, (int)xx);
}

// ---- bilinear resize, PyTorch's align_corners=False ----

// One output coordinate's taps along an axis, as the CPU twin computes them (in double):
// src = max((d + 1/2) in/out - 1/2, 0), i0 = floor(src) (at most in - 1),
// i1 = min(i0 + 1, in - 1), l1 = src - i0, l0 = 1 - l1.
struct alignas(16) Tap {
    int i0, i1;
    float l0, l1;
};
// scale = n_in / n_out in double, computed once per thread by the callers.  The product
// and difference are rounded apart (no fused multiply-add), as on the CPU.
__device__ __forceinline__ Tap tap(int d, int n_in, double scale) {
#ifdef __CUDACC__
    double src = __dsub_rn(__dmul_rn((double)d + 0.5, scale), 0.5);
#else
    double src = ((double)d + 0.5) * scale - 0.5;
#endif
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

// t.l0·p + t.l1·q, lane by lane.
__device__ __forceinline__ float4 lerp4(const Tap& t, float4 p, float4 q) {
    return make_float4(t.l0 * p.x + t.l1 * q.x, t.l0 * p.y + t.l1 * q.y, t.l0 * p.z + t.l1 * q.z,
                       t.l0 * p.w + t.l1 * q.w);
}

// Output rows per block band of resize_bilinear_f32 (their y taps in shared memory).
#define RESIZE_ROWS 16

// x (B,H,W,C) -> out (B,Ho,Wo,C):
//   out = ly0 (lx0 x[i0,j0] + lx1 x[i0,j1]) + ly1 (lx0 x[i1,j0] + lx1 x[i1,j1])
// grid (Wo / blockDim.y, Ho / RESIZE_ROWS, B): thread row ty owns output column ox (its
// x tap computed once) down a band of RESIZE_ROWS rows, whose y taps the block computes
// once into shared memory; the four source pixels are reloaded, and interpolated along x,
// only when the y taps change (an upsampling's rows share them).
template <bool V>
__device__ __forceinline__ void resize_body(float* out, const float* x, int b, int h, int w, int c, int ho, int wo,
                                            Tap* ty) {
    const double sy = (double)h / (double)ho, sx = (double)w / (double)wo;
    const int ox = (int)pixel_x(), u = V ? 4 : 1;
    const bool live = ox < wo;  // the others only help with the y taps
    const Tap t = tap(live ? ox : 0, w, sx);
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
    const int bands = (ho + RESIZE_ROWS - 1) / RESIZE_ROWS;
    const long long wc = (long long)w * c, owc = (long long)wo * c;
    for (int bi = blockIdx.z; bi < b; bi += gridDim.z)
        for (int band = blockIdx.y; band < bands; band += gridDim.y) {
            const int oy0 = band * RESIZE_ROWS, rows = ho - oy0 < RESIZE_ROWS ? ho - oy0 : RESIZE_ROWS;
            __syncthreads();  // the previous band's taps are read
            for (int i = tid; i < rows; i += nt) ty[i] = tap(oy0 + i, h, sy);
            __syncthreads();
            if (!live) continue;
            const float* xb = x + (long long)bi * h * wc;
            float* o = out + ((long long)bi * ho + oy0) * owc + (long long)ox * c;
            for (int j = u * threadIdx.x; j < c; j += u * blockDim.x) {
                // the two source rows interpolated along x, redone only when the y taps
                // name other rows; then one multiply and one fma per output value
                int r0 = -1, r1 = -1;
                float4 h0 = zero4(), h1 = h0;
                float* op = o + j;
                for (int i = 0; i < rows; ++i, op += owc) {
                    const Tap a = ty[i];
                    if (a.i0 != r0 || a.i1 != r1) {
                        r0 = a.i0;
                        r1 = a.i1;
                        const float *x0 = xb + r0 * wc + j, *x1 = xb + r1 * wc + j;
                        h0 = lerp4(t, ld<V>(x0 + t.i0 * c), ld<V>(x0 + t.i1 * c));
                        h1 = lerp4(t, ld<V>(x1 + t.i0 * c), ld<V>(x1 + t.i1 * c));
                    }
                    st<V>(op, lerp4(a, h0, h1));
                }
            }
        }
}
extern "C" __global__ void resize_bilinear_f32(float* out, const float* x, int b, int h, int w, int c, int ho,
                                               int wo) {
    SHARED(Tap, ty, [RESIZE_ROWS]);
    if (vec_ok(c % 4 == 0, out, x)) resize_body<true>(out, x, b, h, w, c, ho, wo, ty);
    else resize_body<false>(out, x, b, h, w, c, ho, wo, ty);
}

// The output coordinates whose taps can name input coordinate i: those with i0(d) in
// {i - 1, i} (i1 = i0 + 1 or, at the last pixel, i0).  i0 never decreases with d, so
// they are one run [lo, hi] (hi < lo when there is none).
struct alignas(8) Reach {
    int lo, hi;
};
// The first d in [0, n_out) with i0(d) >= i, or n_out, by bisection.
__device__ __forceinline__ int first_tap_from(int i, int n_in, int n_out, double scale) {
    int lo = 0, hi = n_out;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (tap(mid, n_in, scale).i0 >= i) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

// The backward's tap tables, one thread per entry: tab = y taps (Ho Tap) | x taps
// (Wo Tap) | y reach (H Reach) | x reach (W Reach).
extern "C" __global__ void resize_taps_f32(float* tab, int h, int ho, int w, int wo) {
    Tap* ty = reinterpret_cast<Tap*>(tab);
    Tap* tx = ty + ho;
    Reach* ry = reinterpret_cast<Reach*>(tx + wo);
    Reach* rx = ry + h;
    const double sy = (double)h / (double)ho, sx = (double)w / (double)wo;
    const long long n = (long long)ho + wo + h + w;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        long long i = e;
        if (i < ho) {
            ty[i] = tap((int)i, h, sy);
        } else if ((i -= ho) < wo) {
            tx[i] = tap((int)i, w, sx);
        } else if ((i -= wo) < h) {
            ry[i].lo = first_tap_from((int)i - 1, h, ho, sy);
            ry[i].hi = first_tap_from((int)i + 1, h, ho, sy) - 1;
        } else {
            i -= h;
            rx[i].lo = first_tap_from((int)i - 1, w, wo, sx);
            rx[i].hi = first_tap_from((int)i + 1, w, wo, sx) - 1;
        }
    }
}

// forward: out[oy,ox] = sum_{a,e in {0,1}} ly_a lx_e x[iy_a, ix_e]
// so:      dx[iy,ix] = sum_ox wx(ox,ix) (sum_oy wy(oy,iy) dout[oy,ox])   (overwritten),
//          w(d,i) = l0(d) [i0(d) = i] + l1(d) [i1(d) = i]
// in two passes: along y into t (B,H,Wo,C), oy ascending, then along x, ox ascending
// (each the l0 term before the l1 term); only the output coordinates in the reach of
// an input coordinate (tap tables from resize_taps_f32) add anything.  The y pass goes
// first: its lanes run along ox, so its reads of dout are contiguous and its taps the
// same for the whole block row; the x pass, whose lanes read at the scale's stride,
// runs on the smaller t.  (The CPU twin sums x first: the two orders differ by
// rounding.)  Both passes: grid (columns / blockDim.y, H, B), thread row ty owns one
// column of one row iy, threadIdx.x its channels.

// acc + w(k, i) v, given output coordinate k's taps t: the l0 term before the l1 term.
__device__ __forceinline__ float4 tap_add(float4 acc, const Tap& t, float4 v, int i) {
    if (t.i0 == i) acc = fma4(t.l0, v, acc);
    if (t.i1 == i) acc = fma4(t.l1, v, acc);
    return acc;
}
// Output coordinate k's taps as one 16-byte load (field by field, the compiler loads the
// weights only when an index matches: a second memory latency after the first).
__device__ __forceinline__ Tap ld_tap(const Tap* taps, int k) {
    const float4 f = load_float4(reinterpret_cast<const float*>(taps + k));
    Tap t;
    t.i0 = __float_as_int(f.x);
    t.i1 = __float_as_int(f.y);
    t.l0 = f.z;
    t.l1 = f.w;
    return t;
}
// Output coordinates per batch of tap_sum's loads.
#define TAP_BATCH 4
// d[0, C) = sum over k in reach, ascending, of w(k, i) src0[k kstride + (0, C)].  The
// reach is a run of about 2·scale coordinates (16 at 8× upsampling); its taps and values
// are loaded TAP_BATCH at a time, every load of a batch issued before any is used, so a
// thread waits out one memory latency per batch rather than one per coordinate (the
// sums keep their ascending order: the same result either way).
template <bool V>
__device__ __forceinline__ void tap_sum(float* d, const float* src0, long long kstride, const Tap* taps, Reach reach,
                                        int i, int c) {
    const int u = V ? 4 : 1;
    for (int j = u * threadIdx.x; j < c; j += u * blockDim.x) {
        float4 acc = zero4();
        int k = reach.lo;
        for (; k + TAP_BATCH - 1 <= reach.hi; k += TAP_BATCH) {
            Tap t[TAP_BATCH];
            float4 v[TAP_BATCH];
            for (int e = 0; e < TAP_BATCH; ++e) {
                t[e] = ld_tap(taps, k + e);
                v[e] = ld<V>(src0 + (k + e) * kstride + j);
            }
            for (int e = 0; e < TAP_BATCH; ++e) acc = tap_add(acc, t[e], v[e], i);
        }
        for (; k <= reach.hi; ++k) acc = tap_add(acc, ld_tap(taps, k), ld<V>(src0 + k * kstride + j), i);
        st<V>(d + j, acc);
    }
}
// t (B,H,Wo,C) from dout (B,Ho,Wo,C): grid (Wo / blockDim.y, H, B)
extern "C" __global__ void resize_bilinear_bwd_y_f32(float* t, const float* dout, const float* tab, int b, int h,
                                                     int w, int c, int ho, int wo) {
    const unsigned ox = pixel_x();
    if (ox >= (unsigned)wo) return;
    const Tap* ty = reinterpret_cast<const Tap*>(tab);
    const Reach* ry = reinterpret_cast<const Reach*>(ty + ho + wo);
    const bool vec = vec_ok(c % 4 == 0, t, dout);
    for (int bi = blockIdx.z; bi < b; bi += gridDim.z)
        for (int iy = blockIdx.y; iy < h; iy += gridDim.y) {
            float* d = t + (((long long)bi * h + iy) * wo + ox) * c;
            const float* src = dout + ((long long)bi * ho * wo + ox) * c;
            if (vec) tap_sum<true>(d, src, (long long)wo * c, ty, ry[iy], iy, c);
            else tap_sum<false>(d, src, (long long)wo * c, ty, ry[iy], iy, c);
        }
}
// dx (B,H,W,C) from t (B,H,Wo,C): grid (W / blockDim.y, H, B)
extern "C" __global__ void resize_bilinear_bwd_x_f32(float* dx, const float* t, const float* tab, int b, int h,
                                                     int w, int c, int ho, int wo) {
    const unsigned ix = pixel_x();
    if (ix >= (unsigned)w) return;
    const Tap* tx = reinterpret_cast<const Tap*>(tab) + ho;
    const Reach reach = reinterpret_cast<const Reach*>(tx + wo)[h + ix];
    const bool vec = vec_ok(c % 4 == 0, dx, t);
    for (int bi = blockIdx.z; bi < b; bi += gridDim.z)
        for (int iy = blockIdx.y; iy < h; iy += gridDim.y) {
            const long long row = (long long)bi * h + iy;
            float* d = dx + (row * w + ix) * c;
            const float* src = t + row * wo * c;
            if (vec) tap_sum<true>(d, src, c, tx, reach, (int)ix, c);
            else tap_sum<false>(d, src, c, tx, reach, (int)ix, c);
        }
}

// ---- per-row scale ----

// out (N,C) = x (N,C) g (N), row-broadcast.  The backward's dx = dout g is the same op.
// grid N / blockDim.y: thread row ty scales row n (g[n] read once).
template <bool V>
__device__ __forceinline__ void mul_rows_body(float* out, const float* x, float s, int c) {
    const int u = V ? 4 : 1;
    for (int j = u * threadIdx.x; j < c; j += u * blockDim.x) {
        const float4 v = ld<V>(x + j);
        st<V>(out + j, make_float4(v.x * s, v.y * s, v.z * s, v.w * s));
    }
}
extern "C" __global__ void mul_rows_f32(float* out, const float* x, const float* g, long long n, int c) {
    const long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= n) return;
    const long long off = row * c;
    if (vec_ok(c % 4 == 0, out, x)) mul_rows_body<true>(out + off, x + off, g[row], c);
    else mul_rows_body<false>(out + off, x + off, g[row], c);
}

// forward: out[n,i] = x[n,i] g[n]
// so:      dg[n] = sum_i dout[n,i] x[n,i]   (overwritten).  A warp or a block per row
// (common.cuh: row_index, row_sum).
extern "C" __global__ void mul_rows_bwd_dg_f32(float* dg, const float* x, const float* dout, long long n, int c) {
    SHARED(float, part, [32]);
    const long long row = row_index();
    if (row >= n) return;
    const long long off = row * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += dout[off + j] * x[off + j];
    s = row_sum(s, part);
    if (threadIdx.x == 0) dg[row] = s;
}

// ---- mask losses (LISA/PixelLM: BCE-with-logits and Dice) ----

// log(1 + e) for e in [0, 1] (the BCE's log1p(e^{-|x|})) without the range reduction
// and special cases of log1pf, which this argument does not need (the loss kernel spent
// about 28 of its 48 instructions per pixel there, as many as its memory time):
// log(1 + e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3], by the series
// 2 s (1 + z/3 + z^2/5 + ... + z^7/15), z = s^2 <= 1/9.  The first term left out,
// 2 s z^8 / 17, is below 1.5e-9 of the sum.  The error is relative, so a confident
// logit's tiny e keeps its digits (log(1 + e) would round 1 + e to f32 first).
__device__ __forceinline__ float log1p_unit(float e) {
    const float s = e / (2.0f + e), z = s * s;
    float p = 1.0f / 15.0f;
    p = fmaf(p, z, 1.0f / 13.0f);
    p = fmaf(p, z, 1.0f / 11.0f);
    p = fmaf(p, z, 1.0f / 9.0f);
    p = fmaf(p, z, 1.0f / 7.0f);
    p = fmaf(p, z, 1.0f / 5.0f);
    p = fmaf(p, z, 1.0f / 3.0f);
    p = fmaf(p, z, 1.0f);
    return 2.0f * s * p;
}

// The loss sums of pixels [lo, hi) of one mask, added into this thread's
// acc = (sum bce_j, sum sigma_j/s t_j, sum sigma_j/s, sum t_j/s), four pixels per load
// when the rows are 16-byte aligned (P a multiple of 4).
struct MaskLossAcc {
    float bce = 0.0f, inter = 0.0f, ssig = 0.0f, st = 0.0f;
    __device__ __forceinline__ void add(float x, float t, float s) {
        // max(x,0) - x t + log(1 + e^{-|x|}): no overflow for either sign; the one
        // exponential also gives sigma(x) = (x >= 0 ? 1 : e^{-|x|}) / (1 + e^{-|x|})
        const float e = expf(-fabsf(x));
        bce += fmaxf(x, 0.0f) - x * t + log1p_unit(e);
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
