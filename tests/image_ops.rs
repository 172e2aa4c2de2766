//! The image ops of the backend contract (im2col, depth-to-space, bilinear resize,
//! per-row scale, sigmoid, mask losses): forwards against hand-worked values or a slow
//! reference written from the formula, every backward against f64 central finite
//! differences on odd sizes, and bad sizes as `Err`.
//!
//! The scalar checked is L = Σ w ∘ out with fixed random weights w, so dL/dout = w.
use popen::backend::{Act, Backend, Conv2dGeom, Cpu};
use popen::nn::Rng;

mod common;
use common::fd::{check, dot, perturbed, rnd, T};

const BE: Cpu = Cpu;

#[test]
fn im2col_gathers_padded_windows_and_its_backward_matches_finite_differences() {
    let mut rng = Rng::new(21);
    for (k, pad) in [(3, 1), (2, 0), (3, 2)] {
        let g = Conv2dGeom {
            b: 2,
            h: 5,
            w: 7,
            c: 3,
            k,
            pad,
        };
        let (ho, wo) = g.out_hw().unwrap();
        assert_eq!((ho, wo), (5 + 2 * pad - k + 1, 7 + 2 * pad - k + 1));
        let x = rnd(&mut rng, 2 * 5 * 7 * 3);
        let n_out = 2 * ho * wo * g.col_width();
        let fwd = |x: &T| {
            let mut o = vec![0.0; n_out];
            BE.im2col(x, &g, &mut o).unwrap();
            o
        };
        let out = fwd(&x);
        // every entry from the definition: x[b, oy+ky−pad, ox+kx−pad, c] or 0 outside
        for bi in 0..2 {
            for oy in 0..ho {
                for ox in 0..wo {
                    for ky in 0..k {
                        for kx in 0..k {
                            for c in 0..3 {
                                let (iy, ix) = (
                                    oy as i64 + ky as i64 - pad as i64,
                                    ox as i64 + kx as i64 - pad as i64,
                                );
                                let want = if (0..5).contains(&iy) && (0..7).contains(&ix) {
                                    x[((bi * 5 + iy as usize) * 7 + ix as usize) * 3 + c]
                                } else {
                                    0.0
                                };
                                let got = out[((bi * ho + oy) * wo + ox) * g.col_width()
                                    + (ky * k + kx) * 3
                                    + c];
                                assert_eq!(
                                    got, want,
                                    "k={k} pad={pad} at ({bi},{oy},{ox},{ky},{kx},{c})"
                                );
                            }
                        }
                    }
                }
            }
        }
        let w = rnd(&mut rng, n_out);
        let mut dx = vec![7.0; x.len()]; // garbage: the backward must overwrite
        BE.im2col_bwd(&w, &g, &mut dx).unwrap();
        check(&format!("im2col k={k} pad={pad} dx"), &dx, |i, d| {
            dot(&fwd(&perturbed(&x, i, d)), &w)
        });
    }
}

#[test]
fn depth_to_space_places_subpixels_and_its_backward_matches_finite_differences() {
    let mut rng = Rng::new(22);
    let (b, h, w, c) = (2, 3, 5, 3);
    for r in [2, 3] {
        let n = b * h * w * r * r * c;
        let x = rnd(&mut rng, n);
        let fwd = |x: &T| {
            let mut o = vec![0.0; n];
            BE.depth_to_space(x, b, h, w, c, r, &mut o).unwrap();
            o
        };
        let out = fwd(&x);
        // out pixel (b, y·r+dy, x·r+dx, ch) = x[b, y, x, (dy·r+dx)·C + ch]
        let (bi, y, xx, dy, dxx, ch) = (1, 2, 3, r - 1, 1, 2);
        assert_eq!(
            out[((bi * h * r + y * r + dy) * w * r + xx * r + dxx) * c + ch],
            x[((bi * h + y) * w + xx) * r * r * c + (dy * r + dxx) * c + ch]
        );
        let mut sorted_in = x.clone();
        let mut sorted_out = out.clone();
        sorted_in.sort_by(f64::total_cmp);
        sorted_out.sort_by(f64::total_cmp);
        assert_eq!(sorted_in, sorted_out, "depth_to_space is a permutation");
        let wt = rnd(&mut rng, n);
        let mut dx = vec![0.0; n];
        BE.depth_to_space_bwd(&wt, b, h, w, c, r, &mut dx).unwrap();
        check(&format!("depth_to_space r={r} dx"), &dx, |i, d| {
            dot(&fwd(&perturbed(&x, i, d)), &wt)
        });
    }
}

