//! Mask metrics: CPU twins against slow references (d iterations of a literal 3 × 3
//! erosion), hand-worked Boundary IoU cases, fixtures from OpenCV + pycocotools
//! (`tools/mask_fixtures.py`), and the kernels against the twins on every test device.
use popen::kernels::mask::*;
use popen::kernels::philox::Philox;
use popen::kernels::Device;

/// One 3 × 3 erosion with pixels outside the image as background (slow reference).
fn erode3(m: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut o = vec![0u8; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut all = true;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                    let inside = yy >= 0 && xx >= 0 && yy < h as i64 && xx < w as i64;
                    if !inside || m[yy as usize * w + xx as usize] == 0 {
                        all = false;
                    }
                }
            }
            o[y * w + x] = all as u8;
        }
    }
    o
}

fn boundary_slow(m: &[u8], h: usize, w: usize, d: usize) -> Vec<u8> {
    let mut e: Vec<u8> = m.iter().map(|&v| (v != 0) as u8).collect();
    for _ in 0..d {
        e = erode3(&e, h, w);
    }
    m.iter()
        .zip(&e)
        .map(|(&a, &b)| ((a != 0) && b == 0) as u8)
        .collect()
}

/// Random blobby mask: a few rectangles and discs, values in 1..=255 for foreground.
fn random_mask(rng: &mut Philox, h: usize, w: usize) -> Vec<u8> {
    let mut m = vec![0u8; h * w];
    let shapes = 1 + rng.next_u32() as usize % 4;
    for _ in 0..shapes {
        let cy = rng.next_u32() as usize % h;
        let cx = rng.next_u32() as usize % w;
        let r = 1 + rng.next_u32() as usize % (h.max(w) / 2 + 1);
        let disc = rng.next_u32().is_multiple_of(2);
        let val = 1 + (rng.next_u32() % 255) as u8;
        for y in 0..h {
            for x in 0..w {
                let (dy, dx) = (y as i64 - cy as i64, x as i64 - cx as i64);
                let inside = if disc {
                    dy * dy + dx * dx <= (r * r) as i64
                } else {
                    dy.unsigned_abs() as usize <= r && dx.unsigned_abs() as usize <= r / 2
                };
                if inside {
                    m[y * w + x] = val;
                }
            }
        }
    }
    // salt noise so that thin structures and holes occur
    for _ in 0..(h * w / 20) {
        let i = rng.next_u32() as usize % (h * w);
        m[i] = if m[i] == 0 { 7 } else { 0 };
    }
    m
}

#[test]
fn boundary_cpu_matches_iterated_3x3_erosion() {
    let mut rng = Philox::new(11);
    for &(h, w) in &[(1, 1), (1, 9), (7, 1), (13, 17), (31, 23), (40, 5)] {
        for d in [1usize, 2, 3, 6] {
            for _ in 0..3 {
                let m = random_mask(&mut rng, h, w);
                let mut got = vec![9u8; h * w];
                boundary_cpu(&m, h, w, d, &mut got).unwrap();
                assert_eq!(got, boundary_slow(&m, h, w, d), "{h}x{w} d={d}");
            }
        }
    }
}

#[test]
fn boundary_cpu_across_word_boundaries() {
    // wider than 64 pixels and d ≥ 64: the packed erosion shifts across words
    let mut rng = Philox::new(12);
    let (h, w) = (141, 131);
    for d in [1usize, 31, 32, 33, 64, 65] {
        let m = random_mask(&mut rng, h, w);
        let mut full = vec![1u8; h * w];
        for x in 0..w {
            full[(h / 2) * w + x] = (x % 67 != 0) as u8; // a few holes on one row
        }
        for mask in [m, full, vec![1u8; h * w]] {
            let mut got = vec![9u8; h * w];
            boundary_cpu(&mask, h, w, d, &mut got).unwrap();
            assert_eq!(got, boundary_slow(&mask, h, w, d), "{h}x{w} d={d}");
        }
        // the all-foreground mask keeps an eroded core at every d here (2d+1 ≤ W)
        let mut core = vec![0u8; h * w];
        boundary_cpu(&vec![1u8; h * w], h, w, d, &mut core).unwrap();
        assert!(core.contains(&0), "d={d}");
    }
}

