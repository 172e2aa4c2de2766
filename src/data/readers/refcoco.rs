//! refCOCO, refCOCO+ and refCOCOg, laid out as the REFER toolkit (and LISA) expects:
//!
//! ```text
//! dir/<dataset>/refs(<split_by>).p    pickle: list of refs (ref_id, ann_id, image_id,
//!                                     split, sentences [{sent, raw, ...}], ...)
//! dir/<dataset>/instances.json        COCO: images, annotations, categories
//! dir/images/mscoco/images/train2014/ the images (or dir/images/ when that is absent)
//! ```
//!
//! One [`Sample`] per sentence of each ref in `split`; its single target is the ref's
//! annotation, its objects are every annotation of the image in `instances.json`.
//! Polygons are rasterized with the COCO rule, bit-exact with pycocotools.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::data::mask::Mask;
use crate::data::muse::Segmentation;
use crate::data::paths::resolve_in_root;
use crate::data::pickle::{self, Value};
use crate::data::sample::{check_size, data_err, parse_json, read_file, seg_to_mask};
use crate::data::sample::{Sample, Target};
use crate::error::{Error, Result};

#[derive(Deserialize)]
struct Instances {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnn>,
    categories: Vec<CocoCat>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: i64,
    file_name: String,
    height: u32,
    width: u32,
}

#[derive(Deserialize)]
struct CocoAnn {
    id: i64,
    image_id: i64,
    category_id: i64,
    segmentation: Segmentation,
}

#[derive(Deserialize)]
struct CocoCat {
    id: i64,
    name: String,
}

/// One ref, as read from the pickle.
struct Ref {
    ann_id: i64,
    image_id: i64,
    sentences: Vec<String>,
}

/// Load `split` (`train`, `val`, `test`, `testA`, `testB`, …) of `dataset`
/// (`refcoco`, `refcoco+`, `refcocog`) split by `split_by` (`unc`, `umd`, `google`).
/// `Err` when a file is missing or malformed, or when no ref is in `split` (the
/// message lists the splits the file has).
pub fn load_refcoco(dir: &Path, dataset: &str, split_by: &str, split: &str) -> Result<Vec<Sample>> {
    let refs_path = dir.join(dataset).join(format!("refs({split_by}).p"));
    let inst_path = dir.join(dataset).join("instances.json");
    let refs_value = pickle::load(&refs_path)?;
    let text = String::from_utf8(read_file(&inst_path)?)
        .map_err(|e| data_err(&inst_path, "", format!("not UTF-8: {e}")))?;
    let inst: Instances = parse_json(&inst_path, &text)?;

    let list = refs_value.as_seq().ok_or_else(|| {
        data_err(
            &refs_path,
            "(top level)",
            format!(
                "expected a list of refs, found a {}",
                refs_value.type_name()
            ),
        )
    })?;
    let mut refs = Vec::new();
    let mut splits: Vec<String> = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let s = field_str(&refs_path, i, r, "split")?;
        if !splits.iter().any(|x| x == s) {
            splits.push(s.to_string());
        }
        if s == split {
            refs.push(parse_ref(&refs_path, i, r)?);
        }
    }
    if refs.is_empty() {
        return Err(data_err(
            &refs_path,
            "split",
            format!("no ref is in split {split:?}; the file has {splits:?}"),
        ));
    }

    for (k, im) in inst.images.iter().enumerate() {
        check_size(
            &inst_path,
            &format!("images[{k}].height"),
            im.height as usize,
            im.width as usize,
        )?;
    }
    let images: HashMap<i64, &CocoImage> = inst.images.iter().map(|im| (im.id, im)).collect();
    let cats: HashMap<i64, &str> = inst
        .categories
        .iter()
        .map(|c| (c.id, c.name.as_str()))
        .collect();
    let mut anns_of_image: HashMap<i64, Vec<usize>> = HashMap::new();
    let mut ann_index: HashMap<i64, usize> = HashMap::new();
    for (k, a) in inst.annotations.iter().enumerate() {
        anns_of_image.entry(a.image_id).or_default().push(k);
        ann_index.insert(a.id, k);
    }
    let mscoco = dir.join("images/mscoco/images/train2014");
    let image_root: PathBuf = if mscoco.is_dir() {
        mscoco
    } else {
        dir.join("images")
    };

    // decode each annotation once; refs share images and annotations
    let mut masks: HashMap<usize, Mask> = HashMap::new();
    let mut decode = |k: usize| -> Result<Target> {
        let a = &inst.annotations[k];
        let im = images.get(&a.image_id).ok_or_else(|| {
            data_err(
                &inst_path,
                format!("annotations[{k}].image_id"),
                format!("image {} is not in `images`", a.image_id),
            )
        })?;
        let category = cats
            .get(&a.category_id)
            .ok_or_else(|| {
                data_err(
                    &inst_path,
                    format!("annotations[{k}].category_id"),
                    format!("category {} is not in `categories`", a.category_id),
                )
            })?
            .to_string();
        if let Some(m) = masks.get(&k) {
            return Ok(Target {
                category,
                mask: m.clone(),
            });
        }
        let m = seg_to_mask(
            &a.segmentation,
            im.height as usize,
            im.width as usize,
            &inst_path,
            &format!("annotations[{k}].segmentation"),
        )?;
        masks.insert(k, m.clone());
        Ok(Target { category, mask: m })
    };

    let mut out = Vec::new();
    for r in &refs {
        let im = images.get(&r.image_id).ok_or_else(|| {
            data_err(
                &refs_path,
                "image_id",
                format!(
                    "image {} of ref is not in {}",
                    r.image_id,
                    inst_path.display()
                ),
            )
        })?;
        let k = *ann_index.get(&r.ann_id).ok_or_else(|| {
            data_err(
                &refs_path,
                "ann_id",
                format!("annotation {} is not in {}", r.ann_id, inst_path.display()),
            )
        })?;
        let target = decode(k)?;
        let objects = anns_of_image
            .get(&r.image_id)
            .map(|v| v.iter().map(|&j| decode(j)).collect::<Result<Vec<_>>>())
            .transpose()?
            .unwrap_or_default();
        let image_path = resolve_in_root(
            &image_root,
            &im.file_name,
            &inst_path,
            &format!("images[id={}].file_name", im.id),
        )?;
        for (q, sent) in r.sentences.iter().enumerate() {
            out.push(Sample {
                image_id: r.image_id.to_string(),
                image_path: image_path.clone(),
                height: im.height as usize,
                width: im.width as usize,
                question: sent.clone(),
                question_index: q,
                answer: None,
                targets: vec![target.clone()],
                objects: objects.clone(),
            });
        }
    }
    Ok(out)
}

