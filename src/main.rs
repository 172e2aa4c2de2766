//! The `popen` command-line tool.  Each subcommand lives in `src/cli/<name>.rs`; the
//! contracts are in the README.  Results go to one JSON file, a human table to stdout,
//! progress bars to stderr.
use clap::{Parser, Subcommand};

mod cli;

/// POPEN: preference-based optimization and ensemble for reasoning segmentation.
#[derive(Parser)]
#[command(name = "popen", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show how the crate was built: kernels, PTX target, available devices.
    Info(cli::info::Args),
    /// Run a Hugging Face model directory (llama, clip_vision_model, bert, llava) on
    /// named input tensors and write its outputs as safetensors.
    Forward(cli::forward::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Info(a) => cli::info::run(a),
        Cmd::Forward(a) => cli::forward::run(a),
    }
}
