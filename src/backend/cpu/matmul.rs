//! Matrix products (the `gemm` crate, blocked over rayon; a few rows times a weight
//! matrix by dot products, `few_rows`) and the row-broadcast bias.
use super::few_rows::{matmul_few_rows, matmul_rows_packed, FEW_ROWS, PACKED_ROWS};
use super::{reduce_rows, rows_mut, rows_of, CpuFloat};
use crate::backend::{Accum, MatmulSpec};
use crate::error::{check_len, Result};
use rayon::prelude::*;
use std::any::TypeId;

/// Multiply-adds below which a product runs on one thread (a fork/join costs a few µs).
const GEMM_SERIAL_FLOPS: usize = 1 << 18;
/// Output blocks a large product is cut into, whatever the thread count: the gemm
/// micro-kernels' sums depend on the block's shape, so cutting by thread count would
/// give other bits at 1 thread than at 2 (a run must give the same weights at any
/// thread count).  Four blocks keep two threads balanced under other load.
const GEMM_PARTS: usize = 4;
/// Products at least this many multiply-adds (× 2) are cut into blocks.
const GEMM_SPLIT_FLOPS: usize = 2 * GEMM_SERIAL_FLOPS;
/// Block edges are a multiple of this, the widest gemm micro-kernel edge (AVX-512 f32).
const GEMM_BLOCK_ALIGN: usize = 48;

/// How many output blocks to cut an (m×k)·(k×n) product into (never depends on the
/// thread count).
fn split_parts(m: usize, n: usize, k: usize) -> usize {
    if m * n * k < GEMM_SPLIT_FLOPS {
        return 1;
    }
    let max_parts = m.max(n) / GEMM_BLOCK_ALIGN;
    GEMM_PARTS.min(max_parts).max(1)
}

/// Raw view of one checked product `out (·×n, row-major) (+)= op(a) · op(b)`, with
/// (row stride, column stride) of op(a) and op(b), shareable across rayon tasks that
/// write disjoint blocks of `out`.
#[derive(Clone, Copy)]
struct GemmView<F> {
    n: usize,
    k: usize,
    out: *mut F,
    a: *const F,
    a_rs: isize,
    a_cs: isize,
    b: *const F,
    b_rs: isize,
    b_cs: isize,
    add: bool,
}

// SAFETY: the pointers come from slices borrowed for the whole parallel section, and
// tasks only write disjoint blocks of `out`.
unsafe impl<F: Send> Send for GemmView<F> {}
unsafe impl<F: Sync> Sync for GemmView<F> {}

impl<F: CpuFloat> GemmView<F> {
    /// The view of `out (+)= op(a) · op(b)` for `s` (the lengths checked by the caller).
    fn new(s: MatmulSpec, a: &[F], b: &[F], out: *mut F, add: bool) -> Self {
        let [(a_rs, a_cs), (b_rs, b_cs)] = strides(s);
        Self {
            n: s.n,
            k: s.k,
            out,
            a: a.as_ptr(),
            a_rs,
            a_cs,
            b: b.as_ptr(),
            b_rs,
            b_cs,
            add,
        }
    }

