//! The CPU twins of the attention kernels: forward, backward, decode.
//!
//! B batch, NH query heads, NKV key/value heads, Tq queries, Tk keys, HS head size.
use super::cpu_rows::*;
use super::{check_decode, AttnLayout, AttnShape};
use crate::error::{check_len, Result};
use num_traits::Float;
use rayon::prelude::*;
use std::borrow::Cow;

/// x (B, n1, n2, HS) → out (B, n2, n1, HS): a token-major operand to head-major
/// (n1 = T, n2 = H) or back (n1 = H, n2 = T).  The lengths are the caller's to check.
pub(crate) fn swap_middle<F: Copy + Send + Sync>(
    x: &[F],
    [b, n1, n2, hs]: [usize; 4],
    out: &mut [F],
) {
    debug_assert!(x.len() == b * n1 * n2 * hs && out.len() == x.len());
    // out row (bi, j, i) ← x row (bi, i, j)
    out.par_chunks_mut(hs.max(1))
        .with_min_len(64)
        .enumerate()
        .for_each(|(row, o)| {
            let (i, j, bi) = (row % n1, (row / n1) % n2, row / (n1 * n2));
            o.copy_from_slice(&x[((bi * n1 + i) * n2 + j) * hs..][..hs]);
        });
}

/// An operand as head-major (B,H,T,HS): itself, or a copy of a token-major one.
fn heads_of<'a, F: Float + Send + Sync>(
    x: &'a [F],
    tokens: bool,
    [b, t, h, hs]: [usize; 4],
) -> Cow<'a, [F]> {
    if !tokens {
        return Cow::Borrowed(x);
    }
    let mut o = vec![F::zero(); x.len()];
    swap_middle(x, [b, t, h, hs], &mut o);
    Cow::Owned(o)
}

/// A call with token-major operands, run as the head-major call on copies: the same
/// arithmetic, the same bits.  The head-major shape, q, k and v as heads, and the
/// token-major dimensions [b, t, h, hs] of q (and out) and of k (and v).
struct AsHeads<'a, F: Clone> {
    s: AttnShape,
    q: Cow<'a, [F]>,
    k: Cow<'a, [F]>,
    v: Cow<'a, [F]>,
    qd: [usize; 4],
    kd: [usize; 4],
}

impl<'a, F: Float + Send + Sync> AsHeads<'a, F> {
    fn new(s: &AttnShape, q: &'a [F], k: &'a [F], v: &'a [F]) -> Self {
        let (l, qd, kd) = (s.layout, [s.b, s.tq, s.nh, s.hs], [s.b, s.tk, s.nkv, s.hs]);
        AsHeads {
            s: AttnShape {
                layout: AttnLayout::HEADS,
                ..*s
            },
            q: heads_of(q, l.q, qd),
            k: heads_of(k, l.k, kd),
            v: heads_of(v, l.v, kd),
            qd,
            kd,
        }
    }
}

/// An output of the head-major call written to `dst`, token-major when `tokens`.
/// Without `tokens` the call wrote `dst` itself.
struct OutOf<'a, F> {
    dst: &'a mut [F],
    tmp: Option<Vec<F>>,
    dims: [usize; 4],
}

impl<'a, F: Float + Send + Sync> OutOf<'a, F> {
    /// [b, t, h, hs] of the token-major `dst`.
    fn new(dst: &'a mut [F], tokens: bool, dims: [usize; 4]) -> Self {
        let tmp = tokens.then(|| vec![F::zero(); dst.len()]);
        OutOf { dst, tmp, dims }
    }
    fn buf(&mut self) -> &mut [F] {
        match &mut self.tmp {
            Some(t) => t,
            None => self.dst,
        }
    }
    fn finish(self) {
        let [b, t, h, hs] = self.dims;
        if let Some(tmp) = self.tmp {
            swap_middle(&tmp, [b, h, t, hs], self.dst);
        }
    }
}

