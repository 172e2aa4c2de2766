//! Predictions for a whole MUSE-schema file: the `PRED.jsonl` lines that `popen eval`
//! reads, from any segmentation model.  Shared by `popen predict`, validation during
//! training and `popen demo`.
use crate::backend::Backend;
use crate::data::muse::RleJson;
use crate::data::readers::muse::{image_samples, load_muse_entries};
use crate::data::sample::{load_image, Sample};
use crate::data::{Mask, Rle};
use crate::error::Result;
use crate::method::ensemble::{
    mean_logp, most_likely, sentence_ends, EnsembleCfg, EnsemblePrediction,
};
use crate::metrics::eval::PredLine;
use crate::model::seg::{preprocess, Pixels, Prediction, SegModel, SegTokenizer};
use crate::nn::SamplingCfg;
use num_traits::Float;
use std::path::Path;

/// Where a data file's images are: `images` when given, else the data file's folder.
pub fn data_root(data: &Path, images: &Option<std::path::PathBuf>) -> std::path::PathBuf {
    images
        .clone()
        .unwrap_or_else(|| data.parent().map(Into::into).unwrap_or_default())
}

/// The last image read, preprocessed: a file's questions about one image follow each
/// other, so each image is decoded and resized once.
#[derive(Default)]
pub struct LastImage(Option<(std::path::PathBuf, Pixels)>);

impl LastImage {
    /// The pixels of `s`'s image at `image_size`, read unless it is the last one.
    pub fn pixels(&mut self, s: &Sample, image_size: usize) -> Result<Pixels> {
        match &self.0 {
            Some((path, p)) if *path == s.image_path => Ok(p.clone()),
            _ => {
                let p = preprocess(&load_image(s)?, image_size)?;
                self.0 = Some((s.image_path.clone(), p.clone()));
                Ok(p)
            }
        }
    }
}

/// Every question of a MUSE file with its record's `file_name`.
pub fn questions(data: &Path, root: &Path) -> Result<Vec<(String, Sample)>> {
    let mut items = Vec::new();
    for (i, e) in load_muse_entries(data)?.iter().enumerate() {
        for s in image_samples(data, root, i, e.id.as_deref(), &e.image)? {
            items.push((e.image.file_name.clone(), s));
        }
    }
    Ok(items)
}

/// Answers every item, `batch` questions per forward; `progress(n)` after each batch.
/// Question `i` (in file order) samples from the stream seeded `cfg.seed + i`, so the
/// result does not depend on the batch size.
pub fn predict_items<F: Float, B: Backend<F>>(
    model: &SegModel<F, B>,
    tok: &SegTokenizer,
    items: &[(String, Sample)],
    batch: usize,
    cfg: &SamplingCfg,
    progress: impl FnMut(usize),
) -> Result<Vec<PredLine>> {
    let answer =
        |q: &[(&Pixels, &str)], seed: u64| model.predict(tok, q, &SamplingCfg { seed, ..*cfg });
    answer_items(
        items,
        model.cfg.image_size,
        batch,
        cfg.seed,
        answer,
        progress,
    )
}

/// [`predict_items`] with the K-way ensemble (Sec. 3.3); `prompt` is stage 3's `p̂`.
/// Also returns each question's ensemble answer (samples, masks and scores; the float
/// mask logits and the fed-back rows are dropped to keep memory flat).
#[allow(clippy::too_many_arguments)]
pub fn predict_items_ensemble<F: Float, B: Backend<F>>(
    model: &SegModel<F, B>,
    tok: &SegTokenizer,
    items: &[(String, Sample)],
    batch: usize,
    cfg: &EnsembleCfg,
    seed: u64,
    prompt: Option<&B::Buf>,
    progress: impl FnMut(usize),
) -> Result<(Vec<PredLine>, Vec<EnsemblePrediction>)> {
    let ends = sentence_ends(&tok.tok);
    let mut full = Vec::with_capacity(items.len());
    let answer = |q: &[(&Pixels, &str)], seed: u64| {
        let mut e = model.predict_ensemble(tok, q, cfg, seed, prompt, &ends)?;
        let answers = e.iter().map(|x| x.answer.clone()).collect();
        // kept for scores and counts: the float mask logits (H·W per target and sample)
        // and the fed-back rows would grow with the data set
        for x in &mut e {
            x.answer.logits.clear();
            x.f_rows.clear();
            x.samples.iter_mut().for_each(|s| s.logits.clear());
        }
        full.extend(e);
        Ok(answers)
    };
    let lines = answer_items(items, model.cfg.image_size, batch, seed, answer, progress)?;
    Ok((lines, full))
}

