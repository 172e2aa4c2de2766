//! Stage 2's segmentation preference: the perturbed copies (one rectangle of the valid
//! region, σ as configured, rebuilt bit-identically from the seed), Eq. 1's term and
//! boundary IoU by hand, Alg. 1's collection on a tiny model (the cached reference
//! embeddings equal a recompute), `Ls` at the start of the stage (policy = reference)
//! equal to ln 2 per active target, the indicator, and `Ls`'s gradient through the
//! model against finite differences in f64.
use popen::backend::Cpu;
use popen::data::mask::Mask;
use popen::data::sample::{Sample, Target};
use popen::method::pref::curriculum::Phase;
use popen::method::pref::ls::{ls_step, PsItem};
use popen::method::pref::ps::{
    collect_ps, collect_question, perturbed, PsCfg, PsCounts, PsMode, PsRecord, Rule, TargetRefs,
};
use popen::method::pref::{phase_of, PrefLossCfg};
use popen::model::seg::{Pixels, SegModel, SegModelConfig, SegTokenizer};
use popen::nn::Rng;
use std::path::PathBuf;

mod common;
use common::seg::tiny_cfg;

fn pixels(s: usize, vh: usize, vw: usize, rng: &mut Rng) -> Pixels {
    Pixels {
        data: (0..3 * s * s).map(|_| rng.normal() as f32).collect(),
        valid_h: vh,
        valid_w: vw,
        height: vh,
        width: vw,
    }
}