/// Forward of biased attention on the CPU (rayon over (batch, head, query block)).
///
/// q (B,NH,Tq,HS), k and v (B,NKV,kv_stride,HS) of which each block's first Tk rows
/// are read, bias γ (B,Tk) or None, key_mask (B,Tk) or None (1 = attend); writes out
/// (B,NH,Tq,HS) and lse (B,NH,Tq), the natural-log log-sum-exp of the scaled and biased
/// scores of each row (−inf for a row that sees no key).  Memory beyond the outputs: per
/// rayon thread, a score tile of at most `max(2^16, 16·Tk)` elements (`cpu_q_block`) and,
/// when the compute type is wider than the input's, copies of one head's K and V; never
/// Tq×Tk.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_cpu<F: Float + Send + Sync + 'static>(
    s: &AttnShape,
    q: &[F],
    k: &[F],
    v: &[F],
    bias: Option<&[F]>,
    key_mask: Option<&[u8]>,
    out: &mut [F],
    lse: &mut [F],
) -> Result<()> {
    s.check_fwd(
        "attention_fwd_cpu",
        q.len(),
        k.len(),
        v.len(),
        bias.map(|x| x.len()),
        key_mask.map(|x| x.len()),
        out.len(),
        lse.len(),
    )?;
    if s.layout != AttnLayout::HEADS {
        let h = AsHeads::new(s, q, k, v);
        let mut o = OutOf::new(out, s.layout.out, h.qd);
        attention_fwd_cpu(&h.s, &h.q, &h.k, &h.v, bias, key_mask, o.buf(), lse)?;
        o.finish();
        return Ok(());
    }
    if wants_f64::<F>() {
        fwd_impl::<F, f64>(s, q, k, v, bias, key_mask, out, lse);
    } else {
        fwd_impl::<F, f32>(s, q, k, v, bias, key_mask, out, lse);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn fwd_impl<F: Float + Send + Sync + 'static, A: Acc>(
    s: &AttnShape,
    q: &[F],
    k: &[F],
    v: &[F],
    bias: Option<&[F]>,
    key_mask: Option<&[u8]>,
    out: &mut [F],
    lse: &mut [F],
) {
    let (nh, nkv, tq, tk, hs) = (s.nh, s.nkv, s.tq, s.tk, s.hs);
    if out.is_empty() && lse.is_empty() {
        return;
    }
    let group = s.group();
    let scale = A::from(s.scale).unwrap();
    let qblk = cpu_q_block(s);
    out.par_chunks_mut(tq * hs)
        .zip(lse.par_chunks_mut(tq))
        .enumerate()
        .for_each(|(bh, (o_head, l_head))| {
            let (b, h) = (bh / nh, bh % nh);
            let kv0 = (b * nkv + h / group) * s.kv_stride * hs;
            let kh: AccView<A> = acc_view(&k[kv0..kv0 + tk * hs]);
            let vh: AccView<A> = acc_view(&v[kv0..kv0 + tk * hs]);
            let krow: Vec<A> = key_row(b, tk, bias, key_mask);
            let q_head = &q[bh * tq * hs..(bh + 1) * tq * hs];
            o_head
                .par_chunks_mut(qblk * hs)
                .zip(l_head.par_chunks_mut(qblk))
                .enumerate()
                .for_each(|(blk, (o_blk, l_blk))| {
                    let i0 = blk * qblk;
                    let rows = l_blk.len();
                    let qb: Scratch<A> = acc_copy(&q_head[i0 * hs..(i0 + rows) * hs]);
                    let mut ob = vec![A::zero(); rows * hs];
                    let mut lb = vec![A::zero(); rows];
                    fwd_block(s, i0, &qb, &kh, &vh, &krow, scale, &mut ob, &mut lb);
                    from_acc(&ob, o_blk);
                    from_acc(&lb, l_blk);
                });
        });
}

/// One block of `rows` queries starting at query `i0` of one head.
/// qb (rows,HS), kh and vh (Tk,HS), krow (Tk) additive bias/mask; writes ob (rows,HS)
/// and lb (rows).
#[allow(clippy::too_many_arguments)]
fn fwd_block<A: Acc>(
    s: &AttnShape,
    i0: usize,
    qb: &[A],
    kh: &[A],
    vh: &[A],
    krow: &[A],
    scale: A,
    ob: &mut [A],
    lb: &mut [A],
) {
    let hs = s.hs;
    let rows = lb.len();
    // Keys beyond the last row's causal limit are invisible to the whole block.
    let kmax = s.visible_keys(i0 + rows - 1);
    if kmax == 0 {
        ob.fill(A::zero());
        lb.fill(A::neg_infinity());
        return;
    }
    // p (rows, kmax) = scale · qb kᵀ
    let mut p = Scratch::<A>::new(rows * kmax);
    matmul(
        rows,
        kmax,
        hs,
        &mut p,
        kmax,
        false,
        Mat::new(qb, hs, 1),
        Mat::new(kh, 1, hs),
        scale,
    );
    let mut inv = vec![A::zero(); rows];
    for r in 0..rows {
        let row = &mut p[r * kmax..(r + 1) * kmax];
        (lb[r], inv[r]) = softmax_row(row, &krow[..kmax], s.visible_keys(i0 + r));
    }
    // ob (rows, HS) = p vh, then each row divided by its sum (HS divisions a row
    // instead of Tk)
    matmul(
        rows,
        hs,
        kmax,
        ob,
        hs,
        false,
        Mat::new(&p, kmax, 1),
        Mat::new(vh, hs, 1),
        A::one(),
    );
    for (o, &iv) in ob.chunks_exact_mut(hs).zip(&inv) {
        for x in o {
            *x = *x * iv;
        }
    }
}

/// Turns one row of scaled scores into unnormalized probabilities in place: adds the
/// key row, takes `exp(x − max)`, zeroes keys at and after `nvis`.  Returns (log-sum-exp,
/// 1 / row sum), or (−inf, 0) with the row all zero when no key is visible.
fn softmax_row<A: Acc>(row: &mut [A], krow: &[A], nvis: usize) -> (A, A) {
    let (vis, hidden) = row.split_at_mut(nvis);
    hidden.fill(A::zero());
    let m = A::add_and_max(vis, krow);
    if m == A::neg_infinity() {
        vis.fill(A::zero());
        return (A::neg_infinity(), A::zero());
    }
    let sum = A::exp_shift_sum(vis, None, -m);
    (m + sum.ln(), sum.recip())
}

/// Backward of biased attention on the CPU.
///
/// forward was: `S = scale·Q Kᵀ + γ (+ −inf where masked)`, `P = softmax(S)`, `O = P V`,
/// so with `D_i = Σ_d dO_id O_id`:
/// `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)`, `dQ = scale·dS K`,
/// `dK = scale·dSᵀ Q`, `dγ_j = Σ_{heads, i} dS_ij`.
///
/// q, out, dout (B,NH,Tq,HS); k, v (B,NKV,Tk,HS); lse (B,NH,Tq) from the forward.
/// Writes (overwrites) dq (B,NH,Tq,HS), dk and dv (B,NKV,Tk,HS) and, when given, dbias
/// (B,Tk) — also when `bias` is None (then it is the gradient at γ = 0).  No atomics:
/// the sums over query blocks, over the heads of a group and over the heads for dγ run
/// in a fixed order, so results are bitwise reproducible run to run for a given rayon
/// thread count (the query block size, hence the summation grouping, follows the
/// thread count; see `cpu_q_block`).  Memory beyond the outputs: each head's dK, dV
/// (Tk,HS) and dγ (Tk) partials before the group sums, i.e. `B·NH·Tk·(2·HS+1)` values,
/// plus two score tiles per rayon thread.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_cpu<F: Float + Send + Sync>(
    s: &AttnShape,
    q: &[F],
    k: &[F],
    v: &[F],
    bias: Option<&[F]>,
    key_mask: Option<&[u8]>,
    out: &[F],
    lse: &[F],
    dout: &[F],
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dbias: Option<&mut [F]>,
) -> Result<()> {
    const OP: &str = "attention_bwd_cpu";
    s.check_fwd(
        OP,
        q.len(),
        k.len(),
        v.len(),
        bias.map(|x| x.len()),
        key_mask.map(|x| x.len()),
        out.len(),
        lse.len(),
    )?;
    s.check_grads(
        OP,
        [q.len(), k.len(), v.len()],
        [dout.len(), dq.len(), dk.len(), dv.len()],
        dbias.as_ref().map(|d| d.len()),
    )?;
    let l = s.layout;
    if l != AttnLayout::HEADS {
        let h = AsHeads::new(s, q, k, v);
        let (out, dout) = (heads_of(out, l.out, h.qd), heads_of(dout, l.out, h.qd));
        let mut dq = OutOf::new(dq, l.q, h.qd);
        let mut dk = OutOf::new(dk, l.k, h.kd);
        let mut dv = OutOf::new(dv, l.v, h.kd);
        attention_bwd_cpu(
            &h.s,
            &h.q,
            &h.k,
            &h.v,
            bias,
            key_mask,
            &out,
            lse,
            &dout,
            dq.buf(),
            dk.buf(),
            dv.buf(),
            dbias,
        )?;
        dq.finish();
        dk.finish();
        dv.finish();
        return Ok(());
    }
    let io = BwdIo {
        q,
        k,
        v,
        bias,
        key_mask,
        out,
        lse,
        dout,
    };
    if wants_f64::<F>() {
        bwd_impl::<F, f64>(s, &io, dq, dk, dv, dbias);
    } else {
        bwd_impl::<F, f32>(s, &io, dq, dk, dv, dbias);
    }
    Ok(())
}

