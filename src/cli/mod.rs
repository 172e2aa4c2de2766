//! Subcommands of the `popen` binary, one file each.
pub mod info;
pub mod forward;
