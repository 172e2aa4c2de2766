//! Batched prediction: each question of a batch predicted as alone.
use super::*;

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
