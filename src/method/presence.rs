//! Stage 1's presence mix (`[data] presence_questions`, ours, not the paper's): per
//! training image, counting questions about categories that are present and as many
//! about categories that are absent, in the world's wording and answer forms
//! ([`count_qa`]).
//!
//! Why: the world asks counting questions about absent objects only in its no-target
//! family, so for "How many X are there?" the answer "X is here" is right four times
//! in five whatever the image shows.  A model trained on that mix never learns to look:
//! `popen score-answers` on `tools/presence_probe.py`'s probe finds its likelihood of
//! "nothing here" the same whether the named object is present or not (ROC AUC 52.7 %
//! after 800 steps, 48.8 % after 3000).  The paper's base has this from LLaVA-1.5's
//! instruction mix, whose VQA questions (VQAv2, GQA, …) ask about objects that are and
//! are not there; the tiny model trained from scratch gets it here.  The measurements
//! are in docs/stage2.md ("Why: the stage-1 model cannot tell whether a named object
//! is present").
//!
//! Absent categories are drawn uniformly from the world's categories not in the image;
//! the draws are seeded by the training seed and the image's index, so a run's data do
//! not depend on the thread count or on a resume.
use crate::data::sample::Sample;
use crate::data::world::categories::{by_name, CATEGORIES};
use crate::data::world::centroid;
use crate::data::world::instructions::{count_qa, ObjView};
use crate::data::world::rng::{mix, Rng};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// The presence questions for the images of `samples` (each image once, in first-seen
/// order; the questions follow the image's own, numbered after them).  Every object
/// category must be one of the world's (the wording and plural forms are its); a
/// category it does not know is an error naming it and `data` (the training file).
pub fn presence_samples(
    samples: &[Sample],
    per_image: usize,
    seed: u64,
    data: &Path,
) -> Result<Vec<Sample>> {
    if per_image == 0 {
        return Ok(Vec::new());
    }
    // each image once, in first-seen order, with the number after its last question
    let mut images: Vec<(&Sample, usize)> = Vec::new();
    let mut seen: HashMap<&Path, usize> = HashMap::new();
    for s in samples {
        match seen.get(s.image_path.as_path()) {
            Some(&k) => images[k].1 = images[k].1.max(s.question_index + 1),
            None => {
                seen.insert(&s.image_path, images.len());
                images.push((s, s.question_index + 1));
            }
        }
    }
    let mut out = Vec::new();
    for (i, &(s, first_index)) in images.iter().enumerate() {
        let mut objs = Vec::with_capacity(s.objects.len());
        for o in &s.objects {
            let category = by_name(&o.category).ok_or_else(|| Error::Config {
                path: data.to_path_buf(),
                field: "data.presence_questions".into(),
                msg: format!(
                    "object category {:?} of {} is not one of the world's, whose wording \
                     the presence questions use: set it to 0 for this data",
                    o.category,
                    s.image_path.display()
                ),
            })?;
            objs.push(ObjView {
                category,
                colour: "",
                centre: centroid(&o.mask),
            });
        }
        let mut present: Vec<usize> = objs.iter().map(|o| o.category).collect();
        present.sort_unstable();
        present.dedup();
        let mut absent: Vec<usize> = (0..CATEGORIES.len())
            .filter(|c| present.binary_search(c).is_err())
            .collect();
        let mut rng = Rng::new(mix(&[seed, i as u64, 0x70_7265_7365_6e63]));
        rng.shuffle(&mut present);
        rng.shuffle(&mut absent);
        let asked = present
            .iter()
            .take(per_image)
            .chain(absent.iter().take(per_image));
        for (k, &cat) in asked.enumerate() {
            let qa = count_qa(&objs, cat, &mut rng);
            out.push(Sample {
                question: qa.question,
                question_index: first_index + k,
                answer: Some(qa.answer),
                targets: qa.targets.iter().map(|&t| s.objects[t].clone()).collect(),
                ..s.clone()
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mask::Mask;
    use crate::data::sample::{Target, SEG};
    use crate::data::world::instructions::NO_TARGET_ANSWERS;

    /// A 4 × 8 image: each object one pixel at (x, 0).
    fn obj(category: &str, x: usize) -> Target {
        let mut data = vec![0u8; 32];
        data[x] = 1;
        Target {
            category: category.into(),
            mask: Mask {
                height: 4,
                width: 8,
                data,
            },
        }
    }

    fn sample(image: &str, q: usize, objects: Vec<Target>) -> Sample {
        Sample {
            image_id: image.into(),
            image_path: image.into(),
            height: 4,
            width: 8,
            question: format!("q{q}"),
            question_index: q,
            answer: Some("a".into()),
            targets: vec![],
            objects,
        }
    }

    #[test]
    fn present_and_absent_questions_answered_for_the_scene() {
        // apples at x = 5 and x = 1 (listed right first), one cup; two questions each
        let objs = vec![obj("apple", 5), obj("cup", 3), obj("apple", 1)];
        let data = vec![
            sample("a.png", 0, objs.clone()),
            sample("a.png", 1, objs.clone()),
            sample("b.png", 0, vec![obj("lamp", 2)]),
        ];
        let out = presence_samples(&data, 2, 7, Path::new("train.json")).unwrap();
        // a.png: 2 present + 2 absent; b.png: 1 present (only one there) + 2 absent
        assert_eq!(out.len(), 7);
        let (a, b): (Vec<_>, Vec<_>) = out.iter().partition(|s| s.image_path == *"a.png");
        let idx: Vec<usize> = a.iter().map(|s| s.question_index).collect();
        assert_eq!(
            idx,
            [2, 3, 4, 5],
            "numbered after the image's own questions"
        );
        assert_eq!(
            b.iter().map(|s| s.question_index).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let mut asked = std::collections::BTreeSet::new();
        for s in &out {
            let ans = s.answer.as_deref().unwrap();
            assert_eq!(ans.matches(SEG).count(), s.targets.len(), "{ans}");
            let here: Vec<&Target> = s.objects.iter().collect();
            let cat = CATEGORIES
                .iter()
                .filter(|c| s.question.contains(c.plural))
                .max_by_key(|c| c.plural.len())
                .unwrap_or_else(|| panic!("no category in {:?}", s.question));
            assert!(asked.insert((s.image_id.clone(), cat.name)), "asked twice");
            let n = here.iter().filter(|o| o.category == cat.name).count();
            assert_eq!(s.targets.len(), n, "{} / {ans}", s.question);
            if n == 0 {
                assert!(NO_TARGET_ANSWERS.contains(&ans), "{ans}");
            } else {
                assert!(ans.contains(cat.name) || ans.contains(cat.plural), "{ans}");
                assert!(s.targets.iter().all(|t| t.category == cat.name));
            }
        }
        // the two apples, left to right
        let apples = a.iter().find(|s| s.targets.len() == 2).unwrap();
        assert_eq!(
            apples.answer.as_deref(),
            Some("There are two apples <seg> <seg>.")
        );
        assert_eq!(apples.targets[0].mask.data[1], 1);
        assert_eq!(apples.targets[1].mask.data[5], 1);
        // the same seed gives the same questions, another seed others
        let again = presence_samples(&data, 2, 7, Path::new("train.json")).unwrap();
        assert_eq!(again, out);
        let other = presence_samples(&data, 2, 8, Path::new("train.json")).unwrap();
        assert_ne!(other, out);
        // off: nothing added
        assert!(presence_samples(&data, 0, 7, Path::new("train.json"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_category_the_world_does_not_know_is_named() {
        let data = vec![sample("a.png", 0, vec![obj("zebra", 1)])];
        let e = presence_samples(&data, 1, 0, Path::new("train.json")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("data.presence_questions"), "{msg}");
        assert!(msg.contains("zebra") && msg.contains("train.json"), "{msg}");
    }
}
