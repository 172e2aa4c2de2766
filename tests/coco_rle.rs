//! COCO RLE and polygon rasterization against pycocotools, bit for bit.  Fixtures are
//! written by `tools/coco_fixtures.py` (pycocotools 2.x, seed 0).
use popen::data::polygon::{mask_from_polygons, rle_from_polygon};
use popen::data::{Mask, Rle};
use serde::Deserialize;

#[derive(Deserialize)]
struct PolyCase {
    h: usize,
    w: usize,
    polys: Vec<Vec<f64>>,
    counts: String,
    single: Vec<String>,
}

#[derive(Deserialize)]
struct MaskCase {
    h: usize,
    w: usize,
    bits: String,
    counts: String,
}

#[derive(Deserialize)]
struct Big {
    h: usize,
    w: usize,
    counts: String,
    area: u64,
}

#[derive(Deserialize)]
struct Fixture {
    polygons: Vec<PolyCase>,
    masks: Vec<MaskCase>,
    big: Big,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/coco/coco_rle.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn show(m: &Mask) -> String {
    let mut s = String::new();
    for y in 0..m.height {
        for x in 0..m.width {
            s.push(if m.get(y, x) != 0 { '#' } else { '.' });
        }
        s.push('\n');
    }
    s
}

#[test]
fn single_polygons_match_pycocotools_frpyobjects() {
    let f = fixture();
    let mut n = 0;
    for (i, c) in f.polygons.iter().enumerate() {
        for (p, want) in c.polys.iter().zip(&c.single) {
            let got = rle_from_polygon(p, c.h, c.w).unwrap();
            if got.to_compressed() != *want {
                let want_m = Rle::from_compressed(c.h, c.w, want)
                    .unwrap()
                    .to_mask()
                    .unwrap();
                panic!(
                    "case {i} ({}x{}) polygon {p:?}\nwant {want}\n{}got {}\n{}",
                    c.h,
                    c.w,
                    show(&want_m),
                    got.to_compressed(),
                    show(&got.to_mask().unwrap())
                );
            }
            n += 1;
        }
    }
    assert!(n > 130, "only {n} polygons checked");
}

#[test]
fn polygon_unions_match_pycocotools_merge() {
    let f = fixture();
    for (i, c) in f.polygons.iter().enumerate() {
        let m = mask_from_polygons(&c.polys, c.h, c.w).unwrap();
        let want = Rle::from_compressed(c.h, c.w, &c.counts)
            .unwrap()
            .to_mask()
            .unwrap();
        assert_eq!(m, want, "case {i}");
        // and the string form of the union is pycocotools' string
        assert_eq!(Rle::from_mask(&m).to_compressed(), c.counts, "case {i}");
    }
}

#[test]
fn masks_encode_to_pycocotools_strings_and_back() {
    let f = fixture();
    for (i, c) in f.masks.iter().enumerate() {
        let data: Vec<u8> = c.bits.bytes().map(|b| u8::from(b == b'1')).collect();
        let m = Mask::from_vec(c.h, c.w, data).unwrap();
        let r = Rle::from_mask(&m);
        assert_eq!(r.to_compressed(), c.counts, "mask {i} ({}x{})", c.h, c.w);
        let back = Rle::from_compressed(c.h, c.w, &c.counts).unwrap();
        assert_eq!(back.to_mask().unwrap(), m, "mask {i}");
    }
    let b = &f.big;
    let r = Rle::from_compressed(b.h, b.w, &b.counts).unwrap();
    assert_eq!(r.area(), b.area);
    let m = r.to_mask().unwrap();
    assert_eq!(Rle::from_mask(&m).to_compressed(), b.counts);
}

#[test]
fn polygon_outside_the_image_is_clipped_not_an_error() {
    // a triangle wholly to the right of a 8x9 image: empty, one run of 72 zeros
    let r = rle_from_polygon(&[20.0, 3.0, 30.0, 3.0, 25.0, 6.0], 8, 9).unwrap();
    assert_eq!(r.counts, vec![72]);
    // a square straddling the left edge keeps only its inside part
    let m = mask_from_polygons(&[vec![-3.0, 1.0, 3.0, 1.0, 3.0, 4.0, -3.0, 4.0]], 6, 7).unwrap();
    assert_eq!(m.bbox(), [0.0, 1.0, 3.0, 3.0]);
}

#[test]
fn non_finite_or_huge_coordinates_are_errors() {
    assert!(rle_from_polygon(&[0.0, 0.0, f64::NAN, 1.0, 2.0, 2.0], 4, 4).is_err());
    assert!(rle_from_polygon(&[0.0, 0.0, 1e12, 1.0, 2.0, 2.0], 4, 4).is_err());
    // odd trailing value ignored, empty polygon empty
    assert_eq!(rle_from_polygon(&[], 3, 2).unwrap().counts, vec![6]);
}

/// pycocotools' rasterization walked point by point along every edge, the way its C
/// code does it: the oracle for `rle_from_polygon`, which skips the parts of an edge
/// outside the image.  Returns the mask as the parity of the toggles.
fn walk_point_by_point(xy: &[f64], h: usize, w: usize) -> Mask {
    let k = xy.len() / 2;
    let mut m = Mask::new(h, w);
    if k == 0 || h == 0 || w == 0 {
        return m;
    }
    let c_int = |x: f64| {
        if x.is_nan() || x.abs() >= 2e9 {
            i32::MIN
        } else {
            x as i32
        }
    };
    let mut x: Vec<i32> = (0..k).map(|j| c_int(5.0 * xy[2 * j] + 0.5)).collect();
    let mut y: Vec<i32> = (0..k).map(|j| c_int(5.0 * xy[2 * j + 1] + 0.5)).collect();
    x.push(x[0]);
    y.push(y[0]);
    let (mut u, mut v) = (Vec::new(), Vec::new());
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        if dx >= dy {
            let s = (ye - ys) as f64 / dx as f64;
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                u.push(t + xs);
                v.push(c_int(ys as f64 + s * t as f64 + 0.5));
            }
        } else {
            let s = (xe - xs) as f64 / dy as f64;
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                v.push(t + ys);
                u.push(c_int(xs as f64 + s * t as f64 + 0.5));
            }
        }
    }
    let mut toggles = Vec::new();
    for j in 1..u.len() {
        if u[j] == u[j - 1] {
            continue;
        }
        let xd = (if u[j] < u[j - 1] { u[j] } else { u[j] - 1 }) as f64;
        let xd = (xd + 0.5) / 5.0 - 0.5;
        if xd.floor() != xd || xd < 0.0 || xd > w as f64 - 1.0 {
            continue;
        }
        let yd = (v[j].min(v[j - 1]) as f64 + 0.5) / 5.0 - 0.5;
        let yd = yd.clamp(0.0, h as f64).ceil();
        toggles.push(xd as usize * h + yd as usize);
    }
    for i in 0..h * w {
        if toggles.iter().filter(|&&t| t <= i).count() % 2 == 1 {
            m.set(i % h, i / h, 1);
        }
    }
    m
}

