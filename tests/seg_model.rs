//! The segmentation model: whole-model gradient check in f64 (ViT → projector → LLaMA →
//! codebook projection → pixel decoder, through `CE + 2·BCE + 0.5·Dice`), frozen parts
//! untouched, bad input as errors.
use popen::backend::{Backend, Cpu};
use popen::model::seg::{
    Example, HeadWeights, LossWeights, Pixels, SegModel, SegModelConfig, SegTokenizer, Trainable,
};
use popen::nn::Rng;

use popen::model::seg::config::PresenceTokens;

mod common;
use common::seg::tiny_cfg;

fn tokenizer(cfg: &SegModelConfig) -> SegTokenizer {
    let texts: Vec<String> = [
        "Where is the cup?",
        "The cup <seg> is on the table.",
        "Find the red apples.",
        "I see two apples <seg> <seg> here.",
        "Nothing fits.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    SegTokenizer::train(&texts, cfg.lvlm.vocab_size, cfg.group_len()).unwrap()
}

fn example(cfg: &SegModelConfig, tok: &SegTokenizer, rng: &mut Rng, q: &str, a: &str) -> Example {
    let s = cfg.image_size;
    // a 5×7 image: resized to 6×8 inside the 8×8 square, so the resize path runs
    let (h, w) = (5, 7);
    let (vh, vw) = popen::model::seg::preprocess::fit(h, w, s);
    let data = (0..3 * s * s).map(|_| rng.normal() as f32).collect();
    let enc = tok.encode("", q, a).unwrap();
    let masks = (0..enc.groups.len())
        .map(|_| {
            (0..h * w)
                .map(|_| f32::from(u8::from(rng.uniform() < 0.4)))
                .collect()
        })
        .collect();
    Example {
        pixels: Pixels {
            data,
            valid_h: vh,
            valid_w: vw,
            height: h,
            width: w,
        },
        enc,
        masks,
        classes: Default::default(),
        categories: Vec::new(),
    }
}

fn batch(cfg: &SegModelConfig, tok: &SegTokenizer) -> Vec<Example> {
    let mut rng = Rng::new(5);
    vec![
        example(
            cfg,
            tok,
            &mut rng,
            "Find the red apples.",
            "I see two apples <seg> <seg> here.",
        ),
        example(
            cfg,
            tok,
            &mut rng,
            "Where is the cup?",
            "The cup <seg> is on the table.",
        ),
        example(cfg, tok, &mut rng, "Where is the cup?", "Nothing fits."),
    ]
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let b = batch(&cfg, &tok);
    check_whole_model_gradient(&cfg, &tok, &b, LossWeights::default(), &[], None);
}

/// The same check with both category heads and the place head: labelled patches (one
/// example has none, one patch is ignored) and labelled targets (one example has none,
/// one target is ignored), every loss weighed in.
#[test]
fn whole_model_gradient_with_the_category_losses_matches_finite_differences() {
    let (cfg, tok, b, w) = with_categories();
    check_whole_model_gradient(
        &cfg,
        &tok,
        &b,
        w,
        &["patch_head", "seg_class_head", "seg_place_head"],
        None,
    );
}

/// The presence tokens (`[model] presence_tokens`, both kinds) read the patch head
/// through a stop-gradient, so the check freezes the tower and its patch head: the
/// evidence is then a constant and every gradient left, `presence_proj`'s included, is
/// exact.
#[test]
fn whole_model_gradient_with_the_presence_tokens_matches_finite_differences() {
    for kind in [PresenceTokens::One, PresenceTokens::PerCategory] {
        let (mut cfg, tok, b, w) = with_categories();
        cfg.presence_tokens = kind;
        let t = Trainable {
            vision: false,
            ..Trainable::default()
        };
        check_whole_model_gradient(
            &cfg,
            &tok,
            &b,
            w,
            &["presence_proj", "seg_class_head"],
            Some(t),
        );
    }
}

/// With the presence token, the inference path (`encode_images` → `prefill`) reads the
/// image tokens the training pass reads: the first answer token's log-probability is
/// the same both ways, and moving `presence_proj` moves both alike (so the token is read
/// and sits in the same place).
#[test]
fn the_presence_tokens_are_read_alike_by_training_and_inference() {
    for (kind, n) in [(PresenceTokens::One, 1), (PresenceTokens::PerCategory, 2)] {
        presence_read_alike(kind, n);
    }
}

fn presence_read_alike(kind: PresenceTokens, n: usize) {
    let (mut cfg, tok, b, _) = with_categories();
    cfg.presence_tokens = kind;
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg, &tok, 5).unwrap();
    assert_eq!(m.tokens_per_image(), m.patches_per_image() + n);
    let ex = &b[0];
    let first = ex.enc.ids[ex.enc.answer_start] as usize;
    let both = |m: &SegModel<f64, Cpu>| {
        let pass = m.forward_pass(std::slice::from_ref(ex)).unwrap();
        let train = pass.logp[pass.answer_rows[0][0]];
        let enc = m.encode_images(&[&ex.pixels]).unwrap();
        let pre = m.prefill(&tok, "Find the red apples.", &enc[0]).unwrap();
        let all = Cpu.to_vec(&pre.logits);
        let v = m.llava.cfg.text.vocab_size;
        let last = &all[all.len() - v..];
        let mx = last.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
        let lse = mx + last.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        (train, last[first] - lse)
    };
    let (t0, i0) = both(&m);
    assert!((t0 - i0).abs() < 1e-10, "training {t0} vs inference {i0}");
    let w = &mut m.presence_proj.as_mut().unwrap().weight;
    let moved: Vec<f64> = Cpu.to_vec(&w.data).iter().map(|x| x + 0.5).collect();
    w.data = Cpu.from_slice(&moved);
    let (t1, i1) = both(&m);
    assert!((t1 - i1).abs() < 1e-10, "training {t1} vs inference {i1}");
    assert!(
        (t1 - t0).abs() > 1e-6,
        "the presence token is not read: {t0} → {t1}"
    );
}

