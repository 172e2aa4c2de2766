//! A PNG mask as `popen eval-masks` reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, w, px)) = popen::data::png::decode_mask_png(data, "mask.png".as_ref()) {
        assert_eq!(px.len(), h * w);
    }
});
