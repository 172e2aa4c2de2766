//! DPO log-prob reductions: kernels against the CPU twins (odd sizes, ignored rows,
//! λ weights), the twins against a naive log-softmax, and the backward against f64
//! central finite differences.
use popen::kernels::logprob::*;
use popen::kernels::philox::Philox;
use popen::kernels::Device;

struct Case {
    b: usize,
    t: usize,
    v: usize,
    logits: Vec<f64>,
    targets: Vec<i32>,
    w: Vec<f64>,
}

/// Random logits of scale `scale`, targets with a few ignored rows (-100), weights
/// 0 (prompt), 1 and λ = 5.
fn case(b: usize, t: usize, v: usize, scale: f64, seed: u64) -> Case {
    let mut r = Philox::new(seed);
    let logits = (0..b * t * v).map(|_| r.uniform(-scale, scale)).collect();
    let targets = (0..b * t)
        .map(|i| {
            if i % 7 == 3 {
                -100
            } else {
                (r.next_u32() as usize % v) as i32
            }
        })
        .collect();
    let w = (0..b * t)
        .map(|i| match (i % t, r.next_u32() % 4) {
            (0, _) => 0.0,
            (_, 0) => 5.0,
            _ => 1.0,
        })
        .collect();
    Case {
        b,
        t,
        v,
        logits,
        targets,
        w,
    }
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn logprob_fwd_cpu_matches_naive_log_softmax() {
    let c = case(2, 3, 11, 4.0, 1);
    let (lp, lse) = logprob_fwd_cpu(&c.logits, &c.targets, c.v).unwrap();
    let lp32 = logprob_fwd_cpu(&f32s(&c.logits), &c.targets, c.v)
        .unwrap()
        .0;
    for r in 0..c.b * c.t {
        let x = &c.logits[r * c.v..(r + 1) * c.v];
        let naive_lse = x.iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((lse[r] - naive_lse).abs() < 1e-12);
        let want = if c.targets[r] < 0 {
            0.0
        } else {
            x[c.targets[r] as usize] - naive_lse
        };
        assert!((lp[r] - want).abs() < 1e-12, "row {r}");
        // the vectorized f32 exp is accurate to float rounding
        assert!(
            close(lp32[r], want as f32, 1e-6),
            "row {r}: {} vs {want}",
            lp32[r]
        );
    }
    // huge logits do not overflow (the max is subtracted first); f32 spacing at 1000
    // is 6e-5, which bounds the error of lse and so of lp
    let (lp, _) = logprob_fwd_cpu(&[1000.0f32, 1000.0], &[0], 2).unwrap();
    assert!((lp[0] + std::f32::consts::LN_2).abs() < 1e-4, "{}", lp[0]);
}

#[test]
fn logprob_matches_cpu() {
    // V = 1031 (not a multiple of the block), T = 5, B = 3; a vocabulary smaller than a
    // warp so most lanes see nothing; V = 1032, read four values per load.
    for &(b, t, v) in &[(3usize, 5usize, 1031usize), (2, 3, 7), (2, 3, 1032)] {
        let c = case(b, t, v, 6.0, 2);
        let (logits, w) = (f32s(&c.logits), f32s(&c.w));
        let (lp, lse) = logprob_fwd_cpu(&logits, &c.targets, v).unwrap();
        let (out, scale) = seq_weighted_sum_cpu(&lp, &w, &c.targets, v, b, t, true).unwrap();
        let (out_sum, _) = seq_weighted_sum_cpu(&lp, &w, &c.targets, v, b, t, false).unwrap();
        let d_out: Vec<f32> = (0..b).map(|k| 0.5 - k as f32).collect();
        let mut dl = vec![0f32; b * t * v];
        logprob_bwd_cpu(&logits, &lse, &c.targets, &w, &d_out, &scale, t, v, &mut dl).unwrap();
        for dev in Device::test_devices() {
            let ld = dev.upload(&logits).unwrap();
            let td = dev.upload(&c.targets).unwrap();
            let wd = dev.upload(&w).unwrap();
            let mut lpd = dev.zeros::<f32>(b * t).unwrap();
            let mut lsed = dev.zeros::<f32>(b * t).unwrap();
            logprob_fwd(&dev, &ld, &td, v, &mut lpd, &mut lsed).unwrap();
            let (glp, glse) = (dev.download(&lpd).unwrap(), dev.download(&lsed).unwrap());
            for r in 0..b * t {
                assert!(
                    close(glp[r], lp[r], 1e-5),
                    "{dev:?} lp {r}: {} vs {}",
                    glp[r],
                    lp[r]
                );
                assert!(close(glse[r], lse[r], 1e-5), "{dev:?} lse {r}");
            }
            let mut od = dev.zeros::<f32>(b).unwrap();
            let mut sd = dev.zeros::<f32>(b).unwrap();
            for (norm, want) in [(true, &out), (false, &out_sum)] {
                seq_weighted_sum(&dev, &lpd, &wd, &td, v, b, t, norm, &mut od, &mut sd).unwrap();
                let got = dev.download(&od).unwrap();
                for k in 0..b {
                    assert!(close(got[k], want[k], 1e-5), "{dev:?} seq {k} norm {norm}");
                }
            }
            seq_weighted_sum(&dev, &lpd, &wd, &td, v, b, t, true, &mut od, &mut sd).unwrap();
            let dd = dev.upload(&d_out).unwrap();
            let mut dld = dev.zeros::<f32>(b * t * v).unwrap();
            logprob_bwd(&dev, &ld, &lsed, &td, &wd, &dd, &sd, t, v, &mut dld).unwrap();
            let got = dev.download(&dld).unwrap();
            for (i, (g, w)) in got.iter().zip(&dl).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1e-3 + w.abs()) + 1e-9,
                    "{dev:?} dlogits {i}: {g} vs {w}"
                );
            }
            // bad sizes are errors
            assert!(logprob_fwd(&dev, &ld, &td, v + 1, &mut lpd, &mut lsed).is_err());
        }
    }
}

