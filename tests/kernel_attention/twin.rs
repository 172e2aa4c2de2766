//! The CPU twin against a naive f64 reference and f64 finite differences, and its
//! invariants: fully masked rows, bias shifts, −inf bias ≡ mask, KV-cache decode, bad
//! sizes.
use super::*;

#[test]
fn cpu_fwd_matches_naive_f64() {
    for c in cases() {
        let (want_o, want_l) = naive_fwd(&c);
        let (o, l) = run_cpu_fwd_f64(&c);
        let e = rel_err(&o, &want_o);
        assert!(e < 1e-12, "{:?}: f64 out rel err {e}", c.s);
        assert_lse_close(&l, &want_l, 1e-12, &format!("{:?}", c.s));
        // f32: inputs rounded to f32 (2^-24 relative), a dot product of HS terms and a
        // softmax over Tk terms: a few 1e-7, well inside 1e-5.
        let (o, l) = run_cpu_fwd_f32(&c);
        let o: Vec<f64> = o.iter().map(|&x| x as f64).collect();
        let l: Vec<f64> = l.iter().map(|&x| x as f64).collect();
        let e = rel_err(&o, &want_o);
        assert!(e < 1e-5, "{:?}: f32 out rel err {e}", c.s);
        assert_lse_close(&l, &want_l, 1e-5, &format!("{:?} f32", c.s));
    }
}

#[test]
fn fully_masked_rows_give_zero_and_neg_inf_lse() {
    let c = case(shape(2, 2, 1, 6, 8, 5, false), 7, true, true, true);
    let (o, l) = run_cpu_fwd_f64(&c);
    let s = &c.s;
    // batch 1 is all padding
    let per_b = s.nh * s.tq;
    assert!(l[per_b..].iter().all(|x| *x == f64::NEG_INFINITY));
    assert!(o[per_b * s.hs..].iter().all(|x| *x == 0.0));
    assert!(l[..per_b].iter().all(|x| x.is_finite()));
    // causal with Tq > Tk: query 0 sees key j iff j <= 0 + 3 - 5 < 0: nothing
    let c = case(shape(1, 1, 1, 5, 3, 4, true), 8, false, false, false);
    let (o, l) = run_cpu_fwd_f64(&c);
    assert_eq!(&l[..2], &[f64::NEG_INFINITY; 2]);
    assert!(o[..2 * 4].iter().all(|x| *x == 0.0));
    assert!(l[2].is_finite());
}

/// Adding a constant to a whole bias row does not change the output (softmax is shift
/// invariant) but shifts lse by that constant.
#[test]
fn bias_row_shift_changes_only_lse() {
    for causal in [false, true] {
        let c = case(shape(2, 4, 2, 11, 13, 24, causal), 9, true, true, false);
        let (o1, l1) = run_cpu_fwd_f64(&c);
        let mut c2 = case(shape(2, 4, 2, 11, 13, 24, causal), 9, true, true, false);
        let shift = [3.25, -1.5];
        for (i, g) in c2.bias.as_mut().unwrap().iter_mut().enumerate() {
            *g += shift[i / 13];
        }
        let (o2, l2) = run_cpu_fwd_f64(&c2);
        assert!(rel_err(&o2, &o1) < 1e-12);
        for (i, (a, b)) in l2.iter().zip(&l1).enumerate() {
            let sh = shift[i / (4 * 11)];
            if b.is_finite() {
                assert!((a - b - sh).abs() < 1e-10, "lse[{i}] {a} vs {b} + {sh}");
            }
        }
        // and a bias that is not constant does change it
        let mut c3 = case(shape(2, 4, 2, 11, 13, 24, causal), 9, true, true, false);
        c3.bias.as_mut().unwrap()[5] += 2.0;
        let (o3, _) = run_cpu_fwd_f64(&c3);
        assert!(rel_err(&o3, &o1) > 1e-3);
    }
}