/// The read-only inputs of the backward.
struct BwdIo<'a, F> {
    q: &'a [F],
    k: &'a [F],
    v: &'a [F],
    bias: Option<&'a [F]>,
    key_mask: Option<&'a [u8]>,
    out: &'a [F],
    lse: &'a [F],
    dout: &'a [F],
}

/// One head's contribution to the kv-side gradients: dk, dv (Tk,HS) and dγ (Tk).
struct HeadGrads<A> {
    dk: Vec<A>,
    dv: Vec<A>,
    dg: Vec<A>,
}

fn bwd_impl<F: Float + Send + Sync, A: Acc>(
    s: &AttnShape,
    io: &BwdIo<'_, F>,
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dbias: Option<&mut [F]>,
) {
    let (nh, nkv, tq, tk, hs) = (s.nh, s.nkv, s.tq, s.tk, s.hs);
    let group = s.group();
    let scale = A::from(s.scale).unwrap();
    if s.b * nh * tq == 0 {
        // No query row: every gradient is zero (dq is empty).
        dk.fill(F::zero());
        dv.fill(F::zero());
        if let Some(db) = dbias {
            db.fill(F::zero());
        }
        return;
    }
    let qblk = cpu_q_block(s);
    let heads: Vec<HeadGrads<A>> = {
        dq.par_chunks_mut(tq * hs)
            .enumerate()
            .map(|(bh, dq_head)| {
                let (b, h) = (bh / nh, bh % nh);
                let kv0 = (b * nkv + h / group) * tk * hs;
                let kh: Scratch<A> = acc_copy(&io.k[kv0..kv0 + tk * hs]);
                let vh: Scratch<A> = acc_copy(&io.v[kv0..kv0 + tk * hs]);
                let krow: Vec<A> = key_row(b, tk, io.bias, io.key_mask);
                let mut g = HeadGrads {
                    dk: vec![A::zero(); tk * hs],
                    dv: vec![A::zero(); tk * hs],
                    dg: vec![A::zero(); tk],
                };
                let head = bh * tq * hs..(bh + 1) * tq * hs;
                let lse_head = &io.lse[bh * tq..(bh + 1) * tq];
                let mut dqb = Vec::new();
                for i0 in (0..tq).step_by(qblk) {
                    let rows = qblk.min(tq - i0);
                    let r = head.start + i0 * hs..head.start + (i0 + rows) * hs;
                    let blk = BwdBlock::<A>::load(io, r.clone(), &lse_head[i0..i0 + rows]);
                    dqb.clear();
                    dqb.resize(rows * hs, A::zero());
                    bwd_block(s, i0, &blk, &kh, &vh, &krow, scale, &mut dqb, &mut g);
                    from_acc(&dqb, &mut dq_head[i0 * hs..(i0 + rows) * hs]);
                }
                g
            })
            .collect()
    };
    // Sum the heads of each group in head order (deterministic).
    if tk * hs > 0 {
        dk.par_chunks_mut(tk * hs)
            .zip(dv.par_chunks_mut(tk * hs))
            .enumerate()
            .for_each(|(bg, (dk_g, dv_g))| {
                let (b, g) = (bg / nkv, bg % nkv);
                let first = b * nh + g * group;
                let mut ak = heads[first].dk.clone();
                let mut av = heads[first].dv.clone();
                for hg in &heads[first + 1..first + group] {
                    add_into(&mut ak, &hg.dk);
                    add_into(&mut av, &hg.dv);
                }
                from_acc(&ak, dk_g);
                from_acc(&av, dv_g);
            });
    }
    if let Some(db) = dbias {
        for b in 0..s.b {
            let mut acc = vec![A::zero(); tk];
            for hg in &heads[b * nh..(b + 1) * nh] {
                add_into(&mut acc, &hg.dg);
            }
            from_acc(&acc, &mut db[b * tk..(b + 1) * tk]);
        }
    }
}

