//! DPO log-prob reductions (Eq. 3) and the SFT cross-entropy: fused log-softmax +
//! gather of the target token's log-prob, a weighted per-sequence sum, and the backward
//! `w·(onehot − softmax)·upstream`, never materializing the `T × V` log-softmax.
//! Kernels in `kernels/logprob.cu`; CPU twins here (generic over the float type so the
//! gradient is checked in f64), on the crate's one row-softmax ([`crate::kernels::rows`]).
//!
//! B sequences, T positions, R = B·T rows, V vocabulary.  `logits[b,t]` predicts
//! `targets[b,t]` (the caller shifts).  Weights (Eq. 3): λ on the tokens that differ
//! between `y` and `y_c`, 1 on the other response tokens, 0 on prompt and padding.
//! A target of [`IGNORE_INDEX`] marks an ignored row (log-prob 0, no gradient), the way
//! `ignore_index = -100` does in PyTorch.  Any other target outside `[0, V)` is an
//! error in the CPU twins (and in the CPU backend, which calls them); the kernels, which
//! cannot report one and whose targets live on the device, treat every out-of-range
//! target as ignored so that they never read outside a row.
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
use crate::kernels::rows::{log_sum_exp, RowFloat};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};
use num_traits::Float;
use rayon::prelude::*;

/// Threads per block: one block per row (multiple of 32: warp reductions).
const BLOCK: u32 = 256;
/// Rows per rayon task in the CPU twins (amortizes the hand-off on short rows).
const ROWS_PER_TASK: usize = 4;

/// The row primitives the CPU twins need beyond [`RowFloat`]'s (the crate's one
/// row-softmax): f32 through the SIMD dispatch, f64 plain (gradient checks).
pub trait RowOps: RowFloat {
    /// `out[v] = c·(1[v = y] − exp(x[v] − l))`.
    fn softmax_grad(x: &[Self], l: Self, c: Self, y: Option<usize>, out: &mut [Self]) {
        neg_softmax_scaled(x, l, c, out);
        if let Some(y) = y {
            out[y] = out[y] + c;
        }
    }
}

/// `out[v] = −c·exp(x[v] − l)`.
#[inline(always)]
fn neg_softmax_scaled<T: RowFloat>(x: &[T], l: T, c: T, out: &mut [T]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = -c * T::exp1(v - l);
    }
}

crate::simd_fn!(
    fn neg_softmax_scaled_f32(x: &[f32], l: f32, c: f32, out: &mut [f32]) => neg_softmax_scaled::<f32>
);

impl RowOps for f64 {}

impl RowOps for f32 {
    fn softmax_grad(x: &[f32], l: f32, c: f32, y: Option<usize>, out: &mut [f32]) {
        neg_softmax_scaled_f32(x, l, c, out);
        if let Some(y) = y {
            out[y] += c;
        }
    }
}

/// The target that marks an ignored row (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// `Err` unless every target is in `[0, V)` or [`IGNORE_INDEX`].
pub fn check_targets(op: &'static str, targets: &[i32], v: usize) -> Result<()> {
    match targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= v))
    {
        Some((row, &t)) => Err(Error::arg(
            op,
            format!(
                "target {t} at row {row} is outside the vocabulary of {v} \
                 (and is not the ignore index {IGNORE_INDEX})"
            ),
        )),
        None => Ok(()),
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
    check_targets(OP, targets, v)?;
    let mut lp = vec![T::zero(); r];
    let mut lse = vec![T::zero(); r];
    logits
        .par_chunks(v)
        .zip(lp.par_iter_mut().zip(lse.par_iter_mut()))
        .zip(targets.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((x, (lp, lse)), &t)| {
            // −inf when every logit is −inf: the log of an empty sum
            let l = log_sum_exp(x);
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
    check_targets(OP, targets, v)?;
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
    let mut lp = dev.uninit::<f32>(b * t)?;
    let mut sum = dev.uninit::<f32>(b)?;
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
            KArg::I64(b as i64),
        ],
    )
}
