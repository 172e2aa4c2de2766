//! DPO log-prob reductions (Eq. 3) and the SFT cross-entropy: fused log-softmax +
//! gather of the target token's log-prob, a weighted per-sequence sum, and the backward
//! `w·(onehot − softmax)·upstream`, never materializing the `T × V` log-softmax.
//! Kernels in `kernels/logprob.cu`; CPU twins here (generic over the float type so the
//! gradient is checked in f64; f32 uses a vectorizable `exp`).
//!
//! B sequences, T positions, R = B·T rows, V vocabulary.  `logits[b,t]` predicts
//! `targets[b,t]` (the caller shifts).  Weights (Eq. 3): λ on the tokens that differ
//! between `y` and `y_c`, 1 on the other response tokens, 0 on prompt and padding.
//! A target outside `[0, V)` marks an ignored row (log-prob 0, no gradient), the way
//! `ignore_index = -100` does in PyTorch.
//!
//! ```
//! use popen::kernels::logprob::*;
//! // one sequence of 2 positions over a vocabulary of 3
//! let logits = [0.0f64, 0.0, 0.0, 1.0, 2.0, 3.0];
//! let (lp, _lse) = logprob_fwd_cpu(&logits, &[1, 2], 3).unwrap();
//! let (seq, _) = seq_weighted_sum_cpu(&lp, &[1.0, 5.0], &[1, 2], 3, 1, 2, true).unwrap();
//! let want = (lp[0] + 5.0 * lp[1]) / 2.0; // Eq. 3 with λ = 5 on position 1
//! assert!((seq[0] - want).abs() < 1e-12);
//! ```
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};
use num_traits::Float;
use rayon::prelude::*;

/// Threads per block: one block per row (multiple of 32: warp reductions).
const BLOCK: u32 = 256;
/// Rows per rayon task in the CPU twins (amortizes the hand-off on short rows).
const ROWS_PER_TASK: usize = 4;

/// Row primitives the CPU twins need, specialized per float type: f32 uses a
/// polynomial `exp` that the compiler vectorizes; f64 uses the libm `exp`.
pub trait RowOps: Float + Send + Sync + 'static {
    /// `max_v x[v]` (−∞ for an empty row).
    fn row_max(x: &[Self]) -> Self;
    /// `Σ_v exp(x[v] − m)` for `m = max x`.
    fn sum_exp_shifted(x: &[Self], m: Self) -> Self;
    /// `out[v] = c·(1[v = y] − exp(x[v] − l))`.
    fn softmax_grad(x: &[Self], l: Self, c: Self, y: Option<usize>, out: &mut [Self]);
}

impl RowOps for f64 {
    fn row_max(x: &[f64]) -> f64 {
        x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v))
    }
    fn sum_exp_shifted(x: &[f64], m: f64) -> f64 {
        x.iter().map(|&v| (v - m).exp()).sum()
    }
    fn softmax_grad(x: &[f64], l: f64, c: f64, y: Option<usize>, out: &mut [f64]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = -c * (v - l).exp();
        }
        if let Some(y) = y {
            out[y] += c;
        }
    }
}

/// The f32 row loops, written once and compiled twice: portable (SSE2 on x86-64) and,
/// on x86-64 CPUs that have it, AVX2 (twice the lanes), picked at run time.
mod f32_rows {
    use crate::kernels::fastmath::exp_f32;

