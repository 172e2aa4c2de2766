//! Binary masks, row-major, one byte per pixel.
use crate::error::{Error, Result};

/// Pixel value of a foreground pixel.
pub const FG: u8 = 1;
/// Pixel value that marks "ignore" in a reference mask (ReasonSeg's `ignore` label):
/// excluded from scoring.
pub const IGNORE: u8 = 255;

/// A mask of `height × width` pixels, row-major; 0 background, nonzero foreground
/// ([`IGNORE`] = excluded from scoring where a reader says so).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Mask {
    /// Rows, in pixels.
    pub height: usize,
    /// Columns, in pixels.
    pub width: usize,
    /// height × width, row-major
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Mask({}x{}, area {})",
            self.height,
            self.width,
            self.area()
        )
    }
}

impl Mask {
    /// An empty (all background) mask.
    pub fn new(height: usize, width: usize) -> Self {
        Mask {
            height,
            width,
            data: vec![0; height * width],
        }
    }
    /// Wrap row-major data; `Err` when the length is not `height × width`.
    pub fn from_vec(height: usize, width: usize, data: Vec<u8>) -> Result<Self> {
        crate::error::check_len("Mask::from_vec", "data", data.len(), height * width)?;
        Ok(Mask {
            height,
            width,
            data,
        })
    }
    /// Build from a predicate on (row, column).
    pub fn from_fn(height: usize, width: usize, mut f: impl FnMut(usize, usize) -> bool) -> Self {
        let mut m = Mask::new(height, width);
        for y in 0..height {
            for x in 0..width {
                if f(y, x) {
                    m.data[y * width + x] = FG;
                }
            }
        }
        m
    }
    /// Value at (row, column).
    #[track_caller]
    pub fn get(&self, y: usize, x: usize) -> u8 {
        self.data[y * self.width + x]
    }
    /// Set (row, column).
    #[track_caller]
    pub fn set(&mut self, y: usize, x: usize, v: u8) {
        self.data[y * self.width + x] = v;
    }
    /// Number of foreground pixels (nonzero and not [`IGNORE`]).
    pub fn area(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0 && v != IGNORE).count()
    }
    /// True when no pixel is foreground.
    pub fn is_empty(&self) -> bool {
        self.area() == 0
    }
    /// Pixel-wise union (nonzero wins), `Err` on a size mismatch.
    pub fn union(&self, other: &Mask) -> Result<Mask> {
        self.same_size(other, "Mask::union")?;
        let data = self
            .data
            .iter()
            .zip(&other.data)
            .map(|(&a, &b)| u8::from(a != 0 || b != 0))
            .collect();
        Ok(Mask {
            height: self.height,
            width: self.width,
            data,
        })
    }
    /// `Err(Shape)` unless both masks have the same size.
    pub fn same_size(&self, other: &Mask, op: &'static str) -> Result<()> {
        if self.height == other.height && self.width == other.width {
            Ok(())
        } else {
            Err(Error::shape(
                op,
                format!(
                    "mask {}x{} vs {}x{}",
                    self.height, self.width, other.height, other.width
                ),
            ))
        }
    }
    /// Bounding box `[x, y, w, h]` of the foreground (COCO order), zeros when empty.
    pub fn bbox(&self) -> [f64; 4] {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..self.height {
            for x in 0..self.width {
                let v = self.get(y, x);
                if v != 0 && v != IGNORE {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
            }
        }
        if x0 == usize::MAX {
            return [0.0; 4];
        }
        [
            x0 as f64,
            y0 as f64,
            (x1 - x0 + 1) as f64,
            (y1 - y0 + 1) as f64,
        ]
    }
}
