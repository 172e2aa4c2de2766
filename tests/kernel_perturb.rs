//! Philox4x32-10 against Random123's known answers, the kernel's stream and normals
//! against the CPU twin, and the perturbation kernel against `perturb_cpu`.
use popen::kernels::perturb::*;
use popen::kernels::philox::{box_muller, philox4x32_10, Philox};
use popen::kernels::Device;

/// Random123 `kat_vectors`, philox4x32_10: (counter, key, expected).
const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0; 4],
        [0; 2],
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
    ),
    (
        [0xffffffff; 4],
        [0xffffffff; 2],
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
    ),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

#[test]
fn philox_known_answers_cpu() {
    for (ctr, key, want) in KAT {
        assert_eq!(philox4x32_10(ctr, key), want, "ctr {ctr:x?} key {key:x?}");
    }
}

#[test]
fn philox_kernel_stream_is_bit_identical() {
    for dev in Device::test_devices() {
        // counter word 0 is the element index; check KAT 1 (i = 0, rest 0) and a run
        let n = 1001;
        let mut out = dev.zeros::<u32>(4 * n).unwrap();
        philox_fill(&dev, &mut out, [7, 8, 9], [0xdead, 0xbeef]).unwrap();
        let got = dev.download(&out).unwrap();
        for i in 0..n {
            let want = philox4x32_10([i as u32, 7, 8, 9], [0xdead, 0xbeef]);
            assert_eq!(&got[4 * i..4 * i + 4], &want, "{dev:?} i={i}");
        }
        let mut one = dev.zeros::<u32>(4).unwrap();
        philox_fill(&dev, &mut one, [0, 0, 0], [0, 0]).unwrap();
        assert_eq!(dev.download(&one).unwrap(), KAT[0].2.to_vec(), "{dev:?}");
    }
}

#[test]
fn box_muller_kernel_matches_cpu_and_is_normal() {
    for dev in Device::test_devices() {
        let n = 4099;
        let mut out = dev.zeros::<f32>(4 * n).unwrap();
        philox_normal(&dev, &mut out, [1, 2, 3], [42, 0]).unwrap();
        let got = dev.download(&out).unwrap();
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for i in 0..n {
            let q = philox4x32_10([i as u32, 1, 2, 3], [42, 0]);
            let (a, b) = box_muller(q[0], q[1]);
            let (c, d) = box_muller(q[2], q[3]);
            for (j, want) in [a, b, c, d].into_iter().enumerate() {
                let g = got[4 * i + j];
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{dev:?} i={i} j={j}: {g} vs {want}"
                );
                s += want as f64;
                s2 += (want as f64).powi(2);
            }
        }
        // 16396 normals: mean within 4 standard errors of 0, variance within 5% of 1
        let m = s / (4 * n) as f64;
        let v = s2 / (4 * n) as f64 - m * m;
        assert!(m.abs() < 4.0 / ((4 * n) as f64).sqrt(), "mean {m}");
        assert!((v - 1.0).abs() < 0.05, "variance {v}");
    }
}

fn random_images(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Philox::new(seed);
    (0..n).map(|_| r.next_f32() * 2.0 - 1.0).collect()
}

