//! The training loop, generic over the model ([`Trainable`]) and the data
//! ([`Dataset`]): micro-batches accumulate into one AdamW step, gradients are clipped,
//! the learning rate follows [`WarmupDecayLR`](super::WarmupDecayLR), metrics go to
//! `RUN/metrics.jsonl` and checkpoints to `RUN/checkpoints/` (see
//! [`super::checkpoint`] for the layout and why a kill at any moment is safe).
//!
//! Determinism: the data order is a function of (seed, epoch), the model's RNG is
//! checkpointed, the moments are saved as exact f32 and AdamW's step count with them,
//! so a resumed run computes what the uninterrupted run would have — bit for bit, as
//! long as the backend itself is deterministic.
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{Rng, Tensor};
use crate::train::checkpoint::{
    self, checkpoint_rel, publish_weights, read_train_state, CheckpointWriter, TrainState,
    CHECKPOINT_FORMAT, MODEL_FILE, OPTIMIZER_FILE,
};
use crate::train::ema::{Ema, EMA_FILE};
use crate::train::loader::{spawn_loader, Cursor, Dataset};
use crate::train::log::MetricsLog;
use crate::train::plot::{write_loss_plot, LOSS_PLOT_FILE};
use crate::train::{clip_grad_norm, AdamW, TrainConfig};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Mixed into the seed for the RNG handed to the model, so that it is independent of
/// the data order's stream.
const MODEL_RNG_STREAM: u64 = 0x6A09_E667_F3BC_C909;
/// Largest norm passed to `clip_grad_norm` when clipping is off: it still measures
/// (and checks) the norm but never scales.
const NO_CLIP: f32 = f32::MAX;

/// What one micro-batch's forward reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossParts {
    /// The micro-batch's loss (before the accumulation scale).
    pub loss: f64,
    /// Its named parts (`ce`, `bce`, `dice`, …), logged and plotted beside it.
    pub parts: BTreeMap<String, f64>,
    /// Tokens processed (for `tokens_per_s`).
    pub tokens: usize,
}

/// A model the trainer can train.  Parameters are f32 tensors on backend `Be`.
pub trait Trainable {
    /// One preprocessed training example (what the [`Dataset`] loads).
    type Item: Send;
    /// The backend the parameters live on.
    type Be: Backend<f32>;
    /// The backend handle (cheap to clone).
    fn backend(&self) -> Self::Be;
    /// Every trainable parameter (`grad` is `Some`), and frozen ones as the model
    /// chooses, in a fixed order with unique names; the optimizer state is matched by
    /// position and checked by name.  A frozen parameter left out is still written and
    /// read by [`Trainable::save_weights`] and [`Trainable::load_weights`].
    fn params_mut(&mut self) -> Vec<(String, &mut Tensor<f32, Self::Be>)>;
    /// Called before each optimizer step's micro-batches with the step (1-based) and the
    /// run's total: a schedule inside the objective (stage 2's curriculum) reads it here.
    /// A resumed run calls it again from its next step, so state kept here must be a
    /// function of the step alone.
    fn begin_step(&mut self, _step: u64, _total: u64) {}
    /// Forward and backward over one micro-batch `batch`: gradients accumulate the
    /// gradient of `scale · loss` (the trainer passes `1 / grad_accum_steps`).  Returns
    /// the unscaled loss and its parts; `rng` is the run's checkpointed generator.
    fn accumulate(&mut self, batch: &[Self::Item], scale: f32, rng: &mut Rng) -> Result<LossParts>;
    /// Writes every parameter to one safetensors file (`model.safetensors`).
    fn save_weights(&mut self, path: &Path) -> Result<()>;
    /// Reads the parameters back; a file of another model is an error naming the
    /// tensor and the file.
    fn load_weights(&mut self, path: &Path) -> Result<()>;
}

/// The validation hook: called with the model and the step, returns the metrics to
/// log under `"val"`.
pub type ValidateFn<'a, M> = Box<dyn FnMut(&mut M, u64) -> Result<Value> + 'a>;

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    /// The last step taken (= `total_steps`).
    pub step: u64,
    /// The step the run resumed from (`None` for a fresh start).
    pub resumed_from: Option<u64>,
    /// Mean loss of the last logged window.
    pub last_loss: Option<f64>,
    /// Training wall time over all resumes.
    pub elapsed_s: f64,
}

