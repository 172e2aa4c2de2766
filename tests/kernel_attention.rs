//! Biased attention: the CPU twin against a naive f64 reference and f64 finite
//! differences, invariants (KV-cache decode, bias shift, bias −inf ≡ mask), and the
//! CUDA kernels (emulator, plus a GPU when one is present) against the CPU twin.
// B batch, NH query heads, NKV kv heads, Tq queries, Tk keys, HS head size.
use popen::kernels::attention::*;
use popen::Error;

/// SplitMix64: deterministic by seed, no dependency.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uni(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn vec(&mut self, n: usize, amp: f64) -> Vec<f64> {
        (0..n).map(|_| amp * self.uni()).collect()
    }
}

fn shape(
    b: usize,
    nh: usize,
    nkv: usize,
    tq: usize,
    tk: usize,
    hs: usize,
    causal: bool,
) -> AttnShape {
    AttnShape {
        b,
        nh,
        nkv,
        tq,
        tk,
        kv_stride: tk,
        hs,
        causal,
        scale: 1.0 / (hs as f32).sqrt(),
        layout: AttnLayout::HEADS,
    }
}

/// Random inputs of one case, in f64.
struct Case {
    s: AttnShape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    bias: Option<Vec<f64>>,
    mask: Option<Vec<u8>>,
}

