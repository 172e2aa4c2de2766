//! Run directories: saved and loaded with their heads and tokens, the LLaVA part
//! loading as LLaVA, the parameter bound, a pretrained LLaVA grown.
use super::*;

/// A run directory keeps the presence token: the setting, and `presence_proj.*` under
/// those names; without `classes` the token is a config error naming it.
#[test]
fn a_run_directory_keeps_the_presence_token() {
    let (mut cfg, tok, _, _) = with_categories();
    cfg.presence_tokens = PresenceTokens::One;
    let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 8).unwrap();
    let back = saved_and_loaded(&mut m, &tok, "presence_proj");
    assert_eq!(back.cfg.presence_tokens, PresenceTokens::One);
    cfg.classes.clear();
    let e = SegModel::<f32, Cpu>::new_tiny(Cpu, cfg, &tok, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("presence_tokens"), "{e}");
}

/// A run directory keeps the place head: the setting, and `seg_place_head.*` under
/// those names, one output per tower patch.
#[test]
fn a_run_directory_keeps_the_place_head() {
    let mut cfg = tiny_cfg();
    cfg.place_head = true;
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg, &tok, 8).unwrap();
    let k = m.patches_per_image();
    assert_eq!(m.seg_place_head.as_ref().unwrap().fan_out(), k);
    let back = saved_and_loaded(&mut m, &tok, "seg_place_head");
    assert!(back.cfg.place_head);
}

