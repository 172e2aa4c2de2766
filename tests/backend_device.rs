//! The device backend on the CUDA emulator against the CPU backend (the reference):
//! every op of the contract at odd sizes, forward and backward, relative error ≤ 1e-5 of
//! the output's scale; bad sizes are errors; buffers stay on the device (host↔device
//! copies counted); a tiny LLaMA's training step equals the CPU's.
use popen::backend::{
    Accum, Act, AdamWStep, AttnLayout, AttnShape, Backend, Cpu, DeviceBackend, KvAppend,
    MatmulSpec, RowCopy, TimeCopy,
};
use popen::kernels::philox::Philox;
use popen::kernels::Device;

/// Relative tolerance against the largest reference value.
const TOL: f32 = 1e-5;

/// The device backend on every test device: the emulator, and GPU 0 when present (see
/// `Device::test_devices`; `POPEN_TEST_CUDA=1` requires it).
fn backends() -> Vec<DeviceBackend> {
    Device::test_devices()
        .into_iter()
        .map(DeviceBackend::new)
        .collect()
}

fn rnd(r: &mut Philox, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| r.uniform(-scale, scale) as f32).collect()
}

/// `got` equals `want` within TOL of want's scale.
#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOL * scale,
            "{what}[{i}]: device {g} vs cpu {w} (scale {scale})"
        );
    }
}

/// The same host data on both backends.
fn both(d: &DeviceBackend, x: &[f32]) -> (Vec<f32>, popen::kernels::DeviceBuf<f32>) {
    (x.to_vec(), d.from_slice(x))
}

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

/// Each of a batch's products against the CPU's one product at a time, in every layout,
/// on both backends (the decoder's per-mask shapes have N = 1 or K = 1).
#[test]
fn matmul_batched_is_each_product_in_every_layout() {
    for d in backends() {
        let mut r = Philox::new(12);
        for (batch, m, k, n) in [(5, 13, 6, 7), (1, 9, 4, 3), (4, 21, 8, 1), (3, 17, 1, 5)] {
            for (ta, tb, acc) in [
                (false, false, Accum::Replace),
                (true, false, Accum::Add),
                (false, true, Accum::Replace),
                (true, true, Accum::Add),
            ] {
                let s = MatmulSpec { m, k, n, ta, tb };
                let (la, lb, lo) = (m * k, k * n, m * n);
                let (a, ad) = both(&d, &rnd(&mut r, batch * la, 1.0));
                let (b, bd) = both(&d, &rnd(&mut r, batch * lb, 1.0));
                let (o0, mut od) = both(&d, &rnd(&mut r, batch * lo, 1.0));
                let mut want = o0.clone();
                for i in 0..batch {
                    let mut oi = want[i * lo..][..lo].to_vec();
                    let (ai, bi) = (a[i * la..][..la].to_vec(), b[i * lb..][..lb].to_vec());
                    Cpu.matmul(s, &ai, &bi, &mut oi, acc).unwrap();
                    want[i * lo..][..lo].copy_from_slice(&oi);
                }
                let mut o = o0.clone();
                Cpu.matmul_batched(s, batch, &a, &b, &mut o, acc).unwrap();
                assert_eq!(o, want, "CPU batch {batch} {m}x{k}x{n} ta={ta} tb={tb}");
                d.matmul_batched(s, batch, &ad, &bd, &mut od, acc).unwrap();
                let what = format!("matmul_batched {batch} {m}x{k}x{n} ta={ta} tb={tb} {acc:?}");
                close(&what, &d.to_vec(&od), &want);
            }
        }
        let s = MatmulSpec {
            m: 3,
            k: 2,
            n: 4,
            ta: false,
            tb: false,
        };
        let (a, b, mut o) = (d.zeros(2 * 6), d.zeros(2 * 8), d.zeros(2 * 12 - 1));
        assert!(d
            .matmul_batched(s, 2, &a, &b, &mut o, Accum::Replace)
            .is_err());
    }
}

#[test]
fn matmul_matches_cpu_in_every_layout() {
    for d in backends() {
        let mut r = Philox::new(2);
        let (m, k, n) = (37, 19, 23);
        for ta in [false, true] {
            for tb in [false, true] {
                for acc in [Accum::Replace, Accum::Add] {
                    let s = MatmulSpec { m, k, n, ta, tb };
                    let (a, ad) = both(&d, &rnd(&mut r, m * k, 1.0));
                    let (b, bd) = both(&d, &rnd(&mut r, k * n, 1.0));
                    let (mut o, mut od) = both(&d, &rnd(&mut r, m * n, 1.0));
                    Cpu.matmul(s, &a, &b, &mut o, acc).unwrap();
                    d.matmul(s, &ad, &bd, &mut od, acc).unwrap();
                    close(
                        &format!("matmul ta={ta} tb={tb} {acc:?}"),
                        &d.to_vec(&od),
                        &o,
                    );
                    close(
                        &format!("matmul_new ta={ta} tb={tb}"),
                        &d.to_vec(&d.matmul_new(s, &ad, &bd).unwrap()),
                        &Cpu.matmul_new(s, &a, &b).unwrap(),
                    );
                }
            }
        }
        let s = MatmulSpec {
            m,
            k,
            n: n + 1,
            ta: false,
            tb: false,
        };
        let (a, b, mut o) = (d.zeros(m * k), d.zeros(k * n), d.zeros(m * n));
        assert!(d.matmul(s, &a, &b, &mut o, Accum::Replace).is_err());
    }
}

#[test]
fn bias_forward_and_backward_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(3);
        // 29 rows: one pass down the columns; 203 rows of 5 and 150 of 300 (two column
        // tiles): chunks of rows, added by each tile's last block to finish
        for (n, c) in [(29, 301), (203, 5), (150, 300)] {
            let (bias, biasd) = both(&d, &rnd(&mut r, c, 1.0));
            let (mut o, mut od) = both(&d, &rnd(&mut r, n * c, 1.0));
            Cpu.add_bias(&mut o, &bias, c).unwrap();
            d.add_bias(&mut od, &biasd, c).unwrap();
            close("add_bias", &d.to_vec(&od), &o);
            // parameter gradients accumulate: start from a non-zero dbias; twice, so that
            // the second launch finds the completion counters the first set back to zero
            let (mut db, mut dbd) = both(&d, &rnd(&mut r, c, 1.0));
            for _ in 0..2 {
                Cpu.bias_bwd(&o, &mut db, c).unwrap();
                d.bias_bwd(&od, &mut dbd, c).unwrap();
                close("bias_bwd", &d.to_vec(&dbd), &db);
            }
            assert!(d.add_bias(&mut od, &biasd, c + 1).is_err());
        }
    }
}

