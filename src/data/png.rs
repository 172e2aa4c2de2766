//! PNG masks, the format `popen eval-masks` reads and `popen data show --masks` writes.
//!
//! A pixel is foreground when any colour channel is nonzero (alpha ignored), so 0/1,
//! 0/255, 16-bit and colour-coded masks all read as expected.  The size in the PNG
//! header is checked against [`MAX_IMAGE_PIXELS`] before any pixel buffer is allocated:
//! a 60-byte file can claim 2³¹ × 2³¹ pixels.
use std::io::Cursor;
use std::path::Path;

use image::codecs::png::PngDecoder;
use image::{DynamicImage, ImageDecoder};

use crate::data::sample::MAX_IMAGE_PIXELS;
use crate::error::{Error, Result};

/// A decoded mask: `(height, width, pixels)`, row-major, 1 = foreground, 0 = background.
pub type MaskPixels = (usize, usize, Vec<u8>);

/// Decode PNG bytes as a mask; `path` names the file in errors.
pub fn decode_mask_png(bytes: &[u8], path: &Path) -> Result<MaskPixels> {
    let bad = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let dec = PngDecoder::new(Cursor::new(bytes))
        .map_err(|e| bad(format!("does not decode as PNG: {e}")))?;
    let (w, h) = dec.dimensions();
    let (h, w) = (h as usize, w as usize);
    if h == 0 || w == 0 || h.saturating_mul(w) > MAX_IMAGE_PIXELS {
        return Err(bad(format!(
            "PNG header claims {h}x{w} pixels (h x w); masks must be non-empty and at most \
             {MAX_IMAGE_PIXELS} pixels"
        )));
    }
    let img =
        DynamicImage::from_decoder(dec).map_err(|e| bad(format!("does not decode as PNG: {e}")))?;
    fn any_nonzero<T: Copy + PartialEq + Default>(px: &[T], ch: usize, used: usize) -> Vec<u8> {
        px.chunks_exact(ch)
            .map(|p| p[..used].iter().any(|&v| v != T::default()) as u8)
            .collect()
    }
    let data = match &img {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().map(|&v| (v != 0) as u8).collect(),
        DynamicImage::ImageLumaA8(b) => any_nonzero(b.as_raw(), 2, 1),
        DynamicImage::ImageRgb8(b) => any_nonzero(b.as_raw(), 3, 3),
        DynamicImage::ImageRgba8(b) => any_nonzero(b.as_raw(), 4, 3),
        DynamicImage::ImageLuma16(b) => any_nonzero(b.as_raw(), 1, 1),
        DynamicImage::ImageLumaA16(b) => any_nonzero(b.as_raw(), 2, 1),
        DynamicImage::ImageRgb16(b) => any_nonzero(b.as_raw(), 3, 3),
        DynamicImage::ImageRgba16(b) => any_nonzero(b.as_raw(), 4, 3),
        other => {
            let b = other.to_rgb8();
            any_nonzero(b.as_raw(), 3, 3)
        }
    };
    Ok((h, w, data))
}

/// Read and decode a PNG mask file; errors name the file.
pub fn load_mask_png(path: &Path) -> Result<MaskPixels> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_mask_png(&bytes, path)
}
