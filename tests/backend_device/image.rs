//! The pixel decoder's image ops, forward and backward, and the mask losses.
use super::*;

/// A device buffer of n NaNs: an op that must overwrite its output and leaves any
/// element unwritten fails `close`.
fn nans(d: &DeviceBackend, n: usize) -> popen::kernels::DeviceBuf<f32> {
    d.from_slice(&vec![f32::NAN; n])
}

#[test]
fn image_ops_match_cpu_forward_and_backward_without_host_copies() {
    use popen::backend::Conv2dGeom;
    for d in backends() {
        let mut r = Philox::new(12);
        let mut copies = 0u64;
        // im2col: padded 3×3, unpadded 2×2, and padding wider than the kernel's reach;
        // channels by float4 (C = 4, 8), more channel units than a block row has threads
        // (C = 261 by floats, 1028 by float4s), more pixels in a row than a block has rows
        for (b, h, w, c, k, pad) in [
            (2, 5, 7, 3, 3, 1),
            (1, 6, 4, 5, 2, 0),
            (2, 3, 5, 2, 3, 2),
            (2, 4, 6, 4, 3, 1),
            (1, 3, 70, 8, 3, 1),
            (1, 2, 3, 261, 2, 1),
            (1, 2, 2, 1028, 2, 0),
        ] {
            let g = Conv2dGeom { b, h, w, c, k, pad };
            let (ho, wo) = g.out_hw().unwrap();
            let (nx, no) = (b * h * w * c, b * ho * wo * g.col_width());
            let (x, xd) = both(&d, &rnd(&mut r, nx, 2.0));
            let (dout, doutd) = both(&d, &rnd(&mut r, no, 1.0));
            let before = d.device().copies();
            let (mut o, mut od) = (vec![0.0; no], nans(&d, no));
            let (mut dx, mut dxd) = (vec![0.0; nx], nans(&d, nx));
            Cpu.im2col(&x, &g, &mut o).unwrap();
            d.im2col(&xd, &g, &mut od).unwrap();
            Cpu.im2col_bwd(&dout, &g, &mut dx).unwrap();
            d.im2col_bwd(&doutd, &g, &mut dxd).unwrap();
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh - 2; // the two NaN uploads
            close(&format!("im2col {g:?}"), &d.to_vec(&od), &o);
            close(&format!("im2col_bwd {g:?}"), &d.to_vec(&dxd), &dx);
            assert!(d.im2col(&xd, &g, &mut nans(&d, no + 1)).is_err());
        }
        // depth-to-space and its inverse: runs of r·C = 6 floats, 12 (float4s), and more
        // input pixels in a row than a block has rows (runs of 3 floats, 85 per block)
        for (b, h, w, c, rr) in [(2, 3, 5, 3, 2), (1, 2, 3, 4, 3), (1, 2, 100, 3, 1)] {
            let n = b * h * w * rr * rr * c;
            let (x, xd) = both(&d, &rnd(&mut r, n, 2.0));
            let (mut o, mut od) = (vec![0.0; n], nans(&d, n));
            let (mut dx, mut dxd) = (vec![0.0; n], nans(&d, n));
            let before = d.device().copies();
            Cpu.depth_to_space(&x, b, h, w, c, rr, &mut o).unwrap();
            d.depth_to_space(&xd, b, h, w, c, rr, &mut od).unwrap();
            Cpu.depth_to_space_bwd(&x, b, h, w, c, rr, &mut dx).unwrap();
            d.depth_to_space_bwd(&xd, b, h, w, c, rr, &mut dxd).unwrap();
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh;
            close("depth_to_space", &d.to_vec(&od), &o);
            close("depth_to_space_bwd", &d.to_vec(&dxd), &dx);
            assert!(d.depth_to_space(&xd, b, h, w, c, 0, &mut od).is_err());
        }
        // bilinear resize: up, down, by odd factors, from one pixel, and the same size;
        // masks (C = 1) wider than a block (256 columns) and taller than a forward band
        // (16 rows) or several backward bands (4 rows), up and down; channels by float4
        for (h, w, ho, wo, c) in [
            (3, 5, 13, 11, 3),
            (9, 14, 4, 5, 3),
            (1, 1, 5, 3, 3),
            (4, 4, 4, 4, 3),
            (7, 3, 2, 9, 3),
            (10, 70, 37, 300, 1),
            (37, 300, 10, 70, 1),
            (6, 9, 20, 5, 4),
            (13, 5, 6, 7, 8),
        ] {
            let b = 2;
            let (nx, no) = (b * h * w * c, b * ho * wo * c);
            let (x, xd) = both(&d, &rnd(&mut r, nx, 2.0));
            let (dout, doutd) = both(&d, &rnd(&mut r, no, 1.0));
            let (mut o, mut od) = (vec![0.0; no], nans(&d, no));
            let (mut dx, mut dxd) = (vec![0.0; nx], nans(&d, nx));
            let before = d.device().copies();
            Cpu.resize_bilinear(&x, b, h, w, c, ho, wo, &mut o).unwrap();
            d.resize_bilinear(&xd, b, h, w, c, ho, wo, &mut od).unwrap();
            Cpu.resize_bilinear_bwd(&dout, b, h, w, c, ho, wo, &mut dx)
                .unwrap();
            d.resize_bilinear_bwd(&doutd, b, h, w, c, ho, wo, &mut dxd)
                .unwrap();
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh;
            let what = format!("{h}x{w} -> {ho}x{wo}");
            close(&format!("resize {what}"), &d.to_vec(&od), &o);
            close(&format!("resize_bwd {what}"), &d.to_vec(&dxd), &dx);
            assert!(d.resize_bilinear(&xd, b, h, w, c, 0, wo, &mut od).is_err());
        }
        // per-row scale: by floats, by float4s over more rows than a block has, and more
        // float4s in a row than a block row has threads
        for (n, c) in [(13, 37), (300, 8), (5, 1100)] {
            let (x, xd) = both(&d, &rnd(&mut r, n * c, 2.0));
            let (g, gd) = both(&d, &rnd(&mut r, n, 1.5));
            let (dout, doutd) = both(&d, &rnd(&mut r, n * c, 1.0));
            let (mut o, mut od) = (vec![0.0; n * c], nans(&d, n * c));
            let (mut dx, mut dxd) = (vec![0.0; n * c], nans(&d, n * c));
            let (mut dg, mut dgd) = (vec![0.0; n], nans(&d, n));
            let before = d.device().copies();
            Cpu.mul_rows(&x, &g, c, &mut o).unwrap();
            d.mul_rows(&xd, &gd, c, &mut od).unwrap();
            Cpu.mul_rows_bwd(&x, &g, &dout, c, &mut dx, &mut dg)
                .unwrap();
            d.mul_rows_bwd(&xd, &gd, &doutd, c, &mut dxd, &mut dgd)
                .unwrap();
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh;
            close("mul_rows", &d.to_vec(&od), &o);
            close("mul_rows_bwd dx", &d.to_vec(&dxd), &dx);
            close("mul_rows_bwd dg", &d.to_vec(&dgd), &dg);
            assert!(d.mul_rows(&xd, &gd, c + 1, &mut od).is_err());
        }
        // mask losses: more pixels than a block's threads (301: one chunk, one pixel per
        // load; 16 396: three chunks, four per load), logits of both signs and large
        // |x|, soft and hard targets, and one empty target
        for (m, p) in [(5, 301), (3, 16_396)] {
            let logits = rnd(&mut r, m * p, 8.0);
            let mut target: Vec<f32> = (0..m * p)
                .map(|i| match i % 7 {
                    0 => 0.3,
                    1..=3 => 1.0,
                    _ => 0.0,
                })
                .collect();
            target[2 * p..3 * p].iter_mut().for_each(|t| *t = 0.0);
            let (ld, td) = (d.from_slice(&logits), d.from_slice(&target));
            let mut dld = nans(&d, m * p);
            let before = d.device().copies();
            let got = d.mask_loss_fwd(&ld, &td, m, p).unwrap();
            d.mask_loss_bwd(&ld, &td, &got.sums, m, p, 2.0, 0.5, &mut dld)
                .unwrap();
            // the forward's (BCE, Dice) pairs come back: one download; the sums stay
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh - 1;
            // the reference in f64: over 16k pixels the f32 CPU twin's sequential sums
            // are themselves about 1e-5 off, the device's chunked trees closer
            let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
            let (l64, t64) = (wide(&logits), wide(&target));
            let want64 = Cpu.mask_loss_fwd(&l64, &t64, m, p).unwrap();
            let want: Vec<f32> = want64
                .losses
                .iter()
                .flat_map(|&(a, b)| [a as f32, b as f32])
                .collect();
            let mut dl64 = vec![0.0f64; m * p];
            Cpu.mask_loss_bwd(&l64, &t64, &want64.sums, m, p, 2.0, 0.5, &mut dl64)
                .unwrap();
            let sums64: Vec<f32> = want64.sums.iter().map(|&x| x as f32).collect();
            let dl: Vec<f32> = dl64.iter().map(|&x| x as f32).collect();
            let flat = |v: &[(f32, f32)]| v.iter().flat_map(|&(a, b)| [a, b]).collect::<Vec<_>>();
            close("mask_loss_fwd", &flat(&got.losses), &want);
            close("mask_loss_fwd sums", &d.to_vec(&got.sums), &sums64);
            close("mask_loss_bwd", &d.to_vec(&dld), &dl);
            assert!(d.mask_loss_fwd(&ld, &td, m, p + 1).is_err());
            assert!(d
                .mask_loss_bwd(&ld, &td, &got.sums, m, 0, 2.0, 0.5, &mut dld)
                .is_err());
            let short = d.from_slice(&vec![0.0f32; 4 * m - 1]);
            assert!(d
                .mask_loss_bwd(&ld, &td, &short, m, p, 2.0, 0.5, &mut dld)
                .is_err());
        }
        assert_eq!(copies, 0, "host↔device copies made by the image ops");
    }
}