    #[inline(always)]
    pub(super) fn row_max(x: &[f32]) -> f32 {
        // eight running maxima with a plain compare: `f32::max` pins a NaN-aware
        // sequential chain that does not vectorize (a NaN logit poisons the row anyway)
        let mut acc = [f32::NEG_INFINITY; 8];
        let chunks = x.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..8 {
                acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
            }
        }
        let mut m = acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for &v in tail {
            m = m.max(v);
        }
        m
    }

    #[inline(always)]
    pub(super) fn sum_exp_shifted(x: &[f32], m: f32) -> f32 {
        // eight partial sums: vectorizes, and the f32 error stays small
        let mut acc = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..8 {
                acc[j] += exp_f32(c[j] - m);
            }
        }
        let mut s = acc.iter().sum::<f32>();
        for &v in tail {
            s += exp_f32(v - m);
        }
        s
    }

    #[inline(always)]
    pub(super) fn softmax_grad(x: &[f32], l: f32, c: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = -c * exp_f32(v - l);
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) mod avx2 {
        // SAFETY (all three): callers check `is_x86_feature_detected!("avx2")` first.
        #[target_feature(enable = "avx2")]
        pub(crate) unsafe fn row_max(x: &[f32]) -> f32 {
            super::row_max(x)
        }
        #[target_feature(enable = "avx2")]
        pub(crate) unsafe fn sum_exp_shifted(x: &[f32], m: f32) -> f32 {
            super::sum_exp_shifted(x, m)
        }
        #[target_feature(enable = "avx2")]
        pub(crate) unsafe fn softmax_grad(x: &[f32], l: f32, c: f32, out: &mut [f32]) {
            super::softmax_grad(x, l, c, out)
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
}

impl RowOps for f32 {
    fn row_max(x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 is present (checked above).
            return unsafe { f32_rows::avx2::row_max(x) };
        }
        f32_rows::row_max(x)
    }
    fn sum_exp_shifted(x: &[f32], m: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 is present (checked above).
            return unsafe { f32_rows::avx2::sum_exp_shifted(x, m) };
        }
        f32_rows::sum_exp_shifted(x, m)
    }
    fn softmax_grad(x: &[f32], l: f32, c: f32, y: Option<usize>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        let done = if has_avx2() {
            // SAFETY: AVX2 is present (checked above).
            unsafe { f32_rows::avx2::softmax_grad(x, l, c, out) };
            true
        } else {
            false
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        if !done {
            f32_rows::softmax_grad(x, l, c, out);
        }
        if let Some(y) = y {
            out[y] += c;
        }
    }
}

fn target_of(t: i32, v: usize) -> Option<usize> {
    (t >= 0 && (t as usize) < v).then_some(t as usize)
}

/// CPU twin of `logprob_fwd_f32`: `(lp, lse)` with `lp[r] = logits[r, y_r] − lse[r]`
/// (0 for an ignored row) and `lse[r] = log Σ_v exp(logits[r, v])`.
///
/// logits (R, V), targets (R) → lp (R), lse (R).
pub fn logprob_fwd_cpu<T: RowOps>(
    logits: &[T],
    targets: &[i32],
    v: usize,
) -> Result<(Vec<T>, Vec<T>)> {
    const OP: &str = "logprob_fwd_cpu";
    if v == 0 {
        return Err(Error::arg(OP, "vocabulary size V must be ≥ 1"));
    }
    let r = targets.len();
    check_len(OP, "logits", logits.len(), r * v)?;
    let mut lp = vec![T::zero(); r];
    let mut lse = vec![T::zero(); r];
    logits
        .par_chunks(v)
        .zip(lp.par_iter_mut().zip(lse.par_iter_mut()))
        .zip(targets.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((x, (lp, lse)), &t)| {
            let m = T::row_max(x);
            let l = if m == T::neg_infinity() {
                m // every logit is -inf: log of an empty sum
            } else {
                m + T::sum_exp_shifted(x, m).ln()
            };
            *lse = l;
            *lp = target_of(t, v).map_or(T::zero(), |y| x[y] - l);
        });
    Ok((lp, lse))
}

/// CPU twin of `seq_weighted_sum_f32`: `(out, scale)` with
/// `out[b] = scale[b]·Σ_t w[b,t]·lp[b,t]` and
/// `scale[b] = 1/#{t : w[b,t] ≠ 0 and targets[b,t] not ignored}` when `normalize`
/// (Eq. 3's `1/|y|`; 0 for a sequence with no response token), else 1.  An ignored
/// target (outside `[0, V)`) is not a token of the response, so it does not count in
/// `|y|`, as PyTorch's `ignore_index` leaves it out of the mean.
///
/// lp (B, T), w (B, T), targets (B, T) → out (B), scale (B).
pub fn seq_weighted_sum_cpu<T: Float>(
    lp: &[T],
    w: &[T],
    targets: &[i32],
    v: usize,
    b: usize,
    t: usize,
    normalize: bool,
) -> Result<(Vec<T>, Vec<T>)> {
    const OP: &str = "seq_weighted_sum_cpu";
    check_len(OP, "lp", lp.len(), b * t)?;
    check_len(OP, "w", w.len(), b * t)?;
    check_len(OP, "targets", targets.len(), b * t)?;
    let mut out = vec![T::zero(); b];
    let mut scale = vec![T::one(); b];
    for k in 0..b {
        let (mut acc, mut cnt) = (T::zero(), 0usize);
        for j in k * t..(k + 1) * t {
            acc = acc + w[j] * lp[j];
            cnt += (w[j] != T::zero() && target_of(targets[j], v).is_some()) as usize;
        }
        if normalize {
            scale[k] = if cnt > 0 {
                T::one() / T::from(cnt).unwrap()
            } else {
                T::zero()
            };
        }
        out[k] = acc * scale[k];
    }
    Ok((out, scale))
}

