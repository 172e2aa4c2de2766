//! The category heads: two auxiliary losses of ours, not PixelLM's, that stand in for
//! the pretraining the tiny model lacks.
//!
//! PixelLM starts from CLIP, whose features already name the objects in an image. The
//! tiny tower starts from noise, and stage 1's losses barely ask it to recognize
//! anything: the question names the category ("Find the plant ..."), so the text can
//! copy it, and a mask decoder that finds *some* object lowers BCE and Dice almost as
//! much as one that finds the right one. Measured on the world (`popen probe-embeddings`,
//! 800 steps without these heads): the target regions' features name their category for
//! 30 % of targets by nearest neighbour, where a colour histogram of the same pixels
//! names 81 %; the segmentation embeddings `f` of all targets have cosine 0.78 with each
//! other whatever their categories; and 55 % of the predicted masks land on an object of
//! another category.
//!
//! - The **patch head** maps each patch's feature (the decoder's level-0 ViT state) to
//!   `1 + C` classes (0 = background, then the config's `classes`), trained with
//!   cross-entropy on one label per patch read from the scene's annotated objects (the
//!   world's `ann_list`, or MUSE's): the tower learns to recognize.
//! - The **seg-class head** maps a target's `f` (its L scale embeddings side by side) to
//!   the same classes, trained on the target's category: `f` keeps the category the
//!   answer names, so the decoder has something to select with.
//!
//! Both are used only for these losses: inference never reads them.
//!
//! A patch's label ([`patch_labels`]): background if no object pixel falls in it; else
//! the category with the most pixels there if that covers at least [`MIN_SHARE`] of the
//! patch; else ignored (a patch mostly background with a sliver of object teaches
//! nothing either way). Patches of the padding are background.  A category outside
//! `classes` is ignored wherever it would label.
use super::preprocess::Pixels;
use crate::backend::Backend;
use crate::data::sample::Target;
use crate::error::Result;
use crate::kernels::logprob::IGNORE_INDEX;
use crate::nn::Linear;
use num_traits::Float;

/// Category labels of one example: one per patch and one per target (classes as in
/// [`patch_labels`]; empty = none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Classes {
    /// Patch-head labels, `grid × grid` row-major ([`patch_labels`]).
    pub patches: Vec<i32>,
    /// Seg-class-head labels, one per target in answer order ([`target_labels`]).
    pub targets: Vec<i32>,
    /// Place-head labels, one per target in answer order ([`place_labels`]; empty
    /// without the head).
    pub places: Vec<i32>,
}

/// One label per target for the place head: the patch of the `grid × grid` tower input
/// (row-major, as [`pixel_patches`]) that holds the target's centroid, or
/// [`IGNORE_INDEX`] for an empty mask.  The centroid is the mean of the mask's pixel
/// centres, taken to the pixel it falls in; a mask of another size than the image is
/// ignored too ([`super::data::example`] refuses such a sample before this).
pub fn place_labels(targets: &[Target], px: &Pixels, grid: usize) -> Vec<i32> {
    if grid == 0 {
        return vec![IGNORE_INDEX; targets.len()];
    }
    let cell = pixel_patches(px, grid);
    targets
        .iter()
        .map(|t| {
            if (t.mask.height, t.mask.width) != (px.height, px.width) {
                return IGNORE_INDEX;
            }
            let (mut n, mut sy, mut sx) = (0u64, 0u64, 0u64);
            for (i, &v) in t.mask.data.iter().enumerate() {
                if v == 1 {
                    n += 1;
                    sy += (i / px.width) as u64;
                    sx += (i % px.width) as u64;
                }
            }
            if n == 0 {
                return IGNORE_INDEX;
            }
            // the mean of the pixel centres (i + 0.5), then the pixel it falls in
            let y = ((sy as f64 / n as f64 + 0.5) as usize).min(px.height - 1);
            let x = ((sx as f64 / n as f64 + 0.5) as usize).min(px.width - 1);
            cell[y * px.width + x] as i32
        })
        .collect()
}

/// One label per target: `1 + ` its index in `classes`, or [`IGNORE_INDEX`].
pub fn target_labels(targets: &[Target], classes: &[String]) -> Vec<i32> {
    targets
        .iter()
        .map(|t| {
            classes
                .iter()
                .position(|c| *c == t.category)
                .map_or(IGNORE_INDEX, |k| 1 + k as i32)
        })
        .collect()
}

/// Smallest share of a patch an object category must cover to label it.
pub const MIN_SHARE: f64 = 0.25;

