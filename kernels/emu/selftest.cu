// The CUDA emulator's self-test kernels: each exercises (or deliberately breaks) one
// thing the emulator must get right.  Compiled for the emulator only (build.rs), never
// to PTX, and not listed among the crate's kernels; launched by tests/emulator.rs (the
// bank count of the tensor-core fragment reads, emu_selftest_mma_banks, by
// tests/kernel_attention.rs beside the kernels it checks).
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

// Deliberate error when the launch's dynamic shared memory holds fewer than i + 1 floats:
// thread 0 writes float i of it (the GPU faults on an out-of-range shared address).
// out (1).
extern "C" __global__ void emu_selftest_dyn_shared_write(float* out, int i) {
    DYN_SHARED(float, sm);
    if (threadIdx.x != 0) return;
    sm[i] = 1.0f;
    out[0] = sm[i];
}

// Deliberate error when i >= 8: thread 0 writes float i of a static shared array of 8,
// past its end (into the next array on the GPU, silently).  out (1).
extern "C" __global__ void emu_selftest_static_shared_write(float* out, int i) {
    SHARED(float, a, [8]);
    SHARED(float, b, [8]);
    if (threadIdx.x != 0) return;
    a[i] = 1.0f;
    b[0] = 2.0f;
    out[0] = a[i] + b[0];
}

// Bank conflicts of the tensor-core kernels' fragment reads (mma_load_a / _b / _bt,
// kernels/common.cuh): the most wavefronts any one warp-wide read takes, over every
// register and every tile position the kernels use (rows and columns at multiples of 8
// below 32 × qs).  A read takes as many wavefronts as the most distinct 32-bit words
// that fall in one of the 32 banks (lanes reading the same word share it).  kind: 0 = A,
// 1 = B, 2 = Bᵀ, 3 = Bᵀ in A order (mma_load_bt_a_order); the tile has row stride ld and
// is swizzled when sw != 0.  One warp; out (1).
__device__ int emu_wavefronts(int* offs, int off) {
    const int lane = threadIdx.x % WARP_SIZE;
    offs[lane] = off;
    __syncwarp();
    int words = 0;  // distinct words in this lane's bank
    for (int j = 0; j < WARP_SIZE; ++j) {
        if (offs[j] % 32 != off % 32) continue;
        bool first = true;
        for (int i = 0; i < j; ++i) first = first && offs[i] != offs[j];
        words += first;
    }
    __syncwarp();  // offs is written again by the next read
    return (int)warp_max((float)words);
}

// kind 0 (A): rows row0 .. +15, columns col0 .. +7; kind 1 (B): rows k0 .. +7, columns
// n0 .. +7; kind 2 (Bᵀ): rows n0 .. +7, columns k0 .. +7; kind 3 as kind 2 with the rows
// in A order; the row and column starts run over multiples of 8, rows below 32 and
// columns below qs.
template <bool SW>
__device__ int emu_mma_read_wavefronts(int* offs, int kind, int ld, int qs) {
    int most = 0;
    for (int r0 = 0; r0 < 32; r0 += 8)
        for (int c0 = 0; c0 < qs; c0 += 8) {
            int o[4] = {0, 0, 0, 0};
            if (kind == 0) mma_offs_a<SW>(o, ld, r0, c0);
            if (kind == 1) mma_offs_b<SW>(o, ld, r0, c0);
            if (kind == 2) mma_offs_bt<SW>(o, ld, c0, r0);
            if (kind == 3) mma_offs_bt_a_order<SW>(o, ld, c0, r0);
            const int regs = kind == 0 ? 4 : 2;
            for (int i = 0; i < regs; ++i) {
                const int w = emu_wavefronts(offs, o[i]);
                most = most > w ? most : w;
            }
        }
    return most;
}

extern "C" __global__ void emu_selftest_mma_banks(int* out, int kind, int ld, int sw, int qs) {
    SHARED(int, offs, [WARP_SIZE]);
    const int most = sw ? emu_mma_read_wavefronts<true>(offs, kind, ld, qs)
                        : emu_mma_read_wavefronts<false>(offs, kind, ld, qs);
    if (threadIdx.x == 0) out[0] = most;
}