#[test]
fn full_mask_boundary_is_the_image_frame() {
    // Outside the image is background, so a full mask erodes from the image edge.
    let (h, w, d) = (9, 11, 2);
    let m = vec![1u8; h * w];
    let mut b = vec![0u8; h * w];
    boundary_cpu(&m, h, w, d, &mut b).unwrap();
    for y in 0..h {
        for x in 0..w {
            let frame = y < d || x < d || y >= h - d || x >= w - d;
            assert_eq!(b[y * w + x], frame as u8, "({y},{x})");
        }
    }
}

#[test]
fn boundary_width_follows_cheng() {
    assert_eq!(boundary_width(480, 640, 0.02), 16); // diagonal 800
    assert_eq!(boundary_width(3, 4, 0.02), 1); // 0.1 -> at least 1
    assert_eq!(boundary_width(30, 40, 0.05), 2); // 2.5 -> 2 (Python rounds half to even)
    assert_eq!(boundary_width(30, 40, 0.07), 4); // 3.5 -> 4
}

#[test]
fn iou_conventions() {
    assert_eq!(iou_from_counts(0, 0), 1.0);
    assert_eq!(iou_from_counts(0, 5), 0.0);
    assert_eq!(iou_from_counts(3, 4), 0.75);
    let e = vec![0u8; 35];
    assert_eq!(boundary_iou_cpu(&e, &e, 5, 7, 0.02).unwrap(), 1.0);
    let mut one = e.clone();
    one[17] = 1;
    assert_eq!(boundary_iou_cpu(&one, &e, 5, 7, 0.02).unwrap(), 0.0);
}

#[test]
fn boundary_iou_hand_worked() {
    // 8 × 8 image, d = max(1, round(0.02·√128)) = 1.
    // G: 4 × 4 square at rows 2..6, cols 2..6 → boundary = its 12-pixel ring.
    // P: the same square shifted right by one (cols 3..7) → ring of 12 pixels.
    // Ring ∩ ring: rows 2 and 5 share cols 3..5 (3 each) → 6, plus col 5 of G's
    // ring at rows 3,4 lies on P's ring? P's ring at rows 3,4 is cols 3 and 6; G's
    // is cols 2 and 5 → no.  So |∩| = 6, |∪| = 12 + 12 − 6 = 18, BIoU = 1/3.
    let (h, w) = (8, 8);
    let sq = |c0: usize| {
        let mut m = vec![0u8; h * w];
        for y in 2..6 {
            for x in c0..c0 + 4 {
                m[y * w + x] = 1;
            }
        }
        m
    };
    let (g, p) = (sq(2), sq(3));
    assert_eq!(boundary_width(h, w, 0.02), 1);
    let b = boundary_iou_cpu(&p, &g, h, w, 0.02).unwrap();
    assert!((b - 1.0 / 3.0).abs() < 1e-12, "{b}");
    // Mask IoU of the same pair: 12 / 20.
    let (i, u) = counts_cpu(&p, &g).unwrap();
    assert_eq!((i, u), (12, 20));
    // A 2 × 2 square is all boundary; against the 4 × 4 square at the same corner its
    // 4 pixels lie on the big ring only at (2,2),(2,3),(3,2): |∩| = 3,
    // |∪| = 4 + 12 − 3 = 13.
    let mut small = vec![0u8; h * w];
    for y in 2..4 {
        for x in 2..4 {
            small[y * w + x] = 1;
        }
    }
    let b = boundary_iou_cpu(&small, &g, h, w, 0.02).unwrap();
    assert!((b - 3.0 / 13.0).abs() < 1e-12, "{b}");
}