    /// Computes rows `r0..r1`, columns `c0..c1` of `out` with a serial gemm.
    ///
    /// # Safety
    /// `a` and `b` hold (m,k) and (k,n) elements, `out` points to m·n writable ones
    /// (initialized or not: with `add` false they are written, never read);
    /// `r0 ≤ r1 ≤ m`, `c0 ≤ c1 ≤ n`; no other task writes this block; `F` is f32 or f64.
    unsafe fn run(&self, r0: usize, r1: usize, c0: usize, c1: usize) {
        let (ri, ci) = (r0 as isize, c0 as isize);
        gemm::gemm::<F>(
            r1 - r0,
            c1 - c0,
            self.k,
            self.out.offset(ri * self.n as isize + ci),
            1,
            self.n as isize,
            self.add,
            self.a.offset(ri * self.a_rs),
            self.a_cs,
            self.a_rs,
            self.b.offset(ci * self.b_cs),
            self.b_cs,
            self.b_rs,
            F::one(),
            F::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }

    /// Computes all `m` rows of `out`: one serial gemm, or blocks over rayon.
    ///
    /// # Safety
    /// As [`GemmView::run`] for the whole output (`m` rows, `self.n` columns).
    unsafe fn run_blocked(&self, m: usize) {
        let n = self.n;
        // Split the output ourselves into independent blocks, one serial gemm each,
        // instead of gemm's own threading: gemm synchronises its threads after every
        // (k, n) panel and packs the right operand on one thread, so a second thread
        // gave almost no speed-up on these shapes.  One fork/join per product, and
        // the blocks are the same at any thread count, so are the bits.
        let parts = split_parts(m, n, self.k);
        if parts <= 1 {
            // SAFETY: the whole output is one block.
            unsafe { self.run(0, m, 0, n) };
        } else if m >= n {
            let rows = m.div_ceil(parts).next_multiple_of(GEMM_BLOCK_ALIGN);
            (0..m.div_ceil(rows)).into_par_iter().for_each(|p| {
                let r0 = p * rows;
                // SAFETY: blocks cover disjoint row ranges of `out`.
                unsafe { self.run(r0, (r0 + rows).min(m), 0, n) };
            });
        } else {
            let cols = n.div_ceil(parts).next_multiple_of(GEMM_BLOCK_ALIGN);
            (0..n.div_ceil(cols)).into_par_iter().for_each(|p| {
                let c0 = p * cols;
                // SAFETY: blocks cover disjoint column ranges of `out`.
                unsafe { self.run(0, m, c0, (c0 + cols).min(n)) };
            });
        }
    }
}

/// Whether `gemm` serves `F` (f32 and f64; other floats take the plain loop).
fn is_gemm_type<F: 'static>() -> bool {
    TypeId::of::<F>() == TypeId::of::<f32>() || TypeId::of::<F>() == TypeId::of::<f64>()
}

/// A few rows times a (transposed) weight matrix, as in decoding: dot products beat
/// gemm's packing (`few_rows`; f32 only, other types take gemm).
fn is_few_rows(s: MatmulSpec) -> bool {
    !s.ta && s.tb && (2..=FEW_ROWS).contains(&s.m)
}

/// A few rows times a row-major matrix, as in a packed Linear's decoding step
/// (`matmul_rows_packed`; f32 only).
fn is_few_rows_packed(s: MatmulSpec) -> bool {
    !s.ta && !s.tb && (1..=PACKED_ROWS).contains(&s.m)
}

/// (row stride, column stride) of op(a) (M×K) and op(b) (K×N), row-major storage: element
/// (i,kk) of op(a) is at `i·rs + kk·cs`.
fn strides(s: MatmulSpec) -> [(isize, isize); 2] {
    let MatmulSpec { m, k, n, ta, tb } = s;
    let a = if ta { (1, m as isize) } else { (k as isize, 1) };
    let b = if tb { (1, k as isize) } else { (n as isize, 1) };
    [a, b]
}

/// `op(a) · op(b)` in a new buffer.  Where `gemm` computes it, the buffer is not zeroed
/// first: `gemm` with `read_dst = false` writes every element of the output without
/// reading it (it ignores the old value, `alpha = 0` on every path: the micro-kernels,
/// gemv and gevv), so the output is written through a raw pointer into the vector's
/// capacity and its length set afterwards.  Zeroing was a tenth of a training step's
/// CPU samples, all of it on the one thread that runs the model between products.
pub(crate) fn matmul_new<F: CpuFloat>(s: MatmulSpec, a: &[F], b: &[F]) -> Result<Vec<F>> {
    let MatmulSpec { m, k, n, .. } = s;
    check_len("matmul", "a", a.len(), m * k)?;
    check_len("matmul", "b", b.len(), k * n)?;
    if m == 0 || n == 0 || k == 0 || is_few_rows(s) || is_few_rows_packed(s) || !is_gemm_type::<F>()
    {
        let mut out = vec![F::zero(); m * n];
        matmul(s, a, b, &mut out, Accum::Replace)?;
        return Ok(out);
    }
    let mut out = Vec::<F>::with_capacity(m * n);
    let g = GemmView::new(s, a, b, out.as_mut_ptr(), false);
    // SAFETY: `a` and `b` were checked against (m,k) and (k,n); `out` has capacity for
    // m·n elements and no reference to it exists while gemm writes.  gemm writes every
    // element of the m×n output (blocks cover it) without reading it (`add: false`).
    unsafe {
        g.run_blocked(m);
        out.set_len(m * n);
    }
    Ok(out)
}

