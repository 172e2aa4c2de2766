//! The image-conditional preference (`[loss] image_pref`, ours, off by default): the
//! chosen answer `yc` on its own image against the same `yc` on another image that
//! lacks every object `yc` names.
//!
//! **Why.** `Lt` compares two answers on one image, and on the world its pairs teach
//! the words rather than the look: the DPO reward accuracy on the pairs reaches 0.8
//! while the objects the model names about a new image do not change, and asked about
//! another image, about half of what an answer names comes from the question
//! (docs/stage2.md).  Nothing in `Lt` asks the answer's likelihood to depend on the
//! image.  This term does, with DPO's own form (as mDPO's conditional preference does
//! with a corrupted image):
//!
//! ```text
//! L_img = −log σ(βt·[(log π(yc | I, x) − log πref(yc | I, x))
//!                    − (log π(yc | I', x) − log πref(yc | I', x))])
//! ```
//!
//! with Eq. 3's log-probs (λ on `yc`'s changed tokens, the corrected object words), the
//! mean over the pairs that have a contrast, weighted by `image_pref` in the stage-2
//! loss.  The reference's value on `I'` is computed once at collection and kept with
//! the pair (`RUN/pt.jsonl`, `contrast`), like `ref_yc`.
//!
//! **The contrast image `I'`.** Among the images of the training file that are another
//! file than the pair's and whose annotated objects include none of the categories
//! `yc` names (so `yc` is wrong on `I'` because what it names is not there),
//! [`ContrastPick`] chooses one; or, with [`ContrastPick::Erased`], `I'` is the pair's
//! own image with those objects painted over ([`crate::data::erase::erase_objects`]),
//! so that nothing but the named objects differs.  A `yc` that names no object ("There is nothing like
//! that in this image") has no contrast: whether "nothing" is right on another image
//! depends on what the question asks for, which the data does not say.
//!
//! **Measured** (docs/stage2.md): `next` and `similar` make the answers follow the
//! scene and name no fewer absent objects; `erased` lowers CHAIR by naming less
//! (recall and gIoU fall with it) without a better presence probe, and at weight 10
//! it breaks a stage-1 model that cannot tell the painted image from its own.
use crate::data::corrector::mentioned_objects;
use crate::data::erase::erase_objects;
use crate::data::mask::Mask;
use crate::data::sample::{load_image, Sample};
use crate::error::{Error, Result};
use crate::model::seg::{preprocess, Example, Pixels};
use serde::{Deserialize, Serialize};

/// A pair's contrast, as kept in `RUN/pt.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contrast {
    /// The question (index in the training file) whose image is `I'`.
    pub sample: usize,
    /// The reference's Eq. 3 log-prob of `yc` on `I'` (λ on `yc`'s changed tokens).
    pub ref_yc: f64,
    /// `I'` is `sample`'s image with what `yc` names painted over
    /// ([`ContrastPick::Erased`]); absent in files written before it (false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub erased: bool,
}

/// `yc` on the contrast image, ready to train: the text example and the reference's
/// value.
#[derive(Clone, Debug)]
pub struct ContrastRow {
    /// `(I', x, yc)`, text only.
    pub example: Example,
    /// The reference's Eq. 3 log-prob of `yc` on `I'`.
    pub ref_yc: f64,
}

/// Which image lacking `yc`'s objects is the contrast (`[loss] image_pref_contrast`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastPick {
    /// The first such image after the pair's question (cyclically, in the training
    /// file's order).
    #[default]
    Next,
    /// The one sharing the most categories with the pair's image (the first of equals
    /// after the pair's question): the same kind of scene without what `yc` names,
    /// where a tempting object would be hallucinated.
    Similar,
    /// The pair's own image with every annotated object of a category `yc` names
    /// painted over ([`crate::data::erase::erase_objects`]): the same scene, the same
    /// other objects, only what `yc` names gone.  A `yc` naming no annotated object of
    /// its image has none.
    Erased,
}

