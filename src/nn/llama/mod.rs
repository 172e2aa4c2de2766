//! LLaMA (`LlamaForCausalLM`): RMSNorm, RoPE (HF rotate_half), SwiGLU, GQA, tied or
//! untied head; training forward/backward, KV-cache decoding and sampling.
//!
//! Parameters carry Hugging Face names (`model.layers.0.self_attn.q_proj.weight`) and
//! HF shapes (`[out, in]` for Linear) so a loader fills them by name; see
//! [`Llama::params_mut`].
//!
//! B batch, T tokens, C hidden size, N = B·T, V vocabulary, I intermediate size.
//!
//! Here: the blocks, the model, its forward and backward; `config` the `config.json`
//! fields and their checks; `decode` the KV cache and sampling with it.
use super::attention::{AttnActs, AttnCtx, LayerKv};
use super::layers::SwiGluActs;
use super::sample::Rng;
use super::{randn, Attention, Embedding, Linear, RmsNorm, SwiGluMlp, Tensor};
use crate::backend::{Accum, Backend, Cpu, MatmulSpec};
use crate::error::{Error, Result};
use num_traits::Float;

mod config;
mod decode;
pub use config::LlamaConfig;
pub use decode::KvCache;
pub(crate) use decode::{bias_rows, LeftPadded};

/// HF's default `initializer_range`: weights start as N(0, 0.02²).
const INIT_STD: f64 = 0.02;

/// One decoder block.
#[derive(Clone, Debug)]
pub struct LlamaLayer<F: Float = f32, B: Backend<F> = Cpu> {
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm<F, B>,
    /// Causal GQA self-attention with RoPE, no biases.
    pub self_attn: Attention<F, B>,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: RmsNorm<F, B>,
    /// SwiGLU MLP C → I → C.
    pub mlp: SwiGluMlp<F, B>,
}

/// The residual stream entering a block (or the final norm): the input x, or the block
/// before (its activations, which hold xm) and its MLP output m.  That block's last
/// residual add, xm + m, is made by the next norm in the same op
/// ([`RmsNorm::forward_added`]): one pass over the stream, not two.
enum Stream<Buf> {
    Input(Buf),
    After(LayerActs<Buf>, Buf),
}

/// A block's input as its first norm leaves it: (x, norm(x), rstd).
type Normed<Buf> = (Buf, Buf, Buf);

impl<Buf> Stream<Buf> {
    /// The stream normed by `norm`, and the block before's activations handed back.
    fn normed<F: Float, B: Backend<F, Buf = Buf>>(
        self,
        be: &B,
        norm: &RmsNorm<F, B>,
    ) -> Result<(Normed<Buf>, Option<LayerActs<Buf>>)> {
        match self {
            Stream::Input(x) => {
                let (out, rstd) = norm.forward(be, &x)?;
                Ok(((x, out, rstd), None))
            }
            Stream::After(acts, m) => {
                let n = norm.forward_added(be, &acts.xm, &m)?;
                Ok((n, Some(acts)))
            }
        }
    }
}

/// What one block's forward saves for its backward.
#[derive(Clone, Debug)]
pub struct LayerActs<Buf> {
    /// residual stream entering the block (N,C)
    pub x: Buf,
    /// rstd (N) of `input_layernorm(x)`, whose output the attention saved (`attn.x`)
    pub rstd1: Buf,
    /// what the attention saved
    pub attn: AttnActs<Buf>,
    /// residual after attention (N,C)
    pub xm: Buf,
    /// rstd (N) of `post_attention_layernorm(xm)`, whose output the MLP saved (`mlp.x`)
    pub rstd2: Buf,
    /// what the MLP saved
    pub mlp: SwiGluActs<Buf>,
}

/// Everything a [`Llama::forward`] saves for [`Llama::backward`].
#[derive(Clone, Debug)]
pub struct LlamaActs<Buf> {
    /// batch B
    pub b: usize,
    /// tokens T per sequence in this call
    pub t: usize,
    /// position of the first token (the cache length); the backward needs 0
    pub pos0: usize,
    /// token ids when the input came from `embed_tokens` (for its gradient)
    pub ids: Option<Vec<u32>>,
    /// the forward's padding mask (B,T) and key bias γ (B,T), re-read by the backward
    pub key_mask: Option<Vec<u8>>,
    /// the key bias γ, see `key_mask`
    pub bias: Option<Buf>,
    /// each block's saved activations, first block first
    pub layers: Vec<LayerActs<Buf>>,
    /// residual stream after the last block (N,C)
    pub x_last: Buf,
    /// rstd (N) of the final norm
    pub rstd_f: Buf,
    /// after the final norm (N,C): HF's `last_hidden_state`
    pub hidden: Buf,
}

