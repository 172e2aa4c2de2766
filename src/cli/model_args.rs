//! Options shared by the commands that run a model.
use popen::backend::Cpu;
use popen::model::seg::{SegModel, SegTokenizer};
use std::path::Path;

/// `--device`: where the model runs.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArg {
    /// `cpu` (the device backend will add `emu` and `cuda[:N]`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArg {
    /// `Err` for a device this build cannot serve.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.device.as_str() {
            "cpu" => Ok(()),
            d if d == "emu" || d == "cuda" || d.starts_with("cuda:") => anyhow::bail!(
                "--device {d}: the segmentation model runs on the CPU backend only in this \
                 version (the device backend over the kernels is not wired to it yet)"
            ),
            d => anyhow::bail!("--device {d}: expected cpu, emu or cuda[:N]"),
        }
    }
}

/// Loads a run directory's model and tokenizer on the CPU.
pub fn load_model(dir: &Path) -> anyhow::Result<(SegModel, SegTokenizer)> {
    Ok(SegModel::load(Cpu, dir)?)
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
