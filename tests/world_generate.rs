//! The embedded world: determinism, `<seg>`/mask bookkeeping, masks that match the
//! drawing, co-occurrence priors, and the data-set writer.
use popen::data::muse::MuseImage;
use popen::data::world::categories::{by_name, CATEGORIES};
use popen::data::world::render::render;
use popen::data::world::scenes::{draw_categories, RULES, SCENES};
use popen::data::world::{generate, rng::Rng, write_dataset, Family, Split, WorldConfig};

fn cfg() -> WorldConfig {
    WorldConfig {
        height: 72,
        width: 96,
        questions: 3,
    }
}

#[test]
fn world_is_big_enough() {
    assert!(CATEGORIES.len() >= 25);
    assert!(SCENES.len() >= 6);
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let a = generate(&cfg(), 11, Split::Train, 5).unwrap();
    let b = generate(&cfg(), 11, Split::Train, 5).unwrap();
    assert_eq!(a.png().unwrap(), b.png().unwrap());
    let ja = serde_json::to_string(&a.to_muse("x.png")).unwrap();
    let jb = serde_json::to_string(&b.to_muse("x.png")).unwrap();
    assert_eq!(ja, jb);
    let c = generate(&cfg(), 12, Split::Train, 5).unwrap();
    assert_ne!(a.png().unwrap(), c.png().unwrap());
    let d = generate(&cfg(), 11, Split::Test, 5).unwrap();
    assert_ne!(a.png().unwrap(), d.png().unwrap());
}

#[test]
fn every_seg_has_one_nonempty_mask() {
    let mut families = std::collections::HashSet::new();
    for i in 0..60 {
        let s = generate(&cfg(), 3, Split::Train, i).unwrap();
        assert!(!s.objects.is_empty());
        let rec = s.to_muse("x.png");
        for (q, qa) in s.qas.iter().enumerate() {
            families.insert(qa.family);
            let segs = qa.answer.matches("<seg>").count();
            assert_eq!(segs, qa.targets.len(), "{}", qa.answer);
            assert_eq!(segs, rec.answers[q].len());
            if qa.family == Family::NoTarget {
                assert_eq!(segs, 0);
            }
            for &k in &qa.targets {
                assert!(!s.objects[k].mask.is_empty());
            }
            for ann in &rec.answers[q] {
                let m = match &ann.segmentation {
                    popen::data::muse::Segmentation::Rle(r) => {
                        r.to_rle().unwrap().to_mask().unwrap()
                    }
                    _ => panic!("world masks are RLE"),
                };
                assert!(m.area() > 0);
            }
        }
        assert_eq!(rec.ann_list.as_ref().unwrap().len(), s.objects.len());
    }
    assert_eq!(families.len(), 7, "{families:?}");
}

#[test]
fn masks_are_the_visible_object_pixels() {
    for i in 0..25 {
        let s = generate(&cfg(), 4, Split::Val, i).unwrap();
        let (bg, _) = render(&s.layout, false);
        let (h, w) = (s.image.height, s.image.width);
        let mut owner = vec![usize::MAX; h * w];
        for (k, o) in s.objects.iter().enumerate() {
            for (p, &v) in o.mask.data.iter().enumerate() {
                if v != 0 {
                    assert_eq!(owner[p], usize::MAX, "masks overlap");
                    owner[p] = k;
                }
            }
        }
        let (mut differ, mut total) = (0usize, 0usize);
        for y in 0..h {
            for x in 0..w {
                if owner[y * w + x] == usize::MAX {
                    // Outside every mask the picture is exactly the background.
                    assert_eq!(
                        s.image.get(y, x),
                        bg.get(y, x),
                        "pixel ({y},{x}) of sample {i}"
                    );
                } else {
                    total += 1;
                    let (a, b) = (s.image.get(y, x), bg.get(y, x));
                    let d: i32 = (0..3).map(|c| (a[c] as i32 - b[c] as i32).abs()).sum();
                    differ += usize::from(d > 12);
                }
            }
        }
        assert!(
            differ as f64 >= 0.85 * total as f64,
            "sample {i}: {differ}/{total} mask pixels differ from background"
        );
    }
}

