//! `popen eval`: score any model's predictions against MUSE-schema ground truth.
use popen::metrics::eval::{EvalConfig, DEFAULT_DILATION_RATIO, DEFAULT_FEW_MAX};
use std::path::PathBuf;

/// Arguments of `popen eval`.
#[derive(clap::Args)]
pub struct Args {
    /// MUSE-schema ground truth: a JSON list of image records.
    #[arg(long)]
    pub data: PathBuf,
    /// Predictions, one JSON object per line: {"file_name", "question", "text", "masks"}.
    #[arg(long)]
    pub pred: PathBuf,
    /// CHAIR vocabulary, one object per line: `canonical, synonym, ...` (default: embedded).
    #[arg(long)]
    pub vocab: Option<PathBuf>,
    /// Boundary IoU width as a fraction of the image diagonal.
    #[arg(long, default_value_t = DEFAULT_DILATION_RATIO)]
    pub dilation_ratio: f64,
    /// Questions with at most this many targets form the `few` split.
    #[arg(long, default_value_t = DEFAULT_FEW_MAX)]
    pub few_max: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = EvalConfig {
        dilation_ratio: a.dilation_ratio,
        few_max: a.few_max,
    };
    let report = popen::metrics::evaluate_files(&a.data, &a.pred, a.vocab.as_deref(), &cfg)?;
    print!("{}", report.table());
    if let Some(out) = &a.out {
        popen::fsio::write_atomic(out, report.to_json().as_bytes())?;
        println!("report written to {}", out.display());
    }
    Ok(())
}