/// PyTorch's align_corners=False rule written out per output pixel, for comparison.
#[allow(clippy::too_many_arguments)]
fn resize_reference(x: &[f64], b: usize, h: usize, w: usize, c: usize, ho: usize, wo: usize) -> T {
    let src = |d: usize, n_in: usize, n_out: usize| {
        let s = (d as f64 + 0.5) * (n_in as f64 / n_out as f64) - 0.5;
        let s = if s < 0.0 { 0.0 } else { s };
        let i0 = s as usize;
        let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
        (i0, i1, s - i0 as f64)
    };
    let mut out = vec![0.0; b * ho * wo * c];
    for bi in 0..b {
        for oy in 0..ho {
            let (y0, y1, ly) = src(oy, h, ho);
            for ox in 0..wo {
                let (x0, x1, lx) = src(ox, w, wo);
                for ch in 0..c {
                    let at = |y: usize, xx: usize| x[((bi * h + y) * w + xx) * c + ch];
                    out[((bi * ho + oy) * wo + ox) * c + ch] = (1.0 - ly)
                        * ((1.0 - lx) * at(y0, x0) + lx * at(y0, x1))
                        + ly * ((1.0 - lx) * at(y1, x0) + lx * at(y1, x1));
                }
            }
        }
    }
    out
}