#[test]
fn a_polygon_far_outside_the_image_costs_what_the_image_does() {
    // Twenty edges of ~10^7 fine steps each: walked point by point this is 2·10^8
    // steps (seconds); clipped to the image it is a few thousand.  Not timed: the
    // result must equal the same polygon's crossings, which the oracle test below
    // checks at smaller sizes, and it must finish.
    let big = popen::data::polygon::MAX_COORD - 10.0;
    let xy: Vec<f64> = (0..20)
        .flat_map(|i| {
            let a = i as f64 / 20.0 * std::f64::consts::TAU;
            [3.0 + big * a.cos(), 4.0 + big * a.sin()]
        })
        .collect();
    let r = rle_from_polygon(&xy, 7, 9).unwrap();
    // the polygon covers the whole image
    assert_eq!(r.counts, vec![0, 63], "{:?}", r.counts);
}

mod clipped_walk {
    use super::*;
    use proptest::prelude::*;

    fn coord() -> impl Strategy<Value = f64> {
        prop_oneof![
            6 => -12.0f64..24.0,
            2 => -400.0f64..400.0,
            1 => (-40i32..60).prop_map(|v| v as f64 * 0.2),
            1 => Just(2.4),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The clipped walk gives exactly the point-by-point walk's mask, for polygons
        /// inside, across and far outside small images (vertices repeated, edges
        /// along grid lines, slopes of every sign).
        #[test]
        fn rle_from_polygon_equals_the_point_by_point_walk(
            xy in proptest::collection::vec(coord(), 0..16),
            h in 1usize..13,
            w in 1usize..13,
        ) {
            let got = rle_from_polygon(&xy, h, w).unwrap().to_mask().unwrap();
            let want = walk_point_by_point(&xy, h, w);
            prop_assert!(got == want, "{xy:?} {h}x{w}\nwant\n{}got\n{}", show(&want), show(&got));
        }
    }
}

mod never_panics {
    use super::*;
    use popen::data::polygon::fill_polygon_cv;
    use proptest::prelude::*;

