//! `popen eval`: load and validate `DATA.json` + `PRED.jsonl`, score every question,
//! reduce in input order, report.  Definitions: [module docs of `metrics`](super).
use super::assign::{assign, iou_weight};
use super::chair::{chair_counts, Vocab};
use super::raster::{boundary_iou_intervals, rle_runs, segmentation_runs, Runs};
use crate::data::muse::{MuseAnn, MuseImage, RleJson};
use crate::data::sample::{check_muse, parse_muse_entries};
use crate::error::{Error, Result};
use crate::kernels::mask;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Default `--dilation-ratio` of Boundary IoU (Cheng et al. 2021).
pub const DEFAULT_DILATION_RATIO: f64 = 0.02;
/// Default `--few-max`: questions with at most this many targets form the `few` split.
pub const DEFAULT_FEW_MAX: usize = 3;

/// Options of the evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalConfig {
    /// Boundary width as a fraction of the image diagonal.
    pub dilation_ratio: f64,
    /// Largest target count of the `few` split.
    pub few_max: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            dilation_ratio: DEFAULT_DILATION_RATIO,
            few_max: DEFAULT_FEW_MAX,
        }
    }
}

/// One line of `PRED.jsonl` as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PredLine {
    /// Image the prediction belongs to; must equal a `file_name` of `DATA.json`.
    pub file_name: String,
    /// 0-based index into the image's `questions`.
    pub question: usize,
    /// The model's response text, scored by CHAIR.
    pub text: String,
    /// Predicted masks as COCO RLE of the image's size; each one counts as a prediction.
    pub masks: Vec<RleJson>,
}

/// A validated prediction: its line, text and masks as column-major run lengths.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// 1-based line in `PRED.jsonl`.
    pub line: usize,
    /// The model's response text, scored by CHAIR.
    pub text: String,
    /// Per mask, runs that cover exactly the image (validated).
    pub masks: Vec<Vec<u32>>,
}

/// Predictions aligned with the data: `[image][question]`, `None` = missing.
pub type Predictions = Vec<Vec<Option<Prediction>>>;

// pixel indices are u32 in the interval arithmetic: the readers' size limit keeps them so
const _: () = assert!(crate::data::sample::MAX_IMAGE_PIXELS <= u32::MAX as usize);

/// Parse and check `DATA.json` text (`source` names it in errors): a MUSE file (a list
/// of image records or `{"images": [...]}`) under the data readers' rules
/// ([`check_muse`]), so that `popen eval` and the readers accept the same files.  A
/// record without `file_name` gets the path the readers derive from its `coco_url`,
/// which is the name its predictions use.
pub fn parse_data(text: &str, source: &Path) -> Result<Vec<MuseImage>> {
    let mut data: Vec<MuseImage> = parse_muse_entries(source, text)?
        .into_iter()
        .map(|e| e.image)
        .collect();
    let names = check_muse(source, &data)?;
    for (img, name) in data.iter_mut().zip(names) {
        img.file_name = name;
    }
    Ok(data)
}

