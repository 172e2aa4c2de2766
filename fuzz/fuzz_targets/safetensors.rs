//! A safetensors file: header validation, then every tensor read as f32 and as i64.
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::model::StFile;

fuzz_target!(|data: &[u8]| {
    let p = popen_fuzz::scratch_file("model.safetensors", data);
    if let Ok(f) = StFile::open(&p) {
        let _ = f.metadata();
        for name in f.names() {
            let _ = f.info(&name);
            let _ = f.f32(&name);
            let _ = f.i64(&name);
        }
    }
});
