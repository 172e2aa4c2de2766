//! COCO run-length encoding: the uncompressed count list and the compressed string
//! that `pycocotools` writes.  Runs go over pixels in column-major order (down the
//! first column, then the next), starting with a run of zeros.
use super::mask::Mask;
use super::sample::MAX_IMAGE_PIXELS;
use crate::error::{Error, Result};

/// A run-length encoded mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rle {
    /// Rows of the mask, in pixels.
    pub height: usize,
    /// Columns of the mask, in pixels.
    pub width: usize,
    /// Alternating run lengths, zeros first, column-major.
    pub counts: Vec<u32>,
}

impl Rle {
    /// Encode a mask (nonzero = foreground).
    pub fn from_mask(m: &Mask) -> Rle {
        let (h, w) = (m.height, m.width);
        let mut counts = Vec::new();
        let mut cur = 0u8;
        let mut run = 0u32;
        for x in 0..w {
            for y in 0..h {
                let v = u8::from(m.data[y * w + x] != 0);
                if v != cur {
                    counts.push(run);
                    run = 0;
                    cur = v;
                }
                run += 1;
            }
        }
        counts.push(run);
        Rle {
            height: h,
            width: w,
            counts,
        }
    }

    /// Decode to a mask; `Err` when the runs do not add up to `height × width`, or
    /// when that is over [`MAX_IMAGE_PIXELS`] (checked before anything is allocated).
    pub fn to_mask(&self) -> Result<Mask> {
        let (h, w) = (self.height, self.width);
        let pixels = h.checked_mul(w).filter(|&n| n <= MAX_IMAGE_PIXELS);
        let Some(pixels) = pixels else {
            return Err(Error::arg(
                "Rle::to_mask",
                format!("size {h}x{w} is over {MAX_IMAGE_PIXELS} pixels"),
            ));
        };
        let total: u64 = self.counts.iter().map(|&c| c as u64).sum();
        if total != pixels as u64 {
            return Err(Error::arg(
                "Rle::to_mask",
                format!(
                    "runs cover {total} pixels but the size {h}x{w} has {}",
                    pixels
                ),
            ));
        }
        let mut m = Mask::new(h, w);
        let mut idx = 0usize; // column-major pixel index
        for (i, &c) in self.counts.iter().enumerate() {
            if i % 2 == 1 {
                for p in idx..idx + c as usize {
                    let (x, y) = (p / h, p % h);
                    m.data[y * w + x] = 1;
                }
            }
            idx += c as usize;
        }
        Ok(m)
    }

    /// Foreground area without decoding.
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| c as u64)
            .sum()
    }

    /// The compressed string form (`counts` of a pycocotools RLE).
    pub fn to_compressed(&self) -> String {
        let mut s = String::new();
        for i in 0..self.counts.len() {
            let mut x = self.counts[i] as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            loop {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push((c + 48) as char);
                if !more {
                    break;
                }
            }
        }
        s
    }

    /// Parse the compressed string form; `Err` on characters outside the alphabet, a
    /// truncated value, or negative runs.
    pub fn from_compressed(height: usize, width: usize, s: &str) -> Result<Rle> {
        let bad = |msg: String| Error::arg("Rle::from_compressed", msg);
        let b = s.as_bytes();
        let mut counts: Vec<u32> = Vec::new();
        let mut p = 0;
        while p < b.len() {
            let mut x: i64 = 0;
            let mut k = 0;
            loop {
                if p >= b.len() {
                    return Err(bad("string ends inside a value".into()));
                }
                let ch = b[p];
                if !(48..48 + 64).contains(&ch) {
                    return Err(bad(format!(
                        "character {:?} at {p} is not in the RLE alphabet",
                        ch as char
                    )));
                }
                if k >= 12 {
                    return Err(bad("value too long".into()));
                }
                let c = (ch - 48) as i64;
                x |= (c & 0x1f) << (5 * k);
                p += 1;
                k += 1;
                if c & 0x20 == 0 {
                    if c & 0x10 != 0 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
            }
            let m = counts.len();
            if m > 2 {
                x += counts[m - 2] as i64;
            }
            if x < 0 || x > u32::MAX as i64 {
                return Err(bad(format!("run {m} has length {x}")));
            }
            counts.push(x as u32);
        }
        Ok(Rle {
            height,
            width,
            counts,
        })
    }
}
