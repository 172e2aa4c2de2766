//! Loading the LLaMA decoder of [`crate::nn::Llama`] from Hugging Face checkpoints,
//! alone (`LlamaForCausalLM`) or inside a LLaVA checkpoint.
//!
//! [`Llama::params_mut`] names parameters as `LlamaForCausalLM` does (`model.…`,
//! `lm_head.weight`); [`LlamaNames`] maps those onto the names a given file uses.
use super::config::HfLlamaConfig;
use super::io::StDtype;
use super::weights::{save_params, Checkpoint};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::llama::LlamaLayer;
use crate::nn::{Attention, Embedding, Linear, Llama, LlamaConfig, RmsNorm, SwiGluMlp, Tensor};
use num_traits::Float;
use std::path::Path;

/// Where a checkpoint keeps the decoder and the head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaNames {
    /// Prefix of the decoder's tensors (`model.`, `model.language_model.`,
    /// `language_model.model.`, or empty for a bare `LlamaModel`).
    pub decoder: String,
    /// Full name of the output head (`lm_head.weight`, `language_model.lm_head.weight`).
    pub head: String,
}

/// Decoder prefixes of a `LlamaForCausalLM` (or bare `LlamaModel`) checkpoint.
pub const LLAMA_DECODER_PREFIXES: &[&str] = &["model.", ""];
/// A tensor every LLaMA decoder has.
pub const LLAMA_MARKER: &str = "embed_tokens.weight";

impl LlamaNames {
    /// The names of a standalone `LlamaForCausalLM` checkpoint.
    pub fn detect_causal_lm(ck: &Checkpoint) -> Result<Self> {
        Ok(Self {
            decoder: ck.find_prefix(LLAMA_DECODER_PREFIXES, LLAMA_MARKER)?,
            head: "lm_head.weight".into(),
        })
    }

    /// Checkpoint name of the [`Llama::params_mut`] name `n`.
    pub fn rename(&self, n: &str) -> String {
        if n == "lm_head.weight" {
            self.head.clone()
        } else {
            format!("{}{}", self.decoder, n.strip_prefix("model.").unwrap_or(n))
        }
    }
}

/// The crate's [`LlamaConfig`] for a Hugging Face one, refusing what the decoder does
/// not implement (biases, a head size other than hidden/heads).
pub fn llama_config(c: &HfLlamaConfig, path: &Path, prefix: &str) -> Result<LlamaConfig> {
    let err = |field: &str, msg: String| Error::Config {
        path: path.to_path_buf(),
        field: format!("{prefix}{field}"),
        msg,
    };
    if c.attention_bias {
        return Err(err(
            "attention_bias",
            "attention biases are not implemented".into(),
        ));
    }
    if c.mlp_bias {
        return Err(err("mlp_bias", "MLP biases are not implemented".into()));
    }
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        return Err(err(
            "head_dim",
            format!(
                "{} × num_attention_heads {} ≠ hidden_size {}: a separate head size is not \
                 implemented",
                c.head_dim, c.num_attention_heads, c.hidden_size
            ),
        ));
    }
    let cfg = LlamaConfig {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: Some(c.num_key_value_heads),
        rms_norm_eps: c.rms_norm_eps as f32,
        rope_theta: c.rope_theta as f32,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: c.tie_word_embeddings,
    };
    cfg.validate().map_err(|e| match e {
        Error::Config { field, msg, .. } => err(&field, msg),
        other => other,
    })?;
    Ok(cfg)
}

/// A frozen tensor of `shape` with no storage yet: [`Checkpoint::load_params`] gives it
/// its values (`Tensor::set` checks the count against the shape, not the old buffer).
fn shell<F: Float, B: Backend<F>>(be: &B, shape: &[usize]) -> Tensor<F, B> {
    Tensor {
        shape: shape.to_vec(),
        data: be.zeros(0),
        grad: None,
    }
}

fn shell_linear<F: Float, B: Backend<F>>(be: &B, fan_in: usize, fan_out: usize) -> Linear<F, B> {
    Linear::from_parts(shell(be, &[fan_out, fan_in]), None)
}

/// The layout of [`Llama::new`] without its costs: `new` draws random weights and
/// allocates a gradient per tensor, which for a 7B model is minutes of RNG and a second
/// 28 GB; a loader overwrites every value anyway.  The golden tests pin this layout to
/// `transformers`, so a drift from `Llama::new` shows there.
pub fn frozen_llama_shell<F: Float, B: Backend<F>>(be: B, cfg: LlamaConfig) -> Result<Llama<F, B>> {
    cfg.validate()?;
    let (c, hs, nh, nkv) = (
        cfg.hidden_size,
        cfg.head_dim(),
        cfg.num_attention_heads,
        cfg.n_kv_heads(),
    );
    let rms = |be: &B| RmsNorm {
        weight: shell(be, &[c]),
        eps: cfg.rms_norm_eps,
    };
    let layers = (0..cfg.num_hidden_layers)
        .map(|_| LlamaLayer {
            input_layernorm: rms(&be),
            self_attn: Attention {
                q: shell_linear(&be, c, nh * hs),
                k: shell_linear(&be, c, nkv * hs),
                v: shell_linear(&be, c, nkv * hs),
                o: shell_linear(&be, nh * hs, c),
                nh,
                nkv,
                hs,
                rope_theta: Some(cfg.rope_theta),
                causal: true,
                fused: None,
            },
            post_attention_layernorm: rms(&be),
            mlp: SwiGluMlp {
                gate: shell_linear(&be, c, cfg.intermediate_size),
                up: shell_linear(&be, c, cfg.intermediate_size),
                down: shell_linear(&be, cfg.intermediate_size, c),
                fused: None,
            },
        })
        .collect();
    Ok(Llama {
        embed_tokens: Embedding {
            weight: shell(&be, &[cfg.vocab_size, c]),
        },
        layers,
        norm: rms(&be),
        lm_head: (!cfg.tie_word_embeddings).then(|| shell_linear(&be, c, cfg.vocab_size)),
        cfg,
        be,
    })
}

/// A frozen [`Llama`] filled from `ck` under `names`.
pub fn load_llama<F: Float, B: Backend<F>>(
    be: B,
    cfg: LlamaConfig,
    ck: &Checkpoint,
    names: &LlamaNames,
) -> Result<Llama<F, B>> {
    let mut m = frozen_llama_shell(be.clone(), cfg)?;
    ck.load_params(&be, m.params_mut(), |n| names.rename(n))?;
    Ok(m)
}

/// Writes every parameter of `m` to one safetensors file under `names`.
pub fn save_llama<F: Float, B: Backend<F>>(
    m: &mut Llama<F, B>,
    path: impl AsRef<Path>,
    names: &LlamaNames,
    dtype: StDtype,
) -> Result<()> {
    let be = m.be.clone();
    let params: Vec<(String, &Tensor<F, B>)> =
        m.params_mut().into_iter().map(|(n, t)| (n, &*t)).collect();
    save_params(&be, path, params, |n| names.rename(n), dtype)
}
