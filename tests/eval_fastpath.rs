//! The evaluator's fast path (interval counts on column-major runs, Boundary IoU on the
//! crop holding both masks) against the mask kernels' CPU twins on dense row-major
//! masks: equal counts, equal Boundary IoU, so transposition and cropping change nothing.
use popen::data::{Mask, Rle};
use popen::kernels::mask::{boundary_iou_cpu, boundary_width, pair_counts_cpu};
use popen::metrics::eval::boundary_iou_runs;
use popen::metrics::raster::{boundary_iou_intervals, Runs};

struct Lcg(u64);
impl Lcg {
    fn f(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A random mask: empty, full, an ellipse, a rectangle touching the border, or noise.
fn random_mask(r: &mut Lcg, h: usize, w: usize) -> Mask {
    let kind = (r.f() * 6.0) as usize;
    let (cy, cx) = (r.f() * h as f64, r.f() * w as f64);
    let (ry, rx) = (1.0 + r.f() * h as f64 / 2.0, 1.0 + r.f() * w as f64 / 2.0);
    match kind {
        0 => Mask::new(h, w),
        1 => Mask::from_fn(h, w, |_, _| true),
        2 => Mask::from_fn(h, w, |y, x| {
            ((y as f64 - cy) / ry).powi(2) + ((x as f64 - cx) / rx).powi(2) <= 1.0
        }),
        3 => Mask::from_fn(h, w, |y, x| (y as f64) < cy + ry && (x as f64) > cx - rx),
        _ => {
            let p = r.f();
            let mut m = Mask::new(h, w);
            for v in m.data.iter_mut() {
                *v = u8::from(r.f() < p);
            }
            m
        }
    }
}

fn runs(m: &Mask) -> Runs {
    Runs::from_counts(&Rle::from_mask(m).counts)
}

#[test]
fn interval_counts_match_pair_counts_cpu() {
    let mut r = Lcg(11);
    for (h, w) in [(1, 1), (7, 3), (13, 29), (31, 17), (37, 41)] {
        for _ in 0..12 {
            let (p, g) = (3, 4);
            let pm: Vec<Mask> = (0..p).map(|_| random_mask(&mut r, h, w)).collect();
            let gm: Vec<Mask> = (0..g).map(|_| random_mask(&mut r, h, w)).collect();
            let pd: Vec<u8> = pm.iter().flat_map(|m| m.data.iter().copied()).collect();
            let gd: Vec<u8> = gm.iter().flat_map(|m| m.data.iter().copied()).collect();
            let (mut inter, mut union) = (vec![0; p * g], vec![0; p * g]);
            pair_counts_cpu(&pd, &gd, p, g, h, w, &mut inter, &mut union).unwrap();
            for i in 0..p {
                let a = runs(&pm[i]);
                assert_eq!(a.area, pm[i].area() as u64);
                for j in 0..g {
                    let b = runs(&gm[j]);
                    let x = a.inter(&b);
                    assert_eq!(x, inter[i * g + j], "{h}x{w} pair ({i},{j})");
                    assert_eq!(a.area + b.area - x, union[i * g + j]);
                }
            }
            // union of several masks
            let mut dense = Mask::new(h, w);
            for m in &pm {
                dense = dense.union(m).unwrap();
            }
            let rs: Vec<Runs> = pm.iter().map(runs).collect();
            assert_eq!(Runs::union_all(&rs), runs(&dense));
        }
    }
}

#[test]
fn cropped_and_interval_boundary_iou_match_boundary_iou_cpu() {
    let mut r = Lcg(5);
    for (h, w) in [(1, 1), (9, 5), (23, 37), (41, 19), (3, 50)] {
        for ratio in [0.02, 0.08, 0.3] {
            for _ in 0..30 {
                let a = random_mask(&mut r, h, w);
                let b = random_mask(&mut r, h, w);
                let want = boundary_iou_cpu(&a.data, &b.data, h, w, ratio).unwrap();
                let d = boundary_width(h, w, ratio);
                let (ra, rb) = (runs(&a), runs(&b));
                let got = boundary_iou_runs(&ra, &rb, h, d).unwrap();
                assert_eq!(got, want, "crop: {h}x{w} ratio {ratio}: {a:?} vs {b:?}");
                let got = boundary_iou_intervals(&ra, &rb, h, d);
                assert_eq!(
                    got, want,
                    "intervals: {h}x{w} ratio {ratio}: {a:?} vs {b:?}"
                );
            }
        }
    }
}

#[test]
fn runs_bbox_crop_and_dense_round_trip() {
    let mut r = Lcg(3);
    let (h, w) = (13, 11);
    for _ in 0..40 {
        let m = random_mask(&mut r, h, w);
        let rs = runs(&m);
        // column-major dense form gives the same runs
        let mut cm = vec![0u8; h * w];
        for y in 0..h {
            for x in 0..w {
                cm[x * h + y] = m.get(y, x);
            }
        }
        assert_eq!(Runs::from_dense(&cm), rs);
        match rs.bbox(h) {
            None => assert!(m.is_empty()),
            Some((x0, x1, y0, y1)) => {
                let [bx, by, bw, bh] = m.bbox();
                assert_eq!(
                    (x0, x1, y0, y1),
                    (
                        bx as usize,
                        (bx + bw) as usize,
                        by as usize,
                        (by + bh) as usize
                    )
                );
                let mut crop = vec![0u8; (x1 - x0) * (y1 - y0)];
                rs.paint_crop(h, (x0, x1, y0, y1), &mut crop);
                let area: u64 = crop.iter().map(|&v| v as u64).sum();
                assert_eq!(area, rs.area, "the bbox crop holds the whole mask");
            }
        }
    }
}