/// The loop behind both: images loaded (each once per run of equal paths) and
/// preprocessed, `answer(questions, seed)` per chunk with `seed + first index`.
fn answer_items(
    items: &[(String, Sample)],
    image_size: usize,
    batch: usize,
    seed: u64,
    mut answer: impl FnMut(&[(&Pixels, &str)], u64) -> Result<Vec<Prediction>>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<PredLine>> {
    let batch = batch.max(1);
    let mut lines = Vec::with_capacity(items.len());
    let mut last = LastImage::default();
    for (ci, chunk) in items.chunks(batch).enumerate() {
        let px = chunk
            .iter()
            .map(|(_, s)| last.pixels(s, image_size))
            .collect::<Result<Vec<_>>>()?;
        let q: Vec<(&Pixels, &str)> = px
            .iter()
            .zip(chunk)
            .map(|(p, (_, s))| (p, s.question.as_str()))
            .collect();
        let preds = answer(&q, seed.wrapping_add((ci * batch) as u64))?;
        for ((file_name, s), p) in chunk.iter().zip(preds) {
            let masks = p
                .masks
                .into_iter()
                .map(|m| {
                    Ok(RleJson::from_rle(&Rle::from_mask(&Mask::from_vec(
                        s.height, s.width, m,
                    )?)))
                })
                .collect::<Result<Vec<_>>>()?;
            lines.push(PredLine {
                file_name: file_name.clone(),
                question: s.question_index,
                text: p.text,
                masks,
            });
        }
        progress(chunk.len());
    }
    Ok(lines)
}

/// One question's K samples beside the ensemble's answer `ỹ` (`popen predict
/// --samples`): what the refinement read and what it made of it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SampleLine {
    /// The image's `file_name`, as in the prediction line.
    pub file_name: String,
    /// 0-based index into the image's `questions`.
    pub question: usize,
    /// `ỹ`'s text (the prediction line's).
    pub answer: String,
    /// The K samples, in sampling order.
    pub samples: Vec<SampleText>,
    /// The sample with the highest mean log-probability (the answer without the text
    /// half).
    pub most_likely: usize,
    /// The first sample whose text is `ỹ`'s, if any.
    pub copies: Option<usize>,
    /// The refinement did not fit the context: the answer is the most likely sample.
    pub fallback: bool,
}

/// One sample `y_k` of [`SampleLine`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SampleText {
    /// The sample's answer text.
    pub text: String,
    /// Mean log-probability of its tokens, EOS included.
    pub mean_logp: f32,
    /// `η` of each of its `<seg>` sentences, in [−1, 1].
    pub eta: Vec<f32>,
}

/// The [`SampleLine`]s of [`predict_items_ensemble`]'s result (its lines and ensemble
/// answers, question by question).
pub fn sample_lines(lines: &[PredLine], full: &[EnsemblePrediction]) -> Vec<SampleLine> {
    lines
        .iter()
        .zip(full)
        .map(|(l, e)| SampleLine {
            file_name: l.file_name.clone(),
            question: l.question,
            answer: l.text.clone(),
            samples: e
                .samples
                .iter()
                .zip(&e.eta)
                .map(|(p, eta)| SampleText {
                    text: p.text.clone(),
                    mean_logp: mean_logp(p),
                    eta: eta.clone(),
                })
                .collect(),
            most_likely: most_likely(&e.samples),
            copies: e.samples.iter().position(|p| p.text == l.text),
            fallback: e.fallback,
        })
        .collect()
}

/// How `ỹ` relates to the samples over [`SampleLine`]s: the most likely sample's text,
/// another sample's, or none of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyCounts {
    /// Questions whose `ỹ` is the most likely sample's text.
    pub most_likely: usize,
    /// Questions whose `ỹ` is another sample's text.
    pub other_sample: usize,
    /// Questions whose `ỹ` is none of the samples' texts.
    pub new_text: usize,
}

impl CopyCounts {
    /// Counts `lines` by where each answer's text comes from.
    pub fn of(lines: &[SampleLine]) -> Self {
        let mut c = Self::default();
        for l in lines {
            let same = |i: usize| l.samples.get(i).is_some_and(|s| s.text == l.answer);
            if same(l.most_likely) {
                c.most_likely += 1;
            } else if l.copies.is_some() {
                c.other_sample += 1;
            } else {
                c.new_text += 1;
            }
        }
        c
    }
}

/// Writes prediction lines as JSONL, atomically.
pub fn write_preds(path: &Path, lines: &[PredLine]) -> Result<()> {
    write_jsonl(path, lines)
}

/// Writes one JSON object per line, atomically.
pub fn write_jsonl<T: serde::Serialize>(path: &Path, lines: &[T]) -> Result<()> {
    crate::fsio::write_atomic_with(path, |w| {
        for l in lines {
            serde_json::to_writer(&mut *w, l).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}
