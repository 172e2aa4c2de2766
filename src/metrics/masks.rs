//! The engine of `popen eval-masks`: IoU and Boundary IoU of PNG masks in two folders,
//! matched by file name.
//!
//! A pixel is foreground when any colour channel is nonzero (alpha ignored), so 0/1,
//! 0/255, 16-bit and colour-coded masks all read as expected.  The report is
//! `{"cases": {name: {"iou", "boundary_iou", "intersection", "union"}}, "giou",
//! "ciou"}` with gIoU = mean IoU, cIoU = ΣI/ΣU, empty-vs-empty = 1.0.  PNGs decode in
//! parallel (rayon); the metrics are the CPU twins of [`crate::kernels::mask`].
use crate::error::{Error, Result};
use crate::kernels::mask::{boundary_width, iou_from_counts, PackedMask};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;

/// Metrics of one mask pair.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct MaskCase {
    /// Intersection / union of the foregrounds (1.0 for empty vs empty).
    pub iou: f64,
    /// IoU of the two boundaries at width `d = max(1, round(ratio · diagonal))`.
    pub boundary_iou: f64,
    /// Foreground pixels in both masks.
    pub intersection: u64,
    /// Foreground pixels in either mask.
    pub union: u64,
}

/// The report of `popen eval-masks` (the report of `popen eval` is
/// [`Report`](super::Report)).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct MaskReport {
    /// Per file name, the metrics of that pair (sorted by name).
    pub cases: BTreeMap<String, MaskCase>,
    /// Mean IoU over the pairs.
    pub giou: f64,
    /// `ΣI / ΣU` over the pairs (1.0 when `ΣU = 0`).
    pub ciou: f64,
}

/// Names of the `.png` files (any case) in `dir`.
fn png_names(dir: &Path) -> Result<BTreeSet<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = BTreeSet::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        let is_png = p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png"));
        if is_png && p.is_file() {
            let name = e.file_name().into_string().map_err(|_| {
                Error::io(
                    &p,
                    io::Error::new(io::ErrorKind::InvalidData, "file name is not UTF-8"),
                )
            })?;
            names.insert(name);
        }
    }
    Ok(names)
}

pub use crate::data::png::load_mask_png;

fn eval_pair(pred: &Path, gt: &Path, ratio: f64) -> Result<MaskCase> {
    let (ph, pw, p) = load_mask_png(pred)?;
    let (gh, gw, g) = load_mask_png(gt)?;
    if (ph, pw) != (gh, gw) {
        return Err(Error::Image {
            path: pred.to_path_buf(),
            msg: format!(
                "mask is {pw}×{ph} but the reference {} is {gw}×{gh}",
                gt.display()
            ),
        });
    }
    // pack once: IoU counts and both boundaries come from the packed bits
    let (p, g) = (PackedMask::pack(&p, ph, pw)?, PackedMask::pack(&g, gh, gw)?);
    let (i, u) = p.inter_union(&g)?;
    let d = boundary_width(ph, pw, ratio);
    let (bi, bu) = p.boundary(d)?.inter_union(&g.boundary(d)?)?;
    Ok(MaskCase {
        iou: iou_from_counts(i, u),
        boundary_iou: iou_from_counts(bi, bu),
        intersection: i,
        union: u,
    })
}

/// How many pairs [`evaluate_mask_dirs`] will score (for a progress bar's length), after
/// checking that both folders hold the same PNG names.
pub fn mask_pairs(pred_dir: &Path, gt_dir: &Path) -> Result<Vec<String>> {
    let pn = png_names(pred_dir)?;
    let gn = png_names(gt_dir)?;
    let missing = |dir: &Path, n: &str, msg: String| {
        Error::io(dir.join(n), io::Error::new(io::ErrorKind::NotFound, msg))
    };
    if let Some(n) = pn.difference(&gn).next() {
        return Err(missing(
            pred_dir,
            n,
            format!("no reference mask of that name in {}", gt_dir.display()),
        ));
    }
    if let Some(n) = gn.difference(&pn).next() {
        return Err(missing(
            gt_dir,
            n,
            format!("no predicted mask of that name in {}", pred_dir.display()),
        ));
    }
    if pn.is_empty() {
        return Err(Error::arg(
            "eval-masks",
            format!(
                "no PNG masks in {} or {}",
                pred_dir.display(),
                gt_dir.display()
            ),
        ));
    }
    Ok(pn.into_iter().collect())
}

/// Score every pair of same-named PNG masks in `pred_dir` and `gt_dir` with boundary
/// width `ratio` × diagonal; `tick` is called once per scored pair (for a progress
/// bar).  A file on one side only, masks of different sizes, a file that does not
/// decode or a bad `ratio` is an `Err` naming it.
pub fn evaluate_mask_dirs(
    pred_dir: &Path,
    gt_dir: &Path,
    ratio: f64,
    tick: &(dyn Fn() + Sync),
) -> Result<MaskReport> {
    if !(ratio.is_finite() && ratio >= 0.0) {
        return Err(Error::arg(
            "eval-masks",
            format!("--dilation-ratio must be a finite number ≥ 0, got {ratio}"),
        ));
    }
    let names = mask_pairs(pred_dir, gt_dir)?;
    let results: Vec<Result<MaskCase>> = names
        .par_iter()
        .map(|n| {
            let r = eval_pair(&pred_dir.join(n), &gt_dir.join(n), ratio);
            tick();
            r
        })
        .collect();
    let mut cases = BTreeMap::new();
    let (mut si, mut su, mut giou) = (0u64, 0u64, 0f64);
    // sequential sums in name order: the report does not depend on the thread count
    for (n, r) in names.into_iter().zip(results) {
        let c = r?;
        si += c.intersection;
        su += c.union;
        giou += c.iou;
        cases.insert(n, c);
    }
    Ok(MaskReport {
        giou: giou / cases.len() as f64,
        ciou: iou_from_counts(si, su),
        cases,
    })
}
