//! Multi-head attention with GQA, RoPE, a per-key bias and a KV cache: forward, then
//! its backward right below (the gradient rule in [`crate::nn`]).
//!
//! B batch, T tokens, C channels, NH heads, NKV kv heads, HS head size.
use super::layers::Linear;
use crate::backend::{AttnLayout, AttnShape, Backend, Cols, KvAppend};
use crate::error::{Error, Result};
use num_traits::Float;

/// Multi-head attention with GQA, optional RoPE, causal or bidirectional, a per-key
/// bias γ and a padding mask.  Projections are named after HF LLaMA (q, k, v, o);
/// CLIP's `out_proj` and BERT's `output.dense` map onto `o`.
#[derive(Clone, Debug)]
pub struct Attention<F: Float = f32, B: Backend<F> = crate::backend::Cpu> {
    /// C → NH·HS.
    pub q: Linear<F, B>,
    /// C → NKV·HS.
    pub k: Linear<F, B>,
    /// C → NKV·HS.
    pub v: Linear<F, B>,
    /// NH·HS → C.
    pub o: Linear<F, B>,
    /// Query heads NH.
    pub nh: usize,
    /// Key/value heads NKV; each serves NH/NKV query heads (GQA).
    pub nkv: usize,
    /// Head size HS.
    pub hs: usize,
    /// RoPE base (LLaMA) or None (learned absolute positions: CLIP, BERT).
    pub rope_theta: Option<f32>,
    /// Each query attends only to keys at its position or before.
    pub causal: bool,
    /// q, k and v as one product while fused ([`Attention::fuse`]): W `[q; k; v]`
    /// (NH·HS + 2·NKV·HS rows), their weights empty meanwhile.
    pub(crate) fused: Option<Linear<F, B>>,
}

/// One call's q, k and v projections (B·T rows each): apart, or the columns of one
/// fused product (`[q | k | v]` per row).
enum Projected<Buf> {
    /// Each in a buffer of its own (None: not formed, or read in place already).
    Apart([Option<Buf>; 3]),
    Fused(Buf),
}

/// Per-call context of an attention forward.
#[derive(Clone, Copy, Debug)]
pub struct AttnCtx<'a, Buf> {
    /// Batch B.
    pub b: usize,
    /// New tokens T per sequence (the queries of this call).
    pub t: usize,
    /// Position of the first query (the KV-cache length when decoding).
    pub pos0: usize,
    /// Per-key additive bias γ (B, Tk).
    pub bias: Option<&'a Buf>,
    /// Padding mask over keys (B, Tk), 1 = attend, 0 = padding.
    pub key_mask: Option<&'a [u8]>,
}

/// Saved activations of an [`Attention`] forward.  An operand that attention read in
/// place is the projection's output as it was written, token-major (B·T, H·HS); the
/// others are split into heads (B,H,T,HS) (`layout` says which).
#[derive(Clone, Debug)]
pub struct AttnActs<Buf> {
    /// Input x (B·T, C).
    pub x: Buf,
    /// queries (after RoPE when rotated)
    pub q: Buf,
    /// keys of this call (after RoPE when rotated); None after a forward with a KV
    /// cache, which holds them (such a forward has no backward)
    pub k: Option<Buf>,
    /// values of this call; None after a forward with a KV cache
    pub v: Option<Buf>,
    /// attention output (B·T, NH·HS), token-major: the input of `o`
    pub y: Buf,
    /// log-sum-exp of each query's scores (B,NH,T)
    pub lse: Buf,
    /// which of q, k, v are token-major (`out` always is)
    pub layout: AttnLayout,
}

