//! TEMPORARY stand-in for `crate::kernels::mask` (the mask-metric kernels' CPU twins,
//! written on another branch) with the same signatures, so the evaluator builds and is
//! tested before they land.  Delete this file and point `eval.rs` at
//! `crate::kernels::mask` when they do.
#![allow(dead_code)]
use crate::error::{Error, Result};

/// `d = max(1, round(ratio · diagonal))`.
pub fn boundary_width(h: usize, w: usize, ratio: f64) -> usize {
    let diag = ((h * h + w * w) as f64).sqrt();
    ((ratio * diag).round() as usize).max(1)
}

/// `i / u`, 1 when `u == 0`.
pub fn iou_from_counts(i: u64, u: u64) -> f64 {
    if u == 0 {
        1.0
    } else {
        i as f64 / u as f64
    }
}

/// pred (P, H, W), gt (G, H, W), nonzero = foreground; inter, union (P, G).
#[allow(clippy::too_many_arguments)]
pub fn pair_counts_cpu(
    pred: &[u8],
    gt: &[u8],
    p: usize,
    g: usize,
    h: usize,
    w: usize,
    inter: &mut [u64],
    union: &mut [u64],
) -> Result<()> {
    let n = h * w;
    if pred.len() != p * n || gt.len() != g * n || inter.len() != p * g || union.len() != p * g {
        return Err(Error::shape("pair_counts_cpu", "buffer sizes"));
    }
    let area = |m: &[u8]| m.iter().filter(|&&v| v != 0).count() as u64;
    let pa: Vec<u64> = pred.chunks_exact(n.max(1)).take(p).map(area).collect();
    let ga: Vec<u64> = gt.chunks_exact(n.max(1)).take(g).map(area).collect();
    for i in 0..p {
        for j in 0..g {
            let a = &pred[i * n..(i + 1) * n];
            let b = &gt[j * n..(j + 1) * n];
            let c = a.iter().zip(b).filter(|&(&x, &y)| x != 0 && y != 0).count() as u64;
            inter[i * g + j] = c;
            union[i * g + j] =
                pa.get(i).copied().unwrap_or(0) + ga.get(j).copied().unwrap_or(0) - c;
        }
    }
    Ok(())
}

/// Boundary of `mask` (H, W): foreground pixels within Chebyshev distance `d` of the
/// background or the outside (mask minus its erosion by a 3×3 element, `d` times).
pub fn boundary_cpu(mask: &[u8], h: usize, w: usize, d: usize, out: &mut [u8]) -> Result<()> {
    if mask.len() != h * w || out.len() != h * w {
        return Err(Error::shape("boundary_cpu", "buffer sizes"));
    }
    // erosion by a (2d+1) square = row min-filter then column min-filter, via the
    // distance to the nearest background pixel along the row/column (capped).
    let cap = d + 1;
    let mut row = vec![0usize; h * w]; // horizontal distance to background
    for y in 0..h {
        let r = &mask[y * w..(y + 1) * w];
        let mut run = 0usize;
        let mut left = vec![0usize; w];
        for x in 0..w {
            run = if r[x] != 0 { (run + 1).min(cap) } else { 0 };
            left[x] = run;
        }
        run = 0;
        for x in (0..w).rev() {
            run = if r[x] != 0 { (run + 1).min(cap) } else { 0 };
            row[y * w + x] = left[x].min(run);
        }
    }
    // a pixel survives erosion iff every pixel of its column window has row distance
    // > d, i.e. the minimum over |dy| ≤ d of row[] is ≥ d+1, and the window is inside.
    for x in 0..w {
        for y in 0..h {
            let inside = y >= d && y + d < h;
            let mut keep = inside && row[y * w + x] > d;
            if keep {
                for yy in y - d..=y + d {
                    if row[yy * w + x] <= d {
                        keep = false;
                        break;
                    }
                }
            }
            out[y * w + x] = u8::from(mask[y * w + x] != 0 && !keep);
        }
    }
    Ok(())
}

/// Boundary IoU of two (H, W) masks; empty vs empty = 1.
pub fn boundary_iou_cpu(pred: &[u8], gt: &[u8], h: usize, w: usize, ratio: f64) -> Result<f64> {
    let d = boundary_width(h, w, ratio);
    let mut a = vec![0u8; h * w];
    let mut b = vec![0u8; h * w];
    boundary_cpu(pred, h, w, d, &mut a)?;
    boundary_cpu(gt, h, w, d, &mut b)?;
    let mut i = 0u64;
    let mut u = 0u64;
    for (&x, &y) in a.iter().zip(&b) {
        i += u64::from(x != 0 && y != 0);
        u += u64::from(x != 0 || y != 0);
    }
    Ok(iou_from_counts(i, u))
}
