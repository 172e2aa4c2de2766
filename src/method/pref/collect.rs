//! The text preference data `Pt` (Sec. 3.2, Supp B): for each training question, a
//! response `y` sampled from the SFT policy, its correction `yc` by the world's
//! corrector, and the changed token positions `Ly`, `Lyc` on the model's own tokens.
//!
//! A response the corrector leaves unchanged has no error to learn from: up to
//! `resamples` more are drawn; when all are clean, errors are injected into the
//! ground-truth answer `yg` (the injector names absent objects that co-occur with what
//! is there, or, with probability `omit`, deletes a target: Supp B's prompt asks to
//! "modify, add, or delete") to make `y`, with `yc = yg`.  Each pair keeps the reference model's
//! sequence log-probs (Eq. 3), computed once here from the frozen SFT weights, as
//! RLHF-V does.
use super::contrast::{contrast_of, contrast_pixels, Contrast, ContrastPick};
use super::PrefLossCfg;
use crate::backend::Backend;
use crate::data::chat::{ChatCfg, Corrector, CorrectorKind};
use crate::data::corrector::{mentioned_objects, tokenize, Context};
use crate::data::diff::changed_positions;
use crate::data::sample::Sample;
use crate::data::world::categories::{by_name, CATEGORIES};
use crate::data::world::scenes::tempting_absent_for;
use crate::error::{Error, Result};
use crate::model::seg::{Example, Pixels, SegModel, SegModelConfig, SegTokenizer};
use crate::nn::SamplingCfg;
use num_traits::Float;
use serde::{Deserialize, Serialize};

/// How `y` was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PtSource {
    /// The first sample had an error.
    Sampled,
    /// A later sample (of `resamples`) had one.
    Resampled,
    /// Every sample was clean: errors injected into the ground truth.
    Injected,
}

/// One text preference pair, as kept in `RUN/pt.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PtPair {
    /// Index of the question in the training file (its order in `load_muse`).
    pub sample: usize,
    /// The rejected response: a sample of the SFT policy, or the ground truth with
    /// errors injected.
    pub y: String,
    /// The chosen response: the corrector's correction of `y` (the ground truth when
    /// `y` was injected).
    pub yc: String,
    /// Changed positions among the answer tokens (`Encoded::ids[answer_start..]`).
    pub ly: Vec<usize>,
    /// The same for `yc`.
    pub lyc: Vec<usize>,
    /// How `y` was made.
    pub source: PtSource,
    /// The reference model's Eq. 3 log-probs of `y` and `yc`.
    pub ref_y: f64,
    /// The reference model's Eq. 3 log-prob of `yc`.
    pub ref_yc: f64,
    /// `yc` on another image that lacks what it names (`[loss] image_pref`,
    /// [`super::contrast`]); absent when off or when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contrast: Option<Contrast>,
}

/// Counts of a collection (`RUN/collect.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PtCounts {
    /// Questions in the training file.
    pub questions: usize,
    /// Pairs whose `y` is the first sample.
    pub sampled: usize,
    /// Pairs whose `y` is a later sample.
    pub resampled: usize,
    /// Pairs whose `y` is the ground truth with errors injected.
    pub injected: usize,
    /// Questions with no pair: every sample clean and nothing absent to inject.
    pub skipped: usize,
    /// Responses sampled in all.
    pub samples_drawn: usize,
    /// Sampled answers the corrector gave no correction for (a failed or malformed
    /// request of the chat corrector), each followed by another draw.
    #[serde(default)]
    pub uncorrected: usize,
}

/// Sampling settings of the collection (the `[collect]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectCfg {
    /// Sampling temperature of `y` (0.7) and nucleus mass (0.9).
    pub temperature: f32,
    /// Nucleus mass of `y`'s sampling (0.9).
    pub top_p: f32,
    /// More samples drawn when a response has no error (3, the issue's).
    pub resamples: usize,
    /// Examples per reference forward, and questions per sampling call of stage 2's
    /// re-read mix.
    pub batch: usize,
    /// The chance that an injected `y` deletes a target instead of naming an absent
    /// object first (the world's injector; a chat endpoint follows Supp B's prompt).
    /// 0 (the default) injects hallucinations only.
    pub omit: f32,
    /// `world` (the default) or `chat` (an OpenAI-compatible endpoint, `[collect.chat]`).
    pub corrector: CorrectorKind,
    /// `[collect.chat]`: the endpoint of the `chat` corrector.
    pub chat: ChatCfg,
    /// Stage 2's re-read mix ([`crate::method::reread::sampled_rereads`]; ours, 0 = off):
    /// the fraction of the questions asked once more after `reread_k` (3) answers the
    /// stage-1 policy samples for them at `temperature` and `top_p`, in the ensemble's
    /// layout; the answer's cross-entropy and masks train with the pairs.
    pub reread: f32,
    /// Answers sampled per re-read question (3, the ensemble's K).
    pub reread_k: usize,
}