    fn coord() -> impl Strategy<Value = f64> {
        prop_oneof![
            8 => -30.0f64..60.0,
            1 => Just(f64::NAN),
            1 => -3e6f64..3e6,
            1 => (-20i32..40).prop_map(|v| v as f64 + 0.5),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any polygon on any small image: an `Err` or a mask whose runs cover the
        /// image exactly; the OpenCV fill paints inside the image only.
        #[test]
        fn polygon_rasterizers_never_panic(
            xy in proptest::collection::vec(coord(), 0..20),
            h in 0usize..9,
            w in 0usize..9,
        ) {
            if let Ok(r) = rle_from_polygon(&xy, h, w) {
                let total: u64 = r.counts.iter().map(|&c| c as u64).sum();
                prop_assert_eq!(total, (h * w) as u64);
                prop_assert!(r.to_mask().is_ok());
            }
            let pts: Vec<[f64; 2]> = xy.chunks_exact(2).map(|p| [p[0], p[1]]).collect();
            let mut m = Mask::new(h, w);
            if let Ok(n) = fill_polygon_cv(&mut m, &pts, 1) {
                prop_assert_eq!(n, m.area());
            }
        }
    }
}

/// Rough speed of the COCO rasterizer (not an assertion): run with
/// `cargo test --test coco_rle rasterize_speed -- --ignored --nocapture`.
#[test]
#[ignore = "timing, prints only"]
fn rasterize_speed() {
    let (h, w) = (480usize, 640usize);
    let polys: Vec<Vec<f64>> = (0..2000)
        .map(|i| {
            let (cx, cy, r) = (
                (i * 37 % w) as f64,
                (i * 53 % h) as f64,
                20.0 + (i % 200) as f64,
            );
            (0..30)
                .flat_map(|k| {
                    let a = k as f64 / 30.0 * std::f64::consts::TAU;
                    let rr = r * (0.6 + 0.4 * ((k * 7 + i) % 5) as f64 / 4.0);
                    [cx + rr * a.cos(), cy + rr * a.sin()]
                })
                .collect()
        })
        .collect();
    let t = std::time::Instant::now();
    let mut runs = 0usize;
    for p in &polys {
        runs += rle_from_polygon(p, h, w).unwrap().counts.len();
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "rle_from_polygon: {} polygons (30 vertices, 480x640) in {:.3} s = {:.1} us each ({runs} runs)",
        polys.len(),
        dt,
        dt / polys.len() as f64 * 1e6
    );
    let t = std::time::Instant::now();
    for p in &polys {
        let m = mask_from_polygons(std::slice::from_ref(p), h, w).unwrap();
        assert!(m.height == h);
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "mask_from_polygons (decoded): {:.1} us each",
        dt / polys.len() as f64 * 1e6
    );
}
