//! The ensemble at inference (Sec. 3.3): the K samples decoded together from one shared
//! prefix are the answers decoded alone; the refined answer is what a plain, uncached
//! forward of `[image, x, y_1 … y_K, header]` with the per-key bias `γ(τ)` predicts;
//! ablations and seeds behave as documented.
use popen::backend::{Backend, Cpu};
use popen::method::ensemble::{
    gamma, majority, mean_logp, most_likely, sentence_ends, sentence_index, token_scores,
    EnsembleCfg, RefineData, SegPair, TauMode,
};
use popen::model::seg::Trainable;
use popen::model::seg::{HiddenRows, Pixels, SegModel, SegModelConfig, SegTokenizer};
use popen::nn::{Rng, SamplingCfg};

mod common;
use common::seg::tiny_cfg;

fn cfg() -> SegModelConfig {
    let mut c = tiny_cfg();
    // room for K = 3 answers of 12 tokens after the prompt
    c.lvlm.max_positions = 128;
    c
}

fn tokenizer(cfg: &SegModelConfig) -> SegTokenizer {
    let texts: Vec<String> = [
        "Where is the cup?",
        "The cup <seg> is on the table. It is red.",
        "The apple <seg> is on the table!",
        "I see two apples <seg> <seg> here.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    SegTokenizer::train(&texts, cfg.lvlm.vocab_size, cfg.group_len()).unwrap()
}

fn pixels(cfg: &SegModelConfig, seed: u64) -> Pixels {
    let mut rng = Rng::new(seed);
    let s = cfg.image_size;
    let (h, w) = (5, 7);
    let (vh, vw) = popen::model::seg::preprocess::fit(h, w, s);
    Pixels {
        data: (0..3 * s * s).map(|_| rng.normal() as f32).collect(),
        valid_h: vh,
        valid_w: vw,
        height: h,
        width: w,
    }
}

fn model(seed: u64) -> (SegModel, SegTokenizer) {
    let c = cfg();
    let tok = tokenizer(&c);
    (SegModel::new_tiny(Cpu, c, &tok, seed).unwrap(), tok)
}

const Q: &str = "Where is the cup?";

#[test]
fn greedy_samples_from_the_shared_prefix_are_the_single_answer() {
    for seed in [1, 2, 3] {
        let (m, tok) = model(seed);
        let px = pixels(&m.cfg, seed + 10);
        let single = m
            .predict(&tok, &[(&px, Q)], &SamplingCfg::greedy())
            .unwrap()
            .remove(0);
        let ecfg = EnsembleCfg {
            temperature: 0.0,
            ..Default::default()
        };
        let ends = sentence_ends(&tok.tok);
        let e = m
            .predict_ensemble(&tok, &[(&px, Q)], &ecfg, 0, None, &ends)
            .unwrap()
            .remove(0);
        assert_eq!(e.samples.len(), 3);
        for s in &e.samples {
            assert_eq!(s.ids, single.ids, "seed {seed}");
            assert_eq!(s.text, single.text);
            assert_eq!(s.masks, single.masks);
            for (a, b) in s.logps.iter().zip(&single.logps) {
                assert!((a - b).abs() < 1e-4, "seed {seed}: logp {a} vs {b}");
            }
        }
    }
}

/// The K samples of a question share one cache row while their draws agree and split
/// when they differ: each sample must still be the answer decoded alone from its
/// stream (`splitmix64(seed) + j`), whether it split early, late or never.
#[test]
fn shared_samples_are_the_answers_decoded_alone() {
    let (mut shared_then_split, mut checked) = (0, 0);
    for seed in [1u64, 2, 3, 4] {
        let (m, tok) = model(seed);
        let px = pixels(&m.cfg, seed + 20);
        let enc = m.encode_images(&[&px]).unwrap().remove(0);
        let ends = sentence_ends(&tok.tok);
        for temperature in [0.05f32, 0.2, 1.0] {
            let ecfg = EnsembleCfg {
                temperature,
                top_p: 0.95,
                ..Default::default()
            };
            let e = m
                .predict_ensemble(&tok, &[(&px, Q)], &ecfg, seed, None, &ends)
                .unwrap()
                .remove(0);
            let base = popen::rng::splitmix64(seed);
            for (j, s) in e.samples.iter().enumerate() {
                let alone_cfg = SamplingCfg {
                    temperature,
                    top_p: 0.95,
                    seed: base.wrapping_add(j as u64),
                };
                let pre = m.prefill(&tok, Q, &enc).unwrap();
                let d = m.decode(&tok, pre, &alone_cfg, None).unwrap();
                let what = format!("seed {seed}, temperature {temperature}, sample {j}");
                assert_eq!(s.ids, d.ids, "{what}");
                for (a, b) in s.logps.iter().zip(&d.logps) {
                    assert!((a - b).abs() < 1e-4, "{what}: logp {a} vs {b}");
                }
                checked += 1;
            }
            // pairs that drew the same first token and then differ: a split after sharing
            for a in 0..e.samples.len() {
                for b in a + 1..e.samples.len() {
                    let (x, y) = (&e.samples[a].ids, &e.samples[b].ids);
                    if x.first() == y.first() && x != y {
                        shared_then_split += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 4 * 3 * 3);
    assert!(
        shared_then_split > 0,
        "no two samples shared a token and then split: the test does not reach the split"
    );
}

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
fn without_the_text_ensemble_the_answer_is_the_most_likely_sample() {
    let (m, tok) = model(8);
    let px = pixels(&m.cfg, 18);
    let ends = sentence_ends(&tok.tok);
    let ecfg = EnsembleCfg {
        text: false,
        seg: false,
        ..Default::default()
    };
    let e = m
        .predict_ensemble(&tok, &[(&px, Q)], &ecfg, 3, None, &ends)
        .unwrap()
        .remove(0);
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len() as f32;
    let best = e
        .samples
        .iter()
        .max_by(|a, b| mean(&a.logps).total_cmp(&mean(&b.logps)))
        .unwrap();
    assert_eq!(&e.answer, best);
    // the samples differ (temperature 0.7), so "most likely" chose among real options
    assert!(e.samples.iter().any(|s| s.ids != e.samples[0].ids));
    for (s, t) in e.samples.iter().zip(&e.tau) {
        let n = s
            .ids
            .iter()
            .position(|&x| x == tok.tok.eos)
            .unwrap_or(s.ids.len());
        assert_eq!(t.len(), n);
        assert!(t.iter().all(|v| (-1.0..=1.0).contains(v)));
    }
}

/// A sample with these ids and one log-probability per id.
fn sample(ids: &[u32], logps: &[f32]) -> popen::model::seg::Prediction {
    popen::model::seg::Prediction {
        text: format!("{ids:?}"),
        masks: Vec::new(),
        logits: Vec::new(),
        ids: ids.to_vec(),
        logps: logps.to_vec(),
    }
}

#[test]
fn the_vote_takes_the_answer_most_samples_give_and_breaks_ties_by_likelihood() {
    // two samples say [1, 2], the most likely says [3]: the pair wins, and of the pair
    // the more likely one
    let s = [
        sample(&[1, 2], &[-1.0, -1.0]),
        sample(&[3], &[-0.1]),
        sample(&[1, 2], &[-0.5, -0.5]),
    ];
    assert_eq!(most_likely(&s), 1);
    assert_eq!(majority(&s), 2);
    // no two agree: the most likely
    let s = [
        sample(&[1], &[-1.0]),
        sample(&[2], &[-0.2]),
        sample(&[3], &[-0.7]),
    ];
    assert_eq!(majority(&s), 1);
    // two answers given twice each: the one with the most likely sample
    let s = [
        sample(&[1], &[-1.0]),
        sample(&[2], &[-0.9]),
        sample(&[1], &[-0.3]),
        sample(&[2], &[-0.4]),
    ];
    assert_eq!(majority(&s), 2);
    // answers are compared by their text: the same text with and without EOS (9) is
    // one answer
    let mut s = [
        sample(&[1, 9], &[-2.0, -2.0]),
        sample(&[2], &[-0.1]),
        sample(&[1], &[-3.0]),
    ];
    s[0].text = s[2].text.clone();
    assert_eq!(majority(&s), 0);
    assert_eq!(majority(&[]), 0);
}

#[test]
fn with_the_vote_the_answer_is_the_majority_sample() {
    // answers of at most 3 tokens from a sharpened head (its weights × 150), so that
    // samples agree often enough to find questions where two agree against a more
    // likely third (7 of these 24)
    let mut c = cfg();
    c.max_new_tokens = 3;
    let tok = tokenizer(&c);
    let mut m = SegModel::new_tiny(Cpu, c, &tok, 8).unwrap();
    let be = m.llava.be;
    for (name, t) in m.params_mut() {
        if name.ends_with("lm_head.weight") {
            let w: Vec<f32> = be.to_vec(&t.data).iter().map(|x| x * 150.0).collect();
            t.data = be.from_slice(&w);
        }
    }
    let ends = sentence_ends(&tok.tok);
    let ecfg = EnsembleCfg {
        text: false,
        vote: true,
        seg: false,
        temperature: 1.0,
        ..Default::default()
    };
    let mut overruled = 0;
    for seed in 0..24u64 {
        let px = pixels(&m.cfg, 100 + seed);
        let e = m
            .predict_ensemble(&tok, &[(&px, Q)], &ecfg, seed, None, &ends)
            .unwrap()
            .remove(0);
        let (v, best) = (majority(&e.samples), most_likely(&e.samples));
        assert_eq!(e.answer, e.samples[v], "seed {seed}");
        if e.samples[v].text != e.samples[best].text {
            assert!(mean_logp(&e.samples[v]) < mean_logp(&e.samples[best]));
            overruled += 1;
        }
    }
    assert!(
        overruled > 0,
        "no question where the vote overrules the most likely sample"
    );
}

#[test]
fn answers_depend_on_the_seed_and_not_on_the_batch() {
    let (m, tok) = model(9);
    // prompts of several lengths: the shorter are padded in the batch
    let pxs: Vec<Pixels> = (0..4).map(|i| pixels(&m.cfg, 30 + i)).collect();
    let qs = [
        "Where is the cup?",
        "Where is the apple?",
        "Where is the table?",
        "Which of the things on the table is the cup?",
    ];
    let items: Vec<(&Pixels, &str)> = pxs.iter().zip(qs).collect();
    let ends = sentence_ends(&tok.tok);
    let ecfg = EnsembleCfg::default();
    let all = m
        .predict_ensemble(&tok, &items, &ecfg, 11, None, &ends)
        .unwrap();
    for (i, it) in items.iter().enumerate() {
        let one = m
            .predict_ensemble(&tok, &[*it], &ecfg, 11 + i as u64, None, &ends)
            .unwrap()
            .remove(0);
        // batched, the rows' sums round differently: the same tokens, log-probs close
        same_answer(&one.answer, &all[i].answer, &format!("item {i}"));
        assert_eq!(one.samples.len(), all[i].samples.len());
        for (a, b) in one.samples.iter().zip(&all[i].samples) {
            same_answer(a, b, &format!("item {i}, a sample"));
        }
    }
    let other = m
        .predict_ensemble(&tok, &items, &ecfg, 12, None, &ends)
        .unwrap();
    assert!(
        other.iter().zip(&all).any(|(a, b)| a.samples != b.samples),
        "another seed draws other samples"
    );
    // stage 2's re-read mix draws the ensemble's samples: the same tokens, no masks
    let drawn = m.sample_answers(&tok, &items, &ecfg, 11).unwrap();
    assert_eq!(drawn.len(), items.len());
    for (i, (set, e)) in drawn.iter().zip(&all).enumerate() {
        assert_eq!(set.len(), ecfg.k);
        for (a, b) in set.iter().zip(&e.samples) {
            assert_eq!((&a.ids, &a.text), (&b.ids, &b.text), "item {i}");
            assert!(a.masks.is_empty(), "item {i}: text only");
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

/// The same tokens and text, log-probabilities within 1e-4, each mask off in at most
/// 0.5 % of its pixels.
fn same_answer(a: &popen::model::seg::Prediction, b: &popen::model::seg::Prediction, what: &str) {
    assert_eq!((&a.ids, &a.text), (&b.ids, &b.text), "{what}");
    for (x, y) in a.logps.iter().zip(&b.logps) {
        assert!((x - y).abs() < 1e-4, "{what}: logp {x} vs {y}");
    }
    assert_eq!(a.masks.len(), b.masks.len(), "{what}");
    for (x, y) in a.masks.iter().zip(&b.masks) {
        let off = x.iter().zip(y).filter(|(p, q)| p != q).count();
        assert!(
            off * 200 <= x.len(),
            "{what}: {off} of {} pixels differ",
            x.len()
        );
    }
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

/// Stage-3 data of one question, made by hand: three "samples", two `f` groups, a
/// refined answer with one target matched to a ground-truth mask.
fn refine_data(m: &SegModel<f64, Cpu>, tok: &SegTokenizer, rng: &mut Rng) -> RefineData {
    let s = m.cfg.image_size;
    let (h, w) = (5, 7);
    let (vh, vw) = popen::model::seg::preprocess::fit(h, w, s);
    let pixels = Pixels {
        data: (0..3 * s * s).map(|_| rng.normal() as f32).collect(),
        valid_h: vh,
        valid_w: vw,
        height: h,
        width: w,
    };
    let answer_of = |a: &str| {
        let e = tok.encode("", Q, a).unwrap();
        e.ids[e.answer_start..].to_vec()
    };
    let mut ys = Vec::new();
    for a in [
        "The cup <seg> is red.",
        "The apple is here.",
        "It is on the table.",
    ] {
        let mut ids = answer_of(a);
        ids.pop(); // EOS
        ys.extend(ids);
    }
    let y_bias: Vec<f32> = ys.iter().map(|_| gamma(rng.normal() as f32)).collect();
    let hdim = m.llava.cfg.text.hidden_size;
    let n_f = 2 * m.cfg.group_len();
    let f_rows: Vec<f32> = (0..n_f * hdim).map(|_| rng.normal() as f32).collect();
    let f_bias: Vec<f32> = (0..n_f).map(|_| gamma(rng.normal() as f32)).collect();
    let answer = answer_of("The cup <seg> is on the table.");
    let (_, answer_groups) = tok.decode_answer(&answer).unwrap();
    assert_eq!(answer_groups.len(), 1);
    let gt: Vec<u8> = (0..h * w).map(|_| u8::from(rng.uniform() < 0.4)).collect();
    RefineData {
        pixels,
        question: Q.into(),
        ys,
        y_bias,
        f_rows,
        f_bias,
        answer,
        answer_groups,
        delta_text: vec![0.3, -0.2, 0.05],
        seg_pairs: vec![SegPair {
            target: 0,
            gt,
            orig: vec![0.2, 0.0, 0.5],
        }],
    }
}

#[test]
fn stage3_gradient_in_the_prompt_matches_finite_differences() {
    let c = cfg();
    let tok = tokenizer(&c);
    let mut m: SegModel<f64, Cpu> = SegModel::new_tiny(Cpu, c, &tok, 5).unwrap();
    m.set_trainable(Trainable::frozen());
    let mut rng = Rng::new(77);
    let d = refine_data(&m, &tok, &mut rng);
    let hdim = m.llava.cfg.text.hidden_size;
    let prompt: Vec<f64> = (0..3 * hdim).map(|_| 0.5 * rng.normal()).collect();
    let before: Vec<Vec<f64>> = m.params_mut().iter().map(|(_, t)| m_vec(t)).collect();
    let (loss, _) = m.refine_loss(&tok, &d, &prompt, true).unwrap();
    assert!(loss.lti.is_some() && loss.lsi.is_some(), "{loss:?}");
    // each term on its own (each must reach the prompt), and both together: central
    // differences in f64
    for (name, dd) in [
        (
            "text",
            RefineData {
                seg_pairs: vec![],
                ..d.clone()
            },
        ),
        (
            "seg",
            RefineData {
                delta_text: vec![],
                ..d.clone()
            },
        ),
        ("both", d.clone()),
    ] {
        let (_, g) = m.refine_loss(&tok, &dd, &prompt, true).unwrap();
        let g = g.unwrap();
        let eps = 1e-4;
        let mut worst = 0.0f64;
        let gmax = g.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        assert!(gmax > 1e-9, "{name}: no gradient reaches the prompt");
        for i in 0..prompt.len() {
            let mut p = prompt.clone();
            p[i] += eps;
            let (lp, _) = m.refine_loss(&tok, &dd, &p, false).unwrap();
            p[i] -= 2.0 * eps;
            let (lm, _) = m.refine_loss(&tok, &dd, &p, false).unwrap();
            let fd = (lp.total() - lm.total()) / (2.0 * eps);
            worst = worst.max((fd - g[i]).abs() / gmax);
        }
        assert!(
            worst < 2e-5,
            "{name}: worst relative error {worst:e} (max |g| {gmax:e})"
        );
        eprintln!("{name}: worst relative error {worst:e} (max |g| {gmax:e})");
    }
    // the model stayed frozen: no weight moved, no gradient was kept
    let after: Vec<Vec<f64>> = m.params_mut().iter().map(|(_, t)| m_vec(t)).collect();
    assert_eq!(before, after);
    assert!(m.params_mut().iter().all(|(_, t)| t.grad.is_none()));
}

fn m_vec(t: &popen::nn::Tensor<f64, Cpu>) -> Vec<f64> {
    Cpu.to_vec(&t.data)
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

/// A prefill without a hidden row or a logit row: an error, not a panic, both ways.
#[test]
fn a_prefill_without_rows_is_an_error_for_both_decodes() {
    let (m, tok) = model(44);
    let px = pixels(&m.cfg, 54);
    let enc = m.encode_images(&[&px]).unwrap().remove(0);
    let pre = m.prefill(&tok, Q, &enc).unwrap();
    let be = &m.llava.be;
    let no_rows = popen::model::seg::Prefill {
        hidden: be.from_slice(&[]),
        ..pre.clone()
    };
    let no_logits = popen::model::seg::Prefill {
        logits: be.from_slice(&[]),
        ..pre
    };
    for p in [no_rows, no_logits] {
        let e = m.decode(&tok, p.clone(), &SamplingCfg::greedy(), None);
        assert!(e.unwrap_err().to_string().contains("a prefill of"));
        let e = m.decode_drafted(&tok, p, None, &[]);
        assert!(e.unwrap_err().to_string().contains("a prefill of"));
    }
}

/// Greedy decoding that checks drafts (`model::seg::draft`) keeps exactly what plain
/// greedy decoding chooses, whatever the drafts: the answer itself (every draft token
/// kept), the answer with tokens changed (drafts cut, the cache cut back), unrelated
/// text, none; with and without a key bias.
#[test]
fn drafted_greedy_decoding_is_greedy_decoding() {
    let mut rounds = 0;
    for seed in [41, 42, 43] {
        let (m, tok) = model(seed);
        let px = pixels(&m.cfg, seed + 10);
        let enc = m.encode_images(&[&px]).unwrap().remove(0);
        let pre = m.prefill(&tok, Q, &enc).unwrap();
        let mut rng = Rng::new(seed);
        for with_bias in [false, true] {
            let bias = with_bias.then(|| {
                (0..pre.cache.len())
                    .map(|_| rng.normal() as f32 * 0.5)
                    .collect::<Vec<f32>>()
            });
            let plain = m
                .decode(&tok, pre.clone(), &SamplingCfg::greedy(), bias.clone())
                .unwrap();
            assert!(plain.ids.len() > 4, "seed {seed}: a long enough answer");
            let mut changed = plain.ids.clone();
            for i in (2..changed.len()).step_by(3) {
                changed[i] = (changed[i] + 1) % tok.tok.vocab_size() as u32;
            }
            let shifted: Vec<u32> = plain.ids.iter().map(|&t| (t + 7) % 50).collect();
            let drafts: [Vec<&[u32]>; 4] = [
                vec![&plain.ids],
                vec![&changed, &shifted],
                vec![&shifted],
                vec![],
            ];
            for d in &drafts {
                let got = m
                    .decode_drafted(&tok, pre.clone(), bias.clone(), d)
                    .unwrap();
                assert_eq!(got.ids, plain.ids, "seed {seed}, bias {with_bias}");
                for (a, b) in got.logps.iter().zip(&plain.logps) {
                    assert!((a - b).abs() < 1e-4, "seed {seed}: logp {a} vs {b}");
                }
                assert_eq!(got.rows.len(), plain.rows.len());
                let all = |r: &HiddenRows<_>| {
                    let be = &m.llava.be;
                    be.to_vec(&r.gather_all(be, m.llava.cfg.text.hidden_size).unwrap())
                };
                let (a, b) = (all(&got.rows), all(&plain.rows));
                assert_eq!(a.len(), b.len());
                let err = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, common::close::sticky_max);
                assert!(err < 1e-3, "seed {seed}: hidden rows off by {err}");
                rounds += 1;
            }
        }
    }
    assert_eq!(rounds, 24);
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