/// `LlamaForCausalLM`.
#[derive(Clone, Debug)]
pub struct Llama<F: Float = f32, B: Backend<F> = Cpu> {
    /// The config the model was built from (`vocab_size` follows [`Llama::grow_vocab`]).
    pub cfg: LlamaConfig,
    /// The backend that holds the weights and runs every op.
    pub be: B,
    /// Token embeddings (V, C).
    pub embed_tokens: Embedding<F, B>,
    /// The decoder blocks, `model.layers.{i}`.
    pub layers: Vec<LlamaLayer<F, B>>,
    /// Final RMSNorm, before the output head.
    pub norm: RmsNorm<F, B>,
    /// None when tied to `embed_tokens`.
    pub lm_head: Option<Linear<F, B>>,
}

impl<F: Float, B: Backend<F>> Llama<F, B> {
    /// A model with N(0, 0.02²) weights and unit norms, every tensor trainable.
    pub fn new(be: B, cfg: LlamaConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let (c, hs) = (cfg.hidden_size, cfg.head_dim());
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| LlamaLayer {
                input_layernorm: RmsNorm::new(&be, c, cfg.rms_norm_eps),
                self_attn: Attention::new(
                    &be,
                    c,
                    cfg.num_attention_heads,
                    cfg.n_kv_heads(),
                    hs,
                    false,
                    Some(cfg.rope_theta),
                    true,
                ),
                post_attention_layernorm: RmsNorm::new(&be, c, cfg.rms_norm_eps),
                mlp: SwiGluMlp::new(&be, c, cfg.intermediate_size),
            })
            .collect();
        let mut m = Llama {
            embed_tokens: Embedding::new(&be, cfg.vocab_size, c),
            layers,
            norm: RmsNorm::new(&be, c, cfg.rms_norm_eps),
            lm_head: (!cfg.tie_word_embeddings).then(|| Linear::new(&be, c, cfg.vocab_size, false)),
            cfg,
            be,
        };
        let mut rng = Rng::new(seed);
        let be = m.be.clone();
        for (name, t) in m.params_mut() {
            if !name.ends_with("norm.weight") {
                t.data = be.from_slice(&randn::<F>(&mut rng, t.numel(), INIT_STD));
            }
        }
        Ok(m)
    }

    /// Grows the vocabulary to `v` tokens (new tokens appended, as
    /// `resize_token_embeddings` does): each new row of the embedding table and of the
    /// output head starts at the mean of the old rows, so the new tokens begin as an
    /// "average" token rather than noise.  Trainability of each tensor is kept.
    pub fn grow_vocab(&mut self, v: usize) -> Result<()> {
        let old = self.cfg.vocab_size;
        if v < old {
            return Err(Error::arg(
                "Llama::grow_vocab",
                format!("cannot shrink the vocabulary from {old} to {v}"),
            ));
        }
        self.unpack();
        let c = self.cfg.hidden_size;
        let be = self.be.clone();
        let grow = |t: &mut Tensor<F, B>| {
            let mut w = be.to_vec(&t.data);
            let mut mean = vec![F::zero(); c];
            for r in w.chunks(c) {
                for (m, &x) in mean.iter_mut().zip(r) {
                    *m = *m + x;
                }
            }
            let inv = F::from(1.0 / old.max(1) as f64).unwrap();
            mean.iter_mut().for_each(|m| *m = *m * inv);
            for _ in old..v {
                w.extend_from_slice(&mean);
            }
            let trainable = t.grad.is_some();
            *t = Tensor {
                shape: vec![v, c],
                data: be.from_slice(&w),
                grad: None,
            };
            t.set_trainable(&be, trainable);
        };
        grow(&mut self.embed_tokens.weight);
        if let Some(h) = &mut self.lm_head {
            grow(&mut h.weight);
        }
        self.cfg.vocab_size = v;
        Ok(())
    }

    /// The Linear layers that hold their own weight: every block's projections (q, k
    /// and v, gate and up, only while not fused), then the head.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear<F, B>> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                let (a, m) = (&mut l.self_attn, &mut l.mlp);
                let qkv = (!a.is_fused()).then_some([&mut a.q, &mut a.k, &mut a.v]);
                let gate_up = (!m.is_fused()).then_some([&mut m.gate, &mut m.up]);
                let (qkv, gate_up) = (qkv.into_iter().flatten(), gate_up.into_iter().flatten());
                qkv.chain([&mut a.o]).chain(gate_up).chain([&mut m.down])
            })
            .chain(self.lm_head.as_mut())
    }

    /// Readies the frozen layers for reading: in each block, q, k and v when all three
    /// are frozen become one product ([`Attention::fuse`]), and so do gate and up
    /// ([`SwiGluMlp::fuse`]): one launch on a device where there were three, and two.
    /// Every other frozen Linear is packed ([`Linear::pack`]) on a backend that prefers
    /// it.  The trainable ones are left as they are.  Returns how many Linear layers it
    /// packed or fused (five per fused block).  [`Llama::params_mut`] (so saving,
    /// loading and freezing) undoes all of it: call this once the weights are final,
    /// before reading with them.
    pub fn pack_frozen(&mut self) -> Result<usize> {
        let be = self.be.clone();
        let mut packed = 0;
        let frozen = |ls: &[&Linear<F, B>]| ls.iter().all(|p| p.weight.grad.is_none());
        for l in &mut self.layers {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            if frozen(&[&a.q, &a.k, &a.v]) && a.fuse(&be)? {
                packed += 3;
            }
            if frozen(&[&m.gate, &m.up]) && m.fuse(&be)? {
                packed += 2;
            }
        }
        for l in self.linears_mut() {
            if l.weight.grad.is_none() && l.pack(&be)? {
                packed += 1;
            }
        }
        Ok(packed)
    }

    /// Undoes [`Llama::pack_frozen`]: every fused block's q, k and v and its gate and
    /// up apart again, and every packed Linear's values back in its `weight.data`.
    pub fn unpack(&mut self) {
        let be = self.be.clone();
        for l in &mut self.layers {
            // copies within buffers whose sizes the fusion set: an error is a broken
            // device, as in the backend's other infallible ops
            let apart = "a fused product splits into the layers it was made of";
            l.self_attn.unfuse(&be).expect(apart);
            l.mlp.unfuse(&be).expect(apart);
        }
        self.linears_mut().for_each(|l| l.unpack(&be));
    }

    /// Every parameter with its Hugging Face name, in a fixed order (packed layers are
    /// unpacked first, so each tensor holds its values).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor<F, B>)> {
        self.unpack();
        let mut out: Vec<(String, &mut Tensor<F, B>)> = vec![(
            "model.embed_tokens.weight".into(),
            &mut self.embed_tokens.weight,
        )];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let named = [
                ("input_layernorm", &mut l.input_layernorm.weight),
                ("self_attn.q_proj", &mut l.self_attn.q.weight),
                ("self_attn.k_proj", &mut l.self_attn.k.weight),
                ("self_attn.v_proj", &mut l.self_attn.v.weight),
                ("self_attn.o_proj", &mut l.self_attn.o.weight),
                (
                    "post_attention_layernorm",
                    &mut l.post_attention_layernorm.weight,
                ),
                ("mlp.gate_proj", &mut l.mlp.gate.weight),
                ("mlp.up_proj", &mut l.mlp.up.weight),
                ("mlp.down_proj", &mut l.mlp.down.weight),
            ];
            out.extend(named.map(|(n, t)| (format!("model.layers.{i}.{n}.weight"), t)));
        }
        out.push(("model.norm.weight".into(), &mut self.norm.weight));
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head.weight".into(), &mut h.weight));
        }
        out
    }

    /// Set one parameter by HF name, checking its shape.
    pub fn set_param(&mut self, name: &str, shape: &[usize], values: &[F]) -> Result<()> {
        let be = self.be.clone();
        let mut params = self.params_mut();
        let Some((_, t)) = params.iter_mut().find(|(n, _)| n == name) else {
            return Err(Error::arg(
                "Llama::set_param",
                format!("no parameter named `{name}`"),
            ));
        };
        if t.shape != shape {
            return Err(Error::shape(
                "Llama::set_param",
                format!(
                    "`{name}` has shape {:?}, the checkpoint gives {shape:?}",
                    t.shape
                ),
            ));
        }
        t.set(&be, name, values)
    }

    /// Freeze or unfreeze every parameter.
    pub fn set_trainable(&mut self, trainable: bool) {
        let be = self.be.clone();
        for (_, t) in self.params_mut() {
            t.set_trainable(&be, trainable);
        }
    }

    /// Zero every gradient.
    pub fn zero_grad(&mut self) {
        let be = self.be.clone();
        crate::nn::zero_grads(&be, &mut self.params_mut());
    }

    /// ids (B·T) → input embeddings (B·T, C).
    pub fn embed(&self, ids: &[u32]) -> Result<B::Buf> {
        self.embed_tokens.forward(&self.be, ids)
    }

    /// Training forward from token ids (B·T, row-major by batch).  `key_mask` (B, T)
    /// marks padding, `bias` (B, T) is the per-key γ.  Returns logits (B·T, V).
    pub fn forward(
        &self,
        ids: &[u32],
        b: usize,
        key_mask: Option<&[u8]>,
        bias: Option<&B::Buf>,
    ) -> Result<(B::Buf, LlamaActs<B::Buf>)> {
        if b == 0 || !ids.len().is_multiple_of(b) {
            return Err(Error::shape(
                "Llama::forward",
                format!("{} ids do not split into {b} rows", ids.len()),
            ));
        }
        let x = self.embed(ids)?;
        let (logits, mut acts) = self.forward_embeds(x, b, ids.len() / b, key_mask, bias, None)?;
        acts.ids = Some(ids.to_vec());
        Ok((logits, acts))
    }

    /// Forward from input embeddings x (B·T, C) (prompt embeddings, image tokens).  With
    /// `cache`, positions start at the cache length and the keys are appended to it.
    pub fn forward_embeds(
        &self,
        x: B::Buf,
        b: usize,
        t: usize,
        key_mask: Option<&[u8]>,
        bias: Option<&B::Buf>,
        mut cache: Option<&mut KvCache<B::Buf>>,
    ) -> Result<(B::Buf, LlamaActs<B::Buf>)> {
        let pos0 = self.begin_call("Llama::forward_embeds", &x, b, t, cache.as_deref_mut())?;
        let ctx = AttnCtx {
            b,
            t,
            pos0,
            bias,
            key_mask,
        };
        let mut x = Stream::Input(x);
        let mut layer_acts = Vec::with_capacity(self.layers.len());
        for (li, l) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[li]);
            let (input, prev) = x.normed(&self.be, &l.input_layernorm)?;
            layer_acts.extend(prev);
            let (m, acts) = self.block_forward(l, input, &ctx, kv)?;
            x = Stream::After(acts, m);
        }
        let ((x, hidden, rstd_f), prev) = x.normed(&self.be, &self.norm)?;
        layer_acts.extend(prev);
        let logits = self.head_forward(&hidden)?;
        Ok((
            logits,
            LlamaActs {
                b,
                t,
                pos0,
                ids: None,
                key_mask: key_mask.map(|m| m.to_vec()),
                bias: bias.cloned(),
                layers: layer_acts,
                x_last: x,
                rstd_f,
                hidden,
            },
        ))
    }

    /// The logits (B·m, V) and final hidden states (B·m, C) of the last `m` positions
    /// of each row of x (B·T, C), every position's keys and values written into
    /// `cache` as [`Self::forward_embeds`] writes them (`key_mask` and `bias` cover the
    /// cache and all T new keys, as there).  The positions before the tail are read
    /// with [`Attention::fill_cache`] in the last layer and no head: for a prompt whose
    /// last row alone predicts, that layer's queries, MLP and the vocabulary product
    /// run on one row instead of T.  The tail rows equal `forward_embeds`'s up to the
    /// rounding of smaller matrix products (`tests/nn_llama.rs`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_tail(
        &self,
        x: B::Buf,
        b: usize,
        t: usize,
        m: usize,
        key_mask: Option<&[u8]>,
        bias: Option<&B::Buf>,
        cache: &mut KvCache<B::Buf>,
    ) -> Result<(B::Buf, B::Buf)> {
        let be = &self.be;
        let c = self.cfg.hidden_size;
        if m == 0 || m > t {
            return Err(Error::arg(
                "Llama::forward_tail",
                format!("a tail of {m} positions of {t}"),
            ));
        }
        crate::error::check_len("Llama::forward_tail", "embeddings", be.len(&x), b * t * c)?;
        let head = t - m;
        let mut x = x;
        if head > 0 {
            let tk = cache.len() + t;
            // room for both reads at once: one move of the cache at most
            self.reserve_cache(cache, tk)?;
            let mask_h: Option<Vec<u8>> = match key_mask {
                Some(km) => {
                    crate::error::check_len("Llama::forward_tail", "key mask", km.len(), b * tk)?;
                    Some(km.chunks(tk).flat_map(|r| r[..tk - m].to_vec()).collect())
                }
                None => None,
            };
            let bias_h = match bias {
                Some(g) => {
                    crate::error::check_len("Llama::forward_tail", "bias", be.len(g), b * tk)?;
                    Some(self.rows_of(g, b, tk, 0, tk - m)?)
                }
                None => None,
            };
            let xh = self.rows_of(&x, b, t, 0, head)?;
            self.fill_cache(xh, b, head, mask_h.as_deref(), bias_h.as_ref(), cache)?;
            x = self.rows_of(&x, b, t, head, m)?;
        }
        let (logits, acts) = self.forward_embeds(x, b, m, key_mask, bias, Some(cache))?;
        Ok((logits, acts.hidden))
    }

    /// Writes the keys and values of x (B·T, C) into `cache` as
    /// [`Self::forward_embeds`] does, computing no more than they need: every layer but
    /// the last in full, the last up to its keys and values, no final norm or head.
    fn fill_cache(
        &self,
        x: B::Buf,
        b: usize,
        t: usize,
        key_mask: Option<&[u8]>,
        bias: Option<&B::Buf>,
        cache: &mut KvCache<B::Buf>,
    ) -> Result<()> {
        let pos0 = self.begin_call("Llama::fill_cache", &x, b, t, Some(&mut *cache))?;
        let ctx = AttnCtx {
            b,
            t,
            pos0,
            bias,
            key_mask,
        };
        let mut x = Stream::Input(x);
        let last = self.layers.len().saturating_sub(1);
        for (li, l) in self.layers.iter().enumerate() {
            let kv = &mut cache.layers[li];
            let ((xs, ln1, rstd1), _) = x.normed(&self.be, &l.input_layernorm)?;
            if li == last {
                return l.self_attn.fill_cache(&self.be, &ln1, &ctx, kv);
            }
            let (m, acts) = self.block_forward(l, (xs, ln1, rstd1), &ctx, Some(kv))?;
            x = Stream::After(acts, m);
        }
        Ok(())
    }

    /// The checks every forward makes (x is B·T·C, the cache is of batch B, the
    /// positions fit the context), then room in the cache: the first position.
    fn begin_call(
        &self,
        op: &'static str,
        x: &B::Buf,
        b: usize,
        t: usize,
        cache: Option<&mut KvCache<B::Buf>>,
    ) -> Result<usize> {
        let c = self.cfg.hidden_size;
        crate::error::check_len(op, "embeddings", self.be.len(x), b * t * c)?;
        let pos0 = cache.as_ref().map_or(0, |c| c.len());
        if let Some(cc) = &cache {
            if cc.b != b {
                return Err(Error::shape(
                    op,
                    format!("cache for batch {} used with batch {b}", cc.b),
                ));
            }
        }
        if pos0 + t > self.cfg.max_position_embeddings {
            return Err(Error::arg(
                op,
                format!(
                    "position {} beyond max_position_embeddings {}",
                    pos0 + t,
                    self.cfg.max_position_embeddings
                ),
            ));
        }
        if let Some(cc) = cache {
            self.reserve_cache(cc, pos0 + t)?;
        }
        Ok(pos0)
    }

    /// One decoder block on the residual stream x (B·T, C), given with its first norm:
    /// the MLP's output m (the stream after the block is xm + m, an add the next norm
    /// makes) and what its backward reads.
    fn block_forward(
        &self,
        l: &LlamaLayer<F, B>,
        (x, ln1, rstd1): Normed<B::Buf>,
        ctx: &AttnCtx<'_, B::Buf>,
        kv: Option<&mut LayerKv<B::Buf>>,
    ) -> Result<(B::Buf, LayerActs<B::Buf>)> {
        let be = &self.be;
        let (a, attn) = l.self_attn.forward(be, ln1, ctx, kv)?;
        let (xm, ln2, rstd2) = l.post_attention_layernorm.forward_added(be, &x, &a)?;
        let (m, mlp) = l.mlp.forward(be, ln2)?;
        Ok((
            m,
            LayerActs {
                x,
                rstd1,
                attn,
                xm,
                rstd2,
                mlp,
            },
        ))
    }

    /// Columns `[at, at + n)` of each of the B rows of a (B, T·W) buffer, W the width
    /// implied by its length: (B, n·W).
    fn rows_of(&self, a: &B::Buf, b: usize, t: usize, at: usize, n: usize) -> Result<B::Buf> {
        let be = &self.be;
        let w = be.len(a) / (b * t).max(1);
        let mut out = be.uninit(b * n * w);
        for r in 0..b {
            be.copy_range(&mut out, r * n * w, a, (r * t + at) * w, n * w)?;
        }
        Ok(out)
    }

    fn head_forward(&self, hidden: &B::Buf) -> Result<B::Buf> {
        match &self.lm_head {
            Some(h) => h.forward(&self.be, hidden),
            None => {
                let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
                let n = self.be.len(hidden) / c;
                self.be.matmul_new(
                    MatmulSpec {
                        m: n,
                        k: c,
                        n: v,
                        ta: false,
                        tb: true,
                    },
                    hidden,
                    &self.embed_tokens.weight.data,
                )
            }
        }
    }

    /// Backward from dlogits (B·T, V).  Parameter gradients accumulate into each
    /// trainable tensor's `grad`; returns the gradient of the input embeddings
    /// (B·T, C), which also flows into `embed_tokens` when the forward used ids.
    pub fn backward(&mut self, acts: &LlamaActs<B::Buf>, dlogits: &B::Buf) -> Result<B::Buf> {
        self.backward_with_hidden(acts, dlogits, None)
    }

    /// [`Llama::backward`] when the final hidden states (B·T, C) also feed another head
    /// (the segmentation codebook projection): its gradient `dhidden` joins the one
    /// coming back from the logits.
    pub fn backward_with_hidden(
        &mut self,
        acts: &LlamaActs<B::Buf>,
        dlogits: &B::Buf,
        dhidden_extra: Option<&B::Buf>,
    ) -> Result<B::Buf> {
        let be = self.be.clone();
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let n = acts.b * acts.t;
        crate::error::check_len("Llama::backward", "dlogits", be.len(dlogits), n * v)?;
        if acts.pos0 != 0 {
            return Err(Error::arg(
                "Llama::backward",
                format!(
                    "activations come from a KV-cache forward at position {}; train on a full forward",
                    acts.pos0
                ),
            ));
        }
        // forward: logits = hidden Wᵀ (W = lm_head or the tied embedding table)
        let dhidden = match &mut self.lm_head {
            Some(h) => h
                .backward(&be, &acts.hidden, dlogits, true)?
                .expect("dx requested"),
            None => {
                if let Some(dw) = &mut self.embed_tokens.weight.grad {
                    be.matmul(
                        MatmulSpec {
                            m: v,
                            k: n,
                            n: c,
                            ta: true,
                            tb: false,
                        },
                        dlogits,
                        &acts.hidden,
                        dw,
                        Accum::Add,
                    )?;
                }
                be.matmul_new(
                    MatmulSpec {
                        m: n,
                        k: v,
                        n: c,
                        ta: false,
                        tb: false,
                    },
                    dlogits,
                    &self.embed_tokens.weight.data,
                )?
            }
        };
        let mut dhidden = dhidden;
        if let Some(d) = dhidden_extra {
            crate::error::check_len("Llama::backward", "dhidden", be.len(d), n * c)?;
            be.axpy(&mut dhidden, F::one(), d)?;
        }
        // forward: hidden = norm(x_last)
        let mut dx = self
            .norm
            .backward(&be, &acts.x_last, &acts.rstd_f, &dhidden)?;
        let ctx = AttnCtx {
            b: acts.b,
            t: acts.t,
            pos0: 0,
            bias: acts.bias.as_ref(),
            key_mask: acts.key_mask.as_deref(),
        };
        for (l, la) in self.layers.iter_mut().zip(&acts.layers).rev() {
            // forward: xo = xm + mlp(norm2(xm))  so: dxm = dxo + (path through the MLP)
            let dln2 = l.mlp.backward(&be, &la.mlp, &dx)?;
            let dxm_mlp = l
                .post_attention_layernorm
                .backward(&be, &la.xm, &la.rstd2, &dln2)?;
            be.axpy(&mut dx, F::one(), &dxm_mlp)?;
            // forward: xm = x + attn(norm1(x))  so: dx_in = dxm + (path through attention)
            let (dln1, _) = l.self_attn.backward(&be, &la.attn, &ctx, &dx, false)?;
            let dx_attn = l.input_layernorm.backward(&be, &la.x, &la.rstd1, &dln1)?;
            be.axpy(&mut dx, F::one(), &dx_attn)?;
        }
        if let Some(ids) = &acts.ids {
            self.embed_tokens.backward(&be, ids, &dx)?;
        }
        Ok(dx)
    }
}
