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
