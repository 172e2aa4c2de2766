//! `popen predict`: a trained segmentation model answers every question of a
//! MUSE-schema file; writes the `PRED.jsonl` that `popen eval` reads.
use super::model_args::{DeviceArg, EnsembleArgs};
use popen::backend::{Backend, OnBackend};
use popen::method::ensemble::{load_prompt, EnsembleCfg};
use popen::method::predict::{
    data_root, predict_items, predict_items_ensemble, questions, sample_lines, write_jsonl,
    write_preds, CopyCounts, SampleLine,
};
use popen::metrics::eval::PredLine;
use popen::model::seg::SegModel;
use popen::nn::SamplingCfg;
use std::path::PathBuf;

/// Arguments of `popen predict`.
#[derive(clap::Args)]
pub struct Args {
    /// A run directory (`popen train ...`'s `--out`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// MUSE-schema questions (answers are not read).
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the predictions, one JSON object per question.
    #[arg(long)]
    pub out: PathBuf,
    /// Image folder (default: the data file's folder).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Questions per forward (their images are encoded together).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sampling seed: of the answers with --temperature > 0, and of the K samples with
    /// --ensemble K (question i draws from the streams seeded from seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[command(flatten)]
    pub ensemble: EnsembleArgs,
    /// With --ensemble K: also write each question's K samples beside its answer `ỹ`
    /// (JSONL: the samples' texts, mean log-probabilities and η, the most likely one,
    /// which sample `ỹ` copies if any) to this file.
    #[arg(long, value_name = "SAMPLES.jsonl")]
    pub samples: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    if a.samples.is_some() && a.ensemble.ensemble == 0 {
        anyhow::bail!("--samples needs --ensemble K (the samples are the ensemble's)");
    }
    /// Load and predict on the backend `--device` names.
    struct Job<'a>(&'a Args);
    impl OnBackend for Job<'_> {
        type Out = (Vec<PredLine>, Option<Vec<SampleLine>>);
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<Self::Out> {
            let a = self.0;
            let (model, tok) = SegModel::load(be, &a.checkpoint)?;
            let root = data_root(&a.data, &a.images);
            let items = questions(&a.data, &root)?;
            let cfg = SamplingCfg {
                temperature: a.temperature,
                top_p: 1.0,
                seed: a.seed,
            };
            let bar = super::progress::bar(items.len() as u64, "predict");
            let inc = |n: usize| bar.inc(n as u64);
            let out = if a.ensemble.ensemble == 0 {
                (
                    predict_items(&model, &tok, &items, a.batch, &cfg, inc)?,
                    None,
                )
            } else {
                let hidden = model.llava.cfg.text.hidden_size;
                let prompt = load_prompt(&a.checkpoint, hidden)?;
                if prompt.is_none() && !a.ensemble.no_prompt {
                    eprintln!(
                        "note: {} has no learnable prompt p̂ (stage 3 trains it): ensembling without it",
                        a.checkpoint.display()
                    );
                }
                let prompt = prompt.map(|p| model.llava.be.from_slice(&p));
                // only the answers' masks are written
                let ecfg = EnsembleCfg {
                    sample_masks: false,
                    ..a.ensemble.cfg(a.ensemble.ensemble)
                };
                let (lines, full) = predict_items_ensemble(
                    &model,
                    &tok,
                    &items,
                    a.batch,
                    &ecfg,
                    a.seed,
                    prompt.as_ref(),
                    inc,
                )?;
                let fell = full.iter().filter(|e| e.fallback).count();
                if fell > 0 {
                    eprintln!(
                        "note: {fell} of {} questions did not fit the context for refinement: \
                         their answer is the most likely sample",
                        full.len()
                    );
                }
                let samples = a.samples.is_some().then(|| sample_lines(&lines, &full));
                (lines, samples)
            };
            bar.finish_and_clear();
            Ok(out)
        }
    }
    let (lines, samples) = a.device.run(Job(&a))?;
    write_preds(&a.out, &lines)?;
    println!("{} predictions written to {}", lines.len(), a.out.display());
    if let (Some(path), Some(samples)) = (&a.samples, samples) {
        write_jsonl(path, &samples)?;
        let c = CopyCounts::of(&samples);
        println!(
            "samples written to {}: the answer is the most likely sample in {}, another \
             sample in {}, none of the samples in {} of {} questions",
            path.display(),
            c.most_likely,
            c.other_sample,
            c.new_text,
            samples.len()
        );
    }
    Ok(())
}
