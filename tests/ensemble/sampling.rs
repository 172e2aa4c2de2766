//! The K samples and the answer chosen among them: shared-prefix sampling equals
//! decoding alone, the vote, seeds, drafted decoding, bad prefills.
use super::*;

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