/// Parse and check `PRED.jsonl` text against `data` (`source` names it in errors).
/// Every problem is an `Err` naming the line: malformed JSON, unknown image or
/// question, a second line for a question, a mask of the wrong size, an RLE that does
/// not decode.  The first problem in line order is reported.
pub fn parse_preds(text: &str, source: &Path, data: &[MuseImage]) -> Result<Predictions> {
    let index: HashMap<&str, usize> = data
        .iter()
        .enumerate()
        .map(|(i, d)| (d.file_name.as_str(), i))
        .collect();
    let err = |line: usize, msg: String| Error::Json {
        path: source.into(),
        line: Some(line),
        msg,
    };
    let lines: Vec<&str> = text.lines().collect();
    // parse and decode-check in parallel; errors are kept per line, reported in order
    let parsed: Vec<Result<Option<(usize, usize, Prediction)>>> = lines
        .par_iter()
        .enumerate()
        .map(|(k, raw)| {
            let ln = k + 1;
            if raw.trim().is_empty() {
                return Ok(None);
            }
            let p: PredLine = serde_json::from_str(raw)
                .map_err(|e| err(ln, format!("malformed prediction: {e}")))?;
            let &img = index
                .get(p.file_name.as_str())
                .ok_or_else(|| err(ln, format!("unknown image {:?}", p.file_name)))?;
            let d = &data[img];
            if p.question >= d.questions.len() {
                return Err(err(
                    ln,
                    format!(
                        "question {} of {:?} does not exist (it has {})",
                        p.question,
                        p.file_name,
                        d.questions.len()
                    ),
                ));
            }
            let (h, w) = (d.height as usize, d.width as usize);
            let masks = p
                .masks
                .iter()
                .enumerate()
                .map(|(m, r)| rle_runs(r, h, w).map_err(|e| err(ln, format!("masks[{m}]: {e}"))))
                .collect::<Result<Vec<_>>>()?;
            Ok(Some((
                img,
                p.question,
                Prediction {
                    line: ln,
                    text: p.text,
                    masks,
                },
            )))
        })
        .collect();
    let mut out: Predictions = data.iter().map(|d| vec![None; d.questions.len()]).collect();
    for r in parsed {
        if let Some((img, q, p)) = r? {
            if let Some(prev) = &out[img][q] {
                return Err(err(
                    p.line,
                    format!(
                        "second prediction for question {q} of {:?} (first on line {})",
                        data[img].file_name, prev.line
                    ),
                ));
            }
            out[img][q] = Some(p);
        }
    }
    Ok(out)
}

/// What one question contributes to the sums.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuestionScore {
    /// `|G|`: ground-truth masks of the question.
    pub n_targets: usize,
    /// `|P|`: predicted masks (0 when the prediction is missing).
    pub n_pred: usize,
    /// `PRED.jsonl` has no line for the question; it is scored as text `""` with no masks.
    pub missing: bool,
    /// MUSE numerator: Σ IoU of matched pairs (1 for empty vs empty).
    pub muse_iou: f64,
    /// MUSE denominator: `max(|P|, |G|)`, 1 for empty vs empty.
    pub muse_denom: u64,
    /// MUSE `ΣI`: intersection pixels of the matched pairs.
    pub muse_inter: u64,
    /// MUSE `ΣU`: union pixels of the matched pairs plus the area of every unmatched
    /// prediction and ground truth.
    pub muse_union: u64,
    /// Pairs matched by the MUSE assignment (pairs with IoU 0 count as unmatched).
    pub n_matched: u64,
    /// Σ Boundary IoU over matched pairs.
    pub boundary_iou: f64,
    /// Matched pairs that are localization errors.
    pub loc_errors: u64,
    /// LISA IoU of the union of the predicted masks with the union of the ground truths
    /// (1 for empty vs empty).
    pub lisa_iou: f64,
    /// Intersection pixels of the two unions.
    pub lisa_inter: u64,
    /// Union pixels of the two unions.
    pub lisa_union: u64,
    /// CHAIR mentions of vocabulary objects in the response text.
    pub mentions: u64,
    /// Mentions whose object is not among the image's objects.
    pub hallucinated: u64,
    /// The matched ground truth of each prediction (for per-question inspection).
    pub matches: Vec<Option<usize>>,
}

/// Rasterize annotations to [`Runs`]; `Err((field, msg))` names the one that fails.
fn anns_to_runs(
    anns: &[MuseAnn],
    h: usize,
    w: usize,
    what: &dyn Fn(usize) -> String,
) -> std::result::Result<Vec<Runs>, (String, String)> {
    anns.iter()
        .enumerate()
        .map(|(k, a)| segmentation_runs(&a.segmentation, h, w).map_err(|e| (what(k), e)))
        .collect()
}