#[test]
fn pair_counts_cpu_matches_naive() {
    let mut rng = Philox::new(5);
    let (p, g, h, w) = (3, 4, 19, 23);
    let pred: Vec<u8> = (0..p).flat_map(|_| random_mask(&mut rng, h, w)).collect();
    let gt: Vec<u8> = (0..g).flat_map(|_| random_mask(&mut rng, h, w)).collect();
    let mut inter = vec![0u64; p * g];
    let mut union = vec![0u64; p * g];
    pair_counts_cpu(&pred, &gt, p, g, h, w, &mut inter, &mut union).unwrap();
    let hw = h * w;
    for i in 0..p {
        for j in 0..g {
            let a = &pred[i * hw..(i + 1) * hw];
            let b = &gt[j * hw..(j + 1) * hw];
            let ni = a
                .iter()
                .zip(b)
                .filter(|(x, y)| **x != 0 && **y != 0)
                .count() as u64;
            let nu = a
                .iter()
                .zip(b)
                .filter(|(x, y)| **x != 0 || **y != 0)
                .count() as u64;
            assert_eq!((inter[i * g + j], union[i * g + j]), (ni, nu));
        }
    }
    // bad sizes are errors, not panics
    assert!(pair_counts_cpu(&pred[1..], &gt, p, g, h, w, &mut inter, &mut union).is_err());
    assert!(pair_counts_cpu(&pred, &gt, p, g, h, w, &mut inter[1..], &mut union).is_err());
}

#[test]
fn pair_counts_matches_cpu() {
    let mut rng = Philox::new(21);
    // HW = 19·23 and 20·50 (byte loads), 12·20 (16-byte loads, one partial word),
    // 40·48 (16-byte loads, two chunks of 1024 pixels, 2 × 2 tiles of 64 × 16 pairs),
    // 28·36 (half of the last word past the mask), 66 × 17 pairs by byte loads; 600·1024
    // and 613·1001 (16-byte and byte loads) have more 1024-pixel steps than the
    // emulator's wave of blocks (Device::resident_blocks: 528), so each block walks
    // two steps (and packs them into both of its double-buffered bit tiles).  Both part
    // kernels, PairPart::Loads5 (the default) and Loads3.
    for &(p, g, h, w) in &[
        (3usize, 5usize, 19usize, 23usize),
        (4, 2, 12, 20),
        (1, 1, 1, 3),
        (70, 19, 40, 48),
        (5, 3, 28, 36),
        (66, 17, 20, 50),
        (2, 3, 600, 1024),
        (1, 1, 613, 1001),
    ] {
        let pred: Vec<u8> = (0..p).flat_map(|_| random_mask(&mut rng, h, w)).collect();
        let gt: Vec<u8> = (0..g).flat_map(|_| random_mask(&mut rng, h, w)).collect();
        let mut wi = vec![0u64; p * g];
        let mut wu = vec![0u64; p * g];
        pair_counts_cpu(&pred, &gt, p, g, h, w, &mut wi, &mut wu).unwrap();
        for dev in Device::test_devices() {
            let (pd, gd) = (dev.upload(&pred).unwrap(), dev.upload(&gt).unwrap());
            let mut i = dev.zeros::<u64>(p * g).unwrap();
            let mut u = dev.zeros::<u64>(p * g).unwrap();
            pair_counts(&dev, &pd, &gd, p, g, h, w, &mut i, &mut u).unwrap();
            assert_eq!(dev.download(&i).unwrap(), wi, "{dev:?} {p}x{g} {h}x{w}");
            assert_eq!(dev.download(&u).unwrap(), wu, "{dev:?} {p}x{g} {h}x{w}");
            // outputs that start as u64::MAX: an entry the kernel leaves unwritten shows
            let mut i = dev.upload(&vec![u64::MAX; p * g]).unwrap();
            let mut u = dev.upload(&vec![u64::MAX; p * g]).unwrap();
            pair_counts_with(&dev, PairPart::Loads3, &pd, &gd, p, g, h, w, &mut i, &mut u).unwrap();
            assert_eq!(
                dev.download(&i).unwrap(),
                wi,
                "Loads3 {dev:?} {p}x{g} {h}x{w}"
            );
            assert_eq!(
                dev.download(&u).unwrap(),
                wu,
                "Loads3 {dev:?} {p}x{g} {h}x{w}"
            );
            // wrong sizes are errors
            assert!(pair_counts(&dev, &pd, &gd, p, g, h, w + 1, &mut i, &mut u).is_err());
        }
    }
}

