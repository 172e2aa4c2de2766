//! The CPU twin's compute types, scratch pool, row loops and small matrix product.
use super::AttnShape;
use crate::kernels::rows::RowFloat;
use num_traits::Float;
use std::cell::RefCell;

/// Score elements (queries × keys) of one CPU work item: a block of queries shares one
/// pass over K and V (and one packing of them by `gemm`), and its score tile (two in the
/// backward) stays in L2.  Measured on the B=4, NH=8, T=256, HS=64 bench: blocks of
/// 256 queries ran the forward twice as fast as blocks of 64.
pub(super) const CPU_SCORE_BUDGET: usize = 1 << 16;
/// Fewest queries per CPU work item (below this `gemm` overhead dominates).
pub(super) const CPU_MIN_Q_BLOCK: usize = 16;
/// Work items wanted per rayon thread, so that uneven (causal) blocks balance.
pub(super) const CPU_ITEMS_PER_THREAD: usize = 4;
/// The thread count the query blocks are sized for.  A fixed number, not the pool's
/// size: the blocks decide how sums are grouped (the gemm tiles, dK and dV summed over
/// blocks), and a run must give the same bits at any thread count.
pub(super) const CPU_BLOCK_THREADS: usize = 2;

/// Queries per CPU work item for this shape: as many as the score budget allows, but
/// enough items to keep every rayon thread busy.
pub(super) fn cpu_q_block(s: &AttnShape) -> usize {
    let heads = (s.b * s.nh).max(1);
    let want_items = CPU_BLOCK_THREADS * CPU_ITEMS_PER_THREAD;
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

/// The two types the CPU twin computes in: f32 for f32 (and narrower) inputs, f64 for
/// f64 inputs (the gradient checks).  The public functions are generic over any
/// `Float`; they convert a head's rows into the compute type, which costs `O(T·HS)` per
/// head against `O(T²·HS)` of arithmetic, and lets the matrix products go to `gemm`.
pub(super) trait Acc: RowFloat {
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
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<f64>>) -> R) -> R {
        POOL_F64.with(|p| f(&mut p.borrow_mut()))
    }
}

crate::simd_fn!(fn ds_row_f32(ds: &mut [f32], p: &[f32], d: f32, dg: &mut [f32]) => ds_row::<f32>);

impl Acc for f32 {
    fn ds_row(ds: &mut [f32], p: &[f32], d: f32, dg: &mut [f32]) {
        ds_row_f32(ds, p, d, dg)
    }
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<f32>>) -> R) -> R {
        POOL_F32.with(|p| f(&mut p.borrow_mut()))
    }
}

/// Scratch buffers kept per thread: allocating (and zeroing) the 256 KiB score tiles on
/// every block cost page faults and a memset each time.
pub(super) const POOL_KEEP: usize = 8;

/// A scratch buffer of `n` elements from the thread's pool, returned to it on drop.
/// Its contents are unspecified: every user overwrites it before reading.
pub(super) struct Scratch<A: Acc> {
    buf: Vec<A>,
    n: usize,
}

impl<A: Acc> Scratch<A> {
    pub(super) fn new(n: usize) -> Self {
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

/// One row of the backward's `dS = P ∘ (dP − D)`, in place over `dP`, and `dγ += dS`.
#[inline(always)]
pub(super) fn ds_row<A: Acc>(ds: &mut [A], p: &[A], d: A, dg: &mut [A]) {
    for ((x, &pv), g) in ds.iter_mut().zip(p).zip(dg.iter_mut()) {
        *x = pv * (*x - d);
        *g = *g + *x;
    }
}

/// Converts a slice into the compute type.
pub(super) fn to_acc<F: Float, A: Acc>(src: &[F], dst: &mut Vec<A>) {
    dst.clear();
    dst.extend(src.iter().map(|&x| A::from(x).unwrap_or_else(A::nan)));
}

/// A slice in the compute type: the slice itself when it already is of that type (the
/// f32 forward reads a KV cache in place, as the kernel does), else a pooled copy.
pub(super) enum AccView<'a, A: Acc> {
    Borrowed(&'a [A]),
    Owned(Scratch<A>),
}

impl<A: Acc> std::ops::Deref for AccView<'_, A> {
    type Target = [A];
    fn deref(&self) -> &[A] {
        match self {
            AccView::Borrowed(x) => x,
            AccView::Owned(x) => x,
        }
    }
}

/// `src` as the compute type, borrowed when `F` is `A`.
pub(super) fn acc_view<F: Float + 'static, A: Acc>(src: &[F]) -> AccView<'_, A> {
    if std::any::TypeId::of::<F>() == std::any::TypeId::of::<A>() {
        // SAFETY: F and A are the same type (equal TypeIds), so the slice's pointer,
        // length, alignment and lifetime are those of a &[A].
        let same = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<A>(), src.len()) };
        AccView::Borrowed(same)
    } else {
        AccView::Owned(acc_copy(src))
    }
}

/// A pooled copy of a slice in the compute type.
pub(super) fn acc_copy<F: Float, A: Acc>(src: &[F]) -> Scratch<A> {
    let mut d = Scratch::new(src.len());
    for (d, &x) in d.iter_mut().zip(src) {
        *d = A::from(x).unwrap_or_else(A::nan);
    }
    d
}

/// Writes compute-type values into the caller's type.
pub(super) fn from_acc<F: Float, A: Acc>(src: &[A], dst: &mut [F]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = F::from(s).unwrap_or_else(F::nan);
    }
}

/// A row-major-or-strided matrix view: element (r, c) at `data[r*rs + c*cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a, A> {
    data: &'a [A],
    rs: usize,
    cs: usize,
}

impl<'a, A> Mat<'a, A> {
    pub(super) fn new(data: &'a [A], rs: usize, cs: usize) -> Self {
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
pub(super) fn matmul<A: Acc>(
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
pub(super) fn key_row<F: Float, A: Acc>(
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
pub(super) fn wants_f64<F: Float>() -> bool {
    F::epsilon().to_f64().is_some_and(|e| e < 1e-10)
}
