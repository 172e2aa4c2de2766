//! Stage 2: preference optimization (Sec. 3.2) from a stage-1 run.
//!
//! The loss is `Lt + Ls + Lce`: the DPO loss `Lt` (Eq. 2, 3) on the text preference
//! `Pt` ([`collect`]), the segmentation preference loss `Ls` (Eq. 4, [`ls`]) on the
//! triples of `Ps` (Alg. 1, [`ps`], [`curriculum`]), and the stage-1 mask loss `Lce` on
//! the ground-truth masks.  The mask decoder and the vision tower are frozen; the LLM,
//! the projector and the codebook head train.
//!
//! **The curriculum.** Steps `1 ..= ⌈T/2⌉` of a `T`-step run are the first half (triples
//! chosen by `s`, indicator by Eq. 1's term), the rest the second (triples chosen by
//! boundary IoU among the top 5 by `s`, indicator by boundary IoU); `[ps] mode`
//! (`--ps-collection`) swaps in Table 5's alternatives.  The dataset is the `Pt` pairs;
//! each carries its question's `Ps` record, so a question whose `Pt` collection was
//! skipped trains no `Ls` either.
//!
//! **Eq. 3's normalizer.** The paper divides the λ-weighted sum of token log-probs by
//! `|y|`, the number of tokens (`norm = "tokens"`, the default).  RLHF-V, which the
//! paper follows, divides by the weighted count `|y| + (λ − 1)·|Ly|` instead
//! (`norm = "weighted"`), which keeps a sequence log-prob on the scale of a mean token
//! log-prob whatever the number of changed tokens.
//!
//! **The reference.** `πref` is the SFT model at the start of the stage and never
//! changes, so its Eq. 3 log-probs are computed once during collection and kept with
//! each pair (`RUN/pt.jsonl`); no second model is held in memory.
pub mod collect;
pub mod contrast;
pub mod curriculum;
pub mod ls;
pub mod ps;

use crate::backend::{Backend, Cpu};
use crate::data::sample::Sample;
use crate::error::{Error, Result};
use crate::method::ensemble::EnsembleCfg;
use crate::method::losses::{dpo_loss, BETA_T, LAMBDA};
use crate::method::reread::{reread_picks, sampled_rereads, Reread};
use crate::model::seg::data::{encode_fitting, example};
use crate::model::seg::pass::{HeadWeights, TrainPass};
use crate::model::seg::run::CONFIG_FILE;
use crate::model::seg::{Example, LossWeights, SegModel, SegTokenizer, Trainable as Parts};
use crate::nn::{Rng, Tensor};
use crate::train::{Dataset, LossParts, TrainConfig, TrainSummary, Trainable, Trainer};
use collect::{collect_pt, text_example, CollectCfg, PtCounts, PtPair};
use contrast::ContrastRow;
use curriculum::Phase;
use ls::{ls_step, PsItem};
use num_traits::Float;
use ps::{collect_ps, PsCfg, PsCounts, PsRecord, TargetRefs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Eq. 3's normalizer (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Eq3Norm {
    /// `1/|y|` (the paper).
    Tokens,
    /// `1/(|y| + (λ − 1)·|Ly|)` (RLHF-V).
    Weighted,
}

/// The stage-2 loss settings (the `[loss]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefLossCfg {
    /// βt of Eq. 2 (0.5).
    pub beta_t: f64,
    /// λ of Eq. 3 (5); 1 = `--no-lambda`.
    pub lambda: f64,
    /// Eq. 3's normalizer: `tokens` (the paper's, the default) or `weighted` (RLHF-V).
    pub norm: Eq3Norm,
    /// Train with `Lt` (`--no-lt` turns it off, leaving `Lce`).
    pub lt: bool,
    /// Weight of an extra negative log-likelihood of the chosen answer `yc` (mean over
    /// its tokens and the pairs), as RPO adds to DPO against likelihood displacement.
    /// 0 (the default) is the paper's loss; `--nll W` sets it.
    pub nll: f64,
    /// Weight of the image-conditional preference ([`contrast`], ours): `yc` on its
    /// image over `yc` on an image that lacks what it names.  0 (the default) is off
    /// and collects no contrast; `--image-pref W` sets it.
    pub image_pref: f64,
    /// Which image is the contrast: `next` (the default) or `similar`
    /// ([`contrast::ContrastPick`]); `--image-pref-contrast` sets it.
    pub image_pref_contrast: contrast::ContrastPick,
    /// Collect `Ps` and train with `Ls` (`--no-ls` turns both off).
    pub ls: bool,
    /// βs of Eq. 4 (10).
    pub beta_s: f64,
    /// Eq. 4's indicator (`--no-indicator`: every target's loss counts).
    pub indicator: bool,
    /// `Lce`: the stage-1 mask loss on the ground-truth masks (BCE and Dice weights).
    pub bce: f32,
    /// Weight of `Lce`'s Dice term (0.5, stage 1's default).
    pub dice: f32,
}