/// CPU twin of `logprob_bwd_f32`.
///
/// forward: `out[b] = scale[b]·Σ_t w[b,t]·(logits[b,t,y] − lse[b,t])`
/// so:      `dlogits[b,t,v] = d_out[b]·scale[b]·w[b,t]·(1[v = y] − softmax[b,t,v])`
///
/// logits (B, T, V), lse (B·T), targets (B·T), w (B·T), d_out (B), scale (B),
/// dlogits (B, T, V) — overwritten.
#[allow(clippy::too_many_arguments)]
pub fn logprob_bwd_cpu<T: RowOps>(
    logits: &[T],
    lse: &[T],
    targets: &[i32],
    w: &[T],
    d_out: &[T],
    scale: &[T],
    t: usize,
    v: usize,
    dlogits: &mut [T],
) -> Result<()> {
    const OP: &str = "logprob_bwd_cpu";
    let b = d_out.len();
    let r = b * t;
    check_len(OP, "logits", logits.len(), r * v)?;
    check_len(OP, "lse", lse.len(), r)?;
    check_len(OP, "targets", targets.len(), r)?;
    check_len(OP, "w", w.len(), r)?;
    check_len(OP, "scale", scale.len(), b)?;
    check_len(OP, "dlogits", dlogits.len(), r * v)?;
    if v == 0 {
        return Ok(());
    }
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(row, (dx, x))| {
            let y = target_of(targets[row], v);
            let k = row / t;
            let c = if y.is_some() {
                d_out[k] * scale[k] * w[row]
            } else {
                T::zero()
            };
            T::softmax_grad(x, lse[row], c, y, dx);
        });
    Ok(())
}

/// Mean token cross-entropy per sequence for SFT: `−Σ_t m·lp / Σ_t m` over the
/// positions with mask `m ≠ 0` — the same reduction as Eq. 3 with all weights 1 and
/// the sign flipped.  Its backward is [`logprob_bwd_cpu`] with `d_out = −d_loss`.
///
/// logits (B, T, V), targets (B·T), mask (B·T) → (loss (B), lse (B·T), scale (B)).
pub fn cross_entropy_cpu<T: RowOps>(
    logits: &[T],
    targets: &[i32],
    mask: &[T],
    b: usize,
    v: usize,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    if b == 0 || !targets.len().is_multiple_of(b) {
        return Err(Error::shape(
            "cross_entropy_cpu",
            format!("{} targets do not split into {b} sequences", targets.len()),
        ));
    }
    let t = targets.len() / b;
    let (lp, lse) = logprob_fwd_cpu(logits, targets, v)?;
    let (s, scale) = seq_weighted_sum_cpu(&lp, mask, targets, v, b, t, true)?;
    Ok((s.into_iter().map(|x| -x).collect(), lse, scale))
}

fn check_rows(op: &'static str, r: usize, v: usize) -> Result<()> {
    if v == 0 || v > i32::MAX as usize || r > u32::MAX as usize {
        return Err(Error::arg(
            op,
            format!("{r} rows of vocabulary {v} out of range"),
        ));
    }
    Ok(())
}

/// Launch `logprob_fwd_f32`: lp and lse per row.
///
/// logits (R, V), targets (R), lp (R), lse (R) — overwritten.
pub fn logprob_fwd(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    targets: &DeviceBuf<i32>,
    v: usize,
    lp: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "logprob_fwd";
    let r = targets.len();
    check_rows(OP, r, v)?;
    check_len(OP, "logits", logits.len(), r * v)?;
    check_len(OP, "lp", lp.len(), r)?;
    check_len(OP, "lse", lse.len(), r)?;
    if r == 0 {
        return Ok(());
    }
    dev.launch(
        "logprob_fwd_f32",
        LaunchCfg::new([r as u32, 1, 1], [BLOCK, 1, 1], 0),
        &[
            lp.arg_mut(),
            lse.arg_mut(),
            logits.arg(),
            targets.arg(),
            KArg::I32(v as i32),
        ],
    )
}

