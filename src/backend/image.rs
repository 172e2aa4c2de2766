//! CPU bodies of the image ops of the [`Backend`](super::Backend) contract: im2col for
//! stride-1 convolutions, depth-to-space (a 2×2 stride-2 transposed conv after a
//! Linear), bilinear resizing with PyTorch's `align_corners=False` rule, per-row
//! scaling, and the mask losses (BCE + Dice) of LISA/PixelLM.  Each backward sits under
//! its forward.  Generic free functions over slices so the CPU backend delegates in one
//! line and the tests run them in f64.
//!
//! Feature maps are channels-last: (B, H, W, C) = B·H·W rows of C.
//! Sizes: B batch, H × W input pixels, C channels, K kernel, Ho × Wo output pixels,
//! r upsampling factor, N rows, M masks, P pixels per mask.
use super::cpu::CpuFloat;
use super::{Conv2dGeom, MaskLosses};
use crate::error::{check_len, Error, Result};
use rayon::prelude::*;

/// Rows per rayon task: below this a row loop is cheaper than a task split.
const MIN_ROWS_PER_TASK: usize = 16;
/// PixelLM's Dice smoothing: both sums are divided by this before the ratio…
pub const DICE_SCALE: f64 = 1000.0;
/// …and this is added to numerator and denominator (an empty target and an all-zero
/// prediction give Dice loss 0, and the gradient stays finite).
pub const DICE_EPS: f64 = 1e-6;

#[inline]
fn f<F: CpuFloat>(x: f64) -> F {
    F::from(x).expect("f64 constant representable in the backend float")
}

/// σ(x) without overflow for large |x| (the mask losses see logits of either sign).
#[inline]
fn sigmoid<F: CpuFloat>(x: F) -> F {
    if x >= F::zero() {
        F::one() / (F::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (F::one() + e)
    }
}

// ---- im2col ----

/// x (B,H,W,C) → out (B,Ho,Wo,K·K·C), each row ordered (ky, kx, c), zero padding.
pub fn im2col<F: CpuFloat>(x: &[F], g: &Conv2dGeom, out: &mut [F]) -> Result<()> {
    let (ho, wo) = g.out_hw()?;
    let Conv2dGeom { b, h, w, c, k, pad } = *g;
    check_len("im2col", "x", x.len(), b * h * w * c)?;
    check_len("im2col", "out", out.len(), b * ho * wo * k * k * c)?;
    if out.is_empty() {
        return Ok(());
    }
    out.par_chunks_mut(k * k * c)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, oy, ox) = (row / (ho * wo), (row / wo) % ho, row % wo);
            for ky in 0..k {
                for kx in 0..k {
                    let dst = &mut o[(ky * k + kx) * c..][..c];
                    // input pixel (oy + ky − pad, ox + kx − pad), zero outside
                    match (
                        (oy + ky).checked_sub(pad).filter(|&iy| iy < h),
                        (ox + kx).checked_sub(pad).filter(|&ix| ix < w),
                    ) {
                        (Some(iy), Some(ix)) => {
                            dst.copy_from_slice(&x[((bi * h + iy) * w + ix) * c..][..c])
                        }
                        _ => dst.iter_mut().for_each(|v| *v = F::zero()),
                    }
                }
            }
        });
    Ok(())
}

