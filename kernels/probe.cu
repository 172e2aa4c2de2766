// Throughput probes for benches/gpu.rs: how fast an SM runs tensor-core products
// (mma.sync m16n8k8 TF32, one HMMA each) and FFMAs when nothing else binds them: eight
// independent chains per thread in registers, no memory traffic but one store per
// thread.  Against the SASS counts of tools/sass_mix.sh they say whether the attention
// kernels' loops are bound by instruction issue or by the tensor (or FMA) pipe.  CPU
// twins: src/kernels/probe.rs.
#include "common.cuh"

#define PROBE_CHAINS 8

// out (threads): each thread's sum over its chains of c (16×8, its fragment) after
// `iters` steps c += A B, from c = chain index; A[r][k] = (r + k) mod 3 and
// B[k][n] = (k + 2n) mod 5 are small integers, exact in TF32, and every sum stays exact
// in f32 while iters·56·8·4 < 2²⁴.
extern "C" __global__ void probe_mma_tf32(float* out, int iters) {
    const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
    const unsigned a[4] = {__float_as_uint((float)((g + t) % 3)), __float_as_uint((float)((g + 8 + t) % 3)),
                           __float_as_uint((float)((g + t + 4) % 3)), __float_as_uint((float)((g + 8 + t + 4) % 3))};
    const unsigned b[2] = {__float_as_uint((float)((t + 2 * g) % 5)), __float_as_uint((float)((t + 4 + 2 * g) % 5))};
    float c[PROBE_CHAINS][4];
    for (int j = 0; j < PROBE_CHAINS; ++j)
        for (int e = 0; e < 4; ++e) c[j][e] = (float)j;
    for (int i = 0; i < iters; ++i)
#ifdef __CUDACC__
#pragma unroll
#endif
        for (int j = 0; j < PROBE_CHAINS; ++j) mma_tf32_16x8x8(c[j], a, b);
    float s = 0.0f;
    for (int j = 0; j < PROBE_CHAINS; ++j)
        for (int e = 0; e < 4; ++e) s += c[j][e];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// out (threads): each thread's sum over its chains of x after `iters` steps
// x = fma(x, m, a), from x = chain index (m and a are arguments, so the compiler keeps
// the FFMA: with m = 1 and a = 1 every chain ends at its index + iters).
extern "C" __global__ void probe_ffma(float* out, int iters, float m, float a) {
    float x[PROBE_CHAINS];
    for (int j = 0; j < PROBE_CHAINS; ++j) x[j] = (float)j;
    for (int i = 0; i < iters; ++i)
#ifdef __CUDACC__
#pragma unroll
#endif
        for (int j = 0; j < PROBE_CHAINS; ++j) x[j] = fmaf(x[j], m, a);
    float s = 0.0f;
    for (int j = 0; j < PROBE_CHAINS; ++j) s += x[j];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