impl Default for CollectCfg {
    fn default() -> Self {
        CollectCfg {
            temperature: 0.7,
            top_p: 0.9,
            resamples: 3,
            batch: 8,
            omit: 0.0,
            corrector: CorrectorKind::World,
            chat: ChatCfg::default(),
            reread: 0.0,
            reread_k: 3,
        }
    }
}

impl CollectCfg {
    /// Errors for values no collection can use.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::arg("[collect]", msg));
        if !(self.omit.is_finite() && (0.0..=1.0).contains(&self.omit)) {
            return bad(format!(
                "omit = {}: need a probability in [0, 1]",
                self.omit
            ));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature = {}: need a finite value ≥ 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p = {}: need 0 < top_p ≤ 1", self.top_p));
        }
        if self.batch == 0 {
            return bad("batch = 0".into());
        }
        crate::method::reread::check(
            ("[collect] reread", "[collect] reread_k"),
            self.reread,
            self.reread_k,
        )
    }
}

/// Each category of `objs` with its number of instances, in first-seen order.
fn count_categories(objs: &[crate::data::sample::Target]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for o in objs {
        match out.iter_mut().find(|p| p.0 == o.category) {
            Some(p) => p.1 += 1,
            None => out.push((o.category.clone(), 1)),
        }
    }
    out
}

/// What the corrector knows about a sample: its objects with counts, and its targets.
pub fn context_of(s: &Sample) -> Context {
    let present = count_categories(&s.objects);
    let targets = count_categories(&s.targets);
    Context {
        present,
        targets: Some(targets),
        // the loaders have already turned MUSE's `{seg}` into `<seg>`
        mentioned: s
            .answer
            .as_deref()
            .map(mentioned_objects)
            .unwrap_or_default(),
    }
}

/// The absent categories the injector may name, most tempting first.
fn absent_of(s: &Sample) -> Vec<&'static str> {
    let present: Vec<usize> = s
        .objects
        .iter()
        .filter_map(|o| by_name(&o.category))
        .collect();
    tempting_absent_for(&present)
        .into_iter()
        .map(|c| CATEGORIES[c].name)
        .collect()
}

/// The sampling seed of question `i`'s attempt `a` (independent of batching).
fn seed_of(seed: u64, i: usize, a: usize) -> u64 {
    crate::rng::splitmix64(seed ^ ((i as u64) << 8) ^ a as u64)
}

/// `y` for question `i`: sampled (and resampled) from `model`, else injected; `None`
/// when no pair can be made.  Counts go to `counts`.
#[allow(clippy::too_many_arguments)]
fn make_y<B: Backend<f32>>(
    model: &SegModel<f32, B>,
    corrector: &mut dyn Corrector,
    tok: &SegTokenizer,
    s: &Sample,
    px: &Pixels,
    i: usize,
    cfg: &CollectCfg,
    seed: u64,
    counts: &mut PtCounts,
) -> Result<Option<(String, String, PtSource)>> {
    let ctx = context_of(s);
    for a in 0..=cfg.resamples {
        let sc = SamplingCfg {
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            seed: seed_of(seed, i, a),
        };
        let y = model
            .predict(tok, &[(px, s.question.as_str())], &sc)?
            .remove(0)
            .text;
        counts.samples_drawn += 1;
        if tok
            .encode(&model.cfg.system_prompt, &s.question, &y)
            .is_err()
        {
            // text the tokenizer cannot take back (a stray codebook token): draw again
            continue;
        }
        let Some(yc) = corrector.correct(&s.question, &y, &ctx)? else {
            counts.uncorrected += 1;
            continue;
        };
        if tokenize(&y) != tokenize(&yc) {
            let src = if a == 0 {
                PtSource::Sampled
            } else {
                PtSource::Resampled
            };
            return Ok(Some((y, yc, src)));
        }
    }
    let yg = s.answer.as_deref().ok_or_else(|| Error::Data {
        path: s.image_path.clone(),
        field: format!("question {} answer", s.question_index),
        msg: "stage 2 needs the ground-truth answer".into(),
    })?;
    let absent = absent_of(s);
    Ok(corrector
        .inject(&s.question, yg, &absent, seed_of(seed, i, usize::MAX))?
        .map(|y| (y, yg.to_string(), PtSource::Injected)))
}

/// Text-only training examples of `(pixels, question, answer)` (no masks decoded).
pub fn text_example(
    cfg: &SegModelConfig,
    tok: &SegTokenizer,
    px: &Pixels,
    question: &str,
    answer: &str,
) -> Result<Example> {
    Ok(Example {
        pixels: px.clone(),
        enc: tok.encode(&cfg.system_prompt, question, answer)?,
        masks: Vec::new(),
        classes: Default::default(),
        categories: Vec::new(),
    })
}

/// Eq. 3 log-probs of each example's answer, with λ on its changed positions.
pub fn seq_logps<F: Float, B: Backend<F>>(
    model: &SegModel<F, B>,
    examples: &[Example],
    changed: &[&[usize]],
    loss: &PrefLossCfg,
) -> Result<Vec<f64>> {
    let pass = model.forward_pass(examples)?;
    Ok(pass
        .answer_rows
        .iter()
        .zip(changed)
        .map(|(rows, ch)| {
            let w = loss.eq3_weights(rows.len(), ch);
            rows.iter().zip(&w).map(|(&r, w)| w * pass.logp[r]).sum()
        })
        .collect())
}

