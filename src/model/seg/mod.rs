//! POPEN's segmentation model (PixelLM's design, the paper's base): a CLIP-style ViT, the
//! LLaVA projector and a LLaMA decoder that answers in text with codebook tokens; the
//! codebook tokens' last hidden states, projected (`Linear → ReLU → Linear`) and averaged
//! per scale, give each target's embedding `f` (Eq. 4, 6); a light pixel decoder turns
//! `f` and two ViT feature levels into a mask.
//!
//! - [`config`]: sizes and settings ([`SegModelConfig`]), from a TOML `[model]` table;
//! - [`preprocess`](mod@preprocess): resize, normalize, pad;
//! - [`prompt`]: the tokenizer with the codebook, the LLaVA v1 template;
//! - [`model`]: [`SegModel`], its parameters and freezing, and the pieces training and
//!   inference share;
//! - [`construct`]: building one from a seed or on a pretrained LLaVA;
//! - [`pass`]: one training step (forward + backward of `CE + 2·BCE + 0.5·Dice`) and the
//!   [`pass::TrainPass`] other objectives drive;
//! - [`layout`]: where a batch's token positions sit (the examples in groups of
//!   similar length, so the LLM does not run on padding);
//! - [`decoder`]: the pixel decoder;
//! - [`category`]: the auxiliary category heads (ours) that teach the tiny model to
//!   recognize objects;
//! - [`matching`]: which masks the loss scores against which targets (instance
//!   matching, ours);
//! - [`infer`]: generation with the KV cache and masks;
//! - [`hidden`]: the hidden rows a decode keeps, left where the forwards wrote them;
//! - [`draft`]: greedy decoding that checks a whole draft continuation per forward;
//! - [`data`]: data-set samples → training examples;
//! - [`run`]: the model's files in a run directory.
pub mod augment;
pub mod category;
pub mod config;
pub mod construct;
pub mod data;
pub mod decoder;
pub mod draft;
pub mod evidence;
pub mod hidden;
pub mod infer;
pub mod layout;
pub mod matching;
pub mod model;
pub mod pass;
pub mod preprocess;
pub mod prompt;
pub mod run;

pub use config::{SegModelConfig, TinyLvlm};
pub use hidden::HiddenRows;
pub use infer::{AnswerMasks, Decoded, ImageEncoding, Prediction, Prefill};
pub use model::{Example, LossWeights, SegLoss, SegModel, Trainable};
pub use pass::HeadWeights;
pub use preprocess::{preprocess, Pixels};
pub use prompt::{Encoded, SegTokenizer};