#[test]
fn rmsnorm_forward_and_backward_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(4);
        // a warp per row, and a block per row (rows of more than 1024 floats)
        for (n, c, with_w) in [
            (13, 333, true),
            (13, 333, false),
            (3, 1029, true),
            (3, 1029, false),
        ] {
            let (x, xd) = both(&d, &rnd(&mut r, n * c, 2.0));
            let (w, wd) = both(&d, &rnd(&mut r, c, 1.5));
            let (mut o, mut od) = (vec![0.0; n * c], d.zeros(n * c));
            let (mut rs, mut rsd) = (vec![0.0; n], d.zeros(n));
            let (wc, wdv) = if with_w {
                (Some(&w), Some(&wd))
            } else {
                (None, None)
            };
            Cpu.rmsnorm_fwd(&x, wc, 1e-5, c, &mut o, &mut rs).unwrap();
            d.rmsnorm_fwd(&xd, wdv, 1e-5, c, &mut od, &mut rsd).unwrap();
            close("rmsnorm out", &d.to_vec(&od), &o);
            close("rmsnorm rstd", &d.to_vec(&rsd), &rs);
            let (g, gd) = both(&d, &rnd(&mut r, n * c, 1.0));
            let (mut dx, mut dxd) = (vec![0.0; n * c], d.zeros(n * c));
            let (mut dw, mut dwd) = both(&d, &rnd(&mut r, c, 1.0));
            Cpu.rmsnorm_bwd(&g, &x, wc, &rs, c, &mut dx, Some(&mut dw))
                .unwrap();
            d.rmsnorm_bwd(&gd, &xd, wdv, &rsd, c, &mut dxd, Some(&mut dwd))
                .unwrap();
            close("rmsnorm dx", &d.to_vec(&dxd), &dx);
            close("rmsnorm dw", &d.to_vec(&dwd), &dw);
            // frozen weight: dx only
            let mut dx2 = d.zeros(n * c);
            d.rmsnorm_bwd(&gd, &xd, wdv, &rsd, c, &mut dx2, None)
                .unwrap();
            close("rmsnorm dx (frozen)", &d.to_vec(&dx2), &dx);
            // a residual add and the norm in one launch: the CPU's add then norm, and
            // bit for bit the device's own axpy then norm (same per-row order)
            let (a, ad) = both(&d, &rnd(&mut r, n * c, 2.0));
            let (mut sum, mut o2, mut rs2) = (vec![0.0; n * c], vec![0.0; n * c], vec![0.0; n]);
            Cpu.add_rmsnorm_fwd(&x, &a, wc, 1e-5, c, &mut sum, &mut o2, &mut rs2)
                .unwrap();
            let (mut sumd, mut o2d, mut rs2d) = (d.uninit(n * c), d.uninit(n * c), d.uninit(n));
            d.add_rmsnorm_fwd(&xd, &ad, wdv, 1e-5, c, &mut sumd, &mut o2d, &mut rs2d)
                .unwrap();
            let plain: Vec<f32> = x.iter().zip(&a).map(|(x, a)| x + a).collect();
            assert_eq!(sum, plain, "add_rmsnorm sum on the CPU");
            close("add_rmsnorm sum", &d.to_vec(&sumd), &sum);
            close("add_rmsnorm out", &d.to_vec(&o2d), &o2);
            close("add_rmsnorm rstd", &d.to_vec(&rs2d), &rs2);
            let mut xa = xd.clone();
            d.axpy(&mut xa, 1.0, &ad).unwrap();
            d.rmsnorm_fwd(&xa, wdv, 1e-5, c, &mut od, &mut rsd).unwrap();
            assert_eq!(d.to_vec(&o2d), d.to_vec(&od), "fused against axpy + norm");
            assert_eq!(d.to_vec(&rs2d), d.to_vec(&rsd), "fused rstd");
        }
        let (x, mut o, mut rs) = (d.zeros(10), d.zeros(10), d.zeros(3));
        assert!(d.rmsnorm_fwd(&x, None, 1e-5, 3, &mut o, &mut rs).is_err());
        // three rows of 3, but a holds two
        let (x9, a6) = (d.zeros(9), d.zeros(6));
        let (mut s9, mut o9, mut r3) = (d.zeros(9), d.zeros(9), d.zeros(3));
        let e = d.add_rmsnorm_fwd(&x9, &a6, None, 1e-5, 3, &mut s9, &mut o9, &mut r3);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("a has 6 elements, expected 9"), "{e}");
    }
}

#[test]
fn activations_and_swiglu_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(5);
        let n = 4099;
        let (x, xd) = both(&d, &rnd(&mut r, n, 4.0));
        let (g, gd) = both(&d, &rnd(&mut r, n, 1.0));
        for act in [
            Act::QuickGelu,
            Act::GeluErf,
            Act::GeluTanh,
            Act::Silu,
            Act::Relu,
            Act::Sigmoid,
        ] {
            let (mut o, mut od) = (vec![0.0; n], d.zeros(n));
            Cpu.act_fwd(act, &x, &mut o).unwrap();
            d.act_fwd(act, &xd, &mut od).unwrap();
            close(&format!("{act:?} fwd"), &d.to_vec(&od), &o);
            Cpu.act_bwd(act, &x, &g, &mut o).unwrap();
            d.act_bwd(act, &xd, &gd, &mut od).unwrap();
            close(&format!("{act:?} bwd"), &d.to_vec(&od), &o);
        }
        let (up, upd) = both(&d, &rnd(&mut r, n, 2.0));
        let (mut o, mut od) = (vec![0.0; n], d.zeros(n));
        Cpu.swiglu_fwd(&x, &up, &mut o).unwrap();
        d.swiglu_fwd(&xd, &upd, &mut od).unwrap();
        close("swiglu fwd", &d.to_vec(&od), &o);
        let (mut dg, mut dgd) = (vec![0.0; n], d.zeros(n));
        let (mut du, mut dud) = (vec![0.0; n], d.zeros(n));
        Cpu.swiglu_bwd(&x, &up, &g, &mut dg, &mut du).unwrap();
        d.swiglu_bwd(&xd, &upd, &gd, &mut dgd, &mut dud).unwrap();
        close("swiglu dgate", &d.to_vec(&dgd), &dg);
        close("swiglu dup", &d.to_vec(&dud), &du);
        let mut short = d.zeros(n - 1);
        assert!(d.act_fwd(Act::Silu, &xd, &mut short).is_err());
    }
}