/// A run directory keeps the presence token: the setting, and `presence_proj.*` under
/// those names; without `classes` the token is a config error naming it.
#[test]
fn a_run_directory_keeps_the_presence_token() {
    let (mut cfg, tok, _, _) = with_categories();
    cfg.presence_tokens = PresenceTokens::One;
    let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 8).unwrap();
    let back = saved_and_loaded(&mut m, &tok, "presence_proj");
    assert_eq!(back.cfg.presence_tokens, PresenceTokens::One);
    cfg.classes.clear();
    let e = SegModel::<f32, Cpu>::new_tiny(Cpu, cfg, &tok, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("presence_tokens"), "{e}");
}

/// A run directory keeps the place head: the setting, and `seg_place_head.*` under
/// those names, one output per tower patch.
#[test]
fn a_run_directory_keeps_the_place_head() {
    let mut cfg = tiny_cfg();
    cfg.place_head = true;
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg, &tok, 8).unwrap();
    let k = m.patches_per_image();
    assert_eq!(m.seg_place_head.as_ref().unwrap().fan_out(), k);
    let back = saved_and_loaded(&mut m, &tok, "seg_place_head");
    assert!(back.cfg.place_head);
}

/// `m` saved to a run directory and loaded back, checking that the loaded model's
/// `prefix.*` tensors (a Linear: weight and bias) equal `m`'s.
fn saved_and_loaded(
    m: &mut SegModel<f32, Cpu>,
    tok: &SegTokenizer,
    prefix: &str,
) -> SegModel<f32, Cpu> {
    let dir = std::env::temp_dir().join(format!("popen_seg_{prefix}_{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    m.save(&dir, tok).unwrap();
    let (mut back, _) = SegModel::<f32, Cpu>::load(Cpu, &dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let named = |m: &mut SegModel<f32, Cpu>| -> Vec<(String, Vec<f32>)> {
        m.params_mut()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&format!("{prefix}.")))
            .map(|(n, t)| (n, t.data.clone()))
            .collect()
    };
    let (a, b) = (named(m), named(&mut back));
    assert_eq!(
        a.len(),
        2,
        "{:?}",
        a.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    assert!(a == b, "{prefix} changed through save/load");
    back
}

/// The tiny config with two classes, [`batch`] labelled, both category losses and the
/// place loss on, the decoder's pixel skip (the world config's model: q = 1 on this 8 × 8 image) and the
/// ViT's convolutional stem (one 4 × 4 cell per patch of 4 here; tests/nn_conv.rs
/// checks the stem alone with several cells per patch).
fn with_categories() -> (SegModelConfig, SegTokenizer, Vec<Example>, LossWeights) {
    use popen::kernels::logprob::IGNORE_INDEX;
    use popen::model::seg::category::Classes;
    let mut cfg = tiny_cfg();
    cfg.classes = vec!["apple".into(), "cup".into()];
    cfg.place_head = true;
    cfg.pixel_skip = true;
    cfg.lvlm.vision_stem = 3;
    let tok = tokenizer(&cfg);
    let mut b = batch(&cfg, &tok);
    // an 8 × 8 image in patches of 4: K = 4; examples 0 and 1 have 2 and 1 targets
    b[0].classes = Classes {
        patches: vec![0, 1, IGNORE_INDEX, 2],
        targets: vec![1, IGNORE_INDEX],
        places: vec![3, 1],
    };
    b[1].classes = Classes {
        patches: Vec::new(),
        targets: vec![2],
        places: vec![IGNORE_INDEX],
    };
    b[2].classes = Classes {
        patches: vec![2, 0, 0, 1],
        targets: Vec::new(),
        places: Vec::new(),
    };
    // the two apples may take each other's place (instance matching on)
    b[0].categories = vec!["apple".into(), "apple".into()];
    b[1].categories = vec!["cup".into()];
    let w = LossWeights {
        patch_class: 1.5,
        seg_class: 0.7,
        seg_place: 0.9,
        instance_matching: true,
        ..LossWeights::default()
    };
    (cfg, tok, b, w)
}

/// The loss and every gradient of one step, from zeroed gradients.
fn loss_and_grads(
    m: &mut SegModel<f64, Cpu>,
    b: &[Example],
    w: LossWeights,
) -> (f64, Vec<Vec<f64>>) {
    for (_, t) in m.params_mut() {
        t.zero_grad(&Cpu);
    }
    let l = m.step(b, w, 1.0, true).unwrap().total;
    let g = m
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.grad.clone().expect("trainable"))
        .collect();
    (l, g)
}

/// With instance matching, two targets of one category are scored in the cheaper of
/// their two orders, and the step (loss and every gradient) is exactly the in-order
/// step on the targets in that order; targets of two categories keep their order.
/// Over several random images and masks both orders must occur.
#[test]
fn instance_matching_takes_the_cheaper_order_of_alike_targets() {
    let mut cfg = tiny_cfg();
    cfg.place_head = true;
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 3).unwrap();
    // the place labels must follow the targets the masks are matched to
    let in_order = LossWeights {
        seg_place: 0.8,
        ..LossWeights::default()
    };
    let on = LossWeights {
        instance_matching: true,
        ..in_order
    };
    let (mut kept, mut swapped) = (0, 0);
    for seed in 0..8 {
        let mut rng = Rng::new(100 + seed);
        let q = "Find the red apples.";
        let mut ex = example(
            &cfg,
            &tok,
            &mut rng,
            q,
            "I see two apples <seg> <seg> here.",
        );
        ex.categories = vec!["apple".into(), "apple".into()];
        ex.classes.places = vec![0, 3];
        let mut rev = ex.clone();
        rev.masks.reverse();
        rev.classes.places.reverse();
        let (l_ab, g_ab) = loss_and_grads(&mut m, std::slice::from_ref(&ex), in_order);
        let (l_ba, g_ba) = loss_and_grads(&mut m, std::slice::from_ref(&rev), in_order);
        let (l_on, g_on) = loss_and_grads(&mut m, std::slice::from_ref(&ex), on);
        // the order is chosen by the masks' cost alone (the text's and the place
        // head's losses are the same for both orders but the place labels' order)
        let masks_only = LossWeights {
            ce: 0.0,
            ..LossWeights::default()
        };
        let mask_cost = |m: &mut SegModel<f64, Cpu>, e: &Example| {
            m.step(std::slice::from_ref(e), masks_only, 1.0, false)
                .unwrap()
                .total
        };
        let (c_ab, c_ba) = (mask_cost(&mut m, &ex), mask_cost(&mut m, &rev));
        assert!(c_ab != c_ba, "seed {seed}: the two orders cost the same");
        assert!(l_ab != l_ba, "seed {seed}: the place labels are not read");
        let (want_l, want_g) = if c_ba < c_ab {
            swapped += 1;
            (l_ba, g_ba)
        } else {
            kept += 1;
            (l_ab, g_ab)
        };
        assert!(
            (l_on - want_l).abs() <= 1e-12 * want_l.abs(),
            "seed {seed}: {l_on} vs {want_l}"
        );
        for (a, b) in g_on.iter().flatten().zip(want_g.iter().flatten()) {
            assert!(
                (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                "seed {seed}: {a} vs {b}"
            );
        }
        // two categories: nothing to match
        ex.categories = vec!["apple".into(), "cup".into()];
        let (l_two, _) = loss_and_grads(&mut m, std::slice::from_ref(&ex), on);
        assert_eq!(l_two, l_ab, "seed {seed}");
        // categories that do not name every target are an error
        ex.categories.pop();
        assert!(m.step(std::slice::from_ref(&ex), on, 1.0, false).is_err());
    }
    assert!(kept > 0 && swapped > 0, "kept {kept}, swapped {swapped}");
}

/// Every parameter's gradient (two entries per tensor) against central differences in
/// f64; `also` names parts beyond the model, codebook head and decoder that must be
/// among the parameters.
fn check_whole_model_gradient(
    cfg: &SegModelConfig,
    tok: &SegTokenizer,
    b: &[Example],
    w: LossWeights,
    also: &[&str],
    trainable: Option<Trainable>,
) {
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), tok, 3).unwrap();
    if let Some(t) = trainable {
        m.set_trainable(t);
    }
    for (_, t) in m.params_mut() {
        t.zero_grad(&Cpu);
    }
    let l0 = m.step(b, w, 1.0, true).unwrap();
    assert!(l0.n_masks == 3 && l0.total.is_finite(), "{l0:?}");
    assert_eq!(l0.patch_class > 0.0, w.patch_class > 0.0, "{l0:?}");
    assert_eq!(l0.seg_class > 0.0, w.seg_class > 0.0, "{l0:?}");
    assert_eq!(l0.seg_place > 0.0, w.seg_place > 0.0, "{l0:?}");
    // (index, name, gradient) of every trainable tensor: all of them unless `trainable`
    let grads: Vec<(usize, String, Vec<f64>)> = m
        .params_mut()
        .into_iter()
        .enumerate()
        .filter_map(|(i, (n, t))| match &t.grad {
            Some(g) => Some((i, n, g.clone())),
            None => {
                assert!(trainable.is_some(), "{n} is frozen");
                None
            }
        })
        .collect();
    let n_params = grads.len();
    let mut rng = Rng::new(11);
    let (mut checked, mut worst, mut kinks) = (0, 0.0f64, 0);
    let mut parts_seen = std::collections::BTreeSet::new();
    for (pi, name, g) in &grads {
        let (pi, name) = (*pi, name.clone());
        // every tensor receives a gradient somewhere (the pixel decoder's too)
        // (the pooled output's norm is never read by the model)
        let gmax = g.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        assert!(
            gmax > 0.0 || name.contains("post_layernorm"),
            "{name} gets no gradient"
        );
        for _ in 0..2 {
            let j = (rng.next_u64() % g.len() as u64) as usize;
            let h = 1e-5;
            let mut at = |delta: f64| {
                let mut p = m.params_mut();
                let t = &mut p[pi].1;
                t.data[j] += delta;
                drop(p);
                let l = m.step(b, w, 1.0, false).unwrap().total;
                let mut p = m.params_mut();
                p[pi].1.data[j] -= delta;
                l
            };
            let (lp, lm) = (at(h), at(-h));
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[j]).abs() / (fd.abs().max(g[j].abs()).max(1e-3));
            // A ReLU whose input is exactly 0 (a zero bias behind a layer whose units are
            // all off for one row: the tiny decoder is 6 wide) is a kink, where central
            // differences average two slopes.  There the one-sided slopes differ by the
            // jump, and the backward (ReLU'(0) = 0) must equal one of them.
            let (sp, sm) = ((lp - l0.total) / h, (l0.total - lm) / h);
            let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
            if err >= 1e-4 && rel(sp, sm) > 1e-2 {
                assert!(
                    rel(sp, g[j]) < 1e-3 || rel(sm, g[j]) < 1e-3,
                    "{name}[{j}] at a kink: one-sided slopes {sp} and {sm} vs backward {}",
                    g[j]
                );
                kinks += 1;
                continue;
            }
            worst = worst.max(err);
            assert!(
                err < 1e-4,
                "{name}[{j}]: finite difference {fd} vs backward {}",
                g[j]
            );
            checked += 1;
        }
        parts_seen.insert(name.split('.').next().unwrap_or("").to_string());
    }
    assert!(kinks <= 4, "{kinks} entries at a kink");
    assert!(checked + kinks >= 2 * n_params);
    for part in ["model", "seg_head", "mask_decoder"].iter().chain(also) {
        assert!(
            parts_seen.contains(*part),
            "no parameter of {part}: {parts_seen:?}"
        );
    }
    eprintln!(
        "{checked} entries of {n_params} tensors, worst relative error {worst:.2e}, {kinks} at a kink"
    );
}

