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
use super::fastmath::exp_f32;
use crate::error::{check_len, Error, Result};
use num_traits::Float;
use rayon::prelude::*;
use std::cell::RefCell;

/// Largest head size the kernels support (one warp holds a row of up to 4×32 values).
pub const MAX_HEAD_SIZE: usize = 128;

/// Score elements (queries × keys) of one CPU work item: a block of queries shares one
/// pass over K and V (and one packing of them by `gemm`), and its score tile (two in the
/// backward) stays in L2.  Measured on the B=4, NH=8, T=256, HS=64 bench: blocks of
/// 256 queries ran the forward twice as fast as blocks of 64.
const CPU_SCORE_BUDGET: usize = 1 << 16;
/// Fewest queries per CPU work item (below this `gemm` overhead dominates).
const CPU_MIN_Q_BLOCK: usize = 16;
/// Work items wanted per rayon thread, so that uneven (causal) blocks balance.
const CPU_ITEMS_PER_THREAD: usize = 4;

/// Queries per CPU work item for this shape: as many as the score budget allows, but
/// enough items to keep every rayon thread busy.
fn cpu_q_block(s: &AttnShape) -> usize {
    let heads = (s.b * s.nh).max(1);
    let want_items = rayon::current_num_threads() * CPU_ITEMS_PER_THREAD;
    let per_head = want_items.div_ceil(heads);
    let for_threads = s.tq.div_ceil(per_head);
    let mut q = (CPU_SCORE_BUDGET / s.tk.max(1)).min(for_threads);
    if s.causal {
        // At least two blocks a head, so that the first skips the keys after its last
        // query (measured: −12% forward time at T = 256).
        q = q.min(s.tq.div_ceil(2));
    }
    q.max(CPU_MIN_Q_BLOCK)
}

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
        if !self.nh.is_multiple_of(self.nkv) {
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
    #[allow(clippy::too_many_arguments)]
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
        check_len(op, "q (B,NH,Tq,HS)", q, ql)?;
        check_len(op, "k (B,NKV,Tk,HS)", k, kvl)?;
        check_len(op, "v (B,NKV,Tk,HS)", v, kvl)?;
        if let Some(n) = bias {
            check_len(op, "bias (B,Tk)", n, bl)?;
        }
        if let Some(n) = mask {
            check_len(op, "key_mask (B,Tk)", n, bl)?;
        }
        check_len(op, "out (B,NH,Tq,HS)", out, ql)?;
        check_len(op, "lse (B,NH,Tq)", lse, ll)
    }

    /// The backward's gradient sizes, given q, k, v lengths already checked by
    /// [`AttnShape::check_fwd`]: dout and dq like q, dk like k, dv like v, dbias (B,Tk).
    fn check_grads(
        &self,
        op: &'static str,
        [q, k, v]: [usize; 3],
        [dout, dq, dk, dv]: [usize; 4],
        dbias: Option<usize>,
    ) -> Result<()> {
        check_len(op, "dout (B,NH,Tq,HS)", dout, q)?;
        check_len(op, "dq (B,NH,Tq,HS)", dq, q)?;
        check_len(op, "dk (B,NKV,Tk,HS)", dk, k)?;
        check_len(op, "dv (B,NKV,Tk,HS)", dv, v)?;
        if let Some(n) = dbias {
            check_len(op, "dbias (B,Tk)", n, self.b * self.tk)?;
        }
        Ok(())
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
    /// `exp(x)`; inlined into the row loops below so that they vectorize.
    fn exp1(x: Self) -> Self;
    /// [`add_and_max`], possibly through a wider instruction set.
    fn add_and_max(x: &mut [Self], g: &[Self]) -> Self {
        add_and_max(x, g)
    }
    /// [`exp_shift_sum`], possibly through a wider instruction set.
    fn exp_shift_sum(x: &mut [Self], g: Option<&[Self]>, c: Self) -> Self {
        exp_shift_sum(x, g, c)
    }
    /// [`ds_row`], possibly through a wider instruction set.
    fn ds_row(ds: &mut [Self], p: &[Self], d: Self, dg: &mut [Self]) {
        ds_row(ds, p, d, dg)
    }
    /// Runs `f` on this thread's pool of scratch buffers of this type.
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R;
}