/// Inputs with scores of order a few units (so the softmax is neither flat nor
/// one-hot), a bias of order 1 and, with `mask`, about a quarter of the keys padded;
/// with `full_pad_last` every key of the last batch is padded (rows that see nothing).
fn case(s: AttnShape, seed: u64, bias: bool, mask: bool, full_pad_last: bool) -> Case {
    let mut r = Rng(seed);
    let q = r.vec(s.b * s.nh * s.tq * s.hs, 1.5);
    let k = r.vec(s.b * s.nkv * s.tk * s.hs, 1.5);
    let v = r.vec(s.b * s.nkv * s.tk * s.hs, 1.0);
    let bias = bias.then(|| r.vec(s.b * s.tk, 1.0));
    let mask = mask.then(|| {
        let mut m: Vec<u8> = (0..s.b * s.tk)
            .map(|_| u8::from(!r.next_u64().is_multiple_of(4)))
            .collect();
        if full_pad_last && s.b > 0 {
            let b = s.b - 1;
            m[b * s.tk..(b + 1) * s.tk].fill(0);
        }
        m
    });
    Case {
        s,
        q,
        k,
        v,
        bias,
        mask,
    }
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// The slow, obviously correct reference: one row at a time, in f64.
/// Returns (out, lse).
fn naive_fwd(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let s = &c.s;
    let (hs, tq, tk) = (s.hs, s.tq, s.tk);
    let mut out = vec![0.0; s.b * s.nh * tq * hs];
    let mut lse = vec![f64::NEG_INFINITY; s.b * s.nh * tq];
    for b in 0..s.b {
        for h in 0..s.nh {
            let g = h / (s.nh / s.nkv);
            for i in 0..tq {
                let qi = &c.q[((b * s.nh + h) * tq + i) * hs..][..hs];
                let mut sc = vec![f64::NEG_INFINITY; tk];
                for (j, scj) in sc.iter_mut().enumerate() {
                    let visible = !s.causal || j + tq <= i + tk;
                    let kept = c.mask.as_ref().is_none_or(|m| m[b * tk + j] != 0);
                    if visible && kept {
                        let kj = &c.k[((b * s.nkv + g) * tk + j) * hs..][..hs];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                        *scj =
                            dot * s.scale as f64 + c.bias.as_ref().map_or(0.0, |bb| bb[b * tk + j]);
                    }
                }
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                lse[(b * s.nh + h) * tq + i] = m + z.ln();
                let o = &mut out[((b * s.nh + h) * tq + i) * hs..][..hs];
                for (j, &scj) in sc.iter().enumerate() {
                    let p = (scj - m).exp() / z;
                    let vj = &c.v[((b * s.nkv + g) * tk + j) * hs..][..hs];
                    for d in 0..hs {
                        o[d] += p * vj[d];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// Largest |a − b| relative to the largest |b| (so entries near zero do not blow up
/// the ratio; a softmax-weighted average has entries of order max|v|); infinite where
/// an entry of either is NaN (`f64::max` would skip it, and an output the kernel never
/// wrote would pass).
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().chain(b).any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() / scale })
        .fold(0.0, f64::max)
}

fn run_cpu_fwd_f64(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let s = &c.s;
    let mut out = vec![0.0; c.q.len()];
    let mut lse = vec![0.0; s.b * s.nh * s.tq];
    attention_fwd_cpu(
        s,
        &c.q,
        &c.k,
        &c.v,
        c.bias.as_deref(),
        c.mask.as_deref(),
        &mut out,
        &mut lse,
    )
    .unwrap();
    (out, lse)
}

fn run_cpu_fwd_f32(c: &Case) -> (Vec<f32>, Vec<f32>) {
    let s = &c.s;
    let mut out = vec![0.0f32; c.q.len()];
    let mut lse = vec![0.0f32; s.b * s.nh * s.tq];
    let bias = c.bias.as_deref().map(f32s);
    attention_fwd_cpu(
        s,
        &f32s(&c.q),
        &f32s(&c.k),
        &f32s(&c.v),
        bias.as_deref(),
        c.mask.as_deref(),
        &mut out,
        &mut lse,
    )
    .unwrap();
    (out, lse)
}

/// lse values agree where finite and are −inf at the same rows.
fn assert_lse_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_infinite() || g.is_infinite() {
            assert_eq!(g, w, "{what}: lse[{i}]");
        } else {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "{what}: lse[{i}] {g} vs {w}"
            );
        }
    }
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut seed = 1;
    for &(b, nh, nkv, tq, tk, hs) in &[
        (2, 6, 2, 37, 53, 40),
        (1, 3, 3, 70, 70, 17), // more than one 64-query CPU block, Tq = Tk
        (2, 2, 1, 5, 9, 128),
        (1, 2, 2, 9, 5, 3), // Tq > Tk: early causal rows see nothing
    ] {
        for causal in [false, true] {
            for (bias, mask) in [(false, false), (true, false), (true, true)] {
                seed += 1;
                v.push(case(
                    shape(b, nh, nkv, tq, tk, hs, causal),
                    seed,
                    bias,
                    mask,
                    mask,
                ));
            }
        }
    }
    v
}

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

struct Grads {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dbias: Vec<f64>,
    dout: Vec<f64>,
}

fn run_cpu_bwd_f64(c: &Case, out: &[f64], lse: &[f64], seed: u64) -> Grads {
    let s = &c.s;
    let dout = Rng(seed).vec(out.len(), 1.0);
    let mut g = Grads {
        dq: vec![f64::NAN; c.q.len()],
        dk: vec![f64::NAN; c.k.len()],
        dv: vec![f64::NAN; c.v.len()],
        dbias: vec![f64::NAN; s.b * s.tk],
        dout,
    };
    attention_bwd_cpu(
        s,
        &c.q,
        &c.k,
        &c.v,
        c.bias.as_deref(),
        c.mask.as_deref(),
        out,
        lse,
        &g.dout,
        &mut g.dq,
        &mut g.dk,
        &mut g.dv,
        Some(&mut g.dbias),
    )
    .unwrap();
    g
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

// ---------------------------------------------------------------------------------------
// Kernels (emulator, plus a GPU when present) against the CPU twin.
// ---------------------------------------------------------------------------------------
use popen::kernels::{Device, DeviceKind, KArg, LaunchCfg};

/// The case with every input rounded to f32, so that the f64 twin on it is the exact
/// answer for the f32 kernel's inputs and the comparison measures only the kernel's
/// own rounding.
fn rounded(mut c: Case) -> Case {
    let r = |x: &mut Vec<f64>| x.iter_mut().for_each(|v| *v = *v as f32 as f64);
    r(&mut c.q);
    r(&mut c.k);
    r(&mut c.v);
    if let Some(b) = c.bias.as_mut() {
        r(b);
    }
    c
}

fn kernel_cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut seed = 100;
    for &(b, nh, nkv, tq, tk, hs) in &[
        (2, 6, 2, 37, 53, 40),
        (2, 6, 2, 37, 53, 128),
        (1, 2, 1, 9, 5, 3), // Tq > Tk: early causal rows see nothing; HS not a multiple of 4
        // Tk − Tq = 1: the first query that sees key tile 32..64 is query 31, the last
        // row of the query tile before, which the backward must not skip.
        (1, 2, 1, 40, 41, 20),
        // Several 64-query forward blocks and 32-key tiles, partial last ones.
        (1, 4, 2, 131, 133, 72),
    ] {
        for causal in [false, true] {
            for (bias, mask) in [(false, false), (true, false), (true, true)] {
                seed += 1;
                let c = case(
                    shape(b, nh, nkv, tq, tk, hs, causal),
                    seed,
                    bias,
                    mask,
                    mask,
                );
                v.push(rounded(c));
            }
        }
    }
    // Padding in whole key tiles, as a batch of prompts of different lengths has it:
    // batch 0 hides keys 0..40 (tile 0 and the start of tile 1), batch 1 keys 64..96 (a
    // middle tile) and 100.. (the end of tile 3 and all of tile 4).  The kernels skip
    // the tiles with no key kept; the answers must not move.
    for causal in [false, true] {
        seed += 1;
        let tk = 133;
        let mut c = case(shape(2, 4, 2, 70, tk, 40, causal), seed, true, true, false);
        for (i, keep) in c.mask.as_mut().unwrap().iter_mut().enumerate() {
            let j = i % tk;
            let kept = if i < tk {
                j >= 40
            } else {
                !(64..96).contains(&j) && j < 100
            };
            *keep = u8::from(kept);
        }
        v.push(rounded(c));
    }
    v
}

fn tag(c: &Case) -> String {
    format!(
        "{:?} bias {} mask {}",
        c.s,
        c.bias.is_some(),
        c.mask.is_some()
    )
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Uploads a case's inputs and runs the forward kernel; returns (out, lse).
fn dev_fwd(dev: &Device, c: &Case) -> (Vec<f32>, Vec<f32>) {
    dev_fwd_with(dev, c, attention_fwd)
}

fn dev_fwd_with(dev: &Device, c: &Case, fwd: AttnFwdFn) -> (Vec<f32>, Vec<f32>) {
    let s = &c.s;
    let q = dev.upload(&f32s(&c.q)).unwrap();
    let k = dev.upload(&f32s(&c.k)).unwrap();
    let v = dev.upload(&f32s(&c.v)).unwrap();
    let bias = c.bias.as_ref().map(|b| dev.upload(&f32s(b)).unwrap());
    let mask = c.mask.as_ref().map(|m| dev.upload(m).unwrap());
    let mut out = dev.upload(&vec![f32::NAN; c.q.len()]).unwrap();
    let mut lse = dev.upload(&vec![f32::NAN; s.b * s.nh * s.tq]).unwrap();
    fwd(
        dev,
        s,
        &q,
        &k,
        &v,
        bias.as_ref(),
        mask.as_ref(),
        &mut out,
        &mut lse,
    )
    .unwrap();
    (dev.download(&out).unwrap(), dev.download(&lse).unwrap())
}

/// f32 kernel vs the exact (f64) answer on the same inputs: out is a convex
/// combination of v rows, so its error relative to max|v| is a few f32 ulps of the
/// scores (|score| < ~10, error ~1e-6) plus the weighted sum (~HS·2^-24): 1e-5 of the
/// largest entry leaves a margin of ~5 while a wrong mask, bias or scale is off by >1e-2.
#[test]
fn attention_fwd_matches_cpu() {
    for dev in Device::test_devices() {
        for c in kernel_cases() {
            let (want_o, want_l) = run_cpu_fwd_f64(&c);
            let (o, l) = dev_fwd(&dev, &c);
            let e = rel_err(&to64(&o), &want_o);
            assert!(e < 1e-5, "{dev:?} {}: out rel err {e}", tag(&c));
            assert_lse_close(&to64(&l), &want_l, 1e-5, &format!("{dev:?} {}", tag(&c)));
        }
    }
}

/// The tensor-core forward vs the exact answer on every kernel case whose head size it
/// takes (40, 128, 72: one, sixteen and nine 8-wide steps; causal, GQA, bias, masks,
/// partial tiles, tiles of padding only).  Its products are 3×TF32 on the emulator too
/// (operands read as TF32 there as on a GPU): about 21 of f32's 24 bits per operand, an
/// error of at most 1.1e-6 of the largest entry here, under the f32 bound above.  A GPU
/// may accumulate each product more coarsely than the emulator's f32: 4e-5 there.
/// Dropping one of the three products moves out by 2e-4; a wrong fragment layout by
/// O(max|v|).  Head sizes it does not take are an error, not a wrong answer.
#[test]
fn attention_fwd_tc_matches_cpu() {
    let mut ran = 0;
    for dev in Device::test_devices() {
        let tol = if dev.kind() == DeviceKind::Emulator {
            1e-5
        } else {
            4e-5
        };
        for c in kernel_cases() {
            if !tensor_core_head_size(c.s.hs) {
                let s = &c.s;
                let up = |x: &[f64]| dev.upload(&f32s(x)).unwrap();
                let (q, k, v) = (up(&c.q), up(&c.k), up(&c.v));
                let mut out = dev.zeros::<f32>(c.q.len()).unwrap();
                let mut lse = dev.zeros::<f32>(s.b * s.nh * s.tq).unwrap();
                let e = attention_fwd_tc(&dev, s, &q, &k, &v, None, None, &mut out, &mut lse)
                    .unwrap_err();
                assert!(e.to_string().contains("multiple of"), "{e}");
                continue;
            }
            let (want_o, want_l) = run_cpu_fwd_f64(&c);
            let (o, l) = dev_fwd_with(&dev, &c, attention_fwd_tc);
            let e = rel_err(&to64(&o), &want_o);
            assert!(e < tol, "{dev:?} {}: tc out rel err {e}", tag(&c));
            assert_lse_close(&to64(&l), &want_l, tol, &format!("{dev:?} tc {}", tag(&c)));
            ran += 1;
        }
    }
    assert!(ran >= 20, "only {ran} cases ran on tensor cores");
    assert!(tensor_core_head_size(128) && tensor_core_head_size(8) && tensor_core_head_size(5));
    assert!(!tensor_core_head_size(4) && !tensor_core_head_size(20) && !tensor_core_head_size(0));
}

/// The bf16 forward: inputs rounded to bf16 (the CPU twin reads the same rounded
/// values), out rounded to bf16 once at the end: error ≤ 2^-9 of |out| plus the f32
/// part, so 4e-3 of the largest entry.
#[test]
fn attention_fwd_bf16_matches_cpu() {
    use half::bf16;
    for dev in Device::test_devices() {
        for c in kernel_cases().into_iter().step_by(2) {
            let rb = |x: &[f64]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f64(v)).collect() };
            let (qb, kb, vb) = (rb(&c.q), rb(&c.k), rb(&c.v));
            let cr = Case {
                s: c.s,
                q: qb.iter().map(|x| x.to_f64()).collect(),
                k: kb.iter().map(|x| x.to_f64()).collect(),
                v: vb.iter().map(|x| x.to_f64()).collect(),
                bias: c.bias.clone(),
                mask: c.mask.clone(),
            };
            let (want_o, want_l) = run_cpu_fwd_f64(&cr);
            let bits = |x: &[bf16]| -> Vec<u16> { x.iter().map(|v| v.to_bits()).collect() };
            let s = &c.s;
            let q = dev.upload(&bits(&qb)).unwrap();
            let k = dev.upload(&bits(&kb)).unwrap();
            let v = dev.upload(&bits(&vb)).unwrap();
            let bias = c.bias.as_ref().map(|b| dev.upload(&f32s(b)).unwrap());
            let mask = c.mask.as_ref().map(|m| dev.upload(m).unwrap());
            let mut out = dev.zeros::<u16>(c.q.len()).unwrap();
            let mut lse = dev.zeros::<f32>(s.b * s.nh * s.tq).unwrap();
            attention_fwd_bf16(
                &dev,
                s,
                &q,
                &k,
                &v,
                bias.as_ref(),
                mask.as_ref(),
                &mut out,
                &mut lse,
            )
            .unwrap();
            let o: Vec<f64> = dev
                .download(&out)
                .unwrap()
                .iter()
                .map(|&b| bf16::from_bits(b).to_f64())
                .collect();
            let e = rel_err(&o, &want_o);
            assert!(e < 4e-3, "{dev:?} {}: bf16 out rel err {e}", tag(&c));
            let l = to64(&dev.download(&lse).unwrap());
            assert_lse_close(&l, &want_l, 1e-5, &format!("{dev:?} bf16 {}", tag(&c)));
        }
    }
}

