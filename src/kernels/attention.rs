//! Biased attention (POPEN Eq. 5 and 6): `O = softmax(Q Kᵀ·scale + γ + mask) V` per head,
//! where `γ` is an additive bias per (batch, key position).
//!
//! Causal or bidirectional, grouped-query heads (`NKV` divides `NH`, head `h` reads kv
//! head `h / (NH/NKV)`), head sizes `1..=128`, optional padding mask.  The forward saves
//! the per-row natural-log log-sum-exp and never stores the `Tq×Tk` score matrix; the
//! backward recomputes the scores from it and returns `dQ, dK, dV` and `dγ`.  A
//! single-query decode reads a KV cache.
//!
//! Three pieces under one name: the CUDA kernels in `kernels/attention.cu`, the launch
//! wrappers here (`attention_fwd`, ...), and the CPU twins (`attention_fwd_cpu`, ...),
//! which are also the CPU backend of the transformer.
//!
//! B batch, NH query heads, NKV key/value heads, Tq queries, Tk keys, HS head size.
//!
//! Conventions shared by every function here:
//! - layouts: q (B,NH,Tq,HS), k and v (B,NKV,Tk,HS), bias γ (B,Tk), key_mask (B,Tk) with
//!   1 = attend and 0 = padding, out (B,NH,Tq,HS), lse (B,NH,Tq);
//! - causal: query `i` (0-based in Tq) sees key `j` iff `j <= i + (Tk - Tq)`, i.e. the
//!   queries are the last Tq positions of the key sequence, as with a KV cache;
//! - a row with no visible key (causal cut, padding, or a bias of −inf everywhere) has
//!   `out = 0`, `lse = −inf` and zero gradients;
//! - zero sizes: `B`, `NH`, `Tq` or `Tk` may be 0 (empty outputs; with `Tk = 0` every row
//!   is a row with no visible key); `NKV = 0` and `HS = 0` are errors;
//! - NaN in the inputs is not checked (too costly for the hot path): it propagates.
//!
//! ```
//! use popen::kernels::attention::{attention_fwd_cpu, AttnShape};
//! // one head, two queries over two keys; a large bias on key 1 takes all the weight
//! let s = AttnShape { b: 1, nh: 1, nkv: 1, tq: 2, tk: 2, hs: 1, causal: false, scale: 1.0 };
//! let (q, k, v) = ([0.0f32, 0.0], [0.0f32, 0.0], [1.0f32, 5.0]);
//! let bias = [0.0f32, 50.0];
//! let (mut out, mut lse) = ([0.0f32; 2], [0.0f32; 2]);
//! attention_fwd_cpu(&s, &q, &k, &v, Some(&bias), None, &mut out, &mut lse).unwrap();
//! assert!((out[0] - 5.0).abs() < 1e-5 && (lse[0] - 50.0).abs() < 1e-5);
//! ```
use crate::error::{Error, Result};
use num_traits::Float;
use rayon::prelude::*;

/// Largest head size the kernels support (one warp holds a row of up to 4×32 values).
pub const MAX_HEAD_SIZE: usize = 128;

/// Queries per CPU work item: a block of queries shares one pass over K and V, and its
/// `CPU_Q_BLOCK × Tk` score tile stays in L2 for the usual sequence lengths.
const CPU_Q_BLOCK: usize = 64;

/// Sizes and flags of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    /// Batch size B.
    pub b: usize,
    /// Query heads NH.
    pub nh: usize,
    /// Key/value heads NKV (divides NH).
    pub nkv: usize,
    /// Queries per sequence Tq.
    pub tq: usize,
    /// Keys per sequence Tk.
    pub tk: usize,
    /// Head size HS, `1..=128`.
    pub hs: usize,
    /// Query `i` sees key `j` iff `j <= i + (Tk - Tq)`.
    pub causal: bool,
    /// Multiplies `Q Kᵀ` (usually `1/sqrt(HS)`); must be finite.
    pub scale: f32,
}

impl AttnShape {
    /// Query heads per key/value head (`NH / NKV`).
    pub fn group(&self) -> usize {
        self.nh / self.nkv.max(1)
    }

