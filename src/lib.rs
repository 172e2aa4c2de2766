//! # popen
//!
//! POPEN — preference-based optimization and ensemble for reasoning segmentation with
//! a large vision-language model — as a Rust library and command-line tool, with
//! hand-written CUDA kernels and a CPU twin for each.
//!
//! - [`kernels`]: the CUDA kernels, the launch interface shared by the CUDA emulator
//!   and cudarc, and the CPU twins.
//! - [`backend`]: the backend contract (fused layer ops with their backward) and the
//!   CPU reference backend.
//! - [`nn`]: layers with forward and backward side by side, and the LLaMA decoder.
//! - [`train`]: AdamW and the warmup-then-decay learning-rate schedule.
pub mod error;
pub mod kernels;

pub use error::{Error, Result};
pub mod backend;
pub mod data;
pub mod model;
pub mod nn;
pub mod train;