/// Boundary IoU of two masks of an `(h, w)` image with boundary width `d`, computed by
/// the kernels' CPU twins on the crop that holds both masks (the dense reference of
/// [`boundary_iou_intervals`], which the evaluator uses).  Outside the crop both
/// masks are background, as pixels outside the image are for the erosion, so the crop
/// changes nothing (tested against `boundary_iou_cpu` on the whole image).
pub fn boundary_iou_runs(a: &Runs, b: &Runs, h: usize, d: usize) -> Result<f64> {
    let crop = match (a.bbox(h), b.bbox(h)) {
        (None, None) => return Ok(1.0),
        (Some(x), None) | (None, Some(x)) => x,
        (Some(p), Some(q)) => (p.0.min(q.0), p.1.max(q.1), p.2.min(q.2), p.3.max(q.3)),
    };
    // column-major crop: (x1−x0) rows of (y1−y0) pixels
    let (nx, ny) = (crop.1 - crop.0, crop.3 - crop.2);
    let mut ma = vec![0u8; nx * ny];
    let mut mb = vec![0u8; nx * ny];
    a.paint_crop(h, crop, &mut ma);
    b.paint_crop(h, crop, &mut mb);
    let mut ba = vec![0u8; nx * ny];
    let mut bb = vec![0u8; nx * ny];
    mask::boundary_cpu(&ma, nx, ny, d, &mut ba)?;
    mask::boundary_cpu(&mb, nx, ny, d, &mut bb)?;
    let (i, u) = mask::counts_cpu(&ba, &bb)?;
    Ok(mask::iou_from_counts(i, u))
}

/// Score every question of one image.  `Err((field, msg))` on a ground truth that does
/// not rasterize.
fn score_image(
    img: &MuseImage,
    preds: &[Option<Prediction>],
    vocab: &Vocab,
    cfg: &EvalConfig,
) -> std::result::Result<Vec<QuestionScore>, (String, String)> {
    let (h, w) = (img.height as usize, img.width as usize);
    // the image diagonal is the same in the transposed frame
    let d = mask::boundary_width(h, w, cfg.dilation_ratio);

    let gts: Vec<Vec<Runs>> = img
        .answers
        .iter()
        .enumerate()
        .map(|(q, anns)| anns_to_runs(anns, h, w, &|k| format!("answers[{q}][{k}].segmentation")))
        .collect::<std::result::Result<_, _>>()?;
    // the image's objects: ann_list, or every answer annotation when it is absent
    let own_objects;
    let (objects, object_names): (Vec<&Runs>, Vec<&str>) = match &img.ann_list {
        Some(list) => {
            own_objects = anns_to_runs(list, h, w, &|k| format!("ann_list[{k}].segmentation"))?;
            (
                own_objects.iter().collect(),
                list.iter().map(|a| a.category_name.as_str()).collect(),
            )
        }
        None => (
            gts.iter().flatten().collect(),
            img.answers
                .iter()
                .flatten()
                .map(|a| a.category_name.as_str())
                .collect(),
        ),
    };
    let present: BTreeSet<String> = vocab.objects_of(object_names.iter().copied());

    let mut out = Vec::with_capacity(img.questions.len());
    // buffers reused by every question of the image: interval lists only grow
    let mut pool: Vec<Runs> = Vec::new();
    let (mut up, mut ug, mut tmp) = (Runs::default(), Runs::default(), Runs::default());
    for (q, gt) in gts.iter().enumerate() {
        let pred = preds[q].as_ref();
        let counts = pred.map_or(&[][..], |p| &p.masks[..]);
        if pool.len() < counts.len() {
            pool.resize_with(counts.len(), Runs::default);
        }
        for (r, c) in pool.iter_mut().zip(counts) {
            r.set_counts(c);
        }
        let ps = &pool[..counts.len()];
        let (np, ng) = (ps.len(), gt.len());
        let mut s = QuestionScore {
            n_targets: ng,
            n_pred: np,
            missing: pred.is_none(),
            ..Default::default()
        };

        // MUSE: counts for every pair, the assignment, then the sums
        let mut inter = vec![0u64; np * ng];
        let mut union = vec![0u64; np * ng];
        for (p, pm) in ps.iter().enumerate() {
            for (g, gm) in gt.iter().enumerate() {
                let i = pm.inter(gm);
                inter[p * ng + g] = i;
                union[p * ng + g] = pm.area + gm.area - i;
            }
        }
        let weights: Vec<i64> = inter
            .iter()
            .zip(&union)
            .map(|(&i, &u)| iou_weight(i, u))
            .collect();
        let matches = assign(&weights, np, ng);
        let mut gt_matched = vec![false; ng];
        for (p, m) in matches.iter().enumerate() {
            let Some(g) = *m else {
                s.muse_union += ps[p].area;
                continue;
            };
            gt_matched[g] = true;
            let (i, u) = (inter[p * ng + g], union[p * ng + g]);
            s.n_matched += 1;
            s.muse_iou += mask::iou_from_counts(i, u);
            s.muse_inter += i;
            s.muse_union += u;
            s.boundary_iou += boundary_iou_intervals(&ps[p], &gt[g], h, d);
            // IoU < 0.75 and IoU > 0.25 with another object (exact comparisons)
            if 4 * i < 3 * u {
                let hit = objects.iter().any(|o| {
                    let oi = ps[p].inter(o);
                    let ou = ps[p].area + o.area - oi;
                    4 * oi > ou && **o != gt[g]
                });
                s.loc_errors += u64::from(hit);
            }
        }
        for (g, &m) in gt_matched.iter().enumerate() {
            if !m {
                s.muse_union += gt[g].area;
            }
        }
        if np == 0 && ng == 0 {
            s.muse_iou = 1.0;
            s.muse_denom = 1;
        } else {
            s.muse_denom = np.max(ng) as u64;
        }
        s.matches = matches;

        // LISA: union of predictions vs union of targets
        up.set_union(ps, &mut tmp);
        ug.set_union(gt, &mut tmp);
        s.lisa_inter = up.inter(&ug);
        s.lisa_union = up.area + ug.area - s.lisa_inter;
        s.lisa_iou = mask::iou_from_counts(s.lisa_inter, s.lisa_union);

        // CHAIR
        let c = chair_counts(vocab, pred.map_or("", |p| p.text.as_str()), &present);
        s.mentions = c.mentions;
        s.hallucinated = c.hallucinated;
        out.push(s);
    }
    Ok(out)
}

