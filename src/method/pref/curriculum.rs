//! The selection rules of Alg. 1 (the curriculum collection of `Ps`), as pure functions
//! of the scores of `Np` perturbed copies, so that they can be tested on their own.
//!
//! - [`localization_score`]: `s_i` of Eq. 1 from IoUs that the mask kernels count.
//! - [`select`]: which three copies become the best / medium / worst of a preference
//!   triple, in the first half of the stage (by `s`, only when the copies span a failure
//!   and a success: `min s < 0` and `max s > 0.8`) and in the second (the top 5 by `s`,
//!   then by boundary IoU `b`).
//! - [`collect_with_regeneration`]: Alg. 1's loop, drawing a fresh set of copies until
//!   the first-half condition holds, at most `1 + regenerations` times.
//!
//! Choices where the paper is silent (each tested): the median of `n` sorted copies is
//! the one at index `n / 2` of the descending order; ties sort by copy index, so a
//! selection is deterministic; a proposal "corresponds to" ground-truth target `n`
//! when its IoU with that target's mask is at least [`MATCH_IOU`].
use serde::{Deserialize, Serialize};

/// `min s` must be below this in the first half (a copy that segments something else).
pub const S_LOW: f64 = 0.0;
/// `max s` must be above this in the first half (a copy that finds the target).
pub const S_HIGH: f64 = 0.8;
/// Copies ranked by `s` before the second half's choice by boundary IoU.
pub const TOP_BY_S: usize = 5;
/// IoU at which a proposal is the ground-truth target's own mask (excluded from Eq. 1's
/// max over the other objects).
pub const MATCH_IOU: f64 = 0.5;

/// Which half of the stage: localization first, boundaries second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The first `⌈T/2⌉` steps of a `T`-step run; its rule ([`select`]) picks by `s`
    /// (Eq. 1).
    First,
    /// The remaining steps; its rule picks by boundary IoU among the top 5 by `s`.
    Second,
}

/// A preference triple: copy indices sorted best, medium, worst (`L_s` of Eq. 4).
pub type Triple = [usize; 3];

/// `s_i` of Eq. 1 for one copy with N targets: the mean over targets of the IoU with
/// the target's ground truth minus the largest IoU with a proposal that is not that
/// target's (`MATCH_IOU` against the ground truth decides which those are).
///
/// `iou_gt[n]` = IoU(M_{n,i}, M_g^n); `iou_props[n][j]` = IoU(M_{n,i}, M_s^j);
/// `props_vs_gt[n][j]` = IoU(M_s^j, M_g^n).  No targets gives 0; no other proposal
/// subtracts 0.
pub fn localization_score(iou_gt: &[f64], iou_props: &[Vec<f64>], props_vs_gt: &[Vec<f64>]) -> f64 {
    let n = iou_gt.len();
    if n == 0 {
        return 0.0;
    }
    let total: f64 = (0..n)
        .map(|t| target_localization(iou_gt[t], &iou_props[t], &props_vs_gt[t]))
        .sum();
    total / n as f64
}

/// One target's term of Eq. 1: `IoU(M, M_g) − max_{j: M_s^j ∉ M_g} IoU(M, M_s^j)`
/// (the per-target score the indicator of Eq. 4 compares in the first half).
pub fn target_localization(iou_gt: f64, iou_props: &[f64], props_vs_gt: &[f64]) -> f64 {
    let other = iou_props
        .iter()
        .zip(props_vs_gt)
        .filter(|(_, &g)| g < MATCH_IOU)
        .map(|(&x, _)| x)
        .fold(0.0f64, f64::max);
    iou_gt - other
}

/// The copies of `among` ordered best first by `scores` (ties by index): the order a
/// triple of randomly chosen copies gets (`--ps-collection random`).
pub fn order_by(scores: &[f64], among: Triple) -> Triple {
    let v = ranked(scores, &among);
    [v[0], v[1], v[2]]
}

/// Indices of `scores` sorted by descending score, ties by ascending index.
fn ranked(scores: &[f64], among: &[usize]) -> Vec<usize> {
    let mut v = among.to_vec();
    v.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    v
}

/// The highest, median and lowest of `order` (already sorted best first).
fn ends_and_middle(order: &[usize]) -> Option<Triple> {
    let n = order.len();
    (n >= 3).then(|| [order[0], order[n / 2], order[n - 1]])
}

/// Alg. 1's choice among the copies' `s` (Eq. 1) and boundary IoUs `b`: `None` when the
/// first half's condition fails (the caller regenerates) or fewer than 3 copies exist.
pub fn select(phase: Phase, s: &[f64], b: &[f64]) -> Option<Triple> {
    let all: Vec<usize> = (0..s.len()).collect();
    match phase {
        Phase::First => {
            let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !(lo < S_LOW && hi > S_HIGH) {
                return None;
            }
            ends_and_middle(&ranked(s, &all))
        }
        Phase::Second => {
            if b.len() != s.len() {
                return None;
            }
            let top: Vec<usize> = ranked(s, &all).into_iter().take(TOP_BY_S).collect();
            ends_and_middle(&ranked(b, &top))
        }
    }
}

/// How a question's collection ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A triple from the `draws`-th set of copies (1-based).
    Selected {
        /// The chosen copies, best first.
        triple: Triple,
        /// Sets of copies drawn, the chosen one included.
        draws: usize,
    },
    /// No set met the condition within the bound.
    Skipped {
        /// Sets of copies drawn, all of them failing.
        draws: usize,
    },
}

/// Alg. 1's loop: `draw(k)` makes the k-th set of copies (k = 0, 1, …) and returns
/// their `(s, b)`; a set whose [`select`] fails is drawn again, at most `1 +
/// regenerations` sets in all.  The second half never regenerates (its rule always
/// picks from 3 or more copies).
pub fn collect_with_regeneration<E>(
    phase: Phase,
    regenerations: usize,
    mut draw: impl FnMut(usize) -> Result<(Vec<f64>, Vec<f64>), E>,
) -> Result<Outcome, E> {
    for k in 0..=regenerations {
        let (s, b) = draw(k)?;
        if let Some(triple) = select(phase, &s, &b) {
            return Ok(Outcome::Selected {
                triple,
                draws: k + 1,
            });
        }
        if phase == Phase::Second {
            return Ok(Outcome::Skipped { draws: k + 1 });
        }
    }
    Ok(Outcome::Skipped {
        draws: regenerations + 1,
    })
}
