//! `popen probe-embeddings`: do a run's segmentation embeddings `f` carry their targets'
//! categories?  Every target of a MUSE-schema file is read teacher-forced on its
//! answer; the measures are [`popen::metrics::separability`]'s, beside the mean IoU of
//! the teacher-forced masks with their targets (grounding without the text's errors).
//! The same measures on each target's *region features* — the pixel decoder's two ViT
//! feature levels averaged over the patches the target's mask covers — say whether the
//! image side knows the category at all: if it does not, no `f` can select the target.
//! A model with the patch-category head ([`popen::model::seg::category`]) also reports
//! the head's accuracy on the labelled patches, and how well its per-image evidence
//! (the presence token's input, [`popen::model::seg::evidence`]) tells the categories
//! in an image from those not in it: the ROC AUC over every (image, category).
use super::model_args::DeviceArg;
use popen::backend::{Backend, OnBackend};
use popen::kernels::mask::{iou_from_counts, pair_counts_cpu};
use popen::method::predict::{data_root, questions};
use popen::metrics::separability::{separability, Separability};
use popen::model::seg::data::example;
use popen::model::seg::evidence::max_class_probs;
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

/// What `popen probe-embeddings` measures (`--out` writes it as JSON).
#[derive(serde::Serialize)]
struct Probe {
    /// of the segmentation embeddings `f`
    #[serde(flatten)]
    f: Separability,
    teacher_forced_mean_iou: f64,
    /// of the region features at the decoder's two levels
    region_features: [Separability; 2],
    /// the patch head's accuracy on object patches and on all labelled patches
    patch_head_accuracy: Option<PatchAccuracy>,
    /// P(e[present] > e[absent]) of the patch head's evidence over every (image,
    /// category) of the head's classes (ties half)
    presence_evidence_auc: Option<f64>,
}

