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
//!   erosion equal one min filter over a (2d+1) × (2d+1) square, which is separable:
//!   the CPU twin packs 64 pixels to a word ([`PackedMask`]) and ANDs rows, then
//!   columns, over the window in log2(2d+1) doublings — about 0.1 operations per pixel.
//! - Boundary IoU = |∂G ∩ ∂P| / |∂G ∪ ∂P| with ∂M = M minus erode(M, d), which is
//!   Cheng et al.'s |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|.
use crate::error::{check_len, Error, Result};
use crate::kernels::{Device, DeviceBuf, KArg, LaunchCfg};
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

/// Intersection and union counts of two masks of the same length in one pass
/// (`u8` lane counters widened every [`COUNT_CHUNK`] pixels: the loop vectorizes).
fn inter_union_bytes(a: &[u8], b: &[u8]) -> (u64, u64) {
    let (mut ti, mut tu) = (0u64, 0u64);
    for (ca, cb) in a.chunks(COUNT_CHUNK).zip(b.chunks(COUNT_CHUNK)) {
        let (mut ai, mut au) = (0u8, 0u8);
        for (&x, &y) in ca.iter().zip(cb) {
            let (x, y) = (x != 0, y != 0);
            ai += (x & y) as u8;
            au += (x | y) as u8;
        }
        ti += ai as u64;
        tu += au as u64;
    }
    (ti, tu)
}

/// Intersection and union counts of one pair of masks of the same length.
pub fn counts_cpu(a: &[u8], b: &[u8]) -> Result<(u64, u64)> {
    check_len("counts_cpu", "second mask", b.len(), a.len())?;
    Ok(inter_union_bytes(a, b))
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
#[allow(clippy::too_many_arguments)] // the fixed public API
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
    if p >= 2 && g >= 2 {
        // Many pairs: pack each mask once ((P+G)·HW byte reads), then every pair is
        // HW/64 popcounts instead of HW byte compares.
        let pack = |m: &[u8]| PackedMask::pack(m, h, w);
        let pp: Vec<PackedMask> = pred
            .par_chunks(hw.max(1))
            .take(p)
            .map(pack)
            .collect::<Result<_>>()?;
        let gp: Vec<PackedMask> = gt
            .par_chunks(hw.max(1))
            .take(g)
            .map(pack)
            .collect::<Result<_>>()?;
        inter
            .par_chunks_mut(g)
            .zip(union.par_chunks_mut(g))
            .zip(pp.par_iter())
            .try_for_each(|((ir, ur), a)| -> Result<()> {
                for j in 0..g {
                    (ir[j], ur[j]) = a.inter_union(&gp[j])?;
                }
                Ok(())
            })?;
        return Ok(());
    }
    // One prediction or one reference (eval-masks): a fused byte pass per pair.
    let body = |(i, (ir, ur)): (usize, (&mut [u64], &mut [u64]))| {
        let a = &pred[i * hw..(i + 1) * hw];
        for j in 0..g {
            (ir[j], ur[j]) = inter_union_bytes(a, &gt[j * hw..(j + 1) * hw]);
        }
    };
    // Small problems are not worth the rayon hand-off.
    if p * g * hw < (1 << 20) {
        inter
            .chunks_mut(g)
            .zip(union.chunks_mut(g))
            .enumerate()
            .for_each(body);
    } else {
        inter
            .par_chunks_mut(g)
            .zip(union.par_chunks_mut(g))
            .enumerate()
            .for_each(body);
    }
    Ok(())
}

/// A binary mask packed 64 pixels to a word, each row starting on a new word; the
/// bits past the last column are zero, which is also what makes pixels right of the
/// image count as background in the erosion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedMask {
    h: usize,
    w: usize,
    /// words per row
    wpr: usize,
    /// (H, wpr)
    bits: Vec<u64>,
}

