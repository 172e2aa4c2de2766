//! Stage 1's re-read mix (`[data] reread`, ours, not the paper's): some training
//! questions are asked again with K candidate answers placed before the answer, in the
//! ensemble's text layout ([`crate::model::seg::SegTokenizer::encode_reading`]; answers
//! that do not fit the context are dropped from the end), and the model learns to
//! answer with the ground truth after reading them.
//!
//! Why: the ensemble's text half (Sec. 3.3) reads `[image, x, y_1 … y_K, p̂]` and then
//! answers.  The paper's LLaVA-1.5 reads long mixed contexts from its pretraining; the
//! tiny model trained from scratch has only ever seen a question followed by its answer,
//! and anything between them throws it off.  Measured on the demo's seed-0 stage-3 run
//! (60 test images, `popen predict --ensemble K`): reading a single sample (K = 1)
//! already drops gIoU from 18.4 (the same model answering greedily) to 12.3, K = 3 to
//! 10.2, and the refined answers are broken sentences ("The cat is to the right of the
//! right of the cat.").  `p̂` alone (10 embeddings) does not repair that.
//!
//! With the mix at 0.25 (the demo's default since), demo seeds 1 and 2: the ensemble's
//! row rises from 10.8 / 15.5 to 16.4 / 22.2 and from 12.8 / 18.1 to 19.9 / 22.1
//! (gIoU / cIoU; with the ensemble's context rule, `crate::method::ensemble`), its
//! CHAIR_i falls by 5.6 and 6.2 points, and its refined answers are sentences again;
//! stage 1's own greedy answers move by 0.0 / −1.9 and +1.5 / +0.3.
//! The full method stays below POPEN† (docs/demo.md has the tables).
//!
//! Candidates: each of the K is the ground-truth answer with chance ½, else the answer
//! with one or two errors from the Pt injector ([`inject`]: an absent object named, a
//! count raised, or a target deleted with chance [`OMIT`]; a no-target answer becomes a
//! hallucinated one).  Absent objects are drawn from the categories of the training
//! data not in the image, so any data set with object categories works.  The draws are
//! seeded by the training seed and the question's index in the file.
//!
//! **Stage 2's mix** (`[collect] reread`, [`reread_picks`], [`sampled_rereads`]; ours too): the same
//! layout, but the K candidates are the stage-1 policy's own samples, drawn the way the
//! ensemble draws them ([`SegModel::sample_answers`]: one prefix, K samples at
//! `[collect]`'s temperature and top-p, 0.7 and 0.9 as the ensemble's), collected once
//! with `Pt` into `RUN/reread.jsonl`.  Stage 1's injected errors are not the errors the
//! ensemble meets: its samples paraphrase, merge and repeat objects, miscount, and stop
//! early.  Measured on demo seed 1 before this mix: the text half cost 2.2 gIoU against
//! the most likely sample, and `ỹ` merged or repeated the samples' objects where it
//! differed from it.  Stage 2 trains the answer after its samples with the same
//! cross-entropy as stage 1 (its masks join `Lce`); `crate::method::pref::pref_step`
//! has the formula.  Measured against the same stage-1 models without it (demo seeds
//! 0–2, the mix at 0.5): the ensemble's row gains 0.4–0.7 gIoU and loses 0.6–1.6
//! CHAIR_i in every seed, cIoU −0.1 to +0.7; the refinement still merges samples that
//! disagree.
use crate::backend::Backend;
use crate::data::corrector::inject;
use crate::data::sample::Sample;
use crate::data::world::rng::{mix, Rng};
use crate::error::{Error, Result};
use crate::method::ensemble::EnsembleCfg;
use crate::model::seg::{SegModel, SegTokenizer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The chance that a candidate's first error deletes a target (else it names an absent
/// object); the demo's stage 2 injects with the same kinds of error.
pub const OMIT: f32 = 1.0 / 3.0;

/// One re-read question: the training question `index` with the answers to read (one
/// line of stage 2's `RUN/reread.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reread {
    /// Index of the question among the training samples it was picked from.
    pub index: usize,
    /// The answers read before the answer, in order: up to K candidates (stage 1's
    /// ground truth or injected errors, stage 2's policy samples).
    pub read: Vec<String>,
}

