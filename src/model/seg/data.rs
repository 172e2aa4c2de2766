//! From data-set samples (any reader: MUSE, the world, ReasonSeg, ...) to the model's
//! training examples: decode and preprocess the image, tokenize question and answer,
//! take each target's mask as 0/1 (ignored pixels count as background).
use super::config::SegModelConfig;
use super::model::Example;
use super::preprocess::preprocess;
use super::prompt::SegTokenizer;
use crate::data::sample::{load_image, Sample, SEG};
use crate::error::{Error, Result};

/// One sample → one example.  Errors name the image file and what is wrong with it.
pub fn example(cfg: &SegModelConfig, tok: &SegTokenizer, s: &Sample) -> Result<Example> {
    example_reading(cfg, tok, s, &[], usize::MAX)
}

/// [`example`] with answers read before the answer, in the ensemble's layout
/// ([`SegTokenizer::encode_reading`]; stage 1's re-read mix,
/// `crate::method::reread`).  Answers to read that would take the ids past `max_ids`
/// (the model's context less its image positions, plus the one image token) are
/// dropped from the end; the question and answer themselves are never cut.
pub fn example_reading(
    cfg: &SegModelConfig,
    tok: &SegTokenizer,
    s: &Sample,
    read: &[String],
    max_ids: usize,
) -> Result<Example> {
    example_of_image(cfg, tok, s, &load_image(s)?, read, max_ids)
}

/// [`example_reading`] of an image already decoded (`img`, the sample's size; stage 1's
/// augmentation passes a moved copy, [`super::augment`]).
pub fn example_of_image(
    cfg: &SegModelConfig,
    tok: &SegTokenizer,
    s: &Sample,
    img: &image::RgbImage,
    read: &[String],
    max_ids: usize,
) -> Result<Example> {
    let err = |field: &str, msg: String| Error::Data {
        path: s.image_path.clone(),
        field: format!("question {} {field}", s.question_index),
        msg,
    };
    let answer = s.answer.as_deref().ok_or_else(|| {
        err(
            "answer",
            "training needs answer text, this sample has none".into(),
        )
    })?;
    let n_seg = answer.matches(SEG).count();
    if n_seg != s.targets.len() {
        return Err(err(
            "answer",
            format!("{n_seg} <seg> in the answer but {} masks", s.targets.len()),
        ));
    }
    let masks = s
        .targets
        .iter()
        .enumerate()
        .map(|(j, t)| {
            if (t.mask.height, t.mask.width) != (s.height, s.width) {
                return Err(err(
                    "masks",
                    format!(
                        "mask {j} is {}x{}, the image {}x{}",
                        t.mask.height, t.mask.width, s.height, s.width
                    ),
                ));
            }
            Ok(t.mask
                .data
                .iter()
                .map(|&v| f32::from(u8::from(v == 1)))
                .collect())
        })
        .collect::<Result<Vec<Vec<f32>>>>()?;
    let pixels = preprocess(img, cfg.image_size)?;
    let enc = encode_fitting(cfg, tok, &s.question, read, answer, max_ids)?;
    let grid = cfg.image_size / cfg.lvlm.patch_size.max(1);
    let places = if cfg.place_head {
        super::category::place_labels(&s.targets, &pixels, grid)
    } else {
        Vec::new()
    };
    let classes = if cfg.classes.is_empty() {
        super::category::Classes {
            places,
            ..Default::default()
        }
    } else {
        // the objects label the patches: one of another size is an error, not skipped
        if let Some((j, o)) = (s.objects.iter().enumerate())
            .find(|(_, o)| (o.mask.height, o.mask.width) != (s.height, s.width))
        {
            return Err(err(
                "objects",
                format!(
                    "object {j} ({}) has a {}x{} mask, the image is {}x{}",
                    o.category, o.mask.height, o.mask.width, s.height, s.width
                ),
            ));
        }
        super::category::Classes {
            patches: super::category::patch_labels(&s.objects, &pixels, grid, &cfg.classes),
            targets: super::category::target_labels(&s.targets, &cfg.classes),
            places,
        }
    };
    Ok(Example {
        pixels,
        enc,
        masks,
        classes,
        categories: s.targets.iter().map(|t| t.category.clone()).collect(),
    })
}

/// [`SegTokenizer::encode_reading`] with the answers to read that would take the ids
/// past `max_ids` dropped from the end (the question and answer are never cut).
pub fn encode_fitting(
    cfg: &SegModelConfig,
    tok: &SegTokenizer,
    question: &str,
    read: &[String],
    answer: &str,
    max_ids: usize,
) -> Result<super::prompt::Encoded> {
    let mut n = read.len();
    let mut enc = tok.encode_reading(&cfg.system_prompt, question, read, answer)?;
    while n > 0 && enc.ids.len() > max_ids {
        n -= 1;
        enc = tok.encode_reading(&cfg.system_prompt, question, &read[..n], answer)?;
    }
    Ok(enc)
}

/// The texts a world tokenizer is trained on: every question and answer.
pub fn corpus(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .flat_map(|s| [s.question.clone(), s.answer.clone().unwrap_or_default()])
        .collect()
}
