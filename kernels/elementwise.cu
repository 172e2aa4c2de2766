// Elementwise kernels.
// N elements.
#include "common.cuh"

// Every whole-buffer kernel is a grid-stride loop (any grid covers any N) that moves
// four elements per load where all its pointers are 16-byte aligned (the common case:
// whole buffers and offsets that are multiples of 4), then the rest one at a time.  The
// arithmetic per element is the same on both paths, so results do not depend on which
// one ran.

__device__ __forceinline__ long long gs_first() { return blockIdx.x * (long long)blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long gs_stride() { return (long long)gridDim.x * blockDim.x; }
__device__ __forceinline__ bool aligned16(const void* a, const void* b = nullptr, const void* c = nullptr,
                                          const void* d = nullptr) {
    return ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | reinterpret_cast<uintptr_t>(c) |
             reinterpret_cast<uintptr_t>(d)) & 15) == 0;
}
// Elements [0, head) go four at a time (head = n rounded down to 4 when `vec`, else 0).
__device__ __forceinline__ long long vec_head(bool vec, long long n) { return vec ? (n & ~3LL) : 0; }

template <typename F>
__device__ __forceinline__ float4 map4(F f, float4 a) {
    return make_float4(f(a.x), f(a.y), f(a.z), f(a.w));
}
template <typename F>
__device__ __forceinline__ float4 map4(F f, float4 a, float4 b) {
    return make_float4(f(a.x, b.x), f(a.y, b.y), f(a.z, b.z), f(a.w, b.w));
}

// The bodies below take the thread's first element t and the stride s of its loop, so
// that a one-buffer launch (t = gs_first(), s = gs_stride()) and a launch over a table
// of buffers (`TabEntry`) run the same code.

// y[i] = a * x[i] (y may be x)
__device__ __forceinline__ void scale_span(float* y, const float* x, float a, long long n, long long t, long long s) {
    const long long head = vec_head(aligned16(y, x), n);
    auto f = [a](float v) { return a * v; };
    for (long long i = 4 * t; i < head; i += 4 * s) store_float4(y + i, map4(f, load_float4(x + i)));
    for (long long i = head + t; i < n; i += s) y[i] = f(x[i]);
}
extern "C" __global__ void scale_f32(float* y, const float* x, float a, long long n) {
    scale_span(y, x, a, n, gs_first(), gs_stride());
}

// y[i] = t0[i] + t1[i] + t2[i] + t3[i], the first nt terms (1 to 4; the rest null) added
// left to right, so the bits are those of a copy of t0 and an axpy of each other term in
// turn.  y may be t0 (an add into y): a residual add that keeps its inputs, or the
// gradients of one input that fed several ops, in one pass.
extern "C" __global__ void add_terms_f32(float* y, const float* t0, const float* t1, const float* t2,
                                         const float* t3, int nt, long long n) {
    const long long t = gs_first(), s = gs_stride();
    const long long head = vec_head(aligned16(y, t0, t1, t2) && aligned16(t3), n);
    auto f = [](float u, float v) { return u + v; };
    for (long long i = 4 * t; i < head; i += 4 * s) {
        float4 v = load_float4(t0 + i);
        if (nt > 1) v = map4(f, v, load_float4(t1 + i));
        if (nt > 2) v = map4(f, v, load_float4(t2 + i));
        if (nt > 3) v = map4(f, v, load_float4(t3 + i));
        store_float4(y + i, v);
    }
    for (long long i = head + t; i < n; i += s) {
        float v = t0[i];
        if (nt > 1) v = f(v, t1[i]);
        if (nt > 2) v = f(v, t2[i]);
        if (nt > 3) v = f(v, t3[i]);
        y[i] = v;
    }
}

// ---- the device backend's whole-buffer ops (src/backend/device/) ----

// y[i] = v
__device__ __forceinline__ void fill_span(float* y, float v, long long n, long long t, long long s) {
    const long long head = vec_head(aligned16(y), n);
    for (long long i = 4 * t; i < head; i += 4 * s) store_float4(y + i, make_float4(v, v, v, v));
    for (long long i = head + t; i < n; i += s) y[i] = v;
}
extern "C" __global__ void fill_f32(float* y, float v, long long n) { fill_span(y, v, n, gs_first(), gs_stride()); }

// y[i] += a * x[i]
extern "C" __global__ void axpy_f32(float* y, const float* x, float a, long long n) {
    const long long t = gs_first(), s = gs_stride(), head = vec_head(aligned16(y, x), n);
    auto f = [a](float u, float v) { return u + a * v; };
    for (long long i = 4 * t; i < head; i += 4 * s) store_float4(y + i, map4(f, load_float4(y + i), load_float4(x + i)));
    for (long long i = head + t; i < n; i += s) y[i] = f(y[i], x[i]);
}