#[test]
fn boundary_matches_cpu() {
    let mut rng = Philox::new(8);
    let (n, h, w) = (3, 21, 17);
    let masks: Vec<u8> = (0..n).flat_map(|_| random_mask(&mut rng, h, w)).collect();
    for d in [1usize, 2, 5, 11] {
        let mut want = vec![0u8; n * h * w];
        for k in 0..n {
            let r = k * h * w..(k + 1) * h * w;
            boundary_cpu(&masks[r.clone()], h, w, d, &mut want[r]).unwrap();
        }
        for dev in Device::test_devices() {
            let md = dev.upload(&masks).unwrap();
            let mut out = dev.zeros::<u8>(n * h * w).unwrap();
            boundary(&dev, &md, n, h, w, d, &mut out).unwrap();
            assert_eq!(dev.download(&out).unwrap(), want, "{dev:?} d={d}");
            assert!(boundary(&dev, &md, n, h, w, 0, &mut out).is_err());
        }
    }
}

#[test]
fn boundary_pair_counts_matches_cpu() {
    let mut rng = Philox::new(99);
    let (p, g, h, w) = (2, 3, 37, 29);
    let pred: Vec<u8> = (0..p).flat_map(|_| random_mask(&mut rng, h, w)).collect();
    let gt: Vec<u8> = (0..g).flat_map(|_| random_mask(&mut rng, h, w)).collect();
    let hw = h * w;
    for dev in Device::test_devices() {
        let (pd, gd) = (dev.upload(&pred).unwrap(), dev.upload(&gt).unwrap());
        let mut i = dev.zeros::<u64>(p * g).unwrap();
        let mut u = dev.zeros::<u64>(p * g).unwrap();
        boundary_pair_counts(&dev, &pd, &gd, p, g, h, w, 0.05, &mut i, &mut u).unwrap();
        let (i, u) = (dev.download(&i).unwrap(), dev.download(&u).unwrap());
        for a in 0..p {
            for b in 0..g {
                let want = boundary_counts_cpu(
                    &pred[a * hw..(a + 1) * hw],
                    &gt[b * hw..(b + 1) * hw],
                    h,
                    w,
                    0.05,
                )
                .unwrap();
                assert_eq!((i[a * g + b], u[a * g + b]), want, "{dev:?} ({a},{b})");
            }
        }
    }
}

fn soft_case(b: usize, n: usize, seed: u64) -> (Vec<f64>, Vec<u8>) {
    let mut r = Philox::new(seed);
    let p: Vec<f64> = (0..b * n).map(|_| r.next_f32() as f64).collect();
    let t: Vec<u8> = (0..b * n)
        .map(|_| r.next_u32().is_multiple_of(3) as u8)
        .collect();
    (p, t)
}

#[test]
fn soft_iou_matches_cpu() {
    // 1001 pixels: one chunk, one pixel per load; 16_396: three chunks of the device
    // forward, four pixels per load
    for n in [1001, 16_396] {
        soft_iou_matches_cpu_at(3, n);
    }
}

fn soft_iou_matches_cpu_at(b: usize, n: usize) {
    let (p64, t) = soft_case(b, n, 4);
    let p: Vec<f32> = p64.iter().map(|&v| v as f32).collect();
    let mut want = vec![0f32; b];
    let mut sums = vec![0f32; 3 * b];
    soft_iou_fwd_cpu(&p, &t, b, n, &mut want).unwrap();
    soft_iou_sums_cpu(&p, &t, b, n, &mut sums).unwrap();
    let diou = [1.0f32, -0.5, 2.0];
    let mut want_d = vec![0f32; b * n];
    soft_iou_bwd_cpu(&t, &sums, &diou, b, n, &mut want_d).unwrap();
    for dev in Device::test_devices() {
        let (pd, td) = (dev.upload(&p).unwrap(), dev.upload(&t).unwrap());
        let mut iou = dev.zeros::<f32>(b).unwrap();
        let mut s = dev.zeros::<f32>(3 * b).unwrap();
        soft_iou_fwd(&dev, &pd, &td, b, n, &mut iou, &mut s).unwrap();
        let got = dev.download(&iou).unwrap();
        for k in 0..b {
            assert!(
                (got[k] - want[k]).abs() <= 1e-5 * want[k].abs(),
                "{dev:?} {k}"
            );
        }
        let dd = dev.upload(&diou).unwrap();
        let mut dp = dev.zeros::<f32>(b * n).unwrap();
        soft_iou_bwd(&dev, &td, &s, &dd, b, n, &mut dp).unwrap();
        let got = dev.download(&dp).unwrap();
        for (j, (g, w)) in got.iter().zip(&want_d).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1e-6),
                "{dev:?} {j}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn soft_iou_backward_matches_finite_differences() {
    // f64, tiny odd size, one empty target to exercise the ε path
    let (b, n) = (2, 7);
    let (mut p, mut t) = soft_case(b, n, 17);
    for v in &mut t[n..] {
        *v = 0;
    }
    let diou = [0.7f64, -1.3];
    let f = |p: &[f64]| {
        let mut iou = vec![0f64; b];
        soft_iou_fwd_cpu(p, &t, b, n, &mut iou).unwrap();
        iou.iter().zip(&diou).map(|(a, b)| a * b).sum::<f64>()
    };
    let mut sums = vec![0f64; 3 * b];
    soft_iou_sums_cpu(&p, &t, b, n, &mut sums).unwrap();
    let mut g = vec![0f64; b * n];
    soft_iou_bwd_cpu(&t, &sums, &diou, b, n, &mut g).unwrap();
    let h = 1e-6;
    for j in 0..b * n {
        let v = p[j];
        p[j] = v + h;
        let fp = f(&p);
        p[j] = v - h;
        let fm = f(&p);
        p[j] = v;
        let fd = (fp - fm) / (2.0 * h);
        assert!(
            (fd - g[j]).abs() < 1e-6 * (1.0 + fd.abs()),
            "{j}: {fd} vs {}",
            g[j]
        );
    }
    // gradient arrives: raising p on target pixels raises IoU
    assert!(g[..n].iter().zip(&t[..n]).any(|(g, &t)| t == 1 && *g > 0.0));
}