/// One label per patch of the `grid × grid` tower input (row-major), for the objects of
/// one image at its own size; `classes` are the head's categories (an object of
/// another category makes its patches ignored).  An object whose mask is not the
/// image's size adds nothing here: [`super::data::example`] refuses such a sample.
pub fn patch_labels(objects: &[Target], px: &Pixels, grid: usize, classes: &[String]) -> Vec<i32> {
    let n = grid * grid;
    if n == 0 {
        return Vec::new();
    }
    let cell = pixel_patches(px, grid);
    // image pixels per patch, and object pixels per (patch, class); class C = unknown
    let c = classes.len();
    let mut pixels = vec![0u32; n];
    for &p in &cell {
        pixels[p] += 1;
    }
    let mut counts = vec![0u32; n * (c + 1)];
    for o in objects {
        if (o.mask.height, o.mask.width) != (px.height, px.width) {
            continue;
        }
        let k = classes.iter().position(|x| *x == o.category).unwrap_or(c);
        for (&p, &v) in cell.iter().zip(&o.mask.data) {
            if v == 1 {
                counts[p * (c + 1) + k] += 1;
            }
        }
    }
    (0..n)
        .map(|p| {
            let row = &counts[p * (c + 1)..(p + 1) * (c + 1)];
            if row.iter().all(|&x| x == 0) {
                return 0;
            }
            let (k, &best) = row
                .iter()
                .enumerate()
                .max_by_key(|&(k, &x)| (x, std::cmp::Reverse(k)))
                .expect("c + 1 > 0");
            if k < c && best as f64 >= MIN_SHARE * pixels[p].max(1) as f64 {
                1 + k as i32
            } else {
                IGNORE_INDEX
            }
        })
        .collect()
}

/// Per pixel of the image at its own size (row-major), the patch of the `grid × grid`
/// tower input its centre falls in, through the resize into the padded square.
pub fn pixel_patches(px: &Pixels, grid: usize) -> Vec<usize> {
    if grid == 0 {
        return vec![0; px.height * px.width];
    }
    // the resized image fills valid_h × valid_w of the S × S square
    let side = px.valid_h.max(px.valid_w) as f64;
    let at = |i: usize, valid: usize, size: usize| {
        let v = (i as f64 + 0.5) * valid as f64 / size as f64;
        ((v / side * grid as f64) as usize).min(grid - 1)
    };
    let cols: Vec<usize> = (0..px.width).map(|x| at(x, px.valid_w, px.width)).collect();
    (0..px.height)
        .flat_map(|y| {
            let row = at(y, px.valid_h, px.height) * grid;
            cols.iter().map(move |&c| row + c)
        })
        .collect()
}

/// What a head's forward keeps for its backward.
pub struct HeadActs<Buf> {
    /// the head's input (N, width): patch features or segmentation embeddings
    x: Buf,
    logits: Buf,
    lse: Buf,
    /// per row: the label, or [`IGNORE_INDEX`]
    labels: Vec<i32>,
    /// labelled rows
    n: usize,
}

/// Mean cross-entropy over the labelled rows of `x` (N, width) under `head`
/// (width → classes), and the activations for [`backward`]; `None` when no row is
/// labelled.
pub fn forward<F: Float, B: Backend<F>>(
    be: &B,
    head: &Linear<F, B>,
    x: B::Buf,
    labels: Vec<i32>,
) -> Result<Option<(f64, HeadActs<B::Buf>)>> {
    let n = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if n == 0 {
        return Ok(None);
    }
    let v = head.fan_out();
    let logits = head.forward(be, &x)?;
    let rows = labels.len();
    let (mut logp, mut lse) = (be.zeros(rows), be.zeros(rows));
    be.logprob_fwd(&logits, &labels, v, &mut logp, &mut lse)?;
    let lp = be.to_vec(&logp);
    let ce = -labels
        .iter()
        .zip(&lp)
        .filter(|(&l, _)| l != IGNORE_INDEX)
        .map(|(_, x)| x.to_f64().unwrap_or(f64::NAN))
        .sum::<f64>()
        / n as f64;
    Ok(Some((
        ce,
        HeadActs {
            x,
            logits,
            lse,
            labels,
            n,
        },
    )))
}

