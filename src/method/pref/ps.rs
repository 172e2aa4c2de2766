//! The segmentation preference data `Ps` (Sec. 3.2, Alg. 1): for each training question
//! with N ≥ 1 targets, `Np` perturbed copies of its image go through the reference
//! (SFT) model, which gives per copy and target a segmentation embedding `f` and a mask;
//! the masks are scored against the ground truth and the proposals, and three copies
//! become a preference triple (best, medium, worst) for `Ls` (Eq. 4).
//!
//! Choices where the paper is silent (each tested in `tests/pref_ps.rs`):
//!
//! - **Teacher forcing.** Each copy is read with the question and the ground-truth
//!   answer `yg`, so its N codebook groups line up with the N ground-truth masks (our
//!   reading of "for each pair whose ground truth response contains N `<seg>`").
//! - **Noise.** One rectangle per copy (the perturbation kernel's rule), each side drawn
//!   uniformly in [`PsCfg::rect_min`, `PsCfg::rect_max`] of the valid (unpadded) image
//!   side, Gaussian noise of std [`PsCfg::sigma`] in the model's normalized pixel space
//!   (1.0 = one standard deviation of the CLIP normalization), not clamped.  The copies
//!   of question `i` come from seed `splitmix64(seed ^ PS_STREAM ^ i)`, copy `k` of
//!   draw `d` being counter copy `d·Np + k`, so a copy is rebuilt exactly at training
//!   time from `(seed, copy)` and the record's [`Noise`], and never stored.
//! - **Proposals.** The world's instance masks (`Sample::objects`), which play SAM's
//!   class-agnostic masks.
//! - **One order per image.** Alg. 1 ranks images by the pair-level score (the mean of
//!   Eq. 1 over targets, or of the targets' boundary IoUs); that one order serves every
//!   target's `L_s^n` in Eq. 4.  The indicator compares per target: the reference's
//!   best copy against the policy's medium copy, each by its own target's term of
//!   Eq. 1 ([`target_localization`]) or its boundary IoU.
//! - **The second half** uses the first draw of `Np` copies (Alg. 1 does not regenerate
//!   there); `random` takes copies 0, 1, 2 of the first draw (random by construction)
//!   and orders them as the phase's rule would (by `s` in the first half, by boundary
//!   IoU in the second), so only the choice of copies differs from `curriculum`.
use super::curriculum::{
    collect_with_regeneration, order_by, select, target_localization, Outcome, Phase, Triple,
};
use crate::backend::{map_jobs, Backend};
use crate::data::sample::Sample;
use crate::error::{Error, Result};
use crate::kernels::mask::DEFAULT_DILATION_RATIO;
use crate::kernels::mask::{boundary_counts_cpu, iou_from_counts, pair_counts_cpu};
use crate::kernels::perturb::{perturb_cpu, PerturbCfg, Rect};
use crate::model::seg::data::example;
use crate::model::seg::{Example, Pixels, SegModel, SegTokenizer};
use num_traits::Float;
use serde::{Deserialize, Serialize};

/// Mixed into the run seed for the perturbation streams ("PS").
pub const PS_STREAM: u64 = 0x5053_0000_0000_0000;

/// Which triples train in which half (`--ps-collection`, Table 5 and Supp Table 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PsMode {
    /// By `s` (Eq. 1) in the first half, by boundary IoU among the top 5 in the second.
    Curriculum,
    /// The first half's rule throughout.
    S,
    /// The second half's rule throughout.
    Biou,
    /// Three random copies, ordered by the phase's score.
    Random,
    /// Both rules' triples throughout.
    Hybrid,
}

impl std::str::FromStr for PsMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "curriculum" => Ok(PsMode::Curriculum),
            "s" => Ok(PsMode::S),
            "biou" => Ok(PsMode::Biou),
            "random" => Ok(PsMode::Random),
            "hybrid" => Ok(PsMode::Hybrid),
            x => Err(format!(
                "{x}: expected random, s, biou, curriculum or hybrid"
            )),
        }
    }
}

