//! Whole-model gradient checks in f64 (ViT → projector → LLaMA → codebook projection →
//! pixel decoder, through `CE + 2·BCE + 0.5·Dice`), instance matching, frozen parts
//! untouched.
use super::*;

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
