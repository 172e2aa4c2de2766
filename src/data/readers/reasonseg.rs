//! ReasonSeg: one LabelMe-style JSON beside each image (`name.json` + `name.jpg`):
//! `text` (a list of questions, or one string), `is_sentence`, and `shapes`, each with a
//! `label` and polygon `points`.
//!
//! The reference mask follows LISA: shapes labelled `flag` are dropped; the others are
//! filled largest first (equal areas in file order) (so a small shape inside a large one stays visible) with 1, or
//! with [`IGNORE`] when the label contains `ignore` (excluded from scoring); each shape
//! is drawn the OpenCV way ([`fill_polygon_cv`]).  One [`Sample`] per question, one
//! target (the whole reference mask), no answer text.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::data::mask::{Mask, FG, IGNORE};
use crate::data::polygon::fill_polygon_cv;
use crate::data::sample::{check_size, data_err, parse_json, read_file, Sample, Target};
use crate::error::{Error, Result};

/// Image extensions looked for beside each JSON, in this order.
const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "JPG"];

#[derive(Deserialize)]
struct LabelMe {
    text: Texts,
    #[serde(default)]
    is_sentence: bool,
    #[serde(default)]
    shapes: Vec<Shape>,
    #[serde(default, rename = "imageHeight")]
    image_height: Option<usize>,
    #[serde(default, rename = "imageWidth")]
    image_width: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Texts {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Shape {
    label: String,
    points: Vec<[f64; 2]>,
}

/// Load every `*.json` in `dir` (sorted by name) with its image; one sample per
/// question.  `Err` when a JSON is malformed, has no image beside it, or its image size
/// disagrees with `imageHeight`/`imageWidth`.
pub fn load_reasonseg(dir: &Path) -> Result<Vec<Sample>> {
    Ok(load_reasonseg_flagged(dir)?
        .into_iter()
        .map(|(s, _)| s)
        .collect())
}

/// As [`load_reasonseg`], with each sample's `is_sentence` flag (LISA reports the long
/// "sentence" queries and the short ones separately).
pub fn load_reasonseg_flagged(dir: &Path) -> Result<Vec<(Sample, bool)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut jsons: Vec<PathBuf> = Vec::new();
    for entry in rd {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if p.extension().is_some_and(|e| e == "json") {
            jsons.push(p);
        }
    }
    jsons.sort();
    let mut out = Vec::new();
    for j in &jsons {
        out.extend(load_one(j)?);
    }
    Ok(out)
}

/// Windows-1252 code points for bytes 0x80..0x9F (elsewhere it is Latin-1).  Some
/// ReasonSeg files were saved in this encoding; LISA retries with it, so do we.
const CP1252_HIGH: [char; 32] = [
    '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}',
    '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
];

fn decode_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => e
            .into_bytes()
            .iter()
            .map(|&b| match b {
                0x80..=0x9f => CP1252_HIGH[(b - 0x80) as usize],
                _ => b as char,
            })
            .collect(),
    }
}

fn find_image(json: &Path) -> Option<PathBuf> {
    IMAGE_EXTS
        .iter()
        .map(|e| json.with_extension(e))
        .find(|p| p.is_file())
}

fn load_one(json: &Path) -> Result<Vec<(Sample, bool)>> {
    let text = decode_text(read_file(json)?);
    let lm: LabelMe = parse_json(json, &text)?;
    let image_path = find_image(json).ok_or_else(|| {
        data_err(
            json,
            "",
            format!("no image ({}) beside it", IMAGE_EXTS.join("/")),
        )
    })?;
    let (w, h) = image::image_dimensions(&image_path).map_err(|e| Error::Image {
        path: image_path.clone(),
        msg: format!("cannot read the image size: {e}"),
    })?;
    let (h, w) = (h as usize, w as usize);
    check_size(json, "(image size)", h, w)?;
    if lm.image_height.is_some_and(|v| v != h) || lm.image_width.is_some_and(|v| v != w) {
        return Err(data_err(
            json,
            "imageHeight",
            format!(
                "says {:?}x{:?} but {} is {h}x{w}",
                lm.image_height,
                lm.image_width,
                image_path.display()
            ),
        ));
    }
    // rasterize each kept shape alone, for its area and the object list
    let mut shapes: Vec<(usize, &Shape, Mask)> = Vec::new();
    for (k, s) in lm.shapes.iter().enumerate() {
        if s.label.to_lowercase() == "flag" {
            continue;
        }
        let mut m = Mask::new(h, w);
        let area = fill_polygon_cv(&mut m, &s.points, FG)
            .map_err(|e| data_err(json, format!("shapes[{k}].points"), e.to_string()))?;
        shapes.push((area, s, m));
    }
    // largest first.  LISA's `np.argsort(area)[::-1]` leaves the order of equal areas
    // to numpy's unstable sort (numpy 1.x: reverse file order; the SIMD sort of numpy
    // 2.x gave file order on the fixture); a stable sort makes it file order, always.
    let mut order: Vec<usize> = (0..shapes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(shapes[i].0));
    let mut reference = Mask::new(h, w);
    for &i in &order {
        let (_, s, m) = &shapes[i];
        let v = if s.label.to_lowercase().contains("ignore") {
            IGNORE
        } else {
            FG
        };
        for (d, &p) in reference.data.iter_mut().zip(&m.data) {
            if p != 0 {
                *d = v;
            }
        }
    }
    let objects: Vec<Target> = shapes
        .iter()
        .filter(|(_, s, _)| !s.label.to_lowercase().contains("ignore"))
        .map(|(_, s, m)| Target {
            category: s.label.clone(),
            mask: m.clone(),
        })
        .collect();
    let category = objects
        .first()
        .map(|t| t.category.clone())
        .unwrap_or_else(|| "target".to_string());
    let questions = match lm.text {
        Texts::One(s) => vec![s],
        Texts::Many(v) => v,
    };
    let image_id = json
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(questions
        .into_iter()
        .enumerate()
        .map(|(q, question)| {
            (
                Sample {
                    image_id: image_id.clone(),
                    image_path: image_path.clone(),
                    height: h,
                    width: w,
                    question,
                    question_index: q,
                    answer: None,
                    targets: vec![Target {
                        category: category.clone(),
                        mask: reference.clone(),
                    }],
                    objects: objects.clone(),
                },
                lm.is_sentence,
            )
        })
        .collect())
}
