//! The CPU backend: plain loops, rayon over independent rows, the `gemm` crate for
//! matrix products.  It is the reference every other backend is tested against, so it
//! favours clarity; per-thread partial sums merged with `reduce` give the parameter
//! gradients.
//!
//! Sizes: N rows, C channels, V vocabulary, B batch, T tokens, NH heads, HS head size.
use super::{image, Accum, Act, AdamWStep, AttnShape, Backend, Conv2dGeom, MatmulSpec};
use crate::error::{check_len, Error, Result};
use num_traits::Float;
use rayon::prelude::*;
use std::any::TypeId;

/// Rows per rayon task: below this a row loop is cheaper than a task split.
const MIN_ROWS_PER_TASK: usize = 16;
/// Elements per rayon task for elementwise ops.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;
/// √(2/π), for the tanh GELU.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// 1/√2, for the erf GELU.
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
/// CLIP's quick-GELU slope.
const QUICK_GELU_K: f64 = 1.702;

/// The element types the CPU backend computes in (f32 for models, f64 for gradient checks).
pub trait CpuFloat: Float + Send + Sync + std::fmt::Debug + 'static {}
impl<T: Float + Send + Sync + std::fmt::Debug + 'static> CpuFloat for T {}

/// The CPU backend (reference).  Uses rayon's current thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Multiply-adds below which a product runs on one thread (a fork/join costs a few µs).
const GEMM_SERIAL_FLOPS: usize = 1 << 18;
/// Output blocks per rayon thread, so that a thread slowed by other load is balanced.
const GEMM_BLOCKS_PER_THREAD: usize = 2;
/// Block edges are a multiple of this, the widest gemm micro-kernel edge (AVX-512 f32).
const GEMM_BLOCK_ALIGN: usize = 48;

/// How many output blocks to cut an (m×k)·(k×n) product into for `threads` threads.
fn split_parts(m: usize, n: usize, k: usize, threads: usize) -> usize {
    if threads <= 1 || m * n * k < GEMM_SERIAL_FLOPS * threads {
        return 1;
    }
    let max_parts = m.max(n) / GEMM_BLOCK_ALIGN;
    (threads * GEMM_BLOCKS_PER_THREAD).min(max_parts).max(1)
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
    /// Computes rows `r0..r1`, columns `c0..c1` of `out` with a serial gemm.
    ///
    /// # Safety
    /// The slices' lengths were checked against (m,k), (k,n), (m,n); `r0 ≤ r1 ≤ m`,
    /// `c0 ≤ c1 ≤ n`; no other task writes this block; `F` is f32 or f64.
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
}

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
    let total = (0..n)
        .into_par_iter()
        .with_min_len(MIN_ROWS_PER_TASK)
        .fold(
            || vec![F::zero(); c],
            |mut part, i| {
                per_row(i, &mut part);
                part
            },
        )
        .reduce(
            || vec![F::zero(); c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x = *x + *y);
                a
            },
        );
    acc.iter_mut().zip(&total).for_each(|(x, y)| *x = *x + *y);
}

fn erf<F: CpuFloat>(x: F) -> F {
    f(libm::erf(x.to_f64().unwrap_or(f64::NAN)))
}

fn sigmoid<F: CpuFloat>(x: F) -> F {
    F::one() / (F::one() + exp(-x))
}

/// `e^x`.  In f32 a branch-free polynomial instead of a libm call: SiLU and the
/// log-softmax run it millions of times per step, and inline it is several times
/// faster (and vectorizable).  Other float types (f64 for gradient checks) use `exp`.
#[inline(always)]
fn exp<F: CpuFloat>(x: F) -> F {
    if TypeId::of::<F>() == TypeId::of::<f32>() {
        let y = exp_f32(x.to_f32().unwrap_or(f32::NAN));
        F::from(y).unwrap_or(F::nan())
    } else {
        x.exp()
    }
}

/// The crate's one fast f32 `exp` (see [`crate::kernels::fastmath`]).
pub use crate::kernels::fastmath::exp_f32;

fn act_value<F: CpuFloat>(act: Act, x: F) -> F {
    let half: F = f(0.5);
    match act {
        Act::QuickGelu => x * sigmoid(f::<F>(QUICK_GELU_K) * x),
        Act::GeluErf => half * x * (F::one() + erf(x * f(FRAC_1_SQRT_2))),
        Act::GeluTanh => {
            let u = f::<F>(SQRT_2_OVER_PI) * (x + f::<F>(0.044715) * x * x * x);
            half * x * (F::one() + u.tanh())
        }
        Act::Silu => x * sigmoid(x),
        Act::Relu => x.max(F::zero()),
        Act::Sigmoid => sigmoid(x),
    }
}

