//! `popen train sft|pref|ensemble`: the training stages.  Each writes a run directory (the
//! contract in the README): `config.json`, `tokenizer.json`, `model.safetensors`,
//! `train_state.json`, the checkpoints, `metrics.jsonl`, `loss.png`.
use super::model_args::DeviceArg;
use popen::backend::{Backend, OnBackend};
use popen::method::ensemble::stage3::{train_ensemble, EnsemblePaths, EnsembleTrainConfig};
use popen::method::pref::contrast::ContrastPick;
use popen::method::pref::{train_pref, Eq3Norm, PrefConfig, PrefPaths, PrefSummary};
use popen::method::sft::{train_sft, SftConfig, SftPaths};
use popen::train::{load_toml, TrainOverrides, TrainSummary};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Arguments of `popen train`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub stage: Stage,
}

#[derive(clap::Subcommand)]
pub enum Stage {
    /// Stage 1: supervised fine-tuning on answers and masks (CE + 2·BCE + 0.5·Dice).
    Sft(SftArgs),
    /// Stage 2: preference optimization from a stage-1 run: Lt (DPO on the text
    /// preference Pt) + Ls (Eq. 4 on the segmentation preference Ps, collected by
    /// Alg. 1's curriculum) + the stage-1 mask loss.
    Pref(PrefArgs),
    /// Stage 3: train the ensemble's learnable prompt p̂ from a stage-2 run (Lti + Lsi,
    /// the model frozen); `popen predict --ensemble K` then answers with it.
    Ensemble(EnsembleTrainArgs),
}

