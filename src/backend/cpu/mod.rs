//! The CPU backend: plain loops, rayon over independent rows, the `gemm` crate for
//! matrix products.  It is the reference every other backend is tested against, so it
//! favours clarity; per-thread partial sums merged with `reduce` give the parameter
//! gradients.
//!
//! One file per op family; this one holds the shared row helpers and the
//! `impl Backend for Cpu`, one delegation per op.  Attention and log-probs are the
//! kernels' CPU twins ([`crate::kernels::attention`], [`crate::kernels::logprob`]).
//!
//! Sizes: N rows, C channels, V vocabulary, B batch, T tokens, NH heads, HS head size.
use super::{
    image, Accum, Act, AdamWStep, AttnShape, Backend, Cols, Conv2dGeom, GateUp, KvAppend,
    MaskLosses, MatmulSpec, RowCopy,
};
use crate::error::{Error, Result};
use crate::kernels::attention::{attention_bwd_cpu, attention_fwd_cpu};
use crate::kernels::logprob::RowOps;
use rayon::prelude::*;

mod act;
mod elementwise;
mod embed;
mod few_rows;
mod heads;
pub mod heap;
mod logprob;
pub(crate) mod matmul;
mod norm;
mod optim;

/// The crate's one fast f32 `exp` (see [`crate::kernels::fastmath`]).
pub use crate::kernels::fastmath::exp_f32;
pub use heap::keep_freed_memory;

/// Runs `op` on a thread of rayon's global pool and returns its result.
///
/// A thread outside the pool (a program's main thread) that starts a parallel loop
/// hands it to the pool and sleeps until it is done, so every one of a training step's
/// thousands of small parallel ops costs two cross-thread wake-ups, and the pool has
/// one thread fewer for the work.  On a pool thread the loop is split with the other
/// threads by work stealing instead.  The `popen` binary runs each command this way;
/// the results are the same bits (the CPU backend's splits do not depend on which
/// thread runs them).
pub fn on_worker<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    let mut out = None;
    rayon::scope(|_| out = Some(op()));
    out.expect("rayon::scope runs its closure before returning")
}

/// Rows per rayon task: below this a row loop is cheaper than a task split.
const MIN_ROWS_PER_TASK: usize = 16;
/// Elements per rayon task for elementwise ops.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// The element types the CPU backend computes in (f32 for models, f64 for gradient
/// checks): the floats the kernels' CPU twins are written for.
pub trait CpuFloat: RowOps + std::fmt::Debug {}
impl<T: RowOps + std::fmt::Debug> CpuFloat for T {}

/// The CPU backend (reference).  Uses rayon's current thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

#[inline]
fn f<F: CpuFloat>(x: f64) -> F {
    F::from(x).expect("f64 constant representable in the backend float")
}

/// (N,C) rows of `x` in parallel with `g(row_index, row)`.
fn rows_mut<F: CpuFloat>(x: &mut [F], c: usize, g: impl Fn(usize, &mut [F]) + Sync + Send) {
    x.par_chunks_mut(c.max(1))
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(i, r)| g(i, r));
}

fn rows_of(op: &'static str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || !len.is_multiple_of(c) {
        return Err(Error::shape(
            op,
            format!("buffer of {len} elements is not a whole number of rows of {c}"),
        ));
    }
    Ok(len / c)
}

/// Sum over rows of `per_row(i) -> (C)` contributions into `acc (C)`, with per-thread partials.
fn reduce_rows<F: CpuFloat>(
    n: usize,
    c: usize,
    acc: &mut [F],
    per_row: impl Fn(usize, &mut [F]) + Sync + Send,
) {
    // Fixed chunks, summed in chunk order: the result is the same bits at any thread
    // count (a rayon fold/reduce would split where work stealing happens to).
    let chunks: Vec<Vec<F>> = (0..n.div_ceil(MIN_ROWS_PER_TASK))
        .into_par_iter()
        .map(|k| {
            let mut part = vec![F::zero(); c];
            for i in k * MIN_ROWS_PER_TASK..((k + 1) * MIN_ROWS_PER_TASK).min(n) {
                per_row(i, &mut part);
            }
            part
        })
        .collect();
    for part in &chunks {
        acc.iter_mut().zip(part).for_each(|(x, y)| *x = *x + *y);
    }
}

