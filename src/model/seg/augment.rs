//! Stage 1's translation augmentation (ours; `[data] shift` of the stage-1 config, off
//! by default; PixelLM trains without augmentation).
//!
//! On the world's 2000 training images the tiny model overfits from about 4000 steps:
//! its gIoU on its own training images keeps rising while the test split's stops
//! (docs/stage1.md).  With `shift = m`, each visit of a training example moves the
//! whole scene by `(dy, dx)` pixels, `|dy|, |dx| ≤ m`:
//!
//! - the image's pixels move; the pixels uncovered at the border repeat the nearest
//!   edge pixel of the original (the world's wall and floor continue to the edge);
//! - every mask (the targets' and the image's other objects') moves with it;
//! - the shift is bounded so that every annotated object stays whole inside the frame
//!   (no mask pixel is lost), so the relations ("to the left of"), the counts and the
//!   left-to-right order of the answer's targets are those of the original and the
//!   text is unchanged.
//!
//! The draw is a pure function of `(run seed, epoch, example)` (the loader's
//! [`crate::train::Dataset::load_augmented`]), so a resumed run sees the same shifts.
//!
//! Measured (docs/stage1.md, 4000 steps, `shift = 12`): the gap between training and
//! test images halves, and the test split does not move; the world's config keeps it
//! off.
use crate::data::mask::Mask;
use crate::data::sample::{Sample, Target};
use crate::error::{Error, Result};
use crate::nn::Rng;
use image::RgbImage;

/// A translation: the content at `(y, x)` moves to `(y + dy, x + dx)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shift {
    /// Rows down, in pixels (negative: up).
    pub dy: i64,
    /// Columns right, in pixels (negative: left).
    pub dx: i64,
}

/// The inclusive ranges `[lo, hi]` of `dy` and of `dx` that keep every non-zero mask
/// pixel of the sample (targets and objects) inside the frame, at most `max` each way.
/// Without any such pixel, `±max` clamped to the image.
pub fn shift_bounds(s: &Sample, max: usize) -> ([i64; 2], [i64; 2]) {
    let (h, w) = (s.height as i64, s.width as i64);
    // the bounding box of every annotated pixel: rows y0..=y1, columns x0..=x1
    let (mut y0, mut y1, mut x0, mut x1) = (h, -1i64, w, -1i64);
    for t in s.targets.iter().chain(&s.objects) {
        if (t.mask.height, t.mask.width) != (s.height, s.width) {
            continue;
        }
        for (i, &v) in t.mask.data.iter().enumerate() {
            if v != 0 {
                let (y, x) = ((i / s.width) as i64, (i % s.width) as i64);
                y0 = y0.min(y);
                y1 = y1.max(y);
                x0 = x0.min(x);
                x1 = x1.max(x);
            }
        }
    }
    let m = max as i64;
    if y1 < 0 {
        let my = m.min(h - 1).max(0);
        let mx = m.min(w - 1).max(0);
        return ([-my, my], [-mx, mx]);
    }
    (
        [(-y0).max(-m), (h - 1 - y1).min(m)],
        [(-x0).max(-m), (w - 1 - x1).min(m)],
    )
}

/// The shift of one visit: uniform over [`shift_bounds`], drawn from `draw`.
pub fn draw_shift(s: &Sample, max: usize, draw: u64) -> Shift {
    let ([ylo, yhi], [xlo, xhi]) = shift_bounds(s, max);
    let mut rng = Rng::new(draw);
    // consecutive seeds start correlated: draw once before use
    rng.next_u64();
    let mut pick = |lo: i64, hi: i64| lo + (rng.next_u64() % (hi - lo + 1) as u64) as i64;
    let dy = pick(ylo, yhi);
    let dx = pick(xlo, xhi);
    Shift { dy, dx }
}

