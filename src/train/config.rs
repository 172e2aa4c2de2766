//! The trainer's settings ([`TrainConfig`]) and the TOML loader shared by every run
//! config ([`load_toml`]).
//!
//! A run config is one TOML file whose top-level tables belong to different parts of
//! the crate (`[model]`, `[train]`, `[data]`); the caller defines the struct that holds
//! them and loads it with [`load_toml`].  Every struct denies unknown keys, so a typo is
//! an error that names the file, the key and its line, not a silently ignored setting.
//!
//! Command-line flags override after loading: load (or take the default), apply
//! [`TrainOverrides`], then [`TrainConfig::validate`].
use crate::error::{Error, Result};
use crate::train::adamw::AdamWConfig;
use crate::train::schedule::{WarmupDecayLR, DEFAULT_WARMUP_STEPS};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Every setting of one training run.  Defaults are the paper's where it gives one
/// (Supp Table 7, which follows PixelLM) and this crate's choice otherwise; each field
/// says which.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate.  Paper Table 7: 3e-4.
    pub lr: f32,
    /// AdamW β₁.  Paper Table 7: 0.9.
    pub beta1: f32,
    /// AdamW β₂.  Paper Table 7: 0.95.
    pub beta2: f32,
    /// AdamW ε.  `torch.optim.AdamW`'s default, 1e-8 (the paper does not say).
    pub eps: f32,
    /// Decoupled weight decay.  Paper Table 7: 0.
    pub weight_decay: f32,
    /// Linear warm-up steps of `WarmupDecayLR`.  Paper Table 7: 100.
    pub warmup_steps: u64,
    /// Optimizer steps in the whole run; the schedule decays to 0 at this step.  Fixed
    /// by the config (not by the data set's size) so that a default run's length and
    /// time do not change with the data.  This crate's choice: 1000; `--steps` overrides.
    pub total_steps: u64,
    /// Examples per forward/backward.  This crate's choice: 4 (a CPU-sized slice of the
    /// batch; `micro_batch × grad_accum_steps` is the paper's batch).
    pub micro_batch: usize,
    /// Micro-batches summed into one optimizer step.  4, so that the batch is
    /// 4 × 4 = 16, the paper's (Table 7, by gradient accumulation as in PixelLM).
    pub grad_accum_steps: usize,
    /// Largest joint L2 norm of the gradients (0 = no clipping).  Paper Table 7 /
    /// PixelLM's DeepSpeed `gradient_clipping`: 1.0.
    pub clip_grad_norm: f32,
    /// Write a checkpoint every this many optimizer steps (and always at the end).
    /// This crate's choice: 100; `--checkpoint-every` overrides.
    pub checkpoint_every: u64,
    /// Append a line to `metrics.jsonl` every this many steps (and at the end).  This
    /// crate's choice: 10.
    pub log_every: u64,
    /// Run the validation hook every this many steps (0 = never).  This crate's
    /// choice: 0, since validation costs a full prediction pass; `--val` sets it.
    pub val_every: u64,
    /// Seed of the data order and of the RNG handed to the model.  This crate's fixed
    /// default: 0; `--seed` overrides.
    pub seed: u64,
    /// Checkpoint folders kept under `RUN/checkpoints/` (the newest ones; ≥ 1).  This
    /// crate's choice: 2, so that one older checkpoint survives a corrupted disk write.
    pub keep_checkpoints: usize,
    /// Micro-batches the background loader prepares ahead of the compute.  This
    /// crate's choice: 4 (loading one is far cheaper than a forward/backward).
    pub prefetch: usize,
    /// Decay of an exponential moving average of the trainable weights, which the run
    /// directory's `model.safetensors` then holds (see [`super::ema`]); 0 = off.  Ours,
    /// not the paper's: default 0.
    pub ema: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let adam = AdamWConfig::default();
        TrainConfig {
            lr: adam.lr,
            beta1: adam.beta1,
            beta2: adam.beta2,
            eps: adam.eps,
            weight_decay: adam.weight_decay,
            warmup_steps: DEFAULT_WARMUP_STEPS,
            total_steps: 1000,
            micro_batch: 4,
            grad_accum_steps: 4,
            clip_grad_norm: 1.0,
            checkpoint_every: 100,
            log_every: 10,
            val_every: 0,
            seed: 0,
            keep_checkpoints: 2,
            prefetch: 4,
            ema: 0.0,
        }
    }
}

/// Where a field error points when the config did not come from a file.
const NO_FILE: &str = "<train config>";