    /// Keys `0..n` that query `i` may see before padding and bias are applied.
    pub fn visible_keys(&self, i: usize) -> usize {
        if self.causal {
            // j <= i + Tk - Tq  <=>  j < i + 1 + Tk - Tq, clamped to [0, Tk]
            (i + 1 + self.tk).saturating_sub(self.tq).min(self.tk)
        } else {
            self.tk
        }
    }

    /// Number of (query, key) pairs per head that the causal rule lets through; the
    /// forward costs `4·B·NH·pairs·HS` flops (two matrix products), the backward 2.5×.
    pub fn score_pairs(&self) -> usize {
        (0..self.tq).map(|i| self.visible_keys(i)).sum()
    }

    /// Forward flops (`Q Kᵀ` and `P V`), counting only visible pairs.
    pub fn fwd_flops(&self) -> f64 {
        4.0 * (self.b * self.nh * self.hs) as f64 * self.score_pairs() as f64
    }

    /// Backward flops (`P` recomputed, then `dV, dP, dQ, dK`: five products).
    pub fn bwd_flops(&self) -> f64 {
        2.5 * self.fwd_flops()
    }

    /// Checks the sizes and flags; `op` names the caller in the error.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if self.nkv == 0 {
            return Err(Error::arg(op, "nkv (key/value heads) must be at least 1"));
        }
        if self.nh % self.nkv != 0 {
            return Err(Error::arg(
                op,
                format!("nh = {} is not a multiple of nkv = {}", self.nh, self.nkv),
            ));
        }
        if self.hs == 0 || self.hs > MAX_HEAD_SIZE {
            return Err(Error::arg(
                op,
                format!("head size hs = {} is outside 1..={MAX_HEAD_SIZE}", self.hs),
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::arg(
                op,
                format!("scale = {} is not finite", self.scale),
            ));
        }
        // Every length below must fit in usize, and the kernels index with i32 rows.
        let big = [
            self.q_len(),
            self.kv_len(),
            self.b.checked_mul(self.tk),
            self.lse_len(),
        ];
        if big.iter().any(|x| x.is_none_or(|n| n > i32::MAX as usize)) {
            return Err(Error::shape(op, format!("sizes too large: {self:?}")));
        }
        Ok(())
    }

    fn q_len(&self) -> Option<usize> {
        self.b
            .checked_mul(self.nh)?
            .checked_mul(self.tq)?
            .checked_mul(self.hs)
    }
    fn kv_len(&self) -> Option<usize> {
        self.b
            .checked_mul(self.nkv)?
            .checked_mul(self.tk)?
            .checked_mul(self.hs)
    }
    fn lse_len(&self) -> Option<usize> {
        self.b.checked_mul(self.nh)?.checked_mul(self.tq)
    }

    /// Validates and checks every buffer length of a forward call.
    fn check_fwd(
        &self,
        op: &'static str,
        q: usize,
        k: usize,
        v: usize,
        bias: Option<usize>,
        mask: Option<usize>,
        out: usize,
        lse: usize,
    ) -> Result<()> {
        self.validate(op)?;
        let (ql, kvl, bl, ll) = (
            self.b * self.nh * self.tq * self.hs,
            self.b * self.nkv * self.tk * self.hs,
            self.b * self.tk,
            self.b * self.nh * self.tq,
        );
        check(op, "q (B,NH,Tq,HS)", q, ql)?;
        check(op, "k (B,NKV,Tk,HS)", k, kvl)?;
        check(op, "v (B,NKV,Tk,HS)", v, kvl)?;
        if let Some(n) = bias {
            check(op, "bias (B,Tk)", n, bl)?;
        }
        if let Some(n) = mask {
            check(op, "key_mask (B,Tk)", n, bl)?;
        }
        check(op, "out (B,NH,Tq,HS)", out, ql)?;
        check(op, "lse (B,NH,Tq)", lse, ll)
    }
}

fn check(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{what} has {got} elements, expected {want}"),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// CPU twin
// ---------------------------------------------------------------------------------------

/// The two types the CPU twin computes in: f32 for f32 (and narrower) inputs, f64 for
/// f64 inputs (the gradient checks).  The public functions are generic over any
/// `Float`; they convert a head's rows into the compute type, which costs `O(T·HS)` per
/// head against `O(T²·HS)` of arithmetic, and lets the matrix products go to `gemm`.
trait Acc: Float + Send + Sync + Default + std::iter::Sum + 'static {
    /// `x[i] = exp(x[i])` for every element.
    fn exp_inplace(x: &mut [Self]);
}