/// A bias of −inf on a key is the same as padding it out, forward and backward.
#[test]
fn bias_neg_inf_equals_mask() {
    let with_mask = case(shape(2, 4, 4, 7, 12, 9, true), 11, true, true, false);
    let mut with_bias = case(shape(2, 4, 4, 7, 12, 9, true), 11, true, false, false);
    let m = with_mask.mask.clone().unwrap();
    for (g, &keep) in with_bias.bias.as_mut().unwrap().iter_mut().zip(&m) {
        if keep == 0 {
            *g = f64::NEG_INFINITY;
        }
    }
    let (o1, l1) = run_cpu_fwd_f64(&with_mask);
    let (o2, l2) = run_cpu_fwd_f64(&with_bias);
    assert_eq!(o1, o2);
    assert_eq!(l1, l2);
    let g1 = run_cpu_bwd_f64(&with_mask, &o1, &l1, 5);
    let g2 = run_cpu_bwd_f64(&with_bias, &o2, &l2, 5);
    assert_eq!(g1.dq, g2.dq);
    assert_eq!(g1.dk, g2.dk);
    assert_eq!(g1.dv, g2.dv);
    // dγ is zero on padded keys either way
    for (j, &keep) in m.iter().enumerate() {
        if keep == 0 {
            assert_eq!(g1.dbias[j], 0.0);
            assert_eq!(g2.dbias[j], 0.0);
        } else {
            assert_eq!(g1.dbias[j], g2.dbias[j]);
        }
    }
}

/// L = Σ dout ∘ out, through the naive reference.
fn loss(c: &Case, dout: &[f64]) -> f64 {
    naive_fwd(c).0.iter().zip(dout).map(|(a, b)| a * b).sum()
}

/// Every gradient of the CPU twin (in f64) against central differences of the naive
/// forward, on tiny odd shapes: GQA, causal and not, bias and padding (with a fully
/// padded batch).
#[test]
fn cpu_bwd_matches_finite_differences() {
    const H: f64 = 1e-6;
    for (i, causal) in [false, true].into_iter().enumerate() {
        for (bias, mask) in [(true, false), (true, true), (false, false)] {
            let mut c = case(
                shape(2, 4, 2, 3, 5, 3, causal),
                20 + i as u64,
                bias,
                mask,
                mask,
            );
            let (out, lse) = run_cpu_fwd_f64(&c);
            let g = run_cpu_bwd_f64(&c, &out, &lse, 99);
            let dout = g.dout.clone();
            let tag = format!("{:?} bias {bias} mask {mask}", c.s);
            let fd = |c: &mut Case, which: usize, idx: usize| -> f64 {
                let slot = |c: &mut Case| -> *mut f64 {
                    match which {
                        0 => &mut c.q[idx],
                        1 => &mut c.k[idx],
                        2 => &mut c.v[idx],
                        _ => &mut c.bias.as_mut().unwrap()[idx],
                    }
                };
                let p = slot(c);
                // SAFETY: p points into c, which lives across these calls unchanged in
                // size; used only to nudge one element.
                let x0 = unsafe { *p };
                unsafe { *p = x0 + H };
                let lp = loss(c, &dout);
                unsafe { *slot(c) = x0 - H };
                let lm = loss(c, &dout);
                unsafe { *slot(c) = x0 };
                (lp - lm) / (2.0 * H)
            };
            let check = |name: &str, got: &[f64], want: &[f64]| {
                let e = rel_err(got, want);
                assert!(
                    e < 1e-6,
                    "{tag}: d{name} rel err {e}\n got {got:?}\nwant {want:?}"
                );
                assert!(want.iter().any(|x| x.abs() > 1e-3), "{tag}: d{name} all ~0");
            };
            let n = c.q.len();
            let want: Vec<f64> = (0..n).map(|i| fd(&mut c, 0, i)).collect();
            check("q", &g.dq, &want);
            let n = c.k.len();
            let want: Vec<f64> = (0..n).map(|i| fd(&mut c, 1, i)).collect();
            check("k", &g.dk, &want);
            let want: Vec<f64> = (0..n).map(|i| fd(&mut c, 2, i)).collect();
            check("v", &g.dv, &want);
            if bias {
                let want: Vec<f64> = (0..c.s.b * c.s.tk).map(|i| fd(&mut c, 3, i)).collect();
                check("bias", &g.dbias, &want);
            }
            if mask {
                // batch 1 is fully padded: zero gradients there
                let (nh, nkv, tq, tk, hs) = (c.s.nh, c.s.nkv, c.s.tq, c.s.tk, c.s.hs);
                assert!(g.dq[nh * tq * hs..].iter().all(|x| *x == 0.0));
                assert!(g.dk[nkv * tk * hs..].iter().all(|x| *x == 0.0));
                assert!(g.dbias[tk..].iter().all(|x| *x == 0.0));
            }
        }
    }
}

