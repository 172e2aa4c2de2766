// Noise perturbation (Sec. 3.2, Alg. 1): NP perturbed copies of a batch of images in
// one launch, each copy with Gaussian noise of std sigma filled into one random
// rectangle per image.  Randomness: Philox4x32-10 keyed by the seed, counter =
// (what, image, copy, domain), the same arithmetic as src/kernels/philox.rs, so the
// CPU twin draws the same bits.
// NP copies, B images, C channels, H x W pixels, E = C*H*W elements per image.
#include "common.cuh"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
// Counter word 3 separates the two uses of the generator so they never share a block.
#define DOMAIN_RECT 0x52454354u   // "RECT"
#define DOMAIN_NOISE 0x4E4F4953u  // "NOIS"

struct u32x4 {
    unsigned a, b, c, d;
};

__device__ __forceinline__ u32x4 philox4x32_10(u32x4 ctr, unsigned k0, unsigned k1) {
#ifdef __CUDACC__
#pragma unroll
#endif
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        unsigned hi0 = __umulhi(PHILOX_M0, ctr.a), lo0 = PHILOX_M0 * ctr.a;
        unsigned hi1 = __umulhi(PHILOX_M1, ctr.c), lo1 = PHILOX_M1 * ctr.c;
        ctr = u32x4{hi1 ^ ctr.b ^ k0, lo1, hi0 ^ ctr.d ^ k1, lo0};
    }
    return ctr;
}

// Uniform in (0, 1): top 24 bits + 1/2, times 2^-24 (exact, never 0).
__device__ __forceinline__ float uniform_open(unsigned x) {
    return ((float)(x >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

#ifdef __CUDACC__
#define DIV_RN(a, b) __fdiv_rn(a, b)  // IEEE division even under --use_fast_math
#else
#define DIV_RN(a, b) ((a) / (b))
#endif

// ln(u) for a normal positive float, as philox.rs::ln_open: u = 2^e m, m in
// [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1), series to s^9.  Plain
// arithmetic (no libm), so --use_fast_math cannot swap in an approximation and the CPU
// twin, which vectorizes the same polynomial, agrees within float rounding.
__device__ __forceinline__ float ln_open(float u) {
    unsigned bits = __float_as_uint(u);
    int e = (int)(bits >> 23) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    bool big = m > 1.41421354f;
    m = big ? m * 0.5f : m;
    e += big ? 1 : 0;
    float s = DIV_RN(m - 1.0f, m + 1.0f);
    float s2 = s * s;
    float p = 1.0f + s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f))));
    return (float)e * 0.693147182f + 2.0f * s * p;
}

// (sin 2 pi u, cos 2 pi u) for u in [0, 1], as philox.rs::sincos_2pi: quadrant
// q = round(4u) (half to even), theta = 2 pi (u - q/4) in [-pi/4, pi/4], Taylor to theta^9 / theta^8,
// rotation by q quarter turns.
__device__ __forceinline__ float2 sincos_2pi(float u) {
    float q = rintf(4.0f * u);  // round half to even, as the CPU's magic-number add
    float t = 6.28318548f * (u - 0.25f * q);
    float t2 = t * t;
    float sn = t * (1.0f + t2 * (-1.0f / 6.0f + t2 * (1.0f / 120.0f + t2 * (-1.0f / 5040.0f + t2 * (1.0f / 362880.0f)))));
    float cs = 1.0f + t2 * (-0.5f + t2 * (1.0f / 24.0f + t2 * (-1.0f / 720.0f + t2 * (1.0f / 40320.0f))));
    int qi = ((int)q) & 3;
    float s = (qi & 1) ? cs : sn;
    float c = (qi & 1) ? -sn : cs;
    if (qi & 2) {
        s = -s;
        c = -c;
    }
    return make_float2(s, c);
}

// Box-Muller in f32, same operations as philox.rs::box_muller.
__device__ __forceinline__ float2 box_muller(unsigned a, unsigned b) {
    float u1 = uniform_open(a), u2 = uniform_open(b);
#ifdef __CUDACC__
    float r = __fsqrt_rn(-2.0f * ln_open(u1));
#else
    float r = sqrtf(-2.0f * ln_open(u1));
#endif
    float2 sc = sincos_2pi(u2);
    return make_float2(r * sc.y, r * sc.x);
}

// Rectangle of (copy, image): y0, x0, rh, rw with rh in [rh_min, rh_max],
// rw in [rw_min, rw_max], fully inside the image.  (Modulo bias < 2^-20 for image
// sizes below 4096: irrelevant for augmentation.)
__device__ __forceinline__ void perturb_rect(int* r, unsigned copy, unsigned image, int h, int w,
                                             int rh_min, int rh_max, int rw_min, int rw_max,
                                             unsigned k0, unsigned k1) {
    u32x4 x = philox4x32_10(u32x4{image, 0u, copy, DOMAIN_RECT}, k0, k1);
    int rh = rh_min + (int)(x.a % (unsigned)(rh_max - rh_min + 1));
    int rw = rw_min + (int)(x.b % (unsigned)(rw_max - rw_min + 1));
    r[0] = (int)(x.c % (unsigned)(h - rh + 1));
    r[1] = (int)(x.d % (unsigned)(w - rw + 1));
    r[2] = rh;
    r[3] = rw;
}