/// Backward kernels vs the f64 twin on the same inputs, the kernel fed its own forward.
/// Gradients are sums over up to Tq·NH/NKV terms of products of order 1, so their
/// rounding error relative to the largest entry is a little above the forward's: 2e-5.
#[test]
fn attention_bwd_matches_cpu() {
    bwd_matches_cpu(attention_bwd, "", |_| true, 2e-5);
}

/// On tensor cores, on the cases whose head size they take (20); on a GPU the
/// 3×TF32 products (on the emulator too: at most 1.5e-6 here) take the bound to 8e-5
/// (see `attention_fwd_tc_matches_cpu`).
#[test]
fn attention_bwd_tc_matches_cpu() {
    bwd_matches_cpu(attention_bwd_tc, "tc ", tensor_core_head_size, 8e-5);
}

fn bwd_matches_cpu(bwd: AttnBwdFn, what: &str, takes: fn(usize) -> bool, gpu_tol: f64) {
    let mut ran = 0;
    for dev in Device::test_devices() {
        let tol = if dev.kind() == DeviceKind::Emulator {
            2e-5
        } else {
            gpu_tol
        };
        for c in kernel_cases() {
            if !takes(c.s.hs) {
                continue;
            }
            ran += 1;
            let s = &c.s;
            let (out, lse) = run_cpu_fwd_f64(&c);
            let want = run_cpu_bwd_f64(&c, &out, &lse, 7);
            let (o32, l32) = dev_fwd(&dev, &c);
            let up = |x: &[f64]| dev.upload(&f32s(x)).unwrap();
            let (q, k, v, dout) = (up(&c.q), up(&c.k), up(&c.v), up(&want.dout));
            let bias = c.bias.as_ref().map(|b| up(b));
            let mask = c.mask.as_ref().map(|m| dev.upload(m).unwrap());
            let (o, l) = (dev.upload(&o32).unwrap(), dev.upload(&l32).unwrap());
            let nan = |n: usize| dev.upload(&vec![f32::NAN; n]).unwrap();
            let (mut dq, mut dk, mut dv) = (nan(c.q.len()), nan(c.k.len()), nan(c.v.len()));
            let mut db = nan(s.b * s.tk);
            bwd(
                &dev,
                s,
                &q,
                &k,
                &v,
                bias.as_ref(),
                mask.as_ref(),
                &o,
                &l,
                &dout,
                &mut dq,
                &mut dk,
                &mut dv,
                Some(&mut db),
            )
            .unwrap();
            for (name, got, want) in [
                ("q", &dq, &want.dq),
                ("k", &dk, &want.dk),
                ("v", &dv, &want.dv),
                ("bias", &db, &want.dbias),
            ] {
                let got = to64(&dev.download(got).unwrap());
                let e = rel_err(&got, want);
                assert!(e < tol, "{dev:?} {what}{}: d{name} rel err {e}", tag(&c));
            }
        }
    }
    assert!(ran >= 20, "only {ran} cases ran");
}

