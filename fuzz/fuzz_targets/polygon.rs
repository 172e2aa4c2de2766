//! Polygons: COCO rasterization (`mask_from_polygons`, `rle_from_polygon`) and the
//! OpenCV-style fill ReasonSeg uses, on an image of at most 64 x 64 and coordinates
//! from the input (i16 / 8, or raw f64 bits when the mode byte says so).
#![no_main]
use libfuzzer_sys::fuzz_target;
use popen::data::polygon::{fill_polygon_cv, mask_from_polygons, rle_from_polygon};
use popen::data::Mask;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let h = 1 + (data[0] % 64) as usize;
    let w = 1 + (data[1] % 64) as usize;
    let rest = &data[3..];
    let xy: Vec<f64> = if data[2] & 1 == 0 {
        rest.chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64 / 8.0)
            .collect()
    } else {
        rest.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    // several rings: split where a coordinate is exactly -4096 (i16::MIN / 8)
    let rings: Vec<Vec<f64>> = xy.split(|&v| v == -4096.0).map(|r| r.to_vec()).collect();
    let _ = mask_from_polygons(&rings, h, w);
    if let Ok(r) = rle_from_polygon(&xy, h, w) {
        let m = r.to_mask().expect("a rasterized polygon decodes");
        assert_eq!(m.area() as u64, r.area());
    }
    let pts: Vec<[f64; 2]> = xy.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
    let mut m = Mask::new(h, w);
    let _ = fill_polygon_cv(&mut m, &pts, 1);
});
