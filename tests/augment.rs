//! Stage 1's translation augmentation (`[data] shift`) through the data pipeline: a
//! visit of a world example moves its image and every mask by one drawn shift, loses
//! no mask pixel and keeps the text; the draw repeats for the same visit; `shift = 0`
//! is the plain example.
use popen::method::reread::Reread;
use popen::method::sft::SftData;
use popen::model::seg::augment::draw_shift;
use popen::model::seg::Example;
use popen::train::{visit_draw, Dataset};

mod common;

fn same(a: &Example, b: &Example) -> bool {
    a.pixels.data == b.pixels.data
        && a.enc.ids == b.enc.ids
        && a.masks == b.masks
        && a.classes.patches == b.classes.patches
        && a.classes.targets == b.classes.targets
}

#[test]
fn a_shifted_visit_moves_the_image_and_every_mask_and_keeps_the_text() {
    let (samples, cfg, tok) = common::seg::world_data("augment", 2);
    let data = |shift| SftData {
        samples: samples.clone(),
        // one re-read example, of sample 1: it moves like the sample itself
        reread: vec![Reread {
            index: 1,
            read: vec![samples[1].answer.clone().unwrap()],
        }],
        max_ids: 400,
        cfg: &cfg,
        tok: &tok,
        shift,
        counterfactual: Vec::new(),
    };
    let (plain, moved) = (data(0), data(3));
    let (h, w) = (48i64, 64i64); // the world's image size
    let mut n_moved = 0;
    for i in 0..plain.len() {
        let s = &samples[if i < samples.len() { i } else { 1 }];
        let base = plain.load(i).unwrap();
        assert!(same(&plain.load_augmented(i, 11).unwrap(), &base));
        for epoch in 0..3 {
            let d = visit_draw(7, epoch, i);
            let a = moved.load_augmented(i, d).unwrap();
            assert!(same(&a, &moved.load_augmented(i, d).unwrap()), "draw {d}");
            // the text and the targets' labels are the original's
            assert_eq!(a.enc.ids, base.enc.ids);
            assert_eq!(a.classes.targets, base.classes.targets);
            assert_eq!(a.categories, base.categories);
            let sh = draw_shift(s, 3, d);
            assert!(sh.dy.abs() <= 3 && sh.dx.abs() <= 3, "{sh:?}");
            // each mask is the original's moved by (dy, dx), nothing lost at the border
            for (m, m0) in a.masks.iter().zip(&base.masks) {
                for y in 0..h {
                    for x in 0..w {
                        let (sy, sx) = (y - sh.dy, x - sh.dx);
                        let want = if (0..h).contains(&sy) && (0..w).contains(&sx) {
                            m0[(sy * w + sx) as usize]
                        } else {
                            0.0
                        };
                        assert_eq!(m[(y * w + x) as usize], want, "visit {i}/{epoch} {sh:?}");
                    }
                }
                let ones = |v: &[f32]| v.iter().filter(|&&x| x == 1.0).count();
                assert_eq!(ones(m), ones(m0), "a mask lost pixels: {sh:?}");
            }
            if sh.dy != 0 || sh.dx != 0 {
                n_moved += 1;
                assert_ne!(a.pixels.data, base.pixels.data, "{sh:?}");
            } else {
                assert!(same(&a, &base));
            }
        }
    }
    assert!(n_moved > plain.len(), "only {n_moved} moved visits");
    // an object mask of another size is an error naming it, shifted or not (its patches
    // were skipped silently before)
    let mut bad = samples.clone();
    let o = &mut bad[2].objects[0].mask;
    (o.height, o.width) = (o.height - 1, o.width);
    o.data.truncate(o.height * o.width);
    for shift in [0, 3] {
        let d = SftData {
            samples: bad.clone(),
            reread: Vec::new(),
            ..data(shift)
        };
        let e = match d.load_augmented(2, visit_draw(7, 0, 2)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("shift {shift}: an object mask of another size was accepted"),
        };
        assert!(
            e.contains("mask") && e.contains("47x64"),
            "shift {shift}: {e}"
        );
        assert!(d.load_augmented(1, visit_draw(7, 0, 1)).is_ok());
    }
}