impl PackedMask {
    /// Pack a (H, W) `u8` mask, nonzero = foreground.
    pub fn pack(mask: &[u8], h: usize, w: usize) -> Result<Self> {
        check_masks("PackedMask::pack", "mask", mask, 1, h, w)?;
        let wpr = w.div_ceil(64);
        let mut bits = vec![0u64; h * wpr];
        if w > 0 {
            for (row, dst) in mask.chunks_exact(w).zip(bits.chunks_exact_mut(wpr)) {
                pack_row(row, dst);
            }
        }
        Ok(PackedMask { h, w, wpr, bits })
    }

    /// Height and width.
    pub fn dims(&self) -> (usize, usize) {
        (self.h, self.w)
    }

    /// Unpack into a (H, W) 0/1 mask.
    pub fn unpack(&self, out: &mut [u8]) -> Result<()> {
        check_len("PackedMask::unpack", "out", out.len(), self.h * self.w)?;
        if self.w == 0 {
            return Ok(());
        }
        for (row, src) in out
            .chunks_exact_mut(self.w)
            .zip(self.bits.chunks_exact(self.wpr))
        {
            for (x, o) in row.iter_mut().enumerate() {
                *o = ((src[x / 64] >> (x % 64)) & 1) as u8;
            }
        }
        Ok(())
    }

    /// Number of foreground pixels.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Intersection and union counts with a mask of the same size.
    pub fn inter_union(&self, other: &PackedMask) -> Result<(u64, u64)> {
        if self.dims() != other.dims() {
            return Err(Error::shape(
                "PackedMask::inter_union",
                format!("{:?} vs {:?}", self.dims(), other.dims()),
            ));
        }
        let (mut i, mut u) = (0u64, 0u64);
        for (a, b) in self.bits.iter().zip(&other.bits) {
            i += (a & b).count_ones() as u64;
            u += (a | b).count_ones() as u64;
        }
        Ok((i, u))
    }

    /// The boundary `M ∧ ¬erode(M, d)`: erosion by d iterations of a 3 × 3 element
    /// with outside = background, i.e. AND over the (2d+1) × (2d+1) window.  Windows
    /// of length L = 2d+1 are ANDs of two overlapping power-of-two windows (of length
    /// k ≤ L < 2k), built by log2(L) doublings of shift-and, first along rows (bit
    /// shifts) then along columns (row offsets).
    pub fn boundary(&self, d: usize) -> Result<PackedMask> {
        if d == 0 {
            return Err(Error::arg(
                "boundary",
                "boundary width d must be at least 1",
            ));
        }
        let (h, wpr) = (self.h, self.wpr);
        let len = 2 * d + 1;
        let k = 1usize << (usize::BITS - 1 - len.leading_zeros()); // k ≤ len < 2k
        let mut er = vec![0u64; h * wpr];
        // rows: er = AND of bits x-d ..= x+d (zero outside the row)
        let mut run = vec![0u64; wpr];
        let mut tmp = vec![0u64; wpr];
        for (src, dst) in self.bits.chunks_exact(wpr).zip(er.chunks_exact_mut(wpr)) {
            if src.iter().all(|&v| v == 0) {
                continue; // an empty row erodes to nothing
            }
            // run[x] = AND of src[x .. x+m), doubling m up to k
            run.copy_from_slice(src);
            let mut m = 1;
            while m < k {
                shr_bits(&run, m, &mut tmp);
                for (r, t) in run.iter_mut().zip(&tmp) {
                    *r &= *t;
                }
                m *= 2;
            }
            // window [x-d, x+d] = run[x-d] & run[x+d-k+1]
            shl_bits(&run, d, dst);
            let off = d as isize - k as isize + 1; // in [-d, 0]
            shl_bits(&run, (-off) as usize, &mut tmp);
            for (o, t) in dst.iter_mut().zip(&tmp) {
                *o &= *t;
            }
        }
        // columns: doubling over row offsets, in place (row y+m is read before it is
        // overwritten because y runs upward), rows past the bottom count as zero
        let mut m = 1;
        while m < k {
            for y in 0..h {
                let (a, b) = er.split_at_mut((y + 1) * wpr);
                let cur = &mut a[y * wpr..];
                if y + m < h {
                    let nxt = &b[(m - 1) * wpr..m * wpr];
                    for (c, n) in cur.iter_mut().zip(nxt) {
                        *c &= *n;
                    }
                } else {
                    cur.fill(0);
                }
            }
            m *= 2;
        }
        // eroded[y] = V[y-d] & V[y+d-k+1] (zero when y-d < 0: rows above the image);
        // boundary = mask & !eroded
        let mut out = self.bits.clone();
        for y in 0..h {
            let dst = &mut out[y * wpr..(y + 1) * wpr];
            if y < d || y + d >= h {
                continue; // window leaves the image: nothing is eroded away
            }
            let a = &er[(y - d) * wpr..(y - d + 1) * wpr];
            let b = &er[(y + d + 1 - k) * wpr..(y + d + 2 - k) * wpr];
            for ((o, x), z) in dst.iter_mut().zip(a).zip(b) {
                *o &= !(x & z);
            }
        }
        Ok(PackedMask {
            h,
            w: self.w,
            wpr,
            bits: out,
        })
    }
}

