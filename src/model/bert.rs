//! BERT encoder (`BertModel`): word + absolute position + token-type embeddings and a
//! LayerNorm, post-LN blocks (`x = LN(x + attn(x))`, `x = LN(x + mlp(x))`) with a key
//! padding mask, and the pooler `tanh(dense(x[:, 0]))`.  Mean pooling over the unmasked
//! tokens gives sentence-transformers' embeddings (all-MiniLM-L6-v2 for `Lti`, Eq. 8).
//!
//! B batch, T tokens, C hidden size, V vocabulary, I intermediate size.
use super::config::BertConfig;
use super::io::StDtype;
use super::weights::{save_params, Checkpoint};
use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use crate::nn::{Attention, AttnCtx, Embedding, LayerNorm, Linear, Mlp, Tensor};
use num_traits::Float;
use std::path::Path;

/// Tensor name prefixes: bare (`BertModel`, sentence-transformers) or `bert.` (a
/// `BertFor…` head model's encoder).
pub const BERT_PREFIXES: &[&str] = &["", "bert."];
/// A tensor every BERT checkpoint has, to find the prefix by.
pub const BERT_MARKER: &str = "embeddings.word_embeddings.weight";

/// One post-LN block.  HF names: `attention.self.{query,key,value}`,
/// `attention.output.{dense,LayerNorm}`, `intermediate.dense`, `output.{dense,LayerNorm}`.
#[derive(Clone, Debug)]
pub struct BertLayer<F: Float = f32, B: Backend<F> = Cpu> {
    /// Bidirectional self-attention with biases (`attention.self.*`, o = `attention.output.dense`).
    pub attention: Attention<F, B>,
    /// `attention.output.LayerNorm`, applied to `x + attn(x)`.
    pub attention_norm: LayerNorm<F, B>,
    /// fc1 = `intermediate.dense`, fc2 = `output.dense`
    pub mlp: Mlp<F, B>,
    /// `output.LayerNorm`, applied to `h + mlp(h)`.
    pub output_norm: LayerNorm<F, B>,
}

/// `BertModel`.
#[derive(Clone, Debug)]
pub struct Bert<F: Float = f32, B: Backend<F> = Cpu> {
    /// Sizes and hyper-parameters (HF `config.json`).
    pub cfg: BertConfig,
    /// Backend that holds the weights and runs the forward pass.
    pub be: B,
    /// Prefix of the tensor names in the checkpoint it came from (empty or `bert.`);
    /// [`Bert::save_weights`] writes the same names.
    pub prefix: String,
    /// Token embeddings, (V, C).
    pub word_embeddings: Embedding<F, B>,
    /// Absolute position embeddings, (`max_position_embeddings`, C).
    pub position_embeddings: Embedding<F, B>,
    /// Segment embeddings, (`type_vocab_size`, C); type 0 when none are given.
    pub token_type_embeddings: Embedding<F, B>,
    /// `embeddings.LayerNorm`, applied to the summed embeddings.
    pub embeddings_norm: LayerNorm<F, B>,
    /// `encoder.layer.{i}`, `num_hidden_layers` of them.
    pub layers: Vec<BertLayer<F, B>>,
    /// `pooler.dense`; None for checkpoints saved without a pooler.
    pub pooler: Option<Linear<F, B>>,
}

/// Outputs of [`Bert::forward`].
#[derive(Clone, Debug)]
pub struct BertOutput<Buf> {
    /// (B, T, C)
    pub last_hidden_state: Buf,
    /// (B, C), None without a pooler
    pub pooler_output: Option<Buf>,
}

