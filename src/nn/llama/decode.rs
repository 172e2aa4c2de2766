//! Decoding: the KV cache (made, grown, cut back, its rows selected) and sampling with
//! it, one prompt or several at once (the shorter padded on the left).
use super::Llama;
use crate::backend::{Backend, RowCopy, TimeCopy};
use crate::error::{Error, Result};
use crate::nn::attention::LayerKv;
use crate::nn::sample::{sample_token, Rng, SamplingCfg};
use num_traits::Float;

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

/// Prompts of different lengths as one batch of the longest's length `t`: each padded
/// on the left with its first id (`ids`, B·t), `pads[r]` pads before row r's prompt.
/// [`LeftPadded::bias`] hides the pads from every query.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LeftPadded {
    pub ids: Vec<u32>,
    pub t: usize,
    pub pads: Vec<usize>,
}

impl LeftPadded {
    /// `prompts`, none of them empty (an error names `op`).
    pub(crate) fn new<'a>(
        op: &'static str,
        prompts: impl Iterator<Item = &'a [u32]> + Clone,
    ) -> Result<Self> {
        let t = prompts.clone().map(<[u32]>::len).max().unwrap_or(0);
        let mut ids = Vec::new();
        let mut pads = Vec::new();
        for p in prompts {
            let Some(&first) = p.first() else {
                return Err(Error::arg(op, "an empty prompt"));
            };
            ids.extend(std::iter::repeat_n(first, t - p.len()));
            ids.extend_from_slice(p);
            pads.push(t - p.len());
        }
        if pads.is_empty() {
            return Err(Error::arg(op, "no prompts"));
        }
        Ok(LeftPadded { ids, t, pads })
    }

    /// Per row, the key bias of its t positions: −inf on its pads, 0 after; None when
    /// no row is padded.  A decode step grows each row by 0 for its new key.
    pub(crate) fn bias(&self) -> Option<Vec<Vec<f32>>> {
        self.pads.iter().any(|&p| p > 0).then(|| {
            self.pads
                .iter()
                .map(|&p| {
                    let mut row = vec![f32::NEG_INFINITY; p];
                    row.resize(self.t, 0.0);
                    row
                })
                .collect()
        })
    }
}

/// Per-row key biases (each row as long as the keys) as one (B, Tk) buffer.
pub(crate) fn bias_rows<F: Float, B: Backend<F>>(be: &B, rows: &[Vec<f32>]) -> B::Buf {
    let f: Vec<F> = rows
        .iter()
        .flatten()
        .map(|&x| F::from(x).unwrap_or_else(F::nan))
        .collect();
    be.from_slice(&f)
}

impl<F: Float, B: Backend<F>> Llama<F, B> {
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
    /// (1, NKV, cap, HS) block of a row is copied; the capacity is kept.  Rows that
    /// follow each other, or repeat one row, are copied in one op ([`RowCopy::from_rows`]).
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
        // every layer's rows are n values long: one set of runs for them all
        let n = c.layers.first().map_or(0, |l| be.len(&l.k) / c.b);
        let runs = RowCopy::from_rows(rows.iter().copied().enumerate(), n);
        let layers = c
            .layers
            .iter()
            .map(|l| {
                crate::error::check_len("Llama::select_cache_rows", "keys", be.len(&l.k), c.b * n)?;
                let (mut kk, mut vv) = (be.uninit(rows.len() * n), be.uninit(rows.len() * n));
                for &run in &runs {
                    be.copy_rows(&mut kk, &l.k, run)?;
                    be.copy_rows(&mut vv, &l.v, run)?;
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

    /// Sample from several prompts at once (POPEN's K answers to one question are K
    /// copies of the prompt).  Row r draws from its own stream seeded `cfg.seed + r`, so
    /// row 0 reproduces [`Llama::generate`] with the same config.  A row stops after
    /// `eos`; the batch stops when every row has, or when the longest prompt and what
    /// follows it fill the context.
    ///
    /// Prompts shorter than the longest are padded on the left (with their first id) and
    /// the pads hidden from every query by a key bias of −inf.  A padded row's positions
    /// are shifted by its padding, which RoPE's scores do not see (they depend on the
    /// distance between positions alone): each row is what [`Llama::generate`] gives
    /// it, up to rounding (`tests/nn_llama.rs`).
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        cfg: &SamplingCfg,
        eos: Option<u32>,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        let b = prompts.len();
        let padded = LeftPadded::new("Llama::generate_batch", prompts.iter().map(Vec::as_slice))?;
        let t = padded.t;
        let v = self.cfg.vocab_size;
        let mut rngs: Vec<Rng> = (0..b as u64)
            .map(|r| Rng::new(cfg.seed.wrapping_add(r)))
            .collect();
        let mut cache = self.new_cache(b);
        // per row, the bias of every key so far: −inf on its pads (None: no pads)
        let mut bias = padded.bias();
        let g = bias.as_ref().map(|rows| bias_rows(&self.be, rows));
        let mut logits = self.forward_cached(&padded.ids, &mut cache, None, g.as_ref())?;
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
            if let Some(rows) = &mut bias {
                rows.iter_mut().for_each(|row| row.push(0.0));
            }
            let g = bias.as_ref().map(|rows| bias_rows(&self.be, rows));
            logits = self.forward_cached(&next, &mut cache, None, g.as_ref())?;
            rows_t = 1;
        }
        Ok(out)
    }
}