impl TrainConfig {
    /// Checks every range; an error names the field.  The warm-up may exceed a short
    /// run's total (a `--steps 10` smoke test): the schedule then warms up over the
    /// whole run, which [`TrainConfig::schedule`] handles.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::Config {
                path: NO_FILE.into(),
                field: format!("train.{field}"),
                msg,
            })
        };
        let pos_finite = |x: f32| x.is_finite() && x > 0.0;
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", format!("{} must be finite and ≥ 0", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(name, format!("{b} must be in [0, 1)"));
            }
        }
        if !pos_finite(self.eps) {
            return bad("eps", format!("{} must be finite and > 0", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", format!("{} must be ≥ 0", self.weight_decay));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return bad("ema", format!("{} must be in [0, 1) (0 = off)", self.ema));
        }
        if !(self.clip_grad_norm.is_finite() && self.clip_grad_norm >= 0.0) {
            return bad(
                "clip_grad_norm",
                format!("{} must be ≥ 0 (0 = off)", self.clip_grad_norm),
            );
        }
        for (name, v) in [
            ("total_steps", self.total_steps),
            ("checkpoint_every", self.checkpoint_every),
            ("log_every", self.log_every),
        ] {
            if v == 0 {
                return bad(name, "must be ≥ 1".into());
            }
        }
        for (name, v) in [
            ("micro_batch", self.micro_batch),
            ("grad_accum_steps", self.grad_accum_steps),
            ("keep_checkpoints", self.keep_checkpoints),
            ("prefetch", self.prefetch),
        ] {
            if v == 0 {
                return bad(name, "must be ≥ 1".into());
            }
        }
        Ok(())
    }

    /// The optimizer settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The learning-rate schedule; a warm-up longer than the run is cut to the run.
    pub fn schedule(&self) -> Result<WarmupDecayLR> {
        WarmupDecayLR::new(
            self.lr,
            self.warmup_steps.min(self.total_steps),
            self.total_steps,
        )
    }

    /// Examples per optimizer step (`micro_batch × grad_accum_steps`).
    pub fn batch_size(&self) -> usize {
        self.micro_batch * self.grad_accum_steps
    }
}

/// The command-line flags that override a loaded [`TrainConfig`] (the contract of
/// `popen train …`: `--steps`, `--checkpoint-every`, `--seed`, and stage 1's
/// `--val-every`).  `None` keeps the config's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainOverrides {
    /// `--steps`: replaces `total_steps`.
    pub steps: Option<u64>,
    /// `--checkpoint-every`: replaces `checkpoint_every`.
    pub checkpoint_every: Option<u64>,
    /// `--seed`: replaces `seed`.
    pub seed: Option<u64>,
    /// `--val-every` (`popen train sft`): replaces `val_every`.
    pub val_every: Option<u64>,
}

impl TrainOverrides {
    /// Applies the flags that were given, then validates the result.
    pub fn apply(&self, cfg: &mut TrainConfig) -> Result<()> {
        if let Some(s) = self.steps {
            cfg.total_steps = s;
        }
        if let Some(k) = self.checkpoint_every {
            cfg.checkpoint_every = k;
        }
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        if let Some(v) = self.val_every {
            cfg.val_every = v;
        }
        cfg.validate()
    }
}

/// Reads a TOML file into `T`.  Every error names the file; a wrong or unknown key
/// also names the key's dotted path and its 1-based line (`run.toml: config field
/// `train.lrr` (line 7): unknown field ...`).  `T` should use
/// `#[serde(deny_unknown_fields)]` on every struct so that a typo cannot pass.
pub fn load_toml<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_toml(path, &text)
}

/// [`load_toml`] on text already read; `path` is only for the messages.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let de = toml::Deserializer::parse(text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        field: line_of(e.span())
            .map(|l| format!("<syntax> (line {l})"))
            .unwrap_or_else(|| "<syntax>".into()),
        msg: e.message().to_string(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let at = line_of(inner.span())
            .map(|l| format!(" (line {l})"))
            .unwrap_or_default();
        Error::Config {
            path: path.to_path_buf(),
            field: format!("{field}{at}"),
            msg: inner.message().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Run {
        #[serde(default)]
        train: TrainConfig,
        model: Model,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Model {
        width: usize,
    }

    fn parse(text: &str) -> Result<Run> {
        parse_toml(Path::new("run.toml"), text)
    }

    #[test]
    fn defaults_fill_missing_keys_and_values_override() {
        let r = parse("[model]\nwidth = 7\n\n[train]\nlr = 1e-3\ntotal_steps = 37\n").unwrap();
        assert_eq!(r.model.width, 7);
        assert_eq!(r.train.lr, 1e-3);
        assert_eq!(r.train.total_steps, 37);
        let d = TrainConfig::default();
        assert_eq!(r.train.beta2, d.beta2);
        assert_eq!(d.batch_size(), 16, "the paper's batch");
        d.validate().unwrap();
    }

    #[test]
    fn unknown_key_names_file_path_and_line() {
        let err = parse("[model]\nwidth = 7\n[train]\nlr = 1e-3\nlrr = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("run.toml"), "{err}");
        assert!(err.contains("train.lrr"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = parse("[model]\nwidth = 7\n[train]\nseed = \"zero\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.seed"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        let err = parse("[model]\nwidth = = 7\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn overrides_apply_then_validate() {
        let mut c = TrainConfig::default();
        let o = TrainOverrides {
            steps: Some(5),
            seed: Some(9),
            ..Default::default()
        };
        o.apply(&mut c).unwrap();
        assert_eq!((c.total_steps, c.seed), (5, 9));
        // warm-up (100) longer than the run is cut to it
        assert_eq!(c.schedule().unwrap().warmup, 5);
        let bad = TrainOverrides {
            steps: Some(0),
            ..Default::default()
        };
        let err = bad.apply(&mut c).unwrap_err().to_string();
        assert!(err.contains("train.total_steps"), "{err}");
    }
}
