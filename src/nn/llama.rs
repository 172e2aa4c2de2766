//! LLaMA (`LlamaForCausalLM`): RMSNorm, RoPE (HF rotate_half), SwiGLU, GQA, tied or
//! untied head; training forward/backward, KV-cache decoding and sampling.
//!
//! Parameters carry Hugging Face names (`model.layers.0.self_attn.q_proj.weight`) and
//! HF shapes (`[out, in]` for Linear) so a loader fills them by name; see
//! [`Llama::params_mut`].
//!
//! B batch, T tokens, C hidden size, N = B·T, V vocabulary, I intermediate size.
use super::layers::{AttnActs, AttnCtx, LayerKv, SwiGluActs};
use super::sample::{sample_token, Rng, SamplingCfg};
use super::{randn, Attention, Embedding, Linear, RmsNorm, SwiGluMlp, Tensor};
use crate::backend::{Accum, Backend, Cpu, MatmulSpec, TimeCopy};
use crate::error::{Error, Result};
use num_traits::Float;
use serde::{Deserialize, Serialize};

/// HF's default `initializer_range`: weights start as N(0, 0.02²).
const INIT_STD: f64 = 0.02;

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

/// What one block's forward saves for its backward.
#[derive(Clone, Debug)]
pub struct LayerActs<Buf> {
    /// residual stream entering the block (N,C)
    pub x: Buf,
    /// `input_layernorm(x)` (N,C)
    pub ln1: Buf,
    /// its rstd (N)
    pub rstd1: Buf,
    /// what the attention saved
    pub attn: AttnActs<Buf>,
    /// residual after attention (N,C)
    pub xm: Buf,
    /// `post_attention_layernorm(xm)` (N,C)
    pub ln2: Buf,
    /// its rstd (N)
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

/// Keys and values of every layer seen so far (batch B).
#[derive(Clone, Debug)]
pub struct KvCache<Buf> {
    /// Batch B the cache was made for; a forward with another batch is an error.
    pub b: usize,
    /// One key/value cache per decoder block.
    pub layers: Vec<LayerKv<Buf>>,
}

impl<Buf> KvCache<Buf> {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }
    /// Positions the cache holds before it must grow.
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |l| l.cap)
    }
    /// No position cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

    /// The Linear layers: every block's projections, then the head.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear<F, B>> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                let (a, m) = (&mut l.self_attn, &mut l.mlp);
                [
                    &mut a.q,
                    &mut a.k,
                    &mut a.v,
                    &mut a.o,
                    &mut m.gate,
                    &mut m.up,
                    &mut m.down,
                ]
            })
            .chain(self.lm_head.as_mut())
    }

    /// Packs every frozen Linear ([`Linear::pack`]) for faster products on a backend
    /// that prefers it; the trainable ones are left as they are.  Returns how many it
    /// packed.  [`Llama::params_mut`] (so saving, loading and freezing) unpacks them
    /// again: call this once the weights are final, before reading with them.
    pub fn pack_frozen(&mut self) -> Result<usize> {
        let be = self.be.clone();
        let mut packed = 0;
        for l in self.linears_mut() {
            if l.weight.grad.is_none() && l.pack(&be)? {
                packed += 1;
            }
        }
        Ok(packed)
    }

    /// Moves every packed Linear's values back into its `weight.data`.
    pub fn unpack(&mut self) {
        let be = self.be.clone();
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
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &mut l.input_layernorm.weight,
            ));
            out.push((
                format!("{p}.self_attn.q_proj.weight"),
                &mut l.self_attn.q.weight,
            ));
            out.push((
                format!("{p}.self_attn.k_proj.weight"),
                &mut l.self_attn.k.weight,
            ));
            out.push((
                format!("{p}.self_attn.v_proj.weight"),
                &mut l.self_attn.v.weight,
            ));
            out.push((
                format!("{p}.self_attn.o_proj.weight"),
                &mut l.self_attn.o.weight,
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &mut l.post_attention_layernorm.weight,
            ));
            out.push((format!("{p}.mlp.gate_proj.weight"), &mut l.mlp.gate.weight));
            out.push((format!("{p}.mlp.up_proj.weight"), &mut l.mlp.up.weight));
            out.push((format!("{p}.mlp.down_proj.weight"), &mut l.mlp.down.weight));
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
        for (_, t) in self.params_mut() {
            t.zero_grad(&be);
        }
    }

    /// An empty KV cache for batch `b`, with room for nothing yet: a forward through it
    /// grows it ([`Llama::reserve_cache`]); reserve first when the length is known.
    pub fn new_cache(&self, b: usize) -> KvCache<B::Buf> {
        KvCache {
            b,
            layers: (0..self.cfg.num_hidden_layers)
                .map(|_| LayerKv {
                    k: self.be.zeros(0),
                    v: self.be.zeros(0),
                    len: 0,
                    cap: 0,
                })
                .collect(),
        }
    }

    /// Makes room for `positions` in all (cached ones included).  A cache that must grow
    /// takes at least twice its capacity (up to `max_position_embeddings`), so a decode
    /// of n tokens moves the cache O(log n) times, not n times.
    pub fn reserve_cache(&self, c: &mut KvCache<B::Buf>, positions: usize) -> Result<()> {
        let max = self.cfg.max_position_embeddings;
        if positions > max {
            return Err(Error::arg(
                "Llama::reserve_cache",
                format!("{positions} positions beyond max_position_embeddings {max}"),
            ));
        }
        if positions <= c.capacity() {
            return Ok(());
        }
        let cap = positions.max((2 * c.capacity()).min(max));
        let (nkv, hs) = (self.cfg.n_kv_heads(), self.cfg.head_dim());
        let be = &self.be;
        for l in &mut c.layers {
            let keep = TimeCopy {
                bh: c.b * nkv,
                hs,
                dst_t: cap,
                dst_at: 0,
                src_t: l.cap,
                src_at: 0,
                n: l.len,
            };
            for buf in [&mut l.k, &mut l.v] {
                let mut grown = be.zeros(c.b * nkv * cap * hs);
                be.copy_time(&mut grown, buf, keep)?;
                *buf = grown;
            }
            l.cap = cap;
        }
        Ok(())
    }

    /// The cache of rows `rows` of `c`, in that order (a row may repeat): rows that
    /// finish leave a batched decode, a shared prefix is repeated.  Each layer's
    /// (1, NKV, cap, HS) block of a row is copied; the capacity is kept.
    pub fn select_cache_rows(
        &self,
        c: &KvCache<B::Buf>,
        rows: &[usize],
    ) -> Result<KvCache<B::Buf>> {
        if rows.is_empty() {
            return Err(Error::shape(
                "Llama::select_cache_rows",
                format!("no rows selected from a cache of batch {}", c.b),
            ));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= c.b) {
            return Err(Error::shape(
                "Llama::select_cache_rows",
                format!("row {r} of a cache of batch {}", c.b),
            ));
        }
        let be = &self.be;
        let layers = c
            .layers
            .iter()
            .map(|l| {
                let n = be.len(&l.k) / c.b;
                let (mut kk, mut vv) = (be.zeros(rows.len() * n), be.zeros(rows.len() * n));
                for (i, &r) in rows.iter().enumerate() {
                    be.copy_range(&mut kk, i * n, &l.k, r * n, n)?;
                    be.copy_range(&mut vv, i * n, &l.v, r * n, n)?;
                }
                Ok(LayerKv {
                    k: kk,
                    v: vv,
                    len: l.len,
                    cap: l.cap,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            b: rows.len(),
            layers,
        })
    }

    /// Cuts the cache back to its first `len` positions (a rejected draft's keys): the
    /// rows past `len` are left where they are, to be overwritten.
    pub fn truncate_cache(&self, c: &mut KvCache<B::Buf>, len: usize) -> Result<()> {
        let old = c.len();
        if len > old {
            return Err(Error::shape(
                "Llama::truncate_cache",
                format!("{len} positions kept of a cache of {old}"),
            ));
        }
        for l in &mut c.layers {
            l.len = len;
        }
        Ok(())
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
        let mut x = x;
        let mut layer_acts = Vec::with_capacity(self.layers.len());
        for (li, l) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[li]);
            let (xo, acts) = self.block_forward(l, x, &ctx, kv)?;
            layer_acts.push(acts);
            x = xo;
        }
        let (hidden, rstd_f) = self.norm.forward(&self.be, &x)?;
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
        let mut x = x;
        let last = self.layers.len().saturating_sub(1);
        for (li, l) in self.layers.iter().enumerate() {
            let kv = &mut cache.layers[li];
            if li < last {
                x = self.block_forward(l, x, &ctx, Some(kv))?.0;
            } else {
                let (ln1, _) = l.input_layernorm.forward(&self.be, &x)?;
                l.self_attn.fill_cache(&self.be, &ln1, &ctx, kv)?;
            }
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

    /// One decoder block on the residual stream x (B·T, C): the stream after it and
    /// what its backward reads.
    fn block_forward(
        &self,
        l: &LlamaLayer<F, B>,
        x: B::Buf,
        ctx: &AttnCtx<'_, B::Buf>,
        kv: Option<&mut LayerKv<B::Buf>>,
    ) -> Result<(B::Buf, LayerActs<B::Buf>)> {
        let be = &self.be;
        let (ln1, rstd1) = l.input_layernorm.forward(be, &x)?;
        let (a, attn) = l.self_attn.forward(be, &ln1, ctx, kv)?;
        let mut xm = x.clone();
        be.axpy(&mut xm, F::one(), &a)?;
        let (ln2, rstd2) = l.post_attention_layernorm.forward(be, &xm)?;
        let (m, mlp) = l.mlp.forward(be, &ln2)?;
        let mut xo = xm.clone();
        be.axpy(&mut xo, F::one(), &m)?;
        Ok((
            xo,
            LayerActs {
                x,
                ln1,
                rstd1,
                attn,
                xm,
                ln2,
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
        let mut out = be.zeros(b * n * w);
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

impl<F: Float, B: Backend<F>> Llama<F, B> {
    /// Feed `t` new tokens per row (B·t ids) through the cache; returns their logits
    /// (B·t, V).  `key_mask` and `bias`, when given, cover all cache + new keys (B, Tk).
    pub fn forward_cached(
        &self,
        ids: &[u32],
        cache: &mut KvCache<B::Buf>,
        key_mask: Option<&[u8]>,
        bias: Option<&B::Buf>,
    ) -> Result<B::Buf> {
        let b = cache.b;
        if b == 0 || !ids.len().is_multiple_of(b) {
            return Err(Error::shape(
                "Llama::forward_cached",
                format!("{} ids do not split into {b} rows", ids.len()),
            ));
        }
        let x = self.embed(ids)?;
        let (logits, _) = self.forward_embeds(x, b, ids.len() / b, key_mask, bias, Some(cache))?;
        Ok(logits)
    }

    /// Sample up to `max_new` tokens after `prompt` (batch 1) with the KV cache; stops
    /// after `eos` when given.  Returns each new token with its log-probability under
    /// the model (log_softmax of the logits).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        cfg: &SamplingCfg,
        eos: Option<u32>,
    ) -> Result<Vec<(u32, f32)>> {
        if prompt.is_empty() {
            return Err(Error::arg("Llama::generate", "empty prompt"));
        }
        let v = self.cfg.vocab_size;
        let mut rng = Rng::new(cfg.seed);
        let mut cache = self.new_cache(1);
        let mut logits = self.forward_cached(prompt, &mut cache, None, None)?;
        let mut out = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let all = self.be.to_vec(&logits);
            let last: Vec<f32> = all[all.len() - v..]
                .iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect();
            let (tok, lp) = sample_token(&last, cfg, &mut rng)?;
            out.push((tok, lp));
            if Some(tok) == eos || cache.len() + 1 > self.cfg.max_position_embeddings {
                break;
            }
            logits = self.forward_cached(&[tok], &mut cache, None, None)?;
        }
        Ok(out)
    }

    /// Sample from several prompts of equal length at once (POPEN's K answers to one
    /// question are K copies of the prompt).  Row r draws from its own stream seeded
    /// `cfg.seed + r`, so row 0 reproduces [`Llama::generate`] with the same config.
    /// A row stops after `eos`; the batch stops when every row has.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        cfg: &SamplingCfg,
        eos: Option<u32>,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        let b = prompts.len();
        let t = prompts.first().map_or(0, |p| p.len());
        if b == 0 || t == 0 {
            return Err(Error::arg(
                "Llama::generate_batch",
                "no prompts, or an empty prompt",
            ));
        }
        if let Some(r) = prompts.iter().position(|p| p.len() != t) {
            return Err(Error::shape(
                "Llama::generate_batch",
                format!(
                    "prompt {r} has {} tokens, prompt 0 has {t}: lengths must match",
                    prompts[r].len()
                ),
            ));
        }
        let v = self.cfg.vocab_size;
        let mut rngs: Vec<Rng> = (0..b as u64)
            .map(|r| Rng::new(cfg.seed.wrapping_add(r)))
            .collect();
        let mut cache = self.new_cache(b);
        let flat: Vec<u32> = prompts.concat();
        let mut logits = self.forward_cached(&flat, &mut cache, None, None)?;
        let mut rows_t = t; // tokens per row in `logits`
        let mut out = vec![Vec::with_capacity(max_new); b];
        let mut done = vec![false; b];
        for _ in 0..max_new {
            let all = self.be.to_vec(&logits);
            let mut next = Vec::with_capacity(b);
            for r in 0..b {
                let row = &all[((r + 1) * rows_t - 1) * v..][..v];
                let last: Vec<f32> = row.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect();
                let (tok, lp) = sample_token(&last, cfg, &mut rngs[r])?;
                if !done[r] {
                    out[r].push((tok, lp));
                    done[r] = Some(tok) == eos;
                }
                next.push(tok);
            }
            if done.iter().all(|&d| d) || cache.len() + 1 > self.cfg.max_position_embeddings {
                break;
            }
            logits = self.forward_cached(&next, &mut cache, None, None)?;
            rows_t = 1;
        }
        Ok(out)
    }
}
