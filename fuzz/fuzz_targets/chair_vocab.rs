//! A CHAIR vocabulary (`--vocab`) and a response scored with it, joined by
//! `popen_fuzz::SEP`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::metrics::chair::{chair_counts, Vocab};

fuzz_target!(|data: &[u8]| {
    let (vocab, text) = popen_fuzz::split_at(data, popen_fuzz::SEP);
    let (Ok(vocab), Ok(text)) = (std::str::from_utf8(vocab), std::str::from_utf8(text)) else {
        return;
    };
    if let Ok(v) = Vocab::parse(vocab, "vocab.txt") {
        let present = v.objects_of(["dog", "cup"].into_iter());
        let c = chair_counts(&v, text, &present);
        assert!(c.hallucinated <= c.mentions);
    }
});