fn add_into<A: Acc>(acc: &mut [A], x: &[A]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a = *a + b;
    }
}

/// The query-side rows of one backward block in the compute type.
struct BwdBlock<A> {
    /// q, out, dout (rows, HS); lse (rows)
    q: Vec<A>,
    out: Vec<A>,
    dout: Vec<A>,
    lse: Vec<A>,
}

impl<A: Acc> BwdBlock<A> {
    fn load<F: Float>(io: &BwdIo<'_, F>, r: std::ops::Range<usize>, lse: &[F]) -> Self {
        let mut b = BwdBlock {
            q: Vec::new(),
            out: Vec::new(),
            dout: Vec::new(),
            lse: Vec::new(),
        };
        to_acc(&io.q[r.clone()], &mut b.q);
        to_acc(&io.out[r.clone()], &mut b.out);
        to_acc(&io.dout[r], &mut b.dout);
        to_acc(lse, &mut b.lse);
        b
    }
}

/// Backward of one block of queries of one head: writes dqb (rows,HS) and adds into the
/// head's dk, dv (Tk,HS) and dγ (Tk).
#[allow(clippy::too_many_arguments)]
fn bwd_block<A: Acc>(
    s: &AttnShape,
    i0: usize,
    blk: &BwdBlock<A>,
    kh: &[A],
    vh: &[A],
    krow: &[A],
    scale: A,
    dqb: &mut [A],
    g: &mut HeadGrads<A>,
) {
    let hs = s.hs;
    let rows = blk.lse.len();
    let kmax = s.visible_keys(i0 + rows - 1);
    if kmax == 0 {
        dqb.fill(A::zero());
        return;
    }
    // p (rows, kmax) = exp(scale·q kᵀ + γ − lse), recomputed from the saved lse
    let mut p = Scratch::<A>::new(rows * kmax);
    matmul(
        rows,
        kmax,
        hs,
        &mut p,
        kmax,
        false,
        Mat::new(&blk.q, hs, 1),
        Mat::new(kh, 1, hs),
        scale,
    );
    for r in 0..rows {
        let row = &mut p[r * kmax..(r + 1) * kmax];
        let nvis = s.visible_keys(i0 + r);
        let l = blk.lse[r];
        let (vis, hidden) = row.split_at_mut(nvis);
        hidden.fill(A::zero());
        if l == A::neg_infinity() {
            vis.fill(A::zero());
            continue;
        }
        A::exp_shift_sum(vis, Some(krow), -l);
    }
    // dv (kmax, HS) += pᵀ dout
    matmul(
        kmax,
        hs,
        rows,
        &mut g.dv,
        hs,
        true,
        Mat::new(&p, 1, kmax),
        Mat::new(&blk.dout, hs, 1),
        A::one(),
    );
    // dp (rows, kmax) = dout vᵀ
    let mut ds = Scratch::<A>::new(rows * kmax);
    matmul(
        rows,
        kmax,
        hs,
        &mut ds,
        kmax,
        false,
        Mat::new(&blk.dout, hs, 1),
        Mat::new(vh, 1, hs),
        A::one(),
    );
    // ds = p ∘ (dp − D), D_i = Σ_d dout_id out_id;  dγ_j += Σ_i ds_ij
    for r in 0..rows {
        let d: A = blk.dout[r * hs..(r + 1) * hs]
            .iter()
            .zip(&blk.out[r * hs..(r + 1) * hs])
            .map(|(&a, &b)| a * b)
            .sum();
        let prow = &p[r * kmax..(r + 1) * kmax];
        let dsrow = &mut ds[r * kmax..(r + 1) * kmax];
        A::ds_row(dsrow, prow, d, &mut g.dg[..kmax]);
    }
    // dq (rows, HS) = scale · ds k
    matmul(
        rows,
        hs,
        kmax,
        dqb,
        hs,
        false,
        Mat::new(&ds, kmax, 1),
        Mat::new(kh, hs, 1),
        scale,
    );
    // dk (kmax, HS) += scale · dsᵀ q
    matmul(
        kmax,
        hs,
        rows,
        &mut g.dk,
        hs,
        true,
        Mat::new(&ds, 1, kmax),
        Mat::new(&blk.q, hs, 1),
        scale,
    );
}

