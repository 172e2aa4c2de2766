//! The pickle reader alone, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = popen::data::pickle::parse(data) {
        let _ = v.type_name();
        if let Some(s) = v.as_seq() {
            for x in s {
                let _ = (x.get("split"), x.as_str(), x.as_i64());
            }
        }
    }
});