#[test]
fn mask_loss_bce_keeps_its_digits_for_confident_logits() {
    // Logits of 9 to 16 with the sign of a hard target: each pixel's BCE is
    // log1p(e^{-|x|}), 1.1e-7 to 1.2e-4, and so is the mean.  Held to 1e-5 of itself,
    // not of a scale: a kernel that formed log(1 + e) in f32 would round 1 + e first and
    // miss by about 1e-4 of it (8e-5 with logf(1 + e) in place of the kernel's log1p;
    // the kernel's own series misses by 5e-8).
    let mut r = Philox::new(77);
    let (m, p) = (2usize, 4099usize);
    let logits: Vec<f32> = rnd(&mut r, m * p, 1.0)
        .iter()
        .map(|&u| {
            let mag = 12.5 + 3.5 * u.clamp(-1.0, 1.0);
            if u.to_bits() % 2 == 0 {
                mag
            } else {
                -mag
            }
        })
        .collect();
    let target: Vec<f32> = logits.iter().map(|&x| f32::from(x > 0.0)).collect();
    let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let want = Cpu
        .mask_loss_fwd(&wide(&logits), &wide(&target), m, p)
        .unwrap();
    for d in backends() {
        let got = d
            .mask_loss_fwd(&d.from_slice(&logits), &d.from_slice(&target), m, p)
            .unwrap();
        for k in 0..m {
            let (g, w) = (f64::from(got.losses[k].0), want.losses[k].0);
            assert!(w > 1e-7 && w < 1.3e-4, "mask {k}: reference BCE {w}");
            assert!(
                (g - w).abs() <= 1e-5 * w,
                "mask {k}: device BCE {g} vs cpu {w} (rel {:.2e})",
                (g - w).abs() / w
            );
        }
    }
}
