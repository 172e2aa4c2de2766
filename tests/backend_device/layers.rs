//! The layers' ops: products, bias, norms, activations, attention (and what it
//! uploads), log-probs, heads and RoPE, embeddings and patches.
use super::*;

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
        Cpu.swiglu_fwd(&x, &up, GateUp::apart(n), &mut o).unwrap();
        d.swiglu_fwd(&xd, &upd, GateUp::apart(n), &mut od).unwrap();
        close("swiglu fwd", &d.to_vec(&od), &o);
        // the two halves of a fused product's rows (rows of 7: no float4 alignment)
        for (rows, w) in [(3, 7), (5, 8)] {
            let (g, u) = (rnd(&mut r, rows * w, 2.0), rnd(&mut r, rows * w, 2.0));
            let gu: Vec<f32> = g
                .chunks(w)
                .zip(u.chunks(w))
                .flat_map(|(a, b)| a.iter().chain(b).copied())
                .collect();
            let mut want = vec![0.0; rows * w];
            Cpu.swiglu_fwd(&g, &u, GateUp::apart(w), &mut want).unwrap();
            let mut o = vec![0.0; rows * w];
            Cpu.swiglu_fwd(&gu, &gu, GateUp::fused(w), &mut o).unwrap();
            assert_eq!(o, want, "cpu swiglu of fused rows of {w}");
            let (gud, mut od) = (d.from_slice(&gu), d.zeros(rows * w));
            d.swiglu_fwd(&gud, &gud, GateUp::fused(w), &mut od).unwrap();
            close(
                &format!("swiglu of fused rows of {w}"),
                &d.to_vec(&od),
                &want,
            );
            // a fused buffer one value short, an out that is no whole number of rows
            let short = d.zeros(2 * rows * w - 1);
            let e = d
                .swiglu_fwd(&short, &short, GateUp::fused(w), &mut od)
                .unwrap_err();
            assert!(e.to_string().contains("need"), "{e}");
            let mut odd = d.zeros(rows * w - 1);
            let e = d
                .swiglu_fwd(&gud, &gud, GateUp::fused(w), &mut odd)
                .unwrap_err();
            assert!(e.to_string().contains("whole number of rows"), "{e}");
        }
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
            Cpu.heads_split(&x, Cols::whole(nh * hs), b, t, nh, hs, pos0, theta, &mut o)
                .unwrap();
            d.heads_split(
                &xd,
                Cols::whole(nh * hs),
                b,
                t,
                nh,
                hs,
                pos0,
                theta,
                &mut od,
            )
            .unwrap();
            close(&format!("heads_split {theta:?}"), &d.to_vec(&od), &o);
            Cpu.heads_split_bwd(&x, b, t, nh, hs, pos0, theta, &mut o, Cols::whole(nh * hs))
                .unwrap();
            d.heads_split_bwd(
                &xd,
                b,
                t,
                nh,
                hs,
                pos0,
                theta,
                &mut od,
                Cols::whole(nh * hs),
            )
            .unwrap();
            close(&format!("heads_split_bwd {theta:?}"), &d.to_vec(&od), &o);
            // keys and values into rows 4..11 of blocks of 13 (a KV cache's room): the
            // split's values there (the keys rotated, the values not), every other row
            // as it was
            let mut ov = vec![0.0; n];
            Cpu.heads_split(&x, Cols::whole(nh * hs), b, t, nh, hs, pos0, theta, &mut o)
                .unwrap();
            Cpu.heads_split(&v, Cols::whole(nh * hs), b, t, nh, hs, pos0, None, &mut ov)
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
                k_cols: Cols::whole(nh * hs),
                v_cols: Cols::whole(nh * hs),
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
            .heads_split(&x9, Cols::whole(nh * 9), b, t, nh, 9, 0, Some(1e4), &mut o9)
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

/// Writes `rows` (rows of `w` values) at `at` in `buf`: a projection's columns of a
/// fused product's wider rows.
fn put(buf: &mut [f32], rows: &[f32], w: usize, at: Cols) {
    for (r, row) in rows.chunks(w).enumerate() {
        buf[at.off + r * at.ld..][..w].copy_from_slice(row);
    }
}

