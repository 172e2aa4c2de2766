//! Stage 1's counterfactual mix (`[data] erased`) through the data pipeline: each
//! counterfactual example is its question's image with the targets painted out and
//! nothing else changed, answered without a `<seg>`, and it moves like any example
//! under `[data] shift`.
use popen::method::counterfactual::counterfactual_items;
use popen::method::sft::SftData;
use popen::train::{visit_draw, Dataset};

mod common;

#[test]
fn a_counterfactual_example_is_its_image_without_the_targets_and_answers_nothing() {
    let (samples, cfg, tok) = common::seg::world_data("counterfactual", 3);
    let cf = counterfactual_items(&samples, 1.0, 3).unwrap();
    let with_targets = samples.iter().filter(|s| !s.targets.is_empty()).count();
    assert_eq!(cf.len(), with_targets);
    let data = |shift| SftData {
        samples: samples.clone(),
        reread: Vec::new(),
        max_ids: 400,
        cfg: &cfg,
        tok: &tok,
        shift,
        counterfactual: cf.clone(),
    };
    let d = data(0);
    assert_eq!(d.len(), samples.len() + cf.len());
    let (h, w) = (48usize, 64usize); // the world's image size
    for (j, c) in cf.iter().enumerate() {
        let i = samples
            .iter()
            .position(|s| {
                s.image_path == c.sample.image_path && s.question_index == c.sample.question_index
            })
            .unwrap();
        let (orig, ex) = (d.load(i).unwrap(), d.load(samples.len() + j).unwrap());
        // the answer names nothing and has no mask to learn; the original has
        let answer = c.sample.answer.as_deref().unwrap();
        assert!(ex.masks.is_empty() && !answer.contains("<seg>"), "{answer}");
        assert_eq!(orig.masks.len(), c.erase.len());
        assert_ne!(ex.enc.ids, orig.enc.ids);
        // inside the targets the image changed; away from them (two pixels: the grown
        // rim, and the fill's reach) it is the original, channel by channel
        let near = |y: usize, x: usize| {
            c.erase.iter().any(|m| {
                (y.saturating_sub(1)..(y + 2).min(h))
                    .any(|yy| (x.saturating_sub(1)..(x + 2).min(w)).any(|xx| m.get(yy, xx) != 0))
            })
        };
        let s = cfg.image_size;
        let mut changed = 0;
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let k = ch * s * s + y * s + x;
                    if !near(y, x) {
                        assert_eq!(ex.pixels.data[k], orig.pixels.data[k], "({y}, {x}) of {j}");
                    } else if ex.pixels.data[k] != orig.pixels.data[k] {
                        changed += 1;
                    }
                }
            }
        }
        assert!(changed > 0, "counterfactual {j}: nothing painted");
    }
    // shifted visits of a counterfactual repeat for the same draw and keep its text
    let moved = data(3);
    let i = samples.len();
    let a = moved.load_augmented(i, visit_draw(7, 0, i)).unwrap();
    let b = moved.load_augmented(i, visit_draw(7, 0, i)).unwrap();
    assert_eq!(a.pixels.data, b.pixels.data);
    assert_eq!(a.enc.ids, d.load(i).unwrap().enc.ids);
}