#[test]
fn frozen_parts_stay_bit_identical() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 4).unwrap();
    m.set_trainable(Trainable {
        vision: false,
        projector: false,
        llm: true,
        seg_head: true,
        decoder: false,
    });
    let before: Vec<(String, Vec<f32>)> = m
        .params_mut()
        .into_iter()
        .map(|(n, t)| (n, t.data.clone()))
        .collect();
    let b = batch(&cfg, &tok);
    let mut opt = popen::train::AdamW::new(popen::train::AdamWConfig::default());
    for _ in 0..2 {
        m.step(&b, LossWeights::default(), 1.0, true).unwrap();
        opt.step(&Cpu, &mut m.params_mut(), 1e-2).unwrap();
    }
    let mut moved = 0;
    for ((n, a), (_, t)) in before.iter().zip(m.params_mut()) {
        let frozen = n.contains("vision_tower")
            || n.contains("multi_modal_projector")
            || n.starts_with("mask_decoder");
        if frozen {
            assert!(t.grad.is_none(), "{n} has a gradient slot");
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{n} moved"
            );
        } else if a != &t.data {
            moved += 1;
        }
    }
    assert!(moved > 5, "only {moved} trainable tensors moved");
}

#[test]
fn bad_examples_are_errors() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 4).unwrap();
    let mut b = batch(&cfg, &tok);
    b[0].masks.pop();
    let e = m
        .step(&b, LossWeights::default(), 1.0, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 masks for 2 <seg> groups") || e.contains("masks for"),
        "{e}"
    );
    let mut b = batch(&cfg, &tok);
    b[1].masks[0].truncate(3);
    let e = m
        .step(&b, LossWeights::default(), 1.0, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mask 0"), "{e}");
    // a prompt longer than the context
    let long = "Where is the cup? ".repeat(20);
    let mut rng = Rng::new(1);
    let b = vec![example(
        &cfg,
        &tok,
        &mut rng,
        &long,
        "The cup <seg> is on the table.",
    )];
    let e = m
        .step(&b, LossWeights::default(), 1.0, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("longer than the context"), "{e}");
}

