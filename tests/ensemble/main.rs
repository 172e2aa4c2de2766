//! The ensemble at inference (Sec. 3.3): the K samples decoded together from one shared
//! prefix are the answers decoded alone; the refined answer is what a plain, uncached
//! forward of `[image, x, y_1 … y_K, header]` with the per-key bias `γ(τ)` predicts;
//! ablations and seeds behave as documented.
//!
//! Here: the model and prompts the modules share; `sampling` the K samples and the
//! answer among them, `refine` the refined answer, `masks` the masks, `stage3` the
//! prompt's gradient.
use popen::backend::{Backend, Cpu};
use popen::method::ensemble::{
    gamma, majority, mean_logp, most_likely, sentence_ends, sentence_index, token_scores,
    EnsembleCfg, RefineData, SegPair, TauMode,
};
use popen::model::seg::Trainable;
use popen::model::seg::{HiddenRows, Pixels, SegModel, SegModelConfig, SegTokenizer};
use popen::nn::{Rng, SamplingCfg};

#[path = "../common/mod.rs"]
mod common;
use common::seg::tiny_cfg;

mod masks;
mod refine;
mod sampling;
mod stage3;

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