#[test]
fn masks_have_the_category_colour() {
    // Objects whose colour is fixed: mean mask colour must show it.
    let mut checked = 0;
    for i in 0..120 {
        let s = generate(&cfg(), 5, Split::Train, i).unwrap();
        for o in &s.objects {
            let (mut sum, mut n) = ([0f64; 3], 0f64);
            for y in 0..o.mask.height {
                for x in 0..o.mask.width {
                    if o.mask.get(y, x) != 0 {
                        let p = s.image.get(y, x);
                        (0..3).for_each(|c| sum[c] += p[c] as f64);
                        n += 1.0;
                    }
                }
            }
            let [r, g, b] = sum.map(|v| v / n);
            let ok = match (o.name, o.colour) {
                ("banana", _) => r > b + 60.0 && g > b + 60.0,
                ("broccoli", _) => g > r + 15.0 && g > b + 15.0,
                ("apple", "red") => r > g + 60.0 && r > b + 60.0,
                ("orange", _) => r > g + 30.0 && g > b + 20.0,
                ("tv", _) => r < 90.0 && b >= r,
                _ => continue,
            };
            assert!(
                ok,
                "{} ({}) has mean colour ({r:.0},{g:.0},{b:.0})",
                o.name, o.colour
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} objects checked");
}

#[test]
fn co_occurrence_matches_the_priors() {
    // Before placement the rule is exact; after placement (which may drop an
    // object that does not fit) it must stay near.
    let knife = by_name("knife").unwrap();
    let fork = by_name("fork").unwrap();
    let rule = RULES
        .iter()
        .find(|r| r.source == "knife" && r.target == "fork")
        .unwrap();
    let mut rng = Rng::new(9);
    let (mut with_knife, mut both) = (0, 0);
    for _ in 0..4000 {
        let c = draw_categories(0, &mut rng);
        if c.contains(&knife) {
            with_knife += 1;
            both += usize::from(c.contains(&fork));
        }
    }
    let p = both as f32 / with_knife as f32;
    assert!((p - rule.p).abs() < 0.03, "drawn P(fork|knife) = {p}");

    let (mut with_knife, mut both, mut fork_alone, mut no_knife) = (0, 0, 0, 0);
    for i in 0..500 {
        let s = generate(
            &WorldConfig {
                height: 48,
                width: 64,
                questions: 1,
            },
            21,
            Split::Train,
            i,
        )
        .unwrap();
        let names = s.object_names();
        if names.contains(&"knife") {
            with_knife += 1;
            both += usize::from(names.contains(&"fork"));
        } else {
            no_knife += 1;
            fork_alone += usize::from(names.contains(&"fork"));
        }
    }
    let p = both as f32 / with_knife as f32;
    assert!(with_knife > 40, "{with_knife}");
    assert!(
        (p - rule.p).abs() < 0.12,
        "generated P(fork|knife) = {p} over {with_knife} scenes"
    );
    let q = fork_alone as f32 / no_knife as f32;
    assert!(
        q < 0.15,
        "P(fork|no knife) = {q}: the prior would be no prior"
    );
}

#[test]
fn dataset_writer_splits_test_by_target_count() {
    let dir = std::env::temp_dir().join(format!("popen_world_ds_{}", std::process::id()));
    let sum = write_dataset(
        &dir,
        &WorldConfig {
            height: 48,
            width: 64,
            questions: 3,
        },
        1,
        Split::Test,
        24,
        &|| {},
    )
    .unwrap();
    assert_eq!(sum.images, 24);
    assert_eq!(sum.json.len(), 3);
    let read = |name: &str| -> Vec<MuseImage> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let all = read("test.json");
    let few = read("test_few.json");
    let many = read("test_many.json");
    assert!(few.iter().all(|r| r.answers.iter().all(|a| a.len() <= 3)));
    assert!(many.iter().all(|r| r.answers.iter().all(|a| a.len() > 3)));
    let nq = |v: &[MuseImage]| v.iter().map(|r| r.questions.len()).sum::<usize>();
    assert_eq!(nq(&few) + nq(&many), nq(&all));
    assert!(!many.is_empty());
    for r in &all {
        assert!(dir.join(&r.file_name).exists());
        for (t, a) in r.text_answers.as_ref().unwrap().iter().zip(&r.answers) {
            // MUSE's spelling of the placeholder, as the real data set writes it
            assert_eq!(t.matches("{seg}").count(), a.len(), "{t}");
            assert!(!t.contains("<seg>"), "{t}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_sizes_are_errors() {
    for (h, w) in [(10, 96), (96, 0), (5000, 64)] {
        let e = generate(
            &WorldConfig {
                height: h,
                width: w,
                questions: 3,
            },
            0,
            Split::Train,
            0,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("out of range"), "{e}");
    }
}

#[test]
fn output_does_not_depend_on_thread_count() {
    let cfg = WorldConfig {
        height: 48,
        width: 64,
        questions: 2,
    };
    let run = |threads: usize, tag: &str| {
        let dir =
            std::env::temp_dir().join(format!("popen_world_threads_{}_{tag}", std::process::id()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| write_dataset(&dir, &cfg, 8, Split::Train, 10, &|| {}))
            .unwrap();
        let json = std::fs::read(dir.join("train.json")).unwrap();
        let png = std::fs::read(dir.join("images/train_000007.png")).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        (json, png)
    };
    assert_eq!(run(1, "one"), run(3, "three"));
}
