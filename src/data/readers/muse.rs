//! MUSE JSON: a list of image records (see [`MuseImage`]), each with questions, per
//! question the annotations its answer segments, optional answer texts with `{seg}`
//! placeholders, and optionally every object of the image (`ann_list`).
//!
//! The rules of a MUSE file are [`check_record`] and [`check_muse`], one set for every
//! reader of it (these readers and `popen eval`): a plausible image size; `answers`
//! and `text_answers` with one entry per question; each answer text with exactly one
//! placeholder (`{seg}` or `<seg>`) per annotation; every RLE of the image's size;
//! `file_name` (or `coco_url`) relative and inside the data root; no two records naming
//! the same image.  Polygons are rasterized with the COCO rule (bit-exact with
//! pycocotools) and clipped to the image.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::data::mask::Mask;
use crate::data::muse::{MuseAnn, MuseImage, Segmentation, MUSE_SEG};
use crate::data::paths::resolve_in_root;
use crate::data::sample::{check_size, data_err, parse_json, read_file, seg_to_mask};
use crate::data::sample::{Sample, Target, SEG};
use crate::error::Result;

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
    /// The record's fields, masks undecoded.
    pub image: MuseImage,
}

/// Parse a MUSE JSON file (a list of records, or `{"images": [...]}`) without decoding
/// any mask.  Errors name the file, the line and the field path.
pub fn load_muse_entries(path: &Path) -> Result<Vec<MuseEntry>> {
    let bytes = read_file(path)?;
    let text =
        String::from_utf8(bytes).map_err(|e| data_err(path, "", format!("not UTF-8: {e}")))?;
    parse_muse_entries(path, &text)
}

/// [`load_muse_entries`] on text already read (`path` names it in errors).  Parsing
/// only: the rules are [`check_muse`].
pub fn parse_muse_entries(path: &Path, text: &str) -> Result<Vec<MuseEntry>> {
    // pick the form by its first character rather than an untagged enum, so that
    // errors keep the path of the field that is wrong
    let records = if text.trim_start().starts_with('{') {
        parse_json::<Wrapped>(path, text)?.images
    } else {
        parse_json::<Vec<Record>>(path, text)?
    };
    Ok(records.into_iter().map(Record::into_entry).collect())
}

/// The most bytes [`load_muse`] and [`muse_to_samples`] decode masks into (4 GiB).  A
/// file's claim (height × width bytes per target and per object, per question) is
/// checked against it before any mask is decoded, so a small file that claims huge
/// images is an error and not an out-of-memory abort.
pub const MAX_DECODED_MASK_BYTES: u64 = 4 << 30;

/// The bytes decoding every mask of `images` would take: per record, `h·w` times its
/// targets plus, per question, its objects (the `ann_list`, or at most every target
/// when there is none).
pub fn decoded_mask_bytes<'a>(images: impl IntoIterator<Item = &'a MuseImage>) -> u128 {
    images
        .into_iter()
        .map(|img| {
            let px = u128::from(img.height) * u128::from(img.width);
            let targets: u128 = img.answers.iter().map(|a| a.len() as u128).sum();
            let objects = img.ann_list.as_ref().map_or(targets, |l| l.len() as u128);
            px * (targets + img.questions.len() as u128 * objects)
        })
        .sum()
}

/// An error naming `path` when decoding `images` would take more than `max_bytes`.
pub fn check_mask_budget<'a>(
    path: &Path,
    images: impl IntoIterator<Item = &'a MuseImage>,
    max_bytes: u64,
) -> Result<()> {
    let need = decoded_mask_bytes(images);
    if need > u128::from(max_bytes) {
        return Err(data_err(
            path,
            "",
            format!(
                "decoding every mask would take {need} bytes, over the limit of {max_bytes}; \
                 split the file, or read it with `load_muse_entries` and decode per image"
            ),
        ));
    }
    Ok(())
}

/// Load a MUSE JSON file; image paths are `root/file_name` (or, when `file_name` is
/// empty, `root/<split>/<name>` from the last two segments of `coco_url`, e.g.
/// `train2017/000000000139.jpg`).  One [`Sample`] per question.  Every mask is decoded
/// here (height × width bytes per target and per object, per question), at most
/// [`MAX_DECODED_MASK_BYTES`] in all: for the full MUSE release use
/// [`load_muse_entries`] and decode per image instead.
pub fn load_muse(path: &Path, root: &Path) -> Result<Vec<Sample>> {
    load_muse_within(path, root, MAX_DECODED_MASK_BYTES)
}

