// Layout ops of the device backend (src/backend/device/layout.rs): attention heads split
// (with RoPE) and merged, the KV-cache append, embedding gather / scatter-add, image
// patches.  CPU twins: src/backend/cpu/{heads,embed}.rs.  Every kernel is a grid-stride
// loop over output elements.
// B batch, T tokens, NH heads, HS head size, C channels, V vocabulary.
#include "common.cuh"

#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// (cos, sin) of RoPE pair j at position pos, as HF LLaMA computes them in f32:
// inv = 1 / theta^(2j/HS), angle = pos * inv.  pow and cos/sin in double, so that
// --use_fast_math's approximate single-precision versions do not move the angle.
__device__ __forceinline__ void rope_cs(int pos, int j, int hs, float theta, float* c, float* s) {
    float e = (float)(2 * j) / (float)hs;
    float inv = (float)(1.0 / pow((double)theta, (double)e));
    float a = (float)pos * inv;
    *c = (float)cos((double)a);
    *s = (float)sin((double)a);
}

// The heads layouts below take one thread per (token, lane) and loop over the heads:
// with RoPE a lane is a rotation pair j < HS/2 (its cos / sin computed once for all
// heads), without it a lane is one dimension d < HS.  No division per element.
// Token row = bi T + ti; (B,T,NH,HS) keeps a token's heads together, (B,NH,HT,HS) puts
// head h of it at ((bi NH + h) HT + hat + ti) HS: time row hat + ti of a heads-major
// buffer of HT rows per head (HT = T, hat = 0 for a plain split or merge; a KV cache's
// capacity and length for keys written into it).

// The row of token (bi, ti)'s head 0 in a heads-major buffer: (bi, 0, hat + ti).
__device__ __forceinline__ long long heads_row(long long bi, int ti, int nh, int ht, int hat) {
    return bi * nh * ht + hat + ti;
}

// x (B,T,NH,HS) -> out (B,NH,HT,HS) rows hat..hat+T; rope != 0 rotates pairs (i, i + HS/2)
// at positions pos0 + t:  o[i] = x[i] cos - x[i+h] sin,  o[i+h] = x[i+h] cos + x[i] sin.
// With x2 (grid.y = 2), blocks of y = 1 split x2 into out2 the same way, unrotated: a KV
// cache's keys and values in one launch.  Token row r of x (and x2) starts at x + r ldx:
// ldx = NH HS for a buffer of its own, wider for one projection's columns of a fused one.
extern "C" __global__ void heads_split_f32(float* out, const float* x, float* out2, const float* x2, int b, int t,
                                           int nh, int hs, int pos0, float theta, int rope, int ht, int hat,
                                           long long ldx) {
    if (blockIdx.y == 1) {
        out = out2;
        x = x2;
        rope = 0;
    }
    const int half = hs / 2, lanes = rope ? half : hs;
    const long long hstride = (long long)ht * hs;  // between heads of one token in out
    GRID_STRIDE(g, (long long)b * t * lanes) {
        const long long row = g / lanes, bi = row / t;
        const int j = (int)(g - row * lanes), ti = (int)(row - bi * t);
        const float* xr = x + row * ldx;
        float* o = out + heads_row(bi, ti, nh, ht, hat) * hs;  // (bi, h = 0, hat + ti)
        if (!rope) {
            for (int h = 0; h < nh; ++h) o[h * hstride + j] = xr[h * hs + j];
            continue;
        }
        float c, s;
        rope_cs(pos0 + ti, j, hs, theta, &c, &s);
        for (int h = 0; h < nh; ++h) {
            const float lo = xr[h * hs + j], hi = xr[h * hs + j + half];
            o[h * hstride + j] = lo * c - hi * s;
            o[h * hstride + j + half] = hi * c + lo * s;
        }
    }
}