/// Checks a mix's settings; errors name the fraction's key (`names.0`, e.g.
/// `"[data] reread"`) or K's (`names.1`).
pub fn check(names: (&'static str, &'static str), fraction: f32, k: usize) -> Result<()> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::arg(
            names.0,
            format!("a fraction of the questions, in [0, 1]; got {fraction}"),
        ));
    }
    if fraction > 0.0 && k == 0 {
        return Err(Error::arg(
            names.1,
            "the re-read questions need at least one answer to read",
        ));
    }
    Ok(())
}

/// The re-read questions for `samples`: each question with an answer text is picked
/// with chance `fraction` and given `k` candidates.  `fraction` outside [0, 1] is an
/// error naming `[data] reread`.
pub fn reread_items(samples: &[Sample], fraction: f32, k: usize, seed: u64) -> Result<Vec<Reread>> {
    check(("[data] reread", "[data] reread_k"), fraction, k)?;
    if fraction == 0.0 {
        return Ok(Vec::new());
    }
    let all: BTreeSet<&str> = samples
        .iter()
        .flat_map(|s| s.objects.iter().chain(&s.targets))
        .map(|o| o.category.as_str())
        .collect();
    let mut out = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let Some(yg) = s.answer.as_deref() else {
            continue;
        };
        let mut rng = Rng::new(mix(&[seed, i as u64, 0x7265_7265_6164]));
        if !rng.chance(fraction) {
            continue;
        }
        let here: BTreeSet<&str> = s
            .objects
            .iter()
            .chain(&s.targets)
            .map(|o| o.category.as_str())
            .collect();
        let mut absent: Vec<&str> = all.difference(&here).copied().collect();
        rng.shuffle(&mut absent);
        let read = (0..k)
            .map(|_| {
                let seed = rng.next_u64();
                if rng.chance(0.5) {
                    yg.to_string()
                } else {
                    inject(yg, &absent, OMIT, seed).map_or_else(|| yg.to_string(), |(y, _)| y)
                }
            })
            .collect();
        out.push(Reread { index: i, read });
    }
    Ok(out)
}

/// Stage 2's re-read questions: each question `i` of `samples` with an answer text and
/// `keep(i)` (stage 2 keeps the questions with a pair) is picked with chance `fraction`,
/// seeded by `seed` and its index, independently of stage 1's picks.  `fraction`
/// outside [0, 1] or K = 0 is an error naming `[collect] reread` or `reread_k`.
pub fn reread_picks(
    samples: &[Sample],
    fraction: f32,
    k: usize,
    seed: u64,
    keep: impl Fn(usize) -> bool,
) -> Result<Vec<usize>> {
    check(("[collect] reread", "[collect] reread_k"), fraction, k)?;
    if fraction == 0.0 {
        return Ok(Vec::new());
    }
    Ok((0..samples.len())
        .filter(|&i| {
            samples[i].answer.is_some()
                && keep(i)
                && Rng::new(mix(&[seed, i as u64, 0x7061_6972_7265_6164])).chance(fraction)
        })
        .collect())
}

