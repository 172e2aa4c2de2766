//! Biased attention: the CPU twin against a naive f64 reference and f64 finite
//! differences, invariants (KV-cache decode, bias shift, bias −inf ≡ mask), and the
//! CUDA kernels (emulator, plus a GPU when one is present) against the CPU twin.
//!
//! Here: the cases, the naive references and the helpers the modules share; `twin` the
//! CPU twin, `kernels` the kernels against it, `layouts` the operand layouts.
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

// ---------------------------------------------------------------------------------------
// What the kernels' tests share.
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

mod kernels;
mod layouts;
mod twin;