/// High bit of each byte of `x` set iff that byte is nonzero (SWAR; no carry crosses
/// bytes because each byte is at most 0x7f + 0x7f).
#[inline(always)]
fn nonzero_bytes(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    (((x & LOW7) + LOW7) | x) & !LOW7
}

/// Gathers the high bits of the 8 bytes (moved to bit 0 of each byte) into the low
/// byte, byte k → bit k.
const GATHER: u64 = 0x0102_0408_1020_4080;

/// Pack one row of bytes into bits (bit x of word x/64 = pixel x): 8 pixels per
/// SWAR step, about one operation per pixel.
fn pack_row(row: &[u8], dst: &mut [u64]) {
    let mut chunks = row.chunks_exact(64);
    for (c, d) in (&mut chunks).zip(dst.iter_mut()) {
        let mut v = 0u64;
        for (k, b) in c.chunks_exact(8).enumerate() {
            let x = u64::from_le_bytes(b.try_into().unwrap());
            let hb = nonzero_bytes(x) >> 7;
            v |= (hb.wrapping_mul(GATHER) >> 56) << (8 * k);
        }
        *d = v;
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut v = 0u64;
        for (j, &b) in rem.iter().enumerate() {
            v |= ((b != 0) as u64) << j;
        }
        dst[row.len() / 64] = v;
    }
}

/// `dst` bit x = `src` bit x + s (zeros shifted in past the end): a shift toward
/// lower indices.
fn shr_bits(src: &[u64], s: usize, dst: &mut [u64]) {
    let (ws, bs) = (s / 64, s % 64);
    let n = src.len();
    for i in 0..n {
        let a = if i + ws < n { src[i + ws] } else { 0 };
        let b = if i + ws + 1 < n { src[i + ws + 1] } else { 0 };
        dst[i] = if bs == 0 {
            a
        } else {
            (a >> bs) | (b << (64 - bs))
        };
    }
}