/// The answers the `picked` questions ([`reread_picks`]) read: the K answers `model`
/// samples for each ([`SegModel::sample_answers`] with `cfg`'s K, temperature and
/// top-p; the j-th picked question from the stream `seed'` + j, whatever `batch`).
/// Samples the tokenizer cannot take back as an answer are dropped.  `progress` is
/// called with the number of questions done.
#[allow(clippy::too_many_arguments)]
pub fn sampled_rereads<B: Backend<f32>>(
    model: &SegModel<f32, B>,
    tok: &SegTokenizer,
    samples: &[Sample],
    picked: &[usize],
    cfg: &EnsembleCfg,
    batch: usize,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Reread>> {
    let base = mix(&[seed, 0x7361_6d70_6c65]);
    let batch = batch.max(1);
    let mut last = crate::method::predict::LastImage::default();
    let mut out = Vec::with_capacity(picked.len());
    for (c, chunk) in picked.chunks(batch).enumerate() {
        let px = chunk
            .iter()
            .map(|&i| last.pixels(&samples[i], model.cfg.image_size))
            .collect::<Result<Vec<_>>>()?;
        let items: Vec<_> = chunk
            .iter()
            .zip(&px)
            .map(|(&i, p)| (p, samples[i].question.as_str()))
            .collect();
        let first = (c * batch) as u64;
        let sets = model.sample_answers(tok, &items, cfg, base.wrapping_add(first))?;
        for (&i, set) in chunk.iter().zip(sets) {
            let read = set
                .into_iter()
                .map(|p| p.text)
                .filter(|t| tok.answer_ids(t).is_ok())
                .collect();
            out.push(Reread { index: i, read });
        }
        progress(chunk.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mask::Mask;
    use crate::data::sample::{Target, SEG};

    fn obj(category: &str) -> Target {
        Target {
            category: category.into(),
            mask: Mask {
                height: 2,
                width: 2,
                data: vec![1, 0, 0, 0],
            },
        }
    }

    fn sample(q: usize, answer: &str, targets: Vec<Target>, objects: Vec<Target>) -> Sample {
        Sample {
            image_id: "a".into(),
            image_path: "a.png".into(),
            height: 2,
            width: 2,
            question: format!("What is here {q}?"),
            question_index: q,
            answer: Some(answer.into()),
            targets,
            objects,
        }
    }

    fn data() -> Vec<Sample> {
        let here = vec![obj("apple"), obj("cup")];
        (0..40)
            .map(|q| match q % 3 {
                0 => sample(
                    q,
                    "You can eat the apple <seg>.",
                    vec![obj("apple")],
                    here.clone(),
                ),
                1 => sample(
                    q,
                    "There are two cups <seg> <seg>.",
                    vec![obj("cup"), obj("cup")],
                    vec![obj("cup"), obj("cup"), obj("lamp")],
                ),
                _ => sample(
                    q,
                    "There is nothing like that in this image.",
                    vec![],
                    here.clone(),
                ),
            })
            .collect()
    }

    #[test]
    fn candidates_are_the_answer_or_it_with_absent_objects() {
        let d = data();
        let out = reread_items(&d, 0.5, 3, 7).unwrap();
        // about half of the 40 questions, each with 3 candidates
        assert!((12..=28).contains(&out.len()), "{}", out.len());
        let (mut same, mut changed) = (0, 0);
        for r in &out {
            assert_eq!(r.read.len(), 3);
            let s = &d[r.index];
            let yg = s.answer.as_deref().unwrap();
            let here: BTreeSet<&str> = s.objects.iter().map(|o| o.category.as_str()).collect();
            for c in &r.read {
                if c == yg {
                    same += 1;
                    continue;
                }
                changed += 1;
                // an injected candidate names an object of the data the image lacks,
                // deletes a target, or raises a count: it is never the image's truth
                let absent_named = ["apple", "cup", "lamp"]
                    .iter()
                    .any(|n| !here.contains(n) && c.contains(n));
                let fewer = c.matches(SEG).count() < yg.matches(SEG).count();
                let more = c.matches(SEG).count() > yg.matches(SEG).count();
                assert!(absent_named || fewer || more, "{yg:?} -> {c:?}");
            }
        }
        // each candidate is the truth with chance ½
        let n = (same + changed) as f64;
        assert!((0.3..0.7).contains(&(same as f64 / n)), "{same} / {n}");
        // deterministic in the seed; another seed picks others
        assert_eq!(reread_items(&d, 0.5, 3, 7).unwrap(), out);
        assert_ne!(reread_items(&d, 0.5, 3, 8).unwrap(), out);
        // off, all, and out of range
        assert!(reread_items(&d, 0.0, 3, 7).unwrap().is_empty());
        assert_eq!(reread_items(&d, 1.0, 2, 7).unwrap().len(), d.len());
        for bad in [-0.1, 1.5, f32::NAN] {
            let e = reread_items(&d, bad, 3, 7).unwrap_err().to_string();
            assert!(e.contains("[data] reread"), "{e}");
        }
        let e = reread_items(&d, 0.5, 0, 7).unwrap_err().to_string();
        assert!(e.contains("reread_k"), "{e}");
    }
}
