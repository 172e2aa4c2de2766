//! `popen::metrics::pearson` (Supp C) against values worked by hand.
use popen::metrics::pearson;

fn close(a: Option<f64>, b: f64) {
    let a = a.expect("r is defined");
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
}

#[test]
fn pearson_by_hand() {
    // x̄ = 3, ȳ = 4; dx = (−2, −1, 0, 1, 2), dy = (−2, 0, 1, 0, 1):
    // Σdxdy = 6, Σdx² = 10, Σdy² = 6, r = 6/√60
    let xs = [1.0, 2.0, 3.0, 4.0, 5.0];
    let ys = [2.0, 4.0, 5.0, 4.0, 5.0];
    close(pearson(&xs, &ys), 6.0 / 60f64.sqrt());
    // symmetric, and unchanged by a positive affine map of either side
    close(pearson(&ys, &xs), 6.0 / 60f64.sqrt());
    let ys2: Vec<f64> = ys.iter().map(|y| 3.0 * y - 7.0).collect();
    close(pearson(&xs, &ys2), 6.0 / 60f64.sqrt());
    // a negative scale flips the sign
    let neg: Vec<f64> = ys.iter().map(|y| -0.5 * y).collect();
    close(pearson(&xs, &neg), -6.0 / 60f64.sqrt());
    // exact lines
    close(pearson(&xs, &xs.map(|x| 2.0 * x + 1.0)), 1.0);
    close(pearson(&xs, &xs.map(|x| 4.0 - x)), -1.0);
    // token correctness (0/1) against scores: dx = (−.5, −.5, .5, .5),
    // dy = (−.3, −.1, .1, .3): Σdxdy = .4, Σdx² = 1, Σdy² = .2, r = .4/√.2
    close(
        pearson(&[0.0, 0.0, 1.0, 1.0], &[0.2, 0.4, 0.6, 0.8]),
        0.4 / 0.2f64.sqrt(),
    );
    // a large common offset does not cancel the signal (two-pass means)
    close(
        pearson(&[1e9 + 1.0, 1e9 + 2.0, 1e9 + 3.0], &[1.0, 2.0, 3.0]),
        1.0,
    );
}

#[test]
fn pearson_is_none_where_undefined() {
    assert_eq!(pearson(&[], &[]), None);
    assert_eq!(pearson(&[1.0], &[2.0]), None);
    assert_eq!(pearson(&[1.0, 2.0, 3.0], &[5.0, 5.0, 5.0]), None);
    assert_eq!(pearson(&[7.0, 7.0], &[1.0, 2.0]), None);
    assert_eq!(pearson(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]), None);
    assert_eq!(pearson(&[1.0, 2.0], &[f64::INFINITY, 2.0]), None);
}

#[test]
#[should_panic(expected = "pearson: 2 xs for 3 ys")]
fn pearson_lengths_must_match() {
    let _ = pearson(&[1.0, 2.0], &[1.0, 2.0, 3.0]);
}