/// Options every stage shares.
#[derive(clap::Args)]
pub struct Common {
    /// MUSE-schema training data.
    #[arg(long)]
    pub data: PathBuf,
    /// The run directory to write (and to resume from).
    #[arg(long)]
    pub out: PathBuf,
    /// Image folder (default: the data file's folder).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// A TOML run config: `[model]`, `[train]`, `[loss]`, `[trainable]` tables.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Optimizer steps in the whole run (the schedule follows).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Write a checkpoint every K steps (and at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Seed of the weights, the data order and sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue the run found in --out.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

impl Common {
    /// The stage's config: `--config` (or the defaults) with `--steps`,
    /// `--checkpoint-every`, `--seed` and the stage's `val_every` (stage 1's
    /// `--val-every`) applied to its `[train]` table.
    fn config<T: serde::de::DeserializeOwned + Default>(
        &self,
        val_every: Option<u64>,
        train: impl FnOnce(&mut T) -> &mut popen::train::TrainConfig,
    ) -> anyhow::Result<T> {
        let mut cfg: T = match &self.config {
            Some(p) => load_toml(p)?,
            None => T::default(),
        };
        TrainOverrides {
            steps: self.steps,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            val_every,
        }
        .apply(train(&mut cfg))?;
        Ok(cfg)
    }
}

/// "to step N in S s; last loss L": how a run ended.
fn ended(s: &TrainSummary) -> String {
    format!(
        "to step {} in {:.0} s; last loss {}",
        s.step,
        s.elapsed_s,
        s.last_loss.map_or("-".into(), |l| format!("{l:.4}"))
    )
}

#[derive(clap::Args)]
pub struct SftArgs {
    #[command(flatten)]
    pub common: Common,
    /// MUSE-schema validation data, scored with `popen eval`'s metrics every
    /// `val_every` steps (its first images).
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Score `--val` every N steps (replaces the config's `val_every`; without either,
    /// at every checkpoint).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub val_every: Option<u64>,
    /// Start from a Hugging Face LLaVA directory (config.json, weights, tokenizer.json;
    /// LLaVA-1.5) instead of the tiny model from scratch; its vision tower stays frozen.
    #[arg(long)]
    pub base: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct PrefArgs {
    #[command(flatten)]
    pub common: Common,
    /// The stage-1 run directory to start from (`popen train sft --out`).
    #[arg(long)]
    pub from: PathBuf,
    /// Ablation: train without the text DPO loss Lt (Lce only).
    #[arg(long)]
    pub no_lt: bool,
    /// Ablation: λ = 1 in Eq. 3 (changed tokens weigh as much as the others).
    #[arg(long)]
    pub no_lambda: bool,
    /// Eq. 3's normalizer: `tokens` (1/|y|, the paper) or `weighted` (RLHF-V's).
    #[arg(long)]
    pub norm: Option<String>,
    /// Weight of an extra NLL of the chosen answer beside Lt (RPO's remedy for
    /// likelihood displacement; 0, the paper's loss, by default).
    #[arg(long)]
    pub nll: Option<f64>,
    /// Weight of the image-conditional preference (ours; 0, off, by default): the chosen
    /// answer on its image over the same answer on an image that lacks what it names.
    #[arg(long)]
    pub image_pref: Option<f64>,
    /// Which image is that contrast: `next` (the first after the question's without
    /// what the answer names), `similar` (of those, the one sharing the most
    /// categories with the question's image) or `erased` (the question's own image with
    /// what the answer names painted over).
    #[arg(long)]
    pub image_pref_contrast: Option<String>,
    /// Ablation: train without the segmentation preference loss Ls (Ps is not collected).
    #[arg(long)]
    pub no_ls: bool,
    /// Ablation: drop Eq. 4's indicator (every target's Ls counts).
    #[arg(long)]
    pub no_indicator: bool,
    /// Which Ps triples train when: curriculum (the paper), s, biou, random, hybrid.
    #[arg(long, value_name = "MODE")]
    pub ps_collection: Option<popen::method::pref::ps::PsMode>,
    /// Who corrects the sampled answers for Pt: `world` (the world's own corrector) or
    /// `chat` (an OpenAI-compatible chat-completions endpoint with Supp B's prompts).
    #[arg(long, value_name = "world|chat")]
    pub corrector: Option<String>,
    /// The chat endpoint's base URL (else POPEN_CHAT_URL), e.g. http://localhost:8000/v1.
    #[arg(long)]
    pub chat_url: Option<String>,
    /// The chat model (else POPEN_CHAT_MODEL).
    #[arg(long)]
    pub chat_model: Option<String>,
    /// The endpoint's key (else POPEN_CHAT_KEY, else OPENAI_API_KEY; never saved).
    #[arg(long)]
    pub chat_key: Option<String>,
}

#[derive(clap::Args)]
pub struct EnsembleTrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// The stage-2 run directory to start from (`popen train pref --out`).
    #[arg(long)]
    pub from: PathBuf,
    /// all-MiniLM-L6-v2 for Lti (default: $POPEN_MINILM_DIR, else where
    /// tools/fetch_minilm.sh puts it).
    #[arg(long)]
    pub minilm: Option<PathBuf>,
    /// Answers per ensemble (default: the config's, 3).
    #[arg(long)]
    pub k: Option<usize>,
    /// Ablation: train without Lti (Eq. 8; then MiniLM is not needed).
    #[arg(long)]
    pub no_lti: bool,
    /// Ablation: train without Lsi (Eq. 9).
    #[arg(long)]
    pub no_lsi: bool,
    /// Ablation: no segmentation ensemble (so no Lsi).
    #[arg(long)]
    pub no_seg_ensemble: bool,
    /// Ablation: no attention bias γ.
    #[arg(long)]
    pub no_gamma: bool,
    /// What τ sums: token, sentence or both (Eq. 5).
    #[arg(long)]
    pub tau: Option<popen::method::ensemble::TauMode>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.stage {
        Stage::Sft(s) => sft(s),
        Stage::Pref(p) => pref(p),
        Stage::Ensemble(e) => ensemble(e),
    }
}

fn ensemble(a: EnsembleTrainArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let mut cfg = c.config(None, |x: &mut EnsembleTrainConfig| &mut x.train)?;
    if let Some(k) = a.k {
        cfg.ensemble.k = k;
    }
    cfg.lti &= !a.no_lti;
    cfg.lsi &= !a.no_lsi;
    cfg.ensemble.seg &= !a.no_seg_ensemble;
    cfg.ensemble.gamma &= !a.no_gamma;
    if let Some(t) = a.tau {
        cfg.ensemble.tau = t;
    }
    let paths = EnsemblePaths {
        from: a.from.clone(),
        data: c.data.clone(),
        images: c.images.clone(),
        out: c.out.clone(),
        minilm: a.minilm.clone(),
    };
    /// `train_ensemble` on the backend `--device` names.
    struct Job<'a>(&'a EnsembleTrainConfig, &'a EnsemblePaths, bool);
    impl OnBackend for Job<'_> {
        type Out = TrainSummary;
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<TrainSummary> {
            train_ensemble(be, self.0, self.1, self.2, std::io::stderr().is_terminal())
        }
    }
    let s = c.device.run(Job(&cfg, &paths, c.resume))?;
    println!(
        "stage 3 trained the ensemble prompt {}; run directory {}",
        ended(&s),
        c.out.display()
    );
    Ok(())
}

fn pref(a: PrefArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let mut cfg = c.config(None, |x: &mut PrefConfig| &mut x.train)?;
    if a.no_lt {
        cfg.loss.lt = false;
    }
    if a.no_lambda {
        cfg.loss.lambda = 1.0;
    }
    if a.no_ls {
        cfg.loss.ls = false;
    }
    if a.no_indicator {
        cfg.loss.indicator = false;
    }
    if let Some(m) = a.ps_collection {
        cfg.ps.mode = m;
    }
    use popen::data::chat::CorrectorKind;
    match a.corrector.as_deref() {
        None => {}
        Some("world") => cfg.collect.corrector = CorrectorKind::World,
        Some("chat") => cfg.collect.corrector = CorrectorKind::Chat,
        Some(x) => anyhow::bail!("--corrector {x}: expected world or chat"),
    }
    if let Some(u) = &a.chat_url {
        cfg.collect.chat.url = u.clone();
    }
    if let Some(m) = &a.chat_model {
        cfg.collect.chat.model = m.clone();
    }
    if let Some(k) = &a.chat_key {
        cfg.collect.chat.key = Some(k.clone());
    }
    if let Some(w) = a.nll {
        if !(w.is_finite() && w >= 0.0) {
            anyhow::bail!("--nll {w}: expected a weight >= 0");
        }
        cfg.loss.nll = w;
    }
    if let Some(w) = a.image_pref {
        if !(w.is_finite() && w >= 0.0) {
            anyhow::bail!("--image-pref {w}: expected a weight >= 0");
        }
        cfg.loss.image_pref = w;
    }
    match a.image_pref_contrast.as_deref() {
        None => {}
        Some("next") => cfg.loss.image_pref_contrast = ContrastPick::Next,
        Some("similar") => cfg.loss.image_pref_contrast = ContrastPick::Similar,
        Some("erased") => cfg.loss.image_pref_contrast = ContrastPick::Erased,
        Some(x) => anyhow::bail!("--image-pref-contrast {x}: expected next, similar or erased"),
    }
    match a.norm.as_deref() {
        None => {}
        Some("tokens") => cfg.loss.norm = Eq3Norm::Tokens,
        Some("weighted") => cfg.loss.norm = Eq3Norm::Weighted,
        Some(x) => anyhow::bail!("--norm {x}: expected tokens or weighted"),
    }
    let paths = PrefPaths {
        from: a.from.clone(),
        data: c.data.clone(),
        images: c.images.clone(),
        out: c.out.clone(),
    };
    /// `train_pref` on the backend `--device` names.
    struct Job<'a>(&'a PrefConfig, &'a PrefPaths, bool);
    impl OnBackend for Job<'_> {
        type Out = PrefSummary;
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<PrefSummary> {
            train_pref(be, self.0, self.1, self.2, std::io::stderr().is_terminal())
        }
    }
    let s = c.device.run(Job(&cfg, &paths, c.resume))?;
    let k = &s.counts;
    println!(
        "stage 2: {} text preference pairs from {} questions ({} sampled, {} resampled, {} \
         injected, {} skipped; {} responses drawn); trained {}; run directory {}",
        s.pairs,
        k.questions,
        k.sampled,
        k.resampled,
        k.injected,
        k.skipped,
        k.samples_drawn,
        ended(&s.train),
        c.out.display()
    );
    if let Some(c) = &s.chat {
        println!(
            "stage 2: the chat corrector took {} requests ({} from its cache, {} usable, {} \
             malformed, {} failed after {} retries; {} timeouts, {} HTTP errors)",
            c.requests,
            c.cached,
            c.answered,
            c.malformed,
            c.failed,
            c.retries,
            c.timeouts,
            c.http_errors
        );
    }
    match &s.ps {
        Some(p) => println!(
            "stage 2: {} segmentation preference records from {} questions with targets \
             ({} met the first half's condition, {} did not after {} regenerations; {} \
             perturbed copies read, {} with s < 0, {} with s > 0.8)",
            s.ps_records,
            p.questions - p.no_target,
            p.s_selected,
            p.s_skipped,
            p.regenerations,
            p.copies,
            p.copies_s_below_0,
            p.copies_s_above_0_8
        ),
        None if s.ps_records > 0 => println!(
            "stage 2: {} segmentation preference records (read back from the run)",
            s.ps_records
        ),
        None => {}
    }
    if let Some(r) = &s.reread {
        println!(
            "stage 2: {} questions re-read after {} of the stage-1 model's own answers",
            r.questions, r.answers
        );
    }
    Ok(())
}