/// The decode kernel (split over 128-key chunks) vs the CPU decode, with caches longer
/// than one chunk and within one (one launch, no reduce), GQA, bias with −inf entries
/// (batch 1's first four keys: rows that see no key with the bias), and len = 0; head sizes read as floats
/// (7, 6), as float4s by groups of 16 and 8 lanes (40, 32) and by whole warps (128),
/// and summed over keys by rows of threads (HS <= 64) or a thread per dimension (128).
#[test]
fn attention_decode_matches_cpu() {
    for dev in Device::test_devices() {
        for hs in [7, 6, 40, 32, 128] {
            let (b, nh, nkv, tmax) = (2, 6, 2, 300);
            let mut r = Rng(77);
            let kc = f32s(&r.vec(b * nkv * tmax * hs, 1.5));
            let vc = f32s(&r.vec(b * nkv * tmax * hs, 1.0));
            let mut bias = f32s(&r.vec(b * tmax, 1.0));
            bias[3] = f32::NEG_INFINITY;
            bias[tmax + 200] = f32::NEG_INFINITY;
            bias[tmax..tmax + 4].fill(f32::NEG_INFINITY);
            let q = f32s(&r.vec(b * nh * hs, 1.5));
            let scale = 1.0 / (hs as f32).sqrt();
            let (qd, kd, vd) = (
                dev.upload(&q).unwrap(),
                dev.upload(&kc).unwrap(),
                dev.upload(&vc).unwrap(),
            );
            for len in [0, 1, 4, 129, 300] {
                // the bias of the valid keys (B,len)
                let bl: Vec<f32> = (0..b)
                    .flat_map(|bi| bias[bi * tmax..][..len].to_vec())
                    .collect();
                let bd = dev.upload(&bl).unwrap();
                for use_bias in [false, true] {
                    let bopt = use_bias.then_some(&bl[..]);
                    let mut want = vec![0.0f32; b * nh * hs];
                    let mut want_lse = vec![0.0f32; b * nh];
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
                        bopt,
                        &mut want,
                        Some(&mut want_lse),
                    )
                    .unwrap();
                    let mut out = dev.upload(&vec![f32::NAN; b * nh * hs]).unwrap();
                    let mut lse = dev.upload(&vec![f32::NAN; b * nh]).unwrap();
                    let bd_opt = use_bias.then_some(&bd);
                    attention_decode(
                        &dev,
                        b,
                        nh,
                        nkv,
                        tmax,
                        len,
                        hs,
                        scale,
                        &qd,
                        &kd,
                        &vd,
                        bd_opt,
                        &mut out,
                        Some(&mut lse),
                    )
                    .unwrap();
                    let got = to64(&dev.download(&out).unwrap());
                    let e = rel_err(&got, &to64(&want));
                    assert!(
                        e < 1e-5,
                        "{dev:?} hs {hs} len {len} bias {use_bias}: rel err {e}"
                    );
                    let got_lse = dev.download(&lse).unwrap();
                    if len == 0 {
                        assert!(got.iter().all(|x| *x == 0.0));
                        assert!(got_lse
                            .iter()
                            .chain(&want_lse)
                            .all(|x| *x == f32::NEG_INFINITY));
                    } else {
                        // a row that sees no key: −inf and zeros, on both
                        let blind = |l: &f32| *l == f32::NEG_INFINITY;
                        let rows = b * nh;
                        for i in 0..rows {
                            assert_eq!(blind(&got_lse[i]), blind(&want_lse[i]), "row {i}");
                        }
                        let blind_rows = want_lse.iter().filter(|l| blind(l)).count();
                        let hidden = use_bias && len <= 4;
                        assert_eq!(blind_rows, if hidden { rows / 2 } else { 0 });
                        let seen: Vec<usize> =
                            (0..rows).filter(|&i| !blind(&want_lse[i])).collect();
                        let pick =
                            |v: &[f32]| to64(&seen.iter().map(|&i| v[i]).collect::<Vec<_>>());
                        let e = rel_err(&pick(&got_lse), &pick(&want_lse));
                        assert!(
                            e < 1e-5,
                            "{dev:?} hs {hs} len {len} bias {use_bias}: lse rel err {e}"
                        );
                    }
                }
            }
        }
    }
}