#[test]
fn copies_carry_noise_of_std_sigma_in_one_rectangle_of_the_valid_region() {
    let (s, vh, vw) = (48, 30, 41);
    let px = pixels(s, vh, vw, &mut Rng::new(1));
    let cfg = PsCfg {
        sigma: 0.7,
        ..PsCfg::default()
    };
    let copies = perturbed(&px, &cfg.noise(), 99, 0, 30).unwrap();
    assert_eq!(copies.len(), 30);
    let (mut sum, mut sq, mut n) = (0.0f64, 0.0f64, 0usize);
    for (k, cp) in copies.iter().enumerate() {
        // the changed pixels of channel 0 span one rectangle inside the valid region
        let (mut y0, mut y1, mut x0, mut x1) = (usize::MAX, 0, usize::MAX, 0);
        let mut changed0 = 0;
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let i = (c * s + y) * s + x;
                    let d = f64::from(cp.data[i] - px.data[i]);
                    if d == 0.0 {
                        continue;
                    }
                    assert!(y < vh && x < vw, "copy {k}: padding ({y}, {x}) changed");
                    (y0, y1, x0, x1) = (y0.min(y), y1.max(y), x0.min(x), x1.max(x));
                    changed0 += usize::from(c == 0);
                    sum += d;
                    sq += d * d;
                    n += 1;
                }
            }
        }
        let (h, w) = (y1 + 1 - y0, x1 + 1 - x0);
        // sides in [round(0.25·v), round(0.6·v)]: 8..=18 rows, 10..=25 columns
        assert!(
            (8..=18).contains(&h) && (10..=25).contains(&w),
            "copy {k}: {h}×{w}"
        );
        // every pixel of that rectangle changed (a normal draw is never exactly 0)
        assert_eq!(changed0, h * w, "copy {k}");
        // rebuilt alone from (seed, copy): bit-identical
        let again = perturbed(&px, &cfg.noise(), 99, k as u32, 1)
            .unwrap()
            .remove(0);
        assert_eq!(again.data, cp.data, "copy {k} rebuilt");
    }
    let mean = sum / n as f64;
    let sd = (sq / n as f64 - mean * mean).sqrt();
    assert!(n > 30 * 3 * 8 * 10, "{n} noisy values");
    assert!(mean.abs() < 0.02, "mean {mean}");
    assert!((sd / 0.7 - 1.0).abs() < 0.02, "sample std {sd} for σ = 0.7");
    // another seed, other copies
    let other = perturbed(&px, &cfg.noise(), 100, 0, 1).unwrap().remove(0);
    assert_ne!(other.data, copies[0].data);
    // bad settings are errors, not panics
    for bad in [
        PsCfg {
            np: 2,
            ..PsCfg::default()
        },
        PsCfg {
            rect_min: 0.7,
            ..PsCfg::default()
        },
        PsCfg {
            sigma: f32::NAN,
            ..PsCfg::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

fn square(h: usize, w: usize, y0: usize, x0: usize, side: usize) -> Mask {
    Mask::from_fn(h, w, |y, x| {
        (y0..y0 + side).contains(&y) && (x0..x0 + side).contains(&x)
    })
}

fn target(category: &str, mask: Mask) -> Target {
    Target {
        category: category.into(),
        mask,
    }
}

fn bytes(m: &Mask) -> Vec<u8> {
    m.data.clone()
}

#[test]
fn eq1_terms_and_boundary_iou_by_hand() {
    let (h, w) = (16, 16);
    let cup = square(h, w, 2, 2, 6);
    let apple = square(h, w, 9, 9, 6);
    let s = Sample {
        image_id: "x".into(),
        image_path: PathBuf::from("x.png"),
        height: h,
        width: w,
        question: "q".into(),
        question_index: 0,
        answer: Some("The cup <seg>.".into()),
        targets: vec![target("cup", cup.clone())],
        // the target's own instance is among the proposals; Eq. 1 skips it
        objects: vec![target("cup", cup.clone()), target("apple", apple.clone())],
    };
    let refs = TargetRefs::of_sample(&s).unwrap();
    // on the target: IoU 1, nothing else overlapped
    let (sv, bv) = refs.score(&[bytes(&cup)]).unwrap();
    assert_eq!((sv[0], bv[0]), (1.0, 1.0));
    // on the other object: 0 − 1
    let (sv, bv) = refs.score(&[bytes(&apple)]).unwrap();
    assert_eq!((sv[0], bv[0]), (-1.0, 0.0));
    // the left half of the cup (18 of 36 pixels): IoU ½, no other object touched
    let half = Mask::from_fn(h, w, |y, x| (2..8).contains(&y) && (2..5).contains(&x));
    let (sv, _) = refs.score(&[bytes(&half)]).unwrap();
    assert_eq!(sv[0], 0.5);
    // the cup and the apple both: IoU 36/72 with the cup, minus 36/72 with the apple
    let both = cup.union(&apple).unwrap();
    let (sv, _) = refs.score(&[bytes(&both)]).unwrap();
    assert_eq!(sv[0], 0.0);
    // a wrong number of masks is an error
    assert!(refs.score(&[]).is_err());
}

#[test]
fn curriculum_halves_and_modes() {
    assert_eq!(phase_of(1, 4), Phase::First);
    assert_eq!(phase_of(2, 4), Phase::First);
    assert_eq!(phase_of(3, 4), Phase::Second);
    assert_eq!(phase_of(2, 3), Phase::First);
    assert_eq!(phase_of(3, 3), Phase::Second);
    assert_eq!(phase_of(1, 1), Phase::First);
    let m = PsMode::Curriculum;
    assert_eq!(m.rules(Phase::First), &[Rule::S]);
    assert_eq!(m.rules(Phase::Second), &[Rule::Biou]);
    assert_eq!(PsMode::S.rules(Phase::Second), &[Rule::S]);
    assert_eq!(PsMode::Biou.rules(Phase::First), &[Rule::Biou]);
    assert_eq!(PsMode::Random.rules(Phase::First), &[Rule::RandomS]);
    assert_eq!(PsMode::Random.rules(Phase::Second), &[Rule::RandomBiou]);
    assert_eq!(PsMode::Hybrid.rules(Phase::First), &[Rule::S, Rule::Biou]);
    for (s, m) in [
        ("curriculum", PsMode::Curriculum),
        ("s", PsMode::S),
        ("biou", PsMode::Biou),
        ("random", PsMode::Random),
        ("hybrid", PsMode::Hybrid),
    ] {
        assert_eq!(s.parse::<PsMode>().unwrap(), m);
    }
    assert!("boundary".parse::<PsMode>().is_err());
}

fn tokenizer(cfg: &SegModelConfig) -> SegTokenizer {
    let texts: Vec<String> = [
        "Where is the cup?",
        "The cup <seg> is on the table.",
        "The cup <seg> and the apple <seg> are here.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    SegTokenizer::train(&texts, cfg.lvlm.vocab_size, cfg.group_len()).unwrap()
}

/// A 12×14 image on disk with a cup and an apple; the answer segments `n` of them.
fn sample(dir: &std::path::Path, n: usize) -> Sample {
    let (h, w) = (12, 14);
    let mut rng = Rng::new(4);
    let img = image::RgbImage::from_fn(w as u32, h as u32, |_, _| {
        image::Rgb([0, 1, 2].map(|_| (rng.next_u64() % 256) as u8))
    });
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("img.png");
    img.save(&path).unwrap();
    let cup = target("cup", square(h, w, 1, 1, 6));
    let apple = target("apple", square(h, w, 5, 7, 6));
    let (answer, targets) = if n == 1 {
        ("The cup <seg> is on the table.", vec![cup.clone()])
    } else {
        (
            "The cup <seg> and the apple <seg> are here.",
            vec![cup.clone(), apple.clone()],
        )
    };
    Sample {
        image_id: "img".into(),
        image_path: path,
        height: h,
        width: w,
        question: "Where is the cup?".into(),
        question_index: 0,
        answer: Some(answer.into()),
        targets,
        objects: vec![cup, apple],
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popen_pref_ps_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn small_ps() -> PsCfg {
    PsCfg {
        np: 6,
        regenerations: 2,
        batch: 4,
        ..PsCfg::default()
    }
}

#[test]
fn collection_caches_what_a_recompute_gives() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 3).unwrap();
    let dir = tmp("collect");
    let s = sample(&dir, 2);
    let ps = small_ps();
    let mut counts = PsCounts::default();
    let rec = collect_question(&m, &tok, &s, 7, &ps, 5, &mut counts)
        .unwrap()
        .unwrap();
    assert_eq!(rec.sample, 7);
    assert!((1..=1 + ps.regenerations).contains(&rec.draws));
    assert_eq!(counts.copies, rec.draws * ps.np);
    assert_eq!(counts.s_selected + counts.s_skipped, 1);
    assert_eq!(counts.regenerations, rec.draws - 1);
    // the second half's and the random triples always exist with 6 copies
    for r in [Rule::Biou, Rule::RandomS, Rule::RandomBiou] {
        assert!(rec.triple(r).is_some(), "{r:?} missing");
    }
    assert_eq!(rec.triple(Rule::S).is_some(), counts.s_selected == 1);
    let e = cfg.scales * cfg.seg_dim;
    let gt = popen::model::seg::data::example(&cfg, &tok, &s).unwrap();
    for t in &rec.triples {
        assert_eq!(t.ref_emb.len(), 2 * 3 * e, "{:?}", t.rule);
        assert_eq!(t.ref_best.len(), 2);
        let c = t.copies;
        assert!(c[0] != c[1] && c[1] != c[2] && c[0] != c[2], "{c:?}");
        // each cached embedding is what the model gives for that copy read alone
        for (slot, &copy) in c.iter().enumerate() {
            let px = perturbed(&gt.pixels, &rec.noise, rec.seed, copy, 1)
                .unwrap()
                .remove(0);
            let ex = popen::model::seg::Example {
                pixels: px,
                ..gt.clone()
            };
            let f = m.forward_pass(&[ex]).unwrap().seg_embeddings(&Cpu);
            for n in 0..2 {
                let cached = &t.ref_emb[(n * 3 + slot) * e..(n * 3 + slot + 1) * e];
                for (a, b) in cached.iter().zip(&f[n * e..(n + 1) * e]) {
                    assert!((f64::from(*a) - b).abs() < 1e-5, "{:?} copy {copy}", t.rule);
                }
            }
        }
    }
    // deterministic: the same question and seed give the same record
    let again = collect_question(&m, &tok, &s, 7, &ps, 5, &mut PsCounts::default())
        .unwrap()
        .unwrap();
    assert_eq!(again, rec);
    // a question without a target has no Ps
    let mut none = s.clone();
    none.answer = Some("There is nothing to segment.".into());
    none.targets.clear();
    let mut c = PsCounts::default();
    assert!(collect_question(&m, &tok, &none, 0, &ps, 5, &mut c)
        .unwrap()
        .is_none());
    assert_eq!(c.no_target, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn collection_over_many_questions_is_each_question_collected_in_turn() {
    // the questions run side by side (backend::map_jobs); records and counts must be
    // those of collecting one question after another
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 3).unwrap();
    let dir = tmp("many");
    let mut samples: Vec<Sample> = (0..11).map(|i| sample(&dir, 1 + i % 2)).collect();
    samples[4].answer = Some("There is nothing to segment.".into());
    samples[4].targets.clear();
    let ps = small_ps();
    let mut reported = 0;
    let (recs, counts) = collect_ps(&m, &tok, &samples, &ps, 5, |n| reported += n).unwrap();
    assert_eq!(reported, samples.len());
    let mut want_counts = PsCounts::default();
    let mut want = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        want.extend(collect_question(&m, &tok, s, i, &ps, 5, &mut want_counts).unwrap());
    }
    let with = (want_counts.questions - want_counts.no_target) as f64;
    want_counts.mean_s_max /= with;
    want_counts.mean_s_min /= with;
    assert_eq!(recs, want);
    assert_eq!(recs.len(), 10);
    assert_eq!(counts, want_counts);
    assert_eq!(counts.no_target, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tiny model's `Ps` record of the one-target sample, and its item.
fn record(m: &SegModel<f64, Cpu>, tok: &SegTokenizer, name: &str) -> (PsItem, Sample) {
    let dir = tmp(name);
    let s = sample(&dir, 1);
    let rec: PsRecord = collect_question(m, tok, &s, 0, &small_ps(), 9, &mut PsCounts::default())
        .unwrap()
        .unwrap();
    let refs = TargetRefs::of_sample(&s).unwrap();
    (PsItem { record: rec, refs }, s)
}

#[test]
fn ls_is_ln2_when_the_policy_is_the_reference_and_the_indicator_gates_it() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 3).unwrap();
    common::seg::stage2(&mut m);
    let (item, s) = record(&m, &tok, "ln2");
    let gt = popen::model::seg::data::example(&cfg, &tok, &s).unwrap();
    let lc = PrefLossCfg::default();
    let ps = PsCfg {
        mode: PsMode::Biou,
        ..small_ps()
    };
    // one target, ranked by its own boundary IoU: the reference's best beats its
    // medium, which is the policy's medium at the start, so the indicator is on
    let out = ls_step(&mut m, &[(&gt, &item)], &lc, &ps, Phase::First, 1.0, false)
        .unwrap()
        .unwrap();
    assert_eq!(out.triples, 1);
    assert_eq!(out.parts["ls_active"], 1.0);
    assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-5, "{out:?}");
    assert!(out.parts["ls_margin"].abs() < 1e-4, "{out:?}");
    // the record's own noise rebuilds the copies, whatever [ps] says at training time
    let other_noise = PsCfg {
        sigma: 5.0,
        rect_min: 1.0,
        rect_max: 1.0,
        ..ps.clone()
    };
    let again = ls_step(
        &mut m,
        &[(&gt, &item)],
        &lc,
        &other_noise,
        Phase::First,
        1.0,
        false,
    )
    .unwrap()
    .unwrap();
    assert!((again.loss - out.loss).abs() < 1e-12, "{again:?}");
    // a wrong cache moves it: the medium slot not the policy's medium copy (a random
    // vector), with best and worst apart (this tiny model's copies give nearly one
    // embedding, and with best = worst Eq. 4's margin is 0 whatever the medium)
    let mut wrong = item.clone();
    let mut rng = Rng::new(17);
    for t in &mut wrong.record.triples {
        let e = t.ref_emb.len() / 3;
        for j in 0..e {
            t.ref_emb[e + j] = rng.normal() as f32;
            t.ref_emb[2 * e + j] = -t.ref_emb[j];
        }
    }
    let w = ls_step(&mut m, &[(&gt, &wrong)], &lc, &ps, Phase::First, 1.0, false)
        .unwrap()
        .unwrap();
    assert!((w.loss - std::f64::consts::LN_2).abs() > 1e-3, "{w:?}");
    // a reference best below anything the policy can score: the indicator zeroes Ls
    let mut beaten = item.clone();
    for t in &mut beaten.record.triples {
        t.ref_best.iter_mut().for_each(|x| *x = -10.0);
    }
    let z = ls_step(
        &mut m,
        &[(&gt, &beaten)],
        &lc,
        &ps,
        Phase::First,
        1.0,
        false,
    )
    .unwrap()
    .unwrap();
    assert_eq!((z.loss, z.parts["ls_active"]), (0.0, 0.0));
    // --no-indicator: it counts again
    let no_ind = PrefLossCfg {
        indicator: false,
        ..lc.clone()
    };
    let z = ls_step(
        &mut m,
        &[(&gt, &beaten)],
        &no_ind,
        &ps,
        Phase::First,
        1.0,
        false,
    )
    .unwrap()
    .unwrap();
    assert!((z.loss - std::f64::consts::LN_2).abs() < 1e-5, "{z:?}");
    // the curriculum's first half uses the s triple, which this model's copies do not
    // earn (no copy reaches s > 0.8): nothing trains then
    let cur = PsCfg {
        mode: PsMode::Curriculum,
        ..small_ps()
    };
    if item.record.triple(Rule::S).is_none() {
        assert!(
            ls_step(&mut m, &[(&gt, &item)], &lc, &cur, Phase::First, 1.0, false)
                .unwrap()
                .is_none()
        );
    }
    assert!(ls_step(
        &mut m,
        &[(&gt, &item)],
        &lc,
        &cur,
        Phase::Second,
        1.0,
        false
    )
    .unwrap()
    .is_some());
    let _ = std::fs::remove_dir_all(s.image_path.parent().unwrap());
}

#[test]
fn ls_gradient_matches_finite_differences() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 5).unwrap();
    common::seg::stage2(&mut m);
    let (mut item, s) = record(&m, &tok, "fd");
    let gt = popen::model::seg::data::example(&cfg, &tok, &s).unwrap();
    // references off the policy, so that σ(−m) is not ½ and the gradient is not tiny
    let mut rng = Rng::new(13);
    for t in &mut item.record.triples {
        t.ref_emb.iter_mut().for_each(|x| *x = rng.normal() as f32);
    }
    // no indicator: a mask threshold would make the loss a step function
    let lc = PrefLossCfg {
        indicator: false,
        ..PrefLossCfg::default()
    };
    let ps = PsCfg {
        mode: PsMode::Hybrid,
        ..small_ps()
    };
    let items = [(&gt, &item)];
    for (_, t) in m.params_mut() {
        t.zero_grad(&Cpu);
    }
    let out = ls_step(&mut m, &items, &lc, &ps, Phase::Second, 1.0, true)
        .unwrap()
        .unwrap();
    assert!(out.triples >= 1 && out.loss > 0.0, "{out:?}");
    let grads = common::seg::grads_of(&mut m);
    let (checked, nonzero) = common::seg::check_param_grads(&mut m, &grads, 21, |m| {
        ls_step(m, &items, &lc, &ps, Phase::Second, 1.0, false)
            .unwrap()
            .unwrap()
            .loss
    });
    assert!(
        checked >= 20 && nonzero > 0,
        "{checked} checked, {nonzero} nonzero"
    );
    let _ = std::fs::remove_dir_all(s.image_path.parent().unwrap());
}
