//! Philox4x32-10, the counter-based generator of Salmon et al. (SC'11, "Parallel random
//! numbers: as easy as 1, 2, 3"), and the Box–Muller transform in f32.  The same
//! arithmetic is written in `kernels/perturb.cu` (`philox4x32_10`, `box_muller`), so
//! the CPU and the GPU draw bit-identical 32-bit streams for a (key, counter), and a
//! random number depends only on what it is for (seed, copy, element), never on
//! which thread draws it.  Checked against Random123's known-answer vectors in
//! `tests/kernel_perturb.rs`.

/// Round multipliers and Weyl key increments (Random123 `PHILOX_M4x32_*`,
/// `PHILOX_W32_*`).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;
/// Rounds of the standard variant.
pub const ROUNDS: usize = 10;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// One block of Philox4x32-10: four 32-bit outputs for a 128-bit counter and a 64-bit
/// key.
#[inline(always)]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for r in 0..ROUNDS {
        if r > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// 2^-24: spacing of the uniforms built from the top 24 bits of a draw.
const INV_2_24: f32 = 1.0 / 16_777_216.0;
/// 2π rounded to f32, as the kernel uses it.
const TWO_PI_F32: f32 = std::f32::consts::TAU;

/// A uniform in the open interval (0, 1) from a 32-bit draw: the top 24 bits plus
/// one half, times 2^-24 (exact in f32, never 0, so `ln` is finite).
#[inline(always)]
pub fn uniform_open(x: u32) -> f32 {
    ((x >> 8) as f32 + 0.5) * INV_2_24
}

/// ln 2 in f32.
const LN2_F32: f32 = std::f32::consts::LN_2;
/// √2 as an f32 bit pattern boundary for the mantissa fold of [`ln_open`].
const SQRT2_F32: f32 = std::f32::consts::SQRT_2;

/// `ln(u)` for a normal positive f32, branch-free (vectorizes): `u = 2^e·m` with
/// `m ∈ [√½, √2)`, `ln m = 2·atanh(s)`, `s = (m−1)/(m+1)`, `|s| ≤ 0.172`, series to
/// s⁹ (truncation < 3e-9).  Written identically in `perturb.cu` (`ln_open`).
#[inline(always)]
pub fn ln_open(u: f32) -> f32 {
    let bits = u.to_bits();
    let mut e = ((bits >> 23) as i32) - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    let big = m > SQRT2_F32;
    m = if big { m * 0.5 } else { m };
    e += big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let p = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    e as f32 * LN2_F32 + 2.0 * s * p
}

/// 1.5·2^23: adding it to an f32 in [0, 2^22) rounds it to an integer (half to even).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `(sin 2πu, cos 2πu)` for `u ∈ [0, 1]`, branch-free (vectorizes): quadrant
/// `q = round(4u)`, `θ = 2π(u − q/4) ∈ [−π/4, π/4]` (the subtraction is exact), Taylor
/// series to θ⁹ / θ⁸ (truncation < 3e-8), then a rotation by q quarter turns.
/// Written identically in `perturb.cu` (`sincos_2pi`).
#[inline(always)]
pub fn sincos_2pi(u: f32) -> (f32, f32) {
    // 4u + 1.5·2^23 rounds 4u to an integer (half to even, as `rintf` on the GPU)
    // whose low bits are the quadrant; no `floor` call, so the loop vectorizes
    let big = 4.0 * u + ROUND_MAGIC;
    let q = big - ROUND_MAGIC;
    let qi = big.to_bits() & 3;
    let t = TWO_PI_F32 * (u - 0.25 * q);
    let t2 = t * t;
    let sn = t
        * (1.0
            + t2 * (-1.0 / 6.0
                + t2 * (1.0 / 120.0 + t2 * (-1.0 / 5040.0 + t2 * (1.0 / 362_880.0)))));
    let cs = 1.0 + t2 * (-0.5 + t2 * (1.0 / 24.0 + t2 * (-1.0 / 720.0 + t2 * (1.0 / 40_320.0))));
    // rotate (sn, cs) by qi quarter turns: sin(θ + qπ/2), cos(θ + qπ/2)
    let (s, c) = if qi & 1 == 1 { (cs, -sn) } else { (sn, cs) };
    if qi & 2 == 2 {
        (-s, -c)
    } else {
        (s, c)
    }
}

/// Box–Muller in f32: two standard normals from two 32-bit draws, with the
/// polynomial [`ln_open`] and [`sincos_2pi`] so the CPU loop vectorizes and the GPU
/// (`box_muller` in `perturb.cu`, the same operations) agrees within float rounding.
#[inline(always)]
pub fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let u1 = uniform_open(a);
    let u2 = uniform_open(b);
    let r = (-2.0f32 * ln_open(u1)).sqrt();
    let (s, c) = sincos_2pi(u2);
    (r * c, r * s)
}

/// A sequential stream over Philox blocks (key = seed, counter = 0, 1, 2, …), for tests
/// and host-side sampling that want a simple deterministic generator.
#[derive(Clone, Debug)]
pub struct Philox {
    key: [u32; 2],
    ctr: u64,
    buf: [u32; 4],
    used: usize,
}

impl Philox {
    /// A stream keyed by `seed`.
    pub fn new(seed: u64) -> Self {
        Philox {
            key: [seed as u32, (seed >> 32) as u32],
            ctr: 0,
            buf: [0; 4],
            used: 4,
        }
    }
    /// The next 32-bit draw.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.buf = philox4x32_10([self.ctr as u32, (self.ctr >> 32) as u32, 0, 0], self.key);
            self.ctr += 1;
            self.used = 0;
        }
        self.used += 1;
        self.buf[self.used - 1]
    }
    /// A uniform in (0, 1).
    pub fn next_f32(&mut self) -> f32 {
        uniform_open(self.next_u32())
    }
    /// A uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let x = ((self.next_u32() as u64) << 32 | self.next_u32() as u64) >> 11;
        lo + (hi - lo) * (x as f64 / (1u64 << 53) as f64)
    }
    /// A standard normal (Box–Muller, second value discarded).
    pub fn normal(&mut self) -> f32 {
        let (a, b) = (self.next_u32(), self.next_u32());
        box_muller(a, b).0
    }
}