/// dout (B,Ho,Wo,K·K·C) → dx (B,H,W,C), overwritten.
pub fn im2col_bwd<F: CpuFloat>(dout: &[F], g: &Conv2dGeom, dx: &mut [F]) -> Result<()> {
    // forward: out[(b,oy,ox), (ky,kx,c)] = x[b, oy+ky−pad, ox+kx−pad, c]
    // so:      dx[b,iy,ix,c] = Σ_{ky,kx} dout[(b, iy+pad−ky, ix+pad−kx), (ky,kx,c)]
    //          over the (oy, ox) inside the output (a gather: no write races)
    let (ho, wo) = g.out_hw()?;
    let Conv2dGeom { b, h, w, c, k, pad } = *g;
    check_len("im2col_bwd", "dout", dout.len(), b * ho * wo * k * k * c)?;
    check_len("im2col_bwd", "dx", dx.len(), b * h * w * c)?;
    if dx.is_empty() {
        return Ok(());
    }
    let col = k * k * c;
    dx.par_chunks_mut(c)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(row, d)| {
            let (bi, iy, ix) = (row / (h * w), (row / w) % h, row % w);
            d.iter_mut().for_each(|v| *v = F::zero());
            for ky in 0..k {
                let Some(oy) = (iy + pad).checked_sub(ky).filter(|&oy| oy < ho) else {
                    continue;
                };
                for kx in 0..k {
                    let Some(ox) = (ix + pad).checked_sub(kx).filter(|&ox| ox < wo) else {
                        continue;
                    };
                    let src = &dout[((bi * ho + oy) * wo + ox) * col + (ky * k + kx) * c..][..c];
                    d.iter_mut().zip(src).for_each(|(a, s)| *a = *a + *s);
                }
            }
        });
    Ok(())
}

// ---- depth to space ----

pub(crate) fn check_d2s(op: &'static str, r: usize) -> Result<()> {
    if r == 0 {
        return Err(Error::arg(op, "upsampling factor r must be at least 1"));
    }
    Ok(())
}

/// x (B,H,W,r·r·C) → out (B,r·H,r·W,C); input channels ordered (dy, dx, c).
#[allow(clippy::too_many_arguments)]
pub fn depth_to_space<F: CpuFloat>(
    x: &[F],
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    r: usize,
    out: &mut [F],
) -> Result<()> {
    check_d2s("depth_to_space", r)?;
    check_len("depth_to_space", "x", x.len(), b * h * w * r * r * c)?;
    check_len("depth_to_space", "out", out.len(), b * h * w * r * r * c)?;
    if out.is_empty() {
        return Ok(());
    }
    let (oh, ow) = (h * r, w * r);
    // out pixel (b, y·r+dy, x·r+dx) ← x pixel (b, y, x), channels (dy, dx, ·)
    out.par_chunks_mut(c)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, oy, ox) = (row / (oh * ow), (row / ow) % oh, row % ow);
            let (y, dy, xx, dx) = (oy / r, oy % r, ox / r, ox % r);
            o.copy_from_slice(&x[((bi * h + y) * w + xx) * r * r * c + (dy * r + dx) * c..][..c]);
        });
    Ok(())
}

/// dout (B,r·H,r·W,C) → dx (B,H,W,r·r·C), overwritten.
#[allow(clippy::too_many_arguments)]
pub fn depth_to_space_bwd<F: CpuFloat>(
    dout: &[F],
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    r: usize,
    dx: &mut [F],
) -> Result<()> {
    // forward is a permutation, so the backward is its inverse:
    //          dx[b, y, x, (dy,dx,c)] = dout[b, y·r+dy, x·r+dx, c]
    check_d2s("depth_to_space_bwd", r)?;
    check_len(
        "depth_to_space_bwd",
        "dout",
        dout.len(),
        b * h * w * r * r * c,
    )?;
    check_len("depth_to_space_bwd", "dx", dx.len(), b * h * w * r * r * c)?;
    if dx.is_empty() {
        return Ok(());
    }
    let ow = w * r;
    dx.par_chunks_mut(r * r * c)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(row, d)| {
            let (bi, y, xx) = (row / (h * w), (row / w) % h, row % w);
            for dy in 0..r {
                for dxi in 0..r {
                    let src = &dout[((bi * h * r + y * r + dy) * ow + xx * r + dxi) * c..][..c];
                    d[(dy * r + dxi) * c..][..c].copy_from_slice(src);
                }
            }
        });
    Ok(())
}

// ---- bilinear resize ----

/// One output coordinate's two source indices and weights along an axis.
#[derive(Clone, Copy, Debug)]
struct Tap<F> {
    i0: usize,
    i1: usize,
    l0: F,
    l1: F,
}

