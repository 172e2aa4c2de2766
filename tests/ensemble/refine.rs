//! The refined answer: the biased forward of the concatenation, padded prefixes,
//! prompts of the wrong width, refinements past the context.
use super::*;

#[test]
fn the_refined_answer_is_the_biased_forward_of_the_concatenation() {
    for (seed, gamma_on) in [(4, true), (5, true), (6, false)] {
        let (m, tok) = model(seed);
        let px = pixels(&m.cfg, seed + 10);
        let ecfg = EnsembleCfg {
            gamma: gamma_on,
            seg: false,
            ..Default::default()
        };
        let ends = sentence_ends(&tok.tok);
        let e = m
            .predict_ensemble(&tok, &[(&px, Q)], &ecfg, 7, None, &ends)
            .unwrap()
            .remove(0);
        assert!(!e.fallback);
        // the same input, built by hand and run without a cache
        let be = &m.llava.be;
        let lm = &m.llava.language_model;
        let hdim = m.llava.cfg.text.hidden_size;
        let k = m.tokens_per_image();
        let (prompt, image_pos) = tok.prompt("", Q).unwrap();
        let header = tok.answer_header().unwrap();
        assert!(!header.is_empty(), "the prompt ends with its answer header");
        let body = &prompt[..prompt.len() - header.len()];
        let mut ids: Vec<u32> = body[..image_pos].to_vec();
        ids.extend(std::iter::repeat_n(body[image_pos], k));
        ids.extend_from_slice(&body[image_pos + 1..]);
        let mut bias = vec![0f32; ids.len()];
        for s in &e.samples {
            let n = s
                .ids
                .iter()
                .position(|&t| t == tok.tok.eos)
                .unwrap_or(s.ids.len());
            let sent = sentence_index(&s.ids[..n], &ends);
            let tau = token_scores(&s.logps[..n], &sent, TauMode::Both);
            ids.extend_from_slice(&s.ids[..n]);
            bias.extend(tau.iter().map(|&t| if gamma_on { gamma(t) } else { 0.0 }));
        }
        ids.extend_from_slice(&header);
        bias.resize(ids.len(), 0.0);
        // teacher-force the refined answer (EOS included) after it
        let ans = &e.answer.ids;
        let t0 = ids.len();
        ids.extend_from_slice(&ans[..ans.len() - 1]);
        bias.resize(ids.len(), 0.0);
        let enc = m.encode_images(&[&px]).unwrap().remove(0);
        let mut x = lm.embed(&ids).unwrap();
        be.copy_range(&mut x, image_pos * hdim, &enc.tokens, 0, k * hdim)
            .unwrap();
        let b = be.from_slice(&bias);
        let (logits, _) = lm
            .forward_embeds(x, 1, ids.len(), None, Some(&b), None)
            .unwrap();
        let logits = be.to_vec(&logits);
        let v = m.llava.cfg.text.vocab_size;
        for (j, (&want, &lp)) in ans.iter().zip(&e.answer.logps).enumerate() {
            let row = &logits[(t0 - 1 + j) * v..(t0 + j) * v];
            let arg = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert_eq!(arg as u32, want, "seed {seed}: token {j}");
            let mx = row[arg];
            let lse = mx + row.iter().map(|&z| (z - mx).exp()).sum::<f32>().ln();
            assert!(
                (row[arg] - lse - lp).abs() < 1e-4,
                "seed {seed}: logp of token {j}"
            );
        }
    }
}

#[test]
fn padded_prefixes_refine_as_alone_up_to_the_context_end() {
    // A padded question's two halves continue from its padded prefix when they fit the
    // context after the pads too, and read the prompt again alone when they do not:
    // either way the answer is the question's alone.  Contexts from where the prompts
    // barely fit with one answer to where every refinement fits.
    let qs = [
        "Where is the cup?",
        "Which of the things on the table is the cup?",
        "Where is the apple?",
        "Which one is the apple?",
    ];
    let (mut refined, mut fell_back) = (0, 0);
    for ctx in (44..=128).step_by(6) {
        let mut c = cfg();
        c.lvlm.max_positions = ctx;
        let tok = tokenizer(&c);
        let m: SegModel = SegModel::new_tiny(Cpu, c, &tok, 9).unwrap();
        let pxs: Vec<Pixels> = (0..4).map(|i| pixels(&m.cfg, 40 + i)).collect();
        let items: Vec<(&Pixels, &str)> = pxs.iter().zip(qs).collect();
        let ends = sentence_ends(&tok.tok);
        let ecfg = EnsembleCfg::default();
        let Ok(all) = m.predict_ensemble(&tok, &items, &ecfg, 3, None, &ends) else {
            continue; // a prompt longer than this context
        };
        for (i, it) in items.iter().enumerate() {
            let one = m
                .predict_ensemble(&tok, &[*it], &ecfg, 3 + i as u64, None, &ends)
                .unwrap()
                .remove(0);
            let what = format!("context {ctx}, item {i}");
            same_answer(&one.answer, &all[i].answer, &what);
            assert_eq!(one.fallback, all[i].fallback, "{what}");
            if one.fallback {
                fell_back += 1;
            } else {
                refined += 1;
            }
        }
    }
    assert!(
        refined > 4 && fell_back > 4,
        "refined {refined}, fell back {fell_back}"
    );
}

#[test]
fn a_prompt_of_the_wrong_width_is_an_error() {
    let (m, tok) = model(10);
    let px = pixels(&m.cfg, 20);
    let ends = sentence_ends(&tok.tok);
    let bad = m.llava.be.from_slice(&[0.0; 7]);
    let err = m
        .predict_ensemble(
            &tok,
            &[(&px, Q)],
            &EnsembleCfg::default(),
            0,
            Some(&bad),
            &ends,
        )
        .unwrap_err();
    assert!(err.to_string().contains("hidden size"), "{err}");
    let k0 = EnsembleCfg {
        k: 0,
        ..Default::default()
    };
    assert!(m
        .predict_ensemble(&tok, &[(&px, Q)], &k0, 0, None, &ends)
        .is_err());
}

#[test]
fn a_refinement_longer_than_the_context_is_skipped_not_an_error() {
    let mut c = cfg();
    c.lvlm.max_positions = 40;
    let tok = tokenizer(&c);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, c, &tok, 5).unwrap();
    m.set_trainable(Trainable::frozen());
    let mut rng = Rng::new(78);
    let d = refine_data(&m, &tok, &mut rng);
    let hdim = m.llava.cfg.text.hidden_size;
    let prompt = vec![0.1; 3 * hdim];
    let (l, g) = m.refine_loss(&tok, &d, &prompt, true).unwrap();
    assert_eq!((l.lti, l.lsi), (None, None));
    assert!(g.unwrap().iter().all(|&x| x == 0.0));
    // a prompt of the wrong width is an error, not a skip
    assert!(m.refine_loss(&tok, &d, &prompt[1..], false).is_err());
}
