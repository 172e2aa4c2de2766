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

/// Largest vertex coordinate accepted (pixels).  The edge walk visits one point per
/// fine-grid step, so a coordinate of 1e9 would allocate gigabytes; no image is this
/// big.
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

    // Toggle positions (column-major pixel index).  The edge walk is streamed: the
    // downsampling step only looks at consecutive walk points (u, v), also across edges.
    let mut toggles: Vec<u32> = Vec::new();
    let mut prev: Option<(i32, i32)> = None;
    let (hf, wf) = (h as f64, w as f64);
    let mut visit = |u: i32, v: i32| {
        if let Some((pu, pv)) = prev {
            if u != pu {
                // the walk crossed a fine column boundary; its left fine column
                let col = if u < pu { u } else { u - 1 } as f64;
                let xd = (col + 0.5) / COCO_SCALE - 0.5;
                if xd.floor() == xd && xd >= 0.0 && xd <= wf - 1.0 {
                    let row = v.min(pv) as f64;
                    let mut yd = (row + 0.5) / COCO_SCALE - 0.5;
                    if yd < 0.0 {
                        yd = 0.0;
                    } else if yd > hf {
                        yd = hf;
                    }
                    let yd = yd.ceil();
                    // pycocotools: (uint)(x*(int)h + y), wrapping 32-bit arithmetic
                    let a = (xd as i32).wrapping_mul(h as i32).wrapping_add(yd as i32) as u32;
                    toggles.push(a);
                }
            }
        }
        prev = Some((u, v));
    };
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let dx = (xe as i64 - xs as i64).unsigned_abs() as i64;
        let dy = (ys as i64 - ye as i64).unsigned_abs() as i64;
        // walk from the lower end of the longer axis; `flip` keeps the original order
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        // dx = dy = 0 (repeated vertex) gives 0/0 = NaN here, as in C
        let s = if dx >= dy {
            (ye - ys) as f64 / dx as f64
        } else {
            (xe - xs) as f64 / dy as f64
        };
        if dx >= dy {
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                visit(
                    (t + xs as i64) as i32,
                    c_int(ys as f64 + s * t as f64 + 0.5),
                );
            }
        } else {
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                visit(
                    c_int(xs as f64 + s * t as f64 + 0.5),
                    (t + ys as i64) as i32,
                );
            }
        }
    }
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
