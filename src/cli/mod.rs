//! Subcommands of the `popen` binary, one file each.
pub mod data;
pub mod info;
