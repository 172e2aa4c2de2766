//! A ReasonSeg (LabelMe) JSON beside a 16 x 20 image (the fixture's size), through the reader.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// Built once, in libFuzzer's init (outside the per-input timeout).
fn fixture() -> &'static std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let png = popen_fuzz::png(16, 20);
        let p = popen_fuzz::scratch_file("reasonseg/a.png", &png);
        p.parent().unwrap().to_path_buf()
    })
}

fuzz_target!(init: {
    fixture();
}, |data: &[u8]| {
    let dir = fixture();
    popen_fuzz::scratch_file("reasonseg/a.json", data);
    let _ = popen::data::sample::load_reasonseg_flagged(dir);
});