#[test]
fn attention_forward_and_backward_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(6);
        // one query over many keys without a mask is a decode step: the split-K decode
        // kernel (more keys than one 128-key chunk), its lse included
        for (causal, tq, tk, masked) in [
            (false, 7, 11, true),
            (true, 7, 11, true),
            (false, 1, 300, false),
            (true, 1, 13, false),
            (true, 1, 13, true),
        ] {
            let s = AttnShape {
                b: 2,
                nh: 4,
                nkv: 2,
                tq,
                tk,
                kv_stride: tk,
                hs: 5,
                causal,
                scale: 0.4,
                layout: AttnLayout::HEADS,
            };
            let nq = s.b * s.nh * s.tq * s.hs;
            let nk = s.b * s.nkv * s.tk * s.hs;
            let (q, qd) = both(&d, &rnd(&mut r, nq, 1.0));
            let (k, kd) = both(&d, &rnd(&mut r, nk, 1.0));
            let (v, vd) = both(&d, &rnd(&mut r, nk, 1.0));
            let (bias, biasd) = both(&d, &rnd(&mut r, s.b * s.tk, 1.0));
            let mask: Vec<u8> = (0..s.b * s.tk).map(|i| u8::from(i % 5 != 2)).collect();
            let mask = masked.then_some(&mask[..]);
            let (mut o, mut od) = (vec![0.0; nq], d.zeros(nq));
            let nl = s.b * s.nh * s.tq;
            let (mut l, mut ld) = (vec![0.0; nl], d.zeros(nl));
            Cpu.attention_fwd(&s, &q, &k, &v, Some(&bias), mask, &mut o, &mut l)
                .unwrap();
            d.attention_fwd(&s, &qd, &kd, &vd, Some(&biasd), mask, &mut od, &mut ld)
                .unwrap();
            close("attention out", &d.to_vec(&od), &o);
            close("attention lse", &d.to_vec(&ld), &l);
            // the same keys read in place from a cache of capacity tk + 3 whose unused
            // rows are NaN: nothing past Tk is read
            let ks = AttnShape {
                kv_stride: s.tk + 3,
                ..s
            };
            let pad = |x: &[f32]| -> Vec<f32> {
                x.chunks(s.tk * s.hs)
                    .flat_map(|blk| {
                        let mut v = blk.to_vec();
                        v.resize((s.tk + 3) * s.hs, f32::NAN);
                        v
                    })
                    .collect()
            };
            let (kp, kpd) = both(&d, &pad(&k));
            let (vp, vpd) = both(&d, &pad(&v));
            let (mut o2, mut od2) = (vec![0.0; nq], d.zeros(nq));
            let (mut l2, mut ld2) = (vec![0.0; nl], d.zeros(nl));
            Cpu.attention_fwd(&ks, &q, &kp, &vp, Some(&bias), mask, &mut o2, &mut l2)
                .unwrap();
            d.attention_fwd(&ks, &qd, &kpd, &vpd, Some(&biasd), mask, &mut od2, &mut ld2)
                .unwrap();
            close("attention out, strided keys (cpu)", &o2, &o);
            close("attention out, strided keys", &d.to_vec(&od2), &o);
            close("attention lse, strided keys", &d.to_vec(&ld2), &l);
            let (g, gd) = both(&d, &rnd(&mut r, nq, 1.0));
            let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            let mut db = vec![0.0; s.b * s.tk];
            let (mut dqd, mut dkd, mut dvd, mut dbd) =
                (d.zeros(nq), d.zeros(nk), d.zeros(nk), d.zeros(s.b * s.tk));
            Cpu.attention_bwd(
                &s,
                &q,
                &k,
                &v,
                Some(&bias),
                mask,
                &o,
                &l,
                &g,
                &mut dq,
                &mut dk,
                &mut dv,
                Some(&mut db),
            )
            .unwrap();
            d.attention_bwd(
                &s,
                &qd,
                &kd,
                &vd,
                Some(&biasd),
                mask,
                &od,
                &ld,
                &gd,
                &mut dqd,
                &mut dkd,
                &mut dvd,
                Some(&mut dbd),
            )
            .unwrap();
            close("attention dq", &d.to_vec(&dqd), &dq);
            close("attention dk", &d.to_vec(&dkd), &dk);
            close("attention dv", &d.to_vec(&dvd), &dv);
            close("attention dbias", &d.to_vec(&dbd), &db);
        }
    }
}

#[test]
fn key_masks_and_targets_are_uploaded_once_per_value() {
    // the backend keeps the last key mask and target list it uploaded: the same value
    // again costs no copy, and a new value (even of the same length) is used, not the
    // stale one
    for d in backends() {
        let mut r = Philox::new(13);
        let s = AttnShape {
            b: 2,
            nh: 2,
            nkv: 2,
            tq: 3,
            tk: 6,
            kv_stride: 6,
            hs: 4,
            causal: false,
            scale: 0.5,
            layout: AttnLayout::HEADS,
        };
        let (nq, nk) = (s.b * s.nh * s.tq * s.hs, s.b * s.nkv * s.tk * s.hs);
        let (q, qd) = both(&d, &rnd(&mut r, nq, 1.0));
        let (k, kd) = both(&d, &rnd(&mut r, nk, 1.0));
        let (v, vd) = both(&d, &rnd(&mut r, nk, 1.0));
        let nl = s.b * s.nh * s.tq;
        let masks: [Vec<u8>; 3] = [
            (0..12).map(|i| u8::from(i % 3 != 0)).collect(),
            (0..12).map(|i| u8::from(i % 4 != 1)).collect(),
            (0..12).map(|i| u8::from(i % 3 != 0)).collect(),
        ];
        for (i, mask) in masks.iter().chain(&masks[2..]).enumerate() {
            let (mut o, mut od) = (vec![0.0; nq], d.zeros(nq));
            let (mut l, mut ld) = (vec![0.0; nl], d.zeros(nl));
            Cpu.attention_fwd(&s, &q, &k, &v, None, Some(mask), &mut o, &mut l)
                .unwrap();
            let before = d.device().copies();
            d.attention_fwd(&s, &qd, &kd, &vd, None, Some(mask), &mut od, &mut ld)
                .unwrap();
            // masks 0, 1 and 2 differ from the one before; the 4th repeats the 3rd
            let up = d.device().copies().htod - before.htod;
            assert_eq!(up, u64::from(i < 3), "mask {i}: uploads");
            close(&format!("attention out with mask {i}"), &d.to_vec(&od), &o);
        }
        let (n, vocab) = (5, 17);
        let (x, xd) = both(&d, &rnd(&mut r, n * vocab, 2.0));
        for t in [[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]] {
            let (mut lp, mut lpd) = (vec![0.0; n], d.zeros(n));
            let (mut lse, mut lsed) = (vec![0.0; n], d.zeros(n));
            Cpu.logprob_fwd(&x, &t, vocab, &mut lp, &mut lse).unwrap();
            d.logprob_fwd(&xd, &t, vocab, &mut lpd, &mut lsed).unwrap();
            close(&format!("logprob with targets {t:?}"), &d.to_vec(&lpd), &lp);
        }
    }
}

#[test]
fn logprob_forward_and_backward_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(7);
        let (n, v) = (23, 1031);
        let (x, xd) = both(&d, &rnd(&mut r, n * v, 5.0));
        let targets: Vec<i32> = (0..n)
            .map(|i| {
                if i % 6 == 4 {
                    popen::kernels::logprob::IGNORE_INDEX
                } else {
                    ((i * 7919) % v) as i32
                }
            })
            .collect();
        let (mut lp, mut lpd) = (vec![0.0; n], d.zeros(n));
        let (mut l, mut ld) = (vec![0.0; n], d.zeros(n));
        Cpu.logprob_fwd(&x, &targets, v, &mut lp, &mut l).unwrap();
        d.logprob_fwd(&xd, &targets, v, &mut lpd, &mut ld).unwrap();
        close("logp", &d.to_vec(&lpd), &lp);
        close("lse", &d.to_vec(&ld), &l);
        let (w, wd) = both(&d, &rnd(&mut r, n, 1.0));
        let (mut dl, mut dld) = (vec![0.0; n * v], d.zeros(n * v));
        Cpu.logprob_bwd(&x, &targets, v, &l, &w, &mut dl).unwrap();
        d.logprob_bwd(&xd, &targets, v, &ld, &wd, &mut dld).unwrap();
        close("dlogits", &d.to_vec(&dld), &dl);
        let mut bad = targets.clone();
        bad[3] = v as i32;
        assert!(d.logprob_fwd(&xd, &bad, v, &mut lpd, &mut ld).is_err());
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
        d.swiglu_fwd(&gate, &up, &mut o).unwrap();
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

