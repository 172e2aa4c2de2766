//! Polygon rasterization.
//!
//! Two rules, because the data sets were made with two tools:
//!
//! - [`rle_from_polygon`] / [`mask_from_polygons`]: the COCO rule (`pycocotools`'
//!   `frPyObjects` for polygons), bit for bit.  COCO, refCOCO and MUSE polygons mean
//!   what this rule makes of them, so reading them any other way would move the ground
//!   truth by a pixel along every boundary.  The rule: scale the vertices by 5 and
//!   round to integers, walk every edge in that fine grid (one point per step of the
//!   longer axis), keep the points where the walk crosses from one fine column to the
//!   next at a column that is a pixel centre after downsampling, and for each such
//!   crossing toggle the run at `ceil` of the downsampled row.  Runs are then the
//!   sorted toggle positions in column-major order.
//! - [`fill_polygon_cv`]: the OpenCV rule LISA uses for ReasonSeg's LabelMe polygons
//!   (`cv2.polylines` + `cv2.fillPoly` on vertices truncated to integers): each edge's
//!   8-connected line, then a scanline fill between fixed-point edge crossings
//!   (`ceil` of the left crossing to `floor` of the right), step for step as OpenCV
//!   does it, bit-exact with `cv2` on the fixtures.
//!
//! Parts of a polygon outside the image are clipped by both rules.  Both are checked
//! against their reference tools by `tests/coco_rle.rs` and `tests/readers_formats.rs`
//! on fixtures written by `tools/coco_fixtures.py` and `tools/make_reader_fixtures.py`.
use super::mask::Mask;
use super::rle::Rle;
use crate::error::{Error, Result};

/// `pycocotools` upsamples by this factor before walking the edges.
const COCO_SCALE: f64 = 5.0;

/// Largest vertex coordinate accepted (pixels).  pycocotools keeps fine-grid
/// coordinates (5 × pixels) in 32-bit integers, so far beyond this its arithmetic
/// wraps; no image is this big.  Within it, an edge's cost does not depend on its
/// length (the walk is clipped to the image, see `Walk`).
pub const MAX_COORD: f64 = 1_048_576.0;

/// C's `(int)x` as x86-64 computes it (`cvttsd2si`): truncation toward zero, and the
/// "integer indefinite" value `i32::MIN` for NaN and out-of-range inputs.  pycocotools
/// reaches the NaN case on a repeated vertex (0/0 slope); that walk point shares its
/// column with its neighbours, so it never toggles a run, but keep C's value anyway.
fn c_int(x: f64) -> i32 {
    if x.is_nan() || x >= 2_147_483_648.0 || x <= -2_147_483_649.0 {
        i32::MIN
    } else {
        x as i32
    }
}

fn check_coords(op: &'static str, xy: &[f64]) -> Result<()> {
    for (i, &v) in xy.iter().enumerate() {
        if !v.is_finite() {
            return Err(Error::NonFinite {
                what: format!("{op}: polygon coordinate {i}"),
            });
        }
        if v.abs() > MAX_COORD {
            return Err(Error::arg(
                op,
                format!("polygon coordinate {i} = {v} is beyond ±{MAX_COORD}"),
            ));
        }
    }
    Ok(())
}

