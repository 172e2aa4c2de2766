//! Adds, copies and reductions, the ops over many buffers at once, AdamW, and a chain
//! of ops that makes no host copy.
use super::*;

/// `add_new` and `add_into` over 1 to 9 terms (more than one launch's four operands)
/// are left folds, bit for bit, on both backends: each sum is what a chain of adds gives.
#[test]
fn n_ary_adds_are_left_folds_bit_for_bit() {
    for (d, n) in backends()
        .into_iter()
        .flat_map(|d| [(d.clone(), 1001), (d, 300_007)])
    {
        let mut r = Philox::new(11);
        let terms: Vec<Vec<f32>> = (0..9).map(|_| rnd(&mut r, n, 3.0)).collect();
        let dterms: Vec<_> = terms.iter().map(|t| d.from_slice(t)).collect();
        let fold = |start: &[f32], rest: &[Vec<f32>]| {
            let mut acc = start.to_vec();
            for t in rest {
                acc.iter_mut().zip(t).for_each(|(a, b)| *a += b);
            }
            acc
        };
        for k in 1..=9 {
            let want = fold(&terms[0], &terms[1..k]);
            let refs: Vec<&Vec<f32>> = terms[..k].iter().collect();
            assert_eq!(Cpu.add_new(&refs).unwrap(), want, "cpu add_new, {k} terms");
            let drefs: Vec<_> = dterms[..k].iter().collect();
            let got = d.to_vec(&d.add_new(&drefs).unwrap());
            assert!(got == want, "add_new, {k} terms, n {n}");
            // into the last term: dst + t0 + … + t(k−2)
            let want = fold(&terms[8], &terms[..k - 1]);
            let mut dst = terms[8].clone();
            Cpu.add_into(&mut dst, &refs[..k - 1]).unwrap();
            assert_eq!(dst, want, "cpu add_into, {} terms", k - 1);
            let mut dst = dterms[8].clone();
            d.add_into(&mut dst, &drefs[..k - 1]).unwrap();
            assert!(d.to_vec(&dst) == want, "add_into, {} terms, n {n}", k - 1);
        }
        let short = d.zeros(n - 1);
        let e = d.add_new(&[&dterms[0], &dterms[1], &short]).unwrap_err();
        assert!(e.to_string().contains("term 2 has"), "{e}");
        let e = d.add_into(&mut dterms[0].clone(), &[&short]).unwrap_err();
        assert!(e.to_string().contains("term 0 has"), "{e}");
        assert!(d.add_new(&[]).is_err(), "no terms");
        let e = Cpu.add_new(&[&terms[0], &vec![0.0; 3]]).unwrap_err();
        assert!(e.to_string().contains("term 1 has 3 elements"), "{e}");
    }
}

