//! The preference-based ensemble (Sec. 3.3, Eq. 5 and 6): K answers sampled from one
//! image encoding, re-read by the model through attention biased towards the tokens and
//! segmentation embeddings it was most sure of.
//!
//! - [`scores`]: the preference scores `τ` (per token) and `η` (per `<seg>` sentence),
//!   normalised to [−1, 1], and the bias `γ = σ(score) − 0.5`;
//! - [`infer`]: the ensemble at inference (`SegModel::predict_ensemble`);
//! - [`prompt`]: the learnable prompt `p̂` in a run directory;
//! - [`refine`]: stage 3's loss (Supp, Eq. 8, 9) and its gradient in `p̂`;
//! - [`stage3`]: stage 3's training (`popen train ensemble`).
//!
//! Choices the paper leaves open, made here (and tested in `tests/ensemble.rs`):
//! - **Normalisation.**  Likelihoods are probabilities `p = exp(log p)` in [0, 1].
//!   `τ = p_token + p̄_sentence − 1` (both halves, the paper's), `2·p_token − 1`
//!   (`--tau token`) or `2·p̄_sentence − 1` (`--tau sentence`); `η = 2·p̄_sentence − 1`.
//!   Each is an affine map of [0, 2] or [0, 1] onto [−1, 1], so no per-answer min–max
//!   (which would turn a uniformly sure answer into a uniformly unsure one).
//! - **Sentences** end after a token whose text holds `.`, `!` or `?`, and at the end of
//!   the answer; a codebook group belongs to the sentence it is in.
//! - **Layout.**  Text half: `[image, x, y_1 … y_K, p̂]`, then `ỹ` is decoded greedily,
//!   `γ` on the keys of the `y_k` tokens and 0 elsewhere (EOS dropped from each `y_k`).
//!   Segmentation half: `[image, x, y_1 … y_K, p̂, {f_k^n}, ỹ]` in one teacher-forced
//!   forward, `γ = σ(η) − 0.5` on the `f` keys and 0 elsewhere (Eq. 6); `f̃` is read at
//!   `ỹ`'s codebook positions.  The `f_k^n` fed back are the codebook tokens' last
//!   hidden states (the LLM's own space; the decoder-space embeddings are a projection
//!   of them), `G` rows per target.  The `y_k` are read in the order they were
//!   drawn, `EnsemblePrediction::samples`' order (the paper does not say; the tests
//!   rebuild the read in that order).  Ordered by mean likelihood instead, either
//!   way, one measured run moved by a few answers of 180 (docs/demo.md).
//! - **Prefix.**  The image and question go through the LLM once; the K samples, the
//!   text half and the segmentation half all continue from that KV cache.  The
//!   questions of one call are read in one batch and their B·K samples decoded as one
//!   batch, the shorter prompts padded on the left as `SegModel::predict` pads them
//!   (the pads hidden by a key bias of −inf; prompts that could reach the context's end
//!   go by length, unpadded), the K samples of a question sharing one cache row, and
//!   so one forward per step, for as long as they draw the same tokens; the two halves
//!   then run question by question, each from its own prefix (a padded one as it is,
//!   its pads hidden, when both halves fit the context after them; else read again
//!   alone, so that the halves decide as they would alone).
//!   The groups and the questions' two halves are independent and run on several
//!   threads at once on the CPU ([`crate::backend::map_jobs`]), with the same results.
//! - **Decoding `ỹ`** is greedy, with the K samples as drafts
//!   ([`crate::model::seg::draft`]): the same tokens, fewer forwards.
//! - **Context.**  When `[prefix, y_1 … y_K, p̂]` leaves less room than the longest
//!   sample (EOS included) takes, the answer is the sample of highest mean likelihood (counted in
//!   [`EnsemblePrediction::fallback`]); when the segmentation half does not fit, `ỹ`'s
//!   own masks are kept.
//! - **Ablations** (Table 6): without the text ensemble `ỹ` is the sample of highest
//!   mean likelihood; without the segmentation ensemble its masks come from the text
//!   half's own hidden states; without `γ` every bias is 0; without `p̂` no prompt rows.
//!   Not in Table 6 (ours, a baseline for the text half): `--text-vote` answers with
//!   the text most of the K samples give ([`majority`]; ties to the most likely), so
//!   what Eq. 5's re-reading adds over the samples' agreement can be measured.
//!   `--consensus` (ours, [`consensus`]) removes from the answer, whichever of these
//!   gave it, the objects that at most half of the samples name, and its masks are
//!   decoded for the edited text (through the segmentation half, or without it from a
//!   teacher-forced read of the edited answer after the prefix).
pub mod consensus;
pub mod infer;
pub mod prompt;
pub mod refine;
pub mod scores;
pub mod stage3;

pub use consensus::{consensus_answer, consensus_objects};
pub use infer::{majority, mean_logp, most_likely, EnsemblePrediction};
pub use prompt::{load_prompt, PROMPT_LEN, PROMPT_TENSOR};
pub use refine::{RefineData, RefineLoss, SegPair};
pub use scores::{gamma, sentence_ends, sentence_index, sentence_scores, token_scores, TauMode};

use serde::{Deserialize, Serialize};

/// Settings of the ensemble (Sec. 3.3, Table 6's ablations).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnsembleCfg {
    /// Answers sampled per question (3, the paper's).
    pub k: usize,
    /// Sampling of the K answers (the refined answer is greedy).
    pub temperature: f32,
    /// Nucleus mass of the K samples' sampling (0.9).
    pub top_p: f32,
    /// Refine the text (`ỹ` from the K answers); off: the most likely sample, or with
    /// `vote` the [`majority`] one.
    pub text: bool,
    /// Not the paper's (an ablation baseline for the text half): where the answer is a
    /// sample (`text` off, or the refinement does not fit the context), take the one most
    /// samples agree with ([`majority`]) instead of the most likely.
    pub vote: bool,
    /// Not the paper's (`--consensus`): the text answer — refined, most likely or
    /// voted — keeps only the objects more than half of the K samples name
    /// ([`consensus_answer`]); its masks follow the edited text.
    pub consensus: bool,
    /// Refine the segmentation embeddings (Eq. 6).
    pub seg: bool,
    /// Bias the attention (`γ`); off: plain concatenation.
    pub gamma: bool,
    /// Use the learnable prompt `p̂` when the model has one.
    pub prompt: bool,
    /// What `τ` sums (`--tau`): the token's likelihood, its sentence's mean, or both
    /// (the paper's, the default).
    pub tau: TauMode,
    /// Decode each sample's own masks too (stage 3's `Lsi` and the demo's Pearson r
    /// read them); off, `EnsemblePrediction::samples` carry no masks.  `popen predict`
    /// and `popen infer` write only the answer's masks and turn it off.
    pub sample_masks: bool,
}

impl Default for EnsembleCfg {
    fn default() -> Self {
        EnsembleCfg {
            k: 3,
            temperature: 0.7,
            top_p: 0.9,
            text: true,
            vote: false,
            consensus: false,
            seg: true,
            gamma: true,
            prompt: true,
            tau: TauMode::Both,
            sample_masks: true,
        }
    }
}