/// Rasterize one polygon `[x0, y0, x1, y1, ...]` (pixel units, COCO convention:
/// pixel `(x, y)` covers `[x, x+1) × [y, y+1)`) into an `height × width` RLE exactly as
/// `pycocotools.mask.frPyObjects([xy], height, width)` does.  An odd trailing value is
/// ignored, as pycocotools does; an empty list gives an empty mask.  `Err` on
/// non-finite or absurdly large coordinates.
pub fn rle_from_polygon(xy: &[f64], height: usize, width: usize) -> Result<Rle> {
    check_coords("rle_from_polygon", xy)?;
    let (h, w) = (height, width);
    // pycocotools keeps pixel indices in 32 bits
    if h.checked_mul(w).is_none_or(|n| n > u32::MAX as usize) || h > i32::MAX as usize {
        return Err(Error::arg(
            "rle_from_polygon",
            format!("image {h}x{w} has more pixels than a 32-bit RLE can count"),
        ));
    }
    let k = xy.len() / 2;
    if k == 0 || h == 0 || w == 0 {
        return Ok(Rle {
            height: h,
            width: w,
            counts: if h * w == 0 {
                vec![]
            } else {
                vec![(h * w) as u32]
            },
        });
    }
    // fine-grid vertices, closed: (k+1) points
    let mut x: Vec<i32> = (0..k)
        .map(|j| c_int(COCO_SCALE * xy[2 * j] + 0.5))
        .collect();
    let mut y: Vec<i32> = (0..k)
        .map(|j| c_int(COCO_SCALE * xy[2 * j + 1] + 0.5))
        .collect();
    x.push(x[0]);
    y.push(y[0]);

    let mut walk = Walk::new(h, w);
    for j in 0..k {
        walk.edge(x[j], y[j], x[j + 1], y[j + 1]);
    }
    let mut toggles = walk.toggles;
    toggles.push((h * w) as u32);
    toggles.sort_unstable();
    // differences between sorted toggles are the runs; a zero run merges its two
    // neighbours (two toggles at one position cancel)
    let mut p = 0u32;
    for t in toggles.iter_mut() {
        let cur = *t;
        *t = cur.wrapping_sub(p);
        p = cur;
    }
    let mut counts = Vec::with_capacity(toggles.len());
    counts.push(toggles[0]);
    let mut j = 1;
    while j < toggles.len() {
        if toggles[j] > 0 {
            counts.push(toggles[j]);
            j += 1;
        } else {
            j += 1;
            if j < toggles.len() {
                *counts.last_mut().expect("counts starts non-empty") += toggles[j];
                j += 1;
            }
        }
    }
    Ok(Rle {
        height: h,
        width: w,
        counts,
    })
}

/// pycocotools' edge walk over the fine grid, streamed: the downsampling step only looks
/// at consecutive walk points `(u, v)`, also across edges, so the walk keeps the last
/// point it visited and the toggle positions (column-major pixel index) it found.
///
/// A walk point far outside the image cannot toggle anything by itself, so an edge is
/// not walked point by point where it is outside: only the points within one fine
/// column (or row) of the image are visited, and the stretches before and after are
/// summed up exactly (see [`Walk::edge`]).  The cost of an edge is then O(w + h) fine
/// steps, not its length: a polygon with vertices at ±[`MAX_COORD`] costs what one
/// around the image does.  `tests/coco_rle.rs` checks this against the point-by-point
/// walk on random polygons far outside small images.
struct Walk {
    h: usize,
    w: usize,
    prev: Option<(i32, i32)>,
    toggles: Vec<u32>,
}

impl Walk {
    fn new(h: usize, w: usize) -> Self {
        Walk {
            h,
            w,
            prev: None,
            toggles: Vec::new(),
        }
    }

    /// Fine column `col` and fine row `row` of a crossing, downsampled: the toggle
    /// position, or `None` when `col` is not a pixel centre inside the image.
    fn toggle_at(&self, col: i64, row: i64) -> Option<u32> {
        let (hf, wf) = (self.h as f64, self.w as f64);
        let xd = (col as f64 + 0.5) / COCO_SCALE - 0.5;
        if !(xd.floor() == xd && xd >= 0.0 && xd <= wf - 1.0) {
            return None;
        }
        let mut yd = (row as f64 + 0.5) / COCO_SCALE - 0.5;
        if yd < 0.0 {
            yd = 0.0;
        } else if yd > hf {
            yd = hf;
        }
        let yd = yd.ceil();
        // pycocotools: (uint)(x*(int)h + y), wrapping 32-bit arithmetic
        Some(
            (xd as i32)
                .wrapping_mul(self.h as i32)
                .wrapping_add(yd as i32) as u32,
        )
    }

