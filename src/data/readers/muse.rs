//! MUSE JSON: a list of image records (see [`MuseImage`]), each with questions, per
//! question the annotations its answer segments, optional answer texts with `{seg}`
//! placeholders, and optionally every object of the image (`ann_list`).
//!
//! Checks: `questions`, `answers` and `text_answers` have one entry per question; each
//! answer text has exactly one placeholder per annotation; every RLE has the image's
//! size; `file_name` stays inside the data root.  Polygons are rasterized with the COCO
//! rule (bit-exact with pycocotools) and clipped to the image.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::data::mask::Mask;
use crate::data::muse::{MuseAnn, MuseImage};
use crate::data::paths::resolve_in_root;
use crate::data::sample::{check_size, data_err, parse_json, read_file, seg_to_mask};
use crate::data::sample::{Sample, Target, SEG};
use crate::error::Result;

/// MUSE spells the placeholder `{seg}`; the crate's answers use [`SEG`].
const MUSE_SEG: &str = "{seg}";

/// A MUSE record as found in the files: the fields of [`MuseImage`] plus the id
/// fields some releases carry.  Spelled out rather than `#[serde(flatten)]`, which
/// would make every error point at the end of the record instead of the bad field.
#[derive(Deserialize)]
struct Record {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    image_id: Option<serde_json::Value>,
    #[serde(default)]
    file_name: String,
    #[serde(default)]
    coco_url: Option<String>,
    height: u32,
    width: u32,
    questions: Vec<String>,
    answers: Vec<Vec<MuseAnn>>,
    #[serde(default)]
    text_answers: Option<Vec<String>>,
    #[serde(default)]
    ann_list: Option<Vec<MuseAnn>>,
}

impl Record {
    fn into_entry(self) -> MuseEntry {
        let id = self.id.or(self.image_id).as_ref().map(id_string);
        let img = MuseImage {
            file_name: self.file_name,
            coco_url: self.coco_url,
            height: self.height,
            width: self.width,
            questions: self.questions,
            answers: self.answers,
            text_answers: self.text_answers,
            ann_list: self.ann_list,
        };
        MuseEntry { id, image: img }
    }
}

/// The file is either a list of records or `{"images": [...]}`.
#[derive(Deserialize)]
struct Wrapped {
    images: Vec<Record>,
}

/// One MUSE image record, undecoded: masks stay polygons and RLE strings, so a whole
/// data set fits in memory.  Decode one at a time with [`image_samples`].
#[derive(Clone, Debug, PartialEq)]
pub struct MuseEntry {
    /// The record's `id` (or `image_id`) when it has one.
    pub id: Option<String>,
    pub image: MuseImage,
}

/// Parse a MUSE JSON file (a list of records, or `{"images": [...]}`) without decoding
/// any mask.  Errors name the file, the line and the field path.
pub fn load_muse_entries(path: &Path) -> Result<Vec<MuseEntry>> {
    let bytes = read_file(path)?;
    let text =
        String::from_utf8(bytes).map_err(|e| data_err(path, "", format!("not UTF-8: {e}")))?;
    // pick the form by its first character rather than an untagged enum, so that
    // errors keep the path of the field that is wrong
    let records = if text.trim_start().starts_with('{') {
        parse_json::<Wrapped>(path, &text)?.images
    } else {
        parse_json::<Vec<Record>>(path, &text)?
    };
    Ok(records.into_iter().map(Record::into_entry).collect())
}

/// Load a MUSE JSON file; image paths are `root/file_name` (or, when `file_name` is
/// empty, `root/<split>/<name>` from the last two segments of `coco_url`, e.g.
/// `train2017/000000000139.jpg`).  One [`Sample`] per question.  Every mask is decoded
/// here (height × width bytes per target and per object, per question): for the full
/// MUSE release use [`load_muse_entries`] and decode per image instead.
pub fn load_muse(path: &Path, root: &Path) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (i, e) in load_muse_entries(path)?.iter().enumerate() {
        out.extend(image_samples(path, root, i, e.id.as_deref(), &e.image)?);
    }
    Ok(out)
}

/// Samples from MUSE records held in memory (the embedded world's output), with the
/// same checks as [`load_muse`]; `source` names them in errors (e.g. `world:seed=7`).
pub fn muse_to_samples(images: &[MuseImage], root: &Path, source: &str) -> Result<Vec<Sample>> {
    let path = Path::new(source);
    let mut out = Vec::new();
    for (i, img) in images.iter().enumerate() {
        out.extend(image_samples(path, root, i, None, img)?);
    }
    Ok(out)
}