#[test]
fn logprob_backward_matches_finite_differences() {
    let c = case(2, 3, 5, 2.0, 3);
    let d_out = [0.8f64, -1.7];
    for normalize in [true, false] {
        let f = |x: &[f64]| {
            let (lp, _) = logprob_fwd_cpu(x, &c.targets, c.v).unwrap();
            let (o, _) =
                seq_weighted_sum_cpu(&lp, &c.w, &c.targets, c.v, c.b, c.t, normalize).unwrap();
            o.iter().zip(&d_out).map(|(a, b)| a * b).sum::<f64>()
        };
        let (lp, lse) = logprob_fwd_cpu(&c.logits, &c.targets, c.v).unwrap();
        let (_, scale) =
            seq_weighted_sum_cpu(&lp, &c.w, &c.targets, c.v, c.b, c.t, normalize).unwrap();
        let mut g = vec![0f64; c.logits.len()];
        logprob_bwd_cpu(
            &c.logits, &lse, &c.targets, &c.w, &d_out, &scale, c.t, c.v, &mut g,
        )
        .unwrap();
        let mut x = c.logits.clone();
        let h = 1e-6;
        let mut nonzero = 0;
        for i in 0..x.len() {
            let v0 = x[i];
            x[i] = v0 + h;
            let fp = f(&x);
            x[i] = v0 - h;
            let fm = f(&x);
            x[i] = v0;
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                "{i}: {fd} vs {}",
                g[i]
            );
            nonzero += (g[i].abs() > 1e-6) as usize;
        }
        // rows with weight 0 or ignored targets get no gradient, the others do
        assert!(nonzero > c.v * 2, "gradient arrives at {nonzero} logits");
    }
}

#[test]
fn cross_entropy_is_mean_nll_and_uniform_gives_ln_v() {
    // uniform logits: every token has probability 1/V, so CE = ln V exactly
    let (b, t, v) = (2, 4, 13);
    let logits = vec![0.25f64; b * t * v];
    let targets: Vec<i32> = (0..b * t).map(|i| (i % v) as i32).collect();
    let mask: Vec<f64> = (0..b * t).map(|i| (i % t != 0) as u8 as f64).collect();
    let (loss, _, scale) = cross_entropy_cpu(&logits, &targets, &mask, b, v).unwrap();
    for l in &loss {
        assert!((l - (v as f64).ln()).abs() < 1e-12, "{l}");
    }
    assert!(scale.iter().all(|&s| (s - 1.0 / 3.0).abs() < 1e-15));
}