/// `dst` bit x = `src` bit x − s (zeros shifted in at the start).
fn shl_bits(src: &[u64], s: usize, dst: &mut [u64]) {
    let (ws, bs) = (s / 64, s % 64);
    for i in 0..src.len() {
        let a = if i >= ws { src[i - ws] } else { 0 };
        let b = if i > ws { src[i - ws - 1] } else { 0 };
        dst[i] = if bs == 0 {
            a
        } else {
            (a << bs) | (b >> (64 - bs))
        };
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
    PackedMask::pack(mask, h, w)?.boundary(d)?.unpack(out)
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
    let bp = PackedMask::pack(pred, h, w)?.boundary(d)?;
    let bg = PackedMask::pack(gt, h, w)?.boundary(d)?;
    bp.inter_union(&bg)
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
    // One pass over p and t, split into fixed chunks so rayon has work even for one
    // mask; the chunk partials are added in chunk order, so the result does not depend
    // on the thread count.
    let per_mask = n.div_ceil(SOFT_IOU_CHUNK).max(1);
    let parts: Vec<(T, T, u64)> = (0..b * per_mask)
        .into_par_iter()
        .map(|i| {
            let (k, c) = (i / per_mask, i % per_mask);
            let lo = k * n + (c * SOFT_IOU_CHUNK).min(n);
            let hi = k * n + ((c + 1) * SOFT_IOU_CHUNK).min(n);
            soft_iou_partial(&prob[lo..hi], &target[lo..hi])
        })
        .collect();
    for (s, part) in sums.chunks_mut(3).zip(parts.chunks(per_mask)) {
        let (mut i, mut p, mut t) = (T::zero(), T::zero(), 0u64);
        for &(pi, pp, pt) in part {
            (i, p, t) = (i + pi, p + pp, t + pt);
        }
        // Σt is an integer count: exact
        (s[0], s[1], s[2]) = (i, p, T::from(t).unwrap());
    }
    Ok(())
}

/// Pixels per rayon task of [`soft_iou_sums_cpu`]: 256 KiB of f32 probabilities, big
/// enough that the hand-off is noise, small enough that 8 masks give both cores work.
const SOFT_IOU_CHUNK: usize = 1 << 16;

/// `(Σ p·t, Σ p, Σ t)` of one chunk, `t` nonzero = 1, in a single pass.
#[inline]
fn soft_iou_partial<T: Float>(p: &[T], t: &[u8]) -> (T, T, u64) {
    // sixteen independent lanes per sum: no loop-carried add chain, so the loop
    // vectorizes and runs at load bandwidth; the f32 sums also drift less
    const LANES: usize = 16;
    let (mut ai, mut ap) = ([T::zero(); LANES], [T::zero(); LANES]);
    // u32 lanes cannot overflow: a chunk has at most SOFT_IOU_CHUNK pixels
    let mut at = [0u32; LANES];
    let (pc, tc) = (p.chunks_exact(LANES), t.chunks_exact(LANES));
    let (pr, tr) = (pc.remainder(), tc.remainder());
    for (pc, tc) in pc.zip(tc) {
        for j in 0..LANES {
            let on = tc[j] != 0;
            // a select rather than p·t: cheaper and exact for a 0/1 target
            ai[j] = ai[j] + if on { pc[j] } else { T::zero() };
            ap[j] = ap[j] + pc[j];
            at[j] += u32::from(on);
        }
    }
    for (&pv, &tv) in pr.iter().zip(tr) {
        ai[0] = ai[0] + if tv != 0 { pv } else { T::zero() };
        ap[0] = ap[0] + pv;
        at[0] += u32::from(tv != 0);
    }
    let sum = |a: [T; LANES]| a.iter().fold(T::zero(), |x, &y| x + y);
    (sum(ai), sum(ap), at.iter().map(|&c| u64::from(c)).sum())
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

/// Threads per block of the mask kernels (a multiple of 32: the block reductions
/// shuffle over full warps).
const BLOCK: u32 = 256;
/// CUDA's limit on `gridDim.y` and `gridDim.z` (the pair tiles of `mask_pair_part_u8`,
/// B in `soft_iou_bwd_f32`).
const MAX_GRID_YZ: usize = 65_535;
/// Predictions and references per tile of `mask_pair_part_u8` (`PAIR_TP`, `PAIR_TG` in
/// `mask.cu`), its threads (one per 4 pairs) and pixels per step (`PAIR_SUB`).
const PAIR_TP: usize = 64;
const PAIR_TG: usize = 16;
const PAIR_THREADS: u32 = (PAIR_TP * PAIR_TG / 4) as u32;
const PAIR_SUB: usize = 1024;

fn check_dims(op: &'static str, h: usize, w: usize) -> Result<usize> {
    let hw = h
        .checked_mul(w)
        .filter(|&hw| hw <= i32::MAX as usize)
        .ok_or_else(|| Error::arg(op, format!("mask of {h}×{w} pixels is too large")))?;
    Ok(hw)
}

/// Which kernel [`pair_counts_with`] packs and counts with: the same work and results,
/// two register budgets (`mask.cu`).  Which is faster is a question for a GPU: the bench
/// (`benches/gpu.rs`) times both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PairPart {
    /// `mask_pair_part_u8`: 5 masks' loads in flight per warp, 2 blocks per SM.
    #[default]
    Loads5,
    /// `mask_pair_part3_u8`: 3 masks' loads in flight per warp, 3 blocks per SM.
    Loads3,
}

impl PairPart {
    /// The kernel's name.
    pub fn kernel(self) -> &'static str {
        match self {
            PairPart::Loads5 => "mask_pair_part_u8",
            PairPart::Loads3 => "mask_pair_part3_u8",
        }
    }
}

