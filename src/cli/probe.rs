//! `popen probe-embeddings`: do a run's segmentation embeddings `f` carry their targets'
//! categories?  Every target of a MUSE-schema file is read teacher-forced on its
//! answer; the measures are [`popen::metrics::separability`]'s.
use super::model_args::DeviceArg;
use popen::backend::{Backend, OnBackend};
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
        type Out = Separability;
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<Separability> {
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
            let bar = super::progress::bar(items.len() as u64, "probe");
            for chunk in items.chunks(a.batch) {
                let exs = chunk
                    .iter()
                    .map(|(_, s)| example(&model.cfg, &tok, s))
                    .collect::<popen::Result<Vec<_>>>()?;
                let mut emb = model.target_embeddings(&exs)?.into_iter();
                for (file, s) in chunk {
                    let n = image_of.len();
                    let g = *image_of.entry(file.clone()).or_insert(n);
                    for t in &s.targets {
                        if let Some(f) = emb.next() {
                            rows.push((t.category.clone(), g, f));
                        }
                    }
                }
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            Ok(separability(&rows))
        }
    }
    let s = a.device.device.run(Job(&a))?;
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
    if let Some(out) = &a.out {
        popen::fsio::write_atomic(out, serde_json::to_string_pretty(&s)?.as_bytes())?;
    }
    Ok(())
}
