//! Options shared by the commands that run a model.
use popen::backend::{DeviceChoice, OnBackend};
use popen::kernels::KernelTime;
use std::path::{Path, PathBuf};

/// `--device`: where the model runs; `--profile`: where its kernel times go.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArg {
    /// cpu (the reference backend), emu (the kernels on the CUDA emulator: slow, for
    /// checking) or cuda[:N] (GPU N; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Time every kernel launch, matrix product, zero-filled allocation and host↔device
    /// copy of the run (`--device emu` or `cuda`) and write the totals by kernel to FILE
    /// as JSON lines (`{"kernel", "calls", "ms"}`, largest first); `-` prints a table on
    /// stderr.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
}

impl DeviceArg {
    /// Runs `job` on the backend `--device` names, profiled when `--profile` asks.
    pub fn run<J: OnBackend>(&self, job: J) -> anyhow::Result<J::Out> {
        let Some(path) = &self.profile else {
            return Ok(self.device.run(job)?);
        };
        let (out, rows) = self.device.run_profiled(job)?;
        write_profile(path, &rows)?;
        Ok(out)
    }
}

/// The profile as JSON lines at `path` (written atomically), or a table on stderr for `-`.
fn write_profile(path: &Path, rows: &[KernelTime]) -> anyhow::Result<()> {
    if path == Path::new("-") {
        let total: f64 = rows.iter().map(|r| r.ms).sum();
        eprintln!("{:>10} {:>8} {:>6}  kernel", "ms", "calls", "%");
        for r in rows {
            let pct = 100.0 * r.ms / total.max(f64::MIN_POSITIVE);
            eprintln!("{:>10.3} {:>8} {:>6.1}  {}", r.ms, r.calls, pct, r.name);
        }
        eprintln!("{total:>10.3} in all");
        return Ok(());
    }
    let mut text = String::new();
    for r in rows {
        let row = serde_json::json!({"kernel": r.name, "calls": r.calls, "ms": r.ms});
        text.push_str(&row.to_string());
        text.push('\n');
    }
    popen::fsio::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// The ensemble's options (Sec. 3.3, Table 6's ablations), shared by `predict`,
/// `infer` and `train ensemble`.
#[derive(clap::Args, Clone, Debug)]
pub struct EnsembleArgs {
    /// Answer with the K-way preference-based ensemble (0 = one greedy answer).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub ensemble: usize,
    /// Temperature of the K samples.
    #[arg(long, default_value_t = 0.7)]
    pub ensemble_temperature: f32,
    /// Ablation: the answer is the most likely sample, not a refined one.
    #[arg(long)]
    pub no_text_ensemble: bool,
    /// Ablation (not the paper's): the answer is the one most of the K samples give
    /// (ties: the most likely), not a refined one.
    #[arg(long, conflicts_with = "no_text_ensemble")]
    pub text_vote: bool,
    /// Not the paper's: the answer (refined, most likely or voted) keeps only the objects
    /// more than half of the K samples name; its masks follow the edited text.
    #[arg(long)]
    pub consensus: bool,
    /// Ablation: the refined answer's masks come from its own hidden states (no Eq. 6).
    #[arg(long)]
    pub no_seg_ensemble: bool,
    /// Ablation: no attention bias γ.
    #[arg(long)]
    pub no_gamma: bool,
    /// Ablation: no learnable prompt p̂, even when the run has one.
    #[arg(long)]
    pub no_prompt: bool,
    /// What τ sums: token, sentence or both (Eq. 5).
    #[arg(long, default_value = "both")]
    pub tau: popen::method::ensemble::TauMode,
}

impl EnsembleArgs {
    /// The ensemble's settings with `k` answers.
    pub fn cfg(&self, k: usize) -> popen::method::ensemble::EnsembleCfg {
        popen::method::ensemble::EnsembleCfg {
            k,
            temperature: self.ensemble_temperature,
            text: !self.no_text_ensemble && !self.text_vote,
            vote: self.text_vote,
            consensus: self.consensus,
            seg: !self.no_seg_ensemble,
            gamma: !self.no_gamma,
            prompt: !self.no_prompt,
            tau: self.tau,
            ..Default::default()
        }
    }
}