impl Default for PrefLossCfg {
    fn default() -> Self {
        PrefLossCfg {
            beta_t: BETA_T,
            lambda: LAMBDA,
            norm: Eq3Norm::Tokens,
            lt: true,
            nll: 0.0,
            image_pref: 0.0,
            image_pref_contrast: contrast::ContrastPick::Next,
            ls: true,
            beta_s: crate::method::losses::BETA_S,
            indicator: true,
            bce: LossWeights::default().bce,
            dice: LossWeights::default().dice,
        }
    }
}

impl PrefLossCfg {
    /// Errors for weights no run can use: `nll` and `image_pref` must be finite and
    /// ≥ 0 (a negative one would reward the opposite).
    pub fn validate(&self) -> Result<()> {
        for (name, w) in [("nll", self.nll), ("image_pref", self.image_pref)] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::arg(
                    "[loss]",
                    format!("{name} = {w}: expected a weight >= 0"),
                ));
            }
        }
        Ok(())
    }

    /// The weight of each of `n` answer tokens in Eq. 3 (λ on `changed`, then the
    /// normalizer): `log π(y) = Σ_i w_i·log p(y_i)`.
    pub fn eq3_weights(&self, n: usize, changed: &[usize]) -> Vec<f64> {
        let mut w = vec![1.0; n];
        let mut n_changed = 0;
        for &i in changed {
            if i < n && w[i] == 1.0 {
                w[i] = self.lambda;
                n_changed += 1;
            }
        }
        let denom = match self.norm {
            Eq3Norm::Tokens => n as f64,
            Eq3Norm::Weighted => n as f64 + (self.lambda - 1.0) * n_changed as f64,
        };
        if denom > 0.0 {
            w.iter_mut().for_each(|x| *x /= denom);
        }
        w
    }
}

/// The run config of `popen train pref` (`--config FILE.toml`): `[train]`, `[loss]`,
/// `[collect]` (`Pt`), `[ps]` (`Ps`); unknown keys are errors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefConfig {
    /// `[train]`: optimizer, schedule, checkpoints, and the seed of training and of both
    /// collections.
    pub train: TrainConfig,
    /// `[loss]`: which of `Lt`, `Ls`, `Lce` train, and their settings.
    pub loss: PrefLossCfg,
    /// `[collect]`: how `Pt` is collected, and stage 2's re-read mix.
    pub collect: CollectCfg,
    /// `[ps]`: how `Ps` is collected (Alg. 1) and which triples train when.
    pub ps: PsCfg,
}

/// Where stage 2 reads and writes.
#[derive(Clone, Debug)]
pub struct PrefPaths {
    /// The stage-1 run directory (`popen train sft --out`).
    pub from: PathBuf,
    /// The training file (MUSE schema) whose questions give `Pt`, `Ps` and `Lce`.
    pub data: PathBuf,
    /// Image root (default: the data file's folder).
    pub images: Option<PathBuf>,
    /// The stage-2 run directory to write (and to resume from): the collections
    /// (`pt.jsonl`, `ps.jsonl`, `reread.jsonl`, `collect.json`) and the checkpoints.
    pub out: PathBuf,
}

