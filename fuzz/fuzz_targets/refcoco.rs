//! refCOCO: `refs(unc).p` (our pickle reader) and `instances.json`, given as one input
//! joined by `popen_fuzz::SEP`, through the reader (split `train`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (refs, inst) = popen_fuzz::split_at(data, popen_fuzz::SEP);
    popen_fuzz::scratch_file("refcoco/refcoco/refs(unc).p", refs);
    popen_fuzz::scratch_file("refcoco/refcoco/instances.json", inst);
    let dir = popen_fuzz::scratch_dir().join("refcoco");
    let _ = popen::data::sample::load_refcoco(&dir, "refcoco", "unc", "train");
});