/// How a triple was chosen, which decides the score its indicator compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Highest, median, lowest `s` among copies spanning `min s < 0`, `max s > 0.8`.
    S,
    /// Highest, median, lowest boundary IoU among the top 5 by `s`.
    Biou,
    /// Copies 0, 1, 2 ordered by `s`.
    RandomS,
    /// Copies 0, 1, 2 ordered by boundary IoU.
    RandomBiou,
}

impl Rule {
    /// True when the rule's score is boundary IoU (else Eq. 1's `s`).
    pub fn by_boundary(self) -> bool {
        matches!(self, Rule::Biou | Rule::RandomBiou)
    }
}

impl PsMode {
    /// The rules whose triples train in `phase`.
    pub fn rules(self, phase: Phase) -> &'static [Rule] {
        match (self, phase) {
            (PsMode::Curriculum, Phase::First) | (PsMode::S, _) => &[Rule::S],
            (PsMode::Curriculum, Phase::Second) | (PsMode::Biou, _) => &[Rule::Biou],
            (PsMode::Random, Phase::First) => &[Rule::RandomS],
            (PsMode::Random, Phase::Second) => &[Rule::RandomBiou],
            (PsMode::Hybrid, _) => &[Rule::S, Rule::Biou],
        }
    }
}

/// The `[ps]` table of `popen train pref --config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PsCfg {
    /// Perturbed copies per draw (`Np`, 30 in the paper).
    pub np: usize,
    /// Noise std in normalized pixel units.
    pub sigma: f32,
    /// Rectangle side range as fractions of the valid image side.
    pub rect_min: f64,
    /// Upper end of that range; defaults 0.25 and 0.6, with
    /// `0 < rect_min ≤ rect_max ≤ 1`.
    pub rect_max: f64,
    /// Extra draws when the first half's condition fails (Alg. 1's regeneration bound).
    pub regenerations: usize,
    /// Copies per reference forward.
    pub batch: usize,
    /// Which triples train when (`--ps-collection`).
    pub mode: PsMode,
}

impl Default for PsCfg {
    fn default() -> Self {
        PsCfg {
            np: 30,
            sigma: 1.0,
            rect_min: 0.25,
            rect_max: 0.6,
            regenerations: 3,
            batch: 10,
            mode: PsMode::Curriculum,
        }
    }
}

impl PsCfg {
    /// Errors for values no collection can use.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::arg("[ps]", msg));
        if self.np < 3 {
            return bad(format!(
                "np = {}: need at least 3 copies for a triple",
                self.np
            ));
        }
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return bad(format!("sigma = {}: need a finite value ≥ 0", self.sigma));
        }
        if !(self.rect_min > 0.0 && self.rect_min <= self.rect_max && self.rect_max <= 1.0) {
            return bad(format!(
                "rect_min = {}, rect_max = {}: need 0 < rect_min ≤ rect_max ≤ 1",
                self.rect_min, self.rect_max
            ));
        }
        if self.batch == 0 {
            return bad("batch = 0".into());
        }
        Ok(())
    }

    /// The noise settings, as a record keeps them.
    pub fn noise(&self) -> Noise {
        Noise {
            sigma: self.sigma,
            rect_min: self.rect_min,
            rect_max: self.rect_max,
        }
    }
}

/// How a question's copies were perturbed, kept with its record so that training
/// rebuilds the very copies collection read, whatever `[ps]` says then.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Noise {
    /// Noise std in normalized pixel units ([`PsCfg::sigma`]).
    pub sigma: f32,
    /// Smallest rectangle side, as a fraction of the valid image side.
    pub rect_min: f64,
    /// Largest rectangle side, as a fraction of the valid image side.
    pub rect_max: f64,
}

impl Noise {
    /// The perturbation of `np` copies from absolute copy `first` on an image whose valid
    /// region is `vh × vw`.
    fn perturb_cfg(&self, seed: u64, first: u32, np: usize, vh: usize, vw: usize) -> PerturbCfg {
        let side = |n: usize, f: f64| ((f * n as f64).round() as usize).clamp(1, n);
        PerturbCfg {
            np,
            sigma: self.sigma,
            rect_h: (side(vh, self.rect_min), side(vh, self.rect_max)),
            rect_w: (side(vw, self.rect_min), side(vw, self.rect_max)),
            seed,
            first_copy: first,
        }
    }
}

