#![warn(missing_docs)]
//! # popen
//!
//! POPEN — preference-based optimization and ensemble for reasoning segmentation with
//! a large vision-language model — as a Rust library and command-line tool, with
//! hand-written CUDA kernels and a CPU twin for each.
//!
//! - [`kernels`]: the CUDA kernels, the launch interface shared by the CUDA emulator
//!   and cudarc, and the CPU twins.
//! - [`metrics`]: the evaluation suite of `popen eval` (MUSE and LISA gIoU/cIoU, CHAIR,
//!   boundary IoU, localization error, no-target accuracy), deterministic.
//! - [`backend`]: the backend contract (fused layer ops with their backward) and the
//!   CPU reference backend.
//! - [`nn`]: layers with forward and backward side by side, and the LLaMA decoder.
//! - [`train`]: AdamW, the warmup-then-decay learning-rate schedule, and the trainer
//!   (generic over the model) with kill-safe checkpoints, metrics and a loss plot.
//! - [`model`]: Hugging Face checkpoints (CLIP vision, LLaMA, BERT, LLaVA) and the
//!   segmentation model ([`model::seg`]).
//! - [`data`]: masks, RLE, the readers and the embedded world.
//! - [`method`]: the method: the three stages, the K-way ensemble, prediction
//!   and `popen demo`.
pub mod backend;
pub mod data;
pub mod error;
pub mod fsio;
pub mod kernels;
pub mod method;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
