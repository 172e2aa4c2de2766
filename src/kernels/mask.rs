//! Mask metrics: intersection/union counts for every prediction × reference pair,
//! boundary extraction and Boundary IoU (Cheng et al. 2021), and a differentiable soft
//! IoU with its backward.  Kernels in `kernels/mask.cu`; the CPU twins here are both
//! the reference and the fast CPU path behind `popen eval-masks` and `popen eval`.
//!
//! P predictions, G references, H × W pixels, B masks in a batch.  Masks are `u8`,
//! row-major (H, W), nonzero = foreground.
//!
//! Conventions:
//! - IoU of two empty masks is 1.0 (LISA's convention): a model that correctly
//!   predicts "nothing" is right.
//! - Boundary of a mask = the mask minus its erosion by `d` iterations of a 3 × 3
//!   element, pixels outside the image counting as background (as `cv2.erode` on a
//!   zero-padded mask in Cheng et al.'s reference code).  `d` iterations of a 3 × 3
//!   erosion equal one min filter over a (2d+1) × (2d+1) square, which is separable, so
//!   the CPU twin erodes rows then columns with running counts: O(1) per pixel.
//! - Boundary IoU = |∂G ∩ ∂P| / |∂G ∪ ∂P| with ∂M = M minus erode(M, d), which is
//!   Cheng et al.'s |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|.
use crate::error::{check_len, Error, Result};
use num_traits::Float;
use rayon::prelude::*;

/// Cheng et al.'s default boundary width as a fraction of the image diagonal.
pub const DEFAULT_DILATION_RATIO: f64 = 0.02;
/// Added to numerator and denominator of the soft IoU: keeps the gradient finite when
/// both masks are empty and gives empty-vs-empty = 1, as for the hard IoU.
pub const SOFT_IOU_EPS: f64 = 1e-6;

/// Pixels counted per chunk with `u8` accumulators before widening (≤ 255 so the
/// per-lane byte counters cannot overflow); lets the count loops vectorize.
const COUNT_CHUNK: usize = 255;

/// Boundary width in pixels: `max(1, round(ratio × sqrt(h² + w²)))`.  Rounds half to
/// even, as Python's `round` in Cheng et al.'s `mask_to_boundary` does.
pub fn boundary_width(h: usize, w: usize, dilation_ratio: f64) -> usize {
    let diag = ((h * h + w * w) as f64).sqrt();
    let d = (dilation_ratio * diag).round_ties_even();
    if d.is_finite() && d >= 1.0 {
        d as usize
    } else {
        1
    }
}

/// IoU from integer counts; `union == 0` (both masks empty) gives 1.0.
pub fn iou_from_counts(inter: u64, union: u64) -> f64 {
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Number of foreground (nonzero) pixels.
pub fn area_cpu(mask: &[u8]) -> u64 {
    let mut total = 0u64;
    for c in mask.chunks(COUNT_CHUNK) {
        let mut acc = 0u8;
        for &v in c {
            acc += (v != 0) as u8;
        }
        total += acc as u64;
    }
    total
}

/// Intersection count of two masks of the same length.
fn inter_count(a: &[u8], b: &[u8]) -> u64 {
    let mut total = 0u64;
    for (ca, cb) in a.chunks(COUNT_CHUNK).zip(b.chunks(COUNT_CHUNK)) {
        let mut acc = 0u8;
        for (&x, &y) in ca.iter().zip(cb) {
            acc += ((x != 0) & (y != 0)) as u8;
        }
        total += acc as u64;
    }
    total
}

/// Intersection and union counts of one pair of masks of the same length.
pub fn counts_cpu(a: &[u8], b: &[u8]) -> Result<(u64, u64)> {
    check_len("counts_cpu", "second mask", b.len(), a.len())?;
    let i = inter_count(a, b);
    Ok((i, area_cpu(a) + area_cpu(b) - i))
}

fn check_masks(op: &'static str, what: &str, m: &[u8], n: usize, h: usize, w: usize) -> Result<()> {
    let want = n
        .checked_mul(h)
        .and_then(|x| x.checked_mul(w))
        .ok_or_else(|| Error::arg(op, format!("{what}: {n} × {h} × {w} overflows")))?;
    check_len(op, what, m.len(), want)
}

/// Intersection and union counts for all P × G pairs.
///
/// pred (P, H, W), gt (G, H, W), inter (P, G), union (P, G) — overwritten.
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
    const OP: &str = "pair_counts_cpu";
    check_masks(OP, "pred", pred, p, h, w)?;
    check_masks(OP, "gt", gt, g, h, w)?;
    check_len(OP, "inter", inter.len(), p * g)?;
    check_len(OP, "union", union.len(), p * g)?;
    let hw = h * w;
    if p == 0 || g == 0 {
        return Ok(());
    }
    // union = |a| + |b| − |a ∩ b|: areas once per mask, one pass per pair for ∩.
    let gt_area: Vec<u64> = gt.chunks(hw.max(1)).take(g).map(area_cpu).collect();
    let rows = inter
        .par_chunks_mut(g)
        .zip(union.par_chunks_mut(g))
        .enumerate();
    // Small problems (one pair in eval-masks) are not worth the rayon hand-off.
    let work = p * g * hw;
    let body = |(i, (ir, ur)): (usize, (&mut [u64], &mut [u64]))| {
        let a = &pred[i * hw..(i + 1) * hw];
        let aa = area_cpu(a);
        for j in 0..g {
            let b = &gt[j * hw..(j + 1) * hw];
            let x = inter_count(a, b);
            ir[j] = x;
            ur[j] = aa + gt_area[j] - x;
        }
    };
    if work < (1 << 20) {
        inter
            .chunks_mut(g)
            .zip(union.chunks_mut(g))
            .enumerate()
            .for_each(body);
    } else {
        rows.for_each(body);
    }
    Ok(())
}