/// Launch `mask_pair_part_u8` (the default [`PairPart`]) and `mask_pair_finish_u8`: the
/// device twin of [`pair_counts_cpu`], exact.  The masks are read once per tile of 64
/// predictions × 16 references, packed to bits on the way; the pixels are split into
/// chunks so that a few tiles still fill the GPU.
///
/// pred (P, H, W), gt (G, H, W), inter (P, G), union (P, G) — overwritten.
#[allow(clippy::too_many_arguments)]
pub fn pair_counts(
    dev: &Device,
    pred: &DeviceBuf<u8>,
    gt: &DeviceBuf<u8>,
    p: usize,
    g: usize,
    h: usize,
    w: usize,
    inter: &mut DeviceBuf<u64>,
    union: &mut DeviceBuf<u64>,
) -> Result<()> {
    pair_counts_with(dev, PairPart::default(), pred, gt, p, g, h, w, inter, union)
}

/// [`pair_counts`] with the part kernel named: for benchmarks and for tests that hold
/// every variant to the CPU twin.
#[allow(clippy::too_many_arguments)]
pub fn pair_counts_with(
    dev: &Device,
    part: PairPart,
    pred: &DeviceBuf<u8>,
    gt: &DeviceBuf<u8>,
    p: usize,
    g: usize,
    h: usize,
    w: usize,
    inter: &mut DeviceBuf<u64>,
    union: &mut DeviceBuf<u64>,
) -> Result<()> {
    const OP: &str = "pair_counts";
    let hw = check_dims(OP, h, w)?;
    check_len(OP, "pred", pred.len(), p * hw)?;
    check_len(OP, "gt", gt.len(), g * hw)?;
    check_len(OP, "inter", inter.len(), p * g)?;
    check_len(OP, "union", union.len(), p * g)?;
    if p == 0 || g == 0 {
        return Ok(());
    }
    let (tiles_p, tiles_g) = (p.div_ceil(PAIR_TP), g.div_ceil(PAIR_TG));
    if tiles_p > MAX_GRID_YZ || tiles_g > MAX_GRID_YZ || p * g > i32::MAX as usize / 32 {
        return Err(Error::arg(
            OP,
            format!("{p} × {g} pairs exceed one launch's grid"),
        ));
    }
    // (chunk, tile) blocks in one wave: as many as the device runs at once, at most (a
    // block more would start a second wave of a few blocks, on a few SMs, while the
    // others idle); a chunk a whole number of PAIR_SUB steps, all chunks alike.
    let wave = dev.resident_blocks(part.kernel(), PAIR_THREADS, 0)?;
    let steps = hw.div_ceil(PAIR_SUB).max(1);
    let chunks = (wave / (tiles_p * tiles_g)).clamp(1, steps);
    let chunk = steps.div_ceil(chunks) * PAIR_SUB;
    let chunks = hw.div_ceil(chunk).max(1);
    let mut inter_part = dev.uninit::<u32>(chunks * p * g)?;
    let mut cnt_part = dev.uninit::<u32>(chunks * (p + g))?;
    let (np, ng) = (KArg::I32(p as i32), KArg::I32(g as i32));
    dev.launch(
        part.kernel(),
        LaunchCfg::new(
            [chunks as u32, tiles_p as u32, tiles_g as u32],
            [PAIR_THREADS, 1, 1],
            0,
        ),
        &[
            inter_part.arg_mut(),
            cnt_part.arg_mut(),
            pred.arg(),
            gt.arg(),
            np,
            ng,
            KArg::I32(hw as i32),
            KArg::I32(chunk as i32),
        ],
    )?;
    dev.launch(
        "mask_pair_finish_u8",
        // one warp per pair
        LaunchCfg::new(
            [(p * g).div_ceil(BLOCK as usize / 32) as u32, 1, 1],
            [BLOCK, 1, 1],
            0,
        ),
        &[
            inter.arg_mut(),
            union.arg_mut(),
            inter_part.arg(),
            cnt_part.arg(),
            np,
            ng,
            KArg::I32(chunks as i32),
        ],
    )
}

