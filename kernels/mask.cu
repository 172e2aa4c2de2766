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

// High bit of each byte of x set iff that byte is nonzero.
__device__ __forceinline__ unsigned nonzero_bytes(unsigned x) {
    return (((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) & 0x80808080u;
}

// Pair counts in two launches, like a matrix product over bits.  A block of
// mask_pair_part_u8 takes a tile of PAIR_TP predictions x PAIR_TG references and one
// chunk of pixels (grid = (chunks, ceil(P / PAIR_TP), ceil(G / PAIR_TG))); it walks the
// chunk 1024 pixels at a time, packing each mask's 1024 bytes into 32 words of
// foreground bits in shared memory (each byte of the tile's masks is read once), then
// each thread counts |a & b| for its 4 pairs by popcount.  The bit tile is double
// buffered (step s packs tile s mod 2), so a step needs one barrier, between packing
// and counting: a warp done counting goes on to load the next step's masks while the
// others still count, instead of waiting at a second barrier for the tile to be free.
// Tile s mod 2 is free again at step s + 2: every warp passed the barrier of step s + 1,
// so every warp finished counting step s.  It writes per chunk
// inter_part (chunks, P, G) and cnt_part (chunks, P + G), the masks' own foreground
// counts (the tiles at grid.z = 0 write the predictions', those at grid.y = 0 the
// references').  mask_pair_finish_u8 (one warp per pair) adds the chunks:
// inter = sum inter_part, union = |a| + |b| - inter.  Integer sums: exact in any order.
#define PAIR_TP 64
#define PAIR_TG 16
#define PAIR_SUB 1024                // pixels per step: 32 words of 32 bits per mask
#define PAIR_WORDS (PAIR_SUB / 32)
#define PAIR_STRIDE (PAIR_WORDS + 1)  // row stride of the bit tile: conflict-free columns

// 32 foreground bits of 32 pixels.  Any fixed order of the bits will do: both masks of a
// pair are packed alike.  pack_bytes: the pixels as two 16-byte loads (the mask's words
// start on 16-byte boundaries when HW is a multiple of 16); pack32: pixels [lo, lo + 32)
// of mask m by bytes, bits past hw 0 (the tail, or HW not a multiple of 16).
__device__ __forceinline__ unsigned pack_bytes(uint4 u, uint4 v) {
    const unsigned x[8] = {u.x, u.y, u.z, u.w, v.x, v.y, v.z, v.w};
    unsigned bits = 0;
    for (int k = 0; k < 8; ++k) bits |= (nonzero_bytes(x[k]) >> 7) << k;  // byte 4k + j -> bit 8j + k
    return bits;
}
__device__ __forceinline__ unsigned pack32(const unsigned char* __restrict__ m, int lo, int hw) {
    unsigned bits = 0;
    const int n = hw - lo < 32 ? hw - lo : 32;
    for (int k = 0; k < n; ++k) bits |= (m[lo + k] != 0 ? 1u : 0u) << k;
    return bits;
}

#define PAIR_ROWS (PAIR_TP + PAIR_TG)      // masks per tile
#define PAIR_THREADS (PAIR_TP * PAIR_TG / 4)  // threads per block: one per 4 pairs

// inter_part (chunks, P, G), cnt_part (chunks, P + G), pred (P, HW), gt (G, HW); a chunk
// is `chunk` pixels (a multiple of PAIR_SUB).  blockDim = PAIR_THREADS (256).
// LOADS: masks whose loads a warp has in flight at once (each 32 bytes per lane).
template <int LOADS>
__device__ __forceinline__ void pair_part_body(unsigned* __restrict__ inter_part, unsigned* __restrict__ cnt_part,
                                               const unsigned char* __restrict__ pred,
                                               const unsigned char* __restrict__ gt, int np, int ng, int hw,
                                               int chunk, unsigned (*tiles)[PAIR_ROWS][PAIR_STRIDE]) {
    const int p0 = blockIdx.y * PAIR_TP, g0 = blockIdx.z * PAIR_TG;
    const int lo = blockIdx.x * chunk, hi = lo + chunk < hw ? lo + chunk : hw;
    const bool vec = (hw & 15) == 0;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    constexpr int nwarps = PAIR_THREADS / WARP_SIZE;
    // packing: warp `warp` packs masks warp, warp + nwarps, ... of the tile, lane = word
    // (one mask's 32 words per warp step), and keeps the masks' foreground counts
    constexpr int PER_WARP = (PAIR_ROWS + nwarps - 1) / nwarps;
    unsigned cnt[PER_WARP];
    for (int r = 0; r < PER_WARP; ++r) cnt[r] = 0;
    // counting: thread = prediction ti / 4 x references 4 (ti % 4) .. 4 (ti % 4) + 3
    const int pi = threadIdx.x / 4, gj = 4 * (threadIdx.x % 4);
    unsigned acc[4] = {0u, 0u, 0u, 0u};
    for (int base = lo, step = 0; base < hi; base += PAIR_SUB, ++step) {
        unsigned(*bits)[PAIR_STRIDE] = tiles[step & 1];
        // LOADS masks' loads issued before any is used (an in-order GPU would
        // otherwise wait out one memory latency per mask), then packed
        const int off = base + 32 * lane;
#ifdef __CUDACC__
#pragma unroll
#endif
        for (int r0 = 0; r0 < PER_WARP; r0 += LOADS) {
            const unsigned char* src[LOADS];
            uint4 raw[LOADS][2];
            bool full[LOADS];
#ifdef __CUDACC__
#pragma unroll
#endif
            for (int q = 0; q < LOADS; ++q) {
                const int row = warp + nwarps * (r0 + q);
                const bool is_pred = row < PAIR_TP;
                const int idx = is_pred ? p0 + row : g0 + row - PAIR_TP;
                const bool live = r0 + q < PER_WARP && row < PAIR_ROWS && idx < (is_pred ? np : ng) && off < hi;
                src[q] = live ? (is_pred ? pred : gt) + (size_t)idx * hw : nullptr;
                full[q] = live && vec && off + 32 <= hi;
                if (full[q]) {
                    raw[q][0] = load_uint4(src[q] + off);
                    raw[q][1] = load_uint4(src[q] + off + 16);
                }
            }
#ifdef __CUDACC__
#pragma unroll
#endif
            for (int q = 0; q < LOADS; ++q) {
                if (r0 + q >= PER_WARP) break;
                const int row = warp + nwarps * (r0 + q);
                if (row >= PAIR_ROWS) break;
                const unsigned word = full[q] ? pack_bytes(raw[q][0], raw[q][1])
                                      : src[q] ? pack32(src[q], off, hi)
                                               : 0u;
                bits[row][lane] = word;
                cnt[r0 + q] += __popc(word);
            }
        }
        __syncthreads();
        const unsigned* a = bits[pi];
        const unsigned* b = bits[PAIR_TP + gj];
        for (int k = 0; k < PAIR_WORDS; ++k) {
            const unsigned x = a[k];
            acc[0] += __popc(x & b[k]);
            acc[1] += __popc(x & b[PAIR_STRIDE + k]);
            acc[2] += __popc(x & b[2 * PAIR_STRIDE + k]);
            acc[3] += __popc(x & b[3 * PAIR_STRIDE + k]);
        }
    }
    const size_t c = blockIdx.x;
    const int i = p0 + pi;
    if (i < np)
        for (int j = 0; j < 4; ++j)
            if (g0 + gj + j < ng) inter_part[(c * np + i) * ng + g0 + gj + j] = acc[j];
    for (int r = 0; r < PER_WARP; ++r) {
        const int row = warp + nwarps * r;
        if (row >= PAIR_ROWS) break;
        const unsigned t = warp_sum_u32(cnt[r]);
        const bool is_pred = row < PAIR_TP;
        const int idx = is_pred ? p0 + row : g0 + row - PAIR_TP;
        const bool mine = is_pred ? blockIdx.z == 0 : blockIdx.y == 0;
        if (lane == 0 && mine && idx < (is_pred ? np : ng))
            cnt_part[c * (np + ng) + (is_pred ? idx : np + idx)] = t;
    }
}

// Two variants, one register budget each, for the GPU bench to time (src/kernels/mask.rs,
// PairPart): 5 loads in flight per warp at 2 blocks per SM (122 registers), and 3 at 3
// blocks per SM (80 registers; with 4 per SM every variant spills).  More bytes in flight
// per warp, or more warps.
extern "C" __global__ void __launch_bounds__(PAIR_THREADS, 2)
    mask_pair_part_u8(unsigned* __restrict__ inter_part, unsigned* __restrict__ cnt_part,
                      const unsigned char* __restrict__ pred, const unsigned char* __restrict__ gt, int np, int ng,
                      int hw, int chunk) {
    SHARED(unsigned, tiles, [2][PAIR_ROWS][PAIR_STRIDE]);
    pair_part_body<5>(inter_part, cnt_part, pred, gt, np, ng, hw, chunk, tiles);
}
extern "C" __global__ void __launch_bounds__(PAIR_THREADS, 3)
    mask_pair_part3_u8(unsigned* __restrict__ inter_part, unsigned* __restrict__ cnt_part,
                       const unsigned char* __restrict__ pred, const unsigned char* __restrict__ gt, int np, int ng,
                       int hw, int chunk) {
    SHARED(unsigned, tiles, [2][PAIR_ROWS][PAIR_STRIDE]);
    pair_part_body<3>(inter_part, cnt_part, pred, gt, np, ng, hw, chunk, tiles);
}

// inter (P, G), uni (P, G) from mask_pair_part_u8's partials; one warp per pair, its
// lanes over the chunks (many loads in flight; a thread walking the chunks alone waits
// out one memory latency per chunk).  blockDim = 256: 8 pairs per block.
extern "C" __global__ void mask_pair_finish_u8(unsigned long long* __restrict__ inter,
                                               unsigned long long* __restrict__ uni,
                                               const unsigned* __restrict__ inter_part,
                                               const unsigned* __restrict__ cnt_part, int np, int ng,
                                               int chunks) {
    const long long e = (long long)blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (e >= (long long)np * ng) return;  // whole warps leave together
    const int lane = threadIdx.x % WARP_SIZE;
    const int i = (int)(e / ng), j = (int)(e % ng);
    unsigned long long ti = 0, ca = 0, cb = 0;
    for (int c = lane; c < chunks; c += WARP_SIZE) {
        ti += inter_part[(size_t)c * np * ng + e];
        ca += cnt_part[(size_t)c * (np + ng) + i];
        cb += cnt_part[(size_t)c * (np + ng) + np + j];
    }
    for (int o = 16; o > 0; o >>= 1) {
        ti += __shfl_xor_sync(FULL_MASK, ti, o);
        ca += __shfl_xor_sync(FULL_MASK, ca, o);
        cb += __shfl_xor_sync(FULL_MASK, cb, o);
    }
    if (lane == 0) {
        inter[e] = ti;
        uni[e] = ca + cb - ti;
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
