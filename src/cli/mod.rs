//! Subcommands of the `popen` binary, one file each.
pub mod forward;
pub mod info;
