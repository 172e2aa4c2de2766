//! Fast f32 math shared by the CPU twins and the CPU backend.
//!
//! [`exp_f32`] is the one `exp` used by the softmax row loops of attention and
//! log-prob and by the CPU backend's SiLU / log-softmax: a libm call per element
//! cannot vectorize, this branch-free polynomial can (4 lanes with SSE2, 16 inside
//! the AVX-512 row loops that inline it).

/// ln2 = `LN2_HI + LN2_LO` (Cody–Waite): `LN2_HI` has 9 significant bits, so `n·LN2_HI`
/// is exact for |n| ≤ 128 and the reduced argument keeps its precision for large |x|.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this 2^n leaves the normal range of the f32 exponent: the result is 0.
pub const EXP_MIN_ARG: f32 = -87.3;
/// Above this the result would overflow f32 (e^88.3 ≈ 2.2e38): it saturates here.
pub const EXP_MAX_ARG: f32 = 88.3;
/// 1.5·2²³: adding and subtracting it rounds an f32 to the nearest integer without a
/// rounding instruction (baseline x86-64 has no SSE4.1 `round`); the sum's low
/// mantissa bits then hold that integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x` in f32 without a libm call, so that loops over it vectorize.
///
/// `e^x = 2^n · e^r` with `n = round(x·log₂e)` and `r = x − n·ln2` in `[−ln2/2, ln2/2]`,
/// and `e^r` by its degree-6 Taylor polynomial (truncation `r⁷/7! < 1.3e-7`; measured
/// relative error < 2.5e-7 over `[−87, 88]`).  2^n is built from the integer bits of
/// the rounding sum, avoiding a float→int conversion (which blocks vectorization).
///
/// Edges: `x < EXP_MIN_ARG` (−∞ included) gives 0, `x > EXP_MAX_ARG` saturates at
/// `e^EXP_MAX_ARG`, NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(EXP_MIN_ARG, EXP_MAX_ARG);
    let t = xc * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let ni = t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Horner form of Σ r^k / k!, k ≤ 6
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let y = p * f32::from_bits(((ni + 127) as u32) << 23);
    // a select, not a branch: the loops stay vectorized
    if x < EXP_MIN_ARG {
        0.0
    } else {
        y
    }
}

/// Abramowitz & Stegun 7.1.26: `erf(a) ≈ 1 − t·P(t)·e^{−a²}` for `a ≥ 0`, with
/// `t = 1/(1 + p·a)` and `P` of degree 4; absolute error below 1.5e-7 (Handbook of
/// Mathematical Functions, 1964).
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_7,
    -1.453_152_1,
    1.061_405_4,
];
/// Below this `|x|` the Maclaurin series is used: there `1 − t·P(t)·e^{−a²}` cancels
/// (the product is near 1) and loses up to 6.5e-7 to f32 rounding.
const ERF_SERIES_MAX: f32 = 0.75;
/// `erf(a) = (2/√π) Σ (−1)ⁿ a^(2n+1) / (n!(2n+1))`, n < 8 (`n!(2n+1)` = 1, 3, 10, …):
/// the first omitted term is below 1.1e-9 at `a = 0.75`.
const ERF_SERIES: [f32; 8] = {
    const S: f32 = std::f32::consts::FRAC_2_SQRT_PI;
    [
        S,
        -S / 3.0,
        S / 10.0,
        -S / 42.0,
        S / 216.0,
        -S / 1320.0,
        S / 9360.0,
        -S / 75600.0,
    ]
};

/// `erf(x)` in f32 without a libm call, so that loops over it (the erf GELU of the
/// LLaVA projector and the pixel decoder's upsampling) vectorize.
///
/// On `a = |x|`: the Maclaurin series below 0.75, Abramowitz & Stegun
/// 7.1.26 with [`exp_f32`] above; both are computed and one selected (no branch), the
/// sign restored.  Measured absolute error < 2.5e-7 over `[−6, 6]` (the formula's
/// 1.5e-7 plus f32 rounding), which is what the f32 GELU `½x(1 + erf(x/√2))` needs.
/// Edges: ±∞ give ±1, NaN stays NaN.  f64 callers (gradient checks) keep libm's `erf`.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let a2 = a * a;
    let t = 1.0 / (1.0 + ERF_P * a);
    let p = t * (ERF_A[0] + t * (ERF_A[1] + t * (ERF_A[2] + t * (ERF_A[3] + t * ERF_A[4]))));
    let tail = 1.0 - p * exp_f32(-a2);
    let c = &ERF_SERIES;
    let series = a
        * (c[0]
            + a2 * (c[1]
                + a2 * (c[2] + a2 * (c[3] + a2 * (c[4] + a2 * (c[5] + a2 * (c[6] + a2 * c[7])))))));
    let y = if a < ERF_SERIES_MAX { series } else { tail };
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate_and_handles_edges() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64) - want).abs() / want;
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::INFINITY).is_finite());
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn erf_f32_is_accurate_odd_and_handles_edges() {
        let mut worst = 0.0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let err = ((erf_f32(x) as f64) - libm::erf(x as f64)).abs();
            worst = worst.max(err);
            assert_eq!(erf_f32(-x), -erf_f32(x), "odd at {x}");
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "worst absolute error {worst}");
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
        assert!(erf_f32(0.0).abs() < 1e-7);
    }
}
