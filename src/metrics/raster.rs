//! Segmentations (COCO RLE or polygons) to dense masks for scoring.
//!
//! Masks are written **column-major** (COCO's run order: down the first column, then
//! the next), i.e. as the transposed `(W, H)` image, so decoding an RLE is one
//! `fill` per run.  Every metric of the evaluator (IoU counts, erosion by a square,
//! the image diagonal) is invariant under transposition.
use crate::data::muse::{RleCounts, RleJson, Segmentation};
use crate::data::polygon::rle_from_polygon;
use crate::data::Rle;

/// Why a segmentation could not be rasterized (the caller adds file/line context).
pub type RasterError = String;

/// Run lengths of an RLE JSON object, checked against the expected image size `(h, w)`:
/// `Err` when the size differs or the runs do not cover exactly `h × w` pixels.
pub fn rle_runs(r: &RleJson, h: usize, w: usize) -> Result<Vec<u32>, RasterError> {
    let (rh, rw) = (r.size[0] as usize, r.size[1] as usize);
    if (rh, rw) != (h, w) {
        return Err(format!(
            "mask size [{rh}, {rw}] differs from the image size [{h}, {w}]"
        ));
    }
    let counts = match &r.counts {
        RleCounts::Runs(c) => c.clone(),
        RleCounts::Compressed(s) => {
            Rle::from_compressed(h, w, s)
                .map_err(|e| format!("RLE does not decode: {e}"))?
                .counts
        }
    };
    let total: u64 = counts.iter().map(|&c| c as u64).sum();
    if total != (h * w) as u64 {
        return Err(format!(
            "RLE does not decode: runs cover {total} pixels, the image has {}",
            h * w
        ));
    }
    Ok(counts)
}

/// Fill `out` (W·H, column-major, zeroed by the caller) from validated runs (dense
/// decoding; the evaluator itself counts on [`Runs`]).
pub fn fill_runs(counts: &[u32], out: &mut [u8]) {
    let mut idx = 0usize;
    for (k, &c) in counts.iter().enumerate() {
        let c = c as usize;
        if k % 2 == 1 {
            out[idx..idx + c].fill(1);
        }
        idx += c;
    }
}

