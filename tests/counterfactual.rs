//! Stage 1's counterfactual mix (`[data] erased`) through the data pipeline: each
//! counterfactual example is its question's image with the targets painted out and
//! nothing else changed, answered without a `<seg>`, and it moves like any example
//! under `[data] shift`.
use popen::data::world::{write_dataset, Split, WorldConfig};
use popen::method::counterfactual::counterfactual_items;
use popen::method::sft::{training_samples, SftData};
use popen::model::seg::data::corpus;
use popen::model::seg::SegTokenizer;
use popen::train::{visit_draw, Dataset};

mod common;

#[test]
fn a_counterfactual_example_is_its_image_without_the_targets_and_answers_nothing() {
    let dir = common::cli::tmp("counterfactual", "world");
    let world = WorldConfig {
        height: 48,
        width: 64,
        questions: 3,
    };
    write_dataset(&dir, &world, 5, Split::Train, 4, &|| {}).unwrap();
    let samples = training_samples(&dir.join("train.json"), &None).unwrap();
    let mut cfg = common::seg::tiny_cfg();
    cfg.image_size = 64; // the 48 × 64 images fill it unscaled
    cfg.lvlm.patch_size = 16;
    cfg.lvlm.max_positions = 512;
    cfg.lvlm.vocab_size = 300;
    let mut classes: Vec<String> = samples
        .iter()
        .flat_map(|s| s.objects.iter().map(|o| o.category.clone()))
        .collect();
    classes.sort();
    classes.dedup();
    cfg.classes = classes;
    let tok = SegTokenizer::train(&corpus(&samples), 300, cfg.group_len()).unwrap();
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
    let (h, w) = (world.height, world.width);
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