/// `m` saved to a run directory and loaded back, checking that the loaded model's
/// `prefix.*` tensors (a Linear: weight and bias) equal `m`'s.
fn saved_and_loaded(
    m: &mut SegModel<f32, Cpu>,
    tok: &SegTokenizer,
    prefix: &str,
) -> SegModel<f32, Cpu> {
    let dir = std::env::temp_dir().join(format!("popen_seg_{prefix}_{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    m.save(&dir, tok).unwrap();
    let (mut back, _) = SegModel::<f32, Cpu>::load(Cpu, &dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let named = |m: &mut SegModel<f32, Cpu>| -> Vec<(String, Vec<f32>)> {
        m.params_mut()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&format!("{prefix}.")))
            .map(|(n, t)| (n, t.data.clone()))
            .collect()
    };
    let (a, b) = (named(m), named(&mut back));
    assert_eq!(
        a.len(),
        2,
        "{:?}",
        a.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    assert!(a == b, "{prefix} changed through save/load");
    back
}

#[test]
fn run_directory_round_trips_and_its_llava_part_loads_as_llava() {
    let mut cfg = tiny_cfg();
    cfg.lvlm.vision_stem = 2;
    let tok = tokenizer(&cfg);
    let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 8).unwrap();
    let dir = std::env::temp_dir().join(format!("popen_seg_run_{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    m.save(&dir, &tok).unwrap();
    let (mut back, tok2) = SegModel::<f32, Cpu>::load(Cpu, &dir).unwrap();
    assert_eq!(tok2.vocab_size(), tok.vocab_size());
    assert_eq!(back.cfg, m.cfg);
    // loaded for reading: the LLM's layers packed and fused, the same logits (up to
    // rounding)
    let lm = &back.llava.language_model;
    let l0 = &lm.layers[0];
    assert!(l0.self_attn.o.is_packed() && l0.mlp.down.is_packed());
    assert!(l0.self_attn.is_fused() && l0.mlp.is_fused());
    let ids = [1u32, 5, 7, 9, 2, 3, 4, 6, 8, 10];
    let (l1, _) = lm.forward(&ids, 1, None, None).unwrap();
    let (l2, _) = m.llava.language_model.forward(&ids, 1, None, None).unwrap();
    let scale = l2.iter().fold(1f32, |a, v| a.max(v.abs()));
    let err = l1
        .iter()
        .zip(&l2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, common::close::sticky_max);
    assert!(err <= 1e-5 * scale, "packed logits off by {err}");
    // `params_mut` (and so saving) sees every tensor whole
    let a: Vec<Vec<f32>> = m
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    let b: Vec<Vec<f32>> = back
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    assert!(a == b, "weights changed through save/load");
    // loaded for inference: no gradient buffers until a stage unfreezes its parts
    let mut frozen = 0;
    for (name, t) in back.params_mut() {
        assert!(t.grad.is_none(), "{name} was loaded with a gradient buffer");
        frozen += 1;
    }
    assert_eq!(frozen, a.len());
    back.set_trainable(popen::model::seg::Trainable::default());
    assert!(back.params_mut().iter().all(|(_, t)| t.grad.is_some()));
    // `popen forward` reads the LLaVA part: same LLM logits for the same ids
    let (_, p) = popen::model::pretrained::Pretrained::<f32, Cpu>::load_dir(Cpu, &dir).unwrap();
    let popen::model::pretrained::Pretrained::Llava(llava) = p else {
        panic!("the run directory did not load as LLaVA");
    };
    let ids = [1u32, 5, 7, 9];
    let (l1, _) = llava.language_model.forward(&ids, 1, None, None).unwrap();
    let (l2, _) = m.llava.language_model.forward(&ids, 1, None, None).unwrap();
    assert_eq!(l1, l2);
    // ... and its vision tower, the stem included: the same hidden states
    let pixels: Vec<f32> = (0..3 * 8 * 8).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
    let h1 = llava
        .vision_tower
        .forward(&pixels, 1, 2)
        .unwrap()
        .hidden_states;
    let h2 = m
        .llava
        .vision_tower
        .forward(&pixels, 1, 2)
        .unwrap()
        .hidden_states;
    assert!(m.llava.vision_tower.stem.is_some() && llava.vision_tower.stem.is_some());
    assert_eq!(h1, h2);
    // a run directory of another model is an error naming the tensor
    let mut cfg2 = cfg.clone();
    cfg2.seg_dim = 8;
    let mut other: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg2, &tok, 8).unwrap();
    let e = other
        .load_weights(&dir.join("model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("seg_head") || e.contains("mask_decoder"), "{e}");
    // a config that claims a model larger than its weights file is refused before
    // anything is allocated for it (here 10^6 hidden units: 4·10^12 bytes)
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["text_config"]["hidden_size"] = serde_json::json!(1_000_000);
    j["text_config"]["intermediate_size"] = serde_json::json!(1_000_000);
    std::fs::write(dir.join("config.json"), j.to_string()).unwrap();
    let e = SegModel::<f32, Cpu>::load(Cpu, &dir)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("at least") && e.contains("model.safetensors"),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), text).unwrap();
    assert!(SegModel::<f32, Cpu>::load(Cpu, &dir).is_ok());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_parameter_lower_bound_is_below_the_count_and_near_it() {
    use popen::model::seg::run::min_param_count;
    let tiny = tiny_cfg();
    let default = SegModelConfig {
        lvlm: popen::model::seg::config::TinyLvlm {
            vocab_size: 200,
            ..Default::default()
        },
        ..SegModelConfig::default()
    };
    let mut stem = default.clone();
    stem.lvlm.vision_stem = 32;
    for cfg in [tiny, default, stem] {
        let tok = tokenizer(&cfg);
        let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg.clone(), &tok, 1).unwrap();
        let n: u128 = m
            .params_mut()
            .iter()
            .map(|(_, t)| t.data.len() as u128)
            .sum();
        let lo = min_param_count(&cfg, &m.llava.cfg);
        assert!(lo <= n && 2 * lo >= n, "bound {lo} for {n} parameters");
    }
}

#[test]
fn a_pretrained_llava_grows_its_vocabulary_and_trains_with_a_frozen_tower() {
    use popen::model::pretrained::Pretrained;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/llava");
    let (_, p) = Pretrained::<f32, Cpu>::load_dir(Cpu, &dir).unwrap();
    let Pretrained::Llava(llava) = p else {
        panic!("not llava")
    };
    let v0 = llava.cfg.text.vocab_size;
    let img = llava.cfg.image_token_index as u32;
    let mut cfg = tiny_cfg();
    cfg.image_size = llava.cfg.vision.image_size;
    cfg.decoder_layers = [-1, 1];
    let g = cfg.group_len();
    // a wrong <image> id is refused
    let e = SegModel::<f32, Cpu>::from_llava(Cpu, cfg.clone(), llava.clone(), v0 + g, img + 1, 1)
        .unwrap_err();
    assert!(e.to_string().contains("image_token_index"), "{e}");
    let mut m = SegModel::<f32, Cpu>::from_llava(Cpu, cfg.clone(), llava, v0 + g, img, 1).unwrap();
    assert_eq!(m.llava.language_model.cfg.vocab_size, v0 + g);
    // the loaded model's parts are frozen: train the LLM, projector, head and decoder
    m.set_trainable(Trainable {
        vision: false,
        ..Trainable::default()
    });
    let cb: Vec<u32> = (v0 as u32..(v0 + g) as u32).collect();
    let mut ids = vec![1u32, 5, img, 6, 7, 3];
    let answer_start = ids.len();
    ids.push(9);
    let group = ids.len();
    ids.extend(&cb);
    ids.extend([8, 2]);
    let s = cfg.image_size;
    let mut rng = Rng::new(2);
    let ex = Example {
        pixels: Pixels {
            data: (0..3 * s * s).map(|_| rng.normal() as f32).collect(),
            valid_h: s,
            valid_w: s,
            height: s,
            width: s,
        },
        enc: popen::model::seg::Encoded {
            ids,
            image_pos: 2,
            answer_start,
            groups: vec![group],
        },
        masks: vec![(0..s * s).map(|i| f32::from(u8::from(i % 5 < 2))).collect()],
        classes: Default::default(),
        categories: Vec::new(),
    };
    let tower: Vec<Vec<f32>> = m
        .llava
        .vision_tower
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    let emb0 = m.llava.language_model.embed_tokens.weight.data.clone();
    let mut opt = popen::train::AdamW::new(popen::train::AdamWConfig::default());
    let l = m
        .step(std::slice::from_ref(&ex), LossWeights::default(), 1.0, true)
        .unwrap();
    assert!(l.total.is_finite() && l.n_masks == 1);
    opt.step(&Cpu, &mut m.params_mut(), 1e-2).unwrap();
    let after: Vec<Vec<f32>> = m
        .llava
        .vision_tower
        .params_mut()
        .into_iter()
        .map(|(_, t)| t.data.clone())
        .collect();
    assert!(tower == after, "the frozen tower moved");
    assert_ne!(
        emb0, m.llava.language_model.embed_tokens.weight.data,
        "the LLM did not train"
    );
}