/// The perturbation seed of question `i`.
pub fn question_seed(seed: u64, i: usize) -> u64 {
    crate::rng::splitmix64(seed ^ PS_STREAM ^ i as u64)
}

/// Copies `first .. first + np` of `px`: noise in one rectangle of the valid region
/// each (the CPU twin of the perturbation kernel on the cropped image); the padding is
/// left as it is.
pub fn perturbed(
    px: &Pixels,
    noise: &Noise,
    seed: u64,
    first: u32,
    np: usize,
) -> Result<Vec<Pixels>> {
    let s = px.data.len() / 3;
    let side = (s as f64).sqrt().round() as usize;
    if side * side * 3 != px.data.len() || px.valid_h > side || px.valid_w > side {
        return Err(Error::arg(
            "perturbed",
            format!(
                "pixels of {} values with a {}×{} valid region are not (3, S, S)",
                px.data.len(),
                px.valid_h,
                px.valid_w
            ),
        ));
    }
    let (vh, vw) = (px.valid_h, px.valid_w);
    let mut crop = vec![0f32; 3 * vh * vw];
    for c in 0..3 {
        for y in 0..vh {
            let src = (c * side + y) * side;
            crop[(c * vh + y) * vw..(c * vh + y + 1) * vw].copy_from_slice(&px.data[src..src + vw]);
        }
    }
    let pc = noise.perturb_cfg(seed, first, np, vh, vw);
    let mut out = vec![0f32; np * crop.len()];
    let mut rects = vec![Rect::default(); np];
    perturb_cpu(&crop, 1, 3, vh, vw, &pc, &mut out, &mut rects)?;
    Ok(out
        .chunks_exact(crop.len())
        .map(|cp| {
            let mut p = px.clone();
            for c in 0..3 {
                for y in 0..vh {
                    let dst = (c * side + y) * side;
                    p.data[dst..dst + vw]
                        .copy_from_slice(&cp[(c * vh + y) * vw..(c * vh + y + 1) * vw]);
                }
            }
            p
        })
        .collect())
}

/// What a question's masks are scored against: its targets' ground truth and the
/// proposals (0/1 at the image's size), with each proposal's IoU against each target.
#[derive(Clone, Debug)]
pub struct TargetRefs {
    /// Image height in pixels (every mask holds `h·w` values).
    pub h: usize,
    /// Image width in pixels.
    pub w: usize,
    /// (N) each target's ground-truth mask, 0/1.
    pub gt: Vec<Vec<u8>>,
    /// (Ns) the proposals: the image's instance masks (`Sample::objects`), 0/1.
    pub props: Vec<Vec<u8>>,
    /// (N, Ns): IoU(M_s^j, M_g^n).
    pub props_vs_gt: Vec<Vec<f64>>,
}

fn binary(m: &crate::data::mask::Mask) -> Vec<u8> {
    m.data.iter().map(|&v| u8::from(v == 1)).collect()
}

/// IoUs of every `a` against every `b` (A, B) from the mask kernel's batched counts.
fn ious(a: &[Vec<u8>], b: &[Vec<u8>], h: usize, w: usize) -> Result<Vec<Vec<f64>>> {
    if a.is_empty() || b.is_empty() {
        return Ok(vec![Vec::new(); a.len()]);
    }
    let (pa, pb) = (a.concat(), b.concat());
    let mut inter = vec![0u64; a.len() * b.len()];
    let mut union = vec![0u64; a.len() * b.len()];
    pair_counts_cpu(&pa, &pb, a.len(), b.len(), h, w, &mut inter, &mut union)?;
    Ok(inter
        .chunks_exact(b.len())
        .zip(union.chunks_exact(b.len()))
        .map(|(i, u)| {
            i.iter()
                .zip(u)
                .map(|(&i, &u)| iou_from_counts(i, u))
                .collect()
        })
        .collect())
}