/// The device wrappers check sizes before launching (never a launch on bad input).
#[test]
fn device_wrappers_reject_bad_sizes() {
    let dev = Device::emulator();
    let s = shape(2, 6, 2, 3, 5, 8, false);
    let z = |n: usize| dev.zeros::<f32>(n).unwrap();
    let (q, k, v) = (z(2 * 6 * 3 * 8), z(2 * 2 * 5 * 8), z(2 * 2 * 5 * 8 - 1));
    let (mut out, mut lse) = (z(2 * 6 * 3 * 8), z(2 * 6 * 3));
    let e = attention_fwd(&dev, &s, &q, &k, &v, None, None, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("v (B,NKV,Tk,HS)"), "{e}");
    let mut bad = s;
    bad.hs = 200;
    let e = attention_fwd(&dev, &bad, &q, &k, &k, None, None, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("head size"), "{e}");
    let (mut dq, mut dk, mut dv) = (z(q.len()), z(k.len()), z(k.len()));
    let mut db = z(7);
    let e = attention_bwd(
        &dev,
        &s,
        &q,
        &k,
        &k,
        None,
        None,
        &out,
        &lse,
        &out,
        &mut dq,
        &mut dk,
        &mut dv,
        Some(&mut db),
    )
    .unwrap_err();
    assert!(e.to_string().contains("dbias"), "{e}");
    let mut o = z(2 * 6 * 8);
    let e = attention_decode(
        &dev,
        2,
        6,
        2,
        5,
        6,
        8,
        1.0,
        &o.clone_zeros(&dev),
        &k,
        &k,
        None,
        &mut o,
        None,
    );
    assert!(e.is_err());
}

trait CloneZeros {
    fn clone_zeros(&self, dev: &Device) -> popen::kernels::DeviceBuf<f32>;
}
impl CloneZeros for popen::kernels::DeviceBuf<f32> {
    fn clone_zeros(&self, dev: &Device) -> popen::kernels::DeviceBuf<f32> {
        dev.zeros(self.len()).unwrap()
    }
}

