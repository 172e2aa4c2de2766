// The CUDA emulator's self-test kernels: each exercises (or deliberately breaks) one
// thing the emulator must get right.  Compiled for the emulator only (build.rs), never
// to PTX, and not listed among the crate's kernels; launched by tests/emulator.rs.
#include "common.cuh"

// Per-block sum of x (one block per row of length n), through shared memory and warp
// shuffles.  Threads beyond n return early before the barriers: the emulator must not
// deadlock on them (they have left the block), and on the GPU this is the classic bug
// of a barrier after an early return, so the kernel only returns early in a way that is
// legal on both: the threads that return never reach a barrier in any path.
// out (rows), x (rows, n)
extern "C" __global__ void emu_selftest_rowsum_f32(float* out, const float* x, int n) {
    SHARED(float, warp_sums, [32]);
    const float* row = x + (size_t)blockIdx.x * n;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += row[i];
    acc = warp_sum(acc);
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    int nwarps = (blockDim.x + WARP_SIZE - 1) / WARP_SIZE;
    if (warp == 0) {
        float v = lane < nwarps ? warp_sums[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

// Dynamic shared memory + a barrier after an early return of some threads:
// out[b] = sum over t < active of (t + b), computed by thread 0 from shared memory.
extern "C" __global__ void emu_selftest_early_return(int* out, int active) {
    DYN_SHARED(int, buf);
    if ((int)threadIdx.x >= active) return;
    buf[threadIdx.x] = threadIdx.x + blockIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (int t = 0; t < active; ++t) s += buf[t];
        out[blockIdx.x] = s;
    }
}

// Global atomics across concurrently running blocks: counts[x[i] % buckets] += 1.
extern "C" __global__ void emu_selftest_histogram(unsigned* counts, const int* x, int n, int buckets) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(&counts[x[i] % buckets], 1u);
}

// Deliberate deadlock: lane 0 waits at a warp shuffle while the rest of its warp waits
// at __syncthreads.  The emulator must report it, not hang.
extern "C" __global__ void emu_selftest_deadlock(float* out) {
    if (threadIdx.x == 0) {
        out[0] = __shfl_xor_sync(FULL_MASK, 1.0f, 1);
    } else {
        __syncthreads();
    }
}

// Reads shared memory that no thread wrote: thread t writes buf[t] for t < written and
// every thread reads buf[t].  The emulator fills shared memory with NaN before each
// block, so out[b, t] is NaN for t >= written (on the GPU: whatever was there).
// out (gridDim.x, blockDim.x)
extern "C" __global__ void emu_selftest_uninit_shared(float* out, int written) {
    SHARED(float, buf, [256]);
    DYN_SHARED(float, dyn);
    int t = threadIdx.x;
    if (t < written) {
        buf[t] = (float)t;
        dyn[t] = (float)t;
    }
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = buf[t] + dyn[t];
}

// Deliberate error: the first warp waits at one __syncthreads, the others at another.
// The emulator must report two barriers, not release them together.
extern "C" __global__ void emu_selftest_two_barriers(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.0f;
    }
}

// Deliberate error when offset % 4 != 0: a float4 load from a float pointer that is not
// 16-byte aligned (the GPU faults with a misaligned address).  out (4), x (offset + 4)
extern "C" __global__ void emu_selftest_float4_load(float* out, const float* x, int offset) {
    if (threadIdx.x != 0) return;
    store_float4(out, load_float4(x + offset));
}