/// [`load_muse`] with another limit on the bytes of decoded masks.
pub fn load_muse_within(path: &Path, root: &Path, max_bytes: u64) -> Result<Vec<Sample>> {
    let entries = load_muse_entries(path)?;
    check_muse(path, entries.iter().map(|e| &e.image))?;
    check_mask_budget(path, entries.iter().map(|e| &e.image), max_bytes)?;
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        out.extend(image_samples(path, root, i, e.id.as_deref(), &e.image)?);
    }
    Ok(out)
}

/// Samples from MUSE records held in memory (the embedded world's output), with the
/// same checks as [`load_muse`]; `source` names them in errors (e.g. `world:seed=7`).
pub fn muse_to_samples(images: &[MuseImage], root: &Path, source: &str) -> Result<Vec<Sample>> {
    let path = Path::new(source);
    check_muse(path, images)?;
    check_mask_budget(path, images, MAX_DECODED_MASK_BYTES)?;
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

/// The image's path relative to the data root: `file_name`, or when it is empty
/// `<split>/<file>` from the last two segments of `coco_url`.
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
    let rel = check_record(path, i, img)?;
    let (h, w) = (img.height as usize, img.width as usize);
    let nq = img.questions.len();
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
        // placeholder counts are checked by `check_record`
        let answer = img
            .text_answers
            .as_ref()
            .map(|t| t[q].replace(MUSE_SEG, SEG));
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

/// The rules of record `i` of a MUSE file (`path` names it in errors), without
/// decoding a mask: a plausible image size (at most
/// [`MAX_IMAGE_PIXELS`](crate::data::sample::MAX_IMAGE_PIXELS)); one answer list and one
/// answer text per question; one placeholder (`{seg}` or `<seg>`) per annotation in
/// each answer text; every RLE of the image's size; an image path that is relative and
/// stays inside the data root.  Returns that path (see [`load_muse`]).  The data
/// readers and `popen eval` both apply it, so they accept and reject the same files.
pub fn check_record(path: &Path, i: usize, img: &MuseImage) -> Result<String> {
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
        for (q, (text, anns)) in t.iter().zip(&img.answers).enumerate() {
            let n = text.matches(MUSE_SEG).count() + text.matches(SEG).count();
            if n != anns.len() {
                return Err(data_err(
                    path,
                    format!("[{i}].text_answers[{q}]"),
                    format!(
                        "{n} `{MUSE_SEG}` placeholders but {} annotations in answers[{q}]",
                        anns.len()
                    ),
                ));
            }
        }
    }
    let lists = img
        .answers
        .iter()
        .enumerate()
        .map(|(q, a)| (format!("[{i}].answers[{q}]"), a))
        .chain(img.ann_list.iter().map(|a| (format!("[{i}].ann_list"), a)));
    for (field, anns) in lists {
        for (k, a) in anns.iter().enumerate() {
            if let Segmentation::Rle(r) = &a.segmentation {
                let [rh, rw] = r.size;
                if rh as usize != h || rw as usize != w {
                    return Err(data_err(
                        path,
                        format!("{field}[{k}].segmentation.size"),
                        format!("RLE size is {rh}x{rw} but the image is {h}x{w}"),
                    ));
                }
            }
        }
    }
    let rel = image_rel_path(path, i, img)?;
    // the root is the caller's; a name that is safe under one root is safe under all
    resolve_in_root(Path::new(""), &rel, path, &format!("[{i}].file_name"))?;
    Ok(rel)
}

/// [`check_record`] for every record of a MUSE file, and no two records naming the
/// same image.  Returns each record's image path relative to the data root.
pub fn check_muse<'a>(
    path: &Path,
    images: impl IntoIterator<Item = &'a MuseImage>,
) -> Result<Vec<String>> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut rels = Vec::new();
    for (i, img) in images.into_iter().enumerate() {
        let rel = check_record(path, i, img)?;
        if let Some(j) = seen.insert(rel.clone(), i) {
            return Err(data_err(
                path,
                format!("[{i}].file_name"),
                format!("image {rel:?} is also record [{j}]: one record per image"),
            ));
        }
        rels.push(rel);
    }
    Ok(rels)
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
