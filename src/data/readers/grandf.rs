//! GranD-f grounded captions (GLaMM's GCG annotation files, e.g.
//! `GranDf_HA_GCG_train.json`): a list of records
//!
//! ```text
//! {"file_name": "sa_123.jpg", "caption": "A man rides a horse.",
//!  "groundings": {"A man": {"token_positives": [0, 5], "rle_masks": [{size, counts}, ...]},
//!                 ...}}
//! ```
//!
//! `token_positives` are character offsets (Python string indices) into the caption
//! after GLaMM's cleaning (`strip('"').strip()`); a phrase's masks are united.  One
//! [`Sample`] per record: the question is [`GCG_QUESTION`], the answer is the caption
//! with [`SEG`] after each grounded phrase, and the targets are the phrases in caption
//! order.  The objects are the same phrases (GranD-f has no separate object list).
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::data::mask::{Mask, FG};
use crate::data::muse::RleJson;
use crate::data::paths::resolve_in_root;
use crate::data::polygon::paint_rle;
use crate::data::sample::{check_size, data_err, parse_json, read_file, Sample, Target, SEG};
use crate::error::{Error, Result};

/// The instruction paired with every GranD-f caption (grounded conversation generation).
pub const GCG_QUESTION: &str =
    "Describe the image in detail, and give a segmentation mask for each thing you mention.";

#[derive(Deserialize)]
struct Record {
    file_name: String,
    caption: String,
    #[serde(default)]
    groundings: BTreeMap<String, Grounding>,
}

#[derive(Deserialize)]
struct Grounding {
    token_positives: Span,
    #[serde(default)]
    rle_masks: Vec<RleJson>,
}

/// `[start, end]`, or a list of such spans (the first is used, as GLaMM does).
#[derive(Deserialize)]
#[serde(untagged)]
enum Span {
    One([usize; 2]),
    Many(Vec<[usize; 2]>),
}

/// Load a GranD-f GCG JSON; images are `root/file_name`.  The image size comes from the
/// RLEs (which must all agree), or from the image header when a record has none.
pub fn load_grandf(path: &Path, root: &Path) -> Result<Vec<Sample>> {
    let text = String::from_utf8(read_file(path)?)
        .map_err(|e| data_err(path, "", format!("not UTF-8: {e}")))?;
    let records: Vec<Record> = parse_json(path, &text)?;
    records
        .iter()
        .enumerate()
        .map(|(i, r)| record_sample(path, root, i, r))
        .collect()
}

fn record_sample(path: &Path, root: &Path, i: usize, r: &Record) -> Result<Sample> {
    let image_path = resolve_in_root(root, &r.file_name, path, &format!("[{i}].file_name"))?;
    let caption = r.caption.trim_matches('"').trim();
    // code-point offsets -> byte offsets (the caption may hold non-ASCII text)
    let mut byte_at: Vec<usize> = caption.char_indices().map(|(b, _)| b).collect();
    byte_at.push(caption.len());
    let nchars = byte_at.len() - 1;

    let mut size: Option<(usize, usize)> = None;
    for (phrase, g) in &r.groundings {
        for (k, m) in g.rle_masks.iter().enumerate() {
            let s = (m.size[0] as usize, m.size[1] as usize);
            match size {
                None => size = Some(s),
                Some(prev) if prev != s => {
                    return Err(data_err(
                        path,
                        format!("[{i}].groundings[{phrase:?}].rle_masks[{k}].size"),
                        format!(
                            "RLE size {}x{} but an earlier one is {}x{}",
                            s.0, s.1, prev.0, prev.1
                        ),
                    ))
                }
                _ => {}
            }
        }
    }
    let (h, w) = match size {
        Some(s) => s,
        None => {
            let (w, h) = image::image_dimensions(&image_path).map_err(|e| Error::Image {
                path: image_path.clone(),
                msg: format!("record [{i}] has no RLE, and the image size cannot be read: {e}"),
            })?;
            (h as usize, w as usize)
        }
    };

    check_size(path, &format!("[{i}] (image size)"), h, w)?;
    let mut phrases: Vec<(usize, usize, Target)> = Vec::new();
    for (phrase, g) in &r.groundings {
        let field = format!("[{i}].groundings[{phrase:?}]");
        let [s, e] = match &g.token_positives {
            Span::One(x) => *x,
            Span::Many(v) => *v
                .first()
                .ok_or_else(|| data_err(path, format!("{field}.token_positives"), "no span"))?,
        };
        if s >= e || e > nchars {
            return Err(data_err(
                path,
                format!("{field}.token_positives"),
                format!("span [{s}, {e}] is not inside the {nchars}-character caption"),
            ));
        }
        let mut mask = Mask::new(h, w);
        for (k, m) in g.rle_masks.iter().enumerate() {
            let rle = m.to_rle().map_err(|e| {
                data_err(
                    path,
                    format!("{field}.rle_masks[{k}].counts"),
                    e.to_string(),
                )
            })?;
            paint_rle(&mut mask, &rle, FG)
                .map_err(|e| data_err(path, format!("{field}.rle_masks[{k}]"), e.to_string()))?;
        }
        phrases.push((
            s,
            e,
            Target {
                category: phrase.clone(),
                mask,
            },
        ));
    }
    phrases.sort_by_key(|p| (p.0, p.1));
    for pair in phrases.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(data_err(
                path,
                format!("[{i}].groundings"),
                format!(
                    "phrases {:?} [{}, {}] and {:?} [{}, {}] overlap",
                    pair[0].2.category,
                    pair[0].0,
                    pair[0].1,
                    pair[1].2.category,
                    pair[1].0,
                    pair[1].1
                ),
            ));
        }
    }
    let mut answer = String::with_capacity(caption.len() + 8 * phrases.len());
    let mut last = 0;
    for (_, e, _) in &phrases {
        answer.push_str(&caption[last..byte_at[*e]]);
        answer.push(' ');
        answer.push_str(SEG);
        last = byte_at[*e];
    }
    answer.push_str(&caption[last..]);
    let targets: Vec<Target> = phrases.into_iter().map(|p| p.2).collect();
    let image_id = Path::new(&r.file_name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| r.file_name.clone());
    Ok(Sample {
        image_id,
        image_path,
        height: h,
        width: w,
        question: GCG_QUESTION.to_string(),
        question_index: 0,
        answer: Some(answer),
        objects: targets.clone(),
        targets,
    })
}
