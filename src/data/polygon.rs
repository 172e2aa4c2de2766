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
//!   (`cv2.polylines` + `cv2.fillPoly` on vertices truncated to integers): a pixel is
//!   set when its centre lies inside or on the integer polygon, or on the 8-connected
//!   line between two consecutive vertices.
//!
//! Parts of a polygon outside the image are clipped by both rules.
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
            counts: if h * w == 0 { vec![] } else { vec![(h * w) as u32] },
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
                    let a = (xd as i32)
                        .wrapping_mul(h as i32)
                        .wrapping_add(yd as i32) as u32;
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
/// `cv2.polylines(closed, thickness 1)` and `cv2.fillPoly` with `value`.  Pixel
/// `(x, y)` is set when the point `(x, y)` lies inside or on the integer polygon
/// (even-odd rule), or on the 8-connected line between consecutive vertices.  Returns
/// the number of pixels painted (LISA sorts shapes by this area).
pub fn fill_polygon_cv(m: &mut Mask, points: &[[f64; 2]], value: u8) -> Result<usize> {
    let flat: Vec<f64> = points.iter().flat_map(|p| [p[0], p[1]]).collect();
    check_coords("fill_polygon_cv", &flat)?;
    let pts: Vec<(i64, i64)> = points
        .iter()
        .map(|p| (p[0] as i64, p[1] as i64))
        .collect();
    let mut painted = vec![false; m.height * m.width];
    let (h, w) = (m.height as i64, m.width as i64);
    let n = pts.len();
    if n == 0 {
        return Ok(0);
    }
    let mut set = |x: i64, y: i64| {
        if (0..w).contains(&x) && (0..h).contains(&y) {
            painted[(y * w + x) as usize] = true;
        }
    };
    // interior: scanline at each integer row, inclusive of the crossing columns
    let ymin = pts.iter().map(|p| p.1).min().unwrap_or(0).max(0);
    let ymax = pts.iter().map(|p| p.1).max().unwrap_or(-1).min(h - 1);
    let mut xs: Vec<f64> = Vec::new();
    for yy in ymin..=ymax {
        xs.clear();
        let yf = yy as f64;
        for i in 0..n {
            let (x0, y0) = pts[i];
            let (x1, y1) = pts[(i + 1) % n];
            // half-open in y so a vertex on the scanline is counted once
            if (y0 <= yy && yy < y1) || (y1 <= yy && yy < y0) {
                let t = (yf - y0 as f64) / (y1 - y0) as f64;
                xs.push(x0 as f64 + t * (x1 - x0) as f64);
            }
        }
        xs.sort_by(|a, b| a.total_cmp(b));
        for pair in xs.chunks_exact(2) {
            let xa = (pair[0].ceil() as i64).max(0);
            let xb = (pair[1].floor() as i64).min(w - 1);
            for xx in xa..=xb {
                set(xx, yy);
            }
        }
    }
    // boundary: 8-connected lines between consecutive vertices, closed
    for i in 0..n {
        let (x0, y0) = pts[i];
        let (x1, y1) = pts[(i + 1) % n];
        line8(x0, y0, x1, y1, &mut set);
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

/// Bresenham's 8-connected line from `(x0, y0)` to `(x1, y1)`, both ends included.
fn line8(x0: i64, y0: i64, x1: i64, y1: i64, set: &mut impl FnMut(i64, i64)) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        set(x, y);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}
