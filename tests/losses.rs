//! DPO (Eq. 2) and segmentation preference (Eq. 4) losses: invariants and f64 central
//! finite differences of every gradient.
use popen::kernels::philox::Philox;
use popen::method::losses::*;

fn randv(r: &mut Philox, n: usize, s: f64) -> Vec<f64> {
    (0..n).map(|_| r.uniform(-s, s)).collect()
}

#[test]
fn dpo_is_ln2_when_policy_equals_reference() {
    let mut r = Philox::new(1);
    let (c, j) = (randv(&mut r, 5, 30.0), randv(&mut r, 5, 30.0));
    let out = dpo_loss(&c, &j, &c, &j, BETA_T).unwrap();
    assert!(
        (out.loss - std::f64::consts::LN_2).abs() < 1e-15,
        "{}",
        out.loss
    );
    // the gradient pushes chosen up and rejected down, β/(2B) each
    for (gc, gr) in out.d_policy_chosen.iter().zip(&out.d_policy_rejected) {
        assert!((gc + BETA_T / 10.0).abs() < 1e-15 && (gr - BETA_T / 10.0).abs() < 1e-15);
    }
}

#[test]
fn dpo_backward_matches_finite_differences() {
    let mut r = Philox::new(2);
    let b = 3;
    let (mut pc, mut pr) = (randv(&mut r, b, 5.0), randv(&mut r, b, 5.0));
    let (rc, rr) = (randv(&mut r, b, 5.0), randv(&mut r, b, 5.0));
    let out = dpo_loss(&pc, &pr, &rc, &rr, BETA_T).unwrap();
    let h = 1e-6;
    for i in 0..b {
        for (which, grad) in [(0, &out.d_policy_chosen), (1, &out.d_policy_rejected)] {
            let v = if which == 0 { &mut pc } else { &mut pr };
            let x = v[i];
            v[i] = x + h;
            let fp = dpo_loss(&pc, &pr, &rc, &rr, BETA_T).unwrap().loss;
            let v = if which == 0 { &mut pc } else { &mut pr };
            v[i] = x - h;
            let fm = dpo_loss(&pc, &pr, &rc, &rr, BETA_T).unwrap().loss;
            let v = if which == 0 { &mut pc } else { &mut pr };
            v[i] = x;
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() < 1e-8,
                "pair {i} which {which}: {fd} vs {}",
                grad[i]
            );
        }
    }
    // a huge margin neither overflows nor loses the gradient's sign
    let big = dpo_loss(&[1e4f64], &[-1e4], &[0.0], &[0.0], 1.0).unwrap();
    assert!(big.loss >= 0.0 && big.loss < 1e-300 && big.d_policy_chosen[0] <= 0.0);
    let bad = dpo_loss(&[-1e4f64], &[1e4], &[0.0], &[0.0], 1.0).unwrap();
    assert!((bad.loss - 2e4).abs() < 1e-9);
    assert!(dpo_loss(&[1.0], &[1.0, 2.0], &[0.0], &[0.0], 1.0).is_err());
}

fn seg_case(n: usize, k: usize, d: usize, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<[usize; 3]>) {
    let mut r = Philox::new(seed);
    let reference = randv(&mut r, n * k * d, 1.0);
    let policy: Vec<f64> = reference
        .iter()
        .map(|&v| v + r.uniform(-0.3, 0.3))
        .collect();
    let orders = [[2, 0, 1], [0, 1, 2], [1, 2, 0]];
    (policy, reference, (0..n).map(|i| orders[i % 3]).collect())
}

#[test]
fn seg_pref_is_ln2_when_policy_equals_reference() {
    let (_, reference, order) = seg_case(4, 3, 7, 3);
    let out = seg_pref_loss(&reference, &reference, &order, &[true; 4], 3, 7, BETA_S).unwrap();
    assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-14);
    // half the targets off: half the loss (the mean runs over all N)
    let ind = [true, false, true, false];
    let half = seg_pref_loss(&reference, &reference, &order, &ind, 3, 7, BETA_S).unwrap();
    assert!((half.loss - std::f64::consts::LN_2 / 2.0).abs() < 1e-14);
}

#[test]
fn seg_pref_backward_matches_finite_differences() {
    let (n, k, d) = (3, 3, 5);
    let (mut pol, reference, order) = seg_case(n, k, d, 4);
    let ind = [true, true, false];
    let f = |p: &[f64]| {
        seg_pref_loss(p, &reference, &order, &ind, k, d, BETA_S)
            .unwrap()
            .loss
    };
    let out = seg_pref_loss(&pol, &reference, &order, &ind, k, d, BETA_S).unwrap();
    let h = 1e-6;
    for i in 0..pol.len() {
        let x = pol[i];
        pol[i] = x + h;
        let fp = f(&pol);
        pol[i] = x - h;
        let fm = f(&pol);
        pol[i] = x;
        let fd = (fp - fm) / (2.0 * h);
        assert!(
            (fd - out.d_policy[i]).abs() < 1e-7 * (1.0 + fd.abs()),
            "{i}: {fd} vs {}",
            out.d_policy[i]
        );
    }
    // gradient lands only on each active target's medium image (L[1])
    for t in 0..n {
        for img in 0..k {
            let g = &out.d_policy[(t * k + img) * d..(t * k + img + 1) * d];
            let any = g.iter().any(|&v| v != 0.0);
            assert_eq!(any, ind[t] && img == order[t][1], "target {t} image {img}");
        }
    }
    // descending the gradient moves fθ[L1] toward the best and away from the worst
    let step: Vec<f64> = pol
        .iter()
        .zip(&out.d_policy)
        .map(|(p, g)| p - 0.01 * g)
        .collect();
    assert!(f(&step) < out.loss);
}

