//! `popen infer`: one image, one prompt: the answer on stdout, an overlay PNG (each mask
//! in its own colour, labelled with its phrase) and each mask as a 0/255 PNG.
use super::model_args::DeviceArg;
use anyhow::Context;
use popen::backend::{Backend, OnBackend};
use popen::data::world::overlay;
use popen::data::world::overlay::seg_phrases;
use popen::data::Mask;
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
            let px = preprocess(self.1, model.cfg.image_size)?;
            let p = model
                .predict(
                    &tok,
                    &[(&px, self.0.prompt.as_str())],
                    &SamplingCfg::greedy(),
                )?
                .remove(0);
            Ok((px, p))
        }
    }
    let (px, p) = a.device.device.run(Job(&a, &img))?;
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
