//! Pearson's correlation coefficient, as POPEN's Supp C reports it: the token scores
//! `τ` against token correctness and the sentence scores `η` against target IoU.

/// Pearson's r of the pairs `(xs[i], ys[i])`:
/// `Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)² · Σ(y−ȳ)²)`, two-pass in f64 (the means first, so large
/// offsets do not cancel), clamped to [−1, 1].  `None` where r is undefined: fewer
/// than two pairs, a constant `xs` or `ys`, or a value that is not finite.
///
/// # Panics
/// When the slices differ in length (a caller's broken contract, not bad data).
///
/// ```
/// let r = popen::metrics::pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 7.0]).unwrap();
/// assert!(r > 0.98 && r < 1.0);
/// assert_eq!(popen::metrics::pearson(&[1.0, 2.0], &[5.0, 5.0]), None);
/// ```
#[track_caller]
pub fn pearson(xs: &[f64], ys: &[f64]) -> Option<f64> {
    assert_eq!(
        xs.len(),
        ys.len(),
        "pearson: {} xs for {} ys",
        xs.len(),
        ys.len()
    );
    let n = xs.len();
    if n < 2 || xs.iter().chain(ys).any(|v| !v.is_finite()) {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n as f64;
    let (mx, my) = (mean(xs), mean(ys));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&x, &y) in xs.iter().zip(ys) {
        let (dx, dy) = (x - mx, y - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    let den = (sxx * syy).sqrt();
    // den is 0 only for a constant side; an underflowed product is as undefined
    if den == 0.0 || !den.is_finite() {
        return None;
    }
    Some((sxy / den).clamp(-1.0, 1.0))
}
