//! Masks: decoded and refined masks against teacher-forced reads, the answer without
//! the samples' masks, the consensus answer.
use super::*;

/// A model that answers in codebook tokens only (every other row of the LM head zeroed,
/// the codebook's scaled up), so that its samples and its refined answer carry targets.
fn codebook_model(seed: u64) -> (SegModel, SegTokenizer) {
    let mut c = cfg();
    c.tokens_per_scale = 1; // groups of 2 codebook tokens
    let tok = tokenizer(&c);
    let mut m = SegModel::new_tiny(Cpu, c, &tok, seed).unwrap();
    let cb = tok.codebook.clone();
    edit_rows(&mut m, "lm_head.weight", |r, row| {
        let keep = cb.contains(&(r as u32));
        row.iter_mut()
            .for_each(|x| *x = if keep { *x * 40.0 } else { 0.0 });
    });
    (m, tok)
}

/// Applies `f(r, row)` to every row of the matrix whose name ends with `suffix`.
fn edit_rows(m: &mut SegModel, suffix: &str, f: impl Fn(usize, &mut [f32])) {
    let be = m.llava.be;
    let mut found = false;
    for (name, t) in m.params_mut() {
        if name.ends_with(suffix) {
            let c = t.shape[1];
            let mut w = be.to_vec(&t.data);
            w.chunks_mut(c).enumerate().for_each(|(r, row)| f(r, row));
            t.data = be.from_slice(&w);
            found = true;
        }
    }
    assert!(found, "no parameter named *{suffix}");
}

/// `p`'s mask logits against those of its answer read teacher-forced after `q` on `px`
/// (the training pass, [`SegModel::target_embeddings`]): the decode must have kept, for
/// each codebook group, the hidden rows that predicted its tokens.  Returns how many
/// masks it compared.
fn masks_as_read_teacher_forced(
    m: &SegModel,
    tok: &SegTokenizer,
    px: &Pixels,
    q: &str,
    p: &popen::model::seg::Prediction,
    what: &str,
) -> usize {
    let (mut ids, image_pos) = tok.prompt(&m.cfg.system_prompt, q).unwrap();
    let answer_start = ids.len();
    let (_, groups) = tok.decode_answer(&p.ids).unwrap();
    assert_eq!(groups.len(), p.logits.len(), "{what}: a mask per group");
    let eos = tok.tok.eos;
    ids.extend(p.ids.iter().copied().take_while(|&t| t != eos));
    ids.push(eos);
    let ex = popen::model::seg::Example {
        pixels: px.clone(),
        enc: popen::model::seg::Encoded {
            ids,
            image_pos,
            answer_start,
            groups: groups.iter().map(|g| answer_start + g).collect(),
        },
        masks: vec![vec![0.0; px.height * px.width]; groups.len()],
        classes: Default::default(),
        categories: Vec::new(),
    };
    let (_, want) = m.target_embeddings(&[ex]).unwrap();
    assert_eq!(want.len(), p.logits.len(), "{what}");
    for (a, b) in p.logits.iter().zip(&want) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{what}: {x} vs {y}");
        }
    }
    want.len()
}

#[test]
fn decoded_masks_are_those_of_the_answer_read_teacher_forced() {
    // answers of codebook groups, decoded several questions at once (one answer each,
    // and K samples each): each answer's masks come from the rows that predicted its
    // groups' tokens, as the training pass reads them
    let qs = [Q, "Find the red apples.", Q, "Where is it?"];
    let mut checked = (0, 0);
    for seed in 20..36 {
        let (m, tok) = codebook_model(seed);
        let px: Vec<Pixels> = (0..qs.len() as u64)
            .map(|i| pixels(&m.cfg, seed + 10 + i))
            .collect();
        let items: Vec<(&Pixels, &str)> = px.iter().zip(qs).collect();
        let sc = SamplingCfg {
            temperature: 0.7,
            seed,
            ..SamplingCfg::greedy()
        };
        for (i, p) in m.predict(&tok, &items, &sc).unwrap().iter().enumerate() {
            let what = format!("seed {seed}, item {i}");
            checked.0 += masks_as_read_teacher_forced(&m, &tok, &px[i], qs[i], p, &what);
        }
        let ecfg = EnsembleCfg::default();
        let ends = sentence_ends(&tok.tok);
        let all = m
            .predict_ensemble(&tok, &items, &ecfg, seed, None, &ends)
            .unwrap();
        for (i, e) in all.iter().enumerate() {
            for (j, s) in e.samples.iter().enumerate() {
                let what = format!("seed {seed}, item {i}, sample {j}");
                checked.1 += masks_as_read_teacher_forced(&m, &tok, &px[i], qs[i], s, &what);
            }
        }
    }
    assert!(
        checked.0 >= 10 && checked.1 >= 10,
        "masks compared: {checked:?}"
    );
}

