//! Stage 1 (SFT): the segmentation model trained on answers and masks with
//! `L = CE + 2·BCE + 0.5·Dice`, through the shared trainer.  `popen train sft` and
//! `popen demo` call [`train_sft`].
use crate::backend::{Backend, Cpu};
use crate::data::sample::{load_image, load_muse, Sample};
use crate::error::{Error, Result};
use crate::method::counterfactual::{counterfactual_items, Counterfactual};
use crate::method::presence::{presence_samples, AbsentDraw};
use crate::method::reread::{reread_items, Reread};
use crate::metrics::eval::{evaluate_files, EvalConfig};
use crate::model::seg::augment;
use crate::model::seg::config::PresenceTokens;
use crate::model::seg::data::{corpus, example_of_image, example_reading};
use crate::model::seg::run::{CONFIG_FILE, TOKENIZER_FILE};
use crate::model::seg::{
    Example, LossWeights, SegModel, SegModelConfig, SegTokenizer, Trainable as Parts,
};
use crate::nn::{Rng, SamplingCfg, Tensor};
use crate::train::{Dataset, LossParts, TrainConfig, TrainSummary, Trainable, Trainer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The run config of `popen train sft` (`--config FILE.toml`): `[model]`, `[train]`,
/// `[loss]`, `[trainable]`, `[data]`; unknown keys are errors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// `[model]`: the segmentation model's size and settings.
    pub model: SegModelConfig,
    /// `[train]`: optimizer, schedule, checkpoints and seed.
    pub train: TrainConfig,
    /// `[loss]`: the weights of CE, BCE, Dice and the auxiliary category losses.
    pub loss: LossWeights,
    /// Which parts train (all, for the tiny model trained from scratch).
    pub trainable: Parts,
    /// What is added to the training data (the presence and re-read mixes).
    pub data: DataMix,
}

/// `[data]` of the stage-1 config: questions added to the training data (both mixes
/// are ours, off by default; docs/stage1.md has the measurements).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataMix {
    /// Per training image, this many counting questions about present categories and as
    /// many about absent ones (fewer where the image or the world has fewer); 0 = off
    /// ([`crate::method::presence`]).
    pub presence_questions: usize,
    /// How the presence mix picks its absent categories: `uniform` or `cooccur`
    /// ([`AbsentDraw`]).
    pub presence_absent: AbsentDraw,
    /// The fraction of the training questions asked once more with `reread_k` candidate
    /// answers to read first, in the ensemble's layout; 0 = off
    /// ([`crate::method::reread`]).
    pub reread: f32,
    /// Candidate answers per re-read question (3, the ensemble's K).
    pub reread_k: usize,
    /// The most pixels each way that a visit of a training image moves the scene by,
    /// every object kept whole in the frame; 0 = off ([`crate::model::seg::augment`]).
    pub shift: usize,
    /// The fraction of the training questions with targets asked once more about their
    /// image with the targets painted out, answered "nothing"; 0 = off
    /// ([`crate::method::counterfactual`]).
    pub erased: f32,
}

impl Default for DataMix {
    fn default() -> Self {
        DataMix {
            presence_questions: 0,
            presence_absent: AbsentDraw::Uniform,
            reread: 0.0,
            reread_k: 3,
            shift: 0,
            erased: 0.0,
        }
    }
}

/// The model as the trainer sees it, on backend `B`.
pub struct SftModel<B: Backend<f32> = Cpu> {
    /// The model being trained.
    pub model: SegModel<f32, B>,
    /// The `[loss]` weights of each step's loss.
    pub weights: LossWeights,
}

impl<B: Backend<f32>> Trainable for SftModel<B> {
    type Item = Example;
    type Be = B;
    fn backend(&self) -> B {
        self.model.llava.be.clone()
    }
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor<f32, B>)> {
        self.model.params_mut()
    }
    fn accumulate(&mut self, batch: &[Example], scale: f32, _rng: &mut Rng) -> Result<LossParts> {
        let l = self.model.step(batch, self.weights, scale, true)?;
        let mut parts: BTreeMap<String, f64> = [
            ("ce".to_string(), l.ce),
            ("bce".into(), l.bce),
            ("dice".into(), l.dice),
        ]
        .into();
        if self.weights.patch_class > 0.0 {
            parts.insert("patch_class".into(), l.patch_class);
        }
        if self.weights.seg_class > 0.0 {
            parts.insert("seg_class".into(), l.seg_class);
        }
        if self.weights.seg_place > 0.0 {
            parts.insert("seg_place".into(), l.seg_place);
        }
        Ok(LossParts {
            loss: l.total,
            parts,
            tokens: l.n_tokens,
        })
    }
    fn save_weights(&mut self, path: &Path) -> Result<()> {
        self.model.save_weights(path)
    }
    fn load_weights(&mut self, path: &Path) -> Result<()> {
        self.model.load_weights(path)
    }
}

