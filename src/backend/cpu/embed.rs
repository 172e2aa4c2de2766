//! Token embeddings (gather / scatter-add) and image patches as matrix rows.
use super::{rows_mut, rows_of, CpuFloat};
use crate::error::{check_len, Error, Result};

pub(super) fn embedding_fwd<F: CpuFloat>(
    ids: &[u32],
    table: &[F],
    c: usize,
    out: &mut [F],
) -> Result<()> {
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

pub(super) fn embedding_bwd<F: CpuFloat>(
    ids: &[u32],
    dout: &[F],
    c: usize,
    dtable: &mut [F],
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

#[allow(clippy::too_many_arguments)]
pub(super) fn patchify<F: CpuFloat>(
    pixels: &[F],
    b: usize,
    ch: usize,
    h: usize,
    w: usize,
    p: usize,
    out: &mut [F],
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

#[allow(clippy::too_many_arguments)]
pub(super) fn patchify_bwd<F: CpuFloat>(
    dout: &[F],
    b: usize,
    ch: usize,
    h: usize,
    w: usize,
    p: usize,
    dpixels: &mut [F],
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
