//! A GranD-f GCG JSON file through the reader.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = popen_fuzz::scratch_file("grandf.json", data);
    let root = popen_fuzz::scratch_dir().join("images");
    let _ = popen::data::sample::load_grandf(&p, &root);
});