/// Horizontal erosion of one row: `out[x] = 1` iff `row[x-d ..= x+d]` lies inside the
/// row and is all foreground.  `run` is scratch of the row's length.
fn erode_row(row: &[u8], d: usize, run: &mut [u32], out: &mut [u8]) {
    let need = d as u32 + 1;
    // run[x] = length of the foreground run ending at x (from the left)
    let mut r = 0u32;
    for (x, &v) in row.iter().enumerate() {
        r = if v != 0 { r + 1 } else { 0 };
        run[x] = r;
    }
    // from the right: eroded iff both runs reach d+1 (window inside the image and full)
    let mut r = 0u32;
    for x in (0..row.len()).rev() {
        r = if row[x] != 0 { r + 1 } else { 0 };
        out[x] = (run[x] >= need && r >= need) as u8;
    }
}

/// Boundary of one mask: `out = mask ∧ ¬erode(mask, d)`, as 0/1.
///
/// mask (H, W), out (H, W).  `d ≥ 1` iterations of a 3 × 3 erosion, pixels outside
/// the image count as background.
pub fn boundary_cpu(mask: &[u8], h: usize, w: usize, d: usize, out: &mut [u8]) -> Result<()> {
    const OP: &str = "boundary_cpu";
    check_masks(OP, "mask", mask, 1, h, w)?;
    check_len(OP, "out", out.len(), h * w)?;
    if d == 0 {
        return Err(Error::arg(OP, "boundary width d must be at least 1"));
    }
    if h == 0 || w == 0 {
        return Ok(());
    }
    // Rows: eroded horizontally into `out` (reused as scratch).
    let mut run = vec![0u32; w];
    for y in 0..h {
        erode_row(
            &mask[y * w..(y + 1) * w],
            d,
            &mut run,
            &mut out[y * w..(y + 1) * w],
        );
    }
    // Columns, row by row so the inner loops run along memory and vectorize:
    // up[y][x] = run of horizontally-eroded pixels ending at y from the top.
    let need = d as u32 + 1;
    let mut up = vec![0u32; h * w];
    let mut prev = vec![0u32; w];
    for y in 0..h {
        let row = &out[y * w..(y + 1) * w];
        let cur = &mut up[y * w..(y + 1) * w];
        for x in 0..w {
            let v = if row[x] != 0 { prev[x] + 1 } else { 0 };
            cur[x] = v;
            prev[x] = v;
        }
    }
    // From the bottom: down run; eroded iff up ≥ d+1 and down ≥ d+1; the boundary
    // is the mask minus that.  Rows are finished bottom-up, so `out[y]` (still the
    // horizontal erosion) is read before it is overwritten.
    let mut down = vec![0u32; w];
    for y in (0..h).rev() {
        let m = &mask[y * w..(y + 1) * w];
        let u = &up[y * w..(y + 1) * w];
        let o = &mut out[y * w..(y + 1) * w];
        for x in 0..w {
            let dn = if o[x] != 0 { down[x] + 1 } else { 0 };
            down[x] = dn;
            let eroded = u[x] >= need && dn >= need;
            o[x] = ((m[x] != 0) & !eroded) as u8;
        }
    }
    Ok(())
}

/// Boundary IoU of one prediction against one reference (Cheng et al. 2021), with
/// `d = boundary_width(h, w, dilation_ratio)`.  Both boundaries empty (both masks
/// empty) gives 1.0.
///
/// pred (H, W), gt (H, W).
pub fn boundary_iou_cpu(
    pred: &[u8],
    gt: &[u8],
    h: usize,
    w: usize,
    dilation_ratio: f64,
) -> Result<f64> {
    let (i, u) = boundary_counts_cpu(pred, gt, h, w, dilation_ratio)?;
    Ok(iou_from_counts(i, u))
}