// y[i] = x[i] (y and x do not overlap)
extern "C" __global__ void copy_f32(float* y, const float* x, long long n) {
    const long long t = gs_first(), s = gs_stride(), head = vec_head(aligned16(y, x), n);
    for (long long i = 4 * t; i < head; i += 4 * s) store_float4(y + i, load_float4(x + i));
    for (long long i = head + t; i < n; i += s) y[i] = x[i];
}

// y[r dst_stride + c] = x[r src_stride + c] for the n = rows * width values (r, c) of
// `rows` runs of `width`: a crop out of a wider map, or back into it.
extern "C" __global__ void copy_rows_f32(float* y, const float* x, long long width, long long dst_stride,
                                         long long src_stride, long long n) {
    for (long long i = gs_first(); i < n; i += gs_stride()) {
        const long long r = i / width, c = i - r * width;
        y[r * dst_stride + c] = x[r * src_stride + c];
    }
}

// y[r dst_stride + c] += x[r src_stride + c] over the same runs (the y runs do not
// overlap): a gather's rows added back where they came from.
extern "C" __global__ void add_rows_f32(float* y, const float* x, long long width, long long dst_stride,
                                        long long src_stride, long long n) {
    for (long long i = gs_first(); i < n; i += gs_stride()) {
        const long long r = i / width, c = i - r * width;
        y[r * dst_stride + c] += x[r * src_stride + c];
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
    const long long t = gs_first(), s = gs_stride(), head = vec_head(aligned16(out, x), n);
    auto f = [act](float v) { return act_value(act, v); };
    for (long long i = 4 * t; i < head; i += 4 * s) store_float4(out + i, map4(f, load_float4(x + i)));
    for (long long i = head + t; i < n; i += s) out[i] = f(x[i]);
}

// forward: out = act(x)  so: dx = act'(x) dout
extern "C" __global__ void act_bwd_f32(float* dx, const float* x, const float* dout, int act, long long n) {
    const long long t = gs_first(), s = gs_stride(), head = vec_head(aligned16(dx, x, dout), n);
    auto f = [act](float v, float g) { return act_deriv(act, v) * g; };
    for (long long i = 4 * t; i < head; i += 4 * s)
        store_float4(dx + i, map4(f, load_float4(x + i), load_float4(dout + i)));
    for (long long i = head + t; i < n; i += s) dx[i] = f(x[i], dout[i]);
}

// out (N, W) = silu(gate) * up, n = N W.  Row r of gate starts at gate + r ldg, of up at
// up + r ldu: ldg = ldu = W for buffers of their own (one flat, vectorised pass), 2 W for
// the two halves of a fused gate/up product's rows (one element per thread).
__device__ __forceinline__ float swiglu_value(float g, float u) { return g * sigmoidf_(g) * u; }
extern "C" __global__ void swiglu_fwd_f32(float* out, const float* gate, const float* up, long long n, int w,
                                          long long ldg, long long ldu) {
    const long long t = gs_first(), s = gs_stride();
    if (ldg != w || ldu != w) {
        for (long long i = t; i < n; i += s) {
            const long long r = i / w, j = i - r * w;
            out[i] = swiglu_value(gate[r * ldg + j], up[r * ldu + j]);
        }
        return;
    }
    const long long head = vec_head(aligned16(out, gate, up), n);
    for (long long i = 4 * t; i < head; i += 4 * s)
        store_float4(out + i, map4(swiglu_value, load_float4(gate + i), load_float4(up + i)));
    for (long long i = head + t; i < n; i += s) out[i] = swiglu_value(gate[i], up[i]);
}

// forward: out = silu(g) u  so: du = silu(g) dout, dg = silu'(g) u dout
__device__ __forceinline__ void swiglu_grad(float g, float u, float d, float& dg, float& du) {
    float sg = sigmoidf_(g);
    du = g * sg * d;
    dg = sg * (1.0f + g * (1.0f - sg)) * u * d;
}
extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* gate, const float* up,
                                          const float* dout, long long n) {
    const long long t = gs_first(), s = gs_stride();
    const long long head = vec_head(aligned16(dgate, dup, gate, up) && aligned16(dout), n);
    for (long long i = 4 * t; i < head; i += 4 * s) {
        float4 g = load_float4(gate + i), u = load_float4(up + i), d = load_float4(dout + i), dg, du;
        swiglu_grad(g.x, u.x, d.x, dg.x, du.x);
        swiglu_grad(g.y, u.y, d.y, dg.y, du.y);
        swiglu_grad(g.z, u.z, d.z, dg.z, du.z);
        swiglu_grad(g.w, u.w, d.w, dg.w, du.w);
        store_float4(dgate + i, dg);
        store_float4(dup + i, du);
    }
    for (long long i = head + t; i < n; i += s) swiglu_grad(gate[i], up[i], dout[i], dgate[i], dup[i]);
}