#[derive(serde::Serialize)]
struct PatchAccuracy {
    objects: f64,
    all: f64,
    object_patches: usize,
    patches: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    /// Load and read the embeddings on the backend `--device` names.
    struct Job<'a>(&'a Args);
    impl OnBackend for Job<'_> {
        type Out = Probe;
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<Self::Out> {
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
            let mut regions: [Vec<(String, usize, Vec<f32>)>; 2] = Default::default();
            let mut ious = Vec::new();
            // (right, labelled) over object patches and over all labelled patches
            let mut patch_hits = [(0usize, 0usize); 2];
            // the evidence of each (image, class): (e, class in the image)
            let mut evidence: Vec<(f32, bool)> = Vec::new();
            let bar = super::progress::bar(items.len() as u64, "probe");
            for chunk in items.chunks(a.batch) {
                let exs = chunk
                    .iter()
                    .map(|(_, s)| example(&model.cfg, &tok, s))
                    .collect::<popen::Result<Vec<_>>>()?;
                let (emb, logits) = model.target_embeddings(&exs)?;
                let (mut emb, mut logits) = (emb.into_iter(), logits.into_iter());
                let px: Vec<_> = exs.iter().map(|e| &e.pixels).collect();
                let enc = model.encode_images(&px)?;
                for (((file, s), ex), enc) in chunk.iter().zip(&exs).zip(&enc) {
                    let n = image_of.len();
                    let g = *image_of.entry(file.clone()).or_insert(n);
                    let first_visit = g == n;
                    let feats = enc.feats.each_ref().map(|f| model.llava.be.to_vec(f));
                    if let Some(head) = &model.patch_head {
                        let be = &model.llava.be;
                        let lg = be.to_vec(&head.forward(be, &enc.feats[0])?);
                        let c = head.fan_out();
                        if first_visit {
                            let kp = model.patches_per_image();
                            let e = max_class_probs(&lg, 1, kp, c);
                            for (name, &ek) in model.cfg.classes.iter().zip(&e) {
                                let here = s.objects.iter().any(|o| o.category == *name);
                                evidence.push((ek, here));
                            }
                        }
                        for (row, &label) in lg.chunks(c).zip(&ex.classes.patches) {
                            if label < 0 {
                                continue;
                            }
                            let best = argmax(row) as i32;
                            for (k, hits) in patch_hits.iter_mut().enumerate() {
                                if k == 1 || label > 0 {
                                    hits.0 += usize::from(best == label);
                                    hits.1 += 1;
                                }
                            }
                        }
                    }
                    for (t, gt) in s.targets.iter().zip(&ex.masks) {
                        let grid =
                            model.llava.cfg.vision.image_size / model.llava.cfg.vision.patch_size;
                        let w = patch_weights(gt, &ex.pixels, grid);
                        for (level, f) in regions.iter_mut().zip(&feats) {
                            level.push((t.category.clone(), g, pool(f, &w)));
                        }
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
            let ratio = |(r, n): (usize, usize)| r as f64 / n.max(1) as f64;
            Ok(Probe {
                f: separability(&rows),
                teacher_forced_mean_iou: mean_iou,
                region_features: regions.map(|r| separability(&r)),
                patch_head_accuracy: model.patch_head.as_ref().map(|_| PatchAccuracy {
                    objects: ratio(patch_hits[0]),
                    all: ratio(patch_hits[1]),
                    object_patches: patch_hits[0].1,
                    patches: patch_hits[1].1,
                }),
                presence_evidence_auc: roc_auc(&evidence),
            })
        }
    }
    let p = a.device.run(Job(&a))?;
    let s = &p.f;
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
    println!(
        "teacher-forced masks: mean IoU with their targets {:.4}",
        p.teacher_forced_mean_iou
    );
    for (level, r) in p.region_features.iter().enumerate() {
        println!(
            "region features, decoder level {level}: nearest-neighbour category accuracy {}, \
             cosine same {} / different {}",
            f(r.nn_accuracy),
            f(r.cos_same),
            f(r.cos_diff)
        );
    }
    if let Some(h) = &p.patch_head_accuracy {
        println!(
            "patch head: accuracy {:.4} on {} object patches, {:.4} on all {} labelled patches",
            h.objects, h.object_patches, h.all, h.patches
        );
    }
    if let Some(auc) = p.presence_evidence_auc {
        println!(
            "patch head's evidence (highest probability of a category over the image's \
             patches): ROC AUC {auc:.4}, categories in the image over those not"
        );
    }
    if let Some(out) = &a.out {
        popen::fsio::write_atomic(out, serde_json::to_string_pretty(&p)?.as_bytes())?;
    }
    Ok(())
}

/// P(a > b) for a scored item `a` labelled true and `b` labelled false (ties half), by
/// ranks; `None` unless both labels occur.
fn roc_auc(items: &[(f32, bool)]) -> Option<f64> {
    let mut v: Vec<(f32, bool)> = items.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut below, mut wins, mut i) = (0.0f64, 0.0f64, 0);
    let pos = v.iter().filter(|x| x.1).count() as f64;
    let neg = v.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    while i < v.len() {
        // a run of equal scores: its positives beat the negatives below and tie its own
        let j = i + v[i..].iter().take_while(|x| x.0 == v[i].0).count();
        let (p, n) = v[i..j].iter().fold(
            (0.0, 0.0),
            |(p, n), x| {
                if x.1 {
                    (p + 1.0, n)
                } else {
                    (p, n + 1.0)
                }
            },
        );
        wins += p * (below + 0.5 * n);
        below += n;
        i = j;
    }
    Some(wins / (pos * neg))
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

/// Per patch of the `grid × grid` tower input, the share of a target's pixels (the mask
/// at the image's own size, mapped into the resized frame) that fall in it.
fn patch_weights(
    mask: &[f32],
    px: &popen::model::seg::preprocess::Pixels,
    grid: usize,
) -> Vec<f32> {
    let mut w = vec![0f32; grid * grid];
    let cell = popen::model::seg::category::pixel_patches(px, grid);
    for (&p, &m) in cell.iter().zip(mask) {
        if m > 0.5 {
            w[p] += 1.0;
        }
    }
    let total: f32 = w.iter().sum();
    if total > 0.0 {
        w.iter_mut().for_each(|x| *x /= total);
    }
    w
}

/// The weighted mean of a (patches, C) feature map's rows.
fn pool(feats: &[f32], w: &[f32]) -> Vec<f32> {
    let c = feats.len() / w.len().max(1);
    let mut out = vec![0f32; c];
    for (row, &wi) in feats.chunks(c.max(1)).zip(w) {
        if wi > 0.0 {
            out.iter_mut().zip(row).for_each(|(o, &x)| *o += wi * x);
        }
    }
    out
}

/// Index of the largest value (the first of ties; 0 for an empty row).
fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::roc_auc;

    #[test]
    fn roc_auc_counts_wins_and_half_ties() {
        // positives 3, 2; negatives 1, 2: wins 3>1, 3>2, 2>1, and 2 = 2 half
        let v = [(3.0, true), (1.0, false), (2.0, true), (2.0, false)];
        assert_eq!(roc_auc(&v), Some(3.5 / 4.0));
        let flipped: Vec<(f32, bool)> = v.iter().map(|&(x, l)| (-x, l)).collect();
        assert_eq!(roc_auc(&flipped), Some(0.5 / 4.0));
        assert_eq!(roc_auc(&[(1.0, true)]), None);
    }
}