#[test]
fn codebook_groups_round_trip_and_incomplete_groups_drop() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let enc = tok
        .encode("", "Where is the cup?", "The cup <seg> is on the table.")
        .unwrap();
    assert_eq!(enc.groups.len(), 1);
    let ans = &enc.ids[enc.answer_start..];
    let (text, groups) = tok.decode_answer(ans).unwrap();
    assert_eq!(text, "The cup <seg> is on the table.");
    assert_eq!(groups, vec![enc.groups[0] - enc.answer_start]);
    // drop the group's last token: the target goes, the text keeps no <seg>
    let mut cut = ans.to_vec();
    cut.remove(enc.groups[0] - enc.answer_start + cfg.group_len() - 1);
    let (text, groups) = tok.decode_answer(&cut).unwrap();
    assert!(groups.is_empty() && !text.contains("<seg>"), "{text}");
}

/// Stage 1's re-read questions put the answers to read where the ensemble's text half
/// puts its samples: after the question, before the answer header; only the answer is
/// labelled and only its groups are targets.
#[test]
fn answers_to_read_sit_between_the_question_and_the_answer_header() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let (q, a) = ("Where is the cup?", "The cup <seg> is on the table.");
    let read = [
        "I see two apples <seg> <seg> here.".to_string(),
        "Nothing fits.".to_string(),
    ];
    let plain = tok.encode("", q, a).unwrap();
    assert_eq!(tok.encode_reading("", q, &[], a).unwrap(), plain);
    let enc = tok.encode_reading("", q, &read, a).unwrap();
    let (prompt, image_pos) = tok.prompt("", q).unwrap();
    let header = tok.answer_header().unwrap();
    assert!(!header.is_empty());
    let mut want = prompt[..prompt.len() - header.len()].to_vec();
    for r in &read {
        want.extend(tok.answer_ids(r).unwrap());
    }
    want.extend_from_slice(&header);
    assert_eq!(enc.answer_start, want.len());
    want.extend(tok.answer_ids(a).unwrap());
    want.push(tok.tok.eos);
    assert_eq!(enc.ids, want);
    assert_eq!(enc.image_pos, image_pos);
    // the read answer's two groups are input, the answer's one group the target
    let n_groups = enc.ids.iter().filter(|&&t| t == tok.codebook[0]).count();
    assert_eq!(n_groups, 3);
    assert_eq!(enc.groups.len(), 1);
    assert_eq!(
        &enc.ids[enc.answer_start..],
        &plain.ids[plain.answer_start..],
        "the answer tokenizes as without reading"
    );
    assert_eq!(
        enc.groups[0] - enc.answer_start,
        plain.groups[0] - plain.answer_start
    );
}