#[test]
fn resize_bilinear_follows_pytorch_align_corners_false() {
    // 1-D rows worked by hand from PyTorch's rule (src = (d+½)·in/out − ½, clamped at 0):
    // 2→4: [a, ¾a+¼b, ¼a+¾b, b];  4→2: [(x0+x1)/2, (x2+x3)/2];
    // 3→5 (scale 0.6): src = 0 (clamped), 0.4, 1.0, 1.6, 2.2 → last neighbour clamped
    let row = |x: &[f64], wo: usize| {
        let mut o = vec![0.0; wo];
        BE.resize_bilinear(&x.to_vec(), 1, 1, x.len(), 1, 1, wo, &mut o)
            .unwrap();
        o
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
    assert!(close(&row(&[1.0, 5.0], 4), &[1.0, 2.0, 4.0, 5.0]));
    assert!(close(&row(&[1.0, 3.0, 10.0, 20.0], 2), &[2.0, 15.0]));
    assert!(close(
        &row(&[1.0, 2.0, 4.0], 5),
        &[1.0, 0.6 + 0.8, 2.0, 0.8 + 2.4, 4.0]
    ));
    // 2-D, odd sizes, up and down, against the per-pixel reference
    let mut rng = Rng::new(23);
    let (b, h, w, c) = (2, 5, 7, 3);
    let x = rnd(&mut rng, b * h * w * c);
    for (ho, wo) in [(9, 4), (3, 11), (5, 7), (1, 1)] {
        let mut o = vec![0.0; b * ho * wo * c];
        BE.resize_bilinear(&x, b, h, w, c, ho, wo, &mut o).unwrap();
        let want = resize_reference(&x, b, h, w, c, ho, wo);
        assert!(close(&o, &want), "resize to {ho}x{wo}");
        if (ho, wo) == (h, w) {
            assert!(close(&o, &x), "same size is the identity");
        }
    }
}

#[test]
fn resize_bilinear_backward_matches_finite_differences() {
    let mut rng = Rng::new(24);
    let (b, h, w, c) = (2, 5, 7, 3);
    let x = rnd(&mut rng, b * h * w * c);
    for (ho, wo) in [(9, 4), (3, 13)] {
        let n_out = b * ho * wo * c;
        let fwd = |x: &T| {
            let mut o = vec![0.0; n_out];
            BE.resize_bilinear(x, b, h, w, c, ho, wo, &mut o).unwrap();
            o
        };
        let wt = rnd(&mut rng, n_out);
        let mut dx = vec![3.0; x.len()];
        BE.resize_bilinear_bwd(&wt, b, h, w, c, ho, wo, &mut dx)
            .unwrap();
        check(&format!("resize {ho}x{wo} dx"), &dx, |i, d| {
            dot(&fwd(&perturbed(&x, i, d)), &wt)
        });
    }
}

#[test]
fn mul_rows_and_its_backward_match_finite_differences() {
    let mut rng = Rng::new(25);
    let (n, c) = (7, 5);
    let x = rnd(&mut rng, n * c);
    let g = rnd(&mut rng, n);
    let fwd = |x: &T, g: &T| {
        let mut o = vec![0.0; n * c];
        BE.mul_rows(x, g, c, &mut o).unwrap();
        o
    };
    assert_eq!(fwd(&x, &g)[3 * c + 2], x[3 * c + 2] * g[3]);
    let wt = rnd(&mut rng, n * c);
    let (mut dx, mut dg) = (vec![1.0; n * c], vec![1.0; n]);
    BE.mul_rows_bwd(&x, &g, &wt, c, &mut dx, &mut dg).unwrap();
    check("mul_rows dx", &dx, |i, d| {
        dot(&fwd(&perturbed(&x, i, d), &g), &wt)
    });
    check("mul_rows dg", &dg, |i, d| {
        dot(&fwd(&x, &perturbed(&g, i, d)), &wt)
    });
}

#[test]
fn sigmoid_activation_value_and_backward() {
    let mut o = vec![0.0f64; 3];
    BE.act_fwd(Act::Sigmoid, &vec![0.0, 2.0, -2.0], &mut o)
        .unwrap();
    let s2 = 1.0 / (1.0 + (-2.0f64).exp());
    assert_eq!(o[0], 0.5);
    assert!((o[1] - s2).abs() < 1e-15 && (o[2] - (1.0 - s2)).abs() < 1e-15);
    let mut rng = Rng::new(26);
    let x = rnd(&mut rng, 11);
    let wt = rnd(&mut rng, 11);
    let fwd = |x: &T| {
        let mut o = vec![0.0; 11];
        BE.act_fwd(Act::Sigmoid, x, &mut o).unwrap();
        dot(&o, &wt)
    };
    let mut dx = vec![0.0; 11];
    BE.act_bwd(Act::Sigmoid, &x, &wt, &mut dx).unwrap();
    check("sigmoid dx", &dx, |i, d| fwd(&perturbed(&x, i, d)));
}

#[test]
fn mask_loss_matches_hand_worked_two_pixel_mask() {
    // logits [0, 2], target [1, 0]:
    // bce  = ((0 − 0 + ln 2) + (2 − 0 + ln(1 + e⁻²)))/2 = 1.410037595801459
    // σ = [0.5, 0.880797…]; num = 2·0.5/1000 + 1e-6 = 0.001001,
    // den = 1.380797…/1000 + 1/1000 + 1e-6; dice = 1 − num/den = 0.5797291006630014
    let l = BE
        .mask_loss_fwd(&vec![0.0f64, 2.0], &vec![1.0, 0.0], 1, 2)
        .unwrap()
        .losses;
    assert_eq!(l.len(), 1);
    assert!(
        (l[0].0 - 1.410_037_595_801_459).abs() < 1e-14,
        "bce {}",
        l[0].0
    );
    assert!(
        (l[0].1 - 0.579_729_100_663_001_4).abs() < 1e-13,
        "dice {}",
        l[0].1
    );
    // a perfect, confident prediction: both losses near 0
    let l = BE
        .mask_loss_fwd(&vec![30.0f64, -30.0, 30.0], &vec![1.0, 0.0, 1.0], 1, 3)
        .unwrap()
        .losses;
    assert!(l[0].0 < 1e-12 && l[0].1 < 1e-6, "{:?}", l[0]);
    // huge logits stay finite (the stable form of BCE)
    let l = BE
        .mask_loss_fwd(&vec![1e4f64, -1e4], &vec![0.0, 1.0], 1, 2)
        .unwrap()
        .losses;
    assert!((l[0].0 - 1e4).abs() < 1e-9 && l[0].1.is_finite());
}

#[test]
fn mask_loss_backward_matches_finite_differences() {
    let mut rng = Rng::new(27);
    let (m, p) = (3, 7);
    let logits = rnd(&mut rng, m * p);
    // binary targets, one soft value, and one empty mask (Dice's eps matters there)
    let mut target: T = (0..m * p)
        .map(|i| ((i * 5) % 3 == 0) as u8 as f64)
        .collect();
    target[4] = 0.3;
    target[2 * p..].iter_mut().for_each(|t| *t = 0.0);
    let (wb, wd) = (0.7, 1.3);
    let loss = |x: &T| -> f64 {
        BE.mask_loss_fwd(x, &target, m, p)
            .unwrap()
            .losses
            .iter()
            .map(|(b, d)| wb * b + wd * d)
            .sum()
    };
    // the backward reads the forward's sums of the unperturbed logits
    let sums = BE.mask_loss_fwd(&logits, &target, m, p).unwrap().sums;
    assert_eq!(sums.len(), 4 * m);
    let mut dl = vec![9.0; m * p];
    BE.mask_loss_bwd(&logits, &target, &sums, m, p, wb, wd, &mut dl)
        .unwrap();
    check("mask loss dlogits", &dl, |i, d| {
        loss(&perturbed(&logits, i, d))
    });
    // each term alone: Dice only, BCE only
    for (wb, wd) in [(0.0, 1.0), (1.0, 0.0)] {
        let loss = |x: &T| -> f64 {
            BE.mask_loss_fwd(x, &target, m, p)
                .unwrap()
                .losses
                .iter()
                .map(|(b, d)| wb * b + wd * d)
                .sum()
        };
        BE.mask_loss_bwd(&logits, &target, &sums, m, p, wb, wd, &mut dl)
            .unwrap();
        check(&format!("mask loss ({wb},{wd})"), &dl, |i, d| {
            loss(&perturbed(&logits, i, d))
        });
    }
}

#[test]
fn image_ops_reject_bad_sizes() {
    let x = vec![0.0f64; 2 * 5 * 7 * 3];
    let g = Conv2dGeom {
        b: 2,
        h: 5,
        w: 7,
        c: 3,
        k: 3,
        pad: 1,
    };
    let n_col = 2 * 5 * 7 * 27;
    assert!(BE.im2col(&x, &g, &mut vec![0.0; n_col - 1]).is_err());
    assert!(BE
        .im2col(&x[1..].to_vec(), &g, &mut vec![0.0; n_col])
        .is_err());
    assert!(BE
        .im2col_bwd(&vec![0.0; n_col], &g, &mut vec![0.0; 7])
        .is_err());
    let too_big = Conv2dGeom { k: 8, pad: 0, ..g };
    assert!(too_big.out_hw().is_err());
    assert!(BE.im2col(&x, &too_big, &mut vec![]).is_err());
    assert!(Conv2dGeom { k: 0, ..g }.out_hw().is_err());
    let mut o = vec![0.0; x.len()];
    assert!(BE.depth_to_space(&x, 2, 5, 7, 3, 0, &mut o).is_err());
    assert!(BE.depth_to_space(&x, 2, 5, 7, 1, 2, &mut o).is_err());
    assert!(BE.depth_to_space_bwd(&x, 2, 5, 7, 1, 2, &mut o).is_err());
    assert!(BE
        .resize_bilinear(&x, 2, 5, 7, 3, 0, 4, &mut vec![])
        .is_err());
    assert!(BE
        .resize_bilinear(&x, 2, 5, 7, 3, 2, 2, &mut vec![0.0; 23])
        .is_err());
    assert!(BE
        .resize_bilinear_bwd(&vec![0.0; 24], 2, 5, 7, 3, 2, 2, &mut vec![0.0; 5])
        .is_err());
    assert!(BE.mul_rows(&x, &vec![1.0; 4], 3, &mut o).is_err());
    let (mut dx, mut dg) = (vec![0.0; 6], vec![0.0; 3]);
    assert!(BE
        .mul_rows_bwd(
            &vec![0.0; 6],
            &vec![0.0; 2],
            &vec![0.0; 6],
            3,
            &mut dx,
            &mut dg
        )
        .is_err());
    assert!(BE
        .mask_loss_fwd(&vec![0.0; 6], &vec![0.0; 5], 2, 3)
        .is_err());
    assert!(BE.mask_loss_fwd(&Vec::<f64>::new(), &vec![], 2, 0).is_err());
    assert!(BE
        .mask_loss_bwd(
            &vec![0.0; 6],
            &vec![0.0; 6],
            &vec![0.0; 8],
            2,
            3,
            1.0,
            1.0,
            &mut vec![0.0; 5]
        )
        .is_err());
    // sums of another mask count
    assert!(BE
        .mask_loss_bwd(
            &vec![0.0; 6],
            &vec![0.0; 6],
            &vec![0.0; 4],
            2,
            3,
            1.0,
            1.0,
            &mut vec![0.0; 6]
        )
        .is_err());
}