thread_local! {
    static POOL_F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static POOL_F64: RefCell<Vec<Vec<f64>>> = const { RefCell::new(Vec::new()) };
}

impl Acc for f64 {
    #[inline(always)]
    fn exp1(x: f64) -> f64 {
        x.exp()
    }
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<f64>>) -> R) -> R {
        POOL_F64.with(|p| f(&mut p.borrow_mut()))
    }
}

impl Acc for f32 {
    #[inline(always)]
    fn exp1(x: f32) -> f32 {
        exp_f32(x)
    }
    fn add_and_max(x: &mut [f32], g: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked at run time).
            return unsafe { simd::add_and_max_avx512(x, g) };
        }
        add_and_max(x, g)
    }
    fn exp_shift_sum(x: &mut [f32], g: Option<&[f32]>, c: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked at run time).
            return unsafe { simd::exp_shift_sum_avx512(x, g, c) };
        }
        exp_shift_sum(x, g, c)
    }
    fn ds_row(ds: &mut [f32], p: &[f32], d: f32, dg: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked at run time).
            return unsafe { simd::ds_row_avx512(ds, p, d, dg) };
        }
        ds_row(ds, p, d, dg)
    }
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<f32>>) -> R) -> R {
        POOL_F32.with(|p| f(&mut p.borrow_mut()))
    }
}

/// Scratch buffers kept per thread: allocating (and zeroing) the 256 KiB score tiles on
/// every block cost page faults and a memset each time.
const POOL_KEEP: usize = 8;

/// A scratch buffer of `n` elements from the thread's pool, returned to it on drop.
/// Its contents are unspecified: every user overwrites it before reading.
struct Scratch<A: Acc> {
    buf: Vec<A>,
    n: usize,
}

impl<A: Acc> Scratch<A> {
    fn new(n: usize) -> Self {
        let mut buf = A::with_pool(|p| p.pop()).unwrap_or_default();
        if buf.len() < n {
            buf.resize(n, A::zero());
        }
        Scratch { buf, n }
    }
}

impl<A: Acc> std::ops::Deref for Scratch<A> {
    type Target = [A];
    fn deref(&self) -> &[A] {
        &self.buf[..self.n]
    }
}

impl<A: Acc> std::ops::DerefMut for Scratch<A> {
    fn deref_mut(&mut self) -> &mut [A] {
        &mut self.buf[..self.n]
    }
}

impl<A: Acc> Drop for Scratch<A> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        A::with_pool(|p| {
            if p.len() < POOL_KEEP {
                p.push(buf);
            }
        });
    }
}

/// The f32 row loops compiled for AVX-512 (16 lanes) and picked at run time: the crate
/// builds for baseline x86-64 (4-lane SSE2), where the softmax's `exp` took a third of
/// the forward's time on an AVX-512 machine.
#[cfg(target_arch = "x86_64")]
mod simd {
    pub(super) fn has_avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    }
    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn add_and_max_avx512(x: &mut [f32], g: &[f32]) -> f32 {
        super::add_and_max(x, g)
    }
    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn ds_row_avx512(ds: &mut [f32], p: &[f32], d: f32, dg: &mut [f32]) {
        super::ds_row(ds, p, d, dg)
    }
    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn exp_shift_sum_avx512(x: &mut [f32], g: Option<&[f32]>, c: f32) -> f32 {
        super::exp_shift_sum(x, g, c)
    }
}

/// Independent accumulators in the row loops: breaks the add/max dependency chain and
/// lets the compiler keep them in SIMD registers.
const LANES: usize = 16;