#[test]
fn run_directory_round_trips_and_its_llava_part_loads_as_llava() {
    let mut cfg = tiny_cfg();
    cfg.lvlm.vision_stem = 2;
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 8).unwrap();
    let dir = std::env::temp_dir().join(format!("popen_seg_run_{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    m.save(&dir, &tok).unwrap();
    let (mut back, tok2) = SegModel::<f32, Cpu>::load(Cpu, &dir).unwrap();
    assert_eq!(tok2.vocab_size(), tok.vocab_size());
    assert_eq!(back.cfg, m.cfg);
    // loaded for reading: the LLM's layers packed and fused, the same logits (up to
    // rounding)
    let lm = &back.llava.language_model;
    let l0 = &lm.layers[0];
    assert!(l0.self_attn.o.is_packed() && l0.mlp.down.is_packed());
    assert!(l0.self_attn.is_fused() && l0.mlp.is_fused());
    let ids = [1u32, 5, 7, 9, 2, 3, 4, 6, 8, 10];
    let (l1, _) = lm.forward(&ids, 1, None, None).unwrap();
    let (l2, _) = m.llava.language_model.forward(&ids, 1, None, None).unwrap();
    let scale = l2.iter().fold(1f32, |a, v| a.max(v.abs()));
    let err = l1
        .iter()
        .zip(&l2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, common::close::sticky_max);
    assert!(err <= 1e-5 * scale, "packed logits off by {err}");
    // `params_mut` (and so saving) sees every tensor whole
    let a: Vec<Vec<f32>> = m
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    let b: Vec<Vec<f32>> = back
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    assert!(a == b, "weights changed through save/load");
    // loaded for inference: no gradient buffers until a stage unfreezes its parts
    let mut frozen = 0;
    for (name, t) in back.params_mut() {
        assert!(t.grad.is_none(), "{name} was loaded with a gradient buffer");
        frozen += 1;
    }
    assert_eq!(frozen, a.len());
    back.set_trainable(popen::model::seg::Trainable::default());
    assert!(back.params_mut().iter().all(|(_, t)| t.grad.is_some()));
    // `popen forward` reads the LLaVA part: same LLM logits for the same ids
    let (_, p) = popen::model::pretrained::Pretrained::<f32, Cpu>::load_dir(Cpu, &dir).unwrap();
    let popen::model::pretrained::Pretrained::Llava(llava) = p else {
        panic!("the run directory did not load as LLaVA");
    };
    let ids = [1u32, 5, 7, 9];
    let (l1, _) = llava.language_model.forward(&ids, 1, None, None).unwrap();
    let (l2, _) = m.llava.language_model.forward(&ids, 1, None, None).unwrap();
    assert_eq!(l1, l2);
    // ... and its vision tower, the stem included: the same hidden states
    let pixels: Vec<f32> = (0..3 * 8 * 8).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
    let h1 = llava
        .vision_tower
        .forward(&pixels, 1, 2)
        .unwrap()
        .hidden_states;
    let h2 = m
        .llava
        .vision_tower
        .forward(&pixels, 1, 2)
        .unwrap()
        .hidden_states;
    assert!(m.llava.vision_tower.stem.is_some() && llava.vision_tower.stem.is_some());
    assert_eq!(h1, h2);
    // a run directory of another model is an error naming the tensor
    let mut cfg2 = cfg.clone();
    cfg2.seg_dim = 8;
    let mut other: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg2, &tok, 8).unwrap();
    let e = other
        .load_weights(&dir.join("model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("seg_head") || e.contains("mask_decoder"), "{e}");
    // a config that claims a model larger than its weights file is refused before
    // anything is allocated for it (here 10^6 hidden units: 4·10^12 bytes)
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["text_config"]["hidden_size"] = serde_json::json!(1_000_000);
    j["text_config"]["intermediate_size"] = serde_json::json!(1_000_000);
    std::fs::write(dir.join("config.json"), j.to_string()).unwrap();
    let e = SegModel::<f32, Cpu>::load(Cpu, &dir)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("at least") && e.contains("model.safetensors"),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), text).unwrap();
    assert!(SegModel::<f32, Cpu>::load(Cpu, &dir).is_ok());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_parameter_lower_bound_is_below_the_count_and_near_it() {
    use popen::model::seg::run::min_param_count;
    let tiny = tiny_cfg();
    let default = SegModelConfig {
        lvlm: popen::model::seg::config::TinyLvlm {
            vocab_size: 200,
            ..Default::default()
        },
        ..SegModelConfig::default()
    };
    let mut stem = default.clone();
    stem.lvlm.vision_stem = 32;
    for cfg in [tiny, default, stem] {
        let tok = tokenizer(&cfg);
        let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 1).unwrap();
        let n: u128 = m
            .params_mut()
            .iter()
            .map(|(_, t)| t.data.len() as u128)
            .sum();
        let lo = min_param_count(&cfg, &m.llava.cfg);
        assert!(lo <= n && 2 * lo >= n, "bound {lo} for {n} parameters");
    }
}