#[test]
fn layernorm_forward_and_backward_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(10);
        // a warp per row, and a block per row (rows of more than 1024 floats); 67 rows
        // of 19: the weight and bias gradients' column sums in chunks of rows
        for (n, c) in [(11, 257), (3, 1031), (67, 19)] {
            let (x, xd) = both(&d, &rnd(&mut r, n * c, 3.0));
            let (w, wd) = both(&d, &rnd(&mut r, c, 1.5));
            let (b, bd) = both(&d, &rnd(&mut r, c, 0.5));
            let (mut o, mut od) = (vec![0.0; n * c], d.zeros(n * c));
            let (mut mu, mut mud) = (vec![0.0; n], d.zeros(n));
            let (mut rs, mut rsd) = (vec![0.0; n], d.zeros(n));
            Cpu.layernorm_fwd(&x, &w, &b, 1e-5, c, &mut o, &mut mu, &mut rs)
                .unwrap();
            d.layernorm_fwd(&xd, &wd, &bd, 1e-5, c, &mut od, &mut mud, &mut rsd)
                .unwrap();
            close("layernorm out", &d.to_vec(&od), &o);
            close("layernorm mean", &d.to_vec(&mud), &mu);
            close("layernorm rstd", &d.to_vec(&rsd), &rs);
            let (g, gd) = both(&d, &rnd(&mut r, n * c, 1.0));
            let (mut dx, mut dxd) = (vec![0.0; n * c], d.zeros(n * c));
            let (mut dw, mut dwd) = both(&d, &rnd(&mut r, c, 1.0));
            let (mut db, mut dbd) = both(&d, &rnd(&mut r, c, 1.0));
            Cpu.layernorm_bwd(
                &g,
                &x,
                &w,
                &mu,
                &rs,
                c,
                &mut dx,
                Some(&mut dw),
                Some(&mut db),
            )
            .unwrap();
            d.layernorm_bwd(
                &gd,
                &xd,
                &wd,
                &mud,
                &rsd,
                c,
                &mut dxd,
                Some(&mut dwd),
                Some(&mut dbd),
            )
            .unwrap();
            close("layernorm dx", &d.to_vec(&dxd), &dx);
            close("layernorm dw", &d.to_vec(&dwd), &dw);
            close("layernorm db", &d.to_vec(&dbd), &db);
            assert!(d
                .layernorm_fwd(&xd, &wd, &bd, 1e-5, c + 1, &mut od, &mut mud, &mut rsd)
                .is_err());
            // a residual add and the norm in one launch: the CPU's add then norm, and
            // bit for bit the device's own add then norm (same per-row order)
            let (a, ad) = both(&d, &rnd(&mut r, n * c, 2.0));
            let mut cpu = (
                vec![0.0; n * c],
                vec![0.0; n * c],
                vec![0.0; n],
                vec![0.0; n],
            );
            let (s, o, m, rs) = (&mut cpu.0, &mut cpu.1, &mut cpu.2, &mut cpu.3);
            Cpu.add_layernorm_fwd(&x, &a, &w, &b, 1e-5, c, s, o, m, rs)
                .unwrap();
            let plain: Vec<f32> = x.iter().zip(&a).map(|(x, a)| x + a).collect();
            assert_eq!(cpu.0, plain, "add_layernorm sum on the CPU");
            let mut dev = (d.uninit(n * c), d.uninit(n * c), d.uninit(n), d.uninit(n));
            let (s, o, m, rs) = (&mut dev.0, &mut dev.1, &mut dev.2, &mut dev.3);
            d.add_layernorm_fwd(&xd, &ad, &wd, &bd, 1e-5, c, s, o, m, rs)
                .unwrap();
            close("add_layernorm sum", &d.to_vec(&dev.0), &cpu.0);
            close("add_layernorm out", &d.to_vec(&dev.1), &cpu.1);
            close("add_layernorm mean", &d.to_vec(&dev.2), &cpu.2);
            close("add_layernorm rstd", &d.to_vec(&dev.3), &cpu.3);
            let xa = d.add_new(&[&xd, &ad]).unwrap();
            d.layernorm_fwd(&xa, &wd, &bd, 1e-5, c, &mut od, &mut mud, &mut rsd)
                .unwrap();
            assert_eq!(d.to_vec(&dev.0), d.to_vec(&xa), "fused sum");
            assert_eq!(d.to_vec(&dev.1), d.to_vec(&od), "fused against add + norm");
            assert_eq!(d.to_vec(&dev.2), d.to_vec(&mud), "fused mean");
            assert_eq!(d.to_vec(&dev.3), d.to_vec(&rsd), "fused rstd");
            let (s, o, m, rs) = (&mut dev.0, &mut dev.1, &mut dev.2, &mut dev.3);
            let e = d
                .add_layernorm_fwd(&xd, &d.zeros(c), &wd, &bd, 1e-5, c, s, o, m, rs)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("add_layernorm_fwd") && e.contains("a has"),
                "{e}"
            );
        }
    }
}