#[test]
fn seg_pref_indicator_and_bad_input() {
    assert!(seg_pref_indicator(0.8, 0.5));
    assert!(seg_pref_indicator(0.5, 0.5));
    assert!(!seg_pref_indicator(0.5, 0.8));
    let (pol, reference, _) = seg_case(1, 3, 4, 5);
    for bad in [[0, 0, 1], [0, 1, 3]] {
        assert!(seg_pref_loss(&pol, &reference, &[bad], &[true], 3, 4, BETA_S).is_err());
    }
    assert!(seg_pref_loss(&pol[1..], &reference, &[[0, 1, 2]], &[true], 3, 4, BETA_S).is_err());
    // a zero embedding gives a finite loss (norms are floored)
    let zero = vec![0.0; 12];
    let out = seg_pref_loss(&zero, &reference, &[[0, 1, 2]], &[true], 3, 4, BETA_S).unwrap();
    assert!(out.loss.is_finite() && out.d_policy.iter().all(|g| g.is_finite()));
}

#[test]
fn seg_pref_hand_computed_with_unit_vectors() {
    // D = 2, K = 3 images stored as [medium, worst, best] (order = [2, 0, 1]):
    // reference best e0 = (1, 0), worst e1 = (0, 1), medium at 45°; the policy's
    // medium embedding at 30°, nearer the best than the reference's medium.
    let s = std::f64::consts::FRAC_1_SQRT_2;
    let (c30, s30) = (3f64.sqrt() / 2.0, 0.5);
    let reference = [s, s, 0.0, 1.0, 1.0, 0.0];
    // the policy's other images are not read: any values
    let policy = [c30, s30, 9.0, -4.0, 0.3, 7.0];
    let order = [[2, 0, 1]];
    // r_w = βs (cos30° − cos45°), r_l = βs (sin30° − cos45°), m = βs (√3 − 1)/2
    let m1 = (3f64.sqrt() - 1.0) / 2.0;
    for beta in [1.0, BETA_S] {
        let out = seg_pref_loss(&policy, &reference, &order, &[true], 3, 2, beta).unwrap();
        let m = beta * m1;
        assert!(
            (out.margin[0] - m).abs() < 1e-14,
            "βs={beta}: {}",
            out.margin[0]
        );
        assert!(
            out.margin[0] > 0.0,
            "medium nearer the best: positive margin"
        );
        let want = (1.0 + (-m).exp()).ln();
        assert!(
            (out.loss - want).abs() < 1e-14,
            "βs={beta}: {} vs {want}",
            out.loss
        );
        // ∂cos(f, b)/∂f = b − cos·f for unit f:
        // (1/4, −√3/4) toward the best minus (−√3/4, 3/4) toward the worst
        let r3 = 3f64.sqrt();
        let dir = [(1.0 + r3) / 4.0, -(r3 + 3.0) / 4.0];
        let sig = 1.0 / (1.0 + m.exp()); // σ(−m)
        for (j, d) in dir.iter().enumerate() {
            let g = -sig * beta * d;
            assert!((out.d_policy[j] - g).abs() < 1e-14, "βs={beta} grad {j}");
        }
        assert!(out.d_policy[2..].iter().all(|&g| g == 0.0));
    }
    // βs scales the margin linearly
    let m_1 = seg_pref_loss(&policy, &reference, &order, &[true], 3, 2, 1.0).unwrap();
    let m_s = seg_pref_loss(&policy, &reference, &order, &[true], 3, 2, BETA_S).unwrap();
    assert!((m_s.margin[0] - BETA_S * m_1.margin[0]).abs() < 1e-13);
    // best and worst swapped: the margin flips sign and the loss is the other side's
    let swapped = seg_pref_loss(&policy, &reference, &[[1, 0, 2]], &[true], 3, 2, BETA_S).unwrap();
    assert!((swapped.margin[0] + BETA_S * m1).abs() < 1e-13);
    assert!((swapped.loss - (1.0 + (BETA_S * m1).exp()).ln()).abs() < 1e-12);
    // the indicator off: no loss, no gradient, the margin still reported
    let off = seg_pref_loss(&policy, &reference, &order, &[false], 3, 2, BETA_S).unwrap();
    assert_eq!(off.loss, 0.0);
    assert!(off.d_policy.iter().all(|&g| g == 0.0));
    assert!((off.margin[0] - BETA_S * m1).abs() < 1e-13);
}