#[test]
fn refined_masks_are_the_biased_forward_over_the_samples_embeddings() {
    let mut checked = 0;
    for seed in 20..40 {
        let (m, tok) = codebook_model(seed);
        let px = pixels(&m.cfg, seed + 10);
        let ends = sentence_ends(&tok.tok);
        let ecfg = EnsembleCfg::default();
        let e = m
            .predict_ensemble(&tok, &[(&px, Q)], &ecfg, seed, None, &ends)
            .unwrap()
            .remove(0);
        let groups = |ids: &[u32]| tok.decode_answer(ids).unwrap().1;
        let n_f: usize = e.samples.iter().map(|s| groups(&s.ids).len()).sum();
        if e.fallback || e.answer.masks.is_empty() || n_f == 0 {
            continue;
        }
        let be = &m.llava.be;
        let lm = &m.llava.language_model;
        let hdim = m.llava.cfg.text.hidden_size;
        let k = m.tokens_per_image();
        let g = m.cfg.group_len();
        let enc = m.encode_images(&[&px]).unwrap().remove(0);
        let (prompt, image_pos) = tok.prompt("", Q).unwrap();
        let header = tok.answer_header().unwrap();
        let mut full: Vec<u32> = prompt[..image_pos].to_vec();
        full.extend(std::iter::repeat_n(prompt[image_pos], k));
        full.extend_from_slice(&prompt[image_pos + 1..]);
        let body_len = full.len() - header.len();
        let embed = |ids: &[u32]| {
            let mut x = lm.embed(ids).unwrap();
            be.copy_range(&mut x, image_pos * hdim, &enc.tokens, 0, k * hdim)
                .unwrap();
            x
        };
        // each sample's codebook hidden rows, from an uncached forward of prompt + sample
        let eos = tok.tok.eos;
        let strip =
            |ids: &[u32]| ids[..ids.iter().position(|&t| t == eos).unwrap_or(ids.len())].to_vec();
        let mut f_rows: Vec<f32> = Vec::new();
        let mut f_bias: Vec<f32> = Vec::new();
        let mut ys: Vec<u32> = Vec::new();
        for (s, eta) in e.samples.iter().zip(&e.eta) {
            let ids = strip(&s.ids);
            let seq = [full.clone(), ids.clone()].concat();
            let (_, acts) = lm
                .forward_embeds(embed(&seq), 1, seq.len(), None, None, None)
                .unwrap();
            let h = be.to_vec(&acts.hidden);
            for (&g0, &et) in groups(&ids).iter().zip(eta) {
                for j in 0..g {
                    let r = full.len() + g0 + j - 1;
                    f_rows.extend_from_slice(&h[r * hdim..(r + 1) * hdim]);
                    f_bias.push(gamma(et));
                }
            }
            ys.extend_from_slice(&ids);
        }
        // [body, y_1 … y_K, f, header, ỹ] with γ(η) on the f keys only
        let ans = strip(&e.answer.ids);
        let mut ids: Vec<u32> = full[..body_len].to_vec();
        ids.extend_from_slice(&ys);
        let f_at = ids.len();
        let n_f_rows = f_bias.len();
        ids.extend(std::iter::repeat_n(0, n_f_rows)); // placeholders, overwritten
        ids.extend_from_slice(&header);
        let ans_at = ids.len();
        ids.extend_from_slice(&ans);
        let mut x = embed(&ids);
        be.copy_range(
            &mut x,
            f_at * hdim,
            &be.from_slice(&f_rows),
            0,
            n_f_rows * hdim,
        )
        .unwrap();
        let mut bias = vec![0f32; f_at];
        bias.extend_from_slice(&f_bias);
        bias.resize(ids.len(), 0.0);
        let (_, acts) = lm
            .forward_embeds(x, 1, ids.len(), None, Some(&be.from_slice(&bias)), None)
            .unwrap();
        let hidden = be.to_vec(&acts.hidden);
        let rows: Vec<f32> = (0..ans.len())
            .flat_map(|t| {
                let r = ans_at + t - 1;
                hidden[r * hdim..(r + 1) * hdim].to_vec()
            })
            .collect();
        let rows = HiddenRows::of_buffer(be, be.from_slice(&rows), ans.len(), hdim).unwrap();
        let (_, want) = m.masks_of_groups(&px, &enc, &groups(&ans), &rows).unwrap();
        assert_eq!(want.len(), e.answer.logits.len());
        for (a, b) in want.iter().zip(&e.answer.logits) {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() < 1e-4 * (1.0 + x.abs()),
                    "seed {seed}: {x} vs {y}"
                );
            }
        }
        // and the segmentation half changed something: the text half's own masks differ
        let text_only = m
            .predict_ensemble(
                &tok,
                &[(&px, Q)],
                &EnsembleCfg { seg: false, ..ecfg },
                seed,
                None,
                &ends,
            )
            .unwrap()
            .remove(0);
        assert_eq!(text_only.answer.ids, e.answer.ids);
        assert_ne!(text_only.answer.logits, e.answer.logits, "seed {seed}");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} seeds gave targets to refine");
}

