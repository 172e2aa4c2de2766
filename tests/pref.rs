//! Stage 2 (text preference): Eq. 3's weights by hand, `Lt` at the start of the stage
//! (policy = reference) equal to ln 2, and the whole stage-2 objective's gradient through
//! the segmentation model against finite differences in f64.
use popen::backend::Cpu;
use popen::method::pref::collect::seq_logps;
use popen::method::pref::contrast::ContrastRow;
use popen::method::pref::{pref_step, Eq3Norm, PrefItem, PrefLossCfg};
use popen::model::seg::{Example, HeadWeights, Pixels, SegModel, SegModelConfig, SegTokenizer};
use popen::nn::Rng;

mod common;
use common::seg::tiny_cfg;

#[test]
fn eq3_weights_by_hand() {
    let paper = PrefLossCfg::default();
    assert_eq!(paper.norm, Eq3Norm::Tokens);
    // λ = 5 on position 1 of 4 tokens, divided by |y| = 4
    assert_eq!(paper.eq3_weights(4, &[1]), vec![0.25, 1.25, 0.25, 0.25]);
    // a repeated or out-of-range position changes nothing more
    assert_eq!(
        paper.eq3_weights(4, &[1, 1, 9]),
        vec![0.25, 1.25, 0.25, 0.25]
    );
    // RLHF-V: divided by the weighted count 4 + (5 − 1)·1 = 8
    let rlhfv = PrefLossCfg {
        norm: Eq3Norm::Weighted,
        ..PrefLossCfg::default()
    };
    assert_eq!(rlhfv.eq3_weights(4, &[1]), vec![0.125, 0.625, 0.125, 0.125]);
    // --no-lambda: plain mean
    let flat = PrefLossCfg {
        lambda: 1.0,
        ..PrefLossCfg::default()
    };
    assert_eq!(flat.eq3_weights(2, &[0]), vec![0.5, 0.5]);
    assert!(paper.eq3_weights(0, &[]).is_empty());
}