/// Samples preprocessed on demand (the trainer's loader runs this ahead of the compute):
/// the samples, then the re-read questions.
pub struct SftData<'a> {
    /// The training questions: the file's, then the presence mix's.
    pub samples: Vec<Sample>,
    /// Samples asked again with answers to read first (`[data] reread`).
    pub reread: Vec<Reread>,
    /// The most ids a re-read example may take (the model's context less its image
    /// positions, plus the one image token): answers to read beyond it are dropped.
    pub max_ids: usize,
    /// The model's config, which the examples are built for.
    pub cfg: &'a SegModelConfig,
    /// The tokenizer that encodes the examples.
    pub tok: &'a SegTokenizer,
    /// `[data] shift`: each visit moves the scene by up to this many pixels; 0 = off.
    pub shift: usize,
    /// Questions asked about their image with the targets painted out (`[data]
    /// erased`), after the re-read questions.
    pub counterfactual: Vec<Counterfactual>,
}

impl Dataset for SftData<'_> {
    type Item = Example;
    fn len(&self) -> usize {
        self.samples.len() + self.reread.len() + self.counterfactual.len()
    }
    fn load(&self, i: usize) -> Result<Example> {
        match self.counterfactual_at(i) {
            Some(c) => {
                example_of_image(self.cfg, self.tok, &c.sample, &c.image()?, &[], usize::MAX)
            }
            None => {
                let (s, read, max_ids) = self.source(i);
                example_reading(self.cfg, self.tok, s, read, max_ids)
            }
        }
    }
    fn load_augmented(&self, i: usize, draw: u64) -> Result<Example> {
        if self.shift == 0 {
            return self.load(i);
        }
        let (s, img, read, max_ids) = match self.counterfactual_at(i) {
            Some(c) => (&c.sample, c.image()?, &[][..], usize::MAX),
            None => {
                let (s, read, max_ids) = self.source(i);
                (s, load_image(s)?, read, max_ids)
            }
        };
        let sh = augment::draw_shift(s, self.shift, draw);
        let (img, moved) = augment::translate(&img, s, sh)?;
        example_of_image(self.cfg, self.tok, &moved, &img, read, max_ids)
    }
}

impl SftData<'_> {
    /// Example `i`'s counterfactual question, when it is one (they come last).
    fn counterfactual_at(&self, i: usize) -> Option<&Counterfactual> {
        let first = self.samples.len() + self.reread.len();
        i.checked_sub(first)
            .and_then(|j| self.counterfactual.get(j))
    }

    /// Example `i`'s sample, the answers it reads first and its id budget: the
    /// samples, then the re-read questions.
    fn source(&self, i: usize) -> (&Sample, &[String], usize) {
        match i.checked_sub(self.samples.len()) {
            None => (&self.samples[i], &[], usize::MAX),
            Some(r) => {
                let Reread { index, read } = &self.reread[r];
                (&self.samples[*index], read, self.max_ids)
            }
        }
    }
}

/// Where a stage reads and writes.
#[derive(Clone, Debug)]
pub struct SftPaths {
    /// The training file (MUSE schema).
    pub data: PathBuf,
    /// Image root (default: the data file's folder).
    pub images: Option<PathBuf>,
    /// The run directory to write (and to resume from).
    pub out: PathBuf,
    /// Validation data (MUSE schema): its first [`VAL_IMAGES`] images are answered
    /// greedily and scored with `popen eval`'s metrics at each validation.
    pub val: Option<PathBuf>,
    /// A Hugging Face LLaVA directory to start from (LLaVA-1.5); None = the tiny model
    /// from scratch.
    pub base: Option<PathBuf>,
}

/// Images whose questions are scored at each validation (the first of the file).
pub const VAL_IMAGES: usize = 20;

/// The questions of a training file (images under `images`, else beside the file); an
/// empty file is an error, since no stage can train on it.
pub fn training_samples(data: &Path, images: &Option<PathBuf>) -> Result<Vec<Sample>> {
    let root = crate::method::predict::data_root(data, images);
    let samples = load_muse(data, &root)?;
    if samples.is_empty() {
        return Err(Error::Data {
            path: data.to_path_buf(),
            field: "questions".into(),
            msg: "no question to train on".into(),
        });
    }
    Ok(samples)
}