#[test]
fn memory_ops_match_cpu() {
    // 1001: four per load and a scalar tail; 300_007: more elements than one launch has
    // threads (1024 blocks of 256), so every op must stride over the grid
    for (d, n) in backends()
        .into_iter()
        .flat_map(|d| [(d.clone(), 1001), (d, 300_007)])
    {
        let mut r = Philox::new(1);
        let (x, xd) = both(&d, &rnd(&mut r, n, 2.0));
        let (mut y, mut yd) = both(&d, &rnd(&mut r, n, 2.0));
        Cpu.axpy(&mut y, -0.7, &x).unwrap();
        d.axpy(&mut yd, -0.7, &xd).unwrap();
        close("axpy", &d.to_vec(&yd), &y);
        Cpu.scale(&mut y, 1.3);
        d.scale(&mut yd, 1.3);
        close("scale", &d.to_vec(&yd), &y);
        // the device adds block partials (a tree), the CPU backend in sequence: the
        // device within TOL of the exact sum, the CPU within its sequential bound n·ε
        let exact: f64 = y.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let (s_cpu, s_dev) = (f64::from(Cpu.sum_sq(&y)), f64::from(d.sum_sq(&yd)));
        assert!(
            (s_dev - exact).abs() <= f64::from(TOL) * exact,
            "n {n}: sum_sq {s_dev} vs exact {exact}"
        );
        assert!(
            (s_cpu - exact).abs() <= n as f64 * f64::from(f32::EPSILON) * exact,
            "n {n}: cpu sum_sq {s_cpu} vs exact {exact}"
        );
        Cpu.copy_range(&mut y, 5, &x, 17, 333).unwrap();
        d.copy_range(&mut yd, 5, &xd, 17, 333).unwrap();
        close("copy_range", &d.to_vec(&yd), &y);
        assert!(d.copy_range(&mut yd, n - 101, &xd, 0, 200).is_err());
        // runs between maps of different widths (a crop), more values than one launch
        // has threads at the larger size
        let (rows, width, stride) = if n > 100_000 {
            (997, 281, 300)
        } else {
            (13, 29, 37)
        };
        let c = RowCopy {
            rows,
            width,
            dst_off: 7,
            dst_stride: width + 2,
            src_off: 11,
            src_stride: stride,
        };
        let mut want = y.clone();
        for r in 0..rows {
            let (o, i) = (c.dst_off + r * c.dst_stride, c.src_off + r * c.src_stride);
            want[o..o + width].copy_from_slice(&x[i..i + width]);
        }
        Cpu.copy_rows(&mut y, &x, c).unwrap();
        d.copy_rows(&mut yd, &xd, c).unwrap();
        assert_eq!(y, want, "copy_rows on the CPU");
        close("copy_rows", &d.to_vec(&yd), &want);
        let past = RowCopy { src_stride: n, ..c };
        assert!(Cpu.copy_rows(&mut y, &x, past).is_err());
        assert!(d.copy_rows(&mut yd, &xd, past).is_err());
        let overlapping = RowCopy {
            dst_stride: width - 1,
            ..c
        };
        assert!(Cpu.copy_rows(&mut y, &x, overlapping).is_err());
        assert!(d.copy_rows(&mut yd, &xd, overlapping).is_err());
        // the same runs added: each dst value plus its src value, bit for bit, the rest
        // of dst as it was (a source stride of 0 adds one row into each run)
        for c in [c, RowCopy { src_stride: 0, ..c }] {
            let mut want = y.clone();
            for r in 0..rows {
                let (o, i) = (c.dst_off + r * c.dst_stride, c.src_off + r * c.src_stride);
                for j in 0..width {
                    want[o + j] += x[i + j];
                }
            }
            let mut yd = d.from_slice(&y);
            Cpu.add_rows(&mut y, &x, c).unwrap();
            d.add_rows(&mut yd, &xd, c).unwrap();
            assert_eq!(y, want, "add_rows on the CPU");
            assert!(
                d.to_vec(&yd) == want,
                "add_rows, src stride {}",
                c.src_stride
            );
            let e = d.add_rows(&mut yd, &xd, overlapping).unwrap_err();
            assert!(e.to_string().contains("add_rows"), "{e}");
            assert!(Cpu.add_rows(&mut y, &x, past).is_err());
        }
        Cpu.copy(&mut y, &x).unwrap();
        d.copy(&mut yd, &xd).unwrap();
        close("copy", &d.to_vec(&yd), &y);
        d.fill(&mut yd, 0.25);
        assert!(d.to_vec(&yd).iter().all(|&v| v == 0.25));
        let mut short = d.zeros(3);
        assert!(d.axpy(&mut short, 1.0, &xd).is_err());
    }
}

/// Buffer sizes for the ops over many buffers: empty, one element, four per load with a
/// scalar tail, many blocks (300 007 elements take 37), a short one after the long one.
const MANY_SIZES: [usize; 5] = [0, 1, 1001, 300_007, 17];

/// A batch of Σ x² (the gradient norm's parts): each equal to its own `sum_sq` (bit for
/// bit: a batch of one, the same blocks and sums), and to the f64 sum, in one download
/// whatever the batch size; a second call on the same buffers uploads nothing.
#[test]
fn sum_sq_many_equals_each_sum_sq_in_one_download() {
    for d in backends() {
        let mut r = Philox::new(3);
        let host: Vec<Vec<f32>> = MANY_SIZES.iter().map(|&n| rnd(&mut r, n, 2.0)).collect();
        let bufs: Vec<_> = host.iter().map(|x| d.from_slice(x)).collect();
        let refs: Vec<_> = bufs.iter().collect();
        let one: Vec<f32> = bufs.iter().map(|b| d.sum_sq(b)).collect();
        let exact: Vec<f64> = host
            .iter()
            .map(|x| x.iter().map(|&v| v as f64 * v as f64).sum())
            .collect();
        let many = d.sum_sq_many(&refs);
        let before = d.device().copies();
        assert_eq!(d.sum_sq_many(&refs), many, "again");
        let after = d.device().copies();
        assert_eq!(after.dtoh, before.dtoh + 1, "downloads of one batch");
        assert_eq!(after.htod, before.htod, "the buffer table is uploaded once");
        assert_eq!(many, one);
        for (i, (&g, w)) in many.iter().zip(&exact).enumerate() {
            assert!(
                (g as f64 - w).abs() <= TOL as f64 * w,
                "sum_sq[{i}]: {g} vs {w}"
            );
        }
        assert_eq!(one[0], 0.0);
        assert!(d.sum_sq_many(&[]).is_empty());
    }
}