/// PyTorch's `upsample_bilinear2d` with `align_corners=False` along one axis, output
/// size given (so scale = in/out): src = max((dst + ½)·in/out − ½, 0), i0 = ⌊src⌋,
/// i1 = min(i0 + 1, in − 1), λ1 = src − i0, λ0 = 1 − λ1.
fn taps<F: CpuFloat>(n_in: usize, n_out: usize) -> Vec<Tap<F>> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|d| {
            // negative source coordinates clamp to 0 (the first half output pixel)
            let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f64;
            Tap {
                i0,
                i1,
                l0: f(1.0 - l1),
                l1: f(l1),
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn check_resize(
    op: &'static str,
    x_len: usize,
    out_len: usize,
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ho: usize,
    wo: usize,
) -> Result<()> {
    if h == 0 || w == 0 || ho == 0 || wo == 0 {
        return Err(Error::arg(
            op,
            format!("resize from {h}x{w} to {ho}x{wo}: every size must be at least 1"),
        ));
    }
    check_len(op, "input", x_len, b * h * w * c)?;
    check_len(op, "output", out_len, b * ho * wo * c)
}

/// x (B,H,W,C) → out (B,Ho,Wo,C), `F.interpolate(mode="bilinear", align_corners=False)`.
#[allow(clippy::too_many_arguments)]
pub fn resize_bilinear<F: CpuFloat>(
    x: &[F],
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ho: usize,
    wo: usize,
    out: &mut [F],
) -> Result<()> {
    check_resize("resize_bilinear", x.len(), out.len(), b, h, w, c, ho, wo)?;
    if out.is_empty() {
        return Ok(());
    }
    let (ty, tx) = (taps::<F>(h, ho), taps::<F>(w, wo));
    out.par_chunks_mut(c)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, oy, ox) = (row / (ho * wo), (row / wo) % ho, row % wo);
            let (a, e) = (ty[oy], tx[ox]);
            let px = |iy: usize, ix: usize| &x[((bi * h + iy) * w + ix) * c..][..c];
            let (p00, p01, p10, p11) = (
                px(a.i0, e.i0),
                px(a.i0, e.i1),
                px(a.i1, e.i0),
                px(a.i1, e.i1),
            );
            for i in 0..c {
                o[i] =
                    a.l0 * (e.l0 * p00[i] + e.l1 * p01[i]) + a.l1 * (e.l0 * p10[i] + e.l1 * p11[i]);
            }
        });
    Ok(())
}

/// dout (B,Ho,Wo,C) → dx (B,H,W,C), overwritten.
#[allow(clippy::too_many_arguments)]
pub fn resize_bilinear_bwd<F: CpuFloat>(
    dout: &[F],
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ho: usize,
    wo: usize,
    dx: &mut [F],
) -> Result<()> {
    // forward: out[oy,ox] = Σ_{a∈{0,1}, e∈{0,1}} λy_a λx_e · x[iy_a, ix_e]
    // so:      dx[iy_a, ix_e] += λy_a λx_e · dout[oy,ox]   (a scatter: one task per image)
    // The weights are a product, so the scatter is done one axis at a time:
    //          t[oy, ix_e]   += λx_e · dout[oy, ox]   (along x, a (Ho, W, C) buffer)
    //          dx[iy_a, ·]   += λy_a · t[oy, ·]       (along y, whole rows of W·C)
    // 2·Ho·(Wo + W)·C multiply-adds instead of 4·Ho·Wo·C, and the second pass runs
    // over contiguous rows.
    check_resize(
        "resize_bilinear_bwd",
        dx.len(),
        dout.len(),
        b,
        h,
        w,
        c,
        ho,
        wo,
    )?;
    if dx.is_empty() {
        return Ok(());
    }
    let (ty, tx) = (taps::<F>(h, ho), taps::<F>(w, wo));
    let row = w * c;
    dx.par_chunks_mut(h * row).enumerate().for_each(|(bi, d)| {
        let mut t = vec![F::zero(); ho * row];
        for (oy, tr) in t.chunks_exact_mut(row).enumerate() {
            let src = &dout[(bi * ho + oy) * wo * c..][..wo * c];
            for (e, g) in tx.iter().zip(src.chunks_exact(c)) {
                for (ix, lx) in [(e.i0, e.l0), (e.i1, e.l1)] {
                    let dst = &mut tr[ix * c..][..c];
                    for i in 0..c {
                        dst[i] = dst[i] + lx * g[i];
                    }
                }
            }
        }
        d.iter_mut().for_each(|v| *v = F::zero());
        for (a, tr) in ty.iter().zip(t.chunks_exact(row)) {
            for (iy, ly) in [(a.i0, a.l0), (a.i1, a.l1)] {
                let dst = &mut d[iy * row..][..row];
                for i in 0..row {
                    dst[i] = dst[i] + ly * tr[i];
                }
            }
        }
    });
    Ok(())
}

