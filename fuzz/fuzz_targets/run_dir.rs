//! A run directory (`popen train … --out RUN`, read by `predict --checkpoint`, the next
//! stage's `--from` and `--resume`) with one file replaced by the input: the first byte
//! picks `config.json`, `tokenizer.json`, `model.safetensors`, `train_state.json` or
//! the optimizer moments; the rest of the directory is a valid tiny run made once per
//! process.  Each file goes through the loader that reads it (`SegModel::load`,
//! `load_prompt`, `read_train_state`, `load_moments`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::backend::Cpu;
use popen::model::seg::config::TinyLvlm;
use popen::model::seg::{SegModel, SegModelConfig, SegTokenizer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "model.safetensors",
    "train_state.json",
    "optimizer.safetensors",
];

fn tiny() -> SegModelConfig {
    SegModelConfig {
        image_size: 16,
        seg_dim: 4,
        decoder_depth: 1,
        decoder_heads: 1,
        decoder_mlp: 4,
        decoder_layers: [-1, 1],
        max_new_tokens: 8,
        lvlm: TinyLvlm {
            vision_hidden: 4,
            vision_layers: 1,
            vision_heads: 1,
            vision_intermediate: 8,
            patch_size: 8,
            text_hidden: 8,
            text_layers: 1,
            text_heads: 2,
            text_kv_heads: 1,
            text_intermediate: 8,
            max_positions: 64,
            vocab_size: 120,
            ..TinyLvlm::default()
        },
        ..SegModelConfig::default()
    }
}

/// One valid run directory per slot, made once: the slot's file is rewritten per input.
fn dirs() -> &'static [PathBuf; 5] {
    static D: OnceLock<[PathBuf; 5]> = OnceLock::new();
    D.get_or_init(|| {
        let cfg = tiny();
        let texts = vec!["Where is the cup?".to_string(), "The cup <seg> is here.".to_string()];
        let tok = SegTokenizer::train(&texts, cfg.lvlm.vocab_size, cfg.group_len()).expect("tokenizer");
        let mut m: SegModel<f32, Cpu> = SegModel::new_tiny(Cpu, cfg, &tok, 0).expect("model");
        std::array::from_fn(|k| {
            let d = popen_fuzz::scratch_dir().join(format!("run{k}"));
            m.save(&d, &tok).expect("save run");
            std::fs::write(
                d.join(FILES[3]),
                br#"{"step":2,"checkpoint":"checkpoints/step-000002","format":1,"cursor":{"epoch":0,"position":8},"rng_state":7,"adamw_t":2,"elapsed_s":1.0,"config":{}}"#,
            )
            .expect("state");
            d
        })
    })
}

fn moments(dir: &Path) {
    let Ok((mut m, _)) = SegModel::<f32, Cpu>::load(Cpu, dir) else {
        return;
    };
    let params = m.params_mut();
    let _ = popen::train::checkpoint::load_moments(&Cpu, &dir.join(FILES[4]), &params);
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let k = pick as usize % FILES.len();
    let dir = &dirs()[k];
    std::fs::write(dir.join(FILES[k]), rest).expect("scratch write");
    match k {
        0..=2 => {
            if let Ok((m, _)) = SegModel::<f32, Cpu>::load(Cpu, dir) {
                let h = m.llava.cfg.text.hidden_size;
                let _ = popen::method::ensemble::load_prompt(dir, h);
            }
        }
        3 => {
            let _ = popen::train::checkpoint::read_train_state(dir);
        }
        _ => moments(dir),
    }
});