/// The naive backward in f64: per row, P, dP, dS by the definition.
fn naive_bwd(c: &Case, dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let s = &c.s;
    let (hs, tq, tk) = (s.hs, s.tq, s.tk);
    let (out, lse) = naive_fwd(c);
    let mut dq = vec![0.0; c.q.len()];
    let mut dk = vec![0.0; c.k.len()];
    let mut dv = vec![0.0; c.v.len()];
    let mut db = vec![0.0; s.b * tk];
    for b in 0..s.b {
        for h in 0..s.nh {
            let g = h / (s.nh / s.nkv);
            for i in 0..tq {
                let row = (b * s.nh + h) * tq + i;
                let l = lse[row];
                if l == f64::NEG_INFINITY {
                    continue;
                }
                let qi = &c.q[row * hs..][..hs];
                let doi = &dout[row * hs..][..hs];
                let d: f64 = doi
                    .iter()
                    .zip(&out[row * hs..][..hs])
                    .map(|(a, b)| a * b)
                    .sum();
                for j in 0..tk {
                    let visible = !s.causal || j + tq <= i + tk;
                    let kept = c.mask.as_ref().is_none_or(|m| m[b * tk + j] != 0);
                    if !(visible && kept) {
                        continue;
                    }
                    let kv = ((b * s.nkv + g) * tk + j) * hs;
                    let kj = &c.k[kv..kv + hs];
                    let vj = &c.v[kv..kv + hs];
                    let sc: f64 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                        * s.scale as f64
                        + c.bias.as_ref().map_or(0.0, |bb| bb[b * tk + j]);
                    let p = (sc - l).exp();
                    let dp: f64 = doi.iter().zip(vj).map(|(a, b)| a * b).sum();
                    let ds = p * (dp - d);
                    db[b * tk + j] += ds;
                    for e in 0..hs {
                        dv[kv + e] += p * doi[e];
                        dq[row * hs + e] += ds * kj[e] * s.scale as f64;
                        dk[kv + e] += ds * qi[e] * s.scale as f64;
                    }
                }
            }
        }
    }
    (dq, dk, dv, db)
}

/// The blocked backward (several 64-query blocks, GQA sums) against the naive one, in
/// f64 and f32.
#[test]
fn cpu_bwd_matches_naive() {
    for c in cases() {
        let (out, lse) = run_cpu_fwd_f64(&c);
        let g = run_cpu_bwd_f64(&c, &out, &lse, 3);
        let (dq, dk, dv, db) = naive_bwd(&c, &g.dout);
        let tag = format!(
            "{:?} bias {} mask {}",
            c.s,
            c.bias.is_some(),
            c.mask.is_some()
        );
        for (name, got, want) in [
            ("q", &g.dq, &dq),
            ("k", &g.dk, &dk),
            ("v", &g.dv, &dv),
            ("bias", &g.dbias, &db),
        ] {
            let e = rel_err(got, want);
            assert!(e < 1e-11, "{tag}: f64 d{name} rel err {e}");
        }
        // f32 twin: gradients sum Tq·NH/NKV products; 1e-4 of the largest entry.
        let s = &c.s;
        let (o32, l32) = run_cpu_fwd_f32(&c);
        let mut dq32 = vec![0.0f32; c.q.len()];
        let mut dk32 = vec![0.0f32; c.k.len()];
        let mut dv32 = vec![0.0f32; c.v.len()];
        let mut db32 = vec![0.0f32; s.b * s.tk];
        let bias = c.bias.as_deref().map(f32s);
        attention_bwd_cpu(
            s,
            &f32s(&c.q),
            &f32s(&c.k),
            &f32s(&c.v),
            bias.as_deref(),
            c.mask.as_deref(),
            &o32,
            &l32,
            &f32s(&g.dout),
            &mut dq32,
            &mut dk32,
            &mut dv32,
            Some(&mut db32),
        )
        .unwrap();
        for (name, got, want) in [
            ("q", &dq32, &dq),
            ("k", &dk32, &dk),
            ("v", &dv32, &dv),
            ("bias", &db32, &db),
        ] {
            let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
            let e = rel_err(&got, want);
            assert!(e < 2e-5, "{tag}: f32 d{name} rel err {e}");
        }
    }
}