/// `x[j] += g[j]` for every `j`; returns `max_j x[j]` (−inf when empty).
#[inline(always)]
fn add_and_max<A: Acc>(x: &mut [A], g: &[A]) -> A {
    let g = &g[..x.len()];
    let n = x.len() / LANES * LANES;
    let (xa, xb) = x.split_at_mut(n);
    let (ga, gb) = g.split_at(n);
    let mut acc = [A::neg_infinity(); LANES];
    for (xc, gc) in xa.chunks_exact_mut(LANES).zip(ga.chunks_exact(LANES)) {
        for i in 0..LANES {
            let v = xc[i] + gc[i];
            xc[i] = v;
            if v > acc[i] {
                acc[i] = v;
            }
        }
    }
    for (xv, &gv) in xb.iter_mut().zip(gb) {
        *xv = *xv + gv;
        if *xv > acc[0] {
            acc[0] = *xv;
        }
    }
    acc.iter()
        .fold(A::neg_infinity(), |m, &v| if v > m { v } else { m })
}

/// `x[j] = exp(x[j] + g[j] + c)` (`g` absent: zero); returns `Σ_j x[j]`.
#[inline(always)]
fn exp_shift_sum<A: Acc>(x: &mut [A], g: Option<&[A]>, c: A) -> A {
    let n = x.len() / LANES * LANES;
    let mut acc = [A::zero(); LANES];
    match g {
        Some(g) => {
            let g = &g[..x.len()];
            let (xa, xb) = x.split_at_mut(n);
            let (ga, gb) = g.split_at(n);
            for (xc, gc) in xa.chunks_exact_mut(LANES).zip(ga.chunks_exact(LANES)) {
                for i in 0..LANES {
                    let v = A::exp1(xc[i] + gc[i] + c);
                    xc[i] = v;
                    acc[i] = acc[i] + v;
                }
            }
            for (xv, &gv) in xb.iter_mut().zip(gb) {
                *xv = A::exp1(*xv + gv + c);
                acc[0] = acc[0] + *xv;
            }
        }
        None => {
            let (xa, xb) = x.split_at_mut(n);
            for xc in xa.chunks_exact_mut(LANES) {
                for i in 0..LANES {
                    let v = A::exp1(xc[i] + c);
                    xc[i] = v;
                    acc[i] = acc[i] + v;
                }
            }
            for xv in xb.iter_mut() {
                *xv = A::exp1(*xv + c);
                acc[0] = acc[0] + *xv;
            }
        }
    }
    acc.iter().copied().sum()
}

/// One row of the backward's `dS = P ∘ (dP − D)`, in place over `dP`, and `dγ += dS`.
#[inline(always)]
fn ds_row<A: Acc>(ds: &mut [A], p: &[A], d: A, dg: &mut [A]) {
    for ((x, &pv), g) in ds.iter_mut().zip(p).zip(dg.iter_mut()) {
        *x = pv * (*x - d);
        *g = *g + *x;
    }
}

/// Converts a slice into the compute type.
fn to_acc<F: Float, A: Acc>(src: &[F], dst: &mut Vec<A>) {
    dst.clear();
    dst.extend(src.iter().map(|&x| A::from(x).unwrap_or_else(A::nan)));
}

/// A pooled copy of a slice in the compute type.
fn acc_copy<F: Float, A: Acc>(src: &[F]) -> Scratch<A> {
    let mut d = Scratch::new(src.len());
    for (d, &x) in d.iter_mut().zip(src) {
        *d = A::from(x).unwrap_or_else(A::nan);
    }
    d
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
#[allow(clippy::too_many_arguments)]
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
/// key).  Memory beyond the outputs: per rayon thread, a score tile of at most
/// `max(2^16, 16·Tk)` elements (`cpu_q_block`) and copies of one head's K and V; never Tq×Tk.
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
    let qblk = cpu_q_block(s);
    out.par_chunks_mut(tq * hs)
        .zip(lse.par_chunks_mut(tq))
        .enumerate()
        .for_each(|(bh, (o_head, l_head))| {
            let (b, h) = (bh / nh, bh % nh);
            let kv0 = (b * nkv + h / group) * tk * hs;
            let kh: Scratch<A> = acc_copy(&k[kv0..kv0 + tk * hs]);
            let vh: Scratch<A> = acc_copy(&v[kv0..kv0 + tk * hs]);
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
    check_decode(
        OP,
        [s_b, nh, nkv, tmax, len, hs],
        scale,
        [q.len(), k_cache.len(), v_cache.len(), out.len()],
        bias.map(|g| g.len()),
    )?;
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
        let (_, inv) = softmax_row(&mut p, &krow, len);
        for (j, &pj) in p.iter().enumerate() {
            let vj = &v_cache[kv0 + j * hs..kv0 + (j + 1) * hs];
            for (x, &vv) in o.iter_mut().zip(vj) {
                *x += pj * inv * vv;
            }
        }
    });
    Ok(())
}

