//! `PRED.jsonl` against the committed evaluation fixture, then scored.
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::data::muse::MuseImage;
use popen::metrics::chair::Vocab;
use popen::metrics::eval::{evaluate, parse_data, parse_preds, EvalConfig};
use std::path::Path;
use std::sync::OnceLock;

/// Built once, in libFuzzer's init (outside the per-input timeout).
fn fixture() -> &'static Vec<MuseImage> {
    static DATA: OnceLock<Vec<MuseImage>> = OnceLock::new();
    DATA.get_or_init(|| {
        let text = include_str!("../../tests/fixtures/eval/data.json");
        parse_data(text, Path::new("data.json")).expect("the fixture parses")
    })
}

fuzz_target!(init: {
    fixture();
}, |data: &[u8]| {
    let d = fixture();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = parse_preds(text, Path::new("pred.jsonl"), d) {
        let cfg = EvalConfig::default();
        evaluate(d, &p, &Vocab::embedded(), &cfg, Path::new("data.json"))
            .expect("validated predictions score");
    }
});
