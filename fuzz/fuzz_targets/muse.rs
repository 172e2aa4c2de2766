//! A MUSE JSON file through the reader (validation, path check, mask decoding).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = popen_fuzz::scratch_file("muse.json", data);
    let root = popen_fuzz::scratch_dir().join("images");
    // a budget under the 2 GiB memory limit libFuzzer runs with
    let _ = popen::data::sample::load_muse_within(&p, &root, 256 << 20);
});
