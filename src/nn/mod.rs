//! The thin transformer's layers, each with its forward and backward side by side, and
//! the LLaMA decoder built from them.  Every layer is generic over the float type `F`
//! and the [`Backend`](crate::backend::Backend) `B` that computes it, so the CUDA
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
//!   paths, added with [`Backend::axpy`](crate::backend::Backend::axpy).
//!
//! Sizes in comments: B batch, T tokens, C channels, N = B·T rows, V vocabulary,
//! NH query heads, NKV key/value heads, HS head size, I intermediate size.
pub mod layers;
pub mod llama;
pub mod sample;

pub use layers::{
    Attention, AttnCtx, Embedding, LayerNorm, Linear, Mlp, PatchEmbed, RmsNorm, SwiGluMlp,
};
pub use llama::{KvCache, Llama, LlamaConfig};
pub use sample::{sample_token, Rng, SamplingCfg};

use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use num_traits::Float;

/// A named parameter: its shape (as Hugging Face stores it: Linear weights are
/// `[out, in]`), its values on the backend, and its gradient slot (`None` = frozen).
#[derive(Clone, Debug)]
pub struct Tensor<F: Float = f32, B: Backend<F> = Cpu> {
    pub shape: Vec<usize>,
    pub data: B::Buf,
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

/// Deterministic small random values for initialisation and tests: N(0, std²) from the
/// crate's seeded [`Rng`].
pub fn randn<F: Float>(rng: &mut Rng, n: usize, std: f64) -> Vec<F> {
    (0..n)
        .map(|_| F::from(rng.normal() * std).unwrap())
        .collect()
}