/// Unpack `np.packbits` hex (row-major, MSB first) into `n` 0/1 pixels.
fn unhex(s: &str, n: usize) -> Vec<u8> {
    let bytes: Vec<u8> = (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    (0..n).map(|i| (bytes[i / 8] >> (7 - i % 8)) & 1).collect()
}

#[test]
fn fixtures_from_opencv_and_pycocotools() {
    let text = include_str!("fixtures/mask/cases.json");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for (k, c) in cases.iter().enumerate() {
        let u = |f: &str| c[f].as_u64().unwrap() as usize;
        let (h, w, d) = (u("h"), u("w"), u("d"));
        let ratio = c["dilation_ratio"].as_f64().unwrap();
        let (gt, pred) = (
            unhex(c["gt"].as_str().unwrap(), h * w),
            unhex(c["pred"].as_str().unwrap(), h * w),
        );
        assert_eq!(boundary_width(h, w, ratio), d, "case {k}");
        let mut b = vec![0u8; h * w];
        boundary_cpu(&gt, h, w, d, &mut b).unwrap();
        assert_eq!(
            b,
            unhex(c["gt_boundary"].as_str().unwrap(), h * w),
            "case {k} gt boundary"
        );
        boundary_cpu(&pred, h, w, d, &mut b).unwrap();
        assert_eq!(
            b,
            unhex(c["pred_boundary"].as_str().unwrap(), h * w),
            "case {k} pred boundary"
        );
        let (i, un) = counts_cpu(&pred, &gt).unwrap();
        assert_eq!(
            (i as usize, un as usize),
            (u("intersection"), u("union")),
            "case {k}"
        );
        let iou = iou_from_counts(i, un);
        assert!(
            (iou - c["iou"].as_f64().unwrap()).abs() < 1e-12,
            "case {k} iou"
        );
        let biou = boundary_iou_cpu(&pred, &gt, h, w, ratio).unwrap();
        assert!(
            (biou - c["boundary_iou"].as_f64().unwrap()).abs() < 1e-12,
            "case {k} biou {biou}"
        );
        // and the device agrees on every fixture
        for dev in Device::test_devices() {
            let (pd, gd) = (dev.upload(&pred).unwrap(), dev.upload(&gt).unwrap());
            let mut di = dev.zeros::<u64>(1).unwrap();
            let mut du = dev.zeros::<u64>(1).unwrap();
            boundary_pair_counts(&dev, &pd, &gd, 1, 1, h, w, ratio, &mut di, &mut du).unwrap();
            let (bi, bu) = (dev.download(&di).unwrap()[0], dev.download(&du).unwrap()[0]);
            assert!(
                (iou_from_counts(bi, bu) - biou).abs() < 1e-12,
                "{dev:?} case {k}"
            );
        }
    }
}