type Bufs = [popen::kernels::DeviceBuf<f32>];

/// One AdamW slot per tensor k: (p[k], g[k], m[k], v[k]).
fn adamw_slots<'a>(
    p: &'a mut Bufs,
    g: &'a Bufs,
    m: &'a mut Bufs,
    v: &'a mut Bufs,
) -> Vec<popen::backend::AdamWSlot<'a, popen::kernels::DeviceBuf<f32>>> {
    use popen::backend::AdamWSlot;
    p.iter_mut()
        .zip(g)
        .zip(m.iter_mut().zip(v.iter_mut()))
        .map(|((param, grad), (m, v))| AdamWSlot { param, grad, m, v })
        .collect()
}

/// `fill_many`, `scale_many` and `adamw_step_many` over buffers of several sizes: each
/// buffer bit for bit as its own one-buffer op leaves it (two steps, so that the
/// moments the first wrote are read); the step after the first uploads no table.
#[test]
fn ops_over_many_buffers_equal_each_buffer_alone() {
    for d in backends() {
        let mut r = Philox::new(4);
        let up = |r: &mut Philox, s: f64| -> Vec<_> {
            MANY_SIZES
                .iter()
                .map(|&n| d.from_slice(&rnd(r, n, s)))
                .collect()
        };
        let (mut x, x0) = (up(&mut r, 2.0), up(&mut r, 0.0));
        let mut each: Vec<_> = x.iter().map(|b| d.to_vec(b)).collect();
        let mut y: Vec<_> = each.iter().map(|v| d.from_slice(v)).collect();
        d.scale_many(&mut x.iter_mut().collect::<Vec<_>>(), -0.37);
        for b in &mut y {
            d.scale(b, -0.37);
        }
        let get = |bs: &[popen::kernels::DeviceBuf<f32>]| -> Vec<Vec<f32>> {
            bs.iter().map(|b| d.to_vec(b)).collect()
        };
        assert_eq!(get(&x), get(&y), "scale_many");
        assert_ne!(get(&x), each, "scale_many changed nothing");
        d.fill_many(&mut x.iter_mut().collect::<Vec<_>>(), 0.5);
        assert!(get(&x).iter().flatten().all(|&v| v == 0.5), "fill_many");
        // AdamW: weights x (then y), moments m, v (then m1, v1), gradients g
        let (mut p, mut m, mut v) = (up(&mut r, 1.0), x0.clone(), x0.clone());
        let (mut p1, mut m1, mut v1) = (p.clone(), x0.clone(), x0);
        let p0 = get(&p);
        // the gradients keep their buffers from step to step, as a model's do
        let mut g = up(&mut r, 0.1);
        for step in 1..=2 {
            if step > 1 {
                g.iter_mut().for_each(|b| d.scale(b, -0.5));
            }
            let h = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            let mut slots = adamw_slots(&mut p, &g, &mut m, &mut v);
            let before = d.device().copies();
            d.adamw_step_many(&h, &mut slots).unwrap();
            let after = d.device().copies();
            assert_eq!(
                after.htod - before.htod,
                u64::from(step == 1),
                "table uploads"
            );
            for i in 0..g.len() {
                d.adamw_step(&h, &mut p1[i], &g[i], &mut m1[i], &mut v1[i])
                    .unwrap();
            }
            assert_eq!(get(&p), get(&p1), "adamw_step_many param, step {step}");
            assert_eq!(get(&m), get(&m1), "adamw_step_many m, step {step}");
            assert_eq!(get(&v), get(&v1), "adamw_step_many v, step {step}");
        }
        each = get(&p);
        assert_ne!(each, p0, "adamw changed nothing");
        // a moment of the wrong length is an error naming its tensor, and nothing moves
        let mut short = d.zeros(3);
        let mut slots = adamw_slots(&mut p, &x, &mut m, &mut v);
        slots[2].m = &mut short;
        let h = AdamWStep {
            lr: 1.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 3,
        };
        let e = d.adamw_step_many(&h, &mut slots).unwrap_err().to_string();
        assert!(e.contains("m 2"), "{e}");
        drop(slots);
        assert_eq!(get(&p), each);
    }
}