#[test]
fn a_pretrained_llava_grows_its_vocabulary_and_trains_with_a_frozen_tower() {
    use popen::model::pretrained::Pretrained;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/llava");
    let (_, p) = Pretrained::<f32, Cpu>::load_dir(Cpu, &dir).unwrap();
    let Pretrained::Llava(llava) = p else {
        panic!("not llava")
    };
    let v0 = llava.cfg.text.vocab_size;
    let img = llava.cfg.image_token_index as u32;
    let mut cfg = tiny_cfg();
    cfg.image_size = llava.cfg.vision.image_size;
    cfg.decoder_layers = [-1, 1];
    let g = cfg.group_len();
    // a wrong <image> id is refused
    let e = SegModel::<f32, Cpu>::from_llava(Cpu, cfg.clone(), llava.clone(), v0 + g, img + 1, 1)
        .unwrap_err();
    assert!(e.to_string().contains("image_token_index"), "{e}");
    let mut m = SegModel::<f32, Cpu>::from_llava(Cpu, cfg.clone(), llava, v0 + g, img, 1).unwrap();
    assert_eq!(m.llava.language_model.cfg.vocab_size, v0 + g);
    // the loaded model's parts are frozen: train the LLM, projector, head and decoder
    m.set_trainable(Trainable {
        vision: false,
        ..Trainable::default()
    });
    let cb: Vec<u32> = (v0 as u32..(v0 + g) as u32).collect();
    let mut ids = vec![1u32, 5, img, 6, 7, 3];
    let answer_start = ids.len();
    ids.push(9);
    let group = ids.len();
    ids.extend(&cb);
    ids.extend([8, 2]);
    let s = cfg.image_size;
    let mut rng = Rng::new(2);
    let ex = Example {
        pixels: Pixels {
            data: (0..3 * s * s).map(|_| rng.normal() as f32).collect(),
            valid_h: s,
            valid_w: s,
            height: s,
            width: s,
        },
        enc: popen::model::seg::Encoded {
            ids,
            image_pos: 2,
            answer_start,
            groups: vec![group],
        },
        masks: vec![(0..s * s).map(|i| f32::from(u8::from(i % 5 < 2))).collect()],
        classes: Default::default(),
        categories: Vec::new(),
    };
    let tower: Vec<Vec<f32>> = m
        .llava
        .vision_tower
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    let emb0 = m.llava.language_model.embed_tokens.weight.data.clone();
    let mut opt = popen::train::AdamW::new(popen::train::AdamWConfig::default());
    let l = m
        .step(std::slice::from_ref(&ex), LossWeights::default(), 1.0, true)
        .unwrap();
    assert!(l.total.is_finite() && l.n_masks == 1);
    opt.step(&Cpu, &mut m.params_mut(), 1e-2).unwrap();
    let after: Vec<Vec<f32>> = m
        .llava
        .vision_tower
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    assert!(tower == after, "the frozen tower moved");
    assert_ne!(
        emb0, m.llava.language_model.embed_tokens.weight.data,
        "the LLM did not train"
    );
}

/// On every test device (the emulator; GPU 0 too under `POPEN_TEST_CUDA=1`, see
/// `Device::test_devices`): one training step's loss and every gradient equal the CPU's
/// (the category losses on, so their heads run on the device too), and the step makes
/// a bounded number of host↔device copies.
#[test]
fn a_training_step_on_the_device_backend_equals_the_cpu() {
    let (cfg, tok, b, w) = with_categories();
    device_step_equals_cpu(&cfg, &tok, &b, w, SEG_STEP_COPIES);
}

/// The same with the presence token, which adds one read-back of the patch head's
/// logits and one upload of the evidence per step (`popen::model::seg::evidence`).
#[test]
fn a_training_step_with_the_presence_tokens_on_the_device_backend_equals_the_cpu() {
    for kind in [PresenceTokens::One, PresenceTokens::PerCategory] {
        let (mut cfg, tok, b, w) = with_categories();
        cfg.presence_tokens = kind;
        device_step_equals_cpu(&cfg, &tok, &b, w, SEG_STEP_COPIES + 2);
    }
}

