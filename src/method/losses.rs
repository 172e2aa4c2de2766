//! Preference losses on the CPU, generic over the float type (checked in f64 by finite
//! differences in `tests/losses.rs`):
//!
//! - [`dpo_loss`]: the text DPO loss `Lt` of Eq. 2 from sequence log-probs (Eq. 3, see
//!   [`crate::kernels::logprob`]), forward and backward wrt the policy's log-probs;
//! - [`seg_pref_loss`]: the segmentation preference loss `Ls` of Eq. 4 from cosine
//!   similarities of seg embeddings, with its indicator, forward and backward wrt the
//!   policy's embeddings.
//!
//! B preference pairs, N segmentation targets, K perturbed images per target (3 in
//! the paper), D seg-embedding width.
use crate::error::{check_len, Error, Result};
use num_traits::Float;

/// βt of Eq. 2 (0.5, following RLHF-V).
pub const BETA_T: f64 = 0.5;
/// λ of Eq. 3: weight of the tokens the corrector changed (5, following RLHF-V).
pub const LAMBDA: f64 = 5.0;
/// βs of Eq. 4 (10 in the paper).
pub const BETA_S: f64 = 10.0;
/// Floor on an embedding norm in the cosine similarity (as `torch.cosine_similarity`
/// clamps each norm): a zero embedding gives cos = 0 rather than NaN.
pub const COS_EPS: f64 = 1e-8;

/// `−log σ(x) = log(1 + e^{−x})`, without overflow for large |x|.
fn neg_log_sigmoid<T: Float>(x: T) -> T {
    // softplus(−x) = max(−x, 0) + log(1 + e^{−|x|})
    (-x).max(T::zero()) + (-x.abs()).exp().ln_1p()
}

/// `σ(x)`, without overflow for large |x|.
fn sigmoid<T: Float>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// Forward and backward of [`dpo_loss`].
#[derive(Clone, Debug, PartialEq)]
pub struct DpoLoss<T> {
    /// `Lt`, the mean over the B pairs.
    pub loss: T,
    /// Implicit reward margins `βt·((πθ(yc) − πref(yc)) − (πθ(y) − πref(y)))` (B).
    pub margin: Vec<T>,
    /// ∂Lt/∂ log πθ(yc) (B).
    pub d_policy_chosen: Vec<T>,
    /// ∂Lt/∂ log πθ(y) (B).
    pub d_policy_rejected: Vec<T>,
}

/// The DPO loss of Eq. 2 averaged over B pairs: `yc` is the corrected (chosen)
/// response, `y` the original (rejected) one; inputs are sequence log-probs (Eq. 3).
///
/// forward: `z = β((πc − rc) − (πr − rr))`, `L = (1/B) Σ −log σ(z)`
/// so:      `∂L/∂πc = −(β/B)·σ(−z)`, `∂L/∂πr = +(β/B)·σ(−z)` (the reference is frozen)
///
/// policy_chosen, policy_rejected, ref_chosen, ref_rejected (B).
pub fn dpo_loss<T: Float>(
    policy_chosen: &[T],
    policy_rejected: &[T],
    ref_chosen: &[T],
    ref_rejected: &[T],
    beta: T,
) -> Result<DpoLoss<T>> {
    const OP: &str = "dpo_loss";
    let b = policy_chosen.len();
    check_len(OP, "policy_rejected", policy_rejected.len(), b)?;
    check_len(OP, "ref_chosen", ref_chosen.len(), b)?;
    check_len(OP, "ref_rejected", ref_rejected.len(), b)?;
    if b == 0 {
        return Err(Error::arg(OP, "no preference pair"));
    }
    let inv_b = T::one() / T::from(b).unwrap();
    let mut out = DpoLoss {
        loss: T::zero(),
        margin: Vec::with_capacity(b),
        d_policy_chosen: Vec::with_capacity(b),
        d_policy_rejected: Vec::with_capacity(b),
    };
    for i in 0..b {
        let z =
            beta * ((policy_chosen[i] - ref_chosen[i]) - (policy_rejected[i] - ref_rejected[i]));
        if !z.is_finite() {
            return Err(Error::NonFinite {
                what: format!("DPO reward margin of pair {i}"),
            });
        }
        out.loss = out.loss + neg_log_sigmoid(z) * inv_b;
        let g = beta * sigmoid(-z) * inv_b;
        out.margin.push(z);
        out.d_policy_chosen.push(-g);
        out.d_policy_rejected.push(g);
    }
    Ok(out)
}

