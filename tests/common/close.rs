//! Closeness of two float vectors.

/// Largest |a − b| over the largest |b| (at least 1e-6): the relative error the
/// golden and packed-product tests bound.  Infinite where an entry of either is NaN
/// (`f32::max` would skip it, and an unwritten output would pass).
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    if a.iter().chain(b).any(|x| x.is_nan()) {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `m.max(e)` for a running largest error, except that NaN sticks (`f32::max` and
/// `f64::max` drop it, so a NaN error would read as no error).
pub fn sticky_max<F: num_traits::Float>(m: F, e: F) -> F {
    if e > m || e.is_nan() {
        e
    } else {
        m
    }
}