fn tokenizer(cfg: &SegModelConfig) -> SegTokenizer {
    let texts: Vec<String> = [
        "Where is the cup?",
        "The cup <seg> is on the table.",
        "The apple <seg> is on the table.",
        "I see two apples <seg> <seg> here.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    SegTokenizer::train(&texts, cfg.lvlm.vocab_size, cfg.group_len()).unwrap()
}

/// One pair on a random 5×7 image: `y` names the apple, `yc` the cup; the ground truth
/// is `yc` with a random mask.
fn item(cfg: &SegModelConfig, tok: &SegTokenizer, rng: &mut Rng) -> PrefItem {
    let s = cfg.image_size;
    let (h, w) = (5, 7);
    let (vh, vw) = popen::model::seg::preprocess::fit(h, w, s);
    let pixels = Pixels {
        data: (0..3 * s * s).map(|_| rng.normal() as f32).collect(),
        valid_h: vh,
        valid_w: vw,
        height: h,
        width: w,
    };
    let q = "Where is the cup?";
    let (y, yc) = (
        "The apple <seg> is on the table.",
        "The cup <seg> is on the table.",
    );
    let text = |a: &str| Example {
        pixels: pixels.clone(),
        enc: tok.encode("", q, a).unwrap(),
        masks: vec![],
        classes: Default::default(),
        categories: Vec::new(),
    };
    let (ey, eyc) = (text(y), text(yc));
    let (ly, lyc) = popen::data::diff::changed_positions(
        &ey.enc.ids[ey.enc.answer_start..],
        &eyc.enc.ids[eyc.enc.answer_start..],
    );
    assert!(!ly.is_empty() && !lyc.is_empty(), "the two answers differ");
    let mask = (0..h * w)
        .map(|_| f32::from(u8::from(rng.uniform() < 0.4)))
        .collect();
    let gt = Example {
        masks: vec![mask],
        ..text(yc)
    };
    PrefItem {
        y: ey,
        yc: eyc,
        ly,
        lyc,
        ref_y: 0.0,
        ref_yc: 0.0,
        gt,
        ps: None,
        reread: None,
        contrast: None,
    }
}

/// `it`'s chosen answer on another random image (`[loss] image_pref`'s contrast row).
fn contrast_row(it: &PrefItem, rng: &mut Rng, ref_yc: f64) -> ContrastRow {
    let mut pixels = it.yc.pixels.clone();
    pixels
        .data
        .iter_mut()
        .for_each(|x| *x = rng.normal() as f32);
    ContrastRow {
        example: Example {
            pixels,
            ..it.yc.clone()
        },
        ref_yc,
    }
}

/// `it`'s question asked again after reading `read`, answered with its ground truth.
fn reread_row(tok: &SegTokenizer, it: &PrefItem, read: &[&str]) -> Example {
    let read: Vec<String> = read.iter().map(|r| r.to_string()).collect();
    Example {
        enc: tok
            .encode_reading(
                "",
                "Where is the cup?",
                &read,
                "The cup <seg> is on the table.",
            )
            .unwrap(),
        ..it.gt.clone()
    }
}

#[test]
fn lt_is_ln2_when_the_policy_is_the_reference() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 3).unwrap();
    common::seg::stage2(&mut m);
    let mut rng = Rng::new(5);
    let mut items: Vec<PrefItem> = (0..2).map(|_| item(&cfg, &tok, &mut rng)).collect();
    let lc = PrefLossCfg::default();
    // the reference's cached values, computed the way collection does
    for it in &mut items {
        let lp = seq_logps(&m, &[it.y.clone(), it.yc.clone()], &[&it.ly, &it.lyc], &lc).unwrap();
        (it.ref_y, it.ref_yc) = (lp[0], lp[1]);
    }
    // the image-conditional term on one pair, its reference on the contrast image
    // cached the same way
    let lc_img = PrefLossCfg {
        image_pref: 1.0,
        ..lc.clone()
    };
    let mut c = contrast_row(&items[1], &mut rng, 0.0);
    c.ref_yc = seq_logps(&m, &[c.example.clone()], &[&items[1].lyc], &lc).unwrap()[0];
    items[1].contrast = Some(c);
    let r = pref_step(&mut m, &items, &lc_img, 1.0, false).unwrap();
    assert!(
        (r.parts["image_pref"] - std::f64::consts::LN_2).abs() < 1e-12,
        "{:?}",
        r.parts
    );
    // off by its weight: no part, and the same Lt
    let r = pref_step(&mut m, &items, &lc, 1.0, false).unwrap();
    assert!(!r.parts.contains_key("image_pref"), "{:?}", r.parts);
    assert!(
        (r.parts["lt"] - std::f64::consts::LN_2).abs() < 1e-12,
        "{:?}",
        r.parts
    );
    assert_eq!(r.parts["reward_margin"], 0.0);
    // no re-read row, no re-read part
    assert!(!r.parts.contains_key("reread"), "{:?}", r.parts);
    // a wrong cache (the pair's two values swapped) moves it off ln 2
    let (a, b) = (items[0].ref_y, items[0].ref_yc);
    (items[0].ref_y, items[0].ref_yc) = (b, a);
    let r = pref_step(&mut m, &items, &lc, 1.0, false).unwrap();
    assert!((r.parts["lt"] - std::f64::consts::LN_2).abs() > 1e-6);
}

