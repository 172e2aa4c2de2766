//! The world BPE tokenizer on arbitrary UTF-8: `<seg>` is always one token.
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::data::sample::SEG as SEG_TOKEN;
use popen::data::tokenizer::Tok;
use popen::data::world::WorldConfig;
use std::sync::OnceLock;

/// Built once, in libFuzzer's init (outside the per-input timeout).
fn fixture() -> &'static Tok {
    static TOK: OnceLock<Tok> = OnceLock::new();
    TOK.get_or_init(|| {
        let cfg = WorldConfig {
            height: 48,
            width: 64,
            questions: 3,
        };
        Tok::train_world(&cfg, 3, 60, 400).expect("world tokenizer trains")
    })
}

fuzz_target!(init: {
    fixture();
}, |data: &[u8]| {
    let tok = fixture();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ids = tok.encode(text).expect("any text encodes");
    let n = ids.iter().filter(|&&i| i == tok.seg).count();
    assert_eq!(n, text.matches(SEG_TOKEN).count(), "{text:?}");
    let _ = tok.decode(&ids);
});