/// Intersection and union of the two boundaries (see [`boundary_iou_cpu`]).
pub fn boundary_counts_cpu(
    pred: &[u8],
    gt: &[u8],
    h: usize,
    w: usize,
    dilation_ratio: f64,
) -> Result<(u64, u64)> {
    const OP: &str = "boundary_iou_cpu";
    check_masks(OP, "pred", pred, 1, h, w)?;
    check_masks(OP, "gt", gt, 1, h, w)?;
    if !(dilation_ratio.is_finite() && dilation_ratio >= 0.0) {
        return Err(Error::arg(
            OP,
            format!("dilation ratio must be finite and ≥ 0, got {dilation_ratio}"),
        ));
    }
    let d = boundary_width(h, w, dilation_ratio);
    let mut bp = vec![0u8; h * w];
    let mut bg = vec![0u8; h * w];
    boundary_cpu(pred, h, w, d, &mut bp)?;
    boundary_cpu(gt, h, w, d, &mut bg)?;
    counts_cpu(&bp, &bg)
}

/// Soft IoU sums of probabilities `p ∈ [0, 1]` against a binary target, per mask:
/// `sums[b] = [I, Σp, Σt]` with `I = Σ p·t`.
///
/// prob (B, N), target (B, N) (nonzero = 1), sums (B, 3) — overwritten.
pub fn soft_iou_sums_cpu<T: Float + Send + Sync>(
    prob: &[T],
    target: &[u8],
    b: usize,
    n: usize,
    sums: &mut [T],
) -> Result<()> {
    const OP: &str = "soft_iou_sums_cpu";
    check_len(OP, "prob", prob.len(), b * n)?;
    check_len(OP, "target", target.len(), b * n)?;
    check_len(OP, "sums", sums.len(), b * 3)?;
    for (k, s) in sums.chunks_mut(3).enumerate() {
        let (mut i, mut sp, mut st) = (T::zero(), T::zero(), T::zero());
        for j in k * n..(k + 1) * n {
            let p = prob[j];
            sp = sp + p;
            if target[j] != 0 {
                i = i + p;
                st = st + T::one();
            }
        }
        s[0] = i;
        s[1] = sp;
        s[2] = st;
    }
    Ok(())
}

/// Soft IoU from its sums: `(I + ε) / (U + ε)` with `U = Σp + Σt − I`, ε =
/// [`SOFT_IOU_EPS`].
pub fn soft_iou_from_sums<T: Float>(s: &[T]) -> T {
    let eps = T::from(SOFT_IOU_EPS).unwrap();
    let u = s[1] + s[2] - s[0];
    (s[0] + eps) / (u + eps)
}

/// Soft IoU per mask.  prob (B, N), target (B, N), iou (B) — overwritten.
pub fn soft_iou_fwd_cpu<T: Float + Send + Sync>(
    prob: &[T],
    target: &[u8],
    b: usize,
    n: usize,
    iou: &mut [T],
) -> Result<()> {
    check_len("soft_iou_fwd_cpu", "iou", iou.len(), b)?;
    let mut sums = vec![T::zero(); b * 3];
    soft_iou_sums_cpu(prob, target, b, n, &mut sums)?;
    for (o, s) in iou.iter_mut().zip(sums.chunks(3)) {
        *o = soft_iou_from_sums(s);
    }
    Ok(())
}

/// Backward of the soft IoU.
///
/// forward: `iou = (I + ε) / (U + ε)`, `I = Σ p·t`, `U = Σp + Σt − I`
/// so:      `∂I/∂p_j = t_j`, `∂U/∂p_j = 1 − t_j`, and
///          `d_prob[j] = d_iou · (t_j (U + ε) − (I + ε)(1 − t_j)) / (U + ε)²`
///
/// prob (B, N), target (B, N), sums (B, 3) from the forward, d_iou (B),
/// d_prob (B, N) — overwritten.
pub fn soft_iou_bwd_cpu<T: Float + Send + Sync>(
    target: &[u8],
    sums: &[T],
    d_iou: &[T],
    b: usize,
    n: usize,
    d_prob: &mut [T],
) -> Result<()> {
    const OP: &str = "soft_iou_bwd_cpu";
    check_len(OP, "target", target.len(), b * n)?;
    check_len(OP, "sums", sums.len(), b * 3)?;
    check_len(OP, "d_iou", d_iou.len(), b)?;
    check_len(OP, "d_prob", d_prob.len(), b * n)?;
    let eps = T::from(SOFT_IOU_EPS).unwrap();
    for k in 0..b {
        let s = &sums[k * 3..k * 3 + 3];
        let i = s[0] + eps;
        let u = s[1] + s[2] - s[0] + eps;
        let g_in = d_iou[k] / u; // for t = 1
        let g_out = -d_iou[k] * i / (u * u); // for t = 0
        for j in k * n..(k + 1) * n {
            d_prob[j] = if target[j] != 0 { g_in } else { g_out };
        }
    }
    Ok(())
}
