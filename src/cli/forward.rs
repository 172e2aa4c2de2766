//! `popen forward`: run a Hugging Face model directory on named input tensors.
use popen::model::forward::forward_files;
use std::path::PathBuf;

/// Arguments of `popen forward`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory with `config.json` and `model.safetensors` (or a sharded
    /// `model.safetensors.index.json`); `model_type` picks the architecture
    /// (llama, clip_vision_model, bert, llava).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// Safetensors file with `input_ids` (I64 [B,T]), `attention_mask` (I64 [B,T],
    /// optional) and/or `pixel_values` (F32 [B,3,H,W]).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the outputs (F32, by name: logits, last_hidden_state, ...).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let outputs = forward_files(&a.model_dir, &a.inputs, &a.out)?;
    for (name, t) in &outputs {
        println!("{name:<26} {:?}", t.shape);
    }
    println!("wrote {}", a.out.display());
    Ok(())
}
