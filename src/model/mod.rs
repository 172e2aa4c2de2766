//! Model loaders and compositions: Hugging Face checkpoints (config.json + safetensors)
//! for CLIP vision, BERT, LLaMA and LLaVA-1.5, run on the layers of [`crate::nn`].
//!
//! - [`io`]: safetensors read (validated first) and write, f32/f16/bf16 → f32.
//! - [`config`]: `config.json` parsing with errors that name the field.
//! - [`weights`]: a checkpoint directory (single file or shards), parameters by name.
//! - [`clip`], [`bert`], [`llama`], [`llava`]: the architectures.
//! - [`seg`]: the segmentation head; [`seg::decoder`] is PixelLM's light pixel decoder.
//! - [`pretrained`]: any supported directory by `model_type`, loaded and saved back.
//! - [`forward`]: `popen forward`: any supported directory on named input tensors.
//!
//! Every model lists its parameters under their Hugging Face names (`params_mut`), so a
//! loader fills them, a saver writes them back under the same names, and a trainer can
//! address them.
pub mod bert;
pub mod clip;
pub mod config;
pub mod forward;
pub mod io;
pub mod llama;
pub mod llava;
pub mod pretrained;
pub mod seg;
pub mod stem;
pub mod weights;

pub use bert::{Bert, BertOutput};
pub use clip::{ClipOutput, ClipVision};
pub use config::{BertConfig, ClipVisionConfig, HfConfig, HfLlamaConfig, LlavaConfig, ModelType};
pub use io::{HostTensor, IntTensor, StDtype, StFile};
pub use llava::{Llava, LlavaNames};
pub use pretrained::Pretrained;
pub use weights::Checkpoint;