#[test]
fn heads_split_merge_and_rope_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(11);
        let (b, t, nh, hs, pos0) = (2, 7, 3, 10, 5);
        let n = b * t * nh * hs;
        let (x, xd) = both(&d, &rnd(&mut r, n, 1.0));
        let (v, vd) = both(&d, &rnd(&mut r, n, 1.0));
        for theta in [None, Some(10000.0f32), Some(500.0)] {
            let (mut o, mut od) = (vec![0.0; n], d.zeros(n));
            Cpu.heads_split(&x, b, t, nh, hs, pos0, theta, &mut o)
                .unwrap();
            d.heads_split(&xd, b, t, nh, hs, pos0, theta, &mut od)
                .unwrap();
            close(&format!("heads_split {theta:?}"), &d.to_vec(&od), &o);
            Cpu.heads_split_bwd(&x, b, t, nh, hs, pos0, theta, &mut o)
                .unwrap();
            d.heads_split_bwd(&xd, b, t, nh, hs, pos0, theta, &mut od)
                .unwrap();
            close(&format!("heads_split_bwd {theta:?}"), &d.to_vec(&od), &o);
            // keys and values into rows 4..11 of blocks of 13 (a KV cache's room): the
            // split's values there (the keys rotated, the values not), every other row
            // as it was
            let mut ov = vec![0.0; n];
            Cpu.heads_split(&x, b, t, nh, hs, pos0, theta, &mut o)
                .unwrap();
            Cpu.heads_split(&v, b, t, nh, hs, pos0, None, &mut ov)
                .unwrap();
            let a = KvAppend {
                b,
                t,
                nkv: nh,
                hs,
                pos0,
                theta,
                cap: 13,
                at: 4,
            };
            let (mut kc, mut kcd) = both(&d, &rnd(&mut r, b * nh * 13 * hs, 1.0));
            let (mut vc, mut vcd) = both(&d, &rnd(&mut r, b * nh * 13 * hs, 1.0));
            let (kb, vb) = (kc.clone(), vc.clone());
            Cpu.append_kv(&x, &v, &a, &mut kc, &mut vc).unwrap();
            d.append_kv(&xd, &vd, &a, &mut kcd, &mut vcd).unwrap();
            close(&format!("append_kv keys {theta:?}"), &d.to_vec(&kcd), &kc);
            close(&format!("append_kv values {theta:?}"), &d.to_vec(&vcd), &vc);
            let (kcd, vcd) = (d.to_vec(&kcd), d.to_vec(&vcd));
            for (cpu, dev, split, before) in [(&kc, &kcd, &o, &kb), (&vc, &vcd, &ov, &vb)] {
                for g in 0..b * nh {
                    for row in 0..13 {
                        let at = (g * 13 + row) * hs..(g * 13 + row + 1) * hs;
                        if (4..4 + t).contains(&row) {
                            let want = &split[(g * t + row - 4) * hs..][..hs];
                            assert_eq!(cpu[at], *want, "row {row}");
                        } else {
                            assert_eq!(cpu[at.clone()], before[at.clone()], "cpu {g} {row}");
                            assert_eq!(dev[at.clone()], before[at], "{theta:?} {g} {row}");
                        }
                    }
                }
            }
            let (mut z, mut z2) = (d.zeros(b * nh * 13 * hs), d.zeros(b * nh * 13 * hs));
            let late = KvAppend { at: 7, ..a };
            let e = d.append_kv(&xd, &vd, &late, &mut z, &mut z2).unwrap_err();
            assert!(e.to_string().contains("do not fit 13 rows"), "{e}");
            let e = Cpu.append_kv(&x, &v, &late, &mut kc, &mut vc).unwrap_err();
            assert!(e.to_string().contains("do not fit 13 rows"), "{e}");
            let mut v12 = d.zeros(b * nh * 12 * hs);
            let e = d.append_kv(&xd, &vd, &a, &mut z, &mut v12).unwrap_err();
            assert!(e.to_string().contains("second output has"), "{e}");
        }
        let (mut o, mut od) = (vec![0.0; n], d.zeros(n));
        Cpu.heads_merge(&x, b, t, nh, hs, &mut o).unwrap();
        d.heads_merge(&xd, b, t, nh, hs, &mut od).unwrap();
        close("heads_merge", &d.to_vec(&od), &o);
        // RoPE needs an even head size
        let (x9, mut o9) = (d.zeros(b * t * nh * 9), d.zeros(b * t * nh * 9));
        assert!(d
            .heads_split(&x9, b, t, nh, 9, 0, Some(1e4), &mut o9)
            .is_err());
        // a KV cache's write in place: 3 rows into rows 4..7 of blocks of 9, from rows
        // 1..4 of blocks of 5; every other row of dst is left as it was
        let tc = TimeCopy {
            bh: b * nh,
            hs,
            dst_t: 9,
            dst_at: 4,
            src_t: 5,
            src_at: 1,
            n: 3,
        };
        let (src, srcd) = both(&d, &rnd(&mut r, b * nh * 5 * hs, 1.0));
        let (mut dst, mut dstd) = both(&d, &rnd(&mut r, b * nh * 9 * hs, 1.0));
        let before = dst.clone();
        Cpu.copy_time(&mut dst, &src, tc).unwrap();
        d.copy_time(&mut dstd, &srcd, tc).unwrap();
        close("copy_time", &d.to_vec(&dstd), &dst);
        for g in 0..b * nh {
            for row in 0..9 {
                let got = &dst[(g * 9 + row) * hs..][..hs];
                let want = if (4..7).contains(&row) {
                    &src[(g * 5 + row - 3) * hs..][..hs]
                } else {
                    &before[(g * 9 + row) * hs..][..hs]
                };
                assert_eq!(got, want, "block {g} row {row}");
            }
        }
        for bad in [
            TimeCopy { dst_at: 7, ..tc },
            TimeCopy { src_at: 3, ..tc },
            TimeCopy { dst_t: 10, ..tc },
        ] {
            assert!(d.copy_time(&mut dstd, &srcd, bad).is_err(), "{bad:?}");
            assert!(Cpu.copy_time(&mut dst, &src, bad).is_err(), "{bad:?}");
        }
    }
}

#[test]
fn embedding_and_patchify_match_cpu() {
    for d in backends() {
        let mut r = Philox::new(12);
        let (v, c) = (13, 37);
        let ids: Vec<u32> = [3u32, 0, 12, 3, 7, 3, 11].to_vec();
        let (table, tabled) = both(&d, &rnd(&mut r, v * c, 1.0));
        let (mut o, mut od) = (vec![0.0; ids.len() * c], d.zeros(ids.len() * c));
        Cpu.embedding_fwd(&ids, &table, c, &mut o).unwrap();
        d.embedding_fwd(&ids, &tabled, c, &mut od).unwrap();
        close("embedding_fwd", &d.to_vec(&od), &o);
        // repeated ids accumulate into a non-zero gradient
        let (mut dt, mut dtd) = both(&d, &rnd(&mut r, v * c, 1.0));
        Cpu.embedding_bwd(&ids, &o, c, &mut dt).unwrap();
        d.embedding_bwd(&ids, &od, c, &mut dtd).unwrap();
        close("embedding_bwd", &d.to_vec(&dtd), &dt);
        assert!(d
            .embedding_fwd(&[0, 13], &tabled, c, &mut d.zeros(2 * c))
            .is_err());
        let (b, ch, h, w, p) = (2, 3, 15, 9, 3);
        let n = b * ch * h * w;
        let (px, pxd) = both(&d, &rnd(&mut r, n, 1.0));
        let (mut o, mut od) = (vec![0.0; n], d.zeros(n));
        Cpu.patchify(&px, b, ch, h, w, p, &mut o).unwrap();
        d.patchify(&pxd, b, ch, h, w, p, &mut od).unwrap();
        close("patchify", &d.to_vec(&od), &o);
        let (mut back, mut backd) = (vec![0.0; n], d.zeros(n));
        Cpu.patchify_bwd(&o, b, ch, h, w, p, &mut back).unwrap();
        d.patchify_bwd(&od, b, ch, h, w, p, &mut backd).unwrap();
        close("patchify_bwd", &d.to_vec(&backd), &back);
        assert_eq!(
            d.to_vec(&backd),
            px,
            "the backward of a permutation is its inverse"
        );
        assert!(d.patchify(&pxd, b, ch, h, w, 4, &mut od).is_err());
    }
}