/// [`matmul`] on each of `batch` products stored one after another.
pub(crate) fn matmul_batched<F: CpuFloat>(
    s: MatmulSpec,
    batch: usize,
    a: &[F],
    b: &[F],
    out: &mut [F],
    acc: Accum,
) -> Result<()> {
    let (la, lb, lo) = (s.m * s.k, s.k * s.n, s.m * s.n);
    check_len("matmul", "a", a.len(), batch * la)?;
    check_len("matmul", "b", b.len(), batch * lb)?;
    check_len("matmul", "out", out.len(), batch * lo)?;
    (0..batch).try_for_each(|i| {
        matmul(
            s,
            &a[i * la..][..la],
            &b[i * lb..][..lb],
            &mut out[i * lo..][..lo],
            acc,
        )
    })
}

pub(crate) fn matmul<F: CpuFloat>(
    s: MatmulSpec,
    a: &[F],
    b: &[F],
    out: &mut [F],
    acc: Accum,
) -> Result<()> {
    let MatmulSpec { m, k, n, .. } = s;
    check_len("matmul", "a", a.len(), m * k)?;
    check_len("matmul", "b", b.len(), k * n)?;
    check_len("matmul", "out", out.len(), m * n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if acc == Accum::Replace {
            out.iter_mut().for_each(|e| *e = F::zero());
        }
        return Ok(());
    }
    if is_few_rows(s) {
        if let (Some(a), Some(b), Some(out)) = (as_f32(a), as_f32(b), as_f32_mut(out)) {
            matmul_few_rows(a, b, out, m, k, n, acc == Accum::Add);
            return Ok(());
        }
    }
    if is_few_rows_packed(s) {
        if let (Some(a), Some(b), Some(out)) = (as_f32(a), as_f32(b), as_f32_mut(out)) {
            matmul_rows_packed(a, b, out, m, k, n, acc == Accum::Add);
            return Ok(());
        }
    }
    if is_gemm_type::<F>() {
        let g = GemmView::new(s, a, b, out.as_mut_ptr(), acc == Accum::Add);
        // SAFETY: the lengths were checked above; `out` is borrowed for the call.
        unsafe { g.run_blocked(m) };
        return Ok(());
    }
    // slow, correct fallback for other float types
    let [(a_rs, a_cs), (b_rs, b_cs)] = strides(s);
    rows_mut(out, n, |i, row| {
        for (j, o) in row.iter_mut().enumerate() {
            let mut sum = F::zero();
            for kk in 0..k {
                let av = a[(i as isize * a_rs + kk as isize * a_cs) as usize];
                let bv = b[(kk as isize * b_rs + j as isize * b_cs) as usize];
                sum = sum + av * bv;
            }
            *o = if acc == Accum::Add { *o + sum } else { sum };
        }
    });
    Ok(())
}

/// `x` as f32 when `F` is f32.
fn as_f32<F: CpuFloat>(x: &[F]) -> Option<&[f32]> {
    (TypeId::of::<F>() == TypeId::of::<f32>())
        // SAFETY: F is f32, so the slice's layout is that of [f32].
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

/// `x` as f32 when `F` is f32.
fn as_f32_mut<F: CpuFloat>(x: &mut [F]) -> Option<&mut [f32]> {
    (TypeId::of::<F>() == TypeId::of::<f32>())
        // SAFETY: F is f32, so the slice's layout is that of [f32].
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
}

pub(super) fn add_bias<F: CpuFloat>(out: &mut [F], bias: &[F], c: usize) -> Result<()> {
    check_len("add_bias", "bias", bias.len(), c)?;
    rows_of("add_bias", out.len(), c)?;
    rows_mut(out, c, |_, r| {
        r.iter_mut().zip(bias).for_each(|(o, b)| *o = *o + *b)
    });
    Ok(())
}

pub(super) fn bias_bwd<F: CpuFloat>(dout: &[F], dbias: &mut [F], c: usize) -> Result<()> {
    // forward: out[n,i] += bias[i]  so: dbias[i] += Σ_n dout[n,i]
    check_len("bias_bwd", "dbias", dbias.len(), c)?;
    let n = rows_of("bias_bwd", dout.len(), c)?;
    reduce_rows(n, c, dbias, |i, part| {
        let r = &dout[i * c..(i + 1) * c];
        part.iter_mut().zip(r).for_each(|(p, d)| *p = *p + *d);
    });
    Ok(())
}