/// Launch `seq_weighted_sum_f32` (see [`seq_weighted_sum_cpu`]).
///
/// lp (B, T), w (B, T), targets (B, T), out (B), scale (B) — overwritten.
#[allow(clippy::too_many_arguments)]
pub fn seq_weighted_sum(
    dev: &Device,
    lp: &DeviceBuf<f32>,
    w: &DeviceBuf<f32>,
    targets: &DeviceBuf<i32>,
    v: usize,
    b: usize,
    t: usize,
    normalize: bool,
    out: &mut DeviceBuf<f32>,
    scale: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "seq_weighted_sum";
    check_rows(OP, b, t.max(1))?;
    check_rows(OP, b * t, v)?;
    check_len(OP, "lp", lp.len(), b * t)?;
    check_len(OP, "w", w.len(), b * t)?;
    check_len(OP, "targets", targets.len(), b * t)?;
    check_len(OP, "out", out.len(), b)?;
    check_len(OP, "scale", scale.len(), b)?;
    if b == 0 {
        return Ok(());
    }
    dev.launch(
        "seq_weighted_sum_f32",
        LaunchCfg::new([b as u32, 1, 1], [BLOCK, 1, 1], 0),
        &[
            out.arg_mut(),
            scale.arg_mut(),
            lp.arg(),
            w.arg(),
            targets.arg(),
            KArg::I32(t as i32),
            KArg::I32(v as i32),
            KArg::I32(normalize as i32),
        ],
    )
}

/// Launch `logprob_bwd_f32` (see [`logprob_bwd_cpu`]).
///
/// logits (B, T, V), lse (B·T), targets (B·T), w (B·T), d_out (B), scale (B),
/// dlogits (B, T, V) — overwritten.
#[allow(clippy::too_many_arguments)]
pub fn logprob_bwd(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    lse: &DeviceBuf<f32>,
    targets: &DeviceBuf<i32>,
    w: &DeviceBuf<f32>,
    d_out: &DeviceBuf<f32>,
    scale: &DeviceBuf<f32>,
    t: usize,
    v: usize,
    dlogits: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "logprob_bwd";
    let b = d_out.len();
    let r = b * t;
    check_rows(OP, r, v)?;
    if t > i32::MAX as usize {
        return Err(Error::arg(OP, format!("T = {t} out of range")));
    }
    check_len(OP, "logits", logits.len(), r * v)?;
    check_len(OP, "lse", lse.len(), r)?;
    check_len(OP, "targets", targets.len(), r)?;
    check_len(OP, "w", w.len(), r)?;
    check_len(OP, "scale", scale.len(), b)?;
    check_len(OP, "dlogits", dlogits.len(), r * v)?;
    if r == 0 {
        return Ok(());
    }
    dev.launch(
        "logprob_bwd_f32",
        LaunchCfg::new([r as u32, 1, 1], [BLOCK, 1, 1], 0),
        &[
            dlogits.arg_mut(),
            logits.arg(),
            lse.arg(),
            targets.arg(),
            w.arg(),
            d_out.arg(),
            scale.arg(),
            KArg::I32(t as i32),
            KArg::I32(v as i32),
        ],
    )
}

/// SFT cross-entropy on the device: [`logprob_fwd`], [`seq_weighted_sum`] with the
/// loss mask as weights and length normalization, then a sign flip (`scale_f32` of
/// `elementwise.cu`) — the device twin of [`cross_entropy_cpu`].  Its backward is
/// [`logprob_bwd`] with `d_out = −d_loss`.
///
/// logits (B, T, V), targets (B·T), mask (B·T); loss (B), lse (B·T), scale (B) —
/// overwritten.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    dev: &Device,
    logits: &DeviceBuf<f32>,
    targets: &DeviceBuf<i32>,
    mask: &DeviceBuf<f32>,
    b: usize,
    v: usize,
    loss: &mut DeviceBuf<f32>,
    lse: &mut DeviceBuf<f32>,
    scale: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "cross_entropy";
    if b == 0 || !targets.len().is_multiple_of(b) || b > i32::MAX as usize {
        return Err(Error::shape(
            OP,
            format!("{} targets do not split into {b} sequences", targets.len()),
        ));
    }
    let t = targets.len() / b;
    let mut lp = dev.zeros::<f32>(b * t)?;
    let mut sum = dev.zeros::<f32>(b)?;
    logprob_fwd(dev, logits, targets, v, &mut lp, lse)?;
    seq_weighted_sum(dev, &lp, mask, targets, v, b, t, true, &mut sum, scale)?;
    check_len(OP, "loss", loss.len(), b)?;
    dev.launch(
        "scale_f32",
        LaunchCfg::linear(b, BLOCK),
        &[
            loss.arg_mut(),
            sum.arg(),
            KArg::F32(-1.0),
            KArg::I32(b as i32),
        ],
    )
}