fn id_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn image_rel_path(path: &Path, i: usize, img: &MuseImage) -> Result<String> {
    if !img.file_name.is_empty() {
        return Ok(img.file_name.clone());
    }
    let url = img.coco_url.as_deref().unwrap_or("");
    let segs: Vec<&str> = url.rsplit('/').take(2).collect();
    if segs.len() < 2 || segs.iter().any(|s| s.is_empty()) {
        return Err(data_err(
            path,
            format!("[{i}].file_name"),
            "neither `file_name` nor a usable `coco_url` (…/<split>/<file>) is given",
        ));
    }
    Ok(format!("{}/{}", segs[1], segs[0]))
}

fn ann_targets(
    path: &Path,
    field: &str,
    anns: &[MuseAnn],
    h: usize,
    w: usize,
) -> Result<Vec<Target>> {
    anns.iter()
        .enumerate()
        .map(|(k, a)| {
            let f = format!("{field}[{k}].segmentation");
            Ok(Target {
                category: a.category_name.clone(),
                mask: seg_to_mask(&a.segmentation, h, w, path, &f)?,
            })
        })
        .collect()
}

/// The samples of one MUSE image record (`i` is its index in the file, for errors;
/// `id` its `id`/`image_id` when the file has one).
pub fn image_samples(
    path: &Path,
    root: &Path,
    i: usize,
    id: Option<&str>,
    img: &MuseImage,
) -> Result<Vec<Sample>> {
    let (h, w) = (img.height as usize, img.width as usize);
    check_size(path, &format!("[{i}].height"), h, w)?;
    let nq = img.questions.len();
    if img.answers.len() != nq {
        return Err(data_err(
            path,
            format!("[{i}].answers"),
            format!("{} answer lists for {nq} questions", img.answers.len()),
        ));
    }
    if let Some(t) = &img.text_answers {
        if t.len() != nq {
            return Err(data_err(
                path,
                format!("[{i}].text_answers"),
                format!("{} answer texts for {nq} questions", t.len()),
            ));
        }
    }
    let rel = image_rel_path(path, i, img)?;
    let image_path: PathBuf = resolve_in_root(root, &rel, path, &format!("[{i}].file_name"))?;
    let image_id = id.map(str::to_string).unwrap_or_else(|| {
        Path::new(&rel)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| rel.clone())
    });
    let mut per_question = Vec::with_capacity(nq);
    for (q, anns) in img.answers.iter().enumerate() {
        per_question.push(ann_targets(
            path,
            &format!("[{i}].answers[{q}]"),
            anns,
            h,
            w,
        )?);
    }
    let objects = match &img.ann_list {
        Some(list) => ann_targets(path, &format!("[{i}].ann_list"), list, h, w)?,
        None => distinct_targets(&per_question),
    };
    let mut out = Vec::with_capacity(nq);
    for (q, targets) in per_question.into_iter().enumerate() {
        let answer = match &img.text_answers {
            Some(t) => {
                let a = t[q].replace(MUSE_SEG, SEG);
                let n = a.matches(SEG).count();
                if n != targets.len() {
                    return Err(data_err(
                        path,
                        format!("[{i}].text_answers[{q}]"),
                        format!(
                            "{n} `{{seg}}` placeholders but {} annotations in answers[{q}]",
                            targets.len()
                        ),
                    ));
                }
                Some(a)
            }
            None => None,
        };
        out.push(Sample {
            image_id: image_id.clone(),
            image_path: image_path.clone(),
            height: h,
            width: w,
            question: img.questions[q].clone(),
            question_index: q,
            answer,
            targets,
            objects: objects.clone(),
        });
    }
    Ok(out)
}

/// Without `ann_list`, the image's objects are the distinct targets of its questions.
fn distinct_targets(per_question: &[Vec<Target>]) -> Vec<Target> {
    let mut seen: Vec<(&str, &Mask)> = Vec::new();
    let mut out = Vec::new();
    for t in per_question.iter().flatten() {
        if !seen.iter().any(|(c, m)| *c == t.category && **m == t.mask) {
            seen.push((&t.category, &t.mask));
            out.push(t.clone());
        }
    }
    out
}