    /// Visit one walk point: a crossing from the previous point's fine column to this
    /// one's toggles the run at the lower of the two rows.
    fn visit(&mut self, u: i32, v: i32) {
        if let Some((pu, pv)) = self.prev {
            if u != pu {
                // the walk crossed a fine column boundary; its left fine column
                let col = if u < pu { u } else { u - 1 };
                if let Some(t) = self.toggle_at(col as i64, v.min(pv) as i64) {
                    self.toggles.push(t);
                }
            }
        }
        self.prev = Some((u, v));
    }

    /// Move to a walk point whose crossing from the previous point toggles nothing
    /// (the caller knows), without checking.
    fn jump(&mut self, u: i32, v: i32) {
        self.prev = Some((u, v));
    }

    /// The crossings of a stretch of the walk whose fine column moves monotonically by
    /// at most one per step from `ua` to `ub`, every crossing at a fine row that
    /// downsamples to the same clamped row (`row` is one such fine row): each column
    /// boundary between `ua` and `ub` is crossed exactly once.
    fn crossings(&mut self, ua: i32, ub: i32, row: i64) {
        let (lo, hi) = (ua.min(ub) as i64, ua.max(ub) as i64);
        // only columns 0 ..= 5w can be pixel centres inside the image
        let last_col = COCO_SCALE as i64 * self.w as i64;
        for col in lo.max(0)..hi.min(last_col + 1) {
            if let Some(t) = self.toggle_at(col, row) {
                self.toggles.push(t);
            }
        }
    }

