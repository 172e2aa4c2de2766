//! A small counter-free PRNG (xoshiro256** seeded through the crate's SplitMix64,
//! [`crate::rng`]) and hash noise.  Written here rather than taken from `rand` so that
//! the world's bytes cannot change when a dependency changes its algorithms: same
//! seed, same data set, forever.
use crate::rng::{splitmix64, GOLDEN_GAMMA};

/// Mix several words into one seed (order matters).
pub fn mix(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(0x5EED_0FC0_FFEE_u64, |h, &w| splitmix64(h ^ splitmix64(w)))
}

/// xoshiro256** seeded through SplitMix64.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose four state words are successive SplitMix64 outputs from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut s = [0u64; 4];
        for v in s.iter_mut() {
            z = z.wrapping_add(GOLDEN_GAMMA);
            *v = splitmix64(z);
        }
        Rng { s }
    }
    /// The next 64 random bits (one xoshiro256** step).
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }
    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }
    /// Uniform integer in [0, n); `n` must be > 0.
    #[track_caller]
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() >> 11) % n as u64) as usize
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f32) -> bool {
        self.f32() < p
    }
    /// One element of a non-empty slice.
    #[track_caller]
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }
    /// Index drawn with probability proportional to `w` (all zero → uniform).
    pub fn weighted(&mut self, w: &[f32]) -> usize {
        let total: f32 = w.iter().sum();
        if total <= 0.0 {
            return self.below(w.len());
        }
        let mut r = self.f32() * total;
        for (i, &wi) in w.iter().enumerate() {
            if r < wi {
                return i;
            }
            r -= wi;
        }
        w.len() - 1
    }
}

/// Hash of a lattice point to [0, 1): the building block of value noise.
fn lattice(seed: u64, x: i64, y: i64) -> f32 {
    // One mixer round over a linear combination: this runs several times per pixel,
    // and the full `mix` made it most of a sample's cost.
    let h = splitmix64(
        seed ^ (x as u64).wrapping_mul(GOLDEN_GAMMA)
            ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    );
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// Smooth value noise in [0, 1) at (x, y) with lattice spacing `scale` pixels.
pub fn value_noise(seed: u64, x: f32, y: f32, scale: f32) -> f32 {
    let (fx, fy) = (x / scale, y / scale);
    let (x0, y0) = (fx.floor(), fy.floor());
    let (tx, ty) = (fx - x0, fy - y0);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let (ix, iy) = (x0 as i64, y0 as i64);
    let a = lattice(seed, ix, iy);
    let b = lattice(seed, ix + 1, iy);
    let c = lattice(seed, ix, iy + 1);
    let d = lattice(seed, ix + 1, iy + 1);
    let top = a + (b - a) * sx;
    let bot = c + (d - c) * sx;
    top + (bot - top) * sy
}

/// Per-pixel white noise in [0, 1).
pub fn pixel_noise(seed: u64, x: usize, y: usize) -> f32 {
    lattice(seed ^ 0xA5A5, x as i64, y as i64)
}
