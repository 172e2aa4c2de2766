//! Prompts and answers: the presence tokens read alike in training and inference,
//! codebook groups, answers to read, bad examples as errors.
use super::*;

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