/// One training run into a run directory.
///
/// ```no_run
/// # use popen::train::*;
/// # fn demo<M: Trainable, D: Dataset<Item = M::Item>>(model: &mut M, data: &D) -> popen::Result<()> {
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct RunFile { #[serde(default)] train: TrainConfig /* , model, data */ }
/// let mut cfg: TrainConfig = load_toml::<RunFile>("run.toml")?.train;
/// TrainOverrides { steps: Some(200), ..Default::default() }.apply(&mut cfg)?;
/// let summary = Trainer::new(cfg, "RUN")?
///     .resume(true)
///     .validate_with(|model: &mut M, step| Ok(serde_json::json!({ "step": step })))
///     .run(model, data)?;
/// # Ok(()) }
/// ```
pub struct Trainer<'a, M: Trainable> {
    cfg: TrainConfig,
    run: PathBuf,
    resume: bool,
    progress: bool,
    title: String,
    validate: Option<ValidateFn<'a, M>>,
}

impl<'a, M: Trainable> Trainer<'a, M> {
    /// A trainer writing into `run` (created if absent).  The config is validated.
    pub fn new(cfg: TrainConfig, run: impl Into<PathBuf>) -> Result<Self> {
        cfg.validate()?;
        Ok(Trainer {
            cfg,
            run: run.into(),
            resume: false,
            progress: true,
            title: "training loss".into(),
            validate: None,
        })
    }

    /// Continue from `RUN/train_state.json` if there is one (a run directory without
    /// a checkpoint yet starts fresh).  Without it, a run directory that already holds
    /// a checkpoint is an error, so a finished run is never overwritten by mistake.
    pub fn resume(mut self, yes: bool) -> Self {
        self.resume = yes;
        self
    }

    /// Show the progress bar on stderr (default: yes; hidden anyway when stderr is not
    /// a terminal).
    pub fn progress(mut self, yes: bool) -> Self {
        self.progress = yes;
        self
    }

    /// Title of `loss.png`.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// Calls `f(model, step)` every `val_every` steps and logs its JSON under `"val"`.
    pub fn validate_with(mut self, f: impl FnMut(&mut M, u64) -> Result<Value> + 'a) -> Self {
        self.validate = Some(Box::new(f));
        self
    }