/// Sums over a set of questions, in input order.
#[derive(Clone, Debug, Default)]
struct Acc {
    n: u64,
    missing: u64,
    muse_iou: f64,
    muse_denom: u64,
    muse_inter: u64,
    muse_union: u64,
    n_matched: u64,
    boundary_iou: f64,
    loc_errors: u64,
    lisa_iou: f64,
    lisa_inter: u64,
    lisa_union: u64,
    responses_hallucinating: u64,
    mentions: u64,
    hallucinated: u64,
    no_target: u64,
    no_target_correct: u64,
    pred_masks: u64,
    target_masks: u64,
}

impl Acc {
    fn add(&mut self, s: &QuestionScore) {
        self.n += 1;
        self.missing += u64::from(s.missing);
        self.muse_iou += s.muse_iou;
        self.muse_denom += s.muse_denom;
        self.muse_inter += s.muse_inter;
        self.muse_union += s.muse_union;
        self.n_matched += s.n_matched;
        self.boundary_iou += s.boundary_iou;
        self.loc_errors += s.loc_errors;
        self.lisa_iou += s.lisa_iou;
        self.lisa_inter += s.lisa_inter;
        self.lisa_union += s.lisa_union;
        self.responses_hallucinating += u64::from(s.hallucinated > 0);
        self.mentions += s.mentions;
        self.hallucinated += s.hallucinated;
        if s.n_targets == 0 {
            self.no_target += 1;
            self.no_target_correct += u64::from(s.n_pred == 0);
        }
        self.pred_masks += s.n_pred as u64;
        self.target_masks += s.n_targets as u64;
    }