/// The CPU backward is bitwise reproducible: GQA head sums and dγ sums run in a fixed
/// order, no atomics, so two runs on the same pool give identical bits.
#[test]
fn cpu_bwd_is_deterministic() {
    let c = case(shape(2, 6, 2, 70, 75, 24, true), 41, true, true, false);
    let s = &c.s;
    let (q, k, v, bias) = (
        f32s(&c.q),
        f32s(&c.k),
        f32s(&c.v),
        f32s(c.bias.as_ref().unwrap()),
    );
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; s.b * s.nh * s.tq];
    attention_fwd_cpu(
        s,
        &q,
        &k,
        &v,
        Some(&bias),
        c.mask.as_deref(),
        &mut out,
        &mut lse,
    )
    .unwrap();
    let dout = f32s(&Rng(5).vec(q.len(), 1.0));
    let run = || {
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; q.len()],
            vec![0.0f32; k.len()],
            vec![0.0f32; v.len()],
        );
        let mut db = vec![0.0f32; s.b * s.tk];
        attention_bwd_cpu(
            s,
            &q,
            &k,
            &v,
            Some(&bias),
            c.mask.as_deref(),
            &out,
            &lse,
            &dout,
            &mut dq,
            &mut dk,
            &mut dv,
            Some(&mut db),
        )
        .unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        (bits(&dq), bits(&dk), bits(&dv), bits(&db))
    };
    let first = run();
    for _ in 0..3 {
        assert!(run() == first, "backward differs between runs");
    }
}

/// `c` with its keys and values in blocks of `tk + extra` rows, the extra rows NaN (as
/// a preallocated KV cache's unused rows): a read past Tk poisons the output.
fn strided(c: &Case, extra: usize) -> Case {
    let s = AttnShape {
        kv_stride: c.s.tk + extra,
        ..c.s
    };
    let pad = |x: &[f64]| -> Vec<f64> {
        let n = c.s.tk * c.s.hs;
        let blocks = c.s.b * c.s.nkv;
        (0..blocks)
            .flat_map(|g| {
                let mut v = x[g * n..(g + 1) * n].to_vec();
                v.resize((c.s.tk + extra) * c.s.hs, f64::NAN);
                v
            })
            .collect()
    };
    Case {
        s,
        q: c.q.clone(),
        k: pad(&c.k),
        v: pad(&c.v),
        bias: c.bias.clone(),
        mask: c.mask.clone(),
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The forward reads keys in place from blocks of `kv_stride ≥ Tk` rows (a KV cache
/// with room to grow): the CPU twin and the kernel give bit for bit what they give on
/// the packed keys, over every kernel case (causal, GQA, masks, several key tiles).
#[test]
fn forward_reads_strided_keys_in_place() {
    for c in kernel_cases() {
        let cs = strided(&c, 5);
        let (o, l) = run_cpu_fwd_f32(&c);
        let (os, ls) = run_cpu_fwd_f32(&cs);
        assert_eq!(bits(&os), bits(&o), "cpu {}", tag(&c));
        assert_eq!(bits(&ls), bits(&l), "cpu {}", tag(&c));
        for dev in Device::test_devices() {
            let (o, l) = dev_fwd(&dev, &c);
            let (os, ls) = dev_fwd(&dev, &cs);
            assert_eq!(bits(&os), bits(&o), "{dev:?} {}", tag(&c));
            assert_eq!(bits(&ls), bits(&l), "{dev:?} {}", tag(&c));
            if tensor_core_head_size(c.s.hs) {
                let (o, l) = dev_fwd_with(&dev, &c, attention_fwd_tc);
                let (os, ls) = dev_fwd_with(&dev, &cs, attention_fwd_tc);
                assert_eq!(bits(&os), bits(&o), "{dev:?} tc {}", tag(&c));
                assert_eq!(bits(&ls), bits(&l), "{dev:?} tc {}", tag(&c));
            }
        }
    }
}

/// A stride below Tk is an error, and the backward takes packed keys only.
#[test]
fn strided_keys_are_checked() {
    let c = case(shape(1, 2, 1, 3, 4, 8, true), 5, false, false, false);
    let bad = AttnShape {
        kv_stride: 3,
        ..c.s
    };
    let (q, k) = (f32s(&c.q), f32s(&c.k));
    let (mut out, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; 6]);
    let e = attention_fwd_cpu(&bad, &q, &k, &k, None, None, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("kv_stride"), "{e}");
    let cs = strided(&c, 2);
    let (qs, ks) = (f32s(&cs.q), f32s(&cs.k));
    attention_fwd_cpu(&cs.s, &qs, &ks, &ks, None, None, &mut out, &mut lse).unwrap();
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; ks.len()],
        vec![0.0f32; ks.len()],
    );
    let e = attention_bwd_cpu(
        &cs.s, &qs, &ks, &ks, None, None, &out, &lse, &out, &mut dq, &mut dk, &mut dv, None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("packed"), "{e}");
}

/// x (B, n1, n2, HS) → (B, n2, n1, HS): head-major to token-major (n1 = H, n2 = T)
/// and back (n1 = T, n2 = H).
fn swap_mid(x: &[f32], [b, n1, n2, hs]: [usize; 4]) -> Vec<f32> {
    let mut o = vec![f32::NAN; x.len()];
    for bi in 0..b {
        for i in 0..n1 {
            for j in 0..n2 {
                let (src, dst) = (((bi * n1 + i) * n2 + j) * hs, ((bi * n2 + j) * n1 + i) * hs);
                o[dst..dst + hs].copy_from_slice(&x[src..src + hs]);
            }
        }
    }
    o
}