impl TargetRefs {
    /// The references of `s`: its targets and objects as 0/1 masks; an error when a
    /// mask does not hold `height·width` values.
    pub fn of_sample(s: &Sample) -> Result<Self> {
        let (h, w) = (s.height, s.width);
        let gt: Vec<Vec<u8>> = s.targets.iter().map(|t| binary(&t.mask)).collect();
        let props: Vec<Vec<u8>> = s.objects.iter().map(|t| binary(&t.mask)).collect();
        for (what, ms) in [("target", &gt), ("object", &props)] {
            for (j, m) in ms.iter().enumerate() {
                crate::error::check_len("TargetRefs", &format!("{what} {j} mask"), m.len(), h * w)?;
            }
        }
        let props_vs_gt = ious(&gt, &props, h, w)?;
        Ok(TargetRefs {
            h,
            w,
            gt,
            props,
            props_vs_gt,
        })
    }

    /// Per target: Eq. 1's term and the boundary IoU of the predicted masks `pred` (N).
    pub fn score(&self, pred: &[Vec<u8>]) -> Result<(Vec<f64>, Vec<f64>)> {
        crate::error::check_len("TargetRefs::score", "masks", pred.len(), self.gt.len())?;
        let (h, w) = (self.h, self.w);
        let vs_props = ious(pred, &self.props, h, w)?;
        let mut s = Vec::with_capacity(pred.len());
        let mut b = Vec::with_capacity(pred.len());
        for (n, m) in pred.iter().enumerate() {
            let (i, u) = crate::kernels::mask::counts_cpu(m, &self.gt[n])?;
            s.push(target_localization(
                iou_from_counts(i, u),
                &vs_props[n],
                &self.props_vs_gt[n],
            ));
            let (bi, bu) = boundary_counts_cpu(m, &self.gt[n], h, w, DEFAULT_DILATION_RATIO)?;
            b.push(iou_from_counts(bi, bu));
        }
        Ok((s, b))
    }
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// One preference triple with what the reference gave for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PsTriple {
    /// The rule that chose the copies, which also picks the indicator's measure.
    pub rule: Rule,
    /// Absolute copy indices, best, medium, worst.
    pub copies: [u32; 3],
    /// The reference's embeddings `f_ref` (N, 3, E) in triple order, E = L·D.
    pub ref_emb: Vec<f32>,
    /// Per target: the reference best copy's score by the rule's measure (the left side
    /// of Eq. 4's indicator).
    pub ref_best: Vec<f64>,
}

/// A question's `Ps`, as kept in `RUN/ps.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PsRecord {
    /// Index of the question in the training file.
    pub sample: usize,
    /// Perturbation seed of the question's copies.
    pub seed: u64,
    /// Their noise settings.
    pub noise: Noise,
    /// Draws of `Np` copies made (1 + regenerations used).
    pub draws: usize,
    /// The collected triples, at most one per [`Rule`] (`s` only when a draw met the
    /// first half's condition).
    pub triples: Vec<PsTriple>,
}

impl PsRecord {
    /// The triple of `rule`, when it was collected.
    pub fn triple(&self, rule: Rule) -> Option<&PsTriple> {
        self.triples.iter().find(|t| t.rule == rule)
    }
}

/// Counts of a `Ps` collection (`RUN/collect.json`, under `ps`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PsCounts {
    /// Questions read, with targets or without.
    pub questions: usize,
    /// Questions with no target (no `<seg>`): no `Ps`.
    pub no_target: usize,
    /// Questions whose draws met the first half's condition (an `s` triple).
    pub s_selected: usize,
    /// Questions whose every draw failed it (no `s` triple, counted per Alg. 1).
    pub s_skipped: usize,
    /// Draws beyond the first.
    pub regenerations: usize,
    /// Perturbed copies read by the reference.
    pub copies: usize,
    /// Copies with `s < 0` and with `s > 0.8`.
    pub copies_s_below_0: usize,
    /// Copies with `s > 0.8`.
    pub copies_s_above_0_8: usize,
    /// Means over questions of the first draw's highest and lowest `s`.
    pub mean_s_max: f64,
    /// The mean of the first draw's lowest `s` (over the questions with targets, as
    /// `mean_s_max`).
    pub mean_s_min: f64,
}

