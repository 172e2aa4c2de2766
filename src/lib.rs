//! # popen
//!
//! POPEN — preference-based optimization and ensemble for reasoning segmentation with
//! a large vision-language model — as a Rust library and command-line tool, with
//! hand-written CUDA kernels and a CPU twin for each.
//!
//! - [`kernels`]: the CUDA kernels, the launch interface shared by the CUDA emulator
//!   and cudarc, and the CPU twins.
pub mod error;
pub mod kernels;

pub use error::{Error, Result};
pub mod data;
pub mod model;
