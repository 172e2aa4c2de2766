//! Alg. 1's selection rules (`popen::method::pref::curriculum`): Eq. 1 by hand, and
//! property tests for the first half's condition and ordering, the second half's top-5
//! rule, and the regeneration bound.
use popen::method::pref::curriculum::{
    collect_with_regeneration, localization_score, select, Outcome, Phase, S_HIGH, S_LOW, TOP_BY_S,
};
use proptest::prelude::*;

#[test]
fn eq1_by_hand() {
    // one target: 0.9 with its ground truth; proposal 1 is the target itself (IoU 1.0
    // with the ground truth, so not subtracted), proposal 0 another object at 0.2
    let s = localization_score(&[0.9], &[vec![0.2, 0.95]], &[vec![0.0, 1.0]]);
    assert!((s - 0.7).abs() < 1e-12, "{s}");
    // a mask on another object: 0 with the target, 0.8 with the other object
    let s = localization_score(&[0.0], &[vec![0.8, 0.0]], &[vec![0.1, 1.0]]);
    assert!((s + 0.8).abs() < 1e-12, "{s}");
    // two targets average; no other proposal subtracts nothing; no target is 0
    let s = localization_score(&[0.5, 1.0], &[vec![], vec![]], &[vec![], vec![]]);
    assert!((s - 0.75).abs() < 1e-12);
    assert_eq!(localization_score(&[], &[], &[]), 0.0);
}

#[test]
fn the_median_and_ties_are_as_documented() {
    // descending s: copies 3 (0.9), 0 (0.5), 1 (0.5), 2 (−0.2): median at index 4/2 = 2
    // of [3, 0, 1, 2] is copy 1 (ties by index)
    assert_eq!(
        select(Phase::First, &[0.5, 0.5, -0.2, 0.9], &[]),
        Some([3, 1, 2])
    );
    // the condition needs both ends
    assert_eq!(select(Phase::First, &[0.5, 0.7, -0.2], &[]), None);
    assert_eq!(select(Phase::First, &[0.5, 0.9, 0.1], &[]), None);
}

fn scores(n: std::ops::Range<usize>) -> impl Strategy<Value = (Vec<f64>, Vec<f64>)> {
    n.prop_flat_map(|n| {
        (
            prop::collection::vec(-1.0f64..1.0, n),
            prop::collection::vec(0.0f64..1.0, n),
        )
    })
}

proptest! {
    #[test]
    fn first_half_picks_extremes_and_a_middle_only_when_spanning((s, b) in scores(0..12)) {
        let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ok = s.len() >= 3 && lo < S_LOW && hi > S_HIGH;
        match select(Phase::First, &s, &b) {
            None => prop_assert!(!ok),
            Some([best, med, worst]) => {
                prop_assert!(ok);
                prop_assert!(best != med && med != worst && best != worst);
                prop_assert_eq!(s[best], hi);
                prop_assert_eq!(s[worst], lo);
                prop_assert!(s[best] >= s[med] && s[med] >= s[worst]);
            }
        }
    }

    #[test]
    fn second_half_ranks_the_top5_by_s_by_boundary_iou((s, b) in scores(0..12)) {
        match select(Phase::Second, &s, &b) {
            None => prop_assert!(s.len() < 3),
            Some(t) => {
                let mut order: Vec<usize> = (0..s.len()).collect();
                order.sort_by(|&x, &y| s[y].total_cmp(&s[x]).then(x.cmp(&y)));
                let top = &order[..TOP_BY_S.min(order.len())];
                // all three from the top 5 by s, however high another copy's b
                prop_assert!(t.iter().all(|i| top.contains(i)));
                let bmax = top.iter().map(|&i| b[i]).fold(f64::NEG_INFINITY, f64::max);
                let bmin = top.iter().map(|&i| b[i]).fold(f64::INFINITY, f64::min);
                prop_assert_eq!(b[t[0]], bmax);
                prop_assert_eq!(b[t[2]], bmin);
                prop_assert!(b[t[0]] >= b[t[1]] && b[t[1]] >= b[t[2]]);
            }
        }
    }

    #[test]
    fn regeneration_is_bounded(r in 0usize..5, good_at in 0usize..8) {
        // the set drawn at `good_at` spans a failure and a success; the others do not
        let mut calls = 0;
        let out = collect_with_regeneration::<()>(Phase::First, r, |k| {
            calls += 1;
            let s = if k == good_at { vec![0.9, 0.3, -0.5] } else { vec![0.5, 0.4, 0.3] };
            Ok((s, vec![0.5; 3]))
        })
        .unwrap();
        prop_assert!(calls <= r + 1);
        if good_at <= r {
            prop_assert_eq!(out, Outcome::Selected { triple: [0, 1, 2], draws: good_at + 1 });
            prop_assert_eq!(calls, good_at + 1);
        } else {
            prop_assert_eq!(out, Outcome::Skipped { draws: r + 1 });
            prop_assert_eq!(calls, r + 1);
        }
    }
}

#[test]
fn the_second_half_never_regenerates() {
    let mut calls = 0;
    let out = collect_with_regeneration::<()>(Phase::Second, 3, |_| {
        calls += 1;
        Ok((vec![0.1, 0.2], vec![0.3, 0.4]))
    })
    .unwrap();
    assert_eq!(out, Outcome::Skipped { draws: 1 });
    assert_eq!(calls, 1);
}
