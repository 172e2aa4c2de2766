//! `popen demo`: the whole method on the embedded world (world → stage 1 → stage 2 →
//! three methods predicted and scored), a Markdown table on stdout.
use super::model_args::DeviceArg;
use popen::backend::{Backend, OnBackend};
use popen::method::demo::{run_demo, DemoCfg, DemoResults};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Arguments of `popen demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Where everything goes: world/, sft/, pref/, pred_<method>.jsonl, overlays/,
    /// results.json.  A killed demo rerun with the same settings resumes here.
    #[arg(long, default_value = "popen_demo")]
    pub out: PathBuf,
    /// Seed of the world, the training and the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A tiny model on a tiny world: seconds, for checking the pipeline, not the method.
    #[arg(long)]
    pub quick: bool,
    /// Stage 1's optimizer steps instead of the demo's own (`DemoCfg::standard`: the
    /// stage-1 config's `total_steps`; `DemoCfg::quick`: 12): 800 runs the whole method in
    /// about 8 minutes on 2 cores, on poorer masks.  Recorded in `demo.json` like every
    /// setting.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub sft_steps: Option<u64>,
    #[command(flatten)]
    pub device: DeviceArg,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut cfg = if a.quick {
        DemoCfg::quick(a.seed)
    } else {
        DemoCfg::standard(a.seed)?
    };
    if let Some(n) = a.sft_steps {
        cfg.sft_steps = n;
    }
    /// The demo on the backend `--device` names.
    struct Job<'a>(&'a DemoCfg, &'a PathBuf);
    impl OnBackend for Job<'_> {
        type Out = DemoResults;
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<DemoResults> {
            run_demo(be, self.0, self.1, std::io::stderr().is_terminal())
        }
    }
    let r = a.device.run(Job(&cfg, &a.out))?;
    print!("{}", r.markdown());
    let pr = |v: Option<f64>| v.map_or("undefined".into(), |x| format!("{x:.3}"));
    println!(
        "\nPearson r: τ vs token correctness {}, η vs target IoU {}",
        pr(r.pearson_text),
        pr(r.pearson_seg)
    );
    if !r.lti {
        println!("(stage 3 trained without Lti: no MiniLM here; tools/fetch_minilm.sh fetches it)");
    }
    println!("results, predictions and overlays in {}", a.out.display());
    Ok(())
}
