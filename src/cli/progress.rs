//! Progress bars on stderr, hidden when stderr is not a terminal (logs stay clean).
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A bar of `n` steps labelled `what`, with ETA.
pub fn bar(n: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::with_draw_target(
        Some(n),
        if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    b.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} {elapsed}<{eta} {per_sec}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}