/// One training item: a `Pt` pair on its image, the ground-truth example for `Lce`,
/// and the question's `Ps` when it has one.
pub struct PrefItem {
    /// The rejected response `y` on the question's image (text only, no masks).
    pub y: Example,
    /// The chosen response `yc` (text only, no masks).
    pub yc: Example,
    /// Changed positions among `y`'s answer tokens, weighted by λ in Eq. 3.
    pub ly: Vec<usize>,
    /// Changed positions among `yc`'s answer tokens.
    pub lyc: Vec<usize>,
    /// The reference's Eq. 3 log-prob of `y`, computed at collection.
    pub ref_y: f64,
    /// The reference's Eq. 3 log-prob of `yc`.
    pub ref_yc: f64,
    /// The question with its ground-truth answer and masks: `Lce`'s row, and what the
    /// `Ps` copies perturb and are teacher-forced on.
    pub gt: Example,
    /// The question's `Ps`; `None` when it has none (no target, or `Ls` off).
    pub ps: Option<PsItem>,
    /// The question asked again after the policy's own samples (`[collect] reread`),
    /// with the ground-truth answer and masks.
    pub reread: Option<Example>,
    /// `yc` on the pair's contrast image (`[loss] image_pref`), when it has one.
    pub contrast: Option<ContrastRow>,
}

/// The policy as the trainer sees it.
pub struct PrefModel<B: Backend<f32> = Cpu> {
    /// The policy (the vision tower and the mask decoder frozen).
    pub model: SegModel<f32, B>,
    /// The `[loss]` settings.
    pub loss: PrefLossCfg,
    /// The `[ps]` settings (`mode` picks the triples that train in each half).
    pub ps: PsCfg,
    /// The curriculum's half of the current step (set by [`Trainable::begin_step`]).
    pub phase: Phase,
}

/// The curriculum's half of `step` (1-based) in a run of `total` steps: the first
/// `⌈total/2⌉` steps are the first half.
pub fn phase_of(step: u64, total: u64) -> Phase {
    if 2 * step.saturating_sub(1) < total {
        Phase::First
    } else {
        Phase::Second
    }
}

impl<B: Backend<f32>> Trainable for PrefModel<B> {
    type Item = PrefItem;
    type Be = B;
    fn backend(&self) -> B {
        self.model.llava.be.clone()
    }
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor<f32, B>)> {
        self.model.params_mut()
    }
    fn begin_step(&mut self, step: u64, total: u64) {
        self.phase = phase_of(step, total);
    }
    fn accumulate(&mut self, batch: &[PrefItem], scale: f32, _rng: &mut Rng) -> Result<LossParts> {
        let mut lp = pref_step(&mut self.model, batch, &self.loss, scale, true)?;
        if self.loss.ls {
            let items: Vec<(&Example, &PsItem)> = batch
                .iter()
                .filter_map(|it| it.ps.as_ref().map(|p| (&it.gt, p)))
                .collect();
            let phase = self.phase;
            let out = ls_step(
                &mut self.model,
                &items,
                &self.loss,
                &self.ps,
                phase,
                scale,
                true,
            )?;
            let ls = out.as_ref().map_or(0.0, |o| o.loss);
            lp.loss += ls;
            if let Some(o) = out {
                lp.parts.extend(o.parts);
            } else {
                lp.parts.insert("ls".into(), 0.0);
            }
            lp.parts.insert(
                "phase".into(),
                if phase == Phase::First { 1.0 } else { 2.0 },
            );
        }
        Ok(lp)
    }
    fn save_weights(&mut self, path: &Path) -> Result<()> {
        self.model.save_weights(path)
    }
    fn load_weights(&mut self, path: &Path) -> Result<()> {
        self.model.load_weights(path)
    }
}