fn act_deriv<F: CpuFloat>(act: Act, x: F) -> F {
    let half: F = f(0.5);
    match act {
        // d/dx x σ(kx) = σ(kx) + k x σ(kx)(1 − σ(kx))
        Act::QuickGelu => {
            let k: F = f(QUICK_GELU_K);
            let s = sigmoid(k * x);
            s + k * x * s * (F::one() - s)
        }
        // d/dx x Φ(x) = Φ(x) + x φ(x)
        Act::GeluErf => {
            let cdf = half * (F::one() + erf(x * f(FRAC_1_SQRT_2)));
            let pdf = f::<F>(FRAC_1_SQRT_2PI) * (-half * x * x).exp();
            cdf + x * pdf
        }
        // d/dx ½x(1+tanh u) = ½(1+tanh u) + ½x(1−tanh²u)·u'
        Act::GeluTanh => {
            let a: F = f(SQRT_2_OVER_PI);
            let b: F = f(0.044715);
            let u = a * (x + b * x * x * x);
            let th = u.tanh();
            let du = a * (F::one() + f::<F>(3.0) * b * x * x);
            half * (F::one() + th) + half * x * (F::one() - th * th) * du
        }
        // d/dx x σ(x) = σ(x)(1 + x(1 − σ(x)))
        Act::Silu => {
            let s = sigmoid(x);
            s * (F::one() + x * (F::one() - s))
        }
        Act::Relu => {
            if x > F::zero() {
                F::one()
            } else {
                F::zero()
            }
        }
        // d/dx σ(x) = σ(x)(1 − σ(x))
        Act::Sigmoid => sigmoid(x) * (F::one() - sigmoid(x)),
    }
}

/// Independent partial results per row reduction: a single running sum is one long
/// dependency chain that cannot vectorize; eight interleaved ones can.
const LANES: usize = 8;

/// max of a row.
fn row_max<F: CpuFloat>(r: &[F]) -> F {
    let mut m = [F::neg_infinity(); LANES];
    let chunks = r.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            m[k] = m[k].max(c[k]);
        }
    }
    tail.iter()
        .chain(&m)
        .fold(F::neg_infinity(), |a, &x| a.max(x))
}

/// Σ exp(x − mx) over a row.
fn row_sum_exp<F: CpuFloat>(r: &[F], mx: F) -> F {
    let mut acc = [F::zero(); LANES];
    let chunks = r.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = acc[k] + exp(c[k] - mx);
        }
    }
    let t = tail.iter().fold(F::zero(), |a, &x| a + exp(x - mx));
    acc.iter().fold(t, |a, &x| a + x)
}

/// The (cos, sin) tables of [`rope_cos_sin`] for positions `pos0..pos0 + t`, in `F`
/// (empty without RoPE): what `heads_split` and its backward rotate by.
fn rope_tables<F: CpuFloat>(
    pos0: usize,
    t: usize,
    hs: usize,
    theta: Option<f32>,
) -> Vec<(Vec<F>, Vec<F>)> {
    match theta {
        Some(th) => (0..t)
            .map(|ti| {
                let (c, s) = rope_cos_sin(pos0 + ti, hs, th);
                (
                    c.into_iter().map(|v| f(v as f64)).collect(),
                    s.into_iter().map(|v| f(v as f64)).collect(),
                )
            })
            .collect(),
        None => Vec::new(),
    }
}

/// HF LLaMA's inverse frequencies, computed in f32 as `transformers` does so that f32
/// logits match it: inv_freq[i] = 1 / θ^(2i/HS).
fn rope_cos_sin(pos: usize, hs: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = hs / 2;
    let mut cos = Vec::with_capacity(half);
    let mut sin = Vec::with_capacity(half);
    for i in 0..half {
        let inv = 1.0f32 / theta.powf((2 * i) as f32 / hs as f32);
        let a = pos as f32 * inv;
        cos.push(a.cos());
        sin.push(a.sin());
    }
    (cos, sin)
}

fn check_heads(op: &'static str, hs: usize, theta: Option<f32>) -> Result<()> {
    if theta.is_some() && !hs.is_multiple_of(2) {
        return Err(Error::arg(
            op,
            format!("RoPE needs an even head size, got {hs}"),
        ));
    }
    Ok(())
}

