// Elementwise kernels.
// N elements.
#include "common.cuh"

// y[i] = a * x[i]
extern "C" __global__ void scale_f32(float* y, const float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = a * x[i];
}

// y[i] += x[i]
extern "C" __global__ void add_inplace_f32(float* y, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] += x[i];
}

// ---- the device backend's whole-buffer ops (src/backend/device/) ----
// N elements; every kernel is a grid-stride loop, so any grid covers any N.

// y[i] = v
extern "C" __global__ void fill_f32(float* y, float v, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = v;
}

// y[i] += a * x[i]
extern "C" __global__ void axpy_f32(float* y, const float* x, float a, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] += a * x[i];
}

// y[i] = x[i] (y and x do not overlap)
extern "C" __global__ void copy_f32(float* y, const float* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = x[i];
}

// out[0] = sum_i x[i]^2, one block (blockDim a multiple of 32, at most 1024): a fixed
// summation order, so the result is the same run to run.
extern "C" __global__ void sum_sq_f32(float* out, const float* x, long long n) {
    SHARED(float, part, [32]);
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += x[i] * x[i];
    acc = warp_sum(acc);
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x / WARP_SIZE;
        float v = lane < nw ? part[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) out[0] = v;
    }
}

// Activation codes, as src/backend/device/mod.rs passes them.
#define ACT_QUICK_GELU 0
#define ACT_GELU_ERF 1
#define ACT_GELU_TANH 2
#define ACT_SILU 3
#define ACT_RELU 4
#define ACT_SIGMOID 5
// sqrt(2/pi), 1/sqrt(2), 1/sqrt(2 pi), CLIP's quick-GELU slope
#define SQRT_2_OVER_PI 0.7978845608028654f
#define FRAC_1_SQRT_2 0.7071067811865476f
#define FRAC_1_SQRT_2PI 0.3989422804014327f
#define QUICK_GELU_K 1.702f

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// tanh that --use_fast_math leaves accurate: under that flag nvcc turns tanhf into
// tanh.approx.f32 (relative error up to 2^-11, seen as a 1e-5 gap to the CPU twin on an
// H200), but not expm1f.  tanh|u| = -m / (2 + m) with m = e^{-2|u|} - 1 in (-1, 0]:
// no cancellation near 0, no overflow for large |u|; the sign is put back last.
__device__ __forceinline__ float tanh_accurate(float u) {
    float m = expm1f(-2.0f * fabsf(u));
    return copysignf(-m / (2.0f + m), u);
}

__device__ __forceinline__ float act_value(int act, float x) {
    switch (act) {
        case ACT_QUICK_GELU: return x * sigmoidf_(QUICK_GELU_K * x);
        case ACT_GELU_ERF: return 0.5f * x * (1.0f + erff(x * FRAC_1_SQRT_2));
        case ACT_GELU_TANH: return 0.5f * x * (1.0f + tanh_accurate(SQRT_2_OVER_PI * (x + 0.044715f * x * x * x)));
        case ACT_SILU: return x * sigmoidf_(x);
        case ACT_SIGMOID: return sigmoidf_(x);
        default: return x > 0.0f ? x : 0.0f;
    }
}

// The derivatives, derived beside the CPU backend's (src/backend/cpu/act.rs).
__device__ __forceinline__ float act_deriv(int act, float x) {
    switch (act) {
        case ACT_QUICK_GELU: {
            float s = sigmoidf_(QUICK_GELU_K * x);
            return s + QUICK_GELU_K * x * s * (1.0f - s);
        }
        case ACT_GELU_ERF: {
            float cdf = 0.5f * (1.0f + erff(x * FRAC_1_SQRT_2));
            return cdf + x * FRAC_1_SQRT_2PI * expf(-0.5f * x * x);
        }
        case ACT_GELU_TANH: {
            float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
            float th = tanh_accurate(u);
            float du = SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
            return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
        }
        case ACT_SILU: {
            float s = sigmoidf_(x);
            return s * (1.0f + x * (1.0f - s));
        }
        case ACT_SIGMOID: {
            float s = sigmoidf_(x);
            return s * (1.0f - s);
        }
        default: return x > 0.0f ? 1.0f : 0.0f;
    }
}

// out = act(x)
extern "C" __global__ void act_fwd_f32(float* out, const float* x, int act, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = act_value(act, x[i]);
}

// forward: out = act(x)  so: dx = act'(x) dout
extern "C" __global__ void act_bwd_f32(float* dx, const float* x, const float* dout, int act, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dx[i] = act_deriv(act, x[i]) * dout[i];
}

// out = silu(gate) * up
extern "C" __global__ void swiglu_fwd_f32(float* out, const float* gate, const float* up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g * sigmoidf_(g) * up[i];
    }
}

// forward: out = silu(g) u  so: du = silu(g) dout, dg = silu'(g) u dout
extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* gate, const float* up,
                                          const float* dout, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i], s = sigmoidf_(g), d = dout[i];
        dup[i] = g * s * d;
        dgate[i] = s * (1.0f + g * (1.0f - s)) * up[i] * d;
    }
}

// One AdamW step; c1 = 1 - beta1^t, c2 = 1 - beta2^t (bias corrections, from the host).
// Decoupled decay: applied to the weight, not folded into the gradient.
extern "C" __global__ void adamw_f32(float* param, float* m, float* v, const float* grad, float lr, float beta1,
                                     float beta2, float eps, float wd, float c1, float c2, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = grad[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float p = param[i];
        param[i] = p - lr * ((mi / c1) / (sqrtf(vi / c2) + eps) + wd * p);
    }
}

// out (N,C) += bias (C), row-broadcast
extern "C" __global__ void add_bias_f32(float* out, const float* bias, long long n, int c) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n * c; i += (long long)gridDim.x * blockDim.x)
        out[i] += bias[i % c];
}

// acc (C) += sum over rows of x (N,C): one thread per column, rows in order, so the sum
// is the same run to run (a parameter gradient: bias, norm weights).
extern "C" __global__ void col_sum_f32(float* acc, const float* x, long long n, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float s = 0.0f;
    for (long long r = 0; r < n; ++r) s += x[r * c + j];
    acc[j] += s;
}