/// One stage-2 micro-batch on `model`: the loss and its parts, and with `backward` the
/// gradient of `scale · loss` accumulated into the trainable parameters.
///
/// forward: `L = Lt + α·NLL + ω·L_img + R + w_bce·BCE + w_dice·Dice`, `Lt` the mean
/// DPO loss (Eq. 2) of the batch's pairs on Eq. 3 log-probs `log π = Σ_i w_i·logp_i`
/// against the cached reference values, `NLL = −(1/B) Σ_pairs (1/|yc|) Σ_i logp_i(yc)`
/// (α = `nll`, 0 by default), `L_img` the mean DPO loss of `yc` on its image over `yc`
/// on its contrast image, with `yc`'s weights on both, over the pairs with a contrast
/// row (ω = `image_pref`, 0 by default; [`contrast`]),
/// `R = −(1/B) Σ_{pairs with a re-read row} (1/|a|) Σ_i logp_i(a)` the cross-entropy
/// of the ground-truth answer `a` after the policy's samples (`[collect] reread`; B
/// counts every pair, so R's weight follows the fraction), BCE and Dice the means over
/// the ground-truth masks of the batch, the re-read rows' included (`Lce`);
/// so `∂L/∂logp_i = w_i·∂Lt/∂log π` on each response's answer tokens, plus
/// `−α/(B·|yc|)` on the chosen one's, `ω·w_i·∂L_img/∂log π` on the chosen one's and
/// its contrast row's, and `−1/(B·|a|)` on a re-read answer's.
pub fn pref_step<F: Float, B: Backend<F>>(
    model: &mut SegModel<F, B>,
    batch: &[PrefItem],
    lc: &PrefLossCfg,
    scale: f32,
    backward: bool,
) -> Result<LossParts> {
    let mut exs = Vec::with_capacity(3 * batch.len());
    for it in batch {
        exs.push(it.y.clone());
        exs.push(it.yc.clone());
        exs.push(it.gt.clone());
    }
    // `yc` on the contrast images after the 3·B rows: (item, row)
    let mut contrast = Vec::new();
    if lc.image_pref != 0.0 {
        for (i, it) in batch.iter().enumerate() {
            if let Some(c) = &it.contrast {
                contrast.push((i, exs.len()));
                exs.push(c.example.clone());
            }
        }
    }
    // the re-read rows in a pass of their own: they are several answers long, and in
    // one pass the pairs' rows pad to them (demo seed 1, 100 steps: 215 s in one pass,
    // 185 s in two)
    let rr_exs: Vec<Example> = batch.iter().filter_map(|it| it.reread.clone()).collect();
    let pass = model.forward_pass(&exs)?;
    let rr_pass = match rr_exs.is_empty() {
        true => None,
        false => Some(model.forward_pass(&rr_exs)?),
    };
    let mut weights = Vec::with_capacity(2 * batch.len());
    let (mut pol_c, mut pol_r, mut ref_c, mut ref_r) = (vec![], vec![], vec![], vec![]);
    for (i, it) in batch.iter().enumerate() {
        for (row, ch, pol) in [
            (3 * i, &it.ly, &mut pol_r),
            (3 * i + 1, &it.lyc, &mut pol_c),
        ] {
            let rows = &pass.answer_rows[row];
            let w = lc.eq3_weights(rows.len(), ch);
            pol.push(
                rows.iter()
                    .zip(&w)
                    .map(|(&r, w)| w * pass.logp[r])
                    .sum::<f64>(),
            );
            weights.push(w);
        }
        ref_r.push(it.ref_y);
        ref_c.push(it.ref_yc);
    }
    let dpo = dpo_loss(&pol_c, &pol_r, &ref_c, &ref_r, lc.beta_t)?;
    // the image-conditional preference: yc on its image (chosen) over yc on the
    // contrast image (rejected), with yc's Eq. 3 weights on both
    let img = match contrast.is_empty() {
        true => None,
        false => {
            let eq3 = |row: usize, w: &[f64]| {
                let rows = &pass.answer_rows[row];
                rows.iter()
                    .zip(w)
                    .map(|(&r, w)| w * pass.logp[r])
                    .sum::<f64>()
            };
            let (mut pc, mut pr, mut rc, mut rr) = (vec![], vec![], vec![], vec![]);
            for &(i, row) in &contrast {
                let it = &batch[i];
                pc.push(pol_c[i]);
                pr.push(eq3(row, &weights[2 * i + 1]));
                rc.push(it.ref_yc);
                rr.push(it.contrast.as_ref().map_or(0.0, |c| c.ref_yc));
            }
            Some(dpo_loss(&pc, &pr, &rc, &rr, lc.beta_t)?)
        }
    };
    let mask_losses: Vec<(f64, f64)> = [Some(&pass), rr_pass.as_ref()]
        .into_iter()
        .flatten()
        .flat_map(|p| p.mask_losses.iter().copied())
        .collect();
    let mf = mask_losses.len().max(1) as f64;
    let bce = mask_losses.iter().map(|x| x.0).sum::<f64>() / mf;
    let dice = mask_losses.iter().map(|x| x.1).sum::<f64>() / mf;
    let lt = if lc.lt { dpo.loss } else { 0.0 };
    let b = batch.len() as f64;
    let mean_nll = |p: &TrainPass<B::Buf>, row: usize| {
        let rows = &p.answer_rows[row];
        -rows.iter().map(|&r| p.logp[r]).sum::<f64>() / rows.len().max(1) as f64
    };
    let nll = (0..batch.len())
        .map(|i| mean_nll(&pass, 3 * i + 1))
        .sum::<f64>()
        / b;
    let rr = rr_pass.as_ref().map_or(0.0, |p| {
        (0..rr_exs.len()).map(|j| mean_nll(p, j)).sum::<f64>() / b
    });
    let l_img = img.as_ref().map_or(0.0, |d| d.loss);
    let total = lt
        + lc.nll * nll
        + lc.image_pref * l_img
        + rr
        + lc.bce as f64 * bce
        + lc.dice as f64 * dice;
    if !total.is_finite() {
        return Err(Error::NonFinite {
            what: "stage-2 loss".into(),
        });
    }
    let mut parts: BTreeMap<String, f64> = [
        ("lt".to_string(), dpo.loss),
        ("nll".into(), nll),
        ("bce".into(), bce),
        ("dice".into(), dice),
        ("reward_margin".into(), dpo.margin.iter().sum::<f64>() / b),
        (
            "reward_acc".into(),
            dpo.margin.iter().filter(|&&z| z > 0.0).count() as f64 / b,
        ),
    ]
    .into();
    if rr_pass.is_some() {
        parts.insert("reread".into(), rr);
    }
    if let Some(d) = &img {
        let n = d.margin.len() as f64;
        parts.insert("image_pref".into(), d.loss);
        parts.insert(
            "image_pref_acc".into(),
            d.margin.iter().filter(|&&z| z > 0.0).count() as f64 / n,
        );
    }
    let tokens = pass.n_tokens + rr_pass.as_ref().map_or(0, |p| p.n_tokens);
    if backward {
        let mut dlogp = vec![0.0; pass.logp.len()];
        if lc.lt {
            for i in 0..batch.len() {
                let grads = [
                    (3 * i, &weights[2 * i], dpo.d_policy_rejected[i]),
                    (3 * i + 1, &weights[2 * i + 1], dpo.d_policy_chosen[i]),
                ];
                for (row, w, d) in grads {
                    for (&r, w) in pass.answer_rows[row].iter().zip(w) {
                        dlogp[r] = w * d * scale as f64;
                    }
                }
            }
        }
        if let Some(d) = &img {
            for (k, &(i, row)) in contrast.iter().enumerate() {
                let w = &weights[2 * i + 1];
                let grads = [
                    (3 * i + 1, d.d_policy_chosen[k]),
                    (row, d.d_policy_rejected[k]),
                ];
                for (row, g) in grads {
                    for (&r, w) in pass.answer_rows[row].iter().zip(w) {
                        dlogp[r] += lc.image_pref * w * g * scale as f64;
                    }
                }
            }
        }
        // −w/(B·|a|) on each answer token of a row: the chosen answers' NLL, the
        // re-read answers' R
        let mean_grad = |dlogp: &mut [f64], rows: &[usize], weight: f64| {
            let g = -weight / (b * rows.len().max(1) as f64) * scale as f64;
            for &r in rows {
                dlogp[r] += g;
            }
        };
        if lc.nll != 0.0 {
            for i in 0..batch.len() {
                mean_grad(&mut dlogp, &pass.answer_rows[3 * i + 1], lc.nll);
            }
        }
        let wm = scale as f64 / mf;
        let mask_w = (lc.bce as f64 * wm, lc.dice as f64 * wm);
        model.backward_pass(&exs, pass, &dlogp, mask_w, None, HeadWeights::NONE)?;
        if let Some(p) = rr_pass {
            let mut dlogp = vec![0.0; p.logp.len()];
            for rows in &p.answer_rows {
                mean_grad(&mut dlogp, rows, 1.0);
            }
            model.backward_pass(&rr_exs, p, &dlogp, mask_w, None, HeadWeights::NONE)?;
        }
    }
    Ok(LossParts {
        loss: total,
        parts,
        tokens,
    })
}