    fn metrics(&self) -> Metrics {
        let ratio = |a: f64, b: u64| (b > 0).then(|| a / b as f64);
        // ΣI/ΣU with the empty-vs-empty convention, over a non-empty question set
        let ciou =
            |i: u64, u: u64| (self.n > 0).then(|| if u == 0 { 1.0 } else { i as f64 / u as f64 });
        Metrics {
            muse: MuseScores {
                giou: ratio(self.muse_iou, self.muse_denom),
                ciou: ciou(self.muse_inter, self.muse_union),
                boundary_iou: ratio(self.boundary_iou, self.n_matched),
            },
            lisa: LisaScores {
                giou: ratio(self.lisa_iou, self.n),
                ciou: ciou(self.lisa_inter, self.lisa_union),
            },
            chair_s: ratio(self.responses_hallucinating as f64, self.n),
            chair_i: ratio(self.hallucinated as f64, self.mentions),
            n_questions: self.n,
            missing: self.missing,
            loc_error: ratio(self.loc_errors as f64, self.n_matched),
            no_target_acc: ratio(self.no_target_correct as f64, self.no_target),
            counts: Counts {
                predicted_masks: self.pred_masks,
                target_masks: self.target_masks,
                matched: self.n_matched,
                loc_errors: self.loc_errors,
                mentions: self.mentions,
                hallucinated_mentions: self.hallucinated,
                hallucinating_responses: self.responses_hallucinating,
                no_target_questions: self.no_target,
                no_target_correct: self.no_target_correct,
            },
        }
    }
}

/// MUSE-protocol scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MuseScores {
    /// Σ per-question IoU sums / Σ `max(|P|, |G|)`.
    pub giou: Option<f64>,
    /// `ΣI / ΣU` over the questions (1 when `ΣU = 0`).
    pub ciou: Option<f64>,
    /// Mean Boundary IoU over matched pairs; `None` when nothing matched.
    pub boundary_iou: Option<f64>,
}

/// LISA-protocol scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LisaScores {
    /// Mean over questions of the IoU of the unions.
    pub giou: Option<f64>,
    /// `ΣI / ΣU` of the unions over the questions (1 when `ΣU = 0`).
    pub ciou: Option<f64>,
}

/// The integer counts behind the ratios.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// `Σ|P|`: predicted masks.
    pub predicted_masks: u64,
    /// `Σ|G|`: ground-truth masks.
    pub target_masks: u64,
    /// Pairs matched by the MUSE assignment.
    pub matched: u64,
    /// Matched pairs that are localization errors.
    pub loc_errors: u64,
    /// CHAIR mentions of vocabulary objects.
    pub mentions: u64,
    /// Mentions of objects not in their image.
    pub hallucinated_mentions: u64,
    /// Responses with at least one hallucinated mention.
    pub hallucinating_responses: u64,
    /// Questions with no ground-truth mask.
    pub no_target_questions: u64,
    /// No-target questions that got no predicted mask.
    pub no_target_correct: u64,
}

/// Every metric over one set of questions; `null` (None) where the set it averages
/// over is empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Scores under the MUSE (multi-target) protocol.
    pub muse: MuseScores,
    /// Scores under the LISA (union of masks) protocol.
    pub lisa: LisaScores,
    /// CHAIR_S: responses with at least one hallucination / all responses.
    pub chair_s: Option<f64>,
    /// CHAIR_I: hallucinated mentions / all mentions.
    pub chair_i: Option<f64>,
    /// Questions in the set.
    pub n_questions: u64,
    /// Questions with no line in `PRED.jsonl`.
    pub missing: u64,
    /// Localization errors / matched pairs (Supp D.3).
    pub loc_error: Option<f64>,
    /// No-target accuracy (GSVA's N-acc): share of no-target questions with no
    /// predicted mask.
    pub no_target_acc: Option<f64>,
    /// The integer counts behind the ratios.
    pub counts: Counts,
}

/// The `few` / `many` splits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ByTargets {
    /// Questions with at most `few_max` ground-truth masks, no-target ones included.
    pub few: Metrics,
    /// Questions with more than `few_max` ground-truth masks.
    pub many: Metrics,
}

/// The report of `popen eval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Metrics over every question; flattened into the report's top level in JSON.
    #[serde(flatten)]
    pub overall: Metrics,
    /// The same metrics over the `few` and `many` splits.
    pub by_targets: ByTargets,
    /// Image records in `DATA.json`.
    pub n_images: u64,
    /// Boundary IoU's dilation ratio used (fraction of the image diagonal).
    pub dilation_ratio: f64,
    /// Largest target count of the `few` split used.
    pub few_max: usize,
}