impl PsCounts {
    /// Adds another run's counts and sums (before [`collect_ps`] turns the two sums
    /// into means).
    fn add(&mut self, o: &PsCounts) {
        // every field named, so that a new count cannot be left out
        let PsCounts {
            questions,
            no_target,
            s_selected,
            s_skipped,
            regenerations,
            copies,
            copies_s_below_0,
            copies_s_above_0_8,
            mean_s_max,
            mean_s_min,
        } = o;
        self.questions += questions;
        self.no_target += no_target;
        self.s_selected += s_selected;
        self.s_skipped += s_skipped;
        self.regenerations += regenerations;
        self.copies += copies;
        self.copies_s_below_0 += copies_s_below_0;
        self.copies_s_above_0_8 += copies_s_above_0_8;
        self.mean_s_max += mean_s_max;
        self.mean_s_min += mean_s_min;
    }
}

/// Questions collected side by side at most (a chunk between two progress reports).
const PS_JOBS: usize = 8;

/// What the reference gives for one copy: per target `s` term, boundary IoU and `f`.
struct CopyResult {
    s: Vec<f64>,
    b: Vec<f64>,
    emb: Vec<f32>,
}

/// Reads `copies` (teacher-forced on `gt`'s answer) through `model`: per copy the
/// targets' scores and embeddings (N·E).  Copies go `batch` at a time.
fn read_copies<F: Float, B: Backend<F>>(
    model: &SegModel<F, B>,
    gt: &Example,
    refs: &TargetRefs,
    copies: Vec<Pixels>,
    batch: usize,
) -> Result<Vec<CopyResult>> {
    let be = model.llava.be.clone();
    let n = gt.masks.len();
    let mut out = Vec::with_capacity(copies.len());
    let mut it = copies.into_iter().peekable();
    while it.peek().is_some() {
        let exs: Vec<Example> = it
            .by_ref()
            .take(batch)
            .map(|pixels| Example {
                pixels,
                enc: gt.enc.clone(),
                masks: gt.masks.clone(),
                classes: Default::default(),
                categories: gt.categories.clone(),
            })
            .collect();
        let pass = model.forward_pass(&exs)?;
        let emb = pass.seg_embeddings(&be);
        let logits = pass.mask_logits(&be);
        let e = emb.len() / (exs.len() * n).max(1);
        for (c, lg) in logits.chunks(n).enumerate() {
            let pred: Vec<Vec<u8>> = lg
                .iter()
                .map(|l| l.iter().map(|&x| u8::from(x > F::zero())).collect())
                .collect();
            let (s, b) = refs.score(&pred)?;
            out.push(CopyResult {
                s,
                b,
                emb: emb[c * n * e..(c + 1) * n * e]
                    .iter()
                    .map(|x| x.to_f32().unwrap_or(f32::NAN))
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// The triple `t` (indices into `draw`) as a record: embeddings in triple order.
fn triple_of(rule: Rule, t: Triple, first: u32, draw: &[CopyResult], n: usize) -> PsTriple {
    let e = draw[0].emb.len() / n.max(1);
    let mut ref_emb = Vec::with_capacity(n * 3 * e);
    for tn in 0..n {
        for &c in &t {
            ref_emb.extend_from_slice(&draw[c].emb[tn * e..(tn + 1) * e]);
        }
    }
    let best = &draw[t[0]];
    PsTriple {
        rule,
        copies: t.map(|c| first + c as u32),
        ref_emb,
        ref_best: if rule.by_boundary() {
            best.b.clone()
        } else {
            best.s.clone()
        },
    }
}

/// Alg. 1 for question `i`: its `Ps` record, or `None` when it has no target.
pub fn collect_question<F: Float, B: Backend<F>>(
    model: &SegModel<F, B>,
    tok: &SegTokenizer,
    s: &Sample,
    i: usize,
    cfg: &PsCfg,
    seed: u64,
    counts: &mut PsCounts,
) -> Result<Option<PsRecord>> {
    counts.questions += 1;
    if s.targets.is_empty() {
        counts.no_target += 1;
        return Ok(None);
    }
    let gt = example(&model.cfg, tok, s)?;
    let refs = TargetRefs::of_sample(s)?;
    let n = gt.masks.len();
    let qseed = question_seed(seed, i);
    let mut draws: Vec<Vec<CopyResult>> = Vec::new();
    // the first draw's pair-level scores: the second half's and the random triples'
    let mut first_scores = (Vec::new(), Vec::new());
    let outcome = collect_with_regeneration(Phase::First, cfg.regenerations, |k| {
        let first = (k * cfg.np) as u32;
        let copies = perturbed(&gt.pixels, &cfg.noise(), qseed, first, cfg.np)?;
        let d = read_copies(model, &gt, &refs, copies, cfg.batch)?;
        counts.copies += d.len();
        let s: Vec<f64> = d.iter().map(|c| mean(&c.s)).collect();
        let b: Vec<f64> = d.iter().map(|c| mean(&c.b)).collect();
        counts.copies_s_below_0 += s.iter().filter(|&&x| x < 0.0).count();
        counts.copies_s_above_0_8 += s.iter().filter(|&&x| x > 0.8).count();
        draws.push(d);
        if k == 0 {
            first_scores = (s.clone(), b.clone());
        }
        Ok::<_, Error>((s, b))
    })?;
    let d0 = &draws[0];
    let (s0, b0) = first_scores;
    counts.mean_s_max += s0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    counts.mean_s_min += s0.iter().copied().fold(f64::INFINITY, f64::min);
    let mut triples = Vec::new();
    let n_draws = match outcome {
        Outcome::Selected { triple, draws: k } => {
            counts.s_selected += 1;
            let first = ((k - 1) * cfg.np) as u32;
            triples.push(triple_of(Rule::S, triple, first, &draws[k - 1], n));
            k
        }
        Outcome::Skipped { draws: k } => {
            counts.s_skipped += 1;
            k
        }
    };
    counts.regenerations += n_draws - 1;
    if let Some(t) = select(Phase::Second, &s0, &b0) {
        triples.push(triple_of(Rule::Biou, t, 0, d0, n));
    }
    triples.push(triple_of(Rule::RandomS, order_by(&s0, [0, 1, 2]), 0, d0, n));
    triples.push(triple_of(
        Rule::RandomBiou,
        order_by(&b0, [0, 1, 2]),
        0,
        d0,
        n,
    ));
    Ok(Some(PsRecord {
        sample: i,
        seed: qseed,
        noise: cfg.noise(),
        draws: n_draws,
        triples,
    }))
}

/// Alg. 1 over `samples` with the reference `model`; `progress` is called with the
/// number of questions done.
pub fn collect_ps<F: Float, B: Backend<F>>(
    model: &SegModel<F, B>,
    tok: &SegTokenizer,
    samples: &[Sample],
    cfg: &PsCfg,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Result<(Vec<PsRecord>, PsCounts)> {
    cfg.validate()?;
    let mut counts = PsCounts::default();
    let mut out = Vec::new();
    // questions are independent (each draws from its own seed): a chunk of them runs
    // side by side where the backend gains from it, and their counts are added in
    // question order, so every sum is the one-by-one sum
    let idx: Vec<usize> = (0..samples.len()).collect();
    for chunk in idx.chunks(PS_JOBS) {
        let done = map_jobs(&model.llava.be, chunk.to_vec(), |i| {
            let mut c = PsCounts::default();
            collect_question(model, tok, &samples[i], i, cfg, seed, &mut c).map(|r| (r, c))
        });
        for d in done {
            let (r, c) = d?;
            counts.add(&c);
            out.extend(r);
            progress(1);
        }
    }
    let with = counts.questions - counts.no_target;
    if with > 0 {
        counts.mean_s_max /= with as f64;
        counts.mean_s_min /= with as f64;
    }
    Ok((out, counts))
}