impl<F: CpuFloat> Backend<F> for Cpu {
    type Buf = Vec<F>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn concurrent_callers(&self) -> bool {
        true
    }
    fn prefers_packed_weights(&self) -> bool {
        true
    }
    fn zeros(&self, n: usize) -> Vec<F> {
        vec![F::zero(); n]
    }
    fn from_slice(&self, x: &[F]) -> Vec<F> {
        x.to_vec()
    }
    fn to_vec(&self, x: &Vec<F>) -> Vec<F> {
        x.clone()
    }
    fn len(&self, x: &Vec<F>) -> usize {
        x.len()
    }
    fn fill(&self, x: &mut Vec<F>, v: F) {
        elementwise::fill(x, v)
    }
    fn copy(&self, dst: &mut Vec<F>, src: &Vec<F>) -> Result<()> {
        elementwise::copy(dst, src)
    }
    fn copy_range(
        &self,
        dst: &mut Vec<F>,
        dst_off: usize,
        src: &Vec<F>,
        src_off: usize,
        n: usize,
    ) -> Result<()> {
        elementwise::copy_range(dst, dst_off, src, src_off, n)
    }
    fn add_rows(&self, dst: &mut Vec<F>, src: &Vec<F>, c: RowCopy) -> Result<()> {
        elementwise::add_rows(dst, src, c)
    }
    fn axpy(&self, dst: &mut Vec<F>, alpha: F, src: &Vec<F>) -> Result<()> {
        elementwise::axpy(dst, alpha, src)
    }
    fn scale(&self, x: &mut Vec<F>, alpha: F) {
        elementwise::scale(x, alpha)
    }
    fn sum_sq(&self, x: &Vec<F>) -> F {
        elementwise::sum_sq(x)
    }
    fn matmul(
        &self,
        s: MatmulSpec,
        a: &Vec<F>,
        b: &Vec<F>,
        out: &mut Vec<F>,
        acc: Accum,
    ) -> Result<()> {
        matmul::matmul(s, a, b, out, acc)
    }
    fn matmul_batched(
        &self,
        s: MatmulSpec,
        batch: usize,
        a: &Vec<F>,
        b: &Vec<F>,
        out: &mut Vec<F>,
        acc: Accum,
    ) -> Result<()> {
        matmul::matmul_batched(s, batch, a, b, out, acc)
    }
    fn matmul_new(&self, s: MatmulSpec, a: &Vec<F>, b: &Vec<F>) -> Result<Vec<F>> {
        matmul::matmul_new(s, a, b)
    }
    fn add_bias(&self, out: &mut Vec<F>, bias: &Vec<F>, c: usize) -> Result<()> {
        matmul::add_bias(out, bias, c)
    }
    fn bias_bwd(&self, dout: &Vec<F>, dbias: &mut Vec<F>, c: usize) -> Result<()> {
        matmul::bias_bwd(dout, dbias, c)
    }
    fn rmsnorm_fwd(
        &self,
        x: &Vec<F>,
        w: Option<&Vec<F>>,
        eps: f32,
        c: usize,
        out: &mut Vec<F>,
        rstd: &mut Vec<F>,
    ) -> Result<()> {
        norm::rmsnorm_fwd(x, w.map(Vec::as_slice), eps, c, out, rstd)
    }
    fn rmsnorm_bwd(
        &self,
        dout: &Vec<F>,
        x: &Vec<F>,
        w: Option<&Vec<F>>,
        rstd: &Vec<F>,
        c: usize,
        dx: &mut Vec<F>,
        dw: Option<&mut Vec<F>>,
    ) -> Result<()> {
        norm::rmsnorm_bwd(
            dout,
            x,
            w.map(Vec::as_slice),
            rstd,
            c,
            dx,
            dw.map(Vec::as_mut_slice),
        )
    }
    fn layernorm_fwd(
        &self,
        x: &Vec<F>,
        w: &Vec<F>,
        b: &Vec<F>,
        eps: f32,
        c: usize,
        out: &mut Vec<F>,
        mean: &mut Vec<F>,
        rstd: &mut Vec<F>,
    ) -> Result<()> {
        norm::layernorm_fwd(x, w, b, eps, c, out, mean, rstd)
    }
    fn layernorm_bwd(
        &self,
        dout: &Vec<F>,
        x: &Vec<F>,
        w: &Vec<F>,
        mean: &Vec<F>,
        rstd: &Vec<F>,
        c: usize,
        dx: &mut Vec<F>,
        dw: Option<&mut Vec<F>>,
        db: Option<&mut Vec<F>>,
    ) -> Result<()> {
        norm::layernorm_bwd(
            dout,
            x,
            w,
            mean,
            rstd,
            c,
            dx,
            dw.map(Vec::as_mut_slice),
            db.map(Vec::as_mut_slice),
        )
    }
    fn heads_split(
        &self,
        x: &Vec<F>,
        x_at: Cols,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        pos0: usize,
        theta: Option<f32>,
        out: &mut Vec<F>,
    ) -> Result<()> {
        heads::heads_split(x, x_at, b, t, nh, hs, pos0, theta, out)
    }
    fn append_kv(
        &self,
        k: &Vec<F>,
        v: &Vec<F>,
        a: &KvAppend,
        kc: &mut Vec<F>,
        vc: &mut Vec<F>,
    ) -> Result<()> {
        heads::heads_split_at(k, a.k_cols, a, a.theta, kc)?;
        heads::heads_split_at(v, a.v_cols, a, None, vc)
    }
    fn heads_split_bwd(
        &self,
        dout: &Vec<F>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        pos0: usize,
        theta: Option<f32>,
        dx: &mut Vec<F>,
        dx_at: Cols,
    ) -> Result<()> {
        heads::heads_split_bwd(dout, b, t, nh, hs, pos0, theta, dx, dx_at)
    }
    fn heads_merge(
        &self,
        x: &Vec<F>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        out: &mut Vec<F>,
    ) -> Result<()> {
        heads::heads_merge(x, b, t, nh, hs, out)
    }
    fn act_fwd(&self, act: Act, x: &Vec<F>, out: &mut Vec<F>) -> Result<()> {
        act::act_fwd(act, x, out)
    }
    fn act_bwd(&self, act: Act, x: &Vec<F>, dout: &Vec<F>, dx: &mut Vec<F>) -> Result<()> {
        act::act_bwd(act, x, dout, dx)
    }
    fn swiglu_fwd(&self, gate: &Vec<F>, up: &Vec<F>, at: GateUp, out: &mut Vec<F>) -> Result<()> {
        act::swiglu_fwd(gate, up, at, out)
    }
    fn swiglu_bwd(
        &self,
        gate: &Vec<F>,
        up: &Vec<F>,
        dout: &Vec<F>,
        dgate: &mut Vec<F>,
        dup: &mut Vec<F>,
    ) -> Result<()> {
        act::swiglu_bwd(gate, up, dout, dgate, dup)
    }
    fn embedding_fwd(&self, ids: &[u32], table: &Vec<F>, c: usize, out: &mut Vec<F>) -> Result<()> {
        embed::embedding_fwd(ids, table, c, out)
    }
    fn embedding_bwd(
        &self,
        ids: &[u32],
        dout: &Vec<F>,
        c: usize,
        dtable: &mut Vec<F>,
    ) -> Result<()> {
        embed::embedding_bwd(ids, dout, c, dtable)
    }
    fn patchify(
        &self,
        pixels: &Vec<F>,
        b: usize,
        ch: usize,
        h: usize,
        w: usize,
        p: usize,
        out: &mut Vec<F>,
    ) -> Result<()> {
        embed::patchify(pixels, b, ch, h, w, p, out)
    }
    fn patchify_bwd(
        &self,
        dout: &Vec<F>,
        b: usize,
        ch: usize,
        h: usize,
        w: usize,
        p: usize,
        dpixels: &mut Vec<F>,
    ) -> Result<()> {
        embed::patchify_bwd(dout, b, ch, h, w, p, dpixels)
    }
    fn attention_fwd(
        &self,
        s: &AttnShape,
        q: &Vec<F>,
        k: &Vec<F>,
        v: &Vec<F>,
        bias: Option<&Vec<F>>,
        key_mask: Option<&[u8]>,
        out: &mut Vec<F>,
        lse: &mut Vec<F>,
    ) -> Result<()> {
        attention_fwd_cpu(s, q, k, v, bias.map(Vec::as_slice), key_mask, out, lse)
    }
    fn attention_bwd(
        &self,
        s: &AttnShape,
        q: &Vec<F>,
        k: &Vec<F>,
        v: &Vec<F>,
        bias: Option<&Vec<F>>,
        key_mask: Option<&[u8]>,
        out: &Vec<F>,
        lse: &Vec<F>,
        dout: &Vec<F>,
        dq: &mut Vec<F>,
        dk: &mut Vec<F>,
        dv: &mut Vec<F>,
        dbias: Option<&mut Vec<F>>,
    ) -> Result<()> {
        attention_bwd_cpu(
            s,
            q,
            k,
            v,
            bias.map(Vec::as_slice),
            key_mask,
            out,
            lse,
            dout,
            dq,
            dk,
            dv,
            dbias.map(Vec::as_mut_slice),
        )
    }
    fn logprob_fwd(
        &self,
        logits: &Vec<F>,
        targets: &[i32],
        v: usize,
        logp: &mut Vec<F>,
        lse: &mut Vec<F>,
    ) -> Result<()> {
        logprob::logprob_fwd(logits, targets, v, logp, lse)
    }
    fn logprob_bwd(
        &self,
        logits: &Vec<F>,
        targets: &[i32],
        v: usize,
        lse: &Vec<F>,
        dlogp: &Vec<F>,
        dlogits: &mut Vec<F>,
    ) -> Result<()> {
        logprob::logprob_bwd(logits, targets, v, lse, dlogp, dlogits)
    }
    fn adamw_step(
        &self,
        h: &AdamWStep,
        param: &mut Vec<F>,
        grad: &Vec<F>,
        m: &mut Vec<F>,
        v: &mut Vec<F>,
    ) -> Result<()> {
        optim::adamw_step(h, param, grad, m, v)
    }