// One AdamW step; c1 = 1 - beta1^t, c2 = 1 - beta2^t (bias corrections, from the host).
// Decoupled decay: applied to the weight, not folded into the gradient.
struct AdamW {
    float lr, beta1, beta2, eps, wd, c1, c2;
    __device__ __forceinline__ void step(float& p, float& m, float& v, float g) const {
        m = beta1 * m + (1.0f - beta1) * g;
        v = beta2 * v + (1.0f - beta2) * g * g;
        p = p - lr * ((m / c1) / (sqrtf(v / c2) + eps) + wd * p);
    }
};
__device__ __forceinline__ void adamw_span(const AdamW& o, float* param, float* m, float* v, const float* grad,
                                           long long n, long long t, long long s) {
    const long long head = vec_head(aligned16(param, m, v, grad), n);
    for (long long i = 4 * t; i < head; i += 4 * s) {
        float4 p = load_float4(param + i), mi = load_float4(m + i), vi = load_float4(v + i), g = load_float4(grad + i);
        o.step(p.x, mi.x, vi.x, g.x);
        o.step(p.y, mi.y, vi.y, g.y);
        o.step(p.z, mi.z, vi.z, g.z);
        o.step(p.w, mi.w, vi.w, g.w);
        store_float4(param + i, p);
        store_float4(m + i, mi);
        store_float4(v + i, vi);
    }
    for (long long i = head + t; i < n; i += s) o.step(param[i], m[i], v[i], grad[i]);
}
extern "C" __global__ void adamw_f32(float* param, float* m, float* v, const float* grad, float lr, float beta1,
                                     float beta2, float eps, float wd, float c1, float c2, long long n) {
    adamw_span(AdamW{lr, beta1, beta2, eps, wd, c1, c2}, param, m, v, grad, n, gs_first(), gs_stride());
}

// ---- one launch over a table of buffers (an optimizer step's per-parameter ops) ----
// The table holds TAB_WORDS 64-bit words per buffer: up to four device addresses (the
// op's operands, in the order of its one-buffer kernel), the element count n, the first
// block of the entry and its number of blocks.  Entries lie in block order, so block b
// works on the last entry whose first block is at most b, as a grid of `blocks` blocks
// of its own.  One launch replaces one per parameter tensor: a few hundred per step.
#define TAB_WORDS 8
struct TabEntry {
    unsigned long long p[4];
    long long n, first, blocks;
    template <typename T>
    __device__ __forceinline__ T* ptr(int k) const { return reinterpret_cast<T*>(p[k]); }
    // this thread's first element and its stride, within the entry's blocks
    __device__ __forceinline__ long long t() const { return (blockIdx.x - first) * blockDim.x + threadIdx.x; }
    __device__ __forceinline__ long long s() const { return blocks * blockDim.x; }
};
__device__ __forceinline__ TabEntry tab_entry_at(const unsigned long long* tab, int k) {
    const unsigned long long* e = tab + (long long)k * TAB_WORDS;
    return TabEntry{{e[0], e[1], e[2], e[3]}, (long long)e[4], (long long)e[5], (long long)e[6]};
}
// The entry of this block: a binary search over the first blocks.
__device__ __forceinline__ TabEntry tab_entry(const unsigned long long* tab, int entries) {
    int lo = 0, hi = entries - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if ((long long)tab[(long long)mid * TAB_WORDS + 5] <= (long long)blockIdx.x) lo = mid;
        else hi = mid - 1;
    }
    return tab_entry_at(tab, lo);
}