/// Shape, scale, `len` and buffer sizes of a decode step: q (B,NH,HS),
/// k_cache and v_cache (B,NKV,Tmax,HS), out (B,NH,HS), bias (B,Tmax).
fn check_decode(
    op: &'static str,
    [b, nh, nkv, tmax, len, hs]: [usize; 6],
    scale: f32,
    [q, k_cache, v_cache, out]: [usize; 4],
    bias: Option<usize>,
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
    check_len(op, "q (B,NH,HS)", q, b * nh * hs)?;
    check_len(op, "k_cache (B,NKV,Tmax,HS)", k_cache, b * nkv * tmax * hs)?;
    check_len(op, "v_cache (B,NKV,Tmax,HS)", v_cache, b * nkv * tmax * hs)?;
    if let Some(n) = bias {
        check_len(op, "bias (B,Tmax)", n, b * tmax)?;
    }
    check_len(op, "out (B,NH,HS)", out, b * nh * hs)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Launch wrappers (emulator or GPU): `kernels/attention.cu`
// ---------------------------------------------------------------------------------------

/// Threads per block of every attention kernel (4 warps).
const GPU_THREADS: u32 = 128;
/// Queries per forward/backward block and keys per tile (one key per lane).
const GPU_TILE: usize = 32;
/// Row stride of the P / dS tiles in the backward (odd: conflict-free columns).
const GPU_PS: usize = 33;
/// Keys per decode block (one per thread).
const GPU_DEC_CHUNK: usize = 128;
/// Query rows per block of the backward preprocess (one warp each).
const GPU_PRE_ROWS: usize = 4;

/// Shared-memory row strides of the kernels' tiles: q side a multiple of 4 (float4
/// reads), k side one more (odd: one row per lane without bank conflicts).
fn tile_strides(hs: usize) -> (usize, usize) {
    let qs = hs.div_ceil(4) * 4;
    (qs, qs + 1)
}

/// Dynamic shared memory of `attention_fwd_*`: q tile, k and v tiles, P, key row.
fn fwd_shmem(hs: usize) -> u32 {
    let (qs, ks) = tile_strides(hs);
    (4 * (GPU_TILE * qs + 2 * GPU_TILE * ks + GPU_TILE * GPU_TILE + GPU_TILE)) as u32
}

/// Dynamic shared memory of `attention_bwd_f32`: q, dout, k, v tiles, P and dS, key
/// row, lse and D.
fn bwd_shmem(hs: usize) -> u32 {
    let (qs, ks) = tile_strides(hs);
    (4 * (2 * GPU_TILE * qs + 2 * GPU_TILE * ks + 2 * GPU_TILE * GPU_PS + 3 * GPU_TILE)) as u32
}

fn opt_arg<T: super::Elem>(b: Option<&DeviceBuf<T>>) -> KArg {
    b.map_or(KArg::Ptr(0), |x| x.arg())
}

/// A 1-D grid of `n` blocks of [`GPU_THREADS`], or an error when it does not fit.
fn grid(op: &'static str, n: usize, shmem: u32) -> Result<LaunchCfg> {
    let g = u32::try_from(n)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::shape(op, format!("{n} blocks do not fit one grid")))?;
    Ok(LaunchCfg::new([g, 1, 1], [GPU_THREADS, 1, 1], shmem))
}

fn i32_arg(x: usize) -> KArg {
    // validate() bounds every size by i32::MAX.
    KArg::I32(x as i32)
}