/// A device buffer of n NaNs: an op that must overwrite its output and leaves any
/// element unwritten fails `close`.
fn nans(d: &DeviceBackend, n: usize) -> popen::kernels::DeviceBuf<f32> {
    d.from_slice(&vec![f32::NAN; n])
}

#[test]
fn image_ops_match_cpu_forward_and_backward_without_host_copies() {
    use popen::backend::Conv2dGeom;
    for d in backends() {
        let mut r = Philox::new(12);
        let mut copies = 0u64;
        // im2col: padded 3×3, unpadded 2×2, and padding wider than the kernel's reach;
        // channels by float4 (C = 4, 8), more channel units than a block row has threads
        // (C = 261 by floats, 1028 by float4s), more pixels in a row than a block has rows
        for (b, h, w, c, k, pad) in [
            (2, 5, 7, 3, 3, 1),
            (1, 6, 4, 5, 2, 0),
            (2, 3, 5, 2, 3, 2),
            (2, 4, 6, 4, 3, 1),
            (1, 3, 70, 8, 3, 1),
            (1, 2, 3, 261, 2, 1),
            (1, 2, 2, 1028, 2, 0),
        ] {
            let g = Conv2dGeom { b, h, w, c, k, pad };
            let (ho, wo) = g.out_hw().unwrap();
            let (nx, no) = (b * h * w * c, b * ho * wo * g.col_width());
            let (x, xd) = both(&d, &rnd(&mut r, nx, 2.0));
            let (dout, doutd) = both(&d, &rnd(&mut r, no, 1.0));
            let before = d.device().copies();
            let (mut o, mut od) = (vec![0.0; no], nans(&d, no));
            let (mut dx, mut dxd) = (vec![0.0; nx], nans(&d, nx));
            Cpu.im2col(&x, &g, &mut o).unwrap();
            d.im2col(&xd, &g, &mut od).unwrap();
            Cpu.im2col_bwd(&dout, &g, &mut dx).unwrap();
            d.im2col_bwd(&doutd, &g, &mut dxd).unwrap();
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh - 2; // the two NaN uploads
            close(&format!("im2col {g:?}"), &d.to_vec(&od), &o);
            close(&format!("im2col_bwd {g:?}"), &d.to_vec(&dxd), &dx);
            assert!(d.im2col(&xd, &g, &mut nans(&d, no + 1)).is_err());
        }
        // depth-to-space and its inverse: runs of r·C = 6 floats, 12 (float4s), and more
        // input pixels in a row than a block has rows (runs of 3 floats, 85 per block)
        for (b, h, w, c, rr) in [(2, 3, 5, 3, 2), (1, 2, 3, 4, 3), (1, 2, 100, 3, 1)] {
            let n = b * h * w * rr * rr * c;
            let (x, xd) = both(&d, &rnd(&mut r, n, 2.0));
            let (mut o, mut od) = (vec![0.0; n], nans(&d, n));
            let (mut dx, mut dxd) = (vec![0.0; n], nans(&d, n));
            let before = d.device().copies();
            Cpu.depth_to_space(&x, b, h, w, c, rr, &mut o).unwrap();
            d.depth_to_space(&xd, b, h, w, c, rr, &mut od).unwrap();
            Cpu.depth_to_space_bwd(&x, b, h, w, c, rr, &mut dx).unwrap();
            d.depth_to_space_bwd(&xd, b, h, w, c, rr, &mut dxd).unwrap();
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh;
            close("depth_to_space", &d.to_vec(&od), &o);
            close("depth_to_space_bwd", &d.to_vec(&dxd), &dx);
            assert!(d.depth_to_space(&xd, b, h, w, c, 0, &mut od).is_err());
        }
        // bilinear resize: up, down, by odd factors, from one pixel, and the same size;
        // masks (C = 1) wider than a block (256 columns) and taller than a forward band
        // (16 rows) or several backward bands (4 rows), up and down; channels by float4
        for (h, w, ho, wo, c) in [
            (3, 5, 13, 11, 3),
            (9, 14, 4, 5, 3),
            (1, 1, 5, 3, 3),
            (4, 4, 4, 4, 3),
            (7, 3, 2, 9, 3),
            (10, 70, 37, 300, 1),
            (37, 300, 10, 70, 1),
            (6, 9, 20, 5, 4),
            (13, 5, 6, 7, 8),
        ] {
            let b = 2;
            let (nx, no) = (b * h * w * c, b * ho * wo * c);
            let (x, xd) = both(&d, &rnd(&mut r, nx, 2.0));
            let (dout, doutd) = both(&d, &rnd(&mut r, no, 1.0));
            let (mut o, mut od) = (vec![0.0; no], nans(&d, no));
            let (mut dx, mut dxd) = (vec![0.0; nx], nans(&d, nx));
            let before = d.device().copies();
            Cpu.resize_bilinear(&x, b, h, w, c, ho, wo, &mut o).unwrap();
            d.resize_bilinear(&xd, b, h, w, c, ho, wo, &mut od).unwrap();
            Cpu.resize_bilinear_bwd(&dout, b, h, w, c, ho, wo, &mut dx)
                .unwrap();
            d.resize_bilinear_bwd(&doutd, b, h, w, c, ho, wo, &mut dxd)
                .unwrap();
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh;
            let what = format!("{h}x{w} -> {ho}x{wo}");
            close(&format!("resize {what}"), &d.to_vec(&od), &o);
            close(&format!("resize_bwd {what}"), &d.to_vec(&dxd), &dx);
            assert!(d.resize_bilinear(&xd, b, h, w, c, 0, wo, &mut od).is_err());
        }
        // per-row scale: by floats, by float4s over more rows than a block has, and more
        // float4s in a row than a block row has threads
        for (n, c) in [(13, 37), (300, 8), (5, 1100)] {
            let (x, xd) = both(&d, &rnd(&mut r, n * c, 2.0));
            let (g, gd) = both(&d, &rnd(&mut r, n, 1.5));
            let (dout, doutd) = both(&d, &rnd(&mut r, n * c, 1.0));
            let (mut o, mut od) = (vec![0.0; n * c], nans(&d, n * c));
            let (mut dx, mut dxd) = (vec![0.0; n * c], nans(&d, n * c));
            let (mut dg, mut dgd) = (vec![0.0; n], nans(&d, n));
            let before = d.device().copies();
            Cpu.mul_rows(&x, &g, c, &mut o).unwrap();
            d.mul_rows(&xd, &gd, c, &mut od).unwrap();
            Cpu.mul_rows_bwd(&x, &g, &dout, c, &mut dx, &mut dg)
                .unwrap();
            d.mul_rows_bwd(&xd, &gd, &doutd, c, &mut dxd, &mut dgd)
                .unwrap();
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh;
            close("mul_rows", &d.to_vec(&od), &o);
            close("mul_rows_bwd dx", &d.to_vec(&dxd), &dx);
            close("mul_rows_bwd dg", &d.to_vec(&dgd), &dg);
            assert!(d.mul_rows(&xd, &gd, c + 1, &mut od).is_err());
        }
        // mask losses: more pixels than a block's threads (301: one chunk, one pixel per
        // load; 16 396: three chunks, four per load), logits of both signs and large
        // |x|, soft and hard targets, and one empty target
        for (m, p) in [(5, 301), (3, 16_396)] {
            let logits = rnd(&mut r, m * p, 8.0);
            let mut target: Vec<f32> = (0..m * p)
                .map(|i| match i % 7 {
                    0 => 0.3,
                    1..=3 => 1.0,
                    _ => 0.0,
                })
                .collect();
            target[2 * p..3 * p].iter_mut().for_each(|t| *t = 0.0);
            let (ld, td) = (d.from_slice(&logits), d.from_slice(&target));
            let mut dld = nans(&d, m * p);
            let before = d.device().copies();
            let got = d.mask_loss_fwd(&ld, &td, m, p).unwrap();
            d.mask_loss_bwd(&ld, &td, &got.sums, m, p, 2.0, 0.5, &mut dld)
                .unwrap();
            // the forward's (BCE, Dice) pairs come back: one download; the sums stay
            copies +=
                d.device().copies().htod + d.device().copies().dtoh - before.htod - before.dtoh - 1;
            // the reference in f64: over 16k pixels the f32 CPU twin's sequential sums
            // are themselves about 1e-5 off, the device's chunked trees closer
            let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
            let (l64, t64) = (wide(&logits), wide(&target));
            let want64 = Cpu.mask_loss_fwd(&l64, &t64, m, p).unwrap();
            let want: Vec<f32> = want64
                .losses
                .iter()
                .flat_map(|&(a, b)| [a as f32, b as f32])
                .collect();
            let mut dl64 = vec![0.0f64; m * p];
            Cpu.mask_loss_bwd(&l64, &t64, &want64.sums, m, p, 2.0, 0.5, &mut dl64)
                .unwrap();
            let sums64: Vec<f32> = want64.sums.iter().map(|&x| x as f32).collect();
            let dl: Vec<f32> = dl64.iter().map(|&x| x as f32).collect();
            let flat = |v: &[(f32, f32)]| v.iter().flat_map(|&(a, b)| [a, b]).collect::<Vec<_>>();
            close("mask_loss_fwd", &flat(&got.losses), &want);
            close("mask_loss_fwd sums", &d.to_vec(&got.sums), &sums64);
            close("mask_loss_bwd", &d.to_vec(&dld), &dl);
            assert!(d.mask_loss_fwd(&ld, &td, m, p + 1).is_err());
            assert!(d
                .mask_loss_bwd(&ld, &td, &got.sums, m, 0, 2.0, 0.5, &mut dld)
                .is_err());
            let short = d.from_slice(&vec![0.0f32; 4 * m - 1]);
            assert!(d
                .mask_loss_bwd(&ld, &td, &short, m, p, 2.0, 0.5, &mut dld)
                .is_err());
        }
        assert_eq!(copies, 0, "host↔device copies made by the image ops");
    }
}

