//! Predictions for a whole MUSE-schema file: the `PRED.jsonl` lines that `popen eval`
//! reads, from any segmentation model.  Shared by `popen predict`, validation during
//! training and `popen demo`.
use crate::backend::Backend;
use crate::data::muse::RleJson;
use crate::data::readers::muse::{image_samples, load_muse_entries};
use crate::data::sample::{load_image, Sample};
use crate::data::{Mask, Rle};
use crate::error::Result;
use crate::method::ensemble::{sentence_ends, EnsembleCfg, EnsemblePrediction};
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

/// Writes prediction lines as JSONL, atomically.
pub fn write_preds(path: &Path, lines: &[PredLine]) -> Result<()> {
    crate::fsio::write_atomic_with(path, |w| {
        for l in lines {
            serde_json::to_writer(&mut *w, l).map_err(std::io::Error::other)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}