/// The shape arguments every attention kernel takes after its buffers.
fn shape_args(s: &AttnShape) -> [KArg; 8] {
    [
        i32_arg(s.b),
        i32_arg(s.nh),
        i32_arg(s.nkv),
        i32_arg(s.tq),
        i32_arg(s.tk),
        i32_arg(s.hs),
        KArg::I32(i32::from(s.causal)),
        KArg::F32(s.scale),
    ]
}

use super::{Device, DeviceBuf, KArg, LaunchCfg};

/// Forward on a device (`attention_fwd_f32`): same contract as [`attention_fwd_cpu`].
///
/// q (B,NH,Tq,HS), k and v (B,NKV,Tk,HS), bias (B,Tk) or None, key_mask (B,Tk) or None;
/// writes out (B,NH,Tq,HS) and lse (B,NH,Tq).
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    fwd_launch(
        dev,
        "attention_fwd",
        "attention_fwd_f32",
        s,
        [q.len(), k.len(), v.len(), out.len()],
        [q.arg(), k.arg(), v.arg()],
        bias,
        key_mask,
        out.arg_mut(),
        lse,
    )
}

/// Forward with bf16 q, k, v and out (`attention_fwd_bf16`; the buffers hold bf16 bit
/// patterns, e.g. `half::bf16::to_bits`); bias, lse and all arithmetic are f32.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_bf16(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<u16>,
    k: &DeviceBuf<u16>,
    v: &DeviceBuf<u16>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &mut DeviceBuf<u16>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    fwd_launch(
        dev,
        "attention_fwd_bf16",
        "attention_fwd_bf16",
        s,
        [q.len(), k.len(), v.len(), out.len()],
        [q.arg(), k.arg(), v.arg()],
        bias,
        key_mask,
        out.arg_mut(),
        lse,
    )
}

#[allow(clippy::too_many_arguments)]
fn fwd_launch(
    dev: &Device,
    op: &'static str,
    kernel: &str,
    s: &AttnShape,
    lens: [usize; 4],
    qkv: [KArg; 3],
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: KArg,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    let [ql, kl, vl, ol] = lens;
    s.check_fwd(
        op,
        ql,
        kl,
        vl,
        bias.map(|x| x.len()),
        key_mask.map(|x| x.len()),
        ol,
        lse.len(),
    )?;
    if lse.is_empty() {
        return Ok(()); // no query row
    }
    let cfg = grid(op, s.tq.div_ceil(GPU_TILE) * s.nh * s.b, fwd_shmem(s.hs))?;
    let mut args = vec![
        out,
        lse.arg_mut(),
        qkv[0],
        qkv[1],
        qkv[2],
        opt_arg(bias),
        opt_arg(key_mask),
    ];
    args.extend(shape_args(s));
    dev.launch(kernel, cfg, &args)
}