/// `Pt` pairs on their samples (with each question's `Ps`), preprocessed on demand.
pub struct PrefData<'a> {
    /// The `Pt` pairs, one training item each.
    pub pairs: Vec<PtPair>,
    /// `Ps` records by question index.
    pub ps: BTreeMap<usize, PsRecord>,
    /// The training file's questions, which the pairs and records index.
    pub samples: &'a [Sample],
    /// The model's config, which the examples are built for.
    pub model_cfg: &'a crate::model::seg::SegModelConfig,
    /// The tokenizer that encodes the examples.
    pub tok: &'a SegTokenizer,
    /// The answers each re-read question reads (`[collect] reread`), by question index.
    pub reread: BTreeMap<usize, Vec<String>>,
    /// The longest re-read row in ids (the model's context less its image positions,
    /// plus the image token); answers to read past it are dropped from the end.
    pub max_ids: usize,
    /// Build each pair's contrast row (`[loss] image_pref` on); off, a `pt.jsonl`
    /// collected with contrasts trains without reading their images.
    pub contrast: bool,
}

impl Dataset for PrefData<'_> {
    type Item = PrefItem;
    fn len(&self) -> usize {
        self.pairs.len()
    }
    fn load(&self, i: usize) -> Result<PrefItem> {
        let p = &self.pairs[i];
        let s = self.samples.get(p.sample).ok_or_else(|| {
            Error::arg(
                "PrefData",
                format!(
                    "pair {i} names question {} of {}",
                    p.sample,
                    self.samples.len()
                ),
            )
        })?;
        let gt = example(self.model_cfg, self.tok, s)?;
        let px = &gt.pixels;
        let ps = match self.ps.get(&p.sample) {
            Some(r) => Some(PsItem {
                record: r.clone(),
                refs: TargetRefs::of_sample(s)?,
            }),
            None => None,
        };
        Ok(PrefItem {
            y: text_example(self.model_cfg, self.tok, px, &s.question, &p.y)?,
            yc: text_example(self.model_cfg, self.tok, px, &s.question, &p.yc)?,
            ly: p.ly.clone(),
            lyc: p.lyc.clone(),
            ref_y: p.ref_y,
            ref_yc: p.ref_yc,
            // the ground truth's image and masks, read once
            reread: match (self.reread.get(&p.sample), &s.answer) {
                (Some(read), Some(answer)) => Some(Example {
                    enc: encode_fitting(
                        self.model_cfg,
                        self.tok,
                        &s.question,
                        read,
                        answer,
                        self.max_ids,
                    )?,
                    ..gt.clone()
                }),
                _ => None,
            },
            contrast: match p.contrast.as_ref().filter(|_| self.contrast) {
                Some(c) => {
                    let pixels = contrast::contrast_pixels(
                        self.samples,
                        p.sample,
                        c,
                        &p.yc,
                        self.model_cfg.image_size,
                    )?;
                    Some(ContrastRow {
                        example: text_example(
                            self.model_cfg,
                            self.tok,
                            &pixels,
                            &s.question,
                            &p.yc,
                        )?,
                        ref_yc: c.ref_yc,
                    })
                }
                None => None,
            },
            gt,
            ps,
        })
    }
}