/// Launch the two erosion kernels: the device twin of [`boundary_cpu`] for N masks.
///
/// masks (N, H, W), out (N, H, W) — overwritten with 0/1.
pub fn boundary(
    dev: &Device,
    masks: &DeviceBuf<u8>,
    n: usize,
    h: usize,
    w: usize,
    d: usize,
    out: &mut DeviceBuf<u8>,
) -> Result<()> {
    const OP: &str = "boundary";
    let hw = check_dims(OP, h, w)?;
    check_len(OP, "masks", masks.len(), n * hw)?;
    check_len(OP, "out", out.len(), n * hw)?;
    if d == 0 || d > i32::MAX as usize {
        return Err(Error::arg(
            OP,
            format!("boundary width d = {d} must be in 1..2^31"),
        ));
    }
    let total = n * hw;
    if total == 0 {
        return Ok(());
    }
    let mut er = dev.uninit::<u8>(total)?;
    let cfg = LaunchCfg::linear(total, BLOCK);
    dev.launch(
        "mask_erode_rows_u8",
        cfg,
        &[
            er.arg_mut(),
            masks.arg(),
            KArg::I64(total as i64),
            KArg::I32(w as i32),
            KArg::I32(d as i32),
        ],
    )?;
    dev.launch(
        "mask_boundary_cols_u8",
        cfg,
        &[
            out.arg_mut(),
            masks.arg(),
            er.arg(),
            KArg::I64(total as i64),
            KArg::I32(h as i32),
            KArg::I32(w as i32),
            KArg::I32(d as i32),
        ],
    )
}

/// Boundary intersection/union counts for all P × G pairs on the device: boundaries
/// with `d = boundary_width(h, w, dilation_ratio)`, then [`pair_counts`].  Boundary
/// IoU of pair (i, j) is `iou_from_counts(inter[i,j], union[i,j])`.
///
/// pred (P, H, W), gt (G, H, W), inter (P, G), union (P, G) — overwritten.
#[allow(clippy::too_many_arguments)]
pub fn boundary_pair_counts(
    dev: &Device,
    pred: &DeviceBuf<u8>,
    gt: &DeviceBuf<u8>,
    p: usize,
    g: usize,
    h: usize,
    w: usize,
    dilation_ratio: f64,
    inter: &mut DeviceBuf<u64>,
    union: &mut DeviceBuf<u64>,
) -> Result<()> {
    const OP: &str = "boundary_pair_counts";
    if !(dilation_ratio.is_finite() && dilation_ratio >= 0.0) {
        return Err(Error::arg(
            OP,
            format!("dilation ratio must be finite and ≥ 0, got {dilation_ratio}"),
        ));
    }
    let hw = check_dims(OP, h, w)?;
    check_len(OP, "pred", pred.len(), p * hw)?;
    check_len(OP, "gt", gt.len(), g * hw)?;
    let d = boundary_width(h, w, dilation_ratio);
    let mut bp = dev.uninit::<u8>(p * hw)?;
    let mut bg = dev.uninit::<u8>(g * hw)?;
    boundary(dev, pred, p, h, w, d, &mut bp)?;
    boundary(dev, gt, g, h, w, d, &mut bg)?;
    pair_counts(dev, &bp, &bg, p, g, h, w, inter, union)
}