/// Without the samples' own masks (`popen predict`), the answer is the same.
#[test]
fn the_answer_does_not_need_the_samples_masks() {
    let mut checked = 0;
    for seed in 20..30 {
        let (m, tok) = codebook_model(seed);
        let px = pixels(&m.cfg, seed + 10);
        let ends = sentence_ends(&tok.tok);
        let run = |sample_masks: bool, seg: bool| {
            let ecfg = EnsembleCfg {
                sample_masks,
                seg,
                ..Default::default()
            };
            m.predict_ensemble(&tok, &[(&px, Q)], &ecfg, seed, None, &ends)
                .unwrap()
                .remove(0)
        };
        for seg in [true, false] {
            let (with, without) = (run(true, seg), run(false, seg));
            checked += usize::from(!with.answer.masks.is_empty());
            assert_eq!(with.answer, without.answer, "seed {seed}, seg {seg}");
            assert_eq!(with.samples.len(), without.samples.len());
            for (a, b) in with.samples.iter().zip(&without.samples) {
                assert_eq!((&a.ids, &a.text), (&b.ids, &b.text));
                assert!(b.masks.is_empty() && b.logits.is_empty());
                assert_eq!(a.masks.len(), tok.decode_answer(&a.ids).unwrap().1.len());
            }
        }
    }
    assert!(checked >= 4, "only {checked} answers with targets");
}

/// A model that answers in the words of "the cup and the apple" and EOS only, at
/// random among them, so that its samples name objects and disagree on them: every
/// token's embedding carries a large constant in dimension 0, which the last hidden
/// state keeps, and the LM head's rows weigh it up for those words and down for the
/// rest (their other weights scaled up, the rest's zeroed).
fn object_model(seed: u64) -> (SegModel, SegTokenizer) {
    let c = cfg();
    // most of the words become whole tokens
    let words = "The cup and the apple and the lamp.";
    let none = popen::data::world::instructions::NO_TARGET_ANSWERS[0];
    let mut texts = vec![Q.to_string(), none.to_string()];
    texts.extend(std::iter::repeat_n(words.to_string(), 50));
    let tok = SegTokenizer::train(&texts, c.lvlm.vocab_size, c.group_len()).unwrap();
    let mut m = SegModel::new_tiny(Cpu, c, &tok, seed).unwrap();
    let mut keep = tok.answer_ids(words).unwrap();
    keep.push(tok.tok.eos);
    edit_rows(&mut m, "embed_tokens.weight", |_, row| row[0] = 10.0);
    edit_rows(&mut m, "lm_head.weight", |r, row| {
        let k = keep.contains(&(r as u32));
        row.iter_mut()
            .for_each(|x| *x = if k { *x * 40.0 } else { 0.0 });
        row[0] = if k { 5.0 } else { -5.0 };
    });
    (m, tok)
}

