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
    /// Generate the embedded world as a MUSE-schema data set, or draw overlays of one.
    Data(cli::data::Args),
    /// IoU and Boundary IoU of PNG masks matched by file name (gIoU, cIoU, JSON report).
    EvalMasks(cli::eval_masks::Args),
    /// Score predictions (PRED.jsonl) against MUSE-schema ground truth (DATA.json).
    Eval(cli::eval::Args),
    /// Run a Hugging Face model directory (llama, clip_vision_model, bert, llava) on
    /// named input tensors and write its outputs as safetensors.
    Forward(cli::forward::Args),
    /// Train a stage of POPEN into a run directory (`sft`).
    Train(cli::train::Args),
    /// Answer every question of a MUSE-schema file with a trained model (PRED.jsonl).
    Predict(cli::predict::Args),
    /// Answer one question about one image: text on stdout, overlay and mask PNGs.
    Infer(cli::infer::Args),
    /// Do a run's segmentation embeddings carry their targets' categories?
    ProbeEmbeddings(cli::probe::Args),
    /// The log-likelihood a run gives each question's own answer, teacher-forced.
    ScoreAnswers(cli::score::Args),
    /// The whole method on the embedded world: train, predict with three methods, score.
    Demo(cli::demo::Args),
}

fn main() -> std::process::ExitCode {
    // A closed stdout (`popen eval ... | head`) ends the process quietly, as it does
    // for other Unix tools; Rust's runtime ignores SIGPIPE, and `print!` would panic.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Freed buffers stay in the process for the next training step instead of being
    // faulted in and zeroed again (popen::backend::cpu::heap).
    popen::backend::cpu::keep_freed_memory();
    let cli = Cli::parse();
    // Commands run on a thread of rayon's pool (popen::backend::cpu::on_worker); give
    // the pool's threads the stack a main thread has.  RAYON_NUM_THREADS still sets
    // their number.  An error here means a pool already exists: keep it.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    let r = popen::backend::cpu::on_worker(|| match cli.cmd {
        Cmd::Info(a) => cli::info::run(a),
        Cmd::Data(a) => cli::data::run(a),
        Cmd::EvalMasks(a) => cli::eval_masks::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Forward(a) => cli::forward::run(a),
        Cmd::Train(a) => cli::train::run(a),
        Cmd::Predict(a) => cli::predict::run(a),
        Cmd::Infer(a) => cli::infer::run(a),
        Cmd::ProbeEmbeddings(a) => cli::probe::run(a),
        Cmd::ScoreAnswers(a) => cli::score::run(a),
        Cmd::Demo(a) => cli::demo::run(a),
    });
    // Print the error chain on one line and exit 1: bad input is not a crash, so no
    // backtrace even when RUST_BACKTRACE is set.
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