#[test]
fn cross_entropy_matches_cpu() {
    let c = case(3, 5, 211, 3.0, 9);
    let (logits, mask) = (f32s(&c.logits), f32s(&c.w));
    let (want, want_lse, want_scale) =
        cross_entropy_cpu(&logits, &c.targets, &mask, c.b, c.v).unwrap();
    for dev in Device::test_devices() {
        let ld = dev.upload(&logits).unwrap();
        let td = dev.upload(&c.targets).unwrap();
        let md = dev.upload(&mask).unwrap();
        let mut loss = dev.zeros::<f32>(c.b).unwrap();
        let mut lse = dev.zeros::<f32>(c.b * c.t).unwrap();
        let mut scale = dev.zeros::<f32>(c.b).unwrap();
        cross_entropy(
            &dev, &ld, &td, &md, c.b, c.v, &mut loss, &mut lse, &mut scale,
        )
        .unwrap();
        let got = dev.download(&loss).unwrap();
        for k in 0..c.b {
            assert!(
                close(got[k], want[k], 1e-5),
                "{dev:?} {k}: {} vs {}",
                got[k],
                want[k]
            );
            assert!(want[k] > 0.0);
        }
        let gl = dev.download(&lse).unwrap();
        assert!(gl.iter().zip(&want_lse).all(|(a, b)| close(*a, *b, 1e-5)));
        // (not bit-equal: --use_fast_math makes the GPU's 1/count approximate)
        let gs = dev.download(&scale).unwrap();
        assert!(gs.iter().zip(&want_scale).all(|(a, b)| close(*a, *b, 1e-6)));
        assert!(
            cross_entropy(&dev, &ld, &td, &md, 4, c.v, &mut loss, &mut lse, &mut scale).is_err()
        );
    }
}

#[test]
fn ignored_targets_do_not_count_in_the_length() {
    // PyTorch's ignore_index: an ignored position is no token of the response, so it
    // counts neither in the sum nor in Eq. 3's 1/|y|, whatever weight it was given.
    let (b, t, v) = (2usize, 4usize, 5usize);
    let c = case(b, t, v, 2.0, 17);
    // sequence 0: position 2 ignored (-100) though weighted λ; sequence 1: position 0
    // ignored too, position 3 is prompt (weight 0).  (A target ≥ V is an error, not an
    // ignore: one ignore rule, `IGNORE_INDEX`.)
    let targets = [1, 2, -100, 3, -100, 0, 4, 1];
    let w = [0.0, 1.0, 5.0, 1.0, 1.0, 1.0, 5.0, 0.0];
    let (lp, _) = logprob_fwd_cpu(&c.logits, &targets, v).unwrap();
    assert_eq!((lp[2], lp[4]), (0.0, 0.0));
    let (out, scale) = seq_weighted_sum_cpu(&lp, &w, &targets, v, b, t, true).unwrap();
    assert_eq!(scale, vec![0.5, 0.5]);
    let want = [(lp[1] + lp[3]) / 2.0, (lp[5] + 5.0 * lp[6]) / 2.0];
    assert!((out[0] - want[0]).abs() < 1e-15 && (out[1] - want[1]).abs() < 1e-15);
    // the SFT cross-entropy is the mean NLL over the counted tokens only
    let mask = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    let (ce, _, _) = cross_entropy_cpu(&c.logits, &targets, &mask, b, v).unwrap();
    let want_ce = [-(lp[1] + lp[3]) / 2.0, -(lp[5] + lp[6]) / 2.0];
    assert!((ce[0] - want_ce[0]).abs() < 1e-15 && (ce[1] - want_ce[1]).abs() < 1e-15);
    // the kernel counts the same way
    let (logits, w32) = (f32s(&c.logits), f32s(&w));
    for dev in Device::test_devices() {
        let ld = dev.upload(&logits).unwrap();
        let td = dev.upload(&targets).unwrap();
        let wd = dev.upload(&w32).unwrap();
        let mut lpd = dev.zeros::<f32>(b * t).unwrap();
        let mut lsed = dev.zeros::<f32>(b * t).unwrap();
        logprob_fwd(&dev, &ld, &td, v, &mut lpd, &mut lsed).unwrap();
        let mut od = dev.zeros::<f32>(b).unwrap();
        let mut sd = dev.zeros::<f32>(b).unwrap();
        seq_weighted_sum(&dev, &lpd, &wd, &td, v, b, t, true, &mut od, &mut sd).unwrap();
        let (got, gs) = (dev.download(&od).unwrap(), dev.download(&sd).unwrap());
        for k in 0..b {
            assert!(close(gs[k], 0.5, 1e-6), "{dev:?} scale {k}: {}", gs[k]);
            assert!(
                close(got[k], want[k] as f32, 1e-5),
                "{dev:?} seq {k}: {} vs {}",
                got[k],
                want[k]
            );
        }
    }
}