/// Single-query attention over a KV cache on the CPU (bidirectional over the cache).
///
/// q (B,NH,HS): one new query per (batch, head); k_cache, v_cache (B,NKV,Tmax,HS) of
/// which positions `0..len` are valid; bias (B,len) or None, one value per valid key;
/// writes out (B,NH,HS) and, when given, lse (B,NH), the natural-log normaliser as
/// [`attention_fwd_cpu`] writes it.  `len = 0` (or a bias of −inf on every valid key)
/// gives 0 and an lse of −inf.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_cpu(
    s_b: usize,
    nh: usize,
    nkv: usize,
    tmax: usize,
    len: usize,
    hs: usize,
    scale: f32,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "attention_decode_cpu";
    check_decode(
        OP,
        [s_b, nh, nkv, tmax, len, hs],
        scale,
        [q.len(), k_cache.len(), v_cache.len(), out.len()],
        bias.map(|g| g.len()),
    )?;
    let mut own = Vec::new();
    let lse = match lse {
        Some(l) => {
            check_len(OP, "lse (B,NH)", l.len(), s_b * nh)?;
            l
        }
        None => {
            own.resize(s_b * nh, 0.0);
            &mut own[..]
        }
    };
    if out.is_empty() {
        return Ok(());
    }
    let group = nh / nkv;
    out.par_chunks_mut(hs)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(bh, (o, lse))| {
            let (b, h) = (bh / nh, bh % nh);
            let kv0 = (b * nkv + h / group) * tmax * hs;
            let qv = &q[bh * hs..(bh + 1) * hs];
            let mut p: Vec<f32> = (0..len)
                .map(|j| {
                    let kj = &k_cache[kv0 + j * hs..kv0 + (j + 1) * hs];
                    let dot: f32 = qv.iter().zip(kj).map(|(&a, &b)| a * b).sum();
                    dot * scale + bias.map_or(0.0, |g| g[b * len + j])
                })
                .collect();
            let krow = vec![0.0f32; len];
            o.fill(0.0);
            let (l, inv) = softmax_row(&mut p, &krow, len);
            *lse = l;
            for (j, &pj) in p.iter().enumerate() {
                let vj = &v_cache[kv0 + j * hs..kv0 + (j + 1) * hs];
                for (x, &vv) in o.iter_mut().zip(vj) {
                    *x += pj * inv * vv;
                }
            }
        });
    Ok(())
}