/// The index of the contrast question of question `i` with chosen answer `yc` (see the
/// module docs), or `None` when `yc` names no object or no other image lacks all it
/// names.
pub fn contrast_of(samples: &[Sample], i: usize, yc: &str, pick: ContrastPick) -> Option<usize> {
    let named = mentioned_objects(yc);
    let own = samples.get(i)?;
    if named.is_empty() {
        return None;
    }
    let mut candidates = (1..samples.len())
        .map(|d| (i + d) % samples.len())
        .filter(|&j| {
            let s = &samples[j];
            s.image_path != own.image_path && !s.objects.iter().any(|o| named.contains(&o.category))
        });
    match pick {
        ContrastPick::Erased => (own.objects.iter())
            .any(|o| named.contains(&o.category))
            .then_some(i),
        ContrastPick::Next => candidates.next(),
        ContrastPick::Similar => {
            let shared = |j: usize| {
                let mut cats: Vec<&str> = samples[j]
                    .objects
                    .iter()
                    .map(|o| o.category.as_str())
                    .collect();
                cats.sort_unstable();
                cats.dedup();
                cats.iter()
                    .filter(|c| own.objects.iter().any(|o| o.category == **c))
                    .count()
            };
            // max_by_key keeps the last of equals: reversed, that is the first
            let all: Vec<usize> = candidates.collect();
            all.into_iter().rev().max_by_key(|&j| shared(j))
        }
    }
}

/// The preprocessed contrast image `I'` of the pair on question `own` with chosen
/// answer `yc`: contrast `c`'s question's image, painted over when `c.erased`.
pub fn contrast_pixels(
    samples: &[Sample],
    own: usize,
    c: &Contrast,
    yc: &str,
    image_size: usize,
) -> Result<Pixels> {
    let other = samples.get(c.sample).ok_or_else(|| {
        Error::arg(
            "contrast_pixels",
            format!(
                "question {own}'s contrast names question {} of {}",
                c.sample,
                samples.len()
            ),
        )
    })?;
    let img = load_image(other)?;
    if !c.erased {
        return preprocess(&img, image_size);
    }
    let named = mentioned_objects(yc);
    let masks: Vec<&Mask> = other
        .objects
        .iter()
        .filter(|o| named.contains(&o.category))
        .map(|o| &o.mask)
        .collect();
    preprocess(&erase_objects(&img, &masks)?, image_size)
}

#[cfg(test)]
mod tests {
    use super::{contrast_of, contrast_pixels, Contrast, ContrastPick};
    use crate::data::erase::erase_objects;
    use crate::data::mask::Mask;
    use crate::data::sample::{Sample, Target};
    use crate::model::seg::preprocess;
    use image::RgbImage;
    use std::path::PathBuf;

    fn sample(image: &str, cats: &[&str]) -> Sample {
        Sample {
            image_id: image.into(),
            image_path: PathBuf::from(image),
            height: 2,
            width: 2,
            question: "What is here?".into(),
            question_index: 0,
            answer: None,
            targets: vec![],
            objects: cats
                .iter()
                .map(|c| Target {
                    category: c.to_string(),
                    mask: Mask::new(2, 2),
                })
                .collect(),
        }
    }

    #[test]
    fn the_contrast_lacks_every_named_object_and_is_another_image() {
        let s = [
            sample("a.png", &["cup", "apple"]),
            sample("a.png", &["cup", "apple"]), // same image: never its own contrast
            sample("b.png", &["cup"]),          // has the cup
            sample("c.png", &["apple", "book"]), // has the apple
            sample("d.png", &["book"]),         // lacks both
        ];
        let next = |i, yc| contrast_of(&s, i, yc, ContrastPick::Next);
        assert_eq!(next(0, "The cup <seg> and the apple <seg>."), Some(4));
        // one named object: the first image without it
        assert_eq!(next(0, "The apple <seg>."), Some(2));
        // cyclic: after the last question comes the first
        assert_eq!(next(4, "The book <seg>."), Some(0));
        // nothing named: no contrast
        assert_eq!(next(0, "There is nothing like that in this image."), None);
        // no such question
        assert_eq!(next(9, "The cup <seg>."), None);
        // every other image has a book or is the same image
        let t = [
            sample("a.png", &["book"]),
            sample("b.png", &["book", "cup"]),
        ];
        assert_eq!(
            contrast_of(&t, 0, "The book <seg>.", ContrastPick::Next),
            None
        );
        assert_eq!(
            contrast_of(&t, 0, "The book <seg>.", ContrastPick::Similar),
            None
        );
    }

