//! `Ls` (Eq. 4) in a training step: the policy reads the medium copy of each of the
//! batch's `Ps` triples (rebuilt from its seed, teacher-forced on `yg`), its embeddings
//! `fθ` meet the reference's cached `f_ref` of the three copies in
//! [`seg_pref_loss`], and the indicator compares the policy's medium mask with the
//! reference's best, per target, by the triple's measure (Eq. 1's term or boundary IoU).
//!
//! forward: `Ls = (1/J) Σ_j Ls_j` over the J triples that train in this phase
//! ([`super::ps::PsMode::rules`]), `Ls_j` the mean over its targets (Eq. 4);
//! so: `∂Ls/∂fθ_j = (1/J)·∂Ls_j/∂fθ_j`, which goes into the model through the
//! segmentation embeddings' gradient (`backward_pass`'s `d_emb`); the mask losses of
//! these copies get weight 0 (no `Lce` on perturbed images).
use super::curriculum::Phase;
use super::ps::{perturbed, PsCfg, PsRecord, TargetRefs};
use super::PrefLossCfg;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::method::losses::{seg_pref_indicator, seg_pref_loss};
use crate::model::seg::{Example, HeadWeights, SegModel};
use num_traits::Float;
use std::collections::BTreeMap;

/// A question's `Ps` as a training item carries it.
#[derive(Clone, Debug)]
pub struct PsItem {
    /// The question's `Ps` record: the copies' seed and noise, and the triples.
    pub record: PsRecord,
    /// Its ground truth and proposals, which score the policy's masks for the indicator.
    pub refs: TargetRefs,
}

/// `Ls` of one micro-batch and its parts.
#[derive(Clone, Debug, PartialEq)]
pub struct LsOut {
    /// `Ls`: the mean over the J triples of each one's mean over its targets (Eq. 4).
    pub loss: f64,
    /// Triples that trained (J).
    pub triples: usize,
    /// For the log: `ls`, `ls_active` (the fraction of targets whose indicator is on)
    /// and `ls_margin` (the mean margin per target).
    pub parts: BTreeMap<String, f64>,
}

/// `Ls` over the `Ps` triples of `items` (each with its ground-truth example `gt`) that
/// train in `phase`; `None` when there is none.  With `backward`, the gradient of
/// `scale · Ls` accumulates into the trainable parameters.
#[allow(clippy::too_many_arguments)]
pub fn ls_step<F: Float, B: Backend<F>>(
    model: &mut SegModel<F, B>,
    items: &[(&Example, &PsItem)],
    lc: &PrefLossCfg,
    ps: &PsCfg,
    phase: Phase,
    scale: f32,
    backward: bool,
) -> Result<Option<LsOut>> {
    let rules = ps.mode.rules(phase);
    let mut jobs = Vec::new();
    let mut exs = Vec::new();
    for (gt, it) in items {
        for &rule in rules {
            let Some(t) = it.record.triple(rule) else {
                continue;
            };
            let n = gt.masks.len();
            if n == 0 || t.ref_best.len() != n || t.ref_emb.len() % (3 * n) != 0 {
                return Err(Error::arg(
                    "ls_step",
                    format!(
                        "question {}: a {:?} triple for {} targets, the answer has {n}",
                        it.record.sample,
                        rule,
                        t.ref_best.len()
                    ),
                ));
            }
            let r = &it.record;
            let px = perturbed(&gt.pixels, &r.noise, r.seed, t.copies[1], 1)?.remove(0);
            exs.push(Example {
                pixels: px,
                enc: gt.enc.clone(),
                masks: gt.masks.clone(),
                classes: Default::default(),
                categories: gt.categories.clone(),
            });
            jobs.push((*it, t));
        }
    }
    if jobs.is_empty() {
        return Ok(None);
    }
    let be = model.llava.be.clone();
    let pass = model.forward_pass(&exs)?;
    let emb = pass.seg_embeddings(&be);
    let logits = pass.mask_logits(&be);
    let m_total: usize = exs.iter().map(|e| e.masks.len()).sum();
    let e = emb.len() / m_total.max(1);
    let inv_j = 1.0 / jobs.len() as f64;
    let (mut loss, mut active, mut targets, mut margin) = (0.0, 0usize, 0usize, 0.0);
    let mut d_emb = vec![0f64; emb.len()];
    let mut row = 0;
    for (it, t) in &jobs {
        let n = t.ref_best.len();
        if t.ref_emb.len() != n * 3 * e {
            return Err(Error::arg(
                "ls_step",
                format!(
                    "question {}: cached embeddings of width {} for a model of width {e}",
                    it.record.sample,
                    t.ref_emb.len() / (3 * n)
                ),
            ));
        }
        let pred: Vec<Vec<u8>> = logits[row..row + n]
            .iter()
            .map(|l| l.iter().map(|&x| u8::from(x > F::zero())).collect())
            .collect();
        let (s, b) = it.refs.score(&pred)?;
        let pol_score = if t.rule.by_boundary() { b } else { s };
        let indicator: Vec<bool> = (0..n)
            .map(|k| !lc.indicator || seg_pref_indicator(t.ref_best[k], pol_score[k]))
            .collect();
        // policy (N, 3, E) with fθ at the medium slot; the loss reads no other slot
        let mut policy = vec![0f64; n * 3 * e];
        for k in 0..n {
            let src = &emb[(row + k) * e..(row + k + 1) * e];
            for (d, &x) in policy[(k * 3 + 1) * e..(k * 3 + 2) * e].iter_mut().zip(src) {
                *d = x.to_f64().unwrap_or(f64::NAN);
            }
        }
        let reference: Vec<f64> = t.ref_emb.iter().map(|&x| f64::from(x)).collect();
        let order = vec![[0, 1, 2]; n];
        let out = seg_pref_loss(&policy, &reference, &order, &indicator, 3, e, lc.beta_s)?;
        loss += inv_j * out.loss;
        active += indicator.iter().filter(|&&x| x).count();
        targets += n;
        margin += out.margin.iter().sum::<f64>();
        for k in 0..n {
            let g = &out.d_policy[(k * 3 + 1) * e..(k * 3 + 2) * e];
            for (d, &x) in d_emb[(row + k) * e..(row + k + 1) * e].iter_mut().zip(g) {
                *d = x * inv_j * f64::from(scale);
            }
        }
        row += n;
    }
    if !loss.is_finite() {
        return Err(Error::NonFinite {
            what: "segmentation preference loss Ls".into(),
        });
    }
    let parts: BTreeMap<String, f64> = [
        ("ls".to_string(), loss),
        ("ls_active".into(), active as f64 / targets.max(1) as f64),
        ("ls_margin".into(), margin / targets.max(1) as f64),
    ]
    .into();
    if backward {
        let zeros = vec![0f64; pass.logp.len()];
        model.backward_pass(
            &exs,
            pass,
            &zeros,
            (0.0, 0.0),
            Some(&d_emb),
            HeadWeights::NONE,
        )?;
    }
    Ok(Some(LsOut {
        loss,
        triples: jobs.len(),
        parts,
    }))
}