// ---- per-row scale ----

/// out (N,C) = x (N,C) · g (N), row-broadcast.
pub fn mul_rows<F: CpuFloat>(x: &[F], g: &[F], c: usize, out: &mut [F]) -> Result<()> {
    let n = g.len();
    check_len("mul_rows", "x", x.len(), n * c)?;
    check_len("mul_rows", "out", out.len(), n * c)?;
    if c == 0 {
        return Ok(());
    }
    out.par_chunks_mut(c)
        .with_min_len(MIN_ROWS_PER_TASK)
        .zip(x.par_chunks(c))
        .zip(g.par_iter())
        .for_each(|((o, x), &s)| o.iter_mut().zip(x).for_each(|(o, x)| *o = *x * s));
    Ok(())
}

/// dx (N,C), dg (N), both overwritten.
pub fn mul_rows_bwd<F: CpuFloat>(
    x: &[F],
    g: &[F],
    dout: &[F],
    c: usize,
    dx: &mut [F],
    dg: &mut [F],
) -> Result<()> {
    // forward: out[n,i] = x[n,i]·g[n]
    // so:      dx[n,i] = dout[n,i]·g[n],  dg[n] = Σ_i dout[n,i]·x[n,i]
    let n = g.len();
    check_len("mul_rows_bwd", "x", x.len(), n * c)?;
    check_len("mul_rows_bwd", "dout", dout.len(), n * c)?;
    check_len("mul_rows_bwd", "dx", dx.len(), n * c)?;
    check_len("mul_rows_bwd", "dg", dg.len(), n)?;
    if c == 0 {
        dg.iter_mut().for_each(|v| *v = F::zero());
        return Ok(());
    }
    dx.par_chunks_mut(c)
        .with_min_len(MIN_ROWS_PER_TASK)
        .zip(dg.par_iter_mut())
        .enumerate()
        .for_each(|(row, (d, dgr))| {
            let (xr, gr) = (&x[row * c..][..c], &dout[row * c..][..c]);
            let mut acc = F::zero();
            for i in 0..c {
                d[i] = gr[i] * g[row];
                acc = acc + gr[i] * xr[i];
            }
            *dgr = acc;
        });
    Ok(())
}

// ---- mask losses ----

pub(crate) fn check_masks(
    op: &'static str,
    logits: usize,
    target: usize,
    m: usize,
    p: usize,
) -> Result<()> {
    if p == 0 {
        return Err(Error::arg(op, "a mask needs at least one pixel (P = 0)"));
    }
    check_len(op, "logits", logits, m * p)?;
    check_len(op, "target", target, m * p)
}

