//! Stand-in CPU attention with the exact API of `kernels::attention` (the CPU twin of
//! the CUDA attention kernel, written on branch `attn`).  The CPU backend calls these
//! two functions; once `kernels::attention` is merged they forward to it.
//!
//! B batch, NH query heads, NKV key/value heads (GQA: query head h reads kv head
//! h / (NH/NKV)), Tq queries, Tk keys, HS head size.
pub use crate::backend::AttnShape;
use crate::error::{check_len, Error, Result};
use num_traits::Float;
use rayon::prelude::*;

fn check<F>(
    op: &'static str,
    s: &AttnShape,
    q: &[F],
    k: &[F],
    v: &[F],
    bias: Option<&[F]>,
    key_mask: Option<&[u8]>,
) -> Result<()> {
    if s.nkv == 0 || s.nh % s.nkv != 0 {
        return Err(Error::arg(
            op,
            format!(
                "{} query heads is not a multiple of {} kv heads",
                s.nh, s.nkv
            ),
        ));
    }
    if s.causal && s.tq > s.tk {
        return Err(Error::arg(
            op,
            format!(
                "causal attention with more queries ({}) than keys ({})",
                s.tq, s.tk
            ),
        ));
    }
    check_len(op, "q", q.len(), s.b * s.nh * s.tq * s.hs)?;
    check_len(op, "k", k.len(), s.b * s.nkv * s.tk * s.hs)?;
    check_len(op, "v", v.len(), s.b * s.nkv * s.tk * s.hs)?;
    if let Some(b) = bias {
        check_len(op, "bias", b.len(), s.b * s.tk)?;
    }
    if let Some(m) = key_mask {
        check_len(op, "key_mask", m.len(), s.b * s.tk)?;
    }
    Ok(())
}

/// Scores of query row `i` of head (bi, h) against every key, masked keys = −∞.
#[allow(clippy::too_many_arguments)]
fn scores<F: Float>(
    s: &AttnShape,
    bi: usize,
    g: usize,
    qi: &[F],
    i: usize,
    k: &[F],
    bias: Option<&[F]>,
    key_mask: Option<&[u8]>,
    out: &mut [F],
) {
    let scale = F::from(s.scale).unwrap();
    let last = i + s.tk - s.tq; // the last key a causal query may see (bottom-right)
    for (j, o) in out.iter_mut().enumerate() {
        let visible = (!s.causal || j <= last) && key_mask.is_none_or(|m| m[bi * s.tk + j] != 0);
        *o = if visible {
            let kj = &k[((bi * s.nkv + g) * s.tk + j) * s.hs..][..s.hs];
            let dot = qi.iter().zip(kj).fold(F::zero(), |a, (&x, &y)| a + x * y);
            dot * scale + bias.map_or(F::zero(), |b| b[bi * s.tk + j])
        } else {
            F::neg_infinity()
        };
    }
}

/// out (B,NH,Tq,HS) = softmax(q kᵀ·scale + bias, masked) v; lse (B,NH,Tq).
/// A query that sees no key gets out = 0 and lse = −∞.
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
    check("attention_fwd", s, q, k, v, bias, key_mask)?;
    check_len("attention_fwd", "out", out.len(), s.b * s.nh * s.tq * s.hs)?;
    check_len("attention_fwd", "lse", lse.len(), s.b * s.nh * s.tq)?;
    let group = s.nh / s.nkv;
    out.par_chunks_mut(s.hs.max(1))
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each_init(
            || vec![F::zero(); s.tk],
            |p, (row, (o, l))| {
                let i = row % s.tq;
                let h = (row / s.tq) % s.nh;
                let bi = row / (s.tq * s.nh);
                let g = h / group;
                let qi = &q[row * s.hs..][..s.hs];
                scores(s, bi, g, qi, i, k, bias, key_mask, p);
                let mx = p.iter().fold(F::neg_infinity(), |a, &x| a.max(x));
                o.iter_mut().for_each(|e| *e = F::zero());
                if mx == F::neg_infinity() {
                    *l = F::neg_infinity();
                    return;
                }
                let mut sum = F::zero();
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = (*pj - mx).exp();
                    sum = sum + *pj;
                    if *pj != F::zero() {
                        let vj = &v[((bi * s.nkv + g) * s.tk + j) * s.hs..][..s.hs];
                        o.iter_mut().zip(vj).for_each(|(e, &x)| *e = *e + *pj * x);
                    }
                }
                let inv = F::one() / sum;
                o.iter_mut().for_each(|e| *e = *e * inv);
                *l = mx + sum.ln();
            },
        );
    Ok(())
}