    /// Trains `model` on `data` until `total_steps`, checkpointing on the way.
    pub fn run<D: Dataset<Item = M::Item>>(
        &mut self,
        model: &mut M,
        data: &D,
    ) -> Result<TrainSummary> {
        let run = self.run.clone();
        std::fs::create_dir_all(&run).map_err(|e| Error::io(&run, e))?;
        let be = model.backend();
        let mut opt: AdamW<f32, M::Be> = AdamW::new(self.cfg.adamw());
        let sched = self.cfg.schedule()?;
        let saved = read_train_state(&run)?;
        if saved.is_some() && !self.resume {
            return Err(Error::arg(
                "train",
                format!(
                    "{} already holds a checkpoint: pass --resume to continue it, or choose \
                     another run directory",
                    run.display()
                ),
            ));
        }
        let mut ema: Option<Ema<<M::Be as Backend<f32>>::Buf>> = None;
        let (start, mut cursor, mut rng, mut elapsed0) = match &saved {
            Some(st) => {
                check_same_stream(&run, &st.config, &self.cfg)?;
                check_same_data(&run, st.examples, data.len())?;
                let dir = run.join(&st.checkpoint);
                let moments = {
                    let params = model.params_mut();
                    checkpoint::load_moments(&be, &dir.join(OPTIMIZER_FILE), &params)?
                };
                if self.cfg.ema > 0.0 && dir.join(EMA_FILE).exists() {
                    // the average: read the averaged model, keep its trainable tensors
                    model.load_weights(&dir.join(EMA_FILE))?;
                    ema = Some(Ema::new(self.cfg.ema, &model.params_mut()));
                }
                model.load_weights(&dir.join(MODEL_FILE))?;
                opt.restore(moments, st.adamw_t);
                // a kill between train_state.json and the weights copy left it stale
                publish_weights(&run, &st.checkpoint)?;
                (st.step, st.cursor, Rng::new(st.rng_state), st.elapsed_s)
            }
            None => (
                0,
                Cursor::default(),
                Rng::new(self.cfg.seed ^ MODEL_RNG_STREAM),
                0.0,
            ),
        };
        // a fresh run, or one started without the average: it starts here
        if self.cfg.ema > 0.0 && ema.is_none() {
            ema = Some(Ema::new(self.cfg.ema, &model.params_mut()));
        }
        let writer = CheckpointWriter {
            run: &run,
            keep: self.cfg.keep_checkpoints,
        };
        if saved.is_some() {
            writer.prune(start)?;
        }
        let mut log = MetricsLog::open(&run, start)?;
        let total = self.cfg.total_steps;
        let summary = |last_loss, elapsed_s| TrainSummary {
            step: total.max(start),
            resumed_from: saved.as_ref().map(|s| s.step),
            last_loss,
            elapsed_s,
        };
        if start >= total {
            // the run is done; a kill may have come before its plot was written
            write_loss_plot(&run.join(LOSS_PLOT_FILE), &log.points, &self.title)?;
            return Ok(summary(log.points.last().map(|p| p.loss), elapsed0));
        }

        let bar = self.progress_bar(start, total);
        let accum = self.cfg.grad_accum_steps;
        let scale = 1.0 / accum as f32;
        let t0 = Instant::now();
        let mut window = Window {
            since: elapsed0,
            ..Window::default()
        };
        let mut last_loss = None;
        let cfg = self.cfg.clone();
        let validate = &mut self.validate;
        let title = &self.title;
        std::thread::scope(|scope| -> Result<()> {
            let rx = spawn_loader(scope, data, cfg.seed, cursor, cfg.micro_batch, cfg.prefetch)?;
            for step in start + 1..=total {
                crate::nn::zero_grads(&be, &mut model.params_mut());
                model.begin_step(step, total);
                let mut step_loss = 0.0;
                for micro in 0..accum {
                    // the loader sends its error before it stops, so a closed channel
                    // means it panicked (a bug in `Dataset::load`)
                    let batch = rx
                        .recv()
                        .map_err(|_| Error::arg("train", "the data loader thread panicked"))??;
                    let lp = model.accumulate(&batch.items, scale, &mut rng)?;
                    if !lp.loss.is_finite() {
                        return Err(Error::NonFinite {
                            what: format!(
                                "loss at step {step} (micro-batch {micro}): {}; the last good \
                                 checkpoint is kept",
                                lp.loss
                            ),
                        });
                    }
                    step_loss += lp.loss / accum as f64;
                    window.add_micro(&lp, accum);
                    cursor = batch.end;
                }
                let mut params = model.params_mut();
                let max_norm = if cfg.clip_grad_norm > 0.0 {
                    cfg.clip_grad_norm
                } else {
                    NO_CLIP
                };
                let grad_norm =
                    clip_grad_norm(&be, &mut params, max_norm).map_err(|e| match e {
                        Error::NonFinite { .. } => Error::NonFinite {
                            what: format!(
                                "gradient norm at step {step}; the last good checkpoint is kept"
                            ),
                        },
                        e => e,
                    })?;
                let lr = sched.lr(step);
                opt.step(&be, &mut params, lr)?;
                if let Some(e) = ema.as_mut() {
                    e.update(&be, &params, step)?;
                }
                drop(params);
                window.steps += 1;
                bar.set_position(step);
                bar.set_message(format!("loss {step_loss:.4}"));

                let elapsed = elapsed0 + t0.elapsed().as_secs_f64();
                let val_due = cfg.val_every > 0 && step % cfg.val_every == 0;
                let val = match (val_due, validate.as_mut()) {
                    (true, Some(f)) => Some(f(model, step)?),
                    _ => None,
                };
                if step % cfg.log_every == 0 || step == total || val.is_some() {
                    let line = window.line(step, lr, grad_norm, elapsed, val);
                    last_loss = line.get("loss").and_then(Value::as_f64);
                    log.append(&line)?;
                    window = Window::default();
                    window.since = elapsed;
                }
                if step % cfg.checkpoint_every == 0 || step == total {
                    let state = TrainState {
                        step,
                        checkpoint: checkpoint_rel(step),
                        format: CHECKPOINT_FORMAT,
                        cursor,
                        rng_state: rng.state(),
                        adamw_t: opt.t,
                        elapsed_s: elapsed,
                        config: cfg.clone(),
                        examples: Some(data.len()),
                    };
                    writer.write(&state, |dir| {
                        model.save_weights(&dir.join(MODEL_FILE))?;
                        if let Some(e) = ema.as_mut() {
                            e.swap(&mut model.params_mut());
                            let saved = model.save_weights(&dir.join(EMA_FILE));
                            e.swap(&mut model.params_mut());
                            saved?;
                        }
                        let params = model.params_mut();
                        checkpoint::save_moments(
                            &be,
                            &dir.join(OPTIMIZER_FILE),
                            &params,
                            opt.moments(),
                        )
                    })?;
                    write_loss_plot(&run.join(LOSS_PLOT_FILE), &log.points, title)?;
                }
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        elapsed0 += t0.elapsed().as_secs_f64();
        Ok(summary(last_loss, elapsed0))
    }

    fn progress_bar(&self, start: u64, total: u64) -> indicatif::ProgressBar {
        if !self.progress || !std::io::stderr().is_terminal() {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} steps, ETA {eta} {msg}",
            )
            .expect("static template"),
        );
        bar.set_prefix("train");
        bar.set_position(start);
        bar.reset_eta();
        bar
    }
}

/// Sums over the steps since the last metrics line.
#[derive(Default)]
struct Window {
    /// Optimizer steps in the window.
    steps: u64,
    /// Σ over steps of the step's mean loss (and parts).
    loss: f64,
    parts: BTreeMap<String, f64>,
    tokens: usize,
    /// `elapsed_s` at the window's start.
    since: f64,
}

impl Window {
    fn add_micro(&mut self, lp: &LossParts, accum: usize) {
        self.loss += lp.loss / accum as f64;
        for (k, v) in &lp.parts {
            *self.parts.entry(k.clone()).or_default() += v / accum as f64;
        }
        self.tokens += lp.tokens;
    }