/// Backward on a device: `attention_bwd_preprocess_f32` (D = rowsum(dout ∘ out)), then
/// `attention_bwd_f32` (dK, dV and per-kv-head dγ from key-tile blocks, dQ from
/// query-tile blocks, no atomics: deterministic), then `attention_bwd_dbias_f32` (sum
/// of dγ over kv heads) when `dbias` is given.  Same contract as [`attention_bwd_cpu`]:
/// every gradient is overwritten.  Allocates D (B,NH,Tq) and, with dbias, a
/// (B,NKV,Tk) partial.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dev: &Device,
    s: &AttnShape,
    q: &DeviceBuf<f32>,
    k: &DeviceBuf<f32>,
    v: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    key_mask: Option<&DeviceBuf<u8>>,
    out: &DeviceBuf<f32>,
    lse: &DeviceBuf<f32>,
    dout: &DeviceBuf<f32>,
    dq: &mut DeviceBuf<f32>,
    dk: &mut DeviceBuf<f32>,
    dv: &mut DeviceBuf<f32>,
    dbias: Option<&mut DeviceBuf<f32>>,
) -> Result<()> {
    const OP: &str = "attention_bwd";
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
    let rows = s.b * s.nh * s.tq;
    if rows == 0 {
        // No query row: zero kv-side gradients (dq is empty).
        let zero = |dev: &Device, x: &mut DeviceBuf<f32>| dev.write(x, &vec![0.0; x.len()]);
        zero(dev, dk)?;
        zero(dev, dv)?;
        if let Some(db) = dbias {
            zero(dev, db)?;
        }
        return Ok(());
    }
    let mut d = dev.zeros::<f32>(rows)?;
    let pre = grid(OP, rows.div_ceil(GPU_PRE_ROWS), 0)?;
    dev.launch(
        "attention_bwd_preprocess_f32",
        pre,
        &[
            d.arg_mut(),
            out.arg(),
            dout.arg(),
            i32_arg(rows),
            i32_arg(s.hs),
        ],
    )?;
    let mut part = match dbias {
        Some(_) if s.b * s.tk > 0 => Some(dev.zeros::<f32>(s.b * s.nkv * s.tk)?),
        _ => None,
    };
    let nkvb = s.tk.div_ceil(GPU_TILE) * s.nkv * s.b;
    let nqb = s.tq.div_ceil(GPU_TILE) * s.nh * s.b;
    let cfg = grid(OP, nkvb + nqb, bwd_shmem(s.hs))?;
    let mut args = vec![
        dq.arg_mut(),
        dk.arg_mut(),
        dv.arg_mut(),
        part.as_mut().map_or(KArg::Ptr(0), |p| p.arg_mut()),
        q.arg(),
        k.arg(),
        v.arg(),
        opt_arg(bias),
        opt_arg(key_mask),
        lse.arg(),
        d.arg(),
        dout.arg(),
    ];
    args.extend(shape_args(s));
    dev.launch("attention_bwd_f32", cfg, &args)?;
    if let (Some(db), Some(p)) = (dbias, part.as_ref()) {
        dev.launch(
            "attention_bwd_dbias_f32",
            LaunchCfg::linear(s.b * s.tk, GPU_THREADS),
            &[
                db.arg_mut(),
                p.arg(),
                i32_arg(s.b),
                i32_arg(s.nkv),
                i32_arg(s.tk),
            ],
        )?;
    }
    Ok(())
}

/// Single-query decode over a KV cache on a device (`attention_decode_f32` split over
/// 128-key chunks, then `attention_decode_reduce_f32`): same contract as
/// [`attention_decode_cpu`].  Allocates a (B,NH,ceil(len/128),HS+2) partial.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    dev: &Device,
    s_b: usize,
    nh: usize,
    nkv: usize,
    tmax: usize,
    len: usize,
    hs: usize,
    scale: f32,
    q: &DeviceBuf<f32>,
    k_cache: &DeviceBuf<f32>,
    v_cache: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    out: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "attention_decode";
    check_decode(
        OP,
        [s_b, nh, nkv, tmax, len, hs],
        scale,
        [q.len(), k_cache.len(), v_cache.len(), out.len()],
        bias.map(|g| g.len()),
    )?;
    if out.is_empty() {
        return Ok(());
    }
    let nsplit = len.div_ceil(GPU_DEC_CHUNK);
    // With len = 0 the reduce sees no split and writes zeros.
    let mut part = dev.zeros::<f32>((s_b * nh * nsplit * (hs + 2)).max(1))?;
    let dims = [
        i32_arg(s_b),
        i32_arg(nh),
        i32_arg(nkv),
        i32_arg(tmax),
        i32_arg(len),
        i32_arg(hs),
        KArg::F32(scale),
        i32_arg(nsplit),
    ];
    if nsplit > 0 {
        let mut args = vec![
            part.arg_mut(),
            q.arg(),
            k_cache.arg(),
            v_cache.arg(),
            opt_arg(bias),
        ];
        args.extend(dims);
        dev.launch(
            "attention_decode_f32",
            grid(OP, nsplit * nh * s_b, 0)?,
            &args,
        )?;
    }
    dev.launch(
        "attention_decode_reduce_f32",
        grid(OP, nh * s_b, 0)?,
        &[
            out.arg_mut(),
            part.arg(),
            i32_arg(s_b),
            i32_arg(nh),
            i32_arg(hs),
            i32_arg(nsplit),
        ],
    )
}
