//! The thin transformer's layers, each with its forward and backward side by side, and
//! the LLaMA decoder built from them.  Every layer is generic over the float type `F`
//! and the [`Backend`] `B` that computes it, so the CUDA
//! backend runs this same code.
//!
//! # The gradient rule (llm.c)
//!
//! - **Parameter gradients accumulate** (`+=`) into [`Tensor::grad`], so several
//!   micro-batches sum before an optimizer step.  A tensor whose `grad` is `None` is
//!   frozen: backward skips its weight gradient (no GEMM is spent on it) but still
//!   carries the activation gradient through, so training only a prompt costs what it
//!   should.
//! - **Activation gradients overwrite**: each backward returns fresh buffers.
//! - **The residual stream accumulates**: `x + f(x)` sends its gradient down both
//!   paths, added with [`Backend::axpy`].
//!
//! # Example: one training step of a tiny LLaMA
//!
//! ```
//! use popen::backend::{Backend, Cpu};
//! use popen::nn::{Llama, LlamaConfig};
//! use popen::train::{AdamW, AdamWConfig, WarmupDecayLR};
//!
//! let cfg = LlamaConfig {
//!     vocab_size: 11, hidden_size: 8, intermediate_size: 12, num_hidden_layers: 1,
//!     num_attention_heads: 2, num_key_value_heads: Some(1), rms_norm_eps: 1e-5,
//!     rope_theta: 10000.0, max_position_embeddings: 16, tie_word_embeddings: false,
//! };
//! let mut model: Llama = Llama::new(Cpu, cfg, 0).unwrap();
//! let (ids, targets) = ([1u32, 2, 3, 4], [2i32, 3, 4, 5]);
//! let (logits, acts) = model.forward(&ids, 1, None, None).unwrap(); // (4, 11)
//! // log p(target) per position, and the gradient of loss = −mean log p
//! let (mut logp, mut lse) = (vec![0.0; 4], vec![0.0; 4]);
//! Cpu.logprob_fwd(&logits, &targets, 11, &mut logp, &mut lse).unwrap();
//! let mut dlogits = vec![0.0; 4 * 11];
//! Cpu.logprob_bwd(&logits, &targets, 11, &lse, &vec![-0.25; 4], &mut dlogits).unwrap();
//! model.zero_grad();
//! model.backward(&acts, &dlogits).unwrap();
//! let sched = WarmupDecayLR::new(3e-4, 100, 1000).unwrap();
//! let mut opt = AdamW::new(AdamWConfig::default());
//! opt.step(&Cpu, &mut model.params_mut(), sched.lr(1)).unwrap();
//! ```
//!
//! Sizes in comments: B batch, T tokens, C channels, N = B·T rows, V vocabulary,
//! NH query heads, NKV key/value heads, HS head size, I intermediate size.
pub mod attention;
pub mod conv;
pub mod layers;
pub mod llama;
pub mod sample;
pub mod twoway;

pub use attention::{Attention, AttnCtx};
pub use conv::{Conv2d, ConvTranspose2x2, CrossAttention, CrossIn};
pub use layers::{Embedding, LayerNorm, Linear, Mlp, PatchEmbed, RmsNorm, SwiGluMlp};
pub use llama::{KvCache, Llama, LlamaConfig};
pub use sample::{sample_token, Rng, SamplingCfg, TokenDist};
pub use twoway::TwoWayTransformer;

use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use num_traits::Float;

/// A named parameter: its shape (as Hugging Face stores it: Linear weights are
/// `[out, in]`), its values on the backend, and its gradient slot (`None` = frozen).
#[derive(Clone, Debug)]
pub struct Tensor<F: Float = f32, B: Backend<F> = Cpu> {
    /// Dimensions, outermost first (Hugging Face order: a Linear weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// The values, flat and row-major, `numel()` long.
    pub data: B::Buf,
    /// Gradient accumulator, same length as `data`; `None` = frozen.
    pub grad: Option<B::Buf>,
}

impl<F: Float, B: Backend<F>> Tensor<F, B> {
    /// A trainable tensor of zeros (with a zero gradient slot).
    pub fn zeros(be: &B, shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            data: be.zeros(n),
            grad: Some(be.zeros(n)),
        }
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Replace the values, checking the element count; `name` goes into the error.
    pub fn set(&mut self, be: &B, name: &str, values: &[F]) -> Result<()> {
        if values.len() != self.numel() {
            return Err(Error::shape(
                "Tensor::set",
                format!(
                    "tensor `{name}` of shape {:?} needs {} values, got {}",
                    self.shape,
                    self.numel(),
                    values.len()
                ),
            ));
        }
        self.data = be.from_slice(values);
        Ok(())
    }
    /// Freeze (`false`: drop the gradient slot) or unfreeze (`true`: a zero gradient).
    pub fn set_trainable(&mut self, be: &B, trainable: bool) {
        self.grad = trainable.then(|| be.zeros(self.numel()));
    }
    /// Zero the gradient, if any.
    pub fn zero_grad(&mut self, be: &B) {
        if let Some(g) = &mut self.grad {
            be.fill(g, F::zero());
        }
    }
}

/// [`Tensor::zero_grad`] of every tensor, in one [`Backend::fill_many`] (one launch on
/// a device, where a model's few hundred tensors took a launch each).
pub fn zero_grads<F: Float, B: Backend<F>>(be: &B, params: &mut [(String, &mut Tensor<F, B>)]) {
    let mut grads: Vec<&mut B::Buf> = params
        .iter_mut()
        .filter_map(|(_, p)| p.grad.as_mut())
        .collect();
    be.fill_many(&mut grads, F::zero());
}

/// Deterministic small random values for initialisation and tests: N(0, std²) from the
/// crate's seeded [`Rng`].
pub fn randn<F: Float>(rng: &mut Rng, n: usize, std: f64) -> Vec<F> {
    (0..n)
        .map(|_| F::from(rng.normal() * std).unwrap())
        .collect()
}