#[test]
fn perturb_matches_cpu() {
    // odd sizes: E = 3·13·17 = 663 (not a multiple of 4: the scalar tail path), and
    // E = 1·12·9 = 108 (the float4 path); groups straddle rows and channels.
    for &(b, c, h, w) in &[(2usize, 3usize, 13usize, 17usize), (3, 1, 12, 9)] {
        let cfg = PerturbCfg {
            np: 5,
            sigma: 0.7,
            rect_h: (2, h),
            rect_w: (1, w - 2),
            seed: 0x1234_5678_9abc,
            first_copy: 3,
        };
        let e = c * h * w;
        let img = random_images(b * e, 9);
        let mut want = vec![0f32; cfg.np * b * e];
        let mut rects = vec![Rect::default(); cfg.np * b];
        perturb_cpu(&img, b, c, h, w, &cfg, &mut want, &mut rects).unwrap();
        // outside the rectangle the copy is the image, inside it differs
        for kb in 0..cfg.np * b {
            let r = rects[kb];
            assert!(r.y0 + r.h <= h && r.x0 + r.w <= w && r.h >= 2 && r.w >= 1);
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let i = (ch * h + y) * w + x;
                        let (o, s) = (want[kb * e + i], img[(kb % b) * e + i]);
                        if r.contains(y, x) {
                            assert_ne!(o, s);
                        } else {
                            assert_eq!(o, s);
                        }
                    }
                }
            }
        }
        for dev in Device::test_devices() {
            let imgd = dev.upload(&img).unwrap();
            let mut out = dev.zeros::<f32>(want.len()).unwrap();
            let mut rd = dev.zeros::<i32>(cfg.np * b * 4).unwrap();
            perturb(&dev, &imgd, b, c, h, w, &cfg, &mut out, &mut rd).unwrap();
            assert_eq!(rects_from_device(&dev, &rd).unwrap(), rects, "{dev:?}");
            let got = dev.download(&out).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{dev:?} {i}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn perturb_is_deterministic_and_copies_differ() {
    let (b, c, h, w) = (1, 1, 8, 8);
    let img = vec![0f32; 64];
    let cfg = PerturbCfg {
        np: 4,
        sigma: 1.0,
        rect_h: (8, 8),
        rect_w: (8, 8),
        seed: 1,
        first_copy: 0,
    };
    let run = |cfg: &PerturbCfg| {
        let mut o = vec![0f32; cfg.np * 64];
        let mut r = vec![Rect::default(); cfg.np];
        perturb_cpu(&img, b, c, h, w, cfg, &mut o, &mut r).unwrap();
        o
    };
    let a = run(&cfg);
    assert_eq!(a, run(&cfg));
    assert_ne!(a[..64], a[64..128]);
    // first_copy shifts the counter space: copy 1 of (first 0) = copy 0 of (first 1)
    let s = run(&PerturbCfg {
        first_copy: 1,
        ..cfg
    });
    assert_eq!(a[64..128], s[..64]);
    // another seed, other noise
    assert_ne!(a, run(&PerturbCfg { seed: 2, ..cfg }));
}

#[test]
fn perturb_rejects_bad_input() {
    let dev = Device::emulator();
    let img = dev.upload(&[0f32; 2 * 3 * 5]).unwrap();
    let mut out = dev.zeros::<f32>(4 * 30).unwrap();
    let mut r = dev.zeros::<i32>(4 * 2 * 4).unwrap();
    let good = PerturbCfg {
        np: 4,
        sigma: 1.0,
        rect_h: (1, 3),
        rect_w: (1, 5),
        seed: 0,
        first_copy: 0,
    };
    perturb(&dev, &img, 2, 1, 3, 5, &good, &mut out, &mut r).unwrap();
    for bad in [
        PerturbCfg {
            rect_h: (0, 3),
            ..good
        },
        PerturbCfg {
            rect_h: (2, 4),
            ..good
        },
        PerturbCfg {
            rect_w: (3, 2),
            ..good
        },
        PerturbCfg {
            sigma: f32::NAN,
            ..good
        },
        PerturbCfg { np: 5, ..good },
    ] {
        assert!(
            perturb(&dev, &img, 2, 1, 3, 5, &bad, &mut out, &mut r).is_err(),
            "{bad:?}"
        );
    }
    // wrong image buffer length
    assert!(perturb(&dev, &img, 3, 1, 3, 5, &good, &mut out, &mut r).is_err());
}

#[test]
fn polynomial_ln_and_sincos_are_accurate() {
    use popen::kernels::philox::{ln_open, sincos_2pi, uniform_open};
    let mut r = Philox::new(77);
    let mut worst = (0f64, 0f64);
    // random uniforms plus the ends and the quadrant edges (half-way ties included)
    let mut us: Vec<f32> = (0..200_000).map(|_| uniform_open(r.next_u32())).collect();
    us.extend([
        uniform_open(0),
        uniform_open(u32::MAX),
        0.125,
        0.375,
        0.5,
        0.625,
        0.875,
        1.0,
    ]);
    for u in us {
        let l = ln_open(u) as f64;
        let want = (u as f64).ln();
        worst.0 = worst.0.max((l - want).abs() / want.abs().max(1e-3));
        let (s, c) = sincos_2pi(u);
        let t = std::f64::consts::TAU * u as f64;
        worst.1 = worst
            .1
            .max((s as f64 - t.sin()).abs())
            .max((c as f64 - t.cos()).abs());
    }
    assert!(worst.0 < 1e-6, "ln relative error {}", worst.0);
    assert!(worst.1 < 1e-6, "sincos absolute error {}", worst.1);
}

#[test]
fn perturb_noise_has_standard_deviation_sigma() {
    // a zero image and a rectangle covering it: every output element is σ·z with z a
    // standard normal, so the sample moments must be σ's (a wrong scale fails here even
    // when kernel and twin agree)
    let (b, c, h, w) = (1usize, 3usize, 33usize, 31usize);
    let e = c * h * w;
    for sigma in [0.37f32, 2.5] {
        let cfg = PerturbCfg {
            np: 8,
            sigma,
            rect_h: (h, h),
            rect_w: (w, w),
            seed: 0xC0FFEE,
            first_copy: 0,
        };
        let img = vec![0f32; b * e];
        let mut cpu = vec![0f32; cfg.np * b * e];
        let mut rects = vec![Rect::default(); cfg.np * b];
        perturb_cpu(&img, b, c, h, w, &cfg, &mut cpu, &mut rects).unwrap();
        let mut outs = vec![("cpu".to_string(), cpu)];
        for dev in Device::test_devices() {
            let imgd = dev.upload(&img).unwrap();
            let mut out = dev.zeros::<f32>(cfg.np * b * e).unwrap();
            let mut rd = dev.zeros::<i32>(cfg.np * b * 4).unwrap();
            perturb(&dev, &imgd, b, c, h, w, &cfg, &mut out, &mut rd).unwrap();
            outs.push((format!("{dev:?}"), dev.download(&out).unwrap()));
        }
        for (who, x) in &outs {
            let n = x.len() as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let (s, sd) = (var.sqrt(), sigma as f64);
            // n = 24 552: the standard error of s is σ/√(2n) ≈ 0.45 % of σ
            assert!((s / sd - 1.0).abs() < 0.02, "{who} σ={sd}: sample std {s}");
            assert!(
                mean.abs() < 4.0 * sd / n.sqrt(),
                "{who} σ={sd}: mean {mean}"
            );
            // and normal in shape: 68.27 % within one σ
            let within = x.iter().filter(|&&v| (v as f64).abs() < sd).count() as f64 / n;
            assert!(
                (within - 0.6827).abs() < 0.012,
                "{who} σ={sd}: {within} within σ"
            );
        }
    }
}
