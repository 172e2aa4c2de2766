//! The one row-softmax: the row loops (max, add-and-max, Σ exp) behind every softmax
//! and log-sum-exp of the CPU twins (attention, log-probs) and so of the CPU backend.
//!
//! Each loop keeps [`LANES`] independent accumulators: one running max or sum is a
//! single dependency chain that cannot vectorize; sixteen interleaved ones fill an
//! AVX-512 register.  In f32 each loop runs through [`crate::simd_fn!`].
use super::fastmath::exp_f32;
use num_traits::Float;

/// Independent accumulators per row loop.
pub const LANES: usize = 16;

/// The float types the row loops run in: f32 (with the crate's vectorizable `exp`,
/// through the SIMD dispatch) and f64 (libm `exp`, for gradient checks).
pub trait RowFloat: Float + Send + Sync + Default + std::iter::Sum + 'static {
    /// `exp(x)`; inlined into the row loops so that they vectorize.
    fn exp1(x: Self) -> Self;
    /// [`row_max`], possibly through a wider instruction set.
    fn row_max(x: &[Self]) -> Self {
        row_max(x)
    }
    /// [`add_and_max`], possibly through a wider instruction set.
    fn add_and_max(x: &mut [Self], g: &[Self]) -> Self {
        add_and_max(x, g)
    }
    /// [`sum_exp`], possibly through a wider instruction set.
    fn sum_exp(x: &[Self], c: Self) -> Self {
        sum_exp(x, c)
    }
    /// [`exp_shift_sum`], possibly through a wider instruction set.
    fn exp_shift_sum(x: &mut [Self], g: Option<&[Self]>, c: Self) -> Self {
        exp_shift_sum(x, g, c)
    }
}

impl RowFloat for f64 {
    #[inline(always)]
    fn exp1(x: f64) -> f64 {
        x.exp()
    }
}

crate::simd_fn!(fn row_max_f32(x: &[f32]) -> f32 => row_max::<f32>);
crate::simd_fn!(fn add_and_max_f32(x: &mut [f32], g: &[f32]) -> f32 => add_and_max::<f32>);
crate::simd_fn!(fn sum_exp_f32(x: &[f32], c: f32) -> f32 => sum_exp::<f32>);
crate::simd_fn!(
    fn exp_shift_sum_f32(x: &mut [f32], g: Option<&[f32]>, c: f32) -> f32 => exp_shift_sum::<f32>
);

impl RowFloat for f32 {
    #[inline(always)]
    fn exp1(x: f32) -> f32 {
        exp_f32(x)
    }
    fn row_max(x: &[f32]) -> f32 {
        row_max_f32(x)
    }
    fn add_and_max(x: &mut [f32], g: &[f32]) -> f32 {
        add_and_max_f32(x, g)
    }
    fn sum_exp(x: &[f32], c: f32) -> f32 {
        sum_exp_f32(x, c)
    }
    fn exp_shift_sum(x: &mut [f32], g: Option<&[f32]>, c: f32) -> f32 {
        exp_shift_sum_f32(x, g, c)
    }
}

/// Max of two values with a plain compare: `Float::max` pins a NaN-aware sequential
/// chain that does not vectorize (a NaN poisons the row's sum anyway).
#[inline(always)]
fn max2<A: RowFloat>(a: A, b: A) -> A {
    if b > a {
        b
    } else {
        a
    }
}

/// `max_j x[j]` (−inf when empty).
#[inline(always)]
pub fn row_max<A: RowFloat>(x: &[A]) -> A {
    let n = x.len() / LANES * LANES;
    let (xa, xb) = x.split_at(n);
    let mut acc = [A::neg_infinity(); LANES];
    for xc in xa.chunks_exact(LANES) {
        for i in 0..LANES {
            acc[i] = max2(acc[i], xc[i]);
        }
    }
    for &v in xb {
        acc[0] = max2(acc[0], v);
    }
    acc.iter().fold(A::neg_infinity(), |m, &v| max2(m, v))
}

/// `x[j] += g[j]` for every `j`; returns `max_j x[j]` (−inf when empty).
#[inline(always)]
pub fn add_and_max<A: RowFloat>(x: &mut [A], g: &[A]) -> A {
    let g = &g[..x.len()];
    let n = x.len() / LANES * LANES;
    let (xa, xb) = x.split_at_mut(n);
    let (ga, gb) = g.split_at(n);
    let mut acc = [A::neg_infinity(); LANES];
    for (xc, gc) in xa.chunks_exact_mut(LANES).zip(ga.chunks_exact(LANES)) {
        for i in 0..LANES {
            let v = xc[i] + gc[i];
            xc[i] = v;
            acc[i] = max2(acc[i], v);
        }
    }
    for (xv, &gv) in xb.iter_mut().zip(gb) {
        *xv = *xv + gv;
        acc[0] = max2(acc[0], *xv);
    }
    acc.iter().fold(A::neg_infinity(), |m, &v| max2(m, v))
}

/// `Σ_j exp(x[j] + c)`, reading `x` only (the log-sum-exp of a logit row).
#[inline(always)]
pub fn sum_exp<A: RowFloat>(x: &[A], c: A) -> A {
    let n = x.len() / LANES * LANES;
    let (xa, xb) = x.split_at(n);
    let mut acc = [A::zero(); LANES];
    for xc in xa.chunks_exact(LANES) {
        for i in 0..LANES {
            acc[i] = acc[i] + A::exp1(xc[i] + c);
        }
    }
    for &v in xb {
        acc[0] = acc[0] + A::exp1(v + c);
    }
    acc.iter().copied().sum()
}

/// `x[j] = exp(x[j] + g[j] + c)` (`g` absent: zero); returns `Σ_j x[j]`.
#[inline(always)]
pub fn exp_shift_sum<A: RowFloat>(x: &mut [A], g: Option<&[A]>, c: A) -> A {
    let n = x.len() / LANES * LANES;
    let mut acc = [A::zero(); LANES];
    match g {
        Some(g) => {
            let g = &g[..x.len()];
            let (xa, xb) = x.split_at_mut(n);
            let (ga, gb) = g.split_at(n);
            for (xc, gc) in xa.chunks_exact_mut(LANES).zip(ga.chunks_exact(LANES)) {
                for i in 0..LANES {
                    let v = A::exp1(xc[i] + gc[i] + c);
                    xc[i] = v;
                    acc[i] = acc[i] + v;
                }
            }
            for (xv, &gv) in xb.iter_mut().zip(gb) {
                *xv = A::exp1(*xv + gv + c);
                acc[0] = acc[0] + *xv;
            }
        }
        None => {
            let (xa, xb) = x.split_at_mut(n);
            for xc in xa.chunks_exact_mut(LANES) {
                for i in 0..LANES {
                    let v = A::exp1(xc[i] + c);
                    xc[i] = v;
                    acc[i] = acc[i] + v;
                }
            }
            for xv in xb.iter_mut() {
                *xv = A::exp1(*xv + c);
                acc[0] = acc[0] + *xv;
            }
        }
    }
    acc.iter().copied().sum()
}

/// `log Σ_j exp(x[j])`, shifted by the row max for range; −inf for an empty row or one
/// that is −inf everywhere (the log of an empty sum).
#[inline]
pub fn log_sum_exp<A: RowFloat>(x: &[A]) -> A {
    let m = A::row_max(x);
    if m == A::neg_infinity() {
        return m;
    }
    m + A::sum_exp(x, -m).ln()
}