/// What stage 2 collected and trained.
#[derive(Clone, Debug)]
pub struct PrefSummary {
    /// `Pt`'s counts.
    pub counts: PtCounts,
    /// `Pt` pairs trained on.
    pub pairs: usize,
    /// `Ps`'s counts and records (`None` with `--no-ls`).
    pub ps: Option<PsCounts>,
    /// Questions with a `Ps` record.
    pub ps_records: usize,
    /// The chat corrector's outcomes, when it ran.
    pub chat: Option<crate::data::chat::ChatCounts>,
    /// The re-read mix's counts (`[collect] reread`).
    pub reread: Option<RereadCounts>,
    /// How the training run ended.
    pub train: TrainSummary,
}

/// The counts of both collections, as `RUN/collect.json` keeps them (`Pt`'s at the top
/// level, `Ps`'s under `ps`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CollectCounts {
    /// `Pt`'s counts, at the top level.
    #[serde(flatten)]
    pub pt: PtCounts,
    /// `Ps`'s counts; absent when `Ps` was not collected (`--no-ls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ps: Option<PsCounts>,
    /// The chat corrector's outcomes (`[collect] corrector = "chat"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<crate::data::chat::ChatCounts>,
    /// Stage 2's re-read mix (`[collect] reread`): questions re-read, and the answers
    /// they read in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reread: Option<RereadCounts>,
}