fn field<'a>(path: &Path, i: usize, r: &'a Value, key: &str) -> Result<&'a Value> {
    r.get(key).ok_or_else(|| {
        data_err(
            path,
            format!("[{i}].{key}"),
            format!("missing (the ref is a {})", r.type_name()),
        )
    })
}

fn field_str<'a>(path: &Path, i: usize, r: &'a Value, key: &str) -> Result<&'a str> {
    let v = field(path, i, r, key)?;
    v.as_str().ok_or_else(|| {
        data_err(
            path,
            format!("[{i}].{key}"),
            format!("expected str, found {}", v.type_name()),
        )
    })
}

fn field_int(path: &Path, i: usize, r: &Value, key: &str) -> Result<i64> {
    let v = field(path, i, r, key)?;
    v.as_i64().ok_or_else(|| {
        data_err(
            path,
            format!("[{i}].{key}"),
            format!("expected int, found {}", v.type_name()),
        )
    })
}

fn parse_ref(path: &Path, i: usize, r: &Value) -> Result<Ref> {
    let sents = field(path, i, r, "sentences")?;
    let sents = sents.as_seq().ok_or_else(|| {
        data_err(
            path,
            format!("[{i}].sentences"),
            format!("expected list, found {}", sents.type_name()),
        )
    })?;
    let mut sentences = Vec::with_capacity(sents.len());
    for (j, s) in sents.iter().enumerate() {
        // `sent` is the tokenized lower-case form LISA feeds the model; `raw` otherwise
        let text = s
            .get("sent")
            .or_else(|| s.get("raw"))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Data {
                path: path.to_path_buf(),
                field: format!("[{i}].sentences[{j}]"),
                msg: "has no `sent` or `raw` string".into(),
            })?;
        sentences.push(text.to_string());
    }
    Ok(Ref {
        ann_id: field_int(path, i, r, "ann_id")?,
        image_id: field_int(path, i, r, "image_id")?,
        sentences,
    })
}