#[test]
fn mask_loss_bce_keeps_its_digits_for_confident_logits() {
    // Logits of 9 to 16 with the sign of a hard target: each pixel's BCE is
    // log1p(e^{-|x|}), 1.1e-7 to 1.2e-4, and so is the mean.  Held to 1e-5 of itself,
    // not of a scale: a kernel that formed log(1 + e) in f32 would round 1 + e first and
    // miss by about 1e-4 of it (8e-5 with logf(1 + e) in place of the kernel's log1p;
    // the kernel's own series misses by 5e-8).
    let mut r = Philox::new(77);
    let (m, p) = (2usize, 4099usize);
    let logits: Vec<f32> = rnd(&mut r, m * p, 1.0)
        .iter()
        .map(|&u| {
            let mag = 12.5 + 3.5 * u.clamp(-1.0, 1.0);
            if u.to_bits() % 2 == 0 {
                mag
            } else {
                -mag
            }
        })
        .collect();
    let target: Vec<f32> = logits.iter().map(|&x| f32::from(x > 0.0)).collect();
    let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let want = Cpu
        .mask_loss_fwd(&wide(&logits), &wide(&target), m, p)
        .unwrap();
    for d in backends() {
        let got = d
            .mask_loss_fwd(&d.from_slice(&logits), &d.from_slice(&target), m, p)
            .unwrap();
        for k in 0..m {
            let (g, w) = (f64::from(got.losses[k].0), want.losses[k].0);
            assert!(w > 1e-7 && w < 1.3e-4, "mask {k}: reference BCE {w}");
            assert!(
                (g - w).abs() <= 1e-5 * w,
                "mask {k}: device BCE {g} vs cpu {w} (rel {:.2e})",
                (g - w).abs() / w
            );
        }
    }
}

/// The tiny LLaMA of the training tests, on backend `be`.
fn tiny_llama<B: Backend<f32>>(be: B) -> popen::nn::llama::Llama<f32, B> {
    tiny_llama_heads(be, (4, 2))
}

/// The tiny LLaMA with (query heads, kv heads) of its 16 dimensions: (4, 2) gives head
/// size 4, (2, 1) head size 8 (which the tensor-core attention kernels take).
fn tiny_llama_heads<B: Backend<f32>>(
    be: B,
    (nh, nkv): (usize, usize),
) -> popen::nn::llama::Llama<f32, B> {
    let cfg = popen::nn::llama::LlamaConfig {
        vocab_size: 17,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: nh,
        num_key_value_heads: Some(nkv),
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
    };
    popen::nn::llama::Llama::new(be, cfg, 3).unwrap()
}

/// The logits of a prefill of 5 tokens, then of each later token fed one at a time
/// through the KV cache, with a per-key bias on the prefill's keys that grows by 0 for
/// each new key (as the ensemble's refinement decodes).
fn cached_logits<B: Backend<f32>>(
    m: &popen::nn::llama::Llama<f32, B>,
    ids: &[u32],
) -> Vec<Vec<f32>> {
    let be = &m.be;
    let mut bias: Vec<f32> = (0..5).map(|i| 0.4 * i as f32 - 0.7).collect();
    let mut cache = m.new_cache(1);
    let (lg, _) = m
        .forward_embeds(
            m.embed(&ids[..5]).unwrap(),
            1,
            5,
            None,
            Some(&be.from_slice(&bias)),
            Some(&mut cache),
        )
        .unwrap();
    let mut out = vec![be.to_vec(&lg)];
    for t in 5..ids.len() {
        bias.push(0.0);
        let (lg, _) = m
            .forward_embeds(
                m.embed(&ids[t..t + 1]).unwrap(),
                1,
                1,
                None,
                Some(&be.from_slice(&bias)),
                Some(&mut cache),
            )
            .unwrap();
        out.push(be.to_vec(&lg));
    }
    out
}

