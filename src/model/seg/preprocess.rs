//! Image preprocessing (PixelLM's, on one tower): the longest side is resized to
//! `S` (bilinear), the image is normalized with CLIP's mean and standard deviation and
//! padded bottom/right with zeros (the mean colour after normalization) to `S × S`.
//! Predicted logits at `S × S` are cropped to the valid region and resized back to the
//! image's own size, where masks are scored.
use crate::error::{Error, Result};
use image::RgbImage;

/// CLIP's normalization constants (OpenAI CLIP, also LLaVA's image processor).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviations (RGB), dividing after the mean is subtracted.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// One image ready for the tower.
#[derive(Clone, Debug)]
pub struct Pixels {
    /// (3, S, S), channel-major
    pub data: Vec<f32>,
    /// The resized image's size inside the square (the rest is padding).
    pub valid_h: usize,
    /// Width of the resized image inside the square, in pixels (≤ S).
    pub valid_w: usize,
    /// The original size.
    pub height: usize,
    /// The original width in pixels.
    pub width: usize,
}

/// Size of the resized image: longest side `s`, aspect kept, at least 1 pixel.
pub fn fit(h: usize, w: usize, s: usize) -> (usize, usize) {
    let m = h.max(w) as f64;
    let vh = ((h as f64 * s as f64 / m).round() as usize).clamp(1, s);
    let vw = ((w as f64 * s as f64 / m).round() as usize).clamp(1, s);
    (vh, vw)
}

/// Resize, normalize and pad one RGB image to (3, S, S).
pub fn preprocess(img: &RgbImage, s: usize) -> Result<Pixels> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 || s == 0 {
        return Err(Error::arg(
            "preprocess",
            format!("image {w}x{h} or target size {s} is empty"),
        ));
    }
    let (vh, vw) = fit(h, w, s);
    let resized;
    let src = if (vh, vw) == (h, w) {
        img
    } else {
        resized = image::imageops::resize(
            img,
            vw as u32,
            vh as u32,
            image::imageops::FilterType::Triangle,
        );
        &resized
    };
    let mut data = vec![0f32; 3 * s * s];
    for (x, y, p) in src.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        for c in 0..3 {
            data[(c * s + y) * s + x] = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Ok(Pixels {
        data,
        valid_h: vh,
        valid_w: vw,
        height: h,
        width: w,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_the_aspect_and_pads() {
        assert_eq!(fit(96, 128, 128), (96, 128));
        assert_eq!(fit(200, 100, 128), (128, 64));
        let img = RgbImage::from_pixel(6, 3, image::Rgb([255, 0, 0]));
        let p = preprocess(&img, 8).unwrap();
        assert_eq!((p.valid_h, p.valid_w), (4, 8));
        // red channel inside, padding zero outside
        let red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!((p.data[0] - red).abs() < 1e-5);
        assert_eq!(p.data[5 * 8], 0.0);
        assert_eq!(p.data[7 * 8 + 7], 0.0);
    }
}