/// Collects `Pt` for `samples` with the SFT `model` (which is also the reference).
/// `progress` is called with the number of questions done.
#[allow(clippy::too_many_arguments)]
pub fn collect_pt<B: Backend<f32>>(
    model: &SegModel<f32, B>,
    corrector: &mut dyn Corrector,
    tok: &SegTokenizer,
    samples: &[Sample],
    cfg: &CollectCfg,
    loss: &PrefLossCfg,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Result<(Vec<PtPair>, PtCounts)> {
    let mut counts = PtCounts {
        questions: samples.len(),
        ..Default::default()
    };
    let mut pairs = Vec::new();
    let mut last = crate::method::predict::LastImage::default();
    let batch = cfg.batch.max(1);
    // pairs waiting for their reference log-probs, and their examples: y, yc and, with
    // a contrast, yc on the contrast image
    let (mut pending, mut pending_exs): (Vec<PtPair>, Vec<Example>) = (vec![], vec![]);
    let flush = |pending: &mut Vec<PtPair>,
                 exs: &mut Vec<Example>,
                 pairs: &mut Vec<PtPair>|
     -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let ch: Vec<&[usize]> = pending
            .iter()
            .flat_map(|p| {
                let n = if p.contrast.is_some() { 3 } else { 2 };
                [p.ly.as_slice(), p.lyc.as_slice(), p.lyc.as_slice()]
                    .into_iter()
                    .take(n)
            })
            .collect();
        let lp = seq_logps(model, exs, &ch, loss)?;
        let mut lp = lp.into_iter();
        for mut p in pending.drain(..) {
            p.ref_y = lp.next().expect("one value per example");
            p.ref_yc = lp.next().expect("one value per example");
            if let Some(c) = &mut p.contrast {
                c.ref_yc = lp.next().expect("one value per example");
            }
            pairs.push(p);
        }
        exs.clear();
        Ok(())
    };
    // the contrast images, decoded as needed
    let mut contrast_image = crate::method::predict::LastImage::default();
    for (i, s) in samples.iter().enumerate() {
        let px = last.pixels(s, model.cfg.image_size)?;
        match make_y(model, corrector, tok, s, &px, i, cfg, seed, &mut counts)? {
            None => counts.skipped += 1,
            Some((y, yc, source)) => {
                match source {
                    PtSource::Sampled => counts.sampled += 1,
                    PtSource::Resampled => counts.resampled += 1,
                    PtSource::Injected => counts.injected += 1,
                }
                let ey = text_example(&model.cfg, tok, &px, &s.question, &y)?;
                let eyc = text_example(&model.cfg, tok, &px, &s.question, &yc)?;
                let (ly, lyc) = changed_positions(
                    &ey.enc.ids[ey.enc.answer_start..],
                    &eyc.enc.ids[eyc.enc.answer_start..],
                );
                let contrast = match loss.image_pref > 0.0 {
                    true => contrast_of(samples, i, &yc, loss.image_pref_contrast),
                    false => None,
                };
                let contrast = contrast.map(|sample| Contrast {
                    sample,
                    ref_yc: 0.0,
                    erased: loss.image_pref_contrast == ContrastPick::Erased,
                });
                pending_exs.extend([ey, eyc]);
                if let Some(c) = &contrast {
                    let pj = match c.erased {
                        true => contrast_pixels(samples, i, c, &yc, model.cfg.image_size)?,
                        // another image, decoded unless it was the last contrast
                        false => contrast_image.pixels(&samples[c.sample], model.cfg.image_size)?,
                    };
                    pending_exs.push(text_example(&model.cfg, tok, &pj, &s.question, &yc)?);
                }
                pending.push(PtPair {
                    sample: i,
                    y,
                    yc,
                    ly,
                    lyc,
                    source,
                    ref_y: 0.0,
                    ref_yc: 0.0,
                    contrast,
                });
                if pending.len() == batch {
                    flush(&mut pending, &mut pending_exs, &mut pairs)?;
                }
            }
        }
        progress(1);
    }
    flush(&mut pending, &mut pending_exs, &mut pairs)?;
    Ok((pairs, counts))
}

#[cfg(test)]
mod tests {
    use super::CollectCfg;

    #[test]
    fn validate_names_the_bad_value() {
        assert!(CollectCfg::default().validate().is_ok());
        for (cfg, key) in [
            (
                CollectCfg {
                    omit: 1.5,
                    ..Default::default()
                },
                "omit",
            ),
            (
                CollectCfg {
                    omit: f32::NAN,
                    ..Default::default()
                },
                "omit",
            ),
            (
                CollectCfg {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                CollectCfg {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                CollectCfg {
                    batch: 0,
                    ..Default::default()
                },
                "batch",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("[collect]"), "{e}");
        }
    }
}
