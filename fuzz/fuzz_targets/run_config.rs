//! A TOML run config (`--config`) read as each stage's config: stage 1 (`[model]`,
//! `[train]`, `[loss]`, `[trainable]`), stage 2 (`[train]`, `[loss]`, `[collect]`) and
//! stage 3 (`[train]`, `[ensemble]`, `prompt_len`, `lti`, `lsi`), then validated.
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::method::ensemble::stage3::EnsembleTrainConfig;
use popen::method::pref::PrefConfig;
use popen::method::sft::SftConfig;
use popen::train::parse_toml;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let p = Path::new("run.toml");
    if let Ok(c) = parse_toml::<SftConfig>(p, text) {
        let _ = c.train.validate();
        let _ = c.train.schedule();
    }
    if let Ok(c) = parse_toml::<PrefConfig>(p, text) {
        let _ = c.train.validate();
    }
    if let Ok(c) = parse_toml::<EnsembleTrainConfig>(p, text) {
        let _ = c.train.validate();
    }
});