impl Acc for f64 {
    fn exp_inplace(x: &mut [f64]) {
        for v in x {
            *v = v.exp();
        }
    }
}

impl Acc for f32 {
    fn exp_inplace(x: &mut [f32]) {
        for v in x {
            *v = exp_f32(*v);
        }
    }
}

/// `exp` for f32 without a libm call, so that the softmax loops vectorize: `2^n · e^r`
/// with `r = x − n·ln2` in `[−ln2/2, ln2/2]` (ln2 split in two for an exact product)
/// and a degree-6 Taylor polynomial for `e^r` (relative error about 2 ulp on that
/// range).  The softmax only calls it with `x <= 0` (up to rounding); arguments above
/// `MAX_ARG` saturate, below `MIN_ARG` (and −inf) give 0.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Below this 2^n leaves the normal range of the f32 exponent.
    const MIN_ARG: f32 = -87.3;
    const MAX_ARG: f32 = 80.0;
    // Adding 1.5·2^23 rounds to the nearest integer in the low mantissa bits, without
    // the SSE4.1 `round` that the baseline x86-64 target lacks.
    const ROUND_MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(MIN_ARG, MAX_ARG);
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let ni = t.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = p * scale;
    if x < MIN_ARG {
        0.0
    } else {
        y
    }
}

/// Converts a slice into the compute type.
fn to_acc<F: Float, A: Acc>(src: &[F], dst: &mut Vec<A>) {
    dst.clear();
    dst.extend(src.iter().map(|&x| A::from(x).unwrap_or_else(A::nan)));
}

/// Writes compute-type values into the caller's type.
fn from_acc<F: Float, A: Acc>(src: &[A], dst: &mut [F]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = F::from(s).unwrap_or_else(F::nan);
    }
}

/// A row-major-or-strided matrix view: element (r, c) at `data[r*rs + c*cs]`.
#[derive(Clone, Copy)]
struct Mat<'a, A> {
    data: &'a [A],
    rs: usize,
    cs: usize,
}

impl<'a, A> Mat<'a, A> {
    fn new(data: &'a [A], rs: usize, cs: usize) -> Self {
        Mat { data, rs, cs }
    }
    /// Panics (a broken internal contract) when (rows, cols) reach past the data.
    #[track_caller]
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `c (m×n, row stride ldc) = alpha·a (m×k) · b (k×n)`, plus the old `c` when
/// `accumulate`.
#[track_caller]
fn matmul<A: Acc>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [A],
    ldc: usize,
    accumulate: bool,
    a: Mat<'_, A>,
    b: Mat<'_, A>,
    alpha: A,
) {
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k);
    b.check(k, n);
    assert!(
        ldc >= n && (m - 1) * ldc + n <= c.len(),
        "matmul: c too short"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(A::zero());
            }
        }
        return;
    }
    // SAFETY: every element the product reads or writes lies inside the slices, as
    // checked above (`gemm` touches exactly (m−1)·rs + (n−1)·cs of each operand); the
    // slices do not overlap because `c` is borrowed mutably; `A` is f32 or f64, which
    // `gemm` supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            A::one(),
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Per-key additive row for batch `b`: `γ[j]`, or −inf where `key_mask[j] = 0`.
fn key_row<F: Float, A: Acc>(
    b: usize,
    tk: usize,
    bias: Option<&[F]>,
    key_mask: Option<&[u8]>,
) -> Vec<A> {
    let mut row: Vec<A> = match bias {
        Some(g) => g[b * tk..(b + 1) * tk]
            .iter()
            .map(|&x| A::from(x).unwrap_or_else(A::nan))
            .collect(),
        None => vec![A::zero(); tk],
    };
    if let Some(m) = key_mask {
        for (r, &keep) in row.iter_mut().zip(&m[b * tk..(b + 1) * tk]) {
            if keep == 0 {
                *r = A::neg_infinity();
            }
        }
    }
    row
}

/// True when `F` carries more precision than f32 (then the twin computes in f64).
fn wants_f64<F: Float>() -> bool {
    F::epsilon().to_f64().is_some_and(|e| e < 1e-10)
}