/// Decoding one query over a KV cache equals the last row of a causal forward over the
/// same keys (which sees every key), for every cache length.
#[test]
fn decode_equals_last_row_of_full_forward() {
    let (b, nh, nkv, tmax, hs) = (2, 6, 2, 13, 40);
    let mut r = Rng(31);
    let kc = f32s(&r.vec(b * nkv * tmax * hs, 1.5));
    let vc = f32s(&r.vec(b * nkv * tmax * hs, 1.0));
    let bias = f32s(&r.vec(b * tmax, 1.0));
    let qs = f32s(&r.vec(b * nh * tmax * hs, 1.5));
    let scale = 1.0 / (hs as f32).sqrt();
    for len in [0, 1, 7, tmax] {
        for use_bias in [false, true] {
            // the query of step `len`: row len-1 of qs
            let q: Vec<f32> = (0..b * nh)
                .flat_map(|bh| {
                    let row = len.max(1) - 1;
                    qs[(bh * tmax + row) * hs..][..hs].to_vec()
                })
                .collect();
            let mut got = vec![f32::NAN; b * nh * hs];
            let mut got_lse = vec![f32::NAN; b * nh];
            // the bias of the valid keys (B,len)
            let bf: Vec<f32> = (0..b)
                .flat_map(|bi| bias[bi * tmax..][..len].to_vec())
                .collect();
            let bias_opt = use_bias.then_some(&bf[..]);
            attention_decode_cpu(
                b,
                nh,
                nkv,
                tmax,
                len,
                hs,
                scale,
                &q,
                &kc,
                &vc,
                bias_opt,
                &mut got,
                Some(&mut got_lse),
            )
            .unwrap();
            if len == 0 {
                assert!(got.iter().all(|x| *x == 0.0));
                continue;
            }
            // full causal forward over the first `len` positions
            let s = AttnShape {
                b,
                nh,
                nkv,
                tq: len,
                tk: len,
                kv_stride: len,
                hs,
                causal: true,
                scale,
                layout: AttnLayout::HEADS,
            };
            let take = |x: &[f32], heads: usize| -> Vec<f32> {
                (0..b * heads)
                    .flat_map(|bh| x[bh * tmax * hs..][..len * hs].to_vec())
                    .collect()
            };
            let (kf, vf) = (take(&kc, nkv), take(&vc, nkv));
            let qf = take(&qs, nh);
            let mut out = vec![0.0f32; qf.len()];
            let mut lse = vec![0.0f32; b * nh * len];
            let bias_f = use_bias.then_some(&bf[..]);
            attention_fwd_cpu(&s, &qf, &kf, &vf, bias_f, None, &mut out, &mut lse).unwrap();
            let want: Vec<f64> = (0..b * nh)
                .flat_map(|bh| out[(bh * len + len - 1) * hs..][..hs].to_vec())
                .map(|x| x as f64)
                .collect();
            let got64: Vec<f64> = got.iter().map(|&x| x as f64).collect();
            let e = rel_err(&got64, &want);
            assert!(e < 1e-5, "len {len} bias {use_bias}: rel err {e}");
            // the normaliser is the full forward's at the last position
            let want_lse: Vec<f64> = (0..b * nh)
                .map(|bh| lse[bh * len + len - 1] as f64)
                .collect();
            let e = rel_err(&to64(&got_lse), &want_lse);
            assert!(e < 1e-5, "len {len} bias {use_bias}: lse rel err {e}");
        }
    }
}

