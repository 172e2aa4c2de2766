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