    fn im2col(&self, x: &Vec<F>, g: &Conv2dGeom, out: &mut Vec<F>) -> Result<()> {
        image::im2col(x, g, out)
    }
    fn im2col_bwd(&self, dout: &Vec<F>, g: &Conv2dGeom, dx: &mut Vec<F>) -> Result<()> {
        image::im2col_bwd(dout, g, dx)
    }
    #[rustfmt::skip]
    fn depth_to_space(&self, x: &Vec<F>, b: usize, h: usize, w: usize, c: usize, r: usize, out: &mut Vec<F>) -> Result<()> {
        image::depth_to_space(x, b, h, w, c, r, out)
    }
    #[rustfmt::skip]
    fn depth_to_space_bwd(&self, dout: &Vec<F>, b: usize, h: usize, w: usize, c: usize, r: usize, dx: &mut Vec<F>) -> Result<()> {
        image::depth_to_space_bwd(dout, b, h, w, c, r, dx)
    }
    #[rustfmt::skip]
    fn resize_bilinear(&self, x: &Vec<F>, b: usize, h: usize, w: usize, c: usize, ho: usize, wo: usize, out: &mut Vec<F>) -> Result<()> {
        image::resize_bilinear(x, b, h, w, c, ho, wo, out)
    }
    #[rustfmt::skip]
    fn resize_bilinear_bwd(&self, dout: &Vec<F>, b: usize, h: usize, w: usize, c: usize, ho: usize, wo: usize, dx: &mut Vec<F>) -> Result<()> {
        image::resize_bilinear_bwd(dout, b, h, w, c, ho, wo, dx)
    }
    fn mul_rows(&self, x: &Vec<F>, g: &Vec<F>, c: usize, out: &mut Vec<F>) -> Result<()> {
        image::mul_rows(x, g, c, out)
    }
    #[rustfmt::skip]
    fn mul_rows_bwd(&self, x: &Vec<F>, g: &Vec<F>, dout: &Vec<F>, c: usize, dx: &mut Vec<F>, dg: &mut Vec<F>) -> Result<()> {
        image::mul_rows_bwd(x, g, dout, c, dx, dg)
    }
    fn mask_loss_fwd(
        &self,
        logits: &Vec<F>,
        target: &Vec<F>,
        m: usize,
        p: usize,
    ) -> Result<MaskLosses<F, Vec<F>>> {
        image::mask_loss_fwd(logits, target, m, p)
    }
    #[rustfmt::skip]
    fn mask_loss_bwd(&self, logits: &Vec<F>, target: &Vec<F>, sums: &Vec<F>, m: usize, p: usize, w_bce: F, w_dice: F, dlogits: &mut Vec<F>) -> Result<()> {
        image::mask_loss_bwd(logits, target, sums, m, p, w_bce, w_dice, dlogits)
    }
}