/// The counts of stage 2's re-read mix.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RereadCounts {
    /// Questions re-read after the policy's samples.
    pub questions: usize,
    /// Sampled answers those questions read, in all.
    pub answers: usize,
}

impl CollectCounts {
    /// Writes `collect.json` (atomically).
    fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("serializes");
        crate::fsio::write_atomic(path, text.as_bytes())
    }
}

/// The file of the collected pairs in a run directory.
pub const PT_FILE: &str = "pt.jsonl";
/// The file of the collected segmentation triples.
pub const PS_FILE: &str = "ps.jsonl";
/// The collections' counts.
pub const COLLECT_FILE: &str = "collect.json";
/// The re-read questions and the policy's answers they read (`[collect] reread`).
pub const REREAD_FILE: &str = "reread.jsonl";
/// The chat corrector's answers, unless `[collect.chat] cache` says elsewhere.
pub const CHAT_CACHE_DIR: &str = "chat_cache";

fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                line: Some(n + 1),
                msg: e.to_string(),
            })
        })
        .collect()
}

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let lines: String = rows
        .iter()
        .map(|p| serde_json::to_string(p).expect("serializes") + "\n")
        .collect();
    crate::fsio::write_atomic(path, lines.as_bytes())
}

fn bar(progress: bool, len: usize, template: &str) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len as u64);
    if let Ok(st) = indicatif::ProgressStyle::with_template(template) {
        b.set_style(st);
    }
    b
}