/// Rasterize one segmentation of an `(h, w)` image to foreground intervals: RLE as
/// given (size and run sum checked), polygons by the COCO rule bit for bit
/// (`data::polygon::rle_from_polygon`, as `pycocotools.frPyObjects`), rings united.
pub fn segmentation_runs(seg: &Segmentation, h: usize, w: usize) -> Result<Runs, RasterError> {
    match seg {
        Segmentation::Rle(r) => Ok(Runs::from_counts(&rle_runs(r, h, w)?)),
        Segmentation::Polygons(p) => {
            let rings = p
                .iter()
                .enumerate()
                .map(|(k, ring)| {
                    rle_from_polygon(ring, h, w)
                        .map(|r| Runs::from_counts(&r.counts))
                        .map_err(|e| format!("polygon {k}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Runs::union_all(&rings))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_count_overlapping_pushes_once() {
        let mut r = Runs::default();
        r.push(2, 5);
        r.push(5, 7); // touching: one run
        r.push(6, 9); // overlapping: only 7..9 is new
        r.push(3, 4); // inside: nothing new
        r.push(12, 13);
        assert_eq!(r.iv, vec![(2, 9), (12, 13)]);
        assert_eq!(r.area, 8);
    }

    #[test]
    fn runs_fill_column_major() {
        // 3x2 image, column-major [0,1,1 | 1,0,0] = runs 1,3,2
        let mut out = vec![0u8; 6];
        fill_runs(&[1, 3, 2], &mut out);
        assert_eq!(out, vec![0, 1, 1, 1, 0, 0]);
    }

    #[test]
    fn window_fold_matches_naive() {
        let v: Vec<u32> = (0..37u32).map(|i| (i * 7919 + 13) % 101).collect();
        for k in 1..=37 {
            let got = window_fold(&v, k, u32::max);
            let want: Vec<u32> = v.windows(k).map(|w| *w.iter().max().unwrap()).collect();
            assert_eq!(got, want, "k {k}");
            let got = window_fold(&v, k, u32::min);
            let want: Vec<u32> = v.windows(k).map(|w| *w.iter().min().unwrap()).collect();
            assert_eq!(got, want, "k {k}");
        }
        assert!(window_fold(&v, 38, u32::max).is_empty());
    }

    #[test]
    fn size_and_sum_are_checked() {
        let r = RleJson {
            size: [3, 2],
            counts: RleCounts::Runs(vec![1, 3, 2]),
        };
        assert!(rle_runs(&r, 3, 2).is_ok());
        assert!(rle_runs(&r, 2, 3).unwrap_err().contains("differs"));
        let r = RleJson {
            size: [3, 2],
            counts: RleCounts::Runs(vec![1, 3, 3]),
        };
        assert!(rle_runs(&r, 3, 2).unwrap_err().contains("cover 7"));
        let r = RleJson {
            size: [3, 2],
            counts: RleCounts::Compressed("1 3".into()),
        };
        assert!(rle_runs(&r, 3, 2).unwrap_err().contains("does not decode"));
    }
}

/// A mask as its foreground intervals `[start, end)` of column-major pixel indices,
/// sorted, non-empty and non-adjacent (so equal masks have equal lists).  Counting on
/// intervals costs O(runs) instead of O(pixels); the results are those of
/// `kernels::mask::pair_counts_cpu` on the dense masks (tested).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    /// The intervals `[start, end)`, sorted, non-empty and non-adjacent.
    pub iv: Vec<(u32, u32)>,
    /// Foreground pixels: the summed interval lengths.
    pub area: u64,
}

impl Runs {
    fn push(&mut self, s: u32, e: u32) {
        if e <= s {
            return;
        }
        match self.iv.last_mut() {
            // overlapping or touching the last run: only the pixels past its end are new
            Some(last) if last.1 >= s => {
                self.area += e.saturating_sub(last.1) as u64;
                last.1 = last.1.max(e);
            }
            _ => {
                self.area += (e - s) as u64;
                self.iv.push((s, e));
            }
        }
    }

    /// From validated COCO run lengths (zeros first).
    pub fn from_counts(counts: &[u32]) -> Runs {
        let mut r = Runs::default();
        r.set_counts(counts);
        r
    }

    /// [`Runs::from_counts`] into `self` (overwritten, its buffer reused).
    pub fn set_counts(&mut self, counts: &[u32]) {
        self.iv.clear();
        self.area = 0;
        let mut idx = 0u32;
        for (k, &c) in counts.iter().enumerate() {
            if k % 2 == 1 {
                self.push(idx, idx + c);
            }
            idx += c;
        }
    }

    /// From a dense column-major mask (nonzero = foreground).
    pub fn from_dense(m: &[u8]) -> Runs {
        let mut r = Runs::default();
        let mut start = None;
        for (i, &v) in m.iter().enumerate() {
            match (v != 0, start) {
                (true, None) => start = Some(i as u32),
                (false, Some(s)) => {
                    r.push(s, i as u32);
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            r.push(s, m.len() as u32);
        }
        r
    }

    /// Intersection count with `other`.
    pub fn inter(&self, other: &Runs) -> u64 {
        let (a, b) = (&self.iv, &other.iv);
        let (Some(&(a0, a1)), Some(&(b0, b1))) = (a.first(), b.first()) else {
            return 0;
        };
        let (a_end, b_end) = (a[a.len() - 1].1, b[b.len() - 1].1);
        if a_end <= b0 || b_end <= a0 {
            return 0; // disjoint spans: most object pairs of an image
        }
        // skip, by binary search, the intervals that end before the other list starts
        let mut i = if a1 <= b0 {
            a.partition_point(|x| x.1 <= b0)
        } else {
            0
        };
        let mut j = if b1 <= a0 {
            b.partition_point(|x| x.1 <= a0)
        } else {
            0
        };
        let mut n = 0u64;
        while i < a.len() && j < b.len() {
            let s = a[i].0.max(b[j].0);
            let e = a[i].1.min(b[j].1);
            if e > s {
                n += (e - s) as u64;
            }
            if a[i].1 < b[j].1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        n
    }

    /// Union of several masks (pairwise merges of the sorted lists: no sort).
    pub fn union_all<'a>(masks: impl IntoIterator<Item = &'a Runs>) -> Runs {
        let mut acc = Runs::default();
        acc.set_union(masks, &mut Runs::default());
        acc
    }

    /// [`Runs::union_all`] into `self` (overwritten) with `tmp` as scratch: both
    /// buffers are reused, so a union costs no allocation once they have grown.
    pub fn set_union<'a>(&mut self, masks: impl IntoIterator<Item = &'a Runs>, tmp: &mut Runs) {
        self.iv.clear();
        self.area = 0;
        for m in masks {
            let (a, b) = (&self.iv, &m.iv);
            let r = &mut *tmp;
            r.iv.clear();
            r.area = 0;
            let (mut i, mut j) = (0, 0);
            let mut cur: Option<(u32, u32)> = None;
            while i < a.len() || j < b.len() {
                let next = if j >= b.len() || (i < a.len() && a[i].0 <= b[j].0) {
                    i += 1;
                    a[i - 1]
                } else {
                    j += 1;
                    b[j - 1]
                };
                cur = match cur {
                    Some((cs, ce)) if next.0 <= ce => Some((cs, ce.max(next.1))),
                    Some((cs, ce)) => {
                        r.push(cs, ce);
                        Some(next)
                    }
                    None => Some(next),
                };
            }
            if let Some((cs, ce)) = cur {
                r.push(cs, ce);
            }
            std::mem::swap(self, tmp);
        }
    }

    /// Bounding box in the column-major (transposed) frame of an image of height `h`:
    /// `(x0, x1, y0, y1)`, half-open; `None` when empty.
    pub fn bbox(&self, h: usize) -> Option<(usize, usize, usize, usize)> {
        let (first, last) = (self.iv.first()?, self.iv.last()?);
        let (x0, x1) = (first.0 as usize / h, (last.1 as usize - 1) / h + 1);
        let (mut y0, mut y1) = (h, 0);
        for &(s, e) in &self.iv {
            let (s, e) = (s as usize, e as usize - 1);
            if s / h != e / h {
                return Some((x0, x1, 0, h)); // spans a column boundary: every row
            }
            y0 = y0.min(s % h);
            y1 = y1.max(e % h + 1);
        }
        Some((x0, x1, y0, y1))
    }

    /// Paint the part of the mask inside the crop `(x0, x1, y0, y1)` of an image of
    /// height `h` into `out` ((x1−x0) × (y1−y0), column-major like the image, zeroed).
    pub fn paint_crop(&self, h: usize, crop: (usize, usize, usize, usize), out: &mut [u8]) {
        let (x0, x1, y0, y1) = crop;
        let ch = y1 - y0;
        for &(s, e) in &self.iv {
            let (mut p, e) = (s as usize, e as usize);
            while p < e {
                let (x, y) = (p / h, p % h);
                let col_end = (x + 1) * h;
                let q = e.min(col_end);
                if (x0..x1).contains(&x) {
                    let (a, b) = (y.max(y0), (q - x * h).min(y1));
                    if b > a {
                        out[(x - x0) * ch + (a - y0)..(x - x0) * ch + (b - y0)].fill(1);
                    }
                }
                p = q;
            }
        }
    }
}

/// Foreground intervals `[y0, y1)` of the image columns `x0 .. x0 + off.len() − 1`:
/// column `x0 + k` holds `iv[off[k] .. off[k + 1]]` (one flat buffer, no per-column
/// allocation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Columns {
    /// Image column of the first stored column.
    pub x0: usize,
    /// Offsets into `iv`, one per column plus a final end offset.
    pub off: Vec<usize>,
    /// Row intervals `[y0, y1)` of all columns, column after column.
    pub iv: Vec<(u32, u32)>,
}

impl Columns {
    /// Number of columns.
    pub fn len(&self) -> usize {
        self.off.len().saturating_sub(1)
    }
    /// True when there are no columns.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Intervals of the `k`-th column (image column `x0 + k`).
    pub fn col(&self, k: usize) -> &[(u32, u32)] {
        &self.iv[self.off[k]..self.off[k + 1]]
    }
    /// Pixels in all columns.
    pub fn area(&self) -> u64 {
        self.iv.iter().map(|&(s, e)| (e - s) as u64).sum()
    }
}

/// `out = a ∩ b` for sorted interval lists.
fn intersect_into(a: &[(u32, u32)], b: &[(u32, u32)], out: &mut Vec<(u32, u32)>) {
    out.clear();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if e > s {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
}

/// `|a ∩ b|` of two sorted interval lists.
fn inter_len(a: &[(u32, u32)], b: &[(u32, u32)]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if e > s {
            n += (e - s) as u64;
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    n
}

/// Append `a \ b` to `out`, for sorted interval lists with `b ⊆ a`.
fn subtract_into(a: &[(u32, u32)], b: &[(u32, u32)], out: &mut Vec<(u32, u32)>) {
    let mut j = 0;
    for &(s, e) in a {
        let mut cur = s;
        while j < b.len() && b[j].1 <= e {
            if b[j].0 > cur {
                out.push((cur, b[j].0));
            }
            cur = cur.max(b[j].1);
            j += 1;
        }
        if cur < e {
            out.push((cur, e));
        }
    }
}

/// `out[i] = f(v[i], …, v[i+k−1])` for every full window (empty when `k > v.len()`),
/// for an associative, commutative, idempotent `f` (max, min): van Herk–Gil-Werman,
/// prefix and suffix folds within blocks of `k`, three passes whatever `k` is.
/// `pre`, `suf` are scratch.
fn window_fold_into(
    v: &[u32],
    k: usize,
    f: impl Fn(u32, u32) -> u32,
    pre: &mut Vec<u32>,
    suf: &mut Vec<u32>,
    out: &mut Vec<u32>,
) {
    out.clear();
    let n = v.len();
    if k == 0 || k > n {
        return;
    }
    pre.clear();
    pre.extend_from_slice(v);
    suf.clear();
    suf.extend_from_slice(v);
    // blocks of k, walked without a division per element
    for start in (0..n).step_by(k) {
        let end = (start + k).min(n);
        for i in start + 1..end {
            pre[i] = f(pre[i - 1], v[i]);
        }
        for i in (start..end - 1).rev() {
            suf[i] = f(suf[i + 1], v[i]);
        }
    }
    out.extend((0..=n - k).map(|i| f(suf[i], pre[i + k - 1])));
}

#[cfg(test)]
fn window_fold(v: &[u32], k: usize, f: impl Fn(u32, u32) -> u32) -> Vec<u32> {
    let (mut pre, mut suf, mut out) = (Vec::new(), Vec::new(), Vec::new());
    window_fold_into(v, k, f, &mut pre, &mut suf, &mut out);
    out
}

/// Reusable buffers of [`Runs::boundary_into`] (one per thread in the evaluator, so a
/// boundary costs no allocation once they have grown).
#[derive(Default)]
pub struct BoundaryScratch {
    cols: Columns,
    vert: Columns,
    empty: Vec<u32>,
    multi: Vec<u32>,
    first_s: Vec<u32>,
    first_e: Vec<u32>,
    pre: Vec<u32>,
    suf: Vec<u32>,
    s_max: Vec<u32>,
    e_min: Vec<u32>,
    acc: Vec<(u32, u32)>,
    tmp: Vec<(u32, u32)>,
}

impl Runs {
    /// The mask split into image columns (the rows of the column-major frame), over
    /// its bounding columns; `None` when empty.
    pub fn columns(&self, h: usize) -> Option<Columns> {
        let mut c = Columns::default();
        self.columns_into(h, &mut c).then_some(c)
    }

    /// [`Runs::columns`] into `c` (overwritten); `false` when the mask is empty.
    pub fn columns_into(&self, h: usize, c: &mut Columns) -> bool {
        c.off.clear();
        c.iv.clear();
        let (Some(&(first, _)), Some(&(_, last))) = (self.iv.first(), self.iv.last()) else {
            c.x0 = 0;
            return false;
        };
        // two divisions in all: the column of each piece is tracked by stepping the
        // column start, since the intervals are sorted (a division per interval was a
        // tenth of the boundary's time)
        let (x0, x1) = (first as usize / h, (last as usize - 1) / h + 1);
        c.x0 = x0;
        c.off.push(0);
        let (mut x, mut col0) = (x0, x0 * h);
        for &(s, e) in &self.iv {
            let (mut p, e) = (s as usize, e as usize);
            while p < e {
                while p >= col0 + h {
                    c.off.push(c.iv.len());
                    x += 1;
                    col0 += h;
                }
                let q = e.min(col0 + h);
                c.iv.push(((p - col0) as u32, (q - col0) as u32));
                p = q;
            }
        }
        while x < x1 {
            c.off.push(c.iv.len());
            x += 1;
        }
        true
    }

    /// Boundary (Cheng et al.): the mask minus its erosion by a (2d+1)² square, pixels
    /// outside the image counting as background — what `kernels::mask::boundary_cpu`
    /// computes with `d` 3×3 erosions, here on intervals: each column's runs shrink by
    /// `d` at both ends (vertical erosion), then a pixel stays eroded only if it is in
    /// all `2d+1` neighbouring columns (horizontal erosion; a neighbour outside the
    /// mask's bounding columns is empty).  Cost O(runs · d) at worst, O(runs) when the
    /// columns hold one run each; never O(pixels).
    pub fn boundary(&self, h: usize, d: usize) -> Option<Columns> {
        let mut out = Columns::default();
        self.boundary_into(h, d, &mut BoundaryScratch::default(), &mut out)
            .then_some(out)
    }

    /// [`Runs::boundary`] into `out` (overwritten) with reusable scratch; `false` when
    /// the mask is empty.
    pub fn boundary_into(
        &self,
        h: usize,
        d: usize,
        sc: &mut BoundaryScratch,
        out: &mut Columns,
    ) -> bool {
        out.off.clear();
        out.iv.clear();
        let BoundaryScratch {
            cols,
            vert,
            empty,
            multi,
            first_s,
            first_e,
            pre,
            suf,
            s_max,
            e_min,
            acc,
            tmp,
        } = sc;
        if !self.columns_into(h, cols) {
            return false;
        }
        let n = cols.len();
        let d32 = d as u32;
        vert.x0 = cols.x0;
        vert.off.clear();
        vert.iv.clear();
        vert.off.push(0);
        for k in 0..n {
            for &(s, e) in cols.col(k) {
                if e - s > 2 * d32 {
                    vert.iv.push((s + d32, e - d32));
                }
            }
            vert.off.push(vert.iv.len());
        }
        out.x0 = cols.x0;
        out.off.push(0);
        // Window tests in O(1) by prefix counts: a window with an empty column erodes
        // to nothing; a window of single-interval columns (the common case) erodes to
        // [max start, min end); only the rest intersects interval lists.
        empty.clear();
        empty.resize(n + 1, 0);
        multi.clear();
        multi.resize(n + 1, 0);
        first_s.clear();
        first_s.resize(n, 0);
        first_e.clear();
        first_e.resize(n, 0);
        for k in 0..n {
            let c = vert.col(k);
            empty[k + 1] = empty[k] + u32::from(c.is_empty());
            multi[k + 1] = multi[k] + u32::from(c.len() > 1);
            if let Some(&(a, b)) = c.first() {
                (first_s[k], first_e[k]) = (a, b);
            }
        }
        // window max of starts / min of ends, O(1) per column (van Herk–Gil-Werman)
        window_fold_into(first_s, 2 * d + 1, u32::max, pre, suf, s_max);
        window_fold_into(first_e, 2 * d + 1, u32::min, pre, suf, e_min);
        for x in 0..n {
            if x < d || x + d >= n {
                // the window reaches a column outside the mask: nothing is eroded
                out.iv.extend_from_slice(cols.col(x));
            } else {
                let (lo, hi) = (x - d, x + d + 1);
                acc.clear();
                if empty[hi] - empty[lo] > 0 {
                    // eroded to nothing
                } else if multi[hi] == multi[lo] {
                    let (s, e) = (s_max[lo], e_min[lo]);
                    if e > s {
                        acc.push((s, e));
                    }
                } else {
                    acc.extend_from_slice(vert.col(lo));
                    for k in lo + 1..hi {
                        if acc.is_empty() {
                            break;
                        }
                        intersect_into(acc, vert.col(k), tmp);
                        std::mem::swap(acc, tmp);
                    }
                }
                subtract_into(cols.col(x), acc, &mut out.iv);
            }
            out.off.push(out.iv.len());
        }
        true
    }
}

/// Boundary IoU of two masks of an image of height `h` with boundary width `d`, on
/// intervals (see [`Runs::boundary`]); both boundaries empty gives 1.  Equal to
/// `kernels::mask::boundary_iou_cpu` on the dense masks (tested).
pub fn boundary_iou_intervals(a: &Runs, b: &Runs, h: usize, d: usize) -> f64 {
    thread_local! {
        static BUF: std::cell::RefCell<(BoundaryScratch, Columns, Columns)> =
            std::cell::RefCell::new(Default::default());
    }
    BUF.with(|buf| {
        let (sc, ca, cb) = &mut *buf.borrow_mut();
        let has_a = a.boundary_into(h, d, sc, ca);
        let has_b = b.boundary_into(h, d, sc, cb);
        let (la, lb) = (ca.area(), cb.area());
        let mut i = 0u64;
        if has_a && has_b {
            let lo = ca.x0.max(cb.x0);
            let hi = (ca.x0 + ca.len()).min(cb.x0 + cb.len());
            for x in lo..hi {
                i += inter_len(ca.col(x - ca.x0), cb.col(x - cb.x0));
            }
        }
        let u = la + lb - i;
        if u == 0 {
            1.0
        } else {
            i as f64 / u as f64
        }
    })
}