/// Per-question scores, `[image][question]`, in input order; `source` names
/// `DATA.json` in errors (a ground truth that does not rasterize).
pub fn score(
    data: &[MuseImage],
    preds: &Predictions,
    vocab: &Vocab,
    cfg: &EvalConfig,
    source: &Path,
) -> Result<Vec<Vec<QuestionScore>>> {
    if !(cfg.dilation_ratio.is_finite() && cfg.dilation_ratio >= 0.0) {
        return Err(Error::arg(
            "evaluate",
            format!(
                "dilation ratio {} must be finite and ≥ 0",
                cfg.dilation_ratio
            ),
        ));
    }
    if preds.len() != data.len()
        || preds
            .iter()
            .zip(data)
            .any(|(p, d)| p.len() != d.questions.len())
    {
        return Err(Error::shape(
            "evaluate",
            "predictions are not aligned with the data",
        ));
    }
    // images in parallel; results come back in input order, and the first error in
    // that order is the one reported
    let scores: Vec<_> = data
        .par_iter()
        .zip(preds.par_iter())
        .map(|(img, p)| score_image(img, p, vocab, cfg))
        .collect();
    scores
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.map_err(|(field, msg)| Error::Data {
                path: source.into(),
                field: format!("[{i}] ({}) {field}", data[i].file_name),
                msg,
            })
        })
        .collect()
}

/// Score `preds` against `data` and reduce to the report; `source` names `DATA.json`
/// in errors.
pub fn evaluate(
    data: &[MuseImage],
    preds: &Predictions,
    vocab: &Vocab,
    cfg: &EvalConfig,
    source: &Path,
) -> Result<Report> {
    let scores = score(data, preds, vocab, cfg, source)?;
    let (mut all, mut few, mut many) = (Acc::default(), Acc::default(), Acc::default());
    // sequential sums in input order: the report does not depend on the thread count
    for s in scores.iter().flatten() {
        all.add(s);
        if s.n_targets <= cfg.few_max {
            few.add(s);
        } else {
            many.add(s);
        }
    }
    Ok(Report {
        overall: all.metrics(),
        by_targets: ByTargets {
            few: few.metrics(),
            many: many.metrics(),
        },
        n_images: data.len() as u64,
        dilation_ratio: cfg.dilation_ratio,
        few_max: cfg.few_max,
    })
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Read the files and score: what `popen eval` runs.  `vocab = None` uses the embedded
/// vocabulary.
pub fn evaluate_files(
    data: &Path,
    pred: &Path,
    vocab: Option<&Path>,
    cfg: &EvalConfig,
) -> Result<Report> {
    let parsed;
    let v = match vocab {
        Some(p) => {
            parsed = Vocab::parse(&read(p)?, &p.display().to_string())?;
            &parsed
        }
        None => Vocab::world(),
    };
    let d = parse_data(&read(data)?, data)?;
    let p = parse_preds(&read(pred)?, pred, &d)?;
    evaluate(&d, &p, v, cfg, data)
}

impl Report {
    /// The report as pretty JSON (stable field order; the same inputs give the same
    /// bytes).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes") + "\n"
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.2}", 100.0 * v));
        let mut s = String::new();
        s.push_str(&format!(
            "{:<8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            "split",
            "n",
            "MUSE gIoU",
            "cIoU",
            "bIoU",
            "LISA gIoU",
            "cIoU",
            "CHAIR_s",
            "CHAIR_i",
            "loc err",
            "N-acc",
            "missing"
        ));
        let rows = [
            ("all", &self.overall),
            ("few", &self.by_targets.few),
            ("many", &self.by_targets.many),
        ];
        for (name, m) in rows {
            s.push_str(&format!(
                "{:<8} {:>6} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
                name,
                m.n_questions,
                f(m.muse.giou),
                f(m.muse.ciou),
                f(m.muse.boundary_iou),
                f(m.lisa.giou),
                f(m.lisa.ciou),
                f(m.chair_s),
                f(m.chair_i),
                f(m.loc_error),
                f(m.no_target_acc),
                m.missing
            ));
        }
        s.push_str(&format!(
            "(percent; {} images, few = at most {} targets, boundary dilation ratio {})\n",
            self.n_images, self.few_max, self.dilation_ratio
        ));
        s
    }
}
