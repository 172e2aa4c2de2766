// RMSNorm over the last axis, forward and backward, for the device backend
// (src/backend/device/); the CPU twin is the CPU backend's (src/backend/cpu/norm.rs).
// N rows, C channels.  A warp or a block per row (common.cuh: row_index, row_sum); a
// thread past the last row returns before any sum, with the rest of its warp (or block).
#include "common.cuh"

// The end of both forwards, given this thread's share ss of the row's sum of squares:
// rstd[row] = r = 1/sqrt(mean(x^2) + eps), o = xr * r * w.  Each thread reads back only
// the xr it summed (or wrote).
__device__ __forceinline__ void rms_scale(float* o, float* rstd, const float* xr, const float* w, float ss,
                                          float eps, long long row, int c, float* part) {
    ss = row_sum(ss, part);
    float r = 1.0f / sqrtf(ss / (float)c + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = xr[j] * r * (w ? w[j] : 1.0f);
}

// out (N,C) = x * rstd * w (w null: no scale), rstd (N) = 1/sqrt(mean(x^2) + eps)
extern "C" __global__ void rmsnorm_fwd_f32(float* out, float* rstd, const float* x, const float* w, float eps,
                                           long long n, int c) {
    SHARED(float, part, [32]);
    const long long row = row_index();
    if (row >= n) return;
    const float* xr = x + row * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) ss += xr[j] * xr[j];
    rms_scale(out + row * c, rstd, xr, w, ss, eps, row, c, part);
}

// sum (N,C) = x + a, then out and rstd as rmsnorm_fwd_f32 gives them for sum: a residual
// add and the norm after it in one pass.
extern "C" __global__ void add_rmsnorm_fwd_f32(float* sum, float* out, float* rstd, const float* x, const float* a,
                                               const float* w, float eps, long long n, int c) {
    SHARED(float, part, [32]);
    const long long row = row_index();
    if (row >= n) return;
    const long long off = row * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float s = x[off + j] + a[off + j];
        sum[off + j] = s;
        ss += s * s;
    }
    rms_scale(out + off, rstd, sum + off, w, ss, eps, row, c, part);
}

// forward: out[j] = x[j] r w[j],  r = (sum x^2 / C + eps)^-1/2
// so:      dx[j] = r dout[j] w[j] - r^3/C x[j] sum_k dout[k] w[k] x[k]   (overwritten)
//          dxw (N,C) = dout x r, the per-row terms of dw, summed over rows by col_sum_f32
//          (null: frozen weight)
extern "C" __global__ void rmsnorm_bwd_f32(float* dx, float* dxw, const float* dout, const float* x,
                                           const float* w, const float* rstd, long long n, int c) {
    SHARED(float, part, [32]);
    const long long row = row_index();
    if (row >= n) return;
    const long long off = row * c;
    float r = rstd[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dot += dout[off + j] * (w ? w[j] : 1.0f) * x[off + j];
    dot = row_sum(dot, part);
    float k = r * r * r / (float)c * dot;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        dx[off + j] = r * dout[off + j] * (w ? w[j] : 1.0f) - k * x[off + j];
        if (dxw) dxw[off + j] = dout[off + j] * x[off + j] * r;
    }
}

// The end of both LayerNorm forwards, given this thread's share s of the row's sum:
// mean[row] = mu, rstd[row] = r = 1/sqrt(var + eps), o = (xr - mu) r w + b.  Each thread
// reads back only the xr it summed (or wrote).
__device__ __forceinline__ void ln_finish(float* o, float* mean, float* rstd, const float* xr, const float* w,
                                          const float* b, float s, float eps, long long row, int c, float* part) {
    float mu = row_sum(s, part) / (float)c;
    float q = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) q += (xr[j] - mu) * (xr[j] - mu);
    float r = 1.0f / sqrtf(row_sum(q, part) / (float)c + eps);
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
    for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = (xr[j] - mu) * r * w[j] + b[j];
}

// out (N,C) = (x - mean) rstd w + b; mean, rstd (N), rstd = 1/sqrt(var + eps)
extern "C" __global__ void layernorm_fwd_f32(float* out, float* mean, float* rstd, const float* x, const float* w,
                                             const float* b, float eps, long long n, int c) {
    SHARED(float, part, [32]);
    const long long row = row_index();
    if (row >= n) return;
    const long long off = row * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += x[off + j];
    ln_finish(out + off, mean, rstd, x + off, w, b, s, eps, row, c, part);
}

// sum (N,C) = x + a, then out, mean and rstd as layernorm_fwd_f32 gives them for sum: a
// residual add and the norm after it in one pass.
extern "C" __global__ void add_layernorm_fwd_f32(float* sum, float* out, float* mean, float* rstd, const float* x,
                                                 const float* a, const float* w, const float* b, float eps,
                                                 long long n, int c) {
    SHARED(float, part, [32]);
    const long long row = row_index();
    if (row >= n) return;
    const long long off = row * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float v = x[off + j] + a[off + j];
        sum[off + j] = v;
        s += v;
    }
    ln_finish(out + off, mean, rstd, sum + off, w, b, s, eps, row, c, part);
}

// forward: xh = (x - mu) r, out = xh w + b
// so:      dx = r (g - mean(g) - xh mean(g xh)), g = dout w   (overwritten)
//          dxw (N,C) = dout xh, the per-row terms of dw (null: frozen); db is col_sum(dout)
extern "C" __global__ void layernorm_bwd_f32(float* dx, float* dxw, const float* dout, const float* x,
                                             const float* w, const float* mean, const float* rstd, long long n,
                                             int c) {
    SHARED(float, part, [32]);
    const long long row = row_index();
    if (row >= n) return;
    const long long off = row * c;
    float mu = mean[row], r = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float g = dout[off + j] * w[j];
        sg += g;
        sgx += g * (x[off + j] - mu) * r;
    }
    float mg = row_sum(sg, part) / (float)c;
    float mgx = row_sum(sgx, part) / (float)c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float xh = (x[off + j] - mu) * r;
        dx[off + j] = r * (dout[off + j] * w[j] - mg - xh * mgx);
        if (dxw) dxw[off + j] = dout[off + j] * xh;
    }
}
