//! The backend contract: the transformer's fused layer ops, each with its backward.
//!
//! Model code ([`crate::nn`]) is generic over [`Backend`], so a CUDA backend is a
//! second implementation of this trait, not a second model.  [`Cpu`] (rayon + the
//! `gemm` crate) is the reference implementation; it is generic over the float type so
//! that every backward can be checked in f64 against finite differences.
//!
//! Conventions for every op:
//! - Buffers are flat, row-major; the shape is written on each argument.
//! - `Accum::Replace` overwrites the output, `Accum::Add` accumulates into it.  Backward
//!   ops follow the llm.c rule (see [`crate::nn`]): parameter gradients accumulate,
//!   activation gradients overwrite.
//! - A parameter-gradient slot of `None` means "frozen": the op skips that gradient but
//!   still writes the activation gradient.
//! - Every size is checked first; a mismatch is `Err(Error::Shape)`, never a panic or an
//!   out-of-bounds read.
//!
//! Sizes: B batch, T tokens, C channels, N rows (= B·T), V vocabulary, NH query heads,
//! NKV key/value heads, HS head size.
use crate::error::{Error, Result};
use num_traits::Float;

mod args;
pub mod cpu;
pub mod device;
pub mod image;
pub(crate) use args::check_terms;
pub use args::{
    Accum, Act, AdamWSlot, AdamWStep, Cols, Conv2dGeom, GateUp, KvAppend, MaskLosses, MatmulSpec,
    RowCopy, TimeCopy,
};
pub use cpu::Cpu;
pub use device::{DeviceBackend, DeviceChoice, OnBackend};

/// Shape of one attention call: q (B,NH,Tq,HS), k and v (B,NKV,Tk,HS) (or a cache's
/// (B,NKV,kv_stride,HS) in the forward), out (B,NH,Tq,HS), lse (B,NH,Tq).  `causal`
/// aligns bottom-right when Tq < Tk (query i sits at position Tk − Tq + i, as in decoding
/// with a KV cache).  The same struct as the attention kernel's, so backends pass it
/// through unchanged.
pub use crate::kernels::attention::{AttnLayout, AttnShape};
/// `f` of each job, in the jobs' order: on several threads at once where the backend
/// gains from it ([`Backend::concurrent_callers`]), else one after another.  The
/// results are the same either way when each job is independent of the others (the
/// CPU backend's ops give the same values on any thread).
pub fn map_jobs<F: Float, B: Backend<F>, T: Send, R: Send>(
    be: &B,
    jobs: Vec<T>,
    f: impl Fn(T) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    if be.concurrent_callers() && jobs.len() > 1 {
        jobs.into_par_iter().map(f).collect()
    } else {
        jobs.into_iter().map(f).collect()
    }
}

