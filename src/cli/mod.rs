//! Subcommands of the `popen` binary, one file each.
pub mod data;
pub mod demo;
pub mod eval;
pub mod eval_masks;
pub mod forward;
pub mod infer;
pub mod info;
pub mod model_args;
pub mod predict;
pub mod probe;
pub mod progress;
pub mod score;
pub mod train;
