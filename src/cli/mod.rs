//! Subcommands of the `popen` binary, one file each.
pub mod data;
pub mod eval_masks;
pub mod eval;
pub mod info;
