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
//! [`ContrastPick`] chooses one.  A `yc` that names no object ("There is nothing like
//! that in this image") has no contrast: whether "nothing" is right on another image
//! depends on what the question asks for, which the data does not say.
use crate::data::corrector::mentioned_objects;
use crate::data::sample::Sample;
use crate::model::seg::Example;
use serde::{Deserialize, Serialize};

/// A pair's contrast, as kept in `RUN/pt.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contrast {
    /// The question (index in the training file) whose image is `I'`.
    pub sample: usize,
    /// The reference's Eq. 3 log-prob of `yc` on `I'` (λ on `yc`'s changed tokens).
    pub ref_yc: f64,
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

#[cfg(test)]
mod tests {
    use super::{contrast_of, ContrastPick};
    use crate::data::mask::Mask;
    use crate::data::sample::{Sample, Target};
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