#[test]
fn stage2_gradient_matches_finite_differences() {
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 4).unwrap();
    common::seg::stage2(&mut m);
    let mut rng = Rng::new(8);
    let mut items: Vec<PrefItem> = (0..2).map(|_| item(&cfg, &tok, &mut rng)).collect();
    // references off the policy, so that σ(−z) is not ½ and both signs occur
    (items[0].ref_y, items[0].ref_yc) = (-3.1, -4.4);
    (items[1].ref_y, items[1].ref_yc) = (-5.0, -2.2);
    // with the optional NLL of the chosen answer, so its gradient is checked too
    let lc = PrefLossCfg {
        nll: 0.7,
        image_pref: 0.8,
        ..PrefLossCfg::default()
    };
    // and the image-conditional term on the second pair (its reference off the policy)
    items[1].contrast = Some(contrast_row(&items[1], &mut rng, -3.7));
    // and a re-read row (`[collect] reread`) on the first pair
    let row = reread_row(&tok, &items[0], &["The apple <seg> is on the table."]);
    items[0].reread = Some(row.clone());
    for (_, t) in m.params_mut() {
        t.zero_grad(&Cpu);
    }
    let r = pref_step(&mut m, &items, &lc, 1.0, true).unwrap();
    assert!(
        r.loss.is_finite()
            && r.parts["lt"] > 0.0
            && r.parts["nll"] > 0.0
            && r.parts["image_pref"] > 0.0,
        "{r:?}"
    );
    // R = −(1/B)·(1/|a|)·Σ log p over the re-read answer, B = 2 pairs
    let pass = m.forward_pass(std::slice::from_ref(&row)).unwrap();
    let rows = &pass.answer_rows[0];
    assert!(rows.len() >= 5, "{rows:?}");
    let want = -rows.iter().map(|&i| pass.logp[i]).sum::<f64>() / rows.len() as f64 / 2.0;
    assert!(
        (r.parts["reread"] - want).abs() < 1e-12,
        "{} vs {want}",
        r.parts["reread"]
    );
    let grads = common::seg::grads_of(&mut m);
    // frozen parts have no gradient slot
    for (n, g) in &grads {
        let frozen = n.contains("vision_tower") || n.starts_with("mask_decoder");
        assert_eq!(g.is_none(), frozen, "{n}");
    }
    let (checked, _) = common::seg::check_param_grads(&mut m, &grads, 11, |m| {
        pref_step(m, &items, &lc, 1.0, false).unwrap().loss
    });
    assert!(checked >= 20, "{checked}");
}

#[test]
fn seg_embedding_gradient_matches_finite_differences() {
    // L = Σ c·f over the batch's segmentation embeddings (what Ls feeds back), through
    // the codebook head and the LLM; the decoder and tower are frozen
    let cfg = tiny_cfg();
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 6).unwrap();
    common::seg::stage2(&mut m);
    let mut rng = Rng::new(2);
    let batch: Vec<Example> = (0..2).map(|_| item(&cfg, &tok, &mut rng).gt).collect();
    let pass = m.forward_pass(&batch).unwrap();
    let f = pass.seg_embeddings(&Cpu);
    assert_eq!(f.len(), 2 * cfg.scales * cfg.seg_dim);
    let c: Vec<f64> = (0..f.len()).map(|_| rng.normal()).collect();
    let loss = |m: &SegModel<f64, Cpu>| -> f64 {
        let f = m.forward_pass(&batch).unwrap().seg_embeddings(&Cpu);
        f.iter().zip(&c).map(|(a, b)| a * b).sum()
    };
    for (_, t) in m.params_mut() {
        t.zero_grad(&Cpu);
    }
    let dlogp = vec![0.0; pass.logp.len()];
    m.backward_pass(
        &batch,
        pass,
        &dlogp,
        (0.0, 0.0),
        Some(&c),
        HeadWeights::NONE,
    )
    .unwrap();
    let grads = common::seg::grads_of(&mut m);
    let (checked, nonzero) = common::seg::check_param_grads(&mut m, &grads, 12, |m| loss(m));
    assert!(
        checked >= 20 && nonzero > 0,
        "{checked} checked, {nonzero} nonzero"
    );
    // a gradient for embeddings of a batch that decoded none is an error
    let text: Vec<Example> = batch
        .iter()
        .map(|e| Example {
            masks: vec![],
            ..e.clone()
        })
        .collect();
    let pass = m.forward_pass(&text).unwrap();
    let dl = vec![0.0; pass.logp.len()];
    assert!(m
        .backward_pass(&text, pass, &dl, (0.0, 0.0), Some(&c), HeadWeights::NONE)
        .is_err());
}
