//! Running the `popen` binary from the CLI tests.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_popen");

/// `popen ARGS` with `threads` rayon threads.
pub fn popen(args: &[&str], threads: &str) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .expect("run popen")
}

/// `popen ARGS` under a file-size limit of `kib` KiB (`ulimit -f`, RLIMIT_FSIZE) with 2
/// rayon threads, SIGXFSZ ignored so that a write past the limit fails with EFBIG
/// instead of killing the process: a full disk, without root.
pub fn popen_limited(kib: u64, args: &[&str]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run bash")
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
/// A JSON file the command wrote (report, config, state), parsed.
pub fn json_file(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every line of a JSON-lines file, parsed.
pub fn jsonl_file(path: impl AsRef<Path>) -> Vec<serde_json::Value> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

pub fn tmp(file: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_{file}_{}_{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// How [`kill_and_resume`] times its kills: `attempts` runs at most, killed after
/// `base_ms` + a random part below `spread_ms` while fewer than `kill_until` have run.
pub struct Kills {
    pub seed: u64,
    pub attempts: usize,
    pub kill_until: usize,
    pub base_ms: u64,
    pub spread_ms: u64,
}

/// Runs `popen args…` into `out` (adding `--resume` once `out/config.json` exists),
/// SIGKILLing it at random moments, until a run finishes; panics if none does or the
/// finishing run fails.  Returns the number of kills that landed on a running process.
pub fn kill_and_resume(args: &[String], out: &Path, k: Kills) -> usize {
    let mut rng = popen::nn::Rng::new(k.seed);
    let mut kills = 0;
    for attempt in 0..k.attempts {
        let mut argv = args.to_vec();
        if out.join("config.json").exists() {
            argv.push("--resume".into());
        }
        let mut child = Command::new(BIN)
            .args(&argv)
            .env("RAYON_NUM_THREADS", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(
            k.base_ms + rng.next_u64() % k.spread_ms,
        ));
        if child.try_wait().unwrap().is_none() && attempt < k.kill_until {
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
            continue;
        }
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        return kills;
    }
    panic!("never finished");
}
