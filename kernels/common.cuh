// Shared by every kernel file: the same source compiles with nvcc (to PTX) and with the
// host C++ compiler against the emulator (kernels/emu/cuda_emu.h) for CPU tests.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <stdint.h>
// Dynamic shared memory, declared the same way on both sides.
#define DYN_SHARED(T, name) extern __shared__ __align__(16) unsigned char name##_raw[]; T* name = reinterpret_cast<T*>(name##_raw)
#else
#include "emu/cuda_emu.h"
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dyn_shared())
#endif

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}