#[test]
fn adamw_steps_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(8);
        let n = 777;
        let (mut p, mut pd) = both(&d, &rnd(&mut r, n, 1.0));
        let (mut m, mut md) = (vec![0.0; n], d.zeros(n));
        let (mut vv, mut vd) = (vec![0.0; n], d.zeros(n));
        for step in 1..=3 {
            let (g, gd) = both(&d, &rnd(&mut r, n, 0.1));
            let h = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            Cpu.adamw_step(&h, &mut p, &g, &mut m, &mut vv).unwrap();
            d.adamw_step(&h, &mut pd, &gd, &mut md, &mut vd).unwrap();
        }
        close("adamw param", &d.to_vec(&pd), &p);
        close("adamw m", &d.to_vec(&md), &m);
        close("adamw v", &d.to_vec(&vd), &vv);
        let h = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 0,
        };
        let gd = d.zeros(n);
        assert!(d.adamw_step(&h, &mut pd, &gd, &mut md, &mut vd).is_err());
    }
}

#[test]
fn a_chain_of_ops_makes_no_host_copy() {
    // norm → product → SwiGLU → backward pieces → AdamW, on device-resident buffers:
    // between the uploads and the final download the device copies nothing to or from
    // the host.
    for d in backends() {
        let mut r = Philox::new(9);
        let (n, c, h) = (9, 33, 17);
        let x = d.from_slice(&rnd(&mut r, n * c, 1.0));
        let w = d.from_slice(&rnd(&mut r, c * 2 * h, 0.3));
        let mut p = d.from_slice(&rnd(&mut r, c * 2 * h, 0.3));
        let before = d.device().copies();
        let (mut xn, mut rs) = (d.zeros(n * c), d.zeros(n));
        d.rmsnorm_fwd(&x, None, 1e-5, c, &mut xn, &mut rs).unwrap();
        let mut gu = d.zeros(n * 2 * h);
        let s = MatmulSpec {
            m: n,
            k: c,
            n: 2 * h,
            ta: false,
            tb: false,
        };
        d.matmul(s, &xn, &w, &mut gu, Accum::Replace).unwrap();
        let (mut gate, mut up, mut o) = (d.zeros(n * h), d.zeros(n * h), d.zeros(n * h));
        d.copy_range(&mut gate, 0, &gu, 0, n * h).unwrap();
        d.copy_range(&mut up, 0, &gu, n * h, n * h).unwrap();
        d.swiglu_fwd(&gate, &up, GateUp::apart(h), &mut o).unwrap();
        let (mut dg, mut du) = (d.zeros(n * h), d.zeros(n * h));
        d.swiglu_bwd(&gate, &up, &o, &mut dg, &mut du).unwrap();
        let mut grad = d.zeros(c * 2 * h);
        let sg = MatmulSpec {
            m: c,
            k: n,
            n: h,
            ta: true,
            tb: false,
        };
        let mut gpart = d.zeros(c * h);
        d.matmul(sg, &xn, &dg, &mut gpart, Accum::Replace).unwrap();
        d.copy_range(&mut grad, 0, &gpart, 0, c * h).unwrap();
        let (mut m, mut v) = (d.zeros(c * 2 * h), d.zeros(c * 2 * h));
        let hp = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        d.adamw_step(&hp, &mut p, &grad, &mut m, &mut v).unwrap();
        assert_eq!(
            d.device().copies(),
            before,
            "host↔device copies inside the chain"
        );
        let _ = d.to_vec(&p);
        assert_eq!(d.device().copies().dtoh, before.dtoh + 1);
    }
}
