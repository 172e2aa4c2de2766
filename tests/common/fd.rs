//! f64 central finite differences for gradient checks.  The scalar checked is usually
//! L = Σ w ∘ out with fixed random weights w, so dL/dout = w.
use popen::nn::{randn, Rng};

pub type T = Vec<f64>;
/// Central-difference step: truncation error O(h²) ≈ 1e-10, rounding ≈ 1e-16/h.
pub const H: f64 = 1e-5;
pub const ATOL: f64 = 1e-7;
pub const RTOL: f64 = 1e-5;

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compare `analytic[i]` with the central difference of `loss_at(i, ±H)` for every i;
/// an all-zero gradient fails too (it would pass any check of a dead path).
pub fn check(name: &str, analytic: &[f64], mut loss_at: impl FnMut(usize, f64) -> f64) {
    assert!(!analytic.is_empty(), "{name}: nothing to check");
    for (i, &a) in analytic.iter().enumerate() {
        let num = (loss_at(i, H) - loss_at(i, -H)) / (2.0 * H);
        assert!(
            (a - num).abs() <= ATOL + RTOL * num.abs().max(a.abs()),
            "{name}[{i}]: analytic {a:.10} vs numeric {num:.10}"
        );
    }
    assert!(
        analytic.iter().any(|v| v.abs() > 1e-6),
        "{name}: gradient is all zero"
    );
}

pub fn rnd(rng: &mut Rng, n: usize) -> T {
    randn::<f64>(rng, n, 1.0)
}

pub fn perturbed(x: &[f64], i: usize, d: f64) -> T {
    let mut y = x.to_vec();
    y[i] += d;
    y
}