/// Stage 2 into `paths.out` on backend `be`: collects `Pt` and (unless `--no-ls`) `Ps`
/// with the stage-1 model of `paths.from` (or, with `resume`, reads the run's
/// `pt.jsonl` and `ps.jsonl` back), then trains.
pub fn train_pref<B: Backend<f32>>(
    be: B,
    cfg: &PrefConfig,
    paths: &PrefPaths,
    resume: bool,
    progress: bool,
) -> Result<PrefSummary> {
    cfg.collect.validate()?;
    cfg.loss.validate()?;
    if cfg.loss.ls {
        cfg.ps.validate()?;
    }
    let samples = crate::method::sft::training_samples(&paths.data, &paths.images)?;
    let out = &paths.out;
    // held until the stage returns: one writer per run directory
    let _lock = crate::fsio::RunLock::acquire(out)?;
    // loaded frozen, the LLM packed (`SegModel::pack_frozen`): the collection only
    // reads the model; the trained parts are unfrozen (and unpacked) after it
    let (mut model, tok) = SegModel::load(be, &paths.from)?;
    let pt_path = out.join(PT_FILE);
    let ps_path = out.join(PS_FILE);
    let collect_path = out.join(COLLECT_FILE);
    let mut counts: CollectCounts = if resume {
        std::fs::read_to_string(&collect_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    } else {
        CollectCounts::default()
    };
    let pairs: Vec<PtPair> = if resume && pt_path.exists() {
        read_jsonl(&pt_path)?
    } else {
        let b = bar(
            progress,
            samples.len(),
            "collect Pt {bar:30} {pos}/{len} questions [{elapsed_precise}<{eta_precise}]",
        );
        use crate::data::chat::{ChatCorrector, Corrector, CorrectorKind, WorldCorrector};
        let mut world = WorldCorrector {
            omit: cfg.collect.omit,
        };
        let mut chat = match cfg.collect.corrector {
            CorrectorKind::World => None,
            CorrectorKind::Chat => Some(ChatCorrector::new(
                cfg.collect.chat.clone().with_env(),
                &out.join(CHAT_CACHE_DIR),
            )?),
        };
        let corrector: &mut dyn Corrector = match &mut chat {
            Some(c) => c,
            None => &mut world,
        };
        let (pairs, c) = collect_pt(
            &model,
            corrector,
            &tok,
            &samples,
            &cfg.collect,
            &cfg.loss,
            cfg.train.seed,
            |n| b.inc(n as u64),
        )?;
        b.finish_and_clear();
        write_jsonl(&pt_path, &pairs)?;
        counts.pt = c;
        counts.ps = None;
        counts.reread = None;
        counts.chat = chat.map(|c| c.counts);
        counts.save(&collect_path)?;
        pairs
    };
    if pairs.is_empty() {
        return Err(Error::Data {
            path: paths.data.clone(),
            field: "questions".into(),
            msg: format!("no preference pair could be made ({:?})", counts.pt),
        });
    }
    let ps_records: Vec<PsRecord> = if !cfg.loss.ls {
        Vec::new()
    } else if resume && ps_path.exists() {
        read_jsonl(&ps_path)?
    } else {
        let b = bar(
            progress,
            samples.len(),
            "collect Ps {bar:30} {pos}/{len} questions [{elapsed_precise}<{eta_precise}]",
        );
        let (recs, c) = collect_ps(&model, &tok, &samples, &cfg.ps, cfg.train.seed, |n| {
            b.inc(n as u64)
        })?;
        b.finish_and_clear();
        write_jsonl(&ps_path, &recs)?;
        counts.ps = Some(c);
        counts.save(&collect_path)?;
        recs
    };
    let reread_path = out.join(REREAD_FILE);
    let rereads: Vec<Reread> = if cfg.collect.reread == 0.0 {
        Vec::new()
    } else if resume && reread_path.exists() {
        read_jsonl(&reread_path)?
    } else {
        // only the questions that train: those with a pair
        let with_pair: std::collections::BTreeSet<usize> = pairs.iter().map(|p| p.sample).collect();
        let picked = reread_picks(
            &samples,
            cfg.collect.reread,
            cfg.collect.reread_k,
            cfg.train.seed,
            |i| with_pair.contains(&i),
        )?;
        let b = bar(
            progress,
            picked.len(),
            "collect re-read {bar:30} {pos}/{len} questions [{elapsed_precise}<{eta_precise}]",
        );
        let ens = EnsembleCfg {
            k: cfg.collect.reread_k,
            temperature: cfg.collect.temperature,
            top_p: cfg.collect.top_p,
            ..EnsembleCfg::default()
        };
        let recs = sampled_rereads(
            &model,
            &tok,
            &samples,
            &picked,
            &ens,
            cfg.collect.batch,
            cfg.train.seed,
            |n| b.inc(n as u64),
        )?;
        b.finish_and_clear();
        write_jsonl(&reread_path, &recs)?;
        counts.reread = Some(RereadCounts {
            questions: recs.len(),
            answers: recs.iter().map(|r| r.read.len()).sum(),
        });
        counts.save(&collect_path)?;
        recs
    };
    if !(resume && out.join(CONFIG_FILE).exists()) {
        let run = serde_json::to_value(cfg).expect("serializes");
        model.save_config(out, &tok, Some(run))?;
    }
    let n_pairs = pairs.len();
    let n_ps = ps_records.len();
    let data = PrefData {
        pairs,
        ps: ps_records.into_iter().map(|r| (r.sample, r)).collect(),
        samples: &samples,
        model_cfg: &model.cfg.clone(),
        tok: &tok,
        reread: rereads.into_iter().map(|r| (r.index, r.read)).collect(),
        max_ids: model.max_ids(),
        contrast: cfg.loss.image_pref != 0.0,
    };
    model.set_trainable(Parts {
        vision: false,
        projector: true,
        llm: true,
        seg_head: true,
        decoder: false,
    });
    let mut pm = PrefModel {
        model,
        loss: cfg.loss.clone(),
        ps: cfg.ps.clone(),
        phase: Phase::First,
    };
    let summary = Trainer::new(cfg.train.clone(), out)?
        .resume(resume)
        .progress(progress)
        .title("stage 2 (preference) loss")
        .run(&mut pm, &data)?;
    Ok(PrefSummary {
        counts: counts.pt,
        pairs: n_pairs,
        ps: counts.ps,
        ps_records: n_ps,
        chat: counts.chat,
        reread: counts.reread,
        train: summary,
    })
}