#[test]
fn kv_cache_decoding_on_the_device_equals_the_cpu() {
    // every decoding step runs the decode kernel on the device
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 17).collect();
    let want = cached_logits(&tiny_llama(Cpu), &ids);
    assert_eq!(want.len(), 20);
    for d in backends() {
        let got = cached_logits(&tiny_llama(d.clone()), &ids);
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            close(&format!("{:?} logits at step {t}", d.device().kind()), g, w);
        }
    }
}

#[test]
fn selected_cache_rows_are_copies_of_the_rows_named() {
    // a cache of 3 rows; selections in order, reordered, repeated (runs of source
    // stride 0), and mixed: each selected row is its source row, bit for bit
    let ids: Vec<u32> = (0..12).map(|i| (i * 5 + 2) % 17).collect();
    for d in backends() {
        let m = tiny_llama(d.clone());
        let be = &m.be;
        let mut cache = m.new_cache(3);
        m.forward_embeds(m.embed(&ids).unwrap(), 3, 4, None, None, Some(&mut cache))
            .unwrap();
        for rows in [
            &[0, 1, 2][..],
            &[2, 2, 2, 0],
            &[1, 0],
            &[0, 0, 1, 1, 2],
            &[2, 0, 1, 2],
        ] {
            let sel = m.select_cache_rows(&cache, rows).unwrap();
            assert_eq!((sel.b, sel.len()), (rows.len(), cache.len()));
            for (l, ls) in cache.layers.iter().zip(&sel.layers) {
                for (src, dst) in [(&l.k, &ls.k), (&l.v, &ls.v)] {
                    let (src, dst) = (be.to_vec(src), be.to_vec(dst));
                    let n = src.len() / 3;
                    for (i, &r) in rows.iter().enumerate() {
                        assert!(
                            dst[i * n..(i + 1) * n] == src[r * n..(r + 1) * n],
                            "{:?}, rows {rows:?}: row {i} is not row {r}",
                            d.device().kind()
                        );
                    }
                }
            }
        }
        assert!(m.select_cache_rows(&cache, &[0, 3]).is_err());
        assert!(m.select_cache_rows(&cache, &[]).is_err());
    }
}

/// What `train_steps` returns: the loss of each step, every parameter after the steps
/// (by name), and the host↔device copies each step made (by `copies`).
type Trained = (Vec<f32>, Vec<(String, Vec<f32>)>, Vec<u64>);

/// Two training steps (forward, mean token log-prob loss, backward, AdamW); `copies`
/// reads the device's running count of host↔device copies.
fn train_steps<B: Backend<f32>>(be: B, heads: (usize, usize), copies: impl Fn() -> u64) -> Trained {
    use popen::train::adamw::{AdamW, AdamWConfig};
    let mut m = tiny_llama_heads(be.clone(), heads);
    let (b, t, v) = (2, 7, 17);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 1) % v) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| ((i * 3 + 2) % v) as i32).collect();
    let n = b * t;
    let mut opt = AdamW::<f32, B>::new(AdamWConfig::default());
    let (mut losses, mut per_step) = (vec![], vec![]);
    for _ in 0..2 {
        let before = copies();
        m.zero_grad();
        let (logits, acts) = m.forward(&ids, b, None, None).unwrap();
        let (mut lp, mut lse) = (be.zeros(n), be.zeros(n));
        be.logprob_fwd(&logits, &targets, v, &mut lp, &mut lse)
            .unwrap();
        losses.push(-be.to_vec(&lp).iter().sum::<f32>() / n as f32);
        let dlogp = be.from_slice(&vec![-1.0 / n as f32; n]);
        let mut dl = be.zeros(n * v);
        be.logprob_bwd(&logits, &targets, v, &lse, &dlogp, &mut dl)
            .unwrap();
        m.backward(&acts, &dl).unwrap();
        let mut params = m.params_mut();
        opt.step(&be, &mut params, 1e-2).unwrap();
        per_step.push(copies() - before);
    }
    let params = m
        .params_mut()
        .into_iter()
        .map(|(name, p)| (name, be.to_vec(&p.data)))
        .collect();
    (losses, params, per_step)
}

/// On every test device (the emulator; GPU 0 too under `POPEN_TEST_CUDA=1`), and with
/// attention on the tensor-core kernels (head size 8).
#[test]
fn tiny_llama_training_step_on_the_device_equals_cpu() {
    for (heads, tc) in [((4, 2), false), ((2, 1), true)] {
        training_step_equals_cpu(heads, tc);
    }
}

fn training_step_equals_cpu(heads: (usize, usize), tc: bool) {
    let (loss_cpu, p_cpu, _) = train_steps(Cpu, heads, || 0);
    for d in backends() {
        let d = d.with_tensor_core_attention(tc);
        assert_eq!(d.tensor_core_attention(16 / heads.0), tc, "heads {heads:?}");
        let kind = d.device().kind();
        let dev = d.clone();
        let count = move || {
            let c = dev.device().copies();
            c.htod + c.dtoh
        };
        d.device().set_profiling(true);
        let (loss_dev, p_dev, copies) = train_steps(d.clone(), heads, count);
        // the attention kernels that ran are the ones asked for
        let ran: Vec<String> = d
            .device()
            .take_profile()
            .unwrap()
            .into_iter()
            .map(|k| k.name)
            .collect();
        d.device().set_profiling(false);
        for k in [
            "attention_fwd_tc_f32",
            "attention_bwd_dq_tc_f32",
            "attention_bwd_dkv_tc_f32",
        ] {
            assert_eq!(ran.iter().any(|n| n == k), tc, "{kind:?}: {k} in {ran:?}");
        }
        assert_eq!(ran.iter().any(|n| n == "attention_fwd_f32"), !tc, "{ran:?}");
        for (a, b) in loss_dev.iter().zip(&loss_cpu) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "loss {kind:?} tc {tc} {a} vs cpu {b}"
            );
        }
        assert_eq!(p_cpu.len(), p_dev.len());
        for ((name, e), (_, c)) in p_dev.iter().zip(&p_cpu) {
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in e.iter().zip(c).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 * scale,
                    "{name}[{i}]: {kind:?} tc {tc} {x} vs cpu {y}"
                );
            }
        }
        // the steps did something: the loss went down on the fixed batch
        assert!(loss_dev[1] < loss_dev[0], "losses {loss_dev:?}");
        // buffers stay on the device: per step only the host data the contract hands
        // over (token ids twice, targets twice, the unit d_out of the log-prob
        // backward), the loss read back and dlogp uploaded by this test; none per layer
        // or per tensor.  The first step uploads two buffer tables more, for the
        // gradients' zeroing and the AdamW step over every tensor; later steps reuse them.
        assert!(
            copies[0] <= MAX_COPIES_PER_STEP + 2
                && copies[1..].iter().all(|&c| c <= MAX_COPIES_PER_STEP),
            "{kind:?}: host<->device copies per step: {copies:?}"
        );
    }
}

/// Host↔device copies one training step of the tiny LLaMA may make (see the test).
const MAX_COPIES_PER_STEP: u64 = 7;
