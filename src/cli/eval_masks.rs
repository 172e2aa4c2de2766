//! `popen eval-masks --pred DIR --gt DIR [--dilation-ratio 0.02] [--out report.json]`:
//! IoU and Boundary IoU of PNG masks matched by file name; the engine and its
//! definitions are [`popen::metrics::masks`].
use indicatif::{ProgressBar, ProgressStyle};
use popen::kernels::mask::DEFAULT_DILATION_RATIO;
use popen::metrics::masks::{evaluate_mask_dirs, mask_pairs};
use std::path::PathBuf;

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

/// Below this many pairs no progress bar is drawn.
const PROGRESS_MIN: usize = 64;

pub fn run(a: Args) -> anyhow::Result<()> {
    // the names are listed twice (here for the bar's length); a folder is small next
    // to the decoding of its PNGs
    let n = mask_pairs(&a.pred, &a.gt)?.len();
    let bar = if n >= PROGRESS_MIN {
        let b = ProgressBar::new(n as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} masks {elapsed_precise} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let report = evaluate_mask_dirs(&a.pred, &a.gt, a.dilation_ratio, &|| bar.inc(1));
    bar.finish_and_clear();
    let report = report?;
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
