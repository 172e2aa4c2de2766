//! Attention layout: heads split (with RoPE) and merged, and the KV-cache append.
use super::{f, rows_mut, CpuFloat, MIN_ROWS_PER_TASK};
use crate::backend::{Cols, KvAppend};
use crate::error::{check_len, Error, Result};
use rayon::prelude::*;

/// The (cos, sin) tables of [`rope_cos_sin`] for positions `pos0..pos0 + t`, in `F`
/// (empty without RoPE): what `heads_split` and its backward rotate by.
fn rope_tables<F: CpuFloat>(
    pos0: usize,
    t: usize,
    hs: usize,
    theta: Option<f32>,
) -> Vec<(Vec<F>, Vec<F>)> {
    match theta {
        Some(th) => {
            let inv = inv_freq(hs, th);
            (0..t)
                .map(|ti| {
                    let (c, s) = rope_cos_sin(pos0 + ti, &inv);
                    (
                        c.into_iter().map(|v| f(v as f64)).collect(),
                        s.into_iter().map(|v| f(v as f64)).collect(),
                    )
                })
                .collect()
        }
        None => Vec::new(),
    }
}

/// HF LLaMA's inverse frequencies, computed in f32 as `transformers` does so that f32
/// logits match it: inv_freq[i] = 1 / θ^(2i/HS), i < HS/2.
fn inv_freq(hs: usize, theta: f32) -> Vec<f32> {
    (0..hs / 2)
        .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / hs as f32))
        .collect()
}

/// cos and sin of `pos · inv_freq[i]` in f32 (as `transformers` computes them).
fn rope_cos_sin(pos: usize, inv: &[f32]) -> (Vec<f32>, Vec<f32>) {
    inv.iter()
        .map(|&w| {
            let a = pos as f32 * w;
            (a.cos(), a.sin())
        })
        .unzip()
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

#[allow(clippy::too_many_arguments)]
pub(super) fn heads_split<F: CpuFloat>(
    x: &[F],
    x_at: Cols,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    pos0: usize,
    theta: Option<f32>,
    out: &mut [F],
) -> Result<()> {
    check_heads("heads_split", hs, theta)?;
    x_at.check("heads_split", "x", x.len(), b * t, nh * hs)?;
    check_len("heads_split", "out", out.len(), b * t * nh * hs)?;
    let tables = rope_tables::<F>(pos0, t, hs, theta);
    // out row (bi, h, ti) ← x row (bi, ti, h)
    rows_mut(out, hs, |row, o| {
        let ti = row % t;
        let h = (row / t) % nh;
        let bi = row / (t * nh);
        let xr = &x[x_at.off + (bi * t + ti) * x_at.ld + h * hs..][..hs];
        split_row(o, xr, tables.get(ti));
    });
    Ok(())
}

/// One head's row of the split: o ← xr, rotated by RoPE's (cos, sin) when given.
fn split_row<F: CpuFloat>(o: &mut [F], xr: &[F], rope: Option<&(Vec<F>, Vec<F>)>) {
    match rope {
        None => o.copy_from_slice(xr),
        Some((cos, sin)) => {
            // forward (HF rotate_half): o[i]   = x[i]cos − x[i+h]sin
            //                           o[i+h] = x[i+h]cos + x[i]sin
            let half = o.len() / 2;
            for i in 0..half {
                o[i] = xr[i] * cos[i] - xr[i + half] * sin[i];
                o[i + half] = xr[i + half] * cos[i] + xr[i] * sin[i];
            }
        }
    }
}

/// [`heads_split`] of x (B,T,NKV,HS) into time rows `at..at + T` of out
/// (B,NKV,`cap`,HS), rotated by `theta` (the keys) or not (the values), the rest of out
/// untouched: a KV cache's new keys or values written in place.
pub(super) fn heads_split_at<F: CpuFloat>(
    x: &[F],
    x_at: Cols,
    a: &KvAppend,
    theta: Option<f32>,
    out: &mut [F],
) -> Result<()> {
    const OP: &str = "append_kv";
    let (b, t, nh, hs) = (a.b, a.t, a.nkv, a.hs);
    check_heads(OP, hs, theta)?;
    x_at.check(OP, "input", x.len(), b * t, nh * hs)?;
    if a.at + t > a.cap {
        return Err(Error::shape(
            OP,
            format!(
                "time rows {}..{} do not fit {} rows per head",
                a.at,
                a.at + t,
                a.cap
            ),
        ));
    }
    check_len(OP, "output", out.len(), b * nh * a.cap * hs)?;
    let tables = rope_tables::<F>(a.pos0, t, hs, theta);
    // block (bi, h) of out: its rows at..at + T ← x rows (bi, ti, h)
    rows_mut(out, a.cap * hs, |bh, blk| {
        let (bi, h) = (bh / nh, bh % nh);
        for ti in 0..t {
            let xr = &x[x_at.off + (bi * t + ti) * x_at.ld + h * hs..][..hs];
            split_row(&mut blk[(a.at + ti) * hs..][..hs], xr, tables.get(ti));
        }
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn heads_split_bwd<F: CpuFloat>(
    dout: &[F],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    pos0: usize,
    theta: Option<f32>,
    dx: &mut [F],
    dx_at: Cols,
) -> Result<()> {
    check_heads("heads_split_bwd", hs, theta)?;
    check_len("heads_split_bwd", "dout", dout.len(), b * t * nh * hs)?;
    dx_at.check("heads_split_bwd", "dx", dx.len(), b * t, nh * hs)?;
    let tables = rope_tables::<F>(pos0, t, hs, theta);
    let w = nh * hs;
    if b * t == 0 {
        return Ok(());
    }
    // token row r of dx at dx_at.off + r·ld: its heads h ← dout row (bi, h, ti)
    dx[dx_at.off..]
        .par_chunks_mut(dx_at.ld.max(1))
        .take(b * t)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, row)| {
            let (bi, ti) = (r / t, r % t);
            for (h, d) in row[..w].chunks_mut(hs).enumerate() {
                let gr = &dout[((bi * nh + h) * t + ti) * hs..][..hs];
                merge_row(d, gr, tables.get(ti));
            }
        });
    Ok(())
}

/// One head's row of the split's backward: d ← gr, rotated back when RoPE's
/// (cos, sin) are given.
fn merge_row<F: CpuFloat>(d: &mut [F], gr: &[F], rope: Option<&(Vec<F>, Vec<F>)>) {
    match rope {
        None => d.copy_from_slice(gr),
        Some((cos, sin)) => {
            // forward: o[i] = x[i]cos − x[i+h]sin, o[i+h] = x[i+h]cos + x[i]sin
            // so (the transposed rotation):
            //          dx[i]   =  do[i]cos + do[i+h]sin
            //          dx[i+h] = −do[i]sin + do[i+h]cos
            let half = d.len() / 2;
            for i in 0..half {
                d[i] = gr[i] * cos[i] + gr[i + half] * sin[i];
                d[i + half] = gr[i + half] * cos[i] - gr[i] * sin[i];
            }
        }
    }
}

pub(super) fn heads_merge<F: CpuFloat>(
    x: &[F],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
    out: &mut [F],
) -> Result<()> {
    check_len("heads_merge", "x", x.len(), b * t * nh * hs)?;
    check_len("heads_merge", "out", out.len(), b * t * nh * hs)?;
    // out row (bi, ti, h) ← x row (bi, h, ti)
    crate::kernels::attention::swap_middle(x, [b, nh, t, hs], out);
    Ok(())
}