/// `--consensus` without the text ensemble: the answer names only the objects most
/// samples name; where the most likely sample already does, it is that sample, and
/// where it is edited, its log-probabilities are a plain forward's of
/// `[image, x, header, answer]` (the edited text read teacher-forced).
#[test]
fn the_consensus_answer_is_the_edited_sample_read_teacher_forced() {
    use popen::data::vocab::mentions;
    use popen::method::ensemble::{consensus_answer, consensus_objects};
    let (mut edited, mut kept) = (0, 0);
    for seed in 0..40 {
        let (m, tok) = object_model(seed);
        let px = pixels(&m.cfg, seed + 10);
        let ends = sentence_ends(&tok.tok);
        let ecfg = EnsembleCfg {
            text: false,
            seg: false,
            consensus: true,
            temperature: 1.0,
            ..Default::default()
        };
        let e = m
            .predict_ensemble(&tok, &[(&px, Q)], &ecfg, seed, None, &ends)
            .unwrap()
            .remove(0);
        let texts: Vec<&str> = e.samples.iter().map(|s| s.text.as_str()).collect();
        let best = &e.samples[most_likely(&e.samples)];
        let agreed = consensus_objects(&texts);
        assert!(
            mentions(&e.answer.text).iter().all(|c| agreed.contains(c)),
            "seed {seed}: {:?} names an object outside {agreed:?}",
            e.answer.text
        );
        let Some(want) = consensus_answer(&best.text, &texts) else {
            assert_eq!(&e.answer, best, "seed {seed}");
            kept += 1;
            continue;
        };
        edited += 1;
        let eos = tok.tok.eos;
        assert_eq!(
            e.answer.ids,
            [tok.answer_ids(&want).unwrap(), vec![eos]].concat()
        );
        // the same input, built by hand and run without a cache
        let be = &m.llava.be;
        let lm = &m.llava.language_model;
        let hdim = m.llava.cfg.text.hidden_size;
        let k = m.tokens_per_image();
        let (prompt, image_pos) = tok.prompt("", Q).unwrap();
        let mut ids: Vec<u32> = prompt[..image_pos].to_vec();
        ids.extend(std::iter::repeat_n(prompt[image_pos], k));
        ids.extend_from_slice(&prompt[image_pos + 1..]);
        let t0 = ids.len();
        let ans = &e.answer.ids;
        ids.extend_from_slice(&ans[..ans.len() - 1]);
        let enc = m.encode_images(&[&px]).unwrap().remove(0);
        let mut x = lm.embed(&ids).unwrap();
        be.copy_range(&mut x, image_pos * hdim, &enc.tokens, 0, k * hdim)
            .unwrap();
        let (logits, _) = lm
            .forward_embeds(x, 1, ids.len(), None, None, None)
            .unwrap();
        let logits = be.to_vec(&logits);
        let v = m.llava.cfg.text.vocab_size;
        assert_eq!(e.answer.logps.len(), ans.len());
        for (j, (&id, &lp)) in ans.iter().zip(&e.answer.logps).enumerate() {
            let row = &logits[(t0 - 1 + j) * v..(t0 + j) * v];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = mx + row.iter().map(|&z| (z - mx).exp()).sum::<f32>().ln();
            let got = row[id as usize] - lse;
            assert!(
                (got - lp).abs() < 1e-4,
                "seed {seed}: token {j}: {got} vs {lp}"
            );
        }
    }
    assert!(edited >= 3 && kept >= 3, "{edited} edited, {kept} kept");
}
