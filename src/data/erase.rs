//! Painting objects out of an image: the same scene without them.  Stage 2's erased
//! contrast ([`crate::method::pref::contrast`]) and stage 1's counterfactual mix
//! ([`crate::method::counterfactual`]) read the image a question was asked about with
//! some of its objects removed.
use crate::data::mask::Mask;
use crate::error::{Error, Result};
use image::RgbImage;

/// `img` with the union of `masks` (each at the image's size), grown by one pixel to
/// take the objects' anti-aliased edges, painted over.  Each painted pixel takes the
/// inverse-distance mean of the nearest unpainted pixel in each of the four directions
/// along its row and column that has one: the wall or floor around the object runs
/// through where it stood, and nothing of its colour or outline's inside is left.  An
/// image painted over entirely becomes mid-grey.
pub fn erase_objects(img: &RgbImage, masks: &[&Mask]) -> Result<RgbImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut hole = vec![false; h * w];
    for m in masks {
        if (m.height, m.width) != (h, w) {
            return Err(Error::shape(
                "erase_objects",
                format!("mask {}x{} for image {h}x{w} (h x w)", m.height, m.width),
            ));
        }
        for y in 0..h {
            for x in 0..w {
                if m.get(y, x) != 0 {
                    for yy in y.saturating_sub(1)..(y + 2).min(h) {
                        for xx in x.saturating_sub(1)..(x + 2).min(w) {
                            hole[yy * w + xx] = true;
                        }
                    }
                }
            }
        }
    }
    // per painted pixel: Σ colour / d and Σ 1 / d over the nearest unpainted pixels
    let mut acc = vec![[0f64; 4]; h * w];
    let mut add = |at: usize, from: usize, d: usize| {
        let p = img.as_raw();
        let inv = 1.0 / d as f64;
        for c in 0..3 {
            acc[at][c] += p[from * 3 + c] as f64 * inv;
        }
        acc[at][3] += inv;
    };
    // rows, then columns, each scanned both ways: (start, step, count) of each line
    let lines = (0..h)
        .map(|y| (y * w, 1, w))
        .chain((0..w).map(|x| (x, w, h)));
    for (start, step, n) in lines {
        let at = |j: usize| start + j * step;
        let mut last = None;
        for j in 0..n {
            match (hole[at(j)], last) {
                (false, _) => last = Some(j),
                (true, Some(l)) => add(at(j), at(l), j - l),
                (true, None) => {}
            }
        }
        let mut last = None;
        for j in (0..n).rev() {
            match (hole[at(j)], last) {
                (false, _) => last = Some(j),
                (true, Some(l)) => add(at(j), at(l), l - j),
                (true, None) => {}
            }
        }
    }
    let mut out = img.clone();
    for (i, px) in out.pixels_mut().enumerate() {
        if hole[i] {
            let a = acc[i];
            px.0 = match a[3] > 0.0 {
                true => [0, 1, 2].map(|c| (a[c] / a[3]).round().clamp(0.0, 255.0) as u8),
                false => [128; 3],
            };
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::erase_objects;
    use crate::data::mask::Mask;
    use image::RgbImage;

    /// A background `(10 + 3x, 200 − 2y, 7)`: linear along rows and columns.
    fn ramp(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([10 + 3 * x as u8, 200 - 2 * y as u8, 7])
        })
    }

    #[test]
    fn erasing_restores_a_linear_background_and_leaves_the_rest() {
        let (w, h) = (13usize, 9usize);
        let bg = ramp(w as u32, h as u32);
        // two objects: a red block and a blue bar; only the block is erased
        let block = Mask::from_fn(h, w, |y, x| (3..6).contains(&y) && (4..8).contains(&x));
        let bar = Mask::from_fn(h, w, |y, x| y == 8 && (10..13).contains(&x));
        let mut img = bg.clone();
        for y in 0..h {
            for x in 0..w {
                // the block's anti-aliased rim, one pixel outside its mask
                let rim = (2..7).contains(&y) && (3..9).contains(&x);
                if rim {
                    img.put_pixel(x as u32, y as u32, image::Rgb([120, 100, 3]));
                }
                if block.get(y, x) != 0 {
                    img.put_pixel(x as u32, y as u32, image::Rgb([250, 0, 0]));
                }
                if bar.get(y, x) != 0 {
                    img.put_pixel(x as u32, y as u32, image::Rgb([0, 0, 250]));
                }
            }
        }
        let out = erase_objects(&img, &[&block]).unwrap();
        for y in 0..h {
            for x in 0..w {
                let (o, i, b) = (
                    out.get_pixel(x as u32, y as u32),
                    img.get_pixel(x as u32, y as u32),
                    bg.get_pixel(x as u32, y as u32),
                );
                // the block, grown by one pixel, is the background again: along a row
                // the fill interpolates linearly, down a column it is constant in x
                let grown = (2..7).contains(&y) && (3..9).contains(&x);
                match grown {
                    true => {
                        for c in 0..3 {
                            assert!(
                                (o[c] as i32 - b[c] as i32).abs() <= 1,
                                "({y}, {x}): {o:?} vs {b:?}"
                            );
                        }
                    }
                    // everything else is untouched, the bar included
                    false => assert_eq!(o, i, "({y}, {x})"),
                }
            }
        }
        // no mask: the image itself
        assert_eq!(erase_objects(&img, &[]).unwrap(), img);
        // everything painted over: mid-grey
        let all = Mask::from_fn(h, w, |_, _| true);
        assert!(erase_objects(&img, &[&all])
            .unwrap()
            .pixels()
            .all(|p| p.0 == [128; 3]));
        // a mask of another size is an error naming both sizes
        let e = erase_objects(&img, &[&Mask::new(h, w + 1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("9x14") && e.contains("9x13"), "{e}");
    }
}
