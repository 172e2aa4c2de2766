//! Running the `popen` binary from the CLI tests.
use std::path::PathBuf;
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_popen");

/// `popen ARGS` with `threads` rayon threads.
pub fn popen(args: &[&str], threads: &str) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .expect("run popen")
}

/// Its stdout, after asserting success (both streams shown when it failed).
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "popen failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Its stderr, after asserting failure.
pub fn err(o: &Output) -> String {
    assert!(!o.status.success(), "popen should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh directory under the temp dir, unique to this process, test file and name.
pub fn tmp(file: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_{file}_{}_{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}
