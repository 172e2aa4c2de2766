//! The ensemble at inference (Sec. 3.3): the K samples decoded together from one shared
//! prefix are the answers decoded alone; the refined answer is what a plain, uncached
//! forward of `[image, x, y_1 … y_K, header]` with the per-key bias `γ(τ)` predicts;
//! ablations and seeds behave as documented.
use popen::backend::{Backend, Cpu};
use popen::model::seg::{Pixels, SegModel, SegModelConfig, SegTokenizer};
use popen::nn::{Rng, SamplingCfg};
use popen::popen::ensemble::{
    gamma, sentence_ends, sentence_index, token_scores, EnsembleCfg, TauMode,
};

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

#[test]
fn answers_depend_on_the_seed_and_not_on_the_batch() {
    let (m, tok) = model(9);
    let pxs: Vec<Pixels> = (0..3).map(|i| pixels(&m.cfg, 30 + i)).collect();
    let qs = [
        "Where is the cup?",
        "Where is the apple?",
        "Where is the table?",
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
        assert_eq!(one.answer, all[i].answer, "item {i}");
        assert_eq!(one.samples, all[i].samples, "item {i}");
    }
    let other = m
        .predict_ensemble(&tok, &items, &ecfg, 12, None, &ends)
        .unwrap();
    assert!(
        other.iter().zip(&all).any(|(a, b)| a.samples != b.samples),
        "another seed draws other samples"
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
