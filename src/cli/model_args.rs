//! Options shared by the commands that run a model.
use popen::backend::DeviceChoice;

/// `--device`: where the model runs.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArg {
    /// cpu (the reference backend), emu (the kernels on the CUDA emulator: slow, for
    /// checking) or cuda[:N] (GPU N; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

/// The phrase each `<seg>` of `text` stands for: the words just before it (up to
/// three, stopping at punctuation or another `<seg>`), for overlay labels.
pub fn seg_phrases(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if !w.starts_with("<seg>") {
            continue;
        }
        let mut phrase = Vec::new();
        for p in words[..i].iter().rev().take(3) {
            if p.starts_with("<seg>") || p.ends_with(',') || p.ends_with('.') {
                break;
            }
            phrase.push(*p);
        }
        phrase.reverse();
        out.push(phrase.join(" "));
    }
    out
}
