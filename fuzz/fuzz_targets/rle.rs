//! COCO RLE: compressed strings and run lists, at a size given by the first 4 bytes.
//! Checks the invariants too: a decoded string re-encodes to the same runs, and the
//! evaluator's run validation agrees with the dense decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::data::muse::{RleCounts, RleJson};
use popen::data::Rle;
use popen::metrics::raster::rle_runs;

/// Dense decoding is only tried up to this many pixels, so that one input stays fast;
/// bigger sizes go through the run-based paths, which never expand a mask.
const DENSE_MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let h = u16::from_le_bytes([data[0], data[1]]) as usize;
    let w = u16::from_le_bytes([data[2], data[3]]) as usize;
    let mode = data[4];
    let rest = &data[5..];
    let json = if mode & 1 == 0 {
        let Ok(s) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok(r) = Rle::from_compressed(h, w, s) {
            let back =
                Rle::from_compressed(h, w, &r.to_compressed()).expect("re-encoded RLE decodes");
            assert_eq!(back.counts, r.counts, "compressed round trip");
        }
        RleCounts::Compressed(s.to_string())
    } else {
        let runs: Vec<u32> = rest
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        RleCounts::Runs(runs)
    };
    let rj = RleJson {
        size: [h as u32, w as u32],
        counts: json,
    };
    let runs = rle_runs(&rj, h, w);
    if let Ok(r) = rj.to_rle() {
        let _ = r.area();
        if h * w <= DENSE_MAX {
            let dense = r.to_mask();
            assert_eq!(
                dense.is_ok(),
                runs.is_ok(),
                "rle_runs and to_mask disagree on {rj:?}"
            );
        }
    }
});