#[test]
fn heads_layouts_read_and_write_columns_of_wider_rows() {
    for d in backends() {
        let mut r = Philox::new(21);
        let (b, t, nh, nkv, hs, pos0) = (2, 5, 3, 2, 6, 4);
        let (wq, wk) = (nh * hs, nkv * hs);
        // one fused product's rows: [q | k | v | 3 spare], as Attention::fuse makes them
        let ld = wq + 2 * wk + 3;
        let (qa, ka, va) = (
            Cols { off: 0, ld },
            Cols { off: wq, ld },
            Cols { off: wq + wk, ld },
        );
        let len = b * t * ld;
        let (q, k, v) = (
            rnd(&mut r, b * t * wq, 1.0),
            rnd(&mut r, b * t * wk, 1.0),
            rnd(&mut r, b * t * wk, 1.0),
        );
        // NaN in the spare columns: a read of them shows
        let mut fused = vec![f32::NAN; len];
        put(&mut fused, &q, wq, qa);
        put(&mut fused, &k, wk, ka);
        put(&mut fused, &v, wk, va);
        let fd = d.from_slice(&fused);
        for theta in [None, Some(1e4f32)] {
            // the split of the query's columns is the split of the query alone
            let mut want = vec![0.0; q.len()];
            Cpu.heads_split(&q, Cols::whole(wq), b, t, nh, hs, pos0, theta, &mut want)
                .unwrap();
            let (mut o, mut od) = (vec![0.0; q.len()], d.zeros(q.len()));
            Cpu.heads_split(&fused, qa, b, t, nh, hs, pos0, theta, &mut o)
                .unwrap();
            d.heads_split(&fd, qa, b, t, nh, hs, pos0, theta, &mut od)
                .unwrap();
            assert_eq!(o, want, "cpu split of the query's columns {theta:?}");
            close(
                &format!("split of columns {theta:?}"),
                &d.to_vec(&od),
                &want,
            );
            // keys and values from their columns of one buffer, into a cache's rows 1..6
            let a = KvAppend {
                b,
                t,
                nkv,
                hs,
                pos0,
                theta,
                cap: 7,
                at: 1,
                k_cols: ka,
                v_cols: va,
            };
            let whole = KvAppend {
                k_cols: Cols::whole(wk),
                v_cols: Cols::whole(wk),
                ..a
            };
            let n_c = b * nkv * 7 * hs;
            let (kc0, vc0) = (rnd(&mut r, n_c, 1.0), rnd(&mut r, n_c, 1.0));
            let (mut kw, mut vw) = (kc0.clone(), vc0.clone());
            Cpu.append_kv(&k, &v, &whole, &mut kw, &mut vw).unwrap();
            let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
            Cpu.append_kv(&fused, &fused, &a, &mut kc, &mut vc).unwrap();
            assert!(kc == kw && vc == vw, "cpu append from columns {theta:?}");
            let (mut kcd, mut vcd) = (d.from_slice(&kc0), d.from_slice(&vc0));
            d.append_kv(&fd, &fd, &a, &mut kcd, &mut vcd).unwrap();
            close(&format!("append keys {theta:?}"), &d.to_vec(&kcd), &kw);
            close(&format!("append values {theta:?}"), &d.to_vec(&vcd), &vw);
            // the backward writes the query's columns only: the rest stays as it was
            let dq = rnd(&mut r, q.len(), 1.0);
            let mut dwhole = vec![0.0; q.len()];
            Cpu.heads_split_bwd(&dq, b, t, nh, hs, pos0, theta, &mut dwhole, Cols::whole(wq))
                .unwrap();
            let mut want = fused.clone();
            put(&mut want, &dwhole, wq, qa);
            let mut dx = fused.clone();
            Cpu.heads_split_bwd(&dq, b, t, nh, hs, pos0, theta, &mut dx, qa)
                .unwrap();
            let same = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
            };
            assert!(same(&dx, &want), "cpu backward into columns {theta:?}");
            let (dqd, mut dxd) = (d.from_slice(&dq), d.from_slice(&fused));
            d.heads_split_bwd(&dqd, b, t, nh, hs, pos0, theta, &mut dxd, qa)
                .unwrap();
            let got = d.to_vec(&dxd);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let col = i % ld;
                if col < wq && i / ld < b * t {
                    assert!((g - w).abs() <= 1e-5, "{theta:?} dx[{i}]: {g} vs {w}");
                } else {
                    assert!(
                        g.is_nan() == w.is_nan() && (g.is_nan() || g == w),
                        "dx[{i}]"
                    );
                }
            }
        }
        // rows that do not fit, a stride below the width, strides a pair cannot share
        let short = d.zeros(len - 4);
        let mut o = d.zeros(b * t * wk);
        let e = d
            .heads_split(&short, va, b, t, nkv, hs, 0, None, &mut o)
            .unwrap_err();
        assert!(e.to_string().contains("need"), "{e}");
        let e = Cpu
            .heads_split(
                &fused[..len - 4].to_vec(),
                va,
                b,
                t,
                nkv,
                hs,
                0,
                None,
                &mut vec![0.0; b * t * wk],
            )
            .unwrap_err();
        assert!(e.to_string().contains("need"), "{e}");
        let narrow = Cols { off: 0, ld: wk - 1 };
        let e = d
            .heads_split(&fd, narrow, b, t, nkv, hs, 0, None, &mut o)
            .unwrap_err();
        assert!(e.to_string().contains("row stride"), "{e}");
        let a = KvAppend {
            b,
            t,
            nkv,
            hs,
            pos0,
            theta: None,
            cap: t,
            at: 0,
            k_cols: ka,
            v_cols: Cols::whole(wk),
        };
        let (vd, mut kc, mut vc) = (
            d.zeros(b * t * wk),
            d.zeros(b * t * wk),
            d.zeros(b * t * wk),
        );
        let e = d.append_kv(&fd, &vd, &a, &mut kc, &mut vc).unwrap_err();
        assert!(e.to_string().contains("strides"), "{e}");
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