/// Forward of biased attention on the CPU (rayon over (batch, head, query block)).
///
/// q (B,NH,Tq,HS), k and v (B,NKV,Tk,HS), bias γ (B,Tk) or None, key_mask (B,Tk) or
/// None (1 = attend); writes out (B,NH,Tq,HS) and lse (B,NH,Tq), the natural-log
/// log-sum-exp of the scaled and biased scores of each row (−inf for a row that sees no
/// key).  Memory beyond the outputs: one `64 × Tk` score tile per worker.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_cpu<F: Float + Send + Sync>(
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
    if wants_f64::<F>() {
        fwd_impl::<F, f64>(s, q, k, v, bias, key_mask, out, lse);
    } else {
        fwd_impl::<F, f32>(s, q, k, v, bias, key_mask, out, lse);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn fwd_impl<F: Float + Send + Sync, A: Acc>(
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
    out.par_chunks_mut(tq * hs)
        .zip(lse.par_chunks_mut(tq))
        .enumerate()
        .for_each(|(bh, (o_head, l_head))| {
            let (b, h) = (bh / nh, bh % nh);
            let kv0 = (b * nkv + h / group) * tk * hs;
            let (mut kh, mut vh) = (Vec::new(), Vec::new());
            to_acc(&k[kv0..kv0 + tk * hs], &mut kh);
            to_acc(&v[kv0..kv0 + tk * hs], &mut vh);
            let krow: Vec<A> = key_row(b, tk, bias, key_mask);
            let q_head = &q[bh * tq * hs..(bh + 1) * tq * hs];
            o_head
                .par_chunks_mut(CPU_Q_BLOCK * hs)
                .zip(l_head.par_chunks_mut(CPU_Q_BLOCK))
                .enumerate()
                .for_each(|(blk, (o_blk, l_blk))| {
                    let i0 = blk * CPU_Q_BLOCK;
                    let rows = l_blk.len();
                    let mut qb = Vec::new();
                    to_acc(&q_head[i0 * hs..(i0 + rows) * hs], &mut qb);
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
    let mut p = vec![A::zero(); rows * kmax];
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
    for r in 0..rows {
        let row = &mut p[r * kmax..(r + 1) * kmax];
        lb[r] = softmax_row(row, &krow[..kmax], s.visible_keys(i0 + r));
    }
    // ob (rows, HS) = p vh
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
}

/// Turns one row of scaled scores into probabilities in place: adds the key row,
/// zeroes keys at and after `nvis`, and returns the log-sum-exp (−inf, with the row all
/// zero, when no key is visible).
fn softmax_row<A: Acc>(row: &mut [A], krow: &[A], nvis: usize) -> A {
    let (vis, hidden) = row.split_at_mut(nvis);
    hidden.fill(A::zero());
    let mut m = A::neg_infinity();
    for (x, &g) in vis.iter_mut().zip(krow) {
        *x = *x + g;
        m = m.max(*x);
    }
    if m == A::neg_infinity() {
        vis.fill(A::zero());
        return A::neg_infinity();
    }
    for x in vis.iter_mut() {
        *x = *x - m;
    }
    A::exp_inplace(vis);
    let sum: A = vis.iter().copied().sum();
    let inv = sum.recip();
    for x in vis.iter_mut() {
        *x = *x * inv;
    }
    m + sum.ln()
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
/// (B,Tk) — also when `bias` is None (then it is the gradient at γ = 0).  The sums over
/// the heads of a group and over the heads for dγ run in a fixed order: the result is
/// deterministic for any thread count.
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
    check(OP, "dout (B,NH,Tq,HS)", dout.len(), q.len())?;
    check(OP, "dq (B,NH,Tq,HS)", dq.len(), q.len())?;
    check(OP, "dk (B,NKV,Tk,HS)", dk.len(), k.len())?;
    check(OP, "dv (B,NKV,Tk,HS)", dv.len(), v.len())?;
    if let Some(d) = &dbias {
        check(OP, "dbias (B,Tk)", d.len(), s.b * s.tk)?;
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
    let heads: Vec<HeadGrads<A>> = if tq == 0 {
        // dq is empty; every head contributes nothing.
        (0..s.b * nh)
            .map(|_| HeadGrads {
                dk: vec![A::zero(); tk * hs],
                dv: vec![A::zero(); tk * hs],
                dg: vec![A::zero(); tk],
            })
            .collect()
    } else {
        dq.par_chunks_mut(tq * hs)
            .enumerate()
            .map(|(bh, dq_head)| {
                let (b, h) = (bh / nh, bh % nh);
                let kv0 = (b * nkv + h / group) * tk * hs;
                let (mut kh, mut vh) = (Vec::new(), Vec::new());
                to_acc(&io.k[kv0..kv0 + tk * hs], &mut kh);
                to_acc(&io.v[kv0..kv0 + tk * hs], &mut vh);
                let krow: Vec<A> = key_row(b, tk, io.bias, io.key_mask);
                let mut g = HeadGrads {
                    dk: vec![A::zero(); tk * hs],
                    dv: vec![A::zero(); tk * hs],
                    dg: vec![A::zero(); tk],
                };
                let head = bh * tq * hs..(bh + 1) * tq * hs;
                let lse_head = &io.lse[bh * tq..(bh + 1) * tq];
                let mut dqb = Vec::new();
                for i0 in (0..tq).step_by(CPU_Q_BLOCK) {
                    let rows = CPU_Q_BLOCK.min(tq - i0);
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
    let mut p = vec![A::zero(); rows * kmax];
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
        for (x, &gm) in vis.iter_mut().zip(krow) {
            *x = *x + gm - l;
        }
        A::exp_inplace(vis);
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
    let mut ds = vec![A::zero(); rows * kmax];
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
        for ((x, &pv), dg) in dsrow.iter_mut().zip(prow).zip(g.dg.iter_mut()) {
            *x = pv * (*x - d);
            *dg = *dg + *x;
        }
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
/// which positions `0..len` are valid; bias (B,Tmax) or None (only `0..len` is read);
/// writes out (B,NH,HS).  `len = 0` (or a bias of −inf on every valid key) gives 0.
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
) -> Result<()> {
    const OP: &str = "attention_decode_cpu";
    check_decode(OP, s_b, nh, nkv, tmax, len, hs, scale)?;
    check(OP, "q (B,NH,HS)", q.len(), s_b * nh * hs)?;
    check(
        OP,
        "k_cache (B,NKV,Tmax,HS)",
        k_cache.len(),
        s_b * nkv * tmax * hs,
    )?;
    check(
        OP,
        "v_cache (B,NKV,Tmax,HS)",
        v_cache.len(),
        s_b * nkv * tmax * hs,
    )?;
    if let Some(g) = bias {
        check(OP, "bias (B,Tmax)", g.len(), s_b * tmax)?;
    }
    check(OP, "out (B,NH,HS)", out.len(), s_b * nh * hs)?;
    if out.is_empty() {
        return Ok(());
    }
    let group = nh / nkv;
    out.par_chunks_mut(hs).enumerate().for_each(|(bh, o)| {
        let (b, h) = (bh / nh, bh % nh);
        let kv0 = (b * nkv + h / group) * tmax * hs;
        let qv = &q[bh * hs..(bh + 1) * hs];
        let mut p: Vec<f32> = (0..len)
            .map(|j| {
                let kj = &k_cache[kv0 + j * hs..kv0 + (j + 1) * hs];
                let dot: f32 = qv.iter().zip(kj).map(|(&a, &b)| a * b).sum();
                dot * scale + bias.map_or(0.0, |g| g[b * tmax + j])
            })
            .collect();
        let krow = vec![0.0f32; len];
        o.fill(0.0);
        if softmax_row(&mut p, &krow, len) == f32::NEG_INFINITY {
            return;
        }
        for (j, &pj) in p.iter().enumerate() {
            let vj = &v_cache[kv0 + j * hs..kv0 + (j + 1) * hs];
            for (x, &vv) in o.iter_mut().zip(vj) {
                *x += pj * vv;
            }
        }
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_decode(
    op: &'static str,
    b: usize,
    nh: usize,
    nkv: usize,
    tmax: usize,
    len: usize,
    hs: usize,
    scale: f32,
) -> Result<()> {
    let s = AttnShape {
        b,
        nh,
        nkv,
        tq: 1,
        tk: tmax,
        hs,
        causal: false,
        scale,
    };
    s.validate(op)?;
    if len > tmax {
        return Err(Error::arg(
            op,
            format!("len = {len} valid cache positions exceed Tmax = {tmax}"),
        ));
    }
    Ok(())
}