// entry (y): fill_f32 of each
extern "C" __global__ void fill_many_f32(const unsigned long long* tab, int entries, float v) {
    const TabEntry e = tab_entry(tab, entries);
    fill_span(e.ptr<float>(0), v, e.n, e.t(), e.s());
}
// entry (y): scale_f32 of each, in place
extern "C" __global__ void scale_many_f32(const unsigned long long* tab, int entries, float a) {
    const TabEntry e = tab_entry(tab, entries);
    scale_span(e.ptr<float>(0), e.ptr<float>(0), a, e.n, e.t(), e.s());
}
// entry (x): part[b] = the Σ x² of block b's grid-stride share of its entry, on the
// entry's own grid, so the parts of entry k lie at part[first_k ..+ blocks_k];
// sum_parts_many_f32 adds them in order.  The grid of an entry depends on its length
// alone (src/backend/device/many.rs), so its sum does not depend on the other entries.
extern "C" __global__ void sum_sq_part_many_f32(float* part, const unsigned long long* tab, int entries) {
    SHARED(float, scratch, [32]);
    const TabEntry e = tab_entry(tab, entries);
    const float* x = e.ptr<const float>(0);
    const long long t = e.t(), s = e.s(), n = e.n, head = vec_head(aligned16(x), n);
    float acc = 0.0f;
    for (long long i = 4 * t; i < head; i += 4 * s) {
        float4 v = load_float4(x + i);
        acc += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    for (long long i = head + t; i < n; i += s) acc += x[i] * x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}
// out[k] = the sum of entry k's parts in a fixed order: block k (blockDim a multiple of 32).
extern "C" __global__ void sum_parts_many_f32(float* out, const float* part, const unsigned long long* tab) {
    SHARED(float, scratch, [32]);
    const TabEntry e = tab_entry_at(tab, blockIdx.x);
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < e.blocks; i += blockDim.x) acc += part[e.first + i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
// entry (param, m, v, grad): adamw_f32 of each, one step size for all
extern "C" __global__ void adamw_many_f32(const unsigned long long* tab, int entries, float lr, float beta1,
                                          float beta2, float eps, float wd, float c1, float c2) {
    const TabEntry e = tab_entry(tab, entries);
    adamw_span(AdamW{lr, beta1, beta2, eps, wd, c1, c2}, e.ptr<float>(0), e.ptr<float>(1), e.ptr<float>(2),
               e.ptr<const float>(3), e.n, e.t(), e.s());
}

// out (N,C) += bias (C), row-broadcast; four at a time when C is a multiple of 4 (then
// each group of four lies in one row).
extern "C" __global__ void add_bias_f32(float* out, const float* bias, long long n, int c) {
    const long long t = gs_first(), s = gs_stride(), total = n * c;
    const long long head = vec_head(aligned16(out, bias) && (c & 3) == 0, total);
    for (long long i = 4 * t; i < head; i += 4 * s) {
        float4 o = load_float4(out + i), b = load_float4(bias + i % c);
        store_float4(out + i, make_float4(o.x + b.x, o.y + b.y, o.z + b.z, o.w + b.w));
    }
    for (long long i = head + t; i < total; i += s) out[i] += bias[i % c];
}

// acc (C) += sum over rows of x (N,C) in chunks of rows, one launch: grid =
// (ceil(C / blockDim), chunks, z).  Block (x, y) writes the sum of rows y·rows ..
// (y + 1)·rows − 1 of its columns, in order, to part (z·chunks, C); the block of a column
// tile that finishes last (it counts the tile's finished blocks in done[z·gridDim.x + x]
// and sets the count back to 0 for the next launch) adds the chunks in order.  A fixed
// tree, the same run to run, with every SM busy even when C is a few thousand columns.
// Both column-sum kernels sum one or two matrices of one shape: grid.z picks (acc0, x0)
// or (acc1, x1) (LayerNorm's weight and bias gradients in one launch).
extern "C" __global__ void col_sum_chunks_f32(float* acc0, float* acc1, float* part, unsigned* done,
                                              const float* x0, const float* x1, long long n, int c, int rows) {
    SHARED(int, last, [1]);
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const float* x = blockIdx.z ? x1 : x0;
    float* p = part + (size_t)blockIdx.z * gridDim.y * c;
    if (j < c) {
        const long long lo = (long long)blockIdx.y * rows, hi = lo + rows < n ? lo + rows : n;
        float s = 0.0f;
        for (long long r = lo; r < hi; ++r) s += x[r * c + j];
        p[(size_t)blockIdx.y * c + j] = s;
    }
    __threadfence();  // this block's sums reach every block before its count does
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned* d = done + (size_t)blockIdx.z * gridDim.x + blockIdx.x;
        last[0] = atomicAdd(d, 1u) == gridDim.y - 1;
        if (last[0]) *d = 0;  // every block of the tile has counted
        __threadfence();      // the other blocks' sums are read after their counts
    }
    __syncthreads();
    if (!last[0] || j >= c) return;
    float s = 0.0f;
    for (unsigned k = 0; k < gridDim.y; ++k) s += ld_cg(p + (size_t)k * c + j);
    (blockIdx.z ? acc1 : acc0)[j] += s;
}

// acc (C) += sum over rows of x (N,C): one thread per column, rows in order, so the sum
// is the same run to run (a parameter gradient: bias, norm weights).  grid.z picks
// (acc0, x0) or (acc1, x1).
extern "C" __global__ void col_sum_f32(float* acc0, float* acc1, const float* x0, const float* x1, long long n,
                                       int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float* acc = blockIdx.z ? acc1 : acc0;
    const float* x = blockIdx.z ? x1 : x0;
    float s = 0.0f;
    for (long long r = 0; r < n; ++r) s += x[r * c + j];
    acc[j] += s;
}
