//! `popen infer`: one image, one prompt: the answer on stdout, an overlay PNG (each mask
//! in its own colour, labelled with its phrase) and each mask as a 0/255 PNG.  With
//! `--ensemble K` the answer is the ensemble's refined one (the K samples on stderr).
use super::model_args::{DeviceArg, EnsembleArgs};
use anyhow::Context;
use popen::backend::{Backend, OnBackend};
use popen::data::world::overlay;
use popen::data::world::overlay::seg_phrases;
use popen::data::Mask;
use popen::method::ensemble::{load_prompt, sentence_ends, EnsembleCfg};
use popen::model::seg::preprocess;
use popen::model::seg::{Pixels, Prediction, SegModel};
use popen::nn::SamplingCfg;
use std::path::PathBuf;

/// Arguments of `popen infer`.
#[derive(clap::Args)]
pub struct Args {
    /// A run directory (`popen train ...`'s `--out`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The image (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,
    /// The question.
    #[arg(long)]
    pub prompt: String,
    /// Folder for `overlay.png` and `mask_<k>.png`.
    #[arg(long, default_value = "infer_out")]
    pub out: PathBuf,
    /// Seed of the ensemble's samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub ensemble: EnsembleArgs,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let img = image::ImageReader::open(&a.image)
        .with_context(|| format!("{}: cannot open", a.image.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", a.image.display()))?
        .decode()
        .with_context(|| format!("{}: does not decode", a.image.display()))?
        .into_rgb8();
    /// Load and answer on the backend `--device` names.
    struct Job<'a>(&'a Args, &'a image::RgbImage);
    impl OnBackend for Job<'_> {
        type Out = (Pixels, Prediction);
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<(Pixels, Prediction)> {
            let (model, tok) = SegModel::load(be, &self.0.checkpoint)?;
            let a = self.0;
            let px = preprocess(self.1, model.cfg.image_size)?;
            let item = [(&px, a.prompt.as_str())];
            if a.ensemble.ensemble == 0 {
                let p = model
                    .predict(&tok, &item, &SamplingCfg::greedy())?
                    .remove(0);
                return Ok((px, p));
            }
            let hidden = model.llava.cfg.text.hidden_size;
            let prompt = load_prompt(&a.checkpoint, hidden)?.map(|p| model.llava.be.from_slice(&p));
            let ends = sentence_ends(&tok.tok);
            // only the answer's masks are written
            let cfg = EnsembleCfg {
                sample_masks: false,
                ..a.ensemble.cfg(a.ensemble.ensemble)
            };
            let e = model
                .predict_ensemble(&tok, &item, &cfg, a.seed, prompt.as_ref(), &ends)?
                .remove(0);
            for (k, s) in e.samples.iter().enumerate() {
                eprintln!("sample {}: {}", k + 1, s.text);
            }
            if e.fallback {
                eprintln!("note: the samples left no room in the context: the most likely one is the answer");
            }
            Ok((px, e.answer))
        }
    }
    let (px, p) = a.device.run(Job(&a, &img))?;
    println!("{}", p.text);
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    let masks = p
        .masks
        .into_iter()
        .map(|m| Mask::from_vec(px.height, px.width, m))
        .collect::<popen::Result<Vec<_>>>()?;
    let mut labels = seg_phrases(&p.text);
    labels.resize(masks.len(), String::new());
    let base = overlay::load_rgb(&a.image)?;
    let refs: Vec<&Mask> = masks.iter().collect();
    let ov = overlay::overlay(&base, &refs, &labels, 4)?;
    overlay::save_png(&ov, &a.out.join("overlay.png"))?;
    for (k, m) in masks.iter().enumerate() {
        overlay::save_mask_png(m, &a.out.join(format!("mask_{k}.png")))?;
    }
    eprintln!(
        "{} mask(s); overlay.png and mask_<k>.png written to {}",
        masks.len(),
        a.out.display()
    );
    Ok(())
}