/// The image and the sample moved by `sh`: edge pixels repeat into the uncovered
/// border, masks are 0 there.  The image must be the sample's size.
pub fn translate(img: &RgbImage, s: &Sample, sh: Shift) -> Result<(RgbImage, Sample)> {
    let (h, w) = (s.height, s.width);
    if (img.height() as usize, img.width() as usize) != (h, w) {
        return Err(Error::shape(
            "augment::translate",
            format!(
                "image {}x{} for a sample of {h}x{w}",
                img.height(),
                img.width()
            ),
        ));
    }
    if h == 0 || w == 0 {
        return Ok((img.clone(), s.clone()));
    }
    let src = |o: usize, d: i64, n: usize| (o as i64 - d).clamp(0, n as i64 - 1) as u32;
    let out = RgbImage::from_fn(w as u32, h as u32, |x, y| {
        *img.get_pixel(src(x as usize, sh.dx, w), src(y as usize, sh.dy, h))
    });
    let move_mask = |m: &Mask| -> Result<Mask> {
        if (m.height, m.width) != (h, w) {
            return Err(Error::shape(
                "augment::translate",
                format!("mask {}x{} for a sample of {h}x{w}", m.height, m.width),
            ));
        }
        let mut data = vec![0u8; h * w];
        for y in 0..h {
            let sy = y as i64 - sh.dy;
            if !(0..h as i64).contains(&sy) {
                continue;
            }
            for x in 0..w {
                let sx = x as i64 - sh.dx;
                if (0..w as i64).contains(&sx) {
                    data[y * w + x] = m.data[sy as usize * w + sx as usize];
                }
            }
        }
        Ok(Mask {
            height: h,
            width: w,
            data,
        })
    };
    let move_all = |ts: &[Target]| -> Result<Vec<Target>> {
        ts.iter()
            .map(|t| {
                Ok(Target {
                    category: t.category.clone(),
                    mask: move_mask(&t.mask)?,
                })
            })
            .collect()
    };
    let moved = Sample {
        targets: move_all(&s.targets)?,
        objects: move_all(&s.objects)?,
        ..s.clone()
    };
    Ok((out, moved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(h: usize, w: usize, y: std::ops::Range<usize>, x: std::ops::Range<usize>) -> Mask {
        let mut data = vec![0u8; h * w];
        for r in y {
            for c in x.clone() {
                data[r * w + c] = 1;
            }
        }
        Mask {
            height: h,
            width: w,
            data,
        }
    }

    fn sample(h: usize, w: usize, targets: Vec<Mask>, objects: Vec<Mask>) -> Sample {
        let t = |m: Mask| Target {
            category: "apple".into(),
            mask: m,
        };
        Sample {
            image_id: "0".into(),
            image_path: "x.png".into(),
            height: h,
            width: w,
            question: "q".into(),
            question_index: 0,
            answer: None,
            targets: targets.into_iter().map(t).collect(),
            objects: objects.into_iter().map(t).collect(),
        }
    }

    fn image(h: usize, w: usize) -> RgbImage {
        RgbImage::from_fn(w as u32, h as u32, |x, y| {
            image::Rgb([x as u8, y as u8, (x * 7 + y * 13) as u8])
        })
    }

    #[test]
    fn bounds_keep_every_object_inside_the_frame() {
        // target rows 2..5, columns 3..6; another object rows 7..9, columns 10..12
        let s = sample(
            11,
            13,
            vec![rect(11, 13, 2..5, 3..6)],
            vec![rect(11, 13, 7..9, 10..12)],
        );
        assert_eq!(shift_bounds(&s, 100), ([-2, 2], [-3, 1]));
        assert_eq!(shift_bounds(&s, 1), ([-1, 1], [-1, 1]));
        assert_eq!(shift_bounds(&s, 0), ([0, 0], [0, 0]));
        // no annotated pixel: the image's size is the only bound
        let empty = sample(4, 6, vec![], vec![]);
        assert_eq!(shift_bounds(&empty, 100), ([-3, 3], [-5, 5]));
    }

    #[test]
    fn translate_moves_pixels_and_masks_together_and_repeats_the_edge() {
        let (h, w) = (9, 14);
        let s = sample(
            h,
            w,
            vec![rect(h, w, 2..4, 3..7)],
            vec![rect(h, w, 5..8, 9..12)],
        );
        let img = image(h, w);
        let sh = Shift { dy: 1, dx: -2 };
        let (out, moved) = translate(&img, &s, sh).unwrap();
        for y in 0..h {
            for x in 0..w {
                let sy = (y as i64 - 1).clamp(0, h as i64 - 1) as u32;
                let sx = (x as i64 + 2).clamp(0, w as i64 - 1) as u32;
                assert_eq!(out.get_pixel(x as u32, y as u32), img.get_pixel(sx, sy));
            }
        }
        assert_eq!(moved.targets[0].mask, rect(h, w, 3..5, 1..5));
        assert_eq!(moved.objects[0].mask, rect(h, w, 6..9, 7..10));
        // text and everything else unchanged
        assert_eq!((moved.question.as_str(), moved.height), ("q", h));
        // the inverse shift gives the masks back
        let (_, back) = translate(&out, &moved, Shift { dy: -1, dx: 2 }).unwrap();
        assert_eq!(back.targets, s.targets);
        assert_eq!(back.objects, s.objects);
        // no shift: the same sample and image
        let (same, same_s) = translate(&img, &s, Shift::default()).unwrap();
        assert_eq!((same, same_s), (img, s));
    }

    #[test]
    fn draws_stay_in_bounds_vary_and_repeat() {
        let s = sample(12, 16, vec![rect(12, 16, 3..6, 2..9)], vec![]);
        let ([ylo, yhi], [xlo, xhi]) = shift_bounds(&s, 4);
        assert_eq!(([ylo, yhi], [xlo, xhi]), ([-3, 4], [-2, 4]));
        let draws: Vec<Shift> = (0..400).map(|d| draw_shift(&s, 4, d)).collect();
        for sh in &draws {
            assert!((ylo..=yhi).contains(&sh.dy) && (xlo..=xhi).contains(&sh.dx));
            let (_, moved) = translate(&image(12, 16), &s, *sh).unwrap();
            let ones = |m: &Mask| m.data.iter().filter(|&&v| v == 1).count();
            assert_eq!(ones(&moved.targets[0].mask), 21, "{sh:?} lost mask pixels");
        }
        // every value of each range is drawn
        for dy in ylo..=yhi {
            assert!(draws.iter().any(|s| s.dy == dy), "dy {dy} never drawn");
        }
        for dx in xlo..=xhi {
            assert!(draws.iter().any(|s| s.dx == dx), "dx {dx} never drawn");
        }
        assert_eq!(draw_shift(&s, 4, 17), draws[17]);
        assert_eq!(draw_shift(&s, 0, 17), Shift::default());
    }

    #[test]
    fn sizes_that_disagree_are_errors() {
        let s = sample(5, 6, vec![rect(5, 6, 1..2, 1..2)], vec![]);
        let e = translate(&image(6, 5), &s, Shift { dy: 1, dx: 0 }).unwrap_err();
        assert!(e.to_string().contains("image 6x5"), "{e}");
        let bad = sample(5, 6, vec![rect(4, 6, 1..2, 1..2)], vec![]);
        let e = translate(&image(5, 6), &bad, Shift { dy: 1, dx: 0 }).unwrap_err();
        assert!(e.to_string().contains("mask 4x6"), "{e}");
    }
}