fn device_step_equals_cpu(
    cfg: &SegModelConfig,
    tok: &SegTokenizer,
    b: &[Example],
    w: LossWeights,
    max_copies: u64,
) {
    use popen::backend::DeviceBackend;
    let mut c: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), tok, 6).unwrap();
    let lc = c.step(b, w, 1.0, true).unwrap();
    assert!(lc.patch_class > 0.0 && lc.seg_class > 0.0, "{lc:?}");
    let gc: Vec<(String, Vec<f32>)> = c
        .params_mut()
        .into_iter()
        .map(|(n, t)| (n, t.grad.clone().unwrap()))
        .collect();
    for device in popen::kernels::Device::test_devices() {
        let kind = device.kind();
        let dev = DeviceBackend::new(device);
        let mut d: SegModel<f32, DeviceBackend> =
            SegModel::new_tiny(dev.clone(), cfg.clone(), tok, 6).unwrap();
        let before = dev.device().copies();
        let ld = d.step(b, w, 1.0, true).unwrap();
        let after = dev.device().copies();
        // per step, not per layer or per mask (the batch has 3 masks of one size); with
        // the pixel decoder's ops staged through the host, one read-back per mask and the
        // key mask uploaded per layer this step made 97
        let copies = (after.htod - before.htod) + (after.dtoh - before.dtoh);
        assert!(
            copies <= max_copies,
            "{kind:?}: {copies} host<->device copies in one step ({} up, {} down)",
            after.htod - before.htod,
            after.dtoh - before.dtoh
        );
        assert!(
            (lc.total - ld.total).abs() <= 1e-4 * lc.total.abs(),
            "{kind:?}: {lc:?} vs {ld:?}"
        );
        let gd: Vec<Vec<f32>> = d
            .params_mut()
            .into_iter()
            .map(|(_, t)| dev.to_vec(t.grad.as_ref().unwrap()))
            .collect();
        assert_eq!(gc.len(), gd.len());
        for ((n, a), b) in gc.iter().zip(&gd) {
            let scale = a.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| {
                common::close::sticky_max(m, (x - y).abs())
            });
            // (+1e-7: the decoder's key biases get a gradient that is zero up to rounding)
            assert!(
                err <= 1e-4 * scale + 1e-7,
                "{kind:?} {n}: gradients differ by {err} (scale {scale})"
            );
        }
    }
}

/// Host↔device copies one segmentation training step may make, none per layer or per
/// mask: up, the ids (embedding forward and backward, the codebook rows), the pixels,
/// the labels and the heads' labels, the positional encodings (one per scale), the mask
/// targets (one upload), d log p; down, the log-probs, the mask losses (one per image
/// size), the pair losses of instance matching's alike targets (one per image size) and
/// the three head losses (the place loss twice: once more when matching reorders its
/// labels).  Measured: 21 up, 6 down, on a batch whose examples run the LLM as one
/// group of lengths (`popen::model::seg::layout`); each further group adds its own
/// uploads (ids, targets, d log p) and its download of log-probs.
const SEG_STEP_COPIES: u64 = 27;

#[test]
fn batched_prediction_is_each_question_predicted_alone() {
    // Questions of three prompt lengths, several per length, so rows of one batch end at
    // different steps and leave it while the others run on.  With room for 12 new
    // tokens every prompt fits the context: the CPU decodes them in two sets of five,
    // each holding two lengths, the shorter padded.
    batched_prediction_equals_alone(12);
}

#[test]
fn batched_prediction_that_reaches_the_context_end_is_each_question_alone() {
    // Room for exactly as many new tokens as the middle prompt length has before the
    // context's end: the two shorter lengths decode together (padded), the longest
    // apart, and its answers stop at the context's end as they would alone.  Padded to
    // the longest, the shorter rows would stop there too, earlier than alone.
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let m: SegModel = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 21).unwrap();
    let lens: std::collections::BTreeSet<usize> = PREDICT_QUESTIONS
        .iter()
        .map(|q| tok.prompt(&cfg.system_prompt, q).unwrap().0.len() - 1 + m.tokens_per_image())
        .collect();
    let lens: Vec<usize> = lens.into_iter().collect();
    assert_eq!(lens.len(), 3, "prompt lengths {lens:?}");
    let ctx = cfg.lvlm.max_positions;
    let max_new = ctx - lens[1];
    let all = batched_prediction_equals_alone(max_new);
    let eos = tok.tok.eos;
    let cut =
        |p: &&popen::model::seg::Prediction| p.ids.len() < max_new && p.ids.last() != Some(&eos);
    assert!(
        all.iter().flatten().any(|p| cut(&p)),
        "no answer stopped at the context's end (lengths {lens:?}, room for {max_new})"
    );
    // a shorter row ran past where the longest prompt's rows stop
    assert!(
        all.iter().flatten().any(|p| p.ids.len() > ctx - lens[2]),
        "no answer ran past {} tokens",
        ctx - lens[2]
    );
}

/// Questions of three prompt lengths, more than the CPU decodes in one set (8): two
/// padded sets.
const PREDICT_QUESTIONS: [&str; 10] = [
    "Where is the cup?",
    "Find the red apples.",
    "Where is the cup?",
    "Nothing fits.",
    "Find the red apples.",
    "Where is the cup?",
    "Find the red apples.",
    "Where is the cup?",
    "Nothing fits.",
    "Find the red apples.",
];

