//! `popen eval-masks --pred DIR --gt DIR [--dilation-ratio 0.02] [--out report.json]`:
//! IoU and Boundary IoU of PNG masks matched by file name.
//!
//! Masks are read by [`popen::data::png`] (nonzero in any colour channel = foreground).
//! Writes
//! `{"cases": {name: {"iou", "boundary_iou", "intersection", "union"}}, "giou",
//! "ciou"}` with gIoU = mean IoU, cIoU = ΣI/ΣU, empty-vs-empty = 1.0.  PNGs decode in
//! parallel (rayon); the metrics are the CPU twins of `popen::kernels::mask`.
use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use popen::data::png::load_mask_png;
use popen::kernels::mask::{boundary_width, iou_from_counts, PackedMask, DEFAULT_DILATION_RATIO};
use popen::Error;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Arguments of `popen eval-masks`.
#[derive(clap::Args)]
pub struct Args {
    /// Folder of predicted masks (PNG, nonzero = foreground).
    #[arg(long)]
    pub pred: PathBuf,
    /// Folder of reference masks, matched to the predictions by file name.
    #[arg(long)]
    pub gt: PathBuf,
    /// Boundary width as a fraction of the image diagonal (Cheng et al. 2021).
    #[arg(long, default_value_t = DEFAULT_DILATION_RATIO)]
    pub dilation_ratio: f64,
    /// Write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Metrics of one mask pair.
#[derive(Serialize, Clone, Debug)]
pub struct Case {
    pub iou: f64,
    pub boundary_iou: f64,
    pub intersection: u64,
    pub union: u64,
}

/// The JSON report.
#[derive(Serialize, Debug)]
pub struct Report {
    pub cases: BTreeMap<String, Case>,
    pub giou: f64,
    pub ciou: f64,
}

/// Below this many pairs no progress bar is drawn.
const PROGRESS_MIN: usize = 64;

/// Names of the `.png` files (any case) in `dir`.
fn png_names(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = BTreeSet::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        let is_png = p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png"));
        if is_png && p.is_file() {
            let name = e
                .file_name()
                .into_string()
                .map_err(|n| anyhow::anyhow!("{}: file name is not UTF-8: {n:?}", dir.display()))?;
            names.insert(name);
        }
    }
    Ok(names)
}

fn eval_pair(pred: &Path, gt: &Path, ratio: f64) -> anyhow::Result<Case> {
    let (ph, pw, p) = load_mask_png(pred)?;
    let (gh, gw, g) = load_mask_png(gt)?;
    if (ph, pw) != (gh, gw) {
        bail!(
            "{}: mask is {pw}×{ph} but the reference {} is {gw}×{gh}",
            pred.display(),
            gt.display()
        );
    }
    // pack once: IoU counts and both boundaries come from the packed bits
    let (p, g) = (PackedMask::pack(&p, ph, pw)?, PackedMask::pack(&g, gh, gw)?);
    let (i, u) = p.inter_union(&g)?;
    let d = boundary_width(ph, pw, ratio);
    let (bi, bu) = p.boundary(d)?.inter_union(&g.boundary(d)?)?;
    Ok(Case {
        iou: iou_from_counts(i, u),
        boundary_iou: iou_from_counts(bi, bu),
        intersection: i,
        union: u,
    })
}

/// Evaluate every pair; the library-level body of the subcommand.
pub fn evaluate(pred_dir: &Path, gt_dir: &Path, ratio: f64) -> anyhow::Result<Report> {
    if !(ratio.is_finite() && ratio >= 0.0) {
        bail!("--dilation-ratio must be a finite number ≥ 0, got {ratio}");
    }
    let pn = png_names(pred_dir)?;
    let gn = png_names(gt_dir)?;
    if let Some(n) = pn.difference(&gn).next() {
        bail!(
            "{}: no reference mask of that name in {}",
            pred_dir.join(n).display(),
            gt_dir.display()
        );
    }
    if let Some(n) = gn.difference(&pn).next() {
        bail!(
            "{}: no predicted mask of that name in {}",
            gt_dir.join(n).display(),
            pred_dir.display()
        );
    }
    if pn.is_empty() {
        bail!(
            "no PNG masks in {} or {}",
            pred_dir.display(),
            gt_dir.display()
        );
    }
    let names: Vec<&String> = pn.iter().collect();
    let bar = if names.len() >= PROGRESS_MIN {
        let b = ProgressBar::new(names.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} masks {elapsed_precise} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let results: Vec<anyhow::Result<Case>> = names
        .par_iter()
        .map(|n| {
            let r = eval_pair(&pred_dir.join(n), &gt_dir.join(n), ratio);
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();
    let mut cases = BTreeMap::new();
    let (mut si, mut su, mut giou) = (0u64, 0u64, 0f64);
    for (n, r) in names.iter().zip(results) {
        let c = r?;
        si += c.intersection;
        su += c.union;
        giou += c.iou;
        cases.insert((*n).clone(), c);
    }
    Ok(Report {
        giou: giou / cases.len() as f64,
        ciou: iou_from_counts(si, su),
        cases,
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let report = evaluate(&a.pred, &a.gt, a.dilation_ratio)?;
    let width = report
        .cases
        .keys()
        .map(|k| k.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:>8}  {:>8}  {:>10}  {:>10}",
        "file", "IoU", "BIoU", "inter", "union"
    );
    for (n, c) in &report.cases {
        println!(
            "{:<width$}  {:>8.4}  {:>8.4}  {:>10}  {:>10}",
            n, c.iou, c.boundary_iou, c.intersection, c.union
        );
    }
    println!(
        "{} masks  gIoU {:.4}  cIoU {:.4}",
        report.cases.len(),
        report.giou,
        report.ciou
    );
    if let Some(out) = &a.out {
        let s = serde_json::to_string_pretty(&report)?;
        popen::fsio::write_atomic(out, s.as_bytes())?;
    }
    Ok(())
}
