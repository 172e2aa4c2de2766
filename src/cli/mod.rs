//! Subcommands of the `popen` binary, one file each.
pub mod data;
pub mod eval;
pub mod eval_masks;
pub mod forward;
pub mod info;
