//! RMSNorm and LayerNorm over the last axis, each backward under its forward.
use super::{f, reduce_rows, rows_mut, rows_of, CpuFloat};
use crate::error::{check_len, Result};

pub(super) fn rmsnorm_fwd<F: CpuFloat>(
    x: &[F],
    w: Option<&[F]>,
    eps: f32,
    c: usize,
    out: &mut [F],
    rstd: &mut [F],
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

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_bwd<F: CpuFloat>(
    dout: &[F],
    x: &[F],
    w: Option<&[F]>,
    rstd: &[F],
    c: usize,
    dx: &mut [F],
    dw: Option<&mut [F]>,
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

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_fwd<F: CpuFloat>(
    x: &[F],
    w: &[F],
    b: &[F],
    eps: f32,
    c: usize,
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
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

#[allow(clippy::too_many_arguments)]
pub(super) fn layernorm_bwd<F: CpuFloat>(
    dout: &[F],
    x: &[F],
    w: &[F],
    mean: &[F],
    rstd: &[F],
    c: usize,
    dx: &mut [F],
    dw: Option<&mut [F]>,
    db: Option<&mut [F]>,
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
        super::matmul::bias_bwd(dout, db, c)?;
    }
    Ok(())
}