    fn line(
        &self,
        step: u64,
        lr: f32,
        grad_norm: f32,
        elapsed: f64,
        val: Option<Value>,
    ) -> Map<String, Value> {
        let n = self.steps.max(1) as f64;
        let mut m = Map::new();
        m.insert("step".into(), step.into());
        m.insert("loss".into(), (self.loss / n).into());
        for (k, v) in &self.parts {
            m.insert(k.clone(), (v / n).into());
        }
        m.insert("lr".into(), f32_json(lr));
        m.insert("grad_norm".into(), f32_json(grad_norm));
        let dt = (elapsed - self.since).max(f64::MIN_POSITIVE);
        m.insert("tokens_per_s".into(), (self.tokens as f64 / dt).into());
        m.insert("elapsed_s".into(), elapsed.into());
        if let Some(v) = val {
            m.insert("val".into(), v);
        }
        m
    }
}

/// An f32 as JSON with its shortest decimal form (`3e-4`, not the widened
/// `0.0003000000142492354`).
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .map_or(Value::Null, Value::from)
}

/// A run resumes on a data set of the length it started with (the data file, and the
/// stage-1 mixes that add questions to it): the cursor indexes that stream.
fn check_same_data(run: &Path, saved: Option<usize>, now: usize) -> Result<()> {
    match saved {
        Some(was) if was != now => Err(Error::Config {
            path: run.join(checkpoint::TRAIN_STATE_FILE),
            field: "examples".into(),
            msg: format!(
                "the run was started on {was} training examples and is resumed on {now}: \
                 resume with the data (and `[data]` settings) it started with, or start a \
                 new run directory"
            ),
        }),
        _ => Ok(()),
    }
}

/// The settings that decide which examples and random draws each step sees must not
/// change on resume (the resumed run would silently train on another stream); the
/// length, learning rate and logging may.
fn check_same_stream(run: &Path, saved: &TrainConfig, now: &TrainConfig) -> Result<()> {
    let fields = [
        ("seed", saved.seed, now.seed),
        (
            "micro_batch",
            saved.micro_batch as u64,
            now.micro_batch as u64,
        ),
        (
            "grad_accum_steps",
            saved.grad_accum_steps as u64,
            now.grad_accum_steps as u64,
        ),
    ];
    for (field, was, is) in fields {
        if was != is {
            return Err(Error::Config {
                path: run.join(checkpoint::TRAIN_STATE_FILE),
                field: format!("train.{field}"),
                msg: format!(
                    "the run was started with {was} and is resumed with {is}; resume with \
                     the same value or start a new run directory"
                ),
            });
        }
    }
    Ok(())
}
