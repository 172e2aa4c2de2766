//! The segmentation model: whole-model gradient check in f64 (ViT → projector → LLaMA →
//! codebook projection → pixel decoder, through `CE + 2·BCE + 0.5·Dice`), frozen parts
//! untouched, bad input as errors.
//!
//! Here: the examples the modules share; `grad` the gradient checks, `prompt` prompts and
//! answers, `run_dir` run directories, `device` training steps on the device backend,
//! `batched` batched prediction.
use popen::backend::{Backend, Cpu};
use popen::model::seg::{
    Example, HeadWeights, LossWeights, Pixels, SegModel, SegModelConfig, SegTokenizer, Trainable,
};
use popen::nn::Rng;

use popen::model::seg::config::PresenceTokens;

#[path = "../common/mod.rs"]
mod common;
use common::seg::tiny_cfg;

mod batched;
mod device;
mod grad;
mod prompt;
mod run_dir;

fn tokenizer(cfg: &SegModelConfig) -> SegTokenizer {
    let texts: Vec<String> = [
        "Where is the cup?",
        "The cup <seg> is on the table.",
        "Find the red apples.",
        "I see two apples <seg> <seg> here.",
        "Nothing fits.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    SegTokenizer::train(&texts, cfg.lvlm.vocab_size, cfg.group_len()).unwrap()
}

fn example(cfg: &SegModelConfig, tok: &SegTokenizer, rng: &mut Rng, q: &str, a: &str) -> Example {
    let s = cfg.image_size;
    // a 5×7 image: resized to 6×8 inside the 8×8 square, so the resize path runs
    let (h, w) = (5, 7);
    let (vh, vw) = popen::model::seg::preprocess::fit(h, w, s);
    let data = (0..3 * s * s).map(|_| rng.normal() as f32).collect();
    let enc = tok.encode("", q, a).unwrap();
    let masks = (0..enc.groups.len())
        .map(|_| {
            (0..h * w)
                .map(|_| f32::from(u8::from(rng.uniform() < 0.4)))
                .collect()
        })
        .collect();
    Example {
        pixels: Pixels {
            data,
            valid_h: vh,
            valid_w: vw,
            height: h,
            width: w,
        },
        enc,
        masks,
        classes: Default::default(),
        categories: Vec::new(),
    }
}

fn batch(cfg: &SegModelConfig, tok: &SegTokenizer) -> Vec<Example> {
    let mut rng = Rng::new(5);
    vec![
        example(
            cfg,
            tok,
            &mut rng,
            "Find the red apples.",
            "I see two apples <seg> <seg> here.",
        ),
        example(
            cfg,
            tok,
            &mut rng,
            "Where is the cup?",
            "The cup <seg> is on the table.",
        ),
        example(cfg, tok, &mut rng, "Where is the cup?", "Nothing fits."),
    ]
}

/// The tiny config with two classes, [`batch`] labelled, both category losses and the
/// place loss on, the decoder's pixel skip (the world config's model: q = 1 on this 8 × 8 image) and the
/// ViT's convolutional stem (one 4 × 4 cell per patch of 4 here; tests/nn_conv.rs
/// checks the stem alone with several cells per patch).
fn with_categories() -> (SegModelConfig, SegTokenizer, Vec<Example>, LossWeights) {
    use popen::kernels::logprob::IGNORE_INDEX;
    use popen::model::seg::category::Classes;
    let mut cfg = tiny_cfg();
    cfg.classes = vec!["apple".into(), "cup".into()];
    cfg.place_head = true;
    cfg.pixel_skip = true;
    cfg.lvlm.vision_stem = 3;
    let tok = tokenizer(&cfg);
    let mut b = batch(&cfg, &tok);
    // an 8 × 8 image in patches of 4: K = 4; examples 0 and 1 have 2 and 1 targets
    b[0].classes = Classes {
        patches: vec![0, 1, IGNORE_INDEX, 2],
        targets: vec![1, IGNORE_INDEX],
        places: vec![3, 1],
    };
    b[1].classes = Classes {
        patches: Vec::new(),
        targets: vec![2],
        places: vec![IGNORE_INDEX],
    };
    b[2].classes = Classes {
        patches: vec![2, 0, 0, 1],
        targets: Vec::new(),
        places: Vec::new(),
    };
    // the two apples may take each other's place (instance matching on)
    b[0].categories = vec!["apple".into(), "apple".into()];
    b[1].categories = vec!["cup".into()];
    let w = LossWeights {
        patch_class: 1.5,
        seg_class: 0.7,
        seg_place: 0.9,
        instance_matching: true,
        ..LossWeights::default()
    };
    (cfg, tok, b, w)
}
