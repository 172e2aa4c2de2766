// Mask metrics: intersection/union counts for all P x G pairs, boundary extraction by
// erosion (Cheng et al. 2021), soft IoU forward/backward.  CPU twins and conventions
// in src/kernels/mask.rs.
// P predictions, G references, N masks, B soft masks, H x W pixels, HW = H*W.
// Masks are u8, row-major, nonzero = foreground.
#include "common.cuh"

// Must equal SOFT_IOU_EPS in mask.rs.
#define SOFT_IOU_EPS 1e-6f

__device__ __forceinline__ int imin_(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ unsigned warp_sum_u32(unsigned v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum of one value over the block; the result is valid in thread 0.  blockDim.x is a
// multiple of 32 (checked by the wrappers).
__device__ __forceinline__ unsigned block_sum_u32(unsigned v, unsigned* scratch) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    v = warp_sum_u32(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    unsigned t = 0;
    if (warp == 0) {
        int nw = blockDim.x / WARP_SIZE;
        t = lane < nw ? scratch[lane] : 0u;
        t = warp_sum_u32(t);
    }
    return t;
}

// High bit of each byte of x set iff that byte is nonzero.
__device__ __forceinline__ unsigned nonzero_bytes(unsigned x) {
    return (((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) & 0x80808080u;
}

// inter (P, G), uni (P, G), pred (P, HW), gt (G, HW).  grid = (G, P), one block per
// pair.  Counts read four pixels per load when HW is a multiple of 4 (then every mask
// starts on a 4-byte boundary).
extern "C" __global__ void mask_pair_counts_u8(unsigned long long* __restrict__ inter,
                                               unsigned long long* __restrict__ uni,
                                               const unsigned char* __restrict__ pred,
                                               const unsigned char* __restrict__ gt, int hw) {
    SHARED(unsigned, scratch, [32]);
    int j = blockIdx.x, i = blockIdx.y, g = gridDim.x;
    const unsigned char* a = pred + (size_t)i * hw;
    const unsigned char* b = gt + (size_t)j * hw;
    unsigned ni = 0, nu = 0;
    if ((hw & 3) == 0) {
        const unsigned* a4 = reinterpret_cast<const unsigned*>(a);
        const unsigned* b4 = reinterpret_cast<const unsigned*>(b);
        for (int k = threadIdx.x; k < hw / 4; k += blockDim.x) {
            unsigned za = nonzero_bytes(a4[k]), zb = nonzero_bytes(b4[k]);
            ni += __popc(za & zb);
            nu += __popc(za | zb);
        }
    } else {
        for (int k = threadIdx.x; k < hw; k += blockDim.x) {
            bool x = a[k] != 0, y = b[k] != 0;
            ni += x && y;
            nu += x || y;
        }
    }
    unsigned ti = block_sum_u32(ni, scratch);
    __syncthreads();  // scratch is reused
    unsigned tu = block_sum_u32(nu, scratch);
    if (threadIdx.x == 0) {
        inter[(size_t)i * g + j] = ti;
        uni[(size_t)i * g + j] = tu;
    }
}

// Horizontal half of the erosion by a (2d+1) x (2d+1) square, outside = background:
// er[n,y,x] = 1 iff columns x-d .. x+d are inside the image and all foreground.
// er (N, H, W), m (N, H, W); one thread per pixel.
extern "C" __global__ void mask_erode_rows_u8(unsigned char* __restrict__ er,
                                              const unsigned char* __restrict__ m, long long total,
                                              int w, int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int x = (int)(i % w);
    unsigned char v = 0;
    if (x - d >= 0 && x + d < w) {
        v = 1;
        const unsigned char* row = m + (i - x);
        for (int k = x - d; k <= x + d; ++k)
            if (row[k] == 0) {
                v = 0;
                break;
            }
    }
    er[i] = v;
}

// Vertical half and the boundary: out = m and not (rows y-d .. y+d of er inside the
// image and all set).  out (N, H, W), m (N, H, W), er (N, H, W) from
// mask_erode_rows_u8.
extern "C" __global__ void mask_boundary_cols_u8(unsigned char* __restrict__ out,
                                                 const unsigned char* __restrict__ m,
                                                 const unsigned char* __restrict__ er,
                                                 long long total, int h, int w, int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int y = (int)((i / w) % h);
    bool eroded = false;
    if (y - d >= 0 && y + d < h) {
        eroded = true;
        const unsigned char* col = er + (i - (long long)y * w);
        for (int k = y - d; k <= y + d; ++k)
            if (col[(long long)k * w] == 0) {
                eroded = false;
                break;
            }
    }
    out[i] = (m[i] != 0 && !eroded) ? 1 : 0;
}

// Soft IoU forward in two launches, so that every SM has work however few the masks:
// soft_iou_part_f32 with grid = (chunks, B) sums one chunk of one mask each into
// part (B, chunks, 3) = [I, sum p, sum t]; soft_iou_finish_f32 (grid = B, one warp)
// adds each mask's chunks in order and writes sums (B, 3) and iou (B), where
// iou = (I + eps) / (U + eps), U = sum p + sum t - I.  prob (B, N), target (B, N).
// A chunk is `chunk` pixels (a multiple of 4); pixels go four per load when N is a
// multiple of 4 and both rows are aligned.
extern "C" __global__ void soft_iou_part_f32(float* __restrict__ part, const float* __restrict__ prob,
                                             const unsigned char* __restrict__ target, int n, int chunk) {
    SHARED(float, scratch, [3][32]);
    const size_t b = blockIdx.y;
    const int lo = blockIdx.x * chunk, hi = imin_(lo + chunk, n);
    const float* p = prob + b * n;
    const unsigned char* t = target + b * n;
    float si = 0.f, sp = 0.f, st = 0.f;
    int head = lo;
    if ((n & 3) == 0 && ((reinterpret_cast<uintptr_t>(prob) & 15) | (reinterpret_cast<uintptr_t>(target) & 3)) == 0) {
        head = lo + ((hi - lo) & ~3);
        for (int k = lo + 4 * threadIdx.x; k < head; k += 4 * blockDim.x) {
            float4 v = load_float4(p + k);
            unsigned tt = *reinterpret_cast<const unsigned*>(t + k);
            sp += (v.x + v.y) + (v.z + v.w);
            float vt[4] = {v.x, v.y, v.z, v.w};
            for (int c = 0; c < 4; ++c)
                if ((tt >> (8 * c)) & 0xffu) {
                    si += vt[c];
                    st += 1.f;
                }
        }
    }
    for (int k = head + threadIdx.x; k < hi; k += blockDim.x) {
        float v = p[k];
        sp += v;
        if (t[k] != 0) {
            si += v;
            st += 1.f;
        }
    }
    si = warp_sum(si);
    sp = warp_sum(sp);
    st = warp_sum(st);
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) {
        scratch[0][warp] = si;
        scratch[1][warp] = sp;
        scratch[2][warp] = st;
    }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x / WARP_SIZE;
        si = warp_sum(lane < nw ? scratch[0][lane] : 0.f);
        sp = warp_sum(lane < nw ? scratch[1][lane] : 0.f);
        st = warp_sum(lane < nw ? scratch[2][lane] : 0.f);
        if (lane == 0) {
            float* o = part + 3 * (b * gridDim.x + blockIdx.x);
            o[0] = si;
            o[1] = sp;
            o[2] = st;
        }
    }
}

extern "C" __global__ void soft_iou_finish_f32(float* __restrict__ iou, float* __restrict__ sums,
                                               const float* __restrict__ part, int chunks) {
    const size_t b = blockIdx.x;
    const int lane = threadIdx.x;
    if (lane >= WARP_SIZE) return;  // one warp per mask (blockDim 32)
    float si = 0.f, sp = 0.f, st = 0.f;
    for (int c = lane; c < chunks; c += WARP_SIZE) {
        const float* o = part + 3 * (b * chunks + c);
        si += o[0];
        sp += o[1];
        st += o[2];
    }
    si = warp_sum(si);
    sp = warp_sum(sp);
    st = warp_sum(st);
    if (lane == 0) {
        float* s = sums + 3 * b;
        s[0] = si;
        s[1] = sp;
        s[2] = st;
        iou[b] = (si + SOFT_IOU_EPS) / (sp + st - si + SOFT_IOU_EPS);
    }
}

// forward: iou = (I + eps) / (U + eps), I = sum p t, U = sum p + sum t - I
// so:      d_prob[j] = d_iou * (t_j (U + eps) - (I + eps)(1 - t_j)) / (U + eps)^2
// d_prob (B, N), sums (B, 3), d_iou (B), target (B, N); grid = (ceil(N / (4 block)), B):
// a thread writes four pixels.
extern "C" __global__ void soft_iou_bwd_f32(float* __restrict__ d_prob,
                                            const float* __restrict__ sums,
                                            const float* __restrict__ d_iou,
                                            const unsigned char* __restrict__ target, int n) {
    size_t b = blockIdx.y;
    const float* s = sums + 3 * b;
    float i = s[0] + SOFT_IOU_EPS;
    float u = s[1] + s[2] - s[0] + SOFT_IOU_EPS;
    float g = d_iou[b];
    const float on = g / u, off = -g * i / (u * u);
    float* dp = d_prob + b * n;
    const unsigned char* t = target + b * n;
    // grid.x covers ceil(N / 4) / blockDim groups of four pixels
    const int k = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (k >= n) return;
    if ((n & 3) == 0 && ((reinterpret_cast<uintptr_t>(d_prob) & 15) | (reinterpret_cast<uintptr_t>(target) & 3)) == 0) {
        unsigned tt = *reinterpret_cast<const unsigned*>(t + k);
        store_float4(dp + k, make_float4(tt & 0xffu ? on : off, (tt >> 8) & 0xffu ? on : off,
                                         (tt >> 16) & 0xffu ? on : off, tt >> 24 ? on : off));
    } else {
        for (int c = k; c < k + 4 && c < n; ++c) dp[c] = t[c] != 0 ? on : off;
    }
}