#[test]
fn bad_sizes_are_errors_and_zero_sizes_are_empty() {
    let s = shape(2, 6, 4, 3, 5, 8, false); // 6 % 4 != 0
    let mut out = vec![0.0f32; 2 * 6 * 3 * 8];
    let mut lse = vec![0.0f32; 2 * 6 * 3];
    let q = vec![0.0f32; 2 * 6 * 3 * 8];
    let kv = vec![0.0f32; 2 * 4 * 5 * 8];
    let e = attention_fwd_cpu(&s, &q, &kv, &kv, None, None, &mut out, &mut lse).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArg { .. }) && e.to_string().contains("nkv"),
        "{e}"
    );
    for hs in [0, 129] {
        let s = shape(1, 1, 1, 1, 1, hs, false);
        let e = attention_fwd_cpu(&s, &[0.0f32; 0], &[], &[], None, None, &mut [], &mut [0.0])
            .unwrap_err();
        assert!(e.to_string().contains("head size"), "{e}");
    }
    // a short k
    let s = shape(2, 6, 2, 3, 5, 8, false);
    let kv_ok = vec![0.0f32; 2 * 2 * 5 * 8];
    let e =
        attention_fwd_cpu(&s, &q, &kv_ok[1..], &kv_ok, None, None, &mut out, &mut lse).unwrap_err();
    assert!(
        matches!(e, Error::Shape { .. }) && e.to_string().contains("k (B,NKV,Tk,HS)"),
        "{e}"
    );
    let e = attention_fwd_cpu(
        &s,
        &q,
        &kv_ok,
        &kv_ok,
        Some(&[0.0; 3]),
        None,
        &mut out,
        &mut lse,
    )
    .unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
    let e = attention_fwd_cpu(
        &s,
        &q,
        &kv_ok,
        &kv_ok,
        None,
        Some(&[1; 3]),
        &mut out,
        &mut lse,
    )
    .unwrap_err();
    assert!(e.to_string().contains("key_mask"), "{e}");
    let mut bad = s;
    bad.scale = f32::NAN;
    assert!(attention_fwd_cpu(&bad, &q, &kv_ok, &kv_ok, None, None, &mut out, &mut lse).is_err());
    // decode: len beyond the cache
    let e = attention_decode_cpu(
        1,
        2,
        1,
        4,
        5,
        8,
        1.0,
        &[0.0; 16],
        &[0.0; 32],
        &[0.0; 32],
        None,
        &mut [0.0; 16],
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("len"), "{e}");
    // zero sizes: empty batch is a no-op; Tk = 0 gives rows with no visible key
    let s0 = shape(0, 6, 2, 3, 5, 8, true);
    attention_fwd_cpu(&s0, &[0.0f32; 0], &[], &[], None, None, &mut [], &mut []).unwrap();
    let s0 = shape(1, 2, 1, 3, 0, 8, false);
    let mut out = vec![1.0f32; 2 * 3 * 8];
    let mut lse = vec![1.0f32; 6];
    attention_fwd_cpu(&s0, &[0.5f32; 48], &[], &[], None, None, &mut out, &mut lse).unwrap();
    assert!(out.iter().all(|x| *x == 0.0) && lse.iter().all(|x| *x == f32::NEG_INFINITY));
    let (mut dq, mut dk, mut dv) = (vec![1.0f32; 48], vec![], vec![]);
    let mut db: Vec<f32> = vec![];
    attention_bwd_cpu(
        &s0,
        &[0.5f32; 48],
        &[],
        &[],
        None,
        None,
        &out,
        &lse,
        &[1.0; 48],
        &mut dq,
        &mut dk,
        &mut dv,
        Some(&mut db),
    )
    .unwrap();
    assert!(dq.iter().all(|x| *x == 0.0));
}