/// Keys and values of one layer seen so far, preallocated: `k` and `v` are
/// (B, NKV, cap, HS) each, of which each block's first `len` rows are valid.  A new key
/// is written in place and attention reads the cache where it lies, so a decoding step
/// copies nothing that is already cached ([`crate::nn::Llama::reserve_cache`] grows it).
#[derive(Clone, Debug)]
pub struct LayerKv<Buf> {
    /// Cached keys (B, NKV, cap, HS), post-RoPE.
    pub k: Buf,
    /// Cached values (B, NKV, cap, HS).
    pub v: Buf,
    /// Valid rows per block: positions cached so far.
    pub len: usize,
    /// Rows allocated per block.
    pub cap: usize,
}

impl<F: Float, B: Backend<F>> Attention<F, B> {
    /// Zero-initialised, trainable: C → NH heads of HS for q, NKV heads for k and v, and
    /// back; with biases when `bias`, RoPE when `rope_theta` is Some.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        c: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
        bias: bool,
        rope_theta: Option<f32>,
        causal: bool,
    ) -> Self {
        Attention {
            q: Linear::new(be, c, nh * hs, bias),
            k: Linear::new(be, c, nkv * hs, bias),
            v: Linear::new(be, c, nkv * hs, bias),
            o: Linear::new(be, nh * hs, c, bias),
            nh,
            nkv,
            hs,
            rope_theta,
            causal,
            fused: None,
        }
    }

    /// Whether q, k and v are one product ([`Attention::fuse`]).
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// Makes the frozen projections q, k and v one product of W `[q; k; v]`
    /// ([`Linear::stack`]): a forward then makes one matrix product where it made
    /// three, and splits each projection's columns where they lie ([`Cols`]).  Their
    /// own weights are left empty until [`Attention::unfuse`].  The outputs equal the
    /// unfused ones up to rounding.  A trainable projection is refused (its optimizer
    /// updates its own weight), as are biases on some of the three only.  Returns
    /// whether it fused (false when already fused).
    pub fn fuse(&mut self, be: &B) -> Result<bool> {
        if self.fused.is_some() {
            return Ok(false);
        }
        let parts = [&mut self.q, &mut self.k, &mut self.v];
        self.fused = Some(Linear::stack(be, "Attention::fuse", parts)?);
        Ok(true)
    }

    /// Moves a fused layer's values back into q, k and v ([`Attention::fuse`]); a no-op
    /// for an unfused one.
    pub fn unfuse(&mut self, be: &B) -> Result<()> {
        match self.fused.take() {
            Some(f) => f.unstack(be, [&mut self.q, &mut self.k, &mut self.v]),
            None => Ok(()),
        }
    }

    fn shape(&self, b: usize, tq: usize, tk: usize, layout: AttnLayout) -> AttnShape {
        AttnShape {
            b,
            nh: self.nh,
            nkv: self.nkv,
            tq,
            tk,
            kv_stride: tk,
            hs: self.hs,
            // a single query sees every cached key: no mask needed (and none is wrong)
            causal: self.causal && tq > 1,
            scale: 1.0 / (self.hs as f32).sqrt(),
            layout,
        }
    }

    /// The operands attention reads in place, token-major, as the projections write
    /// them: q unless RoPE rotates it (the rotation rides on the split), k unless
    /// rotated or bound for a cache (which holds heads), v unless bound for a cache, and
    /// the output always (it is the input of `o`).  Only the others are split into heads.
    /// A fused product's columns are never read in place: all three are split.
    fn layout(&self, cached: bool) -> AttnLayout {
        let plain = self.rope_theta.is_none() && self.fused.is_none();
        AttnLayout {
            q: plain,
            k: plain && !cached,
            v: !cached && self.fused.is_none(),
            out: true,
        }
    }

    /// Widths NH·HS, NKV·HS, NKV·HS of q, k and v.
    fn widths(&self) -> [usize; 3] {
        [self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs]
    }

    /// This call's projections of x (B·T, C): one product when fused, else three (the
    /// query's left out, empty, unless `with_q`).
    fn project(&self, be: &B, x: &B::Buf, with_q: bool) -> Result<Projected<B::Buf>> {
        Ok(match &self.fused {
            Some(f) => Projected::Fused(f.forward(be, x)?),
            None => Projected::Apart([
                with_q.then(|| self.q.forward(be, x)).transpose()?,
                Some(self.k.forward(be, x)?),
                Some(self.v.forward(be, x)?),
            ]),
        })
    }

    /// Where projection `i` (0 q, 1 k, 2 v) lies in a fused product's rows.
    fn fused_cols(&self, i: usize) -> Cols {
        let w = self.widths();
        Cols {
            off: w[..i].iter().sum(),
            ld: w.iter().sum(),
        }
    }

    /// Projection `i`'s rows: its buffer, and where they lie in it.
    fn part<'p>(&self, p: &'p Projected<B::Buf>, i: usize) -> Result<(&'p B::Buf, Cols)> {
        match p {
            Projected::Apart(bs) => match &bs[i] {
                Some(b) => Ok((b, Cols::whole(self.widths()[i]))),
                None => Err(Error::arg(
                    "Attention",
                    format!("projection {i} read but not formed"),
                )),
            },
            Projected::Fused(f) => Ok((f, self.fused_cols(i))),
        }
    }

    /// Projection `i` as attention's operand: itself when `tokens` (only ever apart:
    /// [`Self::layout`]), else split into heads (B,heads,T,HS), rotated when `rope`.
    fn operand(
        &self,
        be: &B,
        p: &mut Projected<B::Buf>,
        i: usize,
        tokens: bool,
        ctx: &AttnCtx<'_, B::Buf>,
        rope: Option<f32>,
    ) -> Result<B::Buf> {
        if let (true, Projected::Apart(bs)) = (tokens, &mut *p) {
            if let Some(b) = bs[i].take() {
                return Ok(b);
            }
        }
        let heads = if i == 0 { self.nh } else { self.nkv };
        let (x, at) = self.part(p, i)?;
        let mut o = be.uninit(ctx.b * ctx.t * heads * self.hs);
        be.heads_split(x, at, ctx.b, ctx.t, heads, self.hs, ctx.pos0, rope, &mut o)?;
        Ok(o)
    }

    /// forward: operand = xf, or split (and rotate) xf
    /// so:      dxf = d, or the split's backward of d (the inverse rotation)
    fn operand_grad(
        &self,
        be: &B,
        d: B::Buf,
        tokens: bool,
        heads: usize,
        ctx: &AttnCtx<'_, B::Buf>,
        rope: Option<f32>,
    ) -> Result<B::Buf> {
        if tokens {
            return Ok(d);
        }
        let mut o = be.uninit(be.len(&d));
        let at = Cols::whole(heads * self.hs);
        be.heads_split_bwd(&d, ctx.b, ctx.t, heads, self.hs, ctx.pos0, rope, &mut o, at)?;
        Ok(o)
    }

    /// x (B·T, C) → (B·T, C); the activations keep x (a caller that reads it after
    /// hands over a clone).  With `cache`, the new keys/values are written into it
    /// (it must have room: [`crate::nn::Llama::reserve_cache`]) and the queries attend
    /// to all of them (key-side bias and mask then cover all Tk keys).  The activations
    /// then keep no keys or values: a forward with a cache has no backward.
    pub fn forward(
        &self,
        be: &B,
        x: B::Buf,
        ctx: &AttnCtx<'_, B::Buf>,
        cache: Option<&mut LayerKv<B::Buf>>,
    ) -> Result<(B::Buf, AttnActs<B::Buf>)> {
        let (b, t, hs) = (ctx.b, ctx.t, self.hs);
        let lay = self.layout(cache.is_some());
        let rope = self.rope_theta;
        let mut p = self.project(be, &x, true)?;
        let q = self.operand(be, &mut p, 0, lay.q, ctx, rope)?;
        let mut y = be.uninit(b * t * self.nh * hs);
        let mut lse = be.uninit(b * self.nh * t);
        let (bias, mask) = (ctx.bias, ctx.key_mask);
        // the keys attention reads: the new ones alone, or the cache they are split into
        let (k, v) = match cache {
            Some(c) => {
                self.append_kv(be, ctx, c, &p)?;
                let s = AttnShape {
                    kv_stride: c.cap,
                    ..self.shape(b, t, c.len, lay)
                };
                be.attention_fwd(&s, &q, &c.k, &c.v, bias, mask, &mut y, &mut lse)?;
                (None, None)
            }
            None => {
                let (k, v) = if self.is_fused() {
                    // both split in one launch: appended to caches of their T rows
                    let n = b * t * self.nkv * hs;
                    let (mut k, mut v) = (be.uninit(n), be.uninit(n));
                    self.write_kv(be, ctx, (&mut k, &mut v), (t, 0), &p)?;
                    (k, v)
                } else {
                    (
                        self.operand(be, &mut p, 1, lay.k, ctx, rope)?,
                        self.operand(be, &mut p, 2, lay.v, ctx, None)?,
                    )
                };
                let s = self.shape(b, t, t, lay);
                be.attention_fwd(&s, &q, &k, &v, bias, mask, &mut y, &mut lse)?;
                (Some(k), Some(v))
            }
        };
        let out = self.o.forward(be, &y)?;
        Ok((
            out,
            AttnActs {
                x,
                q,
                k,
                v,
                y,
                lse,
                layout: lay,
            },
        ))
    }

    /// What [`Self::forward`] leaves in `cache` for x (B·T, C), without its output: the
    /// keys and values of positions `ctx.pos0..` (RoPE applied) written after the
    /// cache's `ctx.pos0` positions.  No query is formed, so a model's last layer need
    /// do no more than this for the positions whose outputs nobody reads
    /// ([`crate::nn::Llama::forward_tail`]); a fused layer's one product computes the
    /// query's columns too, and they are left unread.
    pub fn fill_cache(
        &self,
        be: &B,
        x: &B::Buf,
        ctx: &AttnCtx<'_, B::Buf>,
        cache: &mut LayerKv<B::Buf>,
    ) -> Result<()> {
        let p = self.project(be, x, false)?;
        self.append_kv(be, ctx, cache, &p)
    }

    /// Splits this call's key and value projections (B·T, NKV·HS each, where `p` holds
    /// them) into heads (the keys rotated) straight into the cache's room after its
    /// `ctx.pos0` positions, which must be all it holds.
    fn append_kv(
        &self,
        be: &B,
        ctx: &AttnCtx<'_, B::Buf>,
        c: &mut LayerKv<B::Buf>,
        p: &Projected<B::Buf>,
    ) -> Result<()> {
        let t = ctx.t;
        if c.len != ctx.pos0 {
            return Err(Error::arg(
                "Attention::append_kv",
                format!(
                    "KV cache holds {} positions but the call starts at {}",
                    c.len, ctx.pos0
                ),
            ));
        }
        if c.len + t > c.cap {
            return Err(Error::arg(
                "Attention::append_kv",
                format!(
                    "KV cache of capacity {} cannot take {t} positions after {}",
                    c.cap, c.len
                ),
            ));
        }
        self.write_kv(be, ctx, (&mut c.k, &mut c.v), (c.cap, c.len), p)?;
        c.len += t;
        Ok(())
    }

    /// The keys and values of `p` split into time rows `at..at + T` of (B,NKV,`cap`,HS)
    /// buffers kc and vc (one launch), the keys rotated at positions `ctx.pos0 + t`.
    fn write_kv(
        &self,
        be: &B,
        ctx: &AttnCtx<'_, B::Buf>,
        (kc, vc): (&mut B::Buf, &mut B::Buf),
        (cap, at): (usize, usize),
        p: &Projected<B::Buf>,
    ) -> Result<()> {
        let ((kf, k_cols), (vf, v_cols)) = (self.part(p, 1)?, self.part(p, 2)?);
        let a = KvAppend {
            b: ctx.b,
            t: ctx.t,
            nkv: self.nkv,
            hs: self.hs,
            pos0: ctx.pos0,
            theta: self.rope_theta,
            cap,
            at,
            k_cols,
            v_cols,
        };
        be.append_kv(kf, vf, &a, kc, vc)
    }

    /// Backward of a forward without cache (after one with a cache, an error).  Returns
    /// dx (B·T, C) and, when `want_dbias`, dγ (B, T).
    pub fn backward(
        &mut self,
        be: &B,
        acts: &AttnActs<B::Buf>,
        ctx: &AttnCtx<'_, B::Buf>,
        dout: &B::Buf,
        want_dbias: bool,
    ) -> Result<(B::Buf, Option<B::Buf>)> {
        let (b, t, lay) = (ctx.b, ctx.t, acts.layout);
        let (Some(k), Some(v)) = (&acts.k, &acts.v) else {
            return Err(Error::arg(
                "Attention::backward",
                "the forward wrote its keys to a KV cache and kept none: no backward",
            ));
        };
        // forward: out = o(y)
        let dy = self
            .o
            .backward(be, &acts.y, dout, true)?
            .expect("dx requested");
        // forward: y = attention(q, k, v; γ)
        let s = self.shape(b, t, t, lay);
        let (mut dq, mut dk, mut dv) = (
            be.uninit(be.len(&acts.q)),
            be.uninit(be.len(k)),
            be.uninit(be.len(v)),
        );
        let mut dbias = want_dbias.then(|| be.uninit(b * t));
        be.attention_bwd(
            &s,
            &acts.q,
            k,
            v,
            ctx.bias,
            ctx.key_mask,
            &acts.y,
            &acts.lse,
            &dy,
            &mut dq,
            &mut dk,
            &mut dv,
            dbias.as_mut(),
        )?;
        let rope = self.rope_theta;
        let cols = [0, 1, 2].map(|i| self.fused_cols(i));
        let (nh, nkv, hs, pos0) = (self.nh, self.nkv, self.hs, ctx.pos0);
        if let Some(f) = &mut self.fused {
            // forward: [qf | kf | vf] = fused(x), each split (and rotated) from its columns
            // so:      each column block of dfused = its split's backward,
            //          dx = fused's backward of dfused
            if lay.q || lay.k || lay.v {
                return Err(Error::arg(
                    "Attention::backward",
                    "activations of an unfused forward through a fused layer: unfuse it first",
                ));
            }
            let mut df = be.uninit(b * t * cols[0].ld);
            let grads = [(dq, nh, rope), (dk, nkv, rope), (dv, nkv, None)];
            for ((d, heads, rope), at) in grads.into_iter().zip(cols) {
                be.heads_split_bwd(&d, b, t, heads, hs, pos0, rope, &mut df, at)?;
            }
            let dx = f.backward(be, &acts.x, &df, true)?.expect("dx requested");
            return Ok((dx, dbias));
        }
        // forward: q = qf, or rope(split(qf))  so: dqf = dq, or split_bwd(dq)
        let dqf = self.operand_grad(be, dq, lay.q, self.nh, ctx, rope)?;
        let dkf = self.operand_grad(be, dk, lay.k, self.nkv, ctx, rope)?;
        let dvf = self.operand_grad(be, dv, lay.v, self.nkv, ctx, None)?;
        // forward: qf = q(x), kf = k(x), vf = v(x)  so: dx = sum of the three paths
        let mut dx = self
            .q
            .backward(be, &acts.x, &dqf, true)?
            .expect("dx requested");
        let dxk = self
            .k
            .backward(be, &acts.x, &dkf, true)?
            .expect("dx requested");
        let dxv = self
            .v
            .backward(be, &acts.x, &dvf, true)?
            .expect("dx requested");
        be.add_into(&mut dx, &[&dxk, &dxv])?;
        Ok((dx, dbias))
    }
}