// out (NP, B, C, H, W), rects (NP, B, 4) = [y0, x0, rh, rw], img (B, C, H, W).
// grid.y = NP*B (copy-major), grid.x * blockDim.x threads cover ceil(E/4) groups of
// four elements: one Philox block gives the four normals of a group.
// out[k,b,e] = img[b,e] + sigma * z(seed, first_copy+k, b, e) inside the rectangle.
// The block draws its rectangle once (thread 0, shared); a thread splits its first
// element into (row, column) with one 32-bit division pair when E fits an int (a
// 64-bit one otherwise) and steps the other three: outside the rectangle a thread is a
// float4 copy.
extern "C" __global__ void perturb_fwd_f32(float* __restrict__ out, int* __restrict__ rects,
                                           const float* __restrict__ img, int nb, int c, int h,
                                           int w, float sigma, int rh_min, int rh_max, int rw_min,
                                           int rw_max, unsigned seed_lo, unsigned seed_hi,
                                           unsigned first_copy) {
    SHARED(int, rect, [4]);
    const int k = blockIdx.y / nb, b = blockIdx.y % nb;
    const unsigned copy = first_copy + (unsigned)k;
    const long long e_total = (long long)c * h * w;
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long e0 = 4 * g;
    // the load first, so that it is in flight while thread 0 draws the rectangle
    const int n = e0 >= e_total ? 0 : e_total - e0 < 4 ? (int)(e_total - e0) : 4;
    const bool vec = n == 4 && (e_total & 3) == 0;
    const float* src = img + (size_t)b * e_total;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (vec) {
        float4 t = load_float4(src + e0);
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    } else {
        for (int j = 0; j < n; ++j) v[j] = src[e0 + j];
    }
    if (threadIdx.x == 0) {
        perturb_rect(rect, copy, (unsigned)b, h, w, rh_min, rh_max, rw_min, rw_max, seed_lo, seed_hi);
        if (blockIdx.x == 0) {
            int* dst = rects + 4 * (size_t)blockIdx.y;
            for (int j = 0; j < 4; ++j) dst[j] = rect[j];
        }
    }
    __syncthreads();
    if (n == 0) return;
    const int y0 = rect[0], x0 = rect[1], y1 = rect[0] + rect[2], x1 = rect[1] + rect[3];
    float* dst = out + (size_t)blockIdx.y * e_total;
    // (row, column) of element e0, then of the next three by steps
    int x, y;
    if (e_total <= 2147483647LL) {
        const int q = (int)e0 / w;
        x = (int)e0 - q * w;
        y = q % h;
    } else {
        const long long q = e0 / w;
        x = (int)(e0 - q * w);
        y = (int)(q % h);
    }
    // Which of the four elements fall in the rectangle; draw only when one does.
    bool in[4];
    bool any = false;
    for (int j = 0; j < 4; ++j) {
        in[j] = j < n && y >= y0 && y < y1 && x >= x0 && x < x1;
        any |= in[j];
        if (++x == w) {
            x = 0;
            if (++y == h) y = 0;
        }
    }
    if (any) {
        u32x4 q = philox4x32_10(u32x4{(unsigned)g, (unsigned)b, copy, DOMAIN_NOISE}, seed_lo, seed_hi);
        float2 z01 = box_muller(q.a, q.b), z23 = box_muller(q.c, q.d);
        float z[4] = {z01.x, z01.y, z23.x, z23.y};
        for (int j = 0; j < 4; ++j)
            if (in[j]) v[j] += sigma * z[j];
    }
    if (vec) {
        store_float4(dst + e0, make_float4(v[0], v[1], v[2], v[3]));
    } else {
        for (int j = 0; j < n; ++j) dst[e0 + j] = v[j];
    }
}

// The raw stream, for the known-answer and CPU-equality tests:
// out[4i + j] = philox4x32_10((i, c1, c2, c3), (k0, k1))[j], out (4n).
extern "C" __global__ void philox_fill_u32(unsigned* out, int n, unsigned c1, unsigned c2,
                                           unsigned c3, unsigned k0, unsigned k1) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32x4 q = philox4x32_10(u32x4{(unsigned)i, c1, c2, c3}, k0, k1);
    out[4 * i] = q.a;
    out[4 * i + 1] = q.b;
    out[4 * i + 2] = q.c;
    out[4 * i + 3] = q.d;
}

// Normals from the stream (Box-Muller on each pair), to check the transform alone:
// out[4i + j] = box_muller of philox((i, c1, c2, c3)), out (4n).
extern "C" __global__ void philox_normal_f32(float* out, int n, unsigned c1, unsigned c2,
                                             unsigned c3, unsigned k0, unsigned k1) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32x4 q = philox4x32_10(u32x4{(unsigned)i, c1, c2, c3}, k0, k1);
    float2 a = box_muller(q.a, q.b), b = box_muller(q.c, q.d);
    out[4 * i] = a.x;
    out[4 * i + 1] = a.y;
    out[4 * i + 2] = b.x;
    out[4 * i + 3] = b.y;
}
