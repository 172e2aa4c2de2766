//! Training: the AdamW optimizer, the warmup-then-decay learning-rate schedule (Supp
//! Table 7: AdamW, lr 3e-4, β = (0.9, 0.95), weight decay 0, warmup 100 steps), and the
//! trainer that every stage reuses — generic over the model ([`Trainable`]) and the data
//! ([`Dataset`]), with checkpoints that survive a kill at any moment.
//!
//! - [`config`]: [`TrainConfig`] (every setting, with where its default comes from) and
//!   [`load_toml`] for run configs.
//! - [`trainer`]: the loop ([`Trainer`]), the model interface ([`Trainable`]).
//! - [`loader`]: [`Dataset`], the per-epoch order and the background loader.
//! - [`checkpoint`]: the run directory's checkpoint protocol.
//! - [`ema`]: the optional moving average of the weights (`[train] ema`).
//! - [`log`] and [`plot`]: `metrics.jsonl` and `loss.png`.
//!
//! # Wiring a command (`popen train sft`)
//!
//! ```no_run
//! use popen::train::{load_toml, TrainConfig, TrainOverrides, Trainer, Trainable, Dataset};
//!
//! #[derive(serde::Deserialize, Default)]
//! #[serde(deny_unknown_fields, default)]
//! struct RunFile {
//!     train: TrainConfig,
//!     // model: ModelConfig, data: DataConfig, each with deny_unknown_fields
//! }
//!
//! fn train_sft<M: Trainable, D: Dataset<Item = M::Item>>(
//!     model: &mut M,
//!     data: &D,
//!     config: Option<&str>,
//!     steps: Option<u64>,
//!     resume: bool,
//! ) -> popen::Result<()> {
//!     let mut run = match config {
//!         Some(path) => load_toml::<RunFile>(path)?, // errors name file, key and line
//!         None => RunFile::default(),
//!     };
//!     // CLI flags override after loading, then the result is validated
//!     TrainOverrides { steps, ..Default::default() }.apply(&mut run.train)?;
//!     // RUN/config.json and RUN/tokenizer.json are the command's to write first
//!     let summary = Trainer::new(run.train, "RUN")?
//!         .resume(resume)
//!         .run(model, data)?;
//!     eprintln!("trained to step {} in {:.0} s", summary.step, summary.elapsed_s);
//!     Ok(())
//! }
//! ```
pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod loader;
pub mod log;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use adamw::{clip_grad_norm, AdamW, AdamWConfig, Moments};
pub use checkpoint::{read_train_state, TrainState};
pub use config::{load_toml, parse_toml, TrainConfig, TrainOverrides};
pub use loader::{epoch_order, visit_draw, Cursor, Dataset};
pub use schedule::WarmupDecayLR;
pub use trainer::{LossParts, TrainSummary, Trainable, Trainer, ValidateFn};