/// Launch `soft_iou_part_f32` and `soft_iou_finish_f32`: the device twin of
/// [`soft_iou_fwd_cpu`] and [`soft_iou_sums_cpu`] (f32; chunk sums by block trees, the
/// chunks of a mask added in a fixed order, so the result is the same run to run).
///
/// prob (B, N), target (B, N), iou (B), sums (B, 3) — overwritten.
pub fn soft_iou_fwd(
    dev: &Device,
    prob: &DeviceBuf<f32>,
    target: &DeviceBuf<u8>,
    b: usize,
    n: usize,
    iou: &mut DeviceBuf<f32>,
    sums: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "soft_iou_fwd";
    check_len(OP, "prob", prob.len(), b * n)?;
    check_len(OP, "target", target.len(), b * n)?;
    check_len(OP, "iou", iou.len(), b)?;
    check_len(OP, "sums", sums.len(), 3 * b)?;
    if n > i32::MAX as usize || b > u32::MAX as usize {
        return Err(Error::arg(
            OP,
            format!("{b} masks of {n} pixels is too large"),
        ));
    }
    if b == 0 {
        return Ok(());
    }
    if b > MAX_GRID_YZ {
        return Err(Error::arg(OP, format!("{b} masks do not fit one grid")));
    }
    let chunks = n.div_ceil(SOFT_IOU_DEVICE_CHUNK).max(1);
    let mut part = dev.uninit::<f32>(3 * b * chunks)?;
    dev.launch(
        "soft_iou_part_f32",
        LaunchCfg::new([chunks as u32, b as u32, 1], [BLOCK, 1, 1], 0),
        &[
            part.arg_mut(),
            prob.arg(),
            target.arg(),
            KArg::I32(n as i32),
            KArg::I32(SOFT_IOU_DEVICE_CHUNK as i32),
        ],
    )?;
    dev.launch(
        "soft_iou_finish_f32",
        LaunchCfg::new([b as u32, 1, 1], [32, 1, 1], 0),
        &[
            iou.arg_mut(),
            sums.arg_mut(),
            part.arg(),
            KArg::I32(chunks as i32),
        ],
    )
}

/// Pixels per block of `soft_iou_part_f32` (a multiple of 4): 8 loads of four per
/// thread, so 64 masks of 1024² give 8192 blocks and a 256² mask still 16.
const SOFT_IOU_DEVICE_CHUNK: usize = 8 * 4 * BLOCK as usize;

/// Launch `soft_iou_bwd_f32`: the device twin of [`soft_iou_bwd_cpu`].
///
/// target (B, N), sums (B, 3), d_iou (B), d_prob (B, N) — overwritten.
pub fn soft_iou_bwd(
    dev: &Device,
    target: &DeviceBuf<u8>,
    sums: &DeviceBuf<f32>,
    d_iou: &DeviceBuf<f32>,
    b: usize,
    n: usize,
    d_prob: &mut DeviceBuf<f32>,
) -> Result<()> {
    const OP: &str = "soft_iou_bwd";
    check_len(OP, "target", target.len(), b * n)?;
    check_len(OP, "sums", sums.len(), 3 * b)?;
    check_len(OP, "d_iou", d_iou.len(), b)?;
    check_len(OP, "d_prob", d_prob.len(), b * n)?;
    if n > i32::MAX as usize || b > MAX_GRID_YZ {
        return Err(Error::arg(
            OP,
            format!("{b} masks of {n} pixels is too large"),
        ));
    }
    if b == 0 || n == 0 {
        return Ok(());
    }
    // a thread writes four pixels
    let gx = n.div_ceil(4 * BLOCK as usize) as u32;
    dev.launch(
        "soft_iou_bwd_f32",
        LaunchCfg::new([gx, b as u32, 1], [BLOCK, 1, 1], 0),
        &[
            d_prob.arg_mut(),
            sums.arg(),
            d_iou.arg(),
            target.arg(),
            KArg::I32(n as i32),
        ],
    )
}