/// Backward of [`attention_fwd_cpu`]; dq, dk, dv and dbias are overwritten.
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
    // forward: P = exp(S − lse), S = q kᵀ·scale + bias, out = P v
    // so:      dv  = Pᵀ dout,   dP = dout vᵀ,   dS = P ∘ (dP − rowsum(dout ∘ out))
    //          dq  = dS k·scale, dk = dSᵀ q·scale, dbias[j] = Σ_{h,i} dS[i,j]
    check("attention_bwd", s, q, k, v, bias, key_mask)?;
    let nq = s.b * s.nh * s.tq * s.hs;
    check_len("attention_bwd", "out", out.len(), nq)?;
    check_len("attention_bwd", "dout", dout.len(), nq)?;
    check_len("attention_bwd", "dq", dq.len(), nq)?;
    check_len("attention_bwd", "lse", lse.len(), s.b * s.nh * s.tq)?;
    check_len("attention_bwd", "dk", dk.len(), k.len())?;
    check_len("attention_bwd", "dv", dv.len(), v.len())?;
    if let Some(db) = &dbias {
        check_len("attention_bwd", "dbias", db.len(), s.b * s.tk)?;
    }
    let group = s.nh / s.nkv;
    let (hs, tq, tk) = (s.hs, s.tq, s.tk);
    let scale = F::from(s.scale).unwrap();
    // one task per (batch, kv head): it owns dk, dv of that head and dq of its query group
    let kv_block = tk * hs;
    let q_block = group * tq * hs;
    let partial_dbias: Vec<Vec<F>> = dk
        .par_chunks_mut(kv_block.max(1))
        .zip(dv.par_chunks_mut(kv_block.max(1)))
        .zip(dq.par_chunks_mut(q_block.max(1)))
        .enumerate()
        .map(|(bg, ((dkb, dvb), dqb))| {
            let bi = bg / s.nkv;
            let g = bg % s.nkv;
            dkb.iter_mut().for_each(|e| *e = F::zero());
            dvb.iter_mut().for_each(|e| *e = F::zero());
            dqb.iter_mut().for_each(|e| *e = F::zero());
            let mut db = vec![F::zero(); tk];
            let mut p = vec![F::zero(); tk];
            for hh in 0..group {
                let h = g * group + hh;
                for i in 0..tq {
                    let row = (bi * s.nh + h) * tq + i;
                    let l = lse[row];
                    if l == F::neg_infinity() {
                        continue;
                    }
                    let qi = &q[row * hs..][..hs];
                    let oi = &out[row * hs..][..hs];
                    let gi = &dout[row * hs..][..hs];
                    scores(s, bi, g, qi, i, k, bias, key_mask, &mut p);
                    let d = gi.iter().zip(oi).fold(F::zero(), |a, (&x, &y)| a + x * y);
                    let dqi = &mut dqb[(hh * tq + i) * hs..][..hs];
                    for j in 0..tk {
                        let pj = (p[j] - l).exp();
                        if pj == F::zero() {
                            continue;
                        }
                        let kj = &k[((bi * s.nkv + g) * tk + j) * hs..][..hs];
                        let vj = &v[((bi * s.nkv + g) * tk + j) * hs..][..hs];
                        let dp = gi.iter().zip(vj).fold(F::zero(), |a, (&x, &y)| a + x * y);
                        let ds = pj * (dp - d);
                        db[j] = db[j] + ds;
                        let dvj = &mut dvb[j * hs..][..hs];
                        dvj.iter_mut().zip(gi).for_each(|(e, &x)| *e = *e + pj * x);
                        let dkj = &mut dkb[j * hs..][..hs];
                        dkj.iter_mut()
                            .zip(qi)
                            .for_each(|(e, &x)| *e = *e + ds * scale * x);
                        dqi.iter_mut()
                            .zip(kj)
                            .for_each(|(e, &x)| *e = *e + ds * scale * x);
                    }
                }
            }
            db
        })
        .collect();
    if let Some(dbias) = dbias {
        dbias.iter_mut().for_each(|e| *e = F::zero());
        for (bg, part) in partial_dbias.iter().enumerate() {
            let bi = bg / s.nkv;
            dbias[bi * tk..][..tk]
                .iter_mut()
                .zip(part)
                .for_each(|(a, &b)| *a = *a + b);
        }
    }
    Ok(())
}
