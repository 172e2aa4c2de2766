//! Subcommands of the `popen` binary, one file each.
pub mod eval;
pub mod info;
