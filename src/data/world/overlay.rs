//! Human-readable pictures of samples: coloured instance masks over the image with
//! labels in a tiny built-in 3×5 bitmap font, and PNG encoding.
use super::render::RgbImage;
use crate::data::Mask;
use crate::error::{Error, Result};
use std::path::Path;

/// 3×5 glyphs, one row per byte, bit 2 = left column.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [6, 1, 2, 4, 7],
        '3' => [6, 1, 2, 1, 6],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 6, 1, 6],
        '6' => [3, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 6],
        '-' => [0, 0, 7, 0, 0],
        '.' => [0, 0, 0, 0, 2],
        ':' => [0, 2, 0, 2, 0],
        '?' => [6, 1, 2, 0, 2],
        _ => [0; 5],
    }
}

/// Draws `text` with its top-left corner at (y, x), each font pixel `scale`×`scale`,
/// on a dark box so it reads over any colour.  Clipped at the image border.
pub fn draw_text(
    img: &mut RgbImage,
    y: usize,
    x: usize,
    text: &str,
    scale: usize,
    colour: [u8; 3],
) {
    let n = text.chars().count();
    let (bw, bh) = ((4 * n + 1) * scale, 7 * scale);
    for yy in y..(y + bh).min(img.height) {
        for xx in x..(x + bw).min(img.width) {
            img.set(yy, xx, [0, 0, 0]);
        }
    }
    for (i, ch) in text.chars().enumerate() {
        let g = glyph(ch);
        for (r, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits >> (2 - col) & 1 == 1 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let yy = y + (r + 1) * scale + dy;
                            let xx = x + (1 + 4 * i + col) * scale + dx;
                            if yy < img.height && xx < img.width {
                                img.set(yy, xx, colour);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A distinct, saturated colour for instance `k`.
pub fn palette(k: usize) -> [u8; 3] {
    const P: [[u8; 3]; 10] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 190],
    ];
    P[k % P.len()]
}

/// Image upscaled `up`× (nearest) with each mask blended in its colour, outlined,
/// and labelled at its top-left.  `masks` and `labels` pair up.
pub fn overlay(img: &RgbImage, masks: &[&Mask], labels: &[String], up: usize) -> Result<RgbImage> {
    if masks.len() != labels.len() {
        return Err(Error::arg(
            "overlay",
            format!("{} masks but {} labels", masks.len(), labels.len()),
        ));
    }
    let up = up.max(1);
    let (h, w) = (img.height, img.width);
    for m in masks {
        if m.height != h || m.width != w {
            return Err(Error::shape(
                "overlay",
                format!("mask {}x{} vs image {h}x{w}", m.height, m.width),
            ));
        }
    }
    let mut out = RgbImage::new(h * up, w * up);
    for y in 0..h * up {
        for x in 0..w * up {
            out.set(y, x, img.get(y / up, x / up));
        }
    }
    for (k, m) in masks.iter().enumerate() {
        let col = palette(k);
        for y in 0..h {
            for x in 0..w {
                if m.get(y, x) == 0 {
                    continue;
                }
                let edge = [(0i64, 1i64), (0, -1), (1, 0), (-1, 0)]
                    .iter()
                    .any(|&(dy, dx)| {
                        let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                        yy < 0
                            || xx < 0
                            || yy >= h as i64
                            || xx >= w as i64
                            || m.get(yy as usize, xx as usize) == 0
                    });
                for dy in 0..up {
                    for dx in 0..up {
                        let (yy, xx) = (y * up + dy, x * up + dx);
                        let p = out.get(yy, xx);
                        let c = if edge {
                            col
                        } else {
                            [0, 1, 2].map(|i| ((p[i] as u16 + col[i] as u16) / 2) as u8)
                        };
                        out.set(yy, xx, c);
                    }
                }
            }
        }
    }
    let scale = if up >= 3 { 2 } else { 1 };
    for (k, (m, label)) in masks.iter().zip(labels).enumerate() {
        if m.is_empty() {
            continue;
        }
        let b = m.bbox();
        draw_text(
            &mut out,
            b[1] as usize * up,
            b[0] as usize * up,
            label,
            scale,
            palette(k),
        );
    }
    Ok(out)
}

/// Encodes RGB as PNG bytes (deterministic: fixed encoder settings).
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut buf);
    image::ImageEncoder::write_image(
        enc,
        &img.data,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Image {
        path: "<memory>".into(),
        msg: e.to_string(),
    })?;
    Ok(buf)
}