/// Per mask m: (BCE-with-logits averaged over its P pixels, Dice loss on σ(logits) with
/// PixelLM's smoothing `1 − (2·Σ(σ/s·t) + eps) / (Σσ/s + Σt/s + eps)`, s = [`DICE_SCALE`],
/// eps = [`DICE_EPS`]), and the sums (M, 4) they are made of (see
/// [`MaskLosses::sums`]).  logits, target (M,P); target in [0, 1].
pub fn mask_loss_fwd<F: CpuFloat>(
    logits: &[F],
    target: &[F],
    m: usize,
    p: usize,
) -> Result<MaskLosses<F, Vec<F>>> {
    check_masks("mask_loss_fwd", logits.len(), target.len(), m, p)?;
    let s: F = f(DICE_SCALE);
    let sums: Vec<F> = logits
        .par_chunks(p)
        .zip(target.par_chunks(p))
        .flat_map_iter(|(x, t)| {
            let (mut bce, mut inter, mut ssig, mut st) =
                (F::zero(), F::zero(), F::zero(), F::zero());
            for (&x, &t) in x.iter().zip(t) {
                // max(x,0) − x·t + log(1 + e^{−|x|}): no overflow for either sign
                bce = bce + x.max(F::zero()) - x * t + (-x.abs()).exp().ln_1p();
                let sg = sigmoid(x) / s;
                inter = inter + sg * t;
                ssig = ssig + sg;
                st = st + t / s;
            }
            [bce, inter, ssig, st]
        })
        .collect();
    let losses = sums
        .chunks_exact(4)
        .map(|q| (q[0] / f(p as f64), F::one() - dice_ratio(q)))
        .collect();
    Ok(MaskLosses { losses, sums })
}

/// (num, den) of the Dice ratio num/den from one mask's four sums.
fn dice_parts<F: CpuFloat>(q: &[F]) -> (F, F) {
    let eps: F = f(DICE_EPS);
    (f::<F>(2.0) * q[1] + eps, q[2] + q[3] + eps)
}

fn dice_ratio<F: CpuFloat>(q: &[F]) -> F {
    let (num, den) = dice_parts(q);
    num / den
}

/// dlogits (M,P) = d(Σ_m w_bce·bce_m + w_dice·dice_m)/dlogits, overwritten; `sums` (M, 4)
/// = [`mask_loss_fwd`]'s of the same logits and target.
#[allow(clippy::too_many_arguments)]
pub fn mask_loss_bwd<F: CpuFloat>(
    logits: &[F],
    target: &[F],
    sums: &[F],
    m: usize,
    p: usize,
    w_bce: F,
    w_dice: F,
    dlogits: &mut [F],
) -> Result<()> {
    // forward: bce = (1/P) Σ_j [max(x_j,0) − x_j t_j + log1p(e^{−|x_j|})]
    // so:      ∂bce/∂x_j = (σ_j − t_j)/P
    // forward: dice = 1 − num/den, num = 2·Σ σ_j t_j/s + eps, den = Σ σ_j/s + Σ t_j/s + eps
    // so:      ∂dice/∂σ_j = −(2 t_j/s)/den + num/(s·den²),  ∂σ_j/∂x_j = σ_j(1 − σ_j)
    check_masks("mask_loss_bwd", logits.len(), target.len(), m, p)?;
    check_len("mask_loss_bwd", "sums", sums.len(), 4 * m)?;
    check_len("mask_loss_bwd", "dlogits", dlogits.len(), m * p)?;
    let (s, two): (F, F) = (f(DICE_SCALE), f(2.0));
    let inv_p = F::one() / f(p as f64);
    dlogits
        .par_chunks_mut(p)
        .zip(logits.par_chunks(p))
        .zip(target.par_chunks(p))
        .zip(sums.par_chunks(4))
        .for_each(|(((d, x), t), q)| {
            let (num, den) = dice_parts(q);
            let common = num / (s * den * den);
            for j in 0..p {
                let sg = sigmoid(x[j]);
                let ddice_dsig = common - two * t[j] / (s * den);
                d[j] = w_bce * (sg - t[j]) * inv_p + w_dice * ddice_dsig * sg * (F::one() - sg);
            }
        });
    Ok(())
}
