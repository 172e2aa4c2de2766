//! Segmentations (COCO RLE or polygons) to dense masks for scoring.
//!
//! Masks are written **column-major** (COCO's run order: down the first column, then
//! the next), i.e. as the transposed `(W, H)` image, so decoding an RLE is one
//! `fill` per run.  Every metric of the evaluator (IoU counts, erosion by a square,
//! the image diagonal) is invariant under transposition.
use crate::data::muse::{RleCounts, RleJson, Segmentation};
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

/// Fill `out` (W·H, column-major, zeroed by the caller) from validated runs.
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

/// PROVISIONAL polygon fill, to be replaced by the COCO-exact rasterizer
/// (`data::polygon`) when it lands: even-odd rule over all rings together, a pixel
/// `(x, y)` is inside when its centre `(x + 0.5, y + 0.5)` is.  COCO's `frPoly` (which
/// up-samples edges) can differ from this on boundary pixels.  Writes column-major.
pub fn fill_polygons(polys: &[Vec<f64>], h: usize, w: usize, out: &mut [u8]) {
    let mut xs: Vec<f64> = Vec::new();
    for y in 0..h {
        let cy = y as f64 + 0.5;
        xs.clear();
        for ring in polys {
            let n = ring.len() / 2;
            for i in 0..n {
                let (x0, y0) = (ring[2 * i], ring[2 * i + 1]);
                let j = (i + 1) % n;
                let (x1, y1) = (ring[2 * j], ring[2 * j + 1]);
                // half-open in y so a vertex on the scan line is counted once
                if (y0 <= cy) != (y1 <= cy) {
                    xs.push(x0 + (cy - y0) * (x1 - x0) / (y1 - y0));
                }
            }
        }
        xs.sort_by(f64::total_cmp);
        for pair in xs.chunks_exact(2) {
            // pixels whose centre lies in [a, b)
            let a = (pair[0] - 0.5).ceil().max(0.0);
            let b = (pair[1] - 0.5).ceil().min(w as f64);
            let (a, b) = (a as usize, b.max(0.0) as usize);
            for x in a..b.max(a) {
                out[x * h + y] = 1;
            }
        }
    }
}

/// Rasterize one segmentation of an `(h, w)` image into `out` (column-major, zeroed).
pub fn rasterize(
    seg: &Segmentation,
    h: usize,
    w: usize,
    out: &mut [u8],
) -> Result<(), RasterError> {
    match seg {
        Segmentation::Rle(r) => fill_runs(&rle_runs(r, h, w)?, out),
        Segmentation::Polygons(p) => {
            if let Some((k, ring)) = p.iter().enumerate().find(|(_, r)| r.len() % 2 == 1) {
                return Err(format!(
                    "polygon {k} has an odd number ({}) of coordinates",
                    ring.len()
                ));
            }
            if p.iter().flatten().any(|v| !v.is_finite()) {
                return Err("polygon has a non-finite coordinate".into());
            }
            fill_polygons(p, h, w, out)
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_fill_column_major() {
        // 3x2 image, column-major [0,1,1 | 1,0,0] = runs 1,3,2
        let mut out = vec![0u8; 6];
        fill_runs(&[1, 3, 2], &mut out);
        assert_eq!(out, vec![0, 1, 1, 1, 0, 0]);
    }

    #[test]
    fn polygon_rectangle_covers_pixel_centres() {
        // square from (1,1) to (3,4) in a 5x4 (h x w) image: columns 1,2 and rows 1,2,3
        let (h, w) = (5, 4);
        let mut out = vec![0u8; h * w];
        fill_polygons(
            &[vec![1.0, 1.0, 3.0, 1.0, 3.0, 4.0, 1.0, 4.0]],
            h,
            w,
            &mut out,
        );
        for x in 0..w {
            for y in 0..h {
                let want = (1..3).contains(&x) && (1..4).contains(&y);
                assert_eq!(out[x * h + y] == 1, want, "pixel ({x},{y})");
            }
        }
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
