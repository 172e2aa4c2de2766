//! The model's configuration: the fields of a Hugging Face LLaMA `config.json` it
//! uses, their defaults, and the checks a config must pass before a model is built.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

fn default_eps() -> f32 {
    1e-6
}
fn default_theta() -> f32 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

/// The fields of a Hugging Face LLaMA `config.json` that the model uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Token vocabulary V: rows of the embedding table and of the output head.
    pub vocab_size: usize,
    /// Width C of the residual stream.
    pub hidden_size: usize,
    /// Width I of the SwiGLU MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads NH; the head size is `hidden_size / num_attention_heads`.
    pub num_attention_heads: usize,
    /// GQA: query heads share key/value heads in groups (None in old configs = MHA).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Epsilon of every RMSNorm (default 1e-6).
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    /// RoPE base (default 10000).
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    /// Longest sequence, cache included, that a forward accepts (default 2048).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// The output head reuses `embed_tokens`' table instead of its own `lm_head` (default
    /// false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Key/value heads NKV: `num_key_value_heads`, or NH when it is absent.
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// Head size HS = `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
    /// Every size positive, heads dividing the hidden size, an even head size for RoPE.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(Error::Config {
                path: "LlamaConfig".into(),
                field: field.into(),
                msg,
            })
        };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.n_kv_heads()),
        ] {
            if v == 0 {
                return bad(name, "must be positive".into());
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.n_kv_heads(),
                    self.num_attention_heads
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(
                "hidden_size",
                format!("head size {} must be even for RoPE", self.head_dim()),
            );
        }
        Ok(())
    }
    /// Number of parameters (the head counted once when tied).
    pub fn num_params(&self) -> usize {
        let (c, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.n_kv_heads() * self.head_dim();
        let layer = 2 * c + 2 * c * c + 2 * c * kv + 3 * c * i;
        v * c
            + self.num_hidden_layers * layer
            + c
            + if self.tie_word_embeddings { 0 } else { v * c }
    }
}
