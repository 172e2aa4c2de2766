//! Stage 1's counterfactual mix (`[data] erased`, ours, off by default): a share of
//! the training questions with targets asked once more about their own image with
//! every target painted out ([`erase_objects`]), answered with one of the world's
//! no-target answers.
//!
//! **Why.** The presence mix asks about absent categories on other scenes, and a model
//! can answer those from the scene as a whole: at 2000 steps it rejects absent objects
//! that never come with the scene and not those that usually do (docs/stage2.md).  A
//! counterfactual pair is the same scene with and without the objects the question is
//! about, so nothing but the objects can decide between the two answers.
//!
//! **Why "nothing" is right.** A question's targets are every object of its image that
//! answers it (the world lists them all), so with all of them painted out none is left.
//! The painted objects leave the object list too, so the patch head is not taught a
//! category where it was painted over.  Real data sets whose answers do not list every
//! matching object would make the mix wrong; it is for the world.
//!
//! The picks and answers are seeded by the training seed and the question's index, so a
//! run's data do not depend on the thread count or on a resume.
use crate::data::erase::erase_objects;
use crate::data::mask::Mask;
use crate::data::sample::{load_image, Sample};
use crate::data::world::instructions::NO_TARGET_ANSWERS;
use crate::data::world::rng::{mix, Rng};
use crate::error::{Error, Result};
use image::RgbImage;

/// One counterfactual question: the sample as asked about the painted image, and the
/// masks painted out.
#[derive(Clone, Debug, PartialEq)]
pub struct Counterfactual {
    /// The question with a no-target answer, no targets, and the objects left.
    pub sample: Sample,
    /// The targets' masks, painted out of the image.
    pub erase: Vec<Mask>,
}

impl Counterfactual {
    /// The question's image with its targets painted out.
    pub fn image(&self) -> Result<RgbImage> {
        let masks: Vec<&Mask> = self.erase.iter().collect();
        erase_objects(&load_image(&self.sample)?, &masks)
    }
}

/// The counterfactual questions for `samples`: each question with targets and an answer
/// text is picked with chance `fraction`.  `fraction` outside [0, 1] is an error naming
/// `[data] erased`.
pub fn counterfactual_items(
    samples: &[Sample],
    fraction: f32,
    seed: u64,
) -> Result<Vec<Counterfactual>> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::arg(
            "[data] erased",
            format!("a fraction of the questions with targets, in [0, 1]; got {fraction}"),
        ));
    }
    if fraction == 0.0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        if s.targets.is_empty() || s.answer.is_none() {
            continue;
        }
        let mut rng = Rng::new(mix(&[seed, i as u64, 0x6572_6173_6564]));
        if !rng.chance(fraction) {
            continue;
        }
        let erase: Vec<Mask> = s.targets.iter().map(|t| t.mask.clone()).collect();
        let sample = Sample {
            answer: Some(rng.pick(&NO_TARGET_ANSWERS).to_string()),
            targets: Vec::new(),
            objects: (s.objects.iter())
                .filter(|o| !erase.contains(&o.mask))
                .cloned()
                .collect(),
            ..s.clone()
        };
        out.push(Counterfactual { sample, erase });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::counterfactual_items;
    use crate::data::mask::Mask;
    use crate::data::sample::{Sample, Target};
    use crate::data::world::instructions::NO_TARGET_ANSWERS;
    use std::path::PathBuf;

    fn target(cat: &str, y: usize) -> Target {
        Target {
            category: cat.into(),
            mask: Mask::from_fn(4, 4, |yy, _| yy == y),
        }
    }

    fn sample(i: usize, targets: Vec<Target>, objects: Vec<Target>) -> Sample {
        Sample {
            image_id: format!("{i}"),
            image_path: PathBuf::from(format!("{i}.png")),
            height: 4,
            width: 4,
            question: "What can I eat?".into(),
            question_index: 0,
            answer: Some("You can eat the apple <seg>.".into()),
            targets,
            objects,
        }
    }

    #[test]
    fn counterfactuals_paint_the_targets_out_and_answer_nothing() {
        let (apple, apple2, cup) = (target("apple", 0), target("apple", 1), target("cup", 2));
        let with = |i| {
            sample(
                i,
                vec![apple.clone()],
                vec![apple.clone(), apple2.clone(), cup.clone()],
            )
        };
        let mut s: Vec<Sample> = (0..200).map(with).collect();
        s[3].targets.clear(); // no target: never picked
        s[5].answer = None; // no answer text: never picked
        let all = counterfactual_items(&s, 1.0, 7).unwrap();
        assert_eq!(all.len(), 198);
        for c in &all {
            assert!(NO_TARGET_ANSWERS.contains(&c.sample.answer.as_deref().unwrap()));
            assert!(c.sample.targets.is_empty());
            assert_eq!(c.erase, vec![apple.mask.clone()]);
            // the painted apple leaves the objects; the other apple and the cup stay
            assert_eq!(c.sample.objects, vec![apple2.clone(), cup.clone()]);
            assert_eq!(c.sample.question, "What can I eat?");
        }
        let ids: Vec<&str> = all.iter().map(|c| c.sample.image_id.as_str()).collect();
        assert!(!ids.contains(&"3") && !ids.contains(&"5"));
        // a share picks about that share, the same ones for the same seed
        let some = counterfactual_items(&s, 0.25, 7).unwrap();
        assert!((30..70).contains(&some.len()), "{}", some.len());
        assert_eq!(some, counterfactual_items(&s, 0.25, 7).unwrap());
        assert_ne!(some, counterfactual_items(&s, 0.25, 8).unwrap());
        assert!(counterfactual_items(&s, 0.0, 7).unwrap().is_empty());
        // outside [0, 1]: an error naming the setting
        for bad in [-0.1, 1.5, f32::NAN] {
            let e = counterfactual_items(&s, bad, 7).unwrap_err().to_string();
            assert!(e.contains("[data] erased"), "{e}");
        }
    }
}