/// `cfg` with `model.classes` filled from the data's annotated objects and targets
/// (sorted category names) when a category loss (`loss.patch_class`, `loss.seg_class`)
/// is on and the config names none, and `model.place_head` on when `loss.seg_place`
/// is.  The category heads stand in for a pretraining the tiny model lacks
/// ([`crate::model::seg::category`]), so a pretrained LLaVA refuses them, as does data
/// without categories; the place head needs neither.
pub fn with_classes(cfg: &SftConfig, samples: &[Sample], paths: &SftPaths) -> Result<SftConfig> {
    let mut cfg = cfg.clone();
    if cfg.model.presence_tokens != PresenceTokens::Off && cfg.loss.patch_class <= 0.0 {
        return Err(Error::Config {
            path: paths.data.clone(),
            field: "model.presence_tokens".into(),
            msg: "the presence tokens read the patch-category head, which only \
                  loss.patch_class > 0 trains"
                .into(),
        });
    }
    // the place head needs no categories, only the targets' masks
    cfg.model.place_head |= cfg.loss.seg_place > 0.0;
    if cfg.loss.patch_class <= 0.0 && cfg.loss.seg_class <= 0.0 {
        return Ok(cfg);
    }
    let err = |msg: &str| Error::Config {
        path: paths.data.clone(),
        field: "loss.patch_class / loss.seg_class".into(),
        msg: msg.into(),
    };
    if paths.base.is_some() {
        return Err(err(
            "the category losses stand in for the pretraining of a model trained from \
             scratch, not for a pretrained LLaVA: set them to 0",
        ));
    }
    if cfg.model.classes.is_empty() {
        let names: std::collections::BTreeSet<&str> = samples
            .iter()
            .flat_map(|s| s.objects.iter().chain(&s.targets))
            .map(|o| o.category.as_str())
            .collect();
        cfg.model.classes = names.into_iter().map(String::from).collect();
    }
    if cfg.model.classes.is_empty() {
        return Err(err(
            "the data names no object category to learn: set the category losses to 0",
        ));
    }
    Ok(cfg)
}

