//! `popen probe-embeddings`: do a run's segmentation embeddings `f` carry their targets'
//! categories?  Every target of a MUSE-schema file is read teacher-forced on its
//! answer; the measures are [`popen::metrics::separability`]'s, beside the mean IoU of
//! the teacher-forced masks with their targets (grounding without the text's errors).
use super::model_args::DeviceArg;
use popen::backend::{Backend, OnBackend};
use popen::kernels::mask::{iou_from_counts, pair_counts_cpu};
use popen::method::predict::{data_root, questions};
use popen::metrics::separability::{separability, Separability};
use popen::model::seg::data::example;
use popen::model::seg::SegModel;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Arguments of `popen probe-embeddings`.
#[derive(clap::Args)]
pub struct Args {
    /// A run directory (`popen train ...`'s `--out`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// MUSE-schema questions with answers and masks.
    #[arg(long)]
    pub data: PathBuf,
    /// Image folder (default: the data file's folder).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Read at most this many questions with targets (in file order).
    #[arg(long, default_value_t = 600)]
    pub limit: usize,
    /// Questions per forward.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Write the measures as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    /// Load and read the embeddings on the backend `--device` names.
    struct Job<'a>(&'a Args);
    impl OnBackend for Job<'_> {
        type Out = (Separability, f64);
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<(Separability, f64)> {
            let a = self.0;
            let (model, tok) = SegModel::load(be, &a.checkpoint)?;
            let root = data_root(&a.data, &a.images);
            let items: Vec<_> = questions(&a.data, &root)?
                .into_iter()
                .filter(|(_, s)| !s.targets.is_empty())
                .take(a.limit)
                .collect();
            let mut image_of: BTreeMap<String, usize> = BTreeMap::new();
            let mut rows = Vec::new();
            let mut ious = Vec::new();
            let bar = super::progress::bar(items.len() as u64, "probe");
            for chunk in items.chunks(a.batch) {
                let exs = chunk
                    .iter()
                    .map(|(_, s)| example(&model.cfg, &tok, s))
                    .collect::<popen::Result<Vec<_>>>()?;
                let (emb, logits) = model.target_embeddings(&exs)?;
                let (mut emb, mut logits) = (emb.into_iter(), logits.into_iter());
                for ((file, s), ex) in chunk.iter().zip(&exs) {
                    let n = image_of.len();
                    let g = *image_of.entry(file.clone()).or_insert(n);
                    for (t, gt) in s.targets.iter().zip(&ex.masks) {
                        if let (Some(f), Some(lg)) = (emb.next(), logits.next()) {
                            rows.push((t.category.clone(), g, f));
                            ious.push(mask_iou(&lg, gt)?);
                        }
                    }
                }
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            let mean_iou = ious.iter().sum::<f64>() / ious.len().max(1) as f64;
            Ok((separability(&rows), mean_iou))
        }
    }
    let (s, mean_iou) = a.device.device.run(Job(&a))?;
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    println!(
        "{} targets, {} categories (images compared with other images only)",
        s.items, s.categories
    );
    println!(
        "mean cosine of f: same category {}, different categories {}",
        f(s.cos_same),
        f(s.cos_diff)
    );
    println!(
        "nearest-neighbour category accuracy {} (most frequent category {:.4})",
        f(s.nn_accuracy),
        s.chance
    );
    println!("teacher-forced masks: mean IoU with their targets {mean_iou:.4}");
    if let Some(out) = &a.out {
        let mut j = serde_json::to_value(&s)?;
        j["teacher_forced_mean_iou"] = mean_iou.into();
        popen::fsio::write_atomic(out, serde_json::to_string_pretty(&j)?.as_bytes())?;
    }
    Ok(())
}

/// IoU of a mask's logits (thresholded at 0) with a 0/1 target, by the mask kernel's
/// CPU twin (1 when both are empty).
fn mask_iou(logits: &[f32], target: &[f32]) -> popen::Result<f64> {
    let p: Vec<u8> = logits.iter().map(|&l| u8::from(l > 0.0)).collect();
    let g: Vec<u8> = target.iter().map(|&t| u8::from(t > 0.5)).collect();
    let (mut inter, mut union) = ([0u64], [0u64]);
    pair_counts_cpu(&p, &g, 1, 1, 1, p.len(), &mut inter, &mut union)?;
    Ok(iou_from_counts(inter[0], union[0]))
}
