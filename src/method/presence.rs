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
//! Absent categories are drawn from the world's categories not in the image, as
//! [`AbsentDraw`] says: uniformly (the default), or in proportion to how often each
//! occurs beside the image's own categories in the training data (`cooccur`: the
//! tempting objects, which are the ones the model names when it hallucinates).  The
//! draws are seeded by the training seed and the image's index, so a run's data do not
//! depend on the thread count or on a resume.
use crate::data::sample::Sample;
use crate::data::world::categories::{by_name, CATEGORIES};
use crate::data::world::centroid;
use crate::data::world::instructions::{count_qa, ObjView};
use crate::data::world::rng::{mix, Rng};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// How stage 1's presence mix picks the absent categories it asks about
/// (`[data] presence_absent`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbsentDraw {
    /// Every category not in the image alike.
    #[default]
    Uniform,
    /// Category `c` with weight `Σ_p n(p, c)` over the image's present categories `p`,
    /// where `n(p, c)` counts the training images holding both (each image once): the
    /// objects that usually come with what is there.  Where every weight is 0, uniform.
    Cooccur,
}

/// The presence questions for the images of `samples` (each image once, in first-seen
/// order; the questions follow the image's own, numbered after them).  Every object
/// category must be one of the world's (the wording and plural forms are its); a
/// category it does not know is an error naming it and `data` (the training file).
/// `draw` picks the absent categories ([`AbsentDraw`]).
pub fn presence_samples(
    samples: &[Sample],
    per_image: usize,
    draw: AbsentDraw,
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
    // each image's objects as the world's instruction code sees them
    let mut views: Vec<Vec<ObjView>> = Vec::with_capacity(images.len());
    for &(s, _) in &images {
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
        views.push(objs);
    }
    let presents: Vec<Vec<usize>> = views
        .iter()
        .map(|objs| {
            let mut p: Vec<usize> = objs.iter().map(|o| o.category).collect();
            p.sort_unstable();
            p.dedup();
            p
        })
        .collect();
    let n = CATEGORIES.len();
    let cooc = match draw {
        AbsentDraw::Uniform => Vec::new(),
        AbsentDraw::Cooccur => cooccurrence(&presents, n),
    };
    let mut out = Vec::new();
    for (i, (&(s, first_index), objs)) in images.iter().zip(&views).enumerate() {
        let mut present = presents[i].clone();
        let mut absent: Vec<usize> = (0..n)
            .filter(|c| present.binary_search(c).is_err())
            .collect();
        let mut rng = Rng::new(mix(&[seed, i as u64, 0x70_7265_7365_6e63]));
        rng.shuffle(&mut present);
        match draw {
            AbsentDraw::Uniform => rng.shuffle(&mut absent),
            AbsentDraw::Cooccur => {
                let w: Vec<f32> = absent
                    .iter()
                    .map(|&c| present.iter().map(|&p| cooc[p * n + c] as f32).sum())
                    .collect();
                absent = draw_without_replacement(&absent, w, per_image, &mut rng);
            }
        }
        let asked = present
            .iter()
            .take(per_image)
            .chain(absent.iter().take(per_image));
        for (k, &cat) in asked.enumerate() {
            let qa = count_qa(objs, cat, &mut rng);
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

/// `n × n` counts of the images holding both categories (each image's categories
/// sorted and distinct); the diagonal counts the images holding the category.
fn cooccurrence(presents: &[Vec<usize>], n: usize) -> Vec<u32> {
    let mut m = vec![0u32; n * n];
    for p in presents {
        for &a in p {
            for &b in p {
                m[a * n + b] += 1;
            }
        }
    }
    m
}

/// Up to `k` of `items`, each drawn with probability proportional to its weight among
/// those not yet drawn ([`Rng::weighted`]: uniform once every weight left is 0).
fn draw_without_replacement(
    items: &[usize],
    mut w: Vec<f32>,
    k: usize,
    rng: &mut Rng,
) -> Vec<usize> {
    let mut left: Vec<usize> = items.to_vec();
    let mut out = Vec::with_capacity(k.min(left.len()));
    while out.len() < k && !left.is_empty() {
        let j = rng.weighted(&w);
        out.push(left.swap_remove(j));
        w.swap_remove(j);
    }
    out
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
        let out =
            presence_samples(&data, 2, AbsentDraw::Uniform, 7, Path::new("train.json")).unwrap();
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
        let again =
            presence_samples(&data, 2, AbsentDraw::Uniform, 7, Path::new("train.json")).unwrap();
        assert_eq!(again, out);
        let other =
            presence_samples(&data, 2, AbsentDraw::Uniform, 8, Path::new("train.json")).unwrap();
        assert_ne!(other, out);
        // off: nothing added
        assert!(
            presence_samples(&data, 0, AbsentDraw::Uniform, 7, Path::new("train.json"))
                .unwrap()
                .is_empty()
        );
    }

    /// `cooccur` asks about the categories that come with the image's own: with apples
    /// always beside bananas in the data, an image of apples alone is asked about
    /// bananas, whatever the seed (uniform would pick them one time in 32).
    #[test]
    fn cooccur_asks_about_what_usually_comes_with_the_scene() {
        let mut data: Vec<Sample> = (0..5)
            .map(|i| {
                sample(
                    &format!("{i}.png"),
                    0,
                    vec![obj("apple", 1), obj("banana", 3)],
                )
            })
            .collect();
        data.push(sample("alone.png", 0, vec![obj("apple", 2)]));
        // two more that never meet the apple: their categories weigh nothing for it
        data.push(sample("x.png", 0, vec![obj("lamp", 1), obj("violin", 4)]));
        let absent_asked = |draw, seed| {
            let out = presence_samples(&data, 1, draw, seed, Path::new("train.json")).unwrap();
            let q = out
                .iter()
                .find(|s| s.image_path == *"alone.png" && s.targets.is_empty())
                .expect("an absent question for alone.png");
            q.question.clone()
        };
        let mut uniform_banana = 0;
        for seed in 0..40 {
            let q = absent_asked(AbsentDraw::Cooccur, seed);
            assert!(q.contains("bananas"), "seed {seed}: {q}");
            uniform_banana += absent_asked(AbsentDraw::Uniform, seed).contains("bananas") as usize;
        }
        assert!(
            uniform_banana < 10,
            "uniform asked about bananas {uniform_banana} / 40"
        );
        // where no absent category ever met a present one, the draw is uniform
        let out = presence_samples(&data, 3, AbsentDraw::Cooccur, 1, Path::new("t.json")).unwrap();
        let x: Vec<&Sample> = out
            .iter()
            .filter(|s| s.image_path == *"x.png" && s.targets.is_empty())
            .collect();
        assert_eq!(x.len(), 3, "three absent questions for x.png");
    }

    #[test]
    fn draws_without_replacement_follow_the_weights() {
        let items: Vec<usize> = (0..6).collect();
        let mut rng = Rng::new(3);
        let mut first = [0usize; 6];
        for _ in 0..3000 {
            let got = draw_without_replacement(&items, vec![0., 1., 0., 3., 0., 0.], 4, &mut rng);
            assert_eq!(got.len(), 4);
            let mut d = got.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 4, "distinct: {got:?}");
            // the two weighted items come first, then the zero-weight ones uniformly
            let mut head = got[..2].to_vec();
            head.sort_unstable();
            assert_eq!(head, [1, 3], "{got:?}");
            first[got[0]] += 1;
        }
        // item 3 first with probability 3/4
        let p3 = first[3] as f64 / 3000.0;
        assert!((p3 - 0.75).abs() < 0.03, "P(3 first) = {p3}");
        assert!(draw_without_replacement(&items, vec![1.0; 6], 9, &mut rng).len() == 6);
    }

    #[test]
    fn a_category_the_world_does_not_know_is_named() {
        let data = vec![sample("a.png", 0, vec![obj("zebra", 1)])];
        let e = presence_samples(&data, 1, AbsentDraw::Uniform, 0, Path::new("train.json"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("data.presence_questions"), "{msg}");
        assert!(msg.contains("zebra") && msg.contains("train.json"), "{msg}");
    }
}