fn sft(a: SftArgs) -> anyhow::Result<()> {
    let c = &a.common;
    if a.val_every.is_some() && a.val.is_none() {
        anyhow::bail!("--val-every needs --val (the validation data it schedules)");
    }
    let mut cfg = c.config(a.val_every, |x: &mut SftConfig| &mut x.train)?;
    if a.val.is_some() && cfg.train.val_every == 0 {
        // a --val without a schedule: score at every checkpoint
        cfg.train.val_every = cfg.train.checkpoint_every;
    }
    let paths = SftPaths {
        data: c.data.clone(),
        images: c.images.clone(),
        out: c.out.clone(),
        val: a.val.clone(),
        base: a.base.clone(),
    };
    /// `train_sft` on the backend `--device` names.
    struct Job<'a>(&'a SftConfig, &'a SftPaths, bool);
    impl OnBackend for Job<'_> {
        type Out = TrainSummary;
        fn run<B: Backend<f32>>(self, be: B) -> popen::Result<TrainSummary> {
            train_sft(be, self.0, self.1, self.2, std::io::stderr().is_terminal())
        }
    }
    let s = c.device.run(Job(&cfg, &paths, c.resume))?;
    println!(
        "stage 1 trained {}; run directory {}",
        ended(&s),
        c.out.display()
    );
    Ok(())
}