/// Trains stage 1 into `paths.out` on backend `be` (`popen train sft --device`).  With
/// `resume`, continues the run found there (its tokenizer and config are reused, so the
/// model is the same).  Checkpoints hold host-order f32 weights whatever the backend,
/// so a run started on one device resumes on another.
pub fn train_sft<B: Backend<f32>>(
    be: B,
    cfg: &SftConfig,
    paths: &SftPaths,
    resume: bool,
    progress: bool,
) -> Result<TrainSummary> {
    let mut samples = training_samples(&paths.data, &paths.images)?;
    let n_file = samples.len();
    let extra = presence_samples(
        &samples,
        cfg.data.presence_questions,
        cfg.data.presence_absent,
        cfg.train.seed,
        &paths.data,
    )?;
    samples.extend(extra);
    let reread = reread_items(&samples, cfg.data.reread, cfg.data.reread_k, cfg.train.seed)?;
    // the file's questions only (not the presence mix's)
    let counterfactual = counterfactual_items(&samples[..n_file], cfg.data.erased, cfg.train.seed)?;
    let cfg = &with_classes(cfg, &samples, paths)?;
    let out = &paths.out;
    // held until the stage returns: one writer per run directory
    let _lock = crate::fsio::RunLock::acquire(out)?;
    let tok_path = out.join(TOKENIZER_FILE);
    let (model, tok) = match &paths.base {
        Some(base) => {
            let (mut m, tok) =
                SegModel::from_llava_dir(be, cfg.model.clone(), base, cfg.train.seed)?;
            // PixelLM freezes the pretrained vision tower whatever the config says
            m.set_trainable(Parts {
                vision: false,
                ..cfg.trainable
            });
            (m, tok)
        }
        None => {
            let tok = if resume && tok_path.exists() {
                SegTokenizer::load(&tok_path, cfg.model.group_len())?
            } else {
                SegTokenizer::train(
                    &corpus(&samples),
                    cfg.model.lvlm.vocab_size,
                    cfg.model.group_len(),
                )?
            };
            let mut m = SegModel::new_tiny(be, cfg.model.clone(), &tok, cfg.train.seed)?;
            m.set_trainable(cfg.trainable);
            (m, tok)
        }
    };
    if !(resume && out.join(CONFIG_FILE).exists()) {
        // config.json + tokenizer.json now; weights come with each checkpoint
        let run = serde_json::to_value(cfg).expect("serializes");
        model.save_config(out, &tok, Some(run))?;
    }
    let max_ids = model.max_ids();
    let data = SftData {
        samples,
        reread,
        max_ids,
        cfg: &cfg.model,
        tok: &tok,
        shift: cfg.data.shift,
        counterfactual,
    };
    let mut sm = SftModel {
        model,
        weights: cfg.loss,
    };
    let mut trainer = Trainer::new(cfg.train.clone(), out)?
        .resume(resume)
        .progress(progress)
        .title("stage 1 (SFT) loss");
    if let Some(val) = &paths.val {
        // the first VAL_IMAGES records, kept in the run so the scores can be redone
        let vroot = crate::method::predict::data_root(val, &paths.images);
        let text = std::fs::read_to_string(val).map_err(|e| Error::io(val, e))?;
        let mut recs: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| Error::Json {
                path: val.clone(),
                line: Some(e.line()),
                msg: e.to_string(),
            })?;
        recs.truncate(VAL_IMAGES);
        let val = out.join("val_data.json");
        crate::fsio::write_atomic(
            &val,
            serde_json::to_string(&recs).expect("serializes").as_bytes(),
        )?;
        let items = crate::method::predict::questions(&val, &vroot)?;
        let pred_path = out.join("val_pred.jsonl");
        let tok2 = tok.clone();
        trainer = trainer.validate_with(move |m: &mut SftModel<B>, _step| {
            let lines = crate::method::predict::predict_items(
                &m.model,
                &tok2,
                &items,
                16,
                &SamplingCfg::greedy(),
                |_| {},
            )?;
            crate::method::predict::write_preds(&pred_path, &lines)?;
            let r = evaluate_files(&val, &pred_path, None, &EvalConfig::default())?;
            Ok(serde_json::from_str(&r.to_json()).unwrap_or_default())
        });
    }
    trainer.run(&mut sm, &data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mask::Mask;
    use crate::data::sample::Target;

    fn sample(categories: &[&str]) -> Sample {
        let t = |c: &&str| Target {
            category: c.to_string(),
            mask: Mask {
                height: 1,
                width: 1,
                data: vec![1],
            },
        };
        Sample {
            image_id: "0".into(),
            image_path: "x.png".into(),
            height: 1,
            width: 1,
            question: "q".into(),
            question_index: 0,
            answer: Some("a".into()),
            targets: categories.iter().take(1).map(t).collect(),
            objects: categories.iter().map(t).collect(),
        }
    }

    #[test]
    fn category_classes_come_from_the_data_or_refuse() {
        let paths = SftPaths {
            data: "train.json".into(),
            images: None,
            out: "run".into(),
            val: None,
            base: None,
        };
        let mut cfg = SftConfig::default();
        let data = [sample(&["cup", "apple"]), sample(&["lamp", "cup"])];
        // off: nothing changes
        assert_eq!(with_classes(&cfg, &data, &paths).unwrap(), cfg);
        cfg.loss.seg_class = 1.0;
        let c = with_classes(&cfg, &data, &paths).unwrap();
        assert_eq!(c.model.classes, ["apple", "cup", "lamp"]);
        // the config's own list is kept
        cfg.model.classes = vec!["lamp".into()];
        let c = with_classes(&cfg, &data, &paths).unwrap();
        assert_eq!(c.model.classes, ["lamp"]);
        cfg.model.classes.clear();
        // no category in the data, or a pretrained LLaVA: clear errors naming the field
        let e = with_classes(&cfg, &[sample(&[])], &paths).unwrap_err();
        assert!(e.to_string().contains("loss.patch_class"), "{e}");
        // the presence token reads the patch head: refused without its loss
        cfg.model.presence_tokens = PresenceTokens::One;
        let e = with_classes(&cfg, &data, &paths).unwrap_err();
        assert!(e.to_string().contains("model.presence_tokens"), "{e}");
        cfg.loss.patch_class = 1.0;
        let c = with_classes(&cfg, &data, &paths).unwrap();
        assert_eq!(c.model.classes, ["apple", "cup", "lamp"]);
        cfg.model.presence_tokens = PresenceTokens::Off;
        cfg.loss.patch_class = 0.0;
        let llava = SftPaths {
            base: Some("llava".into()),
            ..paths
        };
        let e = with_classes(&cfg, &data, &llava).unwrap_err();
        assert!(e.to_string().contains("pretrained LLaVA"), "{e}");
        // the place loss turns its head on, and needs no categories (a pretrained
        // LLaVA too)
        cfg.loss.seg_class = 0.0;
        assert!(!with_classes(&cfg, &data, &llava).unwrap().model.place_head);
        cfg.loss.seg_place = 1.0;
        let c = with_classes(&cfg, &[sample(&[])], &llava).unwrap();
        assert!(c.model.place_head && c.model.classes.is_empty());
    }
}