/// Which implementation runs a forward and its backward.
#[derive(Clone, Copy, Debug)]
enum Impl<'a> {
    Cpu,
    Simt(&'a Device),
    Tc(&'a Device),
}

/// Forward, then the backward fed that forward's own out and lse, on f32 inputs in the
/// layout of `s`: [out, lse, dq, dk, dv, dbias].
fn fwd_bwd(im: Impl<'_>, s: &AttnShape, c: &Case, [q, k, v, dout]: [&[f32]; 4]) -> [Vec<f32>; 6] {
    let bias = c.bias.as_deref().map(f32s);
    let (nq, nk, nl) = (q.len(), k.len(), s.b * s.nh * s.tq);
    let dev = match im {
        Impl::Cpu => {
            let (mut o, mut l) = (vec![f32::NAN; nq], vec![f32::NAN; nl]);
            let b = bias.as_deref();
            attention_fwd_cpu(s, q, k, v, b, c.mask.as_deref(), &mut o, &mut l).unwrap();
            let (mut dq, mut dk, mut dv) =
                (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
            let mut db = vec![f32::NAN; s.b * s.tk];
            attention_bwd_cpu(
                s,
                q,
                k,
                v,
                b,
                c.mask.as_deref(),
                &o,
                &l,
                dout,
                &mut dq,
                &mut dk,
                &mut dv,
                Some(&mut db),
            )
            .unwrap();
            return [o, l, dq, dk, dv, db];
        }
        Impl::Simt(d) | Impl::Tc(d) => d,
    };
    let (fwd, bwd): (AttnFwdFn, AttnBwdFn) = match im {
        Impl::Tc(_) => (attention_fwd_tc, attention_bwd_tc),
        _ => (attention_fwd, attention_bwd),
    };
    let up = |x: &[f32]| dev.upload(x).unwrap();
    let nan = |n: usize| dev.upload(&vec![f32::NAN; n]).unwrap();
    let (qd, kd, vd, dod) = (up(q), up(k), up(v), up(dout));
    let bd = bias.as_deref().map(up);
    let md = c.mask.as_ref().map(|m| dev.upload(m).unwrap());
    let (mut o, mut l) = (nan(nq), nan(nl));
    fwd(
        dev,
        s,
        &qd,
        &kd,
        &vd,
        bd.as_ref(),
        md.as_ref(),
        &mut o,
        &mut l,
    )
    .unwrap();
    let (mut dq, mut dk, mut dv, mut db) = (nan(nq), nan(nk), nan(nk), nan(s.b * s.tk));
    bwd(
        dev,
        s,
        &qd,
        &kd,
        &vd,
        bd.as_ref(),
        md.as_ref(),
        &o,
        &l,
        &dod,
        &mut dq,
        &mut dk,
        &mut dv,
        Some(&mut db),
    )
    .unwrap();
    [o, l, dq, dk, dv, db].map(|x| dev.download(&x).unwrap())
}

/// Token-major operands (a linear layer's (B·T, H·HS) output read in place): the CPU
/// twin and the kernels, SIMT and tensor cores, forward and backward, give bit for bit
/// what they give on the same values head-major, for every operand token-major and for
/// two mixes (LLaMA's: q and k rotated and split, v and out token-major), over kernel
/// cases with GQA, causal rows, bias, masks, HS = 3 (rows not float4-aligned) and
/// several tiles.  A kernel that indexed a token-major operand as head-major (or took
/// one operand's bit for another's) would read other heads' rows and fail.
#[test]
fn token_major_operands_give_the_same_bits() {
    let mixes = [
        AttnLayout::TOKENS,
        AttnLayout {
            q: false,
            k: false,
            v: true,
            out: true,
        },
        AttnLayout {
            q: true,
            k: true,
            v: false,
            out: false,
        },
    ];
    let devs = Device::test_devices();
    let mut ran = 0;
    for c in kernel_cases().into_iter().step_by(4) {
        let s = c.s;
        let (qd, kd) = ([s.b, s.nh, s.tq, s.hs], [s.b, s.nkv, s.tk, s.hs]);
        let (q, k, v) = (f32s(&c.q), f32s(&c.k), f32s(&c.v));
        let dout = f32s(&Rng(9).vec(q.len(), 1.0));
        let mut impls = vec![Impl::Cpu];
        for d in &devs {
            impls.push(Impl::Simt(d));
            if tensor_core_head_size(s.hs) {
                impls.push(Impl::Tc(d));
            }
        }
        for &im in &impls {
            let want = fwd_bwd(im, &s, &c, [&q, &k, &v, &dout]);
            for lay in mixes {
                let ls = AttnShape { layout: lay, ..s };
                // to token-major: swap (H, T); back: swap (T, H)
                let to = |x: &[f32], tok: bool, [b, h, t, hs]: [usize; 4]| {
                    if tok {
                        swap_mid(x, [b, h, t, hs])
                    } else {
                        x.to_vec()
                    }
                };
                let back = |x: &[f32], tok: bool, [b, h, t, hs]: [usize; 4]| {
                    if tok {
                        swap_mid(x, [b, t, h, hs])
                    } else {
                        x.to_vec()
                    }
                };
                let ins = [
                    to(&q, lay.q, qd),
                    to(&k, lay.k, kd),
                    to(&v, lay.v, kd),
                    to(&dout, lay.out, qd),
                ];
                let [o, l, dq, dk, dv, db] =
                    fwd_bwd(im, &ls, &c, [&ins[0], &ins[1], &ins[2], &ins[3]]);
                let got = [
                    back(&o, lay.out, qd),
                    l,
                    back(&dq, lay.q, qd),
                    back(&dk, lay.k, kd),
                    back(&dv, lay.v, kd),
                    db,
                ];
                let names = ["out", "lse", "dq", "dk", "dv", "dbias"];
                for ((name, g), w) in names.iter().zip(&got).zip(&want) {
                    let diff = (0..w.len()).filter(|&i| g[i].to_bits() != w[i].to_bits());
                    let (n, first) = (diff.clone().count(), diff.min());
                    assert!(
                        n == 0,
                        "{im:?} {lay:?} {name}: {n} of {} differ, the first at {first:?}; {}",
                        w.len(),
                        tag(&c)
                    );
                }
                ran += 1;
            }
        }
    }
    assert!(ran >= 40, "only {ran} runs");
}

/// A token-major key or value operand is packed: a cache's stride is an error, not a
/// misread; and a wrong length names the operand's token-major dimensions.
#[test]
fn token_major_keys_are_packed() {
    let c = case(shape(1, 2, 1, 3, 4, 8, false), 5, false, false, false);
    let lay = AttnLayout {
        k: true,
        ..AttnLayout::HEADS
    };
    let s = AttnShape {
        kv_stride: 6,
        layout: lay,
        ..c.s
    };
    let (q, k) = (f32s(&c.q), vec![0.0f32; 6 * 8]);
    let (mut out, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; 6]);
    let e = attention_fwd_cpu(&s, &q, &k, &k, None, None, &mut out, &mut lse).unwrap_err();
    assert!(e.to_string().contains("token-major"), "{e}");
    let s = AttnShape { layout: lay, ..c.s };
    let e = attention_fwd_cpu(
        &s,
        &q,
        &k[..5 * 8],
        &f32s(&c.v),
        None,
        None,
        &mut out,
        &mut lse,
    )
    .unwrap_err();
    assert!(e.to_string().contains("k (B,Tk,NKV,HS)"), "{e}");
}

/// The tensor-core kernels' fragment reads from shared memory take one wavefront each
/// (no bank conflict), at every head width they take: the emulator's
/// `emu_selftest_mma_banks` counts the wavefronts of every read `mma_load_a` / `_b` /
/// `_bt` / `_bt_a_order` make from a tile, by the same offsets the kernels use.  The
/// strides are the kernels' (kernels/attention*.cu): q-side, k and v tiles ft_ks ≡ 4 mod
/// 32 (the forward's v, read as B, 4 more: ≡ 8 mod 32), Pᵀ / dSᵀ 36, and the tiles read
/// both as B and Bᵀ (k in dQ; q and dout in dK / dV) swizzled at tc_sw, a multiple of
/// 32.  The count can fail: a B read at a stride ≡ 4 mod 32 (the backward before the
/// swizzle) takes two wavefronts, and a Bᵀ read (in either order) of a tile at a
/// multiple of 32 left plain takes eight.
#[test]
fn tensor_core_fragment_reads_are_conflict_free() {
    let dev = Device::emulator();
    let waves = |kind: i32, ld: usize, sw: bool, qs: usize| -> i32 {
        let mut out = dev.zeros::<i32>(1).unwrap();
        dev.launch(
            "emu_selftest_mma_banks",
            LaunchCfg::new([1, 1, 1], [32, 1, 1], 0),
            &[
                out.arg_mut(),
                KArg::I32(kind),
                KArg::I32(ld as i32),
                KArg::I32(i32::from(sw)),
                KArg::I32(qs as i32),
            ],
        )
        .unwrap();
        dev.download(&out).unwrap()[0]
    };
    let (a, b, bt, bt_a_order) = (0, 1, 2, 3);
    let up32 = |x: usize| x.div_ceil(32) * 32;
    for qs in (8..=128).step_by(8) {
        assert!(tensor_core_head_size(qs));
        let ks = up32(qs - 4) + 4;
        let sw = up32(qs);
        let reads = [
            ("q, dout, k, v as A", a, ks, false, qs),
            ("k, v as Bᵀ", bt, ks, false, qs),
            ("k, v as Bᵀ in A order", bt_a_order, ks, false, qs),
            ("Pᵀ, dSᵀ as A", a, 36, false, 32),
            ("the forward's v as B", b, ks + 4, false, qs),
            ("swizzled as A", a, sw, true, qs),
            ("swizzled as Bᵀ", bt, sw, true, qs),
            ("swizzled as Bᵀ in A order", bt_a_order, sw, true, qs),
            ("swizzled as B", b, sw, true, qs),
        ];
        for (what, kind, ld, swz, cols) in reads {
            assert_eq!(waves(kind, ld, swz, cols), 1, "qs {qs}: {what} (ld {ld})");
        }
        assert_eq!(waves(b, ks, false, qs), 2, "qs {qs}: B at ld {ks}");
        assert_eq!(waves(bt, sw, false, qs), 8, "qs {qs}: Bᵀ at ld {sw}, plain");
        assert_eq!(
            waves(bt_a_order, sw, false, qs),
            8,
            "qs {qs}: Bᵀ in A order at ld {sw}, plain"
        );
    }
}