impl<F: CpuFloat> Backend<F> for Cpu {
    type Buf = Vec<F>;

    fn name(&self) -> &'static str {
        "cpu"
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
        // parallel: zeroing every gradient before a step touches as many bytes as the model
        x.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .for_each(|c| c.iter_mut().for_each(|e| *e = v));
    }
    fn copy(&self, dst: &mut Vec<F>, src: &Vec<F>) -> Result<()> {
        check_len("copy", "src", src.len(), dst.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn copy_range(
        &self,
        dst: &mut Vec<F>,
        dst_off: usize,
        src: &Vec<F>,
        src_off: usize,
        n: usize,
    ) -> Result<()> {
        if dst_off + n > dst.len() || src_off + n > src.len() {
            return Err(Error::shape(
                "copy_range",
                format!(
                    "range of {n} at dst {dst_off} (len {}) / src {src_off} (len {})",
                    dst.len(),
                    src.len()
                ),
            ));
        }
        dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
        Ok(())
    }
    fn axpy(&self, dst: &mut Vec<F>, alpha: F, src: &Vec<F>) -> Result<()> {
        check_len("axpy", "src", src.len(), dst.len())?;
        dst.par_iter_mut()
            .with_min_len(MIN_ELEMS_PER_TASK)
            .zip(src.par_iter())
            .for_each(|(d, s)| *d = *d + alpha * *s);
        Ok(())
    }
    fn scale(&self, x: &mut Vec<F>, alpha: F) {
        x.par_iter_mut()
            .with_min_len(MIN_ELEMS_PER_TASK)
            .for_each(|d| *d = *d * alpha);
    }
    fn sum_sq(&self, x: &Vec<F>) -> F {
        x.iter().fold(F::zero(), |a, &v| a + v * v)
    }

    fn matmul(
        &self,
        s: MatmulSpec,
        a: &Vec<F>,
        b: &Vec<F>,
        out: &mut Vec<F>,
        acc: Accum,
    ) -> Result<()> {
        let MatmulSpec { m, k, n, ta, tb } = s;
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
        // element (i,kk) of op(a) and (kk,j) of op(b) as (row stride, column stride)
        let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        let is_gemm_type =
            TypeId::of::<F>() == TypeId::of::<f32>() || TypeId::of::<F>() == TypeId::of::<f64>();
        if is_gemm_type {
            let g = GemmView {
                n,
                k,
                out: out.as_mut_ptr(),
                a: a.as_ptr(),
                a_rs,
                a_cs,
                b: b.as_ptr(),
                b_rs,
                b_cs,
                add: acc == Accum::Add,
            };
            // Split the output ourselves into independent blocks, one serial gemm each,
            // instead of gemm's own threading: gemm synchronises its threads after every
            // (k, n) panel and packs the right operand on one thread, so a second thread
            // gave almost no speed-up on these shapes.  One fork/join per product, and
            // each block's sums run in the same order for a given thread count.
            let parts = split_parts(m, n, k, rayon::current_num_threads());
            if parts <= 1 {
                // SAFETY: see `GemmView::run`; the whole output is one block.
                unsafe { g.run(0, m, 0, n) };
            } else if m >= n {
                let rows = m.div_ceil(parts).next_multiple_of(GEMM_BLOCK_ALIGN);
                (0..m.div_ceil(rows)).into_par_iter().for_each(|p| {
                    let r0 = p * rows;
                    // SAFETY: blocks cover disjoint row ranges of `out`.
                    unsafe { g.run(r0, (r0 + rows).min(m), 0, n) };
                });
            } else {
                let cols = n.div_ceil(parts).next_multiple_of(GEMM_BLOCK_ALIGN);
                (0..n.div_ceil(cols)).into_par_iter().for_each(|p| {
                    let c0 = p * cols;
                    // SAFETY: blocks cover disjoint column ranges of `out`.
                    unsafe { g.run(0, m, c0, (c0 + cols).min(n)) };
                });
            }
            return Ok(());
        }
        // slow, correct fallback for other float types
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

    fn add_bias(&self, out: &mut Vec<F>, bias: &Vec<F>, c: usize) -> Result<()> {
        check_len("add_bias", "bias", bias.len(), c)?;
        rows_of("add_bias", out.len(), c)?;
        rows_mut(out, c, |_, r| {
            r.iter_mut().zip(bias).for_each(|(o, b)| *o = *o + *b)
        });
        Ok(())
    }
    fn bias_bwd(&self, dout: &Vec<F>, dbias: &mut Vec<F>, c: usize) -> Result<()> {
        // forward: out[n,i] += bias[i]  so: dbias[i] += Σ_n dout[n,i]
        check_len("bias_bwd", "dbias", dbias.len(), c)?;
        let n = rows_of("bias_bwd", dout.len(), c)?;
        reduce_rows(n, c, dbias, |i, part| {
            let r = &dout[i * c..(i + 1) * c];
            part.iter_mut().zip(r).for_each(|(p, d)| *p = *p + *d);
        });
        Ok(())
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
        let n = rows_of("rmsnorm_fwd", x.len(), c)?;
        check_len("rmsnorm_fwd", "out", out.len(), n * c)?;
        check_len("rmsnorm_fwd", "rstd", rstd.len(), n)?;
        if let Some(w) = w {
            check_len("rmsnorm_fwd", "weight", w.len(), c)?;
        }
        let eps: F = f(eps as f64);
        let cf: F = f(c as f64);
        rstd.iter_mut().zip(x.chunks(c)).for_each(|(r, xr)| {
            let ms = xr.iter().fold(F::zero(), |a, &v| a + v * v) / cf;
            *r = F::one() / (ms + eps).sqrt();
        });
        let rstd = &*rstd;
        rows_mut(out, c, |i, o| {
            let xr = &x[i * c..(i + 1) * c];
            for j in 0..c {
                let wj = w.map_or(F::one(), |w| w[j]);
                o[j] = xr[j] * rstd[i] * wj;
            }
        });
        Ok(())
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
        // forward: out[i] = x[i]·r·w[i],  r = (Σx²/C + eps)^-½
        // so:      dw[i] += dout[i]·x[i]·r
        //          dx[i]  = r·(dout[i]w[i]) − r³/C · x[i] · Σ_j dout[j]w[j]x[j]
        let n = rows_of("rmsnorm_bwd", x.len(), c)?;
        check_len("rmsnorm_bwd", "dout", dout.len(), n * c)?;
        check_len("rmsnorm_bwd", "dx", dx.len(), n * c)?;
        check_len("rmsnorm_bwd", "rstd", rstd.len(), n)?;
        if let Some(w) = w {
            check_len("rmsnorm_bwd", "weight", w.len(), c)?;
        }
        let cf: F = f(c as f64);
        rows_mut(dx, c, |i, d| {
            let xr = &x[i * c..(i + 1) * c];
            let gr = &dout[i * c..(i + 1) * c];
            let r = rstd[i];
            let mut dot = F::zero();
            for j in 0..c {
                dot = dot + gr[j] * w.map_or(F::one(), |w| w[j]) * xr[j];
            }
            let k = r * r * r / cf * dot;
            for j in 0..c {
                d[j] = r * gr[j] * w.map_or(F::one(), |w| w[j]) - k * xr[j];
            }
        });
        if let Some(dw) = dw {
            check_len("rmsnorm_bwd", "dweight", dw.len(), c)?;
            reduce_rows(n, c, dw, |i, part| {
                let xr = &x[i * c..(i + 1) * c];
                let gr = &dout[i * c..(i + 1) * c];
                for j in 0..c {
                    part[j] = part[j] + gr[j] * xr[j] * rstd[i];
                }
            });
        }
        Ok(())
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
        let n = rows_of("layernorm_fwd", x.len(), c)?;
        check_len("layernorm_fwd", "out", out.len(), n * c)?;
        check_len("layernorm_fwd", "mean", mean.len(), n)?;
        check_len("layernorm_fwd", "rstd", rstd.len(), n)?;
        check_len("layernorm_fwd", "weight", w.len(), c)?;
        check_len("layernorm_fwd", "bias", b.len(), c)?;
        let eps: F = f(eps as f64);
        let cf: F = f(c as f64);
        for (i, xr) in x.chunks(c).enumerate() {
            let mu = xr.iter().fold(F::zero(), |a, &v| a + v) / cf;
            let var = xr.iter().fold(F::zero(), |a, &v| a + (v - mu) * (v - mu)) / cf;
            mean[i] = mu;
            rstd[i] = F::one() / (var + eps).sqrt();
        }
        let (mean, rstd) = (&*mean, &*rstd);
        rows_mut(out, c, |i, o| {
            let xr = &x[i * c..(i + 1) * c];
            for j in 0..c {
                o[j] = (xr[j] - mean[i]) * rstd[i] * w[j] + b[j];
            }
        });
        Ok(())
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
        // forward: xh = (x − μ)·r,  out = xh·w + b
        // so:      db += dout,  dw += dout·xh,
        //          dx = r·(g − mean(g) − xh·mean(g·xh)),  g = dout·w
        let n = rows_of("layernorm_bwd", x.len(), c)?;
        check_len("layernorm_bwd", "dout", dout.len(), n * c)?;
        check_len("layernorm_bwd", "dx", dx.len(), n * c)?;
        check_len("layernorm_bwd", "weight", w.len(), c)?;
        check_len("layernorm_bwd", "mean", mean.len(), n)?;
        check_len("layernorm_bwd", "rstd", rstd.len(), n)?;
        let cf: F = f(c as f64);
        rows_mut(dx, c, |i, d| {
            let xr = &x[i * c..(i + 1) * c];
            let gr = &dout[i * c..(i + 1) * c];
            let (mu, r) = (mean[i], rstd[i]);
            let mut mg = F::zero();
            let mut mgx = F::zero();
            for j in 0..c {
                let g = gr[j] * w[j];
                mg = mg + g;
                mgx = mgx + g * (xr[j] - mu) * r;
            }
            mg = mg / cf;
            mgx = mgx / cf;
            for j in 0..c {
                let xh = (xr[j] - mu) * r;
                d[j] = r * (gr[j] * w[j] - mg - xh * mgx);
            }
        });
        if let Some(dw) = dw {
            check_len("layernorm_bwd", "dweight", dw.len(), c)?;
            reduce_rows(n, c, dw, |i, part| {
                let xr = &x[i * c..(i + 1) * c];
                let gr = &dout[i * c..(i + 1) * c];
                for j in 0..c {
                    part[j] = part[j] + gr[j] * (xr[j] - mean[i]) * rstd[i];
                }
            });
        }
        if let Some(db) = db {
            check_len("layernorm_bwd", "dbias", db.len(), c)?;
            self.bias_bwd(dout, db, c)?;
        }
        Ok(())
    }

    fn heads_split(
        &self,
        x: &Vec<F>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        pos0: usize,
        theta: Option<f32>,
        out: &mut Vec<F>,
    ) -> Result<()> {
        check_heads("heads_split", hs, theta)?;
        check_len("heads_split", "x", x.len(), b * t * nh * hs)?;
        check_len("heads_split", "out", out.len(), b * t * nh * hs)?;
        let tables = rope_tables::<F>(pos0, t, hs, theta);
        // out row (bi, h, ti) ← x row (bi, ti, h)
        rows_mut(out, hs, |row, o| {
            let ti = row % t;
            let h = (row / t) % nh;
            let bi = row / (t * nh);
            let xr = &x[((bi * t + ti) * nh + h) * hs..][..hs];
            match theta {
                None => o.copy_from_slice(xr),
                Some(_) => {
                    // forward (HF rotate_half): o[i]   = x[i]cos − x[i+h]sin
                    //                           o[i+h] = x[i+h]cos + x[i]sin
                    let (cos, sin) = &tables[ti];
                    let half = hs / 2;
                    for i in 0..half {
                        o[i] = xr[i] * cos[i] - xr[i + half] * sin[i];
                        o[i + half] = xr[i + half] * cos[i] + xr[i] * sin[i];
                    }
                }
            }
        });
        Ok(())
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
    ) -> Result<()> {
        check_heads("heads_split_bwd", hs, theta)?;
        check_len("heads_split_bwd", "dout", dout.len(), b * t * nh * hs)?;
        check_len("heads_split_bwd", "dx", dx.len(), b * t * nh * hs)?;
        let tables = rope_tables::<F>(pos0, t, hs, theta);
        // dx row (bi, ti, h) ← dout row (bi, h, ti)
        rows_mut(dx, hs, |row, d| {
            let h = row % nh;
            let ti = (row / nh) % t;
            let bi = row / (t * nh);
            let gr = &dout[((bi * nh + h) * t + ti) * hs..][..hs];
            match theta {
                None => d.copy_from_slice(gr),
                Some(_) => {
                    // forward: o[i] = x[i]cos − x[i+h]sin, o[i+h] = x[i+h]cos + x[i]sin
                    // so (the transposed rotation):
                    //          dx[i]   =  do[i]cos + do[i+h]sin
                    //          dx[i+h] = −do[i]sin + do[i+h]cos
                    let (cos, sin) = &tables[ti];
                    let half = hs / 2;
                    for i in 0..half {
                        d[i] = gr[i] * cos[i] + gr[i + half] * sin[i];
                        d[i + half] = gr[i + half] * cos[i] - gr[i] * sin[i];
                    }
                }
            }
        });
        Ok(())
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
        check_len("heads_merge", "x", x.len(), b * t * nh * hs)?;
        check_len("heads_merge", "out", out.len(), b * t * nh * hs)?;
        // out row (bi, ti, h) ← x row (bi, h, ti)
        rows_mut(out, hs, |row, o| {
            let h = row % nh;
            let ti = (row / nh) % t;
            let bi = row / (t * nh);
            o.copy_from_slice(&x[((bi * nh + h) * t + ti) * hs..][..hs]);
        });
        Ok(())
    }

    fn concat_time(
        &self,
        cache: &Vec<F>,
        new: &Vec<F>,
        b: usize,
        h: usize,
        t1: usize,
        t2: usize,
        hs: usize,
    ) -> Result<Vec<F>> {
        check_len("concat_time", "cache", cache.len(), b * h * t1 * hs)?;
        check_len("concat_time", "new", new.len(), b * h * t2 * hs)?;
        let t = t1 + t2;
        let mut out = vec![F::zero(); b * h * t * hs];
        for bh in 0..b * h {
            out[bh * t * hs..][..t1 * hs].copy_from_slice(&cache[bh * t1 * hs..][..t1 * hs]);
            out[(bh * t + t1) * hs..][..t2 * hs].copy_from_slice(&new[bh * t2 * hs..][..t2 * hs]);
        }
        Ok(out)
    }

    fn act_fwd(&self, act: Act, x: &Vec<F>, out: &mut Vec<F>) -> Result<()> {
        check_len("act_fwd", "out", out.len(), x.len())?;
        // chunks with plain loops over equal-length slices: no bounds checks, so the
        // loop (exp included) vectorizes
        out.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(x.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|(o, x)| {
                let x = &x[..o.len()];
                for i in 0..o.len() {
                    o[i] = act_value(act, x[i]);
                }
            });
        Ok(())
    }
    fn act_bwd(&self, act: Act, x: &Vec<F>, dout: &Vec<F>, dx: &mut Vec<F>) -> Result<()> {
        // forward: out = act(x)  so: dx = act'(x)·dout
        check_len("act_bwd", "dout", dout.len(), x.len())?;
        check_len("act_bwd", "dx", dx.len(), x.len())?;
        dx.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(x.par_chunks(MIN_ELEMS_PER_TASK))
            .zip(dout.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|((d, x), g)| {
                let (x, g) = (&x[..d.len()], &g[..d.len()]);
                for i in 0..d.len() {
                    d[i] = act_deriv(act, x[i]) * g[i];
                }
            });
        Ok(())
    }
    fn swiglu_fwd(&self, gate: &Vec<F>, up: &Vec<F>, out: &mut Vec<F>) -> Result<()> {
        check_len("swiglu_fwd", "up", up.len(), gate.len())?;
        check_len("swiglu_fwd", "out", out.len(), gate.len())?;
        out.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(gate.par_chunks(MIN_ELEMS_PER_TASK))
            .zip(up.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|((o, g), u)| {
                let (g, u) = (&g[..o.len()], &u[..o.len()]);
                for i in 0..o.len() {
                    o[i] = g[i] * sigmoid(g[i]) * u[i];
                }
            });
        Ok(())
    }
    fn swiglu_bwd(
        &self,
        gate: &Vec<F>,
        up: &Vec<F>,
        dout: &Vec<F>,
        dgate: &mut Vec<F>,
        dup: &mut Vec<F>,
    ) -> Result<()> {
        // forward: out = silu(g)·u  so: du = silu(g)·dout,  dg = silu'(g)·u·dout
        let n = gate.len();
        check_len("swiglu_bwd", "up", up.len(), n)?;
        check_len("swiglu_bwd", "dout", dout.len(), n)?;
        check_len("swiglu_bwd", "dgate", dgate.len(), n)?;
        check_len("swiglu_bwd", "dup", dup.len(), n)?;
        dgate
            .par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(dup.par_chunks_mut(MIN_ELEMS_PER_TASK))
            .zip(gate.par_chunks(MIN_ELEMS_PER_TASK))
            .zip(up.par_chunks(MIN_ELEMS_PER_TASK))
            .zip(dout.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|((((dg, du), g), u), d)| {
                let n = dg.len();
                let (du, g, u, d) = (&mut du[..n], &g[..n], &u[..n], &d[..n]);
                for i in 0..n {
                    let s = sigmoid(g[i]);
                    du[i] = g[i] * s * d[i];
                    dg[i] = s * (F::one() + g[i] * (F::one() - s)) * u[i] * d[i];
                }
            });
        Ok(())
    }

    fn embedding_fwd(&self, ids: &[u32], table: &Vec<F>, c: usize, out: &mut Vec<F>) -> Result<()> {
        let v = rows_of("embedding_fwd", table.len(), c)?;
        check_len("embedding_fwd", "out", out.len(), ids.len() * c)?;
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return Err(Error::arg(
                "embedding_fwd",
                format!("token id {id} at position {pos} is outside the table of {v} rows"),
            ));
        }
        rows_mut(out, c, |i, o| {
            o.copy_from_slice(&table[ids[i] as usize * c..][..c]);
        });
        Ok(())
    }
    fn embedding_bwd(
        &self,
        ids: &[u32],
        dout: &Vec<F>,
        c: usize,
        dtable: &mut Vec<F>,
    ) -> Result<()> {
        // forward: out[n] = table[ids[n]]  so: dtable[ids[n]] += dout[n]
        let v = rows_of("embedding_bwd", dtable.len(), c)?;
        check_len("embedding_bwd", "dout", dout.len(), ids.len() * c)?;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= v) {
            return Err(Error::arg(
                "embedding_bwd",
                format!("token id {id} is outside the table of {v} rows"),
            ));
        }
        // serial: repeated ids would race, and the scatter is cheap beside the GEMMs
        for (n, &id) in ids.iter().enumerate() {
            let d = &mut dtable[id as usize * c..][..c];
            d.iter_mut()
                .zip(&dout[n * c..][..c])
                .for_each(|(a, b)| *a = *a + *b);
        }
        Ok(())
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
        if p == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Error::arg(
                "patchify",
                format!("image {h}x{w} is not a whole number of {p}x{p} patches"),
            ));
        }
        check_len("patchify", "pixels", pixels.len(), b * ch * h * w)?;
        check_len("patchify", "out", out.len(), b * ch * h * w)?;
        let (gh, gw) = (h / p, w / p);
        let row = ch * p * p;
        rows_mut(out, row, |r, o| {
            let bi = r / (gh * gw);
            let (py0, px0) = ((r % (gh * gw)) / gw * p, (r % gw) * p);
            for c in 0..ch {
                for py in 0..p {
                    let src = &pixels[((bi * ch + c) * h + py0 + py) * w + px0..][..p];
                    o[(c * p + py) * p..][..p].copy_from_slice(src);
                }
            }
        });
        Ok(())
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
        // forward is a permutation (stride = kernel: patches do not overlap), so the
        // backward is the inverse permutation
        if p == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Error::arg(
                "patchify_bwd",
                format!("image {h}x{w} is not a whole number of {p}x{p} patches"),
            ));
        }
        check_len("patchify_bwd", "dout", dout.len(), b * ch * h * w)?;
        check_len("patchify_bwd", "dpixels", dpixels.len(), b * ch * h * w)?;
        let (gh, gw) = (h / p, w / p);
        // dpixels row (bi, c, y) of W pixels
        rows_mut(dpixels, w, |r, d| {
            let y = r % h;
            let c = (r / h) % ch;
            let bi = r / (h * ch);
            let (gy, py) = (y / p, y % p);
            for gx in 0..gw {
                let src = &dout[((bi * gh + gy) * gw + gx) * ch * p * p + (c * p + py) * p..][..p];
                d[gx * p..][..p].copy_from_slice(src);
            }
        });
        Ok(())
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
        crate::kernels::attention::attention_fwd_cpu(
            s,
            q,
            k,
            v,
            bias.map(|b| b.as_slice()),
            key_mask,
            out,
            lse,
        )
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
        crate::kernels::attention::attention_bwd_cpu(
            s,
            q,
            k,
            v,
            bias.map(|b| b.as_slice()),
            key_mask,
            out,
            lse,
            dout,
            dq,
            dk,
            dv,
            dbias.map(|b| b.as_mut_slice()),
        )
    }

    fn logprob_fwd(
        &self,
        logits: &Vec<F>,
        targets: &[u32],
        v: usize,
        logp: &mut Vec<F>,
        lse: &mut Vec<F>,
    ) -> Result<()> {
        let n = rows_of("logprob_fwd", logits.len(), v)?;
        check_len("logprob_fwd", "targets", targets.len(), n)?;
        check_len("logprob_fwd", "logp", logp.len(), n)?;
        check_len("logprob_fwd", "lse", lse.len(), n)?;
        if let Some((i, &t)) = targets.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            return Err(Error::arg(
                "logprob_fwd",
                format!("target {t} at row {i} is outside the vocabulary of {v}"),
            ));
        }
        logp.par_iter_mut()
            .zip(lse.par_iter_mut())
            .enumerate()
            .for_each(|(i, (lp, ls))| {
                let r = &logits[i * v..(i + 1) * v];
                let mx = row_max(r);
                let sum = row_sum_exp(r, mx);
                *ls = mx + sum.ln();
                *lp = r[targets[i] as usize] - *ls;
            });
        Ok(())
    }
    fn logprob_bwd(
        &self,
        logits: &Vec<F>,
        targets: &[u32],
        v: usize,
        lse: &Vec<F>,
        dlogp: &Vec<F>,
        dlogits: &mut Vec<F>,
    ) -> Result<()> {
        // forward: logp = x[t] − lse(x)  so: dx[j] = dlogp·(1[j=t] − softmax(x)[j])
        let n = rows_of("logprob_bwd", logits.len(), v)?;
        check_len("logprob_bwd", "targets", targets.len(), n)?;
        check_len("logprob_bwd", "lse", lse.len(), n)?;
        check_len("logprob_bwd", "dlogp", dlogp.len(), n)?;
        check_len("logprob_bwd", "dlogits", dlogits.len(), n * v)?;
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
            return Err(Error::arg(
                "logprob_bwd",
                format!("target {t} is outside the vocabulary of {v}"),
            ));
        }
        rows_mut(dlogits, v, |i, d| {
            let r = &logits[i * v..(i + 1) * v][..d.len()];
            let (g, l) = (dlogp[i], lse[i]);
            for j in 0..d.len() {
                d[j] = -g * exp(r[j] - l);
            }
            d[targets[i] as usize] = d[targets[i] as usize] + g;
        });
        Ok(())
    }

    fn adamw_step(
        &self,
        h: &AdamWStep,
        param: &mut Vec<F>,
        grad: &Vec<F>,
        m: &mut Vec<F>,
        v: &mut Vec<F>,
    ) -> Result<()> {
        let n = param.len();
        check_len("adamw_step", "grad", grad.len(), n)?;
        check_len("adamw_step", "m", m.len(), n)?;
        check_len("adamw_step", "v", v.len(), n)?;
        if h.step == 0 {
            return Err(Error::arg("adamw_step", "step numbers start at 1"));
        }
        let b1: F = f(h.beta1 as f64);
        let b2: F = f(h.beta2 as f64);
        let lr: F = f(h.lr as f64);
        let eps: F = f(h.eps as f64);
        let wd: F = f(h.weight_decay as f64);
        let c1 = F::one() - b1.powi(h.step as i32);
        let c2 = F::one() - b2.powi(h.step as i32);
        param
            .par_iter_mut()
            .with_min_len(MIN_ELEMS_PER_TASK)
            .zip(m.par_iter_mut().zip(v.par_iter_mut()))
            .zip(grad.par_iter())
            .for_each(|((p, (mi, vi)), &g)| {
                *mi = b1 * *mi + (F::one() - b1) * g;
                *vi = b2 * *vi + (F::one() - b2) * g * g;
                let mhat = *mi / c1;
                let vhat = *vi / c2;
                // decoupled decay (Loshchilov & Hutter): applied to the weight, not the gradient
                *p = *p - lr * (mhat / (vhat.sqrt() + eps) + wd * *p);
            });
        Ok(())
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
    ) -> Result<Vec<(F, F)>> {
        image::mask_loss_fwd(logits, target, m, p)
    }
    #[rustfmt::skip]
    fn mask_loss_bwd(&self, logits: &Vec<F>, target: &Vec<F>, m: usize, p: usize, w_bce: F, w_dice: F, dlogits: &mut Vec<F>) -> Result<()> {
        image::mask_loss_bwd(logits, target, m, p, w_bce, w_dice, dlogits)
    }
}
