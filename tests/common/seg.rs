//! The tiny segmentation model of the model-level tests (seg_model.rs, pref.rs).
use popen::model::seg::config::TinyLvlm;
use popen::model::seg::SegModelConfig;

/// An 8×8-pixel, 70-token model: every part present, small enough for f64 finite
/// differences over the whole model.
pub fn tiny_cfg() -> SegModelConfig {
    SegModelConfig {
        image_size: 8,
        tokens_per_scale: 2,
        scales: 2,
        seg_dim: 6,
        decoder_depth: 1,
        decoder_heads: 1,
        decoder_mlp: 6,
        decoder_layers: [-1, 1],
        llm_feature_layer: -2,
        system_prompt: String::new(),
        max_new_tokens: 12,
        lvlm: TinyLvlm {
            vision_hidden: 6,
            vision_layers: 2,
            vision_heads: 2,
            vision_intermediate: 10,
            patch_size: 4,
            vision_stem: 0,
            text_hidden: 8,
            text_layers: 2,
            text_heads: 2,
            text_kv_heads: 1,
            text_intermediate: 12,
            max_positions: 64,
            vocab_size: 70,
        },
        classes: Vec::new(),
        pixel_skip: false,
        presence_tokens: popen::model::seg::config::PresenceTokens::Off,
        place_head: false,
    }
}

/// The gradient slot of every parameter of `m` (`None`: frozen), read after a backward.
pub fn grads_of(
    m: &mut popen::model::seg::SegModel<f64, popen::backend::Cpu>,
) -> Vec<(String, Option<Vec<f64>>)> {
    m.params_mut()
        .into_iter()
        .map(|(n, t)| (n, t.grad.clone()))
        .collect()
}

/// Checks the backward's `grads` against central finite differences (h = 1e-5) of
/// `loss` at two random entries of every trainable parameter of `m`, to a relative
/// error of 1e-4; returns how many entries it checked and how many had a nonzero
/// gradient.
pub fn check_param_grads(
    m: &mut popen::model::seg::SegModel<f64, popen::backend::Cpu>,
    grads: &[(String, Option<Vec<f64>>)],
    seed: u64,
    mut loss: impl FnMut(&mut popen::model::seg::SegModel<f64, popen::backend::Cpu>) -> f64,
) -> (usize, usize) {
    let mut rng = popen::nn::Rng::new(seed);
    let (mut checked, mut nonzero) = (0, 0);
    for (pi, (name, g)) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        for _ in 0..2 {
            let j = (rng.next_u64() % g.len() as u64) as usize;
            let h = 1e-5;
            m.params_mut()[pi].1.data[j] += h;
            let up = loss(m);
            m.params_mut()[pi].1.data[j] -= 2.0 * h;
            let down = loss(m);
            m.params_mut()[pi].1.data[j] += h;
            let fd = (up - down) / (2.0 * h);
            let err = (fd - g[j]).abs() / (fd.abs().max(g[j].abs()).max(1e-3));
            assert!(
                err < 1e-4,
                "{name}[{j}]: finite difference {fd} vs backward {}",
                g[j]
            );
            checked += 1;
            nonzero += usize::from(g[j] != 0.0);
        }
    }
    (checked, nonzero)
}

/// Stage 2's parts: the LLM, projector and codebook head train; tower and decoder frozen.
pub fn stage2(m: &mut popen::model::seg::SegModel<f64, popen::backend::Cpu>) {
    m.set_trainable(popen::model::seg::Trainable {
        vision: false,
        projector: true,
        llm: true,
        seg_head: true,
        decoder: false,
    });
}

/// A small world written under `tmp(tag, "world")` (5 images of 48 × 64, `questions`
/// each) with its training samples, a model config whose 64-pixel input the images fill
/// unscaled (patch 16, context 512, the world's classes) and a tokenizer trained on it.
pub fn world_data(
    tag: &str,
    questions: usize,
) -> (
    Vec<popen::data::sample::Sample>,
    SegModelConfig,
    popen::model::seg::SegTokenizer,
) {
    use popen::data::world::{write_dataset, Split, WorldConfig};
    let dir = super::cli::tmp(tag, "world");
    let world = WorldConfig {
        height: 48,
        width: 64,
        questions,
    };
    write_dataset(&dir, &world, 5, Split::Train, 4, &|| {}).unwrap();
    let samples = popen::method::sft::training_samples(&dir.join("train.json"), &None).unwrap();
    let mut cfg = tiny_cfg();
    cfg.image_size = 64;
    cfg.lvlm.patch_size = 16;
    cfg.lvlm.max_positions = 512;
    cfg.lvlm.vocab_size = 300;
    let mut classes: Vec<String> = samples
        .iter()
        .flat_map(|s| s.objects.iter().map(|o| o.category.clone()))
        .collect();
    classes.sort();
    classes.dedup();
    cfg.classes = classes;
    let corpus = popen::model::seg::data::corpus(&samples);
    let tok = popen::model::seg::SegTokenizer::train(&corpus, 300, cfg.group_len()).unwrap();
    (samples, cfg, tok)
}