// x (B,NH,HT,HS) rows hat..hat+T -> out (B,T,NH,HS): heads_merge, and with rope != 0 the
// backward of heads_split (the transposed rotation):
//   forward was: o[i] = x[i] cos - x[i+h] sin, o[i+h] = x[i+h] cos + x[i] sin
//   so:          dx[i] = do[i] cos + do[i+h] sin, dx[i+h] = do[i+h] cos - do[i] sin
// Token row r of out (and out2) starts at out + r ldx, as x's in heads_split_f32.
extern "C" __global__ void heads_merge_f32(float* out, const float* x, float* out2, const float* x2, int b, int t,
                                           int nh, int hs, int pos0, float theta, int rope, int ht, int hat,
                                           long long ldx) {
    if (blockIdx.y == 1) {  // as heads_split_f32: a second pair, unrotated
        out = out2;
        x = x2;
        rope = 0;
    }
    const int half = hs / 2, lanes = rope ? half : hs;
    const long long hstride = (long long)ht * hs;  // between heads of one token in x
    GRID_STRIDE(g, (long long)b * t * lanes) {
        const long long row = g / lanes, bi = row / t;
        const int j = (int)(g - row * lanes), ti = (int)(row - bi * t);
        const float* xr = x + heads_row(bi, ti, nh, ht, hat) * hs;  // (bi, h = 0, hat + ti)
        float* o = out + row * ldx;
        if (!rope) {
            for (int h = 0; h < nh; ++h) o[h * hs + j] = xr[h * hstride + j];
            continue;
        }
        float c, s;
        rope_cs(pos0 + ti, j, hs, theta, &c, &s);
        for (int h = 0; h < nh; ++h) {
            const float lo = xr[h * hstride + j], hi = xr[h * hstride + j + half];
            o[h * hs + j] = lo * c + hi * s;
            o[h * hs + j + half] = hi * c - lo * s;
        }
    }
}

// out (N,C) = table (V,C)[ids (N)]; ids checked against V on the host
extern "C" __global__ void embedding_fwd_f32(float* out, const float* table, const unsigned* ids, long long n, int c) {
    GRID_STRIDE(e, n * c) {
        long long r = e / c;
        out[e] = table[(long long)ids[r] * c + e % c];
    }
}

// forward: out[r] = table[ids[r]]  so: dtable[ids[r]] += dout[r]
// By groups of equal ids, without atomics: groups (U + 1 + U + N) = [first row of each
// group in `order` (U + 1 offsets), the group's id (U), the rows sorted by id, ascending
// within a group (N)], made on the host from the ids.  grid = (U, ceil(C / blockDim)):
// block (u, .) adds group u's rows into its table row in row order, so every entry is
// the sequential sum dtable + dout[r1] + dout[r2] + ... and the same run to run.
extern "C" __global__ void embedding_bwd_f32(float* dtable, const float* dout, const unsigned* groups, int u,
                                             int c) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    const unsigned g = blockIdx.x;
    const unsigned* start = groups;
    const unsigned* id = groups + u + 1;
    const unsigned* order = groups + 2 * u + 1;
    float* dst = dtable + (size_t)id[g] * c + j;
    float acc = *dst;
    for (unsigned k = start[g]; k < start[g + 1]; ++k) acc += dout[(size_t)order[k] * c + j];
    *dst = acc;
}

// Index into pixels (B,CH,H,W) of element e of the patch rows (B, (H/P)(W/P), CH P P),
// each row ordered (ch, py, px).
__device__ __forceinline__ long long patch_src(long long e, int ch, int h, int w, int p) {
    int per = ch * p * p;
    long long r = e / per;
    int k = (int)(e % per);
    int c = k / (p * p), py = (k / p) % p, px = k % p;
    int gh = h / p, gw = w / p;
    long long bi = r / ((long long)gh * gw);
    int gy = (int)((r % ((long long)gh * gw)) / gw), gx = (int)(r % gw);
    return ((bi * ch + c) * h + gy * p + py) * w + gx * p + px;
}

// out (B, (H/P)(W/P), CH P P) = the patches of pixels (B,CH,H,W)
extern "C" __global__ void patchify_fwd_f32(float* out, const float* pixels, long long n, int ch, int h, int w, int p) {
    GRID_STRIDE(e, n) out[e] = pixels[patch_src(e, ch, h, w, p)];
}

// The forward is a permutation (stride = patch: no overlap), so the backward is its
// inverse: dpixels overwritten.
extern "C" __global__ void patchify_bwd_f32(float* dpixels, const float* dout, long long n, int ch, int h, int w,
                                            int p) {
    GRID_STRIDE(e, n) dpixels[patch_src(e, ch, h, w, p)] = dout[e];
}