/// Writes a PNG file.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let bytes = png_bytes(img)?;
    crate::fsio::write_atomic(path, &bytes)
}

/// Reads an RGB PNG (or any format the `image` crate decodes) into an [`RgbImage`].
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let im = image::open(path).map_err(|e| Error::Image {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let im = im.to_rgb8();
    Ok(RgbImage {
        height: im.height() as usize,
        width: im.width() as usize,
        data: im.into_raw(),
    })
}

/// `a` and `b` next to each other (tops aligned) with a `gap`-pixel white strip.
pub fn side_by_side(a: &RgbImage, b: &RgbImage, gap: usize) -> RgbImage {
    let h = a.height.max(b.height);
    let mut out = RgbImage::new(h, a.width + gap + b.width);
    out.data.fill(255);
    for y in 0..a.height {
        for x in 0..a.width {
            out.set(y, x, a.get(y, x));
        }
    }
    for y in 0..b.height {
        for x in 0..b.width {
            out.set(y, a.width + gap + x, b.get(y, x));
        }
    }
    out
}

/// Nearest-neighbour upscaling by `up`.
pub fn upscale(img: &RgbImage, up: usize) -> RgbImage {
    let up = up.max(1);
    let mut out = RgbImage::new(img.height * up, img.width * up);
    for y in 0..out.height {
        for x in 0..out.width {
            out.set(y, x, img.get(y / up, x / up));
        }
    }
    out
}

/// Writes a mask as an 8-bit grey PNG: 255 foreground, 0 background (the format
/// `popen eval-masks` reads: nonzero = foreground).
pub fn save_mask_png(m: &Mask, path: &Path) -> Result<()> {
    let data: Vec<u8> = m
        .data
        .iter()
        .map(|&v| if v != 0 { 255 } else { 0 })
        .collect();
    let mut buf = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut buf);
    image::ImageEncoder::write_image(
        enc,
        &data,
        m.width as u32,
        m.height as u32,
        image::ExtendedColorType::L8,
    )
    .map_err(|e| Error::Image {
        path: path.into(),
        msg: e.to_string(),
    })?;
    crate::fsio::write_atomic(path, &buf)
}

/// The phrase each `<seg>` of `text` stands for: the words just before it (up to
/// three, stopping at punctuation or another `<seg>`), for overlay labels.
pub fn seg_phrases(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if !w.starts_with("<seg>") {
            continue;
        }
        let mut phrase = Vec::new();
        for p in words[..i].iter().rev().take(3) {
            if p.starts_with("<seg>") || p.ends_with(',') || p.ends_with('.') {
                break;
            }
            phrase.push(*p);
        }
        phrase.reverse();
        out.push(phrase.join(" "));
    }
    out
}

/// `img` with `title` above and `text` below it, wrapped to the image's width, in
/// dark-boxed letters `scale` pixels per font pixel, on white.
pub fn captioned(img: &RgbImage, title: &str, text: &str, scale: usize) -> RgbImage {
    let per_line = (img.width / (4 * scale)).max(1).saturating_sub(1).max(1);
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= per_line => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.chars().take(per_line).collect()),
        }
    }
    let lh = 8 * scale;
    let top = lh + scale;
    let mut out = RgbImage::new(top + img.height + lines.len() * lh + scale, img.width);
    out.data.fill(255);
    for y in 0..img.height {
        let (a, b) = ((top + y) * img.width * 3, y * img.width * 3);
        out.data[a..a + img.width * 3].copy_from_slice(&img.data[b..b + img.width * 3]);
    }
    let title: String = title.chars().take(per_line).collect();
    draw_text(&mut out, 0, 0, &title, scale, [255, 255, 255]);
    for (i, l) in lines.iter().enumerate() {
        draw_text(
            &mut out,
            top + img.height + scale + i * lh,
            0,
            l,
            scale,
            [255, 255, 255],
        );
    }
    out
}