/// forward: `L = −1/n Σ_labelled log softmax(x Wᵀ + b)[label]`
/// so: `∂L/∂logp = −w/n` on the labelled rows, through the log-prob backward and the
/// linear map; the head's gradients accumulate and `∂(w·L)/∂x` (N, width) is returned.
pub fn backward<F: Float, B: Backend<F>>(
    be: &B,
    head: &mut Linear<F, B>,
    a: &HeadActs<B::Buf>,
    w: f64,
) -> Result<B::Buf> {
    let v = head.fan_out();
    let g = F::from(-w / a.n as f64).unwrap();
    let dlogp: Vec<F> = a
        .labels
        .iter()
        .map(|&l| if l == IGNORE_INDEX { F::zero() } else { g })
        .collect();
    let mut dlogits = be.zeros(a.labels.len() * v);
    be.logprob_bwd(
        &a.logits,
        &a.labels,
        v,
        &a.lse,
        &be.from_slice(&dlogp),
        &mut dlogits,
    )?;
    Ok(head
        .backward(be, &a.x, &dlogits, true)?
        .expect("dx was asked for"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mask::Mask;

    fn object(category: &str, h: usize, w: usize, on: impl Fn(usize, usize) -> bool) -> Target {
        let data = (0..h * w).map(|i| u8::from(on(i / w, i % w))).collect();
        Target {
            category: category.into(),
            mask: Mask {
                height: h,
                width: w,
                data,
            },
        }
    }

    /// An 8 × 16 image in a 16 × 16 square (rows 8.. are padding), patches of 8
    /// (grid 2): patch 0 is half a cup, patch 1 holds a sliver of an apple (1 of 64
    /// pixels) and a quarter of an unknown category; patches 2 and 3 are padding.
    #[test]
    fn labels_follow_the_majority_share_rule() {
        let (h, w) = (8, 16);
        let px = Pixels {
            data: Vec::new(),
            valid_h: 8,
            valid_w: 16,
            height: h,
            width: w,
        };
        let classes = vec!["apple".to_string(), "cup".to_string()];
        let cup = object("cup", h, w, |_, x| x < 4);
        let apple = object("apple", h, w, |y, x| y == 0 && x == 8);
        let lamp = object("lamp", h, w, |y, x| y < 4 && (12..16).contains(&x));
        let l = patch_labels(&[cup.clone(), apple.clone(), lamp], &px, 2, &classes);
        assert_eq!(l, vec![2, IGNORE_INDEX, 0, 0]);
        // the apple alone: a sliver under MIN_SHARE is ignored, not background
        assert_eq!(
            patch_labels(&[apple], &px, 2, &classes),
            vec![0, IGNORE_INDEX, 0, 0]
        );
        // exactly a quarter of a known category labels the patch
        let quarter = object("apple", h, w, |y, x| y < 4 && x >= 12);
        assert_eq!(
            patch_labels(&[quarter, cup], &px, 2, &classes),
            vec![2, 1, 0, 0]
        );
    }

    /// The place label is the patch of the mask's centroid, not of its first or most
    /// pixels; an empty mask is ignored.
    #[test]
    fn place_labels_take_the_centroid_patch() {
        // a 16 × 16 image filling its square, patches of 8 (grid 2)
        let (h, w) = (16, 16);
        let px = Pixels {
            data: Vec::new(),
            valid_h: 16,
            valid_w: 16,
            height: h,
            width: w,
        };
        // an L with 8 pixels in patch 0 (row 0, x < 8) and 7 in patch 1 (x = 15, rows
        // 1..8), whose centroid (y 1.87, x 8.87) is in patch 1
        let l_shape = object("cup", h, w, |y, x| {
            (y == 0 && x < 8) || ((1..8).contains(&y) && x == 15)
        });
        // rows 9..16, x 9..16: centroid (12, 12), patch row 1, column 1
        let right = object("cup", h, w, |y, x| y > 8 && x > 8);
        let empty = object("cup", h, w, |_, _| false);
        assert_eq!(
            place_labels(&[l_shape, right, empty], &px, 2),
            vec![1, 3, IGNORE_INDEX]
        );
        // the left three columns: centroid (7.5, 1) → pixel (8, 1), patch row 1, column 0
        let left = object("cup", h, w, |_, x| x < 3);
        assert_eq!(place_labels(std::slice::from_ref(&left), &px, 2), vec![2]);
        // the image shown in the top half of the square (valid 8 × 16): every image row
        // lies in patch row 0, so the bottom-right corner is patch 1, not 3
        let top = Pixels {
            valid_h: 8,
            ..px.clone()
        };
        let corner = object("cup", h, w, |y, x| y >= 12 && x >= 12);
        assert_eq!(place_labels(std::slice::from_ref(&corner), &px, 2), vec![3]);
        assert_eq!(place_labels(&[corner], &top, 2), vec![1]);
        assert_eq!(place_labels(&[left], &px, 0), vec![IGNORE_INDEX]);
    }

    /// A resized image: its pixels land in the patches of the resized frame.
    #[test]
    fn labels_map_the_image_into_the_resized_frame() {
        // 4 × 8 image shown at 8 × 16 in a 16 × 16 square; the object is its right half
        let px = Pixels {
            data: Vec::new(),
            valid_h: 8,
            valid_w: 16,
            height: 4,
            width: 8,
        };
        let o = object("cup", 4, 8, |_, x| x >= 4);
        assert_eq!(
            patch_labels(&[o], &px, 2, &["cup".into()]),
            vec![0, 1, 0, 0]
        );
    }
}