/// Cosine similarity with each norm floored at [`COS_EPS`], and its gradient wrt `a`:
/// `∂cos/∂a = b/(|a|·|b|) − cos·a/|a|²` (the second term vanishes where `|a|` is
/// floored).
fn cosine<T: Float>(a: &[T], b: &[T], grad_a: Option<&mut [T]>) -> T {
    let eps = T::from(COS_EPS).unwrap();
    let (mut ab, mut aa, mut bb) = (T::zero(), T::zero(), T::zero());
    for (&x, &y) in a.iter().zip(b) {
        ab = ab + x * y;
        aa = aa + x * x;
        bb = bb + y * y;
    }
    let (na_raw, nb) = (aa.sqrt(), bb.sqrt().max(eps));
    let na = na_raw.max(eps);
    let c = ab / (na * nb);
    if let Some(g) = grad_a {
        let k = if na_raw >= eps {
            c / (na * na)
        } else {
            T::zero()
        };
        for ((g, &x), &y) in g.iter_mut().zip(a).zip(b) {
            *g = y / (na * nb) - k * x;
        }
    }
    c
}

/// The indicator of Eq. 4: `1(M_ref^{L[0]} ⪰ M_θ^{L[1]})` — true while the
/// reference's best mask scores at least as well as the policy's medium one (score:
/// `s_i` of Eq. 1 in the first half of stage 2, boundary IoU in the second).  Once
/// the policy's medium mask beats the reference's best, pulling its embedding further
/// toward the reference's best would be harmful, so the target's loss is zeroed.
pub fn seg_pref_indicator(ref_best_score: f64, policy_medium_score: f64) -> bool {
    ref_best_score >= policy_medium_score
}

/// Forward and backward of [`seg_pref_loss`].
#[derive(Clone, Debug, PartialEq)]
pub struct SegPrefLoss<T> {
    /// `Ls` for one sample: the mean over the N targets (inactive targets count as 0).
    pub loss: T,
    /// `r_w − r_l` per target (N).
    pub margin: Vec<T>,
    /// ∂Ls/∂policy (N, K, D): nonzero only at each target's medium image `L[1]`.
    pub d_policy: Vec<T>,
}

/// The segmentation preference loss of Eq. 4 for one sample with N targets.
///
/// With `L = order[n]` (image indices sorted best, medium, worst):
/// ```text
/// r_w = βs (cos(fθ[L1], fref[L0]) − cos(fref[L1], fref[L0]))
/// r_l = βs (cos(fθ[L1], fref[L2]) − cos(fref[L1], fref[L2]))
/// Ls  = (1/N) Σ_n −log σ(r_w − r_l) · indicator[n]
/// ```
/// forward as above, so with `m = r_w − r_l`:
/// `∂Ls/∂fθ[L1] = −(ind/N)·σ(−m)·βs·(∂cos(fθ[L1], fref[L0]) − ∂cos(fθ[L1], fref[L2]))`.
///
/// policy (N, K, D), reference (N, K, D), order (N), indicator (N).
pub fn seg_pref_loss<T: Float>(
    policy: &[T],
    reference: &[T],
    order: &[[usize; 3]],
    indicator: &[bool],
    k: usize,
    d: usize,
    beta_s: T,
) -> Result<SegPrefLoss<T>> {
    const OP: &str = "seg_pref_loss";
    let n = order.len();
    if n == 0 || d == 0 {
        return Err(Error::arg(OP, "need at least one target and D ≥ 1"));
    }
    check_len(OP, "indicator", indicator.len(), n)?;
    check_len(OP, "policy", policy.len(), n * k * d)?;
    check_len(OP, "reference", reference.len(), n * k * d)?;
    let inv_n = T::one() / T::from(n).unwrap();
    let mut out = SegPrefLoss {
        loss: T::zero(),
        margin: Vec::with_capacity(n),
        d_policy: vec![T::zero(); n * k * d],
    };
    let mut g0 = vec![T::zero(); d];
    let mut g2 = vec![T::zero(); d];
    for (t, l) in order.iter().enumerate() {
        if l.iter().any(|&i| i >= k) || l[0] == l[1] || l[1] == l[2] || l[0] == l[2] {
            return Err(Error::arg(
                OP,
                format!("order of target {t} is {l:?}: need three distinct indices < K = {k}"),
            ));
        }
        let at = |i: usize| (t * k + i) * d..(t * k + i + 1) * d;
        let pol = &policy[at(l[1])];
        let (best, med, worst) = (
            &reference[at(l[0])],
            &reference[at(l[1])],
            &reference[at(l[2])],
        );
        let rw = beta_s * (cosine(pol, best, Some(&mut g0)) - cosine(med, best, None));
        let rl = beta_s * (cosine(pol, worst, Some(&mut g2)) - cosine(med, worst, None));
        let m = rw - rl;
        if !m.is_finite() {
            return Err(Error::NonFinite {
                what: format!("seg preference margin of target {t}"),
            });
        }
        out.margin.push(m);
        if !indicator[t] {
            continue;
        }
        out.loss = out.loss + neg_log_sigmoid(m) * inv_n;
        let c = -inv_n * sigmoid(-m) * beta_s;
        let dst = &mut out.d_policy[(t * k + l[1]) * d..(t * k + l[1] + 1) * d];
        for j in 0..d {
            dst[j] = c * (g0[j] - g2[j]);
        }
    }
    Ok(out)
}
