//! `DATA.json` as `popen eval` reads it, then scored with no predictions (so every
//! ground truth is rasterized to runs).
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::metrics::chair::Vocab;
use popen::metrics::eval::{evaluate, parse_data, EvalConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let src = std::path::Path::new("data.json");
    if let Ok(d) = parse_data(text, src) {
        let preds = d.iter().map(|r| vec![None; r.questions.len()]).collect();
        let _ = evaluate(&d, &preds, &Vocab::embedded(), &EvalConfig::default(), src);
    }
});