    /// Walk the edge from fine-grid vertex `(xs, ys)` to `(xe, ye)` as pycocotools
    /// does: from the lower end of the longer axis, one point per step of it.
    ///
    /// Along the longer axis the points are consecutive integers; along the shorter
    /// one they move by at most one fine cell per step (the slope is below 1) and
    /// monotonically.  So:
    /// - x-major (`dx ≥ dy`): a crossing at step `d` needs the lower of the two fine
    ///   columns in `2 ..= 5w − 3` (a pixel centre), so only the points with
    ///   `u ∈ [−1, 5w + 1]` are visited; the points before them are on one side of the
    ///   image (no crossing counts) and the walk jumps to the last of them.
    /// - y-major: a crossing's row `r` is clamped to 0 when `r ≤ 2` and to `h` when
    ///   `r ≥ 5h + 2`, so only points with `v ∈ [2, 5h + 3]` are visited; before and
    ///   after them every crossing's row clamps to the same value, and the crossings
    ///   are the column boundaries between the stretch's first and last `u`
    ///   ([`Walk::crossings`]).
    fn edge(&mut self, xs: i32, ys: i32, xe: i32, ye: i32) {
        let (mut xs, mut xe, mut ys, mut ye) = (xs, xe, ys, ye);
        let dx = (xe as i64 - xs as i64).abs();
        let dy = (ys as i64 - ye as i64).abs();
        let xmajor = dx >= dy;
        // walk from the lower end of the longer axis; `flip` keeps the original order
        let flip = (xmajor && xs > xe) || (!xmajor && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        let n = if xmajor { dx } else { dy };
        // dx = dy = 0 (repeated vertex) gives 0/0 = NaN here, as in C
        let s = if xmajor {
            (ye - ys) as f64 / dx as f64
        } else {
            (xe - xs) as f64 / dy as f64
        };
        // step d's point; `t` counts from the walk's lower end
        let point = |d: i64| -> (i32, i32) {
            let t = if flip { n - d } else { d };
            if xmajor {
                (
                    (t + xs as i64) as i32,
                    c_int(ys as f64 + s * t as f64 + 0.5),
                )
            } else {
                (
                    c_int(xs as f64 + s * t as f64 + 0.5),
                    (t + ys as i64) as i32,
                )
            }
        };
        // the steps whose long-axis coordinate lies in [lo, hi]: a range of d
        let (start, lo, hi) = if xmajor {
            (xs as i64, -1, COCO_SCALE as i64 * self.w as i64 + 1)
        } else {
            (ys as i64, 2, COCO_SCALE as i64 * self.h as i64 + 3)
        };
        let (t0, t1) = ((lo - start).max(0), (hi - start).min(n));
        let (a, b) = if flip { (n - t1, n - t0) } else { (t0, t1) };

        let p0 = point(0);
        self.visit(p0.0, p0.1);
        if a > b {
            // wholly on one side of the window
            let pn = point(n);
            if !xmajor {
                self.crossings(p0.0, pn.0, p0.1 as i64);
            }
            self.jump(pn.0, pn.1);
            return;
        }
        // before the window: points 0 ..= a−1, crossings 1 ..= a−1 among them
        if a >= 2 {
            let pa = point(a - 1);
            if !xmajor {
                self.crossings(p0.0, pa.0, p0.1 as i64);
            }
            self.jump(pa.0, pa.1);
        }
        // In the window of a y-major edge, the columns move monotonically: only the
        // points with u ∈ [−1, 5w + 1] can cross a pixel centre (as for x-major edges),
        // found by bisection; the others are on one side or the other.
        let (a2, b2) = if xmajor {
            (a, b)
        } else {
            let (ul, ur) = (-1, COCO_SCALE as i64 * self.w as i64 + 1);
            let u = |d: i64| point(d).0 as i64;
            let rising = u(b) >= u(a);
            let entered = |d: i64| if rising { u(d) >= ul } else { u(d) <= ur };
            let left = |d: i64| if rising { u(d) > ur } else { u(d) < ul };
            (first_true(a, b, entered), first_true(a, b, left) - 1)
        };
        if a2 > b2 {
            // no point of the window near the image's columns: no crossing counts
            let pb = point(b);
            self.jump(pb.0, pb.1);
        } else {
            if a2 >= 2 && a2 > a {
                let p = point(a2 - 1);
                self.jump(p.0, p.1);
            }
            for d in a2.max(1)..=b2 {
                let p = point(d);
                self.visit(p.0, p.1);
            }
            if b2 < b {
                // the step out of the columns is visited (it crosses no centre), then on
                let p = point(b2 + 1);
                self.visit(p.0, p.1);
                let pb = point(b);
                self.jump(pb.0, pb.1);
            }
        }
        // after the window: the crossing into point b+1 is visited, those among
        // points b+1 ..= n are summed up
        if b < n {
            let pb = point(b + 1);
            self.visit(pb.0, pb.1);
            if b + 1 < n {
                let pn = point(n);
                if !xmajor {
                    self.crossings(pb.0, pn.0, pb.1 as i64);
                }
                self.jump(pn.0, pn.1);
            }
        }
    }
}

/// The first `d` in `lo ..= hi` where `pred` holds, `pred` false then true along the
/// range; `hi + 1` when it never holds.
fn first_true(lo: i64, hi: i64, pred: impl Fn(i64) -> bool) -> i64 {
    let (mut lo, mut hi) = (lo, hi + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// Union of several COCO polygons (one annotation's `segmentation` list), as
/// `pycocotools.mask.merge(frPyObjects(polys, h, w))` gives it.
pub fn mask_from_polygons(polys: &[Vec<f64>], height: usize, width: usize) -> Result<Mask> {
    let mut m = Mask::new(height, width);
    for p in polys {
        let r = rle_from_polygon(p, height, width)?;
        paint_rle(&mut m, &r, super::mask::FG)?;
    }
    Ok(m)
}

/// Set every foreground pixel of `r` to `value` in `m` (sizes must agree).
pub fn paint_rle(m: &mut Mask, r: &Rle, value: u8) -> Result<()> {
    if r.height != m.height || r.width != m.width {
        return Err(Error::shape(
            "paint_rle",
            format!(
                "RLE {}x{} vs mask {}x{}",
                r.height, r.width, m.height, m.width
            ),
        ));
    }
    let total: u64 = r.counts.iter().map(|&c| c as u64).sum();
    if total != (m.height * m.width) as u64 {
        return Err(Error::arg(
            "paint_rle",
            format!(
                "runs cover {total} pixels but the size {}x{} has {}",
                m.height,
                m.width,
                m.height * m.width
            ),
        ));
    }
    let h = m.height;
    let mut idx = 0usize;
    for (i, &c) in r.counts.iter().enumerate() {
        if i % 2 == 1 {
            for p in idx..idx + c as usize {
                m.data[(p % h) * m.width + p / h] = value;
            }
        }
        idx += c as usize;
    }
    Ok(())
}

/// Fill one polygon given as `(x, y)` points the way LISA fills a ReasonSeg shape:
/// vertices truncated toward zero to integers (numpy `astype(int32)`), then
/// `cv2.polylines(closed, thickness 1)` and `cv2.fillPoly` with `value`.  This follows
/// OpenCV's rasterizer step by step (fixed-point edges with 16 fractional bits, the
/// 8-connected line iterator, Cohen-Sutherland clipping of lines that leave the
/// image), because "inside or on the boundary" differs from it on slanted edges.
/// `polylines` draws the same lines `fillPoly` draws first, so only the latter is run.
/// Returns the number of pixels painted (LISA sorts shapes by this area).
pub fn fill_polygon_cv(m: &mut Mask, points: &[[f64; 2]], value: u8) -> Result<usize> {
    let flat: Vec<f64> = points.iter().flat_map(|p| [p[0], p[1]]).collect();
    check_coords("fill_polygon_cv", &flat)?;
    let pts: Vec<(i64, i64)> = points.iter().map(|p| (p[0] as i64, p[1] as i64)).collect();
    let mut painted = vec![false; m.height * m.width];
    let mut canvas = Canvas {
        h: m.height as i64,
        w: m.width as i64,
        px: &mut painted,
    };
    if !pts.is_empty() && m.height > 0 && m.width > 0 {
        let edges = cv_collect_edges(&mut canvas, &pts);
        cv_fill_edges(&mut canvas, edges);
    }
    let mut count = 0;
    for (d, &p) in m.data.iter_mut().zip(&painted) {
        if p {
            *d = value;
            count += 1;
        }
    }
    Ok(count)
}

/// OpenCV's fixed-point precision for polygon edges.
const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

struct Canvas<'a> {
    h: i64,
    w: i64,
    px: &'a mut [bool],
}

impl Canvas<'_> {
    fn set(&mut self, x: i64, y: i64) {
        if (0..self.w).contains(&x) && (0..self.h).contains(&y) {
            self.px[(y * self.w + x) as usize] = true;
        }
    }
    fn hline(&mut self, y: i64, x1: i64, x2: i64) {
        for x in x1..=x2 {
            self.set(x, y);
        }
    }
}

/// Cohen-Sutherland clipping to `[0, w-1] × [0, h-1]` as OpenCV's `clipLine` does it
/// (integer endpoints, each end moved with a truncated double division, the second
/// using the first's new position).  Returns whether any part is inside.
fn cv_clip_line(w: i64, h: i64, p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
    let (right, bottom) = (w - 1, h - 1);
    if w <= 0 || h <= 0 {
        return false;
    }
    let code = |p: (i64, i64)| {
        i32::from(p.0 < 0)
            + i32::from(p.0 > right) * 2
            + i32::from(p.1 < 0) * 4
            + i32::from(p.1 > bottom) * 8
    };
    let (mut c1, mut c2) = (code(*p1), code(*p2));
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            p1.0 += ((a - p1.1) as f64 * (p2.0 - p1.0) as f64 / (p2.1 - p1.1) as f64) as i64;
            p1.1 = a;
            c1 = i32::from(p1.0 < 0) + i32::from(p1.0 > right) * 2;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            p2.0 += ((a - p2.1) as f64 * (p2.0 - p1.0) as f64 / (p2.1 - p1.1) as f64) as i64;
            p2.1 = a;
            c2 = i32::from(p2.0 < 0) + i32::from(p2.0 > right) * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                p1.1 += ((a - p1.0) as f64 * (p2.1 - p1.1) as f64 / (p2.0 - p1.0) as f64) as i64;
                p1.0 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                p2.1 += ((a - p2.0) as f64 * (p2.1 - p1.1) as f64 / (p2.0 - p1.0) as f64) as i64;
                p2.0 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// OpenCV's 8-connected `Line` (its `LineIterator`, left to right, clipped first).
fn cv_line(c: &mut Canvas, mut p1: (i64, i64), mut p2: (i64, i64)) {
    let outside = |p: (i64, i64)| p.0 < 0 || p.0 >= c.w || p.1 < 0 || p.1 >= c.h;
    if (outside(p1) || outside(p2)) && !cv_clip_line(c.w, c.h, &mut p1, &mut p2) {
        return;
    }
    let (mut dx, mut dy) = (p2.0 - p1.0, p2.1 - p1.1);
    let (mut delta_x, mut delta_y) = (1i64, 1i64);
    if dx < 0 {
        dx = -dx;
        dy = -dy;
        p1 = p2;
    }
    if dy < 0 {
        dy = -dy;
        delta_y = -1;
    }
    let vert = dy > dx;
    if vert {
        std::mem::swap(&mut dx, &mut dy);
        std::mem::swap(&mut delta_x, &mut delta_y);
    }
    let mut err = dx - (dy + dy);
    let plus_delta = dx + dx;
    let minus_delta = -(dy + dy);
    // per step: always move along the major axis, and along the minor one when err < 0
    let (mut minus_shift, mut plus_shift, mut minus_step, mut plus_step) = (delta_x, 0, 0, delta_y);
    if vert {
        std::mem::swap(&mut plus_step, &mut plus_shift);
        std::mem::swap(&mut minus_step, &mut minus_shift);
    }
    let (mut x, mut y) = p1;
    for _ in 0..=dx {
        c.set(x, y);
        let mask = if err < 0 { -1i64 } else { 0 };
        err += minus_delta + (plus_delta & mask);
        x += minus_shift + (plus_shift & mask);
        y += minus_step + (plus_step & mask);
    }
}

#[derive(Clone, Copy)]
struct CvEdge {
    y0: i64,
    y1: i64,
    x: i64,
    dx: i64,
}

/// OpenCV's `CollectPolyEdges` for integer points (shift 0, no offset): draws each
/// edge's line and returns the non-horizontal edges in fixed point.
fn cv_collect_edges(c: &mut Canvas, v: &[(i64, i64)]) -> Vec<CvEdge> {
    let mut edges = Vec::with_capacity(v.len());
    let mut pt0 = v[v.len() - 1];
    for &pt1 in v {
        let (mut t0, mut t1) = (pt0, pt1);
        cv_line(c, t0, t1);
        // fixed-point copies of the ends, moved to the clipped ends when clipped
        let (mut p0c_y, mut p1c_y) = (pt0.1, pt1.1);
        let outside = |p: (i64, i64)| p.0 < 0 || p.0 >= c.w || p.1 < 0 || p.1 >= c.h;
        if outside(t0) || outside(t1) {
            cv_clip_line(c.w, c.h, &mut t0, &mut t1);
            if t0.1 != t1.1 {
                p0c_y = t0.1;
                p1c_y = t1.1;
            }
        }
        let (p0c_x, p1c_x) = (t0.0 << XY_SHIFT, t1.0 << XY_SHIFT);
        if pt0.1 != pt1.1 {
            let dx = (p1c_x - p0c_x) / (p1c_y - p0c_y);
            edges.push(if pt0.1 < pt1.1 {
                CvEdge {
                    y0: pt0.1,
                    y1: pt1.1,
                    x: p0c_x + (pt0.1 - p0c_y) * dx,
                    dx,
                }
            } else {
                CvEdge {
                    y0: pt1.1,
                    y1: pt0.1,
                    x: p1c_x + (pt1.1 - p1c_y) * dx,
                    dx,
                }
            });
        }
        pt0 = pt1;
    }
    edges
}

/// OpenCV's `FillEdgeCollection`: a scanline over an active edge list kept sorted by
/// x, filling between pairs from `ceil(x_left)` to `floor(x_right)`.  Written with
/// indices where OpenCV uses a linked list of pointers, step for step, so that ties
/// and crossings resolve the same way.
fn cv_fill_edges(c: &mut Canvas, mut edges: Vec<CvEdge>) {
    let total = edges.len();
    if total < 2 {
        return;
    }
    let (mut y_min, mut y_max) = (i64::MAX, i64::MIN);
    let (mut x_min, mut x_max) = (i64::MAX, -1i64);
    for e in &edges {
        let x1 = e.x + (e.y1 - e.y0) * e.dx;
        y_min = y_min.min(e.y0);
        y_max = y_max.max(e.y1);
        x_min = x_min.min(e.x).min(x1);
        x_max = x_max.max(e.x).max(x1);
    }
    if y_max < 0 || y_min >= c.h || x_max < 0 || x_min >= (c.w << XY_SHIFT) {
        return;
    }
    edges.sort_by_key(|e| (e.y0, e.x, e.dx));
    // node `total` is the end sentinel (y0 = MAX), node `head` the list head
    edges.push(CvEdge {
        y0: i64::MAX,
        y1: 0,
        x: 0,
        dx: 0,
    });
    let head = total + 1;
    let mut next: Vec<Option<usize>> = vec![None; total + 2];
    let delta = XY_ONE - 1;
    let mut i = 0usize;
    let y_max = y_max.min(c.h);
    let mut y = edges[0].y0;
    while y < y_max {
        let mut draw = false;
        let clipline = y < 0;
        let mut prelast = head;
        let mut last = next[head];
        loop {
            if last.is_none() && edges[i].y0 != y {
                break;
            }
            if let Some(l) = last {
                if edges[l].y1 == y {
                    // the edge ends here: unlink it
                    next[prelast] = next[l];
                    last = next[l];
                    continue;
                }
            }
            let keep_prelast = prelast;
            match last {
                Some(l) if edges[i].y0 > y || edges[l].x < edges[i].x => {
                    prelast = l;
                    last = next[l];
                }
                _ if i < total => {
                    // an edge starts here: link it in before `last`
                    next[prelast] = Some(i);
                    next[i] = last;
                    prelast = i;
                    i += 1;
                }
                _ => break,
            }
            if draw {
                if !clipline {
                    let (a, b) = (edges[keep_prelast].x, edges[prelast].x);
                    let (x1, x2) = if a > b {
                        ((b + delta) >> XY_SHIFT, a >> XY_SHIFT)
                    } else {
                        ((a + delta) >> XY_SHIFT, b >> XY_SHIFT)
                    };
                    if x1 < c.w && x2 >= 0 {
                        c.hline(y, x1.max(0), x2.min(c.w - 1));
                    }
                }
                edges[keep_prelast].x += edges[keep_prelast].dx;
                edges[prelast].x += edges[prelast].dx;
            }
            draw = !draw;
        }
        // bubble sort of the active list by x
        let mut keep: Option<usize> = None;
        loop {
            let mut prelast = head;
            let mut last = next[head];
            let mut last_exchange: Option<usize> = None;
            while last != keep {
                let l = match last {
                    Some(l) => l,
                    None => break,
                };
                let te = match next[l] {
                    Some(t) => t,
                    None => break,
                };
                if edges[l].x > edges[te].x {
                    next[prelast] = Some(te);
                    next[l] = next[te];
                    next[te] = Some(l);
                    prelast = te;
                    last_exchange = Some(prelast);
                } else {
                    prelast = l;
                    last = Some(te);
                }
            }
            match last_exchange {
                None => break,
                Some(le) => {
                    keep = Some(le);
                    if keep == next[head] || le == head {
                        break;
                    }
                }
            }
        }
        y += 1;
    }
}