    #[test]
    fn the_erased_contrast_is_the_own_image_when_it_holds_a_named_object() {
        let s = [
            sample("a.png", &["cup", "apple"]),
            sample("b.png", &["book"]),
        ];
        let erased = |i, yc| contrast_of(&s, i, yc, ContrastPick::Erased);
        assert_eq!(erased(0, "The apple <seg>."), Some(0));
        assert_eq!(erased(1, "The book <seg> and the cup <seg>."), Some(1));
        // nothing named, or nothing named is annotated in the image: nothing to erase
        assert_eq!(erased(0, "There is nothing like that in this image."), None);
        assert_eq!(erased(1, "The cup <seg>."), None);
    }

    #[test]
    fn the_contrast_pixels_paint_over_only_what_yc_names() {
        let dir = std::env::temp_dir().join(format!("popen-contrast-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (w, h) = (12usize, 8usize);
        // a grey image with a red cup (left) and a blue apple (right)
        let cup = Mask::from_fn(h, w, |y, x| (2..5).contains(&y) && (1..4).contains(&x));
        let apple = Mask::from_fn(h, w, |y, x| (2..5).contains(&y) && (7..10).contains(&x));
        let img = RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let (x, y) = (x as usize, y as usize);
            match (cup.get(y, x), apple.get(y, x)) {
                (1, _) => image::Rgb([250, 0, 0]),
                (_, 1) => image::Rgb([0, 0, 250]),
                _ => image::Rgb([90; 3]),
            }
        });
        let path = dir.join("a.png");
        img.save(&path).unwrap();
        let mut own = sample("a.png", &[]);
        (own.image_path, own.height, own.width) = (path, h, w);
        own.objects = vec![
            Target {
                category: "cup".into(),
                mask: cup.clone(),
            },
            Target {
                category: "apple".into(),
                mask: apple,
            },
        ];
        let samples = [own];
        let c = |erased| Contrast {
            sample: 0,
            ref_yc: 0.0,
            erased,
        };
        let yc = "The cup <seg>.";
        let plain = contrast_pixels(&samples, 0, &c(false), yc, 12).unwrap();
        let painted = contrast_pixels(&samples, 0, &c(true), yc, 12).unwrap();
        assert_eq!(plain.data, preprocess(&img, 12).unwrap().data);
        let mut grown = vec![false; h * w]; // the cup, grown by one pixel
        for (y, x) in (0..h).flat_map(|y| (0..w).map(move |x| (y, x))) {
            grown[y * w + x] = (1..6).contains(&y) && x < 5;
        }
        let expect = preprocess(&erase_objects(&img, &[&cup]).unwrap(), 12).unwrap();
        assert_eq!(painted.data, expect.data);
        // the cup's pixels changed and the apple's did not (the image fills the 12 × 12
        // input's first 8 rows unscaled, channel-major)
        for (y, x) in (0..h).flat_map(|y| (0..w).map(move |x| (y, x))) {
            let i = y * 12 + x; // red channel
            match grown[y * w + x] {
                true if cup.get(y, x) == 1 => assert_ne!(painted.data[i], plain.data[i]),
                true => {}
                false => assert_eq!(painted.data[i], plain.data[i], "({y}, {x})"),
            }
        }
        // a contrast naming a question the file does not have is an error naming both
        let bad = Contrast {
            sample: 5,
            ..c(true)
        };
        let e = contrast_pixels(&samples, 0, &bad, yc, 12)
            .unwrap_err()
            .to_string();
        assert!(e.contains("question 5 of 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_similar_contrast_shares_the_most_categories() {
        let s = [
            sample("a.png", &["cup", "plate", "fork", "knife"]),
            sample("b.png", &["book"]), // shares nothing with a
            sample("c.png", &["plate", "plate", "fork"]), // shares two (plate once)
            sample("d.png", &["cup", "plate"]), // has the cup
            sample("e.png", &["fork", "knife"]), // shares two, later
        ];
        let similar = |i, yc| contrast_of(&s, i, yc, ContrastPick::Similar);
        assert_eq!(similar(0, "The cup <seg>."), Some(2));
        assert_eq!(
            contrast_of(&s, 0, "The cup <seg>.", ContrastPick::Next),
            Some(1)
        );
        // from d (question 3), a shares the most, though e comes first
        assert_eq!(similar(3, "The spoon <seg>."), Some(0));
        // nothing shared anywhere: the first after the question, as `next` picks
        assert_eq!(similar(1, "The book <seg>."), Some(2));
    }
}