/// Checks that `predict` over [`PREDICT_QUESTIONS`] in one batch answers each as it
/// would alone, greedy and sampled; returns the batches' predictions.
fn batched_prediction_equals_alone(
    max_new_tokens: usize,
) -> Vec<Vec<popen::model::seg::Prediction>> {
    let cfg = SegModelConfig {
        max_new_tokens,
        ..tiny_cfg()
    };
    let tok = tokenizer(&cfg);
    let m: SegModel = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 21).unwrap();
    let mut rng = Rng::new(8);
    let qs = PREDICT_QUESTIONS;
    let px: Vec<Pixels> = qs
        .iter()
        .map(|q| example(&cfg, &tok, &mut rng, q, "Nothing fits.").pixels)
        .collect();
    let items: Vec<(&Pixels, &str)> = px.iter().zip(qs).collect();
    let (mut mixed, mut out) = (false, Vec::new());
    for (seed, temperature) in [(0, 0.0), (1, 3.0), (2, 3.0), (3, 3.0), (4, 3.0)] {
        let sc = |s: u64| popen::nn::SamplingCfg {
            temperature,
            seed: s,
            ..popen::nn::SamplingCfg::greedy()
        };
        let all = m.predict(&tok, &items, &sc(seed)).unwrap();
        assert_eq!(all.len(), items.len());
        for (i, it) in items.iter().enumerate() {
            let one = m
                .predict(&tok, &[*it], &sc(seed + i as u64))
                .unwrap()
                .remove(0);
            let b = &all[i];
            let at = format!("max_new {max_new_tokens}, seed {seed}, item {i}");
            assert_eq!(b.ids, one.ids, "{at}");
            assert_eq!(b.text, one.text, "{at}");
            assert_eq!(b.masks, one.masks, "{at}");
            for (x, y) in b.logps.iter().zip(&one.logps) {
                assert!((x - y).abs() < 1e-5, "{at}: {x} vs {y}");
            }
        }
        let lens: std::collections::BTreeSet<usize> = all.iter().map(|p| p.ids.len()).collect();
        mixed |= temperature > 0.0 && lens.len() > 1;
        out.push(all);
    }
    assert!(mixed, "no batch had rows ending at different steps");
    out
}

/// A batch of very different lengths runs the LLM in several groups
/// (`popen::model::seg::layout`), and every example's log-probs, mask losses and
/// gradients are those of its own pass: the grouping changes nothing but the order of
/// the sums.  The backward is given weights per log-prob and per mask, so the batch's
/// gradient is the sum of the examples'.
#[test]
fn a_batch_in_length_groups_is_each_example_alone() {
    let mut cfg = tiny_cfg();
    cfg.lvlm.max_positions = 128;
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 9).unwrap();
    let mut rng = Rng::new(12);
    let long_q = "Where is the cup? Find the red apples. Where is the cup? Find the red apples.";
    let cup = ("Where is the cup?", "The cup <seg> is on the table.");
    let none = ("Find the red apples.", "Nothing fits.");
    let qa = [
        cup,
        (long_q, "I see two apples <seg> <seg> here."),
        none,
        cup,
        none,
    ];
    let b: Vec<Example> = qa
        .iter()
        .map(|(q, a)| example(&cfg, &tok, &mut rng, q, a))
        .collect();
    let lens: Vec<usize> = b.iter().map(|e| e.enc.ids.len()).collect();
    let weights = |pass: &popen::model::seg::pass::TrainPass<Vec<f64>>| {
        let mut d = vec![0.0; pass.logp.len()];
        for rows in &pass.answer_rows {
            for (i, &r) in rows.iter().enumerate() {
                d[r] = 0.3 + 0.1 * i as f64;
            }
        }
        d
    };
    let mask_w = (0.7, 0.4);
    let backward = |m: &mut SegModel<f64, Cpu>, exs: &[Example]| {
        for (_, t) in m.params_mut() {
            t.zero_grad(&Cpu);
        }
        let pass = m.forward_pass(exs).unwrap();
        let d = weights(&pass);
        m.backward_pass(exs, pass, &d, mask_w, None, HeadWeights::NONE)
            .unwrap();
        common::seg::grads_of(m)
    };
    let pass = m.forward_pass(&b).unwrap();
    let longest = lens.iter().max().unwrap() + m.tokens_per_image() - 1;
    assert!(
        pass.logp.len() < b.len() * longest,
        "one group: {} positions for lengths {lens:?}",
        pass.logp.len()
    );
    let mut masks = Vec::new();
    let mut sum: Vec<(String, Option<Vec<f64>>)> = Vec::new();
    for (r, ex) in b.iter().enumerate() {
        let one = m.forward_pass(std::slice::from_ref(ex)).unwrap();
        let (rb, ro) = (&pass.answer_rows[r], &one.answer_rows[0]);
        assert_eq!(rb.len(), ro.len(), "example {r}");
        for (&i, &j) in rb.iter().zip(ro) {
            let (x, y) = (pass.logp[i], one.logp[j]);
            assert!((x - y).abs() < 1e-12, "example {r}: log p {x} vs {y}");
        }
        masks.extend(one.mask_losses);
        let g = backward(&mut m, std::slice::from_ref(ex));
        if sum.is_empty() {
            sum = g;
        } else {
            for ((_, s), (_, x)) in sum.iter_mut().zip(g) {
                if let (Some(s), Some(x)) = (s, x) {
                    s.iter_mut().zip(x).for_each(|(s, x)| *s += x);
                }
            }
        }
    }
    assert_eq!(masks.len(), pass.mask_losses.len());
    for ((b0, d0), (b1, d1)) in pass.mask_losses.iter().zip(&masks) {
        assert!((b0 - b1).abs() < 1e-12 && (d0 - d1).abs() < 1e-12);
    }
    let all = backward(&mut m, &b);
    for ((name, g), (_, s)) in all.iter().zip(&sum) {
        let (Some(g), Some(s)) = (g, s) else { continue };
        let scale = s.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
        let err = g.iter().zip(s).fold(0f64, |a, (x, y)| {
            common::close::sticky_max(a, (x - y).abs())
        });
        assert!(
            err < 1e-10 * scale.max(1.0),
            "{name}: {err} (scale {scale})"
        );
    }
}
