//! `popen forward`: run a Hugging Face model directory on named input tensors.
use popen::backend::{Cpu, DeviceBackend, DeviceChoice};
use popen::kernels::Device;
use popen::model::forward::forward_files_on;
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
    /// Where the model runs: cpu, emu (the kernels on the CUDA emulator) or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let outputs = match a.device {
        DeviceChoice::Cpu => forward_files_on(Cpu, &a.model_dir, &a.inputs, &a.out)?,
        DeviceChoice::Emu => {
            let be = DeviceBackend::new(Device::emulator());
            forward_files_on(be, &a.model_dir, &a.inputs, &a.out)?
        }
        DeviceChoice::Cuda(n) => {
            let dev = Device::cuda(n)
                .map_err(|e| anyhow::anyhow!("--device cuda:{n}: cannot open the GPU: {e}"))?;
            forward_files_on(DeviceBackend::new(dev), &a.model_dir, &a.inputs, &a.out)?
        }
    };
    for (name, t) in &outputs {
        println!("{name:<26} {:?}", t.shape);
    }
    println!("wrote {}", a.out.display());
    Ok(())
}