/// The op families a transformer needs, each forward beside its backward.
///
/// `F` is the element type; the CPU backend implements it for every float, a CUDA
/// backend would implement `Backend<f32>` (and bf16) only.
pub trait Backend<F: Float>: Clone + Send + Sync + 'static {
    /// A buffer of `F` that lives wherever this backend computes.
    type Buf: Clone + Send + Sync + std::fmt::Debug;

    /// Short name for messages and benchmark group names ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// Whether independent pieces of work (the questions of a batch) gain from being
    /// run on several threads at once, each calling this backend.  The CPU backend says
    /// yes: its ops split across rayon's pool, and one question's small ops (a batch of
    /// one) keep that pool busy with hand-offs more than with work.  The default is
    /// no: a device runs one stream, and its callers stay on one thread.
    fn concurrent_callers(&self) -> bool {
        false
    }

    /// Whether a frozen [`crate::nn::Linear`]'s forward is faster with its weight
    /// stored `[in, out]` ([`crate::nn::Linear::pack`]).  The CPU backend says yes: gemm
    /// would repack a row-major `[out, in]` weight on every product.  The default is
    /// no (a device's GEMM reads either layout as it is).
    fn prefers_packed_weights(&self) -> bool {
        false
    }

    // ---- memory ----
    /// A new buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// A new buffer of `n` for an op that writes every element before anything reads it:
    /// an output whose contract is `out = …` or "overwritten", or a buffer filled whole
    /// by `copy_range`s.  [`Backend::zeros`] by default (the CPU backend).  The device
    /// backend skips the fill, on a GPU a memset and a driver call as costly to the host
    /// as a launch, and the emulator fills it with NaN instead, so an op that reads an
    /// element before writing it fails the device-against-CPU tests.  A buffer that an
    /// op adds into (`+=`, gradients) must come from `zeros`.
    fn uninit(&self, n: usize) -> Self::Buf {
        self.zeros(n)
    }
    /// Upload host values.
    #[allow(clippy::wrong_self_convention)]
    fn from_slice(&self, x: &[F]) -> Self::Buf;
    /// Download to host values.
    fn to_vec(&self, x: &Self::Buf) -> Vec<F>;
    /// Number of elements in `x`.
    fn len(&self, x: &Self::Buf) -> usize;
    /// Sets every element of `x` to `v`.
    fn fill(&self, x: &mut Self::Buf, v: F);
    /// `dst[..] = src[..]` (equal lengths).
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `dst[dst_off..dst_off+n] = src[src_off..src_off+n]`.
    fn copy_range(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        n: usize,
    ) -> Result<()>;
    /// The runs of `c` from `src` into `dst` ([`RowCopy`]).  By default one
    /// [`Backend::copy_range`] per run; the device backend makes it one launch.
    fn copy_rows(&self, dst: &mut Self::Buf, src: &Self::Buf, c: RowCopy) -> Result<()> {
        c.check("copy_rows", self.len(dst), self.len(src))?;
        for r in 0..c.rows {
            let (d, s) = (c.dst_off + r * c.dst_stride, c.src_off + r * c.src_stride);
            self.copy_range(dst, d, src, s, c.width)?;
        }
        Ok(())
    }
    /// The runs of `c` from `src` added into `dst`: `dst run += src run` ([`RowCopy`];
    /// the dst runs may not overlap).  A gather's backward: the gathered rows' gradients
    /// added back where they came from.  One launch on the device.
    fn add_rows(&self, dst: &mut Self::Buf, src: &Self::Buf, c: RowCopy) -> Result<()>;
    /// `dst += alpha · src` (the residual stream and gradient accumulation).
    fn axpy(&self, dst: &mut Self::Buf, alpha: F, src: &Self::Buf) -> Result<()>;
    /// `terms[0] + terms[1] + …` as a new buffer (one term at least, all of one
    /// length), added left to right: the bits of a copy of the first term and an
    /// [`Backend::add_into`] of the others.  A residual add whose inputs both live on, or
    /// the gradient of an input that fed several ops.  The device backend makes one
    /// launch per four terms and no copy.
    fn add_new(&self, terms: &[&Self::Buf]) -> Result<Self::Buf> {
        let (first, rest) = terms
            .split_first()
            .ok_or_else(|| Error::shape("add_new", "no terms to add"))?;
        check_terms(
            "add_new",
            self.len(first),
            terms.iter().map(|t| self.len(t)),
        )?;
        let mut out = (*first).clone();
        self.add_into(&mut out, rest)?;
        Ok(out)
    }
    /// `dst += terms[0] + terms[1] + …`, each term added into `dst` in turn (the bits of
    /// an [`Backend::axpy`] with α = 1 per term; no terms, no change).  By default one
    /// axpy per term; the device backend makes one launch per three terms.
    fn add_into(&self, dst: &mut Self::Buf, terms: &[&Self::Buf]) -> Result<()> {
        check_terms("add_into", self.len(dst), terms.iter().map(|t| self.len(t)))?;
        for t in terms {
            self.axpy(dst, F::one(), t)?;
        }
        Ok(())
    }
    /// `x *= alpha`.
    fn scale(&self, x: &mut Self::Buf, alpha: F);
    /// Σ x² (for gradient norms and tests).
    fn sum_sq(&self, x: &Self::Buf) -> F;
    /// [`Backend::sum_sq`] of each buffer, in order, each equal to its `sum_sq` (a
    /// gradient norm's parts); a device backend returns them in one download.
    fn sum_sq_many(&self, xs: &[&Self::Buf]) -> Vec<F> {
        xs.iter().map(|x| self.sum_sq(x)).collect()
    }
    /// [`Backend::fill`] of each buffer (a model's gradients zeroed); a device backend
    /// makes one launch for them all.
    fn fill_many(&self, xs: &mut [&mut Self::Buf], v: F) {
        for x in xs.iter_mut() {
            self.fill(x, v);
        }
    }
    /// [`Backend::scale`] of each buffer (gradients clipped); a device backend makes
    /// one launch for them all.
    fn scale_many(&self, xs: &mut [&mut Self::Buf], alpha: F) {
        for x in xs.iter_mut() {
            self.scale(x, alpha);
        }
    }

    // ---- matrix products ----
    /// `out (M,N) (=|+=) op(a) · op(b)`; see [`MatmulSpec`].
    fn matmul(
        &self,
        s: MatmulSpec,
        a: &Self::Buf,
        b: &Self::Buf,
        out: &mut Self::Buf,
        acc: Accum,
    ) -> Result<()>;
    /// `out[i] (M,N) (=|+=) op(a[i]) · op(b[i])` for `batch` products stored one after
    /// another: a is batch × (M,K) (or (K,M) when `ta`), b batch × (K,N), out batch ×
    /// (M,N).  One cuBLAS call on a GPU; the pixel decoder's per-mask products (each
    /// mask's hypernetwork vector against its upscaled features) are one batch.
    fn matmul_batched(
        &self,
        s: MatmulSpec,
        batch: usize,
        a: &Self::Buf,
        b: &Self::Buf,
        out: &mut Self::Buf,
        acc: Accum,
    ) -> Result<()>;
    /// `op(a) · op(b)` in a new (M,N) buffer: [`Backend::matmul`] with
    /// [`Accum::Replace`] into [`Backend::uninit`] (the product writes every element).
    fn matmul_new(&self, s: MatmulSpec, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf> {
        let mut out = self.uninit(s.m * s.n);
        self.matmul(s, a, b, &mut out, Accum::Replace)?;
        Ok(out)
    }
    /// out (N,C) += bias (C), row-broadcast.
    fn add_bias(&self, out: &mut Self::Buf, bias: &Self::Buf, c: usize) -> Result<()>;
    /// dbias (C) += Σ_rows dout (N,C).
    fn bias_bwd(&self, dout: &Self::Buf, dbias: &mut Self::Buf, c: usize) -> Result<()>;

    // ---- norms ----
    /// out (N,C) = x · rstd · w, rstd (N) = 1/√(mean(x²) + eps).  `w` None = no scale.
    fn rmsnorm_fwd(
        &self,
        x: &Self::Buf,
        w: Option<&Self::Buf>,
        eps: f32,
        c: usize,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()>;
    /// A residual add and the norm after it: `sum = x + a`, then out and rstd of
    /// [`Backend::rmsnorm_fwd`] on `sum`; all three overwritten.  By default a copy, an
    /// [`Backend::axpy`] and the norm (the same arithmetic); the device backend makes it
    /// one launch.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm_fwd(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        w: Option<&Self::Buf>,
        eps: f32,
        c: usize,
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()> {
        self.copy(sum, x)?;
        self.axpy(sum, F::one(), a)?;
        self.rmsnorm_fwd(sum, w, eps, c, out, rstd)
    }
    /// dx (N,C) overwritten; dw (C) += (None = frozen).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: Option<&Self::Buf>,
        rstd: &Self::Buf,
        c: usize,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
    ) -> Result<()>;
    /// out (N,C) = (x − mean)·rstd·w + b; mean, rstd (N).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        eps: f32,
        c: usize,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()>;
    /// A residual add and the norm after it: `sum = x + a`, then out, mean and rstd of
    /// [`Backend::layernorm_fwd`] on `sum`; all four overwritten.  By default a copy, an
    /// [`Backend::axpy`] and the norm (the same arithmetic); the device backend makes it
    /// one launch.
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm_fwd(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        eps: f32,
        c: usize,
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()> {
        self.copy(sum, x)?;
        self.axpy(sum, F::one(), a)?;
        self.layernorm_fwd(sum, w, b, eps, c, out, mean, rstd)
    }
    /// dx (N,C) overwritten; dw, db (C) += (None = frozen).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        c: usize,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
        db: Option<&mut Self::Buf>,
    ) -> Result<()>;

    // ---- layout + RoPE ----
    /// x (B,T,NH,HS) → out (B,NH,T,HS), rotating each head by RoPE at positions
    /// `pos0 + t` when `theta` is Some (HF rotate_half convention: pairs (i, i+HS/2)).
    /// x's B·T rows of NH·HS lie at `x_at` in its buffer ([`Cols`]).
    #[allow(clippy::too_many_arguments)]
    fn heads_split(
        &self,
        x: &Self::Buf,
        x_at: Cols,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        pos0: usize,
        theta: Option<f32>,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// A call's keys k and values v (B·T, NKV·HS) split into heads, the keys rotated,
    /// straight into the KV caches kc and vc (B,NKV,cap,HS) at time rows `at..at + T`;
    /// the rest of the caches untouched ([`KvAppend`]).  No temporary and no copy: one
    /// launch on the device.
    fn append_kv(
        &self,
        k: &Self::Buf,
        v: &Self::Buf,
        a: &KvAppend,
        kc: &mut Self::Buf,
        vc: &mut Self::Buf,
    ) -> Result<()>;
    /// Backward of [`Backend::heads_split`]: dout (B,NH,T,HS) → dx (B,T,NH,HS), its rows
    /// at `dx_at` overwritten (the rest of a wider buffer untouched).
    #[allow(clippy::too_many_arguments)]
    fn heads_split_bwd(
        &self,
        dout: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        pos0: usize,
        theta: Option<f32>,
        dx: &mut Self::Buf,
        dx_at: Cols,
    ) -> Result<()>;
    /// x (B,NH,T,HS) → out (B,T,NH,HS).  Its backward is `heads_split` without RoPE.
    fn heads_merge(
        &self,
        x: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Copies `n` time rows of each of `bh` blocks: `dst` (BH, `dst_t`, HS) rows
    /// `dst_at..dst_at+n` ← `src` (BH, `src_t`, HS) rows `src_at..src_at+n`.  Writes a
    /// KV cache's new keys in place and moves a cache into a larger one.
    /// One [`Backend::copy_rows`]: a block's `n` rows are one run ([`TimeCopy::runs`]).
    fn copy_time(&self, dst: &mut Self::Buf, src: &Self::Buf, t: TimeCopy) -> Result<()> {
        t.check("copy_time", self.len(dst), self.len(src))?;
        self.copy_rows(dst, src, t.runs())
    }

    // ---- activations ----
    /// out = act(x), elementwise.
    fn act_fwd(&self, act: Act, x: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
    /// dx = act'(x) · dout (overwritten).
    fn act_bwd(&self, act: Act, x: &Self::Buf, dout: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    /// out (N, W) = silu(gate) · up (LLaMA's SwiGLU), gate's and up's rows where `at`
    /// says ([`GateUp`]: buffers of their own, or the halves of a fused product's rows).
    fn swiglu_fwd(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        at: GateUp,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// dgate, dup overwritten.
    fn swiglu_bwd(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dout: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    ) -> Result<()>;

    // ---- embeddings ----
    /// out (N,C) = table (V,C)[ids (N)]; an id ≥ V is an error.
    fn embedding_fwd(
        &self,
        ids: &[u32],
        table: &Self::Buf,
        c: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// dtable (V,C) += scatter of dout (N,C) by ids.
    fn embedding_bwd(
        &self,
        ids: &[u32],
        dout: &Self::Buf,
        c: usize,
        dtable: &mut Self::Buf,
    ) -> Result<()>;
    /// Patches of an image as matrix rows: pixels (B,CH,H,W) → out (B, (H/P)(W/P), CH·P·P),
    /// each row ordered (ch, py, px) to match a conv weight (OC, CH, P, P).
    #[allow(clippy::too_many_arguments)]
    fn patchify(
        &self,
        pixels: &Self::Buf,
        b: usize,
        ch: usize,
        h: usize,
        w: usize,
        p: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Backward of [`Backend::patchify`]: dpixels overwritten.
    #[allow(clippy::too_many_arguments)]
    fn patchify_bwd(
        &self,
        dout: &Self::Buf,
        b: usize,
        ch: usize,
        h: usize,
        w: usize,
        p: usize,
        dpixels: &mut Self::Buf,
    ) -> Result<()>;

    // ---- attention ----
    /// softmax(q kᵀ · scale + bias + mask) v; saves lse for the backward.
    /// q, out (B,NH,Tq,HS); k, v (B,NKV,`s.kv_stride`,HS) of which each block's first Tk
    /// rows are keys (a preallocated KV cache is read in place); bias (B,Tk) per key,
    /// key_mask (B,Tk) 1 = attend, 0 = padding; lse (B,NH,Tq).  Any of q, k, v and out
    /// may be token-major instead, (B,T,H,HS) as a linear layer writes it
    /// (`s.layout`, [`AttnLayout`]): read and written in place, the same results.
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        s: &AttnShape,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        bias: Option<&Self::Buf>,
        key_mask: Option<&[u8]>,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    ) -> Result<()>;
    /// dq, dk, dv overwritten, each in its operand's layout (dout in out's); dbias
    /// (B,Tk) overwritten when Some.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        s: &AttnShape,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        bias: Option<&Self::Buf>,
        key_mask: Option<&[u8]>,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
    ) -> Result<()>;

    // ---- log-probabilities ----
    /// logp (N) = log_softmax(logits (N,V))[targets (N)], without storing the (N,V)
    /// log-softmax; lse (N) saved for the backward.  A target of
    /// [`crate::kernels::logprob::IGNORE_INDEX`] gives logp 0 and no gradient; any other
    /// target outside [0, V) is an error.
    fn logprob_fwd(
        &self,
        logits: &Self::Buf,
        targets: &[i32],
        v: usize,
        logp: &mut Self::Buf,
        lse: &mut Self::Buf,
    ) -> Result<()>;
    /// dlogits (N,V) = `dlogp[n] · (onehot(target) − softmax)`, overwritten.
    fn logprob_bwd(
        &self,
        logits: &Self::Buf,
        targets: &[i32],
        v: usize,
        lse: &Self::Buf,
        dlogp: &Self::Buf,
        dlogits: &mut Self::Buf,
    ) -> Result<()>;

    // ---- optimizer ----
    /// One decoupled-weight-decay Adam step on one tensor; m, v are its moment buffers.
    fn adamw_step(
        &self,
        h: &AdamWStep,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> Result<()>;
    /// [`Backend::adamw_step`] of each tensor, with the same `h`; each tensor's result
    /// equals its own `adamw_step`.  A device backend makes one launch for them all.
    fn adamw_step_many(&self, h: &AdamWStep, slots: &mut [AdamWSlot<Self::Buf>]) -> Result<()> {
        for s in slots.iter_mut() {
            self.adamw_step(h, s.param, s.grad, s.m, s.v)?;
        }
        Ok(())
    }

    // ---- image ops (channels-last maps (B,H,W,C); CPU bodies in [`image`]) ----
    /// x (B,H,W,C) → out (B,Ho,Wo,K·K·C), rows ordered (ky, kx, c), zero padding; see
    /// [`Conv2dGeom`].  A stride-1 conv is then a matmul with a weight (OC, K·K·C).
    fn im2col(&self, x: &Self::Buf, g: &Conv2dGeom, out: &mut Self::Buf) -> Result<()>;
    /// dout (B,Ho,Wo,K·K·C) → dx (B,H,W,C), overwritten.
    fn im2col_bwd(&self, dout: &Self::Buf, g: &Conv2dGeom, dx: &mut Self::Buf) -> Result<()>;
    /// x (B,H,W,r·r·C) → out (B,r·H,r·W,C), input channels ordered (dy, dx, c): out pixel
    /// (y·r+dy, x·r+dx) takes channels (dy, dx, ·) of pixel (y, x).  After a
    /// Linear(C → r·r·C') it is a transposed conv with kernel r, stride r.
    #[allow(clippy::too_many_arguments)]
    fn depth_to_space(
        &self,
        x: &Self::Buf,
        b: usize,
        h: usize,
        w: usize,
        c: usize,
        r: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// dout (B,r·H,r·W,C) → dx (B,H,W,r·r·C), overwritten.
    #[allow(clippy::too_many_arguments)]
    fn depth_to_space_bwd(
        &self,
        dout: &Self::Buf,
        b: usize,
        h: usize,
        w: usize,
        c: usize,
        r: usize,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// x (B,H,W,C) → out (B,Ho,Wo,C), PyTorch `F.interpolate(size=(Ho,Wo),
    /// mode="bilinear", align_corners=False)`: source coordinate (dst + ½)·in/out − ½,
    /// clamped at 0, neighbours clamped at the last pixel.
    #[allow(clippy::too_many_arguments)]
    fn resize_bilinear(
        &self,
        x: &Self::Buf,
        b: usize,
        h: usize,
        w: usize,
        c: usize,
        ho: usize,
        wo: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// dout (B,Ho,Wo,C) → dx (B,H,W,C), overwritten.
    #[allow(clippy::too_many_arguments)]
    fn resize_bilinear_bwd(
        &self,
        dout: &Self::Buf,
        b: usize,
        h: usize,
        w: usize,
        c: usize,
        ho: usize,
        wo: usize,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// out (N,C) = x (N,C) · g (N), each row scaled by its own factor.
    fn mul_rows(&self, x: &Self::Buf, g: &Self::Buf, c: usize, out: &mut Self::Buf) -> Result<()>;
    /// dx (N,C) = dout·g, dg (N) = Σ_i dout\[n,i\]·x\[n,i\]; both overwritten.
    fn mul_rows_bwd(
        &self,
        x: &Self::Buf,
        g: &Self::Buf,
        dout: &Self::Buf,
        c: usize,
        dx: &mut Self::Buf,
        dg: &mut Self::Buf,
    ) -> Result<()>;

    // ---- mask losses (LISA/PixelLM) ----
    /// Per mask of logits (M,P) against target (M,P) in [0, 1]: (BCE-with-logits averaged
    /// over the P pixels, Dice loss on σ(logits) with PixelLM's smoothing
    /// `1 − (2·Σ(σ/s·t) + eps) / (Σσ/s + Σt/s + eps)`, s = 1000, eps = 1e-6).
    /// The losses come back to the host; the per-mask sums the backward needs stay
    /// where they were computed ([`MaskLosses::sums`]).
    fn mask_loss_fwd(
        &self,
        logits: &Self::Buf,
        target: &Self::Buf,
        m: usize,
        p: usize,
    ) -> Result<MaskLosses<F, Self::Buf>>;
    /// dlogits (M,P) = d(Σ_masks w_bce·bce + w_dice·dice)/dlogits, overwritten (the
    /// caller folds the 1/num_masks into the weights); `sums` = the forward's
    /// [`MaskLosses::sums`] of the same logits and target, so the backward reads each
    /// pixel once instead of summing the masks again.
    #[allow(clippy::too_many_arguments)]
    fn mask_loss_bwd(
        &self,
        logits: &Self::Buf,
        target: &Self::Buf,
        sums: &Self::Buf,
        m: usize,
        p: usize,
        w_bce: F,
        w_dice: F,
        dlogits: &mut Self::Buf,
    ) -> Result<()>;
}