impl<F: Float, B: Backend<F>> Bert<F, B> {
    /// Zero-initialised (norms at 1/0), trainable; `pooler` chooses whether the model has
    /// `pooler.dense`.
    pub fn new(be: B, cfg: BertConfig, pooler: bool) -> Self {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps as f32);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| BertLayer {
                attention: Attention::new(
                    &be,
                    c,
                    cfg.num_attention_heads,
                    cfg.num_attention_heads,
                    cfg.head_dim(),
                    true,
                    None,
                    false,
                ),
                attention_norm: LayerNorm::new(&be, c, eps),
                mlp: Mlp::new(&be, c, cfg.intermediate_size, cfg.hidden_act.into(), true),
                output_norm: LayerNorm::new(&be, c, eps),
            })
            .collect();
        Bert {
            word_embeddings: Embedding::new(&be, cfg.vocab_size, c),
            position_embeddings: Embedding::new(&be, cfg.max_position_embeddings, c),
            token_type_embeddings: Embedding::new(&be, cfg.type_vocab_size, c),
            embeddings_norm: LayerNorm::new(&be, c, eps),
            layers,
            pooler: pooler.then(|| Linear::new(&be, c, c, true)),
            cfg,
            be,
            prefix: String::new(),
        }
    }

    /// Every parameter with its HF name (without a `bert.` prefix), in a fixed order.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor<F, B>)> {
        fn lin<'a, F: Float, B: Backend<F>>(
            out: &mut Vec<(String, &'a mut Tensor<F, B>)>,
            name: String,
            l: &'a mut Linear<F, B>,
        ) {
            out.push((format!("{name}.weight"), &mut l.weight));
            if let Some(b) = &mut l.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        fn ln<'a, F: Float, B: Backend<F>>(
            out: &mut Vec<(String, &'a mut Tensor<F, B>)>,
            name: String,
            l: &'a mut LayerNorm<F, B>,
        ) {
            out.push((format!("{name}.weight"), &mut l.weight));
            out.push((format!("{name}.bias"), &mut l.bias));
        }
        let mut out: Vec<(String, &mut Tensor<F, B>)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                &mut self.word_embeddings.weight,
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                &mut self.position_embeddings.weight,
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                &mut self.token_type_embeddings.weight,
            ),
        ];
        ln(
            &mut out,
            "embeddings.LayerNorm".into(),
            &mut self.embeddings_norm,
        );
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            let a = &mut l.attention;
            lin(&mut out, format!("{p}.attention.self.query"), &mut a.q);
            lin(&mut out, format!("{p}.attention.self.key"), &mut a.k);
            lin(&mut out, format!("{p}.attention.self.value"), &mut a.v);
            lin(&mut out, format!("{p}.attention.output.dense"), &mut a.o);
            ln(
                &mut out,
                format!("{p}.attention.output.LayerNorm"),
                &mut l.attention_norm,
            );
            lin(&mut out, format!("{p}.intermediate.dense"), &mut l.mlp.fc1);
            lin(&mut out, format!("{p}.output.dense"), &mut l.mlp.fc2);
            ln(
                &mut out,
                format!("{p}.output.LayerNorm"),
                &mut l.output_norm,
            );
        }
        if let Some(p) = &mut self.pooler {
            lin(&mut out, "pooler.dense".into(), p);
        }
        out
    }

    /// Freeze (`false`) or unfreeze every parameter.
    pub fn set_trainable(&mut self, trainable: bool) {
        let be = self.be.clone();
        for (_, t) in self.params_mut() {
            t.set_trainable(&be, trainable);
        }
    }

    /// A frozen model filled from `ck` (prefix found automatically); the pooler is
    /// loaded when the checkpoint has one.
    pub fn load(be: B, cfg: BertConfig, ck: &Checkpoint) -> Result<Self> {
        let prefix = ck.find_prefix(BERT_PREFIXES, BERT_MARKER)?;
        let pooler = ck.contains(&format!("{prefix}pooler.dense.weight"));
        let mut m = Self::new(be.clone(), cfg, pooler);
        m.set_trainable(false);
        ck.load_params(&be, m.params_mut(), |n| format!("{prefix}{n}"))?;
        m.prefix = prefix;
        Ok(m)
    }

    /// Writes every parameter to one safetensors file, named `prefix + HF name`.
    pub fn save_weights(&mut self, path: impl AsRef<Path>, dtype: StDtype) -> Result<()> {
        let (be, prefix) = (self.be.clone(), self.prefix.clone());
        let params: Vec<(String, &Tensor<F, B>)> = self
            .params_mut()
            .into_iter()
            .map(|(n, t)| (n, &*t))
            .collect();
        save_params(&be, path, params, |n| format!("{prefix}{n}"), dtype)
    }

    /// ids (B·T) with optional token types (B·T) and key mask (B, T: 1 = token,
    /// 0 = padding) → hidden states and pooled output.  A row whose mask is all zero is
    /// an error (HF would attend uniformly over padding; nothing sensible comes of it).
    pub fn forward(
        &self,
        ids: &[u32],
        token_types: Option<&[u32]>,
        b: usize,
        key_mask: Option<&[u8]>,
    ) -> Result<BertOutput<B::Buf>> {
        let be = &self.be;
        let cfg = &self.cfg;
        let c = cfg.hidden_size;
        if b == 0 || ids.is_empty() || !ids.len().is_multiple_of(b) {
            return Err(Error::shape(
                "Bert::forward",
                format!("{} ids do not split into {b} non-empty rows", ids.len()),
            ));
        }
        let t = ids.len() / b;
        if t > cfg.max_position_embeddings {
            return Err(Error::arg(
                "Bert::forward",
                format!(
                    "a sequence of {t} tokens is longer than the position table \
                     (max_position_embeddings = {})",
                    cfg.max_position_embeddings
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::arg(
                "Bert::forward",
                format!(
                    "token id {bad} is outside the vocabulary (vocab_size = {})",
                    cfg.vocab_size
                ),
            ));
        }
        let zeros;
        let types = match token_types {
            Some(tt) => {
                crate::error::check_len("Bert::forward", "token_type_ids", tt.len(), ids.len())?;
                if let Some(&bad) = tt.iter().find(|&&i| i as usize >= cfg.type_vocab_size) {
                    return Err(Error::arg(
                        "Bert::forward",
                        format!(
                            "token type {bad} is outside type_vocab_size = {}",
                            cfg.type_vocab_size
                        ),
                    ));
                }
                tt
            }
            None => {
                zeros = vec![0u32; ids.len()];
                &zeros[..]
            }
        };
        if let Some(m) = key_mask {
            crate::error::check_len("Bert::forward", "attention mask", m.len(), ids.len())?;
            if let Some(row) = m.chunks(t).position(|r| r.iter().all(|&x| x == 0)) {
                return Err(Error::arg(
                    "Bert::forward",
                    format!("attention mask row {row} masks every token"),
                ));
            }
        }
        // embeddings: word[ids] + position[0..T] + type[types], then LayerNorm
        let mut x = self.word_embeddings.forward(be, ids)?;
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        let pos = self.position_embeddings.forward(be, &positions)?;
        let typ = self.token_type_embeddings.forward(be, types)?;
        be.add_into(&mut x, &[&pos, &typ])?;
        let (mut x, _) = self.embeddings_norm.forward(be, &x)?;
        let ctx = AttnCtx {
            b,
            t,
            pos0: 0,
            bias: None,
            key_mask,
        };
        for l in &self.layers {
            // post-LN: x = LN(x + attn(x)); x = LN(x + mlp(x)), each add and its norm
            // one op (a layer keeps its input: the residual reads it there)
            let (a, aa) = l.attention.forward(be, x, &ctx, None)?;
            let (_, h, _) = l.attention_norm.forward_added(be, &a, &aa.x)?;
            let (m, ma) = l.mlp.forward(be, h)?;
            x = l.output_norm.forward_added(be, &m, &ma.x)?.1;
        }
        let pooler_output = match &self.pooler {
            Some(p) => {
                let mut cls = be.zeros(b * c);
                for bi in 0..b {
                    be.copy_range(&mut cls, bi * c, &x, bi * t * c, c)?;
                }
                let y = p.forward(be, &cls)?;
                // tanh has no backend op (nothing trains the pooler here): host side.
                let y: Vec<F> = be.to_vec(&y).iter().map(|v| v.tanh()).collect();
                Some(be.from_slice(&y))
            }
            None => None,
        };
        Ok(BertOutput {
            last_hidden_state: x,
            pooler_output,
        })
    }

    /// Mean-pooled sentence embeddings (B, C), optionally L2-normalised (what
    /// sentence-transformers' all-MiniLM-L6-v2 returns with its Normalize module).
    pub fn sentence_embeddings(
        &self,
        ids: &[u32],
        b: usize,
        key_mask: Option<&[u8]>,
        normalize: bool,
    ) -> Result<Vec<F>> {
        let out = self.forward(ids, None, b, key_mask)?;
        let h = self.be.to_vec(&out.last_hidden_state);
        let mut e = mean_pool(&h, b, ids.len() / b, self.cfg.hidden_size, key_mask)?;
        if normalize {
            l2_normalize_rows(&mut e, self.cfg.hidden_size);
        }
        Ok(e)
    }
}

/// sentence-transformers' mean pooling: hidden (B, T, C), mask (B, T) → (B, C), the sum
/// of the unmasked rows over their count (all rows without a mask).
pub fn mean_pool<F: Float>(
    hidden: &[F],
    b: usize,
    t: usize,
    c: usize,
    mask: Option<&[u8]>,
) -> Result<Vec<F>> {
    crate::error::check_len("mean_pool", "hidden", hidden.len(), b * t * c)?;
    if let Some(m) = mask {
        crate::error::check_len("mean_pool", "mask", m.len(), b * t)?;
    }
    let mut out = vec![F::zero(); b * c];
    for bi in 0..b {
        let mut count = 0usize;
        for ti in 0..t {
            if mask.is_some_and(|m| m[bi * t + ti] == 0) {
                continue;
            }
            count += 1;
            let row = &hidden[(bi * t + ti) * c..][..c];
            out[bi * c..][..c]
                .iter_mut()
                .zip(row)
                .for_each(|(o, &x)| *o = *o + x);
        }
        // sentence-transformers clamps the count at 1e-9; an empty row stays zero.
        let inv = F::one() / F::from(count.max(1)).expect("count fits a float");
        out[bi * c..][..c].iter_mut().for_each(|o| *o = *o * inv);
    }
    Ok(out)
}

/// Each row of `x` (rows of `c`) divided by its L2 norm (torch's `normalize`, eps 1e-12).
pub fn l2_normalize_rows<F: Float>(x: &mut [F], c: usize) {
    let eps = F::from(1e-12).expect("small constant fits a float");
    for row in x.chunks_mut(c.max(1)) {
        let n = row
            .iter()
            .fold(F::zero(), |a, &v| a + v * v)
            .sqrt()
            .max(eps);
        row.iter_mut().for_each(|v| *v = *v / n);
    }
}
