//! Model loaders and compositions: Hugging Face checkpoints (config.json + safetensors)
//! for CLIP vision, BERT, LLaMA and LLaVA-1.5, run on the layers of [`crate::nn`].
//!
//! - [`io`]: safetensors read (validated first) and write, f32/f16/bf16 → f32.
//! - [`config`]: `config.json` parsing with errors that name the field.
pub mod config;
pub mod io;

pub use config::{BertConfig, ClipVisionConfig, HfConfig, HfLlamaConfig, LlavaConfig, ModelType};
pub use io::{HostTensor, IntTensor, StDtype, StFile};
